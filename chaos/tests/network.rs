//! Faults between clients and the broker: a lossy, duplicating, reordering
//! network; a partition longer than the idle timeout; a client that changes
//! address mid-stream; thousands of subscribers reconnecting at once; slow
//! and stalled consumers next to fast ones. Every test checks that each
//! subscriber saw every acknowledged message once, in offset order.
//!
//! `VOLNA_CHAOS_SEED` replays the proxy's faults; `VOLNA_CHAOS_LONG=1` runs
//! the long mode (more messages, more subscribers).

#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use volna_chaos::proxy::{ChaosProxy, Faults};
use volna_chaos::{BrokerProcess, History, assert_no_duplicates, read_through};
use volna_client::{ChannelName, Client, ClientConfig, Position};

const DEADLINE: Duration = Duration::from_secs(120);

fn long_mode() -> bool {
    std::env::var("VOLNA_CHAOS_LONG").is_ok_and(|v| v == "1")
}

fn seed() -> u64 {
    std::env::var("VOLNA_CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random)
}

/// Publishes `count` unique payloads, 32 in flight; records the acks.
async fn publish(
    client: &Client,
    channel: &ChannelName,
    tag: &str,
    count: usize,
    history: &mut History,
) {
    let mut inflight = FuturesUnordered::new();
    for i in 0..count {
        let payload = format!("{tag}-{i}").into_bytes();
        inflight.push(async move { (client.publish(channel, payload.clone()).await, payload) });
        if inflight.len() >= 32
            && let Some((result, payload)) = inflight.next().await
        {
            let ack: volna_client::Published = result.expect("publish acked");
            assert!(history.acked.insert(ack.offset.get(), payload).is_none());
        }
    }
    while let Some((result, payload)) = inflight.next().await {
        let ack = result.expect("publish acked");
        assert!(history.acked.insert(ack.offset.get(), payload).is_none());
    }
}

fn via(broker: &BrokerProcess, proxy: &ChaosProxy) -> ClientConfig {
    let mut config = broker.client_config_via(proxy.addr());
    config.keep_alive = Duration::from_millis(300);
    config.idle_timeout = Duration::from_secs(2);
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lossy_duplicating_reordering_network_loses_and_repeats_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::start(dir.path(), "wal").unwrap();
    let _ready = broker.client(DEADLINE).await.unwrap();
    let proxy = ChaosProxy::start(broker.addr(), seed()).await.unwrap();
    proxy.set_faults(Faults {
        drop: 0.10,
        duplicate: 0.05,
        reorder: 0.05,
        max_delay: Duration::from_millis(3),
    });
    let channel = ChannelName::new("chat.lossy").unwrap();
    let mut subs = Vec::new();
    for _ in 0..3 {
        let client = Client::connect(via(&broker, &proxy)).await.unwrap();
        let sub = client.subscribe(&channel, Position::Latest).await.unwrap();
        subs.push((client, sub));
    }
    let publisher = Client::connect(via(&broker, &proxy)).await.unwrap();
    let mut history = History::default();
    let n = if long_mode() { 20_000 } else { 1_000 };
    publish(&publisher, &channel, "m", n, &mut history).await;
    let last = *history.acked.keys().next_back().unwrap();
    for (_, sub) in &mut subs {
        let got = read_through(sub, last, DEADLINE).await;
        if let Err(v) = history.check(&got) {
            panic!("seed {}: {v}", proxy.seed());
        }
    }
    // QUIC repairs loss and repeats below us: unless a client had to
    // reconnect (one connection each so far, plus the first client's),
    // the broker sent each delivery once.
    let opened = broker.metric("volna_connections_opened_total").await;
    if opened == Some(subs.len() as f64 + 2.0) {
        for (client, _) in &subs {
            assert_no_duplicates(client);
        }
    } else {
        eprintln!(
            "lossy network: a client reconnected ({opened:?} connections): duplicates not checked"
        );
    }
    let stats = proxy.stats();
    let dropped = stats.dropped.load(std::sync::atomic::Ordering::Relaxed);
    let duplicated = stats.duplicated.load(std::sync::atomic::Ordering::Relaxed);
    eprintln!(
        "lossy network (seed {}): {n} messages, {dropped} datagrams dropped, {duplicated} duplicated",
        proxy.seed()
    );
    assert!(
        dropped > 0 && duplicated > 0,
        "the proxy injected no faults"
    );
    broker.assert_never_panicked();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_reconnect_and_resume_after_a_partition_longer_than_the_idle_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::start_with(
        dir.path(),
        "wal",
        &[("VOLNA_LIMITS__IDLE_TIMEOUT_MS", "2000")],
    )
    .unwrap();
    let _ready = broker.client(DEADLINE).await.unwrap();
    let proxy = ChaosProxy::start(broker.addr(), seed()).await.unwrap();
    let channel = ChannelName::new("chat.partition").unwrap();
    let subscriber = Client::connect(via(&broker, &proxy)).await.unwrap();
    let mut sub = subscriber
        .subscribe(&channel, Position::Latest)
        .await
        .unwrap();
    let publisher = Client::connect(via(&broker, &proxy)).await.unwrap();
    let mut history = History::default();
    publish(&publisher, &channel, "before", 100, &mut history).await;

    proxy.blackhole(true);
    let cut = Instant::now();
    // Publishes during the partition wait for the reconnect and then land.
    let during = {
        let (publisher, channel) = (publisher.clone(), channel.clone());
        tokio::spawn(async move {
            let mut h = History::default();
            publish(&publisher, &channel, "during", 50, &mut h).await;
            h
        })
    };
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(
        !subscriber.is_connected(),
        "the partition outlived the idle timeout"
    );
    proxy.blackhole(false);
    let during = tokio::time::timeout(DEADLINE, during)
        .await
        .unwrap()
        .unwrap();
    history.acked.extend(during.acked);
    publish(&publisher, &channel, "after", 100, &mut history).await;
    let last = *history.acked.keys().next_back().unwrap();
    let got = read_through(&mut sub, last, DEADLINE).await;
    history
        .check(&got)
        .unwrap_or_else(|v| panic!("seed {}: {v}", proxy.seed()));
    eprintln!(
        "partition: healed and resumed {:?} after the cut",
        cut.elapsed()
    );
    let opened = broker
        .metric("volna_connections_opened_total")
        .await
        .unwrap();
    assert!(
        opened >= 4.0,
        "both clients reconnected (sessions opened: {opened})"
    );
    broker.assert_never_panicked();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_changes_address_keeps_its_session() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::start(dir.path(), "wal").unwrap();
    let publisher = broker.client(DEADLINE).await.unwrap();
    let proxy = ChaosProxy::start(broker.addr(), seed()).await.unwrap();
    let channel = ChannelName::new("chat.migrate").unwrap();
    let subscriber = Client::connect(via(&broker, &proxy)).await.unwrap();
    let mut sub = subscriber
        .subscribe(&channel, Position::Latest)
        .await
        .unwrap();
    let mut history = History::default();
    publish(&publisher, &channel, "home", 200, &mut history).await;
    let first = read_through(&mut sub, 100, DEADLINE).await;

    // The phone moves to another network: new source port, same connection.
    proxy.rebind();
    publish(&publisher, &channel, "away", 200, &mut history).await;
    let last = *history.acked.keys().next_back().unwrap();
    let mut got = first;
    got.extend(read_through(&mut sub, last, DEADLINE).await);
    history.check(&got).unwrap();
    assert!(subscriber.is_connected());
    // Migrated, not reconnected (checked below): no resume, no duplicate.
    assert_no_duplicates(&subscriber);
    let opened = broker
        .metric("volna_connections_opened_total")
        .await
        .unwrap();
    assert_eq!(
        opened, 2.0,
        "the subscriber migrated instead of reconnecting"
    );
    broker.assert_never_panicked();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_moves_between_shards_keeps_its_session() {
    // With the shard transport the kernel hashes each source address onto
    // one shard's socket: a new address usually lands on another shard,
    // which must hand the packets to the shard owning the connection.
    // Eight moves over four shards cross shards all but certainly.
    let dir = tempfile::tempdir().unwrap();
    let broker =
        BrokerProcess::start_with(dir.path(), "wal", &[("VOLNA_ENGINE__SHARDS", "4")]).unwrap();
    let publisher = broker.client(DEADLINE).await.unwrap();
    let proxy = ChaosProxy::start(broker.addr(), seed()).await.unwrap();
    let channel = ChannelName::new("chat.roam").unwrap();
    let subscriber = Client::connect(via(&broker, &proxy)).await.unwrap();
    let mut sub = subscriber
        .subscribe(&channel, Position::Latest)
        .await
        .unwrap();
    let mut history = History::default();
    let mut got = Vec::new();
    for step in 0..8 {
        publish(
            &publisher,
            &channel,
            &format!("net{step}"),
            50,
            &mut history,
        )
        .await;
        let last = *history.acked.keys().next_back().unwrap();
        got.extend(read_through(&mut sub, last, DEADLINE).await);
        proxy.rebind();
        // The proxy moves to a new address on the client's next datagram:
        // a request makes one at once. (A client that only received would
        // send its next ACK late, and a whole run could cross shards just
        // once or twice.)
        subscriber
            .publish(&ChannelName::new("chat.roam-ping").unwrap(), "ping")
            .await
            .unwrap();
    }
    history.check(&got).unwrap();
    assert!(subscriber.is_connected());
    assert_no_duplicates(&subscriber);
    let opened = broker
        .metric("volna_connections_opened_total")
        .await
        .unwrap();
    assert_eq!(
        opened, 2.0,
        "the subscriber migrated across shards instead of reconnecting"
    );
    let forwarded = broker
        .metric("volna_datagrams_forwarded_total")
        .await
        .unwrap();
    assert!(
        forwarded > 0.0,
        "the moves crossed shards (datagrams forwarded: {forwarded})"
    );
    broker.assert_never_panicked();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnect_storm_resumes_every_subscriber() {
    let dir = tempfile::tempdir().unwrap();
    let mut broker = BrokerProcess::start(dir.path(), "wal").unwrap();
    let publisher = broker.client(DEADLINE).await.unwrap();
    let channel = ChannelName::new("news.storm").unwrap();
    let n = if long_mode() { 3_000 } else { 300 };
    let mut subs = Vec::with_capacity(n);
    let mut connecting = FuturesUnordered::new();
    for _ in 0..n {
        let (config, channel) = (broker.client_config(), channel.clone());
        connecting.push(async move {
            let client = Client::connect(config).await.unwrap();
            let sub = client.subscribe(&channel, Position::Latest).await.unwrap();
            (client, sub)
        });
        if connecting.len() >= 64 {
            subs.push(connecting.next().await.unwrap());
        }
    }
    while let Some(s) = connecting.next().await {
        subs.push(s);
    }
    let mut history = History::default();
    publish(&publisher, &channel, "before", 20, &mut history).await;

    broker.restart().unwrap(); // kill -9, then start on the same directory
    let restarted = Instant::now();
    publish(&publisher, &channel, "after", 20, &mut history).await;
    let last = *history.acked.keys().next_back().unwrap();
    let mut readers = FuturesUnordered::new();
    for (_, sub) in &mut subs {
        readers.push(read_through(sub, last, DEADLINE));
    }
    while let Some(got) = readers.next().await {
        history.check(&got).unwrap();
    }
    eprintln!(
        "reconnect storm: {n} subscribers resumed within {:?} of the restart",
        restarted.elapsed()
    );
    broker.assert_never_panicked();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_and_stalled_consumers_do_not_hold_back_fast_ones() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::start(dir.path(), "wal").unwrap();
    let publisher = broker.client(DEADLINE).await.unwrap();
    let channel = ChannelName::new("news.mixed").unwrap();
    let mut stalled_config = broker.client_config();
    stalled_config.subscription_buffer = 8;
    let stalled_client = Client::connect(stalled_config).await.unwrap();
    let mut stalled = stalled_client
        .subscribe(&channel, Position::Latest)
        .await
        .unwrap();
    let n: u64 = if long_mode() { 100_000 } else { 10_000 };

    let mut tasks = Vec::new();
    for kind in ["fast", "fast", "fast", "slow"] {
        let client = broker.client(DEADLINE).await.unwrap();
        let mut sub = client.subscribe(&channel, Position::Latest).await.unwrap();
        tasks.push(tokio::spawn(async move {
            let mut latency = hdrhistogram::Histogram::<u64>::new(3).unwrap();
            let mut expected = 1;
            while expected <= n {
                let m = sub.next().await.unwrap().unwrap();
                assert_eq!(m.offset.get(), expected, "{kind} subscriber");
                expected += 1;
                let sent = u64::from_be_bytes(m.payload[..8].try_into().unwrap());
                latency
                    .record(now_us().saturating_sub(sent).max(1))
                    .unwrap();
                if kind == "slow" && expected % 100 == 0 {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
            assert_eq!(sub.duplicates_dropped(), 0, "{kind} subscriber");
            drop(client);
            (kind, latency.value_at_quantile(0.99))
        }));
    }
    let mut peak_rss = 0.0f64;
    let mut inflight = FuturesUnordered::new();
    for i in 0..n {
        let mut payload = now_us().to_be_bytes().to_vec();
        payload.extend_from_slice(&[b'x'; 248]);
        let _ = i;
        inflight.push(publisher.publish(&channel, payload));
        if inflight.len() >= 64 {
            inflight.next().await.unwrap().unwrap();
        }
        if i % 2_000 == 0
            && let Some(rss) = broker.metric("volna_process_resident_bytes").await
        {
            peak_rss = peak_rss.max(rss);
        }
    }
    while let Some(r) = inflight.next().await {
        r.unwrap();
    }
    for task in tasks {
        let (kind, p99) = tokio::time::timeout(DEADLINE, task).await.unwrap().unwrap();
        eprintln!("mixed consumers: {kind} subscriber p99 {p99} µs");
    }
    eprintln!(
        "mixed consumers: broker peak RSS {:.1} MiB",
        peak_rss / 1048576.0
    );
    assert!(
        peak_rss < 512.0 * 1048576.0,
        "broker RSS {peak_rss} over 512 MiB"
    );
    // The stalled one finally reads: everything, in order, from the log.
    let mut expected = 1;
    let read = async {
        while expected <= n {
            let m = stalled.next().await.unwrap().unwrap();
            assert_eq!(m.offset.get(), expected);
            expected += 1;
        }
    };
    tokio::time::timeout(DEADLINE, read).await.unwrap();
    // Served from the log on its stream, never resumed: nothing twice.
    assert_no_duplicates(&stalled_client);
    broker.assert_never_panicked();
}

fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}
