//! `lmgridctl tenants …` and `lmgridctl usage`: the gateway's admin API
//! (`/admin/v1`) over plain HTTP/1.1, with the admin token as a bearer
//! token. The token comes from `--admin-token` (`LMGRID_ADMIN_TOKEN`), else
//! from `--admin-token-file`, else from `lmgrid up`'s
//! `<data-dir>/admin-token` when that file exists.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context as _, bail};
use http_body_util::{BodyExt as _, Full};
use hyper::body::Bytes;
use hyper::{Method, Request, StatusCode, header};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::net::TcpStream;

/// Where the admin API is and how to authenticate to it.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct AdminArgs {
    /// HTTP address of the gateway's admin API: its admin port in clusters
    /// (`http://gateway:9090`), the public port for `lmgrid up`.
    #[arg(
        long,
        global = true,
        env = "LMGRID_ADMIN_URL",
        default_value = "http://127.0.0.1:8080"
    )]
    admin_url: String,
    /// The admin token (`auth.admin_token` of the gateway).
    #[arg(
        long,
        global = true,
        env = "LMGRID_ADMIN_TOKEN",
        hide_env_values = true
    )]
    admin_token: Option<String>,
    /// A file holding the admin token; by default `lmgrid up`'s
    /// `$LMGRID_DATA_DIR/admin-token` (`./lmgrid-data/admin-token`) if present.
    #[arg(
        long,
        global = true,
        env = "LMGRID_ADMIN_TOKEN_FILE",
        value_name = "FILE"
    )]
    admin_token_file: Option<PathBuf>,
}

/// `lmgridctl tenants …`.
#[derive(Debug, clap::Subcommand)]
pub(crate) enum TenantsCommand {
    /// Create a tenant and print its first API key (shown once).
    Create {
        name: String,
        /// Requests per minute (0: unlimited; default: the gateway's).
        #[arg(long)]
        rpm: Option<u64>,
        /// Prompt plus completion tokens per minute (0: unlimited).
        #[arg(long)]
        tpm: Option<u64>,
        /// Requests in flight at once (0: unlimited).
        #[arg(long)]
        max_concurrent: Option<u64>,
        /// Priority lane: low, normal or high.
        #[arg(long)]
        priority: Option<String>,
        /// A model the tenant may use (repeat; none: every model).
        #[arg(long = "model", value_name = "MODEL")]
        models: Vec<String>,
    },
    /// List tenants, their limits and key ids.
    Ls,
    /// Create a new key for a tenant and revoke its others; prints the key.
    Rotate { name: String },
    /// Remove a tenant and revoke its keys.
    Rm { name: String },
}

/// `lmgridctl usage`.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct UsageArgs {
    /// Only this tenant.
    #[arg(long)]
    tenant: Option<String>,
    /// First UTC day, YYYY-MM-DD (default: today).
    #[arg(long)]
    start: Option<String>,
    /// Last UTC day, YYYY-MM-DD (default: today).
    #[arg(long)]
    end: Option<String>,
}

