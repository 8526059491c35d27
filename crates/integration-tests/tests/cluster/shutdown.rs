//! Graceful shutdown order: fail readiness, deregister, keep accepting for the drain delay,
//! then stop accepting.

use std::time::Duration;

use anyhow::Context as _;
use lmgrid_integration_tests::{
    SETTLE_TIMEOUT, Sandbox, ServingStatus, connect, health_status, http_get,
};
use lmgrid_test_support::{EtcdServer, wait_until};
use tokio::net::TcpStream;

/// Long enough that the checks made right after deregistration land inside the drain even on
/// a busy machine; a router's view of membership lags about as much in a real cluster.
const DRAIN_DELAY: Duration = Duration::from_secs(3);

#[tokio::test(flavor = "multi_thread")]
async fn a_stopping_instance_deregisters_before_it_stops_accepting() -> anyhow::Result<()> {
    let etcd = EtcdServer::start().await?;
    let sandbox = Sandbox::builder(&etcd)
        .drain_delay(DRAIN_DELAY)
        .worker()
        .build()
        .await?;
    let worker = sandbox.node("worker");
    let addr = worker.grpc_addr();
    let mut membership = sandbox.watch("worker").await?;
    assert!(membership.members().contains_key(worker.id()));
    wait_until(SETTLE_TIMEOUT, "the worker to report SERVING", || async {
        matches!(health_status(addr, "").await, Ok(ServingStatus::Serving))
    })
    .await?;

    worker.begin_shutdown();
    tokio::time::timeout(
        SETTLE_TIMEOUT,
        membership.wait_for(|members| !members.contains_key(worker.id())),
    )
    .await
    .context("the worker never deregistered")??;

    // Deregistered, but clients with a stale view must still get through: a new connection
    // is accepted and answered, and says the worker no longer wants traffic.
    assert!(!worker.is_stopped(), "run returned before the drain delay");
    let status = health_status(addr, "")
        .await
        .context("a new connection right after deregistration")?;
    assert_eq!(status, ServingStatus::NotServing);
    assert_eq!(
        health_status(addr, "worker").await?,
        ServingStatus::NotServing
    );
    let ready = http_get(worker.admin_addr(), "/readyz").await?;
    assert_eq!(
        (ready.status, ready.body.as_str()),
        (503, "not ready: draining\n")
    );

    worker.stopped().await?;
    assert!(
        TcpStream::connect(addr).await.is_err(),
        "the gRPC port still accepts after run returned"
    );
    assert!(connect(addr).await.is_err());
    assert!(
        http_get(worker.admin_addr(), "/livez").await.is_err(),
        "the admin port still answers after run returned"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn stopping_one_instance_leaves_the_others_registered() -> anyhow::Result<()> {
    let etcd = EtcdServer::start().await?;
    let sandbox = Sandbox::builder(&etcd).worker().worker().build().await?;
    let workers = sandbox.nodes("worker");
    let (leaving, staying) = (&workers[0], &workers[1]);
    let mut membership = sandbox.watch("worker").await?;

    leaving.stop().await?;
    let members = tokio::time::timeout(
        SETTLE_TIMEOUT,
        membership.wait_for(|members| !members.contains_key(leaving.id())),
    )
    .await
    .context("the stopped worker is still listed")??;
    assert_eq!(
        members.keys().collect::<Vec<_>>(),
        [staying.id()],
        "{members:?}"
    );
    assert_eq!(
        health_status(staying.grpc_addr(), "").await?,
        ServingStatus::Serving
    );
    Ok(())
}
