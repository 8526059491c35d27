//! A single-member etcd cluster for tests.

use std::path::Path;
use std::process::Command;

use anyhow::{Context as _, anyhow, bail};
use tempfile::TempDir;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

use crate::process::{ATTACH_TIMEOUT, BackgroundProcess, START_ATTEMPTS, Startup, find_binary};

/// Environment variable naming a running etcd to use instead of starting one.
const ENV_ENDPOINT: &str = "LMGRID_TEST_ETCD";

/// A healthy etcd, either started by this handle or named by `LMGRID_TEST_ETCD`.
///
/// A started etcd runs as a single-member cluster with its data directory in a fresh
/// temporary directory; dropping the handle kills the process and removes the directory.
pub struct EtcdServer {
    endpoint: String,
    // Declared before `dir` so the process is killed before its data directory is removed.
    process: Option<BackgroundProcess>,
    dir: Option<TempDir>,
}

impl EtcdServer {
    /// Starts etcd on free loopback ports and waits until it is healthy.
    ///
    /// When `LMGRID_TEST_ETCD` is set, starts nothing and attaches to that endpoint instead
    /// (see [`EtcdServer::attach`]). Retries on new ports when a port was taken between
    /// choosing it and etcd binding it.
    pub async fn start() -> anyhow::Result<Self> {
        if let Some(endpoint) = crate::env_override(ENV_ENDPOINT) {
            tracing::info!(%endpoint, "using etcd from {ENV_ENDPOINT}");
            return Self::attach(endpoint)
                .await
                .with_context(|| format!("use etcd from {ENV_ENDPOINT}"));
        }
        let binary = find_binary("etcd", "etcd-server", ENV_ENDPOINT)?;
        for attempt in 1..=START_ATTEMPTS {
            let dir = tempfile::Builder::new()
                .prefix("lmgrid-etcd-")
                .tempdir()
                .context("create etcd temp dir")?;
            let [client_port, peer_port] = crate::free_ports()?;
            let client_url = format!("http://127.0.0.1:{client_port}");
            let peer_url = format!("http://127.0.0.1:{peer_port}");
            let command = etcd_command(&binary, dir.path(), &client_url, &peer_url);
            let mut process =
                BackgroundProcess::spawn("etcd", command, dir.path().join("etcd.log"))?;
            let authority = format!("127.0.0.1:{client_port}");
            match process.wait_healthy(|| check_health(&authority)).await {
                Startup::Healthy => {
                    tracing::debug!(endpoint = %client_url, "etcd is healthy");
                    return Ok(Self {
                        endpoint: client_url,
                        process: Some(process),
                        dir: Some(dir),
                    });
                }
                Startup::PortInUse => {
                    tracing::debug!(attempt, client_port, peer_port, "etcd port taken, retrying");
                }
                Startup::Failed(err) => return Err(err.context("start etcd")),
            }
        }
        bail!("start etcd: ports kept being taken after {START_ATTEMPTS} attempts")
    }

    /// Uses an etcd that is already running at `endpoint` (`http://host:port`), after
    /// checking that it is healthy. Dropping the handle leaves that server alone.
    pub async fn attach(endpoint: impl Into<String>) -> anyhow::Result<Self> {
        let endpoint = endpoint.into();
        let authority = crate::authority(&endpoint, "http")?;
        tokio::time::timeout(ATTACH_TIMEOUT, check_health(&authority))
            .await
            .unwrap_or_else(|_| Err(anyhow!("no answer within {ATTACH_TIMEOUT:?}")))
            .with_context(|| format!("etcd at {endpoint} is not healthy"))?;
        Ok(Self {
            endpoint,
            process: None,
            dir: None,
        })
    }

    /// The client URL, such as `http://127.0.0.1:23791`.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// A key prefix no other call returns, such as
    /// `/lmgrid-test/<test>-<pid>-<counter>-<nanos>`, so tests sharing a server never
    /// see each other's keys.
    pub fn unique_prefix(&self, test: &str) -> String {
        crate::unique_name("/lmgrid-test", '/', test)
    }

    /// The file holding etcd's output, or `None` when attached to an external server.
    pub fn log_path(&self) -> Option<&Path> {
        self.process.as_ref().map(BackgroundProcess::log_path)
    }

    /// The temporary directory holding the data directory and log, if this handle owns one.
    pub fn dir(&self) -> Option<&Path> {
        self.dir.as_ref().map(TempDir::path)
    }
}

