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
                    Err(ClientError::Timeout | ClientError::Disconnected | ClientError::Closed) => {
                    }
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
