//! How a client connects: where, with which token, trusting what, and how it
//! reconnects.

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use crate::connection::Endpoint;

/// Which server certificates the client accepts.
#[derive(Debug, Clone)]
pub enum Trust {
    /// The public web PKI (Mozilla's root store): for brokers with a
    /// certificate from a public CA.
    WebPki,
    /// Roots from a PEM file: a private CA, or the broker's self-signed
    /// development certificate (`DATA_DIR/dev-cert.pem`).
    CaFile(PathBuf),
    /// Exactly the certificate whose SHA-256 fingerprint (of its DER bytes)
    /// is given, whatever its issuer or names: pinning, e.g. of a development
    /// certificate copied out of band. The broker prints its fingerprint at
    /// start in development mode.
    Pinned([u8; 32]),
}

/// An error a [`TokenSource`] reports.
pub type TokenError = Box<dyn std::error::Error + Send + Sync>;

type FetchToken =
    dyn Fn() -> Pin<Box<dyn Future<Output = Result<String, TokenError>> + Send>> + Send + Sync;

/// Where the client gets a fresh token: asked when the broker says the
/// session's token expires soon (`TokenExpiring`, answered with
/// `Refresh` on the same connection) and when a reconnect is refused as
/// unauthorized. Typically a call to the application's own auth service.
#[derive(Clone)]
pub struct TokenSource(Arc<FetchToken>);

impl TokenSource {
    /// A source calling `fetch` for each new token.
    pub fn new<F, Fut>(fetch: F) -> Self
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<String, TokenError>> + Send + 'static,
    {
        Self(Arc::new(move || Box::pin(fetch())))
    }

    /// A new token.
    pub async fn fetch(&self) -> Result<String, TokenError> {
        (self.0)().await
    }
}

impl std::fmt::Debug for TokenSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenSource")
    }
}

/// A client certificate and its key (PEM files), for brokers that identify
/// backend services by mutual TLS.
#[derive(Debug, Clone)]
pub struct ClientCertificate {
    /// The certificate chain.
    pub cert: PathBuf,
    /// The private key.
    pub key: PathBuf,
}

/// Reconnect timing: exponential backoff with jitter.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    /// Delay before the first retry.
    pub initial: Duration,
    /// Largest delay between retries.
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            initial: Duration::from_millis(50),
            max: Duration::from_secs(5),
        }
    }
}

impl Backoff {
    /// The delay before retry number `attempt` (0-based): doubling from
    /// `initial` up to `max`, then a random point in its upper half, so that
    /// thousands of clients dropped together do not return together.
    pub fn delay(&self, attempt: u32) -> Duration {
        let exp = self
            .initial
            .saturating_mul(1u32.checked_shl(attempt.min(16)).unwrap_or(u32::MAX))
            .min(self.max);
        let half = exp / 2;
        half + half.mul_f64(rand::random::<f64>())
    }
}

