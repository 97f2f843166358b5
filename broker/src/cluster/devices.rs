//! Device state as partition state: each user's device registry, its
//! devices' cursors and its read markers are replicated by the Raft group
//! of the user's partition (the channels' hash, on the user id), so that a
//! device reconnecting to any node finds them, and a partition leader's
//! death loses nothing that was acknowledged as stored.
//!
//! ```text
//!  session ──Ack / MarkRead──▶ Devices (pending, coalesced per key: max wins)
//!                                  │ every cursors.flush_ms, per partition
//!                                  ▼
//!            Command::Devices ──propose (forwarded)──▶ user's partition leader
//!                                  │ committed, applied on every replica
//!                                  ▼
//!  PartitionMachine ──decide()──▶ merged marks + registry, one write with
//!                                  the partition's applied state
//!
//!  session ──Cursor / Unread / register──▶ ClusterDevices ──Kind::Devices──▶ leader
//! ```
//!
//! - Applying is deterministic (`decide`): a replica reads the values
//!   the entry touches from its own copy (which every replica holds alike,
//!   entry for entry) and merges with rules that look only at those values
//!   and at the entry; every clock in it was stamped before proposing.
//! - Reads go to the partition's leader, which answers from what it
//!   applied while its lease holds (it then applied all that was
//!   committed and acknowledged), merged with what waits on the asking
//!   node.
//! - A moved read marker is announced by every replica that applies it
//!   to its own sessions of the user (the node that took it announced it
//!   already), and relayed by the leader to the live nodes that replicate
//!   nothing of the partition, so that the user's devices on every node
//!   hear of it.
//! - Unread counts ask each partition of the channels for their heads in
//!   one call (`DeviceCall::Heads`), never reading a log.
//! - Idle devices are forgotten by the partition's leader: it proposes
//!   their removal (`Expiry`), which every replica applies only if the
//!   device was not seen since.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tracing::{debug, info, warn};
use volna_cluster::raft::network::Peers;
use volna_cluster::raft::{Command, DEVICE_STATE, Outcome};
use volna_cluster::{NodeId, PartitionId, partition_of};
use volna_proto::{ChannelName, ErrorCode, Offset};

use super::edge::{Edges, MetaWire, Served};
use super::router::ClusterView;
use crate::devices::layout::{self, Key};
use crate::devices::single;
use crate::devices::{
    BoxFuture, DAY_MS, DeviceError, DeviceId, Devices, Incarnation, Mark, RemoteDevices, Unwritten,
};
use crate::log::Logs;
use crate::store::{ChannelMeta, DeviceStore, DeviceWrite};

/// Marks (or stamps) in one proposed entry, at most.
const MAX_ENTRY_CHANGES: usize = 4096;
/// Relays of moved read markers under way, at most (news, not state:
/// beyond it they are dropped).
const MAX_RELAYS: usize = 64;
/// Keys, channels or markers one call may ask about, at most.
const MAX_CALL_ITEMS: usize = 10_000;
/// Idle devices one sweep step proposes to forget, at most.
const SWEEP_STEP: usize = 1024;

/// A device's registration, as replicated.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct Registration {
    user: String,
    device: String,
    /// `cursors.max_devices_per_user` of the node that took it.
    limit: u32,
    /// When it was seen.
    now_ms: u64,
}

/// An idle device to forget, unless it was seen after `idle_since_ms`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct Expiry {
    user: String,
    device: String,
    idle_since_ms: u64,
}

/// The body of a [`Command::Devices`]: keys are [`layout`] keys (without
/// the partition's prefix), marks their encoded [`Mark`]s.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct DeviceBatch {
    registers: Vec<Registration>,
    marks: Vec<(Vec<u8>, Vec<u8>)>,
    seen: Vec<(Vec<u8>, u64)>,
    expire: Vec<Expiry>,
}

/// What applying a [`DeviceBatch`] decided.
#[derive(Debug, Default)]
pub(super) struct Decided {
    /// The write, merged with what was stored.
    pub write: DeviceWrite,
    /// One per registration, in order.
    pub outcomes: Vec<Outcome>,
    /// Read markers as they now stand: user, channel, offset.
    pub markers: Vec<(String, ChannelName, Offset)>,
}

/// The keys (with the partition's prefix) whose stored values applying
/// `batch` in `partition` reads.
pub(super) fn keys_read(partition: u32, batch: &DeviceBatch) -> Vec<Vec<u8>> {
    let mut keys = Vec::new();
    let device = |user: &str, device: &str| {
        DeviceId::new(device)
            .ok()
            .map(|d| layout::in_partition(partition, &layout::device_key(user, &d)))
    };
    for r in &batch.registers {
        keys.extend(device(&r.user, &r.device));
        keys.push(layout::in_partition(
            partition,
            &layout::device_count_key(&r.user),
        ));
    }
    for e in &batch.expire {
        keys.extend(device(&e.user, &e.device));
        keys.push(layout::in_partition(
            partition,
            &layout::device_count_key(&e.user),
        ));
    }
    for (key, _) in &batch.marks {
        keys.push(layout::in_partition(partition, key));
    }
    for (key, _) in &batch.seen {
        keys.push(layout::in_partition(partition, key));
    }
    keys.sort();
    keys.dedup();
    keys
}