/// Runs a tenants command.
pub(crate) async fn tenants(
    args: &AdminArgs,
    command: TenantsCommand,
    timeout: Duration,
    as_json: bool,
) -> anyhow::Result<ExitCode> {
    let client = Client::new(args, timeout)?;
    match command {
        TenantsCommand::Create {
            name,
            rpm,
            tpm,
            max_concurrent,
            priority,
            models,
        } => {
            let mut body = json!({"name": name});
            for (field, value) in [
                ("requests_per_minute", rpm),
                ("tokens_per_minute", tpm),
                ("max_concurrent", max_concurrent),
            ] {
                if let Some(value) = value {
                    body[field] = value.into();
                }
            }
            if let Some(priority) = priority {
                body["priority"] = priority.into();
            }
            if !models.is_empty() {
                body["allowed_models"] = models.into();
            }
            let answer = client
                .call(Method::POST, "/admin/v1/tenants", Some(body))
                .await?;
            print_key(&answer, as_json, &format!("tenant {name} created"));
        }
        TenantsCommand::Ls => {
            let answer = client.call(Method::GET, "/admin/v1/tenants", None).await?;
            if as_json {
                println!("{}", answer["data"]);
            } else {
                print_tenants(&answer["data"]);
            }
        }
        TenantsCommand::Rotate { name } => {
            let path = format!("/admin/v1/tenants/{name}/keys");
            let body = json!({"revoke_existing": true});
            let answer = client.call(Method::POST, &path, Some(body)).await?;
            let revoked = answer["revoked"]
                .as_array()
                .map(|ids| {
                    ids.iter()
                        .filter_map(Value::as_str)
                        .collect::<Vec<_>>()
                        .join(", ")
                })
                .unwrap_or_default();
            print_key(
                &answer,
                as_json,
                &format!("tenant {name}: new key; revoked {revoked}"),
            );
        }
        TenantsCommand::Rm { name } => {
            client
                .call(Method::DELETE, &format!("/admin/v1/tenants/{name}"), None)
                .await?;
            if as_json {
                println!("{}", json!({"removed": name}));
            } else {
                println!("tenant {name} removed; its keys are revoked");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Runs `lmgridctl usage`.
pub(crate) async fn usage(
    args: &AdminArgs,
    usage: UsageArgs,
    timeout: Duration,
    as_json: bool,
) -> anyhow::Result<ExitCode> {
    let client = Client::new(args, timeout)?;
    let query: Vec<String> = [
        ("tenant", usage.tenant),
        ("start", usage.start),
        ("end", usage.end),
    ]
    .into_iter()
    .filter_map(|(key, value)| Some(format!("{key}={}", value?)))
    .collect();
    let path = if query.is_empty() {
        "/admin/v1/usage".to_string()
    } else {
        format!("/admin/v1/usage?{}", query.join("&"))
    };
    let answer = client.call(Method::GET, &path, None).await?;
    if as_json {
        println!("{answer}");
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{} to {} ({})",
        answer["start"].as_str().unwrap_or("?"),
        answer["end"].as_str().unwrap_or("?"),
        if answer["source"] == "shared" {
            "all gateways"
        } else {
            "this gateway only"
        }
    );
    println!(
        "{:<24} {:>10} {:>12} {:>12} {:>8} {:>10}",
        "TENANT", "REQUESTS", "PROMPT", "COMPLETION", "ERRORS", "REJECTED"
    );
    for tenant in answer["data"].as_array().into_iter().flatten() {
        let totals = &tenant["totals"];
        let rejected: u64 = totals["rejected"]
            .as_object()
            .map(|r| r.values().filter_map(Value::as_u64).sum())
            .unwrap_or(0);
        println!(
            "{:<24} {:>10} {:>12} {:>12} {:>8} {:>10}",
            tenant["tenant"].as_str().unwrap_or("?"),
            totals["requests"],
            totals["prompt_tokens"],
            totals["completion_tokens"],
            totals["errors"],
            rejected
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn print_key(answer: &Value, as_json: bool, headline: &str) {
    if as_json {
        println!("{answer}");
        return;
    }
    println!("{headline}");
    if let Some(key) = answer["key"].as_str() {
        println!("key: {key}");
        println!("(shown only now: store it; lmgrid keeps only its digest)");
    }
}

fn print_tenants(data: &Value) {
    let tenants = data.as_array().map(Vec::as_slice).unwrap_or_default();
    if tenants.is_empty() {
        println!("no tenants");
        return;
    }
    println!(
        "{:<24} {:>8} {:>10} {:>10} {:<8} {:<24} KEYS",
        "NAME", "RPM", "TPM", "IN FLIGHT", "PRIORITY", "MODELS"
    );
    for t in tenants {
        let list = |value: &Value, field: &str| {
            value
                .as_array()
                .map(|items| {
                    items
                        .iter()
                        .filter_map(|i| {
                            if field.is_empty() {
                                i.as_str()
                            } else {
                                i[field].as_str()
                            }
                        })
                        .collect::<Vec<_>>()
                        .join(",")
                })
                .unwrap_or_default()
        };
        let models = list(&t["allowed_models"], "");
        println!(
            "{:<24} {:>8} {:>10} {:>10} {:<8} {:<24} {}",
            t["name"].as_str().unwrap_or("?"),
            t["requests_per_minute"],
            t["tokens_per_minute"],
            t["max_concurrent"],
            t["priority"].as_str().unwrap_or("?"),
            if models.is_empty() {
                "(all)".to_string()
            } else {
                models
            },
            list(&t["keys"], "id"),
        );
    }
}

/// An HTTP/1.1 client of one admin API.
struct Client {
    authority: String,
    token: String,
    timeout: Duration,
}

impl Client {
    fn new(args: &AdminArgs, timeout: Duration) -> anyhow::Result<Client> {
        let Some(rest) = args.admin_url.strip_prefix("http://") else {
            bail!(
                "--admin-url {:?}: expected http://host:port (put TLS in front of the admin API \
                 with a proxy)",
                args.admin_url
            );
        };
        let authority = rest.trim_end_matches('/').to_string();
        if authority.is_empty() || authority.contains('/') {
            bail!(
                "--admin-url {:?}: expected http://host:port",
                args.admin_url
            );
        }
        Ok(Client {
            authority,
            token: admin_token(args)?,
            timeout,
        })
    }

    /// `method path` with `body`; the answer's JSON, or the error it names.
    async fn call(&self, method: Method, path: &str, body: Option<Value>) -> anyhow::Result<Value> {
        let what = format!("{method} http://{}{path}", self.authority);
        tokio::time::timeout(self.timeout, self.exchange(method, path, body))
            .await
            .map_err(|_| anyhow::anyhow!("no answer within {:?}", self.timeout))
            .and_then(|answer| answer)
            .with_context(|| what)
    }

    async fn exchange(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> anyhow::Result<Value> {
        let stream = TcpStream::connect(&self.authority)
            .await
            .context("connect")?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .context("HTTP handshake")?;
        tokio::spawn(connection);
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let request = Request::builder()
            .method(method)
            .uri(path)
            .header(header::HOST, &self.authority)
            .header(header::AUTHORIZATION, format!("Bearer {}", self.token))
            .header(header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body)))?;
        let response = sender
            .send_request(request)
            .await
            .context("send the request")?;
        let status = response.status();
        let bytes = response
            .into_body()
            .collect()
            .await
            .context("read the answer")?
            .to_bytes();
        if status == StatusCode::NO_CONTENT {
            return Ok(Value::Null);
        }
        let answer: Value = serde_json::from_slice(&bytes).unwrap_or_else(
            |_| json!({"error": {"message": String::from_utf8_lossy(&bytes).trim().to_string()}}),
        );
        if !status.is_success() {
            let message = answer["error"]["message"].as_str().unwrap_or("no message");
            bail!("{status}: {message}");
        }
        Ok(answer)
    }
}

/// The admin token from the flag, the environment, or a file.
fn admin_token(args: &AdminArgs) -> anyhow::Result<String> {
    if let Some(token) = args.admin_token.as_deref().filter(|t| !t.trim().is_empty()) {
        return Ok(token.trim().to_string());
    }
    let file = match &args.admin_token_file {
        Some(file) => file.clone(),
        None => {
            let data = std::env::var_os("LMGRID_DATA_DIR")
                .filter(|d| !d.is_empty())
                .map_or_else(|| PathBuf::from("lmgrid-data"), PathBuf::from);
            let file = data.join("admin-token");
            if !file.is_file() {
                bail!(
                    "no admin token: pass --admin-token (or LMGRID_ADMIN_TOKEN), or \
                     --admin-token-file; lmgrid up keeps one in <data-dir>/admin-token"
                );
            }
            file
        }
    };
    let token = std::fs::read_to_string(&file)
        .with_context(|| format!("read the admin token from {}", file.display()))?;
    Ok(token.trim().to_string())
}
