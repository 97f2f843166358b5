//! Producer windows: what idempotent publish (G5) remembers of a producer.
//!
//! A window is keyed by [`ProducerKey`] — the authenticated owner and the
//! client's `producer_id` — so one user can never read or spoil another's
//! window. It is stored as **one value per producer**, rewritten whenever
//! the producer publishes: no key per sequence, no range tombstone per
//! publish (a million publishes of one producer once left hundreds of
//! thousands of overlapping range tombstones that RocksDB fragments
//! quadratically at flush). An idle window is removed with one point delete
//! or dropped by the compaction filter.
//!
//! Invariants:
//! - runs are sorted by sequence and never overlap; a run is consecutive
//!   sequences stored at consecutive offsets of one channel and epoch, so a
//!   producer that publishes in order to one channel is one run, whatever
//!   the window's capacity;
//! - every sequence below `evicted_below` is forgotten (cannot be told
//!   apart); every sequence at or above it and in no run was never stored.

use std::collections::VecDeque;
use std::sync::Arc;

use bytes::{Buf, BufMut};
use volna_proto::{Epoch, Offset};

use super::ChannelId;
use super::record::RecordError;

/// Whose producer a window is: the authenticated identity (a token's `sub`
/// or a service's certificate name) and the client-chosen producer id.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ProducerKey {
    /// The identity that published.
    pub owner: Arc<str>,
    /// The client's producer id.
    pub producer_id: u64,
}

impl ProducerKey {
    /// A key for `owner`'s producer `producer_id`.
    pub fn new(owner: Arc<str>, producer_id: u64) -> Self {
        Self { owner, producer_id }
    }

    /// `owner length (u16) ‖ owner ‖ producer_id`, big-endian; owners longer
    /// than 65,535 bytes are cut (identities are far shorter: tokens are
    /// bounded by the frame limit and names by the certificate).
    pub fn encode(&self) -> Vec<u8> {
        let owner = self.owner.as_bytes();
        let owner = &owner[..owner.len().min(u16::MAX as usize)];
        let mut key = Vec::with_capacity(2 + owner.len() + 8);
        key.put_u16(owner.len() as u16);
        key.put_slice(owner);
        key.put_u64(self.producer_id);
        key
    }

    /// The key [`ProducerKey::encode`] wrote.
    pub fn decode(mut key: &[u8]) -> Result<Self, RecordError> {
        const WHAT: &str = "producer key";
        if key.remaining() < 2 {
            return Err(RecordError::Truncated { what: WHAT });
        }
        let len = key.get_u16() as usize;
        if key.remaining() != len + 8 {
            return Err(RecordError::Truncated { what: WHAT });
        }
        let owner =
            std::str::from_utf8(&key[..len]).map_err(|_| RecordError::Malformed { what: WHAT })?;
        let owner = Arc::from(owner);
        key.advance(len);
        Ok(Self::new(owner, key.get_u64()))
    }
}

/// One remembered publish of a producer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProducerEntry {
    /// The producer's sequence number.
    pub sequence: u64,
    /// Where it was stored.
    pub channel: ChannelId,
    /// Its offset.
    pub offset: Offset,
    /// The channel's epoch then.
    pub epoch: Epoch,
}

/// Consecutive sequences stored at consecutive offsets of one channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Run {
    first_sequence: u64,
    channel: ChannelId,
    first_offset: u64,
    epoch: Epoch,
    len: u64,
}

impl Run {
    fn end(&self) -> u64 {
        self.first_sequence + self.len
    }

    fn entry(&self, sequence: u64) -> ProducerEntry {
        ProducerEntry {
            sequence,
            channel: self.channel,
            offset: Offset::new(self.first_offset + (sequence - self.first_sequence)),
            epoch: self.epoch,
        }
    }

    fn extends_to(&self, e: &ProducerEntry) -> bool {
        self.end() == e.sequence
            && self.channel == e.channel
            && self.epoch == e.epoch
            && self.first_offset + self.len == e.offset.get()
    }
}

/// A producer's recently stored sequences, for idempotent retries (G5).
///
/// Sequences may arrive out of order (concurrent retries after a
/// reconnect), so the window remembers the highest `capacity` sequences
/// stored, as runs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProducerWindow {
    /// Sequences below this were forgotten.
    pub evicted_below: u64,
    /// When the producer last stored a publish, ms since the Unix epoch:
    /// the window expires `producer_idle_secs` after it.
    pub last_publish_ms: u64,
    runs: VecDeque<Run>,
    entries: u64,
}

/// What a producer window knows of one sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SequenceStatus {
    /// Never stored: store it.
    New,
    /// Already stored here.
    Stored(ProducerEntry),
    /// Below the window: cannot tell.
    Forgotten,
}

