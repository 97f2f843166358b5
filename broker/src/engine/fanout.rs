//! The fan-out engine: channel registry → recently committed, encoded
//! batches that every subscriber of the channel reads by offset.
//!
//! ```text
//!  writer thread ── committed(channel, messages) ──▶ ChannelFeed
//!                      encode once into Deliver frames   │ ring of FeedBatch (byte budget)
//!                                                        │ head: AtomicU64
//!                      wake shard k (once, coalesced) ───┤
//!                                  waker thread k ──▶ shard k's parked subscribers
//!              ┌─────────────────────┬───────────────────┘
//!         subscription 1       subscription 2  …  each keeps its own `next` offset
//! ```
//!
//! Publishing never waits on subscribers (issue 11 §D): the writer thread
//! pushes the batch into the ring and raises `head`, both O(1), and wakes a
//! channel's subscribers itself only while the shard holds a few; a larger
//! audience is split into shards, one per waker thread, so one big channel
//! is woken by every core and no commit pays for it.
//!
//! Each committed batch is encoded once into shared `Bytes` frames; every
//! subscriber hands the same frames to its connection, so there is no
//! per-subscriber copy of a payload. The ring is the channel's outbox: it
//! holds at most `channel_ring_bytes`, whatever the subscribers do. A
//! subscriber that falls behind the ring (its connection could not take the
//! frames in time) reads the missing offsets from the log and then finds
//! itself back in the ring: catch-up and rejoin need no coordination, because
//! both are just "deliver from offset `next`" (G3, G4). Publishers never wait
//! for subscribers.
//!
//! Invariants:
//! - The ring's batches are consecutive: `batches[i].end == batches[i+1].first`.
//! - `head` (the offset after the last committed message known here) only
//!   grows; anything below it is readable from the log.
//! - A channel's feed exists only while it has subscribers.
//! - A batch that ends at or before the ring's last one is already there
//!   (a cluster edge may hear a batch both from its upstream and from its
//!   own replica as it takes the partition over): it is not pushed again.
//! - A subscriber parked in [`FeedSubscription::changed`] is woken after
//!   every raise of `head` past what it saw: a shard's `pending` flag is
//!   cleared before its waiters are notified, so a raise after the clear
//!   queues another wake-up.
//! - The feed of an in-memory channel ([`Fanout::with_restartable_namespaces`])
//!   follows one epoch of its channel at a time: a cluster starts such a
//!   channel afresh under a new epoch when its partition changes leader. A
//!   batch of another epoch starts the ring and the head over at that
//!   batch: each subscriber still on the old epoch is told `EpochChanged`
//!   and goes on from there, never reading one epoch's offsets as
//!   another's. Other feeds change epoch only through a delete, which ends
//!   their subscribers.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};
use crossbeam_channel::{Sender, TrySendError};
use dashmap::DashMap;
use tokio::sync::Notify;
use volna_proto::{ChannelName, Epoch, Frame, Limits, Offset};

use crate::log::CommitListener;
use crate::store::{ChannelMeta, StoredMessage};

/// Payload bytes after which a batch is split into another `Deliver` frame,
/// so one frame never holds a stream's flow-control window hostage.
pub const TARGET_FRAME_BYTES: usize = 64 * 1024;

/// A shard with at most this many subscribers is woken on the writer
/// thread itself (a bounded cost, and one thread hop less of latency for
/// the small chats that are most channels).
const INLINE_WAKE_MAX: usize = 64;
/// Wake-ups queued per waker thread; coalescing keeps it to one per
/// (channel, shard), and beyond it the writer wakes the shard itself.
const WAKER_QUEUE: usize = 16 * 1024;

/// The registry of subscribed channels.
#[derive(Debug)]
pub struct Fanout {
    channels: Arc<DashMap<ChannelName, Arc<ChannelFeed>>>,
    ring_bytes: usize,
    /// Bytes held by every ring together, and the most they may hold.
    total: Arc<AtomicUsize>,
    max_total: usize,
    /// Orders channels by their last commit, for shrinking.
    commits: AtomicU64,
    /// Feeds made so far: each feed's number (see [`Fanout::feed_number`]).
    feeds_made: AtomicU64,
    shrinking: Mutex<()>,
    /// One queue per waker thread, shard `k` to thread `k`.
    wakers: Vec<Sender<(Arc<ChannelFeed>, usize)>>,
    /// Told when a channel gets its first subscriber and loses its last
    /// (a cluster node's edges, to follow channels it does not replicate).
    watcher: Arc<std::sync::OnceLock<Arc<dyn FeedWatcher>>>,
    /// Namespaces whose feeds start over on a batch of another epoch.
    restartable: Arc<std::collections::HashSet<String>>,
}

/// Hears of channels that got subscribers on this broker.
pub trait FeedWatcher: Send + Sync + std::fmt::Debug + 'static {
    /// `channel` has a feed again (its first subscriber). Called outside
    /// the registry's locks; must not block.
    fn opened(&self, channel: &ChannelName);
    /// `channel`'s last subscriber left: its feed is gone. Called from a
    /// subscription's drop, outside the registry's locks; must not block.
    fn closed(&self, channel: &ChannelName);
}

