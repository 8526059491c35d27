//! `cargo xtask bench gateway`: what the gateway adds to a call, all in one run.
//!
//! One worker serves a model whose compute is negligible (the identity on 16 floats,
//! batching off), and one gateway routes to it; both run in this process over loopback
//! gRPC, with the in-process discovery, each on a tokio runtime of its own (as separate
//! processes would be), and the clients on a third. The same client setup (8 HTTP/2
//! connections, raw tensor contents as Triton's clients send them) calls the worker
//! directly and through the gateway, at concurrency 1 and 64; the table gives each path's
//! p50/p99 latency and throughput, what the gateway adds, the throughput ratio, and the CPU
//! each role spent per request (from the threads' times in `/proc`). Rows for the Open
//! Inference Protocol's REST API through the gateway (keep-alive HTTP/1.1, one connection
//! per client; JSON tensors, then binary ones) follow for comparison.
//!
//! The load generator shares the machine's cores with the worker and the gateway, so once
//! the cores are saturated (concurrency 64 on a small machine) the throughput ratio is the
//! ratio of CPU per request of the two paths, not what a gateway on cores of its own would
//! allow; the CPU columns tell the two apart. Last, the same two gRPC paths call a model
//! whose compute is of the order of a real one's (an MLP, 512 → 2048 × 2 → 512: 6.3 M
//! weights, about a millisecond a request here), where the hop is a small part of a
//! request's cost. Last, the deployed shape: the gateway's threads alone on one core, the
//! clients' and the worker's on the other, on a second worker and gateway whose runtimes
//! have one thread each (as tokio sizes itself in a pod limited to one CPU); then the MLP
//! with the worker's threads alone on a core and the clients beside the gateway, as a
//! worker pod has its CPUs to itself; for those, how busy each core was (requests per
//! second × CPU per request).
//! `LMGRID_BENCH_SECONDS` sets the time per row (default 3 s, after 0.3 s of warm-up).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use lmgrid_core::discovery::{Discovery, MemoryDiscovery};
use lmgrid_proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use lmgrid_proto::inference::{ModelInferRequest, model_infer_request::InferInputTensor};
use lmgrid_test_support::onnx::{self, ElemType};
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

/// Floats per request to the identity model.
const WIDTH: usize = 16;
/// The MLP model's sizes: input, hidden, hidden layers, output.
const MLP: (usize, usize, usize, usize) = (512, 2048, 2, 512);
/// HTTP/2 connections each gRPC path's clients share.
const CHANNELS: usize = 8;

/// Thread names of the roles' runtimes; every other thread (the batcher's, ONNX Runtime's)
/// is the worker's.
const CLIENT: &str = "bench-client";
const GATEWAY: &str = "bench-gateway";
const WORKER: &str = "bench-worker";
/// The start of the worker's model execution threads' names (`ort-{model}-{version}-{i}`).
const EXECUTION: &str = "ort-";

struct Row {
    path: &'static str,
    /// The row this one is compared with.
    baseline: Option<&'static str>,
    concurrency: usize,
    per_second: f64,
    p50_ms: f64,
    p99_ms: f64,
    /// CPU microseconds per request: client, gateway, worker.
    cpu_us: [f64; 3],
    /// The model execution thread's CPU time over the row's wall time.
    model_busy: f64,
}

