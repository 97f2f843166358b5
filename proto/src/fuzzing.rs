//! The codec property the `decode` fuzz target checks, shared with the
//! test that replays its corpus: decoding arbitrary bytes never panics,
//! and every frame that decodes re-encodes to bytes that decode to it.

use bytes::BytesMut;

use crate::{Limits, decode, encode};

/// Decodes frames from `data` until it is used up or invalid; panics if a
/// decoded frame does not survive a round trip.
pub fn decode_round_trips(data: &[u8]) {
    let limits = Limits { max_frame: 1 << 20 };
    let mut buf = BytesMut::from(data);
    while let Ok(Some(frame)) = decode(&mut buf, &limits) {
        let mut again = BytesMut::new();
        encode(&frame, &mut again);
        let unlimited = Limits {
            max_frame: u32::MAX,
        };
        match decode(&mut again, &unlimited) {
            Ok(Some(round)) => assert_eq!(round, frame, "re-encoded frame differs"),
            other => panic!("an encoded {frame:?} does not decode: {other:?}"),
        }
        assert!(again.is_empty(), "encoding left trailing bytes");
    }
}
