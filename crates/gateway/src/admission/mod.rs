//! Admission: whether a tenant's request may go to a worker now.
//!
//! Three limits per tenant — requests per minute, tokens per minute (prompt
//! plus completion) and requests in flight — are checked together, in Redis
//! when configured (so they hold across replicas), else in process. Tokens
//! are reserved at admission (an estimate of the prompt plus `max_tokens`)
//! and settled with the worker's count when the response ends; a request
//! that never reached a worker gets its reservation back. Then the request
//! takes a slot in its model's bounded queue ([`queue`]).
//!
//! When Redis does not answer, admission fails open: each replica limits on
//! its own to its share of each limit (the limit divided by the gateways in
//! discovery), says so in its log and metrics, and tries Redis again after
//! `retry_interval`.

pub(crate) mod config;
mod gcra;
pub(crate) mod queue;
pub(crate) mod redis;
mod reply;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lmgrid_core::discovery::Membership;

use self::gcra::LocalLimiter;
use self::queue::{QueueError, Queues, Slot};
use self::redis::RedisLimiter;
pub(crate) use self::reply::{estimate_tokens, rate_headers};
use crate::auth::{Limits, Tenant};
use crate::metrics;

/// What one request asks of its tenant's limits.
#[derive(Debug, Clone)]
pub(crate) struct Ask<'a> {
    pub(crate) tenant: &'a str,
    /// Tokens to reserve.
    pub(crate) tokens: u64,
    pub(crate) request_id: &'a str,
    /// How long the request may hold a concurrency slot if its gateway dies.
    pub(crate) lease: Duration,
}

/// Where one of a tenant's limits stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Window {
    pub(crate) limit: u64,
    pub(crate) remaining: u64,
    /// Until the limit is wholly available again.
    pub(crate) reset: Duration,
}

/// Why a request was refused by the limiter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// Requests per minute; retry after this long.
    Requests(Duration),
    /// Tokens per minute; retry after this long.
    Tokens(Duration),
    /// Requests in flight.
    Concurrency,
    /// The request alone needs more tokens than a minute's limit.
    TooLarge,
}

/// The limiter's answer, with the windows for the `x-ratelimit-*` headers
/// (none for unlimited limits).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Verdict {
    pub(crate) refusal: Option<Refusal>,
    pub(crate) requests: Option<Window>,
    pub(crate) tokens: Option<Window>,
}

/// The rate-limit windows a response reports.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct RateWindows {
    pub(crate) requests: Option<Window>,
    pub(crate) tokens: Option<Window>,
}

/// Why a request was not admitted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Rejection {
    Limited {
        refusal: Refusal,
        limits: Limits,
        windows: RateWindows,
        tokens: u64,
    },
    Queue(QueueError),
}

/// Which limiter admitted a request, so that it settles with the same one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Backend {
    Shared,
    Local,
}

/// Admission for one gateway. Cloning shares it.
#[derive(Debug, Clone)]
pub(crate) struct Admission(Arc<Inner>);

#[derive(Debug)]
struct Inner {
    shared: Option<RedisLimiter>,
    local: LocalLimiter,
    /// While Redis is considered down: when to try it again.
    down_until: Mutex<Option<Instant>>,
    retry_interval: Duration,
    /// The gateways in discovery, whose number divides local limits.
    gateways: Option<Membership>,
    queues: Arc<Queues>,
}

impl Admission {
    pub(crate) fn new(
        shared: Option<RedisLimiter>,
        retry_interval: Duration,
        gateways: Option<Membership>,
        queues: Queues,
    ) -> Admission {
        metrics::redis_up(shared.as_ref().map(|_| true));
        Admission(Arc::new(Inner {
            shared,
            local: LocalLimiter::default(),
            down_until: Mutex::new(None),
            retry_interval,
            gateways,
            queues: Arc::new(queues),
        }))
    }

