//! Replicas of a partition: two nodes' log writers applying the same
//! committed entries (as their partition's Raft groups hand them over)
//! store the same offsets and epochs, deduplicate the same retries, and
//! resume after a restart from the applied state they stored.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use bytes::Bytes;
use volna_broker::config::{Durability, EngineConfig};
use volna_broker::fanout::Fanout;
use volna_broker::log::{self, AppendInput, LogThreads, Outcome, ProducerRef, Replicated};
use volna_broker::metrics::Metrics;
use volna_broker::store::{LogStore, MemoryStore, ProducerKey};
use volna_client::ChannelName;

fn replica(store: Arc<dyn LogStore>) -> LogThreads {
    log::start_replicated(
        store,
        Arc::new(Fanout::new(64 * 1024)),
        Durability::Wal,
        &EngineConfig::default(),
        Arc::new(Metrics::new()),
    )
    .unwrap()
}

fn publish(channel: &str, producer: Option<(u64, u64)>, body: &str) -> AppendInput {
    AppendInput {
        channel: ChannelName::new(channel).unwrap(),
        producer: producer.map(|(id, sequence)| ProducerRef {
            key: ProducerKey::new(Arc::from("alice#p3"), id),
            sequence,
            after: None,
            limited: true,
        }),
        payload: Bytes::from(body.to_owned()),
    }
}

/// The committed entries of one partition, in log order.
fn entries() -> Vec<Replicated> {
    let entry = |index: u8, now_ms: u64, seed: u64, appends: Vec<AppendInput>| Replicated {
        partition: 3,
        applied: vec![index],
        now_ms,
        epoch_seed: seed,
        appends,
        ..Replicated::default()
    };
    vec![
        entry(
            1,
            1_000,
            0xfeed,
            vec![
                publish("chat.1", Some((7, 1)), "a"),
                publish("chat.2", None, "b"),
                publish("chat.1", Some((7, 2)), "c"),
            ],
        ),
        // A retry of (7, 2) after a failover, in a later entry.
        entry(2, 2_000, 0xbeef, vec![publish("chat.1", Some((7, 2)), "c")]),
        entry(3, 3_000, 0xcafe, vec![publish("chat.3", None, "d")]),
        Replicated {
            deletes: vec![ChannelName::new("chat.2").unwrap()],
            ..entry(4, 4_000, 0xd00d, Vec::new())
        },
        // chat.2 created anew: a new epoch, from this entry's seed.
        entry(5, 5_000, 0xf00d, vec![publish("chat.2", None, "e")]),
    ]
}

async fn apply_all(threads: &LogThreads) -> Vec<Vec<Outcome>> {
    let mut outcomes = Vec::new();
    for entry in entries() {
        outcomes.push(
            threads
                .log()
                .apply_replicated(entry)
                .await
                .unwrap()
                .outcomes,
        );
    }
    outcomes
}

#[tokio::test]
async fn replicas_applying_the_same_entries_store_the_same_offsets_and_epochs() {
    let (store_a, store_b) = (Arc::new(MemoryStore::new()), Arc::new(MemoryStore::new()));
    let (a, b) = (replica(store_a.clone()), replica(store_b.clone()));
    let outcomes_a = apply_all(&a).await;
    let outcomes_b = apply_all(&b).await;
    assert_eq!(outcomes_a, outcomes_b);

    let stored = |outcome: &Outcome| match outcome {
        Outcome::Stored(appended) => (appended.offset.get(), appended.duplicate),
        Outcome::Refused(e) => panic!("refused: {e}"),
    };
    // chat.1 got 1 and 2; the retry of (7, 2) is the stored 2, not a 3.
    assert_eq!(stored(&outcomes_a[0][0]), (1, false));
    assert_eq!(stored(&outcomes_a[0][2]), (2, false));
    assert_eq!(stored(&outcomes_a[1][0]), (2, true));

    for name in ["chat.1", "chat.2", "chat.3"] {
        let name = ChannelName::new(name).unwrap();
        let (meta_a, meta_b) = (
            a.log().lookup(&name).await.unwrap().unwrap(),
            b.log().lookup(&name).await.unwrap().unwrap(),
        );
        assert_eq!(meta_a.epoch, meta_b.epoch, "{name}");
        assert_eq!(meta_a.next_offset, meta_b.next_offset, "{name}");
        assert_eq!(meta_a.oldest_ms, meta_b.oldest_ms, "{name}");
    }
    // The applied state went down with the last entry's changes.
    assert_eq!(store_a.load_applied(3).unwrap(), Some(vec![5]));
    assert_eq!(store_b.load_applied(3).unwrap(), Some(vec![5]));
    a.shutdown();
    b.shutdown();
}

