//! `volna`: the command line of the Volna broker, for a person at a terminal
//! and for scripts.
//!
//! `volna pub CHANNEL MESSAGE` prints the stored offset; `volna sub CHANNEL`
//! prints one `OFFSET<TAB>PAYLOAD` line per message. Errors go to stderr with
//! the broker's error code, and the exit status is non-zero.

use std::io::{BufRead, Write};
use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use futures_util::StreamExt;
use tracing_subscriber::EnvFilter;
use volna_client::{ChannelName, Client, ClientConfig, Offset, Position, Trust};

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
    /// The broker's QUIC address.
    #[arg(
        long,
        global = true,
        env = "VOLNA_SERVER",
        default_value = "127.0.0.1:7400"
    )]
    server: String,
    /// PEM file with the CA (or the broker's self-signed dev certificate) to
    /// trust. Default: ./volna-data/dev-cert.pem when it exists, else the
    /// public web PKI.
    #[arg(long, global = true, env = "VOLNA_CA")]
    ca: Option<PathBuf>,
    /// Trust exactly the certificate with this SHA-256 fingerprint (hex).
    #[arg(long, global = true, env = "VOLNA_PIN", conflicts_with = "ca")]
    pin: Option<String>,
    /// Authentication token.
    #[arg(long, global = true, env = "VOLNA_TOKEN", default_value = "dev")]
    token: String,
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
        /// Exit after K messages.
        #[arg(long)]
        count: Option<u64>,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_env("VOLNA_LOG").unwrap_or_else(|_| EnvFilter::new("error")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let trust = trust(&cli)?;
    let client = Client::connect(ClientConfig::new(&cli.server, &cli.token, trust))
        .await
        .with_context(|| format!("connecting to {}", cli.server))?;
    let result = match cli.command {
        Command::Pub { channel, message } => publish(&client, &channel, &message).await,
        Command::Sub {
            channel,
            from,
            last,
            count,
        } => subscribe(&client, &channel, from, last, count).await,
    };
    client.close();
    result
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

async fn subscribe(
    client: &Client,
    channel: &ChannelName,
    from: Option<u64>,
    last: Option<u64>,
    count: Option<u64>,
) -> anyhow::Result<()> {
    let position = match (from, last) {
        (Some(0), _) => bail!("--from: offsets start at 1"),
        (Some(offset), _) => Position::From {
            offset: Offset::new(offset),
            epoch: None,
        },
        (None, Some(k)) => Position::Last(k),
        (None, None) => Position::Latest,
    };
    if count == Some(0) {
        return Ok(());
    }
    let mut messages = client.subscribe(channel, position).await?;
    let mut seen = 0u64;
    while let Some(item) = messages.next().await {
        match item {
            Ok(m) => {
                let mut out = std::io::stdout().lock();
                writeln!(out, "{}\t{}", m.offset, String::from_utf8_lossy(&m.payload))?;
                out.flush()?;
                seen += 1;
                if count.is_some_and(|k| seen >= k) {
                    return Ok(());
                }
            }
            Err(event) => eprintln!("volna: {event}"),
        }
    }
    bail!("the subscription ended")
}
