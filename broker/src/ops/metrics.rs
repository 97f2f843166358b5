//! The broker's metrics, in one Prometheus registry per broker.
//!
//! Counters and histograms are updated where things happen (sessions, the
//! writer thread, subscription loops); gauges that describe state (channels,
//! ring bytes, RocksDB sizes) are read when `/metrics` is scraped, so that
//! nothing on the hot path keeps them up to date.

use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec,
    Opts, Registry, TextEncoder,
};

/// Every metric the broker exports.
#[derive(Debug, Clone)]
pub struct Metrics {
    registry: Registry,
    /// Connections with an open session.
    pub connections: IntGauge,
    /// Sessions opened (Hello answered with Welcome).
    pub connections_opened: IntCounter,
    /// Sessions closed, by reason.
    pub connections_closed: IntCounterVec,
    /// QUIC handshakes completed.
    pub handshakes: IntCounter,
    /// Connection attempts refused by the per-address handshake rate or
    /// the broker-wide connection and handshake caps.
    pub handshakes_refused: IntCounter,
    /// Connection attempts asked to validate their address (QUIC Retry).
    pub handshakes_retried: IntCounter,
    /// WebSocket connections whose TLS and upgrade handshakes completed.
    pub websocket_handshakes: IntCounter,
    /// WebSocket connections open (each also counts in `connections` once
    /// its session is welcomed).
    pub websocket_connections: IntGauge,
    /// WebSocket upgrades refused, by reason: `path` (not the WebSocket
    /// endpoint), `origin` (a page of an origin not allowed).
    pub websocket_upgrades_refused: IntCounterVec,
    /// Datagrams a transport shard passed to the shard owning their
    /// connection (clients whose address changed).
    pub datagrams_forwarded: IntCounter,
    /// Subscriptions held.
    pub subscriptions: IntGauge,
    /// Publishes acknowledged (retries of stored publishes included).
    pub publishes: IntCounter,
    /// Publishes refused, by error code.
    pub publish_errors: IntCounterVec,
    /// Messages handed to subscribers' streams.
    pub deliveries: IntCounter,
    /// Payload bytes received in publishes.
    pub bytes_in: IntCounter,
    /// Bytes written to delivery streams.
    pub bytes_out: IntCounter,
    /// Publish received → acknowledged.
    pub publish_ack_seconds: Histogram,
    /// Message stored → handed to a live subscriber's stream.
    pub publish_deliver_seconds: Histogram,
    /// Subscriptions currently reading the log to catch up.
    pub catchup_subscribers: IntGauge,
    /// Catch-up reads from the log.
    pub catchup_reads: IntCounter,
    /// Publishes per group commit.
    pub group_commit_messages: Histogram,
    /// Duration of one group commit's write (and fsync, with `fsync`).
    pub wal_write_seconds: Histogram,
    /// Cluster: from proposing a Raft entry (here or forwarded) to its
    /// commit and application by the partition's leader.
    pub cluster_commit_seconds: Histogram,
    /// Messages deleted by retention.
    pub retention_deleted: IntCounter,
    /// Producer windows held in memory by the log writer.
    pub producer_windows: IntGauge,
    /// Producer windows removed after `producer_idle_secs` without a publish.
    pub producers_expired: IntCounter,
    /// Channels deleted through the admin API.
    pub channels_deleted: IntCounter,
    /// Retention cuts skipped because an earlier one moved the channel.
    pub retention_stale_trims: IntCounter,
    /// Payload bytes retention read to compute its cuts.
    pub retention_read_bytes: IntCounter,
    /// Channels retention examined.
    pub retention_channels_examined: IntCounter,
    /// Retention rounds completed.
    pub retention_rounds: IntCounter,
    /// Publishes refused because their user created channels too fast.
    pub channel_creations_refused: IntCounter,
    /// `Ack` requests accepted (before coalescing).
    pub cursor_acks: IntCounter,
    /// `MarkRead` requests accepted.
    pub read_marks: IntCounter,
    /// Cursor and marker values written (after coalescing).
    pub cursor_writes: IntCounter,
    /// Cursor flushes that failed (retried at the next interval).
    pub cursor_write_errors: IntCounter,
    /// Idle devices forgotten with their cursors.
    pub devices_expired: IntCounter,
    /// Cursors and markers removed because their channel was deleted.
    pub cursors_orphaned: IntCounter,
    /// Commit notices posted to push webhooks.
    pub push_notices_sent: IntCounter,
    /// Commit notices dropped (oldest first) while a webhook was down.
    pub push_notices_dropped: IntCounter,
    /// Webhook posts that failed (retried with backoff).
    pub push_post_errors: IntCounter,
    resident_channels: IntGauge,
    subscribed_channels: IntGauge,
    outbox_bytes: IntGauge,
    resident_bytes: IntGauge,
    cpu_seconds: Gauge,
    storage: IntGaugeVec,
}

