//! The gateway's Prometheus metrics. Names are listed in `docs/metrics.md`.
//!
//! Label values are bounded: `route` is a route template (or a gRPC method),
//! `model` is a model some worker serves or `unknown`, `status` an HTTP
//! status, `worker` the id of a worker in discovery (its series is removed
//! when the worker leaves).

use std::sync::LazyLock;
use std::time::{Duration, Instant};

use lmgrid_core::metrics::register;
use prometheus::{
    HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
};

static REQUESTS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register(
        IntCounterVec::new(
            Opts::new(
                "lmgrid_gateway_requests_total",
                "Requests answered by the gateway, by route, model and HTTP status \
                 (gRPC codes counted as the status they map to).",
            ),
            &["route", "model", "status"],
        )
        .expect("valid metric"),
    )
});

static DURATION: LazyLock<HistogramVec> = LazyLock::new(|| {
    register(
        HistogramVec::new(
            HistogramOpts::new(
                "lmgrid_gateway_request_duration_seconds",
                "Time from a request's arrival to the end of its response, streams included.",
            )
            .buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0, 30.0, 60.0, 120.0, 300.0,
            ]),
            &["route", "model"],
        )
        .expect("valid metric"),
    )
});

static TIME_TO_FIRST_TOKEN: LazyLock<HistogramVec> = LazyLock::new(|| {
    register(
        HistogramVec::new(
            HistogramOpts::new(
                "lmgrid_gateway_time_to_first_token_seconds",
                "Time from a streamed generation's arrival to its first generated text.",
            )
            .buckets(vec![
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
            ]),
            &["model"],
        )
        .expect("valid metric"),
    )
});

static INTER_TOKEN_LATENCY: LazyLock<HistogramVec> = LazyLock::new(|| {
    register(
        HistogramVec::new(
            HistogramOpts::new(
                "lmgrid_gateway_inter_token_latency_seconds",
                "Time between successive pieces of text of a streamed generation.",
            )
            .buckets(vec![
                0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
            ]),
            &["model"],
        )
        .expect("valid metric"),
    )
});

static IN_FLIGHT: LazyLock<IntGauge> = LazyLock::new(|| {
    register(
        IntGauge::new(
            "lmgrid_gateway_in_flight_requests",
            "Requests the gateway is working on, streams included.",
        )
        .expect("valid metric"),
    )
});

static PROMPT_TOKENS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register(
        IntCounterVec::new(
            Opts::new(
                "lmgrid_gateway_prompt_tokens_total",
                "Prompt (input) tokens of the requests served, as the workers counted them.",
            ),
            &["model"],
        )
        .expect("valid metric"),
    )
});

static COMPLETION_TOKENS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register(
        IntCounterVec::new(
            Opts::new(
                "lmgrid_gateway_completion_tokens_total",
                "Generated (output) tokens of the requests served, as the workers counted them.",
            ),
            &["model"],
        )
        .expect("valid metric"),
    )
});

/// Counts one answered request and its duration.
pub(crate) fn request(route: &str, model: &str, status: u16, elapsed: Duration) {
    crate::rate::record();
    REQUESTS
        .with_label_values(&[route, model, &status.to_string()])
        .inc();
    DURATION
        .with_label_values(&[route, model])
        .observe(elapsed.as_secs_f64());
}

/// Counts the tokens of one served request.
pub(crate) fn tokens(model: &str, prompt: u32, completion: u32) {
    PROMPT_TOKENS
        .with_label_values(&[model])
        .inc_by(u64::from(prompt));
    COMPLETION_TOKENS
        .with_label_values(&[model])
        .inc_by(u64::from(completion));
}

/// Holds one request in `lmgrid_gateway_in_flight_requests` until dropped.
#[derive(Debug)]
pub(crate) struct InFlight(());

impl InFlight {
    pub(crate) fn start() -> InFlight {
        IN_FLIGHT.inc();
        InFlight(())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        IN_FLIGHT.dec();
    }
}

/// Times the text of one streamed generation: the first piece against the
/// request's arrival, each later one against the one before.
#[derive(Debug)]
pub(crate) struct TokenClock {
    model: String,
    started: Instant,
    last: Option<Instant>,
}

impl TokenClock {
    pub(crate) fn new(model: String, started: Instant) -> TokenClock {
        TokenClock {
            model,
            started,
            last: None,
        }
    }

