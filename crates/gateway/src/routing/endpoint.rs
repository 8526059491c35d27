//! One worker as this gateway sees it: its connection (one per worker,
//! reused by every request), the requests outstanding there, the load it
//! reports, and its health — consecutive failures and outlier ejection.
//!
//! Everything a request touches is an atomic; only ejection, which is rare,
//! takes a lock.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use prometheus::IntGauge;

use super::connection::Connection;
use crate::metrics;

/// One worker.
#[derive(Debug)]
pub(crate) struct Endpoint {
    pub(super) id: String,
    pub(super) address: String,
    pub(super) connection: Connection,
    outstanding: AtomicU32,
    /// In flight plus queued, as the worker last published.
    reported: AtomicU32,
    health: Health,
    gauge: IntGauge,
}

impl Endpoint {
    pub(super) fn new(id: &str, address: &str, connection: Connection) -> Endpoint {
        Endpoint {
            id: id.to_string(),
            address: address.to_string(),
            connection,
            outstanding: AtomicU32::new(0),
            reported: AtomicU32::new(0),
            health: Health::default(),
            gauge: metrics::worker_outstanding(id),
        }
    }

    /// Requests this gateway has outstanding at the worker.
    pub(super) fn outstanding(&self) -> u32 {
        self.outstanding.load(Ordering::Relaxed)
    }

    pub(super) fn set_reported(&self, load: u32) {
        self.reported.store(load, Ordering::Relaxed);
    }

    /// The load power of two choices compares: this gateway's outstanding
    /// requests, exact and current, plus what the worker last reported
    /// (every gateway's, up to half a second old).
    pub(super) fn score(&self) -> u64 {
        u64::from(self.outstanding()) + u64::from(self.reported.load(Ordering::Relaxed))
    }

    pub(super) fn health(&self) -> &Health {
        &self.health
    }

    /// Counts one more outstanding request unless `cap` are already.
    pub(super) fn try_acquire(self: &Arc<Self>, cap: u32) -> Option<Pending> {
        self.outstanding
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < cap).then_some(n + 1)
            })
            .ok()?;
        self.gauge.inc();
        Some(Pending {
            endpoint: self.clone(),
        })
    }
}

/// One outstanding request at a worker, counted until dropped.
#[derive(Debug)]
pub(crate) struct Pending {
    endpoint: Arc<Endpoint>,
}

impl Pending {
    pub(super) fn endpoint(&self) -> &Arc<Endpoint> {
        &self.endpoint
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        self.endpoint.outstanding.fetch_sub(1, Ordering::AcqRel);
        self.endpoint.gauge.dec();
    }
}

/// When workers are ejected, and for how long.
#[derive(Debug, Clone, Copy)]
pub(super) struct EjectionPolicy {
    /// Consecutive failures that eject; 0 never ejects.
    pub(super) threshold: u32,
    pub(super) base: Duration,
    pub(super) max: Duration,
}

impl EjectionPolicy {
    /// How long the `k`-th ejection in a row (from 0) lasts: base × 2^k,
    /// at most `max`.
    pub(super) fn interval(&self, k: u32) -> Duration {
        self.base
            .checked_mul(1u32 << k.min(20))
            .unwrap_or(self.max)
            .min(self.max)
    }
}

/// A worker's health, on a clock of nanoseconds since the router started.
#[derive(Debug, Default)]
pub(super) struct Health {
    consecutive_failures: AtomicU32,
    /// Until when the worker is out of rotation; it stays set after that, as
    /// the time it came back.
    ejected_until: AtomicU64,
    /// Ejections in a row, which the next interval doubles with.
    ejections: AtomicU32,
}

impl Health {
    pub(super) fn is_ejected(&self, now: u64) -> bool {
        now < self.ejected_until.load(Ordering::Relaxed)
    }

    /// An attempt succeeded: the failure streak ends, and once the worker
    /// has been back for a whole base interval its ejections are forgiven.
    pub(super) fn succeeded(&self, now: u64, policy: &EjectionPolicy) {
        if self.consecutive_failures.load(Ordering::Relaxed) != 0 {
            self.consecutive_failures.store(0, Ordering::Relaxed);
        }
        if self.ejections.load(Ordering::Relaxed) != 0 {
            let back = self.ejected_until.load(Ordering::Relaxed);
            if now >= back.saturating_add(policy.base.as_nanos() as u64) {
                self.ejections.store(0, Ordering::Relaxed);
            }
        }
    }

