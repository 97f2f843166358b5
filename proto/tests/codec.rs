//! Property tests for the codec: every frame round-trips, every strict prefix
//! of a frame asks for more bytes, and arbitrary bytes never panic the
//! decoder.

use bytes::{BufMut, Bytes, BytesMut};
use proptest::prelude::*;
use volna_proto::{
    ChannelName, DecodeError, Deliver, DeliveredMessage, Epoch, ErrorCode, ErrorFrame, Fallback,
    Frame, Hello, Limits, Offset, Position, ProducerSeq, Publish, Subscribe, SubscriptionId,
    UnreadCount, Welcome, decode, encode, encode_deliver, encoded_len,
};

const LIMITS: Limits = Limits {
    max_frame: 16 * 1024 * 1024,
};

fn channel() -> impl Strategy<Value = ChannelName> {
    proptest::collection::vec("[a-z0-9_-]{1,12}", 1..5).prop_map(|segments| {
        ChannelName::new(segments.join(".")).expect("strategy yields valid names")
    })
}

fn payload() -> impl Strategy<Value = Bytes> {
    proptest::collection::vec(any::<u8>(), 0..512).prop_map(Bytes::from)
}

fn text() -> impl Strategy<Value = String> {
    ".{0,40}"
}

fn position() -> impl Strategy<Value = Position> {
    prop_oneof![
        Just(Position::Latest),
        (any::<u64>(), proptest::option::of(any::<u64>())).prop_map(|(o, e)| Position::From {
            offset: Offset::new(o),
            epoch: e.map(Epoch)
        }),
        any::<u64>().prop_map(Position::Last),
        prop_oneof![
            Just(Fallback::Latest),
            any::<u64>().prop_map(|o| Fallback::From(Offset::new(o))),
            any::<u64>().prop_map(Fallback::Last),
        ]
        .prop_map(|otherwise| Position::Cursor { otherwise }),
    ]
}

/// A device id as a `Hello` of `protocol` carries it: from version 3 on,
/// `None` or a non-empty id (empty means none on the wire); before, none.
fn device(protocol: u16) -> BoxedStrategy<Option<String>> {
    if protocol >= 3 {
        proptest::option::of(".{1,40}").boxed()
    } else {
        Just(None).boxed()
    }
}

