//! The quinn engine: quinn's high-level endpoint, with its connection and
//! stream types adapted to the session's [`Connection`] and
//! [`DeliverySink`].

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use quinn::{Endpoint, VarInt};
use tracing::{Instrument, debug, info_span, warn};
use volna_proto::CloseCode;

use super::{Admitter, CONTROL_FLUSH, Decision, QuicSettings, TransportError, peer_name};
use crate::session::{self, BrokerContext, Connection};
use crate::subscription::{DeliverySink, SinkError};

/// Binds quinn's endpoint on one socket.
pub(super) fn bind(
    addr: SocketAddr,
    buffer_bytes: usize,
    settings: QuicSettings,
) -> Result<Endpoint, TransportError> {
    let QuicSettings {
        mut endpoint,
        server,
        cid_key,
    } = settings;
    endpoint.cid_generator(move || {
        Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key))
    });
    let socket = super::udp_socket(addr, buffer_bytes, false)
        .map_err(|source| TransportError::Bind { addr, source })?;
    Endpoint::new(
        endpoint,
        Some(server),
        socket,
        Arc::new(quinn::TokioRuntime),
    )
    .map_err(|source| TransportError::Bind { addr, source })
}

/// Accepts connections until the endpoint is closed.
pub async fn serve(endpoint: Endpoint, ctx: Arc<BrokerContext>) {
    let mut admitter = Admitter::new(ctx.clone());
    while let Some(incoming) = endpoint.accept().await {
        let remote = incoming.remote_address();
        let validated = incoming.remote_address_validated();
        let mut slot = match admitter.admit(remote, validated, incoming.may_retry()) {
            Decision::Accept(slot) => slot,
            Decision::Retry => {
                if let Err(e) = incoming.retry() {
                    e.into_incoming().refuse();
                }
                continue;
            }
            Decision::Refuse => {
                incoming.refuse();
                continue;
            }
        };
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
                let peer = peer_name(conn.peer_identity());
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
