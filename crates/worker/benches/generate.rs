//! `cargo xtask bench generate`: SmolLM2-135M-Instruct decoding through the
//! worker against an in-process ONNX Runtime decode loop, both variants.
//!
//! Rows of the table, per variant (`smollm2-135m-instruct`, 4-bit, and
//! `smollm2-135m-instruct-fp32`):
//! - raw ONNX Runtime: one session, a prompt prefilled for `b` identical rows,
//!   then greedy decode steps in a loop, `b` = 1, 4, 8, 16 — the limit; for a
//!   model whose `config.yaml` says `kv_cache: shared`, also the same loop
//!   with each past and present bound to one buffer the graph writes in place;
//! - the worker over gRPC: `c` = 1, 4, 8, 16 concurrent `GenerateStream`
//!   calls, each restarted as soon as it ends, for the measuring time;
//!   tokens/s counts every streamed token, time to first token is from the
//!   call to its first token. A `kv_cache: shared` model is served twice: as
//!   converted, and with `kv_cache: copy`; a model whose config turns the
//!   prefix cache on (`prefix_cache_tokens`) is also served without it. Every
//!   stream sends the same prompt, so with the cache a request after the
//!   first runs no prefill at all, and without it every prompt is prefilled
//!   whole: the best and the worst case for the cache.
//!
//! A variant whose `config.yaml` names a `cpu_graph` (the 4-bit one: lmgrid's
//! own kernels) runs the raw loop over both graphs, and the worker serves it
//! as converted (the CPU graph, cache in place), with the cache copied, and
//! with `model.onnx` (`MatMulNBits`); the `graph` column says which ran.
//!
//! Worker rows also show the mean decode step and regathering time per step,
//! from the worker's own histograms. Also printed: resident memory after
//! loading each variant. The models come
//! from `cargo xtask models`. `LMGRID_BENCH_SECONDS` (default 10) sets the
//! measuring time per row, `LMGRID_BENCH_TOKENS` (default 64) the tokens per
//! stream, `LMGRID_BENCH_VARIANTS` a comma-separated subset of variants.
//! `LMGRID_BENCH_QUICK=1` runs only the worker as converted, and with the
//! prefix cache off where the converter turns it on (no raw loop, no other
//! graphs or caches, no drift check): an A/B of one graph in ~2 minutes.
//! `LMGRID_BENCH_AB=A,B` compares two graph files of the first variant (paths
//! relative to its `1/` directory, or absolute; the cache in place) in the
//! raw loop, alternating 64-step cycles of the two for 8 rounds at 1 and 8
//! rows, and prints each one's median and fastest decode step and median
//! prefill: on a machine whose speed drifts by 10–20% between minutes, the
//! alternation puts the drift on both alike.
//!
//! `LMGRID_BENCH_PROFILE=1` runs, instead of the table, the raw loop under
//! ONNX Runtime's profiler for every graph at 1 and 8 rows and prints where
//! a decode step's time goes by operator type (and a prompt's, at 1 row),
//! with what the session spends between its kernels.

use std::time::{Duration, Instant};

use lmgrid_proto::lmgrid::v1 as pb;
use lmgrid_proto::lmgrid::v1::generation_service_client::GenerationServiceClient;
use lmgrid_worker::engine::{ProviderConfig, Runtime};
use ort::memory::{AllocationDevice, AllocatorType, MemoryInfo, MemoryType};
use ort::value::{DynValue, Tensor};
use tokio::task::JoinSet;
use tonic::transport::Channel;

mod support;
use support::{models_dir, percentile_ms, start_worker};

const QUESTION: &str = "Write a long story about a lighthouse keeper and a storm.";
const WIDTHS: [usize; 4] = [1, 4, 8, 16];

/// How the KV cache passes between steps (`kv_cache: copy` or `shared`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cache {
    Copied,
    InPlace,
}

struct Row {
    variant: String,
    /// The graph file that ran (`model.onnx`, or the model's `cpu_graph`).
    graph: String,
    /// The raw decode loop, else the worker.
    raw: bool,
    cache: Cache,
    /// Worker rows: whether the worker's prefix cache was off although the
    /// converted config turns it on.
    no_prefix_cache: bool,
    streams: usize,
    tokens_per_s: f64,
    ttft_p50_ms: f64,
    ttft_p99_ms: f64,
    /// Worker rows: mean decode step and regathering time per step, from
    /// the worker's own histograms over the row.
    step_ms: f64,
    regather_ms: f64,
}

