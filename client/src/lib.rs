//! The Rust client of the Volna broker: what devices and services link to
//! publish to channels and receive them.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use futures_util::StreamExt;
//! use volna_client::{ChannelName, Client, ClientConfig, Position, Trust};
//!
//! let trust = Trust::CaFile("volna-data/dev-cert.pem".into());
//! let client = Client::connect(ClientConfig::new("127.0.0.1:7400", "token", trust)).await?;
//! let chat = ChannelName::new("chat.8812")?;
//! let mut messages = client.subscribe(&chat, Position::Latest).await?;
//! let ack = client.publish(&chat, "hello").await?;
//! println!("stored at offset {}", ack.offset);
//! while let Some(item) = messages.next().await {
//!     match item {
//!         Ok(m) => println!("{} {:?}", m.offset, m.payload),
//!         Err(event) => eprintln!("{event}"), // Truncated, EpochChanged: not fatal
//!     }
//! }
//! # Ok(()) }
//! ```
//!
//! What it guarantees: a publish returns only once the broker stored the
//! message, and is retried across reconnects without being stored twice; a
//! subscription yields each offset once, in order, across reconnects and
//! broker restarts, and says so (`Truncated`, `EpochChanged`) instead of
//! skipping. Positions survive the process through the broker: with a
//! [`ClientConfig::device`], [`Subscription::ack`] stores the device's
//! cursor and `Position::Cursor` resumes after it next time (or keep
//! [`Subscription::next_offset`] yourself and subscribe `Position::From`).
//! What it does not do: buffer publishes while the broker is unreachable
//! beyond the request timeout.
//!
//! Trust: [`Trust::CaFile`] with the broker's `dev-cert.pem` (development)
//! or a private CA, [`Trust::WebPki`] for public CAs, [`Trust::Pinned`] for a
//! certificate fingerprint obtained out of band.
//!
//! Tokens: with a [`TokenSource`], the client refreshes its token on the
//! open connection when the broker announces its expiry, and fetches a new
//! one when a reconnect is refused as unauthorized. Backend services may
//! instead present a [`ClientCertificate`] (mutual TLS).

mod acks;
mod client;
mod config;
mod connection;
mod error;
mod inflight;
mod subscription;
mod websocket;

pub use client::{Client, ConnectionState, Published};
pub use config::{
    Backoff, ClientCertificate, ClientConfig, TokenError, TokenSource, Trust, device_producer_id,
};
pub use connection::{Endpoint, ReadMarker, fingerprint};
pub use error::{ClientError, SubscriptionError};
pub use subscription::{Item, Message, Subscription};
pub use volna_proto::{ChannelName, Epoch, ErrorCode, Fallback, Offset, Position, UnreadCount};
