//! Fault injection against the real `volna-broker` binary.
//!
//! [`BrokerProcess`] runs the broker as a separate process on a data
//! directory that outlives it, so a test can `kill -9` it and start it
//! again; [`History`] records what clients were told and checks it against
//! what a subscriber later reads (every acknowledged publish present once,
//! at its acknowledged offset, offsets gapless).

use std::collections::BTreeMap;
use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use thiserror::Error;
use volna_client::{Backoff, Client, ClientConfig, Trust};

pub mod cluster;
pub mod disk;
pub mod netfault;
pub mod proxy;

/// Why the broker process could not be run.
#[derive(Debug, Error)]
pub enum ChaosError {
    /// The broker binary was not found and could not be built.
    #[error("cannot find or build the volna-broker binary: {0}")]
    Binary(String),
    /// Starting or signalling the process failed.
    #[error("broker process: {0}")]
    Process(#[from] std::io::Error),
    /// The broker did not become reachable in time.
    #[error("the broker did not start within {0:?}")]
    StartTimeout(Duration),
}

/// A test's size knob: the environment variable `name` parsed, else
/// `default` (unset or unparsable).
pub fn knob<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The `volna-broker` binary: `VOLNA_BROKER_BIN`, else next to this test's
/// executable in the target directory (built there by the workspace's test
/// run), else built now with cargo.
pub fn broker_binary() -> Result<PathBuf, ChaosError> {
    if let Ok(path) = std::env::var("VOLNA_BROKER_BIN") {
        return Ok(PathBuf::from(path));
    }
    let exe = std::env::current_exe()?;
    // target/<profile>/deps/<test> → target/<profile>/volna-broker
    let candidate = exe
        .parent()
        .and_then(Path::parent)
        .map(|dir| dir.join("volna-broker"))
        .ok_or_else(|| ChaosError::Binary("no target directory".into()))?;
    if !candidate.exists() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo)
            .args(["build", "-p", "volna-broker", "--bin", "volna-broker"])
            .status()?;
        if !status.success() || !candidate.exists() {
            return Err(ChaosError::Binary(format!(
                "{} after cargo build",
                candidate.display()
            )));
        }
    }
    Ok(candidate)
}

/// The `volna` CLI binary: `VOLNA_CLI_BIN`, else next to this test's
/// executable in the target directory (the workspace's build puts it
/// there).
pub fn cli_binary() -> Result<PathBuf, ChaosError> {
    if let Ok(path) = std::env::var("VOLNA_CLI_BIN") {
        return Ok(PathBuf::from(path));
    }
    let exe = std::env::current_exe()?;
    let candidate = exe
        .parent()
        .and_then(Path::parent)
        .map(|dir| dir.join("volna"))
        .ok_or_else(|| ChaosError::Binary("no target directory".into()))?;
    if candidate.exists() {
        Ok(candidate)
    } else {
        Err(ChaosError::Binary(format!(
            "{} (build the workspace first)",
            candidate.display()
        )))
    }
}

/// A transport a port is asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// A TCP listener's port.
    Tcp,
    /// A UDP socket's port.
    Udp,
}

/// The lowest and highest port [`free_port`] hands out: below Linux's
/// ephemeral range (32768–60999), from which outgoing connections take
/// their local ports.
const PORTS: std::ops::Range<u16> = 20_000..32_000;

/// A loopback port free right now for `protocol`, for a process the harness
/// starts (and restarts on the same port). Not from the ephemeral range:
/// there an outgoing connection of any test may take the port while its
/// owner is down (a client retrying a dead listener can even connect to
/// itself from that very port), and the restart fails to bind.
pub fn free_port(protocol: Protocol) -> Result<u16, ChaosError> {
    use rand::Rng;
    let mut rng = rand::rng();
    for _ in 0..1000 {
        let port = rng.random_range(PORTS);
        let free = match protocol {
            Protocol::Tcp => std::net::TcpListener::bind(("127.0.0.1", port)).is_ok(),
            Protocol::Udp => UdpSocket::bind(("127.0.0.1", port)).is_ok(),
        };
        if free {
            return Ok(port);
        }
    }
    Err(ChaosError::Process(std::io::Error::new(
        std::io::ErrorKind::AddrInUse,
        "no free loopback port below the ephemeral range",
    )))
}