fn replica_with(store: Arc<dyn LogStore>, engine: &EngineConfig) -> LogThreads {
    log::start_replicated(
        store,
        Arc::new(Fanout::new(64 * 1024)),
        Durability::Wal,
        engine,
        Arc::new(Metrics::new()),
    )
    .unwrap()
}

/// Everything a partition decides is a function of its entries: two
/// replicas with different caches (one holds a single producer window in
/// memory, the other thousands), both on clocks far from the entries'
/// times, decide every publish alike and end with identical state.
#[tokio::test]
async fn replicas_with_different_clocks_and_caches_decide_alike() {
    let idle_secs = 10;
    let engine = |max_resident_producers| EngineConfig {
        producer_idle_secs: idle_secs,
        max_resident_producers,
        max_producers_per_user: 2,
        ..EngineConfig::default()
    };
    let (store_a, store_b) = (Arc::new(MemoryStore::new()), Arc::new(MemoryStore::new()));
    let a = replica_with(store_a.clone(), &engine(1));
    let b = replica_with(store_b.clone(), &engine(10_000));
    let by = |owner: &str, id: u64, sequence: u64, body: &str| AppendInput {
        channel: ChannelName::new("chat.same").unwrap(),
        producer: Some(ProducerRef {
            key: ProducerKey::new(Arc::from(owner), id),
            sequence,
            after: None,
            limited: true,
        }),
        payload: Bytes::from(body.to_owned()),
    };
    // Entry times are the leader's; neither replica's clock is near them.
    let t0 = 1_000_000u64;
    let idle_ms = idle_secs * 1000;
    let entry = |index: u8, now_ms: u64, appends: Vec<AppendInput>| Replicated {
        partition: 3,
        applied: vec![index],
        now_ms,
        epoch_seed: u64::from(index),
        appends,
        ..Replicated::default()
    };
    let entries = vec![
        entry(1, t0, vec![by("bob#p3", 1, 1, "b1")]),
        entry(2, t0 + 1, vec![by("bob#p3", 2, 1, "b2")]),
        // A retry within the window: a duplicate on both.
        entry(3, t0 + 2, vec![by("bob#p3", 1, 1, "b1")]),
        // Bob's third producer: beyond his limit of 2, his least recently
        // used window (producer 1) is evicted, on both.
        entry(4, t0 + 3, vec![by("bob#p3", 3, 1, "b3")]),
        // Producer 1 again: evicted, so its sequence 1 is new again.
        entry(5, t0 + 4, vec![by("bob#p3", 1, 1, "b1 again")]),
        // Past the idle horizon by the entries' time: producer 2's window
        // is gone on both, whatever each node's clock or sweep says.
        entry(
            6,
            t0 + 4 + idle_ms + 1,
            vec![by("bob#p3", 2, 1, "b2 again")],
        ),
        entry(7, t0 + 5 + idle_ms + 1, vec![by("carol#p3", 9, 1, "c1")]),
    ];
    let mut decided = (Vec::new(), Vec::new());
    for entry in entries {
        decided.0.push(
            a.log()
                .apply_replicated(entry.clone())
                .await
                .unwrap()
                .outcomes,
        );
        // Let replica A's writer sweep between entries (its cache holds
        // one window: the others leave memory, not the store).
        tokio::time::sleep(std::time::Duration::from_millis(60)).await;
        decided
            .1
            .push(b.log().apply_replicated(entry).await.unwrap().outcomes);
    }
    assert_eq!(decided.0, decided.1, "the replicas decided differently");
    let offsets: Vec<(u64, bool)> = decided
        .0
        .iter()
        .map(|outcomes| match &outcomes[0] {
            Outcome::Stored(appended) => (appended.offset.get(), appended.duplicate),
            Outcome::Refused(e) => panic!("refused: {e}"),
        })
        .collect();
    assert_eq!(
        offsets,
        [
            (1, false),
            (2, false),
            (1, true),
            (3, false),
            (4, false),
            (5, false),
            (6, false)
        ]
    );
    let scope = || log::RestoreScope {
        channel: Arc::new(|_: &ChannelName| true),
        producer: Arc::new(|key: &ProducerKey| key.owner.ends_with("#p3")),
        devices: None,
    };
    let (digest_a, digest_b) = (
        a.log().partition_digest(3, scope()).await.unwrap(),
        b.log().partition_digest(3, scope()).await.unwrap(),
    );
    assert_eq!(digest_a.applied, Some(vec![7]));
    assert_eq!(
        digest_a.state, digest_b.state,
        "the replicas hold different state"
    );
    assert_eq!(digest_a.state.messages, 6);
    a.shutdown();
    b.shutdown();
}

