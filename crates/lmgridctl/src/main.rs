//! `lmgridctl`: a command-line client for lmgrid over its generated gRPC
//! stubs. It talks to the gateway's public gRPC port by default, or to any
//! service's gRPC port with `--addr`; `tenants` and `usage` use the
//! gateway's admin API over HTTP (`--admin-url`).

mod admin;

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use lmgrid_proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use lmgrid_proto::inference::{ServerLiveRequest, ServerMetadataRequest, ServerReadyRequest};
use lmgrid_proto::lmgrid::v1::worker_control_service_client::WorkerControlServiceClient;
use lmgrid_proto::lmgrid::v1::{
    GetStatsRequest, ListWorkerModelsRequest, LoadModelRequest, ModelState, UnloadModelRequest,
    WorkerModel,
};
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

/// Command-line client for lmgrid.
#[derive(Debug, Parser)]
#[command(name = "lmgridctl", version, about)]
struct Cli {
    /// gRPC address of the gateway (or of any lmgrid service).
    #[arg(
        long,
        global = true,
        env = "LMGRID_ADDR",
        default_value = "http://127.0.0.1:8081"
    )]
    addr: String,
    /// Per-call timeout.
    #[arg(long, global = true, default_value = "10s", value_parser = humantime_duration)]
    timeout: Duration,
    /// Print JSON instead of text.
    #[arg(long, global = true)]
    json: bool,
    #[command(flatten)]
    admin: admin::AdminArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Check grpc.health.v1: the server as a whole, or the named services
    /// (e.g. `worker dispatcher`). Exits 1 unless every one is SERVING.
    Health { services: Vec<String> },
    /// Liveness, readiness, name and version of the server
    /// (Open Inference Protocol).
    Server,
    /// Worker control (point --addr at a worker).
    #[command(subcommand)]
    Worker(WorkerCommand),
    /// Tenants and their API keys (the gateway's admin API).
    #[command(subcommand)]
    Tenants(admin::TenantsCommand),
    /// Requests, tokens, errors and refusals per tenant (the gateway's admin API).
    Usage(admin::UsageArgs),
}

#[derive(Debug, Subcommand)]
enum WorkerCommand {
    /// Models the worker serves.
    Models,
    /// In-flight requests, queue depth and accelerator of the worker.
    Stats,
    /// Load or reload a model from the worker's model repository.
    Load {
        name: String,
        /// One version; by default the versions the model's policy selects.
        #[arg(long)]
        version: Option<String>,
    },
    /// Unload a model (in-flight requests complete first).
    Unload {
        name: String,
        /// One version; by default every version.
        #[arg(long)]
        version: Option<String>,
    },
}

