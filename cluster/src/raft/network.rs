//! Raft's RPCs between nodes: QUIC with mutual TLS, one connection per
//! node pair, one bidirectional stream per call.
//!
//! A call is `kind (u8) ‖ partition (u32, big-endian) ‖ sender (u64,
//! big-endian) ‖ body`, the body the openraft request in postcard; the
//! answer is an `Answer` in postcard.
//! Every partition group of both nodes shares the pair's connection, so a
//! node with 64 partitions keeps one handshake, one congestion controller
//! and one keep-alive per peer, not 64. A broken connection is dropped and
//! redialed by the next call; a call to an unreachable peer fails as
//! [`Unreachable`] and openraft backs off before retrying.
//!
//! Heartbeats are batched per node pair: while the node fires its groups'
//! heartbeats together ([`Peers::firing_heartbeats`]; the broker does),
//! every empty `AppendEntries` to a peer that is queued within
//! `BATCH_WINDOW` of the first goes out as one call, answered as one,
//! however many partition groups the two nodes share: a node pair
//! exchanges one call per heartbeat interval instead of one per shared
//! group. At other times an empty `AppendEntries` is openraft telling a
//! follower the new commit index, and the stream's next entries wait for
//! it: it goes at once (with whatever else is queued), never held for the
//! window (that cost every commit 1-2 ms).
//!
//! A call is served only for the node its sender's certificate proves
//! (`crate::tls`): the sender it names must be one of the certificate's
//! `node-N`, a Raft message must come from the leader or candidate it
//! claims (its vote's node), and from a member of the partition's group
//! as this node knows it (or as the message itself carries it: the
//! entries or snapshot that make it one). Anything else is refused, not
//! handed to the group: one leaked node certificate acts as that node, in
//! its own partitions, and no other. Forwarded proposals, reads and
//! upstream subscriptions come from edges, which any node is, so they need
//! only a proven sender.
//!
//! The same connection carries what edges need from a partition's leader
//! (see [`ChannelService`]): channel reads (one call each) and upstream
//! subscriptions, all of one node pair's on one long-lived stream with
//! credit per upstream (`super::upstreams`). A call that times out fails
//! alone: it never closes the connection, which carries every other
//! group's calls and every upstream (a peer that is really gone is
//! noticed by the connection's idle timeout, 1.5 s).

use std::fmt::Debug;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use dashmap::DashMap;
use openraft::error::{
    ClientWriteError, Fatal, Infallible, InstallSnapshotError, NetworkError, RPCError, RaftError,
    RemoteError, ReplicationClosed, StreamingError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    SnapshotResponse, VoteRequest, VoteResponse,
};
use openraft::{Snapshot, Vote};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use thiserror::Error;
use tokio::io::AsyncReadExt;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::lease::Standing;
use super::upstreams::{EdgeLink, OpenHandler, ServedLink};
use super::{BasicNode, Command, Raft, Reply, TypeConfig};
use crate::partition::PartitionId;
use crate::placement::NodeId;
use crate::tls::PeerTls;

/// The largest call or answer: a batch of appended entries is bounded by
/// openraft's `max_payload_entries` and a snapshot chunk by
/// `snapshot_max_chunk_size`; this only stops a broken peer.
const MAX_MESSAGE: usize = 64 << 20;

/// A peer silent this long is gone: its connection closes.
const PEER_IDLE_TIMEOUT: Duration = Duration::from_millis(1500);

/// How long one forwarded proposal may wait for the leader's answer. A
/// commit takes milliseconds; a leader that does not answer in this time
/// is likely dead or cut off, and the publisher's retry (same producer
/// sequence, stored once) finds the next one.
const FORWARD_ATTEMPT: Duration = Duration::from_secs(1);

/// The leader lease until [`Peers::set_leader_lease`] sets the cluster's.
const DEFAULT_LEASE: Duration = Duration::from_secs(1);

/// How long dialing a peer may take: a handshake on a healthy network
/// takes a round trip or two; a dead peer never answers.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);

/// How long a failed upstream link dial keeps others from dialing the
/// same peer (they fail at once and try the partition's next replica).
const REDIAL_PAUSE: Duration = Duration::from_millis(250);

/// How long a heartbeat waits for others to the same peer to share its
/// call.
const BATCH_WINDOW: Duration = Duration::from_millis(1);

/// Heartbeats per batched call, at most.
const MAX_BATCH: usize = 1024;

/// The peer protocol this node speaks, advertised in its registration
/// (`NodeInfo::peer_protocol`): 1 carries upstream subscriptions on one
/// upstream link per node pair ([`super::upstreams`]); 0 (nodes from
/// before the field) a stream per upstream.
pub const PEER_PROTOCOL: u32 = 1;

/// Call kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Kind {
    AppendEntries = 1,
    Vote = 2,
    InstallSnapshot = 3,
    /// A command forwarded to the partition's leader (see [`Peers::propose`]).
    Propose = 4,
    /// A read of a channel's stored messages ([`ChannelService::read`]).
    Read = 5,
    /// An upstream subscription on a stream of its own, as nodes from
    /// before upstream links ([`PEER_PROTOCOL`]) follow and are followed.
    Follow = 6,
    /// Heartbeats of several groups for one peer, answered together.
    Batch = 7,
    /// Publishes to (or a delete of) in-memory channels, for the
    /// partition's leader ([`ChannelService::publish`]).
    Ephemeral = 8,
    /// Whether the partition's leader committed a membership without the
    /// sender ([`Peers::released`]).
    Released = 9,
    /// A question about device state (cursors, read markers, the device
    /// registry) for the partition's leader, or read markers moved there
    /// ([`ChannelService::devices`]).
    Devices = 10,
    /// The caller's upstream link: its upstream subscriptions, served by
    /// [`ChannelService::follow`] ([`super::upstreams`]).
    Upstreams = 11,
}

impl Kind {
    fn from_u8(byte: u8) -> Option<Self> {
        match byte {
            1 => Some(Self::AppendEntries),
            2 => Some(Self::Vote),
            3 => Some(Self::InstallSnapshot),
            4 => Some(Self::Propose),
            5 => Some(Self::Read),
            6 => Some(Self::Follow),
            7 => Some(Self::Batch),
            8 => Some(Self::Ephemeral),
            9 => Some(Self::Released),
            10 => Some(Self::Devices),
            11 => Some(Self::Upstreams),
            _ => None,
        }
    }
}

/// What a node answers a call with.
#[derive(Debug, Serialize, Deserialize)]
enum Answer<T, E> {
    /// The group's answer.
    Ok(T),
    /// The group refused (openraft's error, typed).
    Raft(E),
    /// This node hosts no such partition group (not yet, or no more).
    NotHosted,
    /// The call did not decode.
    Malformed(String),
    /// The sender's certificate does not prove what the call claims (see
    /// the module docs).
    Refused(String),
}

/// What a partition's leader says of a node that was its replica
/// ([`Peers::released`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Release {
    /// The leader committed a membership without the node: the group
    /// goes on without it, and its copy of the partition may go.
    Released,
    /// The node is still in the group's membership, or the membership
    /// that removes it is not committed yet.
    Member,
    /// The asked node does not lead the partition (now).
    NotLeader,
}

/// Why a call did not get an answer.
#[derive(Debug, Error)]
pub enum LinkError {
    /// No connection could be made.
    #[error("connect to node {node} at {addr}: {reason}")]
    Connect {
        /// The peer.
        node: NodeId,
        /// Where it was dialed.
        addr: String,
        /// Why.
        reason: String,
    },
    /// The connection or stream broke.
    #[error("link to node {node}: {reason}")]
    Broken {
        /// The peer.
        node: NodeId,
        /// Why.
        reason: String,
    },
    /// No answer in time.
    #[error("node {node} did not answer within {after:?}")]
    Timeout {
        /// The peer.
        node: NodeId,
        /// The deadline.
        after: Duration,
    },
    /// The peer hosts no such group.
    #[error("node {node} hosts no group of partition {partition}")]
    NotHosted {
        /// The peer.
        node: NodeId,
        /// The partition.
        partition: u32,
    },
    /// The answer or call did not decode.
    #[error("malformed message: {0}")]
    Malformed(String),
    /// The local endpoint is closed or could not be made.
    #[error("endpoint: {0}")]
    Endpoint(String),
    /// The peer refused the call: this node's certificate does not prove
    /// what the call claims, or it is no member of the group.
    #[error("node {node} refused the call: {reason}")]
    Refused {
        /// The peer.
        node: NodeId,
        /// Why.
        reason: String,
    },
}

