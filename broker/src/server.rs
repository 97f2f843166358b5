//! Assembles a running broker from its parts and takes it down in order.
//!
//! Start: data directory → RocksDB → log threads (recovery) → fan-out →
//! TLS → QUIC endpoint → HTTP. Stop (graceful): refuse new connections,
//! tell sessions to finish (they flush pending acks and close with "going
//! away"), close the endpoint, then let the writer commit what was queued,
//! sync the WAL and close the database.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use thiserror::Error;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use volna_proto::CloseCode;

use crate::admin::{self, AdminState};
use crate::auth::{AuthMode, Authenticator};
use crate::config::{Config, ConfigError};
use crate::devices::{self, DevicesThread};
use crate::fanout::Fanout;
use crate::http::{self, HttpState};
use crate::log::{self, Log, LogThreads, Logs};
use crate::metrics::Metrics;
use crate::push::PushHooks;
use crate::retention::{self, Policies};
use crate::session::BrokerContext;
use crate::store::{DeviceStore, LogStore, MemoryDeviceStore, MemoryStore, RocksStore, StoreError};
use crate::tls::{self, TlsError};
use crate::transport::{self, ShardedEndpoint, TransportError};
use crate::websocket::WebSocketEndpoint;

/// How long shutdown waits for sessions to flush and say goodbye.
const SESSION_GRACE: Duration = Duration::from_secs(5);
/// How long shutdown waits for the UDP port to be released.
const PORT_RELEASE: Duration = Duration::from_secs(2);