const WINDOW_VERSION: u8 = 2;
const RUN_BYTES: usize = 40;

impl ProducerWindow {
    /// What the window knows of `sequence`.
    pub fn lookup(&self, sequence: u64) -> SequenceStatus {
        if sequence < self.evicted_below {
            return SequenceStatus::Forgotten;
        }
        let at = self.runs.partition_point(|r| r.end() <= sequence);
        match self.runs.get(at) {
            Some(run) if run.first_sequence <= sequence => {
                SequenceStatus::Stored(run.entry(sequence))
            }
            _ => SequenceStatus::New,
        }
    }

    /// Remembers a newly stored sequence (one `lookup` called `New`),
    /// forgetting the lowest beyond `capacity`.
    pub fn insert(&mut self, entry: ProducerEntry, capacity: usize, now_ms: u64) {
        self.last_publish_ms = self.last_publish_ms.max(now_ms);
        let at = self.runs.partition_point(|r| r.end() <= entry.sequence);
        match at.checked_sub(1).and_then(|i| self.runs.get_mut(i)) {
            Some(prev) if prev.extends_to(&entry) => prev.len += 1,
            _ => self.runs.insert(
                at,
                Run {
                    first_sequence: entry.sequence,
                    channel: entry.channel,
                    first_offset: entry.offset.get(),
                    epoch: entry.epoch,
                    len: 1,
                },
            ),
        }
        self.entries += 1;
        let capacity = capacity.max(1) as u64;
        while self.entries > capacity {
            let excess = self.entries - capacity;
            let Some(front) = self.runs.front_mut() else {
                break;
            };
            if front.len <= excess {
                self.evicted_below = front.end();
                self.entries -= front.len;
                self.runs.pop_front();
            } else {
                front.first_sequence += excess;
                front.first_offset += excess;
                front.len -= excess;
                self.entries -= excess;
                self.evicted_below = front.first_sequence;
            }
        }
    }

    /// The highest sequence stored (0: none): where a producer that
    /// restarts under the same id continues from.
    pub fn last_sequence(&self) -> u64 {
        self.runs
            .back()
            .map_or(self.evicted_below.saturating_sub(1), |run| run.end() - 1)
    }

    /// Sequences remembered.
    pub fn len(&self) -> u64 {
        self.entries
    }

    /// Whether nothing is remembered.
    pub fn is_empty(&self) -> bool {
        self.entries == 0
    }

    /// Whether the window outlived `idle_ms` without a publish at `now_ms`.
    pub fn is_expired(&self, now_ms: u64, idle_ms: u64) -> bool {
        now_ms.saturating_sub(self.last_publish_ms) > idle_ms
    }

    /// Renames the channels its runs were stored in (a partition restored
    /// from a snapshot gets this node's channel ids).
    pub fn remap_channels(&mut self, new_id: impl Fn(ChannelId) -> ChannelId) {
        for run in &mut self.runs {
            run.channel = new_id(run.channel);
        }
    }

    /// Bytes of its stored value (and, roughly, of its runs in memory).
    pub fn encoded_len(&self) -> usize {
        1 + 8 + 8 + 4 + self.runs.len() * RUN_BYTES
    }

    /// `version ‖ last_publish_ms ‖ evicted_below ‖ runs (u32) ‖
    /// (first_sequence ‖ channel ‖ first_offset ‖ epoch ‖ len)*`.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.encoded_len());
        out.put_u8(WINDOW_VERSION);
        out.put_u64(self.last_publish_ms);
        out.put_u64(self.evicted_below);
        out.put_u32(self.runs.len() as u32);
        for run in &self.runs {
            out.put_u64(run.first_sequence);
            out.put_u64(run.channel);
            out.put_u64(run.first_offset);
            out.put_u64(run.epoch.0);
            out.put_u64(run.len);
        }
        out
    }

    /// Decodes a stored window, checking that its runs are well formed.
    pub fn decode(mut value: &[u8]) -> Result<Self, RecordError> {
        const WHAT: &str = "producer window";
        let truncated = RecordError::Truncated { what: WHAT };
        if value.remaining() < 1 + 8 + 8 + 4 {
            return Err(truncated);
        }
        match value.get_u8() {
            WINDOW_VERSION => {}
            version => {
                return Err(RecordError::UnknownVersion {
                    what: WHAT,
                    version,
                });
            }
        }
        let last_publish_ms = value.get_u64();
        let evicted_below = value.get_u64();
        let count = value.get_u32() as usize;
        if value.remaining() != count.saturating_mul(RUN_BYTES) {
            return Err(truncated);
        }
        let mut window = Self {
            evicted_below,
            last_publish_ms,
            runs: VecDeque::with_capacity(count),
            entries: 0,
        };
        let mut floor = evicted_below;
        for _ in 0..count {
            let run = Run {
                first_sequence: value.get_u64(),
                channel: value.get_u64(),
                first_offset: value.get_u64(),
                epoch: Epoch(value.get_u64()),
                len: value.get_u64(),
            };
            let well_formed = run.len > 0
                && run.first_sequence >= floor
                && run.first_sequence.checked_add(run.len).is_some()
                && run.first_offset.checked_add(run.len).is_some();
            if !well_formed {
                return Err(RecordError::Malformed { what: WHAT });
            }
            floor = run.end();
            window.entries += run.len;
            window.runs.push_back(run);
        }
        Ok(window)
    }
}

