//! The limits that keep one client from taking the broker down for others:
//! connections per user, publishes per second per connection and per user
//! (token buckets, crate `governor`), new connections per second per
//! source address, new channels per minute per user, and broker-wide:
//! connections and handshakes in progress
//! (capped), and the new-connection rate above which addresses must be
//! validated (QUIC Retry) before a handshake.
//!
//! Server-side identities (backend services) are not limited here: they are
//! few, trusted, and carry the broadcast load. Per-user state lives only
//! while the user has a connection, so memory follows the connected users,
//! not every user ever seen.

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use dashmap::DashMap;
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, DefaultKeyedRateLimiter, Quota};
use thiserror::Error;

use crate::config::LimitsConfig;

/// A limit was reached.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum LimitError {
    /// The user already holds `max` connections.
    #[error("user {user} already holds {max} connections")]
    TooManyConnections {
        /// The user.
        user: String,
        /// The limit.
        max: u32,
    },
    /// Publishing faster than allowed.
    #[error("publishing faster than {per_sec} messages/s ({scope}); retry in {retry_after_ms} ms")]
    PublishRate {
        /// `connection` or `user`.
        scope: &'static str,
        /// The rate in force.
        per_sec: u32,
        /// When a publish would be accepted again.
        retry_after_ms: u64,
    },
    /// Creating channels faster than allowed.
    #[error("creating channels faster than {per_minute} per minute; retry in {retry_after_ms} ms")]
    CreationRate {
        /// The rate in force.
        per_minute: u32,
        /// When a new channel would be accepted again.
        retry_after_ms: u64,
    },
}

/// The broker's limits and the state behind them.
#[derive(Debug)]
pub struct Limiter {
    max_connections_per_user: u32,
    per_connection: Option<(Quota, u32)>,
    per_user: Option<(Quota, u32)>,
    creations: Option<(Quota, u32)>,
    users: DashMap<String, UserEntry>,
    handshakes: Option<DefaultKeyedRateLimiter<IpAddr>>,
    max_connections: usize,
    max_handshaking: usize,
    /// Connections held, handshakes included.
    connections: AtomicUsize,
    handshaking: AtomicUsize,
    /// Broker-wide new connections per second before Retry is asked for.
    unvalidated: Option<DefaultDirectRateLimiter>,
}

/// What to do with a connection attempt.
#[derive(Debug)]
pub enum Admission {
    /// Go on with the handshake; the slot counts the connection until it
    /// is dropped.
    Accept(ConnectionSlot),
    /// Ask the client to prove its address first (QUIC Retry).
    Retry,
    /// Refuse: the broker holds as many connections or handshakes as it may.
    Refuse(&'static str),
}

/// One admitted connection, counted against the broker-wide caps while it
/// lives.
#[derive(Debug)]
pub struct ConnectionSlot {
    limiter: Arc<Limiter>,
    handshaking: bool,
}

impl ConnectionSlot {
    /// The handshake completed: it no longer counts as one in progress.
    pub fn established(&mut self) {
        if std::mem::take(&mut self.handshaking) {
            self.limiter.handshaking.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.established();
        self.limiter.connections.fetch_sub(1, Ordering::Relaxed);
    }
}

#[derive(Debug)]
struct UserEntry {
    connections: u32,
    publishes: Option<Arc<DefaultDirectRateLimiter>>,
    creations: Option<Arc<DefaultDirectRateLimiter>>,
}

fn quota(per_sec: u32, burst: u32) -> Option<(Quota, u32)> {
    let rate = NonZeroU32::new(per_sec)?;
    let burst = NonZeroU32::new(burst).unwrap_or(rate);
    Some((Quota::per_second(rate).allow_burst(burst), per_sec))
}

impl Limiter {
    /// Limits as configured.
    pub fn new(config: &LimitsConfig) -> Self {
        let handshakes = quota(
            config.handshakes_per_ip_per_sec,
            config.handshake_burst_per_ip,
        )
        .map(|(q, _)| governor::RateLimiter::keyed(q));
        Self {
            max_connections_per_user: config.max_connections_per_user,
            per_connection: quota(config.publish_rate_per_connection, config.publish_burst),
            per_user: quota(config.publish_rate_per_user, config.publish_burst),
            creations: NonZeroU32::new(config.channel_creations_per_minute).map(|rate| {
                let burst = NonZeroU32::new(config.channel_creation_burst).unwrap_or(rate);
                (Quota::per_minute(rate).allow_burst(burst), rate.get())
            }),
            users: DashMap::new(),
            handshakes,
            max_connections: config.max_connections,
            max_handshaking: config.max_handshakes_in_progress,
            connections: AtomicUsize::new(0),
            handshaking: AtomicUsize::new(0),
            unvalidated: NonZeroU32::new(config.retry_above_handshakes_per_sec)
                .map(|rate| governor::RateLimiter::direct(Quota::per_second(rate))),
        }
    }

