//! Replicas of a partition: two nodes' log writers applying the same
//! committed entries (as their partition's Raft groups hand them over)
//! store the same offsets and epochs, deduplicate the same retries, and
//! resume after a restart from the applied state they stored.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use bytes::Bytes;
use volna_broker::config::{Durability, EngineConfig};
use volna_broker::fanout::Fanout;
use volna_broker::log::{self, AppendInput, LogThreads, Outcome, ProducerRef, Replicated};
use volna_broker::metrics::Metrics;
use volna_broker::store::{LogStore, MemoryStore, ProducerKey};
use volna_client::ChannelName;

fn replica(store: Arc<MemoryStore>) -> LogThreads {
    log::start_replicated(
        store,
        Arc::new(Fanout::new(64 * 1024)),
        Durability::Wal,
        &EngineConfig::default(),
        Arc::new(Metrics::new()),
    )
    .unwrap()
}

fn publish(channel: &str, producer: Option<(u64, u64)>, body: &str) -> AppendInput {
    AppendInput {
        channel: ChannelName::new(channel).unwrap(),
        producer: producer.map(|(id, sequence)| ProducerRef {
            key: ProducerKey::new(Arc::from("alice#p3"), id),
            sequence,
            after: None,
            limited: true,
        }),
        payload: Bytes::from(body.to_owned()),
    }
}

/// The committed entries of one partition, in log order.
fn entries() -> Vec<Replicated> {
    let entry = |index: u8, now_ms: u64, seed: u64, appends: Vec<AppendInput>| Replicated {
        partition: 3,
        applied: vec![index],
        now_ms,
        epoch_seed: seed,
        appends,
        ..Replicated::default()
    };
    vec![
        entry(
            1,
            1_000,
            0xfeed,
            vec![
                publish("chat.1", Some((7, 1)), "a"),
                publish("chat.2", None, "b"),
                publish("chat.1", Some((7, 2)), "c"),
            ],
        ),
        // A retry of (7, 2) after a failover, in a later entry.
        entry(2, 2_000, 0xbeef, vec![publish("chat.1", Some((7, 2)), "c")]),
        entry(3, 3_000, 0xcafe, vec![publish("chat.3", None, "d")]),
        Replicated {
            deletes: vec![ChannelName::new("chat.2").unwrap()],
            ..entry(4, 4_000, 0xd00d, Vec::new())
        },
        // chat.2 created anew: a new epoch, from this entry's seed.
        entry(5, 5_000, 0xf00d, vec![publish("chat.2", None, "e")]),
    ]
}

async fn apply_all(threads: &LogThreads) -> Vec<Vec<Outcome>> {
    let mut outcomes = Vec::new();
    for entry in entries() {
        outcomes.push(
            threads
                .log()
                .apply_replicated(entry)
                .await
                .unwrap()
                .outcomes,
        );
    }
    outcomes
}

#[tokio::test]
async fn replicas_applying_the_same_entries_store_the_same_offsets_and_epochs() {
    let (store_a, store_b) = (Arc::new(MemoryStore::new()), Arc::new(MemoryStore::new()));
    let (a, b) = (replica(store_a.clone()), replica(store_b.clone()));
    let outcomes_a = apply_all(&a).await;
    let outcomes_b = apply_all(&b).await;
    assert_eq!(outcomes_a, outcomes_b);

    let stored = |outcome: &Outcome| match outcome {
        Outcome::Stored(appended) => (appended.offset.get(), appended.duplicate),
        Outcome::Refused(e) => panic!("refused: {e}"),
    };
    // chat.1 got 1 and 2; the retry of (7, 2) is the stored 2, not a 3.
    assert_eq!(stored(&outcomes_a[0][0]), (1, false));
    assert_eq!(stored(&outcomes_a[0][2]), (2, false));
    assert_eq!(stored(&outcomes_a[1][0]), (2, true));

    for name in ["chat.1", "chat.2", "chat.3"] {
        let name = ChannelName::new(name).unwrap();
        let (meta_a, meta_b) = (
            a.log().lookup(&name).await.unwrap().unwrap(),
            b.log().lookup(&name).await.unwrap().unwrap(),
        );
        assert_eq!(meta_a.epoch, meta_b.epoch, "{name}");
        assert_eq!(meta_a.next_offset, meta_b.next_offset, "{name}");
        assert_eq!(meta_a.oldest_ms, meta_b.oldest_ms, "{name}");
    }
    // The applied state went down with the last entry's changes.
    assert_eq!(store_a.load_applied(3).unwrap(), Some(vec![5]));
    assert_eq!(store_b.load_applied(3).unwrap(), Some(vec![5]));
    a.shutdown();
    b.shutdown();
}

#[tokio::test]
async fn a_replica_restarted_without_a_clean_stop_keeps_its_epochs() {
    let store = Arc::new(MemoryStore::new());
    let first = replica(store.clone());
    apply_all(&first).await;
    let chat = ChannelName::new("chat.1").unwrap();
    let before = first.log().lookup(&chat).await.unwrap().unwrap();
    // No clean-stop mark: as after `kill -9`.
    drop(first);
    let again = replica(store.clone());
    let after = again.log().lookup(&chat).await.unwrap().unwrap();
    // A single node would move the channel to a new epoch here (its tail
    // may be lost); a replica must keep the epoch every other replica has.
    assert_eq!(after.epoch, before.epoch);
    assert_eq!(after.next_offset, before.next_offset);
    again.shutdown();
}
