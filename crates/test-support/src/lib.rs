//! Real dependencies and generated models for lmgrid tests.
//!
//! Integration tests talk to a real `etcd` and a real `redis-server`, never to mocks. This
//! crate starts each of them as a child process on free loopback ports inside a fresh
//! temporary directory, polls until the server answers its health check, and kills and reaps
//! the process when the handle is dropped:
//!
//! - [`EtcdServer::start`] runs `etcd` (Debian package `etcd-server`) and is healthy once
//!   `GET /health` on its client URL reports `"health":"true"`.
//! - [`RedisServer::start`] runs `redis-server` (Debian package `redis-server`) without
//!   persistence and is healthy once it answers `PING` with `+PONG`.
//!
//! When `LMGRID_TEST_ETCD` (an endpoint such as `http://127.0.0.1:2379`) or
//! `LMGRID_TEST_REDIS` (a URL such as `redis://127.0.0.1:6379`) is set, `start` launches
//! nothing and hands out a handle to that running server instead, after checking that it is
//! healthy. Tests that may share a server should keep their keys under
//! [`EtcdServer::unique_prefix`] or [`RedisServer::unique_prefix`].
//!
//! The binaries are found on `PATH`; `cargo xtask deps` installs them on a Debian machine.
//! [`wait_until`] is the polling helper tests use instead of sleeping.
//!
//! [`in_process_node`] is the node config of a service a test or benchmark runs in its own
//! process.
//!
//! [`onnx`] builds small ONNX models in Rust (an identity per element type, a two-output
//! graph, a seeded MLP with a plain-Rust reference, a model with a dynamic sequence axis) and
//! lays them out as a model repository.

mod etcd;
pub mod onnx;
mod process;
mod redis;

use std::future::Future;
use std::net::{Ipv4Addr, TcpListener};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, bail};

pub use etcd::EtcdServer;
pub use redis::RedisServer;

/// A node for a service run inside a test or benchmark process: gRPC on a free loopback
/// port, `discovery` in process (no etcd), no admin server, no drain delay.
pub fn in_process_node(
    discovery: std::sync::Arc<dyn lmgrid_core::discovery::Discovery>,
) -> lmgrid_core::config::NodeConfig {
    use lmgrid_core::config::{AdminConfig, GrpcConfig, NodeConfig, ShutdownConfig};
    NodeConfig {
        grpc: GrpcConfig {
            listen_addr: (Ipv4Addr::LOCALHOST, 0).into(),
            advertise_addr: None,
        },
        admin: AdminConfig {
            enabled: false,
            ..AdminConfig::default()
        },
        shutdown: ShutdownConfig {
            drain_delay: Duration::ZERO,
            grace_period: Duration::from_secs(10),
        },
        in_process_discovery: Some(discovery),
        ..NodeConfig::default()
    }
}

/// How often [`wait_until`] re-evaluates its predicate.
const POLL_INTERVAL: Duration = Duration::from_millis(50);

/// Returns a TCP port on 127.0.0.1 that was free a moment ago.
///
/// The port is found by binding port 0 and dropping the listener, so another process can take
/// it before the caller binds it; servers started by this crate retry with fresh ports when
/// that happens.
///
/// # Panics
///
/// Panics if the loopback interface cannot bind an ephemeral port, which means the machine
/// cannot run these tests at all.
pub fn free_port() -> u16 {
    bind_ephemeral()
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .expect("bind an ephemeral port on 127.0.0.1")
}

/// Polls `predicate` every ~50 ms until it returns `true`.
///
/// Fails with `timed out after {timeout:?} waiting for {what}` once `timeout` has passed,
/// including when a single evaluation of the predicate is still running at the deadline.
pub async fn wait_until<F, Fut>(
    timeout: Duration,
    what: &str,
    mut predicate: F,
) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        match tokio::time::timeout_at(deadline, predicate()).await {
            Ok(true) => return Ok(()),
            Ok(false) if tokio::time::Instant::now() < deadline => {}
            Ok(false) | Err(_) => bail!("timed out after {timeout:?} waiting for {what}"),
        }
        tokio::time::sleep_until(deadline.min(tokio::time::Instant::now() + POLL_INTERVAL)).await;
    }
}

