//! The generic cell rate algorithm (GCRA) over one-minute windows, and the
//! in-process limiter built on it: `lmgrid up`'s limiter, and every
//! gateway's fallback while Redis is unreachable. The Redis limiter runs the
//! same arithmetic in Lua (`redis.rs`), so both behave alike.
//!
//! A limit of `L` per minute emits one unit every `I = 60 s / L`; the state is
//! one number, the theoretical arrival time (TAT) — when the bucket would be
//! full again. A request costing `n` is allowed when
//! `max(TAT, now) + n·I − now ≤ 60 s`, which admits bursts of up to `L` and
//! then `L` per minute. Times are microseconds.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::{Ask, Refusal, Verdict, Window};
use crate::auth::Limits;

/// The window of every limit: one minute, in microseconds.
pub(crate) const PERIOD_US: f64 = 60_000_000.0;

/// Slack for floating-point sums (`L · 60 s / L` may land a hair above 60 s).
const EPSILON_US: f64 = 0.5;

/// The outcome of charging `cost` against one limit.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Charge {
    pub(crate) allowed: bool,
    /// The TAT to store when the request goes ahead; the stored one when
    /// it does not.
    pub(crate) tat: f64,
    /// When not allowed: how long until it would be.
    pub(crate) retry_after: Duration,
}

/// Charges `cost` units at `now` against `limit` per minute, given the
/// stored `tat` (none for a fresh bucket). `limit` must be positive.
pub(crate) fn charge(tat: Option<f64>, now: f64, limit: u64, cost: u64) -> Charge {
    let interval = PERIOD_US / limit as f64;
    let tat = tat.map_or(now, |t| t.max(now));
    let next = tat + cost as f64 * interval;
    let allowed = next - now <= PERIOD_US + EPSILON_US;
    let after = if allowed { next } else { tat };
    let retry_after = if allowed {
        Duration::ZERO
    } else {
        micros(next - PERIOD_US - now)
    };
    Charge {
        allowed,
        tat: after,
        retry_after,
    }
}

/// The window a bucket at `tat` shows at `now`: what is left and when it is
/// full again.
pub(crate) fn window(tat: f64, now: f64, limit: u64) -> Window {
    let interval = PERIOD_US / limit as f64;
    let used = (tat - now).max(0.0);
    let remaining = ((PERIOD_US - used + EPSILON_US) / interval)
        .floor()
        .max(0.0);
    Window {
        limit,
        remaining: (remaining as u64).min(limit),
        reset: micros(used),
    }
}

/// Moves `tat` by `delta` units (a refund when negative), never before now.
pub(crate) fn adjust(tat: Option<f64>, now: f64, limit: u64, delta: i64) -> f64 {
    let interval = PERIOD_US / limit as f64;
    let tat = tat.map_or(now, |t| t.max(now));
    (tat + delta as f64 * interval).max(now)
}

fn micros(us: f64) -> Duration {
    Duration::from_micros(us.max(0.0).ceil() as u64)
}

/// One tenant's state in the in-process limiter.
#[derive(Debug, Default)]
struct TenantState {
    requests: Option<f64>,
    tokens: Option<f64>,
    in_flight: u64,
}

/// The in-process limiter: exact within this process, blind to others.
#[derive(Debug)]
pub(crate) struct LocalLimiter {
    epoch: Instant,
    tenants: Mutex<HashMap<String, TenantState>>,
}

impl Default for LocalLimiter {
    fn default() -> Self {
        LocalLimiter {
            epoch: Instant::now(),
            tenants: Mutex::new(HashMap::new()),
        }
    }
}

impl LocalLimiter {
    fn now(&self) -> f64 {
        self.epoch.elapsed().as_micros() as f64
    }

    /// Admits or refuses `ask` under `limits` (already scaled for this
    /// replica when falling back).
    pub(crate) fn admit(&self, ask: &Ask<'_>, limits: Limits) -> Verdict {
        let now = self.now();
        let mut tenants = self.tenants.lock().unwrap_or_else(|e| e.into_inner());
        let state = tenants.entry(ask.tenant.to_string()).or_default();
        let requests = (limits.requests_per_minute > 0)
            .then(|| charge(state.requests, now, limits.requests_per_minute, 1));
        let tokens = (limits.tokens_per_minute > 0)
            .then(|| charge(state.tokens, now, limits.tokens_per_minute, ask.tokens));
        let refusal = if limits.tokens_per_minute > 0 && ask.tokens > limits.tokens_per_minute {
            Some(Refusal::TooLarge)
        } else if limits.max_concurrent > 0 && state.in_flight >= limits.max_concurrent {
            Some(Refusal::Concurrency)
        } else if let Some(charge) = requests.filter(|c| !c.allowed) {
            Some(Refusal::Requests(charge.retry_after))
        } else {
            tokens
                .filter(|c| !c.allowed)
                .map(|charge| Refusal::Tokens(charge.retry_after))
        };
        if refusal.is_none() {
            if let Some(charge) = requests {
                state.requests = Some(charge.tat);
            }
            if let Some(charge) = tokens {
                state.tokens = Some(charge.tat);
            }
            state.in_flight += 1;
        }
        // The windows as stored now: a refused request charged nothing.
        let shown = |tat: Option<f64>, limit: u64| {
            (limit > 0).then(|| window(tat.map_or(now, |t| t.max(now)), now, limit))
        };
        Verdict {
            refusal,
            requests: shown(state.requests, limits.requests_per_minute),
            tokens: shown(state.tokens, limits.tokens_per_minute),
        }
    }

