//! The Volna broker: QUIC sessions in front of a durable, per-channel
//! RocksDB log, with a fan-out engine pushing every committed message to
//! every subscriber.
//!
//! ```text
//! client ──QUIC──▶ transport ──▶ session ──publish──▶ log writer (RocksDB, group commit)
//!                                   ▲                        │ committed batch
//!                                   │ frames                 ▼
//!                      subscription loops ◀─────── fan-out engine (channel → ring of frames)
//! ```
//!
//! The folders are the layers (DESIGN.md §3), each `mod.rs` saying what it
//! owns; every module is also reachable from the crate root by its own
//! name (`volna_broker::log`, `volna_broker::session`, …):
//! - [`engine`]: the path of a message without a network — [`store`],
//!   [`log`], [`channels`], [`producers`], [`fanout`], [`subscription`],
//!   [`retention`];
//! - [`net`]: [`transport`] (the shards over `quinn-proto`, the only
//!   module that knows QUIC), [`websocket`] (the same protocol over one
//!   WebSocket) and [`session`] (one connection's protocol);
//! - [`security`]: [`auth`], [`tls`], [`limits`];
//! - [`devices`]: each device's durable cursors, each user's read markers
//!   and unread counts, the registry of a user's devices, and the
//!   [`push`] hook that wakes offline ones;
//! - [`ops`]: [`http`], [`admin`], [`metrics`];
//! - [`cluster`]: the broker as a node of a cluster (DESIGN.md §7, with
//!   `[cluster]` configured): its partitions' openraft groups apply
//!   committed entries through the same log writer, and appends route to
//!   their partition's leader. Without `[cluster]` nothing of it runs;
//! - [`config`], [`server`] (start-up and orderly shutdown of all of the
//!   above), [`fuzzing`] (a whole session over arbitrary bytes).
//!
//! Feature `rocksdb` (default): the durable store and the [`Broker`] server
//! built on it. Without it — for the fuzz targets, which would otherwise
//! compile RocksDB's C++ once more with their instrumentation — the sans-IO
//! core and the in-memory store remain.

#[cfg(feature = "rocksdb")]
pub mod cluster;
pub mod config;
pub mod devices;
pub mod engine;
pub mod fuzzing;
pub mod net;
pub mod ops;
pub mod security;
#[cfg(feature = "rocksdb")]
pub mod server;

// Each part keeps its path from the crate root (`volna_broker::log`, …):
// the folders show the layers, the paths stay what callers know.
pub use devices::push;
pub(crate) use engine::queue;
pub use engine::{channels, fanout, log, producers, retention, store, subscription};
pub use net::{session, transport, websocket};
pub use ops::{admin, http, metrics};
pub use security::{auth, limits, tls};

pub use config::Config;
#[cfg(feature = "rocksdb")]
pub use server::{Broker, StartError};
