//! A broker as a cluster node (DESIGN.md §7): membership and placement on
//! etcd, one openraft group per partition it replicates, and the routing of
//! its devices' writes to their partitions' leaders.
//!
//! ```text
//!  sessions ──append──▶ Log ──▶ router ──propose──▶ partition leader (here or forwarded)
//!                                                        │ quorum commit
//!  every replica: PartitionMachine::apply ──▶ log writer (RocksDB) ──▶ local fan-out
//! ```
//!
//! - [`machine`]: a partition's state machine, applying committed entries
//!   through the log writer;
//! - [`router`]: per-partition proposers, forwarding to the leader;
//! - [`edge`]: upstream subscriptions and remote reads for channels of
//!   partitions this node does not replicate, and the leader's side of
//!   both;
//! - this module: joining etcd, keeping the partition map in view, running
//!   the groups the map gives this node and, where this node leads one,
//!   moving its Raft membership to the replicas the map names.
//!
//! Every node serves devices for every channel: a node that replicates a
//! channel's partition fans out what it applies locally; one that does not
//! (more nodes than `replicas`, or placement moved the partition away)
//! holds one upstream subscription per subscribed channel to the
//! partition's leader and fans out what it relays. Either way a message
//! crosses the cluster once per interested node, whatever the number of
//! devices.

pub mod devices;
pub mod edge;
pub mod ephemeral;
pub mod failures;
pub mod machine;
pub mod push;
pub mod router;
pub mod snapshot;
pub mod status;

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use openraft::{ChangeMembers, Config as RaftConfig, SnapshotPolicy};
use thiserror::Error;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};
use volna_cluster::raft::lease::Standing;
use volna_cluster::raft::log_store::LogStore as RaftLogStore;
use volna_cluster::raft::network::{LinkError, Peers, Release};
use volna_cluster::raft::{BasicNode, Raft};
use volna_cluster::tls::{PeerTls, PeerTlsError};
use volna_cluster::{
    ClusterConfig, Control, ControlError, NodeId, NodeInfo, PartitionId, PartitionMap,
    RememberedView,
};

use crate::config::{ClusterSection, Durability};
use crate::log::{Log, Restore};
use crate::store::{LogStore, StoreError};
use edge::{ChannelServer, Edges};
use failures::{Restart, Restarts};
use machine::{PartitionMachine, SnapshotStats};
use router::{ClusterView, Router};

/// How long a start waits for etcd before it starts from the remembered
/// view.
const ETCD_WITHIN: Duration = Duration::from_secs(5);
/// How long one read of the map and nodes may take.
const VIEW_WITHIN: Duration = Duration::from_secs(2);
/// How long the probe write of a store with failed groups may take.
const PROBE_WITHIN: Duration = Duration::from_secs(5);
/// How often a node asks whether a partition it gave up may be discarded.
const DISCARD_ASK_EVERY: Duration = Duration::from_secs(5);
/// Partitions asked about per reconcile turn, at most.
const DISCARD_QUESTIONS_PER_TURN: usize = 4;
/// How long one such question may take.
const DISCARD_ASK_WITHIN: Duration = Duration::from_secs(2);
/// How long one attempt to join the membership may take.
const JOIN_WITHIN: Duration = Duration::from_secs(10);
/// How often the node re-reads the map and reconciles its groups.
const RECONCILE_EVERY: Duration = Duration::from_millis(500);
/// How long a node waits before calling another election to lead a
/// partition it should lead.
const LEADERSHIP_RETRY: Duration = Duration::from_secs(10);
/// How long a partition must have kept its leader before its preferred
/// leader calls an election to take over.
const LEADERSHIP_SETTLE: Duration = Duration::from_secs(5);
/// Replicas the placer moves per round.
const MAX_MOVES_PER_ROUND: usize = 8;
/// How long the map must have left this node out of a partition before its
/// group here stops even though it never heard that it was replaced (it
/// was down while the leader moved the replica away).
const RETIRE_AFTER: Duration = Duration::from_secs(30);
/// How long a new replica may take to catch up before the move is tried
/// again.
const CATCH_UP_WITHIN: Duration = Duration::from_secs(60);

/// Why a node could not join its cluster.
#[derive(Debug, Error)]
pub enum ClusterError {
    /// The cluster's TLS material is unusable.
    #[error(transparent)]
    Tls(#[from] PeerTlsError),
    /// The inter-node endpoint could not be bound.
    #[error("inter-node endpoint: {0}")]
    Peers(#[from] LinkError),
    /// etcd refused or could not be reached.
    #[error(transparent)]
    Control(#[from] ControlError),
    /// openraft refused the group's configuration.
    #[error("raft configuration: {0}")]
    Raft(String),
    /// The store could not be read.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A partition's snapshot could not be read or restored.
    #[error(transparent)]
    Snapshot(#[from] snapshot::SnapshotError),
    /// etcd is unreachable at start and the node has no remembered view
    /// (it never joined a cluster).
    #[error(
        "cannot start: {0}, and this node has never joined the cluster (it has no map of its own \
         to serve from)"
    )]
    NeverJoined(String),
    /// etcd holds other cluster settings than this node's data was
    /// placed by (etcd was wiped or replaced).
    #[error(
        "etcd's cluster settings {etcd:?} differ from those this node's data was placed by \
         {remembered:?}: refusing to serve its channels under another partitioning"
    )]
    ConfigChanged {
        /// The settings the node remembers.
        remembered: ClusterConfig,
        /// The settings etcd holds.
        etcd: ClusterConfig,
    },
    /// The node was asked to run with a store that is not RocksDB.
    #[error("a cluster node needs its RocksDB store")]
    NoRocksDb,
    /// A push hook's poster thread could not start.
    #[error("cannot start a push hook: {0}")]
    Push(std::io::Error),
}

/// What a node needs to join.
#[derive(Debug)]
pub struct NodeSetup {
    /// `[cluster]`.
    pub section: ClusterSection,
    /// Where devices reach this node (QUIC).
    pub quic_addr: SocketAddr,
    /// The node's RocksDB, for the Raft logs' column families.
    pub db: Arc<rocksdb::DB>,
    /// The same store, as the log sees it (partitions' applied states).
    pub store: Arc<dyn LogStore>,
    /// The node's channel logs: the durable one its partitions replicate,
    /// and the in-memory one of `persistent = false` namespaces, if any.
    pub logs: crate::log::Logs,
    /// The messages' durability: Raft's commit pointer, truncations and
    /// purges follow it; votes and appended entries are always synced.
    pub durability: Durability,
    /// The broker's metrics.
    pub metrics: Arc<crate::metrics::Metrics>,
    /// The fan-out engine (edges relay into it).
    pub fanout: Arc<crate::fanout::Fanout>,
    /// Where partitions keep their snapshots.
    pub snapshot_dir: std::path::PathBuf,
    /// The push hooks of the namespaces that have one (posted by each
    /// partition's leader).
    pub push: Option<Arc<push::ClusterPush>>,
    /// Where the partitions this node replicates keep their users' device
    /// state (the same RocksDB).
    pub device_store: Arc<dyn crate::store::DeviceStore>,
    /// `[cursors]`: how long a device may stay unseen.
    pub cursors: crate::config::CursorsConfig,
}

