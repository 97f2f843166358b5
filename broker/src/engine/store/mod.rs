//! The durable channel log behind a small trait.
//!
//! [`LogStore`] is all the rest of the broker knows about storage: recover
//! what is stored, apply one atomic [`WriteSet`], read a range of a channel.
//! [`RocksStore`] is the production implementation (DESIGN.md §4);
//! [`MemoryStore`] lets the writer, retention and fan-out logic be tested
//! without a disk.
//!
//! Invariants every implementation keeps:
//! - a `WriteSet` is applied entirely or not at all;
//! - after `write` returns `Ok`, `read` sees the messages;
//! - `read` returns consecutive offsets starting at the first stored offset
//!   `>= from` (earlier ones may have been removed by retention).
//! - after a failed write the store refuses writes (`StoreError::Poisoned`)
//!   until [`LogStore::check_health`] succeeds: a write that failed half-way
//!   in the engine must not be followed by acks that assume it did not.

mod memory;
mod producers;
mod record;
#[cfg(feature = "rocksdb")]
mod rocks;

use bytes::Bytes;
use thiserror::Error;
use volna_proto::{ChannelName, Epoch, Offset, ProducerSeq};

pub use memory::{MemoryDeviceStore, MemoryStore, RecordedWrite};
pub use producers::{
    PartitionClocks, ProducerEntry, ProducerKey, ProducerWindow, SequenceStatus, partition_of_owner,
};
pub use record::RecordError;
#[cfg(feature = "rocksdb")]
pub use rocks::RocksStore;

/// The numeric id a channel's messages are keyed by.
pub type ChannelId = u64;

/// What the log knows about one channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChannelMeta {
    /// Key prefix of its messages.
    pub id: ChannelId,
    /// This incarnation of the log.
    pub epoch: Epoch,
    /// The oldest offset still stored (equal to `next_offset` when empty).
    pub first_offset: Offset,
    /// The offset the next message will get.
    pub next_offset: Offset,
    /// Payload bytes stored between `first_offset` and `next_offset`.
    pub bytes: u64,
    /// When the message at `first_offset` was stored (ms since the Unix
    /// epoch; 0 when unknown, which makes it due for age retention at
    /// once). Keys the channel in the age index.
    pub oldest_ms: u64,
    /// The store generation this metadata was last written in (see
    /// [`ChannelMeta::in_generation`]).
    pub generation: u64,
    /// The epoch before `epoch`, and the offset at which `epoch` took over
    /// from it: offsets below `epoch_start` mean the same messages in both.
    pub previous_epoch: Epoch,
    /// See `previous_epoch`.
    pub epoch_start: Offset,
}

impl ChannelMeta {
    /// A channel with no messages yet.
    pub fn new(id: ChannelId, epoch: Epoch) -> Self {
        Self {
            id,
            epoch,
            first_offset: Offset::FIRST,
            next_offset: Offset::FIRST,
            bytes: 0,
            oldest_ms: 0,
            generation: 0,
            previous_epoch: epoch,
            epoch_start: Offset::FIRST,
        }
    }