fn humantime_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text).map_err(|e| format!("{e} (expected e.g. 10s or 500ms)"))
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(code) => code,
        Err(error) => {
            eprintln!("lmgridctl: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    // gRPC commands connect first; admin commands speak HTTP.
    let channel = || connect(&cli.addr, cli.timeout);
    match cli.command {
        Command::Tenants(command) => {
            admin::tenants(&cli.admin, command, cli.timeout, cli.json).await
        }
        Command::Usage(usage) => admin::usage(&cli.admin, usage, cli.timeout, cli.json).await,
        Command::Health { services } => health(channel().await?, services, cli.json).await,
        Command::Server => server(channel().await?, cli.json).await,
        Command::Worker(WorkerCommand::Models) => {
            let models = WorkerControlServiceClient::new(channel().await?)
                .list_models(ListWorkerModelsRequest {})
                .await
                .context("list models")?
                .into_inner()
                .models;
            print_models(&models, cli.json);
            Ok(ExitCode::SUCCESS)
        }
        Command::Worker(WorkerCommand::Load { name, version }) => {
            let request = LoadModelRequest {
                name: name.clone(),
                version: version.unwrap_or_default(),
            };
            let models = WorkerControlServiceClient::new(channel().await?)
                .load_model(request)
                .await
                .with_context(|| format!("load {name}"))?
                .into_inner()
                .models;
            print_models(&models, cli.json);
            let failed = models.iter().any(|m| m.state() == ModelState::Failed);
            Ok(if failed {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            })
        }
        Command::Worker(WorkerCommand::Unload { name, version }) => {
            let request = UnloadModelRequest {
                name: name.clone(),
                version: version.unwrap_or_default(),
            };
            WorkerControlServiceClient::new(channel().await?)
                .unload_model(request)
                .await
                .with_context(|| format!("unload {name}"))?;
            println!("unloaded {name}");
            Ok(ExitCode::SUCCESS)
        }
        Command::Worker(WorkerCommand::Stats) => {
            let stats = WorkerControlServiceClient::new(channel().await?)
                .get_stats(GetStatsRequest {})
                .await
                .context("get stats")?
                .into_inner();
            let value = serde_json::json!({
                "in_flight": stats.in_flight,
                "queue_depth": stats.queue_depth,
                "accelerator": stats.accelerator,
                "models": stats.models.iter().map(|m| serde_json::json!({
                    "name": m.name, "version": m.version, "in_flight": m.in_flight, "queue_depth": m.queue_depth,
                })).collect::<Vec<_>>(),
            });
            if cli.json {
                println!("{value}");
            } else {
                println!("in flight:   {}", stats.in_flight);
                println!("queue depth: {}", stats.queue_depth);
                println!("accelerator: {}", stats.accelerator);
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn print_models(models: &[WorkerModel], json: bool) {
    if json {
        let rows: Vec<_> = models
            .iter()
            .map(|m| serde_json::json!({"name": m.name, "version": m.version, "state": m.state().as_str_name(), "error": m.error, "execution_provider": m.execution_provider, "instances": m.instances}))
            .collect();
        println!("{}", serde_json::Value::Array(rows));
    } else if models.is_empty() {
        println!("no models");
    } else {
        println!(
            "{:<32} {:<8} {:<20} {:<10} INSTANCES",
            "NAME", "VERSION", "STATE", "PROVIDER"
        );
        for m in models {
            println!(
                "{:<32} {:<8} {:<20} {:<10} {}",
                m.name,
                m.version,
                m.state().as_str_name(),
                m.execution_provider,
                m.instances
            );
            if !m.error.is_empty() {
                println!("    error: {}", m.error);
            }
        }
    }
}

async fn connect(addr: &str, timeout: Duration) -> anyhow::Result<Channel> {
    let url = if addr.contains("://") {
        addr.to_string()
    } else {
        format!("http://{addr}")
    };
    Endpoint::from_shared(url.clone())
        .with_context(|| format!("invalid address {addr:?}"))?
        .connect_timeout(timeout)
        .timeout(timeout)
        .connect()
        .await
        .with_context(|| format!("connect to {url}"))
}

async fn health(channel: Channel, services: Vec<String>, json: bool) -> anyhow::Result<ExitCode> {
    let names = if services.is_empty() {
        vec![String::new()]
    } else {
        services
    };
    let mut client = HealthClient::new(channel);
    let mut all_serving = true;
    let mut rows = Vec::new();
    for name in names {
        let status = match client
            .check(HealthCheckRequest {
                service: name.clone(),
            })
            .await
        {
            Ok(response) => response.into_inner().status().as_str_name().to_string(),
            Err(status) if status.code() == tonic::Code::NotFound => "UNKNOWN_SERVICE".to_string(),
            Err(status) => {
                return Err(anyhow::Error::new(status).context(format!("check {name:?}")));
            }
        };
        all_serving &= status == ServingStatus::Serving.as_str_name();
        rows.push((
            if name.is_empty() {
                "(server)".to_string()
            } else {
                name
            },
            status,
        ));
    }
    if json {
        let map: serde_json::Map<_, _> = rows
            .into_iter()
            .map(|(n, s)| (n, serde_json::Value::String(s)))
            .collect();
        println!("{}", serde_json::Value::Object(map));
    } else {
        for (name, status) in rows {
            println!("{name:<32} {status}");
        }
    }
    Ok(if all_serving {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

async fn server(channel: Channel, json: bool) -> anyhow::Result<ExitCode> {
    let mut client = GrpcInferenceServiceClient::new(channel);
    let live = client
        .server_live(ServerLiveRequest {})
        .await
        .context("ServerLive")?
        .into_inner()
        .live;
    let ready = client
        .server_ready(ServerReadyRequest {})
        .await
        .context("ServerReady")?
        .into_inner()
        .ready;
    let meta = client
        .server_metadata(ServerMetadataRequest {})
        .await
        .context("ServerMetadata")?
        .into_inner();
    if json {
        println!(
            "{}",
            serde_json::json!({"name": meta.name, "version": meta.version, "extensions": meta.extensions, "live": live, "ready": ready})
        );
    } else {
        println!("name:    {}", meta.name);
        println!("version: {}", meta.version);
        println!("live:    {live}");
        println!("ready:   {ready}");
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn durations_parse() {
        assert_eq!(
            humantime_duration("500ms").unwrap(),
            Duration::from_millis(500)
        );
        assert_eq!(humantime_duration("3s").unwrap(), Duration::from_secs(3));
        assert_eq!(humantime_duration("2m").unwrap(), Duration::from_secs(120));
        assert!(humantime_duration("soon").is_err());
    }
}
