//! The WebSocket transport: the same sessions as QUIC for browsers and for
//! networks that block UDP, on its own TCP listener (`[websocket]`).
//!
//! ```text
//!  TCP ─TLS─▶ upgrade (/ws) ─▶ reader task ──stream 0──▶ control recv ─▶ session
//!                              writer task ◀── one bounded queue ◀── control send
//!                                                        ▲        ◀── delivery streams
//!                                 per-stream message permits ┘
//! ```
//!
//! QUIC's streams become tagged binary messages (`volna_proto::websocket`):
//! the control stream is stream 0, each delivery stream the next number.
//! The session runs unchanged behind the [`Connection`] seam.
//!
//! Invariants:
//! - A WebSocket is one ordered byte stream, so a subscription that cannot
//!   keep up must not hold the others back: each delivery stream may have
//!   at most `websocket.stream_queue_messages` messages (≤ 64 KiB each)
//!   queued for the socket. Beyond that its sink waits, the subscription
//!   falls behind its live queue and is served from the log (G4), as a
//!   QUIC stream whose flow-control window is full would be; the control
//!   stream and the other subscriptions keep their own permits.
//! - Nothing is read from the socket while the session does not take
//!   control bytes (its in-flight limit): TCP pushes back on the client.
//! - Admission (the broker-wide caps and the per-address handshake rate),
//!   the hello timeout, TLS (same certificate, reloaded on SIGHUP, mutual
//!   TLS when configured) are QUIC's.
//! - A browser page reaches the broker only from an allowed origin: the
//!   upgrade's `Origin` header must be the broker's own console or one of
//!   `websocket.allowed_origins` (`"*"`: any), else the upgrade is
//!   answered 403 and counted (`websocket_upgrades_refused_total{reason=
//!   "origin"}`); nothing of the session runs. A request without `Origin`
//!   is not from a page (the Rust client, Node, native apps) and is
//!   served: the check protects a visitor's browser from other sites'
//!   scripts, not the broker from clients, which tokens do.
//! - A client certificate grants nothing over WebSocket unless
//!   `websocket.client_certificates = "service"`: a browser presents a
//!   person's installed certificate to whatever page asks, so by default
//!   TLS still verifies it but the session authenticates with its token
//!   ([`Connection::peer_identity`] is `None`). QUIC is unchanged.
//!
//! The console's origin is `http://` (the HTTP listener has no TLS) and
//! the HTTP listener's bound port, with every host name a browser on the
//! broker's machine may use to reach that listener: its IP address as
//! bound, and for a loopback or unspecified address `localhost` and the
//! loopback addresses it can accept (an operator opens the console as
//! `http://localhost:7401/console` as often as by `127.0.0.1`, and the
//! browser's `Origin` is whatever name is in its address bar). A console
//! opened by another name (the machine's DNS name, an address behind
//! `0.0.0.0`, a reverse proxy) must be listed in `allowed_origins`: the
//! broker cannot know which of its names is meant, and accepting any host
//! on that port would accept other machines' pages.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::task::JoinHandle;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::{HeaderValue, StatusCode, header};
use tokio_tungstenite::tungstenite::protocol::frame::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::{Message, WebSocketConfig};
use tokio_util::sync::{CancellationToken, PollSemaphore};
use tracing::{Instrument, debug, info_span, warn};
use volna_proto::CloseCode;
use volna_proto::websocket::{
    self as ws, CONTROL_STREAM, PATH, SUBPROTOCOL, decode_message, encode_frames, encode_message,
};

use crate::config::{ConfigError, WebOrigin, WebSocketCertificates, WebSocketConfig as Settings};
use crate::limits::Admission;
use crate::metrics::Metrics;
use crate::session::{BrokerContext, Connection};
use crate::subscription::{DeliverySink, SinkError};
use crate::transport::TransportError;

/// The most bytes of whole frames put in one message (a larger frame goes
/// alone): large enough for a delivery batch, small enough that one
/// stream's message does not hold the socket long.
const MESSAGE_BYTES: usize = 64 * 1024;
/// Control messages queued for the socket before the session's writes
/// wait (the session itself stops reading requests beyond its own bound).
const CONTROL_MESSAGES: u32 = 16;
/// Control-stream bytes read from the socket and not yet taken by the
/// session, in messages.
const CONTROL_INBOX: usize = 16;
/// The WebSocket read buffer a connection starts with.
const READ_BUFFER: usize = 2 * 1024;
/// How long a closing connection waits for its last frames and the close
/// frame to be written.
const CLOSE_FLUSH: Duration = Duration::from_secs(2);

/// The WebSocket listener and the connections it accepted.
pub struct WebSocketEndpoint {
    listener: Option<TcpListener>,
    local_addr: SocketAddr,
    tls: Option<tokio_rustls::TlsAcceptor>,
    stream_queue: u32,
    open: Arc<OpenConnections>,
    stop: CancellationToken,
}

