//! Upstream subscriptions between two nodes, many over one stream.
//!
//! An edge node follows every channel it serves but does not replicate
//! through an upstream on the channel's partition leader (the broker's
//! `cluster::edge`). A messenger's node follows a hundred thousand inboxes:
//! a QUIC stream each would exhaust the connection's stream limit, and a
//! call waiting for a stream would time out. So each node pair carries its
//! upstreams on one long-lived bidirectional stream, the *upstream link*,
//! opened by the following node:
//!
//! ```text
//!  edge ── Open{id, partition, body} · Close{id} · Credit{id, bytes} ──▶ leader
//!  edge ◀──────────── Data{id, bytes} · End{id} ──────────────────────── leader
//! ```
//!
//! - Every message is `len (u32) ‖ tag (u8) ‖ id (u64) ‖ payload`, `len`
//!   counting what follows it; ids are the following node's, one per
//!   upstream, never reused on a link. The leader sends an upstream's
//!   bytes in pieces of at most [`PIECE`], so upstreams interleave and no
//!   message outgrows the link's bound whatever a channel's message size.
//! - Flow control is per upstream: the leader sends an upstream's data only
//!   while it holds credit for it ([`WINDOW`] bytes to start with), and the
//!   edge returns credit as its upstream consumes. A channel whose edge
//!   falls behind stops on the leader (whose subscription then reads its
//!   log in ranges, G4) without holding up the link's other channels, and
//!   what an edge buffers per upstream is bounded.
//! - The edge's reader never waits on an upstream: it appends to the
//!   upstream's inbox (bounded by the credit it gave) and moves on; control
//!   messages wait in per-link sets bounded by the upstreams open (one
//!   pending open, one close, one credit sum each), written by one task.
//! - An upstream ends by a `Close` (the edge no longer needs it) or an
//!   `End` (the leader stopped serving it); the link ends with its
//!   connection, which ends every upstream on it: edges attach again.
//!
//! Nodes from before upstream links opened a stream per upstream; they
//! advertise no [`super::network::PEER_PROTOCOL`], and both sides still
//! speak that to them (the `Stream` variants), so a rolling upgrade keeps
//! every edge fed.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use thiserror::Error;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use super::network::LinkStats;
use crate::partition::PartitionId;
use crate::placement::NodeId;

/// Credit each upstream starts with, and the most the leader sends ahead
/// of the edge's consumption.
pub const WINDOW: i64 = 512 * 1024;

/// Consumed bytes an edge gathers before it returns them as credit.
const CREDIT_STEP: usize = (WINDOW / 4) as usize;

/// The largest message: a delivery frame holds at most one message over
/// the frame target, bounded by the broker's largest payload.
pub const MAX_LINK_MESSAGE: usize = 64 << 20;

/// Bytes read from the link per step.
const READ_CHUNK: usize = 256 * 1024;

/// Data messages the serving side queues for its writer, at most.
const DATA_QUEUE: usize = 1024;

/// `tag ‖ id`.
const MESSAGE_HEAD: usize = 9;

/// The most bytes of one upstream in one `Data` message.
pub const PIECE: usize = 256 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Tag {
    Open = 1,
    Close = 2,
    Credit = 3,
    Data = 4,
    End = 5,
}

/// One message on an upstream link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// Edge → leader: serve upstream `id` of `partition`, `body` as the
    /// broker's channel service reads it.
    Open {
        /// The upstream.
        id: u64,
        /// The channel's partition.
        partition: PartitionId,
        /// The broker's follow call.
        body: Bytes,
    },
    /// Edge → leader: upstream `id` is no longer needed.
    Close {
        /// The upstream.
        id: u64,
    },
    /// Edge → leader: `bytes` more of upstream `id` may be sent.
    Credit {
        /// The upstream.
        id: u64,
        /// Bytes consumed since the last credit.
        bytes: u32,
    },
    /// Leader → edge: bytes of upstream `id`, in order.
    Data {
        /// The upstream.
        id: u64,
        /// What the leader's service wrote.
        bytes: Bytes,
    },
    /// Leader → edge: upstream `id` ended after the data sent before.
    End {
        /// The upstream.
        id: u64,
    },
}