    /// Records that a piece of text arrived now.
    pub(crate) fn tick(&mut self) {
        let now = Instant::now();
        match self.last {
            None => TIME_TO_FIRST_TOKEN
                .with_label_values(&[&self.model])
                .observe(now.duration_since(self.started).as_secs_f64()),
            Some(last) => INTER_TOKEN_LATENCY
                .with_label_values(&[&self.model])
                .observe(now.duration_since(last).as_secs_f64()),
        }
        self.last = Some(now);
    }
}

// Tenants, admission and usage. The `tenant` label is a tenant that
// authenticated (or `anonymous`), at most `MAX_TENANT_LABELS` distinct ones
// per process and `other` beyond; `model` is bounded as above; `reason` is a
// fixed set.

/// The most distinct `tenant` label values one process exports.
const MAX_TENANT_LABELS: usize = 1000;

static TENANT_LABELS: LazyLock<std::sync::Mutex<std::collections::HashSet<String>>> =
    LazyLock::new(Default::default);

/// The label of `tenant`: its name while the label set has room, else `other`.
fn tenant_label(tenant: &str) -> String {
    let mut labels = TENANT_LABELS.lock().unwrap_or_else(|e| e.into_inner());
    if labels.contains(tenant) {
        return tenant.to_string();
    }
    if labels.len() < MAX_TENANT_LABELS {
        labels.insert(tenant.to_string());
        return tenant.to_string();
    }
    "other".to_string()
}

static TENANT_REQUESTS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register(
        IntCounterVec::new(
            Opts::new(
                "lmgrid_gateway_tenant_requests_total",
                "Admitted requests by tenant and model; outcome is ok or error.",
            ),
            &["tenant", "model", "outcome"],
        )
        .expect("valid metric"),
    )
});

static TENANT_TOKENS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register(
        IntCounterVec::new(
            Opts::new(
                "lmgrid_gateway_tenant_tokens_total",
                "Tokens by tenant and model, as the workers counted them; kind is prompt or completion.",
            ),
            &["tenant", "model", "kind"],
        )
        .expect("valid metric"),
    )
});

static REJECTED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register(
        IntCounterVec::new(
            Opts::new(
                "lmgrid_gateway_rejected_requests_total",
                "Requests refused before reaching a worker, by tenant and reason.",
            ),
            &["tenant", "reason"],
        )
        .expect("valid metric"),
    )
});

static AUTH_FAILURES: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register(
        IntCounterVec::new(
            Opts::new(
                "lmgrid_gateway_auth_failures_total",
                "Requests refused for a missing or invalid API key.",
            ),
            &["reason"],
        )
        .expect("valid metric"),
    )
});

static QUEUE_DEPTH: LazyLock<prometheus::IntGaugeVec> = LazyLock::new(|| {
    register(
        prometheus::IntGaugeVec::new(
            Opts::new(
                "lmgrid_gateway_queue_depth",
                "Requests waiting in a model's admission queue at this gateway.",
            ),
            &["model"],
        )
        .expect("valid metric"),
    )
});

static QUEUE_WAIT: LazyLock<HistogramVec> = LazyLock::new(|| {
    register(
        HistogramVec::new(
            HistogramOpts::new(
                "lmgrid_gateway_queue_wait_seconds",
                "Time requests waited in a model's admission queue.",
            )
            .buckets(vec![
                0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
            ]),
            &["model"],
        )
        .expect("valid metric"),
    )
});

static REDIS_UP: LazyLock<IntGauge> = LazyLock::new(|| {
    register(
        IntGauge::new(
            "lmgrid_gateway_limiter_redis_up",
            "1 while the shared limiter's Redis answers, 0 while this gateway limits on its own.",
        )
        .expect("valid metric"),
    )
});

static LIMITER_FALLBACK: LazyLock<prometheus::IntCounter> = LazyLock::new(|| {
    register(
        prometheus::IntCounter::new(
            "lmgrid_gateway_limiter_fallback_total",
            "Admission decisions made with local limits because Redis did not answer.",
        )
        .expect("valid metric"),
    )
});

static USAGE_WRITE_FAILURES: LazyLock<prometheus::IntCounter> = LazyLock::new(|| {
    register(
        prometheus::IntCounter::new(
            "lmgrid_gateway_usage_write_failures_total",
            "Usage counts that could not be added to Redis (kept in this replica's own counts).",
        )
        .expect("valid metric"),
    )
});

