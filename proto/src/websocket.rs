//! The protocol over one WebSocket, for browsers and networks that block
//! UDP: QUIC's streams become tagged binary messages.
//!
//! ```text
//! ┌──────────────────┬───────────────────────────────────────────────┐
//! │ stream: u32 BE   │ bytes of that stream (whole frames)           │
//! └──────────────────┴───────────────────────────────────────────────┘
//! ```
//!
//! - Stream 0 is the control stream, both ways: `Hello`, requests and
//!   their replies, exactly the frames QUIC's control stream carries.
//! - Streams 1, 2, … are delivery streams, opened by the broker in that
//!   order; each starts with `StreamHeader { subscription }` like a QUIC
//!   unidirectional stream. A message with an empty body from the broker
//!   ends the stream (QUIC's FIN); an empty message for a delivery stream
//!   from the client stops it (QUIC's STOP_SENDING).
//! - A connection the broker closes gets a WebSocket close code of
//!   [`CLOSE_CODE_BASE`] + the [`CloseCode`]; the reason is its text.
//!
//! Peers put whole frames in a message, but a decoder must not rely on
//! it: a stream's bytes are the concatenation of its messages' bodies.

use bytes::{BufMut, Bytes, BytesMut};
use thiserror::Error;

use crate::CloseCode;

/// The HTTP path the WebSocket endpoint answers on.
pub const PATH: &str = "/ws";
/// The WebSocket subprotocol (`Sec-WebSocket-Protocol`) of this mapping;
/// the broker echoes it when the client offers it.
pub const SUBPROTOCOL: &str = "volna.1";
/// The control stream's tag.
pub const CONTROL_STREAM: u32 = 0;
/// Bytes before a message's body: the stream tag.
pub const TAG_LEN: usize = 4;
/// WebSocket close codes 4000–4999 are the application's: ours are this
/// plus a [`CloseCode`].
pub const CLOSE_CODE_BASE: u16 = 4000;

/// A message whose tag does not parse.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum MessageError {
    /// Fewer bytes than the tag.
    #[error("WebSocket message of {0} bytes has no stream tag")]
    NoTag(usize),
}

/// Encodes a message for `stream` carrying `body` (empty: the stream's
/// end, or a stop from the client).
pub fn encode_message(stream: u32, body: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(TAG_LEN + body.len());
    out.put_u32(stream);
    out.put_slice(body);
    out.freeze()
}

/// Encodes a message for `stream` carrying `frames` back to back, without
/// an intermediate copy of each.
pub fn encode_frames(stream: u32, frames: &[Bytes]) -> Bytes {
    let len = frames.iter().map(Bytes::len).sum::<usize>();
    let mut out = BytesMut::with_capacity(TAG_LEN + len);
    out.put_u32(stream);
    for frame in frames {
        out.put_slice(frame);
    }
    out.freeze()
}

/// Splits a received message into its stream and body (a slice of
/// `message`, not a copy).
pub fn decode_message(message: &Bytes) -> Result<(u32, Bytes), MessageError> {
    if message.len() < TAG_LEN {
        return Err(MessageError::NoTag(message.len()));
    }
    let stream = u32::from_be_bytes([message[0], message[1], message[2], message[3]]);
    Ok((stream, message.slice(TAG_LEN..)))
}

/// The WebSocket close code for `code`.
pub fn close_code(code: CloseCode) -> u16 {
    u16::try_from(code.0)
        .ok()
        .and_then(|c| c.checked_add(CLOSE_CODE_BASE))
        .filter(|c| *c < 5000)
        .unwrap_or(CLOSE_CODE_BASE + CloseCode::INTERNAL.0 as u16)
}

/// The [`CloseCode`] a WebSocket close code stands for, if it is one of
/// ours.
pub fn from_close_code(code: u16) -> Option<CloseCode> {
    (CLOSE_CODE_BASE..5000)
        .contains(&code)
        .then(|| CloseCode(u32::from(code - CLOSE_CODE_BASE)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_is_its_stream_then_its_body() {
        let m = encode_message(7, b"abc");
        assert_eq!(&m[..], &[0, 0, 0, 7, b'a', b'b', b'c']);
        assert_eq!(decode_message(&m), Ok((7, Bytes::from_static(b"abc"))));
        let framed = encode_frames(2, &[Bytes::from_static(b"ab"), Bytes::from_static(b"c")]);
        assert_eq!(decode_message(&framed), Ok((2, Bytes::from_static(b"abc"))));
        assert_eq!(
            decode_message(&Bytes::from_static(&[0, 1])),
            Err(MessageError::NoTag(2))
        );
        assert_eq!(
            decode_message(&encode_message(0, b"")),
            Ok((0, Bytes::new()))
        );
    }

    #[test]
    fn close_codes_map_into_the_application_range_and_back() {
        for code in [CloseCode::NORMAL, CloseCode::GOING_AWAY, CloseCode::KICKED] {
            let ws = close_code(code);
            assert!((4000..5000).contains(&ws));
            assert_eq!(from_close_code(ws), Some(code));
        }
        assert_eq!(close_code(CloseCode(70_000)), 4005);
        assert_eq!(from_close_code(1000), None);
    }
}
