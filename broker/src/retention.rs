//! Per-namespace retention, enforced in the background.
//!
//! Every `retention_interval_ms` the task looks at each channel whose
//! namespace has limits, works out (reading the oldest messages on a reader
//! thread) how far the log must be cut to meet them, and asks the writer to
//! delete that range. Publishing never waits for it; a subscriber that needed
//! deleted offsets is told `Truncated` when it reads.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};
use volna_proto::{ChannelName, Offset};

use crate::config::{Config, Retention};
use crate::log::{Log, now_ms};
use crate::store::ChannelMeta;

/// Messages read per step while looking for the cut.
const SCAN_CHUNK: usize = 4096;
/// Messages examined per channel per round, so one huge channel cannot
/// hold the task; the next round goes on where this one stopped.
const SCAN_LIMIT: u64 = 256 * 1024;

/// Each namespace's retention, seeded from the configuration and changeable
/// at run time through the admin API (not written back to the file).
#[derive(Debug, Default)]
pub struct Policies(RwLock<BTreeMap<String, Retention>>);

impl Policies {
    /// The configured policies.
    pub fn from_config(config: &Config) -> Self {
        Self(RwLock::new(
            config
                .namespaces
                .iter()
                .map(|(ns, c)| (ns.clone(), c.retention.clone()))
                .collect(),
        ))
    }

    /// The retention of `namespace` (unbounded when none is set).
    pub fn get(&self, namespace: &str) -> Retention {
        self.read().get(namespace).cloned().unwrap_or_default()
    }

    /// Replaces the retention of `namespace`.
    pub fn set(&self, namespace: &str, retention: Retention) {
        self.0
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(namespace.to_owned(), retention);
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, Retention>> {
        self.0.read().unwrap_or_else(|e| e.into_inner())
    }

    fn bounded(&self) -> BTreeMap<String, Retention> {
        self.read()
            .iter()
            .filter(|(_, r)| r.is_bounded())
            .map(|(ns, r)| (ns.clone(), r.clone()))
            .collect()
    }
}

/// Runs retention rounds every `interval` until `cancel` fires.
pub async fn run(log: Log, policies: Arc<Policies>, interval: Duration, cancel: CancellationToken) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let bounded = policies.bounded();
        if bounded.is_empty() {
            continue;
        }
        let due: Vec<(ChannelName, ChannelMeta, Retention)> = log
            .directory()
            .iter()
            .filter_map(|entry| {
                let retention = bounded.get(entry.key().namespace())?;
                Some((entry.key().clone(), *entry.value(), retention.clone()))
            })
            .collect();
        for (channel, meta, retention) in due {
            match cut(&log, &meta, &retention, now_ms()).await {
                Ok(Some((below, freed))) => {
                    debug!(%channel, below = %below, freed, "retention");
                    if !log.trim(channel, below, freed) {
                        // The writer is saturated; the next round retries.
                        break;
                    }
                }
                Ok(None) => {}
                Err(e) => warn!(%channel, error = %e, "retention scan failed"),
            }
        }
    }
}

/// Where to cut `meta`'s log to meet `retention`: everything below the
/// returned offset goes, freeing the returned payload bytes.
pub async fn cut(
    log: &Log,
    meta: &ChannelMeta,
    retention: &Retention,
    now_ms: u64,
) -> Result<Option<(Offset, u64)>, crate::store::StoreError> {
    let by_count = retention
        .max_messages
        .map(|max| Offset::new(meta.next_offset.get().saturating_sub(max)));
    let age_cutoff = retention
        .max_age_secs
        .map(|age| now_ms.saturating_sub(age.saturating_mul(1000)));
    let over_bytes = |freed: u64| {
        retention
            .max_bytes
            .is_some_and(|max| meta.bytes - freed.min(meta.bytes) > max)
    };
    let aged = |ts: u64| age_cutoff.is_some_and(|cut| ts < cut);

    let mut below = meta.first_offset;
    let mut freed = 0u64;
    'scan: while below < meta.next_offset && meta.first_offset.distance_to(below) < SCAN_LIMIT {
        let must_go_at_least = by_count.is_some_and(|c| below < c);
        if !must_go_at_least && !over_bytes(freed) && age_cutoff.is_none() {
            break;
        }
        let chunk = log
            .read(meta.id, below, meta.next_offset, SCAN_CHUNK, usize::MAX)
            .await?;
        if chunk.is_empty() {
            break;
        }
        for message in &chunk {
            let goes = by_count.is_some_and(|c| message.offset < c)
                || over_bytes(freed)
                || aged(message.timestamp_ms);
            if !goes {
                break 'scan;
            }
            below = message.offset.next();
            freed += message.payload.len() as u64;
        }
    }
    Ok((below > meta.first_offset).then_some((below, freed)))
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::config::{Durability, EngineConfig};
    use crate::log::{self, AppendInput, CommitListener};
    use crate::store::{MemoryStore, StoredMessage};

    struct Nobody;
    impl CommitListener for Nobody {
        fn committed(&self, _: &ChannelName, _: &ChannelMeta, _: &[StoredMessage]) {}
    }

    #[tokio::test]
    async fn cuts_by_count_bytes_and_age() {
        let threads = log::start(
            Arc::new(MemoryStore::new()),
            Arc::new(Nobody),
            Durability::Wal,
            &EngineConfig::default(),
            Arc::new(crate::metrics::Metrics::new()),
        )
        .expect("log");
        let log = threads.log().clone();
        let chat = ChannelName::new("chat.1").expect("name");
        for _ in 0..150 {
            log.append(AppendInput {
                channel: chat.clone(),
                producer: None,
                payload: Bytes::from_static(b"0123456789"),
            })
            .await
            .expect("append");
        }
        let meta = log.meta(&chat).expect("meta");
        let now = now_ms();
        let count = Retention {
            max_messages: Some(100),
            ..Retention::default()
        };
        assert_eq!(
            cut(&log, &meta, &count, now).await.expect("cut"),
            Some((Offset::new(51), 500))
        );
        let bytes = Retention {
            max_bytes: Some(1000),
            ..Retention::default()
        };
        assert_eq!(
            cut(&log, &meta, &bytes, now).await.expect("cut"),
            Some((Offset::new(51), 500))
        );
        let young = Retention {
            max_age_secs: Some(3600),
            ..Retention::default()
        };
        assert_eq!(cut(&log, &meta, &young, now).await.expect("cut"), None);
        let old = Retention {
            max_age_secs: Some(1),
            ..Retention::default()
        };
        assert_eq!(
            cut(&log, &meta, &old, now + 10_000).await.expect("cut"),
            Some((Offset::new(151), 1500))
        );

        assert!(log.trim(chat.clone(), Offset::new(51), 500));
        // The trim is a writer command: wait for it with a deadline.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while log.meta(&chat).map(|m| m.first_offset) != Some(Offset::new(51)) {
            assert!(std::time::Instant::now() < deadline, "trim not applied");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let meta = log.meta(&chat).expect("meta");
        assert_eq!(meta.bytes, 1000);
        assert_eq!(meta.len(), 100);
        threads.shutdown();
    }
}