pub(crate) fn tenant_request(tenant: &str, model: &str, failed: bool) {
    let outcome = if failed { "error" } else { "ok" };
    TENANT_REQUESTS
        .with_label_values(&[&tenant_label(tenant), model, outcome])
        .inc();
}

pub(crate) fn tenant_tokens(tenant: &str, model: &str, prompt: u32, completion: u32) {
    let tenant = tenant_label(tenant);
    TENANT_TOKENS
        .with_label_values(&[&tenant, model, "prompt"])
        .inc_by(u64::from(prompt));
    TENANT_TOKENS
        .with_label_values(&[&tenant, model, "completion"])
        .inc_by(u64::from(completion));
}

pub(crate) fn rejected(tenant: &str, reason: &str) {
    REJECTED
        .with_label_values(&[&tenant_label(tenant), reason])
        .inc();
}

pub(crate) fn auth_failure(reason: &str) {
    AUTH_FAILURES.with_label_values(&[reason]).inc();
}

pub(crate) fn queue_depth(model: &str, depth: usize) {
    QUEUE_DEPTH
        .with_label_values(&[model])
        .set(i64::try_from(depth).unwrap_or(i64::MAX));
}

pub(crate) fn queue_wait(model: &str, waited: Duration) {
    QUEUE_WAIT
        .with_label_values(&[model])
        .observe(waited.as_secs_f64());
}

/// `None` when no Redis is configured (the gauge is not exported then).
pub(crate) fn redis_up(up: Option<bool>) {
    if let Some(up) = up {
        REDIS_UP.set(i64::from(up));
    }
}

pub(crate) fn limiter_fallback() {
    LIMITER_FALLBACK.inc();
}

pub(crate) fn usage_write_failed() {
    USAGE_WRITE_FAILURES.inc();
}

// Routing: retries, outlier ejection, outstanding requests per worker.

static RETRIES: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register(
        IntCounterVec::new(
            Opts::new(
                "lmgrid_gateway_retries_total",
                "Attempts retried on another worker, by the failure of the attempt before \
                 (connection, unavailable, attempt_timeout).",
            ),
            &["reason"],
        )
        .expect("valid metric"),
    )
});

static RETRIES_REFUSED: LazyLock<IntCounter> = LazyLock::new(|| {
    register(
        IntCounter::new(
            "lmgrid_gateway_retries_refused_total",
            "Failed attempts that could have been retried but the retry budget was spent.",
        )
        .expect("valid metric"),
    )
});

static EJECTIONS: LazyLock<IntCounter> = LazyLock::new(|| {
    register(
        IntCounter::new(
            "lmgrid_gateway_worker_ejections_total",
            "Workers taken out of rotation after consecutive failures.",
        )
        .expect("valid metric"),
    )
});

static EJECTED: LazyLock<IntGauge> = LazyLock::new(|| {
    register(
        IntGauge::new(
            "lmgrid_gateway_ejected_workers",
            "Workers out of rotation now after consecutive failures.",
        )
        .expect("valid metric"),
    )
});

static OUTSTANDING: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    register(
        IntGaugeVec::new(
            Opts::new(
                "lmgrid_gateway_worker_outstanding_requests",
                "Requests this gateway has outstanding at each worker (by instance id).",
            ),
            &["worker"],
        )
        .expect("valid metric"),
    )
});

/// Counts a retry after a failure of `reason`.
pub(crate) fn retry(reason: &str) {
    RETRIES.with_label_values(&[reason]).inc();
}

/// Counts a retry the budget refused.
pub(crate) fn retry_refused() {
    RETRIES_REFUSED.inc();
}

/// Counts an ejection, and the worker as ejected for `interval`.
pub(crate) fn ejection(interval: Duration) {
    EJECTIONS.inc();
    // The gauge follows the interval; without a runtime (never in the
    // gateway) it is left alone rather than left wrong.
    if let Ok(runtime) = tokio::runtime::Handle::try_current() {
        EJECTED.inc();
        runtime.spawn(async move {
            tokio::time::sleep(interval).await;
            EJECTED.dec();
        });
    }
}

/// The outstanding-requests gauge of the worker `id`.
pub(crate) fn worker_outstanding(id: &str) -> IntGauge {
    OUTSTANDING.with_label_values(&[id])
}

/// Drops the gauges of a worker that left.
pub(crate) fn forget_worker(id: &str) {
    let _ = OUTSTANDING.remove_label_values(&[id]);
}
