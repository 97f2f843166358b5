//! `volna bench fanout|chats --nats URL`: the same scenarios against a NATS
//! server (core NATS, no persistence), with the same generator: one
//! connection per subscriber and per publisher, the same timestamped
//! payloads, the same order and loss checks. For the NATS column of
//! BENCHMARKS.md; NATS has no offsets, so order is checked on the sequence
//! number in the payload.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use futures_util::StreamExt;
use serde_json::{Value, json};

use super::workload::{self, Shape, Totals};
use super::{BenchArgs, Scenario, summary};

/// One subject, `--subscribers` subscribers, one publisher.
pub async fn fanout(args: &BenchArgs, url: &str, json_out: bool) -> anyhow::Result<Value> {
    let subject = format!("bench.fanout.{:08x}", rand::random::<u32>());
    run(
        args,
        url,
        json_out,
        Scenario::Fanout,
        vec![subject],
        args.rate,
    )
    .await
}

/// `--channels` subjects, `--subscribers` each, one publisher each; `--rate`
/// is split over the subjects, as `volna bench chats` splits it.
pub async fn chats(args: &BenchArgs, url: &str, json_out: bool) -> anyhow::Result<Value> {
    let tag = rand::random::<u32>();
    let subjects = (0..args.channels)
        .map(|i| format!("bench.chat.{tag:08x}.{i}"))
        .collect();
    let rate = args.rate / args.channels.max(1) as u64;
    run(args, url, json_out, Scenario::Chats, subjects, rate).await
}

/// Subscribes `--subscribers` connections to each of `subjects`, then
/// publishes `--messages` to each subject from its own connection, at
/// `rate` per subject (0: as fast as NATS takes them).
async fn run(
    args: &BenchArgs,
    url: &str,
    json_out: bool,
    scenario: Scenario,
    subjects: Vec<String>,
    rate: u64,
) -> anyhow::Result<Value> {
    let total_subscribers = subjects.len() * args.subscribers;
    let bar = workload::progress(json_out);
    bar.set_message("connecting");
    bar.set_length(total_subscribers as u64);
    let connect_started = Instant::now();
    let mut subscribers = Vec::with_capacity(total_subscribers);
    for subject in &subjects {
        for _ in 0..args.subscribers {
            // Room for a whole run in the client's buffer: a run measures
            // throughput to the last message, not NATS's slow-consumer
            // drops.
            let client = async_nats::ConnectOptions::new()
                .subscription_capacity(1 << 20)
                .connect(url)
                .await
                .with_context(|| format!("connecting to NATS at {url}"))?;
            let sub = client.subscribe(subject.clone()).await?;
            client.flush().await?;
            subscribers.push((client, sub));
            bar.inc(1);
        }
    }
    let connect_rate = total_subscribers as f64 / connect_started.elapsed().as_secs_f64();
    let delivered = Arc::new(AtomicU64::new(0));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(args.timeout_secs);
    let messages = args.messages;
    let latencies = workload::Latencies::new();
    let readers: Vec<_> = subscribers
        .into_iter()
        .enumerate()
        .map(|(i, (client, mut sub))| {
            let delivered = delivered.clone();
            let mut seen = workload::Received::new(&latencies, i);
            tokio::spawn(async move {
                let mut expected = 0;
                while seen.count() < messages {
                    let Ok(Some(message)) = tokio::time::timeout_at(deadline, sub.next()).await
                    else {
                        break;
                    };
                    let seq = message.payload.get(8..16).map_or(u64::MAX, |s| {
                        u64::from_be_bytes(s.try_into().unwrap_or([0xff; 8]))
                    });
                    seen.record(seq < expected, seq > expected, &message.payload);
                    expected = expected.max(seq + 1);
                    delivered.fetch_add(1, Ordering::Relaxed);
                }
                drop(client);
                seen
            })
        })
        .collect();
    let published = messages * subjects.len() as u64;
    let expected = messages * total_subscribers as u64;
    bar.set_message("delivering");
    bar.set_length(expected);
    bar.set_position(0);
    let ticker = workload::follow(&bar, &delivered);

    let mut publishers = Vec::with_capacity(subjects.len());
    for _ in &subjects {
        publishers.push(
            async_nats::connect(url)
                .await
                .with_context(|| format!("connecting to NATS at {url}"))?,
        );
    }
    let cpu = workload::CpuMeter::start(None).await;
    let started = Instant::now();
    let pace = (rate > 0).then(|| Duration::from_secs_f64(1.0 / rate as f64));
    let payload = args.payload;
    let publishing: Vec<_> = subjects
        .iter()
        .cloned()
        .zip(publishers)
        .map(|(subject, publisher)| {
            tokio::spawn(async move {
                let clock = tokio::time::Instant::now();
                for seq in 0..messages {
                    if let Some(pace) = pace {
                        tokio::time::sleep_until(clock + pace.mul_f64(seq as f64)).await;
                    }
                    publisher
                        .publish(subject.clone(), workload::payload(seq, payload))
                        .await?;
                }
                publisher.flush().await?;
                anyhow::Ok(())
            })
        })
        .collect();
    for task in publishing {
        task.await.context("a NATS publisher failed")??;
    }
    let publish_secs = started.elapsed().as_secs_f64();
    let totals = Totals::collect(published, expected, readers, &latencies).await?;
    let duration = started.elapsed().as_secs_f64();
    let cpu = cpu.finish().await;
    ticker.abort();
    bar.finish_and_clear();
    let shape = Shape {
        connections: total_subscribers + subjects.len(),
        subscribers: total_subscribers,
        publishers: subjects.len(),
        channels: subjects.len(),
    };
    Ok(summary(
        scenario,
        shape,
        args.payload,
        &totals,
        publish_secs,
        duration,
        connect_rate,
        None,
        cpu,
        json!({ "target": format!("NATS core at {url}") }),
    ))
}
