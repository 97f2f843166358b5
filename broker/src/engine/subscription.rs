//! One subscription's delivery loop: from offset `next`, forever, in order.
//!
//! The loop is the same whether the subscriber is replaying history,
//! catching up after it fell behind, or live: ask the channel feed what to
//! send for `next` (ring frames, or "read the log up to here", or "wait"),
//! send it, advance `next`. Because every step is keyed by offset, the
//! replay → live switch cannot leave a gap or send a duplicate, however
//! publishes race it (G3). A subscriber whose connection does not take its
//! frames simply stops advancing; the ring moves on without it and it reads
//! the log when it resumes (G4).
//!
//! The loop knows nothing of QUIC: it writes to a [`DeliverySink`].

use std::future::Future;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use thiserror::Error;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};
use volna_proto::{ChannelName, Epoch, ErrorCode, Frame, Offset, SubscriptionId};

use crate::fanout::{FeedSubscription, NextStep, encode_frames};
use crate::log::{Log, ReadRange, now_ms};
use crate::metrics::Metrics;

/// Bytes of frames handed to the sink per write.
const WRITE_BYTES: usize = 256 * 1024;
/// Messages read from the log per catch-up step.
const CATCH_UP_MESSAGES: usize = 4096;
/// How long a catch-up waits before reading again from a replica that has
/// not applied what it was asked for yet (cluster).
const SOURCE_BEHIND_RETRY: std::time::Duration = std::time::Duration::from_millis(20);

/// The connection could not take the frames (it is gone).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("delivery stream failed: {0}")]
pub struct SinkError(pub String);

/// Where a subscription's frames go: one ordered stream.
pub trait DeliverySink: Send + 'static {
    /// Writes `frames` in order; resolves when the transport took them
    /// (waiting while its flow-control window is full).
    fn send(&mut self, frames: Vec<Bytes>) -> impl Future<Output = Result<(), SinkError>> + Send;

    /// Ends the stream cleanly after what was sent.
    fn finish(&mut self) -> impl Future<Output = ()> + Send;

    /// Resolves once the client stopped the stream (or the connection
    /// failed): what a subscription with nothing to send waits on besides
    /// new messages, so that a stream the client gave up is noticed at
    /// once, not at the next message, which may never come. A sink no peer
    /// can stop never resolves.
    fn stopped(&mut self) -> impl Future<Output = SinkError> + Send {
        std::future::pending()
    }
}

/// Everything a delivery loop starts from.
#[derive(Debug)]
pub struct Start {
    /// The subscription.
    pub id: SubscriptionId,
    /// The first offset to deliver.
    pub next: Offset,
    /// Frames to send before any message (Truncated, EpochChanged).
    pub events: Vec<Frame>,
    /// The epoch the subscriber was told (`Epoch(0)`: none yet, the
    /// channel did not exist).
    pub epoch: Epoch,
}

/// Why a delivery loop stopped without being cancelled: the session
/// removes the subscription and tells the client (G8).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum Stopped {
    /// The log could not be read; subscribing again may succeed.
    #[error("the channel log could not be read: {0}")]
    LogRead(String),
    /// The delivery stream failed (reset, or could not be opened).
    #[error("{0}")]
    Stream(#[from] SinkError),
    /// The channel was deleted with its log; subscribing again would
    /// follow a new channel of the same name.
    #[error("channel {0} was deleted")]
    ChannelDeleted(ChannelName),
}

impl Stopped {
    /// The code the client is told: all but `ChannelDeleted` are worth a
    /// new subscribe.
    pub fn error_code(&self) -> ErrorCode {
        match self {
            Self::LogRead(_) => ErrorCode::StorageUnavailable,
            Self::Stream(_) => ErrorCode::Internal,
            Self::ChannelDeleted(_) => ErrorCode::ChannelDeleted,
        }
    }
}