/// One channel's ring of encoded batches, its head offset and its
/// subscribers, in wake-up shards.
#[derive(Debug)]
pub struct ChannelFeed {
    ring: Mutex<Ring>,
    /// The offset after the last committed message known here.
    head: AtomicU64,
    shards: Box<[WakeShard]>,
    subscribers: AtomicUsize,
    /// Spreads subscribers over the shards.
    next_shard: AtomicUsize,
    /// When it last committed, in [`Fanout`]'s commit order.
    last_commit: AtomicU64,
    /// The channel was deleted: its subscribers end.
    deleted: AtomicBool,
    /// The epoch of the ring's batches (0: none seen yet); mirrors
    /// `Ring::epoch`, so a subscriber can tell without the lock that it is
    /// still on it.
    epoch: AtomicU64,
    /// A batch of another epoch starts the feed over (in-memory channels).
    restartable: bool,
    /// Which feed of the channel this is: a feed made after the last
    /// subscriber left is another one (a new number).
    number: u64,
}

/// Subscribers of a channel woken together.
#[derive(Debug, Default)]
struct WakeShard {
    notify: Notify,
    subscribers: AtomicUsize,
    /// A wake-up is queued for this shard and not yet delivered.
    pending: AtomicBool,
}

#[derive(Debug)]
struct Ring {
    batches: VecDeque<FeedBatch>,
    bytes: usize,
    /// See [`ChannelFeed::restartable`].
    restartable: bool,
    /// The channel's epoch the feed follows (`Epoch(0)`: not known yet).
    epoch: Epoch,
    /// The first offset the feed heard of in `epoch`: where a subscriber of
    /// an older epoch goes on from.
    since: Offset,
}

/// Messages `[first, end)` of one channel, encoded as one `Deliver` frame.
#[derive(Debug, Clone)]
struct FeedBatch {
    first: Offset,
    end: Offset,
    epoch: Epoch,
    /// When its first message was stored (ms since the Unix epoch).
    stored_ms: u64,
    frame: Bytes,
}

/// What a subscriber at offset `next` should do now.
#[derive(Debug)]
pub enum NextStep {
    /// Send these frames; afterwards the subscriber is at `end`.
    Send {
        /// Encoded `Deliver` frames, shared with other subscribers.
        frames: Vec<Bytes>,
        /// The offset after the last message in `frames`.
        end: Offset,
        /// When the oldest of these messages was stored (ms since the Unix
        /// epoch), for the publish → deliver latency.
        stored_ms: u64,
        /// The channel's epoch these messages belong to.
        epoch: Epoch,
    },
    /// The ring does not reach back to `next`: read `[next, until)` from
    /// the log.
    ReadLog {
        /// Where the ring (or the committed head) begins.
        until: Offset,
    },
    /// Nothing committed at or after `next` yet: wait for [`FeedSubscription::changed`].
    Wait,
    /// The feed went on to another epoch of the channel than the
    /// subscriber's: tell it (`EpochChanged`) and go on from `start`.
    Reset {
        /// The channel's epoch now.
        epoch: Epoch,
        /// Where delivery goes on, in `epoch`.
        start: Offset,
    },
    /// The channel was deleted with its log: the subscription ends.
    Deleted,
}

/// One subscriber's view of a channel feed; dropping the last one removes
/// the feed from the registry.
#[derive(Debug)]
pub struct FeedSubscription {
    channel: ChannelName,
    feed: Arc<ChannelFeed>,
    shard: usize,
    /// The head and the epoch as this subscriber last saw them.
    seen: u64,
    seen_epoch: u64,
    registry: Arc<DashMap<ChannelName, Arc<ChannelFeed>>>,
    total: Arc<AtomicUsize>,
    watcher: Arc<std::sync::OnceLock<Arc<dyn FeedWatcher>>>,
}

impl Fanout {
    /// An engine whose channels each keep up to `ring_bytes` of batches,
    /// with a waker thread per core.
    pub fn new(ring_bytes: usize) -> Self {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        Self::with_wakers(ring_bytes, cores.clamp(1, 16))
    }

    /// An engine with `wakers` waker threads (and as many shards per
    /// channel). The threads end when the engine is dropped.
    pub fn with_wakers(ring_bytes: usize, wakers: usize) -> Self {
        let wakers = (0..wakers.max(1))
            .filter_map(|k| {
                let (tx, rx) = crossbeam_channel::bounded::<(Arc<ChannelFeed>, usize)>(WAKER_QUEUE);
                std::thread::Builder::new()
                    .name(format!("volna-fanout-waker-{k}"))
                    .spawn(move || {
                        for (feed, shard) in rx {
                            feed.wake(shard);
                        }
                    })
                    .ok()
                    .map(|_| tx)
            })
            .collect();
        Self {
            channels: Arc::new(DashMap::new()),
            ring_bytes,
            total: Arc::new(AtomicUsize::new(0)),
            max_total: usize::MAX,
            commits: AtomicU64::new(0),
            feeds_made: AtomicU64::new(0),
            shrinking: Mutex::new(()),
            wakers,
            watcher: Arc::default(),
            restartable: Arc::default(),
        }
    }