    /// This metadata as it stands in store generation `current`.
    ///
    /// The generation grows after each unclean stop with `durability =
    /// "wal"`, where the tail of the log may have been lost (power loss):
    /// offsets at and after the recovered `next_offset` may then be given
    /// to new messages while a device still holds the lost ones. Metadata
    /// written before such a stop therefore takes a new epoch, derived from
    /// the old one and the generation so that every reader computes the
    /// same without a write, and records where it began: a device resuming
    /// at or below `epoch_start` goes on, one beyond it is told
    /// `EpochChanged` (G3).
    pub fn in_generation(self, current: u64) -> Self {
        if self.generation >= current {
            return self;
        }
        let mut seed = self.epoch.0 ^ current.rotate_left(32) ^ 0x9e37_79b9_7f4a_7c15;
        // splitmix64: a well-spread epoch, never equal to the old one.
        seed = (seed ^ (seed >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        seed = (seed ^ (seed >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        seed ^= seed >> 31;
        let epoch = if seed == self.epoch.0 { !seed } else { seed };
        Self {
            epoch: Epoch(epoch),
            generation: current,
            previous_epoch: self.epoch,
            epoch_start: self.next_offset,
            ..self
        }
    }

    /// Messages currently stored.
    pub fn len(&self) -> u64 {
        self.first_offset.distance_to(self.next_offset)
    }

    /// Whether no message is stored.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One stored message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredMessage {
    /// Its offset in the channel.
    pub offset: Offset,
    /// When it was stored, milliseconds since the Unix epoch.
    pub timestamp_ms: u64,
    /// The producer identity it was published with, if any.
    pub producer: Option<ProducerSeq>,
    /// The body.
    pub payload: Bytes,
}

/// What the store tells at start (G7): a few counters, never a list of
/// channels or producers, so that start-up does not grow with what is
/// stored. Channel metadata and producer windows are loaded on use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Recovered {
    /// The id the next new channel gets (ids are never reused).
    pub next_channel_id: ChannelId,
    /// The store generation (see [`ChannelMeta::in_generation`]).
    pub generation: u64,
    /// Whether the previous run stopped cleanly: its last act was
    /// [`LogStore::mark_clean_stop`].
    pub clean_stop: bool,
    /// Whether, besides not stopping cleanly, the previous run may have
    /// lost writes the operating system had not put on disk: the machine
    /// restarted since (a power loss), or the store cannot tell. A process
    /// that crashed (`kill -9`, a panic, the OOM killer) on a machine that
    /// kept running lost nothing: its writes were in the OS's cache.
    pub lost_power: bool,
}

impl Default for Recovered {
    fn default() -> Self {
        Self {
            next_channel_id: 1,
            generation: 0,
            clean_stop: true,
            lost_power: false,
        }
    }
}

/// A channel's move in the age index, which orders non-empty channels by
/// namespace and the timestamp of their oldest message, so that age
/// retention finds the due ones without visiting the rest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgeIndexMove {
    /// The channel.
    pub channel: ChannelName,
    /// Its id.
    pub id: ChannelId,
    /// Its entry before (`oldest_ms`), if it had one.
    pub from: Option<u64>,
    /// Its entry after, if it has one.
    pub to: Option<u64>,
}

/// One atomic change to the store.
#[derive(Debug, Default)]
pub struct WriteSet {
    /// Messages to append, with their channel.
    pub messages: Vec<(ChannelId, StoredMessage)>,
    /// Channel metadata to write (insert or replace).
    pub channels: Vec<(ChannelName, ChannelMeta)>,
    /// Producer windows to store, each replacing the producer's previous
    /// one (one value per producer).
    pub producers: Vec<(ProducerKey, ProducerWindow)>,
    /// Producer windows to remove (idle beyond the retry horizon).
    pub expired_producers: Vec<ProducerKey>,
    /// Offsets `[from, to)` of a channel to delete (retention).
    pub deletions: Vec<(ChannelId, Offset, Offset)>,
    /// Channels to remove with all their messages.
    pub deleted_channels: Vec<(ChannelName, ChannelId)>,
    /// Age index entries to move.
    pub age_index: Vec<AgeIndexMove>,
    /// The next channel id, when channels were created.
    pub next_channel_id: Option<ChannelId>,
    /// A new store generation, written once at start after an unclean stop.
    pub generation: Option<u64>,
    /// Replicated partitions' applied state (cluster): what the partition's
    /// Raft group last applied, written with the changes it made so a
    /// restart resumes applying exactly after them.
    pub applied: Vec<(u32, Vec<u8>)>,
    /// Device state a replicated partition changed (cluster), written with
    /// its applied state.
    pub devices: DeviceWrite,
}

impl WriteSet {
    /// Whether the set changes nothing.
    pub fn is_empty(&self) -> bool {
        self.messages.is_empty()
            && self.channels.is_empty()
            && self.producers.is_empty()
            && self.expired_producers.is_empty()
            && self.deletions.is_empty()
            && self.deleted_channels.is_empty()
            && self.age_index.is_empty()
            && self.next_channel_id.is_none()
            && self.generation.is_none()
            && self.applied.is_empty()
            && self.devices.puts.is_empty()
            && self.devices.removed_ranges.is_empty()
    }
}

/// The age index key: `namespace ‖ 0x00 ‖ oldest_ms ‖ channel_id`, so that
/// one namespace's channels sort by the age of their oldest message.
/// Namespaces never hold a zero byte (channel names are printable).
pub fn age_index_key(namespace: &str, oldest_ms: u64, id: ChannelId) -> Vec<u8> {
    let mut key = Vec::with_capacity(namespace.len() + 17);
    key.extend_from_slice(namespace.as_bytes());
    key.push(0);
    key.extend_from_slice(&oldest_ms.to_be_bytes());
    key.extend_from_slice(&id.to_be_bytes());
    key
}

/// One piece of stored state as [`LogStore::export`] reads it, in this
/// order: each channel followed by its messages (by offset), then the
/// producer windows, then device entries (by key).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Exported {
    /// A channel's metadata; its messages follow.
    Channel(ChannelName, ChannelMeta),
    /// A stored message of the channel exported last.
    Message(StoredMessage),
    /// A producer's window (its runs name channels by their exported id).
    Producer(ProducerKey, ProducerWindow),
    /// A device-state entry of [`ExportScope::devices`]'s range.
    Device(Vec<u8>, Vec<u8>),
}

/// Which channels and producer windows an export reads.
pub struct ExportScope<'a> {
    /// Selects channels by name.
    pub channel: &'a (dyn Fn(&ChannelName) -> bool + Sync),
    /// Selects producer windows by key.
    pub producer: &'a (dyn Fn(&ProducerKey) -> bool + Sync),
    /// The device-state keys `[from, until)` to read too, if any.
    pub devices: Option<(&'a [u8], &'a [u8])>,
}