/// Why a proposal was not committed.
#[derive(Debug, Error)]
pub enum ProposeError {
    /// No leader took it in time (an election, a network partition, too
    /// few replicas alive). It was not committed.
    #[error("partition {partition} found no leader within {after:?} (last: {last})")]
    NoLeader {
        /// The partition.
        partition: u32,
        /// How long it tried.
        after: Duration,
        /// The last failure seen.
        last: String,
    },
    /// The leader's answer was lost: the command may have been committed.
    #[error("the partition leader's answer was lost (the command may be committed): {0}")]
    Uncertain(String),
    /// The group refused it for good.
    #[error("the partition group refused the command: {0}")]
    Rejected(String),
}

/// What a node serves of its channels to other nodes: the broker's side of
/// `Kind::Read` and `Kind::Follow`. Bodies are opaque here; the broker
/// defines them.
pub trait ChannelService: Send + Sync + 'static {
    /// Answers a read of `partition`'s channel.
    fn read(&self, partition: PartitionId, body: Vec<u8>) -> BoxFuture<Vec<u8>>;
    /// Serves an upstream subscription on `out` until it ends.
    fn follow(&self, partition: PartitionId, body: Vec<u8>, out: FollowSink) -> BoxFuture<()>;
    /// Answers publishes to `partition`'s in-memory channels, which live
    /// on its leader only.
    fn publish(&self, partition: PartitionId, body: Vec<u8>) -> BoxFuture<Vec<u8>>;
    /// Answers a question about the device state `partition` replicates
    /// (the devices of the users it holds).
    fn devices(&self, partition: PartitionId, body: Vec<u8>) -> BoxFuture<Vec<u8>>;
}

/// A boxed, sendable future.
pub type BoxFuture<T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send>>;

pub use super::upstreams::{FollowSink, FollowStream, UpstreamError};

/// Inter-node traffic, for metrics.
#[derive(Debug, Default)]
pub struct LinkStats {
    /// Bytes of calls and answers sent.
    pub bytes_sent: AtomicU64,
    /// Bytes of calls and answers received.
    pub bytes_received: AtomicU64,
    /// Calls made.
    pub calls: AtomicU64,
    /// Commands forwarded to another node's leader.
    pub forwarded: AtomicU64,
    /// Upstream links of this node that ended (their connection broke or
    /// the peer ended them): each ends every upstream it carried.
    pub upstream_links_lost: AtomicU64,
}

/// This node's upstream link to one peer, and its last failed dial.
#[derive(Debug, Default)]
struct LinkSlot {
    link: Option<Arc<EdgeLink>>,
    failed: Option<(std::time::Instant, String)>,
}

/// A node's inter-node endpoint: it accepts calls for the partition groups
/// it hosts and dials peers for its own groups' calls.
pub struct Peers {
    node: NodeId,
    endpoint: quinn::Endpoint,
    links: DashMap<NodeId, Arc<tokio::sync::Mutex<Option<quinn::Connection>>>>,
    groups: DashMap<PartitionId, Raft>,
    batchers: DashMap<NodeId, tokio::sync::mpsc::Sender<Batched>>,
    channels: std::sync::OnceLock<Arc<dyn ChannelService>>,
    /// Per peer, this node's upstream link to it (one at a time).
    upstream_links: DashMap<NodeId, Arc<tokio::sync::Mutex<LinkSlot>>>,
    stats: Arc<LinkStats>,
    stop: CancellationToken,
    /// The leader lease in milliseconds ([`super::lease`]).
    lease_ms: AtomicU64,
    /// Per partition, the leader whose append (or heartbeat) this node's
    /// group last took, and when: a follower that has not heard from its
    /// leader within the lease is cut off from it, whatever openraft still
    /// names as leader until its own election timeout.
    heard: Arc<DashMap<PartitionId, (NodeId, std::time::Instant)>>,
    /// When each peer's last proven call arrived (any kind, any group):
    /// a leader busy streaming a snapshot or a long append to one group
    /// sends that group no heartbeat meanwhile, yet it is plainly
    /// reachable.
    calls_from: DashMap<NodeId, std::time::Instant>,
    /// Learners of groups led here that asked to be released
    /// ([`Peers::released`]): they stopped their copy of the group. Each
    /// with the membership (by log id) it was a learner in when it asked.
    retired_learners: DashMap<(PartitionId, NodeId), Option<openraft::LogId<NodeId>>>,
    /// Groups started here on a blank copy of a partition this node held
    /// before and discarded, with how far its log reached then (see
    /// [`Peers::set_discard_floor`]).
    floors: DashMap<PartitionId, openraft::LogId<NodeId>>,
    /// Until when empty `AppendEntries` are the node's heartbeat round
    /// (batched over a window) rather than commit-index updates (sent at
    /// once).
    heartbeat_round_until: std::sync::Mutex<Option<tokio::time::Instant>>,
}

impl Debug for Peers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Peers")
            .field("node", &self.node)
            .field("groups", &self.groups.len())
            .field("links", &self.links.len())
            .finish_non_exhaustive()
    }
}

impl Peers {
    /// Listens on `listen` for peers and starts accepting calls.
    pub fn bind(node: NodeId, listen: SocketAddr, tls: PeerTls) -> Result<Arc<Self>, LinkError> {
        let mut transport = quinn::TransportConfig::default();
        // A peer that vanishes (kill -9, SIGSTOP, a cut cable) is noticed
        // within a second and a half, not after the default 30 s idle
        // timeout: calls to it then fail fast and go elsewhere.
        transport.keep_alive_interval(Some(Duration::from_millis(250)));
        transport.max_idle_timeout(Some(
            quinn::IdleTimeout::try_from(PEER_IDLE_TIMEOUT)
                .map_err(|e| LinkError::Endpoint(e.to_string()))?,
        ));
        transport.max_concurrent_bidi_streams(4096u32.into());
        transport.max_concurrent_uni_streams(0u32.into());
        let transport = Arc::new(transport);
        let mut server = tls.server;
        server.transport_config(transport.clone());
        let mut client = tls.client;
        client.transport_config(transport);
        let mut endpoint = quinn::Endpoint::server(server, listen)
            .map_err(|e| LinkError::Endpoint(e.to_string()))?;
        endpoint.set_default_client_config(client);
        let peers = Arc::new(Self {
            node,
            endpoint,
            links: DashMap::new(),
            groups: DashMap::new(),
            batchers: DashMap::new(),
            channels: std::sync::OnceLock::new(),
            upstream_links: DashMap::new(),
            stats: Arc::default(),
            stop: CancellationToken::new(),
            lease_ms: AtomicU64::new(DEFAULT_LEASE.as_millis() as u64),
            heard: Arc::default(),
            heartbeat_round_until: std::sync::Mutex::new(None),
            calls_from: DashMap::new(),
            retired_learners: DashMap::new(),
            floors: DashMap::new(),
        });
        tokio::spawn(accept_loop(peers.clone()));
        Ok(peers)
    }

    /// Where peers reach this node.
    pub fn local_addr(&self) -> Result<SocketAddr, LinkError> {
        self.endpoint
            .local_addr()
            .map_err(|e| LinkError::Endpoint(e.to_string()))
    }

    /// This node's id.
    pub fn node(&self) -> NodeId {
        self.node
    }

    /// Serves calls for `partition`'s group.
    pub fn host(&self, partition: PartitionId, raft: Raft) {
        // A restarted group names its old leader before that leader's
        // first append arrives: it gets one lease to arrive.
        let leader = raft.metrics().borrow().current_leader;
        if let Some(leader) = leader.filter(|leader| *leader != self.node) {
            self.heard_from(partition, leader);
        }
        self.groups.insert(partition, raft);
    }

    /// Serves other nodes' channel reads and upstream subscriptions
    /// through `service` (set once).
    pub fn serve_channels(&self, service: Arc<dyn ChannelService>) {
        let _ = self.channels.set(service);
    }

    /// Reads from `partition`'s channels on `node`: one call, `body` and
    /// the answer as [`ChannelService::read`] defines them.
    pub async fn read(
        &self,
        node: NodeId,
        addr: &str,
        partition: PartitionId,
        body: &[u8],
        deadline: Duration,
    ) -> Result<Vec<u8>, LinkError> {
        self.call(node, addr, Kind::Read, partition, body, deadline)
            .await
    }

    /// Hands publishes to `partition`'s in-memory channels to `node`: one
    /// call, `body` and the answer as [`ChannelService::publish`] defines
    /// them.
    pub async fn publish(
        &self,
        node: NodeId,
        addr: &str,
        partition: PartitionId,
        body: &[u8],
        deadline: Duration,
    ) -> Result<Vec<u8>, LinkError> {
        self.call(node, addr, Kind::Ephemeral, partition, body, deadline)
            .await
    }