    /// Lets the feeds of `namespaces` (in-memory ones: a cluster starts
    /// their channels afresh under a new epoch on a change of leader)
    /// start over on a batch of another epoch, telling their subscribers.
    pub fn with_restartable_namespaces(
        mut self,
        namespaces: std::collections::HashSet<String>,
    ) -> Self {
        self.restartable = Arc::new(namespaces);
        self
    }

    /// Tells `watcher` of every channel that gets subscribers from now on
    /// (set once).
    pub fn watch_feeds(&self, watcher: Arc<dyn FeedWatcher>) {
        let _ = self.watcher.set(watcher);
    }

    /// The channels with subscribers here now.
    pub fn subscribed_channel_names(&self) -> Vec<ChannelName> {
        self.channels.iter().map(|e| e.key().clone()).collect()
    }

    /// The offset after the last message `channel`'s feed knows was
    /// committed; `None` when it has no subscribers.
    pub fn head(&self, channel: &ChannelName) -> Option<Offset> {
        self.channels
            .get(channel)
            .map(|feed| Offset::new(feed.value().head.load(Ordering::Acquire)))
    }

    /// The number of `channel`'s feed, when it has subscribers: a feed
    /// made anew (its last subscriber had left) has another, so whoever
    /// fed the old one knows to start over.
    pub fn feed_number(&self, channel: &ChannelName) -> Option<u64> {
        self.channels.get(channel).map(|feed| feed.value().number)
    }

    /// The epoch of `channel` its feed follows, when it has subscribers
    /// and heard of one.
    pub fn epoch(&self, channel: &ChannelName) -> Option<Epoch> {
        self.channels
            .get(channel)
            .map(|feed| feed.value().epoch.load(Ordering::Acquire))
            .filter(|epoch| *epoch != 0)
            .map(Epoch)
    }

    /// Hands `channel`'s subscribers a `Deliver` frame of messages
    /// `[first, end)` committed elsewhere (a cluster edge's upstream): the
    /// frame is shared as received, exactly like a local commit's.
    pub fn relay(
        &self,
        channel: &ChannelName,
        epoch: Epoch,
        (first, end): (Offset, Offset),
        stored_ms: u64,
        frame: Bytes,
    ) {
        let Some(feed) = self.channels.get(channel).map(|f| f.value().clone()) else {
            return;
        };
        let batch = FeedBatch {
            first,
            end,
            epoch,
            stored_ms,
            frame,
        };
        self.push(&feed, vec![batch], end);
    }

    /// Pushes `batches` into `feed`'s ring, raises its head to `end` and
    /// wakes its subscribers.
    fn push(&self, feed: &Arc<ChannelFeed>, batches: Vec<FeedBatch>, end: Offset) {
        let mut reset = false;
        let raised;
        {
            let mut ring = feed.lock_ring();
            for batch in batches {
                let first = batch.first;
                let (added, freed, restarted) = ring.push(batch, self.ring_bytes);
                self.total.fetch_add(added, Ordering::Relaxed);
                self.total.fetch_sub(freed, Ordering::Relaxed);
                if restarted {
                    // Under the ring's lock, so that a subscriber that sees
                    // the new epoch sees the head of the new epoch too.
                    feed.head.store(first.get(), Ordering::Release);
                    reset = true;
                }
            }
            if feed.epoch.load(Ordering::Relaxed) != ring.epoch.0 {
                feed.epoch.store(ring.epoch.0, Ordering::Release);
            }
            // Under the lock too: a push of another epoch in between would
            // otherwise raise this one's head.
            raised = feed.head.fetch_max(end.get(), Ordering::AcqRel) < end.get();
        }
        let order = self.commits.fetch_add(1, Ordering::Relaxed);
        feed.last_commit.store(order, Ordering::Relaxed);
        if self.total.load(Ordering::Relaxed) > self.max_total {
            self.shrink();
        }
        if !raised && !reset {
            return;
        }
        if reset {
            for k in 0..feed.shards.len() {
                feed.wake(k);
            }
            return;
        }
        for (k, shard) in feed.shards.iter().enumerate() {
            let audience = shard.subscribers.load(Ordering::Relaxed);
            if audience == 0 || shard.pending.swap(true, Ordering::AcqRel) {
                // Nobody there, or a wake-up not yet delivered will do.
                continue;
            }
            if audience <= INLINE_WAKE_MAX {
                feed.wake(k);
                continue;
            }
            match self.wakers.get(k).map(|w| w.try_send((feed.clone(), k))) {
                Some(Ok(())) => {}
                // A waker far behind (or gone): correctness first.
                Some(Err(
                    TrySendError::Full((feed, k)) | TrySendError::Disconnected((feed, k)),
                )) => feed.wake(k),
                None => feed.wake(k),
            }
        }
    }

    /// Bounds the bytes all rings hold together (G4): beyond it the rings
    /// of the least recently active channels give up their oldest batches
    /// first, and their subscribers read those offsets from the log.
    pub fn with_total_budget(mut self, max_total: usize) -> Self {
        self.max_total = max_total.max(1);
        self
    }

    /// Channels with at least one subscriber.
    pub fn subscribed_channels(&self) -> usize {
        self.channels.len()
    }

