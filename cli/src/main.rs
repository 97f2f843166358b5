//! `volna`: the command line of the Volna broker, for a person at a terminal
//! and for scripts.
//!
//! `volna pub CHANNEL MESSAGE` prints the stored offset; `volna sub CHANNEL`
//! prints one `OFFSET<TAB>PAYLOAD` line per message. Errors go to stderr with
//! the broker's error code, and the exit status is non-zero.

use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use futures_util::StreamExt;
use tracing_subscriber::EnvFilter;
use volna_client::{
    ChannelName, Client, ClientConfig, ClientError, Fallback, Offset, Position, SubscriptionError,
    Trust,
};

mod admin;
mod bench;
mod verify;

use admin::AdminApi;

/// Where the broker keeps its development certificate when run from the
/// same directory with its defaults.
const DEV_CERT: &str = "volna-data/dev-cert.pem";

#[derive(Debug, Parser)]
#[command(
    name = "volna",
    version,
    about = "Publish to and subscribe from a Volna broker"
)]
struct Cli {
    /// The broker's QUIC address; give it several times (or comma-separated
    /// in VOLNA_SERVER) for a cluster's nodes, tried in turn.
    #[arg(
        long = "server",
        global = true,
        env = "VOLNA_SERVER",
        value_delimiter = ',',
        default_value = "127.0.0.1:7400"
    )]
    servers: Vec<String>,
    /// PEM file with the CA (or the broker's self-signed dev certificate) to
    /// trust. Default: ./volna-data/dev-cert.pem when it exists, else the
    /// public web PKI.
    #[arg(long, global = true, env = "VOLNA_CA")]
    ca: Option<PathBuf>,
    /// The name the broker's certificate must carry (default: the host of
    /// --server), e.g. `localhost` when reaching a development broker by
    /// another name.
    #[arg(long, global = true, env = "VOLNA_SERVER_NAME")]
    server_name: Option<String>,
    /// Trust exactly the certificate with this SHA-256 fingerprint (hex).
    #[arg(long, global = true, env = "VOLNA_PIN", conflicts_with = "ca")]
    pin: Option<String>,
    /// Authentication token.
    #[arg(long, global = true, env = "VOLNA_TOKEN", default_value = "dev")]
    token: String,
    /// The device this command speaks for: its cursors (`sub --resume`)
    /// and read markers (`read`) are stored under it.
    #[arg(long, global = true, env = "VOLNA_DEVICE")]
    device: Option<String>,
    /// The broker's HTTP port, for the admin subcommands.
    #[arg(
        long,
        global = true,
        env = "VOLNA_HTTP",
        default_value = "127.0.0.1:7401"
    )]
    http: String,
    /// The admin API's bearer token, for the admin subcommands.
    #[arg(long, global = true, env = "VOLNA_ADMIN_TOKEN", hide_env_values = true)]
    admin_token: Option<String>,
    /// Admin subcommands: print the API's JSON instead of a table.
    #[arg(long, global = true)]
    json: bool,
    /// The brokers' WebSocket URLs (`wss://host:7400/ws`; the flag given
    /// several times, or comma-separated): used when no seed completes a
    /// QUIC handshake within 2 s (UDP blocked), QUIC retried meanwhile.
    #[arg(long, global = true, env = "VOLNA_WEBSOCKET", value_delimiter = ',')]
    websocket: Vec<String>,
    /// Connect over --websocket only, never QUIC.
    #[arg(long, global = true, requires = "websocket")]
    websocket_only: bool,
    /// Give up connecting to the broker after this many seconds.
    #[arg(
        long,
        global = true,
        env = "VOLNA_CONNECT_TIMEOUT",
        default_value_t = 5.0
    )]
    connect_timeout: f64,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Publish a message and print its offset. MESSAGE `-` publishes each
    /// line of standard input.
    Pub {
        /// The channel, e.g. chat.8812.
        channel: ChannelName,
        /// The message body.
        message: String,
    },
    /// Print messages as `OFFSET<TAB>PAYLOAD`, one per line.
    Sub {
        /// The channel, e.g. chat.8812.
        channel: ChannelName,
        /// Start at this offset (default: only new messages).
        #[arg(long, conflicts_with = "last")]
        from: Option<u64>,
        /// Start with the last K stored messages.
        #[arg(long)]
        last: Option<u64>,
        /// Start after the device's stored cursor (from offset 1 when it
        /// has none) and acknowledge each printed message; before exiting,
        /// wait until the acknowledgements are stored. Needs --device.
        #[arg(long, conflicts_with_all = ["from", "last"])]
        resume: bool,
        /// Exit after K messages.
        #[arg(long)]
        count: Option<u64>,
        /// Also print, to stderr, the read markers the user's other
        /// devices move (`marker CHANNEL OFFSET`). Needs --device.
        #[arg(long)]
        markers: bool,
    },
    /// Set the user's read marker on CHANNEL to OFFSET (it only moves
    /// forward); the user's other devices hear of it. Needs --device.
    Read {
        /// The channel.
        channel: ChannelName,
        /// The last offset read.
        offset: u64,
    },
    /// Print the user's unread count per channel as `CHANNEL<TAB>COUNT`
    /// (no channels: every channel the user has a read marker on).
    Unread {
        /// The channels.
        channels: Vec<ChannelName>,
    },
    /// Operator commands over the admin API.
    Admin {
        #[command(subcommand)]
        command: AdminCommand,
    },
    /// Drive the broker with many connections and check every delivery;
    /// exits non-zero if any was lost, duplicated or reordered.
    Bench(bench::BenchArgs),
    /// List channels with their offsets, sizes and subscribers (admin).
    Channels {
        /// Only channels whose name starts with this.
        #[arg(long, default_value = "")]
        prefix: String,
        /// At most this many.
        #[arg(long, default_value_t = 1000)]
        limit: usize,
    },
    /// One channel's details (admin).
    Channel {
        #[command(subcommand)]
        command: ChannelCommand,
    },
    /// List open sessions (admin).
    Sessions,
    /// The cluster as the node at --http sees it (admin).
    Cluster {
        #[command(subcommand)]
        command: ClusterCommand,
    },
    /// Disconnect every session of USER, or one session (admin).
    Kick {
        /// The user whose sessions to close.
        #[arg(required_unless_present = "session")]
        user: Option<String>,
        /// Close this session id instead.
        #[arg(long, conflicts_with = "user")]
        session: Option<u64>,
    },
    /// Show, or with any limit set, replace a namespace's retention (admin;
    /// lasts until the broker restarts).
    Retention {
        /// The namespace, e.g. chat.
        namespace: String,
        /// Keep at most this many messages per channel.
        #[arg(long)]
        max_messages: Option<u64>,
        /// Keep at most this many payload bytes per channel.
        #[arg(long)]
        max_bytes: Option<u64>,
        /// Keep messages at most this many seconds.
        #[arg(long)]
        max_age_secs: Option<u64>,
    },
}

