//! Devices as durable things: each device's cursors (what it has
//! acknowledged, per channel), each user's read markers, and the registry
//! of a user's devices (DESIGN.md §4, column family `cursors`); and
//! [`push`], which tells the application's push service of new messages
//! so that it can wake devices that are offline.
//!
//! ```text
//!  sessions ──Ack / MarkRead──▶ pending (coalesced: one value per key, max wins)
//!                                   │ every cursors.flush_ms
//!                                   ▼
//!  sessions ──reads──▶ queue ──▶ devices thread ──one write──▶ DeviceStore
//!                                   │ (also: sweeps idle devices and the
//!                                   ▼  marks of deleted channels)
//!                       "stored up to generation g" ──▶ sessions send `Stored`
//! ```
//!
//! In a cluster the same handle keeps what waits for the next flush, and
//! the flush hands it to the partitions of the users it belongs to
//! ([`RemoteDevices`], `crate::cluster::devices`) instead of a devices
//! thread: `Stored` then means committed by the user's partition.
//!
//! Invariants:
//! - A stored mark never moves backwards within one incarnation of its
//!   channel: the devices thread is the only writer, and it merges each
//!   pending value with the stored one ([`Mark::merge`]) before writing.
//! - `Stored` is sent only once the write holding the update returned
//!   (synced first with `durability = "fsync"`).
//! - Reads see pending values: an acknowledged offset is where a `Cursor`
//!   subscription starts at once, on any connection of the device.
//! - Memory holds only what waits for the next flush (one value per device
//!   and channel acknowledged within it); stored marks stay on disk and
//!   in RocksDB's shared block cache (G9).

pub mod layout;
pub mod push;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError};
use dashmap::DashMap;
use thiserror::Error;
use tokio::sync::{oneshot, watch};
use tracing::{error, info, warn};
use volna_proto::{ChannelName, Offset};

pub use layout::{DeviceId, Incarnation, Mark, Unread};

use crate::config::{CursorsConfig, Durability};
use crate::log::Logs;
use crate::metrics::Metrics;
use crate::queue::{self, AsyncSender, Queued};
use crate::store::{ChannelId, ChannelMeta, DeviceStore, DeviceWrite, LogStore, StoreError};

/// Pending values beyond which a flush starts before its interval ends.
const MAX_PENDING: usize = 100_000;
/// Entries one sweep step reads before the thread serves requests again.
const SWEEP_STEP: usize = 4096;
/// A day, in the units device stamps use.
pub(crate) const DAY_MS: u64 = 86_400_000;

/// Why a device request failed.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DeviceError {
    /// The user has as many devices as it may.
    #[error("{user} has {limit} devices already; a device unused for a while is forgotten")]
    TooManyDevices {
        /// The user.
        user: String,
        /// `cursors.max_devices_per_user`.
        limit: u32,
    },
    /// The store failed.
    #[error("device state unavailable: {0}")]
    Storage(String),
    /// The broker is shutting down.
    #[error("the broker is shutting down")]
    Closed,
}

impl From<StoreError> for DeviceError {
    fn from(e: StoreError) -> Self {
        DeviceError::Storage(e.to_string())
    }
}

/// A pending update's place in the flush order: it is durable once the
/// devices thread has written its generation (in a cluster: once its
/// user's partition committed it, or a later one).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Ticket {
    generation: u64,
    /// The user's partition (0 on a single node).
    partition: u32,
}

/// How long a cluster node's `Stored` may wait for the user's partition
/// (an election takes about a second): past it the device is told the
/// storage is unavailable, and the value is still proposed again.
const STORED_WITHIN: Duration = Duration::from_secs(10);

/// The generations written so far.
#[derive(Debug, Default)]
struct Written {
    /// Every generation up to this one (the devices thread).
    all: u64,
    /// Per partition (a cluster): each commits on its own.
    by_partition: HashMap<u32, u64>,
}

impl Written {
    fn covers(&self, ticket: Ticket) -> bool {
        self.all >= ticket.generation
            || self
                .by_partition
                .get(&ticket.partition)
                .is_some_and(|g| *g >= ticket.generation)
    }
}

/// Told when another device of its user moves the user's read marker.
pub trait MarkerListener: Send + Sync + 'static {
    /// The user's marker on `channel` is now `offset`.
    fn marker_moved(&self, channel: &ChannelName, offset: Offset);
}

/// A session listening for its user's markers, by session id.
type Listening = (u64, Arc<dyn MarkerListener>);

/// A boxed, sendable future.
pub type BoxFuture<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;

/// Marks and registry stamps a flush could not write, to try again, and
/// the partitions that took all of theirs.
#[derive(Debug, Default)]
pub struct Unwritten {
    /// Partitions whose changes were all committed.
    pub written: Vec<u32>,
    /// Cursors and markers, by key.
    pub marks: Vec<(Vec<u8>, Mark)>,
    /// Registry stamps, by key.
    pub seen: Vec<(Vec<u8>, u64)>,
    /// Why, when anything is left.
    pub why: Option<String>,
}

/// Device state kept elsewhere than this node's store: a cluster's
/// partitions. Keys are [`layout`] keys; each names its user, whose
/// partition keeps it.
pub trait RemoteDevices: Send + Sync + std::fmt::Debug + 'static {
    /// Registers `device` of `user` as seen now; refuses a new device
    /// beyond `limit`.
    fn register(
        &self,
        user: String,
        device: DeviceId,
        limit: u32,
    ) -> BoxFuture<'_, Result<(), DeviceError>>;
    /// The committed marks of `keys`, in the same order.
    fn get(&self, keys: Vec<Vec<u8>>) -> BoxFuture<'_, Result<Vec<Option<Mark>>, DeviceError>>;
    /// Up to `limit` of `user`'s committed read markers, in channel order.
    fn markers(
        &self,
        user: String,
        limit: usize,
    ) -> BoxFuture<'_, Result<Vec<(ChannelName, Mark)>, DeviceError>>;
    /// The partition that keeps `user`'s state.
    fn partition_of(&self, user: &str) -> u32;
    /// Writes marks (merged with what is kept, never backwards) and
    /// registry stamps; answers which partitions took theirs and what the
    /// others could not take.
    fn write(
        &self,
        marks: Vec<(Vec<u8>, Mark)>,
        seen: Vec<(Vec<u8>, u64)>,
    ) -> BoxFuture<'_, Unwritten>;
    /// The heads of `channels`, in the same order (`None`: no such
    /// channel), without reading any log.
    fn heads(
        &self,
        channels: Vec<ChannelName>,
    ) -> BoxFuture<'_, Result<Vec<Option<ChannelMeta>>, DeviceError>>;
}

