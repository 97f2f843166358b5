//! An in-memory [`LogStore`] (and [`DeviceStore`]) for tests of the logic
//! above storage.
//!
//! It keeps the same contract as the RocksDB store, including refusing
//! writes after an injected failure until `check_health` is called. It
//! counts whether each write was asked to be synced (and, when told to,
//! records which messages each write held), so tests can check that a
//! durability promise reaches the store: a kill -9 cannot tell an fsync
//! from a write left in the page cache.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use volna_proto::{ChannelName, Offset};

use super::{
    ChannelId, ChannelMeta, DeviceStore, DeviceWrite, ExportScope, Exported, LogStore,
    PartitionClocks, ProducerKey, ProducerWindow, Recovered, StoreError, StoredMessage, WriteSet,
};

/// A store that forgets everything when dropped.
#[derive(Debug, Default)]
pub struct MemoryStore {
    state: Mutex<State>,
    /// Counts down to an injected write failure (0: none).
    failing_write: AtomicU32,
    failing_reads: AtomicU32,
    failing_lookups: AtomicU32,
    /// Writes taken with `sync` and without.
    synced_writes: AtomicU64,
    unsynced_writes: AtomicU64,
    /// Whether `recorded` grows: off by default, so a long test does not
    /// keep one entry per write.
    recording: AtomicBool,
    recorded: Mutex<Vec<RecordedWrite>>,
    /// Made by [`MemoryStore::crash_image`]: the next recovery is after a
    /// power loss (unsynced writes may be gone), not a process crash.
    power_lost: AtomicBool,
    /// Replicated partitions' times (the writer's, shared).
    clocks: Arc<PartitionClocks>,
}

/// One write the store took, as [`MemoryStore::record_writes`] keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordedWrite {
    /// Whether the writer asked for the write-ahead log to be synced.
    pub sync: bool,
    /// The messages it stored, by channel and offset.
    pub messages: Vec<(ChannelId, Offset)>,
}

#[derive(Debug, Clone)]
struct State {
    messages: BTreeMap<(ChannelId, Offset), StoredMessage>,
    channels: BTreeMap<ChannelName, ChannelMeta>,
    producers: HashMap<ProducerKey, ProducerWindow>,
    age_index: BTreeMap<Vec<u8>, ChannelName>,
    next_channel_id: ChannelId,
    generation: u64,
    running: bool,
    poisoned: Option<String>,
    applied: HashMap<u32, Vec<u8>>,
    /// Device state replicated partitions wrote ([`WriteSet::devices`]).
    devices: BTreeMap<Vec<u8>, Vec<u8>>,
}

impl Default for State {
    fn default() -> Self {
        Self {
            messages: BTreeMap::new(),
            channels: BTreeMap::new(),
            producers: HashMap::new(),
            age_index: BTreeMap::new(),
            next_channel_id: 1,
            generation: 0,
            running: false,
            poisoned: None,
            applied: HashMap::new(),
            devices: BTreeMap::new(),
        }
    }
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// Makes the next `write` fail as a full disk would.
    pub fn fail_next_write(&self) {
        self.fail_write_after(0);
    }

    /// Lets `successful` more writes through, then fails the next one as
    /// a full disk would.
    pub fn fail_write_after(&self, successful: u32) {
        self.failing_write
            .store(successful.saturating_add(1), Ordering::SeqCst);
    }

    /// Makes the next `count` reads fail as a damaged disk would.
    pub fn fail_next_reads(&self, count: u32) {
        self.failing_reads.store(count, Ordering::SeqCst);
    }

    /// Makes the next `count` channel lookups (`load_channel`) fail, as a
    /// partition that is failing over refuses for a while.
    pub fn fail_next_lookups(&self, count: u32) {
        self.failing_lookups.store(count, Ordering::SeqCst);
    }

    /// Injected lookup failures not yet used.
    pub fn lookup_failures_left(&self) -> u32 {
        self.failing_lookups.load(Ordering::SeqCst)
    }

