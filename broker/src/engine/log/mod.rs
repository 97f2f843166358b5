//! The channel log: offset assignment, group commit and catch-up reads.
//!
//! ```text
//!  sessions ──append──▶ queue ──▶ writer thread ──WriteBatch──▶ LogStore
//!     ▲                             │ committed batch
//!     └──── ack (offset) ◀──────────┤
//!                                   ▼
//!                            CommitListener (fan-out)
//!  subscriptions ──read──▶ queue ──▶ reader threads ──▶ LogStore
//! ```
//!
//! Invariants:
//! - Only the writer thread assigns offsets, so they are gapless and
//!   increasing per channel (G1). The [`Sequencer`] holding that state is
//!   pure and tested without threads.
//! - An append is acknowledged only after the batch holding it was written
//!   (and with `fsync` durability, synced) (G2). A failed write acknowledges
//!   nothing and leaves the sequencer as it was.
//! - The [`Directory`] of channel metadata is updated after the write and
//!   before listeners are told, so anything a subscriber learns of from the
//!   fan-out is already readable from the store.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use crossbeam_channel::{Receiver, RecvTimeoutError};
use dashmap::DashMap;
use thiserror::Error;
use tokio::sync::oneshot;
use tracing::{error, info, warn};
use volna_proto::{ChannelName, Epoch, ErrorCode, Offset, ProducerSeq};

mod digest;
mod restore;

pub use digest::{Digester, StateDigest};
pub use restore::{Restore, RestoreScope, Restores};

use crate::channels::ChannelTable;
use crate::config::{Durability, EngineConfig};
use crate::metrics::Metrics;
use crate::producers::ProducerTable;
use crate::queue::{self, AsyncSender, Queued};
use crate::store::{
    AgeIndexMove, ChannelId, ChannelMeta, DeviceWrite, ExportScope, LogStore, PartitionClocks,
    ProducerEntry, ProducerKey, ProducerWindow, Recovered, SequenceStatus, StoreError,
    StoredMessage, WriteSet,
};

/// How often the writer looks for idle producer windows.
const PRODUCER_SWEEP_INTERVAL: Duration = Duration::from_secs(1);
/// Times a read that overlapped the start or end of a partition's restore
/// is made again: the next try sees the partition restoring (and reads
/// from its leader) or restored.
const READ_AGAIN: usize = 8;

/// The resident channels' metadata as last committed, readable from any
/// thread (the writer's [`ChannelTable`], published).
pub type Directory = DashMap<ChannelName, ChannelMeta>;

/// Told about every committed batch, on the writer thread: must be quick and
/// must not block.
pub trait CommitListener: Send + Sync + 'static {
    /// `messages` were committed to `channel`, consecutive offsets.
    fn committed(&self, channel: &ChannelName, meta: &ChannelMeta, messages: &[StoredMessage]);

    /// `channel` was deleted with its log.
    fn deleted(&self, _channel: &ChannelName) {}
}

/// A publish acknowledged by the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Appended {
    /// Where the message is stored.
    pub offset: Offset,
    /// The channel log's epoch.
    pub epoch: Epoch,
    /// True when this was a retry of an already stored publish.
    pub duplicate: bool,
}

/// Why an append was not stored.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum AppendError {
    /// The store failed; nothing of the batch was stored.
    #[error("storage unavailable: {0}")]
    Storage(String),
    /// The sequence is older than the producer's dedup window.
    #[error("sequence {sequence} of producer {producer_id} is older than its dedup window")]
    SequenceTooOld {
        /// The producer.
        producer_id: u64,
        /// The sequence sent.
        sequence: u64,
    },
    /// The owner has as many live producer windows as it may.
    #[error("{owner} has {limit} live producers already; reuse a producer id")]
    TooManyProducers {
        /// Who published.
        owner: Arc<str>,
        /// The limit.
        limit: u32,
    },
    /// The sequence was already used by this producer on another channel.
    #[error("sequence {sequence} of producer {producer_id} was already used on another channel")]
    SequenceReused {
        /// The producer.
        producer_id: u64,
        /// The sequence sent.
        sequence: u64,
    },
    /// The publish it must follow (`after`) is not stored yet.
    #[error(
        "sequence {sequence} of producer {producer_id} must follow sequence {after}, which is not stored yet"
    )]
    OutOfOrder {
        /// The producer.
        producer_id: u64,
        /// The sequence sent.
        sequence: u64,
        /// The sequence it must follow.
        after: u64,
    },
    /// The log is shutting down.
    #[error("the log is shutting down")]
    ShuttingDown,
    /// The channel's partition could not commit it in time (cluster).
    #[error("partition unavailable: {0}")]
    Unavailable(String),
    /// The partition's leader refused it (cluster): its code and reason.
    #[error("{message}")]
    Refused {
        /// The wire code.
        code: ErrorCode,
        /// Why.
        message: String,
    },
}

impl AppendError {
    /// The wire error code a client is told.
    pub fn error_code(&self) -> ErrorCode {
        match self {
            Self::Storage(_) => ErrorCode::StorageUnavailable,
            Self::SequenceTooOld { .. } => ErrorCode::SequenceTooOld,
            Self::SequenceReused { .. } => ErrorCode::BadRequest,
            Self::TooManyProducers { .. } => ErrorCode::TooManyProducers,
            Self::OutOfOrder { .. } => ErrorCode::OutOfOrder,
            Self::ShuttingDown => ErrorCode::ShuttingDown,
            Self::Unavailable(_) => ErrorCode::Unavailable,
            Self::Refused { code, .. } => *code,
        }
    }
}

/// One publish to sequence.
#[derive(Debug, Clone)]
pub struct AppendInput {
    /// Target channel.
    pub channel: ChannelName,
    /// Idempotency key, if any.
    pub producer: Option<ProducerRef>,
    /// Body.
    pub payload: Bytes,
}

/// An idempotent publish's identity: whose producer, which sequence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProducerRef {
    /// The authenticated owner and the client's producer id.
    pub key: ProducerKey,
    /// The producer's sequence number of this publish.
    pub sequence: u64,
    /// The producer's earlier publish to the channel that must be stored
    /// before this one (it was in flight when this one was sent).
    pub after: Option<u64>,
    /// Whether the owner's live windows count against
    /// `limits.max_producers_per_user` (end users; not backend services).
    pub limited: bool,
}

impl ProducerRef {
    fn seq(&self) -> ProducerSeq {
        ProducerSeq {
            producer_id: self.key.producer_id,
            sequence: self.sequence,
        }
    }
}

/// How the sequencer keeps producer windows and channels.
#[derive(Debug, Clone, Copy)]
pub struct ProducerLimits {
    /// Sequences remembered per producer.
    pub window: usize,
    /// A window is forgotten this long after its last publish.
    pub idle_ms: u64,
    /// Windows kept in memory.
    pub max_resident: usize,
    /// Live windows per limited owner.
    pub max_per_owner: u32,
    /// Beyond `max_per_owner`, a new window evicts the owner's least
    /// recently used one; otherwise it is refused. Either way the owner's
    /// windows are counted from the store (all loaded) and judged at the
    /// batch's time, so replicas decide alike.
    pub evict_beyond_limit: bool,
    /// Channels whose metadata is kept in memory.
    pub max_resident_channels: usize,
}

impl ProducerLimits {
    /// The limits a configuration sets.
    pub fn from_config(engine: &EngineConfig) -> Self {
        Self {
            window: engine.producer_window,
            idle_ms: engine.producer_idle_secs.saturating_mul(1000),
            max_resident: engine.max_resident_producers,
            max_per_owner: u32::try_from(engine.max_producers_per_user).unwrap_or(u32::MAX),
            evict_beyond_limit: true,
            max_resident_channels: engine.max_resident_channels,
        }
    }
}

/// A retention cut, as computed from a channel's metadata.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Trim {
    /// The channel.
    pub channel: ChannelName,
    /// The channel's first offset the cut was computed from: a trim that
    /// finds another (an earlier trim landed meanwhile) is stale and
    /// skipped, so freed bytes are never subtracted twice.
    pub from: Offset,
    /// The channel's epoch the cut was computed from. A channel deleted and
    /// created again meanwhile has another epoch (and may start at `from`
    /// again): the cut is stale there, and never deletes the new
    /// incarnation's messages. `None` only for cuts replicated by nodes
    /// that did not send it, checked by `from` alone.
    pub epoch: Option<Epoch>,
    /// Everything below this offset goes.
    pub below: Offset,
    /// Payload bytes of `[from, below)`.
    pub freed_bytes: u64,
    /// When the message at `below` was stored, or a lower bound of it: the
    /// channel's new place in the age index.
    pub oldest_ms: u64,
}

/// What the sequencer decided for one input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Stored (once the batch commits).
    Stored(Appended),
    /// Refused without storing.
    Refused(AppendError),
}

/// A batch prepared by the [`Sequencer`], not yet applied to it.
#[derive(Debug, Default)]
pub struct Prepared {
    /// What to write.
    pub set: WriteSet,
    /// One outcome per input, in input order.
    pub outcomes: Vec<Outcome>,
    /// The committed messages per channel, in offset order.
    pub by_channel: Vec<(ChannelName, ChannelMeta, Vec<StoredMessage>)>,
    /// One answer per delete, in order: the deleted channel's last
    /// metadata, or `None` when there was no such channel.
    pub deleted: Vec<(ChannelName, Option<ChannelMeta>)>,
    /// Trims skipped because an earlier one moved the channel meanwhile.
    pub stale_trims: u64,
    channels: HashMap<ChannelName, ChannelMeta>,
    producers: HashMap<ProducerKey, ProducerWindow>,
    /// Resident windows evicted to make room for an owner's new producer
    /// (their deletes are in `set`).
    evicted_producers: Vec<ProducerKey>,
    next_channel_id: ChannelId,
}

impl Prepared {
    /// How many of `owner`'s resident windows this batch evicts.
    fn evicted_of(&self, owner: &str) -> u32 {
        self.evicted_producers
            .iter()
            .filter(|k| &*k.owner == owner)
            .count() as u32
    }
}

/// The writer's state: the resident channels' metadata and producers'
/// dedup windows. Pure: it decides, the caller loads and writes.
#[derive(Debug)]
pub struct Sequencer {
    channels: ChannelTable,
    producers: ProducerTable,
    next_channel_id: ChannelId,
    generation: u64,
    limits: ProducerLimits,
}

impl Sequencer {
    /// A sequencer over the store's counters; channels and producer windows
    /// are added as they are loaded ([`Sequencer::channels_mut`],
    /// [`Sequencer::producers_mut`]).
    pub fn new(recovered: Recovered, limits: ProducerLimits) -> Self {
        Self {
            channels: ChannelTable::new(limits.max_resident_channels),
            producers: ProducerTable::new(limits.max_resident, limits.idle_ms),
            next_channel_id: recovered.next_channel_id,
            generation: recovered.generation,
            limits,
        }
    }

    /// The limits it keeps windows and channels by.
    pub fn limits(&self) -> &ProducerLimits {
        &self.limits
    }

    /// The resident producer windows.
    pub fn producers(&self) -> &ProducerTable {
        &self.producers
    }

    /// The resident producer windows, to load into or sweep.
    pub fn producers_mut(&mut self) -> &mut ProducerTable {
        &mut self.producers
    }

    /// The resident channels.
    pub fn channels(&self) -> &ChannelTable {
        &self.channels
    }

    /// The resident channels, to load into or evict.
    pub fn channels_mut(&mut self) -> &mut ChannelTable {
        &mut self.channels
    }

