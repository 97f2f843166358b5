//! The QUIC transport: a quinn endpoint and the thin adapters between its
//! connections and streams and a [`session`](crate::session).
//!
//! This is the only module of the broker that knows quinn. It accepts
//! connections, waits (bounded by the hello timeout) for the client's
//! control stream, and hands both to the session; delivery streams are
//! server-opened unidirectional streams.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use quinn::crypto::rustls::QuicServerConfig;
use quinn::{Endpoint, IdleTimeout, TransportConfig, VarInt};
use rustls::pki_types::CertificateDer;
use thiserror::Error;
use tracing::{Instrument, debug, info_span, warn};
use volna_proto::CloseCode;

use crate::limits::Admission;
use crate::session::{self, BrokerContext, Connection};
use crate::subscription::{DeliverySink, SinkError};

/// How long a closing session waits for its last control frames to be
/// acknowledged before the connection is closed.
const CONTROL_FLUSH: Duration = Duration::from_secs(2);

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

/// Binds the broker's QUIC endpoint, asking for `buffer_bytes` of socket
/// receive and send buffer.
///
/// Every connection shares this one socket, so a message to thousands of
/// subscribers comes back as thousands of ACKs at once; the kernel's
/// default ~200 KiB drops them (seen: 18,000 drops in one fan-out run to
/// 1,000 subscribers), and each drop costs a retransmission. The kernel
/// caps the request at `net.core.rmem_max` / `wmem_max`: a grant below the
/// request is logged.
pub fn bind(
    addr: SocketAddr,
    buffer_bytes: usize,
    tls: rustls::ServerConfig,
    idle_timeout: Duration,
    reset_key: &[u8; 32],
) -> Result<Endpoint, TransportError> {
    let crypto =
        QuicServerConfig::try_from(tls).map_err(|e| TransportError::Crypto(e.to_string()))?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    let mut transport = TransportConfig::default();
    // One control stream per connection; the client opens no unidirectional
    // streams. Fewer allowed streams means less per-connection state.
    transport.max_concurrent_bidi_streams(VarInt::from_u32(1));
    transport.max_concurrent_uni_streams(VarInt::from_u32(0));
    transport.max_idle_timeout(Some(
        IdleTimeout::try_from(idle_timeout).map_err(|e| TransportError::Setting(e.to_string()))?,
    ));
    // Each subscription's stream may have up to this much unacknowledged
    // data in flight; the connection's total is bounded by send_window.
    transport.send_window(8 * 1024 * 1024);
    // Ask clients to acknowledge every 9th packet instead of every 2nd (the
    // QUIC ACK-frequency extension; our client supports it): at low rates
    // each delivery is its own packet, and the ACKs coming back were a
    // third of the broker's packets. Measured: −11% broker and generator
    // CPU at 100 subscribers × 500 msg/s.
    let mut ack = quinn::AckFrequencyConfig::default();
    ack.ack_eliciting_threshold(VarInt::from_u32(8));
    transport.ack_frequency_config(Some(ack));
    server.transport_config(Arc::new(transport));
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, reset_key);
    let mut endpoint_config = quinn::EndpointConfig::new(Arc::new(key));
    // Connection IDs carry a keyed hash that the endpoint checks before it
    // answers a packet for an unknown connection. With the key derived from
    // the persisted secret, a restarted broker recognises its previous
    // incarnation's IDs and sends stateless resets for them.
    let mut cid_key = [0u8; 8];
    cid_key.copy_from_slice(&reset_key[..8]);
    let cid_key = u64::from_le_bytes(cid_key);
    // quinn answers at most one unknown packet per interval (20 ms by
    // default). After a crash every client's next packet needs its reset;
    // with hashed CIDs validating out garbage, a shorter interval is safe
    // and lets thousands of clients learn of the restart in seconds.
    endpoint_config.min_reset_interval(Duration::from_millis(1));
    endpoint_config.cid_generator(move || {
        Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key))
    });
    let socket =
        udp_socket(addr, buffer_bytes).map_err(|source| TransportError::Bind { addr, source })?;
    Endpoint::new(
        endpoint_config,
        Some(server),
        socket,
        Arc::new(quinn::TokioRuntime),
    )
    .map_err(|source| TransportError::Bind { addr, source })
}

fn udp_socket(addr: SocketAddr, buffer_bytes: usize) -> std::io::Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
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

/// How often the per-address handshake table drops addresses gone quiet.
const FORGET_ADDRESSES_EVERY: Duration = Duration::from_secs(10);

