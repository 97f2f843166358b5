//! The client's WebSocket link: where QUIC cannot go (UDP blocked), the
//! same control and delivery streams as tagged binary messages on one
//! WebSocket (`volna_proto::websocket`).
//!
//! ```text
//!  reader task ──stream 0──▶ control bytes (bounded)
//!      │      ──stream n──▶ a delivery stream's bytes (bounded), announced once
//!  writer task ◀── control writes and stream stops (bounded)
//! ```
//!
//! A WebSocket is one ordered byte stream, so the reader never waits on
//! one delivery stream: a stream whose buffer is full (its subscription's
//! application does not read) is stopped, the broker ends its
//! subscription, and the client subscribes again from its position once
//! the application reads (QUIC gets the same from per-stream flow
//! control). Control replies and the other streams go on meanwhile.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::{HeaderValue, header};
use tokio_tungstenite::tungstenite::protocol::frame::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::{Message, WebSocketConfig};
use tokio_util::sync::CancellationToken;
use tracing::debug;
use volna_proto::CloseCode;
use volna_proto::websocket::{self as ws, CONTROL_STREAM, decode_message, encode_message};

use crate::error::ClientError;

/// Messages queued for the socket.
const OUTBOX: usize = 64;
/// Messages of one stream read and not yet taken.
const STREAM_INBOX: usize = 64;
/// New delivery streams announced and not yet taken.
const ACCEPT_BACKLOG: usize = 64;

/// A byte stream a WebSocket runs over: TCP, or TLS over TCP.
trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// One WebSocket to the broker.
#[derive(Debug)]
pub(crate) struct WsLink {
    outbox: mpsc::Sender<Bytes>,
    accept: tokio::sync::Mutex<mpsc::Receiver<WsRecv>>,
    /// The socket is closed or failed.
    pub gone: CancellationToken,
    /// Why the broker closed it, when it said.
    closed_with: Mutex<Option<(u16, String)>>,
    close_asked: Mutex<Option<CloseCode>>,
    /// Cancelled once the writer sent its close frame (or gave up).
    written: CancellationToken,
}

/// The bytes of one stream from the broker.
#[derive(Debug)]
pub(crate) struct WsRecv {
    pub stream: u32,
    rx: mpsc::Receiver<Bytes>,
}

impl WsRecv {
    /// The next bytes of the stream; `None` once it ended.
    pub async fn next_chunk(&mut self) -> Option<Bytes> {
        self.rx.recv().await
    }
}

/// Where a URL points.
struct Target {
    secure: bool,
    host: String,
    port: u16,
}

fn parse_url(url: &str) -> Result<Target, ClientError> {
    let bad = || ClientError::InvalidAddress(url.to_owned());
    let uri: tokio_tungstenite::tungstenite::http::Uri = url.parse().map_err(|_| bad())?;
    let secure = match uri.scheme_str() {
        Some("wss") => true,
        Some("ws") => false,
        _ => return Err(bad()),
    };
    let host = uri
        .host()
        .ok_or_else(bad)?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let port = uri.port_u16().unwrap_or(if secure { 443 } else { 80 });
    Ok(Target { secure, host, port })
}

