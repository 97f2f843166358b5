//! The client: publish, subscribe, and a supervisor that reconnects with
//! backoff and resumes every subscription where the application left it.
//!
//! Publishes carry the client's producer id and a sequence number, so a
//! publish whose connection died before its ack is retried on the next
//! connection without being stored twice (G5): the caller sees one offset.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};
use volna_proto::{
    ChannelName, CloseCode, Epoch, ErrorCode, ErrorFrame, Frame, Offset, Position, ProducerSeq,
    Publish, Subscribe, UnreadCount,
};

use crate::acks::Acks;
use crate::config::{ClientConfig, TokenSource};
use crate::connection::{Ended, Live, ReadMarker, Transport};
use crate::error::{ClientError, SubscriptionError};
use crate::inflight::InFlight;
use crate::subscription::{SubShared, Subscription, Unsubscriber};

/// A publish acknowledged by the broker: the message is durably stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Published {
    /// Its offset in the channel.
    pub offset: Offset,
    /// The channel log's epoch.
    pub epoch: Epoch,
    /// True when a retry found the message already stored.
    pub duplicate: bool,
}

/// A connection to a Volna broker that survives the broker's restarts.
/// Cheap to clone; closed when the last clone is dropped or on [`close`](Self::close).
#[derive(Debug, Clone)]
pub struct Client {
    inner: Arc<Inner>,
    _last_clone: Arc<CloseOnDrop>,
}

#[derive(Debug)]
struct CloseOnDrop(Arc<Inner>);

impl Drop for CloseOnDrop {
    fn drop(&mut self) {
        self.0.close();
    }
}

#[derive(Debug)]
struct Inner {
    config: ClientConfig,
    transport: Transport,
    /// The token in force: the configured one until a refresh replaces it.
    token: Mutex<String>,
    live: watch::Sender<Option<Arc<Live>>>,
    subs: Mutex<HashMap<u64, Arc<SubShared>>>,
    next_sub: AtomicU64,
    producer_id: u64,
    next_sequence: AtomicU64,
    max_payload: AtomicU32,
    publish_slots: tokio::sync::Semaphore,
    /// Each channel's publishes in flight, in issue order.
    inflight: InFlight,
    /// Acknowledgements not yet stored (a client with a device).
    acks: Acks,
    closed: CancellationToken,
}

impl Client {
    /// Connects to the broker; fails if the first connection cannot be made.
    /// Later disconnections are repaired in the background.
    pub async fn connect(config: ClientConfig) -> Result<Self, ClientError> {
        let transport = Transport::new(&config)?;
        let config_inflight = config.max_inflight_publishes.max(1);
        let mut token = config.token.clone();
        if token.is_empty()
            && let Some(source) = &config.token_source
        {
            token = fetch_token(source).await?;
        }
        let live = match transport.establish_any(&config, &token).await {
            // A stale configured token: one fresh try with the source's.
            Err(e) if e.code() == Some(ErrorCode::Unauthorized) => match &config.token_source {
                Some(source) => {
                    token = fetch_token(source).await?;
                    transport.establish_any(&config, &token).await?
                }
                None => return Err(e),
            },
            other => other?,
        };
        let inner = Arc::new(Inner {
            max_payload: AtomicU32::new(live.welcome.max_payload),
            token: Mutex::new(token),
            config,
            transport,
            live: watch::Sender::new(Some(live.clone())),
            subs: Mutex::new(HashMap::new()),
            next_sub: AtomicU64::new(1),
            producer_id: rand::random(),
            next_sequence: AtomicU64::new(1),
            publish_slots: tokio::sync::Semaphore::new(config_inflight),
            inflight: InFlight::default(),
            acks: Acks::default(),
            closed: CancellationToken::new(),
        });
        tokio::spawn(supervise(inner.clone(), live));
        if inner.config.device.is_some() {
            tokio::spawn(send_acks(inner.clone()));
        }
        Ok(Self {
            _last_clone: Arc::new(CloseOnDrop(inner.clone())),
            inner,
        })
    }

