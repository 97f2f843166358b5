//! Whether a node may act as a partition's leader right now: the leader
//! lease openraft 0.9 does not enforce.
//!
//! openraft 0.9 has no check-quorum: a leader cut off from its peers stays
//! leader in its own eyes until it hears a higher term, which it cannot
//! while cut off. Its proposals never commit and its devices hear nothing
//! (DESIGN.md §7, "cut off means told"). openraft does report, for a
//! leader, how long ago a quorum last acknowledged it
//! (`millis_since_quorum_ack`, refreshed on every tick and heartbeat
//! reply). A leader whose last quorum acknowledgement is older than the
//! lease (the election timeout: by then the others may have elected
//! another) is treated as no leader at all: it takes no proposals, serves
//! no reads as leader and does not cut retention.
//!
//! A group whose storage failed (`running_state` is an error) leads
//! nothing either, whatever its last `current_leader` says.

use std::time::Duration;

use super::Raft;
use crate::placement::NodeId;

/// What a node knows of its standing in one partition group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Standing {
    /// It leads, and a quorum acknowledged it within the lease.
    Leader,
    /// It was elected leader, but no quorum acknowledged it within the
    /// lease: it may be cut off (another leader may exist).
    LeaseExpired {
        /// Since the last quorum acknowledgement, if there ever was one.
        millis_since_quorum_ack: Option<u64>,
    },
    /// Another node leads, as far as this one knows.
    Follower(NodeId),
    /// No leader known (an election is on, or the node is cut off).
    NoLeader,
    /// The group stopped: its storage failed.
    Failed,
}

impl Standing {
    /// `raft`'s standing on `node`, with a lease of `lease`.
    pub fn of(raft: &Raft, node: NodeId, lease: Duration) -> Self {
        let metrics = raft.metrics();
        let metrics = metrics.borrow();
        if metrics.running_state.is_err() {
            return Standing::Failed;
        }
        match metrics.current_leader {
            Some(leader) if leader == node => {
                let voters = metrics.membership_config.membership().voter_ids().count();
                let lease_ms = u64::try_from(lease.as_millis()).unwrap_or(u64::MAX);
                match metrics.millis_since_quorum_ack {
                    // A group of one is its own quorum.
                    _ if voters <= 1 => Standing::Leader,
                    Some(ms) if ms <= lease_ms => Standing::Leader,
                    millis_since_quorum_ack => Standing::LeaseExpired {
                        millis_since_quorum_ack,
                    },
                }
            }
            Some(leader) => Standing::Follower(leader),
            None => Standing::NoLeader,
        }
    }

    /// Whether the node may act as the partition's leader.
    pub fn leads(self) -> bool {
        self == Standing::Leader
    }
}
