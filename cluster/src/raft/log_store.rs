//! The Raft logs and votes of a node's partitions, in its RocksDB.
//!
//! Two column families, shared by every partition on the node and keyed by
//! partition first (big-endian, so a partition's keys are one range in
//! index order):
//! - `raft_log`: `partition ‖ index` → the entry (postcard);
//! - `raft_state`: `partition ‖ tag` → the vote, the committed log id, the
//!   last purged log id, and the last log id of a copy this node discarded
//!   ([`LogStore::discard`]).
//!
//! Writes run on tokio's blocking pool, never on a worker thread, and in
//! the order openraft issues them (it awaits each call).
//!
//! Votes and appended entries are always synced (the write-ahead log
//! fsynced) before the call returns or the append is reported flushed,
//! whatever the node's `durability` says for messages: they are Raft's own
//! promises. A vote lost to a power cut lets the node vote twice in one
//! term (two leaders), and an entry acknowledged and then lost breaks the
//! quorum that committed it. The other writes — the committed pointer, a
//! truncation, a purge — follow `durability`: losing one only sends the
//! node back to a state it was in before (openraft re-learns the commit
//! from the leader; a truncated or purged range comes back and is
//! truncated or purged again), and RocksDB's write-ahead log is one
//! sequence, so a later synced write makes every earlier one durable too.
//!
//! [`LogStore::observe_writes`] lets a test see each write and its sync
//! flag.

// The error type is openraft's (`StorageError`, returned by its storage
// traits); the helpers return it too rather than convert at every call.
#![allow(clippy::result_large_err)]

use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::sync::Arc;

use openraft::storage::{LogFlushed, RaftLogStorage};
use openraft::{
    Entry, LogId, LogState, OptionalSend, RaftLogReader, StorageError, StorageIOError, Vote,
};
use rocksdb::{ColumnFamilyDescriptor, DB, Direction, IteratorMode, Options, WriteBatch};
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::TypeConfig;
use crate::partition::PartitionId;
use crate::placement::NodeId;

/// The Raft log's column family.
pub const CF_RAFT_LOG: &str = "raft_log";
/// Votes and log pointers' column family.
pub const CF_RAFT_STATE: &str = "raft_state";

/// Stored bytes of entries replication sends a follower in one
/// AppendEntries (at least one entry, however large): at loopback or LAN
/// speed and with the follower's fsync it completes well within a 100 ms
/// heartbeat, and a follower far behind still catches up at hundreds of
/// MiB/s, one batch per round trip.
pub const REPLICATION_BATCH_BYTES: usize = 1 << 20;

const VOTE: &[u8] = b"vote";
const COMMITTED: &[u8] = b"committed";
const PURGED: &[u8] = b"purged";
const DISCARDED: &[u8] = b"discarded";

/// The column families a node's RocksDB needs for its partitions' Raft
/// logs, to open alongside its own.
pub fn column_families() -> Vec<ColumnFamilyDescriptor> {
    vec![
        ColumnFamilyDescriptor::new(CF_RAFT_LOG, Options::default()),
        ColumnFamilyDescriptor::new(CF_RAFT_STATE, Options::default()),
    ]
}

type Error = StorageError<NodeId>;

/// One write of a partition's Raft state, as [`LogStore::observe_writes`]
/// reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RaftWrite {
    /// What was written.
    pub kind: RaftWriteKind,
    /// Whether the write-ahead log was synced before the write returned.
    pub sync: bool,
}

/// What a [`RaftWrite`] held.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RaftWriteKind {
    /// The vote.
    Vote(Vote<NodeId>),
    /// Appended entries, by log id.
    Entries(Vec<LogId<NodeId>>),
    /// The committed pointer.
    Committed,
    /// A truncation of the log's end.
    Truncate,
    /// A purge of the log's start.
    Purge,
    /// The partition's whole Raft state removed ([`LogStore::discard`]).
    Discard,
}

/// Called with each successful write, before it is reported done.
pub type WriteObserver = Arc<dyn Fn(&RaftWrite) + Send + Sync>;

/// One partition's Raft log and vote. Cheap to clone: replication tasks
/// read through clones.
#[derive(Clone)]
pub struct LogStore {
    db: Arc<DB>,
    partition: PartitionId,
    /// Whether writes Raft's safety does not rest on are synced too.
    sync: bool,
    observer: Option<WriteObserver>,
}