    /// Decides a connection attempt by the broker-wide caps; `validated`:
    /// the client already proved its address (it answered a Retry).
    pub fn admit_connection(self: &Arc<Self>, validated: bool) -> Admission {
        if self.connections.load(Ordering::Relaxed) >= self.max_connections {
            return Admission::Refuse("connections");
        }
        if self.handshaking.load(Ordering::Relaxed) >= self.max_handshaking {
            return Admission::Refuse("handshakes");
        }
        if !validated
            && self
                .unvalidated
                .as_ref()
                .is_some_and(|limiter| limiter.check().is_err())
        {
            return Admission::Retry;
        }
        self.connections.fetch_add(1, Ordering::Relaxed);
        self.handshaking.fetch_add(1, Ordering::Relaxed);
        Admission::Accept(ConnectionSlot {
            limiter: self.clone(),
            handshaking: true,
        })
    }

    /// Connections held, handshakes included.
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::Relaxed)
    }

    /// Whether a new connection from `ip` may start its handshake.
    pub fn admit_handshake(&self, ip: IpAddr) -> bool {
        self.handshakes
            .as_ref()
            .is_none_or(|limiter| limiter.check_key(&ip).is_ok())
    }

    /// Forgets addresses whose bucket is full again, so the table holds
    /// only recently active addresses. Call it now and then.
    pub fn forget_idle_addresses(&self) {
        if let Some(limiter) = &self.handshakes {
            limiter.retain_recent();
            limiter.shrink_to_fit();
        }
    }

    /// Registers a connection of an end user: refused beyond
    /// `max_connections_per_user`. The returned gate checks its publishes;
    /// dropping it releases the connection.
    pub fn open_user_connection(self: &Arc<Self>, user: &str) -> Result<PublishGate, LimitError> {
        let mut entry = self
            .users
            .entry(user.to_owned())
            .or_insert_with(|| UserEntry {
                connections: 0,
                publishes: self
                    .per_user
                    .map(|(q, _)| Arc::new(governor::RateLimiter::direct(q))),
                creations: self
                    .creations
                    .map(|(q, _)| Arc::new(governor::RateLimiter::direct(q))),
            });
        if entry.connections >= self.max_connections_per_user {
            return Err(LimitError::TooManyConnections {
                user: user.to_owned(),
                max: self.max_connections_per_user,
            });
        }
        entry.connections += 1;
        let user_bucket = entry.publishes.clone();
        let creations = entry.creations.clone();
        drop(entry);
        Ok(PublishGate {
            creations: creations.zip(self.creations.map(|(_, rate)| rate)),
            connection: self
                .per_connection
                .map(|(q, rate)| (governor::RateLimiter::direct(q), rate)),
            user: user_bucket.zip(self.per_user.map(|(_, rate)| rate)),
            release: Some((self.clone(), user.to_owned())),
        })
    }

    /// How many users hold at least one connection.
    pub fn connected_users(&self) -> usize {
        self.users.len()
    }

    fn release(&self, user: &str) {
        if let Some(mut entry) = self.users.get_mut(user) {
            entry.connections = entry.connections.saturating_sub(1);
        }
        self.users.remove_if(user, |_, e| e.connections == 0);
    }
}

/// One connection's publish limits; releases the connection's place in
/// its user's count when dropped.
#[derive(Debug)]
pub struct PublishGate {
    connection: Option<(DefaultDirectRateLimiter, u32)>,
    user: Option<(Arc<DefaultDirectRateLimiter>, u32)>,
    /// The user's bucket of new channels, per minute.
    creations: Option<(Arc<DefaultDirectRateLimiter>, u32)>,
    release: Option<(Arc<Limiter>, String)>,
}

impl PublishGate {
    /// A gate that lets everything through: server-side identities.
    pub fn unlimited() -> Self {
        Self {
            connection: None,
            user: None,
            creations: None,
            release: None,
        }
    }

    /// Whether new channels are limited for this connection's user (a
    /// publish to an unknown channel must then be checked).
    pub fn limits_creations(&self) -> bool {
        self.creations.is_some()
    }