impl WsLink {
    /// Opens a WebSocket to `url` (`wss://host:port/ws`, or `ws://` for a
    /// broker serving plain WebSocket in development), TLS as `tls` says,
    /// the certificate checked for `server_name` (default: the URL's host).
    pub async fn connect(
        url: &str,
        tls: Arc<rustls::ClientConfig>,
        server_name: Option<&str>,
        max_message: usize,
        keep_alive: Duration,
        idle_timeout: Duration,
    ) -> Result<(Arc<WsLink>, WsRecv), ClientError> {
        let target = parse_url(url)?;
        let connect_err = |e: &dyn std::fmt::Display| ClientError::Connect(format!("{url}: {e}"));
        let tcp = tokio::net::TcpStream::connect((target.host.as_str(), target.port))
            .await
            .map_err(|e| connect_err(&e))?;
        let _ = tcp.set_nodelay(true);
        let io: Box<dyn Io> = if target.secure {
            let name = server_name.unwrap_or(&target.host).to_owned();
            let name = rustls::pki_types::ServerName::try_from(name)
                .map_err(|_| ClientError::InvalidAddress(url.to_owned()))?;
            let tls = tokio_rustls::TlsConnector::from(tls)
                .connect(name, tcp)
                .await
                .map_err(|e| connect_err(&e))?;
            Box::new(tls)
        } else {
            Box::new(tcp)
        };
        let mut request = url.into_client_request().map_err(|e| connect_err(&e))?;
        request.headers_mut().insert(
            header::SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static(ws::SUBPROTOCOL),
        );
        // Allocated up front (128 KiB by default, grown as needed): a
        // process may hold many connections.
        let config = WebSocketConfig::default()
            .read_buffer_size(16 * 1024)
            .max_message_size(Some(max_message))
            .max_frame_size(Some(max_message));
        let (socket, _response) =
            tokio_tungstenite::client_async_with_config(request, io, Some(config))
                .await
                .map_err(|e| connect_err(&e))?;
        let (sink, stream) = socket.split();
        let (outbox, outbox_rx) = mpsc::channel(OUTBOX);
        let (accept_tx, accept_rx) = mpsc::channel(ACCEPT_BACKLOG);
        let (control_tx, control_rx) = mpsc::channel(STREAM_INBOX);
        let link = Arc::new(WsLink {
            outbox,
            accept: tokio::sync::Mutex::new(accept_rx),
            gone: CancellationToken::new(),
            closed_with: Mutex::new(None),
            close_asked: Mutex::new(None),
            written: CancellationToken::new(),
        });
        tokio::spawn(write_loop(sink, outbox_rx, link.clone(), keep_alive));
        tokio::spawn(read_loop(
            stream,
            control_tx,
            accept_tx,
            link.clone(),
            idle_timeout,
        ));
        Ok((
            link,
            WsRecv {
                stream: CONTROL_STREAM,
                rx: control_rx,
            },
        ))
    }

    /// Writes `bytes` on the control stream.
    pub async fn send_control(&self, bytes: &[u8]) -> Result<(), ClientError> {
        let message = encode_message(CONTROL_STREAM, bytes);
        tokio::select! {
            sent = self.outbox.send(message) => sent.map_err(|_| ClientError::Disconnected),
            () = self.gone.cancelled() => Err(ClientError::Disconnected),
        }
    }

    /// Asks the broker to stop sending `stream`.
    pub fn stop(&self, stream: u32) {
        let _ = self.outbox.try_send(encode_message(stream, &[]));
    }

    /// The next delivery stream the broker opened.
    pub async fn accept(&self) -> Option<WsRecv> {
        let mut accept = self.accept.lock().await;
        tokio::select! {
            stream = accept.recv() => stream,
            () = self.gone.cancelled() => None,
        }
    }

    /// Resolves once the close frame was written (or could not be).
    pub async fn close_written(&self) {
        self.written.cancelled().await;
    }

    /// Closes the WebSocket with `code`.
    pub fn close(&self, code: CloseCode) {
        *self.close_asked.lock().unwrap_or_else(|e| e.into_inner()) = Some(code);
        self.gone.cancel();
    }

    /// Resolves when the socket is closed; says why.
    pub async fn closed(&self) -> (Option<CloseCode>, String) {
        self.gone.cancelled().await;
        match &*self.closed_with.lock().unwrap_or_else(|e| e.into_inner()) {
            Some((code, reason)) => match ws::from_close_code(*code) {
                Some(close) => (
                    Some(close),
                    format!("closed by the broker: {close} ({reason})"),
                ),
                None => (None, format!("WebSocket closed with {code} ({reason})")),
            },
            None => (None, "the WebSocket ended".to_owned()),
        }
    }
}

