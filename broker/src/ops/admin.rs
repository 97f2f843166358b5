//! The operator API under `/admin` on the HTTP port, behind a bearer token.
//!
//! | method and path | does |
//! |---|---|
//! | `GET /admin/channels?prefix=P&limit=N&after=C` | channels with offsets, sizes, subscribers, in name order |
//! | `GET /admin/channels/{name}` | one channel |
//! | `DELETE /admin/channels/{name}` | remove a channel and its log; its subscribers end with `ChannelDeleted` |
//! | `GET /admin/sessions` | open sessions |
//! | `POST /admin/kick` `{"user": U}` or `{"session": N}` | disconnect them |
//! | `GET`/`PUT /admin/namespaces/{ns}/retention` | a namespace's retention (changes last until restart) |
//! | `GET /admin/channels/{name}/messages?last=N` | the channel's last N (≤ 100) messages, oldest first |
//! | `POST /admin/publish` `{"channel": C, "payload": "text"}` | publish from the server side |
//! | `GET /admin/cluster` | the cluster as this node sees it |
//! | `GET /admin/cluster/partitions/{p}/digest` | this replica's digest of partition `p` at its applied entry |
//!
//! Without a configured token every request is refused (403): an admin API
//! without authentication is never on by accident. Errors are JSON
//! `{"error": "..."}` with a fitting status.

use std::sync::Arc;
use std::time::SystemTime;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use volna_proto::ChannelName;

use crate::config::Retention;
use crate::fanout::Fanout;
use crate::log::{AppendInput, Logs};
use crate::retention::Policies;
use crate::session::SessionRegistry;
use crate::store::ChannelMeta;

/// What the admin handlers work on.
#[derive(Debug, Clone)]
pub struct AdminState {
    /// The channel logs.
    pub logs: Logs,
    /// The fan-out engine (subscriber counts).
    pub fanout: Arc<Fanout>,
    /// Open sessions.
    pub sessions: Arc<SessionRegistry>,
    /// Retention policies.
    pub policies: Arc<Policies>,
    /// SHA-256 of the admin token; `None` disables the API.
    pub token_digest: Option<[u8; 32]>,
    /// The payload limit publishes from the API obey too.
    pub max_payload: u32,
    /// The cluster node, when this broker is one.
    pub cluster: Option<Arc<dyn ClusterStatus>>,
    /// Device state, where the broker keeps it.
    pub devices: Option<Arc<crate::devices::Devices>>,
}

/// What `/admin/cluster` reports (a cluster node's view of the cluster).
pub trait ClusterStatus: Send + Sync + std::fmt::Debug + 'static {
    /// The report, as JSON.
    fn status(&self) -> serde_json::Value;
    /// The cluster's metrics in Prometheus' text format, read at scrape
    /// time.
    fn metrics(&self) -> String;
    /// Whether the node can take traffic as far as the cluster goes: every
    /// partition it hosts has a reachable leader and working storage.
    /// `Err` says which do not.
    fn readiness(&self) -> Result<(), String> {
        Ok(())
    }
    /// This replica's digest of `partition` and the entry it stands at
    /// (JSON); `Err` when the node does not replicate it.
    fn digest(
        &self,
        partition: u32,
    ) -> crate::log::BoxFuture<'_, Result<serde_json::Value, (StatusCode, String)>>;
}

/// One channel as the admin API shows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ChannelInfo {
    /// The channel's name.
    pub name: String,
    /// Its log's epoch, hex.
    pub epoch: String,
    /// Oldest stored offset.
    pub first_offset: u64,
    /// Offset of the next message.
    pub next_offset: u64,
    /// Messages stored.
    pub messages: u64,
    /// Payload bytes stored.
    pub bytes: u64,
    /// Subscribers on this broker.
    pub subscribers: usize,
}

/// One session as the admin API shows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SessionView {
    /// Session id.
    pub id: u64,
    /// User.
    pub user: String,
    /// Client self-description.
    pub client: String,
    /// Client address.
    pub remote: String,
    /// Seconds since it connected.
    pub connected_secs: u64,
    /// Subscriptions held.
    pub subscriptions: usize,
}

/// `POST /admin/kick` body.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KickRequest {
    /// Disconnect every session of this user.
    pub user: Option<String>,
    /// Disconnect this session.
    pub session: Option<u64>,
}

/// `POST /admin/publish` body.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PublishRequest {
    /// Target channel.
    pub channel: String,
    /// UTF-8 payload.
    pub payload: String,
}

