//! One connection's session: the control stream's request/reply protocol,
//! its limits, and its subscriptions.
//!
//! ```text
//!  control recv ──decode──▶ session loop ──append──▶ log ──ack──┐
//!                               │  ▲                            │
//!                               │  └──────── pending acks ◀─────┘
//!                               ├──▶ control send (replies, written by the loop)
//!                               └──spawn──▶ subscription loops ──▶ delivery streams
//! ```
//!
//! Publishes are batched at every step: all those one read returns are
//! admitted, then handed to their log as one batch (one queue hand-off,
//! one writer wake-up), and the acks of a batch go out as one control
//! write.
//!
//! Invariants:
//! - Nothing but `Hello` is accepted before `Welcome` is sent; a connection
//!   that sends no `Hello` within the hello timeout is closed.
//! - At most `max_inflight_publishes` acks are pending; beyond it the loop
//!   stops reading, so QUIC flow control pushes back on the client instead of
//!   the broker buffering.
//! - A request that is wrong on its own (payload too large, bad position,
//!   unknown subscription, over the publish rate) gets a typed `Error` and
//!   the session goes on; bytes that do not decode close the connection with
//!   `PROTOCOL_ERROR`, because the stream is no longer in step.
//! - A session lives no longer than its token: `TokenExpiring` is sent
//!   `auth.expiry_notice_secs` before `exp`, a `Refresh` with a valid token
//!   of the same user extends it (and replaces its rights: subscriptions
//!   the new token does not grant end), otherwise the session is closed at
//!   `exp`.
//!
//! The session knows nothing of QUIC: it reads and writes byte streams and
//! asks a [`Connection`] to open delivery streams or to close.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime};

use bytes::{Buf, BytesMut};
use dashmap::DashMap;
use futures_util::stream::{FuturesUnordered, StreamExt};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info_span, warn};
use volna_proto::{
    ChannelName, CloseCode, DecodeError, ErrorCode, ErrorFrame, Frame, Hello, Limits,
    MAX_UNREAD_CHANNELS, MIN_PROTOCOL_VERSION, Offset, PROTOCOL_VERSION, Position, Publish,
    Subscribe, SubscriptionId, UnreadCount, Welcome,
};

use crate::auth::{Authenticator, Identity};
use crate::config::{Config, Publishers};
use crate::devices::{DeviceError, DeviceId, Devices, Mark, MarkerListener, Ticket};
use crate::fanout::Fanout;
use crate::limits::{Limiter, PublishGate};
use crate::log::{AppendError, AppendInput, Appended, Log, Logs, ProducerRef};
use crate::metrics::Metrics;
use crate::store::ProducerKey;
use crate::subscription::{self, DeliverySink, SinkError, Start, Stopped};

/// Encoded replies a session may hold for a client that is slow to take
/// them before it stops reading the client's requests.
const MAX_UNSENT_CONTROL: usize = 64 * 1024;
/// How long a closing session waits for acks already being committed.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a session the broker ends waits for its last control frames to
/// be taken before the connection is closed.
const CLOSE_FLUSH_TIMEOUT: Duration = Duration::from_millis(250);
/// The control stream's read buffer while the session waits for `Hello`
/// (a token is most of it). Buffers start small and grow with use: an
/// idle connection held 32 KiB in two 16 KiB buffers once (BENCHMARKS.md).
const INITIAL_READ_BUFFER: usize = 1024;
/// After `Hello` the read buffer adapts to the client: it doubles while
/// reads fill it (a publisher's bursts decode in one pass) up to the
/// largest, and halves while reads are small, down to the smallest, which
/// is what an idle device's session holds.
const MIN_READ_BUFFER: usize = 256;
const MAX_READ_BUFFER: usize = 64 * 1024;
/// About the encoded size of one `Published` ack.
const ACK_FRAME_BYTES: usize = 24;
/// Read-marker events a session holds for its client (one per channel,
/// the latest); beyond it the oldest are dropped — the client can still
/// ask `Unread`.
const MAX_MARKER_EVENTS: usize = 256;
/// The first protocol version that knows `ReadMarker` events.
const MARKER_EVENTS_VERSION: u16 = 3;

/// What every session shares.
#[derive(Debug)]
pub struct BrokerContext {
    /// The channel logs.
    pub logs: Logs,
    /// The fan-out engine.
    pub fanout: Arc<Fanout>,
    /// The configuration in force.
    pub config: Arc<Config>,
    /// Fires when the broker shuts down.
    pub shutdown: CancellationToken,
    /// The broker's metrics.
    pub metrics: Arc<Metrics>,
    /// Every open session, for operators.
    pub sessions: Arc<SessionRegistry>,
    /// Verifies tokens.
    pub authenticator: Authenticator,
    /// Connection and publish limits.
    pub limiter: Arc<Limiter>,
    /// Device cursors and read state; `None` where the broker keeps none
    /// (requests about devices get `Unsupported`).
    pub devices: Option<Arc<Devices>>,
    /// False while this node cannot serve devices (a cluster node cut off
    /// from its peers): new sessions are refused as `Unavailable`.
    pub serving: Arc<AtomicBool>,
    next_session_id: AtomicU64,
}

impl BrokerContext {
    /// A context for sessions.
    pub fn new(
        logs: Logs,
        fanout: Arc<Fanout>,
        config: Arc<Config>,
        shutdown: CancellationToken,
        metrics: Arc<Metrics>,
        authenticator: Authenticator,
    ) -> Self {
        Self {
            limiter: Arc::new(Limiter::new(&config.limits)),
            authenticator,
            logs,
            fanout,
            config,
            shutdown,
            metrics,
            sessions: Arc::new(SessionRegistry::default()),
            devices: None,
            serving: Arc::new(AtomicBool::new(true)),
            next_session_id: AtomicU64::new(1),
        }
    }

    /// This context with device state.
    pub fn with_devices(mut self, devices: Arc<Devices>) -> Self {
        self.devices = Some(devices);
        self
    }
}

/// Every open session, as operators see them, and which session speaks
/// for each device.
#[derive(Debug, Default)]
pub struct SessionRegistry(DashMap<u64, Arc<SessionInfo>>, DashMap<DeviceKey, u64>);

/// A user's device: at most one session speaks for it.
type DeviceKey = (String, String);

/// How long a new session of a device waits for the one it replaces to
/// release its place among the user's connections (at once, unless its
/// task is busy).
const TAKEOVER_WAIT: Duration = Duration::from_secs(2);
/// What a client of a node cut off from its cluster is told.
const CUT_OFF: &str = "this node is cut off from its cluster; connect to another node";
/// The first protocol version whose clients take a takeover as final.
const TAKEOVER_VERSION: u16 = 4;
/// The first protocol version whose `Ack`s are answered together.
const ACK_REPORTS_VERSION: u16 = 5;

/// One open session.
#[derive(Debug)]
pub struct SessionInfo {
    /// The broker's id for the session (sent in `Welcome`).
    pub id: u64,
    /// Who the client authenticated as (the token's `sub`; with
    /// `auth.mode = "none"`, the token itself).
    pub user: String,
    /// The client's self-description from `Hello`.
    pub client: String,
    /// The client's address.
    pub remote: SocketAddr,
    /// When the session opened.
    pub connected_at: SystemTime,
    /// Subscriptions it holds.
    pub subscriptions: AtomicUsize,
    kick: CancellationToken,
    /// Why `kick` fires ([`KickReason`]), set before it.
    kick_reason: Arc<AtomicU8>,
    /// Cancelled once the session ended and released what it held.
    ended: CancellationToken,
}