/// How many connections are open, for a shutdown that waits for them.
#[derive(Debug, Default)]
struct OpenConnections {
    count: AtomicUsize,
    idle: Notify,
}

/// Counts one connection while it lives.
struct OpenGuard(Arc<OpenConnections>);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        if self.0.count.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

impl std::fmt::Debug for WebSocketEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebSocketEndpoint")
            .field("local_addr", &self.local_addr)
            .field("tls", &self.tls.is_some())
            .finish_non_exhaustive()
    }
}

impl WebSocketEndpoint {
    /// Binds `addr`; `tls` is the broker's TLS configuration (its ALPN is
    /// replaced by HTTP/1.1), `None` serves plain `ws://`.
    pub async fn bind(
        addr: SocketAddr,
        tls: Option<rustls::ServerConfig>,
        stream_queue: u32,
    ) -> Result<Self, TransportError> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| TransportError::WebSocketBind { addr, source })?;
        let local_addr = listener
            .local_addr()
            .map_err(|source| TransportError::WebSocketBind { addr, source })?;
        let tls = tls.map(|mut config| {
            config.alpn_protocols = vec![b"http/1.1".to_vec()];
            tokio_rustls::TlsAcceptor::from(Arc::new(config))
        });
        Ok(Self {
            listener: Some(listener),
            local_addr,
            tls,
            stream_queue,
            open: Arc::default(),
            stop: CancellationToken::new(),
        })
    }

    /// The TCP address connections are accepted on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Accepts connections until the broker shuts down, each running a
    /// session with `ctx`; upgrades from browser pages are served only
    /// from `origins`.
    pub fn serve(&mut self, ctx: Arc<BrokerContext>, origins: OriginPolicy) -> JoinHandle<()> {
        let origins = Arc::new(origins);
        let listener = self.listener.take();
        let tls = self.tls.clone();
        let open = self.open.clone();
        let stop = self.stop.clone();
        let stream_queue = self.stream_queue;
        tokio::spawn(async move {
            let Some(listener) = listener else { return };
            loop {
                let accepted = tokio::select! {
                    () = ctx.shutdown.cancelled() => return,
                    accepted = listener.accept() => accepted,
                };
                let (tcp, remote) = match accepted {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        // Out of file descriptors and the like: the
                        // listener itself is fine; wait a moment.
                        warn!(error = %e, "accepting a WebSocket connection failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let slot = match ctx.limiter.admit_connection(true) {
                    Admission::Accept(slot) if ctx.limiter.admit_handshake(remote.ip()) => slot,
                    _ => {
                        ctx.metrics.handshakes_refused.inc();
                        continue;
                    }
                };
                open.count.fetch_add(1, Ordering::SeqCst);
                let guard = OpenGuard(open.clone());
                let accept = Accepted {
                    tcp,
                    remote,
                    tls: tls.clone(),
                    origins: origins.clone(),
                    stream_queue,
                    stop: stop.clone(),
                };
                let span = info_span!("ws", %remote);
                let ctx = ctx.clone();
                tokio::spawn(
                    async move {
                        let mut slot = slot;
                        accept.run(ctx, &mut slot).await;
                        drop(slot);
                        drop(guard);
                    }
                    .instrument(span),
                );
            }
        })
    }

    /// Resolves once every connection has ended.
    pub async fn wait_idle(&self) {
        loop {
            let idle = self.open.idle.notified();
            if self.open.count.load(Ordering::SeqCst) == 0 {
                return;
            }
            idle.await;
        }
    }

    /// Closes every connection still open with "going away" (after
    /// shutdown's grace period).
    pub fn close(&self) {
        self.stop.cancel();
    }
}

impl Drop for WebSocketEndpoint {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Which web pages may open a WebSocket to the broker: the check of the
/// upgrade's `Origin` header (see the module's invariants).
#[derive(Debug, Clone)]
pub struct OriginPolicy {
    /// `"*"` was configured: every origin is allowed.
    any: bool,
    /// The console's origins and the configured ones.
    allowed: Vec<WebOrigin>,
}

impl OriginPolicy {
    /// The console at the HTTP listener's bound address `http` and
    /// `settings.allowed_origins`; an entry that is not an origin is
    /// refused as [`crate::config::Config::validate`] refuses it.
    pub fn new(settings: &Settings, http: SocketAddr) -> Result<Self, ConfigError> {
        let mut policy = Self {
            any: false,
            allowed: console_origins(http),
        };
        for entry in &settings.allowed_origins {
            if entry == "*" {
                policy.any = true;
                continue;
            }
            let origin = WebOrigin::parse(entry).map_err(|why| ConfigError::Invalid {
                key: "websocket.allowed_origins".into(),
                value: entry.clone(),
                why,
            })?;
            policy.allowed.push(origin);
        }
        Ok(policy)
    }

