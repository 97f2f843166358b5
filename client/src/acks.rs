//! Acknowledgements, client side: the latest offset the application has
//! taken per channel. They are coalesced (one `Ack` per channel per
//! `ack_interval`, whatever the number of messages), sent by one task, and
//! sent again after a reconnect until the broker says they are stored.
//!
//! The broker (protocol 5) answers no `Ack` on its own: it reports now and
//! then (and at once for a `FlushAcks`) with one `Stored` naming the
//! latest `Ack` it covers, and every earlier `Ack` of the connection is
//! stored too. Request ids reach the broker in the order they are taken,
//! so a `Stored` answering any request covers the `Ack`s before it.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::sync::Notify;
use volna_proto::{ChannelName, Offset};

use crate::error::ClientError;

/// One channel's acknowledgement state.
#[derive(Debug, Default, Clone, Copy)]
struct AckState {
    /// The largest offset the application acknowledged.
    wanted: u64,
    /// The largest offset the broker said it stored.
    stored: u64,
    /// The `Ack` sent and not yet reported (protocol 5).
    sent: Option<Sent>,
}

/// An `Ack` on its way: on which connection, as which request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Sent {
    generation: u64,
    request_id: u64,
    offset: u64,
}

/// The client's acknowledgements not yet stored.
#[derive(Debug, Default)]
pub(crate) struct Acks {
    state: Mutex<HashMap<ChannelName, AckState>>,
    /// Wakes the sending task.
    pub wake: Notify,
    /// Set by a flush: send without waiting for the interval.
    pub urgent: AtomicBool,
    /// Set when the broker failed to store some: the next round waits.
    pause: AtomicBool,
    /// Told after each round of sends, and when a report arrives.
    pub settled: Notify,
    /// The first acknowledgement the broker refused since the last flush.
    failure: Mutex<Option<ClientError>>,
}

impl Acks {
    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<ChannelName, AckState>> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The application has taken everything of `channel` up to `offset`.
    pub fn ack(&self, channel: &ChannelName, offset: Offset) {
        let mut map = self.map();
        let state = map.entry(channel.clone()).or_default();
        if offset.get() <= state.wanted.max(state.stored) {
            return;
        }
        state.wanted = offset.get();
        drop(map);
        self.wake.notify_one();
    }

    /// What to send on connection `generation`: each channel whose latest
    /// acknowledgement is neither stored nor on its way there.
    pub fn due(&self, generation: u64) -> Vec<(ChannelName, Offset)> {
        self.map()
            .iter()
            .filter(|(_, s)| {
                let on_its_way = s
                    .sent
                    .filter(|sent| sent.generation == generation)
                    .map_or(0, |sent| sent.offset);
                s.wanted > s.stored.max(on_its_way)
            })
            .map(|(c, s)| (c.clone(), Offset::new(s.wanted)))
            .collect()
    }

    /// `offset` of `channel` went out as request `request_id` of
    /// connection `generation`, to be reported (protocol 5).
    pub fn sent(&self, channel: &ChannelName, offset: Offset, generation: u64, request_id: u64) {
        if let Some(state) = self.map().get_mut(channel) {
            state.sent = Some(Sent {
                generation,
                request_id,
                offset: offset.get(),
            });
        }
    }

    fn store(state: &mut AckState, offset: u64) {
        state.stored = state.stored.max(offset);
        if state.sent.is_some_and(|sent| sent.offset <= state.stored) {
            state.sent = None;
        }
    }

    /// Connection `generation` reported every `Ack` it took up to request
    /// `request_id` stored (protocol 5).
    pub fn reported(&self, generation: u64, request_id: u64) {
        self.map().retain(|_, state| {
            if let Some(sent) = state.sent
                && sent.generation == generation
                && sent.request_id <= request_id
            {
                Self::store(state, sent.offset);
            }
            state.stored < state.wanted
        });
        self.settled.notify_waiters();
    }

    /// Connection `generation` answered request `request_id` with an error
    /// nobody waited for. When an `Ack` went out as that request: for a
    /// `final_error` it is refused for good; otherwise it (or a report of
    /// the `Ack`s up to it) failed, and those go out again after a pause.
    /// Whether an `Ack` went out as `request_id`.
    pub fn failed(
        &self,
        generation: u64,
        request_id: u64,
        final_error: Option<ClientError>,
    ) -> bool {
        let refused = self.map().iter().find_map(|(channel, state)| {
            state
                .sent
                .filter(|s| s.generation == generation && s.request_id == request_id)
                .map(|sent| (channel.clone(), sent.offset))
        });
        let Some((channel, offset)) = refused else {
            return false;
        };
        match final_error {
            Some(error) => self.refused(&channel, Offset::new(offset), error),
            None => self.retry_through(generation, request_id),
        }
        true
    }

    /// Every `Ack` connection `generation` sent up to request `request_id`
    /// goes out again, after [`Acks::take_pause`]'s pause: the broker
    /// could not store them (a failed report or `FlushAcks`).
    pub fn retry_through(&self, generation: u64, request_id: u64) {
        for state in self.map().values_mut() {
            if state
                .sent
                .is_some_and(|s| s.generation == generation && s.request_id <= request_id)
            {
                state.sent = None;
            }
        }
        self.pause.store(true, Ordering::SeqCst);
        self.wake.notify_one();
    }

    /// Whether the next round should wait a while first (the broker just
    /// failed to store acknowledgements); clears it.
    pub fn take_pause(&self) -> bool {
        self.pause.swap(false, Ordering::SeqCst)
    }