    /// Takes one new channel from the user's bucket.
    pub fn check_creation(&self) -> Result<(), LimitError> {
        let Some((bucket, per_minute)) = &self.creations else {
            return Ok(());
        };
        bucket.check().map_err(|not_until| {
            let wait: Duration = not_until.wait_time_from(DefaultClock::default().now());
            LimitError::CreationRate {
                per_minute: *per_minute,
                retry_after_ms: u64::try_from(wait.as_millis()).unwrap_or(u64::MAX).max(1),
            }
        })
    }

    /// Takes one publish from the connection's and the user's buckets.
    pub fn check(&self) -> Result<(), LimitError> {
        let buckets = [
            self.connection.as_ref().map(|(b, r)| (b, *r, "connection")),
            self.user.as_ref().map(|(b, r)| (&**b, *r, "user")),
        ];
        for (bucket, per_sec, scope) in buckets.into_iter().flatten() {
            if let Err(not_until) = bucket.check() {
                let wait: Duration = not_until.wait_time_from(DefaultClock::default().now());
                return Err(LimitError::PublishRate {
                    scope,
                    per_sec,
                    retry_after_ms: u64::try_from(wait.as_millis()).unwrap_or(u64::MAX).max(1),
                });
            }
        }
        Ok(())
    }
}

impl Drop for PublishGate {
    fn drop(&mut self) {
        if let Some((limiter, user)) = self.release.take() {
            limiter.release(&user);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(tweak: impl FnOnce(&mut LimitsConfig)) -> Arc<Limiter> {
        let mut config = LimitsConfig::default();
        tweak(&mut config);
        Arc::new(Limiter::new(&config))
    }

    #[test]
    fn channel_creations_are_limited_per_user_across_connections() {
        let limiter = limits(|c| {
            c.channel_creations_per_minute = 60;
            c.channel_creation_burst = 3;
        });
        let a = limiter.open_user_connection("alice").expect("first");
        let b = limiter.open_user_connection("alice").expect("second");
        assert!(a.limits_creations());
        a.check_creation().expect("1");
        b.check_creation().expect("2");
        a.check_creation().expect("3");
        assert!(matches!(
            b.check_creation(),
            Err(LimitError::CreationRate { per_minute: 60, retry_after_ms }) if retry_after_ms <= 1000
        ));
        let bob = limiter.open_user_connection("bob").expect("bob");
        bob.check_creation().expect("other users unaffected");
        assert!(!PublishGate::unlimited().limits_creations());
        assert!(PublishGate::unlimited().check_creation().is_ok());
    }

    #[test]
    fn connections_per_user_are_counted_and_released() {
        let limiter = limits(|c| c.max_connections_per_user = 2);
        let a = limiter.open_user_connection("alice").expect("first");
        let b = limiter.open_user_connection("alice").expect("second");
        assert!(matches!(
            limiter.open_user_connection("alice"),
            Err(LimitError::TooManyConnections { max: 2, .. })
        ));
        let _bob = limiter
            .open_user_connection("bob")
            .expect("other users unaffected");
        drop(a);
        let _c = limiter
            .open_user_connection("alice")
            .expect("a place was freed");
        drop(b);
        drop(_c);
        assert_eq!(limiter.connected_users(), 1, "alice's state is gone");
    }

    #[test]
    fn publish_buckets_refuse_beyond_the_burst_and_share_per_user() {
        let limiter = limits(|c| {
            c.publish_rate_per_connection = 1;
            c.publish_rate_per_user = 1;
            c.publish_burst = 3;
        });
        let a = limiter.open_user_connection("alice").expect("a");
        let b = limiter.open_user_connection("alice").expect("b");
        for _ in 0..3 {
            a.check().expect("within the burst");
        }
        let err = a.check().expect_err("beyond the burst");
        assert!(
            matches!(err, LimitError::PublishRate { retry_after_ms, .. } if retry_after_ms > 0)
        );
        // Alice's other connection has its own bucket, but the user's is empty.
        assert!(matches!(
            b.check(),
            Err(LimitError::PublishRate { scope: "user", .. })
        ));
        PublishGate::unlimited()
            .check()
            .expect("servers are not limited");
    }

    #[test]
    fn handshakes_are_limited_per_address() {
        let limiter = limits(|c| {
            c.handshakes_per_ip_per_sec = 1;
            c.handshake_burst_per_ip = 2;
        });
        let a: IpAddr = [10, 0, 0, 1].into();
        let b: IpAddr = [10, 0, 0, 2].into();
        assert!(limiter.admit_handshake(a));
        assert!(limiter.admit_handshake(a));
        assert!(!limiter.admit_handshake(a));
        assert!(limiter.admit_handshake(b));
        let unlimited = limits(|c| c.handshakes_per_ip_per_sec = 0);
        assert!((0..10_000).all(|_| unlimited.admit_handshake(a)));
    }
}
