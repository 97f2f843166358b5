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
//! Module map, each owning one part of DESIGN.md §3:
//! - [`store`]: the `LogStore` trait, its RocksDB and in-memory
//!   implementations and their byte layouts;
//! - [`log`]: offset assignment and group commit on the writer thread,
//!   catch-up reads on reader threads;
//! - [`channels`], [`producers`]: the writer's resident channel metadata
//!   and idempotent-publish windows (the rest stays on disk until used);
//! - [`fanout`]: per-channel rings of encoded batches, shared by subscribers;
//! - [`subscription`]: one subscription's offset-driven delivery loop;
//! - [`session`]: one connection's request/reply protocol and limits;
//! - [`transport`]: the quinn endpoint, the only module that knows QUIC;
//! - [`auth`], [`limits`]: who a connection is, and what it may do how often;
//! - [`devices`]: each device's durable cursors, each user's read markers
//!   and unread counts, the registry of a user's devices;
//! - [`push`]: commit notices posted to the application's push service;
//! - [`retention`], [`http`], [`admin`], [`metrics`], [`tls`], [`config`]:
//!   the rest of a server;
//! - [`fuzzing`]: a whole session over arbitrary bytes, for the fuzzers;
//! - [`cluster`]: the broker as a node of a cluster (DESIGN.md §7, with
//!   `[cluster]` configured): its partitions' openraft groups apply
//!   committed entries through the same log writer, and appends route to
//!   their partition's leader. Without `[cluster]` nothing of it runs;
//! - [`server`]: start-up and orderly shutdown of all of the above.
//!
//! Feature `rocksdb` (default): the durable store and the [`Broker`] server
//! built on it. Without it — for the fuzz targets, which would otherwise
//! compile RocksDB's C++ once more with their instrumentation — the sans-IO
//! core and the in-memory store remain.

pub mod admin;
pub mod auth;
pub mod channels;
#[cfg(feature = "rocksdb")]
pub mod cluster;
pub mod config;
pub mod devices;
pub mod fanout;
pub mod fuzzing;
pub mod http;
pub mod limits;
pub mod log;
pub mod metrics;
pub mod producers;
pub mod push;
mod queue;
pub mod retention;
#[cfg(feature = "rocksdb")]
pub mod server;
pub mod session;
pub mod store;
pub mod subscription;
pub mod tls;
pub mod transport;

pub use config::Config;
#[cfg(feature = "rocksdb")]
pub use server::{Broker, StartError};
