//! Upstream subscriptions between two real peer endpoints (loopback QUIC,
//! mutual TLS): many share one upstream link, each in order; credit keeps
//! a stalled one from holding up the others; a closed one stops its
//! service; and the stream-per-upstream of nodes from before links still
//! works both ways.

#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use volna_cluster::PartitionId;
use volna_cluster::raft::network::{BoxFuture, ChannelService, FollowSink, FollowStream, Peers};
use volna_cluster::raft::upstreams::WINDOW;
use volna_cluster::tls::{DevCa, PeerTls};

/// What the test service streams for an upstream: `chunks` chunks of
/// `size` bytes, chunk `i` filled with `i as u8`, then the end.
#[derive(Debug, Serialize, Deserialize)]
struct Ask {
    name: u32,
    chunks: u32,
    size: u32,
}

/// Per upstream name: bytes written so far, and whether its service saw
/// the follower stop.
#[derive(Debug, Default)]
struct Served {
    written: HashMap<u32, usize>,
    stopped: HashMap<u32, bool>,
}

#[derive(Debug, Default, Clone)]
struct TestService(Arc<Mutex<Served>>);

impl ChannelService for TestService {
    fn read(&self, _: PartitionId, _: Vec<u8>) -> BoxFuture<Vec<u8>> {
        Box::pin(async { Vec::new() })
    }

    fn follow(&self, _: PartitionId, body: Vec<u8>, mut out: FollowSink) -> BoxFuture<()> {
        let served = self.0.clone();
        Box::pin(async move {
            let ask: Ask = postcard::from_bytes(&body).unwrap();
            let stopped = out.stopped();
            let write = async {
                for i in 0..ask.chunks {
                    let chunk = Bytes::from(vec![i as u8; ask.size as usize]);
                    if out.write(chunk).await.is_err() {
                        return;
                    }
                    *served.lock().unwrap().written.entry(ask.name).or_default() +=
                        ask.size as usize;
                }
                out.finish();
                // Serving ends when the follower goes, as a leader's does.
                std::future::pending::<()>().await;
            };
            tokio::select! {
                () = write => {}
                () = stopped => {}
            }
            served.lock().unwrap().stopped.insert(ask.name, true);
        })
    }

    fn publish(&self, _: PartitionId, _: Vec<u8>) -> BoxFuture<Vec<u8>> {
        Box::pin(async { Vec::new() })
    }

    fn devices(&self, _: PartitionId, _: Vec<u8>) -> BoxFuture<Vec<u8>> {
        Box::pin(async { Vec::new() })
    }
}

/// Node 1 serving the test service, node 2 following it.
fn pair() -> (Arc<Peers>, Arc<Peers>, TestService, String) {
    let ca = DevCa::generate().unwrap();
    let bind = |id: u64| {
        let cert = ca.issue_peer(id).unwrap();
        let tls = PeerTls::from_pem(
            ca.cert_pem().as_bytes(),
            cert.cert_pem.as_bytes(),
            cert.key_pem.as_bytes(),
        )
        .unwrap();
        Peers::bind(id, "127.0.0.1:0".parse().unwrap(), tls).unwrap()
    };
    let (leader, edge) = (bind(1), bind(2));
    let service = TestService::default();
    leader.serve_channels(Arc::new(service.clone()));
    let addr = leader.local_addr().unwrap().to_string();
    (leader, edge, service, addr)
}

fn ask(name: u32, chunks: u32, size: u32) -> Vec<u8> {
    postcard::to_allocvec(&Ask { name, chunks, size }).unwrap()
}

/// Reads `stream` to its end, checking every chunk's bytes.
async fn read_to_end(stream: &mut FollowStream, chunks: u32, size: u32) {
    let mut got = Vec::new();
    while let Some(bytes) = stream.read(64 * 1024).await.unwrap() {
        got.extend_from_slice(&bytes);
    }
    let want: Vec<u8> = (0..chunks)
        .flat_map(|i| std::iter::repeat_n(i as u8, size as usize))
        .collect();
    assert_eq!(got.len(), want.len());
    assert!(got == want, "an upstream's bytes arrive whole and in order");
}

