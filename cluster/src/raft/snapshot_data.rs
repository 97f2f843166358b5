//! A partition snapshot's bytes as openraft carries them.
//!
//! A snapshot is either a file (one received from a leader: written chunk
//! by chunk, then installed) or an export that runs while it is sent: the
//! state machine fixes a point in its store when openraft asks for the
//! snapshot, and the bytes are produced from that point only as the
//! replication reads them. A snapshot therefore costs nothing until a
//! replica needs one, whatever the size of the partition.
//!
//! The export runs on a blocking thread and hands its bytes over a bounded
//! queue ([`export_pipe`]): a slow peer slows the export down, never grows
//! memory. The export starts only once the stream is first read, so a
//! snapshot that openraft asks for and drops unread (as it does at every
//! start) reads nothing.
//!
//! An export stream is read front to back once: it cannot seek back, and
//! it cannot be written. [`super::network`] sends it that way.

use std::io::{self, SeekFrom};
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes};
use tokio::io::{AsyncRead, AsyncSeek, AsyncWrite, ReadBuf};
use tokio::sync::{mpsc, oneshot};

/// Bytes handed from the export to the stream at once.
const PIECE: usize = 1 << 20;

/// A partition snapshot's bytes.
#[derive(Debug)]
pub enum SnapshotData {
    /// A snapshot in a file: one being received, or received whole.
    File(tokio::fs::File),
    /// A snapshot exported as it is read.
    Export(ExportStream),
}

/// What the export hands to the stream.
#[derive(Debug)]
enum Piece {
    Bytes(Bytes),
    /// The export wrote everything.
    End,
    /// The export failed: the stream fails with this.
    Failed(String),
}

/// The reading end of an export: the snapshot's bytes in order, then the
/// end of the stream, or an error if the export failed or stopped.
#[derive(Debug)]
pub struct ExportStream {
    pieces: mpsc::Receiver<Piece>,
    current: Bytes,
    /// Told at the first read: the export starts then.
    start: Option<oneshot::Sender<()>>,
    /// Bytes read so far (the stream's position).
    position: u64,
    ended: bool,
    /// A seek asked for and not yet answered.
    seeking: Option<io::Result<u64>>,
    /// Whatever the exporter wants kept while the stream lives.
    held: Option<Box<dyn std::any::Any + Send + Sync>>,
}

impl ExportStream {
    /// Keeps `guard` until the stream is dropped (its sender is done with
    /// it): e.g. a count of the partition's snapshots in flight.
    pub fn hold(&mut self, guard: impl Send + Sync + 'static) {
        self.held = Some(Box::new(guard));
    }
}

/// The writing end of an export, for a blocking thread: bytes written are
/// gathered into pieces and queued for the stream, waiting while the queue
/// is full. Writing fails once the stream is dropped.
#[derive(Debug)]
pub struct ExportWriter {
    pieces: mpsc::Sender<Piece>,
    gathered: Vec<u8>,
}

/// Tells an export when its stream is first read.
#[derive(Debug)]
pub struct FirstRead(oneshot::Receiver<()>);

impl FirstRead {
    /// Blocks until the stream is first read: `false` when it was dropped
    /// unread (nothing is to be exported). Call from a blocking thread.
    pub fn wait(self) -> bool {
        self.0.blocking_recv().is_ok()
    }
}

/// A pipe from an export (on a blocking thread) to the stream openraft
/// reads; at most `depth` pieces of 1 MiB wait in it.
pub fn export_pipe(depth: usize) -> (ExportWriter, ExportStream, FirstRead) {
    let (tx, rx) = mpsc::channel(depth.max(1));
    let (start_tx, start_rx) = oneshot::channel();
    (
        ExportWriter {
            pieces: tx,
            gathered: Vec::new(),
        },
        ExportStream {
            pieces: rx,
            current: Bytes::new(),
            start: Some(start_tx),
            position: 0,
            ended: false,
            seeking: None,
            held: None,
        },
        FirstRead(start_rx),
    )
}