#[derive(Debug, Subcommand)]
enum AdminCommand {
    /// USER's unread count on every channel the user has a read marker on.
    Unread {
        /// The user (a token's `sub`).
        user: String,
    },
}

#[derive(Debug, Subcommand)]
enum ClusterCommand {
    /// Nodes, and per partition: replicas, leader, term, log position and
    /// each follower's lag (where the node asked leads).
    Status,
    /// Compare every replica of every partition by digest, at the entry
    /// they all stand at; fails when any replica differs.
    Verify {
        /// Each node's HTTP address (the flag given once per node);
        /// default: --http alone.
        #[arg(long = "node", value_delimiter = ',')]
        nodes: Vec<String>,
        /// How long to wait for a partition's replicas to stand at one
        /// entry (a follower still applying).
        #[arg(long, default_value_t = 30)]
        within_secs: u64,
    },
}

#[derive(Debug, Subcommand)]
enum ChannelCommand {
    /// Offsets, size and subscribers of one channel.
    Info {
        /// The channel.
        channel: ChannelName,
    },
    /// Remove a channel and its whole log, for good. Its subscribers are
    /// told (`ChannelDeleted`); a later publish creates a new channel.
    Delete {
        /// The channel.
        channel: ChannelName,
    },
}

const CHANNEL_COLUMNS: &[&str] = &[
    "name",
    "epoch",
    "first_offset",
    "next_offset",
    "messages",
    "bytes",
    "subscribers",
];

