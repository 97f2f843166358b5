//! A subscription as the application sees it (a `Stream` of messages), and
//! the position bookkeeping that makes resume gapless and duplicate-free.
//!
//! Invariants:
//! - `next` is the offset the application should see next. It advances
//!   before a message is handed to the application channel, and only one
//!   delivery stream feeds a subscription at a time (`delivery` lock), so a
//!   resume from `next` on a new connection neither repeats nor skips.
//! - Messages below `next` (replays after a resume) are dropped here, and
//!   counted: the broker never sends them in a correct run, so a count
//!   above zero is worth a look ([`Client::duplicates_dropped`](crate::Client::duplicates_dropped)).
//! - What waits for the application is bounded in messages (the channel)
//!   and in payload bytes (`budget`: taken when a message is queued,
//!   given back when the application takes it).

use std::pin::Pin;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};

use bytes::Bytes;
use futures_core::Stream;
use tokio::sync::{Semaphore, mpsc};
use tracing::warn;
use volna_proto::{ChannelName, Epoch, Frame, Offset, Position};

use crate::error::{ClientError, SubscriptionError};

/// One message as delivered to the application.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// The channel.
    pub channel: ChannelName,
    /// The channel log's epoch.
    pub epoch: Epoch,
    /// Its offset in the channel.
    pub offset: Offset,
    /// When the broker stored it, milliseconds since the Unix epoch.
    pub timestamp_ms: u64,
    /// The body.
    pub payload: Bytes,
}

/// What a subscription stream yields.
pub type Item = Result<Message, SubscriptionError>;

/// Where a subscription stands; survives reconnects.
#[derive(Debug)]
pub(crate) struct SubPosition {
    /// The position asked for at subscribe time, used until the broker
    /// resolved it.
    pub initial: Position,
    /// The next offset the application should see, once known. Runs ahead
    /// of the application by what is buffered: it is where a resume starts.
    pub next: Option<Offset>,
    /// Where the application's stream starts, once the broker resolved it.
    pub start: Option<Offset>,
    /// The channel log's epoch, once known.
    pub epoch: Option<Epoch>,
}

/// State shared by the application's [`Subscription`], the client and the
/// delivery stream currently feeding it.
#[derive(Debug)]
pub(crate) struct SubShared {
    pub id: u64,
    pub channel: ChannelName,
    pub position: Mutex<SubPosition>,
    pub tx: mpsc::Sender<Item>,
    /// Held by the delivery stream feeding this subscription.
    pub delivery: tokio::sync::Mutex<()>,
    /// Resubscribes after the broker ended it, since it last delivered:
    /// the backoff step.
    pub retries: AtomicU32,
    /// Payload bytes the application's buffer may still take.
    pub budget: Arc<Semaphore>,
    /// The budget's size: a message larger than it costs all of it.
    pub budget_bytes: usize,
    /// Deliveries dropped as already seen, here and client-wide. Shared
    /// with the [`Subscription`], so that it can still tell after the
    /// subscription ended or the client closed (a test reads it last).
    pub duplicates: Arc<AtomicU64>,
    duplicates_client: Arc<AtomicU64>,
}

/// What a message costs of a subscription's byte budget.
fn cost(payload: &Bytes, budget_bytes: usize) -> usize {
    payload.len().min(budget_bytes)
}

