//! ONNX Runtime's CPU library, taken out of the `onnxruntime` wheel on PyPI.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, bail};

use crate::Setup;
use crate::fetch::find_wheel;
use crate::progress::succeeds;

/// The ONNX Runtime release lmgrid runs against; it must stay in step with the `api-31`
/// feature of the `ort` crate.
pub const ORT_VERSION: &str = "1.31.1";

/// Where [`Setup::onnxruntime`] puts ONNX Runtime's shared library, relative to the cache
/// directory.
///
/// The worker loads the library named by its config, else by `ORT_DYLIB_PATH`, else this
/// file under the cache directory, so once it is installed a worker on the same machine
/// needs no setting at all. The CPU wheel ships only this versioned file name, without a
/// `libonnxruntime.so` link.
pub const ORT_LIBRARY_PATH: &str = "onnxruntime/1.31.1/libonnxruntime.so.1.31.1";

/// The PyPI requirement whose wheel carries the CPU build of ONNX Runtime.
const ORT_REQUIREMENT: &str = "onnxruntime==1.31.1";

/// The library's path inside the wheel, a zip archive.
const ORT_WHEEL_MEMBER: &str = "onnxruntime/capi/libonnxruntime.so.1.31.1";

/// Copies one member of a zip archive to a file: `python -c SCRIPT ARCHIVE MEMBER DEST`.
/// Python's `zipfile` stands in for an unzip program that a machine may lack.
const EXTRACT_SCRIPT: &str = "import pathlib, sys, zipfile; archive, member, dest = sys.argv[1:4]; \
     pathlib.Path(dest).write_bytes(zipfile.ZipFile(archive).read(member))";

impl Setup {
    /// Makes ONNX Runtime's CPU library available at [`ORT_LIBRARY_PATH`] under the cache
    /// directory and returns its absolute path; `python` (`python3`, or the venv's) runs pip.
    ///
    /// pip downloads the wheel into a scratch directory of the cache that is removed
    /// afterwards. The library is extracted under a temporary name and renamed into place, so
    /// the final path never holds a partial file.
    pub fn onnxruntime(&self, python: &Path) -> anyhow::Result<PathBuf> {
        let library = self.cache.join(ORT_LIBRARY_PATH);
        if library.is_file() {
            self.progress.line(format_args!(
                "ONNX Runtime {ORT_VERSION} already present at {}",
                library.display()
            ));
            return Ok(library);
        }
        self.progress.line(format_args!(
            "ONNX Runtime {ORT_VERSION} missing, taking it from the PyPI wheel {ORT_REQUIREMENT}"
        ));
        if !succeeds(Command::new(python).args(["-m", "pip", "--version"])) {
            bail!(
                "`{} -m pip` is unavailable; install python3 and pip (Debian: python3-pip) \
                 to download {ORT_REQUIREMENT}",
                python.display()
            );
        }
        let dir = library
            .parent()
            .context("the ONNX Runtime library path has no parent directory")?;
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
        let scratch = dir.join(format!(".download-{}", std::process::id()));
        let result = self.download_and_extract(python, &scratch, &library);
        // The scratch directory holds only the wheel; keep nothing of it, whatever happened.
        if scratch.exists()
            && let Err(err) = std::fs::remove_dir_all(&scratch)
        {
            self.progress.line(format_args!(
                "warning: could not remove {}: {err}",
                scratch.display()
            ));
        }
        result?;
        self.progress.line(format_args!(
            "ONNX Runtime {ORT_VERSION} installed at {}",
            library.display()
        ));
        Ok(library)
    }

    /// Downloads the wheel into `scratch` and extracts the library to `library`.
    fn download_and_extract(
        &self,
        python: &Path,
        scratch: &Path,
        library: &Path,
    ) -> anyhow::Result<()> {
        std::fs::create_dir_all(scratch)
            .with_context(|| format!("create {}", scratch.display()))?;
        self.progress
            .run(
                "download onnxruntime wheel",
                &mut pip_download(python, scratch),
            )
            .with_context(|| format!("download {ORT_REQUIREMENT} from PyPI"))?;
        let wheel = find_wheel(scratch)?;
        let mut partial_name = library
            .file_name()
            .context("the ONNX Runtime library path has no file name")?
            .to_os_string();
        partial_name.push(format!(".partial-{}", std::process::id()));
        let partial = library.with_file_name(partial_name);
        let mut extract = Command::new(python);
        extract
            .args(["-c", EXTRACT_SCRIPT])
            .arg(&wheel)
            .arg(ORT_WHEEL_MEMBER)
            .arg(&partial);
        let extracted = self
            .progress
            .run("extract libonnxruntime", &mut extract)
            .with_context(|| format!("extract {ORT_WHEEL_MEMBER} from {}", wheel.display()))
            .and_then(|()| {
                std::fs::rename(&partial, library).with_context(|| {
                    format!("rename {} to {}", partial.display(), library.display())
                })
            });
        if extracted.is_err() {
            // Best effort: the partial file may not exist, and the error above says what failed.
            let _ = std::fs::remove_file(&partial);
        }
        extracted
    }
}

/// `python -m pip download` of the ONNX Runtime wheel alone into `dest`.
fn pip_download(python: &Path, dest: &Path) -> Command {
    let mut command = Command::new(python);
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
        let command = pip_download(Path::new("python3"), Path::new("scratch"));
        assert_eq!(
            crate::show(&command),
            "python3 -m pip download --no-deps --only-binary=:all: \
             --disable-pip-version-check --dest scratch onnxruntime==1.31.1"
        );
    }
}