    /// What a power loss now would leave on disk: a copy of everything
    /// written so far, still marked as running.
    pub fn crash_image(&self) -> Self {
        let mut state = self.state().clone();
        state.poisoned = None;
        Self {
            state: Mutex::new(state),
            power_lost: AtomicBool::new(true),
            ..Self::default()
        }
    }

    /// Injected read failures not yet used.
    pub fn read_failures_left(&self) -> u32 {
        self.failing_reads.load(Ordering::SeqCst)
    }

    /// Successful writes taken with `sync` so far.
    pub fn synced_writes(&self) -> u64 {
        self.synced_writes.load(Ordering::SeqCst)
    }

    /// Successful writes taken without `sync` so far.
    pub fn unsynced_writes(&self) -> u64 {
        self.unsynced_writes.load(Ordering::SeqCst)
    }

    /// From now on, keeps every successful write's sync flag and messages
    /// (see [`MemoryStore::recorded_writes`]).
    pub fn record_writes(&self) {
        self.recording.store(true, Ordering::SeqCst);
    }

    /// The writes kept since [`MemoryStore::record_writes`], in order.
    pub fn recorded_writes(&self) -> Vec<RecordedWrite> {
        self.recorded
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Counts (and, when recording, keeps) a write that was applied.
    fn note_write(&self, set: &WriteSet, sync: bool) {
        let counter = if sync {
            &self.synced_writes
        } else {
            &self.unsynced_writes
        };
        counter.fetch_add(1, Ordering::SeqCst);
        if self.recording.load(Ordering::SeqCst) {
            let messages = set
                .messages
                .iter()
                .map(|(channel, message)| (*channel, message.offset))
                .collect();
            self.recorded
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(RecordedWrite { sync, messages });
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave State half-updated:
        // every write builds its changes before touching it.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl LogStore for MemoryStore {
    fn recover(&self) -> Result<Recovered, StoreError> {
        let mut state = self.state();
        let clean_stop = !state.running;
        state.running = true;
        Ok(Recovered {
            next_channel_id: state.next_channel_id,
            generation: state.generation,
            clean_stop,
            lost_power: !clean_stop && self.power_lost.swap(false, Ordering::SeqCst),
        })
    }

    fn load_channel(&self, name: &ChannelName) -> Result<Option<ChannelMeta>, StoreError> {
        let failing = self
            .failing_lookups
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
        if failing.is_ok() {
            return Err(StoreError::Engine("injected failure: lookup error".into()));
        }
        Ok(self.state().channels.get(name).copied())
    }

    fn scan_channels(
        &self,
        prefix: &str,
        after: Option<&ChannelName>,
        limit: usize,
    ) -> Result<Vec<(ChannelName, ChannelMeta)>, StoreError> {
        Ok(self
            .state()
            .channels
            .iter()
            .filter(|(n, _)| n.as_str().starts_with(prefix))
            .filter(|(n, _)| after.is_none_or(|a| *n > a))
            .take(limit)
            .map(|(n, m)| (n.clone(), *m))
            .collect())
    }

    fn aged_channels(
        &self,
        namespace: &str,
        before_ms: u64,
        limit: usize,
    ) -> Result<Vec<ChannelName>, StoreError> {
        let from = super::age_index_key(namespace, 0, 0);
        let to = super::age_index_key(namespace, before_ms, 0);
        Ok(self
            .state()
            .age_index
            .range(from..to)
            .take(limit)
            .map(|(_, n)| n.clone())
            .collect())
    }

    fn mark_clean_stop(&self) -> Result<(), StoreError> {
        self.state().running = false;
        Ok(())
    }

    fn load_producer(&self, key: &ProducerKey) -> Result<Option<ProducerWindow>, StoreError> {
        Ok(self.state().producers.get(key).cloned())
    }

    fn partition_clocks(&self) -> Option<Arc<PartitionClocks>> {
        Some(self.clocks.clone())
    }

    fn owner_producers(&self, owner: &str) -> Result<Vec<(u64, ProducerWindow)>, StoreError> {
        let mut windows: Vec<(u64, ProducerWindow)> = self
            .state()
            .producers
            .iter()
            .filter(|(key, _)| &*key.owner == owner)
            .map(|(key, window)| (key.producer_id, window.clone()))
            .collect();
        windows.sort_by_key(|(id, _)| *id);
        Ok(windows)
    }

    fn write(&self, set: &WriteSet, sync: bool) -> Result<(), StoreError> {
        let mut state = self.state();
        if let Some(why) = &state.poisoned {
            return Err(StoreError::Poisoned(why.clone()));
        }
        let countdown = self
            .failing_write
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
        if countdown == Ok(1) {
            let why = "injected failure: no space left on device".to_owned();
            state.poisoned = Some(why.clone());
            return Err(StoreError::Engine(why));
        }
        for (channel, from, to) in &set.deletions {
            let keys: Vec<_> = state
                .messages
                .range((*channel, *from)..(*channel, *to))
                .map(|(k, _)| *k)
                .collect();
            for k in keys {
                state.messages.remove(&k);
            }
        }
        for (channel, message) in &set.messages {
            state
                .messages
                .insert((*channel, message.offset), message.clone());
        }
        for (name, meta) in &set.channels {
            state.channels.insert(name.clone(), *meta);
        }
        for (key, window) in &set.producers {
            state.producers.insert(key.clone(), window.clone());
        }
        for key in &set.expired_producers {
            state.producers.remove(key);
        }
        for (name, id) in &set.deleted_channels {
            state.channels.remove(name);
            let keys: Vec<_> = state
                .messages
                .range((*id, Offset::new(0))..(*id + 1, Offset::new(0)))
                .map(|(k, _)| *k)
                .collect();
            for k in keys {
                state.messages.remove(&k);
            }
        }
        for moved in &set.age_index {
            let namespace = moved.channel.namespace();
            if let Some(from) = moved.from {
                state
                    .age_index
                    .remove(&super::age_index_key(namespace, from, moved.id));
            }
            if let Some(to) = moved.to {
                state.age_index.insert(
                    super::age_index_key(namespace, to, moved.id),
                    moved.channel.clone(),
                );
            }
        }
        if let Some(next) = set.next_channel_id {
            state.next_channel_id = next;
        }
        if let Some(generation) = set.generation {
            state.generation = generation;
        }
        for (partition, applied) in &set.applied {
            state.applied.insert(*partition, applied.clone());
        }
        for (from, until) in &set.devices.removed_ranges {
            let keys: Vec<Vec<u8>> = state
                .devices
                .range(from.clone()..until.clone())
                .map(|(k, _)| k.clone())
                .collect();
            for k in keys {
                state.devices.remove(&k);
            }
        }
        for (key, value) in &set.devices.puts {
            state.devices.insert(key.clone(), value.clone());
        }
        // Noted while the state lock is held: whoever reads what this
        // write stored finds it noted already.
        self.note_write(set, sync);
        Ok(())
    }

    fn load_applied(&self, partition: u32) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.state().applied.get(&partition).cloned())
    }

    fn read(
        &self,
        channel: ChannelId,
        from: Offset,
        until: Offset,
        max_messages: usize,
        max_bytes: usize,
    ) -> Result<Vec<StoredMessage>, StoreError> {
        let failing = self
            .failing_reads
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
        if failing.is_ok() {
            return Err(StoreError::Engine("injected failure: read error".into()));
        }
        let state = self.state();
        let mut out = Vec::new();
        let mut bytes = 0usize;
        for (_, m) in state.messages.range((channel, from)..(channel, until)) {
            if out.len() >= max_messages || (!out.is_empty() && bytes >= max_bytes) {
                break;
            }
            bytes += m.payload.len();
            out.push(m.clone());
        }
        Ok(out)
    }

    fn export(
        &self,
        scope: &ExportScope<'_>,
        fixed: &mut dyn FnMut(),
        sink: &mut dyn FnMut(Exported) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        // A copy is this store's point-in-time view.
        let state = self.state().clone();
        fixed();
        for (name, meta) in state.channels.iter().filter(|(n, _)| (scope.channel)(n)) {
            sink(Exported::Channel(name.clone(), *meta))?;
            for (_, m) in state
                .messages
                .range((meta.id, Offset::FIRST)..=(meta.id, Offset::new(u64::MAX)))
            {
                sink(Exported::Message(m.clone()))?;
            }
        }
        let mut producers: Vec<_> = state
            .producers
            .iter()
            .filter(|(k, _)| (scope.producer)(k))
            .collect();
        producers.sort_by(|a, b| a.0.cmp(b.0));
        for (key, window) in producers {
            sink(Exported::Producer(key.clone(), window.clone()))?;
        }
        if let Some((from, until)) = scope.devices {
            for (key, value) in state.devices.range(from.to_vec()..until.to_vec()) {
                sink(Exported::Device(key.clone(), value.clone()))?;
            }
        }
        Ok(())
    }

    fn check_health(&self) -> Result<(), StoreError> {
        self.state().poisoned = None;
        Ok(())
    }

    fn flush(&self) -> Result<(), StoreError> {
        Ok(())
    }
}

/// Device state in memory: for brokers over a [`LogStore`] other than
/// RocksDB (tests that inject storage faults) and for unit tests.
#[derive(Debug, Default)]
pub struct MemoryDeviceStore {
    entries: Mutex<BTreeMap<Vec<u8>, Vec<u8>>>,
}

impl MemoryDeviceStore {
    fn entries(&self) -> std::sync::MutexGuard<'_, BTreeMap<Vec<u8>, Vec<u8>>> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl DeviceStore for MemoryDeviceStore {
    fn get_device_entries(&self, keys: &[Vec<u8>]) -> Result<Vec<super::DeviceValue>, StoreError> {
        let entries = self.entries();
        Ok(keys.iter().map(|k| entries.get(k).cloned()).collect())
    }

