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
//! Log compaction by snapshot is not built yet: groups run with
//! `SnapshotPolicy::Never`, so the leader never purges entries a replica may
//! still need and a new replica catches up by replaying the log.
//!
//! [`Sequencer`]: crate::log::Sequencer

use std::io::Cursor;
use std::sync::Arc;

use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{
    Entry, EntryPayload, LogId, RaftSnapshotBuilder, SnapshotMeta, StorageError, StorageIOError,
    StoredMembership,
};
use serde::{Deserialize, Serialize};
use volna_cluster::PartitionId;
use volna_cluster::raft::{BasicNode, Command, Outcome as ReplicaOutcome, Reply, TypeConfig};
use volna_proto::{ChannelName, Offset};

use crate::log::{AppendInput, Log, Outcome, ProducerRef, Replicated, Trim};
use crate::store::{LogStore, ProducerKey};

type NodeId = u64;
type Error = StorageError<NodeId>;

/// What a partition last applied, stored with what it applied.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct AppliedState {
    last: Option<LogId<NodeId>>,
    membership: StoredMembership<NodeId, BasicNode>,
}

/// One partition's state machine on this node.
#[derive(Debug, Clone)]
pub struct PartitionMachine {
    partition: PartitionId,
    log: Log,
    applied: AppliedState,
}

impl PartitionMachine {
    /// The machine of `partition`, resuming from what `store` says it
    /// applied last.
    pub fn open(
        partition: PartitionId,
        log: Log,
        store: &dyn LogStore,
    ) -> Result<Self, crate::store::StoreError> {
        let applied = match store.load_applied(partition.0)? {
            Some(bytes) => postcard::from_bytes(&bytes).map_err(|e| {
                crate::store::StoreError::Engine(format!(
                    "unreadable applied state of partition {}: {e}",
                    partition.0
                ))
            })?,
            None => AppliedState::default(),
        };
        Ok(Self {
            partition,
            log,
            applied,
        })
    }

    fn owner_in_partition(&self, owner: &str) -> Arc<str> {
        Arc::from(format!("{owner}#p{}", self.partition.0))
    }

    /// The writer's entry for a command (`None` fields: nothing to do but
    /// record the applied state).
    fn replicated(&self, command: Option<Command>) -> (Replicated, Vec<Option<ReplicaOutcome>>) {
        let mut entry = Replicated {
            partition: self.partition.0,
            applied: postcard::to_allocvec(&self.applied).unwrap_or_default(),
            ..Replicated::default()
        };
        // Inputs that do not even parse are refused here, the same way on
        // every replica; the rest get the writer's outcome (`None`).
        let mut refused = Vec::new();
        match command {
            None => {}
            Some(Command::Append {
                now_ms,
                epoch_seed,
                publishes,
            }) => {
                entry.now_ms = now_ms;
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
                entry.trims = cuts
                    .into_iter()
                    .filter_map(|cut| {
                        Some(Trim {
                            channel: ChannelName::new(cut.channel).ok()?,
                            from: Offset::new(cut.from),
                            below: Offset::new(cut.below),
                            freed_bytes: cut.freed_bytes,
                            oldest_ms: cut.oldest_ms,
                        })
                    })
                    .collect();
            }
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

fn apply_error(log_id: LogId<NodeId>, why: &(impl std::error::Error + 'static)) -> Error {
    StorageIOError::apply(log_id, why).into()
}

impl RaftStateMachine<TypeConfig> for PartitionMachine {
    type SnapshotBuilder = Self;

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
            let is_delete = matches!(command, Some(Command::Delete(_)));
            let (replicated, pre) = self.replicated(command);
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
            replies.push(reply);
        }
        Ok(replies)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, Error> {
        Err(no_snapshots())
    }

    async fn install_snapshot(
        &mut self,
        _meta: &SnapshotMeta<NodeId, BasicNode>,
        _snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), Error> {
        Err(no_snapshots())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, Error> {
        Ok(None)
    }
}

impl RaftSnapshotBuilder<TypeConfig> for PartitionMachine {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, Error> {
        Err(no_snapshots())
    }
}

/// Groups run with `SnapshotPolicy::Never`; a snapshot asked for anyway is
/// refused, typed, rather than faked.
fn no_snapshots() -> Error {
    StorageIOError::read_snapshot(
        None,
        &std::io::Error::new(
            std::io::ErrorKind::Unsupported,
            "partition snapshots are not supported: replicas catch up from the log",
        ),
    )
    .into()
}