impl SubShared {
    pub fn new(
        id: u64,
        channel: ChannelName,
        initial: Position,
        buffer: usize,
        buffer_bytes: usize,
        duplicates_client: Arc<AtomicU64>,
    ) -> (Arc<Self>, mpsc::Receiver<Item>) {
        let (tx, rx) = mpsc::channel(buffer.max(1));
        // At most what a semaphore can hold, at least one byte.
        let budget_bytes = buffer_bytes.clamp(1, u32::MAX as usize);
        let shared = Arc::new(Self {
            id,
            channel,
            position: Mutex::new(SubPosition {
                initial,
                // An explicit start is where the application's stream
                // begins: anything the broker cannot deliver from there on
                // is reported (Truncated), never skipped.
                next: match initial {
                    Position::From { offset, .. } => Some(offset),
                    Position::Latest | Position::Last(_) | Position::Cursor { .. } => None,
                },
                start: match initial {
                    Position::From { offset, .. } => Some(offset),
                    Position::Latest | Position::Last(_) | Position::Cursor { .. } => None,
                },
                epoch: match initial {
                    Position::From { epoch, .. } => epoch,
                    Position::Latest | Position::Last(_) | Position::Cursor { .. } => None,
                },
            }),
            tx,
            delivery: tokio::sync::Mutex::new(()),
            retries: AtomicU32::new(0),
            budget: Arc::new(Semaphore::new(budget_bytes)),
            budget_bytes,
            duplicates: Arc::default(),
            duplicates_client,
        });
        (shared, rx)
    }

    fn position(&self) -> std::sync::MutexGuard<'_, SubPosition> {
        self.position.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The position to subscribe from on a (new) connection.
    pub fn resume_position(&self) -> Position {
        let p = self.position();
        match p.next {
            Some(offset) => Position::From {
                offset,
                epoch: p.epoch.filter(|e| e.0 != 0),
            },
            None => p.initial,
        }
    }

    /// The broker accepted the subscription and will deliver from `start`.
    pub fn subscribed(&self, start: Offset, epoch: Epoch) {
        let mut p = self.position();
        if p.next.is_none() {
            p.next = Some(start);
        }
        if p.start.is_none() {
            p.start = Some(start);
        }
        // Resumed exactly where asked: the broker's epoch now names this
        // position (after a stop that may have lost the log's tail, a new
        // epoch continues the old one below the recovered head). Anything
        // else is followed by an event that sets the epoch itself.
        if epoch.0 != 0 && (p.epoch.is_none() || p.next == Some(start)) {
            p.epoch = Some(epoch);
        }
    }

    fn count_duplicates(&self, dropped: u64) {
        if dropped > 0 {
            self.duplicates.fetch_add(dropped, Ordering::Relaxed);
            self.duplicates_client.fetch_add(dropped, Ordering::Relaxed);
        }
    }

    /// Waits until the application's buffer has room again (a stream was
    /// stopped because it was full: subscribing again before the
    /// application reads would only fill it again).
    pub async fn room(&self) {
        // Half of it: resuming at the first free slot would only fill it
        // again and stop once more.
        let half = (self.tx.max_capacity() / 2).max(1);
        if let Ok(permits) = self.tx.reserve_many(half).await {
            drop(permits);
        }
    }