/// Why a link's bytes are not a message.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum LinkDecodeError {
    /// A message longer than [`MAX_LINK_MESSAGE`] or shorter than its head.
    #[error("upstream link message of {0} bytes")]
    Length(u32),
    /// An unknown tag.
    #[error("unknown upstream link message tag {0}")]
    Tag(u8),
    /// A message whose payload does not fit its tag.
    #[error("malformed upstream link message (tag {0})")]
    Payload(u8),
}

impl Message {
    /// Appends the message to `out`.
    pub fn encode(&self, out: &mut BytesMut) {
        let (tag, id, payload_len) = match self {
            Self::Open { id, body, .. } => (Tag::Open, *id, 4 + body.len()),
            Self::Close { id } => (Tag::Close, *id, 0),
            Self::Credit { id, .. } => (Tag::Credit, *id, 4),
            Self::Data { id, bytes } => (Tag::Data, *id, bytes.len()),
            Self::End { id } => (Tag::End, *id, 0),
        };
        out.reserve(4 + MESSAGE_HEAD + payload_len);
        out.put_u32(u32::try_from(MESSAGE_HEAD + payload_len).unwrap_or(u32::MAX));
        out.put_u8(tag as u8);
        out.put_u64(id);
        match self {
            Self::Open {
                partition, body, ..
            } => {
                out.put_u32(partition.0);
                out.put_slice(body);
            }
            Self::Credit { bytes, .. } => out.put_u32(*bytes),
            Self::Data { bytes, .. } => out.put_slice(bytes),
            Self::Close { .. } | Self::End { .. } => {}
        }
    }

    /// The head of a `Data` message of `len` bytes, for writing the bytes
    /// after it without copying them.
    fn data_head(id: u64, len: usize) -> Bytes {
        let mut head = BytesMut::with_capacity(4 + MESSAGE_HEAD);
        head.put_u32(u32::try_from(MESSAGE_HEAD + len).unwrap_or(u32::MAX));
        head.put_u8(Tag::Data as u8);
        head.put_u64(id);
        head.freeze()
    }

    /// Splits the next whole message off `buf`; `None` until one is there.
    pub fn decode(buf: &mut BytesMut) -> Result<Option<Self>, LinkDecodeError> {
        let Some(prefix) = buf.get(..4) else {
            return Ok(None);
        };
        let len = u32::from_be_bytes([prefix[0], prefix[1], prefix[2], prefix[3]]);
        if (len as usize) < MESSAGE_HEAD || len as usize > MAX_LINK_MESSAGE {
            return Err(LinkDecodeError::Length(len));
        }
        if buf.len() < 4 + len as usize {
            return Ok(None);
        }
        buf.advance(4);
        let mut message = buf.split_to(len as usize);
        let tag = message.get_u8();
        let id = message.get_u64();
        let payload = message.freeze();
        let fixed = |want: usize| {
            if payload.len() == want {
                Ok(())
            } else {
                Err(LinkDecodeError::Payload(tag))
            }
        };
        Ok(Some(match tag {
            t if t == Tag::Open as u8 => {
                if payload.len() < 4 {
                    return Err(LinkDecodeError::Payload(tag));
                }
                let partition =
                    u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]]);
                Self::Open {
                    id,
                    partition: PartitionId(partition),
                    body: payload.slice(4..),
                }
            }
            t if t == Tag::Close as u8 => {
                fixed(0)?;
                Self::Close { id }
            }
            t if t == Tag::Credit as u8 => {
                fixed(4)?;
                Self::Credit {
                    id,
                    bytes: u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]]),
                }
            }
            t if t == Tag::Data as u8 => Self::Data { id, bytes: payload },
            t if t == Tag::End as u8 => {
                fixed(0)?;
                Self::End { id }
            }
            other => return Err(LinkDecodeError::Tag(other)),
        }))
    }
}

