//! The shard engine: `quinn-proto` driven directly, one loop per core.
//!
//! Each shard owns a UDP socket, a `quinn_proto::Endpoint`, the state of
//! its connections (in one table) and their timers, and runs one loop:
//! receive a batch of datagrams (GRO where the kernel has it), feed them to
//! the endpoint and connections, run the timers that are due, and flush
//! every connection that has something to send (GSO batches). There is no
//! task, channel or transmit buffer per connection; a session reaches its
//! connection's streams through the shard's table (`streams`).
//!
//! # Which shard gets a packet
//!
//! The shards' sockets share the listen address with `SO_REUSEPORT`: the
//! kernel hashes each flow's addresses onto one socket, so a handshake and
//! the connection it creates stay on the shard that saw its first Initial,
//! with no user-space hop. Connection IDs the broker issues start with the
//! index of the shard that owns the connection (`ShardCid`). When a
//! client's address changes (NAT rebinding, a phone moving from Wi-Fi to
//! mobile data), the kernel may hand its packets to another shard; that
//! shard reads the owner from the ID and passes the datagram over, so QUIC
//! migration keeps working. Only short-header packets are routed this way:
//! long-header (handshake) packets carry IDs the client chose, and stay
//! where the kernel put them.
//!
//! The IDs are also signed with a key derived from the persisted
//! stateless-reset key: after a crash the restarted broker recognises its
//! previous IDs and answers with stateless resets.

mod driver;
mod streams;

use std::net::SocketAddr;
use std::sync::Arc;

use quinn_proto::{ConnectionId, ConnectionIdGenerator, InvalidCid};
use tokio_util::sync::CancellationToken;
use volna_proto::CloseCode;

use self::driver::{Forwarded, Shard, ShardIo};
use super::{QuicSettings, TransportError};
use crate::session::BrokerContext;

/// Datagrams one shard may have queued from the others (migrated
/// connections) before further ones are dropped, as a full socket would.
const FORWARD_QUEUE: usize = 1024;

/// The broker's endpoint as a set of shards.
#[derive(Debug)]
pub struct ShardedEndpoint {
    shards: Vec<Arc<Shard>>,
    /// Each shard's socket and queue until [`ShardedEndpoint::serve`]
    /// starts its loop.
    pending: Vec<ShardIo>,
    local_addr: SocketAddr,
    stop: CancellationToken,
    loops: Vec<tokio::task::JoinHandle<()>>,
}

impl ShardedEndpoint {
    /// Binds `shards` sockets (0: one per core) to `addr` (the first one
    /// picks the port when `addr` has none), asking for `buffer_bytes` of
    /// receive and send buffer per socket.
    ///
    /// Every connection of a socket shares it, so a message to thousands
    /// of subscribers comes back as thousands of ACKs at once; the
    /// kernel's default ~200 KiB drops them (seen: 18,000 drops in one
    /// fan-out run to 1,000 subscribers), and each drop costs a
    /// retransmission. The kernel caps the request at `net.core.rmem_max`
    /// / `wmem_max`: a grant below the request is logged.
    pub fn bind(
        shards: usize,
        addr: SocketAddr,
        buffer_bytes: usize,
        settings: QuicSettings,
    ) -> Result<Self, TransportError> {
        let shards = match shards {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        }
        .min(super::MAX_SHARDS);
        let QuicSettings {
            endpoint,
            server,
            cid_key,
        } = settings;
        let server = Arc::new(server);
        let mut local_addr = addr;
        let (mut senders, mut receivers) = (Vec::new(), Vec::new());
        for _ in 0..shards {
            let (tx, rx) = tokio::sync::mpsc::channel::<Forwarded>(FORWARD_QUEUE);
            senders.push(tx);
            receivers.push(rx);
        }
        let mut built = Vec::with_capacity(shards);
        let mut pending = Vec::with_capacity(shards);
        for (index, forwarded) in receivers.into_iter().enumerate() {
            let socket = super::udp_socket(local_addr, buffer_bytes)
                .map_err(|source| TransportError::Bind { addr, source })?;
            local_addr = socket
                .local_addr()
                .map_err(|source| TransportError::Bind { addr, source })?;
            let mut config = endpoint.clone();
            let shard_byte = u8::try_from(index).unwrap_or(u8::MAX);
            config.cid_generator(move || Box::new(ShardCid::new(shard_byte, cid_key)));
            let shard = Arc::new(Shard::new(index, Arc::new(config), server.clone()));
            let io = ShardIo::new(socket, senders.clone(), forwarded)
                .map_err(|source| TransportError::Bind { addr, source })?;
            built.push(shard);
            pending.push(io);
        }
        Ok(Self {
            shards: built,
            pending,
            local_addr,
            stop: CancellationToken::new(),
            loops: Vec::new(),
        })
    }

    /// How many shards serve the address.
    pub fn shard_count(&self) -> usize {
        self.shards.len()
    }

    /// The address the shards listen on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Starts each shard's loop; the returned task ends when they all do.
    pub fn serve(&mut self, ctx: Arc<BrokerContext>) -> tokio::task::JoinHandle<()> {
        for (shard, io) in self.shards.iter().zip(self.pending.drain(..)) {
            self.loops.push(tokio::spawn(driver::run(
                shard.clone(),
                io,
                ctx.clone(),
                self.stop.clone(),
            )));
        }
        let stop = self.stop.clone();
        tokio::spawn(async move { stop.cancelled().await })
    }