    /// Handles one delivery-stream frame; returns false once the
    /// application dropped its [`Subscription`].
    pub async fn deliver(&self, frame: Frame) -> bool {
        match frame {
            Frame::Deliver(d) => {
                self.retries.store(0, Ordering::Relaxed);
                // The whole batch's bookkeeping under one lock: messages
                // below `next` (a replay after a resume) are dropped, and a
                // batch starting beyond it is a gap.
                let first = d.first_offset;
                let end = d.end_offset();
                let (skip, gap) = {
                    let mut p = self.position();
                    let expected = p.next.unwrap_or(first);
                    if end <= expected {
                        self.count_duplicates(d.messages.len() as u64);
                        return true;
                    }
                    p.next = Some(end);
                    p.epoch = Some(d.epoch);
                    (
                        expected.get().saturating_sub(first.get()) as usize,
                        (first > expected).then_some(expected),
                    )
                };
                self.count_duplicates(skip as u64);
                if let Some(expected) = gap {
                    warn!(channel = %self.channel, %expected, got = %first, "gap in delivery");
                    let gap = SubscriptionError::Gap {
                        expected,
                        got: first,
                    };
                    if self.tx.send(Err(gap)).await.is_err() {
                        return false;
                    }
                }
                // Room for many messages per wait, not one: at high rates the
                // per-message wake-ups were the client's largest cost.
                let mut offset = first.add(skip as u64);
                let mut messages = d.messages;
                let mut at = skip;
                while at < messages.len() {
                    // As many as the byte budget holds (at least one), then
                    // as many as the channel has room for.
                    let mut bytes = 0;
                    let mut want = 0;
                    for m in messages[at..].iter().take(self.tx.max_capacity()) {
                        let more = cost(&m.payload, self.budget_bytes);
                        if want > 0 && bytes + more > self.budget_bytes {
                            break;
                        }
                        bytes += more;
                        want += 1;
                    }
                    let Ok(taken) = self.budget.acquire_many(bytes as u32).await else {
                        return false;
                    };
                    taken.forget();
                    let Ok(permits) = self.tx.reserve_many(want).await else {
                        return false;
                    };
                    for (permit, m) in permits.zip(&mut messages[at..at + want]) {
                        permit.send(Ok(Message {
                            channel: d.channel.clone(),
                            epoch: d.epoch,
                            offset,
                            timestamp_ms: m.timestamp_ms,
                            payload: std::mem::take(&mut m.payload),
                        }));
                        offset = offset.next();
                    }
                    at += want;
                }
                true
            }
            Frame::Truncated {
                requested,
                first_available,
                ..
            } => {
                {
                    let mut p = self.position();
                    if p.next.is_some_and(|n| n >= first_available) {
                        // Already past the removed range (seen before a resume).
                        return true;
                    }
                    p.next = Some(first_available);
                }
                let event = SubscriptionError::Truncated {
                    requested,
                    first_available,
                };
                self.tx.send(Err(event)).await.is_ok()
            }
            Frame::EpochChanged {
                previous,
                current,
                start,
                ..
            } => {
                {
                    let mut p = self.position();
                    p.next = Some(start);
                    p.epoch = Some(current);
                }
                let event = SubscriptionError::EpochChanged {
                    previous,
                    current,
                    start,
                };
                self.tx.send(Err(event)).await.is_ok()
            }
            other => {
                warn!(channel = %self.channel, frame = ?other.frame_type(), "unexpected frame on a delivery stream");
                true
            }
        }
    }
}

/// A live subscription: a `Stream` of messages in offset order, each once,
/// across reconnects. Dropping it unsubscribes.
///
/// Items are `Ok(Message)` or an `Err(SubscriptionError)` event (retention
/// truncated the log, the log was reset); events never end the stream, in
/// the manner of tokio's `BroadcastStream` and its `Lagged` item.
#[derive(Debug)]
pub struct Subscription {
    pub(crate) id: u64,
    pub(crate) channel: ChannelName,
    /// Owned by the client while the subscription is registered; weak here
    /// so that closing the client ends the stream.
    pub(crate) shared: Weak<SubShared>,
    pub(crate) rx: mpsc::Receiver<Item>,
    pub(crate) on_drop: Weak<dyn Unsubscriber>,
    /// The offset after the last item yielded to the application, and
    /// the epoch it is in.
    pub(crate) yielded: Option<(Offset, Epoch)>,
    /// The byte budget the application gives back as it takes messages:
    /// `released` bytes at a time (a semaphore's lock per message would be
    /// the costliest step of a fast subscriber), and all of it whenever
    /// nothing more is buffered, so the feeder never waits for bytes the
    /// application has already taken.
    pub(crate) budget: Arc<Semaphore>,
    pub(crate) budget_bytes: usize,
    pub(crate) released: usize,
    /// Deliveries dropped as already seen ([`SubShared::duplicates`]).
    pub(crate) duplicates: Arc<AtomicU64>,
    /// Acknowledge each message as the application takes it.
    pub(crate) auto_ack: bool,
}