fn main() -> anyhow::Result<()> {
    let seconds: f64 = std::env::var("LMGRID_BENCH_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3.0);
    let measure = Duration::from_secs_f64(seconds);
    let logs = install_logs()?;
    let dir = tempfile::tempdir()?;
    let identity = onnx::identity(ElemType::Float, &[WIDTH as i64]);
    onnx::model_repository(
        dir.path(),
        "id",
        &[("1", &identity)],
        "max_batch_size: 64\n",
    )?;
    let (input, hidden, layers, output) = MLP;
    let mlp = onnx::mlp(input, hidden, layers, output, 7);
    onnx::model_repository(
        dir.path(),
        "mlp",
        &[("1", &mlp.model)],
        "max_batch_size: 64\n",
    )?;
    println!(
        "lmgrid gateway benchmark: identity on {WIDTH} FP32 (batching off), {seconds}s per row, \
         {} CPUs, worker + gateway + clients in one process, logs: {logs}",
        cpus()
    );

    let shared = Platform::start(dir.path(), None)?;
    let groups = RowGroups::from_env()?;
    let mut rows = shared.clients.block_on(async {
        let direct = channels(shared.worker_addr).await?;
        let routed = channels(shared.gateway_grpc).await?;
        wait_until_routed(&routed[0]).await?;
        let id = infer_request("id", WIDTH);
        let mut rows = Vec::new();
        if groups.identity {
            for concurrency in [1, 64] {
                let pair = grpc_pair((DIRECT, ROUTED), (&direct, &routed), &id, concurrency);
                rows.extend(pair.run(measure).await?);
            }
        }
        if groups.rest {
            for binary in [false, true] {
                for concurrency in [1, 64] {
                    let row = http_row(shared.gateway_http, binary, concurrency, measure);
                    rows.push(row.await?);
                }
            }
        }
        if groups.mlp {
            let mlp = infer_request("mlp", input);
            for concurrency in [1, 64] {
                let pair = grpc_pair(
                    (DIRECT_MLP, ROUTED_MLP),
                    (&direct, &routed),
                    &mlp,
                    concurrency,
                );
                rows.extend(pair.run(measure).await?);
            }
        }
        anyhow::Ok(rows)
    })?;
    shared.stop()?;
    // As deployed, the gateway does not share cores with the worker: the clients and the
    // worker on one core, the gateway on the other, each runtime with one thread per core
    // it has (as tokio sizes itself in a pod limited to one CPU), so that no two threads
    // of a role take turns on one core.
    if groups.pinned {
        match pinned_rows(dir.path(), measure) {
            Ok(pinned) => rows.extend(pinned),
            Err(error) => println!("(no rows with the gateway on a core of its own: {error:#})"),
        }
    }
    print_table(&rows);
    Ok(())
}

/// A worker and a gateway routing to it, each on a tokio runtime of its own, and a runtime
/// for the clients.
struct Platform {
    clients: tokio::runtime::Runtime,
    gateways: tokio::runtime::Runtime,
    workers: tokio::runtime::Runtime,
    shutdown: CancellationToken,
    worker_task: tokio::task::JoinHandle<lmgrid_core::Result<()>>,
    gateway_task: tokio::task::JoinHandle<lmgrid_core::Result<()>>,
    worker_addr: SocketAddr,
    gateway_grpc: SocketAddr,
    gateway_http: SocketAddr,
}

impl Platform {
    /// Starts the worker on the models of `repository` and the gateway, on runtimes of
    /// `threads` worker threads each (tokio's default, one per CPU, when `None`).
    fn start(repository: &std::path::Path, threads: Option<usize>) -> anyhow::Result<Self> {
        let runtime = |name: &'static str| {
            let mut builder = tokio::runtime::Builder::new_multi_thread();
            if let Some(threads) = threads {
                builder.worker_threads(threads);
            }
            builder.thread_name(name).enable_all().build()
        };
        let (clients, gateways, workers) = (runtime(CLIENT)?, runtime(GATEWAY)?, runtime(WORKER)?);
        let shutdown = CancellationToken::new();
        let discovery: Arc<dyn Discovery> = Arc::new(MemoryDiscovery::new());
        let worker = workers.block_on(lmgrid_worker::Worker::start(lmgrid_worker::Config {
            node: lmgrid_test_support::in_process_node(discovery.clone()),
            model_repository: Some(repository.to_path_buf()),
            onnxruntime: Default::default(),
        }))?;
        let worker_addr = worker.grpc_addr();
        let worker_task = workers.spawn(worker.run(shutdown.clone()));
        let mut auth = lmgrid_gateway::AuthConfig {
            required: false,
            ..Default::default()
        };
        // The benchmark sends far more than an anonymous tenant may.
        auth.anonymous = lmgrid_gateway::TenantDefaults {
            requests_per_minute: 0,
            tokens_per_minute: 0,
            max_concurrent: 0,
            ..Default::default()
        };
        let gateway =
            gateways.block_on(lmgrid_gateway::Gateway::start(lmgrid_gateway::Config {
                node: lmgrid_test_support::in_process_node(discovery.clone()),
                http: lmgrid_gateway::HttpConfig {
                    listen_addr: ([127, 0, 0, 1], 0).into(),
                    ..Default::default()
                },
                auth,
                ..Default::default()
            }))?;
        let (gateway_grpc, gateway_http) = (gateway.grpc_addr(), gateway.http_addr());
        let gateway_task = gateways.spawn(gateway.run(shutdown.clone()));
        Ok(Self {
            clients,
            gateways,
            workers,
            shutdown,
            worker_task,
            gateway_task,
            worker_addr,
            gateway_grpc,
            gateway_http,
        })
    }

    fn stop(self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        self.gateways.block_on(self.gateway_task)??;
        self.workers.block_on(self.worker_task)??;
        Ok(())
    }
}