/// A running cluster node.
pub struct ClusterNode {
    id: NodeId,
    partitions: u32,
    peers: Arc<Peers>,
    view: Arc<ClusterView>,
    groups: Arc<Mutex<BTreeMap<PartitionId, Raft>>>,
    /// Partitions whose group failed on its storage (see
    /// [`Groups::restarts`]).
    restarts: SharedRestarts,
    edges: Arc<Edges>,
    snapshot_stats: Arc<SnapshotStats>,
    stop: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
    /// The node's channel log (partition digests read it).
    log: Log,
    push: Option<Arc<push::ClusterPush>>,
    devices: Arc<devices::ClusterDevices>,
}

impl std::fmt::Debug for ClusterNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterNode")
            .field("id", &self.id)
            .field("partitions", &self.partitions)
            .finish_non_exhaustive()
    }
}

/// What the groups share.
struct Groups {
    id: NodeId,
    control: Control,
    peers: Arc<Peers>,
    view: Arc<ClusterView>,
    groups: Arc<Mutex<BTreeMap<PartitionId, Raft>>>,
    raft_config: Arc<RaftConfig>,
    db: Arc<rocksdb::DB>,
    store: Arc<dyn LogStore>,
    log: Log,
    sync: bool,
    partitions: u32,
    snapshot_dir: std::path::PathBuf,
    snapshot_stats: Arc<SnapshotStats>,
    /// The push hooks, which every partition machine feeds.
    push: Option<Arc<push::ClusterPush>>,
    /// Partitions whose membership change is under way.
    changing: Arc<Mutex<HashSet<PartitionId>>>,
    /// When this node last called an election to lead a partition.
    elections: Mutex<BTreeMap<PartitionId, std::time::Instant>>,
    /// Each partition's leader as last seen, and since when.
    stable_leaders: Mutex<BTreeMap<PartitionId, (Option<NodeId>, std::time::Instant)>>,
    /// Since when the map has left this node out of a partition it runs.
    left_out: Mutex<BTreeMap<PartitionId, std::time::Instant>>,
    edges: Arc<Edges>,
    /// The node came back without the Raft state the map's groups expect
    /// of it: it runs no group and stays out of the membership until the
    /// map no longer names it.
    rejoining: Arc<AtomicBool>,
    /// Partitions whose group stopped on a storage failure, or did not
    /// start again, why, and when each may be started again
    /// ([`failures`]). Such a partition runs no group here, and would
    /// otherwise vanish from `/readyz` (which looks at running groups).
    restarts: SharedRestarts,
    /// The last attempt to keep the view in the store failed.
    view_unsaved: AtomicBool,
    /// When this node last asked whether a partition it gave up may be
    /// discarded here.
    discard_asked: Mutex<BTreeMap<PartitionId, std::time::Instant>>,
    /// Partitions whose Raft state is known to be blank here (discarded
    /// or never held): not asked about again.
    known_blank: Mutex<HashSet<PartitionId>>,
    /// Compacts the store after discards.
    reclaim: Reclaim,
    /// The device state every partition machine applies to.
    devices: Arc<devices::ClusterDevices>,
}

/// See [`Groups::restarts`].
pub(crate) type SharedRestarts = Arc<Mutex<Restarts>>;

/// Whether the map names this node as a replica of partitions whose Raft
/// state is all blank here. A node that lost its disk and came back before
/// the placer moved its replicas away is still a voter of those groups,
/// having forgotten its votes and the entries it acknowledged: taking part
/// again could elect a leader without committed entries (G2). Such a node
/// must come back as a new replica. (A partition merely never started here
/// is blank too; only when every one is blank is the state taken as lost.)
async fn lost_its_raft_state(groups: &Groups, map: &PartitionMap) -> bool {
    let mut listed = 0;
    for (index, replicas) in map.replicas.iter().enumerate() {
        if !replicas.contains(&groups.id) {
            continue;
        }
        listed += 1;
        let store = RaftLogStore::new(groups.db.clone(), PartitionId(index as u32), groups.sync);
        if !store.is_blank().await.unwrap_or(false) {
            return false;
        }
    }
    listed > 0
}

/// What node `id` is in a partition group, as the group here sees it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Role {
    /// It is the group's leader.
    pub leads: bool,
    /// It is one of the group's voters.
    pub voter: bool,
}

impl Role {
    pub(crate) fn of(raft: &Raft, id: NodeId) -> Self {
        let metrics = raft.metrics();
        let metrics = metrics.borrow();
        Self {
            leads: metrics.current_leader == Some(id),
            voter: metrics
                .membership_config
                .membership()
                .voter_ids()
                .any(|voter| voter == id),
        }
    }
}

/// Gives the disk space of deleted data back: RocksDB only marks
/// deletions until compaction reaches them, so after a partition is
/// discarded every column family is flushed and compacted. That is slow
/// on a large store, so it runs on the blocking pool, off the reconcile
/// loop, one pass at a time; requests made during a pass run one more.
#[derive(Debug)]
struct Reclaim {
    db: Arc<rocksdb::DB>,
    running: Arc<AtomicBool>,
    wanted: Arc<AtomicBool>,
}

impl Reclaim {
    fn new(db: Arc<rocksdb::DB>) -> Self {
        Self {
            db,
            running: Arc::default(),
            wanted: Arc::default(),
        }
    }

    fn request(&self) {
        self.wanted.store(true, Ordering::SeqCst);
        if self.running.swap(true, Ordering::SeqCst) {
            return;
        }
        let (db, running, wanted) = (self.db.clone(), self.running.clone(), self.wanted.clone());
        tokio::task::spawn_blocking(move || {
            loop {
                while wanted.swap(false, Ordering::SeqCst) {
                    let started = std::time::Instant::now();
                    match reclaim_space(&db) {
                        Ok(()) => info!(
                            elapsed_ms = started.elapsed().as_millis() as u64,
                            "compacted the store after discarding partitions"
                        ),
                        Err(e) => warn!(error = %e, "compacting the store failed"),
                    }
                }
                running.store(false, Ordering::SeqCst);
                // A request that came after the last check and found the
                // pass still running is taken here.
                if !wanted.load(Ordering::SeqCst) || running.swap(true, Ordering::SeqCst) {
                    return;
                }
            }
        });
    }
}

fn reclaim_space(db: &rocksdb::DB) -> Result<(), rocksdb::Error> {
    for name in rocksdb::DB::list_cf(&rocksdb::Options::default(), db.path())? {
        if let Some(cf) = db.cf_handle(&name) {
            db.flush_cf(cf)?;
            db.compact_range_cf(cf, None::<&[u8]>, None::<&[u8]>);
        }
    }
    Ok(())
}

/// The replica that should lead `partition`: spread by partition number
/// over its replicas, so that with the same replica set on every partition
/// each node still leads its share.
fn preferred_leader(partition: PartitionId, replicas: &[NodeId]) -> Option<NodeId> {
    if replicas.is_empty() {
        return None;
    }
    replicas.get(partition.0 as usize % replicas.len()).copied()
}