    /// Decides offsets for `appends`, then applies `trims` (retention) and
    /// `deletes`, without changing `self`. A channel neither resident nor
    /// in this batch is created: the caller loads existing ones first.
    pub fn prepare<'a>(
        &self,
        appends: impl IntoIterator<Item = &'a AppendInput>,
        trims: impl IntoIterator<Item = Trim>,
        deletes: impl IntoIterator<Item = ChannelName>,
        now_ms: u64,
        new_epoch: &mut dyn FnMut() -> Epoch,
    ) -> Prepared {
        let mut p = Prepared {
            next_channel_id: self.next_channel_id,
            ..Prepared::default()
        };
        let mut channel_slot: HashMap<ChannelName, usize> = HashMap::new();
        let mut new_per_owner: HashMap<Arc<str>, u32> = HashMap::new();
        let appends: Vec<&AppendInput> = appends.into_iter().collect();
        // A window that publishes anywhere in the batch is never the one
        // evicted (it would be written and deleted by the same write).
        let publishing: std::collections::HashSet<&ProducerKey> = appends
            .iter()
            .filter_map(|a| a.producer.as_ref().map(|p| &p.key))
            .collect();
        for input in appends {
            let meta = match p.channels.get(&input.channel) {
                Some(m) => *m,
                None => match self.channels.get(&input.channel) {
                    Some(m) => *m,
                    None => {
                        let id = p.next_channel_id;
                        p.next_channel_id += 1;
                        ChannelMeta {
                            generation: self.generation,
                            ..ChannelMeta::new(id, new_epoch())
                        }
                    }
                },
            };
            if let Some(producer) = &input.producer {
                // A new window beyond the owner's limit takes the place of
                // the owner's least recently used one (evicted with its
                // dedup memory), so that an app restarted many times a day
                // is never locked out by its earlier runs' producers. Only
                // when every window of the owner published in this very
                // batch is there nothing to evict.
                // Counted among the owner's live windows, all of them
                // resident (the writer loads an owner whole first): what
                // is stored decides, the same on every replica.
                let at_limit = |p: &Prepared| {
                    let live = self.producers.live_owned_by(&producer.key.owner, now_ms)
                        - p.evicted_of(&producer.key.owner);
                    live + new_per_owner.get(&producer.key.owner).copied().unwrap_or(0)
                        >= self.limits.max_per_owner
                };
                // A window idle past the horizon at this batch's time is
                // gone, swept or not.
                let known = p.producers.contains_key(&producer.key)
                    || self.producers.live(&producer.key, now_ms).is_some();
                // The window to evict, taken only once the publish is known
                // to be stored (a refused one evicts nothing).
                let room = match !known && producer.limited && at_limit(&p) {
                    true if self.limits.evict_beyond_limit => {
                        self.producers
                            .least_recent_of(&producer.key.owner, now_ms, |k| {
                                p.evicted_producers.contains(k) || publishing.contains(k)
                            })
                    }
                    _ => None,
                };
                let window = p
                    .producers
                    .get(&producer.key)
                    .or_else(|| self.producers.live(&producer.key, now_ms));
                let refused = match window.map(|w| w.lookup(producer.sequence)) {
                    None if producer.limited && room.is_none() && at_limit(&p) => {
                        Some(Outcome::Refused(AppendError::TooManyProducers {
                            owner: producer.key.owner.clone(),
                            limit: self.limits.max_per_owner,
                        }))
                    }
                    None | Some(SequenceStatus::New) => {
                        // Kafka's idempotent producer rule: never store a
                        // publish ahead of an unstored one it must follow.
                        // Only a remembered sequence counts as stored: one
                        // beyond the window may never have been (a refused
                        // publish is retried under a fresh sequence), and
                        // the client resends with its current predecessor.
                        let stored = |after| {
                            window.is_some_and(|w| {
                                matches!(w.lookup(after), SequenceStatus::Stored(_))
                            })
                        };
                        match producer.after {
                            Some(after) if !stored(after) => {
                                Some(Outcome::Refused(AppendError::OutOfOrder {
                                    producer_id: producer.key.producer_id,
                                    sequence: producer.sequence,
                                    after,
                                }))
                            }
                            _ => None,
                        }
                    }
                    Some(SequenceStatus::Stored(e)) if e.channel == meta.id => {
                        Some(Outcome::Stored(Appended {
                            offset: e.offset,
                            epoch: e.epoch,
                            duplicate: true,
                        }))
                    }
                    Some(SequenceStatus::Stored(_)) => {
                        Some(Outcome::Refused(AppendError::SequenceReused {
                            producer_id: producer.key.producer_id,
                            sequence: producer.sequence,
                        }))
                    }
                    Some(SequenceStatus::Forgotten) => {
                        Some(Outcome::Refused(AppendError::SequenceTooOld {
                            producer_id: producer.key.producer_id,
                            sequence: producer.sequence,
                        }))
                    }
                };
                if let Some(outcome) = refused {
                    p.outcomes.push(outcome);
                    continue;
                }
                p.evicted_producers.extend(room);
            }
            let mut meta = meta;
            let offset = meta.next_offset;
            if meta.is_empty() {
                meta.oldest_ms = now_ms;
            }
            meta.next_offset = offset.next();
            meta.bytes += input.payload.len() as u64;
            meta.generation = self.generation;
            p.channels.insert(input.channel.clone(), meta);
            let message = StoredMessage {
                offset,
                timestamp_ms: now_ms,
                producer: input.producer.as_ref().map(ProducerRef::seq),
                payload: input.payload.clone(),
            };
            p.set.messages.push((meta.id, message.clone()));
            let slot = *channel_slot
                .entry(input.channel.clone())
                .or_insert_with(|| {
                    p.by_channel.push((input.channel.clone(), meta, Vec::new()));
                    p.by_channel.len() - 1
                });
            p.by_channel[slot].1 = meta;
            p.by_channel[slot].2.push(message);
            if let Some(producer) = &input.producer {
                let window = match p.producers.get_mut(&producer.key) {
                    Some(w) => w,
                    None => {
                        let loaded = self.producers.live(&producer.key, now_ms).cloned();
                        if loaded.is_none() {
                            *new_per_owner.entry(producer.key.owner.clone()).or_default() += 1;
                        }
                        p.producers
                            .entry(producer.key.clone())
                            .or_insert(loaded.unwrap_or_default())
                    }
                };
                let entry = ProducerEntry {
                    sequence: producer.sequence,
                    channel: meta.id,
                    offset,
                    epoch: meta.epoch,
                };
                window.insert(entry, self.limits.window, now_ms);
            }
            p.outcomes.push(Outcome::Stored(Appended {
                offset,
                epoch: meta.epoch,
                duplicate: false,
            }));
        }
        for trim in trims {
            let Some(mut meta) = p
                .channels
                .get(&trim.channel)
                .or_else(|| self.channels.get(&trim.channel))
                .copied()
            else {
                continue;
            };
            if meta.first_offset != trim.from || trim.epoch.is_some_and(|e| e != meta.epoch) {
                p.stale_trims += 1;
                continue;
            }
            let below = trim.below.min(meta.next_offset);
            if below < meta.first_offset {
                continue;
            }
            if below > meta.first_offset {
                p.set.deletions.push((meta.id, meta.first_offset, below));
                meta.first_offset = below;
                meta.bytes = meta.bytes.saturating_sub(trim.freed_bytes);
            }
            // A trim to where the channel already starts only corrects its
            // place in the age index.
            if !meta.is_empty() {
                meta.oldest_ms = trim.oldest_ms;
            }
            meta.generation = self.generation;
            p.channels.insert(trim.channel, meta);
        }
        for name in deletes {
            let meta = p
                .channels
                .remove(&name)
                .or_else(|| self.channels.get(&name).copied());
            if let Some(meta) = meta {
                p.set.deleted_channels.push((name.clone(), meta.id));
            }
            p.deleted.push((name, meta));
        }
        // The age index holds a channel while it has messages, keyed by its
        // oldest one: move entries from the committed state to the new one.
        let indexed =
            |meta: Option<&ChannelMeta>| meta.filter(|m| !m.is_empty()).map(|m| m.oldest_ms);
        let changed = p
            .channels
            .iter()
            .map(|(name, meta)| (name, Some(meta)))
            .chain(p.deleted.iter().map(|(name, _)| (name, None)));
        for (name, after) in changed {
            let before = self.channels.get(name);
            let (from, to) = (indexed(before), indexed(after));
            if from != to {
                p.set.age_index.push(AgeIndexMove {
                    channel: name.clone(),
                    id: after.or(before).map_or(0, |m| m.id),
                    from,
                    to,
                });
            }
        }
        if p.next_channel_id != self.next_channel_id {
            p.set.next_channel_id = Some(p.next_channel_id);
        }
        // Listeners hear of each channel's final state (a trim may follow
        // the appends); a channel deleted in the batch is not announced.
        p.by_channel
            .retain_mut(|(name, meta, _)| match p.channels.get(name) {
                Some(last) => {
                    *meta = *last;
                    true
                }
                None => false,
            });
        p.set.channels = p.channels.iter().map(|(n, m)| (n.clone(), *m)).collect();
        p.set.producers = p
            .producers
            .iter()
            .map(|(k, w)| (k.clone(), w.clone()))
            .collect();
        p.set
            .expired_producers
            .extend(p.evicted_producers.iter().cloned());
        p
    }

    /// Takes a new channel id (a channel restored from a snapshot); the
    /// caller writes the new counter with the channel.
    pub fn take_channel_id(&mut self) -> ChannelId {
        let id = self.next_channel_id;
        self.next_channel_id += 1;
        id
    }

    /// The id the next new channel gets.
    pub fn next_channel_id(&self) -> ChannelId {
        self.next_channel_id
    }

    /// The store generation new metadata is written in.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Applies a prepared batch after the store accepted it.
    pub fn commit(&mut self, prepared: &mut Prepared) {
        self.next_channel_id = prepared.next_channel_id;
        for (name, meta) in prepared.channels.drain() {
            self.channels.put(name, meta);
        }
        for (name, _) in &prepared.deleted {
            self.channels.remove(name);
        }
        for key in prepared.evicted_producers.drain(..) {
            self.producers.remove(&key);
        }
        for (key, window) in prepared.producers.drain() {
            self.producers.put(key, window);
        }
    }
}

/// What the log's threads are asked to do.
#[derive(Debug)]
enum Command {
    /// Appends sequenced in their order, with one reply holding an outcome
    /// per append: a connection's burst of publishes is one hand-off and
    /// one wake-up, not one per publish.
    Append {
        inputs: Vec<AppendInput>,
        reply: BatchReply,
    },
    /// Bytes freed by retention are subtracted by the writer, which checks
    /// that the cut still starts where the channel does.
    Trim(Trim),
    /// Removes a channel and its log; ends the batch it is in, so that the
    /// appends before it are stored (and deleted) and those after it
    /// create the channel anew.
    Delete {
        channel: ChannelName,
        reply: oneshot::Sender<Result<Option<ChannelMeta>, AppendError>>,
        /// Its subscribers are not told (see [`Log::forget`]).
        quietly: bool,
    },
    /// A committed entry of a partition's Raft log (cluster); ends the
    /// batch it is in and is written on its own, with its applied state.
    Replicated {
        batch: Replicated,
        reply: oneshot::Sender<Result<ReplicatedOutcome, AppendError>>,
    },
    /// A step of restoring a replicated partition from a snapshot
    /// (cluster); written on its own, like a replicated entry.
    Restore {
        partition: u32,
        step: Restore,
        reply: oneshot::Sender<Result<(), AppendError>>,
    },
    /// The last sequence stored for a producer; ends the batch it is in,
    /// so that it is answered after every append queued before it.
    LastSequence {
        key: ProducerKey,
        reply: oneshot::Sender<Result<u64, StoreError>>,
    },
    /// A digest of a replicated partition's state with its applied state,
    /// at one point between entries; ends the batch it is in.
    Digest {
        partition: u32,
        scope: RestoreScope,
        reply: oneshot::Sender<Result<PartitionDigest, StoreError>>,
    },
}

/// A replicated partition's state as one replica holds it
/// ([`Log::partition_digest`]).
#[derive(Debug, Clone)]
pub struct PartitionDigest {
    /// The partition's applied state when digested (opaque to the log).
    pub applied: Option<Vec<u8>>,
    /// The digest of its channels, messages and producer windows.
    pub state: StateDigest,
}

