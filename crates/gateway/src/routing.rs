//! Choosing a worker for a model: the workers in discovery that serve it
//! (with the right kind: `embedding` for `Embed`, `generation` for
//! `Generate`), the less loaded of two picked in turn (power of two choices
//! on the load each worker publishes), over a cached channel per worker.
//!
//! Discovery lists an instance only while it is ready, so membership is
//! readiness: the models listed here are the models that can be served now.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use lmgrid_core::discovery::{Instance, Membership};
use lmgrid_core::error::ErrorKind;
use lmgrid_core::telemetry::TraceContextInterceptor;
use lmgrid_proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use lmgrid_proto::lmgrid::v1::embedding_service_client::EmbeddingServiceClient;
use lmgrid_proto::lmgrid::v1::generation_service_client::GenerationServiceClient;
use tonic::Status;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

/// The model kind that serves `Embed`.
pub(crate) const EMBEDDING: &str = "embedding";
/// The model kind that serves `Generate` and `GenerateStream`.
pub(crate) const GENERATION: &str = "generation";

/// The label value for models that no worker serves, so that metric label
/// sets stay bounded by what discovery lists.
pub(crate) const UNKNOWN_MODEL: &str = "unknown";

type Traced = InterceptedService<Channel, TraceContextInterceptor>;
pub(crate) type InferenceClient = GrpcInferenceServiceClient<Traced>;
pub(crate) type EmbeddingClient = EmbeddingServiceClient<Traced>;
pub(crate) type GenerationClient = GenerationServiceClient<Traced>;

/// Why no worker can take a request for a model.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum RouteError {
    #[error("model name is empty")]
    EmptyName,
    #[error("no worker is ready; retry later")]
    NoWorkers,
    #[error("{} is not served by any worker", describe(model, version))]
    NotServed { model: String, version: String },
    #[error("model '{model}' serves {}, not {wanted}", served.join(" and "))]
    WrongKind {
        model: String,
        /// The kinds the model is served as.
        served: Vec<String>,
        wanted: &'static str,
    },
    #[error("worker address {address:?}: {message}")]
    BadAddress { address: String, message: String },
}

fn describe(model: &str, version: &str) -> String {
    if version.is_empty() {
        format!("model '{model}'")
    } else {
        format!("model '{model}' version '{version}'")
    }
}

impl RouteError {
    pub(crate) fn kind(&self) -> ErrorKind {
        match self {
            RouteError::EmptyName | RouteError::WrongKind { .. } => ErrorKind::InvalidArgument,
            RouteError::NoWorkers => ErrorKind::Unavailable,
            RouteError::NotServed { .. } => ErrorKind::NotFound,
            RouteError::BadAddress { .. } => ErrorKind::Internal,
        }
    }
}

impl From<RouteError> for Status {
    fn from(error: RouteError) -> Status {
        error.kind().status(error.to_string())
    }
}