/// A broker running as a child process.
#[derive(Debug)]
pub struct BrokerProcess {
    child: Option<Child>,
    data_dir: PathBuf,
    addr: SocketAddr,
    http: SocketAddr,
    /// The WebSocket listener: a free TCP port of its own (by default it
    /// would take the QUIC port's number over TCP, which is only known to
    /// be free for UDP).
    websocket: SocketAddr,
    durability: &'static str,
    env: Vec<(String, String)>,
}

impl BrokerProcess {
    /// Starts a broker on `data_dir`, on a free loopback port.
    pub fn start(data_dir: &Path, durability: &'static str) -> Result<Self, ChaosError> {
        Self::start_with(data_dir, durability, &[])
    }

    /// Starts a broker with extra `VOLNA_*` settings in its environment.
    pub fn start_with(
        data_dir: &Path,
        durability: &'static str,
        env: &[(&str, &str)],
    ) -> Result<Self, ChaosError> {
        let port = free_port(Protocol::Udp)?;
        let http = SocketAddr::from(([127, 0, 0, 1], free_port(Protocol::Tcp)?));
        let websocket = SocketAddr::from(([127, 0, 0, 1], free_port(Protocol::Tcp)?));
        let mut broker = Self {
            child: None,
            data_dir: data_dir.to_owned(),
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            http,
            websocket,
            durability,
            env: env
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        };
        broker.spawn()?;
        Ok(broker)
    }

    fn spawn(&mut self) -> Result<(), ChaosError> {
        let child = Command::new(broker_binary()?)
            .arg("--data-dir")
            .arg(&self.data_dir)
            .arg("--listen")
            .arg(self.addr.to_string())
            .arg("--http")
            .arg(self.http.to_string())
            .arg("--websocket")
            .arg(self.websocket.to_string())
            .arg("--durability")
            .arg(self.durability)
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .env(
                "VOLNA_LOG",
                std::env::var("VOLNA_CHAOS_BROKER_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdout(Stdio::null())
            .stderr(self.log_file()?)
            .spawn()?;
        self.child = Some(child);
        Ok(())
    }

    /// The broker's WebSocket URL (`wss://127.0.0.1:PORT/ws`).
    pub fn websocket_url(&self) -> String {
        format!("wss://{}/ws", self.websocket)
    }

    /// Where every incarnation's stderr goes (appended).
    pub fn log_path(&self) -> PathBuf {
        self.data_dir.join("broker.log")
    }

    fn log_file(&self) -> Result<std::fs::File, ChaosError> {
        Ok(std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())?)
    }

    /// Fails if any incarnation of the broker panicked.
    pub fn assert_never_panicked(&self) {
        let log = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        if let Some(at) = log.find("panicked at") {
            let end = (at + 400).min(log.len());
            panic!("the broker panicked: {}", &log[at..end]);
        }
    }

    /// The QUIC address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The value of one metric from the broker's `/metrics`, if it is up.
    pub async fn metric(&self, name: &str) -> Option<f64> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut tcp = tokio::net::TcpStream::connect(self.http).await.ok()?;
        tcp.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            .await
            .ok()?;
        let mut text = String::new();
        tcp.read_to_string(&mut text).await.ok()?;
        let prefix = format!("{name} ");
        text.lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .and_then(|v| v.trim().parse().ok())
    }

    /// Waits until `/readyz` answers 200 (log open, QUIC listening);
    /// returns how long that took.
    pub async fn wait_ready(&self, within: Duration) -> Result<Duration, ChaosError> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let started = Instant::now();
        loop {
            if let Ok(mut tcp) = tokio::net::TcpStream::connect(self.http).await {
                let request =
                    b"GET /readyz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n";
                let mut reply = String::new();
                if tcp.write_all(request).await.is_ok()
                    && tcp.read_to_string(&mut reply).await.is_ok()
                    && reply.starts_with("HTTP/1.1 200")
                {
                    return Ok(started.elapsed());
                }
            }
            if started.elapsed() > within {
                return Err(ChaosError::StartTimeout(within));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// The broker's resident set size, read from `/proc` (works while the
    /// broker is too busy to answer HTTP).
    pub fn rss_bytes(&self) -> Option<u64> {
        let pid = self.child.as_ref()?.id();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let kib: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))?
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .ok()?;
        Some(kib * 1024)
    }

    /// A client configuration for this broker (fast reconnects).
    pub fn client_config(&self) -> ClientConfig {
        self.client_config_via(self.addr)
    }

    /// A client configuration that reaches this broker through `addr` (a
    /// proxy), still verifying the broker's certificate.
    pub fn client_config_via(&self, addr: SocketAddr) -> ClientConfig {
        fast_reconnects(
            ClientConfig::new(
                addr.to_string(),
                "chaos",
                Trust::CaFile(self.data_dir.join("dev-cert.pem")),
            ),
            Duration::from_secs(60),
        )
    }

