//! A Volna cluster under test: a private etcd and broker processes on
//! loopback, with certificates from one development CA, each started by
//! the test and stopped by PID (dropping the cluster kills them).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;
use volna_client::{ClientConfig, Trust};
use volna_cluster::tls::DevCa;

use crate::netfault::NetCut;
use crate::{BrokerProcess, ChaosError};

/// The admin token the test cluster's nodes accept.
pub const ADMIN_TOKEN: &str = "chaos-cluster-admin-token";

/// A private etcd server on free loopback ports.
#[derive(Debug)]
pub struct Etcd {
    child: Option<Child>,
    client_port: u16,
    peer_port: u16,
    dir: PathBuf,
}

fn free_tcp_port() -> Result<u16, ChaosError> {
    crate::free_port(crate::Protocol::Tcp)
}

fn free_udp_port() -> Result<u16, ChaosError> {
    crate::free_port(crate::Protocol::Udp)
}

impl Etcd {
    /// Starts etcd (`VOLNA_ETCD_BIN`, else `etcd` on the path) with its
    /// data under `dir`; waits until it answers.
    pub fn start(dir: &Path) -> Result<Self, ChaosError> {
        let mut etcd = Self {
            child: None,
            client_port: free_tcp_port()?,
            peer_port: free_tcp_port()?,
            dir: dir.to_owned(),
        };
        etcd.spawn()?;
        Ok(etcd)
    }

    fn spawn(&mut self) -> Result<(), ChaosError> {
        let binary = std::env::var("VOLNA_ETCD_BIN").unwrap_or_else(|_| "etcd".into());
        let client = format!("http://127.0.0.1:{}", self.client_port);
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("etcd.log"))?;
        let child = Command::new(&binary)
            .arg("--name=volna-chaos")
            .arg(format!("--data-dir={}", self.dir.join("etcd").display()))
            .arg(format!("--listen-client-urls={client}"))
            .arg(format!("--advertise-client-urls={client}"))
            .arg(format!("--listen-peer-urls={peer}"))
            .arg(format!("--initial-advertise-peer-urls={peer}"))
            .arg(format!("--initial-cluster=volna-chaos={peer}"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| {
                ChaosError::Binary(format!(
                    "cannot start {binary}: {e} (scripts/prereqs.sh installs etcd-server)"
                ))
            })?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while http_get(self.client_addr(), "/health", None).is_none_or(|b| !b.contains("true")) {
            if Instant::now() > deadline {
                return Err(ChaosError::StartTimeout(Duration::from_secs(30)));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    fn client_addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.client_port))
    }

    /// The client URL.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    /// `kill -9`.
    pub fn kill(&mut self) -> Result<(), ChaosError> {
        if let Some(mut child) = self.child.take() {
            child.kill()?;
            child.wait()?;
        }
        Ok(())
    }

    /// Starts it again on the same data and ports.
    pub fn start_again(&mut self) -> Result<(), ChaosError> {
        self.kill()?;
        self.spawn()
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.kill();
    }
}

/// A blocking HTTP/1.0 GET on loopback: the body when the answer is 200.
fn http_get(addr: SocketAddr, path: &str, token: Option<&str>) -> Option<String> {
    use std::io::{Read, Write};
    let mut tcp = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    tcp.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    let auth = token.map_or_else(String::new, |t| format!("Authorization: Bearer {t}\r\n"));
    write!(tcp, "GET {path} HTTP/1.0\r\nHost: localhost\r\n{auth}\r\n").ok()?;
    let mut reply = String::new();
    tcp.read_to_string(&mut reply).ok()?;
    let (head, body) = reply.split_once("\r\n\r\n")?;
    head.contains(" 200 ").then(|| body.to_owned())
}

/// `GET /readyz` on `node`: `Ok` when it is ready, else `Err` with its
/// answer (the reason it gives, or why it gave none).
pub fn readiness(node: &BrokerProcess) -> Result<(), String> {
    use std::io::{Read, Write};
    let mut tcp = std::net::TcpStream::connect_timeout(&node.http_addr(), Duration::from_secs(2))
        .map_err(|e| e.to_string())?;
    tcp.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    write!(tcp, "GET /readyz HTTP/1.0\r\nHost: localhost\r\n\r\n").map_err(|e| e.to_string())?;
    let mut reply = String::new();
    tcp.read_to_string(&mut reply).map_err(|e| e.to_string())?;
    let (head, body) = reply.split_once("\r\n\r\n").unwrap_or((&reply, ""));
    if head.contains(" 200 ") {
        Ok(())
    } else {
        Err(body.trim().to_owned())
    }
}

/// `GET path` on `node`'s admin API (the cluster's admin token); the body
/// of a 200 answer.
pub fn admin_get(node: &BrokerProcess, path: &str) -> Option<String> {
    http_get(node.http_addr(), path, Some(ADMIN_TOKEN))
}