impl SessionRegistry {
    /// Every open session.
    pub fn list(&self) -> Vec<Arc<SessionInfo>> {
        let mut all: Vec<_> = self.0.iter().map(|e| e.value().clone()).collect();
        all.sort_by_key(|s| s.id);
        all
    }

    /// Disconnects every session of `user`; returns how many.
    pub fn kick_user(&self, user: &str) -> usize {
        self.0
            .iter()
            .filter(|e| e.value().user == user)
            .map(|e| e.value().kick.cancel())
            .count()
    }

    /// Closes every session because this node cannot serve them (a
    /// cluster node cut off from its peers): each client is told
    /// `Unavailable` and its connection closes as `GOING_AWAY`, so that it
    /// moves on to another seed. Returns how many.
    pub fn close_all_unavailable(&self) -> usize {
        self.0
            .iter()
            .map(|e| {
                let info = e.value();
                info.kick_reason
                    .store(KickReason::Unavailable as u8, Ordering::SeqCst);
                info.kick.cancel();
            })
            .count()
    }

    /// Disconnects session `id`; false when there is none.
    pub fn kick_session(&self, id: u64) -> bool {
        self.0.get(&id).map(|e| e.value().kick.cancel()).is_some()
    }

    /// Makes session `id` the one speaking for `device` of `user`, and
    /// closes the session that did (MQTT's session takeover): an app that
    /// restarted, or a phone that reconnected before its old connection
    /// timed out, must not wait for the old one to go (nor count it
    /// against the user's connections). Returns what to wait on until the
    /// old session has ended.
    fn take_over(&self, user: &str, device: &str, id: u64) -> Option<CancellationToken> {
        let previous = self.1.insert((user.to_owned(), device.to_owned()), id)?;
        let info = self.0.get(&previous)?;
        info.kick_reason
            .store(KickReason::Replaced as u8, Ordering::SeqCst);
        info.kick.cancel();
        Some(info.ended.clone())
    }

    /// Forgets session `id` (ended).
    fn remove(&self, id: u64, device: Option<(&str, &str)>) {
        self.0.remove(&id);
        if let Some((user, device)) = device {
            self.1
                .remove_if(&(user.to_owned(), device.to_owned()), |_, by| *by == id);
        }
    }
}

/// Why a session's `kick` token fired.
#[repr(u8)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KickReason {
    /// An operator disconnected it.
    Operator = 0,
    /// A newer session of the same device took over.
    Replaced = 1,
    /// The node cannot serve it (cut off from its cluster).
    Unavailable = 2,
}

impl KickReason {
    fn of(reason: &AtomicU8) -> Self {
        match reason.load(Ordering::SeqCst) {
            1 => KickReason::Replaced,
            2 => KickReason::Unavailable,
            _ => KickReason::Operator,
        }
    }
}

/// The transport side of a session.
pub trait Connection: Send + Sync + 'static {
    /// A delivery stream.
    type Sink: DeliverySink;
    /// The sending half of the control stream.
    type ControlSend: AsyncWrite + Unpin + Send + 'static;

    /// Ends the control stream after what was written and waits (bounded)
    /// until the peer has it, so that a last `Error` frame arrives before
    /// the connection is closed.
    fn finish_control(send: Self::ControlSend) -> impl Future<Output = ()> + Send;

    /// Opens a new delivery stream to the client.
    fn open_delivery(&self) -> impl Future<Output = Result<Self::Sink, SinkError>> + Send;

    /// Closes the whole connection.
    fn close(&self, code: CloseCode, reason: &str);

    /// The client's address.
    fn remote(&self) -> SocketAddr;

    /// The name in the client certificate the transport verified (mutual
    /// TLS), if the client presented one: a server-side identity.
    fn peer_identity(&self) -> Option<String>;
}

/// Why a session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// The client finished its control stream or the connection dropped.
    ClientGone,
    /// The broker is shutting down.
    Shutdown,
    /// The client broke the protocol.
    ProtocolError,
    /// The client did not say Hello in time.
    HelloTimeout,
    /// An operator disconnected the client.
    Kicked,
    /// The token was refused, or expired during the session.
    Unauthorized,
    /// A connection limit was reached.
    LimitExceeded,
    /// The client stopped reading its control stream.
    ControlStalled,
    /// A newer connection of the same device took over.
    Replaced,
    /// The node cannot serve it: the client should use another.
    Unavailable,
}

impl End {
    fn close_code(self) -> CloseCode {
        match self {
            End::ClientGone => CloseCode::NORMAL,
            End::Shutdown => CloseCode::GOING_AWAY,
            End::ProtocolError => CloseCode::PROTOCOL_ERROR,
            End::HelloTimeout => CloseCode::HELLO_TIMEOUT,
            End::Kicked => CloseCode::KICKED,
            End::Unauthorized => CloseCode::UNAUTHORIZED,
            End::LimitExceeded => CloseCode::LIMIT_EXCEEDED,
            End::ControlStalled => CloseCode::CONTROL_STALLED,
            End::Replaced => CloseCode::REPLACED,
            End::Unavailable => CloseCode::GOING_AWAY,
        }
    }

    fn label(self) -> &'static str {
        match self {
            End::ClientGone => "client_gone",
            End::Shutdown => "shutdown",
            End::ProtocolError => "protocol_error",
            End::HelloTimeout => "hello_timeout",
            End::Kicked => "kicked",
            End::Unauthorized => "unauthorized",
            End::LimitExceeded => "limit_exceeded",
            End::ControlStalled => "control_stalled",
            End::Replaced => "replaced",
            End::Unavailable => "unavailable",
        }
    }
}

/// A submitted batch's request ids, when it was started, and each
/// publish's outcome, in the same order.
type BatchAcks = (Vec<u64>, Instant, Vec<Result<Appended, AppendError>>);

/// A request whose answer waits on storage.
enum Answer {
    /// A batch of publishes was committed (or refused).
    Appends(BatchAcks),
    /// An `Ack` or `MarkRead` is durable (or failed).
    Stored(u64, Result<(), DeviceError>),
    /// Where a producer's sequences stand (`InitProducer`).
    ProducerReady(u64, Result<u64, AppendError>),
}

type PendingAcks = Pin<Box<dyn Future<Output = Answer> + Send>>;

/// Publishes decoded from one read, admitted and not yet submitted: they
/// go to their log as one batch, so a burst costs one hand-off to the
/// writer and one control write for its acks.
struct PublishBatch {
    log: Log,
    request_ids: Vec<u64>,
    inputs: Vec<AppendInput>,
    started: Instant,
}