/// The identity's and the MLP's rows at concurrency 1 and 64 with the gateway's threads on
/// CPU 1 and every other thread on CPU 0, on a platform of its own whose runtimes have one
/// thread each.
fn pinned_rows(repository: &std::path::Path, measure: Duration) -> anyhow::Result<Vec<Row>> {
    anyhow::ensure!(cpus() >= 2, "fewer than 2 CPUs");
    let platform = Platform::start(repository, Some(1))?;
    let all = allowed_cpus(std::path::Path::new("/proc/self"))?;
    let rows = platform.clients.block_on(async {
        let direct = channels(platform.worker_addr).await?;
        let routed = channels(platform.gateway_grpc).await?;
        wait_until_routed(&routed[0]).await?;
        // The no-op model: the gateway's is the costly part, alone on core 1. The MLP: the
        // worker's is, alone on core 0, as a worker pod has its CPUs to itself.
        let models = [
            (
                (DIRECT_PINNED, ROUTED_PINNED),
                "0",
                infer_request("id", WIDTH),
            ),
            (
                (DIRECT_MLP_PINNED, ROUTED_MLP_PINNED),
                "1",
                infer_request("mlp", MLP.0),
            ),
        ];
        let mut rows = Vec::new();
        for (paths, clients, request) in &models {
            set_affinity("1", clients, "0")?;
            for concurrency in [1, 64] {
                let pair = grpc_pair(*paths, (&direct, &routed), request, concurrency);
                rows.extend(pair.run(measure).await?);
            }
        }
        anyhow::Ok(rows)
    });
    let unpinned = unpin(&all);
    platform.stop()?;
    unpinned?;
    rows
}

/// Installs the log subscriber the services run with (`info` and the plain or JSON lines
/// of `telemetry.log_format`, an access-log line per request) writing to `/dev/null` when
/// `LMGRID_BENCH_LOGS` is `plain` or `json`; none when it is `off` (the default). Says which.
fn install_logs() -> anyhow::Result<String> {
    let format = std::env::var("LMGRID_BENCH_LOGS").unwrap_or_else(|_| "off".into());
    let sink = || -> anyhow::Result<std::sync::Mutex<std::fs::File>> {
        Ok(std::sync::Mutex::new(std::fs::File::create("/dev/null")?))
    };
    let filter = || tracing_subscriber::EnvFilter::new("info,ort=warn");
    match format.as_str() {
        "off" => return Ok("none".into()),
        "plain" => tracing_subscriber::fmt()
            .with_env_filter(filter())
            .with_writer(sink()?)
            .with_ansi(false)
            .try_init(),
        "json" => tracing_subscriber::fmt()
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .with_env_filter(filter())
            .with_writer(sink()?)
            .try_init(),
        other => anyhow::bail!("LMGRID_BENCH_LOGS: {other:?} is not off, plain or json"),
    }
    .map_err(|e| anyhow::anyhow!("install the log subscriber: {e}"))?;
    Ok(format!("{format} lines at info to /dev/null"))
}