/// Where device state is kept.
enum Backend {
    /// This node's devices thread and store.
    Thread(AsyncSender<Request>),
    /// A cluster's partitions, written by a flush task.
    Remote {
        remote: Arc<dyn RemoteDevices>,
        /// Wakes the flush task before its interval ends.
        flush: Arc<tokio::sync::Notify>,
    },
}

/// The sessions' handle on device state. Cheap to share.
pub struct Devices {
    shared: Arc<Shared>,
    backend: Backend,
    /// Sessions that want to hear of their user's markers, by user.
    listeners: DashMap<String, Vec<Listening>>,
    config: CursorsConfig,
    incarnation: Incarnation,
}

impl std::fmt::Debug for Devices {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Devices")
            .field("listening_users", &self.listeners.len())
            .finish_non_exhaustive()
    }
}

struct Shared {
    pending: Mutex<Pending>,
    /// The last generation written.
    stored: watch::Sender<Written>,
    /// Set by [`DevicesThread::shutdown`]: sessions may still hold the
    /// queue's sender, so its disconnection cannot be what stops the thread.
    closed: AtomicBool,
}

/// Values waiting for the next flush.
#[derive(Default)]
struct Pending {
    /// The generation the next flush writes.
    generation: u64,
    marks: HashMap<Vec<u8>, Mark>,
    /// Registry entries: when each device was last seen.
    seen: HashMap<Vec<u8>, u64>,
    /// Marks a remote flush is writing: reads still see them.
    in_flight: HashMap<Vec<u8>, Mark>,
}

impl Pending {
    /// What waits for (or is in) a flush for `key`.
    fn mark(&self, key: &[u8], by: Incarnation) -> Option<Mark> {
        match (self.in_flight.get(key), self.marks.get(key)) {
            (Some(a), Some(b)) => Some(by.merge(*a, *b)),
            (a, b) => a.or(b).copied(),
        }
    }
}

impl Shared {
    fn new() -> Self {
        Self {
            pending: Mutex::new(Pending {
                generation: 1,
                ..Pending::default()
            }),
            stored: watch::Sender::new(Written::default()),
            closed: AtomicBool::new(false),
        }
    }

    fn pending(&self) -> std::sync::MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }
}

enum Request {
    Register {
        user: String,
        device: DeviceId,
        reply: oneshot::Sender<Result<(), DeviceError>>,
    },
    Get {
        keys: Vec<Vec<u8>>,
        reply: oneshot::Sender<Result<Vec<Option<Mark>>, DeviceError>>,
    },
    Markers {
        user: String,
        limit: usize,
        reply: oneshot::Sender<Result<Vec<(ChannelName, Mark)>, DeviceError>>,
    },
    /// Flush now (the pending set is large).
    Flush,
    /// Sweep now, not at the next interval.
    Sweep,
}

/// The devices thread; [`DevicesThread::shutdown`] writes what is pending
/// and stops it.
#[derive(Debug)]
pub struct DevicesThread {
    devices: Arc<Devices>,
    thread: Option<JoinHandle<()>>,
}

impl DevicesThread {
    /// The sessions' handle.
    pub fn devices(&self) -> &Arc<Devices> {
        &self.devices
    }

    /// Writes what is pending and joins the thread. Blocks: call it from a
    /// blocking context.
    pub fn shutdown(mut self) {
        self.devices.shared.closed.store(true, Ordering::SeqCst);
        if let Backend::Thread(requests) = &self.devices.backend {
            // Wakes the thread; a full queue means it is awake anyway.
            let _ = requests.try_send(Request::Flush);
            requests.close();
        }
        if let Some(thread) = self.thread.take()
            && thread.join().is_err()
        {
            error!("the devices thread panicked");
        }
    }
}

/// Starts the devices thread over `store`; `channels` is the durable log's
/// store, which the sweep asks whether a mark's channel still exists.
pub fn start(
    store: Arc<dyn DeviceStore>,
    channels: Arc<dyn LogStore>,
    config: &CursorsConfig,
    durability: Durability,
    metrics: Arc<Metrics>,
) -> Result<DevicesThread, StoreError> {
    let (requests, rx) = queue::bounded(1024);
    let shared = Arc::new(Shared::new());
    let devices = Arc::new(Devices {
        shared: shared.clone(),
        backend: Backend::Thread(requests),
        listeners: DashMap::new(),
        config: config.clone(),
        incarnation: Incarnation::ChannelId,
    });
    let worker = Worker {
        shared,
        store,
        channels,
        sync: durability == Durability::Fsync,
        config: config.clone(),
        metrics,
        sweep: None,
    };
    let thread = std::thread::Builder::new()
        .name("volna-devices".into())
        .spawn(move || worker.run(&rx))
        .map_err(|e| StoreError::Engine(format!("cannot start the devices thread: {e}")))?;
    Ok(DevicesThread {
        devices,
        thread: Some(thread),
    })
}

/// Device state kept by `remote` (a cluster's partitions): the handle, and
/// the task that flushes what sessions acknowledged every
/// `cursors.flush_ms` until `stop` (then once more).
pub fn start_remote(
    remote: Arc<dyn RemoteDevices>,
    config: &CursorsConfig,
    metrics: Arc<Metrics>,
    stop: tokio_util::sync::CancellationToken,
) -> (Arc<Devices>, tokio::task::JoinHandle<()>) {
    let shared = Arc::new(Shared::new());
    let flush = Arc::new(tokio::sync::Notify::new());
    let devices = Arc::new(Devices {
        shared: shared.clone(),
        backend: Backend::Remote {
            remote: remote.clone(),
            flush: flush.clone(),
        },
        listeners: DashMap::new(),
        config: config.clone(),
        incarnation: Incarnation::Epoch,
    });
    let every = Duration::from_millis(config.flush_ms.max(1));
    let task = tokio::spawn(async move {
        loop {
            let stopping = tokio::select! {
                () = stop.cancelled() => true,
                () = tokio::time::sleep(every) => false,
                () = flush.notified() => false,
            };
            flush_remote(&shared, &*remote, &metrics).await;
            if stopping {
                shared.closed.store(true, Ordering::SeqCst);
                break;
            }
        }
    });
    (devices, task)
}

