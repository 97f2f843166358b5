//! Network partitions between the nodes of a three-node cluster: real
//! packet filters on the nodes' peer ports (`volna_chaos::netfault`), the
//! device ports left open. What each scenario checks, at its end:
//! - every acknowledged publish is at its offset on every node, no offset
//!   holds a payload nobody published, no payload is stored twice;
//! - every replica of every partition holds the same state
//!   (`volna cluster verify`, by digest at one applied entry);
//! - every live subscriber received its channel gapless and without a
//!   duplicate, across the moves its client made;
//! - every publisher's acknowledged offsets grew in the order it issued
//!   its publishes.
//!
//! `a_leader_cut_off_from_its_peers_…` also measures what a device sees
//! (`VOLNA_CHAOS_CUTS` cuts, 20 by default): from the cut to the first
//! publish the majority side acknowledges, and to the last subscriber of
//! the cut-off node receiving again (on another node).

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use volna_chaos::History;
use volna_chaos::cluster::TestCluster;
use volna_chaos::netfault::NetCut;
use volna_client::{ChannelName, Client, ClientError, ConnectionState, Position};

const PARTITIONS: u32 = 6;
const CHANNELS: usize = 4;
/// Each publisher publishes at most this often (bounded load).
const PUBLISH_EVERY: Duration = Duration::from_millis(5);
/// Publishes per publisher, at most.
const MAX_PUBLISHES: u64 = 200_000;

/// Whether packet filters can be set here; `false` after saying why (a
/// failure under `CI=true`).
fn can_cut() -> bool {
    match NetCut::available() {
        Ok(()) => true,
        Err(why) => {
            volna_chaos::missing_dependency(&format!(
                "network partitions need root and nft (Debian nftables): {why}"
            ));
            false
        }
    }
}

async fn connect(cluster: &TestCluster, seeds: &[u64]) -> Client {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match Client::connect(cluster.client_config(seeds)).await {
            Ok(client) => return client,
            Err(e) if Instant::now() < deadline => {
                eprintln!("connect: {e}; retrying");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("cannot connect to {seeds:?}: {e}"),
        }
    }
}

/// Seeds starting at `first`, then the others in order.
fn seeds_from(first: u64) -> Vec<u64> {
    (0..3).map(|k| (first - 1 + k) % 3 + 1).collect()
}

/// The node (1-based) a client is connected to right now.
fn node_of(cluster: &TestCluster, client: &Client) -> Option<u64> {
    let ConnectionState::Connected { server, .. } = client.state() else {
        return None;
    };
    (1..=3u64).find(|id| cluster.nodes[(*id - 1) as usize].addr().to_string() == server)
}

/// One channel's traffic: what its publisher was told, when, and in which
/// order it issued the publishes.
#[derive(Default)]
struct Published {
    history: History,
    /// Acknowledged offsets in the order the publishes were issued.
    in_issue_order: Vec<u64>,
    ack_times: Vec<Instant>,
}

/// One subscriber's deliveries, as they arrived.
#[derive(Default)]
struct Received {
    deliveries: Vec<(u64, Vec<u8>, Instant)>,
    errors: Vec<String>,
}

struct Load {
    channels: Vec<ChannelName>,
    published: Vec<Arc<Mutex<Published>>>,
    received: Vec<(usize, Arc<Mutex<Received>>, Client)>,
    publishers: Vec<tokio::task::JoinHandle<()>>,
    readers: Vec<tokio::task::JoinHandle<()>>,
    stop: CancellationToken,
    stop_readers: CancellationToken,
}