impl Debug for LogStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogStore")
            .field("partition", &self.partition)
            .field("sync", &self.sync)
            .field("observed", &self.observer.is_some())
            .finish_non_exhaustive()
    }
}

impl LogStore {
    /// `partition`'s log in `db`, which must have been opened with
    /// [`column_families`]. Votes and appends are always fsynced; with
    /// `sync` (the node's `durability = "fsync"`), every other write is
    /// too.
    pub fn new(db: Arc<DB>, partition: PartitionId, sync: bool) -> Self {
        Self {
            db,
            partition,
            sync,
            observer: None,
        }
    }

    /// This store, calling `observer` with each successful write (and its
    /// sync flag) before the write is reported done: for tests.
    pub fn observe_writes(mut self, observer: WriteObserver) -> Self {
        self.observer = Some(observer);
        self
    }

    /// Whether this partition's Raft state is blank here: no vote, no
    /// entry, nothing purged (this node never took part in the group, or
    /// lost its disk since).
    pub async fn is_blank(&self) -> Result<bool, Error> {
        self.blocking(|store| {
            let vote: Option<Vote<NodeId>> = store.state(VOTE)?;
            let purged: Option<LogId<NodeId>> = store.state(PURGED)?;
            Ok(vote.is_none() && purged.is_none() && store.last_entry_id()?.is_none())
        })
        .await
    }

    /// Removes this partition's whole Raft state here — every entry, the
    /// vote and the log pointers — in one synced write: for a node the
    /// group has committed a membership without (its copy is no longer
    /// part of any quorum). Afterwards [`Self::is_blank`] holds, and a
    /// group started on it again joins as a new replica would, except that
    /// it remembers how far its log reached ([`Self::discarded_through`]):
    /// members that never learnt of the removal still count this node in
    /// their configuration, and a blank vote must not help a candidate
    /// whose log ends before it, nor a leader of an older term, to a
    /// quorum there.
    pub async fn discard(&self) -> Result<(), Error> {
        self.blocking(|store| {
            let log = store.cf(CF_RAFT_LOG)?;
            let state = store.cf(CF_RAFT_STATE)?;
            let purged: Option<LogId<NodeId>> = store.state(PURGED)?;
            let reached = store
                .last_entry_id()?
                .or(purged)
                .max(store.state(DISCARDED)?);
            let mut batch = WriteBatch::default();
            if let Some(reached) = &reached {
                store.put_state(&mut batch, DISCARDED, reached)?;
            }
            let mut end = [0u8; 12];
            end[..4].copy_from_slice(&store.partition.0.saturating_add(1).to_be_bytes());
            if store.partition.0 == u32::MAX {
                // No next partition to end the range at: the last index.
                end = store.log_key(u64::MAX);
                batch.delete_cf(log, end);
            }
            batch.delete_range_cf(log, store.log_key(0), end);
            for tag in [VOTE, COMMITTED, PURGED] {
                batch.delete_cf(state, store.state_key(tag));
            }
            let mut options = rocksdb::WriteOptions::default();
            options.set_sync(true);
            store
                .db
                .write_opt(batch, &options)
                .map_err(|e| StorageIOError::write(&e))?;
            if let Some(observer) = &store.observer {
                observer(&RaftWrite {
                    kind: RaftWriteKind::Discard,
                    sync: true,
                });
            }
            Ok(())
        })
        .await
    }

    /// The last log id this node held of the partition when it last
    /// discarded its copy ([`Self::discard`]), if it ever did.
    pub async fn discarded_through(&self) -> Result<Option<LogId<NodeId>>, Error> {
        self.blocking(|store| store.state(DISCARDED)).await
    }

    fn log_key(&self, index: u64) -> [u8; 12] {
        let mut key = [0u8; 12];
        key[..4].copy_from_slice(&self.partition.0.to_be_bytes());
        key[4..].copy_from_slice(&index.to_be_bytes());
        key
    }

    fn state_key(&self, tag: &[u8]) -> Vec<u8> {
        let mut key = self.partition.0.to_be_bytes().to_vec();
        key.extend_from_slice(tag);
        key
    }