/// Runs a session over an accepted control stream until it ends, then
/// closes the connection with the matching code.
pub async fn run<C, R>(ctx: Arc<BrokerContext>, conn: Arc<C>, recv: R, send: C::ControlSend)
where
    C: Connection,
    R: AsyncRead + Unpin + Send,
{
    let session_id = ctx.next_session_id.fetch_add(1, Ordering::Relaxed);
    let span = info_span!("session", id = session_id);
    async move {
        let mut send = send;
        let mut session = Session {
            ctx: ctx.clone(),
            conn: conn.clone(),
            out: BytesMut::new(),
            mailbox: Arc::default(),
            subscriptions: HashMap::new(),
            by_channel: HashMap::new(),
            next_subscription: 1,
            cancel: ctx.shutdown.child_token(),
            kick: CancellationToken::new(),
            kick_reason: Arc::default(),
            ended: CancellationToken::new(),
            took_over: None,
            welcomed: false,
            id: session_id,
            identity: None,
            gate: PublishGate::unlimited(),
            token_changed: false,
            device: None,
            reports_acks: false,
            unreported: UnreportedAcks::default(),
        };
        let end = session.serve(session_id, recv, &mut send).await;
        session.cancel.cancel();
        let metrics = &ctx.metrics;
        let device = session
            .took_over
            .as_ref()
            .map(|(user, device)| (user.as_str(), device.as_str()));
        ctx.sessions.remove(session_id, device);
        if session.welcomed {
            if let (Some(devices), Some(identity)) = (&ctx.devices, &session.identity) {
                devices.unlisten(&identity.user, session_id);
                if let Some(device) = &session.device {
                    devices.seen(&identity.user, device);
                }
            }
            metrics.connections.dec();
            metrics
                .connections_closed
                .with_label_values(&[end.label()])
                .inc();
        }
        metrics
            .subscriptions
            .sub(session.subscriptions.len() as i64);
        // The last replies go out before the connection closes. When the
        // broker ends the session, a client that does not read gets only a
        // short while to take them: kick, expiry and shutdown must not wait
        // on it.
        let last = std::mem::take(&mut session.out);
        let ended = session.ended.clone();
        drop(session);
        // Its place among the user's connections is free: a session of the
        // same device taking over may go on.
        ended.cancel();
        let flush = match end {
            End::ClientGone => DRAIN_TIMEOUT,
            _ => CLOSE_FLUSH_TIMEOUT,
        };
        let written = async {
            if send.write_all(&last).await.is_ok() {
                C::finish_control(send).await;
            }
        };
        let _ = Box::pin(tokio::time::timeout(flush, written)).await;
        debug!(?end, "session ended");
        let code = end.close_code();
        conn.close(code, code.reason());
    }
    .instrument(span)
    .await;
}

struct Session<C: Connection> {
    ctx: Arc<BrokerContext>,
    conn: Arc<C>,
    /// Encoded control frames the client has not taken yet. The session
    /// loop writes them itself: no writer task or queue per connection,
    /// and an idle session holds no buffer (it is dropped once drained).
    out: BytesMut,
    /// Delivery loops that stopped on their own, and read markers moved on
    /// the user's other devices, report here.
    mailbox: Arc<Mailbox>,
    subscriptions: HashMap<SubscriptionId, (ChannelName, CancellationToken)>,
    by_channel: HashMap<ChannelName, SubscriptionId>,
    next_subscription: u64,
    cancel: CancellationToken,
    kick: CancellationToken,
    /// Set when `kick` was a takeover by the same device.
    kick_reason: Arc<AtomicU8>,
    ended: CancellationToken,
    /// The `(user, device)` this session speaks for in the registry,
    /// once it took over (removed when it ends, whether or not it was
    /// admitted).
    took_over: Option<(String, String)>,
    welcomed: bool,
    id: u64,
    identity: Option<Identity>,
    gate: PublishGate,
    /// Set by a successful `Refresh`: the expiry timers must be re-armed.
    token_changed: bool,
    /// The device the client named in `Hello`.
    device: Option<DeviceId>,
    /// Whether the client's `Ack`s are answered together (protocol 5).
    reports_acks: bool,
    unreported: UnreportedAcks,
}

/// `Ack`s taken from a client of protocol 5, and which are not yet
/// reported stored.
///
/// A session speaks for one user, whose device state lives in one place
/// (one partition on a cluster), so the latest ticket covers every earlier
/// one.
#[derive(Debug, Default)]
struct UnreportedAcks {
    /// The ticket of the latest `Ack` taken: what a `FlushAcks` waits for,
    /// whatever reports are still waiting.
    ticket: Option<Ticket>,
    /// The latest `Ack` not yet in a report.
    latest: Option<u64>,
    /// When the next report goes (unset: only on `FlushAcks`).
    due: Option<tokio::time::Instant>,
}

impl UnreportedAcks {
    /// Takes the `Ack` `request_id`; the first since the last report sets
    /// the next one `report_after` from now.
    fn add(&mut self, request_id: u64, ticket: Ticket, report_after: Duration) {
        self.ticket = self.ticket.max(Some(ticket));
        self.latest = Some(request_id);
        if self.due.is_none() && !report_after.is_zero() {
            self.due = Some(tokio::time::Instant::now() + report_after);
        }
    }

    /// A report of every `Ack` so far: the latest one's request id, and
    /// the ticket to wait for. No report is due until the next `Ack`.
    fn report(&mut self) -> Option<(u64, Ticket)> {
        self.due = None;
        self.latest.take().zip(self.ticket)
    }

    /// What a `FlushAcks` waits for (it covers every `Ack` so far, so no
    /// report of them is due).
    fn flush(&mut self) -> Option<Ticket> {
        self.due = None;
        self.latest = None;
        self.ticket
    }
}

/// An instant far enough to never fire, near enough not to overflow.
fn far_future() -> tokio::time::Instant {
    tokio::time::Instant::now() + Duration::from_secs(100 * 365 * 86_400)
}

/// The token's two deadlines, as timers: the `TokenExpiring` notice and
/// the session's end.
fn token_deadlines(
    expires_at: Option<u64>,
    notice_secs: u64,
) -> (tokio::time::Instant, tokio::time::Instant) {
    let never = far_future();
    let Some(exp) = expires_at else {
        return (never, never);
    };
    let left = Duration::from_secs(exp.saturating_sub(crate::log::now_ms() / 1000));
    let now = tokio::time::Instant::now();
    (
        now + left.saturating_sub(Duration::from_secs(notice_secs)),
        now + left,
    )
}

