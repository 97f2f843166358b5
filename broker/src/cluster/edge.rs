//! Edges (DESIGN.md §7): how a node serves devices of channels whose
//! partition it does not replicate, and how a partition's leader serves
//! such nodes.
//!
//! ```text
//!  leader of p ── one upstream per (edge node, channel) ──▶ edge's feed ring ──▶ its devices
//!       ▲          all of a node pair's on one link            (Fanout::relay)
//!       └── reads in ranges (catch-up, lookups) ◀── edge's Log::read_channel
//! ```
//!
//! - A channel gets an upstream when its first local subscriber arrives
//!   ([`FeedWatcher::opened`]) and loses it when its last one leaves
//!   ([`FeedWatcher::closed`], G9). Whether this node's own log feeds a
//!   partition's channels is decided once per view tick, per partition
//!   ([`Edges::check_partitions`]); every decision about an upstream
//!   reads that one record, and a partition whose record changes has its
//!   subscribed channels' upstreams started or ended then. Nothing scans
//!   the subscribed channels, or wakes per channel, on a steady tick.
//! - A node pair's upstreams share one stream with credit per upstream
//!   (`volna_cluster::raft::upstreams`): a hundred thousand inboxes cost
//!   one stream, and an edge slow on one channel stops only that
//!   channel's upstream on the leader, whose subscription then reads its
//!   log in ranges (G4) and catches up.
//! - The upstream relays the leader's encoded `Deliver` frames into the
//!   local feed as received, so a message crosses the cluster once per
//!   interested node and is fanned out locally by the same engine as a
//!   local commit.
//! - It follows from the feed's head: what local devices lack below it
//!   they read from the leader in ranges, so (re)attaching never leaves a
//!   gap, and a batch heard twice is pushed once (the ring's rule).
//! - Only the leader serves: a replica that is not (or no longer) leader
//!   answers with the leader it knows, and ends its upstreams when it
//!   loses the office, so edges re-attach to the new leader from their
//!   next offset. Everything served was committed and applied, identical
//!   on every replica, so a lagging source delays and never misleads.
//! - A node that starts replicating the partition (placement moved it
//!   here) drops the upstream once its replica is a voter: its own commits
//!   feed the ring from then on.
//! - In-memory channels (`persistent = false`) live on their partition's
//!   leader only (ephemeral.rs): every other node follows them through an
//!   upstream, replica or not, and a leader asked for an older epoch than
//!   its channel's serves its channel from its first offset, so the edge's
//!   feed starts the new epoch over and its devices are told.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use dashmap::DashMap;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use tracing::debug;
use volna_cluster::raft::lease::Standing;
use volna_cluster::raft::network::{
    BoxFuture, ChannelService, FollowSink, FollowStream, LinkError, Peers, UpstreamError,
};
use volna_cluster::raft::{Outcome, Publish};
use volna_cluster::{NodeId, PartitionId, partition_of};
use volna_proto::{ChannelName, Epoch, ErrorCode, Frame, Limits, Offset, SubscriptionId};

use super::Role;
use super::ephemeral::{EphemeralRouter, outcome_of};
use super::router::ClusterView;
use crate::fanout::{Fanout, FeedWatcher};
use crate::log::{AppendInput, ChannelSlice, CommitListener, Logs, ProducerRef, ReadRange};
use crate::metrics::Metrics;
use crate::store::ProducerKey;
use crate::store::{ChannelMeta, StoreError, StoredMessage};
use crate::subscription::{self, DeliverySink, SinkError, Start, Stopped};

/// How long a remote read may take, all candidates included.
const READ_WITHIN: Duration = Duration::from_secs(3);
/// One read call's deadline.
const READ_ATTEMPT: Duration = Duration::from_secs(1);
/// How long a leader may take to answer an upstream's opening (a lookup
/// of the channel): a link carries many openings at once, and one late
/// answer costs that upstream only.
const ANSWER_WITHIN: Duration = Duration::from_secs(3);
/// Pause after every candidate failed, before the next round.
const ROUND_PAUSE: Duration = Duration::from_millis(100);
/// How often a leader checks that it still leads the partitions whose
/// upstreams it serves.
const CHECK_EVERY: Duration = Duration::from_millis(250);
/// Bytes read from an upstream per step.
const READ_CHUNK: usize = 256 * 1024;
/// The largest frame an upstream may carry (a `Deliver` frame holds about
/// 64 KiB of payload; one large message may exceed it).
const MAX_UPSTREAM_FRAME: u32 = 32 << 20;

/// A read of a channel: its metadata and messages `[from, until)`.
#[derive(Debug, Serialize, Deserialize)]
struct ReadCall {
    channel: String,
    from: u64,
    until: u64,
    max_messages: u32,
    max_bytes: u32,
}

/// An upstream subscription: from `from` (`None`: the leader's head), of
/// the channel's incarnation `epoch` when the edge knows one.
#[derive(Debug, Serialize, Deserialize)]
struct FollowCall {
    channel: String,
    from: Option<u64>,
    epoch: Option<u64>,
}

/// What a node hands the leader of a partition's in-memory channels.
#[derive(Debug, Serialize, Deserialize)]
pub(super) enum EphemeralCall {
    /// Publishes, stored in order; one outcome each.
    Publish(Vec<Publish>),
    /// A channel's delete; one `Outcome::Deleted`.
    Delete(String),
}

/// Which call a leader is asked.
#[derive(Debug, Clone, Copy)]
enum Ask {
    Read,
    Ephemeral,
    Devices,
}

/// Why a leader's answer did not come.
#[derive(Debug)]
pub(super) enum Unanswered {
    /// This node leads the partition now: it answers itself.
    LeadsHere,
    /// No leader answered; why.
    Failed(String),
}

impl std::fmt::Display for Unanswered {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::LeadsHere => f.write_str("this node leads the partition"),
            Self::Failed(why) => f.write_str(why),
        }
    }
}

