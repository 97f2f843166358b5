//! Where a cluster node's appends, deletes and retention cuts go: the
//! channel's partition group, wherever its leader is.
//!
//! One proposer task per partition takes requests in the order sessions
//! submitted them (a connection's publishes stay in order), gathers what is
//! queued into one Raft entry (group commit across devices, like the
//! single-node writer), and has it committed through
//! [`Peers::propose`]: by the group here when this node leads it, else
//! forwarded to the leader. The device gets one ack with the offset the
//! entry's application assigned.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tracing::debug;
use volna_cluster::raft::network::{Peers, ProposeError};
use volna_cluster::raft::{
    BasicNode, Command, EPOCH_CUTS, Outcome, ProducerStamp, Publish, TrimCut,
};
use volna_cluster::{NodeId, NodeInfo, PartitionId, PartitionMap, partition_of};
use volna_proto::{ChannelName, Epoch, ErrorCode, Offset};

use super::edge::Edges;
use crate::log::{
    AppendError, AppendInput, Appended, BoxFuture, ChannelSlice, Log, PendingAppend, ReadRange,
    Replication, Trim,
};
use crate::metrics::Metrics;
use crate::store::{ChannelMeta, StoreError};

/// Requests queued per partition before `submit` waits.
const QUEUE: usize = 4096;
/// Publishes per Raft entry, at most.
const MAX_ENTRY_PUBLISHES: usize = 512;
/// Payload bytes per Raft entry, at most (beyond one large publish).
const MAX_ENTRY_BYTES: usize = 1 << 20;

/// The cluster as a node last saw it: the partition map, every node seen
/// (with its last address) and which of them were live. Kept when etcd is
/// unreachable: the data path goes on with it.
#[derive(Debug, Default)]
pub struct ClusterView {
    inner: RwLock<(PartitionMap, BTreeMap<NodeId, NodeInfo>)>,
    live: RwLock<std::collections::BTreeSet<NodeId>>,
    /// etcd has answered since the node started (see [`Self::restore`]).
    confirmed: std::sync::atomic::AtomicBool,
}

impl ClusterView {
    /// Takes a fresh map and live node set. Nodes that left keep their last
    /// known address: a restarting node is reachable as soon as it is back.
    pub fn update(&self, map: PartitionMap, live: BTreeMap<NodeId, NodeInfo>) {
        if let Ok(mut ids) = self.live.write() {
            *ids = live.keys().copied().collect();
        }
        self.confirmed
            .store(true, std::sync::atomic::Ordering::SeqCst);
        if let Ok(mut inner) = self.inner.write() {
            inner.0 = map;
            inner.1.extend(live);
        }
    }

    /// Takes a view remembered from before a restart while etcd is down:
    /// the map and the nodes' addresses, with no node known to be live and
    /// the map unconfirmed until etcd answers.
    pub fn restore(&self, map: PartitionMap, nodes: BTreeMap<NodeId, NodeInfo>) {
        if let Ok(mut inner) = self.inner.write() {
            inner.0 = map;
            inner.1.extend(nodes);
        }
    }

