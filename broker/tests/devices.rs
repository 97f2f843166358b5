//! Devices as durable things, end to end over real QUIC and RocksDB: a
//! device's cursor (ack, resume from it after the app or the broker was
//! restarted), read markers shared by a user's devices, unread counts, the
//! device registry's limits and the push webhook.

mod common;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{
    RawConnection, TestBroker, channel, eventually, http, jwt_broker, next_texts, user_token,
    within,
};
use futures_util::StreamExt;
use serde_json::json;
use volna_broker::config::{NamespaceConfig, PushConfig};
use volna_client::{
    ChannelName, Client, ClientError, ErrorCode, Fallback, Offset, Position, Subscription,
};
use volna_proto::{Frame, Hello};

const ADMIN: &str = "devices-admin-token-0123456789abcdef";

async fn device(broker: &TestBroker, user: &str, id: &str) -> Client {
    let mut config = broker.client_config();
    config.token = user.to_owned();
    config.device = Some(id.to_owned());
    config.ack_interval = Duration::from_millis(10);
    Client::connect(config).await.expect("device connects")
}

async fn publish_texts(
    client: &Client,
    channel: &ChannelName,
    texts: impl IntoIterator<Item = String>,
) {
    for text in texts {
        client.publish(channel, text).await.expect("published");
    }
}

const FROM_CURSOR: Position = Position::Cursor {
    otherwise: Fallback::From(Offset::FIRST),
};

/// The offset a subscription starts at (once the broker resolved it).
fn start_of(sub: &Subscription) -> u64 {
    sub.next_offset().expect("resolved").get()
}

#[tokio::test]
async fn a_killed_app_resumes_after_its_last_ack_on_a_new_connection_and_after_a_restart() {
    let mut broker = TestBroker::start().await;
    let chat = channel("chat.resume");
    let publisher = broker.client().await;
    publish_texts(&publisher, &chat, (1..=10).map(|i| format!("m{i}"))).await;

    // The app takes all ten but acknowledges only six, then is killed:
    // dropped without unsubscribing or flushing anything more.
    let app = device(&broker, "alice", "phone").await;
    let mut sub = app.subscribe(&chat, FROM_CURSOR).await.expect("subscribe");
    assert_eq!(start_of(&sub), 1, "no cursor yet: from the fallback");
    next_texts(&mut sub, 10).await;
    sub.ack(Offset::new(6)).expect("ack");
    within("acks stored", app.flush_acks())
        .await
        .expect("stored");
    // A smaller, later ack never moves the cursor back.
    sub.ack(Offset::new(3)).expect("ack");
    within("acks stored", app.flush_acks())
        .await
        .expect("stored");
    drop(sub);
    drop(app);

    let app = device(&broker, "alice", "phone").await;
    let mut sub = app.subscribe(&chat, FROM_CURSOR).await.expect("subscribe");
    assert_eq!(start_of(&sub), 7);
    assert_eq!(next_texts(&mut sub, 4).await, ["m7", "m8", "m9", "m10"]);
    drop(sub);
    drop(app);

    // The cursor is in RocksDB: a restart keeps it.
    broker.restart().await;
    let app = device(&broker, "alice", "phone").await;
    let sub = app.subscribe(&chat, FROM_CURSOR).await.expect("subscribe");
    assert_eq!(start_of(&sub), 7);
    // Another device of the same user has its own cursor.
    let tablet = device(&broker, "alice", "tablet").await;
    let other = tablet
        .subscribe(
            &chat,
            Position::Cursor {
                otherwise: Fallback::Latest,
            },
        )
        .await
        .expect("subscribe");
    assert_eq!(start_of(&other), 11, "no cursor: the fallback (latest)");
}

#[tokio::test]
async fn auto_ack_moves_the_cursor_as_the_application_takes_messages() {
    let broker = TestBroker::start().await;
    let chat = channel("chat.auto");
    let publisher = broker.client().await;
    publish_texts(&publisher, &chat, (1..=5).map(|i| format!("m{i}"))).await;
    let app = device(&broker, "bob", "phone").await;
    let mut sub = app.subscribe(&chat, FROM_CURSOR).await.expect("subscribe");
    sub.set_auto_ack(true);
    next_texts(&mut sub, 3).await;
    within("acks stored", app.flush_acks())
        .await
        .expect("stored");
    drop(sub);
    let sub = app.subscribe(&chat, FROM_CURSOR).await.expect("subscribe");
    assert_eq!(start_of(&sub), 4, "taken: 1, 2, 3");
}

