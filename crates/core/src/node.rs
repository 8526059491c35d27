//! The lifecycle every service runs: bind, serve gRPC (with health and
//! reflection) and the admin HTTP server, become ready, register in
//! discovery; then on shutdown fail readiness, deregister, keep accepting for
//! the drain delay, stop accepting, and drain in-flight requests under the
//! grace period.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_stream::StreamExt as _;
use tokio_util::sync::CancellationToken;
use tonic::service::Routes;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;
use tracing::Instrument;

use crate::coalesce::Coalesce;
use crate::config::NodeConfig;
use crate::discovery::{Discovery, EtcdDiscovery, Instance, Registration};
use crate::health::{Readiness, admin_router};
use crate::{Error, Result, metrics, telemetry};

/// A service instance with its ports bound, not yet serving.
pub struct Node {
    service: &'static str,
    grpc_services: Vec<&'static str>,
    config: NodeConfig,
    id: String,
    grpc_listener: TcpListener,
    grpc_addr: SocketAddr,
    admin_listener: Option<TcpListener>,
    http: Vec<(TcpListener, Router)>,
    admin_routes: Option<Router>,
    readiness: Readiness,
    discovery: Arc<dyn Discovery>,
    health: HealthReporter,
    health_service:
        tonic_health::pb::health_server::HealthServer<tonic_health::server::HealthService>,
    instance_updates: Option<watch::Receiver<Instance>>,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("service", &self.service)
            .field("id", &self.id)
            .field("grpc_addr", &self.grpc_addr)
            .finish_non_exhaustive()
    }
}

impl Node {
    /// Connects discovery and binds the gRPC and admin ports. `service` is
    /// the service's short name (`worker`); `grpc_services` are the fully
    /// qualified gRPC services it serves, reported in `grpc.health.v1`.
    pub async fn start(
        config: &NodeConfig,
        service: &'static str,
        grpc_services: &[&'static str],
    ) -> Result<Node> {
        let discovery: Arc<dyn Discovery> = match &config.in_process_discovery {
            Some(discovery) => discovery.clone(),
            None => Arc::new(EtcdDiscovery::connect(&config.discovery.etcd).await?),
        };
        let grpc_listener = bind("gRPC", config.grpc.listen_addr).await?;
        let grpc_addr = local_addr("gRPC", &grpc_listener, config.grpc.listen_addr)?;
        let admin_listener = if config.admin.enabled {
            Some(bind("admin HTTP", config.admin.listen_addr).await?)
        } else {
            None
        };
        let health = HealthReporter::new();
        let health_service = tonic_health::pb::health_server::HealthServer::new(
            tonic_health::server::HealthService::from_health_reporter(health.clone()),
        );
        // Nothing is serving until readiness says so.
        health
            .set_service_status("", ServingStatus::NotServing)
            .await;
        let id = config
            .instance_id
            .clone()
            .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
        metrics::build_info(service);
        metrics::ready(service, &id, false);
        Ok(Node {
            service,
            grpc_services: grpc_services.to_vec(),
            config: config.clone(),
            id,
            grpc_listener,
            grpc_addr,
            admin_listener,
            http: Vec::new(),
            admin_routes: None,
            readiness: Readiness::new(),
            discovery,
            health,
            health_service,
            instance_updates: None,
        })
    }

    pub fn service(&self) -> &'static str {
        self.service
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// The bound gRPC address (the real port when configured with port 0).
    pub fn grpc_addr(&self) -> SocketAddr {
        self.grpc_addr
    }

    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_listener
            .as_ref()
            .and_then(|l| l.local_addr().ok())
    }

    pub fn readiness(&self) -> &Readiness {
        &self.readiness
    }

    pub fn discovery(&self) -> Arc<dyn Discovery> {
        self.discovery.clone()
    }

    /// The `grpc.health.v1` reporter, for services that report more names.
    pub fn health_reporter(&self) -> HealthReporter {
        self.health.clone()
    }

    /// The record this instance registers, before any service additions.
    pub fn instance(&self) -> Instance {
        base_instance(&self.config, self.service, &self.id, self.grpc_addr)
    }

    /// Serves another HTTP router (the gateway's public API) with the same
    /// lifecycle as the gRPC server.
    pub fn serve_http(&mut self, listener: TcpListener, router: Router) {
        self.http.push((listener, router));
    }