/// Everything [`Client::connect`](crate::Client::connect) needs.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// `host:port` of the brokers to reach, e.g. `127.0.0.1:7400` or
    /// `volna.example:7400`: at connect the first that answers; after a
    /// lost connection the next one on (every node of a cluster serves
    /// every device; a single broker is a list of one).
    pub servers: Vec<String>,
    /// The name the server's certificate must carry; by default the host
    /// part of the address connected to. Set it when reaching the broker
    /// under another name than its certificate's (a container name, an IP).
    pub server_name: Option<String>,
    /// The authentication token sent in `Hello` (may be empty when
    /// `token_source` or `client_certificate` provides the identity).
    pub token: String,
    /// Where fresh tokens come from when this one expires.
    pub token_source: Option<TokenSource>,
    /// A client certificate to present (mutual TLS).
    pub client_certificate: Option<ClientCertificate>,
    /// Which certificates to trust.
    pub trust: Trust,
    /// Identification sent to the broker for its logs.
    pub client_name: String,
    /// The device this client speaks for (a phone, a browser profile):
    /// stable across the app's restarts. With it the broker keeps the
    /// device's cursors ([`Subscription::ack`](crate::Subscription::ack),
    /// `Position::Cursor`) and tells it of read markers moved on the
    /// user's other devices ([`Client::read_markers`](crate::Client::read_markers)).
    pub device: Option<String>,
    /// The producer id this client's publishes carry (their idempotency
    /// key, with a sequence each). By default it is derived from
    /// [`device`](Self::device), so the same across the app's restarts:
    /// at connect the broker says the last sequence it stored for it and
    /// the client continues after it, and an outbox re-sent after a
    /// restart with [`Client::publish_sequenced`](crate::Client::publish_sequenced)
    /// is stored once. Without a device, a random id per client.
    pub producer_id: Option<u64>,
    /// Acknowledgements gather this long before they are sent (the latest
    /// per channel wins). The default, 20 ms, is under QUIC's 25 ms ACK
    /// delay: an `Ack` for a delivery leaves in the packet that
    /// acknowledges the delivery anyway, instead of a packet of its own
    /// (BENCHMARKS.md: 25 µs of broker CPU per ack instead of 45 µs at
    /// 100 ms).
    pub ack_interval: Duration,
    /// Reconnect timing.
    pub backoff: Backoff,
    /// How long a `publish` may take, reconnects and retries included.
    pub request_timeout: Duration,
    /// How long one connection attempt to one seed (QUIC and TLS
    /// handshake, Hello and Welcome) may take before the client moves on
    /// to the next seed. With [`websocket`](Self::websocket) URLs the QUIC
    /// attempt of each seed gets [`quic_fallback_after`](Self::quic_fallback_after)
    /// instead, and each WebSocket URL this.
    pub connect_timeout: Duration,
    /// How long a [`TokenSource`] may take to give a token before the
    /// attempt counts as failed (the connection is never held up by it).
    pub token_timeout: Duration,
    /// Publishes in flight at once; keep it below the broker's
    /// `engine.producer_window` (256 by default) so that every retry after
    /// a reconnect is recognised as one.
    pub max_inflight_publishes: usize,
    /// Subscriptions this client may hold at once. The broker delivers each
    /// on its own QUIC stream, and quinn keeps a table entry (~50 bytes) per
    /// stream the client allows, allocated when the connection opens: 4,096
    /// cost 204 KB per connection. A device needs its inbox and the chats on
    /// screen; a process holding many idle connections sets it low.
    pub max_subscriptions: u32,
    /// Messages buffered per subscription before the client stops reading
    /// its stream (and the broker serves it from the log later).
    pub subscription_buffer: usize,
    /// Payload bytes buffered per subscription, at most (a message larger
    /// than this is let through alone): with
    /// [`subscription_buffer`](Self::subscription_buffer), what an
    /// application that does not read costs in memory.
    pub subscription_buffer_bytes: usize,
    /// Keep-alive interval while idle.
    pub keep_alive: Duration,
    /// The connection is considered lost after this long without a packet.
    pub idle_timeout: Duration,
    /// The local socket to connect through, shared with other clients; by
    /// default each client binds its own.
    pub endpoint: Option<Endpoint>,
    /// WebSocket URLs of the same brokers (`wss://host:port/ws`) for
    /// networks that block UDP: when no seed completes a QUIC handshake
    /// (each within [`quic_fallback_after`](Self::quic_fallback_after))
    /// the client connects to these instead, in turn, and while it does,
    /// tries QUIC on every seed again every
    /// [`quic_probe_interval`](Self::quic_probe_interval), moving back
    /// (subscriptions resume without a gap) once one answers. With no QUIC
    /// `servers` the client uses WebSocket only.
    pub websocket: Vec<String>,
    /// How long the QUIC attempt on one seed may take when
    /// [`websocket`](Self::websocket) URLs are configured (default 2 s).
    pub quic_fallback_after: Duration,
    /// How often a client on WebSocket tries QUIC again (default 60 s).
    pub quic_probe_interval: Duration,
}

/// The producer id a device's publishes carry when the application sets
/// none: the first 8 bytes of SHA-256 over `"volna-producer:" ‖ device`,
/// big-endian. `volna.js` derives the same, so a device keeps one producer
/// whichever client it runs.
pub fn device_producer_id(device: &str) -> u64 {
    use sha2::Digest;
    let digest = sha2::Sha256::new()
        .chain_update(b"volna-producer:")
        .chain_update(device.as_bytes())
        .finalize();
    let mut id = [0u8; 8];
    id.copy_from_slice(&digest[..8]);
    u64::from_be_bytes(id)
}

impl ClientConfig {
    /// A configuration with defaults for everything but the essentials.
    pub fn new(server: impl Into<String>, token: impl Into<String>, trust: Trust) -> Self {
        Self::with_servers([server.into()], token, trust)
    }

    /// The same with several seed addresses, tried in turn.
    pub fn with_servers(
        servers: impl IntoIterator<Item = impl Into<String>>,
        token: impl Into<String>,
        trust: Trust,
    ) -> Self {
        Self {
            servers: servers.into_iter().map(Into::into).collect(),
            server_name: None,
            token: token.into(),
            token_source: None,
            client_certificate: None,
            trust,
            client_name: concat!("volna-client/", env!("CARGO_PKG_VERSION")).to_owned(),
            device: None,
            producer_id: None,
            ack_interval: Duration::from_millis(20),
            backoff: Backoff::default(),
            request_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(10),
            token_timeout: Duration::from_secs(10),
            max_inflight_publishes: 128,
            max_subscriptions: 256,
            subscription_buffer: 4096,
            subscription_buffer_bytes: 8 * 1024 * 1024,
            keep_alive: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(15),
            endpoint: None,
            websocket: Vec::new(),
            quic_fallback_after: Duration::from_secs(2),
            quic_probe_interval: Duration::from_secs(60),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_devices_producer_id_is_stable_and_its_own() {
        assert_eq!(device_producer_id("phone-1"), device_producer_id("phone-1"));
        assert_ne!(device_producer_id("phone-1"), device_producer_id("phone-2"));
        // The value volna.js computes too (SHA-256 of "volna-producer:phone-1").
        assert_eq!(device_producer_id("phone-1"), 0x85db_bf70_6987_11bc);
    }

    #[test]
    fn backoff_grows_is_capped_and_jittered() {
        let b = Backoff {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(2),
        };
        for attempt in 0..40 {
            let d = b.delay(attempt);
            let exp = Duration::from_millis(100)
                .saturating_mul(1 << attempt.min(16))
                .min(Duration::from_secs(2));
            assert!(d >= exp / 2 && d <= exp, "attempt {attempt}: {d:?}");
        }
    }
}