fn closed() -> io::Error {
    io::Error::new(io::ErrorKind::BrokenPipe, "the snapshot stream was dropped")
}

impl ExportWriter {
    fn send(&self, piece: Piece) -> io::Result<()> {
        self.pieces.blocking_send(piece).map_err(|_| closed())
    }

    fn send_gathered(&mut self) -> io::Result<()> {
        if self.gathered.is_empty() {
            return Ok(());
        }
        let piece = Bytes::from(std::mem::take(&mut self.gathered));
        self.send(Piece::Bytes(piece))
    }

    /// Ends the stream after everything written.
    pub fn finish(mut self) -> io::Result<()> {
        self.send_gathered()?;
        self.send(Piece::End)
    }

    /// Ends the stream with an error: its reader fails with `why`.
    pub fn fail(self, why: String) {
        let _ = self.send(Piece::Failed(why));
    }
}

impl io::Write for ExportWriter {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        if self.pieces.is_closed() {
            return Err(closed());
        }
        let room = PIECE - self.gathered.len();
        let n = bytes.len().min(room);
        if self.gathered.capacity() == 0 {
            self.gathered.reserve_exact(PIECE);
        }
        self.gathered.extend_from_slice(&bytes[..n]);
        if self.gathered.len() >= PIECE {
            self.send_gathered()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.send_gathered()
    }
}

impl AsyncRead for ExportStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some(start) = this.start.take() {
            let _ = start.send(());
        }
        loop {
            if this.current.has_remaining() {
                let n = this.current.len().min(buf.remaining());
                buf.put_slice(&this.current[..n]);
                this.current.advance(n);
                this.position += n as u64;
                return Poll::Ready(Ok(()));
            }
            if this.ended || buf.remaining() == 0 {
                return Poll::Ready(Ok(()));
            }
            match ready!(this.pieces.poll_recv(cx)) {
                Some(Piece::Bytes(bytes)) => this.current = bytes,
                Some(Piece::End) => this.ended = true,
                Some(Piece::Failed(why)) => {
                    return Poll::Ready(Err(io::Error::other(format!(
                        "the snapshot export failed: {why}"
                    ))));
                }
                None => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the snapshot export stopped before its end",
                    )));
                }
            }
        }
    }
}

/// Only "where am I" seeks: the stream goes one way.
impl AsyncSeek for ExportStream {
    fn start_seek(self: Pin<&mut Self>, to: SeekFrom) -> io::Result<()> {
        let this = self.get_mut();
        let here = this.position;
        this.seeking = Some(match to {
            SeekFrom::Current(0) => Ok(here),
            SeekFrom::Start(at) if at == here => Ok(here),
            _ => Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "an exported snapshot is read once, front to back",
            )),
        });
        Ok(())
    }

    fn poll_complete(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<u64>> {
        let this = self.get_mut();
        Poll::Ready(this.seeking.take().unwrap_or(Ok(this.position)))
    }
}

fn read_only() -> io::Error {
    io::Error::new(
        io::ErrorKind::Unsupported,
        "an exported snapshot cannot be written",
    )
}

impl AsyncWrite for ExportStream {
    fn poll_write(self: Pin<&mut Self>, _: &mut Context<'_>, _: &[u8]) -> Poll<io::Result<usize>> {
        Poll::Ready(Err(read_only()))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

impl AsyncRead for SnapshotData {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::File(file) => Pin::new(file).poll_read(cx, buf),
            Self::Export(stream) => Pin::new(stream).poll_read(cx, buf),
        }
    }
}

impl AsyncSeek for SnapshotData {
    fn start_seek(self: Pin<&mut Self>, to: SeekFrom) -> io::Result<()> {
        match self.get_mut() {
            Self::File(file) => Pin::new(file).start_seek(to),
            Self::Export(stream) => Pin::new(stream).start_seek(to),
        }
    }

