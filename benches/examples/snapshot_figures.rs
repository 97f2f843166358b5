//! The figures of a large partition's snapshot, on real RocksDB
//! directories: a leader's replica holding `GIB` GiB in one partition (64
//! channels, 16 KiB messages, applied through the partition's state
//! machine, incompressible payloads), then
//!
//! - **take**: what the snapshot policy does every `snapshot_log_bytes` of
//!   log (record the position; nothing is written),
//! - **steady publishing**: 256 MiB more published with a snapshot taken
//!   every 16 MiB, and the bytes the data directory grew by against the
//!   bytes published,
//! - **send and install**: the snapshot exported as it is streamed into a
//!   follower's receive file, checked and installed there,
//!
//! with the disk each side holds at its peak. For BENCHMARKS.md
//! ("Partition snapshots"):
//!
//! ```text
//! cargo run -p volna-benches --example snapshot_figures -- 2
//! ```

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
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

const CHANNELS: usize = 64;
const PAYLOAD: usize = 16 << 10;
/// Publishes per entry (one per channel): 1 MiB.
const PER_ENTRY: usize = CHANNELS;
const MIB: f64 = (1 << 20) as f64;

struct Replica {
    threads: Option<LogThreads>,
    machine: PartitionMachine,
    store: Arc<dyn LogStore>,
}

impl Drop for Replica {
    fn drop(&mut self) {
        if let Some(threads) = self.threads.take() {
            threads.shutdown();
        }
    }
}

async fn replica(dir: &Path) -> Result<Replica, Box<dyn std::error::Error>> {
    let store: Arc<dyn LogStore> = Arc::new(RocksStore::open(&dir.join("db"))?);
    let threads = log::start_replicated(
        store.clone(),
        Arc::new(Fanout::new(4 << 20)),
        Durability::Wal,
        &EngineConfig::default(),
        Arc::new(Metrics::new()),
    )?;
    let machine = PartitionMachine::open(
        PartitionId(0),
        1,
        threads.log().clone(),
        store.clone(),
        &dir.join("snapshots"),
        Arc::new(SnapshotStats::default()),
        None,
    )
    .await?;
    Ok(Replica {
        threads: Some(threads),
        machine,
        store,
    })
}

fn entry(index: u64, payload: &Bytes) -> Entry<TypeConfig> {
    Entry {
        log_id: LogId::new(CommittedLeaderId::new(1, 1), index),
        payload: EntryPayload::Normal(Command::Append {
            now_ms: 1_800_000_000_000 + index,
            epoch_seed: index,
            publishes: (0..PER_ENTRY)
                .map(|c| Publish {
                    channel: format!("chat.{c}"),
                    producer: None,
                    payload: payload.clone(),
                })
                .collect(),
        }),
    }
}

/// Bytes of the files under `dir`, at any depth.
fn disk(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .map(|e| match e.metadata() {
                    Ok(m) if m.is_dir() => disk(&e.path()),
                    Ok(m) => m.len(),
                    Err(_) => 0,
                })
                .sum()
        })
        .unwrap_or(0)
}

