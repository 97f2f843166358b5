//! One shard's loop and the table of its connections.
//!
//! The table ([`ShardState`]) sits behind one mutex that the loop and the
//! shard's sessions share: a session writing to a stream locks it, hands
//! the bytes to `quinn-proto`, marks its connection dirty and, when it is
//! the first to, wakes the loop; the loop flushes every dirty connection in
//! one pass. A message fanned out to a thousand subscribers of a shard is
//! therefore one loop wake-up and a burst of sends, not a thousand driver
//! tasks woken. Nothing under the lock waits: socket calls are
//! non-blocking, and a full socket parks the transmit until the loop sees
//! the socket writable again.

use std::collections::{BTreeSet, HashMap};
use std::io::IoSliceMut;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::Waker;
use std::time::Instant;

use bytes::BytesMut;
use quinn_proto::{
    ConnectionError, ConnectionHandle, DatagramEvent, Dir, EndpointConfig, Event, ServerConfig,
    StreamEvent, StreamId, Transmit, VarInt,
};
use quinn_udp::{RecvMeta, UdpSockRef, UdpSocketState};
use tokio::io::Interest;
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info_span, warn};
use volna_proto::CloseCode;

use super::owning_shard;
use super::streams::{ConnRef, ShardConnection};
use crate::limits::ConnectionSlot;
use crate::session::BrokerContext;
use crate::transport::{Admitter, Decision, close_reason};

/// Datagram buffers read per receive call.
const RECV_BATCH: usize = 32;
/// Receive calls per loop turn before timers and transmits get their turn.
const RECV_CALLS_PER_TURN: usize = 16;
/// Datagrams one connection may send per flush before the others get
/// theirs (it stays dirty and goes on in the next turn).
const TRANSMITS_PER_TURN: usize = 32;
/// Largest datagram a shard reads (QUIC's maximum UDP payload).
const MAX_DATAGRAM: usize = 64 * 1024;

/// A datagram another shard received for a connection of this one.
#[derive(Debug)]
pub(super) struct Forwarded {
    meta: RecvMeta,
    data: BytesMut,
}

/// One shard as its sessions see it: the connection table and the loop's
/// doorbell.
#[derive(Debug)]
pub(super) struct Shard {
    index: usize,
    state: Mutex<ShardState>,
    /// Rung by a session that made its connection dirty.
    wake: Notify,
    /// Rung when the last connection went.
    idle: Notify,
}

/// Everything the shard's loop and sessions share.
pub(super) struct ShardState {
    endpoint: quinn_proto::Endpoint,
    server_config: Arc<ServerConfig>,
    /// Boxed: a connection's state is kilobytes, and the table moves its
    /// entries when it grows.
    conns: HashMap<ConnectionHandle, Box<Conn>>,
    /// Each connection's next timeout, soonest first.
    timers: BTreeSet<(Instant, ConnectionHandle)>,
    /// Connections with events to process or packets to send.
    dirty: Vec<ConnectionHandle>,
    /// Set once the endpoint is closing: connections that arrive are
    /// refused.
    closing: Option<CloseCode>,
    /// Distinguishes a connection from a later one that reuses its handle.
    next_generation: u64,
    /// Connections accepted by the loop whose sessions are to be started.
    accepted: Vec<(ConnectionHandle, u64, ConnectionSlot)>,
}

impl std::fmt::Debug for ShardState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShardState")
            .field("connections", &self.conns.len())
            .field("closing", &self.closing)
            .finish_non_exhaustive()
    }
}

/// One connection in the shard's table.
pub(super) struct Conn {
    pub(super) proto: quinn_proto::Connection,
    pub(super) generation: u64,
    /// The timeout registered in the shard's timer set.
    timer: Option<Instant>,
    /// Queued in the shard's dirty list.
    dirty: bool,
    pub(super) connected: bool,
    /// Why the connection ended, once it has.
    pub(super) error: Option<ConnectionError>,
    pub(super) waiters: Waiters,
}

/// Tasks waiting on something of a connection. Empty until used: an idle
/// connection holds no allocation here.
#[derive(Default)]
pub(super) struct Waiters {
    pub(super) handshake: Option<Waker>,
    pub(super) accept_bi: Option<Waker>,
    pub(super) open_uni: Vec<Waker>,
    pub(super) readers: Vec<(StreamId, Waker)>,
    pub(super) writers: Vec<(StreamId, Waker)>,
    /// Waiting for a stream to be acknowledged in full or stopped.
    pub(super) stopped: Vec<(StreamId, Waker)>,
}