fn env_or<T: std::str::FromStr>(key: &str, default: T) -> T {
    std::env::var(key)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

/// Resident and peak memory of this process, in MiB.
fn memory_mib() -> (f64, f64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kb| kb.parse::<f64>().ok())
            .map_or(f64::NAN, |kb| kb / 1024.0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

fn main() -> anyhow::Result<()> {
    let seconds: f64 = env_or("LMGRID_BENCH_SECONDS", 10.0);
    let tokens: usize = env_or("LMGRID_BENCH_TOKENS", 64);
    let measure = Duration::from_secs_f64(seconds);
    let models = models_dir();
    let variants: Vec<String> = std::env::var("LMGRID_BENCH_VARIANTS")
        .unwrap_or_else(|_| "smollm2-135m-instruct,smollm2-135m-instruct-fp32".into())
        .split(',')
        .map(str::to_string)
        .collect();
    for v in &variants {
        anyhow::ensure!(
            models.join(v).join("1/model.onnx").is_file(),
            "{} is missing: run `cargo xtask models`",
            models.join(v).display()
        );
    }
    println!(
        "lmgrid generate benchmark: {} CPUs, {seconds}s per row, {tokens} tokens per stream, greedy",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );

    let runtime = Runtime::get(&Default::default())?;
    let profiling = std::env::var("LMGRID_BENCH_PROFILE").is_ok_and(|v| v == "1");
    let quick = std::env::var("LMGRID_BENCH_QUICK").is_ok_and(|v| v == "1");
    if let Ok(pair) = std::env::var("LMGRID_BENCH_AB") {
        let dir = models.join(&variants[0]).join("1");
        let graphs: Vec<std::path::PathBuf> = pair.split(',').map(|g| dir.join(g)).collect();
        anyhow::ensure!(graphs.len() == 2, "LMGRID_BENCH_AB: two graph files, A,B");
        return ab(runtime, &graphs, tokens);
    }
    let mut rows = Vec::new();
    let mut memory = Vec::new();
    let mut drifts = Vec::new();
    let shared = |variant: &str| {
        std::fs::read_to_string(models.join(variant).join("config.yaml"))
            .is_ok_and(|config| config.lines().any(|l| l.trim() == "kv_cache: shared"))
    };
    // The graphs a variant has: its `cpu_graph` (what the worker loads on this CPU) first
    // when it names one and this CPU runs lmgrid's kernels, then model.onnx.
    let graphs = |variant: &str| {
        let config =
            std::fs::read_to_string(models.join(variant).join("config.yaml")).unwrap_or_default();
        let cpu = config
            .lines()
            .find_map(|l| l.strip_prefix("cpu_graph:"))
            .map(|f| f.trim().to_string())
            .filter(|_| lmgrid_kernels::q4::accelerated());
        cpu.into_iter()
            .chain(["model.onnx".to_string()])
            .collect::<Vec<_>>()
    };
    for variant in variants.iter().filter(|_| !quick) {
        let caches: &[Cache] = if shared(variant) {
            &[Cache::Copied, Cache::InPlace]
        } else {
            &[Cache::Copied]
        };
        for graph in graphs(variant) {
            let path = models.join(variant).join("1").join(&graph);
            if profiling {
                let cache = caches.last().copied().unwrap_or(Cache::Copied);
                profile(runtime, &path, variant, &graph, cache, tokens)?;
                continue;
            }
            let (mut session, _, _) =
                runtime.session(&path, None, &ProviderConfig::default(), 2)?;
            for width in WIDTHS {
                for &cache in caches {
                    let mut row = raw_row(&mut session, variant, cache, width, tokens, measure)?;
                    row.graph = graph.clone();
                    rows.push(row);
                }
            }
        }
    }

    if profiling {
        return Ok(());
    }

    let tokio = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    for variant in &variants {
        let graphs = graphs(variant);
        // As converted first (its memory and drift are reported), then without the prefix
        // cache where the converter turns it on (every prompt prefilled whole: the streams
        // all send one prompt, which the cache serves whole after the first time), then the
        // copied cache, then model.onnx where the converter wrote a CPU graph too.
        let converted = std::fs::read_to_string(models.join(variant).join("config.yaml"))?;
        let prefix_cache = converted
            .lines()
            .any(|l| l.trim_start().starts_with("prefix_cache_tokens:"));
        let mut served: Vec<(String, Cache, bool)> = Vec::new();
        if shared(variant) {
            served.push((graphs[0].clone(), Cache::InPlace, false));
        }
        let first = if shared(variant) {
            Cache::InPlace
        } else {
            Cache::Copied
        };
        if prefix_cache {
            served.push((graphs[0].clone(), first, true));
        }
        if !quick {
            served.push((graphs[0].clone(), Cache::Copied, false));
            if graphs.len() > 1 {
                served.push(("model.onnx".to_string(), first, false));
            }
        }
        for (index, (graph, cache, no_prefix_cache)) in served.iter().cloned().enumerate() {
            // A repository holding just this variant, so memory is its own; the copied
            // cache of a shared model through its config.
            let repo = tempfile::tempdir()?;
            let dir = repo.path().join(variant);
            std::fs::create_dir(&dir)?;
            for entry in std::fs::read_dir(models.join(variant))? {
                let entry = entry?;
                if entry.file_name() != "config.yaml" {
                    std::os::unix::fs::symlink(entry.path(), dir.join(entry.file_name()))?;
                }
            }
            let config = match cache {
                Cache::InPlace => converted.clone(),
                Cache::Copied => converted.replace("kv_cache: shared", "kv_cache: copy"),
            };
            let config = config
                .lines()
                .filter(|l| !(graph == "model.onnx" && l.starts_with("cpu_graph:")))
                .filter(|l| {
                    !(no_prefix_cache && l.trim_start().starts_with("prefix_cache_tokens:"))
                })
                .collect::<Vec<_>>()
                .join("\n");
            std::fs::write(dir.join("config.yaml"), config)?;
            let before = memory_mib().0;
            tokio.block_on(async {
                let worker =
                    start_worker(repo.path(), &[variant.as_str()], Duration::from_secs(120))
                        .await?;
                let addr = worker.addr;
                if index == 0 {
                    memory.push((variant.clone(), memory_mib().0 - before));
                }
                let channel = Channel::from_shared(format!("http://{addr}"))?
                    .tcp_nodelay(true)
                    .connect()
                    .await?;
                // Warm up, as the raw loop does.
                worker_row(&channel, variant, cache, 1, 4, Duration::from_millis(1)).await?;
                for streams in WIDTHS {
                    let mut row =
                        worker_row(&channel, variant, cache, streams, tokens, measure).await?;
                    row.graph = graph.clone();
                    row.no_prefix_cache = no_prefix_cache;
                    rows.push(row);
                }
                if index == 0 && !quick {
                    drifts.push((variant.clone(), drift(&channel, variant).await?));
                }
                worker.stop().await?;
                anyhow::Ok(())
            })?;
        }
    }

    println!();
    println!(
        "| variant | graph | case | streams | tokens/s | × 1 stream | TTFT p50 ms | TTFT p99 ms | worker / raw | step ms | regather ms / step |"
    );
    println!("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for row in &rows {
        let single = rows
            .iter()
            .find(|r| {
                r.variant == row.variant
                    && r.graph == row.graph
                    && r.raw == row.raw
                    && r.cache == row.cache
                    && r.no_prefix_cache == row.no_prefix_cache
                    && r.streams == 1
            })
            .map_or(f64::NAN, |r| row.tokens_per_s / r.tokens_per_s);
        let raw = rows
            .iter()
            .find(|r| {
                r.variant == row.variant
                    && r.graph == row.graph
                    && r.raw
                    && r.cache == row.cache
                    && r.streams == row.streams
            })
            .map_or(f64::NAN, |r| row.tokens_per_s / r.tokens_per_s);
        let case = match (row.raw, row.cache) {
            (true, Cache::Copied) => "raw ONNX Runtime",
            (true, Cache::InPlace) => "raw ONNX Runtime, cache in place",
            (false, Cache::Copied) => "worker (GenerateStream), cache copied",
            (false, Cache::InPlace) => "worker (GenerateStream), cache in place",
        };
        let case = if row.no_prefix_cache {
            format!("{case}, prefix cache off")
        } else {
            case.to_string()
        };
        println!(
            "| {} | {} | {} | {} | {:.1} | {:.2} | {:.1} | {:.1} | {} | {} | {} |",
            row.variant,
            row.graph,
            case,
            row.streams,
            row.tokens_per_s,
            single,
            row.ttft_p50_ms,
            row.ttft_p99_ms,
            if row.raw {
                "—".to_string()
            } else {
                format!("{raw:.2}")
            },
            dash_or(row.step_ms),
            dash_or(row.regather_ms),
        );
    }
    println!();
    for (variant, mib) in &memory {
        println!("resident memory added by loading {variant} in a worker: {mib:.0} MiB");
    }
    println!(
        "peak resident memory of the benchmark process: {:.0} MiB",
        memory_mib().1
    );
    println!();
    println!(
        "greedy drift under continuous batching (8 prompts, 32 tokens, each joining a running batch at a different step):"
    );
    for (variant, d) in &drifts {
        println!("  {variant}: {d}");
    }
    Ok(())
}

fn value(shape: Vec<i64>, data: Vec<i64>) -> anyhow::Result<DynValue> {
    Ok(Tensor::from_array((shape, data))?.into_dyn())
}

/// Prefills a fixed prompt for `width` rows, then decodes greedily in a loop
/// until `measure` has passed, restarting after `tokens` steps.
fn raw_row(
    session: &mut ort::session::Session,
    variant: &str,
    cache: Cache,
    width: usize,
    tokens: usize,
    measure: Duration,
) -> anyhow::Result<Row> {
    let layers = session
        .inputs()
        .iter()
        .filter(|i| i.name().ends_with(".key") && i.name().starts_with("past_key_values."))
        .count();
    let cycle = match cache {
        Cache::Copied => decode_cycle,
        Cache::InPlace => decode_cycle_in_place,
    };
    // Warm up: ONNX Runtime's first runs allocate its arenas.
    cycle(session, layers, width, 4)?;
    let mut generated = 0usize;
    let mut ttfts = Vec::new();
    let started = Instant::now();
    while started.elapsed() < measure {
        let (ttft, n) = cycle(session, layers, width, tokens)?;
        ttfts.push(ttft);
        generated += n;
    }
    let elapsed = started.elapsed().as_secs_f64();
    ttfts.sort();
    Ok(Row {
        variant: variant.to_string(),
        graph: String::new(),
        raw: true,
        cache,
        no_prefix_cache: false,
        streams: width,
        tokens_per_s: generated as f64 / elapsed,
        ttft_p50_ms: percentile_ms(&ttfts, 0.5),
        ttft_p99_ms: percentile_ms(&ttfts, 0.99),
        step_ms: f64::NAN,
        regather_ms: f64::NAN,
    })
}

/// The raw loop's prompt: 40 tokens (the length of a short templated chat;
/// the ids themselves do not change the cost).
fn raw_prompt() -> Vec<i64> {
    (0..40).map(|i| 1000 + i).collect()
}

/// Prefills [`raw_prompt`] for `width` rows, then decodes `steps` tokens
/// greedily. Returns the time to the first token and the tokens made.
fn decode_cycle(
    session: &mut ort::session::Session,
    layers: usize,
    width: usize,
    steps: usize,
) -> anyhow::Result<(Duration, usize)> {
    let prompt = raw_prompt();
    let t = Instant::now();
    let mut ttft = Duration::ZERO;
    let mut past: Vec<DynValue> = Vec::with_capacity(2 * layers);
    for _ in 0..2 * layers {
        past.push(
            Tensor::from_array((vec![width as i64, 3, 0, 64], Vec::<f32>::new()))?.into_dyn(),
        );
    }
    let mut ids: Vec<i64> = prompt
        .iter()
        .cycle()
        .take(width * prompt.len())
        .copied()
        .collect();
    let mut positions: Vec<i64> = (0..width).flat_map(|_| 0..prompt.len() as i64).collect();
    let mut seq = prompt.len();
    let mut len = 0usize;
    let takes_positions = session.inputs().iter().any(|i| i.name() == "position_ids");
    for step in 0..steps {
        let mask = vec![1i64; width * (len + seq)];
        let mut inputs: Vec<(String, DynValue)> = vec![
            (
                "input_ids".into(),
                value(vec![width as i64, seq as i64], ids)?,
            ),
            (
                "attention_mask".into(),
                value(vec![width as i64, (len + seq) as i64], mask)?,
            ),
        ];
        // Rows of equal length: the same mask for left and right padding; a
        // right-padded graph may take no positions.
        if takes_positions {
            inputs.push((
                "position_ids".into(),
                value(vec![width as i64, seq as i64], positions)?,
            ));
        }
        for (i, v) in past.into_iter().enumerate() {
            let part = if i % 2 == 0 { "key" } else { "value" };
            inputs.push((format!("past_key_values.{}.{part}", i / 2), v));
        }
        let mut outputs = session.run(inputs)?;
        let logits = outputs
            .remove("logits")
            .ok_or_else(|| anyhow::anyhow!("no logits"))?;
        let next = greedy(&logits)?;
        past = (0..2 * layers)
            .map(|i| {
                let part = if i % 2 == 0 { "key" } else { "value" };
                outputs
                    .remove(format!("present.{}.{part}", i / 2).as_str())
                    .ok_or_else(|| anyhow::anyhow!("no present"))
            })
            .collect::<anyhow::Result<_>>()?;
        if step == 0 {
            ttft = t.elapsed();
        }
        len += seq;
        seq = 1;
        positions = vec![len as i64; width];
        ids = next;
    }
    Ok((ttft, steps * width))
}

fn dash_or(ms: f64) -> String {
    if ms.is_nan() {
        "—".to_string()
    } else {
        format!("{ms:.1}")
    }
}

/// Each row's most likely next token.
fn greedy(logits: &DynValue) -> anyhow::Result<Vec<i64>> {
    let (shape, data) = logits.try_extract_tensor::<f32>()?;
    let vocab = shape[2] as usize;
    Ok(data
        .chunks(vocab)
        .map(|row| {
            row.iter()
                .enumerate()
                .fold((0, f32::MIN), |b, (i, &v)| if v > b.1 { (i, v) } else { b })
                .0 as i64
        })
        .collect())
}

/// [`decode_cycle`] for a right-padded graph that updates its cache in place:
/// each past and its present are bound to one buffer with room for the whole
/// cycle, so no step copies the cache.
fn decode_cycle_in_place(
    session: &mut ort::session::Session,
    layers: usize,
    width: usize,
    steps: usize,
) -> anyhow::Result<(Duration, usize)> {
    let prompt = raw_prompt();
    let t = Instant::now();
    let mut ttft = Duration::ZERO;
    let capacity = prompt.len() + steps;
    let mut buffers = (0..2 * layers)
        .map(|_| Ok(Tensor::<f32>::new(session.allocator(), [width, 3, capacity, 64])?.into_dyn()))
        .collect::<anyhow::Result<Vec<DynValue>>>()?;
    let cpu = MemoryInfo::new(
        AllocationDevice::CPU,
        0,
        AllocatorType::Device,
        MemoryType::Default,
    )?;
    let mut ids: Vec<i64> = prompt
        .iter()
        .cycle()
        .take(width * prompt.len())
        .copied()
        .collect();
    let mut seq = prompt.len();
    let mut len = 0usize;
    for step in 0..steps {
        let mut binding = session.create_binding()?;
        binding.bind_input("input_ids", &value(vec![width as i64, seq as i64], ids)?)?;
        let mask = vec![1i64; width * (len + seq)];
        binding.bind_input(
            "attention_mask",
            &value(vec![width as i64, (len + seq) as i64], mask)?,
        )?;
        for (i, buffer) in buffers.iter_mut().enumerate() {
            let part = if i % 2 == 0 { "key" } else { "value" };
            binding.bind_input(format!("past_key_values.{}.{part}", i / 2), buffer)?;
            binding.bind_output(format!("present.{}.{part}", i / 2), buffer)?;
        }
        binding.bind_output_to_device("logits", &cpu)?;
        let mut outputs = session.run_binding(&binding)?;
        let logits = outputs
            .remove("logits")
            .ok_or_else(|| anyhow::anyhow!("no logits"))?;
        let next = greedy(&logits)?;
        if step == 0 {
            ttft = t.elapsed();
        }
        len += seq;
        seq = 1;
        ids = next;
    }
    Ok((ttft, steps * width))
}

/// `LMGRID_BENCH_AB`: the two graphs' raw loops (cache in place), alternating
/// cycles of `tokens` steps, at 1 and 8 rows.
fn ab(runtime: &Runtime, graphs: &[std::path::PathBuf], tokens: usize) -> anyhow::Result<()> {
    const ROUNDS: usize = 8;
    let mut sessions = Vec::new();
    for graph in graphs {
        let (session, _, _) = runtime.session(graph, None, &ProviderConfig::default(), 2)?;
        sessions.push(session);
    }
    let layers = sessions[0]
        .inputs()
        .iter()
        .filter(|i| i.name().ends_with(".key") && i.name().starts_with("past_key_values."))
        .count();
    println!(
        "| graph | rows | decode step ms, median | fastest | prefill ms, median | rounds |\n|---|---:|---:|---:|---:|---:|"
    );
    for width in [1, 8] {
        let mut steps = vec![Vec::new(); sessions.len()];
        let mut prefills = vec![Vec::new(); sessions.len()];
        for session in &mut sessions {
            decode_cycle_in_place(session, layers, width, 4)?;
        }
        for _ in 0..ROUNDS {
            for (i, session) in sessions.iter_mut().enumerate() {
                let started = Instant::now();
                let (prefill, _) = decode_cycle_in_place(session, layers, width, tokens)?;
                let decode = started.elapsed() - prefill;
                steps[i].push(decode.as_secs_f64() * 1e3 / (tokens - 1) as f64);
                prefills[i].push(prefill.as_secs_f64() * 1e3);
            }
        }
        for (i, graph) in graphs.iter().enumerate() {
            let median = |v: &mut Vec<f64>| {
                v.sort_by(f64::total_cmp);
                v[v.len() / 2]
            };
            let fastest = steps[i].iter().copied().fold(f64::INFINITY, f64::min);
            println!(
                "| {} | {width} | {:.2} | {fastest:.2} | {:.1} | {ROUNDS} |",
                graph.display(),
                median(&mut steps[i]),
                median(&mut prefills[i])
            );
        }
    }
    Ok(())
}

const STEP: &str = "lmgrid_worker_decode_step_duration_seconds";
const REGATHER: &str = "lmgrid_worker_kv_rebuild_duration_seconds";

/// Count and sum of one of the worker's histograms for `model`, from the
/// process registry.
fn histogram(name: &str, model: &str) -> (f64, f64) {
    lmgrid_core::metrics::registry()
        .gather()
        .iter()
        .filter(|family| family.name() == name)
        .flat_map(|family| family.get_metric())
        .filter(|metric| {
            metric
                .get_label()
                .iter()
                .any(|l| l.name() == "model" && l.value() == model)
        })
        .map(|metric| {
            let h = metric.get_histogram();
            (h.get_sample_count() as f64, h.get_sample_sum())
        })
        .fold((0.0, 0.0), |a, b| (a.0 + b.0, a.1 + b.1))
}

const DRIFT_PROMPTS: [&str; 8] = [
    "What is the capital of France?",
    "Name three colours.",
    "Write one sentence about the sea and the wind over the water at night.",
    "2+2=?",
    "Who wrote Hamlet?",
    "List the days of the week, starting from Monday, separated by commas, please.",
    "Hi!",
    "Explain in a few words why the sky is blue during the day.",
];

fn greedy_chat(model: &str, question: &str, max_tokens: u32) -> pb::GenerateRequest {
    pb::GenerateRequest {
        model: Some(pb::ModelRef {
            name: model.to_string(),
            version: String::new(),
        }),
        input: Some(pb::generate_request::Input::Chat(pb::ChatMessages {
            messages: vec![pb::ChatMessage {
                role: "user".into(),
                content: question.into(),
                name: String::new(),
            }],
        })),
        sampling: Some(pb::SamplingParams {
            max_tokens,
            ..Default::default()
        }),
        return_token_ids: true,
        ..Default::default()
    }
}

/// Decodes each prompt alone, then all eight with each joining once the previous one is
/// decoding, and says how many came out token for token the same and where the others first
/// differ.
async fn drift(channel: &Channel, variant: &str) -> anyhow::Result<String> {
    let mut client = GenerationServiceClient::new(channel.clone());
    let mut alone = Vec::new();
    for q in DRIFT_PROMPTS {
        let response = client
            .generate(greedy_chat(variant, q, 32))
            .await?
            .into_inner();
        alone.push(response.completions[0].token_ids.clone());
    }
    let mut tasks = JoinSet::new();
    for (i, q) in DRIFT_PROMPTS.iter().enumerate() {
        let mut stream = client
            .generate_stream(greedy_chat(variant, q, 32))
            .await?
            .into_inner();
        let mut tokens = Vec::new();
        while tokens.len() < 2 {
            match stream.message().await? {
                Some(m) => tokens.extend(m.token_ids),
                None => break,
            }
        }
        tasks.spawn(async move {
            while let Some(m) = stream.message().await? {
                tokens.extend(m.token_ids);
            }
            anyhow::Ok((i, tokens))
        });
    }
    let mut same = 0;
    let mut divergences = Vec::new();
    while let Some(done) = tasks.join_next().await {
        let (i, tokens) = done??;
        match tokens.iter().zip(&alone[i]).position(|(a, b)| a != b) {
            None if tokens.len() == alone[i].len() => same += 1,
            None => divergences.push(tokens.len().min(alone[i].len())),
            Some(at) => divergences.push(at),
        }
    }
    divergences.sort_unstable();
    Ok(format!(
        "{same}/8 identical to decoding alone; the others first differ at token {divergences:?}"
    ))
}

/// `streams` concurrent streams, each restarted when it ends, for `measure`.
async fn worker_row(
    channel: &Channel,
    variant: &str,
    cache: Cache,
    streams: usize,
    tokens: usize,
    measure: Duration,
) -> anyhow::Result<Row> {
    let steps_before = histogram(STEP, variant);
    let regathers_before = histogram(REGATHER, variant);
    let started = Instant::now();
    let until = started + measure;
    let mut tasks = JoinSet::new();
    for _ in 0..streams {
        let mut client = GenerationServiceClient::new(channel.clone());
        let model = variant.to_string();
        tasks.spawn(async move {
            let mut generated = 0usize;
            let mut ttfts = Vec::new();
            while Instant::now() < until {
                let request = pb::GenerateRequest {
                    model: Some(pb::ModelRef {
                        name: model.clone(),
                        version: String::new(),
                    }),
                    input: Some(pb::generate_request::Input::Chat(pb::ChatMessages {
                        messages: vec![pb::ChatMessage {
                            role: "user".into(),
                            content: QUESTION.into(),
                            name: String::new(),
                        }],
                    })),
                    sampling: Some(pb::SamplingParams {
                        max_tokens: tokens as u32,
                        ..Default::default()
                    }),
                    return_token_ids: true,
                    ..Default::default()
                };
                let t = Instant::now();
                let mut stream = client.generate_stream(request).await?.into_inner();
                let mut first = true;
                while let Some(message) = stream.message().await? {
                    if first && !message.token_ids.is_empty() {
                        ttfts.push(t.elapsed());
                        first = false;
                    }
                    generated += message.token_ids.len();
                }
            }
            anyhow::Ok((generated, ttfts))
        });
    }
    let mut generated = 0;
    let mut ttfts = Vec::new();
    while let Some(done) = tasks.join_next().await {
        let (g, t) = done??;
        generated += g;
        ttfts.extend(t);
    }
    let elapsed = started.elapsed().as_secs_f64();
    ttfts.sort();
    let (steps, step_seconds) = histogram(STEP, variant);
    let (_, regather_seconds) = histogram(REGATHER, variant);
    let steps = (steps - steps_before.0).max(1.0);
    Ok(Row {
        variant: variant.to_string(),
        graph: String::new(),
        raw: false,
        cache,
        no_prefix_cache: false,
        streams,
        tokens_per_s: generated as f64 / elapsed,
        ttft_p50_ms: percentile_ms(&ttfts, 0.5),
        ttft_p99_ms: percentile_ms(&ttfts, 0.99),
        step_ms: (step_seconds - steps_before.1) / steps * 1e3,
        regather_ms: (regather_seconds - regathers_before.1) / steps * 1e3,
    })
}

/// Decode cycles each profile covers, after one warm-up cycle.
const PROFILED_CYCLES: usize = 3;

/// Runs the raw loop over `path` under ONNX Runtime's profiler at 1 and 8
/// rows and prints, per operator type, its kernels' time per decode step
/// (and per prompt at 1 row) and the session's time outside them.
fn profile(
    runtime: &Runtime,
    path: &std::path::Path,
    variant: &str,
    graph: &str,
    cache: Cache,
    tokens: usize,
) -> anyhow::Result<()> {
    let cycle = match cache {
        Cache::Copied => decode_cycle,
        Cache::InPlace => decode_cycle_in_place,
    };
    let dir = tempfile::tempdir()?;
    let mut columns = Vec::new();
    for width in [1, 8] {
        let mut session = runtime
            .builder(2)?
            .with_profiling(dir.path().join(format!("w{width}")))
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .commit_from_file(path)?;
        let layers = session
            .inputs()
            .iter()
            .filter(|i| i.name().ends_with(".key") && i.name().starts_with("past_key_values."))
            .count();
        for _ in 0..=PROFILED_CYCLES {
            cycle(&mut session, layers, width, tokens)?;
        }
        let file = session.end_profiling()?;
        let events: Vec<serde_json::Value> = serde_json::from_slice(&std::fs::read(&file)?)?;
        columns.push(split_profile(&events, tokens)?);
    }
    println!();
    println!(
        "ONNX Runtime's profile: {variant}, {graph}, {} cache, {tokens}-step cycles ({PROFILED_CYCLES} after a warm-up one); µs per decode step at 1 and 8 rows, per 40-token prompt at 1 row",
        match cache {
            Cache::Copied => "copied",
            Cache::InPlace => "in-place",
        }
    );
    println!(
        "| operator | kernels per step | 1 row µs/step | share | 8 rows µs/step | share | prompt µs |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|");
    let (one, eight) = (&columns[0], &columns[1]);
    let mut ops: Vec<&String> = one.decode.keys().chain(eight.decode.keys()).collect();
    ops.sort_by(|a, b| {
        let total = |op: &String| one.decode.get(op).map_or(0.0, |t| t.1);
        total(b).total_cmp(&total(a)).then(a.cmp(b))
    });
    ops.dedup();
    let share = |c: &ProfileColumn, op: &String| {
        c.decode
            .get(op)
            .map_or((0.0, 0.0), |t| (t.1, 100.0 * t.1 / c.run))
    };
    for op in ops {
        let (a, a_share) = share(one, op);
        let (b, b_share) = share(eight, op);
        println!(
            "| {op} | {:.0} | {a:.0} | {a_share:.1}% | {b:.0} | {b_share:.1}% | {:.0} |",
            one.decode.get(op).map_or(0.0, |t| t.0),
            one.prompt.get(op).copied().unwrap_or(0.0),
        );
    }
    let outside = |c: &ProfileColumn| c.run - c.decode.values().map(|t| t.1).sum::<f64>();
    println!(
        "| between kernels (the session's own work) | — | {:.0} | {:.1}% | {:.0} | {:.1}% | {:.0} |",
        outside(one),
        100.0 * outside(one) / one.run,
        outside(eight),
        100.0 * outside(eight) / eight.run,
        one.prompt_run - one.prompt.values().sum::<f64>(),
    );
    println!(
        "| **whole run** | — | {:.0} | 100% | {:.0} | 100% | {:.0} |",
        one.run, eight.run, one.prompt_run
    );
    Ok(())
}

/// One profile's means: per operator type, kernels per decode step and µs
/// per step; µs per prompt; and the mean run of each kind.
#[derive(Debug, Default)]
struct ProfileColumn {
    decode: std::collections::BTreeMap<String, (f64, f64)>,
    prompt: std::collections::BTreeMap<String, f64>,
    run: f64,
    prompt_run: f64,
}

/// Splits ONNX Runtime's profile events into decode steps and prompts: the
/// runs (`model_run`) in time order, the first cycle's skipped, each
/// cycle's first run the prompt; each kernel (`…_kernel_time`) belongs to
/// the run whose span holds it.
fn split_profile(events: &[serde_json::Value], tokens: usize) -> anyhow::Result<ProfileColumn> {
    let span = |e: &serde_json::Value| -> Option<(f64, f64)> {
        Some((e.get("ts")?.as_f64()?, e.get("dur")?.as_f64()?))
    };
    fn name(e: &serde_json::Value) -> &str {
        e.get("name").and_then(|n| n.as_str()).unwrap_or("")
    }
    let mut runs: Vec<(f64, f64)> = events
        .iter()
        .filter(|e| name(e) == "model_run")
        .filter_map(span)
        .collect();
    runs.sort_by(|a, b| a.0.total_cmp(&b.0));
    anyhow::ensure!(
        runs.len() == (PROFILED_CYCLES + 1) * tokens,
        "the profile holds {} runs; expected {}",
        runs.len(),
        (PROFILED_CYCLES + 1) * tokens
    );
    let mut kernels: Vec<(f64, f64, &str)> = events
        .iter()
        .filter(|e| name(e).ends_with("_kernel_time"))
        .filter_map(|e| {
            let (ts, dur) = span(e)?;
            let op = e.pointer("/args/op_name").and_then(|o| o.as_str());
            Some((ts, dur, op.unwrap_or("?")))
        })
        .collect();
    kernels.sort_by(|a, b| a.0.total_cmp(&b.0));
    let mut column = ProfileColumn::default();
    let (mut steps, mut prompts) = (0usize, 0usize);
    let mut next = 0;
    for (index, &(start, dur)) in runs.iter().enumerate() {
        // Kernels before this run (the warm-up's, or between runs) are skipped.
        while next < kernels.len() && kernels[next].0 < start {
            next += 1;
        }
        let first = next;
        while next < kernels.len() && kernels[next].0 <= start + dur {
            next += 1;
        }
        if index < tokens {
            continue;
        }
        let prompt = index % tokens == 0;
        if prompt {
            prompts += 1;
            column.prompt_run += dur;
        } else {
            steps += 1;
            column.run += dur;
        }
        for &(_, d, op) in &kernels[first..next] {
            let op = op.to_string();
            if prompt {
                *column.prompt.entry(op).or_default() += d;
            } else {
                let entry = column.decode.entry(op).or_default();
                entry.0 += 1.0;
                entry.1 += d;
            }
        }
    }
    let (steps, prompts) = (steps.max(1) as f64, prompts.max(1) as f64);
    column.run /= steps;
    column.prompt_run /= prompts;
    for entry in column.decode.values_mut() {
        entry.0 /= steps;
        entry.1 /= steps;
    }
    for us in column.prompt.values_mut() {
        *us /= prompts;
    }
    Ok(column)
}
