//! A partition's state machine: applies its committed Raft entries to the
//! node's channel logs through the log writer.
//!
//! Every replica applies the same entries in the same order with the
//! leader's clock and epoch seed, through the same [`Sequencer`], so every
//! replica stores the same `(epoch, channel, offset)` (G1 in a cluster); the
//! entry's changes and the partition's applied state are one RocksDB write,
//! so a restarted replica resumes applying exactly after the last one it
//! stored (G7).
//!
//! Idempotence windows are scoped to the partition (their owner is
//! `owner#p<partition>`): windows shared across partitions would depend on
//! the order a node happens to apply different partitions in.
//!
//! Log compaction: the group takes a snapshot of the partition once its log
//! holds `cluster.snapshot_log_bytes` since the last one, after which
//! openraft purges the entries it covers. Taking a snapshot records the
//! partition's position and nothing else: the state machine *is* the
//! partition's data in the store, so a snapshot is made only when a replica
//! too far behind for the remaining log needs one, exported from a RocksDB
//! snapshot fixed at that moment and streamed as it is read
//! ([`snapshot::export`]). The replica installs it
//! ([`crate::log::Restore`]) and keeps no copy. Publishing into a large
//! partition therefore never rewrites it.
//!
//! [`snapshot::export`]: super::snapshot::export
//! [`Sequencer`]: crate::log::Sequencer

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{
    Entry, EntryPayload, LogId, RaftSnapshotBuilder, SnapshotMeta, StorageError, StorageIOError,
    StoredMembership,
};
use serde::{Deserialize, Serialize};
use tracing::{debug, info, warn};
use volna_cluster::raft::snapshot_data::SnapshotData;
use volna_cluster::raft::{
    BasicNode, Command, Outcome as ReplicaOutcome, Reply, TrimCut, TypeConfig,
};
use volna_cluster::{PartitionId, partition_of};
use volna_proto::{ChannelName, Epoch, Offset};

use super::devices::ClusterDevices;
use super::push::ClusterPush;
use super::snapshot::{Current, SnapshotDir, SnapshotError, export, read_parts, unique_name};
use crate::log::{AppendInput, Log, Outcome, ProducerRef, Replicated, Restore, RestoreScope, Trim};
use crate::push::Notice;
use crate::store::{LogStore, ProducerKey};

type NodeId = u64;
type Error = StorageError<NodeId>;

/// What a partition last applied, stored with what it applied.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct AppliedState {
    last: Option<LogId<NodeId>>,
    membership: StoredMembership<NodeId, BasicNode>,
    /// A restore from this snapshot was begun and not finished: the
    /// partition's channels here are partial until it is run again.
    restoring: Option<Current>,
    /// The partition's time: the latest leader stamp applied (a leader
    /// whose clock is behind cannot move it back). Everything the
    /// partition decides by time (idle producer windows) is judged by it,
    /// so replicas decide alike whatever their own clocks say.
    time_ms: u64,
}

/// The applied state as written before the partition had a time.
#[derive(Deserialize)]
struct AppliedStateV2 {
    last: Option<LogId<NodeId>>,
    membership: StoredMembership<NodeId, BasicNode>,
    restoring: Option<Current>,
}

/// The applied state as written before snapshots existed.
#[derive(Deserialize)]
struct AppliedStateV1 {
    last: Option<LogId<NodeId>>,
    membership: StoredMembership<NodeId, BasicNode>,
}

/// The applied state of a partition never started on this node (what a
/// discarded copy leaves).
pub(super) fn blank_applied_state() -> Vec<u8> {
    AppliedState::default().encode()
}