impl std::fmt::Debug for ExportScope<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExportScope").finish_non_exhaustive()
    }
}

/// Why the store failed.
#[derive(Debug, Error)]
pub enum StoreError {
    /// The storage engine reported an error (disk full, I/O error…).
    #[error("storage engine error: {0}")]
    Engine(String),
    /// A stored record could not be decoded: the data directory is damaged.
    #[error("corrupt record: {0}")]
    Corrupt(#[from] RecordError),
    /// An earlier write failed and the store has not been found healthy
    /// since; it refuses writes rather than guess what was stored.
    #[error("store refuses writes after an earlier failure: {0}")]
    Poisoned(String),
}

/// One atomic change to device state (see [`DeviceStore`]): ranges are
/// removed before keys are set.
#[derive(Debug, Default, Clone)]
pub struct DeviceWrite {
    /// Keys to set, each replacing its value.
    pub puts: Vec<(Vec<u8>, Vec<u8>)>,
    /// Key ranges `[from, until)` to remove.
    pub removed_ranges: Vec<(Vec<u8>, Vec<u8>)>,
}

/// A device-state key and its value.
pub type DeviceEntry = (Vec<u8>, Vec<u8>);

/// A device-state value as read: `None` where the key has none.
pub type DeviceValue = Option<Vec<u8>>;

/// Durable device state — cursors, read markers, the device registry — as
/// ordered keys and values (DESIGN.md §4, `cursors`). The byte layout is
/// [`crate::devices`]'s; a store only keeps it. Calls block: they run on
/// the devices thread, never on a tokio worker.
pub trait DeviceStore: Send + Sync + std::fmt::Debug + 'static {
    /// The values of `keys`, in the same order.
    fn get_device_entries(&self, keys: &[Vec<u8>]) -> Result<Vec<DeviceValue>, StoreError>;

    /// Up to `limit` entries with keys in `[from, until)`, in key order.
    fn scan_device_entries(
        &self,
        from: &[u8],
        until: &[u8],
        limit: usize,
    ) -> Result<Vec<DeviceEntry>, StoreError>;

    /// Applies `write` atomically; with `sync` the write-ahead log is
    /// fsynced before returning.
    fn write_device_entries(&self, write: &DeviceWrite, sync: bool) -> Result<(), StoreError>;
}