fn etcd_command(binary: &Path, dir: &Path, client_url: &str, peer_url: &str) -> Command {
    let name = "lmgrid-test";
    let mut command = Command::new(binary);
    command
        .current_dir(dir)
        .arg(format!("--name={name}"))
        .arg(format!("--data-dir={}", dir.join("data").display()))
        .arg(format!("--listen-client-urls={client_url}"))
        .arg(format!("--advertise-client-urls={client_url}"))
        .arg(format!("--listen-peer-urls={peer_url}"))
        .arg(format!("--initial-advertise-peer-urls={peer_url}"))
        .arg(format!("--initial-cluster={name}={peer_url}"))
        .arg("--initial-cluster-state=new")
        // A token unique to this directory keeps members of different test clusters apart.
        .arg(format!("--initial-cluster-token={}", dir.display()))
        // etcd 3.4 defaults to the deprecated capnslog logger and warns about it.
        .arg("--logger=zap")
        .arg("--log-outputs=stderr");
    // etcd also reads every flag from an ETCD_* variable and refuses to start when one shadows
    // a flag, so a developer's etcd environment must not leak in. ETCD_UNSUPPORTED_ARCH is
    // kept because non-amd64 machines need it.
    for (key, _) in std::env::vars_os() {
        let is_etcd = key.to_str().is_some_and(|key| key.starts_with("ETCD_"));
        if is_etcd && key != "ETCD_UNSUPPORTED_ARCH" {
            command.env_remove(key);
        }
    }
    command
}

/// `GET /health` over HTTP/1.0, which closes the connection after the response.
async fn check_health(authority: &str) -> anyhow::Result<()> {
    let mut stream = TcpStream::connect(authority)
        .await
        .with_context(|| format!("connect to {authority}"))?;
    let request = format!("GET /health HTTP/1.0\r\nHost: {authority}\r\n\r\n");
    stream
        .write_all(request.as_bytes())
        .await
        .context("send health request")?;
    let mut response = Vec::new();
    stream
        .read_to_end(&mut response)
        .await
        .context("read health response")?;
    let response = String::from_utf8_lossy(&response);
    if response.contains(r#""health":"true""#) {
        Ok(())
    } else {
        bail!("unhealthy response: {}", response.trim())
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// Whether something accepts TCP connections at `authority`.
    async fn accepts(authority: &str) -> bool {
        TcpStream::connect(authority).await.is_ok()
    }

    #[tokio::test]
    async fn starts_healthy_and_dies_on_drop() {
        let etcd = EtcdServer::start().await.unwrap();
        let authority = crate::authority(etcd.endpoint(), "http").unwrap();
        check_health(&authority).await.unwrap();
        let prefix = etcd.unique_prefix("starts_healthy");
        assert!(
            prefix.starts_with("/lmgrid-test/starts_healthy-"),
            "{prefix}"
        );
        assert_ne!(prefix, etcd.unique_prefix("starts_healthy"));

        // Only a server this handle started can be checked for its death.
        if let Some(dir) = etcd.dir().map(Path::to_path_buf) {
            assert!(etcd.log_path().unwrap().is_file());
            drop(etcd);
            crate::wait_until(Duration::from_secs(5), "etcd to stop accepting", || async {
                !accepts(&authority).await
            })
            .await
            .unwrap();
            assert!(!dir.exists(), "temp dir {} left behind", dir.display());
        }
    }

    #[tokio::test]
    async fn two_servers_run_side_by_side() {
        let (a, b) = tokio::try_join!(EtcdServer::start(), EtcdServer::start()).unwrap();
        check_health(&crate::authority(a.endpoint(), "http").unwrap())
            .await
            .unwrap();
        check_health(&crate::authority(b.endpoint(), "http").unwrap())
            .await
            .unwrap();
        if a.dir().is_some() {
            assert_ne!(a.endpoint(), b.endpoint());
        }
    }

    #[tokio::test]
    async fn attached_handle_leaves_server_running() {
        let etcd = EtcdServer::start().await.unwrap();
        let attached = EtcdServer::attach(etcd.endpoint()).await.unwrap();
        assert_eq!(attached.endpoint(), etcd.endpoint());
        assert!(attached.log_path().is_none());
        drop(attached);
        check_health(&crate::authority(etcd.endpoint(), "http").unwrap())
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn attach_rejects_a_dead_endpoint() {
        let port = crate::free_port();
        let err = EtcdServer::attach(format!("http://127.0.0.1:{port}"))
            .await
            .err()
            .unwrap();
        assert!(format!("{err:#}").contains("is not healthy"), "{err:#}");
    }
}
