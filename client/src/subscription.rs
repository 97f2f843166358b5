//! A subscription as the application sees it (a `Stream` of messages), and
//! the position bookkeeping that makes resume gapless and duplicate-free.
//!
//! Invariants:
//! - `next` is the offset the application should see next. It advances
//!   before a message is handed to the application channel, and only one
//!   delivery stream feeds a subscription at a time (`delivery` lock), so a
//!   resume from `next` on a new connection neither repeats nor skips.
//! - Messages below `next` (replays after a resume) are dropped here.

use std::pin::Pin;
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};

use bytes::Bytes;
use futures_core::Stream;
use tokio::sync::mpsc;
use tracing::warn;
use volna_proto::{ChannelName, Epoch, Frame, Offset, Position};

use crate::error::SubscriptionError;

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
    /// The next offset the application should see, once known.
    pub next: Option<Offset>,
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
}

impl SubShared {
    pub fn new(
        id: u64,
        channel: ChannelName,
        initial: Position,
        buffer: usize,
    ) -> (Arc<Self>, mpsc::Receiver<Item>) {
        let (tx, rx) = mpsc::channel(buffer.max(1));
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
                    Position::Latest | Position::Last(_) => None,
                },
                epoch: match initial {
                    Position::From { epoch, .. } => epoch,
                    Position::Latest | Position::Last(_) => None,
                },
            }),
            tx,
            delivery: tokio::sync::Mutex::new(()),
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
        if epoch.0 != 0 && p.epoch.is_none() {
            p.epoch = Some(epoch);
        }
    }

    /// Handles one delivery-stream frame; returns false once the
    /// application dropped its [`Subscription`].
    pub async fn deliver(&self, frame: Frame) -> bool {
        match frame {
            Frame::Deliver(d) => {
                let mut offset = d.first_offset;
                for m in d.messages {
                    let (skip, gap) = {
                        let mut p = self.position();
                        let expected = p.next.unwrap_or(offset);
                        if offset < expected {
                            (true, None)
                        } else {
                            p.next = Some(offset.next());
                            p.epoch = Some(d.epoch);
                            (false, (offset > expected).then_some(expected))
                        }
                    };
                    if let Some(expected) = gap {
                        warn!(channel = %self.channel, %expected, got = %offset, "gap in delivery");
                        let gap = SubscriptionError::Gap {
                            expected,
                            got: offset,
                        };
                        if self.tx.send(Err(gap)).await.is_err() {
                            return false;
                        }
                    }
                    if !skip {
                        let message = Message {
                            channel: d.channel.clone(),
                            epoch: d.epoch,
                            offset,
                            timestamp_ms: m.timestamp_ms,
                            payload: m.payload,
                        };
                        if self.tx.send(Ok(message)).await.is_err() {
                            return false;
                        }
                    }
                    offset = offset.next();
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
}

/// Told when the application drops a subscription.
pub(crate) trait Unsubscriber: Send + Sync + std::fmt::Debug {
    fn unsubscribe(&self, id: u64);
}

impl Subscription {
    /// The channel.
    pub fn channel(&self) -> &ChannelName {
        &self.channel
    }

    /// The next offset this subscription will yield, once known.
    pub fn next_offset(&self) -> Option<Offset> {
        self.shared.upgrade().and_then(|s| s.position().next)
    }

    /// Waits for the next item; `None` once the client is closed.
    pub async fn recv(&mut self) -> Option<Item> {
        self.rx.recv().await
    }
}

impl Stream for Subscription {
    type Item = Item;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Item>> {
        self.get_mut().rx.poll_recv(cx)
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        if let Some(client) = self.on_drop.upgrade() {
            client.unsubscribe(self.id);
        }
    }
}