/// Which groups of rows to run: `LMGRID_BENCH_ROWS`, a comma-separated subset of
/// `identity,rest,pinned,mlp`; all of them when unset.
struct RowGroups {
    identity: bool,
    rest: bool,
    pinned: bool,
    mlp: bool,
}

impl RowGroups {
    fn from_env() -> anyhow::Result<RowGroups> {
        let Ok(list) = std::env::var("LMGRID_BENCH_ROWS") else {
            return Ok(RowGroups {
                identity: true,
                rest: true,
                pinned: true,
                mlp: true,
            });
        };
        let mut groups = RowGroups {
            identity: false,
            rest: false,
            pinned: false,
            mlp: false,
        };
        for group in list.split(',').map(str::trim).filter(|g| !g.is_empty()) {
            match group {
                "identity" => groups.identity = true,
                "rest" => groups.rest = true,
                "pinned" => groups.pinned = true,
                "mlp" => groups.mlp = true,
                other => anyhow::bail!(
                    "LMGRID_BENCH_ROWS: unknown group {other:?} (identity, rest, pinned, mlp)"
                ),
            }
        }
        Ok(groups)
    }
}

const DIRECT: &str = "worker direct (gRPC)";
const ROUTED: &str = "through the gateway (gRPC)";
const DIRECT_PINNED: &str = "worker direct (gRPC), clients + worker on core 0";
const ROUTED_PINNED: &str = "through the gateway (gRPC), gateway on core 1";
const DIRECT_MLP: &str = "worker direct (gRPC), MLP model";
const ROUTED_MLP: &str = "through the gateway (gRPC), MLP model";
const DIRECT_MLP_PINNED: &str = "worker direct (gRPC), MLP model, worker alone on core 0";
const ROUTED_MLP_PINNED: &str =
    "through the gateway (gRPC), MLP model, clients + gateway on core 1";

/// Lets every thread run on the CPUs the process started with (`all`, from before pinning:
/// once pinned, `available_parallelism` itself sees one CPU), and checks that each does.
fn unpin(all: &str) -> anyhow::Result<()> {
    set_affinity(all, all, all)?;
    for task in std::fs::read_dir("/proc/self/task")?.flatten() {
        let cpus = allowed_cpus(&task.path())?;
        anyhow::ensure!(
            cpus == all,
            "thread {:?} still on CPUs {cpus}",
            task.file_name()
        );
    }
    Ok(())
}