/// A question the writer answers between batches.
enum Question {
    LastSequence(ProducerKey, oneshot::Sender<Result<u64, StoreError>>),
    Digest(
        u32,
        RestoreScope,
        oneshot::Sender<Result<PartitionDigest, StoreError>>,
    ),
}

/// A committed entry of a replicated partition's log, to apply (cluster).
/// Everything that decides offsets and epochs is in it, so every replica
/// that applies the same entries stores the same `(epoch, offset)`s.
#[derive(Debug, Clone, Default)]
pub struct Replicated {
    /// The partition.
    pub partition: u32,
    /// The partition's applied state once this entry is applied (opaque to
    /// the log; stored atomically with the entry's changes).
    pub applied: Vec<u8>,
    /// The leader's clock when it proposed the entry.
    pub now_ms: u64,
    /// Seeds the epochs of channels the entry creates.
    pub epoch_seed: u64,
    /// Publishes, in order.
    pub appends: Vec<AppendInput>,
    /// Retention cuts.
    pub trims: Vec<Trim>,
    /// Channels to delete.
    pub deletes: Vec<ChannelName>,
    /// Device state the entry changed (already merged with what is stored:
    /// the partition's machine is its only writer).
    pub devices: DeviceWrite,
}

/// What applying a [`Replicated`] entry decided.
#[derive(Debug, Default)]
pub struct ReplicatedOutcome {
    /// One per append, in order.
    pub outcomes: Vec<Outcome>,
    /// One per delete: the deleted channel's last metadata, `None` when
    /// there was no such channel.
    pub deleted: Vec<(ChannelName, Option<ChannelMeta>)>,
}

/// Where a cluster node's log sends appends, deletes and retention cuts:
/// the channel's partition group, through its Raft log (DESIGN.md §7),
/// instead of this node's writer. What the group commits comes back to the
/// writer as [`Replicated`] entries.
pub trait Replication: Send + Sync + std::fmt::Debug + 'static {
    /// Queues `input` for its partition, in submission order.
    fn submit(&self, input: AppendInput) -> BoxFuture<'_, Result<PendingAppend, AppendError>>;
    /// Deletes `channel` through its partition.
    fn delete(
        &self,
        channel: ChannelName,
    ) -> BoxFuture<'_, Result<Option<ChannelMeta>, AppendError>>;
    /// The partition `channel` belongs to.
    fn partition(&self, channel: &ChannelName) -> u32;
    /// Whether this node leads `channel`'s partition and knows it still
    /// does (its lease holds): what it applied is what was committed, as
    /// far as any device was told.
    fn leads(&self, channel: &ChannelName) -> bool;
    /// Whether this node decides `channel`'s retention: it leads the
    /// channel's partition (and knows it still does). Every other node
    /// skips the channel: the leader's cut reaches it through the log.
    fn decides_retention(&self, channel: &ChannelName) -> bool {
        self.leads(channel)
    }
    /// Proposes a retention cut the node decided (see
    /// [`Replication::decides_retention`]); false when the partition's
    /// queue is full (the next round computes it again). A cut that finds
    /// the node no longer leading is dropped, not refused: the new leader
    /// cuts.
    fn trim(&self, trim: Trim) -> bool;
    /// Whether `channel`'s log is read from another node: this node does
    /// not replicate its partition (it is an edge for it).
    fn reads_remotely(&self, channel: &ChannelName) -> bool;
    /// `channel`'s committed metadata, from its partition's leader.
    fn remote_lookup(
        &self,
        channel: ChannelName,
    ) -> BoxFuture<'_, Result<Option<ChannelMeta>, StoreError>>;
    /// `channel`'s metadata and stored messages in `range`, from its
    /// partition's leader; `None` when there is no such channel.
    fn remote_read(
        &self,
        channel: ChannelName,
        range: ReadRange,
    ) -> BoxFuture<'_, Result<Option<ChannelSlice>, StoreError>>;
}

/// A channel's metadata and some of its stored messages, as read.
pub type ChannelSlice = (ChannelMeta, Vec<StoredMessage>);

/// Which stored messages of a channel to read: offsets `[from, until)`, at
/// most `max_messages` of them and about `max_bytes` of payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadRange {
    /// The first offset wanted.
    pub from: Offset,
    /// The offset after the last one wanted.
    pub until: Offset,
    /// Messages, at most.
    pub max_messages: usize,
    /// Payload bytes, about (at least one message is returned).
    pub max_bytes: usize,
}

/// A boxed, sendable future.
pub type BoxFuture<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;

/// What the reader threads are asked to read.
#[derive(Debug)]
enum ReadRequest {
    Messages {
        channel: ChannelId,
        from: Offset,
        until: Offset,
        max_messages: usize,
        max_bytes: usize,
        reply: oneshot::Sender<Result<Vec<StoredMessage>, StoreError>>,
    },
    Channel {
        name: ChannelName,
        reply: oneshot::Sender<Result<Option<ChannelMeta>, StoreError>>,
    },
    Scan {
        prefix: String,
        after: Option<ChannelName>,
        limit: usize,
        reply: oneshot::Sender<Result<Vec<(ChannelName, ChannelMeta)>, StoreError>>,
    },
    Aged {
        namespace: String,
        before_ms: u64,
        limit: usize,
        reply: oneshot::Sender<Result<Vec<ChannelName>, StoreError>>,
    },
}

/// The outcome of each append of one submitted batch, in its order.
type BatchReply = oneshot::Sender<Vec<Result<Appended, AppendError>>>;

/// The ack of a submitted append; resolves once the batch holding it was
/// committed (or failed).
#[derive(Debug)]
pub struct PendingAppend(oneshot::Receiver<Result<Appended, AppendError>>);

/// The acks of a submitted batch of appends, in submission order; each
/// resolves once the group commit holding it was written (or failed).
#[derive(Debug)]
pub struct PendingBatch(PendingAcks);

#[derive(Debug)]
enum PendingAcks {
    /// This node's writer answers the whole batch at once.
    Local {
        reply: oneshot::Receiver<Vec<Result<Appended, AppendError>>>,
        appends: usize,
    },
    /// Each append went through its partition's group on its own.
    Replicated(Vec<Result<PendingAppend, AppendError>>),
}

impl PendingBatch {
    /// How many appends the batch holds.
    pub fn len(&self) -> usize {
        match &self.0 {
            PendingAcks::Local { appends, .. } => *appends,
            PendingAcks::Replicated(each) => each.len(),
        }
    }

    /// `appends` appends the log could not queue (it is closing).
    fn refused(appends: usize) -> Self {
        Self(PendingAcks::Replicated(
            (0..appends)
                .map(|_| Err(AppendError::ShuttingDown))
                .collect(),
        ))
    }

    /// Whether the batch holds no append.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every append's outcome, in submission order.
    pub async fn outcomes(self) -> Vec<Result<Appended, AppendError>> {
        match self.0 {
            PendingAcks::Local { reply, appends } => match reply.await {
                Ok(outcomes) => outcomes,
                Err(_) => vec![Err(AppendError::ShuttingDown); appends],
            },
            PendingAcks::Replicated(each) => {
                let mut outcomes = Vec::with_capacity(each.len());
                for pending in each {
                    outcomes.push(match pending {
                        Ok(pending) => pending.await,
                        Err(e) => Err(e),
                    });
                }
                outcomes
            }
        }
    }
}

impl PendingAppend {
    /// The ack `reply` will send.
    pub fn new(reply: oneshot::Receiver<Result<Appended, AppendError>>) -> Self {
        Self(reply)
    }
}

impl std::future::IntoFuture for PendingAppend {
    type Output = Result<Appended, AppendError>;
    type IntoFuture = std::pin::Pin<Box<dyn std::future::Future<Output = Self::Output> + Send>>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(async move { self.0.await.unwrap_or(Err(AppendError::ShuttingDown)) })
    }
}

/// A cheap, cloneable handle to the log.
#[derive(Debug, Clone)]
pub struct Log {
    commands: AsyncSender<Command>,
    reads: AsyncSender<ReadRequest>,
    directory: Arc<Directory>,
    closed: Arc<AtomicBool>,
    /// The store generation of this run (see `ChannelMeta::in_generation`).
    generation: u64,
    /// A cluster node's partition groups, set once the node is up.
    replication: Arc<std::sync::OnceLock<Arc<dyn Replication>>>,
    /// The partitions being restored from a snapshot (cluster).
    restores: Arc<Restores>,
    /// See [`Log::replica_corrections`].
    replica_corrections: Arc<std::sync::atomic::AtomicU64>,
}

/// Which log holds which channel: the durable (RocksDB) log, and, when
/// namespaces are configured with `persistent = false`, an in-memory log
/// for theirs. The two share the fan-out engine and the whole publish and
/// subscribe path; only where records are kept differs.
#[derive(Debug, Clone)]
pub struct Logs {
    durable: Log,
    ephemeral: Option<(Log, Arc<std::collections::HashSet<String>>)>,
}

impl Logs {
    /// Only a durable log.
    pub fn durable_only(durable: Log) -> Self {
        Self {
            durable,
            ephemeral: None,
        }
    }

    /// A durable log, and `ephemeral` for the channels of `namespaces`.
    pub fn with_ephemeral(
        durable: Log,
        ephemeral: Log,
        namespaces: std::collections::HashSet<String>,
    ) -> Self {
        Self {
            durable,
            ephemeral: Some((ephemeral, Arc::new(namespaces))),
        }
    }

    /// The durable log.
    pub fn durable(&self) -> &Log {
        &self.durable
    }

    /// The log `channel` belongs to.
    pub fn for_channel(&self, channel: &ChannelName) -> &Log {
        match &self.ephemeral {
            Some((log, namespaces)) if namespaces.contains(channel.namespace()) => log,
            _ => &self.durable,
        }
    }

    /// The in-memory log, when namespaces use one.
    pub fn ephemeral(&self) -> Option<&Log> {
        self.ephemeral.as_ref().map(|(log, _)| log)
    }

    /// Whether `channel` is kept in memory only.
    pub fn is_ephemeral(&self, channel: &ChannelName) -> bool {
        self.ephemeral
            .as_ref()
            .is_some_and(|(_, namespaces)| namespaces.contains(channel.namespace()))
    }

    /// Every log.
    pub fn all(&self) -> impl Iterator<Item = &Log> {
        std::iter::once(&self.durable).chain(self.ephemeral.as_ref().map(|(log, _)| log))
    }
}

/// The log's threads; [`LogThreads::shutdown`] drains and stops them.
#[derive(Debug)]
pub struct LogThreads {
    log: Log,
    store: Arc<dyn LogStore>,
    writer: Option<JoinHandle<()>>,
    readers: Vec<JoinHandle<()>>,
}

/// Starts the writer and reader threads over `store`.
pub fn start(
    store: Arc<dyn LogStore>,
    listener: Arc<dyn CommitListener>,
    durability: Durability,
    engine: &EngineConfig,
    metrics: Arc<Metrics>,
) -> Result<LogThreads, StoreError> {
    start_with(store, listener, durability, engine, metrics, false)
}

/// Starts the log of a cluster node: its channels belong to replicated
/// partitions, whose Raft logs (not the store's clean-stop mark) say what
/// was committed, so an unclean stop does not move channels to new epochs:
/// a replica re-applies what it missed and keeps the epochs every other
/// replica has.
pub fn start_replicated(
    store: Arc<dyn LogStore>,
    listener: Arc<dyn CommitListener>,
    durability: Durability,
    engine: &EngineConfig,
    metrics: Arc<Metrics>,
) -> Result<LogThreads, StoreError> {
    start_with(store, listener, durability, engine, metrics, true)
}

