//! The client: publish, subscribe, and a supervisor that reconnects with
//! backoff and resumes every subscription where the application left it.
//!
//! Publishes carry the client's producer id and a sequence number, so a
//! publish whose connection died before its ack is retried on the next
//! connection without being stored twice (G5): the caller sees one offset.
//! The producer id belongs to the device (or the application), not to the
//! process: at connect the broker says the last sequence it stored for it
//! (`InitProducer`), and the client continues after it.
//!
//! Every outcome is either passing or final, by one table
//! ([`ErrorCode::is_retryable`], shared with the broker): passing ones are
//! retried with backoff — a connect on the next seed, a publish or a
//! subscribe within its deadline, a resubscribe until it succeeds — and
//! final ones are reported: a call returns the refusal, a subscription
//! ends with `Ended { code }`, and a connect refused for good stops the
//! whole client ([`ConnectionState::Failed`]) instead of looping in
//! silence.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
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
use crate::config::{ClientConfig, TokenSource, device_producer_id};
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

/// Where the client's connection stands, as [`Client::state`] and
/// [`Client::state_changes`] tell it.
#[derive(Debug, Clone)]
pub enum ConnectionState {
    /// Connecting or reconnecting (after a lost connection).
    Connecting {
        /// Why the last attempt failed, if one did.
        last_error: Option<ClientError>,
    },
    /// A session is up.
    Connected {
        /// The seed (`host:port`) or WebSocket URL it is on.
        server: String,
        /// Whether it runs over the WebSocket fallback.
        websocket: bool,
    },
    /// Stopped for good by a final refusal (see [`ClientError::Failed`]);
    /// every subscription ended with its code.
    Failed(ClientError),
    /// Closed by the application.
    Closed,
}

