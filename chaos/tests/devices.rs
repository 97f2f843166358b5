//! `kill -9` the broker, and kill the app, while a device acknowledges what
//! it reads: its cursor never moves backwards (below an acknowledgement the
//! broker said it stored) and never past a message the device received,
//! and every resume from it is gapless.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::Rng;
use volna_chaos::BrokerProcess;
use volna_client::{ChannelName, Client, ClientError, Fallback, Offset, Position};

/// Faults (a broker `kill -9` or an app killed): 12 by default, or
/// `VOLNA_CHAOS_CURSOR_CYCLES`.
fn cycles() -> u32 {
    volna_chaos::knob("VOLNA_CHAOS_CURSOR_CYCLES", 12)
}

async fn device(broker: &BrokerProcess) -> Client {
    let mut config = broker.client_config();
    config.device = Some("phone".into());
    config.token = "ivan".into();
    config.ack_interval = Duration::from_millis(5);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        match Client::connect(config.clone()).await {
            Ok(client) => return client,
            Err(e) if tokio::time::Instant::now() > deadline => panic!("device: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_with_acks_in_flight_never_moves_a_cursor_back_or_past_what_was_received() {
    let dir = tempfile::tempdir().unwrap();
    let mut broker = BrokerProcess::start(dir.path(), "wal").unwrap();
    let channel = ChannelName::new("chat.cursor").unwrap();
    // What the publisher was told: offset → payload.
    let published: Arc<Mutex<BTreeMap<u64, Vec<u8>>>> = Arc::default();
    let stop = tokio_util::sync::CancellationToken::new();
    let publisher = {
        let client = broker.client(Duration::from_secs(60)).await.unwrap();
        let (channel, published, stop) = (channel.clone(), published.clone(), stop.clone());
        tokio::spawn(async move {
            for i in 0..100_000u64 {
                if stop.is_cancelled() {
                    break;
                }
                let payload = format!("p{i}").into_bytes();
                match client.publish(&channel, payload.clone()).await {
                    Ok(ack) => {
                        published.lock().unwrap().insert(ack.offset.get(), payload);
                    }
                    Err(
                        ClientError::Timeout { .. }
                        | ClientError::Disconnected
                        | ClientError::Closed,
                    ) => {}
                    Err(e) => panic!("publish: {e}"),
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        })
    };

    let mut rng = rand::rng();
    // The largest offset an acknowledgement of which the broker stored
    // (flush_acks returned Ok), and the largest the device received.
    let (mut durable, mut received) = (0u64, 0u64);
    let (mut broker_kills, mut app_kills, mut resumes) = (0u32, 0u32, 0u32);
    for _ in 0..cycles() {
        let app = device(&broker).await;
        let position = Position::Cursor {
            otherwise: Fallback::From(Offset::FIRST),
        };
        let mut sub = app.subscribe(&channel, position).await.unwrap();
        let cursor = sub.next_offset().unwrap().get() - 1;
        assert!(
            cursor >= durable,
            "cursor {cursor} moved back below {durable}"
        );
        assert!(
            cursor <= received,
            "cursor {cursor} is past what was received ({received})"
        );
        resumes += 1;
        let mut expected = cursor + 1;
        let reading = Duration::from_millis(rng.random_range(100..400));
        let until = tokio::time::Instant::now() + reading;
        while tokio::time::Instant::now() < until {
            let item = tokio::time::timeout(Duration::from_secs(30), sub.recv()).await;
            let m = match item {
                Ok(Some(Ok(m))) => m,
                other => panic!("no delivery: {other:?}"),
            };
            assert_eq!(
                m.offset.get(),
                expected,
                "gap or duplicate after resuming at {cursor}"
            );
            if let Some(payload) = published.lock().unwrap().get(&expected) {
                assert_eq!(
                    &m.payload[..],
                    &payload[..],
                    "offset {expected} holds other data"
                );
            }
            received = received.max(expected);
            sub.ack(m.offset).unwrap();
            expected += 1;
            if rng.random_ratio(1, 20) && app.flush_acks().await.is_ok() {
                durable = durable.max(m.offset.get());
            }
        }
        // Acknowledgements are in flight (sent every 5 ms) as the fault hits.
        if rng.random_bool(0.5) {
            broker.kill().unwrap();
            broker.start_again().unwrap();
            broker_kills += 1;
        } else {
            app_kills += 1;
        }
        drop(sub);
        drop(app);
    }
    stop.cancel();
    tokio::time::timeout(Duration::from_secs(120), publisher)
        .await
        .unwrap()
        .unwrap();
    broker.assert_never_panicked();
    eprintln!(
        "cursor chaos: {resumes} resumes after {broker_kills} broker kill -9 and {app_kills} app kills; \
         {received} received, last stored ack {durable}"
    );
    assert!(durable > 0, "no acknowledgement was ever stored");
}

/// The subscription's next message, failing the test on an event, a
/// closed stream, or two minutes without one.
async fn next_message(sub: &mut volna_client::Subscription) -> volna_client::Message {
    match tokio::time::timeout(Duration::from_secs(120), sub.recv()).await {
        Ok(Some(Ok(m))) => m,
        other => panic!("no message: {other:?}"),
    }
}

/// Devices in the resume test: 400 by default (4 channels of 100),
/// `VOLNA_CHAOS_RESUME_DEVICES` for the scale figure (BENCHMARKS.md).
fn resume_devices() -> usize {
    volna_chaos::knob("VOLNA_CHAOS_RESUME_DEVICES", 400)
}

/// Connects `count` devices at most 256 at a time, through shared sockets,
/// each subscribing to its channel from its cursor; returns them with the
/// offset each subscription starts at.
async fn connect_devices(
    broker: &BrokerProcess,
    endpoints: &[volna_client::Endpoint],
    channels: &[ChannelName],
    count: usize,
) -> Vec<(Client, volna_client::Subscription)> {
    use futures_util::StreamExt;
    let connect = |i: usize| {
        let mut config = broker.client_config();
        config.device = Some(format!("d{i}"));
        config.token = format!("u{i}");
        config.max_subscriptions = 1;
        config.keep_alive = Duration::from_secs(10);
        config.idle_timeout = Duration::from_secs(30);
        config.ack_interval = Duration::from_millis(50);
        config.endpoint = Some(endpoints[i % endpoints.len()].clone());
        let channel = channels[i % channels.len()].clone();
        async move {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
            loop {
                let attempt = async {
                    let client = Client::connect(config.clone()).await?;
                    let position = Position::Cursor {
                        otherwise: Fallback::From(Offset::FIRST),
                    };
                    let sub = client.subscribe(&channel, position).await?;
                    Ok::<_, ClientError>((client, sub))
                };
                match attempt.await {
                    Ok(device) => return (i, device),
                    Err(e) if tokio::time::Instant::now() > deadline => panic!("device {i}: {e}"),
                    Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        }
    };
    let mut devices: Vec<Option<(Client, volna_client::Subscription)>> =
        (0..count).map(|_| None).collect();
    let mut pending = futures_util::stream::FuturesUnordered::new();
    let mut next = 0;
    while next < count || !pending.is_empty() {
        while next < count && pending.len() < 256 {
            pending.push(connect(next));
            next += 1;
        }
        if let Some((i, device)) = pending.next().await {
            devices[i] = Some(device);
        }
    }
    devices.into_iter().map(Option::unwrap).collect()
}

/// Every device reads a different number of messages and acknowledges
/// them; the broker is killed (`kill -9`) and restarted; every device comes
/// back, resumes from its stored cursor, and receives exactly the messages
/// after its last acknowledgement: none lost, none twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_kill_9_every_device_resumes_exactly_after_its_last_ack() {
    let count = resume_devices();
    let dir = tempfile::tempdir().unwrap();
    let mut broker = BrokerProcess::start_with(
        dir.path(),
        "wal",
        &[
            ("VOLNA_LIMITS__HANDSHAKES_PER_IP_PER_SEC", "0"),
            ("VOLNA_LIMITS__MAX_CONNECTIONS", "300000"),
            ("VOLNA_LIMITS__IDLE_TIMEOUT_MS", "60000"),
        ],
    )
    .unwrap();
    let channels: Vec<ChannelName> = (0..count.div_ceil(100))
        .map(|c| ChannelName::new(format!("chat.resume{c}")).unwrap())
        .collect();
    let (before, after) = (20u64, 10u64);
    let publisher = broker.client(Duration::from_secs(60)).await.unwrap();
    for channel in &channels {
        for i in 1..=before {
            publisher.publish(channel, format!("m{i}")).await.unwrap();
        }
    }
    let endpoints: Vec<volna_client::Endpoint> = (0..16)
        .map(|_| volna_client::Endpoint::bind("127.0.0.1:0".parse().unwrap()).unwrap())
        .collect();
    let started = std::time::Instant::now();
    let devices = connect_devices(&broker, &endpoints, &channels, count).await;
    let connected = started.elapsed();
    // Device i takes and acknowledges 1 + i % before messages.
    let acked: Vec<u64> = (0..count).map(|i| 1 + i as u64 % before).collect();
    let reads = devices
        .into_iter()
        .enumerate()
        .map(|(i, (client, mut sub))| {
            let last = acked[i];
            async move {
                assert_eq!(
                    sub.next_offset().unwrap().get(),
                    1,
                    "device {i} had no cursor"
                );
                for expected in 1..=last {
                    let m = next_message(&mut sub).await;
                    assert_eq!(m.offset.get(), expected);
                }
                sub.ack(Offset::new(last)).unwrap();
                client.flush_acks().await.unwrap();
                // The app dies with the broker: nothing else is said.
                drop(sub);
                client
            }
        });
    let clients = futures_util::future::join_all(reads).await;
    broker.kill().unwrap();
    drop(clients);
    broker.start_again().unwrap();
    broker.wait_ready(Duration::from_secs(60)).await.unwrap();
    let publisher = broker.client(Duration::from_secs(60)).await.unwrap();
    for channel in &channels {
        for i in before + 1..=before + after {
            publisher.publish(channel, format!("m{i}")).await.unwrap();
        }
    }

    let restarted = std::time::Instant::now();
    let devices = connect_devices(&broker, &endpoints, &channels, count).await;
    let resumed = restarted.elapsed();
    let reads = devices
        .into_iter()
        .enumerate()
        .map(|(i, (client, mut sub))| {
            let last = acked[i];
            async move {
                // Held to the end: a dropped client ends its subscription.
                let _client = client;
                assert_eq!(sub.next_offset().unwrap().get(), last + 1, "device {i}");
                for expected in last + 1..=before + after {
                    let m = next_message(&mut sub).await;
                    assert_eq!(m.offset.get(), expected, "device {i}");
                    assert_eq!(m.payload, format!("m{expected}"));
                }
                // And nothing more: no duplicate of what was acknowledged.
                let more = tokio::time::timeout(Duration::from_millis(50), sub.recv()).await;
                assert!(more.is_err(), "device {i}: {more:?}");
                (before + after - last) as usize
            }
        });
    let delivered: usize = futures_util::future::join_all(reads)
        .await
        .into_iter()
        .sum();
    let caught_up = restarted.elapsed();
    broker.assert_never_panicked();
    eprintln!(
        "resume: {count} devices connected in {:.1} s; after kill -9 all resumed from their cursors in {:.1} s \
         and caught up in {:.1} s ({delivered} messages, 0 lost, 0 duplicated)",
        connected.as_secs_f64(),
        resumed.as_secs_f64(),
        caught_up.as_secs_f64()
    );
}
