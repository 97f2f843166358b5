//! The broker's configuration: embedded defaults, a TOML file, then flags.
//!
//! Every field has a default that is safe for a first run on a laptop
//! (DESIGN.md §6); `Config::default()` is that configuration. Values are
//! checked once by [`Config::validate`], so the rest of the broker can trust
//! them.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// When a publish is acknowledged (G2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    /// After the record is in RocksDB's write-ahead log (in the OS page
    /// cache): survives a broker crash, not a power loss.
    #[default]
    Wal,
    /// After the write-ahead log is fsynced (group commit amortizes it):
    /// survives a power loss.
    Fsync,
}

/// How much of a channel's log is kept. Unset limits do not apply.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Retention {
    /// Keep at most this many messages per channel.
    pub max_messages: Option<u64>,
    /// Keep at most this many payload bytes per channel.
    pub max_bytes: Option<u64>,
    /// Keep messages at most this many seconds.
    pub max_age_secs: Option<u64>,
}

impl Retention {
    /// Whether any limit is set.
    pub fn is_bounded(&self) -> bool {
        self.max_messages.is_some() || self.max_bytes.is_some() || self.max_age_secs.is_some()
    }
}

/// Who may publish to a namespace's channels (beyond the token's grants).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Publishers {
    /// Whoever the token's grants allow.
    #[default]
    Any,
    /// Only server-side identities: tokens with `role = "server"`, clients
    /// with a trusted certificate (mutual TLS), and the admin API.
    Server,
}

/// Configuration of one namespace (a channel name's first segment).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NamespaceConfig {
    /// How much history the namespace's channels keep.
    pub retention: Retention,
    /// Who may publish.
    pub publishers: Publishers,
    /// Whether messages are stored in RocksDB (`true`) or only in memory
    /// (`false`: ephemeral channels — typing indicators, presence — whose
    /// history is bounded by `retention` and lost on restart).
    pub persistent: bool,
    /// The application's push service, told of every message committed to
    /// the namespace so that it can wake offline devices (`None`: nobody).
    pub push: Option<PushConfig>,
}

impl Default for NamespaceConfig {
    fn default() -> Self {
        Self {
            retention: Retention::default(),
            publishers: Publishers::Any,
            persistent: true,
            push: None,
        }
    }
}

/// A namespace's push hook (README, "Push hook"): batches of commit notices
/// posted as JSON to the application's push service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PushConfig {
    /// Where the notices are posted (`http://` or `https://`).
    pub webhook_url: String,
    /// How long notices gather before a post (at most one post per
    /// interval while the receiver keeps up).
    pub batch_ms: u64,
    /// Notices waiting to be posted; beyond it the oldest are dropped and
    /// counted (`volna_push_notices_dropped_total`): publishing never waits.
    pub queue: usize,
    /// Notices in one post at most.
    pub max_batch: usize,
    /// How long one post may take before it counts as failed.
    pub timeout_ms: u64,
}

impl Default for PushConfig {
    fn default() -> Self {
        Self {
            webhook_url: String::new(),
            batch_ms: 100,
            queue: 100_000,
            max_batch: 1000,
            timeout_ms: 5000,
        }
    }
}

/// Durable per-device state: cursors, read markers, the device registry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CursorsConfig {
    /// Acks and read markers are coalesced (latest per device and channel
    /// wins) and written together at most this long after they arrive; a
    /// `Stored` reply means the write is done.
    pub flush_ms: u64,
    /// A connection (protocol 5) is told that its acks are stored at most
    /// this often, by one `Stored` covering them all; 0: only when it asks
    /// (`FlushAcks`). A device acknowledging each message then sends one
    /// packet per ack and gets no reply each.
    pub report_ms: u64,
    /// A device that has not connected for this many days is forgotten
    /// with its cursors; a user's read markers go with the last device.
    pub device_idle_days: u64,
    /// Devices one user may have (beyond it a new device is refused with
    /// `TooManyDevices` until an idle one is forgotten).
    pub max_devices_per_user: u32,
    /// Unread counts are exact up to this number, then stop counting.
    pub unread_cap: u64,
    /// How often the registry is swept for idle devices and the cursors of
    /// deleted channels.
    pub sweep_interval_secs: u64,
}

impl Default for CursorsConfig {
    fn default() -> Self {
        Self {
            flush_ms: 200,
            report_ms: 5_000,
            device_idle_days: 90,
            max_devices_per_user: 32,
            unread_cap: 10_000,
            sweep_interval_secs: 3600,
        }
    }
}

/// The WebSocket transport: the same protocol for browsers and networks
/// that block UDP, on its own TCP listener.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WebSocketConfig {
    /// Whether the broker listens for WebSocket connections at all.
    pub enabled: bool,
    /// TCP address; unset, the QUIC address's host and port over TCP (the
    /// way HTTP/3 and HTTP/2 share 443).
    pub listen: Option<SocketAddr>,
    /// Plain `ws://` without TLS: for development only (a browser page
    /// served over `http://` from localhost); the broker warns when on.
    pub plaintext: bool,
    /// Messages each delivery stream may have queued on the socket (each
    /// up to 64 KiB): beyond it the subscription waits, and falls back to
    /// log reads like a slow QUIC stream, while the others go on.
    pub stream_queue_messages: u32,
    /// Web origins (`scheme://host[:port]`) whose pages may open a
    /// WebSocket to the broker, besides the broker's own console, which
    /// is always allowed; `"*"` allows every origin. A browser names the
    /// page's origin in the upgrade's `Origin` header: without this check
    /// any web site a visitor opens could drive the broker from the
    /// visitor's browser, from inside their network and with their
    /// installed client certificate. Requests without `Origin` are not
    /// from a page (native clients) and are always served.
    pub allowed_origins: Vec<String>,
    /// What a client certificate presented over WebSocket grants.
    pub client_certificates: WebSocketCertificates,
}

