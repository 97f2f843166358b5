//! Where each partition's replicas live: a pure function from the live
//! nodes and the current map to the next map, run by the placer.
//!
//! Goals, in order:
//! 1. every partition has `replicas` replicas (or as many as there are live
//!    nodes) on distinct live nodes;
//! 2. a change moves as little as it can: a lost node's replicas are
//!    replaced where they were, everything else stays;
//! 3. nodes hold about as many replicas each (within one), reached a few
//!    moves per step (`max_moves`), so a joining node takes data over
//!    gradually while publishing goes on.
//!
//! Ties are broken by node id, so every placer computes the same map.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::partition::PartitionId;

/// A node's id in the cluster (`cluster.node_id`).
pub type NodeId = u64;

/// Which nodes hold each partition.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionMap {
    /// Grows with every change the placer writes.
    pub version: u64,
    /// By partition: distinct nodes; the first is the preferred leader.
    pub replicas: Vec<Vec<NodeId>>,
}

impl PartitionMap {
    /// A map of `partitions` partitions with no replica anywhere.
    pub fn empty(partitions: u32) -> Self {
        Self {
            version: 0,
            replicas: vec![Vec::new(); partitions as usize],
        }
    }

    /// The nodes holding `partition`.
    pub fn replicas_of(&self, partition: PartitionId) -> &[NodeId] {
        self.replicas
            .get(partition.0 as usize)
            .map_or(&[], Vec::as_slice)
    }

    /// Replicas held per node.
    pub fn load(&self) -> BTreeMap<NodeId, usize> {
        let mut load = BTreeMap::new();
        for node in self.replicas.iter().flatten() {
            *load.entry(*node).or_default() += 1;
        }
        load
    }
}

/// The next map for `live` nodes: see the module's goals. Returns `current`
/// (same version) when nothing needs to change.
pub fn place(
    current: &PartitionMap,
    live: &BTreeSet<NodeId>,
    replicas: usize,
    max_moves: usize,
) -> PartitionMap {
    let want = replicas.min(live.len());
    let mut next = current.clone();
    let mut load: BTreeMap<NodeId, usize> = live.iter().map(|n| (*n, 0)).collect();
    // 1. Keep what is on live nodes.
    for set in &mut next.replicas {
        set.retain(|n| live.contains(n));
        let mut seen = BTreeSet::new();
        set.retain(|n| seen.insert(*n));
        set.truncate(want);
        for node in set.iter() {
            *load.entry(*node).or_default() += 1;
        }
    }
    // 2. Fill each partition from the least loaded nodes it lacks.
    for set in &mut next.replicas {
        while set.len() < want {
            let Some(node) = load
                .iter()
                .filter(|(n, _)| !set.contains(n))
                .min_by_key(|(n, l)| (**l, **n))
                .map(|(n, _)| *n)
            else {
                break;
            };
            set.push(node);
            *load.entry(node).or_default() += 1;
        }
    }
    // 3. Even out, a few moves at a time.
    let mut moves = 0;
    while moves < max_moves {
        let (Some((&most, &high)), Some((&least, &low))) = (
            load.iter().max_by_key(|(n, l)| (**l, **n)),
            load.iter().min_by_key(|(n, l)| (**l, **n)),
        ) else {
            break;
        };
        if high <= low + 1 {
            break;
        }
        // More partitions hold `most` than `least`: one holds the first
        // and not the second.
        let Some(set) = next
            .replicas
            .iter_mut()
            .find(|set| set.contains(&most) && !set.contains(&least))
        else {
            break;
        };
        for node in set.iter_mut() {
            if *node == most {
                *node = least;
            }
        }
        *load.entry(most).or_default() -= 1;
        *load.entry(least).or_default() += 1;
        moves += 1;
    }
    if next.replicas != current.replicas {
        next.version = current.version + 1;
    }
    next
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn nodes(ids: &[NodeId]) -> BTreeSet<NodeId> {
        ids.iter().copied().collect()
    }

    fn check_valid(map: &PartitionMap, live: &BTreeSet<NodeId>, replicas: usize) {
        for set in &map.replicas {
            assert_eq!(set.len(), replicas.min(live.len()), "{map:?}");
            assert!(set.iter().all(|n| live.contains(n)), "{map:?}");
            assert_eq!(set.iter().collect::<BTreeSet<_>>().len(), set.len());
        }
    }

    #[test]
    fn a_new_cluster_is_balanced_and_a_lost_node_moves_only_its_replicas() {
        let live = nodes(&[1, 2, 3]);
        let map = place(&PartitionMap::empty(64), &live, 3, usize::MAX);
        check_valid(&map, &live, 3);
        assert_eq!(map.version, 1);
        // Three replicas on three nodes: each holds every partition.
        assert!(map.load().values().all(|l| *l == 64));
        // Stable: placing again changes nothing.
        assert_eq!(place(&map, &live, 3, usize::MAX), map);

        let five = nodes(&[1, 2, 3, 4, 5]);
        let spread = place(&map, &five, 3, usize::MAX);
        check_valid(&spread, &five, 3);
        let load = spread.load();
        let (min, max) = (load.values().min(), load.values().max());
        assert!(max.zip(min).is_some_and(|(a, b)| a - b <= 1), "{load:?}");

        // Node 4 is lost: only the partitions it held change, and each
        // keeps its two other replicas.
        let four = nodes(&[1, 2, 3, 5]);
        let after = place(&spread, &four, 3, 0);
        check_valid(&after, &four, 3);
        for (before, now) in spread.replicas.iter().zip(&after.replicas) {
            if before.contains(&4) {
                let kept: Vec<_> = before.iter().filter(|n| **n != 4).collect();
                assert!(kept.iter().all(|n| now.contains(n)));
            } else {
                assert_eq!(before, now);
            }
        }
    }

    #[test]
    fn a_joining_node_takes_over_a_few_replicas_per_step() {
        let three = nodes(&[1, 2, 3]);
        let map = place(&PartitionMap::empty(16), &three, 2, usize::MAX);
        let four = nodes(&[1, 2, 3, 4]);
        let step = place(&map, &four, 2, 2);
        let moved = map
            .replicas
            .iter()
            .zip(&step.replicas)
            .filter(|(a, b)| a != b)
            .count();
        assert_eq!(moved, 2);
        assert_eq!(step.load().get(&4), Some(&2));
        let mut settled = step;
        for _ in 0..16 {
            settled = place(&settled, &four, 2, 2);
        }
        assert_eq!(
            settled.load().values().copied().collect::<Vec<_>>(),
            [8, 8, 8, 8]
        );
    }

    proptest! {
        #[test]
        fn placements_are_valid_stable_and_even(
            partitions in 1u32..96,
            replicas in 1usize..5,
            first in proptest::collection::btree_set(1u64..12, 1..8),
            second in proptest::collection::btree_set(1u64..12, 1..8),
        ) {
            let map = place(&PartitionMap::empty(partitions), &first, replicas, usize::MAX);
            check_valid(&map, &first, replicas);
            prop_assert_eq!(&place(&map, &first, replicas, usize::MAX), &map);
            let next = place(&map, &second, replicas, usize::MAX);
            check_valid(&next, &second, replicas);
            let load = next.load();
            let (min, max) = (
                second.iter().map(|n| load.get(n).copied().unwrap_or(0)).min(),
                second.iter().map(|n| load.get(n).copied().unwrap_or(0)).max(),
            );
            prop_assert!(max.zip(min).is_some_and(|(a, b)| a - b <= 1), "{:?}", load);
            prop_assert!(next.version >= map.version);
        }
    }
}
