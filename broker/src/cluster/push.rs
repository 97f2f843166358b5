//! The push hook on a cluster node: each committed message is posted once,
//! by the leader of its channel's partition, and a new leader goes on
//! where the old one stopped.
//!
//! ```text
//!  every replica: apply entry i ──▶ backlog of (i, k, notice), per namespace and partition
//!  leader of p:   poster ── POST batch ──▶ webhook ── 2xx ──▶ propose Posted { i, k } to p
//!  every replica: apply Posted ──▶ drop (i, k) and before from p's backlog
//! ```
//!
//! - Every replica builds the notices of what it applies (it knows the
//!   offsets only then) and keeps them, in apply order, in a bounded
//!   backlog; only the partition's leader posts them.
//! - After the receiver took a batch, the leader replicates how far it
//!   posted (`Command::Posted`) and waits for that to commit before it
//!   posts the next batch. A new leader posts its backlog from the last
//!   committed mark on: it repeats at most the one batch whose mark had
//!   not committed, and each notice names its channel and offset, so the
//!   receiver can drop what it has seen.
//! - Bounded like the single-node hook: a namespace's backlogs hold at
//!   most `push.queue` notices on each node; beyond, the oldest of the
//!   partition holding the most are dropped and counted
//!   (`volna_push_notices_dropped_total`), so one partition whose marks
//!   cannot commit (a replica not upgraded yet) does not push out the
//!   others' notices. The leader posts the partitions it leads in turn,
//!   and a partition whose mark did not commit posts nothing more until
//!   it does (the bound on repeats). A replica that
//!   installed a snapshot, or restarted, holds no notices of what it did
//!   not apply since: should it lead before the old leader posted those,
//!   they are not posted (the hook wakes devices; it is not their log).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use tracing::{debug, info};
use volna_cluster::PartitionId;
use volna_cluster::raft::network::Peers;
use volna_cluster::raft::{Command, PUSH_MARKS};

use super::router::ClusterView;
use crate::config::{NamespaceConfig, PushConfig};
use crate::metrics::Metrics;
use crate::push::{Notice, NoticeSource, spawn_poster};

/// Where a notice stands in its partition: its entry's Raft log index and
/// its publish's place in the entry.
type Mark = (u64, u32);

/// One partition's notices of one namespace, in apply order.
#[derive(Debug, Default)]
struct PartitionBacklog {
    notices: VecDeque<(Mark, Notice)>,
    /// Posted up to here, as the partition last committed.
    posted: Option<Mark>,
    /// Posted up to here by this node (maybe not committed yet).
    sent: Option<Mark>,
}

impl PartitionBacklog {
    /// Drops the notices up to `mark`.
    fn drop_through(&mut self, mark: Mark) -> usize {
        let before = self.notices.len();
        while self.notices.front().is_some_and(|(m, _)| *m <= mark) {
            self.notices.pop_front();
        }
        before - self.notices.len()
    }
}

impl PartitionBacklog {
    /// Where the next notice to post comes after.
    fn after(&self) -> Option<Mark> {
        self.posted.max(self.sent)
    }
}

/// One namespace's backlogs on this node.
#[derive(Debug)]
struct Backlog {
    partitions: Mutex<BTreeMap<u32, PartitionBacklog>>,
    held: AtomicUsize,
    cap: usize,
}

impl Backlog {
    fn lock(&self) -> MutexGuard<'_, BTreeMap<u32, PartitionBacklog>> {
        self.partitions.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// One namespace's hook.
#[derive(Debug)]
struct Hook {
    config: PushConfig,
    backlog: Arc<Backlog>,
}

/// Every namespace's hook on this node.
#[derive(Debug)]
pub struct ClusterPush {
    hooks: HashMap<String, Hook>,
    metrics: Arc<Metrics>,
    stop: Arc<AtomicBool>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl ClusterPush {
    /// The hooks of `namespaces`; `None` when no namespace has one.
    pub fn new<'a>(
        namespaces: impl IntoIterator<Item = (&'a String, &'a NamespaceConfig)>,
        metrics: Arc<Metrics>,
    ) -> Option<Arc<Self>> {
        let hooks: HashMap<String, Hook> = namespaces
            .into_iter()
            .filter_map(|(namespace, config)| {
                let push = config.push.clone()?;
                let backlog = Arc::new(Backlog {
                    partitions: Mutex::new(BTreeMap::new()),
                    held: AtomicUsize::new(0),
                    cap: push.queue.max(1),
                });
                Some((
                    namespace.clone(),
                    Hook {
                        config: push,
                        backlog,
                    },
                ))
            })
            .collect();
        (!hooks.is_empty()).then(|| {
            Arc::new(Self {
                hooks,
                metrics,
                stop: Arc::new(AtomicBool::new(false)),
                threads: Mutex::new(Vec::new()),
            })
        })
    }