    /// Serves `routes` on the admin HTTP server too, beside `/livez`,
    /// `/readyz` and `/metrics` (the gateway's admin API).
    pub fn serve_admin_routes(&mut self, routes: Router) {
        self.admin_routes = Some(match self.admin_routes.take() {
            Some(existing) => existing.merge(routes),
            None => routes,
        });
    }

    /// Publishes each new record from `updates` (e.g. a worker's load) while
    /// registered. The registered record starts as the channel's current one.
    pub fn publish_updates(&mut self, updates: watch::Receiver<Instance>) {
        self.instance_updates = Some(updates);
    }

    /// Serves until `shutdown` fires, then shuts down in order. Returns an
    /// error if a server fails or registration is impossible.
    pub async fn run(self, routes: Routes, shutdown: CancellationToken) -> Result<()> {
        let span = tracing::info_span!("node", service = self.service, instance = %self.id);
        self.serve(routes, shutdown).instrument(span).await
    }

    async fn serve(self, routes: Routes, shutdown: CancellationToken) -> Result<()> {
        let Node {
            service,
            grpc_services,
            config,
            id,
            grpc_listener,
            grpc_addr,
            admin_listener,
            http,
            admin_routes,
            readiness,
            discovery,
            health,
            health_service,
            mut instance_updates,
        } = self;

        let reflection_v1 = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(lmgrid_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1()
            .map_err(|e| Error::Serve {
                what: "gRPC reflection",
                message: e.to_string(),
            })?;
        let reflection_v1alpha = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(lmgrid_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1alpha()
            .map_err(|e| Error::Serve {
                what: "gRPC reflection",
                message: e.to_string(),
            })?;

        // Servers stop accepting on `stop_accepting`; the admin server lives
        // until the very end so probes see the whole drain.
        let stop_accepting = CancellationToken::new();
        let stop_admin = CancellationToken::new();

        let grpc_latch = readiness.latch("grpc");
        let mut grpc_task: JoinHandle<Result<()>> = {
            let stop = stop_accepting.clone();
            let router = tonic::transport::Server::builder()
                .trace_fn(telemetry::grpc_request_span)
                .add_routes(routes)
                .add_service(health_service)
                .add_service(reflection_v1)
                .add_service(reflection_v1alpha);
            tokio::spawn(
                async move {
                    router
                        .serve_with_incoming_shutdown(
                            accepted(grpc_listener),
                            stop.cancelled_owned(),
                        )
                        .await
                        .map_err(|e| Error::Serve {
                            what: "gRPC",
                            message: e.to_string(),
                        })
                }
                .in_current_span(),
            )
        };
        // The listener was bound before the task started, so connections are
        // already being queued and will be served.
        grpc_latch.release();
        tracing::info!(%grpc_addr, "gRPC server listening");

        let admin_task = admin_listener.map(|listener| {
            if let Ok(addr) = listener.local_addr() {
                tracing::info!(%addr, "admin HTTP server listening");
            }
            let mut router = admin_router(readiness.clone());
            if let Some(routes) = admin_routes {
                router = router.merge(routes);
            }
            spawn_http(listener, router, stop_admin.clone())
        });
        let http_tasks: Vec<_> = http
            .into_iter()
            .map(|(listener, router)| spawn_http(listener, router, stop_accepting.clone()))
            .collect();

        let health_task = tokio::spawn(
            follow_readiness(
                readiness.clone(),
                health.clone(),
                service,
                grpc_services.clone(),
                id.clone(),
            )
            .in_current_span(),
        );

        // Register only once ready, so routers never see an instance that
        // cannot serve yet.
        let mut registration: Option<Box<dyn Registration>> = None;
        let mut failure: Option<Error> = None;
        tokio::select! {
            _ = shutdown.cancelled() => {}
            _ = readiness.wait_ready() => {
                let record = match &instance_updates {
                    Some(updates) => updates.borrow().clone(),
                    None => base_instance(&config, service, &id, grpc_addr),
                };
                match discovery.register(record).await {
                    Ok(r) => {
                        metrics::registered(service, &id, true);
                        tracing::info!(address = %r.instance().address, "ready and registered");
                        registration = Some(r);
                    }
                    Err(e) => failure = Some(e.into()),
                }
            }
            result = &mut grpc_task => {
                failure = Some(flatten(result));
            }
        }

        if failure.is_none() && registration.is_some() {
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    result = &mut grpc_task => {
                        failure = Some(flatten(result));
                        break;
                    }
                    changed = wait_update(&mut instance_updates) => {
                        let Some(record) = changed else {
                            instance_updates = None;
                            continue;
                        };
                        if let Some(r) = registration.as_mut()
                            && let Err(error) = r.update(record).await
                        {
                            tracing::warn!(%error, "publish instance update");
                        }
                    }
                }
            }
        }

        // 1. Fail readiness: probes and gRPC health turn NOT_SERVING. gRPC health is set
        // here too rather than left to `follow_readiness`, which may run later, so that no
        // client ever sees a deregistered instance still SERVING.
        health_task.abort();
        readiness.set_draining();
        report_health(&health, service, &grpc_services, ServingStatus::NotServing).await;
        metrics::ready(service, &id, false);
        tracing::info!("draining: readiness failed");
        // 2. Deregister, so routers stop sending new work here.
        if let Some(registration) = registration.take() {
            match registration.deregister().await {
                Ok(()) => tracing::info!("deregistered"),
                Err(error) => tracing::warn!(%error, "deregister; the lease will expire instead"),
            }
            metrics::registered(service, &id, false);
        }
        // 3. Keep accepting while routers' views catch up with the deregistration.
        if failure.is_none() && !config.shutdown.drain_delay.is_zero() {
            tokio::time::sleep(config.shutdown.drain_delay).await;
        }
        // 4. Stop accepting and drain in-flight requests within the grace period.
        stop_accepting.cancel();
        let deadline = tokio::time::Instant::now() + config.shutdown.grace_period;
        if !grpc_task.is_finished() || failure.is_none() {
            match tokio::time::timeout_at(deadline, &mut grpc_task).await {
                Ok(result) => {
                    if let Err(error) = flatten_ok(result) {
                        failure.get_or_insert(error);
                    }
                }
                Err(_) => {
                    tracing::warn!(
                        grace_period = ?config.shutdown.grace_period,
                        "grace period over with gRPC requests in flight; closing them"
                    );
                    grpc_task.abort();
                }
            }
        }
        for mut task in http_tasks {
            if tokio::time::timeout_at(deadline, &mut task).await.is_err() {
                tracing::warn!("grace period over with HTTP requests in flight; closing them");
                task.abort();
            }
        }
        stop_admin.cancel();
        if let Some(task) = admin_task {
            let _ = tokio::time::timeout(Duration::from_secs(1), task).await;
        }
        tracing::info!("stopped");
        match failure {
            Some(error) => Err(error),
            None => Ok(()),
        }
    }
}

