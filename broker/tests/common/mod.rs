//! The test broker shared by the integration tests: a real broker (real
//! QUIC on 127.0.0.1, real RocksDB in a temporary directory) in this
//! process, clients for it, and a raw protocol connection for hostile input.

#![allow(dead_code, clippy::unwrap_used)]

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use serde_json::Value;
use tempfile::TempDir;
use tokio::io::AsyncReadExt;
use volna_broker::store::LogStore;
use volna_broker::{Broker, Config};
use volna_client::{Backoff, ChannelName, Client, ClientConfig, Trust};
use volna_proto::{Frame, Hello, Limits, PROTOCOL_VERSION};

pub mod store;

/// How long any wait in a test may take before the test fails.
pub const DEADLINE: Duration = Duration::from_secs(60);

/// Which transport a test's clients use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Quic,
    WebSocket,
}

/// Runs each named `async fn(Transport)` as two tests, `over_quic::name`
/// and `over_websocket::name`: the same assertions over both transports.
#[allow(unused_macros)] // used by some of the test files that share this module
macro_rules! over_both_transports {
    ($($test:ident),* $(,)?) => {
        mod over_quic {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    super::$test(super::common::Transport::Quic).await
                }
            )*
        }
        mod over_websocket {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    super::$test(super::common::Transport::WebSocket).await
                }
            )*
        }
    };
}

pub struct TestBroker {
    pub broker: Option<Broker>,
    /// What [`TestBroker::client_config`] connects over.
    pub transport: Transport,
    pub dir: TempDir,
    pub config: Config,
    /// The log store when it is not the data directory's RocksDB.
    pub store: Option<Arc<dyn LogStore>>,
}

impl TestBroker {
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    pub async fn start_with(tweak: impl FnOnce(&mut Config)) -> Self {
        Self::start_on(None, tweak).await
    }

    /// A broker whose clients connect over `transport`.
    pub async fn start_over(transport: Transport, tweak: impl FnOnce(&mut Config)) -> Self {
        let mut broker = Self::start_on(None, tweak).await;
        broker.transport = transport;
        broker
    }

    /// A broker whose log is `store` (to inject storage faults).
    pub async fn start_on(
        store: Option<Arc<dyn LogStore>>,
        tweak: impl FnOnce(&mut Config),
    ) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut config = Config {
            data_dir: dir.path().to_owned(),
            listen: "127.0.0.1:0".parse().unwrap(),
            http: "127.0.0.1:0".parse().unwrap(),
            ..Config::default()
        };
        tweak(&mut config);
        let broker = Self::launch(config.clone(), store.clone()).await;
        // Restarts reuse the ports so that clients reconnect to the same
        // addresses.
        config.listen = broker.quic_addr();
        config.websocket.listen = broker.websocket_addr();
        Self {
            transport: Transport::Quic,
            broker: Some(broker),
            dir,
            config,
            store,
        }
    }

    async fn launch(config: Config, store: Option<Arc<dyn LogStore>>) -> Broker {
        match store {
            Some(store) => Broker::start_with_store(config, store).await,
            None => Broker::start(config).await,
        }
        .expect("broker starts")
    }

    pub fn broker(&self) -> &Broker {
        self.broker.as_ref().expect("broker running")
    }

    pub fn addr(&self) -> SocketAddr {
        self.config.listen
    }

    pub fn cert(&self) -> PathBuf {
        self.dir.path().join("dev-cert.pem")
    }

    /// The broker's WebSocket URL.
    pub fn websocket_url(&self) -> String {
        let addr = self.config.websocket.listen.expect("websocket enabled");
        format!("wss://{addr}/ws")
    }

    pub fn client_config(&self) -> ClientConfig {
        let mut config = match self.transport {
            Transport::Quic => {
                ClientConfig::new(self.addr().to_string(), "test", Trust::CaFile(self.cert()))
            }
            Transport::WebSocket => {
                let mut config = ClientConfig::with_servers(
                    Vec::<String>::new(),
                    "test",
                    Trust::CaFile(self.cert()),
                );
                config.websocket = vec![self.websocket_url()];
                config
            }
        };
        config.backoff = Backoff {
            initial: Duration::from_millis(20),
            max: Duration::from_millis(500),
        };
        config
    }

    pub async fn client(&self) -> Client {
        Client::connect(self.client_config())
            .await
            .expect("client connects")
    }

    pub async fn stop(&mut self) {
        if let Some(broker) = self.broker.take() {
            broker.shutdown().await;
        }
    }

    pub async fn restart(&mut self) {
        self.stop().await;
        let broker = Self::launch(self.config.clone(), self.store.clone()).await;
        self.broker = Some(broker);
    }
}

pub fn channel(name: &str) -> ChannelName {
    ChannelName::new(name).expect("valid channel name")
}