fn start_with(
    store: Arc<dyn LogStore>,
    listener: Arc<dyn CommitListener>,
    durability: Durability,
    engine: &EngineConfig,
    metrics: Arc<Metrics>,
    replicated: bool,
) -> Result<LogThreads, StoreError> {
    let mut recovered = store.recover()?;
    if !recovered.clean_stop && !recovered.lost_power {
        info!(
            "the previous run did not stop cleanly, but the machine kept running: every \
             write it made is in the store, and channels keep their epochs"
        );
    }
    if recovered.lost_power && durability == Durability::Wal && !replicated {
        // The WAL was not synced per write: a power loss may have taken
        // acknowledged messages, whose offsets the log would now reuse.
        recovered.generation += 1;
        let set = WriteSet {
            generation: Some(recovered.generation),
            ..WriteSet::default()
        };
        store.write(&set, true)?;
        warn!(
            generation = recovered.generation,
            "the previous run did not stop cleanly and the machine restarted since (or the \
             store cannot tell) with durability \"wal\": its last acknowledged writes may be \
             lost, so channels take a new epoch when next used"
        );
    }
    // Only now: a crash before the new generation was written must find
    // the previous boot's mark again.
    if !recovered.clean_stop {
        store.mark_running()?;
    }
    info!(
        next_channel_id = recovered.next_channel_id,
        generation = recovered.generation,
        clean_stop = recovered.clean_stop,
        "opened the channel log"
    );
    let generation = recovered.generation;
    let sequencer = Sequencer::new(recovered, ProducerLimits::from_config(engine));
    let directory: Arc<Directory> = Arc::new(Directory::new());
    let queue_bytes = u32::try_from(engine.writer_queue_bytes).unwrap_or(u32::MAX);
    let (commands, command_rx) = queue::bounded_with_bytes(engine.writer_queue, queue_bytes);
    let (reads, read_rx) = queue::bounded(engine.reader_threads * 64);
    let closed = Arc::new(AtomicBool::new(false));
    let restores = Arc::new(Restores::default());
    let clocks = store.partition_clocks().unwrap_or_default();
    clocks.set_partitioned(replicated);
    let writer = Writer {
        restoring: HashMap::new(),
        restores: restores.clone(),
        metrics,
        generation,
        closed: closed.clone(),
        store: store.clone(),
        listener,
        directory: directory.clone(),
        sequencer,
        clocks,
        sync: durability == Durability::Fsync,
        max_batch_messages: engine.max_batch_messages,
        max_batch_bytes: engine.max_batch_bytes,
    };
    let writer = std::thread::Builder::new()
        .name("volna-log-writer".into())
        .spawn(move || writer.run(command_rx))
        .map_err(|e| StoreError::Engine(format!("cannot start the writer thread: {e}")))?;
    let mut readers = Vec::new();
    for i in 0..engine.reader_threads {
        let store = store.clone();
        let rx = read_rx.clone();
        let closed = closed.clone();
        readers.push(
            std::thread::Builder::new()
                .name(format!("volna-log-reader-{i}"))
                .spawn(move || run_reader(store, rx, &closed))
                .map_err(|e| StoreError::Engine(format!("cannot start a reader thread: {e}")))?,
        );
    }
    Ok(LogThreads {
        store,
        log: Log {
            commands,
            reads,
            directory,
            closed,
            generation,
            replication: Arc::default(),
            restores,
            replica_corrections: Arc::default(),
        },
        writer: Some(writer),
        readers,
    })
}

impl LogThreads {
    /// A handle for sessions and background tasks.
    pub fn log(&self) -> &Log {
        &self.log
    }

    /// Stops taking appends, lets the writer commit everything already
    /// queued, syncs the WAL, joins the threads and marks the store as
    /// cleanly stopped. Blocks: call it from a blocking context.
    pub fn shutdown(mut self) {
        self.log.closed.store(true, Ordering::SeqCst);
        self.log.commands.close();
        self.log.reads.close();
        // The threads drain what is queued, then see `closed` and exit, even
        // while sessions that are still closing hold senders.
        drop(self.log);
        let mut clean = true;
        if let Some(writer) = self.writer.take()
            && writer.join().is_err()
        {
            error!("the log writer thread panicked");
            clean = false;
        }
        for reader in self.readers.drain(..) {
            if reader.join().is_err() {
                error!("a log reader thread panicked");
            }
        }
        if let Err(e) = self.store.flush() {
            error!(error = %e, "final WAL sync failed");
            clean = false;
        }
        if clean && let Err(e) = self.store.mark_clean_stop() {
            error!(error = %e, "cannot mark the store as cleanly stopped");
        }
    }
}

impl Log {
    /// Appends one message; resolves once it is durable (G2).
    pub async fn append(&self, input: AppendInput) -> Result<Appended, AppendError> {
        let outcome = self.submit_batch(vec![input]).await.outcomes().await.pop();
        outcome.unwrap_or(Err(AppendError::ShuttingDown))
    }

    /// Queues appends as one batch, waiting only for room in the writer's
    /// queue, and returns their pending acks. They are sequenced in their
    /// order, after every batch submitted before. An append that could not
    /// be queued (the log is closing) gets its error in the outcomes.
    pub async fn submit_batch(&self, inputs: Vec<AppendInput>) -> PendingBatch {
        if self.closed.load(Ordering::SeqCst) {
            return PendingBatch::refused(inputs.len());
        }
        if let Some(replication) = self.replication.get() {
            let mut each = Vec::with_capacity(inputs.len());
            for input in inputs {
                each.push(replication.submit(input).await);
            }
            return PendingBatch(PendingAcks::Replicated(each));
        }
        self.submit_batch_here(inputs).await
    }

    /// Whether this node decides `channel`'s retention: always on a single
    /// node; on a cluster node only where it leads the channel's partition.
    pub fn decides_retention(&self, channel: &ChannelName) -> bool {
        self.replication
            .get()
            .is_none_or(|replication| replication.decides_retention(channel))
    }

    /// Asks the writer to apply a retention cut. Skipped (false) when the
    /// writer is busy: the next round computes it again.
    pub fn trim(&self, trim: Trim) -> bool {
        if let Some(replication) = self.replication.get() {
            return replication.trim(trim);
        }
        self.commands.try_send(Command::Trim(trim)).is_ok()
    }

    /// Removes `channel` and its whole log; resolves with its last
    /// metadata, or `None` when there was no such channel. Its subscribers
    /// are ended with `ChannelDeleted`; a later publish creates it anew,
    /// under a new epoch.
    pub async fn delete(&self, channel: ChannelName) -> Result<Option<ChannelMeta>, AppendError> {
        if self.closed.load(Ordering::SeqCst) {
            return Err(AppendError::ShuttingDown);
        }
        if let Some(replication) = self.replication.get() {
            return replication.delete(channel).await;
        }
        self.delete_in_store(channel, false).await
    }

    /// Has the writer delete `channel` from this node's store, telling its
    /// subscribers unless `quietly`.
    async fn delete_in_store(
        &self,
        channel: ChannelName,
        quietly: bool,
    ) -> Result<Option<ChannelMeta>, AppendError> {
        let (reply, rx) = oneshot::channel();
        self.commands
            .send(Command::Delete {
                channel,
                reply,
                quietly,
            })
            .await
            .map_err(|_| AppendError::ShuttingDown)?;
        rx.await.unwrap_or(Err(AppendError::ShuttingDown))
    }

    /// Removes `channel` and its log from this node's store, whatever the
    /// log replicates through, without telling its subscribers: a
    /// cluster's in-memory channel that this node kept as an earlier
    /// leader of its partition. Its subscribers are told of the channel's
    /// next epoch when it comes (`EpochChanged`), not of an end.
    pub async fn forget(&self, channel: ChannelName) -> Result<(), AppendError> {
        self.delete_in_store(channel, true).await.map(|_| ())
    }

    /// Deletes `channel` from this node's store, whatever the log
    /// replicates through (a cluster's in-memory channel, on its
    /// partition's leader).
    pub async fn delete_here(
        &self,
        channel: ChannelName,
    ) -> Result<Option<ChannelMeta>, AppendError> {
        self.delete_in_store(channel, false).await
    }

    /// Queues appends to this node's store, whatever the log replicates
    /// through (a cluster's in-memory channels, on their partition's
    /// leader); as [`Log::submit_batch`] otherwise.
    pub async fn submit_batch_here(&self, inputs: Vec<AppendInput>) -> PendingBatch {
        let appends = inputs.len();
        if !self.closed.load(Ordering::SeqCst) {
            let (reply, rx) = oneshot::channel();
            let bytes = inputs.iter().map(|input| input.payload.len()).sum();
            let queued = self
                .commands
                .send_sized(Command::Append { inputs, reply }, bytes)
                .await;
            if queued.is_ok() {
                return PendingBatch(PendingAcks::Local { reply: rx, appends });
            }
        }
        PendingBatch::refused(appends)
    }

    /// Applies a retention cut to this node's store, whatever the log
    /// replicates through; false when the writer is busy.
    pub fn trim_here(&self, trim: Trim) -> bool {
        self.commands.try_send(Command::Trim(trim)).is_ok()
    }

    /// The last sequence the log stored for `key` and still remembers (0:
    /// none), answered after every append queued before the question: a
    /// producer restarted under the same id continues after it (protocol
    /// 4's `InitProducer`). A cluster node answers `Unsupported`: its
    /// windows live in each partition's group (the client then takes a
    /// fresh producer id, as before protocol 4).
    pub async fn last_sequence(&self, key: ProducerKey) -> Result<u64, AppendError> {
        if self.closed.load(Ordering::SeqCst) {
            return Err(AppendError::ShuttingDown);
        }
        if self.replication.get().is_some() {
            return Err(AppendError::Refused {
                code: ErrorCode::Unsupported,
                message: "a cluster node does not tell where a producer's sequences stand; \
                          publish under a fresh producer id"
                    .into(),
            });
        }
        let (reply, rx) = oneshot::channel();
        self.commands
            .send(Command::LastSequence { key, reply })
            .await
            .map_err(|_| AppendError::ShuttingDown)?;
        match rx.await {
            Ok(answer) => answer.map_err(|e| AppendError::Storage(e.to_string())),
            Err(_) => Err(AppendError::ShuttingDown),
        }
    }

    /// Whether `other` is a handle to this same log.
    pub fn is(&self, other: &Log) -> bool {
        Arc::ptr_eq(&self.closed, &other.closed)
    }

    /// Routes appends, deletes and trims through a cluster's partition
    /// groups from now on (set once, when the node has joined).
    pub fn replicate_through(&self, replication: Arc<dyn Replication>) {
        let _ = self.replication.set(replication);
    }

    /// Applies a committed entry of a replicated partition; resolves once
    /// it is written (with the partition's applied state).
    pub async fn apply_replicated(
        &self,
        batch: Replicated,
    ) -> Result<ReplicatedOutcome, AppendError> {
        let (reply, rx) = oneshot::channel();
        let bytes = batch.appends.iter().map(|a| a.payload.len()).sum();
        self.commands
            .send_sized(Command::Replicated { batch, reply }, bytes)
            .await
            .map_err(|_| AppendError::ShuttingDown)?;
        rx.await.unwrap_or(Err(AppendError::ShuttingDown))
    }