impl Waiters {
    fn wake_stream(list: &mut Vec<(StreamId, Waker)>, id: StreamId) {
        let mut i = 0;
        while i < list.len() {
            if list[i].0 == id {
                list.swap_remove(i).1.wake();
            } else {
                i += 1;
            }
        }
    }

    fn wake_all(&mut self) {
        self.handshake.take().into_iter().for_each(Waker::wake);
        self.accept_bi.take().into_iter().for_each(Waker::wake);
        self.open_uni.drain(..).for_each(Waker::wake);
        for list in [&mut self.readers, &mut self.writers, &mut self.stopped] {
            list.drain(..).for_each(|(_, w)| w.wake());
        }
    }
}

/// Registers `waker` for `id` in `list`, replacing the stream's previous one.
pub(super) fn park(list: &mut Vec<(StreamId, Waker)>, id: StreamId, waker: &Waker) {
    match list.iter_mut().find(|(s, _)| *s == id) {
        Some((_, w)) => w.clone_from(waker),
        None => list.push((id, waker.clone())),
    }
}

impl Shard {
    pub(super) fn new(
        index: usize,
        config: Arc<EndpointConfig>,
        server: Arc<ServerConfig>,
    ) -> Self {
        Self {
            index,
            state: Mutex::new(ShardState {
                endpoint: quinn_proto::Endpoint::new(config, Some(server.clone()), true, None),
                server_config: server,
                conns: HashMap::new(),
                timers: BTreeSet::new(),
                dirty: Vec::new(),
                closing: None,
                next_generation: 1,
                accepted: Vec::new(),
            }),
            wake: Notify::new(),
            idle: Notify::new(),
        }
    }

    /// The table. A panic while it was held (a bug) does not stop the
    /// other connections: the table's own invariants hold between calls.
    pub(super) fn lock(&self) -> MutexGuard<'_, ShardState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs `f` on connection `(handle, generation)` when it is still in
    /// the table; marks it dirty (and wakes the loop) when `f` says it has
    /// something to send.
    pub(super) fn with_conn<T>(
        &self,
        handle: ConnectionHandle,
        generation: u64,
        f: impl FnOnce(&mut Conn) -> (T, bool),
    ) -> Option<T> {
        let mut state = self.lock();
        let conn = state
            .conns
            .get_mut(&handle)
            .filter(|c| c.generation == generation)?;
        let (out, transmit) = f(conn);
        let ring = transmit && state.mark_dirty(handle);
        drop(state);
        if ring {
            self.wake.notify_one();
        }
        Some(out)
    }

    /// Closes every connection with `code`; later ones are refused.
    pub(super) fn close_all(&self, code: CloseCode) {
        let mut state = self.lock();
        state.closing = Some(code);
        let now = Instant::now();
        let handles: Vec<ConnectionHandle> = state.conns.keys().copied().collect();
        for handle in handles {
            if let Some(conn) = state.conns.get_mut(&handle) {
                conn.proto
                    .close(now, VarInt::from_u32(code.0), close_reason(code.reason()));
            }
            state.mark_dirty(handle);
        }
        drop(state);
        self.wake.notify_one();
    }

    /// Waits until the shard holds no connection.
    pub(super) async fn wait_idle(&self) {
        loop {
            let idle = self.idle.notified();
            tokio::pin!(idle);
            idle.as_mut().enable();
            if self.lock().conns.is_empty() {
                return;
            }
            idle.await;
        }
    }
}

impl ShardState {
    /// Queues `handle` for the loop; true when the list was empty (the
    /// loop may be asleep and needs the doorbell).
    pub(super) fn mark_dirty(&mut self, handle: ConnectionHandle) -> bool {
        let Some(conn) = self.conns.get_mut(&handle) else {
            return false;
        };
        if conn.dirty {
            return false;
        }
        conn.dirty = true;
        self.dirty.push(handle);
        self.dirty.len() == 1
    }

    fn next_timeout(&self) -> Option<Instant> {
        self.timers.first().map(|(at, _)| *at)
    }

    /// Gives every connection whose timer is due its timeout.
    fn expire_timers(&mut self, now: Instant) {
        while let Some(&(at, handle)) = self.timers.first() {
            if at > now {
                break;
            }
            self.timers.pop_first();
            if let Some(conn) = self.conns.get_mut(&handle) {
                conn.timer = None;
                conn.proto.handle_timeout(now);
            }
            self.mark_dirty(handle);
        }
    }