/// Applies `batch` to `partition` (of `partitions`) over the values
/// `stored` holds for [`keys_read`]: the same inputs decide the same write
/// on every replica. Entries naming a user of another partition, or keys
/// that are none of the layout's, change nothing.
pub(super) fn decide(
    partition: u32,
    partitions: u32,
    batch: &DeviceBatch,
    stored: HashMap<Vec<u8>, Option<Vec<u8>>>,
) -> Decided {
    let ours = |user: &str| partition_of(user, partitions).0 == partition;
    let mut state = Overlay {
        now: stored,
        changed: BTreeMap::new(),
    };
    let mut decided = Decided::default();
    // Expiries first: their range deletes come before every put in the
    // write, so this is the order the write keeps too.
    for e in &batch.expire {
        let Ok(device) = DeviceId::new(&e.device) else {
            continue;
        };
        if !ours(&e.user) {
            continue;
        }
        let key = layout::in_partition(partition, &layout::device_key(&e.user, &device));
        match state.number(&key) {
            Some(seen) if seen <= e.idle_since_ms => {}
            _ => continue,
        }
        state.remove(&key);
        decided.write.removed_ranges.push(single(&key));
        decided
            .write
            .removed_ranges
            .push(layout::partition_range_of(
                partition,
                layout::device_cursors(&e.user, &device),
            ));
        let count_key = layout::in_partition(partition, &layout::device_count_key(&e.user));
        let held = state.number(&count_key).unwrap_or(1).saturating_sub(1);
        if held == 0 {
            state.remove(&count_key);
            decided.write.removed_ranges.push(single(&count_key));
            decided
                .write
                .removed_ranges
                .push(layout::partition_range_of(
                    partition,
                    layout::user_markers(&e.user),
                ));
        } else {
            state.put(count_key, held.to_be_bytes().to_vec());
        }
    }
    for r in &batch.registers {
        let device = match DeviceId::new(&r.device) {
            Ok(device) if ours(&r.user) => device,
            Ok(_) => {
                decided.outcomes.push(refused(
                    ErrorCode::Internal,
                    format!("{} is not a user of partition {partition}", r.user),
                ));
                continue;
            }
            Err(why) => {
                decided
                    .outcomes
                    .push(refused(ErrorCode::BadRequest, why.to_owned()));
                continue;
            }
        };
        let key = layout::in_partition(partition, &layout::device_key(&r.user, &device));
        if let Some(seen) = state.number(&key) {
            state.put(key, seen.max(r.now_ms).to_be_bytes().to_vec());
            decided.outcomes.push(Outcome::Applied);
            continue;
        }
        let count_key = layout::in_partition(partition, &layout::device_count_key(&r.user));
        let held = state.number(&count_key).unwrap_or(0);
        if held >= u64::from(r.limit) {
            decided.outcomes.push(refused(
                ErrorCode::TooManyDevices,
                DeviceError::TooManyDevices {
                    user: r.user.clone(),
                    limit: r.limit,
                }
                .to_string(),
            ));
            continue;
        }
        state.put(key, r.now_ms.to_be_bytes().to_vec());
        state.put(count_key, (held + 1).to_be_bytes().to_vec());
        decided.outcomes.push(Outcome::Applied);
    }
    for (key, ms) in &batch.seen {
        // Only a registered device is stamped: a stamp never registers one
        // behind the count's back.
        let registered =
            matches!(layout::parse_key(key), Some(Key::Device { ref user, .. }) if ours(user));
        let prefixed = layout::in_partition(partition, key);
        if let (true, Some(seen)) = (registered, state.number(&prefixed)) {
            state.put(prefixed, seen.max(*ms).to_be_bytes().to_vec());
        }
    }
    for (key, value) in &batch.marks {
        let (Some(Key::Mark { user, channel }), Some(mark)) =
            (layout::parse_key(key), Mark::decode(value))
        else {
            continue;
        };
        if !ours(&user) {
            continue;
        }
        let prefixed = layout::in_partition(partition, key);
        let merged = match state.value(&prefixed).and_then(Mark::decode) {
            Some(kept) => Incarnation::Epoch.merge(kept, mark),
            None => mark,
        };
        let is_marker = layout::marker_channel(&user, key).is_some();
        state.put(prefixed, merged.encode());
        if is_marker {
            decided.markers.push((user, channel, merged.offset));
        }
    }
    decided.write.puts = state.changed.into_iter().collect();
    decided
}

/// The values an entry sees as it applies: what was stored, with its own
/// changes so far.
struct Overlay {
    now: HashMap<Vec<u8>, Option<Vec<u8>>>,
    changed: BTreeMap<Vec<u8>, Vec<u8>>,
}

impl Overlay {
    fn value(&self, key: &[u8]) -> Option<&[u8]> {
        self.now.get(key).and_then(|v| v.as_deref())
    }

    fn number(&self, key: &[u8]) -> Option<u64> {
        self.value(key)
            .and_then(|v| <[u8; 8]>::try_from(v).ok())
            .map(u64::from_be_bytes)
    }

    fn put(&mut self, key: Vec<u8>, value: Vec<u8>) {
        self.now.insert(key.clone(), Some(value.clone()));
        self.changed.insert(key, value);
    }

    fn remove(&mut self, key: &[u8]) {
        self.now.insert(key.to_vec(), None);
        self.changed.remove(key);
    }
}

fn refused(code: ErrorCode, message: String) -> Outcome {
    Outcome::Refused {
        code: code.to_u16(),
        message,
    }
}

