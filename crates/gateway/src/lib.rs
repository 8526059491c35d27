//! The gateway: lmgrid's only public entry.
//!
//! On its public HTTP port it serves the OpenAI-compatible REST API (`/v1`:
//! models, chat completions and completions — unary or streamed as
//! server-sent events — and embeddings) and the Open Inference Protocol's
//! REST API (`/v2`), plus `/livez`, `/readyz`, `/metrics` when
//! `http.serve_admin` is set (as in `lmgrid up`). On its public gRPC port it
//! serves the Open Inference Protocol and `lmgrid.v1` generation and
//! embeddings. Every model request goes to a worker serving the model —
//! chosen from discovery by load, by the model's aliases and traffic weights,
//! and retried on another worker when an attempt fails safely — with the
//! caller's deadline, request id and trace context; `grpc.health.v1` reports
//! whether each other lmgrid service has a ready instance.

mod admin;
mod admission;
mod auth;
mod config;
mod grpc;
mod http;
mod metrics;
mod oip_rest;
mod openai;
mod peers;
mod rate;
mod routing;
mod tenancy;
mod usage;

use std::net::SocketAddr;
use std::sync::Arc;

use lmgrid_core::health::admin_router;
use lmgrid_core::node::{Node, bind_http};
use lmgrid_proto::inference::grpc_inference_service_server::GrpcInferenceServiceServer;
use lmgrid_proto::lmgrid::v1::embedding_service_server::EmbeddingServiceServer;
use lmgrid_proto::lmgrid::v1::generation_service_server::GenerationServiceServer;
use lmgrid_proto::lmgrid::v1::job_service_server::JobServiceServer;
use lmgrid_proto::service_names;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::service::Routes;

pub use admin::admin_token_file;
pub use auth::{Limits, Priority};
pub use config::{AdmissionConfig, AuthConfig, QueueConfig, RedisConfig, TenantDefaults};
pub use config::{
    Config, DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_TOKENS_CAP, DEFAULT_TIMEOUT, HttpConfig,
};
pub use peers::PEER_SERVICES;
pub use routing::config::{
    AffinityConfig, EjectionConfig, RetryConfig, RoutingConfig, StaticModel, StaticWeight,
};

/// The service name in discovery, health and metrics.
pub const SERVICE: &str = "gateway";

/// A started gateway: ports bound, not serving yet.
#[derive(Debug)]
pub struct Gateway {
    node: Node,
    http_listener: TcpListener,
    http_addr: SocketAddr,
    config: Config,
}

impl Gateway {
    pub async fn start(config: Config) -> lmgrid_core::Result<Gateway> {
        let node = Node::start(
            &config.node,
            SERVICE,
            &[
                service_names::INFERENCE,
                service_names::GENERATION,
                service_names::EMBEDDING,
                service_names::JOBS,
            ],
        )
        .await?;
        let http_listener = bind_http("public HTTP", config.http.listen_addr).await?;
        let http_addr = http_listener
            .local_addr()
            .map_err(|source| lmgrid_core::Error::Bind {
                what: "public HTTP",
                addr: config.http.listen_addr,
                source,
            })?;
        Ok(Gateway {
            node,
            http_listener,
            http_addr,
            config,
        })
    }

    pub fn grpc_addr(&self) -> SocketAddr {
        self.node.grpc_addr()
    }

    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.node.admin_addr()
    }

    pub fn id(&self) -> &str {
        self.node.id()
    }

    /// Serves until `shutdown`, then drains.
    pub async fn run(self, shutdown: CancellationToken) -> lmgrid_core::Result<()> {
        let Gateway {
            mut node,
            http_listener,
            http_addr,
            config,
        } = self;
        let readiness = node.readiness().clone();

        let peers = peers::follow(
            node.discovery(),
            node.health_reporter(),
            &readiness,
            &config.require_services,
        )
        .await?;

        let workers = Arc::new(routing::Workers::new(
            node.discovery().watch("worker").await?,
            node.discovery().watch_models().await?,
            &config.routing,
        ));
        let tenancy = tenancy::build(&config, node.discovery()).await?;
        if let Some(routes) = &tenancy.admin {
            node.serve_admin_routes(routes.clone());
        }
        let state = http::AppState {
            workers: workers.clone(),
            readiness: readiness.clone(),
            limits: http::Limits {
                max_body_bytes: config.http.max_body_bytes,
                max_tokens_cap: config.http.max_tokens_cap,
                default_timeout: config.http.default_timeout,
                compress_responses: config.http.compress_responses,
            },
            auth: tenancy.auth.clone(),
            admission: tenancy.admission.clone(),
            usage: tenancy.usage.clone(),
        };
        let mut admin = config
            .http
            .serve_admin
            .then(|| admin_router(readiness.clone()));
        if config.auth.admin_on_public_port
            && let Some(routes) = &tenancy.admin
        {
            admin = Some(admin.unwrap_or_default().merge(routes.clone()));
        }
        tracing::info!(%http_addr, serve_admin = config.http.serve_admin, "public HTTP server listening");
        node.serve_http(http_listener, http::router(state, admin));

        let api = grpc::GatewayApi::new(readiness, workers).with_tenancy(&tenancy);
        let routes = Routes::new(GrpcInferenceServiceServer::new(api.clone()))
            .add_service(GenerationServiceServer::new(api.clone()))
            .add_service(EmbeddingServiceServer::new(api.clone()))
            .add_service(JobServiceServer::new(api));
        let result = node.run(routes, shutdown).await;
        peers.stop();
        result
    }
}

/// Runs a gateway until `shutdown`.
pub async fn run(config: Config, shutdown: CancellationToken) -> lmgrid_core::Result<()> {
    Gateway::start(config).await?.run(shutdown).await
}