/// A leader's answer.
#[derive(Debug, Serialize, Deserialize)]
pub(super) enum Served<T> {
    Ok(T),
    /// Not the leader; the one this replica knows of.
    NotLeader(Option<NodeId>),
    /// This node does not replicate the partition.
    NotHosted,
    /// The channel's incarnation the edge follows is gone (deleted).
    Gone,
    /// The call makes no sense (bad channel name, wrong partition).
    Refused(String),
}

/// What a read returns.
#[derive(Debug, Serialize, Deserialize)]
struct ChannelRead {
    meta: MetaWire,
    messages: Vec<WireMessage>,
}

/// A channel's metadata between nodes (reads, snapshots): everything but
/// the local id, which is per node.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub(crate) struct MetaWire {
    epoch: u64,
    first: u64,
    next: u64,
    bytes: u64,
    oldest_ms: u64,
    previous_epoch: u64,
    epoch_start: u64,
}

impl MetaWire {
    pub(crate) fn of(meta: &ChannelMeta) -> Self {
        Self {
            epoch: meta.epoch.0,
            first: meta.first_offset.get(),
            next: meta.next_offset.get(),
            bytes: meta.bytes,
            oldest_ms: meta.oldest_ms,
            previous_epoch: meta.previous_epoch.0,
            epoch_start: meta.epoch_start.get(),
        }
    }