impl<C: Connection> Session<C> {
    async fn serve(
        &mut self,
        session_id: u64,
        mut recv: impl AsyncRead + Unpin + Send,
        send: &mut C::ControlSend,
    ) -> End {
        let mailbox = self.mailbox.clone();
        // Small to start: most connections are idle devices, and the
        // buffer grows to the largest frame the client actually sends.
        let mut buf = BytesMut::with_capacity(INITIAL_READ_BUFFER);
        // This and the other one-off waits (the last acks, the last
        // replies) are boxed: an async fn's state is as large as its
        // largest await, and the idle connection's task should be sized by
        // its wait for the next frame.
        let hello = Box::pin(tokio::time::timeout(
            self.ctx.config.hello_timeout(),
            read_frame(&mut recv, &mut buf, &Limits::HANDSHAKE),
        ))
        .await;
        let hello = match hello {
            Err(_) => return End::HelloTimeout,
            Ok(Err(ReadError::Gone)) => return End::ClientGone,
            Ok(Err(ReadError::Decode(e))) => return self.protocol_error(0, &e),
            Ok(Ok(Frame::Hello(hello))) => hello,
            Ok(Ok(other)) => {
                self.reply_error(
                    other.request_id().unwrap_or(0),
                    ErrorCode::UnexpectedFrame,
                    "the first frame must be Hello",
                );
                return End::ProtocolError;
            }
        };
        if let Err(end) = Box::pin(self.welcome(session_id, hello)).await {
            return end;
        }
        if buf.is_empty() {
            // The token made it large; the requests that follow are small.
            buf = BytesMut::new();
        }
        let mut read_size = MIN_READ_BUFFER;
        let limits = Limits {
            max_frame: self.ctx.config.limits.max_frame(),
        };
        let max_inflight = self.ctx.config.limits.max_inflight_publishes as usize;
        let mut pending: FuturesUnordered<PendingAcks> = FuturesUnordered::new();
        // Publishes submitted and not yet acknowledged, and those admitted
        // since the last submit.
        let mut inflight = 0usize;
        let mut batch: Option<PublishBatch> = None;
        let shutdown = self.ctx.shutdown.clone();
        let kick = self.kick.clone();
        let notice_secs = self.ctx.config.auth.expiry_notice_secs;
        let stall_after = Duration::from_secs(self.ctx.config.limits.control_stall_secs);
        let expires_at = |s: &Self| s.identity.as_ref().and_then(|i| i.expires_at);
        let (mut notice_at, mut expiry_at) = token_deadlines(expires_at(self), notice_secs);
        let mut noticed = false;
        // When the client must have taken some of `out` (armed while it
        // holds anything).
        let mut stall_at: Option<tokio::time::Instant> = None;
        // One timer for the token's notice and expiry and the stall limit:
        // each armed timer is state an idle connection carries.
        let timer = tokio::time::sleep_until(far_future());
        tokio::pin!(timer);
        let mut end = None;
        while end.is_none() {
            // Serve frames already buffered before reading more.
            let admitted = batch.as_ref().map_or(0, |b| b.inputs.len());
            let may_read = self.out.len() < MAX_UNSENT_CONTROL;
            if may_read && inflight + admitted < max_inflight {
                match volna_proto::decode(&mut buf, &limits) {
                    Ok(Some(Frame::Publish(publish))) => {
                        let request_id = publish.request_id;
                        if let Some(input) = Box::pin(self.admit_publish(publish)).await {
                            let log = self.ctx.logs.for_channel(&input.channel);
                            if batch.as_ref().is_some_and(|b| !b.log.is(log)) {
                                self.submit(batch.take(), &mut pending, &mut inflight).await;
                            }
                            let batch = batch.get_or_insert_with(|| PublishBatch {
                                log: log.clone(),
                                request_ids: Vec::new(),
                                inputs: Vec::new(),
                                started: Instant::now(),
                            });
                            batch.request_ids.push(request_id);
                            batch.inputs.push(input);
                        }
                        continue;
                    }
                    Ok(Some(frame)) => {
                        // Requests after publishes are answered after them.
                        self.submit(batch.take(), &mut pending, &mut inflight).await;
                        // Boxed, like the hello above.
                        if let Some(answer) = Box::pin(self.handle(frame)).await {
                            inflight += 1;
                            pending.push(answer);
                        }
                        if std::mem::take(&mut self.token_changed) {
                            (notice_at, expiry_at) = token_deadlines(expires_at(self), notice_secs);
                            noticed = false;
                        }
                        continue;
                    }
                    Ok(None) => {}
                    Err(e) => {
                        self.submit(batch.take(), &mut pending, &mut inflight).await;
                        end = Some(self.protocol_error(0, &e));
                        continue;
                    }
                }
            }
            // Everything the last read held is decoded (or a limit is
            // reached): what was admitted goes to the log.
            self.submit(batch.take(), &mut pending, &mut inflight).await;
            if self.out.is_empty() {
                stall_at = None;
            } else if stall_at.is_none() {
                stall_at = Some(tokio::time::Instant::now() + stall_after);
            }
            let wake_at = [
                (!noticed).then_some(notice_at),
                Some(expiry_at),
                stall_at,
                self.unreported.due,
            ]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or_else(far_future);
            // Moved only to an earlier deadline (or once it fired): a timer
            // that fires early finds nothing due and is set again, which
            // is cheaper than moving it on every write of a busy session.
            if wake_at < timer.deadline() || timer.is_elapsed() {
                timer.as_mut().reset(wake_at);
            }
            let may_read = may_read && inflight < max_inflight;
            if buf.is_empty() && buf.capacity() > read_size {
                buf = BytesMut::new();
            }
            if buf.capacity() - buf.len() < MIN_READ_BUFFER {
                buf.reserve(read_size);
            }
            let spare = buf.capacity() - buf.len();
            tokio::select! {
                biased;
                () = shutdown.cancelled() => end = Some(End::Shutdown),
                () = kick.cancelled() => {
                    end = Some(match KickReason::of(&self.kick_reason) {
                        KickReason::Replaced => {
                            self.reply_error(
                                0,
                                ErrorCode::Replaced,
                                "a newer connection of this device took over",
                            );
                            End::Replaced
                        }
                        KickReason::Unavailable => {
                            self.reply_error(0, ErrorCode::Unavailable, CUT_OFF);
                            End::Unavailable
                        }
                        KickReason::Operator => End::Kicked,
                    });
                }
                () = &mut timer => {
                    let now = tokio::time::Instant::now();
                    if stall_at.is_some_and(|at| at <= now) {
                        debug!(?stall_after, "the client stopped reading its control stream");
                        end = Some(End::ControlStalled);
                    } else if expiry_at <= now {
                        self.reply_error(0, ErrorCode::Unauthorized, "the token has expired");
                        end = Some(End::Unauthorized);
                    } else {
                        if !noticed && notice_at <= now {
                            noticed = true;
                            if let Some(expires_at) = expires_at(self) {
                                self.send(Frame::TokenExpiring { expires_at });
                            }
                        }
                        if self.unreported.due.is_some_and(|at| at <= now)
                            && let Some((request_id, ticket)) = self.unreported.report()
                        {
                            inflight += 1;
                            pending.push(self.acks_stored(request_id, Some(ticket)));
                        }
                    }
                }
                written = send.write(&self.out), if !self.out.is_empty() => match written {
                    Ok(n) if n > 0 => {
                        self.out.advance(n);
                        stall_at = None;
                        if self.out.is_empty() {
                            // Idle sessions hold no write buffer.
                            self.out = BytesMut::new();
                        }
                    }
                    // The client can no longer take replies.
                    _ => end = Some(End::ClientGone),
                },
                Some(answer) = pending.next(), if !pending.is_empty() => {
                    self.answer(answer, &mut inflight);
                }
                () = mailbox.notify.notified() => {
                    for (id, why) in mailbox.take_stopped() {
                        self.end_subscription(id, why.error_code(), &why.to_string());
                    }
                    for (channel, offset) in mailbox.take_markers() {
                        self.send(Frame::ReadMarker { channel, offset });
                    }
                }
                read = recv.read_buf(&mut buf), if may_read => match read {
                    Ok(n) if n > 0 => {
                        if n >= spare {
                            read_size = (read_size * 2).min(MAX_READ_BUFFER);
                        } else if n <= read_size / 4 {
                            read_size = (read_size / 2).max(MIN_READ_BUFFER);
                        }
                    }
                    _ => end = Some(End::ClientGone),
                },
            }
        }
        if end == Some(End::Replaced) {
            // The newer session of the device waits for this one's place
            // among the user's connections: free it before the last acks
            // are drained.
            self.gate = PublishGate::unlimited();
            self.ended.cancel();
        }
        // Publishes already handed to the log get their acks (or errors):
        // a client is never left guessing about a request we accepted.
        let drain = async {
            while let Some(answer) = pending.next().await {
                self.answer(answer, &mut inflight);
            }
        };
        // Except on a node cut off from its cluster: its publishes cannot
        // commit here, and the client, told at once, sends them again
        // elsewhere under the same producer sequences (stored once).
        let drain_for = match end {
            Some(End::Unavailable) => Duration::ZERO,
            _ => DRAIN_TIMEOUT,
        };
        let _ = Box::pin(tokio::time::timeout(drain_for, drain)).await;
        end.unwrap_or(End::ClientGone)
    }

