//! The engine: what a message goes through between a publish and its
//! subscribers, with no network in sight.
//!
//! ```text
//!  append ──▶ log (sequencer, group commit on the writer thread) ──▶ store (RocksDB / memory)
//!                │ committed batch
//!                ▼
//!             fanout (per-channel rings) ──▶ subscription loops ──▶ delivery sinks
//!  retention ──trims──▶ log          catch-up reads ──▶ log's reader threads
//! ```
//!
//! - [`store`]: the `LogStore` and `DeviceStore` traits, their RocksDB and
//!   in-memory implementations and their byte layouts;
//! - [`log`]: offset assignment and group commit on the writer thread,
//!   catch-up reads on reader threads;
//! - [`channels`], [`producers`]: the writer's resident channel metadata
//!   and idempotent-publish windows (the rest stays on disk until used);
//! - [`fanout`]: per-channel rings of encoded batches, shared by subscribers;
//! - [`subscription`]: one subscription's offset-driven delivery loop;
//! - [`retention`]: background trimming per namespace;
//! - `queue`: the bounded hand-off from async tasks to those threads.

pub mod channels;
pub mod fanout;
pub mod log;
pub mod producers;
pub(crate) mod queue;
pub mod retention;
pub mod store;
pub mod subscription;