    /// A digest of replicated partition `partition` (its channels and
    /// windows as `scope` selects them), with its applied state, taken
    /// between two entries: replicas at the same applied entry must give
    /// the same digest.
    pub async fn partition_digest(
        &self,
        partition: u32,
        scope: RestoreScope,
    ) -> Result<PartitionDigest, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.commands
            .send_sized(
                Command::Digest {
                    partition,
                    scope,
                    reply,
                },
                0,
            )
            .await
            .map_err(|_| StoreError::Engine("the log is closed".into()))?;
        rx.await
            .unwrap_or_else(|_| Err(StoreError::Engine("the digest was abandoned".into())))
    }

    /// Runs one step of restoring replicated `partition` from a snapshot;
    /// resolves once it is written. The steps of one restore are sent in
    /// order, one after the other ([`Restore`]).
    pub async fn restore(&self, partition: u32, step: Restore) -> Result<(), AppendError> {
        let (reply, rx) = oneshot::channel();
        let bytes = step.payload_bytes();
        self.commands
            .send_sized(
                Command::Restore {
                    partition,
                    step,
                    reply,
                },
                bytes,
            )
            .await
            .map_err(|_| AppendError::ShuttingDown)?;
        rx.await.unwrap_or(Err(AppendError::ShuttingDown))
    }

    /// Reads stored messages `[from, until)` on a reader thread.
    pub async fn read(
        &self,
        channel: ChannelId,
        from: Offset,
        until: Offset,
        max_messages: usize,
        max_bytes: usize,
    ) -> Result<Vec<StoredMessage>, StoreError> {
        self.ask_reader(|reply| ReadRequest::Messages {
            channel,
            from,
            until,
            max_messages,
            max_bytes,
            reply,
        })
        .await
    }

    /// `channel`'s metadata and its stored messages in `range`, wherever
    /// they are kept: this node's store, or (a cluster node that does not
    /// replicate the channel's partition) the partition's leader. `None`:
    /// no such channel.
    pub async fn read_channel(
        &self,
        channel: &ChannelName,
        range: ReadRange,
    ) -> Result<Option<ChannelSlice>, StoreError> {
        for _ in 0..READ_AGAIN {
            // Read before `remote` looks: a restore that begins after it
            // looked changes this count (see `Restores::begin`).
            let restores = self.restores.changes();
            if let Some(replication) = self.remote(channel) {
                return replication.remote_read(channel.clone(), range).await;
            }
            let Some(meta) = self.lookup_here(channel).await? else {
                if self.restores.changes() == restores {
                    return Ok(None);
                }
                continue;
            };
            let messages = self
                .read(
                    meta.id,
                    range.from,
                    range.until,
                    range.max_messages,
                    range.max_bytes,
                )
                .await?;
            if self.restores.changes() == restores {
                return Ok(Some((meta, messages)));
            }
            // A restore began or ended between the metadata and the
            // messages: the two may be of different states.
        }
        Err(StoreError::Engine(format!(
            "{channel}'s partition kept being restored during the read"
        )))
    }

    /// Whether this log belongs to a cluster node.
    pub fn is_replicated(&self) -> bool {
        self.replication.get().is_some()
    }

    /// Where `channel` is read from when it is not this node's store: its
    /// partition's leader, when this node is an edge for the partition or
    /// is restoring it from a snapshot.
    fn remote(&self, channel: &ChannelName) -> Option<&Arc<dyn Replication>> {
        self.replication.get().filter(|replication| {
            replication.reads_remotely(channel)
                || self.restores.is_restoring(replication.partition(channel))
        })
    }

    /// `channel`'s metadata for a device that subscribes to it: this
    /// node's, unless this node is a replica that does not lead the
    /// channel's partition and its answer is `doubtful` (the channel is
    /// unknown here, or it would tell the device of a reset or a
    /// truncation): a lagging replica may simply not have applied what
    /// the device already saw elsewhere, so the partition's leader
    /// answers instead. Reads of the messages then wait for this replica
    /// to apply them (G3: no event the leader would not send).
    pub async fn lookup_to_subscribe(
        &self,
        channel: &ChannelName,
        doubtful: impl FnOnce(Option<&ChannelMeta>) -> bool,
    ) -> Result<Option<ChannelMeta>, StoreError> {
        let here = self.lookup(channel).await?;
        let Some(replication) = self.replication.get() else {
            return Ok(here);
        };
        if self.remote(channel).is_some() || replication.leads(channel) || !doubtful(here.as_ref())
        {
            return Ok(here);
        }
        let leader = replication.remote_lookup(channel.clone()).await?;
        if leader.map(|m| (m.epoch, m.first_offset)) != here.map(|m| (m.epoch, m.first_offset)) {
            self.replica_corrections.fetch_add(1, Ordering::Relaxed);
        }
        Ok(leader)
    }

    /// How many subscribes this node started from its partition leader's
    /// view of a channel because its own differed (it lagged or was
    /// restoring).
    pub fn replica_corrections(&self) -> u64 {
        self.replica_corrections.load(Ordering::Relaxed)
    }

    /// A channel's committed metadata: from memory when it is resident,
    /// else read from the store on a reader thread (or, for a channel this
    /// cluster node does not replicate, from its partition's leader).
    /// `None`: no such channel.
    pub async fn lookup(&self, channel: &ChannelName) -> Result<Option<ChannelMeta>, StoreError> {
        for _ in 0..READ_AGAIN {
            let restores = self.restores.changes();
            if let Some(replication) = self.remote(channel) {
                return replication.remote_lookup(channel.clone()).await;
            }
            let here = self.lookup_here(channel).await?;
            if self.restores.changes() == restores {
                return Ok(here);
            }
        }
        Err(StoreError::Engine(format!(
            "{channel}'s partition kept being restored during the lookup"
        )))
    }

    /// `channel`'s metadata in this node's store.
    async fn lookup_here(&self, channel: &ChannelName) -> Result<Option<ChannelMeta>, StoreError> {
        if let Some(meta) = self.meta(channel) {
            return Ok(Some(meta));
        }
        let name = channel.clone();
        let stored = self
            .ask_reader(|reply| ReadRequest::Channel { name, reply })
            .await?;
        Ok(stored.map(|m| m.in_generation(self.generation)))
    }

    /// Up to `limit` channels whose name starts with `prefix`, in name
    /// order, after `after` when given (read from the store).
    pub async fn scan_channels(
        &self,
        prefix: &str,
        after: Option<ChannelName>,
        limit: usize,
    ) -> Result<Vec<(ChannelName, ChannelMeta)>, StoreError> {
        let prefix = prefix.to_owned();
        let found = self
            .ask_reader(|reply| ReadRequest::Scan {
                prefix,
                after,
                limit,
                reply,
            })
            .await?;
        Ok(found
            .into_iter()
            .map(|(name, meta)| {
                // The resident copy is at least as new as the stored one.
                let meta = self
                    .meta(&name)
                    .unwrap_or_else(|| meta.in_generation(self.generation));
                (name, meta)
            })
            .collect())
    }

    /// Up to `limit` channels of `namespace` whose oldest message was
    /// stored before `before_ms`, oldest first.
    pub async fn aged_channels(
        &self,
        namespace: &str,
        before_ms: u64,
        limit: usize,
    ) -> Result<Vec<ChannelName>, StoreError> {
        let namespace = namespace.to_owned();
        self.ask_reader(|reply| ReadRequest::Aged {
            namespace,
            before_ms,
            limit,
            reply,
        })
        .await
    }

    async fn ask_reader<T>(
        &self,
        request: impl FnOnce(oneshot::Sender<Result<T, StoreError>>) -> ReadRequest,
    ) -> Result<T, StoreError> {
        let (reply, rx) = oneshot::channel();
        let closed = || StoreError::Engine("the log is shutting down".into());
        self.reads
            .send(request(reply))
            .await
            .map_err(|_| closed())?;
        rx.await.map_err(|_| closed())?
    }

    /// A resident channel's committed metadata (no store read): `None`
    /// when the channel does not exist or is not resident; see
    /// [`Log::lookup`].
    pub fn meta(&self, channel: &ChannelName) -> Option<ChannelMeta> {
        self.directory.get(channel).map(|m| *m)
    }

    /// The resident channels' committed metadata.
    pub fn directory(&self) -> &Directory {
        &self.directory
    }

    /// Whether the log takes appends.
    pub fn is_open(&self) -> bool {
        !self.closed.load(Ordering::SeqCst)
    }
}

struct Writer {
    /// The partitions being restored from a snapshot, between their
    /// `Begin` and `Finish` steps.
    restoring: HashMap<u32, restore::Restoring>,
    /// The same, for readers.
    restores: Arc<Restores>,
    metrics: Arc<Metrics>,
    generation: u64,
    closed: Arc<AtomicBool>,
    store: Arc<dyn LogStore>,
    listener: Arc<dyn CommitListener>,
    directory: Arc<Directory>,
    sequencer: Sequencer,
    /// Each replicated partition's time, advanced by its applied entries:
    /// its producer windows are judged idle by it (shared with the store's
    /// compaction filter).
    clocks: Arc<PartitionClocks>,
    sync: bool,
    max_batch_messages: usize,
    max_batch_bytes: usize,
}

impl Writer {
    fn run(mut self, rx: Receiver<Queued<Command>>) {
        let mut healthy = true;
        let mut last_sweep = Instant::now();
        loop {
            // Wakes up now and then even when idle, to notice `closed` and
            // to forget idle producers.
            let first = match rx.recv_timeout(Duration::from_millis(50)) {
                Ok(item) => Some(item),
                Err(RecvTimeoutError::Timeout) if self.closed.load(Ordering::SeqCst) => break,
                Err(RecvTimeoutError::Timeout) => None,
                Err(RecvTimeoutError::Disconnected) => break,
            };
            let mut expired = Vec::new();
            if last_sweep.elapsed() >= PRODUCER_SWEEP_INTERVAL
                || self.sequencer.producers().over_capacity()
            {
                last_sweep = Instant::now();
                expired = self.sweep_producers();
            }
            // Group commit: everything already queued, up to the batch
            // limits, goes into one WriteBatch and one (optional) fsync.
            let mut batch = Batch {
                expired_producers: expired,
                ..Batch::default()
            };
            let mut bytes = 0usize;
            let mut replicated = None;
            let mut restore = None;
            let mut asked = None;
            let mut next = first;
            while let Some(queued) = next.take() {
                match queued.item {
                    Command::Append { inputs, reply } => {
                        bytes += inputs.iter().map(|i| i.payload.len()).sum::<usize>();
                        batch.replies.push((reply, inputs.len()));
                        batch.appends.extend(inputs);
                    }
                    Command::Trim(trim) => batch.trims.push(trim),
                    Command::Delete {
                        channel,
                        reply,
                        quietly,
                    } => {
                        // Ends the batch: what follows it starts afresh.
                        batch.delete = Some((channel, reply));
                        batch.quietly = quietly;
                        break;
                    }
                    Command::Replicated { batch, reply } => {
                        replicated = Some((batch, reply));
                        break;
                    }
                    Command::Restore {
                        partition,
                        step,
                        reply,
                    } => {
                        restore = Some((partition, step, reply));
                        break;
                    }
                    Command::LastSequence { key, reply } => {
                        asked = Some(Question::LastSequence(key, reply));
                        break;
                    }
                    Command::Digest {
                        partition,
                        scope,
                        reply,
                    } => {
                        asked = Some(Question::Digest(partition, scope, reply));
                        break;
                    }
                }
                if batch.appends.len() < self.max_batch_messages && bytes < self.max_batch_bytes {
                    next = rx.try_recv().ok();
                }
            }
            if batch.is_empty() && replicated.is_none() && restore.is_none() {
                if let Some(question) = asked {
                    self.answer(question);
                }
                continue;
            }
            // After a failed write the store refuses writes until it is
            // found healthy again; probe once per batch, not per publish.
            if !healthy && self.store.check_health().is_ok() {
                info!("the store accepts writes again");
            }
            if !batch.is_empty() {
                healthy = self.commit(batch);
            }
            if let Some((entry, reply)) = replicated {
                healthy = self.apply(entry, reply);
            }
            if let Some((partition, step, reply)) = restore {
                let restored = self.restore(partition, step);
                healthy = restored.is_ok();
                let _ = reply.send(restored.map_err(|e| AppendError::Storage(e.to_string())));
            }
            if let Some(question) = asked {
                self.answer(question);
            }
            if self.sequencer.channels().over_capacity() {
                for name in self.sequencer.channels_mut().evict() {
                    self.directory.remove(&name);
                }
            }
        }
        info!("log writer stopped");
    }

    fn answer(&self, question: Question) {
        match question {
            Question::LastSequence(key, reply) => {
                let _ = reply.send(self.last_sequence(&key));
            }
            Question::Digest(partition, scope, reply) => self.digest(partition, scope, reply),
        }
    }