    async fn welcome(&mut self, session_id: u64, hello: Hello) -> Result<(), End> {
        if !(MIN_PROTOCOL_VERSION..=PROTOCOL_VERSION).contains(&hello.protocol) {
            self.reply_error(
                0,
                ErrorCode::UnsupportedVersion,
                &format!(
                    "protocol {} is not supported; this broker speaks \
                     {MIN_PROTOCOL_VERSION} to {PROTOCOL_VERSION}",
                    hello.protocol
                ),
            );
            return Err(End::ProtocolError);
        }
        // The session speaks the client's version (it is one we speak).
        let hello_protocol = hello.protocol;
        // A client certificate the transport verified is a backend
        // service's identity; everyone else shows a token.
        let authenticated = match self.conn.peer_identity() {
            Some(name) => Ok(Identity::service(name)),
            None => self.ctx.authenticator.authenticate(&hello.token),
        };
        let identity = match authenticated {
            Ok(identity) => identity,
            Err(e) => {
                debug!(client = %hello.client, error = %e, "token refused");
                self.reply_error(0, ErrorCode::Unauthorized, &e.to_string());
                return Err(End::Unauthorized);
            }
        };
        let device = match hello.device.as_deref().map(DeviceId::new).transpose() {
            Ok(device) => device,
            Err(why) => {
                self.reply_error(0, ErrorCode::BadRequest, why);
                return Err(End::ProtocolError);
            }
        };
        if let Some(bound) = &identity.device
            && device.as_ref().is_none_or(|d| d.as_str() != bound)
        {
            let msg = format!("the token is for device {bound}; say it in Hello");
            self.reply_error(0, ErrorCode::Unauthorized, &msg);
            return Err(End::Unauthorized);
        }
        // A node that cannot serve refuses before it touches anything (a
        // takeover would close the device's other, working, connection).
        if !self.ctx.serving.load(Ordering::SeqCst) {
            self.reply_error(0, ErrorCode::Unavailable, CUT_OFF);
            return Err(End::Unavailable);
        }
        // Takeover is between clients that know it is final (protocol 4):
        // older ones would reconnect, and two of one device take over from
        // each other forever.
        if let Some(device) = device
            .as_ref()
            .filter(|_| hello_protocol >= TAKEOVER_VERSION)
        {
            self.took_over = Some((identity.user.clone(), device.as_str().to_owned()));
            if let Some(old) =
                self.ctx
                    .sessions
                    .take_over(&identity.user, device.as_str(), session_id)
            {
                debug!(
                    device = device.as_str(),
                    "a newer connection of the device takes over"
                );
                let _ = Box::pin(tokio::time::timeout(TAKEOVER_WAIT, old.cancelled())).await;
            }
        }
        if !identity.server {
            match self.ctx.limiter.open_user_connection(&identity.user) {
                Ok(gate) => self.gate = gate,
                Err(e) => {
                    debug!(client = %hello.client, error = %e, "connection refused");
                    self.reply_error(0, ErrorCode::TooManyConnections, &e.to_string());
                    return Err(End::LimitExceeded);
                }
            }
        }
        // Registered once the connection is admitted: a refused one leaves
        // no device behind.
        if let (Some(device), Some(devices)) = (&device, &self.ctx.devices)
            && let Err(e) = devices.register(&identity.user, device).await
        {
            let code = device_error_code(&e);
            self.reply_error(0, code, &e.to_string());
            return Err(match code {
                ErrorCode::TooManyDevices => End::LimitExceeded,
                _ => End::ClientGone,
            });
        }
        debug!(
            client = %hello.client,
            user = %identity.user,
            device = device.as_ref().map(DeviceId::as_str),
            server = identity.server,
            "hello"
        );
        let user = identity.user.clone();
        self.identity = Some(identity);
        // Only sessions of a named device hear of markers: it is devices
        // whose badges they clear, and an anonymous connection (a backend,
        // a load generator) carries no entry for it.
        if let (Some(devices), Some(_)) = (&self.ctx.devices, &device)
            && hello_protocol >= MARKER_EVENTS_VERSION
        {
            devices.listen(&user, session_id, self.mailbox.clone());
        }
        self.device = device;
        self.reports_acks = hello_protocol >= ACK_REPORTS_VERSION;
        let limits = &self.ctx.config.limits;
        self.send(Frame::Welcome(Welcome {
            session_id,
            protocol: hello_protocol,
            max_frame: limits.max_frame(),
            max_payload: limits.max_payload,
            max_subscriptions: limits.max_subscriptions,
        }));
        self.welcomed = true;
        self.ctx.metrics.connections.inc();
        self.ctx.metrics.connections_opened.inc();
        self.ctx.sessions.0.insert(
            session_id,
            Arc::new(SessionInfo {
                id: session_id,
                user,
                client: hello.client,
                remote: self.conn.remote(),
                connected_at: SystemTime::now(),
                subscriptions: AtomicUsize::new(0),
                kick: self.kick.clone(),
                kick_reason: self.kick_reason.clone(),
                ended: self.ended.clone(),
            }),
        );
        Ok(())
    }

    /// Handles one request other than a publish; a request whose answer
    /// waits on storage returns that wait.
    async fn handle(&mut self, frame: Frame) -> Option<PendingAcks> {
        match frame {
            Frame::Subscribe(subscribe) => self.subscribe(subscribe).await,
            Frame::Unsubscribe {
                request_id,
                subscription,
            } => self.unsubscribe(request_id, subscription),
            Frame::Ping { request_id } => self.send(Frame::Pong { request_id }),
            Frame::Refresh { request_id, token } => self.refresh(request_id, &token),
            Frame::Ack {
                request_id,
                channel,
                offset,
            } => {
                return self
                    .store_mark(request_id, channel, offset, MarkKind::Cursor)
                    .await;
            }
            Frame::MarkRead {
                request_id,
                channel,
                offset,
            } => {
                return self
                    .store_mark(request_id, channel, offset, MarkKind::Read)
                    .await;
            }
            Frame::Unread {
                request_id,
                channels,
            } => self.unread(request_id, channels).await,
            Frame::InitProducer {
                request_id,
                producer_id,
            } => return Some(self.init_producer(request_id, producer_id)),
            Frame::FlushAcks { request_id } => {
                let ticket = self.unreported.flush();
                return Some(self.acks_stored(request_id, ticket));
            }
            other => {
                self.reply_error(
                    other.request_id().unwrap_or(0),
                    ErrorCode::UnexpectedFrame,
                    &format!("{:?} is not a request", other.frame_type()),
                );
            }
        }
        None
    }

    /// The device state and the session's user, or the refusal to send:
    /// `Unsupported` where the broker keeps no device state.
    fn devices(&self) -> Result<(Arc<Devices>, String), (ErrorCode, String)> {
        let devices = self.ctx.devices.clone().ok_or((
            ErrorCode::Unsupported,
            "this broker keeps no device state".to_owned(),
        ))?;
        let user = self
            .identity
            .as_ref()
            .map(|i| i.user.clone())
            .unwrap_or_default();
        Ok((devices, user))
    }

    /// The channel's metadata for a position stored on it: the channel must
    /// be readable by the session, durable, and hold `offset`.
    async fn markable(
        &self,
        channel: &ChannelName,
        offset: Offset,
    ) -> Result<crate::store::ChannelMeta, (ErrorCode, String)> {
        if !self
            .identity
            .as_ref()
            .is_some_and(|i| i.may_subscribe(channel))
        {
            return Err((
                ErrorCode::Forbidden,
                format!("this token may not read {channel}"),
            ));
        }
        if self
            .ctx
            .config
            .namespaces
            .get(channel.namespace())
            .is_some_and(|ns| !ns.persistent)
        {
            return Err((
                ErrorCode::BadRequest,
                format!("{channel} is ephemeral: it keeps no cursors or read markers"),
            ));
        }
        let meta = match self.ctx.logs.for_channel(channel).lookup(channel).await {
            Ok(Some(meta)) => meta,
            Ok(None) => {
                return Err((
                    ErrorCode::BadRequest,
                    format!("there is no channel {channel}"),
                ));
            }
            Err(e) => {
                return Err((
                    ErrorCode::StorageUnavailable,
                    format!("cannot read {channel}: {e}"),
                ));
            }
        };
        let head = meta.next_offset.get().saturating_sub(1);
        if offset < Offset::FIRST || offset.get() > head {
            return Err((
                ErrorCode::BadRequest,
                format!(
                    "offset {} is not a message of {channel} (its last is {head})",
                    offset.get()
                ),
            ));
        }
        Ok(meta)
    }

