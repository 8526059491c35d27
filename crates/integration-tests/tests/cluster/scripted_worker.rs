//! A scripted generation worker: a tonic `GenerationService` of the tests' own, registered in
//! etcd like a worker serving `scripted-llm` (generation) and `scripted-embedder`
//! (embedding). It answers deterministically and records what reached it, so tests can check
//! what the gateway sends and how it shapes the answers.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use lmgrid_core::discovery::{Discovery as _, Instance, Registration, ServedModel};
use lmgrid_integration_tests::Sandbox;
use lmgrid_proto::lmgrid::v1 as pb;
use lmgrid_proto::lmgrid::v1::generation_service_server::{
    GenerationService, GenerationServiceServer,
};
use lmgrid_test_support::EtcdServer;
use tokio_stream::Stream;
use tonic::metadata::MetadataMap;
use tonic::{Request, Response, Status};

use crate::openai::wait_for_models;

/// The answer the scripted worker gives, one word a delta.
pub(crate) const ANSWER: [&str; 7] = ["The", " capital", " of", " France", " is", " Paris", "."];

/// What the scripted worker saw.
#[derive(Debug, Default)]
pub(crate) struct Seen {
    pub(crate) requests: Mutex<Vec<(pb::GenerateRequest, MetadataMap)>>,
    /// Endless streams and never-answered calls dropped: cancelled by the caller.
    pub(crate) cancelled: AtomicUsize,
}

impl Seen {
    pub(crate) fn last(&self) -> (pb::GenerateRequest, MetadataMap) {
        self.requests
            .lock()
            .unwrap()
            .last()
            .cloned()
            .expect("a request reached the worker")
    }
}

#[derive(Debug, Clone)]
struct ScriptedWorker {
    seen: Arc<Seen>,
}

/// The last user text of a request: the prompt, or the last chat message.
fn text_of(request: &pb::GenerateRequest) -> String {
    match &request.input {
        Some(pb::generate_request::Input::Prompt(prompt)) => prompt.clone(),
        Some(pb::generate_request::Input::Chat(chat)) => chat
            .messages
            .last()
            .map(|m| m.content.clone())
            .unwrap_or_default(),
        None => String::new(),
    }
}

pub(crate) fn usage(n: u32) -> pb::Usage {
    pb::Usage {
        prompt_tokens: 9,
        completion_tokens: 7 * n,
        total_tokens: 9 + 7 * n,
    }
}

/// Counts an endless stream as cancelled when it is dropped.
struct CancelGuard {
    seen: Arc<Seen>,
}

impl Drop for CancelGuard {
    fn drop(&mut self) {
        self.seen.cancelled.fetch_add(1, Ordering::SeqCst);
    }
}

type DeltaStream = Pin<Box<dyn Stream<Item = Result<pb::GenerateStreamResponse, Status>> + Send>>;

#[tonic::async_trait]
impl GenerationService for ScriptedWorker {
    type GenerateStreamStream = DeltaStream;

    async fn generate(
        &self,
        request: Request<pb::GenerateRequest>,
    ) -> Result<Response<pb::GenerateResponse>, Status> {
        let metadata = request.metadata().clone();
        let request = request.into_inner();
        self.seen
            .requests
            .lock()
            .unwrap()
            .push((request.clone(), metadata));
        if text_of(&request) == "forever" {
            // Never answers; counted as cancelled when the caller drops it.
            let _guard = CancelGuard {
                seen: self.seen.clone(),
            };
            std::future::pending::<()>().await;
        }
        let n = request.sampling.map_or(1, |s| s.n.max(1));
        Ok(Response::new(pb::GenerateResponse {
            model: request.model.clone(),
            completions: (0..n)
                .map(|index| pb::Completion {
                    index,
                    text: ANSWER.concat(),
                    finish_reason: pb::FinishReason::Stop as i32,
                    ..Default::default()
                })
                .collect(),
            usage: Some(usage(n)),
        }))
    }

    async fn generate_stream(
        &self,
        request: Request<pb::GenerateRequest>,
    ) -> Result<Response<DeltaStream>, Status> {
        let metadata = request.metadata().clone();
        let request = request.into_inner();
        self.seen
            .requests
            .lock()
            .unwrap()
            .push((request.clone(), metadata));
        let delta = |text: &str, finish: pb::FinishReason| pb::GenerateStreamResponse {
            model: request.model.clone(),
            index: 0,
            text_delta: text.to_string(),
            finish_reason: finish as i32,
            ..Default::default()
        };
        let stream: DeltaStream = match text_of(&request).as_str() {
            "refuse" => return Err(Status::invalid_argument("the scripted worker refuses")),
            "forever" => {
                let guard = CancelGuard {
                    seen: self.seen.clone(),
                };
                let tick = delta("tick ", pb::FinishReason::Unspecified);
                Box::pin(futures::stream::unfold(guard, move |guard| {
                    let tick = tick.clone();
                    async move {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        Some((Ok(tick), guard))
                    }
                }))
            }
            "fail midway" => Box::pin(tokio_stream::iter([
                Ok(delta("The", pb::FinishReason::Unspecified)),
                Err(Status::resource_exhausted("the KV cache is full")),
            ])),
            _ => {
                let mut messages: Vec<_> = ANSWER
                    .iter()
                    .map(|word| Ok(delta(word, pb::FinishReason::Unspecified)))
                    .collect();
                let mut last = delta("", pb::FinishReason::Stop);
                last.usage = request.include_usage.then(|| usage(1));
                messages.push(Ok(last));
                Box::pin(tokio_stream::iter(messages))
            }
        };
        Ok(Response::new(stream))
    }
}

/// A sandbox with a gateway, and the scripted worker registered in its etcd serving
/// `scripted-llm` (generation) and `scripted-embedder` (embedding).
pub(crate) struct Setup {
    pub(crate) sandbox: Sandbox,
    pub(crate) http: SocketAddr,
    pub(crate) seen: Arc<Seen>,
    _registration: Box<dyn Registration>,
}

pub(crate) async fn setup(etcd: &EtcdServer) -> anyhow::Result<Setup> {
    let sandbox = Sandbox::builder(etcd).gateway().build().await?;
    let setup = register(sandbox).await?;
    wait_for_models(setup.http, &["scripted-llm"]).await?;
    Ok(setup)
}

/// Registers the scripted worker in `sandbox`'s etcd; `http` is the first gateway's.
pub(crate) async fn register(sandbox: Sandbox) -> anyhow::Result<Setup> {
    let seen = Arc::new(Seen::default());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let address = listener.local_addr()?;
    let service = GenerationServiceServer::new(ScriptedWorker { seen: seen.clone() });
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
    );
    let model = |name: &str, kind: &str| ServedModel {
        name: name.to_string(),
        version: "1".to_string(),
        kind: kind.to_string(),
    };
    let registration = sandbox
        .discovery()
        .await?
        .register(Instance {
            service: "worker".to_string(),
            id: "scripted-worker".to_string(),
            address: address.to_string(),
            version: "test".to_string(),
            zone: None,
            models: vec![
                model("scripted-llm", "generation"),
                model("scripted-embedder", "embedding"),
            ],
            load: None,
            metadata: Default::default(),
        })
        .await
        .context("register the scripted worker")?;
    let http = sandbox.node("gateway").http_addr();
    Ok(Setup {
        sandbox,
        http,
        seen,
        _registration: registration,
    })
}
