//! The order of a client's publishes to each channel while they are in
//! flight.
//!
//! A chat shows messages in the order they are stored, so one client's
//! publishes to a channel must be stored in the order the application
//! issued them, across reconnects and retries (as Kafka's idempotent
//! producer keeps per-partition order). Two rules do it:
//! - a publish is sent on a connection only after every earlier in-flight
//!   publish of the channel was sent on that same connection, so they
//!   reach the broker in order whatever the retries race;
//! - a publish names (`after`) the sequence of the publish just before it,
//!   and the broker refuses it (`OutOfOrder`, nothing stored) until that one
//!   is stored, so a predecessor refused for a while (rate limit, a full
//!   disk) holds its successors back instead of being overtaken.
//!
//! Only the first publish waiting its turn can be the next to go (every
//! later one has it as an unsent predecessor), so a change wakes that one
//! alone: thousands of queued publishes cost one wake-up per send, not a
//! stampede.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;
use volna_proto::ChannelName;

/// Every channel's in-flight publishes, in issue order.
#[derive(Debug, Default)]
pub(crate) struct InFlight {
    channels: Mutex<HashMap<ChannelName, VecDeque<Arc<Entry>>>>,
    /// Publishes waiting their turn, all channels: while none does (the
    /// common case), a send wakes nobody and looks at no queue.
    waiting: AtomicUsize,
}

/// One publish in flight.
#[derive(Debug, Default)]
struct Entry {
    /// Its current sequence (0: none taken yet).
    sequence: AtomicU64,
    /// The connection it was last sent on (0: it must be sent again).
    sent_on: AtomicU64,
    /// It waits in [`Place::turn`].
    waiting: AtomicBool,
    /// Wakes it there.
    woken: Notify,
}

/// A publish's place in its channel's order; leaving it (drop) lets the
/// publishes behind it go on.
#[derive(Debug)]
pub(crate) struct Place<'a> {
    registry: &'a InFlight,
    channel: ChannelName,
    entry: Arc<Entry>,
}

