//! The ways a client can trust the broker: a real CA chain, the development
//! certificate, a pinned fingerprint; and a broker it must not trust.

#![allow(clippy::unwrap_used)]

mod common;

use common::{TestBroker, channel};
use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
use volna_client::{Client, ClientConfig, ClientError, Trust};

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
