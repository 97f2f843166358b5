//! Per-namespace retention, enforced in the background.
//!
//! A round (every `retention_interval_ms`) finds the channels that may be
//! over their namespace's limits without visiting the others:
//! - **count and bytes**: a channel only goes over them when it is
//!   published to, which makes it resident; the round walks the resident
//!   channels' metadata (memory, no reads) and cuts those over a limit;
//! - **age**: the store's age index orders each namespace's non-empty
//!   channels by their oldest message; the round reads it up to the cut-off,
//!   at most [`AGED_PER_ROUND`] channels per namespace.
//!
//! A cut reads the oldest messages only as far as it must (their sizes and
//! timestamps decide), in reads bounded by bytes, and a round reads at most
//! [`ROUND_READ_BYTES`] of payload; the next round goes on where it
//! stopped. The writer applies a cut only if the channel still starts where
//! the cut began ([`Trim::from`]), so freed bytes stay exact however rounds
//! and queued cuts overlap. Publishing never waits for retention; a
//! subscriber that needed deleted offsets is told `Truncated` when it reads.
//!
//! A limit lowered at run time applies to the resident channels and to
//! the others when next published to (or, for age, at once).

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use futures_util::StreamExt;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};
use volna_proto::{ChannelName, Offset};

use crate::config::{Config, Retention};
use crate::log::{Log, Trim, now_ms};
use crate::metrics::Metrics;
use crate::store::{ChannelMeta, StoreError};

/// Channels past the age cut-off taken from the index per namespace and
/// round.
pub const AGED_PER_ROUND: usize = 10_000;
/// Payload bytes a round may read to compute its cuts.
pub const ROUND_READ_BYTES: u64 = 64 * 1024 * 1024;
/// Payload bytes one read of a cut asks for at most.
const READ_BYTES: usize = 1024 * 1024;
/// Messages one read of a cut asks for at most; the first read of an age
/// cut asks for far fewer (most due channels lose a few messages).
const READ_MESSAGES: usize = 4096;
const FIRST_AGE_READ: usize = 16;
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
pub async fn run(
    log: Log,
    policies: Arc<Policies>,
    metrics: Arc<Metrics>,
    interval: Duration,
    cancel: CancellationToken,
) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let stats = round(&log, &policies, &metrics, now_ms()).await;
        if stats != RoundStats::default() {
            debug!(?stats, "retention round");
        }
    }
}

/// Cuts a round computes at once.
const CUTS_IN_FLIGHT: usize = 16;

/// The payload bytes a round may still read, shared by the cuts it
/// computes at once (each takes what it read; together they overshoot by
/// at most one read each).
#[derive(Debug)]
pub struct ReadBudget(AtomicU64);

impl ReadBudget {
    /// A budget of `bytes`.
    pub fn new(bytes: u64) -> Self {
        Self(AtomicU64::new(bytes))
    }

    /// Bytes left.
    pub fn left(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }

    fn spent(&self) -> bool {
        self.left() == 0
    }

    fn take(&self, bytes: u64) {
        let _ = self
            .0
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |left| {
                Some(left.saturating_sub(bytes))
            });
    }
}

/// What a round did with one candidate channel.
enum Examined {
    /// Not examined: the budget or the writer's queue ran out, or the
    /// channel is gone.
    NotNow,
    /// Another node decides it.
    Skipped,
    /// Examined; `trimmed` when a cut was handed to the writer.
    Cut { read: u64, trimmed: bool },
}

/// What one round did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RoundStats {
    /// Channels whose log was examined.
    pub examined: u64,
    /// Payload bytes read.
    pub read_bytes: u64,
    /// Cuts handed to the writer.
    pub trims: u64,
    /// Channels over their limits that another node decides (a cluster
    /// node that does not lead their partition).
    pub skipped: u64,
}