impl InFlight {
    /// Takes the next place in `channel`'s order.
    pub fn enter(&self, channel: &ChannelName) -> Place<'_> {
        let entry = Arc::new(Entry::default());
        self.lock()
            .entry(channel.clone())
            .or_default()
            .push_back(entry.clone());
        Place {
            registry: self,
            channel: channel.clone(),
            entry,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<ChannelName, VecDeque<Arc<Entry>>>> {
        self.channels.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Wakes the first publish of `channel` waiting its turn: the only one
    /// a change can let go.
    fn wake_first(&self, channel: &ChannelName) {
        // SeqCst with the waiter's count and its look at `sent_on`: one of
        // the two sees the other's write (else a wake-up could be missed).
        if self.waiting.load(Ordering::SeqCst) == 0 {
            return;
        }
        let channels = self.lock();
        if let Some(first) = channels
            .get(channel)
            .and_then(|queue| queue.iter().find(|e| e.waiting.load(Ordering::Acquire)))
        {
            first.woken.notify_one();
        }
    }

    /// Whether every publish ahead of `entry` was sent on `connection`;
    /// if so, the sequence of the one just ahead, if any.
    fn ready(
        &self,
        channel: &ChannelName,
        entry: &Arc<Entry>,
        connection: u64,
    ) -> Option<Option<u64>> {
        let channels = self.lock();
        let queue = channels.get(channel)?;
        let mut ahead = None;
        for other in queue {
            if Arc::ptr_eq(other, entry) {
                return Some(ahead);
            }
            if other.sent_on.load(Ordering::SeqCst) != connection {
                return None;
            }
            ahead = Some(other.sequence.load(Ordering::Acquire));
        }
        None
    }
}

impl Place<'_> {
    /// Waits until this publish may be sent on `connection`; returns the
    /// sequence it must follow (`after`).
    pub async fn turn(&self, connection: u64) -> Option<u64> {
        let _waiting = Waiting::new(self.registry, &self.entry);
        loop {
            // A wake-up between the check and the wait is kept (a permit).
            let woken = self.entry.woken.notified();
            if let Some(after) = self.registry.ready(&self.channel, &self.entry, connection) {
                return after;
            }
            woken.await;
        }
    }

    /// This publish was queued on `connection` with `sequence`.
    pub fn sent(&self, connection: u64, sequence: u64) {
        self.entry.sequence.store(sequence, Ordering::Release);
        self.entry.sent_on.store(connection, Ordering::SeqCst);
        self.registry.wake_first(&self.channel);
    }

    /// This publish was refused and will be sent again: those behind it
    /// wait for that.
    pub fn unsent(&self) {
        self.entry.sent_on.store(0, Ordering::Release);
    }
}

/// Marks an entry as waiting its turn while it lives (also when the wait
/// is cancelled).
struct Waiting<'a>(&'a InFlight, &'a Entry);

impl<'a> Waiting<'a> {
    fn new(registry: &'a InFlight, entry: &'a Entry) -> Self {
        // Counted before the entry is marked, so that a send that sees the
        // mark also sees the count.
        registry.waiting.fetch_add(1, Ordering::SeqCst);
        entry.waiting.store(true, Ordering::Release);
        Self(registry, entry)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.1.waiting.store(false, Ordering::Release);
        self.0.waiting.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Drop for Place<'_> {
    fn drop(&mut self) {
        let mut channels = self.registry.lock();
        if let Some(queue) = channels.get_mut(&self.channel) {
            queue.retain(|e| !Arc::ptr_eq(e, &self.entry));
            if queue.is_empty() {
                channels.remove(&self.channel);
            }
        }
        drop(channels);
        self.registry.wake_first(&self.channel);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn chat() -> ChannelName {
        ChannelName::new("chat.1").expect("name")
    }

    #[tokio::test]
    async fn a_publish_waits_for_those_ahead_to_be_sent_on_its_connection() {
        let registry = InFlight::default();
        let (a, b) = (registry.enter(&chat()), registry.enter(&chat()));
        let other = registry.enter(&ChannelName::new("chat.2").expect("name"));
        assert_eq!(a.turn(1).await, None);
        // Other channels do not wait for this one.
        assert_eq!(other.turn(1).await, None);
        let waiting = tokio::time::timeout(Duration::from_millis(20), b.turn(1)).await;
        assert!(waiting.is_err(), "b went ahead of a");
        a.sent(1, 41);
        assert_eq!(b.turn(1).await, Some(41));
        // A new connection: a must be sent on it first.
        let waiting = tokio::time::timeout(Duration::from_millis(20), b.turn(2)).await;
        assert!(waiting.is_err(), "b went ahead of a's resend");
        a.sent(2, 41);
        assert_eq!(b.turn(2).await, Some(41));
        // Refused and to be sent again: b waits again, then follows a's new
        // sequence.
        a.unsent();
        assert!(
            tokio::time::timeout(Duration::from_millis(20), b.turn(2))
                .await
                .is_err()
        );
        a.sent(2, 57);
        assert_eq!(b.turn(2).await, Some(57));
        // Done (or given up): b no longer follows anything.
        drop(a);
        assert_eq!(b.turn(2).await, None);
        drop(b);
        assert!(registry.lock().get(&chat()).is_none());
    }

    #[tokio::test]
    async fn a_long_queue_goes_in_order_one_wake_up_at_a_time() {
        let registry = std::sync::Arc::new(InFlight::default());
        let order = std::sync::Arc::new(Mutex::new(Vec::new()));
        let places: Vec<_> = (0..2_000u64).map(|_| registry.enter(&chat())).collect();
        let mut tasks = Vec::new();
        // Waiters start in reverse: the order comes from the queue alone.
        for (i, place) in places.into_iter().enumerate().rev() {
            let order = order.clone();
            tasks.push(async move {
                let after = place.turn(1).await;
                order.lock().expect("lock").push((i, after));
                place.sent(1, i as u64 + 100);
                place
            });
        }
        let done = futures_util::future::join_all(tasks).await;
        let order = order.lock().expect("lock").clone();
        let expected: Vec<_> = (0..2_000usize)
            .map(|i| (i, i.checked_sub(1).map(|p| p as u64 + 100)))
            .collect();
        assert_eq!(order, expected);
        drop(done);
    }
}