async fn write_loop(
    mut sink: futures_util::stream::SplitSink<
        tokio_tungstenite::WebSocketStream<Box<dyn Io>>,
        Message,
    >,
    mut outbox: mpsc::Receiver<Bytes>,
    link: Arc<WsLink>,
    keep_alive: Duration,
) {
    let pump = async {
        // A ping while idle: the broker (and any proxy between) sees the
        // connection alive, and its answer keeps ours.
        let mut ping = tokio::time::interval(keep_alive);
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let message = tokio::select! {
                message = outbox.recv() => message,
                _ = ping.tick() => {
                    sink.send(Message::Ping(Bytes::new())).await?;
                    continue;
                }
            };
            let Some(message) = message else { break };
            ping.reset();
            sink.feed(Message::Binary(message)).await?;
            while let Ok(message) = outbox.try_recv() {
                sink.feed(Message::Binary(message)).await?;
            }
            sink.flush().await?;
        }
        Ok::<_, tokio_tungstenite::tungstenite::Error>(())
    };
    tokio::select! {
        result = pump => {
            if let Err(e) = result {
                debug!(error = %e, "WebSocket write failed");
            }
        }
        () = link.gone.cancelled() => {}
    }
    let asked = *link.close_asked.lock().unwrap_or_else(|e| e.into_inner());
    let frame = asked.map(|code| CloseFrame {
        code: ws::close_code(code).into(),
        reason: code.reason().into(),
    });
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        let _ = sink.send(Message::Close(frame)).await;
        let _ = sink.close().await;
    })
    .await;
    link.gone.cancel();
    link.written.cancel();
}

async fn read_loop(
    mut stream: futures_util::stream::SplitStream<tokio_tungstenite::WebSocketStream<Box<dyn Io>>>,
    control: mpsc::Sender<Bytes>,
    accept: mpsc::Sender<WsRecv>,
    link: Arc<WsLink>,
    idle_timeout: Duration,
) {
    let mut streams: std::collections::HashMap<u32, mpsc::Sender<Bytes>> =
        std::collections::HashMap::new();
    loop {
        let message = tokio::select! {
            () = link.gone.cancelled() => break,
            message = stream.next() => message,
            () = tokio::time::sleep(idle_timeout) => {
                debug!(?idle_timeout, "nothing from the broker: the WebSocket is dead");
                break;
            }
        };
        let bytes = match message {
            Some(Ok(Message::Binary(bytes))) => bytes,
            Some(Ok(Message::Close(frame))) => {
                if let Some(frame) = frame {
                    *link.closed_with.lock().unwrap_or_else(|e| e.into_inner()) =
                        Some((frame.code.into(), frame.reason.to_string()));
                }
                break;
            }
            Some(Ok(_)) => continue,
            Some(Err(e)) => {
                debug!(error = %e, "WebSocket read failed");
                break;
            }
            None => break,
        };
        let Ok((id, body)) = decode_message(&bytes) else {
            break;
        };
        if id == CONTROL_STREAM {
            if body.is_empty() || control.send(body).await.is_err() {
                break;
            }
            continue;
        }
        if body.is_empty() {
            // The stream's end.
            streams.remove(&id);
            continue;
        }
        let tx = match streams.get(&id) {
            Some(tx) => tx.clone(),
            None => {
                let (tx, rx) = mpsc::channel(STREAM_INBOX);
                if accept.send(WsRecv { stream: id, rx }).await.is_err() {
                    break;
                }
                streams.insert(id, tx.clone());
                tx
            }
        };
        match tx.try_send(body) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => {
                debug!(
                    stream = id,
                    "a delivery stream's buffer is full: stopping it (its subscription resumes later)"
                );
                streams.insert(id, closed_sender());
                // Sent for sure (a lost stop would leave the subscription
                // ended here and fed there): waits on the socket's writer,
                // never on the application.
                let stop = encode_message(id, &[]);
                tokio::select! {
                    sent = link.outbox.send(stop) => if sent.is_err() { break },
                    () = link.gone.cancelled() => break,
                }
            }
            // Nobody reads it any more (it was stopped): drop what comes.
            Err(mpsc::error::TrySendError::Closed(_)) => {
                streams.insert(id, closed_sender());
            }
        }
    }
    link.gone.cancel();
}

/// A sender whose receiver is gone: what a stopped stream's late bytes
/// are sent to (and dropped).
fn closed_sender() -> mpsc::Sender<Bytes> {
    mpsc::channel(1).0
}