    /// Bytes of encoded batches `channel`'s ring holds now, if it has
    /// subscribers.
    pub fn ring_bytes(&self, channel: &ChannelName) -> Option<usize> {
        self.channels
            .get(channel)
            .map(|feed| feed.value().lock_ring().bytes)
    }

    /// Subscribers of `channel` (on this broker).
    pub fn subscribers(&self, channel: &ChannelName) -> usize {
        self.channels
            .get(channel)
            .map_or(0, |feed| feed.value().subscribers.load(Ordering::Relaxed))
    }

    /// Bytes held by every channel's ring.
    pub fn total_ring_bytes(&self) -> usize {
        self.total.load(Ordering::Relaxed)
    }

    /// Drops the oldest batches of the least recently active channels
    /// until the rings hold 7/8 of the budget (so that shrinking is rare).
    fn shrink(&self) {
        // One shrink at a time; a commit that finds one running goes on.
        let Ok(_one) = self.shrinking.try_lock() else {
            return;
        };
        let target = self.max_total - self.max_total / 8;
        let mut feeds: Vec<(u64, Arc<ChannelFeed>)> = self
            .channels
            .iter()
            .map(|e| {
                (
                    e.value().last_commit.load(Ordering::Relaxed),
                    e.value().clone(),
                )
            })
            .collect();
        feeds.sort_unstable_by_key(|(last, _)| *last);
        for (_, feed) in feeds {
            let mut ring = feed.lock_ring();
            while self.total.load(Ordering::Relaxed) > target {
                let Some(old) = ring.batches.pop_front() else {
                    break;
                };
                ring.bytes -= old.frame.len();
                self.total.fetch_sub(old.frame.len(), Ordering::Relaxed);
            }
            if self.total.load(Ordering::Relaxed) <= target {
                return;
            }
        }
    }

    /// Registers a subscriber of `channel`. Commits before the feed existed
    /// never reached it: the caller then reads the channel's metadata and
    /// hands it to [`FeedSubscription::observe`].
    pub fn subscribe(&self, channel: &ChannelName) -> FeedSubscription {
        // Count the subscriber while the map entry is held, so that a
        // concurrent last-unsubscribe cannot remove the feed in between.
        let mut created = false;
        let (feed, shard) = {
            let shards = self.wakers.len().max(1);
            let restartable = self.restartable.contains(channel.namespace());
            let entry = self.channels.entry(channel.clone()).or_insert_with(|| {
                created = true;
                Arc::new(ChannelFeed {
                    ring: Mutex::new(Ring::new(restartable)),
                    head: AtomicU64::new(Offset::FIRST.get()),
                    shards: (0..shards).map(|_| WakeShard::default()).collect(),
                    subscribers: AtomicUsize::new(0),
                    next_shard: AtomicUsize::new(0),
                    last_commit: AtomicU64::new(0),
                    deleted: AtomicBool::new(false),
                    epoch: AtomicU64::new(0),
                    restartable,
                    number: self.feeds_made.fetch_add(1, Ordering::Relaxed),
                })
            });
            let feed = entry.value().clone();
            let shard = feed.next_shard.fetch_add(1, Ordering::Relaxed) % shards;
            feed.subscribers.fetch_add(1, Ordering::Relaxed);
            feed.shards[shard]
                .subscribers
                .fetch_add(1, Ordering::Relaxed);
            (feed, shard)
        };
        if created && let Some(watcher) = self.watcher.get() {
            watcher.opened(channel);
        }
        FeedSubscription {
            channel: channel.clone(),
            feed,
            shard,
            seen: 0,
            seen_epoch: 0,
            registry: self.channels.clone(),
            total: self.total.clone(),
            watcher: self.watcher.clone(),
        }
    }
}

impl CommitListener for Fanout {
    /// Ends every subscriber of `channel`; a later subscriber of the same
    /// name gets a new feed.
    fn deleted(&self, channel: &ChannelName) {
        let Some((_, feed)) = self.channels.remove(channel) else {
            return;
        };
        feed.deleted.store(true, Ordering::Release);
        self.total.fetch_sub(feed.clear_ring(), Ordering::Relaxed);
        for k in 0..feed.shards.len() {
            feed.wake(k);
        }
    }

    /// On the writer thread: O(1) in the channel's audience.
    fn committed(&self, channel: &ChannelName, meta: &ChannelMeta, messages: &[StoredMessage]) {
        let Some(feed) = self.channels.get(channel).map(|f| f.value().clone()) else {
            return;
        };
        let batches = encode_batches(channel, meta.epoch, messages);
        let end = messages
            .last()
            .map_or(meta.next_offset, |m| m.offset.next());
        self.push(&feed, batches, end);
    }
}

impl ChannelFeed {
    /// Empties the ring, returning the bytes it held.
    fn clear_ring(&self) -> usize {
        let mut ring = self.lock_ring();
        ring.batches.clear();
        std::mem::take(&mut ring.bytes)
    }

