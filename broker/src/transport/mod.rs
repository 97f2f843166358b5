//! The QUIC transport: the endpoint devices connect to, and the thin
//! adapters between its connections and streams and a
//! [`session`](crate::session).
//!
//! This is the only part of the broker that knows QUIC. Two engines serve
//! the same protocol (`engine.transport`):
//! - [`quinn_api`]: quinn's high-level API (a task, an event channel and a
//!   transmit buffer per connection);
//! - [`shard`]: `quinn-proto` driven directly by one loop per core, each
//!   owning a socket, an endpoint, its connections and their timers.
//!
//! Both accept connections through the same admission policy
//! ([`Admitter`]), wait (bounded by the hello timeout) for the client's
//! control stream, and hand both to the session; delivery streams are
//! server-opened unidirectional streams. What this module holds is what
//! the engines share: QUIC and endpoint settings, the persisted
//! stateless-reset key, the socket set-up.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use quinn::crypto::rustls::QuicServerConfig;
use quinn::{IdleTimeout, TransportConfig, VarInt};
use rustls::pki_types::CertificateDer;
use thiserror::Error;
use tracing::warn;
use volna_proto::CloseCode;

use crate::config::TransportEngine;
use crate::limits::{Admission, ConnectionSlot};
use crate::session::BrokerContext;

pub mod quinn_api;
pub mod shard;

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

/// The QUIC settings every device connection gets, whichever engine
/// serves it.
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

/// The endpoint devices connect to, served by the configured engine.
#[derive(Debug)]
pub enum Listener {
    /// quinn's high-level endpoint.
    Quinn(quinn::Endpoint),
    /// Per-core shards over `quinn-proto`.
    Shards(shard::ShardedEndpoint),
}

impl Listener {
    /// Binds `addr` with `engine`, asking for `buffer_bytes` of socket
    /// receive and send buffer (per socket).
    ///
    /// Every connection of a socket shares it, so a message to thousands
    /// of subscribers comes back as thousands of ACKs at once; the
    /// kernel's default ~200 KiB drops them (seen: 18,000 drops in one
    /// fan-out run to 1,000 subscribers), and each drop costs a
    /// retransmission. The kernel caps the request at `net.core.rmem_max`
    /// / `wmem_max`: a grant below the request is logged.
    pub fn bind(
        engine: TransportEngine,
        shards: usize,
        addr: SocketAddr,
        buffer_bytes: usize,
        settings: QuicSettings,
    ) -> Result<Self, TransportError> {
        match engine {
            TransportEngine::Quinn => {
                quinn_api::bind(addr, buffer_bytes, settings).map(Self::Quinn)
            }
            TransportEngine::Shards => {
                let shards = match shards {
                    0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
                    n => n,
                }
                .min(MAX_SHARDS);
                shard::ShardedEndpoint::bind(addr, buffer_bytes, settings, shards).map(Self::Shards)
            }
        }
    }

    /// The address devices connect to.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        match self {
            Self::Quinn(endpoint) => endpoint.local_addr(),
            Self::Shards(endpoint) => Ok(endpoint.local_addr()),
        }
    }

    /// Starts serving connections with `ctx`; the returned task ends when
    /// the endpoint is closed.
    pub fn serve(&mut self, ctx: Arc<BrokerContext>) -> tokio::task::JoinHandle<()> {
        match self {
            Self::Quinn(endpoint) => tokio::spawn(quinn_api::serve(endpoint.clone(), ctx)),
            Self::Shards(endpoint) => endpoint.serve(ctx),
        }
    }

    /// Waits until every connection is gone.
    pub async fn wait_idle(&self) {
        match self {
            Self::Quinn(endpoint) => endpoint.wait_idle().await,
            Self::Shards(endpoint) => endpoint.wait_idle().await,
        }
    }

    /// Closes every connection with `code`; new ones are refused.
    pub fn close(&self, code: CloseCode) {
        match self {
            Self::Quinn(endpoint) => {
                endpoint.close(VarInt::from_u32(code.0), code.reason().as_bytes())
            }
            Self::Shards(endpoint) => endpoint.close(code),
        }
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

/// The admission policy both engines apply to an Initial, before any
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

/// A UDP socket bound to `addr`; with `reuse_port`, several sockets share
/// the address and the kernel spreads flows over them by address hash.
fn udp_socket(
    addr: SocketAddr,
    buffer_bytes: usize,
    reuse_port: bool,
) -> std::io::Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if reuse_port {
        socket.set_reuse_port(true)?;
    }
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
