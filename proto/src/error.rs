//! Typed error codes: per request (`Error` frames) and per connection (QUIC
//! application close codes).
//!
//! Codes are stable numbers on the wire. A code this build does not know
//! decodes to [`ErrorCode::Other`] instead of failing, so an older client keeps
//! working against a newer broker.

use std::fmt;

/// Why a request failed, carried in an `Error` frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// The request was malformed (bad field, bad channel name).
    BadRequest,
    /// The `Hello` asked for a protocol version the broker does not speak.
    UnsupportedVersion,
    /// The token is missing, expired or invalid.
    Unauthorized,
    /// The token does not grant this operation on this channel.
    Forbidden,
    /// The payload exceeds the negotiated `max_payload`.
    PayloadTooLarge,
    /// The frame exceeds the negotiated `max_frame`.
    FrameTooLarge,
    /// The frame type is unknown.
    UnknownFrame,
    /// The frame is valid but not allowed here (e.g. `Publish` before `Hello`).
    UnexpectedFrame,
    /// Unsubscribe named a subscription this connection does not have.
    NotSubscribed,
    /// This connection is already subscribed to that channel.
    AlreadySubscribed,
    /// The connection holds as many subscriptions as it may.
    TooManySubscriptions,
    /// The log could not store the message; nothing was stored. Retryable.
    StorageUnavailable,
    /// An idempotent publish's sequence is older than the producer's dedup
    /// window, so the broker cannot tell whether it was stored.
    SequenceTooOld,
    /// Too many requests; retry later.
    RateLimited,
    /// The broker is shutting down; retry on another connection.
    ShuttingDown,
    /// The broker failed unexpectedly; the request may be retried.
    Internal,
    /// The user holds as many connections as it may.
    TooManyConnections,
    /// Only server-side identities may publish to this channel's namespace.
    ServerOnly,
    /// The user has as many live producer windows (idempotent publishers)
    /// as it may, all of them new in the same write batch (otherwise the
    /// least recently used makes room); reuse a producer id.
    TooManyProducers,
    /// The channel was deleted (by an operator) with its log; its
    /// subscriptions end. Publishing to the name creates a new channel.
    ChannelDeleted,
    /// The publish names (`after`) an earlier publish of its producer to the
    /// channel that is not stored yet: nothing was stored; send the earlier
    /// one first, then this one again.
    OutOfOrder,
    /// The channel's partition could not commit the request in time (no
    /// leader reachable from this node: an election, a failover, a network
    /// partition). An idempotent publish may have been stored: send it
    /// again with the same sequence and it is stored once.
    Unavailable,
    /// The request is about a device (`Ack`, a `Cursor` position) and the
    /// session's `Hello` named none.
    DeviceRequired,
    /// The user has as many devices as it may; a device unused for
    /// `cursors.device_idle_days` is forgotten and frees its place.
    TooManyDevices,
    /// This broker does not offer the request in its configuration (e.g.
    /// device cursors on a cluster node).
    Unsupported,
    /// A newer connection of the same device took over this one (sent on
    /// the old connection before it is closed with `CloseCode::REPLACED`).
    Replaced,
    /// A code this build does not know.
    Other(u16),
}

impl ErrorCode {
    /// The code's number on the wire.
    pub const fn to_u16(self) -> u16 {
        match self {
            Self::BadRequest => 1,
            Self::UnsupportedVersion => 2,
            Self::Unauthorized => 3,
            Self::Forbidden => 4,
            Self::PayloadTooLarge => 5,
            Self::FrameTooLarge => 6,
            Self::UnknownFrame => 7,
            Self::UnexpectedFrame => 8,
            Self::NotSubscribed => 9,
            Self::AlreadySubscribed => 10,
            Self::TooManySubscriptions => 11,
            Self::StorageUnavailable => 12,
            Self::SequenceTooOld => 13,
            Self::RateLimited => 14,
            Self::ShuttingDown => 15,
            Self::Internal => 16,
            Self::TooManyConnections => 17,
            Self::ServerOnly => 18,
            Self::TooManyProducers => 19,
            Self::ChannelDeleted => 20,
            Self::OutOfOrder => 21,
            Self::Unavailable => 22,
            Self::DeviceRequired => 23,
            Self::TooManyDevices => 24,
            Self::Unsupported => 25,
            Self::Replaced => 26,
            Self::Other(code) => code,
        }
    }