#[tokio::test]
async fn a_replica_restarted_without_a_clean_stop_keeps_its_epochs() {
    let store = Arc::new(MemoryStore::new());
    let first = replica(store.clone());
    apply_all(&first).await;
    let chat = ChannelName::new("chat.1").unwrap();
    let before = first.log().lookup(&chat).await.unwrap().unwrap();
    // No clean-stop mark: as after `kill -9`.
    drop(first);
    let again = replica(store.clone());
    let after = again.log().lookup(&chat).await.unwrap().unwrap();
    // A single node would move the channel to a new epoch here (its tail
    // may be lost); a replica must keep the epoch every other replica has.
    assert_eq!(after.epoch, before.epoch);
    assert_eq!(after.next_offset, before.next_offset);
    again.shutdown();
}

/// Snapshots: a partition's state built on one replica and installed on
/// another, through the state machine openraft drives.
/// What a replica that is behind its partition tells a subscribing device
/// (issue 27 E): never what the leader would not.
mod catch_up {
    use std::sync::atomic::{AtomicU64, Ordering};

    use volna_broker::log::{
        AppendError, BoxFuture, ChannelSlice, Log, PendingAppend, ReadRange, Replication, Restore,
        RestoreScope, Trim,
    };
    use volna_broker::store::{ChannelMeta, StoreError};
    use volna_client::Offset;

    use super::*;

    /// The partition's leader as a replica sees it: another replica's log,
    /// which applied more. Counts what it is asked.
    #[derive(Debug)]
    struct Leader {
        log: Log,
        asked: AtomicU64,
    }

    impl Leader {
        fn asked(&self) -> u64 {
            self.asked.load(Ordering::SeqCst)
        }
    }

    impl Replication for Leader {
        fn submit(&self, _: AppendInput) -> BoxFuture<'_, Result<PendingAppend, AppendError>> {
            Box::pin(async { Err(AppendError::ShuttingDown) })
        }