fn mib(bytes: u64) -> String {
    format!("{:.0} MiB", bytes as f64 / MIB)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let gib: u64 = std::env::args()
        .nth(1)
        .map(|g| g.parse())
        .transpose()?
        .unwrap_or(2);
    let root = tempfile::tempdir_in(std::env::var("SNAPSHOT_FIGURES_DIR").unwrap_or(".".into()))?;
    // Incompressible, as media and end-to-end encrypted messages are.
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let payload: Bytes = (0..PAYLOAD)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect::<Vec<u8>>()
        .into();
    let entry_bytes = (PER_ENTRY * PAYLOAD) as u64;

    let leader_dir = root.path().join("leader");
    let mut leader = replica(&leader_dir).await?;
    let entries = (gib << 30) / entry_bytes;
    let filling = Instant::now();
    let mut index = 0;
    while index < entries {
        let batch: Vec<_> = (index + 1..=(index + 64).min(entries))
            .map(|i| entry(i, &payload))
            .collect();
        index += batch.len() as u64;
        leader.machine.apply(batch).await?;
    }
    leader.store.flush()?;
    let partition = disk(&leader_dir);
    println!(
        "partition: {} of payload in {} messages, {} on disk, filled in {:.1} s",
        mib(entries * entry_bytes),
        entries * PER_ENTRY as u64,
        mib(partition),
        filling.elapsed().as_secs_f64()
    );

    // Take: what the policy does every `snapshot_log_bytes`.
    let took = Instant::now();
    let taken = {
        let mut build = leader.machine.get_snapshot_builder().await;
        build.build_snapshot().await?.meta
    };
    println!(
        "take: {:.2} ms, leader's disk {} -> {} (snapshot at entry {:?})",
        took.elapsed().as_secs_f64() * 1e3,
        mib(partition),
        mib(disk(&leader_dir)),
        taken.last_log_id.map(|l| l.index)
    );

    // Steady publishing with a snapshot every 16 MiB of log.
    let before = disk(&leader_dir);
    let steady = Instant::now();
    let more = (256u64 << 20) / entry_bytes;
    let mut taken_count = 0;
    for k in 0..more {
        index += 1;
        leader.machine.apply(vec![entry(index, &payload)]).await?;
        if (k + 1) % ((16 << 20) / entry_bytes) == 0 {
            let mut build = leader.machine.get_snapshot_builder().await;
            build.build_snapshot().await?;
            taken_count += 1;
        }
    }
    leader.store.flush()?;
    let grew = disk(&leader_dir).saturating_sub(before);
    println!(
        "steady: {} published with {taken_count} snapshots in {:.1} s; the data directory grew by {} ({:.2} bytes per byte published)",
        mib(more * entry_bytes),
        steady.elapsed().as_secs_f64(),
        mib(grew),
        grew as f64 / (more * entry_bytes) as f64
    );

    // Send and install: the export streamed into a follower's receive file.
    let follower_dir = root.path().join("follower");
    let mut follower = replica(&follower_dir).await?;
    let sending = Instant::now();
    let snapshot = leader
        .machine
        .get_current_snapshot()
        .await?
        .ok_or("no snapshot")?;
    let fixed_ms = sending.elapsed().as_secs_f64() * 1e3;
    let mut stream = snapshot.snapshot;
    let mut received = follower.machine.begin_receiving_snapshot().await?;
    let mut chunk = vec![0u8; 3 << 20];
    let mut sent = 0u64;
    let mut leader_peak = 0;
    loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        received.write_all(&chunk[..n]).await?;
        sent += n as u64;
        if sent % (256 << 20) < n as u64 {
            leader_peak = leader_peak.max(disk(&leader_dir));
        }
    }
    received.shutdown().await?;
    let export_s = sending.elapsed().as_secs_f64();
    let follower_peak_file = disk(&follower_dir);
    // The follower's disk at its peak: the file and the restored
    // partition side by side, until the file is removed.
    let done = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (done, dir) = (done.clone(), follower_dir.clone());
        std::thread::spawn(move || {
            let mut peak = 0;
            while !done.load(Ordering::Relaxed) {
                peak = disk(&dir).max(peak);
                std::thread::sleep(Duration::from_millis(100));
            }
            peak
        })
    };
    let installing = Instant::now();
    follower
        .machine
        .install_snapshot(&snapshot.meta, received)
        .await?;
    follower.store.flush()?;
    let install_s = installing.elapsed().as_secs_f64();
    done.store(true, Ordering::Relaxed);
    let follower_peak = sampler.join().map_err(|_| "sampler panicked")?;
    let follower_after = disk(&follower_dir);
    println!(
        "send: point fixed in {fixed_ms:.1} ms, {} exported and received in {export_s:.1} s ({:.0} MiB/s); leader's disk at most {} while sending",
        mib(sent),
        sent as f64 / MIB / export_s,
        mib(leader_peak.max(disk(&leader_dir)))
    );
    println!(
        "install: checked and restored in {install_s:.1} s ({:.0} MiB/s); follower's disk {} with the file received, at most {} while installing, {} installed ({} of snapshot files left)",
        sent as f64 / MIB / install_s,
        mib(follower_peak_file),
        mib(follower_peak.max(follower_peak_file)),
        mib(follower_after),
        mib(disk(&follower_dir.join("snapshots")))
    );
    Ok(())
}
