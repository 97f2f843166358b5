//! Fills a stopped broker's data directory with device state at scale —
//! `DEVICES` devices (one user each), each with a cursor and a read marker
//! on `CHANNELS` channels — through the broker's own devices thread (the
//! path acks take: coalesced, merged with what is stored, written in
//! batches). For the figures of BENCHMARKS.md ("Devices at scale"): then
//! start the broker on the directory and measure its start-up and memory.
//!
//! ```text
//! volna pub chat.fill0 x … chat.fill9 x       # the channels must exist
//! cargo run --release -p volna-benches --example fill_cursors -- DATA_DIR 1000000 10
//! ```

use std::sync::Arc;
use std::time::{Duration, Instant};

use volna_broker::config::{CursorsConfig, Durability};
use volna_broker::devices::{self, DeviceId, Mark};
use volna_broker::metrics::Metrics;
use volna_broker::store::{LogStore, RocksStore};
use volna_proto::{ChannelName, Offset};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let [_, dir, devices, channels] = &args[..] else {
        return Err("usage: fill_cursors DATA_DIR DEVICES CHANNELS".into());
    };
    let (devices, channels): (u64, usize) = (devices.parse()?, channels.parse()?);
    let store = Arc::new(RocksStore::open(&std::path::Path::new(dir).join("log"))?);
    let mut metas = Vec::new();
    for i in 0..channels {
        let name = ChannelName::new(format!("chat.fill{i}"))?;
        let meta = store
            .load_channel(&name)?
            .ok_or_else(|| format!("{name} does not exist: publish to it first"))?;
        metas.push((name, meta));
    }
    let config = CursorsConfig {
        // Many devices per "user" would hit the per-user limit: one each.
        max_devices_per_user: 1,
        ..CursorsConfig::default()
    };
    let thread = devices::start(
        store.clone(),
        store.clone(),
        &config,
        Durability::Wal,
        Arc::new(Metrics::new()),
    )?;
    let handle = thread.devices().clone();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let started = Instant::now();
    runtime.block_on(async {
        let device = DeviceId::new("phone").map_err(|e| e.to_string())?;
        let mut last = None;
        for d in 0..devices {
            let user = format!("user{d}");
            handle.register(&user, &device).await?;
            for (name, meta) in &metas {
                let mark = Mark {
                    offset: Offset::new(meta.next_offset.get().saturating_sub(1).max(1)),
                    channel_id: meta.id,
                    updated_ms: 0,
                };
                last = Some(handle.ack(&user, &device, name, mark));
                handle.mark_read(&user, name, mark);
            }
            if d % 100_000 == 99_999 {
                eprintln!(
                    "{} devices, {:.0} s",
                    d + 1,
                    started.elapsed().as_secs_f64()
                );
            }
        }
        if let Some(ticket) = last {
            tokio::time::timeout(Duration::from_secs(600), handle.stored(ticket)).await??;
        }
        Ok::<_, Box<dyn std::error::Error>>(())
    })?;
    let took = started.elapsed().as_secs_f64();
    thread.shutdown();
    store.flush()?;
    let values = devices * channels as u64 * 2;
    println!(
        "{devices} devices × {channels} channels: {values} cursors and markers written in {took:.1} s ({:.0}/s)",
        values as f64 / took
    );
    Ok(())
}