    /// An attempt failed in a way that speaks of the worker (connection
    /// failure, `UNAVAILABLE`, `INTERNAL`, attempt timeout). Returns whether
    /// the streak reached the threshold, i.e. whether to try ejecting.
    /// Failures of requests sent before an ejection do not count after it.
    pub(super) fn failed(&self, now: u64, policy: &EjectionPolicy) -> bool {
        if self.is_ejected(now) {
            return false;
        }
        let streak = self.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
        policy.threshold != 0 && streak >= policy.threshold
    }

    /// Ejects the worker now; returns for how long. The caller has checked
    /// that ejecting keeps at least half the model's workers in rotation.
    pub(super) fn eject(&self, now: u64, policy: &EjectionPolicy) -> Duration {
        let k = self.ejections.fetch_add(1, Ordering::Relaxed);
        let interval = policy.interval(k);
        self.ejected_until.store(
            now.saturating_add(interval.as_nanos() as u64),
            Ordering::Relaxed,
        );
        self.consecutive_failures.store(0, Ordering::Relaxed);
        interval
    }
}

/// Whether one more of `total` workers may be ejected when `ejected` are:
/// never more than half.
pub(super) fn may_eject(ejected: usize, total: usize) -> bool {
    (ejected + 1) * 2 <= total
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: u64 = 1_000_000_000;

    fn policy() -> EjectionPolicy {
        EjectionPolicy {
            threshold: 3,
            base: Duration::from_secs(10),
            max: Duration::from_secs(60),
        }
    }

    #[test]
    fn intervals_double_up_to_the_cap() {
        let p = policy();
        let secs: Vec<u64> = (0..6).map(|k| p.interval(k).as_secs()).collect();
        assert_eq!(secs, [10, 20, 40, 60, 60, 60]);
        assert_eq!(p.interval(u32::MAX), Duration::from_secs(60));
    }

    #[test]
    fn a_streak_of_failures_ejects_for_a_growing_interval() {
        let (p, health) = (policy(), Health::default());
        let mut now = 100 * SECOND;
        assert!(!health.failed(now, &p));
        assert!(!health.failed(now, &p));
        // A success in between ends the streak.
        health.succeeded(now, &p);
        assert!(!health.failed(now, &p));
        assert!(!health.failed(now, &p));
        assert!(health.failed(now, &p), "third in a row");
        assert_eq!(health.eject(now, &p), Duration::from_secs(10));
        assert!(health.is_ejected(now + 9 * SECOND));
        assert!(!health.is_ejected(now + 10 * SECOND));
        // Back, and failing again at once: twice as long.
        now += 10 * SECOND;
        for _ in 0..2 {
            assert!(!health.failed(now, &p));
        }
        assert!(health.failed(now, &p));
        assert_eq!(health.eject(now, &p), Duration::from_secs(20));
        // While ejected, failures (of requests already sent) do not count.
        for _ in 0..5 {
            assert!(!health.failed(now + SECOND, &p));
        }
        assert!(!health.failed(now + 20 * SECOND, &p), "a new streak");
        // Back for a whole base interval with a success: forgiven.
        now += 20 * SECOND;
        health.succeeded(now + 10 * SECOND, &p);
        for _ in 0..2 {
            assert!(!health.failed(now + 11 * SECOND, &p));
        }
        assert!(health.failed(now + 11 * SECOND, &p));
        assert_eq!(health.eject(now + 11 * SECOND, &p), Duration::from_secs(10));
    }

    #[test]
    fn no_more_than_half_are_ejected() {
        assert!(!may_eject(0, 1), "a lone worker stays");
        assert!(may_eject(0, 2));
        assert!(!may_eject(1, 2));
        assert!(may_eject(1, 4));
        assert!(!may_eject(2, 4));
        assert!(may_eject(1, 5));
        assert!(!may_eject(2, 5));
    }

    #[test]
    fn a_threshold_of_zero_never_ejects() {
        let p = EjectionPolicy {
            threshold: 0,
            ..policy()
        };
        let health = Health::default();
        assert!((0..100).all(|_| !health.failed(0, &p)));
    }
}