/// Runs the command; an error is printed as one message with its causes
/// and a hint, never as a backtrace, and the exit status is 1.
fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("volna: {e:#}");
            if let Some(hint) = hint(&e) {
                eprintln!("  hint: {hint}");
            }
            ExitCode::FAILURE
        }
    }
}

/// What to try next, for the errors a person at a terminal meets.
fn hint(e: &anyhow::Error) -> Option<&'static str> {
    let client = e.chain().find_map(|c| c.downcast_ref::<ClientError>())?;
    match client {
        ClientError::ConnectTimeout { .. } => {
            Some("is the broker running there, and does UDP get through (QUIC is UDP)?")
        }
        ClientError::Tls(_) => Some(
            "pass --ca with the broker's CA or development certificate, or --pin its fingerprint",
        ),
        ClientError::Refused { code, .. } if *code == volna_client::ErrorCode::Unauthorized => {
            Some("pass a valid token with --token (or VOLNA_TOKEN)")
        }
        _ => None,
    }
}

#[tokio::main]
async fn run() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_env("VOLNA_LOG").unwrap_or_else(|_| EnvFilter::new("error")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let api = AdminApi {
        http: cli.http.clone(),
        token: cli.admin_token.clone(),
    };
    let json = cli.json;
    match &cli.command {
        Command::Channels { prefix, limit } => {
            let path = format!(
                "/admin/channels?prefix={}&limit={limit}",
                encode_query(prefix)
            );
            let value = api.call("GET", &path, None).await?;
            admin::print(&value, CHANNEL_COLUMNS, json);
            return Ok(());
        }
        Command::Channel {
            command: ChannelCommand::Info { channel },
        } => {
            let value = api
                .call("GET", &format!("/admin/channels/{channel}"), None)
                .await?;
            admin::print(&value, CHANNEL_COLUMNS, json);
            return Ok(());
        }
        Command::Channel {
            command: ChannelCommand::Delete { channel },
        } => {
            let value = api
                .call("DELETE", &format!("/admin/channels/{channel}"), None)
                .await?;
            admin::print(&value, CHANNEL_COLUMNS, json);
            return Ok(());
        }
        Command::Cluster {
            command: ClusterCommand::Status,
        } => {
            let value = api.call("GET", "/admin/cluster", None).await?;
            if json {
                println!("{value}");
            } else {
                println!(
                    "node {} · map version {} · inter-node bytes sent {} received {} · forwarded {} · upstreams {} · relayed {}",
                    value["node"],
                    value["map_version"],
                    value["peer_bytes_sent"],
                    value["peer_bytes_received"],
                    value["forwarded"],
                    value["upstreams"],
                    value["relayed"]
                );
                admin::print(&value["nodes"], &["id", "quic", "peer", "live"], false);
                admin::print(
                    &value["partitions"],
                    &[
                        "partition",
                        "replicas",
                        "hosted",
                        "leader",
                        "term",
                        "last_log",
                        "last_applied",
                        "lag",
                    ],
                    false,
                );
            }
            return Ok(());
        }
        Command::Cluster {
            command: ClusterCommand::Verify { nodes, within_secs },
        } => {
            let apis: Vec<AdminApi> = if nodes.is_empty() {
                vec![api.clone()]
            } else {
                nodes
                    .iter()
                    .map(|http| AdminApi {
                        http: http.clone(),
                        token: cli.admin_token.clone(),
                    })
                    .collect()
            };
            verify::verify(&apis, Duration::from_secs(*within_secs)).await?;
            return Ok(());
        }
        Command::Sessions => {
            let value = api.call("GET", "/admin/sessions", None).await?;
            let columns = [
                "id",
                "user",
                "client",
                "remote",
                "connected_secs",
                "subscriptions",
            ];
            admin::print(&value, &columns, json);
            return Ok(());
        }
        Command::Kick { user, session } => {
            let body = match (user, session) {
                (_, Some(id)) => serde_json::json!({ "session": id }),
                (Some(user), None) => serde_json::json!({ "user": user }),
                (None, None) => bail!("give a USER or --session ID"),
            };
            let value = api.call("POST", "/admin/kick", Some(body)).await?;
            admin::print(&value, &["disconnected"], json);
            return Ok(());
        }
        Command::Retention {
            namespace,
            max_messages,
            max_bytes,
            max_age_secs,
        } => {
            let path = format!("/admin/namespaces/{namespace}/retention");
            let value = if max_messages.is_some() || max_bytes.is_some() || max_age_secs.is_some() {
                let body = serde_json::json!({
                    "max_messages": max_messages,
                    "max_bytes": max_bytes,
                    "max_age_secs": max_age_secs,
                });
                api.call("PUT", &path, Some(body)).await?
            } else {
                api.call("GET", &path, None).await?
            };
            admin::print(&value, &["max_messages", "max_bytes", "max_age_secs"], json);
            return Ok(());
        }
        Command::Admin {
            command: AdminCommand::Unread { user },
        } => {
            let path = format!("/admin/users/{}/unread", encode_query(user));
            let value = api.call("GET", &path, None).await?;
            admin::print(&value, &["channel", "unread", "head", "read"], json);
            return Ok(());
        }
        Command::Pub { .. }
        | Command::Sub { .. }
        | Command::Read { .. }
        | Command::Unread { .. }
        | Command::Bench(_) => {}
    }
    let trust = trust(&cli)?;
    let mut config = ClientConfig::with_servers(cli.servers.clone(), &cli.token, trust);
    config.server_name = cli.server_name.clone();
    config.device = cli.device.clone();
    config.websocket = cli.websocket.clone();
    if cli.websocket_only {
        config.servers.clear();
    }
    config.connect_timeout = std::time::Duration::try_from_secs_f64(cli.connect_timeout)
        .ok()
        .filter(|d| !d.is_zero())
        .context("--connect-timeout must be a positive number of seconds")?;
    if let Command::Bench(args) = &cli.command {
        let target = bench::Target::new(config, api, args)?;
        if !bench::run(args, target, json).await? {
            bail!("benchmark failed: deliveries were lost, duplicated or reordered");
        }
        return Ok(());
    }
    let client = Client::connect(config).await.with_context(|| {
        let websocket = cli.websocket.join(", ");
        match (cli.websocket.is_empty(), cli.websocket_only) {
            (false, true) => format!("connecting to {websocket}"),
            (false, false) => format!("connecting to {} or {websocket}", cli.servers.join(", ")),
            (true, _) => format!("connecting to {}", cli.servers.join(", ")),
        }
    })?;
    let result = match cli.command {
        Command::Pub { channel, message } => publish(&client, &channel, &message).await,
        Command::Sub {
            channel,
            from,
            last,
            resume,
            count,
            markers,
        } => {
            if markers {
                let Some(mut moved) = client.read_markers() else {
                    bail!("`sub --markers` prints a device's read markers: give --device ID");
                };
                tokio::spawn(async move {
                    loop {
                        match moved.recv().await {
                            Ok(m) => eprintln!("marker {} {}", m.channel, m.offset),
                            Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                                eprintln!("{n} marker moves missed; ask `unread`");
                            }
                            Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                        }
                    }
                });
            }
            let start = match (from, last) {
                _ if resume && cli.device.is_none() => {
                    bail!("`sub --resume` resumes a device's cursor: give --device ID")
                }
                _ if resume => Start::Resume,
                (Some(0), _) => bail!("--from: offsets start at 1"),
                (Some(offset), _) => Start::At(Position::From {
                    offset: Offset::new(offset),
                    epoch: None,
                }),
                (None, Some(k)) => Start::At(Position::Last(k)),
                (None, None) => Start::At(Position::Latest),
            };
            subscribe(&client, &channel, start, count).await
        }
        Command::Read { channel, offset } => {
            if cli.device.is_none() {
                bail!("`read` sets a device's read marker: give --device ID");
            }
            if offset == 0 {
                bail!("OFFSET: offsets start at 1");
            }
            client.mark_read(&channel, Offset::new(offset)).await?;
            println!("{channel}\t{offset}");
            Ok(())
        }
        Command::Unread { channels } => {
            let counts = client.unread(&channels).await?;
            let mut out = std::io::stdout().lock();
            if json {
                let rows: Vec<serde_json::Value> = counts
                    .iter()
                    .map(|c| {
                        serde_json::json!({
                            "channel": c.channel.to_string(),
                            "unread": c.unread,
                            "head": c.head,
                            "read": c.read,
                        })
                    })
                    .collect();
                writeln!(out, "{}", serde_json::Value::Array(rows))?;
            } else {
                for c in &counts {
                    writeln!(out, "{}\t{}", c.channel, c.unread)?;
                }
            }
            Ok(())
        }
        _ => Ok(()),
    };
    // The broker is told before the process exits: a short-lived run must
    // not hold a connection (counted against the user) until it times out.
    client.close().await;
    result
}

