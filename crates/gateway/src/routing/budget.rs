//! The retry budget: retries may be at most a share of the requests seen
//! over a sliding window, plus a small reserve, so that retries can never
//! multiply the load on workers that are failing for a reason retrying
//! cannot fix.
//!
//! The window is [`BUCKETS`] buckets of counters, each tagged with the slice
//! of time it counts, updated lock-free: counting a request is one atomic
//! operation on the hot path.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Buckets per window: the window slides in steps of a tenth.
const BUCKETS: usize = 10;

/// Counters of requests and retries over a sliding window.
#[derive(Debug)]
pub(super) struct RetryBudget {
    epoch: Instant,
    bucket: Duration,
    ratio: f64,
    /// Retries allowed in a window whatever the traffic.
    reserve: f64,
    requests: [AtomicU64; BUCKETS],
    retries: [AtomicU64; BUCKETS],
}

impl RetryBudget {
    /// Retries at most `ratio` × requests over `window`, plus
    /// `min_per_second` × the window's seconds.
    pub(super) fn new(ratio: f64, min_per_second: u32, window: Duration) -> RetryBudget {
        RetryBudget {
            epoch: Instant::now(),
            bucket: (window / BUCKETS as u32).max(Duration::from_millis(1)),
            ratio,
            reserve: f64::from(min_per_second) * window.as_secs_f64(),
            requests: Default::default(),
            retries: Default::default(),
        }
    }

    /// Counts one request (not a retry).
    pub(super) fn record_request(&self, now: Instant) {
        count(&self.requests, self.slice(now));
    }

    /// Whether one more retry fits the budget now; if so, counts it.
    pub(super) fn try_retry(&self, now: Instant) -> bool {
        let slice = self.slice(now);
        let requests = sum(&self.requests, slice) as f64;
        let retries = sum(&self.retries, slice) as f64;
        if retries + 1.0 > self.ratio * requests + self.reserve {
            return false;
        }
        count(&self.retries, slice);
        true
    }

    /// The number of the time slice `now` falls in.
    fn slice(&self, now: Instant) -> u64 {
        let elapsed = now.saturating_duration_since(self.epoch);
        (elapsed.as_nanos() / self.bucket.as_nanos()) as u64
    }
}

/// A bucket holds its slice number in the high 32 bits and its count in the
/// low 32; a bucket of an old slice is reset by the first count of a new one.
fn count(buckets: &[AtomicU64; BUCKETS], slice: u64) {
    let tag = slice & 0xffff_ffff;
    let bucket = &buckets[(slice % BUCKETS as u64) as usize];
    let _ = bucket.fetch_update(Ordering::AcqRel, Ordering::Acquire, |packed| {
        Some(if packed >> 32 == tag {
            packed.saturating_add(1).min(tag << 32 | 0xffff_ffff)
        } else {
            tag << 32 | 1
        })
    });
}

/// The counts of the buckets whose slices are within the window ending at
/// `slice`.
fn sum(buckets: &[AtomicU64; BUCKETS], slice: u64) -> u64 {
    buckets
        .iter()
        .map(|bucket| bucket.load(Ordering::Acquire))
        .filter(|packed| {
            let age = (slice & 0xffff_ffff).wrapping_sub(packed >> 32) & 0xffff_ffff;
            age < BUCKETS as u64
        })
        .map(|packed| packed & 0xffff_ffff)
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_are_a_share_of_recent_requests() {
        let budget = RetryBudget::new(0.2, 0, Duration::from_secs(10));
        let t0 = budget.epoch;
        assert!(!budget.try_retry(t0), "no requests, no reserve: no retries");
        for _ in 0..100 {
            budget.record_request(t0);
        }
        let allowed = (0..50).take_while(|_| budget.try_retry(t0)).count();
        assert_eq!(allowed, 20);
        // Requests later in the window add to it.
        let t5 = t0 + Duration::from_secs(5);
        for _ in 0..10 {
            budget.record_request(t5);
        }
        assert_eq!((0..50).take_while(|_| budget.try_retry(t5)).count(), 2);
        // Once the first requests leave the window, so do their retries:
        // 10 requests left, 2 retries counted, none more allowed.
        let t11 = t0 + Duration::from_secs(11);
        assert!(!budget.try_retry(t11));
        // And when everything has left, nothing is allowed without requests.
        let t30 = t0 + Duration::from_secs(30);
        assert!(!budget.try_retry(t30));
        budget.record_request(t30);
        for _ in 0..4 {
            budget.record_request(t30);
        }
        assert!(budget.try_retry(t30), "one retry for five requests");
        assert!(!budget.try_retry(t30));
    }

    #[test]
    fn the_reserve_allows_a_few_retries_per_second_without_traffic() {
        let budget = RetryBudget::new(0.2, 3, Duration::from_secs(2));
        let t0 = budget.epoch;
        assert_eq!((0..100).take_while(|_| budget.try_retry(t0)).count(), 6);
        let later = t0 + Duration::from_secs(3);
        assert_eq!((0..100).take_while(|_| budget.try_retry(later)).count(), 6);
    }
}