    /// The metadata with id 0 (an edge's: its messages are not in this
    /// node's store; a restored channel is given its id by the writer).
    pub(crate) fn into_meta(self) -> ChannelMeta {
        ChannelMeta {
            first_offset: Offset::new(self.first),
            next_offset: Offset::new(self.next),
            bytes: self.bytes,
            oldest_ms: self.oldest_ms,
            previous_epoch: Epoch(self.previous_epoch),
            epoch_start: Offset::new(self.epoch_start),
            ..ChannelMeta::new(0, Epoch(self.epoch))
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct WireMessage {
    offset: u64,
    timestamp_ms: u64,
    payload: Bytes,
}

/// The upstream's first message: the incarnation followed and where.
#[derive(Debug, Serialize, Deserialize)]
struct Following {
    epoch: Option<u64>,
    start: u64,
}

/// Why an upstream could not attach.
#[derive(Debug)]
enum AttachError {
    /// No leader answered (yet).
    NoLeader(String),
    /// The incarnation followed was deleted.
    Gone,
}

/// Edge traffic, for metrics.
#[derive(Debug, Default)]
pub struct EdgeStats {
    /// Upstreams attached to a leader now.
    pub upstreams: AtomicI64,
    /// Messages relayed from upstreams into local feeds.
    pub relayed: AtomicU64,
    /// Remote reads (catch-up ranges, lookups) made.
    pub remote_reads: AtomicU64,
}

/// This node's edges: which partitions it replicates, its upstreams, and
/// its reads from other nodes.
pub struct Edges {
    node: NodeId,
    partitions: u32,
    peers: Arc<Peers>,
    view: Arc<ClusterView>,
    fanout: Arc<Fanout>,
    /// Which channels are kept in memory (on their leader only).
    logs: Logs,
    /// Channels with an upstream task, each with the token that has its
    /// task look again at whether it is still needed.
    upstreams: DashMap<ChannelName, CancellationToken>,
    /// Per partition, whether this node's own log fed its durable channels
    /// at the last view tick (it replicated the partition); see
    /// [`Edges::check_partitions`].
    replicated: Box<[AtomicBool]>,
    /// Per partition, whether this node led it at the last view tick (its
    /// own memory feeds its in-memory channels).
    led: Box<[AtomicBool]>,
    /// Whether the records were taken once.
    checked: AtomicBool,
    /// The leader last heard of, per partition.
    leaders: DashMap<PartitionId, NodeId>,
    stats: EdgeStats,
    stop: CancellationToken,
    this: Weak<Edges>,
}

impl std::fmt::Debug for Edges {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Edges")
            .field("node", &self.node)
            .field("upstreams", &self.upstreams.len())
            .finish_non_exhaustive()
    }
}

impl Edges {
    /// Edges of node `node`; upstream tasks end with `stop`.
    pub fn new(
        node: NodeId,
        partitions: u32,
        peers: Arc<Peers>,
        view: Arc<ClusterView>,
        fanout: Arc<Fanout>,
        logs: Logs,
        stop: CancellationToken,
    ) -> Arc<Self> {
        Arc::new_cyclic(|this| Self {
            node,
            partitions,
            peers,
            view,
            fanout,
            logs,
            upstreams: DashMap::new(),
            replicated: (0..partitions).map(|_| AtomicBool::new(false)).collect(),
            led: (0..partitions).map(|_| AtomicBool::new(false)).collect(),
            checked: AtomicBool::new(false),
            leaders: DashMap::new(),
            stats: EdgeStats::default(),
            stop,
            this: this.clone(),
        })
    }

    /// Edge traffic so far.
    pub fn stats(&self) -> &EdgeStats {
        &self.stats
    }

    /// Whether this node replicates `partition`: it runs its group, is one
    /// of its voters (a learner still catching up is not yet), and the map
    /// names it or it still leads. A replica the placer moved away may
    /// never hear of the membership change that removed it: once it
    /// neither is in the map nor leads, its copy may be stale. While the
    /// map is only remembered from before a restart (etcd has not answered
    /// since), the map may be the stale part: a group then counts only
    /// while it leads or hears its leader.
    pub fn replicates(&self, partition: PartitionId) -> bool {
        self.peers.group(partition).is_some_and(|raft| {
            let role = Role::of(&raft, self.node);
            let placed = role.leads || self.view.is_replica(partition, self.node);
            let current = self.view.is_confirmed()
                || match Standing::of(&raft, self.node, self.peers.leader_lease()) {
                    Standing::Leader => true,
                    Standing::Follower(leader) => self.peers.hears_from(partition, leader),
                    _ => false,
                };
            // A copy catching up to what this node held before it
            // discarded the partition may replay configurations that name
            // it a voter: it is no replica to serve from yet.
            role.voter && placed && current && !self.peers.catching_up_to_floor(partition)
        })
    }

    /// The partition of `channel`.
    pub fn partition(&self, channel: &ChannelName) -> PartitionId {
        partition_of(channel.as_str(), self.partitions)
    }

    /// Whether this node's own log feeds `channel`'s subscribers here, as
    /// the last view tick found: it replicates a durable channel's
    /// partition, or leads an in-memory channel's. Every decision about
    /// upstreams reads this record, never a fresher look at the groups: a
    /// flip and back between two ticks (leading for a moment while
    /// placement moves a partition away) would otherwise end an upstream
    /// that no tick ever starts again.
    fn serves_locally(&self, channel: &ChannelName) -> bool {
        let partition = self.partition(channel).0 as usize;
        let record = if self.logs.is_ephemeral(channel) {
            &self.led
        } else {
            &self.replicated
        };
        record
            .get(partition)
            .is_some_and(|here| here.load(Ordering::Acquire))
    }

    /// Records, per partition, whether this node's own log feeds its
    /// channels, and for each partition whose record changed starts the
    /// upstreams of its subscribed channels (it no longer does) or ends
    /// them (it does now). Called by the node's view loop and once at
    /// start; subscribed channels are listed only when a record changed.
    pub fn check_partitions(&self) {
        // The first look starts whatever the channels subscribed so far need.
        let first = !self.checked.swap(true, Ordering::AcqRel);
        let mut changed: Vec<bool> = vec![first; self.partitions as usize];
        let mut any = first;
        for p in 0..self.partitions {
            let partition = PartitionId(p);
            let replicated = self.replicates(partition);
            let led = self.peers.leads(partition);
            let slot = p as usize;
            let was_replicated = self.replicated[slot].swap(replicated, Ordering::AcqRel);
            let was_led = self.led[slot].swap(led, Ordering::AcqRel);
            if was_replicated != replicated || was_led != led {
                changed[slot] = true;
                any = true;
            }
        }
        if !any {
            return;
        }
        for channel in self.fanout.subscribed_channel_names() {
            if !changed[self.partition(&channel).0 as usize] {
                continue;
            }
            if self.serves_locally(&channel) {
                if let Some(token) = self.upstreams.get(&channel) {
                    token.cancel();
                }
            } else {
                self.ensure_upstream(&channel);
            }
        }
    }

    /// Starts `channel`'s upstream unless it has one or this node's own
    /// log feeds it.
    fn ensure_upstream(&self, channel: &ChannelName) {
        if self.serves_locally(channel) || self.stop.is_cancelled() {
            return;
        }
        let Some(edges) = self.this.upgrade() else {
            return;
        };
        if let dashmap::Entry::Vacant(vacant) = self.upstreams.entry(channel.clone()) {
            let token = CancellationToken::new();
            vacant.insert(token.clone());
            tokio::spawn(edges.upstream(channel.clone(), token));
        }
    }

    /// Whether `channel` still needs its upstream: it has subscribers here
    /// and this node's own log does not feed it.
    fn needs_upstream(&self, channel: &ChannelName) -> bool {
        !self.stop.is_cancelled()
            && self.fanout.head(channel).is_some()
            && !self.serves_locally(channel)
    }

    /// One channel's upstream, for as long as it is needed. `recheck` is
    /// cancelled when that may have changed (its last subscriber left, or
    /// this node's own log feeds it now).
    async fn upstream(self: Arc<Self>, channel: ChannelName, mut recheck: CancellationToken) {
        let partition = self.partition(&channel);
        let mut epoch: Option<Epoch> = None;
        let mut failures = 0u32;
        let mut feed = self.fanout.feed_number(&channel);
        loop {
            // A fresh token before the look: a change after it cancels the
            // new one (the map holds it), so none goes unseen.
            if recheck.is_cancelled() {
                recheck = CancellationToken::new();
                self.upstreams.insert(channel.clone(), recheck.clone());
            }
            // A feed made anew (its devices all left, others came) knows
            // nothing this task followed: it starts from the leader's head
            // as a first upstream does, not from its own empty head.
            let now_feeding = self.fanout.feed_number(&channel);
            if now_feeding != feed {
                feed = now_feeding;
                epoch = None;
            }
            // The feed may follow an epoch this task never heard of (the
            // one its own replica or leadership fed it). An in-memory
            // channel's feed starts over only with the batches of a new
            // epoch, so its head belongs to the feed's epoch, not to the
            // one a leader last named.
            if epoch.is_none() || self.logs.is_ephemeral(&channel) {
                epoch = self.fanout.epoch(&channel);
            }
            if !self.needs_upstream(&channel) {
                self.upstreams.remove(&channel);
                // A subscriber may have come back between the check and
                // the removal, finding the entry still there.
                if self.needs_upstream(&channel)
                    && let dashmap::Entry::Vacant(vacant) = self.upstreams.entry(channel.clone())
                {
                    vacant.insert(recheck.clone());
                    continue;
                }
                // Not needed, or another task took the channel over (its
                // token stays in the map).
                return;
            }
            let head = self.fanout.head(&channel).unwrap_or(Offset::FIRST);
            let from = (head > Offset::FIRST || epoch.is_some()).then_some(head);
            match self.attach(partition, &channel, from, epoch).await {
                Ok((stream, received, following)) => {
                    failures = 0;
                    if following.is_some() {
                        epoch = following;
                    }
                    self.stats.upstreams.fetch_add(1, Ordering::Relaxed);
                    let relayed = self
                        .relay(&channel, stream, received, &mut epoch, &recheck)
                        .await;
                    self.stats.upstreams.fetch_sub(1, Ordering::Relaxed);
                    if let Err(why) = relayed {
                        debug!(%channel, %why, "upstream ended; attaching again");
                    }
                }
                Err(AttachError::Gone) => {
                    self.channel_gone(&channel);
                    epoch = None;
                }
                Err(AttachError::NoLeader(why)) => {
                    failures += 1;
                    if failures % 20 == 1 {
                        debug!(%channel, %why, "no leader to follow yet");
                    }
                    tokio::select! {
                        () = self.stop.cancelled() => {}
                        () = recheck.cancelled() => {}
                        () = tokio::time::sleep(ROUND_PAUSE) => {}
                    }
                }
            }
        }
    }

    /// The channel's incarnation was deleted: its local subscribers end
    /// (`ChannelDeleted`), as they would on a replica.
    fn channel_gone(&self, channel: &ChannelName) {
        CommitListener::deleted(&*self.fanout, channel);
    }

    /// Finds the leader and opens an upstream on it.
    async fn attach(
        &self,
        partition: PartitionId,
        channel: &ChannelName,
        from: Option<Offset>,
        epoch: Option<Epoch>,
    ) -> Result<(FollowStream, BytesMut, Option<Epoch>), AttachError> {
        let call = FollowCall {
            channel: channel.as_str().to_owned(),
            from: from.map(Offset::get),
            epoch: epoch.map(|e| e.0),
        };
        let body =
            postcard::to_allocvec(&call).map_err(|e| AttachError::NoLeader(e.to_string()))?;
        let mut last = String::from("no replica known");
        for (node, addr) in self.candidates(partition) {
            let opened = if self.view.has_upstream_links(node) {
                self.peers.follow(node, &addr, partition, &body).await
            } else {
                self.peers
                    .follow_on_stream(node, &addr, partition, &body)
                    .await
            };
            let mut stream = match opened {
                Ok(stream) => stream,
                Err(e) => {
                    // Not asked first next time: a dead leader's upstreams
                    // go to the replicas the map names.
                    self.leaders
                        .remove_if(&partition, |_, leader| *leader == node);
                    last = e.to_string();
                    continue;
                }
            };
            match read_answer::<Following>(&mut stream).await {
                Ok((Served::Ok(following), rest)) => {
                    self.leaders.insert(partition, node);
                    return Ok((stream, rest, following.epoch.map(Epoch)));
                }
                Ok((Served::NotLeader(Some(leader)), _)) if leader != node => {
                    self.leaders.insert(partition, leader);
                    last = format!("node {node} is not the leader");
                }
                Ok((Served::Gone, _)) => return Err(AttachError::Gone),
                Ok((other, _)) => {
                    self.leaders
                        .remove_if(&partition, |_, leader| *leader == node);
                    last = format!("node {node}: {other:?}");
                }
                Err(e) => {
                    self.leaders
                        .remove_if(&partition, |_, leader| *leader == node);
                    last = e;
                }
            }
        }
        Err(AttachError::NoLeader(last))
    }

    /// Where to find `partition`'s leader: the one last heard of, then the
    /// replicas the map names.
    fn candidates(&self, partition: PartitionId) -> Vec<(NodeId, String)> {
        let replicas = self.view.replicas(partition);
        let mut out: Vec<(NodeId, String)> = Vec::with_capacity(replicas.len() + 1);
        if let Some(leader) = self.leaders.get(&partition).map(|l| *l)
            && let Some(addr) = self.view.peer_addr(leader)
        {
            out.push((leader, addr));
        }
        for (node, info) in replicas {
            if !out.iter().any(|(n, _)| *n == node) {
                out.push((node, info.addr));
            }
        }
        out.retain(|(node, _)| *node != self.node);
        out
    }

    /// Relays an attached upstream's frames into the channel's feed until
    /// it ends or is no longer needed.
    async fn relay(
        &self,
        channel: &ChannelName,
        mut stream: FollowStream,
        mut buf: BytesMut,
        epoch: &mut Option<Epoch>,
        recheck: &CancellationToken,
    ) -> Result<(), String> {
        let limits = Limits {
            max_frame: MAX_UPSTREAM_FRAME,
        };
        loop {
            // A feed made anew meanwhile is not this upstream's to feed.
            if recheck.is_cancelled() {
                return Ok(());
            }
            // Frames that came with the answer (or in the last chunk) first.
            while let Some(raw) = next_frame(&mut buf, &limits)? {
                if !self.take_frame(channel, raw, &limits, epoch)? {
                    return Ok(());
                }
            }
            tokio::select! {
                () = self.stop.cancelled() => return Ok(()),
                () = recheck.cancelled() => return Ok(()),
                chunk = stream.read(READ_CHUNK) => match chunk {
                    Ok(Some(bytes)) => buf.extend_from_slice(&bytes),
                    Ok(None) => return Err("the leader ended the upstream".into()),
                    Err(e) => return Err(e.to_string()),
                },
            }
        }
    }

    /// Hands one upstream frame to the channel's feed; false when the
    /// upstream should end (the channel was deleted).
    fn take_frame(
        &self,
        channel: &ChannelName,
        raw: Bytes,
        limits: &Limits,
        epoch: &mut Option<Epoch>,
    ) -> Result<bool, String> {
        let mut view = BytesMut::from(raw.as_ref());
        let frame = volna_proto::decode(&mut view, limits)
            .map_err(|e| format!("undecodable upstream frame: {e}"))?;
        match frame {
            Some(Frame::Deliver(deliver)) => {
                if self.logs.is_ephemeral(channel) {
                    if self.serves_locally(channel) {
                        // Its own memory feeds the channel now (the view
                        // tick that found so ends the upstream).
                        return Ok(true);
                    }
                    // A new leader's epoch of an in-memory channel: the
                    // feed starts over with it and tells its subscribers.
                } else if epoch.is_some_and(|e| e != deliver.epoch) {
                    // Deleted and created anew while detached.
                    self.channel_gone(channel);
                    *epoch = None;
                    return Ok(false);
                }
                *epoch = Some(deliver.epoch);
                let count = deliver.messages.len() as u64;
                let stored_ms = deliver.messages.first().map_or(0, |m| m.timestamp_ms);
                let range = (deliver.first_offset, deliver.first_offset.add(count));
                self.fanout
                    .relay(channel, deliver.epoch, range, stored_ms, raw);
                self.stats.relayed.fetch_add(count, Ordering::Relaxed);
                Ok(true)
            }
            Some(Frame::SubscriptionEnded {
                code: ErrorCode::ChannelDeleted,
                ..
            }) => {
                self.channel_gone(channel);
                *epoch = None;
                Ok(false)
            }
            // The stream header, and `Truncated` (retention went past the
            // feed's head: the ring starts afresh and devices that need
            // older offsets read and are told).
            _ => Ok(true),
        }
    }

    /// `channel`'s metadata and messages in `range` from its partition's
    /// leader (or, failing that, any replica that answers).
    pub async fn read(
        &self,
        channel: &ChannelName,
        range: ReadRange,
    ) -> Result<Option<ChannelSlice>, StoreError> {
        let partition = self.partition(channel);
        let call = ReadCall {
            channel: channel.as_str().to_owned(),
            from: range.from.get(),
            until: range.until.get(),
            max_messages: u32::try_from(range.max_messages).unwrap_or(u32::MAX),
            max_bytes: u32::try_from(range.max_bytes).unwrap_or(u32::MAX),
        };
        self.stats.remote_reads.fetch_add(1, Ordering::Relaxed);
        let read: Option<ChannelRead> = self
            .ask_leader(partition, Ask::Read, &call, READ_WITHIN)
            .await
            .map_err(|why| {
                StoreError::Engine(format!("partition {} of {channel}: {why}", partition.0))
            })?;
        Ok(read.map(|read| {
            let messages = read
                .messages
                .into_iter()
                .map(|m| StoredMessage {
                    offset: Offset::new(m.offset),
                    timestamp_ms: m.timestamp_ms,
                    producer: None,
                    payload: m.payload,
                })
                .collect();
            (read.meta.into_meta(), messages)
        }))
    }

    /// `channel`'s metadata from its partition's leader.
    pub async fn lookup(&self, channel: &ChannelName) -> Result<Option<ChannelMeta>, StoreError> {
        let range = ReadRange {
            from: Offset::FIRST,
            until: Offset::FIRST,
            max_messages: 0,
            max_bytes: 0,
        };
        Ok(self.read(channel, range).await?.map(|(meta, _)| meta))
    }

    /// Hands `call` to the leader of `partition`'s in-memory channels; its
    /// outcomes, in order. Given up after `within`, or at once when the
    /// call may have reached a leader without an answer coming back (it is
    /// not sent twice).
    pub(super) async fn ephemeral(
        &self,
        partition: PartitionId,
        call: &EphemeralCall,
        within: Duration,
    ) -> Result<Vec<Outcome>, Unanswered> {
        self.ask_leader(partition, Ask::Ephemeral, call, within)
            .await
    }

    /// Asks `partition`'s leader about its device state
    /// ([`super::devices`]).
    pub(super) async fn ask_devices(
        &self,
        partition: PartitionId,
        call: &super::devices::DeviceCall,
        within: Duration,
    ) -> Result<super::devices::DeviceAnswer, Unanswered> {
        self.ask_leader(partition, Ask::Devices, call, within).await
    }

    /// Asks `partition`'s leader, wherever it is, until `within` passed.
    async fn ask_leader<C: Serialize, T: serde::de::DeserializeOwned + std::fmt::Debug>(
        &self,
        partition: PartitionId,
        ask: Ask,
        call: &C,
        within: Duration,
    ) -> Result<T, Unanswered> {
        let body = postcard::to_allocvec(call).map_err(|e| Unanswered::Failed(e.to_string()))?;
        let until = tokio::time::Instant::now() + within;
        let mut last = String::from("no replica known");
        while tokio::time::Instant::now() < until {
            // In-memory channels live on the leader: once that is this
            // node, no other answers for them.
            if matches!(ask, Ask::Ephemeral) && self.peers.leads(partition) {
                return Err(Unanswered::LeadsHere);
            }
            for (node, addr) in self.candidates(partition) {
                let answer = match ask {
                    Ask::Read => {
                        self.peers
                            .read(node, &addr, partition, &body, READ_ATTEMPT)
                            .await
                    }
                    Ask::Ephemeral => {
                        self.peers
                            .publish(node, &addr, partition, &body, READ_ATTEMPT)
                            .await
                    }
                    Ask::Devices => {
                        self.peers
                            .devices(node, &addr, partition, &body, READ_ATTEMPT)
                            .await
                    }
                };
                let answer = match answer {
                    Ok(answer) => answer,
                    // A publish that may have been stored is not sent
                    // again: its device is told and decides.
                    Err(e @ (LinkError::Timeout { .. } | LinkError::Broken { .. }))
                        if matches!(ask, Ask::Ephemeral) =>
                    {
                        return Err(Unanswered::Failed(e.to_string()));
                    }
                    Err(e) => {
                        last = e.to_string();
                        continue;
                    }
                };
                match postcard::from_bytes::<Served<T>>(&answer) {
                    Ok(Served::Ok(answer)) => {
                        self.leaders.insert(partition, node);
                        return Ok(answer);
                    }
                    Ok(Served::NotLeader(Some(leader))) if leader != node => {
                        self.leaders.insert(partition, leader);
                        last = format!("node {node} is not the leader");
                    }
                    Ok(Served::Refused(why)) => return Err(Unanswered::Failed(why)),
                    Ok(other) => last = format!("node {node}: {other:?}"),
                    Err(e) => last = format!("node {node}: undecodable answer: {e}"),
                }
            }
            tokio::time::sleep(ROUND_PAUSE).await;
        }
        Err(Unanswered::Failed(format!("no reachable leader: {last}")))
    }
}

impl FeedWatcher for Edges {
    fn opened(&self, channel: &ChannelName) {
        self.ensure_upstream(channel);
    }

    fn closed(&self, channel: &ChannelName) {
        if let Some(token) = self.upstreams.get(channel) {
            token.cancel();
        }
    }
}

/// Splits the next whole frame off `buf`.
fn next_frame(buf: &mut BytesMut, limits: &Limits) -> Result<Option<Bytes>, String> {
    let Some(prefix) = buf.get(..4) else {
        return Ok(None);
    };
    let len = u32::from_be_bytes([prefix[0], prefix[1], prefix[2], prefix[3]]);
    if len.saturating_add(4) > limits.max_frame {
        return Err(format!("upstream frame of {len} bytes"));
    }
    let total = len as usize + 4;
    if buf.len() < total {
        return Ok(None);
    }
    Ok(Some(buf.split_to(total).freeze()))
}

/// Reads an upstream's length-prefixed first message; returns it and the
/// bytes received after it (the first frames, when they came along).
async fn read_answer<T: serde::de::DeserializeOwned>(
    stream: &mut FollowStream,
) -> Result<(Served<T>, BytesMut), String> {
    let mut buf = BytesMut::new();
    loop {
        if let Some(prefix) = buf.get(..4) {
            let len = u32::from_be_bytes([prefix[0], prefix[1], prefix[2], prefix[3]]) as usize;
            if len > 64 * 1024 {
                return Err(format!("upstream answer of {len} bytes"));
            }
            if buf.len() >= 4 + len {
                let answer = postcard::from_bytes(&buf[4..4 + len]).map_err(|e| e.to_string())?;
                let _ = buf.split_to(4 + len);
                return Ok((answer, buf));
            }
        }
        match tokio::time::timeout(ANSWER_WITHIN, stream.read(4096)).await {
            Ok(Ok(Some(bytes))) => buf.extend_from_slice(&bytes),
            Ok(Ok(None)) => return Err("upstream closed before answering".into()),
            Ok(Err(e)) => return Err(e.to_string()),
            Err(_) => return Err("upstream did not answer in time".into()),
        }
    }
}

/// A partition leader's side: reads, upstreams and in-memory channels'
/// publishes for other nodes.
pub struct ChannelServer {
    node: NodeId,
    partitions: u32,
    peers: Weak<Peers>,
    logs: Logs,
    /// Where publishes to in-memory channels are kept (when namespaces use
    /// them).
    ephemeral: Option<Arc<EphemeralRouter>>,
    fanout: Arc<Fanout>,
    /// The device state of the partitions this node leads.
    devices: Arc<super::devices::ClusterDevices>,
    /// Upstream deliveries are not device deliveries: counted apart.
    metrics: Arc<Metrics>,
    /// Per partition this node serves upstreams of, the token that ends
    /// them once it no longer leads (see [`ChannelServer::leadership`]).
    leaderships: Arc<DashMap<PartitionId, CancellationToken>>,
    /// Whether the task watching `leaderships` runs.
    watching: Arc<AtomicBool>,
}

impl std::fmt::Debug for ChannelServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChannelServer")
            .field("node", &self.node)
            .finish_non_exhaustive()
    }
}