impl ClusterNode {
    /// Joins the cluster: binds the inter-node endpoint, registers in etcd,
    /// starts the groups the map gives this node and routes the log's
    /// writes through them.
    pub async fn start(setup: NodeSetup) -> Result<Self, ClusterError> {
        let section = &setup.section;
        let (Some(ca), Some(cert), Some(key)) =
            (&section.tls.ca, &section.tls.cert, &section.tls.key)
        else {
            return Err(ClusterError::Tls(PeerTlsError::Config(
                "cluster.tls needs ca, cert and key".into(),
            )));
        };
        let tls = PeerTls::from_files(ca, cert, key)?;
        let id = section.node_id;
        let peers = Peers::bind(id, section.peer_listen, tls)?;
        let peer_addr = peers.local_addr()?;
        let control = Control::connect(&section.etcd_endpoints, &section.name, ETCD_WITHIN).await?;
        let remembered = remembered_view(&setup.db).await;
        let proposed = ClusterConfig {
            partitions: section.partitions,
            replicas: section.replicas,
        };
        let settled = match tokio::time::timeout(ETCD_WITHIN, control.settle_config(proposed)).await
        {
            Ok(Ok(settled)) => {
                // Channels hash to partitions by the count: a node whose
                // data was placed by another never serves under this one.
                if let Some(remembered) = remembered.as_ref().filter(|r| r.config != settled) {
                    return Err(ClusterError::ConfigChanged {
                        remembered: remembered.config,
                        etcd: settled,
                    });
                }
                settled
            }
            outcome => {
                let why = match outcome {
                    Ok(Err(e)) => e.to_string(),
                    _ => format!("etcd gave no answer within {ETCD_WITHIN:?}"),
                };
                let Some(remembered) = &remembered else {
                    return Err(ClusterError::NeverJoined(why));
                };
                warn!(
                    error = %why,
                    map_version = remembered.map.version,
                    "etcd is unreachable: starting from the cluster view this node saw last; \
                     membership and placement wait for etcd"
                );
                remembered.config
            }
        };
        let raft_config = RaftConfig {
            cluster_name: section.name.clone(),
            heartbeat_interval: section.heartbeat_ms,
            // openraft's followers wait out the leader's lease (its
            // `election_timeout_max`) and then their own timeout before
            // electing: both halves fit in `election_timeout_ms`, so a
            // partition whose leader died elects another within it.
            election_timeout_min: section.election_timeout_ms / 4,
            election_timeout_max: section.election_timeout_ms / 2,
            // The node fires every group's heartbeats at once instead
            // (`heartbeat_loop`), so that they share one call per peer.
            enable_heartbeat: false,
            // By bytes too: `snapshot_loop`.
            snapshot_policy: SnapshotPolicy::LogsSinceLast(section.snapshot_entries),
            max_in_snapshot_log_to_keep: (section.snapshot_entries / 10).min(1_000),
            // A follower this far behind is lagging (metrics): more than a
            // snapshot's worth, as openraft asks.
            replication_lag_threshold: section.snapshot_entries * 2,
            ..RaftConfig::default()
        }
        .validate()
        .map_err(|e| ClusterError::Raft(e.to_string()))?;
        let info = NodeInfo {
            id,
            quic: section
                .advertise_addr
                .clone()
                .unwrap_or_else(|| setup.quic_addr.to_string()),
            peer: section
                .peer_advertise
                .clone()
                .unwrap_or_else(|| peer_addr.to_string()),
            log_format: volna_cluster::raft::LOG_FORMAT,
            peer_protocol: volna_cluster::raft::network::PEER_PROTOCOL,
        };
        let view = Arc::new(ClusterView::default());
        let groups = Arc::new(Mutex::new(BTreeMap::new()));
        let stop = CancellationToken::new();
        let edges = Edges::new(
            id,
            settled.partitions,
            peers.clone(),
            view.clone(),
            setup.fanout.clone(),
            setup.logs.clone(),
            stop.child_token(),
        );
        let within =
            Duration::from_millis(section.election_timeout_ms * 2) + Duration::from_secs(1);
        let cluster_devices = devices::ClusterDevices::new(
            id,
            settled.partitions,
            peers.clone(),
            view.clone(),
            edges.clone(),
            setup.logs.clone(),
            setup.device_store.clone(),
            within,
        );
        let snapshot_stats = Arc::new(SnapshotStats::default());
        let restarts: SharedRestarts = Arc::new(Mutex::new(Restarts::new(Duration::from_millis(
            section.election_timeout_ms,
        ))));
        let shared = Arc::new(Groups {
            id,
            control: control.clone(),
            peers: peers.clone(),
            view: view.clone(),
            groups: groups.clone(),
            raft_config: Arc::new(raft_config),
            db: setup.db.clone(),
            store: setup.store,
            log: setup.logs.durable().clone(),
            sync: setup.durability == Durability::Fsync,
            partitions: settled.partitions,
            snapshot_dir: setup.snapshot_dir.clone(),
            snapshot_stats: snapshot_stats.clone(),
            push: setup.push.clone(),
            changing: Arc::default(),
            elections: Mutex::default(),
            stable_leaders: Mutex::default(),
            left_out: Mutex::default(),
            edges: edges.clone(),
            rejoining: Arc::default(),
            restarts: restarts.clone(),
            view_unsaved: AtomicBool::new(false),
            discard_asked: Mutex::default(),
            known_blank: Mutex::default(),
            reclaim: Reclaim::new(setup.db.clone()),
            devices: cluster_devices.clone(),
        });
        // Groups this node replicated before a restart come back before it
        // takes traffic, from the map as last seen in etcd (or, while etcd
        // is down, as this node remembers it).
        let map = match read_view(&control).await {
            Ok(Some((map, nodes))) => {
                // Peers down right now keep the addresses remembered.
                if let Some(remembered) = &remembered {
                    view.restore(map.clone(), remembered.nodes.clone());
                }
                view.update(map.clone(), nodes);
                Some(map)
            }
            Ok(None) => None,
            Err(why) => remembered.map(|remembered| {
                debug!(error = %why, "etcd unreachable: the groups start from the remembered map");
                view.restore(remembered.map.clone(), remembered.nodes);
                remembered.map
            }),
        };
        let mut saved_view = None;
        if let Some(map) = map {
            remember_view(&shared, settled, &mut saved_view).await;
            if lost_its_raft_state(&shared, &map).await {
                warn!(
                    node = id,
                    "the map names this node as a replica but its Raft state is gone (a lost \
                     disk): it stays out of the cluster's membership until the placer has \
                     moved its replicas away, then rejoins as a new replica"
                );
                shared.rejoining.store(true, Ordering::SeqCst);
            }
            shared.reconcile().await;
        }
        // A leader stops acting as one once no quorum acknowledged it for
        // half an election timeout: before its followers (who wait out
        // its lease, then their own timeout) can have elected another.
        peers.set_leader_lease(Duration::from_millis(section.election_timeout_ms / 2));
        let router = Router::start(
            settled.partitions,
            peers.clone(),
            view.clone(),
            setup.logs.durable().clone(),
            within,
            setup.metrics.clone(),
            edges.clone(),
        );
        setup.logs.durable().replicate_through(router);
        // In-memory channels live on their partition's leader only.
        let ephemeral = setup.logs.ephemeral().map(|log| {
            let router = ephemeral::EphemeralRouter::start(
                settled.partitions,
                peers.clone(),
                edges.clone(),
                log.clone(),
                within,
                stop.child_token(),
            );
            log.replicate_through(router.clone());
            router
        });
        peers.serve_channels(Arc::new(ChannelServer::new(
            id,
            settled.partitions,
            &peers,
            setup.logs.clone(),
            ephemeral,
            setup.fanout.clone(),
            cluster_devices.clone(),
        )));
        // Watched first: a feed made between the first look and the watch
        // would get no upstream until its partition changed.
        setup.fanout.watch_feeds(edges.clone());
        edges.check_partitions();
        if let Some(push) = &setup.push {
            push.start(
                peers.clone(),
                view.clone(),
                within,
                tokio::runtime::Handle::current(),
            )
            .map_err(ClusterError::Push)?;
        }
        let ttl = Duration::from_secs(section.lease_ttl_secs);
        let rejoining = shared.rejoining.clone();
        let tasks = vec![
            tokio::spawn(membership_loop(
                rejoining,
                control.clone(),
                info.clone(),
                settled,
                ttl,
                Duration::from_secs(section.dead_node_grace_secs),
                stop.clone(),
            )),
            tokio::spawn(heartbeat_loop(
                groups.clone(),
                peers.clone(),
                id,
                Duration::from_millis(section.heartbeat_ms),
                stop.clone(),
            )),
            tokio::spawn(snapshot_loop(
                groups.clone(),
                snapshot_stats.clone(),
                section.snapshot_log_bytes,
                stop.clone(),
            )),
            tokio::spawn(view_loop(shared, settled, saved_view, stop.clone())),
            tokio::spawn(device_sweep_loop(
                cluster_devices.clone(),
                setup.cursors.clone(),
                stop.clone(),
            )),
        ];
        info!(
            node = id,
            peer = %peer_addr,
            partitions = settled.partitions,
            replicas = settled.replicas,
            "joined the cluster"
        );
        Ok(Self {
            id,
            partitions: settled.partitions,
            peers,
            view,
            groups,
            restarts,
            edges,
            snapshot_stats,
            stop,
            tasks,
            log: setup.logs.durable().clone(),
            push: setup.push,
            devices: cluster_devices,
        })
    }

