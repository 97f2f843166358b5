//! `volna bench`: a load generator that drives a real broker over QUIC and
//! checks every delivery.
//!
//! Every subscriber is its own connection and checks that it receives each
//! offset once, in order. The connections share `--client-endpoints` UDP
//! sockets with large buffers: one socket per connection runs out of file
//! descriptors long before the broker runs out of anything, and one socket
//! for all of them drops datagrams in bursts and makes the broker look slow. Every payload
//! starts with its send time, so latency is end to end. A run that loses,
//! duplicates or reorders a single delivery fails (non-zero exit), whatever
//! its speed.
//!
//! Scenarios ([`Scenario`]): `fanout`, `chats`, `catchup`, `connections`,
//! `storm` against a broker; `ceiling` against a bare quinn server in this
//! process, the same generator with no broker logic, so Volna's efficiency
//! against the QUIC ceiling is measured side by side.

mod ceiling;
mod nats;
mod scenarios;
mod workload;

use clap::{Args, ValueEnum};
use serde_json::{Value, json};
use volna_client::{ClientConfig, Endpoint};

use crate::admin::AdminApi;

/// Scenarios `volna bench` knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Scenario {
    /// `--publishers` publishers → `--subscribers` subscribers on one channel.
    Fanout,
    /// `--channels` channels, each with `--subscribers` subscribers and its
    /// own publisher: many small groups, the messenger's common case.
    Chats,
    /// Pre-fill one channel with `--messages`, then `--subscribers` read it
    /// from offset 1: replay throughput from the log.
    Catchup,
    /// Open `--connections` connections, each subscribed to its own inbox,
    /// hold them idle for `--hold-secs`, then deliver one message to each:
    /// connect rate and broker memory per connection.
    Connections,
    /// `--connections` subscribers all disconnected at once (admin kick) and
    /// reconnecting while publishing goes on: time until every one resumed,
    /// and proof that none missed a message. Needs `--admin-token`.
    Storm,
    /// `fanout` against a bare quinn server in this process: the QUIC
    /// ceiling of this machine, no broker.
    Ceiling,
    /// `--channels` inboxes with one subscriber each, `--per-connection`
    /// of them on each subscriber connection, and one publisher connection
    /// per group publishing `--messages` to each of its inboxes (on
    /// `--publish-server` when given: another node of a cluster, so that
    /// the subscribers' node follows every inbox through its edges).
    Inboxes,
}

impl Scenario {
    fn name(self) -> &'static str {
        match self {
            Scenario::Fanout => "fanout",
            Scenario::Chats => "chats",
            Scenario::Catchup => "catchup",
            Scenario::Connections => "connections",
            Scenario::Storm => "storm",
            Scenario::Ceiling => "ceiling",
            Scenario::Inboxes => "inboxes",
        }
    }
}

/// `volna bench` flags.
#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    /// What to measure.
    #[arg(value_enum)]
    pub scenario: Scenario,
    /// Subscribers (per channel with `chats`), each on its own connection.
    #[arg(long, default_value_t = 100)]
    pub subscribers: usize,
    /// Publishers of `fanout` (each its own connection).
    #[arg(long, default_value_t = 1)]
    pub publishers: usize,
    /// Channels of `chats`.
    #[arg(long, default_value_t = 100)]
    pub channels: usize,
    /// Messages to publish (per channel with `chats`).
    #[arg(long, default_value_t = 10_000)]
    pub messages: u64,
    /// Payload size in bytes (at least 16: send time and sequence).
    #[arg(long, default_value_t = 64)]
    pub payload: usize,
    /// Publish at most this many messages per second in all (0: as fast as
    /// acks allow).
    #[arg(long, default_value_t = 0)]
    pub rate: u64,
    /// Connections of `connections` and `storm`.
    #[arg(long, default_value_t = 1000)]
    pub connections: usize,
    /// How long `connections` holds its connections idle.
    #[arg(long, default_value_t = 5)]
    pub hold_secs: u64,
    /// Give up on deliveries after this many seconds.
    #[arg(long, default_value_t = 120)]
    pub timeout_secs: u64,
    /// UDP sockets the generator's connections are spread over. Each
    /// socket's datagrams are received by one task: with 16, a 5,000-way
    /// fan-out overflowed them (kernel receive-buffer drops, then QUIC
    /// retransmissions that tripled the generator's CPU); 64 showed none.
    #[arg(long, default_value_t = 64)]
    pub client_endpoints: usize,
    /// Receive and send buffer asked for each of those sockets (capped by
    /// the kernel's `net.core.rmem_max` / `wmem_max`).
    #[arg(long, default_value_t = 4 * 1024 * 1024)]
    pub socket_buffer: usize,
    /// How often each client pings an idle connection (0: the client
    /// library's defaults, 5 s pings and a 15 s idle timeout); the clients'
    /// idle timeout becomes three intervals. Phones use longer intervals
    /// to save battery; with hundreds of thousands of connections on one
    /// box the generator's and the broker's cores go to keep-alives at
    /// 5 s. The broker's `limits.idle_timeout_ms` (30 s by default) must
    /// exceed an interval.
    #[arg(long, default_value_t = 0)]
    pub keep_alive_secs: u64,
    /// `fanout`, `chats`: every subscriber is a device that acknowledges
    /// each message it takes (its cursor, coalesced per
    /// `ClientConfig::ack_interval`); the summary adds the acks the broker
    /// took and the cursor values it wrote.
    #[arg(long)]
    pub ack: bool,
    /// With `--ack`: how long each device gathers acknowledgements before
    /// it sends them (0: one `Ack` per message taken; the client library's
    /// default is 20 ms).
    #[arg(long, default_value_t = 20)]
    pub ack_interval_ms: u64,
    /// With `--ack`: each device is its own user, its token the given one
    /// with `-<i>` appended (a broker with `auth.mode = "none"` takes a
    /// token as its user), as a messenger's devices are: their state
    /// spreads over a cluster's partitions instead of one user's.
    #[arg(long, requires = "ack")]
    pub device_users: bool,
    /// `inboxes`: subscriptions per subscriber connection (and channels
    /// per publisher connection).
    #[arg(long, default_value_t = 1)]
    pub per_connection: usize,
    /// `inboxes` on a cluster node: only inboxes of partitions that node
    /// does not hold (its `/admin/cluster`, so `--admin-token` is needed),
    /// each followed there through an upstream from its leader.
    #[arg(long)]
    pub edges: bool,
    /// `inboxes`: where publishers connect (`host:port`; by default the
    /// subscribers' server).
    #[arg(long, value_name = "ADDR")]
    pub publish_server: Option<String>,
    /// Run `fanout` or `chats` against this NATS server (core NATS, e.g.
    /// `nats://127.0.0.1:4222`) instead of a Volna broker.
    #[arg(long, value_name = "URL")]
    pub nats: Option<String>,
}

