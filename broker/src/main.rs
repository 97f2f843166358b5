//! `volna-broker`: runs the broker until SIGINT or SIGTERM.
//!
//! Configuration comes from the embedded defaults, then `--config FILE`,
//! then `VOLNA_*` environment variables (`VOLNA_LIMITS__MAX_PAYLOAD` for
//! nested keys), then flags (flags win).

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;
use volna_broker::config::{Durability, LogFormat};
use volna_broker::{Broker, Config};

#[derive(Debug, Parser)]
#[command(name = "volna-broker", version, about = "Volna message fan-out broker")]
struct Args {
    /// TOML configuration file (every key is optional).
    #[arg(long, env = "VOLNA_CONFIG")]
    config: Option<PathBuf>,
    /// Directory for the channel log and the development certificate.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// UDP address for QUIC clients.
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// TCP address for health, metrics and the admin API.
    #[arg(long)]
    http: Option<SocketAddr>,
    /// TCP address for WebSocket clients (browsers, networks without UDP;
    /// default: the QUIC address over TCP).
    #[arg(long, value_name = "ADDR:PORT")]
    websocket: Option<SocketAddr>,
    /// Serve WebSocket clients over plain ws:// without TLS: development
    /// only.
    #[arg(long)]
    websocket_plaintext: bool,
    /// When a publish is acknowledged: after the WAL write, or after its fsync.
    #[arg(long, value_parser = parse_durability)]
    durability: Option<Durability>,
    /// Verify connection tokens as HS256 JWTs signed with the secret in
    /// FILE (sets auth.mode = "jwt"; repeat for key rotation).
    #[arg(long, value_name = "FILE")]
    auth_hs256_secret_file: Vec<PathBuf>,
    /// Verify connection tokens with the RSA, ECDSA or Ed25519 public key in
    /// FILE (PEM; sets auth.mode = "jwt"; repeat for key rotation).
    #[arg(long, value_name = "FILE")]
    auth_public_key_file: Vec<PathBuf>,
    /// Log lines as text (default) or JSON.
    #[arg(long, value_parser = parse_log_format)]
    log_format: Option<LogFormat>,
    /// Print the effective configuration as TOML and exit.
    #[arg(long)]
    print_config: bool,
    #[command(subcommand)]
    command: Option<Tool>,
}

/// One-off tools instead of running the broker.
#[derive(Debug, Subcommand)]
enum Tool {
    /// Writes two development CAs and, for nodes 1..=N, two certificates
    /// each: `ca.pem` signs `node-<id>.pem`/`.key`, the public device
    /// listener's (valid for the `--name`s, so one `volna --ca ca.pem`
    /// trusts every node); `cluster-ca.pem` signs `peer-<id>.pem`/`.key`,
    /// the peer link's (naming `node-<id>` only). The internet-facing key
    /// is then no cluster credential. For development and tests.
    DevClusterCerts {
        /// Directory to write into (created).
        #[arg(long)]
        out: PathBuf,
        /// Nodes to issue certificates for.
        #[arg(long, default_value_t = 3)]
        nodes: u64,
        /// Host names and IP addresses devices dial the nodes by.
        #[arg(long = "name", default_values = ["localhost", "127.0.0.1", "::1"])]
        names: Vec<String>,
    },
}

/// Writes the development cluster certificates (see [`Tool::DevClusterCerts`]).
fn dev_cluster_certs(out: &std::path::Path, nodes: u64, names: &[String]) -> anyhow::Result<()> {
    use volna_cluster::tls::{DevCa, IssuedCert};
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let write = |stem: String, issued: IssuedCert| -> anyhow::Result<()> {
        std::fs::write(out.join(format!("{stem}.pem")), issued.cert_pem)?;
        volna_broker::tls::write_private(
            &out.join(format!("{stem}.key")),
            issued.key_pem.as_bytes(),
        )?;
        Ok(())
    };
    // Two CAs: devices trust the public one, nodes only the cluster one,
    // so no certificate serves both roles.
    let public_ca = DevCa::generate()?;
    let cluster_ca = DevCa::generate()?;
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    std::fs::write(out.join("ca.pem"), public_ca.cert_pem())?;
    std::fs::write(out.join("cluster-ca.pem"), cluster_ca.cert_pem())?;
    for id in 1..=nodes {
        write(format!("node-{id}"), public_ca.issue_public(&names)?)?;
        write(format!("peer-{id}"), cluster_ca.issue_peer(id)?)?;
    }
    println!("{}", out.join("ca.pem").display());
    Ok(())
}

