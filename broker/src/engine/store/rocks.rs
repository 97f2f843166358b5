//! The RocksDB [`LogStore`]: the column families of DESIGN.md §4.
//!
//! - `messages`: `channel_id ‖ offset` → message record
//! - `channels`: channel name → channel metadata
//! - `producer_windows`: `owner ‖ producer_id` → the producer's whole dedup
//!   window, one value rewritten per batch; idle windows are removed by a
//!   point delete or by the compaction filter, never by range tombstones
//! - `age_index`: `namespace ‖ 0 ‖ oldest_ms ‖ channel_id` → channel name,
//!   for age retention (`AgeIndexMove`)
//! - default: the store's counters (`volna.next_channel_id`,
//!   `volna.generation`), the layout version and the `volna.running` mark
//!   that tells an unclean stop
//!
//! Nothing is read in full at open: channel metadata is read per channel
//! when used, so start-up time does not grow with the number of channels.
//!
//! One [`WriteSet`] is one RocksDB `WriteBatch`, so messages, the channel's
//! new `next_offset` and the producer window land together or not at all:
//! after a crash the recovered metadata always matches the stored messages.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use rocksdb::compaction_filter::Decision;
use rocksdb::{
    BlockBasedOptions, Cache, ColumnFamily, ColumnFamilyDescriptor, DB, Direction, IteratorMode,
    Options, ReadOptions, WriteBatch, WriteBufferManager, WriteOptions,
};
use volna_proto::{ChannelName, Offset};

use super::record::{
    decode_message, decode_meta, encode_message, encode_meta, message_key, parse_message_key,
};
use super::{
    ChannelId, ChannelMeta, DeviceStore, DeviceWrite, ExportScope, Exported, LogStore,
    PartitionClocks, ProducerKey, ProducerWindow, Recovered, StoreError, StoredMessage, WriteSet,
    age_index_key,
};

const CF_MESSAGES: &str = "messages";
const CF_CHANNELS: &str = "channels";
const CF_PRODUCERS: &str = "producer_windows";
/// The layout before producer windows were one value each (a key per
/// sequence, evicted with range tombstones); dropped at open.
const CF_PRODUCERS_V1: &str = "producers";
const CF_AGE_INDEX: &str = "age_index";
/// Device cursors, read markers and the device registry
/// ([`crate::devices`] owns the layout).
const CF_CURSORS: &str = "cursors";
const HEALTH_KEY: &[u8] = b"volna.health";
const NEXT_CHANNEL_ID_KEY: &[u8] = b"volna.next_channel_id";
const GENERATION_KEY: &[u8] = b"volna.generation";
/// Present while a broker runs on the store; a start that finds it knows
/// the previous run did not stop cleanly. Its value is the machine's boot
/// id then: a start in the same boot knows the OS kept every write.
const RUNNING_KEY: &[u8] = b"volna.running";
/// The layout version; 2 added the counters and the age index.
const LAYOUT_KEY: &[u8] = b"volna.layout";
const LAYOUT: u64 = 2;
/// Memory all memtables may use together.
const MEMTABLE_BUDGET: usize = 128 * 1024 * 1024;
/// Block cache for catch-up reads and channel metadata.
const BLOCK_CACHE: usize = 64 * 1024 * 1024;

/// Where a replicated partition's applied state lives (default column
/// family, next to the store's counters).
fn applied_key(partition: u32) -> Vec<u8> {
    let mut key = b"volna.applied.".to_vec();
    key.extend_from_slice(&partition.to_be_bytes());
    key
}

/// The production store.
pub struct RocksStore {
    db: Arc<DB>,
    poisoned: Mutex<Option<String>>,
    /// What the idle-window compaction filter judges partition-scoped
    /// windows by (the writer advances them).
    clocks: Arc<PartitionClocks>,
}

impl std::fmt::Debug for RocksStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RocksStore")
            .field("path", &self.db.path())
            .finish_non_exhaustive()
    }
}

