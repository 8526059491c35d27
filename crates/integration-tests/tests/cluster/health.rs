//! Liveness, readiness, metrics and `grpc.health.v1`, as probes and routers see them.

use std::time::Duration;

use lmgrid_integration_tests::{
    Sandbox, Service, ServingStatus, health_status, http_get, wait_for_health, wait_for_http,
};
use lmgrid_proto::service_names;
use lmgrid_test_support::EtcdServer;

#[tokio::test(flavor = "multi_thread")]
async fn a_worker_reports_its_health_truthfully_from_start_to_drain() -> anyhow::Result<()> {
    let etcd = EtcdServer::start().await?;
    let sandbox = Sandbox::builder(&etcd)
        .drain_delay(Duration::from_secs(3))
        .worker()
        .build()
        .await?;
    let worker = sandbox.node("worker");
    let (admin, grpc) = (worker.admin_addr(), worker.grpc_addr());

    let live = http_get(admin, "/livez").await?;
    assert_eq!((live.status, live.body.as_str()), (200, "live\n"));
    // Instances register only once ready, so a registered one says so.
    let ready = http_get(admin, "/readyz").await?;
    assert_eq!((ready.status, ready.body.as_str()), (200, "ready\n"));
    let metrics = http_get(admin, "/metrics").await?;
    assert_eq!(metrics.status, 200);
    assert!(
        metrics
            .header("content-type")
            .is_some_and(|t| t.starts_with("text/plain; version=0.0.4")),
        "{:?}",
        metrics.headers
    );
    let ready_sample = format!(
        "lmgrid_ready{{instance=\"{}\",service=\"worker\"}} 1",
        worker.id()
    );
    assert!(metrics.body.contains(&ready_sample), "{}", metrics.body);

    for name in [
        "",
        "worker",
        service_names::INFERENCE,
        service_names::GENERATION,
        service_names::EMBEDDING,
        service_names::WORKER_CONTROL,
    ] {
        wait_for_health(grpc, name, ServingStatus::Serving).await?;
    }
    let unknown = health_status(grpc, "no.such.Service")
        .await
        .expect_err("an unknown service has no health status");
    let status = unknown
        .downcast_ref::<tonic::Status>()
        .expect("the error is the server's answer");
    assert_eq!(status.code(), tonic::Code::NotFound);

    // Shutdown fails readiness first, while both servers still answer.
    worker.begin_shutdown();
    let draining = wait_for_http(admin, "/readyz", 503).await?;
    assert_eq!(draining.body, "not ready: draining\n");
    wait_for_health(grpc, "", ServingStatus::NotServing).await?;
    assert_eq!(
        health_status(grpc, service_names::INFERENCE).await?,
        ServingStatus::NotServing
    );
    let metrics = http_get(admin, "/metrics").await?;
    let unready_sample = ready_sample.replace("} 1", "} 0");
    assert!(metrics.body.contains(&unready_sample), "{}", metrics.body);
    worker.stopped().await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_gateway_requiring_workers_is_ready_once_one_registers() -> anyhow::Result<()> {
    let etcd = EtcdServer::start().await?;
    let mut sandbox = Sandbox::builder(&etcd).build().await?;
    let gateway = sandbox
        .spawn(Service::Gateway {
            require_services: vec!["worker".to_string()],
        })
        .await?;
    let (admin, grpc) = (gateway.admin_addr(), gateway.grpc_addr());

    // The gateway answers probes at once, but is not ready while no worker is registered.
    wait_for_health(grpc, "worker", ServingStatus::NotServing).await?;
    let unready = http_get(admin, "/readyz").await?;
    assert_eq!(
        (unready.status, unready.body.as_str()),
        (503, "not ready: waiting for services (worker)\n")
    );
    assert_eq!(health_status(grpc, "").await?, ServingStatus::NotServing);
    assert!(sandbox.watch("gateway").await?.members().is_empty());

    let worker = sandbox.start(Service::Worker).await?;
    wait_for_http(admin, "/readyz", 200).await?;
    wait_for_health(grpc, "", ServingStatus::Serving).await?;
    wait_for_health(grpc, "worker", ServingStatus::Serving).await?;
    wait_for_health(grpc, service_names::INFERENCE, ServingStatus::Serving).await?;
    sandbox.wait_registered(&gateway).await?;
    assert_eq!(
        health_status(grpc, "dispatcher").await?,
        ServingStatus::NotServing,
        "no dispatcher was started"
    );

    // The worker's status follows membership both ways; the gateway's own readiness is a
    // latch and stays (requests would fail with 503 instead).
    worker.stop().await?;
    wait_for_health(grpc, "worker", ServingStatus::NotServing).await?;
    assert_eq!(http_get(admin, "/readyz").await?.status, 200);
    sandbox.start(Service::Worker).await?;
    wait_for_health(grpc, "worker", ServingStatus::Serving).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_whole_cluster_comes_up_and_the_gateway_sees_every_service() -> anyhow::Result<()> {
    let etcd = EtcdServer::start().await?;
    let peers: Vec<String> = lmgrid_gateway::PEER_SERVICES
        .iter()
        .map(|s| s.to_string())
        .collect();
    let sandbox = Sandbox::builder(&etcd)
        .worker()
        .dispatcher()
        .registry()
        .notification()
        .service(Service::Gateway {
            require_services: peers,
        })
        .build()
        .await?;

    for node in sandbox.all_nodes() {
        let ready = http_get(node.admin_addr(), "/readyz").await?;
        assert_eq!(ready.status, 200, "{node}: {}", ready.body);
        wait_for_health(node.grpc_addr(), node.service(), ServingStatus::Serving).await?;
    }
    let own_services = [
        ("dispatcher", service_names::JOBS),
        ("model-registry", service_names::REGISTRY),
        ("notification", service_names::NOTIFICATION),
        ("gateway", service_names::JOBS),
    ];
    for (service, grpc_service) in own_services {
        let addr = sandbox.node(service).grpc_addr();
        wait_for_health(addr, grpc_service, ServingStatus::Serving).await?;
    }

    // The gateway reports each peer under its discovery name and its subcommand alias.
    let gateway = sandbox.node("gateway").grpc_addr();
    for name in [
        "",
        "gateway",
        "worker",
        "dispatcher",
        "model-registry",
        "registry",
        "notification",
        "notify",
    ] {
        wait_for_health(gateway, name, ServingStatus::Serving).await?;
    }
    Ok(())
}
