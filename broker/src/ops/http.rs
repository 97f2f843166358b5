//! The HTTP side port: health, metrics and the admin API.
//!
//! `/healthz` answers 200 while the process serves HTTP at all; `/readyz`
//! answers 200 only while the log is open, QUIC is listening, the broker
//! is not shutting down and (a cluster node) every partition it hosts has
//! a reachable leader and working storage; 503 otherwise, saying why; `/metrics` is the Prometheus text
//! exposition; `/admin/*` is in [`crate::admin`].
//!
//! For browsers: `/client/volna.js` (and its types, `/client/volna.d.ts`)
//! is the JavaScript client (`clients/js`), `/client/endpoints` says where
//! the WebSocket listener is, and `/console` is the web console
//! (`clients/console`): a static page whose data all comes from
//! `/metrics` and the admin API, so it shows nothing without the admin
//! token.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::admin::{self, AdminState};
use crate::fanout::Fanout;
use crate::log::{Log, Logs};
use crate::metrics::{Metrics, Snapshot};
use crate::store::LogStore;

/// What the health and metrics handlers read.
#[derive(Debug, Clone)]
pub struct HttpState {
    /// True while the broker serves.
    pub ready: Arc<AtomicBool>,
    /// The registry to render.
    pub metrics: Arc<Metrics>,
    /// For channel counts.
    pub logs: Logs,
    /// For ring sizes.
    pub fanout: Arc<Fanout>,
    /// For storage figures.
    pub store: Arc<dyn LogStore>,
    /// The cluster's metrics, on a cluster node.
    pub cluster: Option<Arc<dyn crate::admin::ClusterStatus>>,
    /// The WebSocket listener's port and whether it speaks TLS.
    pub websocket: Option<(u16, bool)>,
}

/// The JavaScript client, served as it is in the repository.
const VOLNA_JS: &str = include_str!("../../../clients/js/volna.js");
/// Its TypeScript declarations.
const VOLNA_DTS: &str = include_str!("../../../clients/js/volna.d.ts");
/// The web console page.
const CONSOLE_HTML: &str = include_str!("../../../clients/console/index.html");

/// Serves the HTTP endpoints until `shutdown` fires.
pub async fn serve(
    listener: TcpListener,
    state: HttpState,
    admin: AdminState,
    shutdown: CancellationToken,
) {
    let app = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/client/endpoints", get(endpoints))
        .route(
            "/client/volna.js",
            get(|| async { static_file("text/javascript; charset=utf-8", VOLNA_JS) }),
        )
        .route(
            "/client/volna.d.ts",
            get(|| async { static_file("application/typescript; charset=utf-8", VOLNA_DTS) }),
        )
        .route(
            "/console",
            get(|| async { static_file("text/html; charset=utf-8", CONSOLE_HTML) }),
        )
        .with_state(state)
        .merge(admin::router(admin));
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
    {
        warn!(error = %e, "http server stopped");
    }
}

fn static_file(content_type: &'static str, body: &'static str) -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, content_type),
            // A broker upgrade brings a new client: pages revalidate.
            (header::CACHE_CONTROL, "no-cache"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        body,
    )
}

/// Where browsers reach the WebSocket listener (the host is the one the
/// page was loaded from).
async fn endpoints(State(state): State<HttpState>) -> impl IntoResponse {
    let websocket = state.websocket.map(|(port, tls)| {
        serde_json::json!({ "port": port, "tls": tls, "path": volna_proto::websocket::PATH })
    });
    axum::Json(serde_json::json!({ "websocket": websocket }))
}

async fn readyz(State(state): State<HttpState>) -> impl IntoResponse {
    if !(state.ready.load(Ordering::SeqCst) && state.logs.all().all(Log::is_open)) {
        return (StatusCode::SERVICE_UNAVAILABLE, "not ready\n".to_owned());
    }
    // A cluster node is ready once every partition it hosts has a leader:
    // before that, its devices' publishes and subscribes would only wait.
    match state.cluster.as_ref().map(|c| c.readiness()) {
        Some(Err(why)) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {why}\n"),
        ),
        _ => (StatusCode::OK, "ready\n".to_owned()),
    }
}

async fn metrics(State(state): State<HttpState>) -> impl IntoResponse {
    // Storage properties are cheap RocksDB calls, but still calls into
    // RocksDB: keep them off the async workers.
    let store = state.store.clone();
    let storage = tokio::task::spawn_blocking(move || store.stats())
        .await
        .unwrap_or_default();
    let snapshot = Snapshot {
        resident_channels: state.logs.all().map(|log| log.directory().len()).sum(),
        subscribed_channels: state.fanout.subscribed_channels(),
        outbox_bytes: state.fanout.total_ring_bytes(),
        storage,
    };
    let mut text = state.metrics.render(&snapshot);
    if let Some(cluster) = &state.cluster {
        text.push_str(&cluster.metrics());
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text)
}