/// One flush of what waits to `remote`: `Stored` follows for the whole
/// generation once every partition took its part; what one could not
/// take waits for the next flush.
async fn flush_remote(shared: &Shared, remote: &dyn RemoteDevices, metrics: &Metrics) {
    let (generation, marks, seen) = {
        let mut pending = shared.pending();
        if pending.marks.is_empty() && pending.seen.is_empty() {
            return;
        }
        let generation = pending.generation;
        pending.generation += 1;
        let marks = std::mem::take(&mut pending.marks);
        pending.in_flight.clone_from(&marks);
        (generation, marks, std::mem::take(&mut pending.seen))
    };
    let unwritten = remote
        .write(marks.into_iter().collect(), seen.into_iter().collect())
        .await;
    let mut pending = shared.pending();
    pending.in_flight.clear();
    // Each partition's devices hear `Stored` as soon as their partition
    // committed: one partition without a leader holds up only its users.
    if !unwritten.written.is_empty() {
        shared.stored.send_modify(|stored| {
            for partition in &unwritten.written {
                let at = stored.by_partition.entry(*partition).or_default();
                *at = (*at).max(generation);
            }
        });
    }
    if unwritten.marks.is_empty() && unwritten.seen.is_empty() {
        return;
    }
    warn!(
        error = unwritten.why.as_deref().unwrap_or("unknown"),
        marks = unwritten.marks.len(),
        "device state not committed; retrying at the next flush"
    );
    metrics.cursor_write_errors.inc();
    for (key, mark) in unwritten.marks {
        pending
            .marks
            .entry(key)
            .and_modify(|m| *m = Incarnation::Epoch.merge(mark, *m))
            .or_insert(mark);
    }
    for (key, ms) in unwritten.seen {
        pending.seen.entry(key).or_insert(ms);
    }
}

impl Devices {
    /// The configuration in force.
    pub fn config(&self) -> &CursorsConfig {
        &self.config
    }

    /// What names a channel's incarnation in this broker's marks.
    pub fn incarnation(&self) -> Incarnation {
        self.incarnation
    }

    /// Registers `device` of `user` as seen now; refuses a new device
    /// beyond `cursors.max_devices_per_user`.
    pub async fn register(&self, user: &str, device: &DeviceId) -> Result<(), DeviceError> {
        let (user, device) = (user.to_owned(), device.clone());
        if let Backend::Remote { remote, .. } = &self.backend {
            // Stamped now as well as when the session ends: a device that
            // stays connected is not idle.
            self.seen(&user, &device);
            return match remote
                .register(
                    user.clone(),
                    device.clone(),
                    self.config.max_devices_per_user,
                )
                .await
            {
                // The user's partition has no reachable leader right now
                // (an election, a cut): the device still connects, and its
                // channels elsewhere serve it. Only a new device beyond the
                // limit is refused, once the partition answers.
                Err(DeviceError::Storage(why)) => {
                    warn!(%user, device = %device, error = %why, "device not registered (its partition does not answer); it connects anyway");
                    Ok(())
                }
                other => other,
            };
        }
        self.ask(|reply| Request::Register {
            user,
            device,
            reply,
        })
        .await?
    }

    /// Notes that `device` was seen now (a session ended): written with
    /// the next flush.
    pub fn seen(&self, user: &str, device: &DeviceId) {
        self.shared
            .pending()
            .seen
            .insert(layout::device_key(user, device), crate::log::now_ms());
    }

    /// Moves `device`'s cursor on `channel` to `mark` (never backwards).
    pub fn ack(&self, user: &str, device: &DeviceId, channel: &ChannelName, mark: Mark) -> Ticket {
        self.put(user, layout::cursor_key(user, device, channel), mark)
    }

    /// Moves `user`'s read marker on `channel` to `mark` (max wins).
    pub fn mark_read(&self, user: &str, channel: &ChannelName, mark: Mark) -> Ticket {
        self.put(user, layout::marker_key(user, channel), mark)
    }

    fn put(&self, user: &str, key: Vec<u8>, mark: Mark) -> Ticket {
        let partition = match &self.backend {
            Backend::Remote { remote, .. } => remote.partition_of(user),
            Backend::Thread(_) => 0,
        };
        let by = self.incarnation;
        let (ticket, len) = {
            let mut pending = self.shared.pending();
            pending
                .marks
                .entry(key)
                .and_modify(|m| *m = by.merge(*m, mark))
                .or_insert(mark);
            (
                Ticket {
                    generation: pending.generation,
                    partition,
                },
                pending.marks.len(),
            )
        };
        if len >= MAX_PENDING {
            match &self.backend {
                // Best effort: a full request queue means the thread is
                // busy and flushes at its next turn anyway.
                Backend::Thread(requests) => {
                    let _ = requests.try_send(Request::Flush);
                }
                Backend::Remote { flush, .. } => flush.notify_one(),
            }
        }
        ticket
    }

    /// The marks of `keys` as kept, merged with what waits for a flush
    /// here (read first: a flush that takes it meanwhile is then in what
    /// is kept).
    async fn remote_marks(
        &self,
        remote: &dyn RemoteDevices,
        keys: Vec<Vec<u8>>,
    ) -> Result<Vec<Option<Mark>>, DeviceError> {
        let by = self.incarnation;
        let local: Vec<Option<Mark>> = {
            let pending = self.shared.pending();
            keys.iter().map(|k| pending.mark(k, by)).collect()
        };
        let kept = remote.get(keys).await?;
        Ok(kept
            .into_iter()
            .zip(local)
            .map(|(kept, local)| match (kept, local) {
                (Some(k), Some(l)) => Some(by.merge(k, l)),
                (k, l) => k.or(l),
            })
            .collect())
    }

