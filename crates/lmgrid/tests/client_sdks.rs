//! Client SDKs against lmgrid serving the real models and two tensor fixtures: the official
//! OpenAI Python SDK (model listing, MiniLM embeddings, SmolLM2 chat, unary and streamed with
//! usage, completions, and the SDK's error classes for lmgrid's errors) and Triton's Open
//! Inference Protocol clients (`tritonclient.grpc` and `tritonclient.http`, the latter with its
//! default binary tensors). The checks are in `sdk/`; these tests start the platform two ways
//! — `lmgrid up`, and separate `lmgrid worker` and `lmgrid gateway` processes with real etcd
//! and Redis and API keys required — and run the scripts with the Python of the venv that
//! `cargo xtask deps` builds (`<cache>/venv-sdk`).
//!
//! Nothing here is skipped: without the venv or the converted models a test fails and says
//! which `cargo xtask` command provides them.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, bail, ensure};
use common::{Running, free_addrs, http_get, http_request, lmgrid, promtool_check_metrics};
use lmgrid_test_support::onnx::{self, ElemType};
use lmgrid_test_support::{EtcdServer, RedisServer, wait_until};
use tempfile::TempDir;

/// The real models the OpenAI script uses, as named in the cache's model repository.
const EMBEDDING_MODEL: &str = "all-minilm-l6-v2";
const GENERATION_MODEL: &str = "smollm2-135m-instruct";

/// The tensor fixtures the Open Inference Protocol script uses.
const TENSOR_MODELS: [&str; 3] = ["add_mul", "identity_fp16", "identity_bytes"];

/// How long the platform gets to load the models and become ready.
const START_PATIENCE: Duration = Duration::from_secs(180);

/// How long a script may run.
const SCRIPT_PATIENCE: Duration = Duration::from_secs(600);

/// The admin API's token in the multi-process test.
const ADMIN_TOKEN: &str = "client-sdks-admin-token";

/// The SDKs' Python and a model repository of what the scripts use.
struct Setup {
    python: PathBuf,
    dir: TempDir,
}

impl Setup {
    /// Checks that `cargo xtask deps` and `cargo xtask models` have run, and lays out a
    /// repository of the two real models (links into the cache, which also holds variants
    /// that would only slow the start down) and the tensor fixtures.
    fn new() -> anyhow::Result<Setup> {
        // Where `cargo xtask` and `lmgrid up` keep them.
        let cache = lmgrid_setup::cache_dir()?;
        let python = cache.join("venv-sdk/bin/python");
        ensure!(
            python.is_file(),
            "{} is missing: run `cargo xtask deps` to build the client SDKs' venv",
            python.display()
        );
        let models = cache.join(lmgrid_setup::MODELS_DIR);
        for model in [EMBEDDING_MODEL, GENERATION_MODEL] {
            let onnx = models.join(model).join("1/model.onnx");
            ensure!(
                onnx.is_file(),
                "{} is missing: run `cargo xtask models` to convert the real models",
                onnx.display()
            );
        }
        let dir = tempfile::tempdir()?;
        let repository = dir.path().join("models");
        std::fs::create_dir(&repository)?;
        for model in [EMBEDDING_MODEL, GENERATION_MODEL] {
            std::os::unix::fs::symlink(models.join(model), repository.join(model))?;
        }
        let config = "max_batch_size: 8\n";
        onnx::model_repository(&repository, "add_mul", &[("1", &onnx::add_mul())], config)?;
        let fp16 = onnx::identity(ElemType::Float16, &[3]);
        onnx::model_repository(&repository, "identity_fp16", &[("1", &fp16)], config)?;
        let text = onnx::identity(ElemType::String, &[2]);
        onnx::model_repository(&repository, "identity_bytes", &[("1", &text)], config)?;
        Ok(Setup { python, dir })
    }

    fn repository(&self) -> PathBuf {
        self.dir.path().join("models")
    }