impl RocksStore {
    /// Opens (or creates) the database under `dir`, with producer windows
    /// kept for the default 24 hours without a publish.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        Self::open_with(dir, Duration::from_secs(24 * 3600))
    }

    /// Opens (or creates) the database under `dir`; compaction drops
    /// producer windows idle for longer than `producer_idle`.
    pub fn open_with(dir: &Path, producer_idle: Duration) -> Result<Self, StoreError> {
        Self::open_with_families(dir, producer_idle, Vec::new())
    }

    /// As [`RocksStore::open_with`], with more column families for others
    /// sharing the database (a cluster node's Raft logs), reached through
    /// [`RocksStore::shared_db`].
    pub fn open_with_families(
        dir: &Path,
        producer_idle: Duration,
        extra: Vec<ColumnFamilyDescriptor>,
    ) -> Result<Self, StoreError> {
        let mut db_opts = Options::default();
        db_opts.create_if_missing(true);
        db_opts.create_missing_column_families(true);
        db_opts.set_max_background_jobs(2);
        // Volna's writes are small and many: let the WAL absorb them and
        // flush memtables in the background.
        db_opts.set_write_buffer_size(64 * 1024 * 1024);
        db_opts.set_max_total_wal_size(512 * 1024 * 1024);
        // One memory budget for every column family's memtables, so that
        // memory stays bounded whatever the number of column families and
        // however much a recovery replays (crash loops showed ~0.85 GiB
        // without it).
        let memtables = WriteBufferManager::new_write_buffer_manager(MEMTABLE_BUDGET, false);
        db_opts.set_write_buffer_manager(&memtables);

        let cache = Cache::new_lru_cache(BLOCK_CACHE);
        let mut messages = Options::default();
        messages.set_compression_type(rocksdb::DBCompressionType::Lz4);
        let mut table = BlockBasedOptions::default();
        table.set_block_size(16 * 1024);
        table.set_block_cache(&cache);
        messages.set_block_based_table_factory(&table);

        // Channel metadata is read one channel at a time, often for a name
        // that does not exist yet (a publish creating a channel): a bloom
        // filter answers those without reading a block.
        let mut channels = Options::default();
        let mut table = BlockBasedOptions::default();
        table.set_bloom_filter(10.0, false);
        table.set_block_cache(&cache);
        channels.set_block_based_table_factory(&table);
        // Keys are `channel ‖ offset`: a prefix extractor on the channel id
        // keeps range reads within one channel cheap.
        messages.set_prefix_extractor(rocksdb::SliceTransform::create_fixed_prefix(8));

        let mut producers = Options::default();
        let idle_ms = u64::try_from(producer_idle.as_millis()).unwrap_or(u64::MAX);
        let clocks = Arc::new(PartitionClocks::default());
        let filter_clocks = clocks.clone();
        // A partition's window is idle by the partition's time, never by
        // this node's clock alone (replicas must keep the same windows).
        producers.set_compaction_filter(
            "volna-idle-producers",
            move |_, key: &[u8], value: &[u8]| {
                let now = ProducerKey::decode(key)
                    .ok()
                    .and_then(|key| filter_clocks.now_for(&key));
                match (now, ProducerWindow::decode(value)) {
                    (Some(now), Ok(w)) if w.is_expired(now, idle_ms) => Decision::Remove,
                    _ => Decision::Keep,
                }
            },
        );

        // Cursors are read one key at a time, mostly for devices that have
        // none on the channel yet: the bloom filter answers those; the
        // shared cache keeps the active ones without holding all of them.
        let mut cursors = Options::default();
        let mut table = BlockBasedOptions::default();
        table.set_bloom_filter(10.0, false);
        table.set_block_cache(&cache);
        cursors.set_block_based_table_factory(&table);
        cursors.set_compression_type(rocksdb::DBCompressionType::Lz4);

        let mut cfs = vec![
            ColumnFamilyDescriptor::new(CF_CURSORS, cursors),
            ColumnFamilyDescriptor::new(CF_MESSAGES, messages),
            ColumnFamilyDescriptor::new(CF_CHANNELS, channels),
            ColumnFamilyDescriptor::new(CF_PRODUCERS, producers),
            ColumnFamilyDescriptor::new(CF_AGE_INDEX, Options::default()),
        ];
        cfs.extend(extra);
        let old_layout = DB::list_cf(&db_opts, dir)
            .is_ok_and(|names| names.iter().any(|n| n == CF_PRODUCERS_V1));
        if old_layout {
            cfs.push(ColumnFamilyDescriptor::new(
                CF_PRODUCERS_V1,
                Options::default(),
            ));
        }
        let mut db = DB::open_cf_descriptors(&db_opts, dir, cfs).map_err(engine)?;
        if old_layout {
            // Dedup windows are not data: producers of the old layout start
            // afresh (their retries within the horizon would be stored again).
            tracing::warn!("dropping producer windows of the previous storage layout");
            db.drop_cf(CF_PRODUCERS_V1).map_err(engine)?;
        }
        let store = Self {
            db: Arc::new(db),
            poisoned: Mutex::new(None),
            clocks,
        };
        store.upgrade_layout()?;
        Ok(store)
    }

    /// The database, for those sharing it (see
    /// [`RocksStore::open_with_families`]).
    pub fn shared_db(&self) -> Arc<DB> {
        self.db.clone()
    }

    /// Brings a store of layout 1 (no counters, no age index) to layout 2,
    /// once: the only time every channel's metadata is read.
    fn upgrade_layout(&self) -> Result<(), StoreError> {
        if self.counter(LAYOUT_KEY)?.is_some() {
            return Ok(());
        }
        let channels = self.cf(CF_CHANNELS)?;
        let index = self.cf(CF_AGE_INDEX)?;
        let mut batch = WriteBatch::default();
        let mut next_id = 1;
        let mut upgraded = 0u64;
        for item in self.db.iterator_cf(channels, IteratorMode::Start) {
            let (key, value) = item.map_err(engine)?;
            let name = ChannelName::from_bytes(&key)
                .map_err(|e| StoreError::Engine(format!("stored channel name is invalid: {e}")))?;
            let meta = decode_meta(&value)?;
            next_id = next_id.max(meta.id + 1);
            if !meta.is_empty() {
                let key = age_index_key(name.namespace(), meta.oldest_ms, meta.id);
                batch.put_cf(index, key, name.as_str().as_bytes());
            }
            upgraded += 1;
        }
        batch.put(NEXT_CHANNEL_ID_KEY, next_id.to_be_bytes());
        batch.put(LAYOUT_KEY, LAYOUT.to_be_bytes());
        let mut opts = WriteOptions::default();
        opts.set_sync(true);
        self.db.write_opt(batch, &opts).map_err(engine)?;
        if upgraded > 0 {
            tracing::info!(channels = upgraded, "upgraded the store to layout {LAYOUT}");
        }
        Ok(())
    }

    fn counter(&self, key: &[u8]) -> Result<Option<u64>, StoreError> {
        let Some(value) = self.db.get_pinned(key).map_err(engine)? else {
            return Ok(None);
        };
        let bytes: [u8; 8] = value.as_ref().try_into().map_err(|_| {
            StoreError::Engine(format!("{} is not 8 bytes", String::from_utf8_lossy(key)))
        })?;
        Ok(Some(u64::from_be_bytes(bytes)))
    }

    fn write_synced(&self, batch: WriteBatch) -> Result<(), StoreError> {
        let mut opts = WriteOptions::default();
        opts.set_sync(true);
        self.db.write_opt(batch, &opts).map_err(engine)
    }

    fn cf(&self, name: &str) -> Result<&ColumnFamily, StoreError> {
        self.db
            .cf_handle(name)
            .ok_or_else(|| StoreError::Engine(format!("column family {name} is missing")))
    }

    fn poisoned(&self) -> std::sync::MutexGuard<'_, Option<String>> {
        self.poisoned.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn engine(e: rocksdb::Error) -> StoreError {
    StoreError::Engine(e.into_string())
}

