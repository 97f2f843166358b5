//! The data path's consensus: one openraft group per partition.
//!
//! - [`TypeConfig`] and the replicated [`Command`]s: what a partition's Raft
//!   log holds. A command carries everything its application needs from the
//!   leader (its clock, a seed for new epochs), so every replica that applies
//!   it decides the same offsets (DESIGN.md §7: offsets are assigned when an
//!   entry is applied).
//! - [`log_store`]: the Raft log and vote of every partition, in column
//!   families of the node's RocksDB.
//! - [`lease`]: whether a node may act as a partition's leader now (the
//!   check-quorum openraft 0.9 lacks).
//! - [`network`]: Raft's RPCs between nodes over QUIC with mutual TLS, one
//!   connection per node pair.
//! - [`snapshot_data`]: a snapshot's bytes, a received file or an export
//!   made as it is sent.
//!
//! The state machine that applies commands to channel logs is the broker's:
//! it owns the channel logs.

pub mod lease;
pub mod log_store;
pub mod network;
pub mod snapshot_data;
pub mod upstreams;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

pub use openraft::BasicNode;

use crate::placement::NodeId;

openraft::declare_raft_types!(
    /// A partition group's types: a node is a `u64` reached at its peer
    /// address ([`BasicNode::addr`]).
    pub TypeConfig:
        D = Command,
        R = Reply,
        NodeId = NodeId,
        Node = BasicNode,
        SnapshotData = snapshot_data::SnapshotData,
);

/// A partition's Raft handle.
pub type Raft = openraft::Raft<TypeConfig>;

/// The newest Raft entry format this build reads and may propose. Each
/// node advertises its own in etcd ([`crate::NodeInfo::log_format`]); a
/// leader proposes an entry of a newer format only once every replica of
/// the partition reads it, so that a rolling upgrade never leaves a
/// follower with entries it cannot decode.
///
/// - 0: the first format.
/// - 1 ([`EPOCH_CUTS`]): retention cuts carry the channel's epoch
///   ([`Command::Trim`]).
/// - 2 ([`PUSH_MARKS`]): how far the push hook posted
///   ([`Command::Posted`]).
/// - 3 ([`DEVICE_STATE`]): device state ([`Command::Devices`]).
pub const LOG_FORMAT: u32 = DEVICE_STATE;

/// The entry format from which retention cuts carry the channel's epoch.
pub const EPOCH_CUTS: u32 = 1;

/// The entry format from which the push hook's position is replicated.
pub const PUSH_MARKS: u32 = 2;

/// The entry format from which a partition replicates the device state of
/// its users.
pub const DEVICE_STATE: u32 = 3;

/// What a partition's log replicates.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// Publishes to sequence, in order.
    Append {
        /// The leader's clock when it proposed them: every replica stamps
        /// the messages with this time.
        now_ms: u64,
        /// Seeds the epoch of a channel these publishes create, so replicas
        /// agree on it.
        epoch_seed: u64,
        /// The publishes.
        publishes: Vec<Publish>,
    },
    /// Retention cuts as nodes proposed them before cuts named the channel's
    /// epoch: applied checking their `from` offset alone. Kept (and kept in
    /// this place: postcard numbers variants by position) so that logs
    /// written by those nodes still decode.
    UnversionedTrim(Vec<UnversionedTrimCut>),
    /// Channels deleted with their logs.
    Delete(Vec<String>),
    /// Retention cuts the leader computed, each for one incarnation of its
    /// channel.
    Trim(Vec<TrimCut>),
    /// The push hook of `namespace` posted the notices of the partition's
    /// messages up to the `notice`-th publish (from 0) of entry `index`:
    /// a new leader posts from there on.
    Posted {
        /// The namespace whose hook posted.
        namespace: String,
        /// The Raft log index of the last entry posted (in part).
        index: u64,
        /// The last publish of that entry posted, counted from 0.
        notice: u32,
    },
    /// Changes to the device state of the partition's users (cursors, read
    /// markers, the device registry), taken by node `origin`. The body is
    /// the broker's: this crate carries it as it carries payloads.
    Devices {
        /// The node whose devices made the changes (it told its own
        /// sessions of moved read markers already).
        origin: NodeId,
        /// The changes, encoded by the broker.
        changes: Bytes,
    },
}

/// One publish as replicated.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Publish {
    /// The channel (already validated by the node that took the publish).
    pub channel: String,
    /// The idempotency key, if any.
    pub producer: Option<ProducerStamp>,
    /// The body.
    pub payload: Bytes,
}

/// An idempotent publish's identity.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProducerStamp {
    /// The authenticated owner.
    pub owner: String,
    /// The client's producer id.
    pub producer_id: u64,
    /// This publish's sequence.
    pub sequence: u64,
    /// The earlier sequence that must be stored first, if any.
    pub after: Option<u64>,
    /// Whether the owner's windows are limited (end users).
    pub limited: bool,
}

