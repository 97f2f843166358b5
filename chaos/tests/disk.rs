//! The data directory's disk fills up: publishes fail with a clear error,
//! nothing acknowledged is lost, subscribers are still served, and the
//! broker accepts publishes again once space returns.
//!
//! Runs on a small tmpfs it mounts itself, which needs root; where it
//! cannot mount one it fails under `CI=true` (as scripts/test.sh runs) and
//! otherwise says SKIPPED and returns.

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use volna_chaos::{BrokerProcess, History, assert_no_duplicates, read_through};
use volna_client::{ChannelName, ClientError, ErrorCode, Position};

const DEADLINE: Duration = Duration::from_secs(120);

/// A tmpfs mounted for the test, unmounted when dropped.
struct SmallDisk {
    dir: tempfile::TempDir,
}

impl SmallDisk {
    fn mount(size_mib: u32) -> Option<Self> {
        let dir = tempfile::tempdir().ok()?;
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size_mib}m"), "tmpfs"])
            .arg(dir.path())
            .status()
            .ok()?;
        status.success().then_some(Self { dir })
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn available(&self) -> u64 {
        let out = Command::new("df")
            .args(["--output=avail", "-B1"])
            .arg(self.path())
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .nth(1)
            .and_then(|l| l.trim().parse().ok())
            .unwrap()
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_refuses_publishes_loses_nothing_and_recovers() {
    let Some(disk) = SmallDisk::mount(256) else {
        volna_chaos::missing_dependency("disk test: cannot mount a tmpfs (needs root)");
        return;
    };
    let data = disk.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let broker = BrokerProcess::start(&data, "fsync").unwrap();
    let _up = broker.client(DEADLINE).await.unwrap();
    let mut config = broker.client_config();
    config.request_timeout = Duration::from_secs(3);
    let client = volna_client::Client::connect(config).await.unwrap();
    let channel = ChannelName::new("chat.disk").unwrap();
    let mut reader = client.subscribe(&channel, Position::FIRST).await.unwrap();

    let mut history = History::default();
    let mut acked_payloads = 0u64;
    // Fill all but a few MiB with a file the test owns.
    let filler = disk.path().join("filler");
    let keep_free = 6 * 1024 * 1024;
    let fill = disk.available().saturating_sub(keep_free);
    std::fs::write(&filler, vec![0u8; fill as usize]).unwrap();

    // Publish 256 KiB messages until the store refuses.
    let started = Instant::now();
    let refusal = loop {
        assert!(started.elapsed() < DEADLINE, "the disk never filled");
        let payload = format!("{acked_payloads:08}")
            .into_bytes()
            .into_iter()
            .chain(std::iter::repeat_n(b'd', 256 * 1024))
            .collect::<Vec<u8>>();
        match client.publish(&channel, payload.clone()).await {
            Ok(ack) => {
                history.acked.insert(ack.offset.get(), payload);
                acked_payloads += 1;
            }
            Err(e) => break e,
        }
        assert!(
            acked_payloads < 2_000,
            "2,000 publishes fitted on a full disk"
        );
    };
    eprintln!("disk test: refused after {acked_payloads} acked publishes: {refusal}");
    assert!(
        matches!(
            refusal,
            ClientError::Server {
                code: ErrorCode::StorageUnavailable,
                ..
            }
        ),
        "a full disk is a clear, typed error: {refusal}"
    );

    // Subscribers are still served everything that was acknowledged.
    let last = *history.acked.keys().next_back().unwrap();
    let delivered = read_through(&mut reader, last, DEADLINE).await;
    history.check(&delivered).unwrap();
    // The broker stayed up: nothing may have been sent twice.
    assert_no_duplicates(&client);

    // Space returns; publishes succeed again without a restart.
    std::fs::remove_file(&filler).unwrap();
    let recovered = Instant::now();
    let ack = loop {
        match client.publish(&channel, b"after recovery".to_vec()).await {
            Ok(ack) => break ack,
            Err(e) => {
                assert!(recovered.elapsed() < DEADLINE, "no recovery: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    eprintln!(
        "disk test: accepted publishes again {:?} after space returned",
        recovered.elapsed()
    );
    assert_eq!(
        ack.offset.get(),
        last + 1,
        "failed publishes consumed no offset"
    );
    broker.assert_never_panicked();
}
