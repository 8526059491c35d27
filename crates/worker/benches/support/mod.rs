//! What the worker benchmarks share: an in-process worker's config, the
//! cache directory of the converted models, percentiles.

// Each benchmark uses its own subset.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use lmgrid_core::discovery::MemoryDiscovery;

/// A worker on a free loopback port serving `repo`, with in-process
/// discovery, no admin server and no drain delay.
pub(crate) fn worker_config(repo: &Path) -> lmgrid_worker::Config {
    lmgrid_worker::Config {
        node: lmgrid_test_support::in_process_node(Arc::new(MemoryDiscovery::new())),
        model_repository: Some(repo.to_path_buf()),
        onnxruntime: Default::default(),
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
