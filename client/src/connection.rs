//! One QUIC connection to the broker: the handshake, the control stream's
//! request/reply matching and the delivery streams. The only module of the
//! client that knows quinn.

use std::collections::HashMap;
use std::future::Future;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::BytesMut;
use quinn::crypto::rustls::QuicClientConfig;
use quinn::{IdleTimeout, TransportConfig, VarInt};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use sha2::{Digest, Sha256};
use tokio::sync::{Notify, broadcast, mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};
use volna_proto::{
    CloseCode, ErrorFrame, Frame, Hello, Limits, PROTOCOL_VERSION, SubscriptionId, Welcome,
};

use crate::acks::Acks;
use crate::config::{ClientCertificate, ClientConfig, Trust};
use crate::error::ClientError;
use crate::subscription::SubShared;
use crate::websocket::{WsLink, WsRecv};

/// Read-marker events a slow listener may fall behind by before it is
/// told it lagged (tokio's broadcast semantics).
const MARKER_EVENTS: usize = 64;

/// How long an attempt on one address of a seed has before the next
/// address is tried alongside it (RFC 8305's "Connection Attempt Delay").
const HAPPY_EYEBALLS_DELAY: std::time::Duration = std::time::Duration::from_millis(250);

/// How long a lost connection's close code is waited for, once the loss
/// was noticed.
const CLOSE_REASON_WAIT: std::time::Duration = std::time::Duration::from_millis(500);

/// How long [`Transport::wait_closed`] waits for a closed connection's
/// last packets to leave.
const CLOSE_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

/// The client's QUIC endpoint and TLS set-up, reused across reconnects,
/// and where the next attempt goes.
///
/// One attempt ([`Transport::establish`]) is one round: every QUIC seed in
/// turn from the current one, each with its own time budget and every
/// address its name resolves to (Happy Eyeballs), then every WebSocket
/// URL in turn. A final refusal (a bad token is refused by every node
/// alike) ends the round at once; anything else moves on.
#[derive(Debug)]
pub(crate) struct Transport {
    endpoint: quinn::Endpoint,
    /// Whether `endpoint` is this client's own (not shared with others).
    own_endpoint: bool,
    quic: quinn::ClientConfig,
    /// TLS for the WebSocket fallback (ALPN HTTP/1.1).
    websocket_tls: Arc<rustls::ClientConfig>,
    /// The seeds, each with the name its certificate must carry.
    servers: Vec<(String, String)>,
    /// The WebSocket URLs.
    websocket: Vec<String>,
    /// The seed the next attempt starts at.
    next: AtomicUsize,
    /// The WebSocket URL the next fallback starts at.
    next_websocket: AtomicUsize,
    /// What a device's connections tell the client (empty without one).
    pub device: DeviceTaps,
}

/// Where a device's connections pass what the broker says of its state.
#[derive(Debug, Clone, Default)]
pub(crate) struct DeviceTaps {
    /// `ReadMarker` events.
    markers: Option<broadcast::Sender<ReadMarker>>,
    /// The client's acknowledgements, which reports of stored `Ack`s and
    /// refusals of single ones settle.
    pub acks: Option<Arc<Acks>>,
}

/// The user's read marker moved on another of the user's devices.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadMarker {
    /// The channel.
    pub channel: volna_proto::ChannelName,
    /// The last offset read.
    pub offset: volna_proto::Offset,
}

impl Transport {
    pub fn new(config: &ClientConfig) -> Result<Self, ClientError> {
        let mut servers = Vec::new();
        for server in &config.servers {
            let (host, _port) = split_host_port(server)?;
            let tls_name = config.server_name.clone().unwrap_or(host);
            servers.push((server.clone(), tls_name));
        }
        if servers.is_empty() && config.websocket.is_empty() {
            return Err(ClientError::InvalidAddress(
                "no server address given".into(),
            ));
        }
        let mut tls = tls_config(&config.trust, config.client_certificate.as_ref())?;
        let mut websocket_tls = tls.clone();
        websocket_tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        websocket_tls.resumption = rustls::client::Resumption::in_memory_sessions(1);
        tls.alpn_protocols = vec![volna_proto::ALPN.to_vec()];
        // Resumption tickets for this client's seeds only: rustls' default
        // cache is sized for 256 servers and allocated up front, 5.7 KB of
        // every client (BENCHMARKS.md), and a process may hold many.
        tls.resumption = rustls::client::Resumption::in_memory_sessions(servers.len().max(1));
        let crypto =
            QuicClientConfig::try_from(tls).map_err(|e| ClientError::Tls(e.to_string()))?;
        let mut quic = quinn::ClientConfig::new(Arc::new(crypto));
        let mut transport = TransportConfig::default();
        transport.keep_alive_interval(Some(config.keep_alive));
        transport.max_idle_timeout(Some(
            IdleTimeout::try_from(config.idle_timeout)
                .map_err(|e| ClientError::Connect(e.to_string()))?,
        ));
        // The broker opens one unidirectional stream per subscription (and
        // a closed one's credit returns once it is read to its end); the
        // client opens only the control stream.
        transport.max_concurrent_uni_streams(VarInt::from_u32(config.max_subscriptions.max(1)));
        transport.max_concurrent_bidi_streams(VarInt::from_u32(0));
        // Lets the broker ask for fewer ACKs (the ACK-frequency extension).
        transport.ack_frequency_config(Some(quinn::AckFrequencyConfig::default()));
        quic.transport_config(Arc::new(transport));
        let (endpoint, own_endpoint) = match &config.endpoint {
            Some(shared) => (shared.quic.clone(), false),
            None => (Endpoint::bind_any()?.quic, true),
        };
        Ok(Self {
            endpoint,
            own_endpoint,
            quic,
            websocket_tls: Arc::new(websocket_tls),
            servers,
            websocket: config.websocket.clone(),
            next: AtomicUsize::new(0),
            next_websocket: AtomicUsize::new(0),
            device: match config.device {
                Some(_) => DeviceTaps {
                    markers: Some(broadcast::Sender::new(MARKER_EVENTS)),
                    acks: Some(Arc::default()),
                },
                None => DeviceTaps::default(),
            },
        })
    }