/// The `Cpus_allowed_list` of a process or thread (its `/proc` directory).
fn allowed_cpus(dir: &std::path::Path) -> anyhow::Result<String> {
    let status = std::fs::read_to_string(dir.join("status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .map(|list| list.trim().to_string())
        .context("no Cpus_allowed_list in /proc status")
}

fn cpus() -> usize {
    std::thread::available_parallelism().map_or(0, |n| n.get())
}

/// Sets the CPU list of the gateway's threads, of the clients' and of every other thread
/// of this process (the worker's).
fn set_affinity(gateway: &str, clients: &str, others: &str) -> anyhow::Result<()> {
    for task in std::fs::read_dir("/proc/self/task")?.flatten() {
        let name = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        let cpu = match name.trim() {
            GATEWAY => gateway,
            CLIENT => clients,
            _ => others,
        };
        let status = std::process::Command::new("taskset")
            .args(["-p", "-c", cpu])
            .arg(task.file_name())
            .stdout(std::process::Stdio::null())
            .status()
            .context("run taskset")?;
        anyhow::ensure!(status.success(), "taskset failed: {status}");
    }
    Ok(())
}

async fn channels(addr: SocketAddr) -> anyhow::Result<Vec<Channel>> {
    let mut channels = Vec::new();
    for _ in 0..CHANNELS {
        channels.push(
            Channel::from_shared(format!("http://{addr}"))?
                .tcp_nodelay(true)
                .connect()
                .await?,
        );
    }
    Ok(channels)
}

fn infer_request(model: &str, width: usize) -> ModelInferRequest {
    let x = onnx::random_f32(3, width);
    ModelInferRequest {
        model_name: model.to_string(),
        inputs: vec![InferInputTensor {
            name: "x".into(),
            datatype: "FP32".into(),
            shape: vec![1, width as i64],
            ..Default::default()
        }],
        raw_input_contents: vec![x.iter().flat_map(|v| v.to_le_bytes()).collect()],
        ..Default::default()
    }
}

/// Polls the gateway until it routes to the worker (it registers once its model loaded).
async fn wait_until_routed(channel: &Channel) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut client = GrpcInferenceServiceClient::new(channel.clone());
    loop {
        match client.model_infer(infer_request("id", WIDTH)).await {
            Ok(_) => return Ok(()),
            Err(status) if Instant::now() > deadline => {
                anyhow::bail!("the gateway never routed to the worker: {status}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

/// Runs `concurrency` clients calling `call` in a loop: warm-up, then `measure`.
async fn drive<C, F, Fut>(
    concurrency: usize,
    measure: Duration,
    mut clients: impl FnMut(usize) -> C,
    call: F,
) -> anyhow::Result<Measured>
where
    C: Send + 'static,
    F: Fn(C) -> Fut + Send + Sync + Copy + 'static,
    Fut: Future<Output = anyhow::Result<C>> + Send,
{
    let warmup = Duration::from_millis(300);
    let start = Instant::now() + warmup;
    let end = start + measure;
    let mut tasks = Vec::new();
    for i in 0..concurrency {
        let mut client = clients(i);
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            loop {
                let t = Instant::now();
                if t >= end {
                    break;
                }
                client = call(client).await?;
                if t >= start {
                    latencies.push(t.elapsed());
                }
            }
            anyhow::Ok(latencies)
        }));
    }
    tokio::time::sleep_until(start.into()).await;
    let before = cpu_by_role();
    tokio::time::sleep_until(end.into()).await;
    let spent = cpu_by_role();
    let model_busy = (spent[3] - before[3]).as_secs_f64() / measure.as_secs_f64();
    let mut latencies = Vec::new();
    for task in tasks {
        latencies.extend(task.await??);
    }
    latencies.sort();
    let cpu_us = std::array::from_fn(|i| {
        (spent[i] - before[i]).as_secs_f64() * 1e6 / latencies.len().max(1) as f64
    });
    Ok(Measured {
        per_second: latencies.len() as f64 / measure.as_secs_f64(),
        latencies,
        cpu_us,
        model_busy,
    })
}

/// What one row measured.
struct Measured {
    /// Sorted.
    latencies: Vec<Duration>,
    per_second: f64,
    cpu_us: [f64; 3],
    /// CPU time of the model's execution thread (the batcher's, which runs ONNX Runtime)
    /// over the row's wall time: below 1 while requests wait, that thread sat idle.
    model_busy: f64,
}

impl Measured {
    /// Slices of equal length as one measurement.
    fn merge(slices: Vec<Measured>) -> Measured {
        let n = slices.len().max(1) as f64;
        let requests: usize = slices.iter().map(|m| m.latencies.len()).sum();
        let cpu_us = std::array::from_fn(|i| {
            let total: f64 = slices
                .iter()
                .map(|m| m.cpu_us[i] * m.latencies.len() as f64)
                .sum();
            total / requests.max(1) as f64
        });
        let per_second = slices.iter().map(|m| m.per_second).sum::<f64>() / n;
        let model_busy = slices.iter().map(|m| m.model_busy).sum::<f64>() / n;
        let mut latencies: Vec<Duration> = slices.into_iter().flat_map(|m| m.latencies).collect();
        latencies.sort();
        Measured {
            latencies,
            per_second,
            cpu_us,
            model_busy,
        }
    }
}

/// CPU time (user + system) of this process's threads so far, by role: client, gateway,
/// worker, and (a part of the worker's) the model execution threads, the last exactly where
/// the kernel tells (below). Read from `/proc/self/task/*/stat`, in clock ticks of 10 ms; threads that
/// ended are not counted, so the difference of two readings over a row is what the threads
/// alive through it spent.
fn cpu_by_role() -> [Duration; 4] {
    let mut spent = [Duration::ZERO; 4];
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return spent;
    };
    for task in tasks.flatten() {
        let path = task.path();
        let (Ok(name), Ok(stat)) = (
            std::fs::read_to_string(path.join("comm")),
            std::fs::read_to_string(path.join("stat")),
        ) else {
            continue;
        };
        // Fields after the command name's closing parenthesis: state is the first,
        // utime the 12th and stime the 13th.
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .map_or(Vec::new(), |(_, rest)| rest.split_whitespace().collect());
        let ticks: u64 = [11, 12]
            .iter()
            .filter_map(|&i| fields.get(i)?.parse::<u64>().ok())
            .sum();
        let ticks = Duration::from_millis(ticks * 10);
        let role = match name.trim() {
            CLIENT => 0,
            GATEWAY => 1,
            _ => 2,
        };
        spent[role] += ticks;
        if name.starts_with(EXECUTION) {
            spent[3] += exact_runtime(&path).unwrap_or(ticks);
        }
    }
    spent
}

/// A thread's CPU time to the nanosecond, from the scheduler's own account
/// (`se.sum_exec_runtime`, in ms, in `/proc/self/task/<tid>/sched`), where the kernel has it:
/// tick-sampled `stat` times cannot resolve a thread that runs ~1 ms at a time.
fn exact_runtime(task: &std::path::Path) -> Option<Duration> {
    let sched = std::fs::read_to_string(task.join("sched")).ok()?;
    let line = sched
        .lines()
        .find(|l| l.starts_with("se.sum_exec_runtime"))?;
    let ms: f64 = line.rsplit(':').next()?.trim().parse().ok()?;
    Some(Duration::from_secs_f64(ms / 1e3))
}

/// Slices each direct/routed pair of rows alternates in, so that the machine's drift (other
/// work on it, clock speed) falls on both paths alike rather than on whichever ran second.
const ROUNDS: u32 = 3;

/// The same request at the same concurrency, directly and through the gateway.
struct GrpcPair<'a> {
    paths: (&'static str, &'static str),
    channels: (&'a [Channel], &'a [Channel]),
    request: &'a ModelInferRequest,
    concurrency: usize,
}

fn grpc_pair<'a>(
    paths: (&'static str, &'static str),
    channels: (&'a [Channel], &'a [Channel]),
    request: &'a ModelInferRequest,
    concurrency: usize,
) -> GrpcPair<'a> {
    GrpcPair {
        paths,
        channels,
        request,
        concurrency,
    }
}