    /// The broker refused `offset` of `channel` for good: it is not sent
    /// again (a larger ack of the channel taken since still is), and the next
    /// [`Acks::take_failure`] reports it.
    pub fn refused(&self, channel: &ChannelName, offset: Offset, error: ClientError) {
        let mut map = self.map();
        if let Some(state) = map.get_mut(channel) {
            if state.wanted <= offset.get() {
                map.remove(channel);
            } else if state.sent.is_some_and(|s| s.offset == offset.get()) {
                // A later ack of the channel is due in its place.
                state.sent = None;
                self.wake.notify_one();
            }
        }
        drop(map);
        self.failure
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_or_insert(error);
    }

    /// Whether every acknowledgement is stored.
    pub fn all_stored(&self) -> bool {
        self.map().values().all(|s| s.stored >= s.wanted)
    }

    /// The first refusal since the last call.
    pub fn take_failure(&self) -> Option<ClientError> {
        self.failure
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
    }

    /// Asks the task to send now.
    pub fn hurry(&self) {
        self.urgent.store(true, Ordering::SeqCst);
        self.wake.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_latest_acknowledgement_per_channel_is_due_until_stored() {
        let acks = Acks::default();
        let a = ChannelName::new("chat.a").expect("valid");
        let b = ChannelName::new("chat.b").expect("valid");
        acks.ack(&a, Offset::new(3));
        acks.ack(&a, Offset::new(9));
        acks.ack(&a, Offset::new(4));
        acks.ack(&b, Offset::new(1));
        let mut due = acks.due(1);
        due.sort_by(|x, y| x.0.cmp(&y.0));
        assert_eq!(
            due,
            vec![(a.clone(), Offset::new(9)), (b.clone(), Offset::new(1))]
        );
        assert!(!acks.all_stored());
        acks.sent(&a, Offset::new(9), 1, 1);
        acks.reported(1, 1);
        acks.refused(&b, Offset::new(1), ClientError::Closed);
        assert!(acks.all_stored());
        assert!(acks.due(1).is_empty());
        assert!(matches!(acks.take_failure(), Some(ClientError::Closed)));
        assert!(acks.take_failure().is_none());
    }

    #[test]
    fn a_report_covers_every_earlier_ack_of_its_connection_only() {
        let acks = Acks::default();
        let [a, b, c] = ["chat.a", "chat.b", "chat.c"].map(|n| ChannelName::new(n).expect("valid"));
        for (channel, offset, id) in [(&a, 5, 10), (&b, 7, 11), (&c, 2, 12)] {
            acks.ack(channel, Offset::new(offset));
            acks.sent(channel, Offset::new(offset), 1, id);
        }
        // On their way: nothing is due on that connection, all of it on
        // the next.
        assert!(acks.due(1).is_empty());
        assert_eq!(acks.due(2).len(), 3);
        // A report from another connection covers nothing.
        acks.reported(2, 100);
        assert!(!acks.all_stored());
        acks.reported(1, 11);
        let due: Vec<_> = acks.due(2).into_iter().map(|(c, _)| c).collect();
        assert_eq!(due, vec![c.clone()]);
        // A later ack of a reported channel is due again.
        acks.ack(&a, Offset::new(6));
        assert_eq!(acks.due(1), vec![(a.clone(), Offset::new(6))]);
        acks.sent(&a, Offset::new(6), 1, 13);
        acks.reported(1, 13);
        assert!(acks.all_stored());
    }

    #[test]
    fn a_failed_report_sends_its_acks_again_and_a_refusal_is_final() {
        let acks = Acks::default();
        let [a, b] = ["chat.a", "chat.b"].map(|n| ChannelName::new(n).expect("valid"));
        acks.ack(&a, Offset::new(5));
        acks.sent(&a, Offset::new(5), 1, 10);
        acks.ack(&b, Offset::new(7));
        acks.sent(&b, Offset::new(7), 1, 11);
        assert!(!acks.failed(1, 9, None), "not an ack");
        assert!(
            acks.due(1).is_empty(),
            "an error of another request moves nothing"
        );
        // The report up to 11 failed (the storage was unavailable): both
        // are sent again, after a pause.
        assert!(acks.failed(1, 11, None));
        assert_eq!(acks.due(1).len(), 2);
        assert!(acks.take_pause());
        assert!(!acks.take_pause());
        acks.sent(&a, Offset::new(5), 1, 12);
        acks.sent(&b, Offset::new(7), 1, 13);
        // `b` refused for good: not sent again, reported once.
        assert!(acks.failed(1, 13, Some(ClientError::Closed)));
        assert_eq!(acks.due(1), Vec::new());
        assert!(matches!(acks.take_failure(), Some(ClientError::Closed)));
        acks.reported(1, 12);
        assert!(acks.all_stored());
    }

    #[test]
    fn a_refused_ack_leaves_a_later_one_of_its_channel_due() {
        let acks = Acks::default();
        let a = ChannelName::new("chat.a").expect("valid");
        acks.ack(&a, Offset::new(5));
        acks.sent(&a, Offset::new(5), 1, 10);
        acks.ack(&a, Offset::new(6));
        assert!(acks.failed(1, 10, Some(ClientError::Closed)));
        assert_eq!(acks.due(1), vec![(a.clone(), Offset::new(6))]);
        assert!(acks.take_failure().is_some());
    }
}