    /// Waits until the update that got `ticket` is durable.
    pub async fn stored(&self, ticket: Ticket) -> Result<(), DeviceError> {
        let mut stored = self.shared.stored.subscribe();
        let written = stored.wait_for(|w| w.covers(ticket));
        if matches!(self.backend, Backend::Thread(_)) {
            return written.await.map(|_| ()).map_err(|_| DeviceError::Closed);
        }
        match tokio::time::timeout(STORED_WITHIN, written).await {
            Ok(written) => written.map(|_| ()).map_err(|_| DeviceError::Closed),
            Err(_) if self.shared.closed.load(Ordering::SeqCst) => Err(DeviceError::Closed),
            Err(_) => Err(DeviceError::Storage(format!(
                "the user's partition did not commit it within {STORED_WITHIN:?}; it is \
                 proposed again"
            ))),
        }
    }

    /// `device`'s cursor on `channel`, if it has one.
    pub async fn cursor(
        &self,
        user: &str,
        device: &DeviceId,
        channel: &ChannelName,
    ) -> Result<Option<Mark>, DeviceError> {
        let keys = vec![layout::cursor_key(user, device, channel)];
        let mut found = match &self.backend {
            Backend::Remote { remote, .. } => self.remote_marks(&**remote, keys).await?,
            Backend::Thread(_) => self.ask(|reply| Request::Get { keys, reply }).await??,
        };
        Ok(found.pop().flatten())
    }

    /// `user`'s read markers on `channels`, in the same order.
    pub async fn markers(
        &self,
        user: &str,
        channels: &[ChannelName],
    ) -> Result<Vec<Option<Mark>>, DeviceError> {
        let keys = channels
            .iter()
            .map(|c| layout::marker_key(user, c))
            .collect();
        match &self.backend {
            Backend::Remote { remote, .. } => self.remote_marks(&**remote, keys).await,
            Backend::Thread(_) => self.ask(|reply| Request::Get { keys, reply }).await?,
        }
    }

    /// Up to `limit` of `user`'s read markers, in channel name order.
    pub async fn all_markers(
        &self,
        user: &str,
        limit: usize,
    ) -> Result<Vec<(ChannelName, Mark)>, DeviceError> {
        let user = user.to_owned();
        let Backend::Remote { remote, .. } = &self.backend else {
            return self
                .ask(|reply| Request::Markers { user, limit, reply })
                .await?;
        };
        let by = self.incarnation;
        let local: Vec<(ChannelName, Mark)> = {
            let pending = self.shared.pending();
            pending
                .in_flight
                .iter()
                .chain(pending.marks.iter())
                .filter_map(|(key, mark)| Some((layout::marker_channel(&user, key)?, *mark)))
                .collect()
        };
        let mut found: std::collections::BTreeMap<ChannelName, Mark> =
            remote.markers(user, limit).await?.into_iter().collect();
        for (channel, mark) in local {
            found
                .entry(channel)
                .and_modify(|m| *m = by.merge(*m, mark))
                .or_insert(mark);
        }
        Ok(found.into_iter().take(limit).collect())
    }

    /// `user`'s unread counts on `channels` (none: every channel the user
    /// has a read marker on that `visible` lets through, at most `limit`),
    /// from the channels' heads in `logs` and the user's markers: no log
    /// is read.
    pub async fn unread(
        &self,
        logs: &Logs,
        user: &str,
        channels: Vec<ChannelName>,
        limit: usize,
        visible: impl Fn(&ChannelName) -> bool,
    ) -> Result<Vec<(ChannelName, Unread)>, DeviceError> {
        let marks: Vec<(ChannelName, Option<Mark>)> = if channels.is_empty() {
            self.all_markers(user, limit)
                .await?
                .into_iter()
                .filter(|(c, _)| visible(c))
                .map(|(c, m)| (c, Some(m)))
                .collect()
        } else {
            let marks = self.markers(user, &channels).await?;
            channels.into_iter().zip(marks).collect()
        };
        let metas: Vec<Option<ChannelMeta>> = match &self.backend {
            // Batched per partition by the cluster.
            Backend::Remote { remote, .. } => {
                remote
                    .heads(marks.iter().map(|(c, _)| c.clone()).collect())
                    .await?
            }
            Backend::Thread(_) => {
                let mut metas = Vec::with_capacity(marks.len());
                for (channel, _) in &marks {
                    metas.push(logs.for_channel(channel).lookup(channel).await?);
                }
                metas
            }
        };
        Ok(marks
            .into_iter()
            .zip(metas)
            .map(|((channel, mark), meta)| {
                let count = layout::unread(
                    meta.as_ref(),
                    mark.as_ref(),
                    self.config.unread_cap,
                    self.incarnation,
                );
                (channel, count)
            })
            .collect())
    }

    /// Starts a sweep for idle devices and the marks of deleted channels
    /// now (one runs every `cursors.sweep_interval_secs` anyway).
    pub fn sweep_now(&self) {
        if let Backend::Thread(requests) = &self.backend {
            let _ = requests.try_send(Request::Sweep);
        }
    }

    /// Lets session `session` of `user` hear of the user's markers.
    pub fn listen(&self, user: &str, session: u64, listener: Arc<dyn MarkerListener>) {
        self.listeners
            .entry(user.to_owned())
            .or_default()
            .push((session, listener));
    }

    /// Undoes [`Devices::listen`].
    pub fn unlisten(&self, user: &str, session: u64) {
        self.listeners.remove_if_mut(user, |_, sessions| {
            sessions.retain(|(id, _)| *id != session);
            sessions.is_empty()
        });
    }

    /// Tells `user`'s sessions other than `from` (0: none is left out)
    /// that the marker on `channel` moved to `offset`.
    pub fn announce(&self, user: &str, from: u64, channel: &ChannelName, offset: Offset) {
        if let Some(sessions) = self.listeners.get(user) {
            for (_, listener) in sessions.iter().filter(|(id, _)| *id != from) {
                listener.marker_moved(channel, offset);
            }
        }
    }

