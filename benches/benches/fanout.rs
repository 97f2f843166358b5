//! The fan-out engine without a network: one committed message handed to
//! N subscribers of its channel. Each subscriber takes the shared encoded
//! frame from the channel's ring; the checks below prove that no
//! subscriber got a copy of the payload: every one gets the same frame
//! pointer, and the heap grows by less than one payload per delivery
//! (counted by an instrumented global allocator, printed per run).

use std::sync::Arc;

use bytes::Bytes;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use stats_alloc::{INSTRUMENTED_SYSTEM, Region, StatsAlloc};
use volna_broker::config::{Durability, EngineConfig};
use volna_broker::fanout::{Fanout, FeedSubscription, NextStep};
use volna_broker::log::{self, AppendInput, Log};
use volna_broker::store::MemoryStore;
use volna_proto::{ChannelName, Epoch, Offset};

#[global_allocator]
static GLOBAL: &StatsAlloc<std::alloc::System> = &INSTRUMENTED_SYSTEM;

/// Payload of the allocation check: large enough that a copy per delivery
/// could not hide among the bookkeeping allocations.
const CHECK_PAYLOAD: usize = 1024;

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
            .map(|_| {
                let sub = engine.subscribe(&channel);
                sub.observe(log.meta(&channel).as_ref());
                sub
            })
            .collect();
        let mut next = Offset::FIRST;

        // Allocations per delivery, outside the timed loop.
        rt.block_on(log.append(AppendInput {
            channel: channel.clone(),
            producer: None,
            payload: Bytes::from(vec![7u8; CHECK_PAYLOAD]),
        }))
        .expect("append");
        let region = Region::new(GLOBAL);
        for sub in &mut subs {
            assert!(matches!(
                sub.next_step(next, Epoch(0), usize::MAX),
                NextStep::Send { .. }
            ));
        }
        let heap = region.change();
        let per_delivery = heap.bytes_allocated as f64 / subscribers as f64;
        eprintln!(
            "fanout to {subscribers}: {:.2} allocations and {per_delivery:.0} bytes per delivery of a {CHECK_PAYLOAD}-byte payload",
            heap.allocations as f64 / subscribers as f64,
        );
        assert!(
            per_delivery < CHECK_PAYLOAD as f64,
            "a delivery allocated {per_delivery} bytes: the payload was copied"
        );
        next = next.next();

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
                        match sub.next_step(next, Epoch(0), usize::MAX) {
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
