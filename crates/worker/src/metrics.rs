//! The worker's Prometheus metrics, per model and version. Names are listed
//! in `docs/metrics.md`.

use std::sync::LazyLock;

use lmgrid_core::metrics::register;
use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
};

const LABELS: &[&str] = &["model", "version"];

fn counter(name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    register(IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric"))
}

fn gauge(name: &str, help: &str) -> IntGaugeVec {
    register(IntGaugeVec::new(Opts::new(name, help), LABELS).expect("valid metric"))
}

fn histogram(name: &str, help: &str, buckets: Vec<f64>) -> HistogramVec {
    register(
        HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), LABELS)
            .expect("valid metric"),
    )
}

fn seconds() -> Vec<f64> {
    vec![
        0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
        5.0, 10.0,
    ]
}

static REQUESTS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter(
        "lmgrid_worker_requests_total",
        "Inference requests by outcome (ok, or the gRPC code name of the failure).",
        &["model", "version", "outcome"],
    )
});
static EXECUTIONS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter(
        "lmgrid_worker_executions_total",
        "Model executions (batches run).",
        LABELS,
    )
});
static QUEUE_SECONDS: LazyLock<HistogramVec> = LazyLock::new(|| {
    histogram(
        "lmgrid_worker_queue_duration_seconds",
        "Time a request waited in the batcher queue.",
        seconds(),
    )
});
static COMPUTE_SECONDS: LazyLock<HistogramVec> = LazyLock::new(|| {
    histogram(
        "lmgrid_worker_compute_duration_seconds",
        "Time one model execution took.",
        seconds(),
    )
});
static REQUEST_SECONDS: LazyLock<HistogramVec> = LazyLock::new(|| {
    histogram(
        "lmgrid_worker_request_duration_seconds",
        "End-to-end time of an inference request in the worker.",
        seconds(),
    )
});
static BATCH_SIZE: LazyLock<HistogramVec> = LazyLock::new(|| {
    histogram(
        "lmgrid_worker_batch_size",
        "Rows (batch dimension) per model execution.",
        vec![1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0],
    )
});
static QUEUE_DEPTH: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    gauge(
        "lmgrid_worker_queue_depth",
        "Requests waiting in the batcher queue.",
    )
});
static IN_FLIGHT: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    gauge(
        "lmgrid_worker_in_flight",
        "Requests being computed or waiting.",
    )
});

/// The metrics of one model version, labelled once.
#[derive(Debug, Clone)]
pub(crate) struct VersionMetrics {
    model: String,
    version: String,
    pub(crate) executions: IntCounter,
    pub(crate) queue_seconds: Histogram,
    pub(crate) compute_seconds: Histogram,
    pub(crate) request_seconds: Histogram,
    pub(crate) batch_size: Histogram,
    pub(crate) queue_depth: IntGauge,
    pub(crate) in_flight: IntGauge,
}

impl VersionMetrics {
    pub(crate) fn new(model: &str, version: &str) -> Self {
        let labels = [model, version];
        VersionMetrics {
            model: model.to_string(),
            version: version.to_string(),
            executions: EXECUTIONS.with_label_values(&labels),
            queue_seconds: QUEUE_SECONDS.with_label_values(&labels),
            compute_seconds: COMPUTE_SECONDS.with_label_values(&labels),
            request_seconds: REQUEST_SECONDS.with_label_values(&labels),
            batch_size: BATCH_SIZE.with_label_values(&labels),
            queue_depth: QUEUE_DEPTH.with_label_values(&labels),
            in_flight: IN_FLIGHT.with_label_values(&labels),
        }
    }

    /// Counts a finished request: `outcome` is "ok" or a gRPC code name.
    pub(crate) fn request(&self, outcome: &str) {
        REQUESTS
            .with_label_values(&[&self.model, &self.version, outcome])
            .inc();
    }

    /// Counts a request by its result and, when `started` is given, observes
    /// its duration (a stream's is unknown when it starts).
    pub(crate) fn answered<T>(
        &self,
        result: &Result<T, tonic::Status>,
        started: Option<std::time::Instant>,
    ) {
        self.request(match result {
            Ok(_) => "ok",
            Err(status) => status.code().description(),
        });
        if let Some(started) = started {
            self.request_seconds
                .observe(started.elapsed().as_secs_f64());
        }
    }
}

