//! The client's errors: per call ([`ClientError`]) and per subscription
//! event ([`SubscriptionError`]).

use thiserror::Error;
use volna_proto::{Epoch, ErrorCode, Offset};

/// Why a client call failed.
#[derive(Debug, Clone, Error)]
pub enum ClientError {
    /// The server address could not be parsed or resolved.
    #[error("invalid server address {0:?}")]
    InvalidAddress(String),
    /// TLS could not be set up (unreadable CA file, bad pin…).
    #[error("TLS setup failed: {0}")]
    Tls(String),
    /// The connection could not be established.
    #[error("cannot connect: {0}")]
    Connect(String),
    /// Nothing answered the connection attempt in time: no broker listens
    /// there, or UDP does not get through.
    #[error("no QUIC answer from {server} within {} s", after.as_secs_f64())]
    ConnectTimeout {
        /// The address tried.
        server: String,
        /// How long the attempt waited.
        after: std::time::Duration,
    },
    /// The broker refused the session (bad token, unsupported version).
    #[error("the broker refused the session: {code}: {message}")]
    Refused {
        /// Why.
        code: ErrorCode,
        /// The broker's explanation.
        message: String,
    },
    /// The broker refused the request.
    #[error("the broker refused the request: {code}: {message}")]
    Server {
        /// Why.
        code: ErrorCode,
        /// The broker's explanation.
        message: String,
    },
    /// The payload is larger than the broker accepts; nothing was sent.
    #[error("payload of {len} bytes exceeds the broker's limit of {max}")]
    PayloadTooLarge {
        /// The payload's size.
        len: usize,
        /// The broker's limit.
        max: u32,
    },
    /// The call did not complete within the request timeout.
    /// `maybe_stored`: the request reached a connection that then died or
    /// gave no answer, so the broker may have carried it out (a publish
    /// may be stored: send it again under the same sequence, with
    /// [`Client::publish_sequenced`](crate::Client::publish_sequenced),
    /// and it is stored once); false when it was never sent.
    #[error("timed out{}", if *maybe_stored { " (it may have been carried out)" } else { "" })]
    Timeout {
        /// Whether the broker may have carried the request out.
        maybe_stored: bool,
    },
    /// The connection was lost while the call was in flight.
    #[error("disconnected")]
    Disconnected,
    /// The client was closed by the application.
    #[error("the client is closed")]
    Closed,
    /// The client stopped for good: the broker refused it with a cause
    /// that waiting will not cure (the token expired and no source gives
    /// a new one, the device limit, another connection of this device took
    /// over…). Every later call answers this; see
    /// [`Client::state`](crate::Client::state).
    #[error("the client stopped: {0}")]
    Failed(Box<ClientError>),
    /// The broker broke the protocol.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// The configured token source could not provide a token.
    #[error("the token source failed: {0}")]
    TokenSource(String),
}

impl ClientError {
    /// The broker's error code, when the broker refused something.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            Self::Refused { code, .. } | Self::Server { code, .. } => Some(*code),
            Self::Failed(cause) => cause.code(),
            _ => None,
        }
    }

    /// Whether trying again later (on this or another node) may succeed:
    /// network trouble and the broker's passing refusals (the codes of
    /// [`ErrorCode::is_retryable`], the one table broker and clients
    /// share). Refusals that waiting will not cure, bad input and a
    /// closed client are final.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Connect(_)
            | Self::ConnectTimeout { .. }
            | Self::Timeout { .. }
            | Self::Disconnected
            | Self::TokenSource(_) => true,
            Self::Refused { code, .. } | Self::Server { code, .. } => code.is_retryable(),
            Self::InvalidAddress(_)
            | Self::Tls(_)
            | Self::PayloadTooLarge { .. }
            | Self::Closed
            | Self::Failed(_)
            | Self::Protocol(_) => false,
        }
    }
}

/// Something a subscriber must know about, delivered in the message stream
/// in its place among the messages. Only [`Ended`](Self::Ended) ends the
/// stream.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum SubscriptionError {
    /// Retention removed offsets the subscriber had not seen; delivery goes
    /// on from `first_available`.
    #[error("offsets {requested}..{first_available} were removed by retention")]
    Truncated {
        /// The offset the subscription needed next.
        requested: Offset,
        /// The oldest offset still stored.
        first_available: Offset,
    },
    /// The channel's log was reset: offsets start over at `start` in the new
    /// epoch.
    #[error(
        "the channel log was reset (epoch {previous} → {current}); delivery restarts at {start}"
    )]
    EpochChanged {
        /// The epoch the subscriber knew.
        previous: Epoch,
        /// The channel's epoch now.
        current: Epoch,
        /// The first offset delivered in the new epoch.
        start: Offset,
    },
    /// The broker skipped offsets without saying why. A broker bug: report
    /// it; the stream goes on.
    #[error("offsets {expected}..{got} are missing")]
    Gap {
        /// The offset expected next.
        expected: Offset,
        /// The offset received.
        got: Offset,
    },
    /// The subscription ended for good (`Forbidden`: a refreshed token no
    /// longer grants the channel; the broker refused to resubscribe after
    /// a reconnect with a final code; the whole client stopped — the code
    /// of its failure, e.g. `Unauthorized` or `Replaced`). The stream ends
    /// after this item. Passing causes (`StorageUnavailable` while a
    /// partition fails over) never end it: the client subscribes again.
    #[error("the subscription ended: {code}: {message}")]
    Ended {
        /// Why.
        code: ErrorCode,
        /// The broker's explanation.
        message: String,
    },
}