impl ChannelServer {
    /// Serves the channels of `logs` whose partitions this node leads.
    pub fn new(
        node: NodeId,
        partitions: u32,
        peers: &Arc<Peers>,
        logs: Logs,
        ephemeral: Option<Arc<EphemeralRouter>>,
        fanout: Arc<Fanout>,
        devices: Arc<super::devices::ClusterDevices>,
    ) -> Self {
        Self {
            node,
            partitions,
            peers: Arc::downgrade(peers),
            logs,
            ephemeral,
            devices,
            fanout,
            metrics: Arc::new(Metrics::new()),
            leaderships: Arc::default(),
            watching: Arc::default(),
        }
    }

    /// The token cancelled once this node no longer leads `partition`:
    /// one look at each served partition's lease every `CHECK_EVERY`, not
    /// one per upstream.
    fn leadership(&self, partition: PartitionId) -> CancellationToken {
        let token = self.leaderships.entry(partition).or_default().clone();
        if self.watching.swap(true, Ordering::AcqRel) {
            return token;
        }
        let leaderships = Arc::downgrade(&self.leaderships);
        let peers = self.peers.clone();
        let node = self.node;
        tokio::spawn(async move {
            let mut check = tokio::time::interval(CHECK_EVERY);
            loop {
                check.tick().await;
                let (Some(leaderships), Some(peers)) = (leaderships.upgrade(), peers.upgrade())
                else {
                    return;
                };
                leaderships.retain(|partition, token| {
                    let leads = peers.group(*partition).is_some_and(|raft| {
                        Standing::of(&raft, node, peers.leader_lease()).leads()
                    });
                    if !leads {
                        token.cancel();
                    }
                    leads
                });
            }
        });
        token
    }

