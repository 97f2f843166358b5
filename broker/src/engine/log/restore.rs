//! Restoring a replicated partition's state from a snapshot, on the writer
//! thread (cluster).
//!
//! A replica too far behind for the leader's Raft log (a new replica, or
//! one that was down while the log was compacted) receives the partition's
//! snapshot instead: its channels, their messages and its producer
//! windows. The writer replaces this node's state of the partition with
//! it in steps, so that a large partition neither makes one huge write
//! nor stops the other partitions' writes for long:
//!
//! 1. [`Restore::Begin`] removes the partition's channels and windows and
//!    writes a marker as the partition's applied state, in one write;
//! 2. [`Restore::Part`]s write the snapshot's channels under new channel
//!    ids of this node (ids are per node) and its windows, renamed to them;
//! 3. [`Restore::Finish`] writes the applied state the snapshot stands for
//!    and tells the fan-out what changed.
//!
//! A crash between 1 and 3 leaves the marker: the partition's machine finds
//! it at start and runs the restore again from the stored snapshot file.
//! Nothing reads the partition's half-restored channels as committed state
//! meanwhile: its group is not running, and from `Begin` to `Finish` the
//! partition is listed in [`Restores`], so device reads of its channels go
//! to its leader ([`Log::lookup`](super::Log::lookup)); a read that
//! overlapped a restore's start or end is read again.
//!
//! Restores of different partitions may run at once (each partition's
//! machine installs its own snapshot): the writer keeps one record per
//! partition, and every step names its partition.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use volna_proto::ChannelName;

use super::Writer;
use crate::store::{
    AgeIndexMove, ChannelId, ChannelMeta, ExportScope, Exported, ProducerKey, ProducerWindow,
    StoreError, StoredMessage, WriteSet,
};

/// Selects a partition's channels and producer windows among the node's.
#[derive(Clone)]
pub struct RestoreScope {
    /// Whether a channel belongs to the partition.
    pub channel: Arc<dyn Fn(&ChannelName) -> bool + Send + Sync>,
    /// Whether a producer window belongs to the partition.
    pub producer: Arc<dyn Fn(&ProducerKey) -> bool + Send + Sync>,
    /// The partition's device-state keys `[from, until)`, if it keeps any.
    pub devices: Option<(Vec<u8>, Vec<u8>)>,
}

impl std::fmt::Debug for RestoreScope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RestoreScope").finish_non_exhaustive()
    }
}

/// One step of a restore, sent in order: `Begin`, any number of `Part`s,
/// `Finish` (each with its partition, [`Log::restore`](super::Log::restore)).
#[derive(Debug)]
pub enum Restore {
    /// Removes the partition's state and records `marker` as its applied
    /// state.
    Begin {
        /// Its channels and windows on this node.
        scope: RestoreScope,
        /// The applied state that says a restore is under way.
        marker: Vec<u8>,
    },
    /// Channels with their metadata as in the snapshot (its channel ids)
    /// and some of their messages: a channel may go on in the next part.
    /// Producer windows come after every channel.
    Part {
        /// Channels and messages, in the snapshot's order.
        channels: Vec<(ChannelName, ChannelMeta, Vec<StoredMessage>)>,
        /// Windows, their runs naming the snapshot's channel ids.
        producers: Vec<(ProducerKey, ProducerWindow)>,
        /// Device-state entries (in the partition's key range).
        devices: Vec<(Vec<u8>, Vec<u8>)>,
    },
    /// Records the partition's applied state once restored.
    Finish {
        /// Its applied state.
        applied: Vec<u8>,
    },
    /// Removes the partition's channels and windows and records `applied`
    /// (a blank partition's) as its applied state, in one write, telling
    /// subscribers nothing: the node no longer replicates the partition
    /// (its group committed a membership without it), and its devices
    /// follow the partition's channels from the leader. Not part of a
    /// restore.
    Discard {
        /// Its channels and windows on this node.
        scope: RestoreScope,
        /// The applied state of a partition never started here.
        applied: Vec<u8>,
    },
}

impl Restore {
    /// Payload bytes the step carries (for the writer queue's byte bound).
    pub(super) fn payload_bytes(&self) -> usize {
        match self {
            Restore::Part { channels, .. } => channels
                .iter()
                .flat_map(|(_, _, messages)| messages)
                .map(|m| m.payload.len())
                .sum(),
            _ => 0,
        }
    }
}

