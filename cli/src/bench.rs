//! `volna bench`: a load generator that drives a real broker over QUIC and
//! checks every delivery.
//!
//! Scenario `fanout`: one publisher, S subscribers on one channel, each
//! subscriber its own connection (its own UDP socket). Every payload starts
//! with its send time, so latency is end to end. A run that loses,
//! duplicates or reorders a single delivery fails (non-zero exit), whatever
//! its speed.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use bytes::{BufMut, Bytes, BytesMut};
use clap::{Args, ValueEnum};
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;
use volna_client::{ChannelName, Client, ClientConfig, Position, Subscription};

/// Scenarios `volna bench` knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Scenario {
    /// One publisher, S subscribers on one channel.
    Fanout,
}

/// `volna bench` flags.
#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    /// What to measure.
    #[arg(value_enum)]
    pub scenario: Scenario,
    /// Subscribers, each on its own connection.
    #[arg(long, default_value_t = 100)]
    pub subscribers: usize,
    /// Messages to publish.
    #[arg(long, default_value_t = 10_000)]
    pub messages: u64,
    /// Payload size in bytes (at least 16: send time and sequence).
    #[arg(long, default_value_t = 64)]
    pub payload: usize,
    /// Publish at most this many messages per second (0: as fast as acks allow).
    #[arg(long, default_value_t = 0)]
    pub rate: u64,
    /// Give up on deliveries after this many seconds.
    #[arg(long, default_value_t = 120)]
    pub timeout_secs: u64,
}

/// What one subscriber saw.
#[derive(Debug)]
struct Received {
    messages: u64,
    duplicates: u64,
    out_of_order: u64,
    latency_us: Histogram<u64>,
}