    /// Digests `partition` as it stands now, between two writes: the
    /// applied state is read here and the export's point in time is fixed
    /// before the writer goes on; the export itself runs on its own
    /// thread.
    fn digest(
        &self,
        partition: u32,
        scope: RestoreScope,
        reply: oneshot::Sender<Result<PartitionDigest, StoreError>>,
    ) {
        if self.restoring.contains_key(&partition) {
            // Half of a snapshot is no state to compare.
            let _ = reply.send(Err(StoreError::Engine(format!(
                "partition {partition} is being restored from a snapshot; digest it once done"
            ))));
            return;
        }
        let applied = match self.store.load_applied(partition) {
            Ok(applied) => applied,
            Err(e) => {
                let _ = reply.send(Err(e));
                return;
            }
        };
        let store = self.store.clone();
        let live_at = self
            .clocks
            .get(partition)
            .map(|now| (now, self.sequencer.limits().idle_ms));
        let (fixed_tx, fixed_rx) = std::sync::mpsc::sync_channel::<()>(1);
        let spawned = std::thread::Builder::new()
            .name("volna-digest".into())
            .spawn(move || {
                let mut digester = Digester::new(live_at);
                let mut fixed_tx = Some(fixed_tx);
                let exported = store.export(
                    &ExportScope {
                        channel: &*scope.channel,
                        producer: &*scope.producer,
                        devices: scope
                            .devices
                            .as_ref()
                            .map(|(from, until)| (from.as_slice(), until.as_slice())),
                    },
                    &mut || {
                        if let Some(tx) = fixed_tx.take() {
                            let _ = tx.send(());
                        }
                    },
                    &mut |item| digester.take(item),
                );
                let _ = reply.send(exported.map(|()| PartitionDigest {
                    applied,
                    state: digester.finish(),
                }));
            });
        if spawned.is_ok() {
            // Until the export holds its point in time (or failed before).
            let _ = fixed_rx.recv();
        }
    }

    /// The last sequence stored for `key` that its window remembers (0:
    /// no live window), from memory or the store.
    fn last_sequence(&self, key: &ProducerKey) -> Result<u64, StoreError> {
        if let Some(window) = self.sequencer.producers().get(key) {
            return Ok(window.last_sequence());
        }
        let now = self.clocks.now_for(key).unwrap_or(0);
        Ok(match self.store.load_producer(key)? {
            Some(window) if self.sequencer.producers().is_live(&window, now) => {
                window.last_sequence()
            }
            _ => 0,
        })
    }

    /// Forgets idle producer windows (returned: their point deletes go
    /// into the next write) and unloads the least recently used above the
    /// resident cap. A partition's windows are idle by the partition's
    /// time: deleting one its other replicas still hold would make this
    /// replica decide differently.
    fn sweep_producers(&mut self) -> Vec<ProducerKey> {
        let clocks = self.clocks.clone();
        let swept = self
            .sequencer
            .producers_mut()
            .sweep(|key| clocks.now_for(key));
        self.metrics
            .producers_expired
            .inc_by(swept.expired.len() as u64);
        self.metrics
            .producer_windows
            .set(self.sequencer.producers().len() as i64);
        swept.expired
    }

    /// Makes every channel and producer window the batch names resident,
    /// reading the ones not in memory from the store: both are loaded on
    /// use, not at start (G9). An owner limited in its windows that starts
    /// a new one is loaded whole, so that its windows are counted from
    /// the store. Windows are judged live at `now` (the batch's time).
    fn load<'a>(
        &mut self,
        appends: &'a [AppendInput],
        trims: &'a [Trim],
        deletes: impl Iterator<Item = &'a ChannelName>,
        now: u64,
    ) -> Result<(), StoreError> {
        let channels = appends
            .iter()
            .map(|a| &a.channel)
            .chain(trims.iter().map(|t| &t.channel))
            .chain(deletes);
        for name in channels {
            if self.sequencer.channels().contains(name) {
                continue;
            }
            if let Some(meta) = self.store.load_channel(name)? {
                let meta = meta.in_generation(self.generation);
                self.sequencer.channels_mut().put(name.clone(), meta);
            }
        }
        for producer in appends.iter().filter_map(|a| a.producer.as_ref()) {
            let producers = self.sequencer.producers();
            if producers.live(&producer.key, now).is_some() {
                continue;
            }
            if producer.limited && !producers.is_complete(&producer.key.owner) {
                let windows = self.store.owner_producers(&producer.key.owner)?;
                self.sequencer
                    .producers_mut()
                    .put_owner(producer.key.owner.clone(), windows);
                continue;
            }
            if producers.contains(&producer.key) {
                // Resident and idle: the store holds nothing newer.
                continue;
            }
            if let Some(window) = self.store.load_producer(&producer.key)?
                && producers.is_live(&window, now)
            {
                self.sequencer
                    .producers_mut()
                    .put(producer.key.clone(), window);
            }
        }
        Ok(())
    }

    fn commit(&mut self, batch: Batch) -> bool {
        let now = now_ms();
        if let Err(e) = self.load(
            &batch.appends,
            &batch.trims,
            batch.delete.iter().map(|(name, _)| name),
            now,
        ) {
            warn!(error = %e, messages = batch.appends.len(), "cannot read channels or producer windows; nothing was acknowledged");
            batch.fail(&e.to_string());
            return false;
        }
        let Batch {
            appends,
            replies,
            trims,
            delete,
            quietly,
            expired_producers,
        } = batch;
        let (deleting, delete_reply) = delete.unzip();
        let mut prepared =
            self.sequencer
                .prepare(&appends, trims, deleting.clone(), now, &mut || {
                    Epoch(rand::random())
                });
        // A producer that expired and published again in this very batch
        // has a new window: it must not be deleted after being written.
        prepared.set.expired_producers.extend(
            expired_producers
                .into_iter()
                .filter(|key| !prepared.producers.contains_key(key)),
        );
        if let Err(e) = self.write(&mut prepared, appends.len(), !quietly) {
            warn!(error = %e, messages = appends.len(), "group commit failed; nothing was acknowledged");
            Batch {
                replies,
                delete: deleting.zip(delete_reply),
                ..Batch::default()
            }
            .fail(&e.to_string());
            return false;
        }
        let mut outcomes = std::mem::take(&mut prepared.outcomes)
            .into_iter()
            .map(|outcome| match outcome {
                Outcome::Stored(appended) => Ok(appended),
                Outcome::Refused(e) => Err(e),
            });
        for (reply, appends) in replies {
            let _ = reply.send(outcomes.by_ref().take(appends).collect());
        }
        if let (Some(reply), Some((_, meta))) = (delete_reply, prepared.deleted.pop()) {
            let _ = reply.send(Ok(meta));
        }
        true
    }

    /// Applies a replicated partition's committed entry with the leader's
    /// clock and epoch seed, and its applied state in the same write.
    fn apply(
        &mut self,
        entry: Replicated,
        reply: oneshot::Sender<Result<ReplicatedOutcome, AppendError>>,
    ) -> bool {
        let Replicated {
            partition,
            applied,
            now_ms,
            epoch_seed,
            appends,
            trims,
            deletes,
            devices,
        } = entry;
        // Everything this entry decides is judged at its time.
        self.clocks.advance(partition, now_ms);
        if let Err(e) = self.load(&appends, &trims, deletes.iter(), now_ms) {
            warn!(error = %e, partition, "cannot read channels or producer windows to apply a replicated entry");
            let _ = reply.send(Err(AppendError::Storage(e.to_string())));
            return false;
        }
        let mut seed = epoch_seed;
        let mut prepared = self
            .sequencer
            .prepare(&appends, trims, deletes, now_ms, &mut || {
                Epoch(splitmix64(&mut seed))
            });
        prepared.set.applied.push((partition, applied));
        prepared.set.devices = devices;
        if let Err(e) = self.write(&mut prepared, appends.len(), true) {
            warn!(error = %e, partition, "cannot write a replicated entry");
            let _ = reply.send(Err(AppendError::Storage(e.to_string())));
            return false;
        }
        let _ = reply.send(Ok(ReplicatedOutcome {
            outcomes: prepared.outcomes,
            deleted: prepared.deleted,
        }));
        true
    }

    /// Writes a prepared batch and, once it is stored, makes it the
    /// sequencer's state, publishes the channels' metadata and tells the
    /// listeners (fan-out), deleted channels included unless not
    /// `announced`.
    fn write(
        &mut self,
        prepared: &mut Prepared,
        messages: usize,
        announced: bool,
    ) -> Result<(), StoreError> {
        let started = std::time::Instant::now();
        let result = if prepared.set.is_empty() {
            Ok(())
        } else {
            self.store.write(&prepared.set, self.sync)
        };
        self.metrics
            .wal_write_seconds
            .observe(started.elapsed().as_secs_f64());
        self.metrics.group_commit_messages.observe(messages as f64);
        result?;
        let deleted: u64 = prepared
            .set
            .deletions
            .iter()
            .map(|(_, from, to)| from.distance_to(*to))
            .sum();
        self.metrics.retention_deleted.inc_by(deleted);
        self.metrics
            .retention_stale_trims
            .inc_by(prepared.stale_trims);
        self.sequencer.commit(prepared);
        self.metrics
            .producer_windows
            .set(self.sequencer.producers().len() as i64);
        for (name, meta) in &prepared.set.channels {
            self.directory.insert(name.clone(), *meta);
        }
        for (name, meta, messages) in &prepared.by_channel {
            self.listener.committed(name, meta, messages);
        }
        for (name, meta) in &prepared.deleted {
            self.directory.remove(name);
            if meta.is_some() && announced {
                info!(channel = %name, "channel deleted");
                self.metrics.channels_deleted.inc();
                self.listener.deleted(name);
            }
        }
        Ok(())
    }
}

/// The next value of a splitmix64 sequence: well-spread epochs from a seed
/// every replica shares.
fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// One group commit's worth of commands.
#[derive(Default)]
struct Batch {
    appends: Vec<AppendInput>,
    /// Who submitted the appends, in order, and how many each did.
    replies: Vec<(BatchReply, usize)>,
    trims: Vec<Trim>,
    delete: Option<(ChannelName, DeleteReply)>,
    /// The delete is not announced to the listener ([`Log::forget`]).
    quietly: bool,
    expired_producers: Vec<ProducerKey>,
}

type DeleteReply = oneshot::Sender<Result<Option<ChannelMeta>, AppendError>>;

impl Batch {
    fn is_empty(&self) -> bool {
        self.appends.is_empty()
            && self.trims.is_empty()
            && self.delete.is_none()
            && self.expired_producers.is_empty()
    }

    /// Tells everyone waiting that nothing of the batch was stored.
    fn fail(self, why: &str) {
        for (reply, appends) in self.replies {
            let _ = reply.send(vec![Err(AppendError::Storage(why.to_owned())); appends]);
        }
        if let Some((_, reply)) = self.delete {
            let _ = reply.send(Err(AppendError::Storage(why.to_owned())));
        }
    }
}

fn run_reader(store: Arc<dyn LogStore>, rx: Receiver<Queued<ReadRequest>>, closed: &AtomicBool) {
    while let Some(queued) = next_or_stop(&rx, closed) {
        match queued.item {
            ReadRequest::Messages {
                channel,
                from,
                until,
                max_messages,
                max_bytes,
                reply,
            } => {
                let _ = reply.send(store.read(channel, from, until, max_messages, max_bytes));
            }
            ReadRequest::Channel { name, reply } => {
                let _ = reply.send(store.load_channel(&name));
            }
            ReadRequest::Scan {
                prefix,
                after,
                limit,
                reply,
            } => {
                let _ = reply.send(store.scan_channels(&prefix, after.as_ref(), limit));
            }
            ReadRequest::Aged {
                namespace,
                before_ms,
                limit,
                reply,
            } => {
                let _ = reply.send(store.aged_channels(&namespace, before_ms, limit));
            }
        }
    }
}