    async fn ask<T>(
        &self,
        request: impl FnOnce(oneshot::Sender<T>) -> Request,
    ) -> Result<T, DeviceError> {
        let (reply, rx) = oneshot::channel();
        let Backend::Thread(requests) = &self.backend else {
            return Err(DeviceError::Closed);
        };
        requests
            .send(request(reply))
            .await
            .map_err(|_| DeviceError::Closed)?;
        rx.await.map_err(|_| DeviceError::Closed)
    }
}

/// The user whose registry a sweep is reading.
struct SweptUser {
    name: String,
    /// Devices still in use, and the count stored before the sweep.
    live: u64,
    counted: u64,
}

/// Where a sweep stands.
struct Sweep {
    /// The next key to read.
    next: Vec<u8>,
    /// The user whose devices are being read.
    user: Option<SweptUser>,
    /// Channels looked up in this step.
    channel_ids: HashMap<ChannelName, Option<ChannelId>>,
    started: Instant,
    devices_expired: u64,
    marks_removed: u64,
}

struct Worker {
    shared: Arc<Shared>,
    store: Arc<dyn DeviceStore>,
    channels: Arc<dyn LogStore>,
    sync: bool,
    config: CursorsConfig,
    metrics: Arc<Metrics>,
    sweep: Option<Sweep>,
}

impl Worker {
    fn run(mut self, rx: &Receiver<Queued<Request>>) {
        let flush_every = Duration::from_millis(self.config.flush_ms);
        let sweep_every = Duration::from_secs(self.config.sweep_interval_secs);
        let mut next_flush = Instant::now() + flush_every;
        // The first sweep comes one interval after start: a restart loop
        // must not sweep the whole registry each time.
        let mut next_sweep = Instant::now() + sweep_every;
        loop {
            let wait = if self.sweep.is_some() {
                Duration::ZERO
            } else {
                next_flush
                    .min(next_sweep)
                    .saturating_duration_since(Instant::now())
            };
            match rx.recv_timeout(wait) {
                Ok(request) => self.serve(request.item, &mut next_flush),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break,
            }
            let now = Instant::now();
            if now >= next_flush {
                self.flush();
                next_flush = now + flush_every;
            }
            if now >= next_sweep && self.sweep.is_none() {
                self.start_sweep();
                next_sweep = now + sweep_every;
            }
            if self.shared.closed.load(Ordering::SeqCst) && rx.is_empty() {
                break;
            }
            if self.sweep.is_some() && rx.is_empty() {
                self.sweep_step();
            }
        }
        // Shutting down: what was acknowledged to nobody yet is still
        // written, so a clean stop loses no ack.
        self.flush();
        info!("device state written; the devices thread stops");
    }

    fn serve(&mut self, request: Request, next_flush: &mut Instant) {
        match request {
            Request::Register {
                user,
                device,
                reply,
            } => {
                let _ = reply.send(self.register(&user, &device));
            }
            Request::Get { keys, reply } => {
                let _ = reply.send(self.get(&keys));
            }
            Request::Markers { user, limit, reply } => {
                let _ = reply.send(self.markers(&user, limit));
            }
            Request::Flush => {
                self.flush();
                *next_flush = Instant::now() + Duration::from_millis(self.config.flush_ms);
            }
            Request::Sweep => {
                if self.sweep.is_none() {
                    self.start_sweep();
                }
            }
        }
    }

    fn register(&self, user: &str, device: &DeviceId) -> Result<(), DeviceError> {
        let key = layout::device_key(user, device);
        let now = crate::log::now_ms();
        let known = self.shared.pending().seen.contains_key(&key)
            || self.store.get_device_entries(std::slice::from_ref(&key))?[0].is_some();
        if !known {
            let limit = self.config.max_devices_per_user;
            let count_key = layout::device_count_key(user);
            let held = self
                .store
                .get_device_entries(std::slice::from_ref(&count_key))?[0]
                .as_deref()
                .map_or(0, decode_u64);
            if held >= u64::from(limit) {
                return Err(DeviceError::TooManyDevices {
                    user: user.to_owned(),
                    limit,
                });
            }
            // Written now, with the count, not with the next flush: the
            // next registration of this user counts it.
            let write = DeviceWrite {
                puts: vec![
                    (key, now.to_be_bytes().to_vec()),
                    (count_key, (held + 1).to_be_bytes().to_vec()),
                ],
                removed_ranges: Vec::new(),
            };
            self.store.write_device_entries(&write, self.sync)?;
            return Ok(());
        }
        self.shared.pending().seen.insert(key, now);
        Ok(())
    }

    fn get(&self, keys: &[Vec<u8>]) -> Result<Vec<Option<Mark>>, DeviceError> {
        let stored = self.store.get_device_entries(keys)?;
        let pending = self.shared.pending();
        Ok(keys
            .iter()
            .zip(stored)
            .map(|(key, stored)| {
                let stored = stored.as_deref().and_then(Mark::decode);
                match (stored, pending.marks.get(key)) {
                    (Some(s), Some(p)) => Some(s.merge(*p)),
                    (s, p) => s.or(p.copied()),
                }
            })
            .collect())
    }

    fn markers(&self, user: &str, limit: usize) -> Result<Vec<(ChannelName, Mark)>, DeviceError> {
        let (from, until) = layout::user_markers(user);
        let mut found: std::collections::BTreeMap<ChannelName, Mark> = self
            .store
            .scan_device_entries(&from, &until, limit)?
            .into_iter()
            .filter_map(|(key, value)| {
                Some((layout::marker_channel(user, &key)?, Mark::decode(&value)?))
            })
            .collect();
        for (key, mark) in &self.shared.pending().marks {
            if let Some(channel) = layout::marker_channel(user, key) {
                found
                    .entry(channel)
                    .and_modify(|m| *m = m.merge(*mark))
                    .or_insert(*mark);
            }
        }
        Ok(found.into_iter().take(limit).collect())
    }