    /// Admits a request of `tenant` for the model labelled `model`, due by
    /// `deadline`, reserving `tokens`.
    pub(crate) async fn admit(
        &self,
        tenant: &Tenant,
        model: &str,
        tokens: u64,
        request_id: &str,
        deadline: Instant,
    ) -> Result<Ticket, Rejection> {
        let limits = tenant.limits;
        let ask = Ask {
            tenant: &tenant.name,
            tokens,
            request_id,
            lease: deadline
                .saturating_duration_since(Instant::now())
                .saturating_add(Duration::from_secs(5)),
        };
        let (verdict, backend, applied) = self.limit(&ask, limits).await;
        let windows = RateWindows {
            requests: verdict.requests,
            tokens: verdict.tokens,
        };
        if let Some(refusal) = verdict.refusal {
            return Err(Rejection::Limited {
                refusal,
                limits: applied,
                windows,
                tokens,
            });
        }
        let mut ticket = Ticket {
            admission: self.clone(),
            tenant: tenant.name.clone(),
            limits,
            request_id: request_id.to_string(),
            backend,
            reserved: tokens,
            settled: AtomicBool::new(false),
            started: AtomicBool::new(false),
            windows,
            slot: None,
        };
        match self
            .0
            .queues
            .acquire(model, &tenant.name, tenant.priority, deadline)
            .await
        {
            Ok(slot) => {
                ticket.slot = slot;
                Ok(ticket)
            }
            // Dropping the ticket gives back what it reserved.
            Err(error) => Err(Rejection::Queue(error)),
        }
    }

    /// Checks the limits in Redis, or locally when Redis is not configured
    /// or not answering; also returns the limits applied (this replica's
    /// share, locally).
    async fn limit(&self, ask: &Ask<'_>, limits: Limits) -> (Verdict, Backend, Limits) {
        if let Some(shared) = self.shared_now() {
            match shared.admit(ask, limits).await {
                Ok(verdict) => {
                    self.redis_answered();
                    return (verdict, Backend::Shared, limits);
                }
                Err(error) => self.redis_failed(&error.to_string()),
            }
        }
        if self.0.shared.is_some() {
            metrics::limiter_fallback();
        }
        let local = self.local_limits(limits);
        (self.0.local.admit(ask, local), Backend::Local, local)
    }

    /// The shared limiter, unless it is resting after a failure.
    fn shared_now(&self) -> Option<&RedisLimiter> {
        let shared = self.0.shared.as_ref()?;
        let down_until = *self.0.down_until.lock().unwrap_or_else(|e| e.into_inner());
        match down_until {
            Some(until) if Instant::now() < until => None,
            _ => Some(shared),
        }
    }

    fn redis_answered(&self) {
        let mut down_until = self.0.down_until.lock().unwrap_or_else(|e| e.into_inner());
        if down_until.take().is_some() {
            tracing::info!("redis answers again; limits are shared across gateways again");
            metrics::redis_up(Some(true));
            self.0.local.reset();
        }
    }

    fn redis_failed(&self, error: &str) {
        let mut down_until = self.0.down_until.lock().unwrap_or_else(|e| e.into_inner());
        if down_until.is_none() {
            tracing::warn!(
                error,
                "redis is unreachable; admitting with this gateway's share of each limit until it answers"
            );
            metrics::redis_up(Some(false));
        }
        *down_until = Some(Instant::now() + self.0.retry_interval);
    }

    /// This replica's share of `limits`: each divided by the gateways in
    /// discovery (at least 1 where the limit is set).
    fn local_limits(&self, limits: Limits) -> Limits {
        let replicas = self
            .0
            .gateways
            .as_ref()
            .map_or(1, |m| m.members().len().max(1)) as u64;
        let share = |limit: u64| {
            if limit == 0 {
                0
            } else {
                (limit / replicas).max(1)
            }
        };
        Limits {
            requests_per_minute: share(limits.requests_per_minute),
            tokens_per_minute: share(limits.tokens_per_minute),
            max_concurrent: share(limits.max_concurrent),
        }
    }

    fn settle(&self, backend: Backend, tenant: String, limits: Limits, delta: i64) {
        match (backend, &self.0.shared) {
            (Backend::Shared, Some(shared)) => {
                let shared = shared.clone();
                spawn(async move {
                    if let Err(error) = shared.settle(&tenant, limits, delta).await {
                        tracing::debug!(tenant, %error, "settle tokens in redis");
                    }
                });
            }
            _ => self
                .0
                .local
                .settle(&tenant, self.local_limits(limits), delta),
        }
    }