    /// A receiver of read-marker events, for a client with a device.
    pub fn read_markers(&self) -> Option<broadcast::Receiver<ReadMarker>> {
        self.device
            .markers
            .as_ref()
            .map(broadcast::Sender::subscribe)
    }

    /// One round of attempts (see [`Transport`]): the first connection
    /// that says Welcome; else the first final refusal, or the last error.
    pub async fn establish(
        &self,
        config: &ClientConfig,
        token: &str,
    ) -> Result<Arc<Live>, ClientError> {
        let mut last = None;
        let budget = if self.websocket.is_empty() {
            config.connect_timeout
        } else {
            config.quic_fallback_after
        };
        let seeds = self.servers.len();
        let first = self.next.load(Ordering::Relaxed);
        for i in 0..seeds {
            let at = (first + i) % seeds;
            match self.establish_quic(at, config, token, budget).await {
                Ok(live) => {
                    self.next.store(at, Ordering::Relaxed);
                    return Ok(live);
                }
                Err(e) if !e.is_retryable() => return Err(e),
                Err(e) => {
                    debug!(server = %self.servers[at].0, error = %e, "QUIC attempt failed");
                    last = Some(e);
                }
            }
        }
        // The next round starts one seed further, whatever answers now.
        self.move_on();
        let urls = self.websocket.len();
        let first = self.next_websocket.load(Ordering::Relaxed);
        for i in 0..urls {
            let at = (first + i) % urls;
            let url = &self.websocket[at];
            match self
                .establish_websocket(url, config, token.to_owned())
                .await
            {
                Ok(live) => {
                    self.next_websocket.store(at, Ordering::Relaxed);
                    if seeds > 0 {
                        info!(%url, "connected over WebSocket: QUIC is unreachable");
                    }
                    return Ok(live);
                }
                Err(e) if !e.is_retryable() => return Err(e),
                Err(e) => {
                    debug!(%url, error = %e, "WebSocket attempt failed");
                    last = Some(e);
                }
            }
        }
        Err(last.unwrap_or_else(|| ClientError::InvalidAddress("no server address given".into())))
    }

    /// Whether a connection over WebSocket should be probed for QUIC.
    pub fn has_quic(&self) -> bool {
        !self.servers.is_empty()
    }

    /// The connection was lost: the next attempt starts at the next seed
    /// (the node may be gone; any other serves the same channels).
    pub fn move_on(&self) {
        if !self.servers.is_empty() {
            let at = self.next.load(Ordering::Relaxed);
            self.next
                .store((at + 1) % self.servers.len(), Ordering::Relaxed);
        }
        if !self.websocket.is_empty() {
            let at = self.next_websocket.load(Ordering::Relaxed);
            self.next_websocket
                .store((at + 1) % self.websocket.len(), Ordering::Relaxed);
        }
    }

    /// Connects to seed `at` over QUIC within `budget`, says Hello with
    /// `token` and waits for Welcome.
    async fn establish_quic(
        &self,
        at: usize,
        config: &ClientConfig,
        token: &str,
        budget: std::time::Duration,
    ) -> Result<Arc<Live>, ClientError> {
        let Some((server, _)) = self.servers.get(at) else {
            return Err(ClientError::InvalidAddress(
                "no server address given".into(),
            ));
        };
        let handshake = async {
            let conn = self.quic_handshake(at).await?;
            let (send, recv) = conn
                .open_bi()
                .await
                .map_err(|e| ClientError::Connect(e.to_string()))?;
            let (send, recv, buf, welcome) = hello(
                config,
                token.to_owned(),
                ControlWriter::Quic(send),
                StreamReader::Quic(recv),
            )
            .await?;
            Ok::<_, ClientError>((Wire::Quic(conn), send, recv, buf, welcome))
        };
        self.finish_establishing(server, budget, handshake).await
    }

    /// A QUIC handshake with seed `at`: every address its name resolves
    /// to, raced Happy Eyeballs style.
    async fn quic_handshake(&self, at: usize) -> Result<quinn::Connection, ClientError> {
        let Some((server, tls_name)) = self.servers.get(at) else {
            return Err(ClientError::InvalidAddress(
                "no server address given".into(),
            ));
        };
        // A name that does not resolve now (no network yet, a resolver
        // timing out) may later: a passing failure, like no answer.
        let addrs = tokio::net::lookup_host(server)
            .await
            .map_err(|e| ClientError::Connect(format!("{server}: cannot resolve: {e}")))?
            .collect::<Vec<_>>();
        race(
            interleave_families(addrs),
            HAPPY_EYEBALLS_DELAY,
            |addr| async move {
                self.endpoint
                    .connect_with(self.quic.clone(), addr, tls_name)
                    .map_err(|e| ClientError::Connect(format!("{addr}: {e}")))?
                    .await
                    .map_err(|e| ClientError::Connect(format!("{addr}: {e}")))
            },
        )
        .await
    }

    /// Connects over WebSocket to `url`, says Hello and waits for Welcome.
    async fn establish_websocket(
        &self,
        url: &str,
        config: &ClientConfig,
        token: String,
    ) -> Result<Arc<Live>, ClientError> {
        let handshake = async {
            let max_message = volna_proto::websocket::TAG_LEN + 64 * 1024 * 1024 + 128 * 1024;
            let (link, control) = WsLink::connect(
                url,
                self.websocket_tls.clone(),
                config.server_name.as_deref(),
                max_message,
                config.keep_alive,
                config.idle_timeout,
            )
            .await?;
            let (send, recv, buf, welcome) = hello(
                config,
                token,
                ControlWriter::WebSocket(link.clone()),
                StreamReader::WebSocket(control, link.clone()),
            )
            .await?;
            Ok::<_, ClientError>((Wire::WebSocket(link), send, recv, buf, welcome))
        };
        self.finish_establishing(url, config.connect_timeout, handshake)
            .await
    }

    /// Whether any seed completes a QUIC handshake, each within `within`
    /// (no session: the connection is closed at once). The next attempt
    /// starts at the seed that answered.
    pub async fn quic_reachable(&self, within: std::time::Duration) -> bool {
        let seeds = self.servers.len();
        let first = self.next.load(Ordering::Relaxed);
        for i in 0..seeds {
            let at = (first + i) % seeds;
            if let Ok(Ok(conn)) = tokio::time::timeout(within, self.quic_handshake(at)).await {
                conn.close(VarInt::from_u32(CloseCode::NORMAL.0), b"probe");
                self.next.store(at, Ordering::Relaxed);
                return true;
            }
        }
        false
    }

