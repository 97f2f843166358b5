//! Who may do what, and how much: token authentication, TLS (certificates,
//! reload, mutual TLS) and the connection, publish and handshake limits.

pub mod auth;
pub mod limits;
pub mod tls;