/// A question about device state for a partition's leader (or, for
/// [`DeviceCall::Moved`], news for any node).
#[derive(Debug, Serialize, Deserialize)]
pub(super) enum DeviceCall {
    /// Registers a device (a proposal only when it is new).
    Register {
        user: String,
        device: String,
        limit: u32,
    },
    /// Marks by key.
    Get { keys: Vec<Vec<u8>> },
    /// A user's read markers.
    Markers { user: String, limit: u32 },
    /// The heads of channels of the partition.
    Heads { channels: Vec<String> },
    /// Read markers that moved: user, channel, offset.
    Moved { markers: Vec<(String, String, u64)> },
}

/// What a [`DeviceCall`] is answered with.
#[derive(Debug, Serialize, Deserialize)]
pub(super) enum DeviceAnswer {
    Registered,
    Refused { code: u16, message: String },
    Marks(Vec<Option<Vec<u8>>>),
    Markers(Vec<(String, Vec<u8>)>),
    Heads(Vec<Option<MetaWire>>),
    Told,
}

/// A cluster node's device state: the sessions' [`RemoteDevices`], the
/// serving side of `DeviceCall`s, and what partition machines call as
/// they apply device entries.
pub struct ClusterDevices {
    node: NodeId,
    partitions: u32,
    peers: Arc<Peers>,
    view: Arc<ClusterView>,
    edges: Arc<Edges>,
    logs: Logs,
    store: Arc<dyn DeviceStore>,
    /// How long a proposal or a question may take.
    within: Duration,
    /// The sessions' handle, told of moved read markers.
    sessions: OnceLock<Weak<Devices>>,
    /// Bounds the relays of moved read markers.
    relays: Arc<tokio::sync::Semaphore>,
}

impl std::fmt::Debug for ClusterDevices {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterDevices")
            .field("node", &self.node)
            .finish_non_exhaustive()
    }
}

