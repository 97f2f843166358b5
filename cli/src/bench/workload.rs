//! What every scenario is built from: connecting subscribers, publishing
//! timestamped payloads, reading and checking deliveries, adding it up.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use bytes::{BufMut, Bytes, BytesMut};
use futures_util::stream::FuturesUnordered;
use futures_util::{FutureExt, StreamExt};
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressStyle};
use tokio::task::JoinHandle;
use volna_client::{ChannelName, Client, Endpoint, Position, Published, Subscription};

use super::{BenchArgs, Target};

/// Connections being set up at once.
const CONNECT_CONCURRENCY: usize = 64;
/// Publishes one publisher keeps queued beyond the client's in-flight bound.
const PUBLISH_WINDOW: usize = 256;

/// Refuses flag combinations no scenario can run.
pub fn check_args(args: &BenchArgs) -> anyhow::Result<()> {
    if args.payload < 16 {
        bail!("--payload must be at least 16 bytes (send time and sequence)");
    }
    if args.subscribers == 0 || args.messages == 0 || args.publishers == 0 {
        bail!("--subscribers, --publishers and --messages must be at least 1");
    }
    if args.nats.is_some()
        && !matches!(
            args.scenario,
            super::Scenario::Fanout | super::Scenario::Chats
        )
    {
        bail!("--nats runs only the fanout and chats scenarios");
    }
    if args.ack
        && (args.nats.is_some()
            || !matches!(
                args.scenario,
                super::Scenario::Fanout | super::Scenario::Chats
            ))
    {
        bail!("--ack runs only the fanout and chats scenarios, against Volna");
    }
    if args.channels == 0 || args.connections == 0 || args.client_endpoints == 0 {
        bail!("--channels, --connections and --client-endpoints must be at least 1");
    }
    Ok(())
}

/// Who took part.
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    pub connections: usize,
    pub subscribers: usize,
    pub publishers: usize,
    pub channels: usize,
}

/// Shards of [`Latencies`]: more than the runtime has threads, so readers
/// recording at once rarely share a lock.
const LATENCY_SHARDS: usize = 16;

/// The end-to-end latencies of a run, recorded by every reader. One
/// histogram per subscriber would cost 60–140 KB each (three significant
/// digits up to seconds): at 100,000 subscribers, the generator's largest
/// allocation. Readers share a few, each by its own index.
#[derive(Debug, Clone)]
pub struct Latencies(Arc<[Mutex<Histogram<u64>>]>);

impl Latencies {
    /// No latencies yet.
    pub fn new() -> Self {
        Self(
            (0..LATENCY_SHARDS)
                .map(|_| Mutex::new(histogram()))
                .collect(),
        )
    }

    /// Records the latency of `payload`, which starts with its send time.
    pub fn record(&self, shard: usize, payload: &[u8]) {
        let mut histogram = self.0[shard % self.0.len()]
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        record_latency(&mut histogram, payload);
    }

    /// Every shard added up.
    pub fn merged(&self) -> anyhow::Result<Histogram<u64>> {
        let mut all = histogram();
        for shard in self.0.iter() {
            all.add(&*shard.lock().unwrap_or_else(|e| e.into_inner()))
                .context("merging histograms")?;
        }
        Ok(all)
    }
}

/// The moment the last of a set of readers first saw a given offset: in a
/// storm, when every subscriber has reconnected, resumed and caught up to
/// the messages published after its disconnection.
#[derive(Debug, Clone)]
pub struct Milestone(Arc<MilestoneState>);

#[derive(Debug)]
struct MilestoneState {
    offset: u64,
    remaining: AtomicU64,
    reached_at: Mutex<Option<Instant>>,
}

impl Milestone {
    /// Waits for `readers` readers to see `offset`.
    pub fn new(offset: u64, readers: usize) -> Self {
        Self(Arc::new(MilestoneState {
            offset,
            remaining: AtomicU64::new(readers as u64),
            reached_at: Mutex::new(None),
        }))
    }