/// Runs the benchmark; returns whether every delivery was correct.
pub async fn run(
    args: &BenchArgs,
    config: ClientConfig,
    http: &str,
    json_out: bool,
) -> anyhow::Result<bool> {
    if args.payload < 16 {
        bail!("--payload must be at least 16 bytes (send time and sequence)");
    }
    if args.subscribers == 0 || args.messages == 0 {
        bail!("--subscribers and --messages must be at least 1");
    }
    let channel = ChannelName::new(format!("bench.fanout.{:08x}", rand::random::<u32>()))?;
    let progress = ProgressBar::new(args.subscribers as u64).with_style(
        ProgressStyle::with_template("{msg:>12} [{bar:40}] {pos}/{len} {per_sec}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    if json_out {
        progress.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }

    // Connect and subscribe every subscriber before the first publish.
    progress.set_message("connecting");
    let connect_started = Instant::now();
    let mut subscribers: Vec<(Client, Subscription)> = Vec::with_capacity(args.subscribers);
    let mut pending = FuturesUnordered::new();
    let mut next = 0;
    while subscribers.len() < args.subscribers {
        while next < args.subscribers && pending.len() < 64 {
            let (config, channel) = (config.clone(), channel.clone());
            pending.push(async move {
                let client = Client::connect(config).await?;
                let sub = client.subscribe(&channel, Position::Latest).await?;
                Ok::<_, volna_client::ClientError>((client, sub))
            });
            next += 1;
        }
        if let Some(result) = pending.next().await {
            subscribers.push(result.context("connecting a subscriber")?);
            progress.inc(1);
        }
    }
    let connect_secs = connect_started.elapsed().as_secs_f64();

    let expected_first = subscribers
        .first()
        .and_then(|(_, s)| s.next_offset())
        .map_or(1, |o| o.get());
    let delivered = Arc::new(AtomicU64::new(0));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(args.timeout_secs);
    let mut readers = Vec::with_capacity(subscribers.len());
    let mut clients = Vec::with_capacity(subscribers.len());
    for (client, sub) in subscribers {
        clients.push(client);
        let delivered = delivered.clone();
        let messages = args.messages;
        readers.push(tokio::spawn(read_all(
            sub,
            expected_first,
            messages,
            deadline,
            delivered,
        )));
    }

    let publisher = Client::connect(config.clone())
        .await
        .context("connecting the publisher")?;
    let total = args.messages * args.subscribers as u64;
    progress.set_length(total);
    progress.set_position(0);
    progress.set_message("delivering");
    let ticker = {
        let (progress, delivered) = (progress.clone(), delivered.clone());
        tokio::spawn(async move {
            loop {
                progress.set_position(delivered.load(Ordering::Relaxed));
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };

    let publish_started = Instant::now();
    publish_all(&publisher, &channel, args).await?;
    let publish_secs = publish_started.elapsed().as_secs_f64();

    let mut received = Vec::with_capacity(readers.len());
    for reader in readers {
        received.push(reader.await.context("a subscriber task failed")?);
    }
    let duration = publish_started.elapsed().as_secs_f64();
    ticker.abort();
    progress.finish_and_clear();

    let mut latency = Histogram::<u64>::new(3).context("histogram")?;
    let (mut got, mut duplicates, mut out_of_order) = (0, 0, 0);
    for r in &received {
        got += r.messages;
        duplicates += r.duplicates;
        out_of_order += r.out_of_order;
        latency.add(&r.latency_us).context("merging histograms")?;
    }
    let lost = total.saturating_sub(got);
    let rss = broker_rss(http).await;
    let summary = json!({
        "scenario": "fanout",
        "connections": args.subscribers + 1,
        "subscribers": args.subscribers,
        "publishers": 1,
        "channels": 1,
        "payload_bytes": args.payload,
        "messages_published": args.messages,
        "deliveries_expected": total,
        "deliveries_received": got,
        "lost": lost,
        "duplicates": duplicates,
        "out_of_order": out_of_order,
        "publish_per_sec": args.messages as f64 / publish_secs,
        "deliveries_per_sec": got as f64 / duration,
        "latency_us": {
            "p50": latency.value_at_quantile(0.50),
            "p99": latency.value_at_quantile(0.99),
            "p999": latency.value_at_quantile(0.999),
            "max": latency.max(),
        },
        "connect_per_sec": args.subscribers as f64 / connect_secs,
        "broker_rss_bytes": rss,
        "duration_s": duration,
    });
    if json_out {
        println!("{summary}");
    } else {
        print_table(&summary);
    }
    for client in clients {
        client.close();
    }
    publisher.close();
    Ok(lost == 0 && duplicates == 0 && out_of_order == 0)
}

async fn publish_all(
    publisher: &Client,
    channel: &ChannelName,
    args: &BenchArgs,
) -> anyhow::Result<()> {
    let pace = (args.rate > 0).then(|| Duration::from_secs_f64(1.0 / args.rate as f64));
    let started = tokio::time::Instant::now();
    let mut inflight: FuturesUnordered<_> = FuturesUnordered::new();
    for seq in 0..args.messages {
        if let Some(pace) = pace {
            tokio::time::sleep_until(started + pace.mul_f64(seq as f64)).await;
        }
        // The client bounds publishes in flight; keep a few more queued.
        while inflight.len() >= 256 {
            if let Some(result) = inflight.next().await {
                let result: Result<volna_client::Published, volna_client::ClientError> = result;
                result.context("publish")?;
            }
        }
        let payload = payload(seq, args.payload);
        inflight.push(publisher.publish(channel, payload));
    }
    while let Some(result) = inflight.next().await {
        let _: volna_client::Published = result.context("publish")?;
    }
    Ok(())
}

fn payload(seq: u64, size: usize) -> Bytes {
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
) -> Received {
    let mut r = Received {
        messages: 0,
        duplicates: 0,
        out_of_order: 0,
        latency_us: Histogram::new(3).unwrap_or_else(|_| unreachable_histogram()),
    };
    let mut expected = first;
    while r.messages < messages {
        let item = match tokio::time::timeout_at(deadline, sub.next()).await {
            Ok(Some(item)) => item,
            Ok(None) | Err(_) => break,
        };
        let Ok(m) = item else {
            // A Truncated/EpochChanged event in a benchmark means messages
            // were not delivered: the loss count shows it.
            continue;
        };
        let offset = m.offset.get();
        if offset < expected {
            r.duplicates += 1;
            continue;
        }
        if offset > expected {
            r.out_of_order += 1;
        }
        expected = offset + 1;
        r.messages += 1;
        delivered.fetch_add(1, Ordering::Relaxed);
        if m.payload.len() >= 8 {
            let sent = u64::from_be_bytes(m.payload[..8].try_into().unwrap_or([0; 8]));
            let _ = r.latency_us.record(now_us().saturating_sub(sent).max(1));
        }
    }
    r
}

fn unreachable_histogram() -> Histogram<u64> {
    // Histogram::new(3) only fails for a precision above 5.
    panic!("cannot create a histogram")
}

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// The broker's resident memory from its metrics, when its HTTP port is
/// reachable.
async fn broker_rss(http: &str) -> Option<u64> {
    let url = format!("http://{http}/metrics");
    tokio::task::spawn_blocking(move || {
        let text = ureq::get(&url)
            .call()
            .ok()?
            .into_body()
            .read_to_string()
            .ok()?;
        text.lines()
            .find_map(|l| l.strip_prefix("volna_process_resident_bytes "))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .map(|v| v as u64)
    })
    .await
    .ok()
    .flatten()
}

fn print_table(summary: &serde_json::Value) {
    let mut table = comfy_table::Table::new();
    table.load_preset(comfy_table::presets::UTF8_BORDERS_ONLY);
    table.set_header(["figure", "value"]);
    let rows = [
        (
            "scenario",
            summary["scenario"].as_str().unwrap_or_default().to_owned(),
        ),
        ("subscribers", summary["subscribers"].to_string()),
        ("payload bytes", summary["payload_bytes"].to_string()),
        (
            "messages published",
            summary["messages_published"].to_string(),
        ),
        (
            "deliveries",
            format!(
                "{} of {}",
                summary["deliveries_received"], summary["deliveries_expected"]
            ),
        ),
        (
            "lost / duplicates / out of order",
            format!(
                "{} / {} / {}",
                summary["lost"], summary["duplicates"], summary["out_of_order"]
            ),
        ),
        (
            "publish msgs/s",
            format!("{:.0}", summary["publish_per_sec"].as_f64().unwrap_or(0.0)),
        ),
        (
            "deliveries/s",
            format!(
                "{:.0}",
                summary["deliveries_per_sec"].as_f64().unwrap_or(0.0)
            ),
        ),
        (
            "latency p50 / p99 / p99.9 / max (µs)",
            format!(
                "{} / {} / {} / {}",
                summary["latency_us"]["p50"],
                summary["latency_us"]["p99"],
                summary["latency_us"]["p999"],
                summary["latency_us"]["max"]
            ),
        ),
        (
            "connects/s",
            format!("{:.0}", summary["connect_per_sec"].as_f64().unwrap_or(0.0)),
        ),
        (
            "broker RSS",
            summary["broker_rss_bytes"]
                .as_u64()
                .map_or("unknown".into(), |b| {
                    format!("{:.1} MiB", b as f64 / 1048576.0)
                }),
        ),
        (
            "duration (s)",
            format!("{:.2}", summary["duration_s"].as_f64().unwrap_or(0.0)),
        ),
    ];
    for (k, v) in rows {
        table.add_row([k.to_owned(), v]);
    }
    println!("{table}");
}