    /// The device state of this node's users, kept by their partitions.
    pub fn devices(&self) -> &Arc<devices::ClusterDevices> {
        &self.devices
    }

    /// This node's edges (upstreams, remote reads).
    pub fn edges(&self) -> &Arc<Edges> {
        &self.edges
    }

    /// This node's id.
    pub fn id(&self) -> NodeId {
        self.id
    }

    /// The inter-node endpoint (traffic counters, hosted groups).
    pub fn peers(&self) -> &Arc<Peers> {
        &self.peers
    }

    /// The cluster as this node last saw it.
    pub fn view(&self) -> &Arc<ClusterView> {
        &self.view
    }

    /// The partition groups this node runs.
    pub fn groups(&self) -> BTreeMap<PartitionId, Raft> {
        self.groups.lock().map(|g| g.clone()).unwrap_or_default()
    }

    /// Partitions in the cluster.
    pub fn partitions(&self) -> u32 {
        self.partitions
    }

    /// What `/admin/cluster` shows, computed on each call.
    pub fn status_source(&self) -> status::StatusSource {
        status::StatusSource {
            id: self.id,
            partitions: self.partitions,
            peers: self.peers.clone(),
            view: self.view.clone(),
            groups: self.groups.clone(),
            restarts: self.restarts.clone(),
            edges: self.edges.clone(),
            snapshots: self.snapshot_stats.clone(),
            log: self.log.clone(),
        }
    }

    /// Watches whether this node can serve its devices, every heartbeat:
    /// a node all of whose groups have lost their leader (it is cut off
    /// from its peers, or every group's storage failed) for half an
    /// election timeout stops serving (a full one put the median device
    /// past two election timeouts from the cut: 2.1 s against 1.6 s). It closes every session with
    /// `Unavailable` / `GOING_AWAY` (the clients move on to another seed)
    /// and refuses new ones until a group has a leader again: a device on
    /// a cut-off node is told, never left in silence (DESIGN.md §7).
    pub fn guard_devices(
        &mut self,
        serving: Arc<AtomicBool>,
        sessions: Arc<crate::session::SessionRegistry>,
        heartbeat: Duration,
        election_timeout: Duration,
    ) {
        self.tasks.push(tokio::spawn(service_loop(
            self.groups.clone(),
            self.peers.clone(),
            serving,
            sessions,
            heartbeat,
            election_timeout / 2,
            self.stop.clone(),
        )));
    }

    /// Leaves: stops the groups (their peers elect other leaders), the
    /// membership (its lease is revoked) and the inter-node endpoint.
    pub async fn shutdown(self) {
        // Posters first: they propose marks to the groups.
        if let Some(push) = self.push.clone() {
            let _ = tokio::task::spawn_blocking(move || push.shutdown()).await;
        }
        self.stop.cancel();
        let groups = self.groups();
        for task in self.tasks {
            let _ = task.await;
        }
        for (partition, raft) in groups {
            if let Err(e) = raft.shutdown().await {
                debug!(partition = partition.0, error = %e, "group stopped with an error");
            }
        }
        self.peers.close();
    }
}

/// Keeps this node registered (joining again if its lease expired) and
/// campaigns to be the placer; the placer places partitions until it loses
/// the office.
async fn membership_loop(
    rejoining: Arc<AtomicBool>,
    control: Control,
    info: NodeInfo,
    config: ClusterConfig,
    ttl: Duration,
    grace: Duration,
    stop: CancellationToken,
) {
    // Out of the membership while the placer moves lost replicas away
    // (the node looks dead to it): see `lost_its_raft_state`.
    while rejoining.load(Ordering::SeqCst) {
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(Duration::from_millis(250)) => {}
        }
    }
    loop {
        let membership = tokio::select! {
            () = stop.cancelled() => return,
            joined = tokio::time::timeout(JOIN_WITHIN, control.join(&info, ttl)) => match joined {
                Ok(Ok(membership)) => membership,
                failed => {
                    let error = match failed {
                        Ok(Err(e)) => e.to_string(),
                        _ => format!("etcd gave no answer within {JOIN_WITHIN:?}"),
                    };
                    warn!(%error, "cannot join the cluster membership; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            },
        };
        let place = async {
            loop {
                match control.campaign(&membership, info.id).await {
                    Ok(placer) => {
                        let placer = placer.with_dead_node_grace(grace);
                        info!(node = info.id, "this node is the placer");
                        let result = placer
                            .run(
                                config,
                                MAX_MOVES_PER_ROUND,
                                Duration::from_secs(2),
                                stop.clone(),
                            )
                            .await;
                        match result {
                            Ok(()) if stop.is_cancelled() => {
                                let _ = placer.resign().await;
                                return;
                            }
                            Ok(()) => {}
                            Err(e) => warn!(error = %e, "placer stopped"),
                        }
                    }
                    Err(e) => {
                        debug!(error = %e, "placer campaign failed; retrying");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
            }
        };
        tokio::select! {
            () = stop.cancelled() => {
                if let Err(e) = membership.leave().await {
                    debug!(error = %e, "could not revoke the membership lease");
                }
                return;
            }
            () = membership.expired() => {
                warn!(node = info.id, "membership lease expired; joining again");
            }
            () = place => {}
        }
    }
}

/// Every `interval`, has every group this node leads send its heartbeats,
/// all at once: the network layer then carries each peer's share in one
/// call (Raft heartbeats batched per node pair).
/// Forgets idle devices of the partitions this node leads, every
/// `cursors.sweep_interval_secs` (the first one interval after start: a
/// restart loop does not sweep each time).
async fn device_sweep_loop(
    devices: Arc<devices::ClusterDevices>,
    cursors: crate::config::CursorsConfig,
    stop: CancellationToken,
) {
    let every = Duration::from_secs(cursors.sweep_interval_secs.max(1));
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(every) => {}
        }
        devices.sweep(cursors.device_idle_days).await;
    }
}

/// Takes a snapshot of every partition whose log since its last one
/// holds `log_bytes` (openraft counts only entries); its log is purged
/// then.
async fn snapshot_loop(
    groups: Arc<Mutex<BTreeMap<PartitionId, Raft>>>,
    stats: Arc<SnapshotStats>,
    log_bytes: u64,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let due: Vec<Raft> = {
            let due = stats.partitions_due(log_bytes);
            let Ok(groups) = groups.lock() else { continue };
            due.iter().filter_map(|p| groups.get(p).cloned()).collect()
        };
        for raft in due {
            // One being taken already resets the count when it starts.
            if let Err(e) = raft.trigger().snapshot().await {
                debug!(error = %e, "snapshot not taken");
            }
        }
    }
}

async fn heartbeat_loop(
    groups: Arc<Mutex<BTreeMap<PartitionId, Raft>>>,
    peers: Arc<Peers>,
    id: NodeId,
    interval: Duration,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let led: Vec<Raft> = groups
            .lock()
            .map(|g| {
                g.values()
                    .filter(|raft| raft.metrics().borrow().current_leader == Some(id))
                    .cloned()
                    .collect()
            })
            .unwrap_or_default();
        if led.is_empty() {
            continue;
        }
        peers.firing_heartbeats();
        for raft in led {
            if let Err(e) = raft.trigger().heartbeat().await {
                debug!(error = %e, "heartbeat not sent");
            }
        }
        peers.firing_heartbeats();
    }
}