impl RocksStore {
    /// Marks the store as left by a run cut short by a power loss (a run
    /// mark naming no boot), so that the next start takes the tail of its
    /// log as possibly lost. For a disk image taken from a running broker
    /// (a backup, a cloned volume): it holds what a power loss would
    /// have left.
    pub fn mark_cut_by_power_loss(&self) -> Result<(), StoreError> {
        let mut batch = WriteBatch::default();
        batch.put(RUNNING_KEY, b"unknown boot");
        self.write_synced(batch)
    }
}

/// This boot of the machine (Linux: a random id per boot), if known.
fn boot_id() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .ok()
        .map(|id| id.trim().to_owned())
        .filter(|id| !id.is_empty())
}

impl LogStore for RocksStore {
    fn recover(&self) -> Result<Recovered, StoreError> {
        let running = self.db.get(RUNNING_KEY).map_err(engine)?;
        let boot = boot_id();
        // Unclean, and either another boot since or no way to tell: the
        // OS may have dropped what was not synced.
        let lost_power = running
            .as_deref()
            .is_some_and(|was| boot.as_deref().is_none_or(|now| was != now.as_bytes()));
        // The mark of this boot is written by `mark_running`, once the log
        // has acted on what this one says (a new generation after a power
        // loss): a crash in between must find the old mark again.
        if running.is_none() {
            self.mark_running()?;
        }
        Ok(Recovered {
            next_channel_id: self.counter(NEXT_CHANNEL_ID_KEY)?.unwrap_or(1),
            generation: self.counter(GENERATION_KEY)?.unwrap_or(0),
            clean_stop: running.is_none(),
            lost_power,
        })
    }

