//! The frames of the protocol (version history: [`crate::PROTOCOL_VERSION`]).
//!
//! Control-stream requests carry a client-chosen `request_id` that the reply
//! echoes, so a client may pipeline many requests; replies can arrive in any
//! order. Delivery streams carry no request ids: their frames are ordered by
//! offset and a `Deliver` frame is byte-identical for every subscriber of a
//! channel, which is what lets the broker encode it once.

use bytes::Bytes;

use crate::{ChannelName, Epoch, ErrorCode, Offset, SubscriptionId};

/// Every frame of the protocol.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    // ── client → broker, control stream ──────────────────────────────────
    /// First frame of a connection: who is calling.
    Hello(Hello),
    /// Append a message to a channel.
    Publish(Publish),
    /// Start receiving a channel.
    Subscribe(Subscribe),
    /// Stop a subscription.
    Unsubscribe {
        /// Echoed in the reply.
        request_id: u64,
        /// The subscription to stop.
        subscription: SubscriptionId,
    },
    /// Liveness probe answered by `Pong`.
    Ping {
        /// Echoed in the reply.
        request_id: u64,
    },
    /// Replace the session's token (before it expires) without
    /// reconnecting; answered by `Refreshed` or an `Unauthorized` error.
    Refresh {
        /// Echoed in the reply.
        request_id: u64,
        /// The new token; it must name the same user (`sub`).
        token: String,
    },
    /// The device has taken every message of `channel` up to `offset`:
    /// store it as the device's cursor (it never moves backwards).
    ///
    /// Before protocol 5, answered by `Stored` once the cursor is durable.
    /// From 5 on, not answered one by one: the broker reports stored
    /// acknowledgements with a `Stored` naming the latest `Ack` it covers
    /// (it covers every earlier `Ack` of the connection too), at most once
    /// per report interval, or at once for a `FlushAcks`. A refused `Ack`
    /// is answered by its `Error` at once.
    Ack {
        /// Echoed in the reply.
        request_id: u64,
        /// The channel.
        channel: ChannelName,
        /// The last offset the device has taken.
        offset: Offset,
    },
    /// The user has read `channel` up to `offset` (on any device): set the
    /// user's read marker (max wins) and tell the user's other devices.
    /// Answered by `Stored` once the marker is durable.
    MarkRead {
        /// Echoed in the reply.
        request_id: u64,
        /// The channel.
        channel: ChannelName,
        /// The last offset read.
        offset: Offset,
    },
    /// How many messages of each channel the calling user has not read;
    /// no channels: every channel the user has a read marker on. Answered
    /// by `UnreadCounts`.
    Unread {
        /// Echoed in the reply.
        request_id: u64,
        /// The channels asked about (at most [`MAX_UNREAD_CHANNELS`]).
        channels: Vec<ChannelName>,
    },
    /// Answered by `Stored` (echoing this request id) once every `Ack` the
    /// connection sent before it is stored (protocol 5).
    FlushAcks {
        /// Echoed in the reply.
        request_id: u64,
    },
    /// The client will publish as `producer_id` (bound to its device, so
    /// the same across the app's restarts): answered by `ProducerReady`
    /// with the last sequence the broker stored for it, so that the client
    /// continues after it and a re-sent outbox is stored once.
    InitProducer {
        /// Echoed in the reply.
        request_id: u64,
        /// The producer id the client's publishes will carry.
        producer_id: u64,
    },

    // ── broker → client, control stream ──────────────────────────────────
    /// Answer to `Hello`: the session is open, within these limits.
    Welcome(Welcome),
    /// The message is durably stored at `offset`.
    Published {
        /// The request this answers.
        request_id: u64,
        /// The offset the message was stored at.
        offset: Offset,
        /// The channel log's epoch.
        epoch: Epoch,
        /// True when this was a retry of an already stored publish.
        duplicate: bool,
    },
    /// The subscription exists; its delivery stream is (being) opened.
    Subscribed {
        /// The request this answers.
        request_id: u64,
        /// The new subscription's id, also sent first on its delivery stream.
        subscription: SubscriptionId,
        /// The channel log's epoch (0 when the channel has no log yet).
        epoch: Epoch,
        /// The first offset the subscription will deliver.
        start: Offset,
    },
    /// Answer to `InitProducer`: the highest sequence stored under the
    /// producer id for the calling identity that the broker still
    /// remembers (0: none; the window expired or never existed).
    ProducerReady {
        /// The request this answers.
        request_id: u64,
        /// Continue after this sequence.
        last_sequence: u64,
    },
    /// The subscription is gone; its delivery stream is finished.
    Unsubscribed {
        /// The request this answers.
        request_id: u64,
    },
    /// Answer to `Ping`.
    Pong {
        /// The request this answers.
        request_id: u64,
    },
    /// A request (or, with `request_id` 0, the connection) failed.
    Error(ErrorFrame),
    /// The new token is in force; its rights apply from now on.
    Refreshed {
        /// The request this answers.
        request_id: u64,
        /// When the new token expires, Unix seconds (0: never).
        expires_at: u64,
    },
    /// The session's token expires soon: send `Refresh` before
    /// `expires_at` or the broker closes the session then.
    TokenExpiring {
        /// When the token expires, Unix seconds.
        expires_at: u64,
    },
    /// The broker ended a subscription on its own: the client's stream of
    /// it will see no more messages. With a retryable `code` (the log could
    /// not be read) the client subscribes again from where it stands; with
    /// any other (`Forbidden` after a refresh) the application is told.
    SubscriptionEnded {
        /// The subscription, as returned in `Subscribed`.
        subscription: SubscriptionId,
        /// Why.
        code: ErrorCode,
        /// Why, for people.
        message: String,
    },
    /// The `Ack` or `MarkRead` is durably stored; answering an `Ack` or a
    /// `FlushAcks` from protocol 5 on, so is every earlier `Ack` of the
    /// connection.
    Stored {
        /// The request this answers.
        request_id: u64,
    },
    /// Answer to `Unread`.
    UnreadCounts {
        /// The request this answers.
        request_id: u64,
        /// One entry per channel, in the order asked (or name order).
        counts: Vec<UnreadCount>,
    },
    /// Another device of the same user moved the user's read marker.
    ReadMarker {
        /// The channel.
        channel: ChannelName,
        /// The user's read marker now: the last offset read.
        offset: Offset,
    },

    // ── broker → client, delivery stream ─────────────────────────────────
    /// First frame of a delivery stream: which subscription it serves.
    StreamHeader {
        /// The subscription, as returned in `Subscribed`.
        subscription: SubscriptionId,
    },
    /// A batch of consecutive messages of one channel.
    Deliver(Deliver),
    /// The offsets from `requested` up to `first_available` are gone
    /// (retention); delivery goes on from `first_available`.
    Truncated {
        /// The channel.
        channel: ChannelName,
        /// The offset the subscription needed next.
        requested: Offset,
        /// The oldest offset the log still holds.
        first_available: Offset,
    },
    /// The subscriber resumed with an epoch the channel no longer has: the
    /// log was reset and offsets start over. Delivery goes on from `start`.
    EpochChanged {
        /// The channel.
        channel: ChannelName,
        /// The epoch the subscriber asked for.
        previous: Epoch,
        /// The channel's epoch now.
        current: Epoch,
        /// The offset delivery restarts from.
        start: Offset,
    },
}

