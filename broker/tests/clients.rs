//! The Rust client as a phone's app uses it, against a real broker: many
//! short runs of one user, an app killed with publishes in flight and
//! restarted, a device reconnecting from a new process, refusals that
//! waiting cannot cure, a token service that hangs, an address family the
//! first seed does not have, and a subscription the app does not read
//! over WebSocket. Each scenario failed before the client and broker were
//! made for it (issue 26).

#[macro_use]
mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::{
    TestBroker, Transport, channel, connect_as, eventually, jwt_broker, next_texts, user_token,
    within,
};
use futures_util::StreamExt;
use serde_json::json;
use volna_broker::store::MemoryStore;
use volna_client::{
    Client, ClientConfig, ClientError, ConnectionState, ErrorCode, Offset, Position,
    SubscriptionError, TokenSource, Trust,
};

// The scenarios that are the same over QUIC and WebSocket run on both.
over_both_transports!(
    a_new_connection_of_a_device_takes_over_the_old_one,
    a_refusal_waiting_cannot_cure_stops_the_client,
    a_token_refresh_that_hangs_does_not_hold_up_the_connection,
    a_subscribe_refused_for_now_is_retried_not_ended,
    a_saved_position_carries_its_epoch,
);

fn alice() -> String {
    user_token(json!({"sub": "alice", "publish": ["chat.>"], "subscribe": ["chat.>"]}))
}

/// A client of `broker` for `token`, speaking for `device`.
async fn device_client(broker: &TestBroker, token: &str, device: &str) -> Client {
    let mut config = broker.client_config();
    config.token = token.to_owned();
    config.device = Some(device.to_owned());
    Client::connect(config).await.expect("device connects")
}

/// Every payload stored in `channel`, in offset order.
async fn stored(client: &Client, ch: &volna_client::ChannelName, count: usize) -> Vec<String> {
    let mut sub = client
        .subscribe(ch, Position::FIRST)
        .await
        .expect("subscribe");
    next_texts(&mut sub, count).await
}

/// Waits until `client` stopped for good; returns why.
async fn failure(client: &Client) -> ClientError {
    let mut states = client.state_changes();
    within("the client to stop", async {
        loop {
            if let ConnectionState::Failed(cause) = states.borrow_and_update().clone() {
                return cause;
            }
            states.changed().await.expect("state");
        }
    })
    .await
}

/// A user's short-lived runs (a backend script per message, a phone app
/// cold-started again and again) each take a producer window and a
/// connection: under the default limits (64 windows, 32 connections per
/// user) every one of a thousand is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_short_lived_clients_of_one_user_all_publish() {
    let broker = jwt_broker(|_| {}).await;
    let token = alice();
    let ch = channel("chat.runs");
    // Eight at a time (each run waits for its close to leave, a few
    // round trips): well within the user's 32 connections.
    let runs = futures_util::stream::iter(0..1_000).map(|run| {
        let (broker, token, ch) = (&broker, &token, &ch);
        async move {
            let client = connect_as(broker, token)
                .await
                .unwrap_or_else(|e| panic!("run {run} connects: {e}"));
            let published = client
                .publish(ch, format!("run {run}"))
                .await
                .unwrap_or_else(|e| panic!("run {run} publishes: {e}"));
            client.close().await;
            published.offset.get()
        }
    });
    let mut offsets: Vec<u64> = runs.buffer_unordered(8).collect().await;
    offsets.sort_unstable();
    assert_eq!(offsets, (1..=1_000).collect::<Vec<_>>());
}

