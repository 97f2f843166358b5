//! A cluster's in-memory channels (namespaces with `persistent = false`,
//! such as typing indicators): where their publishes go and who keeps
//! them.
//!
//! ```text
//!  device ── publish ──▶ any node ── Kind::Ephemeral (batched) ──▶ leader of p
//!                                                                   │ in-memory log
//!  devices on every other node ◀── upstream (edge.rs) ◀─────────────┘
//! ```
//!
//! - Such a channel lives in the memory of its partition's leader only:
//!   nothing of it goes through Raft, is written or replicated. Every
//!   other node, replica of the partition or not, follows it through an
//!   upstream, as an edge follows a durable channel.
//! - One keeper task per partition takes a node's publishes in the order
//!   sessions submitted them and appends them itself while this node
//!   leads, or hands them to the leader in one call per batch.
//! - What a node kept as leader belongs to the term it was elected in.
//!   Once it is no longer leader in that term (another leads, or it was
//!   elected again) it forgets those channels without a word
//!   ([`Log::forget`]): the next leader starts each channel afresh under a
//!   new epoch, and subscribers everywhere are told `EpochChanged` (the
//!   fan-out engine's rule) instead of reading a mixed or silent feed. A
//!   leader whose lease ran out for a moment keeps them: it neither takes
//!   publishes nor serves meanwhile, and no other was elected.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::debug;
use volna_cluster::raft::Outcome;
use volna_cluster::raft::network::Peers;
use volna_cluster::{PartitionId, partition_of};
use volna_proto::{ChannelName, Epoch, ErrorCode, Offset};

use super::edge::{Edges, EphemeralCall, Unanswered};
use super::router::to_publish;
use crate::log::{
    AppendError, AppendInput, Appended, BoxFuture, ChannelSlice, Log, PendingAppend, ReadRange,
    Replication, Trim,
};
use crate::store::{ChannelMeta, StoreError};

/// Requests queued per partition before `submit` waits.
const QUEUE: usize = 4096;
/// Publishes per batch, at most.
const MAX_BATCH_PUBLISHES: usize = 512;
/// Payload bytes per batch, at most (beyond one large publish).
const MAX_BATCH_BYTES: usize = 1 << 20;
/// How often an idle keeper checks that it still leads in the term its
/// channels belong to: a node elected again in a later term must not serve
/// an earlier term's channels for long.
const SETTLE_EVERY: Duration = Duration::from_millis(100);
/// Times a publish goes round between forwarding and storing here while
/// this node's leadership changes under it.
const ROUNDS: usize = 3;

type AppendReply = oneshot::Sender<Result<Appended, AppendError>>;
type DeleteReply = oneshot::Sender<Result<Option<ChannelMeta>, AppendError>>;

/// Where a request may be served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reach {
    /// Here when this node leads, else on the leader.
    Anywhere,
    /// Here only: another node forwarded it to this one as the leader.
    HereOnly,
}

enum Request {
    Publish {
        input: AppendInput,
        reply: AppendReply,
        reach: Reach,
    },
    Delete {
        channel: ChannelName,
        reply: DeleteReply,
        reach: Reach,
    },
}

/// The [`Replication`] of a cluster node's in-memory log.
pub struct EphemeralRouter {
    partitions: u32,
    queues: Vec<mpsc::Sender<Request>>,
    peers: Arc<Peers>,
    edges: Arc<Edges>,
    log: Log,
}

impl std::fmt::Debug for EphemeralRouter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EphemeralRouter")
            .field("partitions", &self.partitions)
            .finish_non_exhaustive()
    }
}

impl EphemeralRouter {
    /// Starts one keeper per partition over the in-memory `log`; a publish
    /// that finds no leader within `within` fails as
    /// [`ErrorCode::Unavailable`]. Keepers end with `stop`.
    pub fn start(
        partitions: u32,
        peers: Arc<Peers>,
        edges: Arc<Edges>,
        log: Log,
        within: Duration,
        stop: CancellationToken,
    ) -> Arc<Self> {
        let mut queues = Vec::with_capacity(partitions as usize);
        for partition in 0..partitions {
            let (tx, rx) = mpsc::channel(QUEUE);
            queues.push(tx);
            let keeper = Keeper {
                partition: PartitionId(partition),
                log: log.clone(),
                peers: peers.clone(),
                edges: edges.clone(),
                within,
                term: None,
                kept: HashSet::new(),
            };
            tokio::spawn(keeper.run(rx, stop.clone()));
        }
        Arc::new(Self {
            partitions,
            queues,
            peers,
            edges,
            log,
        })
    }

    fn queue(&self, channel: &ChannelName) -> &mpsc::Sender<Request> {
        let partition = partition_of(channel.as_str(), self.partitions);
        &self.queues[partition.0 as usize % self.queues.len()]
    }

