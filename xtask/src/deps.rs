//! `cargo xtask deps`: installs what a fresh Debian machine needs to build and test lmgrid.
//!
//! Every step checks first and skips what is already present, so running it again is cheap.
//! Downloads go into [`cache_dir`] and come only from package registries: ONNX Runtime's
//! shared library is taken out of its PyPI wheel ([`onnxruntime`]), and the OpenAI SDK test's
//! Python venv is built from pinned requirements (`crate::sdk`). The real models have a
//! command of their own, `cargo xtask models` (`crate::models`).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, bail};

use crate::{Progress, cargo, run_step, run_step_with, succeeds};

/// The ONNX Runtime release lmgrid runs against; it must stay in step with the `api-31`
/// feature of the `ort` crate.
pub(crate) const ORT_VERSION: &str = "1.31.1";

/// Where [`onnxruntime`] puts ONNX Runtime's shared library, relative to [`cache_dir`].
///
/// The worker loads the library named by its config, else by `ORT_DYLIB_PATH`, else this
/// file under the cache directory, so after `cargo xtask deps` a worker on the same machine
/// needs no setting at all. Elsewhere, `ORT_DYLIB_PATH=$(cargo xtask ort-path)` names it.
/// The CPU wheel ships only this versioned file name, without a `libonnxruntime.so` link.
pub(crate) const ORT_LIBRARY_PATH: &str = "onnxruntime/1.31.1/libonnxruntime.so.1.31.1";

/// The PyPI requirement whose wheel carries the CPU build of ONNX Runtime.
const ORT_REQUIREMENT: &str = "onnxruntime==1.31.1";

/// The library's path inside the wheel, a zip archive.
const ORT_WHEEL_MEMBER: &str = "onnxruntime/capi/libonnxruntime.so.1.31.1";

/// Copies one member of a zip archive to a file: `python3 -c SCRIPT ARCHIVE MEMBER DEST`.
/// Python's `zipfile` stands in for an unzip program that a machine may lack.
const EXTRACT_SCRIPT: &str = "import pathlib, sys, zipfile; archive, member, dest = sys.argv[1:4]; \
     pathlib.Path(dest).write_bytes(zipfile.ZipFile(archive).read(member))";

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
    let cache = ensure_cache_dir()?;
    println!("xtask: deps: cache directory {} ready", cache.display());
    onnxruntime(Progress::Stdout)?;
    crate::sdk::venv()?;
    Ok(())
}

/// Whether `cargo nextest` works.
pub(crate) fn has_nextest() -> bool {
    succeeds(cargo().args(["nextest", "--version"]))
}

/// Where downloaded and generated artifacts live: `LMGRID_CACHE_DIR`, else
/// `$HOME/.cache/lmgrid`.
pub(crate) fn cache_dir() -> anyhow::Result<PathBuf> {
    if let Some(dir) = std::env::var_os("LMGRID_CACHE_DIR").filter(|dir| !dir.is_empty()) {
        return Ok(PathBuf::from(dir));
    }
    let home = std::env::var_os("HOME")
        .filter(|home| !home.is_empty())
        .context("neither LMGRID_CACHE_DIR nor HOME is set")?;
    Ok(Path::new(&home).join(".cache").join("lmgrid"))
}

/// Creates [`cache_dir`] if needed and returns it.
pub(crate) fn ensure_cache_dir() -> anyhow::Result<PathBuf> {
    let dir = cache_dir()?;
    std::fs::create_dir_all(&dir)
        .with_context(|| format!("create cache directory {}", dir.display()))?;
    Ok(dir)
}

/// Makes ONNX Runtime's CPU library available at [`ORT_LIBRARY_PATH`] under [`cache_dir`]
/// and returns its absolute path.
///
/// The library comes out of the `onnxruntime` wheel on PyPI, downloaded by pip into a
/// scratch directory of the cache that is removed afterwards. It is extracted under a
/// temporary name and renamed into place, so the final path never holds a partial file.
pub(crate) fn onnxruntime(progress: Progress) -> anyhow::Result<PathBuf> {
    let library = std::path::absolute(cache_dir()?.join(ORT_LIBRARY_PATH))
        .context("resolve the ONNX Runtime library path")?;
    if library.is_file() {
        progress.line(format_args!(
            "xtask: deps: ONNX Runtime {ORT_VERSION} already present at {}",
            library.display()
        ));
        return Ok(library);
    }
    progress.line(format_args!(
        "xtask: deps: ONNX Runtime {ORT_VERSION} missing, taking it from the PyPI wheel {ORT_REQUIREMENT}"
    ));
    if !succeeds(Command::new("python3").args(["-m", "pip", "--version"])) {
        bail!(
            "`python3 -m pip` is unavailable; install python3 and pip (Debian: python3-pip) \
             to download {ORT_REQUIREMENT}"
        );
    }
    let dir = library
        .parent()
        .context("the ONNX Runtime library path has no parent directory")?;
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    let scratch = dir.join(format!(".download-{}", std::process::id()));
    let result = download_and_extract(&scratch, &library, progress);
    // The scratch directory holds only the wheel; keep nothing of it, whatever happened.
    if scratch.exists()
        && let Err(err) = std::fs::remove_dir_all(&scratch)
    {
        progress.line(format_args!(
            "xtask: deps: warning: could not remove {}: {err}",
            scratch.display()
        ));
    }
    result?;
    progress.line(format_args!(
        "xtask: deps: ONNX Runtime {ORT_VERSION} installed at {}",
        library.display()
    ));
    Ok(library)
}

