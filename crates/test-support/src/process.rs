//! A child process owned by a test: spawned with its output in a log file, probed until
//! healthy, and killed and reaped on drop.

use std::fs::{File, OpenOptions};
use std::future::Future;
use std::io::{Read as _, Seek as _, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context as _, anyhow};

/// How long a freshly spawned server gets to become healthy.
pub(crate) const STARTUP_TIMEOUT: Duration = Duration::from_secs(20);

/// How many times a server is respawned on new ports when its port was taken.
pub(crate) const START_ATTEMPTS: usize = 5;

/// How long one health probe may take before it counts as a failure.
pub(crate) const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// How long an external server named by an environment variable gets to answer.
pub(crate) const ATTACH_TIMEOUT: Duration = Duration::from_secs(5);

/// Interval between health probes during startup.
const PROBE_INTERVAL: Duration = Duration::from_millis(50);

/// How much of the log end goes into error messages.
const LOG_TAIL_BYTES: u64 = 4096;

/// The outcome of waiting for a spawned server.
pub(crate) enum Startup {
    /// The health probe succeeded while the process was running.
    Healthy,
    /// The process exited because one of its ports was already taken; retry on new ports.
    PortInUse,
    /// The process exited or never became healthy; the error carries the log tail.
    Failed(anyhow::Error),
}

/// A running child process; killed and reaped when dropped.
pub(crate) struct BackgroundProcess {
    name: &'static str,
    child: Child,
    log_path: PathBuf,
}

impl BackgroundProcess {
    /// Spawns `command` with stdin closed and stdout and stderr appended to `log_path`.
    pub(crate) fn spawn(
        name: &'static str,
        mut command: Command,
        log_path: PathBuf,
    ) -> anyhow::Result<Self> {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .with_context(|| format!("create log file {}", log_path.display()))?;
        let log_err = log.try_clone().context("duplicate log file handle")?;
        let child = command
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .spawn()
            .with_context(|| format!("spawn {name}"))?;
        tracing::debug!(name, pid = child.id(), log = %log_path.display(), "spawned test server");
        Ok(Self {
            name,
            child,
            log_path,
        })
    }

    /// The file that receives the process's stdout and stderr.
    pub(crate) fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// Probes until healthy, the process exits, or [`STARTUP_TIMEOUT`] passes.
    pub(crate) async fn wait_healthy<F, Fut>(&mut self, mut probe: F) -> Startup
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = anyhow::Result<()>>,
    {
        let deadline = tokio::time::Instant::now() + STARTUP_TIMEOUT;
        let mut last_error = anyhow!("no health probe finished");
        loop {
            match tokio::time::timeout(PROBE_TIMEOUT, probe()).await {
                Ok(Ok(())) => {
                    // A healthy answer only counts if it came from our process, not from a
                    // stranger that owns the port after our process failed to bind it.
                    if self.exit_status().is_none() {
                        return Startup::Healthy;
                    }
                }
                Ok(Err(err)) => last_error = err,
                Err(_) => last_error = anyhow!("health probe took longer than {PROBE_TIMEOUT:?}"),
            }
            if let Some(status) = self.exit_status() {
                let tail = self.log_tail();
                if tail.to_ascii_lowercase().contains("address already in use") {
                    return Startup::PortInUse;
                }
                // The temp dir and its log go away with the failed attempt, so the error
                // carries the end of the log rather than its path.
                return Startup::Failed(anyhow!(
                    "{} exited during startup ({status}); end of its log:\n{tail}",
                    self.name
                ));
            }
            if tokio::time::Instant::now() >= deadline {
                return Startup::Failed(anyhow!(
                    "{} not healthy after {STARTUP_TIMEOUT:?} (last probe: {last_error:#}); \
                     end of its log:\n{}",
                    self.name,
                    self.log_tail()
                ));
            }
            tokio::time::sleep(PROBE_INTERVAL).await;
        }
    }

    fn exit_status(&mut self) -> Option<std::process::ExitStatus> {
        // An error here means the child cannot be waited on, which is as good as gone.
        self.child
            .try_wait()
            .unwrap_or_else(|_| Some(std::process::ExitStatus::default()))
    }

    /// The last few kilobytes of the log, or a note saying why it could not be read.
    pub(crate) fn log_tail(&self) -> String {
        read_tail(&self.log_path).unwrap_or_else(|err| format!("<log unreadable: {err}>"))
    }
}

impl Drop for BackgroundProcess {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "--- {} log ({}), last {LOG_TAIL_BYTES} bytes ---\n{}",
                self.name,
                self.log_path.display(),
                self.log_tail()
            );
        }
        if let Ok(Some(_)) = self.child.try_wait() {
            return;
        }
        // SIGKILL: test servers hold nothing worth a clean shutdown, and killing is immediate.
        if let Err(err) = self.child.kill() {
            tracing::warn!(name = self.name, %err, "failed to kill test server");
        }
        if let Err(err) = self.child.wait() {
            tracing::warn!(name = self.name, %err, "failed to reap test server");
        }
    }
}

/// Finds `program` on `PATH`, or explains how to install it.
pub(crate) fn find_binary(program: &str, package: &str, env_var: &str) -> anyhow::Result<PathBuf> {
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join(program))
        .find(|candidate| candidate.is_file())
        .ok_or_else(|| {
            anyhow!(
                "`{program}` not found on PATH; run `cargo xtask deps` to install it \
                 (Debian package {package}), or set {env_var} to reuse a running server"
            )
        })
}

fn read_tail(path: &Path) -> std::io::Result<String> {
    let mut file = File::open(path)?;
    let len = file.metadata()?.len();
    file.seek(SeekFrom::Start(len.saturating_sub(LOG_TAIL_BYTES)))?;
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes)?;
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}