    /// Whether an upgrade with these `Origin` header values may proceed;
    /// the error is the reason sent back with the 403.
    fn check<'a>(
        &self,
        mut origins: impl Iterator<Item = &'a HeaderValue>,
    ) -> Result<(), &'static str> {
        let Some(origin) = origins.next() else {
            // Not a browser: browsers always send Origin on a WebSocket
            // upgrade (Fetch, "websocket" mode).
            return Ok(());
        };
        if origins.next().is_some() {
            return Err("an upgrade carries one Origin header\n");
        }
        if self.any {
            return Ok(());
        }
        // "null" (a sandboxed page, a file) and anything unparsable match
        // no entry.
        let allowed = origin
            .to_str()
            .ok()
            .and_then(|text| WebOrigin::parse(text).ok())
            .is_some_and(|origin| self.allowed.contains(&origin));
        if allowed {
            Ok(())
        } else {
            Err("this page's origin may not connect to the broker (websocket.allowed_origins)\n")
        }
    }
}

/// The origins a browser on the broker's machine gives the console page
/// served by the HTTP listener bound at `http` (see the module doc).
fn console_origins(http: SocketAddr) -> Vec<WebOrigin> {
    use std::net::IpAddr;
    let port = http.port();
    let host = |ip: IpAddr| match ip {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => format!("[{v6}]"),
    };
    let mut hosts = Vec::new();
    let ip = http.ip();
    if ip.is_unspecified() {
        // 0.0.0.0 takes IPv4 only; [::] takes IPv6 and, on a dual-stack
        // socket (Linux's default), IPv4 too.
        hosts.push("127.0.0.1".to_owned());
        if ip.is_ipv6() {
            hosts.push("[::1]".to_owned());
        }
        hosts.push("localhost".to_owned());
    } else {
        hosts.push(host(ip));
        // Browsers resolve `localhost` to the loopback addresses
        // themselves and try each, so it reaches a loopback listener.
        if ip.is_loopback() {
            hosts.push("localhost".to_owned());
        }
    }
    hosts
        .iter()
        .map(|host| WebOrigin::new("http", host, port))
        .collect()
}

/// The session identity a verified client certificate named `name` gives
/// over WebSocket under `grants`.
fn certificate_identity(grants: WebSocketCertificates, name: Option<String>) -> Option<String> {
    match grants {
        WebSocketCertificates::Service => name,
        WebSocketCertificates::Token => {
            if let Some(name) = name {
                debug!(
                    certificate = %name,
                    "client certificate over WebSocket: the token decides (websocket.client_certificates = \"token\")"
                );
            }
            None
        }
    }
}

/// An accepted TCP connection on its way to a session.
struct Accepted {
    tcp: TcpStream,
    remote: SocketAddr,
    tls: Option<tokio_rustls::TlsAcceptor>,
    origins: Arc<OriginPolicy>,
    stream_queue: u32,
    stop: CancellationToken,
}

impl Accepted {
    async fn run(self, ctx: Arc<BrokerContext>, slot: &mut crate::limits::ConnectionSlot) {
        let _ = self.tcp.set_nodelay(true);
        // tungstenite's read buffer is allocated up front (128 KiB by
        // default): an idle device's connection holds a small one that
        // grows while large messages come in.
        let config = WebSocketConfig::default()
            .read_buffer_size(READ_BUFFER)
            .max_message_size(Some(ctx.config.limits.max_frame() as usize + ws::TAG_LEN))
            .max_frame_size(Some(ctx.config.limits.max_frame() as usize + ws::TAG_LEN));
        let link = Link {
            remote: self.remote,
            stream_queue: self.stream_queue,
            stop: self.stop,
        };
        let within = ctx.config.hello_timeout();
        let origins = &*self.origins;
        let metrics = &*ctx.metrics;
        let grants = ctx.config.websocket.client_certificates;
        match self.tls {
            Some(acceptor) => {
                let handshake = async {
                    let tls = acceptor.accept(self.tcp).await?;
                    let peer = tls
                        .get_ref()
                        .1
                        .peer_certificates()
                        .and_then(|chain| chain.first())
                        .map(crate::tls::client_identity);
                    let ws = upgrade(tls, config, origins, metrics).await?;
                    Ok::<_, io::Error>((ws, peer))
                };
                // Boxed: the handshake's state (TLS and HTTP) is freed
                // once it is done instead of sizing the connection's task
                // for its whole life (heaptrack: ~4 KB per idle
                // connection).
                match Box::pin(tokio::time::timeout(within, handshake)).await {
                    Ok(Ok((ws, peer))) => {
                        slot.established();
                        let peer = certificate_identity(grants, peer);
                        link.serve(ctx, ws, peer).await;
                    }
                    Ok(Err(e)) => debug!(error = %e, "WebSocket handshake failed"),
                    Err(_) => debug!("WebSocket handshake timed out"),
                }
            }
            None => match Box::pin(tokio::time::timeout(
                within,
                upgrade(self.tcp, config, origins, metrics),
            ))
            .await
            {
                Ok(Ok(ws)) => {
                    slot.established();
                    link.serve(ctx, ws, None).await;
                }
                Ok(Err(e)) => debug!(error = %e, "WebSocket handshake failed"),
                Err(_) => debug!("WebSocket handshake timed out"),
            },
        }
    }
}