/// The most channels one `Unread` may ask about (and one `UnreadCounts`
/// may answer for).
pub const MAX_UNREAD_CHANNELS: usize = 1024;

/// `Hello`: the first frame a client sends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    /// The protocol version the client speaks.
    pub protocol: u16,
    /// The authentication token.
    pub token: String,
    /// Free-form client identification for logs, e.g. `volna-client/0.1`.
    pub client: String,
    /// The device this connection speaks for (protocol 3 on; `None` on the
    /// wire as an empty string): the key of its durable cursors. A token
    /// with a `device` claim must name the same device.
    pub device: Option<String>,
}

/// One channel's line of `UnreadCounts`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnreadCount {
    /// The channel.
    pub channel: ChannelName,
    /// The channel's last offset (0: no message yet).
    pub head: u64,
    /// The user's read marker: the last offset read (0: none).
    pub read: u64,
    /// Messages after the marker still stored, capped by the broker's
    /// `cursors.unread_cap` (a count at the cap means "at least").
    pub unread: u64,
}

/// `Welcome`: the broker accepted the session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Welcome {
    /// The broker's id for this session, for logs on both sides.
    pub session_id: u64,
    /// The protocol version the session speaks.
    pub protocol: u16,
    /// The largest frame either side may send, header included.
    pub max_frame: u32,
    /// The largest payload a `Publish` may carry.
    pub max_payload: u32,
    /// How many subscriptions this connection may hold.
    pub max_subscriptions: u32,
}

/// Identifies a publish for idempotent retries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ProducerSeq {
    /// A producer's identity, stable across its reconnects.
    pub producer_id: u64,
    /// Grows with each new publish of that producer.
    pub sequence: u64,
}