        fn delete(
            &self,
            _: ChannelName,
        ) -> BoxFuture<'_, Result<Option<ChannelMeta>, AppendError>> {
            Box::pin(async { Err(AppendError::ShuttingDown) })
        }

        fn partition(&self, _: &ChannelName) -> u32 {
            3
        }

        fn leads(&self, _: &ChannelName) -> bool {
            false
        }

        fn trim(&self, _: Trim) -> bool {
            true
        }

        fn reads_remotely(&self, _: &ChannelName) -> bool {
            false
        }

        fn remote_lookup(
            &self,
            channel: ChannelName,
        ) -> BoxFuture<'_, Result<Option<ChannelMeta>, StoreError>> {
            self.asked.fetch_add(1, Ordering::SeqCst);
            Box::pin(async move { self.log.lookup(&channel).await })
        }

        fn remote_read(
            &self,
            channel: ChannelName,
            range: ReadRange,
        ) -> BoxFuture<'_, Result<Option<ChannelSlice>, StoreError>> {
            self.asked.fetch_add(1, Ordering::SeqCst);
            Box::pin(async move { self.log.read_channel(&channel, range).await })
        }
    }

    fn name(channel: &str) -> ChannelName {
        ChannelName::new(channel).unwrap()
    }

    /// A replica with `applied` of the partition's entries, reading
    /// through a leader that applied them all.
    async fn behind_by(applied: usize) -> (LogThreads, LogThreads, Arc<Leader>) {
        let leader = replica(Arc::new(MemoryStore::new()));
        apply_all(&leader).await;
        let behind = replica(Arc::new(MemoryStore::new()));
        for entry in entries().into_iter().take(applied) {
            behind.log().apply_replicated(entry).await.unwrap();
        }
        let source = Arc::new(Leader {
            log: leader.log().clone(),
            asked: AtomicU64::new(0),
        });
        behind.log().replicate_through(source.clone());
        (leader, behind, source)
    }

    #[tokio::test]
    async fn a_replica_behind_starts_a_doubtful_subscribe_from_its_leaders_view() {
        let (leader, behind, source) = behind_by(1).await;
        // chat.3 is not applied here yet: the leader knows it.
        let chat3 = name("chat.3");
        assert!(behind.log().lookup(&chat3).await.unwrap().is_none());
        let meta = behind
            .log()
            .lookup_to_subscribe(&chat3, |m| m.is_none())
            .await
            .unwrap()
            .expect("the leader's view");
        let led = leader.log().lookup(&chat3).await.unwrap().unwrap();
        assert_eq!((meta.epoch, meta.next_offset), (led.epoch, led.next_offset));
        assert_eq!(behind.log().replica_corrections(), 1);
        // chat.2 here is the incarnation the leader deleted and created
        // anew: a device of the new one would be told of a reset.
        let chat2 = name("chat.2");
        let new = leader.log().lookup(&chat2).await.unwrap().unwrap();
        let here = behind.log().lookup(&chat2).await.unwrap().unwrap();
        assert_ne!(here.epoch, new.epoch);
        let meta = behind
            .log()
            .lookup_to_subscribe(&chat2, |m| m.is_none_or(|m| m.epoch != new.epoch))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(meta.epoch, new.epoch);
        assert_eq!(behind.log().replica_corrections(), 2);
        // Nothing doubtful: this replica answers, the leader is not asked.
        let asked = source.asked();
        let chat1 = name("chat.1");
        let meta = behind
            .log()
            .lookup_to_subscribe(&chat1, |_| false)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(meta.next_offset, Offset::new(3));
        assert_eq!(source.asked(), asked);
    }

    #[tokio::test]
    async fn reads_of_a_partition_being_restored_go_to_its_leader_and_restores_interleave() {
        let (_leader, behind, source) = behind_by(5).await;
        let chat1 = name("chat.1");
        let everything = RestoreScope {
            channel: Arc::new(|_| true),
            producer: Arc::new(|_| true),
            devices: None,
        };
        let nothing = RestoreScope {
            channel: Arc::new(|_| false),
            producer: Arc::new(|_| false),
            devices: None,
        };
        let log = behind.log();
        let begin = |scope| Restore::Begin {
            scope,
            marker: vec![0],
        };
        log.restore(3, begin(everything)).await.unwrap();
        // Another partition's snapshot arrives meanwhile.
        log.restore(4, begin(nothing)).await.unwrap();
        // Partition 3's channels are gone from this store until its
        // restore finishes; a device still reads them, from the leader.
        let asked = source.asked();
        let meta = log.lookup(&chat1).await.unwrap().expect("the leader's");
        let range = ReadRange {
            from: Offset::new(1),
            until: meta.next_offset,
            max_messages: 10,
            max_bytes: 1 << 20,
        };
        let (_, messages) = log.read_channel(&chat1, range).await.unwrap().unwrap();
        assert_eq!(messages.len(), 2);
        assert_eq!(source.asked(), asked + 2);
        // Both restores finish, in the other order.
        log.restore(4, Restore::Finish { applied: vec![4] })
            .await
            .unwrap();
        log.restore(3, Restore::Finish { applied: vec![3] })
            .await
            .unwrap();
        // Restored (to a snapshot with no channel): read here again.
        assert!(log.lookup(&chat1).await.unwrap().is_none());
        assert_eq!(source.asked(), asked + 2);
    }
}