    fn poll_complete(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<u64>> {
        match self.get_mut() {
            Self::File(file) => Pin::new(file).poll_complete(cx),
            Self::Export(stream) => Pin::new(stream).poll_complete(cx),
        }
    }
}

impl AsyncWrite for SnapshotData {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bytes: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::File(file) => Pin::new(file).poll_write(cx, bytes),
            Self::Export(stream) => Pin::new(stream).poll_write(cx, bytes),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::File(file) => Pin::new(file).poll_flush(cx),
            Self::Export(stream) => Pin::new(stream).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::File(file) => Pin::new(file).poll_shutdown(cx),
            Self::Export(stream) => Pin::new(stream).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use tokio::io::{AsyncReadExt, AsyncSeekExt};

    use super::*;

    #[tokio::test]
    async fn an_export_streams_its_bytes_in_order_and_starts_at_the_first_read() {
        let (mut writer, mut stream, first) = export_pipe(2);
        let started = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = started.clone();
        let export = tokio::task::spawn_blocking(move || {
            if !first.wait() {
                return Err(closed());
            }
            flag.store(true, std::sync::atomic::Ordering::SeqCst);
            for k in 0..3_000u32 {
                writer.write_all(&k.to_be_bytes().repeat(300))?;
            }
            writer.finish()
        });
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(
            !started.load(std::sync::atomic::Ordering::SeqCst),
            "the export waited for its reader"
        );
        let mut bytes = Vec::new();
        stream.read_to_end(&mut bytes).await.expect("read");
        export.await.expect("join").expect("export");
        assert_eq!(bytes.len(), 3_000 * 1_200);
        for (k, block) in bytes.chunks(1_200).enumerate() {
            assert_eq!(block, (k as u32).to_be_bytes().repeat(300));
        }
        assert_eq!(
            stream.stream_position().await.expect("position"),
            bytes.len() as u64
        );
        assert!(
            stream.seek(SeekFrom::Start(0)).await.is_err(),
            "no going back"
        );
    }

    #[tokio::test]
    async fn a_failed_or_abandoned_export_is_an_error_never_a_short_snapshot() {
        let (mut writer, mut stream, first) = export_pipe(2);
        let export = tokio::task::spawn_blocking(move || {
            first.wait();
            writer.write_all(b"half").expect("write");
            writer.flush().expect("flush");
            writer.fail("the disk failed".into());
        });
        let mut bytes = Vec::new();
        let failed = stream.read_to_end(&mut bytes).await;
        export.await.expect("join");
        assert!(failed.is_err_and(|e| e.to_string().contains("the disk failed")));

        let (mut writer, mut stream, first) = export_pipe(2);
        let export = tokio::task::spawn_blocking(move || {
            first.wait();
            writer.write_all(b"half").expect("write");
            writer.flush().expect("flush");
            // Dropped without `finish`.
        });
        let failed = stream.read_to_end(&mut Vec::new()).await;
        export.await.expect("join");
        assert!(failed.is_err_and(|e| e.kind() == io::ErrorKind::UnexpectedEof));
    }

    #[tokio::test]
    async fn a_stream_dropped_unread_stops_its_export_before_it_reads() {
        let (_writer, stream, first) = export_pipe(2);
        let export = tokio::task::spawn_blocking(move || first.wait());
        drop(stream);
        assert!(!export.await.expect("join"), "nothing to export");

        let (mut writer, mut stream, first) = export_pipe(1);
        let export = tokio::task::spawn_blocking(move || {
            first.wait();
            // Endless, but bounded by the pipe: it fails once the reader
            // is gone.
            let piece = vec![7u8; 64 << 10];
            loop {
                if let Err(e) = writer.write_all(&piece) {
                    return e;
                }
            }
        });
        let mut first = [0u8; 16];
        stream.read_exact(&mut first).await.expect("read");
        drop(stream);
        let stopped = export.await.expect("join");
        assert_eq!(stopped.kind(), io::ErrorKind::BrokenPipe);
    }
}