/// The time of each replicated partition: the latest entry time its
/// state machine applied (entry times are the leader's clock, made never to
/// go back). Producer windows of a partition are idle, and may be deleted
/// from the store by a sweep or a compaction, only by that time: a window
/// this node's clock finds idle may be live for the partition, and
/// deleting it here alone would make this replica decide differently.
///
/// Only a cluster node's windows have partitions: on a single node every
/// window is judged by the node's clock, whatever its owner's name says
/// (a user id may well contain `#p3`). Until the log says which it is
/// (a compaction may run as soon as the store opens), a window whose owner
/// names a partition is kept.
#[derive(Debug, Default)]
pub struct PartitionClocks {
    clocks: std::sync::RwLock<std::collections::HashMap<u32, u64>>,
    /// 0: not known yet; [`SINGLE_NODE`]; [`PARTITIONED`].
    mode: std::sync::atomic::AtomicU8,
}

const SINGLE_NODE: u8 = 1;
const PARTITIONED: u8 = 2;

impl PartitionClocks {
    /// Says whether the windows belong to a cluster node's partitions
    /// (judged by partition time) or to a single node (by its clock);
    /// called by the log before it applies or sweeps anything.
    pub fn set_partitioned(&self, partitioned: bool) {
        let mode = if partitioned {
            PARTITIONED
        } else {
            SINGLE_NODE
        };
        self.mode.store(mode, std::sync::atomic::Ordering::Release);
    }

    /// `partition` applied an entry of `time_ms`.
    pub fn advance(&self, partition: u32, time_ms: u64) {
        if let Ok(mut clocks) = self.clocks.write() {
            let clock = clocks.entry(partition).or_default();
            *clock = (*clock).max(time_ms);
        }
    }

    /// `partition`'s time, if it applied anything since this node started.
    pub fn get(&self, partition: u32) -> Option<u64> {
        self.clocks.read().ok()?.get(&partition).copied()
    }

    /// The time `key`'s window is judged at: its partition's (`None`:
    /// unknown yet, keep it), or this node's clock for a window that
    /// belongs to no partition (a single node).
    pub fn now_for(&self, key: &ProducerKey) -> Option<u64> {
        let mode = self.mode.load(std::sync::atomic::Ordering::Acquire);
        match partition_of_owner(&key.owner).filter(|_| mode != SINGLE_NODE) {
            Some(_) if mode != PARTITIONED => None,
            Some(partition) => self.get(partition),
            None => Some(crate::log::now_ms()),
        }
    }
}