    /// Waits (briefly) until the last packets of connections closed on
    /// this client's own socket have left, so that a process exiting
    /// right after [`Client::close`](crate::Client::close) frees its place
    /// on the broker at once instead of after the idle timeout.
    pub async fn wait_closed(&self) {
        if self.own_endpoint {
            let _ = tokio::time::timeout(CLOSE_WAIT, self.endpoint.wait_idle()).await;
        }
    }

    async fn finish_establishing(
        &self,
        server: &str,
        budget: std::time::Duration,
        handshake: impl Future<
            Output = Result<(Wire, ControlWriter, StreamReader, BytesMut, Welcome), ClientError>,
        >,
    ) -> Result<Arc<Live>, ClientError> {
        let timed_out = || ClientError::ConnectTimeout {
            server: server.to_owned(),
            after: budget,
        };
        let (wire, send, recv, buf, welcome) = match tokio::time::timeout(budget, handshake).await {
            Ok(Ok(established)) => established,
            // quinn's own idle timer fired first: the same silence.
            Ok(Err(ClientError::Connect(why))) if why.contains("timed out") => {
                return Err(timed_out());
            }
            Ok(Err(e)) => return Err(e),
            Err(_) => return Err(timed_out()),
        };
        debug!(session = welcome.session_id, %server, "connected");
        Ok(Live::start(
            wire,
            send,
            recv,
            buf,
            welcome,
            server.to_owned(),
            self.device.clone(),
        ))
    }
}

/// Orders resolved addresses as RFC 8305 does: alternating families,
/// starting with the family of the first (the resolver's preference).
fn interleave_families(addrs: Vec<SocketAddr>) -> Vec<SocketAddr> {
    let Some(first) = addrs.first() else {
        return addrs;
    };
    let prefer_v6 = first.is_ipv6();
    let (mut preferred, mut other): (Vec<_>, Vec<_>) =
        addrs.iter().partition(|a| a.is_ipv6() == prefer_v6);
    preferred.reverse();
    other.reverse();
    let mut ordered = Vec::with_capacity(addrs.len());
    while let Some(a) = preferred.pop() {
        ordered.push(a);
        ordered.extend(other.pop());
    }
    ordered.extend(other.into_iter().rev());
    ordered
}

/// Tries `addrs` in order, starting the next one `stagger` after the last
/// while none has answered, or at once when one fails; the first success
/// wins (the others are dropped, which abandons them). Else the last error.
async fn race<T, F, Fut>(
    addrs: Vec<SocketAddr>,
    stagger: std::time::Duration,
    attempt: F,
) -> Result<T, ClientError>
where
    F: Fn(SocketAddr) -> Fut,
    Fut: Future<Output = Result<T, ClientError>>,
{
    let mut addrs = addrs.into_iter();
    let mut running = futures_util::stream::FuturesUnordered::new();
    let mut last = None;
    loop {
        if running.is_empty() {
            match addrs.next() {
                Some(addr) => running.push(attempt(addr)),
                None => {
                    return Err(last.unwrap_or_else(|| {
                        ClientError::Connect("the name resolves to no address".into())
                    }));
                }
            }
        }
        let more = addrs.len() > 0;
        tokio::select! {
            Some(result) = futures_util::StreamExt::next(&mut running) => match result {
                Ok(done) => return Ok(done),
                Err(e) => {
                    last = Some(e);
                    if let Some(addr) = addrs.next() {
                        running.push(attempt(addr));
                    }
                }
            },
            () = tokio::time::sleep(stagger), if more => {
                if let Some(addr) = addrs.next() {
                    running.push(attempt(addr));
                }
            }
        }
    }
}

/// Says Hello on a fresh control stream and reads the broker's answer.
async fn hello(
    config: &ClientConfig,
    token: String,
    mut send: ControlWriter,
    mut recv: StreamReader,
) -> Result<(ControlWriter, StreamReader, BytesMut, Welcome), ClientError> {
    let mut out = BytesMut::new();
    volna_proto::encode(
        &Frame::Hello(Hello {
            protocol: PROTOCOL_VERSION,
            token,
            client: config.client_name.clone(),
            device: config.device.clone(),
        }),
        &mut out,
    );
    send.write_all(&out)
        .await
        .map_err(|e| ClientError::Connect(e.to_string()))?;
    let mut buf = BytesMut::new();
    let welcome = match read_frame(&mut recv, &mut buf, &Limits::HANDSHAKE).await? {
        Frame::Welcome(w) => w,
        Frame::Error(ErrorFrame { code, message, .. }) => {
            return Err(ClientError::Refused { code, message });
        }
        other => {
            return Err(ClientError::Protocol(format!(
                "expected Welcome, got {:?}",
                other.frame_type()
            )));
        }
    };
    Ok((send, recv, buf, welcome))
}

/// The connection under a session: QUIC, or the WebSocket fallback.
#[derive(Debug)]
enum Wire {
    Quic(quinn::Connection),
    WebSocket(Arc<WsLink>),
}

impl Wire {
    /// Resolves when the connection is gone; says why, with the close code
    /// of a broker that closed it.
    async fn closed(&self) -> (Option<CloseCode>, String) {
        match self {
            Wire::Quic(conn) => {
                let why = conn.closed().await;
                let code = match &why {
                    quinn::ConnectionError::ApplicationClosed(close) => {
                        u32::try_from(close.error_code.into_inner())
                            .ok()
                            .map(CloseCode)
                    }
                    _ => None,
                };
                (code, why.to_string())
            }
            Wire::WebSocket(link) => link.closed().await,
        }
    }

    /// The next delivery stream the broker opened; `None` once the
    /// connection is gone.
    async fn accept_delivery(&self) -> Option<StreamReader> {
        match self {
            Wire::Quic(conn) => conn.accept_uni().await.ok().map(StreamReader::Quic),
            Wire::WebSocket(link) => link
                .accept()
                .await
                .map(|recv| StreamReader::WebSocket(recv, link.clone())),
        }
    }