/// An app killed with publishes in flight (up to its 128 at once),
/// restarted on the same
/// device, re-sends its outbox under the sequences it kept: each message
/// is stored once. A later publish continues the device's producer after
/// what the broker stored (it is not mistaken for a retry of sequence 1).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_app_resends_its_outbox_and_each_message_is_stored_once() {
    let broker = jwt_broker(|_| {}).await;
    let token = alice();
    let ch = channel("chat.outbox");

    let first = device_client(&broker, &token, "phone").await;
    let outbox: Vec<(u64, String)> = (0..1_000)
        .map(|i| (first.reserve_sequence(), format!("message {i}")))
        .collect();
    let acked = Arc::new(AtomicUsize::new(0));
    let sending = {
        let (first, ch, outbox, acked) = (first.clone(), ch.clone(), outbox.clone(), acked.clone());
        tokio::spawn(async move {
            let sends = outbox.iter().map(|(sequence, text)| {
                let (first, ch, acked) = (&first, &ch, &acked);
                async move {
                    if first
                        .publish_sequenced(ch, *sequence, text.clone())
                        .await
                        .is_ok()
                    {
                        acked.fetch_add(1, Ordering::SeqCst);
                    }
                }
            });
            futures_util::future::join_all(sends).await;
        })
    };
    eventually("some publishes acknowledged", || {
        let acked = acked.clone();
        async move { acked.load(Ordering::SeqCst) >= 10 }
    })
    .await;
    // Killed: the task and the connection go at once, publishes in flight.
    sending.abort();
    drop(first);
    let before = acked.load(Ordering::SeqCst);
    assert!(
        before < 1_000,
        "the app was killed with publishes in flight"
    );

    let restarted = device_client(&broker, &token, "phone").await;
    let mut duplicates = 0;
    for (sequence, text) in &outbox {
        let published = restarted
            .publish_sequenced(&ch, *sequence, text.clone())
            .await
            .expect("re-sent");
        duplicates += usize::from(published.duplicate);
    }
    assert!(
        duplicates >= before,
        "{duplicates} answered as stored, {before} were acknowledged before the kill"
    );
    let after = restarted
        .publish(&ch, "after the restart")
        .await
        .expect("new");
    assert!(
        !after.duplicate,
        "a new publish is not a retry of an old one"
    );
    assert_eq!(after.offset.get(), 1_001);

    let mut texts = stored(&restarted, &ch, 1_001).await;
    assert_eq!(texts.pop().as_deref(), Some("after the restart"));
    texts.sort();
    let mut expected: Vec<_> = outbox.into_iter().map(|(_, text)| text).collect();
    expected.sort();
    assert_eq!(texts, expected, "each message of the outbox stored once");
}

/// A device that connects again (a new process of the app) takes over
/// its older connection at once: the older client is told and stops (it
/// must not reconnect and take over back), and only one connection counts.
async fn a_new_connection_of_a_device_takes_over_the_old_one(transport: Transport) {
    let mut broker = jwt_broker(|_| {}).await;
    broker.transport = transport;
    let token = alice();
    let ch = channel("chat.takeover");
    let old = device_client(&broker, &token, "tablet").await;
    let mut old_sub = old.subscribe(&ch, Position::Latest).await.expect("sub");

    let new = device_client(&broker, &token, "tablet").await;
    let cause = failure(&old).await;
    assert_eq!(cause.code(), Some(ErrorCode::Replaced), "{cause}");
    match within("the old subscription ends", old_sub.next()).await {
        Some(Err(SubscriptionError::Ended { code, .. })) => assert_eq!(code, ErrorCode::Replaced),
        other => panic!("expected Ended, got {other:?}"),
    }
    let refused = old
        .publish(&ch, "from the old one")
        .await
        .expect_err("the old client is stopped");
    assert_eq!(refused.code(), Some(ErrorCode::Replaced), "{refused}");

    new.publish(&ch, "from the new one")
        .await
        .expect("published");
    eventually("one connection of the device counted", || async {
        common::metrics_text(&broker)
            .await
            .lines()
            .any(|l| l == "volna_connections 1")
    })
    .await;
}

/// An instance of a device cut off while a newer one took over and
/// published comes back: the broker stored sequences it never took, so it
/// stops as replaced instead of publishing under them (the broker would
/// answer its new messages as duplicates of the other instance's, and
/// they would be lost).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_instance_of_a_device_stops_instead_of_reusing_sequences() {
    let mut broker = jwt_broker(|_| {}).await;
    let token = alice();
    let ch = channel("chat.stale");
    let mut config = broker.client_config();
    config.token = token.clone();
    config.device = Some("laptop".into());
    // It comes back only after the newer instance has published.
    config.backoff = volna_client::Backoff {
        initial: Duration::from_secs(4),
        max: Duration::from_secs(4),
    };
    let stale = Client::connect(config).await.expect("connects");
    stale.publish(&ch, "from the stale one").await.expect("pub");

    broker.restart().await;
    let newer = device_client(&broker, &token, "laptop").await;
    for text in ["newer 1", "newer 2"] {
        let published = newer.publish(&ch, text).await.expect("pub");
        assert!(!published.duplicate);
    }
    let cause = failure(&stale).await;
    assert_eq!(cause.code(), Some(ErrorCode::Replaced), "{cause}");
    let refused = stale
        .publish(&ch, "lost if sent")
        .await
        .expect_err("the stale client is stopped");
    assert_eq!(refused.code(), Some(ErrorCode::Replaced), "{refused}");
    let reader = connect_as(&broker, &token).await.expect("reader");
    assert_eq!(
        stored(&reader, &ch, 3).await,
        ["from the stale one", "newer 1", "newer 2"]
    );
}