    /// When the last reader got there, if all did.
    pub fn reached_at(&self) -> Option<Instant> {
        *self.0.reached_at.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn passed(&self) {
        if self.0.remaining.fetch_sub(1, Ordering::AcqRel) == 1 {
            *self.0.reached_at.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
        }
    }
}

/// What one subscriber saw.
#[derive(Debug)]
pub struct Received {
    messages: u64,
    duplicates: u64,
    out_of_order: u64,
    latencies: Latencies,
    shard: usize,
    /// Milestones this reader has yet to pass.
    milestones: Vec<Milestone>,
}

impl Received {
    /// Nothing seen yet by reader number `shard`, which records its
    /// latencies into `latencies`.
    pub fn new(latencies: &Latencies, shard: usize) -> Self {
        Self {
            messages: 0,
            duplicates: 0,
            out_of_order: 0,
            latencies: latencies.clone(),
            shard,
            milestones: Vec::new(),
        }
    }

    /// Counts this reader towards each of `milestones` once it sees its
    /// offset.
    pub fn towards(mut self, milestones: &[Milestone]) -> Self {
        self.milestones = milestones.to_vec();
        self
    }

    /// Notes that offset `offset` arrived.
    fn saw_offset(&mut self, offset: u64) {
        self.milestones.retain(|m| {
            let passed = offset >= m.0.offset;
            if passed {
                m.passed();
            }
            !passed
        });
    }

    /// Messages counted so far.
    pub fn count(&self) -> u64 {
        self.messages
    }