    /// Publishes another node forwarded to this one as the leader: stored
    /// here, or refused as [`AppendError::Unavailable`] when this node
    /// does not lead (the sender then looks for the leader elsewhere).
    pub async fn publish_here(
        &self,
        inputs: Vec<AppendInput>,
    ) -> Vec<Result<Appended, AppendError>> {
        let mut waiting = Vec::with_capacity(inputs.len());
        for input in inputs {
            let (reply, rx) = oneshot::channel();
            let queue = self.queue(&input.channel);
            let request = Request::Publish {
                input,
                reply,
                reach: Reach::HereOnly,
            };
            // A send that fails drops `reply`: `rx` then says why.
            let _ = queue.send(request).await;
            waiting.push(rx);
        }
        let mut outcomes = Vec::with_capacity(waiting.len());
        for rx in waiting {
            outcomes.push(rx.await.unwrap_or(Err(AppendError::ShuttingDown)));
        }
        outcomes
    }

    /// A delete another node forwarded to this one as the leader.
    pub async fn delete_here(
        &self,
        channel: ChannelName,
    ) -> Result<Option<ChannelMeta>, AppendError> {
        let (reply, rx) = oneshot::channel();
        self.queue(&channel)
            .send(Request::Delete {
                channel,
                reply,
                reach: Reach::HereOnly,
            })
            .await
            .map_err(|_| AppendError::ShuttingDown)?;
        rx.await.unwrap_or(Err(AppendError::ShuttingDown))
    }

    fn partition_id(&self, channel: &ChannelName) -> PartitionId {
        partition_of(channel.as_str(), self.partitions)
    }
}