impl GrpcPair<'_> {
    /// The direct row and the routed row, each measured for `measure` in all, in
    /// [`ROUNDS`] alternating slices.
    async fn run(&self, measure: Duration) -> anyhow::Result<[Row; 2]> {
        let slice = measure / ROUNDS;
        let (mut direct, mut routed) = (Vec::new(), Vec::new());
        for _ in 0..ROUNDS {
            direct
                .push(grpc_measure(self.channels.0, self.request, self.concurrency, slice).await?);
            routed
                .push(grpc_measure(self.channels.1, self.request, self.concurrency, slice).await?);
        }
        let (direct_path, routed_path) = self.paths;
        Ok([
            row(direct_path, None, self.concurrency, Measured::merge(direct)),
            row(
                routed_path,
                Some(direct_path),
                self.concurrency,
                Measured::merge(routed),
            ),
        ])
    }
}

async fn grpc_measure(
    channels: &[Channel],
    request: &ModelInferRequest,
    concurrency: usize,
    measure: Duration,
) -> anyhow::Result<Measured> {
    drive(
        concurrency,
        measure,
        |i| {
            (
                GrpcInferenceServiceClient::new(channels[i % channels.len()].clone()),
                request.clone(),
            )
        },
        |(mut client, request)| async move {
            client.model_infer(request.clone()).await?;
            Ok((client, request))
        },
    )
    .await
}