fn base_instance(config: &NodeConfig, service: &str, id: &str, grpc_addr: SocketAddr) -> Instance {
    Instance {
        service: service.to_string(),
        id: id.to_string(),
        address: advertise_address(config, grpc_addr),
        version: crate::VERSION.to_string(),
        zone: config.zone.clone(),
        models: Vec::new(),
        load: None,
        metadata: Default::default(),
    }
}

async fn wait_update(updates: &mut Option<watch::Receiver<Instance>>) -> Option<Instance> {
    match updates {
        Some(rx) => match rx.changed().await {
            Ok(()) => Some(rx.borrow_and_update().clone()),
            Err(_) => None,
        },
        None => std::future::pending().await,
    }
}

fn flatten(result: Result<Result<()>, tokio::task::JoinError>) -> Error {
    match result {
        Ok(Ok(())) => Error::Serve {
            what: "gRPC",
            message: "server stopped unexpectedly".into(),
        },
        Ok(Err(error)) => error,
        Err(join) => Error::Serve {
            what: "gRPC",
            message: join.to_string(),
        },
    }
}

fn flatten_ok(result: Result<Result<()>, tokio::task::JoinError>) -> Result<()> {
    match result {
        Ok(inner) => inner,
        Err(join) if join.is_cancelled() => Ok(()),
        Err(join) => Err(Error::Serve {
            what: "gRPC",
            message: join.to_string(),
        }),
    }
}