    /// `Ok` when this node leads `partition`.
    fn leads<T>(&self, partition: PartitionId) -> Result<(), Served<T>> {
        let Some(raft) = self.peers.upgrade().and_then(|p| p.group(partition)) else {
            return Err(Served::NotHosted);
        };
        let Some(peers) = self.peers.upgrade() else {
            return Err(Served::NotHosted);
        };
        // A leader whose lease ran out serves nothing as leader: the edge
        // attached to it would relay silence while another node leads.
        match Standing::of(&raft, self.node, peers.leader_lease()) {
            Standing::Leader => Ok(()),
            Standing::Follower(leader) => Err(Served::NotLeader(Some(leader))),
            Standing::LeaseExpired { .. } | Standing::NoLeader | Standing::Failed => {
                Err(Served::NotLeader(None))
            }
        }
    }

    /// The channel a call names, if it is a valid name of `partition`.
    fn channel<T>(&self, name: &str, partition: PartitionId) -> Result<ChannelName, Served<T>> {
        let channel = ChannelName::new(name).map_err(|e| Served::Refused(e.to_string()))?;
        if partition_of(channel.as_str(), self.partitions) != partition {
            return Err(Served::Refused(format!(
                "{channel} is not in partition {}",
                partition.0
            )));
        }
        Ok(channel)
    }