impl AppliedState {
    fn decode(bytes: &[u8]) -> Result<Self, postcard::Error> {
        postcard::from_bytes(bytes).or_else(|e| {
            // An older layout: the time starts from the next entry's stamp
            // (every replica upgraded from it starts the same way).
            postcard::from_bytes::<AppliedStateV2>(bytes)
                .map(|v2| Self {
                    last: v2.last,
                    membership: v2.membership,
                    restoring: v2.restoring,
                    time_ms: 0,
                })
                .or_else(|_| {
                    postcard::from_bytes::<AppliedStateV1>(bytes).map(|v1| Self {
                        last: v1.last,
                        membership: v1.membership,
                        restoring: None,
                        time_ms: 0,
                    })
                })
                .map_err(|_| e)
        })
    }

    fn encode(&self) -> Vec<u8> {
        postcard::to_allocvec(self).unwrap_or_default()
    }
}

/// Snapshot counters of the node's partitions.
#[derive(Debug, Default)]
pub struct SnapshotStats {
    /// Snapshots taken here (a position recorded: the log before it may
    /// be purged).
    pub built: AtomicU64,
    /// Snapshots exported here and sent whole to a replica.
    pub exported: AtomicU64,
    /// Snapshots received from a leader and installed.
    pub installed: AtomicU64,
    /// Copies of partitions discarded here once their group went on
    /// without this node.
    pub discarded: AtomicU64,
    /// Each partition's snapshot state on this node.
    partitions: Mutex<BTreeMap<u32, Arc<PartitionSnapshots>>>,
}

/// One partition's snapshot state on this node.
#[derive(Debug, Default)]
pub struct PartitionSnapshots {
    /// Bytes of Raft log applied since the last snapshot.
    pub(super) log_since: AtomicU64,
    /// Snapshots of the partition being exported and sent (or waiting for
    /// their first read).
    pub(super) exporting: AtomicU64,
}

impl SnapshotStats {
    /// `partition`'s snapshot state.
    pub(super) fn partition(&self, partition: PartitionId) -> Arc<PartitionSnapshots> {
        let mut partitions = self.partitions.lock().unwrap_or_else(|e| e.into_inner());
        partitions.entry(partition.0).or_default().clone()
    }

    /// The partitions that applied at least `bytes` of log since their
    /// last snapshot and are not being exported. A snapshot taken while a
    /// replica is sent one would let the log after the export's point be
    /// purged before the replica has it: under steady writes it would be
    /// sent a new snapshot, again and again.
    pub fn partitions_due(&self, bytes: u64) -> Vec<PartitionId> {
        let partitions = self.partitions.lock().unwrap_or_else(|e| e.into_inner());
        partitions
            .iter()
            .filter(|(_, p)| {
                p.log_since.load(Ordering::Relaxed) >= bytes
                    && p.exporting.load(Ordering::Relaxed) == 0
            })
            .map(|(partition, _)| PartitionId(*partition))
            .collect()
    }
}

/// What an entry adds to the Raft log, roughly: its payloads and names,
/// and a fixed cost per entry and per change, so that many small entries
/// count too.
fn log_bytes(command: Option<&Command>) -> u64 {
    const PER_ENTRY: u64 = 64;
    const PER_ITEM: u64 = 32;
    let items = match command {
        Some(Command::Append { publishes, .. }) => publishes
            .iter()
            .map(|p| PER_ITEM + p.payload.len() as u64 + p.channel.len() as u64)
            .sum(),
        Some(Command::Devices { changes, .. }) => changes.len() as u64 * PER_ITEM * 2,
        Some(Command::Trim(cuts)) => cuts.len() as u64 * PER_ITEM * 2,
        Some(Command::UnversionedTrim(cuts)) => cuts.len() as u64 * PER_ITEM * 2,
        Some(Command::Delete(names)) => names.iter().map(|n| PER_ITEM + n.len() as u64).sum(),
        Some(Command::Posted { .. }) | None => 0,
    };
    PER_ENTRY + items
}

