//! The log writer's resident producer windows (G5, G9).
//!
//! Windows live in the store, one value per producer; this table holds the
//! ones in use, so the writer answers most publishes without a read. It is
//! owned by the writer thread's [`Sequencer`](crate::log::Sequencer) and is
//! pure: the writer loads missing windows from the store before it asks.
//!
//! Invariants:
//! - a window not in the table and not in the store does not exist (it
//!   never did, or it expired): a window is only dropped from the table
//!   while it is on disk, or when it expired and its point delete is being
//!   written;
//! - at most `max_resident` windows after each [`ProducerTable::sweep`];
//!   the least recently published are dropped from memory first;
//! - per owner, the resident windows are known so that a user's live
//!   windows can be limited: beyond the limit the owner's least recently
//!   used window is evicted (a phone cold-started many times a day must
//!   not be locked out by the producers of its earlier runs);
//! - an owner is *complete* when every window of it in the store is
//!   resident: only then does counting its resident windows count what is
//!   stored. The writer loads an owner's every window before the limit is
//!   applied to it, so the decision depends on stored state alone, never
//!   on what happens to be in memory (replicas decide alike, DESIGN.md §7);
//! - liveness is judged at the time the caller passes (a replicated
//!   entry's, never this node's clock): a resident window idle past the
//!   horizon at that time is treated as absent even before a sweep drops
//!   it.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use crate::store::{ProducerKey, ProducerWindow};

/// Resident producer windows, with a count per owner.
#[derive(Debug)]
pub struct ProducerTable {
    windows: HashMap<ProducerKey, ProducerWindow>,
    per_owner: HashMap<Arc<str>, HashSet<u64>>,
    /// Owners all of whose stored windows are resident.
    complete: HashSet<Arc<str>>,
    max_resident: usize,
    idle_ms: u64,
}

/// What a sweep removed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Swept {
    /// Windows idle past the horizon: to delete from the store.
    pub expired: Vec<ProducerKey>,
    /// Windows dropped from memory only (still on disk).
    pub unloaded: usize,
}

impl ProducerTable {
    /// An empty table holding at most `max_resident` windows after a sweep,
    /// expiring windows idle for `idle_ms`.
    pub fn new(max_resident: usize, idle_ms: u64) -> Self {
        Self {
            windows: HashMap::new(),
            per_owner: HashMap::new(),
            complete: HashSet::new(),
            max_resident: max_resident.max(1),
            idle_ms,
        }
    }

    /// The resident window of `key`.
    pub fn get(&self, key: &ProducerKey) -> Option<&ProducerWindow> {
        self.windows.get(key)
    }

    /// The resident window of `key` if it is live at `now_ms`.
    pub fn live(&self, key: &ProducerKey, now_ms: u64) -> Option<&ProducerWindow> {
        self.windows
            .get(key)
            .filter(|window| self.is_live(window, now_ms))
    }

    /// `owner`'s resident windows live at `now_ms`.
    pub fn live_owned_by(&self, owner: &str, now_ms: u64) -> u32 {
        let Some(ids) = self.per_owner.get(owner) else {
            return 0;
        };
        let live = ids
            .iter()
            .filter(|id| {
                self.windows
                    .get(&ProducerKey::new(Arc::from(owner), **id))
                    .is_some_and(|w| self.is_live(w, now_ms))
            })
            .count();
        u32::try_from(live).unwrap_or(u32::MAX)
    }

    /// Whether every stored window of `owner` is resident.
    pub fn is_complete(&self, owner: &str) -> bool {
        self.complete.contains(owner)
    }

    /// Makes `owner`'s stored `windows` (all of them) resident and the
    /// owner complete.
    pub fn put_owner(&mut self, owner: Arc<str>, windows: Vec<(u64, ProducerWindow)>) {
        if windows.is_empty() {
            // Nothing to hold: an owner without windows is not kept (a
            // refused publish must not leave an entry behind, G9).
            return;
        }
        for (id, window) in windows {
            let key = ProducerKey::new(owner.clone(), id);
            if !self.windows.contains_key(&key) {
                self.put(key, window);
            }
        }
        self.complete.insert(owner);
    }

    /// Whether `key`'s window is resident.
    pub fn contains(&self, key: &ProducerKey) -> bool {
        self.windows.contains_key(key)
    }

    /// Resident windows of `owner`.
    pub fn owned_by(&self, owner: &str) -> u32 {
        self.per_owner
            .get(owner)
            .map_or(0, |ids| u32::try_from(ids.len()).unwrap_or(u32::MAX))
    }