/// Runs the delivery loop until `cancel` fires (`Ok`) or delivery cannot go
/// on (`Err`, why).
pub async fn run(
    start: Start,
    mut feed: FeedSubscription,
    log: Log,
    mut sink: impl DeliverySink,
    cancel: CancellationToken,
    metrics: Arc<Metrics>,
) -> Result<(), Stopped> {
    let channel = feed.channel().clone();
    let mut next = start.next;
    // The epoch the subscriber was told, or learnt from its deliveries.
    let mut epoch = start.epoch;
    let mut first = vec![encode(&Frame::StreamHeader {
        subscription: start.id,
    })];
    first.extend(start.events.iter().map(encode));
    let mut catching_up = CatchUpGauge::new(&metrics);
    let outcome = async {
        sink.send(first).await?;
        loop {
            match feed.next_step(next, epoch, WRITE_BYTES) {
                NextStep::Send {
                    frames,
                    end,
                    stored_ms,
                    epoch: sent,
                } => {
                    epoch = sent;
                    catching_up.set(false);
                    let bytes: usize = frames.iter().map(Bytes::len).sum();
                    sink.send(frames).await?;
                    metrics.deliveries.inc_by(next.distance_to(end));
                    metrics.bytes_out.inc_by(bytes as u64);
                    let age_ms = now_ms().saturating_sub(stored_ms);
                    metrics
                        .publish_deliver_seconds
                        .observe(age_ms as f64 / 1000.0);
                    next = end;
                }
                NextStep::ReadLog { until } => {
                    catching_up.set(true);
                    metrics.catchup_reads.inc();
                    let from = next;
                    // Boxed: a log read is a large state the loop needs
                    // only while catching up, not while it waits.
                    let (end, bytes) =
                        Box::pin(catch_up(&log, &channel, &mut epoch, next, until, &mut sink))
                            .await?;
                    metrics.deliveries.inc_by(from.distance_to(end));
                    metrics.bytes_out.inc_by(bytes as u64);
                    next = end;
                }
                NextStep::Wait => {
                    catching_up.set(false);
                    tokio::select! {
                        () = feed.changed() => {}
                        e = sink.stopped() => return Err(Stopped::Stream(e)),
                    }
                }
                NextStep::Reset {
                    epoch: current,
                    start,
                } => {
                    // The channel started over under another epoch (a
                    // cluster's in-memory channel whose partition changed
                    // leader): say so, as on a resume (G3).
                    sink.send(vec![encode(&Frame::EpochChanged {
                        channel: channel.clone(),
                        previous: epoch,
                        current,
                        start,
                    })])
                    .await?;
                    epoch = current;
                    next = start;
                }
                NextStep::Deleted => return Err(Stopped::ChannelDeleted(channel.clone())),
            }
        }
    };
    tokio::select! {
        result = outcome => {
            if let Err(e) = &result {
                debug!(subscription = %start.id, %channel, error = %e, "delivery stopped");
            }
            result
        }
        () = cancel.cancelled() => {
            sink.finish().await;
            Ok(())
        }
    }
}

/// Counts this subscription in the catch-up gauge while it reads the log.
struct CatchUpGauge<'a> {
    metrics: &'a Metrics,
    on: bool,
}

impl<'a> CatchUpGauge<'a> {
    fn new(metrics: &'a Metrics) -> Self {
        Self { metrics, on: false }
    }

    fn set(&mut self, on: bool) {
        if on != self.on {
            self.metrics
                .catchup_subscribers
                .add(if on { 1 } else { -1 });
            self.on = on;
        }
    }
}

impl Drop for CatchUpGauge<'_> {
    fn drop(&mut self) {
        self.set(false);
    }
}