    /// Feeds one datagram to the endpoint.
    fn handle_datagram(
        &mut self,
        now: Instant,
        meta: &RecvMeta,
        data: BytesMut,
        io: &mut Transmitter,
        admitter: &mut Admitter,
    ) {
        let mut response = Vec::new();
        let ecn = meta.ecn.map(proto_ecn);
        match self
            .endpoint
            .handle(now, meta.addr, meta.dst_ip, ecn, data, &mut response)
        {
            Some(DatagramEvent::ConnectionEvent(handle, event)) => {
                if let Some(conn) = self.conns.get_mut(&handle) {
                    conn.proto.handle_event(event);
                    self.mark_dirty(handle);
                }
            }
            Some(DatagramEvent::NewConnection(incoming)) => {
                let remote = incoming.remote_address();
                let decision = match self.closing {
                    Some(_) => Decision::Refuse,
                    None => admitter.admit(
                        remote,
                        incoming.remote_address_validated(),
                        incoming.may_retry(),
                    ),
                };
                match decision {
                    Decision::Accept(slot) => {
                        let config = self.server_config.clone();
                        match self
                            .endpoint
                            .accept(incoming, now, &mut response, Some(config))
                        {
                            Ok((handle, proto)) => self.insert(handle, proto, slot),
                            Err(e) => {
                                debug!(%remote, error = %e.cause, "handshake refused");
                                if let Some(transmit) = e.response {
                                    io.respond(&transmit, &response);
                                }
                            }
                        }
                    }
                    Decision::Retry => match self.endpoint.retry(incoming, &mut response) {
                        Ok(transmit) => io.respond(&transmit, &response),
                        Err(e) => {
                            response.clear();
                            let transmit = self.endpoint.refuse(e.into_incoming(), &mut response);
                            io.respond(&transmit, &response);
                        }
                    },
                    Decision::Refuse => {
                        let transmit = self.endpoint.refuse(incoming, &mut response);
                        io.respond(&transmit, &response);
                    }
                }
            }
            Some(DatagramEvent::Response(transmit)) => io.respond(&transmit, &response),
            None => {}
        }
    }

    fn insert(
        &mut self,
        handle: ConnectionHandle,
        proto: quinn_proto::Connection,
        slot: ConnectionSlot,
    ) {
        let generation = self.next_generation;
        self.next_generation += 1;
        self.conns.insert(
            handle,
            Box::new(Conn {
                proto,
                generation,
                timer: None,
                dirty: false,
                connected: false,
                error: None,
                waiters: Waiters::default(),
            }),
        );
        self.mark_dirty(handle);
        self.accepted.push((handle, generation, slot));
    }

    /// Processes every dirty connection: endpoint events, application
    /// events (waking the tasks waiting on them), packets to send, its next
    /// timeout. When the socket fills, the rest stays dirty until it is
    /// writable.
    fn flush(&mut self, now: Instant, io: &mut Transmitter) {
        let dirty = std::mem::take(&mut self.dirty);
        let mut writable = true;
        for (i, &handle) in dirty.iter().enumerate() {
            if !writable {
                // The socket filled: the rest waits for it, in order.
                self.dirty.extend_from_slice(&dirty[i..]);
                break;
            }
            let Some(conn) = self.conns.get_mut(&handle) else {
                continue;
            };
            conn.dirty = false;
            match self.drive(handle, now, io) {
                Drive::Done => {}
                Drive::More => {
                    self.mark_dirty(handle);
                }
                Drive::SocketFull => {
                    self.mark_dirty(handle);
                    writable = false;
                }
            }
        }
    }