/// A token that expired, with no source to get another: the client stops
/// with the broker's refusal instead of reconnecting forever in silence;
/// the subscription ends with the code and a publish answers it at once.
async fn a_refusal_waiting_cannot_cure_stops_the_client(transport: Transport) {
    let mut broker = jwt_broker(|_| {}).await;
    broker.transport = transport;
    let token = common::sign(
        common::SECRET,
        json!({
            "sub": "alice",
            "publish": ["chat.>"],
            "subscribe": ["chat.>"],
            "exp": common::now_secs() + 3,
        }),
    );
    let client = connect_as(&broker, &token).await.expect("connects");
    let ch = channel("chat.expiring");
    let mut sub = client.subscribe(&ch, Position::Latest).await.expect("sub");

    let cause = failure(&client).await;
    assert_eq!(cause.code(), Some(ErrorCode::Unauthorized), "{cause}");
    match within("the subscription ends", sub.next()).await {
        Some(Err(SubscriptionError::Ended { code, .. })) => {
            assert_eq!(code, ErrorCode::Unauthorized);
        }
        other => panic!("expected Ended, got {other:?}"),
    }
    let started = Instant::now();
    let refused = client
        .publish(&ch, "too late")
        .await
        .expect_err("the client is stopped");
    assert!(matches!(refused, ClientError::Failed(_)), "{refused}");
    assert_eq!(refused.code(), Some(ErrorCode::Unauthorized));
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "answered at once"
    );
}

/// A token service that hangs while the client refreshes its token holds
/// up nothing else: the connection lost meanwhile is noticed, the client
/// reconnects and its subscription goes on.
async fn a_token_refresh_that_hangs_does_not_hold_up_the_connection(transport: Transport) {
    // Every token is announced as expiring at once (an hour's notice).
    let mut broker = jwt_broker(|c| c.auth.expiry_notice_secs = 7_200).await;
    broker.transport = transport;
    let calls = Arc::new(AtomicUsize::new(0));
    let source = {
        let calls = calls.clone();
        TokenSource::new(move || {
            let first = calls.fetch_add(1, Ordering::SeqCst) == 0;
            async move {
                if first {
                    std::future::pending::<()>().await;
                }
                Ok(alice())
            }
        })
    };
    let mut config = broker.client_config();
    config.token = alice();
    config.token_source = Some(source);
    config.token_timeout = Duration::from_secs(3_600);
    let client = Client::connect(config).await.expect("connects");
    let ch = channel("chat.refresh");
    let mut sub = client.subscribe(&ch, Position::Latest).await.expect("sub");
    eventually("the refresh to start", || {
        let calls = calls.clone();
        async move { calls.load(Ordering::SeqCst) >= 1 }
    })
    .await;

    broker.restart().await;
    let publisher = connect_as(&broker, &alice()).await.expect("publisher");
    eventually("the client to reconnect", || async {
        client.is_connected()
    })
    .await;
    publisher
        .publish(&ch, "after the restart")
        .await
        .expect("pub");
    assert_eq!(next_texts(&mut sub, 1).await, ["after the restart"]);
}

/// A subscribe refused for a passing cause (the channel's metadata cannot
/// be read for a while, as while its partition fails over) is retried,
/// both when the application subscribes and when the client resubscribes
/// after a reconnect: the subscription goes on instead of ending.
async fn a_subscribe_refused_for_now_is_retried_not_ended(transport: Transport) {
    let store = Arc::new(MemoryStore::new());
    let mut broker = TestBroker::start_on(Some(store.clone()), |_| {}).await;
    broker.transport = transport;
    let client = broker.client().await;
    let ch = channel("chat.failing-over");
    store.fail_next_lookups(2);
    let mut sub = client
        .subscribe(&ch, Position::FIRST)
        .await
        .expect("retried until it passes");
    assert_eq!(store.lookup_failures_left(), 0);
    client.publish(&ch, "one").await.expect("pub");
    assert_eq!(next_texts(&mut sub, 1).await, ["one"]);

    // After a restart the channel is not resident: the resubscribe finds
    // the lookup failing.
    store.fail_next_lookups(3);
    broker.restart().await;
    eventually("the lookups to fail and pass again", || async {
        store.lookup_failures_left() == 0
    })
    .await;
    let publisher = broker.client().await;
    publisher.publish(&ch, "two").await.expect("pub");
    assert_eq!(next_texts(&mut sub, 1).await, ["two"]);
}