    /// `owner`'s resident window live at `now_ms` published to least
    /// recently, leaving out those `skip` names (already evicted in the
    /// batch being prepared). Ties go to the lowest producer id, so the
    /// choice does not depend on hash order.
    pub fn least_recent_of(
        &self,
        owner: &Arc<str>,
        now_ms: u64,
        skip: impl Fn(&ProducerKey) -> bool,
    ) -> Option<ProducerKey> {
        self.per_owner
            .get(owner)?
            .iter()
            .map(|id| ProducerKey::new(owner.clone(), *id))
            .filter(|key| !skip(key))
            .filter_map(|key| Some((self.live(&key, now_ms)?.last_publish_ms, key)))
            .min_by(|a, b| (a.0, a.1.producer_id).cmp(&(b.0, b.1.producer_id)))
            .map(|(_, key)| key)
    }

    /// Resident windows.
    pub fn len(&self) -> usize {
        self.windows.len()
    }

    /// Whether no window is resident.
    pub fn is_empty(&self) -> bool {
        self.windows.is_empty()
    }

    /// Whether a window read from the store is still live at `now_ms`.
    pub fn is_live(&self, window: &ProducerWindow, now_ms: u64) -> bool {
        !window.is_expired(now_ms, self.idle_ms)
    }

    /// Stores `window` as `key`'s (a newly stored sequence, or one loaded
    /// from the store).
    pub fn put(&mut self, key: ProducerKey, window: ProducerWindow) {
        let (owner, id) = (key.owner.clone(), key.producer_id);
        if self.windows.insert(key, window).is_none() {
            self.per_owner.entry(owner).or_default().insert(id);
        }
    }

    /// Forgets `key`'s resident window (its state on disk was replaced).
    pub fn remove(&mut self, key: &ProducerKey) {
        if self.windows.remove(key).is_some() {
            self.forget_owner(key);
        }
        // Whether the store changed alike is the caller's business: the
        // owner is counted from the store again on its next new window.
        self.complete.remove(&key.owner);
    }

    /// Drops idle windows (returned, to delete from the store), then, above
    /// `max_resident`, the least recently published ones down to 7/8 of it
    /// so that sweeping stays amortised O(1) per publish. A window's
    /// idleness is judged at `now_ms(key)`: the time of the partition it
    /// belongs to (`None`: unknown yet, kept).
    pub fn sweep(&mut self, now_ms: impl Fn(&ProducerKey) -> Option<u64>) -> Swept {
        let idle_ms = self.idle_ms;
        let mut swept = Swept::default();
        self.windows.retain(|key, window| {
            let live = now_ms(key).is_none_or(|now| !window.is_expired(now, idle_ms));
            if !live {
                swept.expired.push(key.clone());
            }
            live
        });
        if self.windows.len() > self.max_resident {
            let keep = self.max_resident - self.max_resident / 8;
            let mut by_age: Vec<(u64, ProducerKey)> = self
                .windows
                .iter()
                .map(|(k, w)| (w.last_publish_ms, k.clone()))
                .collect();
            let cut = by_age.len() - keep;
            by_age.select_nth_unstable_by_key(cut - 1, |(t, _)| *t);
            for (_, key) in by_age.drain(..cut) {
                self.windows.remove(&key);
                self.forget_owner(&key);
                // Its window is still stored: the owner is no longer whole
                // in memory.
                self.complete.remove(&key.owner);
                swept.unloaded += 1;
            }
        }
        for key in &swept.expired {
            self.forget_owner(key);
        }
        swept
    }

    /// Forgets which owners are whole in memory (the store changed behind
    /// the table: a partition restored from a snapshot).
    pub fn forget_completeness(&mut self) {
        self.complete.clear();
    }

    /// Whether a sweep is due: windows above the cap.
    pub fn over_capacity(&self) -> bool {
        self.windows.len() > self.max_resident
    }