/// `Publish`: append `payload` to `channel`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publish {
    /// Echoed in the reply.
    pub request_id: u64,
    /// The channel to append to.
    pub channel: ChannelName,
    /// Set to make retries idempotent.
    pub producer: Option<ProducerSeq>,
    /// With `producer`: the sequence of the same producer's previous
    /// publish to this channel, when that one was not yet acknowledged as
    /// this one was sent. The broker stores this publish only after that
    /// one (else `OutOfOrder`, and the client sends it again), so that one
    /// producer's publishes to a channel are stored in the order they were
    /// issued, across reconnects and retries.
    pub after: Option<u64>,
    /// The message body.
    pub payload: Bytes,
}

/// Where a new subscription starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Position {
    /// Only messages published from now on.
    Latest,
    /// From this offset on; with an epoch, resuming a known log.
    From {
        /// The first offset wanted.
        offset: Offset,
        /// The epoch the offset belongs to, when resuming.
        epoch: Option<Epoch>,
    },
    /// The last `n` stored messages, then live.
    Last(u64),
    /// After the offset this device last acknowledged on the channel (its
    /// durable cursor); `otherwise` when the device has none.
    Cursor {
        /// Where to start without a cursor.
        otherwise: Fallback,
    },
}

/// Where a [`Position::Cursor`] subscription starts when the device has no
/// cursor on the channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fallback {
    /// Only messages published from now on.
    Latest,
    /// From this offset on.
    From(Offset),
    /// The last `n` stored messages.
    Last(u64),
}

impl Fallback {
    /// The plain position this fallback stands for.
    pub const fn position(self) -> Position {
        match self {
            Fallback::Latest => Position::Latest,
            Fallback::From(offset) => Position::From {
                offset,
                epoch: None,
            },
            Fallback::Last(n) => Position::Last(n),
        }
    }
}

impl Position {
    /// From the channel's first offset: its whole stored history (a
    /// `Truncated` event says where retention made it start), then live.
    pub const FIRST: Position = Position::From {
        offset: Offset::FIRST,
        epoch: None,
    };
}

/// `Subscribe`: start delivering `channel` from `position`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscribe {
    /// Echoed in the reply.
    pub request_id: u64,
    /// The channel to receive.
    pub channel: ChannelName,
    /// Where to start.
    pub position: Position,
}

/// `Error`: a request failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorFrame {
    /// The failed request, or 0 for the connection as a whole.
    pub request_id: u64,
    /// What went wrong, for programs.
    pub code: ErrorCode,
    /// What went wrong, for people.
    pub message: String,
}

/// One message inside a `Deliver` batch; its offset is implied by its place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliveredMessage {
    /// When the broker stored it, in milliseconds since the Unix epoch.
    pub timestamp_ms: u64,
    /// The message body.
    pub payload: Bytes,
}

/// `Deliver`: messages `first_offset, first_offset + 1, …` of one channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Deliver {
    /// The channel.
    pub channel: ChannelName,
    /// The channel log's epoch.
    pub epoch: Epoch,
    /// The offset of `messages[0]`.
    pub first_offset: Offset,
    /// At least one message, consecutive offsets.
    pub messages: Vec<DeliveredMessage>,
}

impl Deliver {
    /// The offset after the batch's last message.
    pub fn end_offset(&self) -> Offset {
        self.first_offset.add(self.messages.len() as u64)
    }
}

/// The type byte of each frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum FrameType {
    /// [`Frame::Hello`]
    Hello = 0x01,
    /// [`Frame::Publish`]
    Publish = 0x02,
    /// [`Frame::Subscribe`]
    Subscribe = 0x03,
    /// [`Frame::Unsubscribe`]
    Unsubscribe = 0x04,
    /// [`Frame::Ping`]
    Ping = 0x05,
    /// [`Frame::Refresh`]
    Refresh = 0x06,
    /// [`Frame::Ack`]
    Ack = 0x07,
    /// [`Frame::MarkRead`]
    MarkRead = 0x08,
    /// [`Frame::Unread`]
    Unread = 0x09,
    /// [`Frame::InitProducer`]
    InitProducer = 0x0a,
    /// [`Frame::FlushAcks`]
    FlushAcks = 0x0b,
    /// [`Frame::Welcome`]
    Welcome = 0x41,
    /// [`Frame::Published`]
    Published = 0x42,
    /// [`Frame::Subscribed`]
    Subscribed = 0x43,
    /// [`Frame::Unsubscribed`]
    Unsubscribed = 0x44,
    /// [`Frame::Pong`]
    Pong = 0x45,
    /// [`Frame::Error`]
    Error = 0x46,
    /// [`Frame::Refreshed`]
    Refreshed = 0x47,
    /// [`Frame::TokenExpiring`]
    TokenExpiring = 0x48,
    /// [`Frame::SubscriptionEnded`]
    SubscriptionEnded = 0x49,
    /// [`Frame::Stored`]
    Stored = 0x4a,
    /// [`Frame::UnreadCounts`]
    UnreadCounts = 0x4b,
    /// [`Frame::ReadMarker`]
    ReadMarker = 0x4c,
    /// [`Frame::ProducerReady`]
    ProducerReady = 0x4d,
    /// [`Frame::StreamHeader`]
    StreamHeader = 0x81,
    /// [`Frame::Deliver`]
    Deliver = 0x82,
    /// [`Frame::Truncated`]
    Truncated = 0x83,
    /// [`Frame::EpochChanged`]
    EpochChanged = 0x84,
}