    fn drive(&mut self, handle: ConnectionHandle, now: Instant, io: &mut Transmitter) -> Drive {
        let Some(conn) = self.conns.get_mut(&handle) else {
            return Drive::Done;
        };
        // Endpoint events (retired or new connection IDs, drained) go to
        // the endpoint, whose answers go back to the connection.
        while let Some(event) = conn.proto.poll_endpoint_events() {
            if let Some(answer) = self.endpoint.handle_event(handle, event) {
                conn.proto.handle_event(answer);
            }
        }
        while let Some(event) = conn.proto.poll() {
            conn.on_event(event);
        }
        let mut outcome = Drive::Done;
        let mut sent = 0;
        while sent < TRANSMITS_PER_TURN {
            if io.blocked.is_some() {
                outcome = Drive::SocketFull;
                break;
            }
            io.buffer.clear();
            let Some(transmit) = conn
                .proto
                .poll_transmit(now, io.max_segments, &mut io.buffer)
            else {
                break;
            };
            sent += transmit
                .segment_size
                .map_or(1, |s| transmit.size.div_ceil(s));
            if !io.send(transmit) {
                outcome = Drive::SocketFull;
                break;
            }
        }
        if sent >= TRANSMITS_PER_TURN && matches!(outcome, Drive::Done) {
            outcome = Drive::More;
        }
        let timeout = conn.proto.poll_timeout();
        if timeout != conn.timer {
            if let Some(old) = conn.timer {
                self.timers.remove(&(old, handle));
            }
            if let Some(new) = timeout {
                self.timers.insert((new, handle));
            }
            conn.timer = timeout;
        }
        if conn.proto.is_drained() {
            if let Some(old) = conn.timer.take() {
                self.timers.remove(&(old, handle));
            }
            if let Some(mut gone) = self.conns.remove(&handle) {
                if gone.error.is_none() {
                    gone.error = Some(ConnectionError::LocallyClosed);
                }
                gone.waiters.wake_all();
            }
            return Drive::Done;
        }
        outcome
    }
}

/// What driving one connection left to do.
enum Drive {
    Done,
    /// It had more to send than one turn allows.
    More,
    SocketFull,
}

impl Conn {
    fn on_event(&mut self, event: Event) {
        match event {
            Event::HandshakeDataReady => {}
            Event::Connected => {
                self.connected = true;
                self.waiters
                    .handshake
                    .take()
                    .into_iter()
                    .for_each(Waker::wake);
            }
            Event::ConnectionLost { reason } => {
                self.error = Some(reason);
                self.waiters.wake_all();
            }
            Event::Stream(StreamEvent::Opened { dir: Dir::Bi }) => {
                self.waiters
                    .accept_bi
                    .take()
                    .into_iter()
                    .for_each(Waker::wake);
            }
            Event::Stream(StreamEvent::Opened { dir: Dir::Uni }) => {}
            Event::Stream(StreamEvent::Readable { id }) => {
                Waiters::wake_stream(&mut self.waiters.readers, id);
            }
            Event::Stream(StreamEvent::Writable { id }) => {
                Waiters::wake_stream(&mut self.waiters.writers, id);
            }
            Event::Stream(StreamEvent::Finished { id }) => {
                Waiters::wake_stream(&mut self.waiters.stopped, id);
            }
            Event::Stream(StreamEvent::Stopped { id, .. }) => {
                Waiters::wake_stream(&mut self.waiters.stopped, id);
                Waiters::wake_stream(&mut self.waiters.writers, id);
            }
            Event::Stream(StreamEvent::Available { dir: Dir::Uni }) => {
                self.waiters.open_uni.drain(..).for_each(Waker::wake);
            }
            Event::Stream(StreamEvent::Available { dir: Dir::Bi }) => {}
            Event::DatagramReceived | Event::DatagramsUnblocked => {}
        }
    }
}

/// The loop's half of a shard: its socket and buffers.
#[derive(Debug)]
pub(super) struct ShardIo {
    socket: tokio::net::UdpSocket,
    state: UdpSocketState,
    /// The shards' queues, indexed by shard, for migrated connections.
    peers: Vec<mpsc::Sender<Forwarded>>,
    forwarded: mpsc::Receiver<Forwarded>,
}

impl ShardIo {
    pub(super) fn new(
        socket: std::net::UdpSocket,
        peers: Vec<mpsc::Sender<Forwarded>>,
        forwarded: mpsc::Receiver<Forwarded>,
    ) -> std::io::Result<Self> {
        let state = UdpSocketState::new(UdpSockRef::from(&socket))?;
        socket.set_nonblocking(true)?;
        let socket = tokio::net::UdpSocket::from_std(socket)?;
        Ok(Self {
            socket,
            state,
            peers,
            forwarded,
        })
    }
}

/// Sends a shard's packets; remembers the one a full socket refused.
struct Transmitter<'a> {
    socket: &'a tokio::net::UdpSocket,
    state: &'a UdpSocketState,
    max_segments: usize,
    buffer: Vec<u8>,
    blocked: Option<(Transmit, Vec<u8>)>,
}