/// Why an upstream's stream failed.
#[derive(Debug, Error, Clone)]
#[error("upstream link to node {node}: {reason}")]
pub struct UpstreamError {
    /// The peer.
    pub node: NodeId,
    /// Why.
    pub reason: String,
}

fn lock<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

// ---------------------------------------------------------------------------
// The following (edge) side.

/// What an edge received of one upstream and not yet read.
#[derive(Debug, Default)]
struct InboxState {
    bytes: BytesMut,
    ended: bool,
    broken: Option<String>,
}

#[derive(Debug, Default)]
struct Inbox {
    state: std::sync::Mutex<InboxState>,
    arrived: Notify,
}

/// Control messages waiting for the edge's writer: bounded by the
/// upstreams open (one open and one close each, one credit sum each).
#[derive(Debug, Default)]
struct EdgeOutbox {
    opens: Vec<Message>,
    closes: Vec<u64>,
    credits: HashMap<u64, u32>,
}

impl EdgeOutbox {
    fn is_empty(&self) -> bool {
        self.opens.is_empty() && self.closes.is_empty() && self.credits.is_empty()
    }
}

/// An edge's upstream link to one node.
#[derive(Debug)]
pub(crate) struct EdgeLink {
    node: NodeId,
    next_id: AtomicU64,
    inboxes: std::sync::Mutex<HashMap<u64, Arc<Inbox>>>,
    outbox: std::sync::Mutex<EdgeOutbox>,
    write: Notify,
    dead: CancellationToken,
    stats: Arc<LinkStats>,
}

impl EdgeLink {
    /// Starts the link's reader and writer on an opened stream (its call
    /// header already written).
    pub(crate) fn start(
        node: NodeId,
        send: quinn::SendStream,
        recv: quinn::RecvStream,
        stats: Arc<LinkStats>,
    ) -> Arc<Self> {
        let link = Arc::new(Self {
            node,
            next_id: AtomicU64::new(1),
            inboxes: std::sync::Mutex::new(HashMap::new()),
            outbox: std::sync::Mutex::new(EdgeOutbox::default()),
            write: Notify::new(),
            dead: CancellationToken::new(),
            stats,
        });
        tokio::spawn(link.clone().write_loop(send));
        tokio::spawn(link.clone().read_loop(recv));
        link
    }

    /// Whether the link still carries upstreams.
    pub(crate) fn is_alive(&self) -> bool {
        !self.dead.is_cancelled()
    }