    fn forget_owner(&mut self, key: &ProducerKey) {
        if let Some(ids) = self.per_owner.get_mut(&key.owner) {
            ids.remove(&key.producer_id);
            if ids.is_empty() {
                self.per_owner.remove(&key.owner);
                // Nothing of it resident: the next use loads it again.
                self.complete.remove(&key.owner);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use volna_proto::{Epoch, Offset};

    use super::*;
    use crate::store::ProducerEntry;

    fn window(last_publish_ms: u64) -> ProducerWindow {
        let mut w = ProducerWindow::default();
        let entry = ProducerEntry {
            sequence: 1,
            channel: 1,
            offset: Offset::FIRST,
            epoch: Epoch(1),
        };
        w.insert(entry, 4, last_publish_ms);
        w
    }

    fn key(owner: &str, id: u64) -> ProducerKey {
        ProducerKey::new(owner.into(), id)
    }

    #[test]
    fn idle_windows_expire_and_owners_are_counted() {
        let mut t = ProducerTable::new(100, 1_000);
        t.put(key("ann", 1), window(0));
        t.put(key("ann", 2), window(5_000));
        t.put(key("ann", 2), window(5_500));
        t.put(key("bob", 1), window(5_000));
        assert_eq!((t.owned_by("ann"), t.owned_by("bob")), (2, 1));
        let swept = t.sweep(|_| Some(5_900));
        assert_eq!(swept.expired, [key("ann", 1)]);
        assert_eq!(swept.unloaded, 0);
        assert_eq!((t.owned_by("ann"), t.len()), (1, 2));
        assert!(!t.is_live(&window(0), 5_900));
        assert!(t.is_live(&window(5_000), 5_900));
    }

    #[test]
    fn an_owners_least_recent_window_is_found_skipping_the_evicted() {
        let mut t = ProducerTable::new(100, u64::MAX);
        t.put(key("ann", 1), window(30));
        t.put(key("ann", 2), window(10));
        t.put(key("ann", 3), window(10));
        t.put(key("bob", 4), window(1));
        let ann: Arc<str> = "ann".into();
        assert_eq!(t.least_recent_of(&ann, 100, |_| false), Some(key("ann", 2)));
        assert_eq!(
            t.least_recent_of(&ann, 100, |k| k.producer_id == 2),
            Some(key("ann", 3))
        );
        assert_eq!(
            t.least_recent_of(&ann, 100, |k| k.producer_id != 1),
            Some(key("ann", 1))
        );
        assert_eq!(t.least_recent_of(&ann, 100, |_| true), None);
        t.remove(&key("ann", 2));
        assert_eq!(t.owned_by("ann"), 2);
        assert_eq!(t.least_recent_of(&"eve".into(), 100, |_| false), None);
    }

    #[test]
    fn liveness_is_judged_at_the_time_given_not_by_a_sweep() {
        let mut t = ProducerTable::new(100, 1_000);
        t.put(key("ann", 1), window(0));
        t.put(key("ann", 2), window(5_000));
        // Not swept yet, but idle at 5,900: absent for every decision.
        assert!(t.live(&key("ann", 1), 5_900).is_none());
        assert!(t.live(&key("ann", 1), 900).is_some());
        assert_eq!(t.live_owned_by("ann", 5_900), 1);
        assert_eq!(t.live_owned_by("ann", 900), 2);
        let ann: Arc<str> = "ann".into();
        assert_eq!(
            t.least_recent_of(&ann, 5_900, |_| false),
            Some(key("ann", 2))
        );
        // A partition whose time is unknown keeps its windows.
        let swept = t.sweep(|_| None);
        assert!(swept.expired.is_empty());
    }

    #[test]
    fn an_owner_is_complete_until_one_of_its_stored_windows_leaves_memory() {
        let mut t = ProducerTable::new(2, u64::MAX);
        t.put_owner("ann".into(), vec![(1, window(1)), (2, window(2))]);
        assert!(t.is_complete("ann"));
        t.put(key("ann", 3), window(3));
        assert!(t.is_complete("ann"), "a new window is stored and resident");
        let swept = t.sweep(|_| Some(10));
        assert_eq!(swept.unloaded, 1);
        assert!(!t.is_complete("ann"), "an unloaded window is only on disk");
    }

    #[test]
    fn above_the_cap_the_least_recently_published_leave_memory() {
        let mut t = ProducerTable::new(16, u64::MAX);
        for i in 0..20 {
            t.put(key("ann", i), window(i));
        }
        assert!(t.over_capacity());
        let swept = t.sweep(|_| Some(100));
        assert!(swept.expired.is_empty());
        assert_eq!(swept.unloaded, 6);
        assert_eq!(t.len(), 14);
        assert_eq!(t.owned_by("ann"), 14);
        assert!(!t.contains(&key("ann", 5)));
        assert!(t.contains(&key("ann", 6)));
    }
}
