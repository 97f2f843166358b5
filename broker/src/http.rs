//! The HTTP side port: liveness and readiness for orchestrators.
//!
//! `/healthz` answers 200 while the process serves HTTP at all; `/readyz`
//! answers 200 only while the log is open, QUIC is listening and the broker
//! is not shutting down, 503 otherwise.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::http::StatusCode;
use axum::routing::get;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::warn;

/// Serves the health endpoints until `shutdown` fires.
pub async fn serve(listener: TcpListener, ready: Arc<AtomicBool>, shutdown: CancellationToken) {
    let app = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/readyz",
            get(move || {
                let ready = ready.load(Ordering::SeqCst);
                async move {
                    if ready {
                        (StatusCode::OK, "ready\n")
                    } else {
                        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
                    }
                }
            }),
        );
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
    {
        warn!(error = %e, "http server stopped");
    }
}