/// Whether a node whose groups stand so can serve devices: some group
/// has a leader it can reach (itself, with its lease, or another), or it
/// hosts no group (an edge only: its upstreams find the leaders).
fn can_serve(standings: impl IntoIterator<Item = Standing>) -> bool {
    let mut hosts_any = false;
    for standing in standings {
        hosts_any = true;
        if matches!(standing, Standing::Leader | Standing::Follower(_)) {
            return true;
        }
    }
    !hosts_any
}

/// [`ClusterNode::guard_devices`]' loop: `serving` follows whether the
/// node can serve, after `grace` of not being able to.
async fn service_loop(
    groups: Arc<Mutex<BTreeMap<PartitionId, Raft>>>,
    peers: Arc<Peers>,
    serving: Arc<AtomicBool>,
    sessions: Arc<crate::session::SessionRegistry>,
    every: Duration,
    grace: Duration,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut unable_since: Option<tokio::time::Instant> = None;
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let led: Vec<(PartitionId, Raft)> = groups
            .lock()
            .map(|g| g.iter().map(|(p, raft)| (*p, raft.clone())).collect())
            .unwrap_or_default();
        let lease = peers.leader_lease();
        let standings: Vec<Standing> = led
            .iter()
            .map(
                |(partition, raft)| match Standing::of(raft, peers.node(), lease) {
                    // openraft names the leader until the follower's own
                    // election timeout; a follower cut off from it knows
                    // sooner: no append or heartbeat within the lease.
                    Standing::Follower(leader) if !peers.hears_from(*partition, leader) => {
                        Standing::NoLeader
                    }
                    standing => standing,
                },
            )
            .collect();
        if can_serve(standings.iter().copied()) {
            unable_since = None;
            if !serving.swap(true, Ordering::SeqCst) {
                warn!(
                    ?standings,
                    "a partition group has a leader again: serving devices"
                );
            }
            continue;
        }
        let since = *unable_since.get_or_insert_with(tokio::time::Instant::now);
        if since.elapsed() < grace {
            continue;
        }
        if serving.swap(false, Ordering::SeqCst) {
            warn!(
                ?standings,
                "no partition group of this node has a reachable leader: closing device \
                 sessions so that they move to another node"
            );
        }
        // Again on every tick: a session admitted while the flag turned
        // is closed on the next.
        let closed = sessions.close_all_unavailable();
        if closed > 0 {
            debug!(closed, "device sessions closed: this node is cut off");
        }
    }
}

/// The map and the live nodes as etcd has them now (`None`: no map yet),
/// or why etcd did not say.
async fn read_view(
    control: &Control,
) -> Result<Option<(PartitionMap, BTreeMap<NodeId, NodeInfo>)>, String> {
    let fresh = async {
        let map = control.map().await?;
        let nodes = control.nodes().await?;
        Ok::<_, ControlError>(map.map(|map| (map, nodes)))
    };
    match tokio::time::timeout(VIEW_WITHIN, fresh).await {
        Ok(Ok(view)) => Ok(view),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("etcd gave no answer within {VIEW_WITHIN:?}")),
    }
}

/// The view saved in the node's store, if any; one that cannot be read
/// is reported and ignored (etcd's view replaces it).
async fn remembered_view(db: &Arc<rocksdb::DB>) -> Option<RememberedView> {
    let db = db.clone();
    match tokio::task::spawn_blocking(move || RememberedView::load(&db)).await {
        Ok(Ok(view)) => view,
        Ok(Err(e)) => {
            warn!(error = %e, "the remembered cluster view is unusable; etcd's is needed to start");
            None
        }
        Err(e) => {
            warn!(error = %e, "reading the remembered cluster view did not finish");
            None
        }
    }
}

/// Saves the node's current view in its store if it changed since `saved`.
async fn remember_view(groups: &Groups, config: ClusterConfig, saved: &mut Option<RememberedView>) {
    let (map, nodes) = groups.view.snapshot();
    let view = RememberedView { config, map, nodes };
    if saved.as_ref() == Some(&view) {
        return;
    }
    let (db, to_save) = (groups.db.clone(), view.clone());
    let why = match tokio::task::spawn_blocking(move || to_save.save(&db)).await {
        Ok(Ok(())) => {
            *saved = Some(view);
            groups.view_unsaved.store(false, Ordering::Relaxed);
            return;
        }
        Ok(Err(e)) => e.to_string(),
        Err(e) => e.to_string(),
    };
    // Tried again every turn: said once per view (a full disk refuses it
    // for as long as it is full).
    if groups.view_unsaved.swap(true, Ordering::Relaxed) {
        debug!(error = %why, "cannot keep the cluster view in the store");
    } else {
        warn!(error = %why, "cannot keep the cluster view in the store; trying again each turn");
    }
}

/// Re-reads the map and nodes now and then; reconciles the groups with
/// them, and keeps the view in the node's store for a restart while etcd
/// is down. When etcd is unreachable the last view stays in force.
async fn view_loop(
    groups: Arc<Groups>,
    config: ClusterConfig,
    mut saved: Option<RememberedView>,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(RECONCILE_EVERY);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        match read_view(&groups.control).await {
            Ok(Some((map, nodes))) => {
                groups.view.update(map, nodes);
                remember_view(&groups, config, &mut saved).await;
            }
            Ok(None) => continue,
            Err(why) => debug!(error = %why, "etcd unreachable; serving on the last known map"),
        }
        groups.reconcile().await;
        groups.edges.check_partitions();
    }
}