    /// The code for a number read from the wire.
    pub const fn from_u16(code: u16) -> Self {
        match code {
            1 => Self::BadRequest,
            2 => Self::UnsupportedVersion,
            3 => Self::Unauthorized,
            4 => Self::Forbidden,
            5 => Self::PayloadTooLarge,
            6 => Self::FrameTooLarge,
            7 => Self::UnknownFrame,
            8 => Self::UnexpectedFrame,
            9 => Self::NotSubscribed,
            10 => Self::AlreadySubscribed,
            11 => Self::TooManySubscriptions,
            12 => Self::StorageUnavailable,
            13 => Self::SequenceTooOld,
            14 => Self::RateLimited,
            15 => Self::ShuttingDown,
            16 => Self::Internal,
            17 => Self::TooManyConnections,
            18 => Self::ServerOnly,
            19 => Self::TooManyProducers,
            20 => Self::ChannelDeleted,
            21 => Self::OutOfOrder,
            22 => Self::Unavailable,
            23 => Self::DeviceRequired,
            24 => Self::TooManyDevices,
            25 => Self::Unsupported,
            26 => Self::Replaced,
            other => Self::Other(other),
        }
    }

    /// Whether a publish refused with this code may have been stored all
    /// the same (its answer was lost, not its request refused): a retry
    /// must keep its producer sequence so that it is stored once.
    pub const fn may_have_stored(self) -> bool {
        matches!(self, Self::Unavailable)
    }

    /// Whether the same request may succeed if sent again later (after a
    /// pause, on this or another node). Every client decides by this one
    /// table: a retryable refusal is retried with backoff within the
    /// request's deadline; any other is final and reported (a connect
    /// refused so stops the client, a subscribe refused so ends the
    /// subscription). `clients/js/volna.js` carries a copy.
    pub const fn is_retryable(self) -> bool {
        matches!(
            self,
            Self::StorageUnavailable
                | Self::RateLimited
                | Self::ShuttingDown
                | Self::Internal
                | Self::OutOfOrder
                | Self::Unavailable
        )
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Other(code) => write!(f, "error code {code}"),
            known => write!(f, "{known:?}"),
        }
    }
}

/// QUIC application close codes: why the broker (or client) closed the whole
/// connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CloseCode(pub u32);

impl CloseCode {
    /// Closed on purpose, nothing wrong.
    pub const NORMAL: CloseCode = CloseCode(0);
    /// The broker is shutting down or restarting; reconnect (elsewhere) later.
    pub const GOING_AWAY: CloseCode = CloseCode(1);
    /// The peer broke the protocol (bad framing, frame too large…).
    pub const PROTOCOL_ERROR: CloseCode = CloseCode(2);
    /// Authentication failed.
    pub const UNAUTHORIZED: CloseCode = CloseCode(3);
    /// The peer did not send `Hello` in time.
    pub const HELLO_TIMEOUT: CloseCode = CloseCode(4);
    /// The broker failed unexpectedly.
    pub const INTERNAL: CloseCode = CloseCode(5);
    /// An operator disconnected this client.
    pub const KICKED: CloseCode = CloseCode(6);
    /// A limit on connections was reached (per user, per address).
    pub const LIMIT_EXCEEDED: CloseCode = CloseCode(7);
    /// The peer did not read its control stream for too long.
    pub const CONTROL_STALLED: CloseCode = CloseCode(8);
    /// A newer connection of the same device took over (the app restarted,
    /// or the device reconnected before this connection timed out). Final:
    /// a client closed so must not reconnect, or two instances of one
    /// device would take over from each other forever.
    pub const REPLACED: CloseCode = CloseCode(9);

    /// A short, stable description for logs and close reasons.
    pub const fn reason(self) -> &'static str {
        match self.0 {
            0 => "normal",
            1 => "going away",
            2 => "protocol error",
            3 => "unauthorized",
            4 => "hello timeout",
            5 => "internal error",
            6 => "disconnected by an operator",
            7 => "connection limit exceeded",
            8 => "control stream not read",
            9 => "replaced by a newer connection of the same device",
            _ => "unknown",
        }
    }
}

impl fmt::Display for CloseCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.reason(), self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip_and_unknown_codes_survive() {
        for raw in 0..=40u16 {
            assert_eq!(ErrorCode::from_u16(raw).to_u16(), raw);
        }
        assert_eq!(ErrorCode::from_u16(999), ErrorCode::Other(999));
        assert!(ErrorCode::StorageUnavailable.is_retryable());
        assert!(!ErrorCode::Forbidden.is_retryable());
        assert!(!ErrorCode::Replaced.is_retryable());
    }
}
