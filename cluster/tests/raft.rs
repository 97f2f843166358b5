//! Partition groups over the real inter-node transport: openraft's storage
//! suite against the RocksDB log store, and three nodes on loopback QUIC
//! with mutual TLS, each with its own RocksDB directory, replicating a
//! partition through a leader's death.
//!
//! The state machine here is a minimal sequencer (per-channel offsets
//! assigned at apply), enough to check what the transport and the log store
//! must keep: every replica applies the same commands in the same order.
//!
//! Also: Raft's votes and entries are synced before they count, whatever
//! the node's durability (the log store reports each write's sync flag),
//! and a peer acts only as the node its certificate names, in the groups
//! it is a member of.

#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{AppendEntriesRequest, VoteRequest};
use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::testing::{StoreBuilder, Suite};
use openraft::{
    CommittedLeaderId, Config, Entry, EntryPayload, LogId, RaftSnapshotBuilder, SnapshotMeta,
    StorageError, StorageIOError, StoredMembership, Vote,
};
use serde::{Deserialize, Serialize};
use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};
use volna_cluster::PartitionId;
use volna_cluster::raft::log_store::{LogStore, RaftWrite, RaftWriteKind, column_families};
use volna_cluster::raft::network::Peers;
use volna_cluster::raft::snapshot_data::SnapshotData;
use volna_cluster::raft::{BasicNode, Command, Outcome, Publish, Raft, Reply, TypeConfig};
use volna_cluster::tls::{DevCa, IssuedCert, PeerTls};

type Error = StorageError<u64>;

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Offsets {
    last_applied: Option<LogId<u64>>,
    membership: StoredMembership<u64, BasicNode>,
    /// Next offset per channel.
    next: BTreeMap<String, u64>,
    /// Every stored (channel, offset, payload), in apply order.
    history: Vec<(String, u64, Vec<u8>)>,
}

/// The last snapshot built or installed, with its bytes.
type StoredSnapshot = (SnapshotMeta<u64, BasicNode>, Vec<u8>);

#[derive(Debug, Clone, Default)]
struct Sequencer {
    state: Arc<Mutex<Offsets>>,
    snapshot: Arc<Mutex<Option<StoredSnapshot>>>,
}

impl Sequencer {
    fn history(&self) -> Vec<(String, u64, Vec<u8>)> {
        self.state.lock().unwrap().history.clone()
    }
}

/// A snapshot's bytes as the file openraft streams.
async fn snapshot_file(data: &[u8]) -> Box<SnapshotData> {
    let mut file = tokio::fs::File::from_std(tempfile::tempfile().unwrap());
    file.write_all(data).await.unwrap();
    file.rewind().await.unwrap();
    Box::new(SnapshotData::File(file))
}

impl RaftSnapshotBuilder<TypeConfig> for Sequencer {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, Error> {
        let state = self.state.lock().unwrap().clone();
        let data = postcard::to_allocvec(&state).map_err(|e| StorageIOError::write(&e))?;
        let meta = SnapshotMeta {
            last_log_id: state.last_applied,
            last_membership: state.membership.clone(),
            snapshot_id: format!("{:?}", state.last_applied),
        };
        *self.snapshot.lock().unwrap() = Some((meta.clone(), data.clone()));
        Ok(Snapshot {
            meta,
            snapshot: snapshot_file(&data).await,
        })
    }
}