impl Default for WebSocketConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            listen: None,
            plaintext: false,
            stream_queue_messages: 8,
            allowed_origins: Vec::new(),
            client_certificates: WebSocketCertificates::default(),
        }
    }
}

/// What a client certificate (verified against `tls.client_ca`) grants
/// on a WebSocket connection. Over QUIC it always identifies a backend
/// service; over WebSocket it is often a person's certificate installed
/// in their browser, which any page the browser opens may present.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum WebSocketCertificates {
    /// The certificate is verified by TLS but grants nothing: the session
    /// authenticates with the token in `Hello`, as any device does.
    #[default]
    Token,
    /// The certificate is a backend service's identity, as over QUIC: no
    /// token needed, server-side rights.
    Service,
}

/// One entry of `websocket.allowed_origins`, parsed: a web origin as a
/// browser serializes it in the `Origin` header (RFC 6454), compared by
/// scheme, host and port.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct WebOrigin {
    scheme: String,
    host: String,
    /// `None` for the scheme's default port, which browsers leave out.
    port: Option<u16>,
}

impl WebOrigin {
    /// An origin with `scheme`, `host` and `port` (the default port of
    /// `http` and `https` is left out, as browsers do).
    pub fn new(scheme: &str, host: &str, port: u16) -> Self {
        let scheme = scheme.to_ascii_lowercase();
        let port = (Some(port) != default_port(&scheme)).then_some(port);
        Self {
            scheme,
            host: host.to_ascii_lowercase(),
            port,
        }
    }

    /// Parses `scheme://host[:port]` (an IPv6 host in brackets); the
    /// error says what is wrong with it.
    pub fn parse(text: &str) -> Result<Self, &'static str> {
        let Some((scheme, rest)) = text.split_once("://") else {
            return Err("must be scheme://host[:port], e.g. https://app.example.com, or \"*\"");
        };
        let scheme_ok = scheme.starts_with(|c: char| c.is_ascii_alphabetic())
            && scheme
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'));
        if !scheme_ok {
            return Err("the scheme must be letters, digits, +, - or . (e.g. https)");
        }
        if rest.contains(['/', '?', '#']) {
            return Err("an origin has no path, query or fragment (drop the trailing /)");
        }
        if rest.contains('@') {
            return Err("an origin has no user name");
        }
        if rest.contains('*') {
            return Err("only \"*\" alone is a wildcard (list each host)");
        }
        // An IPv6 literal is bracketed and holds colons of its own.
        let (host, port) = match rest.strip_prefix('[') {
            Some(v6) => {
                let Some((inner, after)) = v6.split_once(']') else {
                    return Err("an IPv6 host needs its closing ]");
                };
                if inner.parse::<std::net::Ipv6Addr>().is_err() {
                    return Err("the bracketed host is not an IPv6 address");
                }
                let port = match after {
                    "" => None,
                    _ => Some(after.strip_prefix(':').ok_or("junk after the IPv6 host")?),
                };
                (&rest[..inner.len() + 2], port)
            }
            None => {
                let (host, port) = match rest.split_once(':') {
                    Some((host, port)) => (host, Some(port)),
                    None => (rest, None),
                };
                // Browsers send international names in punycode.
                let host_ok = !host.is_empty()
                    && host
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'));
                if !host_ok {
                    return Err(
                        "the host must be a DNS name (punycode) or an IP address (IPv6 in brackets)",
                    );
                }
                (host, port)
            }
        };
        let scheme = scheme.to_ascii_lowercase();
        let port = match port {
            None => None,
            Some(port) => {
                let port: u16 = port
                    .parse()
                    .ok()
                    .filter(|&p| p > 0)
                    .ok_or("the port must be 1 to 65535")?;
                (Some(port) != default_port(&scheme)).then_some(port)
            }
        };
        Ok(Self {
            scheme,
            host: host.to_ascii_lowercase(),
            port,
        })
    }
}

impl std::fmt::Display for WebOrigin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}://{}", self.scheme, self.host)?;
        match self.port {
            Some(port) => write!(f, ":{port}"),
            None => Ok(()),
        }
    }
}

/// The port a browser leaves out of an origin of `scheme`.
fn default_port(scheme: &str) -> Option<u16> {
    match scheme {
        "http" | "ws" => Some(80),
        "https" | "wss" => Some(443),
        _ => None,
    }
}