fn frame() -> impl Strategy<Value = Frame> {
    prop_oneof![
        (any::<u16>(), text(), text()).prop_flat_map(|(protocol, token, client)| {
            device(protocol).prop_map(move |device| {
                Frame::Hello(Hello {
                    protocol,
                    token: token.clone(),
                    client: client.clone(),
                    device,
                })
            })
        }),
        (any::<u64>(), channel(), any::<u64>()).prop_map(|(request_id, channel, o)| Frame::Ack {
            request_id,
            channel,
            offset: Offset::new(o),
        }),
        (any::<u64>(), channel(), any::<u64>()).prop_map(|(request_id, channel, o)| {
            Frame::MarkRead {
                request_id,
                channel,
                offset: Offset::new(o),
            }
        }),
        (any::<u64>(), proptest::collection::vec(channel(), 0..6)).prop_map(
            |(request_id, channels)| Frame::Unread {
                request_id,
                channels
            }
        ),
        any::<u64>().prop_map(|request_id| Frame::Stored { request_id }),
        (any::<u64>(), any::<u64>()).prop_map(|(request_id, producer_id)| {
            Frame::InitProducer {
                request_id,
                producer_id,
            }
        }),
        (any::<u64>(), any::<u64>()).prop_map(|(request_id, last_sequence)| {
            Frame::ProducerReady {
                request_id,
                last_sequence,
            }
        }),
        (
            any::<u64>(),
            proptest::collection::vec((channel(), any::<u64>(), any::<u64>(), any::<u64>()), 0..6)
        )
            .prop_map(|(request_id, counts)| Frame::UnreadCounts {
                request_id,
                counts: counts
                    .into_iter()
                    .map(|(channel, head, read, unread)| UnreadCount {
                        channel,
                        head,
                        read,
                        unread,
                    })
                    .collect(),
            }),
        (channel(), any::<u64>()).prop_map(|(channel, o)| Frame::ReadMarker {
            channel,
            offset: Offset::new(o),
        }),
        (
            any::<u64>(),
            channel(),
            proptest::option::of((
                any::<u64>(),
                any::<u64>(),
                proptest::option::of(any::<u64>())
            )),
            payload()
        )
            .prop_map(
                |(request_id, channel, producer, payload)| Frame::Publish(Publish {
                    request_id,
                    channel,
                    producer: producer.map(|(producer_id, sequence, _)| ProducerSeq {
                        producer_id,
                        sequence
                    }),
                    after: producer.and_then(|(_, _, after)| after),
                    payload,
                })
            ),
        (any::<u64>(), channel(), position()).prop_map(|(request_id, channel, position)| {
            Frame::Subscribe(Subscribe {
                request_id,
                channel,
                position,
            })
        }),
        (any::<u64>(), any::<u64>()).prop_map(|(request_id, s)| Frame::Unsubscribe {
            request_id,
            subscription: SubscriptionId(s)
        }),
        any::<u64>().prop_map(|request_id| Frame::Ping { request_id }),
        any::<u64>().prop_map(|request_id| Frame::FlushAcks { request_id }),
        (any::<u64>(), ".{0,64}")
            .prop_map(|(request_id, token)| Frame::Refresh { request_id, token }),
        (any::<u64>(), any::<u64>()).prop_map(|(request_id, expires_at)| Frame::Refreshed {
            request_id,
            expires_at
        }),
        any::<u64>().prop_map(|expires_at| Frame::TokenExpiring { expires_at }),
        (
            any::<u64>(),
            any::<u16>(),
            any::<u32>(),
            any::<u32>(),
            any::<u32>()
        )
            .prop_map(
                |(session_id, protocol, max_frame, max_payload, max_subscriptions)| {
                    Frame::Welcome(Welcome {
                        session_id,
                        protocol,
                        max_frame,
                        max_payload,
                        max_subscriptions,
                    })
                }
            ),
        (any::<u64>(), any::<u64>(), any::<u64>(), any::<bool>()).prop_map(
            |(request_id, offset, epoch, duplicate)| Frame::Published {
                request_id,
                offset: Offset::new(offset),
                epoch: Epoch(epoch),
                duplicate,
            }
        ),
        (any::<u64>(), any::<u64>(), any::<u64>(), any::<u64>()).prop_map(
            |(request_id, s, epoch, start)| Frame::Subscribed {
                request_id,
                subscription: SubscriptionId(s),
                epoch: Epoch(epoch),
                start: Offset::new(start),
            }
        ),
        any::<u64>().prop_map(|request_id| Frame::Unsubscribed { request_id }),
        any::<u64>().prop_map(|request_id| Frame::Pong { request_id }),
        (any::<u64>(), any::<u16>(), text()).prop_map(|(request_id, code, message)| {
            Frame::Error(ErrorFrame {
                request_id,
                code: ErrorCode::from_u16(code),
                message,
            })
        }),
        (any::<u64>(), any::<u16>(), text()).prop_map(|(s, code, message)| {
            Frame::SubscriptionEnded {
                subscription: SubscriptionId(s),
                code: ErrorCode::from_u16(code),
                message,
            }
        }),
        any::<u64>().prop_map(|s| Frame::StreamHeader {
            subscription: SubscriptionId(s)
        }),
        (
            channel(),
            any::<u64>(),
            any::<u64>(),
            proptest::collection::vec((any::<u64>(), payload()), 1..8)
        )
            .prop_map(|(channel, epoch, first, messages)| Frame::Deliver(Deliver {
                channel,
                epoch: Epoch(epoch),
                first_offset: Offset::new(first),
                messages: messages
                    .into_iter()
                    .map(|(timestamp_ms, payload)| DeliveredMessage {
                        timestamp_ms,
                        payload
                    })
                    .collect(),
            })),
        (channel(), any::<u64>(), any::<u64>()).prop_map(|(channel, r, f)| Frame::Truncated {
            channel,
            requested: Offset::new(r),
            first_available: Offset::new(f),
        }),
        (channel(), any::<u64>(), any::<u64>(), any::<u64>()).prop_map(|(channel, p, c, s)| {
            Frame::EpochChanged {
                channel,
                previous: Epoch(p),
                current: Epoch(c),
                start: Offset::new(s),
            }
        }),
    ]
}

