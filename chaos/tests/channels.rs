//! A broker with a million channels on disk must start as fast and as small
//! as an empty one, and its retention rounds must not visit the idle ones
//! (issue 11 §C2, §C3).
//!
//! Each channel holds one message, as a messenger's inboxes and chats
//! mostly do. Before, start-up read every channel's metadata into memory,
//! and each retention round read up to 4,096 messages of every channel of a
//! namespace with limits.

#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use futures_util::{StreamExt, TryStreamExt, stream};
use volna_chaos::BrokerProcess;
use volna_client::{ChannelName, Position};

/// 200,000 by default, or `VOLNA_CHAOS_CHANNELS` (the closing figures of
/// issue 11 use 1,000,000).
fn channels() -> u64 {
    volna_chaos::knob("VOLNA_CHAOS_CHANNELS", 200_000)
}

const RSS_BOUND: u64 = 512 * 1024 * 1024;

fn name(i: u64) -> ChannelName {
    ChannelName::new(format!("inbox.{i}")).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_million_channels_start_fast_stay_small_and_cost_retention_nothing() {
    let n = channels();
    let dir = tempfile::tempdir().unwrap();
    let env = [
        // One client creates them all: no per-user creation limit here.
        ("VOLNA_LIMITS__CHANNEL_CREATIONS_PER_MINUTE", "0"),
        ("VOLNA_LIMITS__PUBLISH_RATE_PER_CONNECTION", "0"),
        ("VOLNA_LIMITS__PUBLISH_RATE_PER_USER", "0"),
        ("VOLNA_ENGINE__RETENTION_INTERVAL_MS", "1000"),
        ("VOLNA_NAMESPACES__INBOX__RETENTION__MAX_MESSAGES", "100"),
        ("VOLNA_NAMESPACES__INBOX__RETENTION__MAX_AGE_SECS", "86400"),
    ];
    let mut broker = BrokerProcess::start_with(dir.path(), "wal", &env).unwrap();
    let client = broker.client(Duration::from_secs(60)).await.unwrap();
    let started = Instant::now();
    stream::iter(0..n)
        .map(|i| {
            let client = client.clone();
            async move {
                let ack = client.publish(&name(i), format!("hello {i}")).await?;
                assert_eq!(ack.offset.get(), 1);
                Ok::<_, volna_client::ClientError>(())
            }
        })
        .buffer_unordered(256)
        .try_collect::<()>()
        .await
        .unwrap();
    let took = started.elapsed();
    eprintln!(
        "{n} channels created in {took:.1?} ({:.0}/s)",
        n as f64 / took.as_secs_f64()
    );
    client.close().await;
    let resident = broker.metric("volna_resident_channels").await.unwrap();
    assert!(resident <= 250_000.0, "{resident} channels resident");

    broker.kill().unwrap();
    broker.start_again().unwrap();
    let ready_in = broker.wait_ready(Duration::from_secs(120)).await.unwrap();
    let rss = broker.rss_bytes().unwrap_or(0);
    eprintln!(
        "restart with {n} channels: ready in {ready_in:.2?}, RSS {} MiB",
        rss >> 20
    );
    assert!(
        ready_in <= Duration::from_secs(5),
        "ready after {ready_in:?}"
    );
    assert!(rss <= RSS_BOUND, "RSS {rss} over 512 MiB");
    assert_eq!(broker.metric("volna_resident_channels").await, Some(0.0));

    // Retention rounds over a namespace of idle channels read nothing.
    let cpu_before = broker
        .metric("volna_process_cpu_seconds_total")
        .await
        .unwrap_or(0.0);
    tokio::time::sleep(Duration::from_secs(5)).await;
    let cpu_after = broker
        .metric("volna_process_cpu_seconds_total")
        .await
        .unwrap_or(0.0);
    let examined = broker
        .metric("volna_retention_channels_examined_total")
        .await;
    let read = broker.metric("volna_retention_read_bytes_total").await;
    eprintln!(
        "5 idle seconds (5 retention rounds): {:.3} s CPU, {examined:?} channels examined, {read:?} bytes read",
        cpu_after - cpu_before
    );
    assert_eq!(examined, Some(0.0));
    assert_eq!(read, Some(0.0));

    // Every channel is there, read when used.
    let client = broker.client(Duration::from_secs(30)).await.unwrap();
    for i in [0, n / 2, n - 1] {
        let mut sub = client.subscribe(&name(i), Position::FIRST).await.unwrap();
        let m = sub.next().await.unwrap().unwrap();
        assert_eq!(
            (m.offset.get(), m.payload),
            (1, format!("hello {i}").into())
        );
        let next = client.publish(&name(i), "again").await.unwrap();
        assert_eq!(next.offset.get(), 2);
    }
    volna_chaos::assert_no_duplicates(&client);
    broker.assert_never_panicked();
}