    /// `Ack` (the device's cursor) or `MarkRead` (the user's marker): the
    /// value goes to the devices thread; `Stored` is sent once it is
    /// durable (and a moved marker announced to the user's other devices).
    async fn store_mark(
        &mut self,
        request_id: u64,
        channel: ChannelName,
        offset: Offset,
        kind: MarkKind,
    ) -> Option<PendingAcks> {
        let checked = async {
            let (devices, user) = self.devices()?;
            let device = self.device.clone().ok_or((
                ErrorCode::DeviceRequired,
                "name the device in Hello to store positions".to_owned(),
            ))?;
            let meta = self.markable(&channel, offset).await?;
            Ok((devices, user, device, meta))
        };
        let (devices, user, device, meta) = match Box::pin(checked).await {
            Ok(checked) => checked,
            Err((code, msg)) => {
                self.reply_error(request_id, code, &msg);
                return None;
            }
        };
        let mark = Mark {
            offset,
            channel_id: devices.incarnation().of(&meta),
            updated_ms: crate::log::now_ms(),
        };
        let ticket: Ticket = match kind {
            MarkKind::Cursor => {
                self.ctx.metrics.cursor_acks.inc();
                let ticket = devices.ack(&user, &device, &channel, mark);
                if self.reports_acks {
                    // No reply of its own: the next report covers it.
                    let every = Duration::from_millis(self.ctx.config.cursors.report_ms);
                    self.unreported.add(request_id, ticket, every);
                    return None;
                }
                ticket
            }
            MarkKind::Read => {
                self.ctx.metrics.read_marks.inc();
                devices.mark_read(&user, &channel, mark)
            }
        };
        let session = self.id;
        Some(Box::pin(async move {
            let stored = devices.stored(ticket).await;
            if stored.is_ok() && matches!(kind, MarkKind::Read) {
                // The user's other devices hear of the marker as it now
                // stands, once durable: max wins, so a `MarkRead` below it
                // announces the larger one, never a step back.
                let now = devices.markers(&user, std::slice::from_ref(&channel)).await;
                if let Ok(Some(marker)) = now.map(|m| m.into_iter().flatten().next()) {
                    devices.announce(&user, session, &channel, marker.offset);
                }
            }
            Answer::Stored(request_id, stored)
        }))
    }

    /// `Stored { request_id }` once `ticket` (of the latest `Ack` it
    /// covers, if any) is durable: a report of the client's `Ack`s up to
    /// `request_id`, or the answer to its `FlushAcks`.
    fn acks_stored(&self, request_id: u64, ticket: Option<Ticket>) -> PendingAcks {
        let devices = self.ctx.devices.clone();
        Box::pin(async move {
            let stored = match (devices, ticket) {
                (Some(devices), Some(ticket)) => devices.stored(ticket).await,
                _ => Ok(()),
            };
            Answer::Stored(request_id, stored)
        })
    }

    /// `Unread`: the calling user's unread count per channel, from the
    /// channels' heads and the user's markers (no log is read).
    async fn unread(&mut self, request_id: u64, channels: Vec<ChannelName>) {
        let may_read = |c: &ChannelName| self.identity.as_ref().is_some_and(|i| i.may_subscribe(c));
        let counted = async {
            let (devices, user) = self.devices()?;
            if let Some(c) = channels.iter().find(|c| !may_read(c)) {
                return Err((ErrorCode::Forbidden, format!("this token may not read {c}")));
            }
            devices
                .unread(
                    &self.ctx.logs,
                    &user,
                    channels,
                    MAX_UNREAD_CHANNELS,
                    may_read,
                )
                .await
                .map_err(|e| (device_error_code(&e), e.to_string()))
        };
        match Box::pin(counted).await {
            Ok(counts) => {
                let counts = counts
                    .into_iter()
                    .map(|(channel, count)| UnreadCount {
                        channel,
                        head: count.head,
                        read: count.read,
                        unread: count.unread,
                    })
                    .collect();
                self.send(Frame::UnreadCounts { request_id, counts });
            }
            Err((code, msg)) => self.reply_error(request_id, code, &msg),
        }
    }

    /// Sends the answer of a request that waited on storage.
    fn answer(&mut self, answer: Answer, inflight: &mut usize) {
        match answer {
            Answer::Appends((request_ids, started, outcomes)) => {
                *inflight -= request_ids.len();
                self.reply_appends(&request_ids, started, outcomes);
            }
            Answer::Stored(request_id, result) => {
                *inflight -= 1;
                match result {
                    Ok(()) => self.send(Frame::Stored { request_id }),
                    Err(e) => self.reply_error(request_id, device_error_code(&e), &e.to_string()),
                }
            }
            Answer::ProducerReady(request_id, result) => {
                *inflight -= 1;
                match result {
                    Ok(last_sequence) => self.send(Frame::ProducerReady {
                        request_id,
                        last_sequence,
                    }),
                    Err(e) => self.reply_error(request_id, e.error_code(), &e.to_string()),
                }
            }
        }
    }

    /// Where `producer_id`'s sequences stand for the session's identity:
    /// the highest any log (durable, in-memory) remembers, asked after
    /// every publish the logs already hold.
    fn init_producer(&self, request_id: u64, producer_id: u64) -> PendingAcks {
        let owner = self
            .identity
            .as_ref()
            .map(Identity::owner)
            .unwrap_or_else(|| "".into());
        let key = ProducerKey::new(owner, producer_id);
        let logs = self.ctx.logs.clone();
        Box::pin(async move {
            let mut last = 0;
            for log in logs.all() {
                match log.last_sequence(key.clone()).await {
                    Ok(sequence) => last = last.max(sequence),
                    Err(e) => return Answer::ProducerReady(request_id, Err(e)),
                }
            }
            Answer::ProducerReady(request_id, Ok(last))
        })
    }

