//! A shard's connections and streams as the session sees them: the
//! [`Connection`], control stream and [`DeliverySink`] adapters.
//!
//! Every operation locks the shard's table, asks `quinn-proto`, and either
//! completes or parks the task's waker on the connection; the shard's loop
//! wakes it when the event it waits for (readable, writable, stream
//! available, acknowledged) comes. A handle names its connection by table
//! handle and generation, so a handle that outlives its connection finds
//! it gone instead of reaching a newer connection that reused the slot.

use std::future::poll_fn;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use quinn_proto::{
    ConnectionError, ConnectionHandle, Dir, FinishError, ReadError, ReadableError, StreamId,
    VarInt, WriteError,
};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use volna_proto::CloseCode;

use super::driver::{Conn, Shard, park};
use crate::session::Connection;
use crate::subscription::{DeliverySink, SinkError};
use crate::transport::{CONTROL_FLUSH, close_reason, peer_name};

/// A counted reference to one connection of a shard. When the last one
/// goes, the connection is closed (as quinn does when its last handle
/// drops), so a session that ends never leaves its connection open.
#[derive(Debug, Clone)]
pub(super) struct ConnRef(Arc<ConnInner>);

#[derive(Debug)]
struct ConnInner {
    shard: Arc<Shard>,
    handle: ConnectionHandle,
    generation: u64,
}

impl Drop for ConnInner {
    fn drop(&mut self) {
        self.shard.with_conn(self.handle, self.generation, |conn| {
            if conn.proto.is_closed() {
                return ((), false);
            }
            conn.proto
                .close(Instant::now(), VarInt::from_u32(0), Bytes::new());
            ((), true)
        });
    }
}

/// The error a connection that is no longer in its shard's table reports.
fn gone() -> ConnectionError {
    ConnectionError::LocallyClosed
}

fn io_error(e: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::ConnectionAborted, e.to_string())
}

impl ConnRef {
    pub(super) fn new(shard: Arc<Shard>, handle: ConnectionHandle, generation: u64) -> Self {
        Self(Arc::new(ConnInner {
            shard,
            handle,
            generation,
        }))
    }

    /// Runs `f` on the connection; `None` once it is gone.
    fn with<T>(&self, f: impl FnOnce(&mut Conn) -> (T, bool)) -> Option<T> {
        self.0.shard.with_conn(self.0.handle, self.0.generation, f)
    }

    /// The client's current address.
    pub(super) fn remote(&self) -> Option<SocketAddr> {
        self.with(|conn| (conn.proto.remote_address(), false))
    }

    /// Waits for the handshake to complete.
    pub(super) async fn handshake(&self) -> Result<(), ConnectionError> {
        poll_fn(|cx| {
            self.with(|conn| {
                if conn.connected {
                    return (Poll::Ready(Ok(())), false);
                }
                if let Some(e) = &conn.error {
                    return (Poll::Ready(Err(e.clone())), false);
                }
                conn.waiters.handshake = Some(cx.waker().clone());
                (Poll::Pending, false)
            })
            .unwrap_or(Poll::Ready(Err(gone())))
        })
        .await
    }

    /// Waits for the client to open its (only) bidirectional stream.
    pub(super) async fn accept_bi(&self) -> Result<StreamId, ConnectionError> {
        poll_fn(|cx| {
            self.with(|conn| {
                if let Some(id) = conn.proto.streams().accept(Dir::Bi) {
                    // Accepting may raise the peer's stream credit.
                    return (Poll::Ready(Ok(id)), true);
                }
                if let Some(e) = &conn.error {
                    return (Poll::Ready(Err(e.clone())), false);
                }
                conn.waiters.accept_bi = Some(cx.waker().clone());
                (Poll::Pending, false)
            })
            .unwrap_or(Poll::Ready(Err(gone())))
        })
        .await
    }

    /// Waits until the send stream `id` can take nothing more.
    async fn send_ended(&self, id: StreamId) -> SendEnd {
        poll_fn(|cx| {
            self.with(|conn| {
                if let Some(e) = &conn.error {
                    return (Poll::Ready(SendEnd::Failed(e.clone())), false);
                }
                match conn.proto.send_stream(id).stopped() {
                    Ok(Some(code)) => (Poll::Ready(SendEnd::Stopped(code)), false),
                    Ok(None) => {
                        park(&mut conn.waiters.stopped, id, cx.waker());
                        (Poll::Pending, false)
                    }
                    Err(_) => (Poll::Ready(SendEnd::Closed), false),
                }
            })
            .unwrap_or(Poll::Ready(SendEnd::Failed(gone())))
        })
        .await
    }

    /// Closes the connection with an application `code`.
    pub(super) fn close(&self, code: CloseCode, reason: &str) {
        self.with(|conn| {
            conn.proto.close(
                Instant::now(),
                VarInt::from_u32(code.0),
                close_reason(reason),
            );
            ((), true)
        });
    }
}