#[derive(Debug, Deserialize)]
struct LastQuery {
    last: Option<u64>,
}

/// Most messages `/admin/channels/{name}/messages` returns.
const MAX_LAST_MESSAGES: u64 = 100;

/// One stored message as the channel browser shows it: the payload as
/// text where it is UTF-8, else hex of its first bytes.
#[derive(Debug, Serialize)]
struct MessageView {
    offset: u64,
    timestamp_ms: u64,
    size: usize,
    text: Option<String>,
    hex: Option<String>,
}

#[derive(Debug, Deserialize)]
struct ListQuery {
    prefix: Option<String>,
    limit: Option<usize>,
    /// Continue after this channel name (paging).
    after: Option<String>,
}

/// An error response: status and message.
#[derive(Debug)]
struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(serde_json::json!({ "error": self.1 }))).into_response()
    }
}

type ApiResult<T> = Result<Json<T>, ApiError>;

/// The admin routes.
pub fn router(state: AdminState) -> Router {
    Router::new()
        .route("/admin/channels", get(list_channels))
        .route(
            "/admin/channels/{name}",
            get(channel_detail).delete(delete_channel),
        )
        .route("/admin/channels/{name}/messages", get(last_messages))
        .route("/admin/sessions", get(list_sessions))
        .route("/admin/cluster", get(cluster_status))
        .route(
            "/admin/cluster/partitions/{partition}/digest",
            get(partition_digest),
        )
        .route("/admin/kick", post(kick))
        .route(
            "/admin/namespaces/{ns}/retention",
            get(get_retention).put(put_retention),
        )
        .route("/admin/publish", post(publish))
        .route("/admin/users/{user}/unread", get(user_unread))
        .with_state(state)
}

/// The digest the API compares bearer tokens against.
pub fn token_digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

fn authorize(state: &AdminState, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(expected) = state.token_digest else {
        return Err(ApiError(
            StatusCode::FORBIDDEN,
            "the admin API is disabled: set admin.token or admin.token_file".into(),
        ));
    };
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .ok_or_else(|| ApiError(StatusCode::UNAUTHORIZED, "missing bearer token".into()))?;
    // Digests of equal length: the comparison's time does not depend on
    // how much of the secret token a caller guessed.
    if token_digest(presented) != expected {
        return Err(ApiError(
            StatusCode::UNAUTHORIZED,
            "wrong admin token".into(),
        ));
    }
    Ok(())
}

fn channel_info(state: &AdminState, name: &ChannelName, meta: &ChannelMeta) -> ChannelInfo {
    ChannelInfo {
        name: name.to_string(),
        epoch: meta.epoch.to_string(),
        first_offset: meta.first_offset.get(),
        next_offset: meta.next_offset.get(),
        messages: meta.len(),
        bytes: meta.bytes,
        subscribers: state.fanout.subscribers(name),
    }
}

fn storage_error(e: impl std::fmt::Display) -> ApiError {
    ApiError(StatusCode::SERVICE_UNAVAILABLE, e.to_string())
}

/// Channels in name order, read from the store (most are not in memory),
/// at most `limit` of each log.
async fn list_channels(
    State(state): State<AdminState>,
    headers: HeaderMap,
    Query(query): Query<ListQuery>,
) -> ApiResult<Vec<ChannelInfo>> {
    authorize(&state, &headers)?;
    let prefix = query.prefix.unwrap_or_default();
    let limit = query.limit.unwrap_or(1000).min(100_000);
    let after = query
        .after
        .map(ChannelName::new)
        .transpose()
        .map_err(|e| ApiError(StatusCode::BAD_REQUEST, e.to_string()))?;
    let mut found = Vec::new();
    for log in state.logs.all() {
        let channels = log
            .scan_channels(&prefix, after.clone(), limit)
            .await
            .map_err(storage_error)?;
        found.extend(channels);
    }
    found.sort_by(|a, b| a.0.cmp(&b.0));
    found.truncate(limit);
    Ok(Json(
        found
            .iter()
            .map(|(name, meta)| channel_info(&state, name, meta))
            .collect(),
    ))
}

fn channel_name(name: String) -> Result<ChannelName, ApiError> {
    ChannelName::new(name).map_err(|e| ApiError(StatusCode::BAD_REQUEST, e.to_string()))
}