    /// Asks `node` about `partition`'s device state: one call, `body` and
    /// the answer as [`ChannelService::devices`] defines them.
    pub async fn devices(
        &self,
        node: NodeId,
        addr: &str,
        partition: PartitionId,
        body: &[u8],
        deadline: Duration,
    ) -> Result<Vec<u8>, LinkError> {
        self.call(node, addr, Kind::Devices, partition, body, deadline)
            .await
    }

    /// Asks `node` whether, as `partition`'s leader, it committed a
    /// membership without this node. openraft stops replicating to a
    /// removed node as soon as the leader appends the membership that
    /// removes it, so the removed node never learns of the commit itself:
    /// it asks before it discards its copy of the partition.
    pub async fn released(
        &self,
        node: NodeId,
        addr: &str,
        partition: PartitionId,
        deadline: Duration,
    ) -> Result<Release, LinkError> {
        let answer = self
            .call(node, addr, Kind::Released, partition, &[], deadline)
            .await?;
        match postcard::from_bytes::<Answer<Release, ()>>(&answer) {
            Ok(Answer::Ok(release)) => Ok(release),
            Ok(Answer::NotHosted) => Err(LinkError::NotHosted {
                node,
                partition: partition.0,
            }),
            Ok(Answer::Refused(reason)) => Err(LinkError::Refused { node, reason }),
            Ok(Answer::Malformed(why)) => Err(LinkError::Malformed(why)),
            Ok(Answer::Raft(())) => Err(LinkError::Malformed(
                "a group error in answer to a membership question".into(),
            )),
            Err(e) => Err(LinkError::Malformed(e.to_string())),
        }
    }

    /// Opens an upstream subscription on `node` ([`ChannelService::follow`]
    /// serves it there), on this node's upstream link to it.
    pub async fn follow(
        &self,
        node: NodeId,
        addr: &str,
        partition: PartitionId,
        body: &[u8],
    ) -> Result<FollowStream, LinkError> {
        let link = self.upstream_link(node, addr).await?;
        link.open(partition, body).map_err(|e| LinkError::Broken {
            node,
            reason: e.reason,
        })
    }

    /// Opens an upstream subscription on `node`, a node from before
    /// upstream links ([`PEER_PROTOCOL`] 0), on a stream of its own.
    pub async fn follow_on_stream(
        &self,
        node: NodeId,
        addr: &str,
        partition: PartitionId,
        body: &[u8],
    ) -> Result<FollowStream, LinkError> {
        let opened = async {
            let conn = self.connection(node, addr).await?;
            send_call(&conn, self.node, node, Kind::Follow, partition, body).await
        };
        let recv = match tokio::time::timeout(CONNECT_TIMEOUT, opened).await {
            Ok(recv) => recv?,
            Err(_) => {
                return Err(LinkError::Connect {
                    node,
                    addr: addr.to_owned(),
                    reason: format!("no upstream stream within {CONNECT_TIMEOUT:?}"),
                });
            }
        };
        self.stats
            .bytes_sent
            .fetch_add((body.len() + HEADER) as u64, Ordering::Relaxed);
        Ok(FollowStream::on_stream(node, recv, self.stats.clone()))
    }

    /// This node's upstream link to `node`, opened when there is none.
    ///
    /// Waiting for another caller's dial counts against the same deadline,
    /// and a dial that failed is not tried again for [`REDIAL_PAUSE`]: when
    /// a leader dies, every upstream it fed asks for a link to it at once,
    /// and each must fail fast and move on to the next candidate, not
    /// queue behind the others' dials.
    async fn upstream_link(&self, node: NodeId, addr: &str) -> Result<Arc<EdgeLink>, LinkError> {
        let slot = self.upstream_links.entry(node).or_default().clone();
        let failed = |reason: String| LinkError::Connect {
            node,
            addr: addr.to_owned(),
            reason,
        };
        let asked = std::time::Instant::now();
        let deadline = tokio::time::Instant::now() + CONNECT_TIMEOUT;
        let late = || failed(format!("no upstream link within {CONNECT_TIMEOUT:?}"));
        let mut slot = tokio::time::timeout_at(deadline, slot.lock())
            .await
            .map_err(|_| late())?;
        if let Some(link) = slot.link.as_ref().filter(|link| link.is_alive()) {
            return Ok(link.clone());
        }
        // A dial that failed while this caller waited, or just before.
        if let Some((at, why)) = &slot.failed
            && (*at >= asked || at.elapsed() < REDIAL_PAUSE)
        {
            return Err(failed(why.clone()));
        }
        let opened = async {
            let conn = self.connection(node, addr).await?;
            let broken = |reason: String| LinkError::Broken { node, reason };
            let (mut send, recv) = conn.open_bi().await.map_err(|e| broken(e.to_string()))?;
            send.write_all(&header(Kind::Upstreams, PartitionId(0), self.node))
                .await
                .map_err(|e| broken(e.to_string()))?;
            Ok::<_, LinkError>((send, recv))
        };
        match tokio::time::timeout_at(deadline, opened).await {
            Ok(Ok((send, recv))) => {
                self.stats
                    .bytes_sent
                    .fetch_add(HEADER as u64, Ordering::Relaxed);
                let link = EdgeLink::start(node, send, recv, self.stats.clone());
                *slot = LinkSlot {
                    link: Some(link.clone()),
                    failed: None,
                };
                Ok(link)
            }
            // A connection that died under the call is redialed by the
            // next one: only an unreachable peer holds the others back.
            Ok(Err(e @ LinkError::Broken { .. })) => Err(e),
            Ok(Err(e)) => {
                slot.failed = Some((std::time::Instant::now(), e.to_string()));
                Err(e)
            }
            Err(_) => {
                let e = late();
                slot.failed = Some((std::time::Instant::now(), e.to_string()));
                Err(e)
            }
        }
    }

    /// Stops serving `partition`'s group.
    pub fn unhost(&self, partition: PartitionId) -> Option<Raft> {
        self.groups.remove(&partition).map(|(_, raft)| raft)
    }

    /// The group of `partition`, if hosted here.
    pub fn group(&self, partition: PartitionId) -> Option<Raft> {
        self.groups.get(&partition).map(|raft| raft.clone())
    }

    /// Sets the leader lease: a leader no quorum acknowledged for this long
    /// acts as no leader ([`super::lease`]). The election timeout.
    pub fn set_leader_lease(&self, lease: Duration) {
        let ms = u64::try_from(lease.as_millis()).unwrap_or(u64::MAX);
        self.lease_ms.store(ms, Ordering::Relaxed);
    }

    /// The leader lease.
    pub fn leader_lease(&self) -> Duration {
        Duration::from_millis(self.lease_ms.load(Ordering::Relaxed))
    }

    /// This node's standing in `partition`'s group (`None`: not hosted).
    pub fn standing(&self, partition: PartitionId) -> Option<Standing> {
        self.group(partition)
            .map(|raft| Standing::of(&raft, self.node, self.leader_lease()))
    }

    /// Whether this node leads `partition` and knows it still does.
    pub fn leads(&self, partition: PartitionId) -> bool {
        self.standing(partition).is_some_and(Standing::leads)
    }

    /// The term in which this node was elected `partition`'s leader, if it
    /// is its leader as far as its group knows (its lease may have run
    /// out: see [`Peers::leading_term`]).
    pub fn term_led(&self, partition: PartitionId) -> Option<u64> {
        let raft = self.group(partition)?;
        let metrics = raft.metrics();
        let metrics = metrics.borrow();
        (metrics.current_leader == Some(self.node) && metrics.running_state.is_ok())
            .then_some(metrics.current_term)
    }

    /// The term in which this node leads `partition` now (as
    /// [`Peers::leads`] tells), if it does: what it keeps as leader only
    /// (in-memory channels) belongs to one term.
    pub fn leading_term(&self, partition: PartitionId) -> Option<u64> {
        let raft = self.group(partition)?;
        Standing::of(&raft, self.node, self.leader_lease())
            .leads()
            .then(|| raft.metrics().borrow().current_term)
    }

    /// The node is firing its groups' heartbeats: the empty
    /// `AppendEntries` queued from now until the batch window (1 ms) past
    /// the last call of the round share their peers' calls. Called before
    /// and after each round.
    pub fn firing_heartbeats(&self) {
        *self
            .heartbeat_round_until
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(tokio::time::Instant::now() + BATCH_WINDOW);
    }

    fn in_heartbeat_round(&self) -> bool {
        self.heartbeat_round_until
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some_and(|until| tokio::time::Instant::now() <= until)
    }