    fn lock_ring(&self) -> std::sync::MutexGuard<'_, Ring> {
        // Ring updates are single push/pop sequences that cannot be left
        // half-done by a panic elsewhere; keep serving after a poisoned lock.
        self.ring.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Wakes every subscriber parked on shard `k`.
    fn wake(&self, k: usize) {
        if let Some(shard) = self.shards.get(k) {
            shard.pending.store(false, Ordering::Release);
            shard.notify.notify_waiters();
        }
    }
}

impl Ring {
    fn new(restartable: bool) -> Self {
        Self {
            batches: VecDeque::new(),
            bytes: 0,
            restartable,
            epoch: Epoch(0),
            since: Offset::FIRST,
        }
    }
}

impl Ring {
    /// Appends `batch`, dropping the oldest beyond `budget`; returns the
    /// bytes added and dropped, and whether the batch started another
    /// epoch (the ring then holds only it). A batch of the ring's epoch
    /// that the ring already reaches past is not added.
    fn push(&mut self, batch: FeedBatch, budget: usize) -> (usize, usize, bool) {
        let restarted = self.restartable && self.epoch != Epoch(0) && batch.epoch != self.epoch;
        if self.epoch == Epoch(0) || restarted || !self.restartable {
            self.epoch = batch.epoch;
            self.since = batch.first;
        }
        if !restarted
            && self
                .batches
                .back()
                .is_some_and(|last| batch.end <= last.end)
        {
            return (0, 0, false);
        }
        let before = self.bytes;
        let contiguous = self
            .batches
            .back()
            .is_none_or(|last| last.end == batch.first && last.epoch == batch.epoch);
        if !contiguous || restarted {
            self.batches.clear();
            self.bytes = 0;
        }
        let mut freed = before - self.bytes;
        let added = batch.frame.len();
        self.bytes += added;
        self.batches.push_back(batch);
        while self.bytes > budget && self.batches.len() > 1 {
            if let Some(old) = self.batches.pop_front() {
                self.bytes -= old.frame.len();
                freed += old.frame.len();
            }
        }
        (added, freed, restarted)
    }
}

impl FeedSubscription {
    /// Raises the feed's head to what `meta` (read after [`Fanout::subscribe`])
    /// says was committed, waking the channel's subscribers if it moved.
    pub fn observe(&self, meta: Option<&ChannelMeta>) {
        let Some(meta) = meta else {
            return;
        };
        let before = if self.feed.restartable {
            let mut ring = self.feed.lock_ring();
            if ring.epoch == Epoch(0) {
                ring.epoch = meta.epoch;
                ring.since = meta.first_offset;
                self.feed.epoch.store(meta.epoch.0, Ordering::Release);
            } else if ring.epoch != meta.epoch {
                // Another epoch than the feed's (around a change of
                // leader): its head is not this feed's; the batches of the
                // new epoch bring it.
                return;
            }
            // Under the lock: a restart in between would otherwise get
            // this epoch's head.
            self.feed
                .head
                .fetch_max(meta.next_offset.get(), Ordering::AcqRel)
        } else {
            self.feed
                .head
                .fetch_max(meta.next_offset.get(), Ordering::AcqRel)
        };
        if before < meta.next_offset.get() {
            for k in 0..self.feed.shards.len() {
                self.feed.wake(k);
            }
        }
    }

    /// The channel this subscription follows.
    pub fn channel(&self) -> &ChannelName {
        &self.channel
    }

    /// What to do for a subscriber of `epoch` (`Epoch(0)`: none yet)
    /// whose next wanted offset is `next`, taking at most about
    /// `max_bytes` of frames.
    pub fn next_step(&mut self, next: Offset, epoch: Epoch, max_bytes: usize) -> NextStep {
        if self.feed.deleted.load(Ordering::Acquire) {
            return NextStep::Deleted;
        }
        self.seen_epoch = self.feed.epoch.load(Ordering::Acquire);
        let restartable = self.feed.restartable;
        if restartable && epoch != Epoch(0) && self.seen_epoch != 0 && epoch.0 != self.seen_epoch {
            return self.reset();
        }
        self.seen = self.feed.head.load(Ordering::Acquire);
        let head = Offset::new(self.seen);
        if next >= head {
            return NextStep::Wait;
        }
        let ring = self.feed.lock_ring();
        if restartable && epoch != Epoch(0) && ring.epoch != Epoch(0) && ring.epoch != epoch {
            // The epoch changed since it was read above.
            drop(ring);
            return self.reset();
        }
        let ring_epoch = ring.epoch;
        let Some(first) = ring.batches.front().map(|b| b.first) else {
            return NextStep::ReadLog { until: head };
        };
        let ring_end = ring.batches.back().map_or(first, |b| b.end);
        if next < first {
            return NextStep::ReadLog { until: first };
        }
        if next >= ring_end {
            // Known committed (below head) but never pushed to this ring.
            return NextStep::ReadLog { until: head };
        }
        // Batches are consecutive: find the one holding `next`.
        let start = ring.batches.partition_point(|b| b.end <= next);
        let mut frames = Vec::new();
        let mut bytes = 0;
        let mut end = next;
        let stored_ms = ring.batches.get(start).map_or(0, |b| b.stored_ms);
        for batch in ring.batches.range(start..) {
            if !frames.is_empty() && bytes >= max_bytes {
                break;
            }
            let frame = if batch.first == next || !frames.is_empty() {
                batch.frame.clone()
            } else {
                match slice_frame(&batch.frame, next) {
                    Some(frame) => frame,
                    None => return NextStep::ReadLog { until: batch.end },
                }
            };
            bytes += frame.len();
            frames.push(frame);
            end = batch.end;
        }
        NextStep::Send {
            frames,
            end,
            stored_ms,
            epoch: ring_epoch,
        }
    }

