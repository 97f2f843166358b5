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

pub use memory::MemoryStore;
pub use producers::{ProducerEntry, ProducerKey, ProducerWindow, SequenceStatus};
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

/// Everything recovered from the store at start (G7). Producer windows
/// are not part of it: they are loaded when their producer publishes.
#[derive(Debug, Default)]
pub struct Recovered {
    /// Every channel with its metadata.
    pub channels: Vec<(ChannelName, ChannelMeta)>,
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
}

impl WriteSet {
    /// Whether the set changes nothing.
    pub fn is_empty(&self) -> bool {
        self.messages.is_empty()
            && self.channels.is_empty()
            && self.producers.is_empty()
            && self.expired_producers.is_empty()
            && self.deletions.is_empty()
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

/// The durable log.
pub trait LogStore: Send + Sync + std::fmt::Debug + 'static {
    /// Reads back every channel's metadata.
    fn recover(&self) -> Result<Recovered, StoreError>;

    /// The stored window of one producer, if it has one.
    fn load_producer(&self, key: &ProducerKey) -> Result<Option<ProducerWindow>, StoreError>;

    /// Applies `set` atomically; with `sync` the write-ahead log is fsynced
    /// before returning.
    fn write(&self, set: &WriteSet, sync: bool) -> Result<(), StoreError>;

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

        let recovered = store.recover().expect("recover");
        assert_eq!(recovered.channels, vec![(channel("chat.1"), meta)]);
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
}