/// The next queued item; `None` once the queue is empty and the log closed
/// (or every sender is gone).
fn next_or_stop<T>(rx: &Receiver<T>, closed: &AtomicBool) -> Option<T> {
    loop {
        match rx.recv_timeout(std::time::Duration::from_millis(50)) {
            Ok(item) => return Some(item),
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => {
                if closed.load(Ordering::SeqCst) {
                    return None;
                }
            }
            Err(crossbeam_channel::RecvTimeoutError::Disconnected) => return None,
        }
    }
}

/// Wall-clock time in milliseconds since the Unix epoch: the timestamp the
/// log gives messages.
pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::store::MemoryStore;

    fn input(channel: &str, producer: Option<(u64, u64)>, payload: &'static str) -> AppendInput {
        owned_input("ann", channel, producer, payload)
    }

    fn owned_input(
        owner: &str,
        channel: &str,
        producer: Option<(u64, u64)>,
        payload: &'static str,
    ) -> AppendInput {
        AppendInput {
            channel: ChannelName::new(channel).expect("name"),
            producer: producer.map(|(producer_id, sequence)| ProducerRef {
                key: ProducerKey::new(owner.into(), producer_id),
                sequence,
                after: None,
                limited: true,
            }),
            payload: Bytes::from_static(payload.as_bytes()),
        }
    }

    fn limits(window: usize) -> ProducerLimits {
        ProducerLimits {
            window,
            idle_ms: u64::MAX,
            max_resident: 1000,
            max_per_owner: 2,
            evict_beyond_limit: true,
            max_resident_channels: 1000,
        }
    }

    fn offsets(p: &Prepared) -> Vec<Result<(u64, bool), AppendError>> {
        p.outcomes
            .iter()
            .map(|o| match o {
                Outcome::Stored(a) => Ok((a.offset.get(), a.duplicate)),
                Outcome::Refused(e) => Err(e.clone()),
            })
            .collect()
    }

    #[test]
    fn offsets_are_gapless_per_channel_and_survive_commit() {
        let mut seq = Sequencer::new(Recovered::default(), limits(8));
        let batch = [
            input("chat.a", None, "1"),
            input("chat.b", None, "1"),
            input("chat.a", None, "2"),
        ];
        let mut p = seq.prepare(&batch, [], [], 0, &mut || Epoch(1));
        assert_eq!(
            offsets(&p),
            [Ok((1, false)), Ok((1, false)), Ok((2, false))]
        );
        assert_eq!(p.set.messages.len(), 3);
        assert_eq!(p.by_channel.len(), 2);
        seq.commit(&mut p);
        let p = seq.prepare(&[input("chat.a", None, "3")], [], [], 0, &mut || Epoch(2));
        assert_eq!(offsets(&p), [Ok((3, false))]);
        // Not committed: the sequencer did not move.
        let p = seq.prepare(&[input("chat.a", None, "3")], [], [], 0, &mut || Epoch(2));
        assert_eq!(offsets(&p), [Ok((3, false))]);
    }

    #[test]
    fn producer_retries_are_deduplicated_in_and_across_batches() {
        let mut seq = Sequencer::new(Recovered::default(), limits(2));
        let batch = [
            input("chat.a", Some((7, 1)), "x"),
            input("chat.a", Some((7, 1)), "x"),
            input("chat.a", Some((7, 3)), "y"),
        ];
        let mut p = seq.prepare(&batch, [], [], 0, &mut || Epoch(1));
        assert_eq!(offsets(&p), [Ok((1, false)), Ok((1, true)), Ok((2, false))]);
        assert_eq!(p.set.messages.len(), 2);
        seq.commit(&mut p);
        // Sequence 2 was never stored: out of order but new, so stored.
        let mut p = seq.prepare(
            &[input("chat.a", Some((7, 2)), "z")],
            [],
            [],
            0,
            &mut || Epoch(1),
        );
        assert_eq!(offsets(&p), [Ok((3, false))]);
        seq.commit(&mut p);
        // Window of 2 keeps sequences 2 and 3; 1 was forgotten.
        let p = seq.prepare(
            &[
                input("chat.a", Some((7, 3)), "y"),
                input("chat.a", Some((7, 1)), "x"),
                input("chat.b", Some((7, 2)), "z"),
            ],
            [],
            [],
            0,
            &mut || Epoch(1),
        );
        assert_eq!(
            offsets(&p),
            [
                Ok((2, true)),
                Err(AppendError::SequenceTooOld {
                    producer_id: 7,
                    sequence: 1
                }),
                Err(AppendError::SequenceReused {
                    producer_id: 7,
                    sequence: 2
                }),
            ]
        );
    }

    #[test]
    fn a_publish_is_never_stored_ahead_of_an_unstored_one_it_follows() {
        let mut seq = Sequencer::new(Recovered::default(), limits(8));
        let following = |sequence, after| {
            let mut i = input("chat.a", Some((7, sequence)), "x");
            if let Some(p) = i.producer.as_mut() {
                p.after = after;
            }
            i
        };
        // 2 arrives before the 1 it follows: refused, nothing stored.
        let p = seq.prepare(&[following(2, Some(1))], [], [], 0, &mut || Epoch(1));
        let refused = AppendError::OutOfOrder {
            producer_id: 7,
            sequence: 2,
            after: 1,
        };
        assert_eq!(offsets(&p), [Err(refused.clone())]);
        assert!(p.set.messages.is_empty());
        assert_eq!(refused.error_code(), ErrorCode::OutOfOrder);
        // In order, even within one batch, both are stored.
        let mut p = seq.prepare(
            &[following(1, None), following(2, Some(1))],
            [],
            [],
            0,
            &mut || Epoch(1),
        );
        assert_eq!(offsets(&p), [Ok((1, false)), Ok((2, false))]);
        seq.commit(&mut p);
        // A retry of a stored publish is a duplicate whatever it follows.
        let p = seq.prepare(
            &[following(3, Some(2)), following(2, Some(9))],
            [],
            [],
            0,
            &mut || Epoch(1),
        );
        assert_eq!(offsets(&p), [Ok((3, false)), Ok((2, true))]);
    }

    #[test]
    fn producer_windows_belong_to_their_owner_and_are_limited_per_owner() {
        let mut seq = Sequencer::new(Recovered::default(), limits(8));
        let mut p = seq.prepare(
            &[
                owned_input("ann", "chat.a", Some((7, 1)), "ann's"),
                // Bob names Ann's producer id: his own window, not a duplicate.
                owned_input("bob", "chat.a", Some((7, 1)), "bob's"),
                owned_input("ann", "chat.a", Some((8, 1)), "x"),
                // A third live window of Ann's is over the limit of 2.
                owned_input("ann", "chat.a", Some((9, 1)), "y"),
            ],
            [],
            [],
            0,
            &mut || Epoch(1),
        );
        assert_eq!(
            offsets(&p),
            [
                Ok((1, false)),
                Ok((2, false)),
                Ok((3, false)),
                Err(AppendError::TooManyProducers {
                    owner: "ann".into(),
                    limit: 2
                })
            ]
        );
        assert_eq!(p.set.producers.len(), 3);
        seq.commit(&mut p);
        assert_eq!(seq.producers().owned_by("ann"), 2);
        // Known producers go on publishing; a server identity is not limited.
        let mut unlimited = owned_input("ann", "chat.a", Some((10, 1)), "svc");
        if let Some(p) = unlimited.producer.as_mut() {
            p.limited = false;
        }
        let p = seq.prepare(
            &[owned_input("ann", "chat.a", Some((8, 2)), "z"), unlimited],
            [],
            [],
            0,
            &mut || Epoch(1),
        );
        assert_eq!(offsets(&p), [Ok((4, false)), Ok((5, false))]);
    }

    #[test]
    fn a_new_producer_beyond_the_limit_evicts_the_owners_least_recent_window() {
        let mut seq = Sequencer::new(Recovered::default(), limits(8));
        let mut p = seq.prepare(
            &[
                owned_input("ann", "chat.a", Some((7, 1)), "a"),
                owned_input("ann", "chat.a", Some((8, 1)), "b"),
            ],
            [],
            [],
            10,
            &mut || Epoch(1),
        );
        seq.commit(&mut p);
        let mut p = seq.prepare(
            &[owned_input("ann", "chat.a", Some((8, 2)), "c")],
            [],
            [],
            20,
            &mut || Epoch(1),
        );
        seq.commit(&mut p);
        // Ann's producers 7 (last published at 10) and 8 (at 20) are her
        // limit of 2: a third takes 7's place, then a fourth 8's, in one
        // batch in which 8 also publishes (so 8 stays) — nothing is left to
        // evict for the fourth.
        let mut p = seq.prepare(
            &[
                owned_input("ann", "chat.a", Some((9, 1)), "d"),
                owned_input("ann", "chat.a", Some((8, 3)), "e"),
                owned_input("ann", "chat.a", Some((10, 1)), "f"),
            ],
            [],
            [],
            30,
            &mut || Epoch(1),
        );
        assert_eq!(
            offsets(&p),
            [
                Ok((4, false)),
                Ok((5, false)),
                Err(AppendError::TooManyProducers {
                    owner: "ann".into(),
                    limit: 2
                })
            ]
        );
        assert_eq!(p.set.expired_producers, [ProducerKey::new("ann".into(), 7)]);
        seq.commit(&mut p);
        assert_eq!(seq.producers().owned_by("ann"), 2);
        assert!(!seq.producers().contains(&ProducerKey::new("ann".into(), 7)));
        // In a later batch the fourth has room: 8 and 9 both published at
        // 30, and the tie goes to the lower id, 8.
        let mut p = seq.prepare(
            &[owned_input("ann", "chat.a", Some((10, 1)), "f")],
            [],
            [],
            40,
            &mut || Epoch(1),
        );
        assert_eq!(offsets(&p), [Ok((6, false))]);
        assert_eq!(p.set.expired_producers, [ProducerKey::new("ann".into(), 8)]);
        seq.commit(&mut p);
        assert_eq!(seq.producers().owned_by("ann"), 2);

        // Ann's windows are 9 (at 30) and 10 (at 40). A new one whose
        // publish is refused (it names an `after` not stored) evicts
        // nothing; one whose batch also holds a publish of the least recent
        // window (9) evicts the other (10), never the one it writes.
        let mut refused = owned_input("ann", "chat.a", Some((11, 5)), "g");
        if let Some(p) = refused.producer.as_mut() {
            p.after = Some(4);
        }
        let p = seq.prepare(&[refused], [], [], 50, &mut || Epoch(1));
        assert!(matches!(
            offsets(&p)[..],
            [Err(AppendError::OutOfOrder { .. })]
        ));
        assert!(p.set.expired_producers.is_empty());
        let mut p = seq.prepare(
            &[
                owned_input("ann", "chat.a", Some((12, 1)), "h"),
                owned_input("ann", "chat.a", Some((9, 2)), "i"),
            ],
            [],
            [],
            60,
            &mut || Epoch(1),
        );
        assert_eq!(offsets(&p), [Ok((7, false)), Ok((8, false))]);
        assert_eq!(
            p.set.expired_producers,
            [ProducerKey::new("ann".into(), 10)]
        );
        seq.commit(&mut p);
        assert!(seq.producers().contains(&ProducerKey::new("ann".into(), 9)));
        assert_eq!(seq.producers().owned_by("ann"), 2);
    }

    #[test]
    fn a_replicated_partition_refuses_beyond_the_limit_instead_of_evicting() {
        let mut seq = Sequencer::new(
            Recovered::default(),
            ProducerLimits {
                evict_beyond_limit: false,
                ..limits(8)
            },
        );
        let mut p = seq.prepare(
            &[
                owned_input("ann", "chat.a", Some((1, 1)), "a"),
                owned_input("ann", "chat.a", Some((2, 1)), "b"),
            ],
            [],
            [],
            10,
            &mut || Epoch(1),
        );
        seq.commit(&mut p);
        let p = seq.prepare(
            &[owned_input("ann", "chat.a", Some((3, 1)), "c")],
            [],
            [],
            20,
            &mut || Epoch(1),
        );
        assert!(matches!(
            offsets(&p)[..],
            [Err(AppendError::TooManyProducers { .. })]
        ));
        assert!(p.set.expired_producers.is_empty());
    }

    fn trim(channel: &ChannelName, from: u64, below: u64, freed: u64, oldest_ms: u64) -> Trim {
        Trim {
            channel: channel.clone(),
            from: Offset::new(from),
            epoch: Some(Epoch(1)),
            below: Offset::new(below),
            freed_bytes: freed,
            oldest_ms,
        }
    }

    #[test]
    fn trims_move_the_first_offset_and_the_age_index_never_past_the_head() {
        let mut seq = Sequencer::new(Recovered::default(), limits(8));
        let chat = ChannelName::new("chat.a").expect("name");
        let batch: Vec<_> = (0..5).map(|_| input("chat.a", None, "ab")).collect();
        let mut p = seq.prepare(&batch, [], [], 100, &mut || Epoch(1));
        // A new channel enters the age index with its first message's time
        // and the id counter moves.
        let entered = AgeIndexMove {
            channel: chat.clone(),
            id: 1,
            from: None,
            to: Some(100),
        };
        assert_eq!(p.set.age_index, [entered]);
        assert_eq!(p.set.next_channel_id, Some(2));
        seq.commit(&mut p);
        let mut p = seq.prepare(&[], [trim(&chat, 1, 3, 4, 150)], [], 0, &mut || Epoch(1));
        assert_eq!(p.set.deletions, [(1, Offset::new(1), Offset::new(3))]);
        assert_eq!(p.set.age_index[0].from, Some(100));
        assert_eq!(p.set.age_index[0].to, Some(150));
        assert_eq!(p.set.next_channel_id, None);
        seq.commit(&mut p);
        let meta = seq.channels().get(&chat).copied();
        assert_eq!(meta.map(|m| (m.first_offset.get(), m.bytes)), Some((3, 6)));
        // A cut computed before that one landed is stale: skipped, so its
        // bytes are not subtracted twice.
        let p = seq.prepare(&[], [trim(&chat, 1, 4, 6, 0)], [], 0, &mut || Epoch(1));
        assert!(p.set.deletions.is_empty() && p.set.channels.is_empty());
        assert_eq!(p.stale_trims, 1);
        // Never past the head; an emptied channel leaves the index.
        let p = seq.prepare(&[], [trim(&chat, 3, 99, 6, 0)], [], 0, &mut || Epoch(1));
        assert_eq!(p.set.deletions, [(1, Offset::new(3), Offset::new(6))]);
        assert_eq!(p.set.age_index[0].to, None);
    }

    #[test]
    fn a_delete_ends_the_channel_and_a_publish_after_it_starts_a_new_one() {
        let mut seq = Sequencer::new(Recovered::default(), limits(8));
        let chat = ChannelName::new("chat.a").expect("name");
        let mut p = seq.prepare(&[input("chat.a", None, "x")], [], [], 100, &mut || Epoch(1));
        seq.commit(&mut p);
        // Appends before the delete in its batch are deleted with it.
        let mut p = seq.prepare(
            &[input("chat.a", None, "y")],
            [],
            [chat.clone()],
            200,
            &mut || Epoch(2),
        );
        assert_eq!(p.set.deleted_channels, [(chat.clone(), 1)]);
        assert!(p.set.channels.is_empty() && p.by_channel.is_empty());
        assert_eq!(p.set.age_index[0].to, None);
        assert!(matches!(p.deleted.as_slice(), [(_, Some(m))] if m.next_offset == Offset::new(3)));
        seq.commit(&mut p);
        assert!(seq.channels().get(&chat).is_none());
        let p = seq.prepare(&[], [], [chat.clone()], 0, &mut || Epoch(3));
        assert!(matches!(p.deleted.as_slice(), [(_, None)]));
        let p = seq.prepare(&[input("chat.a", None, "z")], [], [], 300, &mut || Epoch(4));
        assert_eq!(offsets(&p), [Ok((1, false))]);
        assert_eq!(p.set.channels[0].1.id, 2, "ids are never reused");
    }

    #[test]
    fn a_cut_computed_before_a_delete_never_trims_the_channel_created_after_it() {
        let mut seq = Sequencer::new(Recovered::default(), limits(8));
        let chat = ChannelName::new("chat.a").expect("name");
        let batch: Vec<_> = (0..5).map(|_| input("chat.a", None, "ab")).collect();
        let mut p = seq.prepare(&batch, [], [], 100, &mut || Epoch(1));
        seq.commit(&mut p);
        // Retention computes a cut of the first incarnation (epoch 1, from
        // offset 1); before it applies, the channel is deleted and created
        // again, starting at offset 1 once more.
        let stale = trim(&chat, 1, 5, 8, 150);
        let mut p = seq.prepare(&[], [], [chat.clone()], 200, &mut || Epoch(2));
        seq.commit(&mut p);
        let batch: Vec<_> = (0..5).map(|_| input("chat.a", None, "cd")).collect();
        let mut p = seq.prepare(&batch, [], [], 300, &mut || Epoch(3));
        seq.commit(&mut p);
        let p = seq.prepare(&[], [stale.clone()], [], 400, &mut || Epoch(4));
        assert!(p.set.deletions.is_empty(), "{:?}", p.set.deletions);
        assert_eq!(p.stale_trims, 1);
        // A cut of the new incarnation applies.
        let current = Trim {
            epoch: Some(Epoch(3)),
            ..stale
        };
        let p = seq.prepare(&[], [current], [], 400, &mut || Epoch(4));
        assert_eq!(p.set.deletions, [(2, Offset::new(1), Offset::new(5))]);
    }

    #[test]
    fn metadata_from_before_a_lossy_stop_takes_a_new_epoch_from_its_head() {
        let mut meta = ChannelMeta::new(1, Epoch(7));
        meta.next_offset = Offset::new(51);
        let rotated = meta.in_generation(1);
        assert_ne!(rotated.epoch, meta.epoch);
        assert_eq!(rotated.previous_epoch, Epoch(7));
        assert_eq!(rotated.epoch_start, Offset::new(51));
        // Every reader derives the same epoch; a current one is unchanged.
        assert_eq!(meta.in_generation(1), rotated);
        assert_eq!(rotated.in_generation(1), rotated);
        assert_ne!(meta.in_generation(2).epoch, rotated.epoch);
    }

    #[derive(Default)]
    struct Recorder(Mutex<Vec<(String, Vec<u64>)>>);
    impl CommitListener for Recorder {
        fn committed(&self, channel: &ChannelName, _: &ChannelMeta, messages: &[StoredMessage]) {
            let offsets = messages.iter().map(|m| m.offset.get()).collect();
            self.0
                .lock()
                .expect("lock")
                .push((channel.to_string(), offsets));
        }
    }

    #[tokio::test]
    async fn a_failed_write_acks_nothing_and_the_log_recovers() {
        let store = Arc::new(MemoryStore::new());
        let recorder = Arc::new(Recorder::default());
        let threads = start(
            store.clone(),
            recorder.clone(),
            Durability::Fsync,
            &EngineConfig::default(),
            Arc::new(Metrics::new()),
        )
        .expect("log");
        let log = threads.log().clone();
        assert_eq!(
            log.append(input("chat.a", None, "1"))
                .await
                .map(|a| a.offset.get()),
            Ok(1)
        );
        store.fail_next_write();
        assert!(matches!(
            log.append(input("chat.a", None, "2")).await,
            Err(AppendError::Storage(_))
        ));
        // The next batch probes the store's health first and goes through;
        // the failed publish did not consume an offset.
        assert_eq!(
            log.append(input("chat.a", None, "2"))
                .await
                .map(|a| a.offset.get()),
            Ok(2)
        );
        let seen = recorder.0.lock().expect("lock").clone();
        assert_eq!(
            seen,
            [
                ("chat.a".to_owned(), vec![1]),
                ("chat.a".to_owned(), vec![2])
            ]
        );
        threads.shutdown();
        assert!(matches!(
            log.append(input("chat.a", None, "3")).await,
            Err(AppendError::ShuttingDown)
        ));
        let chat = ChannelName::new("chat.a").expect("name");
        let stored = store.load_channel(&chat).expect("load").expect("stored");
        assert_eq!(stored.next_offset, Offset::new(3));
    }

    #[tokio::test]
    async fn a_batch_is_sequenced_in_its_order_with_an_outcome_per_append() {
        let threads = start(
            Arc::new(MemoryStore::new()),
            Arc::new(Recorder::default()),
            Durability::Wal,
            &EngineConfig::default(),
            Arc::new(Metrics::new()),
        )
        .expect("log");
        let log = threads.log().clone();
        let outcome = |r: &Result<Appended, AppendError>| {
            r.as_ref().map(|a| (a.offset.get(), a.duplicate)).ok()
        };
        let first = log
            .submit_batch(vec![
                input("chat.a", Some((7, 1)), "a1"),
                input("chat.b", None, "b1"),
                input("chat.a", Some((7, 2)), "a2"),
                // A retry of the first, in the same batch: a duplicate.
                input("chat.a", Some((7, 1)), "a1"),
            ])
            .await;
        assert_eq!(first.len(), 4);
        // Submitted before the first resolves: sequenced after it.
        let second = log
            .submit_batch(vec![input("chat.a", Some((7, 3)), "a3")])
            .await;
        let first = first.outcomes().await;
        assert_eq!(
            first.iter().map(outcome).collect::<Vec<_>>(),
            [
                Some((1, false)),
                Some((1, false)),
                Some((2, false)),
                Some((1, true))
            ]
        );
        let second = second.outcomes().await;
        assert_eq!(
            second.iter().map(outcome).collect::<Vec<_>>(),
            [Some((3, false))]
        );
        threads.shutdown();
        // A closed log refuses every append of a batch, each with its error.
        let refused = log
            .submit_batch(vec![input("chat.a", None, "x"), input("chat.b", None, "y")])
            .await
            .outcomes()
            .await;
        assert_eq!(
            refused,
            [
                Err(AppendError::ShuttingDown),
                Err(AppendError::ShuttingDown)
            ]
        );
    }

    #[tokio::test]
    async fn producer_windows_load_on_use_and_idle_ones_leave_the_store() {
        let store = Arc::new(MemoryStore::new());
        let start_log = |engine: EngineConfig| {
            start(
                store.clone(),
                Arc::new(Recorder::default()),
                Durability::Wal,
                &engine,
                Arc::new(Metrics::new()),
            )
            .expect("log")
        };
        let appended = |r: Result<Appended, AppendError>| r.map(|a| (a.offset.get(), a.duplicate));
        let threads = start_log(EngineConfig::default());
        let log = threads.log().clone();
        let first = log.append(input("chat.a", Some((7, 1)), "x")).await;
        assert_eq!(appended(first), Ok((1, false)));
        threads.shutdown();

        // A new incarnation loads nothing at start, and the window on use.
        let threads = start_log(EngineConfig::default());
        let log = threads.log().clone();
        let retry = log.append(input("chat.a", Some((7, 1)), "x")).await;
        assert_eq!(appended(retry), Ok((1, true)));
        threads.shutdown();

        // With a one-second horizon the window, once idle, is deleted.
        let threads = start_log(EngineConfig {
            producer_idle_secs: 1,
            ..EngineConfig::default()
        });
        let log = threads.log().clone();
        let next = log.append(input("chat.a", Some((7, 2)), "y")).await;
        assert_eq!(appended(next), Ok((2, false)));
        let key = ProducerKey::new("ann".into(), 7);
        let deadline = Instant::now() + Duration::from_secs(10);
        while store.load_producer(&key).expect("load").is_some() {
            assert!(Instant::now() < deadline, "the idle window was not deleted");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        threads.shutdown();
    }
}