impl Groups {
    /// Starts the groups the map gives this node; where this node leads a
    /// group, moves its membership towards the map's replicas.
    async fn reconcile(self: &Arc<Self>) {
        let (map, nodes) = self.view.snapshot();
        if self.rejoining.load(Ordering::SeqCst) {
            if map.replicas.iter().any(|r| r.contains(&self.id)) {
                return;
            }
            info!(
                node = self.id,
                "the placer moved this node's lost replicas away; rejoining"
            );
            self.rejoining.store(false, Ordering::SeqCst);
        }
        self.retire_moved_groups(&map).await;
        self.discard_released_partitions(&map, &nodes).await;
        self.stop_failed_groups().await;
        if let Ok(mut restarts) = self.restarts.lock() {
            restarts.forget_healthy(std::time::Instant::now());
        }
        // One probe write per turn tells whether the store takes writes
        // again, for every failed group whose wait is over.
        let mut store_health: Option<Result<(), String>> = None;
        for (index, replicas) in map.replicas.iter().enumerate() {
            let partition = PartitionId(index as u32);
            let members: BTreeMap<NodeId, BasicNode> = replicas
                .iter()
                .filter_map(|id| Some((*id, BasicNode::new(&nodes.get(id)?.peer))))
                .collect();
            if members.len() != replicas.len() {
                // A replica's address is unknown (never seen alive): wait.
                continue;
            }
            if !replicas.contains(&self.id) {
                // Placement moved the partition away from this node. Where
                // it still leads, it hands the group over itself (nobody
                // else can change the membership); openraft steps it down
                // once the change is committed.
                let hosted = self
                    .groups
                    .lock()
                    .ok()
                    .and_then(|g| g.get(&partition).cloned());
                if let Some(raft) = hosted {
                    self.move_membership(partition, raft, &map, members);
                }
                continue;
            }
            let restart = self
                .restarts
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .restart(partition, std::time::Instant::now());
            match restart {
                Restart::Go => {}
                Restart::Wait => continue,
                Restart::IfStoreHealthy => {
                    if store_health.is_none() {
                        store_health = Some(self.probe_store().await);
                    }
                    if let Some(Err(why)) = &store_health {
                        if let Ok(mut restarts) = self.restarts.lock() {
                            restarts.still_failing(partition, why.clone());
                        }
                        continue;
                    }
                }
            }
            let raft = match self.ensure_group(partition).await {
                Ok(raft) => {
                    if let Ok(mut restarts) = self.restarts.lock() {
                        restarts.started(partition, std::time::Instant::now());
                    }
                    raft
                }
                Err(e) => {
                    warn!(partition = index, error = %e, "cannot start the partition's group");
                    if let Ok(mut restarts) = self.restarts.lock() {
                        restarts.failed(partition, e.to_string(), std::time::Instant::now());
                    }
                    continue;
                }
            };
            let preferred = preferred_leader(partition, replicas);
            if !raft.is_initialized().await.unwrap_or(true) {
                if preferred == Some(self.id) {
                    self.initialize(partition, &raft, members).await;
                }
                continue;
            }
            if !self.view.is_confirmed() {
                // A map remembered from before a restart may be stale (the
                // placer may have moved replicas since): membership and
                // leadership follow the map only once etcd confirms it.
                continue;
            }
            if preferred == Some(self.id) {
                self.take_leadership(partition, &raft).await;
            }
            self.move_membership(partition, raft, &map, members);
        }
    }

    /// Stops the groups of partitions the map has left this node out of,
    /// once the group's configuration no longer counts this node as a
    /// voter (the leader replaced it), or after [`RETIRE_AFTER`] unless it
    /// still leads (then it must hand over first).
    /// Their channels are then served as an edge; the group's data stays,
    /// so the partition can come back.
    async fn retire_moved_groups(&self, map: &PartitionMap) {
        let now = std::time::Instant::now();
        let hosted: Vec<(PartitionId, Raft)> = self
            .groups
            .lock()
            .map(|g| g.iter().map(|(p, r)| (*p, r.clone())).collect())
            .unwrap_or_default();
        let mut retire = Vec::new();
        if let Ok(mut left_out) = self.left_out.lock() {
            for (partition, raft) in &hosted {
                if map.replicas_of(*partition).contains(&self.id) {
                    left_out.remove(partition);
                    continue;
                }
                let since = *left_out.entry(*partition).or_insert(now);
                let Role { leads, voter } = Role::of(raft, self.id);
                // A replaced leader no longer a voter has handed over (or
                // is about to): it may not even hear who leads now.
                if !voter || (!leads && now.duration_since(since) >= RETIRE_AFTER) {
                    left_out.remove(partition);
                    retire.push((*partition, raft.clone()));
                }
            }
        }
        for (partition, raft) in retire {
            self.peers.unhost(partition);
            if let Ok(mut groups) = self.groups.lock() {
                groups.remove(&partition);
            }
            if let Err(e) = raft.shutdown().await {
                debug!(partition = partition.0, error = %e, "retired group stopped with an error");
            }
            info!(
                partition = partition.0,
                "placement moved the partition away; its group here stopped"
            );
        }
    }

    /// Discards this node's copy of each partition placement moved away
    /// once the partition's leader says its group committed a membership
    /// without this node (a removed node never hears of that commit
    /// itself: [`Peers::released`]): the partition's channels, messages
    /// and windows, its Raft log and vote, its snapshots; then gives the
    /// disk space back. Its devices already follow those channels from
    /// the leader (the group stopped first, [`Self::retire_moved_groups`]).
    /// Only on a map etcd confirmed: a remembered one may be stale.
    async fn discard_released_partitions(
        &self,
        map: &PartitionMap,
        nodes: &BTreeMap<NodeId, NodeInfo>,
    ) {
        if !self.view.is_confirmed() {
            return;
        }
        let hosted: HashSet<PartitionId> = self
            .groups
            .lock()
            .map(|g| g.keys().copied().collect())
            .unwrap_or_default();
        let now = std::time::Instant::now();
        let mut asking = Vec::new();
        for (index, replicas) in map.replicas.iter().enumerate() {
            let partition = PartitionId(index as u32);
            if replicas.contains(&self.id) || replicas.is_empty() || hosted.contains(&partition) {
                continue;
            }
            if self
                .known_blank
                .lock()
                .is_ok_and(|blank| blank.contains(&partition))
            {
                continue;
            }
            // Bounded per turn: the questions go to peers, which may be
            // slow or gone, and the reconcile loop waits for them.
            if asking.len() == DISCARD_QUESTIONS_PER_TURN {
                break;
            }
            let due = self.discard_asked.lock().is_ok_and(|mut asked| {
                let due = asked
                    .get(&partition)
                    .is_none_or(|at| now.duration_since(*at) >= DISCARD_ASK_EVERY);
                if due {
                    asked.insert(partition, now);
                }
                due
            });
            if !due {
                continue;
            }
            let raft_store = RaftLogStore::new(self.db.clone(), partition, self.sync);
            match raft_store.is_blank().await {
                Ok(true) => {
                    // A discard a crash cut short left the channels.
                    if self.holds_applied_state(partition) {
                        self.report_discard(partition, self.discard_channels(partition).await);
                    }
                    if let Ok(mut blank) = self.known_blank.lock() {
                        blank.insert(partition);
                    }
                }
                Ok(false) => asking.push((partition, replicas.as_slice(), raft_store)),
                Err(e) => {
                    debug!(partition = index, error = %e, "cannot read the partition's Raft state");
                }
            }
        }
        // Asked together: one slow or gone peer delays the turn by one
        // question's bound, not by one per partition.
        let answers = futures_util::future::join_all(
            asking
                .iter()
                .map(|(partition, replicas, _)| self.released(*partition, replicas, nodes)),
        )
        .await;
        for ((partition, _, raft_store), released) in asking.into_iter().zip(answers) {
            if !released {
                continue;
            }
            let discarded = match raft_store.discard().await {
                Ok(()) => self.discard_channels(partition).await,
                Err(e) => Err(ClusterError::Raft(e.to_string())),
            };
            self.report_discard(partition, discarded);
        }
    }