/// Publishes one bench publisher keeps waiting for their acks.
const PUBLISH_INFLIGHT: usize = 250;

/// What the generator needs besides the flags.
#[derive(Debug, Clone)]
pub struct Target {
    /// How clients connect.
    pub client: ClientConfig,
    /// The broker's HTTP port (metrics, admin API).
    pub admin: AdminApi,
    /// The sockets clients connect through, taken in turn.
    endpoints: Vec<Endpoint>,
    /// With `--ack`: subscribers are devices named after this run.
    devices: Option<u32>,
    /// With `--device-users`: each device is its own user.
    device_users: bool,
}

impl Target {
    /// A target whose clients connect as `client` says, spread over
    /// `args.client_endpoints` shared sockets.
    pub fn new(
        mut client: ClientConfig,
        admin: AdminApi,
        args: &BenchArgs,
    ) -> anyhow::Result<Self> {
        // Publishers keep as many publishes in flight as the broker's
        // default producer window still recognises as retries (256).
        client.max_inflight_publishes = PUBLISH_INFLIGHT;
        client.ack_interval = std::time::Duration::from_millis(args.ack_interval_ms);
        if args.keep_alive_secs > 0 {
            client.keep_alive = std::time::Duration::from_secs(args.keep_alive_secs);
            client.idle_timeout = client.keep_alive * 3;
        }
        Ok(Self {
            endpoints: workload::bind_endpoints(
                client
                    .servers
                    .first()
                    .map_or("127.0.0.1:7400", String::as_str),
                args,
            )?,
            client,
            admin,
            devices: args.ack.then(rand::random),
            device_users: args.device_users,
        })
    }

    /// Whether subscribers acknowledge what they take (`--ack`).
    pub fn acks(&self) -> bool {
        self.devices.is_some()
    }

    /// The configuration of the `i`-th subscriber client: its share of the
    /// sockets, and room for the one subscription it holds (each allowed
    /// subscription costs quinn state on every connection).
    pub fn client_config(&self, i: usize) -> ClientConfig {
        let mut config = self.client.clone();
        config.endpoint = Some(self.endpoints[i % self.endpoints.len()].clone());
        config.max_subscriptions = 1;
        if let Some(run) = self.devices {
            config.device = Some(format!("bench-{run}-{i}"));
            if self.device_users {
                config.token = format!("{}-{i}", self.client.token);
            }
        }
        config
    }
}

