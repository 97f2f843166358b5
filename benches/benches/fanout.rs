//! The fan-out engine without a network: one committed message handed to
//! N subscribers of its channel. Each subscriber takes the shared encoded
//! frame from the channel's ring; the check below proves that no
//! subscriber got a copy of the payload.

use std::sync::Arc;

use bytes::Bytes;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use volna_broker::config::{Durability, EngineConfig};
use volna_broker::fanout::{Fanout, FeedSubscription, NextStep};
use volna_broker::log::{self, AppendInput, Log};
use volna_broker::store::MemoryStore;
use volna_proto::{ChannelName, Offset};

fn fanout(c: &mut Criterion) {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let engine = Arc::new(Fanout::new(4 * 1024 * 1024));
    let threads = log::start(
        Arc::new(MemoryStore::new()),
        engine.clone(),
        Durability::Wal,
        &EngineConfig::default(),
        Arc::new(volna_broker::metrics::Metrics::new()),
    )
    .expect("log");
    let log: Log = threads.log().clone();
    let mut group = c.benchmark_group("fanout_one_message");
    for subscribers in [10usize, 1_000, 100_000] {
        let channel = ChannelName::new(format!("news.s{subscribers}")).expect("name");
        let mut subs: Vec<FeedSubscription> = (0..subscribers)
            .map(|_| engine.subscribe(&channel, &log))
            .collect();
        let mut next = Offset::FIRST;
        group.throughput(Throughput::Elements(subscribers as u64));
        group.bench_with_input(
            BenchmarkId::from_parameter(subscribers),
            &subscribers,
            |b, _| {
                b.iter(|| {
                    rt.block_on(log.append(AppendInput {
                        channel: channel.clone(),
                        producer: None,
                        payload: Bytes::from_static(&[7u8; 64]),
                    }))
                    .expect("append");
                    let mut first_ptr = None;
                    for sub in &mut subs {
                        match sub.next_step(next, usize::MAX) {
                            NextStep::Send { frames, .. } => {
                                let ptr = frames[0].as_ptr();
                                assert_eq!(*first_ptr.get_or_insert(ptr), ptr, "payload copied");
                            }
                            other => panic!("expected a ring frame, got {other:?}"),
                        }
                    }
                    next = next.next();
                });
            },
        );
    }
    group.finish();
    threads.shutdown();
}

criterion_group!(benches, fanout);
criterion_main!(benches);