    /// Writes every pending value merged with its stored one, in one write.
    fn flush(&mut self) {
        let (generation, marks, seen) = {
            let mut pending = self.shared.pending();
            if pending.marks.is_empty() && pending.seen.is_empty() {
                // Nothing to write, and the generation stays open: an ack
                // that comes next gets its ticket, which only the write
                // holding it may satisfy.
                return;
            }
            let generation = pending.generation;
            pending.generation += 1;
            (
                generation,
                std::mem::take(&mut pending.marks),
                std::mem::take(&mut pending.seen),
            )
        };
        let marks: Vec<(Vec<u8>, Mark)> = marks.into_iter().collect();
        let written = (|| -> Result<usize, StoreError> {
            let keys: Vec<Vec<u8>> = marks.iter().map(|(k, _)| k.clone()).collect();
            let stored = self.store.get_device_entries(&keys)?;
            let mut write = DeviceWrite::default();
            for ((key, mark), stored) in marks.iter().zip(stored) {
                let merged = match stored.as_deref().and_then(Mark::decode) {
                    Some(s) => s.merge(*mark),
                    None => *mark,
                };
                write.puts.push((key.clone(), merged.encode()));
            }
            for (key, ms) in &seen {
                write.puts.push((key.clone(), ms.to_be_bytes().to_vec()));
            }
            self.store.write_device_entries(&write, self.sync)?;
            Ok(write.puts.len())
        })();
        match written {
            Ok(count) => {
                self.metrics.cursor_writes.inc_by(count as u64);
                self.shared.stored.send_modify(|w| w.all = generation);
            }
            Err(e) => {
                // Kept for the next flush: the acks wait, none is lost.
                warn!(error = %e, "writing device cursors failed; retrying at the next flush");
                self.metrics.cursor_write_errors.inc();
                let mut pending = self.shared.pending();
                for (key, mark) in marks {
                    pending
                        .marks
                        .entry(key)
                        .and_modify(|m| *m = m.merge(mark))
                        .or_insert(mark);
                }
                for (key, ms) in seen {
                    pending.seen.entry(key).or_insert(ms);
                }
                // Their tickets name `generation`: the retry writes them in
                // a later one, which satisfies them too.
            }
        }
    }

    fn start_sweep(&mut self) {
        self.sweep = Some(Sweep {
            next: layout::all_devices().0,
            user: None,
            channel_ids: HashMap::new(),
            started: Instant::now(),
            devices_expired: 0,
            marks_removed: 0,
        });
    }

    /// Reads the next [`SWEEP_STEP`] entries: removes idle devices with
    /// their cursors (and a user's markers with their last device), and
    /// marks whose channel was deleted.
    fn sweep_step(&mut self) {
        let Some(mut sweep) = self.sweep.take() else {
            return;
        };
        match self.sweep_entries(&mut sweep) {
            Ok(true) => self.sweep = Some(sweep),
            Ok(false) => {
                self.metrics.devices_expired.inc_by(sweep.devices_expired);
                self.metrics.cursors_orphaned.inc_by(sweep.marks_removed);
                info!(
                    devices_expired = sweep.devices_expired,
                    marks_removed = sweep.marks_removed,
                    took_ms = sweep.started.elapsed().as_millis() as u64,
                    "device sweep done"
                );
            }
            Err(e) => warn!(error = %e, "device sweep failed; it runs again at the next interval"),
        }
    }

    /// One step of `sweep`; whether there is more to read.
    fn sweep_entries(&self, sweep: &mut Sweep) -> Result<bool, StoreError> {
        let (_, devices_end) = layout::all_devices();
        let (marks_start, marks_end) = layout::all_marks();
        let in_registry = sweep.next < devices_end;
        let until = if in_registry { devices_end } else { marks_end };
        let entries = self
            .store
            .scan_device_entries(&sweep.next, &until, SWEEP_STEP)?;
        let idle_ms = self.config.device_idle_days.saturating_mul(DAY_MS);
        let now = crate::log::now_ms();
        let mut write = DeviceWrite::default();
        for (key, value) in &entries {
            match layout::parse_key(key) {
                Some(layout::Key::DeviceCount { user }) => {
                    self.close_user(sweep, &mut write);
                    sweep.user = Some(SweptUser {
                        name: user,
                        live: 0,
                        counted: decode_u64(value),
                    });
                }
                Some(layout::Key::Device { user, device }) => {
                    if sweep.user.as_ref().is_none_or(|u| u.name != user) {
                        // A registry without its count (written before
                        // counts were kept): the sweep counts it now.
                        self.close_user(sweep, &mut write);
                        sweep.user = Some(SweptUser {
                            name: user.clone(),
                            live: 0,
                            counted: u64::MAX,
                        });
                    }
                    let Ok(device) = DeviceId::new(&device) else {
                        continue;
                    };
                    if now.saturating_sub(decode_u64(value)) > idle_ms {
                        sweep.devices_expired += 1;
                        write.removed_ranges.push(single(key));
                        write
                            .removed_ranges
                            .push(layout::device_cursors(&user, &device));
                    } else if let Some(swept) = &mut sweep.user {
                        swept.live += 1;
                    }
                }
                Some(layout::Key::Mark { channel, .. }) => {
                    let Some(mark) = Mark::decode(value) else {
                        continue;
                    };
                    let id = match sweep.channel_ids.get(&channel) {
                        Some(id) => *id,
                        None => {
                            let id = self.channels.load_channel(&channel)?.map(|m| m.id);
                            sweep.channel_ids.insert(channel, id);
                            id
                        }
                    };
                    if id != Some(mark.channel_id) {
                        sweep.marks_removed += 1;
                        write.removed_ranges.push(single(key));
                    }
                }
                None => {}
            }
        }
        sweep.channel_ids.clear();
        let more = entries.len() == SWEEP_STEP;
        match entries.last() {
            Some((last, _)) if more => {
                sweep.next = last.clone();
                sweep.next.push(0);
            }
            _ if in_registry => {
                self.close_user(sweep, &mut write);
                sweep.next = marks_start;
            }
            _ => {}
        }
        if !write.removed_ranges.is_empty() || !write.puts.is_empty() {
            self.store.write_device_entries(&write, self.sync)?;
        }
        Ok(more || in_registry)
    }