    /// Publishes `payload` to `channel`; returns once it is durably stored.
    /// Retries across reconnects (idempotently) until the request timeout.
    /// Up to `max_inflight_publishes` calls proceed at once; more wait.
    /// Publishes of one client to one channel are stored in the order the
    /// calls were made, also when they overlap and across reconnects.
    pub async fn publish(
        &self,
        channel: &ChannelName,
        payload: impl Into<Bytes>,
    ) -> Result<Published, ClientError> {
        let payload = payload.into();
        let max = self.inner.max_payload.load(Ordering::Relaxed);
        if payload.len() > max as usize {
            return Err(ClientError::PayloadTooLarge {
                len: payload.len(),
                max,
            });
        }
        let deadline = Instant::now() + self.inner.config.request_timeout;
        // Issue order: this call's place among the channel's publishes,
        // taken on its first poll, before any wait.
        let place = self.inner.inflight.enter(channel);
        // Allocated when first queued, so sequences reach the broker in
        // order. A retry after a lost connection must reuse it (the publish
        // may have been stored); after an explicit refusal, which stored
        // nothing, a fresh one is taken, so that a retry long after cannot
        // be mistaken for one older than the broker's dedup window.
        let mut sequence = None;
        let mut maybe_stored = false;
        let mut attempt = 0;
        let mut last_refusal = None;
        let mut slot = None;
        loop {
            let live = self.inner.wait_live(deadline).await?;
            // Those ahead are sent on this connection; if it goes first,
            // they will be on the next one.
            let after = tokio::select! {
                after = tokio::time::timeout_at(deadline, place.turn(live.generation)) => {
                    match after {
                        Ok(after) => after,
                        Err(_) => return Err(last_refusal.take().unwrap_or(ClientError::Timeout)),
                    }
                }
                () = live.gone() => continue,
            };
            // A slot only once every earlier publish of the channel was
            // sent: one waiting its turn never holds a slot an earlier one
            // needs. The turn is checked again after the wait.
            if slot.is_none() {
                let permit = tokio::time::timeout_at(deadline, self.inner.publish_slots.acquire())
                    .await
                    .map_err(|_| ClientError::Timeout)?
                    .map_err(|_| ClientError::Closed)?;
                slot = Some(permit);
                continue;
            }
            let request = live.request(|request_id| {
                let sequence = *sequence.get_or_insert_with(|| {
                    self.inner.next_sequence.fetch_add(1, Ordering::Relaxed)
                });
                place.sent(live.generation, sequence);
                Frame::Publish(Publish {
                    request_id,
                    channel: channel.clone(),
                    producer: Some(ProducerSeq {
                        producer_id: self.inner.producer_id,
                        sequence,
                    }),
                    after,
                    payload: payload.clone(),
                })
            });
            // Out of time: the broker's last refusal says more than "timed out".
            let reply = match tokio::time::timeout_at(deadline, request).await {
                Ok(reply) => reply,
                Err(_) => return Err(last_refusal.take().unwrap_or(ClientError::Timeout)),
            };
            match reply {
                Ok(Frame::Published {
                    offset,
                    epoch,
                    duplicate,
                    ..
                }) => {
                    return Ok(Published {
                        offset,
                        epoch,
                        duplicate,
                    });
                }
                Ok(Frame::Error(ErrorFrame { code, message, .. })) if code.is_retryable() => {
                    maybe_stored |= code.may_have_stored();
                    if !maybe_stored {
                        sequence = None;
                    }
                    // Those behind it wait for it to be sent again.
                    place.unsent();
                    let pause = self.inner.config.backoff.delay(attempt);
                    if tokio::time::Instant::now() + pause >= deadline {
                        return Err(ClientError::Server { code, message });
                    }
                    last_refusal = Some(ClientError::Server { code, message });
                    tokio::time::sleep(pause).await;
                    attempt += 1;
                }
                Ok(Frame::Error(ErrorFrame { code, message, .. })) => {
                    return Err(ClientError::Server { code, message });
                }
                Ok(other) => {
                    return Err(ClientError::Protocol(format!(
                        "unexpected reply {:?} to Publish",
                        other.frame_type()
                    )));
                }
                // The connection died with the publish in flight: send it
                // again, same sequence, once the supervisor reconnected.
                Err(ClientError::Disconnected) => maybe_stored = true,
                Err(e) => return Err(e),
            }
        }
    }

