//! The harness every worker test uses: a model repository in a temporary directory, a worker
//! serving it on a loopback port with in-process discovery, and connected clients.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use lmgrid_core::discovery::{Discovery as _, Instance, MemoryDiscovery};
use lmgrid_proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use lmgrid_proto::inference::model_infer_request::{InferInputTensor, InferRequestedOutputTensor};
use lmgrid_proto::inference::{
    InferParameter, InferTensorContents, ModelInferRequest, ModelInferResponse,
    ModelMetadataRequest, ModelReadyRequest, ServerReadyRequest, infer_parameter::ParameterChoice,
};
use lmgrid_proto::lmgrid::v1 as pb;
use lmgrid_proto::lmgrid::v1::worker_control_service_client::WorkerControlServiceClient;
use lmgrid_test_support::onnx::{self, ModelProto};
use lmgrid_test_support::wait_until;

use tempfile::TempDir;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

/// How long a worker gets to load its models and become ready, and the longest any single
/// wait in these tests lasts. Generous: tests run on small, busy machines.
pub(crate) const PATIENCE: Duration = Duration::from_secs(60);

/// A model repository in a temporary directory, removed on drop.
#[derive(Debug)]
pub(crate) struct Repo {
    dir: TempDir,
}

impl Repo {
    pub(crate) fn new() -> anyhow::Result<Repo> {
        Ok(Repo {
            dir: tempfile::tempdir().context("create a model repository directory")?,
        })
    }

    pub(crate) fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Adds `name` with one model file per version and `config` as its `config.yaml`.
    pub(crate) fn model(
        self,
        name: &str,
        versions: &[(&str, &ModelProto)],
        config: &str,
    ) -> anyhow::Result<Repo> {
        onnx::model_repository(self.path(), name, versions, config)
            .with_context(|| format!("write model {name}"))?;
        Ok(self)
    }

    /// Adds `name` with a version 1 whose file is not an ONNX model.
    pub(crate) fn broken(self, name: &str) -> anyhow::Result<Repo> {
        onnx::write_model_bytes(&self.path().join(name).join("1"), &onnx::broken())
            .with_context(|| format!("write broken model {name}"))?;
        Ok(self)
    }

    /// Writes (or overwrites) one version's model file of an existing model.
    pub(crate) fn add_version(&self, name: &str, version: &str, model: &ModelProto) -> PathBuf {
        onnx::write_model(&self.path().join(name).join(version), model)
            .expect("write a model version")
    }
}

/// A worker serving a [`Repo`] in this process, with clients connected to it.
pub(crate) struct TestWorker {
    pub(crate) infer: GrpcInferenceServiceClient<Channel>,
    pub(crate) control: WorkerControlServiceClient<Channel>,
    pub(crate) discovery: MemoryDiscovery,
    pub(crate) addr: SocketAddr,
    pub(crate) id: String,
    repo: Repo,
    shutdown: CancellationToken,
    task: Option<JoinHandle<lmgrid_core::Result<()>>>,
}

impl TestWorker {
    /// Starts a worker on `repo` and waits until it is ready: every model was tried.
    pub(crate) async fn start(repo: Repo) -> anyhow::Result<TestWorker> {
        let discovery = MemoryDiscovery::new();
        let node = lmgrid_test_support::in_process_node(Arc::new(discovery.clone()));
        let worker = lmgrid_worker::Worker::start(lmgrid_worker::Config {
            node,
            model_repository: Some(repo.path().to_path_buf()),
            onnxruntime: Default::default(),
        })
        .await
        .context("start the worker")?;
        let addr = worker.grpc_addr();
        let id = worker.id().to_string();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(worker.run(shutdown.clone()));
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
            .connect()
            .await
            .context("connect to the worker")?;
        let infer = GrpcInferenceServiceClient::new(channel.clone())
            .max_decoding_message_size(64 << 20)
            .max_encoding_message_size(64 << 20);
        wait_until(PATIENCE, "the worker to be ready", || {
            let mut infer = infer.clone();
            async move {
                infer
                    .server_ready(ServerReadyRequest {})
                    .await
                    .is_ok_and(|r| r.into_inner().ready)
            }
        })
        .await?;
        Ok(TestWorker {
            infer,
            control: WorkerControlServiceClient::new(channel),
            discovery,
            addr,
            id,
            repo,
            shutdown,
            task: Some(task),
        })
    }

    pub(crate) fn repo(&self) -> &Repo {
        &self.repo
    }

    /// The worker's record in discovery, once it is registered and `predicate` holds for it.
    pub(crate) async fn record_where(
        &self,
        predicate: impl Fn(&Instance) -> bool,
    ) -> anyhow::Result<Instance> {
        let mut membership = self.discovery.watch(lmgrid_worker::SERVICE).await?;
        let id = self.id.clone();
        let found = membership.wait_for(|m| m.get(&id).is_some_and(&predicate));
        let members = tokio::time::timeout(PATIENCE, found)
            .await
            .context("the worker's record never matched")??;
        Ok(members[&self.id].clone())
    }