/// Per-connection limits, announced to the client in `Welcome`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Largest publish payload, in bytes.
    pub max_payload: u32,
    /// Subscriptions one connection may hold.
    pub max_subscriptions: u32,
    /// Publishes one connection may have waiting for their ack; beyond it
    /// the broker stops reading that connection (QUIC flow control pushes
    /// back on the client).
    pub max_inflight_publishes: u32,
    /// How long a new connection may take to send `Hello`.
    pub hello_timeout_ms: u64,
    /// A connection silent for this long is closed (clients send keep-alives).
    pub idle_timeout_ms: u64,
    /// A session whose control stream has not taken a frame for this long
    /// (the client stopped reading it) is closed with `CONTROL_STALLED`.
    pub control_stall_secs: u64,
    /// Connections one user (token `sub`) may hold at once; server-side
    /// identities are not limited.
    pub max_connections_per_user: u32,
    /// Publishes per second one connection may make (token bucket; 0: no
    /// limit). Server-side identities are not limited.
    pub publish_rate_per_connection: u32,
    /// Publishes per second all of one user's connections may make together
    /// (0: no limit).
    pub publish_rate_per_user: u32,
    /// Publishes a connection or user may make in a burst above its rate.
    pub publish_burst: u32,
    /// New connections per second accepted from one IP address (0: no
    /// limit). Generous by default: carrier-grade NAT puts many devices
    /// behind one address.
    pub handshakes_per_ip_per_sec: u32,
    /// Connections one IP address may open in a burst above that rate.
    pub handshake_burst_per_ip: u32,
    /// Connections the broker holds at once, handshakes included; beyond
    /// it new ones are refused before any cryptography.
    pub max_connections: usize,
    /// Handshakes in progress at once; beyond it new ones are refused.
    pub max_handshakes_in_progress: usize,
    /// Above this many new connections per second (broker-wide), a client
    /// must first prove it receives at its address (a QUIC Retry): a flood
    /// from spoofed addresses then costs one stateless packet each and
    /// never reaches a handshake. 0: never ask.
    pub retry_above_handshakes_per_sec: u32,
    /// New channels one user may create per minute, all connections
    /// together (a publish to a channel that does not exist creates it);
    /// beyond it such publishes get `RateLimited`. 0: no limit. Server-side
    /// identities are not limited.
    pub channel_creations_per_minute: u32,
    /// Channels a user may create in a burst above that rate.
    pub channel_creation_burst: u32,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_payload: 1024 * 1024,
            max_subscriptions: 1024,
            max_inflight_publishes: 4096,
            hello_timeout_ms: 10_000,
            idle_timeout_ms: 30_000,
            max_connections_per_user: 32,
            control_stall_secs: 30,
            publish_rate_per_connection: 100,
            publish_rate_per_user: 300,
            publish_burst: 200,
            handshakes_per_ip_per_sec: 1_000,
            handshake_burst_per_ip: 5_000,
            max_connections: 250_000,
            max_handshakes_in_progress: 4_096,
            retry_above_handshakes_per_sec: 2_000,
            channel_creations_per_minute: 60,
            channel_creation_burst: 100,
        }
    }
}

impl LimitsConfig {
    /// The frame limit that follows from the payload limit: room for one
    /// full payload plus a delivery batch's worth of smaller messages
    /// (`fanout::TARGET_FRAME_BYTES`) and headers.
    pub fn max_frame(&self) -> u32 {
        self.max_payload.saturating_add(128 * 1024)
    }
}

/// Tuning of the log writer and the fan-out engine.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EngineConfig {
    /// Publishes queued for the log writer before publishers wait.
    pub writer_queue: usize,
    /// Payload bytes queued for the log writer before publishers wait (at
    /// most 4 GiB): with large payloads this, not `writer_queue`, bounds
    /// the queue's memory.
    pub writer_queue_bytes: usize,
    /// Most publishes group-committed in one RocksDB write batch.
    pub max_batch_messages: usize,
    /// Most payload bytes group-committed in one RocksDB write batch.
    pub max_batch_bytes: usize,
    /// Threads that read the log for catch-up.
    pub reader_threads: usize,
    /// Bytes of recently committed, encoded batches each subscribed channel
    /// keeps in memory; subscribers behind it read the log instead.
    pub channel_ring_bytes: usize,
    /// Bytes all channels' rings may hold together; beyond it the least
    /// recently active channels' rings give up their oldest batches first
    /// (their subscribers read the log).
    pub max_ring_bytes_total: usize,
    /// Idempotent-publish window: sequences remembered per producer. A
    /// retry is recognised while fewer than this many newer publishes of
    /// the same producer were stored; clients keep fewer in flight.
    pub producer_window: usize,
    /// A producer window is forgotten (in memory and on disk) this long
    /// after its producer's last stored publish: the retry horizon of
    /// idempotent publish.
    pub producer_idle_secs: u64,
    /// Producer windows kept in memory; beyond it the least recently used
    /// are dropped from memory (they stay on disk and load on next use).
    pub max_resident_producers: usize,
    /// Producer windows (idempotent-publish state) one user may have live
    /// at once; a publish that starts another evicts the user's least
    /// recently used window (`TooManyProducers` only when every window of
    /// the user is new in one write batch). Server-side identities are not
    /// limited.
    pub max_producers_per_user: usize,
    /// Channels whose metadata is kept in memory; beyond it the least
    /// recently published are dropped from memory (they stay on disk and
    /// load on next use), so memory follows the active channels, not every
    /// channel ever created.
    pub max_resident_channels: usize,
    /// How often retention runs, in milliseconds.
    pub retention_interval_ms: u64,
    /// QUIC transport shards, each a loop with its own socket, endpoint
    /// and connections: 0 means one per core.
    pub shards: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            writer_queue: 16 * 1024,
            writer_queue_bytes: 64 * 1024 * 1024,
            max_batch_messages: 4096,
            max_batch_bytes: 8 * 1024 * 1024,
            reader_threads: 2,
            channel_ring_bytes: 4 * 1024 * 1024,
            max_ring_bytes_total: 1024 * 1024 * 1024,
            producer_window: 256,
            producer_idle_secs: 24 * 3600,
            max_resident_producers: 100_000,
            max_producers_per_user: 64,
            max_resident_channels: 250_000,
            retention_interval_ms: 10_000,
            shards: 0,
        }
    }
}

