//! Resilient routing at the gateway, against real workers: a worker that crashes under load
//! fails no request; traffic weights and aliases from etcd split and steer requests between
//! versions and change live; a failing worker is ejected, then returns; a lone worker out of
//! reach is UNAVAILABLE, never ejected.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use lmgrid_core::discovery::model_key;
use lmgrid_integration_tests::{SETTLE_TIMEOUT, Sandbox, http_post_json};
use lmgrid_proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use lmgrid_test_support::onnx::{self, ElemType};
use lmgrid_test_support::{EtcdServer, wait_until};
use tempfile::TempDir;
use tonic::Code;
use tonic::transport::Channel;

use crate::inference::{gateway_client, output, request};

const X: [f32; 4] = [1.0, 2.0, 3.0, 4.0];
const DOUBLED: [f32; 4] = [2.0, 4.0, 6.0, 8.0];

/// A repository serving `m` at `version`: the identity (answers x) or the doubler (2x), so
/// every answer tells which worker computed it.
pub(crate) fn repository(version: &str, doubles: bool) -> anyhow::Result<TempDir> {
    let dir = TempDir::new()?;
    let model = if doubles {
        onnx::variable_seq()
    } else {
        onnx::identity(ElemType::Float, &[4])
    };
    onnx::model_repository(dir.path(), "m", &[(version, &model)], "max_batch_size: 8\n")?;
    Ok(dir)
}

/// Keyless callers without limits: these tests send more than an anonymous tenant may.
pub(crate) fn unlimited() -> lmgrid_gateway::AuthConfig {
    let mut auth = lmgrid_gateway::AuthConfig {
        required: false,
        ..Default::default()
    };
    auth.anonymous = lmgrid_gateway::TenantDefaults {
        requests_per_minute: 0,
        tokens_per_minute: 0,
        max_concurrent: 0,
        ..Default::default()
    };
    auth
}

/// The value of a counter or gauge in this process's registry (every series summed).
/// Gateways of tests running beside this one count here too, so tests only look for
/// changes their own actions must cause.
fn metric(name: &str) -> f64 {
    let text = lmgrid_core::metrics::encode().unwrap_or_default();
    text.lines()
        .filter(|line| {
            line.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
        })
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// One unary inference through the gateway's REST API; the output or why it failed.
async fn rest_infer(sandbox: &Sandbox, path: &str) -> anyhow::Result<Vec<f32>> {
    let body =
        r#"{"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}"#;
    let response = http_post_json(sandbox.node("gateway").http_addr(), path, body).await?;
    anyhow::ensure!(
        response.status == 200,
        "{} {}",
        response.status,
        response.body
    );
    let json: serde_json::Value = serde_json::from_str(&response.body)?;
    let data = json["outputs"][0]["data"]
        .as_array()
        .context("no output data")?;
    Ok(data
        .iter()
        .filter_map(|v| v.as_f64())
        .map(|v| v as f32)
        .collect())
}

/// An output, or why the request failed.
type Answer = Result<Vec<f32>, String>;

/// Sends requests in `clients` gRPC loops and one REST loop until `running` turns false;
/// returns every answer, or every failure, as text.
fn load(
    sandbox: &Arc<Sandbox>,
    client: &GrpcInferenceServiceClient<Channel>,
    clients: usize,
    running: &Arc<AtomicBool>,
) -> Vec<tokio::task::JoinHandle<Vec<Answer>>> {
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let (mut client, running) = (client.clone(), running.clone());
        tasks.push(tokio::spawn(async move {
            let mut answers = Vec::new();
            while running.load(Ordering::SeqCst) {
                let result = client.model_infer(request("m", "", 1, X.to_vec())).await;
                answers.push(
                    result
                        .map(|r| output(&r.into_inner()))
                        .map_err(|e| format!("{e:?}")),
                );
            }
            answers
        }));
    }
    let (sandbox, running) = (sandbox.clone(), running.clone());
    tasks.push(tokio::spawn(async move {
        let mut answers = Vec::new();
        while running.load(Ordering::SeqCst) {
            let result = rest_infer(&sandbox, "/v2/models/m/infer").await;
            answers.push(result.map_err(|e| format!("REST: {e:#}")));
        }
        answers
    }));
    tasks
}