    /// Whether `channel`'s namespace has a hook.
    pub fn hooks(&self, channel: &str) -> bool {
        self.hooks.contains_key(namespace_of(channel))
    }

    /// The notices of entry `index` of `partition`, as this replica applied
    /// it: `(k, notice)`, `k` the publish's place in the entry.
    pub fn applied(&self, partition: u32, index: u64, notices: Vec<(u32, Notice)>) {
        for (k, notice) in notices {
            let Some(hook) = self.hooks.get(namespace_of(&notice.channel)) else {
                continue;
            };
            let backlog = &hook.backlog;
            let mut partitions = backlog.lock();
            partitions
                .entry(partition)
                .or_default()
                .notices
                .push_back(((index, k), notice));
            if backlog.held.fetch_add(1, Ordering::Relaxed) + 1 > backlog.cap
                && let Some(largest) = partitions.values_mut().max_by_key(|b| b.notices.len())
                && largest.notices.pop_front().is_some()
            {
                backlog.held.fetch_sub(1, Ordering::Relaxed);
                self.metrics.push_notices_dropped.inc();
            }
        }
    }

    /// `partition` committed that `namespace`'s hook posted up to `mark`.
    pub fn posted(&self, partition: u32, namespace: &str, mark: Mark) {
        let Some(hook) = self.hooks.get(namespace) else {
            return;
        };
        let mut partitions = hook.backlog.lock();
        let held = partitions.entry(partition).or_default();
        held.posted = held.posted.max(Some(mark));
        let dropped = held.drop_through(mark);
        hook.backlog.held.fetch_sub(dropped, Ordering::Relaxed);
    }

    /// Starts a poster per namespace, posting the backlogs of the
    /// partitions this node leads; a mark waits at most `within` to
    /// commit.
    pub fn start(
        &self,
        peers: Arc<Peers>,
        view: Arc<ClusterView>,
        within: Duration,
        runtime: tokio::runtime::Handle,
    ) -> std::io::Result<()> {
        let mut threads = self.threads.lock().unwrap_or_else(|e| e.into_inner());
        for (namespace, hook) in &self.hooks {
            let source = LeaderSource {
                namespace: namespace.clone(),
                backlog: hook.backlog.clone(),
                peers: peers.clone(),
                view: view.clone(),
                within,
                runtime: runtime.clone(),
                taken: BTreeMap::new(),
                unmarked: BTreeMap::new(),
                next: 0,
            };
            threads.push(spawn_poster(
                namespace,
                hook.config.clone(),
                source,
                self.metrics.clone(),
                self.stop.clone(),
            )?);
            info!(namespace, url = %hook.config.webhook_url, "push hook on (posted by each partition's leader)");
        }
        Ok(())
    }

    /// Stops the posters.
    pub fn shutdown(&self) {
        self.stop.store(true, Ordering::SeqCst);
        let threads = std::mem::take(&mut *self.threads.lock().unwrap_or_else(|e| e.into_inner()));
        for thread in threads {
            let _ = thread.join();
        }
    }
}

/// The namespace of a channel name as a notice holds it.
fn namespace_of(channel: &str) -> &str {
    channel.split('.').next().unwrap_or(channel)
}

/// What a node's poster posts: the backlogs of the partitions it leads.
struct LeaderSource {
    namespace: String,
    backlog: Arc<Backlog>,
    peers: Arc<Peers>,
    view: Arc<ClusterView>,
    within: Duration,
    runtime: tokio::runtime::Handle,
    /// How far the batch being posted reaches, per partition.
    taken: BTreeMap<u32, Mark>,
    /// Posted, but the mark saying so did not commit: these partitions
    /// post nothing more until it does.
    unmarked: BTreeMap<u32, Mark>,
    /// The partition the next batch starts with (each gets its turn).
    next: u32,
}

impl LeaderSource {
    /// Replicates how far `marks` say this node posted, all partitions at
    /// once; keeps those that did not commit in `unmarked`.
    fn mark(&mut self, marks: BTreeMap<u32, Mark>) {
        let mut proposals = Vec::new();
        for (partition, mark) in marks {
            let id = PartitionId(partition);
            if !self.view.reads_log_format(id, PUSH_MARKS) {
                // Replicas not yet upgraded cannot decode the mark: this
                // node keeps what it posted no longer (a new leader posts
                // it again).
                let mut partitions = self.backlog.lock();
                if let Some(held) = partitions.get_mut(&partition) {
                    let dropped = held.drop_through(mark);
                    self.backlog.held.fetch_sub(dropped, Ordering::Relaxed);
                }
                continue;
            }
            let command = Command::Posted {
                namespace: self.namespace.clone(),
                index: mark.0,
                notice: mark.1,
            };
            let replicas = self.view.replicas(id);
            let peers = self.peers.clone();
            let within = self.within;
            proposals.push(async move {
                let committed = peers.propose(id, &command, &replicas, within).await;
                (partition, mark, committed)
            });
        }
        if proposals.is_empty() {
            return;
        }
        let results = self
            .runtime
            .block_on(futures_util::future::join_all(proposals));
        for (partition, mark, committed) in results {
            match committed {
                Ok(_) => {
                    self.unmarked.remove(&partition);
                }
                Err(e) => {
                    debug!(partition, namespace = %self.namespace, error = %e, "push mark not committed; the partition posts nothing more until it is");
                    self.unmarked.insert(partition, mark);
                }
            }
        }
    }
}

impl NoticeSource for LeaderSource {
    fn fill(&mut self, batch: &mut Vec<Notice>, max: usize) {
        // Marks that did not commit are tried again first; a partition
        // this node no longer leads is its new leader's to post.
        let pending: BTreeMap<u32, Mark> = std::mem::take(&mut self.unmarked)
            .into_iter()
            .filter(|(partition, _)| self.peers.leads(PartitionId(*partition)))
            .collect();
        if !pending.is_empty() {
            self.mark(pending);
        }
        let partitions = self.backlog.lock();
        let order: Vec<u32> = partitions
            .range(self.next..)
            .chain(partitions.range(..self.next))
            .map(|(partition, _)| *partition)
            .collect();
        for partition in order {
            if batch.len() >= max {
                self.next = partition;
                return;
            }
            if self.unmarked.contains_key(&partition) || !self.peers.leads(PartitionId(partition)) {
                continue;
            }
            let Some(held) = partitions.get(&partition) else {
                continue;
            };
            let after = held.after().max(self.taken.get(&partition).copied());
            let start = after.map_or(0, |after| {
                held.notices.partition_point(|(m, _)| *m <= after)
            });
            for (mark, notice) in held.notices.range(start..) {
                if batch.len() >= max {
                    break;
                }
                batch.push(notice.clone());
                self.taken.insert(partition, *mark);
            }
        }
        self.next = 0;
    }

