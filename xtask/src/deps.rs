//! `cargo xtask deps`: installs what a fresh Debian machine needs to build and test lmgrid.
//!
//! Every step checks first and skips what is already present, so running it again is cheap.
//! Downloads go into the cache directory (`lmgrid_setup::cache_dir`) and come only from
//! package registries: ONNX Runtime's shared library is taken out of its PyPI wheel by
//! lmgrid-setup ([`onnxruntime`]), and the OpenAI SDK test's Python venv is built from pinned
//! requirements (`crate::sdk`). The real models have a command of their own, `cargo xtask
//! models`.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::bail;
use lmgrid_setup::{Progress, Setup, Stream};

use crate::{cargo, run_step, succeeds};

/// Programs the tests run, with the Debian package that provides each.
const SYSTEM_TOOLS: &[(&str, &str)] = &[
    ("etcd", "etcd-server"),
    ("redis-server", "redis-server"),
    ("promtool", "prometheus"),
];

/// Runs every dependency step in order.
pub(crate) fn install() -> anyhow::Result<()> {
    system_packages()?;
    rust_components();
    nextest();
    let cache = lmgrid_setup::ensure_cache_dir()?;
    println!("xtask: deps: cache directory {} ready", cache.display());
    onnxruntime(Stream::Stdout)?;
    crate::sdk::venv()?;
    Ok(())
}

/// Whether `cargo nextest` works.
pub(crate) fn has_nextest() -> bool {
    succeeds(cargo().args(["nextest", "--version"]))
}

/// Makes ONNX Runtime's CPU library available under the cache directory and returns its
/// absolute path, reporting to `stream`; the system's `python3 -m pip` downloads the wheel.
pub(crate) fn onnxruntime(stream: Stream) -> anyhow::Result<PathBuf> {
    let progress = Progress::new("xtask: deps:", stream);
    Setup::new(&lmgrid_setup::cache_dir()?, progress)?.onnxruntime(Path::new("python3"))
}

/// Installs the Debian packages of [`SYSTEM_TOOLS`] whose programs are not on `PATH`.
fn system_packages() -> anyhow::Result<()> {
    let missing = missing_tools();
    if missing.is_empty() {
        let all = tool_names(SYSTEM_TOOLS);
        println!("xtask: deps: {all} already on PATH, skipping apt-get");
        return Ok(());
    }
    let packages: Vec<&str> = missing.iter().map(|(_, package)| *package).collect();
    println!(
        "xtask: deps: {} not on PATH, installing Debian packages {}",
        tool_names(&missing),
        packages.join(" ")
    );
    if !on_path("apt-get") {
        bail!(
            "apt-get not found; install {} with your system's package manager",
            packages.join(", ")
        );
    }
    let sudo = if is_root() {
        false
    } else if on_path("sudo") {
        true
    } else {
        bail!(
            "installing {} needs root, and sudo is not available",
            packages.join(", ")
        );
    };
    run_step("apt-get update", &mut apt_get(sudo, &["update"]))?;
    let mut install = vec!["install", "-y", "--no-install-recommends"];
    install.extend(&packages);
    run_step("apt-get install", &mut apt_get(sudo, &install))?;
    let still_missing = missing_tools();
    if !still_missing.is_empty() {
        bail!(
            "still not on PATH after apt-get install: {}",
            tool_names(&still_missing)
        );
    }
    Ok(())
}

fn missing_tools() -> Vec<(&'static str, &'static str)> {
    let mut missing: Vec<_> = SYSTEM_TOOLS
        .iter()
        .copied()
        .filter(|(tool, _)| !on_path(tool))
        .collect();
    // The model conversion and the SDK test build venvs: Debian splits `venv` (with the
    // `ensurepip` it needs) out of python3 into python3-venv.
    if !succeeds(Command::new("python3").args(["-c", "import ensurepip, venv"])) {
        missing.push(("python3 -m venv", "python3-venv"));
    }
    missing
}

fn tool_names(tools: &[(&str, &str)]) -> String {
    tools
        .iter()
        .map(|(tool, _)| *tool)
        .collect::<Vec<_>>()
        .join(", ")
}

/// `apt-get` without prompts, through non-interactive `sudo` when not root.
fn apt_get(sudo: bool, args: &[&str]) -> Command {
    let mut command = if sudo {
        // `sudo` may reset the environment, so the variable goes through `env` instead.
        let mut command = Command::new("sudo");
        command.args(["-n", "env", "DEBIAN_FRONTEND=noninteractive", "apt-get"]);
        command
    } else {
        let mut command = Command::new("apt-get");
        command.env("DEBIAN_FRONTEND", "noninteractive");
        command
    };
    command.args(args);
    command
}

/// Adds rustfmt and clippy through rustup when missing. Not fatal: `cargo xtask test` needs
/// neither, and `cargo xtask ci` fails at its fmt or clippy step with a clear message.
fn rust_components() {
    let missing: Vec<&str> = [("fmt", "rustfmt"), ("clippy", "clippy")]
        .into_iter()
        .filter(|(subcommand, _)| !succeeds(cargo().args([subcommand, "--version"])))
        .map(|(_, component)| component)
        .collect();
    if missing.is_empty() {
        println!("xtask: deps: rustfmt and clippy present, skipping rustup");
        return;
    }
    if !on_path("rustup") {
        println!(
            "xtask: deps: warning: {} missing and rustup unavailable",
            missing.join(", ")
        );
        return;
    }
    let mut command = Command::new("rustup");
    command.args(["component", "add"]).args(&missing);
    if let Err(err) = run_step("rustup component add", &mut command) {
        println!("xtask: deps: warning: {err:#}");
    }
}

/// Installs cargo-nextest from crates.io when `cargo nextest` is missing. Not fatal: the
/// tests fall back to `cargo test`.
fn nextest() {
    if has_nextest() {
        println!("xtask: deps: cargo-nextest present, skipping install");
        return;
    }
    let mut command = cargo();
    command.args(["install", "cargo-nextest", "--locked"]);
    if let Err(err) = run_step("install cargo-nextest", &mut command) {
        println!("xtask: deps: warning: {err:#}; tests will use cargo test");
    }
}

/// Whether an executable file named `program` is in a `PATH` directory.
fn on_path(program: &str) -> bool {
    use std::os::unix::fs::PermissionsExt as _;
    std::env::var_os("PATH").is_some_and(|path| {
        std::env::split_paths(&path).any(|dir| {
            std::fs::metadata(dir.join(program))
                .is_ok_and(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0)
        })
    })
}

/// Whether this process runs as root, asked of `id -u` to stay free of libc.
fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|output| output.status.success() && output.stdout.trim_ascii() == b"0")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn apt_get_is_non_interactive() {
        let root = apt_get(false, &["update"]);
        assert_eq!(lmgrid_setup::show(&root), "apt-get update");
        let env = root.get_envs().find(|(key, _)| *key == "DEBIAN_FRONTEND");
        assert_eq!(
            env.and_then(|(_, value)| value),
            Some("noninteractive".as_ref())
        );

        let sudo = apt_get(true, &["install", "-y", "etcd-server"]);
        assert_eq!(
            lmgrid_setup::show(&sudo),
            "sudo -n env DEBIAN_FRONTEND=noninteractive apt-get install -y etcd-server"
        );
    }
}