impl FrameType {
    /// The type for a byte read from the wire, if it is one.
    pub const fn from_u8(byte: u8) -> Option<Self> {
        Some(match byte {
            0x01 => Self::Hello,
            0x02 => Self::Publish,
            0x03 => Self::Subscribe,
            0x04 => Self::Unsubscribe,
            0x05 => Self::Ping,
            0x06 => Self::Refresh,
            0x07 => Self::Ack,
            0x08 => Self::MarkRead,
            0x09 => Self::Unread,
            0x0a => Self::InitProducer,
            0x0b => Self::FlushAcks,
            0x41 => Self::Welcome,
            0x42 => Self::Published,
            0x43 => Self::Subscribed,
            0x44 => Self::Unsubscribed,
            0x45 => Self::Pong,
            0x46 => Self::Error,
            0x47 => Self::Refreshed,
            0x48 => Self::TokenExpiring,
            0x49 => Self::SubscriptionEnded,
            0x4a => Self::Stored,
            0x4b => Self::UnreadCounts,
            0x4c => Self::ReadMarker,
            0x4d => Self::ProducerReady,
            0x81 => Self::StreamHeader,
            0x82 => Self::Deliver,
            0x83 => Self::Truncated,
            0x84 => Self::EpochChanged,
            _ => return None,
        })
    }
}

impl Frame {
    /// This frame's type byte.
    pub fn frame_type(&self) -> FrameType {
        match self {
            Self::Hello(_) => FrameType::Hello,
            Self::Publish(_) => FrameType::Publish,
            Self::Subscribe(_) => FrameType::Subscribe,
            Self::Unsubscribe { .. } => FrameType::Unsubscribe,
            Self::Ping { .. } => FrameType::Ping,
            Self::Refresh { .. } => FrameType::Refresh,
            Self::Ack { .. } => FrameType::Ack,
            Self::MarkRead { .. } => FrameType::MarkRead,
            Self::Unread { .. } => FrameType::Unread,
            Self::InitProducer { .. } => FrameType::InitProducer,
            Self::FlushAcks { .. } => FrameType::FlushAcks,
            Self::Welcome(_) => FrameType::Welcome,
            Self::Published { .. } => FrameType::Published,
            Self::Subscribed { .. } => FrameType::Subscribed,
            Self::Unsubscribed { .. } => FrameType::Unsubscribed,
            Self::Pong { .. } => FrameType::Pong,
            Self::Error(_) => FrameType::Error,
            Self::Refreshed { .. } => FrameType::Refreshed,
            Self::TokenExpiring { .. } => FrameType::TokenExpiring,
            Self::SubscriptionEnded { .. } => FrameType::SubscriptionEnded,
            Self::Stored { .. } => FrameType::Stored,
            Self::UnreadCounts { .. } => FrameType::UnreadCounts,
            Self::ReadMarker { .. } => FrameType::ReadMarker,
            Self::ProducerReady { .. } => FrameType::ProducerReady,
            Self::StreamHeader { .. } => FrameType::StreamHeader,
            Self::Deliver(_) => FrameType::Deliver,
            Self::Truncated { .. } => FrameType::Truncated,
            Self::EpochChanged { .. } => FrameType::EpochChanged,
        }
    }

    /// The request id a control-stream frame carries, if any.
    pub fn request_id(&self) -> Option<u64> {
        match self {
            Self::Publish(Publish { request_id, .. })
            | Self::Subscribe(Subscribe { request_id, .. })
            | Self::Unsubscribe { request_id, .. }
            | Self::Ping { request_id }
            | Self::FlushAcks { request_id }
            | Self::Refresh { request_id, .. }
            | Self::Ack { request_id, .. }
            | Self::MarkRead { request_id, .. }
            | Self::Unread { request_id, .. }
            | Self::InitProducer { request_id, .. }
            | Self::ProducerReady { request_id, .. }
            | Self::Stored { request_id }
            | Self::UnreadCounts { request_id, .. }
            | Self::Refreshed { request_id, .. }
            | Self::Published { request_id, .. }
            | Self::Subscribed { request_id, .. }
            | Self::Unsubscribed { request_id }
            | Self::Pong { request_id }
            | Self::Error(ErrorFrame { request_id, .. }) => Some(*request_id),
            _ => None,
        }
    }
}
