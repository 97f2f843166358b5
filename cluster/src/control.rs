//! The cluster's control plane on etcd: membership, the placer's election
//! and the partition map. No message passes through here.
//!
//! Keys, under `/volna/<cluster>/`:
//! - `config`: the cluster's fixed settings (`partitions`, `replicas`),
//!   written once by the first node; later nodes adopt them.
//! - `nodes/<id>`: a live node's [`NodeInfo`], attached to the node's lease:
//!   it disappears when the node stops renewing it (crash, partition).
//! - `placer`: the election (etcd's election API) of the one node that
//!   writes the map.
//! - `map`: the [`PartitionMap`], written only by a transaction that also
//!   checks that the writer still holds the placer election (its key's
//!   create revision): a placer that lost its lease while paused cannot
//!   overwrite its successor's map (fencing; a lock alone would let it).

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, EventType, GetOptions, LeaderKey, PutOptions, ResignOptions, Txn,
    TxnOp, WatchOptions,
};
use serde::{Deserialize, Serialize};
use thiserror::Error;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::placement::{NodeId, PartitionMap, place};

/// A node as the cluster sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    /// `cluster.node_id`.
    pub id: NodeId,
    /// Where devices reach it (QUIC).
    pub quic: String,
    /// Where other nodes reach it.
    pub peer: String,
    /// The newest Raft entry format it reads ([`crate::raft::LOG_FORMAT`]);
    /// 0 for nodes from before the field.
    #[serde(default)]
    pub log_format: u32,
    /// The peer protocol it speaks ([`crate::raft::network::PEER_PROTOCOL`]);
    /// 0 for nodes from before the field.
    #[serde(default)]
    pub peer_protocol: u32,
}

/// A cluster's fixed settings, chosen when it is created.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterConfig {
    /// Partitions channels hash to.
    pub partitions: u32,
    /// Replicas per partition.
    pub replicas: usize,
}

/// Why a control-plane call failed.
#[derive(Debug, Error)]
pub enum ControlError {
    /// etcd could not be reached or refused the request.
    #[error("etcd: {0}")]
    Etcd(#[from] etcd_client::Error),
    /// A stored value does not decode.
    #[error("etcd holds a malformed {what}: {why}")]
    Malformed {
        /// The key's role.
        what: &'static str,
        /// The decoder's complaint.
        why: String,
    },
    /// This node no longer holds the placer election: the write was not
    /// made.
    #[error("not the placer any more: the map was not written")]
    Fenced,
    /// etcd gave no leader key after a won campaign.
    #[error("etcd answered a campaign without a leader key")]
    NoLeaderKey,
}

fn decode<T: for<'a> Deserialize<'a>>(what: &'static str, value: &[u8]) -> Result<T, ControlError> {
    serde_json::from_slice(value).map_err(|e| ControlError::Malformed {
        what,
        why: e.to_string(),
    })
}

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    // Plain data with string keys: serializing cannot fail.
    serde_json::to_vec(value).unwrap_or_default()
}

/// One cluster's keys in etcd.
#[derive(Clone)]
pub struct Control {
    client: Client,
    prefix: String,
}

impl std::fmt::Debug for Control {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Control")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

impl Control {
    /// The control plane of cluster `name` through `client`.
    pub fn new(client: Client, name: &str) -> Self {
        Self {
            client,
            prefix: format!("/volna/{name}/"),
        }
    }

    /// Connects to etcd at `endpoints` (giving up after `timeout`).
    pub async fn connect(
        endpoints: &[String],
        name: &str,
        timeout: Duration,
    ) -> Result<Self, ControlError> {
        let options = etcd_client::ConnectOptions::new()
            .with_connect_timeout(timeout)
            .with_keep_alive(Duration::from_secs(2), Duration::from_secs(2));
        let client = Client::connect(endpoints, Some(options)).await?;
        Ok(Self::new(client, name))
    }