/// etcd and broker nodes.
pub struct TestCluster {
    /// The nodes, node `i + 1` at index `i`.
    pub nodes: Vec<BrokerProcess>,
    /// etcd.
    pub etcd: Etcd,
    /// The development CA every node's certificate chains to.
    pub ca: PathBuf,
    /// Partitions.
    pub partitions: u32,
    /// Replicas per partition.
    pub replicas: usize,
    /// Raft entries between a partition's snapshots.
    pub snapshot_entries: u64,
    /// Bytes of Raft log between a partition's snapshots.
    pub snapshot_log_bytes: u64,
    /// Each node's inter-node (peer) UDP port, node `i + 1` at index `i`.
    pub peer_ports: Vec<u16>,
    /// TOML added to every node's configuration.
    extra: String,
    /// Nodes whose data directory is not under the cluster's temporary
    /// directory (e.g. on a small disk the test mounted).
    data_dirs: BTreeMap<u64, PathBuf>,
    authority: DevCa,
    dir: TempDir,
}

impl std::fmt::Debug for TestCluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestCluster")
            .field("nodes", &self.nodes)
            .field("etcd", &self.etcd)
            .field("partitions", &self.partitions)
            .finish_non_exhaustive()
    }
}

impl Drop for TestCluster {
    /// With `VOLNA_CHAOS_KEEP` set, the nodes' data and logs stay on disk
    /// for a post-mortem (the path is printed).
    fn drop(&mut self) {
        if std::env::var_os("VOLNA_CHAOS_KEEP").is_some() {
            let dir = std::mem::replace(
                &mut self.dir,
                tempfile::tempdir().unwrap_or_else(|_| panic!("no temporary directory")),
            );
            eprintln!("cluster data kept in {}", dir.keep().display());
        }
    }
}

impl TestCluster {
    /// Starts etcd and `nodes` brokers (3 replicas per partition, or fewer
    /// when there are fewer nodes), and waits until every partition has a
    /// leader.
    pub async fn start(nodes: u64, partitions: u32) -> Result<Self, ChaosError> {
        Self::start_with_snapshots(nodes, partitions, 10_000).await
    }

    /// As [`TestCluster::start`], with partitions compacting their Raft
    /// logs into a snapshot every `snapshot_entries` entries.
    pub async fn start_with_snapshots(
        nodes: u64,
        partitions: u32,
        snapshot_entries: u64,
    ) -> Result<Self, ChaosError> {
        Self::start_configured(nodes, partitions, snapshot_entries, "").await
    }

    /// As [`TestCluster::start_with_snapshots`], with `extra` (TOML) added
    /// to every node's configuration, e.g. a namespace's retention.
    pub async fn start_configured(
        nodes: u64,
        partitions: u32,
        snapshot_entries: u64,
        extra: &str,
    ) -> Result<Self, ChaosError> {
        Self::start_placed(
            nodes,
            partitions,
            snapshot_entries,
            extra,
            BTreeMap::new(),
            3,
        )
        .await
    }

    /// As [`TestCluster::start`], with `replicas` replicas per partition:
    /// with fewer replicas than nodes, every node is an edge for the
    /// partitions it does not hold.
    pub async fn start_with_replicas(
        nodes: u64,
        partitions: u32,
        replicas: usize,
    ) -> Result<Self, ChaosError> {
        Self::start_placed(nodes, partitions, 10_000, "", BTreeMap::new(), replicas).await
    }

    /// As [`TestCluster::start`], with the data directories of some nodes
    /// (by 1-based id) at the given paths, e.g. on a disk the test fills.
    pub async fn start_with_data_dirs(
        nodes: u64,
        partitions: u32,
        data_dirs: BTreeMap<u64, PathBuf>,
    ) -> Result<Self, ChaosError> {
        Self::start_placed(nodes, partitions, 10_000, "", data_dirs, 3).await
    }

    /// As [`TestCluster::start`], with partitions taking a snapshot every
    /// `log_bytes` of Raft log, and keeping the last `kept_entries` entries
    /// after one.
    pub async fn start_with_snapshot_bytes(
        nodes: u64,
        partitions: u32,
        log_bytes: u64,
        kept_entries: u64,
    ) -> Result<Self, ChaosError> {
        Self::start_inner(
            nodes,
            partitions,
            // Entries never trigger one before bytes do.
            kept_entries * 10,
            Some(log_bytes),
            "",
            BTreeMap::new(),
            3,
        )
        .await
    }

    async fn start_placed(
        nodes: u64,
        partitions: u32,
        snapshot_entries: u64,
        extra: &str,
        data_dirs: BTreeMap<u64, PathBuf>,
        replicas: usize,
    ) -> Result<Self, ChaosError> {
        Self::start_inner(
            nodes,
            partitions,
            snapshot_entries,
            None,
            extra,
            data_dirs,
            replicas,
        )
        .await
    }