    /// The learners of `partition`'s group that asked this node, as its
    /// leader, to be released: a node asks only once it has stopped its
    /// copy of the group, so the leader may drop them from the membership
    /// without waiting for them to acknowledge the configuration that
    /// made them learners (a node that was leader when it was replaced
    /// stops its group before its successor ever hears from it).
    /// Only requests made under the membership the group has now count: a
    /// node placed back in the group since asked as another replica.
    pub fn retired_learners(&self, partition: PartitionId) -> Vec<NodeId> {
        let Some(raft) = self.group(partition) else {
            return Vec::new();
        };
        let current = *raft.metrics().borrow().membership_config.log_id();
        self.retired_learners
            .iter()
            .filter(|entry| entry.key().0 == partition && *entry.value() == current)
            .map(|entry| entry.key().1)
            .collect()
    }

    /// Notes that `partition`'s group here starts blank on a copy this
    /// node held up to `reached` and discarded (`None`: it did not). Until
    /// the group applied that far again, it refuses a vote to a candidate
    /// whose log ends before `reached` and appends from a leader of an
    /// older term than `reached`'s: a member that never learnt the group
    /// went on without this node still counts it, and this node's old
    /// copy would have refused them (a blank one would help them to a
    /// quorum that overwrites committed entries).
    pub fn set_discard_floor(
        &self,
        partition: PartitionId,
        reached: Option<openraft::LogId<NodeId>>,
    ) {
        match reached {
            Some(reached) => {
                self.floors.insert(partition, reached);
            }
            None => {
                self.floors.remove(&partition);
            }
        }
    }

    /// The floor of [`Peers::set_discard_floor`] while `raft` has not
    /// applied up to it. Once it has, the group may campaign again (it
    /// was kept from it meanwhile: the old configurations it replays may
    /// name it a voter, and a partial log must not lead).
    fn discard_floor(
        &self,
        partition: PartitionId,
        raft: &Raft,
    ) -> Option<openraft::LogId<NodeId>> {
        let floor = *self.floors.get(&partition)?;
        let applied = raft.metrics().borrow().last_applied.map(|id| id.index);
        if applied >= Some(floor.index) {
            self.floors.remove(&partition);
            raft.runtime_config().elect(true);
            return None;
        }
        Some(floor)
    }

    /// Whether `partition`'s group here is still catching up to what this
    /// node held before it discarded its copy ([`Peers::set_discard_floor`]):
    /// it is no voter to count on, may not lead, and serves nothing as a
    /// replica until then.
    pub fn catching_up_to_floor(&self, partition: PartitionId) -> bool {
        self.group(partition)
            .is_some_and(|raft| self.discard_floor(partition, &raft).is_some())
    }

    /// Forgets `node`'s request to be released from `partition` (it is
    /// out of the membership, or back in it).
    pub fn forget_retired_learner(&self, partition: PartitionId, node: NodeId) {
        self.retired_learners.remove(&(partition, node));
    }

    /// Whether this node hears from `leader` as `partition`'s leader:
    /// its group took an append or a heartbeat from it, or any call of it
    /// arrived, within the leader lease.
    pub fn hears_from(&self, partition: PartitionId, leader: NodeId) -> bool {
        let lease = self.leader_lease();
        self.heard.get(&partition).is_some_and(|heard| {
            let (from, at) = *heard;
            from == leader && at.elapsed() <= lease
        }) || self
            .calls_from
            .get(&leader)
            .is_some_and(|at| at.elapsed() <= lease)
    }

    /// `partition`'s group took an append from `leader` (its vote was not
    /// refused: the sender is the group's leader in its term).
    fn heard_from(&self, partition: PartitionId, leader: NodeId) {
        self.heard
            .insert(partition, (leader, std::time::Instant::now()));
    }

    /// Inter-node traffic so far.
    pub fn stats(&self) -> &LinkStats {
        &self.stats
    }

    /// The network factory `partition`'s group dials peers through.
    pub fn network(self: &Arc<Self>, partition: PartitionId) -> Network {
        Network {
            peers: self.clone(),
            partition,
        }
    }

    /// Closes every connection and stops accepting.
    pub fn close(&self) {
        self.stop.cancel();
        self.endpoint.close(0u32.into(), b"node stopping");
    }

