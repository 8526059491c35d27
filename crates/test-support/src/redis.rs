//! A throwaway Redis server for tests.

use std::path::Path;
use std::process::Command;

use anyhow::{Context as _, anyhow, bail};
use tempfile::TempDir;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

use crate::process::{ATTACH_TIMEOUT, BackgroundProcess, START_ATTEMPTS, Startup, find_binary};

/// Environment variable naming a running Redis to use instead of starting one.
const ENV_URL: &str = "LMGRID_TEST_REDIS";

/// A healthy Redis, either started by this handle or named by `LMGRID_TEST_REDIS`.
///
/// A started Redis keeps everything in memory (no RDB snapshots, no AOF) and works in a
/// fresh temporary directory; dropping the handle kills the process and removes the directory.
pub struct RedisServer {
    url: String,
    port: u16,
    // Declared before `dir` so the process is killed before its directory is removed.
    process: Option<BackgroundProcess>,
    dir: Option<TempDir>,
}

impl RedisServer {
    /// Starts `redis-server` on a free loopback port and waits until it answers `PING`.
    ///
    /// When `LMGRID_TEST_REDIS` is set, starts nothing and attaches to that URL instead
    /// (see [`RedisServer::attach`]). Retries on a new port when the port was taken between
    /// choosing it and Redis binding it.
    pub async fn start() -> anyhow::Result<Self> {
        if let Some(url) = crate::env_override(ENV_URL) {
            tracing::info!(%url, "using redis from {ENV_URL}");
            return Self::attach(url)
                .await
                .with_context(|| format!("use redis from {ENV_URL}"));
        }
        let binary = find_binary("redis-server", "redis-server", ENV_URL)?;
        for attempt in 1..=START_ATTEMPTS {
            let dir = tempfile::Builder::new()
                .prefix("lmgrid-redis-")
                .tempdir()
                .context("create redis temp dir")?;
            let [port] = crate::free_ports()?;
            let command = redis_command(&binary, dir.path(), port);
            let mut process =
                BackgroundProcess::spawn("redis-server", command, dir.path().join("redis.log"))?;
            let authority = format!("127.0.0.1:{port}");
            match process.wait_healthy(|| ping(&authority)).await {
                Startup::Healthy => {
                    let url = format!("redis://{authority}");
                    tracing::debug!(%url, "redis is healthy");
                    return Ok(Self {
                        url,
                        port,
                        process: Some(process),
                        dir: Some(dir),
                    });
                }
                Startup::PortInUse => {
                    tracing::debug!(attempt, port, "redis port taken, retrying");
                }
                Startup::Failed(err) => return Err(err.context("start redis")),
            }
        }
        bail!("start redis: ports kept being taken after {START_ATTEMPTS} attempts")
    }

    /// Uses a Redis that is already running at `url` (`redis://host:port`), after checking
    /// that it answers `PING`. Dropping the handle leaves that server alone.
    pub async fn attach(url: impl Into<String>) -> anyhow::Result<Self> {
        let url = url.into();
        let authority = crate::authority(&url, "redis")?;
        let port = authority
            .rsplit_once(':')
            .and_then(|(_, port)| port.parse().ok())
            .with_context(|| format!("`{url}` has no port"))?;
        tokio::time::timeout(ATTACH_TIMEOUT, ping(&authority))
            .await
            .unwrap_or_else(|_| Err(anyhow!("no answer within {ATTACH_TIMEOUT:?}")))
            .with_context(|| format!("redis at {url} is not healthy"))?;
        Ok(Self {
            url,
            port,
            process: None,
            dir: None,
        })
    }

    /// The connection URL, such as `redis://127.0.0.1:6379`.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The TCP port Redis listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// A key prefix no other call returns, such as
    /// `lmgrid-test:<test>-<pid>-<counter>-<nanos>`, so tests sharing a server never see
    /// each other's keys.
    pub fn unique_prefix(&self, test: &str) -> String {
        crate::unique_name("lmgrid-test", ':', test)
    }