    fn close(&self, code: CloseCode) {
        match self {
            Wire::Quic(conn) => conn.close(VarInt::from_u32(code.0), code.reason().as_bytes()),
            Wire::WebSocket(link) => link.close(code),
        }
    }
}

/// The sending half of the control stream.
#[derive(Debug)]
enum ControlWriter {
    Quic(quinn::SendStream),
    WebSocket(Arc<WsLink>),
}

impl ControlWriter {
    async fn write_all(&mut self, bytes: &[u8]) -> Result<(), ClientError> {
        match self {
            ControlWriter::Quic(send) => send
                .write_all(bytes)
                .await
                .map_err(|_| ClientError::Disconnected),
            ControlWriter::WebSocket(link) => link.send_control(bytes).await,
        }
    }
}

/// A stream from the broker: the control stream's receiving half or a
/// delivery stream.
#[derive(Debug)]
enum StreamReader {
    Quic(quinn::RecvStream),
    WebSocket(WsRecv, Arc<WsLink>),
}

impl StreamReader {
    /// The next bytes; `None` once the stream or the connection ended.
    async fn next_chunk(&mut self) -> Option<bytes::Bytes> {
        match self {
            StreamReader::Quic(recv) => match recv.read_chunk(READ_CHUNK, true).await {
                Ok(Some(chunk)) => Some(chunk.bytes),
                _ => None,
            },
            StreamReader::WebSocket(recv, _) => recv.next_chunk().await,
        }
    }

    /// Tells the broker this stream is not wanted.
    fn stop(&mut self) {
        match self {
            StreamReader::Quic(recv) => {
                let _ = recv.stop(VarInt::from_u32(0));
            }
            StreamReader::WebSocket(recv, link) => link.stop(recv.stream),
        }
    }
}

/// A local UDP socket that clients connect through.
///
/// By default each [`Client`](crate::Client) binds its own. A process that
/// holds many connections — a backend service speaking for many users, a
/// load generator — shares a few among them instead: one socket, one
/// receive path and one file descriptor for all the connections on it.
/// Clone it into each [`ClientConfig::endpoint`]; the socket closes when
/// the last clone and the last connection through it are gone.
#[derive(Debug, Clone)]
pub struct Endpoint {
    quic: quinn::Endpoint,
    receive_buffer_bytes: usize,
}

impl Endpoint {
    /// Binds a socket on `addr` (port 0: any) with the system's default
    /// buffer sizes. An IPv6 address binds a dual-stack socket where the
    /// system allows (`[::]:0` reaches IPv4 and IPv6 brokers alike); an
    /// IPv4 one reaches IPv4 brokers only.
    pub fn bind(addr: SocketAddr) -> Result<Self, ClientError> {
        Self::bind_with_buffers(addr, None)
    }

    /// A socket on any port that reaches both address families: dual-stack
    /// `[::]`, or IPv4 only on a system without IPv6.
    pub fn bind_any() -> Result<Self, ClientError> {
        Self::bind((Ipv6Addr::UNSPECIFIED, 0).into())
            .or_else(|_| Self::bind((Ipv4Addr::UNSPECIFIED, 0).into()))
    }

    /// Binds a socket on `addr` asking for `buffer_bytes` of receive and
    /// send buffer: a socket shared by thousands of connections takes
    /// bursts (one broker message to all of them) that overflow the default
    /// ~200 KiB, and a dropped datagram costs a retransmission timeout. The
    /// kernel caps the request at `net.core.rmem_max`/`wmem_max`; see
    /// [`receive_buffer_bytes`](Self::receive_buffer_bytes) for the result.
    pub fn bind_with_buffers(
        addr: SocketAddr,
        buffer_bytes: Option<usize>,
    ) -> Result<Self, ClientError> {
        let bind_error = |e: std::io::Error| ClientError::Connect(format!("bind {addr}: {e}"));
        let socket = socket2::Socket::new(
            socket2::Domain::for_address(addr),
            socket2::Type::DGRAM,
            Some(socket2::Protocol::UDP),
        )
        .map_err(bind_error)?;
        if addr.is_ipv6() {
            // Dual-stack where the OS allows: "[::]" reaches IPv4 brokers too.
            socket.set_only_v6(false).map_err(bind_error)?;
        }
        if let Some(bytes) = buffer_bytes {
            socket.set_recv_buffer_size(bytes).map_err(bind_error)?;
            socket.set_send_buffer_size(bytes).map_err(bind_error)?;
        }
        socket.bind(&addr.into()).map_err(bind_error)?;
        let receive_buffer_bytes = socket.recv_buffer_size().map_err(bind_error)?;
        let quic = quinn::Endpoint::new(
            quinn::EndpointConfig::default(),
            None,
            socket.into(),
            Arc::new(quinn::TokioRuntime),
        )
        .map_err(bind_error)?;
        Ok(Self {
            quic,
            receive_buffer_bytes,
        })
    }

    /// The socket's receive buffer as the kernel granted it (Linux reports
    /// twice the usable size: it counts its own bookkeeping).
    pub fn receive_buffer_bytes(&self) -> usize {
        self.receive_buffer_bytes
    }

    /// The quinn endpoint underneath, for an application that also speaks
    /// its own QUIC protocols over the same socket.
    pub fn as_quinn(&self) -> &quinn::Endpoint {
        &self.quic
    }

    /// The local address the socket is bound to.
    pub fn local_addr(&self) -> Result<SocketAddr, ClientError> {
        self.quic
            .local_addr()
            .map_err(|e| ClientError::Connect(e.to_string()))
    }
}