/// Downloads the wheel into `scratch` and extracts the library to `library`.
fn download_and_extract(scratch: &Path, library: &Path, progress: Progress) -> anyhow::Result<()> {
    std::fs::create_dir_all(scratch).with_context(|| format!("create {}", scratch.display()))?;
    run_step_with(
        progress,
        "download onnxruntime wheel",
        &mut pip_download(scratch),
    )
    .with_context(|| format!("download {ORT_REQUIREMENT} from PyPI"))?;
    let wheel = find_wheel(scratch)?;
    let mut partial_name = library
        .file_name()
        .context("the ONNX Runtime library path has no file name")?
        .to_os_string();
    partial_name.push(format!(".partial-{}", std::process::id()));
    let partial = library.with_file_name(partial_name);
    let mut extract = Command::new("python3");
    extract
        .args(["-c", EXTRACT_SCRIPT])
        .arg(&wheel)
        .arg(ORT_WHEEL_MEMBER)
        .arg(&partial);
    let extracted = run_step_with(progress, "extract libonnxruntime", &mut extract)
        .with_context(|| format!("extract {ORT_WHEEL_MEMBER} from {}", wheel.display()))
        .and_then(|()| {
            std::fs::rename(&partial, library)
                .with_context(|| format!("rename {} to {}", partial.display(), library.display()))
        });
    if extracted.is_err() {
        // Best effort: the partial file may not exist, and the error above says what failed.
        let _ = std::fs::remove_file(&partial);
    }
    extracted
}

/// `python3 -m pip download` of the ONNX Runtime wheel alone into `dest`.
fn pip_download(dest: &Path) -> Command {
    let mut command = Command::new("python3");
    command
        .args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--disable-pip-version-check",
            "--dest",
        ])
        .arg(dest)
        .arg(ORT_REQUIREMENT);
    command
}

/// The one `.whl` file pip left in `dir`.
pub(crate) fn find_wheel(dir: &Path) -> anyhow::Result<PathBuf> {
    let entries = std::fs::read_dir(dir).with_context(|| format!("list {}", dir.display()))?;
    let mut wheels = Vec::new();
    for entry in entries {
        let path = entry
            .with_context(|| format!("list {}", dir.display()))?
            .path();
        if path.extension().is_some_and(|ext| ext == "whl") {
            wheels.push(path);
        }
    }
    match <[PathBuf; 1]>::try_from(wheels) {
        Ok([wheel]) => Ok(wheel),
        Err(wheels) => bail!(
            "expected one wheel in {} after pip download, found {}",
            dir.display(),
            wheels.len()
        ),
    }
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
    SYSTEM_TOOLS
        .iter()
        .copied()
        .filter(|(tool, _)| !on_path(tool))
        .collect()
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
    fn onnxruntime_paths_name_one_version() {
        let versioned = format!("libonnxruntime.so.{ORT_VERSION}");
        assert_eq!(
            ORT_LIBRARY_PATH,
            format!("onnxruntime/{ORT_VERSION}/{versioned}")
        );
        assert_eq!(ORT_WHEEL_MEMBER, format!("onnxruntime/capi/{versioned}"));
        assert_eq!(ORT_REQUIREMENT, format!("onnxruntime=={ORT_VERSION}"));
    }

    #[test]
    fn pip_downloads_only_the_binary_wheel() {
        let command = pip_download(Path::new("scratch"));
        assert_eq!(
            crate::show(&command),
            "python3 -m pip download --no-deps --only-binary=:all: \
             --disable-pip-version-check --dest scratch onnxruntime==1.31.1"
        );
    }

    #[test]
    fn apt_get_is_non_interactive() {
        let root = apt_get(false, &["update"]);
        assert_eq!(crate::show(&root), "apt-get update");
        let env = root.get_envs().find(|(key, _)| *key == "DEBIAN_FRONTEND");
        assert_eq!(
            env.and_then(|(_, value)| value),
            Some("noninteractive".as_ref())
        );

        let sudo = apt_get(true, &["install", "-y", "etcd-server"]);
        assert_eq!(
            crate::show(&sudo),
            "sudo -n env DEBIAN_FRONTEND=noninteractive apt-get install -y etcd-server"
        );
    }
}