    /// Where a subscriber of an older epoch goes on.
    fn reset(&mut self) -> NextStep {
        let ring = self.feed.lock_ring();
        self.seen_epoch = ring.epoch.0;
        NextStep::Reset {
            epoch: ring.epoch,
            start: ring.since,
        }
    }

    /// Resolves once the head has moved past what `next_step`
    /// (Self::next_step) last saw (new commits).
    pub async fn changed(&mut self) {
        let shard = &self.feed.shards[self.shard];
        loop {
            // Registered before the head is read, so a raise in between
            // is not missed.
            let notified = shard.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let head = self.feed.head.load(Ordering::Acquire);
            let epoch = self.feed.epoch.load(Ordering::Acquire);
            if head != self.seen
                || epoch != self.seen_epoch
                || self.feed.deleted.load(Ordering::Acquire)
            {
                self.seen = head;
                self.seen_epoch = epoch;
                return;
            }
            notified.await;
        }
    }
}

impl Drop for FeedSubscription {
    fn drop(&mut self) {
        self.feed.shards[self.shard]
            .subscribers
            .fetch_sub(1, Ordering::Relaxed);
        self.feed.subscribers.fetch_sub(1, Ordering::Relaxed);
        // The registry may hold a newer feed of the same name (the channel
        // was deleted and subscribed to again): only this one goes.
        let removed = self.registry.remove_if(&self.channel, |_, feed| {
            Arc::ptr_eq(feed, &self.feed) && feed.subscribers.load(Ordering::Relaxed) == 0
        });
        if let Some((_, feed)) = removed {
            self.total.fetch_sub(feed.clear_ring(), Ordering::Relaxed);
            if let Some(watcher) = self.watcher.get() {
                watcher.closed(&self.channel);
            }
        }
    }
}

/// Encodes consecutive messages into `Deliver` frames of about
/// [`TARGET_FRAME_BYTES`] each. Used for live batches (once per channel) and
/// for catch-up reads (once per lagging subscriber).
pub fn encode_frames(
    channel: &ChannelName,
    epoch: Epoch,
    messages: &[StoredMessage],
) -> Vec<(Offset, Offset, Bytes)> {
    let mut out = Vec::new();
    let mut rest = messages;
    while let Some(first) = rest.first() {
        let mut take = 0;
        let mut bytes = 0;
        while take < rest.len() && (take == 0 || bytes < TARGET_FRAME_BYTES) {
            // Count each message's header too, so empty payloads still fill
            // a frame.
            bytes += rest[take].payload.len() + 12;
            take += 1;
        }
        let (chunk, tail) = rest.split_at(take);
        let mut buf = BytesMut::with_capacity(bytes + 300);
        volna_proto::encode_deliver(
            channel,
            epoch,
            first.offset,
            chunk.iter().map(|m| (m.timestamp_ms, m.payload.as_ref())),
            &mut buf,
        );
        out.push((
            first.offset,
            first.offset.add(chunk.len() as u64),
            buf.freeze(),
        ));
        rest = tail;
    }
    out
}

fn encode_batches(
    channel: &ChannelName,
    epoch: Epoch,
    messages: &[StoredMessage],
) -> Vec<FeedBatch> {
    let stored_ms = messages.first().map_or(0, |m| m.timestamp_ms);
    encode_frames(channel, epoch, messages)
        .into_iter()
        .map(|(first, end, frame)| FeedBatch {
            first,
            end,
            epoch,
            stored_ms,
            frame,
        })
        .collect()
}

