//! Malformed, oversized and out-of-order input gets typed errors, and a
//! well-behaved client on the same broker is not disturbed (G6).

#![allow(clippy::unwrap_used)]

mod common;

use bytes::{BufMut, BytesMut};
use common::{RawConnection, TestBroker, channel, within};
use volna_client::{ClientError, ErrorCode, Position};
use volna_proto::{CloseCode, ErrorFrame, Frame, Offset, Publish, Subscribe, SubscriptionId};

fn error_code(frame: Option<Frame>) -> (u64, ErrorCode) {
    match frame {
        Some(Frame::Error(ErrorFrame {
            request_id, code, ..
        })) => (request_id, code),
        other => panic!("expected an Error frame, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_typed_errors_and_the_broker_keeps_serving() {
    let broker = TestBroker::start_with(|c| c.limits.max_payload = 1024).await;
    let ch = channel("chat.hostile");

    // A well-behaved client, subscribed throughout.
    let good = broker.client().await;
    let mut sub = good.subscribe(&ch, Position::Latest).await.unwrap();
    assert_eq!(
        good.publish(&ch, "before").await.unwrap().offset,
        Offset::new(1)
    );

    // Oversize payload: refused for that request only; the connection lives.
    let mut raw = RawConnection::hello(&broker).await;
    raw.send_frame(&Frame::Publish(Publish {
        request_id: 10,
        channel: ch.clone(),
        producer: None,
        after: None,
        payload: vec![0u8; 1025].into(),
    }))
    .await;
    assert_eq!(
        error_code(raw.next_frame().await),
        (10, ErrorCode::PayloadTooLarge)
    );
    raw.send_frame(&Frame::Ping { request_id: 11 }).await;
    assert_eq!(raw.next_frame().await, Some(Frame::Pong { request_id: 11 }));

    // Request-level mistakes: typed errors, the session goes on.
    raw.send_frame(&Frame::Unsubscribe {
        request_id: 12,
        subscription: SubscriptionId(999),
    })
    .await;
    assert_eq!(
        error_code(raw.next_frame().await),
        (12, ErrorCode::NotSubscribed)
    );
    raw.send_frame(&Frame::Subscribe(Subscribe {
        request_id: 13,
        channel: ch.clone(),
        position: volna_proto::Position::From {
            offset: Offset::new(0),
            epoch: None,
        },
    }))
    .await;
    assert_eq!(
        error_code(raw.next_frame().await),
        (13, ErrorCode::BadRequest)
    );
    raw.send_frame(&Frame::Pong { request_id: 14 }).await;
    assert_eq!(
        error_code(raw.next_frame().await),
        (14, ErrorCode::UnexpectedFrame)
    );

    // The client library refuses oversize payloads before sending.
    let err = good.publish(&ch, vec![0u8; 1025]).await.unwrap_err();
    assert!(matches!(
        err,
        ClientError::PayloadTooLarge {
            len: 1025,
            max: 1024
        }
    ));

    // Unknown frame type: typed error, then the connection is closed.
    let mut raw = RawConnection::hello(&broker).await;
    raw.send_bytes(&[0, 0, 0, 1, 0x7f]).await;
    assert_eq!(
        error_code(raw.next_frame().await),
        (0, ErrorCode::UnknownFrame)
    );
    assert_eq!(
        raw.close_code().await,
        Some(CloseCode::PROTOCOL_ERROR.0.into())
    );

    // A 4 GiB length prefix: refused before anything is allocated.
    let mut raw = RawConnection::hello(&broker).await;
    raw.send_bytes(&[0xff, 0xff, 0xff, 0xff, 0x02]).await;
    assert_eq!(
        error_code(raw.next_frame().await),
        (0, ErrorCode::FrameTooLarge)
    );
    assert_eq!(
        raw.close_code().await,
        Some(CloseCode::PROTOCOL_ERROR.0.into())
    );

    // A truncated-then-garbage frame: a Publish whose fields run out.
    let mut raw = RawConnection::hello(&broker).await;
    let mut bytes = BytesMut::new();
    bytes.put_u32(3);
    bytes.put_u8(0x02);
    bytes.put_u16(0xabcd);
    raw.send_bytes(&bytes).await;
    assert_eq!(
        error_code(raw.next_frame().await),
        (0, ErrorCode::BadRequest)
    );
    assert_eq!(
        raw.close_code().await,
        Some(CloseCode::PROTOCOL_ERROR.0.into())
    );

    // Requests before Hello.
    let mut raw = RawConnection::connect(&broker).await;
    raw.send_frame(&Frame::Publish(Publish {
        request_id: 20,
        channel: ch.clone(),
        producer: None,
        after: None,
        payload: "sneaky".into(),
    }))
    .await;
    assert_eq!(
        error_code(raw.next_frame().await),
        (20, ErrorCode::UnexpectedFrame)
    );
    assert_eq!(
        raw.close_code().await,
        Some(CloseCode::PROTOCOL_ERROR.0.into())
    );

    // A Hello of a protocol version the broker does not speak.
    let mut raw = RawConnection::connect(&broker).await;
    raw.send_frame(&Frame::Hello(volna_proto::Hello {
        protocol: 99,
        token: "t".into(),
        client: "future".into(),
        device: None,
    }))
    .await;
    assert_eq!(
        error_code(raw.next_frame().await),
        (0, ErrorCode::UnsupportedVersion)
    );
    // A client of the previous version is still served, in its version.
    let mut raw = RawConnection::connect(&broker).await;
    raw.send_frame(&Frame::Hello(volna_proto::Hello {
        protocol: volna_proto::MIN_PROTOCOL_VERSION,
        token: "t".into(),
        client: "older".into(),
        device: None,
    }))
    .await;
    assert!(matches!(
        raw.next_frame().await,
        Some(Frame::Welcome(w)) if w.protocol == volna_proto::MIN_PROTOCOL_VERSION
    ));

    // Nothing of the above was stored, and the good client was untouched.
    assert_eq!(
        good.publish(&ch, "after").await.unwrap().offset,
        Offset::new(2)
    );
    assert_eq!(common::next_texts(&mut sub, 2).await, ["before", "after"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_never_says_hello_is_closed() {
    let broker = TestBroker::start_with(|c| c.limits.hello_timeout_ms = 200).await;
    let raw = RawConnection::connect(&broker).await;
    // The control stream is open but silent.
    assert_eq!(
        raw.close_code().await,
        Some(CloseCode::HELLO_TIMEOUT.0.into())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_tells_clients_the_broker_is_going_away() {
    let mut broker = TestBroker::start().await;
    let raw = RawConnection::hello(&broker).await;
    broker.stop().await;
    assert_eq!(raw.close_code().await, Some(CloseCode::GOING_AWAY.0.into()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_clients_at_once_do_not_disturb_a_well_behaved_one() {
    use serde_json::json;
    use std::time::Duration;
    let broker = common::jwt_broker(|c| {
        c.limits.hello_timeout_ms = 500;
        c.limits.publish_rate_per_connection = 1000;
        c.limits.publish_rate_per_user = 1000;
        c.limits.publish_burst = 100;
    })
    .await;
    let broker = std::sync::Arc::new(broker);
    let ch = channel("chat.good");
    let good = common::user_token(
        json!({"sub": "good", "subscribe": ["chat.good"], "publish": ["chat.good"]}),
    );
    let reader = common::connect_as(&broker, &good).await.unwrap();
    let writer = common::connect_as(&broker, &good).await.unwrap();
    let mut sub = reader.subscribe(&ch, Position::Latest).await.unwrap();

    // A publish flood far above the rate: refused, typed, connection kept.
    let flood = {
        let broker = broker.clone();
        tokio::spawn(async move {
            let mallory = common::user_token(json!({"sub": "mallory"}));
            let mut raw = RawConnection::connect(&broker).await;
            assert!(matches!(
                raw.send_hello(&mallory).await,
                Some(Frame::Welcome(_))
            ));
            let inbox = channel("user.mallory.inbox");
            let mut bytes = BytesMut::new();
            for request_id in 1..=5_000u64 {
                volna_proto::encode(
                    &Frame::Publish(Publish {
                        request_id,
                        channel: inbox.clone(),
                        producer: None,
                        after: None,
                        payload: vec![7u8; 1024].into(),
                    }),
                    &mut bytes,
                );
            }
            raw.send_bytes(&bytes).await;
            let mut limited = 0;
            for _ in 0..5_000 {
                match raw.next_frame().await {
                    Some(Frame::Published { .. }) => {}
                    Some(Frame::Error(ErrorFrame {
                        code: ErrorCode::RateLimited,
                        ..
                    })) => limited += 1,
                    other => panic!("flood: unexpected {other:?}"),
                }
            }
            assert!(limited > 3_000, "only {limited} of 5000 were limited");
            raw.send_frame(&Frame::Ping { request_id: 9_999 }).await;
            assert_eq!(
                raw.next_frame().await,
                Some(Frame::Pong { request_id: 9_999 })
            );
        })
    };

    // Streams beyond the protocol's one control stream are never granted.
    let streams = {
        let broker = broker.clone();
        tokio::spawn(async move {
            let hog = common::user_token(json!({"sub": "hog"}));
            let mut raw = RawConnection::connect(&broker).await;
            assert!(matches!(
                raw.send_hello(&hog).await,
                Some(Frame::Welcome(_))
            ));
            let granted = {
                let opens = (0..2_000).map(|_| Box::pin(raw.conn.open_bi()));
                let any = futures_util::future::select_all(opens);
                tokio::time::timeout(Duration::from_millis(500), any)
                    .await
                    .is_ok()
            };
            assert!(!granted, "the broker granted a second stream");
            let uni = tokio::time::timeout(Duration::from_millis(200), raw.conn.open_uni()).await;
            assert!(uni.is_err(), "the broker granted a client stream");
            raw.send_frame(&Frame::Ping { request_id: 1 }).await;
            assert_eq!(raw.next_frame().await, Some(Frame::Pong { request_id: 1 }));
        })
    };

    // Slowloris: Hello one byte at a time, slower than the hello timeout.
    let slowloris = {
        let broker = broker.clone();
        tokio::spawn(async move {
            let mut raw = RawConnection::connect(&broker).await;
            let mut hello = BytesMut::new();
            volna_proto::encode(
                &Frame::Hello(volna_proto::Hello {
                    protocol: volna_proto::PROTOCOL_VERSION,
                    token: "x".repeat(200),
                    client: "slow".into(),
                    device: None,
                }),
                &mut hello,
            );
            for byte in hello.iter().take(20) {
                raw.send_bytes(&[*byte]).await;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            assert_eq!(
                raw.close_code().await,
                Some(CloseCode::HELLO_TIMEOUT.0.into())
            );
        })
    };

    // Many connections with garbage and with bad tokens.
    let garbage = {
        let broker = broker.clone();
        tokio::spawn(async move {
            for i in 0..20u8 {
                let mut raw = RawConnection::connect(&broker).await;
                if i % 2 == 0 {
                    raw.send_bytes(&[0xff, 0xff, 0xff, 0xff, i]).await;
                    assert_eq!(
                        raw.close_code().await,
                        Some(CloseCode::PROTOCOL_ERROR.0.into())
                    );
                } else {
                    raw.send_hello("forged.token.here").await;
                    assert_eq!(
                        raw.close_code().await,
                        Some(CloseCode::UNAUTHORIZED.0.into())
                    );
                }
            }
        })
    };

    // Meanwhile the well-behaved client publishes and receives everything.
    for i in 0..300 {
        writer.publish(&ch, format!("m{i}")).await.unwrap();
    }
    let expected: Vec<_> = (0..300).map(|i| format!("m{i}")).collect();
    assert_eq!(common::next_texts(&mut sub, 300).await, expected);
    for task in [flood, streams, slowloris, garbage] {
        within("a hostile client", task).await.unwrap();
    }
}
