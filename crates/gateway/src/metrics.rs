//! The gateway's Prometheus metrics. Names are listed in `docs/metrics.md`.
//!
//! Label values are bounded: `route` is a route template (or a gRPC method),
//! `model` is a model some worker serves or `unknown`, `status` an HTTP
//! status.

use std::sync::LazyLock;
use std::time::{Duration, Instant};

use lmgrid_core::metrics::register;
use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, IntGauge, Opts};

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