/// One established connection.
#[derive(Debug)]
pub(crate) struct Live {
    pub welcome: Welcome,
    /// Tells this connection from every other of the process (never 0).
    pub generation: u64,
    /// The seed or URL it was made to.
    pub server: String,
    wire: Wire,
    /// Why the broker ended the connection: its close code, or a
    /// connection-level `Error` frame sent before it.
    ended_by: Mutex<EndedBy>,
    /// Boxed: the queue allocates slots in blocks of 32, and 32 unboxed
    /// frames cost every connection 2.8 KB.
    control: mpsc::Sender<Box<Frame>>,
    pending: Mutex<HashMap<u64, oneshot::Sender<Frame>>>,
    next_request: AtomicU64,
    /// Held from taking a request id to queueing its frame.
    queue_order: Mutex<()>,
    routes: Mutex<HashMap<SubscriptionId, Arc<SubShared>>>,
    route_added: Notify,
    gone: CancellationToken,
    /// The latest `TokenExpiring` notice: when the token expires.
    token_expiring: watch::Sender<Option<u64>>,
    /// Subscriptions the broker ended on its own, for the supervisor.
    /// Boxed: the queue's first block of 32 slots is allocated with it.
    ended_tx: mpsc::Sender<Box<Ended>>,
    /// Ended before their `Subscribed` reply was routed (the reply and the
    /// end arrive back to back): told to the subscribe when it routes.
    ended_early: Mutex<HashMap<SubscriptionId, (volna_proto::ErrorCode, String)>>,
    ended_rx: tokio::sync::Mutex<mpsc::Receiver<Box<Ended>>>,
    device: DeviceTaps,
}

/// How the broker ended a connection: its close code, and the
/// connection-level `Error` frame it sent before, if any.
type EndedBy = (Option<CloseCode>, Option<(volna_proto::ErrorCode, String)>);

/// A request whose caller may give up (its future dropped) before it takes
/// the reply.
struct Unanswered<'a> {
    live: &'a Live,
    id: u64,
    rx: oneshot::Receiver<Frame>,
    answered: bool,
}

impl Drop for Unanswered<'_> {
    fn drop(&mut self) {
        if self.answered {
            return;
        }
        self.live.pending_map().remove(&self.id);
        // The reply came just as the caller gave up: a subscription nobody
        // will read must not stay on the broker. (A reply still to come is
        // unclaimed and handled by the control reader.)
        if let Ok(Frame::Subscribed { subscription, .. }) = self.rx.try_recv() {
            self.live.send_nowait(|request_id| Frame::Unsubscribe {
                request_id,
                subscription,
            });
        }
    }
}

/// A subscription the broker ended on its own (`SubscriptionEnded`).
#[derive(Debug)]
pub(crate) struct Ended {
    pub sub: Arc<SubShared>,
    pub code: volna_proto::ErrorCode,
    pub message: String,
}

impl Live {
    fn start(
        wire: Wire,
        send: ControlWriter,
        recv: StreamReader,
        buf: BytesMut,
        welcome: Welcome,
        server: String,
        device: DeviceTaps,
    ) -> Arc<Self> {
        let (control, control_rx) = mpsc::channel(1024);
        let (ended_tx, ended_rx) = mpsc::channel(16);
        static GENERATIONS: AtomicU64 = AtomicU64::new(1);
        let live = Arc::new(Self {
            generation: GENERATIONS.fetch_add(1, Ordering::Relaxed),
            ended_tx,
            ended_rx: tokio::sync::Mutex::new(ended_rx),
            ended_early: Mutex::new(HashMap::new()),
            welcome,
            server,
            wire,
            ended_by: Mutex::new((None, None)),
            control,
            pending: Mutex::new(HashMap::new()),
            next_request: AtomicU64::new(1),
            queue_order: Mutex::new(()),
            routes: Mutex::new(HashMap::new()),
            route_added: Notify::new(),
            gone: CancellationToken::new(),
            token_expiring: watch::Sender::new(None),
            device,
        });
        tokio::spawn(write_control(send, control_rx, live.gone.clone()));
        tokio::spawn(read_control(live.clone(), recv, buf));
        tokio::spawn(accept_deliveries(live.clone()));
        let watcher = live.clone();
        tokio::spawn(async move {
            let (code, reason) = watcher.wire.closed().await;
            debug!(%reason, "connection closed");
            watcher.ended_by_map().0 = code;
            watcher.gone.cancel();
        });
        live
    }

    /// Sends a request built around a fresh request id and waits for its
    /// reply (a reply frame or an `Error`). Requests are sent in the order
    /// their `build` closures run.
    pub async fn request(&self, build: impl FnOnce(u64) -> Frame) -> Result<Frame, ClientError> {
        // Build the frame only once it has a place in the queue, so that
        // whatever `build` allocates (a producer sequence) is in queue order.
        let permit = self
            .control
            .reserve()
            .await
            .map_err(|_| ClientError::Disconnected)?;
        let (tx, rx) = oneshot::channel();
        let id = self.queue(permit, build, Some(tx));
        let mut waiting = Unanswered {
            live: self,
            id,
            rx,
            answered: false,
        };
        let reply = tokio::select! {
            reply = &mut waiting.rx => reply.map_err(|_| ClientError::Disconnected),
            () = self.gone.cancelled() => Err(ClientError::Disconnected),
        };
        waiting.answered = reply.is_ok();
        reply
    }

    /// Sends a request built around a fresh request id, whose answer (if
    /// any) nobody waits for; returns the id once the frame is queued.
    pub async fn send(&self, build: impl FnOnce(u64) -> Frame) -> Result<u64, ClientError> {
        let permit = self
            .control
            .reserve()
            .await
            .map_err(|_| ClientError::Disconnected)?;
        Ok(self.queue(permit, build, None))
    }

    /// Sends a frame whose reply nobody waits for, if the queue has room.
    pub fn send_nowait(&self, build: impl FnOnce(u64) -> Frame) {
        if let Ok(permit) = self.control.try_reserve() {
            self.queue(permit, build, None);
        }
    }

    /// Takes a request id and queues the frame built around it, as one
    /// step: ids reach the broker in the order they were taken, so a
    /// `Stored` answering one request covers every `Ack` of a lower id.
    fn queue(
        &self,
        permit: mpsc::Permit<'_, Box<Frame>>,
        build: impl FnOnce(u64) -> Frame,
        waiter: Option<oneshot::Sender<Frame>>,
    ) -> u64 {
        let _in_order = self.queue_order.lock().unwrap_or_else(|e| e.into_inner());
        let id = self.next_request.fetch_add(1, Ordering::Relaxed);
        if let Some(waiter) = waiter {
            self.pending_map().insert(id, waiter);
        }
        permit.send(Box::new(build(id)));
        id
    }