    /// Whether the map came from etcd since the node started, not only
    /// from its memory (which may be stale).
    pub fn is_confirmed(&self) -> bool {
        self.confirmed.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The map and every node seen.
    pub fn snapshot(&self) -> (PartitionMap, BTreeMap<NodeId, NodeInfo>) {
        self.inner
            .read()
            .map(|inner| inner.clone())
            .unwrap_or_default()
    }

    /// Whether `node` was live when etcd last answered.
    pub fn is_live(&self, node: NodeId) -> bool {
        self.live.read().is_ok_and(|ids| ids.contains(&node))
    }

    /// Whether the map names `node` among `partition`'s replicas.
    pub fn is_replica(&self, partition: PartitionId, node: NodeId) -> bool {
        self.inner.read().is_ok_and(|inner| {
            inner
                .0
                .replicas
                .get(partition.0 as usize)
                .is_some_and(|ids| ids.contains(&node))
        })
    }

    /// Where nodes reach `node` (its last known inter-node address).
    pub fn peer_addr(&self, node: NodeId) -> Option<String> {
        self.inner
            .read()
            .ok()
            .and_then(|inner| inner.1.get(&node).map(|info| info.peer.clone()))
    }

    /// Whether `node` takes upstream subscriptions on an upstream link (as
    /// it last registered; a node not in the view is taken to be of this
    /// version).
    pub fn has_upstream_links(&self, node: NodeId) -> bool {
        self.inner.read().is_ok_and(|inner| {
            inner
                .1
                .get(&node)
                .is_none_or(|info| info.peer_protocol >= 1)
        })
    }

    /// Whether every replica of `partition` reads Raft entries of
    /// `format` (as each last registered; a replica never seen reads
    /// none).
    pub fn reads_log_format(&self, partition: PartitionId, format: u32) -> bool {
        self.inner.read().is_ok_and(|inner| {
            let (map, nodes) = &*inner;
            map.replicas.get(partition.0 as usize).is_some_and(|ids| {
                ids.iter()
                    .all(|id| nodes.get(id).is_some_and(|n| n.log_format >= format))
            })
        })
    }

    /// `partition`'s replicas with their inter-node addresses (those whose
    /// address is known).
    pub fn replicas(&self, partition: PartitionId) -> Vec<(NodeId, BasicNode)> {
        let Ok(inner) = self.inner.read() else {
            return Vec::new();
        };
        let (map, nodes) = &*inner;
        map.replicas
            .get(partition.0 as usize)
            .map(|ids| {
                ids.iter()
                    .filter_map(|id| Some((*id, BasicNode::new(&nodes.get(id)?.peer))))
                    .collect()
            })
            .unwrap_or_default()
    }
}

enum Request {
    Publish {
        input: AppendInput,
        reply: oneshot::Sender<Result<Appended, AppendError>>,
    },
    Delete {
        channel: ChannelName,
        reply: oneshot::Sender<Result<bool, AppendError>>,
    },
    Trim(Trim),
}

/// The [`Replication`] of a cluster node.
pub struct Router {
    partitions: u32,
    queues: Vec<mpsc::Sender<Request>>,
    peers: Arc<Peers>,
    log: Log,
    edges: Arc<Edges>,
}

impl std::fmt::Debug for Router {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Router")
            .field("partitions", &self.partitions)
            .finish_non_exhaustive()
    }
}

impl Router {
    /// Starts one proposer per partition. A proposal that finds no leader
    /// within `within` fails as [`ErrorCode::Unavailable`].
    pub fn start(
        partitions: u32,
        peers: Arc<Peers>,
        view: Arc<ClusterView>,
        log: Log,
        within: Duration,
        metrics: Arc<Metrics>,
        edges: Arc<Edges>,
    ) -> Arc<Self> {
        let mut queues = Vec::with_capacity(partitions as usize);
        for partition in 0..partitions {
            let (tx, rx) = mpsc::channel(QUEUE);
            queues.push(tx);
            tokio::spawn(propose_loop(
                PartitionId(partition),
                rx,
                peers.clone(),
                view.clone(),
                within,
                metrics.clone(),
            ));
        }
        Arc::new(Self {
            partitions,
            queues,
            peers,
            log,
            edges,
        })
    }

    fn queue(&self, channel: &ChannelName) -> &mpsc::Sender<Request> {
        let partition = partition_of(channel.as_str(), self.partitions);
        &self.queues[partition.0 as usize % self.queues.len()]
    }
}

