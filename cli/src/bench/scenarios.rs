//! The scenarios against a broker. Each builds its channels and
//! connections from [`workload`], runs, and returns the JSON summary.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures_util::future::try_join_all;
use hdrhistogram::Histogram;
use serde_json::{Value, json};
use volna_client::{ChannelName, Client, Position};

use super::workload::{self, Shape, Totals};
use super::{BenchArgs, Scenario, Target, summary};

fn deadline(args: &BenchArgs) -> tokio::time::Instant {
    tokio::time::Instant::now() + Duration::from_secs(args.timeout_secs)
}

/// One fresh channel and its live subscribers, each read by a task that
/// expects `--messages` messages.
struct Audience {
    channel: ChannelName,
    clients: Vec<Client>,
    readers: workload::Readers,
    expected: u64,
    connect_rate: f64,
    ticker: tokio::task::JoinHandle<()>,
}

async fn audience(
    prefix: &str,
    subscribers: usize,
    args: &BenchArgs,
    target: &Target,
    bar: &indicatif::ProgressBar,
    phase: &'static str,
    milestones: &[workload::Milestone],
) -> anyhow::Result<Audience> {
    let channel = workload::fresh_channel(prefix, rand::random(), 0)?;
    let specs = vec![(channel.clone(), Position::Latest); subscribers];
    let (clients, subs, connect_rate) = workload::connect_subscribers(target, &specs, bar).await?;
    let readers = workload::Readers::spawn(subs, None, args.messages, deadline(args), milestones);
    let expected = args.messages * subscribers as u64;
    bar.set_message(phase);
    bar.set_length(expected);
    Ok(Audience {
        channel,
        clients,
        ticker: workload::follow(bar, &readers.delivered),
        readers,
        expected,
        connect_rate,
    })
}

/// `publishers` clients splitting `messages` to `channel` between them, at
/// `rate` per second in all.
async fn publish_split(
    target: &Target,
    channel: &ChannelName,
    publishers: usize,
    messages: u64,
    payload: usize,
    rate: f64,
) -> anyhow::Result<(Vec<Client>, Histogram<u64>)> {
    let mut clients = Vec::with_capacity(publishers);
    for _ in 0..publishers {
        clients.push(
            Client::connect(target.client.clone())
                .await
                .context("connecting a publisher")?,
        );
    }
    let per_rate = rate / publishers as f64;
    let shares = (0..publishers as u64)
        .map(|i| messages / publishers as u64 + u64::from(i < messages % publishers as u64));
    let histograms = try_join_all(
        clients
            .iter()
            .zip(shares)
            .map(|(c, n)| workload::publish_all(c, channel, n, payload, per_rate)),
    )
    .await?;
    Ok((clients, merged_acks(&histograms)?))
}

/// The publishers' ack latencies as one histogram.
fn merged_acks(histograms: &[Histogram<u64>]) -> anyhow::Result<Histogram<u64>> {
    let mut acks = workload::ack_histogram()?;
    for h in histograms {
        acks.add(h).context("merging ack latencies")?;
    }
    Ok(acks)
}

/// One channel, `--publishers` publishers, `--subscribers` subscribers.
pub async fn fanout(args: &BenchArgs, target: &Target, json_out: bool) -> anyhow::Result<Value> {
    let bar = workload::progress(json_out);
    let Audience {
        channel,
        clients,
        readers,
        expected,
        connect_rate,
        ticker,
    } = audience(
        "bench.fanout",
        args.subscribers,
        args,
        target,
        &bar,
        "delivering",
        &[],
    )
    .await?;

    let run = Run::start(target).await;
    let (publishers, acks) = publish_split(
        target,
        &channel,
        args.publishers,
        args.messages,
        args.payload,
        args.rate as f64,
    )
    .await?;
    let publish_secs = run.elapsed();
    let totals = readers.collect(args.messages, expected).await?;
    let shape = Shape {
        connections: args.subscribers + args.publishers,
        subscribers: args.subscribers,
        publishers: args.publishers,
        channels: 1,
    };
    let outcome = Outcome {
        scenario: Scenario::Fanout,
        shape,
        payload: args.payload,
        totals,
        publish_secs,
        connect_rate,
        extra: json!({
            "ack_p50_us": acks.value_at_quantile(0.50),
            "ack_p99_us": acks.value_at_quantile(0.99),
        }),
    };
    Ok(run
        .conclude(
            target,
            &bar,
            Some(ticker),
            clients.iter().chain(&publishers),
            outcome,
        )
        .await)
}