async fn publish_until_stopped(
    client: Client,
    channel: ChannelName,
    tag: String,
    out: Arc<Mutex<Published>>,
    stop: CancellationToken,
) {
    let mut i = 0u64;
    while !stop.is_cancelled() && i < MAX_PUBLISHES {
        let body = format!("{tag}-{i}").into_bytes();
        match client.publish(&channel, body.clone()).await {
            Ok(ack) => {
                let mut p = out.lock().unwrap();
                assert!(
                    p.history.acked.insert(ack.offset.get(), body).is_none(),
                    "offset {} acknowledged twice",
                    ack.offset
                );
                p.in_issue_order.push(ack.offset.get());
                p.ack_times.push(Instant::now());
            }
            Err(e @ ClientError::Server { .. }) if !e.is_retryable() => {
                panic!("a publish refused for good during a partition: {e}")
            }
            Err(_) => out.lock().unwrap().history.unknown.push(body),
        }
        i += 1;
        tokio::time::sleep(PUBLISH_EVERY).await;
    }
    client.close().await;
}

async fn read_until_stopped(
    mut sub: volna_client::Subscription,
    out: Arc<Mutex<Received>>,
    stop: CancellationToken,
) {
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            next = sub.recv() => match next {
                Some(Ok(m)) => out.lock().unwrap().deliveries.push((
                    m.offset.get(),
                    m.payload.to_vec(),
                    Instant::now(),
                )),
                Some(Err(e)) => out.lock().unwrap().errors.push(e.to_string()),
                None => {
                    out.lock().unwrap().errors.push("the subscription ended".into());
                    return;
                }
            },
        }
    }
}

impl Load {
    /// A publisher per channel and three subscribers per channel, each
    /// client with every node as a seed, first seeds spread over the nodes.
    async fn start(cluster: &TestCluster, name: &str) -> Self {
        let stop = CancellationToken::new();
        let stop_readers = CancellationToken::new();
        let channels: Vec<ChannelName> = (0..CHANNELS)
            .map(|i| ChannelName::new(format!("chat.{name}{i}")).unwrap())
            .collect();
        let mut load = Self {
            channels: channels.clone(),
            published: Vec::new(),
            received: Vec::new(),
            publishers: Vec::new(),
            readers: Vec::new(),
            stop: stop.clone(),
            stop_readers: stop_readers.clone(),
        };
        for (c, channel) in channels.iter().enumerate() {
            for k in 0..3u64 {
                let client = connect(cluster, &seeds_from(k + 1)).await;
                let sub = client.subscribe(channel, Position::FIRST).await.unwrap();
                let out = Arc::new(Mutex::new(Received::default()));
                load.readers.push(tokio::spawn(read_until_stopped(
                    sub,
                    out.clone(),
                    stop_readers.clone(),
                )));
                load.received.push((c, out, client));
            }
        }
        for (c, channel) in channels.iter().enumerate() {
            let client = connect(cluster, &seeds_from(c as u64 % 3 + 1)).await;
            let out = Arc::new(Mutex::new(Published::default()));
            load.publishers.push(tokio::spawn(publish_until_stopped(
                client,
                channel.clone(),
                format!("{name}{c}"),
                out.clone(),
                stop.clone(),
            )));
            load.published.push(out);
        }
        load
    }

    fn acked(&self, channel: usize) -> usize {
        self.published[channel].lock().unwrap().ack_times.len()
    }