/// A raw connection of device `device` of user `user`, speaking `protocol`.
async fn raw_device(broker: &TestBroker, user: &str, device: &str, protocol: u16) -> RawConnection {
    let mut raw = RawConnection::connect(broker).await;
    raw.send_frame(&Frame::Hello(Hello {
        protocol,
        token: user.into(),
        client: "raw-device".into(),
        device: Some(device.into()),
    }))
    .await;
    match raw.next_frame().await {
        Some(Frame::Welcome(w)) => assert_eq!(w.protocol, protocol),
        other => panic!("expected Welcome, got {other:?}"),
    }
    raw
}

fn ack(request_id: u64, channel: &ChannelName, offset: u64) -> Frame {
    Frame::Ack {
        request_id,
        channel: channel.clone(),
        offset: Offset::new(offset),
    }
}

#[tokio::test]
async fn acks_are_reported_together_and_a_flush_is_answered_at_once() {
    let broker = TestBroker::start_with(|c| c.cursors.report_ms = 300).await;
    let chat = channel("chat.reported");
    let publisher = broker.client().await;
    publish_texts(&publisher, &chat, (1..=6).map(|i| format!("m{i}"))).await;

    // Protocol 5: three acks get no reply each; the ping after them is
    // answered first, and then one report names the latest.
    let mut phone = raw_device(&broker, "ann", "phone", volna_proto::PROTOCOL_VERSION).await;
    for (id, offset) in [(10, 1), (11, 2), (12, 3)] {
        phone.send_frame(&ack(id, &chat, offset)).await;
    }
    phone.send_frame(&Frame::Ping { request_id: 13 }).await;
    assert_eq!(
        phone.next_frame().await,
        Some(Frame::Pong { request_id: 13 })
    );
    assert_eq!(
        phone.next_frame().await,
        Some(Frame::Stored { request_id: 12 })
    );
    // A refused ack is answered at once, by its error.
    phone.send_frame(&ack(14, &chat, 99)).await;
    match phone.next_frame().await {
        Some(Frame::Error(e)) => {
            assert_eq!((e.request_id, e.code), (14, ErrorCode::BadRequest));
        }
        other => panic!("expected the refusal, got {other:?}"),
    }
    // A flush is answered at once and covers the acks before it: no report
    // follows it.
    phone.send_frame(&ack(15, &chat, 5)).await;
    phone.send_frame(&Frame::FlushAcks { request_id: 16 }).await;
    assert_eq!(
        phone.next_frame().await,
        Some(Frame::Stored { request_id: 16 })
    );
    tokio::time::sleep(Duration::from_millis(600)).await;
    phone.send_frame(&Frame::Ping { request_id: 17 }).await;
    assert_eq!(
        phone.next_frame().await,
        Some(Frame::Pong { request_id: 17 })
    );
    // A flush with nothing before it is answered too.
    phone.send_frame(&Frame::FlushAcks { request_id: 18 }).await;
    assert_eq!(
        phone.next_frame().await,
        Some(Frame::Stored { request_id: 18 })
    );
    let app = device(&broker, "ann", "phone").await;
    let sub = app.subscribe(&chat, FROM_CURSOR).await.expect("subscribe");
    assert_eq!(start_of(&sub), 6, "the flushed cursor: 5");
    // Through the client: a refused ack fails the flush after it, once,
    // and the next ack is stored.
    sub.ack(Offset::new(99)).expect("ack");
    let refused = within("the refusal", app.flush_acks()).await;
    assert_eq!(
        refused.err().and_then(|e| e.code()),
        Some(ErrorCode::BadRequest)
    );
    sub.ack(Offset::new(6)).expect("ack");
    within("stored", app.flush_acks()).await.expect("stored");
    drop(sub);
    let sub = app.subscribe(&chat, FROM_CURSOR).await.expect("subscribe");
    assert_eq!(start_of(&sub), 7, "the cursor after the refusal: 6");
    drop((sub, app));

    // Protocol 4: each ack has its own reply, as before.
    let mut tablet = raw_device(&broker, "ann", "tablet", 4).await;
    tablet.send_frame(&ack(20, &chat, 1)).await;
    tablet.send_frame(&ack(21, &chat, 2)).await;
    let mut answered = Vec::new();
    for _ in 0..2 {
        match tablet.next_frame().await {
            Some(Frame::Stored { request_id }) => answered.push(request_id),
            other => panic!("expected Stored, got {other:?}"),
        }
    }
    // Replies come in any order.
    answered.sort_unstable();
    assert_eq!(answered, [20, 21]);
}