    /// Asks the leader for an upstream of `partition` (`body` the broker's
    /// follow call); its bytes arrive on the returned stream.
    pub(crate) fn open(
        self: &Arc<Self>,
        partition: PartitionId,
        body: &[u8],
    ) -> Result<FollowStream, UpstreamError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let inbox = Arc::new(Inbox::default());
        {
            // Checked under the lock `die` ends the link under: an inbox
            // added after it drained the map would never hear of the end.
            let mut inboxes = lock(&self.inboxes);
            if !self.is_alive() {
                return Err(self.gone("the link closed"));
            }
            inboxes.insert(id, inbox.clone());
        }
        lock(&self.outbox).opens.push(Message::Open {
            id,
            partition,
            body: Bytes::copy_from_slice(body),
        });
        self.write.notify_one();
        Ok(FollowStream(Following::Link(LinkStream {
            link: self.clone(),
            id,
            inbox,
            unreported: 0,
        })))
    }

    fn gone(&self, reason: &str) -> UpstreamError {
        UpstreamError {
            node: self.node,
            reason: reason.to_owned(),
        }
    }

    /// Ends the link: every upstream on it fails with `why`.
    fn die(&self, why: &str) {
        let inboxes: Vec<Arc<Inbox>> = {
            let mut inboxes = lock(&self.inboxes);
            if self.dead.is_cancelled() {
                return;
            }
            self.dead.cancel();
            inboxes.drain().map(|(_, i)| i).collect()
        };
        self.stats
            .upstream_links_lost
            .fetch_add(1, Ordering::Relaxed);
        debug!(peer = self.node, %why, "upstream link closed");
        for inbox in inboxes {
            lock(&inbox.state).broken = Some(why.to_owned());
            inbox.arrived.notify_one();
        }
    }

    async fn write_loop(self: Arc<Self>, mut send: quinn::SendStream) {
        let mut buf = BytesMut::new();
        loop {
            let pending = std::mem::take(&mut *lock(&self.outbox));
            if pending.is_empty() {
                tokio::select! {
                    () = self.dead.cancelled() => break,
                    () = self.write.notified() => continue,
                }
            }
            for open in &pending.opens {
                open.encode(&mut buf);
            }
            for (id, bytes) in pending.credits {
                Message::Credit { id, bytes }.encode(&mut buf);
            }
            for id in pending.closes {
                Message::Close { id }.encode(&mut buf);
            }
            let len = buf.len() as u64;
            let written = tokio::select! {
                () = self.dead.cancelled() => break,
                written = send.write_all(&buf) => written,
            };
            if let Err(e) = written {
                self.die(&e.to_string());
                break;
            }
            self.stats.bytes_sent.fetch_add(len, Ordering::Relaxed);
            buf.clear();
        }
        let _ = send.reset(0u32.into());
    }

    async fn read_loop(self: Arc<Self>, mut recv: quinn::RecvStream) {
        let mut buf = BytesMut::new();
        let why = loop {
            loop {
                match Message::decode(&mut buf) {
                    Ok(Some(message)) => {
                        if let Err(why) = self.take(message) {
                            self.die(&why);
                            return;
                        }
                    }
                    Ok(None) => break,
                    Err(e) => {
                        self.die(&e.to_string());
                        return;
                    }
                }
            }
            let chunk = tokio::select! {
                () = self.dead.cancelled() => return,
                chunk = recv.read_chunk(READ_CHUNK, true) => chunk,
            };
            match chunk {
                Ok(Some(chunk)) => {
                    self.stats
                        .bytes_received
                        .fetch_add(chunk.bytes.len() as u64, Ordering::Relaxed);
                    buf.extend_from_slice(&chunk.bytes);
                }
                Ok(None) => break "the leader ended the link".to_owned(),
                Err(e) => break e.to_string(),
            }
        };
        self.die(&why);
    }

    /// Files one message from the leader; `Err` when the leader broke the
    /// protocol.
    fn take(&self, message: Message) -> Result<(), String> {
        let (id, data) = match message {
            Message::Data { id, bytes } => (id, Some(bytes)),
            Message::End { id } => (id, None),
            other => return Err(format!("an edge got {other:?}")),
        };
        // An upstream closed here may still have data under way.
        let Some(inbox) = lock(&self.inboxes).get(&id).cloned() else {
            return Ok(());
        };
        {
            let mut state = lock(&inbox.state);
            match data {
                Some(bytes) => {
                    // The leader sends while it holds credit, one piece
                    // past it at most.
                    if state.bytes.len() + bytes.len() > WINDOW as usize + PIECE {
                        return Err(format!("upstream {id} sent past its credit"));
                    }
                    state.bytes.extend_from_slice(&bytes);
                }
                None => state.ended = true,
            }
        }
        inbox.arrived.notify_one();
        Ok(())
    }
}

/// The following side of an upstream subscription: what the leader's
/// service writes for it, in order.
#[derive(Debug)]
pub struct FollowStream(Following);

#[derive(Debug)]
enum Following {
    Link(LinkStream),
    /// A stream of its own, to a node from before upstream links.
    Stream {
        node: NodeId,
        recv: quinn::RecvStream,
        stats: Arc<LinkStats>,
    },
}

impl FollowStream {
    /// An upstream on a stream of its own (a node from before links).
    pub(crate) fn on_stream(node: NodeId, recv: quinn::RecvStream, stats: Arc<LinkStats>) -> Self {
        Self(Following::Stream { node, recv, stats })
    }