/// `--channels` channels, `--subscribers` each, one publisher each.
pub async fn chats(args: &BenchArgs, target: &Target, json_out: bool) -> anyhow::Result<Value> {
    let tag = rand::random();
    let channels = (0..args.channels)
        .map(|i| workload::fresh_channel("bench.chat", tag, i))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let bar = workload::progress(json_out);
    let specs: Vec<_> = channels
        .iter()
        .flat_map(|c| std::iter::repeat_n((c.clone(), Position::Latest), args.subscribers))
        .collect();
    let (clients, subs, connect_rate) = workload::connect_subscribers(target, &specs, &bar).await?;
    let readers = workload::Readers::spawn(subs, None, args.messages, deadline(args), &[]);
    let published = args.messages * args.channels as u64;
    let expected = published * args.subscribers as u64;
    bar.set_message("delivering");
    bar.set_length(expected);
    let ticker = workload::follow(&bar, &readers.delivered);

    let run = Run::start(target).await;
    // Each chat's share, fractions included (1,000 chats at 200 msg/s in
    // all send once every 5 s each).
    let rate = args.rate as f64 / args.channels as f64;
    let publishers = try_join_all(
        channels
            .iter()
            .map(|channel| publish_split(target, channel, 1, args.messages, args.payload, rate)),
    )
    .await?;
    let publishers: Vec<Vec<Client>> = publishers.into_iter().map(|(c, _)| c).collect();
    let publish_secs = run.elapsed();
    let totals = readers.collect(published, expected).await?;
    let shape = Shape {
        connections: specs.len() + args.channels,
        subscribers: specs.len(),
        publishers: args.channels,
        channels: args.channels,
    };
    let outcome = Outcome {
        scenario: Scenario::Chats,
        shape,
        payload: args.payload,
        totals,
        publish_secs,
        connect_rate,
        extra: json!({}),
    };
    Ok(run
        .conclude(
            target,
            &bar,
            Some(ticker),
            clients.iter().chain(publishers.iter().flatten()),
            outcome,
        )
        .await)
}

