//! A partition's snapshots: the stream format, exporting one from the
//! node's store as it is sent, and the directory received ones wait in.
//!
//! A snapshot is what a replica needs instead of the Raft entries the
//! group compacted away: the partition's channels (metadata and stored
//! messages), its producer windows and its users' device state, as they
//! stood once a given entry was applied. A leader never writes one down:
//! [`export`] reads the partition from a RocksDB snapshot fixed when the
//! replication asks for it, as openraft streams it to the replica in
//! chunks, never held in memory whole:
//!
//! ```text
//! "VOLNASN1" ‖ (u32 length ‖ postcard frame)*
//! frames: Channel, Messages*, …, Producer*, Devices*, Clock(time), End(counts)
//! ```
//!
//! `Devices` frames hold the device state of the partition's users (their
//! keys carry the partition, [`crate::devices::layout`]).
//!
//! The replica receives the stream into a file of
//! `data_dir/snapshots/p<N>/`, checks it whole, installs it and removes it.
//! A file that a peer sent is read as untrusted input: every frame is
//! bounded, names and offsets are checked, and a file that stops before
//! its `End` frame is refused ([`SnapshotError::Malformed`]).

use std::io::{BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use openraft::SnapshotMeta;
use serde::{Deserialize, Serialize};
use thiserror::Error;
use tokio::sync::oneshot;
use tracing::{info, warn};
use volna_cluster::raft::BasicNode;
use volna_cluster::raft::snapshot_data::{ExportStream, export_pipe};
use volna_cluster::{NodeId, PartitionId};
use volna_proto::{ChannelName, Offset, ProducerSeq};

use super::edge::MetaWire;
use super::machine::{PartitionSnapshots, SnapshotStats};
use crate::log::{AppendError, Restore, RestoreScope};
use crate::store::{
    ChannelMeta, ExportScope, Exported, LogStore, ProducerKey, ProducerWindow, StoreError,
    StoredMessage,
};

const MAGIC: &[u8; 8] = b"VOLNASN1";
/// The largest frame a snapshot may hold (a peer's file is untrusted).
const MAX_FRAME: usize = 16 << 20;
/// Payload bytes gathered into one `Messages` frame.
const FRAME_PAYLOAD: usize = 1 << 20;
/// Payload bytes (or windows) handed to the writer as one restore step.
const PART_PAYLOAD: usize = 4 << 20;
const PART_PRODUCERS: usize = 4096;
/// Device entries in one frame (and one restore step), at most.
const PART_DEVICES: usize = 16_384;

/// Why a snapshot could not be built, read or installed.
#[derive(Debug, Error)]
pub enum SnapshotError {
    /// The file system failed.
    #[error("snapshot file: {0}")]
    Io(#[from] std::io::Error),
    /// The store failed while exporting.
    #[error("snapshot export: {0}")]
    Store(#[from] StoreError),
    /// The log writer refused a restore step.
    #[error("snapshot restore: {0}")]
    Restore(#[from] AppendError),
    /// The file is not a well-formed snapshot.
    #[error("malformed snapshot: {0}")]
    Malformed(String),
}

fn malformed(why: impl Into<String>) -> SnapshotError {
    SnapshotError::Malformed(why.into())
}

/// One channel as a snapshot holds it.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct ChannelFrame {
    name: String,
    /// The exporting node's id of the channel (producer runs name it).
    id: u64,
    meta: MetaWire,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct MessageFrame {
    offset: u64,
    timestamp_ms: u64,
    producer: Option<(u64, u64)>,
    payload: Bytes,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
enum Frame {
    Channel(ChannelFrame),
    Messages(Vec<MessageFrame>),
    Producer {
        owner: String,
        producer_id: u64,
        window: Bytes,
    },
    End {
        channels: u64,
        messages: u64,
        producers: u64,
    },
    /// The partition's time at the snapshot (last among the variants: a
    /// file written before it existed still reads).
    Clock {
        time_ms: u64,
    },
    /// Device-state entries, in key order.
    Devices(Vec<(Bytes, Bytes)>),
}

/// What a snapshot holds, counted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// Channels.
    pub channels: u64,
    /// Stored messages.
    pub messages: u64,
    /// Producer windows.
    pub producers: u64,
    /// Device-state entries (not in the `End` frame, whose layout older
    /// files fix).
    pub devices: u64,
}

fn write_frame(out: &mut impl Write, frame: &Frame) -> Result<(), SnapshotError> {
    let bytes = postcard::to_allocvec(frame).map_err(|e| malformed(e.to_string()))?;
    let len = u32::try_from(bytes.len())
        .ok()
        .filter(|len| (*len as usize) <= MAX_FRAME)
        .ok_or_else(|| malformed("a frame is larger than the limit"))?;
    out.write_all(&len.to_be_bytes())?;
    out.write_all(&bytes)?;
    Ok(())
}

/// Writes the messages gathered so far as one frame.
fn flush_messages(
    out: &mut impl Write,
    pending: &mut Vec<MessageFrame>,
    pending_bytes: &mut usize,
) -> Result<(), SnapshotError> {
    if !pending.is_empty() {
        write_frame(out, &Frame::Messages(std::mem::take(pending)))?;
        *pending_bytes = 0;
    }
    Ok(())
}

/// Writes the store's state of what `scope` selects to `out`, as a
/// snapshot. `fixed` is called once the store's point in time is fixed.
pub fn write_snapshot(
    store: &dyn LogStore,
    scope: &ExportScope<'_>,
    time_ms: u64,
    fixed: &mut dyn FnMut(),
    mut out: &mut dyn Write,
) -> Result<Counts, SnapshotError> {
    out.write_all(MAGIC)?;
    let mut counts = Counts::default();
    let mut pending: Vec<MessageFrame> = Vec::new();
    let mut pending_bytes = 0usize;
    let mut failed: Option<SnapshotError> = None;
    // The stored range of the channel being exported: a message outside it
    // (one a trim's range delete has not reached yet) is not state.
    let mut range = (Offset::FIRST, Offset::FIRST);
    let mut devices: Vec<(Bytes, Bytes)> = Vec::new();
    let mut devices_bytes = 0usize;
    let exported = store.export(scope, fixed, &mut |item| {
        let step = (|| -> Result<(), SnapshotError> {
            match item {
                Exported::Channel(name, meta) => {
                    flush_messages(&mut out, &mut pending, &mut pending_bytes)?;
                    counts.channels += 1;
                    range = (meta.first_offset, meta.next_offset);
                    write_frame(
                        &mut out,
                        &Frame::Channel(ChannelFrame {
                            name: name.to_string(),
                            id: meta.id,
                            meta: MetaWire::of(&meta),
                        }),
                    )
                }
                Exported::Message(m) if m.offset < range.0 || m.offset >= range.1 => Ok(()),
                Exported::Message(m) => {
                    counts.messages += 1;
                    pending_bytes += m.payload.len();
                    pending.push(MessageFrame {
                        offset: m.offset.get(),
                        timestamp_ms: m.timestamp_ms,
                        producer: m.producer.map(|p| (p.producer_id, p.sequence)),
                        payload: m.payload,
                    });
                    if pending_bytes >= FRAME_PAYLOAD {
                        flush_messages(&mut out, &mut pending, &mut pending_bytes)?;
                    }
                    Ok(())
                }
                Exported::Device(key, value) => {
                    flush_messages(&mut out, &mut pending, &mut pending_bytes)?;
                    counts.devices += 1;
                    devices_bytes += key.len() + value.len();
                    devices.push((Bytes::from(key), Bytes::from(value)));
                    if devices_bytes >= FRAME_PAYLOAD || devices.len() >= PART_DEVICES {
                        write_frame(&mut out, &Frame::Devices(std::mem::take(&mut devices)))?;
                        devices_bytes = 0;
                    }
                    Ok(())
                }
                Exported::Producer(key, window) => {
                    flush_messages(&mut out, &mut pending, &mut pending_bytes)?;
                    counts.producers += 1;
                    write_frame(
                        &mut out,
                        &Frame::Producer {
                            owner: key.owner.to_string(),
                            producer_id: key.producer_id,
                            window: Bytes::from(window.encode()),
                        },
                    )
                }
            }
        })();
        // The store's error type carries no snapshot error: keep it aside
        // and stop the export with a short one.
        step.map_err(|e| {
            let why = e.to_string();
            failed = Some(e);
            StoreError::Engine(why)
        })
    });
    exported.map_err(|e| failed.take().unwrap_or(SnapshotError::Store(e)))?;
    flush_messages(&mut out, &mut pending, &mut pending_bytes)?;
    if !devices.is_empty() {
        write_frame(&mut out, &Frame::Devices(devices))?;
    }
    write_frame(&mut out, &Frame::Clock { time_ms })?;
    write_frame(
        &mut out,
        &Frame::End {
            channels: counts.channels,
            messages: counts.messages,
            producers: counts.producers,
        },
    )?;
    out.flush()?;
    Ok(counts)
}

/// Counts a snapshot of its partition being exported and sent.
struct Exporting(Arc<PartitionSnapshots>);

impl Exporting {
    fn start(partition: Arc<PartitionSnapshots>) -> Self {
        partition.exporting.fetch_add(1, Ordering::Relaxed);
        Self(partition)
    }
}

impl Drop for Exporting {
    fn drop(&mut self) {
        self.0.exporting.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Pieces of 1 MiB an export may have made ahead of its reader.
const EXPORT_AHEAD: usize = 8;

/// A partition's state as a snapshot stream, made as it is read: the
/// store's point in time is fixed before this returns (the caller, which
/// stops applies meanwhile, knows what the snapshot stands for), and the
/// export waits for the stream's first read to begin. A stream dropped
/// unread reads nothing; one dropped part-way stops its export.
pub async fn export(
    store: Arc<dyn LogStore>,
    scope: RestoreScope,
    time_ms: u64,
    partition: PartitionId,
    stats: Arc<SnapshotStats>,
) -> ExportStream {
    let (mut writer, mut stream, reader) = export_pipe(EXPORT_AHEAD);
    // Until the replica has it: the sender drops the stream once the
    // replica answered its last chunk.
    stream.hold(Exporting::start(stats.partition(partition)));
    let (fixed_tx, fixed) = oneshot::channel();
    tokio::task::spawn_blocking(move || {
        let mut fixed_tx = Some(fixed_tx);
        let mut reader = Some(reader);
        let mut read = false;
        let started = Instant::now();
        let written = write_snapshot(
            &*store,
            &ExportScope {
                channel: &*scope.channel,
                producer: &*scope.producer,
                devices: scope
                    .devices
                    .as_ref()
                    .map(|(from, until)| (from.as_slice(), until.as_slice())),
            },
            time_ms,
            &mut || {
                if let Some(tx) = fixed_tx.take() {
                    let _ = tx.send(());
                }
                // Nothing is read from the store until someone reads.
                read = reader.take().is_some_and(|r| r.wait());
            },
            &mut writer,
        );
        if !read {
            return;
        }
        match written {
            Ok(counts) => match writer.finish() {
                Ok(()) => {
                    stats.exported.fetch_add(1, Ordering::Relaxed);
                    info!(
                        partition = partition.0,
                        channels = counts.channels,
                        messages = counts.messages,
                        elapsed_ms = started.elapsed().as_millis() as u64,
                        "exported a partition snapshot to a replica"
                    );
                }
                Err(e) => {
                    warn!(partition = partition.0, error = %e, "a partition snapshot's reader went away")
                }
            },
            Err(e) => {
                warn!(partition = partition.0, error = %e, "a partition snapshot's export failed");
                writer.fail(e.to_string());
            }
        }
    });
    // An export that fails before fixing its point fails its stream too.
    let _ = fixed.await;
    stream
}

/// Reads a snapshot file as restore steps ([`Restore::Part`]), checking
/// it as it goes.
#[derive(Debug)]
pub struct PartReader<R> {
    input: R,
    channel: Option<(ChannelName, ChannelMeta, Offset)>,
    counts: Counts,
    time_ms: u64,
    ended: bool,
}

impl<R: Read> PartReader<R> {
    /// A reader of the snapshot `input`, whose magic is checked now.
    pub fn new(mut input: R) -> Result<Self, SnapshotError> {
        let mut magic = [0u8; 8];
        input
            .read_exact(&mut magic)
            .map_err(|_| malformed("the file is too short for a snapshot"))?;
        if &magic != MAGIC {
            return Err(malformed("not a Volna partition snapshot"));
        }
        Ok(Self {
            input,
            channel: None,
            counts: Counts::default(),
            time_ms: 0,
            ended: false,
        })
    }

    /// What was read so far (all of it once `next_part` returned `None`).
    pub fn counts(&self) -> Counts {
        self.counts
    }

    /// The partition's time the snapshot carries (0 in a file written
    /// before snapshots carried it).
    pub fn time_ms(&self) -> u64 {
        self.time_ms
    }

    fn frame(&mut self) -> Result<Frame, SnapshotError> {
        let mut len = [0u8; 4];
        self.input
            .read_exact(&mut len)
            .map_err(|_| malformed("the file ends before its End frame"))?;
        let len = u32::from_be_bytes(len) as usize;
        if len > MAX_FRAME {
            return Err(malformed(format!("a frame of {len} bytes")));
        }
        let mut bytes = vec![0u8; len];
        self.input
            .read_exact(&mut bytes)
            .map_err(|_| malformed("the file ends inside a frame"))?;
        postcard::from_bytes(&bytes).map_err(|e| malformed(format!("undecodable frame: {e}")))
    }

    /// The next restore step's worth of channels and messages, or of
    /// producer windows; `None` after the `End` frame.
    pub fn next_part(&mut self) -> Result<Option<Restore>, SnapshotError> {
        if self.ended {
            return Ok(None);
        }
        let mut channels: Vec<(ChannelName, ChannelMeta, Vec<StoredMessage>)> = Vec::new();
        let mut producers = Vec::new();
        let mut devices: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
        let mut payload = 0usize;
        while payload < PART_PAYLOAD
            && producers.len() < PART_PRODUCERS
            && devices.len() < PART_DEVICES
        {
            match self.frame()? {
                Frame::Channel(c) => {
                    if !producers.is_empty() {
                        return Err(malformed("a channel after producer windows"));
                    }
                    self.close_channel()?;
                    let (name, meta) = channel_of(c)?;
                    self.counts.channels += 1;
                    self.channel = Some((name.clone(), meta, meta.first_offset));
                    channels.push((name, meta, Vec::new()));
                }
                Frame::Messages(messages) => {
                    let Some((name, meta, next)) = self.channel.as_mut() else {
                        return Err(malformed("messages before any channel"));
                    };
                    if channels.last().is_none_or(|(n, _, _)| n != name) {
                        channels.push((name.clone(), *meta, Vec::new()));
                    }
                    let Some((_, _, out)) = channels.last_mut() else {
                        return Err(malformed("messages before any channel"));
                    };
                    for m in messages {
                        let offset = Offset::new(m.offset);
                        if offset < *next || offset >= meta.next_offset {
                            return Err(malformed(format!(
                                "channel {name}: offset {} out of order or outside the log",
                                m.offset
                            )));
                        }
                        *next = offset.next();
                        payload += m.payload.len();
                        self.counts.messages += 1;
                        out.push(StoredMessage {
                            offset,
                            timestamp_ms: m.timestamp_ms,
                            producer: m.producer.map(|(producer_id, sequence)| ProducerSeq {
                                producer_id,
                                sequence,
                            }),
                            payload: m.payload,
                        });
                    }
                }
                Frame::Producer {
                    owner,
                    producer_id,
                    window,
                } => {
                    self.close_channel()?;
                    self.channel = None;
                    let window = ProducerWindow::decode(&window)
                        .map_err(|e| malformed(format!("producer window: {e}")))?;
                    self.counts.producers += 1;
                    producers.push((ProducerKey::new(owner.into(), producer_id), window));
                }
                Frame::Clock { time_ms } => self.time_ms = time_ms,
                Frame::Devices(entries) => {
                    self.close_channel()?;
                    self.channel = None;
                    if entries.len() > PART_DEVICES {
                        return Err(malformed(format!(
                            "a frame of {} device entries",
                            entries.len()
                        )));
                    }
                    self.counts.devices += entries.len() as u64;
                    payload += entries
                        .iter()
                        .map(|(k, v)| k.len() + v.len())
                        .sum::<usize>();
                    devices.extend(entries.into_iter().map(|(k, v)| (k.to_vec(), v.to_vec())));
                }
                Frame::End {
                    channels: c,
                    messages: m,
                    producers: p,
                } => {
                    self.close_channel()?;
                    let said = Counts {
                        channels: c,
                        messages: m,
                        producers: p,
                        devices: self.counts.devices,
                    };
                    if said != self.counts {
                        return Err(malformed(format!(
                            "the End frame counts {said:?}, the file holds {:?}",
                            self.counts
                        )));
                    }
                    self.ended = true;
                    break;
                }
            }
        }
        if self.ended && channels.is_empty() && producers.is_empty() && devices.is_empty() {
            return Ok(None);
        }
        Ok(Some(Restore::Part {
            channels,
            producers,
            devices,
        }))
    }

    /// Checks that the channel read last got every message its metadata
    /// says is stored.
    fn close_channel(&mut self) -> Result<(), SnapshotError> {
        if let Some((name, meta, next)) = &self.channel
            && *next != meta.next_offset
            && !meta.is_empty()
        {
            return Err(malformed(format!(
                "channel {name} stops at offset {}, its log at {}",
                next.get(),
                meta.next_offset.get()
            )));
        }
        Ok(())
    }
}

fn channel_of(c: ChannelFrame) -> Result<(ChannelName, ChannelMeta), SnapshotError> {
    let name = ChannelName::new(c.name).map_err(|e| malformed(format!("a channel's name: {e}")))?;
    let meta = ChannelMeta {
        id: c.id,
        ..c.meta.into_meta()
    };
    if meta.first_offset.get() == 0
        || meta.first_offset > meta.next_offset
        || meta.epoch_start.get() == 0
    {
        return Err(malformed(format!("channel {name}: impossible offsets")));
    }
    Ok((name, meta))
}

/// Opens a snapshot file for reading steps.
pub fn read_parts(path: &Path) -> Result<PartReader<BufReader<std::fs::File>>, SnapshotError> {
    PartReader::new(BufReader::new(std::fs::File::open(path)?))
}

/// The Raft position a snapshot stands for, as openraft describes it.
pub type Meta = SnapshotMeta<NodeId, BasicNode>;

/// A received snapshot file and what it stands for: what a restore that a
/// crash interrupted runs again.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Current {
    /// The file's name in the partition's snapshot directory.
    pub file: String,
    /// Its Raft position.
    pub meta: Meta,
}

/// One partition's snapshot directory: where snapshots from a leader are
/// received and kept until they are installed.
#[derive(Debug, Clone)]
pub struct SnapshotDir {
    dir: PathBuf,
}

static NEXT_FILE: AtomicU64 = AtomicU64::new(0);

/// A name no other snapshot of this process has (file names, snapshot ids).
pub fn unique_name(prefix: &str) -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let n = NEXT_FILE.fetch_add(1, Ordering::Relaxed);
    format!("{prefix}-{nanos:x}-{n}")
}

impl SnapshotDir {
    /// Removes `partition`'s snapshots under `root` (a discarded copy of
    /// the partition); nothing to remove is no error.
    pub fn remove(root: &Path, partition: PartitionId) -> Result<(), SnapshotError> {
        match std::fs::remove_dir_all(Self::path_of(root, partition)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e.into()),
            _ => Ok(()),
        }
    }

    fn path_of(root: &Path, partition: PartitionId) -> PathBuf {
        root.join(format!("p{}", partition.0))
    }

    /// `root/p<N>`, created if missing, with every file in it removed but
    /// `keep` (the snapshot an interrupted restore runs again): files
    /// half-received by an earlier run, and the snapshot files and
    /// `current` pointer that versions which wrote snapshots to disk left.
    pub fn open(
        root: &Path,
        partition: PartitionId,
        keep: Option<&str>,
    ) -> Result<Self, SnapshotError> {
        let dir = Self::path_of(root, partition);
        std::fs::create_dir_all(&dir)?;
        for entry in std::fs::read_dir(&dir)? {
            let path = entry?.path();
            let kept = keep.is_some_and(|keep| path.file_name().is_some_and(|n| *n == *keep));
            if !kept && path.is_file() {
                std::fs::remove_file(&path)?;
            }
        }
        Ok(Self { dir })
    }

    /// A path to receive a snapshot into.
    pub fn new_part(&self) -> PathBuf {
        self.dir.join(format!("{}.part", unique_name("snap")))
    }

    /// Makes a received part a snapshot file (durably named); returns its
    /// name.
    pub fn keep(&self, part: &Path) -> Result<String, SnapshotError> {
        let name = format!("{}.snap", unique_name("snap"));
        std::fs::rename(part, self.dir.join(&name))?;
        sync_dir(&self.dir)?;
        Ok(name)
    }

    /// The path of snapshot file `name`; `None` for a name that is not a
    /// plain file name of this directory.
    pub fn path(&self, name: &str) -> Option<PathBuf> {
        let plain = !name.is_empty()
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
            && !name.starts_with('.');
        plain.then(|| self.dir.join(name))
    }

    /// Removes a file that will not be used (again).
    pub fn discard(&self, path: &Path) {
        let _ = std::fs::remove_file(path);
    }
}

/// Makes a rename in `dir` durable.
fn sync_dir(dir: &Path) -> Result<(), SnapshotError> {
    std::fs::File::open(dir)?.sync_all()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use volna_proto::Epoch;

    use super::*;
    use crate::store::{MemoryStore, WriteSet};

    fn stored(store: &MemoryStore) {
        let mut set = WriteSet::default();
        for (id, name, count) in [(1, "chat.a", 3u64), (2, "chat.b", 0), (3, "news.x", 2)] {
            let mut meta = ChannelMeta::new(id, Epoch(id * 10));
            meta.next_offset = Offset::new(count + 1);
            meta.oldest_ms = 5;
            set.channels
                .push((ChannelName::new(name).expect("name"), meta));
            for o in 1..=count {
                set.messages.push((
                    id,
                    StoredMessage {
                        offset: Offset::new(o),
                        timestamp_ms: o,
                        producer: Some(ProducerSeq {
                            producer_id: 9,
                            sequence: o,
                        }),
                        payload: Bytes::from(format!("{name}-{o}")),
                    },
                ));
            }
        }
        let mut window = ProducerWindow::default();
        window.insert(
            crate::store::ProducerEntry {
                sequence: 1,
                channel: 1,
                offset: Offset::new(1),
                epoch: Epoch(10),
            },
            16,
            1,
        );
        set.producers
            .push((ProducerKey::new(Arc::from("alice#p0"), 9), window.clone()));
        set.producers
            .push((ProducerKey::new(Arc::from("bob#p1"), 9), window));
        // Device state of partitions 0 and 1.
        for p in [0u32, 1] {
            set.devices.puts.push((
                crate::devices::layout::in_partition(p, b"a-user"),
                vec![p as u8; 8],
            ));
        }
        store.write(&set, false).expect("write");
    }

    fn export(dir: &Path) -> (PathBuf, Counts) {
        let store = MemoryStore::new();
        stored(&store);
        let range = crate::devices::layout::partition_range(0);
        let path = dir.join("s.part");
        let counts = write_snapshot(
            &store,
            &ExportScope {
                channel: &|n: &ChannelName| n.as_str().starts_with("chat."),
                producer: &|k: &ProducerKey| k.owner.ends_with("#p0"),
                devices: Some((&range.0, &range.1)),
            },
            7_000,
            &mut || {},
            &mut std::io::BufWriter::new(std::fs::File::create(&path).expect("create")),
        )
        .expect("snapshot");
        (path, counts)
    }

    #[test]
    fn a_snapshot_reads_back_as_the_selected_state() {
        let dir = tempfile::tempdir().expect("dir");
        let (path, counts) = export(dir.path());
        assert_eq!(
            counts,
            Counts {
                channels: 2,
                messages: 3,
                producers: 1,
                devices: 1,
            }
        );
        let mut reader = read_parts(&path).expect("open");
        let mut channels = Vec::new();
        let mut producers = Vec::new();
        let mut devices = Vec::new();
        while let Some(part) = reader.next_part().expect("part") {
            let Restore::Part {
                channels: c,
                producers: p,
                devices: d,
            } = part
            else {
                panic!("only parts are read");
            };
            channels.extend(c);
            producers.extend(p);
            devices.extend(d);
        }
        assert_eq!(
            devices,
            [(
                crate::devices::layout::in_partition(0, b"a-user"),
                vec![0u8; 8]
            )],
            "the partition's device state, and only its"
        );
        assert_eq!(reader.counts(), counts);
        assert_eq!(
            reader.time_ms(),
            7_000,
            "the partition's time travels along"
        );
        let names: Vec<_> = channels
            .iter()
            .map(|(n, _, m)| (n.as_str(), m.len()))
            .collect();
        assert_eq!(names, [("chat.a", 3), ("chat.b", 0)]);
        assert_eq!(channels[0].2[2].payload, Bytes::from("chat.a-3"));
        assert_eq!(channels[0].1.epoch, Epoch(10));
        assert_eq!(producers.len(), 1);
        assert_eq!(&*producers[0].0.owner, "alice#p0");
    }

    #[tokio::test]
    async fn a_partition_being_sent_a_snapshot_takes_none_until_the_replica_has_it() {
        let stats = Arc::new(SnapshotStats::default());
        let partition = PartitionId(3);
        stats
            .partition(partition)
            .log_since
            .store(1 << 20, Ordering::Relaxed);
        assert_eq!(stats.partitions_due(4096), [partition]);
        let store: Arc<dyn LogStore> = Arc::new(MemoryStore::new());
        let stream = super::export(
            store,
            super::super::machine::partition_scope(partition, 8),
            0,
            partition,
            stats.clone(),
        )
        .await;
        assert!(
            stats.partitions_due(4096).is_empty(),
            "its log after the export's point would be purged"
        );
        drop(stream);
        assert_eq!(stats.partitions_due(4096), [partition]);
    }

    #[test]
    fn a_damaged_or_truncated_file_is_refused_typed() {
        let dir = tempfile::tempdir().expect("dir");
        let (path, _) = export(dir.path());
        let whole = std::fs::read(&path).expect("read");
        let read_all = |bytes: &[u8]| -> Result<(), SnapshotError> {
            let mut reader = PartReader::new(bytes)?;
            while reader.next_part()?.is_some() {}
            Ok(())
        };
        assert!(read_all(&whole).is_ok());
        // Every prefix short of the whole file is refused, never a panic.
        for cut in 0..whole.len() {
            assert!(
                matches!(read_all(&whole[..cut]), Err(SnapshotError::Malformed(_))),
                "a file cut at {cut} bytes was accepted"
            );
        }
        let mut flipped = whole.clone();
        flipped[12] ^= 0xff;
        assert!(read_all(&flipped).is_err());
    }
}