/// Reads `[next, until)` from the log and sends it; returns the new `next`
/// and the bytes sent.
async fn catch_up(
    log: &Log,
    channel: &ChannelName,
    epoch: &mut Epoch,
    next: Offset,
    until: Offset,
    sink: &mut impl DeliverySink,
) -> Result<(Offset, usize), Stopped> {
    let range = ReadRange {
        from: next,
        until,
        max_messages: CATCH_UP_MESSAGES,
        max_bytes: WRITE_BYTES,
    };
    let read = log.read_channel(channel, range).await.map_err(|e| {
        warn!(%channel, error = %e, "catch-up read failed");
        Stopped::LogRead(e.to_string())
    })?;
    let (meta, messages) = match read {
        Some(read) => read,
        // Offsets below the head were committed, so on a single node the
        // channel exists unless it was deleted since. In a cluster the
        // replica read may not have applied the channel's first entry yet:
        // the feed says when it was deleted.
        None if log.is_replicated() => {
            tokio::time::sleep(SOURCE_BEHIND_RETRY).await;
            return Ok((next, 0));
        }
        None => return Err(Stopped::ChannelDeleted(channel.clone())),
    };
    if log.is_replicated() && *epoch != Epoch(0) && meta.epoch != *epoch {
        // A replica behind a delete and re-creation still holds the old
        // channel under this name: its offsets are not the subscriber's.
        // Wait until it applied what the subscriber was told.
        tokio::time::sleep(SOURCE_BEHIND_RETRY).await;
        return Ok((next, 0));
    }
    if messages.is_empty() && meta.next_offset <= next {
        // The replica read has not applied `next` yet (it lags the node
        // that raised this feed's head): what is missing is not lost, so
        // wait for it rather than call it truncated.
        tokio::time::sleep(SOURCE_BEHIND_RETRY).await;
        return Ok((next, 0));
    }
    let mut frames = Vec::new();
    let available = messages
        .first()
        .map_or_else(|| meta.first_offset.max(until), |m| m.offset);
    if available > next {
        // Retention removed what this subscriber needed: say so, never skip
        // silently (G3).
        frames.push(encode(&Frame::Truncated {
            channel: channel.clone(),
            requested: next,
            first_available: available,
        }));
    }
    let end = messages.last().map_or(available, |m| m.offset.next());
    *epoch = meta.epoch;
    frames.extend(
        encode_frames(channel, meta.epoch, &messages)
            .into_iter()
            .map(|(_, _, frame)| frame),
    );
    let bytes = frames.iter().map(Bytes::len).sum();
    if !frames.is_empty() {
        sink.send(frames).await?;
    }
    Ok((end, bytes))
}

fn encode(frame: &Frame) -> Bytes {
    let mut buf = BytesMut::with_capacity(volna_proto::encoded_len(frame));
    volna_proto::encode(frame, &mut buf);
    buf.freeze()
}

/// Resolves a subscribe request's position against the channel's metadata:
/// the first offset to deliver and the events to send before it.
pub fn resolve_start(
    channel: &ChannelName,
    position: volna_proto::Position,
    meta: Option<crate::store::ChannelMeta>,
) -> (Offset, Epoch, Vec<Frame>) {
    use volna_proto::Position;
    let (first, head, epoch) = meta.map_or((Offset::FIRST, Offset::FIRST, Epoch(0)), |m| {
        (m.first_offset, m.next_offset, m.epoch)
    });
    // After a stop that may have lost the log's tail, the epoch changed at
    // `epoch_start`: below it the old epoch's offsets hold the same
    // messages, at and beyond it they may not.
    let continued = meta.filter(|m| m.previous_epoch != m.epoch);
    match position {
        Position::Latest => (head, epoch, Vec::new()),
        Position::Last(n) => (
            Offset::new(head.get().saturating_sub(n)).max(first),
            epoch,
            Vec::new(),
        ),
        Position::From {
            epoch: Some(previous),
            offset,
        } if continued.is_some_and(|m| m.previous_epoch == previous && offset <= m.epoch_start) => {
            resume_at(channel, offset, first, epoch)
        }
        Position::From {
            epoch: Some(previous),
            ..
        } if previous != epoch => {
            let start = continued
                .filter(|m| m.previous_epoch == previous)
                .map_or(first, |m| m.epoch_start.max(first));
            (
                start,
                epoch,
                vec![Frame::EpochChanged {
                    channel: channel.clone(),
                    previous,
                    current: epoch,
                    start,
                }],
            )
        }
        Position::From { offset, .. } => resume_at(channel, offset, first, epoch),
        // The session resolves a device's cursor to `From` before; a
        // cursor it could not resolve (no device state) starts as its
        // fallback says.
        Position::Cursor { otherwise } => resolve_start(channel, otherwise.position(), meta),
    }
}

