//! `lmgrid_gateway_request_rate`: the requests per second this gateway replica
//! answered over the last minute, computed when scraped. It is the per-pod
//! metric a HorizontalPodAutoscaler scales on (a Pods metric through the
//! Prometheus adapter) without a PromQL `rate()` in the adapter's rules, and
//! it falls to zero on its own when traffic stops.

use std::sync::{Arc, LazyLock, Mutex};
use std::time::Instant;

use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{Gauge, Opts};

/// Seconds the rate is averaged over.
const WINDOW: usize = 60;

/// Requests per second over a sliding window of one-second buckets.
#[derive(Debug)]
struct Window {
    buckets: [u64; WINDOW],
    /// The second (since `origin`) of the newest bucket.
    newest: u64,
}

impl Window {
    fn new() -> Self {
        Window {
            buckets: [0; WINDOW],
            newest: 0,
        }
    }

    /// Moves the window to `now`, clearing the seconds that passed without requests.
    fn advance(&mut self, now: u64) {
        if now <= self.newest {
            return;
        }
        let passed = (now - self.newest).min(WINDOW as u64);
        for step in 1..=passed {
            self.buckets[((self.newest + step) % WINDOW as u64) as usize] = 0;
        }
        self.newest = now;
    }

    fn record(&mut self, now: u64) {
        self.advance(now);
        self.buckets[(now % WINDOW as u64) as usize] += 1;
    }

    /// Requests per second over the window, or over the time since the
    /// start while that is shorter.
    fn rate(&mut self, now: u64) -> f64 {
        self.advance(now);
        let span = (now + 1).min(WINDOW as u64);
        self.buckets.iter().sum::<u64>() as f64 / span as f64
    }
}

#[derive(Debug, Clone)]
struct RequestRate {
    origin: Instant,
    window: Arc<Mutex<Window>>,
    gauge: Gauge,
}

impl RequestRate {
    fn now(&self) -> u64 {
        self.origin.elapsed().as_secs()
    }

    fn window(&self) -> std::sync::MutexGuard<'_, Window> {
        self.window.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Collector for RequestRate {
    fn desc(&self) -> Vec<&Desc> {
        self.gauge.desc()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let rate = self.window().rate(self.now());
        self.gauge.set(rate);
        self.gauge.collect()
    }
}

static RATE: LazyLock<RequestRate> = LazyLock::new(|| {
    lmgrid_core::metrics::register(RequestRate {
        origin: Instant::now(),
        window: Arc::new(Mutex::new(Window::new())),
        gauge: Gauge::with_opts(Opts::new(
            "lmgrid_gateway_request_rate",
            "Requests per second this replica answered over the last minute (for autoscaling).",
        ))
        .expect("valid metric"),
    })
});

/// Counts one answered request.
pub(crate) fn record() {
    let rate = &*RATE;
    let now = rate.now();
    rate.window().record(now);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rate_averages_over_the_window_and_decays_when_idle() {
        let mut window = Window::new();
        for _ in 0..30 {
            window.record(0);
        }
        assert_eq!(window.rate(0), 30.0, "30 requests in the first second");
        for second in 1..60 {
            window.record(second);
        }
        // 30 + 59 requests over 60 seconds.
        assert!((window.rate(59) - 89.0 / 60.0).abs() < 1e-9);
        // Second 0 drops out of the window at second 60.
        assert!((window.rate(60) - 59.0 / 60.0).abs() < 1e-9);
        assert_eq!(window.rate(500), 0.0, "idle for longer than the window");
        window.record(500);
        assert!((window.rate(500) - 1.0 / 60.0).abs() < 1e-9);
    }
}