    async fn wait_for_acks(&self, more: usize, within: Duration) {
        let target: Vec<usize> = (0..CHANNELS).map(|c| self.acked(c) + more).collect();
        let deadline = Instant::now() + within;
        while (0..CHANNELS).any(|c| self.acked(c) < target[c]) {
            assert!(
                Instant::now() < deadline,
                "publishing did not go on within {within:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stops the publishers, lets the subscribers read everything that was
    /// acknowledged, and checks every node, every subscriber and every
    /// replica.
    async fn stop_and_check(self, cluster: &TestCluster) {
        self.stop.cancel();
        for publisher in self.publishers {
            tokio::time::timeout(Duration::from_secs(60), publisher)
                .await
                .expect("publishers stop")
                .unwrap();
        }
        let mut totals = (0usize, 0usize);
        for (c, channel) in self.channels.iter().enumerate() {
            let last = {
                let published = self.published[c].lock().unwrap();
                totals.0 += published.history.acked.len();
                totals.1 += published.history.unknown.len();
                assert!(
                    published.in_issue_order.windows(2).all(|w| w[0] < w[1]),
                    "{channel}: acknowledged offsets did not grow in issue order"
                );
                published.history.acked.keys().next_back().copied().unwrap()
            };
            for id in (1..=3).filter(|id| cluster.nodes[(*id - 1) as usize].is_running()) {
                let delivered = read_on(cluster, id, channel, last).await;
                self.published[c]
                    .lock()
                    .unwrap()
                    .history
                    .check(&delivered)
                    .unwrap_or_else(|v| panic!("{channel} on node {id}: {v}"));
            }
        }
        // Live subscribers: what they received is the log, once, in order
        // (a resume may re-deliver nothing and skip nothing).
        let deadline = Instant::now() + Duration::from_secs(60);
        for (c, received, client) in &self.received {
            let last = *self.published[*c]
                .lock()
                .unwrap()
                .history
                .acked
                .keys()
                .next_back()
                .unwrap();
            while received
                .lock()
                .unwrap()
                .deliveries
                .last()
                .is_none_or(|(o, _, _)| *o < last)
            {
                if Instant::now() >= deadline {
                    report_channel(cluster, &self.channels[*c]);
                }
                assert!(
                    Instant::now() < deadline,
                    "a live subscriber of {} did not reach offset {last}: it is at {:?}, its \
                     client {:?}, {} dropped as seen",
                    self.channels[*c],
                    received
                        .lock()
                        .unwrap()
                        .deliveries
                        .last()
                        .map(|(o, _, _)| *o),
                    client.state(),
                    client.duplicates_dropped(),
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        self.stop_readers.cancel();
        for (c, received, client) in self.received {
            let received = received.lock().unwrap();
            assert!(
                received.errors.is_empty(),
                "a live subscriber of {} saw {:?}",
                self.channels[c],
                received.errors
            );
            let delivered: Vec<(u64, Vec<u8>)> = received
                .deliveries
                .iter()
                .map(|(o, p, _)| (*o, p.clone()))
                .collect();
            self.published[c]
                .lock()
                .unwrap()
                .history
                .check(&delivered)
                .unwrap_or_else(|v| panic!("live subscriber of {}: {v}", self.channels[c]));
            drop(client);
        }
        for reader in self.readers {
            let _ = reader.await;
        }
        let report = cluster
            .verify()
            .unwrap_or_else(|report| panic!("replicas differ:\n{report}"));
        eprintln!("{report}");
        eprintln!(
            "{} publishes acknowledged, {} outcomes unknown; every replica identical",
            totals.0, totals.1
        );
        for node in &cluster.nodes {
            node.assert_never_panicked();
        }
    }
}

/// What every node says of `channel` and its partition (for a failure's
/// post-mortem).
fn report_channel(cluster: &TestCluster, channel: &ChannelName) {
    let partition = volna_cluster::partition_of(channel.as_str(), cluster.partitions).0 as usize;
    for (i, node) in cluster.nodes.iter().enumerate() {
        let meta = volna_chaos::cluster::admin_get(node, &format!("/admin/channels/{channel}"));
        let view = cluster
            .status(i as u64 + 1)
            .map(|s| s["partitions"][partition].clone());
        eprintln!(
            "node {} (devices at {}): {channel} {meta:?}; partition {partition}: {view:?}",
            i + 1,
            node.addr()
        );
    }
}

/// `channel` read from offset 1 through node `id` alone, up to `last`.
async fn read_on(
    cluster: &TestCluster,
    id: u64,
    channel: &ChannelName,
    last: u64,
) -> Vec<(u64, Vec<u8>)> {
    let client = connect(cluster, &[id]).await;
    let mut sub = client.subscribe(channel, Position::FIRST).await.unwrap();
    let delivered = volna_chaos::read_through(&mut sub, last, Duration::from_secs(60)).await;
    volna_chaos::assert_no_duplicates(&client);
    client.close().await;
    delivered
}

/// The `p` quantile of `sorted` (`None` when empty).
fn percentile(sorted: &[Duration], p: f64) -> Option<Duration> {
    let last = sorted.len().checked_sub(1)?;
    sorted.get((last as f64 * p).round() as usize).copied()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_cut_off_from_its_peers_steps_aside_and_its_devices_move() {
    if !can_cut() {
        return;
    }
    let cluster = TestCluster::start(3, PARTITIONS).await.unwrap();
    let load = Load::start(&cluster, "cut").await;
    load.wait_for_acks(50, Duration::from_secs(30)).await;
    let cuts: usize = volna_chaos::knob("VOLNA_CHAOS_CUTS", 20);
    let (mut first_acks, mut told, mut resumes) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..cuts {
        // The leader of one channel's partition: its clients still reach
        // it, its peers no longer do.
        let channel = &load.channels[round % CHANNELS];
        let asked = (round % 3) as u64 + 1;
        let leader = cluster.leader_of(channel.as_str(), asked).unwrap();
        let led: Vec<usize> = (0..CHANNELS)
            .filter(|c| cluster.leader_of(load.channels[*c].as_str(), asked) == Some(leader))
            .collect();
        let on_cut: Vec<usize> = load
            .received
            .iter()
            .enumerate()
            .filter(|(_, (_, _, client))| node_of(&cluster, client) == Some(leader))
            .map(|(i, _)| i)
            .collect();
        let cut = cluster.isolate(leader).unwrap();
        let cut_at = Instant::now();
        eprintln!("cut {round} at {:?}", std::time::SystemTime::now());
        // Every channel the cut-off node led is published to again through
        // the majority, and every subscriber that was on the cut-off node
        // receives again (it was told, and moved).
        let deadline = cut_at + Duration::from_secs(30);
        let mut first_ack = None;
        // When each of those subscribers' clients was off the cut-off node
        // (told by it, or gave up on it, and connected elsewhere).
        let mut left: Vec<Option<Duration>> = vec![None; on_cut.len()];
        let last_resume = loop {
            for (k, i) in on_cut.iter().enumerate() {
                if left[k].is_none() && node_of(&cluster, &load.received[*i].2) != Some(leader) {
                    left[k] = Some(cut_at.elapsed());
                }
            }
            let acked_after = |c: &usize| {
                let p = load.published[*c].lock().unwrap();
                p.ack_times
                    .iter()
                    .rev()
                    .take_while(|t| **t > cut_at)
                    .last()
                    .copied()
            };
            if first_ack.is_none() && led.iter().all(|c| acked_after(c).is_some()) {
                first_ack = led.iter().filter_map(acked_after).max().map(|t| t - cut_at);
            }
            let resumed: Vec<Option<Instant>> = on_cut
                .iter()
                .map(|i| {
                    let r = load.received[*i].1.lock().unwrap();
                    r.deliveries
                        .iter()
                        .rev()
                        .take_while(|(_, _, t)| *t > cut_at)
                        .last()
                        .map(|(_, _, t)| *t)
                })
                .collect();
            if first_ack.is_some() && resumed.iter().all(Option::is_some) {
                break resumed
                    .into_iter()
                    .flatten()
                    .map(|t| t - cut_at)
                    .max()
                    .unwrap_or_default();
            }
            assert!(
                Instant::now() < deadline,
                "cut {round} (node {leader} isolated): publishes or subscribers did not resume \
                 within 30 s (first ack {first_ack:?})"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        let first_ack = first_ack.unwrap_or_default();
        let last_told = left.iter().flatten().max().copied().unwrap_or_default();
        eprintln!(
            "cut {round}: node {leader} isolated (led {} channels, held {} subscribers): first \
             ack through the majority after {first_ack:?}, last subscriber off the node after \
             {last_told:?}, receiving again after {last_resume:?}",
            led.len(),
            on_cut.len()
        );
        first_acks.push(first_ack);
        // A cut-off node that held no subscriber has no device to tell.
        if !on_cut.is_empty() {
            told.push(last_told);
            resumes.push(last_resume);
        }
        cut.heal().unwrap();
        cluster
            .wait_for_leaders(Duration::from_secs(60))
            .await
            .unwrap();
        load.wait_for_acks(20, Duration::from_secs(30)).await;
    }
    first_acks.sort();
    told.sort();
    resumes.sort();
    eprintln!(
        "{cuts} cuts of a leader from its peers: first ack through the majority median {:?} max \
         {:?}; last subscriber off the cut-off node median {:?} max {:?}; last silent \
         subscriber receiving again median {:?} max {:?}",
        percentile(&first_acks, 0.5),
        first_acks.last(),
        percentile(&told, 0.5),
        told.last(),
        percentile(&resumes, 0.5),
        resumes.last(),
    );
    load.stop_and_check(&cluster).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flapping_links_a_minority_split_and_a_kill_lose_nothing_and_replicas_agree() {
    if !can_cut() {
        return;
    }
    let mut cluster = TestCluster::start(3, PARTITIONS).await.unwrap();
    let load = Load::start(&cluster, "flap").await;
    load.wait_for_acks(50, Duration::from_secs(30)).await;

    // A flapping link: one node cut and healed again and again, faster
    // than an election settles.
    let mut rng_state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move |range: u64| {
        rng_state ^= rng_state << 13;
        rng_state ^= rng_state >> 7;
        rng_state ^= rng_state << 17;
        rng_state % range
    };
    for flap in 0..15u64 {
        let node = flap % 3 + 1;
        let cut = cluster.isolate(node).unwrap();
        tokio::time::sleep(Duration::from_millis(200 + next(600))).await;
        cut.heal().unwrap();
        tokio::time::sleep(Duration::from_millis(200 + next(600))).await;
    }
    cluster
        .wait_for_leaders(Duration::from_secs(60))
        .await
        .unwrap();
    load.wait_for_acks(50, Duration::from_secs(30)).await;

    // A minority split ({1} | {2, 3}) for several election timeouts.
    let split = cluster.split(&[1]).unwrap();
    tokio::time::sleep(Duration::from_secs(4)).await;
    load.wait_for_acks(20, Duration::from_secs(30)).await;
    split.heal().unwrap();
    cluster
        .wait_for_leaders(Duration::from_secs(60))
        .await
        .unwrap();

    // A partition with a kill: node 1 cut off, then node 2 killed (no
    // quorum anywhere), node 2 back (quorum {2, 3}), then the cut heals.
    let cut = cluster.isolate(1).unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    cluster.nodes[1].kill().unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    cluster.nodes[1].start_again().unwrap();
    cluster.nodes[1]
        .wait_ready(Duration::from_secs(60))
        .await
        .unwrap();
    load.wait_for_acks(20, Duration::from_secs(60)).await;
    cut.heal().unwrap();
    cluster
        .wait_for_leaders(Duration::from_secs(60))
        .await
        .unwrap();
    load.wait_for_acks(50, Duration::from_secs(30)).await;
    let summary: BTreeMap<String, usize> = load
        .channels
        .iter()
        .enumerate()
        .map(|(c, ch)| (ch.to_string(), load.acked(c)))
        .collect();
    eprintln!("acknowledged per channel: {summary:?}");
    load.stop_and_check(&cluster).await;
}

/// Channels of the catch-up scenarios; those below `KNOWN` get messages
/// before the cut (the replica behind knows them, at an older head).
const RESUME_CHANNELS: usize = 1_000;
const KNOWN: usize = 500;
/// Messages each channel gets while the replica is cut off.
const WHILE_CUT: usize = 10;
/// Concurrent publishers (each takes a share of the channels).
const PUBLISHERS: usize = 25;
/// Devices resuming on the replica behind, one subscription each, spread
/// over this many connections.
const DEVICE_CONNECTIONS: usize = 20;

/// One channel's acknowledged history: its epoch and payload by offset.
#[derive(Default, Clone)]
struct Acked {
    epoch: Option<volna_client::Epoch>,
    payloads: BTreeMap<u64, Vec<u8>>,
}

/// Publishes `per_channel` messages to every channel of `channels`
/// through nodes 1 and 2, retrying what was not acknowledged (the client
/// retries under one producer sequence, so a retry is never stored twice).
async fn publish_rounds(
    cluster: &TestCluster,
    names: &Arc<Vec<ChannelName>>,
    channels: std::ops::Range<usize>,
    per_channel: usize,
    acked: &Arc<Mutex<Vec<Acked>>>,
) {
    let mut tasks = Vec::new();
    for p in 0..PUBLISHERS {
        let client = connect(cluster, &[1, 2]).await;
        let (names, acked, channels) = (names.clone(), acked.clone(), channels.clone());
        tasks.push(tokio::spawn(async move {
            for c in channels.filter(|c| c % PUBLISHERS == p) {
                for _ in 0..per_channel {
                    let body = format!("{}-{}", names[c], uuid_like(c)).into_bytes();
                    let deadline = Instant::now() + Duration::from_secs(60);
                    let ack = loop {
                        match client.publish(&names[c], body.clone()).await {
                            Ok(ack) => break ack,
                            Err(e) if e.is_retryable() && Instant::now() < deadline => {
                                tokio::time::sleep(Duration::from_millis(50)).await;
                            }
                            Err(e) => panic!("publish to {} failed: {e}", names[c]),
                        }
                    };
                    let mut acked = acked.lock().unwrap();
                    let channel = &mut acked[c];
                    assert!(
                        channel.epoch.is_none_or(|e| e == ack.epoch),
                        "{} acknowledged in two epochs",
                        names[c]
                    );
                    channel.epoch = Some(ack.epoch);
                    assert!(
                        channel.payloads.insert(ack.offset.get(), body).is_none(),
                        "{} offset {} acknowledged twice",
                        names[c],
                        ack.offset
                    );
                }
            }
            client.close().await;
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
}

/// A payload no other publish has (the history check refuses duplicates).
fn uuid_like(c: usize) -> String {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("{c}-{n}")
}

/// Node 3 is cut off while `RESUME_CHANNELS` channels get `WHILE_CUT`
/// messages each (half of them created meanwhile); the moment the cut
/// heals, devices resume every channel on node 3 alone, each from an
/// offset it saw elsewhere in the channel's epoch. Node 3 is behind
/// (replaying the entries it missed, or installing snapshots of the
/// partitions when the leaders compacted them away), yet every device
/// must get exactly its channel's acknowledged messages from its offset
/// on, with no `EpochChanged` or `Truncated` the leader would not send.
/// Returns how many subscribes node 3 started from its leaders' view.
async fn resume_on_a_replica_behind(cluster: &TestCluster, tag: &str) -> u64 {
    let names: Arc<Vec<ChannelName>> = Arc::new(
        (0..RESUME_CHANNELS)
            .map(|c| ChannelName::new(format!("{tag}.{c}")).unwrap())
            .collect(),
    );
    let acked = Arc::new(Mutex::new(vec![Acked::default(); RESUME_CHANNELS]));
    publish_rounds(cluster, &names, 0..KNOWN, 2, &acked).await;
    // Node 3 has applied the channels known so far before it is cut off.
    for c in [0, KNOWN - 1] {
        let last = acked.lock().unwrap()[c].payloads.len() as u64;
        read_on(cluster, 3, &names[c], last).await;
    }
    let cut = cluster.isolate(3).unwrap();
    let started = Instant::now();
    publish_rounds(cluster, &names, 0..RESUME_CHANNELS, WHILE_CUT, &acked).await;
    eprintln!(
        "{tag}: {} messages acknowledged while node 3 was cut off, in {:?}",
        RESUME_CHANNELS * WHILE_CUT,
        started.elapsed()
    );
    let behind = cluster.status(3).map(|s| s["partitions"].clone());
    cut.heal().unwrap();
    let healed = Instant::now();
    let acked = Arc::new(acked.lock().unwrap().clone());
    let (mut devices, mut clients) = (Vec::new(), Vec::new());
    for d in 0..DEVICE_CONNECTIONS {
        let (names, acked) = (names.clone(), acked.clone());
        let client = Arc::new(connect(cluster, &[3]).await);
        for c in (0..RESUME_CHANNELS).filter(|c| c % DEVICE_CONNECTIONS == d) {
            let (names, acked, client) = (names.clone(), acked.clone(), client.clone());
            devices.push(tokio::spawn(async move {
                let channel = &acked[c];
                let last = *channel.payloads.keys().last().unwrap();
                // Somewhere in what the device saw: from its first message
                // to its last (a device that has seen everything waits).
                let from = 1 + (c as u64 * 7) % last;
                let position = Position::From {
                    offset: volna_client::Offset::new(from),
                    epoch: channel.epoch,
                };
                let deadline = Instant::now() + Duration::from_secs(60);
                let mut sub = loop {
                    match client.subscribe(&names[c], position).await {
                        Ok(sub) => break sub,
                        Err(e) if e.is_retryable() && Instant::now() < deadline => {
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                        Err(e) => panic!("subscribe to {} on node 3 failed: {e}", names[c]),
                    }
                };
                let got = volna_chaos::read_through(&mut sub, last, Duration::from_secs(60)).await;
                let want: Vec<(u64, Vec<u8>)> = channel
                    .payloads
                    .range(from..)
                    .map(|(o, p)| (*o, p.clone()))
                    .collect();
                assert_eq!(
                    got.len(),
                    want.len(),
                    "{}: resumed at {from}, delivered {:?}",
                    names[c],
                    got.iter().map(|(o, _)| o).collect::<Vec<_>>()
                );
                assert!(got == want, "{}: a payload differs", names[c]);
            }));
        }
        clients.push(client);
    }
    for device in devices {
        device.await.unwrap();
    }
    for client in &clients {
        volna_chaos::assert_no_duplicates(client);
    }
    eprintln!(
        "{tag}: {RESUME_CHANNELS} devices resumed on node 3 and received their channels in {:?} \
         after the cut healed (node 3's partitions when the cut healed: {behind:?})",
        healed.elapsed()
    );
    let status = cluster.status(3).unwrap();
    status["replica_corrections"].as_u64().unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_resuming_on_a_replica_behind_see_only_what_the_leader_would_send() {
    if !can_cut() {
        return;
    }
    // Behind by entries: the leaders still hold everything node 3 missed.
    let lagging = TestCluster::start(3, PARTITIONS).await.unwrap();
    let corrected = resume_on_a_replica_behind(&lagging, "lag").await;
    eprintln!("lagging replica: {corrected} subscribes started from the leader's view");
    assert!(
        corrected > 0,
        "no device met node 3 behind: the scenario did not test a lagging replica"
    );
    lagging.assert_replicas_agree();
    drop(lagging);
    // Behind by snapshots: the leaders compacted what node 3 missed.
    let compacted = TestCluster::start_with_snapshots(3, PARTITIONS, 50)
        .await
        .unwrap();
    let corrected = resume_on_a_replica_behind(&compacted, "snap").await;
    let installed = compacted.status(3).unwrap()["snapshots_installed"]
        .as_u64()
        .unwrap_or(0);
    eprintln!(
        "restoring replica: {installed} snapshots installed on node 3, {corrected} subscribes \
         started from the leader's view"
    );
    assert!(installed > 0, "node 3 caught up without a snapshot");
    compacted.assert_replicas_agree();
}