    fn report_discard(&self, partition: PartitionId, discarded: Result<(), ClusterError>) {
        match discarded {
            Ok(()) => {
                self.snapshot_stats
                    .discarded
                    .fetch_add(1, Ordering::Relaxed);
                if let Ok(mut blank) = self.known_blank.lock() {
                    blank.insert(partition);
                }
                info!(
                    partition = partition.0,
                    "the partition's group went on without this node: its copy here is discarded"
                );
            }
            Err(e) => warn!(
                partition = partition.0,
                error = %e,
                "discarding the partition's copy failed; trying again later"
            ),
        }
    }

    /// Whether this node's store holds an applied state of `partition`
    /// (channels applied from its log).
    fn holds_applied_state(&self, partition: PartitionId) -> bool {
        match self.store.load_applied(partition.0) {
            Ok(Some(bytes)) => {
                machine::applied_position(&bytes).is_none_or(|(last, _)| last.is_some())
            }
            Ok(None) => false,
            // Unreadable: not known to be empty.
            Err(_) => true,
        }
    }

    /// Whether a leader among `replicas` says `partition`'s group committed
    /// a membership without this node.
    async fn released(
        &self,
        partition: PartitionId,
        replicas: &[NodeId],
        nodes: &BTreeMap<NodeId, NodeInfo>,
    ) -> bool {
        for replica in replicas {
            // A node gone from the membership cannot lead: not worth a
            // question's wait.
            let Some(node) = nodes.get(replica).filter(|_| self.view.is_live(*replica)) else {
                continue;
            };
            match self
                .peers
                .released(*replica, &node.peer, partition, DISCARD_ASK_WITHIN)
                .await
            {
                Ok(Release::Released) => return true,
                Ok(Release::Member) => return false,
                Ok(Release::NotLeader) => {}
                Err(e) => {
                    debug!(partition = partition.0, node = replica, error = %e, "no answer on the partition's membership")
                }
            }
        }
        false
    }

    /// Removes what this node applied of `partition` — its channels,
    /// messages and windows, with a blank applied state in the same write
    /// — and its snapshots, then gives the space back. The Raft state goes
    /// first ([`RaftLogStore::discard`]): a crash in between leaves a blank
    /// Raft state over stale channels, which the next turn (or a group
    /// started here again, [`Self::ensure_group`]) removes; never a Raft
    /// log over channels that no longer match it.
    async fn discard_channels(&self, partition: PartitionId) -> Result<(), ClusterError> {
        // Snapshots before the applied state: a crash in between leaves
        // the applied state, which the next pass finds and removes with
        // what is left; never a snapshot over a blank partition (a group
        // started there would take it for its own).
        let root = self.snapshot_dir.clone();
        tokio::task::spawn_blocking(move || snapshot::SnapshotDir::remove(&root, partition))
            .await
            .map_err(|e| ClusterError::Raft(e.to_string()))??;
        self.log
            .restore(
                partition.0,
                Restore::Discard {
                    scope: machine::partition_scope(partition, self.partitions),
                    applied: machine::blank_applied_state(),
                },
            )
            .await
            .map_err(|e| ClusterError::Store(StoreError::Engine(e.to_string())))?;
        self.reclaim.request();
        Ok(())
    }

    /// Stops the groups whose storage failed (openraft stops a group whose
    /// apply or log write fails, but its last metrics still name this node
    /// leader): the node no longer serves them, and [`Self::reconcile`]
    /// starts them again from the store, re-applying what they committed
    /// after their last applied entry, once the wait of [`failures`] is
    /// over and the store takes writes. `/readyz` names them meanwhile.
    async fn stop_failed_groups(&self) {
        let failed: Vec<(PartitionId, Raft)> = self
            .groups
            .lock()
            .map(|g| {
                g.iter()
                    .filter(|(_, raft)| raft.metrics().borrow().running_state.is_err())
                    .map(|(p, r)| (*p, r.clone()))
                    .collect()
            })
            .unwrap_or_default();
        for (partition, raft) in failed {
            let why = raft
                .metrics()
                .borrow()
                .running_state
                .as_ref()
                .err()
                .map(ToString::to_string)
                .unwrap_or_default();
            let wait = self
                .restarts
                .lock()
                .map(|mut restarts| {
                    restarts.failed(partition, why.clone(), std::time::Instant::now())
                })
                .unwrap_or_default();
            warn!(
                partition = partition.0,
                error = %why,
                "the partition's group stopped on a storage failure; it starts again from the \
                 store after {wait:?}, once the store takes writes"
            );
            self.peers.unhost(partition);
            if let Ok(mut groups) = self.groups.lock() {
                groups.remove(&partition);
            }
            let _ = raft.shutdown().await;
        }
    }

    /// Whether the store takes a synced write (a full disk refuses it),
    /// and why not.
    async fn probe_store(&self) -> Result<(), String> {
        let store = self.store.clone();
        let probe = tokio::task::spawn_blocking(move || store.check_health());
        match tokio::time::timeout(PROBE_WITHIN, probe).await {
            Ok(Ok(Ok(()))) => Ok(()),
            Ok(Ok(Err(e))) => Err(format!("the store still refuses writes: {e}")),
            Ok(Err(e)) => Err(format!("the store probe did not finish: {e}")),
            Err(_) => Err(format!("a synced write took longer than {PROBE_WITHIN:?}")),
        }
    }

    async fn ensure_group(&self, partition: PartitionId) -> Result<Raft, ClusterError> {
        if let Some(raft) = self
            .groups
            .lock()
            .ok()
            .and_then(|g| g.get(&partition).cloned())
        {
            return Ok(raft);
        }
        let raft_store = RaftLogStore::new(self.db.clone(), partition, self.sync);
        let blank = raft_store
            .is_blank()
            .await
            .map_err(|e| ClusterError::Raft(e.to_string()))?;
        if blank && self.holds_applied_state(partition) {
            // A discard a crash cut short: a new replica starts empty.
            warn!(
                partition = partition.0,
                "channels left by an interrupted discard; removing them before the group starts"
            );
            self.discard_channels(partition).await?;
        }
        // A copy of a partition this node once held and discarded must not
        // help a member that never learnt of its removal to a quorum, nor
        // lead, before it holds again what it held (read at every start:
        // a restart half-way through the catch-up keeps it).
        let floor = raft_store
            .discarded_through()
            .await
            .map_err(|e| ClusterError::Raft(e.to_string()))?;
        let machine = PartitionMachine::open(
            partition,
            self.partitions,
            self.log.clone(),
            self.store.clone(),
            &self.snapshot_dir,
            self.snapshot_stats.clone(),
            self.push.clone(),
        )
        .await?
        .with_devices(self.devices.clone());
        let raft = Raft::new(
            self.id,
            self.raft_config.clone(),
            self.peers.network(partition),
            raft_store,
            machine,
        )
        .await
        .map_err(|e| ClusterError::Raft(e.to_string()))?;
        let applied = raft.metrics().borrow().last_applied.map(|id| id.index);
        let floor = floor.filter(|floor| applied < Some(floor.index));
        if floor.is_some() {
            raft.runtime_config().elect(false);
        }
        self.peers.set_discard_floor(partition, floor);
        self.peers.host(partition, raft.clone());
        if let Ok(mut blank) = self.known_blank.lock() {
            blank.remove(&partition);
        }
        if let Ok(mut groups) = self.groups.lock() {
            groups.insert(partition, raft.clone());
        }
        debug!(partition = partition.0, "partition group started");
        Ok(raft)
    }

