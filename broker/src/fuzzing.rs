//! A whole session fed arbitrary bytes, without sockets or RocksDB: the
//! entry point of the `session` fuzz target (`fuzz/`) and of the test that
//! replays its corpus on every CI run.
//!
//! Each call builds a fresh broker core (in-memory log, fan-out engine,
//! development auth) so that no state — and no memory — carries over from
//! one input to the next, runs one session over `input` as its control
//! stream until the bytes run out or the session ends, and stops the log
//! threads. A panic anywhere is what the fuzzer looks for; every outcome
//! that returns is acceptable.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio_util::sync::CancellationToken;
use volna_proto::CloseCode;

use crate::auth::Authenticator;
use crate::config::Config;
use crate::fanout::Fanout;
use crate::log::{self, Logs};
use crate::metrics::Metrics;
use crate::session::{self, BrokerContext, Connection};
use crate::store::{LogStore, MemoryDeviceStore, MemoryStore};
use crate::subscription::{DeliverySink, SinkError};

/// Runs one session over `input`. Returns `Err` only when the harness itself
/// could not start (threads, runtime), never for anything `input` does.
pub fn run_session(input: &[u8]) -> std::io::Result<()> {
    let mut config = Config::default();
    // Small limits so that inputs reach them.
    config.limits.max_payload = 4096;
    config.limits.max_subscriptions = 8;
    config.limits.max_inflight_publishes = 16;
    config.limits.hello_timeout_ms = 200;
    let config = Arc::new(config);
    let metrics = Arc::new(Metrics::new());
    let fanout = Arc::new(Fanout::new(config.engine.channel_ring_bytes));
    let store: Arc<dyn LogStore> = Arc::new(MemoryStore::new());
    let devices = crate::devices::start(
        Arc::new(MemoryDeviceStore::default()),
        store.clone(),
        &config.cursors,
        config.durability,
        metrics.clone(),
    )
    .map_err(|e| std::io::Error::other(e.to_string()))?;
    let threads = log::start(
        store,
        fanout.clone(),
        config.durability,
        &config.engine,
        metrics.clone(),
    )
    .map_err(|e| std::io::Error::other(e.to_string()))?;
    let authenticator = Authenticator::from_config(&config.auth)
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    let ctx = Arc::new(
        BrokerContext::new(
            Logs::durable_only(threads.log().clone()),
            fanout,
            config,
            CancellationToken::new(),
            metrics,
            authenticator,
        )
        .with_devices(devices.devices().clone()),
    );
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let session = session::run(ctx, Arc::new(NullConnection), input, tokio::io::sink());
        // Input that leaves a subscription waiting must not hang the fuzzer.
        let _ = tokio::time::timeout(Duration::from_secs(2), session).await;
    });
    drop(runtime);
    devices.shutdown();
    threads.shutdown();
    Ok(())
}

/// A transport that accepts everything and delivers nowhere.
#[derive(Debug)]
struct NullConnection;

#[derive(Debug)]
struct NullSink;

impl Connection for NullConnection {
    type Sink = NullSink;
    type ControlSend = tokio::io::Sink;

    async fn finish_control(_send: tokio::io::Sink) {}

    async fn open_delivery(&self) -> Result<NullSink, SinkError> {
        Ok(NullSink)
    }

    fn close(&self, _code: CloseCode, _reason: &str) {}

    fn remote(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 0))
    }

    fn peer_identity(&self) -> Option<String> {
        None
    }
}

impl DeliverySink for NullSink {
    async fn send(&mut self, _frames: Vec<Bytes>) -> Result<(), SinkError> {
        Ok(())
    }

    async fn finish(&mut self) {}
}
