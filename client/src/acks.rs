//! Acknowledgements, client side: the latest offset the application has
//! taken per channel. They are coalesced (one `Ack` per channel per
//! `ack_interval`, whatever the number of messages), sent by one task, and
//! sent again after a reconnect until the broker answers `Stored`.

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
}

/// The client's acknowledgements not yet stored.
#[derive(Debug, Default)]
pub(crate) struct Acks {
    state: Mutex<HashMap<ChannelName, AckState>>,
    /// Wakes the sending task.
    pub wake: Notify,
    /// Set by a flush: send without waiting for the interval.
    pub urgent: AtomicBool,
    /// Told after each round of sends.
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

    /// What to send: each channel whose latest acknowledgement is not stored.
    pub fn due(&self) -> Vec<(ChannelName, Offset)> {
        self.map()
            .iter()
            .filter(|(_, s)| s.wanted > s.stored)
            .map(|(c, s)| (c.clone(), Offset::new(s.wanted)))
            .collect()
    }

    /// The broker stored `offset` of `channel`.
    pub fn stored(&self, channel: &ChannelName, offset: Offset) {
        let mut map = self.map();
        if let Some(state) = map.get_mut(channel) {
            state.stored = state.stored.max(offset.get());
            if state.stored >= state.wanted {
                // Nothing pending: the entry goes, so the table holds only
                // channels with acknowledgements in flight.
                map.remove(channel);
            }
        }
    }

    /// The broker refused `offset` of `channel` for good: it is not sent
    /// again, and the next [`Acks::take_failure`] reports it.
    pub fn refused(&self, channel: &ChannelName, offset: Offset, error: ClientError) {
        self.stored(channel, offset);
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
        let mut due = acks.due();
        due.sort_by(|x, y| x.0.cmp(&y.0));
        assert_eq!(
            due,
            vec![(a.clone(), Offset::new(9)), (b.clone(), Offset::new(1))]
        );
        assert!(!acks.all_stored());
        acks.stored(&a, Offset::new(9));
        acks.refused(&b, Offset::new(1), ClientError::Closed);
        assert!(acks.all_stored());
        assert!(acks.due().is_empty());
        assert!(matches!(acks.take_failure(), Some(ClientError::Closed)));
        assert!(acks.take_failure().is_none());
    }
}
