//! The WebSocket transport on its own: hostile input at the WebSocket
//! layer, the upgrade (its path and the page origins allowed), the close
//! codes, and the Rust client's fallback from QUIC to WebSocket and back.
//! (The protocol's guarantees over WebSocket are the `over_websocket`
//! tests of pubsub.rs.)

#![allow(clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use common::{TestBroker, channel, eventually, metrics_text, next_texts, within};
use futures_util::{SinkExt, StreamExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use volna_client::{Client, ClientConfig, Position, Trust};
use volna_proto::websocket::{CONTROL_STREAM, decode_message, encode_message};
use volna_proto::{CloseCode, Frame, Hello, Limits, PROTOCOL_VERSION};

type Socket = WebSocketStream<tokio_rustls::client::TlsStream<TcpStream>>;

/// A WebSocket that can send anything.
struct RawWs {
    socket: Socket,
    control: BytesMut,
}

/// An upgrade the broker answered with something other than 101.
#[derive(Debug)]
struct Refused {
    status: u16,
    body: String,
}

impl RawWs {
    async fn connect(broker: &TestBroker, path: &str) -> Result<Self, String> {
        Self::open(broker, path, None)
            .await
            .map_err(|e| e.to_string())
    }

    /// An upgrade of `/ws` as a browser page of `origin` makes it (no
    /// `Origin` header for `None`, as native clients).
    async fn connect_from(broker: &TestBroker, origin: Option<&str>) -> Result<Self, Refused> {
        use tokio_tungstenite::tungstenite::Error;
        match Self::open(broker, "/ws", origin).await {
            Ok(raw) => Ok(raw),
            Err(Error::Http(response)) => Err(Refused {
                status: response.status().as_u16(),
                body: String::from_utf8_lossy(response.body().as_deref().unwrap_or_default())
                    .into_owned(),
            }),
            Err(e) => panic!("the upgrade failed otherwise: {e}"),
        }
    }

    async fn open(
        broker: &TestBroker,
        path: &str,
        origin: Option<&str>,
    ) -> Result<Self, tokio_tungstenite::tungstenite::Error> {
        let addr = broker.config.websocket.listen.unwrap();
        let mut roots = rustls::RootCertStore::empty();
        for cert in volna_broker::tls::load_certs(&broker.cert()).unwrap() {
            roots.add(cert).unwrap();
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let tcp = TcpStream::connect(addr).await.unwrap();
        let tls = tokio_rustls::TlsConnector::from(Arc::new(tls))
            .connect("127.0.0.1".try_into().unwrap(), tcp)
            .await
            .unwrap();
        let mut request = format!("wss://{addr}{path}").into_client_request().unwrap();
        if let Some(origin) = origin {
            request
                .headers_mut()
                .insert("origin", HeaderValue::from_str(origin).unwrap());
        }
        let (socket, _) = tokio_tungstenite::client_async(request, tls).await?;
        Ok(Self {
            socket,
            control: BytesMut::new(),
        })
    }

    async fn send(&mut self, message: Message) {
        // The broker may have closed already; reading tells.
        let _ = self.socket.send(message).await;
    }

    async fn send_frame(&mut self, frame: &Frame) {
        let mut bytes = BytesMut::new();
        volna_proto::encode(frame, &mut bytes);
        self.send(Message::Binary(encode_message(CONTROL_STREAM, &bytes)))
            .await;
    }

    async fn hello(&mut self) -> Frame {
        self.send_frame(&Frame::Hello(Hello {
            protocol: PROTOCOL_VERSION,
            token: "test".into(),
            client: "raw-ws".into(),
            device: None,
        }))
        .await;
        self.next_frame().await.expect("an answer to Hello")
    }

    /// The next control frame; `None` once the socket closed.
    async fn next_frame(&mut self) -> Option<Frame> {
        within("a control frame", async {
            loop {
                let limits = Limits {
                    max_frame: 16 << 20,
                };
                if let Some(frame) = volna_proto::decode(&mut self.control, &limits).unwrap() {
                    return Some(frame);
                }
                match self.socket.next().await {
                    Some(Ok(Message::Binary(bytes))) => {
                        let (stream, body) = decode_message(&bytes).unwrap();
                        if stream == CONTROL_STREAM {
                            self.control.extend_from_slice(&body);
                        }
                    }
                    Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return None,
                    Some(Ok(_)) => {}
                }
            }
        })
        .await
    }

    /// The WebSocket close code the broker closed with.
    async fn close_code(&mut self) -> Option<u16> {
        within("the close", async {
            loop {
                match self.socket.next().await {
                    Some(Ok(Message::Close(frame))) => return frame.map(|f| f.code.into()),
                    Some(Ok(_)) => {}
                    None | Some(Err(_)) => return None,
                }
            }
        })
        .await
    }
}

fn ws_code(code: CloseCode) -> Option<u16> {
    Some(volna_proto::websocket::close_code(code))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_websocket_input_closes_that_connection_only() {
    let broker = TestBroker::start().await;
    let ch = channel("chat.ws-hostile");
    let mut good = broker.client_config();
    good.websocket = vec![broker.websocket_url()];
    good.servers.clear();
    let good = Client::connect(good).await.unwrap();
    let mut sub = good.subscribe(&ch, Position::Latest).await.unwrap();

    // A text message is not part of the protocol.
    let mut raw = RawWs::connect(&broker, "/ws").await.unwrap();
    assert!(matches!(raw.hello().await, Frame::Welcome(_)));
    raw.send(Message::Text("hello?".into())).await;
    assert_eq!(raw.close_code().await, ws_code(CloseCode::PROTOCOL_ERROR));

    // A message too short for its stream tag.
    let mut raw = RawWs::connect(&broker, "/ws").await.unwrap();
    raw.send(Message::Binary(Bytes::from_static(&[0, 0]))).await;
    assert_eq!(raw.close_code().await, ws_code(CloseCode::PROTOCOL_ERROR));

    // Bytes on a delivery stream, which only the broker writes.
    let mut raw = RawWs::connect(&broker, "/ws").await.unwrap();
    assert!(matches!(raw.hello().await, Frame::Welcome(_)));
    raw.send(Message::Binary(encode_message(3, b"xyz"))).await;
    assert_eq!(raw.close_code().await, ws_code(CloseCode::PROTOCOL_ERROR));

    // Control bytes that are no frame: a typed error, then the close.
    let mut raw = RawWs::connect(&broker, "/ws").await.unwrap();
    assert!(matches!(raw.hello().await, Frame::Welcome(_)));
    raw.send(Message::Binary(encode_message(
        CONTROL_STREAM,
        &[0, 0, 0, 1, 0xee],
    )))
    .await;
    match raw.next_frame().await {
        Some(Frame::Error(e)) => assert_eq!(e.code, volna_proto::ErrorCode::UnknownFrame),
        other => panic!("expected an Error frame, got {other:?}"),
    }
    assert_eq!(raw.close_code().await, ws_code(CloseCode::PROTOCOL_ERROR));

    // A Publish before Hello is refused like over QUIC.
    let mut raw = RawWs::connect(&broker, "/ws").await.unwrap();
    raw.send_frame(&Frame::Ping { request_id: 1 }).await;
    match raw.next_frame().await {
        Some(Frame::Error(e)) => assert_eq!(e.code, volna_proto::ErrorCode::UnexpectedFrame),
        other => panic!("expected an Error frame, got {other:?}"),
    }

    // Any other path is not the endpoint.
    let refused = RawWs::connect(&broker, "/elsewhere").await.err().unwrap();
    assert!(refused.contains("404"), "{refused}");

    // The well-behaved client never noticed.
    good.publish(&ch, "still here").await.unwrap();
    assert_eq!(next_texts(&mut sub, 1).await, vec!["still here"]);
    common::assert_no_duplicates(&good);
}

/// The value of the metric line starting with `series` (labels included).
async fn metric(broker: &TestBroker, series: &str) -> f64 {
    let text = metrics_text(broker).await;
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {series} in\n{text}"))
}

const ORIGIN_REFUSALS: &str = "volna_websocket_upgrades_refused_total{reason=\"origin\"}";

/// Regression (issue 27 G): any web page could open a WebSocket to the
/// broker from a visitor's browser. A page of another origin is refused
/// with 403 before anything of a session runs; the console's origin (by
/// each name that reaches it) and clients that send no Origin are served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_console_and_clients_without_an_origin_may_upgrade_by_default() {
    let broker = TestBroker::start().await;
    let http = broker.broker().http_addr();
    for foreign in [
        "https://evil.example".to_owned(),
        "null".to_owned(),
        // The console's host on another port, or over https, is another
        // origin.
        format!("http://127.0.0.1:{}", http.port() + 1),
        format!("https://{http}"),
    ] {
        let refused = RawWs::connect_from(&broker, Some(&foreign))
            .await
            .err()
            .unwrap_or_else(|| panic!("{foreign} was let in"));
        assert_eq!(refused.status, 403, "{foreign}: {refused:?}");
        assert!(refused.body.contains("origin"), "{foreign}: {refused:?}");
    }
    assert_eq!(metric(&broker, ORIGIN_REFUSALS).await, 4.0);
    // Nothing was served to them: no upgrade, no session.
    assert_eq!(
        metric(&broker, "volna_websocket_handshakes_total").await,
        0.0
    );
    assert_eq!(metric(&broker, "volna_connections_opened_total").await, 0.0);

    for console in [
        format!("http://{http}"),
        format!("http://localhost:{}", http.port()),
    ] {
        let mut raw = RawWs::connect_from(&broker, Some(&console))
            .await
            .unwrap_or_else(|e| panic!("{console}: {e:?}"));
        assert!(matches!(raw.hello().await, Frame::Welcome(_)), "{console}");
    }
    let mut native = RawWs::connect_from(&broker, None).await.unwrap();
    assert!(matches!(native.hello().await, Frame::Welcome(_)));
    assert_eq!(metric(&broker, ORIGIN_REFUSALS).await, 4.0);
    assert_eq!(
        metric(&broker, "volna_websocket_handshakes_total").await,
        3.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configured_origins_are_let_in_and_a_star_lets_in_any() {
    let broker = TestBroker::start_with(|c| {
        c.websocket.allowed_origins = vec!["https://app.example.com".into()];
    })
    .await;
    let mut app = RawWs::connect_from(&broker, Some("https://app.example.com"))
        .await
        .unwrap();
    assert!(matches!(app.hello().await, Frame::Welcome(_)));
    // Still the console, still nobody else.
    let console = format!("http://{}", broker.broker().http_addr());
    let mut raw = RawWs::connect_from(&broker, Some(&console)).await.unwrap();
    assert!(matches!(raw.hello().await, Frame::Welcome(_)));
    for foreign in ["https://evil.example", "http://app.example.com"] {
        let refused = RawWs::connect_from(&broker, Some(foreign))
            .await
            .err()
            .unwrap_or_else(|| panic!("{foreign} was let in"));
        assert_eq!(refused.status, 403, "{foreign}: {refused:?}");
    }
    assert_eq!(metric(&broker, ORIGIN_REFUSALS).await, 2.0);

    let open = TestBroker::start_with(|c| c.websocket.allowed_origins = vec!["*".into()]).await;
    for any in ["https://evil.example", "null"] {
        let mut raw = RawWs::connect_from(&open, Some(any))
            .await
            .unwrap_or_else(|e| panic!("{any}: {e:?}"));
        assert!(matches!(raw.hello().await, Frame::Welcome(_)), "{any}");
    }
    assert_eq!(metric(&open, ORIGIN_REFUSALS).await, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_with_an_allowed_origin_that_is_not_one_does_not_start() {
    let dir = tempfile::tempdir().unwrap();
    let config = volna_broker::config::Config {
        data_dir: dir.path().to_owned(),
        listen: "127.0.0.1:0".parse().unwrap(),
        http: "127.0.0.1:0".parse().unwrap(),
        websocket: volna_broker::config::WebSocketConfig {
            allowed_origins: vec!["https://app.example.com/chat".into()],
            ..Default::default()
        },
        ..Default::default()
    };
    let err = volna_broker::Broker::start(config).await.unwrap_err();
    let err = err.to_string();
    assert!(err.contains("websocket.allowed_origins"), "{err}");
    assert!(err.contains("https://app.example.com/chat"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_that_never_says_hello_is_closed() {
    let broker = TestBroker::start_with(|c| c.limits.hello_timeout_ms = 300).await;
    let mut raw = RawWs::connect(&broker, "/ws").await.unwrap();
    assert_eq!(raw.close_code().await, ws_code(CloseCode::HELLO_TIMEOUT));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_message_is_refused_before_it_is_read_whole() {
    let broker = TestBroker::start_with(|c| c.limits.max_payload = 1024).await;
    let mut raw = RawWs::connect(&broker, "/ws").await.unwrap();
    assert!(matches!(raw.hello().await, Frame::Welcome(_)));
    let huge = vec![7u8; 4 * 1024 * 1024];
    raw.send(Message::Binary(encode_message(CONTROL_STREAM, &huge)))
        .await;
    assert_eq!(
        raw.next_frame().await,
        None,
        "the broker ends the connection"
    );
    // And keeps serving others.
    let mut again = RawWs::connect(&broker, "/ws").await.unwrap();
    assert!(matches!(again.hello().await, Frame::Welcome(_)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_tells_websocket_clients_the_broker_is_going_away() {
    let mut broker = TestBroker::start().await;
    let mut raw = RawWs::connect(&broker, "/ws").await.unwrap();
    assert!(matches!(raw.hello().await, Frame::Welcome(_)));
    broker.stop().await;
    assert_eq!(raw.close_code().await, ws_code(CloseCode::GOING_AWAY));
}

/// A UDP relay in front of the broker's QUIC port that can drop
/// everything: a network that blocks UDP, switched on and off.
struct UdpRelay {
    addr: SocketAddr,
    blocked: Arc<AtomicBool>,
}

impl UdpRelay {
    async fn start(broker: SocketAddr) -> Self {
        let front = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
        let back = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
        back.connect(broker).await.unwrap();
        let addr = front.local_addr().unwrap();
        let blocked = Arc::new(AtomicBool::new(true));
        let client: Arc<std::sync::Mutex<Option<SocketAddr>>> = Arc::default();
        {
            let (front, back, blocked, client) =
                (front.clone(), back.clone(), blocked.clone(), client.clone());
            tokio::spawn(async move {
                let mut buf = vec![0u8; 65536];
                while let Ok((n, from)) = front.recv_from(&mut buf).await {
                    if blocked.load(Ordering::SeqCst) {
                        continue;
                    }
                    *client.lock().unwrap() = Some(from);
                    let _ = back.send(&buf[..n]).await;
                }
            });
        }
        {
            let (front, blocked) = (front.clone(), blocked.clone());
            tokio::spawn(async move {
                let mut buf = vec![0u8; 65536];
                while let Ok(n) = back.recv(&mut buf).await {
                    let to = *client.lock().unwrap();
                    if let (false, Some(to)) = (blocked.load(Ordering::SeqCst), to) {
                        let _ = front.send_to(&buf[..n], to).await;
                    }
                }
            });
        }
        Self { addr, blocked }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_udp_the_client_falls_back_to_websocket_and_returns_to_quic() {
    let broker = TestBroker::start().await;
    let relay = UdpRelay::start(broker.addr()).await;
    let ch = channel("chat.fallback");
    let mut config =
        ClientConfig::new(relay.addr.to_string(), "test", Trust::CaFile(broker.cert()));
    config.server_name = Some("127.0.0.1".into());
    config.websocket = vec![broker.websocket_url()];
    config.quic_fallback_after = Duration::from_millis(500);
    config.quic_probe_interval = Duration::from_millis(300);
    let started = std::time::Instant::now();
    let subscriber = Client::connect(config).await.unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "connected after {:?}",
        started.elapsed()
    );
    assert!(subscriber.over_websocket(), "UDP is blocked: WebSocket");
    let mut sub = subscriber.subscribe(&ch, Position::Latest).await.unwrap();
    let publisher = broker.client().await;
    for i in 1..=100 {
        publisher.publish(&ch, format!("m{i}")).await.unwrap();
    }
    let first: Vec<String> = next_texts(&mut sub, 100).await;
    assert_eq!(
        first,
        (1..=100).map(|i| format!("m{i}")).collect::<Vec<_>>()
    );
    assert!(
        metrics_text(&broker)
            .await
            .contains("volna_websocket_connections 1")
    );

    // UDP comes back: the client moves to QUIC and the subscription goes
    // on from where it was, while publishing continues.
    relay.blocked.store(false, Ordering::SeqCst);
    let background = {
        let (publisher, ch) = (publisher.clone(), ch.clone());
        tokio::spawn(async move {
            for i in 101..=300 {
                publisher.publish(&ch, format!("m{i}")).await.unwrap();
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    eventually("the client to be back on QUIC", || {
        let back = !subscriber.over_websocket();
        async move { back }
    })
    .await;
    let rest: Vec<String> = next_texts(&mut sub, 200).await;
    assert_eq!(
        rest,
        (101..=300).map(|i| format!("m{i}")).collect::<Vec<_>>()
    );
    background.await.unwrap();
    eventually("the WebSocket to be gone", || async {
        metrics_text(&broker)
            .await
            .contains("volna_websocket_connections 0")
    })
    .await;
}