    /// Charges `delta` more tokens (fewer when negative).
    pub(crate) fn settle(&self, tenant: &str, limits: Limits, delta: i64) {
        if limits.tokens_per_minute == 0 || delta == 0 {
            return;
        }
        let now = self.now();
        let mut tenants = self.tenants.lock().unwrap_or_else(|e| e.into_inner());
        let state = tenants.entry(tenant.to_string()).or_default();
        state.tokens = Some(adjust(state.tokens, now, limits.tokens_per_minute, delta));
    }

    /// Ends one of the tenant's requests.
    pub(crate) fn release(&self, tenant: &str) {
        let mut tenants = self.tenants.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(state) = tenants.get_mut(tenant) {
            state.in_flight = state.in_flight.saturating_sub(1);
        }
    }

    /// Forgets every bucket (when Redis is back, its state is the truth).
    pub(crate) fn reset(&self) {
        let mut tenants = self.tenants.lock().unwrap_or_else(|e| e.into_inner());
        tenants.retain(|_, state| state.in_flight > 0);
        for state in tenants.values_mut() {
            state.requests = None;
            state.tokens = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: f64 = 1_000_000.0;

    #[test]
    fn a_fresh_bucket_allows_a_burst_of_the_limit_then_one_per_interval() {
        let now = 1_000.0 * SECOND;
        let mut tat = None;
        for left in (0..3).rev() {
            let c = charge(tat, now, 3, 1);
            assert!(c.allowed);
            assert_eq!(window(c.tat, now, 3).remaining, left);
            tat = Some(c.tat);
        }
        let refused = charge(tat, now, 3, 1);
        assert!(!refused.allowed);
        assert_eq!(refused.retry_after, Duration::from_secs(20));
        assert_eq!(window(refused.tat, now, 3).remaining, 0);
        assert_eq!(window(refused.tat, now, 3).reset, Duration::from_secs(60));
        // One interval later, exactly one more fits.
        let later = charge(tat, now + 20.0 * SECOND, 3, 1);
        assert!(later.allowed);
        assert_eq!(window(later.tat, now + 20.0 * SECOND, 3).remaining, 0);
        assert!(!charge(Some(later.tat), now + 20.0 * SECOND, 3, 1).allowed);
    }

    #[test]
    fn limits_that_do_not_divide_a_minute_still_allow_all_of_it() {
        let now = 5.0 * SECOND;
        let mut tat = None;
        for _ in 0..7 {
            let c = charge(tat, now, 7, 1);
            assert!(c.allowed);
            tat = Some(c.tat);
        }
        assert!(!charge(tat, now, 7, 1).allowed);
    }

    #[test]
    fn token_costs_and_refunds_move_the_bucket() {
        let now = 10.0 * SECOND;
        let c = charge(None, now, 1000, 600);
        assert!(c.allowed);
        assert_eq!(window(c.tat, now, 1000).remaining, 400);
        assert_eq!(window(c.tat, now, 1000).reset, Duration::from_secs(36));
        assert!(!charge(Some(c.tat), now, 1000, 500).allowed);
        let refunded = adjust(Some(c.tat), now, 1000, -500);
        assert_eq!(window(refunded, now, 1000).remaining, 900);
        // Refunds never fill the bucket beyond full.
        assert_eq!(adjust(Some(c.tat), now, 1000, -5000), now);
        // Time refills it.
        assert_eq!(window(c.tat, now + 60.0 * SECOND, 1000).remaining, 1000);
    }

    fn ask(tokens: u64) -> Ask<'static> {
        Ask {
            tenant: "t",
            tokens,
            request_id: "r",
            lease: Duration::from_secs(60),
        }
    }

    #[test]
    fn the_local_limiter_checks_every_limit_and_charges_only_when_all_pass() {
        let limiter = LocalLimiter::default();
        let limits = Limits {
            requests_per_minute: 10,
            tokens_per_minute: 100,
            max_concurrent: 2,
        };
        assert!(limiter.admit(&ask(60), limits).refusal.is_none());
        let second = limiter.admit(&ask(60), limits);
        assert!(
            matches!(second.refusal, Some(Refusal::Tokens(_))),
            "{second:?}"
        );
        // The refused request charged nothing.
        let third = limiter.admit(&ask(40), limits);
        assert!(third.refusal.is_none(), "{third:?}");
        assert_eq!(third.requests.unwrap().remaining, 8);
        assert_eq!(third.tokens.unwrap().remaining, 0);
        let full = limiter.admit(&ask(0), limits);
        assert_eq!(full.refusal, Some(Refusal::Concurrency));
        limiter.release("t");
        limiter.settle("t", limits, -50);
        let after = limiter.admit(&ask(50), limits);
        assert!(after.refusal.is_none(), "{after:?}");
        assert_eq!(
            limiter
                .admit(
                    &ask(101),
                    Limits {
                        max_concurrent: 0,
                        ..limits
                    }
                )
                .refusal,
            Some(Refusal::TooLarge)
        );
        let unlimited = limiter.admit(&ask(1_000_000), Limits::default());
        assert!(unlimited.refusal.is_none());
        assert!(unlimited.requests.is_none() && unlimited.tokens.is_none());
    }
}
