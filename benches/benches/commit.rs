//! What one commit costs the log writer thread, with and without an
//! audience: the writer hands each committed batch to the fan-out engine
//! (`CommitListener::committed`), and every other channel's acks wait
//! while it does. Measured with 0 and 20,000 subscriber tasks parked on
//! the channel, as a broadcast channel's readers are between messages.
//! The writer's share must not grow with the audience (issue 11 §D):
//! waking subscribers belongs elsewhere.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use volna_broker::config::{Durability, EngineConfig};
use volna_broker::fanout::Fanout;
use volna_broker::log::{self, CommitListener};
use volna_broker::store::{ChannelMeta, MemoryStore, StoredMessage};
use volna_proto::{ChannelName, Epoch};

fn commit(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let engine = Arc::new(Fanout::new(4 * 1024 * 1024));
    let threads = log::start(
        Arc::new(MemoryStore::new()),
        engine.clone(),
        Durability::Wal,
        &EngineConfig::default(),
        Arc::new(volna_broker::metrics::Metrics::new()),
    )
    .expect("log");
    let mut group = c.benchmark_group("commit_to_a_channel_with_waiting_subscribers");
    group.measurement_time(Duration::from_secs(3));
    for subscribers in [0usize, 20_000] {
        let channel = ChannelName::new(format!("news.c{subscribers}")).expect("name");
        // Parked subscriber tasks, each woken by every commit.
        let wakeups = Arc::new(AtomicU64::new(0));
        let mut tasks = Vec::new();
        for _ in 0..subscribers {
            let mut sub = engine.subscribe(&channel);
            let wakeups = wakeups.clone();
            tasks.push(rt.spawn(async move {
                loop {
                    let _ = sub.changed().await;
                    wakeups.fetch_add(1, Ordering::Relaxed);
                }
            }));
        }
        let mut meta = ChannelMeta::new(1, Epoch(1));
        let payload = Bytes::from_static(&[7u8; 64]);
        group.bench_with_input(
            BenchmarkId::from_parameter(subscribers),
            &subscribers,
            |b, _| {
                b.iter(|| {
                    let message = StoredMessage {
                        offset: meta.next_offset,
                        timestamp_ms: 0,
                        producer: None,
                        payload: payload.clone(),
                    };
                    meta.next_offset = meta.next_offset.next();
                    engine.committed(&channel, &meta, std::slice::from_ref(&message));
                });
            },
        );
        // The subscribers were really woken (not a bench of nobody).
        if subscribers > 0 {
            let deadline = std::time::Instant::now() + Duration::from_secs(30);
            while wakeups.load(Ordering::Relaxed) < subscribers as u64 {
                assert!(
                    std::time::Instant::now() < deadline,
                    "subscribers never woke"
                );
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        for task in tasks {
            task.abort();
        }
    }
    group.finish();
    threads.shutdown();
}

criterion_group!(benches, commit);
criterion_main!(benches);