/// TLS material. Without `cert` and `key` the broker runs in development
/// mode with a self-signed certificate kept in the data directory.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// PEM certificate chain; re-read, with `key`, on SIGHUP.
    pub cert: Option<PathBuf>,
    /// PEM private key.
    pub key: Option<PathBuf>,
    /// PEM CA certificates for mutual TLS: a client presenting a
    /// certificate they issued is a server-side identity (a backend
    /// service) and needs no token. Clients without a certificate still
    /// authenticate with tokens.
    pub client_ca: Option<PathBuf>,
}

/// The operator API on the HTTP port.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// Bearer token for `/admin/*`; without it (or `token_file`) the admin
    /// API answers 403 to everyone.
    pub token: Option<String>,
    /// File holding the bearer token (first line), instead of `token`.
    pub token_file: Option<PathBuf>,
}

/// Cluster membership (DESIGN.md §7). Without a `[cluster]` section the
/// broker is a single node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterSection {
    /// This node's id: unique in the cluster, never reused for another
    /// machine's data.
    pub node_id: u64,
    /// The cluster's name: its keys in etcd live under `/volna/<name>/`.
    pub name: String,
    /// etcd client URLs.
    pub etcd_endpoints: Vec<String>,
    /// Where devices reach this node's QUIC port (defaults to `listen`).
    pub advertise_addr: Option<String>,
    /// UDP address for the inter-node QUIC endpoint.
    pub peer_listen: SocketAddr,
    /// Where other nodes reach `peer_listen` (defaults to it).
    pub peer_advertise: Option<String>,
    /// Partitions channels hash to; fixed when the cluster is created (the
    /// first node's value is stored in etcd and adopted by the others).
    pub partitions: u32,
    /// Replicas (Raft voters) per partition.
    pub replicas: usize,
    /// Raft election timeout: a partition whose leader went silent has
    /// elected another within this long (openraft's leader lease and
    /// randomized timeout both fit in it). More than four heartbeats.
    pub election_timeout_ms: u64,
    /// Raft heartbeat interval.
    pub heartbeat_ms: u64,
    /// This node's etcd lease: it leaves the membership this long after it
    /// stops renewing it.
    pub lease_ttl_secs: u64,
    /// How long the placer waits, once a node left the membership, before
    /// moving its replicas to other nodes (a restarting node keeps them).
    pub dead_node_grace_secs: u64,
    /// A partition takes a snapshot once its Raft log since the last one
    /// holds this many bytes (payloads, names, and 64 bytes per entry); the
    /// entries it covers are then purged. Taking one costs the same
    /// whatever the partition holds: it records a position, and the
    /// partition's state is exported from the store only for a replica
    /// too far behind for the log.
    pub snapshot_log_bytes: u64,
    /// A partition also takes a snapshot every this many entries, whatever
    /// their bytes. A snapshot leaves the last `snapshot_entries / 10`
    /// entries (at most 1,000) in the log, so that a follower briefly
    /// behind still catches up from it.
    pub snapshot_entries: u64,
    /// Mutual TLS between nodes: the cluster CA, this node's certificate
    /// (naming `node-<node_id>`) and key, PEM.
    pub tls: ClusterTls,
}

/// Mutual TLS between nodes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterTls {
    /// The cluster CA certificate (PEM).
    pub ca: Option<PathBuf>,
    /// This node's certificate chain (PEM).
    pub cert: Option<PathBuf>,
    /// This node's private key (PEM).
    pub key: Option<PathBuf>,
}