impl RaftStateMachine<TypeConfig> for Sequencer {
    type SnapshotBuilder = Self;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId<u64>>, StoredMembership<u64, BasicNode>), Error> {
        let state = self.state.lock().unwrap();
        Ok((state.last_applied, state.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Reply>, Error>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + Send,
        I::IntoIter: Send,
    {
        let mut state = self.state.lock().unwrap();
        let mut replies = Vec::new();
        for entry in entries {
            state.last_applied = Some(entry.log_id);
            let mut reply = Reply::default();
            match entry.payload {
                EntryPayload::Blank => {}
                EntryPayload::Membership(m) => {
                    state.membership = StoredMembership::new(Some(entry.log_id), m);
                }
                EntryPayload::Normal(Command::Append { publishes, .. }) => {
                    for p in publishes {
                        let next = state.next.entry(p.channel.clone()).or_insert(1);
                        let offset = *next;
                        *next += 1;
                        state.history.push((p.channel, offset, p.payload.to_vec()));
                        reply.outcomes.push(Outcome::Stored {
                            offset,
                            epoch: 1,
                            duplicate: false,
                        });
                    }
                }
                EntryPayload::Normal(_) => {}
            }
            replies.push(reply);
        }
        Ok(replies)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<SnapshotData>, Error> {
        Ok(snapshot_file(&[]).await)
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<u64, BasicNode>,
        mut snapshot: Box<SnapshotData>,
    ) -> Result<(), Error> {
        let mut data = Vec::new();
        snapshot
            .rewind()
            .await
            .map_err(|e| StorageIOError::read(&e))?;
        snapshot
            .read_to_end(&mut data)
            .await
            .map_err(|e| StorageIOError::read(&e))?;
        let state: Offsets = postcard::from_bytes(&data).map_err(|e| StorageIOError::read(&e))?;
        *self.state.lock().unwrap() = state;
        *self.snapshot.lock().unwrap() = Some((meta.clone(), data));
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, Error> {
        let stored = self.snapshot.lock().unwrap().clone();
        Ok(match stored {
            Some((meta, data)) => Some(Snapshot {
                meta,
                snapshot: snapshot_file(&data).await,
            }),
            None => None,
        })
    }
}

fn open_db(dir: &std::path::Path) -> Arc<rocksdb::DB> {
    let mut options = rocksdb::Options::default();
    options.create_if_missing(true);
    options.create_missing_column_families(true);
    Arc::new(rocksdb::DB::open_cf_descriptors(&options, dir, column_families()).unwrap())
}

struct Builder;

impl StoreBuilder<TypeConfig, LogStore, Sequencer, TempDir> for Builder {
    async fn build(&self) -> Result<(TempDir, LogStore, Sequencer), Error> {
        let dir = tempfile::tempdir().unwrap();
        let db = open_db(dir.path());
        // Partition 7, with partitions 6 and 8 holding entries of their own
        // around it: the store must keep to its own key range.
        for neighbour in [6, 8] {
            let mut other = LogStore::new(db.clone(), PartitionId(neighbour), false);
            openraft::storage::RaftLogStorage::save_vote(
                &mut other,
                &openraft::Vote::new(9, neighbour.into()),
            )
            .await?;
            let entries: Vec<Entry<TypeConfig>> = (0..30)
                .map(|i| Entry {
                    log_id: LogId::new(openraft::CommittedLeaderId::new(9, 1), i),
                    payload: EntryPayload::Blank,
                })
                .collect();
            openraft::storage::RaftLogStorageExt::blocking_append(&mut other, entries).await?;
        }
        Ok((
            dir,
            LogStore::new(db, PartitionId(7), false),
            Sequencer::default(),
        ))
    }
}

#[test]
fn the_rocksdb_log_store_passes_openraft_storage_suite() {
    Suite::test_all(Builder).unwrap();
}

/// One node of the test cluster.
struct Node {
    id: u64,
    raft: Raft,
    peers: Arc<Peers>,
    machine: Sequencer,
    /// Every write of its Raft state, in order.
    writes: Arc<Mutex<Vec<RaftWrite>>>,
    _dir: TempDir,
}

fn raft_config() -> Arc<Config> {
    Arc::new(
        Config {
            cluster_name: "volna-test".into(),
            heartbeat_interval: 100,
            election_timeout_min: 400,
            election_timeout_max: 800,
            ..Default::default()
        }
        .validate()
        .unwrap(),
    )
}

/// A peer endpoint for node `id` presenting `cert`, trusting `ca`.
fn bind(id: u64, ca: &DevCa, cert: &IssuedCert) -> Arc<Peers> {
    let tls = PeerTls::from_pem(
        ca.cert_pem().as_bytes(),
        cert.cert_pem.as_bytes(),
        cert.key_pem.as_bytes(),
    )
    .unwrap();
    Peers::bind(id, "127.0.0.1:0".parse().unwrap(), tls).unwrap()
}

/// Node `id` hosting partition 3, its Raft log in a RocksDB of its own
/// with `durability = "wal"` (no sync asked for).
async fn start_node(id: u64, ca: &DevCa) -> Node {
    let peers = bind(id, ca, &ca.issue_peer(id).unwrap());
    let dir = tempfile::tempdir().unwrap();
    let db = open_db(dir.path());
    let partition = PartitionId(3);
    let machine = Sequencer::default();
    let writes = Arc::new(Mutex::new(Vec::new()));
    let recorded = writes.clone();
    let store = LogStore::new(db, partition, false).observe_writes(Arc::new(move |write| {
        recorded.lock().unwrap().push(write.clone());
    }));
    let raft = Raft::new(
        id,
        raft_config(),
        peers.network(partition),
        store,
        machine.clone(),
    )
    .await
    .unwrap();
    peers.host(partition, raft.clone());
    Node {
        id,
        raft,
        peers,
        machine,
        writes,
        _dir: dir,
    }
}

/// Three nodes in one group of partition 3, with a leader.
async fn start_group(ca: &DevCa) -> (Vec<Node>, u64) {
    let mut nodes = Vec::new();
    for id in 1..=3 {
        nodes.push(start_node(id, ca).await);
    }
    let members: BTreeMap<u64, BasicNode> = nodes
        .iter()
        .map(|n| (n.id, BasicNode::new(n.peers.local_addr().unwrap())))
        .collect();
    nodes[0].raft.initialize(members).await.unwrap();
    let all: Vec<&Node> = nodes.iter().collect();
    let leader = leader_of(&all, Duration::from_secs(10)).await;
    (nodes, leader)
}

async fn stop(nodes: Vec<Node>) {
    for node in nodes {
        node.raft.shutdown().await.unwrap();
        node.peers.close();
    }
}

fn append(payload: String) -> Command {
    Command::Append {
        now_ms: 0,
        epoch_seed: 0,
        publishes: vec![Publish {
            channel: "chat.1".into(),
            producer: None,
            payload: payload.into_bytes().into(),
        }],
    }
}

async fn leader_of(nodes: &[&Node], timeout: Duration) -> u64 {
    let deadline = Instant::now() + timeout;
    loop {
        for node in nodes {
            if node.raft.current_leader().await == Some(node.id) {
                return node.id;
            }
        }
        assert!(Instant::now() < deadline, "no leader within {timeout:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_replicate_a_partition_over_mutual_tls_quic_through_a_leader_death() {
    let ca = DevCa::generate().unwrap();
    let mut nodes = Vec::new();
    for id in 1..=3 {
        nodes.push(start_node(id, &ca).await);
    }
    let members: BTreeMap<u64, BasicNode> = nodes
        .iter()
        .map(|n| (n.id, BasicNode::new(n.peers.local_addr().unwrap())))
        .collect();
    nodes[0].raft.initialize(members).await.unwrap();

    let all: Vec<&Node> = nodes.iter().collect();
    let first = leader_of(&all, Duration::from_secs(10)).await;
    let leader = nodes.iter().find(|n| n.id == first).unwrap();
    for i in 0..200 {
        let reply = leader
            .raft
            .client_write(append(format!("m{i}")))
            .await
            .unwrap();
        assert_eq!(
            reply.data.outcomes,
            vec![Outcome::Stored {
                offset: i + 1,
                epoch: 1,
                duplicate: false
            }]
        );
    }
    assert!(
        leader
            .peers
            .stats()
            .bytes_sent
            .load(std::sync::atomic::Ordering::Relaxed)
            > 0
    );

    // The leader dies: its peers' links break, a survivor takes over and
    // offsets go on from where they were, none reused, none skipped.
    let dead = nodes.iter().position(|n| n.id == first).unwrap();
    let dead = nodes.remove(dead);
    dead.peers.close();
    dead.raft.shutdown().await.unwrap();
    let survivors: Vec<&Node> = nodes.iter().collect();
    let died_at = Instant::now();
    let second = leader_of(&survivors, Duration::from_secs(10)).await;
    assert_ne!(second, first);
    let leader = nodes.iter().find(|n| n.id == second).unwrap();
    let reply = leader
        .raft
        .client_write(append("after".into()))
        .await
        .unwrap();
    eprintln!(
        "failover: first ack {:?} after the leader's death",
        died_at.elapsed()
    );
    assert_eq!(
        reply.data.outcomes,
        vec![Outcome::Stored {
            offset: 201,
            epoch: 1,
            duplicate: false
        }]
    );

    // Both survivors applied the same history.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let histories: BTreeSet<_> = nodes.iter().map(|n| n.machine.history()).collect();
        if histories.len() == 1 && histories.iter().next().unwrap().len() == 201 {
            let history = histories.into_iter().next().unwrap();
            let offsets: Vec<u64> = history.iter().map(|(_, o, _)| *o).collect();
            assert_eq!(offsets, (1..=201).collect::<Vec<_>>());
            break;
        }
        assert!(Instant::now() < deadline, "replicas disagree");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for node in nodes {
        node.raft.shutdown().await.unwrap();
        node.peers.close();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_without_a_certificate_from_the_cluster_ca_is_refused() {
    let ca = DevCa::generate().unwrap();
    let node = start_node(1, &ca).await;
    node.raft
        .initialize(BTreeMap::from([(
            1,
            BasicNode::new(node.peers.local_addr().unwrap()),
        )]))
        .await
        .unwrap();
    leader_of(&[&node], Duration::from_secs(10)).await;

    // The rogue trusts the cluster CA (so it accepts the node), but its
    // own certificate comes from another CA: only the node's check of
    // client certificates stands in its way.
    let rogue_ca = DevCa::generate().unwrap();
    let issued = rogue_ca.issue(9, &["localhost"]).unwrap();
    let rogue_tls = PeerTls::from_pem(
        ca.cert_pem().as_bytes(),
        issued.cert_pem.as_bytes(),
        issued.key_pem.as_bytes(),
    )
    .unwrap();
    let rogue = Peers::bind(9, "127.0.0.1:0".parse().unwrap(), rogue_tls).unwrap();
    let target = vec![(1, BasicNode::new(node.peers.local_addr().unwrap()))];
    let refused = rogue
        .propose(
            PartitionId(3),
            &append("forged".into()),
            &target,
            Duration::from_secs(2),
        )
        .await;
    // TLS 1.3 completes the dialer's side before the node checks the
    // client certificate: the rogue sees its link dropped, whatever it
    // makes of that.
    assert!(
        refused.is_err(),
        "a rogue peer's proposal was committed: {refused:?}"
    );
    // Nothing was appended beyond the group's own entries.
    let applied = node.machine.history();
    assert!(applied.is_empty(), "{applied:?}");
    rogue.close();
    node.raft.shutdown().await.unwrap();
    node.peers.close();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_vote_and_acknowledged_entry_is_synced_whatever_the_durability() {
    let ca = DevCa::generate().unwrap();
    // Every node's log store is made with `sync = false`: the node's
    // durability is `wal`.
    let (nodes, leader) = start_group(&ca).await;
    let leader = nodes.iter().find(|n| n.id == leader).unwrap();
    for i in 0..30 {
        let written = leader
            .raft
            .client_write(append(format!("m{i}")))
            .await
            .unwrap();
        // Acknowledged: a quorum stored the entry, synced, before the
        // leader counted it (each store reports a write before openraft
        // hears it is done).
        let synced_on = nodes
            .iter()
            .filter(|n| {
                n.writes.lock().unwrap().iter().any(|w| {
                    w.sync
                        && matches!(&w.kind, RaftWriteKind::Entries(ids) if ids.contains(&written.log_id))
                })
            })
            .count();
        assert!(
            synced_on >= 2,
            "entry {} acknowledged with {synced_on} synced copies",
            written.log_id
        );
    }
    let mut votes = 0;
    for node in &nodes {
        for write in node.writes.lock().unwrap().iter() {
            match &write.kind {
                RaftWriteKind::Vote(vote) => {
                    votes += 1;
                    assert!(write.sync, "node {} saved {vote} unsynced", node.id);
                }
                RaftWriteKind::Entries(ids) => {
                    assert!(write.sync, "node {} appended {ids:?} unsynced", node.id);
                }
                _ => {}
            }
        }
    }
    assert!(votes >= 3, "an election saves votes on every node: {votes}");
    stop(nodes).await;
}

/// `node`'s current vote.
fn vote_of(node: &Node) -> Vote<u64> {
    node.raft.metrics().borrow().vote
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_twos_certificate_cannot_vote_lead_or_propose_as_node_three() {
    let ca = DevCa::generate().unwrap();
    let (nodes, leader) = start_group(&ca).await;
    let partition = PartitionId(3);
    let address = |id: u64| {
        let node = nodes.iter().find(|n| n.id == id).unwrap();
        BasicNode::new(node.peers.local_addr().unwrap())
    };
    let follower = nodes.iter().find(|n| n.id != leader && n.id != 3).unwrap();
    let before = vote_of(follower);
    let term = before.leader_id.term;

    // Node 2's key, configured as node 3: every call it sends says node 3.
    let impostor = bind(3, &ca, &ca.issue_peer(2).unwrap());
    let option = RPCOption::new(Duration::from_secs(1));
    let mut to_follower = impostor
        .network(partition)
        .new_client(follower.id, &address(follower.id))
        .await;
    // A leader's heartbeat in a later term, as node 3.
    let lead = to_follower
        .append_entries(
            AppendEntriesRequest {
                vote: Vote::new_committed(term + 5, 3),
                prev_log_id: None,
                leader_commit: None,
                entries: Vec::new(),
            },
            option.clone(),
        )
        .await;
    assert!(
        lead.is_err(),
        "took node 3's AppendEntries from node 2's certificate: {lead:?}"
    );
    // A candidate with a log longer than anyone's, as node 3.
    let vote = to_follower
        .vote(
            VoteRequest {
                vote: Vote::new(term + 6, 3),
                last_log_id: Some(LogId::new(CommittedLeaderId::new(term + 5, 3), 1 << 40)),
            },
            option.clone(),
        )
        .await;
    assert!(
        vote.is_err(),
        "answered node 3's vote request from node 2's certificate: {vote:?}"
    );
    assert_eq!(vote_of(follower), before, "the follower's vote moved");

    // A forwarded publish, as node 3.
    let forged = impostor
        .propose(
            partition,
            &append("forged".into()),
            &[(leader, address(leader))],
            Duration::from_secs(2),
        )
        .await;
    assert!(
        forged.is_err(),
        "committed a proposal node 2 sent as node 3: {forged:?}"
    );

    // The same certificate as the node it names is an edge like any other.
    let honest = bind(2, &ca, &ca.issue_peer(2).unwrap());
    honest
        .propose(
            partition,
            &append("honest".into()),
            &[(leader, address(leader))],
            Duration::from_secs(5),
        )
        .await
        .unwrap();
    let leader_node = nodes.iter().find(|n| n.id == leader).unwrap();
    let payloads: Vec<Vec<u8>> = leader_node
        .machine
        .history()
        .into_iter()
        .map(|(_, _, payload)| payload)
        .collect();
    assert_eq!(payloads, vec![b"honest".to_vec()]);
    impostor.close();
    honest.close();
    stop(nodes).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_outside_a_partitions_group_cannot_lead_it() {
    let ca = DevCa::generate().unwrap();
    let (nodes, leader) = start_group(&ca).await;
    let follower = nodes.iter().find(|n| n.id != leader).unwrap();
    let before = vote_of(follower);
    // Node 4 is a cluster node (its certificate is genuine) but no member
    // of partition 3's group.
    let outsider = bind(4, &ca, &ca.issue_peer(4).unwrap());
    let mut to_follower = outsider
        .network(PartitionId(3))
        .new_client(
            follower.id,
            &BasicNode::new(follower.peers.local_addr().unwrap()),
        )
        .await;
    let lead = to_follower
        .append_entries(
            AppendEntriesRequest {
                vote: Vote::new_committed(before.leader_id.term + 5, 4),
                prev_log_id: None,
                leader_commit: None,
                entries: Vec::new(),
            },
            RPCOption::new(Duration::from_secs(1)),
        )
        .await;
    assert!(lead.is_err(), "a non-member led the group: {lead:?}");
    assert_eq!(vote_of(follower), before, "the follower's vote moved");
    outsider.close();
    stop(nodes).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_naming_no_node_cannot_open_a_peer_link() {
    let ca = DevCa::generate().unwrap();
    let (nodes, leader) = start_group(&ca).await;
    let target = nodes.iter().find(|n| n.id == leader).unwrap();
    let candidates = vec![(leader, BasicNode::new(target.peers.local_addr().unwrap()))];
    // Certificates from the cluster CA itself, for something other than a
    // node: a public listener's, and a service's client certificate (the
    // kind the old peer link took, as it never read names).
    for (what, cert) in [
        (
            "public",
            ca.issue_public(&["localhost", "127.0.0.1"]).unwrap(),
        ),
        ("client", ca.issue_client("billing").unwrap()),
    ] {
        let rogue = bind(9, &ca, &cert);
        let read = rogue
            .read(
                leader,
                &target.peers.local_addr().unwrap().to_string(),
                PartitionId(3),
                b"",
                Duration::from_secs(1),
            )
            .await;
        assert!(
            read.is_err(),
            "a {what} certificate opened a peer link: {read:?}"
        );
        let proposed = rogue
            .propose(
                PartitionId(3),
                &append(format!("from a {what} certificate")),
                &candidates,
                Duration::from_secs(2),
            )
            .await;
        assert!(
            proposed.is_err(),
            "a {what} certificate proposed: {proposed:?}"
        );
        rogue.close();
    }
    assert!(target.machine.history().is_empty());
    stop(nodes).await;
}

/// A follower far behind is sent its missing entries in batches bounded by
/// bytes (issue 28 item 5): openraft allows an AppendEntries one heartbeat
/// interval, and `max_payload_entries` entries of up to 1 MiB each never
/// made it in time, so the follower never caught up.
#[tokio::test]
async fn replication_reads_entries_in_batches_bounded_by_bytes() {
    use openraft::RaftLogReader;
    use openraft::storage::RaftLogStorage;
    use volna_cluster::raft::log_store::REPLICATION_BATCH_BYTES;

    let dir = tempfile::tempdir().unwrap();
    let mut store = LogStore::new(open_db(dir.path()), PartitionId(3), false);
    let entry = |index: u64, size: usize| Entry {
        log_id: LogId::new(openraft::CommittedLeaderId::new(1, 1), index),
        payload: EntryPayload::Normal(append("x".repeat(size))),
    };
    let quarter = REPLICATION_BATCH_BYTES / 4;
    let mut entries: Vec<Entry<TypeConfig>> = (1..=20).map(|i| entry(i, quarter)).collect();
    // One entry larger than a whole batch still goes, alone.
    entries.push(entry(21, 3 * REPLICATION_BATCH_BYTES));
    entries.push(entry(22, 10));
    openraft::storage::RaftLogStorageExt::blocking_append(&mut store, entries)
        .await
        .unwrap();
    let mut reader = store.get_log_reader().await;

    let mut next = 1;
    let mut batches = Vec::new();
    while next < 23 {
        let batch = reader.limited_get_log_entries(next, 23).await.unwrap();
        assert!(
            !batch.is_empty(),
            "a non-empty range reads at least one entry"
        );
        assert_eq!(batch[0].log_id.index, next, "batches follow each other");
        next = batch.last().unwrap().log_id.index + 1;
        batches.push(batch.len());
    }
    // Four quarter-MiB entries (and a little framing) exceed one MiB: three
    // per batch.
    assert_eq!(batches, [3, 3, 3, 3, 3, 3, 2, 1, 1], "{batches:?}");
    // Reads the log's own users ask for are not bounded.
    assert_eq!(reader.try_get_log_entries(1..23).await.unwrap().len(), 22);
}

/// A discarded partition's Raft state is gone — entries, vote, purge
/// pointer — and its neighbours' is untouched (issue 28, item 7).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discarding_a_partition_blanks_its_raft_state_and_no_other() {
    use openraft::RaftLogReader;
    use openraft::storage::RaftLogStorage;

    let dir = tempfile::tempdir().unwrap();
    let db = open_db(dir.path());
    let entry = |index: u64| Entry {
        log_id: LogId::new(openraft::CommittedLeaderId::new(1, 1), index),
        payload: EntryPayload::Normal(append(format!("m{index}"))),
    };
    let mut stores = Vec::new();
    for partition in [2, 3, 4] {
        let mut store = LogStore::new(db.clone(), PartitionId(partition), false);
        store.save_vote(&openraft::Vote::new(1, 1)).await.unwrap();
        let entries: Vec<Entry<TypeConfig>> = (1..=20).map(entry).collect();
        openraft::storage::RaftLogStorageExt::blocking_append(&mut store, entries)
            .await
            .unwrap();
        store
            .purge(LogId::new(openraft::CommittedLeaderId::new(1, 1), 5))
            .await
            .unwrap();
        assert!(!store.is_blank().await.unwrap());
        stores.push(store);
    }

    stores[1].discard().await.unwrap();

    assert!(stores[1].is_blank().await.unwrap(), "partition 3 is blank");
    assert_eq!(
        stores[1].discarded_through().await.unwrap(),
        Some(LogId::new(openraft::CommittedLeaderId::new(1, 1), 20)),
        "it remembers how far its log reached"
    );
    assert_eq!(stores[0].discarded_through().await.unwrap(), None);
    let mut discarded = stores[1].clone();
    assert_eq!(discarded.read_vote().await.unwrap(), None);
    let state = discarded.get_log_state().await.unwrap();
    assert_eq!((state.last_purged_log_id, state.last_log_id), (None, None));
    for neighbour in [0, 2] {
        let mut store = stores[neighbour].clone();
        assert!(!store.is_blank().await.unwrap());
        let mut reader = store.get_log_reader().await;
        assert_eq!(
            reader.try_get_log_entries(6..21).await.unwrap().len(),
            15,
            "a neighbour keeps its entries"
        );
        assert!(store.read_vote().await.unwrap().is_some());
    }
}

/// A node placed back in a partition it gave up starts a blank replica,
/// but members that never learnt it was removed still count it in their
/// configuration. Its old copy would have refused a candidate whose log
/// ends before its own, and a leader of an older term; the blank one must
/// too (issue 28, item 7), or it helps a lagging member to a quorum that
/// overwrites committed entries. Once it has applied that far again its
/// own log decides, as any replica's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blank_replica_of_a_partition_it_gave_up_helps_no_lagging_member_to_a_quorum() {
    let ca = DevCa::generate().unwrap();
    let placed_back = start_node(1, &ca).await;
    let fresh = start_node(3, &ca).await;
    let held = LogId::new(CommittedLeaderId::new(5, 2), 100);
    placed_back
        .peers
        .set_discard_floor(PartitionId(3), Some(held));

    let lagging = bind(2, &ca, &ca.issue_peer(2).unwrap());
    let option = RPCOption::new(Duration::from_secs(1));
    let client = |node: &Node| {
        let mut network = lagging.network(PartitionId(3));
        let addr = BasicNode::new(node.peers.local_addr().unwrap());
        let id = node.id;
        async move { network.new_client(id, &addr).await }
    };
    let behind = VoteRequest {
        vote: Vote::new(7, 2),
        last_log_id: Some(LogId::new(CommittedLeaderId::new(4, 2), 50)),
    };
    let mut to_placed_back = client(&placed_back).await;
    let vote = to_placed_back.vote(behind.clone(), option.clone()).await;
    assert!(
        vote.is_err(),
        "voted for a log behind its old one: {vote:?}"
    );
    assert_eq!(vote_of(&placed_back), Vote::default(), "its vote moved");
    let old_leader = AppendEntriesRequest {
        vote: Vote::new_committed(4, 2),
        prev_log_id: None,
        leader_commit: None,
        entries: Vec::new(),
    };
    let append = to_placed_back
        .append_entries(old_leader.clone(), option.clone())
        .await;
    assert!(
        append.is_err(),
        "followed a leader of an older term: {append:?}"
    );

    // A replica that never held the partition has nothing to go by.
    let mut to_fresh = client(&fresh).await;
    let granted = to_fresh.vote(behind, option.clone()).await.unwrap();
    assert!(granted.vote_granted, "a blank replica with no past votes");

    // A candidate as far as its old log, and a leader of its term or
    // later, are what the group's members would follow too.
    let level = to_placed_back
        .vote(
            VoteRequest {
                vote: Vote::new(8, 2),
                last_log_id: Some(held),
            },
            option.clone(),
        )
        .await
        .unwrap();
    assert!(level.vote_granted);
    let current = to_placed_back
        .append_entries(
            AppendEntriesRequest {
                vote: Vote::new_committed(8, 2),
                ..old_leader
            },
            option,
        )
        .await;
    assert!(current.is_ok(), "refused the current leader: {current:?}");
    lagging.close();
    stop(vec![placed_back, fresh]).await;
}
