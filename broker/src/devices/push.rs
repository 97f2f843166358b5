//! The push hook: every message committed to a namespace with
//! `push.webhook_url` becomes a notice posted, in batches, to the
//! application's push service, which knows a chat's members and which of
//! their devices to wake through APNs or FCM.
//!
//! ```text
//!  log writer ── committed ──▶ ring (bounded, drop-oldest) ──▶ poster thread ──POST──▶ webhook
//! ```
//!
//! Invariants:
//! - Publishing never waits on the hook: the writer thread only pushes
//!   into a fixed-size ring; when it is full the oldest notice is dropped
//!   and counted (`volna_push_notices_dropped_total`).
//! - A batch that fails to post is retried, with backoff, until it is
//!   accepted (any 2xx), topped up from the ring to `push.max_batch` at
//!   each retry: the hook holds at most `push.queue + push.max_batch`
//!   notices. They are posted in commit order, at most one batch per
//!   `push.batch_ms` while the receiver keeps up.
//!
//! On a cluster node the notices come from the partitions this node leads
//! instead of the log writer (`cluster::push`); the poster is the same.
//!
//! The contract (README, "Push hook"): `POST webhook_url` with
//! `Content-Type: application/json` and the body
//! `{"notices":[{"channel":"chat.42","offset":17,"timestamp_ms":…,"size":12,"producer_id":…}]}`
//! (`producer_id` is `null` for publishes without one). The receiver
//! answers 2xx once it has taken the batch; anything else is a failure.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_queue::ArrayQueue;
use serde::Serialize;
use tracing::{info, warn};
use volna_proto::ChannelName;

use crate::config::{NamespaceConfig, PushConfig};
use crate::log::CommitListener;
use crate::metrics::Metrics;
use crate::store::{ChannelMeta, StoredMessage};

/// The longest wait between two attempts at a failing webhook.
const MAX_BACKOFF: Duration = Duration::from_secs(10);
const FIRST_BACKOFF: Duration = Duration::from_millis(50);

/// One committed message, as the push service is told of it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Notice {
    /// The channel.
    pub channel: String,
    /// The message's offset.
    pub offset: u64,
    /// When it was stored, ms since the Unix epoch.
    pub timestamp_ms: u64,
    /// Its payload size in bytes.
    pub size: usize,
    /// The publisher's producer id (the client library's stable id of one
    /// client), when the publish carried one.
    pub producer_id: Option<u64>,
}

#[derive(Serialize)]
struct Batch<'a> {
    notices: &'a [Notice],
}

/// Where a poster takes the notices it posts, in order.
pub trait NoticeSource: Send + 'static {
    /// Appends notices to post next to `batch`, until it holds about `max`.
    fn fill(&mut self, batch: &mut Vec<Notice>, max: usize);
    /// The receiver took every notice `fill` handed out so far.
    fn posted(&mut self);
    /// Whether `fill` would hand out nothing now.
    fn is_empty(&self) -> bool;
}

/// A single node's hook: the ring the log writer fills.
struct RingSource(Arc<ArrayQueue<Notice>>);

impl NoticeSource for RingSource {
    fn fill(&mut self, batch: &mut Vec<Notice>, max: usize) {
        while batch.len() < max {
            match self.0.pop() {
                Some(notice) => batch.push(notice),
                None => break,
            }
        }
    }