proptest! {
    #[test]
    fn every_frame_round_trips(frame in frame()) {
        let mut buf = BytesMut::new();
        encode(&frame, &mut buf);
        prop_assert_eq!(buf.len(), encoded_len(&frame));
        let decoded = decode(&mut buf, &LIMITS);
        prop_assert_eq!(decoded, Ok(Some(frame)));
        prop_assert!(buf.is_empty());
    }

    #[test]
    fn back_to_back_frames_decode_in_order(frames in proptest::collection::vec(frame(), 1..6)) {
        let mut buf = BytesMut::new();
        for f in &frames {
            encode(f, &mut buf);
        }
        for f in frames {
            prop_assert_eq!(decode(&mut buf, &LIMITS), Ok(Some(f)));
        }
        prop_assert_eq!(decode(&mut buf, &LIMITS), Ok(None));
    }

    #[test]
    fn every_strict_prefix_asks_for_more(frame in frame()) {
        let mut whole = BytesMut::new();
        encode(&frame, &mut whole);
        for cut in 0..whole.len() {
            let mut prefix = BytesMut::from(&whole[..cut]);
            prop_assert_eq!(decode(&mut prefix, &LIMITS), Ok(None), "cut at {}", cut);
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        let mut buf = BytesMut::from(&bytes[..]);
        // Decode until the input is used up or rejected; any result is fine,
        // a panic is not.
        while let Ok(Some(_)) = decode(&mut buf, &LIMITS) {}
    }

    #[test]
    fn a_cut_body_is_a_typed_error(frame in frame(), cut in 1usize..64) {
        // Shorten the body but fix the length prefix, so the frame is whole
        // by its header yet its fields run out.
        let mut whole = BytesMut::new();
        encode(&frame, &mut whole);
        let body_len = whole.len() - 4;
        prop_assume!(cut < body_len);
        let new_len = body_len - cut;
        let mut buf = BytesMut::new();
        buf.put_u32(new_len as u32);
        buf.extend_from_slice(&whole[4..4 + new_len]);
        prop_assert!(decode(&mut buf, &LIMITS).is_err());
    }

    #[test]
    fn encode_deliver_matches_encode(
        channel in channel(),
        epoch in any::<u64>(),
        first in any::<u64>(),
        messages in proptest::collection::vec((any::<u64>(), payload()), 1..8),
    ) {
        let deliver = Frame::Deliver(Deliver {
            channel: channel.clone(),
            epoch: Epoch(epoch),
            first_offset: Offset::new(first),
            messages: messages
                .iter()
                .map(|(timestamp_ms, payload)| DeliveredMessage {
                    timestamp_ms: *timestamp_ms,
                    payload: payload.clone(),
                })
                .collect(),
        });
        let mut a = BytesMut::new();
        encode(&deliver, &mut a);
        let mut b = BytesMut::new();
        encode_deliver(
            &channel,
            Epoch(epoch),
            Offset::new(first),
            messages.iter().map(|(t, p)| (*t, p.as_ref())),
            &mut b,
        );
        prop_assert_eq!(a, b);
    }
}

#[test]
fn oversized_length_is_refused_before_reading_the_body() {
    // A 4 GiB length prefix with nothing behind it.
    let mut buf = BytesMut::from(&[0xff, 0xff, 0xff, 0xff][..]);
    let err = decode(&mut buf, &Limits { max_frame: 1024 });
    assert_eq!(
        err,
        Err(DecodeError::FrameTooLarge {
            len: 0xffff_ffff + 4,
            max: 1024
        })
    );
    assert_eq!(
        err.map(|_| ()).unwrap_err().error_code(),
        ErrorCode::FrameTooLarge
    );
    // Nothing was reserved for the announced body.
    assert!(buf.capacity() < 1024);
}

#[test]
fn unknown_type_and_empty_frames_are_typed_errors() {
    let mut buf = BytesMut::from(&[0, 0, 0, 1, 0x7f][..]);
    assert_eq!(
        decode(&mut buf, &LIMITS),
        Err(DecodeError::UnknownFrameType(0x7f))
    );
    let mut buf = BytesMut::from(&[0, 0, 0, 0][..]);
    assert_eq!(decode(&mut buf, &LIMITS), Err(DecodeError::EmptyFrame));
}

#[test]
fn trailing_bytes_and_bad_tags_are_rejected() {
    let mut buf = BytesMut::new();
    encode(&Frame::Ping { request_id: 7 }, &mut buf);
    // Grow the frame by one byte the Ping does not have.
    buf[3] += 1;
    buf.put_u8(0);
    assert!(matches!(
        decode(&mut buf, &LIMITS),
        Err(DecodeError::TrailingBytes { extra: 1, .. })
    ));

    // A Deliver announcing a billion messages in a tiny frame.
    let mut buf = BytesMut::new();
    buf.put_u32(1 + 2 + 8 + 8 + 4);
    buf.put_u8(0x82);
    buf.put_u8(1);
    buf.put_u8(b'a');
    buf.put_u64(1);
    buf.put_u64(1);
    buf.put_u32(1_000_000_000);
    assert!(matches!(
        decode(&mut buf, &LIMITS),
        Err(DecodeError::Truncated { .. })
    ));
}
