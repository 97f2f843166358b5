//! `durability` reaches the store: with `fsync`, every acknowledged publish
//! was in a write the log writer asked to be synced, before its ack; with
//! `wal`, it was not (so the check can fail). A kill -9 cannot tell the two
//! apart (the page cache survives it), so the in-memory store records the
//! flag of each write instead.

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;

use common::{TestBroker, channel};
use futures_util::future::join_all;
use volna_broker::config::Durability;
use volna_broker::store::{LogStore, MemoryStore};
use volna_client::{ChannelName, Client};

/// Whether the write that stored `channel`'s message at `offset` was
/// synced, looked up right after its ack: `None` when no write held it yet.
fn synced_when_acked(store: &MemoryStore, channel: &ChannelName, offset: u64) -> Option<bool> {
    let id = store.load_channel(channel).unwrap()?.id;
    store
        .recorded_writes()
        .iter()
        .find(|write| {
            write
                .messages
                .iter()
                .any(|(c, o)| *c == id && o.get() == offset)
        })
        .map(|write| write.sync)
}

/// Publishes one at a time and then 200 at once (the writer groups those
/// into shared writes), checking each ack's write as soon as the ack
/// arrives; returns each acknowledged publish's sync flag.
async fn sync_flags_of_acknowledged_publishes(durability: Durability) -> Vec<bool> {
    let store = Arc::new(MemoryStore::new());
    store.record_writes();
    let broker = TestBroker::start_on(Some(store.clone()), |c| c.durability = durability).await;
    let ch = channel("chat.durable");
    let mut flags = Vec::new();
    let client = broker.client().await;
    for i in 0..20 {
        let published = client.publish(&ch, format!("one {i}")).await.unwrap();
        let synced = synced_when_acked(&store, &ch, published.offset.get());
        flags.push(synced.expect("an acknowledged publish was written before its ack"));
    }
    let clients: Vec<Client> = join_all((0..4).map(|_| broker.client())).await;
    let publishes = (0..200).map(|i| {
        let (client, store, ch) = (&clients[i % clients.len()], &store, &ch);
        async move {
            let published = client.publish(ch, format!("many {i}")).await.unwrap();
            synced_when_acked(store, ch, published.offset.get())
                .expect("an acknowledged publish was written before its ack")
        }
    });
    flags.extend(join_all(publishes).await);
    flags
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fsync_durability_syncs_every_write_before_its_ack() {
    let flags = sync_flags_of_acknowledged_publishes(Durability::Fsync).await;
    assert_eq!(flags.len(), 220);
    let unsynced = flags.iter().filter(|synced| !**synced).count();
    assert_eq!(unsynced, 0, "acknowledged publishes written without sync");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wal_durability_acknowledges_unsynced_writes() {
    let flags = sync_flags_of_acknowledged_publishes(Durability::Wal).await;
    assert_eq!(flags.len(), 220);
    let synced = flags.iter().filter(|synced| **synced).count();
    assert_eq!(synced, 0, "wal durability synced message writes");
}