/// Waits until requests have reached both workers (x and 2x answers).
async fn until_both_serve(client: &GrpcInferenceServiceClient<Channel>) -> anyhow::Result<()> {
    let (mut first, mut second) = (false, false);
    let deadline = tokio::time::Instant::now() + SETTLE_TIMEOUT;
    while !(first && second) {
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "one worker never answered"
        );
        let response = client
            .clone()
            .model_infer(request("m", "", 1, X.to_vec()))
            .await?;
        let y = output(&response.into_inner());
        first |= y == X;
        second |= y == DOUBLED;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn killing_one_of_two_workers_under_steady_load_fails_no_request() -> anyhow::Result<()> {
    let (first, second) = (repository("1", false)?, repository("1", true)?);
    let etcd = EtcdServer::start().await?;
    let sandbox = Arc::new(
        Sandbox::builder(&etcd)
            .gateway_auth(unlimited())
            .worker_behind_proxy(first.path())
            .worker_with_models(second.path())
            .gateway()
            .build()
            .await?,
    );
    let client = gateway_client(&sandbox, "m").await?;
    until_both_serve(&client).await?;
    let retries = metric("lmgrid_gateway_retries_total");

    let running = Arc::new(AtomicBool::new(true));
    let tasks = load(&sandbox, &client, 4, &running);
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Connections reset, new ones refused, the lease left to run out: a crash.
    sandbox.nodes("worker")[0].crash();
    // Past the lease, so the crashed worker also leaves discovery mid-run.
    let mut members = sandbox.watch("worker").await?;
    tokio::time::timeout(SETTLE_TIMEOUT, members.wait_for(|m| m.len() == 1))
        .await
        .context("the crashed worker never left discovery")??;
    tokio::time::sleep(Duration::from_millis(500)).await;
    running.store(false, Ordering::SeqCst);

    let mut answered = 0;
    for task in tasks {
        for answer in task.await? {
            let y = answer.map_err(|e| anyhow::anyhow!("a request failed: {e}"))?;
            anyhow::ensure!(y == X || y == DOUBLED, "unexpected answer {y:?}");
            answered += 1;
        }
    }
    assert!(answered > 100, "only {answered} requests in the run");
    assert!(
        metric("lmgrid_gateway_retries_total") > retries,
        "requests the crash cut off were retried"
    );
    // Only the survivor answers now.
    for _ in 0..5 {
        let response = client
            .clone()
            .model_infer(request("m", "", 1, X.to_vec()))
            .await?;
        assert_eq!(output(&response.into_inner()), DOUBLED);
    }
    Ok(())
}

/// Sends `n` requests for `m` at `version` and counts the versions that answered.
async fn versions(
    client: &GrpcInferenceServiceClient<Channel>,
    version: &str,
    n: usize,
) -> anyhow::Result<BTreeMap<String, usize>> {
    let mut counts = BTreeMap::new();
    for _ in 0..n {
        let response = client
            .clone()
            .model_infer(request("m", version, 1, X.to_vec()))
            .await?
            .into_inner();
        *counts.entry(response.model_version).or_default() += 1;
    }
    Ok(counts)
}

#[tokio::test(flavor = "multi_thread")]
async fn traffic_weights_and_aliases_from_etcd_steer_versions_live() -> anyhow::Result<()> {
    let (one, two) = (repository("1", false)?, repository("2", true)?);
    let etcd = EtcdServer::start().await?;
    let sandbox = Arc::new(
        Sandbox::builder(&etcd)
            .gateway_auth(unlimited())
            .worker_with_models(one.path())
            .worker_with_models(two.path())
            .gateway()
            .build()
            .await?,
    );
    let client = gateway_client(&sandbox, "m").await?;
    let store = sandbox.discovery().await?;
    let key = model_key(sandbox.prefix(), "m");
    let write = |json: &'static str| {
        let (store, key) = (store.clone(), key.clone());
        async move { store.client().put(&key, json.as_bytes().to_vec(), 0).await }
    };
    write(
        r#"{"aliases": {"stable": "1", "canary": "2"},
            "traffic": [{"version": "1", "weight": 90}, {"version": "2", "weight": 10}]}"#,
    )
    .await?;
    // The gateway follows the record within a watch round trip.
    wait_until(
        SETTLE_TIMEOUT,
        "the gateway to resolve the canary alias",
        || {
            let client = client.clone();
            async move {
                versions(&client, "canary", 1)
                    .await
                    .is_ok_and(|v| v.contains_key("2"))
            }
        },
    )
    .await?;

    // 90/10: version 2 answers ~100 of 1000 (binomial sd ≈ 9.5; the bounds are ±5 sd).
    let split = versions(&client, "", 1000).await?;
    let canary = split.get("2").copied().unwrap_or(0);
    assert_eq!(split.values().sum::<usize>(), 1000);
    assert!(
        (52..=148).contains(&canary),
        "version 2 answered {canary} of 1000: {split:?}"
    );

    // Aliases resolve; exact versions bypass the weights; unknown names are not found.
    assert_eq!(versions(&client, "canary", 20).await?["2"], 20);
    assert_eq!(versions(&client, "stable", 20).await?["1"], 20);
    assert_eq!(versions(&client, "2", 20).await?["2"], 20);
    let status = client
        .clone()
        .model_infer(request("m", "beta", 1, X.to_vec()))
        .await
        .expect_err("an unknown alias");
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    assert_eq!(
        rest_infer(&sandbox, "/v2/models/m/versions/canary/infer").await?,
        DOUBLED
    );
    let response = http_post_json(
        sandbox.node("gateway").http_addr(),
        "/v2/models/m/versions/beta/infer",
        r#"{"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}"#,
    )
    .await?;
    assert_eq!(response.status, 404, "{}", response.body);

    // A new split applies live: everything to version 2.
    write(r#"{"traffic": [{"version": "1", "weight": 0}, {"version": "2", "weight": 1}]}"#).await?;
    wait_until(SETTLE_TIMEOUT, "the new weights to apply", || {
        let client = client.clone();
        async move {
            versions(&client, "", 20)
                .await
                .is_ok_and(|v| v.get("2") == Some(&20))
        }
    })
    .await?;
    // Without a record, any worker serves (the version the worker picks).
    store.client().delete(&key).await?;
    wait_until(SETTLE_TIMEOUT, "both versions to serve again", || {
        let client = client.clone();
        async move { versions(&client, "", 20).await.is_ok_and(|v| v.len() == 2) }
    })
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failing_worker_is_ejected_then_returns() -> anyhow::Result<()> {
    let (first, second) = (repository("1", false)?, repository("1", true)?);
    let mut routing = lmgrid_gateway::RoutingConfig::default();
    routing.ejection.consecutive_failures = 3;
    routing.ejection.base_interval = Duration::from_secs(2);
    let etcd = EtcdServer::start().await?;
    let sandbox = Arc::new(
        Sandbox::builder(&etcd)
            .gateway_routing(routing)
            .gateway_auth(unlimited())
            .worker_behind_proxy(first.path())
            .worker_with_models(second.path())
            .gateway()
            .build()
            .await?,
    );
    let client = gateway_client(&sandbox, "m").await?;
    until_both_serve(&client).await?;
    let worker = sandbox.nodes("worker")[0].clone();
    let proxy = worker.proxy().context("the first worker has a proxy")?;
    let ejections = metric("lmgrid_gateway_worker_ejections_total");

    // The worker stays registered but every connection to it fails: requests are retried
    // on the other, and after three failures in a row it is ejected.
    proxy.cut();
    let deadline = tokio::time::Instant::now() + SETTLE_TIMEOUT;
    while metric("lmgrid_gateway_worker_ejections_total") <= ejections {
        anyhow::ensure!(tokio::time::Instant::now() < deadline, "never ejected");
        let response = client
            .clone()
            .model_infer(request("m", "", 1, X.to_vec()))
            .await?;
        assert_eq!(output(&response.into_inner()), DOUBLED);
    }
    // While ejected, no request goes near it.
    let tried = proxy.connections();
    for _ in 0..20 {
        let response = client
            .clone()
            .model_infer(request("m", "", 1, X.to_vec()))
            .await?;
        assert_eq!(output(&response.into_inner()), DOUBLED);
    }
    assert_eq!(proxy.connections(), tried, "an ejected worker was tried");

    // Healed, it is back in rotation once its ejection ends.
    proxy.heal();
    let deadline = tokio::time::Instant::now() + SETTLE_TIMEOUT;
    loop {
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "the worker never returned"
        );
        let response = client
            .clone()
            .model_infer(request("m", "", 1, X.to_vec()))
            .await?;
        if output(&response.into_inner()) == X {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_lone_worker_out_of_reach_is_unavailable_and_never_ejected() -> anyhow::Result<()> {
    let repo = repository("1", false)?;
    let mut routing = lmgrid_gateway::RoutingConfig::default();
    routing.ejection.consecutive_failures = 1;
    let etcd = EtcdServer::start().await?;
    let sandbox = Arc::new(
        Sandbox::builder(&etcd)
            .gateway_routing(routing)
            .gateway_auth(unlimited())
            .worker_behind_proxy(repo.path())
            .gateway()
            .build()
            .await?,
    );
    let client = gateway_client(&sandbox, "m").await?;
    let worker = sandbox.node("worker");
    let proxy = worker.proxy().context("the worker has a proxy")?;
    proxy.cut();
    // Every attempt fails at the connection: UNAVAILABLE (503 with Retry-After over HTTP),
    // and the worker stays in rotation, since ejecting it would leave the model none.
    for _ in 0..3 {
        let status = client
            .clone()
            .model_infer(request("m", "", 1, X.to_vec()))
            .await
            .expect_err("the worker is out of reach");
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
        assert!(
            status.message().contains("could not be reached"),
            "{status:?}"
        );
    }
    let response = http_post_json(
        sandbox.node("gateway").http_addr(),
        "/v2/models/m/infer",
        r#"{"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}"#,
    )
    .await?;
    assert_eq!(response.status, 503, "{}", response.body);
    assert_eq!(response.header("retry-after"), Some("1"));
    let tried = proxy.connections();
    let _ = client
        .clone()
        .model_infer(request("m", "", 1, X.to_vec()))
        .await;
    assert!(
        proxy.connections() > tried,
        "the lone worker is still tried"
    );
    proxy.heal();
    let response = client
        .clone()
        .model_infer(request("m", "", 1, X.to_vec()))
        .await?;
    assert_eq!(output(&response.into_inner()), X);
    Ok(())
}
