//! The ways a client can trust the broker: a real CA chain, the development
//! certificate, a pinned fingerprint; and a broker it must not trust. The
//! certificate reloaded in place; backend services identified by their
//! client certificate (mutual TLS). Reload and mutual TLS are checked over
//! both transports: WebSocket's TLS is the same configuration. Over
//! WebSocket a client certificate is a service only when configured so
//! (`websocket.client_certificates`); by default the token decides.

#![allow(clippy::unwrap_used)]

#[macro_use]
mod common;

use common::{SECRET, TestBroker, Transport, channel};

over_both_transports!(
    the_certificate_is_reloaded_without_dropping_connections,
    a_client_certificate_from_the_client_ca_is_a_server_side_identity,
);
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
use serde_json::json;
use volna_broker::config::{NamespaceConfig, Publishers, WebSocketCertificates};
use volna_client::{Client, ClientCertificate, ClientConfig, ClientError, ErrorCode, Trust};

/// A self-signed CA.
fn ca(name: &str) -> (rcgen::Certificate, KeyPair) {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    (params.self_signed(&key).unwrap(), key)
}

fn pin_of(cert: &rcgen::Certificate) -> [u8; 32] {
    volna_client::fingerprint(cert.der())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_issued_by_a_ca_is_trusted_through_the_ca() {
    let pki = tempfile::tempdir().unwrap();
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let leaf_key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec!["localhost".to_owned()])
        .unwrap()
        .signed_by(&leaf_key, &ca, &ca_key)
        .unwrap();
    std::fs::write(pki.path().join("ca.pem"), ca.pem()).unwrap();
    std::fs::write(pki.path().join("chain.pem"), leaf.pem() + &ca.pem()).unwrap();
    std::fs::write(pki.path().join("key.pem"), leaf_key.serialize_pem()).unwrap();

    let broker = TestBroker::start_with(|c| {
        c.tls.cert = Some(pki.path().join("chain.pem"));
        c.tls.key = Some(pki.path().join("key.pem"));
    })
    .await;
    assert!(
        broker.broker().dev_cert().is_none(),
        "production TLS, not development"
    );
    let server = format!("localhost:{}", broker.addr().port());
    let config = ClientConfig::new(&server, "t", Trust::CaFile(pki.path().join("ca.pem")));
    let client = Client::connect(config).await.unwrap();
    assert_eq!(
        client
            .publish(&channel("chat.ca"), "x")
            .await
            .unwrap()
            .offset
            .get(),
        1
    );

    // The same broker is not trusted through an unrelated CA.
    let other = TestBroker::start().await;
    let config = ClientConfig::new(&server, "t", Trust::CaFile(other.cert()));
    let err = Client::connect(config).await.unwrap_err();
    assert!(matches!(err, ClientError::Connect(_)), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_development_certificate_can_be_pinned_by_fingerprint() {
    let broker = TestBroker::start().await;
    let hex = volna_broker::tls::fingerprint_hex(&broker.cert()).unwrap();
    let mut pin = [0u8; 32];
    for (i, byte) in pin.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap();
    }
    let server = broker.addr().to_string();
    let client = Client::connect(ClientConfig::new(&server, "t", Trust::Pinned(pin)))
        .await
        .unwrap();
    assert_eq!(
        client
            .publish(&channel("chat.pin"), "x")
            .await
            .unwrap()
            .offset
            .get(),
        1
    );

    pin[0] ^= 0xff;
    let err = Client::connect(ClientConfig::new(&server, "t", Trust::Pinned(pin)))
        .await
        .unwrap_err();
    assert!(matches!(err, ClientError::Connect(_)), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_endpoints_answer_on_the_http_port() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let broker = TestBroker::start().await;
    for path in ["/healthz", "/readyz"] {
        let mut tcp = tokio::net::TcpStream::connect(broker.broker().http_addr())
            .await
            .unwrap();
        let request =
            format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
        tcp.write_all(request.as_bytes()).await.unwrap();
        let mut response = String::new();
        tcp.read_to_string(&mut response).await.unwrap();
        assert!(response.starts_with("HTTP/1.1 200"), "{path}: {response}");
    }
}

async fn the_certificate_is_reloaded_without_dropping_connections(transport: Transport) {
    let pki = tempfile::tempdir().unwrap();
    let (cert_path, key_path) = (pki.path().join("cert.pem"), pki.path().join("key.pem"));
    let issue = || {
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(vec!["localhost".to_owned()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        std::fs::write(&cert_path, cert.pem()).unwrap();
        std::fs::write(&key_path, key.serialize_pem()).unwrap();
        cert
    };
    let old = issue();
    let broker = TestBroker::start_over(transport, |c| {
        c.tls.cert = Some(cert_path.clone());
        c.tls.key = Some(key_path.clone());
    })
    .await;
    let pinned = |cert: &rcgen::Certificate| {
        let mut config = broker.client_config();
        config.trust = Trust::Pinned(pin_of(cert));
        config
    };
    let established = Client::connect(pinned(&old)).await.unwrap();

    let new = issue();
    broker.broker().reload_certificate().unwrap();
    Client::connect(pinned(&new)).await.unwrap();
    let err = Client::connect(pinned(&old)).await.unwrap_err();
    assert!(matches!(err, ClientError::Connect(_)), "{err}");
    // The connection made before the reload goes on.
    established
        .publish(&channel("chat.reload"), "x")
        .await
        .unwrap();
    assert!(established.is_connected());

    // A broken file is refused and the certificate in force stays.
    std::fs::write(&key_path, "not a key").unwrap();
    assert!(broker.broker().reload_certificate().is_err());
    Client::connect(pinned(&new)).await.unwrap();
}

/// A client CA, a certificate it issued and one from another CA, and an
/// HS256 key file holding [`SECRET`], in a temporary directory.
struct Pki {
    dir: tempfile::TempDir,
    billing: ClientCertificate,
    rogue: ClientCertificate,
}

impl Pki {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let (client_ca, client_ca_key) = ca("volna services CA");
        std::fs::write(dir.path().join("client-ca.pem"), client_ca.pem()).unwrap();
        let issue = |name: &str, issuer: &rcgen::Certificate, issuer_key: &KeyPair| {
            let key = KeyPair::generate().unwrap();
            let mut params = CertificateParams::new(vec![format!("{name}.internal")]).unwrap();
            params.distinguished_name.push(DnType::CommonName, name);
            let cert = params.signed_by(&key, issuer, issuer_key).unwrap();
            let (cert_path, key_path) = (
                dir.path().join(format!("{name}.pem")),
                dir.path().join(format!("{name}.key")),
            );
            std::fs::write(&cert_path, cert.pem()).unwrap();
            std::fs::write(&key_path, key.serialize_pem()).unwrap();
            ClientCertificate {
                cert: cert_path,
                key: key_path,
            }
        };
        let billing = issue("billing", &client_ca, &client_ca_key);
        let (rogue_ca, rogue_key) = ca("rogue CA");
        let rogue = issue("rogue", &rogue_ca, &rogue_key);
        std::fs::write(dir.path().join("hs256.key"), SECRET).unwrap();
        Self {
            dir,
            billing,
            rogue,
        }
    }

    /// Mutual TLS with this CA, JWT auth with [`SECRET`] and a
    /// `billing` namespace only services may publish to.
    fn configure(&self, c: &mut volna_broker::config::Config) {
        c.tls.client_ca = Some(self.dir.path().join("client-ca.pem"));
        c.auth.mode = volna_broker::auth::AuthMode::Jwt;
        c.auth.hs256_secret_files = vec![self.dir.path().join("hs256.key")];
        c.namespaces.insert(
            "billing".into(),
            NamespaceConfig {
                publishers: Publishers::Server,
                ..NamespaceConfig::default()
            },
        );
    }
}

async fn a_client_certificate_from_the_client_ca_is_a_server_side_identity(transport: Transport) {
    let pki = Pki::new();
    let (billing, rogue) = (pki.billing.clone(), pki.rogue.clone());
    let broker = TestBroker::start_over(transport, |c| {
        pki.configure(c);
        // Over QUIC a certificate is a service whatever the WebSocket
        // setting (left at its default there); over WebSocket only when
        // configured so.
        if transport == Transport::WebSocket {
            c.websocket.client_certificates = WebSocketCertificates::Service;
        }
    })
    .await;
    let with_cert = |cert: Option<ClientCertificate>| {
        let mut config = broker.client_config();
        config.token = String::new();
        config.client_certificate = cert;
        config
    };
    // The certificate is the identity: no token, server-side rights.
    let service = Client::connect(with_cert(Some(billing))).await.unwrap();
    service
        .publish(&channel("billing.invoices"), "invoice 1")
        .await
        .unwrap();
    // Without a certificate a token is still required.
    let err = Client::connect(with_cert(None)).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::Unauthorized), "{err}");
    // A certificate from another CA fails the handshake.
    let err = Client::connect(with_cert(Some(rogue))).await.unwrap_err();
    assert!(
        matches!(
            err,
            ClientError::Connect(_) | ClientError::Disconnected | ClientError::Timeout { .. }
        ),
        "{err}"
    );
}

/// Over WebSocket (a browser presenting a person's installed certificate
/// to whatever page connects) a certificate grants nothing by default: TLS
/// still verifies it, but the session is the token's, with its rights.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_certificate_over_websocket_grants_only_what_the_token_does() {
    let pki = Pki::new();
    let broker = TestBroker::start_over(Transport::WebSocket, |c| pki.configure(c)).await;
    let with = |cert: Option<ClientCertificate>, token: &str| {
        let mut config = broker.client_config();
        config.token = token.to_owned();
        config.client_certificate = cert;
        config
    };
    // A certificate alone is no identity.
    let err = Client::connect(with(Some(pki.billing.clone()), ""))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::Unauthorized), "{err}");
    // With a token, the token's grants apply, not a service's.
    let token = common::user_token(json!({"sub": "ann", "publish": ["chat.1"]}));
    let client = Client::connect(with(Some(pki.billing.clone()), &token))
        .await
        .unwrap();
    assert!(client.over_websocket());
    client.publish(&channel("chat.1"), "mine").await.unwrap();
    for outside in ["chat.2", "billing.invoices"] {
        let err = client.publish(&channel(outside), "x").await.unwrap_err();
        assert_eq!(err.code(), Some(ErrorCode::Forbidden), "{outside}: {err}");
    }
    // TLS still verifies the certificate: one from another CA fails the
    // handshake, token or not.
    let err = Client::connect(with(Some(pki.rogue.clone()), &token))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            ClientError::Connect(_) | ClientError::Disconnected | ClientError::Timeout { .. }
        ),
        "{err}"
    );
}