    fn load_channel(&self, name: &ChannelName) -> Result<Option<ChannelMeta>, StoreError> {
        let value = self
            .db
            .get_pinned_cf(self.cf(CF_CHANNELS)?, name.as_str().as_bytes())
            .map_err(engine)?;
        Ok(value.map(|v| decode_meta(&v)).transpose()?)
    }

    fn scan_channels(
        &self,
        prefix: &str,
        after: Option<&ChannelName>,
        limit: usize,
    ) -> Result<Vec<(ChannelName, ChannelMeta)>, StoreError> {
        let start = after.map_or(prefix.as_bytes(), |a| a.as_str().as_bytes());
        let iter = self.db.iterator_cf(
            self.cf(CF_CHANNELS)?,
            IteratorMode::From(start, Direction::Forward),
        );
        let mut out = Vec::new();
        for item in iter {
            if out.len() >= limit {
                break;
            }
            let (key, value) = item.map_err(engine)?;
            if !key.starts_with(prefix.as_bytes()) {
                break;
            }
            if after.is_some_and(|a| a.as_str().as_bytes() == &*key) {
                continue;
            }
            let name = ChannelName::from_bytes(&key)
                .map_err(|e| StoreError::Engine(format!("stored channel name is invalid: {e}")))?;
            out.push((name, decode_meta(&value)?));
        }
        Ok(out)
    }

    fn aged_channels(
        &self,
        namespace: &str,
        before_ms: u64,
        limit: usize,
    ) -> Result<Vec<ChannelName>, StoreError> {
        let mut opts = ReadOptions::default();
        opts.set_iterate_upper_bound(age_index_key(namespace, before_ms, 0));
        let start = age_index_key(namespace, 0, 0);
        let iter = self.db.iterator_cf_opt(
            self.cf(CF_AGE_INDEX)?,
            opts,
            IteratorMode::From(&start, Direction::Forward),
        );
        let mut out = Vec::new();
        for item in iter.take(limit) {
            let (_, value) = item.map_err(engine)?;
            out.push(ChannelName::from_bytes(&value).map_err(|e| {
                StoreError::Engine(format!("age index holds an invalid name: {e}"))
            })?);
        }
        Ok(out)
    }

    fn mark_running(&self) -> Result<(), StoreError> {
        let mut batch = WriteBatch::default();
        batch.put(RUNNING_KEY, boot_id().as_deref().unwrap_or("unknown"));
        self.write_synced(batch)
    }

    fn mark_clean_stop(&self) -> Result<(), StoreError> {
        let mut batch = WriteBatch::default();
        batch.delete(RUNNING_KEY);
        self.write_synced(batch)
    }

    fn load_producer(&self, key: &ProducerKey) -> Result<Option<ProducerWindow>, StoreError> {
        let value = self
            .db
            .get_pinned_cf(self.cf(CF_PRODUCERS)?, key.encode())
            .map_err(engine)?;
        Ok(value.map(|v| ProducerWindow::decode(&v)).transpose()?)
    }