    /// Checks a publish against the session's rights and limits: the input
    /// to append when it may be, otherwise `None`, the refusal sent.
    async fn admit_publish(&mut self, publish: Publish) -> Option<AppendInput> {
        let Publish {
            request_id,
            channel,
            producer,
            after,
            payload,
        } = publish;
        let max = self.ctx.config.limits.max_payload;
        self.ctx.metrics.bytes_in.inc_by(payload.len() as u64);
        if !self
            .identity
            .as_ref()
            .is_some_and(|i| i.may_publish(&channel))
        {
            self.count_publish_error(ErrorCode::Forbidden);
            let msg = format!("this token may not publish to {channel}");
            self.reply_error(request_id, ErrorCode::Forbidden, &msg);
            return None;
        }
        let namespace = self.ctx.config.namespaces.get(channel.namespace());
        if namespace.is_some_and(|ns| ns.publishers == Publishers::Server)
            && !self.identity.as_ref().is_some_and(|i| i.server)
        {
            self.count_publish_error(ErrorCode::Forbidden);
            let msg = format!(
                "only server-side identities may publish to the {} namespace",
                channel.namespace()
            );
            self.reply_error(request_id, ErrorCode::Forbidden, &msg);
            return None;
        }
        if let Err(e) = self.gate.check() {
            self.count_publish_error(ErrorCode::RateLimited);
            self.reply_error(request_id, ErrorCode::RateLimited, &e.to_string());
            return None;
        }
        if payload.len() > max as usize {
            self.count_publish_error(ErrorCode::PayloadTooLarge);
            self.reply_error(
                request_id,
                ErrorCode::PayloadTooLarge,
                &format!(
                    "payload of {} bytes exceeds the limit of {max}",
                    payload.len()
                ),
            );
            return None;
        }
        let log = self.ctx.logs.for_channel(&channel);
        if self.gate.limits_creations() && log.meta(&channel).is_none() {
            // Not resident: it may not exist, and creating channels is
            // limited per user (each is state kept until deleted).
            let refusal = match log.lookup(&channel).await {
                Ok(Some(_)) => None,
                Ok(None) => self.gate.check_creation().err().map(|e| {
                    self.ctx.metrics.channel_creations_refused.inc();
                    (ErrorCode::RateLimited, e.to_string())
                }),
                Err(e) => Some((ErrorCode::StorageUnavailable, e.to_string())),
            };
            if let Some((code, msg)) = refusal {
                self.count_publish_error(code);
                self.reply_error(request_id, code, &msg);
                return None;
            }
        }
        // Idempotence state is the authenticated identity's: a client can
        // name any producer id, but only within its own windows.
        let producer = match (producer, &self.identity) {
            (Some(seq), Some(identity)) => Some(ProducerRef {
                key: ProducerKey::new(identity.owner(), seq.producer_id),
                sequence: seq.sequence,
                after,
                limited: !identity.server,
            }),
            _ => None,
        };
        Some(AppendInput {
            channel,
            producer,
            payload,
        })
    }

    /// Hands an admitted batch to its log; its acks join `pending`.
    async fn submit(
        &self,
        batch: Option<PublishBatch>,
        pending: &mut FuturesUnordered<PendingAcks>,
        inflight: &mut usize,
    ) {
        let Some(PublishBatch {
            log,
            request_ids,
            inputs,
            started,
        }) = batch
        else {
            return;
        };
        *inflight += inputs.len();
        // Submitted in request order, so one connection's publishes are
        // sequenced in the order it sent them; only the acks overlap.
        // Boxed: a replicated log's submit is a large state.
        let acks = Box::pin(log.submit_batch(inputs)).await;
        pending.push(Box::pin(async move {
            Answer::Appends((request_ids, started, acks.outcomes().await))
        }));
    }

    fn count_publish_error(&self, code: ErrorCode) {
        self.ctx
            .metrics
            .publish_errors
            .with_label_values(&[&code.to_string()])
            .inc();
    }

    /// Answers a committed batch: its acks and refusals, written to the
    /// control stream together.
    fn reply_appends(
        &mut self,
        request_ids: &[u64],
        started: Instant,
        outcomes: Vec<Result<Appended, AppendError>>,
    ) {
        let metrics = &self.ctx.metrics;
        let took = started.elapsed().as_secs_f64();
        self.out.reserve(request_ids.len() * ACK_FRAME_BYTES);
        for (&request_id, outcome) in request_ids.iter().zip(outcomes) {
            let reply = match outcome {
                Ok(appended) => {
                    metrics.publishes.inc();
                    metrics.publish_ack_seconds.observe(took);
                    Frame::Published {
                        request_id,
                        offset: appended.offset,
                        epoch: appended.epoch,
                        duplicate: appended.duplicate,
                    }
                }
                Err(e) => {
                    self.count_publish_error(e.error_code());
                    Frame::Error(ErrorFrame {
                        request_id,
                        code: e.error_code(),
                        message: e.to_string(),
                    })
                }
            };
            volna_proto::encode(&reply, &mut self.out);
        }
    }

    async fn subscribe(&mut self, subscribe: Subscribe) {
        let Subscribe {
            request_id,
            channel,
            position,
        } = subscribe;
        if !self
            .identity
            .as_ref()
            .is_some_and(|i| i.may_subscribe(&channel))
        {
            let msg = format!("this token may not subscribe to {channel}");
            return self.reply_error(request_id, ErrorCode::Forbidden, &msg);
        }
        if self.by_channel.contains_key(&channel) {
            let msg = format!("already subscribed to {channel}");
            return self.reply_error(request_id, ErrorCode::AlreadySubscribed, &msg);
        }
        let max = self.ctx.config.limits.max_subscriptions as usize;
        if self.subscriptions.len() >= max {
            let msg = format!("a connection may hold {max} subscriptions");
            return self.reply_error(request_id, ErrorCode::TooManySubscriptions, &msg);
        }
        if matches!(position, Position::From { offset, .. } if offset < Offset::FIRST) {
            let msg = "offsets start at 1";
            return self.reply_error(request_id, ErrorCode::BadRequest, msg);
        }
        let log = self.ctx.logs.for_channel(&channel).clone();
        // Registered before the metadata is read, so that a commit in
        // between reaches the feed or the metadata (or both).
        let feed = self.ctx.fanout.subscribe(&channel);
        // A replica that lags (or is restoring) may not know what the
        // device saw elsewhere: where its answer would make the device
        // start over or skip, the partition's leader is asked instead.
        let doubtful = |meta: Option<&crate::store::ChannelMeta>| {
            meta.is_none()
                || (!matches!(position, Position::Cursor { .. })
                    && !subscription::resolve_start(&channel, position, meta.copied())
                        .2
                        .is_empty())
        };
        let meta = match log.lookup_to_subscribe(&channel, doubtful).await {
            Ok(meta) => meta,
            Err(e) => {
                let msg = format!("cannot read {channel}: {e}");
                return self.reply_error(request_id, ErrorCode::StorageUnavailable, &msg);
            }
        };
        feed.observe(meta.as_ref());
        let position = match position {
            Position::Cursor { otherwise } => {
                match Box::pin(self.cursor_position(&channel, meta.as_ref())).await {
                    Ok(Some(after)) => Position::From {
                        offset: after.next(),
                        epoch: None,
                    },
                    Ok(None) => otherwise.position(),
                    Err((code, msg)) => return self.reply_error(request_id, code, &msg),
                }
            }
            other => other,
        };
        let (next, epoch, events) = subscription::resolve_start(&channel, position, meta);
        let id = SubscriptionId(self.next_subscription);
        self.next_subscription += 1;
        let cancel = self.cancel.child_token();
        self.subscriptions
            .insert(id, (channel.clone(), cancel.clone()));
        self.by_channel.insert(channel.clone(), id);
        self.count_subscriptions(1);
        self.send(Frame::Subscribed {
            request_id,
            subscription: id,
            epoch,
            start: next,
        });
        let conn = self.conn.clone();
        let metrics = self.ctx.metrics.clone();
        let stopped = self.mailbox.clone();
        let span = info_span!("subscription", id = %id, %channel);
        tokio::spawn(
            async move {
                let result = tokio::select! {
                    sink = conn.open_delivery() => match sink {
                        Ok(sink) => {
                            let start = Start {
                                id,
                                next,
                                events,
                                epoch,
                            };
                            subscription::run(start, feed, log, sink, cancel, metrics).await
                        }
                        Err(e) => Err(Stopped::Stream(e)),
                    },
                    () = cancel.cancelled() => Ok(()),
                };
                if let Err(why) = result {
                    // The session may be gone already; then so is the client.
                    stopped.report(id, why);
                }
            }
            .instrument(span),
        );
    }