/// The client, as a subscription reaches it.
pub(crate) trait Unsubscriber: Send + Sync + std::fmt::Debug {
    /// The application dropped subscription `id`.
    fn unsubscribe(&self, id: u64);
    /// The device has taken `channel` up to `offset`.
    fn ack(&self, channel: &ChannelName, offset: Offset) -> Result<(), ClientError>;
}

impl Subscription {
    /// The channel.
    pub fn channel(&self) -> &ChannelName {
        &self.channel
    }

    /// The offset after the last item this subscription yielded (before
    /// any: where it starts, once the broker resolved it). An application
    /// that saves it once it has processed an item and later subscribes
    /// `Position::From` it, after a crash, gets exactly the items it had
    /// not processed: what the client has buffered but not yet yielded is
    /// not counted.
    ///
    /// Prefer [`next_position`](Self::next_position), which carries the
    /// epoch: an offset alone resumes past a log that was reset (a channel
    /// deleted and created again) without being told.
    pub fn next_offset(&self) -> Option<Offset> {
        self.next_position_parts().map(|(offset, _)| offset)
    }

    /// Where to resume after the last item this subscription yielded:
    /// `Position::From` its next offset in its epoch. Saved once an item is
    /// processed and subscribed from after a crash, it delivers exactly the
    /// items not processed, or `EpochChanged` when the log was reset
    /// meanwhile (G3). `None` until the broker resolved the start.
    pub fn next_position(&self) -> Option<Position> {
        self.next_position_parts()
            .map(|(offset, epoch)| Position::From { offset, epoch })
    }

    /// Deliveries of this subscription dropped as already seen (offsets
    /// below its position). Where no resume happened a correct broker
    /// sends none, so tests assert 0 there; across a resume a few may come
    /// (what was in flight on the old stream) and are dropped, never
    /// yielded. Still readable after the subscription ended or the client
    /// closed.
    pub fn duplicates_dropped(&self) -> u64 {
        self.duplicates.load(Ordering::Relaxed)
    }

    fn next_position_parts(&self) -> Option<(Offset, Option<Epoch>)> {
        if let Some((offset, epoch)) = self.yielded {
            return Some((offset, Some(epoch).filter(|e| e.0 != 0)));
        }
        let shared = self.shared.upgrade()?;
        let p = shared.position();
        p.start.map(|start| (start, p.epoch.filter(|e| e.0 != 0)))
    }

    /// Acknowledges every message of this channel up to `offset`: the
    /// device's cursor moves there (never back), so that a subscription
    /// from `Position::Cursor` — after the app was killed, on another
    /// connection, after a broker restart — starts right after it.
    /// Acknowledgements are coalesced and sent in the background;
    /// [`Client::flush_acks`](crate::Client::flush_acks) waits until they
    /// are stored. Needs [`ClientConfig::device`](crate::ClientConfig::device).
    pub fn ack(&self, offset: Offset) -> Result<(), ClientError> {
        match self.on_drop.upgrade() {
            Some(client) => client.ack(&self.channel, offset),
            None => Err(ClientError::Closed),
        }
    }

    /// Acknowledges each message as the application takes it from the
    /// stream (on for `true`): "taken" is the cursor, whatever the
    /// application then does with it.
    pub fn set_auto_ack(&mut self, on: bool) {
        self.auto_ack = on;
    }

    /// Waits for the next item; `None` once the client is closed.
    pub async fn recv(&mut self) -> Option<Item> {
        let item = self.rx.recv().await;
        self.saw(item.as_ref());
        item
    }

