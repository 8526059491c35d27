//! Per-attempt timeouts: a worker that accepts requests and never answers is given up on
//! after `routing.attempt_timeout`, the attempt is cancelled at the worker, the request is
//! retried on a worker that answers, and the stuck worker is ejected after enough of them.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use lmgrid_core::discovery::{Discovery as _, Instance, ServedModel};
use lmgrid_integration_tests::{SETTLE_TIMEOUT, Sandbox};
use lmgrid_proto::inference as oip;
use lmgrid_proto::inference::grpc_inference_service_server::{
    GrpcInferenceService, GrpcInferenceServiceServer,
};
use lmgrid_test_support::{EtcdServer, wait_until};
use tonic::{Request, Response, Status};

use crate::inference::{gateway_client, output, request};
use crate::routing::unlimited;

/// An Open Inference Protocol server that takes every inference and never answers,
/// counting the calls dropped by their callers.
#[derive(Debug, Clone, Default)]
struct Stuck {
    received: Arc<AtomicUsize>,
    cancelled: Arc<AtomicUsize>,
}

struct Cancelled(Arc<AtomicUsize>);

impl Drop for Cancelled {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

#[tonic::async_trait]
impl GrpcInferenceService for Stuck {
    async fn server_live(
        &self,
        _: Request<oip::ServerLiveRequest>,
    ) -> Result<Response<oip::ServerLiveResponse>, Status> {
        Ok(Response::new(oip::ServerLiveResponse { live: true }))
    }

    async fn server_ready(
        &self,
        _: Request<oip::ServerReadyRequest>,
    ) -> Result<Response<oip::ServerReadyResponse>, Status> {
        Ok(Response::new(oip::ServerReadyResponse { ready: true }))
    }

    async fn model_ready(
        &self,
        _: Request<oip::ModelReadyRequest>,
    ) -> Result<Response<oip::ModelReadyResponse>, Status> {
        Ok(Response::new(oip::ModelReadyResponse { ready: true }))
    }

    async fn server_metadata(
        &self,
        _: Request<oip::ServerMetadataRequest>,
    ) -> Result<Response<oip::ServerMetadataResponse>, Status> {
        Err(Status::unimplemented("stuck"))
    }

    async fn model_metadata(
        &self,
        _: Request<oip::ModelMetadataRequest>,
    ) -> Result<Response<oip::ModelMetadataResponse>, Status> {
        Err(Status::unimplemented("stuck"))
    }

    async fn model_infer(
        &self,
        _: Request<oip::ModelInferRequest>,
    ) -> Result<Response<oip::ModelInferResponse>, Status> {
        self.received.fetch_add(1, Ordering::SeqCst);
        let _guard = Cancelled(self.cancelled.clone());
        std::future::pending().await
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stuck_worker_is_given_up_on_per_attempt_retried_around_and_ejected() -> anyhow::Result<()>
{
    let repo = crate::routing::repository("1", true)?;
    let mut routing = lmgrid_gateway::RoutingConfig {
        attempt_timeout: Some(Duration::from_millis(200)),
        ..Default::default()
    };
    routing.ejection.consecutive_failures = 2;
    let etcd = EtcdServer::start().await?;
    let sandbox = Sandbox::builder(&etcd)
        .gateway_routing(routing)
        .gateway_auth(unlimited())
        .worker_with_models(repo.path())
        .gateway()
        .build()
        .await?;
    let client = gateway_client(&sandbox, "m").await?;

    // The stuck worker joins, serving the same model.
    let stuck = Stuck::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let address = listener.local_addr()?;
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(GrpcInferenceServiceServer::new(stuck.clone()))
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
    );
    let _registration = sandbox
        .discovery()
        .await?
        .register(Instance {
            service: "worker".to_string(),
            id: "stuck-worker".to_string(),
            address: address.to_string(),
            version: "test".to_string(),
            zone: None,
            models: vec![ServedModel {
                name: "m".to_string(),
                version: "1".to_string(),
                kind: "tensor".to_string(),
            }],
            load: None,
            metadata: Default::default(),
        })
        .await
        .context("register the stuck worker")?;

    // Requests keep succeeding: one that meets the stuck worker is cancelled there after
    // 200 ms and answered by the other. Two of those in a row eject it.
    let x = vec![1.0, 2.0, 3.0, 4.0];
    let doubled: Vec<f32> = x.iter().map(|v| v * 2.0).collect();
    let deadline = tokio::time::Instant::now() + SETTLE_TIMEOUT;
    while stuck.received.load(Ordering::SeqCst) < 2 {
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "no request reached the stuck worker"
        );
        let response = client
            .clone()
            .model_infer(request("m", "", 1, x.clone()))
            .await?;
        assert_eq!(output(&response.into_inner()), doubled);
    }
    let cancelled = stuck.cancelled.clone();
    wait_until(SETTLE_TIMEOUT, "the stuck attempts to be cancelled", || {
        let cancelled = cancelled.clone();
        async move { cancelled.load(Ordering::SeqCst) >= 2 }
    })
    .await?;
    // Ejected: for its 10 s, nothing more reaches it.
    let received = stuck.received.load(Ordering::SeqCst);
    let started = tokio::time::Instant::now();
    for _ in 0..20 {
        let response = client
            .clone()
            .model_infer(request("m", "", 1, x.clone()))
            .await?;
        assert_eq!(output(&response.into_inner()), doubled);
    }
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "requests waited on the stuck worker"
    );
    assert_eq!(stuck.received.load(Ordering::SeqCst), received);
    Ok(())
}