    /// The file holding Redis's output, or `None` when attached to an external server.
    pub fn log_path(&self) -> Option<&Path> {
        self.process.as_ref().map(BackgroundProcess::log_path)
    }

    /// The temporary working directory, if this handle owns one.
    pub fn dir(&self) -> Option<&Path> {
        self.dir.as_ref().map(TempDir::path)
    }
}

fn redis_command(binary: &Path, dir: &Path, port: u16) -> Command {
    let mut command = Command::new(binary);
    command
        .current_dir(dir)
        .arg("--port")
        .arg(port.to_string())
        .arg("--bind")
        .arg("127.0.0.1")
        .arg("--save")
        .arg("")
        .arg("--appendonly")
        .arg("no")
        .arg("--daemonize")
        .arg("no")
        .arg("--dir")
        .arg(dir);
    command
}

/// Sends an inline `PING` and expects `+PONG`.
async fn ping(authority: &str) -> anyhow::Result<()> {
    let mut stream = TcpStream::connect(authority)
        .await
        .with_context(|| format!("connect to {authority}"))?;
    stream.write_all(b"PING\r\n").await.context("send PING")?;
    let mut reply = Vec::new();
    let mut buf = [0_u8; 64];
    while !reply.ends_with(b"\r\n") {
        let read = stream.read(&mut buf).await.context("read PING reply")?;
        if read == 0 {
            break;
        }
        reply.extend_from_slice(&buf[..read]);
    }
    let reply = String::from_utf8_lossy(&reply);
    if reply.starts_with("+PONG") {
        Ok(())
    } else {
        bail!("unexpected PING reply: {:?}", reply.trim_end())
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    async fn accepts(authority: &str) -> bool {
        TcpStream::connect(authority).await.is_ok()
    }

    fn authority_of(redis: &RedisServer) -> String {
        crate::authority(redis.url(), "redis").unwrap()
    }

    #[tokio::test]
    async fn starts_healthy_and_dies_on_drop() {
        let redis = RedisServer::start().await.unwrap();
        let authority = authority_of(&redis);
        assert!(
            authority.ends_with(&format!(":{}", redis.port())),
            "{authority}"
        );
        ping(&authority).await.unwrap();
        assert_ne!(redis.unique_prefix("t"), redis.unique_prefix("t"));

        // Only a server this handle started can be checked for its death.
        if let Some(dir) = redis.dir().map(Path::to_path_buf) {
            assert!(redis.log_path().unwrap().is_file());
            drop(redis);
            crate::wait_until(
                Duration::from_secs(5),
                "redis to stop accepting",
                || async { !accepts(&authority).await },
            )
            .await
            .unwrap();
            assert!(!dir.exists(), "temp dir {} left behind", dir.display());
        }
    }

    #[tokio::test]
    async fn two_servers_run_side_by_side() {
        let (a, b) = tokio::try_join!(RedisServer::start(), RedisServer::start()).unwrap();
        ping(&authority_of(&a)).await.unwrap();
        ping(&authority_of(&b)).await.unwrap();
        if a.dir().is_some() {
            assert_ne!(a.port(), b.port());
        }
    }

    #[tokio::test]
    async fn attached_handle_leaves_server_running() {
        let redis = RedisServer::start().await.unwrap();
        let attached = RedisServer::attach(redis.url()).await.unwrap();
        assert_eq!(attached.port(), redis.port());
        assert!(attached.log_path().is_none());
        drop(attached);
        ping(&authority_of(&redis)).await.unwrap();
    }

    #[tokio::test]
    async fn attach_rejects_a_dead_url() {
        let port = crate::free_port();
        let err = RedisServer::attach(format!("redis://127.0.0.1:{port}"))
            .await
            .err()
            .unwrap();
        assert!(format!("{err:#}").contains("is not healthy"), "{err:#}");
    }
}
