//! The QUIC transport: the endpoint devices connect to, and the thin
//! adapters between its connections and streams and a
//! [`session`](crate::session).
//!
//! This is the only part of the broker that knows QUIC. [`shard`] drives
//! `quinn-proto` directly from one loop per core, each owning a socket, an
//! endpoint, its connections and their timers (quinn's high-level API,
//! with a task, an event channel and a transmit buffer per connection, cost
//! a third more memory per idle connection and lost on every benchmark;
//! BENCHMARKS.md). A connection is admitted by [`Admitter`], waits
//! (bounded by the hello timeout) for the client's control stream, and
//! both go to the session; delivery streams are server-opened
//! unidirectional streams. This module holds the QUIC and endpoint
//! settings, the admission policy, the persisted stateless-reset key and
//! the socket set-up.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use quinn::crypto::rustls::QuicServerConfig;
use quinn::{IdleTimeout, TransportConfig, VarInt};
use rustls::pki_types::CertificateDer;
use thiserror::Error;
use tracing::warn;

use crate::limits::{Admission, ConnectionSlot};
use crate::session::BrokerContext;

pub mod shard;

pub use shard::ShardedEndpoint;

/// How long a closing session waits for its last control frames to be
/// acknowledged before the connection is closed.
const CONTROL_FLUSH: Duration = Duration::from_secs(2);
/// Most transport shards a broker runs (`engine.shards`).
pub const MAX_SHARDS: usize = 64;

/// Why the endpoint could not start.
#[derive(Debug, Error)]
pub enum TransportError {
    /// rustls' configuration is not usable for QUIC.
    #[error("TLS configuration is not usable for QUIC: {0}")]
    Crypto(String),
    /// The UDP socket could not be bound.
    #[error("cannot listen on udp {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// The WebSocket listener could not be bound.
    #[error("cannot listen on tcp {addr} for WebSocket clients: {source}")]
    WebSocketBind {
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// A transport setting is out of range.
    #[error("invalid transport setting: {0}")]
    Setting(String),
}

/// File in the data directory holding the stateless-reset key.
pub const RESET_KEY_FILE: &str = "reset-key";

/// Reads the stateless-reset key from `dir`, creating it on first start.
///
/// QUIC stateless-reset tokens are derived from this key. Keeping it across
/// restarts lets a restarted broker answer packets of connections it lost
/// in a crash with a stateless reset, so clients learn at once that their
/// connection is gone and reconnect, instead of waiting for their idle
/// timeout.
pub fn load_reset_key(dir: &std::path::Path) -> std::io::Result<[u8; 32]> {
    let path = dir.join(RESET_KEY_FILE);
    if let Ok(bytes) = std::fs::read(&path)
        && let Ok(key) = <[u8; 32]>::try_from(bytes.as_slice())
    {
        return Ok(key);
    }
    let key: [u8; 32] = rand::random();
    crate::tls::write_private(&path, &key)?;
    Ok(key)
}

/// The QUIC settings every device connection gets.
#[derive(Debug)]
pub struct QuicSettings {
    /// Endpoint-wide settings: connection IDs and stateless resets.
    pub endpoint: quinn::EndpointConfig,
    /// What a server connection is offered.
    pub server: quinn::ServerConfig,
    /// The key connection IDs are signed with (from the reset key).
    pub cid_key: u64,
}

impl QuicSettings {
    /// Settings for `tls`, closing connections idle for `idle_timeout`,
    /// with stateless resets derived from the persisted `reset_key`.
    pub fn new(
        tls: rustls::ServerConfig,
        idle_timeout: Duration,
        reset_key: &[u8; 32],
    ) -> Result<Self, TransportError> {
        let crypto =
            QuicServerConfig::try_from(tls).map_err(|e| TransportError::Crypto(e.to_string()))?;
        let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
        let mut transport = TransportConfig::default();
        // One control stream per connection; the client opens no
        // unidirectional streams. Fewer allowed streams means less
        // per-connection state.
        transport.max_concurrent_bidi_streams(VarInt::from_u32(1));
        transport.max_concurrent_uni_streams(VarInt::from_u32(0));
        transport.max_idle_timeout(Some(
            IdleTimeout::try_from(idle_timeout)
                .map_err(|e| TransportError::Setting(e.to_string()))?,
        ));
        // Each subscription's stream may have up to this much
        // unacknowledged data in flight; the connection's total is bounded
        // by send_window.
        transport.send_window(8 * 1024 * 1024);
        // Ask clients to acknowledge every 9th packet instead of every 2nd
        // (the QUIC ACK-frequency extension; our client supports it): at
        // low rates each delivery is its own packet, and the ACKs coming
        // back were a third of the broker's packets. Measured: −11% broker
        // and generator CPU at 100 subscribers × 500 msg/s.
        let mut ack = quinn::AckFrequencyConfig::default();
        ack.ack_eliciting_threshold(VarInt::from_u32(8));
        transport.ack_frequency_config(Some(ack));
        server.transport_config(Arc::new(transport));
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, reset_key);
        let mut endpoint = quinn::EndpointConfig::new(Arc::new(key));
        // Connection IDs carry a keyed hash that the endpoint checks before
        // it answers a packet for an unknown connection. With the key
        // derived from the persisted secret, a restarted broker recognises
        // its previous incarnation's IDs and sends stateless resets for
        // them.
        let mut cid_key = [0u8; 8];
        cid_key.copy_from_slice(&reset_key[..8]);
        let cid_key = u64::from_le_bytes(cid_key);
        // quinn answers at most one unknown packet per interval (20 ms by
        // default). After a crash every client's next packet needs its
        // reset; with hashed CIDs validating out garbage, a shorter
        // interval is safe and lets thousands of clients learn of the
        // restart in seconds.
        endpoint.min_reset_interval(Duration::from_millis(1));
        Ok(Self {
            endpoint,
            server,
            cid_key,
        })
    }
}