impl ClusterSection {
    fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key: &str, value: String, why: &'static str| ConfigError::Invalid {
            key: format!("cluster.{key}"),
            value,
            why,
        };
        if self.node_id == 0 {
            return Err(invalid("node_id", "0".into(), "must be at least 1"));
        }
        if self.name.is_empty() || self.name.contains('/') {
            return Err(invalid(
                "name",
                self.name.clone(),
                "must be non-empty, without '/'",
            ));
        }
        if self.etcd_endpoints.is_empty() {
            return Err(invalid("etcd_endpoints", "[]".into(), "needs an endpoint"));
        }
        if !(1..=4096).contains(&self.partitions) {
            return Err(invalid(
                "partitions",
                self.partitions.to_string(),
                "must be 1 to 4096",
            ));
        }
        if !(1..=7).contains(&self.replicas) {
            return Err(invalid(
                "replicas",
                self.replicas.to_string(),
                "must be 1 to 7",
            ));
        }
        if self.heartbeat_ms == 0 || self.election_timeout_ms <= 4 * self.heartbeat_ms {
            return Err(invalid(
                "election_timeout_ms",
                self.election_timeout_ms.to_string(),
                "must be more than four heartbeats (heartbeat_ms > 0)",
            ));
        }
        if self.lease_ttl_secs < 2 {
            return Err(invalid(
                "lease_ttl_secs",
                self.lease_ttl_secs.to_string(),
                "must be at least 2",
            ));
        }
        if self.snapshot_log_bytes < 4096 {
            return Err(invalid(
                "snapshot_log_bytes",
                self.snapshot_log_bytes.to_string(),
                "must be at least 4096",
            ));
        }
        if self.snapshot_entries < 10 {
            return Err(invalid(
                "snapshot_entries",
                self.snapshot_entries.to_string(),
                "must be at least 10",
            ));
        }
        if self.tls.ca.is_none() || self.tls.cert.is_none() || self.tls.key.is_none() {
            return Err(invalid(
                "tls",
                "incomplete".into(),
                "a cluster needs ca, cert and key (scripts/cluster.sh makes a development set)",
            ));
        }
        Ok(())
    }
}

impl Default for ClusterSection {
    fn default() -> Self {
        Self {
            node_id: 1,
            name: "volna".into(),
            etcd_endpoints: vec!["http://127.0.0.1:2379".into()],
            advertise_addr: None,
            peer_listen: SocketAddr::from(([127, 0, 0, 1], 7402)),
            peer_advertise: None,
            partitions: 64,
            replicas: 3,
            election_timeout_ms: 1000,
            heartbeat_ms: 100,
            lease_ttl_secs: 5,
            dead_node_grace_secs: 30,
            snapshot_log_bytes: 64 << 20,
            snapshot_entries: 1_000_000,
            tls: ClusterTls::default(),
        }
    }
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// For people.
    #[default]
    Text,
    /// One JSON object per line, for log pipelines.
    Json,
}

/// Everything the broker needs to start.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Where RocksDB and the development certificate live.
    pub data_dir: PathBuf,
    /// UDP address for QUIC.
    pub listen: SocketAddr,
    /// TCP address for health endpoints.
    pub http: SocketAddr,
    /// The WebSocket transport.
    pub websocket: WebSocketConfig,
    /// Receive and send buffer asked for the QUIC socket.
    pub socket_buffer_bytes: usize,
    /// When publishes are acknowledged.
    pub durability: Durability,
    /// TLS material.
    pub tls: TlsConfig,
    /// Per-connection limits.
    pub limits: LimitsConfig,
    /// Writer and fan-out tuning.
    pub engine: EngineConfig,
    /// Per-namespace configuration, keyed by namespace.
    pub namespaces: BTreeMap<String, NamespaceConfig>,
    /// Device cursors and read state.
    pub cursors: CursorsConfig,
    /// The operator API.
    pub admin: AdminConfig,
    /// How clients authenticate.
    pub auth: crate::auth::AuthConfig,
    /// Log format.
    pub log_format: LogFormat,
    /// Cluster membership; `None` runs a single node.
    pub cluster: Option<ClusterSection>,
}

/// The longest `cursors.report_ms`: a client holds its unreported acks
/// until then.
const MAX_ACK_REPORT_MS: u64 = 3_600_000;

/// The configuration's top-level keys: `VOLNA_<KEY>` environment variables
/// (nested keys joined by `__`, e.g. `VOLNA_LIMITS__MAX_PAYLOAD`) override
/// the file for these, and only these.
pub const TOP_LEVEL_KEYS: &[&str] = &[
    "data_dir",
    "listen",
    "http",
    "websocket",
    "socket_buffer_bytes",
    "durability",
    "tls",
    "limits",
    "engine",
    "namespaces",
    "cursors",
    "admin",
    "auth",
    "log_format",
    "cluster",
];

impl Default for Config {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("volna-data"),
            listen: SocketAddr::from(([0, 0, 0, 0], 7400)),
            http: SocketAddr::from(([127, 0, 0, 1], 7401)),
            websocket: WebSocketConfig::default(),
            socket_buffer_bytes: 4 * 1024 * 1024,
            durability: Durability::default(),
            tls: TlsConfig::default(),
            limits: LimitsConfig::default(),
            engine: EngineConfig::default(),
            namespaces: BTreeMap::new(),
            cursors: CursorsConfig::default(),
            admin: AdminConfig::default(),
            auth: crate::auth::AuthConfig::default(),
            log_format: LogFormat::default(),
            cluster: None,
        }
    }
}

/// Why a configuration was refused.
#[derive(Debug, Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read configuration file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A value in the file or the environment does not fit its key.
    #[error("invalid configuration: {0}")]
    Layered(Box<figment::Error>),
    /// A value is out of its range.
    #[error("invalid value for {key}: {value} ({why})")]
    Invalid {
        /// The key, dotted.
        key: String,
        /// The value given.
        value: String,
        /// Why it is refused.
        why: &'static str,
    },
}