/// The durable log.
pub trait LogStore: Send + Sync + std::fmt::Debug + 'static {
    /// Reads the store's counters and takes down its clean-stop mark (so
    /// that a crash of this run is noticed by the next), durably.
    fn recover(&self) -> Result<Recovered, StoreError>;

    /// One channel's stored metadata, as written (not yet moved to the
    /// current generation).
    fn load_channel(&self, name: &ChannelName) -> Result<Option<ChannelMeta>, StoreError>;

    /// Up to `limit` channels whose name starts with `prefix`, in name
    /// order, after `after` when given.
    fn scan_channels(
        &self,
        prefix: &str,
        after: Option<&ChannelName>,
        limit: usize,
    ) -> Result<Vec<(ChannelName, ChannelMeta)>, StoreError>;

    /// Up to `limit` channels of `namespace` whose oldest message was
    /// stored before `before_ms`, oldest first (the age index).
    fn aged_channels(
        &self,
        namespace: &str,
        before_ms: u64,
        limit: usize,
    ) -> Result<Vec<ChannelName>, StoreError>;

    /// Records, durably, that this run stopped cleanly: everything it
    /// acknowledged is in the store.
    fn mark_clean_stop(&self) -> Result<(), StoreError>;

    /// Records that a run of this boot holds the store (after the log has
    /// acted on [`LogStore::recover`]'s answer): a crash from now on is
    /// found to be of this boot.
    fn mark_running(&self) -> Result<(), StoreError> {
        Ok(())
    }

    /// The stored window of one producer, if it has one.
    fn load_producer(&self, key: &ProducerKey) -> Result<Option<ProducerWindow>, StoreError>;

    /// Every stored window of `owner`, by producer id, idle or not (the
    /// caller judges liveness at its own time).
    fn owner_producers(&self, owner: &str) -> Result<Vec<(u64, ProducerWindow)>, StoreError>;

    /// The partition clocks the store's own clean-up of idle windows (a
    /// compaction filter) judges partition-scoped windows by; `None` when
    /// the store cleans up nothing by itself.
    fn partition_clocks(&self) -> Option<std::sync::Arc<PartitionClocks>> {
        None
    }

    /// Applies `set` atomically; with `sync` the write-ahead log is fsynced
    /// before returning.
    fn write(&self, set: &WriteSet, sync: bool) -> Result<(), StoreError>;

    /// A replicated partition's applied state as last written
    /// ([`WriteSet::applied`]).
    fn load_applied(&self, partition: u32) -> Result<Option<Vec<u8>>, StoreError>;

    /// Up to `max_messages` consecutive messages of `channel` from the first
    /// stored offset `>= from` and below `until`, stopping once `max_bytes`
    /// of payload have been read (at least one message is returned when any
    /// exists).
    fn read(
        &self,
        channel: ChannelId,
        from: Offset,
        until: Offset,
        max_messages: usize,
        max_bytes: usize,
    ) -> Result<Vec<StoredMessage>, StoreError>;

    /// Reads the channels and producer windows `scope` selects as they
    /// stand at one point in time, into `sink` (see [`Exported`] for the
    /// order). `fixed` is called once that point is fixed, before the first
    /// item: writes after it are not seen, so the caller may let writes go
    /// on from then while the export reads (a partition's snapshot).
    fn export(
        &self,
        scope: &ExportScope<'_>,
        fixed: &mut dyn FnMut(),
        sink: &mut dyn FnMut(Exported) -> Result<(), StoreError>,
    ) -> Result<(), StoreError>;

    /// Tries to leave the poisoned state after a failed write; `Ok` means
    /// writes are accepted again.
    fn check_health(&self) -> Result<(), StoreError>;

    /// Makes everything written so far durable (fsync of the WAL); used at
    /// shutdown.
    fn flush(&self) -> Result<(), StoreError>;

    /// Size and compaction figures for metrics, by name.
    fn stats(&self) -> Vec<(&'static str, u64)> {
        Vec::new()
    }
}

#[cfg(test)]
pub(crate) mod contract {
    //! The `LogStore` contract as tests, run against every implementation.

    use super::*;

    fn msg(offset: u64, payload: &'static [u8]) -> StoredMessage {
        StoredMessage {
            offset: Offset::new(offset),
            timestamp_ms: 1_700_000_000_000 + offset,
            producer: None,
            payload: Bytes::from_static(payload),
        }
    }

    fn channel(name: &str) -> ChannelName {
        ChannelName::new(name).expect("valid name")
    }