static GEN_RUNNING: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    gauge(
        "lmgrid_worker_generation_running_sequences",
        "Sequences in the running batch of a generation model.",
    )
});
static GEN_WAITING: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    gauge(
        "lmgrid_worker_generation_waiting_requests",
        "Generation requests waiting for a slot in the batch.",
    )
});
static GEN_KV_POSITIONS: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    gauge(
        "lmgrid_worker_generation_kv_cache_positions",
        "Token positions allocated in the KV cache (rows × columns, padding and in-place headroom included).",
    )
});
static GEN_PREFIX_POSITIONS: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    gauge(
        "lmgrid_worker_generation_prefix_cache_positions",
        "Token positions the prefix cache holds (within prefix_cache_tokens).",
    )
});
static GEN_PROMPT_TOKENS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter(
        "lmgrid_worker_prompt_tokens_total",
        "Prompt tokens of admitted requests, prefilled or taken from the prefix cache.",
        LABELS,
    )
});
static GEN_PREFIX_TOKENS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter(
        "lmgrid_worker_prefix_cache_tokens_total",
        "Prompt tokens taken from the prefix cache instead of prefilled.",
        LABELS,
    )
});
static GEN_TOKENS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter(
        "lmgrid_worker_generated_tokens_total",
        "Tokens generated.",
        LABELS,
    )
});
static GEN_CANCELLED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter(
        "lmgrid_worker_generation_cancelled_total",
        "Requests and sequences dropped because the caller went away or the deadline passed.",
        LABELS,
    )
});
static GEN_TTFT: LazyLock<HistogramVec> = LazyLock::new(|| {
    histogram(
        "lmgrid_worker_time_to_first_token_seconds",
        "From a generation request's arrival at the scheduler to its first token.",
        seconds(),
    )
});
static GEN_PREFILL: LazyLock<HistogramVec> = LazyLock::new(|| {
    histogram(
        "lmgrid_worker_prefill_duration_seconds",
        "Time to prefill one prompt.",
        seconds(),
    )
});
static GEN_STEP: LazyLock<HistogramVec> = LazyLock::new(|| {
    histogram(
        "lmgrid_worker_decode_step_duration_seconds",
        "Time of one decode step of the whole batch.",
        seconds(),
    )
});
static GEN_REBUILD: LazyLock<HistogramVec> = LazyLock::new(|| {
    histogram(
        "lmgrid_worker_kv_rebuild_duration_seconds",
        "Time to regather the KV cache when sequences join or leave.",
        seconds(),
    )
});
static GEN_STEP_ROWS: LazyLock<HistogramVec> = LazyLock::new(|| {
    histogram(
        "lmgrid_worker_decode_batch_size",
        "Sequences per decode step.",
        vec![1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0],
    )
});

/// The generation metrics of one model version.
#[derive(Debug, Clone)]
pub(crate) struct GenerationMetrics {
    pub(crate) running: IntGauge,
    pub(crate) waiting: IntGauge,
    pub(crate) kv_positions: IntGauge,
    pub(crate) prefix_positions: IntGauge,
    pub(crate) prompt_tokens: IntCounter,
    pub(crate) prefix_cache_tokens: IntCounter,
    pub(crate) generated_tokens: IntCounter,
    pub(crate) cancelled: IntCounter,
    pub(crate) time_to_first_token: Histogram,
    pub(crate) prefill_seconds: Histogram,
    pub(crate) step_seconds: Histogram,
    pub(crate) rebuild_seconds: Histogram,
    pub(crate) step_rows: Histogram,
}

impl GenerationMetrics {
    pub(crate) fn new(model: &str, version: &str) -> Self {
        let labels = [model, version];
        GenerationMetrics {
            running: GEN_RUNNING.with_label_values(&labels),
            waiting: GEN_WAITING.with_label_values(&labels),
            kv_positions: GEN_KV_POSITIONS.with_label_values(&labels),
            prefix_positions: GEN_PREFIX_POSITIONS.with_label_values(&labels),
            prompt_tokens: GEN_PROMPT_TOKENS.with_label_values(&labels),
            prefix_cache_tokens: GEN_PREFIX_TOKENS.with_label_values(&labels),
            generated_tokens: GEN_TOKENS.with_label_values(&labels),
            cancelled: GEN_CANCELLED.with_label_values(&labels),
            time_to_first_token: GEN_TTFT.with_label_values(&labels),
            prefill_seconds: GEN_PREFILL.with_label_values(&labels),
            step_seconds: GEN_STEP.with_label_values(&labels),
            rebuild_seconds: GEN_REBUILD.with_label_values(&labels),
            step_rows: GEN_STEP_ROWS.with_label_values(&labels),
        }
    }
}