    /// Subscribes to `channel` from `position`. The subscription resumes by
    /// itself after reconnects; drop it to unsubscribe.
    pub async fn subscribe(
        &self,
        channel: &ChannelName,
        position: Position,
    ) -> Result<Subscription, ClientError> {
        let inner = &self.inner;
        let id = inner.next_sub.fetch_add(1, Ordering::Relaxed);
        let (shared, rx) = SubShared::new(
            id,
            channel.clone(),
            position,
            inner.config.subscription_buffer,
        );
        {
            let mut subs = inner.subs_map();
            if subs.values().any(|s| &s.channel == channel) {
                return Err(ClientError::Server {
                    code: ErrorCode::AlreadySubscribed,
                    message: format!("this client is already subscribed to {channel}"),
                });
            }
            let max = inner.config.max_subscriptions.max(1);
            if subs.len() >= max as usize {
                return Err(ClientError::Server {
                    code: ErrorCode::TooManySubscriptions,
                    message: format!(
                        "this client holds its maximum of {max} subscriptions (ClientConfig::max_subscriptions)"
                    ),
                });
            }
            subs.insert(id, shared.clone());
        }
        let subscription = Subscription {
            id,
            channel: channel.clone(),
            shared: Arc::downgrade(&shared),
            rx,
            on_drop: Arc::downgrade(&(inner.clone() as Arc<dyn Unsubscriber>)),
            yielded: None,
            auto_ack: false,
        };
        // Returns only once the broker resolved the start: a `Latest` whose
        // request was lost to a disconnect must not resume later as
        // `Latest` and miss what was published meanwhile.
        let deadline = Instant::now() + inner.config.request_timeout;
        loop {
            let live = inner.wait_live(deadline).await?;
            match subscribe_on(&live, &shared, &inner.config.backoff).await {
                Ok(()) => return Ok(subscription),
                Err(ClientError::Disconnected) => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// Whether a connection is up right now.
    pub fn is_connected(&self) -> bool {
        self.inner
            .live
            .borrow()
            .as_ref()
            .is_some_and(|l| !l.is_gone())
    }

    /// Whether the connection up right now runs over the WebSocket
    /// fallback (UDP to the broker is blocked) rather than QUIC: an
    /// application may tell its user the connection is limited.
    pub fn over_websocket(&self) -> bool {
        self.inner
            .live
            .borrow()
            .as_ref()
            .is_some_and(|l| !l.is_gone() && l.over_websocket())
    }

    /// Closes the connection and ends every subscription stream.
    pub fn close(&self) {
        self.inner.close();
    }

    /// This client's producer id (the idempotency key of its publishes).
    pub fn producer_id(&self) -> u64 {
        self.inner.producer_id
    }

    /// Sends every acknowledgement now and waits until the broker stored
    /// them all (the device's cursors are durable), across reconnects,
    /// within the request timeout. Reports the first acknowledgement the
    /// broker refused since the last call.
    pub async fn flush_acks(&self) -> Result<(), ClientError> {
        let inner = &self.inner;
        let deadline = Instant::now() + inner.config.request_timeout;
        loop {
            let settled = inner.acks.settled.notified();
            tokio::pin!(settled);
            settled.as_mut().enable();
            if inner.acks.all_stored() {
                return match inner.acks.take_failure() {
                    Some(e) => Err(e),
                    None => Ok(()),
                };
            }
            inner.acks.hurry();
            tokio::select! {
                () = settled => {}
                () = tokio::time::sleep_until(deadline) => return Err(ClientError::Timeout),
                () = inner.closed.cancelled() => return Err(ClientError::Closed),
            }
        }
    }

    /// Sets the user's read marker on `channel` to `offset` (it only moves
    /// forward); the user's other devices hear of it. Returns once the
    /// marker is durable.
    pub async fn mark_read(
        &self,
        channel: &ChannelName,
        offset: Offset,
    ) -> Result<(), ClientError> {
        let reply = self
            .inner
            .call(|request_id| Frame::MarkRead {
                request_id,
                channel: channel.clone(),
                offset,
            })
            .await?;
        match reply {
            Frame::Stored { .. } => Ok(()),
            other => Err(unexpected(other, "MarkRead")),
        }
    }

    /// The user's unread count on `channels` (none: on every channel the
    /// user has a read marker on).
    pub async fn unread(&self, channels: &[ChannelName]) -> Result<Vec<UnreadCount>, ClientError> {
        let reply = self
            .inner
            .call(|request_id| Frame::Unread {
                request_id,
                channels: channels.to_vec(),
            })
            .await?;
        match reply {
            Frame::UnreadCounts { counts, .. } => Ok(counts),
            other => Err(unexpected(other, "Unread")),
        }
    }

    /// Read markers the user moved on other devices, as they arrive (a
    /// client configured with a device; `None` otherwise). A listener that
    /// falls behind by more than 64 events is told how many it missed
    /// (`RecvError::Lagged`) and can ask [`Client::unread`].
    pub fn read_markers(&self) -> Option<tokio::sync::broadcast::Receiver<ReadMarker>> {
        self.inner.transport.read_markers()
    }
}

/// A reply of the wrong type, or the broker's refusal, as an error.
fn unexpected(reply: Frame, request: &str) -> ClientError {
    match reply {
        Frame::Error(ErrorFrame { code, message, .. }) => ClientError::Server { code, message },
        other => ClientError::Protocol(format!(
            "unexpected reply {:?} to {request}",
            other.frame_type()
        )),
    }
}

impl Inner {
    /// Resolves when a connection over the WebSocket fallback could move
    /// back to QUIC (a probe handshake completed); never for one on QUIC.
    async fn quic_is_back(&self, live: &Live) {
        if !live.over_websocket() || !self.transport.has_quic() {
            return std::future::pending().await;
        }
        loop {
            tokio::time::sleep(self.config.quic_probe_interval).await;
            if self
                .transport
                .quic_reachable(self.config.quic_fallback_after)
                .await
            {
                return;
            }
        }
    }

    fn subs_map(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<SubShared>>> {
        self.subs.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sends a request and returns its reply, on the next connection when
    /// this one is lost, within the request timeout. For requests that may
    /// be repeated (they set a value, or read one).
    async fn call(&self, build: impl Fn(u64) -> Frame) -> Result<Frame, ClientError> {
        let deadline = Instant::now() + self.config.request_timeout;
        loop {
            let live = self.wait_live(deadline).await?;
            let reply = tokio::select! {
                reply = live.request(&build) => reply,
                () = tokio::time::sleep_until(deadline) => return Err(ClientError::Timeout),
            };
            match reply {
                Err(ClientError::Disconnected) => continue,
                other => return other,
            }
        }
    }

    /// The current connection, waiting for the supervisor while there is none.
    async fn wait_live(&self, deadline: Instant) -> Result<Arc<Live>, ClientError> {
        let mut rx = self.live.subscribe();
        loop {
            if self.closed.is_cancelled() {
                return Err(ClientError::Closed);
            }
            if let Some(live) = rx.borrow_and_update().clone()
                && !live.is_gone()
            {
                return Ok(live);
            }
            tokio::select! {
                changed = rx.changed() => changed.map_err(|_| ClientError::Closed)?,
                () = tokio::time::sleep_until(deadline) => return Err(ClientError::Timeout),
                () = self.closed.cancelled() => return Err(ClientError::Closed),
            }
        }
    }

    fn current_token(&self) -> String {
        self.token.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn set_token(&self, token: String) {
        *self.token.lock().unwrap_or_else(|e| e.into_inner()) = token;
    }

    /// Answers a `TokenExpiring` notice with a fresh token from the source.
    async fn refresh_token(&self, live: &Live, expires_at: u64) {
        let Some(source) = &self.config.token_source else {
            warn!(
                expires_at,
                "the token expires soon and no token source is configured; the broker will end the session then"
            );
            live.token_refreshed();
            return;
        };
        let token = match fetch_token(source).await {
            Ok(token) => token,
            Err(e) => {
                warn!(error = %e, "the token source failed; retrying on the next notice or reconnect");
                live.token_refreshed();
                return;
            }
        };
        let request = live.request(|request_id| Frame::Refresh {
            request_id,
            token: token.clone(),
        });
        match request.await {
            Ok(Frame::Refreshed { expires_at, .. }) => {
                debug!(expires_at, "token refreshed");
                self.set_token(token);
            }
            Ok(Frame::Error(ErrorFrame { code, message, .. })) => {
                warn!(%code, %message, "the broker refused the refreshed token");
            }
            Ok(other) => warn!(frame = ?other.frame_type(), "unexpected reply to Refresh"),
            Err(_) => {}
        }
        live.token_refreshed();
    }

    /// The broker ended `ended.sub` on its own: a retryable cause (its log
    /// could not be read) is answered by subscribing again, after a pause,
    /// from where the application stands; any other ends the application's
    /// stream with the reason (G8).
    fn subscription_ended(self: &Arc<Self>, live: &Arc<Live>, ended: Ended) {
        if !self.subs_map().contains_key(&ended.sub.id) {
            return;
        }
        if !ended.code.is_retryable() {
            return self.end_subscription(&ended.sub, ended.code, ended.message);
        }
        let attempt = ended.sub.retries.fetch_add(1, Ordering::Relaxed);
        let pause = self.config.backoff.delay(attempt);
        self.resubscribe(live, ended.sub, Some(pause));
    }

    /// Subscribes `sub` again on `live` (after `pause`); a refusal ends it.
    fn resubscribe(
        self: &Arc<Self>,
        live: &Arc<Live>,
        sub: Arc<SubShared>,
        pause: Option<Duration>,
    ) {
        let (inner, live) = (self.clone(), live.clone());
        tokio::spawn(async move {
            if let Some(pause) = pause {
                tokio::select! {
                    () = tokio::time::sleep(pause) => {}
                    () = live.gone() => return,
                    () = inner.closed.cancelled() => return,
                }
            }
            if !inner.subs_map().contains_key(&sub.id) {
                return;
            }
            match subscribe_on(&live, &sub, &inner.config.backoff).await {
                // Dropped by the application while the request was in
                // flight: nobody reads it, so the broker must not keep it.
                Ok(()) if !inner.subs_map().contains_key(&sub.id) => {
                    if let Some(subscription) = live.unroute(sub.id) {
                        live.send_nowait(|request_id| Frame::Unsubscribe {
                            request_id,
                            subscription,
                        });
                    }
                }
                // A lost connection is the supervisor's: it resubscribes all.
                Ok(()) | Err(ClientError::Disconnected) => {}
                Err(e) => {
                    warn!(channel = %sub.channel, error = %e, "resubscribe refused; ending the subscription");
                    let (code, message) = match e {
                        ClientError::Server { code, message } => (code, message),
                        other => (ErrorCode::Internal, other.to_string()),
                    };
                    inner.end_subscription(&sub, code, message);
                }
            }
        });
    }

    /// Ends `sub` for good: the application's stream yields why, then ends.
    fn end_subscription(&self, sub: &Arc<SubShared>, code: ErrorCode, message: String) {
        if self.subs_map().remove(&sub.id).is_none() {
            return;
        }
        let sub = sub.clone();
        tokio::spawn(async move {
            let _ = sub
                .tx
                .send(Err(SubscriptionError::Ended { code, message }))
                .await;
        });
    }

    fn close(&self) {
        self.closed.cancel();
        if let Some(live) = self.live.send_replace(None) {
            live.close(CloseCode::NORMAL);
        }
        self.subs_map().clear();
    }
}

impl Unsubscriber for Inner {
    fn ack(&self, channel: &ChannelName, offset: Offset) -> Result<(), ClientError> {
        if self.config.device.is_none() {
            return Err(ClientError::Server {
                code: ErrorCode::DeviceRequired,
                message: "acknowledgements are a device's: set ClientConfig::device".into(),
            });
        }
        self.acks.ack(channel, offset);
        Ok(())
    }

    fn unsubscribe(&self, id: u64) {
        self.subs_map().remove(&id);
        if let Some(live) = self.live.borrow().as_ref()
            && let Some(subscription) = live.unroute(id)
        {
            live.send_nowait(|request_id| Frame::Unsubscribe {
                request_id,
                subscription,
            });
        }
    }
}

/// Attempts at a subscribe the broker answers `AlreadySubscribed` while
/// no request of ours routes it: about 3 s in all, longer than a stale
/// subscription lives on the broker once its stream is left unclaimed
/// (`connection::UNCLAIMED_STREAM`).
const ALREADY_SUBSCRIBED_ATTEMPTS: u32 = 8;

/// Subscribes `sub` on `live` from where it stands.
async fn subscribe_on(
    live: &Live,
    sub: &Arc<SubShared>,
    backoff: &crate::config::Backoff,
) -> Result<(), ClientError> {
    let mut attempt = 0;
    loop {
        let reply = live
            .request(|request_id| {
                Frame::Subscribe(Subscribe {
                    request_id,
                    channel: sub.channel.clone(),
                    position: sub.resume_position(),
                })
            })
            .await?;
        match reply {
            Frame::Subscribed {
                subscription,
                epoch,
                start,
                ..
            } => {
                sub.subscribed(start, epoch);
                match live.route(subscription, sub.clone()) {
                    Ok(()) => return Ok(()),
                    // Ended by the broker right after it began: a passing
                    // cause is answered by subscribing again after a pause.
                    Err((code, _)) if code.is_retryable() => {
                        let attempt = sub.retries.fetch_add(1, Ordering::Relaxed);
                        tokio::time::sleep(backoff.delay(attempt)).await;
                    }
                    Err((code, message)) => return Err(ClientError::Server { code, message }),
                }
            }
            // Either another request of ours (the supervisor's resubscribe
            // after a reconnect) got there first and routes it, or the
            // broker still holds a subscription nobody reads (a cancelled
            // subscribe, being unsubscribed now). Only the first is a
            // success: the second would never deliver.
            Frame::Error(ErrorFrame {
                code: ErrorCode::AlreadySubscribed,
                message,
                ..
            }) => {
                attempt += 1;
                let wait = std::time::Duration::from_millis(20 << attempt.min(5));
                if live.wait_routed(sub.id, wait).await {
                    return Ok(());
                }
                if attempt >= ALREADY_SUBSCRIBED_ATTEMPTS {
                    return Err(ClientError::Server {
                        code: ErrorCode::AlreadySubscribed,
                        message,
                    });
                }
            }
            Frame::Error(ErrorFrame { code, message, .. }) => {
                return Err(ClientError::Server { code, message });
            }
            other => {
                return Err(ClientError::Protocol(format!(
                    "unexpected reply {:?} to Subscribe",
                    other.frame_type()
                )));
            }
        }
    }
}

/// Keeps a connection up: on loss, reconnects with backoff and jitter and
/// resubscribes everything from its position.
async fn supervise(inner: Arc<Inner>, mut live: Arc<Live>) {
    loop {
        loop {
            tokio::select! {
                () = live.gone() => break,
                () = inner.closed.cancelled() => return,
                expires_at = live.token_expiring() => inner.refresh_token(&live, expires_at).await,
                ended = live.next_ended() => inner.subscription_ended(&live, ended),
                () = inner.quic_is_back(&live) => {
                    info!("QUIC is reachable again: moving the connection back from WebSocket");
                    live.close(CloseCode::GOING_AWAY);
                }
            }
        }
        inner.live.send_replace(None);
        warn!("connection to the broker lost; reconnecting");
        inner.transport.move_on();
        let mut attempt = 0;
        live = loop {
            tokio::select! {
                () = tokio::time::sleep(inner.config.backoff.delay(attempt)) => {}
                () = inner.closed.cancelled() => return,
            }
            match inner
                .transport
                .establish(&inner.config, inner.current_token())
                .await
            {
                Ok(live) => break live,
                Err(e) => {
                    warn!(error = %e, attempt, "reconnect failed");
                    attempt = attempt.saturating_add(1);
                    if e.code() == Some(ErrorCode::Unauthorized)
                        && let Some(source) = &inner.config.token_source
                    {
                        match fetch_token(source).await {
                            Ok(token) => inner.set_token(token),
                            Err(e) => warn!(error = %e, "the token source failed"),
                        }
                    }
                }
            }
        };
        if inner.closed.is_cancelled() {
            live.close(CloseCode::NORMAL);
            return;
        }
        inner
            .max_payload
            .store(live.welcome.max_payload, Ordering::Relaxed);
        info!(after_attempts = attempt + 1, "reconnected");
        inner.live.send_replace(Some(live.clone()));
        let subs: Vec<_> = inner.subs_map().values().cloned().collect();
        for sub in subs {
            inner.resubscribe(&live, sub, None);
        }
    }
}

/// Sends the client's acknowledgements: every `ack_interval` (or at once
/// when a flush asks), one `Ack` per channel with the latest offset, again
/// on the next connection until the broker stored it.
async fn send_acks(inner: Arc<Inner>) {
    let acks = &inner.acks;
    loop {
        tokio::select! {
            () = acks.wake.notified() => {}
            () = inner.closed.cancelled() => return,
        }
        if !acks.urgent.swap(false, Ordering::SeqCst) {
            // Gather what else the application acknowledges meanwhile.
            tokio::select! {
                () = tokio::time::sleep(inner.config.ack_interval) => {}
                () = inner.closed.cancelled() => return,
            }
        }
        let due = acks.due();
        if !due.is_empty() {
            let sent = async {
                let live = inner
                    .wait_live(Instant::now() + inner.config.request_timeout)
                    .await?;
                let requests = due.iter().map(|(channel, offset)| {
                    let live = live.clone();
                    async move {
                        let reply = live
                            .request(|request_id| Frame::Ack {
                                request_id,
                                channel: channel.clone(),
                                offset: *offset,
                            })
                            .await;
                        (channel, *offset, reply)
                    }
                });
                Ok::<_, ClientError>(futures_util::future::join_all(requests).await)
            };
            match sent.await {
                Ok(replies) => {
                    for (channel, offset, reply) in replies {
                        match reply {
                            Ok(Frame::Stored { .. }) => acks.stored(channel, offset),
                            Ok(Frame::Error(ErrorFrame { code, message, .. }))
                                if !code.is_retryable() =>
                            {
                                warn!(%channel, offset = offset.get(), %code, %message, "the broker refused an acknowledgement");
                                acks.refused(
                                    channel,
                                    offset,
                                    ClientError::Server { code, message },
                                );
                            }
                            // Retryable, or the connection was lost: again.
                            _ => {}
                        }
                    }
                }
                Err(ClientError::Closed) => return,
                Err(_) => {}
            }
            if !acks.due().is_empty() {
                // Not all stored: another round after the interval.
                acks.wake.notify_one();
            }
        }
        acks.settled.notify_waiters();
    }
}

async fn fetch_token(source: &TokenSource) -> Result<String, ClientError> {
    source
        .fetch()
        .await
        .map_err(|e| ClientError::TokenSource(e.to_string()))
}
