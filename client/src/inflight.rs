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
//! Each channel's queue keeps the tickets of its publishes not yet sent on
//! the connection of the newest send, ordered: a publish may go when none
//! of those is ahead of it, which is one look at an ordered set, however
//! many publishes are in flight (a scan of the queue per publish made a
//! fast publisher's cost grow with its window). Only the first of those
//! tickets can be the next to go, so a change wakes that one alone:
//! thousands of queued publishes cost one wake-up per send, not a
//! stampede.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;
use volna_proto::ChannelName;

/// Every channel's in-flight publishes, in issue order.
#[derive(Debug, Default)]
pub(crate) struct InFlight {
    channels: Mutex<HashMap<ChannelName, Queue>>,
}

/// One channel's publishes in flight.
#[derive(Debug, Default)]
struct Queue {
    /// The next publish's ticket: tickets are issue order.
    next_ticket: u64,
    /// Every publish in flight, by ticket.
    entries: BTreeMap<u64, Arc<Entry>>,
    /// The connection the newest send or turn was on (0: none yet).
    connection: u64,
    /// Tickets of the publishes not sent on `connection`.
    unsent: BTreeSet<u64>,
}

/// One publish in flight. Its fields change under the registry's lock.
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
    ticket: u64,
    entry: Arc<Entry>,
}

impl Queue {
    /// Makes `connection` the one sends are counted on: every publish not
    /// sent on it is unsent. Runs once per reconnect (and for a late send
    /// on the connection before), not per publish.
    fn count_sends_on(&mut self, connection: u64) {
        if connection == self.connection {
            return;
        }
        self.connection = connection;
        self.unsent = self
            .entries
            .iter()
            .filter(|(_, e)| e.sent_on.load(Ordering::Relaxed) != connection)
            .map(|(ticket, _)| *ticket)
            .collect();
    }

    /// Wakes the first unsent publish if it waits its turn: the only one a
    /// change can let go.
    fn wake_first(&self) {
        if let Some(first) = self.unsent.first().and_then(|t| self.entries.get(t))
            && first.waiting.load(Ordering::Relaxed)
        {
            first.woken.notify_one();
        }
    }
}

impl InFlight {
    /// Takes the next place in `channel`'s order.
    pub fn enter(&self, channel: &ChannelName) -> Place<'_> {
        let entry = Arc::new(Entry::default());
        let mut channels = self.lock();
        let queue = channels.entry(channel.clone()).or_default();
        let ticket = queue.next_ticket;
        queue.next_ticket += 1;
        queue.entries.insert(ticket, entry.clone());
        queue.unsent.insert(ticket);
        drop(channels);
        Place {
            registry: self,
            channel: channel.clone(),
            ticket,
            entry,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<ChannelName, Queue>> {
        self.channels.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs `change` on `place`'s queue, then wakes the publish that may
    /// go next.
    fn change(&self, place: &Place<'_>, change: impl FnOnce(&mut Queue)) {
        let mut channels = self.lock();
        if let Some(queue) = channels.get_mut(&place.channel) {
            change(queue);
            queue.wake_first();
        }
    }
}

impl Place<'_> {
    /// Waits until this publish may be sent on `connection`: every publish
    /// of the channel issued before it was sent there. Returns the sequence
    /// of the one just ahead, which it must follow (`after`).
    pub async fn turn(&self, connection: u64) -> Option<u64> {
        let _waiting = Waiting::new(&self.entry);
        loop {
            // A wake-up between the check and the wait is kept (a permit).
            let woken = self.entry.woken.notified();
            if let Some(after) = self.ready(connection) {
                return after;
            }
            woken.await;
        }
    }

    fn ready(&self, connection: u64) -> Option<Option<u64>> {
        let mut channels = self.registry.lock();
        let queue = channels.get_mut(&self.channel)?;
        queue.count_sends_on(connection);
        if queue.unsent.range(..self.ticket).next().is_some() {
            return None;
        }
        Some(
            queue
                .entries
                .range(..self.ticket)
                .next_back()
                .map(|(_, ahead)| ahead.sequence.load(Ordering::Relaxed)),
        )
    }

    /// This publish was queued on `connection` with `sequence`.
    pub fn sent(&self, connection: u64, sequence: u64) {
        self.registry.change(self, |queue| {
            self.entry.sequence.store(sequence, Ordering::Relaxed);
            self.entry.sent_on.store(connection, Ordering::Relaxed);
            queue.count_sends_on(connection);
            queue.unsent.remove(&self.ticket);
        });
    }

    /// This publish was refused and will be sent again: those behind it
    /// wait for that.
    pub fn unsent(&self) {
        self.registry.change(self, |queue| {
            self.entry.sent_on.store(0, Ordering::Relaxed);
            queue.unsent.insert(self.ticket);
        });
    }
}

/// Marks an entry as waiting its turn while it lives (also when the wait
/// is cancelled).
struct Waiting<'a>(&'a Entry);

impl<'a> Waiting<'a> {
    fn new(entry: &'a Entry) -> Self {
        entry.waiting.store(true, Ordering::Relaxed);
        Self(entry)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.waiting.store(false, Ordering::Relaxed);
    }
}

impl Drop for Place<'_> {
    fn drop(&mut self) {
        let mut channels = self.registry.lock();
        if let Some(queue) = channels.get_mut(&self.channel) {
            queue.entries.remove(&self.ticket);
            queue.unsent.remove(&self.ticket);
            if queue.entries.is_empty() {
                channels.remove(&self.channel);
            } else {
                queue.wake_first();
            }
        }
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