async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !check() {
        assert!(tokio::time::Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn more_upstreams_than_a_connection_has_streams_share_one_link_each_in_order() {
    const UPSTREAMS: u32 = 5_000;
    let (leader, edge, _, addr) = pair();
    let mut streams = Vec::new();
    for name in 0..UPSTREAMS {
        streams.push(
            edge.follow(1, &addr, PartitionId(name % 8), &ask(name, 3, 100))
                .await
                .unwrap(),
        );
    }
    for stream in &mut streams {
        read_to_end(stream, 3, 100).await;
    }
    // Calls still get through the same connection meanwhile.
    let answer = edge
        .read(1, &addr, PartitionId(0), b"", Duration::from_secs(5))
        .await;
    assert!(answer.is_ok(), "{answer:?}");
    edge.close();
    leader.close();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_nobody_reads_holds_up_only_itself() {
    let (leader, edge, service, addr) = pair();
    // 8 MiB asked and never read: the leader stops at the credit.
    let _stalled = edge
        .follow(1, &addr, PartitionId(0), &ask(1, 128, 64 * 1024))
        .await
        .unwrap();
    let mut other = edge
        .follow(1, &addr, PartitionId(1), &ask(2, 64, 16 * 1024))
        .await
        .unwrap();
    read_to_end(&mut other, 64, 16 * 1024).await;
    let written = |name| {
        service
            .0
            .lock()
            .unwrap()
            .written
            .get(&name)
            .copied()
            .unwrap_or(0)
    };
    eventually("the stalled upstream was served up to its credit", || {
        written(1) >= WINDOW as usize
    })
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        written(1) <= WINDOW as usize + 64 * 1024,
        "the leader sent {} bytes of an upstream nobody read, past its credit",
        written(1)
    );
    edge.close();
    leader.close();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_dropped_by_its_edge_stops_on_the_leader_and_the_link_goes_on() {
    let (leader, edge, service, addr) = pair();
    let mut first = edge
        .follow(1, &addr, PartitionId(0), &ask(1, 1_000, 64 * 1024))
        .await
        .unwrap();
    assert!(first.read(1024).await.unwrap().is_some());
    drop(first);
    eventually("the leader's service saw its follower go", || {
        service.0.lock().unwrap().stopped.get(&1) == Some(&true)
    })
    .await;
    let mut second = edge
        .follow(1, &addr, PartitionId(0), &ask(2, 4, 1000))
        .await
        .unwrap();
    read_to_end(&mut second, 4, 1000).await;
    edge.close();
    leader.close();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_older_nodes_stream_per_upstream_is_still_served() {
    let (leader, edge, _, addr) = pair();
    let mut stream = edge
        .follow_on_stream(1, &addr, PartitionId(2), &ask(1, 5, 3000))
        .await
        .unwrap();
    read_to_end(&mut stream, 5, 3000).await;
    edge.close();
    leader.close();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_larger_than_the_credit_arrive_whole_in_pieces() {
    let (leader, edge, _, addr) = pair();
    let mut stream = edge
        .follow(1, &addr, PartitionId(0), &ask(1, 6, 1 << 20))
        .await
        .unwrap();
    // Read slowly: the leader waits on credit between pieces.
    let mut got = Vec::new();
    loop {
        tokio::time::sleep(Duration::from_millis(2)).await;
        match stream.read(48 * 1024).await.unwrap() {
            Some(bytes) => got.extend_from_slice(&bytes),
            None => break,
        }
    }
    let want: Vec<u8> = (0..6u8)
        .flat_map(|i| std::iter::repeat_n(i, 1 << 20))
        .collect();
    assert!(got == want, "6 MiB written in 1 MiB writes arrive whole");
    edge.close();
    leader.close();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn followers_of_an_unreachable_peer_fail_fast_together() {
    let (_, edge, _, _) = pair();
    // A UDP port that takes datagrams and never answers a handshake.
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = silent.local_addr().unwrap().to_string();
    let started = tokio::time::Instant::now();
    let attempts: Vec<_> = (0..40)
        .map(|i| {
            let (edge, addr) = (edge.clone(), addr.clone());
            tokio::spawn(async move {
                edge.follow(9, &addr, PartitionId(i % 8), &ask(i, 1, 1))
                    .await
                    .is_err()
            })
        })
        .collect();
    for attempt in attempts {
        assert!(attempt.await.unwrap(), "a silent peer gave an upstream");
    }
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(3),
        "40 followers of a silent peer took {took:?}: they queued behind each other's dials"
    );
    edge.close();
}