/// Returns `N` distinct ports that were free a moment ago.
///
/// All listeners are held until every port is known, so the ports never coincide.
fn free_ports<const N: usize>() -> anyhow::Result<[u16; N]> {
    let listeners = (0..N)
        .map(|_| bind_ephemeral())
        .collect::<std::io::Result<Vec<_>>>()
        .context("bind ephemeral ports on 127.0.0.1")?;
    let mut ports = [0; N];
    for (port, listener) in ports.iter_mut().zip(&listeners) {
        *port = listener
            .local_addr()
            .context("read an ephemeral port")?
            .port();
    }
    Ok(ports)
}

fn bind_ephemeral() -> std::io::Result<TcpListener> {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
}

/// Builds `<base><sep><test>-<pid>-<counter>-<nanos>`, unique per call and per process run.
fn unique_name(base: &str, separator: char, test: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let counter = COUNTER.fetch_add(1, Ordering::Relaxed);
    // The clock only tells apart processes that reused a pid; a clock before 1970 is harmless.
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let test: String = test
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!(
        "{base}{separator}{test}-{}-{counter}-{nanos}",
        std::process::id()
    )
}

/// Reads a non-empty environment variable.
fn env_override(name: &str) -> Option<String> {
    std::env::var(name)
        .ok()
        .filter(|value| !value.trim().is_empty())
}

/// Extracts `host:port` from a `scheme://[userinfo@]host:port[/path]` URL.
fn authority(url: &str, scheme: &str) -> anyhow::Result<String> {
    let rest = url
        .strip_prefix(scheme)
        .and_then(|rest| rest.strip_prefix("://"))
        .with_context(|| format!("`{url}` is not a {scheme}:// URL"))?;
    let authority = rest.split('/').next().unwrap_or_default();
    let host_port = authority.rsplit('@').next().unwrap_or_default();
    let port = host_port.rsplit_once(':').map(|(_, port)| port);
    match port.map(str::parse::<u16>) {
        Some(Ok(_)) => Ok(host_port.to_owned()),
        _ => bail!("`{url}` has no host:port"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unique_names_differ_and_are_sanitized() {
        let a = unique_name("/lmgrid-test", '/', "my test/x");
        let b = unique_name("/lmgrid-test", '/', "my test/x");
        assert_ne!(a, b);
        assert!(a.starts_with("/lmgrid-test/my_test_x-"), "{a}");
    }

    #[test]
    fn authority_parses_urls() {
        assert_eq!(
            authority("http://127.0.0.1:2379", "http").unwrap(),
            "127.0.0.1:2379"
        );
        assert_eq!(
            authority("http://localhost:2379/", "http").unwrap(),
            "localhost:2379"
        );
        assert_eq!(
            authority("redis://:pw@127.0.0.1:6379/0", "redis").unwrap(),
            "127.0.0.1:6379"
        );
        assert!(authority("https://127.0.0.1:2379", "http").is_err());
        assert!(authority("redis://127.0.0.1", "redis").is_err());
    }

    #[test]
    fn free_ports_are_distinct() {
        let [a, b, c] = free_ports::<3>().unwrap();
        assert!(a != b && b != c && a != c);
        assert_ne!(free_port(), 0);
    }

    #[tokio::test]
    async fn wait_until_succeeds_once_predicate_holds() {
        let mut calls = 0;
        wait_until(Duration::from_secs(5), "third call", || {
            calls += 1;
            let done = calls >= 3;
            async move { done }
        })
        .await
        .unwrap();
        assert_eq!(calls, 3);
    }

    #[tokio::test]
    async fn wait_until_times_out_with_message() {
        let err = wait_until(Duration::from_millis(200), "never", || async { false })
            .await
            .unwrap_err();
        assert_eq!(err.to_string(), "timed out after 200ms waiting for never");
    }

    #[tokio::test]
    async fn wait_until_bounds_a_hanging_predicate() {
        let err = wait_until(
            Duration::from_millis(200),
            "hang",
            std::future::pending::<bool>,
        )
        .await
        .unwrap_err();
        assert!(err.to_string().contains("waiting for hang"));
    }
}