    async fn start_inner(
        nodes: u64,
        partitions: u32,
        snapshot_entries: u64,
        snapshot_log_bytes: Option<u64>,
        extra: &str,
        data_dirs: BTreeMap<u64, PathBuf>,
        replicas: usize,
    ) -> Result<Self, ChaosError> {
        let dir = tempfile::tempdir()?;
        let etcd = Etcd::start(dir.path())?;
        let ca = DevCa::generate().map_err(|e| ChaosError::Binary(e.to_string()))?;
        let ca_path = dir.path().join("ca.pem");
        std::fs::write(&ca_path, ca.cert_pem())?;
        let mut cluster = Self {
            nodes: Vec::new(),
            etcd,
            ca: ca_path,
            partitions,
            replicas,
            snapshot_entries,
            snapshot_log_bytes: snapshot_log_bytes.unwrap_or(64 << 20),
            extra: extra.to_owned(),
            data_dirs,
            peer_ports: Vec::new(),
            authority: ca,
            dir,
        };
        for id in 1..=nodes {
            cluster.add_node(id)?;
        }
        let started = async {
            for node in &cluster.nodes {
                node.wait_ready(Duration::from_secs(60)).await?;
            }
            cluster.wait_for_leaders(Duration::from_secs(60)).await
        };
        if let Err(e) = started.await {
            // The nodes' own words are the only clue once the test's
            // directory is gone.
            for (id, node) in cluster.nodes.iter().enumerate() {
                let log = std::fs::read_to_string(node.log_path()).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(40).collect();
                eprintln!("--- node {} did not start in time; its log ends:", id + 1);
                for line in tail.into_iter().rev() {
                    eprintln!("{line}");
                }
            }
            return Err(e);
        }
        Ok(cluster)
    }

    /// Starts node `nodes.len() + 1` and waits until it serves devices;
    /// the placer then moves partitions to it.
    pub async fn join(&mut self) -> Result<u64, ChaosError> {
        let id = self.nodes.len() as u64 + 1;
        self.add_node(id)?;
        self.nodes[(id - 1) as usize]
            .wait_ready(Duration::from_secs(60))
            .await?;
        Ok(id)
    }

    fn add_node(&mut self, id: u64) -> Result<(), ChaosError> {
        let issued = self
            .authority
            .issue(id, &["localhost", "127.0.0.1"])
            .map_err(|e| ChaosError::Binary(e.to_string()))?;
        let data = self
            .data_dirs
            .get(&id)
            .cloned()
            .unwrap_or_else(|| self.dir.path().join(format!("node-{id}")));
        std::fs::create_dir_all(&data)?;
        let cert = self.dir.path().join(format!("node-{id}.pem"));
        let key = self.dir.path().join(format!("node-{id}.key"));
        std::fs::write(&cert, issued.cert_pem)?;
        std::fs::write(&key, issued.key_pem)?;
        let config = self.dir.path().join(format!("node-{id}.toml"));
        let peer_port = free_udp_port()?;
        self.peer_ports.push(peer_port);
        std::fs::write(
            &config,
            format!(
                r#"[tls]
cert = "{cert}"
key = "{key}"

[auth]
mode = "none"

[admin]
token = "{ADMIN_TOKEN}"

[cluster]
node_id = {id}
name = "chaos"
etcd_endpoints = ["{etcd}"]
peer_listen = "127.0.0.1:{peer}"
partitions = {partitions}
replicas = {replicas}
election_timeout_ms = 1000
heartbeat_ms = 100
lease_ttl_secs = 3
dead_node_grace_secs = 5
snapshot_entries = {snapshot_entries}
snapshot_log_bytes = {snapshot_log_bytes}

[cluster.tls]
ca = "{ca}"
cert = "{cert}"
key = "{key}"

{extra}
"#,
                cert = cert.display(),
                key = key.display(),
                etcd = self.etcd.endpoint(),
                peer = peer_port,
                partitions = self.partitions,
                replicas = self.replicas,
                snapshot_entries = self.snapshot_entries,
                snapshot_log_bytes = self.snapshot_log_bytes,
                ca = self.ca.display(),
                extra = self.extra,
            ),
        )?;
        let config = config.display().to_string();
        self.nodes.push(BrokerProcess::start_with(
            &data,
            "wal",
            &[("VOLNA_CONFIG", &config)],
        )?);
        Ok(())
    }

    /// A client configuration trying `nodes` (1-based ids) in that order.
    pub fn client_config(&self, nodes: &[u64]) -> ClientConfig {
        let servers: Vec<String> = nodes
            .iter()
            .map(|id| self.nodes[(*id - 1) as usize].addr().to_string())
            .collect();
        crate::fast_reconnects(
            ClientConfig::with_servers(servers, "chaos", Trust::CaFile(self.ca.clone())),
            Duration::from_secs(30),
        )
    }