    /// Delivery streams of `id` feed `sub` from now on; or, when the broker
    /// already ended `id`, why.
    pub fn route(
        &self,
        id: SubscriptionId,
        sub: Arc<SubShared>,
    ) -> Result<(), (volna_proto::ErrorCode, String)> {
        let mut routes = self.routes_map();
        if let Some(ended) = self.early_map().remove(&id) {
            return Err(ended);
        }
        routes.insert(id, sub);
        drop(routes);
        self.route_added.notify_waiters();
        Ok(())
    }

    fn early_map(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<SubscriptionId, (volna_proto::ErrorCode, String)>> {
        self.ended_early.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits up to `within` until local subscription `local` is routed on
    /// this connection; whether it is.
    pub async fn wait_routed(&self, local: u64, within: std::time::Duration) -> bool {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let notified = self.route_added.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.routes_map().values().any(|s| s.id == local) {
                return true;
            }
            tokio::select! {
                () = notified => {}
                () = tokio::time::sleep_until(deadline) => return false,
                () = self.gone.cancelled() => return false,
            }
        }
    }

    /// Forgets the route of local subscription `local`, returning the
    /// broker's id for it.
    pub fn unroute(&self, local: u64) -> Option<SubscriptionId> {
        let mut routes = self.routes_map();
        let id = routes
            .iter()
            .find(|(_, s)| s.id == local)
            .map(|(id, _)| *id)?;
        routes.remove(&id);
        Some(id)
    }

    /// The next subscription the broker ended on its own.
    pub async fn next_ended(&self) -> Ended {
        match self.ended_rx.lock().await.recv().await {
            Some(ended) => *ended,
            // Never: `self` holds a sender.
            None => std::future::pending().await,
        }
    }

    /// Resolves with the token's expiry when the broker announces it.
    pub async fn token_expiring(&self) -> u64 {
        let mut rx = self.token_expiring.subscribe();
        loop {
            if let Some(expires_at) = *rx.borrow_and_update() {
                return expires_at;
            }
            if rx.changed().await.is_err() {
                return std::future::pending().await;
            }
        }
    }

    /// Forgets the last expiry notice (a refresh answers it).
    pub fn token_refreshed(&self) {
        self.token_expiring.send_replace(None);
    }

    /// Why the broker ended this connection for good, if it did: another
    /// connection of the same device took over. Such a client must not
    /// reconnect (the two would take over from each other forever).
    pub async fn final_end(&self) -> Option<ClientError> {
        // The loss may be noticed (a delivery stream or the control stream
        // ending) before the close and its code are read.
        if let Ok((Some(code), _)) =
            tokio::time::timeout(CLOSE_REASON_WAIT, self.wire.closed()).await
        {
            self.ended_by_map().0 = Some(code);
        }
        let ended_by = self.ended_by_map();
        let replaced = ended_by.0 == Some(CloseCode::REPLACED)
            || ended_by
                .1
                .as_ref()
                .is_some_and(|(code, _)| *code == volna_proto::ErrorCode::Replaced);
        replaced.then(|| ClientError::Refused {
            code: volna_proto::ErrorCode::Replaced,
            message: ended_by
                .1
                .as_ref()
                .map(|(_, message)| message.clone())
                .unwrap_or_else(|| CloseCode::REPLACED.reason().to_owned()),
        })
    }

    fn ended_by_map(&self) -> std::sync::MutexGuard<'_, EndedBy> {
        self.ended_by.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn is_gone(&self) -> bool {
        self.gone.is_cancelled()
    }

    pub async fn gone(&self) {
        self.gone.cancelled().await;
    }

    pub fn close(&self, code: CloseCode) {
        self.wire.close(code);
        self.gone.cancel();
    }

    /// Resolves once a WebSocket's close frame was written (bounded by
    /// the writer's own timeout); at once for QUIC, whose last packets
    /// the endpoint sends ([`Transport::wait_closed`]).
    pub async fn close_written(&self) {
        if let Wire::WebSocket(link) = &self.wire {
            link.close_written().await;
        }
    }

    /// Whether this connection runs over WebSocket (the QUIC fallback).
    pub fn over_websocket(&self) -> bool {
        matches!(self.wire, Wire::WebSocket(_))
    }

    fn pending_map(&self) -> std::sync::MutexGuard<'_, HashMap<u64, oneshot::Sender<Frame>>> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn routes_map(&self) -> std::sync::MutexGuard<'_, HashMap<SubscriptionId, Arc<SubShared>>> {
        self.routes.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn limits(&self) -> Limits {
        Limits {
            max_frame: self.welcome.max_frame.max(Limits::HANDSHAKE.max_frame),
        }
    }
}

async fn write_control(
    mut send: ControlWriter,
    mut rx: mpsc::Receiver<Box<Frame>>,
    gone: CancellationToken,
) {
    // Small to start: most connections send a few requests and sit idle;
    // a busy publisher's buffer grows once and is reused.
    let mut buf = BytesMut::with_capacity(1024);
    loop {
        let frame = tokio::select! {
            frame = rx.recv() => frame,
            () = gone.cancelled() => None,
        };
        let Some(frame) = frame else { break };
        volna_proto::encode(&frame, &mut buf);
        while buf.len() < 64 * 1024 {
            match rx.try_recv() {
                Ok(frame) => volna_proto::encode(&frame, &mut buf),
                Err(_) => break,
            }
        }
        if send.write_all(&buf).await.is_err() {
            break;
        }
        buf.clear();
    }
    gone.cancel();
}

async fn read_control(live: Arc<Live>, mut recv: StreamReader, mut buf: BytesMut) {
    let limits = live.limits();
    loop {
        let frame = tokio::select! {
            frame = read_frame(&mut recv, &mut buf, &limits) => frame,
            () = live.gone.cancelled() => break,
        };
        match frame {
            Ok(Frame::Error(e)) if e.request_id == 0 => {
                warn!(code = %e.code, message = %e.message, "the broker reported a connection error");
                live.ended_by_map().1 = Some((e.code, e.message));
            }
            Ok(Frame::TokenExpiring { expires_at }) => {
                live.token_expiring.send_replace(Some(expires_at));
            }
            Ok(Frame::ReadMarker { channel, offset }) => {
                if let Some(markers) = &live.device.markers {
                    // Nobody listening is fine: the event is a hint.
                    let _ = markers.send(ReadMarker { channel, offset });
                }
            }
            Ok(Frame::SubscriptionEnded {
                subscription,
                code,
                message,
            }) => {
                let routed = {
                    let mut routes = live.routes_map();
                    let routed = routes.remove(&subscription);
                    if routed.is_none() {
                        // Not routed yet (its subscribe is about to), or
                        // dropped by the application meanwhile: kept, in a
                        // bounded table, for the subscribe to find.
                        let mut early = live.early_map();
                        if early.len() >= ENDED_EARLY_MAX {
                            early.clear();
                        }
                        early.insert(subscription, (code, message.clone()));
                    }
                    routed
                };
                let Some(sub) = routed else {
                    continue;
                };
                debug!(channel = %sub.channel, %code, %message, "the broker ended a subscription");
                let ended = Ended { sub, code, message };
                if live.ended_tx.send(Box::new(ended)).await.is_err() {
                    break;
                }
            }
            Ok(frame) => {
                let waiter = frame
                    .request_id()
                    .and_then(|id| live.pending_map().remove(&id));
                let unclaimed = match waiter {
                    Some(waiter) => waiter.send(frame).err(),
                    None => Some(frame),
                };
                // Nobody waits on an `Ack` (protocol 5): a report of
                // stored ones, or the refusal of one.
                let unclaimed = match (unclaimed, &live.device.acks) {
                    (Some(Frame::Stored { request_id }), Some(acks)) => {
                        acks.reported(live.generation, request_id);
                        None
                    }
                    (Some(Frame::Error(e)), Some(acks)) => {
                        let final_error = (!e.code.is_retryable()).then(|| ClientError::Server {
                            code: e.code,
                            message: e.message.clone(),
                        });
                        if acks.failed(live.generation, e.request_id, final_error) {
                            warn!(code = %e.code, message = %e.message, "the broker did not take an acknowledgement");
                            None
                        } else {
                            Some(Frame::Error(e))
                        }
                    }
                    (unclaimed, _) => unclaimed,
                };
                // A subscribe whose caller has gone (cancelled while the
                // request was in flight): nobody will read it, so the
                // broker must not keep it, holding a stream and blocking
                // the next subscribe to the channel.
                if let Some(Frame::Subscribed { subscription, .. }) = unclaimed {
                    debug!(%subscription, "unsubscribing a subscribe nobody waits for");
                    live.send_nowait(|request_id| Frame::Unsubscribe {
                        request_id,
                        subscription,
                    });
                }
            }
            Err(e) => {
                debug!(error = %e, "control stream ended");
                break;
            }
        }
    }
    live.gone.cancel();
    live.pending_map().clear();
}

async fn accept_deliveries(live: Arc<Live>) {
    loop {
        let stream = tokio::select! {
            stream = live.wire.accept_delivery() => stream,
            () = live.gone.cancelled() => return,
        };
        match stream {
            Some(recv) => {
                tokio::spawn(read_deliveries(live.clone(), recv));
            }
            None => {
                live.gone.cancel();
                return;
            }
        }
    }
}

async fn read_deliveries(live: Arc<Live>, mut recv: StreamReader) {
    let limits = live.limits();
    let mut buf = BytesMut::new();
    let id = match read_frame(&mut recv, &mut buf, &limits).await {
        Ok(Frame::StreamHeader { subscription }) => subscription,
        Ok(other) => return warn!(frame = ?other.frame_type(), "delivery stream without a header"),
        Err(_) => return,
    };
    // The stream may arrive before the Subscribed reply was processed; one
    // that no subscription claims (its subscribe was cancelled) is stopped,
    // which ends it on the broker too.
    let unclaimed_after = tokio::time::Instant::now() + UNCLAIMED_STREAM;
    let sub = loop {
        let notified = live.route_added.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if let Some(sub) = live.routes_map().get(&id).cloned() {
            break sub;
        }
        tokio::select! {
            () = notified => {}
            () = tokio::time::sleep_until(unclaimed_after) => {
                debug!(subscription = %id, "stopping a delivery stream no subscription claims");
                recv.stop();
                return;
            }
            () = live.gone.cancelled() => return,
        }
    };
    let _feeding = sub.delivery.lock().await;
    loop {
        let frame = tokio::select! {
            frame = read_frame(&mut recv, &mut buf, &limits) => frame,
            () = live.gone.cancelled() => return,
        };
        match frame {
            Ok(frame) => {
                if !sub.deliver(frame).await {
                    return;
                }
            }
            Err(_) => return,
        }
    }
}

/// Subscriptions remembered as ended before they were routed.
const ENDED_EARLY_MAX: usize = 256;

/// How long a delivery stream may wait for the `Subscribed` reply that
/// routes it before it counts as nobody's.
const UNCLAIMED_STREAM: std::time::Duration = std::time::Duration::from_secs(2);

/// Most bytes taken from a stream at once.
const READ_CHUNK: usize = 64 * 1024;
/// A drained read buffer with more room than this is let go before the
/// next read: an idle connection then holds no buffer at all, and a busy
/// one allocates one per chunk it reads (the decoded frames share it).
const IDLE_BUFFER: usize = 2 * 1024;

/// The next frame of `recv`. Waits on quinn's own buffered chunks rather
/// than on room reserved in `buf`, so a waiting stream holds nothing.
async fn read_frame(
    recv: &mut StreamReader,
    buf: &mut BytesMut,
    limits: &Limits,
) -> Result<Frame, ClientError> {
    loop {
        if let Some(frame) =
            volna_proto::decode(buf, limits).map_err(|e| ClientError::Protocol(e.to_string()))?
        {
            return Ok(frame);
        }
        if buf.is_empty() && buf.capacity() > IDLE_BUFFER {
            *buf = BytesMut::new();
        }
        match recv.next_chunk().await {
            Some(chunk) => buf.extend_from_slice(&chunk),
            None => return Err(ClientError::Disconnected),
        }
    }
}

fn split_host_port(server: &str) -> Result<(String, u16), ClientError> {
    let bad = || ClientError::InvalidAddress(server.to_owned());
    let (host, port) = server.rsplit_once(':').ok_or_else(bad)?;
    let port = port.parse().map_err(|_| bad())?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return Err(bad());
    }
    Ok((host.to_owned(), port))
}

fn tls_config(
    trust: &Trust,
    certificate: Option<&ClientCertificate>,
) -> Result<rustls::ClientConfig, ClientError> {
    // TLS_AES_128_GCM_SHA256 offered first: its key schedule runs on
    // SHA-256, which CPUs accelerate; the default first suite's SHA-384
    // does not (the broker prefers it too).
    let mut provider = rustls::crypto::ring::default_provider();
    provider
        .cipher_suites
        .sort_by_key(|suite| suite.suite() != rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
    let provider = Arc::new(provider);
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| ClientError::Tls(e.to_string()))?;
    let tls = match trust {
        Trust::WebPki => {
            let roots = RootCertStore {
                roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
            };
            with_client_auth(builder.with_root_certificates(roots), certificate)?
        }
        Trust::CaFile(path) => {
            let mut roots = RootCertStore::empty();
            let certs = CertificateDer::pem_file_iter(path)
                .map_err(|e| ClientError::Tls(format!("{}: {e}", path.display())))?;
            for cert in certs {
                let cert =
                    cert.map_err(|e| ClientError::Tls(format!("{}: {e}", path.display())))?;
                roots
                    .add(cert)
                    .map_err(|e| ClientError::Tls(format!("{}: {e}", path.display())))?;
            }
            if roots.is_empty() {
                return Err(ClientError::Tls(format!(
                    "{}: no certificate",
                    path.display()
                )));
            }
            with_client_auth(builder.with_root_certificates(roots), certificate)?
        }
        Trust::Pinned(fingerprint) => with_client_auth(
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(PinnedCert {
                    fingerprint: *fingerprint,
                    provider,
                })),
            certificate,
        )?,
    };
    Ok(tls)
}