    /// The worker's record in discovery, once it is registered.
    pub(crate) async fn record(&self) -> anyhow::Result<Instance> {
        self.record_where(|_| true).await
    }

    /// The worker's models as worker control lists them.
    pub(crate) async fn list(&self) -> anyhow::Result<Vec<pb::WorkerModel>> {
        Ok(self
            .control
            .clone()
            .list_models(pb::ListWorkerModelsRequest::default())
            .await?
            .into_inner()
            .models)
    }

    /// Shuts the worker down and waits until `run` returns.
    pub(crate) async fn stop(mut self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        if let Some(task) = self.task.take() {
            tokio::time::timeout(PATIENCE, task)
                .await
                .context("the worker did not stop")???;
        }
        Ok(())
    }
}

impl Drop for TestWorker {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// A typed FP32 input.
pub(crate) fn fp32_input(name: &str, shape: &[i64], values: Vec<f32>) -> InferInputTensor {
    InferInputTensor {
        name: name.to_string(),
        datatype: "FP32".to_string(),
        shape: shape.to_vec(),
        contents: Some(InferTensorContents {
            fp32_contents: values,
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A request for `model` with typed FP32 input `x` of `rows` rows.
pub(crate) fn fp32_request(model: &str, rows: usize, values: Vec<f32>) -> ModelInferRequest {
    let width = values.len() / rows.max(1);
    ModelInferRequest {
        model_name: model.to_string(),
        inputs: vec![fp32_input("x", &[dim(rows), dim(width)], values)],
        ..Default::default()
    }
}

/// Asks for these outputs, in this order.
pub(crate) fn with_outputs(mut request: ModelInferRequest, names: &[&str]) -> ModelInferRequest {
    request.outputs = names
        .iter()
        .map(|name| InferRequestedOutputTensor {
            name: name.to_string(),
            ..Default::default()
        })
        .collect();
    request
}

/// Sets an integer request parameter (`priority`, `timeout`).
pub(crate) fn with_parameter(
    mut request: ModelInferRequest,
    key: &str,
    value: i64,
) -> ModelInferRequest {
    request.parameters.insert(
        key.to_string(),
        InferParameter {
            parameter_choice: Some(ParameterChoice::Int64Param(value)),
        },
    );
    request
}

/// The typed FP32 values of output `index`.
pub(crate) fn fp32_output(response: &ModelInferResponse, index: usize) -> Vec<f32> {
    response.outputs[index]
        .contents
        .as_ref()
        .map(|c| c.fp32_contents.clone())
        .unwrap_or_default()
}

pub(crate) fn dim(n: usize) -> i64 {
    i64::try_from(n).expect("small dimension")
}

/// Asserts that every value of `got` is within `tolerance` of `want`, relative to the
/// magnitude for values above one.
#[track_caller]
pub(crate) fn assert_close(got: &[f32], want: &[f32], tolerance: f32, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let bound = tolerance * w.abs().max(1.0);
        assert!(
            (g - w).abs() <= bound,
            "{what}: element {i} is {g}, expected {w} within {bound}"
        );
    }
}

/// Asserts that `result` failed with `code` and a message containing every one of `needles`.
#[track_caller]
pub(crate) fn assert_status<T: std::fmt::Debug>(
    result: Result<T, tonic::Status>,
    code: tonic::Code,
    needles: &[&str],
) -> tonic::Status {
    let status = result.expect_err("the request should fail");
    assert_eq!(status.code(), code, "{status:?}");
    for needle in needles {
        assert!(
            status.message().contains(needle),
            "{:?} does not mention {needle:?}",
            status.message()
        );
    }
    status
}

/// The value of a metric sample of this process whose name is `name` and whose labels
/// include `model="<model>"` (summed over other labels), or 0 if there is none yet.
pub(crate) fn metric(name: &str, model: &str) -> f64 {
    let text = lmgrid_core::metrics::encode().expect("encode metrics");
    let label = format!("model=\"{model}\"");
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (metric, labels) = series.split_once('{')?;
            (metric == name && labels.contains(&label)).then(|| value.parse::<f64>().ok())?
        })
        .sum()
}

/// A request running in the background.
pub(crate) type Call = JoinHandle<Result<tonic::Response<ModelInferResponse>, tonic::Status>>;

/// Rows of the requests [`occupy`] sends.
pub(crate) const SLOW_ROWS: usize = 2048;

/// A model slow enough at [`SLOW_ROWS`] rows (about half a second on one core of a
/// laptop) to keep its one instance busy while other requests queue behind it.
pub(crate) fn slow_model() -> onnx::Mlp {
    onnx::mlp(64, 1024, 6, 64, 5)
}

/// The config of a slow model: big batches, no dynamic batching.
pub(crate) const SLOW_CONFIG: &str = "max_batch_size: 2048\n";

/// Sends a [`SLOW_ROWS`]-row request to `model` in the background.
pub(crate) fn occupy(worker: &TestWorker, model: &str) -> Call {
    let mut client = worker.infer.clone();
    let request = fp32_request(model, SLOW_ROWS, onnx::random_f32(3, SLOW_ROWS * 64));
    tokio::spawn(async move { client.model_infer(request).await })
}

/// Waits until GetStats reports `model` with at least this many requests computing and
/// waiting, while `blocker` (the request that keeps the instance busy) is still running.
/// Polls often: the state lasts only as long as `blocker` computes.
pub(crate) async fn wait_for_load(
    worker: &TestWorker,
    model: &str,
    in_flight: u32,
    queued: u32,
    blocker: &Call,
) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let mut control = worker.control.clone();
    loop {
        let stats = control
            .get_stats(pb::GetStatsRequest::default())
            .await?
            .into_inner();
        let busy = stats
            .models
            .iter()
            .any(|m| m.name == model && m.in_flight >= in_flight && m.queue_depth >= queued);
        if busy {
            return Ok(());
        }
        anyhow::ensure!(
            !blocker.is_finished(),
            "the blocking request on {model} finished before {in_flight} computing and \
             {queued} waiting were seen: this machine computes faster than the test assumes"
        );
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "{model} never had {in_flight} computing and {queued} waiting"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

pub(crate) fn state(model: &pb::WorkerModel) -> pb::ModelState {
    pb::ModelState::try_from(model.state).unwrap_or(pb::ModelState::Unspecified)
}

/// `(name, version, state)` of every listed model.
pub(crate) fn summary(models: &[pb::WorkerModel]) -> Vec<(String, String, pb::ModelState)> {
    models
        .iter()
        .map(|m| (m.name.clone(), m.version.clone(), state(m)))
        .collect()
}

pub(crate) fn entry(
    name: &str,
    version: &str,
    state: pb::ModelState,
) -> (String, String, pb::ModelState) {
    (name.to_string(), version.to_string(), state)
}

pub(crate) async fn model_ready(
    worker: &TestWorker,
    name: &str,
    version: &str,
) -> Result<bool, tonic::Status> {
    let request = ModelReadyRequest {
        name: name.to_string(),
        version: version.to_string(),
    };
    Ok(worker
        .infer
        .clone()
        .model_ready(request)
        .await?
        .into_inner()
        .ready)
}

pub(crate) async fn versions(worker: &TestWorker, name: &str) -> anyhow::Result<Vec<String>> {
    let request = ModelMetadataRequest {
        name: name.to_string(),
        version: String::new(),
    };
    Ok(worker
        .infer
        .clone()
        .model_metadata(request)
        .await?
        .into_inner()
        .versions)
}

/// A model `cargo xtask models` converted into the cache (`$LMGRID_CACHE_DIR`, else
/// `~/.cache/lmgrid`); fails the test, saying what to run, when it is missing or older than
/// the `kind` its `config.yaml` must declare.
pub(crate) fn cached_model(name: &str, kind: &str) -> PathBuf {
    let cache = std::env::var_os("LMGRID_CACHE_DIR")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache/lmgrid")))
        .expect("neither LMGRID_CACHE_DIR nor HOME is set");
    let dir = cache.join("models").join(name);
    assert!(
        dir.join("1/model.onnx").is_file() && dir.join("tokenizer.json").is_file(),
        "the converted {name} is not in {}: run `cargo xtask models`",
        dir.display()
    );
    let config = std::fs::read_to_string(dir.join("config.yaml")).unwrap_or_default();
    assert!(
        config.contains(&format!("kind: {kind}")),
        "{} is not a {kind} model: run `cargo xtask models`",
        dir.join("config.yaml").display()
    );
    dir
}

/// A repository serving the converted model in `source` as `name`, with its own
/// `config.yaml` or, if `config` is `None`, the converted one. The other files are linked,
/// not copied.
pub(crate) fn linked_repo(source: &Path, name: &str, config: Option<&str>) -> anyhow::Result<Repo> {
    Repo::new()?.linked(source, name, config)
}

impl Repo {
    /// Adds the converted model in `source` as `name`, as [`linked_repo`] does.
    pub(crate) fn linked(
        self,
        source: &Path,
        name: &str,
        config: Option<&str>,
    ) -> anyhow::Result<Repo> {
        let dir = self.path().join(name);
        std::fs::create_dir_all(dir.join("1"))?;
        let config = match config {
            Some(text) => text.to_string(),
            None => std::fs::read_to_string(source.join("config.yaml"))?,
        };
        std::fs::write(dir.join("config.yaml"), config)?;
        for entry in std::fs::read_dir(source)? {
            let entry = entry?;
            let file = entry.file_name();
            let skip =
                file == "config.yaml" || file == "1" || file.to_string_lossy().starts_with('.');
            if !skip {
                std::os::unix::fs::symlink(entry.path(), dir.join(&file))
                    .with_context(|| format!("link {}", file.to_string_lossy()))?;
            }
        }
        // Every graph of version 1: model.onnx and, for the 4-bit model, model.cpu.onnx.
        for entry in std::fs::read_dir(source.join("1"))? {
            let entry = entry?;
            std::os::unix::fs::symlink(entry.path(), dir.join("1").join(entry.file_name()))
                .with_context(|| format!("link 1/{}", entry.file_name().to_string_lossy()))?;
        }
        Ok(self)
    }
}
