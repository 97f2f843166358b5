//! What operators see and use: the HTTP port (health, readiness, metrics),
//! the admin API, and the Prometheus metrics every part reports to.

pub mod admin;
pub mod http;
pub mod metrics;