/// One retention round at `now_ms`.
pub async fn round(log: &Log, policies: &Policies, metrics: &Metrics, now_ms: u64) -> RoundStats {
    let mut stats = RoundStats::default();
    let bounded = policies.bounded();
    if bounded.is_empty() {
        metrics.retention_rounds.inc();
        return stats;
    }
    let over_limits: Vec<(ChannelName, ChannelMeta)> = log
        .directory()
        .iter()
        .filter(|entry| {
            bounded
                .get(entry.key().namespace())
                .is_some_and(|r| r.exceeds_count_or_bytes(entry.value()))
        })
        .map(|entry| (entry.key().clone(), *entry.value()))
        .collect();
    let mut candidates: Vec<(ChannelName, Option<ChannelMeta>)> = over_limits
        .into_iter()
        .map(|(name, meta)| (name, Some(meta)))
        .collect();
    let mut seen: HashSet<ChannelName> = candidates.iter().map(|(n, _)| n.clone()).collect();
    for (namespace, retention) in &bounded {
        let Some(age) = retention.max_age_secs else {
            continue;
        };
        let cutoff = now_ms.saturating_sub(age.saturating_mul(1000));
        match log.aged_channels(namespace, cutoff, AGED_PER_ROUND).await {
            Ok(aged) => candidates.extend(
                aged.into_iter()
                    .filter(|name| seen.insert(name.clone()))
                    .map(|name| (name, None)),
            ),
            Err(e) => warn!(namespace, error = %e, "cannot read the age index"),
        }
    }
    // Cuts are computed several at a time: each waits on reads of the
    // store, and one after another a round of a few hundred channels took
    // seconds on a busy node (most of it queueing, not reading).
    let budget = ReadBudget::new(ROUND_READ_BYTES);
    let queue_full = AtomicBool::new(false);
    let mut examined = futures_util::stream::iter(candidates)
        .map(|(channel, meta)| {
            let (budget, queue_full, bounded) = (&budget, &queue_full, &bounded);
            async move {
                if budget.spent() || queue_full.load(Ordering::Relaxed) {
                    return Examined::NotNow;
                }
                let Some(retention) = bounded.get(channel.namespace()) else {
                    return Examined::NotNow;
                };
                // In a cluster only the partition's leader cuts; the others
                // skip the channel (not the round: they lead other
                // partitions).
                if !log.decides_retention(&channel) {
                    return Examined::Skipped;
                }
                let meta = match meta {
                    Some(meta) => meta,
                    None => match log.lookup(&channel).await {
                        Ok(Some(meta)) => meta,
                        Ok(None) => return Examined::NotNow,
                        Err(e) => {
                            warn!(%channel, error = %e, "retention cannot read the channel");
                            return Examined::NotNow;
                        }
                    },
                };
                match cut(log, &channel, &meta, retention, now_ms, budget).await {
                    Ok((None, read)) => Examined::Cut { read, trimmed: false },
                    Ok((Some(trim), read)) => {
                        if queue_full.load(Ordering::Relaxed) {
                            // Another cut found the queue full while this
                            // one read: the round is over.
                            return Examined::Cut { read, trimmed: false };
                        }
                        debug!(%channel, below = %trim.below, freed = trim.freed_bytes, "retention");
                        if log.trim(trim) {
                            Examined::Cut { read, trimmed: true }
                        } else {
                            // The writer is saturated; the next round
                            // retries.
                            debug!(%channel, "retention round ends: the writer's queue is full");
                            queue_full.store(true, Ordering::Relaxed);
                            Examined::Cut { read, trimmed: false }
                        }
                    }
                    Err(e) => {
                        warn!(%channel, error = %e, "retention scan failed");
                        Examined::Cut { read: 0, trimmed: false }
                    }
                }
            }
        })
        .buffer_unordered(CUTS_IN_FLIGHT);
    while let Some(outcome) = examined.next().await {
        match outcome {
            Examined::NotNow => {}
            Examined::Skipped => stats.skipped += 1,
            Examined::Cut { read, trimmed } => {
                stats.examined += 1;
                stats.read_bytes += read;
                stats.trims += u64::from(trimmed);
            }
        }
    }
    metrics.retention_channels_examined.inc_by(stats.examined);
    metrics.retention_read_bytes.inc_by(stats.read_bytes);
    metrics.retention_rounds.inc();
    stats
}