    /// Waits until no shard holds a connection.
    pub async fn wait_idle(&self) {
        for shard in &self.shards {
            shard.wait_idle().await;
        }
    }

    /// Closes every connection with `code` and refuses new ones.
    pub fn close(&self, code: CloseCode) {
        for shard in &self.shards {
            shard.close_all(code);
        }
    }
}

impl Drop for ShardedEndpoint {
    /// The loops end with the endpoint; their sockets close with them.
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Length of the connection IDs the broker issues: the owning shard, a
/// nonce, and a keyed signature.
///
/// The nonce must not collide among the IDs a shard holds: quinn-proto
/// checks the IDs it issues to a connection against its table, but not the
/// one it puts in a Retry, and a client that answers a Retry addresses its
/// next Initial to that ID. With a 24-bit nonce, one Retry in a few
/// thousand drew the ID of a live connection during a reconnect storm; the
/// client's Initial then went to that connection and was dropped there,
/// again at every retransmission, until the client gave up. 56 bits make
/// that a one-in-10^8 event at a million IDs held.
const CID_LEN: usize = 12;
const NONCE_LEN: usize = 7;
/// Enough to tell the broker's own IDs from random ones (a forged ID only
/// earns a rate-limited stateless reset).
const SIGNATURE_LEN: usize = CID_LEN - 1 - NONCE_LEN;

/// Issues connection IDs `[shard][nonce][signature]` and recognises the
/// broker's own (for stateless resets) by their signature.
#[derive(Debug)]
struct ShardCid {
    shard: u8,
    key: ring::hmac::Key,
}

impl ShardCid {
    fn new(shard: u8, cid_key: u64) -> Self {
        Self {
            shard,
            key: ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &cid_key.to_le_bytes()),
        }
    }

    fn signature(&self, prefix: &[u8]) -> [u8; SIGNATURE_LEN] {
        let tag = ring::hmac::sign(&self.key, prefix);
        let mut signature = [0; SIGNATURE_LEN];
        signature.copy_from_slice(&tag.as_ref()[..SIGNATURE_LEN]);
        signature
    }
}

impl ConnectionIdGenerator for ShardCid {
    fn generate_cid(&mut self) -> ConnectionId {
        let mut cid = [0u8; CID_LEN];
        cid[0] = self.shard;
        cid[1..1 + NONCE_LEN].copy_from_slice(&rand::random::<[u8; NONCE_LEN]>());
        let signature = self.signature(&cid[..1 + NONCE_LEN]);
        cid[1 + NONCE_LEN..].copy_from_slice(&signature);
        ConnectionId::new(&cid)
    }

    fn validate(&self, cid: &ConnectionId) -> Result<(), InvalidCid> {
        if cid.len() != CID_LEN {
            return Err(InvalidCid);
        }
        let expected = self.signature(&cid[..1 + NONCE_LEN]);
        // Not secret-dependent timing worth hiding: a forged ID only earns
        // a stateless reset, which is rate limited.
        if cid[1 + NONCE_LEN..] == expected {
            Ok(())
        } else {
            Err(InvalidCid)
        }
    }

    fn cid_len(&self) -> usize {
        CID_LEN
    }

    fn cid_lifetime(&self) -> Option<std::time::Duration> {
        None
    }
}

/// The shard that owns the connection a datagram is for, when it is a
/// short-header packet carrying one of the broker's connection IDs.
fn owning_shard(datagram: &[u8]) -> Option<usize> {
    let first = *datagram.first()?;
    // Long headers (bit 7 set) are handshake packets: their IDs may be the
    // client's, so the receiving shard keeps them.
    if first & 0x80 != 0 || datagram.len() < 1 + CID_LEN {
        return None;
    }
    Some(usize::from(datagram[1]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issued_ids_name_their_shard_and_validate_across_restarts() {
        let mut first = ShardCid::new(3, 42);
        let cid = first.generate_cid();
        assert_eq!(cid.len(), CID_LEN);
        assert_eq!(cid[0], 3);
        // Another shard (or the next incarnation, same key) recognises it.
        assert!(ShardCid::new(0, 42).validate(&cid).is_ok());
        assert!(ShardCid::new(0, 43).validate(&cid).is_err());
        let mut forged = cid.to_vec();
        forged[2] ^= 1;
        assert!(first.validate(&ConnectionId::new(&forged)).is_err());
    }

    #[test]
    fn a_million_issued_ids_never_collide() {
        // A Retry's ID is not checked against the live ones (see
        // `CID_LEN`): the nonce alone keeps it unique.
        let mut issuer = ShardCid::new(1, 7);
        let mut seen = std::collections::HashSet::new();
        for _ in 0..1_000_000 {
            let cid = issuer.generate_cid();
            assert!(seen.insert(cid), "an ID was issued twice: {cid:?}");
        }
    }

    #[test]
    fn only_short_headers_are_routed_by_their_id() {
        let mut short = vec![0x40u8];
        short.extend_from_slice(&[5, 1, 2, 3, 4, 5, 6, 7, 8]);
        short.extend_from_slice(&[0; 20]);
        assert_eq!(owning_shard(&short), Some(5));
        let mut long = short.clone();
        long[0] = 0xc0;
        assert_eq!(owning_shard(&long), None);
        assert_eq!(owning_shard(&short[..4]), None);
        assert_eq!(owning_shard(&[]), None);
    }
}
