//! A store seen through a test's fault: every call goes to the real store
//! except where the fault steps in (a write that fails, a flush that
//! waits), so a fault test states only what it changes.

use std::sync::Arc;

use volna_broker::store::{
    ChannelId, ChannelMeta, ExportScope, Exported, LogStore, PartitionClocks, ProducerKey,
    ProducerWindow, Recovered, StoreError, StoredMessage, WriteSet,
};
use volna_client::ChannelName;
use volna_proto::Offset;

/// Where a test's fault steps into the calls of a [`Faulty`] store.
pub trait StoreFault: Send + Sync + std::fmt::Debug + 'static {
    /// Called before each write; an error is the write's answer (the inner
    /// store is not written).
    fn before_write(&self, _set: &WriteSet) -> Result<(), StoreError> {
        Ok(())
    }

    /// Called before the final flush (it may block: flushes run on the
    /// log's own threads).
    fn before_flush(&self) {}
}

/// `inner` with `fault` stepping into its writes and flushes.
#[derive(Debug)]
pub struct Faulty<F> {
    pub inner: Arc<dyn LogStore>,
    pub fault: F,
}

impl<F: StoreFault> Faulty<F> {
    pub fn new(inner: Arc<dyn LogStore>, fault: F) -> Self {
        Self { inner, fault }
    }
}

impl<F: StoreFault> LogStore for Faulty<F> {
    fn recover(&self) -> Result<Recovered, StoreError> {
        self.inner.recover()
    }
    fn load_channel(&self, name: &ChannelName) -> Result<Option<ChannelMeta>, StoreError> {
        self.inner.load_channel(name)
    }
    fn scan_channels(
        &self,
        prefix: &str,
        after: Option<&ChannelName>,
        limit: usize,
    ) -> Result<Vec<(ChannelName, ChannelMeta)>, StoreError> {
        self.inner.scan_channels(prefix, after, limit)
    }
    fn aged_channels(
        &self,
        namespace: &str,
        before_ms: u64,
        limit: usize,
    ) -> Result<Vec<ChannelName>, StoreError> {
        self.inner.aged_channels(namespace, before_ms, limit)
    }
    fn mark_clean_stop(&self) -> Result<(), StoreError> {
        self.inner.mark_clean_stop()
    }
    fn mark_running(&self) -> Result<(), StoreError> {
        self.inner.mark_running()
    }
    fn load_producer(&self, key: &ProducerKey) -> Result<Option<ProducerWindow>, StoreError> {
        self.inner.load_producer(key)
    }
    fn owner_producers(&self, owner: &str) -> Result<Vec<(u64, ProducerWindow)>, StoreError> {
        self.inner.owner_producers(owner)
    }
    fn partition_clocks(&self) -> Option<Arc<PartitionClocks>> {
        self.inner.partition_clocks()
    }
    fn write(&self, set: &WriteSet, sync: bool) -> Result<(), StoreError> {
        self.fault.before_write(set)?;
        self.inner.write(set, sync)
    }
    fn load_applied(&self, partition: u32) -> Result<Option<Vec<u8>>, StoreError> {
        self.inner.load_applied(partition)
    }
    fn read(
        &self,
        channel: ChannelId,
        from: Offset,
        until: Offset,
        max_messages: usize,
        max_bytes: usize,
    ) -> Result<Vec<StoredMessage>, StoreError> {
        self.inner
            .read(channel, from, until, max_messages, max_bytes)
    }
    fn export(
        &self,
        scope: &ExportScope<'_>,
        fixed: &mut dyn FnMut(),
        sink: &mut dyn FnMut(Exported) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        self.inner.export(scope, fixed, sink)
    }
    fn check_health(&self) -> Result<(), StoreError> {
        self.inner.check_health()
    }
    fn flush(&self) -> Result<(), StoreError> {
        self.fault.before_flush();
        self.inner.flush()
    }
    fn stats(&self) -> Vec<(&'static str, u64)> {
        self.inner.stats()
    }
}
