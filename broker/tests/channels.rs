//! Channels as bounded state (issue 11 §C2): metadata is loaded on use and
//! evicted when idle, start-up reads no channel, creating channels is
//! limited per user, and an operator can delete a channel with its log.

#![allow(clippy::unwrap_used)]

mod common;

use common::{TestBroker, channel, http, within};
use futures_util::StreamExt;
use volna_client::{ErrorCode, Offset, Position, SubscriptionError};

const TOKEN: &str = "channels-admin-token-0123";

fn metric(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} in\n{text}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_channels_leave_memory_and_come_back_whole() {
    let mut broker = TestBroker::start_with(|c| {
        c.engine.max_resident_channels = 64;
    })
    .await;
    let client = broker.client().await;
    let names: Vec<_> = (0..600).map(|i| channel(&format!("inbox.{i}"))).collect();
    let mut epochs = Vec::new();
    for name in &names {
        epochs.push(client.publish(name, "first").await.unwrap().epoch);
    }
    let (_, metrics) = http(&broker, "GET", "/metrics", None, None).await;
    let resident = metric(&metrics, "volna_resident_channels ");
    assert!(
        resident <= 64,
        "{resident} channels resident with a cap of 64"
    );

    // An evicted channel goes on where it was: same epoch, next offset.
    let published = client.publish(&names[0], "second").await.unwrap();
    assert_eq!((published.offset.get(), published.epoch), (2, epochs[0]));
    let mut sub = client.subscribe(&names[1], Position::FIRST).await.unwrap();
    let m = within("a stored message", sub.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!((m.offset.get(), &m.payload[..]), (1, &b"first"[..]));
    drop(sub);
    drop(client);

    // Start-up reads no channel; each is read when used.
    broker.restart().await;
    let (_, metrics) = http(&broker, "GET", "/metrics", None, None).await;
    assert_eq!(metric(&metrics, "volna_resident_channels "), 0);
    let client = broker.client().await;
    let mut sub = client
        .subscribe(&names[599], Position::FIRST)
        .await
        .unwrap();
    let m = within("a stored message", sub.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!((m.offset.get(), m.epoch), (1, epochs[599]));
    let published = client.publish(&names[599], "after").await.unwrap();
    assert_eq!((published.offset.get(), published.epoch), (2, epochs[599]));
    let m = within("the live message", sub.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(m.offset.get(), 2);
    // A new channel after the restart never reuses an old one's id.
    let fresh = client.publish(&channel("inbox.new"), "x").await.unwrap();
    assert_eq!(fresh.offset.get(), 1);
    let mut old = client.subscribe(&names[5], Position::FIRST).await.unwrap();
    let m = within("an old channel's message", old.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!((m.offset.get(), &m.payload[..]), (1, &b"first"[..]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn creating_channels_is_limited_per_user_and_publishing_to_known_ones_is_not() {
    let broker = common::jwt_broker(|c| {
        c.limits.channel_creations_per_minute = 60;
        c.limits.channel_creation_burst = 5;
        c.limits.publish_rate_per_connection = 0;
        c.limits.publish_rate_per_user = 0;
    })
    .await;
    let user = common::user_token(serde_json::json!({"sub": "3"}));
    let client = common::connect_as(&broker, &user).await.unwrap();
    let chat = |i| channel(&format!("user.3.chat{i}"));
    for i in 0..5 {
        client.publish(&chat(i), "x").await.unwrap();
    }
    // Known channels are not limited.
    for _ in 0..20 {
        client.publish(&chat(0), "again").await.unwrap();
    }
    // The sixth new channel is refused (RateLimited) until the bucket
    // refills (one a second); the client retries it by itself.
    let published = client.publish(&chat(5), "x").await.unwrap();
    assert_eq!(published.offset.get(), 1);
    let (_, metrics) = http(&broker, "GET", "/metrics", None, None).await;
    assert!(metric(&metrics, "volna_channel_creations_refused_total ") >= 1);
    assert!(metrics.contains("volna_publish_errors_total{code=\"RateLimited\"}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_channel_ends_its_subscribers_and_starts_afresh() {
    let broker = TestBroker::start_with(|c| c.admin.token = Some(TOKEN.into())).await;
    let client = broker.client().await;
    let ch = channel("chat.gone");
    let mut old_epoch = None;
    for i in 0..10 {
        old_epoch = Some(client.publish(&ch, format!("m{i}")).await.unwrap().epoch);
    }
    let mut sub = client.subscribe(&ch, Position::FIRST).await.unwrap();
    for i in 1..=10 {
        let m = within("a message", sub.next()).await.unwrap().unwrap();
        assert_eq!(m.offset.get(), i);
    }

    let (status, body) = http(
        &broker,
        "DELETE",
        "/admin/channels/chat.gone",
        Some(TOKEN),
        None,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let deleted: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        (
            deleted["messages"].as_u64(),
            deleted["subscribers"].as_u64()
        ),
        (Some(10), Some(1))
    );

    // The subscriber is told, and its stream ends: no silent stall.
    match within("the end", sub.next()).await {
        Some(Err(SubscriptionError::Ended { code, .. })) => {
            assert_eq!(code, ErrorCode::ChannelDeleted)
        }
        other => panic!("expected Ended(ChannelDeleted), got {other:?}"),
    }
    assert!(within("the stream's end", sub.next()).await.is_none());

    let (status, _) = http(
        &broker,
        "GET",
        "/admin/channels/chat.gone",
        Some(TOKEN),
        None,
    )
    .await;
    assert_eq!(status, 404);
    let (status, _) = http(
        &broker,
        "DELETE",
        "/admin/channels/chat.gone",
        Some(TOKEN),
        None,
    )
    .await;
    assert_eq!(status, 404);
    let (status, _) = http(&broker, "DELETE", "/admin/channels/chat.gone", None, None).await;
    assert_eq!(status, 401);

    // Nothing of the old log is readable; the name starts afresh.
    let mut again = client.subscribe(&ch, Position::FIRST).await.unwrap();
    let published = client.publish(&ch, "new life").await.unwrap();
    assert_eq!(published.offset.get(), 1);
    assert_ne!(Some(published.epoch), old_epoch);
    let m = within("the new channel's message", again.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!((m.offset.get(), &m.payload[..]), (1, &b"new life"[..]));

    // A device resuming in the old epoch is told the log was reset.
    drop(again);
    let resume = Position::From {
        offset: Offset::new(11),
        epoch: old_epoch,
    };
    let mut resumed = client.subscribe(&ch, resume).await.unwrap();
    assert!(matches!(
        within("the reset", resumed.next()).await,
        Some(Err(SubscriptionError::EpochChanged { .. }))
    ));
}