impl Replication for EphemeralRouter {
    fn submit(&self, input: AppendInput) -> BoxFuture<'_, Result<PendingAppend, AppendError>> {
        Box::pin(async move {
            let (reply, rx) = oneshot::channel();
            self.queue(&input.channel)
                .send(Request::Publish {
                    input,
                    reply,
                    reach: Reach::Anywhere,
                })
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
            let (reply, rx) = oneshot::channel();
            self.queue(&channel)
                .send(Request::Delete {
                    channel,
                    reply,
                    reach: Reach::Anywhere,
                })
                .await
                .map_err(|_| AppendError::ShuttingDown)?;
            rx.await.unwrap_or(Err(AppendError::ShuttingDown))
        })
    }

    fn partition(&self, channel: &ChannelName) -> u32 {
        self.partition_id(channel).0
    }

    fn leads(&self, channel: &ChannelName) -> bool {
        self.peers.leads(self.partition_id(channel))
    }

    fn trim(&self, trim: Trim) -> bool {
        // Only the leader keeps the channel; a node that stopped leading
        // forgets it whole.
        !self.leads(&trim.channel) || self.log.trim_here(trim)
    }

    fn reads_remotely(&self, channel: &ChannelName) -> bool {
        !self.leads(channel)
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

/// One partition's in-memory channels as this node keeps or forwards them.
struct Keeper {
    partition: PartitionId,
    log: Log,
    peers: Arc<Peers>,
    edges: Arc<Edges>,
    within: Duration,
    /// The term this node was elected in when it last kept channels, and
    /// those channels.
    term: Option<u64>,
    kept: HashSet<ChannelName>,
}

impl Keeper {
    async fn run(mut self, mut rx: mpsc::Receiver<Request>, stop: CancellationToken) {
        let mut settle = tokio::time::interval(SETTLE_EVERY);
        settle.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut carried: Option<Request> = None;
        loop {
            let first = match carried.take() {
                Some(request) => request,
                None => tokio::select! {
                    () = stop.cancelled() => return,
                    _ = settle.tick() => {
                        self.settle().await;
                        continue;
                    }
                    request = rx.recv() => match request {
                        Some(request) => request,
                        None => return,
                    },
                },
            };
            match first {
                Request::Delete {
                    channel,
                    reply,
                    reach,
                } => {
                    let _ = reply.send(self.delete(channel, reach).await);
                }
                Request::Publish {
                    input,
                    reply,
                    reach,
                } => {
                    let mut bytes = input.payload.len();
                    let mut inputs = vec![input];
                    let mut replies = vec![reply];
                    while inputs.len() < MAX_BATCH_PUBLISHES && bytes < MAX_BATCH_BYTES {
                        match rx.try_recv() {
                            Ok(Request::Publish {
                                input,
                                reply,
                                reach: same,
                            }) if same == reach => {
                                bytes += input.payload.len();
                                inputs.push(input);
                                replies.push(reply);
                            }
                            Ok(other) => {
                                carried = Some(other);
                                break;
                            }
                            Err(_) => break,
                        }
                    }
                    let outcomes = self.publish(inputs, reach).await;
                    for (reply, outcome) in replies.into_iter().zip(outcomes) {
                        let _ = reply.send(outcome);
                    }
                }
            }
        }
    }

    /// Forgets the channels kept in another term than the one this node
    /// leads in now (if it leads).
    async fn settle(&mut self) {
        let term = self.peers.term_led(self.partition);
        if self.term == term || (self.kept.is_empty() && term.is_none()) {
            self.term = term;
            return;
        }
        if !self.kept.is_empty() {
            debug!(
                partition = self.partition.0,
                channels = self.kept.len(),
                "no longer leading in the term of these in-memory channels; forgetting them"
            );
        }
        for channel in self.kept.drain() {
            if let Err(e) = self.log.forget(channel).await {
                debug!(error = %e, "in-memory channel not forgotten (the log is closing)");
            }
        }
        self.term = term;
    }

    async fn publish(
        &mut self,
        inputs: Vec<AppendInput>,
        reach: Reach,
    ) -> Vec<Result<Appended, AppendError>> {
        let count = inputs.len();
        let partition = self.partition.0;
        let not_leader =
            || AppendError::Unavailable(format!("this node does not lead partition {partition}"));
        let mut rounds = 0;
        let answer = loop {
            self.settle().await;
            if self.peers.leading_term(self.partition).is_some() {
                self.kept
                    .extend(inputs.iter().map(|input| input.channel.clone()));
                return self.log.submit_batch_here(inputs).await.outcomes().await;
            }
            if reach == Reach::HereOnly {
                return (0..count).map(|_| Err(not_leader())).collect();
            }
            let call = EphemeralCall::Publish(inputs.iter().cloned().map(to_publish).collect());
            match self
                .edges
                .ephemeral(self.partition, &call, self.within)
                .await
            {
                // Elected meanwhile: stored here next round.
                Err(Unanswered::LeadsHere) if rounds + 1 < ROUNDS => rounds += 1,
                answer => break answer,
            }
        };
        match answer {
            Ok(outcomes) if outcomes.len() == count => {
                outcomes.into_iter().map(into_appended).collect()
            }
            Ok(outcomes) => {
                let why = format!(
                    "the leader answered {} publishes with {} outcomes",
                    count,
                    outcomes.len()
                );
                (0..count)
                    .map(|_| {
                        Err(AppendError::Refused {
                            code: ErrorCode::Internal,
                            message: why.clone(),
                        })
                    })
                    .collect()
            }
            Err(e) => {
                let e = AppendError::Unavailable(e.to_string());
                (0..count).map(|_| Err(e.clone())).collect()
            }
        }
    }

    async fn delete(
        &mut self,
        channel: ChannelName,
        reach: Reach,
    ) -> Result<Option<ChannelMeta>, AppendError> {
        self.settle().await;
        if self.peers.leading_term(self.partition).is_some() {
            self.kept.remove(&channel);
            return self.log.delete_here(channel).await;
        }
        if reach == Reach::HereOnly {
            return Err(AppendError::Unavailable(format!(
                "this node does not lead partition {}",
                self.partition.0
            )));
        }
        let call = EphemeralCall::Delete(channel.as_str().to_owned());
        match self
            .edges
            .ephemeral(self.partition, &call, self.within)
            .await
        {
            Ok(outcomes) => Ok(match outcomes.first() {
                Some(Outcome::Deleted { existed: true }) => Some(ChannelMeta::new(0, Epoch(0))),
                _ => None,
            }),
            Err(e) => Err(AppendError::Unavailable(e.to_string())),
        }
    }
}

/// A publish's outcome as the leader answered it.
fn into_appended(outcome: Outcome) -> Result<Appended, AppendError> {
    match outcome {
        Outcome::Stored {
            offset,
            epoch,
            duplicate,
        } => Ok(Appended {
            offset: Offset::new(offset),
            epoch: Epoch(epoch),
            duplicate,
        }),
        Outcome::Refused { code, message } => Err(AppendError::Refused {
            code: ErrorCode::from_u16(code),
            message,
        }),
        Outcome::Deleted { .. } | Outcome::Applied => Err(AppendError::Refused {
            code: ErrorCode::Internal,
            message: "the leader answered a publish with another call's outcome".into(),
        }),
    }
}

/// A publish's outcome as the leader answers it.
pub(super) fn outcome_of(result: Result<Appended, AppendError>) -> Outcome {
    match result {
        Ok(appended) => Outcome::Stored {
            offset: appended.offset.get(),
            epoch: appended.epoch.0,
            duplicate: appended.duplicate,
        },
        Err(e) => Outcome::Refused {
            code: e.error_code().to_u16(),
            message: e.to_string(),
        },
    }
}
