//! What an operator sees of the cluster from one node (`/admin/cluster`,
//! `volna cluster status`): the nodes, each partition's replicas and, for
//! the partitions this node replicates, its Raft role, log position and
//! (where it leads) how far each follower lags.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use volna_cluster::raft::Raft;
use volna_cluster::raft::lease::Standing;
use volna_cluster::raft::network::Peers;
use volna_cluster::{NodeId, PartitionId};

use super::edge::Edges;
use super::machine::{SnapshotStats, applied_position, partition_scope};
use super::router::ClusterView;
use crate::admin::ClusterStatus;
use axum::http::StatusCode;

/// One node.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct NodeView {
    /// Its id.
    pub id: NodeId,
    /// Where devices reach it.
    pub quic: String,
    /// Where nodes reach it.
    pub peer: String,
    /// Whether its etcd lease was alive when etcd last answered.
    pub live: bool,
}

/// One partition.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PartitionView {
    /// The partition.
    pub partition: u32,
    /// Its replicas per the map.
    pub replicas: Vec<NodeId>,
    /// Whether this node runs its group.
    pub hosted: bool,
    /// The leader this node knows of.
    pub leader: Option<NodeId>,
    /// The Raft term this node is in.
    pub term: u64,
    /// This node's last log index.
    pub last_log: Option<u64>,
    /// This node's last applied index.
    pub last_applied: Option<u64>,
    /// Where this node leads: entries each follower is behind.
    pub lag: BTreeMap<NodeId, u64>,
    /// Raft entries this node's log holds (the rest were compacted into
    /// a snapshot).
    #[serde(default)]
    pub log_entries: u64,
    /// The last entry this node's latest snapshot covers.
    #[serde(default)]
    pub snapshot: Option<u64>,
}

/// The whole answer.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ClusterReport {
    /// The node answering.
    pub node: NodeId,
    /// The partition map's version.
    pub map_version: u64,
    /// Nodes seen.
    pub nodes: Vec<NodeView>,
    /// Every partition.
    pub partitions: Vec<PartitionView>,
    /// Inter-node bytes this node sent.
    pub peer_bytes_sent: u64,
    /// Inter-node bytes this node received.
    pub peer_bytes_received: u64,
    /// Commands this node forwarded to another node's leader.
    pub forwarded: u64,
    /// Calls this node made to other nodes (Raft RPCs, heartbeat batches,
    /// forwarded publishes, reads).
    #[serde(default)]
    pub peer_calls: u64,
    /// Upstream subscriptions this node holds to other nodes' leaders
    /// (channels it serves as an edge).
    #[serde(default)]
    pub upstreams: u64,
    /// Upstream links of this node that ended, each ending every upstream
    /// it carried.
    #[serde(default)]
    pub upstream_links_lost: u64,
    /// Messages relayed from upstreams to this node's subscribers.
    #[serde(default)]
    pub relayed: u64,
    /// Reads of channels this node does not replicate, made to a leader.
    #[serde(default)]
    pub remote_reads: u64,
    /// Subscribes this replica started from its partition leader's view
    /// of the channel, its own being behind (lagging, or restoring).
    #[serde(default)]
    pub replica_corrections: u64,
    /// Partition snapshots this node took (positions recorded, the log
    /// before them purged).
    #[serde(default)]
    pub snapshots_built: u64,
    /// Partition snapshots this node exported and sent whole to a replica.
    #[serde(default)]
    pub snapshots_exported: u64,
    /// Partition snapshots this node received and installed.
    #[serde(default)]
    pub snapshots_installed: u64,
    /// Copies of partitions discarded here after they moved away.
    #[serde(default)]
    pub partitions_discarded: u64,
}

/// Computes a [`ClusterReport`] on demand.
#[derive(Clone)]
pub struct StatusSource {
    pub(super) id: NodeId,
    pub(super) partitions: u32,
    pub(super) peers: Arc<Peers>,
    pub(super) view: Arc<ClusterView>,
    pub(super) groups: Arc<Mutex<BTreeMap<PartitionId, Raft>>>,
    pub(super) restarts: super::SharedRestarts,
    pub(super) edges: Arc<Edges>,
    pub(super) snapshots: Arc<SnapshotStats>,
    pub(super) log: crate::log::Log,
}

