//! An in-memory [`LogStore`] for tests of the logic above storage.
//!
//! It keeps the same contract as the RocksDB store, including refusing
//! writes after an injected failure until `check_health` is called.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use volna_proto::{ChannelName, Offset};

use super::{
    ChannelId, ChannelMeta, LogStore, ProducerKey, ProducerWindow, Recovered, StoreError,
    StoredMessage, WriteSet,
};

/// A store that forgets everything when dropped.
#[derive(Debug, Default)]
pub struct MemoryStore {
    state: Mutex<State>,
    fail_next_write: AtomicBool,
    failing_reads: AtomicU32,
}

#[derive(Debug, Default)]
struct State {
    messages: BTreeMap<(ChannelId, Offset), StoredMessage>,
    channels: HashMap<ChannelName, ChannelMeta>,
    producers: HashMap<ProducerKey, ProducerWindow>,
    poisoned: Option<String>,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// Makes the next `write` fail as a full disk would.
    pub fn fail_next_write(&self) {
        self.fail_next_write.store(true, Ordering::SeqCst);
    }

    /// Makes the next `count` reads fail as a damaged disk would.
    pub fn fail_next_reads(&self, count: u32) {
        self.failing_reads.store(count, Ordering::SeqCst);
    }

    /// Injected read failures not yet used.
    pub fn read_failures_left(&self) -> u32 {
        self.failing_reads.load(Ordering::SeqCst)
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave State half-updated:
        // every write builds its changes before touching it.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl LogStore for MemoryStore {
    fn recover(&self) -> Result<Recovered, StoreError> {
        let state = self.state();
        let mut channels: Vec<_> = state
            .channels
            .iter()
            .map(|(n, m)| (n.clone(), *m))
            .collect();
        channels.sort_by_key(|(_, m)| m.id);
        Ok(Recovered { channels })
    }

    fn load_producer(&self, key: &ProducerKey) -> Result<Option<ProducerWindow>, StoreError> {
        Ok(self.state().producers.get(key).cloned())
    }

    fn write(&self, set: &WriteSet, _sync: bool) -> Result<(), StoreError> {
        let mut state = self.state();
        if let Some(why) = &state.poisoned {
            return Err(StoreError::Poisoned(why.clone()));
        }
        if self.fail_next_write.swap(false, Ordering::SeqCst) {
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
        Ok(())
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

    fn check_health(&self) -> Result<(), StoreError> {
        self.state().poisoned = None;
        Ok(())
    }

    fn flush(&self) -> Result<(), StoreError> {
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
}
