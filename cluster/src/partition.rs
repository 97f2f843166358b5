//! Which partition a channel belongs to: [`volna_proto::partition_index`]
//! (a fixed hash, pinned there), as a [`PartitionId`].

use serde::{Deserialize, Serialize};

/// One of a cluster's `partitions`, numbered from 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct PartitionId(pub u32);

impl std::fmt::Display for PartitionId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "p{}", self.0)
    }
}

/// The partition of `channel` in a cluster of `partitions` (at least 1).
pub fn partition_of(channel: &str, partitions: u32) -> PartitionId {
    PartitionId(volna_proto::partition_index(channel, partitions))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_partition_id_is_the_protocols_index() {
        assert_eq!(partition_of("chat.1", 64), PartitionId(11));
        assert_eq!(partition_of("chat.1", 0), PartitionId(0));
    }
}