    /// Gets `command` committed and applied by `partition`'s group wherever
    /// its leader is: the group here when this node hosts it and is among
    /// `candidates` (the partition's replicas as last placed), else (or
    /// when it points elsewhere) the leader it names, else the candidates
    /// in turn, until `within` has passed.
    ///
    /// A command is sent again only when it surely was not proposed (the
    /// node refused it as a follower, or could not be reached); once sent,
    /// a lost answer is [`ProposeError::Uncertain`]: it may be committed.
    pub async fn propose(
        &self,
        partition: PartitionId,
        command: &Command,
        candidates: &[(NodeId, BasicNode)],
        within: Duration,
    ) -> Result<Reply, ProposeError> {
        let until = tokio::time::Instant::now() + within;
        let body =
            postcard::to_allocvec(command).map_err(|e| ProposeError::Rejected(e.to_string()))?;
        let mut hint: Option<(NodeId, BasicNode)> = None;
        let mut next_candidate = 0usize;
        let mut last_failure = String::from("no replica known");
        loop {
            let now = tokio::time::Instant::now();
            if now >= until {
                return Err(ProposeError::NoLeader {
                    partition: partition.0,
                    after: within,
                    last: last_failure,
                });
            }
            let target = match hint.take() {
                Some(target) => Some(target),
                // This node's own group, unless the map moved the
                // partition away (its copy may not know who leads now).
                None if self.groups.contains_key(&partition)
                    && candidates.iter().any(|(id, _)| *id == self.node) =>
                {
                    None
                }
                None if candidates.is_empty() => {
                    return Err(ProposeError::NoLeader {
                        partition: partition.0,
                        after: within,
                        last: last_failure,
                    });
                }
                None => {
                    let candidate = candidates[next_candidate % candidates.len()].clone();
                    next_candidate += 1;
                    Some(candidate)
                }
            };
            // `None`: this node's own group.
            let remote = target.filter(|(id, _)| *id != self.node);
            let answer = match remote {
                None => {
                    let Some(raft) = self.group(partition) else {
                        // Pointed at ourselves without the group: ask others.
                        last_failure = "this node no longer hosts the group".into();
                        continue;
                    };
                    // A leader no quorum acknowledged lately may be cut off:
                    // its entry would wait, uncommitted, for as long as the
                    // cut lasts. Ask the other replicas instead.
                    if let Standing::LeaseExpired { .. } | Standing::Failed =
                        Standing::of(&raft, self.node, self.leader_lease())
                    {
                        last_failure = format!(
                            "node {}'s group has failed, or it leads but no quorum \
                             acknowledged it within {:?}",
                            self.node,
                            self.leader_lease()
                        );
                        let others: Vec<&(NodeId, BasicNode)> = candidates
                            .iter()
                            .filter(|(id, _)| *id != self.node)
                            .collect();
                        if !others.is_empty() {
                            hint = Some(others[next_candidate % others.len()].clone());
                            next_candidate += 1;
                        }
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        continue;
                    }
                    // Bounded: a proposal never waits past its deadline. An
                    // entry appended here may still commit later: the
                    // caller is told it is uncertain (its producer sequence
                    // makes a retry safe).
                    match tokio::time::timeout(until - now, raft.client_write(stamped(command)))
                        .await
                    {
                        Ok(written) => written.map(|written| written.data),
                        Err(_) => {
                            return Err(ProposeError::Uncertain(format!(
                                "not committed within {within:?}: {last_failure}"
                            )));
                        }
                    }
                }
                Some((node, info)) => {
                    self.stats.forwarded.fetch_add(1, Ordering::Relaxed);
                    match self
                        .call(
                            node,
                            &info.addr,
                            Kind::Propose,
                            partition,
                            &body,
                            (until - now).min(FORWARD_ATTEMPT),
                        )
                        .await
                    {
                        Ok(bytes) => match postcard::from_bytes::<
                            Answer<Reply, RaftError<NodeId, ClientWriteError<NodeId, BasicNode>>>,
                        >(&bytes)
                        {
                            Ok(Answer::Ok(reply)) => Ok(reply),
                            Ok(Answer::Raft(e)) => Err(e),
                            Ok(Answer::NotHosted) => {
                                last_failure = format!("node {node} does not host the group");
                                continue;
                            }
                            Ok(Answer::Malformed(why) | Answer::Refused(why)) => {
                                return Err(ProposeError::Rejected(why));
                            }
                            Err(e) => return Err(ProposeError::Uncertain(e.to_string())),
                        },
                        Err(e @ (LinkError::Connect { .. } | LinkError::Endpoint(_))) => {
                            // Never sent: another replica may lead.
                            last_failure = e.to_string();
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        }
                        Err(e) => return Err(ProposeError::Uncertain(e.to_string())),
                    }
                }
            };
            match answer {
                Ok(reply) => return Ok(reply),
                Err(RaftError::APIError(ClientWriteError::ForwardToLeader(forward))) => {
                    match forward.leader_id.zip(forward.leader_node) {
                        Some(leader) => hint = Some(leader),
                        None => {
                            // An election is on: give it a moment.
                            last_failure = "no leader elected yet".into();
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    }
                }
                Err(RaftError::APIError(e)) => return Err(ProposeError::Rejected(e.to_string())),
                // The group stopped while the command was in it (its
                // storage failed): the entry may have been appended and
                // committed by the others before the stop, so sending it
                // again could store it twice. A group already stopped is
                // skipped before the call (`Standing::Failed`, here and on
                // the serving side), so a fatal answer means "in flight".
                Err(RaftError::Fatal(e)) => {
                    return Err(ProposeError::Uncertain(format!(
                        "partition {}'s group stopped with the command in flight: {e}",
                        partition.0
                    )));
                }
            }
        }
    }

    async fn connection(&self, node: NodeId, addr: &str) -> Result<quinn::Connection, LinkError> {
        let slot = self
            .links
            .entry(node)
            .or_insert_with(|| Arc::new(tokio::sync::Mutex::new(None)))
            .clone();
        let mut slot = slot.lock().await;
        if let Some(conn) = slot.as_ref()
            && conn.close_reason().is_none()
        {
            return Ok(conn.clone());
        }
        let connect_err = |reason: String| LinkError::Connect {
            node,
            addr: addr.to_owned(),
            reason,
        };
        let socket: SocketAddr = tokio::net::lookup_host(addr)
            .await
            .map_err(|e| connect_err(e.to_string()))?
            .next()
            .ok_or_else(|| connect_err("no address".into()))?;
        let name = crate::tls::node_name(node);
        let conn = self
            .endpoint
            .connect(socket, &name)
            .map_err(|e| connect_err(e.to_string()))?
            .await
            .map_err(|e| connect_err(e.to_string()))?;
        debug!(peer = node, %socket, "peer link up");
        *slot = Some(conn.clone());
        Ok(conn)
    }

    /// One call: sends `body` to `partition`'s group on `node` and returns
    /// the answer's bytes.
    async fn call(
        &self,
        node: NodeId,
        addr: &str,
        kind: Kind,
        partition: PartitionId,
        body: &[u8],
        deadline: Duration,
    ) -> Result<Vec<u8>, LinkError> {
        // Connecting has a deadline of its own: a call that never reached
        // the peer is a `Connect` failure (surely not delivered), not a
        // timeout (maybe delivered).
        let connect_within = deadline.min(CONNECT_TIMEOUT);
        let conn = match tokio::time::timeout(connect_within, self.connection(node, addr)).await {
            Ok(conn) => conn?,
            Err(_) => {
                return Err(LinkError::Connect {
                    node,
                    addr: addr.to_owned(),
                    reason: format!("no handshake within {connect_within:?}"),
                });
            }
        };
        let exchange = async {
            let mut recv = send_call(&conn, self.node, node, kind, partition, body).await?;
            let answer = recv
                .read_to_end(MAX_MESSAGE)
                .await
                .map_err(|e| LinkError::Broken {
                    node,
                    reason: e.to_string(),
                })?;
            Ok(answer)
        };
        // A failed or late call fails alone: the connection carries every
        // other call and upstream, and one that is really broken is
        // redialed by the next call (`connection` checks it).
        let answer = match tokio::time::timeout(deadline, exchange).await {
            Ok(Ok(answer)) => answer,
            Ok(Err(e)) => return Err(e),
            Err(_) => {
                return Err(LinkError::Timeout {
                    node,
                    after: deadline,
                });
            }
        };
        self.stats.calls.fetch_add(1, Ordering::Relaxed);
        self.stats
            .bytes_sent
            .fetch_add((body.len() + HEADER) as u64, Ordering::Relaxed);
        self.stats
            .bytes_received
            .fetch_add(answer.len() as u64, Ordering::Relaxed);
        Ok(answer)
    }
}

/// One heartbeat waiting for its peer's batched call.
struct Batched {
    /// Where the peer was last known to listen.
    addr: String,
    partition: PartitionId,
    body: Vec<u8>,
    deadline: tokio::time::Instant,
    answer: tokio::sync::oneshot::Sender<Result<Vec<u8>, LinkError>>,
}

impl Peers {
    /// Sends a heartbeat to `partition`'s group on `node` in the peer's
    /// next batched call; resolves with that group's answer.
    async fn heartbeat(
        self: &Arc<Self>,
        node: NodeId,
        addr: &str,
        partition: PartitionId,
        body: Vec<u8>,
        deadline: Duration,
    ) -> Result<Vec<u8>, LinkError> {
        let (answer, answered) = tokio::sync::oneshot::channel();
        let item = Batched {
            addr: addr.to_owned(),
            partition,
            body,
            deadline: tokio::time::Instant::now() + deadline,
            answer,
        };
        let queue = self
            .batchers
            .entry(node)
            .or_insert_with(|| {
                let (tx, rx) = tokio::sync::mpsc::channel(MAX_BATCH);
                tokio::spawn(batch_loop(self.clone(), node, rx));
                tx
            })
            .clone();
        let gone = || LinkError::Endpoint("the node is stopping".into());
        queue.send(item).await.map_err(|_| gone())?;
        answered.await.map_err(|_| gone())?
    }
}

/// Gathers the heartbeats to `node` into one call: during a heartbeat
/// round, those that arrive within [`BATCH_WINDOW`] of the first; at other
/// times (commit-index updates) only those already queued.
async fn batch_loop(
    peers: Arc<Peers>,
    node: NodeId,
    mut queue: tokio::sync::mpsc::Receiver<Batched>,
) {
    loop {
        let first = tokio::select! {
            () = peers.stop.cancelled() => return,
            first = queue.recv() => match first {
                Some(first) => first,
                None => return,
            },
        };
        let mut batch = vec![first];
        if peers.in_heartbeat_round() {
            let window = tokio::time::sleep(BATCH_WINDOW);
            tokio::pin!(window);
            while batch.len() < MAX_BATCH {
                tokio::select! {
                    () = &mut window => break,
                    next = queue.recv() => match next {
                        Some(next) => batch.push(next),
                        None => break,
                    },
                }
            }
        } else {
            while batch.len() < MAX_BATCH {
                match queue.try_recv() {
                    Ok(next) => batch.push(next),
                    Err(_) => break,
                }
            }
        }
        let deadline = batch
            .iter()
            .map(|b| b.deadline)
            .min()
            .unwrap_or_else(tokio::time::Instant::now);
        let calls: Vec<(u32, &[u8])> = batch
            .iter()
            .map(|b| (b.partition.0, b.body.as_slice()))
            .collect();
        let addr = batch.last().map(|b| b.addr.clone()).unwrap_or_default();
        let answers = match postcard::to_allocvec(&calls) {
            Ok(body) => {
                let within = deadline.saturating_duration_since(tokio::time::Instant::now());
                peers
                    .call(node, &addr, Kind::Batch, PartitionId(0), &body, within)
                    .await
                    .and_then(|bytes| {
                        postcard::from_bytes::<Vec<Vec<u8>>>(&bytes)
                            .map_err(|e| LinkError::Malformed(e.to_string()))
                    })
                    .and_then(|answers| {
                        if answers.len() == batch.len() {
                            Ok(answers)
                        } else {
                            Err(LinkError::Malformed(format!(
                                "{} answers to {} heartbeats",
                                answers.len(),
                                batch.len()
                            )))
                        }
                    })
            }
            Err(e) => Err(LinkError::Malformed(e.to_string())),
        };
        match answers {
            Ok(answers) => {
                for (item, answer) in batch.into_iter().zip(answers) {
                    let _ = item.answer.send(Ok(answer));
                }
            }
            Err(e) => {
                for item in batch {
                    let _ = item.answer.send(Err(e.for_each_call()));
                }
            }
        }
    }
}

impl LinkError {
    /// The same failure, for each call of a batch that failed as one.
    fn for_each_call(&self) -> Self {
        match self {
            Self::Connect { node, addr, reason } => Self::Connect {
                node: *node,
                addr: addr.clone(),
                reason: reason.clone(),
            },
            Self::Timeout { node, after } => Self::Timeout {
                node: *node,
                after: *after,
            },
            Self::NotHosted { node, partition } => Self::NotHosted {
                node: *node,
                partition: *partition,
            },
            Self::Broken { node, reason } => Self::Broken {
                node: *node,
                reason: reason.clone(),
            },
            Self::Malformed(why) => Self::Malformed(why.clone()),
            Self::Endpoint(why) => Self::Endpoint(why.clone()),
            Self::Refused { node, reason } => Self::Refused {
                node: *node,
                reason: reason.clone(),
            },
        }
    }
}

/// A call's header: `kind ‖ partition ‖ sender`.
const HEADER: usize = 13;

/// A call's header, decoded.
struct Header {
    kind: u8,
    partition: PartitionId,
    /// The node the call says sent it.
    from: NodeId,
}

impl Header {
    /// The header of `call` and the body after it; `None` when too short.
    fn split(call: &[u8]) -> Option<(Self, &[u8])> {
        let (header, body) = call.split_at_checked(HEADER)?;
        let partition = u32::from_be_bytes(header[1..5].try_into().ok()?);
        let from = u64::from_be_bytes(header[5..HEADER].try_into().ok()?);
        let header = Self {
            kind: header[0],
            partition: PartitionId(partition),
            from,
        };
        Some((header, body))
    }
}

/// A call's header, encoded.
fn header(kind: Kind, partition: PartitionId, from: NodeId) -> [u8; HEADER] {
    let mut header = [0u8; HEADER];
    header[0] = kind as u8;
    header[1..5].copy_from_slice(&partition.0.to_be_bytes());
    header[5..].copy_from_slice(&from.to_be_bytes());
    header
}

/// Opens a stream to `node` and sends a call on it (`kind ‖ partition ‖
/// from ‖ body`, then the end of the stream); returns where the answer
/// comes.
async fn send_call(
    conn: &quinn::Connection,
    from: NodeId,
    node: NodeId,
    kind: Kind,
    partition: PartitionId,
    body: &[u8],
) -> Result<quinn::RecvStream, LinkError> {
    let broken = |reason: String| LinkError::Broken { node, reason };
    let (mut send, recv) = conn.open_bi().await.map_err(|e| broken(e.to_string()))?;
    send.write_all(&header(kind, partition, from))
        .await
        .map_err(|e| broken(e.to_string()))?;
    send.write_all(body)
        .await
        .map_err(|e| broken(e.to_string()))?;
    send.finish().map_err(|e| broken(e.to_string()))?;
    Ok(recv)
}

async fn accept_loop(peers: Arc<Peers>) {
    loop {
        let incoming = tokio::select! {
            () = peers.stop.cancelled() => return,
            incoming = peers.endpoint.accept() => match incoming {
                Some(incoming) => incoming,
                None => return,
            },
        };
        let peers = peers.clone();
        tokio::spawn(async move {
            match incoming.await {
                Ok(conn) => serve_connection(peers, conn).await,
                Err(e) => debug!(error = %e, "peer handshake failed"),
            }
        });
    }
}

async fn serve_connection(peers: Arc<Peers>, conn: quinn::Connection) {
    // The handshake checked the certificate chains to the cluster CA and
    // names a node; these are the nodes it names.
    let proven: Arc<[NodeId]> = crate::tls::peer_nodes(&conn).into();
    if proven.is_empty() {
        conn.close(1u32.into(), b"no node certificate");
        return;
    }
    loop {
        let (send, recv) = tokio::select! {
            () = peers.stop.cancelled() => return,
            stream = conn.accept_bi() => match stream {
                Ok(stream) => stream,
                Err(e) => {
                    debug!(error = %e, remote = %conn.remote_address(), "peer link closed");
                    return;
                }
            },
        };
        tokio::spawn(serve_call(peers.clone(), proven.clone(), send, recv));
    }
}

/// Why a call from `from`, on a link whose certificate proves `proven`,
/// is refused, if it is.
fn unproven(proven: &[NodeId], from: NodeId) -> Option<String> {
    (!proven.contains(&from))
        .then(|| format!("the call names node {from}, the link's certificate proves {proven:?}"))
}

async fn serve_call(
    peers: Arc<Peers>,
    proven: Arc<[NodeId]>,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) {
    let mut head = [0u8; HEADER];
    if let Err(e) = recv.read_exact(&mut head).await {
        debug!(error = %e, "peer call unreadable");
        return;
    }
    let Some((header, _)) = Header::split(&head) else {
        return;
    };
    if header.kind == Kind::Upstreams as u8 {
        peers
            .stats
            .bytes_received
            .fetch_add(HEADER as u64, Ordering::Relaxed);
        let service = peers.channels.get().cloned();
        match service {
            Some(service) if unproven(&proven, header.from).is_none() => {
                let open: OpenHandler = Arc::new(move |partition, body: bytes::Bytes, out| {
                    tokio::spawn(service.follow(partition, body.to_vec(), out));
                });
                let stats = peers.stats.clone();
                ServedLink::serve(header.from, send, recv, stats, peers.stop.clone(), open).await;
            }
            _ => {
                let _ = send.reset(0u32.into());
            }
        }
        return;
    }
    let body = match recv.read_to_end(MAX_MESSAGE).await {
        Ok(body) => body,
        Err(e) => {
            debug!(error = %e, "peer call unreadable");
            return;
        }
    };
    peers
        .stats
        .bytes_received
        .fetch_add((HEADER + body.len()) as u64, Ordering::Relaxed);
    if header.kind == Kind::Follow as u8 {
        // An upstream on a stream of its own, from a node from before
        // upstream links.
        match peers.channels.get().cloned() {
            Some(service) if unproven(&proven, header.from).is_none() => {
                let out = FollowSink::on_stream(header.from, send, peers.stats.clone());
                service.follow(header.partition, body, out).await;
            }
            _ => {
                let _ = send.reset(0u32.into());
            }
        }
        return;
    }
    let answer = answer(&peers, &proven, header, &body).await;
    peers
        .stats
        .bytes_sent
        .fetch_add(answer.len() as u64, Ordering::Relaxed);
    if let Err(e) = send.write_all(&answer).await {
        debug!(error = %e, "peer answer not sent");
        return;
    }
    let _ = send.finish();
}

/// `command` as this node proposes it to the group it leads: publishes
/// carry the leader's clock (not that of the node that took them, whose
/// clock may be far off), which becomes the partition's time when applied.
fn stamped(command: &Command) -> Command {
    let mut command = command.clone();
    if let Command::Append { now_ms, .. } = &mut command {
        *now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(*now_ms, |d| {
                u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
            });
    }
    command
}

/// Decodes a call, hands it to its group and encodes the group's answer.
async fn answer(peers: &Peers, proven: &[NodeId], header: Header, body: &[u8]) -> Vec<u8> {
    fn encode<T: Serialize, E: Serialize>(answer: &Answer<T, E>) -> Vec<u8> {
        postcard::to_allocvec(answer).unwrap_or_default()
    }
    fn malformed(why: String) -> Vec<u8> {
        encode::<(), ()>(&Answer::Malformed(why))
    }
    let Some(kind) = Kind::from_u8(header.kind) else {
        return malformed(format!("unknown call kind {}", header.kind));
    };
    let (partition, from) = (header.partition, header.from);
    let refusal = unproven(proven, from);
    if refusal.is_none() {
        peers.calls_from.insert(from, std::time::Instant::now());
    }
    if kind == Kind::Batch {
        return answer_batch(peers, from, refusal, body).await;
    }
    if let Some(why) = refusal {
        warn!(peer = from, %why, "peer call refused");
        return refused(why);
    }
    if kind == Kind::Read {
        return match peers.channels.get() {
            Some(service) => service.read(partition, body.to_vec()).await,
            None => encode::<(), ()>(&Answer::NotHosted),
        };
    }
    if kind == Kind::Ephemeral {
        return match peers.channels.get() {
            Some(service) => service.publish(partition, body.to_vec()).await,
            None => encode::<(), ()>(&Answer::NotHosted),
        };
    }
    if kind == Kind::Devices {
        return match peers.channels.get() {
            Some(service) => service.devices(partition, body.to_vec()).await,
            None => encode::<(), ()>(&Answer::NotHosted),
        };
    }
    let Some(raft) = peers.group(partition) else {
        return encode::<(), ()>(&Answer::NotHosted);
    };
    match kind {
        Kind::AppendEntries => match postcard::from_bytes::<AppendEntriesRequest<TypeConfig>>(body)
        {
            Ok(rpc) => match refuse_raft_call(&raft, partition, from, &rpc.vote, || {
                entries_make_member(&rpc.entries, from)
            })
            .or_else(|| beneath_floor(peers.discard_floor(partition, &raft), &rpc.vote, None))
            {
                Some(why) => refused(why),
                None => {
                    let answer = raft.append_entries(rpc).await;
                    if answered_a_leader(&answer) {
                        peers.heard_from(partition, from);
                    }
                    encode(&into_answer(answer))
                }
            },
            Err(e) => malformed(e.to_string()),
        },
        Kind::Vote => match postcard::from_bytes::<VoteRequest<NodeId>>(body) {
            Ok(rpc) => {
                match refuse_raft_call(&raft, partition, from, &rpc.vote, || false).or_else(|| {
                    beneath_floor(
                        peers.discard_floor(partition, &raft),
                        &rpc.vote,
                        Some(rpc.last_log_id),
                    )
                }) {
                    Some(why) => refused(why),
                    None => encode(&into_answer(raft.vote(rpc).await)),
                }
            }
            Err(e) => malformed(e.to_string()),
        },
        Kind::InstallSnapshot => {
            match postcard::from_bytes::<InstallSnapshotRequest<TypeConfig>>(body) {
                Ok(rpc) => match refuse_raft_call(&raft, partition, from, &rpc.vote, || {
                    rpc.meta
                        .last_membership
                        .membership()
                        .get_node(&from)
                        .is_some()
                })
                .or_else(|| beneath_floor(peers.discard_floor(partition, &raft), &rpc.vote, None))
                {
                    Some(why) => refused(why),
                    None => encode(&into_answer(raft.install_snapshot(rpc).await)),
                },
                Err(e) => malformed(e.to_string()),
            }
        }
        Kind::Propose => match postcard::from_bytes::<Command>(body) {
            // A leader whose lease ran out, or a group stopped by a
            // storage failure, takes no proposals: the caller looks for the
            // leader elsewhere, as during an election (and knows the
            // command was not proposed here).
            Ok(_)
                if matches!(
                    Standing::of(&raft, peers.node, peers.leader_lease()),
                    Standing::LeaseExpired { .. } | Standing::Failed
                ) =>
            {
                encode::<Reply, _>(&Answer::Raft(RaftError::<NodeId, _>::APIError(
                    ClientWriteError::<NodeId, BasicNode>::ForwardToLeader(
                        openraft::error::ForwardToLeader::empty(),
                    ),
                )))
            }
            Ok(command) => encode(&into_answer(
                raft.client_write(stamped(&command))
                    .await
                    .map(|written| written.data),
            )),
            Err(e) => malformed(e.to_string()),
        },
        Kind::Released => {
            encode::<Release, ()>(&Answer::Ok(release_of(&raft, peers, partition, from)))
        }
        // Served above.
        Kind::Read
        | Kind::Follow
        | Kind::Batch
        | Kind::Ephemeral
        | Kind::Devices
        | Kind::Upstreams => malformed("not a group call".into()),
    }
}

/// Whether `raft`, led here, committed a membership without `node`: only
/// a leader within its lease knows the group's membership for sure. A
/// learner that asks has stopped its copy: it is noted, so that the
/// leader drops it ([`Peers::retired_learners`]).
fn release_of(raft: &Raft, peers: &Peers, partition: PartitionId, node: NodeId) -> Release {
    if !Standing::of(raft, peers.node, peers.leader_lease()).leads() {
        return Release::NotLeader;
    }
    let metrics = raft.metrics();
    let metrics = metrics.borrow();
    let membership = &metrics.membership_config;
    // Applied means committed; the effective membership may be appended
    // and not committed yet (a leader change could still undo it).
    let committed = membership.log_id().as_ref() <= metrics.last_applied.as_ref();
    let member = membership.membership().get_node(&node).is_some();
    if committed && !member {
        peers.forget_retired_learner(partition, node);
        return Release::Released;
    }
    let voter = membership.membership().voter_ids().any(|id| id == node);
    if member && !voter {
        peers
            .retired_learners
            .insert((partition, node), *membership.log_id());
    } else {
        peers.forget_retired_learner(partition, node);
    }
    Release::Member
}

/// A refusal, encoded (see [`Answer::Refused`]).
fn refused(why: String) -> Vec<u8> {
    postcard::to_allocvec(&Answer::<(), ()>::Refused(why)).unwrap_or_default()
}

/// Why `raft`'s group (of `partition`) must not take a Raft message from
/// node `from` that carries `vote`, if it must not: the vote is another
/// node's (node 2 speaking as node 3), or `from` is no member of the group
/// as this node knows it. `makes_member` says whether the message itself
/// carries a membership naming `from` (a replica that lags a membership
/// change learns it from the message it would otherwise refuse).
fn refuse_raft_call(
    raft: &Raft,
    partition: PartitionId,
    from: NodeId,
    vote: &openraft::Vote<NodeId>,
    makes_member: impl FnOnce() -> bool,
) -> Option<String> {
    let claimed = vote.leader_id.voted_for();
    if claimed != Some(from) {
        return Some(format!(
            "node {from} sent a Raft message as node {claimed:?} of partition {}",
            partition.0
        ));
    }
    let membership = raft.metrics().borrow().membership_config.clone();
    let membership = membership.membership();
    // A group that knows no membership yet (a blank replica about to be
    // given the log) cannot tell: it takes the leader that brings it one.
    let known = membership.nodes().next().is_some();
    if !known || membership.get_node(&from).is_some() || makes_member() {
        return None;
    }
    Some(format!(
        "node {from} is not a member of partition {}",
        partition.0
    ))
}

/// Why a blank group on a partition this node once held up to `floor`
/// refuses a Raft message of `vote` (with the candidate's last log id, for
/// a vote request), if it does ([`Peers::set_discard_floor`]).
fn beneath_floor(
    floor: Option<openraft::LogId<NodeId>>,
    vote: &openraft::Vote<NodeId>,
    candidate_last: Option<Option<openraft::LogId<NodeId>>>,
) -> Option<String> {
    let floor = floor?;
    match candidate_last {
        Some(last) if last < Some(floor) => Some(format!(
            "the candidate's log ends at {last:?}, before {floor}, which this node held before it gave the partition up"
        )),
        None if vote.leader_id.term < floor.leader_id.term => Some(format!(
            "a leader of term {}, older than {floor}, which this node held before it gave the partition up",
            vote.leader_id.term
        )),
        _ => None,
    }
}

/// Whether `entries` hold a membership naming `node`.
fn entries_make_member(entries: &[openraft::Entry<TypeConfig>], node: NodeId) -> bool {
    entries.iter().any(|entry| {
        matches!(&entry.payload, openraft::EntryPayload::Membership(m) if m.get_node(&node).is_some())
    })
}

/// Answers a batch of heartbeats from `from`: each goes to its group, all
/// at once, and the answers come back in the batch's order. With a
/// `refusal` (the link does not prove `from`), each is refused.
async fn answer_batch(
    peers: &Peers,
    from: NodeId,
    refusal: Option<String>,
    body: &[u8],
) -> Vec<u8> {
    let Ok(calls) = postcard::from_bytes::<Vec<(u32, Vec<u8>)>>(body) else {
        return postcard::to_allocvec(&Answer::<(), ()>::Malformed("bad batch".into()))
            .unwrap_or_default();
    };
    if let Some(why) = &refusal {
        warn!(peer = from, %why, "peer heartbeats refused");
    }
    let pending: Vec<_> = calls
        .into_iter()
        .map(|(partition, body)| {
            let partition = PartitionId(partition);
            let raft = peers.group(partition);
            let floor = raft
                .as_ref()
                .and_then(|raft| peers.discard_floor(partition, raft));
            let refusal = refusal.clone();
            let heard = peers.heard.clone();
            tokio::spawn(async move {
                if let Some(why) = refusal {
                    return refused(why);
                }
                let Some(raft) = raft else {
                    return postcard::to_allocvec(&Answer::<(), ()>::NotHosted).unwrap_or_default();
                };
                let answer = match postcard::from_bytes::<AppendEntriesRequest<TypeConfig>>(&body) {
                    Ok(rpc) => match refuse_raft_call(&raft, partition, from, &rpc.vote, || {
                        entries_make_member(&rpc.entries, from)
                    })
                    .or_else(|| beneath_floor(floor, &rpc.vote, None))
                    {
                        Some(why) => Answer::Refused(why),
                        None => {
                            let answer = raft.append_entries(rpc).await;
                            if answered_a_leader(&answer) {
                                heard.insert(partition, (from, std::time::Instant::now()));
                            }
                            into_answer(answer)
                        }
                    },
                    Err(e) => Answer::Malformed(e.to_string()),
                };
                postcard::to_allocvec(&answer).unwrap_or_default()
            })
        })
        .collect();
    let mut answers = Vec::with_capacity(pending.len());
    for task in pending {
        answers.push(task.await.unwrap_or_default());
    }
    postcard::to_allocvec(&answers).unwrap_or_default()
}

/// Whether an append was answered as coming from the group's leader (not
/// refused for a stale vote).
fn answered_a_leader<E>(answer: &Result<openraft::raft::AppendEntriesResponse<NodeId>, E>) -> bool {
    !matches!(
        answer,
        Err(_) | Ok(openraft::raft::AppendEntriesResponse::HigherVote(_))
    )
}

fn into_answer<T, E>(result: Result<T, E>) -> Answer<T, E> {
    match result {
        Ok(value) => Answer::Ok(value),
        Err(e) => Answer::Raft(e),
    }
}

/// The network factory of one partition group.
#[derive(Debug, Clone)]
pub struct Network {
    peers: Arc<Peers>,
    partition: PartitionId,
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = PeerClient;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> Self::Network {
        PeerClient {
            peers: self.peers.clone(),
            partition: self.partition,
            target,
            node: node.clone(),
        }
    }
}

/// One group's calls to one peer.
#[derive(Debug)]
pub struct PeerClient {
    peers: Arc<Peers>,
    partition: PartitionId,
    target: NodeId,
    node: BasicNode,
}

type RpcResult<T, E> = Result<T, RPCError<NodeId, BasicNode, RaftError<NodeId, E>>>;

impl PeerClient {
    async fn rpc<Req, Resp, E>(
        &self,
        kind: Kind,
        req: &Req,
        option: &RPCOption,
    ) -> RpcResult<Resp, E>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let body =
            postcard::to_allocvec(req).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        let sent = if kind == Kind::Batch {
            self.peers
                .heartbeat(
                    self.target,
                    &self.node.addr,
                    self.partition,
                    body,
                    option.hard_ttl(),
                )
                .await
        } else {
            self.peers
                .call(
                    self.target,
                    &self.node.addr,
                    kind,
                    self.partition,
                    &body,
                    option.hard_ttl(),
                )
                .await
        };
        let bytes = sent.map_err(|e| match e {
            LinkError::Timeout { .. } | LinkError::Broken { .. } => {
                RPCError::Network(NetworkError::new(&e))
            }
            _ => RPCError::Unreachable(Unreachable::new(&e)),
        })?;
        match postcard::from_bytes::<Answer<Resp, RaftError<NodeId, E>>>(&bytes) {
            Ok(Answer::Ok(resp)) => Ok(resp),
            Ok(Answer::Raft(e)) => Err(RPCError::RemoteError(RemoteError::new_with_node(
                self.target,
                self.node.clone(),
                e,
            ))),
            Ok(Answer::NotHosted) => Err(RPCError::Unreachable(Unreachable::new(
                &LinkError::NotHosted {
                    node: self.target,
                    partition: self.partition.0,
                },
            ))),
            Ok(Answer::Malformed(why)) => {
                warn!(peer = self.target, %why, "peer could not decode our call");
                Err(RPCError::Network(NetworkError::new(&LinkError::Malformed(
                    why,
                ))))
            }
            Ok(Answer::Refused(reason)) => {
                // A certificate that does not match this node's id, or a
                // group the peer does not count this node in: openraft
                // backs off as from an unreachable peer.
                warn!(peer = self.target, %reason, "peer refused our call");
                Err(RPCError::Unreachable(Unreachable::new(
                    &LinkError::Refused {
                        node: self.target,
                        reason,
                    },
                )))
            }
            Err(e) => Err(RPCError::Network(NetworkError::new(&LinkError::Malformed(
                e.to_string(),
            )))),
        }
    }
}