/// One partition's state machine on this node.
#[derive(Debug, Clone)]
pub struct PartitionMachine {
    partition: PartitionId,
    partitions: u32,
    log: Log,
    store: Arc<dyn LogStore>,
    applied: AppliedState,
    snapshots: SnapshotDir,
    /// The file a snapshot from the leader is being received into.
    receiving: Option<PathBuf>,
    stats: Arc<SnapshotStats>,
    /// Bytes of log applied since the partition's last snapshot (the node
    /// takes one past `cluster.snapshot_log_bytes`), and its exports.
    counters: Arc<PartitionSnapshots>,
    /// The push hooks, told of every message applied to a namespace with
    /// one and of how far the partition's leader posted.
    push: Option<Arc<ClusterPush>>,
    /// The device state of the partition's users (`None`: a machine that
    /// applies device entries as nothing, in tests of channels alone).
    devices: Option<Arc<ClusterDevices>>,
}

impl PartitionMachine {
    /// The machine of `partition` (of `partitions`), resuming from what
    /// `store` says it applied last, with its snapshots under
    /// `snapshot_root`. A restore from a snapshot that a crash interrupted
    /// is run again first.
    pub async fn open(
        partition: PartitionId,
        partitions: u32,
        log: Log,
        store: Arc<dyn LogStore>,
        snapshot_root: &Path,
        stats: Arc<SnapshotStats>,
        push: Option<Arc<ClusterPush>>,
    ) -> Result<Self, SnapshotError> {
        let applied = match store.load_applied(partition.0)? {
            Some(bytes) => AppliedState::decode(&bytes).map_err(|e| {
                SnapshotError::Store(crate::store::StoreError::Engine(format!(
                    "unreadable applied state of partition {}: {e}",
                    partition.0
                )))
            })?,
            None => AppliedState::default(),
        };
        let snapshots = SnapshotDir::open(
            snapshot_root,
            partition,
            applied.restoring.as_ref().map(|r| r.file.as_str()),
        )?;
        // The partition's windows are judged idle by its time from now on,
        // not from its next entry.
        if let Some(clocks) = store.partition_clocks() {
            clocks.advance(partition.0, applied.time_ms);
        }
        let mut machine = Self {
            partition,
            partitions,
            log,
            store,
            applied,
            snapshots,
            receiving: None,
            counters: {
                // A copy discarded and hosted again starts counting anew.
                let counters = stats.partition(partition);
                counters.log_since.store(0, Ordering::Relaxed);
                counters
            },
            stats,
            push,
            devices: None,
        };
        if let Some(current) = machine.applied.restoring.clone() {
            warn!(
                partition = partition.0,
                snapshot = %current.file,
                "a restore from a snapshot was interrupted; running it again"
            );
            machine.restore(current).await?;
        }
        Ok(machine)
    }

    /// The machine, applying device entries to `devices`.
    pub fn with_devices(mut self, devices: Arc<ClusterDevices>) -> Self {
        self.devices = Some(devices);
        self
    }

    /// The partition's channels and producer windows among the node's.
    fn scope(&self) -> RestoreScope {
        partition_scope(self.partition, self.partitions)
    }

