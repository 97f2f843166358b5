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
//!
//! The state machine that applies commands to channel logs is the broker's:
//! it owns the channel logs.

pub mod lease;
pub mod log_store;
pub mod network;

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
        SnapshotData = tokio::fs::File,
);

/// A partition's Raft handle.
pub type Raft = openraft::Raft<TypeConfig>;

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
    /// Retention cuts the leader computed.
    Trim(Vec<TrimCut>),
    /// Channels deleted with their logs.
    Delete(Vec<String>),
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
}