    async fn answer_read(
        &self,
        partition: PartitionId,
        body: &[u8],
    ) -> Served<Option<ChannelRead>> {
        let call: ReadCall = match postcard::from_bytes(body) {
            Ok(call) => call,
            Err(e) => return Served::Refused(e.to_string()),
        };
        let channel = match self.channel(&call.channel, partition) {
            Ok(channel) => channel,
            Err(refused) => return refused,
        };
        if let Err(not) = self.leads(partition) {
            return not;
        }
        let log = self.logs.for_channel(&channel);
        let range = ReadRange {
            from: Offset::new(call.from),
            until: Offset::new(call.until),
            max_messages: call.max_messages as usize,
            max_bytes: call.max_bytes as usize,
        };
        let read = if range.max_messages == 0 {
            log.lookup(&channel)
                .await
                .map(|meta| meta.map(|meta| (meta, Vec::new())))
        } else {
            log.read_channel(&channel, range).await
        };
        match read {
            Ok(read) => Served::Ok(read.map(|(meta, messages)| {
                ChannelRead {
                    meta: MetaWire::of(&meta),
                    messages: messages
                        .into_iter()
                        .map(|m| WireMessage {
                            offset: m.offset.get(),
                            timestamp_ms: m.timestamp_ms,
                            payload: m.payload,
                        })
                        .collect(),
                }
            })),
            Err(e) => Served::Refused(format!("read failed: {e}")),
        }
    }