    /// Replaces the partition's state here with snapshot `current`'s.
    async fn restore(&mut self, current: Current) -> Result<(), SnapshotError> {
        let path = self.snapshots.path(&current.file).ok_or_else(|| {
            SnapshotError::Malformed(format!("snapshot file name {:?}", current.file))
        })?;
        let started = std::time::Instant::now();
        let marker = AppliedState {
            restoring: Some(current.clone()),
            ..self.applied.clone()
        };
        self.log
            .restore(
                self.partition.0,
                Restore::Begin {
                    scope: self.scope(),
                    marker: marker.encode(),
                },
            )
            .await?;
        self.applied = marker;
        let mut reader = blocking(move || read_parts(&path)).await?;
        loop {
            let (back, part) = blocking(move || {
                let part = reader.next_part();
                Ok((reader, part))
            })
            .await?;
            reader = back;
            match part? {
                Some(step) => {
                    // A peer's file: its device entries must be this
                    // partition's, or they would land in another's range.
                    if let Restore::Part { devices, .. } = &step
                        && let Some((key, _)) = devices.iter().find(|(key, _)| {
                            crate::devices::layout::split_partition(key)
                                .is_none_or(|(p, _)| p != self.partition.0)
                        })
                    {
                        return Err(SnapshotError::Malformed(format!(
                            "a device entry outside partition {}: {key:?}",
                            self.partition.0
                        )));
                    }
                    self.log.restore(self.partition.0, step).await?;
                }
                None => break,
            }
        }
        let counts = reader.counts();
        let time_ms = reader.time_ms();
        let applied = AppliedState {
            last: current.meta.last_log_id,
            membership: current.meta.last_membership.clone(),
            restoring: None,
            time_ms,
        };
        self.log
            .restore(
                self.partition.0,
                Restore::Finish {
                    applied: applied.encode(),
                },
            )
            .await?;
        self.applied = applied;
        // The partition's state is its own now: the file is not needed
        // again (this node exports its own snapshots).
        if let Some(path) = self.snapshots.path(&current.file) {
            // Gigabytes to unlink: off the async workers.
            let dir = self.snapshots.clone();
            let _ = blocking(move || {
                dir.discard(&path);
                Ok(())
            })
            .await;
        }
        if let Some(clocks) = self.store.partition_clocks() {
            clocks.advance(self.partition.0, time_ms);
        }
        info!(
            partition = self.partition.0,
            channels = counts.channels,
            messages = counts.messages,
            producers = counts.producers,
            last = ?current.meta.last_log_id,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "restored the partition from a snapshot"
        );
        Ok(())
    }

    /// The partition's state as it stands now (nothing is being applied)
    /// as a snapshot: its position recorded, its bytes exported from this
    /// point as they are read.
    async fn snapshot_now(&self) -> Snapshot<TypeConfig> {
        let last = self.applied.last;
        let stream = export(
            self.store.clone(),
            self.scope(),
            self.applied.time_ms,
            self.partition,
            self.stats.clone(),
        )
        .await;
        let (term, index) = last.map_or((0, 0), |l| (l.leader_id.term, l.index));
        Snapshot {
            meta: SnapshotMeta {
                last_log_id: last,
                last_membership: self.applied.membership.clone(),
                snapshot_id: unique_name(&format!("p{}-{term}-{index}", self.partition.0)),
            },
            snapshot: Box::new(SnapshotData::Export(stream)),
        }
    }

    fn owner_in_partition(&self, owner: &str) -> Arc<str> {
        Arc::from(format!("{owner}#p{}", self.partition.0))
    }

