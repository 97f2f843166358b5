//! The control plane against a real etcd, which each test starts (and
//! stops, by PID) on loopback ports of its own.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;
use tokio_util::sync::CancellationToken;
use volna_cluster::{ClusterConfig, Control, ControlError, NodeInfo, PartitionMap};

/// A private etcd server; killed when dropped.
struct Etcd {
    child: Child,
    endpoint: String,
    _dir: TempDir,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Etcd {
    async fn start() -> Self {
        let binary = std::env::var("VOLNA_ETCD_BIN").unwrap_or_else(|_| "etcd".into());
        let dir = tempfile::tempdir().unwrap();
        let (client, peer) = (free_port(), free_port());
        let client_url = format!("http://127.0.0.1:{client}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let log = std::fs::File::create(dir.path().join("etcd.log")).unwrap();
        let child = Command::new(&binary)
            .arg("--name=volna-test")
            .arg(format!("--data-dir={}", dir.path().join("data").display()))
            .arg(format!("--listen-client-urls={client_url}"))
            .arg(format!("--advertise-client-urls={client_url}"))
            .arg(format!("--listen-peer-urls={peer_url}"))
            .arg(format!("--initial-advertise-peer-urls={peer_url}"))
            .arg(format!("--initial-cluster=volna-test={peer_url}"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start {binary}: {e} (scripts/prereqs.sh installs etcd-server)")
            });
        let etcd = Self {
            child,
            endpoint: client_url,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(mut client) = etcd_client::Client::connect([&etcd.endpoint], None).await
                && client.status().await.is_ok()
            {
                return etcd;
            }
            assert!(Instant::now() < deadline, "etcd did not start");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn control(&self, cluster: &str) -> Control {
        let client = etcd_client::Client::connect([&self.endpoint], None)
            .await
            .unwrap();
        Control::new(client, cluster)
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn node(id: u64) -> NodeInfo {
    NodeInfo {
        id,
        quic: format!("127.0.0.1:{}", 7400 + id),
        peer: format!("127.0.0.1:{}", 7500 + id),
        log_format: volna_cluster::raft::LOG_FORMAT,
        peer_protocol: volna_cluster::raft::network::PEER_PROTOCOL,
    }
}

const CONFIG: ClusterConfig = ClusterConfig {
    partitions: 16,
    replicas: 3,
};

fn check(map: &PartitionMap, live: &[u64]) {
    let live: BTreeSet<u64> = live.iter().copied().collect();
    assert_eq!(map.replicas.len(), 16);
    for set in &map.replicas {
        assert_eq!(set.len(), 3.min(live.len()), "{map:?}");
        assert!(set.iter().all(|n| live.contains(n)), "{map:?}");
        assert_eq!(set.iter().collect::<BTreeSet<_>>().len(), set.len());
    }
}

async fn eventually_map(control: &Control, live: &[u64]) -> PartitionMap {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(map) = control.map().await.unwrap() {
            let nodes: BTreeSet<u64> = map.replicas.iter().flatten().copied().collect();
            if nodes == live.iter().copied().collect() {
                check(&map, live);
                return map;
            }
        }
        assert!(Instant::now() < deadline, "the map never covered {live:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_node_fixes_the_settings_later_ones_adopt_them() {
    let etcd = Etcd::start().await;
    let control = etcd.control("settings").await;
    assert_eq!(control.settle_config(CONFIG).await.unwrap(), CONFIG);
    let other = ClusterConfig {
        partitions: 64,
        replicas: 5,
    };
    assert_eq!(control.settle_config(other).await.unwrap(), CONFIG);
    // Another cluster in the same etcd is apart.
    let apart = etcd.control("elsewhere").await;
    assert_eq!(apart.settle_config(other).await.unwrap(), other);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_placer_follows_membership_and_a_deposed_placer_cannot_write() {
    let etcd = Etcd::start().await;
    let control = etcd.control("volna").await;
    let ttl = Duration::from_secs(2);
    let mut members = Vec::new();
    for id in 1..=4 {
        members.push(control.join(&node(id), ttl).await.unwrap());
    }
    assert_eq!(
        control
            .nodes()
            .await
            .unwrap()
            .into_keys()
            .collect::<Vec<_>>(),
        [1, 2, 3, 4]
    );

    // Node 1 places; its loop follows membership changes.
    let placer = control.campaign(&members[0], 1).await.unwrap();
    let stop = CancellationToken::new();
    let running = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let result = placer
                .run(CONFIG, usize::MAX, Duration::from_millis(200), stop)
                .await;
            (placer, result)
        })
    };
    let first = eventually_map(&control, &[1, 2, 3, 4]).await;

    // Node 4 stops renewing its lease (a crash): its key expires and its
    // replicas move to the others; partitions without it stay as they were.
    let lost = members.pop().unwrap();
    drop(lost);
    let after = eventually_map(&control, &[1, 2, 3]).await;
    assert!(after.version > first.version);
    for (before, now) in first.replicas.iter().zip(&after.replicas) {
        if !before.contains(&4) {
            assert_eq!(before, now, "a partition without node 4 moved");
        }
    }

    // The placer's node leaves: node 2 wins the election; the old placer's
    // writes are refused, whatever it believes.
    stop.cancel();
    let (old_placer, result) = running.await.unwrap();
    result.unwrap();
    let first_member = members.remove(0);
    first_member.leave().await.unwrap();
    let successor = control.campaign(&members[0], 2).await.unwrap();
    let stale = PartitionMap {
        version: after.version + 100,
        replicas: vec![vec![1]; 16],
    };
    assert!(matches!(
        old_placer.write_map(&stale).await,
        Err(ControlError::Fenced)
    ));
    let map = successor.rebalance(CONFIG, usize::MAX).await.unwrap();
    check(&map, &[2, 3]);
    assert_eq!(control.map().await.unwrap(), Some(map));
}