impl Transmitter<'_> {
    /// Sends `transmit` (its bytes in `self.buffer`); false when the socket
    /// is full (the packet is kept for [`Transmitter::retry`]).
    fn send(&mut self, transmit: Transmit) -> bool {
        match self.try_send(&transmit, &self.buffer[..transmit.size]) {
            Ok(()) => true,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                self.blocked = Some((transmit, std::mem::take(&mut self.buffer)));
                false
            }
            Err(e) => {
                // An unreachable destination or the like: the packet is
                // lost, as on the network; QUIC's recovery resends.
                debug!(error = %e, destination = %transmit.destination, "send failed");
                true
            }
        }
    }

    /// Sends the packet a full socket refused; false while it still is.
    fn retry(&mut self) -> bool {
        let Some((transmit, bytes)) = self.blocked.take() else {
            return true;
        };
        match self.try_send(&transmit, &bytes[..transmit.size]) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                self.blocked = Some((transmit, bytes));
                false
            }
            _ => true,
        }
    }

    /// A stateless answer (Retry, refusal, reset, version negotiation):
    /// sent if the socket has room, else dropped — the peer retries.
    fn respond(&mut self, transmit: &Transmit, bytes: &[u8]) {
        let _ = self.try_send(transmit, &bytes[..transmit.size]);
    }

    fn try_send(&self, transmit: &Transmit, bytes: &[u8]) -> std::io::Result<()> {
        let udp = quinn_udp::Transmit {
            destination: transmit.destination,
            ecn: transmit.ecn.map(udp_ecn),
            contents: bytes,
            segment_size: transmit.segment_size,
            src_ip: transmit.src_ip,
        };
        self.socket.try_io(Interest::WRITABLE, || {
            self.state.send(UdpSockRef::from(self.socket), &udp)
        })
    }
}

/// The shard's loop: until `stop`, receive, time out, flush, and start the
/// sessions of connections it accepted.
pub(super) async fn run(
    shard: Arc<Shard>,
    mut io: ShardIo,
    ctx: Arc<BrokerContext>,
    stop: CancellationToken,
) {
    let mut admitter = Admitter::new(ctx.clone());
    let gro = io.state.gro_segments().max(1);
    let socket = &io.socket;
    let mut recv_buf = vec![0u8; MAX_DATAGRAM.min(1500 * gro) * RECV_BATCH];
    let mut tx = Transmitter {
        socket: &io.socket,
        state: &io.state,
        max_segments: io.state.max_gso_segments().max(1),
        buffer: Vec::with_capacity(1500),
        blocked: None,
    };
    let span = info_span!("shard", index = shard.index);
    async {
        loop {
            let next_timeout = shard.lock().next_timeout();
            let sleep = async {
                match next_timeout {
                    Some(at) => tokio::time::sleep_until(at.into()).await,
                    None => std::future::pending().await,
                }
            };
            let wait_writable = tx.blocked.is_some();
            tokio::select! {
                biased;
                () = stop.cancelled() => break,
                ready = socket.readable() => {
                    if let Err(e) = ready {
                        warn!(error = %e, "socket failed; the shard stops");
                        break;
                    }
                    receive(&shard, &mut tx, &mut recv_buf, &io.peers, &mut admitter, &ctx);
                }
                Some(datagram) = io.forwarded.recv() => {
                    let now = Instant::now();
                    shard.lock().handle_datagram(now, &datagram.meta, datagram.data, &mut tx, &mut admitter);
                }
                ready = socket.writable(), if wait_writable => {
                    if ready.is_ok() {
                        tx.retry();
                    }
                }
                () = shard.wake.notified() => {}
                () = sleep => {}
            }
            let accepted = {
                let now = Instant::now();
                let mut state = shard.lock();
                state.expire_timers(now);
                state.flush(now, &mut tx);
                let empty = state.conns.is_empty();
                let accepted = std::mem::take(&mut state.accepted);
                drop(state);
                if empty {
                    shard.idle.notify_waiters();
                }
                accepted
            };
            for (handle, generation, slot) in accepted {
                let conn = ConnRef::new(shard.clone(), handle, generation);
                tokio::spawn(connection_task(conn, ctx.clone(), slot));
            }
            if !shard.lock().dirty.is_empty() && tx.blocked.is_none() {
                // More to send than one turn allowed: go again after
                // letting the sessions run.
                shard.wake.notify_one();
                tokio::task::yield_now().await;
            }
        }
    }
    .instrument(span)
    .await;
}

