//! The subscription and session lifecycle (G8): a subscription never goes
//! quiet without a reason the application sees, and a session that does
//! not read its control stream is still governed by kick, expiry and the
//! stall limit.

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use common::{RawConnection, SECRET, TestBroker, channel, http, jwt_broker, sign, within};
use futures_util::StreamExt;
use rand::Rng;
use serde_json::json;
use volna_broker::store::MemoryStore;
use volna_client::{Client, ErrorCode, Offset, Position, SubscriptionError, TokenSource};
use volna_proto::{CloseCode, Frame};

const ADMIN: &str = "operator-token-0123456789";

/// Sends Pings and never reads the Pongs, until the broker stops taking
/// them: its unsent replies are at their bound and it stops reading.
async fn flood_without_reading(raw: &mut RawConnection) {
    let mut batch = BytesMut::new();
    let mut request_id = 1;
    // Bounded: about 200,000 Pings fill both directions' stream windows.
    for _ in 0..2_000 {
        batch.clear();
        for _ in 0..1_000 {
            volna_proto::encode(&Frame::Ping { request_id }, &mut batch);
            request_id += 1;
        }
        match tokio::time::timeout(Duration::from_millis(500), raw.send.write_all(&batch)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => panic!("the connection failed while flooding: {e}"),
            Err(_) => return,
        }
    }
    panic!("the broker took 2,000,000 Pings whose Pongs were never read");
}

/// How `raw` ended within `limit`: the application close code, or `None`
/// when the connection was reset (its close frame lost, see below).
async fn ended_within(raw: &RawConnection, limit: Duration) -> Option<u64> {
    match tokio::time::timeout(limit, raw.conn.closed()).await {
        Ok(quinn::ConnectionError::ApplicationClosed(close)) => Some(close.error_code.into_inner()),
        // QUIC sends its close frame once (and again only for packets that
        // arrive while closing): on two busy cores a flood can lose it, and
        // the broker, done with the connection, answers the client's next
        // packet with a stateless reset. The connection still ended at once.
        Ok(quinn::ConnectionError::Reset) => None,
        Ok(other) => panic!("closed without an application code: {other}"),
        Err(_) => panic!("not closed within {limit:?}"),
    }
}