async fn channel_detail(
    State(state): State<AdminState>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> ApiResult<ChannelInfo> {
    authorize(&state, &headers)?;
    let name = channel_name(name)?;
    let meta = state
        .logs
        .for_channel(&name)
        .lookup(&name)
        .await
        .map_err(storage_error)?
        .ok_or_else(|| ApiError(StatusCode::NOT_FOUND, format!("no channel {name}")))?;
    Ok(Json(channel_info(&state, &name, &meta)))
}

/// A channel's last messages (the channel browser's view), oldest first.
async fn last_messages(
    State(state): State<AdminState>,
    headers: HeaderMap,
    Path(name): Path<String>,
    Query(query): Query<LastQuery>,
) -> ApiResult<Vec<MessageView>> {
    authorize(&state, &headers)?;
    let name = channel_name(name)?;
    let last = query.last.unwrap_or(20).clamp(1, MAX_LAST_MESSAGES);
    let log = state.logs.for_channel(&name);
    let meta = log
        .lookup(&name)
        .await
        .map_err(storage_error)?
        .ok_or_else(|| ApiError(StatusCode::NOT_FOUND, format!("no channel {name}")))?;
    let until = meta.next_offset;
    let from = volna_proto::Offset::new(
        until
            .get()
            .saturating_sub(last)
            .max(meta.first_offset.get()),
    );
    if from >= until {
        return Ok(Json(Vec::new()));
    }
    let (_, messages) = log
        .read_channel(
            &name,
            crate::log::ReadRange {
                from,
                until,
                max_messages: last as usize,
                max_bytes: 4 * 1024 * 1024,
            },
        )
        .await
        .map_err(storage_error)?
        .ok_or_else(|| ApiError(StatusCode::NOT_FOUND, format!("no channel {name}")))?;
    Ok(Json(
        messages
            .into_iter()
            .map(|m| {
                let text = std::str::from_utf8(&m.payload)
                    .ok()
                    .map(|t| t.chars().take(1000).collect::<String>());
                let hex = text.is_none().then(|| {
                    m.payload
                        .iter()
                        .take(64)
                        .map(|b| format!("{b:02x}"))
                        .collect::<String>()
                });
                MessageView {
                    offset: m.offset.get(),
                    timestamp_ms: m.timestamp_ms,
                    size: m.payload.len(),
                    text,
                    hex,
                }
            })
            .collect(),
    ))
}

/// Removes a channel and its whole log. Its subscribers' streams end with
/// `ChannelDeleted`; a later publish to the name creates a new channel
/// (new epoch, offsets from 1).
async fn delete_channel(
    State(state): State<AdminState>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> ApiResult<ChannelInfo> {
    authorize(&state, &headers)?;
    let name = channel_name(name)?;
    let subscribers = state.fanout.subscribers(&name);
    let meta = state
        .logs
        .for_channel(&name)
        .delete(name.clone())
        .await
        .map_err(storage_error)?
        .ok_or_else(|| ApiError(StatusCode::NOT_FOUND, format!("no channel {name}")))?;
    // Its cursors and markers stopped counting (they name the deleted
    // incarnation); the sweep removes them from disk.
    if let Some(devices) = &state.devices {
        devices.sweep_now();
    }
    Ok(Json(ChannelInfo {
        subscribers,
        ..channel_info(&state, &name, &meta)
    }))
}

/// One channel's unread count for a user.
#[derive(Debug, Serialize)]
struct UnreadView {
    channel: String,
    head: u64,
    read: u64,
    unread: u64,
}

/// A user's unread count on every channel the user has a read marker on
/// (`?channel=a&channel=b` is not parsed: ask per user, as `volna admin
/// unread USER` does).
async fn user_unread(
    State(state): State<AdminState>,
    headers: HeaderMap,
    Path(user): Path<String>,
) -> ApiResult<Vec<UnreadView>> {
    authorize(&state, &headers)?;
    let devices = state.devices.as_ref().ok_or_else(|| {
        ApiError(
            StatusCode::NOT_FOUND,
            "this broker keeps no device state (a cluster node)".into(),
        )
    })?;
    let counts = devices
        .unread(
            &state.logs,
            &user,
            Vec::new(),
            volna_proto::MAX_UNREAD_CHANNELS,
            |_| true,
        )
        .await
        .map_err(storage_error)?;
    Ok(Json(
        counts
            .into_iter()
            .map(|(channel, count)| UnreadView {
                channel: channel.to_string(),
                head: count.head,
                read: count.read,
                unread: count.unread,
            })
            .collect(),
    ))
}

async fn cluster_status(
    State(state): State<AdminState>,
    headers: HeaderMap,
) -> ApiResult<serde_json::Value> {
    authorize(&state, &headers)?;
    match &state.cluster {
        Some(cluster) => Ok(Json(cluster.status())),
        None => Err(ApiError(
            StatusCode::NOT_FOUND,
            "this broker is a single node (no [cluster] configured)".into(),
        )),
    }
}

async fn partition_digest(
    State(state): State<AdminState>,
    headers: HeaderMap,
    Path(partition): Path<u32>,
) -> ApiResult<serde_json::Value> {
    authorize(&state, &headers)?;
    let Some(cluster) = &state.cluster else {
        return Err(ApiError(
            StatusCode::NOT_FOUND,
            "this broker is a single node (no [cluster] configured)".into(),
        ));
    };
    cluster
        .digest(partition)
        .await
        .map(Json)
        .map_err(|(status, why)| ApiError(status, why))
}

async fn list_sessions(
    State(state): State<AdminState>,
    headers: HeaderMap,
) -> ApiResult<Vec<SessionView>> {
    authorize(&state, &headers)?;
    let now = SystemTime::now();
    Ok(Json(
        state
            .sessions
            .list()
            .iter()
            .map(|s| SessionView {
                id: s.id,
                user: s.user.clone(),
                client: s.client.clone(),
                remote: s.remote.to_string(),
                connected_secs: now
                    .duration_since(s.connected_at)
                    .map_or(0, |d| d.as_secs()),
                subscriptions: s.subscriptions.load(std::sync::atomic::Ordering::Relaxed),
            })
            .collect(),
    ))
}

async fn kick(
    State(state): State<AdminState>,
    headers: HeaderMap,
    Json(request): Json<KickRequest>,
) -> ApiResult<serde_json::Value> {
    authorize(&state, &headers)?;
    let disconnected = match (request.user, request.session) {
        (Some(user), None) => state.sessions.kick_user(&user),
        (None, Some(id)) => usize::from(state.sessions.kick_session(id)),
        _ => {
            return Err(ApiError(
                StatusCode::BAD_REQUEST,
                "give exactly one of \"user\" and \"session\"".into(),
            ));
        }
    };
    Ok(Json(serde_json::json!({ "disconnected": disconnected })))
}

fn namespace(ns: &str) -> Result<(), ApiError> {
    if ns.is_empty() || ns.contains('.') || ChannelName::new(ns).is_err() {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            format!("{ns:?} is not a namespace (one channel-name segment)"),
        ));
    }
    Ok(())
}

