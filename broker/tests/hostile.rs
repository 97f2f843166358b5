//! Malformed, oversized and out-of-order input gets typed errors, and a
//! well-behaved client on the same broker is not disturbed (G6).

#![allow(clippy::unwrap_used)]

mod common;

use bytes::{BufMut, BytesMut};
use common::{RawConnection, TestBroker, channel, within};
use futures_util::StreamExt;
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
    }))
    .await;
    assert_eq!(
        error_code(raw.next_frame().await),
        (0, ErrorCode::UnsupportedVersion)
    );

    // Nothing of the above was stored, and the good client was untouched.
    assert_eq!(
        good.publish(&ch, "after").await.unwrap().offset,
        Offset::new(2)
    );
    let got: Vec<_> = within("good deliveries", async {
        let mut got = Vec::new();
        while got.len() < 2 {
            got.push(sub.next().await.unwrap().unwrap().payload);
        }
        got
    })
    .await;
    assert_eq!(got, vec!["before", "after"]);
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