    /// Runs both scripts against a gateway, with `key` when keys are required.
    async fn run_scripts(
        &self,
        http: SocketAddr,
        grpc: SocketAddr,
        key: Option<&str>,
        logs: impl Fn() -> String,
    ) -> anyhow::Result<()> {
        let key_args: Vec<String> = key
            .map(|key| vec!["--api-key".to_string(), key.to_string()])
            .unwrap_or_default();
        let openai = [
            "--base-url".to_string(),
            format!("http://{http}/v1"),
            "--embedding-model".to_string(),
            EMBEDDING_MODEL.to_string(),
            "--generation-model".to_string(),
            GENERATION_MODEL.to_string(),
        ];
        let oip = [
            "--http".to_string(),
            http.to_string(),
            "--grpc".to_string(),
            grpc.to_string(),
        ];
        for (script, args) in [("openai_sdk.py", &openai[..]), ("oip_client.py", &oip[..])] {
            let script = Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("tests/sdk")
                .join(script);
            let mut run = tokio::process::Command::new(&self.python);
            run.arg(&script)
                .args(args)
                .args(&key_args)
                .env("PYTHONUNBUFFERED", "1")
                .kill_on_drop(true);
            let output = tokio::time::timeout(SCRIPT_PATIENCE, run.output())
                .await
                .with_context(|| {
                    format!("{} ran longer than {SCRIPT_PATIENCE:?}", script.display())
                })?
                .with_context(|| format!("run {} {}", self.python.display(), script.display()))?;
            let printed = format!(
                "{}{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
            println!("{printed}");
            ensure!(
                output.status.success(),
                "{} failed ({}):\n{printed}\n{}",
                script.display(),
                output.status,
                logs()
            );
        }
        Ok(())
    }
}

/// A process's output, for failure messages.
fn logs_of(running: &Running, what: &str) -> String {
    format!(
        "--- stdout of {what} ---\n{}--- stderr of {what} ---\n{}",
        running.stdout(),
        running.stderr()
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn the_openai_sdk_and_tritonclient_work_against_lmgrid_up() -> anyhow::Result<()> {
    let setup = Setup::new()?;
    let [http, grpc] = free_addrs();
    let mut command = lmgrid();
    command
        .arg("up")
        .arg("--data-dir")
        .arg(setup.dir.path().join("lmgrid-data"))
        .args(["--http", &http.to_string(), "--grpc", &grpc.to_string()])
        .arg("--model-repository")
        .arg(setup.repository());
    let mut platform = Running::spawn(&mut command, "lmgrid up")?;
    let logs = || logs_of(&platform, "lmgrid up");

    let ready = wait_until(START_PATIENCE, "lmgrid up to be ready", || async {
        matches!(http_get(http, "/readyz").await, Ok((200, _)))
    })
    .await;
    if let Err(error) = ready {
        bail!("{error:#}\n{}", logs());
    }
    setup.run_scripts(http, grpc, None, logs).await?;

    // What the SDKs did shows in the gateway's metrics, in a format Prometheus accepts.
    let (status, metrics) = http_get(http, "/metrics").await?;
    ensure!(status == 200, "/metrics answered {status}");
    promtool_check_metrics(&metrics)?;
    for needle in [
        format!(
            r#"lmgrid_gateway_requests_total{{model="{GENERATION_MODEL}",route="/v1/chat/completions",status="200"}}"#
        ),
        format!(
            r#"lmgrid_gateway_requests_total{{model="{EMBEDDING_MODEL}",route="/v1/embeddings",status="200"}}"#
        ),
        format!(
            r#"lmgrid_gateway_time_to_first_token_seconds_count{{model="{GENERATION_MODEL}"}}"#
        ),
        format!(r#"lmgrid_gateway_completion_tokens_total{{model="{GENERATION_MODEL}"}}"#),
        r#"model="unknown",route="/v1/chat/completions",status="404""#.to_string(),
        r#"lmgrid_gateway_requests_total{model="add_mul",route="/v2/models/{model}/infer",status="200"}"#.to_string(),
    ] {
        ensure!(
            metrics.contains(&needle),
            "{needle} not in the metrics:\n{metrics}"
        );
    }
    // The per-pod request rate for autoscaling counts what the SDKs just sent.
    let rate = metrics
        .lines()
        .find_map(|line| line.strip_prefix("lmgrid_gateway_request_rate "))
        .and_then(|value| value.trim().parse::<f64>().ok())
        .context("lmgrid_gateway_request_rate is not in the metrics")?;
    ensure!(
        rate > 0.0,
        "lmgrid_gateway_request_rate is {rate} after the SDKs' requests"
    );

    platform.terminate()?;
    let exit = platform.exit_status(Duration::from_secs(60)).await?;
    ensure!(
        exit.success(),
        "lmgrid up exited {exit} after SIGTERM\n{}",
        logs_of(&platform, "lmgrid up")
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn the_openai_sdk_and_tritonclient_work_against_a_gateway_and_a_worker_with_etcd_and_redis()
-> anyhow::Result<()> {
    let setup = Setup::new()?;
    let etcd = EtcdServer::start().await?;
    let redis = RedisServer::start().await?;
    let prefix = etcd.unique_prefix("client-sdks");

    let mut worker = common::worker_command(&etcd, &prefix, "sdk-worker", "10s", "0s");
    worker
        .command
        .env("LMGRID__MODEL_REPOSITORY", setup.repository());
    let worker = Running::spawn(&mut worker.command, "lmgrid worker")?;

    let mut gateway = common::gateway_command(&etcd, &prefix, "sdk-gateway");
    gateway
        .command
        .env("LMGRID__AUTH__REQUIRED", "true")
        .env("LMGRID__AUTH__ADMIN_TOKEN", ADMIN_TOKEN)
        .env("LMGRID__ADMISSION__REDIS__URL", redis.url())
        .env(
            "LMGRID__ADMISSION__REDIS__KEY_PREFIX",
            redis.unique_prefix("client-sdks"),
        );
    let (http, grpc, admin) = (gateway.http_addr, gateway.grpc_addr, gateway.admin_addr);
    let gateway = Running::spawn(&mut gateway.command, "lmgrid gateway")?;
    let logs = || {
        format!(
            "{}\n{}",
            logs_of(&gateway, "lmgrid gateway"),
            logs_of(&worker, "lmgrid worker")
        )
    };

    // A tenant and its key, through the admin API.
    let admin_auth = format!("Bearer {ADMIN_TOKEN}");
    let created = std::sync::Mutex::new(None);
    let made = wait_until(
        START_PATIENCE,
        "the admin API to create a tenant",
        || async {
            let answer = http_request(
                admin,
                "POST",
                "/admin/v1/tenants",
                &[
                    ("authorization", &admin_auth),
                    ("content-type", "application/json"),
                ],
                r#"{"name": "sdk-tests"}"#,
            )
            .await;
            match answer {
                Ok((201, body)) => {
                    if let Ok(mut slot) = created.lock() {
                        *slot = Some(body);
                    }
                    true
                }
                _ => false,
            }
        },
    )
    .await;
    if let Err(error) = made {
        bail!("{error:#}\n{}", logs());
    }
    let created = created.into_inner().ok().flatten().unwrap_or_default();
    let created: serde_json::Value = serde_json::from_str(&created)?;
    let key = created["key"]
        .as_str()
        .with_context(|| format!("no key in {created}"))?
        .to_string();
    let auth = format!("Bearer {key}");

    // The worker loads the real models before it registers them.
    let routed = wait_until(
        START_PATIENCE,
        "the gateway to route every model",
        || async {
            let Ok((200, listed)) =
                http_request(http, "GET", "/v1/models", &[("authorization", &auth)], "").await
            else {
                return false;
            };
            [EMBEDDING_MODEL, GENERATION_MODEL]
                .iter()
                .chain(&TENSOR_MODELS)
                .all(|model| listed.contains(&format!("\"{model}\"")))
        },
    )
    .await;
    if let Err(error) = routed {
        bail!("{error:#}\n{}", logs());
    }

    setup.run_scripts(http, grpc, Some(&key), logs).await?;

    // The tenant's usage, counted in Redis where every gateway replica reads it.
    let (status, usage) =
        http_request(http, "GET", "/v1/usage", &[("authorization", &auth)], "").await?;
    ensure!(status == 200, "/v1/usage answered {status}: {usage}");
    let usage: serde_json::Value = serde_json::from_str(&usage)?;
    ensure!(usage["tenant"] == "sdk-tests", "{usage}");
    ensure!(usage["source"] == "shared", "{usage}");
    let requests = usage["totals"]["requests"].as_u64().unwrap_or_default();
    let completion = usage["totals"]["completion_tokens"]
        .as_u64()
        .unwrap_or_default();
    ensure!(requests >= 20 && completion > 0, "{usage}");
    Ok(())
}