/// Consecutive failures of the token source after which the client stops
/// (reported as [`ConnectionState::Failed`]) instead of asking forever.
const TOKEN_SOURCE_ATTEMPTS: u32 = 5;

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
    /// Deliveries dropped as already seen, all subscriptions.
    duplicates: Arc<AtomicU64>,
    state: watch::Sender<ConnectionState>,
    /// Set once a final refusal stopped the client.
    failure: Mutex<Option<ClientError>>,
    /// A token refresh is running (off the supervisor).
    refreshing: AtomicBool,
    /// The producer id outlives this client (a device's or the
    /// application's): asked again after each reconnect.
    producer_bound: bool,
    max_payload: AtomicU32,
    publish_slots: tokio::sync::Semaphore,
    /// Each channel's publishes in flight, in issue order.
    inflight: InFlight,
    /// Acknowledgements not yet stored (a client with a device; shared
    /// with the connections, which take the broker's reports).
    acks: Arc<Acks>,
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
            token = fetch_token(source, config.token_timeout).await?;
        }
        let live = match transport.establish(&config, &token).await {
            // A stale configured token: one fresh try with the source's.
            Err(e) if e.code() == Some(ErrorCode::Unauthorized) => match &config.token_source {
                Some(source) => {
                    token = fetch_token(source, config.token_timeout).await?;
                    transport.establish(&config, &token).await?
                }
                None => return Err(e),
            },
            other => other?,
        };
        let producer_bound = config.producer_id.is_some() || config.device.is_some();
        let (producer_id, next_sequence) = match init_producer(&config, &live).await {
            Ok(started) => started,
            Err(e) => {
                live.close(CloseCode::NORMAL);
                return Err(e);
            }
        };
        let connected = ConnectionState::Connected {
            server: live.server.clone(),
            websocket: live.over_websocket(),
        };
        let acks = transport.device.acks.clone().unwrap_or_default();
        let inner = Arc::new(Inner {
            max_payload: AtomicU32::new(live.welcome.max_payload),
            token: Mutex::new(token),
            config,
            transport,
            live: watch::Sender::new(Some(live.clone())),
            subs: Mutex::new(HashMap::new()),
            next_sub: AtomicU64::new(1),
            producer_id,
            next_sequence: AtomicU64::new(next_sequence),
            duplicates: Arc::default(),
            state: watch::Sender::new(connected),
            failure: Mutex::new(None),
            refreshing: AtomicBool::new(false),
            producer_bound,
            publish_slots: tokio::sync::Semaphore::new(config_inflight),
            inflight: InFlight::default(),
            acks,
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
        self.publish_with(channel, payload.into(), None).await
    }

    /// Takes the next sequence of this client's producer for a message the
    /// application keeps in its own outbox (with the message, durably):
    /// publish it with [`publish_sequenced`](Self::publish_sequenced).
    pub fn reserve_sequence(&self) -> u64 {
        self.inner.next_sequence.fetch_add(1, Ordering::Relaxed)
    }

    /// Publishes `payload` under `sequence` of this client's producer (a
    /// sequence from [`reserve_sequence`](Self::reserve_sequence), kept in
    /// the application's outbox with the message). After the app was
    /// killed with publishes in flight, the restarted app (same device, or
    /// same [`ClientConfig::producer_id`](crate::ClientConfig::producer_id))
    /// re-sends its outbox under the same sequences: what was stored
    /// already answers `duplicate` with its offset, the rest is stored —
    /// each message once. Re-send the outbox before publishing anything
    /// new: the client continues its own sequences after the highest it
    /// saw, and a new publish must not take a sequence the outbox holds.
    pub async fn publish_sequenced(
        &self,
        channel: &ChannelName,
        sequence: u64,
        payload: impl Into<Bytes>,
    ) -> Result<Published, ClientError> {
        if sequence == 0 {
            return Err(ClientError::Protocol("sequence 0 is not a sequence".into()));
        }
        self.inner
            .next_sequence
            .fetch_max(sequence.saturating_add(1), Ordering::Relaxed);
        self.publish_with(channel, payload.into(), Some(sequence))
            .await
    }

    async fn publish_with(
        &self,
        channel: &ChannelName,
        payload: Bytes,
        fixed_sequence: Option<u64>,
    ) -> Result<Published, ClientError> {
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
        let mut sequence = fixed_sequence;
        let mut maybe_stored = false;
        let mut attempt = 0;
        let mut last_refusal = None;
        let mut slot = None;
        loop {
            let timed_out = |maybe_stored| ClientError::Timeout { maybe_stored };
            let live = self.inner.wait_live(deadline).await.map_err(|e| match e {
                ClientError::Timeout { .. } => timed_out(maybe_stored),
                other => other,
            })?;
            // Those ahead are sent on this connection; if it goes first,
            // they will be on the next one.
            let after = tokio::select! {
                after = tokio::time::timeout_at(deadline, place.turn(live.generation)) => {
                    match after {
                        Ok(after) => after,
                        Err(_) => {
                            return Err(last_refusal.take().unwrap_or(timed_out(maybe_stored)));
                        }
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
                    .map_err(|_| timed_out(maybe_stored))?
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
            // Out of time: the broker's last refusal says more than "timed
            // out". Sent and unanswered, the publish may have been stored.
            let reply = match tokio::time::timeout_at(deadline, request).await {
                Ok(reply) => reply,
                Err(_) => return Err(last_refusal.take().unwrap_or(timed_out(true))),
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
                    if !maybe_stored && fixed_sequence.is_none() {
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
            inner.config.subscription_buffer_bytes,
            inner.duplicates.clone(),
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
            budget: shared.budget.clone(),
            budget_bytes: shared.budget_bytes,
            released: 0,
            duplicates: shared.duplicates.clone(),
            auto_ack: false,
        };
        // Returns only once the broker resolved the start: a `Latest` whose
        // request was lost to a disconnect must not resume later as
        // `Latest` and miss what was published meanwhile. A passing
        // refusal is retried within the request timeout.
        let deadline = Instant::now() + inner.config.request_timeout;
        let subscribed = async {
            loop {
                let live = inner.wait_live(deadline).await?;
                match subscribe_on(&live, &shared, &inner.config.backoff, Some(deadline)).await {
                    Ok(()) => return Ok(()),
                    Err(ClientError::Disconnected) => continue,
                    Err(e) => return Err(e),
                }
            }
        };
        match subscribed.await {
            Ok(()) => Ok(subscription),
            Err(e) => {
                inner.subs_map().remove(&id);
                Err(e)
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

    /// Where the connection stands now.
    pub fn state(&self) -> ConnectionState {
        self.inner.state.borrow().clone()
    }

    /// Every change of [`state`](Self::state), as it happens (the latest
    /// wins: a listener that looks later sees the state then).
    pub fn state_changes(&self) -> watch::Receiver<ConnectionState> {
        self.inner.state.subscribe()
    }

    /// Closes the connection, ends every subscription stream, and waits
    /// (at most about a second) until the broker has been told, so that a
    /// process exiting right after frees its place on the broker at once
    /// (not after the idle timeout). Dropping the last clone of the client
    /// closes it too, without waiting.
    pub async fn close(&self) {
        let live = self.inner.live.borrow().clone();
        self.inner.close();
        if let Some(live) = live {
            let _ = tokio::time::timeout(Duration::from_secs(1), live.close_written()).await;
        }
        self.inner.transport.wait_closed().await;
    }

    /// This client's producer id (the idempotency key of its publishes).
    pub fn producer_id(&self) -> u64 {
        self.inner.producer_id
    }

    /// Deliveries dropped by this client as already seen (offsets below a
    /// subscription's position). The broker never sends them in a correct
    /// run: a count above zero is worth reporting.
    pub fn duplicates_dropped(&self) -> u64 {
        self.inner.duplicates.load(Ordering::Relaxed)
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
                () = tokio::time::sleep_until(deadline) => {
                    return Err(ClientError::Timeout { maybe_stored: true });
                }
                () = inner.closed.cancelled() => return Err(inner.stopped()),
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
    /// back to QUIC (a probe handshake with some seed completed); never
    /// for one on QUIC.
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

    fn failure_slot(&self) -> std::sync::MutexGuard<'_, Option<ClientError>> {
        self.failure.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// What a call on a stopped client answers: why it stopped.
    fn stopped(&self) -> ClientError {
        match self.failure_slot().as_ref() {
            Some(cause) => ClientError::Failed(Box::new(cause.clone())),
            None => ClientError::Closed,
        }
    }

    /// Sends a request and returns its reply, on the next connection when
    /// this one is lost, within the request timeout. For requests that may
    /// be repeated (they set a value, or read one).
    async fn call(&self, build: impl Fn(u64) -> Frame) -> Result<Frame, ClientError> {
        let deadline = Instant::now() + self.config.request_timeout;
        let mut sent = false;
        loop {
            let live = self.wait_live(deadline).await.map_err(|e| match e {
                ClientError::Timeout { .. } => ClientError::Timeout { maybe_stored: sent },
                other => other,
            })?;
            sent = true;
            let reply = tokio::select! {
                reply = live.request(&build) => reply,
                () = tokio::time::sleep_until(deadline) => {
                    return Err(ClientError::Timeout { maybe_stored: true });
                }
            };
            match reply {
                Err(ClientError::Disconnected) => continue,
                other => return other,
            }
        }
    }

    /// The current connection, waiting for the supervisor while there is
    /// none; the cause once the client stopped.
    async fn wait_live(&self, deadline: Instant) -> Result<Arc<Live>, ClientError> {
        let mut rx = self.live.subscribe();
        loop {
            if self.closed.is_cancelled() {
                return Err(self.stopped());
            }
            if let Some(live) = rx.borrow_and_update().clone()
                && !live.is_gone()
            {
                return Ok(live);
            }
            tokio::select! {
                changed = rx.changed() => changed.map_err(|_| ClientError::Closed)?,
                () = tokio::time::sleep_until(deadline) => {
                    return Err(ClientError::Timeout { maybe_stored: false });
                }
                () = self.closed.cancelled() => return Err(self.stopped()),
            }
        }
    }

    fn current_token(&self) -> String {
        self.token.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn set_token(&self, token: String) {
        *self.token.lock().unwrap_or_else(|e| e.into_inner()) = token;
    }

    /// Answers a `TokenExpiring` notice with a fresh token from the source,
    /// in a task of its own: a token service that hangs holds up neither
    /// the supervisor (reconnects, ended subscriptions) nor anything else,
    /// and is given up after `token_timeout`.
    fn refresh_token(self: &Arc<Self>, live: &Arc<Live>, expires_at: u64) {
        // Answered (or given up) here: the notice is not handled twice.
        live.token_refreshed();
        let Some(source) = self.config.token_source.clone() else {
            warn!(
                expires_at,
                "the token expires soon and no token source is configured; the broker will end the session then"
            );
            return;
        };
        if self.refreshing.swap(true, Ordering::SeqCst) {
            return;
        }
        let (inner, live) = (self.clone(), live.clone());
        tokio::spawn(async move {
            inner.refresh_on(&live, &source).await;
            inner.refreshing.store(false, Ordering::SeqCst);
        });
    }

    async fn refresh_on(&self, live: &Live, source: &TokenSource) {
        let token = match fetch_token(source, self.config.token_timeout).await {
            Ok(token) => token,
            Err(e) => {
                warn!(error = %e, "the token source failed; the next reconnect asks again");
                return;
            }
        };
        let request = live.request(|request_id| Frame::Refresh {
            request_id,
            token: token.clone(),
        });
        match tokio::time::timeout(self.config.request_timeout, request).await {
            Ok(Ok(Frame::Refreshed { expires_at, .. })) => {
                debug!(expires_at, "token refreshed");
                self.set_token(token);
            }
            Ok(Ok(Frame::Error(ErrorFrame { code, message, .. }))) => {
                warn!(%code, %message, "the broker refused the refreshed token");
            }
            Ok(Ok(other)) => warn!(frame = ?other.frame_type(), "unexpected reply to Refresh"),
            Ok(Err(_)) | Err(_) => {}
        }
    }

    /// The broker ended `ended.sub` on its own: a passing cause (its log
    /// could not be read, its stream was stopped because the application
    /// did not read) is answered by subscribing again, after a pause and
    /// once the application has room, from where it stands; any other
    /// ends the application's stream with the reason (G8).
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

    /// Subscribes `sub` again on `live` (after `pause`, and once its
    /// application buffer has room); passing refusals are retried with
    /// backoff for as long as the subscription and the connection live,
    /// a final one ends it.
    fn resubscribe(
        self: &Arc<Self>,
        live: &Arc<Live>,
        sub: Arc<SubShared>,
        pause: Option<Duration>,
    ) {
        let (inner, live) = (self.clone(), live.clone());
        tokio::spawn(async move {
            if let Some(pause) = pause {
                // The stream that fed it is done first (the application
                // takes what it had buffered), so that the position asked
                // for is exact and nothing is sent twice.
                let settled = async {
                    tokio::time::sleep(pause).await;
                    drop(sub.delivery.lock().await);
                    sub.room().await;
                };
                tokio::select! {
                    () = settled => {}
                    () = live.gone() => return,
                    () = inner.closed.cancelled() => return,
                }
            }
            if !inner.subs_map().contains_key(&sub.id) {
                return;
            }
            let subscribed = tokio::select! {
                subscribed = subscribe_on(&live, &sub, &inner.config.backoff, None) => subscribed,
                () = inner.closed.cancelled() => return,
            };
            match subscribed {
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
                    let (code, message) = ended_by(e);
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

    /// A final refusal stopped the client: every call answers it from now
    /// on, every subscription ends with its code, and the state says so.
    fn fail(&self, cause: ClientError) {
        warn!(error = %cause, "the broker refused the client for good; it stops");
        *self.failure_slot() = Some(cause.clone());
        let (code, message) = ended_by(cause.clone());
        let subs: Vec<_> = self.subs_map().values().cloned().collect();
        for sub in subs {
            self.end_subscription(&sub, code, message.clone());
        }
        self.closed.cancel();
        if let Some(live) = self.live.send_replace(None) {
            live.close(CloseCode::NORMAL);
        }
        self.state.send_replace(ConnectionState::Failed(cause));
    }

    fn close(&self) {
        self.closed.cancel();
        if let Some(live) = self.live.send_replace(None) {
            live.close(CloseCode::NORMAL);
        }
        self.subs_map().clear();
        self.state.send_if_modified(|state| {
            if matches!(state, ConnectionState::Failed(_)) {
                return false;
            }
            *state = ConnectionState::Closed;
            true
        });
    }

    /// After a reconnect, whether this client still owns its producer: a
    /// broker that stored a sequence this client never took means another
    /// instance of the device (or of the application's producer id)
    /// published meanwhile — one that took over while this one was cut
    /// off. Going on would send sequences the broker answers as another
    /// message's duplicates, so this client stops as replaced. A broker
    /// that cannot say (or a lost answer) is not a reason to stop.
    async fn check_producer(&self, live: &Live) -> Result<(), ClientError> {
        if !self.producer_bound {
            return Ok(());
        }
        let last = match last_sequence(&self.config, live, self.producer_id).await {
            Ok(last) => last,
            Err(e) => {
                debug!(error = %e, "where the producer stands is unknown after the reconnect");
                return Ok(());
            }
        };
        if last >= self.next_sequence.load(Ordering::Relaxed) {
            return Err(ClientError::Refused {
                code: ErrorCode::Replaced,
                message: format!(
                    "another instance published under producer {} (up to sequence {last}) while this one was cut off",
                    self.producer_id
                ),
            });
        }
        Ok(())
    }

    /// A new connection after a lost one: rounds of attempts over every
    /// seed with backoff, asking the token source when the token is
    /// refused; `None` once the client is closed or a final refusal
    /// stopped it.
    async fn reconnect(&self) -> Option<Arc<Live>> {
        let mut attempt = 0u32;
        // The token in force was just fetched: a refusal of it is final.
        let mut fresh_token = false;
        let mut source_failures = 0;
        loop {
            tokio::select! {
                () = tokio::time::sleep(self.config.backoff.delay(attempt)) => {}
                () = self.closed.cancelled() => return None,
            }
            let token = self.current_token();
            let established = tokio::select! {
                established = self.transport.establish(&self.config, &token) => established,
                () = self.closed.cancelled() => return None,
            };
            let e = match established {
                Ok(live) => return Some(live),
                Err(e) => e,
            };
            warn!(error = %e, attempt, "reconnect failed");
            attempt = attempt.saturating_add(1);
            self.state.send_replace(ConnectionState::Connecting {
                last_error: Some(e.clone()),
            });
            match &self.config.token_source {
                Some(source) if e.code() == Some(ErrorCode::Unauthorized) && !fresh_token => {
                    match fetch_token(source, self.config.token_timeout).await {
                        Ok(token) => {
                            self.set_token(token);
                            fresh_token = true;
                            source_failures = 0;
                        }
                        Err(source_error) => {
                            source_failures += 1;
                            warn!(error = %source_error, failures = source_failures, "the token source failed");
                            if source_failures >= TOKEN_SOURCE_ATTEMPTS {
                                self.fail(source_error);
                                return None;
                            }
                        }
                    }
                    continue;
                }
                _ => {}
            }
            if !e.is_retryable() {
                self.fail(e);
                return None;
            }
            fresh_token = false;
        }
    }
}

/// The code and message a subscription ends with when `e` ends it.
fn ended_by(e: ClientError) -> (ErrorCode, String) {
    match e {
        ClientError::Server { code, message } | ClientError::Refused { code, message } => {
            (code, message)
        }
        ClientError::Failed(cause) => ended_by(*cause),
        // A token source that cannot give a token: the client has none.
        e @ ClientError::TokenSource(_) => (ErrorCode::Unauthorized, e.to_string()),
        other => (ErrorCode::Internal, other.to_string()),
    }
}

/// The producer id this client publishes under and its first sequence.
/// A device's (or the application's) id continues after the last sequence
/// the broker stored for it; without one, a random id starts at 1. A
/// broker that cannot say (older than protocol 4, a cluster node) gets a
/// random id for a derived one, and a refusal for an explicit one (its
/// sequences would collide with those stored).
async fn init_producer(config: &ClientConfig, live: &Live) -> Result<(u64, u64), ClientError> {
    let derived = config.device.as_deref().map(device_producer_id);
    let Some(producer_id) = config.producer_id.or(derived) else {
        return Ok((rand::random(), 1));
    };
    match last_sequence(config, live, producer_id).await {
        Ok(last) => Ok((producer_id, last.saturating_add(1))),
        // The broker cannot say (older than protocol 4, a cluster node):
        // a derived id's sequences would collide with those it stored.
        Err(e)
            if config.producer_id.is_none()
                && matches!(
                    e.code(),
                    Some(ErrorCode::Unsupported | ErrorCode::UnknownFrame)
                ) =>
        {
            debug!(error = %e, "the broker does not say where the device's producer stands; publishing under a fresh producer id");
            Ok((rand::random(), 1))
        }
        Err(e) => Err(e),
    }
}

/// The last sequence the broker stored for `producer_id`, asking again
/// after a passing refusal within the request timeout.
async fn last_sequence(
    config: &ClientConfig,
    live: &Live,
    producer_id: u64,
) -> Result<u64, ClientError> {
    let deadline = Instant::now() + config.request_timeout;
    let mut attempt = 0;
    loop {
        let asked = live.request(|request_id| Frame::InitProducer {
            request_id,
            producer_id,
        });
        let refusal = match tokio::time::timeout_at(deadline, asked).await {
            Ok(Ok(Frame::ProducerReady { last_sequence, .. })) => return Ok(last_sequence),
            Ok(Ok(other)) => unexpected(other, "InitProducer"),
            Ok(Err(e)) => return Err(e),
            Err(_) => {
                return Err(ClientError::Timeout {
                    maybe_stored: false,
                });
            }
        };
        let pause = config.backoff.delay(attempt);
        if !refusal.is_retryable() || Instant::now() + pause >= deadline {
            return Err(refusal);
        }
        attempt += 1;
        tokio::time::sleep(pause).await;
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

/// Subscribes `sub` on `live` from where it stands. A passing refusal
/// (the channel's partition is failing over) is retried with backoff until
/// `deadline` (none: for as long as the connection lives); the last one is
/// returned when out of time.
async fn subscribe_on(
    live: &Live,
    sub: &Arc<SubShared>,
    backoff: &crate::config::Backoff,
    deadline: Option<Instant>,
) -> Result<(), ClientError> {
    let mut attempt = 0;
    let mut refused = 0;
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
            Frame::Error(ErrorFrame { code, message, .. }) if code.is_retryable() => {
                let pause = backoff.delay(refused);
                refused += 1;
                if deadline.is_some_and(|d| Instant::now() + pause >= d) {
                    return Err(ClientError::Server { code, message });
                }
                debug!(channel = %sub.channel, %code, %message, "subscribe refused for now; trying again");
                tokio::select! {
                    () = tokio::time::sleep(pause) => {}
                    () = live.gone() => return Err(ClientError::Disconnected),
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

/// Keeps a connection up: on loss, reconnects with backoff and jitter
/// (moving on to the next seed) and resubscribes everything from its
/// position; stops the client when the broker ends it for good.
async fn supervise(inner: Arc<Inner>, mut live: Arc<Live>) {
    loop {
        // One probe per connection, not one per turn of the loop (every
        // ended subscription would start its wait over).
        let back_to_quic = {
            let quic_is_back = inner.quic_is_back(&live);
            tokio::pin!(quic_is_back);
            let mut back = false;
            loop {
                tokio::select! {
                    () = live.gone() => break,
                    () = inner.closed.cancelled() => return,
                    expires_at = live.token_expiring() => inner.refresh_token(&live, expires_at),
                    ended = live.next_ended() => inner.subscription_ended(&live, ended),
                    () = &mut quic_is_back, if !back => {
                        info!("QUIC is reachable again: moving the connection back from WebSocket");
                        back = true;
                        live.close(CloseCode::GOING_AWAY);
                    }
                }
            }
            back
        };
        inner.live.send_replace(None);
        if inner.closed.is_cancelled() {
            return;
        }
        if let Some(cause) = live.final_end().await {
            inner.fail(cause);
            return;
        }
        warn!(server = %live.server, "connection to the broker lost; reconnecting");
        inner
            .state
            .send_replace(ConnectionState::Connecting { last_error: None });
        // Back to QUIC starts at the seed the probe reached; a lost
        // connection at the next one.
        if !back_to_quic {
            inner.transport.move_on();
        }
        live = match inner.reconnect().await {
            Some(live) => live,
            None => return,
        };
        if inner.closed.is_cancelled() {
            live.close(CloseCode::NORMAL);
            return;
        }
        if let Err(cause) = inner.check_producer(&live).await {
            live.close(CloseCode::NORMAL);
            inner.fail(cause);
            return;
        }
        inner
            .max_payload
            .store(live.welcome.max_payload, Ordering::Relaxed);
        info!(server = %live.server, websocket = live.over_websocket(), "reconnected");
        inner.live.send_replace(Some(live.clone()));
        inner.state.send_replace(ConnectionState::Connected {
            server: live.server.clone(),
            websocket: live.over_websocket(),
        });
        let subs: Vec<_> = inner.subs_map().values().cloned().collect();
        for sub in subs {
            inner.resubscribe(&live, sub, None);
        }
        // Acknowledgements the last connection did not report stored go
        // out again on this one.
        inner.acks.wake.notify_one();
    }
}

/// How long the acknowledgement sender waits after the broker could not
/// store some before it sends them again.
const ACK_RETRY_PAUSE: Duration = Duration::from_secs(1);

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
        if acks.take_pause() {
            // The broker could not store some: not again at once.
            tokio::select! {
                () = tokio::time::sleep(ACK_RETRY_PAUSE) => {}
                () = inner.closed.cancelled() => return,
            }
        }
        let mut urgent = acks.urgent.swap(false, Ordering::SeqCst);
        if !urgent {
            // Gather what else the application acknowledges meanwhile.
            tokio::select! {
                () = tokio::time::sleep(inner.config.ack_interval) => {}
                () = inner.closed.cancelled() => return,
            }
            urgent = acks.urgent.swap(false, Ordering::SeqCst);
        }
        if !acks.all_stored() {
            let live = inner
                .wait_live(Instant::now() + inner.config.request_timeout)
                .await;
            let round = match &live {
                Ok(live) => send_acks_round(acks, live, urgent).await,
                Err(e) => Err(e.clone()),
            };
            if let Err(ClientError::Closed | ClientError::Failed(_)) = round {
                return;
            }
            let generation = live.map_or(0, |live| live.generation);
            if !acks.due(generation).is_empty() {
                // Some were not sent or not stored: another round after
                // the interval.
                acks.wake.notify_one();
            }
        }
        acks.settled.notify_waiters();
    }
}

/// One round: each due `Ack` is sent, with no reply of its own (the
/// broker reports stored ones now and then); a flush asks for a report of
/// them all (`FlushAcks`) and waits for it.
async fn send_acks_round(acks: &Acks, live: &Live, flush: bool) -> Result<(), ClientError> {
    for (channel, offset) in acks.due(live.generation) {
        live.send(|request_id| {
            // Recorded before the frame can leave: the broker's refusal of
            // it may come back at once.
            acks.sent(&channel, offset, live.generation, request_id);
            Frame::Ack {
                request_id,
                channel: channel.clone(),
                offset,
            }
        })
        .await?;
    }
    if !flush {
        return Ok(());
    }
    let mut flush_id = 0;
    let reply = live
        .request(|request_id| {
            flush_id = request_id;
            Frame::FlushAcks { request_id }
        })
        .await?;
    match reply {
        Frame::Stored { request_id } => acks.reported(live.generation, request_id),
        Frame::Error(ErrorFrame { code, message, .. }) => {
            // Every `Ack` before the flush is sent again.
            debug!(%code, %message, "the broker could not store the acknowledgements");
            acks.retry_through(live.generation, flush_id);
        }
        other => return Err(unexpected(other, "FlushAcks")),
    }
    Ok(())
}

/// A token from `source`, within `timeout`.
async fn fetch_token(source: &TokenSource, timeout: Duration) -> Result<String, ClientError> {
    match tokio::time::timeout(timeout, source.fetch()).await {
        Ok(fetched) => fetched.map_err(|e| ClientError::TokenSource(e.to_string())),
        Err(_) => Err(ClientError::TokenSource(format!(
            "no token within {} s",
            timeout.as_secs_f64()
        ))),
    }
}