mod snapshots {
    use std::path::Path;

    use openraft::storage::RaftStateMachine;
    use openraft::{CommittedLeaderId, Entry, EntryPayload, LogId, RaftSnapshotBuilder};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use volna_broker::cluster::machine::{PartitionMachine, SnapshotStats};
    use volna_broker::log::ReadRange;
    use volna_broker::store::{RocksStore, StoredMessage};
    use volna_cluster::PartitionId;
    use volna_cluster::raft::snapshot_data::SnapshotData;
    use volna_cluster::raft::{
        Command, Outcome as ReplicaOutcome, ProducerStamp, Publish, Reply, TypeConfig,
    };

    use super::*;

    async fn machine(
        threads: &LogThreads,
        store: Arc<dyn LogStore>,
        root: &Path,
    ) -> PartitionMachine {
        PartitionMachine::open(
            PartitionId(0),
            1,
            threads.log().clone(),
            store,
            root,
            Arc::new(SnapshotStats::default()),
            None,
        )
        .await
        .unwrap()
    }

    fn publish(channel: &str, producer: Option<(u64, u64)>, body: String) -> Publish {
        Publish {
            channel: channel.into(),
            producer: producer.map(|(producer_id, sequence)| ProducerStamp {
                owner: "alice".into(),
                producer_id,
                sequence,
                after: None,
                limited: true,
            }),
            payload: Bytes::from(body),
        }
    }