/// The HTTP upgrade: only [`PATH`], only from `origins`; the subprotocol
/// is echoed when offered. Refusals are counted in `metrics`.
async fn upgrade<S>(
    stream: S,
    config: WebSocketConfig,
    origins: &OriginPolicy,
    metrics: &Metrics,
) -> io::Result<WebSocketStream<S>>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    #[allow(clippy::result_large_err)] // tungstenite's callback signature
    let check = |request: &Request, mut response: Response| -> Result<Response, ErrorResponse> {
        if request.uri().path() != PATH {
            metrics
                .websocket_upgrades_refused
                .with_label_values(&["path"])
                .inc();
            return Err(refusal(
                StatusCode::NOT_FOUND,
                format!("WebSocket endpoint is {PATH}\n"),
            ));
        }
        if let Err(why) = origins.check(request.headers().get_all(header::ORIGIN).iter()) {
            metrics
                .websocket_upgrades_refused
                .with_label_values(&["origin"])
                .inc();
            debug!(
                origin = ?request.headers().get(header::ORIGIN),
                "WebSocket upgrade from a page of another origin refused"
            );
            return Err(refusal(StatusCode::FORBIDDEN, why.to_owned()));
        }
        let offered = request
            .headers()
            .get_all(header::SEC_WEBSOCKET_PROTOCOL)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|p| p.trim() == SUBPROTOCOL);
        if offered {
            response.headers_mut().insert(
                header::SEC_WEBSOCKET_PROTOCOL,
                HeaderValue::from_static(SUBPROTOCOL),
            );
        }
        Ok(response)
    };
    tokio_tungstenite::accept_hdr_async_with_config(stream, check, Some(config))
        .await
        .map_err(io::Error::other)
}

/// A refused upgrade's answer: `status` and a one-line `reason`, after
/// which the connection closes.
fn refusal(status: StatusCode, reason: String) -> ErrorResponse {
    let length = HeaderValue::from(reason.len());
    let mut refused = ErrorResponse::new(Some(reason));
    *refused.status_mut() = status;
    let headers = refused.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    headers.insert(header::CONTENT_LENGTH, length);
    headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
    refused
}

/// What one connection's session runs over, before it is split.
struct Link {
    remote: SocketAddr,
    stream_queue: u32,
    stop: CancellationToken,
}

impl Link {
    async fn serve<S>(
        self,
        ctx: Arc<BrokerContext>,
        socket: WebSocketStream<S>,
        peer: Option<String>,
    ) where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        ctx.metrics.websocket_handshakes.inc();
        ctx.metrics.websocket_connections.inc();
        let stream_limit =
            ctx.config.limits.max_subscriptions as usize * self.stream_queue as usize;
        let (tx, rx) = mpsc::channel(CONTROL_MESSAGES as usize + stream_limit);
        let (control_tx, control_rx) = mpsc::channel(CONTROL_INBOX);
        let shared = Arc::new(Shared::new(
            tx,
            self.stream_queue as usize,
            self.remote,
            peer,
        ));
        let (sink, stream) = socket.split();
        let idle = Duration::from_millis(ctx.config.limits.idle_timeout_ms);
        let writer = tokio::spawn(write_loop(sink, rx, shared.clone(), idle / 3));
        let reader = tokio::spawn(read_loop(stream, control_tx, shared.clone(), idle));
        let control_permits = Arc::new(Semaphore::new(CONTROL_MESSAGES as usize));
        let send = WsControlSend {
            shared: shared.clone(),
            permits: PollSemaphore::new(control_permits.clone()),
            all_permits: control_permits,
        };
        let recv = WsControlRecv {
            rx: control_rx,
            current: Bytes::new(),
        };
        let conn = Arc::new(WsConnection {
            shared: shared.clone(),
        });
        tokio::select! {
            () = crate::session::run(ctx.clone(), conn, recv, send) => {}
            () = self.stop.cancelled() => shared.close(CloseCode::GOING_AWAY, CloseCode::GOING_AWAY.reason()),
        }
        // The session closed the connection: the writer sends what is
        // queued and the close frame, bounded.
        shared.close(CloseCode::NORMAL, CloseCode::NORMAL.reason());
        if tokio::time::timeout(CLOSE_FLUSH + CLOSE_FLUSH, writer)
            .await
            .is_err()
        {
            debug!("the WebSocket writer did not finish in time");
        }
        shared.gone.cancel();
        reader.abort();
        ctx.metrics.websocket_connections.dec();
    }
}

/// A message for the writer and the permit it holds until written.
/// Queued boxed: the queue allocates its slots in blocks of 32, and 32
/// unboxed messages cost every idle connection 1.5 KB.
struct Outgoing {
    message: Bytes,
    _permit: OwnedSemaphorePermit,
}

