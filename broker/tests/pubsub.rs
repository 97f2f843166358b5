//! Publish/subscribe over real QUIC against a real RocksDB log: ordering,
//! exactly-once delivery, gapless resume, restart, retention, idempotency.
//! The tests of the protocol's guarantees run over both transports, QUIC
//! and WebSocket.

#![allow(clippy::unwrap_used)]

#[macro_use]
mod common;

over_both_transports!(
    three_subscribers_each_receive_every_message_once_in_order,
    offsets_and_history_survive_a_restart,
    replay_to_live_switch_is_gapless_while_publishing,
    a_stalled_subscriber_is_served_from_the_log_and_misses_nothing,
    clients_reconnect_and_resume_across_a_broker_restart,
    retention_reports_truncated_instead_of_skipping,
    a_stale_epoch_is_reported_as_a_reset,
);

use std::collections::HashSet;
use std::time::Duration;

use common::{
    RawConnection, TestBroker, Transport, assert_no_duplicates, channel, eventually, within,
};
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use volna_broker::config::{NamespaceConfig, Retention};
use volna_client::{
    ChannelName, Client, Endpoint, ErrorCode, Position, Subscription, SubscriptionError,
};
use volna_proto::{Epoch, Frame, Offset, ProducerSeq, Publish};

/// Publishes `count` messages `"{prefix}{i}"`, `window` at a time in
/// flight; returns the offsets in publish order.
async fn publish_many(
    client: &Client,
    ch: &ChannelName,
    prefix: &str,
    count: usize,
    window: usize,
) -> Vec<u64> {
    let mut offsets = vec![0; count];
    let mut inflight = FuturesUnordered::new();
    let mut next = 0;
    while next < count || !inflight.is_empty() {
        while next < count && inflight.len() < window {
            let i = next;
            let payload = format!("{prefix}{i}");
            inflight.push(async move { (i, client.publish(ch, payload).await) });
            next += 1;
        }
        if let Some((i, result)) = inflight.next().await {
            offsets[i] = result.expect("publish acked").offset.get();
        }
    }
    offsets
}

/// Reads `count` messages and returns their offsets and payloads.
async fn read_messages(sub: &mut Subscription, count: usize) -> Vec<(u64, String)> {
    within("messages", async {
        let mut out = Vec::with_capacity(count);
        while out.len() < count {
            match sub.next().await.expect("stream open") {
                Ok(m) => out.push((
                    m.offset.get(),
                    String::from_utf8(m.payload.to_vec()).unwrap(),
                )),
                Err(e) => panic!("unexpected event {e}"),
            }
        }
        out
    })
    .await
}

fn assert_consecutive(offsets: &[u64], first: u64) {
    for (i, o) in offsets.iter().enumerate() {
        assert_eq!(*o, first + i as u64, "offset at position {i}");
    }
}

async fn three_subscribers_each_receive_every_message_once_in_order(transport: Transport) {
    let broker = TestBroker::start_over(transport, |_| {}).await;
    let ch = channel("chat.three");
    let mut subs = Vec::new();
    let mut clients = Vec::new();
    for _ in 0..3 {
        let c = broker.client().await;
        subs.push(c.subscribe(&ch, Position::Latest).await.unwrap());
        clients.push(c);
    }
    let publisher = broker.client().await;
    const N: usize = 3000;
    let offsets = publish_many(&publisher, &ch, "m", N, 64).await;
    let mut sorted = offsets.clone();
    sorted.sort_unstable();
    assert_consecutive(&sorted, 1);
    for sub in &mut subs {
        let got = read_messages(sub, N).await;
        assert_consecutive(&got.iter().map(|(o, _)| *o).collect::<Vec<_>>(), 1);
        // Each payload once, at the offset its publish was acked with.
        for (offset, payload) in &got {
            let i: usize = payload[1..].parse().unwrap();
            assert_eq!(offsets[i], *offset);
        }
        assert_eq!(sub.duplicates_dropped(), 0);
    }
    for c in &clients {
        assert_no_duplicates(c);
    }
}

