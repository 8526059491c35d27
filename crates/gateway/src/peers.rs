//! The gateway's view of the other services: for each, whether discovery has
//! at least one ready instance. Instances register only once ready and
//! deregister first thing on shutdown, so membership is readiness.
//!
//! The view feeds `grpc.health.v1` on the gateway's (public) gRPC port — the
//! status of `worker` there says whether any worker can take traffic — and,
//! for `require_services`, the gateway's own readiness.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use lmgrid_core::discovery::Discovery;
use lmgrid_core::health::{Latch, Readiness};
use tokio::task::JoinHandle;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

/// The services behind the gateway, by their discovery names.
pub const PEER_SERVICES: [&str; 4] = ["dispatcher", "worker", "model-registry", "notification"];

/// Other names the same services answer to in `grpc.health.v1`: the
/// `lmgrid` subcommands that run them.
const ALIASES: [(&str, &str); 2] = [("model-registry", "registry"), ("notification", "notify")];

/// The running watchers.
#[derive(Debug)]
pub(crate) struct Peers {
    tasks: Vec<JoinHandle<()>>,
}

impl Peers {
    pub(crate) fn stop(self) {
        for task in self.tasks {
            task.abort();
        }
    }
}

/// Starts watching every peer service. Readiness is held back until each
/// service in `required` has a ready instance.
pub(crate) async fn follow(
    discovery: Arc<dyn Discovery>,
    health: HealthReporter,
    readiness: &Readiness,
    required: &[String],
) -> lmgrid_core::Result<Peers> {
    let waiting: BTreeSet<String> = required.iter().cloned().collect();
    let latch = if waiting.is_empty() {
        None
    } else {
        Some(readiness.latch(&format!("services ({})", required.join(", "))))
    };
    let gate = Arc::new(Mutex::new(RequiredGate { waiting, latch }));

    let mut tasks = Vec::new();
    for service in PEER_SERVICES {
        let mut membership = discovery.watch(service).await?;
        let health = health.clone();
        let gate = gate.clone();
        tasks.push(tokio::spawn(async move {
            let mut members = membership.members();
            loop {
                let up = !members.is_empty();
                let status = if up {
                    ServingStatus::Serving
                } else {
                    ServingStatus::NotServing
                };
                for name in names_of(service) {
                    health.set_service_status(name, status).await;
                }
                if up {
                    gate.lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .arrived(service);
                }
                match membership.changed().await {
                    Ok(next) => members = next,
                    Err(_) => return,
                }
            }
        }));
    }
    Ok(Peers { tasks })
}

fn names_of(service: &'static str) -> impl Iterator<Item = &'static str> {
    std::iter::once(service).chain(
        ALIASES
            .iter()
            .filter(move |(s, _)| *s == service)
            .map(|(_, alias)| *alias),
    )
}

/// Releases the readiness latch once every required service was seen up.
/// Readiness is a latch: a required service going away later makes requests
/// to it fail with 503, not the gateway unready.
struct RequiredGate {
    waiting: BTreeSet<String>,
    latch: Option<Latch>,
}

impl RequiredGate {
    fn arrived(&mut self, service: &str) {
        self.waiting.remove(service);
        if self.waiting.is_empty()
            && let Some(latch) = self.latch.take()
        {
            latch.release();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aliases_follow_their_service() {
        assert_eq!(
            names_of("model-registry").collect::<Vec<_>>(),
            ["model-registry", "registry"]
        );
        assert_eq!(
            names_of("notification").collect::<Vec<_>>(),
            ["notification", "notify"]
        );
        assert_eq!(names_of("worker").collect::<Vec<_>>(), ["worker"]);
    }

    #[test]
    fn the_gate_opens_when_every_required_service_arrived() {
        let readiness = Readiness::new();
        let mut gate = RequiredGate {
            waiting: ["worker".to_string(), "dispatcher".to_string()].into(),
            latch: Some(readiness.latch("services")),
        };
        gate.arrived("worker");
        assert!(!readiness.is_ready());
        gate.arrived("worker");
        assert!(!readiness.is_ready());
        gate.arrived("dispatcher");
        assert!(readiness.is_ready());
    }
}
