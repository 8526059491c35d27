//! `lmgridctl tenants` and `lmgridctl usage` end to end: the real binary against a gateway
//! run in this process the way `lmgrid up` runs it (in-process discovery, tenants in a JSON
//! file, the admin API on the public port), checking that the keys it prints work and that
//! rotation and removal revoke them.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, ensure};
use lmgrid_core::discovery::MemoryDiscovery;
use lmgrid_test_support::wait_until;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

const TOKEN: &str = "ctl-test-admin-token-0123456789";

/// The status of `GET path` with `key` as the bearer token (none: no header).
async fn status_with(http: SocketAddr, path: &str, key: Option<&str>) -> anyhow::Result<u16> {
    let mut stream = TcpStream::connect(http).await?;
    let auth = key.map_or_else(String::new, |k| format!("Authorization: Bearer {k}\r\n"));
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: {http}\r\n{auth}\r\n").as_bytes())
        .await?;
    let mut response = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut response))
        .await
        .context("no answer")??;
    let text = String::from_utf8_lossy(&response);
    text.split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .with_context(|| format!("malformed answer {text:?}"))
}

/// Runs `lmgridctl` with `args`; its exit success, stdout and stderr.
async fn ctl(http: SocketAddr, args: &[&str]) -> anyhow::Result<(bool, String, String)> {
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_lmgridctl"))
        .env_remove("LMGRID_ADMIN_TOKEN")
        .env_remove("LMGRID_ADMIN_TOKEN_FILE")
        .env_remove("LMGRID_ADMIN_URL")
        .arg("--admin-url")
        .arg(format!("http://{http}"))
        .args(args)
        .output()
        .await
        .context("run lmgridctl")?;
    Ok((
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    ))
}

fn key_in(stdout: &str) -> anyhow::Result<String> {
    stdout
        .lines()
        .find_map(|line| line.strip_prefix("key: "))
        .map(str::to_string)
        .with_context(|| format!("no key printed in {stdout:?}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn lmgridctl_manages_tenants_through_the_admin_api() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let loopback = SocketAddr::from(([127, 0, 0, 1], 0));
    let node = lmgrid_test_support::in_process_node(Arc::new(MemoryDiscovery::new()));
    let gateway = lmgrid_gateway::Gateway::start(lmgrid_gateway::Config {
        node,
        http: lmgrid_gateway::HttpConfig {
            listen_addr: loopback,
            ..Default::default()
        },
        auth: lmgrid_gateway::AuthConfig {
            required: true,
            admin_token: Some(TOKEN.to_string()),
            admin_on_public_port: true,
            store_path: Some(dir.path().join("tenants.json")),
            ..Default::default()
        },
        ..Default::default()
    })
    .await?;
    let http = gateway.http_addr();
    let shutdown = CancellationToken::new();
    let running = tokio::spawn(gateway.run(shutdown.clone()));
    wait_until(Duration::from_secs(30), "the gateway to answer", || async {
        matches!(status_with(http, "/v1/models", None).await, Ok(401))
    })
    .await?;

    // A wrong token is refused, with the gateway's reason.
    let (ok, _, stderr) = ctl(
        http,
        &["--admin-token", "not-the-token-at-all", "tenants", "ls"],
    )
    .await?;
    ensure!(!ok && stderr.contains("401"), "{stderr}");

    let token = ["--admin-token", TOKEN];
    let create = [
        &token[..],
        &[
            "tenants",
            "create",
            "acme",
            "--rpm",
            "10",
            "--tpm",
            "1000",
            "--priority",
            "high",
        ],
    ]
    .concat();
    let (ok, stdout, stderr) = ctl(http, &create).await?;
    ensure!(ok, "{stdout}{stderr}");
    let first = key_in(&stdout)?;
    assert!(first.starts_with("lmg-"), "{first}");
    assert_eq!(status_with(http, "/v1/models", Some(&first)).await?, 200);

    // The token may come from a file, as `lmgrid up` keeps it.
    let token_file = dir.path().join("admin-token");
    std::fs::write(&token_file, format!("{TOKEN}\n"))?;
    let file = token_file.to_string_lossy().into_owned();
    let (ok, stdout, stderr) = ctl(http, &["--admin-token-file", &file, "tenants", "ls"]).await?;
    ensure!(ok, "{stdout}{stderr}");
    assert!(
        stdout.contains("acme") && stdout.contains("high"),
        "{stdout}"
    );
    assert!(
        stdout.contains(&first[..12]) && !stdout.contains(&first),
        "{stdout}"
    );

    let (ok, stdout, stderr) =
        ctl(http, &[&token[..], &["tenants", "rotate", "acme"]].concat()).await?;
    ensure!(ok, "{stdout}{stderr}");
    let second = key_in(&stdout)?;
    assert!(
        stdout.contains(&first[..12]),
        "names the revoked key: {stdout}"
    );
    assert_eq!(status_with(http, "/v1/models", Some(&first)).await?, 401);
    assert_eq!(status_with(http, "/v1/models", Some(&second)).await?, 200);

    let (ok, stdout, stderr) = ctl(http, &[&token[..], &["--json", "usage"]].concat()).await?;
    ensure!(ok, "{stdout}{stderr}");
    let usage: serde_json::Value = serde_json::from_str(stdout.trim())?;
    assert_eq!(usage["source"], "replica", "{usage}");
    assert!(
        usage["data"]
            .as_array()
            .is_some_and(|d| d.iter().any(|t| t["tenant"] == "acme")),
        "{usage}"
    );

    let (ok, stdout, stderr) =
        ctl(http, &[&token[..], &["tenants", "rm", "acme"]].concat()).await?;
    ensure!(ok, "{stdout}{stderr}");
    assert_eq!(status_with(http, "/v1/models", Some(&second)).await?, 401);
    let (ok, _, stderr) = ctl(http, &[&token[..], &["tenants", "rotate", "acme"]].concat()).await?;
    ensure!(!ok && stderr.contains("no tenant 'acme'"), "{stderr}");

    // Tenants are kept in the file, without the keys themselves.
    let stored = std::fs::read_to_string(dir.path().join("tenants.json"))?;
    assert!(!stored.contains(&second), "{stored}");

    shutdown.cancel();
    running.await??;
    Ok(())
}