/// Which partitions this node is restoring from a snapshot, as readers
/// see it: between a restore's `Begin` and `Finish` its partition's
/// channels are half written (metadata before messages), so what a device
/// read there would tell (`Truncated`, an unknown channel) is not the
/// partition's state.
#[derive(Debug, Default)]
pub struct Restores {
    /// Partitions under way (a count first, so that reads pay one atomic
    /// load while none is).
    count: AtomicUsize,
    under_way: Mutex<HashSet<u32>>,
    /// Bumped at every restore's start and end: a read that saw it change
    /// may have read half of one state and half of another.
    changes: AtomicU64,
}

impl Restores {
    /// Whether `partition` is being restored now.
    pub fn is_restoring(&self, partition: u32) -> bool {
        self.count.load(Ordering::Acquire) > 0
            && self
                .under_way
                .lock()
                .is_ok_and(|under_way| under_way.contains(&partition))
    }

    /// How many restores started or ended so far (compare two readings).
    pub fn changes(&self) -> u64 {
        self.changes.load(Ordering::SeqCst)
    }

    /// Called before the restore's first write: readers stop trusting the
    /// partition before anything of it changes. False when the partition
    /// was listed already (a restore of it is under way).
    fn begin(&self, partition: u32) -> bool {
        let inserted = self
            .under_way
            .lock()
            .is_ok_and(|mut under_way| under_way.insert(partition));
        if inserted {
            self.count.fetch_add(1, Ordering::AcqRel);
        }
        self.changes.fetch_add(1, Ordering::SeqCst);
        inserted
    }