async fn offsets_and_history_survive_a_restart(transport: Transport) {
    let mut broker = TestBroker::start_over(transport, |_| {}).await;
    let ch = channel("chat.restart");
    {
        let client = broker.client().await;
        let offsets = publish_many(&client, &ch, "a", 100, 16).await;
        assert_eq!(offsets.iter().max(), Some(&100));
        client.close().await;
    }
    broker.restart().await;
    let client = broker.client().await;
    let mut offsets = publish_many(&client, &ch, "b", 100, 16).await;
    offsets.sort_unstable();
    assert_consecutive(&offsets, 101);
    let mut sub = client.subscribe(&ch, Position::FIRST).await.unwrap();
    let got = read_messages(&mut sub, 200).await;
    assert_consecutive(&got.iter().map(|(o, _)| *o).collect::<Vec<_>>(), 1);
    assert_eq!(got.iter().filter(|(_, p)| p.starts_with('a')).count(), 100);
    assert_eq!(got.iter().filter(|(_, p)| p.starts_with('b')).count(), 100);
    assert_no_duplicates(&client);
}

async fn replay_to_live_switch_is_gapless_while_publishing(transport: Transport) {
    let broker = TestBroker::start_over(transport, |c| {
        // A small ring makes subscribers cross between log and ring often.
        c.engine.channel_ring_bytes = 64 * 1024;
    })
    .await;
    let ch = channel("chat.race");
    let publisher = broker.client().await;
    publish_many(&publisher, &ch, "warm", 500, 32).await;
    let stop = tokio_util::sync::CancellationToken::new();
    let background = {
        let (publisher, ch, stop) = (publisher.clone(), ch.clone(), stop.clone());
        tokio::spawn(async move {
            let mut sent = 0u64;
            while !stop.is_cancelled() && sent < 200_000 {
                publish_many(&publisher, &ch, "live", 50, 16).await;
                sent += 50;
            }
        })
    };
    let reader = broker.client().await;
    for round in 0..25u64 {
        let from = 1 + round * 37;
        let mut sub = reader
            .subscribe(
                &ch,
                Position::From {
                    offset: Offset::new(from),
                    epoch: None,
                },
            )
            .await
            .unwrap();
        // Read past whatever was committed when we subscribed, so that the
        // read crosses from the log into live delivery.
        let head = broker
            .broker()
            .log()
            .unwrap()
            .meta(&ch)
            .unwrap()
            .next_offset
            .get();
        let want = (head - from + 200) as usize;
        let got = read_messages(&mut sub, want).await;
        assert_consecutive(&got.iter().map(|(o, _)| *o).collect::<Vec<_>>(), from);
        // A message sent twice at the switch from log to live would be
        // dropped by the client unseen: only its counter tells.
        assert_eq!(sub.duplicates_dropped(), 0, "round {round}");
        drop(sub);
        // The unsubscribe reaches the broker before the next subscribe.
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    stop.cancel();
    background.await.unwrap();
    assert_no_duplicates(&reader);
}

async fn a_stalled_subscriber_is_served_from_the_log_and_misses_nothing(transport: Transport) {
    let ring_budget = 256 * 1024;
    let broker =
        TestBroker::start_over(transport, |c| c.engine.channel_ring_bytes = ring_budget).await;
    let ch = channel("news.stall");
    let mut config = broker.client_config();
    config.subscription_buffer = 16;
    let slow_client = Client::connect(config).await.unwrap();
    let mut slow = slow_client.subscribe(&ch, Position::Latest).await.unwrap();
    let fast_client = broker.client().await;
    let mut fast = fast_client.subscribe(&ch, Position::Latest).await.unwrap();

    const N: usize = 50_000;
    let publisher = broker.client().await;
    let fast_reader = tokio::spawn(async move { read_messages(&mut fast, N).await.len() });
    // The slow subscriber reads nothing while all of this is published.
    let mut offsets = publish_many(&publisher, &ch, "p", N, 256).await;
    offsets.sort_unstable();
    assert_consecutive(&offsets, 1);
    assert_eq!(within("fast reader", fast_reader).await.unwrap(), N);
    // Memory held for the channel stayed within its budget (plus one batch).
    // Over WebSocket the slow client stopped its full stream (it resumes
    // from its position when read): with the fast reader done too, the
    // channel may have no subscriber, and no ring, left.
    let held = broker.broker().fanout().ring_bytes(&ch).unwrap_or(0);
    assert!(held <= ring_budget + 128 * 1024, "ring holds {held} bytes");

    let got = read_messages(&mut slow, N).await;
    assert_consecutive(&got.iter().map(|(o, _)| *o).collect::<Vec<_>>(), 1);
    assert_no_duplicates(&fast_client);
    // Over QUIC the broker serves the stalled subscriber from the log on
    // the same stream: nothing may come twice. Over WebSocket the client
    // stopped its full stream and resumed from its position, and what was
    // in flight may be dropped as seen (the application got each once,
    // checked above).
    if transport == Transport::Quic {
        assert_no_duplicates(&slow_client);
    }
}

async fn clients_reconnect_and_resume_across_a_broker_restart(transport: Transport) {
    let mut broker = TestBroker::start_over(transport, |_| {}).await;
    let ch = channel("chat.reconnect");
    let subscriber = broker.client().await;
    let mut sub = subscriber.subscribe(&ch, Position::Latest).await.unwrap();
    let publisher = broker.client().await;
    publish_many(&publisher, &ch, "before", 500, 32).await;
    let first = read_messages(&mut sub, 250).await;

    broker.restart().await;
    // The same publisher client: its requests wait for the reconnect.
    publish_many(&publisher, &ch, "after", 500, 32).await;
    let rest = read_messages(&mut sub, 750).await;
    let all: Vec<u64> = first.iter().chain(rest.iter()).map(|(o, _)| *o).collect();
    assert_consecutive(&all, 1);
    let payloads: HashSet<_> = first
        .iter()
        .chain(rest.iter())
        .map(|(_, p)| p.clone())
        .collect();
    // Resumed across the restart: the counter may be above zero, but the
    // application saw each of the 1,000 once, in order (above).
    assert_eq!(payloads.len(), 1000);
}

async fn retention_reports_truncated_instead_of_skipping(transport: Transport) {
    let broker = TestBroker::start_over(transport, |c| {
        c.engine.retention_interval_ms = 20;
        c.namespaces.insert(
            "chat".into(),
            NamespaceConfig {
                retention: Retention {
                    max_messages: Some(100),
                    ..Retention::default()
                },
                ..NamespaceConfig::default()
            },
        );
    })
    .await;
    let ch = channel("chat.retained");
    let client = broker.client().await;
    publish_many(&client, &ch, "r", 150, 16).await;
    let log = broker.broker().log().unwrap().clone();
    eventually("retention to cut the log", || {
        let first = log.meta(&ch).map(|m| m.first_offset);
        async move { first == Some(Offset::new(51)) }
    })
    .await;
    let mut sub = client.subscribe(&ch, Position::FIRST).await.unwrap();
    let first = within("the truncated event", sub.next()).await.unwrap();
    assert_eq!(
        first.unwrap_err(),
        SubscriptionError::Truncated {
            requested: Offset::FIRST,
            first_available: Offset::new(51)
        }
    );
    let got = read_messages(&mut sub, 100).await;
    assert_consecutive(&got.iter().map(|(o, _)| *o).collect::<Vec<_>>(), 51);
    assert_no_duplicates(&client);
}

async fn a_stale_epoch_is_reported_as_a_reset(transport: Transport) {
    let broker = TestBroker::start_over(transport, |_| {}).await;
    let ch = channel("chat.epoch");
    let client = broker.client().await;
    let ack = client.publish(&ch, "one").await.unwrap();
    let stale = Epoch(ack.epoch.0 ^ 1);
    let mut sub = client
        .subscribe(
            &ch,
            Position::From {
                offset: Offset::new(5),
                epoch: Some(stale),
            },
        )
        .await
        .unwrap();
    let event = within("the reset event", sub.next())
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(
        event,
        SubscriptionError::EpochChanged {
            previous: stale,
            current: ack.epoch,
            start: Offset::FIRST
        }
    );
    let got = read_messages(&mut sub, 1).await;
    assert_eq!(got, vec![(1, "one".to_owned())]);
    assert_no_duplicates(&client);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_publish_is_stored_once() {
    let broker = TestBroker::start().await;
    let ch = channel("chat.idem");
    let mut raw = RawConnection::hello(&broker).await;
    let producer = Some(ProducerSeq {
        producer_id: 77,
        sequence: 1,
    });
    let mut acks = Vec::new();
    for request_id in [1, 2] {
        raw.send_frame(&Frame::Publish(Publish {
            request_id,
            channel: ch.clone(),
            producer,
            after: None,
            payload: "once".into(),
        }))
        .await;
        acks.push(raw.next_frame().await.unwrap());
    }
    assert!(
        matches!(acks[0], Frame::Published { request_id: 1, offset, duplicate: false, .. } if offset == Offset::FIRST)
    );
    assert!(
        matches!(acks[1], Frame::Published { request_id: 2, offset, duplicate: true, .. } if offset == Offset::FIRST)
    );
    // A new sequence is a new message.
    raw.send_frame(&Frame::Publish(Publish {
        request_id: 3,
        channel: ch.clone(),
        producer: Some(ProducerSeq {
            producer_id: 77,
            sequence: 2,
        }),
        after: None,
        payload: "twice".into(),
    }))
    .await;
    assert!(
        matches!(raw.next_frame().await, Some(Frame::Published { offset, duplicate: false, .. }) if offset == Offset::new(2))
    );
    let meta = broker.broker().log().unwrap().meta(&ch).unwrap();
    assert_eq!(meta.len(), 2, "the retry was not stored");
}

/// A namespace kept in memory only, holding its channels' last
/// `max_messages`.
fn in_memory_namespace(max_messages: u64) -> NamespaceConfig {
    NamespaceConfig {
        persistent: false,
        retention: Retention {
            max_messages: Some(max_messages),
            ..Retention::default()
        },
        ..NamespaceConfig::default()
    }
}

/// One read holding a burst of requests: the publishes go to the log in
/// batches, split where a request of another kind or a channel of the
/// other log comes between them; every request gets its own answer and
/// each channel stores its publishes in the order they were sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_mixed_requests_gets_every_answer_in_one_read() {
    let broker = TestBroker::start_with(|c| {
        c.limits.max_payload = 64;
        c.namespaces
            .insert("typing".into(), in_memory_namespace(100));
    })
    .await;
    let durable = channel("chat.burst");
    let in_memory = channel("typing.burst");
    let publish = |request_id: u64, channel: &ChannelName, payload: &str| {
        Frame::Publish(Publish {
            request_id,
            channel: channel.clone(),
            producer: None,
            after: None,
            payload: payload.to_owned().into(),
        })
    };
    let burst = [
        publish(1, &durable, "d1"),
        publish(2, &durable, "d2"),
        publish(3, &in_memory, "m1"),
        publish(4, &durable, &"x".repeat(65)),
        publish(5, &durable, "d3"),
        Frame::Ping { request_id: 6 },
        publish(7, &in_memory, "m2"),
        publish(8, &durable, "d4"),
    ];
    let mut bytes = bytes::BytesMut::new();
    for frame in &burst {
        volna_proto::encode(frame, &mut bytes);
    }
    let mut raw = RawConnection::hello(&broker).await;
    raw.send_bytes(&bytes).await;
    let mut answers = std::collections::BTreeMap::new();
    while answers.len() < burst.len() {
        let frame = raw.next_frame().await.expect("an answer");
        let request_id = frame.request_id().expect("a reply");
        let answer = match frame {
            Frame::Published {
                offset, duplicate, ..
            } => {
                assert!(!duplicate);
                format!("offset {}", offset.get())
            }
            Frame::Error(e) => format!("{:?}", e.code),
            Frame::Pong { .. } => "pong".to_owned(),
            other => panic!("unexpected {other:?}"),
        };
        assert!(
            answers.insert(request_id, answer).is_none(),
            "answered twice"
        );
    }
    let answers: Vec<_> = answers.into_values().collect();
    assert_eq!(
        answers,
        [
            "offset 1",
            "offset 2",
            "offset 1",
            "PayloadTooLarge",
            "offset 3",
            "pong",
            "offset 2",
            "offset 4"
        ]
    );
    let client = broker.client().await;
    for (ch, expected) in [
        (&durable, ["d1", "d2", "d3", "d4"].as_slice()),
        (&in_memory, ["m1", "m2"].as_slice()),
    ] {
        let mut sub = client.subscribe(ch, Position::FIRST).await.unwrap();
        assert_eq!(common::next_texts(&mut sub, expected.len()).await, expected);
    }
    assert_no_duplicates(&client);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_in_memory_namespace_delivers_without_touching_the_durable_log() {
    let mut broker = TestBroker::start_with(|c| {
        c.engine.retention_interval_ms = 20;
        c.namespaces
            .insert("typing".into(), in_memory_namespace(10));
    })
    .await;
    let ch = channel("typing.chat42");
    let client = broker.client().await;
    let mut sub = client.subscribe(&ch, Position::Latest).await.unwrap();
    let offsets = publish_many(&client, &ch, "t", 30, 8).await;
    assert_eq!(offsets, (1..=30).collect::<Vec<_>>());
    let got = read_messages(&mut sub, 30).await;
    assert_consecutive(&got.iter().map(|(o, _)| *o).collect::<Vec<_>>(), 1);
    assert_no_duplicates(&client);

    // Kept in memory, bounded by the namespace's retention; not in RocksDB.
    let durable = broker.broker().log().unwrap().clone();
    assert!(durable.meta(&ch).is_none());
    let memory = broker.broker().log_for(&ch).clone();
    eventually("retention to bound the in-memory log", || {
        let first = memory.meta(&ch).map(|m| m.first_offset);
        async move { first == Some(Offset::new(21)) }
    })
    .await;
    let epoch = client.publish(&ch, "last").await.unwrap().epoch;
    drop(sub);
    drop(client);

    // Gone after a restart: a resuming subscriber is told the log restarted.
    broker.restart().await;
    let client = broker.client().await;
    let mut sub = client
        .subscribe(
            &ch,
            Position::From {
                offset: Offset::new(32),
                epoch: Some(epoch),
            },
        )
        .await
        .unwrap();
    let event = within("the epoch change", sub.next()).await.unwrap();
    assert!(
        matches!(event, Err(SubscriptionError::EpochChanged { previous, .. }) if previous == epoch),
        "{event:?}"
    );
    client.publish(&ch, "fresh").await.unwrap();
    let (offset, payload) = read_messages(&mut sub, 1).await.remove(0);
    assert_eq!((offset, payload.as_str()), (1, "fresh"));
    assert_no_duplicates(&client);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_sharing_one_endpoint_each_get_exactly_their_messages() {
    let broker = TestBroker::start().await;
    let endpoint = Endpoint::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let mut config = broker.client_config();
    config.endpoint = Some(endpoint.clone());
    let a = Client::connect(config.clone()).await.unwrap();
    let b = Client::connect(config).await.unwrap();
    let (to_a, to_b) = (channel("shared.a"), channel("shared.b"));
    let mut sub_a = a.subscribe(&to_a, Position::Latest).await.unwrap();
    let mut sub_b = b.subscribe(&to_b, Position::Latest).await.unwrap();
    publish_many(&a, &to_b, "for-b-", 50, 16).await;
    publish_many(&b, &to_a, "for-a-", 50, 16).await;
    let expected = |prefix: &str| -> Vec<(u64, String)> {
        (0..50).map(|i| (i + 1, format!("{prefix}{i}"))).collect()
    };
    assert_eq!(read_messages(&mut sub_a, 50).await, expected("for-a-"));
    assert_eq!(read_messages(&mut sub_b, 50).await, expected("for-b-"));
    assert_no_duplicates(&a);

    // One client closing leaves the socket, and the other client, working.
    a.close().await;
    publish_many(&b, &to_b, "again-", 10, 4).await;
    let again: Vec<_> = read_messages(&mut sub_b, 10).await;
    assert_eq!(again.first(), Some(&(51, "again-0".to_owned())));
    assert_eq!(again.len(), 10);
    assert_no_duplicates(&b);
    assert!(endpoint.receive_buffer_bytes() > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_holds_at_most_max_subscriptions_and_reuses_a_freed_slot() {
    let broker = TestBroker::start().await;
    let mut config = broker.client_config();
    config.max_subscriptions = 2;
    let client = Client::connect(config).await.unwrap();
    let first = client
        .subscribe(&channel("cap.1"), Position::Latest)
        .await
        .unwrap();
    let _second = client
        .subscribe(&channel("cap.2"), Position::Latest)
        .await
        .unwrap();
    let refused = client
        .subscribe(&channel("cap.3"), Position::Latest)
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Some(ErrorCode::TooManySubscriptions));

    // Dropping a subscription frees its slot, and the broker gets the
    // stream credit back: the new subscription receives.
    drop(first);
    let mut third = client
        .subscribe(&channel("cap.3"), Position::Latest)
        .await
        .unwrap();
    client.publish(&channel("cap.3"), "hello").await.unwrap();
    assert_eq!(
        read_messages(&mut third, 1).await,
        vec![(1, "hello".to_owned())]
    );
    assert_no_duplicates(&client);
}

/// `ClientConfig::servers`: a client given several brokers connects to one
/// that answers and, when it goes, moves on to the next (every node of a
/// cluster serves every device).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_with_several_seeds_uses_one_that_answers_and_moves_on() {
    let mut first = TestBroker::start().await;
    // The second broker shows the same development certificate.
    let second_dir = tempfile::tempdir().unwrap();
    for file in ["dev-cert.pem", "dev-key.pem"] {
        std::fs::copy(first.dir.path().join(file), second_dir.path().join(file)).unwrap();
    }
    let second_data = second_dir.path().to_owned();
    let second = TestBroker::start_with(move |c| c.data_dir = second_data).await;
    let nobody = std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let mut config = volna_client::ClientConfig::with_servers(
        [nobody, first.addr(), second.addr()].map(|a| a.to_string()),
        "test",
        volna_client::Trust::CaFile(first.cert()),
    );
    config.connect_timeout = Duration::from_secs(1);
    config.backoff = volna_client::Backoff {
        initial: Duration::from_millis(20),
        max: Duration::from_millis(200),
    };
    let client = volna_client::Client::connect(config).await.unwrap();
    let ch = channel("chat.seeds");
    client.publish(&ch, "to the first").await.unwrap();
    assert!(first.broker().log().unwrap().meta(&ch).is_some());

    first.stop().await;
    client.publish(&ch, "to the second").await.unwrap();
    let on_second = second.broker().log().unwrap().meta(&ch);
    assert_eq!(on_second.map(|m| m.len()), Some(1));
}

/// A client that stops a delivery stream (the client library does when
/// no subscription claims it in time, under load) must hear that the
/// subscription ended, so it subscribes again, instead of being left
/// registered on the broker and silent (G8) — also when the subscription
/// has sent everything and waits: no later message may ever come to fail
/// a write. (Seen in a 10,000-client reconnect storm: 68 subscribers
/// caught up, had their streams stopped, and never heard of it.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_stream_the_client_stops_ends_its_subscription_with_a_notice() {
    let broker = TestBroker::start().await;
    let ch = channel("chat.stopped");
    let publisher = broker.client().await;
    for i in 0..3 {
        publisher.publish(&ch, format!("m{i}")).await.unwrap();
    }
    let mut raw = RawConnection::hello(&broker).await;
    raw.send_frame(&Frame::Subscribe(volna_proto::Subscribe {
        request_id: 1,
        channel: ch.clone(),
        position: Position::FIRST,
    }))
    .await;
    let subscription = match raw.next_frame().await {
        Some(Frame::Subscribed { subscription, .. }) => subscription,
        other => panic!("expected Subscribed, got {other:?}"),
    };
    let mut stream = within("the delivery stream", raw.conn.accept_uni())
        .await
        .unwrap();
    // Everything is sent: the subscription waits for new messages.
    let mut received = Vec::new();
    while received.len() < 64 {
        let Some(chunk) = within("the backlog", stream.read_chunk(1024, true))
            .await
            .unwrap()
        else {
            break;
        };
        received.extend_from_slice(&chunk.bytes);
        if received.ends_with(b"m2") {
            break;
        }
    }
    assert!(received.ends_with(b"m2"), "the backlog was delivered");
    stream.stop(0u32.into()).unwrap();
    match raw.next_frame().await {
        Some(Frame::SubscriptionEnded {
            subscription: ended,
            code,
            ..
        }) => {
            assert_eq!(ended, subscription);
            assert!(code.is_retryable(), "{code:?}");
        }
        other => panic!("expected SubscriptionEnded, got {other:?}"),
    }
}