    /// Moves [`next_offset`](Self::next_offset) past an item handed to
    /// the application.
    fn saw(&mut self, item: Option<&Item>) {
        let epoch = || {
            self.yielded
                .map(|(_, epoch)| epoch)
                .or_else(|| self.shared.upgrade().and_then(|s| s.position().epoch))
                .unwrap_or(Epoch(0))
        };
        let next = match item {
            Some(Ok(m)) => {
                self.released += cost(&m.payload, self.budget_bytes);
                self.release_budget();
                (m.offset.next(), m.epoch)
            }
            Some(Err(SubscriptionError::Truncated {
                first_available, ..
            })) => (*first_available, epoch()),
            Some(Err(SubscriptionError::EpochChanged { start, current, .. })) => (*start, *current),
            Some(Err(SubscriptionError::Gap { got, .. })) => (*got, epoch()),
            _ => {
                self.release_budget();
                return;
            }
        };
        if !matches!(item, Some(Ok(_))) {
            self.release_budget();
        }
        self.yielded = Some(next);
        if self.auto_ack
            && let Some(Ok(m)) = item
            && let Err(e) = self.ack(m.offset)
        {
            tracing::debug!(error = %e, "automatic acknowledgement not taken");
        }
    }
}

impl Subscription {
    /// Gives the bytes taken back to the feeder: in batches, and all of
    /// them whenever nothing more waits (whatever the item was), so the
    /// feeder never waits on bytes the application already took.
    fn release_budget(&mut self) {
        if self.released > 0 && (self.released >= self.budget_bytes / 16 || self.rx.is_empty()) {
            self.budget.add_permits(std::mem::take(&mut self.released));
        }
    }
}

impl Stream for Subscription {
    type Item = Item;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Item>> {
        let this = self.get_mut();
        let polled = this.rx.poll_recv(cx);
        if let Poll::Ready(item) = &polled {
            this.saw(item.as_ref());
        }
        polled
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        if let Some(client) = self.on_drop.upgrade() {
            client.unsubscribe(self.id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use volna_proto::{Deliver, DeliveredMessage};

    fn batch(first: u64, count: u64) -> Frame {
        Frame::Deliver(Deliver {
            channel: ChannelName::new("chat.1").expect("name"),
            epoch: Epoch(7),
            first_offset: Offset::new(first),
            messages: (first..first + count)
                .map(|o| DeliveredMessage {
                    timestamp_ms: o,
                    payload: Bytes::from(o.to_string()),
                })
                .collect(),
        })
    }

    /// Batches larger than the application's buffer, replays after a
    /// resume and a gap: each offset reaches the application once, in
    /// order, and the gap is reported.
    #[tokio::test]
    async fn batches_are_delivered_once_in_order_whatever_the_buffer() {
        let position = Position::From {
            offset: Offset::new(5),
            epoch: None,
        };
        let channel = ChannelName::new("chat.1").expect("name");
        let duplicates = Arc::new(AtomicU64::new(0));
        // Room for 4 messages and 5 payload bytes (payloads are 1–2 bytes).
        let (shared, mut rx) = SubShared::new(1, channel, position, 4, 5, duplicates.clone());
        let budget = shared.budget.clone();
        let feeder = tokio::spawn(async move {
            for (first, count) in [(1, 10), (11, 3), (8, 5), (12, 4), (20, 2)] {
                assert!(shared.deliver(batch(first, count)).await);
            }
            shared
        });
        let mut seen = Vec::new();
        while seen.len() < 14 {
            match rx.recv().await.expect("open") {
                Ok(m) => {
                    assert_eq!(m.payload, Bytes::from(m.offset.get().to_string()));
                    assert!(budget.available_permits() <= 5 - m.payload.len());
                    budget.add_permits(m.payload.len());
                    seen.push(m.offset.get());
                }
                Err(SubscriptionError::Gap { expected, got }) => {
                    assert_eq!((expected.get(), got.get()), (16, 20));
                    seen.push(0);
                }
                Err(other) => panic!("unexpected {other}"),
            }
        }
        let shared = feeder.await.expect("feeder");
        assert_eq!(seen, [5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 0, 20, 21]);
        // 1–4 (before the start), 8–12 and 12–13 (replays) were dropped.
        assert_eq!(shared.duplicates.load(Ordering::Relaxed), 11);
        assert_eq!(duplicates.load(Ordering::Relaxed), 11);
    }
}
