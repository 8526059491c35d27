//! The official OpenAI Python SDK against `lmgrid up` serving the real models: model
//! listing, MiniLM embeddings, SmolLM2 chat (unary and streamed with usage) and completions,
//! and the SDK's error classes for lmgrid's errors. The checks are in `sdk/openai_sdk.py`;
//! this test starts the platform, runs them with the Python of the venv that
//! `cargo xtask deps` builds (`<cache>/venv-sdk`), and then checks the gateway's metrics.
//!
//! Nothing here is skipped: without the venv or the converted models the test fails and says
//! which `cargo xtask` command provides them.

mod common;

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context as _, bail, ensure};
use common::http_get;
use lmgrid_test_support::{free_port, wait_until};

/// The models the script uses, as named in the cache's model repository.
const EMBEDDING_MODEL: &str = "all-minilm-l6-v2";
const GENERATION_MODEL: &str = "smollm2-135m-instruct";

/// How long the platform gets to load the models and become ready.
const START_PATIENCE: Duration = Duration::from_secs(180);

/// How long the script may run.
const SCRIPT_PATIENCE: Duration = Duration::from_secs(600);

/// `LMGRID_CACHE_DIR`, else `~/.cache/lmgrid`, as `cargo xtask` uses it.
fn cache_dir() -> anyhow::Result<PathBuf> {
    if let Some(dir) = std::env::var_os("LMGRID_CACHE_DIR").filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(dir));
    }
    let home = std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .context("neither LMGRID_CACHE_DIR nor HOME is set")?;
    Ok(Path::new(&home).join(".cache").join("lmgrid"))
}

/// `lmgrid up`, killed and reaped on drop; its output goes to files printed when the test
/// fails.
struct Platform {
    child: Child,
    logs: tempfile::TempDir,
}

impl Platform {
    fn logs(&self) -> String {
        let read =
            |name: &str| std::fs::read_to_string(self.logs.path().join(name)).unwrap_or_default();
        format!(
            "--- stdout of lmgrid up ---\n{}--- stderr of lmgrid up ---\n{}",
            read("stdout"),
            read("stderr")
        )
    }
}

impl Drop for Platform {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.logs());
        }
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// Runs `promtool check metrics` on `text`.
fn promtool_check_metrics(text: &str) -> anyhow::Result<()> {
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("run promtool (install it with `cargo xtask deps`)")?;
    promtool
        .stdin
        .take()
        .context("promtool stdin")?
        .write_all(text.as_bytes())?;
    let output = promtool.wait_with_output()?;
    ensure!(
        output.status.success(),
        "promtool check metrics failed: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn the_openai_python_sdk_works_against_lmgrid_up() -> anyhow::Result<()> {
    let cache = cache_dir()?;
    let python = cache.join("venv-sdk/bin/python");
    ensure!(
        python.is_file(),
        "{} is missing: run `cargo xtask deps` to build the OpenAI SDK's venv",
        python.display()
    );
    let models = cache.join("models");
    for model in [EMBEDDING_MODEL, GENERATION_MODEL] {
        let onnx = models.join(model).join("1/model.onnx");
        ensure!(
            onnx.is_file(),
            "{} is missing: run `cargo xtask models` to convert the real models",
            onnx.display()
        );
    }
    // A repository of just the two models the script uses (the cache also holds variants
    // that would only slow the start down).
    let dir = tempfile::tempdir()?;
    let repository = dir.path().join("models");
    std::fs::create_dir(&repository)?;
    for model in [EMBEDDING_MODEL, GENERATION_MODEL] {
        std::os::unix::fs::symlink(models.join(model), repository.join(model))?;
    }

    let http = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let grpc = SocketAddr::from((
        [127, 0, 0, 1],
        std::iter::repeat_with(free_port)
            .find(|&port| port != http.port())
            .context("no second free port")?,
    ));
    let logs = tempfile::tempdir()?;
    let mut command = Command::new(env!("CARGO_BIN_EXE_lmgrid"));
    for (key, _) in std::env::vars_os() {
        if key
            .to_str()
            .is_some_and(|key| key.starts_with("LMGRID") && key != "LMGRID_CACHE_DIR")
        {
            command.env_remove(key);
        }
    }
    command
        .arg("up")
        .arg("--data-dir")
        .arg(dir.path().join("lmgrid-data"))
        .args(["--http", &http.to_string(), "--grpc", &grpc.to_string()])
        .arg("--model-repository")
        .arg(&repository)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(logs.path().join("stdout"))?)
        .stderr(std::fs::File::create(logs.path().join("stderr"))?);
    let child = command.spawn().context("spawn lmgrid up")?;
    let mut platform = Platform { child, logs };

    let ready = wait_until(START_PATIENCE, "lmgrid up to be ready", || async {
        matches!(http_get(http, "/readyz").await, Ok((200, _)))
    })
    .await;
    if let Err(error) = ready {
        bail!("{error:#}\n{}", platform.logs());
    }

    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/sdk/openai_sdk.py");
    let mut run = tokio::process::Command::new(&python);
    run.arg(&script)
        .args(["--base-url", &format!("http://{http}/v1")])
        .args(["--embedding-model", EMBEDDING_MODEL])
        .args(["--generation-model", GENERATION_MODEL])
        .env("PYTHONUNBUFFERED", "1")
        .kill_on_drop(true);
    let output = tokio::time::timeout(SCRIPT_PATIENCE, run.output())
        .await
        .with_context(|| format!("the SDK script ran longer than {SCRIPT_PATIENCE:?}"))?
        .with_context(|| format!("run {} {}", python.display(), script.display()))?;
    let printed = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    println!("{printed}");
    ensure!(
        output.status.success(),
        "the OpenAI SDK checks failed ({}):\n{printed}\n{}",
        output.status,
        platform.logs()
    );

    // What the SDK did shows in the gateway's metrics, in a format Prometheus accepts.
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
    ] {
        ensure!(
            metrics.contains(&needle),
            "{needle} not in the metrics:\n{metrics}"
        );
    }
    // The per-pod request rate for autoscaling counts what the SDK just sent.
    let rate = metrics
        .lines()
        .find_map(|line| line.strip_prefix("lmgrid_gateway_request_rate "))
        .and_then(|value| value.trim().parse::<f64>().ok())
        .context("lmgrid_gateway_request_rate is not in the metrics")?;
    ensure!(
        rate > 0.0,
        "lmgrid_gateway_request_rate is {rate} after the SDK's requests"
    );

    let status = Command::new("kill")
        .arg("-TERM")
        .arg(platform.child.id().to_string())
        .status()?;
    ensure!(status.success(), "kill -TERM failed");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let exit = loop {
        if let Some(exit) = platform.child.try_wait()? {
            break exit;
        }
        ensure!(
            tokio::time::Instant::now() < deadline,
            "lmgrid up did not stop after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    ensure!(
        exit.success(),
        "lmgrid up exited {exit} after SIGTERM\n{}",
        platform.logs()
    );
    Ok(())
}