/// The partition a window's owner is scoped to: a cluster node names
/// owners `owner#p<partition>`.
pub fn partition_of_owner(owner: &str) -> Option<u32> {
    let (_, suffix) = owner.rsplit_once("#p")?;
    suffix.parse().ok()
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn entry(sequence: u64, channel: ChannelId, offset: u64) -> ProducerEntry {
        ProducerEntry {
            sequence,
            channel,
            offset: Offset::new(offset),
            epoch: Epoch(9),
        }
    }

    proptest! {
        #[test]
        fn keys_decode_to_what_was_encoded(owner in ".{0,40}", id in any::<u64>()) {
            let key = ProducerKey::new(Arc::from(owner.as_str()), id);
            prop_assert_eq!(ProducerKey::decode(&key.encode()).ok(), Some(key.clone()));
            let encoded = key.encode();
            prop_assert!(ProducerKey::decode(&encoded[..encoded.len() - 1]).is_err());
        }
    }

    #[test]
    fn remapped_runs_answer_with_the_new_channel() {
        let mut w = ProducerWindow::default();
        w.insert(entry(1, 7, 1), 16, 1);
        w.insert(entry(2, 8, 1), 16, 1);
        w.remap_channels(|id| if id == 7 { 70 } else { 0 });
        assert_eq!(w.lookup(1), SequenceStatus::Stored(entry(1, 70, 1)));
        assert_eq!(w.lookup(2), SequenceStatus::Stored(entry(2, 0, 1)));
    }

    #[test]
    fn in_order_publishes_are_one_run_and_old_ones_are_forgotten() {
        let mut w = ProducerWindow::default();
        for s in 1..=1000 {
            w.insert(entry(s, 1, s + 10), 256, s);
        }
        assert_eq!(w.len(), 256);
        assert_eq!(w.runs.len(), 1);
        assert_eq!(w.evicted_below, 745);
        assert_eq!(w.lookup(744), SequenceStatus::Forgotten);
        assert_eq!(w.lookup(745), SequenceStatus::Stored(entry(745, 1, 755)));
        assert_eq!(w.lookup(1000), SequenceStatus::Stored(entry(1000, 1, 1010)));
        assert_eq!(w.lookup(1001), SequenceStatus::New);
        assert_eq!(w.last_publish_ms, 1000);
        assert_eq!(w.last_sequence(), 1000);
        assert_eq!(w.encode().len(), w.encoded_len());
    }

    #[test]
    fn out_of_order_and_interleaved_channels_are_remembered_exactly() {
        let mut w = ProducerWindow::default();
        w.insert(entry(3, 1, 1), 8, 0);
        w.insert(entry(1, 2, 5), 8, 0);
        w.insert(entry(2, 1, 2), 8, 0);
        assert_eq!(w.lookup(1), SequenceStatus::Stored(entry(1, 2, 5)));
        assert_eq!(w.lookup(2), SequenceStatus::Stored(entry(2, 1, 2)));
        assert_eq!(w.lookup(3), SequenceStatus::Stored(entry(3, 1, 1)));
        assert_eq!(w.lookup(4), SequenceStatus::New);
        assert_eq!(w.last_sequence(), 3);
        // A gap stays a gap: 5 was never stored.
        w.insert(entry(6, 1, 3), 8, 0);
        assert_eq!(w.lookup(5), SequenceStatus::New);
        assert_eq!(w.last_sequence(), 6);
        assert_eq!(ProducerWindow::default().last_sequence(), 0);
        assert_eq!(ProducerWindow::decode(&w.encode()), Ok(w));
    }

    #[test]
    fn damaged_windows_are_errors() {
        assert!(ProducerWindow::decode(&[2, 0]).is_err());
        let mut bytes = ProducerWindow::default().encode();
        bytes[0] = 7;
        assert!(matches!(
            ProducerWindow::decode(&bytes),
            Err(RecordError::UnknownVersion { version: 7, .. })
        ));
        let mut w = ProducerWindow::default();
        w.insert(entry(1, 1, 1), 8, 0);
        let mut bytes = w.encode();
        bytes.pop();
        assert!(ProducerWindow::decode(&bytes).is_err());
    }

    proptest! {
        /// The window answers exactly like a plain set of the highest
        /// `capacity` stored sequences, and survives its encoding.
        #[test]
        fn behaves_like_the_set_of_the_newest_sequences(
            sequences in proptest::collection::vec(1u64..200, 1..300),
            capacity in 1usize..40,
        ) {
            let mut w = ProducerWindow::default();
            let mut stored = std::collections::BTreeMap::new();
            let mut evicted_below = 0;
            for (i, s) in sequences.into_iter().enumerate() {
                if w.lookup(s) != SequenceStatus::New {
                    continue;
                }
                let e = entry(s, s % 3, i as u64 + 1);
                w.insert(e, capacity, 0);
                stored.insert(s, e);
                while stored.len() > capacity {
                    let (low, _) = stored.pop_first().expect("non-empty");
                    evicted_below = low + 1;
                }
            }
            for s in 0..210 {
                let expected = if s < evicted_below {
                    SequenceStatus::Forgotten
                } else {
                    stored.get(&s).map_or(SequenceStatus::New, |e| SequenceStatus::Stored(*e))
                };
                prop_assert_eq!(w.lookup(s), expected);
            }
            prop_assert_eq!(ProducerWindow::decode(&w.encode()), Ok(w));
        }
    }

    #[test]
    fn windows_are_judged_by_partition_time_only_on_a_cluster_node() {
        let key = |owner: &str| ProducerKey::new(std::sync::Arc::from(owner), 1);
        let clocks = PartitionClocks::default();
        clocks.advance(3, 5_000);
        // Not known yet (a compaction right after the store opened): a
        // window naming a partition is kept, any other is judged now.
        assert_eq!(clocks.now_for(&key("bob#p3")), None);
        assert!(clocks.now_for(&key("bob")).is_some_and(|now| now > 5_000));
        clocks.set_partitioned(true);
        assert_eq!(clocks.now_for(&key("bob#p3")), Some(5_000));
        assert_eq!(clocks.now_for(&key("bob#p4")), None);
        // A single node's user may be called "bob#p3": its windows expire
        // by the node's clock like everyone's.
        clocks.set_partitioned(false);
        assert!(
            clocks
                .now_for(&key("bob#p4"))
                .is_some_and(|now| now > 5_000)
        );
    }
}