/// State read at scrape time.
#[derive(Debug, Default, Clone)]
pub struct Snapshot {
    /// Channels whose metadata is in memory.
    pub resident_channels: usize,
    /// Channels with subscribers.
    pub subscribed_channels: usize,
    /// Bytes held in channel rings.
    pub outbox_bytes: usize,
    /// Storage engine properties, by name.
    pub storage: Vec<(&'static str, u64)>,
}

fn latency_buckets() -> Vec<f64> {
    vec![
        0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
        0.5, 1.0, 2.5,
    ]
}

impl Metrics {
    /// A fresh registry with every metric registered.
    pub fn new() -> Self {
        let registry =
            Registry::new_custom(Some("volna".into()), None).unwrap_or_else(|_| Registry::new());
        let counter = |name: &str, help: &str| {
            let c = IntCounter::new(name, help).unwrap_or_else(|e| unreachable_metric(name, e));
            register(&registry, Box::new(c.clone()));
            c
        };
        let gauge = |name: &str, help: &str| {
            let g = IntGauge::new(name, help).unwrap_or_else(|e| unreachable_metric(name, e));
            register(&registry, Box::new(g.clone()));
            g
        };
        let histogram = |name: &str, help: &str, buckets: Vec<f64>| {
            let h = Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets))
                .unwrap_or_else(|e| unreachable_metric(name, e));
            register(&registry, Box::new(h.clone()));
            h
        };
        let counter_vec = |name: &str, help: &str, label: &str| {
            let c = IntCounterVec::new(Opts::new(name, help), &[label])
                .unwrap_or_else(|e| unreachable_metric(name, e));
            register(&registry, Box::new(c.clone()));
            c
        };
        Self {
            connections: gauge("connections", "Connections with an open session"),
            connections_opened: counter("connections_opened_total", "Sessions opened"),
            connections_closed: counter_vec(
                "connections_closed_total",
                "Sessions closed, by reason",
                "reason",
            ),
            handshakes: counter("handshakes_total", "QUIC handshakes completed"),
            handshakes_refused: counter(
                "handshakes_refused_total",
                "Connection attempts refused by the per-address rate or the broker-wide caps",
            ),
            handshakes_retried: counter(
                "handshakes_retried_total",
                "Connection attempts asked to validate their address (QUIC Retry)",
            ),
            websocket_handshakes: counter(
                "websocket_handshakes_total",
                "WebSocket connections whose TLS and upgrade handshakes completed",
            ),
            websocket_connections: gauge("websocket_connections", "WebSocket connections open"),
            websocket_upgrades_refused: {
                let c = counter_vec(
                    "websocket_upgrades_refused_total",
                    "WebSocket upgrades refused, by reason (path, origin)",
                    "reason",
                );
                // Every reason from the start: a rate alert sees 0, not
                // a series that does not exist yet.
                for reason in ["path", "origin"] {
                    c.with_label_values(&[reason]);
                }
                c
            },
            datagrams_forwarded: counter(
                "datagrams_forwarded_total",
                "Datagrams a transport shard passed to the shard owning their connection",
            ),
            subscriptions: gauge("subscriptions", "Subscriptions held"),
            publishes: counter("publishes_total", "Publishes acknowledged"),
            publish_errors: counter_vec("publish_errors_total", "Publishes refused", "code"),
            deliveries: counter("deliveries_total", "Messages handed to subscribers"),
            bytes_in: counter("bytes_in_total", "Payload bytes received in publishes"),
            bytes_out: counter("bytes_out_total", "Bytes written to delivery streams"),
            publish_ack_seconds: histogram(
                "publish_ack_seconds",
                "Publish received to acknowledged",
                latency_buckets(),
            ),
            publish_deliver_seconds: histogram(
                "publish_deliver_seconds",
                "Message stored to handed to a live subscriber",
                latency_buckets(),
            ),
            catchup_subscribers: gauge(
                "catchup_subscribers",
                "Subscriptions reading the log to catch up",
            ),
            catchup_reads: counter("catchup_reads_total", "Catch-up reads from the log"),
            group_commit_messages: histogram(
                "group_commit_messages",
                "Publishes per group commit",
                prometheus::exponential_buckets(1.0, 2.0, 14).unwrap_or_default(),
            ),
            wal_write_seconds: histogram(
                "wal_write_seconds",
                "Group commit write (and fsync) duration",
                latency_buckets(),
            ),
            cluster_commit_seconds: histogram(
                "cluster_commit_seconds",
                "Cluster: proposing a partition entry until its leader applied it",
                latency_buckets(),
            ),
            retention_deleted: counter(
                "retention_deleted_messages_total",
                "Messages deleted by retention",
            ),
            producer_windows: gauge("producer_windows", "Producer windows held in memory"),
            producers_expired: counter(
                "producers_expired_total",
                "Producer windows removed after producer_idle_secs without a publish",
            ),
            resident_channels: gauge(
                "resident_channels",
                "Channels whose metadata the log holds in memory (the rest are on disk)",
            ),
            channels_deleted: counter("channels_deleted_total", "Channels deleted (admin API)"),
            retention_stale_trims: counter(
                "retention_stale_trims_total",
                "Retention cuts skipped because an earlier cut moved the channel meanwhile",
            ),
            retention_read_bytes: counter(
                "retention_read_bytes_total",
                "Payload bytes retention read to compute its cuts",
            ),
            retention_channels_examined: counter(
                "retention_channels_examined_total",
                "Channels retention examined",
            ),
            retention_rounds: counter("retention_rounds_total", "Retention rounds completed"),
            channel_creations_refused: counter(
                "channel_creations_refused_total",
                "Publishes refused because their user created channels faster than allowed",
            ),
            cursor_acks: counter("cursor_acks_total", "Ack requests accepted"),
            read_marks: counter("read_marks_total", "MarkRead requests accepted"),
            cursor_writes: counter(
                "cursor_writes_total",
                "Cursor and read-marker values written, after coalescing",
            ),
            cursor_write_errors: counter(
                "cursor_write_errors_total",
                "Cursor flushes that failed and were retried",
            ),
            devices_expired: counter(
                "devices_expired_total",
                "Idle devices forgotten with their cursors",
            ),
            cursors_orphaned: counter(
                "cursors_orphaned_total",
                "Cursors and read markers removed with their deleted channel",
            ),
            push_notices_sent: counter(
                "push_notices_sent_total",
                "Commit notices posted to push webhooks",
            ),
            push_notices_dropped: counter(
                "push_notices_dropped_total",
                "Commit notices dropped, oldest first, while a webhook was down",
            ),
            push_post_errors: counter(
                "push_post_errors_total",
                "Webhook posts that failed and were retried",
            ),
            subscribed_channels: gauge("subscribed_channels", "Channels with subscribers"),
            outbox_bytes: gauge("outbox_bytes", "Bytes held in channel rings"),
            resident_bytes: gauge(
                "process_resident_bytes",
                "Resident memory of the broker process",
            ),
            cpu_seconds: {
                let g = Gauge::new(
                    "process_cpu_seconds_total",
                    "CPU time (user + system) the broker process used",
                )
                .unwrap_or_else(|e| unreachable_metric("process_cpu_seconds_total", e));
                register(&registry, Box::new(g.clone()));
                g
            },
            storage: {
                let g = IntGaugeVec::new(
                    Opts::new("storage", "RocksDB properties (sizes in bytes)"),
                    &["property"],
                )
                .unwrap_or_else(|e| unreachable_metric("storage", e));
                register(&registry, Box::new(g.clone()));
                g
            },
            registry,
        }
    }

    /// The Prometheus text exposition, with `snapshot`'s gauges.
    pub fn render(&self, snapshot: &Snapshot) -> String {
        self.resident_channels
            .set(snapshot.resident_channels as i64);
        self.subscribed_channels
            .set(snapshot.subscribed_channels as i64);
        self.outbox_bytes.set(snapshot.outbox_bytes as i64);
        if let Some(rss) = resident_bytes() {
            self.resident_bytes
                .set(i64::try_from(rss).unwrap_or(i64::MAX));
        }
        if let Some(cpu) = cpu_seconds() {
            self.cpu_seconds.set(cpu);
        }
        for (name, value) in &snapshot.storage {
            self.storage
                .with_label_values(&[name])
                .set(i64::try_from(*value).unwrap_or(i64::MAX));
        }
        let mut out = Vec::new();
        // Encoding into a Vec cannot fail for well-formed metrics.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// The process's resident set size, from `/proc/self/status` (Linux).
fn resident_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// The process's CPU time, user plus system, from `/proc/self/stat`
/// (Linux; clock ticks of 1/100 s, USER_HZ).
fn cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name (which may hold spaces) in parentheses.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) as f64 / 100.0)
}

fn register(registry: &Registry, collector: Box<dyn prometheus::core::Collector>) {
    // Names are fixed and distinct: registration cannot collide.
    let _ = registry.register(collector);
}

fn unreachable_metric<T>(name: &str, e: prometheus::Error) -> T {
    // Metric names and options above are constants; this only fires if one
    // of them is edited into an invalid one, which the tests catch.
    panic!("invalid metric definition {name}: {e}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_metric_with_its_prefix() {
        let m = Metrics::new();
        m.publishes.inc();
        m.connections_closed.with_label_values(&["normal"]).inc();
        let text = m.render(&Snapshot {
            resident_channels: 3,
            storage: vec![("total_sst_bytes", 10)],
            ..Snapshot::default()
        });
        for name in [
            "volna_publishes_total 1",
            "volna_resident_channels 3",
            "volna_connections_closed_total{reason=\"normal\"} 1",
            "volna_storage{property=\"total_sst_bytes\"} 10",
            "volna_publish_ack_seconds_bucket",
            "volna_group_commit_messages_bucket",
            "volna_process_resident_bytes",
        ] {
            assert!(text.contains(name), "missing {name} in\n{text}");
        }
    }
}