    fn owner_producers(&self, owner: &str) -> Result<Vec<(u64, ProducerWindow)>, StoreError> {
        // Keys are `owner length ‖ owner ‖ id`: an owner's windows are one
        // contiguous range.
        let prefix = {
            let mut key = ProducerKey::new(Arc::from(owner), 0).encode();
            key.truncate(key.len() - 8);
            key
        };
        let mut out = Vec::new();
        let iter = self.db.iterator_cf(
            self.cf(CF_PRODUCERS)?,
            IteratorMode::From(&prefix, Direction::Forward),
        );
        for item in iter {
            let (key, value) = item.map_err(engine)?;
            if !key.starts_with(&prefix) {
                break;
            }
            let key = ProducerKey::decode(&key)?;
            out.push((key.producer_id, ProducerWindow::decode(&value)?));
        }
        Ok(out)
    }

    fn partition_clocks(&self) -> Option<Arc<PartitionClocks>> {
        Some(self.clocks.clone())
    }

    fn write(&self, set: &WriteSet, sync: bool) -> Result<(), StoreError> {
        if let Some(why) = self.poisoned().as_ref() {
            return Err(StoreError::Poisoned(why.clone()));
        }
        let messages = self.cf(CF_MESSAGES)?;
        let channels = self.cf(CF_CHANNELS)?;
        let producers = self.cf(CF_PRODUCERS)?;
        let mut batch = WriteBatch::default();
        for (channel, from, to) in &set.deletions {
            batch.delete_range_cf(
                messages,
                message_key(*channel, *from),
                message_key(*channel, *to),
            );
        }
        let mut value = BytesMut::new();
        for (channel, message) in &set.messages {
            value.clear();
            encode_message(message, &mut value);
            batch.put_cf(messages, message_key(*channel, message.offset), &value);
        }
        for (name, meta) in &set.channels {
            batch.put_cf(channels, name.as_str().as_bytes(), encode_meta(meta));
        }
        for (key, window) in &set.producers {
            batch.put_cf(producers, key.encode(), window.encode());
        }
        for key in &set.expired_producers {
            batch.delete_cf(producers, key.encode());
        }
        let index = self.cf(CF_AGE_INDEX)?;
        for (name, id) in &set.deleted_channels {
            batch.delete_cf(channels, name.as_str().as_bytes());
            // One range tombstone per deleted channel: rare, unlike the
            // per-publish ones that once blew up flushes.
            batch.delete_range_cf(
                messages,
                message_key(*id, Offset::new(0)),
                message_key(*id + 1, Offset::new(0)),
            );
        }
        for moved in &set.age_index {
            let namespace = moved.channel.namespace();
            if let Some(from) = moved.from {
                batch.delete_cf(index, age_index_key(namespace, from, moved.id));
            }
            if let Some(to) = moved.to {
                batch.put_cf(
                    index,
                    age_index_key(namespace, to, moved.id),
                    moved.channel.as_str().as_bytes(),
                );
            }
        }
        if let Some(next) = set.next_channel_id {
            batch.put(NEXT_CHANNEL_ID_KEY, next.to_be_bytes());
        }
        if let Some(generation) = set.generation {
            batch.put(GENERATION_KEY, generation.to_be_bytes());
        }
        for (partition, applied) in &set.applied {
            batch.put(applied_key(*partition), applied);
        }
        if !set.devices.puts.is_empty() || !set.devices.removed_ranges.is_empty() {
            let cursors = self.cf(CF_CURSORS)?;
            for (from, until) in &set.devices.removed_ranges {
                batch.delete_range_cf(cursors, from, until);
            }
            for (key, value) in &set.devices.puts {
                batch.put_cf(cursors, key, value);
            }
        }
        let mut opts = WriteOptions::default();
        opts.set_sync(sync);
        self.db.write_opt(batch, &opts).map_err(|e| {
            let why = e.into_string();
            *self.poisoned() = Some(why.clone());
            StoreError::Engine(why)
        })
    }

    fn load_applied(&self, partition: u32) -> Result<Option<Vec<u8>>, StoreError> {
        self.db.get(applied_key(partition)).map_err(engine)
    }