/// Why the broker could not start.
#[derive(Debug, Error)]
pub enum StartError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The authentication keys could not be loaded.
    #[error(transparent)]
    Auth(#[from] crate::auth::AuthConfigError),
    /// The data directory could not be created.
    #[error("cannot create the data directory {path}: {source}")]
    DataDir {
        /// The directory.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The log could not be opened or recovered.
    #[error("cannot open the channel log: {0}")]
    Store(#[from] StoreError),
    /// TLS could not be set up.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The QUIC endpoint could not start.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// The HTTP listener could not start.
    /// The node could not join its cluster.
    #[error("cannot join the cluster: {0}")]
    Cluster(#[from] crate::cluster::ClusterError),
    /// Cannot listen on the HTTP address.
    #[error("cannot listen on tcp {addr}: {source}")]
    Http {
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
}

/// A running broker.
#[derive(Debug)]
pub struct Broker {
    quic_addr: SocketAddr,
    http_addr: SocketAddr,
    dev_cert: Option<PathBuf>,
    certificate: tls::CertReloader,
    shutdown: CancellationToken,
    ready: Arc<AtomicBool>,
    endpoint: Option<ShardedEndpoint>,
    websocket: Option<WebSocketEndpoint>,
    websocket_addr: Option<SocketAddr>,
    fanout: Arc<Fanout>,
    log_threads: Option<LogThreads>,
    ephemeral_threads: Option<LogThreads>,
    devices_thread: Option<DevicesThread>,
    /// A cluster node's device-state flush task, and what stops it.
    remote_devices: Option<(CancellationToken, JoinHandle<()>)>,
    push: Option<Arc<PushHooks>>,
    logs: Logs,
    tasks: Vec<JoinHandle<()>>,
    cluster: Option<crate::cluster::ClusterNode>,
}

/// See [`Broker::start_with_store_wrapper`].
type StoreWrapper<'a> = Box<dyn FnOnce(Arc<dyn LogStore>) -> Arc<dyn LogStore> + Send + 'a>;

impl Broker {
    /// Starts a broker with `config`, its log in RocksDB under the data
    /// directory.
    pub async fn start(config: Config) -> Result<Self, StartError> {
        Self::start_on(config, None).await
    }

    /// Starts a broker whose durable log is `store` instead of RocksDB:
    /// for embedding over another [`LogStore`], and for tests that inject
    /// storage faults.
    pub async fn start_with_store(
        config: Config,
        store: Arc<dyn LogStore>,
    ) -> Result<Self, StartError> {
        Self::start_on(config, Some(store)).await
    }

    /// Starts a broker on its RocksDB store as seen through `wrap`: a
    /// fault-injection facility for tests of a cluster node, whose Raft
    /// logs need the RocksDB itself while its partitions apply through
    /// the wrapper (e.g. one that fails writes as a failing disk would).
    pub async fn start_with_store_wrapper(
        config: Config,
        wrap: impl FnOnce(Arc<dyn LogStore>) -> Arc<dyn LogStore> + Send,
    ) -> Result<Self, StartError> {
        Self::start_wrapped(config, None, Some(Box::new(wrap))).await
    }

    async fn start_on(
        config: Config,
        store: Option<Arc<dyn LogStore>>,
    ) -> Result<Self, StartError> {
        Self::start_wrapped(config, store, None).await
    }

    async fn start_wrapped(
        config: Config,
        store: Option<Arc<dyn LogStore>>,
        wrap: Option<StoreWrapper<'_>>,
    ) -> Result<Self, StartError> {
        config.validate()?;
        let config = Arc::new(config);
        std::fs::create_dir_all(&config.data_dir).map_err(|source| StartError::DataDir {
            path: config.data_dir.clone(),
            source,
        })?;
        let admin_token = config.admin_token()?;
        let authenticator = Authenticator::from_config(&config.auth)?;
        if authenticator.mode() == AuthMode::None {
            warn!(
                "AUTH IS OFF (auth.mode = \"none\"): every token is accepted and may do everything; for development only"
            );
        }

        // Everything that can fail comes before the log threads start, so a
        // failed start leaves no thread behind holding the database.
        let tls = tls::server_tls(&config)?;
        let reset_key =
            transport::load_reset_key(&config.data_dir).map_err(|source| StartError::DataDir {
                path: config.data_dir.clone(),
                source,
            })?;
        let websocket_tls = (!config.websocket.plaintext).then(|| tls.config.clone());
        let settings = transport::QuicSettings::new(
            tls.config,
            Duration::from_millis(config.limits.idle_timeout_ms),
            &reset_key,
        )?;
        let mut endpoint = ShardedEndpoint::bind(
            config.engine.shards,
            config.listen,
            config.socket_buffer_bytes,
            settings,
        )?;
        let quic_addr = endpoint.local_addr();
        let endpoint_shards = endpoint.shard_count();
        let mut websocket = match config.websocket_addr() {
            Some(addr) => {
                if config.websocket.plaintext {
                    warn!(
                        %addr,
                        "WEBSOCKET WITHOUT TLS (websocket.plaintext = true): tokens and messages cross the network in the clear; for development only"
                    );
                }
                Some(
                    WebSocketEndpoint::bind(
                        addr,
                        websocket_tls,
                        config.websocket.stream_queue_messages,
                    )
                    .await?,
                )
            }
            None => None,
        };
        let websocket_addr = websocket.as_ref().map(WebSocketEndpoint::local_addr);
        let http_listener = tokio::net::TcpListener::bind(config.http)
            .await
            .map_err(|source| StartError::Http {
                addr: config.http,
                source,
            })?;
        let http_addr = http_listener
            .local_addr()
            .map_err(|source| StartError::Http {
                addr: config.http,
                source,
            })?;
        // The console's origin is the HTTP listener's as bound (port 0
        // becomes a real port here).
        let origins = crate::websocket::OriginPolicy::new(&config.websocket, http_addr)?;
        let db_dir = config.data_dir.join("log");
        let clustered = config.cluster.is_some();
        let mut shared_db = None;
        // Device state lives next to the log it points into; over a store
        // given by the embedder (tests injecting faults), in memory.
        let mut device_store: Arc<dyn DeviceStore> = Arc::new(MemoryDeviceStore::default());
        let store: Arc<dyn LogStore> = match store {
            Some(_) if clustered => {
                return Err(crate::cluster::ClusterError::NoRocksDb.into());
            }
            Some(store) => store,
            None => {
                let dir = db_dir.clone();
                let producer_idle = Duration::from_secs(config.engine.producer_idle_secs);
                // A cluster node's Raft logs share its RocksDB.
                let families = if clustered {
                    volna_cluster::raft::log_store::column_families()
                } else {
                    Vec::new()
                };
                let rocks = tokio::task::spawn_blocking(move || {
                    RocksStore::open_with_families(&dir, producer_idle, families)
                })
                .await
                .map_err(|e| StoreError::Engine(e.to_string()))??;
                shared_db = Some(rocks.shared_db());
                let rocks = Arc::new(rocks);
                device_store = rocks.clone();
                match wrap {
                    Some(wrap) => wrap(rocks),
                    None => rocks,
                }
            }
        };

        let metrics = Arc::new(Metrics::new());
        let fanout = Arc::new(
            Fanout::new(config.engine.channel_ring_bytes)
                .with_total_budget(config.engine.max_ring_bytes_total)
                .with_restartable_namespaces(
                    config
                        .namespaces
                        .iter()
                        .filter(|(_, ns)| !ns.persistent)
                        .map(|(name, _)| name.clone())
                        .collect(),
                ),
        );
        // A cluster node's hooks are posted by each partition's leader
        // (`cluster::push`), not by every replica's writer.
        let push = if clustered {
            None
        } else {
            PushHooks::start(&config.namespaces, fanout.clone(), metrics.clone())
                .map_err(|e| StoreError::Engine(format!("cannot start a push hook: {e}")))?
        };
        let listener: Arc<dyn log::CommitListener> = match &push {
            Some(hooks) => hooks.clone(),
            None => fanout.clone(),
        };
        let log_threads = {
            let (store, config, metrics) = (store.clone(), config.clone(), metrics.clone());
            let listener = listener.clone();
            tokio::task::spawn_blocking(move || {
                if clustered {
                    log::start_replicated(
                        store,
                        listener,
                        config.durability,
                        &config.engine,
                        metrics,
                    )
                } else {
                    log::start(store, listener, config.durability, &config.engine, metrics)
                }
            })
            .await
            .map_err(|e| StoreError::Engine(e.to_string()))??
        };
        let log = log_threads.log().clone();
        // Namespaces configured `persistent = false` get an in-memory log of
        // their own: same sequencing and fan-out, no RocksDB.
        let ephemeral_namespaces: std::collections::HashSet<String> = config
            .namespaces
            .iter()
            .filter(|(_, ns)| !ns.persistent)
            .map(|(name, _)| name.clone())
            .collect();
        let ephemeral_threads = if ephemeral_namespaces.is_empty() {
            None
        } else {
            let (listener, config, metrics) = (listener.clone(), config.clone(), metrics.clone());
            let store: Arc<dyn LogStore> = Arc::new(MemoryStore::new());
            Some(
                tokio::task::spawn_blocking(move || {
                    log::start(store, listener, config.durability, &config.engine, metrics)
                })
                .await
                .map_err(|e| StoreError::Engine(e.to_string()))??,
            )
        };
        let logs = match &ephemeral_threads {
            Some(threads) => {
                Logs::with_ephemeral(log.clone(), threads.log().clone(), ephemeral_namespaces)
            }
            None => Logs::durable_only(log.clone()),
        };

        let mut cluster = match (&config.cluster, shared_db) {
            (Some(section), Some(db)) => Some(
                crate::cluster::ClusterNode::start(crate::cluster::NodeSetup {
                    section: section.clone(),
                    quic_addr,
                    db,
                    store: store.clone(),
                    logs: logs.clone(),
                    durability: config.durability,
                    metrics: metrics.clone(),
                    fanout: fanout.clone(),
                    snapshot_dir: config.data_dir.join("snapshots"),
                    push: crate::cluster::push::ClusterPush::new(
                        &config.namespaces,
                        metrics.clone(),
                    ),
                    device_store: device_store.clone(),
                    cursors: config.cursors.clone(),
                })
                .await?,
            ),
            _ => None,
        };

        // A cluster node keeps device state in the users' partitions
        // (devices reconnect anywhere); a single node in its own store.
        let mut remote_devices = None;
        let devices_thread = if clustered {
            None
        } else {
            let (store, config, metrics) = (store.clone(), config.clone(), metrics.clone());
            Some(
                tokio::task::spawn_blocking(move || {
                    devices::start(
                        device_store,
                        store,
                        &config.cursors,
                        config.durability,
                        metrics,
                    )
                })
                .await
                .map_err(|e| StoreError::Engine(e.to_string()))??,
            )
        };
        let mut devices = devices_thread.as_ref().map(|t| t.devices().clone());
        if let Some(node) = &cluster {
            let stop = CancellationToken::new();
            let (handle, task) = devices::start_remote(
                node.devices().clone(),
                &config.cursors,
                metrics.clone(),
                stop.clone(),
            );
            node.devices().announce_to(&handle);
            devices = Some(handle);
            remote_devices = Some((stop, task));
        }

        let shutdown = CancellationToken::new();
        let ready = Arc::new(AtomicBool::new(false));
        let mut ctx = BrokerContext::new(
            logs.clone(),
            fanout.clone(),
            config.clone(),
            shutdown.clone(),
            metrics.clone(),
            authenticator,
        );
        if let Some(devices) = &devices {
            ctx = ctx.with_devices(devices.clone());
        }
        let ctx = Arc::new(ctx);
        if let (Some(node), Some(section)) = (&mut cluster, &config.cluster) {
            node.guard_devices(
                ctx.serving.clone(),
                ctx.sessions.clone(),
                Duration::from_millis(section.heartbeat_ms),
                Duration::from_millis(section.election_timeout_ms),
            );
        }
        let policies = Arc::new(Policies::from_config(&config));
        let admin = AdminState {
            logs: logs.clone(),
            fanout: fanout.clone(),
            sessions: ctx.sessions.clone(),
            policies: policies.clone(),
            token_digest: admin_token.as_deref().map(admin::token_digest),
            max_payload: config.limits.max_payload,
            cluster: cluster
                .as_ref()
                .map(|node| Arc::new(node.status_source()) as Arc<dyn crate::admin::ClusterStatus>),
            devices,
        };
        let http_state = HttpState {
            websocket: websocket_addr.map(|addr| (addr.port(), !config.websocket.plaintext)),
            ready: ready.clone(),
            metrics: metrics.clone(),
            logs: logs.clone(),
            fanout: fanout.clone(),
            store,
            cluster: cluster
                .as_ref()
                .map(|node| Arc::new(node.status_source()) as Arc<dyn crate::admin::ClusterStatus>),
        };
        let retention_every = Duration::from_millis(config.engine.retention_interval_ms);
        let mut tasks = vec![
            endpoint.serve(ctx.clone()),
            tokio::spawn(http::serve(
                http_listener,
                http_state,
                admin,
                shutdown.clone(),
            )),
            tokio::spawn(retention::run(
                log,
                policies.clone(),
                metrics.clone(),
                retention_every,
                shutdown.clone(),
            )),
        ];
        if let Some(threads) = &ephemeral_threads {
            tasks.push(tokio::spawn(retention::run(
                threads.log().clone(),
                policies.clone(),
                metrics.clone(),
                retention_every,
                shutdown.clone(),
            )));
        }
        if let Some(websocket) = &mut websocket {
            tasks.push(websocket.serve(ctx, origins));
        }
        ready.store(true, Ordering::SeqCst);
        info!(
            quic = %quic_addr,
            websocket = ?websocket_addr,
            http = %http_addr,
            data_dir = %config.data_dir.display(),
            durability = ?config.durability,
            shards = endpoint_shards,
            "volna broker ready"
        );
        Ok(Self {
            quic_addr,
            http_addr,
            dev_cert: tls.dev_cert,
            certificate: tls.reloader,
            shutdown,
            ready,
            endpoint: Some(endpoint),
            websocket,
            websocket_addr,
            fanout,
            log_threads: Some(log_threads),
            ephemeral_threads,
            devices_thread,
            remote_devices,
            push,
            logs,
            tasks,
            cluster,
        })
    }

    /// Re-reads the TLS certificate and key (what SIGHUP does): new
    /// connections get the new certificate, established ones go on. On
    /// error the certificate in force stays.
    pub fn reload_certificate(&self) -> Result<(), TlsError> {
        self.certificate.reload()
    }

    /// The UDP address QUIC listens on.
    pub fn quic_addr(&self) -> SocketAddr {
        self.quic_addr
    }

    /// The TCP address WebSocket clients connect to, when enabled.
    pub fn websocket_addr(&self) -> Option<SocketAddr> {
        self.websocket_addr
    }

    /// The TCP address of the health endpoints.
    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    /// The self-signed certificate, in development mode.
    pub fn dev_cert(&self) -> Option<&PathBuf> {
        self.dev_cert.as_ref()
    }

    /// A handle to the channel log (for tests and embedding).
    pub fn log(&self) -> Option<&Log> {
        self.log_threads.as_ref().map(LogThreads::log)
    }

    /// The log holding `channel`: durable, or in memory for namespaces
    /// configured `persistent = false` (for tests and embedding).
    pub fn log_for(&self, channel: &volna_proto::ChannelName) -> &Log {
        self.logs.for_channel(channel)
    }

    /// The cluster node, when `[cluster]` is configured.
    pub fn cluster(&self) -> Option<&crate::cluster::ClusterNode> {
        self.cluster.as_ref()
    }

    /// The fan-out engine (for tests and embedding).
    pub fn fanout(&self) -> &Fanout {
        &self.fanout
    }

    /// Graceful stop: every acked message is durable and every client was
    /// told "going away" when this returns.
    pub async fn shutdown(mut self) {
        info!("shutting down");
        self.ready.store(false, Ordering::SeqCst);
        self.shutdown.cancel();
        if let Some(endpoint) = &self.endpoint {
            // Sessions drain their pending acks and close with GOING_AWAY.
            let idle = async {
                endpoint.wait_idle().await;
                if let Some(websocket) = &self.websocket {
                    websocket.wait_idle().await;
                }
            };
            if tokio::time::timeout(SESSION_GRACE, idle).await.is_err() {
                warn!("sessions did not finish in time; closing their connections");
            }
            endpoint.close(CloseCode::GOING_AWAY);
        }
        if let Some(websocket) = &self.websocket {
            websocket.close();
        }
        for task in self.tasks.drain(..) {
            task.abort();
            let _ = task.await;
        }
        // What sessions acknowledged last is proposed while the groups
        // still run (bounded by the proposals' own deadline).
        if let Some((stop, task)) = self.remote_devices.take() {
            stop.cancel();
            let _ = task.await;
        }
        // The groups stop before the log: an entry being applied finds the
        // writer still there.
        if let Some(cluster) = self.cluster.take() {
            cluster.shutdown().await;
        }
        // Sessions are gone: no ack comes after this write of the last ones.
        if let Some(devices) = self.devices_thread.take() {
            let _ = tokio::task::spawn_blocking(move || devices.shutdown()).await;
        }
        if let Some(push) = self.push.take() {
            let _ = tokio::task::spawn_blocking(move || push.shutdown()).await;
        }
        for threads in [self.ephemeral_threads.take(), self.log_threads.take()]
            .into_iter()
            .flatten()
        {
            let _ = tokio::task::spawn_blocking(move || threads.shutdown()).await;
        }
        // The shards' sockets close once their loops have ended; wait for
        // that so a restart can bind the same port.
        let addr = self.quic_addr;
        drop(self.endpoint.take());
        let deadline = tokio::time::Instant::now() + PORT_RELEASE;
        while std::net::UdpSocket::bind(addr).is_err() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        info!("stopped");
    }
}

impl Drop for Broker {
    /// A broker dropped without [`Broker::shutdown`] (a test that ends, a
    /// panic) still stops its log threads and closes RocksDB before the
    /// process exits: RocksDB must not be running while its statics are
    /// torn down. Joining the threads waits for the writer to commit what
    /// is queued; on a multi-threaded runtime the wait moves off the worker
    /// (`block_in_place`), so the runtime's other tasks go on meanwhile.
    fn drop(&mut self) {
        let Some(threads) = self.log_threads.take() else {
            return;
        };
        self.shutdown.cancel();
        if let Some(endpoint) = &self.endpoint {
            endpoint.close(CloseCode::GOING_AWAY);
        }
        if let Some(websocket) = &self.websocket {
            websocket.close();
        }
        for task in self.tasks.drain(..) {
            task.abort();
        }
        if let Some((_, task)) = self.remote_devices.take() {
            task.abort();
        }
        let ephemeral = self.ephemeral_threads.take();
        let devices = self.devices_thread.take();
        let push = self.push.take();
        let stop = move || {
            if let Some(devices) = devices {
                devices.shutdown();
            }
            if let Some(push) = push {
                push.shutdown();
            }
            if let Some(ephemeral) = ephemeral {
                ephemeral.shutdown();
            }
            threads.shutdown();
        };
        match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
            Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(stop),
            // A current-thread runtime has no other worker to hand its
            // tasks to, and outside a runtime nothing waits: join here.
            _ => stop(),
        }
    }
}
