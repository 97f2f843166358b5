//! A partition group whose storage fails (issue 27 C): three cluster nodes
//! in this process on a private etcd, one node's store seen through a
//! wrapper that fails the writes of one partition with an I/O error.
//!
//! The failing node must stop acting as that partition's leader, its
//! publishes must go to the other replicas (or fail with a typed,
//! retryable error) instead of hanging, its `/readyz` must name the
//! partition, and once the disk heals the group must come back from the
//! store and serve again with nothing lost and nothing stored twice.
//!
//! Needs `etcd` (`VOLNA_ETCD_BIN`, else on the path; scripts/prereqs.sh
//! installs it).

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use tempfile::TempDir;
use volna_broker::admin::ClusterStatus;
use volna_broker::config::{ClusterSection, ClusterTls};
use volna_broker::store::{StoreError, WriteSet};
use volna_broker::{Broker, Config};
use volna_client::{ChannelName, Client, ClientConfig, ClientError, Position, Trust};
use volna_cluster::raft::lease::Standing;
use volna_cluster::tls::DevCa;
use volna_cluster::{PartitionId, partition_of};

use common::DEADLINE;
use common::store::{Faulty, StoreFault};

const PARTITIONS: u32 = 4;
const ELECTION_TIMEOUT: Duration = Duration::from_millis(1000);

/// A fault that, while switched on for a partition, fails every write
/// carrying that partition's applied state (its Raft entries) as a failing
/// disk would; the node's RocksDB store takes every other call.
#[derive(Debug, Default)]
struct FailingPartition {
    /// The partition whose writes fail, plus one (0: none).
    failing: AtomicU32,
    /// Writes refused so far.
    refused: AtomicU64,
}

impl FailingPartition {
    fn fail_partition(&self, partition: Option<u32>) {
        self.failing
            .store(partition.map_or(0, |p| p + 1), Ordering::SeqCst);
    }
}

impl StoreFault for FailingPartition {
    fn before_write(&self, set: &WriteSet) -> Result<(), StoreError> {
        let failing = self.failing.load(Ordering::SeqCst);
        if failing != 0 && set.applied.iter().any(|(p, _)| *p + 1 == failing) {
            self.refused.fetch_add(1, Ordering::SeqCst);
            return Err(StoreError::Engine(
                "injected failure: Input/output error (os error 5)".into(),
            ));
        }
        Ok(())
    }
}

type FailingStore = Faulty<FailingPartition>;

fn free_tcp_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A private etcd on free loopback ports, killed by PID when dropped.
struct Etcd {
    child: Child,
    endpoint: String,
}