/// Checks that the broker ended `raw` within `limit` for `reason`: the
/// client got `code`, or (its close frame lost) a reset while the broker
/// counted the session closed for `reason`.
async fn ended_as(
    broker: &TestBroker,
    raw: &RawConnection,
    limit: Duration,
    code: CloseCode,
    reason: &str,
) {
    match ended_within(raw, limit).await {
        Some(got) => assert_eq!(got, u64::from(code.0)),
        None => {
            let metrics = common::metrics_text(broker).await;
            let counted = format!("volna_connections_closed_total{{reason=\"{reason}\"}} 1");
            assert!(
                metrics.contains(&counted),
                "reset, and the broker did not count the session closed as {reason}:\n{metrics}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_that_does_not_read_is_still_kicked_at_once() {
    let broker = TestBroker::start_with(|c| c.admin.token = Some(ADMIN.into())).await;
    let mut raw = RawConnection::hello(&broker).await;
    flood_without_reading(&mut raw).await;
    let (status, body) = http(
        &broker,
        "POST",
        "/admin/kick",
        Some(ADMIN),
        Some(json!({"user": "test"})),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    ended_as(
        &broker,
        &raw,
        Duration::from_secs(1),
        CloseCode::KICKED,
        "kicked",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_that_does_not_read_still_ends_when_its_token_expires() {
    let broker = jwt_broker(|c| c.auth.expiry_notice_secs = 1).await;
    let expires_at = common::now_secs() + 3;
    let token = sign(SECRET, json!({"sub": "dora", "exp": expires_at}));
    let mut raw = RawConnection::connect(&broker).await;
    assert!(matches!(
        raw.send_hello(&token).await,
        Some(Frame::Welcome(_))
    ));
    flood_without_reading(&mut raw).await;
    let left = expires_at.saturating_sub(common::now_secs());
    let limit = Duration::from_secs(left + 2);
    ended_as(
        &broker,
        &raw,
        limit,
        CloseCode::UNAUTHORIZED,
        "unauthorized",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_that_stops_reading_is_closed_after_the_stall_limit() {
    let broker = TestBroker::start_with(|c| c.limits.control_stall_secs = 1).await;
    let mut raw = RawConnection::hello(&broker).await;
    flood_without_reading(&mut raw).await;
    let limit = Duration::from_secs(10);
    ended_as(
        &broker,
        &raw,
        limit,
        CloseCode::CONTROL_STALLED,
        "control_stalled",
    )
    .await;
    // A client that reads is not touched by the limit.
    let client = broker.client().await;
    let ch = channel("chat.reader");
    let mut sub = client.subscribe(&ch, Position::FIRST).await.unwrap();
    client.publish(&ch, "hello").await.unwrap();
    let m = within("the delivery", sub.next()).await.unwrap().unwrap();
    assert_eq!(m.payload, "hello");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_catch_up_read_is_retried_and_nothing_is_missed() {
    let store = Arc::new(MemoryStore::new());
    // The smallest ring: the subscriber below must read the log.
    let broker = TestBroker::start_on(Some(store.clone()), |c| {
        c.engine.channel_ring_bytes = 64 * 1024;
    })
    .await;
    let client = broker.client().await;
    let ch = channel("chat.faulty");
    let total = 300u64;
    for i in 1..=total {
        let mut payload = format!("{i}:").into_bytes();
        payload.resize(1024, b'.');
        client.publish(&ch, payload).await.unwrap();
    }
    store.fail_next_reads(3);
    let mut sub = client.subscribe(&ch, Position::FIRST).await.unwrap();
    for expected in 1..=total {
        let m = within("a delivery", sub.next()).await.unwrap().unwrap();
        assert_eq!(m.offset.get(), expected);
        assert!(m.payload.starts_with(format!("{expected}:").as_bytes()));
    }
    assert_eq!(store.read_failures_left(), 0, "no read failed");
    // Live again: the next publish arrives too.
    client.publish(&ch, "live").await.unwrap();
    let m = within("the live delivery", sub.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!((m.offset.get(), &m.payload[..]), (total + 1, &b"live"[..]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_subscription_ends_with_forbidden_on_the_application_stream() {
    let broker = jwt_broker(|c| c.auth.expiry_notice_secs = 2).await;
    // The first token expires soon; the refreshed one no longer grants chat.b.
    let wide = sign(
        SECRET,
        json!({"sub": "erin", "exp": common::now_secs() + 4, "subscribe": ["chat.a", "chat.b"]}),
    );
    let mut config = broker.client_config();
    config.token = wide;
    config.token_source = Some(TokenSource::new(|| async {
        Ok(sign(
            SECRET,
            json!({"sub": "erin", "exp": common::now_secs() + 600, "subscribe": ["chat.a"]}),
        ))
    }));
    let client = Client::connect(config).await.unwrap();
    let mut kept = client
        .subscribe(&channel("chat.a"), Position::Latest)
        .await
        .unwrap();
    let mut revoked = client
        .subscribe(&channel("chat.b"), Position::Latest)
        .await
        .unwrap();
    match within("the revocation", revoked.next()).await {
        Some(Err(SubscriptionError::Ended { code, .. })) => assert_eq!(code, ErrorCode::Forbidden),
        other => panic!("expected the subscription to end with Forbidden, got {other:?}"),
    }
    assert!(
        within("the end of the stream", revoked.next())
            .await
            .is_none(),
        "the stream goes on after it ended"
    );
    // The other subscription is untouched, past the first token's expiry.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let service =
        common::user_token(json!({"sub": "svc", "role": "server", "publish": ["chat.a"]}));
    let publisher = common::connect_as(&broker, &service).await.unwrap();
    publisher
        .publish(&channel("chat.a"), "still")
        .await
        .unwrap();
    let m = within("the kept delivery", kept.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(m.payload, "still");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn next_offset_is_a_checkpoint_that_resumes_exactly() {
    let broker = TestBroker::start().await;
    let ch = channel("chat.checkpoint");
    let publisher = broker.client().await;
    let total = 500u64;
    for i in 1..=total {
        publisher.publish(&ch, i.to_string()).await.unwrap();
    }
    let mut rng = rand::rng();
    let mut checkpoint = Offset::FIRST;
    let mut seen = Vec::new();
    // Crash at random points: process some items, save the checkpoint,
    // drop the client with whatever it had buffered, resume from it.
    while checkpoint.get() <= total {
        let client = broker.client().await;
        let mut sub = client
            .subscribe(
                &ch,
                Position::From {
                    offset: checkpoint,
                    epoch: None,
                },
            )
            .await
            .unwrap();
        assert_eq!(sub.next_offset(), Some(checkpoint));
        let take = rng.random_range(1..=120u64);
        for _ in 0..take.min(total + 1 - checkpoint.get()) {
            let m = within("a delivery", sub.next()).await.unwrap().unwrap();
            seen.push(m.offset.get());
            checkpoint = sub.next_offset().unwrap();
            assert_eq!(checkpoint, m.offset.next());
        }
        drop(sub);
        client.close().await;
    }
    assert_eq!(seen, (1..=total).collect::<Vec<_>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_subscribes_leave_nothing_behind() {
    let broker = TestBroker::start().await;
    let client = broker.client().await;
    let channels: Vec<_> = (0..50)
        .map(|i| channel(&format!("chat.cancelled{i}")))
        .collect();
    // 1,000 subscribe calls given up at random points: before the request
    // left, while it was in flight, or after the reply (then the dropped
    // subscription unsubscribes).
    let mut rng = rand::rng();
    for i in 0..1_000 {
        let cut = Duration::from_micros(rng.random_range(0..2_000));
        let ch = &channels[i % channels.len()];
        let _ = tokio::time::timeout(cut, client.subscribe(ch, Position::Latest)).await;
    }
    // Each channel subscribes normally and delivers.
    let mut subs = Vec::new();
    for ch in &channels {
        subs.push(
            within("a subscribe", client.subscribe(ch, Position::Latest))
                .await
                .unwrap(),
        );
    }
    let publisher = broker.client().await;
    for ch in &channels {
        publisher.publish(ch, ch.to_string()).await.unwrap();
    }
    for (ch, sub) in channels.iter().zip(&mut subs) {
        let m = within("a delivery", sub.next()).await.unwrap().unwrap();
        assert_eq!(m.payload, ch.as_str());
    }
    // The broker holds exactly these subscriptions, nothing left over.
    common::eventually("the subscription gauge to settle at 50", || async {
        common::metrics_text(&broker)
            .await
            .contains("\nvolna_subscriptions 50\n")
    })
    .await;
}

/// A fault that holds the store's final flush until the test lets it go.
#[derive(Debug)]
struct GatedFlush {
    release: std::sync::Mutex<std::sync::mpsc::Receiver<()>>,
    released: std::sync::atomic::AtomicBool,
}

impl common::store::StoreFault for GatedFlush {
    fn before_flush(&self) {
        let release = self.release.lock().unwrap();
        if release.recv_timeout(Duration::from_secs(10)).is_ok() {
            self.released
                .store(true, std::sync::atomic::Ordering::SeqCst);
        }
    }
}

/// Issue 11 §E: dropping a broker used to join its log threads on the
/// runtime worker, so no other task of a one-worker runtime ran until the
/// writer was done. Here the store's final flush waits for a task of that
/// same runtime: it is released only if the drop leaves the worker free.
#[test]
fn dropping_a_broker_does_not_block_its_runtime_worker() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let store = Arc::new(common::store::Faulty::new(
        Arc::new(MemoryStore::new()),
        GatedFlush {
            release: std::sync::Mutex::new(rx),
            released: std::sync::atomic::AtomicBool::new(false),
        },
    ));
    let gated = store.clone();
    runtime.block_on(async move {
        // On the worker itself (block_on's own thread is not one).
        tokio::spawn(async move {
            let broker = TestBroker::start_on(Some(gated), |_| {}).await;
            let client = broker.client().await;
            client.publish(&channel("chat.drop"), "m").await.unwrap();
            let releaser = tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(50)).await;
                let _ = tx.send(());
            });
            drop(broker);
            releaser.await.unwrap();
        })
        .await
        .unwrap();
    });
    assert!(
        store
            .fault
            .released
            .load(std::sync::atomic::Ordering::SeqCst),
        "the final flush was not released: the drop held the runtime's only worker"
    );
}

/// Issue 11 §E: a client's overlapping publishes to one channel retried
/// each from its own future, after refusals and reconnects, and raced:
/// the log stored some out of the order the application issued them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_clients_publishes_are_stored_in_the_order_it_issued_them() {
    // A tight rate: many publishes are refused (RateLimited) and retried
    // after a jittered pause, the race that reordered them.
    let mut broker = jwt_broker(|c| {
        c.limits.publish_rate_per_connection = 500;
        c.limits.publish_burst = 20;
        c.limits.publish_rate_per_user = 0;
    })
    .await;
    let user = common::user_token(json!({"sub": "5"}));
    let client = common::connect_as(&broker, &user).await.unwrap();
    let ch = channel("user.5.outbox");
    let total = 400usize;
    let mut pending = futures_util::stream::FuturesOrdered::new();
    for i in 0..total {
        pending.push_back(client.publish(&ch, format!("{i}")));
    }
    let mut acked = 0;
    while let Some(result) = within("the acks", pending.next()).await {
        result.unwrap();
        acked += 1;
        if acked == total / 4 {
            // The rest are in flight or waiting: a reconnect on top.
            broker.restart().await;
        }
    }
    let reader = common::connect_as(&broker, &user).await.unwrap();
    let mut sub = reader.subscribe(&ch, Position::FIRST).await.unwrap();
    let mut stored = Vec::new();
    while stored.len() < total {
        let m = within("a stored message", sub.next())
            .await
            .unwrap()
            .unwrap();
        stored.push(
            String::from_utf8_lossy(&m.payload)
                .parse::<usize>()
                .unwrap(),
        );
    }
    let misplaced = stored.iter().enumerate().filter(|(i, v)| i != *v).count();
    assert_eq!(misplaced, 0, "stored out of issue order: {stored:?}");
}