    /// The next bytes the leader wrote, at most `max`; `None` once it
    /// ended the upstream.
    pub async fn read(&mut self, max: usize) -> Result<Option<Bytes>, UpstreamError> {
        match &mut self.0 {
            Following::Link(link) => link.read(max).await,
            Following::Stream { node, recv, stats } => {
                let chunk = recv
                    .read_chunk(max, true)
                    .await
                    .map_err(|e| UpstreamError {
                        node: *node,
                        reason: e.to_string(),
                    })?;
                Ok(chunk.map(|chunk| {
                    stats
                        .bytes_received
                        .fetch_add(chunk.bytes.len() as u64, Ordering::Relaxed);
                    chunk.bytes
                }))
            }
        }
    }

    /// The node followed.
    pub fn node(&self) -> NodeId {
        match &self.0 {
            Following::Link(link) => link.link.node,
            Following::Stream { node, .. } => *node,
        }
    }
}

/// An upstream on an upstream link.
#[derive(Debug)]
struct LinkStream {
    link: Arc<EdgeLink>,
    id: u64,
    inbox: Arc<Inbox>,
    /// Bytes read and not yet returned as credit.
    unreported: usize,
}

impl LinkStream {
    async fn read(&mut self, max: usize) -> Result<Option<Bytes>, UpstreamError> {
        let inbox = self.inbox.clone();
        loop {
            let arrived = inbox.arrived.notified();
            {
                let mut state = lock(&inbox.state);
                if !state.bytes.is_empty() {
                    let take = state.bytes.len().min(max.max(1));
                    let bytes = state.bytes.split_to(take).freeze();
                    drop(state);
                    self.consumed(take);
                    return Ok(Some(bytes));
                }
                if let Some(why) = &state.broken {
                    return Err(self.link.gone(why));
                }
                if state.ended {
                    return Ok(None);
                }
            }
            arrived.await;
        }
    }

    fn consumed(&mut self, bytes: usize) {
        self.unreported += bytes;
        if self.unreported >= CREDIT_STEP {
            let bytes = u32::try_from(std::mem::take(&mut self.unreported)).unwrap_or(u32::MAX);
            let mut outbox = lock(&self.link.outbox);
            let credit = outbox.credits.entry(self.id).or_default();
            *credit = credit.saturating_add(bytes);
            drop(outbox);
            self.link.write.notify_one();
        }
    }
}