impl Etcd {
    fn start(dir: &Path) -> Self {
        let binary = std::env::var("VOLNA_ETCD_BIN").unwrap_or_else(|_| "etcd".into());
        let client = format!("http://127.0.0.1:{}", free_tcp_port());
        let peer = format!("http://127.0.0.1:{}", free_tcp_port());
        let child = Command::new(&binary)
            .arg("--name=volna-failed-groups")
            .arg(format!("--data-dir={}", dir.join("etcd").display()))
            .arg(format!("--listen-client-urls={client}"))
            .arg(format!("--advertise-client-urls={client}"))
            .arg(format!("--listen-peer-urls={peer}"))
            .arg(format!("--initial-advertise-peer-urls={peer}"))
            .arg(format!("--initial-cluster=volna-failed-groups={peer}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start {binary}: {e} (scripts/prereqs.sh installs etcd-server)")
            });
        let etcd = Self {
            child,
            endpoint: client,
        };
        let health = format!("{}/health", etcd.endpoint);
        let started = Instant::now();
        while !ureq::get(&health)
            .call()
            .ok()
            .and_then(|mut r| r.body_mut().read_to_string().ok())
            .is_some_and(|b| b.contains("true"))
        {
            assert!(started.elapsed() < DEADLINE, "etcd did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        etcd
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

const ADMIN_TOKEN: &str = "failed-groups-admin-token";

/// Three nodes, each on its own data directory, every node's store behind
/// a [`FailingStore`].
struct Nodes {
    brokers: Vec<Broker>,
    stores: Vec<Arc<FailingStore>>,
    ca: std::path::PathBuf,
    _etcd: Etcd,
    _dir: TempDir,
}

impl Nodes {
    async fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let etcd = Etcd::start(dir.path());
        let authority = DevCa::generate().unwrap();
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, authority.cert_pem()).unwrap();
        let mut brokers = Vec::new();
        let mut stores = Vec::new();
        for id in 1..=3u64 {
            let issued = authority.issue(id, &["localhost", "127.0.0.1"]).unwrap();
            let cert = dir.path().join(format!("node-{id}.pem"));
            let key = dir.path().join(format!("node-{id}.key"));
            std::fs::write(&cert, issued.cert_pem).unwrap();
            std::fs::write(&key, issued.key_pem).unwrap();
            let mut config = Config {
                data_dir: dir.path().join(format!("node-{id}")),
                listen: "127.0.0.1:0".parse().unwrap(),
                http: "127.0.0.1:0".parse().unwrap(),
                ..Config::default()
            };
            config.tls.cert = Some(cert.clone());
            config.tls.key = Some(key.clone());
            config.admin.token = Some(ADMIN_TOKEN.into());
            config.cluster = Some(ClusterSection {
                node_id: id,
                name: "failed-groups".into(),
                etcd_endpoints: vec![etcd.endpoint.clone()],
                peer_listen: "127.0.0.1:0".parse().unwrap(),
                partitions: PARTITIONS,
                replicas: 3,
                election_timeout_ms: ELECTION_TIMEOUT.as_millis() as u64,
                heartbeat_ms: 100,
                lease_ttl_secs: 3,
                dead_node_grace_secs: 60,
                tls: ClusterTls {
                    ca: Some(ca.clone()),
                    cert: Some(cert),
                    key: Some(key),
                },
                ..ClusterSection::default()
            });
            let slot: Arc<Mutex<Option<Arc<FailingStore>>>> = Arc::default();
            let made = slot.clone();
            let broker = Broker::start_with_store_wrapper(config, move |inner| {
                let store = Arc::new(Faulty::new(inner, FailingPartition::default()));
                *made.lock().unwrap() = Some(store.clone());
                store
            })
            .await
            .unwrap();
            stores.push(slot.lock().unwrap().take().unwrap());
            brokers.push(broker);
        }
        let nodes = Self {
            brokers,
            stores,
            ca,
            _etcd: etcd,
            _dir: dir,
        };
        for id in 1..=3 {
            let started = Instant::now();
            while nodes.readyz(id).await.0 != 200 {
                assert!(started.elapsed() < DEADLINE, "node {id} never ready");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        nodes
    }

    fn broker(&self, id: u64) -> &Broker {
        &self.brokers[(id - 1) as usize]
    }

    /// Node `id`'s standing in `partition`'s group (`None`: not hosted).
    fn standing(&self, id: u64, partition: PartitionId) -> Option<Standing> {
        self.broker(id)
            .cluster()
            .unwrap()
            .peers()
            .standing(partition)
    }

    /// The node that leads `partition` with a live lease, if one does.
    fn leader(&self, partition: PartitionId) -> Option<u64> {
        (1..=3).find(|id| self.standing(*id, partition) == Some(Standing::Leader))
    }

    /// `GET /readyz` of node `id`: status and body.
    async fn readyz(&self, id: u64) -> (u16, String) {
        let url = format!("http://{}/readyz", self.broker(id).http_addr());
        tokio::task::spawn_blocking(move || {
            let agent: ureq::Agent = ureq::Agent::config_builder()
                .http_status_as_error(false)
                .build()
                .into();
            match agent.get(&url).call() {
                Ok(mut response) => (
                    response.status().as_u16(),
                    response.body_mut().read_to_string().unwrap_or_default(),
                ),
                Err(e) => (0, e.to_string()),
            }
        })
        .await
        .unwrap()
    }

    /// A client of node `id` only.
    async fn client(&self, id: u64) -> Client {
        let mut config = ClientConfig::new(
            self.broker(id).quic_addr().to_string(),
            "failed-groups",
            Trust::CaFile(self.ca.clone()),
        );
        config.request_timeout = Duration::from_secs(10);
        Client::connect(config).await.unwrap()
    }

    /// `partition`'s digest on node `id`: (applied index, sha256).
    async fn digest(&self, id: u64, partition: PartitionId) -> Option<(u64, String)> {
        let digest = self
            .broker(id)
            .cluster()?
            .status_source()
            .digest(partition.0)
            .await
            .ok()?;
        Some((
            digest["applied"]["index"].as_u64()?,
            digest["sha256"].as_str()?.to_owned(),
        ))
    }

    async fn shutdown(self) {
        for broker in self.brokers {
            broker.shutdown().await;
        }
    }
}

/// Publishes `payload` through `client`, bounded: the outcome and how long
/// it took.
async fn publish(
    client: &Client,
    channel: &ChannelName,
    payload: String,
) -> (Result<u64, ClientError>, Duration) {
    let started = Instant::now();
    let outcome = tokio::time::timeout(DEADLINE, client.publish(channel, payload.into_bytes()))
        .await
        .unwrap_or_else(|_| panic!("a publish hung for {DEADLINE:?}"));
    (outcome.map(|ack| ack.offset.get()), started.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_whose_store_fails_stops_leading_and_comes_back_from_its_store() {
    let nodes = Nodes::start().await;
    let channel = ChannelName::new("chat.failing").unwrap();
    let partition = partition_of(channel.as_str(), PARTITIONS);
    let started = Instant::now();
    let failing = loop {
        if let Some(leader) = nodes.leader(partition) {
            break leader;
        }
        assert!(started.elapsed() < DEADLINE, "the partition has no leader");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let other = if failing == 1 { 2 } else { 1 };
    let client = nodes.client(failing).await;
    let mut acked: BTreeMap<u64, String> = BTreeMap::new();
    let mut sent = 0u32;
    let mut next_payload = || {
        sent += 1;
        format!("m-{sent}")
    };
    for _ in 0..20 {
        let payload = next_payload();
        let (offset, _) = publish(&client, &channel, payload.clone()).await;
        acked.insert(offset.unwrap(), payload);
    }

    // The disk under node `failing`'s copy of the partition fails.
    nodes.stores[(failing - 1) as usize]
        .fault
        .fail_partition(Some(partition.0));
    let faulted = Instant::now();

    // Publishes through the failing node are answered, not left hanging:
    // the other replicas elect a leader and take them, or the node says
    // it could not (a typed error the client may retry).
    let mut served_after_fault = 0;
    let mut refusals = Vec::new();
    while served_after_fault < 20 {
        assert!(
            faulted.elapsed() < DEADLINE,
            "no publish through node {failing} was served after its store failed: {refusals:?}"
        );
        let payload = next_payload();
        let (outcome, took) = publish(&client, &channel, payload.clone()).await;
        assert!(
            took < ELECTION_TIMEOUT * 2 + Duration::from_secs(3),
            "a publish took {took:?}"
        );
        match outcome {
            Ok(offset) => {
                assert!(
                    acked.insert(offset, payload).is_none(),
                    "offset {offset} acknowledged twice"
                );
                served_after_fault += 1;
            }
            Err(e) => {
                assert!(e.is_retryable(), "a final error for a failed replica: {e}");
                refusals.push(e.to_string());
            }
        }
    }
    eprintln!(
        "served {served_after_fault} publishes through node {failing} after its store failed \
         ({} refused meanwhile: {refusals:?})",
        refusals.len()
    );
    assert!(
        nodes.stores[(failing - 1) as usize]
            .fault
            .refused
            .load(Ordering::SeqCst)
            > 0,
        "the injected fault was never hit"
    );

    // Node `failing` no longer acts as the partition's leader while its
    // store fails, and `/readyz` names the partition.
    let named = format!("the storage of partitions [{}] failed", partition.0);
    let answer = loop {
        let answer = nodes.readyz(failing).await;
        if answer.0 == 503 && answer.1.contains(&named) {
            break answer;
        }
        assert!(
            faulted.elapsed() < DEADLINE,
            "/readyz never named the failed partition: {answer:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    eprintln!("node {failing} /readyz: {answer:?}");
    let watched = Instant::now();
    while watched.elapsed() < ELECTION_TIMEOUT * 3 {
        assert_ne!(
            nodes.standing(failing, partition),
            Some(Standing::Leader),
            "node {failing} leads the partition while its store fails"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        nodes.leader(partition).is_some_and(|l| l != failing),
        "another replica leads the partition"
    );

    // The disk heals: the group comes back from the store, catches up and
    // the node is ready again.
    nodes.stores[(failing - 1) as usize]
        .fault
        .fail_partition(None);
    let healed = Instant::now();
    loop {
        let answer = nodes.readyz(failing).await;
        if answer.0 == 200 {
            break;
        }
        assert!(
            healed.elapsed() < DEADLINE,
            "node {failing} not ready after its store healed: {answer:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for _ in 0..10 {
        let payload = next_payload();
        let (offset, _) = publish(&client, &channel, payload.clone()).await;
        acked.insert(offset.unwrap(), payload);
    }
    let agreed = loop {
        let mut digests = BTreeSet::new();
        for id in 1..=3 {
            digests.insert(nodes.digest(id, partition).await);
        }
        if digests.len() == 1
            && let Some(Some(agreed)) = digests.pop_first()
        {
            break agreed;
        }
        assert!(
            healed.elapsed() < DEADLINE,
            "replicas of the partition differ: {digests:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    eprintln!(
        "replicas agree {:?} after the store healed: {agreed:?}",
        healed.elapsed()
    );
    assert!(
        matches!(
            nodes.standing(failing, partition),
            Some(Standing::Leader | Standing::Follower(_))
        ),
        "the restarted group takes part again"
    );

    // Nothing acknowledged is lost and nothing is stored twice, read from
    // the node whose store failed and from another.
    let last = *acked.keys().next_back().unwrap();
    for id in [failing, other] {
        let reader = nodes.client(id).await;
        let mut sub = reader.subscribe(&channel, Position::FIRST).await.unwrap();
        let mut delivered: Vec<(u64, String)> = Vec::new();
        common::within("reading the channel back", async {
            while delivered.last().is_none_or(|(offset, _)| *offset < last) {
                let message = sub.next().await.expect("stream open").expect("a message");
                delivered.push((
                    message.offset.get(),
                    String::from_utf8(message.payload.to_vec()).unwrap(),
                ));
            }
        })
        .await;
        let offsets: Vec<u64> = delivered.iter().map(|(o, _)| *o).collect();
        assert_eq!(
            offsets,
            (1..=last).collect::<Vec<_>>(),
            "node {id}: gapless"
        );
        let mut seen = BTreeSet::new();
        for (offset, payload) in &delivered {
            assert!(
                seen.insert(payload.clone()),
                "node {id}: {payload} stored twice (again at {offset})"
            );
            if let Some(expected) = acked.get(offset) {
                assert_eq!(payload, expected, "node {id}: offset {offset}");
            }
        }
        for (offset, payload) in &acked {
            assert_eq!(
                delivered.get((*offset - 1) as usize).map(|(_, p)| p),
                Some(payload),
                "node {id}: acknowledged {payload} at {offset} lost"
            );
        }
        common::assert_no_duplicates(&reader);
    }
    nodes.shutdown().await;
}