fn with_client_auth(
    builder: rustls::ConfigBuilder<rustls::ClientConfig, rustls::client::WantsClientCert>,
    certificate: Option<&ClientCertificate>,
) -> Result<rustls::ClientConfig, ClientError> {
    let Some(certificate) = certificate else {
        return Ok(builder.with_no_client_auth());
    };
    let tls_err = |path: &std::path::Path, e: &dyn std::fmt::Display| {
        ClientError::Tls(format!("{}: {e}", path.display()))
    };
    let chain = CertificateDer::pem_file_iter(&certificate.cert)
        .map_err(|e| tls_err(&certificate.cert, &e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| tls_err(&certificate.cert, &e))?;
    let key = rustls::pki_types::PrivateKeyDer::from_pem_file(&certificate.key)
        .map_err(|e| tls_err(&certificate.key, &e))?;
    builder
        .with_client_auth_cert(chain, key)
        .map_err(|e| tls_err(&certificate.cert, &e))
}

/// The SHA-256 fingerprint of a certificate's DER bytes, as pinned by
/// [`Trust::Pinned`].
pub fn fingerprint(cert_der: &[u8]) -> [u8; 32] {
    Sha256::digest(cert_der).into()
}

/// Accepts exactly one certificate, by fingerprint; handshake signatures are
/// still verified against that certificate's key.
#[derive(Debug)]
struct PinnedCert {
    fingerprint: [u8; 32],
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl ServerCertVerifier for PinnedCert {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if fingerprint(end_entity) == self.fingerprint {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::ApplicationVerificationFailure,
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().expect("address")
    }

    #[test]
    fn resolved_addresses_alternate_families_from_the_first() {
        let (v6a, v6b) = (addr("[::1]:1"), addr("[::2]:1"));
        let (v4a, v4b, v4c) = (
            addr("127.0.0.1:1"),
            addr("127.0.0.2:1"),
            addr("127.0.0.3:1"),
        );
        assert_eq!(
            interleave_families(vec![v6a, v6b, v4a, v4b, v4c]),
            [v6a, v4a, v6b, v4b, v4c]
        );
        assert_eq!(interleave_families(vec![v4a, v6a, v4b]), [v4a, v6a, v4b]);
        assert_eq!(interleave_families(Vec::new()), []);
    }

    /// The next address starts while the first hangs (a family that does
    /// not route), at once when the first fails; the first success wins.
    #[tokio::test]
    async fn happy_eyeballs_tries_the_next_address_while_one_hangs_or_fails() {
        let (hangs, answers) = (addr("[::1]:1"), addr("127.0.0.1:1"));
        let stagger = std::time::Duration::from_millis(100);
        let started = tokio::time::Instant::now();
        let won = race(vec![hangs, answers], stagger, |a| async move {
            if a == hangs {
                std::future::pending::<()>().await;
            }
            Ok(a)
        })
        .await;
        assert_eq!(won.ok(), Some(answers));
        assert!(started.elapsed() >= stagger);

        let started = tokio::time::Instant::now();
        let won = race(
            vec![hangs, answers],
            std::time::Duration::from_secs(60),
            |a| async move {
                if a == hangs {
                    return Err(ClientError::Connect("unreachable".into()));
                }
                Ok(a)
            },
        )
        .await;
        assert_eq!(won.ok(), Some(answers));
        assert!(started.elapsed() < std::time::Duration::from_secs(5));

        let lost: Result<SocketAddr, _> = race(vec![hangs, answers], stagger, |a| async move {
            Err(ClientError::Connect(a.to_string()))
        })
        .await;
        assert!(matches!(lost, Err(ClientError::Connect(last)) if last == answers.to_string()));
    }

    #[test]
    fn host_and_port_are_split() {
        assert_eq!(
            split_host_port("127.0.0.1:7400").ok(),
            Some(("127.0.0.1".to_owned(), 7400))
        );
        assert_eq!(
            split_host_port("[::1]:7400").ok(),
            Some(("::1".to_owned(), 7400))
        );
        assert_eq!(
            split_host_port("volna.example:1").ok(),
            Some(("volna.example".to_owned(), 1))
        );
        assert!(split_host_port("nope").is_err());
        assert!(split_host_port(":7400").is_err());
        assert!(split_host_port("host:99999").is_err());
    }
}