    /// Runs `work` on the blocking pool: RocksDB calls may wait on disk.
    async fn blocking<T: Send + 'static>(
        &self,
        work: impl FnOnce(&LogStore) -> Result<T, Error> + Send + 'static,
    ) -> Result<T, Error> {
        let store = self.clone();
        tokio::task::spawn_blocking(move || work(&store))
            .await
            .map_err(|e| Error::from(StorageIOError::read(&e)))?
    }

    /// Writes `batch`; synced when `kind` is one of Raft's promises (a
    /// vote, entries) or the node's durability asks for it.
    fn write(&self, batch: WriteBatch, kind: RaftWriteKind) -> Result<(), rocksdb::Error> {
        let sync = self.sync || matches!(kind, RaftWriteKind::Vote(_) | RaftWriteKind::Entries(_));
        let mut options = rocksdb::WriteOptions::default();
        options.set_sync(sync);
        self.db.write_opt(batch, &options)?;
        if let Some(observer) = &self.observer {
            observer(&RaftWrite { kind, sync });
        }
        Ok(())
    }

    fn state<T: DeserializeOwned>(&self, tag: &[u8]) -> Result<Option<T>, Error> {
        let cf = self.cf(CF_RAFT_STATE)?;
        match self
            .db
            .get_pinned_cf(cf, self.state_key(tag))
            .map_err(|e| StorageIOError::read(&e))?
        {
            None => Ok(None),
            Some(bytes) => postcard::from_bytes(&bytes)
                .map(Some)
                .map_err(|e| StorageIOError::read(&e).into()),
        }
    }

    fn put_state<T: Serialize>(
        &self,
        batch: &mut WriteBatch,
        tag: &[u8],
        value: &T,
    ) -> Result<(), Error> {
        let cf = self.cf(CF_RAFT_STATE)?;
        let bytes = postcard::to_allocvec(value).map_err(|e| StorageIOError::write(&e))?;
        batch.put_cf(cf, self.state_key(tag), bytes);
        Ok(())
    }

    fn cf(&self, name: &'static str) -> Result<&rocksdb::ColumnFamily, Error> {
        self.db.cf_handle(name).ok_or_else(|| {
            StorageIOError::read(&std::io::Error::other(format!(
                "column family {name} is missing: open the database with raft::log_store::column_families()"
            )))
            .into()
        })
    }

    /// The last entry's log id, if the log holds any.
    fn last_entry_id(&self) -> Result<Option<LogId<NodeId>>, Error> {
        let cf = self.cf(CF_RAFT_LOG)?;
        let mut iter = self.db.iterator_cf(
            cf,
            IteratorMode::From(&self.log_key(u64::MAX), Direction::Reverse),
        );
        match iter.next() {
            Some(Ok((key, value))) if key.starts_with(&self.partition.0.to_be_bytes()) => {
                let entry: Entry<TypeConfig> =
                    postcard::from_bytes(&value).map_err(|e| StorageIOError::read_logs(&e))?;
                Ok(Some(entry.log_id))
            }
            Some(Err(e)) => Err(StorageIOError::read_logs(&e).into()),
            _ => Ok(None),
        }
    }

    /// Entries from `start` to `end` (exclusive, or the last), stopping
    /// after the first once their stored size reaches `max_bytes`.
    fn entries(
        &self,
        start: u64,
        end: Option<u64>,
        max_bytes: usize,
    ) -> Result<Vec<Entry<TypeConfig>>, Error> {
        let cf = self.cf(CF_RAFT_LOG)?;
        let mut out = Vec::new();
        let mut bytes = 0usize;
        let iter = self.db.iterator_cf(
            cf,
            IteratorMode::From(&self.log_key(start), Direction::Forward),
        );
        for item in iter {
            let (key, value) = item.map_err(|e| StorageIOError::read_logs(&e))?;
            if !key.starts_with(&self.partition.0.to_be_bytes()) {
                break;
            }
            let index = u64::from_be_bytes(key[4..12].try_into().unwrap_or([0xff; 8]));
            if end.is_some_and(|end| index >= end) {
                break;
            }
            if !out.is_empty() && bytes.saturating_add(value.len()) > max_bytes {
                break;
            }
            bytes = bytes.saturating_add(value.len());
            let entry: Entry<TypeConfig> = postcard::from_bytes(&value)
                .map_err(|e| StorageIOError::read_log_at_index(index, &e))?;
            out.push(entry);
        }
        Ok(out)
    }

    fn delete_range(
        &self,
        batch: &mut WriteBatch,
        from: u64,
        to: Option<u64>,
    ) -> Result<(), Error> {
        // Index u64::MAX is never used, so it bounds "to the end".
        let end = self.log_key(to.unwrap_or(u64::MAX));
        batch.delete_range_cf(self.cf(CF_RAFT_LOG)?, self.log_key(from), end);
        Ok(())
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<TypeConfig>>, Error> {
        let start = match range.start_bound() {
            Bound::Included(&s) => s,
            Bound::Excluded(&s) => s.saturating_add(1),
            Bound::Unbounded => 0,
        };
        let end = match range.end_bound() {
            Bound::Included(&e) => Some(e.saturating_add(1)),
            Bound::Excluded(&e) => Some(e),
            Bound::Unbounded => None,
        };
        self.blocking(move |store| store.entries(start, end, usize::MAX))
            .await
    }

    /// What replication sends a follower in one AppendEntries: bounded by
    /// bytes, not only by openraft's entry count. openraft gives each
    /// AppendEntries one heartbeat interval to complete; a catching-up
    /// follower sent `max_payload_entries` large entries at once (hundreds
    /// of MiB) timed out every time and never caught up.
    async fn limited_get_log_entries(
        &mut self,
        start: u64,
        end: u64,
    ) -> Result<Vec<Entry<TypeConfig>>, Error> {
        self.blocking(move |store| store.entries(start, Some(end), REPLICATION_BATCH_BYTES))
            .await
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, Error> {
        self.blocking(|store| {
            let last_purged_log_id: Option<LogId<NodeId>> = store.state(PURGED)?;
            let last_log_id = store.last_entry_id()?.or(last_purged_log_id);
            Ok(LogState {
                last_purged_log_id,
                last_log_id,
            })
        })
        .await
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), Error> {
        let vote = *vote;
        self.blocking(move |store| {
            let mut batch = WriteBatch::default();
            store.put_state(&mut batch, VOTE, &vote)?;
            store
                .write(batch, RaftWriteKind::Vote(vote))
                .map_err(|e| StorageIOError::write_vote(&e).into())
        })
        .await
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, Error> {
        self.blocking(|store| store.state(VOTE)).await
    }

    async fn save_committed(&mut self, committed: Option<LogId<NodeId>>) -> Result<(), Error> {
        self.blocking(move |store| {
            let mut batch = WriteBatch::default();
            store.put_state(&mut batch, COMMITTED, &committed)?;
            store
                .write(batch, RaftWriteKind::Committed)
                .map_err(|e| StorageIOError::write(&e).into())
        })
        .await
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<NodeId>>, Error> {
        self.blocking(|store| Ok(store.state::<Option<LogId<NodeId>>>(COMMITTED)?.flatten()))
            .await
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> Result<(), Error>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut batch = WriteBatch::default();
        let mut ids = Vec::new();
        let cf = self.cf(CF_RAFT_LOG)?;
        for entry in entries {
            let bytes = postcard::to_allocvec(&entry)
                .map_err(|e| StorageIOError::write_log_entry(entry.log_id, &e))?;
            batch.put_cf(cf, self.log_key(entry.log_id.index), bytes);
            ids.push(entry.log_id);
        }
        // Synced before the callback: openraft reports an entry flushed to
        // the leader (which counts it towards the quorum) from it.
        let written = self
            .blocking(move |store| {
                store
                    .write(batch, RaftWriteKind::Entries(ids))
                    .map_err(|e| StorageIOError::write_logs(&e).into())
            })
            .await;
        match written {
            Ok(()) => {
                callback.log_io_completed(Ok(()));
                Ok(())
            }
            Err(e) => {
                callback.log_io_completed(Err(std::io::Error::other(e.to_string())));
                Err(e)
            }
        }
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> Result<(), Error> {
        self.blocking(move |store| {
            let mut batch = WriteBatch::default();
            store.delete_range(&mut batch, log_id.index, None)?;
            store
                .write(batch, RaftWriteKind::Truncate)
                .map_err(|e| StorageIOError::write_logs(&e).into())
        })
        .await
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> Result<(), Error> {
        self.blocking(move |store| {
            // One batch: the pointer and the entries it covers go together.
            let mut batch = WriteBatch::default();
            store.put_state(&mut batch, PURGED, &log_id)?;
            store.delete_range(&mut batch, 0, Some(log_id.index.saturating_add(1)))?;
            store
                .write(batch, RaftWriteKind::Purge)
                .map_err(|e| StorageIOError::write_logs(&e).into())
        })
        .await
    }
}
