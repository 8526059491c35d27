//! The `lmgrid` binary: thin on purpose. Each subcommand loads one service's
//! config, sets up telemetry and signal handling, and calls the service
//! library's `run`; `lmgrid up` runs all five in one process.

mod setup;
mod up;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use lmgrid_core::config::{self, ConfigError, TelemetryConfig, Validate};
use serde::de::DeserializeOwned;
use tokio_util::sync::CancellationToken;

/// Exit status for invalid configuration or usage (EX_USAGE).
const EXIT_CONFIG: u8 = 64;

/// lmgrid serves language models and any ONNX model to many tenants.
///
/// In a cluster each service runs as its own process (`lmgrid gateway`,
/// `lmgrid worker`, ...) with a YAML config and etcd for discovery. On a
/// laptop, `lmgrid up` runs the whole platform in one process.
#[derive(Debug, Parser)]
#[command(name = "lmgrid", version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the whole platform in one process, for a laptop.
    Up(up::UpArgs),
    /// Run the gateway: the public OpenAI-compatible and Open Inference
    /// Protocol APIs.
    Gateway(ServiceArgs),
    /// Run the dispatcher: durable batch jobs in Redis.
    Dispatcher(ServiceArgs),
    /// Run a worker: ONNX Runtime inference, generation and embeddings.
    Worker(ServiceArgs),
    /// Run the model registry: versions, digests, aliases, artifacts.
    Registry(ServiceArgs),
    /// Run the notification service: events, subscriptions, webhooks, alerts.
    Notify(ServiceArgs),
}

/// Options of every service subcommand.
#[derive(Debug, clap::Args)]
struct ServiceArgs {
    /// YAML config file. Keys may be overridden by environment variables
    /// `LMGRID__SECTION__KEY=value` (e.g. `LMGRID__NODE__GRPC__LISTEN_ADDR`).
    /// Without a file, defaults and the environment apply.
    #[arg(long, short, env = "LMGRID_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    /// Check the config and exit (0 if valid, 64 if not) without starting.
    #[arg(long)]
    check: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("lmgrid: start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        match cli.command {
            Command::Up(args) => up::run(args).await,
            Command::Gateway(args) => {
                serve(
                    args,
                    "gateway",
                    |c: &lmgrid_gateway::Config| &c.node.telemetry,
                    lmgrid_gateway::run,
                )
                .await
            }
            Command::Dispatcher(args) => {
                serve(
                    args,
                    "dispatcher",
                    |c: &lmgrid_dispatcher::Config| &c.node.telemetry,
                    lmgrid_dispatcher::run,
                )
                .await
            }
            Command::Worker(args) => {
                serve(
                    args,
                    "worker",
                    |c: &lmgrid_worker::Config| &c.node.telemetry,
                    lmgrid_worker::run,
                )
                .await
            }
            Command::Registry(args) => {
                serve(
                    args,
                    "model-registry",
                    |c: &lmgrid_model_registry::Config| &c.node.telemetry,
                    lmgrid_model_registry::run,
                )
                .await
            }
            Command::Notify(args) => {
                serve(
                    args,
                    "notification",
                    |c: &lmgrid_notification::Config| &c.node.telemetry,
                    lmgrid_notification::run,
                )
                .await
            }
        }
    })
}

/// Loads a service config (exit 64 if invalid), then runs the service with
/// telemetry and signal handling.
async fn serve<C, F, Fut>(
    args: ServiceArgs,
    service: &str,
    telemetry: impl Fn(&C) -> &TelemetryConfig,
    run: F,
) -> ExitCode
where
    C: DeserializeOwned + Validate,
    F: FnOnce(C, CancellationToken) -> Fut,
    Fut: Future<Output = lmgrid_core::Result<()>>,
{
    let config: C = match load_config(args.config.as_deref()) {
        Ok(config) => config,
        Err(code) => return code,
    };
    if args.check {
        println!("config is valid");
        return ExitCode::SUCCESS;
    }
    let telemetry = match lmgrid_core::telemetry::init(
        telemetry(&config),
        &format!("lmgrid-{service}"),
    )
    .await
    {
        Ok(telemetry) => telemetry,
        Err(error) => {
            eprintln!("lmgrid: {error}");
            return ExitCode::FAILURE;
        }
    };
    let code = match lmgrid_core::shutdown::on_signals() {
        Err(error) => {
            tracing::error!(%error, "install signal handlers");
            ExitCode::FAILURE
        }
        Ok(shutdown) => match run(config, shutdown).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => {
                tracing::error!(%error, "{service} failed");
                ExitCode::FAILURE
            }
        },
    };
    telemetry.shutdown();
    code
}

fn load_config<C: DeserializeOwned + Validate>(path: Option<&Path>) -> Result<C, ExitCode> {
    config::load(path).map_err(|error: ConfigError| {
        eprintln!("lmgrid: {error}");
        ExitCode::from(EXIT_CONFIG)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }
}
