//! What the process-level tests share: `lmgrid` commands that inherit none of the caller's
//! lmgrid settings, running processes killed on drop, a worker on free loopback ports, and a
//! bare HTTP client.

// Each test file is a crate of its own that uses a part of this module.
#![allow(dead_code)]

use std::fs::File;
use std::net::SocketAddr;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use anyhow::{Context as _, bail};
use lmgrid_test_support::{EtcdServer, free_port};
use tempfile::TempDir;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::time::Instant;

pub(crate) const LMGRID: &str = env!("CARGO_BIN_EXE_lmgrid");

/// How long a process gets to start, register, answer, or exit. Generous, because tests run
/// on small, busy machines.
pub(crate) const PATIENCE: Duration = Duration::from_secs(30);

/// An `lmgrid` command that inherits none of the caller's lmgrid settings.
pub(crate) fn lmgrid() -> Command {
    let mut command = Command::new(LMGRID);
    for (key, _) in std::env::vars_os() {
        if key.to_str().is_some_and(|key| key.starts_with("LMGRID")) {
            command.env_remove(key);
        }
    }
    command
}

/// A running `lmgrid` process with its output in files; killed and reaped on drop, and its
/// stderr printed if the test is failing.
pub(crate) struct Running {
    pub(crate) child: Child,
    dir: TempDir,
    what: String,
}

impl Running {
    pub(crate) fn spawn(command: &mut Command, what: &str) -> anyhow::Result<Running> {
        let dir = tempfile::tempdir()?;
        let stdout = File::create(dir.path().join("stdout"))?;
        let stderr = File::create(dir.path().join("stderr"))?;
        let child = command
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .with_context(|| format!("spawn {what}"))?;
        Ok(Running {
            child,
            dir,
            what: what.to_string(),
        })
    }

    pub(crate) fn stdout(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("stdout")).unwrap_or_default()
    }

    pub(crate) fn stderr(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("stderr")).unwrap_or_default()
    }

    /// Sends SIGTERM, as Kubernetes does to stop a pod.
    pub(crate) fn terminate(&self) -> anyhow::Result<()> {
        let status = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status()
            .context("run kill")?;
        anyhow::ensure!(status.success(), "kill -TERM {} failed", self.child.id());
        Ok(())
    }

    /// Waits for the process to exit, at most `timeout`.
    pub(crate) async fn exit_status(&mut self, timeout: Duration) -> anyhow::Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() >= deadline {
                bail!("{} still running after {timeout:?}", self.what);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "--- stdout of {what} ---\n{}--- stderr of {what} ---\n{}",
                self.stdout(),
                self.stderr(),
                what = self.what,
            );
        }
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// Runs a service subcommand with `yaml` as its config file (if any) and `env` added, and
/// returns how it exited and its stderr.
pub(crate) async fn run_service(
    subcommand: &str,
    yaml: Option<&str>,
    env: &[(&str, &str)],
) -> anyhow::Result<(ExitStatus, String)> {
    let dir = tempfile::tempdir()?;
    let mut command = lmgrid();
    command.arg(subcommand).envs(env.iter().copied());
    if let Some(yaml) = yaml {
        let path = dir.path().join("config.yaml");
        std::fs::write(&path, yaml)?;
        command.arg("--config").arg(&path);
    }
    let mut running = Running::spawn(&mut command, &format!("lmgrid {subcommand}"))?;
    let status = running.exit_status(PATIENCE).await?;
    Ok((status, running.stderr()))
}

/// `lmgrid <subcommand>` as node `id`, registering in `etcd` under `prefix`, with its gRPC
/// and admin servers on `grpc` and `admin`.
fn node_command(
    subcommand: &str,
    etcd: &EtcdServer,
    prefix: &str,
    id: &str,
    [grpc, admin]: [SocketAddr; 2],
) -> Command {
    let mut command = lmgrid();
    command
        .arg(subcommand)
        .env("LMGRID__NODE__INSTANCE_ID", id)
        .env("LMGRID__NODE__GRPC__LISTEN_ADDR", grpc.to_string())
        .env("LMGRID__NODE__ADMIN__LISTEN_ADDR", admin.to_string())
        .env(
            "LMGRID__NODE__DISCOVERY__ETCD__ENDPOINTS",
            format!("[{}]", etcd.endpoint()),
        )
        .env("LMGRID__NODE__DISCOVERY__ETCD__PREFIX", prefix);
    command
}