    /// The sweep is past `sweep.user`'s devices: the count is set to
    /// those still in use; with none, it goes, and the user's read markers
    /// with it. (A device registered while a sweep step boundary falls
    /// inside its user's registry, behind the sweep, is missed by this
    /// recount: the user may then hold one device over the limit until the
    /// next sweep counts again.)
    fn close_user(&self, sweep: &mut Sweep, write: &mut DeviceWrite) {
        let Some(user) = sweep.user.take() else {
            return;
        };
        let count_key = layout::device_count_key(&user.name);
        if user.live == 0 {
            write.removed_ranges.push(single(&count_key));
            write.removed_ranges.push(layout::user_markers(&user.name));
        } else if user.live != user.counted {
            write
                .puts
                .push((count_key, user.live.to_be_bytes().to_vec()));
        }
    }
}

/// A stored `u64` (0 for anything else).
fn decode_u64(bytes: &[u8]) -> u64 {
    bytes.try_into().map_or(0, u64::from_be_bytes)
}

/// The range holding exactly `key`.
pub(crate) fn single(key: &[u8]) -> (Vec<u8>, Vec<u8>) {
    let mut until = key.to_vec();
    until.push(0);
    (key.to_vec(), until)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{ChannelMeta, MemoryDeviceStore, MemoryStore, WriteSet};
    use volna_proto::Epoch;

    fn channel(name: &str) -> ChannelName {
        ChannelName::new(name).expect("valid")
    }

    fn mark(offset: u64, channel_id: u64) -> Mark {
        Mark {
            offset: Offset::new(offset),
            channel_id,
            updated_ms: crate::log::now_ms(),
        }
    }

    fn started(
        config: &CursorsConfig,
    ) -> (DevicesThread, Arc<MemoryDeviceStore>, Arc<MemoryStore>) {
        let store = Arc::new(MemoryDeviceStore::default());
        let channels = Arc::new(MemoryStore::new());
        let thread = start(
            store.clone(),
            channels.clone(),
            config,
            Durability::Wal,
            Arc::new(Metrics::new()),
        )
        .expect("start");
        (thread, store, channels)
    }

    #[tokio::test]
    async fn acks_coalesce_become_durable_and_never_move_back() {
        let config = CursorsConfig {
            flush_ms: 20,
            ..CursorsConfig::default()
        };
        let (thread, store, _) = started(&config);
        let devices = thread.devices().clone();
        let phone = DeviceId::new("phone").expect("valid");
        let chat = channel("chat.1");
        devices.register("alice", &phone).await.expect("register");
        let t1 = devices.ack("alice", &phone, &chat, mark(7, 1));
        let t2 = devices.ack("alice", &phone, &chat, mark(5, 1));
        // Seen before the flush, merged: the later, smaller ack lost.
        let cursor = devices.cursor("alice", &phone, &chat).await.expect("read");
        assert_eq!(cursor.map(|m| m.offset.get()), Some(7));
        devices.stored(t1.max(t2)).await.expect("stored");
        let key = layout::cursor_key("alice", &phone, &chat);
        let on_disk = store.get_device_entries(&[key]).expect("get")[0]
            .as_deref()
            .and_then(Mark::decode);
        assert_eq!(on_disk.map(|m| m.offset.get()), Some(7));
        // Stored: a smaller ack after the flush still cannot move it back.
        let t3 = devices.ack("alice", &phone, &chat, mark(3, 1));
        devices.stored(t3).await.expect("stored");
        let cursor = devices.cursor("alice", &phone, &chat).await.expect("read");
        assert_eq!(cursor.map(|m| m.offset.get()), Some(7));
        tokio::task::spawn_blocking(move || thread.shutdown())
            .await
            .expect("join");
    }

    /// Regression: an idle flush (nothing pending) marked the open
    /// generation as written, so the next ack's `Stored` came before its
    /// write (a kill -9 then lost an acknowledged cursor).
    #[tokio::test]
    async fn an_ack_after_an_idle_flush_is_stored_before_it_is_said_to_be() {
        let config = CursorsConfig {
            flush_ms: 10,
            ..CursorsConfig::default()
        };
        let (thread, store, _) = started(&config);
        let devices = thread.devices().clone();
        let phone = DeviceId::new("phone").expect("valid");
        let chat = channel("chat.idle");
        // Several flush intervals with nothing to write.
        tokio::time::sleep(Duration::from_millis(50)).await;
        let ticket = devices.ack("alice", &phone, &chat, mark(4, 1));
        devices.stored(ticket).await.expect("stored");
        let key = layout::cursor_key("alice", &phone, &chat);
        let on_disk = store.get_device_entries(&[key]).expect("get")[0].clone();
        assert!(on_disk.is_some(), "said to be stored before it was written");
        tokio::task::spawn_blocking(move || thread.shutdown())
            .await
            .expect("join");
    }

    /// A cluster's partitions as a test wants them: `down` takes nothing.
    #[derive(Debug, Default)]
    struct Partitions {
        down: Mutex<Option<u32>>,
        kept: Mutex<HashMap<Vec<u8>, Mark>>,
    }

    impl RemoteDevices for Partitions {
        fn register(
            &self,
            _: String,
            _: DeviceId,
            _: u32,
        ) -> BoxFuture<'_, Result<(), DeviceError>> {
            Box::pin(async { Ok(()) })
        }
        fn get(&self, keys: Vec<Vec<u8>>) -> BoxFuture<'_, Result<Vec<Option<Mark>>, DeviceError>> {
            let kept = self.kept.lock().expect("lock");
            let found = keys.iter().map(|k| kept.get(k).copied()).collect();
            Box::pin(async move { Ok(found) })
        }
        fn markers(
            &self,
            _: String,
            _: usize,
        ) -> BoxFuture<'_, Result<Vec<(ChannelName, Mark)>, DeviceError>> {
            Box::pin(async { Ok(Vec::new()) })
        }
        fn partition_of(&self, user: &str) -> u32 {
            u32::from(user.starts_with('b'))
        }
        fn write(
            &self,
            marks: Vec<(Vec<u8>, Mark)>,
            _: Vec<(Vec<u8>, u64)>,
        ) -> BoxFuture<'_, Unwritten> {
            let down = *self.down.lock().expect("lock");
            let mut unwritten = Unwritten::default();
            for (key, mark) in marks {
                let user = match layout::parse_key(&key) {
                    Some(layout::Key::Mark { user, .. }) => user,
                    _ => continue,
                };
                let partition = self.partition_of(&user);
                if Some(partition) == down {
                    unwritten.marks.push((key, mark));
                    unwritten.why = Some("no leader".into());
                } else {
                    self.kept.lock().expect("lock").insert(key, mark);
                    unwritten.written.push(partition);
                }
            }
            Box::pin(async move { unwritten })
        }
        fn heads(
            &self,
            channels: Vec<ChannelName>,
        ) -> BoxFuture<'_, Result<Vec<Option<ChannelMeta>>, DeviceError>> {
            Box::pin(async move { Ok(vec![None; channels.len()]) })
        }
    }

    /// Regression (review of the cluster's device state): one partition
    /// without a leader held up `Stored` for every user of the node.
    #[tokio::test]
    async fn a_partition_without_a_leader_holds_up_only_its_own_users() {
        let config = CursorsConfig {
            flush_ms: 10,
            ..CursorsConfig::default()
        };
        let partitions = Arc::new(Partitions::default());
        *partitions.down.lock().expect("lock") = Some(1);
        let stop = tokio_util::sync::CancellationToken::new();
        let (devices, task) = start_remote(
            partitions.clone(),
            &config,
            Arc::new(Metrics::new()),
            stop.clone(),
        );
        let phone = DeviceId::new("phone").expect("valid");
        let chat = channel("chat.1");
        let (ann, bob) = ("ann", "bob");
        let ann_ticket = devices.ack(ann, &phone, &chat, mark(4, 9));
        let bob_ticket = devices.ack(bob, &phone, &chat, mark(6, 9));
        tokio::time::timeout(Duration::from_secs(5), devices.stored(ann_ticket))
            .await
            .expect("ann's partition committed: she is told at once")
            .expect("stored");
        assert!(
            tokio::time::timeout(Duration::from_millis(200), devices.stored(bob_ticket))
                .await
                .is_err(),
            "bob's partition has no leader: not stored yet"
        );
        // Reads still see what waits for bob's partition.
        let cursor = devices.cursor(bob, &phone, &chat).await.expect("read");
        assert_eq!(cursor.map(|m| m.offset.get()), Some(6));
        // The partition elects: what waited is proposed again and stored.
        *partitions.down.lock().expect("lock") = None;
        tokio::time::timeout(Duration::from_secs(5), devices.stored(bob_ticket))
            .await
            .expect("stored once the partition answers")
            .expect("stored");
        stop.cancel();
        task.await.expect("flush task");
    }

    #[tokio::test]
    async fn a_user_may_hold_only_so_many_devices() {
        let config = CursorsConfig {
            max_devices_per_user: 2,
            ..CursorsConfig::default()
        };
        let (thread, _, _) = started(&config);
        let devices = thread.devices().clone();
        let id = |s: &str| DeviceId::new(s).expect("valid");
        devices.register("bob", &id("a")).await.expect("first");
        devices.register("bob", &id("b")).await.expect("second");
        devices
            .register("bob", &id("a"))
            .await
            .expect("a known one again");
        let third = devices.register("bob", &id("c")).await;
        assert!(matches!(
            third,
            Err(DeviceError::TooManyDevices { limit: 2, .. })
        ));
        devices
            .register("carol", &id("c"))
            .await
            .expect("another user");
        tokio::task::spawn_blocking(move || thread.shutdown())
            .await
            .expect("join");
    }

    #[tokio::test]
    async fn a_sweep_forgets_idle_devices_and_marks_of_deleted_channels() {
        let config = CursorsConfig {
            flush_ms: 10,
            device_idle_days: 1,
            ..CursorsConfig::default()
        };
        let (thread, store, channels) = started(&config);
        let devices = thread.devices().clone();
        let old = DeviceId::new("old-phone").expect("valid");
        let new = DeviceId::new("laptop").expect("valid");
        let (chat, gone) = (channel("chat.1"), channel("chat.2"));
        channels
            .write(
                &WriteSet {
                    channels: vec![(chat.clone(), ChannelMeta::new(1, Epoch(1)))],
                    ..WriteSet::default()
                },
                false,
            )
            .expect("channel");
        for device in [&old, &new] {
            devices.register("dan", device).await.expect("register");
            devices.ack("dan", device, &chat, mark(3, 1));
        }
        devices.ack("dan", &new, &gone, mark(3, 2));
        devices.mark_read("dan", &chat, mark(2, 1));
        let ticket = devices.mark_read("erin", &chat, mark(2, 1));
        devices.stored(ticket).await.expect("stored");
        // The old phone and erin's only device were last seen two days ago.
        let two_days_ago = (crate::log::now_ms() - 2 * DAY_MS).to_be_bytes().to_vec();
        let stale = DeviceId::new("tablet").expect("valid");
        store
            .write_device_entries(
                &DeviceWrite {
                    puts: vec![
                        (layout::device_key("dan", &old), two_days_ago.clone()),
                        (layout::device_key("erin", &stale), two_days_ago),
                    ],
                    removed_ranges: Vec::new(),
                },
                false,
            )
            .expect("age them");
        devices.sweep_now();
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let old_cursor = devices.cursor("dan", &old, &chat).await.expect("read");
            let erin = devices
                .markers("erin", std::slice::from_ref(&chat))
                .await
                .expect("read");
            let gone_cursor = devices.cursor("dan", &new, &gone).await.expect("read");
            if old_cursor.is_none() && erin[0].is_none() && gone_cursor.is_none() {
                break;
            }
            assert!(Instant::now() < deadline, "the sweep did not run");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // What is still in use stays.
        let kept = devices.cursor("dan", &new, &chat).await.expect("read");
        assert_eq!(kept.map(|m| m.offset.get()), Some(3));
        let dan = devices.all_markers("dan", 10).await.expect("read");
        assert_eq!(dan.len(), 1);
        // The counts follow: dan has one device left, erin none.
        let counts = store
            .get_device_entries(&[
                layout::device_count_key("dan"),
                layout::device_count_key("erin"),
            ])
            .expect("get");
        assert_eq!(counts[0].as_deref().map(decode_u64), Some(1));
        assert_eq!(counts[1], None);
        tokio::task::spawn_blocking(move || thread.shutdown())
            .await
            .expect("join");
    }
}