/// Reads datagrams until the socket is empty or the turn's budget is spent.
fn receive(
    shard: &Shard,
    tx: &mut Transmitter<'_>,
    recv_buf: &mut [u8],
    peers: &[mpsc::Sender<Forwarded>],
    admitter: &mut Admitter,
    ctx: &BrokerContext,
) {
    let slot = recv_buf.len() / RECV_BATCH;
    for _ in 0..RECV_CALLS_PER_TURN {
        let mut metas = [RecvMeta::default(); RECV_BATCH];
        let mut iovs: Vec<IoSliceMut<'_>> =
            recv_buf.chunks_mut(slot).map(IoSliceMut::new).collect();
        let received = tx.socket.try_io(Interest::READABLE, || {
            tx.state
                .recv(UdpSockRef::from(tx.socket), &mut iovs, &mut metas)
        });
        let count = match received {
            Ok(count) => count,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
            // ICMP errors surface as ECONNRESET on some systems: QUIC
            // ignores them (they can be forged).
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => continue,
            Err(e) => {
                debug!(error = %e, "receive failed");
                return;
            }
        };
        let now = Instant::now();
        let mut state = shard.lock();
        for (meta, iov) in metas.iter().zip(iovs.iter()).take(count) {
            let stride = meta.stride.max(1);
            let mut data = BytesMut::from(&iov[..meta.len]);
            while !data.is_empty() {
                let datagram = data.split_to(stride.min(data.len()));
                if let Some(owner) = owning_shard(&datagram)
                    && owner != shard.index
                    && let Some(peer) = peers.get(owner)
                {
                    // A migrated connection: its owner decodes it. Dropped
                    // when the owner is that far behind, as the socket would.
                    if peer
                        .try_send(Forwarded {
                            meta: *meta,
                            data: datagram,
                        })
                        .is_ok()
                    {
                        ctx.metrics.datagrams_forwarded.inc();
                    }
                    continue;
                }
                state.handle_datagram(now, meta, datagram, tx, admitter);
            }
        }
    }
    // The budget ran out with data left: come back after the rest of the
    // turn.
    shard.wake.notify_one();
}

/// One connection's life above the transport: handshake, control stream,
/// session.
async fn connection_task(conn: ConnRef, ctx: Arc<BrokerContext>, mut slot: ConnectionSlot) {
    let remote = conn
        .remote()
        .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0)));
    let span = info_span!("conn", %remote);
    async move {
        if let Err(e) = conn.handshake().await {
            return debug!(error = %e, "handshake failed");
        }
        slot.established();
        ctx.metrics.handshakes.inc();
        let control = tokio::time::timeout(ctx.config.hello_timeout(), conn.accept_bi()).await;
        let stream = match control {
            Ok(Ok(stream)) => stream,
            Ok(Err(e)) => {
                return debug!(error = %e, "connection ended before its control stream");
            }
            Err(_) => {
                let code = CloseCode::HELLO_TIMEOUT;
                return conn.close(code, code.reason());
            }
        };
        let connection = ShardConnection::new(conn);
        let (recv, send) = connection.control(stream);
        crate::session::run(ctx, Arc::new(connection), recv, send).await;
        drop(slot);
    }
    .instrument(span)
    .await;
}

fn proto_ecn(ecn: quinn_udp::EcnCodepoint) -> quinn_proto::EcnCodepoint {
    match ecn {
        quinn_udp::EcnCodepoint::Ect0 => quinn_proto::EcnCodepoint::Ect0,
        quinn_udp::EcnCodepoint::Ect1 => quinn_proto::EcnCodepoint::Ect1,
        quinn_udp::EcnCodepoint::Ce => quinn_proto::EcnCodepoint::Ce,
    }
}

fn udp_ecn(ecn: quinn_proto::EcnCodepoint) -> quinn_udp::EcnCodepoint {
    match ecn {
        quinn_proto::EcnCodepoint::Ect0 => quinn_udp::EcnCodepoint::Ect0,
        quinn_proto::EcnCodepoint::Ect1 => quinn_udp::EcnCodepoint::Ect1,
        quinn_proto::EcnCodepoint::Ce => quinn_udp::EcnCodepoint::Ce,
    }
}
