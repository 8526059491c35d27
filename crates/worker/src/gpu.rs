//! GPU utilisation and memory of the devices this worker's models run on,
//! sampled from `nvidia-smi` (shipped with the NVIDIA driver on every GPU
//! node) while any model runs on CUDA. Cluster autoscaling reads
//! `DCGM_FI_DEV_GPU_UTIL` from the DCGM exporter; these gauges put the same
//! facts next to the worker's own metrics and in `GetStats`.

use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use lmgrid_core::metrics::register;
use prometheus::{GaugeVec, IntGaugeVec, Opts};

use crate::models::ModelManager;

static UTILIZATION: LazyLock<GaugeVec> = LazyLock::new(|| {
    register(
        GaugeVec::new(
            Opts::new(
                "lmgrid_worker_gpu_utilization_ratio",
                "GPU utilisation (0 to 1) of a device in use.",
            ),
            &["device"],
        )
        .expect("valid metric"),
    )
});
static MEMORY_USED: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    register(
        IntGaugeVec::new(
            Opts::new(
                "lmgrid_worker_gpu_memory_used_bytes",
                "GPU memory in use on a device in use.",
            ),
            &["device"],
        )
        .expect("valid metric"),
    )
});
static MEMORY_TOTAL: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    register(
        IntGaugeVec::new(
            Opts::new(
                "lmgrid_worker_gpu_memory_total_bytes",
                "GPU memory of a device in use.",
            ),
            &["device"],
        )
        .expect("valid metric"),
    )
});

/// One device's reading.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct GpuSample {
    pub(crate) device: u32,
    /// 0..=1.
    pub(crate) utilization: f64,
    pub(crate) memory_used_bytes: u64,
    pub(crate) memory_total_bytes: u64,
}

/// The latest readings, for `GetStats`.
#[derive(Debug, Clone, Default)]
pub(crate) struct GpuReadings(Arc<Mutex<Vec<GpuSample>>>);

impl GpuReadings {
    pub(crate) fn latest(&self) -> Vec<GpuSample> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// Parses `nvidia-smi --query-gpu=index,utilization.gpu,memory.used,memory.total
/// --format=csv,noheader,nounits` (memory in MiB).
pub(crate) fn parse(output: &str) -> Result<Vec<GpuSample>, String> {
    let mut samples = Vec::new();
    for line in output.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let fields: Vec<&str> = line.split(',').map(str::trim).collect();
        let [index, util, used, total] = fields[..] else {
            return Err(format!("unexpected nvidia-smi line {line:?}"));
        };
        let number = |s: &str| {
            s.parse::<f64>()
                .map_err(|_| format!("unexpected nvidia-smi value {s:?} in {line:?}"))
        };
        let mib = |s: &str| number(s).map(|v| (v * 1024.0 * 1024.0) as u64);
        samples.push(GpuSample {
            device: index
                .parse()
                .map_err(|_| format!("unexpected nvidia-smi index {index:?}"))?,
            utilization: (number(util)? / 100.0).clamp(0.0, 1.0),
            memory_used_bytes: mib(used)?,
            memory_total_bytes: mib(total)?,
        });
    }
    Ok(samples)
}

/// The CUDA devices ready models run on (`cuda:<n>` providers).
fn devices(models: &ModelManager) -> Vec<u32> {
    let mut devices: Vec<u32> = models
        .ready()
        .iter()
        .filter_map(|l| {
            l.provider
                .strip_prefix("cuda:")
                .and_then(|d| d.parse().ok())
        })
        .collect();
    devices.sort_unstable();
    devices.dedup();
    devices
}

/// Samples every 5 s while some model runs on CUDA. If `nvidia-smi` is
/// missing or fails, says so once and keeps trying quietly.
pub(crate) async fn monitor(models: Arc<ModelManager>, readings: GpuReadings) {
    let mut warned = false;
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    loop {
        tick.tick().await;
        let devices = devices(&models);
        if devices.is_empty() {
            continue;
        }
        let output = tokio::time::timeout(
            Duration::from_secs(3),
            tokio::process::Command::new("nvidia-smi")
                .args([
                    "--query-gpu=index,utilization.gpu,memory.used,memory.total",
                    "--format=csv,noheader,nounits",
                ])
                .kill_on_drop(true)
                .output(),
        )
        .await;
        let result = match output {
            Ok(Ok(out)) if out.status.success() => parse(&String::from_utf8_lossy(&out.stdout)),
            Ok(Ok(out)) => Err(format!("nvidia-smi exited with {}", out.status)),
            Ok(Err(e)) => Err(format!("run nvidia-smi: {e}")),
            Err(_) => Err("nvidia-smi did not answer within 3s".to_string()),
        };
        match result {
            Ok(samples) => {
                let used: Vec<GpuSample> = samples
                    .into_iter()
                    .filter(|s| devices.contains(&s.device))
                    .collect();
                for s in &used {
                    let device = s.device.to_string();
                    UTILIZATION.with_label_values(&[&device]).set(s.utilization);
                    MEMORY_USED
                        .with_label_values(&[&device])
                        .set(i64::try_from(s.memory_used_bytes).unwrap_or(i64::MAX));
                    MEMORY_TOTAL
                        .with_label_values(&[&device])
                        .set(i64::try_from(s.memory_total_bytes).unwrap_or(i64::MAX));
                }
                *readings.0.lock().unwrap_or_else(|e| e.into_inner()) = used;
            }
            Err(error) if !warned => {
                tracing::warn!(error, "cannot read GPU utilisation; GPU gauges stay empty");
                warned = true;
            }
            Err(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_nvidia_smi_csv() {
        let samples = parse("0, 37, 1024, 81559\n1, 100, 0, 81559\n").unwrap();
        assert_eq!(samples.len(), 2);
        assert_eq!(samples[0].device, 0);
        assert!((samples[0].utilization - 0.37).abs() < 1e-9);
        assert_eq!(samples[0].memory_used_bytes, 1024 * 1024 * 1024);
        assert_eq!(samples[1].utilization, 1.0);
        assert!(parse("").unwrap().is_empty());
    }

    #[test]
    fn rejects_unexpected_output() {
        assert!(parse("0, 37, 1024").is_err());
        assert!(parse("0, [N/A], 1024, 2048").is_err());
        assert!(parse("x, 1, 2, 3").is_err());
    }
}