impl Config {
    /// The embedded defaults, overridden by `file` (TOML) when given, then
    /// by `VOLNA_*` environment variables. Flags are applied by the caller.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        use figment::Figment;
        use figment::providers::{Env, Format, Serialized, Toml};
        let mut layers = Figment::from(Serialized::defaults(Config::default()));
        if let Some(path) = file {
            // Read it here so a missing file is an error, not an empty layer.
            let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                path: path.to_owned(),
                source,
            })?;
            layers = layers.merge(Toml::string(&text));
        }
        let env = Env::prefixed("VOLNA_")
            .filter(|key| {
                let top = key.as_str().split("__").next().unwrap_or_default();
                TOP_LEVEL_KEYS.iter().any(|k| top.eq_ignore_ascii_case(k))
            })
            .split("__");
        layers
            .merge(env)
            .extract()
            .map_err(|e| ConfigError::Layered(Box::new(e)))
    }

    /// The admin token, read from `admin.token_file` if set.
    pub fn admin_token(&self) -> Result<Option<String>, ConfigError> {
        if let Some(path) = &self.admin.token_file {
            let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                path: path.clone(),
                source,
            })?;
            let token = text.lines().next().unwrap_or_default().trim().to_owned();
            return Ok(Some(token));
        }
        Ok(self.admin.token.clone())
    }

    /// The TCP address WebSocket connections are accepted on, if enabled.
    pub fn websocket_addr(&self) -> Option<SocketAddr> {
        self.websocket
            .enabled
            .then(|| self.websocket.listen.unwrap_or(self.listen))
    }

    /// Checks every value; the broker refuses to start on the first bad one.
    pub fn validate(&self) -> Result<(), ConfigError> {
        fn invalid(key: &str, value: impl ToString, why: &'static str) -> ConfigError {
            ConfigError::Invalid {
                key: key.to_owned(),
                value: value.to_string(),
                why,
            }
        }
        if let Some(cluster) = &self.cluster {
            cluster.validate()?;
        }
        if self.socket_buffer_bytes < 64 * 1024 {
            return Err(invalid(
                "socket_buffer_bytes",
                self.socket_buffer_bytes,
                "must be at least 64 KiB",
            ));
        }
        let l = &self.limits;
        if l.max_payload == 0 || l.max_payload > 64 * 1024 * 1024 {
            return Err(invalid(
                "limits.max_payload",
                l.max_payload,
                "must be 1 B to 64 MiB",
            ));
        }
        if l.max_subscriptions == 0 {
            return Err(invalid("limits.max_subscriptions", 0, "must be at least 1"));
        }
        if !(1..=1024).contains(&self.websocket.stream_queue_messages) {
            return Err(invalid(
                "websocket.stream_queue_messages",
                self.websocket.stream_queue_messages,
                "must be 1 to 1024",
            ));
        }
        for origin in &self.websocket.allowed_origins {
            if origin != "*"
                && let Err(why) = WebOrigin::parse(origin)
            {
                return Err(invalid("websocket.allowed_origins", origin, why));
            }
        }
        if l.max_inflight_publishes == 0 {
            return Err(invalid(
                "limits.max_inflight_publishes",
                0,
                "must be at least 1",
            ));
        }
        for (key, value) in [
            ("limits.max_connections", l.max_connections as u64),
            (
                "limits.max_handshakes_in_progress",
                l.max_handshakes_in_progress as u64,
            ),
            ("limits.control_stall_secs", l.control_stall_secs),
        ] {
            if value == 0 {
                return Err(invalid(key, 0, "must be at least 1"));
            }
        }
        if l.max_connections_per_user == 0 {
            return Err(invalid(
                "limits.max_connections_per_user",
                0,
                "must be at least 1",
            ));
        }

        let rated = l.publish_rate_per_connection > 0 || l.publish_rate_per_user > 0;
        if rated && l.publish_burst == 0 {
            return Err(invalid(
                "limits.publish_burst",
                0,
                "must be at least 1 while a publish rate is set",
            ));
        }
        if l.handshakes_per_ip_per_sec > 0 && l.handshake_burst_per_ip == 0 {
            return Err(invalid(
                "limits.handshake_burst_per_ip",
                0,
                "must be at least 1 while handshakes_per_ip_per_sec is set",
            ));
        }
        if l.idle_timeout_ms < 1000 {
            return Err(invalid(
                "limits.idle_timeout_ms",
                l.idle_timeout_ms,
                "must be at least 1000",
            ));
        }
        let e = &self.engine;
        for (key, value) in [
            ("engine.writer_queue", e.writer_queue),
            ("engine.writer_queue_bytes", e.writer_queue_bytes),
            ("engine.max_batch_messages", e.max_batch_messages),
            ("engine.max_batch_bytes", e.max_batch_bytes),
            ("engine.reader_threads", e.reader_threads),
            ("engine.producer_window", e.producer_window),
            ("engine.max_resident_producers", e.max_resident_producers),
            ("engine.max_producers_per_user", e.max_producers_per_user),
            ("engine.max_resident_channels", e.max_resident_channels),
        ] {
            if value == 0 {
                return Err(invalid(key, 0, "must be at least 1"));
            }
        }
        if u32::try_from(e.writer_queue_bytes).is_err() {
            return Err(invalid(
                "engine.writer_queue_bytes",
                e.writer_queue_bytes,
                "must be at most 4 GiB",
            ));
        }
        if e.max_ring_bytes_total < e.channel_ring_bytes {
            return Err(invalid(
                "engine.max_ring_bytes_total",
                e.max_ring_bytes_total,
                "must be at least engine.channel_ring_bytes",
            ));
        }
        if e.channel_ring_bytes < 64 * 1024 {
            return Err(invalid(
                "engine.channel_ring_bytes",
                e.channel_ring_bytes,
                "must be at least 64 KiB",
            ));
        }
        if e.retention_interval_ms == 0 {
            return Err(invalid(
                "engine.retention_interval_ms",
                0,
                "must be at least 1",
            ));
        }
        if e.shards > crate::transport::MAX_SHARDS {
            return Err(invalid(
                "engine.shards",
                e.shards,
                "must be at most 64 (0: one per core)",
            ));
        }
        let c = &self.cursors;
        for (key, value) in [
            ("cursors.flush_ms", c.flush_ms),
            ("cursors.device_idle_days", c.device_idle_days),
            (
                "cursors.max_devices_per_user",
                u64::from(c.max_devices_per_user),
            ),
            ("cursors.unread_cap", c.unread_cap),
            ("cursors.sweep_interval_secs", c.sweep_interval_secs),
        ] {
            if value == 0 {
                return Err(invalid(key, 0, "must be at least 1"));
            }
        }
        if c.report_ms > MAX_ACK_REPORT_MS {
            return Err(invalid(
                "cursors.report_ms",
                c.report_ms,
                "must be at most 3600000 (an hour; 0: only on FlushAcks)",
            ));
        }
        for (namespace, ns) in &self.namespaces {
            let Some(push) = &ns.push else { continue };
            let key = |field: &str| format!("namespaces.{namespace}.push.{field}");
            if !(push.webhook_url.starts_with("http://")
                || push.webhook_url.starts_with("https://"))
            {
                return Err(ConfigError::Invalid {
                    key: key("webhook_url"),
                    value: push.webhook_url.clone(),
                    why: "must be an http:// or https:// URL",
                });
            }
            for (field, value) in [
                ("batch_ms", push.batch_ms),
                ("queue", push.queue as u64),
                ("max_batch", push.max_batch as u64),
                ("timeout_ms", push.timeout_ms),
            ] {
                if value == 0 {
                    return Err(ConfigError::Invalid {
                        key: key(field),
                        value: "0".into(),
                        why: "must be at least 1",
                    });
                }
            }
        }
        if self.admin.token.is_some() && self.admin.token_file.is_some() {
            return Err(invalid(
                "admin",
                "token/token_file",
                "set admin.token or admin.token_file, not both",
            ));
        }
        if let Some(token) = &self.admin.token
            && token.len() < 16
        {
            return Err(invalid(
                "admin.token",
                "(hidden)",
                "must be at least 16 characters",
            ));
        }
        if self.tls.cert.is_some() != self.tls.key.is_some() {
            return Err(invalid(
                "tls",
                "cert/key",
                "set both tls.cert and tls.key, or neither",
            ));
        }
        for (name, ns) in &self.namespaces {
            if name.is_empty() || name.contains('.') {
                return Err(invalid(
                    "namespaces",
                    name,
                    "a namespace is one channel-name segment",
                ));
            }
            let r = &ns.retention;
            if r.max_messages == Some(0) {
                return Err(invalid(
                    &format!("namespaces.{name}.retention.max_messages"),
                    0,
                    "must be at least 1",
                ));
            }
            if !ns.persistent && !r.is_bounded() {
                return Err(invalid(
                    &format!("namespaces.{name}.persistent"),
                    false,
                    "an in-memory namespace needs a retention limit (max_messages, max_bytes or max_age_secs)",
                ));
            }
            if r.max_age_secs == Some(0) {
                return Err(invalid(
                    &format!("namespaces.{name}.retention.max_age_secs"),
                    0,
                    "must be at least 1",
                ));
            }
        }
        Ok(())
    }

    /// The Hello timeout as a duration.
    pub fn hello_timeout(&self) -> Duration {
        Duration::from_millis(self.limits.hello_timeout_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_match_the_design() {
        let c = Config::default();
        c.validate().expect("defaults validate");
        assert_eq!(c.listen.port(), 7400);
        assert_eq!(c.http, SocketAddr::from(([127, 0, 0, 1], 7401)));
        assert_eq!(c.data_dir, PathBuf::from("volna-data"));
    }

    #[test]
    fn toml_overrides_defaults_and_unknown_keys_are_refused() {
        let c: Config = toml::from_str(
            r#"
            durability = "fsync"
            [namespaces.chat.retention]
            max_messages = 100
            "#,
        )
        .expect("parses");
        assert_eq!(c.durability, Durability::Fsync);
        assert_eq!(c.namespaces["chat"].retention.max_messages, Some(100));
        assert!(!c.namespaces.contains_key("news"));
        assert!(toml::from_str::<Config>("no_such_key = 1").is_err());
    }

    #[test]
    #[allow(clippy::result_large_err)] // figment::Jail's signature, not ours
    fn environment_overrides_the_file_and_unrelated_variables_are_ignored() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("volna.toml");
        std::fs::write(
            &file,
            "durability = \"fsync\"\n[limits]\nmax_payload = 100\n",
        )
        .expect("write");
        figment::Jail::expect_with(|jail| {
            jail.set_env("VOLNA_LIMITS__MAX_PAYLOAD", "2048");
            jail.set_env("VOLNA_LOG", "debug");
            jail.set_env("VOLNA_TOKEN", "not a broker key");
            let c = Config::load(Some(&file)).expect("loads");
            assert_eq!(c.durability, Durability::Fsync);
            assert_eq!(c.limits.max_payload, 2048);
            jail.set_env("VOLNA_LIMITS__MAX_PAYLOAD", "lots");
            let err = Config::load(Some(&file)).expect_err("refused").to_string();
            assert!(err.to_lowercase().contains("max_payload"), "{err}");
            Ok(())
        });
        assert!(Config::load(Some(&dir.path().join("missing.toml"))).is_err());
    }

    /// The shipped `volna.toml` documents the defaults: it parses, and
    /// what it sets is what the broker uses without it.
    #[test]
    fn the_documented_file_is_the_defaults() {
        let documented: Config = toml::from_str(include_str!("../../volna.toml")).expect("parses");
        assert_eq!(documented, Config::default());
    }

    #[test]
    fn bad_values_name_their_key() {
        let mut c = Config::default();
        c.limits.max_payload = 0;
        let err = c.validate().expect_err("refused").to_string();
        assert!(err.contains("limits.max_payload"), "{err}");
        let c = Config {
            socket_buffer_bytes: 4096,
            ..Config::default()
        };
        let err = c.validate().expect_err("refused").to_string();
        assert!(err.contains("socket_buffer_bytes"), "{err}");
    }

    #[test]
    fn web_origins_are_compared_as_browsers_serialize_them() {
        let parse = |text| WebOrigin::parse(text).expect(text);
        // Scheme and host are case-insensitive; a default port is implied.
        assert_eq!(
            parse("HTTPS://App.Example.com:443"),
            parse("https://app.example.com")
        );
        assert_eq!(parse("http://a.test:80"), parse("http://a.test"));
        assert_eq!(parse("http://a.test:80").to_string(), "http://a.test");
        assert_ne!(parse("http://a.test"), parse("https://a.test"));
        assert_ne!(parse("http://a.test:8080"), parse("http://a.test"));
        assert_eq!(
            parse("http://[::1]:7401"),
            WebOrigin::new("http", "[::1]", 7401)
        );
        assert_eq!(parse("http://[::1]:7401").to_string(), "http://[::1]:7401");
        assert_eq!(
            parse("http://127.0.0.1:7401"),
            WebOrigin::new("HTTP", "127.0.0.1", 7401)
        );
        // Other schemes' origins (an extension's page) have no default port.
        assert_eq!(
            parse("chrome-extension://abcdefgh").to_string(),
            "chrome-extension://abcdefgh"
        );
        for bad in [
            "",
            "null",
            "*.example.com",
            "app.example.com",
            "https://",
            "https://app.example.com/",
            "https://app.example.com/console",
            "https://app.example.com?x",
            "https://user@app.example.com",
            "https://*.example.com",
            "https://app.example.com:0",
            "https://app.example.com:65536",
            "https://app.example.com:",
            "https://app example.com",
            "https://[zz]:1",
            "https://[::1",
            "https://[::1]x",
            "1http://a.test",
        ] {
            assert!(WebOrigin::parse(bad).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn allowed_origins_are_checked_at_start() {
        let with = |origins: &[&str]| {
            let mut c = Config::default();
            c.websocket.allowed_origins = origins.iter().map(|o| (*o).to_owned()).collect();
            c.validate()
        };
        with(&[]).expect("none");
        with(&["*"]).expect("any");
        with(&["https://app.example.com", "http://localhost:3000"]).expect("origins");
        let err = with(&["https://app.example.com", "https://app.example.com/"])
            .expect_err("a path is refused");
        assert!(
            matches!(&err, ConfigError::Invalid { key, value, .. }
                if key == "websocket.allowed_origins" && value == "https://app.example.com/"),
            "{err}"
        );
        assert!(err.to_string().contains("no path"), "{err}");
        let err = with(&["app.example.com"]).expect_err("no scheme");
        assert!(err.to_string().contains("scheme://host"), "{err}");
    }

    #[test]
    fn websocket_client_certificates_default_to_the_token() {
        assert_eq!(
            Config::default().websocket.client_certificates,
            WebSocketCertificates::Token
        );
        let c: Config = toml::from_str(
            r#"
            [websocket]
            client_certificates = "service"
            allowed_origins = ["https://app.example.com"]
            "#,
        )
        .expect("parses");
        assert_eq!(
            c.websocket.client_certificates,
            WebSocketCertificates::Service
        );
        assert_eq!(c.websocket.allowed_origins, ["https://app.example.com"]);
        let refused = toml::from_str::<Config>("[websocket]\nclient_certificates = \"admin\"\n");
        assert!(refused.is_err());
    }
}