/// Re-encodes the part of a `Deliver` frame from offset `from` on: needed
/// only when a subscriber starts in the middle of a batch.
fn slice_frame(frame: &Bytes, from: Offset) -> Option<Bytes> {
    let mut buf = BytesMut::from(frame.as_ref());
    let limits = Limits {
        max_frame: u32::try_from(frame.len()).ok()?,
    };
    let Ok(Some(Frame::Deliver(deliver))) = volna_proto::decode(&mut buf, &limits) else {
        return None;
    };
    let skip = usize::try_from(deliver.first_offset.distance_to(from)).ok()?;
    let kept = deliver.messages.get(skip..).filter(|m| !m.is_empty())?;
    let mut out = BytesMut::with_capacity(frame.len());
    volna_proto::encode_deliver(
        &deliver.channel,
        deliver.epoch,
        from,
        kept.iter().map(|m| (m.timestamp_ms, m.payload.as_ref())),
        &mut out,
    );
    Some(out.freeze())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Durability, EngineConfig};
    use crate::log::{self, AppendInput, Log};
    use crate::store::MemoryStore;

    fn decode_offsets(frames: &[Bytes]) -> Vec<u64> {
        let mut out = Vec::new();
        for f in frames {
            let mut buf = BytesMut::from(f.as_ref());
            let limits = Limits {
                max_frame: u32::MAX,
            };
            let Ok(Some(Frame::Deliver(d))) = volna_proto::decode(&mut buf, &limits) else {
                panic!("not a Deliver frame");
            };
            out.extend((0..d.messages.len() as u64).map(|i| d.first_offset.get() + i));
        }
        out
    }

    async fn publish(log: &Log, channel: &ChannelName, n: usize) {
        for i in 0..n {
            log.append(AppendInput {
                channel: channel.clone(),
                producer: None,
                payload: Bytes::from(format!("m{i}")),
            })
            .await
            .expect("append");
        }
    }

    async fn subscribe(fanout: &Fanout, log: &Log, channel: &ChannelName) -> FeedSubscription {
        let feed = fanout.subscribe(channel);
        feed.observe(log.lookup(channel).await.expect("lookup").as_ref());
        feed
    }

    #[tokio::test]
    async fn subscribers_share_frames_and_fall_back_to_the_log() {
        let fanout = Arc::new(Fanout::new(64 * 1024));
        let engine = EngineConfig::default();
        let threads = log::start(
            Arc::new(MemoryStore::new()),
            fanout.clone(),
            Durability::Wal,
            &engine,
            Arc::new(crate::metrics::Metrics::new()),
        )
        .expect("log");
        let log = threads.log().clone();
        let chat = ChannelName::new("chat.1").expect("name");

        publish(&log, &chat, 3).await; // before anyone subscribed
        let mut a = subscribe(&fanout, &log, &chat).await;
        let mut b = subscribe(&fanout, &log, &chat).await;
        assert_eq!(fanout.subscribed_channels(), 1);
        // Offsets 1..3 were committed before the feed existed: read the log.
        assert!(matches!(
            a.next_step(Offset::FIRST, Epoch(0), usize::MAX),
            NextStep::ReadLog { until } if until == Offset::new(4)
        ));
        publish(&log, &chat, 2).await;
        let (
            NextStep::Send {
                frames: fa,
                end: ea,
                ..
            },
            NextStep::Send { frames: fb, .. },
        ) = (
            a.next_step(Offset::new(4), Epoch(0), usize::MAX),
            b.next_step(Offset::new(4), Epoch(0), usize::MAX),
        )
        else {
            panic!("expected frames from the ring");
        };
        assert_eq!(ea, Offset::new(6));
        assert_eq!(decode_offsets(&fa), [4, 5]);
        // The same allocation, not a copy per subscriber.
        assert_eq!(fa[0].as_ptr(), fb[0].as_ptr());
        // Starting inside a batch re-encodes just the tail.
        let NextStep::Send { frames, .. } = a.next_step(Offset::new(5), Epoch(0), usize::MAX)
        else {
            panic!("expected frames");
        };
        assert_eq!(decode_offsets(&frames), [5]);
        assert!(matches!(
            a.next_step(Offset::new(6), Epoch(0), usize::MAX),
            NextStep::Wait
        ));

        drop(a);
        assert_eq!(fanout.subscribed_channels(), 1);
        drop(b);
        assert_eq!(fanout.subscribed_channels(), 0);
        threads.shutdown();
    }

    #[tokio::test]
    async fn rings_shrink_under_the_broker_wide_budget_least_recently_active_first() {
        let fanout = Arc::new(Fanout::new(64 * 1024).with_total_budget(100 * 1024));
        let threads = log::start(
            Arc::new(MemoryStore::new()),
            fanout.clone(),
            Durability::Wal,
            &EngineConfig::default(),
            Arc::new(crate::metrics::Metrics::new()),
        )
        .expect("log");
        let log = threads.log().clone();
        let names: Vec<_> = (0..4)
            .map(|i| ChannelName::new(format!("chat.{i}")).expect("name"))
            .collect();
        let mut subs = Vec::new();
        for name in &names {
            subs.push(subscribe(&fanout, &log, name).await);
        }
        for name in &names {
            for _ in 0..40 {
                log.append(AppendInput {
                    channel: name.clone(),
                    producer: None,
                    payload: Bytes::from(vec![b'x'; 1024]),
                })
                .await
                .expect("append");
            }
        }
        assert!(fanout.total_ring_bytes() <= 100 * 1024);
        // The least recently active channel gave up its ring first: its
        // subscriber reads the log; the most recent one still has all.
        assert!(matches!(
            subs[0].next_step(Offset::FIRST, Epoch(0), usize::MAX),
            NextStep::ReadLog { .. }
        ));
        assert!(matches!(
            subs[3].next_step(Offset::FIRST, Epoch(0), usize::MAX),
            NextStep::Send { end, .. } if end == Offset::new(41)
        ));
        // The last subscriber of a channel takes its ring's bytes along.
        let held = fanout.total_ring_bytes();
        let gone = subs.pop().expect("a subscription");
        let ring = fanout.ring_bytes(&names[3]).expect("subscribed");
        drop(gone);
        assert_eq!(fanout.total_ring_bytes(), held - ring);
        threads.shutdown();
    }

    /// A batch of another epoch (an in-memory channel started afresh by a
    /// new leader of its partition) starts the feed over: a subscriber of
    /// the old epoch is told where to go on, never handed the new epoch's
    /// offsets as if they were the old one's.
    #[test]
    fn a_batch_of_another_epoch_starts_the_feed_over_and_subscribers_are_told() {
        let fanout = Fanout::with_wakers(64 * 1024, 1)
            .with_restartable_namespaces(["typing".to_owned()].into());
        let chat = ChannelName::new("typing.42").expect("name");
        let relay_to = |chat: &ChannelName, epoch: u64, first: u64, count: u64| {
            let messages: Vec<StoredMessage> = (first..first + count)
                .map(|offset| StoredMessage {
                    offset: Offset::new(offset),
                    timestamp_ms: 1,
                    producer: None,
                    payload: Bytes::from_static(b"typing"),
                })
                .collect();
            for (from, end, frame) in encode_frames(chat, Epoch(epoch), &messages) {
                fanout.relay(chat, Epoch(epoch), (from, end), 1, frame);
            }
        };
        let relay = |epoch: u64, first: u64, count: u64| relay_to(&chat, epoch, first, count);
        let mut old = fanout.subscribe(&chat);
        let mut fresh = fanout.subscribe(&chat);
        relay(7, 1, 5);
        assert_eq!(fanout.epoch(&chat), Some(Epoch(7)));
        let NextStep::Send { end, epoch, .. } = old.next_step(Offset::FIRST, Epoch(7), usize::MAX)
        else {
            panic!("expected epoch 7's frames");
        };
        assert_eq!((end, epoch), (Offset::new(6), Epoch(7)));
        // A subscriber that has not learnt an epoch yet learns it here.
        let NextStep::Send { epoch, .. } = fresh.next_step(Offset::new(4), Epoch(0), usize::MAX)
        else {
            panic!("expected frames");
        };
        assert_eq!(epoch, Epoch(7));

        // The next leader's channel: epoch 9, from offset 1 again.
        relay(9, 1, 2);
        assert_eq!(fanout.epoch(&chat), Some(Epoch(9)));
        assert_eq!(fanout.head(&chat), Some(Offset::new(3)));
        for sub in [&mut old, &mut fresh] {
            assert!(matches!(
                sub.next_step(Offset::new(6), Epoch(7), usize::MAX),
                NextStep::Reset { epoch, start } if epoch == Epoch(9) && start == Offset::FIRST
            ));
            let NextStep::Send {
                frames, end, epoch, ..
            } = sub.next_step(Offset::FIRST, Epoch(9), usize::MAX)
            else {
                panic!("expected epoch 9's frames");
            };
            assert_eq!(decode_offsets(&frames), [1, 2]);
            assert_eq!((end, epoch), (Offset::new(3), Epoch(9)));
        }
        // A late batch of the old epoch is another switch, told the same
        // way; metadata of another epoch than the feed's moves nothing.
        relay(7, 6, 1);
        assert!(matches!(
            old.next_step(Offset::new(3), Epoch(9), usize::MAX),
            NextStep::Reset { epoch, start } if epoch == Epoch(7) && start == Offset::new(6)
        ));
        let meta = ChannelMeta {
            next_offset: Offset::new(50),
            ..ChannelMeta::new(1, Epoch(9))
        };
        old.observe(Some(&meta));
        assert_eq!(fanout.head(&chat), Some(Offset::new(7)));

        // A stored channel's feed changes epoch only through a delete
        // (which ends its subscribers): its subscribers are never reset.
        let stored = ChannelName::new("chat.42").expect("name");
        let mut sub = fanout.subscribe(&stored);
        relay_to(&stored, 7, 1, 5);
        relay_to(&stored, 9, 1, 2);
        assert!(matches!(
            sub.next_step(Offset::new(6), Epoch(7), usize::MAX),
            NextStep::Wait
        ));
    }

    #[test]
    fn ring_keeps_its_byte_budget_and_consecutive_batches() {
        let mut ring = Ring::new(false);
        let batch = |first: u64, len: usize| FeedBatch {
            first: Offset::new(first),
            end: Offset::new(first + 1),
            epoch: Epoch(1),
            stored_ms: 0,
            frame: Bytes::from(vec![0u8; len]),
        };
        for i in 1..=10 {
            ring.push(batch(i, 100), 350);
        }
        assert!(ring.bytes <= 350);
        assert_eq!(ring.batches.front().map(|b| b.first), Some(Offset::new(8)));
        // A batch that does not follow the last one starts the ring afresh.
        ring.push(batch(20, 100), 350);
        assert_eq!(ring.batches.len(), 1);
        // One batch larger than the budget is still kept (it is the head).
        ring.push(batch(21, 1000), 350);
        assert_eq!(ring.batches.len(), 1);
        // A batch the ring already holds (or went past) heard again from
        // another source changes nothing.
        assert_eq!(ring.push(batch(21, 1000), 350), (0, 0, false));
        assert_eq!(ring.push(batch(3, 100), 350), (0, 0, false));
        assert_eq!(ring.batches.len(), 1);
        assert_eq!(ring.bytes, 1000);
    }
}
