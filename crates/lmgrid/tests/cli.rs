//! The `lmgrid` binary from the outside, as an operator or Kubernetes runs it: config errors
//! and their exit status, `--help`, discovery and signals of a real `lmgrid worker` process,
//! and a whole `lmgrid up` platform on free ports, serving an ONNX model on its public port.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context as _;
use common::{
    PATIENCE, Running, free_addrs, http_get, lmgrid, promtool_check_metrics, run_service,
    worker_command,
};
use lmgrid_core::config::EtcdConfig;
use lmgrid_core::discovery::{Discovery as _, EtcdDiscovery, Membership};
use lmgrid_proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use lmgrid_proto::inference::model_infer_request::InferInputTensor;
use lmgrid_proto::inference::{InferTensorContents, ModelInferRequest};
use lmgrid_test_support::onnx;
use lmgrid_test_support::{EtcdServer, wait_until};
use tokio::time::Instant;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

/// The subcommands that run one service each.
const SERVICE_SUBCOMMANDS: [&str; 5] = ["gateway", "dispatcher", "worker", "registry", "notify"];

/// Exit status for invalid configuration (EX_USAGE).
const EXIT_CONFIG: i32 = 64;

/// What etcd may add to a lease's TTL before a killed instance's record is gone: it looks for
/// expired leases every half second, then commits the deletion.
const EXPIRY_MARGIN: Duration = Duration::from_secs(2);