    /// The leader's clock at the test's start.
    static NOW_MS: std::sync::LazyLock<u64> = std::sync::LazyLock::new(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64
    });

    fn entry(index: u64, command: Command) -> Entry<TypeConfig> {
        Entry {
            log_id: LogId::new(CommittedLeaderId::new(1, 1), index),
            payload: EntryPayload::Normal(command),
        }
    }

    fn appends(index: u64, publishes: Vec<Publish>) -> Entry<TypeConfig> {
        entry(
            index,
            Command::Append {
                // The leader's clock: windows older than the idle horizon
                // by the replica's clock would not be loaded again.
                now_ms: *NOW_MS + index,
                epoch_seed: 77 * index,
                publishes,
            },
        )
    }

    /// Entry 1 writes chat.1 (an idempotent producer), chat.gone and
    /// chat.2; entry 2 deletes chat.gone; entry 3 appends more.
    fn history() -> Vec<Entry<TypeConfig>> {
        let mut first: Vec<Publish> = (1..=50)
            .map(|s| publish("chat.1", Some((7, s)), format!("one-{s}")))
            .collect();
        first.push(publish("chat.gone", None, "bye".into()));
        first.push(publish("chat.2", None, "two-1".into()));
        vec![
            appends(1, first),
            entry(2, Command::Delete(vec!["chat.gone".into()])),
            appends(
                3,
                vec![
                    publish("chat.1", Some((7, 51)), "one-51".into()),
                    publish("chat.2", None, "two-2".into()),
                ],
            ),
        ]
    }

    async fn apply(machine: &mut PartitionMachine, entries: Vec<Entry<TypeConfig>>) -> Vec<Reply> {
        machine.apply(entries).await.unwrap()
    }

    async fn channel(threads: &LogThreads, name: &str) -> Option<(u64, u64, Vec<StoredMessage>)> {
        let range = ReadRange {
            from: volna_client::Offset::FIRST,
            until: volna_client::Offset::new(u64::MAX),
            max_messages: 10_000,
            max_bytes: usize::MAX,
        };
        let (meta, messages) = threads
            .log()
            .read_channel(&ChannelName::new(name).unwrap(), range)
            .await
            .unwrap()?;
        Some((meta.epoch.0, meta.next_offset.get(), messages))
    }

    /// Files under `dir`, at any depth.
    fn files_in(dir: &std::path::Path) -> usize {
        std::fs::read_dir(dir)
            .map(|entries| {
                entries
                    .filter_map(Result::ok)
                    .map(|e| {
                        if e.path().is_dir() {
                            files_in(&e.path())
                        } else {
                            1
                        }
                    })
                    .sum()
            })
            .unwrap_or(0)
    }

    async fn bytes_of(mut file: Box<SnapshotData>) -> Vec<u8> {
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes).await.unwrap();
        bytes
    }

    async fn receive(machine: &mut PartitionMachine, bytes: &[u8]) -> Box<SnapshotData> {
        let mut file = machine.begin_receiving_snapshot().await.unwrap();
        file.write_all(bytes).await.unwrap();
        file.shutdown().await.unwrap();
        file
    }

    #[tokio::test]
    async fn a_snapshot_taken_before_any_entry_is_one_of_nothing_not_an_error() {
        // An error from the builder stops the partition's group.
        let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
        let store: Arc<dyn LogStore> =
            Arc::new(RocksStore::open(&dirs[0].path().join("db")).unwrap());
        let threads = replica(store.clone());
        let mut blank = machine(&threads, store, dirs[1].path()).await;
        let mut build = blank.get_snapshot_builder().await;
        let snapshot = build.build_snapshot().await.unwrap();
        assert_eq!(snapshot.meta.last_log_id, None);
        assert!(blank.get_current_snapshot().await.unwrap().is_none());
    }

    #[tokio::test]
    async fn a_snapshot_installed_on_a_replica_behind_gives_it_the_leaders_state() {
        let dirs: Vec<_> = (0..4).map(|_| tempfile::tempdir().unwrap()).collect();
        // The leader's replica, on RocksDB.
        let rocks: Arc<dyn LogStore> =
            Arc::new(RocksStore::open(&dirs[0].path().join("db")).unwrap());
        let a = replica(rocks.clone());
        let mut leader = machine(&a, rocks, dirs[1].path()).await;
        apply(&mut leader, history()).await;
        let mut build = leader.get_snapshot_builder().await;
        // Applied after the snapshot's point in time: not in it.
        apply(
            &mut leader,
            vec![appends(4, vec![publish("chat.2", None, "two-3".into())])],
        )
        .await;
        let snapshot = build.build_snapshot().await.unwrap();
        assert_eq!(snapshot.meta.last_log_id.map(|l| l.index), Some(3));
        assert_eq!(
            files_in(dirs[1].path()),
            0,
            "taking a snapshot writes nothing down"
        );
        let bytes = bytes_of(snapshot.snapshot).await;
        assert_eq!(files_in(dirs[1].path()), 0, "nor does exporting it");
        let current = leader.get_current_snapshot().await.unwrap().unwrap();
        assert_eq!(
            current.meta.last_log_id.map(|l| l.index),
            Some(4),
            "the snapshot served is the partition as it stands"
        );
        assert_ne!(current.meta.snapshot_id, snapshot.meta.snapshot_id);
        assert!(bytes_of(current.snapshot).await.len() > bytes.len());

        // A replica that applied only entry 1: it still has chat.gone.
        let behind_store = Arc::new(MemoryStore::new());
        let b = replica(behind_store.clone());
        let mut behind = machine(&b, behind_store.clone(), dirs[2].path()).await;
        apply(&mut behind, history()[..1].to_vec()).await;
        assert!(channel(&b, "chat.gone").await.is_some());

        // A damaged copy is refused and leaves the replica as it was.
        let damaged = receive(&mut behind, &bytes[..bytes.len() - 3]).await;
        assert!(
            behind
                .install_snapshot(&snapshot.meta, damaged)
                .await
                .is_err()
        );
        assert!(channel(&b, "chat.gone").await.is_some());

        let file = receive(&mut behind, &bytes).await;
        behind.install_snapshot(&snapshot.meta, file).await.unwrap();
        assert_eq!(
            files_in(dirs[2].path()),
            0,
            "an installed snapshot's file is removed"
        );
        assert_eq!(
            behind.applied_state().await.unwrap().0,
            snapshot.meta.last_log_id
        );
        assert!(
            channel(&b, "chat.gone").await.is_none(),
            "deleted in the leader's history"
        );
        let leaders = channel(&a, "chat.2").await.unwrap();
        let (epoch, next, messages) = channel(&b, "chat.2").await.unwrap();
        assert_eq!(
            (epoch, next),
            (leaders.0, 3),
            "entry 4 is not in the snapshot"
        );
        assert_eq!(messages, leaders.2[..2]);
        assert_eq!(channel(&b, "chat.1").await, channel(&a, "chat.1").await);

        // Both go on alike: the same offsets, and a retry of a publish the
        // snapshot holds is a duplicate of it (G5 across the snapshot).
        let next = |index| {
            vec![
                appends(index, vec![publish("chat.2", None, "two-3".into())]),
                appends(
                    index + 1,
                    vec![publish("chat.1", Some((7, 51)), "one-51".into())],
                ),
            ]
        };
        let replies_b = apply(&mut behind, next(4)).await;
        let replies_a = apply(&mut leader, next(4)[1..].to_vec()).await;
        assert_eq!(
            replies_b[0].outcomes,
            [ReplicaOutcome::Stored {
                offset: 3,
                epoch,
                duplicate: false
            }]
        );
        assert_eq!(replies_b[1], replies_a[0]);
        assert!(matches!(
            replies_b[1].outcomes[0],
            ReplicaOutcome::Stored {
                offset: 51,
                duplicate: true,
                ..
            }
        ));
        assert_eq!(channel(&b, "chat.1").await, channel(&a, "chat.1").await);
        assert_eq!(channel(&b, "chat.2").await, channel(&a, "chat.2").await);

        // A replica whose restore a crash cut short finishes it at start.
        let crashing = Arc::new(MemoryStore::new());
        let c = replica(crashing.clone());
        let mut cut_short = machine(&c, crashing.clone(), dirs[3].path()).await;
        // The restore's first write (removing the old state) goes through,
        // the next (the first channels) fails.
        crashing.fail_write_after(1);
        let file = receive(&mut cut_short, &bytes).await;
        assert!(
            cut_short
                .install_snapshot(&snapshot.meta, file)
                .await
                .is_err()
        );
        drop(cut_short);
        drop(c);
        let image: Arc<dyn LogStore> = Arc::new(crashing.crash_image());
        let restarted = replica(image.clone());
        let mut resumed = machine(&restarted, image, dirs[3].path()).await;
        assert_eq!(
            resumed.applied_state().await.unwrap().0,
            snapshot.meta.last_log_id
        );
        let (_, _, messages) = channel(&restarted, "chat.1").await.unwrap();
        assert_eq!(messages.len(), 51);
        assert_eq!(channel(&restarted, "chat.2").await.map(|c| c.1), Some(3));
        a.shutdown();
        b.shutdown();
        restarted.shutdown();
    }
}