    pub(crate) fn appends_read_back_and_recover(store: &dyn LogStore) {
        let mut meta = ChannelMeta::new(7, Epoch(42));
        let mut set = WriteSet::default();
        for o in 1..=5 {
            set.messages.push((7, msg(o, b"hello")));
        }
        meta.next_offset = Offset::new(6);
        meta.bytes = 25;
        set.channels.push((channel("chat.1"), meta));
        let key = ProducerKey::new("alice".into(), 1234);
        let mut window = ProducerWindow::default();
        for sequence in [3, 5, 9] {
            let entry = ProducerEntry {
                sequence,
                channel: 7,
                offset: Offset::new(sequence),
                epoch: Epoch(42),
            };
            window.insert(entry, 2, 1_700_000_000_000);
        }
        set.producers.push((key.clone(), window.clone()));
        store.write(&set, true).expect("write");

        let all = store
            .read(7, Offset::new(1), Offset::new(100), 100, usize::MAX)
            .expect("read");
        assert_eq!(all.len(), 5);
        assert_eq!(all[0], msg(1, b"hello"));
        assert_eq!(all[4].offset, Offset::new(5));

        // Bounds: until, max_messages, max_bytes (at least one message).
        let some = store
            .read(7, Offset::new(2), Offset::new(4), 100, usize::MAX)
            .expect("read");
        assert_eq!(
            some.iter().map(|m| m.offset.get()).collect::<Vec<_>>(),
            [2, 3]
        );
        assert_eq!(
            store
                .read(7, Offset::new(1), Offset::new(100), 2, usize::MAX)
                .expect("read")
                .len(),
            2
        );
        assert_eq!(
            store
                .read(7, Offset::new(1), Offset::new(100), 100, 1)
                .expect("read")
                .len(),
            1
        );
        // Other channels' keys never leak into a read.
        assert!(
            store
                .read(8, Offset::new(1), Offset::new(100), 100, usize::MAX)
                .expect("read")
                .is_empty()
        );

        assert_eq!(
            store.load_channel(&channel("chat.1")).expect("load"),
            Some(meta)
        );
        assert_eq!(store.load_channel(&channel("chat.2")).expect("load"), None);
        assert_eq!(store.load_producer(&key).expect("load"), Some(window));
        // Owners are apart: the same producer id of another user is unknown.
        let other = ProducerKey::new("mallory".into(), 1234);
        assert_eq!(store.load_producer(&other).expect("load"), None);
        let set = WriteSet {
            expired_producers: vec![key.clone()],
            ..WriteSet::default()
        };
        store.write(&set, false).expect("expire");
        assert_eq!(store.load_producer(&key).expect("load"), None);
    }

    pub(crate) fn deletions_skip_to_the_first_stored(store: &dyn LogStore) {
        let mut set = WriteSet::default();
        for o in 1..=10 {
            set.messages.push((3, msg(o, b"x")));
        }
        store.write(&set, false).expect("write");
        let set = WriteSet {
            deletions: vec![(3, Offset::new(1), Offset::new(7))],
            ..WriteSet::default()
        };
        store.write(&set, false).expect("delete");
        let rest = store
            .read(3, Offset::new(1), Offset::new(100), 100, usize::MAX)
            .expect("read");
        assert_eq!(
            rest.iter().map(|m| m.offset.get()).collect::<Vec<_>>(),
            [7, 8, 9, 10]
        );
    }

