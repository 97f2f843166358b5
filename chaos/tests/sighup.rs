//! SIGHUP to the real broker binary: the TLS certificate is replaced
//! without dropping a connection; a broken certificate file leaves the
//! previous one in force.

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::time::{Duration, Instant};

use volna_chaos::BrokerProcess;
use volna_client::{ChannelName, Client, ClientConfig, Trust};

/// Writes a fresh self-signed certificate for `localhost`; returns its pin.
fn issue(cert: &Path, key: &Path) -> [u8; 32] {
    let generated = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    std::fs::write(cert, generated.cert.pem()).unwrap();
    std::fs::write(key, generated.key_pair.serialize_pem()).unwrap();
    volna_client::fingerprint(generated.cert.der())
}

fn pinned(broker: &BrokerProcess, pin: [u8; 32]) -> ClientConfig {
    let mut config = ClientConfig::new(broker.addr().to_string(), "hup", Trust::Pinned(pin));
    config.request_timeout = Duration::from_secs(5);
    config
}

/// Connects with `pin` until it works or `within` passes.
async fn connect_eventually(config: ClientConfig, within: Duration) -> Client {
    let deadline = Instant::now() + within;
    loop {
        match Client::connect(config.clone()).await {
            Ok(client) => return client,
            Err(e) if Instant::now() > deadline => panic!("never connected: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_certificate_and_keeps_connections() {
    let dir = tempfile::tempdir().unwrap();
    let pki = tempfile::tempdir().unwrap();
    let (cert, key) = (pki.path().join("cert.pem"), pki.path().join("key.pem"));
    let old_pin = issue(&cert, &key);
    let broker = BrokerProcess::start_with(
        dir.path(),
        "wal",
        &[
            ("VOLNA_TLS__CERT", cert.to_str().unwrap()),
            ("VOLNA_TLS__KEY", key.to_str().unwrap()),
        ],
    )
    .unwrap();
    let channel = ChannelName::new("chat.hup").unwrap();
    let established = connect_eventually(pinned(&broker, old_pin), Duration::from_secs(60)).await;

    let new_pin = issue(&cert, &key);
    broker.signal("HUP").unwrap();
    let fresh = connect_eventually(pinned(&broker, new_pin), Duration::from_secs(10)).await;
    assert!(Client::connect(pinned(&broker, old_pin)).await.is_err());
    established.publish(&channel, "before").await.unwrap();
    fresh.publish(&channel, "after").await.unwrap();
    assert!(
        established.is_connected(),
        "the reload dropped a connection"
    );

    // A broken key: refused, the new certificate stays in force.
    std::fs::write(&key, "garbage").unwrap();
    broker.signal("HUP").unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    Client::connect(pinned(&broker, new_pin)).await.unwrap();
    broker.assert_never_panicked();
    let log = std::fs::read_to_string(broker.log_path()).unwrap();
    assert!(
        log.contains("not reloaded"),
        "the failed reload is logged:\n{log}"
    );
}