    fn read(
        &self,
        channel: ChannelId,
        from: Offset,
        until: Offset,
        max_messages: usize,
        max_bytes: usize,
    ) -> Result<Vec<StoredMessage>, StoreError> {
        let mut out = Vec::new();
        if from >= until {
            return Ok(out);
        }
        let mut opts = ReadOptions::default();
        opts.set_iterate_upper_bound(message_key(channel, until).to_vec());
        opts.set_prefix_same_as_start(true);
        let start = message_key(channel, from);
        let iter = self.db.iterator_cf_opt(
            self.cf(CF_MESSAGES)?,
            opts,
            IteratorMode::From(&start, Direction::Forward),
        );
        let mut bytes = 0usize;
        for item in iter {
            if out.len() >= max_messages || (!out.is_empty() && bytes >= max_bytes) {
                break;
            }
            let (key, value) = item.map_err(engine)?;
            let Some((key_channel, offset)) = parse_message_key(&key) else {
                return Err(StoreError::Engine("message key is not 16 bytes".into()));
            };
            if key_channel != channel {
                break;
            }
            let message = decode_message(offset, Bytes::from(value.into_vec()))?;
            bytes += message.payload.len();
            out.push(message);
        }
        Ok(out)
    }

    fn export(
        &self,
        scope: &ExportScope<'_>,
        fixed: &mut dyn FnMut(),
        sink: &mut dyn FnMut(Exported) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        let snapshot = self.db.snapshot();
        let at_snapshot = || {
            let mut opts = ReadOptions::default();
            opts.set_snapshot(&snapshot);
            opts
        };
        // The producer windows' compaction filter judges by the partitions'
        // clocks as they are when it runs, and RocksDB runs filters over
        // keys a snapshot still sees: an iterator made now pins the files
        // and memtables of this point, so a window expired later by a
        // compaction is still read (an export can take minutes).
        let producers =
            self.db
                .iterator_cf_opt(self.cf(CF_PRODUCERS)?, at_snapshot(), IteratorMode::Start);
        let devices = match scope.devices {
            Some((from, until)) => {
                let mut opts = at_snapshot();
                opts.set_iterate_upper_bound(until.to_vec());
                Some(self.db.iterator_cf_opt(
                    self.cf(CF_CURSORS)?,
                    opts,
                    IteratorMode::From(from, Direction::Forward),
                ))
            }
            None => None,
        };
        fixed();
        let channels =
            self.db
                .iterator_cf_opt(self.cf(CF_CHANNELS)?, at_snapshot(), IteratorMode::Start);
        for item in channels {
            let (key, value) = item.map_err(engine)?;
            let name = ChannelName::from_bytes(&key)
                .map_err(|e| StoreError::Engine(format!("stored channel name is invalid: {e}")))?;
            if !(scope.channel)(&name) {
                continue;
            }
            let meta = decode_meta(&value)?;
            sink(Exported::Channel(name, meta))?;
            let mut opts = at_snapshot();
            opts.set_prefix_same_as_start(true);
            let start = message_key(meta.id, Offset::FIRST);
            let messages = self.db.iterator_cf_opt(
                self.cf(CF_MESSAGES)?,
                opts,
                IteratorMode::From(&start, Direction::Forward),
            );
            for item in messages {
                let (key, value) = item.map_err(engine)?;
                match parse_message_key(&key) {
                    Some((id, offset)) if id == meta.id => sink(Exported::Message(
                        decode_message(offset, Bytes::from(value.into_vec()))?,
                    ))?,
                    Some(_) => break,
                    None => return Err(StoreError::Engine("message key is not 16 bytes".into())),
                }
            }
        }
        for item in producers {
            let (key, value) = item.map_err(engine)?;
            let key = ProducerKey::decode(&key)?;
            if (scope.producer)(&key) {
                let window = ProducerWindow::decode(&value)?;
                sink(Exported::Producer(key, window))?;
            }
        }
        if let Some(entries) = devices {
            for item in entries {
                let (key, value) = item.map_err(engine)?;
                sink(Exported::Device(key.to_vec(), value.to_vec()))?;
            }
        }
        Ok(())
    }