    async fn initialize(
        &self,
        partition: PartitionId,
        raft: &Raft,
        members: BTreeMap<NodeId, BasicNode>,
    ) {
        match self
            .control
            .claim_initialization(partition.0, self.id)
            .await
        {
            Ok(true) => match raft.initialize(members).await {
                Ok(()) => info!(partition = partition.0, "created the partition's group"),
                Err(e) => {
                    warn!(partition = partition.0, error = %e, "cannot create the partition's group")
                }
            },
            // Created before (by this node before it lost its disk, or by
            // another): its current members add this node back.
            Ok(false) => {}
            Err(e) => {
                debug!(partition = partition.0, error = %e, "cannot claim the group's creation")
            }
        }
    }

    /// Makes this node, `partition`'s preferred leader, its leader when
    /// another leads and this node's log is complete: leaders spread over
    /// the nodes instead of piling up on the first one up. At most one
    /// election per partition per [`LEADERSHIP_RETRY`].
    async fn take_leadership(&self, partition: PartitionId, raft: &Raft) {
        if self.peers.catching_up_to_floor(partition) {
            return;
        }
        let metrics = raft.metrics().borrow().clone();
        let led_elsewhere = metrics
            .current_leader
            .is_some_and(|leader| leader != self.id);
        let voter = metrics
            .membership_config
            .membership()
            .voter_ids()
            .any(|id| id == self.id);
        let complete = metrics.last_applied.map(|l| l.index) == metrics.last_log_index;
        // Only from a settled, live leader: an election called while one is
        // already under way (a failover) would split the votes.
        let now = std::time::Instant::now();
        let settled = match self.stable_leaders.lock() {
            Ok(mut seen) => {
                let entry = seen
                    .entry(partition)
                    .or_insert((metrics.current_leader, now));
                if entry.0 != metrics.current_leader {
                    *entry = (metrics.current_leader, now);
                }
                now.duration_since(entry.1) >= LEADERSHIP_SETTLE
            }
            Err(_) => false,
        };
        let leader_live = metrics
            .current_leader
            .is_some_and(|leader| self.view.is_live(leader));
        if !(led_elsewhere && voter && complete && settled && leader_live) {
            return;
        }
        if let Ok(mut tried) = self.elections.lock() {
            if tried
                .get(&partition)
                .is_some_and(|at| now.duration_since(*at) < LEADERSHIP_RETRY)
            {
                return;
            }
            tried.insert(partition, now);
        }
        debug!(partition = partition.0, "taking the preferred leadership");
        if let Err(e) = raft.trigger().elect().await {
            debug!(partition = partition.0, error = %e, "election not started");
        }
    }

    /// Where this node leads `partition`: adds the map's new replicas as
    /// learners and waits until they caught up, then makes the map's
    /// replicas the voters (joint consensus). Replaced voters stay learners
    /// until they hold the configuration that removed them (so they know,
    /// and never campaign with a stale one), then they are dropped.
    fn move_membership(
        self: &Arc<Self>,
        partition: PartitionId,
        raft: Raft,
        map: &PartitionMap,
        members: BTreeMap<NodeId, BasicNode>,
    ) {
        let metrics = raft.metrics().borrow().clone();
        if metrics.current_leader != Some(self.id) {
            return;
        }
        let membership = metrics.membership_config.membership();
        let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
        let wanted: BTreeSet<NodeId> = members.keys().copied().collect();
        // Replaced voters whose replication reached the configuration
        // that replaced them.
        let config_index = metrics.membership_config.log_id().map(|l| l.index);
        // Replaced voters that stopped their group (they asked to be
        // released) are dropped too: they will not acknowledge anything.
        let retired = self.peers.retired_learners(partition);
        let informed: BTreeSet<NodeId> = membership
            .learner_ids()
            .filter(|id| !wanted.contains(id))
            .filter(|id| {
                let matched = metrics
                    .replication
                    .as_ref()
                    .and_then(|r| r.get(id).copied().flatten())
                    .map(|l| l.index);
                (matched.is_some() && matched >= config_index) || retired.contains(id)
            })
            .collect();
        if voters == wanted && informed.is_empty() {
            return;
        }
        if let Ok(mut changing) = self.changing.lock()
            && !changing.insert(partition)
        {
            return;
        }
        let shared = self.clone();
        let version = map.version;
        tokio::spawn(async move {
            let moved = async {
                if voters != wanted {
                    info!(
                        partition = partition.0,
                        ?voters,
                        ?wanted,
                        version,
                        "moving the partition's replicas"
                    );
                    for (id, node) in &members {
                        if !voters.contains(id) {
                            raft.add_learner(*id, node.clone(), false)
                                .await
                                .map_err(|e| e.to_string())?;
                            wait_caught_up(&raft, *id).await?;
                        }
                    }
                    raft.change_membership(wanted.clone(), true)
                        .await
                        .map_err(|e| e.to_string())?;
                    info!(partition = partition.0, ?wanted, "partition replicas moved");
                } else {
                    raft.change_membership(ChangeMembers::RemoveNodes(informed.clone()), false)
                        .await
                        .map_err(|e| e.to_string())?;
                    debug!(
                        partition = partition.0,
                        ?informed,
                        "replaced replicas dropped"
                    );
                }
                Ok::<_, String>(())
            };
            if let Err(e) = moved.await {
                warn!(partition = partition.0, error = %e, "moving the partition's replicas failed; retrying");
            }
            if let Ok(mut changing) = shared.changing.lock() {
                changing.remove(&partition);
            }
        });
    }
}

/// Waits until the leader's replication to learner `id` has reached the
/// leader's last log entry as of now (bounded: a learner that cannot catch
/// up in [`CATCH_UP_WITHIN`] is retried on a later round).
async fn wait_caught_up(raft: &Raft, id: NodeId) -> Result<(), String> {
    let me = raft_id(raft);
    let target = raft.metrics().borrow().last_log_index;
    let deadline = tokio::time::Instant::now() + CATCH_UP_WITHIN;
    let mut metrics = raft.metrics();
    loop {
        let matched = metrics
            .borrow()
            .replication
            .as_ref()
            .and_then(|r| r.get(&id).copied().flatten())
            .map(|l| l.index);
        if matched.is_some() && matched >= target {
            return Ok(());
        }
        // One borrow at a time: a second read of the same watch while the
        // first is held waits behind openraft's next metrics update, which
        // waits for the first — a deadlock that froze a whole node.
        if metrics.borrow().current_leader != Some(me) {
            return Err("no longer the leader".into());
        }
        if tokio::time::timeout_at(deadline, metrics.changed())
            .await
            .is_err()
        {
            return Err(format!(
                "learner {id} did not catch up within {CATCH_UP_WITHIN:?}"
            ));
        }
    }
}

fn raft_id(raft: &Raft) -> NodeId {
    raft.metrics().borrow().id
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_serves_while_some_group_has_a_reachable_leader() {
        let expired = Standing::LeaseExpired {
            millis_since_quorum_ack: Some(900),
        };
        assert!(can_serve([]), "an edge-only node serves");
        assert!(can_serve([expired, Standing::Follower(2)]));
        assert!(can_serve([Standing::NoLeader, Standing::Leader]));
        assert!(!can_serve([expired, Standing::NoLeader, Standing::Failed]));
    }

    #[test]
    fn preferred_leaders_spread_over_the_replicas() {
        let replicas = [2, 3, 1];
        let leaders: Vec<NodeId> = (0..6)
            .filter_map(|p| preferred_leader(PartitionId(p), &replicas))
            .collect();
        assert_eq!(leaders, vec![2, 3, 1, 2, 3, 1]);
        assert_eq!(preferred_leader(PartitionId(0), &[]), None);
    }
}