    /// Claims the right to create `partition`'s Raft group, once for the
    /// cluster's life: true for the first node to ask, false for every
    /// later call. A node that lost its disk must not create the group
    /// anew beside the one its former peers still run.
    pub async fn claim_initialization(
        &self,
        partition: u32,
        node: NodeId,
    ) -> Result<bool, ControlError> {
        let key = self.key(&format!("initialized/{partition}"));
        let txn = Txn::new()
            .when([Compare::version(key.as_str(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(key.as_str(), node.to_string(), None)]);
        Ok(self.client.clone().txn(txn).await?.succeeded())
    }

    fn key(&self, rest: &str) -> String {
        format!("{}{rest}", self.prefix)
    }

    /// The cluster's settings: `proposed` if this node creates the cluster,
    /// else the ones it was created with (a node's own differing settings
    /// are ignored, with a warning: they are fixed for the cluster's life).
    pub async fn settle_config(
        &self,
        proposed: ClusterConfig,
    ) -> Result<ClusterConfig, ControlError> {
        let key = self.key("config");
        let txn = Txn::new()
            .when([Compare::version(key.as_str(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(key.as_str(), encode(&proposed), None)])
            .or_else([TxnOp::get(key.as_str(), None)]);
        let response = self.client.clone().txn(txn).await?;
        if response.succeeded() {
            info!(?proposed, "created the cluster");
            return Ok(proposed);
        }
        let mut stored = None;
        for op in response.op_responses() {
            if let etcd_client::TxnOpResponse::Get(get) = op
                && let Some(kv) = get.kvs().first()
            {
                stored = Some(decode::<ClusterConfig>("cluster config", kv.value())?);
            }
        }
        let stored = stored.ok_or(ControlError::Malformed {
            what: "cluster config",
            why: "missing after a failed create".into(),
        })?;
        if stored != proposed {
            warn!(
                ?stored,
                ?proposed,
                "the cluster's settings differ from this node's; the cluster's hold"
            );
        }
        Ok(stored)
    }

    /// Registers `node` as live for as long as the returned membership is
    /// kept (its lease is renewed every third of `ttl`).
    pub async fn join(&self, node: &NodeInfo, ttl: Duration) -> Result<Membership, ControlError> {
        let mut client = self.client.clone();
        let ttl_secs = i64::try_from(ttl.as_secs().max(2)).unwrap_or(i64::MAX);
        let lease = client.lease_grant(ttl_secs, None).await?.id();
        let key = self.key(&format!("nodes/{}", node.id));
        client
            .put(key, encode(node), Some(PutOptions::new().with_lease(lease)))
            .await?;
        let (keeper, answers) = client.lease_keep_alive(lease).await?;
        let stop = CancellationToken::new();
        let expired = CancellationToken::new();
        let renewing = stop.clone();
        let lost = expired.clone();
        let every = Duration::from_secs(u64::try_from(ttl_secs).unwrap_or(2) / 3)
            .max(Duration::from_millis(500));
        let id = node.id;
        let mut renewer = client.clone();
        tokio::spawn(async move {
            let mut stream = Some((keeper, answers));
            let mut tick = tokio::time::interval(every);
            loop {
                tokio::select! {
                    () = renewing.cancelled() => return,
                    _ = tick.tick() => {}
                }
                // While etcd is unreachable the node goes on serving on the
                // last known map; it keeps trying, on a new stream once the
                // old one broke.
                let (keeper, answers) = match stream.as_mut() {
                    Some(open) => open,
                    None => match renewer.lease_keep_alive(lease).await {
                        Ok(open) => stream.insert(open),
                        Err(e) => {
                            warn!(node = id, error = %e, "cannot reach etcd to renew the membership lease");
                            continue;
                        }
                    },
                };
                if let Err(e) = keeper.keep_alive().await {
                    warn!(node = id, error = %e, "cannot renew the membership lease");
                    stream = None;
                    continue;
                }
                match answers.message().await {
                    Ok(Some(answer)) if answer.ttl() <= 0 => {
                        warn!(node = id, "the membership lease expired");
                        lost.cancel();
                        return;
                    }
                    Ok(Some(_)) => {}
                    Ok(None) => stream = None,
                    Err(e) => {
                        warn!(node = id, error = %e, "lease renewal failed");
                        stream = None;
                    }
                }
            }
        });
        info!(node = node.id, lease, "joined the cluster");
        Ok(Membership {
            client,
            lease,
            stop,
            expired,
        })
    }

    /// The live nodes, by id.
    pub async fn nodes(&self) -> Result<BTreeMap<NodeId, NodeInfo>, ControlError> {
        let response = self
            .client
            .clone()
            .get(self.key("nodes/"), Some(GetOptions::new().with_prefix()))
            .await?;
        let mut nodes = BTreeMap::new();
        for kv in response.kvs() {
            let node: NodeInfo = decode("node", kv.value())?;
            nodes.insert(node.id, node);
        }
        Ok(nodes)
    }

    /// The partition map, if the placer wrote one.
    pub async fn map(&self) -> Result<Option<PartitionMap>, ControlError> {
        let response = self.client.clone().get(self.key("map"), None).await?;
        response
            .kvs()
            .first()
            .map(|kv| decode("partition map", kv.value()))
            .transpose()
    }

    /// Waits until this node is the placer (etcd's election, bound to the
    /// membership's lease: the office ends with the node).
    pub async fn campaign(
        &self,
        membership: &Membership,
        node: NodeId,
    ) -> Result<Placer, ControlError> {
        let response = self
            .client
            .clone()
            .campaign(self.key("placer"), node.to_string(), membership.lease)
            .await?;
        let leader = response
            .leader()
            .cloned()
            .ok_or(ControlError::NoLeaderKey)?;
        info!(node, "became the placer");
        Ok(Placer {
            control: self.clone(),
            leader,
            grace: Duration::ZERO,
            absent_since: std::sync::Mutex::default(),
        })
    }
}

/// A node's live registration; dropping it stops renewing (the node's key
/// expires with the lease), [`Membership::leave`] removes it at once.
pub struct Membership {
    client: Client,
    lease: i64,
    stop: CancellationToken,
    expired: CancellationToken,
}

impl std::fmt::Debug for Membership {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Membership")
            .field("lease", &self.lease)
            .finish_non_exhaustive()
    }
}

impl Membership {
    /// The lease the node's keys are attached to.
    pub fn lease(&self) -> i64 {
        self.lease
    }

    /// Resolves once etcd says the lease expired (the node was away longer
    /// than its TTL): its keys are gone and it must join again.
    pub async fn expired(&self) {
        self.expired.cancelled().await;
    }

    /// Leaves the cluster now: the lease and every key on it go.
    pub async fn leave(mut self) -> Result<(), ControlError> {
        self.stop.cancel();
        self.client.lease_revoke(self.lease).await?;
        Ok(())
    }
}

impl Drop for Membership {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// The nodes placement may use: those `present`, and those the map places
/// replicas on that have been gone for less than `grace` (`absent` records
/// since when; it forgets nodes that came back).
fn placeable(
    present: &BTreeSet<NodeId>,
    map: &PartitionMap,
    absent: &mut BTreeMap<NodeId, tokio::time::Instant>,
    now: tokio::time::Instant,
    grace: Duration,
) -> BTreeSet<NodeId> {
    absent.retain(|node, _| !present.contains(node));
    let mut live = present.clone();
    for node in map.replicas.iter().flatten() {
        if present.contains(node) {
            continue;
        }
        let since = *absent.entry(*node).or_insert(now);
        if now.duration_since(since) < grace {
            live.insert(*node);
        }
    }
    live
}

/// The node that holds the placer election: the only one whose map writes
/// succeed.
#[derive(Debug)]
pub struct Placer {
    control: Control,
    leader: LeaderKey,
    grace: Duration,
    /// When each placed node was first seen gone (its lease expired).
    absent_since: std::sync::Mutex<BTreeMap<NodeId, tokio::time::Instant>>,
}

impl Placer {
    /// Writes `map` if this node still holds the election, atomically.
    pub async fn write_map(&self, map: &PartitionMap) -> Result<(), ControlError> {
        let fence =
            Compare::create_revision(self.leader.key(), CompareOp::Equal, self.leader.rev());
        let txn = Txn::new().when([fence]).and_then([TxnOp::put(
            self.control.key("map"),
            encode(map),
            None,
        )]);
        if self.control.client.clone().txn(txn).await?.succeeded() {
            debug!(version = map.version, "wrote the partition map");
            Ok(())
        } else {
            Err(ControlError::Fenced)
        }
    }

    /// Computes the map for the live nodes from the stored one and writes
    /// it if it changed; returns the map in force.
    pub async fn rebalance(
        &self,
        config: ClusterConfig,
        max_moves: usize,
    ) -> Result<PartitionMap, ControlError> {
        let present: BTreeSet<NodeId> = self.control.nodes().await?.into_keys().collect();
        let current = self
            .control
            .map()
            .await?
            .unwrap_or_else(|| PartitionMap::empty(config.partitions));
        let live = self.with_grace(&present, &current);
        let next = place(&current, &live, config.replicas, max_moves);
        if next != current {
            self.write_map(&next).await?;
            info!(
                version = next.version,
                nodes = live.len(),
                "placed partitions"
            );
        }
        Ok(next)
    }

    /// Keeps a node that went away in the map for `grace` before moving
    /// its replicas: a node that restarts (a crash, an upgrade) comes back
    /// to its own replicas instead of having them moved away and back.
    pub fn with_dead_node_grace(mut self, grace: Duration) -> Self {
        self.grace = grace;
        self
    }

    /// The nodes placement may use: see [`placeable`].
    fn with_grace(&self, present: &BTreeSet<NodeId>, map: &PartitionMap) -> BTreeSet<NodeId> {
        match self.absent_since.lock() {
            Ok(mut absent) => placeable(
                present,
                map,
                &mut absent,
                tokio::time::Instant::now(),
                self.grace,
            ),
            Err(_) => present.clone(),
        }
    }

    /// Places partitions whenever the live nodes change (and every
    /// `every`, to finish gradual moves), until `stop` fires or the office
    /// is lost.
    pub async fn run(
        &self,
        config: ClusterConfig,
        max_moves: usize,
        every: Duration,
        stop: CancellationToken,
    ) -> Result<(), ControlError> {
        let mut changes = self
            .control
            .client
            .clone()
            .watch(
                self.control.key("nodes/"),
                Some(WatchOptions::new().with_prefix()),
            )
            .await?;
        let mut tick = tokio::time::interval(every);
        loop {
            match self.rebalance(config, max_moves).await {
                Err(ControlError::Fenced) => return Err(ControlError::Fenced),
                Err(e) => warn!(error = %e, "placement failed; retrying"),
                Ok(_) => {}
            }
            tokio::select! {
                () = stop.cancelled() => return Ok(()),
                _ = tick.tick() => {}
                change = changes.message() => match change? {
                    Some(batch) => {
                        let joined = batch.events().iter().filter(|e| e.event_type() == EventType::Put).count();
                        debug!(joined, left = batch.events().len() - joined, "membership changed");
                    }
                    None => return Ok(()),
                },
            }
        }
    }

    /// Gives the office up (another node's campaign then wins).
    pub async fn resign(self) -> Result<(), ControlError> {
        self.control
            .client
            .clone()
            .resign(Some(ResignOptions::new().with_leader(self.leader)))
            .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_departed_node_stays_placeable_for_the_grace_period_only() {
        let map = PartitionMap {
            version: 1,
            replicas: vec![vec![1, 2, 3], vec![2, 3, 1]],
        };
        let grace = Duration::from_secs(30);
        let mut absent = BTreeMap::new();
        let t0 = tokio::time::Instant::now();
        let two: BTreeSet<NodeId> = [1, 2].into();
        let all: BTreeSet<NodeId> = [1, 2, 3].into();
        // Node 3 just left: still placeable; later, within the grace, too.
        assert_eq!(placeable(&two, &map, &mut absent, t0, grace), all);
        let later = t0 + Duration::from_secs(29);
        assert_eq!(placeable(&two, &map, &mut absent, later, grace), all);
        // Gone for the whole grace period: its replicas may move.
        let gone = t0 + Duration::from_secs(30);
        assert_eq!(placeable(&two, &map, &mut absent, gone, grace), two);
        // Back: placeable, and a later departure starts a new grace period.
        assert_eq!(placeable(&all, &map, &mut absent, gone, grace), all);
        assert!(absent.is_empty());
        let again = gone + Duration::from_secs(1);
        assert_eq!(placeable(&two, &map, &mut absent, again, grace), all);
        // Without a grace period a departure counts at once.
        let mut none = BTreeMap::new();
        assert_eq!(placeable(&two, &map, &mut none, t0, Duration::ZERO), two);
    }
}