fn parse_log_format(s: &str) -> Result<LogFormat, String> {
    match s {
        "text" => Ok(LogFormat::Text),
        "json" => Ok(LogFormat::Json),
        other => Err(format!("{other:?} is not one of: text, json")),
    }
}

fn parse_durability(s: &str) -> Result<Durability, String> {
    match s {
        "wal" => Ok(Durability::Wal),
        "fsync" => Ok(Durability::Fsync),
        other => Err(format!("{other:?} is not one of: wal, fsync")),
    }
}

/// Runs the broker; an error is printed as one message with its causes,
/// never as a backtrace, and the exit status is 1.
fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("volna-broker: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

#[tokio::main]
async fn run() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Some(Tool::DevClusterCerts { out, nodes, names }) = &args.command {
        return dev_cluster_certs(out, *nodes, names);
    }
    let mut config = Config::load(args.config.as_deref())?;
    if let Some(dir) = args.data_dir {
        config.data_dir = dir;
    }
    if let Some(listen) = args.listen {
        config.listen = listen;
    }
    if let Some(http) = args.http {
        config.http = http;
    }
    if let Some(websocket) = args.websocket {
        config.websocket.enabled = true;
        config.websocket.listen = Some(websocket);
    }
    if args.websocket_plaintext {
        config.websocket.plaintext = true;
    }
    if let Some(durability) = args.durability {
        config.durability = durability;
    }
    if let Some(format) = args.log_format {
        config.log_format = format;
    }
    if !args.auth_hs256_secret_file.is_empty() {
        config.auth.mode = volna_broker::auth::AuthMode::Jwt;
        config.auth.hs256_secret_files = args.auth_hs256_secret_file;
    }
    if !args.auth_public_key_file.is_empty() {
        config.auth.mode = volna_broker::auth::AuthMode::Jwt;
        config.auth.public_key_files = args.auth_public_key_file;
    }
    config.validate()?;
    let filter = EnvFilter::try_from_env("VOLNA_LOG")
        .unwrap_or_else(|_| EnvFilter::new("info,openraft=warn"));
    match config.log_format {
        // Logs go to stderr, with the development banner and panics: one
        // stream for everything the broker says about itself. A log line
        // that cannot be written (stderr on a full disk) is dropped: by
        // default tracing would report it with `eprintln!`, which panics
        // when stderr is unwritable — and take the thread that logged down.
        LogFormat::Text => tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .log_internal_errors(false)
            .init(),
        LogFormat::Json => tracing_subscriber::fmt()
            .json()
            .with_current_span(true)
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .log_internal_errors(false)
            .init(),
    }
    if args.print_config {
        let mut shown = config.clone();
        if shown.admin.token.is_some() {
            shown.admin.token = Some("<redacted>".into());
        }
        let text = toml::to_string_pretty(&shown).context("serializing the configuration")?;
        print!("{text}");
        return Ok(());
    }

    let broker = Broker::start(config).await.context("starting the broker")?;
    if let Some(cert) = broker.dev_cert() {
        let pin = volna_broker::tls::fingerprint_hex(cert)?;
        eprintln!(
            "volna-broker: DEVELOPMENT MODE with a self-signed certificate.\n  \
             clients on this machine: volna --ca {}\n  \
             clients elsewhere:       volna --pin {pin}",
            cert.display()
        );
    }
    serve_until_stopped(&broker).await?;
    broker.shutdown().await;
    Ok(())
}

/// Runs until SIGINT or SIGTERM; SIGHUP reloads the TLS certificate.
async fn serve_until_stopped(broker: &Broker) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut hup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
    loop {
        tokio::select! {
            r = tokio::signal::ctrl_c() => return r.context("waiting for SIGINT"),
            _ = term.recv() => return Ok(()),
            _ = hup.recv() => {
                if let Err(e) = broker.reload_certificate() {
                    tracing::error!(error = %e, "SIGHUP: the TLS certificate was not reloaded; the previous one stays in force");
                }
            }
        }
    }
}