/// Mirrors readiness into `grpc.health.v1` for the whole server (""), the
/// service's short name, and each gRPC service it serves.
async fn follow_readiness(
    readiness: Readiness,
    health: HealthReporter,
    service: &'static str,
    grpc_services: Vec<&'static str>,
    id: String,
) {
    let mut state = readiness.subscribe();
    loop {
        let ready = state.borrow_and_update().is_ready();
        let status = if ready {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        report_health(&health, service, &grpc_services, status).await;
        metrics::ready(service, &id, ready);
        if state.changed().await.is_err() {
            return;
        }
    }
}

/// Sets the `grpc.health.v1` status of the whole server (""), the service's
/// short name, and each gRPC service it serves.
async fn report_health(
    health: &HealthReporter,
    service: &'static str,
    grpc_services: &[&'static str],
    status: ServingStatus,
) {
    for name in std::iter::once("")
        .chain(std::iter::once(service))
        .chain(grpc_services.iter().copied())
    {
        health.set_service_status(name, status).await;
    }
}

/// Accepted connections with Nagle's algorithm off, their writes coalesced
/// ([`Coalesce`](crate::coalesce::Coalesce)). Serving from our own listener
/// bypasses the server builder's `tcp_nodelay`, and with Nagle on, small gRPC
/// responses wait for the peer's delayed ACK (~40 ms a request).
fn accepted(
    listener: TcpListener,
) -> impl tokio_stream::Stream<Item = std::io::Result<Coalesce<tokio::net::TcpStream>>> + Send + 'static
{
    tonic::transport::server::TcpIncoming::from(listener)
        .with_nodelay(Some(true))
        .map(|accepted| accepted.map(Coalesce::new))
}

fn spawn_http(listener: TcpListener, router: Router, stop: CancellationToken) -> JoinHandle<()> {
    tokio::spawn(
        async move {
            use axum::serve::ListenerExt as _;
            // Nagle off, as for gRPC: small responses must not wait for delayed ACKs.
            let listener = listener.tap_io(|tcp| {
                let _ = tcp.set_nodelay(true);
            });
            // Handlers may read the peer's address (`ConnectInfo<SocketAddr>`),
            // e.g. to tell loopback callers apart.
            let service = router.into_make_service_with_connect_info::<SocketAddr>();
            if let Err(error) = axum::serve(listener, service)
                .with_graceful_shutdown(stop.cancelled_owned())
                .await
            {
                tracing::error!(%error, "HTTP server failed");
            }
        }
        .in_current_span(),
    )
}

async fn bind(what: &'static str, addr: SocketAddr) -> Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| Error::Bind { what, addr, source })
}

fn local_addr(what: &'static str, listener: &TcpListener, addr: SocketAddr) -> Result<SocketAddr> {
    listener
        .local_addr()
        .map_err(|source| Error::Bind { what, addr, source })
}

/// Binds an HTTP listener with the same error reporting as the node's own.
pub async fn bind_http(what: &'static str, addr: SocketAddr) -> Result<TcpListener> {
    bind(what, addr).await
}

/// The address other instances should dial: the configured advertise
/// address, else the bound address, with the host name standing in for an
/// unspecified (0.0.0.0) listen address.
fn advertise_address(config: &NodeConfig, bound: SocketAddr) -> String {
    if let Some(addr) = &config.grpc.advertise_addr {
        return addr.clone();
    }
    if bound.ip().is_unspecified() {
        let host = std::env::var("HOSTNAME")
            .ok()
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "localhost".to_string());
        return format!("{host}:{}", bound.port());
    }
    bound.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advertise_prefers_config_then_bound_address() {
        let mut config = NodeConfig::default();
        let bound: SocketAddr = "127.0.0.1:4000".parse().unwrap();
        assert_eq!(advertise_address(&config, bound), "127.0.0.1:4000");
        config.grpc.advertise_addr = Some("worker-0.lmgrid:8081".into());
        assert_eq!(advertise_address(&config, bound), "worker-0.lmgrid:8081");
        config.grpc.advertise_addr = None;
        let any: SocketAddr = "0.0.0.0:8081".parse().unwrap();
        assert!(advertise_address(&config, any).ends_with(":8081"));
    }
}