/// How a send stream ended.
enum SendEnd {
    /// The client stopped it (`STOP_SENDING`) with this code.
    Stopped(VarInt),
    /// It is gone from the connection: finished and fully acknowledged,
    /// or reset.
    Closed,
    /// The connection failed or is gone.
    Failed(ConnectionError),
}

/// A shard connection with its verified client identity.
#[derive(Debug)]
pub(super) struct ShardConnection {
    conn: ConnRef,
    remote: SocketAddr,
    peer: Option<String>,
}

impl ShardConnection {
    pub(super) fn new(conn: ConnRef) -> Self {
        let (remote, identity) = conn
            .with(|c| {
                let identity = c.proto.crypto_session().peer_identity();
                ((c.proto.remote_address(), identity), false)
            })
            .unwrap_or((SocketAddr::from(([0, 0, 0, 0], 0)), None));
        Self {
            conn,
            remote,
            peer: peer_name(identity),
        }
    }

    /// The control stream's halves.
    pub(super) fn control(&self, id: StreamId) -> (ControlRecv, ControlSend) {
        (
            ControlRecv {
                conn: self.conn.clone(),
                id,
                ended: false,
            },
            ControlSend {
                conn: self.conn.clone(),
                id,
                finished: false,
            },
        )
    }
}

impl Connection for ShardConnection {
    type Sink = DeliveryStream;
    type ControlSend = ControlSend;

    async fn finish_control(mut send: ControlSend) {
        if send.finish().is_err() {
            return;
        }
        // Any end will do: gone from the table means every byte was
        // acknowledged, and a stopped stream or a failed connection takes
        // nothing more.
        let _ = tokio::time::timeout(CONTROL_FLUSH, send.conn.send_ended(send.id)).await;
    }

    async fn open_delivery(&self) -> Result<DeliveryStream, SinkError> {
        let id = poll_fn(|cx| {
            self.conn
                .with(|conn| {
                    if let Some(e) = &conn.error {
                        return (Poll::Ready(Err(SinkError(e.to_string()))), false);
                    }
                    match conn.proto.streams().open(Dir::Uni) {
                        Some(id) => (Poll::Ready(Ok(id)), false),
                        None => {
                            conn.waiters.open_uni.push(cx.waker().clone());
                            (Poll::Pending, false)
                        }
                    }
                })
                .unwrap_or_else(|| Poll::Ready(Err(SinkError(gone().to_string()))))
        })
        .await?;
        Ok(DeliveryStream {
            conn: self.conn.clone(),
            id,
            finished: false,
        })
    }

    fn close(&self, code: CloseCode, reason: &str) {
        self.conn.close(code, reason);
    }

    fn remote(&self) -> SocketAddr {
        self.conn.remote().unwrap_or(self.remote)
    }

    fn peer_identity(&self) -> Option<String> {
        self.peer.clone()
    }
}

/// The receiving half of the control stream.
#[derive(Debug)]
pub(super) struct ControlRecv {
    conn: ConnRef,
    id: StreamId,
    /// The client finished the stream and everything was read.
    ended: bool,
}

impl AsyncRead for ControlRecv {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.ended {
            return Poll::Ready(Ok(()));
        }
        let id = self.id;
        let polled = self.conn.with(|conn| {
            if let Some(e) = &conn.error {
                return (Poll::Ready(Err(io_error(e))), false);
            }
            let mut stream = conn.proto.recv_stream(id);
            let mut chunks = match stream.read(true) {
                Ok(chunks) => chunks,
                // The stream is already finished and read in full.
                Err(ReadableError::ClosedStream) => return (Poll::Ready(Ok(true)), false),
                Err(e @ ReadableError::IllegalOrderedRead) => {
                    return (Poll::Ready(Err(io_error(e))), false);
                }
            };
            let mut read = 0;
            let mut outcome = None;
            while buf.remaining() > 0 {
                match chunks.next(buf.remaining()) {
                    Ok(Some(chunk)) => {
                        read += chunk.bytes.len();
                        buf.put_slice(&chunk.bytes);
                    }
                    Ok(None) => {
                        outcome = Some(Ok(true));
                        break;
                    }
                    Err(ReadError::Blocked) => break,
                    Err(e @ ReadError::Reset(_)) => {
                        outcome = Some(Err(io_error(e)));
                        break;
                    }
                }
            }
            // Reading frees receive window: the client may need to hear.
            let transmit = chunks.finalize().should_transmit();
            let poll = match outcome {
                Some(result) => Poll::Ready(result),
                None if read > 0 => Poll::Ready(Ok(false)),
                None => {
                    park(&mut conn.waiters.readers, id, cx.waker());
                    Poll::Pending
                }
            };
            (poll, transmit)
        });
        match polled {
            None => Poll::Ready(Err(io_error(gone()))),
            Some(Poll::Pending) => Poll::Pending,
            Some(Poll::Ready(Err(e))) => Poll::Ready(Err(e)),
            Some(Poll::Ready(Ok(ended))) => {
                self.ended = ended;
                Poll::Ready(Ok(()))
            }
        }
    }
}