/// Waits for `condition` to hold, failing the test after [`DEADLINE`].
pub async fn eventually<F, Fut>(what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let start = Instant::now();
    while !condition().await {
        assert!(start.elapsed() < DEADLINE, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Runs `fut`, failing the test after [`DEADLINE`].
pub async fn within<T>(what: &str, fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(DEADLINE, fut)
        .await
        .unwrap_or_else(|_| panic!("timed out: {what}"))
}

/// The next `count` messages of `sub` as text, failing the test on an
/// event (`Truncated`, `EpochChanged`), a closed stream or after
/// [`DEADLINE`].
pub async fn next_texts(sub: &mut volna_client::Subscription, count: usize) -> Vec<String> {
    use futures_util::StreamExt;
    within("deliveries", async {
        let mut got = Vec::with_capacity(count);
        while got.len() < count {
            let message = sub.next().await.expect("stream open").expect("a message");
            got.push(String::from_utf8(message.payload.to_vec()).expect("UTF-8 payload"));
        }
        got
    })
    .await
}

/// Whether the suite must be strict: `CI` is set (to anything but empty,
/// `0` or `false`). `scripts/test.sh`, which CI runs, sets `CI=true`
/// unless it was set already.
pub fn strict() -> bool {
    std::env::var("CI").is_ok_and(|v| !matches!(v.trim(), "" | "0" | "false"))
}

/// A test's dependency on this machine (Chromium, Node, a tmpfs mount) is
/// missing. Under [`strict`] that fails the test: a suite that passes
/// because its browser tests never ran proves nothing. Elsewhere (a
/// developer's bare `cargo nextest run`) the test says SKIPPED, loudly,
/// and the caller returns: nextest shows these tests' output on success
/// (`.config/nextest.toml`).
pub fn missing_dependency(why: &str) {
    assert!(
        !strict(),
        "{why} (CI is set: a missing test dependency fails the test; unset CI to skip)"
    );
    eprintln!("SKIPPED: {why}");
    eprintln!("SKIPPED: this test did not run; under CI=true (scripts/test.sh) it fails instead");
}

/// Fails the test if `client` dropped any delivery as already seen. The
/// client drops offsets below a subscription's position without a word,
/// so a broker that sent a message twice would pass every other check;
/// where no resume happened a correct broker sends none. (Across a resume
/// a few in flight on the old stream may be dropped: assert gaplessness
/// of what the application got there instead.)
pub fn assert_no_duplicates(client: &Client) {
    assert_eq!(
        client.duplicates_dropped(),
        0,
        "deliveries dropped by the client as already seen: the broker sent them twice"
    );
}

/// The HS256 secret of [`jwt_broker`].
pub const SECRET: &str = "an-hs256-secret-of-at-least-32-bytes!!";

/// Unix seconds now.
pub fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// An HS256 token with `claims`, signed with `secret`.
pub fn sign(secret: &str, claims: serde_json::Value) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

/// A token for `claims` plus an `exp` an hour away, signed with [`SECRET`].
pub fn user_token(mut claims: serde_json::Value) -> String {
    claims["exp"] = (now_secs() + 3600).into();
    sign(SECRET, claims)
}

/// A broker verifying HS256 tokens signed with [`SECRET`].
pub async fn jwt_broker(tweak: impl FnOnce(&mut Config)) -> TestBroker {
    // In the data directory, so that it is there for restarts too.
    TestBroker::start_with(|c| {
        let key = c.data_dir.join("hs256.key");
        std::fs::write(&key, SECRET).unwrap();
        c.auth.mode = volna_broker::auth::AuthMode::Jwt;
        c.auth.hs256_secret_files = vec![key];
        c.auth.leeway_secs = 0;
        tweak(c);
    })
    .await
}

/// A client of `broker` presenting `token`.
pub async fn connect_as(
    broker: &TestBroker,
    token: &str,
) -> Result<Client, volna_client::ClientError> {
    let mut config = broker.client_config();
    config.token = token.to_owned();
    config.request_timeout = Duration::from_secs(20);
    Client::connect(config).await
}

/// The broker's Prometheus metrics page.
pub async fn metrics_text(broker: &TestBroker) -> String {
    let url = format!("http://{}/metrics", broker.broker().http_addr());
    tokio::task::spawn_blocking(move || {
        ureq::get(&url)
            .call()
            .expect("metrics")
            .into_body()
            .read_to_string()
            .expect("metrics body")
    })
    .await
    .expect("metrics task")
}

/// A protocol-level connection that can send anything.
pub struct RawConnection {
    pub conn: quinn::Connection,
    pub send: quinn::SendStream,
    pub recv: quinn::RecvStream,
    buf: BytesMut,
}

impl RawConnection {
    /// Connects and opens the control stream, without saying Hello.
    pub async fn connect(broker: &TestBroker) -> Self {
        let mut roots = rustls::RootCertStore::empty();
        for cert in volna_broker::tls::load_certs(&broker.cert()).unwrap() {
            roots.add(cert).unwrap();
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        tls.alpn_protocols = vec![volna_proto::ALPN.to_vec()];
        let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
        // A large receive buffer: tests that flood the broker without
        // reading get its data back in bursts, and a connection-close
        // packet dropped by a full socket (while this task waits for a
        // busy core) would turn the broker's close code into a stateless
        // reset once the broker's drain period is over.
        let socket = socket2::Socket::new(
            socket2::Domain::IPV4,
            socket2::Type::DGRAM,
            Some(socket2::Protocol::UDP),
        )
        .unwrap();
        let _ = socket.set_recv_buffer_size(4 << 20);
        socket
            .bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
            .unwrap();
        let mut endpoint = quinn::Endpoint::new(
            quinn::EndpointConfig::default(),
            None,
            socket.into(),
            Arc::new(quinn::TokioRuntime),
        )
        .unwrap();
        endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(crypto)));
        let conn = endpoint
            .connect(broker.addr(), "localhost")
            .unwrap()
            .await
            .expect("raw connection");
        let (send, recv) = conn.open_bi().await.unwrap();
        Self {
            conn,
            send,
            recv,
            buf: BytesMut::new(),
        }
    }

    /// Connects and completes Hello/Welcome.
    pub async fn hello(broker: &TestBroker) -> Self {
        let mut raw = Self::connect(broker).await;
        match raw.send_hello("test").await {
            Some(Frame::Welcome(_)) => raw,
            other => panic!("expected Welcome, got {other:?}"),
        }
    }

    /// Says Hello with `token`; returns the broker's answer.
    pub async fn send_hello(&mut self, token: &str) -> Option<Frame> {
        self.send_frame(&Frame::Hello(Hello {
            protocol: PROTOCOL_VERSION,
            token: token.into(),
            client: "raw-test".into(),
            device: None,
        }))
        .await;
        self.next_frame().await
    }

    pub async fn send_frame(&mut self, frame: &Frame) {
        let mut buf = BytesMut::new();
        volna_proto::encode(frame, &mut buf);
        self.send_bytes(&buf).await;
    }

    pub async fn send_bytes(&mut self, bytes: &[u8]) {
        // The broker may already have closed us; the read side tells.
        let _ = self.send.write_all(bytes).await;
    }

    /// The next control frame, or `None` once the stream or connection ended.
    pub async fn next_frame(&mut self) -> Option<Frame> {
        within("a control frame", async {
            loop {
                let limits = Limits {
                    max_frame: 16 << 20,
                };
                if let Some(frame) = volna_proto::decode(&mut self.buf, &limits).unwrap() {
                    return Some(frame);
                }
                match self.recv.read_buf(&mut self.buf).await {
                    Ok(n) if n > 0 => {}
                    _ => return None,
                }
            }
        })
        .await
    }

    /// The application close code the broker closed the connection with.
    pub async fn close_code(&self) -> Option<u64> {
        match within("the connection to close", self.conn.closed()).await {
            quinn::ConnectionError::ApplicationClosed(close) => Some(close.error_code.into_inner()),
            _ => None,
        }
    }
}

/// One HTTP call to the broker's HTTP port: (status, body).
pub async fn http(
    broker: &TestBroker,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<Value>,
) -> (u16, String) {
    let url = format!("http://{}{path}", broker.broker().http_addr());
    let (method, token) = (method.to_owned(), token.map(str::to_owned));
    tokio::task::spawn_blocking(move || {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .build()
            .into();
        let auth = token.map(|t| format!("Bearer {t}"));
        let response = match (method.as_str(), body) {
            ("GET", _) => {
                let mut req = agent.get(&url);
                if let Some(auth) = &auth {
                    req = req.header("Authorization", auth);
                }
                req.call()
            }
            ("DELETE", _) => {
                let mut req = agent.delete(&url);
                if let Some(auth) = &auth {
                    req = req.header("Authorization", auth);
                }
                req.call()
            }
            (m, body) => {
                let mut req = if m == "PUT" {
                    agent.put(&url)
                } else {
                    agent.post(&url)
                };
                if let Some(auth) = &auth {
                    req = req.header("Authorization", auth);
                }
                req.send_json(body.unwrap_or(Value::Null))
            }
        }
        .unwrap();
        let status = response.status().as_u16();
        (status, response.into_body().read_to_string().unwrap())
    })
    .await
    .unwrap()
}

/// Reads an HTTP/1.1 request up to the end of its head, for the small
/// HTTP servers tests stand in for other sites with; `None` when the peer
/// closed first.
pub async fn read_request_head(socket: &mut tokio::net::TcpStream) -> Option<Vec<u8>> {
    let mut request = Vec::new();
    let mut buf = [0u8; 1024];
    while !request.windows(4).any(|w| w == b"\r\n\r\n") {
        match socket.read(&mut buf).await {
            Ok(n) if n > 0 => request.extend_from_slice(&buf[..n]),
            _ => return None,
        }
    }
    Some(request)
}