/// `--channels` inboxes, one subscriber each, `--per-connection` to a
/// connection; a publisher connection per group, on `--publish-server`
/// when given.
pub async fn inboxes(args: &BenchArgs, target: &Target, json_out: bool) -> anyhow::Result<Value> {
    let tag = rand::random();
    let held = if args.edges {
        Some(held_partitions(target).await?)
    } else {
        None
    };
    let mut channels = Vec::with_capacity(args.channels);
    for i in 0.. {
        if channels.len() == args.channels {
            break;
        }
        let channel = workload::fresh_channel("bench.inbox", tag, i)?;
        if let Some(held) = &held {
            let partition = volna_proto::partition_index(channel.as_str(), held.len() as u32);
            if held[partition as usize] {
                continue;
            }
        }
        channels.push(channel);
    }
    let groups: Vec<&[ChannelName]> = channels.chunks(args.per_connection.max(1)).collect();
    let bar = workload::progress(json_out);
    let (clients, subs, connect_rate) = workload::connect_groups(target, &groups, &bar).await?;
    let readers = workload::Readers::spawn(subs, None, args.messages, deadline(args), &[]);
    let published = args.messages * args.channels as u64;
    bar.set_message("delivering");
    bar.set_length(published);
    let ticker = workload::follow(&bar, &readers.delivered);

    let mut config = target.client.clone();
    if let Some(server) = &args.publish_server {
        config.servers = vec![server.clone()];
    }
    let mut publishers = Vec::with_capacity(groups.len());
    for _ in &groups {
        publishers.push(
            Client::connect(config.clone())
                .await
                .context("connecting a publisher")?,
        );
    }
    let http = target.admin.http.clone();
    // Every inter-node byte the subscribers' node takes in: with
    // `--publish-server` on another node, its upstreams' (and heartbeats').
    let peer_bytes =
        async || workload::broker_metric(&http, "volna_cluster_peer_bytes_received_total").await;
    let peer_bytes_before = peer_bytes().await;
    // Readers let their subscription go once they have every message:
    // the upstreams are counted while the run goes, at their most.
    let upstreams_most = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let _sampler = {
        let (http, most) = (http.clone(), upstreams_most.clone());
        AbortOnDrop(tokio::spawn(async move {
            loop {
                if let Some(now) = workload::broker_metric(&http, "volna_cluster_upstreams").await {
                    most.fetch_max(now as u64, std::sync::atomic::Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }))
    };
    let run = Run::start(target).await;
    let rate = args.rate as f64 / groups.len() as f64;
    let histograms = try_join_all(publishers.iter().zip(&groups).map(|(publisher, group)| {
        workload::publish_rounds(publisher, group, args.messages, args.payload, rate)
    }))
    .await?;
    let acks = merged_acks(&histograms)?;
    let publish_secs = run.elapsed();
    let totals = readers.collect(published, published).await?;
    let upstreams = upstreams_most.load(std::sync::atomic::Ordering::Relaxed);
    let peer_bytes_per_message = peer_bytes()
        .await
        .zip(peer_bytes_before)
        .map(|(after, before)| (after - before) / published.max(1) as f64);
    let shape = Shape {
        connections: groups.len() * 2,
        subscribers: args.channels,
        publishers: groups.len(),
        channels: args.channels,
    };
    let outcome = Outcome {
        scenario: Scenario::Inboxes,
        shape,
        payload: args.payload,
        totals,
        publish_secs,
        connect_rate,
        extra: json!({
            "ack_p50_us": acks.value_at_quantile(0.50),
            "ack_p99_us": acks.value_at_quantile(0.99),
            "upstreams_most": upstreams,
            "peer_bytes_received_per_message": peer_bytes_per_message,
        }),
    };
    Ok(run
        .conclude(
            target,
            &bar,
            Some(ticker),
            clients.iter().chain(&publishers),
            outcome,
        )
        .await)
}

/// A task that ends with its owner, however the owner leaves.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Per partition, whether the target cluster node holds a replica of it.
async fn held_partitions(target: &Target) -> anyhow::Result<Vec<bool>> {
    let status = target.admin.call("GET", "/admin/cluster", None).await?;
    let partitions = status["partitions"]
        .as_array()
        .context("the target is no cluster node (its /admin/cluster lists no partitions)")?;
    let held: Vec<bool> = partitions.iter().map(|p| p["hosted"] == true).collect();
    if held.iter().all(|h| *h) {
        bail!("the target node holds every partition: no channel is an edge there");
    }
    Ok(held)
}

/// Pre-fill one channel, then `--subscribers` replay it from offset 1.
pub async fn catchup(args: &BenchArgs, target: &Target, json_out: bool) -> anyhow::Result<Value> {
    let tag = rand::random();
    let channel = workload::fresh_channel("bench.catchup", tag, 0)?;
    let bar = workload::progress(json_out);
    bar.set_message("pre-filling");
    let fill_started = Instant::now();
    let (publishers, _) = publish_split(
        target,
        &channel,
        args.publishers,
        args.messages,
        args.payload,
        args.rate as f64,
    )
    .await?;
    let publish_secs = fill_started.elapsed().as_secs_f64();

    // The clock starts with the first subscribe: connecting is part of
    // catching up.
    let run = Run::start(target).await;
    let specs = vec![(channel.clone(), Position::FIRST); args.subscribers];
    let (clients, subs, connect_rate) = workload::connect_subscribers(target, &specs, &bar).await?;
    let readers = workload::Readers::spawn(subs, Some(1), args.messages, deadline(args), &[]);
    let expected = args.messages * args.subscribers as u64;
    bar.set_message("replaying");
    bar.set_length(expected);
    let ticker = workload::follow(&bar, &readers.delivered);
    let totals = readers.collect(args.messages, expected).await?;
    let replay_rate = totals.received as f64 / run.elapsed();
    let shape = Shape {
        connections: args.subscribers + args.publishers,
        subscribers: args.subscribers,
        publishers: args.publishers,
        channels: 1,
    };
    let outcome = Outcome {
        scenario: Scenario::Catchup,
        shape,
        payload: args.payload,
        totals,
        publish_secs,
        connect_rate,
        extra: json!({ "replay_messages_per_sec": replay_rate }),
    };
    Ok(run
        .conclude(
            target,
            &bar,
            Some(ticker),
            clients.iter().chain(&publishers),
            outcome,
        )
        .await)
}

/// `--connections` idle connections, one inbox each; then a message each.
pub async fn connections(
    args: &BenchArgs,
    target: &Target,
    json_out: bool,
) -> anyhow::Result<Value> {
    let tag = rand::random();
    let inboxes = (0..args.connections)
        .map(|i| workload::fresh_channel("bench.inbox", tag, i))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let rss_before = workload::broker_rss(&target.admin.http).await;
    let bar = workload::progress(json_out);
    let specs: Vec<_> = inboxes
        .iter()
        .map(|c| (c.clone(), Position::Latest))
        .collect();
    let (clients, subs, connect_rate) = workload::connect_subscribers(target, &specs, &bar).await?;
    bar.set_message("holding");
    tokio::time::sleep(Duration::from_secs(args.hold_secs)).await;
    let rss_held = workload::broker_rss(&target.admin.http).await;

    // Every connection still works: one message to each inbox.
    let readers = workload::Readers::spawn(subs, None, 1, deadline(args), &[]);
    let publisher = Client::connect(target.client.clone())
        .await
        .context("connecting the publisher")?;
    let run = Run::start(target).await;
    workload::publish_each(&publisher, &inboxes, args.payload).await?;
    let publish_secs = run.elapsed();
    let inboxes_count = inboxes.len() as u64;
    let totals = readers.collect(inboxes_count, inboxes_count).await?;
    let per_connection = rss_before
        .zip(rss_held)
        .map(|(before, held)| held.saturating_sub(before) / args.connections as u64);
    let shape = Shape {
        connections: args.connections + 1,
        subscribers: args.connections,
        publishers: 1,
        channels: args.connections,
    };
    let outcome = Outcome {
        scenario: Scenario::Connections,
        shape,
        payload: args.payload,
        totals,
        publish_secs,
        connect_rate,
        extra: json!({
            "broker_rss_before_bytes": rss_before,
            "broker_rss_per_connection_bytes": per_connection,
            "held_secs": args.hold_secs,
        }),
    };
    Ok(run
        .conclude(
            target,
            &bar,
            None,
            clients.iter().chain([&publisher]),
            outcome,
        )
        .await)
}

/// `--connections` subscribers kicked at once while publishing goes on.
pub async fn storm(args: &BenchArgs, target: &Target, json_out: bool) -> anyhow::Result<Value> {
    if target.admin.token.is_none() {
        bail!(
            "the storm scenario disconnects its clients through the admin API: give --admin-token"
        );
    }
    let bar = workload::progress(json_out);
    // Half the messages before the storm, half while everyone reconnects.
    // The channel is fresh: every subscriber that saw offset `before` had
    // all of the first half (the kick waits for that, so that the storm
    // measures reconnecting, not a backlog), and one that saw `before + 1`
    // has resumed.
    let before = (args.messages / 2).max(1);
    let settled = workload::Milestone::new(before, args.connections);
    let resumed = workload::Milestone::new(before + 1, args.connections);
    let Audience {
        channel,
        clients,
        readers,
        expected,
        connect_rate,
        ticker,
    } = audience(
        "bench.storm",
        args.connections,
        args,
        target,
        &bar,
        "storm",
        &[settled.clone(), resumed.clone()],
    )
    .await?;
    let publisher = Client::connect(target.client.clone())
        .await
        .context("connecting the publisher")?;

    let run = Run::start(target).await;
    workload::publish_all(&publisher, &channel, before, args.payload, 0.0).await?;
    let settle_by = deadline(args);
    while settled.reached_at().is_none() {
        if tokio::time::Instant::now() >= settle_by {
            bail!("the subscribers did not receive the first half before the timeout");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let kicked_at = Instant::now();
    let kicked = target
        .admin
        .call(
            "POST",
            "/admin/kick",
            Some(json!({ "user": target.client.token })),
        )
        .await
        .context("kicking the bench's sessions")?;
    let after = args.messages - before;
    workload::publish_all(&publisher, &channel, after, args.payload, args.rate as f64).await?;
    let publish_secs = run.elapsed();
    let totals = readers.collect(args.messages, expected).await?;
    let delivered_secs = kicked_at.elapsed().as_secs_f64();
    let resumed_secs = resumed
        .reached_at()
        .map(|at| at.saturating_duration_since(kicked_at).as_secs_f64());
    let shape = Shape {
        connections: args.connections + 1,
        subscribers: args.connections,
        publishers: 1,
        channels: 1,
    };
    let outcome = Outcome {
        scenario: Scenario::Storm,
        shape,
        payload: args.payload,
        totals,
        publish_secs,
        connect_rate,
        extra: json!({
            "sessions_kicked": kicked["disconnected"],
            // Every subscriber reconnected and received its first message
            // published after the kick (null: some never did).
            "all_resumed_within_s": resumed_secs,
            // ...and every message, to every subscriber.
            "all_delivered_within_s": delivered_secs,
        }),
    };
    Ok(run
        .conclude(
            target,
            &bar,
            Some(ticker),
            clients.iter().chain([&publisher]),
            outcome,
        )
        .await)
}

/// The measured phase of a run: its clock and CPU meters.
struct Run {
    started: Instant,
    cpu: workload::CpuMeter,
    /// With `--ack`: the broker's ack and cursor-write counters at start.
    cursors: Option<(f64, f64)>,
}

/// What a scenario measured, for the summary.
struct Outcome {
    scenario: Scenario,
    shape: Shape,
    payload: usize,
    totals: Totals,
    publish_secs: f64,
    connect_rate: f64,
    extra: Value,
}

impl Run {
    async fn start(target: &Target) -> Self {
        let cursors = if target.acks() {
            Some(cursor_counters(target).await)
        } else {
            None
        };
        Self {
            cpu: workload::CpuMeter::start(Some(&target.admin.http)).await,
            started: Instant::now(),
            cursors,
        }
    }

    fn elapsed(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    /// Ends the run once its deliveries are counted: stops the clock and
    /// the progress display, reads the broker's memory, closes the clients
    /// and builds the summary.
    async fn conclude<'a>(
        self,
        target: &Target,
        bar: &indicatif::ProgressBar,
        ticker: Option<tokio::task::JoinHandle<()>>,
        clients: impl Iterator<Item = &'a Client>,
        outcome: Outcome,
    ) -> Value {
        let duration = self.elapsed();
        let cpu = self.cpu.finish().await;
        if let Some(ticker) = ticker {
            ticker.abort();
        }
        bar.finish_and_clear();
        let rss = workload::broker_rss(&target.admin.http).await;
        let mut extra = outcome.extra;
        if let Some((acks_at_start, writes_at_start)) = self.cursors {
            // The clients' last acknowledgements are on their way: read
            // the counters once they are sent (one interval and a flush).
            tokio::time::sleep(Duration::from_millis(500)).await;
            let (acks, writes) = cursor_counters(target).await;
            let acks = acks - acks_at_start;
            extra["acks"] = json!(acks);
            extra["acks_per_sec"] = json!(acks / duration.max(1e-9));
            extra["cursor_writes"] = json!(writes - writes_at_start);
        }
        close(clients).await;
        summary(
            outcome.scenario,
            outcome.shape,
            outcome.payload,
            &outcome.totals,
            outcome.publish_secs,
            duration,
            outcome.connect_rate,
            rss,
            cpu,
            extra,
        )
    }
}

/// The broker's `Ack` requests and cursor values written so far.
async fn cursor_counters(target: &Target) -> (f64, f64) {
    let http = &target.admin.http;
    (
        workload::broker_metric(http, "volna_cursor_acks_total")
            .await
            .unwrap_or(0.0),
        workload::broker_metric(http, "volna_cursor_writes_total")
            .await
            .unwrap_or(0.0),
    )
}

/// Closes every client and gives their close frames a moment to leave:
/// a generator that exits at once leaves its sessions open on the broker
/// until their idle timeout, and the next run measures a busier broker.
async fn close<'a>(clients: impl Iterator<Item = &'a Client>) {
    // Clients on their own socket wait for their close to leave; those
    // sharing one are given the moment below.
    futures_util::future::join_all(clients.map(Client::close)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
}