impl Replication for Router {
    fn submit(&self, input: AppendInput) -> BoxFuture<'_, Result<PendingAppend, AppendError>> {
        Box::pin(async move {
            let (reply, rx) = oneshot::channel();
            self.queue(&input.channel)
                .send(Request::Publish { input, reply })
                .await
                .map_err(|_| AppendError::ShuttingDown)?;
            Ok(PendingAppend::new(rx))
        })
    }

    fn delete(
        &self,
        channel: ChannelName,
    ) -> BoxFuture<'_, Result<Option<ChannelMeta>, AppendError>> {
        Box::pin(async move {
            // This replica's last view of the channel, for the answer.
            let before = self.log.lookup(&channel).await.ok().flatten();
            let (reply, rx) = oneshot::channel();
            self.queue(&channel)
                .send(Request::Delete {
                    channel: channel.clone(),
                    reply,
                })
                .await
                .map_err(|_| AppendError::ShuttingDown)?;
            let existed = rx.await.unwrap_or(Err(AppendError::ShuttingDown))?;
            Ok(existed.then(|| before.unwrap_or(ChannelMeta::new(0, Epoch(0)))))
        })
    }

    fn partition(&self, channel: &ChannelName) -> u32 {
        partition_of(channel.as_str(), self.partitions).0
    }

    fn leads(&self, channel: &ChannelName) -> bool {
        self.peers
            .leads(partition_of(channel.as_str(), self.partitions))
    }

    fn trim(&self, trim: Trim) -> bool {
        if !self.decides_retention(&trim.channel) {
            // Deposed since the round looked: the new leader cuts.
            return true;
        }
        self.queue(&trim.channel)
            .try_send(Request::Trim(trim))
            .is_ok()
    }

    fn reads_remotely(&self, channel: &ChannelName) -> bool {
        !self.edges.replicates(self.edges.partition(channel))
    }

    fn remote_lookup(
        &self,
        channel: ChannelName,
    ) -> BoxFuture<'_, Result<Option<ChannelMeta>, StoreError>> {
        Box::pin(async move { self.edges.lookup(&channel).await })
    }

    fn remote_read(
        &self,
        channel: ChannelName,
        range: ReadRange,
    ) -> BoxFuture<'_, Result<Option<ChannelSlice>, StoreError>> {
        Box::pin(async move { self.edges.read(&channel, range).await })
    }
}

/// What one Raft entry carries and who waits for it.
enum Waiting {
    Publishes(Vec<oneshot::Sender<Result<Appended, AppendError>>>),
    Delete(ChannelName, oneshot::Sender<Result<bool, AppendError>>),
    Trims,
}

async fn propose_loop(
    partition: PartitionId,
    mut rx: mpsc::Receiver<Request>,
    peers: Arc<Peers>,
    view: Arc<ClusterView>,
    within: Duration,
    metrics: Arc<Metrics>,
) {
    let mut carried: Option<Request> = None;
    loop {
        let first = match carried.take() {
            Some(request) => request,
            None => match rx.recv().await {
                Some(request) => request,
                None => return,
            },
        };
        let (command, waiting) = match first {
            Request::Publish { input, reply } => {
                let mut publishes = vec![to_publish(input)];
                let mut replies = vec![reply];
                let mut bytes = publishes[0].payload.len();
                while publishes.len() < MAX_ENTRY_PUBLISHES && bytes < MAX_ENTRY_BYTES {
                    match rx.try_recv() {
                        Ok(Request::Publish { input, reply }) => {
                            bytes += input.payload.len();
                            publishes.push(to_publish(input));
                            replies.push(reply);
                        }
                        Ok(other) => {
                            carried = Some(other);
                            break;
                        }
                        Err(_) => break,
                    }
                }
                (
                    Command::Append {
                        now_ms: crate::log::now_ms(),
                        epoch_seed: rand::random(),
                        publishes,
                    },
                    Waiting::Publishes(replies),
                )
            }
            Request::Delete { channel, reply } => (
                Command::Delete(vec![channel.as_str().to_owned()]),
                Waiting::Delete(channel, reply),
            ),
            Request::Trim(trim) => {
                let mut cuts = vec![to_cut(trim)];
                while let Ok(next) = rx.try_recv() {
                    match next {
                        Request::Trim(trim) => cuts.push(to_cut(trim)),
                        other => {
                            carried = Some(other);
                            break;
                        }
                    }
                }
                // Replicas not yet upgraded cannot decode epoch cuts.
                let command = if view.reads_log_format(partition, EPOCH_CUTS) {
                    Command::Trim(cuts)
                } else {
                    Command::UnversionedTrim(cuts.into_iter().map(Into::into).collect())
                };
                (command, Waiting::Trims)
            }
        };
        let started = std::time::Instant::now();
        let result = peers
            .propose(partition, &command, &view.replicas(partition), within)
            .await;
        if result.is_ok() {
            metrics
                .cluster_commit_seconds
                .observe(started.elapsed().as_secs_f64());
        }
        deliver(partition, result, waiting);
    }
}