    fn check_health(&self) -> Result<(), StoreError> {
        let mut opts = WriteOptions::default();
        opts.set_sync(true);
        let mut batch = WriteBatch::default();
        batch.put(HEALTH_KEY, b"ok");
        self.db.write_opt(batch, &opts).map_err(engine)?;
        *self.poisoned() = None;
        Ok(())
    }

    fn flush(&self) -> Result<(), StoreError> {
        self.db.flush_wal(true).map_err(engine)
    }

    fn stats(&self) -> Vec<(&'static str, u64)> {
        const PROPERTIES: [(&str, &str); 6] = [
            ("total_sst_bytes", "rocksdb.total-sst-files-size"),
            ("live_data_bytes", "rocksdb.estimate-live-data-size"),
            ("memtable_bytes", "rocksdb.cur-size-all-mem-tables"),
            (
                "pending_compaction_bytes",
                "rocksdb.estimate-pending-compaction-bytes",
            ),
            ("running_compactions", "rocksdb.num-running-compactions"),
            ("compaction_pending", "rocksdb.compaction-pending"),
        ];
        let Ok(messages) = self.cf(CF_MESSAGES) else {
            return Vec::new();
        };
        PROPERTIES
            .iter()
            .filter_map(|(name, property)| {
                let value = self.db.property_int_value_cf(messages, *property).ok()??;
                Some((*name, value))
            })
            .collect()
    }
}

impl DeviceStore for RocksStore {
    fn get_device_entries(&self, keys: &[Vec<u8>]) -> Result<Vec<super::DeviceValue>, StoreError> {
        let cf = self.cf(CF_CURSORS)?;
        self.db
            .batched_multi_get_cf(cf, keys, false)
            .into_iter()
            .map(|value| value.map(|v| v.map(|v| v.to_vec())).map_err(engine))
            .collect()
    }

    fn scan_device_entries(
        &self,
        from: &[u8],
        until: &[u8],
        limit: usize,
    ) -> Result<Vec<super::DeviceEntry>, StoreError> {
        let mut opts = ReadOptions::default();
        opts.set_iterate_upper_bound(until.to_vec());
        let entries = self.db.iterator_cf_opt(
            self.cf(CF_CURSORS)?,
            opts,
            IteratorMode::From(from, Direction::Forward),
        );
        let mut found = Vec::new();
        for entry in entries.take(limit) {
            let (key, value) = entry.map_err(engine)?;
            found.push((key.to_vec(), value.to_vec()));
        }
        Ok(found)
    }

    fn write_device_entries(&self, write: &DeviceWrite, sync: bool) -> Result<(), StoreError> {
        let cf = self.cf(CF_CURSORS)?;
        let mut batch = WriteBatch::default();
        for (from, until) in &write.removed_ranges {
            batch.delete_range_cf(cf, from, until);
        }
        for (key, value) in &write.puts {
            batch.put_cf(cf, key, value);
        }
        let mut opts = WriteOptions::default();
        opts.set_sync(sync);
        self.db.write_opt(batch, &opts).map_err(engine)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::contract;

    #[test]
    fn keeps_the_store_contract() {
        let dir = tempfile::tempdir().expect("tempdir");
        contract::appends_read_back_and_recover(&RocksStore::open(dir.path()).expect("open"));
        let dir = tempfile::tempdir().expect("tempdir");
        contract::deletions_skip_to_the_first_stored(&RocksStore::open(dir.path()).expect("open"));
        let dir = tempfile::tempdir().expect("tempdir");
        contract::channels_are_scanned_indexed_and_deleted(
            &RocksStore::open(dir.path()).expect("open"),
        );
        let dir = tempfile::tempdir().expect("tempdir");
        contract::exports_one_point_in_time(&RocksStore::open(dir.path()).expect("open"));
    }

    #[test]
    fn data_survives_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let store = RocksStore::open(dir.path()).expect("open");
            contract::appends_read_back_and_recover(&store);
        }
        let store = RocksStore::open(dir.path()).expect("reopen");
        let chat = ChannelName::new("chat.1").expect("name");
        assert!(store.load_channel(&chat).expect("load").is_some());
        assert_eq!(
            store
                .read(7, Offset::FIRST, Offset::new(100), 100, usize::MAX)
                .expect("read")
                .len(),
            5
        );
    }
}