impl Drop for LinkStream {
    fn drop(&mut self) {
        let open = lock(&self.link.inboxes).remove(&self.id).is_some();
        let ended = lock(&self.inbox.state).ended;
        if open && !ended && self.link.is_alive() {
            let mut outbox = lock(&self.link.outbox);
            outbox.credits.remove(&self.id);
            // An open not sent yet is withdrawn: the leader never hears of
            // the upstream, and what waits for the writer stays bounded by
            // the upstreams open.
            let pending = outbox
                .opens
                .iter()
                .position(|m| matches!(m, Message::Open { id, .. } if *id == self.id));
            match pending {
                Some(at) => {
                    outbox.opens.swap_remove(at);
                }
                None => {
                    outbox.closes.push(self.id);
                    drop(outbox);
                    self.link.write.notify_one();
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------
// The serving (leader) side.

/// One upstream a leader serves.
#[derive(Debug)]
struct ServedUpstream {
    credit: AtomicI64,
    more: Notify,
    /// Cancelled when the edge closes it or the link ends.
    stop: CancellationToken,
}

/// A leader's side of an edge's upstream link.
#[derive(Debug)]
pub(crate) struct ServedLink {
    node: NodeId,
    upstreams: std::sync::Mutex<HashMap<u64, Arc<ServedUpstream>>>,
    data: tokio::sync::mpsc::Sender<(Bytes, Bytes)>,
    /// Upstreams whose service ended, to announce after their data.
    ends: std::sync::Mutex<Vec<u64>>,
    write: Notify,
    dead: CancellationToken,
    stats: Arc<LinkStats>,
}

/// What a serving link hands the broker for each upstream opened on it.
pub(crate) type OpenHandler = Arc<dyn Fn(PartitionId, Bytes, FollowSink) + Send + Sync>;

impl ServedLink {
    /// Serves the upstream link `node` opened (its call header read),
    /// handing each opened upstream to `open`, until the link ends.
    pub(crate) async fn serve(
        node: NodeId,
        send: quinn::SendStream,
        mut recv: quinn::RecvStream,
        stats: Arc<LinkStats>,
        stop: CancellationToken,
        open: OpenHandler,
    ) {
        let (data, queued) = tokio::sync::mpsc::channel(DATA_QUEUE);
        let link = Arc::new(Self {
            node,
            upstreams: std::sync::Mutex::new(HashMap::new()),
            data,
            ends: std::sync::Mutex::new(Vec::new()),
            write: Notify::new(),
            dead: stop.child_token(),
            stats,
        });
        let writer = tokio::spawn(link.clone().write_loop(send, queued));
        let mut buf = BytesMut::new();
        let why = 'read: loop {
            loop {
                match Message::decode(&mut buf) {
                    Ok(Some(message)) => {
                        if let Err(why) = link.take(message, &open) {
                            break 'read why;
                        }
                    }
                    Ok(None) => break,
                    Err(e) => break 'read e.to_string(),
                }
            }
            let chunk = tokio::select! {
                () = link.dead.cancelled() => break "the node is stopping".to_owned(),
                chunk = recv.read_chunk(READ_CHUNK, true) => chunk,
            };
            match chunk {
                Ok(Some(chunk)) => {
                    link.stats
                        .bytes_received
                        .fetch_add(chunk.bytes.len() as u64, Ordering::Relaxed);
                    buf.extend_from_slice(&chunk.bytes);
                }
                Ok(None) => break "the edge ended the link".to_owned(),
                Err(e) => break e.to_string(),
            }
        };
        debug!(peer = node, %why, "served upstream link closed");
        link.dead.cancel();
        lock(&link.upstreams).clear();
        let _ = recv.stop(0u32.into());
        let _ = writer.await;
    }

    fn take(self: &Arc<Self>, message: Message, open: &OpenHandler) -> Result<(), String> {
        match message {
            Message::Open {
                id,
                partition,
                body,
            } => {
                let upstream = Arc::new(ServedUpstream {
                    credit: AtomicI64::new(WINDOW),
                    more: Notify::new(),
                    stop: self.dead.child_token(),
                });
                if lock(&self.upstreams).insert(id, upstream.clone()).is_some() {
                    return Err(format!("upstream {id} opened twice"));
                }
                open(
                    partition,
                    body,
                    FollowSink(Serving::Link(LinkSink {
                        link: self.clone(),
                        id,
                        upstream,
                        ended: false,
                    })),
                );
            }
            Message::Close { id } => {
                if let Some(upstream) = lock(&self.upstreams).remove(&id) {
                    upstream.stop.cancel();
                }
            }
            Message::Credit { id, bytes } => {
                if let Some(upstream) = lock(&self.upstreams).get(&id) {
                    upstream
                        .credit
                        .fetch_add(i64::from(bytes), Ordering::AcqRel);
                    upstream.more.notify_one();
                }
            }
            other => return Err(format!("a leader got {other:?}")),
        }
        Ok(())
    }

    async fn write_loop(
        self: Arc<Self>,
        mut send: quinn::SendStream,
        mut queued: tokio::sync::mpsc::Receiver<(Bytes, Bytes)>,
    ) {
        let mut chunks: Vec<Bytes> = Vec::new();
        loop {
            // Ends taken before the data drained: an upstream's data was
            // queued before its end, so it goes first.
            let ends = std::mem::take(&mut *lock(&self.ends));
            while let Ok((head, bytes)) = queued.try_recv() {
                chunks.push(head);
                chunks.push(bytes);
            }
            let mut tail = BytesMut::new();
            for id in ends {
                Message::End { id }.encode(&mut tail);
            }
            if !tail.is_empty() {
                chunks.push(tail.freeze());
            }
            if chunks.is_empty() {
                tokio::select! {
                    () = self.dead.cancelled() => break,
                    () = self.write.notified() => {}
                    next = queued.recv() => match next {
                        Some((head, bytes)) => {
                            chunks.push(head);
                            chunks.push(bytes);
                        }
                        None => break,
                    },
                }
                continue;
            }
            let len: usize = chunks.iter().map(Bytes::len).sum();
            let written = tokio::select! {
                () = self.dead.cancelled() => break,
                written = send.write_all_chunks(&mut chunks) => written,
            };
            if let Err(e) = written {
                debug!(peer = self.node, error = %e, "served upstream link unwritable");
                self.dead.cancel();
                break;
            }
            chunks.clear();
            self.stats
                .bytes_sent
                .fetch_add(len as u64, Ordering::Relaxed);
        }
        let _ = send.reset(0u32.into());
    }
}

/// The serving side of an upstream subscription: bytes written here reach
/// the following node in order, as its credit allows.
#[derive(Debug)]
pub struct FollowSink(Serving);

#[derive(Debug)]
enum Serving {
    Link(LinkSink),
    /// A stream of its own, from a node from before upstream links.
    Stream {
        node: NodeId,
        send: quinn::SendStream,
        stats: Arc<LinkStats>,
    },
}

impl FollowSink {
    /// An upstream on a stream of its own (a node from before links).
    pub(crate) fn on_stream(node: NodeId, send: quinn::SendStream, stats: Arc<LinkStats>) -> Self {
        Self(Serving::Stream { node, send, stats })
    }

    /// Writes `bytes` once the upstream has credit; fails when the follower
    /// closed it or the link ended.
    pub async fn write(&mut self, bytes: Bytes) -> Result<(), UpstreamError> {
        match &mut self.0 {
            Serving::Link(link) => link.write(bytes).await,
            Serving::Stream { node, send, stats } => {
                send.write_all(&bytes).await.map_err(|e| UpstreamError {
                    node: *node,
                    reason: e.to_string(),
                })?;
                stats
                    .bytes_sent
                    .fetch_add(bytes.len() as u64, Ordering::Relaxed);
                Ok(())
            }
        }
    }

    /// Ends the upstream after what was written.
    pub fn finish(&mut self) {
        match &mut self.0 {
            Serving::Link(link) => link.finish(),
            Serving::Stream { send, .. } => {
                let _ = send.finish();
            }
        }
    }

    /// Resolves when the follower no longer reads (it closed the upstream
    /// or the link ended); independent of this sink's later use.
    pub fn stopped(&self) -> super::network::BoxFuture<()> {
        match &self.0 {
            Serving::Link(link) => Box::pin(link.upstream.stop.clone().cancelled_owned()),
            Serving::Stream { send, .. } => {
                let stopped = send.stopped();
                Box::pin(async move {
                    let _ = stopped.await;
                })
            }
        }
    }
}

/// An upstream served on an upstream link.
#[derive(Debug)]
struct LinkSink {
    link: Arc<ServedLink>,
    id: u64,
    upstream: Arc<ServedUpstream>,
    ended: bool,
}

impl LinkSink {
    async fn write(&mut self, mut bytes: Bytes) -> Result<(), UpstreamError> {
        while !bytes.is_empty() {
            let piece = bytes.split_to(bytes.len().min(PIECE));
            self.write_piece(piece).await?;
        }
        Ok(())
    }

    async fn write_piece(&mut self, bytes: Bytes) -> Result<(), UpstreamError> {
        loop {
            let more = self.upstream.more.notified();
            if self.upstream.stop.is_cancelled() {
                return Err(self.closed());
            }
            if self.upstream.credit.load(Ordering::Acquire) > 0 {
                break;
            }
            tokio::select! {
                () = self.upstream.stop.cancelled() => return Err(self.closed()),
                () = more => {}
            }
        }
        self.upstream.credit.fetch_sub(
            i64::try_from(bytes.len()).unwrap_or(i64::MAX),
            Ordering::AcqRel,
        );
        let head = Message::data_head(self.id, bytes.len());
        tokio::select! {
            () = self.upstream.stop.cancelled() => Err(self.closed()),
            sent = self.link.data.send((head, bytes)) => sent.map_err(|_| self.closed()),
        }
    }

    fn closed(&self) -> UpstreamError {
        UpstreamError {
            node: self.link.node,
            reason: "the follower closed the upstream".into(),
        }
    }

    fn finish(&mut self) {
        if std::mem::replace(&mut self.ended, true) {
            return;
        }
        lock(&self.link.upstreams).remove(&self.id);
        if !self.upstream.stop.is_cancelled() {
            lock(&self.link.ends).push(self.id);
            self.link.write.notify_one();
        }
    }
}

impl Drop for LinkSink {
    fn drop(&mut self) {
        self.finish();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn message() -> impl Strategy<Value = Message> {
        let bytes = proptest::collection::vec(any::<u8>(), 0..300).prop_map(Bytes::from);
        prop_oneof![
            (any::<u64>(), any::<u32>(), bytes.clone()).prop_map(|(id, p, body)| Message::Open {
                id,
                partition: PartitionId(p),
                body
            }),
            any::<u64>().prop_map(|id| Message::Close { id }),
            (any::<u64>(), any::<u32>()).prop_map(|(id, bytes)| Message::Credit { id, bytes }),
            (any::<u64>(), bytes).prop_map(|(id, bytes)| Message::Data { id, bytes }),
            any::<u64>().prop_map(|id| Message::End { id }),
        ]
    }

    proptest! {
        #[test]
        fn messages_survive_any_split_of_the_stream(
            messages in proptest::collection::vec(message(), 1..20),
            cut in any::<prop::sample::Index>(),
        ) {
            let mut wire = BytesMut::new();
            for m in &messages {
                m.encode(&mut wire);
            }
            let wire = wire.freeze();
            let cut = cut.index(wire.len() + 1);
            let mut buf = BytesMut::from(&wire[..cut]);
            let mut decoded = Vec::new();
            while let Some(m) = Message::decode(&mut buf).expect("valid") {
                decoded.push(m);
            }
            buf.extend_from_slice(&wire[cut..]);
            while let Some(m) = Message::decode(&mut buf).expect("valid") {
                decoded.push(m);
            }
            prop_assert_eq!(decoded, messages);
            prop_assert!(buf.is_empty());
        }

        #[test]
        fn garbage_is_refused_or_waited_for_never_panics(
            bytes in proptest::collection::vec(any::<u8>(), 0..64),
        ) {
            let mut buf = BytesMut::from(&bytes[..]);
            let _ = Message::decode(&mut buf);
        }
    }

    #[test]
    fn a_data_head_frames_the_bytes_after_it() {
        let bytes = Bytes::from_static(b"deliver");
        let mut wire = BytesMut::from(&Message::data_head(7, bytes.len())[..]);
        wire.extend_from_slice(&bytes);
        assert_eq!(
            Message::decode(&mut wire),
            Ok(Some(Message::Data { id: 7, bytes }))
        );
    }

    #[test]
    fn lengths_out_of_bounds_are_refused() {
        let mut short = BytesMut::from(&[0, 0, 0, 2, 1, 0][..]);
        assert_eq!(Message::decode(&mut short), Err(LinkDecodeError::Length(2)));
        let mut huge = BytesMut::from(&[0xff, 0xff, 0xff, 0xff][..]);
        assert!(Message::decode(&mut huge).is_err());
        let mut credit = BytesMut::new();
        credit.put_u32(10);
        credit.put_u8(Tag::Credit as u8);
        credit.put_u64(1);
        credit.put_u8(0);
        assert_eq!(
            Message::decode(&mut credit),
            Err(LinkDecodeError::Payload(Tag::Credit as u8))
        );
    }
}