#[tokio::test]
async fn a_flush_while_a_report_waits_is_answered_only_once_the_acks_are_durable() {
    // Cursors are written every 4 s; reports are due 50 ms after an ack.
    let broker = TestBroker::start_with(|c| {
        c.cursors.flush_ms = 4000;
        c.cursors.report_ms = 50;
    })
    .await;
    let chat = channel("chat.durable");
    let publisher = broker.client().await;
    publish_texts(&publisher, &chat, (1..=3).map(|i| format!("m{i}"))).await;
    let mut phone = raw_device(&broker, "cleo", "phone", volna_proto::PROTOCOL_VERSION).await;
    // A first flush is answered right after a write: the next is 4 s away.
    phone.send_frame(&ack(1, &chat, 1)).await;
    phone.send_frame(&Frame::FlushAcks { request_id: 2 }).await;
    let mut answered = Vec::new();
    while !answered.contains(&2) {
        match phone.next_frame().await {
            Some(Frame::Stored { request_id }) => answered.push(request_id),
            other => panic!("expected Stored, got {other:?}"),
        }
    }
    // The next ack's report is due at once and waits for that write; a
    // flush meanwhile must wait for it too.
    phone.send_frame(&ack(3, &chat, 2)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    phone.send_frame(&Frame::FlushAcks { request_id: 4 }).await;
    phone.send_frame(&Frame::Ping { request_id: 5 }).await;
    assert_eq!(
        phone.next_frame().await,
        Some(Frame::Pong { request_id: 5 })
    );
    let early = tokio::time::timeout(Duration::from_millis(1500), phone.next_frame()).await;
    assert!(
        early.is_err(),
        "answered before the cursor was written: {early:?}"
    );
    let mut answered = Vec::new();
    for _ in 0..2 {
        match phone.next_frame().await {
            Some(Frame::Stored { request_id }) => answered.push(request_id),
            other => panic!("expected Stored, got {other:?}"),
        }
    }
    answered.sort_unstable();
    assert_eq!(answered, [3, 4], "the report and the flush, once written");
}

#[tokio::test]
async fn reading_on_one_device_clears_the_badge_on_the_other() {
    let broker = TestBroker::start_with(|c| c.admin.token = Some(ADMIN.into())).await;
    let chat = channel("chat.badge");
    let publisher = broker.client().await;
    publish_texts(&publisher, &chat, (1..=20).map(|i| format!("m{i}"))).await;

    let phone = device(&broker, "carol", "phone").await;
    let laptop = device(&broker, "carol", "laptop").await;
    let mut markers = laptop.read_markers().expect("a device hears of markers");
    let counts = laptop
        .unread(std::slice::from_ref(&chat))
        .await
        .expect("unread");
    assert_eq!(
        (counts[0].unread, counts[0].head, counts[0].read),
        (20, 20, 0)
    );

    phone
        .mark_read(&chat, Offset::new(15))
        .await
        .expect("marked");
    let event = within("the marker event", markers.recv())
        .await
        .expect("event");
    assert_eq!((event.channel, event.offset.get()), (chat.clone(), 15));
    let counts = laptop
        .unread(&[])
        .await
        .expect("unread of every marked channel");
    assert_eq!(counts.len(), 1);
    assert_eq!((counts[0].unread, counts[0].read), (5, 15));
    // A marker only moves forward, and the other devices are never told
    // of a step back.
    let mut phone_markers = phone.read_markers().expect("a device hears of markers");
    laptop
        .mark_read(&chat, Offset::new(4))
        .await
        .expect("marked");
    let event = within("the marker event", phone_markers.recv())
        .await
        .expect("event");
    assert_eq!(event.offset.get(), 15);
    let counts = phone
        .unread(std::slice::from_ref(&chat))
        .await
        .expect("unread");
    assert_eq!(counts[0].read, 15);

    // The operator sees the same.
    let (status, body) = http(
        &broker,
        "GET",
        "/admin/users/carol/unread",
        Some(ADMIN),
        None,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let rows: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(
        rows,
        json!([{"channel": "chat.badge", "head": 20, "read": 15, "unread": 5}])
    );
}

#[tokio::test]
async fn unread_counts_are_exact_under_concurrent_publishing() {
    let broker = TestBroker::start().await;
    let chats: Vec<ChannelName> = (0..3).map(|i| channel(&format!("chat.busy{i}"))).collect();
    let reader = device(&broker, "dave", "phone").await;
    for chat in &chats {
        // A marker on each, so that `unread` with no channels lists them.
        broker
            .client()
            .await
            .publish(chat, "first")
            .await
            .expect("published");
        reader
            .mark_read(chat, Offset::new(1))
            .await
            .expect("marked");
    }
    let per_writer = 150u64;
    let mut writers = Vec::new();
    for w in 0..3 {
        let (client, chats) = (broker.client().await, chats.clone());
        writers.push(tokio::spawn(async move {
            for i in 0..per_writer {
                let chat = &chats[(i as usize + w) % chats.len()];
                client
                    .publish(chat, format!("w{w}-{i}"))
                    .await
                    .expect("published");
            }
        }));
    }
    // While they publish, counts only grow and never pass what was sent.
    let mut last: BTreeMap<String, u64> = BTreeMap::new();
    while !writers.iter().all(tokio::task::JoinHandle::is_finished) {
        for count in reader.unread(&[]).await.expect("unread") {
            let before = last
                .insert(count.channel.to_string(), count.unread)
                .unwrap_or(0);
            assert!(
                count.unread >= before,
                "unread went down: {before} -> {}",
                count.unread
            );
            assert!(count.unread <= per_writer * 3);
            assert_eq!(count.unread, count.head - count.read);
        }
    }
    for writer in writers {
        writer.await.expect("writer");
    }
    let counts = reader.unread(&[]).await.expect("unread");
    let total: u64 = counts.iter().map(|c| c.unread).sum();
    assert_eq!(total, per_writer * 3, "{counts:?}");
    for count in counts {
        assert_eq!(count.unread, count.head - 1);
    }
}

#[tokio::test]
async fn device_requests_that_cannot_be_served_get_typed_errors() {
    let broker = jwt_broker(|c| {
        c.cursors.max_devices_per_user = 2;
        c.namespaces.insert(
            "typing".into(),
            NamespaceConfig {
                persistent: false,
                retention: volna_broker::config::Retention {
                    max_messages: Some(100),
                    ..Default::default()
                },
                ..NamespaceConfig::default()
            },
        );
    })
    .await;
    let chat = channel("chat.rules");
    let token = user_token(json!({
        "sub": "erin",
        "subscribe": ["chat.rules", "typing.>"],
        "publish": ["chat.rules", "typing.>"],
    }));
    let connect = |device: Option<&str>, token: &str| {
        let mut config = broker.client_config();
        config.token = token.to_owned();
        config.device = device.map(str::to_owned);
        Client::connect(config)
    };
    let code = |e: ClientError| e.code();

    // No device: nothing to store a cursor under.
    let anonymous = connect(None, &token).await.expect("connects");
    anonymous.publish(&chat, "one").await.expect("published");
    let mut sub = anonymous
        .subscribe(&chat, Position::FIRST)
        .await
        .expect("subscribe");
    next_texts(&mut sub, 1).await;
    assert_eq!(
        code(sub.ack(Offset::new(1)).unwrap_err()),
        Some(ErrorCode::DeviceRequired)
    );
    let refused = anonymous
        .subscribe(&channel("chat.other"), FROM_CURSOR)
        .await;
    assert_eq!(refused.err().and_then(code), Some(ErrorCode::Forbidden));
    drop(sub);
    let refused = anonymous.subscribe(&chat, FROM_CURSOR).await;
    assert_eq!(
        refused.err().and_then(code),
        Some(ErrorCode::DeviceRequired)
    );
    assert_eq!(anonymous.unread(&[]).await.expect("unread, no markers"), []);

    let phone = connect(Some("phone"), &token).await.expect("connects");
    // Past the channel's last message, or of a channel the token may not
    // read, or of an ephemeral channel: refused, nothing stored.
    let beyond = phone.mark_read(&chat, Offset::new(2)).await.unwrap_err();
    assert_eq!(code(beyond), Some(ErrorCode::BadRequest));
    let forbidden = phone
        .mark_read(&channel("chat.other"), Offset::new(1))
        .await;
    assert_eq!(forbidden.err().and_then(code), Some(ErrorCode::Forbidden));
    let unread_forbidden = phone.unread(&[channel("chat.other")]).await;
    assert_eq!(
        unread_forbidden.err().and_then(code),
        Some(ErrorCode::Forbidden)
    );
    let typing = channel("typing.erin");
    phone.publish(&typing, "…").await.expect("published");
    let ephemeral = phone.mark_read(&typing, Offset::new(1)).await;
    assert_eq!(ephemeral.err().and_then(code), Some(ErrorCode::BadRequest));
    phone
        .mark_read(&chat, Offset::new(1))
        .await
        .expect("marked");

    // A token bound to a device is refused for another one.
    let bound = user_token(json!({"sub": "erin", "device": "phone", "subscribe": ["chat.rules"]}));
    let wrong = connect(Some("laptop"), &bound).await;
    assert_eq!(wrong.err().and_then(code), Some(ErrorCode::Unauthorized));
    connect(Some("phone"), &bound)
        .await
        .expect("its own device");

    // Two devices at most: a third is refused; a known one still connects.
    connect(Some("tablet"), &token)
        .await
        .expect("second device");
    let third = connect(Some("watch"), &token).await;
    assert_eq!(third.err().and_then(code), Some(ErrorCode::TooManyDevices));
    connect(Some("phone"), &token)
        .await
        .expect("a known device");
}

#[tokio::test]
async fn a_deleted_channel_takes_its_cursors_and_markers_with_it() {
    let broker = TestBroker::start_with(|c| c.admin.token = Some(ADMIN.into())).await;
    let chat = channel("chat.gone");
    let publisher = broker.client().await;
    publish_texts(&publisher, &chat, (1..=5).map(|i| format!("old{i}"))).await;
    let app = device(&broker, "frank", "phone").await;
    let mut sub = app.subscribe(&chat, FROM_CURSOR).await.expect("subscribe");
    next_texts(&mut sub, 5).await;
    sub.ack(Offset::new(5)).expect("ack");
    app.flush_acks().await.expect("stored");
    app.mark_read(&chat, Offset::new(5)).await.expect("marked");
    drop(sub);

    let (status, body) = http(
        &broker,
        "DELETE",
        "/admin/channels/chat.gone",
        Some(ADMIN),
        None,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    publish_texts(&publisher, &chat, (1..=2).map(|i| format!("new{i}"))).await;
    // The new channel is unread from its start, and the cursor of the old
    // one does not apply to it.
    let counts = app
        .unread(std::slice::from_ref(&chat))
        .await
        .expect("unread");
    assert_eq!((counts[0].read, counts[0].unread), (0, 2));
    let mut sub = app.subscribe(&chat, FROM_CURSOR).await.expect("subscribe");
    assert_eq!(start_of(&sub), 1);
    assert_eq!(next_texts(&mut sub, 2).await, ["new1", "new2"]);
    // And the sweep the delete started removes them from disk.
    eventually("the orphaned marks removed", || async {
        common::metrics_text(&broker)
            .await
            .contains("volna_cursors_orphaned_total 2")
    })
    .await;
}

/// A webhook receiver: answers 503 until `up`, then records each batch.
#[derive(Clone, Default)]
struct Receiver {
    up: Arc<std::sync::atomic::AtomicBool>,
    notices: Arc<Mutex<Vec<serde_json::Value>>>,
    refused: Arc<std::sync::atomic::AtomicU64>,
}

impl Receiver {
    async fn serve(&self) -> std::net::SocketAddr {
        use axum::http::StatusCode;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let state = self.clone();
        let app = axum::Router::new().route(
            "/push",
            axum::routing::post(move |axum::Json(batch): axum::Json<serde_json::Value>| {
                let state = state.clone();
                async move {
                    if !state.up.load(std::sync::atomic::Ordering::SeqCst) {
                        state
                            .refused
                            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        return StatusCode::SERVICE_UNAVAILABLE;
                    }
                    let notices = batch["notices"].as_array().cloned().unwrap_or_default();
                    state.notices.lock().expect("lock").extend(notices);
                    StatusCode::NO_CONTENT
                }
            }),
        );
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        addr
    }

    fn offsets(&self, channel: &str) -> Vec<u64> {
        self.notices
            .lock()
            .expect("lock")
            .iter()
            .filter(|n| n["channel"] == channel)
            .filter_map(|n| n["offset"].as_u64())
            .collect()
    }
}

async fn push_broker(receiver: &Receiver, queue: usize, max_batch: usize) -> TestBroker {
    let addr = receiver.serve().await;
    TestBroker::start_with(|c| {
        c.namespaces.insert(
            "chat".into(),
            NamespaceConfig {
                push: Some(PushConfig {
                    webhook_url: format!("http://{addr}/push"),
                    batch_ms: 20,
                    queue,
                    max_batch,
                    ..PushConfig::default()
                }),
                ..NamespaceConfig::default()
            },
        );
    })
    .await
}

#[tokio::test]
async fn the_push_webhook_gets_every_notice_once_its_receiver_recovers() {
    let receiver = Receiver::default();
    let broker = push_broker(&receiver, 10_000, 1_000).await;
    let chat = channel("chat.push");
    let publisher = broker.client().await;
    // The receiver is down: publishing goes on regardless.
    publish_texts(&publisher, &chat, (1..=200).map(|i| format!("m{i}"))).await;
    eventually("the hook to have tried", || async {
        receiver.refused.load(std::sync::atomic::Ordering::SeqCst) >= 2
    })
    .await;
    // Other namespaces have no hook.
    publisher
        .publish(&channel("news.push"), "x")
        .await
        .expect("published");
    receiver.up.store(true, std::sync::atomic::Ordering::SeqCst);
    eventually("every notice", || async {
        receiver.offsets("chat.push").len() >= 200
    })
    .await;
    assert_eq!(
        receiver.offsets("chat.push"),
        (1..=200).collect::<Vec<_>>(),
        "in order, once"
    );
    let notice = receiver.notices.lock().expect("lock")[0].clone();
    assert_eq!(notice["size"], 2);
    assert_eq!(notice["producer_id"], publisher.producer_id());
    assert!(receiver.offsets("news.push").is_empty());
}

#[tokio::test]
async fn a_dead_receiver_costs_the_oldest_notices_beyond_the_queue_never_a_publish() {
    let receiver = Receiver::default();
    let broker = push_broker(&receiver, 50, 20).await;
    let chat = channel("chat.flood");
    let publisher = broker.client().await;
    publish_texts(&publisher, &chat, (1..=300).map(|i| format!("m{i}"))).await;
    // Every publish was acknowledged while nothing was taken.
    let sub_check = publisher
        .subscribe(&chat, Position::Last(1))
        .await
        .expect("subscribe");
    assert_eq!(start_of(&sub_check), 300);
    receiver.up.store(true, std::sync::atomic::Ordering::SeqCst);
    eventually("the queued notices", || async {
        receiver.offsets("chat.flood").last() == Some(&300)
    })
    .await;
    let got = receiver.offsets("chat.flood");
    // What survives: the batch the poster holds while the receiver fails
    // (taken from the front and topped up to max_batch at each retry),
    // then the ring's last 50, in order, once.
    assert!(got.len() <= 20 + 50, "{} notices", got.len());
    assert!(got.windows(2).all(|w| w[0] < w[1]), "{got:?}");
    assert_eq!(got[got.len() - 50..], (251..=300).collect::<Vec<_>>()[..]);
    let dropped = 300 - got.len() as u64;
    let metrics = common::metrics_text(&broker).await;
    assert!(
        metrics.contains(&format!("volna_push_notices_dropped_total {dropped}")),
        "{dropped} dropped:\n{}",
        metrics
            .lines()
            .filter(|l| l.contains("push"))
            .collect::<Vec<_>>()
            .join("\n")
    );
}

#[tokio::test]
async fn resuming_from_a_cursor_while_publishes_race_is_gapless() {
    let broker = TestBroker::start().await;
    let chat = channel("chat.race");
    let publisher = broker.client().await;
    publish_texts(&publisher, &chat, (1..=50).map(|i| format!("m{i}"))).await;
    let app = device(&broker, "gina", "phone").await;
    let mut sub = app.subscribe(&chat, FROM_CURSOR).await.expect("subscribe");
    next_texts(&mut sub, 30).await;
    sub.ack(Offset::new(30)).expect("ack");
    app.flush_acks().await.expect("stored");
    drop(sub);
    let racing = {
        let publisher = publisher.clone();
        let chat = chat.clone();
        tokio::spawn(async move {
            publish_texts(&publisher, &chat, (51..=150).map(|i| format!("m{i}"))).await;
        })
    };
    let mut sub = app.subscribe(&chat, FROM_CURSOR).await.expect("subscribe");
    let mut expected = 31u64;
    while expected <= 150 {
        let m = within("deliveries", sub.next())
            .await
            .expect("open")
            .expect("message");
        assert_eq!(m.offset.get(), expected);
        assert_eq!(m.payload, format!("m{expected}"));
        expected += 1;
    }
    racing.await.expect("publisher");
}