    pub(crate) fn channels_are_scanned_indexed_and_deleted(store: &dyn LogStore) {
        let fresh = store.recover().expect("recover");
        assert_eq!(fresh, Recovered::default());
        let mut set = WriteSet::default();
        for (i, name) in ["chat.b", "chat.a", "news.x", "chat.c"].iter().enumerate() {
            let id = i as u64 + 1;
            let mut meta = ChannelMeta::new(id, Epoch(id));
            meta.next_offset = Offset::new(2);
            meta.oldest_ms = 1000 * id;
            set.messages.push((id, msg(1, b"m")));
            set.channels.push((channel(name), meta));
            set.age_index.push(AgeIndexMove {
                channel: channel(name),
                id,
                from: None,
                to: Some(meta.oldest_ms),
            });
        }
        set.next_channel_id = Some(5);
        set.generation = Some(3);
        store.write(&set, true).expect("write");

        let names = |v: Vec<(ChannelName, ChannelMeta)>| {
            v.into_iter()
                .map(|(n, _)| n.to_string())
                .collect::<Vec<_>>()
        };
        assert_eq!(
            names(store.scan_channels("chat.", None, 10).expect("scan")),
            ["chat.a", "chat.b", "chat.c"]
        );
        assert_eq!(
            names(
                store
                    .scan_channels("chat.", Some(&channel("chat.a")), 1)
                    .expect("scan")
            ),
            ["chat.b"]
        );
        // Age index: per namespace, oldest first, only before the cut.
        let aged = store.aged_channels("chat", 4000, 10).expect("aged");
        assert_eq!(aged, [channel("chat.b"), channel("chat.a")]);
        assert_eq!(
            store.aged_channels("news", 4000, 10).expect("aged"),
            [channel("news.x")]
        );
        assert_eq!(store.aged_channels("chat", 4000, 1).expect("aged").len(), 1);
        // Moving an entry.
        let set = WriteSet {
            age_index: vec![AgeIndexMove {
                channel: channel("chat.b"),
                id: 1,
                from: Some(1000),
                to: Some(9000),
            }],
            ..WriteSet::default()
        };
        store.write(&set, false).expect("move");
        assert_eq!(
            store.aged_channels("chat", 4000, 10).expect("aged"),
            [channel("chat.a")]
        );

        // Deleting a channel takes its metadata, messages and index entry.
        let set = WriteSet {
            deleted_channels: vec![(channel("chat.a"), 2)],
            age_index: vec![AgeIndexMove {
                channel: channel("chat.a"),
                id: 2,
                from: Some(2000),
                to: None,
            }],
            ..WriteSet::default()
        };
        store.write(&set, false).expect("delete");
        assert_eq!(store.load_channel(&channel("chat.a")).expect("load"), None);
        assert!(
            store
                .read(2, Offset::FIRST, Offset::new(100), 10, usize::MAX)
                .expect("read")
                .is_empty()
        );
        assert!(
            store
                .aged_channels("chat", 4000, 10)
                .expect("aged")
                .is_empty()
        );
        assert_eq!(
            store
                .read(1, Offset::FIRST, Offset::new(100), 10, usize::MAX)
                .expect("read")
                .len(),
            1
        );

        // Counters survive; the clean-stop mark is taken down by recover.
        let recovered = store.recover().expect("recover");
        assert_eq!(recovered.next_channel_id, 5);
        assert_eq!(recovered.generation, 3);
        assert!(!recovered.clean_stop, "this run never marked a clean stop");
        store.mark_clean_stop().expect("mark");
        assert!(store.recover().expect("recover").clean_stop);
        assert!(!store.recover().expect("recover").clean_stop);
    }

    pub(crate) fn exports_one_point_in_time(store: &dyn LogStore) {
        let mut set = WriteSet::default();
        for (id, name) in [(1, "chat.a"), (2, "news.b"), (3, "chat.c")] {
            let mut meta = ChannelMeta::new(id, Epoch(id));
            meta.next_offset = Offset::new(3);
            set.channels.push((channel(name), meta));
            set.messages.push((id, msg(1, b"one")));
            set.messages.push((id, msg(2, b"two")));
        }
        for owner in ["alice#p1", "bob#p2"] {
            set.producers
                .push((ProducerKey::new(owner.into(), 5), ProducerWindow::default()));
        }
        set.devices.puts = vec![
            (b"d1".to_vec(), b"x".to_vec()),
            (b"d2".to_vec(), b"y".to_vec()),
            (b"e1".to_vec(), b"z".to_vec()),
        ];
        store.write(&set, true).expect("write");
        let mut items = Vec::new();
        store
            .export(
                &ExportScope {
                    channel: &|name: &ChannelName| name.as_str().starts_with("chat."),
                    producer: &|key: &ProducerKey| key.owner.ends_with("#p1"),
                    devices: Some((b"d", b"e")),
                },
                // Written once the point in time is fixed: not exported.
                &mut || {
                    let later = WriteSet {
                        messages: vec![(1, msg(3, b"three"))],
                        ..WriteSet::default()
                    };
                    store.write(&later, false).expect("write");
                },
                &mut |item| {
                    items.push(item);
                    Ok(())
                },
            )
            .expect("export");
        let shape: Vec<String> = items
            .iter()
            .map(|item| match item {
                Exported::Channel(name, _) => name.to_string(),
                Exported::Message(m) => m.offset.get().to_string(),
                Exported::Producer(key, _) => key.owner.to_string(),
                Exported::Device(key, _) => String::from_utf8_lossy(key).into_owned(),
            })
            .collect();
        assert_eq!(
            shape,
            [
                "chat.a", "1", "2", "chat.c", "1", "2", "alice#p1", "d1", "d2"
            ]
        );
        // The sink's error ends the export with it.
        let stopped = store.export(
            &ExportScope {
                channel: &|_: &ChannelName| true,
                producer: &|_: &ProducerKey| true,
                devices: None,
            },
            &mut || {},
            &mut |_| Err(StoreError::Engine("full".into())),
        );
        assert!(matches!(stopped, Err(StoreError::Engine(why)) if why == "full"));
    }
}