/// Percent-encodes a query value (channel names are mostly safe already).
fn encode_query(value: &str) -> String {
    value
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            other => format!("%{other:02X}"),
        })
        .collect()
}

fn trust(cli: &Cli) -> anyhow::Result<Trust> {
    if let Some(pin) = &cli.pin {
        let pin = pin.trim_start_matches("sha256:").replace(':', "");
        let bytes = (0..pin.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(pin.get(i..i + 2).unwrap_or("zz"), 16))
            .collect::<Result<Vec<u8>, _>>()
            .context("--pin is not hex")?;
        let fingerprint: [u8; 32] = bytes
            .try_into()
            .map_err(|_| anyhow::anyhow!("--pin must be a 32-byte SHA-256 fingerprint"))?;
        return Ok(Trust::Pinned(fingerprint));
    }
    Ok(match &cli.ca {
        Some(path) => Trust::CaFile(path.clone()),
        None if std::path::Path::new(DEV_CERT).exists() => Trust::CaFile(DEV_CERT.into()),
        None => Trust::WebPki,
    })
}

async fn publish(client: &Client, channel: &ChannelName, message: &str) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    if message != "-" {
        let ack = client.publish(channel, message.to_owned()).await?;
        writeln!(out, "{}", ack.offset)?;
        return Ok(());
    }
    for line in std::io::stdin().lock().lines() {
        let ack = client.publish(channel, line?).await?;
        writeln!(out, "{}", ack.offset)?;
    }
    Ok(())
}