/// Asserts that `subcommand` with this config exits 64 naming `key` on stderr.
async fn assert_config_error(
    subcommand: &str,
    yaml: Option<&str>,
    env: &[(&str, &str)],
    key: &str,
) -> anyhow::Result<()> {
    let (status, stderr) = run_service(subcommand, yaml, env).await?;
    let context = format!("lmgrid {subcommand} with {yaml:?} and {env:?}: {stderr}");
    assert_eq!(status.code(), Some(EXIT_CONFIG), "{context}");
    let expected = format!("lmgrid: invalid config at `{key}`: ");
    assert!(stderr.starts_with(&expected), "{context}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn invalid_config_exits_64_and_names_the_key() -> anyhow::Result<()> {
    for subcommand in SERVICE_SUBCOMMANDS {
        let unknown_key = "node:\n  grpc:\n    listen: 127.0.0.1:1\n";
        assert_config_error(subcommand, Some(unknown_key), &[], "node.grpc.listen").await?;
        let wrong_type = "node:\n  admin:\n    enabled: maybe\n";
        assert_config_error(subcommand, Some(wrong_type), &[], "node.admin.enabled").await?;
        let bad_address = "node:\n  grpc:\n    listen_addr: nowhere\n";
        assert_config_error(subcommand, Some(bad_address), &[], "node.grpc.listen_addr").await?;
        let short_ttl = "node:\n  discovery:\n    etcd:\n      lease_ttl: 1s\n";
        let ttl_key = "node.discovery.etcd.lease_ttl";
        assert_config_error(subcommand, Some(short_ttl), &[], ttl_key).await?;
        let unknown_override = [("LMGRID__NODE__NOPE", "1")];
        assert_config_error(subcommand, None, &unknown_override, "node.nope").await?;
        let bad_override = [("LMGRID__NODE__SHUTDOWN__GRACE_PERIOD", "soon")];
        let grace_key = "node.shutdown.grace_period";
        assert_config_error(subcommand, None, &bad_override, grace_key).await?;
    }
    let same_port =
        "node:\n  grpc:\n    listen_addr: 127.0.0.1:7000\nhttp:\n  listen_addr: 127.0.0.1:7000\n";
    assert_config_error("gateway", Some(same_port), &[], "http.listen_addr").await?;
    let unknown_peer = "require_services: [billing]\n";
    assert_config_error("gateway", Some(unknown_peer), &[], "require_services").await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_missing_or_malformed_config_file_exits_64() -> anyhow::Result<()> {
    for subcommand in ["worker", "gateway"] {
        let dir = tempfile::tempdir()?;
        let missing = dir.path().join("missing.yaml");
        let mut running = Running::spawn(
            lmgrid().arg(subcommand).arg("--config").arg(&missing),
            subcommand,
        )?;
        let status = running.exit_status(PATIENCE).await?;
        let stderr = running.stderr();
        assert_eq!(status.code(), Some(EXIT_CONFIG), "{stderr}");
        let expected = format!(
            "invalid config at `{}`: cannot read file",
            missing.display()
        );
        assert!(stderr.contains(&expected), "{stderr}");

        assert_config_error(subcommand, Some("node: [\n"), &[], "<file>").await?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn check_accepts_a_valid_config_without_starting() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("config.yaml");
    let yaml = "node:\n  grpc:\n    listen_addr: 127.0.0.1:7001\n  discovery:\n    etcd:\n      \
                endpoints: [http://127.0.0.1:2379]\n      lease_ttl: 5s\n";
    std::fs::write(&path, yaml)?;
    for subcommand in SERVICE_SUBCOMMANDS {
        let mut running = Running::spawn(
            lmgrid()
                .arg(subcommand)
                .arg("--config")
                .arg(&path)
                .arg("--check"),
            subcommand,
        )?;
        let status = running.exit_status(PATIENCE).await?;
        assert!(status.success(), "{subcommand}: {}", running.stderr());
        assert_eq!(running.stdout(), "config is valid\n", "{subcommand}");
    }
    // A valid environment override passes the check too.
    let mut running = Running::spawn(
        lmgrid()
            .args(["worker", "--check"])
            .env("LMGRID__NODE__DISCOVERY__ETCD__LEASE_TTL", "4s"),
        "worker",
    )?;
    let status = running.exit_status(PATIENCE).await?;
    assert!(status.success(), "{}", running.stderr());
    Ok(())
}

#[test]
fn help_describes_every_subcommand() {
    let output = lmgrid().arg("--help").output().expect("run lmgrid --help");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{output:?}");
    assert!(stdout.contains("Usage: lmgrid"), "{stdout}");
    for subcommand in ["up"].into_iter().chain(SERVICE_SUBCOMMANDS) {
        assert!(
            stdout.contains(subcommand),
            "{subcommand} missing from {stdout}"
        );
        let output = lmgrid()
            .arg(subcommand)
            .arg("--help")
            .output()
            .expect("run lmgrid <subcommand> --help");
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(output.status.success(), "{subcommand}: {output:?}");
        let usage = format!("Usage: lmgrid {subcommand}");
        assert!(stdout.contains(&usage), "{subcommand}: {stdout}");
    }
}

/// Watches the workers under `prefix` over a connection of the test's own.
async fn watch_workers(etcd: &EtcdServer, prefix: &str) -> anyhow::Result<Membership> {
    let config = EtcdConfig {
        endpoints: vec![etcd.endpoint().to_string()],
        prefix: prefix.to_string(),
        ..EtcdConfig::default()
    };
    Ok(EtcdDiscovery::connect(&config)
        .await?
        .watch("worker")
        .await?)
}

/// Waits until `membership` lists `id`, and returns its advertised address.
async fn wait_listed(membership: &mut Membership, id: &str) -> anyhow::Result<String> {
    let members = tokio::time::timeout(
        PATIENCE,
        membership.wait_for(|members| members.contains_key(id)),
    )
    .await
    .with_context(|| format!("{id} not registered after {PATIENCE:?}"))??;
    Ok(members[id].address.clone())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_killed_worker_disappears_within_its_lease_ttl() -> anyhow::Result<()> {
    let etcd = EtcdServer::start().await?;
    let prefix = etcd.unique_prefix("killed_worker");
    let ttl = Duration::from_secs(3);
    let mut worker = worker_command(&etcd, &prefix, "killed", "3s", "0s");
    let mut membership = watch_workers(&etcd, &prefix).await?;
    let mut running = Running::spawn(&mut worker.command, "lmgrid worker")?;
    let address = wait_listed(&mut membership, "killed").await?;
    assert_eq!(address, worker.grpc_addr.to_string());

    // SIGKILL: no deregistration, no revoke; only the lease running out removes the record.
    running.child.kill()?;
    running.child.wait()?;
    let killed_at = Instant::now();
    assert!(membership.members().contains_key("killed"));
    tokio::time::timeout_at(
        killed_at + ttl + EXPIRY_MARGIN,
        membership.wait_for(|members| !members.contains_key("killed")),
    )
    .await
    .with_context(|| {
        format!(
            "the killed worker is still listed {:?} after it was killed",
            killed_at.elapsed()
        )
    })??;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_terminated_worker_deregisters_drains_and_exits_0() -> anyhow::Result<()> {
    let etcd = EtcdServer::start().await?;
    let prefix = etcd.unique_prefix("terminated_worker");
    // A lease far longer than the test's patience for deregistration shows that the record
    // was removed on purpose, not by expiry.
    let ttl = Duration::from_secs(60);
    let mut worker = worker_command(&etcd, &prefix, "terminated", "60s", "3s");
    let mut membership = watch_workers(&etcd, &prefix).await?;
    let mut running = Running::spawn(&mut worker.command, "lmgrid worker")?;
    wait_listed(&mut membership, "terminated").await?;
    let ready = http_get(worker.admin_addr, "/readyz").await?;
    assert_eq!(ready, (200, "ready\n".to_string()));

    running.terminate()?;
    let terminated_at = Instant::now();
    tokio::time::timeout(
        ttl / 2,
        membership.wait_for(|members| !members.contains_key("terminated")),
    )
    .await
    .context("the terminated worker did not deregister")??;
    // Deregistered but draining: still answering, no longer ready.
    let draining = http_get(worker.admin_addr, "/readyz").await?;
    assert_eq!(draining, (503, "not ready: draining\n".to_string()));
    assert_eq!(
        health_status(worker.grpc_addr, "").await?,
        ServingStatus::NotServing
    );

    let status = running.exit_status(PATIENCE).await?;
    assert_eq!(
        status.code(),
        Some(0),
        "exited {status} {:?} after SIGTERM",
        terminated_at.elapsed()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn lmgrid_up_serves_the_whole_platform_and_stops_on_sigterm() -> anyhow::Result<()> {
    let data = tempfile::tempdir()?;
    let data_dir = data.path().join("lmgrid-data");
    let models = data.path().join("models");
    let mlp = onnx::mlp(32, 64, 2, 8, 2024);
    let config = "max_batch_size: 16\ndynamic_batching:\n  max_queue_delay: 2ms\n";
    onnx::model_repository(&models, "mlp", &[("1", &mlp.model)], config)?;
    let [http, grpc] = free_addrs();
    let mut command = lmgrid();
    command
        .arg("up")
        .arg("--data-dir")
        .arg(&data_dir)
        .arg("--http")
        .arg(http.to_string())
        .arg("--grpc")
        .arg(grpc.to_string())
        .arg("--model-repository")
        .arg(&models);
    let mut running = Running::spawn(&mut command, "lmgrid up")?;

    // Ready means every service is up.
    wait_until(PATIENCE, "lmgrid up to be ready", || async {
        matches!(http_get(http, "/readyz").await, Ok((200, _)))
    })
    .await?;
    assert!(
        data_dir.is_dir(),
        "no data directory at {}",
        data_dir.display()
    );
    assert_eq!(http_get(http, "/livez").await?.0, 200);
    for service in [
        "",
        "gateway",
        "dispatcher",
        "worker",
        "model-registry",
        "notification",
        "registry",
        "notify",
    ] {
        wait_until(
            PATIENCE,
            &format!("{service:?} to be SERVING"),
            || async move {
                matches!(
                    health_status(grpc, service).await,
                    Ok(ServingStatus::Serving)
                )
            },
        )
        .await?;
    }

    let (status, metrics) = http_get(http, "/metrics").await?;
    assert_eq!(status, 200);
    assert!(metrics.contains("lmgrid_ready{"), "{metrics}");
    promtool_check_metrics(&metrics)?;

    let (status, body) = http_get(http, "/v1/no-such-route").await?;
    assert_eq!(status, 404, "{body}");
    assert!(body.contains(r#""code":"not_found""#), "{body}");

    // An Open Inference Protocol client on the public gRPC port gets the model's answers.
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{grpc}"))?
        .connect()
        .await?;
    let mut oip = GrpcInferenceServiceClient::new(channel);
    for rows in [1, 3, 16] {
        let x = onnx::random_f32(rows as u64, rows * 32);
        let request = ModelInferRequest {
            model_name: "mlp".to_string(),
            inputs: vec![InferInputTensor {
                name: "x".to_string(),
                datatype: "FP32".to_string(),
                shape: vec![rows as i64, 32],
                contents: Some(InferTensorContents {
                    fp32_contents: x.clone(),
                    ..Default::default()
                }),
                ..Default::default()
            }],
            ..Default::default()
        };
        let response = oip.model_infer(request).await?.into_inner();
        let output = &response.outputs[0];
        assert_eq!(
            (output.name.as_str(), output.datatype.as_str()),
            ("y", "FP32")
        );
        assert_eq!(output.shape, vec![rows as i64, 8]);
        let y = output.contents.clone().unwrap_or_default().fp32_contents;
        let want = mlp.reference(&x);
        assert_eq!(y.len(), want.len());
        for (i, (got, want)) in y.iter().zip(&want).enumerate() {
            assert!(
                (got - want).abs() <= 1e-5,
                "{rows} rows, element {i}: {got} vs {want}"
            );
        }
    }

    running.terminate()?;
    let status = running.exit_status(PATIENCE).await?;
    assert_eq!(status.code(), Some(0), "exited {status} after SIGTERM");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn lmgrid_up_refuses_a_missing_model_repository() -> anyhow::Result<()> {
    let data = tempfile::tempdir()?;
    let missing = data.path().join("no-such-models");
    let [http, grpc] = free_addrs();
    let mut running = Running::spawn(
        lmgrid()
            .arg("up")
            .arg("--data-dir")
            .arg(data.path().join("lmgrid-data"))
            .arg("--http")
            .arg(http.to_string())
            .arg("--grpc")
            .arg(grpc.to_string())
            .arg("--model-repository")
            .arg(&missing),
        "lmgrid up",
    )?;
    let status = running.exit_status(PATIENCE).await?;
    let stderr = running.stderr();
    assert_eq!(status.code(), Some(EXIT_CONFIG), "{stderr}");
    let expected = format!(
        "--model-repository {} is not a directory",
        missing.display()
    );
    assert!(stderr.contains(&expected), "{stderr}");
    Ok(())
}

/// The `grpc.health.v1` status of `service` at `addr`, over a new connection.
async fn health_status(addr: SocketAddr, service: &str) -> anyhow::Result<ServingStatus> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(5))
        .connect()
        .await?;
    let response = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: service.to_string(),
        })
        .await?;
    Ok(response.into_inner().status())
}
