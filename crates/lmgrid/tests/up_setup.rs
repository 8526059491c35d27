//! `lmgrid up` without `--model-repository`: it serves the model repository of the cache
//! directory, `<cache>/models`. The first-start setup that fills it needs PyPI, so these
//! tests cover the paths around it without the network: `--no-setup` serving a fixture model
//! from a temporary cache directory, a setup that cannot even create its cache directory
//! failing at once, with a message saying how to go on, and models converted by an older
//! converter being converted again rather than served.

use std::fs::File;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use anyhow::{Context as _, bail};
use lmgrid_proto::inference::ModelReadyRequest;
use lmgrid_proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use lmgrid_test_support::{free_port, onnx, wait_until};
use tempfile::TempDir;
use tokio::time::Instant;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

const LMGRID: &str = env!("CARGO_BIN_EXE_lmgrid");

/// How long `lmgrid up` gets to start, answer, or exit; generous for small, busy machines.
const PATIENCE: Duration = Duration::from_secs(30);

/// `lmgrid up` on free ports with `cache` as its cache directory, none of the caller's
/// lmgrid settings, and `data` for its data directory and output.
struct Up {
    child: Child,
    grpc: SocketAddr,
    stderr: PathBuf,
}

impl Up {
    fn spawn(
        data: &Path,
        cache: &Path,
        args: &[&str],
        env: &[(&str, &Path)],
    ) -> anyhow::Result<Up> {
        let [http, grpc] = [0; 2].map(|_| SocketAddr::from(([127, 0, 0, 1], free_port())));
        let stderr = data.join("stderr");
        let mut command = Command::new(LMGRID);
        for (key, _) in std::env::vars_os() {
            if key.to_str().is_some_and(|key| key.starts_with("LMGRID")) {
                command.env_remove(key);
            }
        }
        let child = command
            .arg("up")
            .arg("--data-dir")
            .arg(data.join("lmgrid-data"))
            .args(["--http", &http.to_string(), "--grpc", &grpc.to_string()])
            .args(args)
            .env("LMGRID_CACHE_DIR", cache)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(File::create(data.join("stdout"))?)
            .stderr(File::create(&stderr)?)
            .spawn()
            .context("spawn lmgrid up")?;
        Ok(Up {
            child,
            grpc,
            stderr,
        })
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Waits for the process to exit, at most [`PATIENCE`].
    async fn exit_status(&mut self) -> anyhow::Result<ExitStatus> {
        let deadline = Instant::now() + PATIENCE;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        bail!("lmgrid up still running after {PATIENCE:?}")
    }

    async fn grpc(&self) -> anyhow::Result<tonic::transport::Channel> {
        Ok(
            tonic::transport::Endpoint::from_shared(format!("http://{}", self.grpc))?
                .connect_timeout(Duration::from_secs(5))
                .timeout(Duration::from_secs(5))
                .connect()
                .await?,
        )
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- stderr of lmgrid up ---\n{}", self.stderr());
        }
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// ONNX Runtime's library as this test process finds it: `ORT_DYLIB_PATH`, else the one
/// `cargo xtask deps` installed into the cache directory.
fn onnxruntime_library() -> anyhow::Result<PathBuf> {
    if let Some(path) = std::env::var_os("ORT_DYLIB_PATH").filter(|path| !path.is_empty()) {
        return Ok(PathBuf::from(path));
    }
    let library = lmgrid_setup::cache_dir()?.join(lmgrid_setup::ORT_LIBRARY_PATH);
    anyhow::ensure!(
        library.is_file(),
        "no ONNX Runtime at {}; run `cargo xtask deps`",
        library.display()
    );
    Ok(library)
}

#[tokio::test(flavor = "multi_thread")]
async fn without_a_model_repository_it_serves_the_cache_directory_models() -> anyhow::Result<()> {
    let data = tempfile::tempdir()?;
    let cache = data.path().join("cache");
    let mlp = onnx::mlp(4, 8, 1, 2, 7);
    onnx::model_repository(
        &cache.join("models"),
        "mlp",
        &[("1", &mlp.model)],
        "max_batch_size: 4\n",
    )?;
    // The worker finds ONNX Runtime through ORT_DYLIB_PATH, so nothing needs installing;
    // --no-setup makes sure nothing is, whatever the cache lacks.
    let library = onnxruntime_library()?;
    let mut up = Up::spawn(
        data.path(),
        &cache,
        &["--no-setup"],
        &[("ORT_DYLIB_PATH", &library)],
    )?;

    wait_until(PATIENCE, "lmgrid up to be ready", || async {
        let Ok(channel) = up.grpc().await else {
            return false;
        };
        let request = HealthCheckRequest {
            service: String::new(),
        };
        HealthClient::new(channel)
            .check(request)
            .await
            .is_ok_and(|response| response.into_inner().status() == ServingStatus::Serving)
    })
    .await?;
    let mut oip = GrpcInferenceServiceClient::new(up.grpc().await?);
    let ready = |name: &str| ModelReadyRequest {
        name: name.to_string(),
        version: String::new(),
    };
    wait_until(PATIENCE, "mlp to be ready", || {
        let mut oip = oip.clone();
        async move {
            oip.model_ready(ready("mlp"))
                .await
                .is_ok_and(|response| response.into_inner().ready)
        }
    })
    .await?;
    let other = oip.model_ready(ready("all-minilm-l6-v2")).await;
    assert!(
        other
            .as_ref()
            .map_or(true, |response| !response.get_ref().ready),
        "{other:?}"
    );
    assert!(!up.stderr().contains("lmgrid: setup:"), "{}", up.stderr());

    let status = Command::new("kill")
        .args(["-TERM", &up.child.id().to_string()])
        .status()?;
    assert!(status.success());
    let status = up.exit_status().await?;
    assert_eq!(status.code(), Some(0), "exited {status} after SIGTERM");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_setup_that_cannot_run_fails_with_what_to_do() -> anyhow::Result<()> {
    let data: TempDir = tempfile::tempdir()?;
    let file = data.path().join("a-file");
    std::fs::write(&file, "not a directory")?;
    // Nothing can be created under a regular file, so the setup fails before any download.
    let cache = file.join("cache");
    let mut up = Up::spawn(data.path(), &cache, &[], &[])?;
    let status = up.exit_status().await?;
    let stderr = up.stderr();
    assert_eq!(status.code(), Some(1), "{stderr}");
    // It says what it is about to do before it fails.
    assert!(
        stderr.contains("before serving. On a first start"),
        "{stderr}"
    );
    let failure = format!(
        "lmgrid: setup failed: create cache directory {}",
        cache.display()
    );
    assert!(stderr.contains(&failure), "{stderr}");
    for hint in ["python3-venv", "--model-repository DIR", "--no-setup"] {
        assert!(stderr.contains(hint), "{hint}: {stderr}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn models_converted_by_another_converter_are_converted_again() -> anyhow::Result<()> {
    let data: TempDir = tempfile::tempdir()?;
    let cache = data.path().join("cache");
    // Every model complete, but stamped by a converter this binary does not have.
    for model in lmgrid_setup::MODEL_NAMES {
        let dir = cache.join(lmgrid_setup::MODELS_DIR).join(model);
        for file in [
            "config.yaml",
            "tokenizer.json",
            "chat_template.jinja",
            "1/model.onnx",
            // The 4-bit SmolLM2's graph for lmgrid's CPU kernels; extra for the others.
            "1/model.cpu.onnx",
        ] {
            std::fs::create_dir_all(dir.join(file).parent().context("a parent")?)?;
            std::fs::write(dir.join(file), "x")?;
        }
        std::fs::write(
            dir.join(".lmgrid-convert-stamp"),
            "converter convert.py sha256 00\n",
        )?;
    }
    // No python3 on the PATH: the setup stops at its first step, after saying what it does.
    let empty = data.path().join("empty-path");
    std::fs::create_dir(&empty)?;
    let library = onnxruntime_library()?;
    let env = [
        ("PATH", empty.as_path()),
        ("ORT_DYLIB_PATH", library.as_path()),
    ];
    let mut up = Up::spawn(data.path(), &cache, &[], &env)?;
    let status = up.exit_status().await?;
    let stderr = up.stderr();
    assert_eq!(status.code(), Some(1), "{stderr}");
    let plan = "lmgrid: setup: converting all-minilm-l6-v2 (its converter changed), \
                smollm2-135m-instruct-fp32 (its converter changed), smollm2-135m-instruct \
                (its converter changed) in";
    assert!(stderr.contains(plan), "{stderr}");
    assert!(stderr.contains("python3 is needed"), "{stderr}");
    Ok(())
}