/// `lmgrid worker` registering in `etcd` under `prefix` as `id`, on free loopback ports.
pub(crate) struct WorkerProcess {
    pub(crate) command: Command,
    pub(crate) grpc_addr: SocketAddr,
    pub(crate) admin_addr: SocketAddr,
}

pub(crate) fn worker_command(
    etcd: &EtcdServer,
    prefix: &str,
    id: &str,
    lease_ttl: &str,
    drain_delay: &str,
) -> WorkerProcess {
    let [grpc_addr, admin_addr] = free_addrs();
    let mut command = node_command("worker", etcd, prefix, id, [grpc_addr, admin_addr]);
    command
        .env("LMGRID__NODE__DISCOVERY__ETCD__LEASE_TTL", lease_ttl)
        .env("LMGRID__NODE__SHUTDOWN__DRAIN_DELAY", drain_delay);
    WorkerProcess {
        command,
        grpc_addr,
        admin_addr,
    }
}

/// `lmgrid gateway` finding workers in `etcd` under `prefix` as `id`, on free loopback ports.
/// Its authentication is the caller's to set.
pub(crate) struct GatewayProcess {
    pub(crate) command: Command,
    pub(crate) http_addr: SocketAddr,
    pub(crate) grpc_addr: SocketAddr,
    pub(crate) admin_addr: SocketAddr,
}

pub(crate) fn gateway_command(etcd: &EtcdServer, prefix: &str, id: &str) -> GatewayProcess {
    let [http_addr, grpc_addr] = free_addrs();
    let admin_addr = std::iter::repeat_with(|| free_addrs()[0])
        .find(|addr| ![http_addr, grpc_addr].contains(addr))
        .expect("an endless supply of ports");
    let mut command = node_command("gateway", etcd, prefix, id, [grpc_addr, admin_addr]);
    command
        .env("LMGRID__NODE__SHUTDOWN__DRAIN_DELAY", "0s")
        .env("LMGRID__HTTP__LISTEN_ADDR", http_addr.to_string());
    GatewayProcess {
        command,
        http_addr,
        grpc_addr,
        admin_addr,
    }
}

/// Two distinct loopback addresses whose ports were free a moment ago.
pub(crate) fn free_addrs() -> [SocketAddr; 2] {
    let first = free_port();
    let second = std::iter::repeat_with(free_port)
        .find(|&port| port != first)
        .expect("an endless supply of ports");
    [first, second].map(|port| SocketAddr::from(([127, 0, 0, 1], port)))
}

/// `GET path` over HTTP/1.0; returns the status and the body.
pub(crate) async fn http_get(addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    http_request(addr, "GET", path, &[], "").await
}

/// `method path` with `headers` and `body` over HTTP/1.0, which the server answers and then
/// closes; returns the status and the body.
pub(crate) async fn http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> anyhow::Result<(u16, String)> {
    let exchange = async {
        let mut stream = TcpStream::connect(addr).await?;
        let mut request = format!("{method} {path} HTTP/1.0\r\nHost: {addr}\r\n");
        for (name, value) in headers {
            request.push_str(&format!("{name}: {value}\r\n"));
        }
        if !body.is_empty() {
            request.push_str(&format!("Content-Length: {}\r\n", body.len()));
        }
        request.push_str("\r\n");
        request.push_str(body);
        stream.write_all(request.as_bytes()).await?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await?;
        anyhow::Ok(String::from_utf8_lossy(&response).into_owned())
    };
    let response = tokio::time::timeout(Duration::from_secs(5), exchange)
        .await
        .context("no answer within 5s")?
        .with_context(|| format!("{method} http://{addr}{path}"))?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .with_context(|| format!("malformed response {response:?}"))?;
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .with_context(|| format!("malformed status line in {head:?}"))?;
    Ok((status, body.to_string()))
}

/// Runs `promtool check metrics` on `text`, failing with its complaints.
pub(crate) fn promtool_check_metrics(text: &str) -> anyhow::Result<()> {
    let mut promtool = match Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    {
        Ok(child) => child,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            bail!("`promtool` not found on PATH; run `cargo xtask deps` to install it")
        }
        Err(error) => return Err(error).context("run promtool"),
    };
    let mut stdin = promtool.stdin.take().context("promtool stdin")?;
    std::io::Write::write_all(&mut stdin, text.as_bytes())?;
    drop(stdin);
    let output = promtool.wait_with_output()?;
    anyhow::ensure!(
        output.status.success(),
        "promtool check metrics failed: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(())
}
