//! Limits per user, per connection and per address, and namespace rules:
//! each refusal is typed, and nothing accepted is lost.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::{RawConnection, TestBroker, channel, eventually, within};
use futures_util::StreamExt;
use serde_json::json;
use volna_broker::Config;
use volna_broker::config::{NamespaceConfig, Publishers};
use volna_client::{Client, ClientError, ErrorCode, Position};
use volna_proto::{CloseCode, ErrorFrame, Frame, Publish};

fn token(claims: serde_json::Value) -> String {
    common::user_token(claims)
}

async fn jwt_broker(tweak: impl FnOnce(&mut Config)) -> TestBroker {
    common::jwt_broker(tweak).await
}

async fn connect(broker: &TestBroker, token: &str) -> Result<Client, ClientError> {
    common::connect_as(broker, token).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_holds_at_most_max_connections_per_user() {
    let broker = jwt_broker(|c| c.limits.max_connections_per_user = 2).await;
    let alice = token(json!({"sub": "alice"}));
    let first = connect(&broker, &alice).await.unwrap();
    let _second = connect(&broker, &alice).await.unwrap();
    let err = connect(&broker, &alice).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::TooManyConnections), "{err}");
    let mut raw = RawConnection::connect(&broker).await;
    assert!(matches!(
        raw.send_hello(&alice).await,
        Some(Frame::Error(ErrorFrame {
            code: ErrorCode::TooManyConnections,
            ..
        }))
    ));
    assert_eq!(
        raw.close_code().await,
        Some(CloseCode::LIMIT_EXCEEDED.0.into())
    );
    // Other users are not affected; a closed connection frees its place.
    connect(&broker, &token(json!({"sub": "bob"})))
        .await
        .unwrap();
    first.close().await;
    eventually("alice's place to be freed", || async {
        connect(&broker, &alice).await.is_ok()
    })
    .await;
    // Server-side identities are not counted.
    let service = token(json!({"sub": "svc", "role": "server"}));
    let mut services = Vec::new();
    for _ in 0..4 {
        services.push(connect(&broker, &service).await.unwrap());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishes_above_the_rate_are_refused_and_the_client_retries_them() {
    let broker = jwt_broker(|c| {
        c.limits.publish_rate_per_connection = 50;
        c.limits.publish_rate_per_user = 100;
        c.limits.publish_burst = 10;
    })
    .await;
    let user = token(json!({"sub": "7"}));
    let inbox = channel("user.7.inbox");

    // A raw flood: the first burst is stored, the rest refused, typed.
    let mut raw = RawConnection::connect(&broker).await;
    assert!(matches!(
        raw.send_hello(&user).await,
        Some(Frame::Welcome(_))
    ));
    for request_id in 1..=200 {
        raw.send_frame(&Frame::Publish(Publish {
            request_id,
            channel: inbox.clone(),
            producer: None,
            after: None,
            payload: "flood".into(),
        }))
        .await;
    }
    let (mut stored, mut limited) = (0, 0);
    for _ in 0..200 {
        match raw.next_frame().await {
            Some(Frame::Published { .. }) => stored += 1,
            Some(Frame::Error(ErrorFrame {
                code: ErrorCode::RateLimited,
                message,
                ..
            })) => {
                assert!(message.contains("retry in"), "{message}");
                limited += 1;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(
        stored >= 10 && limited > 0,
        "{stored} stored, {limited} limited"
    );
    drop(raw);

    // The client library retries refused publishes: all arrive, once, in order.
    let client = connect(&broker, &user).await.unwrap();
    let mut sub = client.subscribe(&inbox, Position::Latest).await.unwrap();
    for i in 0..100 {
        client.publish(&inbox, format!("m{i}")).await.unwrap();
    }
    let expected: Vec<_> = (0..100).map(|i| format!("m{i}")).collect();
    assert_eq!(common::next_texts(&mut sub, 100).await, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_server_side_identities_publish_to_a_server_namespace() {
    let broker = jwt_broker(|c| {
        c.namespaces.insert(
            "news".into(),
            NamespaceConfig {
                publishers: Publishers::Server,
                ..NamespaceConfig::default()
            },
        );
    })
    .await;
    let news = channel("news.world");
    let reader = connect(
        &broker,
        &token(json!({"sub": "r", "subscribe": ["news.>"], "publish": ["news.>"]})),
    )
    .await
    .unwrap();
    let mut sub = reader.subscribe(&news, Position::Latest).await.unwrap();
    let err = reader.publish(&news, "fake news").await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::Forbidden), "{err}");
    assert!(err.to_string().contains("server-side"), "{err}");

    let newsroom = connect(
        &broker,
        &token(json!({"sub": "newsroom", "role": "server", "publish": ["news.>"]})),
    )
    .await
    .unwrap();
    newsroom.publish(&news, "real news").await.unwrap();
    let got = within("the news", sub.next()).await.unwrap().unwrap();
    assert_eq!(got.payload, "real news");
    assert_eq!(got.offset.get(), 1, "the refused publish stored nothing");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_attempts_are_rate_limited_per_address() {
    let broker = TestBroker::start_with(|c| {
        c.limits.handshakes_per_ip_per_sec = 1;
        c.limits.handshake_burst_per_ip = 3;
    })
    .await;
    let mut clients = Vec::new();
    for _ in 0..3 {
        clients.push(broker.client().await);
    }
    let mut config = broker.client_config();
    config.request_timeout = Duration::from_secs(2);
    let err = Client::connect(config).await.unwrap_err();
    assert!(
        matches!(
            err,
            ClientError::Connect(_)
                | ClientError::Timeout { .. }
                | ClientError::ConnectTimeout { .. }
        ),
        "{err}"
    );
    let metrics = common::metrics_text(&broker).await;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("volna_handshakes_refused_total ") && !l.ends_with(" 0")),
        "{metrics}"
    );
    // The established connections were not affected.
    let ch = channel("chat.limits");
    clients[0].publish(&ch, "fine").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_broker_holds_at_most_max_connections() {
    let broker = TestBroker::start_with(|c| c.limits.max_connections = 2).await;
    let first = broker.client().await;
    let second = broker.client().await;
    let mut config = broker.client_config();
    config.connect_timeout = Duration::from_secs(2);
    let err = Client::connect(config.clone()).await.unwrap_err();
    assert!(matches!(err, ClientError::Connect(_)), "{err}");
    // Room again once one leaves; the others were not disturbed.
    first.close().await;
    drop(first);
    let mut third = None;
    for _ in 0..100 {
        if let Ok(client) = Client::connect(config.clone()).await {
            third = Some(client);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let third = third.expect("a connection slot was freed");
    let ch = channel("chat.capped");
    second.publish(&ch, "a").await.unwrap();
    third.publish(&ch, "b").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn above_the_handshake_rate_clients_validate_their_address_first() {
    let broker = TestBroker::start_with(|c| c.limits.retry_above_handshakes_per_sec = 1).await;
    let mut clients = Vec::new();
    for _ in 0..5 {
        clients.push(broker.client().await);
    }
    let metrics = common::metrics_text(&broker).await;
    let retried: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("volna_handshakes_retried_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    assert!(retried >= 1, "no Retry was asked for:\n{metrics}");
    // Retried clients are fully served.
    let ch = channel("chat.retried");
    let mut sub = clients[4].subscribe(&ch, Position::FIRST).await.unwrap();
    clients[3].publish(&ch, "validated").await.unwrap();
    let m = within("the delivery", sub.next()).await.unwrap().unwrap();
    assert_eq!(m.payload, "validated");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_storm_under_retry_connects_every_client() {
    // Every handshake past the first answers a Retry, as in a reconnect
    // storm after a restart; each Retry's connection ID must not be one a
    // live connection holds, or that client's next Initial is lost.
    const CLIENTS: usize = 2_000;
    let broker = TestBroker::start_with(|c| c.limits.retry_above_handshakes_per_sec = 1).await;
    let mut config = broker.client_config();
    config.connect_timeout = Duration::from_secs(30);
    let opening = std::sync::Arc::new(tokio::sync::Semaphore::new(200));
    let mut connecting = tokio::task::JoinSet::new();
    for _ in 0..CLIENTS {
        let (config, opening) = (config.clone(), opening.clone());
        connecting.spawn(async move {
            let _turn = opening.acquire_owned().await.expect("semaphore");
            Client::connect(config).await
        });
    }
    let mut clients = Vec::with_capacity(CLIENTS);
    let mut failed = Vec::new();
    while let Some(joined) = connecting.join_next().await {
        match joined.expect("join") {
            Ok(client) => clients.push(client),
            Err(e) => failed.push(e.to_string()),
        }
    }
    assert!(
        failed.is_empty(),
        "{} of {CLIENTS} clients did not connect, e.g. {:?}",
        failed.len(),
        failed.first()
    );
    let metrics = common::metrics_text(&broker).await;
    let retried: usize = metrics
        .lines()
        .find_map(|l| l.strip_prefix("volna_handshakes_retried_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    // The limiter lets one handshake a second through unvalidated.
    assert!(retried >= CLIENTS - 60, "{retried} Retries for {CLIENTS}");
    // Every one of them is served.
    let ch = channel("chat.storm");
    let mut sub = clients[CLIENTS - 1]
        .subscribe(&ch, Position::FIRST)
        .await
        .unwrap();
    clients[0].publish(&ch, "through").await.unwrap();
    let m = within("the delivery", sub.next()).await.unwrap().unwrap();
    assert_eq!(m.payload, "through");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_retried_long_after_a_rate_refusal_is_stored_not_too_old() {
    // Now and then a publish is over the rate; it waits a second before
    // its retry while the others go on, thousands of later ones (far more
    // than the producer window) being stored meanwhile.
    let broker = jwt_broker(|c| {
        c.limits.publish_rate_per_connection = 3_000;
        c.limits.publish_rate_per_user = 3_000;
        c.limits.publish_burst = 50;
        c.engine.producer_window = 64;
    })
    .await;
    let mut config = broker.client_config();
    config.token = token(json!({"sub": "8"}));
    config.backoff = volna_client::Backoff {
        initial: Duration::from_secs(1),
        max: Duration::from_secs(1),
    };
    config.max_inflight_publishes = 32;
    let client = Client::connect(config).await.unwrap();
    // Over several channels: a refused publish holds back the later ones
    // of its own channel (they are stored in issue order), not the others.
    let channels: Vec<_> = (0..4).map(|k| channel(&format!("user.8.c{k}"))).collect();
    let total = 6_000u64;
    let acks = futures_util::stream::iter(0..total)
        .map(|i| {
            let client = client.clone();
            let k = (i % 4) as usize;
            let ch = channels[k].clone();
            async move {
                client
                    .publish(&ch, i.to_string())
                    .await
                    .map(|a| (k, a.offset.get()))
            }
        })
        .buffer_unordered(32)
        .collect::<Vec<_>>()
        .await;
    let mut stored = vec![Vec::new(); 4];
    for ack in acks {
        let (k, offset) = ack.unwrap_or_else(|e| panic!("a publish failed: {e}"));
        stored[k].push(offset);
    }
    for offsets in &mut stored {
        offsets.sort_unstable();
        let expected: Vec<u64> = (1..=total / 4).collect();
        assert_eq!(*offsets, expected, "each stored once");
    }
}