/// What a connection's halves share.
struct Shared {
    tx: mpsc::Sender<Box<Outgoing>>,
    /// Open delivery streams: fired when the client stops one.
    streams: Mutex<HashMap<u32, CancellationToken>>,
    next_stream: AtomicU32,
    /// The socket failed or the connection ended.
    gone: CancellationToken,
    /// A close was asked for (the code in `close_frame`).
    closing: CancellationToken,
    close_frame: Mutex<Option<(CloseCode, String)>>,
    stream_queue: usize,
    remote: SocketAddr,
    /// The client certificate's identity, only when it grants one
    /// (`websocket.client_certificates = "service"`).
    peer: Option<String>,
}

impl Shared {
    fn new(
        tx: mpsc::Sender<Box<Outgoing>>,
        stream_queue: usize,
        remote: SocketAddr,
        peer: Option<String>,
    ) -> Self {
        Self {
            tx,
            streams: Mutex::new(HashMap::new()),
            next_stream: AtomicU32::new(1),
            gone: CancellationToken::new(),
            closing: CancellationToken::new(),
            close_frame: Mutex::new(None),
            stream_queue,
            remote,
            peer,
        }
    }

    /// Asks the writer to close with `code` after what is queued; the
    /// first close asked for wins.
    fn close(&self, code: CloseCode, reason: &str) {
        {
            let mut frame = self.close_frame.lock().unwrap_or_else(|e| e.into_inner());
            if frame.is_none() {
                *frame = Some((code, reason.to_owned()));
            }
        }
        self.closing.cancel();
    }

    fn streams(&self) -> std::sync::MutexGuard<'_, HashMap<u32, CancellationToken>> {
        self.streams.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Writes queued messages, batching what is ready into one flush, until
/// the connection closes; then the close frame.
async fn write_loop<S>(
    mut sink: futures_util::stream::SplitSink<WebSocketStream<S>, Message>,
    mut rx: mpsc::Receiver<Box<Outgoing>>,
    shared: Arc<Shared>,
    ping_every: Duration,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let pump = async {
        // Browsers answer pings on their own: an idle page's connection is
        // seen alive (and kept open through proxies) without its script.
        let mut ping = tokio::time::interval(ping_every);
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let out = tokio::select! {
                out = rx.recv() => out,
                _ = ping.tick() => {
                    sink.send(Message::Ping(Bytes::new())).await?;
                    continue;
                }
            };
            let Some(out) = out else { break };
            sink.feed(Message::Binary(out.message)).await?;
            while let Ok(out) = rx.try_recv() {
                sink.feed(Message::Binary(out.message)).await?;
            }
            sink.flush().await?;
        }
        Ok::<_, tokio_tungstenite::tungstenite::Error>(())
    };
    let failed = tokio::select! {
        result = pump => result.is_err(),
        () = shared.closing.cancelled() => false,
    };
    if failed {
        shared.gone.cancel();
        return;
    }
    // What the session queued before it closed (its last Error frame).
    while let Ok(out) = rx.try_recv() {
        if sink.feed(Message::Binary(out.message)).await.is_err() {
            break;
        }
    }
    let frame = shared
        .close_frame
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .take();
    let frame = frame.map(|(code, reason)| CloseFrame {
        code: ws::close_code(code).into(),
        reason: reason.into(),
    });
    let _ = tokio::time::timeout(CLOSE_FLUSH, async {
        let _ = sink.send(Message::Close(frame)).await;
        let _ = sink.close().await;
    })
    .await;
    shared.gone.cancel();
}

/// Routes the client's messages: control bytes to the session, stops to
/// their streams. Anything else is a protocol error.
async fn read_loop<S>(
    mut stream: futures_util::stream::SplitStream<WebSocketStream<S>>,
    control: mpsc::Sender<Bytes>,
    shared: Arc<Shared>,
    idle_timeout: Duration,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    loop {
        let message = tokio::select! {
            () = shared.gone.cancelled() => break,
            message = stream.next() => message,
            // The pings above get an answer from any live peer.
            () = tokio::time::sleep(idle_timeout) => {
                debug!(?idle_timeout, "nothing from the client: closing its WebSocket");
                break;
            }
        };
        let bytes = match message {
            Some(Ok(Message::Binary(bytes))) => bytes,
            Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => continue,
            Some(Ok(Message::Text(_))) => {
                protocol_error(&shared, "text messages are not part of the protocol");
                break;
            }
            Some(Ok(Message::Close(_))) | None => break,
            Some(Err(e)) => {
                debug!(error = %e, "WebSocket read failed");
                break;
            }
        };
        match decode_message(&bytes) {
            // The client finished its control stream.
            Ok((CONTROL_STREAM, body)) if body.is_empty() => break,
            Ok((CONTROL_STREAM, body)) => {
                if control.send(body).await.is_err() {
                    break;
                }
            }
            Ok((stream, body)) if body.is_empty() => {
                if let Some(stop) = shared.streams().remove(&stream) {
                    stop.cancel();
                }
            }
            Ok((stream, _)) => {
                protocol_error(
                    &shared,
                    &format!("stream {stream} is the broker's to write"),
                );
                break;
            }
            Err(e) => {
                protocol_error(&shared, &e.to_string());
                break;
            }
        }
    }
    // Dropping `control` ends the session's reads: the client is gone.
}