    async fn serve_follow(&self, partition: PartitionId, body: &[u8], mut out: FollowSink) {
        let call: Result<FollowCall, _> = postcard::from_bytes(body);
        let started = match call {
            Err(e) => Err(Served::Refused(e.to_string())),
            Ok(call) => match self.channel(&call.channel, partition) {
                Err(refused) => Err(refused),
                Ok(channel) => match self.leads(partition) {
                    Err(not) => Err(not),
                    Ok(()) => Ok((channel, call)),
                },
            },
        };
        let (channel, call) = match started {
            Ok(started) => started,
            Err(answer) => {
                let _ = write_answer::<Following>(&mut out, &answer).await;
                out.finish();
                return;
            }
        };
        let log = self.logs.for_channel(&channel).clone();
        // Registered before the metadata is read, as a device's would be.
        let feed = self.fanout.subscribe(&channel);
        let meta = match log.lookup(&channel).await {
            Ok(meta) => meta,
            Err(e) => {
                let answer = Served::<Following>::Refused(format!("lookup failed: {e}"));
                let _ = write_answer(&mut out, &answer).await;
                out.finish();
                return;
            }
        };
        let other_epoch = call
            .epoch
            .is_some_and(|epoch| meta.is_none_or(|m| m.epoch.0 != epoch));
        let in_memory = self.logs.is_ephemeral(&channel);
        if other_epoch && !in_memory {
            let _ = write_answer::<Following>(&mut out, &Served::Gone).await;
            out.finish();
            return;
        }
        feed.observe(meta.as_ref());
        let start = if other_epoch {
            // An in-memory channel the edge followed on an earlier leader:
            // this leader's epoch is another log, served whole.
            meta.map_or(Offset::FIRST, |m| m.first_offset)
        } else {
            call.from
                .map(Offset::new)
                .or(meta.map(|m| m.next_offset))
                .unwrap_or(Offset::FIRST)
        }
        .max(Offset::FIRST);
        let following = Following {
            epoch: meta.map(|m| m.epoch.0),
            start: start.get(),
        };
        if write_answer(&mut out, &Served::Ok(following))
            .await
            .is_err()
        {
            return;
        }
        let cancel = CancellationToken::new();
        let gone = out.stopped();
        let deposed = self.leadership(partition);
        let start = Start {
            id: SubscriptionId(0),
            next: start,
            events: Vec::new(),
            // The leader serves what it applied: no older incarnation.
            epoch: volna_proto::Epoch(0),
        };
        let out = Arc::new(tokio::sync::Mutex::new(out));
        let sink = UpstreamSink { out: out.clone() };
        let run = subscription::run(start, feed, log, sink, cancel.clone(), self.metrics.clone());
        tokio::pin!(run);
        // The edge closed it, or this node no longer leads (its lease, not
        // only its own view: a leader cut off from its peers would relay
        // silence): the subscription stops at its next step.
        let result = tokio::select! {
            result = &mut run => result,
            () = gone => {
                cancel.cancel();
                run.await
            }
            () = deposed.cancelled_owned() => {
                cancel.cancel();
                run.await
            }
        };
        let mut out = out.lock().await;
        match result {
            Ok(()) => {}
            Err(Stopped::ChannelDeleted(_)) => {
                // The edge ends its devices' subscriptions as a replica
                // would.
                let _ = out.write(deleted_notice(&channel)).await;
                out.finish();
            }
            Err(why) => {
                debug!(%channel, error = %why, "upstream stopped");
                out.finish();
            }
        }
    }
}

impl ChannelService for ChannelServer {
    fn read(&self, partition: PartitionId, body: Vec<u8>) -> BoxFuture<Vec<u8>> {
        let server = self.clone_handle();
        Box::pin(async move {
            let answer = server.answer_read(partition, &body).await;
            postcard::to_allocvec(&answer).unwrap_or_default()
        })
    }

    fn follow(&self, partition: PartitionId, body: Vec<u8>, out: FollowSink) -> BoxFuture<()> {
        let server = self.clone_handle();
        Box::pin(async move { server.serve_follow(partition, &body, out).await })
    }

