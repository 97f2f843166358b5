//! Partition groups whose storage failed on this node, and when each may
//! be started again.
//!
//! openraft stops a group whose log write or apply fails. Starting it again
//! at once is what makes a failing disk harmful to the whole partition:
//! openraft restores a group that led before it stopped as leader of its
//! old term at once (`Engine::startup`), so a node restarting its failed
//! group every reconcile turn keeps sending its followers heartbeats of
//! that term. They never time out, never elect another leader, and the
//! partition takes no writes for as long as the disk stays full — the node
//! "fails its groups" but goes on leading them. Two rules keep a failed
//! group out of the way:
//!
//! - the first restart waits two election timeouts (the other replicas
//!   elect a leader of a newer term meanwhile, which the restarted group
//!   then follows), and each failure in a row doubles the
//!   wait up to [`MAX_RESTART_DELAY`];
//! - a group is started again only once a synced probe write to the store
//!   succeeds (a full disk fails it), checked on each reconcile turn once
//!   the wait is over, so a node whose space came back restarts its groups
//!   within a turn, not a backoff.
//!
//! A group that ran [`HEALTHY_RUN`] since it was started again is
//! forgotten here: its next failure starts over at the first delay.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use volna_cluster::PartitionId;

/// The longest wait between restarts of a group that fails again and again.
pub const MAX_RESTART_DELAY: Duration = Duration::from_secs(30);

/// How long a restarted group must run for its failures to be forgotten.
pub const HEALTHY_RUN: Duration = Duration::from_secs(60);

/// One partition's failure record.
#[derive(Debug, Clone)]
pub struct Failure {
    /// What failed, as the store or openraft said.
    pub why: String,
    /// Failures without a healthy run in between.
    in_a_row: u32,
    /// Not started again before this.
    retry_at: Instant,
    /// When the group was last started again (`None` while it is stopped).
    restarted: Option<Instant>,
}

/// What the reconcile loop may do with a partition's group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Restart {
    /// Nothing failed, or the restarted group runs: start it as usual.
    Go,
    /// The wait after its last failure is not over.
    Wait,
    /// The wait is over: start it if the store takes a synced write.
    IfStoreHealthy,
}

/// The failure records of one node's partitions.
#[derive(Debug)]
pub struct Restarts {
    first_delay: Duration,
    failed: BTreeMap<PartitionId, Failure>,
}

impl Restarts {
    /// Records for a node whose groups elect within `election_timeout`.
    pub fn new(election_timeout: Duration) -> Self {
        Self {
            first_delay: election_timeout * 2,
            failed: BTreeMap::new(),
        }
    }

    /// `partition`'s group stopped, or did not start, because of `why`;
    /// answers how long it now waits before it is started again.
    pub fn failed(&mut self, partition: PartitionId, why: String, now: Instant) -> Duration {
        let in_a_row = match self.failed.get(&partition) {
            Some(previous) if !ran_healthy(previous, now) => previous.in_a_row.saturating_add(1),
            _ => 1,
        };
        let delay = self
            .first_delay
            .saturating_mul(1 << (in_a_row - 1).min(16))
            .min(MAX_RESTART_DELAY.max(self.first_delay));
        self.failed.insert(
            partition,
            Failure {
                why,
                in_a_row,
                retry_at: now + delay,
                restarted: None,
            },
        );
        delay
    }

    /// Whether `partition`'s group may be started now.
    pub fn restart(&self, partition: PartitionId, now: Instant) -> Restart {
        match self.failed.get(&partition) {
            None => Restart::Go,
            Some(failure) if failure.restarted.is_some() => Restart::Go,
            Some(failure) if now < failure.retry_at => Restart::Wait,
            Some(_) => Restart::IfStoreHealthy,
        }
    }

    /// The store refused the probe write: `partition` stays stopped, and
    /// says why.
    pub fn still_failing(&mut self, partition: PartitionId, why: String) {
        if let Some(failure) = self.failed.get_mut(&partition) {
            failure.why = why;
        }
    }

    /// `partition`'s group was started again.
    pub fn started(&mut self, partition: PartitionId, now: Instant) {
        if let Some(failure) = self.failed.get_mut(&partition) {
            failure.restarted.get_or_insert(now);
        }
    }

    /// Forgets the failures of groups that ran healthy long enough.
    pub fn forget_healthy(&mut self, now: Instant) {
        self.failed.retain(|_, failure| !ran_healthy(failure, now));
    }

    /// The partitions whose group is stopped here, and why.
    pub fn stopped(&self) -> impl Iterator<Item = (PartitionId, &str)> {
        self.failed
            .iter()
            .filter(|(_, failure)| failure.restarted.is_none())
            .map(|(partition, failure)| (*partition, failure.why.as_str()))
    }
}

fn ran_healthy(failure: &Failure, now: Instant) -> bool {
    failure
        .restarted
        .is_some_and(|at| now.saturating_duration_since(at) >= HEALTHY_RUN)
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: PartitionId = PartitionId(3);

    #[test]
    fn a_failed_group_waits_two_election_timeouts_then_needs_a_healthy_store() {
        let mut restarts = Restarts::new(Duration::from_secs(1));
        let t0 = Instant::now();
        assert_eq!(restarts.restart(P, t0), Restart::Go);
        restarts.failed(P, "No space left on device".into(), t0);
        assert_eq!(
            restarts.stopped().collect::<Vec<_>>(),
            vec![(P, "No space left on device")]
        );
        assert_eq!(
            restarts.restart(P, t0 + Duration::from_millis(1_999)),
            Restart::Wait
        );
        assert_eq!(
            restarts.restart(P, t0 + Duration::from_secs(2)),
            Restart::IfStoreHealthy
        );
        restarts.still_failing(P, "still full".into());
        assert_eq!(restarts.stopped().next(), Some((P, "still full")));
        restarts.started(P, t0 + Duration::from_secs(3));
        assert_eq!(restarts.stopped().next(), None);
        assert_eq!(
            restarts.restart(P, t0 + Duration::from_secs(3)),
            Restart::Go
        );
    }

    #[test]
    fn failures_in_a_row_double_the_wait_up_to_the_cap_and_a_healthy_run_resets_it() {
        let mut restarts = Restarts::new(Duration::from_secs(1));
        let mut now = Instant::now();
        let mut waits = Vec::new();
        for _ in 0..7 {
            restarts.failed(P, "io".into(), now);
            let mut wait = Duration::ZERO;
            while restarts.restart(P, now + wait) == Restart::Wait {
                wait += Duration::from_millis(500);
            }
            waits.push(wait.as_secs());
            now += wait;
            restarts.started(P, now);
            now += Duration::from_secs(1);
        }
        assert_eq!(waits, vec![2, 4, 8, 16, 30, 30, 30]);

        // A run of HEALTHY_RUN forgets the record: the next wait is short.
        now += HEALTHY_RUN;
        restarts.forget_healthy(now);
        assert_eq!(restarts.restart(P, now), Restart::Go);
        restarts.failed(P, "io".into(), now);
        assert_eq!(
            restarts.restart(P, now + Duration::from_secs(2)),
            Restart::IfStoreHealthy
        );
    }
}