    fn posted(&mut self) {}

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Starts the thread posting `source`'s notices to `config`'s webhook
/// until `stop`.
pub fn spawn_poster(
    namespace: &str,
    config: PushConfig,
    source: impl NoticeSource,
    metrics: Arc<Metrics>,
    stop: Arc<AtomicBool>,
) -> std::io::Result<JoinHandle<()>> {
    let poster = Poster {
        source,
        config,
        metrics,
        stop,
    };
    std::thread::Builder::new()
        .name(format!("volna-push-{namespace}"))
        .spawn(move || poster.run())
}

/// One namespace's hook: its ring and its poster thread.
struct Hook {
    namespace: String,
    ring: Arc<ArrayQueue<Notice>>,
}

/// Every configured hook, fed by the log writer in front of `inner` (the
/// fan-out engine), which is told everything as before.
pub struct PushHooks {
    inner: Arc<dyn CommitListener>,
    hooks: Vec<Hook>,
    metrics: Arc<Metrics>,
    stop: Arc<AtomicBool>,
    threads: std::sync::Mutex<Vec<JoinHandle<()>>>,
}

impl std::fmt::Debug for PushHooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PushHooks")
            .field(
                "namespaces",
                &self.hooks.iter().map(|h| &h.namespace).collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

impl PushHooks {
    /// Starts a poster thread per namespace with a hook in front of
    /// `inner`; `None` (and `inner` alone is the listener) when no
    /// namespace has one.
    pub fn start<'a>(
        namespaces: impl IntoIterator<Item = (&'a String, &'a NamespaceConfig)>,
        inner: Arc<dyn CommitListener>,
        metrics: Arc<Metrics>,
    ) -> std::io::Result<Option<Arc<Self>>> {
        let stop = Arc::new(AtomicBool::new(false));
        let mut hooks = Vec::new();
        let mut threads = Vec::new();
        for (namespace, config) in namespaces {
            let Some(push) = &config.push else { continue };
            let ring = Arc::new(ArrayQueue::new(push.queue.max(1)));
            threads.push(spawn_poster(
                namespace,
                push.clone(),
                RingSource(ring.clone()),
                metrics.clone(),
                stop.clone(),
            )?);
            info!(namespace, url = %push.webhook_url, "push hook on");
            hooks.push(Hook {
                namespace: namespace.clone(),
                ring,
            });
        }
        if hooks.is_empty() {
            return Ok(None);
        }
        Ok(Some(Arc::new(Self {
            inner,
            hooks,
            metrics,
            stop,
            threads: std::sync::Mutex::new(threads),
        })))
    }

    /// Stops the poster threads (what is not posted yet is dropped: the
    /// hook is a wake-up hint, not a log).
    pub fn shutdown(&self) {
        self.stop.store(true, Ordering::SeqCst);
        let threads = std::mem::take(&mut *self.threads.lock().unwrap_or_else(|e| e.into_inner()));
        for thread in threads {
            let _ = thread.join();
        }
    }
}

impl CommitListener for PushHooks {
    fn committed(&self, channel: &ChannelName, meta: &ChannelMeta, messages: &[StoredMessage]) {
        self.inner.committed(channel, meta, messages);
        let Some(hook) = self
            .hooks
            .iter()
            .find(|h| h.namespace == channel.namespace())
        else {
            return;
        };
        for message in messages {
            let notice = Notice {
                channel: channel.as_str().to_owned(),
                offset: message.offset.get(),
                timestamp_ms: message.timestamp_ms,
                size: message.payload.len(),
                producer_id: message.producer.map(|p| p.producer_id),
            };
            if hook.ring.force_push(notice).is_some() {
                self.metrics.push_notices_dropped.inc();
            }
        }
    }

    fn deleted(&self, channel: &ChannelName) {
        self.inner.deleted(channel);
    }
}

/// Posts one namespace's notices.
struct Poster<S> {
    source: S,
    config: PushConfig,
    metrics: Arc<Metrics>,
    stop: Arc<AtomicBool>,
}

impl<S: NoticeSource> Poster<S> {
    fn run(mut self) {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(Duration::from_millis(self.config.timeout_ms)))
            .http_status_as_error(false)
            .build()
            .into();
        let every = Duration::from_millis(self.config.batch_ms);
        let mut batch: Vec<Notice> = Vec::with_capacity(self.config.max_batch);
        let mut backoff = FIRST_BACKOFF;
        let mut next_post = Instant::now();
        while !self.stop.load(Ordering::SeqCst) {
            // Sleep in short steps so that a stop is seen quickly.
            let now = Instant::now();
            if now < next_post {
                std::thread::sleep((next_post - now).min(Duration::from_millis(50)));
                continue;
            }
            self.source.fill(&mut batch, self.config.max_batch);
            if batch.is_empty() {
                next_post = Instant::now() + every;
                continue;
            }
            match self.post(&agent, &batch) {
                Ok(()) => {
                    self.metrics.push_notices_sent.inc_by(batch.len() as u64);
                    batch.clear();
                    self.source.posted();
                    backoff = FIRST_BACKOFF;
                    // More waiting than one batch holds: post it at once.
                    next_post = if self.source.is_empty() {
                        Instant::now() + every
                    } else {
                        Instant::now()
                    };
                }
                Err(why) => {
                    self.metrics.push_post_errors.inc();
                    warn!(url = %self.config.webhook_url, %why, retry_in_ms = backoff.as_millis() as u64, "push webhook failed");
                    next_post = Instant::now() + backoff;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }

    fn post(&self, agent: &ureq::Agent, notices: &[Notice]) -> Result<(), String> {
        let body = serde_json::to_vec(&Batch { notices }).map_err(|e| e.to_string())?;
        let response = agent
            .post(&self.config.webhook_url)
            .header("content-type", "application/json")
            .send(&body[..])
            .map_err(|e| e.to_string())?;
        let status = response.status();
        if status.is_success() {
            Ok(())
        } else {
            Err(format!("HTTP {status}"))
        }
    }
}