/// The client's socket reaches both address families: a seed on IPv6
/// after one on IPv4 (a host name resolving to both) is reached.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_seed_of_the_other_address_family_is_reached() {
    let broker = TestBroker::start_with(|c| c.listen = "[::1]:0".parse().expect("addr")).await;
    let dead = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
    let mut config = broker.client_config();
    config.servers = vec![
        dead.local_addr().expect("addr").to_string(),
        broker.addr().to_string(),
    ];
    config.server_name = Some("localhost".into());
    config.connect_timeout = Duration::from_millis(500);
    let client = Client::connect(config).await.expect("reaches [::1]");
    match client.state() {
        ConnectionState::Connected { server, .. } => assert!(server.starts_with("[::1]")),
        other => panic!("{other:?}"),
    }
    let ch = channel("chat.v6");
    client.publish(&ch, "over IPv6").await.expect("published");
}

/// Over WebSocket, a subscription the application does not read holds up
/// nothing: publishes are answered, other subscriptions deliver, and the
/// unread one delivers everything, in order, once the application reads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_websocket_a_subscription_not_read_holds_up_nothing() {
    let broker = TestBroker::start_over(Transport::WebSocket, |_| {}).await;
    let mut config = broker.client_config();
    config.subscription_buffer = 8;
    config.request_timeout = Duration::from_secs(10);
    let client = Client::connect(config).await.expect("connects");
    assert!(client.over_websocket());
    let (ignored, other) = (channel("chat.ignored"), channel("chat.other"));
    let mut unread = client
        .subscribe(&ignored, Position::Latest)
        .await
        .expect("a");
    let mut read = client.subscribe(&other, Position::Latest).await.expect("b");

    let publisher = ClientConfig::new(
        broker.addr().to_string(),
        "test",
        Trust::CaFile(broker.cert()),
    );
    let publisher = Client::connect(publisher).await.expect("publisher");
    for i in 0..3_000 {
        publisher
            .publish(&ignored, format!("{i}"))
            .await
            .expect("pub");
    }
    for i in 0..10 {
        within(
            "a publish on the same WebSocket",
            client.publish(&other, format!("b{i}")),
        )
        .await
        .expect("answered");
    }
    assert_eq!(
        next_texts(&mut read, 10).await,
        (0..10).map(|i| format!("b{i}")).collect::<Vec<_>>()
    );
    let all = next_texts(&mut unread, 3_000).await;
    assert_eq!(all, (0..3_000).map(|i| i.to_string()).collect::<Vec<_>>());
    assert_eq!(client.duplicates_dropped(), 0);
}

/// A position saved with its epoch resumes into `EpochChanged` when the
/// channel was deleted and created again meanwhile (an offset alone would
/// resume silently inside the new log).
async fn a_saved_position_carries_its_epoch(transport: Transport) {
    const ADMIN: &str = "clients-admin-token-0123456789abcdef";
    let broker = TestBroker::start_over(transport, |c| c.admin.token = Some(ADMIN.into())).await;
    let client = broker.client().await;
    let ch = channel("chat.saved");
    for i in 0..3 {
        client.publish(&ch, format!("old {i}")).await.expect("pub");
    }
    let mut sub = client.subscribe(&ch, Position::FIRST).await.expect("sub");
    next_texts(&mut sub, 2).await;
    let saved = sub.next_position().expect("a position");
    let Position::From { offset, epoch } = saved else {
        panic!("{saved:?}")
    };
    assert_eq!((offset, epoch.is_some()), (Offset::new(3), true));
    drop(sub);

    let (status, _) = common::http(
        &broker,
        "DELETE",
        "/admin/channels/chat.saved",
        Some(ADMIN),
        None,
    )
    .await;
    assert_eq!(status, 200);
    for i in 0..5 {
        client.publish(&ch, format!("new {i}")).await.expect("pub");
    }
    let mut resumed = client.subscribe(&ch, saved).await.expect("resume");
    match within("the first item", resumed.next()).await {
        Some(Err(SubscriptionError::EpochChanged { start, .. })) => {
            assert_eq!(start, Offset::FIRST);
        }
        other => panic!("expected EpochChanged, got {other:?}"),
    }
    assert_eq!(
        next_texts(&mut resumed, 5).await,
        (0..5).map(|i| format!("new {i}")).collect::<Vec<_>>()
    );
}
