//! A cluster partition's snapshot on a real RocksDB directory: taking it
//! (recording the partition's position: what the snapshot policy does),
//! exporting it (read from a RocksDB snapshot as it is streamed: what a
//! replica too far behind is sent) and installing it on a replica that has
//! nothing (restore in steps through the log writer), for a partition of
//! 100 channels × 500 messages of 1 KiB (~50 MiB). The figures of a 2 GiB
//! partition come from `examples/snapshot_figures.rs`.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use openraft::storage::RaftStateMachine;
use openraft::{CommittedLeaderId, Entry, EntryPayload, LogId, RaftSnapshotBuilder};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use volna_broker::cluster::machine::{PartitionMachine, SnapshotStats};
use volna_broker::config::{Durability, EngineConfig};
use volna_broker::fanout::Fanout;
use volna_broker::log::{self, LogThreads};
use volna_broker::metrics::Metrics;
use volna_broker::store::{LogStore, RocksStore};
use volna_cluster::PartitionId;
use volna_cluster::raft::{Command, Publish, TypeConfig};

const CHANNELS: u64 = 100;
const PER_CHANNEL: u64 = 500;
const PAYLOAD: usize = 1024;

/// A replica of partition 0 (of 1) on its own RocksDB directory.
struct Replica {
    threads: Option<LogThreads>,
    machine: PartitionMachine,
    // Declared last: removed after the database is closed.
    _dir: tempfile::TempDir,
}

impl Drop for Replica {
    fn drop(&mut self) {
        if let Some(threads) = self.threads.take() {
            threads.shutdown();
        }
    }
}

async fn replica() -> Replica {
    let dir = tempfile::tempdir().expect("tempdir");
    let store: Arc<dyn LogStore> =
        Arc::new(RocksStore::open(&dir.path().join("db")).expect("rocksdb"));
    let threads = log::start_replicated(
        store.clone(),
        Arc::new(Fanout::new(4 << 20)),
        Durability::Wal,
        &EngineConfig::default(),
        Arc::new(Metrics::new()),
    )
    .expect("log");
    let machine = PartitionMachine::open(
        PartitionId(0),
        1,
        threads.log().clone(),
        store,
        &dir.path().join("snapshots"),
        Arc::new(SnapshotStats::default()),
        None,
    )
    .await
    .expect("machine");
    Replica {
        threads: Some(threads),
        machine,
        _dir: dir,
    }
}

/// One entry per round: a message to every channel.
fn history() -> Vec<Entry<TypeConfig>> {
    let payload = Bytes::from(vec![b'x'; PAYLOAD]);
    (1..=PER_CHANNEL)
        .map(|index| Entry {
            log_id: LogId::new(CommittedLeaderId::new(1, 1), index),
            payload: EntryPayload::Normal(Command::Append {
                now_ms: 1_800_000_000_000 + index,
                epoch_seed: index,
                publishes: (0..CHANNELS)
                    .map(|c| Publish {
                        channel: format!("chat.{c}"),
                        producer: None,
                        payload: payload.clone(),
                    })
                    .collect(),
            }),
        })
        .collect()
}

fn snapshots(c: &mut Criterion) {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let mut leader = rt.block_on(replica());
    rt.block_on(leader.machine.apply(history())).expect("apply");
    let mut group = c.benchmark_group("snapshot");
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(20));
    group.throughput(Throughput::Bytes(CHANNELS * PER_CHANNEL * PAYLOAD as u64));
    group.bench_function("take_50MiB", |b| {
        b.iter(|| {
            rt.block_on(async {
                let mut build = leader.machine.get_snapshot_builder().await;
                build.build_snapshot().await.expect("take").meta
            })
        });
    });
    group.bench_function("export_50MiB", |b| {
        b.iter(|| {
            rt.block_on(async {
                let mut build = leader.machine.get_snapshot_builder().await;
                let mut snapshot = build.build_snapshot().await.expect("take");
                let mut bytes = Vec::new();
                snapshot
                    .snapshot
                    .read_to_end(&mut bytes)
                    .await
                    .expect("export");
                bytes.len()
            })
        });
    });
    let snapshot = rt.block_on(async {
        let mut build = leader.machine.get_snapshot_builder().await;
        let mut snapshot = build.build_snapshot().await.expect("build");
        let mut bytes = Vec::new();
        snapshot
            .snapshot
            .read_to_end(&mut bytes)
            .await
            .expect("read");
        (snapshot.meta, bytes)
    });
    eprintln!("snapshot file: {} bytes", snapshot.1.len());
    group.bench_function("install_50MiB", |b| {
        b.iter_with_setup(
            || rt.block_on(replica()),
            |mut follower| {
                rt.block_on(async {
                    let mut file = follower
                        .machine
                        .begin_receiving_snapshot()
                        .await
                        .expect("receive");
                    file.write_all(&snapshot.1).await.expect("write");
                    file.shutdown().await.expect("flush");
                    follower
                        .machine
                        .install_snapshot(&snapshot.0, file)
                        .await
                        .expect("install");
                });
                follower
            },
        );
    });
    group.finish();
}

criterion_group!(benches, snapshots);
criterion_main!(benches);
