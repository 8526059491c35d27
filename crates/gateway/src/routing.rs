//! Choosing a worker for a model: the workers in discovery that serve it,
//! the less loaded of two picked in turn (power of two choices on the load
//! each worker publishes), over a cached channel per worker.
//!
//! This is the routing the Open Inference Protocol needs today; tenants,
//! admission, retries, outlier ejection and traffic weights come with the
//! gateway issue.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use lmgrid_core::discovery::{Instance, Membership};
use lmgrid_core::error::ErrorKind;
use lmgrid_core::telemetry::TraceContextInterceptor;
use lmgrid_proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use lmgrid_proto::lmgrid::v1::embedding_service_client::EmbeddingServiceClient;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Status};

pub(crate) type InferenceClient =
    GrpcInferenceServiceClient<InterceptedService<Channel, TraceContextInterceptor>>;
pub(crate) type EmbeddingClient =
    EmbeddingServiceClient<InterceptedService<Channel, TraceContextInterceptor>>;

/// The workers known to this gateway.
#[derive(Debug)]
pub(crate) struct Workers {
    membership: Membership,
    channels: Mutex<HashMap<String, Channel>>,
    turn: AtomicUsize,
}

impl Workers {
    pub(crate) fn new(membership: Membership) -> Self {
        Workers {
            membership,
            channels: Mutex::new(HashMap::new()),
            turn: AtomicUsize::new(0),
        }
    }

    /// A client for a worker serving `model` (and `version`, if given).
    pub(crate) fn client_for(&self, model: &str, version: &str) -> Result<InferenceClient, Status> {
        let channel = self.channel_for(model, version)?;
        Ok(GrpcInferenceServiceClient::with_interceptor(
            channel,
            TraceContextInterceptor,
        ))
    }

    /// An embedding client for a worker serving `model` (and `version`).
    pub(crate) fn embedding_client_for(
        &self,
        model: &str,
        version: &str,
    ) -> Result<EmbeddingClient, Status> {
        let channel = self.channel_for(model, version)?;
        Ok(EmbeddingServiceClient::with_interceptor(
            channel,
            TraceContextInterceptor,
        ))
    }

    /// The channel to a worker serving `model` (and `version`, if given).
    fn channel_for(&self, model: &str, version: &str) -> Result<Channel, Status> {
        if model.is_empty() {
            return Err(ErrorKind::InvalidArgument.status("model name is empty"));
        }
        let members = self.membership.members();
        if members.is_empty() {
            return Err(ErrorKind::Unavailable.status("no worker is ready; retry later"));
        }
        let candidates: Vec<&Instance> = members
            .values()
            .filter(|w| {
                w.models
                    .iter()
                    .any(|m| m.name == model && (version.is_empty() || m.version == version))
            })
            .collect();
        let chosen = self.choose(&candidates).ok_or_else(|| {
            let what = if version.is_empty() {
                format!("model '{model}'")
            } else {
                format!("model '{model}' version '{version}'")
            };
            ErrorKind::NotFound.status(format!("{what} is not served by any worker"))
        })?;
        self.channel(&chosen.address)
    }

    fn choose<'a>(&self, candidates: &[&'a Instance]) -> Option<&'a Instance> {
        match candidates.len() {
            0 => None,
            1 => Some(candidates[0]),
            n => {
                let turn = self.turn.fetch_add(1, Ordering::Relaxed);
                let first = turn % n;
                // A different second pick, varying with the turn.
                let second = (first + 1 + (turn / n) % (n - 1)) % n;
                let (a, b) = (candidates[first], candidates[second]);
                Some(if load(b) < load(a) { b } else { a })
            }
        }
    }

    fn channel(&self, address: &str) -> Result<Channel, Status> {
        let mut channels = self.channels.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(channel) = channels.get(address) {
            return Ok(channel.clone());
        }
        let channel = Endpoint::from_shared(format!("http://{address}"))
            .map_err(|e| ErrorKind::Internal.status(format!("worker address {address:?}: {e}")))?
            .tcp_nodelay(true)
            .connect_lazy();
        channels.insert(address.to_string(), channel.clone());
        Ok(channel)
    }
}

fn load(worker: &Instance) -> u32 {
    worker
        .load
        .as_ref()
        .map_or(0, |l| l.in_flight.saturating_add(l.queue_depth))
}

/// Forwards the caller's deadline: what remains of it bounds the upstream call.
pub(crate) fn forward<T>(message: T, deadline: Option<Instant>) -> Result<Request<T>, Status> {
    let mut request = Request::new(message);
    if let Some(deadline) = deadline {
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            return Err(ErrorKind::DeadlineExceeded
                .status("the deadline passed before the request was sent"));
        }
        request.set_timeout(remaining);
    }
    Ok(request)
}

#[cfg(test)]
mod tests {
    use super::*;
    use lmgrid_core::discovery::{Load, ServedModel};

    fn worker(id: &str, models: &[(&str, &str)], busy: u32) -> Instance {
        Instance {
            service: "worker".into(),
            id: id.into(),
            address: format!("127.0.0.1:{}", 7000 + id.len()),
            version: "test".into(),
            zone: None,
            models: models
                .iter()
                .map(|(n, v)| ServedModel {
                    name: n.to_string(),
                    version: v.to_string(),
                    kind: "tensor".into(),
                })
                .collect(),
            load: Some(Load {
                in_flight: busy,
                ..Load::default()
            }),
            metadata: Default::default(),
        }
    }

    #[test]
    fn two_choices_prefer_the_less_loaded_worker() {
        let discovery = lmgrid_core::discovery::MemoryDiscovery::new();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let membership = rt.block_on(async {
            use lmgrid_core::discovery::Discovery;
            discovery.watch("worker").await.unwrap()
        });
        let workers = Workers::new(membership);
        let idle = worker("a", &[("m", "1")], 0);
        let busy = worker("bb", &[("m", "1")], 50);
        let mut idle_picked = 0;
        for _ in 0..100 {
            if workers.choose(&[&idle, &busy]).unwrap().id == "a" {
                idle_picked += 1;
            }
        }
        assert_eq!(idle_picked, 100, "the idle worker wins every pair it is in");
        assert!(workers.choose(&[]).is_none());
    }
}