fn protocol_error(shared: &Shared, why: &str) {
    debug!(
        why,
        "closing a WebSocket connection that broke the protocol"
    );
    shared.close(CloseCode::PROTOCOL_ERROR, why);
}

/// The control stream's receiving half: the bodies of stream-0 messages,
/// as one byte stream.
struct WsControlRecv {
    rx: mpsc::Receiver<Bytes>,
    current: Bytes,
}

impl AsyncRead for WsControlRecv {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        while self.current.is_empty() {
            match ready!(self.rx.poll_recv(cx)) {
                Some(bytes) => self.current = bytes,
                // End of stream: a read of zero bytes.
                None => return Poll::Ready(Ok(())),
            }
        }
        let n = self.current.len().min(buf.remaining());
        buf.put_slice(&self.current.split_to(n));
        Poll::Ready(Ok(()))
    }
}

/// The control stream's sending half: each write becomes one message of
/// whole frames.
pub struct WsControlSend {
    shared: Arc<Shared>,
    permits: PollSemaphore,
    all_permits: Arc<Semaphore>,
}

impl std::fmt::Debug for WsControlSend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WsControlSend").finish_non_exhaustive()
    }
}

impl AsyncWrite for WsControlSend {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.shared.gone.is_cancelled() || self.shared.closing.is_cancelled() {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        let Some(permit) = ready!(self.permits.poll_acquire(cx)) else {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        };
        let n = whole_frames(data, MESSAGE_BYTES);
        let out = Box::new(Outgoing {
            message: encode_message(CONTROL_STREAM, &data[..n]),
            _permit: permit,
        });
        match self.shared.tx.try_send(out) {
            Ok(()) => Poll::Ready(Ok(n)),
            // The queue is sized for every permit: full cannot happen;
            // closed means the writer is gone.
            Err(_) => Poll::Ready(Err(io::ErrorKind::BrokenPipe.into())),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// How many bytes from the front of `data` (which starts at a frame
/// boundary) to put in one message: whole frames up to `max` bytes, or
/// the first frame alone when it is larger, or everything when the frames
/// cannot be told apart (the peer copes with a split frame all the same).
fn whole_frames(data: &[u8], max: usize) -> usize {
    let mut at = 0;
    while data.len() - at >= volna_proto::codec::FRAME_HEADER_LEN {
        let len = u32::from_be_bytes([data[at], data[at + 1], data[at + 2], data[at + 3]]) as usize
            + volna_proto::codec::FRAME_HEADER_LEN;
        if at + len > data.len() || (at > 0 && at + len > max) {
            break;
        }
        at += len;
        if at >= max {
            break;
        }
    }
    if at == 0 { data.len() } else { at }
}

/// The transport side of a WebSocket session.
pub struct WsConnection {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for WsConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WsConnection")
            .field("remote", &self.shared.remote)
            .finish_non_exhaustive()
    }
}

impl Connection for WsConnection {
    type Sink = WsDeliveryStream;
    type ControlSend = WsControlSend;

    async fn finish_control(send: WsControlSend) {
        // Every permit back: every control message is with the socket.
        let all = send.all_permits.clone();
        let _ = tokio::time::timeout(CLOSE_FLUSH, all.acquire_many_owned(CONTROL_MESSAGES)).await;
    }

    async fn open_delivery(&self) -> Result<WsDeliveryStream, SinkError> {
        let shared = &self.shared;
        if shared.gone.is_cancelled() || shared.closing.is_cancelled() {
            return Err(SinkError("the connection is closed".into()));
        }
        let id = shared.next_stream.fetch_add(1, Ordering::Relaxed);
        let stop = CancellationToken::new();
        shared.streams().insert(id, stop.clone());
        Ok(WsDeliveryStream {
            id,
            shared: shared.clone(),
            permits: Arc::new(Semaphore::new(shared.stream_queue)),
            stop,
            finished: false,
        })
    }

    fn close(&self, code: CloseCode, reason: &str) {
        self.shared.close(code, reason);
    }

    fn remote(&self) -> SocketAddr {
        self.shared.remote
    }