/// A retention cut, replicated so every replica keeps the same range.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrimCut {
    /// The channel.
    pub channel: String,
    /// The first offset the cut was computed from (stale if it moved).
    pub from: u64,
    /// The channel's epoch the cut was computed from: stale in another
    /// incarnation of the channel (deleted and created again meanwhile).
    /// `None`: checked by `from` alone.
    pub epoch: Option<u64>,
    /// Everything below goes.
    pub below: u64,
    /// Payload bytes of `[from, below)`.
    pub freed_bytes: u64,
    /// The stored time of the message at `below`, or a lower bound.
    pub oldest_ms: u64,
}

/// A retention cut of [`Command::UnversionedTrim`]: a [`TrimCut`] without
/// the epoch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnversionedTrimCut {
    /// The channel.
    pub channel: String,
    /// The first offset the cut was computed from (stale if it moved).
    pub from: u64,
    /// Everything below goes.
    pub below: u64,
    /// Payload bytes of `[from, below)`.
    pub freed_bytes: u64,
    /// The stored time of the message at `below`, or a lower bound.
    pub oldest_ms: u64,
}

/// What applying a command decided, one entry per publish (or per deleted
/// channel); empty for trims and for membership entries.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reply {
    /// In the command's order.
    pub outcomes: Vec<Outcome>,
}

/// One publish's fate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    /// Stored at `offset` of a log in `epoch`.
    Stored {
        /// The offset.
        offset: u64,
        /// The channel log's epoch.
        epoch: u64,
        /// A retry of an already stored publish.
        duplicate: bool,
    },
    /// Refused; `code` is the wire error code the device is told.
    Refused {
        /// `volna_proto::ErrorCode` as a number.
        code: u16,
        /// Why, for people.
        message: String,
    },
    /// A deleted channel: whether it existed.
    Deleted {
        /// It existed.
        existed: bool,
    },
    /// A change to device state was applied.
    Applied,
}

impl From<UnversionedTrimCut> for TrimCut {
    /// An older node's cut, checked by its `from` offset alone.
    fn from(cut: UnversionedTrimCut) -> Self {
        Self {
            channel: cut.channel,
            from: cut.from,
            epoch: None,
            below: cut.below,
            freed_bytes: cut.freed_bytes,
            oldest_ms: cut.oldest_ms,
        }
    }
}

impl From<TrimCut> for UnversionedTrimCut {
    /// The cut as replicas that do not read [`EPOCH_CUTS`] decode it.
    fn from(cut: TrimCut) -> Self {
        Self {
            channel: cut.channel,
            from: cut.from,
            below: cut.below,
            freed_bytes: cut.freed_bytes,
            oldest_ms: cut.oldest_ms,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Postcard numbers enum variants by position: entries already in a
    /// Raft log must decode the same after an upgrade.
    #[test]
    fn entries_written_before_epoch_cuts_still_decode() {
        // A trim entry as nodes wrote it before cuts carried the epoch:
        // variant 1, one cut of `chat.a` from 1 below 5, 8 bytes, at 150.
        let mut old = vec![1u8, 1, 6];
        old.extend_from_slice(b"chat.a");
        old.extend_from_slice(&[1, 5, 8, 150, 1]);
        let decoded: Command = postcard::from_bytes(&old).expect("decodes");
        assert_eq!(
            decoded,
            Command::UnversionedTrim(vec![UnversionedTrimCut {
                channel: "chat.a".into(),
                from: 1,
                below: 5,
                freed_bytes: 8,
                oldest_ms: 150,
            }])
        );
        let delete =
            postcard::to_allocvec(&Command::Delete(vec!["chat.a".into()])).expect("encodes");
        assert_eq!(delete[0], 2, "deletes keep their variant number");
        let cut = TrimCut {
            channel: "chat.a".into(),
            from: 1,
            epoch: Some(7),
            below: 5,
            freed_bytes: 8,
            oldest_ms: 150,
        };
        let trim = Command::Trim(vec![cut]);
        let bytes = postcard::to_allocvec(&trim).expect("encodes");
        assert_eq!(bytes[0], 3);
        let posted = Command::Posted {
            namespace: "chat".into(),
            index: 9,
            notice: 2,
        };
        let marks = postcard::to_allocvec(&posted).expect("encodes");
        assert_eq!(marks[0], 4, "push marks come after every older variant");
        let devices = Command::Devices {
            origin: 2,
            changes: Bytes::from_static(b"x"),
        };
        let bytes_of_devices = postcard::to_allocvec(&devices).expect("encodes");
        assert_eq!(
            bytes_of_devices[0], 5,
            "device state comes after push marks"
        );
        assert_eq!(
            postcard::from_bytes::<Command>(&bytes).expect("decodes"),
            trim
        );
    }
}
