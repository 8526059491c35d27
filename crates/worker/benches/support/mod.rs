//! What the worker benchmarks share: an in-process worker's config, the
//! cache directory of the converted models, percentiles.

// Each benchmark uses its own subset.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use lmgrid_core::discovery::MemoryDiscovery;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// A worker on a free loopback port serving `repo`, with in-process
/// discovery, no admin server and no drain delay.
pub(crate) fn worker_config(repo: &Path) -> lmgrid_worker::Config {
    lmgrid_worker::Config {
        node: lmgrid_test_support::in_process_node(Arc::new(MemoryDiscovery::new())),
        model_repository: Some(repo.to_path_buf()),
        onnxruntime: Default::default(),
    }
}

/// An in-process worker running on the current tokio runtime.
pub(crate) struct RunningWorker {
    pub addr: SocketAddr,
    shutdown: CancellationToken,
    task: JoinHandle<lmgrid_core::Result<()>>,
}

/// Starts a worker on `repo` and waits until every model in `models` has a
/// ready version, at most `patience`.
pub(crate) async fn start_worker(
    repo: &Path,
    models: &[&str],
    patience: Duration,
) -> anyhow::Result<RunningWorker> {
    let shutdown = CancellationToken::new();
    let worker = lmgrid_worker::Worker::start(worker_config(repo)).await?;
    let addr = worker.grpc_addr();
    let table = worker.models();
    let task = tokio::spawn(worker.run(shutdown.clone()));
    let deadline = Instant::now() + patience;
    while models.iter().any(|m| table.resolve(m, "").is_err()) {
        anyhow::ensure!(
            Instant::now() < deadline,
            "{models:?} did not load: {:?}",
            table.statuses()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(RunningWorker {
        addr,
        shutdown,
        task,
    })
}

impl RunningWorker {
    /// Shuts the worker down and waits for it.
    pub(crate) async fn stop(self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        self.task.await??;
        Ok(())
    }
}

/// Where `cargo xtask models` put the converted models.
pub(crate) fn models_dir() -> PathBuf {
    lmgrid_setup::cache_dir()
        .unwrap_or_else(|_| PathBuf::from(".cache/lmgrid"))
        .join("models")
}

/// The `p` quantile of sorted durations, in milliseconds.
pub(crate) fn percentile_ms(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize].as_secs_f64() * 1e3
}