impl Retention {
    /// Whether `meta` holds more messages or bytes than allowed (known
    /// from the metadata alone).
    pub fn exceeds_count_or_bytes(&self, meta: &ChannelMeta) -> bool {
        self.max_messages.is_some_and(|max| meta.len() > max)
            || self.max_bytes.is_some_and(|max| meta.bytes > max)
    }
}

/// Where to cut `channel`'s log to meet `retention`, reading at most
/// `budget` payload bytes (taken from it): the cut, if any (a cut that
/// deletes nothing only corrects the channel's place in the age index),
/// and the bytes read.
pub async fn cut(
    log: &Log,
    channel: &ChannelName,
    meta: &ChannelMeta,
    retention: &Retention,
    now_ms: u64,
    budget: &ReadBudget,
) -> Result<(Option<Trim>, u64), StoreError> {
    let by_count = retention
        .max_messages
        .map(|max| Offset::new(meta.next_offset.get().saturating_sub(max)));
    let age_cutoff = retention
        .max_age_secs
        .map(|age| now_ms.saturating_sub(age.saturating_mul(1000)));
    let excess_bytes = |freed: u64| {
        retention.max_bytes.map_or(0, |max| {
            meta.bytes.saturating_sub(freed).saturating_sub(max)
        })
    };
    let aged = |ts: u64| age_cutoff.is_some_and(|cut| ts < cut);

    let mut below = meta.first_offset;
    let mut freed = 0u64;
    let mut read = 0u64;
    // The new oldest message's timestamp: exact once a message that stays
    // was read, else a lower bound (the last one that goes).
    let mut oldest_ms = meta.oldest_ms;
    let mut age_reads = FIRST_AGE_READ;
    'scan: while below < meta.next_offset && meta.first_offset.distance_to(below) < SCAN_LIMIT {
        let count_left = by_count.map_or(0, |c| below.distance_to(c.max(below)));
        let bytes_left = excess_bytes(freed);
        if count_left == 0 && bytes_left == 0 && age_cutoff.is_none() {
            break;
        }
        let left = budget.left();
        if left == 0 {
            break;
        }
        // Ask for what the cut needs and one message more (the first that
        // stays tells the channel's new oldest timestamp).
        let count_need = usize::try_from(count_left)
            .unwrap_or(usize::MAX)
            .saturating_add(1);
        let want_messages = if bytes_left > 0 {
            READ_MESSAGES
        } else if count_left > 0 {
            count_need.max(if age_cutoff.is_some() { age_reads } else { 0 })
        } else {
            age_reads
        };
        // By bytes alone, the excess (and one message) is all it takes.
        let want_bytes = if age_cutoff.is_some() || count_left > 0 {
            READ_BYTES
        } else {
            usize::try_from(bytes_left).unwrap_or(usize::MAX).max(1)
        };
        let want_bytes = want_bytes
            .min(READ_BYTES)
            .min(usize::try_from(left).unwrap_or(usize::MAX));
        let chunk = log
            .read(
                meta.id,
                below,
                meta.next_offset,
                want_messages.min(READ_MESSAGES),
                want_bytes,
            )
            .await?;
        age_reads = age_reads.saturating_mul(4);
        if chunk.is_empty() {
            break;
        }
        for message in &chunk {
            let size = message.payload.len() as u64;
            read += size;
            budget.take(size);
            let goes = by_count.is_some_and(|c| message.offset < c)
                || excess_bytes(freed) > 0
                || aged(message.timestamp_ms);
            oldest_ms = message.timestamp_ms;
            if !goes {
                break 'scan;
            }
            below = message.offset.next();
            freed += size;
        }
    }
    let trim = Trim {
        channel: channel.clone(),
        from: meta.first_offset,
        epoch: Some(meta.epoch),
        below,
        freed_bytes: freed,
        oldest_ms,
    };
    let moves =
        below > meta.first_offset || (below < meta.next_offset && oldest_ms != meta.oldest_ms);
    Ok((moves.then_some(trim), read))
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::config::{Durability, EngineConfig};
    use crate::log::{self, AppendInput, CommitListener, LogThreads};
    use crate::store::{LogStore, MemoryStore, StoredMessage};

    struct Nobody;
    impl CommitListener for Nobody {
        fn committed(&self, _: &ChannelName, _: &ChannelMeta, _: &[StoredMessage]) {}
    }

    fn start(store: Arc<MemoryStore>) -> LogThreads {
        log::start(
            store,
            Arc::new(Nobody),
            Durability::Wal,
            &EngineConfig::default(),
            Arc::new(Metrics::new()),
        )
        .expect("log")
    }

    async fn publish(log: &Log, channel: &ChannelName, n: usize, payload: &'static [u8]) {
        for _ in 0..n {
            log.append(AppendInput {
                channel: channel.clone(),
                producer: None,
                payload: Bytes::from_static(payload),
            })
            .await
            .expect("append");
        }
    }

    async fn wait_first(log: &Log, channel: &ChannelName, first: u64) -> ChannelMeta {
        // A trim is a writer command: wait for it with a deadline.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            let meta = log.lookup(channel).await.expect("lookup").expect("meta");
            if meta.first_offset == Offset::new(first) {
                return meta;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "trim not applied: {meta:?}"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    fn cut_of(trim: Option<Trim>) -> Option<(u64, u64)> {
        trim.map(|t| (t.below.get(), t.freed_bytes))
    }

    #[tokio::test]
    async fn cuts_by_count_bytes_and_age_reading_only_what_goes() {
        let threads = start(Arc::new(MemoryStore::new()));
        let log = threads.log().clone();
        let chat = ChannelName::new("chat.1").expect("name");
        publish(&log, &chat, 150, b"0123456789").await;
        let meta = log.meta(&chat).expect("meta");
        let now = now_ms();
        let budget = ReadBudget::new(u64::MAX);
        let count = Retention {
            max_messages: Some(100),
            ..Retention::default()
        };
        let (trim, read) = cut(&log, &chat, &meta, &count, now, &budget)
            .await
            .expect("cut");
        assert_eq!(cut_of(trim), Some((51, 500)));
        // The 50 that go and the one that stays, not the whole channel.
        assert_eq!(read, 510);
        let bytes = Retention {
            max_bytes: Some(1000),
            ..Retention::default()
        };
        let (trim, read) = cut(&log, &chat, &meta, &bytes, now, &budget)
            .await
            .expect("cut");
        assert_eq!(cut_of(trim), Some((51, 500)));
        assert!(read <= 520, "read {read} bytes for a 500-byte excess");
        let young = Retention {
            max_age_secs: Some(3600),
            ..Retention::default()
        };
        let (trim, _) = cut(&log, &chat, &meta, &young, now, &budget)
            .await
            .expect("cut");
        assert_eq!(cut_of(trim), None);
        let old = Retention {
            max_age_secs: Some(1),
            ..Retention::default()
        };
        let (trim, _) = cut(&log, &chat, &meta, &old, now + 10_000, &budget)
            .await
            .expect("cut");
        assert_eq!(cut_of(trim), Some((151, 1500)));
        // A round's read budget bounds a cut.
        let small = ReadBudget::new(100);
        let (trim, read) = cut(&log, &chat, &meta, &count, now, &small)
            .await
            .expect("cut");
        assert_eq!(
            (cut_of(trim), read, small.left()),
            (Some((11, 100)), 100, 0)
        );

        let (trim, _) = cut(&log, &chat, &meta, &count, now, &budget)
            .await
            .expect("cut");
        assert!(log.trim(trim.expect("a cut")));
        let meta = wait_first(&log, &chat, 51).await;
        assert_eq!(meta.bytes, 1000);
        assert_eq!(meta.len(), 100);
        threads.shutdown();
    }

    /// Issue 11 §C3: a cut computed while an earlier one was still queued
    /// used to subtract the earlier cut's bytes a second time.
    #[tokio::test]
    async fn freed_bytes_stay_exact_when_cuts_overlap() {
        let threads = start(Arc::new(MemoryStore::new()));
        let log = threads.log().clone();
        let chat = ChannelName::new("chat.1").expect("name");
        publish(&log, &chat, 100, b"0123456789").await;
        let meta = log.meta(&chat).expect("meta");
        let budget = ReadBudget::new(u64::MAX);
        let keep = |n| Retention {
            max_messages: Some(n),
            ..Retention::default()
        };
        // Two rounds computed from the same metadata before either landed.
        let (first, _) = cut(&log, &chat, &meta, &keep(60), now_ms(), &budget)
            .await
            .expect("cut");
        let (second, _) = cut(&log, &chat, &meta, &keep(50), now_ms(), &budget)
            .await
            .expect("cut");
        assert!(log.trim(first.expect("first cut")));
        assert!(log.trim(second.expect("second cut")));
        let meta = wait_first(&log, &chat, 41).await;
        publish(&log, &chat, 1, b"0123456789").await;
        let meta_after = log.meta(&chat).expect("meta");
        assert_eq!(meta.bytes, 600, "bytes must match the 60 messages left");
        assert_eq!(meta_after.bytes, 610);
        // The next round cuts what the stale one wanted, exactly.
        let stats = round(&log, &policies("chat", keep(50)), &Metrics::new(), now_ms()).await;
        assert_eq!(stats.trims, 1);
        let meta = wait_first(&log, &chat, 52).await;
        assert_eq!((meta.len(), meta.bytes), (50, 500));
        threads.shutdown();
    }

    fn policies(namespace: &str, retention: Retention) -> Policies {
        let policies = Policies::default();
        policies.set(namespace, retention);
        policies
    }

    /// Issue 11 §C3: a round visits only the channels over a limit or past
    /// the age cut-off, not every channel with full reads.
    #[tokio::test]
    async fn a_round_visits_only_the_channels_that_are_due() {
        let store = Arc::new(MemoryStore::new());
        let threads = start(store.clone());
        let log = threads.log().clone();
        let names: Vec<_> = (0..200)
            .map(|i| ChannelName::new(format!("chat.{i}")).expect("name"))
            .collect();
        for name in &names {
            publish(&log, name, 1, b"x").await;
        }
        let over = &names[7];
        publish(&log, over, 20, b"x").await;
        let metrics = Metrics::new();
        let limits = Retention {
            max_messages: Some(10),
            max_age_secs: Some(3600),
            ..Retention::default()
        };
        let stats = round(&log, &policies("chat", limits.clone()), &metrics, now_ms()).await;
        assert_eq!((stats.examined, stats.trims), (1, 1));
        assert_eq!(wait_first(&log, over, 12).await.len(), 10);

        // Once the hour has passed, the index hands over every channel,
        // and each loses exactly what aged.
        let later = now_ms() + 3_601_000;
        let stats = round(&log, &policies("chat", limits), &metrics, later).await;
        assert_eq!(stats.examined, 200);
        assert_eq!(stats.trims, 200);
        for name in &names[..3] {
            let meta = wait_first(&log, name, 2).await;
            assert!(meta.is_empty());
        }
        // Emptied channels leave the index: nothing is due any more.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !store
            .aged_channels("chat", u64::MAX, 10)
            .expect("aged")
            .is_empty()
        {
            assert!(std::time::Instant::now() < deadline, "index not emptied");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        threads.shutdown();
    }
}
