//! No silent stall (G8) under broker faults: live subscribers reach the
//! channel's final offset across restarts and long pauses, and a subscribe
//! whose request was lost to a restart still sees the first message
//! published after it returned.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use volna_chaos::{BrokerProcess, History, read_through};
use volna_client::{Backoff, ChannelName, Client, Position};

/// Publishes `count` messages to `channel`, retrying through faults; every
/// one must be acknowledged in the end. Returns the acknowledged offsets.
async fn publish_all(client: Client, channel: ChannelName, writer: u32, count: u32) -> History {
    let mut history = History::default();
    for i in 0..count {
        let payload = format!("w{writer}-{i}").into_bytes();
        let ack = client
            .publish(&channel, payload.clone())
            .await
            .expect("publishes are acknowledged across the faults");
        assert!(history.acked.insert(ack.offset.get(), payload).is_none());
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    history
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_subscribers_reach_the_final_offset_through_restarts_and_pauses() {
    let dir = tempfile::tempdir().unwrap();
    let mut broker = BrokerProcess::start(dir.path(), "wal").unwrap();
    let channels: Vec<_> = (0..2)
        .map(|i| ChannelName::new(format!("chat.faults{i}")).unwrap())
        .collect();

    // 4 live subscribers per channel, each on its own connection.
    let mut readers = Vec::new();
    for channel in &channels {
        for _ in 0..4 {
            let client = broker.client(Duration::from_secs(60)).await.unwrap();
            let sub = client.subscribe(channel, Position::FIRST).await.unwrap();
            readers.push((client, channel.clone(), sub));
        }
    }
    // 4 producers, two per channel.
    let mut writers = Vec::new();
    for w in 0..4u32 {
        let client = broker.client(Duration::from_secs(60)).await.unwrap();
        let channel = channels[w as usize % channels.len()].clone();
        writers.push((
            channel.clone(),
            tokio::spawn(publish_all(client, channel, w, 1_500)),
        ));
    }

    // Faults while they run: pauses short and longer than the clients'
    // idle timeout (15 s), a SIGTERM restart and a kill -9.
    for fault in ["pause 2", "term", "pause 17", "kill", "pause 1"] {
        tokio::time::sleep(Duration::from_millis(700)).await;
        match fault.split_once(' ') {
            Some(("pause", secs)) => {
                broker.signal("STOP").unwrap();
                tokio::time::sleep(Duration::from_secs(secs.parse().unwrap())).await;
                broker.signal("CONT").unwrap();
            }
            _ if fault == "term" => {
                assert!(broker.terminate(Duration::from_secs(30)).unwrap());
                broker.start_again().unwrap();
            }
            _ => broker.restart().unwrap(),
        }
    }

    let mut final_offset = std::collections::HashMap::new();
    let mut histories = std::collections::HashMap::<ChannelName, History>::new();
    for (channel, writer) in writers {
        let history = tokio::time::timeout(Duration::from_secs(180), writer)
            .await
            .unwrap()
            .unwrap();
        let h = histories.entry(channel.clone()).or_default();
        h.acked.extend(history.acked);
        let last = *h.acked.keys().next_back().unwrap();
        let top = final_offset.entry(channel).or_insert(0u64);
        *top = (*top).max(last);
    }
    for (_client, channel, mut sub) in readers {
        let last = final_offset[&channel];
        let delivered = read_through(&mut sub, last, Duration::from_secs(60)).await;
        if let Err(v) = histories[&channel].check(&delivered) {
            panic!("{channel}: {v}");
        }
    }
    broker.assert_never_panicked();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_latest_subscribe_lost_to_a_restart_misses_nothing_after_it_returns() {
    let dir = tempfile::tempdir().unwrap();
    let mut broker = BrokerProcess::start(dir.path(), "wal").unwrap();
    let channel = ChannelName::new("chat.lost").unwrap();
    broker.client(Duration::from_secs(60)).await.unwrap();
    // A subscriber that comes back slowly after losing its connection.
    let mut config = broker.client_config();
    config.backoff = Backoff {
        initial: Duration::from_secs(2),
        max: Duration::from_secs(2),
    };
    let subscriber = Client::connect(config).await.unwrap();

    // The broker freezes: the Subscribe is sent and never answered; then
    // it is killed and restarted, and the subscriber's connection is reset.
    broker.signal("STOP").unwrap();
    let subscribing = {
        let (subscriber, channel) = (subscriber.clone(), channel.clone());
        tokio::spawn(async move { subscriber.subscribe(&channel, Position::Latest).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    broker.restart().unwrap();
    let mut sub = tokio::time::timeout(Duration::from_secs(60), subscribing)
        .await
        .unwrap()
        .unwrap()
        .unwrap();

    // Once `subscribe` returned, the first publish must arrive.
    let publisher = Arc::new(broker.client(Duration::from_secs(60)).await.unwrap());
    let ack = publisher.publish(&channel, "first").await.unwrap();
    let first = tokio::time::timeout(Duration::from_secs(15), sub.next())
        .await
        .expect("the first message after subscribe returned was missed")
        .unwrap()
        .unwrap();
    assert_eq!(
        (first.offset, &first.payload[..]),
        (ack.offset, &b"first"[..])
    );
    broker.assert_never_panicked();
}
