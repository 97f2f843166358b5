//! The network side: QUIC connections and the sessions they carry.
//!
//! - [`transport`]: the shard engine over `quinn-proto`, the only module
//!   that knows QUIC (and UDP);
//! - [`websocket`]: the same sessions over one WebSocket (TCP), for
//!   browsers and networks that block UDP;
//! - [`session`]: one connection's request/reply protocol and limits,
//!   over byte streams and the `Connection` / `DeliverySink` seams, so it
//!   runs without sockets in tests and the fuzzer.

pub mod session;
pub mod transport;
pub mod websocket;