/// How often the per-address handshake table drops addresses gone quiet.
const FORGET_ADDRESSES_EVERY: Duration = Duration::from_secs(10);

/// What to do with one connection attempt.
#[derive(Debug)]
pub enum Decision {
    /// Handshake; the slot counts the connection while it lives.
    Accept(ConnectionSlot),
    /// Answer with a Retry (the client proves its address).
    Retry,
    /// Refuse with a small close packet.
    Refuse,
}

/// The admission policy applied to an Initial, before any
/// cryptography: a flood costs one small packet per attempt, not a
/// handshake. Above the broker-wide rate a client first proves its address
/// (Retry), so spoofed sources never get further, nor into the per-address
/// table.
#[derive(Debug)]
pub struct Admitter {
    ctx: Arc<BrokerContext>,
    forget_at: std::time::Instant,
}

impl Admitter {
    /// The policy of `ctx`'s limits.
    pub fn new(ctx: Arc<BrokerContext>) -> Self {
        Self {
            ctx,
            forget_at: std::time::Instant::now() + FORGET_ADDRESSES_EVERY,
        }
    }

    /// Decides on an attempt from `remote`; `validated` when it came with a
    /// Retry token, `may_retry` when a Retry can still be asked for.
    pub fn admit(&mut self, remote: SocketAddr, validated: bool, may_retry: bool) -> Decision {
        let ctx = &self.ctx;
        if ctx.shutdown.is_cancelled() {
            return Decision::Refuse;
        }
        let slot = match ctx.limiter.admit_connection(validated) {
            Admission::Accept(slot) => slot,
            Admission::Retry if may_retry => {
                ctx.metrics.handshakes_retried.inc();
                return Decision::Retry;
            }
            Admission::Retry | Admission::Refuse(_) => {
                ctx.metrics.handshakes_refused.inc();
                return Decision::Refuse;
            }
        };
        if !ctx.limiter.admit_handshake(remote.ip()) {
            ctx.metrics.handshakes_refused.inc();
            return Decision::Refuse;
        }
        let now = std::time::Instant::now();
        if now >= self.forget_at {
            ctx.limiter.forget_idle_addresses();
            self.forget_at = now + FORGET_ADDRESSES_EVERY;
        }
        Decision::Accept(slot)
    }
}

/// The verified client certificate's name (mutual TLS) from a connection's
/// TLS session.
fn peer_name(identity: Option<Box<dyn std::any::Any>>) -> Option<String> {
    identity
        .and_then(|any| any.downcast::<Vec<CertificateDer<'static>>>().ok())
        .and_then(|chain| chain.first().map(crate::tls::client_identity))
}

/// The close frame's reason bytes for `code`.
fn close_reason(reason: &str) -> Bytes {
    Bytes::copy_from_slice(reason.as_bytes())
}

/// A UDP socket bound to `addr` that shares it (`SO_REUSEPORT`) with the
/// other shards' sockets: the kernel spreads flows over them by address
/// hash.
fn udp_socket(addr: SocketAddr, buffer_bytes: usize) -> std::io::Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    socket.set_reuse_port(true)?;
    if addr.is_ipv6() {
        // "[::]" serves IPv4 clients too where the OS allows dual-stack.
        let _ = socket.set_only_v6(false);
    }
    socket.set_recv_buffer_size(buffer_bytes)?;
    socket.set_send_buffer_size(buffer_bytes)?;
    // Linux reports twice what it grants (it counts its bookkeeping).
    let granted = socket.recv_buffer_size()? / 2;
    if granted < buffer_bytes {
        warn!(
            asked = buffer_bytes,
            granted,
            "the kernel capped the QUIC socket's receive buffer: raise net.core.rmem_max and net.core.wmem_max, or bursts of ACKs from many subscribers are dropped"
        );
    }
    socket.bind(&addr.into())?;
    Ok(socket.into())
}