/// Resuming at `offset` of a log that starts at `first`.
fn resume_at(
    channel: &ChannelName,
    offset: Offset,
    first: Offset,
    epoch: Epoch,
) -> (Offset, Epoch, Vec<Frame>) {
    if offset < first {
        let truncated = Frame::Truncated {
            channel: channel.clone(),
            requested: offset,
            first_available: first,
        };
        return (first, epoch, vec![truncated]);
    }
    (offset, epoch, Vec::new())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::ChannelMeta;
    use volna_proto::Position;

    fn meta(first: u64, next: u64) -> ChannelMeta {
        ChannelMeta {
            id: 1,
            epoch: Epoch(9),
            first_offset: Offset::new(first),
            next_offset: Offset::new(next),
            bytes: 0,
            ..ChannelMeta::new(1, Epoch(9))
        }
    }

    #[test]
    fn positions_resolve_against_the_log() {
        let c = ChannelName::new("chat.1").expect("name");
        let m = Some(meta(51, 151));
        assert_eq!(resolve_start(&c, Position::Latest, m).0, Offset::new(151));
        assert_eq!(resolve_start(&c, Position::Last(10), m).0, Offset::new(141));
        assert_eq!(
            resolve_start(&c, Position::Last(1000), m).0,
            Offset::new(51)
        );
        let from = |o, e| Position::From {
            offset: Offset::new(o),
            epoch: e,
        };
        assert_eq!(
            resolve_start(&c, from(60, Some(Epoch(9))), m).0,
            Offset::new(60)
        );
        let (start, _, events) = resolve_start(&c, from(1, None), m);
        assert_eq!(start, Offset::new(51));
        assert!(matches!(
            events.as_slice(),
            [Frame::Truncated { first_available, .. }] if *first_available == Offset::new(51)
        ));
        let (start, _, events) = resolve_start(&c, from(60, Some(Epoch(8))), m);
        assert_eq!(start, Offset::new(51));
        assert!(matches!(events.as_slice(), [Frame::EpochChanged { .. }]));
        // A channel nobody published to yet starts at offset 1.
        assert_eq!(resolve_start(&c, Position::Latest, None).0, Offset::FIRST);
    }

    #[test]
    fn after_a_lossy_stop_devices_beyond_the_recovered_head_are_told() {
        let c = ChannelName::new("chat.1").expect("name");
        // Epoch 9 lost its tail at 101: the log now holds epoch 10 from there.
        let mut m = meta(1, 120);
        m.previous_epoch = Epoch(9);
        m.epoch = Epoch(10);
        m.epoch_start = Offset::new(101);
        let from = |o, e| Position::From {
            offset: Offset::new(o),
            epoch: Some(Epoch(e)),
        };
        // A device that had not gone past the recovered head goes on.
        let (start, epoch, events) = resolve_start(&c, from(90, 9), Some(m));
        assert_eq!((start, epoch), (Offset::new(90), Epoch(10)));
        assert!(events.is_empty());
        // One that held offsets the log lost learns that they were replaced.
        let (start, _, events) = resolve_start(&c, from(140, 9), Some(m));
        assert_eq!(start, Offset::new(101));
        assert!(matches!(
            events.as_slice(),
            [Frame::EpochChanged { previous, current, start, .. }]
                if *previous == Epoch(9) && *current == Epoch(10) && *start == Offset::new(101)
        ));
        // An epoch the log does not know restarts from the first offset.
        let (start, _, events) = resolve_start(&c, from(50, 3), Some(m));
        assert_eq!(start, Offset::new(1));
        assert!(matches!(events.as_slice(), [Frame::EpochChanged { .. }]));
    }
}
