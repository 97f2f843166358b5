//! A UDP proxy that misbehaves on purpose: it sits between QUIC clients and
//! the broker and drops, duplicates, reorders and delays datagrams, can
//! black-hole everything for a while (a partition), and can move every
//! client to a new source port (what a phone changing networks looks like to
//! the broker).
//!
//! Faults are drawn from a seeded RNG, so a failing run can be replayed
//! with its seed. Everything is bounded: delayed datagrams in flight are
//! capped, and the proxy only ever talks to the loopback addresses it was
//! given.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::net::UdpSocket;
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;

/// Delayed datagrams in flight at once; beyond it, delayed ones are dropped.
const MAX_DELAYED: usize = 4096;

/// What the proxy does to each datagram, both directions.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Faults {
    /// Probability of dropping a datagram.
    pub drop: f64,
    /// Probability of sending a datagram twice.
    pub duplicate: f64,
    /// Probability of holding a datagram back behind the next one.
    pub reorder: f64,
    /// Extra delay for every datagram: uniformly up to this.
    pub max_delay: Duration,
}

/// Counters of what the proxy did.
#[derive(Debug, Default)]
pub struct ProxyStats {
    /// Datagrams forwarded.
    pub forwarded: AtomicU64,
    /// Datagrams dropped (faults or black hole).
    pub dropped: AtomicU64,
    /// Datagrams sent twice.
    pub duplicated: AtomicU64,
}

struct Shared {
    faults: Mutex<Faults>,
    blackhole: AtomicBool,
    rng: Mutex<StdRng>,
    stats: ProxyStats,
    delayed: Arc<Semaphore>,
    /// Bumped by `rebind`: sessions with an older generation get a new
    /// upstream socket (a new source port) for their next datagram.
    generation: AtomicU64,
}

/// A running proxy; dropping it stops it.
pub struct ChaosProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    task: JoinHandle<()>,
    seed: u64,
}

impl std::fmt::Debug for ChaosProxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChaosProxy")
            .field("addr", &self.addr)
            .field("seed", &self.seed)
            .finish_non_exhaustive()
    }
}

impl ChaosProxy {
    /// Starts a proxy on a free loopback port forwarding to `upstream`.
    pub async fn start(upstream: SocketAddr, seed: u64) -> std::io::Result<Self> {
        let listener = Arc::new(UdpSocket::bind("127.0.0.1:0").await?);
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            faults: Mutex::new(Faults::default()),
            blackhole: AtomicBool::new(false),
            rng: Mutex::new(StdRng::seed_from_u64(seed)),
            stats: ProxyStats::default(),
            delayed: Arc::new(Semaphore::new(MAX_DELAYED)),
            generation: AtomicU64::new(0),
        });
        let task = tokio::spawn(run(listener, upstream, shared.clone()));
        Ok(Self {
            addr,
            shared,
            task,
            seed,
        })
    }

    /// Where clients should connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The seed that replays this run's faults.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// Replaces the faults applied from now on.
    pub fn set_faults(&self, faults: Faults) {
        *self.shared.faults.lock().unwrap_or_else(|e| e.into_inner()) = faults;
    }

    /// Drops everything, both ways, while `on`.
    pub fn blackhole(&self, on: bool) {
        self.shared.blackhole.store(on, Ordering::SeqCst);
    }

    /// Moves every client to a new source port towards the broker.
    pub fn rebind(&self) {
        self.shared.generation.fetch_add(1, Ordering::SeqCst);
    }

    /// What the proxy did so far.
    pub fn stats(&self) -> &ProxyStats {
        &self.shared.stats
    }
}

impl Drop for ChaosProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// One client's path: its upstream socket and the task relaying replies.
struct Path {
    upstream: Arc<UdpSocket>,
    generation: u64,
    replies: JoinHandle<()>,
}

impl Drop for Path {
    fn drop(&mut self) {
        self.replies.abort();
    }
}