    fn publish(&self, partition: PartitionId, body: Vec<u8>) -> BoxFuture<Vec<u8>> {
        let server = self.clone_handle();
        Box::pin(async move {
            let answer = server.answer_ephemeral(partition, &body).await;
            postcard::to_allocvec(&answer).unwrap_or_default()
        })
    }

    fn devices(&self, partition: PartitionId, body: Vec<u8>) -> BoxFuture<Vec<u8>> {
        let devices = self.devices.clone();
        Box::pin(async move { devices.answer(partition, &body).await })
    }
}

impl ChannelServer {
    /// Keeps publishes to (or deletes) in-memory channels of a partition
    /// this node leads.
    async fn answer_ephemeral(&self, partition: PartitionId, body: &[u8]) -> Served<Vec<Outcome>> {
        let call: EphemeralCall = match postcard::from_bytes(body) {
            Ok(call) => call,
            Err(e) => return Served::Refused(e.to_string()),
        };
        let Some(router) = &self.ephemeral else {
            return Served::Refused("this node keeps no in-memory namespace".into());
        };
        if let Err(not) = self.leads(partition) {
            return not;
        }
        let named = |name: &str| -> Result<ChannelName, Served<Vec<Outcome>>> {
            let channel = self.channel(name, partition)?;
            if !self.logs.is_ephemeral(&channel) {
                return Err(Served::Refused(format!(
                    "{channel} is not in an in-memory namespace here"
                )));
            }
            Ok(channel)
        };
        let outcomes = match call {
            EphemeralCall::Publish(publishes) => {
                let mut inputs = Vec::with_capacity(publishes.len());
                for publish in publishes {
                    match named(&publish.channel) {
                        Ok(channel) => inputs.push(input_of(channel, publish)),
                        Err(refused) => return refused,
                    }
                }
                router.publish_here(inputs).await
            }
            EphemeralCall::Delete(name) => {
                let channel = match named(&name) {
                    Ok(channel) => channel,
                    Err(refused) => return refused,
                };
                return match router.delete_here(channel).await {
                    Ok(meta) => Served::Ok(vec![Outcome::Deleted {
                        existed: meta.is_some(),
                    }]),
                    Err(crate::log::AppendError::Unavailable(_)) => Served::NotLeader(None),
                    Err(e) => Served::Refused(e.to_string()),
                };
            }
        };
        // Deposed between the check and the keeper's turn: none was kept.
        if outcomes
            .iter()
            .all(|o| matches!(o, Err(crate::log::AppendError::Unavailable(_))))
        {
            return Served::NotLeader(None);
        }
        Served::Ok(outcomes.into_iter().map(outcome_of).collect())
    }
}

/// A forwarded publish as this node's log takes it.
fn input_of(channel: ChannelName, publish: Publish) -> AppendInput {
    AppendInput {
        channel,
        producer: publish.producer.map(|p| ProducerRef {
            key: ProducerKey::new(Arc::from(p.owner), p.producer_id),
            sequence: p.sequence,
            after: p.after,
            limited: p.limited,
        }),
        payload: publish.payload,
    }
}

impl ChannelServer {
    fn clone_handle(&self) -> Self {
        Self {
            node: self.node,
            partitions: self.partitions,
            peers: self.peers.clone(),
            logs: self.logs.clone(),
            ephemeral: self.ephemeral.clone(),
            fanout: self.fanout.clone(),
            devices: self.devices.clone(),
            metrics: self.metrics.clone(),
            leaderships: self.leaderships.clone(),
            watching: self.watching.clone(),
        }
    }
}

/// Writes an upstream's length-prefixed first message.
async fn write_answer<T: Serialize>(
    out: &mut FollowSink,
    answer: &Served<T>,
) -> Result<(), UpstreamError> {
    let body = postcard::to_allocvec(answer).unwrap_or_default();
    let mut framed = Vec::with_capacity(body.len() + 4);
    framed.extend_from_slice(&u32::try_from(body.len()).unwrap_or(u32::MAX).to_be_bytes());
    framed.extend_from_slice(&body);
    out.write(Bytes::from(framed)).await
}

/// Delivery frames of an upstream, written to the following node.
struct UpstreamSink {
    out: Arc<tokio::sync::Mutex<FollowSink>>,
}

impl DeliverySink for UpstreamSink {
    async fn send(&mut self, frames: Vec<Bytes>) -> Result<(), SinkError> {
        let mut out = self.out.lock().await;
        for frame in frames {
            out.write(frame)
                .await
                .map_err(|e| SinkError(e.to_string()))?;
        }
        Ok(())
    }

    async fn finish(&mut self) {
        self.out.lock().await.finish();
    }
}

/// What the leader sends an edge before it ends the upstream of a deleted
/// channel.
fn deleted_notice(channel: &ChannelName) -> Bytes {
    let frame = Frame::SubscriptionEnded {
        subscription: SubscriptionId(0),
        code: ErrorCode::ChannelDeleted,
        message: format!("channel {channel} was deleted"),
    };
    let mut buf = BytesMut::with_capacity(volna_proto::encoded_len(&frame));
    volna_proto::encode(&frame, &mut buf);
    buf.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_are_split_whole_from_the_stream() {
        let limits = Limits { max_frame: 1 << 20 };
        let channel = ChannelName::new("chat.1").expect("name");
        let one = deleted_notice(&channel);
        let mut buf = BytesMut::new();
        buf.extend_from_slice(&one);
        buf.extend_from_slice(&one[..3]);
        assert_eq!(next_frame(&mut buf, &limits), Ok(Some(one.clone())));
        assert_eq!(next_frame(&mut buf, &limits), Ok(None));
        buf.extend_from_slice(&one[3..]);
        assert_eq!(next_frame(&mut buf, &limits), Ok(Some(one)));
        let mut huge = BytesMut::from(&[0xff, 0xff, 0xff, 0xff, 0][..]);
        assert!(next_frame(&mut huge, &limits).is_err());
    }
}