    fn peer_identity(&self) -> Option<String> {
        self.shared.peer.clone()
    }
}

/// One subscription's delivery stream on the shared socket.
pub struct WsDeliveryStream {
    id: u32,
    shared: Arc<Shared>,
    permits: Arc<Semaphore>,
    stop: CancellationToken,
    finished: bool,
}

impl std::fmt::Debug for WsDeliveryStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WsDeliveryStream")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl WsDeliveryStream {
    /// Queues `message` once this stream has a permit for it.
    async fn queue(&self, message: Bytes) -> Result<(), SinkError> {
        let permit = tokio::select! {
            permit = self.permits.clone().acquire_owned() => {
                permit.map_err(|_| SinkError("the stream is closed".into()))?
            }
            () = self.stop.cancelled() => return Err(stopped()),
            () = self.shared.gone.cancelled() => return Err(closed()),
        };
        let out = Box::new(Outgoing {
            message,
            _permit: permit,
        });
        tokio::select! {
            sent = self.shared.tx.send(out) => sent.map_err(|_| closed()),
            () = self.shared.gone.cancelled() => Err(closed()),
        }
    }
}

fn stopped() -> SinkError {
    SinkError("stopped by peer".into())
}

fn closed() -> SinkError {
    SinkError("the connection is closed".into())
}

impl DeliverySink for WsDeliveryStream {
    async fn send(&mut self, frames: Vec<Bytes>) -> Result<(), SinkError> {
        let mut start = 0;
        while start < frames.len() {
            // Whole frames up to MESSAGE_BYTES per message (a larger frame
            // alone).
            let mut end = start + 1;
            let mut bytes = frames[start].len();
            while end < frames.len() && bytes + frames[end].len() <= MESSAGE_BYTES {
                bytes += frames[end].len();
                end += 1;
            }
            self.queue(encode_frames(self.id, &frames[start..end]))
                .await?;
            start = end;
        }
        Ok(())
    }

    async fn finish(&mut self) {
        self.finished = true;
        let _ = self.queue(encode_message(self.id, &[])).await;
        self.shared.streams().remove(&self.id);
    }