/// Accepts connections until the endpoint is closed.
pub async fn serve(endpoint: Endpoint, ctx: Arc<BrokerContext>) {
    let mut forget_at = tokio::time::Instant::now() + FORGET_ADDRESSES_EVERY;
    while let Some(incoming) = endpoint.accept().await {
        if ctx.shutdown.is_cancelled() {
            incoming.refuse();
            continue;
        }
        let remote = incoming.remote_address();
        // Everything here is decided before any cryptography: a flood
        // costs one small packet per attempt, not a handshake. Above the
        // broker-wide rate a client first proves its address (Retry), so
        // spoofed sources never get further, nor into the per-address table.
        let mut slot = match ctx
            .limiter
            .admit_connection(incoming.remote_address_validated())
        {
            Admission::Accept(slot) => slot,
            Admission::Retry if incoming.may_retry() => {
                ctx.metrics.handshakes_retried.inc();
                if let Err(e) = incoming.retry() {
                    e.into_incoming().refuse();
                }
                continue;
            }
            Admission::Retry | Admission::Refuse(_) => {
                ctx.metrics.handshakes_refused.inc();
                incoming.refuse();
                continue;
            }
        };
        if !ctx.limiter.admit_handshake(remote.ip()) {
            ctx.metrics.handshakes_refused.inc();
            incoming.refuse();
            continue;
        }
        if tokio::time::Instant::now() >= forget_at {
            ctx.limiter.forget_idle_addresses();
            forget_at = tokio::time::Instant::now() + FORGET_ADDRESSES_EVERY;
        }
        let ctx = ctx.clone();
        tokio::spawn(
            async move {
                let conn = match incoming.await {
                    Ok(conn) => conn,
                    Err(e) => return debug!(error = %e, "handshake failed"),
                };
                slot.established();
                ctx.metrics.handshakes.inc();
                let control =
                    tokio::time::timeout(ctx.config.hello_timeout(), conn.accept_bi()).await;
                let (send, recv) = match control {
                    Ok(Ok(streams)) => streams,
                    Ok(Err(e)) => {
                        return debug!(error = %e, "connection ended before its control stream");
                    }
                    Err(_) => {
                        let code = CloseCode::HELLO_TIMEOUT;
                        return conn.close(VarInt::from_u32(code.0), code.reason().as_bytes());
                    }
                };
                let peer = conn
                    .peer_identity()
                    .and_then(|any| any.downcast::<Vec<CertificateDer<'static>>>().ok())
                    .and_then(|chain| chain.first().map(crate::tls::client_identity));
                let conn = QuicConnection { conn, peer };
                session::run(ctx, Arc::new(conn), recv, send).await;
                drop(slot);
            }
            .instrument(info_span!("conn", %remote)),
        );
    }
}

/// A quinn connection as the session sees it.
#[derive(Debug)]
struct QuicConnection {
    conn: quinn::Connection,
    /// The verified client certificate's name (mutual TLS).
    peer: Option<String>,
}

/// A server-opened unidirectional stream carrying one subscription.
#[derive(Debug)]
pub struct QuicDeliveryStream(quinn::SendStream);

impl Connection for QuicConnection {
    type Sink = QuicDeliveryStream;
    type ControlSend = quinn::SendStream;

    async fn finish_control(mut send: quinn::SendStream) {
        if send.finish().is_ok() {
            let _ = tokio::time::timeout(CONTROL_FLUSH, send.stopped()).await;
        }
    }

    async fn open_delivery(&self) -> Result<Self::Sink, SinkError> {
        self.conn
            .open_uni()
            .await
            .map(QuicDeliveryStream)
            .map_err(|e| SinkError(e.to_string()))
    }

    fn close(&self, code: CloseCode, reason: &str) {
        self.conn.close(VarInt::from_u32(code.0), reason.as_bytes());
    }

    fn remote(&self) -> SocketAddr {
        self.conn.remote_address()
    }

    fn peer_identity(&self) -> Option<String> {
        self.peer.clone()
    }
}

impl DeliverySink for QuicDeliveryStream {
    async fn send(&mut self, mut frames: Vec<Bytes>) -> Result<(), SinkError> {
        // quinn queues the chunks themselves: the shared frames are not copied.
        self.0
            .write_all_chunks(&mut frames)
            .await
            .map_err(|e| SinkError(e.to_string()))
    }

    async fn finish(&mut self) {
        if let Err(e) = self.0.finish() {
            warn!(error = %e, "finishing a delivery stream");
        }
    }
}