    /// Node `id`'s view of the cluster (`/admin/cluster`), if it answers.
    pub fn status(&self, id: u64) -> Option<serde_json::Value> {
        let node = &self.nodes[(id - 1) as usize];
        let body = http_get(node.http_addr(), "/admin/cluster", Some(ADMIN_TOKEN))?;
        serde_json::from_str(&body).ok()
    }

    /// The leader of `channel`'s partition as node `asked` sees it, or,
    /// when `asked` does not replicate that partition (placement moved it
    /// away, e.g. while it was down), as the running nodes that do see it.
    pub fn leader_of(&self, channel: &str, asked: u64) -> Option<u64> {
        let partition = volna_cluster::partition_of(channel, self.partitions).0 as usize;
        let others = (1..=self.nodes.len() as u64)
            .filter(|id| *id != asked && self.nodes[(*id - 1) as usize].is_running());
        std::iter::once(asked).chain(others).find_map(|id| {
            let status = self.status(id)?;
            let view = &status["partitions"][partition];
            if view["hosted"] == true {
                view["leader"].as_u64()
            } else {
                None
            }
        })
    }

    /// Waits until every partition has a leader all running nodes that
    /// replicate it agree on.
    pub async fn wait_for_leaders(&self, within: Duration) -> Result<(), ChaosError> {
        let deadline = Instant::now() + within;
        loop {
            let statuses: Vec<Option<serde_json::Value>> = (1..=self.nodes.len() as u64)
                .filter(|id| self.nodes[(*id - 1) as usize].is_running())
                .map(|id| self.status(id))
                .collect();
            let agreed = (0..self.partitions as usize).all(|p| {
                let leaders: std::collections::BTreeSet<Option<u64>> = statuses
                    .iter()
                    .filter(|s| {
                        s.as_ref()
                            .is_none_or(|s| s["partitions"][p]["hosted"].as_bool() == Some(true))
                    })
                    .map(|s| {
                        s.as_ref()
                            .and_then(|s| s["partitions"][p]["leader"].as_u64())
                    })
                    .collect();
                leaders.len() == 1 && leaders.iter().all(Option::is_some)
            });
            if agreed {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(ChaosError::StartTimeout(within));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Cuts node `id` off from every other node (its peer port from
    /// theirs, both ways); its clients still reach it. Healed when the
    /// returned cut is healed or dropped.
    pub fn isolate(&self, id: u64) -> Result<NetCut, ChaosError> {
        let this = self.peer_ports[(id - 1) as usize];
        let others: Vec<u16> = self
            .peer_ports
            .iter()
            .copied()
            .filter(|port| *port != this)
            .collect();
        NetCut::between(&[this], &others)
    }

    /// Cuts the nodes `side` (1-based ids) off from all the others.
    pub fn split(&self, side: &[u64]) -> Result<NetCut, ChaosError> {
        let mut inside = Vec::new();
        let mut outside = Vec::new();
        for (i, port) in self.peer_ports.iter().enumerate() {
            if side.contains(&(i as u64 + 1)) {
                inside.push(*port);
            } else {
                outside.push(*port);
            }
        }
        NetCut::between(&inside, &outside)
    }

    /// Runs `volna cluster verify` over every running node: every replica
    /// of every partition compared by digest at one applied entry. `Ok`
    /// with its report, or `Err` with it when a replica differs.
    pub fn verify(&self) -> Result<String, String> {
        let cli = crate::cli_binary().map_err(|e| e.to_string())?;
        let mut command = Command::new(cli);
        command
            .args(["cluster", "verify", "--within-secs", "60"])
            .env("VOLNA_ADMIN_TOKEN", ADMIN_TOKEN);
        for node in self.nodes.iter().filter(|n| n.is_running()) {
            command.arg("--node").arg(node.http_addr().to_string());
        }
        let out = command.output().map_err(|e| e.to_string())?;
        let report = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        if out.status.success() {
            Ok(report)
        } else {
            Err(report)
        }
    }

    /// Fails the test unless every replica of every partition holds the
    /// same state ([`TestCluster::verify`]).
    pub fn assert_replicas_agree(&self) {
        match self.verify() {
            Ok(report) => eprintln!("{report}"),
            Err(report) => panic!("replicas differ:\n{report}"),
        }
    }

    /// Inter-node bytes every running node sent so far, summed.
    pub async fn peer_bytes_sent(&self) -> f64 {
        let mut total = 0.0;
        for node in self.nodes.iter().filter(|n| n.is_running()) {
            total += node
                .metric("volna_cluster_peer_bytes_sent_total")
                .await
                .unwrap_or(0.0);
        }
        total
    }
}
