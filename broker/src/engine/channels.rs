//! The log writer's resident channel metadata (G9).
//!
//! Every channel's metadata lives in the store, one value per channel; this
//! table holds the ones in use, so that the writer sequences most publishes
//! without a read, and the channels nobody used for a while leave memory. A
//! messenger has a channel per chat and per inbox, hundreds of millions over
//! time: memory follows the active ones, not every name ever used. It is
//! owned by the writer thread's [`Sequencer`](crate::log::Sequencer) and is
//! pure: the writer loads missing channels from the store before it asks.
//!
//! Invariants:
//! - a channel not in the table is either in the store or does not exist: an
//!   entry leaves the table only after its metadata was written;
//! - after [`ChannelTable::evict`], at most 7/8 of `max_resident` entries
//!   remain; the least recently committed leave first.

use std::collections::HashMap;

use volna_proto::ChannelName;

use crate::store::ChannelMeta;

/// Resident channel metadata, with the order of last use.
#[derive(Debug)]
pub struct ChannelTable {
    entries: HashMap<ChannelName, Entry>,
    max_resident: usize,
    /// Counts uses; an entry's `used` is the count at its last use.
    clock: u64,
}

#[derive(Debug)]
struct Entry {
    meta: ChannelMeta,
    used: u64,
}

impl ChannelTable {
    /// An empty table that asks to be evicted above `max_resident` entries.
    pub fn new(max_resident: usize) -> Self {
        Self {
            entries: HashMap::new(),
            max_resident: max_resident.max(1),
            clock: 0,
        }
    }

    /// The resident metadata of `name`.
    pub fn get(&self, name: &ChannelName) -> Option<&ChannelMeta> {
        self.entries.get(name).map(|e| &e.meta)
    }

    /// Whether `name` is resident.
    pub fn contains(&self, name: &ChannelName) -> bool {
        self.entries.contains_key(name)
    }

    /// Makes `meta` the resident metadata of `name`, as just used.
    pub fn put(&mut self, name: ChannelName, meta: ChannelMeta) {
        self.clock += 1;
        let used = self.clock;
        self.entries.insert(name, Entry { meta, used });
    }

    /// Forgets `name` (it was deleted).
    pub fn remove(&mut self, name: &ChannelName) -> Option<ChannelMeta> {
        self.entries.remove(name).map(|e| e.meta)
    }

    /// Resident channels.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no channel is resident.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Every resident channel.
    pub fn iter(&self) -> impl Iterator<Item = (&ChannelName, &ChannelMeta)> {
        self.entries.iter().map(|(n, e)| (n, &e.meta))
    }

    /// Whether more than `max_resident` channels are resident.
    pub fn over_capacity(&self) -> bool {
        self.entries.len() > self.max_resident
    }

    /// Unloads the least recently used channels until 7/8 of
    /// `max_resident` remain (so that evicting is rare: one O(resident)
    /// pass per `max_resident / 8` new channels); returns their names.
    pub fn evict(&mut self) -> Vec<ChannelName> {
        if !self.over_capacity() {
            return Vec::new();
        }
        let keep = self.max_resident - self.max_resident / 8;
        let excess = self.entries.len() - keep;
        let mut by_use: Vec<(u64, &ChannelName)> =
            self.entries.iter().map(|(n, e)| (e.used, n)).collect();
        by_use.select_nth_unstable_by_key(excess - 1, |(used, _)| *used);
        let evicted: Vec<ChannelName> =
            by_use[..excess].iter().map(|(_, n)| (*n).clone()).collect();
        for name in &evicted {
            self.entries.remove(name);
        }
        evicted
    }
}

#[cfg(test)]
mod tests {
    use volna_proto::Epoch;

    use super::*;

    fn name(i: usize) -> ChannelName {
        ChannelName::new(format!("chat.{i}")).expect("name")
    }

    #[test]
    fn evicts_the_least_recently_used_down_to_seven_eighths() {
        let mut table = ChannelTable::new(16);
        for i in 0..16 {
            table.put(name(i), ChannelMeta::new(i as u64, Epoch(1)));
        }
        assert!(!table.over_capacity());
        assert!(table.evict().is_empty());
        // Channel 0 is used again: it is now the most recent.
        table.put(name(0), ChannelMeta::new(0, Epoch(1)));
        table.put(name(16), ChannelMeta::new(16, Epoch(1)));
        assert!(table.over_capacity());
        let mut evicted = table.evict();
        evicted.sort();
        let mut expected: Vec<_> = (1..4).map(name).collect();
        expected.sort();
        assert_eq!(evicted, expected);
        assert_eq!(table.len(), 14);
        assert!(table.contains(&name(0)) && table.contains(&name(16)));
        assert!(table.get(&name(1)).is_none());
    }
}
