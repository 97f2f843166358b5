//! The log on a real RocksDB directory: group-commit append throughput with
//! 1, 16 and 256 publishers racing, the range read that serves catch-up,
//! and a subscriber replaying history into the live feed while publishing
//! goes on (the replay → live switch must neither skip nor repeat).

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use volna_broker::config::{Durability, EngineConfig};
use volna_broker::fanout::Fanout;
use volna_broker::log::{self, AppendInput, Log, LogThreads};
use volna_broker::metrics::Metrics;
use volna_broker::store::RocksStore;
use volna_broker::subscription::{self, DeliverySink, SinkError, Start};
use volna_proto::{ChannelName, Frame, Limits, Offset, SubscriptionId};

/// Messages appended per measured iteration of the group-commit bench.
const APPENDS: u64 = 4_096;
/// Messages in the channel that catch-up and replay read.
const HISTORY: u64 = 20_000;

/// A log on a fresh RocksDB directory and its fan-out engine.
struct Broker {
    rt: tokio::runtime::Runtime,
    engine: Arc<Fanout>,
    threads: Option<LogThreads>,
    metrics: Arc<Metrics>,
    // Declared last: dropped after the database is closed.
    _dir: tempfile::TempDir,
}

impl Drop for Broker {
    fn drop(&mut self) {
        // Close RocksDB before the process exits: its background threads
        // must not outlive the database's static state.
        if let Some(threads) = self.threads.take() {
            threads.shutdown();
        }
    }
}

impl Broker {
    fn open() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = RocksStore::open(&dir.path().join("log")).expect("rocksdb");
        let engine = Arc::new(Fanout::new(4 * 1024 * 1024));
        let metrics = Arc::new(Metrics::new());
        let threads = log::start(
            Arc::new(store),
            engine.clone(),
            Durability::Wal,
            &EngineConfig::default(),
            metrics.clone(),
        )
        .expect("log");
        Self {
            rt: tokio::runtime::Runtime::new().expect("runtime"),
            engine,
            threads: Some(threads),
            metrics,
            _dir: dir,
        }
    }

    fn log(&self) -> Log {
        match &self.threads {
            Some(threads) => threads.log().clone(),
            None => unreachable!("the log is shut down only on drop"),
        }
    }
}

async fn append_many(log: &Log, channel: &ChannelName, count: u64) {
    for _ in 0..count {
        log.append(AppendInput {
            channel: channel.clone(),
            producer: None,
            payload: Bytes::from_static(&[7u8; 64]),
        })
        .await
        .expect("append");
    }
}

fn group_commit(c: &mut Criterion) {
    let broker = Broker::open();
    let mut group = c.benchmark_group("log_append_racing_publishers");
    group.throughput(Throughput::Elements(APPENDS));
    for publishers in [1u64, 16, 256] {
        let channels: Vec<ChannelName> = (0..publishers)
            .map(|p| ChannelName::new(format!("chat.p{publishers}.{p}")).expect("name"))
            .collect();
        group.bench_with_input(
            BenchmarkId::from_parameter(publishers),
            &publishers,
            |b, &publishers| {
                b.iter_custom(|iterations| {
                    let started = Instant::now();
                    for _ in 0..iterations {
                        broker.rt.block_on(async {
                            let racing = channels.iter().map(|channel| {
                                let log = broker.log();
                                let channel = channel.clone();
                                tokio::spawn(async move {
                                    append_many(&log, &channel, APPENDS / publishers).await;
                                })
                            });
                            for publisher in racing.collect::<Vec<_>>() {
                                publisher.await.expect("publisher");
                            }
                        });
                    }
                    started.elapsed()
                });
            },
        );
    }
    group.finish();
}

fn catch_up_read(c: &mut Criterion) {
    let broker = Broker::open();
    let log = broker.log();
    let channel = ChannelName::new("chat.history").expect("name");
    broker.rt.block_on(append_many(&log, &channel, HISTORY));
    let id = log.meta(&channel).expect("channel").id;
    let mut group = c.benchmark_group("log_catch_up_read");
    group.throughput(Throughput::Elements(4_096));
    group.bench_function("4096_messages", |b| {
        let mut from = 1;
        b.iter(|| {
            let messages = broker
                .rt
                .block_on(log.read(
                    id,
                    Offset::new(from),
                    Offset::new(HISTORY + 1),
                    4_096,
                    usize::MAX,
                ))
                .expect("read");
            assert_eq!(messages.len(), 4_096);
            assert_eq!(messages[0].offset, Offset::new(from));
            from = 1 + (from + 4_096) % (HISTORY - 4_096);
        });
    });
    group.finish();
}

const FRAME_LIMITS: Limits = Limits {
    max_frame: 16 * 1024 * 1024,
};

/// Decodes what a subscription sends and checks that offsets arrive each
/// once, in order; reports the next expected offset.
struct CheckingSink {
    buf: BytesMut,
    next: u64,
    progress: watch::Sender<u64>,
}

impl DeliverySink for CheckingSink {
    async fn send(&mut self, frames: Vec<Bytes>) -> Result<(), SinkError> {
        for frame in frames {
            self.buf.extend_from_slice(&frame);
            while let Some(frame) = volna_proto::decode(&mut self.buf, &FRAME_LIMITS)
                .map_err(|e| SinkError(e.to_string()))?
            {
                if let Frame::Deliver(d) = frame {
                    assert_eq!(d.first_offset.get(), self.next, "gap or repeat");
                    self.next = d.end_offset().get();
                }
            }
        }
        self.progress.send_replace(self.next);
        Ok(())
    }

    async fn finish(&mut self) {}
}

fn replay_to_live(c: &mut Criterion) {
    let broker = Broker::open();
    let mut group = c.benchmark_group("replay_to_live");
    group.sample_size(10);
    group.throughput(Throughput::Elements(HISTORY + 2_000));
    group.bench_function("20000_history_then_2000_live", |b| {
        b.iter_custom(|iterations| {
            let mut total = Duration::ZERO;
            for round in 0..iterations {
                let log = broker.log();
                let channel = ChannelName::new(format!("chat.replay.{round}")).expect("name");
                broker.rt.block_on(append_many(&log, &channel, HISTORY));
                total += broker.rt.block_on(async {
                    let started = Instant::now();
                    let (progress, mut reached) = watch::channel(1);
                    let sink = CheckingSink {
                        buf: BytesMut::new(),
                        next: 1,
                        progress,
                    };
                    let cancel = CancellationToken::new();
                    let start = Start {
                        id: SubscriptionId(1),
                        next: Offset::FIRST,
                        events: Vec::new(),
                        epoch: volna_proto::Epoch(0),
                    };
                    let feed = broker.engine.subscribe(&channel);
                    feed.observe(log.meta(&channel).as_ref());
                    let delivery = tokio::spawn(subscription::run(
                        start,
                        feed,
                        log.clone(),
                        sink,
                        cancel.clone(),
                        broker.metrics.clone(),
                    ));
                    // Live publishing races the replay.
                    append_many(&log, &channel, 2_000).await;
                    reached
                        .wait_for(|next| *next > HISTORY + 2_000)
                        .await
                        .expect("the subscription delivered everything");
                    let elapsed = started.elapsed();
                    cancel.cancel();
                    delivery
                        .await
                        .expect("delivery loop")
                        .expect("cancelled, not stopped");
                    elapsed
                });
            }
            total
        });
    });
    group.finish();
}

criterion_group!(benches, group_commit, catch_up_read, replay_to_live);
criterion_main!(benches);
