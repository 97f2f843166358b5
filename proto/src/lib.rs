//! Volna's wire protocol, shared byte for byte by the broker and the client.
//!
//! This crate owns the *shape* of every message that crosses a QUIC stream:
//! the [`Frame`] enum, the length-prefixed [`codec`], the typed [`ErrorCode`]s
//! carried in `Error` frames and the [`CloseCode`]s carried when a connection
//! is closed, and which partition of a cluster a channel name belongs to
//! ([`partition_index`]). It does no I/O, keeps no clock and depends only on
//! `bytes`, `thiserror` and `xxhash-rust`, so both ends (and fuzzers) can
//! drive it from plain buffers.
//!
//! ```text
//!  client                                             broker
//!    │ ── control stream (bidi, opened by client) ──────▶ │
//!    │    Hello → Welcome, then Publish/Subscribe/…       │
//!    │    each with a request id, answered by a reply     │
//!    │    frame or Error{request_id, code}                │
//!    │ ◀── one delivery stream per subscription (uni) ─── │
//!    │    StreamHeader, then Deliver batches and the      │
//!    │    Truncated / EpochChanged events, in offset order│
//! ```
//!
//! What it does not do: decide anything. Which offsets exist, who may publish
//! and how a slow subscriber is served are the broker's business; this crate
//! only guarantees that a frame decodes to what was encoded, and that a
//! decoder never allocates for, or trusts, a length it has not checked
//! against the negotiated [`Limits`].

mod codec_impl;
mod error;
mod frame;
pub mod fuzzing;
mod names;
mod partition;
pub mod websocket;

pub use codec_impl::{DecodeError, Limits, decode, encode, encode_deliver, encoded_len};
pub use error::{CloseCode, ErrorCode};
pub use frame::{
    Deliver, DeliveredMessage, ErrorFrame, Fallback, Frame, FrameType, Hello, MAX_UNREAD_CHANNELS,
    Position, ProducerSeq, Publish, Subscribe, UnreadCount, Welcome,
};
pub use names::{ChannelName, Epoch, InvalidChannelName, Offset, SubscriptionId};
pub use partition::partition_index;

/// The codec entry points, grouped for readers who look for them by module.
pub mod codec {
    pub use crate::codec_impl::{
        DecodeError, FRAME_HEADER_LEN, Limits, decode, encode, encode_deliver, encoded_len,
    };
}

/// ALPN token negotiated in the TLS handshake; a peer without it is refused.
pub const ALPN: &[u8] = b"volna/1";

/// The protocol version a `Hello` carries. A broker refuses versions it does
/// not speak with [`ErrorCode::UnsupportedVersion`].
///
/// - 1: the first.
/// - 2: a `Publish` may name the publish it must follow (`after`); error
///   codes `ChannelDeleted` and `OutOfOrder`. Brokers upgrade first: a
///   broker speaks every version from [`MIN_PROTOCOL_VERSION`] on.
/// - 3: `Hello` names the device; `Ack`, `MarkRead`, `Unread` and their
///   replies, the `ReadMarker` event, `Position::Cursor`; error codes
///   `DeviceRequired`, `TooManyDevices`, `Unsupported`.
/// - 4: `InitProducer` / `ProducerReady` (a producer id that outlives the
///   process: the broker says where its sequences stand); close code
///   `REPLACED` (a newer connection of the same device took over).
/// - 5: `Ack` is no longer answered one by one: a `Stored` naming the
///   latest `Ack` covers every earlier one, sent at most once per report
///   interval or at once for the new `FlushAcks` (a device acknowledging
///   each message costs one packet, not a request and a reply).
///
/// Error code `Unavailable` (sent by cluster nodes only) came without a new
/// version: a client that does not know it sees `Other(22)`, not retryable.
pub const PROTOCOL_VERSION: u16 = 5;

/// The oldest protocol version a broker still speaks.
pub const MIN_PROTOCOL_VERSION: u16 = 1;