    fn release(&self, backend: Backend, tenant: String, limits: Limits, request_id: String) {
        match (backend, &self.0.shared) {
            (Backend::Shared, Some(shared)) if limits.max_concurrent > 0 => {
                let shared = shared.clone();
                spawn(async move {
                    // On failure the entry expires with its lease.
                    if let Err(error) = shared.release(&tenant, &request_id).await {
                        tracing::debug!(tenant, %error, "release a concurrency slot in redis");
                    }
                });
            }
            (Backend::Shared, _) => {}
            (Backend::Local, _) => self.0.local.release(&tenant),
        }
    }
}

/// Runs `task` on the current runtime, if there is one (there always is
/// while requests are served).
fn spawn(task: impl Future<Output = ()> + Send + 'static) {
    if let Ok(runtime) = tokio::runtime::Handle::try_current() {
        runtime.spawn(task);
    }
}

/// An admitted request. Dropping it ends the request: its concurrency and
/// queue slots are released, and tokens reserved by a request that never
/// reached a worker are given back.
#[derive(Debug)]
pub(crate) struct Ticket {
    admission: Admission,
    tenant: String,
    limits: Limits,
    request_id: String,
    backend: Backend,
    reserved: u64,
    settled: AtomicBool,
    started: AtomicBool,
    windows: RateWindows,
    slot: Option<Slot>,
}

impl Ticket {
    /// The rate-limit windows after admission.
    pub(crate) fn windows(&self) -> RateWindows {
        self.windows
    }

    /// The request went to a worker: from now on its reservation stands
    /// unless settled.
    pub(crate) fn started(&self) {
        self.started.store(true, Ordering::Relaxed);
    }

    /// Charges what the worker counted instead of what was reserved (once).
    pub(crate) fn settle(&self, tokens: u64) {
        if self.settled.swap(true, Ordering::Relaxed) {
            return;
        }
        let delta = i64::try_from(tokens).unwrap_or(i64::MAX)
            - i64::try_from(self.reserved).unwrap_or(i64::MAX);
        self.admission
            .settle(self.backend, self.tenant.clone(), self.limits, delta);
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let settled = self.settled.load(Ordering::Relaxed);
        let started = self.started.load(Ordering::Relaxed);
        if !settled && !started && self.reserved > 0 {
            let refund = -i64::try_from(self.reserved).unwrap_or(i64::MAX);
            self.admission
                .settle(self.backend, self.tenant.clone(), self.limits, refund);
        }
        self.admission.release(
            self.backend,
            std::mem::take(&mut self.tenant),
            self.limits,
            std::mem::take(&mut self.request_id),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tenant(limits: Limits) -> Tenant {
        Tenant {
            name: "t".into(),
            limits,
            priority: Default::default(),
            allowed_models: vec![],
            keys: vec![],
            created: 0,
            revision: 0,
        }
    }

    #[tokio::test]
    async fn tickets_release_and_refund_when_dropped() {
        let admission = Admission::new(
            None,
            Duration::from_secs(1),
            None,
            Queues::new(0, 0, Duration::ZERO),
        );
        let limits = Limits {
            requests_per_minute: 0,
            tokens_per_minute: 100,
            max_concurrent: 1,
        };
        let far = Instant::now() + Duration::from_secs(30);
        let t = tenant(limits);
        let ticket = admission.admit(&t, "m", 80, "r1", far).await.unwrap();
        assert_eq!(ticket.windows().tokens.unwrap().remaining, 20);
        let busy = admission.admit(&t, "m", 1, "r2", far).await.unwrap_err();
        assert_eq!(busy.reason(), "concurrency");
        drop(ticket);
        // Never started: the 80 tokens came back.
        let second = admission.admit(&t, "m", 90, "r3", far).await.unwrap();
        second.started();
        second.settle(10);
        drop(second);
        let third = admission.admit(&t, "m", 85, "r4", far).await.unwrap();
        assert_eq!(third.windows().tokens.unwrap().remaining, 5);
        drop(third);
        let started = {
            let ticket = admission.admit(&t, "m", 0, "r5", far).await.unwrap();
            ticket.started();
            ticket
        };
        drop(started);
        assert_eq!(
            admission
                .admit(&t, "m", 101, "r6", far)
                .await
                .unwrap_err()
                .reason(),
            "request_too_large"
        );
    }
}