    /// Connects a client, retrying while the broker starts.
    pub async fn client(&self, within: Duration) -> Result<Client, ChaosError> {
        let deadline = Instant::now() + within;
        loop {
            if self.data_dir.join("dev-cert.pem").exists()
                && let Ok(client) = Client::connect(self.client_config()).await
            {
                return Ok(client);
            }
            if Instant::now() > deadline {
                return Err(ChaosError::StartTimeout(within));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// `kill -9`: no flush, no goodbye.
    pub fn kill(&mut self) -> Result<(), ChaosError> {
        if let Some(mut child) = self.child.take() {
            child.kill()?;
            child.wait()?;
        }
        Ok(())
    }

    /// SIGTERM, then waits for the process to exit; returns whether it
    /// exited successfully within `within`.
    pub fn terminate(&mut self, within: Duration) -> Result<bool, ChaosError> {
        let Some(mut child) = self.child.take() else {
            return Ok(false);
        };
        send_signal(&child, "TERM")?;
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = child.try_wait()? {
                return Ok(status.success());
            }
            if Instant::now() > deadline {
                child.kill()?;
                child.wait()?;
                return Ok(false);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Sends `signal` (`HUP`, `TERM`…) to the running broker.
    pub fn signal(&self, signal: &str) -> Result<(), ChaosError> {
        match &self.child {
            Some(child) => send_signal(child, signal),
            None => Ok(()),
        }
    }

    /// The HTTP address (health, metrics).
    pub fn http_addr(&self) -> SocketAddr {
        self.http
    }

    /// The broker's data directory.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// Whether the process was started and not killed or stopped since.
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Starts the broker again (after [`kill`](Self::kill) or
    /// [`terminate`](Self::terminate), or killing it now) on the same
    /// directory and port.
    pub fn start_again(&mut self) -> Result<(), ChaosError> {
        self.kill()?;
        self.spawn()
    }

    /// Starts the broker again on the same directory and port.
    pub fn restart(&mut self) -> Result<(), ChaosError> {
        self.kill()?;
        self.spawn()
    }
}

/// A chaos client's settings: reconnects within 20–300 ms, requests
/// retried for `request_timeout`, the development certificates' name.
pub fn fast_reconnects(mut config: ClientConfig, request_timeout: Duration) -> ClientConfig {
    config.backoff = Backoff {
        initial: Duration::from_millis(20),
        max: Duration::from_millis(300),
    };
    config.request_timeout = request_timeout;
    config.server_name = Some("localhost".into());
    config
}

fn send_signal(child: &Child, signal: &str) -> Result<(), ChaosError> {
    Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(child.id().to_string())
        .status()?;
    Ok(())
}

impl Drop for BrokerProcess {
    fn drop(&mut self) {
        let _ = self.kill();
    }
}

/// Reads `sub` until it has delivered offset `last`, failing the test on an
/// event (`Truncated`, `EpochChanged`), a closed stream or after `within`.
/// Returns `(offset, payload)` in delivery order, for [`History::check`].
pub async fn read_through(
    sub: &mut volna_client::Subscription,
    last: u64,
    within: Duration,
) -> Vec<(u64, Vec<u8>)> {
    let mut got: Vec<(u64, Vec<u8>)> = Vec::new();
    let read = async {
        while got.last().is_none_or(|(o, _)| *o < last) {
            match sub.recv().await {
                Some(Ok(m)) => got.push((m.offset.get(), m.payload.to_vec())),
                Some(Err(e)) => panic!("unexpected subscription event: {e}"),
                None => panic!("the subscription ended"),
            }
        }
    };
    if tokio::time::timeout(within, read).await.is_err() {
        panic!("offset {last} not delivered within {within:?}");
    }
    got
}

/// Whether the suite must be strict: `CI` is set (to anything but empty,
/// `0` or `false`). `scripts/test.sh`, which CI runs, sets `CI=true`
/// unless it was set already.
pub fn strict() -> bool {
    std::env::var("CI").is_ok_and(|v| !matches!(v.trim(), "" | "0" | "false"))
}

/// A test's dependency on this machine (Chromium, Node, a tmpfs mount) is
/// missing. Under [`strict`] that fails the test: a suite that passes
/// because its browser tests never ran proves nothing. Elsewhere (a
/// developer's bare `cargo nextest run`) the test says SKIPPED, loudly,
/// and the caller returns: nextest shows these tests' output on success
/// (`.config/nextest.toml`).
pub fn missing_dependency(why: &str) {
    assert!(
        !strict(),
        "{why} (CI is set: a missing test dependency fails the test; unset CI to skip)"
    );
    eprintln!("SKIPPED: {why}");
    eprintln!("SKIPPED: this test did not run; under CI=true (scripts/test.sh) it fails instead");
}

/// Fails the test if `client` dropped any delivery as already seen. The
/// client drops offsets below a subscription's position without a word, so
/// a broker that sent a message twice would pass [`History::check`]; where
/// no reconnect happened a correct broker sends none. (Across a reconnect
/// a few in flight on the old stream may be dropped; the history check is
/// what holds there.)
pub fn assert_no_duplicates(client: &Client) {
    assert_eq!(
        client.duplicates_dropped(),
        0,
        "deliveries dropped by the client as already seen: the broker sent them twice"
    );
}

/// What clients were told, checked against what the log delivers.
#[derive(Debug, Default)]
pub struct History {
    /// Acknowledged publishes: offset → payload.
    pub acked: BTreeMap<u64, Vec<u8>>,
    /// Publishes whose outcome is unknown (the call failed).
    pub unknown: Vec<Vec<u8>>,
}

/// A violation found by [`History::check`].
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum Violation {
    /// Offsets did not grow by one.
    #[error("gap or reorder: offset {got} follows {previous}")]
    NotConsecutive {
        /// The offset before.
        previous: u64,
        /// The offset that followed it.
        got: u64,
    },
    /// An acknowledged publish is not in the log at its offset.
    #[error("acknowledged offset {offset} is missing or holds other data")]
    LostAck {
        /// The offset.
        offset: u64,
    },
    /// A payload appears more than once.
    #[error("payload at offset {offset} was stored more than once")]
    Duplicate {
        /// The second offset.
        offset: u64,
    },
    /// A payload nobody published (neither acknowledged nor attempted)
    /// appears in the log.
    #[error("offset {offset} holds a payload that was never published")]
    NeverPublished {
        /// The offset.
        offset: u64,
    },
}

impl History {
    /// Checks `delivered` (offset, payload), read from offset 1 after the
    /// faults, against the history.
    pub fn check(&self, delivered: &[(u64, Vec<u8>)]) -> Result<(), Violation> {
        let published: std::collections::HashSet<&[u8]> = self
            .acked
            .values()
            .chain(&self.unknown)
            .map(Vec::as_slice)
            .collect();
        let mut seen = std::collections::HashSet::new();
        let mut previous = 0;
        let mut by_offset = BTreeMap::new();
        for (offset, payload) in delivered {
            if *offset != previous + 1 {
                return Err(Violation::NotConsecutive {
                    previous,
                    got: *offset,
                });
            }
            if !seen.insert(payload.clone()) {
                return Err(Violation::Duplicate { offset: *offset });
            }
            if !published.contains(payload.as_slice()) {
                return Err(Violation::NeverPublished { offset: *offset });
            }
            previous = *offset;
            by_offset.insert(*offset, payload);
        }
        for (offset, payload) in &self.acked {
            if by_offset.get(offset) != Some(&payload) {
                return Err(Violation::LostAck { offset: *offset });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_checker_finds_each_kind_of_violation() {
        let mut h = History::default();
        h.acked.insert(1, b"a".to_vec());
        h.acked.insert(2, b"b".to_vec());
        // "c" was sent and its answer lost: stored or not, it may appear.
        h.unknown.push(b"c".to_vec());
        let ok = [(1, b"a".to_vec()), (2, b"b".to_vec()), (3, b"c".to_vec())];
        assert_eq!(h.check(&ok), Ok(()));
        assert_eq!(
            h.check(&[(1, b"a".to_vec()), (2, b"b".to_vec()), (3, b"z".to_vec())]),
            Err(Violation::NeverPublished { offset: 3 })
        );
        assert_eq!(
            h.check(&[(1, b"a".to_vec()), (3, b"b".to_vec())]),
            Err(Violation::NotConsecutive {
                previous: 1,
                got: 3
            })
        );
        assert_eq!(
            h.check(&[(1, b"a".to_vec())]),
            Err(Violation::LostAck { offset: 2 })
        );
        assert_eq!(
            h.check(&[(1, b"a".to_vec()), (2, b"b".to_vec()), (3, b"a".to_vec())]),
            Err(Violation::Duplicate { offset: 3 })
        );
    }
}