    /// Counts one delivery (duplicates are not counted as messages).
    pub fn record(&mut self, duplicate: bool, out_of_order: bool, payload: &[u8]) {
        if duplicate {
            self.duplicates += 1;
            return;
        }
        if out_of_order {
            self.out_of_order += 1;
        }
        self.messages += 1;
        self.latencies.record(self.shard, payload);
    }
}

/// Every subscriber's deliveries added up.
#[derive(Debug)]
pub struct Totals {
    pub published: u64,
    pub expected: u64,
    pub received: u64,
    pub duplicates: u64,
    pub out_of_order: u64,
    pub latency_us: Histogram<u64>,
}

impl Totals {
    /// Waits for every reader and adds up what they saw.
    pub async fn collect(
        published: u64,
        expected: u64,
        readers: Vec<JoinHandle<Received>>,
        latencies: &Latencies,
    ) -> anyhow::Result<Self> {
        let mut totals = Totals {
            published,
            expected,
            received: 0,
            duplicates: 0,
            out_of_order: 0,
            latency_us: histogram(),
        };
        for reader in readers {
            let r = reader.await.context("a subscriber task failed")?;
            totals.received += r.messages;
            totals.duplicates += r.duplicates;
            totals.out_of_order += r.out_of_order;
        }
        totals.latency_us = latencies.merged()?;
        Ok(totals)
    }
}

fn histogram() -> Histogram<u64> {
    // Three significant digits is a valid precision: this cannot fail.
    Histogram::new(3).unwrap_or_else(|_| unreachable!("precision 3 is valid"))
}

/// A progress bar on stderr, hidden when the output is JSON.
pub fn progress(json_out: bool) -> ProgressBar {
    let bar = ProgressBar::new(0).with_style(
        ProgressStyle::with_template("{msg:>12} [{bar:40}] {pos}/{len} {per_sec}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    if json_out {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    bar
}

/// Keeps `bar` at `counter`'s value until aborted.
pub fn follow(bar: &ProgressBar, counter: &Arc<AtomicU64>) -> JoinHandle<()> {
    let (bar, counter) = (bar.clone(), counter.clone());
    tokio::spawn(async move {
        loop {
            bar.set_position(counter.load(Ordering::Relaxed));
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
}

/// A channel name no earlier run used.
pub fn fresh_channel(prefix: &str, run: u32, i: usize) -> anyhow::Result<ChannelName> {
    Ok(ChannelName::new(format!("{prefix}.{run:08x}.{i}"))?)
}

/// Binds the generator's `--client-endpoints` sockets, of the address
/// family of `server` (`host:port`), each with `--socket-buffer` asked for.
pub fn bind_endpoints(server: &str, args: &BenchArgs) -> anyhow::Result<Vec<Endpoint>> {
    let local: SocketAddr = if server.starts_with('[') {
        (Ipv6Addr::UNSPECIFIED, 0).into()
    } else {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    };
    (0..args.client_endpoints)
        .map(|_| {
            Endpoint::bind_with_buffers(local, Some(args.socket_buffer))
                .context("binding a client socket")
        })
        .collect()
}

/// Connects one client per `(channel, position)` and subscribes it;
/// returns the clients, their subscriptions and the connects per second.
pub async fn connect_subscribers(
    target: &Target,
    specs: &[(ChannelName, Position)],
    bar: &ProgressBar,
) -> anyhow::Result<(Vec<Client>, Vec<Subscription>, f64)> {
    bar.set_message("connecting");
    bar.set_length(specs.len() as u64);
    bar.set_position(0);
    let started = Instant::now();
    let mut clients = Vec::with_capacity(specs.len());
    let mut subs = Vec::with_capacity(specs.len());
    let mut pending = FuturesUnordered::new();
    let mut next = 0;
    let acks = target.acks();
    while subs.len() < specs.len() {
        while next < specs.len() && pending.len() < CONNECT_CONCURRENCY {
            let (channel, position) = specs[next].clone();
            let config = target.client_config(next);
            pending.push(async move {
                let client = Client::connect(config).await?;
                let mut sub = client.subscribe(&channel, position).await?;
                sub.set_auto_ack(acks);
                Ok::<_, volna_client::ClientError>((next, client, sub))
            });
            next += 1;
        }
        if let Some(result) = pending.next().await {
            let (_, client, sub) = result.context("connecting a subscriber")?;
            clients.push(client);
            subs.push(sub);
            bar.inc(1);
        }
    }
    let rate = specs.len() as f64 / started.elapsed().as_secs_f64().max(1e-9);
    Ok((clients, subs, rate))
}

/// Connects one client per group of channels and subscribes it to each;
/// returns the clients, their subscriptions (in the groups' order) and the
/// subscriptions per second.
pub async fn connect_groups(
    target: &Target,
    groups: &[&[ChannelName]],
    bar: &ProgressBar,
) -> anyhow::Result<(Vec<Client>, Vec<Subscription>, f64)> {
    let total: usize = groups.iter().map(|g| g.len()).sum();
    bar.set_message("subscribing");
    bar.set_length(total as u64);
    bar.set_position(0);
    let started = Instant::now();
    let mut clients = Vec::with_capacity(groups.len());
    let mut subs = Vec::with_capacity(total);
    let mut pending = FuturesUnordered::new();
    let mut next = 0;
    let mut done = 0;
    while done < groups.len() {
        while next < groups.len() && pending.len() < CONNECT_CONCURRENCY {
            let group = groups[next];
            let mut config = target.client_config(next);
            config.max_subscriptions = u32::try_from(group.len()).unwrap_or(u32::MAX);
            pending.push(async move {
                let client = Client::connect(config).await?;
                let mut subs = Vec::with_capacity(group.len());
                for channel in group {
                    subs.push(client.subscribe(channel, Position::Latest).await?);
                }
                Ok::<_, volna_client::ClientError>((client, subs))
            });
            next += 1;
        }
        if let Some(result) = pending.next().await {
            let (client, group) = result.context("connecting a subscriber")?;
            bar.inc(group.len() as u64);
            clients.push(client);
            subs.extend(group);
            done += 1;
        }
    }
    let rate = total as f64 / started.elapsed().as_secs_f64().max(1e-9);
    Ok((clients, subs, rate))
}

/// A run's reader tasks, one per subscription, and what they share.
#[derive(Debug)]
pub struct Readers {
    handles: Vec<JoinHandle<Received>>,
    latencies: Latencies,
    /// Deliveries counted so far, for the progress bar.
    pub delivered: Arc<AtomicU64>,
}

impl Readers {
    /// Starts a reader per subscription, each expecting `messages`
    /// messages from `first` (by default its current position) on, until
    /// `deadline`, and counting towards `milestones`.
    pub fn spawn(
        subs: Vec<Subscription>,
        first: Option<u64>,
        messages: u64,
        deadline: tokio::time::Instant,
        milestones: &[Milestone],
    ) -> Self {
        let delivered = Arc::new(AtomicU64::new(0));
        let latencies = Latencies::new();
        let handles = subs
            .into_iter()
            .enumerate()
            .map(|(i, sub)| {
                let first = first
                    .or_else(|| sub.next_offset().map(|o| o.get()))
                    .unwrap_or(1);
                let received = Received::new(&latencies, i).towards(milestones);
                tokio::spawn(read_all(
                    sub,
                    first,
                    messages,
                    deadline,
                    delivered.clone(),
                    received,
                ))
            })
            .collect();
        Self {
            handles,
            latencies,
            delivered,
        }
    }

    /// Waits for every reader and adds up what they saw.
    pub async fn collect(self, published: u64, expected: u64) -> anyhow::Result<Totals> {
        Totals::collect(published, expected, self.handles, &self.latencies).await
    }
}

/// Publishes `count` timestamped payloads to `channel`, at most `rate` per
/// second (0: as fast as acks allow); returns each publish's ack latency
/// (µs, from sending it to its ack).
///
/// Each publish is polled once as soon as it is queued, which sends it:
/// left unpolled, a stamped publish would sit unsent until the next one is
/// awaited, and the wait would count as broker latency.
pub async fn publish_all(
    publisher: &Client,
    channel: &ChannelName,
    count: u64,
    payload_bytes: usize,
    rate: f64,
) -> anyhow::Result<Histogram<u64>> {
    publish_rounds(
        publisher,
        std::slice::from_ref(channel),
        count,
        payload_bytes,
        rate,
    )
    .await
}

/// Publishes `rounds` timestamped payloads to each of `channels`, one to
/// each in turn, at most `rate` per second in all; returns the ack
/// latencies as [`publish_all`] does.
pub async fn publish_rounds(
    publisher: &Client,
    channels: &[ChannelName],
    rounds: u64,
    payload_bytes: usize,
    rate: f64,
) -> anyhow::Result<Histogram<u64>> {
    let count = rounds * channels.len() as u64;
    let pace = (rate > 0.0).then(|| Duration::from_secs_f64(1.0 / rate));
    // Paced publishers start at a random point of their first interval:
    // a thousand chats each sending once a second do not all send at the
    // same instant.
    let started = tokio::time::Instant::now()
        + pace.map_or(Duration::ZERO, |p| p.mul_f64(rand::random::<f64>()));
    let mut acks = ack_histogram()?;
    let mut inflight = FuturesUnordered::new();
    let mut take = |(result, sent): (Result<Published, volna_client::ClientError>, Instant)| {
        check_publish(result)?;
        acks.saturating_record(sent.elapsed().as_micros() as u64);
        anyhow::Ok(())
    };
    for seq in 0..count {
        if let Some(pace) = pace {
            let at = started + pace.mul_f64(seq as f64);
            // Keep taking acks while waiting for the next send time.
            loop {
                tokio::select! {
                    () = tokio::time::sleep_until(at) => break,
                    Some(done) = inflight.next(), if !inflight.is_empty() => take(done)?,
                }
            }
        }
        while inflight.len() >= PUBLISH_WINDOW {
            if let Some(done) = inflight.next().await {
                take(done)?;
            }
        }
        let turn = channels.len() as u64;
        let channel = &channels[(seq % turn) as usize];
        let publish = publisher.publish(channel, payload(seq / turn, payload_bytes));
        let sent = Instant::now();
        inflight.push(async move { (publish.await, sent) });
        // Polls the new publish (sending it) and takes acks already in.
        while let Some(Some(done)) = inflight.next().now_or_never() {
            take(done)?;
        }
    }
    while let Some(done) = inflight.next().await {
        take(done)?;
    }
    Ok(acks)
}

fn check_publish(result: Result<Published, volna_client::ClientError>) -> anyhow::Result<()> {
    result.context("publish")?;
    Ok(())
}

/// Publishes one timestamped payload to each channel, pipelined.
pub async fn publish_each(
    publisher: &Client,
    channels: &[ChannelName],
    payload_bytes: usize,
) -> anyhow::Result<()> {
    let mut inflight = FuturesUnordered::new();
    for (seq, channel) in channels.iter().enumerate() {
        while inflight.len() >= PUBLISH_WINDOW {
            if let Some(result) = inflight.next().await {
                check_publish(result)?;
            }
        }
        inflight.push(publisher.publish(channel, payload(seq as u64, payload_bytes)));
        while let Some(Some(result)) = inflight.next().now_or_never() {
            check_publish(result)?;
        }
    }
    while let Some(result) = inflight.next().await {
        check_publish(result)?;
    }
    Ok(())
}

/// A payload starting with its send time (µs) and sequence number.
pub fn payload(seq: u64, size: usize) -> Bytes {
    let mut buf = BytesMut::with_capacity(size);
    buf.put_u64(now_us());
    buf.put_u64(seq);
    buf.resize(size, b'v');
    buf.freeze()
}

async fn read_all(
    mut sub: Subscription,
    first: u64,
    messages: u64,
    deadline: tokio::time::Instant,
    delivered: Arc<AtomicU64>,
    mut r: Received,
) -> Received {
    let mut expected = first;
    // One timer for the whole run: a `timeout_at` per message registers
    // and cancels a timer per delivery, a cost of the generator, not the
    // broker.
    let out_of_time = tokio::time::sleep_until(deadline);
    tokio::pin!(out_of_time);
    let mut unreported = 0;
    while r.messages < messages {
        let item = tokio::select! {
            biased;
            item = sub.next() => match item {
                Some(item) => item,
                None => break,
            },
            () = &mut out_of_time => break,
        };
        let Ok(m) = item else {
            // A Truncated/EpochChanged event in a benchmark means messages
            // were not delivered: the loss count shows it.
            continue;
        };
        let offset = m.offset.get();
        r.record(offset < expected, offset > expected, &m.payload);
        r.saw_offset(offset);
        if offset >= expected {
            expected = offset + 1;
            unreported += 1;
            // The shared progress counter is touched once per 64, not per
            // delivery: every reader task would contend on it.
            if unreported == 64 {
                delivered.fetch_add(unreported, Ordering::Relaxed);
                unreported = 0;
            }
        }
    }
    delivered.fetch_add(unreported, Ordering::Relaxed);
    r
}

/// Records the latency of a payload that starts with its send time.
pub fn record_latency(histogram: &mut Histogram<u64>, payload: &[u8]) {
    if let Some(sent) = payload.get(..8) {
        let sent = u64::from_be_bytes(sent.try_into().unwrap_or([0; 8]));
        let _ = histogram.record(now_us().saturating_sub(sent).max(1));
    }
}

/// Microseconds since the Unix epoch.
pub fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// The broker's resident memory from its metrics, when its HTTP port is
/// reachable.
pub async fn broker_rss(http: &str) -> Option<u64> {
    broker_metric(http, "volna_process_resident_bytes")
        .await
        .map(|v| v as u64)
}

/// One unlabelled metric of the broker at `http`, when it answers within
/// a few seconds.
pub async fn broker_metric(http: &str, name: &str) -> Option<f64> {
    let url = format!("http://{http}/metrics");
    let prefix = format!("{name} ");
    tokio::task::spawn_blocking(move || {
        let text = ureq::get(&url)
            .config()
            .timeout_global(Some(Duration::from_secs(5)))
            .build()
            .call()
            .ok()?
            .into_body()
            .read_to_string()
            .ok()?;
        text.lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .and_then(|v| v.trim().parse::<f64>().ok())
    })
    .await
    .ok()
    .flatten()
}

/// CPU seconds the broker (from its metrics) and this generator used over
/// a run: on one machine they share the cores, and a generator that eats
/// them makes the broker look slow.
#[derive(Debug)]
pub struct CpuMeter {
    http: Option<String>,
    broker_start: Option<f64>,
    generator_start: Option<f64>,
}

/// What a [`CpuMeter`] measured.
#[derive(Debug, Clone, Copy, Default)]
pub struct CpuUse {
    pub broker_s: Option<f64>,
    pub generator_s: Option<f64>,
}

impl CpuMeter {
    /// Starts measuring; `http` is the broker's HTTP port, if there is one.
    pub async fn start(http: Option<&str>) -> Self {
        let broker_start = match http {
            Some(http) => broker_metric(http, "volna_process_cpu_seconds_total").await,
            None => None,
        };
        Self {
            http: http.map(str::to_owned),
            broker_start,
            generator_start: own_cpu_seconds(),
        }
    }

    /// The CPU used since [`start`](Self::start).
    pub async fn finish(&self) -> CpuUse {
        let broker_end = match &self.http {
            Some(http) => broker_metric(http, "volna_process_cpu_seconds_total").await,
            None => None,
        };
        CpuUse {
            broker_s: self.broker_start.zip(broker_end).map(|(a, b)| b - a),
            generator_s: self
                .generator_start
                .zip(own_cpu_seconds())
                .map(|(a, b)| b - a),
        }
    }
}

/// This process's CPU time, user plus system, from `/proc/self/stat`
/// (Linux; clock ticks of 1/100 s).
fn own_cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) as f64 / 100.0)
}

/// A histogram of publish → ack times in µs, 1 µs to an hour. Bounded,
/// not auto-resizing: `saturating_record` clamps to the current bound, and
/// an auto-resizing histogram starts at 2 (every ack read "2 µs").
pub fn ack_histogram() -> anyhow::Result<Histogram<u64>> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).context("ack histogram")
}

/// A histogram for callers outside this module.
pub fn new_histogram() -> Histogram<u64> {
    histogram()
}