impl ClusterDevices {
    /// The device state of node `node`'s users, kept in `store` for the
    /// partitions it replicates.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn new(
        node: NodeId,
        partitions: u32,
        peers: Arc<Peers>,
        view: Arc<ClusterView>,
        edges: Arc<Edges>,
        logs: Logs,
        store: Arc<dyn DeviceStore>,
        within: Duration,
    ) -> Arc<Self> {
        Arc::new(Self {
            node,
            partitions,
            peers,
            view,
            edges,
            logs,
            store,
            within,
            sessions: OnceLock::new(),
            relays: Arc::new(tokio::sync::Semaphore::new(MAX_RELAYS)),
        })
    }

    /// Tells moved read markers to `devices`' sessions from now on.
    pub fn announce_to(&self, devices: &Arc<Devices>) {
        let _ = self.sessions.set(Arc::downgrade(devices));
    }

    fn partition_of_user(&self, user: &str) -> PartitionId {
        partition_of(user, self.partitions)
    }

    /// The stored values of `keys` (with the partition's prefix), read on
    /// the blocking pool.
    async fn read_stored(
        &self,
        keys: Vec<Vec<u8>>,
    ) -> Result<HashMap<Vec<u8>, Option<Vec<u8>>>, DeviceError> {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || {
            let values = store.get_device_entries(&keys)?;
            Ok(keys.into_iter().zip(values).collect())
        })
        .await
        .map_err(|e| DeviceError::Storage(e.to_string()))?
    }

    /// What a partition machine applies for a [`Command::Devices`] entry:
    /// reads what it touches, then decides.
    pub(super) async fn apply(
        &self,
        partition: PartitionId,
        changes: &[u8],
    ) -> Result<Decided, DeviceError> {
        let Ok(batch) = postcard::from_bytes::<DeviceBatch>(changes) else {
            // Every replica fails to decode it alike: it changes nothing.
            warn!(
                partition = partition.0,
                "an undecodable device entry is applied as nothing"
            );
            return Ok(Decided::default());
        };
        let stored = self.read_stored(keys_read(partition.0, &batch)).await?;
        Ok(decide(partition.0, self.partitions, &batch, stored))
    }

    /// A device entry taken by `origin` was applied here: this node's
    /// sessions of the users hear of their markers (unless this node took
    /// it), and as the partition's leader this node relays them to the
    /// nodes that replicate nothing of it.
    pub(super) fn applied(
        &self,
        partition: PartitionId,
        origin: NodeId,
        markers: Vec<(String, ChannelName, Offset)>,
    ) {
        if markers.is_empty() {
            return;
        }
        if origin != self.node {
            self.tell_sessions(&markers);
        }
        if !self.peers.leads(partition) {
            return;
        }
        let (map, live) = self.view.snapshot();
        let replicas = map
            .replicas
            .get(partition.0 as usize)
            .cloned()
            .unwrap_or_default();
        let others: Vec<(NodeId, String)> = live
            .iter()
            .filter(|(id, _)| **id != origin && **id != self.node && !replicas.contains(id))
            .map(|(id, info)| (*id, info.peer.clone()))
            .collect();
        if others.is_empty() {
            return;
        }
        let call = DeviceCall::Moved {
            markers: markers
                .into_iter()
                .map(|(user, channel, offset)| (user, channel.as_str().to_owned(), offset.get()))
                .collect(),
        };
        let Ok(body) = postcard::to_allocvec(&call) else {
            return;
        };
        // News, not state: a node that misses it still reads the marker.
        let Ok(permit) = self.relays.clone().try_acquire_owned() else {
            debug!("too many marker relays under way: one dropped");
            return;
        };
        let peers = self.peers.clone();
        tokio::spawn(async move {
            let calls = others.iter().map(|(node, addr)| {
                peers.devices(*node, addr, partition, &body, Duration::from_secs(1))
            });
            for (result, (node, _)) in futures_util::future::join_all(calls)
                .await
                .into_iter()
                .zip(&others)
            {
                if let Err(e) = result {
                    debug!(node, error = %e, "a moved read marker was not relayed");
                }
            }
            drop(permit);
        });
    }

    fn tell_sessions(&self, markers: &[(String, ChannelName, Offset)]) {
        let Some(devices) = self.sessions.get().and_then(Weak::upgrade) else {
            return;
        };
        for (user, channel, offset) in markers {
            devices.announce(user, 0, channel, *offset);
        }
    }

    /// Answers a [`DeviceCall`] from another node.
    pub(super) async fn answer(&self, partition: PartitionId, body: &[u8]) -> Vec<u8> {
        let served = match postcard::from_bytes::<DeviceCall>(body) {
            Ok(call) => self.serve(partition, call).await,
            Err(e) => Served::Refused(e.to_string()),
        };
        postcard::to_allocvec(&served).unwrap_or_default()
    }

    /// `Ok` when this node leads `partition`, knows it still does, and
    /// applied an entry of its own term: everything its predecessors
    /// committed (every ack a device was told is stored) is then applied
    /// here too.
    fn leads<T>(&self, partition: PartitionId) -> Result<(), Served<T>> {
        use volna_cluster::raft::lease::Standing;
        match self.peers.standing(partition) {
            None => Err(Served::NotHosted),
            Some(Standing::Leader) if self.applied_its_term(partition) => Ok(()),
            Some(Standing::Leader) => Err(Served::NotLeader(Some(self.node))),
            Some(Standing::Follower(leader)) => Err(Served::NotLeader(Some(leader))),
            Some(_) => Err(Served::NotLeader(None)),
        }
    }

    fn applied_its_term(&self, partition: PartitionId) -> bool {
        self.peers.group(partition).is_some_and(|raft| {
            let metrics = raft.metrics();
            let metrics = metrics.borrow();
            metrics
                .last_applied
                .is_some_and(|applied| applied.leader_id.term == metrics.current_term)
        })
    }

    async fn serve(&self, partition: PartitionId, call: DeviceCall) -> Served<DeviceAnswer> {
        let items = match &call {
            DeviceCall::Get { keys } => keys.len(),
            DeviceCall::Markers { limit, .. } => *limit as usize,
            DeviceCall::Heads { channels } => channels.len(),
            DeviceCall::Moved { markers } => markers.len(),
            DeviceCall::Register { .. } => 1,
        };
        if items > MAX_CALL_ITEMS {
            return Served::Refused(format!(
                "a device call about {items} items (at most {MAX_CALL_ITEMS})"
            ));
        }
        if let DeviceCall::Moved { markers } = call {
            let markers: Vec<(String, ChannelName, Offset)> = markers
                .into_iter()
                .filter_map(|(user, channel, offset)| {
                    Some((user, ChannelName::new(channel).ok()?, Offset::new(offset)))
                })
                .collect();
            self.tell_sessions(&markers);
            return Served::Ok(DeviceAnswer::Told);
        }
        if let Err(not) = self.leads(partition) {
            return not;
        }
        let answered = match call {
            DeviceCall::Register {
                user,
                device,
                limit,
            } => {
                if self.partition_of_user(&user) != partition {
                    return Served::Refused(format!("{user} is not in partition {}", partition.0));
                }
                let device = match DeviceId::new(&device) {
                    Ok(device) => device,
                    Err(why) => return Served::Refused(why.to_owned()),
                };
                self.register_here(partition, user, device, limit).await
            }
            DeviceCall::Get { keys } => self.marks_here(partition, keys).await.map(|marks| {
                DeviceAnswer::Marks(marks.into_iter().map(|m| m.map(|m| m.encode())).collect())
            }),
            DeviceCall::Markers { user, limit } => self
                .markers_here(partition, &user, limit as usize)
                .await
                .map(|found| {
                    DeviceAnswer::Markers(
                        found
                            .into_iter()
                            .map(|(c, m)| (c.as_str().to_owned(), m.encode()))
                            .collect(),
                    )
                }),
            DeviceCall::Heads { channels } => {
                let mut heads = Vec::with_capacity(channels.len());
                for name in channels {
                    let Ok(channel) = ChannelName::new(name) else {
                        heads.push(None);
                        continue;
                    };
                    if partition_of(channel.as_str(), self.partitions) != partition {
                        return Served::Refused(format!(
                            "{channel} is not in partition {}",
                            partition.0
                        ));
                    }
                    match self.logs.durable().lookup(&channel).await {
                        Ok(meta) => heads.push(meta.map(|m| MetaWire::of(&m))),
                        Err(e) => return Served::Refused(format!("cannot read {channel}: {e}")),
                    }
                }
                Ok(DeviceAnswer::Heads(heads))
            }
            DeviceCall::Moved { .. } => Ok(DeviceAnswer::Told),
        };
        match answered {
            Ok(answer) => Served::Ok(answer),
            Err(DeviceError::TooManyDevices { user, limit }) => Served::Ok(DeviceAnswer::Refused {
                code: ErrorCode::TooManyDevices.to_u16(),
                message: DeviceError::TooManyDevices { user, limit }.to_string(),
            }),
            Err(e) => Served::Refused(e.to_string()),
        }
    }

    /// Registers a device of a partition this node leads: known devices
    /// cost a read; a new one is proposed (and counted) through the group.
    async fn register_here(
        &self,
        partition: PartitionId,
        user: String,
        device: DeviceId,
        limit: u32,
    ) -> Result<DeviceAnswer, DeviceError> {
        let key = layout::in_partition(partition.0, &layout::device_key(&user, &device));
        let known = self.read_stored(vec![key.clone()]).await?;
        if known.get(&key).is_some_and(Option::is_some) {
            return Ok(DeviceAnswer::Registered);
        }
        let batch = DeviceBatch {
            registers: vec![Registration {
                user,
                device: device.as_str().to_owned(),
                limit,
                now_ms: crate::log::now_ms(),
            }],
            ..DeviceBatch::default()
        };
        let reply = self.propose(partition, &batch).await?;
        match reply.into_iter().next() {
            Some(Outcome::Applied) => Ok(DeviceAnswer::Registered),
            Some(Outcome::Refused { code, message }) => Ok(DeviceAnswer::Refused { code, message }),
            other => Err(DeviceError::Storage(format!(
                "the partition answered a registration with {other:?}"
            ))),
        }
    }

    async fn marks_here(
        &self,
        partition: PartitionId,
        keys: Vec<Vec<u8>>,
    ) -> Result<Vec<Option<Mark>>, DeviceError> {
        let prefixed: Vec<Vec<u8>> = keys
            .iter()
            .map(|k| layout::in_partition(partition.0, k))
            .collect();
        let stored = self.read_stored(prefixed.clone()).await?;
        Ok(prefixed
            .iter()
            .map(|k| {
                stored
                    .get(k)
                    .and_then(|v| v.as_deref())
                    .and_then(Mark::decode)
            })
            .collect())
    }

    async fn markers_here(
        &self,
        partition: PartitionId,
        user: &str,
        limit: usize,
    ) -> Result<Vec<(ChannelName, Mark)>, DeviceError> {
        let (from, until) = layout::partition_range_of(partition.0, layout::user_markers(user));
        let store = self.store.clone();
        let entries =
            tokio::task::spawn_blocking(move || store.scan_device_entries(&from, &until, limit))
                .await
                .map_err(|e| DeviceError::Storage(e.to_string()))??;
        Ok(entries
            .into_iter()
            .filter_map(|(key, value)| {
                let (_, key) = layout::split_partition(&key)?;
                Some((layout::marker_channel(user, key)?, Mark::decode(&value)?))
            })
            .collect())
    }

    /// Proposes `batch` to `partition`'s group (wherever it leads); the
    /// outcomes of its registrations.
    async fn propose(
        &self,
        partition: PartitionId,
        batch: &DeviceBatch,
    ) -> Result<Vec<Outcome>, DeviceError> {
        if !self.view.reads_log_format(partition, DEVICE_STATE) {
            return Err(DeviceError::Storage(format!(
                "partition {} has replicas that do not keep device state yet (an upgrade is \
                 under way)",
                partition.0
            )));
        }
        let changes = postcard::to_allocvec(batch)
            .map(Bytes::from)
            .map_err(|e| DeviceError::Storage(e.to_string()))?;
        let command = Command::Devices {
            origin: self.node,
            changes,
        };
        self.peers
            .propose(
                partition,
                &command,
                &self.view.replicas(partition),
                self.within,
            )
            .await
            .map(|reply| reply.outcomes)
            .map_err(|e| DeviceError::Storage(e.to_string()))
    }

    /// Asks `partition`'s leader, or answers here when this node leads it
    /// (a leader just elected answers once it applied its first entry).
    async fn ask(
        &self,
        partition: PartitionId,
        call: DeviceCall,
    ) -> Result<DeviceAnswer, DeviceError> {
        let until = tokio::time::Instant::now() + self.within;
        while self.peers.leads(partition) {
            match self.leads::<()>(partition) {
                Ok(()) => {
                    return match self.serve(partition, call).await {
                        Served::Ok(answer) => Ok(answer),
                        other => Err(DeviceError::Storage(format!(
                            "partition {}: {other:?}",
                            partition.0
                        ))),
                    };
                }
                Err(_) if tokio::time::Instant::now() < until => {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                Err(_) => {
                    return Err(DeviceError::Storage(format!(
                        "partition {}: its new leader did not apply its first entry within {:?}",
                        partition.0, self.within
                    )));
                }
            }
        }
        self.edges
            .ask_devices(partition, &call, self.within)
            .await
            .map_err(|e| DeviceError::Storage(format!("partition {}: {e}", partition.0)))
    }

    /// The user whose partition keeps `key`.
    fn user_of(key: &[u8]) -> Option<String> {
        match layout::parse_key(key)? {
            Key::Mark { user, .. } | Key::Device { user, .. } | Key::DeviceCount { user } => {
                Some(user)
            }
        }
    }

    async fn write_partition(
        &self,
        partition: PartitionId,
        marks: Vec<(Vec<u8>, Mark)>,
        seen: Vec<(Vec<u8>, u64)>,
    ) -> Unwritten {
        let mut unwritten = Unwritten {
            written: vec![partition.0],
            ..Unwritten::default()
        };
        let mut marks = marks.into_iter().peekable();
        let mut seen = seen.into_iter().peekable();
        while marks.peek().is_some() || seen.peek().is_some() {
            let chunk_marks: Vec<(Vec<u8>, Mark)> =
                marks.by_ref().take(MAX_ENTRY_CHANGES).collect();
            let chunk_seen: Vec<(Vec<u8>, u64)> = seen.by_ref().take(MAX_ENTRY_CHANGES).collect();
            let batch = DeviceBatch {
                marks: chunk_marks
                    .iter()
                    .map(|(k, m)| (k.clone(), m.encode()))
                    .collect(),
                seen: chunk_seen.clone(),
                ..DeviceBatch::default()
            };
            if let Err(e) = self.propose(partition, &batch).await {
                unwritten.written.clear();
                unwritten.why = Some(e.to_string());
                unwritten.marks.extend(chunk_marks);
                unwritten.seen.extend(chunk_seen);
                unwritten.marks.extend(marks);
                unwritten.seen.extend(seen);
                break;
            }
        }
        unwritten
    }

    /// Proposes the removal of devices of the partitions this node leads
    /// that were not seen for `idle_days`, a bounded step at a time.
    pub(super) async fn sweep(&self, idle_days: u64) {
        let idle_since = crate::log::now_ms().saturating_sub(idle_days.saturating_mul(DAY_MS));
        for p in 0..self.partitions {
            let partition = PartitionId(p);
            if !self.peers.leads(partition) {
                continue;
            }
            let (mut from, until) = layout::partition_range_of(p, layout::all_devices());
            let mut forgotten = 0usize;
            loop {
                let store = self.store.clone();
                let (start, end) = (from.clone(), until.clone());
                let entries = match tokio::task::spawn_blocking(move || {
                    store.scan_device_entries(&start, &end, SWEEP_STEP)
                })
                .await
                {
                    Ok(Ok(entries)) => entries,
                    Ok(Err(e)) => {
                        warn!(partition = p, error = %e, "device sweep cannot read");
                        break;
                    }
                    Err(_) => break,
                };
                let expire: Vec<Expiry> = entries
                    .iter()
                    .filter_map(|(key, value)| {
                        let (_, key) = layout::split_partition(key)?;
                        let Key::Device { user, device } = layout::parse_key(key)? else {
                            return None;
                        };
                        let seen = u64::from_be_bytes(value.as_slice().try_into().ok()?);
                        (seen <= idle_since).then_some(Expiry {
                            user,
                            device,
                            idle_since_ms: idle_since,
                        })
                    })
                    .collect();
                if !expire.is_empty() {
                    forgotten += expire.len();
                    let batch = DeviceBatch {
                        expire,
                        ..DeviceBatch::default()
                    };
                    if let Err(e) = self.propose(partition, &batch).await {
                        warn!(partition = p, error = %e, "device sweep not committed");
                        break;
                    }
                }
                match entries.last() {
                    Some((last, _)) if entries.len() == SWEEP_STEP => {
                        from = last.clone();
                        from.push(0);
                    }
                    _ => break,
                }
            }
            if forgotten > 0 {
                info!(partition = p, forgotten, "idle devices forgotten");
            }
        }
    }
}

