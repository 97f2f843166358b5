//! One producer publishing a million messages must leave the broker as it
//! found it: quick to restart and small in memory (issue 11 §0).
//!
//! The producer windows were once stored one key per sequence and trimmed
//! with a RocksDB range tombstone per producer per write batch; a million
//! publishes left hundreds of thousands of overlapping tombstones whose
//! fragmentation at flush is quadratic: the idle broker burned a core and
//! grew to gigabytes, and a restart took 23 s at 3.2 GiB.

#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use futures_util::{StreamExt, TryStreamExt, stream};
use volna_chaos::BrokerProcess;
use volna_client::{ChannelName, Position};

/// 1,000,000 by default, or `VOLNA_CHAOS_PUBLISHES`.
fn publishes() -> u64 {
    volna_chaos::knob("VOLNA_CHAOS_PUBLISHES", 1_000_000)
}

const RSS_BOUND: u64 = 512 * 1024 * 1024;

/// The highest RSS seen over `span`, sampled every 100 ms.
async fn peak_rss(broker: &BrokerProcess, span: Duration) -> u64 {
    let until = Instant::now() + span;
    let mut peak = 0;
    while Instant::now() < until {
        peak = peak.max(broker.rss_bytes().unwrap_or(0));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    peak
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_million_publishes_of_one_producer_restart_fast_and_stay_small() {
    let n = publishes();
    let dir = tempfile::tempdir().unwrap();
    let mut broker = BrokerProcess::start(dir.path(), "wal").unwrap();
    let client = broker.client(Duration::from_secs(60)).await.unwrap();
    let channel = ChannelName::new("chat.flood").unwrap();

    // One client is one producer id; keep its in-flight window full.
    let started = Instant::now();
    let highest = stream::iter(1..=n)
        .map(|i| {
            let client = client.clone();
            let channel = channel.clone();
            async move { client.publish(&channel, format!("m{i}")).await }
        })
        .buffer_unordered(256)
        .try_fold(0u64, |top, ack| async move {
            assert!(!ack.duplicate, "a first publish came back duplicate");
            Ok(top.max(ack.offset.get()))
        })
        .await
        .unwrap();
    let took = started.elapsed();
    assert_eq!(highest, n, "offsets are not 1..=n");
    eprintln!(
        "{n} publishes of one producer in {took:.1?} ({:.0}/s)",
        n as f64 / took.as_secs_f64()
    );
    client.close().await;

    // The idle broker right after the run: this is where the flush of
    // range tombstones made memory climb by gigabytes.
    let idle_peak = peak_rss(&broker, Duration::from_secs(3)).await;

    broker.kill().unwrap();
    broker.start_again().unwrap();
    let ready_in = broker.wait_ready(Duration::from_secs(120)).await.unwrap();
    let restart_peak = peak_rss(&broker, Duration::from_secs(5)).await;
    eprintln!(
        "idle RSS peak {} MiB; restart ready in {ready_in:.2?}, RSS peak {} MiB",
        idle_peak >> 20,
        restart_peak >> 20
    );
    assert!(
        ready_in <= Duration::from_secs(5),
        "ready after {ready_in:?}"
    );
    assert!(idle_peak <= RSS_BOUND, "idle RSS {idle_peak} over 512 MiB");
    assert!(
        restart_peak <= RSS_BOUND,
        "RSS after restart {restart_peak} over 512 MiB"
    );

    // Nothing acknowledged was lost, and the log goes on where it was.
    let client = broker.client(Duration::from_secs(30)).await.unwrap();
    let mut sub = client.subscribe(&channel, Position::Last(1)).await.unwrap();
    let last = sub.next().await.unwrap().unwrap();
    assert_eq!(last.offset.get(), n);
    let next = client.publish(&channel, "after").await.unwrap();
    assert_eq!(next.offset.get(), n + 1);
    volna_chaos::assert_no_duplicates(&client);
    broker.assert_never_panicked();
}