    /// The writer's entry for a command (`None` fields: nothing to do but
    /// record the applied state).
    fn replicated(
        &mut self,
        command: Option<Command>,
    ) -> (Replicated, Vec<Option<ReplicaOutcome>>) {
        if let Some(Command::Append { now_ms, .. }) = &command {
            self.applied.time_ms = self.applied.time_ms.max(*now_ms);
        }
        let mut entry = Replicated {
            partition: self.partition.0,
            applied: self.applied.encode(),
            now_ms: self.applied.time_ms,
            ..Replicated::default()
        };
        // Inputs that do not even parse are refused here, the same way on
        // every replica; the rest get the writer's outcome (`None`).
        let mut refused = Vec::new();
        match command {
            None => {}
            Some(Command::Append {
                now_ms: _,
                epoch_seed,
                publishes,
            }) => {
                entry.epoch_seed = epoch_seed;
                for publish in publishes {
                    match ChannelName::new(publish.channel) {
                        Ok(channel) => {
                            entry.appends.push(AppendInput {
                                channel,
                                producer: publish.producer.map(|p| ProducerRef {
                                    key: ProducerKey::new(
                                        self.owner_in_partition(&p.owner),
                                        p.producer_id,
                                    ),
                                    sequence: p.sequence,
                                    after: p.after,
                                    limited: p.limited,
                                }),
                                payload: publish.payload,
                            });
                            refused.push(None);
                        }
                        Err(e) => refused.push(Some(ReplicaOutcome::Refused {
                            code: volna_proto::ErrorCode::BadRequest.to_u16(),
                            message: e.to_string(),
                        })),
                    }
                }
            }
            Some(Command::Trim(cuts)) => {
                entry.trims = cuts.into_iter().filter_map(trim_of).collect();
            }
            Some(Command::UnversionedTrim(cuts)) => {
                entry.trims = cuts
                    .into_iter()
                    .map(TrimCut::from)
                    .filter_map(trim_of)
                    .collect();
            }
            // The push hooks' marks change nothing the writer keeps; device
            // changes are decided before (see `apply`).
            Some(Command::Posted { .. } | Command::Devices { .. }) => {}
            Some(Command::Delete(names)) => {
                for name in names {
                    match ChannelName::new(name) {
                        Ok(channel) => {
                            entry.deletes.push(channel);
                            refused.push(None);
                        }
                        Err(_) => refused.push(Some(ReplicaOutcome::Deleted { existed: false })),
                    }
                }
            }
        }
        (entry, refused)
    }
}

/// The publishes of `command` whose namespace has a push hook: their place
/// in the entry, channel, size and producer id.
fn noticed(
    push: &ClusterPush,
    command: Option<&Command>,
) -> Vec<(usize, String, usize, Option<u64>)> {
    let Some(Command::Append { publishes, .. }) = command else {
        return Vec::new();
    };
    publishes
        .iter()
        .enumerate()
        .filter(|(_, publish)| push.hooks(&publish.channel))
        .map(|(k, publish)| {
            (
                k,
                publish.channel.clone(),
                publish.payload.len(),
                publish.producer.as_ref().map(|p| p.producer_id),
            )
        })
        .collect()
}

/// The notices of the `noticed` publishes that were stored (a retry found
/// already stored is not a new message), stamped with the entry's time.
fn notices(
    noticed: Vec<(usize, String, usize, Option<u64>)>,
    outcomes: &[ReplicaOutcome],
    timestamp_ms: u64,
) -> Vec<(u32, Notice)> {
    noticed
        .into_iter()
        .filter_map(|(k, channel, size, producer_id)| match outcomes.get(k) {
            Some(ReplicaOutcome::Stored {
                offset,
                duplicate: false,
                ..
            }) => Some((
                u32::try_from(k).unwrap_or(u32::MAX),
                Notice {
                    channel,
                    offset: *offset,
                    timestamp_ms,
                    size,
                    producer_id,
                },
            )),
            _ => None,
        })
        .collect()
}

/// `partition`'s channels and producer windows among a node's.
pub(super) fn partition_scope(partition: PartitionId, partitions: u32) -> RestoreScope {
    let suffix = format!("#p{}", partition.0);
    RestoreScope {
        channel: Arc::new(move |name: &ChannelName| {
            partition_of(name.as_str(), partitions) == partition
        }),
        producer: Arc::new(move |key: &ProducerKey| key.owner.ends_with(&suffix)),
        devices: Some(crate::devices::layout::partition_range(partition.0)),
    }
}

/// The last entry an applied state (as stored with the partition) says
/// was applied, and the partition's time then.
pub(super) fn applied_position(bytes: &[u8]) -> Option<(Option<LogId<NodeId>>, u64)> {
    AppliedState::decode(bytes)
        .ok()
        .map(|state| (state.last, state.time_ms))
}

/// The log's form of a replicated cut (`None` when its channel name is not
/// one: such a cut was never proposed by a node that validated it).
fn trim_of(cut: TrimCut) -> Option<Trim> {
    Some(Trim {
        channel: ChannelName::new(cut.channel).ok()?,
        from: Offset::new(cut.from),
        epoch: cut.epoch.map(Epoch),
        below: Offset::new(cut.below),
        freed_bytes: cut.freed_bytes,
        oldest_ms: cut.oldest_ms,
    })
}