async fn get_retention(
    State(state): State<AdminState>,
    headers: HeaderMap,
    Path(ns): Path<String>,
) -> ApiResult<Retention> {
    authorize(&state, &headers)?;
    namespace(&ns)?;
    Ok(Json(state.policies.get(&ns)))
}

async fn put_retention(
    State(state): State<AdminState>,
    headers: HeaderMap,
    Path(ns): Path<String>,
    Json(retention): Json<Retention>,
) -> ApiResult<Retention> {
    authorize(&state, &headers)?;
    namespace(&ns)?;
    for (key, value) in [
        ("max_messages", retention.max_messages),
        ("max_bytes", retention.max_bytes),
        ("max_age_secs", retention.max_age_secs),
    ] {
        if value == Some(0) {
            return Err(ApiError(
                StatusCode::BAD_REQUEST,
                format!("{key} must be at least 1"),
            ));
        }
    }
    state.policies.set(&ns, retention.clone());
    Ok(Json(retention))
}

async fn publish(
    State(state): State<AdminState>,
    headers: HeaderMap,
    Json(request): Json<PublishRequest>,
) -> ApiResult<serde_json::Value> {
    authorize(&state, &headers)?;
    let channel = ChannelName::new(request.channel)
        .map_err(|e| ApiError(StatusCode::BAD_REQUEST, e.to_string()))?;
    if request.payload.len() > state.max_payload as usize {
        return Err(ApiError(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("payload exceeds the limit of {} bytes", state.max_payload),
        ));
    }
    let appended = state
        .logs
        .for_channel(&channel)
        .clone()
        .append(AppendInput {
            channel,
            producer: None,
            payload: request.payload.into(),
        })
        .await
        .map_err(|e| ApiError(StatusCode::SERVICE_UNAVAILABLE, e.to_string()))?;
    Ok(Json(serde_json::json!({
        "offset": appended.offset.get(),
        "epoch": appended.epoch.to_string(),
    })))
}