/// Marks and registry stamps of one partition, as a flush groups them.
type Changes = (Vec<(Vec<u8>, Mark)>, Vec<(Vec<u8>, u64)>);

fn answer_error(partition: PartitionId, answer: DeviceAnswer) -> DeviceError {
    DeviceError::Storage(format!("partition {} answered {answer:?}", partition.0))
}

impl RemoteDevices for ClusterDevices {
    fn partition_of(&self, user: &str) -> u32 {
        self.partition_of_user(user).0
    }

    fn register(
        &self,
        user: String,
        device: DeviceId,
        limit: u32,
    ) -> BoxFuture<'_, Result<(), DeviceError>> {
        Box::pin(async move {
            let partition = self.partition_of_user(&user);
            let call = DeviceCall::Register {
                user: user.clone(),
                device: device.as_str().to_owned(),
                limit,
            };
            match self.ask(partition, call).await? {
                DeviceAnswer::Registered => Ok(()),
                DeviceAnswer::Refused { code, .. }
                    if ErrorCode::from_u16(code) == ErrorCode::TooManyDevices =>
                {
                    Err(DeviceError::TooManyDevices { user, limit })
                }
                DeviceAnswer::Refused { message, .. } => Err(DeviceError::Storage(message)),
                other => Err(answer_error(partition, other)),
            }
        })
    }

    fn get(&self, keys: Vec<Vec<u8>>) -> BoxFuture<'_, Result<Vec<Option<Mark>>, DeviceError>> {
        Box::pin(async move {
            let mut by_partition: BTreeMap<PartitionId, Vec<usize>> = BTreeMap::new();
            for (i, key) in keys.iter().enumerate() {
                let user = Self::user_of(key)
                    .ok_or_else(|| DeviceError::Storage("a device key names no user".into()))?;
                by_partition
                    .entry(self.partition_of_user(&user))
                    .or_default()
                    .push(i);
            }
            let asks = by_partition.into_iter().map(|(partition, at)| {
                let call = DeviceCall::Get {
                    keys: at.iter().map(|i| keys[*i].clone()).collect(),
                };
                async move { (partition, at, self.ask(partition, call).await) }
            });
            let mut found = vec![None; keys.len()];
            for (partition, at, answer) in futures_util::future::join_all(asks).await {
                match answer? {
                    DeviceAnswer::Marks(marks) if marks.len() == at.len() => {
                        for (i, mark) in at.into_iter().zip(marks) {
                            found[i] = mark.as_deref().and_then(Mark::decode);
                        }
                    }
                    other => return Err(answer_error(partition, other)),
                }
            }
            Ok(found)
        })
    }

    fn markers(
        &self,
        user: String,
        limit: usize,
    ) -> BoxFuture<'_, Result<Vec<(ChannelName, Mark)>, DeviceError>> {
        Box::pin(async move {
            let partition = self.partition_of_user(&user);
            let limit = u32::try_from(limit).unwrap_or(u32::MAX);
            match self
                .ask(partition, DeviceCall::Markers { user, limit })
                .await?
            {
                DeviceAnswer::Markers(found) => Ok(found
                    .into_iter()
                    .filter_map(|(c, m)| Some((ChannelName::new(c).ok()?, Mark::decode(&m)?)))
                    .collect()),
                other => Err(answer_error(partition, other)),
            }
        })
    }

    fn write(
        &self,
        marks: Vec<(Vec<u8>, Mark)>,
        seen: Vec<(Vec<u8>, u64)>,
    ) -> BoxFuture<'_, Unwritten> {
        Box::pin(async move {
            let mut by_partition: BTreeMap<PartitionId, Changes> = BTreeMap::new();
            for (key, mark) in marks {
                if let Some(user) = Self::user_of(&key) {
                    by_partition
                        .entry(self.partition_of_user(&user))
                        .or_default()
                        .0
                        .push((key, mark));
                }
            }
            for (key, ms) in seen {
                if let Some(user) = Self::user_of(&key) {
                    by_partition
                        .entry(self.partition_of_user(&user))
                        .or_default()
                        .1
                        .push((key, ms));
                }
            }
            let writes = by_partition
                .into_iter()
                .map(|(partition, (marks, seen))| self.write_partition(partition, marks, seen));
            let mut unwritten = Unwritten::default();
            for left in futures_util::future::join_all(writes).await {
                unwritten.written.extend(left.written);
                unwritten.marks.extend(left.marks);
                unwritten.seen.extend(left.seen);
                unwritten.why = unwritten.why.or(left.why);
            }
            unwritten
        })
    }

    fn heads(
        &self,
        channels: Vec<ChannelName>,
    ) -> BoxFuture<'_, Result<Vec<Option<ChannelMeta>>, DeviceError>> {
        Box::pin(async move {
            let mut by_partition: BTreeMap<PartitionId, Vec<usize>> = BTreeMap::new();
            for (i, channel) in channels.iter().enumerate() {
                by_partition
                    .entry(partition_of(channel.as_str(), self.partitions))
                    .or_default()
                    .push(i);
            }
            let asks = by_partition.into_iter().map(|(partition, at)| {
                let channels = &channels;
                async move {
                    // A replica answers from its own copy: a head a few
                    // milliseconds behind is an unread count's precision.
                    if self.peers.group(partition).is_some()
                        && self.view.is_replica(partition, self.node)
                    {
                        let mut heads = Vec::with_capacity(at.len());
                        for i in &at {
                            let meta = self
                                .logs
                                .durable()
                                .lookup(&channels[*i])
                                .await
                                .map_err(|e| DeviceError::Storage(e.to_string()))?;
                            heads.push(meta);
                        }
                        return Ok((at, heads));
                    }
                    let call = DeviceCall::Heads {
                        channels: at
                            .iter()
                            .map(|i| channels[*i].as_str().to_owned())
                            .collect(),
                    };
                    match self.ask(partition, call).await? {
                        DeviceAnswer::Heads(heads) if heads.len() == at.len() => Ok((
                            at,
                            heads
                                .into_iter()
                                .map(|h| h.map(MetaWire::into_meta))
                                .collect(),
                        )),
                        other => Err(answer_error(partition, other)),
                    }
                }
            });
            let mut found = vec![None; channels.len()];
            for answer in futures_util::future::join_all(asks).await {
                let (at, heads) = answer?;
                for (i, head) in at.into_iter().zip(heads) {
                    found[i] = head;
                }
            }
            Ok(found)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn channel(name: &str) -> ChannelName {
        ChannelName::new(name).expect("valid")
    }

    /// A user of partition `p` of 8.
    fn user_in(p: u32) -> String {
        (0..)
            .map(|i| format!("user{i}"))
            .find(|u| partition_of(u, 8).0 == p)
            .expect("some user hashes there")
    }

    fn mark(offset: u64, epoch: u64, ms: u64) -> Mark {
        Mark {
            offset: Offset::new(offset),
            channel_id: epoch,
            updated_ms: ms,
        }
    }

    /// Applies `batch` over `kept` as a replica would, and writes the
    /// outcome back into `kept`.
    fn apply(kept: &mut BTreeMap<Vec<u8>, Vec<u8>>, p: u32, batch: &DeviceBatch) -> Decided {
        let stored = keys_read(p, batch)
            .into_iter()
            .map(|k| {
                let v = kept.get(&k).cloned();
                (k, v)
            })
            .collect();
        let decided = decide(p, 8, batch, stored);
        for (from, until) in &decided.write.removed_ranges {
            kept.retain(|k, _| !(k >= from && k < until));
        }
        for (k, v) in &decided.write.puts {
            kept.insert(k.clone(), v.clone());
        }
        decided
    }

    #[test]
    fn registrations_count_devices_and_refuse_beyond_the_limit_alike_everywhere() {
        let user = user_in(3);
        let register = |device: &str| Registration {
            user: user.clone(),
            device: device.into(),
            limit: 2,
            now_ms: 10,
        };
        let batch = DeviceBatch {
            registers: vec![register("a"), register("b"), register("a"), register("c")],
            ..DeviceBatch::default()
        };
        let mut kept = BTreeMap::new();
        let decided = apply(&mut kept, 3, &batch);
        assert_eq!(
            decided.outcomes[..3],
            [Outcome::Applied, Outcome::Applied, Outcome::Applied]
        );
        assert!(matches!(
            &decided.outcomes[3],
            Outcome::Refused { code, .. } if ErrorCode::from_u16(*code) == ErrorCode::TooManyDevices
        ));
        // A second replica over the same state decides the same.
        let mut again = BTreeMap::new();
        let twice = apply(&mut again, 3, &batch);
        assert_eq!(twice.write.puts, decided.write.puts);
        // A user of another partition changes nothing here.
        let stray = DeviceBatch {
            registers: vec![Registration {
                user: user_in(4),
                device: "x".into(),
                limit: 2,
                now_ms: 1,
            }],
            ..DeviceBatch::default()
        };
        let decided = apply(&mut kept, 3, &stray);
        assert!(decided.write.puts.is_empty());
        assert!(matches!(decided.outcomes[0], Outcome::Refused { .. }));
    }

    #[test]
    fn marks_never_move_back_and_markers_are_reported_as_they_stand() {
        let user = user_in(1);
        let phone = DeviceId::new("phone").expect("valid");
        let chat = channel("chat.9");
        let cursor = layout::cursor_key(&user, &phone, &chat);
        let marker = layout::marker_key(&user, &chat);
        let mut kept = BTreeMap::new();
        let first = DeviceBatch {
            marks: vec![
                (cursor.clone(), mark(7, 42, 5).encode()),
                (marker.clone(), mark(4, 42, 5).encode()),
            ],
            ..DeviceBatch::default()
        };
        let decided = apply(&mut kept, 1, &first);
        assert_eq!(
            decided.markers,
            vec![(user.clone(), chat.clone(), Offset::new(4))]
        );
        let back = DeviceBatch {
            marks: vec![
                (cursor.clone(), mark(3, 42, 9).encode()),
                (marker.clone(), mark(2, 42, 9).encode()),
            ],
            ..DeviceBatch::default()
        };
        let decided = apply(&mut kept, 1, &back);
        assert_eq!(
            decided.markers,
            vec![(user.clone(), chat.clone(), Offset::new(4))]
        );
        let stored = |kept: &BTreeMap<Vec<u8>, Vec<u8>>, key: &[u8]| {
            Mark::decode(&kept[&layout::in_partition(1, key)]).map(|m| m.offset.get())
        };
        assert_eq!(stored(&kept, &cursor), Some(7));
        assert_eq!(stored(&kept, &marker), Some(4));
        // A channel recreated (another epoch), acknowledged later: it wins.
        let recreated = DeviceBatch {
            marks: vec![(cursor.clone(), mark(1, 99, 20).encode())],
            ..DeviceBatch::default()
        };
        apply(&mut kept, 1, &recreated);
        assert_eq!(stored(&kept, &cursor), Some(1));
        // Garbage keys and values change nothing.
        let garbage = DeviceBatch {
            marks: vec![(b"zz".to_vec(), vec![1, 2]), (cursor.clone(), vec![0; 3])],
            ..DeviceBatch::default()
        };
        assert!(apply(&mut kept, 1, &garbage).write.puts.is_empty());
    }

    #[test]
    fn an_idle_device_goes_with_its_cursors_and_the_last_one_takes_the_markers() {
        let user = user_in(2);
        let (old, new) = (
            DeviceId::new("old").expect("valid"),
            DeviceId::new("new").expect("valid"),
        );
        let chat = channel("chat.1");
        let mut kept = BTreeMap::new();
        let setup = DeviceBatch {
            registers: ["old", "new"]
                .into_iter()
                .map(|d| Registration {
                    user: user.clone(),
                    device: d.into(),
                    limit: 5,
                    now_ms: 100,
                })
                .collect(),
            ..DeviceBatch::default()
        };
        apply(&mut kept, 2, &setup);
        let marks = DeviceBatch {
            marks: vec![
                (
                    layout::cursor_key(&user, &old, &chat),
                    mark(3, 1, 100).encode(),
                ),
                (
                    layout::cursor_key(&user, &new, &chat),
                    mark(3, 1, 100).encode(),
                ),
                (layout::marker_key(&user, &chat), mark(3, 1, 100).encode()),
            ],
            // The new device was seen later.
            seen: vec![(layout::device_key(&user, &new), 500)],
            ..DeviceBatch::default()
        };
        apply(&mut kept, 2, &marks);
        let expire = |device: &str| Expiry {
            user: user.clone(),
            device: device.into(),
            idle_since_ms: 200,
        };
        let batch = DeviceBatch {
            expire: vec![expire("old"), expire("new")],
            ..DeviceBatch::default()
        };
        apply(&mut kept, 2, &batch);
        let has = |key: Vec<u8>| kept.contains_key(&layout::in_partition(2, &key));
        assert!(!has(layout::device_key(&user, &old)));
        assert!(!has(layout::cursor_key(&user, &old, &chat)));
        // Seen after the sweep looked: it stays, with its user's markers.
        assert!(has(layout::device_key(&user, &new)));
        assert!(has(layout::cursor_key(&user, &new, &chat)));
        assert!(has(layout::marker_key(&user, &chat)));
        let count = kept[&layout::in_partition(2, &layout::device_count_key(&user))].clone();
        assert_eq!(count, 1u64.to_be_bytes().to_vec());
        // The last device goes: so do the count and the markers.
        let later = DeviceBatch {
            expire: vec![Expiry {
                user: user.clone(),
                device: "new".into(),
                idle_since_ms: 600,
            }],
            ..DeviceBatch::default()
        };
        apply(&mut kept, 2, &later);
        assert!(kept.is_empty(), "left: {kept:?}");
    }
}