    /// Called after the restore's last write (or its failed first one).
    fn end(&self, partition: u32) {
        self.changes.fetch_add(1, Ordering::SeqCst);
        if let Ok(mut under_way) = self.under_way.lock()
            && under_way.remove(&partition)
        {
            self.count.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

/// The writer's record of a restore under way.
#[derive(Debug)]
pub(super) struct Restoring {
    /// The partition's channels on this node before the restore.
    before: HashSet<ChannelName>,
    /// Snapshot channel id → this node's new id.
    ids: HashMap<ChannelId, ChannelId>,
    /// The restored channels' metadata, as written.
    restored: HashMap<ChannelName, ChannelMeta>,
}

impl Writer {
    pub(super) fn restore(&mut self, partition: u32, step: Restore) -> Result<(), StoreError> {
        match step {
            Restore::Begin { scope, marker } => {
                let listed = self.restores.begin(partition);
                let begun = self.begin_restore(partition, &scope, marker);
                if begun.is_err() && listed {
                    // Nothing was written: the partition's state is as
                    // whole as before (unless an earlier restore of it is
                    // still under way, which keeps it listed).
                    self.restores.end(partition);
                }
                begun
            }
            Restore::Part {
                channels,
                producers,
                devices,
            } => self.restore_part(partition, channels, producers, devices),
            Restore::Finish { applied } => {
                let finished = self.finish_restore(partition, applied);
                if finished.is_ok() {
                    self.restores.end(partition);
                }
                finished
            }
            Restore::Discard { scope, applied } => {
                if self.restoring.contains_key(&partition) {
                    return Err(StoreError::Engine(format!(
                        "partition {partition} is being restored: it is not discarded"
                    )));
                }
                self.remove_partition(partition, &scope, applied)
                    .map(|_| ())
            }
        }
    }

    fn begin_restore(
        &mut self,
        partition: u32,
        scope: &RestoreScope,
        marker: Vec<u8>,
    ) -> Result<(), StoreError> {
        let before = self.remove_partition(partition, scope, marker)?;
        self.restoring.insert(
            partition,
            Restoring {
                before: before.into_iter().collect(),
                ids: HashMap::new(),
                restored: HashMap::new(),
            },
        );
        Ok(())
    }

    /// Removes the partition's channels and windows and writes `applied`
    /// as its applied state, in one write; answers the channels removed.
    fn remove_partition(
        &mut self,
        partition: u32,
        scope: &RestoreScope,
        applied: Vec<u8>,
    ) -> Result<Vec<ChannelName>, StoreError> {
        // The partition's channels and windows as stored: the writer is the
        // only one writing them, so the store is their whole truth.
        let mut channels = Vec::new();
        let mut producers = Vec::new();
        self.store.export(
            &ExportScope {
                channel: &*scope.channel,
                producer: &*scope.producer,
                devices: None,
            },
            &mut || {},
            &mut |item| {
                match item {
                    Exported::Channel(name, meta) => channels.push((name, meta)),
                    Exported::Producer(key, _) => producers.push(key),
                    Exported::Message(_) | Exported::Device(..) => {}
                }
                Ok(())
            },
        )?;
        let mut set = WriteSet::default();
        for (name, meta) in &channels {
            set.deleted_channels.push((name.clone(), meta.id));
            if !meta.is_empty() {
                set.age_index.push(AgeIndexMove {
                    channel: name.clone(),
                    id: meta.id,
                    from: Some(meta.oldest_ms),
                    to: None,
                });
            }
        }
        set.expired_producers = producers.clone();
        set.devices.removed_ranges.extend(scope.devices.clone());
        set.applied.push((partition, applied));
        self.store.write(&set, self.sync)?;
        for (name, _) in &channels {
            self.sequencer.channels_mut().remove(name);
            self.directory.remove(name);
        }
        for key in &producers {
            self.sequencer.producers_mut().remove(key);
        }
        // A restore writes windows behind the table's back: no owner may
        // count as whole in memory until it is loaded again.
        self.sequencer.producers_mut().forget_completeness();
        Ok(channels.into_iter().map(|(name, _)| name).collect())
    }

    fn restore_part(
        &mut self,
        partition: u32,
        channels: Vec<(ChannelName, ChannelMeta, Vec<StoredMessage>)>,
        producers: Vec<(ProducerKey, ProducerWindow)>,
        devices: Vec<(Vec<u8>, Vec<u8>)>,
    ) -> Result<(), StoreError> {
        let Some(restoring) = self.restoring.get_mut(&partition) else {
            return Err(StoreError::Engine(format!(
                "a snapshot part of partition {partition} arrived without its restore under way"
            )));
        };
        let mut set = WriteSet::default();
        let mut written = Vec::new();
        for (name, meta, messages) in channels {
            let id = match restoring.ids.get(&meta.id) {
                Some(id) => *id,
                None => {
                    let id = self.sequencer.take_channel_id();
                    restoring.ids.insert(meta.id, id);
                    let restored = ChannelMeta {
                        id,
                        generation: self.sequencer.generation(),
                        ..meta
                    };
                    set.channels.push((name.clone(), restored));
                    if !restored.is_empty() {
                        set.age_index.push(AgeIndexMove {
                            channel: name.clone(),
                            id,
                            from: None,
                            to: Some(restored.oldest_ms),
                        });
                    }
                    written.push((name, restored));
                    id
                }
            };
            set.messages
                .extend(messages.into_iter().map(|message| (id, message)));
        }
        for (key, mut window) in producers {
            // A run in a channel the snapshot does not hold (deleted since)
            // gets id 0, which no channel has: it never matches a retry.
            window.remap_channels(|old| restoring.ids.get(&old).copied().unwrap_or(0));
            set.producers.push((key, window));
        }
        set.devices.puts = devices;
        set.next_channel_id = Some(self.sequencer.next_channel_id());
        self.store.write(&set, self.sync)?;
        for (name, meta) in written {
            self.directory.insert(name.clone(), meta);
            restoring.restored.insert(name, meta);
        }
        Ok(())
    }

    fn finish_restore(&mut self, partition: u32, applied: Vec<u8>) -> Result<(), StoreError> {
        let Some(restoring) = self.restoring.remove(&partition) else {
            return Err(StoreError::Engine(format!(
                "partition {partition}'s restore was never begun"
            )));
        };
        let set = WriteSet {
            applied: vec![(partition, applied)],
            ..WriteSet::default()
        };
        self.store.write(&set, true)?;
        // Subscribers of a channel the snapshot no longer holds were
        // following a channel deleted meanwhile; the others catch up from
        // the restored log (their feed's head moves to its end).
        for name in &restoring.before {
            if !restoring.restored.contains_key(name) {
                self.listener.deleted(name);
            }
        }
        for (name, meta) in &restoring.restored {
            self.listener.committed(name, meta, &[]);
        }
        Ok(())
    }
}
