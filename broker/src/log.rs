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

use crate::config::{Durability, EngineConfig};
use crate::metrics::Metrics;
use crate::producers::ProducerTable;
use crate::queue::{self, AsyncSender, Queued};
use crate::store::{
    ChannelId, ChannelMeta, LogStore, ProducerEntry, ProducerKey, ProducerWindow, Recovered,
    SequenceStatus, StoreError, StoredMessage, WriteSet,
};

/// How often the writer looks for idle producer windows.
const PRODUCER_SWEEP_INTERVAL: Duration = Duration::from_secs(1);

/// Channel metadata as last committed, readable from any thread.
pub type Directory = DashMap<ChannelName, ChannelMeta>;

/// Told about every committed batch, on the writer thread: must be quick and
/// must not block.
pub trait CommitListener: Send + Sync + 'static {
    /// `messages` were committed to `channel`, consecutive offsets.
    fn committed(&self, channel: &ChannelName, meta: &ChannelMeta, messages: &[StoredMessage]);
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
    /// The log is shutting down.
    #[error("the log is shutting down")]
    ShuttingDown,
}

impl AppendError {
    /// The wire error code a client is told.
    pub fn error_code(&self) -> ErrorCode {
        match self {
            Self::Storage(_) => ErrorCode::StorageUnavailable,
            Self::SequenceTooOld { .. } => ErrorCode::SequenceTooOld,
            Self::SequenceReused { .. } => ErrorCode::BadRequest,
            Self::TooManyProducers { .. } => ErrorCode::TooManyProducers,
            Self::ShuttingDown => ErrorCode::ShuttingDown,
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

/// How the sequencer keeps producer windows.
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
}

impl ProducerLimits {
    /// The limits a configuration sets.
    pub fn from_config(engine: &EngineConfig) -> Self {
        Self {
            window: engine.producer_window,
            idle_ms: engine.producer_idle_secs.saturating_mul(1000),
            max_resident: engine.max_resident_producers,
            max_per_owner: u32::try_from(engine.max_producers_per_user).unwrap_or(u32::MAX),
        }
    }
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
    channels: HashMap<ChannelName, ChannelMeta>,
    producers: HashMap<ProducerKey, ProducerWindow>,
    next_channel_id: ChannelId,
}

/// The writer's state: every channel's metadata and every producer's dedup
/// window. Pure: it decides, the caller writes.
#[derive(Debug)]
pub struct Sequencer {
    channels: HashMap<ChannelName, ChannelMeta>,
    producers: ProducerTable,
    next_channel_id: ChannelId,
    limits: ProducerLimits,
}

impl Sequencer {
    /// A sequencer over what was recovered from the store; producer windows
    /// are added as they are loaded ([`Sequencer::producers_mut`]).
    pub fn new(recovered: Recovered, limits: ProducerLimits) -> Self {
        let next_channel_id = recovered
            .channels
            .iter()
            .map(|(_, m)| m.id)
            .max()
            .map_or(1, |id| id + 1);
        Self {
            channels: recovered.channels.into_iter().collect(),
            producers: ProducerTable::new(limits.max_resident, limits.idle_ms),
            next_channel_id,
            limits,
        }
    }

    /// The resident producer windows.
    pub fn producers(&self) -> &ProducerTable {
        &self.producers
    }

    /// The resident producer windows, to load into or sweep.
    pub fn producers_mut(&mut self) -> &mut ProducerTable {
        &mut self.producers
    }

    /// The committed metadata of every channel.
    pub fn channels(&self) -> impl Iterator<Item = (&ChannelName, &ChannelMeta)> {
        self.channels.iter()
    }

    /// Decides offsets for `appends` and applies `trims` (retention: drop
    /// everything below the given offset, which frees the given payload
    /// bytes), without changing `self`.
    pub fn prepare<'a>(
        &self,
        appends: impl IntoIterator<Item = &'a AppendInput>,
        trims: impl IntoIterator<Item = (ChannelName, Offset, u64)>,
        now_ms: u64,
        new_epoch: &mut dyn FnMut() -> Epoch,
    ) -> Prepared {
        let mut p = Prepared {
            next_channel_id: self.next_channel_id,
            ..Prepared::default()
        };
        let mut channel_slot: HashMap<ChannelName, usize> = HashMap::new();
        let mut new_per_owner: HashMap<Arc<str>, u32> = HashMap::new();
        for input in appends {
            let meta = match p.channels.get(&input.channel) {
                Some(m) => *m,
                None => match self.channels.get(&input.channel) {
                    Some(m) => *m,
                    None => {
                        let id = p.next_channel_id;
                        p.next_channel_id += 1;
                        ChannelMeta::new(id, new_epoch())
                    }
                },
            };
            if let Some(producer) = &input.producer {
                let window = p
                    .producers
                    .get(&producer.key)
                    .or_else(|| self.producers.get(&producer.key));
                let refused = match window.map(|w| w.lookup(producer.sequence)) {
                    None if producer.limited
                        && self.producers.owned_by(&producer.key.owner)
                            + new_per_owner.get(&producer.key.owner).copied().unwrap_or(0)
                            >= self.limits.max_per_owner =>
                    {
                        Some(Outcome::Refused(AppendError::TooManyProducers {
                            owner: producer.key.owner.clone(),
                            limit: self.limits.max_per_owner,
                        }))
                    }
                    None | Some(SequenceStatus::New) => None,
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
            }
            let mut meta = meta;
            let offset = meta.next_offset;
            meta.next_offset = offset.next();
            meta.bytes += input.payload.len() as u64;
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
                        let loaded = self.producers.get(&producer.key).cloned();
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
        for (channel, below, freed_bytes) in trims {
            let Some(mut meta) = p
                .channels
                .get(&channel)
                .or_else(|| self.channels.get(&channel))
                .copied()
            else {
                continue;
            };
            let below = below.min(meta.next_offset);
            if below <= meta.first_offset {
                continue;
            }
            p.set.deletions.push((meta.id, meta.first_offset, below));
            meta.first_offset = below;
            meta.bytes = meta.bytes.saturating_sub(freed_bytes);
            p.channels.insert(channel, meta);
        }
        p.set.channels = p.channels.iter().map(|(n, m)| (n.clone(), *m)).collect();
        p.set.producers = p
            .producers
            .iter()
            .map(|(k, w)| (k.clone(), w.clone()))
            .collect();
        p
    }

    /// Applies a prepared batch after the store accepted it.
    pub fn commit(&mut self, prepared: &mut Prepared) {
        self.next_channel_id = prepared.next_channel_id;
        self.channels.extend(prepared.channels.drain());
        for (key, window) in prepared.producers.drain() {
            self.producers.put(key, window);
        }
    }
}

/// What the log's threads are asked to do.
#[derive(Debug)]
enum Command {
    Append {
        input: AppendInput,
        reply: oneshot::Sender<Result<Appended, AppendError>>,
    },
    /// Bytes freed by retention are subtracted by the writer, which knows the
    /// sizes: `(channel, delete everything below this offset, bytes freed)`.
    Trim {
        channel: ChannelName,
        below: Offset,
        freed_bytes: u64,
    },
}

#[derive(Debug)]
struct ReadRequest {
    channel: ChannelId,
    from: Offset,
    until: Offset,
    max_messages: usize,
    max_bytes: usize,
    reply: oneshot::Sender<Result<Vec<StoredMessage>, StoreError>>,
}

/// The ack of a submitted append; resolves once the batch holding it was
/// committed (or failed).
#[derive(Debug)]
pub struct PendingAppend(oneshot::Receiver<Result<Appended, AppendError>>);

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
    let recovered = store.recover()?;
    info!(
        channels = recovered.channels.len(),
        "recovered the channel log"
    );
    let sequencer = Sequencer::new(recovered, ProducerLimits::from_config(engine));
    let directory: Arc<Directory> =
        Arc::new(sequencer.channels().map(|(n, m)| (n.clone(), *m)).collect());
    let queue_bytes = u32::try_from(engine.writer_queue_bytes).unwrap_or(u32::MAX);
    let (commands, command_rx) = queue::bounded_with_bytes(engine.writer_queue, queue_bytes);
    let (reads, read_rx) = queue::bounded(engine.reader_threads * 64);
    let closed = Arc::new(AtomicBool::new(false));
    let writer = Writer {
        metrics,
        closed: closed.clone(),
        store: store.clone(),
        listener,
        directory: directory.clone(),
        sequencer,
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
    /// queued, syncs the WAL and joins the threads. Blocks: call it from a
    /// blocking context.
    pub fn shutdown(mut self) {
        self.log.closed.store(true, Ordering::SeqCst);
        self.log.commands.close();
        self.log.reads.close();
        // The threads drain what is queued, then see `closed` and exit, even
        // while sessions that are still closing hold senders.
        drop(self.log);
        if let Some(writer) = self.writer.take()
            && writer.join().is_err()
        {
            error!("the log writer thread panicked");
        }
        for reader in self.readers.drain(..) {
            if reader.join().is_err() {
                error!("a log reader thread panicked");
            }
        }
        if let Err(e) = self.store.flush() {
            error!(error = %e, "final WAL sync failed");
        }
    }
}

impl Log {
    /// Appends one message; resolves once it is durable (G2).
    pub async fn append(&self, input: AppendInput) -> Result<Appended, AppendError> {
        self.submit(input).await?.await
    }

    /// Queues one append, waiting only for room in the writer's queue, and
    /// returns the pending ack. Appends submitted one after the other are
    /// sequenced in that order.
    pub async fn submit(&self, input: AppendInput) -> Result<PendingAppend, AppendError> {
        if self.closed.load(Ordering::SeqCst) {
            return Err(AppendError::ShuttingDown);
        }
        let (reply, rx) = oneshot::channel();
        let bytes = input.payload.len();
        self.commands
            .send_sized(Command::Append { input, reply }, bytes)
            .await
            .map_err(|_| AppendError::ShuttingDown)?;
        Ok(PendingAppend(rx))
    }

    /// Asks the writer to delete `channel`'s messages below `below`, which
    /// hold `freed_bytes` of payload. Skipped (false) when the writer is busy.
    pub fn trim(&self, channel: ChannelName, below: Offset, freed_bytes: u64) -> bool {
        self.commands
            .try_send(Command::Trim {
                channel,
                below,
                freed_bytes,
            })
            .is_ok()
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
        let (reply, rx) = oneshot::channel();
        let request = ReadRequest {
            channel,
            from,
            until,
            max_messages,
            max_bytes,
            reply,
        };
        let closed = || StoreError::Engine("the log is shutting down".into());
        self.reads.send(request).await.map_err(|_| closed())?;
        rx.await.map_err(|_| closed())?
    }

    /// A channel's committed metadata, if the channel exists.
    pub fn meta(&self, channel: &ChannelName) -> Option<ChannelMeta> {
        self.directory.get(channel).map(|m| *m)
    }

    /// Every channel's committed metadata.
    pub fn directory(&self) -> &Directory {
        &self.directory
    }

    /// Whether the log takes appends.
    pub fn is_open(&self) -> bool {
        !self.closed.load(Ordering::SeqCst)
    }
}

struct Writer {
    metrics: Arc<Metrics>,
    closed: Arc<AtomicBool>,
    store: Arc<dyn LogStore>,
    listener: Arc<dyn CommitListener>,
    directory: Arc<Directory>,
    sequencer: Sequencer,
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
            let mut appends = Vec::new();
            let mut replies = Vec::new();
            let mut trims = Vec::new();
            let mut bytes = 0usize;
            let mut next = first;
            while let Some(queued) = next.take() {
                match queued.item {
                    Command::Append { input, reply } => {
                        bytes += input.payload.len();
                        appends.push(input);
                        replies.push(reply);
                    }
                    Command::Trim {
                        channel,
                        below,
                        freed_bytes,
                    } => {
                        trims.push((channel, below, freed_bytes));
                    }
                }
                if appends.len() < self.max_batch_messages && bytes < self.max_batch_bytes {
                    next = rx.try_recv().ok();
                }
            }
            if appends.is_empty() && trims.is_empty() && expired.is_empty() {
                continue;
            }
            // After a failed write the store refuses writes until it is
            // found healthy again; probe once per batch, not per publish.
            if !healthy && self.store.check_health().is_ok() {
                info!("the store accepts writes again");
            }
            healthy = self.commit(appends, replies, trims, expired);
        }
        info!("log writer stopped");
    }

    /// Forgets idle producer windows (returned: their point deletes go
    /// into the next write) and unloads the least recently used above the
    /// resident cap.
    fn sweep_producers(&mut self) -> Vec<ProducerKey> {
        let swept = self.sequencer.producers_mut().sweep(now_ms());
        self.metrics
            .producers_expired
            .inc_by(swept.expired.len() as u64);
        self.metrics
            .producer_windows
            .set(self.sequencer.producers().len() as i64);
        swept.expired
    }

    /// Makes the window of every producer in `appends` resident, reading
    /// the ones not in memory from the store: windows are loaded on use,
    /// not at start (G9).
    fn load_producers(&mut self, appends: &[AppendInput]) -> Result<(), StoreError> {
        let now = now_ms();
        for producer in appends.iter().filter_map(|a| a.producer.as_ref()) {
            if self.sequencer.producers().contains(&producer.key) {
                continue;
            }
            if let Some(window) = self.store.load_producer(&producer.key)?
                && self.sequencer.producers().is_live(&window, now)
            {
                self.sequencer
                    .producers_mut()
                    .put(producer.key.clone(), window);
            }
        }
        Ok(())
    }

    fn commit(
        &mut self,
        appends: Vec<AppendInput>,
        replies: Vec<oneshot::Sender<Result<Appended, AppendError>>>,
        trims: Vec<(ChannelName, Offset, u64)>,
        expired_producers: Vec<ProducerKey>,
    ) -> bool {
        if let Err(e) = self.load_producers(&appends) {
            warn!(error = %e, messages = appends.len(), "cannot read producer windows; nothing was acknowledged");
            let why = e.to_string();
            for reply in replies {
                let _ = reply.send(Err(AppendError::Storage(why.clone())));
            }
            return false;
        }
        let mut prepared = self
            .sequencer
            .prepare(&appends, trims, now_ms(), &mut || Epoch(rand::random()));
        // A producer that expired and published again in this very batch
        // has a new window: it must not be deleted after being written.
        prepared.set.expired_producers = expired_producers
            .into_iter()
            .filter(|key| !prepared.producers.contains_key(key))
            .collect();
        let started = std::time::Instant::now();
        let result = if prepared.set.is_empty() {
            Ok(())
        } else {
            self.store.write(&prepared.set, self.sync)
        };
        self.metrics
            .wal_write_seconds
            .observe(started.elapsed().as_secs_f64());
        self.metrics
            .group_commit_messages
            .observe(appends.len() as f64);
        match result {
            Ok(()) => {
                let deleted: u64 = prepared
                    .set
                    .deletions
                    .iter()
                    .map(|(_, from, to)| from.distance_to(*to))
                    .sum();
                self.metrics.retention_deleted.inc_by(deleted);
                self.sequencer.commit(&mut prepared);
                self.metrics
                    .producer_windows
                    .set(self.sequencer.producers().len() as i64);
                for (name, meta) in &prepared.set.channels {
                    self.directory.insert(name.clone(), *meta);
                }
                for (name, _, messages) in &prepared.by_channel {
                    if let Some(meta) = self.directory.get(name).map(|m| *m) {
                        self.listener.committed(name, &meta, messages);
                    }
                }
                for (reply, outcome) in replies.into_iter().zip(prepared.outcomes) {
                    let _ = reply.send(match outcome {
                        Outcome::Stored(appended) => Ok(appended),
                        Outcome::Refused(e) => Err(e),
                    });
                }
                true
            }
            Err(e) => {
                warn!(error = %e, messages = appends.len(), "group commit failed; nothing was acknowledged");
                let why = e.to_string();
                for reply in replies {
                    let _ = reply.send(Err(AppendError::Storage(why.clone())));
                }
                false
            }
        }
    }
}

fn run_reader(store: Arc<dyn LogStore>, rx: Receiver<Queued<ReadRequest>>, closed: &AtomicBool) {
    while let Some(queued) = next_or_stop(&rx, closed) {
        let r = queued.item;
        let result = store.read(r.channel, r.from, r.until, r.max_messages, r.max_bytes);
        let _ = r.reply.send(result);
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
        let mut p = seq.prepare(&batch, [], 0, &mut || Epoch(1));
        assert_eq!(
            offsets(&p),
            [Ok((1, false)), Ok((1, false)), Ok((2, false))]
        );
        assert_eq!(p.set.messages.len(), 3);
        assert_eq!(p.by_channel.len(), 2);
        seq.commit(&mut p);
        let p = seq.prepare(&[input("chat.a", None, "3")], [], 0, &mut || Epoch(2));
        assert_eq!(offsets(&p), [Ok((3, false))]);
        // Not committed: the sequencer did not move.
        let p = seq.prepare(&[input("chat.a", None, "3")], [], 0, &mut || Epoch(2));
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
        let mut p = seq.prepare(&batch, [], 0, &mut || Epoch(1));
        assert_eq!(offsets(&p), [Ok((1, false)), Ok((1, true)), Ok((2, false))]);
        assert_eq!(p.set.messages.len(), 2);
        seq.commit(&mut p);
        // Sequence 2 was never stored: out of order but new, so stored.
        let mut p = seq.prepare(&[input("chat.a", Some((7, 2)), "z")], [], 0, &mut || {
            Epoch(1)
        });
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
            0,
            &mut || Epoch(1),
        );
        assert_eq!(offsets(&p), [Ok((4, false)), Ok((5, false))]);
    }

    #[test]
    fn trims_move_the_first_offset_and_never_past_the_head() {
        let mut seq = Sequencer::new(Recovered::default(), limits(8));
        let batch: Vec<_> = (0..5).map(|_| input("chat.a", None, "ab")).collect();
        let mut p = seq.prepare(&batch, [], 0, &mut || Epoch(1));
        seq.commit(&mut p);
        let chat = ChannelName::new("chat.a").expect("name");
        let mut p = seq.prepare(&[], [(chat.clone(), Offset::new(3), 4)], 0, &mut || {
            Epoch(1)
        });
        assert_eq!(p.set.deletions, [(1, Offset::new(1), Offset::new(3))]);
        seq.commit(&mut p);
        let meta = seq.channels().find(|(n, _)| **n == chat).map(|(_, m)| *m);
        assert_eq!(meta.map(|m| (m.first_offset.get(), m.bytes)), Some((3, 6)));
        let p = seq.prepare(&[], [(chat, Offset::new(99), 6)], 0, &mut || Epoch(1));
        assert_eq!(p.set.deletions, [(1, Offset::new(3), Offset::new(6))]);
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
        let recovered = store.recover().expect("recover");
        assert_eq!(recovered.channels[0].1.next_offset, Offset::new(3));
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