    fn scan_device_entries(
        &self,
        from: &[u8],
        until: &[u8],
        limit: usize,
    ) -> Result<Vec<super::DeviceEntry>, StoreError> {
        if from >= until {
            return Ok(Vec::new());
        }
        Ok(self
            .entries()
            .range(from.to_vec()..until.to_vec())
            .take(limit)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect())
    }

    fn write_device_entries(&self, write: &DeviceWrite, _sync: bool) -> Result<(), StoreError> {
        let mut entries = self.entries();
        for (from, until) in &write.removed_ranges {
            if from < until {
                let doomed: Vec<Vec<u8>> = entries
                    .range(from.clone()..until.clone())
                    .map(|(k, _)| k.clone())
                    .collect();
                for key in doomed {
                    entries.remove(&key);
                }
            }
        }
        for (key, value) in &write.puts {
            entries.insert(key.clone(), value.clone());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::contract;

    #[test]
    fn keeps_the_store_contract() {
        contract::appends_read_back_and_recover(&MemoryStore::new());
        contract::deletions_skip_to_the_first_stored(&MemoryStore::new());
        contract::channels_are_scanned_indexed_and_deleted(&MemoryStore::new());
        contract::exports_one_point_in_time(&MemoryStore::new());
    }

    #[test]
    fn refuses_writes_after_a_failure_until_healthy() {
        let store = MemoryStore::new();
        store.fail_next_write();
        assert!(matches!(
            store.write(&WriteSet::default(), false),
            Err(StoreError::Engine(_))
        ));
        assert!(matches!(
            store.write(&WriteSet::default(), false),
            Err(StoreError::Poisoned(_))
        ));
        store.check_health().expect("healthy");
        store.write(&WriteSet::default(), false).expect("accepted");
    }

    #[test]
    fn counts_and_records_the_sync_flag_of_each_write() {
        let store = MemoryStore::new();
        store.write(&WriteSet::default(), false).expect("accepted");
        store.record_writes();
        store.write(&WriteSet::default(), true).expect("accepted");
        store.fail_next_write();
        assert!(store.write(&WriteSet::default(), true).is_err());
        assert_eq!((store.synced_writes(), store.unsynced_writes()), (1, 1));
        assert_eq!(
            store.recorded_writes(),
            vec![RecordedWrite {
                sync: true,
                messages: Vec::new()
            }]
        );
    }
}