impl std::fmt::Debug for StatusSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StatusSource")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl StatusSource {
    /// The report as of now.
    pub fn report(&self) -> ClusterReport {
        let (map, nodes) = self.view.snapshot();
        let groups = self.groups.lock().map(|g| g.clone()).unwrap_or_default();
        let partitions = (0..self.partitions)
            .map(|index| {
                let partition = PartitionId(index);
                let replicas = map
                    .replicas
                    .get(index as usize)
                    .cloned()
                    .unwrap_or_default();
                let Some(raft) = groups.get(&partition) else {
                    return PartitionView {
                        partition: index,
                        replicas,
                        hosted: false,
                        leader: None,
                        term: 0,
                        last_log: None,
                        last_applied: None,
                        lag: BTreeMap::new(),
                        log_entries: 0,
                        snapshot: None,
                    };
                };
                let metrics = raft.metrics().borrow().clone();
                let last_log = metrics.last_log_index;
                let lag = metrics
                    .replication
                    .as_ref()
                    .map(|followers| {
                        followers
                            .iter()
                            .filter(|(id, _)| **id != self.id)
                            .map(|(id, matched)| {
                                let matched = matched.map_or(0, |m| m.index + 1);
                                (*id, last_log.map_or(0, |l| l + 1).saturating_sub(matched))
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                PartitionView {
                    partition: index,
                    replicas,
                    hosted: true,
                    leader: metrics.current_leader,
                    term: metrics.current_term,
                    last_log,
                    last_applied: metrics.last_applied.map(|l| l.index),
                    lag,
                    log_entries: last_log
                        .map_or(0, |l| l + 1)
                        .saturating_sub(metrics.purged.map_or(0, |p| p.index + 1)),
                    snapshot: metrics.snapshot.map(|s| s.index),
                }
            })
            .collect();
        let stats = self.peers.stats();
        let edge = self.edges.stats();
        ClusterReport {
            node: self.id,
            map_version: map.version,
            nodes: nodes
                .values()
                .map(|n| NodeView {
                    id: n.id,
                    quic: n.quic.clone(),
                    peer: n.peer.clone(),
                    live: self.view.is_live(n.id),
                })
                .collect(),
            partitions,
            peer_bytes_sent: stats.bytes_sent.load(Ordering::Relaxed),
            peer_bytes_received: stats.bytes_received.load(Ordering::Relaxed),
            forwarded: stats.forwarded.load(Ordering::Relaxed),
            peer_calls: stats.calls.load(Ordering::Relaxed),
            upstreams: u64::try_from(edge.upstreams.load(Ordering::Relaxed)).unwrap_or(0),
            upstream_links_lost: stats.upstream_links_lost.load(Ordering::Relaxed),
            relayed: edge.relayed.load(Ordering::Relaxed),
            remote_reads: edge.remote_reads.load(Ordering::Relaxed),
            replica_corrections: self.log.replica_corrections(),
            snapshots_built: self.snapshots.built.load(Ordering::Relaxed),
            snapshots_exported: self.snapshots.exported.load(Ordering::Relaxed),
            snapshots_installed: self.snapshots.installed.load(Ordering::Relaxed),
            partitions_discarded: self.snapshots.discarded.load(Ordering::Relaxed),
        }
    }
}

impl ClusterStatus for StatusSource {
    fn status(&self) -> serde_json::Value {
        serde_json::to_value(self.report()).unwrap_or_default()
    }

    fn digest(
        &self,
        partition: u32,
    ) -> crate::log::BoxFuture<'_, Result<serde_json::Value, (StatusCode, String)>> {
        Box::pin(async move {
            if partition >= self.partitions {
                return Err((
                    StatusCode::NOT_FOUND,
                    format!(
                        "no partition {partition} (the cluster has {})",
                        self.partitions
                    ),
                ));
            }
            if self.peers.group(PartitionId(partition)).is_none() {
                return Err((
                    StatusCode::NOT_FOUND,
                    format!("node {} does not replicate partition {partition}", self.id),
                ));
            }
            let scope = partition_scope(PartitionId(partition), self.partitions);
            let digest = self
                .log
                .partition_digest(partition, scope)
                .await
                .map_err(|e| (StatusCode::SERVICE_UNAVAILABLE, e.to_string()))?;
            let (last, time_ms) = digest
                .applied
                .as_deref()
                .and_then(applied_position)
                .unwrap_or((None, 0));
            Ok(serde_json::json!({
                "partition": partition,
                "node": self.id,
                "applied": last.map(|id| serde_json::json!({
                    "term": id.leader_id.term,
                    "index": id.index,
                })),
                "time_ms": time_ms,
                "sha256": digest.state.sha256,
                "channels": digest.state.channels,
                "messages": digest.state.messages,
                "producers": digest.state.producers,
                "devices": digest.state.devices,
            }))
        })
    }

    fn readiness(&self) -> Result<(), String> {
        let groups = self.groups.lock().map(|g| g.clone()).unwrap_or_default();
        let lease = self.peers.leader_lease();
        // A partition whose group failed and does not start again runs no
        // group: it is failed too.
        let (map, _) = self.view.snapshot();
        let mut failed: Vec<u32> = self
            .restarts
            .lock()
            .map(|r| {
                r.stopped()
                    .map(|(p, _)| p)
                    .filter(|p| map.replicas_of(*p).contains(&self.id))
                    .filter(|p| !groups.contains_key(p))
                    .map(|p| p.0)
                    .collect()
            })
            .unwrap_or_default();
        let mut leaderless = Vec::new();
        for (partition, raft) in &groups {
            match Standing::of(raft, self.id, lease) {
                Standing::Leader | Standing::Follower(_) => {}
                Standing::Failed => failed.push(partition.0),
                Standing::NoLeader | Standing::LeaseExpired { .. } => leaderless.push(partition.0),
            }
        }
        failed.sort_unstable();
        let mut why = Vec::new();
        if !failed.is_empty() {
            why.push(format!("the storage of partitions {failed:?} failed"));
        }
        if !leaderless.is_empty() {
            why.push(format!(
                "partitions {leaderless:?} have no reachable leader"
            ));
        }
        if why.is_empty() {
            Ok(())
        } else {
            Err(why.join("; "))
        }
    }

    fn metrics(&self) -> String {
        use std::fmt::Write;
        let report = self.report();
        let (mut leader, mut follower) = (0u64, 0u64);
        let mut max_lag = 0u64;
        for p in report.partitions.iter().filter(|p| p.hosted) {
            if p.leader == Some(report.node) {
                leader += 1;
                max_lag = max_lag.max(p.lag.values().copied().max().unwrap_or(0));
            } else {
                follower += 1;
            }
        }
        let mut out = String::new();
        let mut metric = |name: &str, kind: &str, help: &str, lines: &[(&str, u64)]| {
            let _ = writeln!(out, "# HELP volna_{name} {help}");
            let _ = writeln!(out, "# TYPE volna_{name} {kind}");
            for (labels, value) in lines {
                let _ = writeln!(out, "volna_{name}{labels} {value}");
            }
        };
        metric(
            "cluster_partitions",
            "gauge",
            "Partition groups this node runs, by its role",
            &[
                ("{role=\"leader\"}", leader),
                ("{role=\"follower\"}", follower),
            ],
        );
        metric(
            "cluster_replica_lag_max",
            "gauge",
            "Entries the furthest follower of a partition this node leads is behind",
            &[("", max_lag)],
        );
        metric(
            "cluster_peer_bytes_sent_total",
            "counter",
            "Inter-node bytes sent (Raft replication, forwarded publishes)",
            &[("", report.peer_bytes_sent)],
        );
        metric(
            "cluster_peer_bytes_received_total",
            "counter",
            "Inter-node bytes received",
            &[("", report.peer_bytes_received)],
        );
        metric(
            "cluster_peer_calls_total",
            "counter",
            "Calls made to other nodes (Raft RPCs, heartbeat batches, forwarded publishes, reads)",
            &[("", report.peer_calls)],
        );
        metric(
            "cluster_forwarded_total",
            "counter",
            "Entries forwarded to another node's partition leader",
            &[("", report.forwarded)],
        );
        metric(
            "cluster_upstreams",
            "gauge",
            "Upstream subscriptions to other nodes' partition leaders (edge channels)",
            &[("", report.upstreams)],
        );
        metric(
            "cluster_upstream_links_lost_total",
            "counter",
            "Upstream links to other nodes that ended (each ends every upstream it carried)",
            &[("", report.upstream_links_lost)],
        );
        metric(
            "cluster_relayed_messages_total",
            "counter",
            "Messages relayed from upstreams to this node's subscribers",
            &[("", report.relayed)],
        );
        metric(
            "cluster_raft_log_entries",
            "gauge",
            "Raft entries held in the logs of the partitions this node replicates",
            &[(
                "",
                report.partitions.iter().map(|p| p.log_entries).sum::<u64>(),
            )],
        );
        metric(
            "cluster_snapshots_built_total",
            "counter",
            "Partition snapshots taken on this node (the Raft entries they cover are purged)",
            &[("", report.snapshots_built)],
        );
        metric(
            "cluster_snapshots_exported_total",
            "counter",
            "Partition snapshots exported on this node and sent whole to a replica",
            &[("", report.snapshots_exported)],
        );
        metric(
            "cluster_snapshots_installed_total",
            "counter",
            "Partition snapshots received from a leader and installed",
            &[("", report.snapshots_installed)],
        );
        metric(
            "cluster_partitions_discarded_total",
            "counter",
            "Copies of partitions this node discarded once their group went on without it \
             (placement moved them away)",
            &[("", report.partitions_discarded)],
        );
        metric(
            "cluster_remote_reads_total",
            "counter",
            "Reads of channels this node does not replicate, made to their leader",
            &[("", report.remote_reads)],
        );
        metric(
            "cluster_replica_corrections_total",
            "counter",
            "Subscribes started from the partition leader's view of a channel because this \
             replica's was behind (lagging or restoring)",
            &[("", report.replica_corrections)],
        );
        out
    }
}
