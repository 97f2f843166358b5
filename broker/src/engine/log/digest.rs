//! A digest of a partition's stored state, to compare replicas.
//!
//! Two replicas that applied the same entries hold the same state (DESIGN.md
//! §7, "one write path"), but not the same bytes: channel ids and store
//! generations are node-local. The digest covers what must agree — each
//! channel's name, epoch, offsets, byte count, oldest time and stored
//! messages (offset, time, producer, payload), and each producer window live
//! at the partition's time with its runs naming channels by name — and
//! leaves out what may differ: ids, generations, and windows idle by the
//! partition's time (every replica treats them as gone, but each deletes
//! them from its store when its own sweep or compaction comes by).
//!
//! Pure: it folds an export ([`Exported`] items in the store's order:
//! channels by name, each followed by its messages, then windows by key).

use std::collections::HashMap;

use sha2::{Digest as _, Sha256};

use crate::store::{ChannelId, Exported, StoreError};

/// A partition's state, digested.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateDigest {
    /// SHA-256 over the state, hex.
    pub sha256: String,
    /// Channels covered.
    pub channels: u64,
    /// Stored messages covered.
    pub messages: u64,
    /// Producer windows covered.
    pub producers: u64,
    /// Device-state entries covered.
    pub devices: u64,
}

/// Folds exported items into a [`StateDigest`].
#[derive(Default)]
pub struct Digester {
    /// `(partition time, idle horizon)`: windows idle by then are left out.
    live_at: Option<(u64, u64)>,
    hash: Sha256,
    /// Node-local channel id → a stable stand-in (the name's hash), for
    /// the windows' runs.
    names: HashMap<ChannelId, u64>,
    channels: u64,
    messages: u64,
    producers: u64,
    devices: u64,
}

impl std::fmt::Debug for Digester {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Digester")
            .field("channels", &self.channels)
            .field("messages", &self.messages)
            .finish_non_exhaustive()
    }
}

impl Digester {
    /// A digester that leaves out windows idle for longer than `idle_ms`
    /// at `now_ms` (`None`: keeps every window).
    pub fn new(live_at: Option<(u64, u64)>) -> Self {
        Self {
            live_at,
            ..Self::default()
        }
    }

    /// Takes one exported item.
    pub fn take(&mut self, item: Exported) -> Result<(), StoreError> {
        match item {
            Exported::Channel(name, meta) => {
                self.channels += 1;
                let stand_in = name_hash(name.as_str());
                self.names.insert(meta.id, stand_in);
                self.hash.update(b"C");
                field(&mut self.hash, name.as_str().as_bytes());
                for value in [
                    meta.epoch.0,
                    meta.first_offset.get(),
                    meta.next_offset.get(),
                    meta.bytes,
                    meta.oldest_ms,
                    meta.previous_epoch.0,
                    meta.epoch_start.get(),
                ] {
                    self.hash.update(value.to_be_bytes());
                }
            }
            Exported::Message(message) => {
                self.messages += 1;
                self.hash.update(b"M");
                self.hash.update(message.offset.get().to_be_bytes());
                self.hash.update(message.timestamp_ms.to_be_bytes());
                let (id, sequence) = message
                    .producer
                    .map_or((0, 0), |p| (p.producer_id, p.sequence));
                self.hash.update(id.to_be_bytes());
                self.hash.update(sequence.to_be_bytes());
                field(&mut self.hash, &message.payload);
            }
            Exported::Producer(_, window)
                if self
                    .live_at
                    .is_some_and(|(now, idle)| window.is_expired(now, idle)) => {}
            Exported::Device(key, value) => {
                self.devices += 1;
                self.hash.update(b"D");
                field(&mut self.hash, &key);
                field(&mut self.hash, &value);
            }
            Exported::Producer(key, mut window) => {
                self.producers += 1;
                // Runs of a channel this partition no longer holds keep a
                // stand-in that is the same everywhere: 0.
                window.remap_channels(|id| self.names.get(&id).copied().unwrap_or(0));
                self.hash.update(b"P");
                field(&mut self.hash, &key.encode());
                field(&mut self.hash, &window.encode());
            }
        }
        Ok(())
    }

    /// The digest of everything taken.
    pub fn finish(self) -> StateDigest {
        let sha256 = self
            .hash
            .finalize()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        StateDigest {
            sha256,
            channels: self.channels,
            messages: self.messages,
            producers: self.producers,
            devices: self.devices,
        }
    }
}

/// A length-prefixed field: no two different sequences of fields hash the
/// same bytes.
fn field(hash: &mut Sha256, bytes: &[u8]) {
    hash.update((bytes.len() as u64).to_be_bytes());
    hash.update(bytes);
}

fn name_hash(name: &str) -> u64 {
    let digest = Sha256::digest(name.as_bytes());
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    u64::from_be_bytes(first)
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use volna_proto::{ChannelName, Epoch, Offset, ProducerSeq};

    use super::*;
    use crate::store::{ChannelMeta, ProducerEntry, ProducerKey, ProducerWindow, StoredMessage};

    fn state(channel_id: ChannelId, payload: &'static str) -> Vec<Exported> {
        let name = ChannelName::new("chat.a").expect("name");
        let mut meta = ChannelMeta::new(channel_id, Epoch(7));
        meta.next_offset = Offset::new(2);
        let mut window = ProducerWindow::default();
        window.insert(
            ProducerEntry {
                sequence: 1,
                channel: channel_id,
                offset: Offset::FIRST,
                epoch: Epoch(7),
            },
            8,
            1_000,
        );
        vec![
            Exported::Channel(name, meta),
            Exported::Message(StoredMessage {
                offset: Offset::FIRST,
                timestamp_ms: 1_000,
                producer: Some(ProducerSeq {
                    producer_id: 9,
                    sequence: 1,
                }),
                payload: Bytes::from(payload),
            }),
            Exported::Producer(ProducerKey::new("ann#p0".into(), 9), window),
        ]
    }

    fn digest(items: Vec<Exported>) -> StateDigest {
        let mut d = Digester::default();
        for item in items {
            d.take(item).expect("take");
        }
        d.finish()
    }

    #[test]
    fn windows_idle_by_the_partitions_time_do_not_count() {
        let with = digest(state(1, "hello"));
        let mut without = state(1, "hello");
        without.pop();
        let mut idle = Digester::new(Some((1_000 + 5_000, 1_000)));
        for item in state(1, "hello") {
            idle.take(item).expect("take");
        }
        let idle = idle.finish();
        assert_eq!(
            idle,
            digest(without),
            "a window idle by then is as if deleted"
        );
        assert_ne!(idle, with);
    }

    #[test]
    fn node_local_ids_do_not_count_and_content_does() {
        let here = digest(state(1, "hello"));
        let there = digest(state(42, "hello"));
        assert_eq!(here, there, "channel ids are node-local");
        assert_eq!((here.channels, here.messages, here.producers), (1, 1, 1));
        assert_ne!(here, digest(state(1, "hellO")), "a payload differs");
        let mut fewer = state(1, "hello");
        fewer.pop();
        assert_ne!(here, digest(fewer), "a window is missing");
    }
}