impl RaftNetwork<TypeConfig> for PeerClient {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<AppendEntriesResponse<NodeId>, Infallible> {
        if rpc.entries.is_empty() {
            // A heartbeat (or a bare commit-index update): shares the
            // peer's next batched call.
            return self.rpc(Kind::Batch, &rpc, &option).await;
        }
        self.rpc(Kind::AppendEntries, &rpc, &option).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<InstallSnapshotResponse<NodeId>, InstallSnapshotError> {
        self.rpc(Kind::InstallSnapshot, &rpc, &option).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> RpcResult<VoteResponse<NodeId>, Infallible> {
        self.rpc(Kind::Vote, &rpc, &option).await
    }

    /// Sends a snapshot front to back in chunks. An exported snapshot is
    /// made as it is read and cannot be rewound ([`super::snapshot_data`]),
    /// so no chunk is read twice: a chunk lost in transit is sent again
    /// from memory, a few times. The last chunk's answer waits for the
    /// install, which takes time in proportion to the snapshot; it is
    /// never sent twice (the follower has already let go of the stream),
    /// and a failure sends a fresh snapshot later instead.
    async fn full_snapshot(
        &mut self,
        vote: Vote<NodeId>,
        mut snapshot: Snapshot<TypeConfig>,
        cancel: impl Future<Output = ReplicationClosed> + Send + 'static,
        option: RPCOption,
    ) -> Result<SnapshotResponse<NodeId>, StreamingError<TypeConfig, Fatal<NodeId>>> {
        let chunk_size = option
            .snapshot_chunk_size()
            .unwrap_or(SNAPSHOT_CHUNK)
            .clamp(64 << 10, MAX_MESSAGE / 2);
        let mut cancel = std::pin::pin!(cancel);
        let mut offset = 0u64;
        let mut chunk = read_chunk(&mut snapshot.snapshot, chunk_size).await?;
        loop {
            let next = read_chunk(&mut snapshot.snapshot, chunk_size).await?;
            let done = next.is_empty();
            let len = chunk.len() as u64;
            let request = InstallSnapshotRequest::<TypeConfig> {
                vote,
                meta: snapshot.meta.clone(),
                offset,
                data: chunk,
                done,
            };
            let deadline = if done {
                install_deadline(offset + len).max(option.hard_ttl())
            } else {
                SNAPSHOT_CHUNK_DEADLINE.max(option.hard_ttl())
            };
            let chunk_option = RPCOption::new(deadline);
            let mut failures = 0u32;
            let answer = loop {
                let sent = tokio::select! {
                    closed = &mut cancel => return Err(closed.into()),
                    sent = self.rpc::<_, InstallSnapshotResponse<NodeId>, InstallSnapshotError>(
                        Kind::InstallSnapshot,
                        &request,
                        &chunk_option,
                    ) => sent,
                };
                match sent {
                    Ok(answer) => break answer,
                    Err(
                        e
                        @ (RPCError::Timeout(_) | RPCError::Network(_) | RPCError::Unreachable(_)),
                    ) if !done && failures + 1 < SNAPSHOT_CHUNK_TRIES => {
                        failures += 1;
                        debug!(target = self.target, offset, error = %e, "a snapshot chunk failed; sending it again");
                        tokio::time::sleep(Duration::from_millis(50) * failures).await;
                    }
                    Err(e) => return Err(streaming_error(e)),
                }
            };
            if answer.vote > vote || done {
                return Ok(SnapshotResponse::new(answer.vote));
            }
            offset += len;
            chunk = next;
        }
    }
}

/// A snapshot chunk's size when openraft names none.
const SNAPSHOT_CHUNK: usize = 3 << 20;
/// How long a snapshot chunk (not the last) may take to arrive.
const SNAPSHOT_CHUNK_DEADLINE: Duration = Duration::from_secs(5);
/// How many times a snapshot chunk is sent before the snapshot fails.
const SNAPSHOT_CHUNK_TRIES: u32 = 5;

/// How long a follower may take to check and install a snapshot of
/// `bytes`: it reads the file twice (check, then restore), at no less than
/// 16 MiB/s on a busy disk.
fn install_deadline(bytes: u64) -> Duration {
    Duration::from_secs(30) + Duration::from_secs(bytes / (16 << 20))
}

/// The next `size` bytes of a snapshot (fewer at its end, none past it).
async fn read_chunk(
    data: &mut super::snapshot_data::SnapshotData,
    size: usize,
) -> Result<Vec<u8>, StreamingError<TypeConfig, Fatal<NodeId>>> {
    let mut chunk = Vec::with_capacity(size);
    data.take(size as u64)
        .read_to_end(&mut chunk)
        .await
        // A snapshot that cannot be read now is sent afresh later: a
        // storage error would stop the partition's group.
        .map_err(|e| StreamingError::Network(NetworkError::new(&e)))?;
    Ok(chunk)
}

/// The streaming form of a failed snapshot chunk.
fn streaming_error(
    e: RPCError<NodeId, BasicNode, RaftError<NodeId, InstallSnapshotError>>,
) -> StreamingError<TypeConfig, Fatal<NodeId>> {
    match e {
        RPCError::Timeout(e) => StreamingError::Timeout(e),
        RPCError::Unreachable(e) => StreamingError::Unreachable(e),
        RPCError::Network(e) => StreamingError::Network(e),
        RPCError::RemoteError(RemoteError {
            target,
            target_node,
            source: RaftError::Fatal(fatal),
        }) => StreamingError::RemoteError(RemoteError {
            target,
            target_node,
            source: fatal,
        }),
        // The follower lost the stream (it restarted, or began another
        // snapshot): this one cannot be rewound, a fresh one is sent.
        other => StreamingError::Network(NetworkError::new(&other)),
    }
}