/// The REST rows: JSON tensors, or with `binary` the binary tensor data extension both
/// ways (the input after the JSON, the output asked for as binary), as Triton's HTTP client
/// sends them by default.
async fn http_row(
    addr: SocketAddr,
    binary: bool,
    concurrency: usize,
    measure: Duration,
) -> anyhow::Result<Row> {
    let values = onnx::random_f32(3, WIDTH);
    let (body, extra_header) = if binary {
        let json = format!(
            r#"{{"inputs": [{{"name": "x", "shape": [1, {WIDTH}], "datatype": "FP32", "parameters": {{"binary_data_size": {}}}}}], "outputs": [{{"name": "y", "parameters": {{"binary_data": true}}}}]}}"#,
            WIDTH * 4
        );
        let mut body = json.clone().into_bytes();
        body.extend(values.iter().flat_map(|v| v.to_le_bytes()));
        let header = format!("Inference-Header-Content-Length: {}\r\n", json.len());
        (body, header)
    } else {
        let data: Vec<String> = values.iter().map(|v| v.to_string()).collect();
        let json = format!(
            r#"{{"inputs": [{{"name": "x", "shape": [1, {WIDTH}], "datatype": "FP32", "data": [{}]}}]}}"#,
            data.join(", ")
        );
        (json.into_bytes(), String::new())
    };
    let mut request = format!(
        "POST /v2/models/id/infer HTTP/1.1\r\nHost: gateway\r\nContent-Type: application/json\r\n\
         {extra_header}Content-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    request.extend_from_slice(&body);
    let request: Arc<[u8]> = request.into();
    let mut connections = Vec::new();
    for _ in 0..concurrency {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        connections.push(Some(BufReader::new(stream)));
    }
    let measured = drive(
        concurrency,
        measure,
        |i| {
            (
                connections[i].take().expect("one connection per client"),
                request.clone(),
            )
        },
        move |(mut connection, request)| async move {
            let binary_answer = post(&mut connection, &request).await?;
            anyhow::ensure!(binary_answer == binary, "binary answer: {binary_answer}");
            Ok((connection, request))
        },
    )
    .await?;
    let path = if binary {
        "through the gateway (OIP REST binary tensors, HTTP/1.1)"
    } else {
        "through the gateway (OIP REST, HTTP/1.1)"
    };
    Ok(row(path, Some(DIRECT), concurrency, measured))
}

/// One request on a keep-alive connection; fails unless the answer is 200. Returns whether
/// the answer has binary data after its JSON (an `Inference-Header-Content-Length` header).
async fn post(connection: &mut BufReader<TcpStream>, request: &[u8]) -> anyhow::Result<bool> {
    connection.get_mut().write_all(request).await?;
    let mut line = String::new();
    connection.read_line(&mut line).await?;
    anyhow::ensure!(line.starts_with("HTTP/1.1 200"), "answered {line:?}");
    let mut length = 0;
    let mut binary = false;
    loop {
        line.clear();
        connection.read_line(&mut line).await?;
        let header = line.trim_end();
        if header.is_empty() {
            break;
        }
        if let Some((name, value)) = header.split_once(':') {
            if name.eq_ignore_ascii_case("content-length") {
                length = value.trim().parse().context("content-length")?;
            }
            binary |= name.eq_ignore_ascii_case("inference-header-content-length");
        }
    }
    let mut body = vec![0; length];
    connection.read_exact(&mut body).await?;
    Ok(binary)
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index].as_secs_f64() * 1e3
}

