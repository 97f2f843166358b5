//! SIGTERM under load: the broker exits cleanly and promptly, in-flight
//! publishes are acknowledged or retried by the client, and after the
//! restart every acknowledged publish is there once.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use volna_chaos::{BrokerProcess, History, read_through};
use volna_client::{ChannelName, Position};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_drains_and_clients_resume() {
    let dir = tempfile::tempdir().unwrap();
    let mut broker = BrokerProcess::start(dir.path(), "wal").unwrap();
    let channel = ChannelName::new("chat.sigterm").unwrap();
    let client = broker.client(Duration::from_secs(60)).await.unwrap();

    // 2,000 publishes with up to 64 in flight; SIGTERM lands in the middle.
    let publishing = {
        let (client, channel) = (client.clone(), channel.clone());
        tokio::spawn(async move {
            let mut history = History::default();
            let mut inflight = FuturesUnordered::new();
            for i in 0..2000u32 {
                let (client, channel) = (client.clone(), channel.clone());
                inflight.push(async move {
                    let payload = format!("m{i}").into_bytes();
                    (client.publish(&channel, payload.clone()).await, payload)
                });
                if inflight.len() >= 64
                    && let Some((result, payload)) = inflight.next().await
                {
                    let ack = result.expect("publish is acked, across the restart");
                    assert!(history.acked.insert(ack.offset.get(), payload).is_none());
                }
            }
            while let Some((result, payload)) = inflight.next().await {
                let ack = result.expect("publish is acked, across the restart");
                assert!(history.acked.insert(ack.offset.get(), payload).is_none());
            }
            history
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        broker.terminate(Duration::from_secs(20)).unwrap(),
        "the broker exits 0 soon after SIGTERM"
    );
    broker.start_again().unwrap();
    let history = tokio::time::timeout(Duration::from_secs(120), publishing)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(history.acked.len(), 2000);

    let mut sub = client.subscribe(&channel, Position::FIRST).await.unwrap();
    let delivered = read_through(&mut sub, 2000, Duration::from_secs(60)).await;
    history.check(&delivered).unwrap();
    // Subscribed after the restart: no resume, so nothing comes twice.
    assert_eq!(sub.duplicates_dropped(), 0);
}