impl Drop for ControlRecv {
    /// A control stream dropped unread tells the client to stop sending.
    fn drop(&mut self) {
        if self.ended {
            return;
        }
        let id = self.id;
        self.conn.with(|conn| {
            let stopped = conn.proto.recv_stream(id).stop(VarInt::from_u32(0)).is_ok();
            ((), stopped)
        });
    }
}

/// The sending half of the control stream.
#[derive(Debug)]
pub(super) struct ControlSend {
    conn: ConnRef,
    id: StreamId,
    finished: bool,
}

impl ControlSend {
    fn finish(&mut self) -> Result<(), ConnectionError> {
        self.finished = true;
        finish_stream(&self.conn, self.id)
    }
}

impl AsyncWrite for ControlSend {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let id = self.id;
        self.conn
            .with(|conn| {
                if let Some(e) = &conn.error {
                    return (Poll::Ready(Err(io_error(e))), false);
                }
                match conn.proto.send_stream(id).write(data) {
                    Ok(written) => (Poll::Ready(Ok(written)), true),
                    Err(WriteError::Blocked) => {
                        park(&mut conn.waiters.writers, id, cx.waker());
                        (Poll::Pending, false)
                    }
                    Err(e) => (Poll::Ready(Err(io_error(e))), false),
                }
            })
            .unwrap_or_else(|| Poll::Ready(Err(io_error(gone()))))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Written bytes are the connection's to send: the shard flushes
        // every dirty connection on its next turn.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(self.finish().map_err(io_error))
    }
}

impl Drop for ControlSend {
    fn drop(&mut self) {
        if !self.finished {
            let _ = finish_stream(&self.conn, self.id);
        }
    }
}

/// Ends stream `id` after what was written; a stream the client stopped
/// is reset instead.
fn finish_stream(conn: &ConnRef, id: StreamId) -> Result<(), ConnectionError> {
    conn.with(|conn| {
        if let Some(e) = &conn.error {
            return (Err(e.clone()), false);
        }
        let mut stream = conn.proto.send_stream(id);
        match stream.finish() {
            Ok(()) => (Ok(()), true),
            Err(FinishError::Stopped(code)) => (Ok(()), stream.reset(code).is_ok()),
            Err(FinishError::ClosedStream) => (Ok(()), false),
        }
    })
    .unwrap_or_else(|| Err(gone()))
}

/// A server-opened unidirectional stream carrying one subscription.
#[derive(Debug)]
pub(super) struct DeliveryStream {
    conn: ConnRef,
    id: StreamId,
    finished: bool,
}

impl DeliverySink for DeliveryStream {
    async fn send(&mut self, mut frames: Vec<Bytes>) -> Result<(), SinkError> {
        let id = self.id;
        let mut next = 0;
        poll_fn(|cx| {
            self.conn
                .with(|conn| {
                    if let Some(e) = &conn.error {
                        return (Poll::Ready(Err(SinkError(e.to_string()))), false);
                    }
                    // quinn-proto queues the chunks themselves: the shared
                    // frames are not copied; a chunk written in part is
                    // advanced in place.
                    let mut wrote = false;
                    while next < frames.len() {
                        match conn.proto.send_stream(id).write_chunks(&mut frames[next..]) {
                            Ok(written) => {
                                wrote |= written.bytes > 0;
                                next += written.chunks;
                                if written.chunks == 0 && written.bytes == 0 {
                                    break;
                                }
                            }
                            Err(WriteError::Blocked) => break,
                            Err(e) => return (Poll::Ready(Err(SinkError(e.to_string()))), wrote),
                        }
                    }
                    if next == frames.len() {
                        return (Poll::Ready(Ok(())), wrote);
                    }
                    park(&mut conn.waiters.writers, id, cx.waker());
                    (Poll::Pending, wrote)
                })
                .unwrap_or_else(|| Poll::Ready(Err(SinkError(gone().to_string()))))
        })
        .await
    }

    async fn finish(&mut self) {
        self.finished = true;
        let _ = finish_stream(&self.conn, self.id);
    }

    async fn stopped(&mut self) -> SinkError {
        SinkError(match self.conn.send_ended(self.id).await {
            SendEnd::Stopped(code) => format!("stopped by peer: code {code}"),
            SendEnd::Closed => "the stream is closed".to_owned(),
            SendEnd::Failed(e) => e.to_string(),
        })
    }
}

impl Drop for DeliveryStream {
    fn drop(&mut self) {
        if !self.finished {
            let _ = finish_stream(&self.conn, self.id);
        }
    }
}
