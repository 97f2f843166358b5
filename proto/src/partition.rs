//! Which partition of a cluster a channel belongs to.
//!
//! The hash is part of the data layout: every node of a cluster, of every
//! version, must map a channel to the same partition for as long as the
//! cluster lives, so it is a fixed, seedless function (XXH3-64 of the
//! channel name's bytes) and a test pins its values. It lives with the
//! names it hashes so that tools (`volna bench`) place channels exactly as
//! nodes do.

/// The partition (numbered from 0) of `channel` in a cluster of
/// `partitions` (at least 1).
pub fn partition_index(channel: &str, partitions: u32) -> u32 {
    let hash = xxhash_rust::xxh3::xxh3_64(channel.as_bytes());
    (hash % u64::from(partitions.max(1))) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mapping_is_pinned() {
        // Changing these values would move every channel of a running
        // cluster to another partition: never.
        let pinned: Vec<u32> = ["chat.1", "user.42.inbox", "news.sport", ""]
            .iter()
            .map(|c| partition_index(c, 64))
            .collect();
        assert_eq!(pinned, [11, 19, 9, 2]);
    }

    #[test]
    fn channels_spread_over_the_partitions() {
        let mut counts = [0u32; 64];
        for i in 0..64_000 {
            counts[partition_index(&format!("user.{i}.inbox"), 64) as usize] += 1;
        }
        let (min, max) = (counts.iter().min(), counts.iter().max());
        assert!(
            min >= Some(&850) && max <= Some(&1150),
            "uneven: {min:?}..{max:?}"
        );
        assert_eq!(partition_index("chat.1", 1), 0);
        assert_eq!(partition_index("chat.1", 0), 0);
    }
}