fn apply_error(log_id: LogId<NodeId>, why: &(impl std::error::Error + 'static)) -> Error {
    StorageIOError::apply(log_id, why).into()
}

impl RaftStateMachine<TypeConfig> for PartitionMachine {
    type SnapshotBuilder = SnapshotBuild;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId<NodeId>>, StoredMembership<NodeId, BasicNode>), Error> {
        Ok((self.applied.last, self.applied.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Reply>, Error>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + Send,
        I::IntoIter: Send,
    {
        let mut replies = Vec::new();
        for entry in entries {
            self.applied.last = Some(entry.log_id);
            let command = match entry.payload {
                EntryPayload::Blank => None,
                EntryPayload::Membership(membership) => {
                    self.applied.membership = StoredMembership::new(Some(entry.log_id), membership);
                    None
                }
                EntryPayload::Normal(command) => Some(command),
            };
            self.counters
                .log_since
                .fetch_add(log_bytes(command.as_ref()), Ordering::Relaxed);
            let is_delete = matches!(command, Some(Command::Delete(_)));
            let noticed = self
                .push
                .as_ref()
                .map(|push| noticed(push, command.as_ref()));
            if let (
                Some(push),
                Some(Command::Posted {
                    namespace,
                    index,
                    notice,
                }),
            ) = (&self.push, &command)
            {
                push.posted(self.partition.0, namespace, (*index, *notice));
            }
            // Device changes are decided from the partition's device state
            // as this entry finds it (the machine is its only writer).
            let mut decided = None;
            if let (Some(devices), Some(Command::Devices { origin, changes })) =
                (&self.devices, &command)
            {
                let d = devices
                    .apply(self.partition, changes)
                    .await
                    .map_err(|e| apply_error(entry.log_id, &e))?;
                decided = Some((*origin, d));
            }
            let (mut replicated, mut pre) = self.replicated(command);
            let mut markers = None;
            if let Some((origin, d)) = decided {
                replicated.devices = d.write;
                pre.extend(d.outcomes.into_iter().map(Some));
                markers = Some((origin, d.markers));
            }
            let outcome = self
                .log
                .apply_replicated(replicated)
                .await
                .map_err(|e| apply_error(entry.log_id, &e))?;
            // Merge the writer's outcomes into the places the parse left
            // open, in order.
            let mut stored = outcome.outcomes.into_iter();
            let mut deleted = outcome.deleted.into_iter();
            let mut reply = Reply::default();
            for slot in pre {
                let outcome = match slot {
                    Some(refused) => refused,
                    None if is_delete => ReplicaOutcome::Deleted {
                        existed: deleted.next().is_some_and(|(_, meta)| meta.is_some()),
                    },
                    None => match stored.next() {
                        Some(Outcome::Stored(appended)) => ReplicaOutcome::Stored {
                            offset: appended.offset.get(),
                            epoch: appended.epoch.0,
                            duplicate: appended.duplicate,
                        },
                        Some(Outcome::Refused(e)) => ReplicaOutcome::Refused {
                            code: e.error_code().to_u16(),
                            message: e.to_string(),
                        },
                        None => ReplicaOutcome::Refused {
                            code: volna_proto::ErrorCode::Internal.to_u16(),
                            message: "the writer returned fewer outcomes than publishes".into(),
                        },
                    },
                };
                reply.outcomes.push(outcome);
            }
            if let (Some(push), Some(noticed)) = (&self.push, noticed)
                && !noticed.is_empty()
            {
                push.applied(
                    self.partition.0,
                    entry.log_id.index,
                    notices(noticed, &reply.outcomes, self.applied.time_ms),
                );
            }
            if let (Some(devices), Some((origin, markers))) = (&self.devices, markers) {
                devices.applied(self.partition, origin, markers);
            }
            replies.push(reply);
        }
        Ok(replies)
    }

    /// Takes a snapshot: records the partition's position now, while no
    /// entry of the partition is being applied, and nothing else. Its bytes
    /// are made only if a replica is sent it ([`export`]): a snapshot costs
    /// the same whatever the partition holds.
    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.counters.log_since.store(0, Ordering::Relaxed);
        SnapshotBuild {
            partition: self.partition,
            // With nothing applied yet, a snapshot of nothing (openraft
            // keeps the one it has): never an error, which would stop the
            // group.
            snapshot: Some(self.snapshot_now().await),
            stats: self.stats.clone(),
        }
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<SnapshotData>, Error> {
        if let Some(abandoned) = self.receiving.take() {
            self.snapshots.discard(&abandoned);
        }
        let part = self.snapshots.new_part();
        let file = tokio::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&part)
            .await
            .map_err(|e| snapshot_error(None, e.into()))?;
        self.receiving = Some(part);
        Ok(Box::new(SnapshotData::File(file)))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, BasicNode>,
        snapshot: Box<SnapshotData>,
    ) -> Result<(), Error> {
        let failed = |e: SnapshotError| snapshot_error(Some(meta), e);
        let SnapshotData::File(file) = *snapshot else {
            return Err(failed(SnapshotError::Malformed(
                "a snapshot to install is received into a file".into(),
            )));
        };
        file.sync_all().await.map_err(|e| failed(e.into()))?;
        drop(file);
        let part = self.receiving.take().ok_or_else(|| {
            failed(SnapshotError::Malformed(
                "a snapshot to install was never received".into(),
            ))
        })?;
        // Check the whole file before touching the partition's state: a
        // damaged snapshot must leave the replica as it was.
        let checked = part.clone();
        let valid = blocking(move || {
            let mut reader = read_parts(&checked)?;
            while reader.next_part()?.is_some() {}
            Ok(reader.counts())
        })
        .await;
        if let Err(e) = valid {
            self.snapshots.discard(&part);
            return Err(failed(e));
        }
        let dir = self.snapshots.clone();
        let file = blocking(move || dir.keep(&part)).await.map_err(failed)?;
        self.restore(Current {
            file,
            meta: meta.clone(),
        })
        .await
        .map_err(failed)?;
        self.stats.installed.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// The partition as it stands now: a replica sent it installs the
    /// latest state, and openraft takes a snapshot newer than the one it
    /// asked for as such.
    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, Error> {
        if self.applied.last.is_none() {
            return Ok(None);
        }
        Ok(Some(self.snapshot_now().await))
    }
}

/// A snapshot taken: the partition's position, with its export ready to
/// run from there.
#[derive(Debug)]
pub struct SnapshotBuild {
    partition: PartitionId,
    snapshot: Option<Snapshot<TypeConfig>>,
    stats: Arc<SnapshotStats>,
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuild {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, Error> {
        let snapshot = self.snapshot.take().ok_or_else(|| {
            snapshot_error(
                None,
                SnapshotError::Malformed("the snapshot was taken already".into()),
            )
        })?;
        self.stats.built.fetch_add(1, Ordering::Relaxed);
        debug!(
            partition = self.partition.0,
            last = ?snapshot.meta.last_log_id,
            "took a partition snapshot"
        );
        Ok(snapshot)
    }
}

/// Runs file and store work on the blocking pool.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, SnapshotError> + Send + 'static,
) -> Result<T, SnapshotError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| SnapshotError::Io(std::io::Error::other(e.to_string())))?
}

fn snapshot_error(meta: Option<&SnapshotMeta<NodeId, BasicNode>>, e: SnapshotError) -> Error {
    let e = std::io::Error::other(e.to_string());
    StorageIOError::write_snapshot(meta.map(|m| m.signature()), &e).into()
}
