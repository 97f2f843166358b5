//! After an unclean stop with `durability = "wal"` the log's tail may be
//! lost (power loss), and the offsets it held are given to new messages: a
//! device that had received the lost ones must be told, never silently
//! skip the new ones (issue 11 §E, G3).

#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;

use common::{TestBroker, channel, within};
use futures_util::StreamExt;
use volna_broker::config::Durability;
use volna_client::{Client, ClientConfig, Offset, Position, SubscriptionError, Trust};

/// Copies `from` to `to` as a power loss would leave it: whatever was
/// written when the copy was taken, the broker still marked as running.
fn disk_image(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            disk_image(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_ahead_of_a_lost_tail_is_told_and_gets_the_new_messages() {
    let wal = |c: &mut volna_broker::Config| c.durability = Durability::Wal;
    let mut before = TestBroker::start_with(wal).await;
    let client = before.client().await;
    let ch = channel("chat.power");
    for i in 1..=50 {
        client.publish(&ch, format!("old-{i}")).await.unwrap();
    }
    // What the disk holds when the power goes: the first 50 messages.
    let image = tempfile::tempdir().unwrap();
    disk_image(before.dir.path(), image.path());
    // Taken from a running broker in this very boot: what a power loss
    // would have left, which the store cannot tell by itself.
    volna_broker::store::RocksStore::open(&image.path().join("log"))
        .unwrap()
        .mark_cut_by_power_loss()
        .unwrap();
    let mut lost_epoch = None;
    for i in 51..=100 {
        lost_epoch = Some(
            client
                .publish(&ch, format!("lost-{i}"))
                .await
                .unwrap()
                .epoch,
        );
    }
    let lost_epoch = lost_epoch.unwrap();
    drop(client);
    before.stop().await;

    let image_dir = image.path().to_owned();
    let after = TestBroker::start_with(move |c| {
        wal(c);
        c.data_dir = image_dir;
    })
    .await;
    let config = ClientConfig::new(
        after.addr().to_string(),
        "test",
        Trust::CaFile(image.path().join("dev-cert.pem")),
    );
    let client = Client::connect(config).await.unwrap();
    for i in 51..=60 {
        let published = client.publish(&ch, format!("new-{i}")).await.unwrap();
        assert_eq!(
            published.offset.get(),
            i,
            "the log resumed at its recovered head"
        );
        assert_ne!(
            published.epoch, lost_epoch,
            "the reused offsets are a new epoch"
        );
    }

    // A device that had received all 100 resumes from its checkpoint.
    let ahead = Position::From {
        offset: Offset::new(101),
        epoch: Some(lost_epoch),
    };
    let mut sub = client.subscribe(&ch, ahead).await.unwrap();
    match within("the first item", sub.next()).await.unwrap() {
        Err(SubscriptionError::EpochChanged {
            previous, start, ..
        }) => {
            assert_eq!(previous, lost_epoch);
            assert_eq!(
                start,
                Offset::new(51),
                "replaced from the recovered head on"
            );
        }
        other => panic!("expected EpochChanged, got {other:?}"),
    }
    for i in 51..=60 {
        let m = within("a new message", sub.next()).await.unwrap().unwrap();
        assert_eq!((m.offset.get(), m.payload), (i, format!("new-{i}").into()));
    }
    drop(sub);

    // A device that had not got beyond what survived just goes on.
    let behind = Position::From {
        offset: Offset::new(41),
        epoch: Some(lost_epoch),
    };
    let mut sub = client.subscribe(&ch, behind).await.unwrap();
    for i in 41..=60 {
        let m = within("a message", sub.next()).await.unwrap().unwrap();
        let expected = if i <= 50 {
            format!("old-{i}")
        } else {
            format!("new-{i}")
        };
        assert_eq!((m.offset.get(), m.payload), (i, expected.into()));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_restart_keeps_the_epoch() {
    let mut broker = TestBroker::start_with(|c| c.durability = Durability::Wal).await;
    let client = broker.client().await;
    let ch = channel("chat.clean");
    let epoch = client.publish(&ch, "one").await.unwrap().epoch;
    drop(client);
    broker.restart().await;
    let client = broker.client().await;
    let published = client.publish(&ch, "two").await.unwrap();
    assert_eq!((published.offset.get(), published.epoch), (2, epoch));
}