/// Runs the benchmark and prints its report; returns whether every
/// delivery was correct.
pub async fn run(args: &BenchArgs, target: Target, json_out: bool) -> anyhow::Result<bool> {
    workload::check_args(args)?;
    let report = match args.scenario {
        Scenario::Fanout => match &args.nats {
            Some(url) => nats::fanout(args, url, json_out).await?,
            None => scenarios::fanout(args, &target, json_out).await?,
        },
        Scenario::Chats => match &args.nats {
            Some(url) => nats::chats(args, url, json_out).await?,
            None => scenarios::chats(args, &target, json_out).await?,
        },
        Scenario::Catchup => scenarios::catchup(args, &target, json_out).await?,
        Scenario::Connections => scenarios::connections(args, &target, json_out).await?,
        Scenario::Storm => scenarios::storm(args, &target, json_out).await?,
        Scenario::Ceiling => ceiling::run(args, json_out).await?,
        Scenario::Inboxes => scenarios::inboxes(args, &target, json_out).await?,
    };
    let correct = report["lost"] == 0 && report["duplicates"] == 0 && report["out_of_order"] == 0;
    if json_out {
        println!("{report}");
    } else {
        print_table(&report);
    }
    Ok(correct)
}

fn print_table(summary: &Value) {
    let mut table = comfy_table::Table::new();
    table.load_preset(comfy_table::presets::UTF8_BORDERS_ONLY);
    table.set_header(["figure", "value"]);
    let number = |key: &str| match &summary[key] {
        Value::Number(n) if n.is_f64() => format!("{:.2}", n.as_f64().unwrap_or(0.0)),
        Value::Null => "unknown".to_owned(),
        other => other.to_string(),
    };
    let latency = &summary["latency_us"];
    let rows = [
        (
            "scenario",
            summary["scenario"].as_str().unwrap_or_default().to_owned(),
        ),
        (
            "connections / subscribers / publishers / channels",
            format!(
                "{} / {} / {} / {}",
                summary["connections"],
                summary["subscribers"],
                summary["publishers"],
                summary["channels"]
            ),
        ),
        ("payload bytes", number("payload_bytes")),
        ("messages published", number("messages_published")),
        (
            "deliveries",
            format!(
                "{} of {}",
                summary["deliveries_received"], summary["deliveries_expected"]
            ),
        ),
        (
            "lost / duplicates / out of order",
            format!(
                "{} / {} / {}",
                summary["lost"], summary["duplicates"], summary["out_of_order"]
            ),
        ),
        ("publish msgs/s", number("publish_per_sec")),
        ("deliveries/s", number("deliveries_per_sec")),
        (
            "latency p50 / p99 / p99.9 / max (µs)",
            format!(
                "{} / {} / {} / {}",
                latency["p50"], latency["p99"], latency["p999"], latency["max"]
            ),
        ),
        ("connects/s", number("connect_per_sec")),
        (
            "CPU seconds: broker / generator",
            format!("{} / {}", number("broker_cpu_s"), number("generator_cpu_s")),
        ),
        (
            "broker RSS",
            summary["broker_rss_bytes"]
                .as_u64()
                .map_or("unknown".into(), |b| {
                    format!("{:.1} MiB", b as f64 / 1048576.0)
                }),
        ),
        ("duration (s)", number("duration_s")),
    ];
    for (k, v) in rows {
        table.add_row([k.to_owned(), v]);
    }
    // Scenario-specific figures.
    if let Some(extra) = summary["extra"].as_object() {
        for (k, v) in extra {
            table.add_row([k.replace('_', " "), v.to_string()]);
        }
    }
    println!("{table}");
}

/// The JSON summary every scenario prints (the fields issue #3 names).
#[allow(clippy::too_many_arguments)]
fn summary(
    scenario: Scenario,
    shape: workload::Shape,
    payload: usize,
    totals: &workload::Totals,
    publish_secs: f64,
    duration_s: f64,
    connect_per_sec: f64,
    broker_rss: Option<u64>,
    cpu: workload::CpuUse,
    extra: Value,
) -> Value {
    let lost = totals.expected.saturating_sub(totals.received);
    json!({
        "scenario": scenario.name(),
        "connections": shape.connections,
        "subscribers": shape.subscribers,
        "publishers": shape.publishers,
        "channels": shape.channels,
        "payload_bytes": payload,
        "messages_published": totals.published,
        "deliveries_expected": totals.expected,
        "deliveries_received": totals.received,
        "lost": lost,
        "duplicates": totals.duplicates,
        "out_of_order": totals.out_of_order,
        "publish_per_sec": totals.published as f64 / publish_secs.max(1e-9),
        "deliveries_per_sec": totals.received as f64 / duration_s.max(1e-9),
        "latency_us": {
            "p50": totals.latency_us.value_at_quantile(0.50),
            "p99": totals.latency_us.value_at_quantile(0.99),
            "p999": totals.latency_us.value_at_quantile(0.999),
            "max": totals.latency_us.max(),
        },
        "connect_per_sec": connect_per_sec,
        "broker_rss_bytes": broker_rss,
        "broker_cpu_s": cpu.broker_s,
        "generator_cpu_s": cpu.generator_s,
        "duration_s": duration_s,
        "extra": extra,
    })
}