    fn posted(&mut self) {
        let taken = std::mem::take(&mut self.taken);
        {
            let mut partitions = self.backlog.lock();
            for (partition, mark) in &taken {
                let held = partitions.entry(*partition).or_default();
                held.sent = held.sent.max(Some(*mark));
            }
        }
        self.mark(taken);
    }

    fn is_empty(&self) -> bool {
        let partitions = self.backlog.lock();
        partitions.iter().all(|(partition, held)| {
            let after = held.after();
            self.unmarked.contains_key(partition)
                || !self.peers.leads(PartitionId(*partition))
                || held
                    .notices
                    .back()
                    .is_none_or(|(mark, _)| after.is_some_and(|after| *mark <= after))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn notice(offset: u64) -> Notice {
        Notice {
            channel: "chat.1".into(),
            offset,
            timestamp_ms: 0,
            size: 1,
            producer_id: None,
        }
    }

    fn hooks(queue: usize) -> Arc<ClusterPush> {
        let config = NamespaceConfig {
            push: Some(PushConfig {
                webhook_url: "http://127.0.0.1:9/push".into(),
                queue,
                ..PushConfig::default()
            }),
            ..NamespaceConfig::default()
        };
        let namespaces = BTreeMap::from([("chat".to_owned(), config)]);
        ClusterPush::new(&namespaces, Arc::new(Metrics::new())).expect("a hook")
    }

    fn held(push: &ClusterPush, partition: u32) -> Vec<u64> {
        push.hooks["chat"]
            .backlog
            .lock()
            .get(&partition)
            .map(|b| b.notices.iter().map(|(_, n)| n.offset).collect())
            .unwrap_or_default()
    }

    /// Every replica keeps what it applied until the partition commits
    /// that it was posted, and no more than the hook's queue.
    #[test]
    fn a_committed_mark_drops_what_was_posted_and_the_backlog_stays_bounded() {
        let push = hooks(4);
        push.applied(0, 7, vec![(0, notice(1)), (1, notice(2))]);
        push.applied(0, 8, vec![(0, notice(3))]);
        push.applied(1, 3, vec![(0, notice(1))]);
        push.posted(0, "chat", (7, 0));
        assert_eq!(held(&push, 0), [2, 3]);
        assert_eq!(held(&push, 1), [1]);
        push.posted(0, "other", (8, 0));
        assert_eq!(held(&push, 0), [2, 3], "another namespace's mark");
        // Two more than the queue holds: the oldest go.
        push.applied(0, 9, vec![(0, notice(4)), (1, notice(5)), (2, notice(6))]);
        assert_eq!(held(&push, 0), [4, 5, 6]);
        assert_eq!(push.hooks["chat"].backlog.held.load(Ordering::Relaxed), 4);
        push.posted(0, "chat", (9, 2));
        assert!(held(&push, 0).is_empty());
        assert_eq!(push.hooks["chat"].backlog.held.load(Ordering::Relaxed), 1);
    }
}