fn deliver(
    partition: PartitionId,
    result: Result<volna_cluster::raft::Reply, ProposeError>,
    waiting: Waiting,
) {
    let failure = |e: &ProposeError| match e {
        ProposeError::Rejected(why) => AppendError::Storage(why.clone()),
        other => AppendError::Unavailable(other.to_string()),
    };
    match (result, waiting) {
        (Ok(reply), Waiting::Publishes(replies)) => {
            let mut outcomes = reply.outcomes.into_iter();
            for waiter in replies {
                let _ = waiter.send(match outcomes.next() {
                    Some(Outcome::Stored {
                        offset,
                        epoch,
                        duplicate,
                    }) => Ok(Appended {
                        offset: Offset::new(offset),
                        epoch: Epoch(epoch),
                        duplicate,
                    }),
                    Some(Outcome::Refused { code, message }) => Err(AppendError::Refused {
                        code: ErrorCode::from_u16(code),
                        message,
                    }),
                    Some(Outcome::Deleted { .. } | Outcome::Applied) | None => {
                        Err(AppendError::Refused {
                            code: ErrorCode::Internal,
                            message: "the partition answered a publish with no outcome".into(),
                        })
                    }
                });
            }
        }
        (Ok(reply), Waiting::Delete(channel, waiter)) => {
            let existed = matches!(
                reply.outcomes.first(),
                Some(Outcome::Deleted { existed: true })
            );
            debug!(partition = partition.0, %channel, existed, "channel deleted through its partition");
            let _ = waiter.send(Ok(existed));
        }
        (Ok(_), Waiting::Trims) => {}
        (Err(e), Waiting::Publishes(replies)) => {
            debug!(partition = partition.0, error = %e, "publishes not committed");
            for waiter in replies {
                let _ = waiter.send(Err(failure(&e)));
            }
        }
        (Err(e), Waiting::Delete(_, waiter)) => {
            let _ = waiter.send(Err(failure(&e)));
        }
        (Err(e), Waiting::Trims) => {
            debug!(partition = partition.0, error = %e, "retention cut not committed; the next round computes it again");
        }
    }
}

pub(super) fn to_publish(input: AppendInput) -> Publish {
    Publish {
        channel: input.channel.as_str().to_owned(),
        producer: input.producer.map(|p| ProducerStamp {
            owner: p.key.owner.to_string(),
            producer_id: p.key.producer_id,
            sequence: p.sequence,
            after: p.after,
            limited: p.limited,
        }),
        payload: input.payload,
    }
}

fn to_cut(trim: Trim) -> TrimCut {
    TrimCut {
        channel: trim.channel.as_str().to_owned(),
        from: trim.from.get(),
        epoch: trim.epoch.map(|e| e.0),
        below: trim.below.get(),
        freed_bytes: trim.freed_bytes,
        oldest_ms: trim.oldest_ms,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(id: NodeId, log_format: u32) -> (NodeId, NodeInfo) {
        let info = NodeInfo {
            id,
            quic: format!("127.0.0.1:{}", 7400 + id),
            peer: format!("127.0.0.1:{}", 7500 + id),
            log_format,
            peer_protocol: volna_cluster::raft::network::PEER_PROTOCOL,
        };
        (id, info)
    }

    /// A leader proposes epoch cuts only where every replica decodes them:
    /// during a rolling upgrade an old follower would refuse every entry
    /// after one it cannot read, and the partition would stop committing.
    #[test]
    fn a_newer_entry_format_waits_for_every_replica_of_the_partition() {
        let view = ClusterView::default();
        let map = PartitionMap {
            version: 1,
            replicas: vec![vec![1, 2, 3], vec![1, 2, 4]],
        };
        let current = volna_cluster::raft::LOG_FORMAT;
        let nodes = BTreeMap::from([node(1, current), node(2, current), node(3, 0)]);
        view.update(map, nodes);
        assert!(
            !view.reads_log_format(PartitionId(0), EPOCH_CUTS),
            "node 3 is older"
        );
        assert!(
            !view.reads_log_format(PartitionId(1), EPOCH_CUTS),
            "node 4 was never seen"
        );
        assert!(view.reads_log_format(PartitionId(0), 0));
        assert!(
            !view.reads_log_format(PartitionId(2), 0),
            "no such partition"
        );
        // Node 3 comes back upgraded.
        let (map, _) = view.snapshot();
        view.update(map, BTreeMap::from([node(3, current)]));
        assert!(view.reads_log_format(PartitionId(0), EPOCH_CUTS));
    }
}