    /// The offset this device last acknowledged on `channel` (as it is now:
    /// `meta`), if it has a cursor there.
    async fn cursor_position(
        &self,
        channel: &ChannelName,
        meta: Option<&crate::store::ChannelMeta>,
    ) -> Result<Option<Offset>, (ErrorCode, String)> {
        let (devices, user) = self.devices()?;
        let device = self.device.as_ref().ok_or((
            ErrorCode::DeviceRequired,
            "name the device in Hello to subscribe from its cursor".to_owned(),
        ))?;
        let mark = devices
            .cursor(&user, device, channel)
            .await
            .map_err(|e| (device_error_code(&e), e.to_string()))?;
        Ok(mark.and_then(|m| m.offset_in(meta, devices.incarnation())))
    }

    fn count_subscriptions(&self, delta: i64) {
        self.ctx.metrics.subscriptions.add(delta);
        if let Some(info) = self.ctx.sessions.0.get(&self.id) {
            if delta > 0 {
                info.subscriptions.fetch_add(1, Ordering::Relaxed);
            } else {
                info.subscriptions.fetch_sub(1, Ordering::Relaxed);
            }
        }
    }

    fn unsubscribe(&mut self, request_id: u64, id: SubscriptionId) {
        match self.subscriptions.remove(&id) {
            Some((channel, cancel)) => {
                self.by_channel.remove(&channel);
                self.count_subscriptions(-1);
                cancel.cancel();
                self.send(Frame::Unsubscribed { request_id });
            }
            None => {
                let msg = format!("no subscription {id} on this connection");
                self.reply_error(request_id, ErrorCode::NotSubscribed, &msg);
            }
        }
    }

    /// Removes a subscription the broker ends on its own (its delivery loop
    /// stopped, its grant was revoked) and tells the client, so that it is
    /// never left registered but quiet (G8).
    fn end_subscription(&mut self, id: SubscriptionId, code: ErrorCode, message: &str) {
        let Some((channel, cancel)) = self.subscriptions.remove(&id) else {
            // Unsubscribed meanwhile: the client no longer waits for it.
            return;
        };
        self.by_channel.remove(&channel);
        self.count_subscriptions(-1);
        cancel.cancel();
        debug!(subscription = %id, %channel, %code, message, "subscription ended by the broker");
        self.send(Frame::SubscriptionEnded {
            subscription: id,
            code,
            message: format!("subscription to {channel} ended: {message}"),
        });
    }

    /// Replaces the session's token with a newer one of the same user.
    fn refresh(&mut self, request_id: u64, token: &str) {
        let Some(current) = &self.identity else {
            return;
        };
        if current.server && current.expires_at.is_none() {
            let msg = "this session does not expire; there is nothing to refresh";
            return self.reply_error(request_id, ErrorCode::BadRequest, msg);
        }
        let identity = match self.ctx.authenticator.refresh(current, token) {
            Ok(identity) => identity,
            Err(e) => {
                // The session goes on under the old token until it expires.
                return self.reply_error(request_id, ErrorCode::Unauthorized, &e.to_string());
            }
        };
        if let Some(bound) = &identity.device
            && self.device.as_ref().is_none_or(|d| d.as_str() != bound)
        {
            let msg = format!("the new token is for device {bound}, not this session's");
            return self.reply_error(request_id, ErrorCode::Unauthorized, &msg);
        }
        // Rights shrink at once: subscriptions the new token does not grant end.
        let revoked: Vec<SubscriptionId> = self
            .subscriptions
            .iter()
            .filter(|(_, (channel, _))| !identity.may_subscribe(channel))
            .map(|(id, _)| *id)
            .collect();
        for id in revoked {
            let msg = "the new token does not grant this channel";
            self.end_subscription(id, ErrorCode::Forbidden, msg);
        }
        let expires_at = identity.expires_at.unwrap_or(0);
        self.identity = Some(identity);
        self.token_changed = true;
        self.send(Frame::Refreshed {
            request_id,
            expires_at,
        });
    }

    fn protocol_error(&mut self, request_id: u64, e: &DecodeError) -> End {
        warn!(error = %e, "protocol error; closing the connection");
        self.reply_error(request_id, e.error_code(), &e.to_string());
        End::ProtocolError
    }

    fn reply_error(&mut self, request_id: u64, code: ErrorCode, message: &str) {
        self.send(Frame::Error(ErrorFrame {
            request_id,
            code,
            message: message.to_owned(),
        }));
    }

    /// Queues a frame for the control stream: the session loop writes it.
    /// A client that does not read its replies stops being read (the
    /// loop reads no request while `MAX_UNSENT_CONTROL` bytes wait) and is
    /// ended by the stall limit, so what waits here stays bounded.
    fn send(&mut self, frame: Frame) {
        volna_proto::encode(&frame, &mut self.out);
    }
}

/// Which position a request stores.
#[derive(Debug, Clone, Copy)]
enum MarkKind {
    /// The device's cursor (`Ack`).
    Cursor,
    /// The user's read marker (`MarkRead`).
    Read,
}

/// The wire code for a device-state failure.
fn device_error_code(e: &DeviceError) -> ErrorCode {
    match e {
        DeviceError::TooManyDevices { .. } => ErrorCode::TooManyDevices,
        DeviceError::Storage(_) => ErrorCode::StorageUnavailable,
        DeviceError::Closed => ErrorCode::ShuttingDown,
    }
}

/// Where a session hears what happens elsewhere: its delivery loops that
/// stopped on their own (each at most once, so at most `max_subscriptions`
/// wait) and read markers moved on the user's other devices (the latest
/// per channel, at most [`MAX_MARKER_EVENTS`]). Mutexes and a `Notify`,
/// not channels: a channel's first block of slots is allocated with it,
/// and every idle connection would carry it.
#[derive(Default)]
struct Mailbox {
    stopped: std::sync::Mutex<Vec<(SubscriptionId, Stopped)>>,
    markers: std::sync::Mutex<Vec<(ChannelName, Offset)>>,
    notify: tokio::sync::Notify,
}

impl Mailbox {
    fn report(&self, id: SubscriptionId, why: Stopped) {
        lock(&self.stopped).push((id, why));
        // Stored as a permit when the session is not waiting right now.
        self.notify.notify_one();
    }

    fn take_stopped(&self) -> Vec<(SubscriptionId, Stopped)> {
        std::mem::take(&mut *lock(&self.stopped))
    }

    fn take_markers(&self) -> Vec<(ChannelName, Offset)> {
        std::mem::take(&mut *lock(&self.markers))
    }
}

impl MarkerListener for Mailbox {
    fn marker_moved(&self, channel: &ChannelName, offset: Offset) {
        {
            let mut markers = lock(&self.markers);
            if let Some((_, held)) = markers.iter_mut().find(|(c, _)| c == channel) {
                *held = (*held).max(offset);
            } else {
                if markers.len() == MAX_MARKER_EVENTS {
                    markers.remove(0);
                }
                markers.push((channel.clone(), offset));
            }
        }
        self.notify.notify_one();
    }
}

fn lock<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

enum ReadError {
    Gone,
    Decode(DecodeError),
}

async fn read_frame(
    recv: &mut (impl AsyncRead + Unpin),
    buf: &mut BytesMut,
    limits: &Limits,
) -> Result<Frame, ReadError> {
    loop {
        match volna_proto::decode(buf, limits) {
            Ok(Some(frame)) => return Ok(frame),
            Ok(None) => {}
            Err(e) => return Err(ReadError::Decode(e)),
        }
        match recv.read_buf(buf).await {
            Ok(n) if n > 0 => {}
            _ => return Err(ReadError::Gone),
        }
    }
}