fn row(
    path: &'static str,
    baseline: Option<&'static str>,
    concurrency: usize,
    measured: Measured,
) -> Row {
    Row {
        path,
        baseline,
        concurrency,
        per_second: measured.per_second,
        p50_ms: percentile(&measured.latencies, 0.5),
        p99_ms: percentile(&measured.latencies, 0.99),
        cpu_us: measured.cpu_us,
        model_busy: measured.model_busy,
    }
}

fn print_table(rows: &[Row]) {
    let find = |path: &str, concurrency: usize| {
        rows.iter()
            .find(|r| r.path == path && r.concurrency == concurrency)
    };
    println!();
    println!(
        "| path | concurrency | requests/s | p50 ms | p99 ms | added p50 ms | added p99 ms | \
         throughput vs direct | CPU µs/request: client | gateway | worker | model thread busy |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for r in rows {
        let base = r.baseline.and_then(|b| find(b, r.concurrency));
        let (added_p50, added_p99, ratio) = match base {
            Some(d) => (
                format!("{:+.3}", r.p50_ms - d.p50_ms),
                format!("{:+.3}", r.p99_ms - d.p99_ms),
                format!("{:.2}×", r.per_second / d.per_second),
            ),
            None => ("".into(), "".into(), "".into()),
        };
        let [client, gateway, worker] = r.cpu_us;
        println!(
            "| {} | {} | {:.0} | {:.3} | {:.3} | {added_p50} | {added_p99} | {ratio} | {client:.0} | \
             {gateway:.0} | {worker:.0} | {:.0}% |",
            r.path,
            r.concurrency,
            r.per_second,
            r.p50_ms,
            r.p99_ms,
            r.model_busy * 100.0
        );
    }
    println!();
    for (routed, direct, how) in [
        (ROUTED, DIRECT, "sharing both cores"),
        (ROUTED_PINNED, DIRECT_PINNED, "on a core of its own"),
        (ROUTED_MLP, DIRECT_MLP, "sharing both cores, MLP model"),
        (
            ROUTED_MLP_PINNED,
            DIRECT_MLP_PINNED,
            "on a core of its own, MLP model",
        ),
    ] {
        for concurrency in [1, 64] {
            if let (Some(d), Some(g)) = (find(direct, concurrency), find(routed, concurrency)) {
                println!(
                    "gateway {how}, concurrency {concurrency}: adds {:.3} ms at p50 (target < 0.5), \
                     {:.3} ms at p99 (target < 2); throughput {:.2}× direct (target ≥ 0.9)",
                    g.p50_ms - d.p50_ms,
                    g.p99_ms - d.p99_ms,
                    g.per_second / d.per_second
                );
                // Which of the three targets this pair is judged on (docs/decisions.md).
                let judged = match (routed, concurrency) {
                    (ROUTED_MLP_PINNED, 1) => {
                        "the latency targets (throughput at concurrency 1 is 1 / latency)"
                    }
                    (ROUTED_MLP_PINNED, _) => {
                        "the throughput target (latency here is the model's queue)"
                    }
                    (ROUTED_PINNED, _) => "none: the gateway's own cost, with no model to serve",
                    _ => "none: the gateway takes CPU from the worker, as no deployment does",
                };
                println!("  judged on: {judged}");
                // Requests per second × CPU per request: how busy each core was.
                let busy = |r: &Row, us: f64| r.per_second * us / 1e4;
                let [client, gateway, worker] = g.cpu_us;
                if routed == ROUTED_PINNED {
                    println!(
                        "  through the gateway: its core {:.0}% busy, the clients' + worker's \
                         {:.0}% (direct: {:.0}%)",
                        busy(g, gateway),
                        busy(g, client + worker),
                        busy(d, d.cpu_us[0] + d.cpu_us[2])
                    );
                } else if routed == ROUTED_MLP_PINNED {
                    println!(
                        "  through the gateway: the worker's core {:.0}% busy (direct: {:.0}%), \
                         the clients' + gateway's {:.0}%",
                        busy(g, worker),
                        busy(d, d.cpu_us[2]),
                        busy(g, client + gateway)
                    );
                }
            }
        }
    }
}