    async fn stopped(&mut self) -> SinkError {
        tokio::select! {
            () = self.stop.cancelled() => stopped(),
            () = self.shared.gone.cancelled() => closed(),
        }
    }
}

impl Drop for WsDeliveryStream {
    fn drop(&mut self) {
        if !self.finished {
            self.shared.streams().remove(&self.id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BytesMut;
    use volna_proto::Frame;

    fn pings(n: u64) -> Vec<u8> {
        let mut out = BytesMut::new();
        for request_id in 0..n {
            volna_proto::encode(&Frame::Ping { request_id }, &mut out);
        }
        out.to_vec()
    }

    /// A connection's halves with nobody writing to a socket: what the
    /// session and its streams see when the client stops reading.
    fn unwritten(stream_queue: usize) -> (WsConnection, mpsc::Receiver<Box<Outgoing>>) {
        let (tx, rx) = mpsc::channel(1024);
        let shared = Arc::new(Shared::new(
            tx,
            stream_queue,
            SocketAddr::from(([127, 0, 0, 1], 1)),
            None,
        ));
        (WsConnection { shared }, rx)
    }

    fn frame(n: u8) -> Vec<Bytes> {
        vec![Bytes::from(vec![n; 100])]
    }

    #[tokio::test]
    async fn a_full_stream_waits_while_the_others_go_on() {
        let (conn, mut rx) = unwritten(2);
        let mut busy = conn.open_delivery().await.expect("open");
        let mut quiet = conn.open_delivery().await.expect("open");
        busy.send(frame(1)).await.expect("queued");
        busy.send(frame(2)).await.expect("queued");
        // The busy stream used its two messages: the next waits…
        let third = tokio::time::timeout(Duration::from_millis(50), busy.send(frame(3))).await;
        assert!(
            third.is_err(),
            "a third message was queued past the stream's bound"
        );
        // …while another stream of the same connection is not held back.
        tokio::time::timeout(Duration::from_millis(50), quiet.send(frame(9)))
            .await
            .expect("the quiet stream is not held back")
            .expect("queued");
        // The socket takes one of the busy stream's messages: it may queue
        // one more, in order.
        let first = rx.recv().await.expect("message");
        assert_eq!(decode_message(&first.message).expect("tag").0, 1);
        drop(first);
        tokio::time::timeout(Duration::from_millis(50), busy.send(frame(3)))
            .await
            .expect("room again")
            .expect("queued");
        let tags: Vec<(u32, u8)> = std::iter::from_fn(|| rx.try_recv().ok())
            .map(|out| {
                let (stream, body) = decode_message(&out.message).expect("tag");
                (stream, body[0])
            })
            .collect();
        assert_eq!(tags, vec![(1, 2), (2, 9), (1, 3)]);
    }

    #[tokio::test]
    async fn a_stream_the_client_stops_fails_its_sends_and_says_so() {
        let (conn, _rx) = unwritten(1);
        let mut sink = conn.open_delivery().await.expect("open");
        sink.send(frame(1)).await.expect("queued");
        let stop = conn.shared.streams().remove(&1).expect("registered");
        stop.cancel();
        assert_eq!(sink.stopped().await, stopped());
        assert_eq!(sink.send(frame(2)).await, Err(stopped()));
    }

    fn policy(allowed: &[&str], http: &str) -> OriginPolicy {
        let settings = Settings {
            allowed_origins: allowed.iter().map(|o| (*o).to_owned()).collect(),
            ..Settings::default()
        };
        OriginPolicy::new(&settings, http.parse().expect("address")).expect("valid")
    }

    fn admits(policy: &OriginPolicy, origins: &[&str]) -> bool {
        let values: Vec<HeaderValue> = origins
            .iter()
            .map(|o| HeaderValue::from_str(o).expect("header"))
            .collect();
        policy.check(values.iter()).is_ok()
    }

    #[test]
    fn the_console_is_the_http_listener_by_every_name_that_reaches_it() {
        let loopback = policy(&[], "127.0.0.1:7401");
        for origin in [
            "http://127.0.0.1:7401",
            "http://localhost:7401",
            "http://LOCALHOST:7401",
        ] {
            assert!(admits(&loopback, &[origin]), "{origin}");
        }
        for origin in [
            "https://127.0.0.1:7401",
            "http://127.0.0.1:7402",
            "http://127.0.0.1",
            "http://[::1]:7401",
            "http://evil.example:7401",
            "null",
            "",
        ] {
            assert!(!admits(&loopback, &[origin]), "{origin}");
        }
        // No Origin: not a browser page.
        assert!(admits(&loopback, &[]));
        // Two Origin headers are not a browser's either.
        assert!(!admits(
            &loopback,
            &["http://127.0.0.1:7401", "http://127.0.0.1:7401"]
        ));

        let v6 = policy(&[], "[::1]:7401");
        assert!(admits(&v6, &["http://[::1]:7401"]));
        assert!(admits(&v6, &["http://localhost:7401"]));
        assert!(!admits(&v6, &["http://127.0.0.1:7401"]));

        let all_v4 = policy(&[], "0.0.0.0:7401");
        assert!(admits(&all_v4, &["http://127.0.0.1:7401"]));
        assert!(admits(&all_v4, &["http://localhost:7401"]));
        assert!(!admits(&all_v4, &["http://[::1]:7401"]));
        assert!(!admits(&all_v4, &["http://0.0.0.0:7401"]));
        assert!(!admits(&all_v4, &["http://10.1.2.3:7401"]));
        let all = policy(&[], "[::]:7401");
        assert!(admits(&all, &["http://[::1]:7401"]));
        assert!(admits(&all, &["http://127.0.0.1:7401"]));

        let public = policy(&[], "10.1.2.3:80");
        assert!(admits(&public, &["http://10.1.2.3"]));
        assert!(admits(&public, &["http://10.1.2.3:80"]));
        assert!(!admits(&public, &["http://localhost"]));
    }

    #[test]
    fn configured_origins_add_to_the_console_and_star_allows_any() {
        let listed = policy(
            &["https://App.example.com", "http://localhost:3000"],
            "127.0.0.1:7401",
        );
        for origin in [
            "https://app.example.com",
            "https://app.example.com:443",
            "http://localhost:3000",
            "http://localhost:7401",
        ] {
            assert!(admits(&listed, &[origin]), "{origin}");
        }
        for origin in [
            "http://app.example.com",
            "https://app.example.com:8443",
            "https://sub.app.example.com",
            "https://app.example.com.evil.test",
            "http://localhost:3001",
        ] {
            assert!(!admits(&listed, &[origin]), "{origin}");
        }
        let any = policy(&["*"], "127.0.0.1:7401");
        for origin in ["https://anything.test", "null", "http://127.0.0.1:7401"] {
            assert!(admits(&any, &[origin]), "{origin}");
        }
        let settings = Settings {
            allowed_origins: vec!["https://app.example.com/".into()],
            ..Settings::default()
        };
        let err = OriginPolicy::new(&settings, "127.0.0.1:7401".parse().expect("address"))
            .expect_err("a path is not an origin");
        assert!(
            err.to_string().contains("websocket.allowed_origins"),
            "{err}"
        );
    }

    #[test]
    fn a_certificate_names_the_session_only_when_configured_to() {
        let name = || Some("billing".to_owned());
        assert_eq!(
            certificate_identity(WebSocketCertificates::Token, name()),
            None
        );
        assert_eq!(
            certificate_identity(WebSocketCertificates::Service, name()),
            name()
        );
        assert_eq!(
            certificate_identity(WebSocketCertificates::Service, None),
            None
        );
    }

    #[test]
    fn a_control_message_holds_whole_frames() {
        let data = pings(10);
        let one = data.len() / 10;
        assert_eq!(whole_frames(&data, 1024), data.len());
        assert_eq!(whole_frames(&data, one * 3), one * 3);
        assert_eq!(whole_frames(&data, one * 3 + 1), one * 3);
        // A frame larger than a message goes alone, whole.
        assert_eq!(whole_frames(&data, 1), one);
        // A partial frame at the end stays for the next write.
        assert_eq!(whole_frames(&data[..one * 2 + 1], 1024), one * 2);
        // Bytes that are not whole frames go as they are.
        assert_eq!(whole_frames(&data[..2], 1024), 2);
    }
}
