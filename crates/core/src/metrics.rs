//! Process-wide Prometheus metrics of the core runtime, and the registry that
//! every lmgrid crate registers its own metrics in.
//!
//! One registry per process: in `lmgrid up` every service shares it, and the
//! `service` label tells them apart. Output is the Prometheus text format and
//! passes `promtool check metrics`.

use std::sync::LazyLock;

use prometheus::{Encoder, IntGaugeVec, Opts, Registry, TextEncoder};

/// Content type of the text exposition format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

static REGISTRY: LazyLock<Registry> = LazyLock::new(Registry::new);

/// The registry every crate registers its metrics in.
pub fn registry() -> &'static Registry {
    &REGISTRY
}

/// Registers a collector in the process registry. Metrics are declared once
/// in statics, so a failure here is a programming error (a duplicate name).
pub fn register<C: prometheus::core::Collector + Clone + 'static>(collector: C) -> C {
    REGISTRY
        .register(Box::new(collector.clone()))
        .expect("metric names are unique within the process");
    collector
}

static BUILD_INFO: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    register(
        IntGaugeVec::new(
            Opts::new(
                "lmgrid_build_info",
                "Always 1; labels carry the service and version.",
            ),
            &["service", "version"],
        )
        .expect("valid metric"),
    )
});

static READY: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    register(
        IntGaugeVec::new(
            Opts::new(
                "lmgrid_ready",
                "1 when the instance is ready to serve, else 0.",
            ),
            &["service", "instance"],
        )
        .expect("valid metric"),
    )
});

static REGISTERED: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    register(
        IntGaugeVec::new(
            Opts::new(
                "lmgrid_discovery_registered",
                "1 while the instance is registered in discovery, else 0.",
            ),
            &["service", "instance"],
        )
        .expect("valid metric"),
    )
});

static MEMBERS: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    register(
        IntGaugeVec::new(
            Opts::new(
                "lmgrid_discovery_members",
                "Instances of a service in this process's discovery view.",
            ),
            &["service"],
        )
        .expect("valid metric"),
    )
});

/// Records that a service instance is running this build.
pub fn build_info(service: &str) {
    BUILD_INFO
        .with_label_values(&[service, crate::VERSION])
        .set(1);
}

pub fn ready(service: &str, instance: &str, ready: bool) {
    READY
        .with_label_values(&[service, instance])
        .set(i64::from(ready));
}

pub fn registered(service: &str, instance: &str, registered: bool) {
    REGISTERED
        .with_label_values(&[service, instance])
        .set(i64::from(registered));
}

pub fn discovery_members(service: &str, count: usize) {
    MEMBERS
        .with_label_values(&[service])
        .set(i64::try_from(count).unwrap_or(i64::MAX));
}

/// The whole registry in the text exposition format.
pub fn encode() -> Result<String, prometheus::Error> {
    let mut buffer = Vec::new();
    TextEncoder::new().encode(&REGISTRY.gather(), &mut buffer)?;
    String::from_utf8(buffer).map_err(|e| prometheus::Error::Msg(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_help_type_and_samples() {
        build_info("test-service");
        ready("test-service", "i-1", true);
        let text = encode().unwrap();
        assert!(text.contains("# TYPE lmgrid_build_info gauge"), "{text}");
        assert!(
            text.contains("lmgrid_ready{instance=\"i-1\",service=\"test-service\"} 1"),
            "{text}"
        );
    }
}
