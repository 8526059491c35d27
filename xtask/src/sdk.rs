//! The Python environment of the client SDK tests: `<cache>/venv-sdk`, holding exactly the
//! packages of [`REQUIREMENTS`] (the official `openai` client, Triton's `tritonclient` and
//! their dependencies, every one pinned). A stamp file in the venv records the sha256 of the requirements; the venv is
//! rebuilt when they change and left alone otherwise. It is separate from the models' venv
//! (lmgrid-setup's `<cache>/venv`) so that neither set of pins constrains the other.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context as _, bail};

use crate::run_step;

/// The pinned requirements, relative to the project root.
pub(crate) const REQUIREMENTS: &str = "xtask/python/requirements-sdk.txt";

/// The venv's directory name under the cache directory. The SDK test looks for it there.
pub(crate) const VENV_DIR: &str = "venv-sdk";

/// The name of the stamp file in the venv.
const STAMP: &str = "lmgrid-requirements.sha256";

/// Prints the sha256 of the file named on its command line.
const HASH_SCRIPT: &str = "import hashlib, pathlib, sys; print(hashlib.sha256(pathlib.Path(sys.argv[1]).read_bytes()).hexdigest())";

/// Makes `<cache>/venv-sdk` hold exactly [`REQUIREMENTS`] and returns its Python.
pub(crate) fn venv() -> anyhow::Result<PathBuf> {
    let cache = std::path::absolute(lmgrid_setup::ensure_cache_dir()?)
        .context("resolve the cache directory")?;
    let dir = cache.join(VENV_DIR);
    let python = dir.join("bin").join("python");
    let wanted = sha256(Path::new(REQUIREMENTS))?;
    let stamp = dir.join(STAMP);
    let stamped = std::fs::read_to_string(&stamp).ok();
    if python.is_file() && stamped.as_deref().map(str::trim) == Some(wanted.as_str()) {
        println!(
            "xtask: deps: SDK venv {} matches {REQUIREMENTS}, skipping pip install",
            dir.display()
        );
        return Ok(python);
    }
    if !python.is_file() {
        println!("xtask: deps: creating SDK venv {}", dir.display());
        let mut create = Command::new("python3");
        create.args(["-m", "venv"]).arg(&dir);
        run_step("create SDK venv", &mut create).context(
            "`python3 -m venv` failed; install python3 with venv support (Debian: python3-venv)",
        )?;
    }
    println!(
        "xtask: deps: installing {REQUIREMENTS} into {}",
        dir.display()
    );
    run_step("pip install SDK", &mut pip_install(&python))?;
    std::fs::write(&stamp, format!("{wanted}\n"))
        .with_context(|| format!("write {}", stamp.display()))?;
    Ok(python)
}

/// `pip install` of the pinned requirements, wheels only.
fn pip_install(python: &Path) -> Command {
    let mut install = Command::new(python);
    install
        .args(["-m", "pip", "install", "--disable-pip-version-check"])
        .args(["--only-binary=:all:", "--requirement", REQUIREMENTS]);
    install
}

/// The sha256 of `path` as lowercase hex, computed by `python3`.
fn sha256(path: &Path) -> anyhow::Result<String> {
    let output = Command::new("python3")
        .args(["-c", HASH_SCRIPT])
        .arg(path)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("run python3 to hash {}", path.display()))?;
    if !output.status.success() {
        bail!("hashing {} failed: {}", path.display(), output.status);
    }
    let digest = String::from_utf8(output.stdout)
        .context("hash output is not UTF-8")?
        .trim()
        .to_owned();
    if digest.len() != 64 || !digest.bytes().all(|byte| byte.is_ascii_hexdigit()) {
        bail!("unexpected digest `{digest}` for {}", path.display());
    }
    Ok(digest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requirements_pin_the_sdks_and_every_dependency_exactly() {
        let text = std::fs::read_to_string(crate::project_root().join(REQUIREMENTS)).unwrap();
        let pins: Vec<&str> = text
            .lines()
            .map(str::trim)
            .filter(|line| !line.is_empty() && !line.starts_with('#'))
            .collect();
        assert!(
            pins.iter().any(|pin| pin.starts_with("openai==")),
            "{pins:?}"
        );
        assert!(
            pins.iter().any(|pin| pin.starts_with("pydantic==")),
            "{pins:?}"
        );
        assert!(
            pins.iter()
                .any(|pin| pin.starts_with("tritonclient[grpc,http]==")),
            "{pins:?}"
        );
        for pin in &pins {
            let (name, version) = pin.split_once("==").unwrap_or_else(|| panic!("{pin}"));
            assert!(
                !name.is_empty() && !version.is_empty() && !version.contains('*'),
                "{pin}"
            );
        }
    }

    #[test]
    fn pip_installs_only_pinned_wheels() {
        let command = pip_install(Path::new("venv/bin/python"));
        assert_eq!(
            lmgrid_setup::show(&command),
            "python -m pip install --disable-pip-version-check --only-binary=:all: \
             --requirement xtask/python/requirements-sdk.txt"
        );
    }
}