async fn run(listener: Arc<UdpSocket>, upstream: SocketAddr, shared: Arc<Shared>) {
    let mut paths: HashMap<SocketAddr, Path> = HashMap::new();
    let mut buf = vec![0u8; 65_536];
    loop {
        let Ok((len, client)) = listener.recv_from(&mut buf).await else {
            return;
        };
        let generation = shared.generation.load(Ordering::SeqCst);
        let stale = paths
            .get(&client)
            .is_none_or(|p| p.generation != generation);
        if stale {
            let Ok(socket) = UdpSocket::bind("127.0.0.1:0").await else {
                continue;
            };
            if socket.connect(upstream).await.is_err() {
                continue;
            }
            let socket = Arc::new(socket);
            let replies = tokio::spawn(relay_replies(
                socket.clone(),
                listener.clone(),
                client,
                shared.clone(),
            ));
            paths.insert(
                client,
                Path {
                    upstream: socket,
                    generation,
                    replies,
                },
            );
        }
        let Some(path) = paths.get(&client) else {
            continue;
        };
        let socket = path.upstream.clone();
        let datagram = buf[..len].to_vec();
        forward(&shared, datagram, move |d| {
            let socket = socket.clone();
            async move {
                let _ = socket.send(&d).await;
            }
        })
        .await;
    }
}

async fn relay_replies(
    upstream: Arc<UdpSocket>,
    listener: Arc<UdpSocket>,
    client: SocketAddr,
    shared: Arc<Shared>,
) {
    let mut buf = vec![0u8; 65_536];
    while let Ok(len) = upstream.recv(&mut buf).await {
        let listener = listener.clone();
        forward(&shared, buf[..len].to_vec(), move |d| {
            let listener = listener.clone();
            async move {
                let _ = listener.send_to(&d, client).await;
            }
        })
        .await;
    }
}

/// Applies the faults to one datagram and sends what survives.
async fn forward<F, Fut>(shared: &Arc<Shared>, datagram: Vec<u8>, send: F)
where
    F: Fn(Vec<u8>) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    if shared.blackhole.load(Ordering::SeqCst) {
        shared.stats.dropped.fetch_add(1, Ordering::Relaxed);
        return;
    }
    let faults = *shared.faults.lock().unwrap_or_else(|e| e.into_inner());
    let (dropped, copies, delay) = {
        let mut rng = shared.rng.lock().unwrap_or_else(|e| e.into_inner());
        let dropped = rng.random_bool(faults.drop.clamp(0.0, 1.0));
        let copies = if rng.random_bool(faults.duplicate.clamp(0.0, 1.0)) {
            2
        } else {
            1
        };
        let reorder = rng.random_bool(faults.reorder.clamp(0.0, 1.0));
        let jitter = if faults.max_delay.is_zero() {
            Duration::ZERO
        } else {
            faults.max_delay.mul_f64(rng.random::<f64>())
        };
        // A reordered datagram is held back long enough for later ones to
        // overtake it.
        let delay = if reorder {
            jitter + Duration::from_millis(2)
        } else {
            jitter
        };
        (dropped, copies, delay)
    };
    if dropped {
        shared.stats.dropped.fetch_add(1, Ordering::Relaxed);
        return;
    }
    if copies == 2 {
        shared.stats.duplicated.fetch_add(1, Ordering::Relaxed);
    }
    shared.stats.forwarded.fetch_add(1, Ordering::Relaxed);
    if delay.is_zero() {
        for _ in 0..copies {
            send(datagram.clone()).await;
        }
        return;
    }
    let Ok(permit) = shared.delayed.clone().try_acquire_owned() else {
        shared.stats.dropped.fetch_add(1, Ordering::Relaxed);
        return;
    };
    tokio::spawn(async move {
        tokio::time::sleep(delay).await;
        for _ in 0..copies {
            send(datagram.clone()).await;
        }
        drop(permit);
    });
}