/// Where `sub` starts.
enum Start {
    /// A plain position.
    At(Position),
    /// After the device's cursor, acknowledging what is printed.
    Resume,
}

async fn subscribe(
    client: &Client,
    channel: &ChannelName,
    start: Start,
    count: Option<u64>,
) -> anyhow::Result<()> {
    if count == Some(0) {
        return Ok(());
    }
    let (position, acking) = match start {
        Start::At(position) => (position, false),
        Start::Resume => (
            Position::Cursor {
                otherwise: Fallback::From(Offset::FIRST),
            },
            true,
        ),
    };
    let mut messages = client.subscribe(channel, position).await?;
    let mut seen = 0u64;
    let printed = async {
        loop {
            let item = tokio::select! {
                item = messages.next() => item,
                // Interrupted: what was printed is acknowledged below.
                _ = tokio::signal::ctrl_c() => return Ok(()),
            };
            match item {
                Some(Ok(m)) => {
                    let mut out = std::io::stdout().lock();
                    writeln!(out, "{}\t{}", m.offset, String::from_utf8_lossy(&m.payload))?;
                    out.flush()?;
                    if acking {
                        messages.ack(m.offset)?;
                    }
                    seen += 1;
                    if count.is_some_and(|k| seen >= k) {
                        return Ok(());
                    }
                }
                Some(Err(end @ SubscriptionError::Ended { .. })) => return Err(end.into()),
                Some(Err(event)) => eprintln!("volna: {event}"),
                None => bail!("the subscription ended"),
            }
        }
    };
    let result: anyhow::Result<()> = printed.await;
    if acking {
        client
            .flush_acks()
            .await
            .context("storing the acknowledgements")?;
    }
    result
}