/// A model as the ready workers serve it, for listings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ModelEntry {
    pub(crate) name: String,
    pub(crate) versions: BTreeSet<String>,
    pub(crate) kinds: BTreeSet<String>,
}

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

    /// An Open Inference Protocol client for a worker serving `model` (and
    /// `version`, if given), whatever its kind.
    pub(crate) fn client_for(
        &self,
        model: &str,
        version: &str,
    ) -> Result<InferenceClient, RouteError> {
        let channel = self.channel_for(model, version, None)?;
        Ok(GrpcInferenceServiceClient::with_interceptor(
            channel,
            TraceContextInterceptor,
        ))
    }

    /// An embedding client for a worker serving `model` as an embedding model.
    pub(crate) fn embedding_client_for(
        &self,
        model: &str,
        version: &str,
    ) -> Result<EmbeddingClient, RouteError> {
        let channel = self.channel_for(model, version, Some(EMBEDDING))?;
        Ok(EmbeddingServiceClient::with_interceptor(
            channel,
            TraceContextInterceptor,
        ))
    }

    /// A generation client for a worker serving `model` as a generation model.
    pub(crate) fn generation_client_for(
        &self,
        model: &str,
        version: &str,
    ) -> Result<GenerationClient, RouteError> {
        let channel = self.channel_for(model, version, Some(GENERATION))?;
        Ok(GenerationServiceClient::with_interceptor(
            channel,
            TraceContextInterceptor,
        ))
    }

    /// Every model some ready worker serves, by name.
    pub(crate) fn models(&self) -> Vec<ModelEntry> {
        let members = self.membership.members();
        let mut models: BTreeMap<&str, ModelEntry> = BTreeMap::new();
        for served in members.values().flat_map(|w| &w.models) {
            let entry = models
                .entry(served.name.as_str())
                .or_insert_with(|| ModelEntry {
                    name: served.name.clone(),
                    versions: BTreeSet::new(),
                    kinds: BTreeSet::new(),
                });
            entry.versions.insert(served.version.clone());
            entry.kinds.insert(served.kind.clone());
        }
        models.into_values().collect()
    }

    /// Whether any worker is ready.
    pub(crate) fn any_ready(&self) -> bool {
        !self.membership.members().is_empty()
    }

    /// The metric label for `model`: its name when a ready worker serves it,
    /// else [`UNKNOWN_MODEL`], so that clients cannot grow label sets.
    pub(crate) fn label(&self, model: &str) -> String {
        let members = self.membership.members();
        let served = members
            .values()
            .any(|w| w.models.iter().any(|m| m.name == model));
        if served {
            model.to_string()
        } else {
            UNKNOWN_MODEL.to_string()
        }
    }

    /// The channel to a worker serving `model` (and `version`, if given) as
    /// `kind` (if given).
    fn channel_for(
        &self,
        model: &str,
        version: &str,
        kind: Option<&'static str>,
    ) -> Result<Channel, RouteError> {
        if model.is_empty() {
            return Err(RouteError::EmptyName);
        }
        let members = self.membership.members();
        if members.is_empty() {
            return Err(RouteError::NoWorkers);
        }
        let serves = |w: &Instance, kind: Option<&str>| {
            w.models.iter().any(|m| {
                m.name == model
                    && (version.is_empty() || m.version == version)
                    && kind.is_none_or(|k| m.kind == k)
            })
        };
        let candidates: Vec<&Instance> = members.values().filter(|w| serves(w, kind)).collect();
        let Some(chosen) = self.choose(&candidates) else {
            let served: BTreeSet<String> = members
                .values()
                .flat_map(|w| &w.models)
                .filter(|m| m.name == model && (version.is_empty() || m.version == version))
                .map(|m| m.kind.clone())
                .collect();
            return Err(match kind {
                Some(wanted) if !served.is_empty() => RouteError::WrongKind {
                    model: model.to_string(),
                    served: served.into_iter().collect(),
                    wanted,
                },
                _ => RouteError::NotServed {
                    model: model.to_string(),
                    version: version.to_string(),
                },
            });
        };
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

    fn channel(&self, address: &str) -> Result<Channel, RouteError> {
        let mut channels = self.channels.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(channel) = channels.get(address) {
            return Ok(channel.clone());
        }
        let channel = Endpoint::from_shared(format!("http://{address}"))
            .map_err(|e| RouteError::BadAddress {
                address: address.to_string(),
                message: e.to_string(),
            })?
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

#[cfg(test)]
mod tests {
    use super::*;
    use lmgrid_core::discovery::{Discovery, Load, MemoryDiscovery, ServedModel};

    fn worker(id: &str, models: &[(&str, &str, &str)], busy: u32) -> Instance {
        Instance {
            service: "worker".into(),
            id: id.into(),
            address: format!("127.0.0.1:{}", 7000 + id.len()),
            version: "test".into(),
            zone: None,
            models: models
                .iter()
                .map(|(n, v, k)| ServedModel {
                    name: n.to_string(),
                    version: v.to_string(),
                    kind: k.to_string(),
                })
                .collect(),
            load: Some(Load {
                in_flight: busy,
                ..Load::default()
            }),
            metadata: Default::default(),
        }
    }

    /// Workers over an in-memory discovery holding `instances`, and the
    /// registrations that keep them listed.
    async fn workers_with(
        instances: Vec<Instance>,
    ) -> (Workers, Vec<Box<dyn lmgrid_core::discovery::Registration>>) {
        let discovery = MemoryDiscovery::new();
        let mut registrations = Vec::new();
        for instance in instances {
            registrations.push(discovery.register(instance).await.unwrap());
        }
        let membership = discovery.watch("worker").await.unwrap();
        (Workers::new(membership), registrations)
    }

    #[tokio::test]
    async fn two_choices_prefer_the_less_loaded_worker() {
        let (workers, _held) = workers_with(Vec::new()).await;
        let idle = worker("a", &[("m", "1", "tensor")], 0);
        let busy = worker("bb", &[("m", "1", "tensor")], 50);
        let mut idle_picked = 0;
        for _ in 0..100 {
            if workers.choose(&[&idle, &busy]).unwrap().id == "a" {
                idle_picked += 1;
            }
        }
        assert_eq!(idle_picked, 100, "the idle worker wins every pair it is in");
        assert!(workers.choose(&[]).is_none());
    }

    #[tokio::test]
    async fn routing_tells_unknown_models_from_models_of_another_kind() {
        let (workers, _held) = workers_with(vec![worker(
            "a",
            &[("minilm", "1", EMBEDDING), ("llm", "1", GENERATION)],
            0,
        )])
        .await;
        assert!(workers.embedding_client_for("minilm", "").is_ok());
        assert!(workers.generation_client_for("llm", "1").is_ok());
        assert!(workers.client_for("llm", "").is_ok());
        let wrong = workers.generation_client_for("minilm", "").unwrap_err();
        assert_eq!(
            wrong,
            RouteError::WrongKind {
                model: "minilm".into(),
                served: vec![EMBEDDING.into()],
                wanted: GENERATION,
            }
        );
        assert_eq!(
            wrong.to_string(),
            "model 'minilm' serves embedding, not generation"
        );
        assert_eq!(wrong.kind(), ErrorKind::InvalidArgument);
        let missing = workers.generation_client_for("nope", "").unwrap_err();
        assert_eq!(missing.kind(), ErrorKind::NotFound);
        assert_eq!(
            missing.to_string(),
            "model 'nope' is not served by any worker"
        );
        let version = workers.embedding_client_for("minilm", "2").unwrap_err();
        assert_eq!(
            version.to_string(),
            "model 'minilm' version '2' is not served by any worker"
        );
        assert_eq!(
            workers.client_for("", "").unwrap_err(),
            RouteError::EmptyName
        );
        assert_eq!(workers.label("llm"), "llm");
        assert_eq!(workers.label("made-up"), UNKNOWN_MODEL);
        let names: Vec<String> = workers.models().into_iter().map(|m| m.name).collect();
        assert_eq!(names, ["llm", "minilm"]);
    }

    #[tokio::test]
    async fn without_workers_routing_is_unavailable() {
        let (workers, _held) = workers_with(Vec::new()).await;
        let error = workers.generation_client_for("llm", "").unwrap_err();
        assert_eq!(error, RouteError::NoWorkers);
        assert_eq!(Status::from(error).code(), tonic::Code::Unavailable);
        assert!(!workers.any_ready());
    }
}
