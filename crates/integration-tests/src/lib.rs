//! Integration tests for lmgrid: whole clusters of lmgrid services against a real etcd.
//!
//! [`Sandbox`] starts service instances in this process, each on its own loopback gRPC and
//! admin ports, registering in a real etcd under a key prefix no other test uses. Every
//! instance gets a handle ([`ServiceNode`]) with its addresses and id, and can be shut down
//! on its own while the others keep running, so tests can watch membership, health and the
//! shutdown order change as instances come and go.
//!
//! ```no_run
//! # async fn example() -> anyhow::Result<()> {
//! use lmgrid_integration_tests::Sandbox;
//! use lmgrid_test_support::EtcdServer;
//!
//! let etcd = EtcdServer::start().await?;
//! let sandbox = Sandbox::builder(&etcd).worker().worker().gateway().build().await?;
//! let worker = sandbox.node("worker");
//! worker.stop().await?;
//! # Ok(())
//! # }
//! ```
//!
//! [`SandboxBuilder::worker_with_models`] starts a worker serving a model repository (lay one
//! out with `lmgrid_test_support::onnx::model_repository`).
//!
//! [`connect`], [`health_status`], [`http_get`], [`http_request`] and the `wait_for_*` pollers
//! are the clients the tests use to look at an instance from outside.

mod probe;
mod proxy;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, anyhow, bail};
use lmgrid_core::config::{
    AdminConfig, DiscoveryConfig, EtcdConfig, GrpcConfig, NodeConfig, ShutdownConfig,
};
use lmgrid_core::discovery::{Discovery as _, EtcdDiscovery, Membership};
use lmgrid_test_support::EtcdServer;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use probe::{
    HttpResponse, connect, health_client, health_status, http_get, http_post_json, http_request,
    wait_for_health, wait_for_http,
};
pub use proxy::TcpProxy;
pub use tonic_health::pb::health_check_response::ServingStatus;

/// How long one client call (connect, request, response) may take before it counts as a
/// failure. Generous, because tests run on small, busy machines.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// How long an instance gets to start and register, or to deregister and stop.
pub const SETTLE_TIMEOUT: Duration = Duration::from_secs(30);

/// How often the `wait_for_*` helpers look again.
pub(crate) const POLL_INTERVAL: Duration = Duration::from_millis(50);

/// A kind of lmgrid service to start in a sandbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Service {
    /// A worker without models.
    Worker,
    /// A worker serving the model repository in this directory.
    WorkerWithModels(PathBuf),
    /// A worker serving the model repository in this directory, reached through a
    /// [`TcpProxy`] (its advertised address), so that a test can cut it off like a crash.
    WorkerBehindProxy(PathBuf),
    Dispatcher,
    Registry,
    Notification,
    /// A gateway that reports ready only once each of `require_services` has an instance.
    Gateway {
        require_services: Vec<String>,
    },
}

impl Service {
    /// The service's name in discovery and health (`model-registry`, not `registry`).
    pub fn name(&self) -> &'static str {
        match self {
            Service::Worker | Service::WorkerWithModels(_) | Service::WorkerBehindProxy(_) => {
                lmgrid_worker::SERVICE
            }
            Service::Dispatcher => lmgrid_dispatcher::SERVICE,
            Service::Registry => lmgrid_model_registry::SERVICE,
            Service::Notification => lmgrid_notification::SERVICE,
            Service::Gateway { .. } => lmgrid_gateway::SERVICE,
        }
    }
}

/// Chooses the instances and timings of a [`Sandbox`].
#[derive(Debug)]
pub struct SandboxBuilder {
    endpoint: String,
    prefix: String,
    settings: Settings,
    services: Vec<Service>,
}

/// What every instance of one sandbox shares.
#[derive(Debug, Clone)]
struct Settings {
    lease_ttl: Duration,
    drain_delay: Duration,
    grace_period: Duration,
    zone: Option<String>,
    routing: lmgrid_gateway::RoutingConfig,
    auth: lmgrid_gateway::AuthConfig,
    admission: lmgrid_gateway::AdmissionConfig,
    http: lmgrid_gateway::HttpConfig,
}

impl SandboxBuilder {
    pub fn worker(self) -> Self {
        self.service(Service::Worker)
    }

    /// A worker serving the model repository in `dir` (`<model>/config.yaml`,
    /// `<model>/<version>/model.onnx`); it registers once every model was tried.
    pub fn worker_with_models(self, dir: impl Into<PathBuf>) -> Self {
        self.service(Service::WorkerWithModels(dir.into()))
    }

    /// A worker serving the model repository in `dir` behind a [`TcpProxy`]; see
    /// [`ServiceNode::crash`].
    pub fn worker_behind_proxy(self, dir: impl Into<PathBuf>) -> Self {
        self.service(Service::WorkerBehindProxy(dir.into()))
    }

    pub fn dispatcher(self) -> Self {
        self.service(Service::Dispatcher)
    }

    pub fn registry(self) -> Self {
        self.service(Service::Registry)
    }

    pub fn notification(self) -> Self {
        self.service(Service::Notification)
    }

    /// A gateway that requires no other service to be ready.
    pub fn gateway(self) -> Self {
        self.service(Service::Gateway {
            require_services: Vec::new(),
        })
    }

    pub fn service(mut self, service: Service) -> Self {
        self.services.push(service);
        self
    }

    /// The etcd lease TTL of every instance: a crashed one disappears within this long.
    /// Defaults to 3 s; etcd accepts no less than 2 s.
    pub fn lease_ttl(mut self, ttl: Duration) -> Self {
        self.settings.lease_ttl = ttl;
        self
    }

    /// How long a stopping instance keeps accepting after it deregistered. Defaults to zero,
    /// so that tests which do not look at the drain do not wait for it.
    pub fn drain_delay(mut self, delay: Duration) -> Self {
        self.settings.drain_delay = delay;
        self
    }

    /// The longest a stopping instance waits for in-flight requests. Defaults to 10 s.
    pub fn grace_period(mut self, period: Duration) -> Self {
        self.settings.grace_period = period;
        self
    }

    /// How every gateway authenticates. By default keys are not required (callers on
    /// loopback are the tenant `anonymous` until a key exists) and there is no admin API.
    pub fn gateway_auth(mut self, auth: lmgrid_gateway::AuthConfig) -> Self {
        self.settings.auth = auth;
        self
    }

    /// How every gateway admits requests: the shared limiter's Redis, the model queues.
    pub fn gateway_admission(mut self, admission: lmgrid_gateway::AdmissionConfig) -> Self {
        self.settings.admission = admission;
        self
    }

    /// How every gateway routes: retries, ejection, the outstanding cap, model records.
    pub fn gateway_routing(mut self, routing: lmgrid_gateway::RoutingConfig) -> Self {
        self.settings.routing = routing;
        self
    }

    /// Every gateway's public HTTP settings; it listens on a free loopback port without
    /// the admin routes whatever `http` says of those.
    pub fn gateway_http(mut self, http: lmgrid_gateway::HttpConfig) -> Self {
        self.settings.http = http;
        self
    }

    /// The zone every instance reports in discovery.
    pub fn zone(mut self, zone: impl Into<String>) -> Self {
        self.settings.zone = Some(zone.into());
        self
    }

    /// Starts every chosen instance, in the order chosen, and waits until each is
    /// registered in discovery.
    pub async fn build(self) -> anyhow::Result<Sandbox> {
        let mut sandbox = Sandbox {
            endpoint: self.endpoint,
            prefix: self.prefix,
            settings: self.settings,
            nodes: Vec::new(),
        };
        for service in self.services {
            sandbox.start(service).await?;
        }
        Ok(sandbox)
    }
}

/// lmgrid service instances running in this process against one etcd and key prefix.
///
/// Dropping the sandbox drops its handles, which abort instances still running (see
/// [`ServiceNode`]).
#[derive(Debug)]
pub struct Sandbox {
    endpoint: String,
    prefix: String,
    settings: Settings,
    nodes: Vec<Arc<ServiceNode>>,
}

impl Sandbox {
    /// A builder for instances registering in `etcd` under a fresh unique prefix.
    pub fn builder(etcd: &EtcdServer) -> SandboxBuilder {
        SandboxBuilder {
            endpoint: etcd.endpoint().to_string(),
            prefix: etcd.unique_prefix("sandbox"),
            settings: Settings {
                lease_ttl: Duration::from_secs(3),
                drain_delay: Duration::ZERO,
                grace_period: Duration::from_secs(10),
                zone: None,
                routing: Default::default(),
                auth: lmgrid_gateway::AuthConfig {
                    required: false,
                    ..Default::default()
                },
                admission: Default::default(),
                http: Default::default(),
            },
            services: Vec::new(),
        }
    }

    /// The etcd key prefix every instance of this sandbox registers under.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub fn lease_ttl(&self) -> Duration {
        self.settings.lease_ttl
    }

    /// The etcd settings every instance uses, for clients that want the same view.
    pub fn etcd_config(&self) -> EtcdConfig {
        EtcdConfig {
            endpoints: vec![self.endpoint.clone()],
            prefix: self.prefix.clone(),
            lease_ttl: self.settings.lease_ttl,
            connect_timeout: CALL_TIMEOUT,
        }
    }

    /// The node settings of the next instance: loopback port 0 for gRPC and admin, so
    /// instances never race each other for a port.
    pub fn node_config(&self) -> NodeConfig {
        let any_port = SocketAddr::from(([127, 0, 0, 1], 0));
        NodeConfig {
            zone: self.settings.zone.clone(),
            grpc: GrpcConfig {
                listen_addr: any_port,
                advertise_addr: None,
            },
            admin: AdminConfig {
                enabled: true,
                listen_addr: any_port,
            },
            discovery: DiscoveryConfig {
                etcd: self.etcd_config(),
            },
            shutdown: ShutdownConfig {
                drain_delay: self.settings.drain_delay,
                grace_period: self.settings.grace_period,
            },
            ..NodeConfig::default()
        }
    }

    /// A new, independent etcd connection with this sandbox's prefix.
    pub async fn discovery(&self) -> anyhow::Result<EtcdDiscovery> {
        EtcdDiscovery::connect(&self.etcd_config())
            .await
            .context("connect discovery to etcd")
    }

    /// Watches `service` over a new etcd connection.
    pub async fn watch(&self, service: &str) -> anyhow::Result<Membership> {
        self.discovery()
            .await?
            .watch(service)
            .await
            .with_context(|| format!("watch {service}"))
    }

    /// Every instance started so far, running or not, in start order.
    pub fn all_nodes(&self) -> &[Arc<ServiceNode>] {
        &self.nodes
    }

    /// Every instance of `service` started so far, running or not, in start order.
    pub fn nodes(&self, service: &str) -> Vec<Arc<ServiceNode>> {
        self.nodes
            .iter()
            .filter(|node| node.service == service)
            .cloned()
            .collect()
    }

    /// The first instance of `service` started.
    ///
    /// # Panics
    ///
    /// Panics when the sandbox started no instance of `service`: the test is wrong.
    pub fn node(&self, service: &str) -> Arc<ServiceNode> {
        self.nodes(service)
            .into_iter()
            .next()
            .unwrap_or_else(|| panic!("the sandbox has no {service} instance"))
    }

    /// Starts one more instance and waits until it is registered in discovery.
    pub async fn start(&mut self, service: Service) -> anyhow::Result<Arc<ServiceNode>> {
        let node = self.spawn(service).await?;
        self.wait_registered(&node).await?;
        Ok(node)
    }

    /// Starts one more instance without waiting for it to become ready: for instances that
    /// must not be ready yet, such as a gateway whose required services are missing.
    pub async fn spawn(&mut self, service: Service) -> anyhow::Result<Arc<ServiceNode>> {
        let name = service.name();
        let node = Arc::new(
            self.launch(service)
                .await
                .with_context(|| format!("start {name}"))?,
        );
        self.nodes.push(node.clone());
        Ok(node)
    }

    /// Waits until discovery lists `node` (by its id).
    pub async fn wait_registered(&self, node: &ServiceNode) -> anyhow::Result<()> {
        let mut membership = self.watch(node.service).await?;
        tokio::time::timeout(
            SETTLE_TIMEOUT,
            membership.wait_for(|members| members.contains_key(node.id())),
        )
        .await
        .map_err(|_| anyhow!("{node} not registered after {SETTLE_TIMEOUT:?}"))?
        .context("discovery watch ended")?;
        Ok(())
    }

    async fn launch(&self, service: Service) -> anyhow::Result<ServiceNode> {
        let mut node = self.node_config();
        let shutdown = CancellationToken::new();
        let token = shutdown.clone();
        let mut proxy = None;
        let (started, (task, outcome)) = match service {
            Service::Worker | Service::WorkerWithModels(_) | Service::WorkerBehindProxy(_) => {
                let model_repository = match &service {
                    Service::WorkerWithModels(dir) | Service::WorkerBehindProxy(dir) => {
                        Some(dir.clone())
                    }
                    _ => None,
                };
                if let Service::WorkerBehindProxy(_) = service {
                    let bound = TcpProxy::bind().await?;
                    node.grpc.advertise_addr = Some(bound.addr().to_string());
                    proxy = Some(bound);
                }
                let s = lmgrid_worker::Worker::start(lmgrid_worker::Config {
                    node,
                    model_repository,
                    onnxruntime: Default::default(),
                })
                .await?;
                if let Some(proxy) = &proxy {
                    proxy.forward_to(s.grpc_addr());
                }
                let started = Started::new(s.id(), s.grpc_addr(), s.admin_addr(), None);
                (started, spawn_run(s.run(token)))
            }
            Service::Dispatcher => {
                let s = lmgrid_dispatcher::Dispatcher::start(lmgrid_dispatcher::Config { node })
                    .await?;
                let started = Started::new(s.id(), s.grpc_addr(), s.admin_addr(), None);
                (started, spawn_run(s.run(token)))
            }
            Service::Registry => {
                let s =
                    lmgrid_model_registry::Registry::start(lmgrid_model_registry::Config { node })
                        .await?;
                let started = Started::new(s.id(), s.grpc_addr(), s.admin_addr(), None);
                (started, spawn_run(s.run(token)))
            }
            Service::Notification => {
                let s =
                    lmgrid_notification::Notification::start(lmgrid_notification::Config { node })
                        .await?;
                let started = Started::new(s.id(), s.grpc_addr(), s.admin_addr(), None);
                (started, spawn_run(s.run(token)))
            }
            Service::Gateway {
                ref require_services,
            } => {
                let config = lmgrid_gateway::Config {
                    node,
                    http: lmgrid_gateway::HttpConfig {
                        listen_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
                        serve_admin: false,
                        ..self.settings.http.clone()
                    },
                    require_services: require_services.clone(),
                    routing: self.settings.routing.clone(),
                    auth: self.settings.auth.clone(),
                    admission: self.settings.admission.clone(),
                };
                let s = lmgrid_gateway::Gateway::start(config).await?;
                let started =
                    Started::new(s.id(), s.grpc_addr(), s.admin_addr(), Some(s.http_addr()));
                (started, spawn_run(s.run(token)))
            }
        };
        Ok(ServiceNode {
            service: service.name(),
            id: started.id,
            grpc_addr: started.grpc_addr,
            admin_addr: started.admin_addr.context("the admin server is disabled")?,
            http_addr: started.http_addr,
            shutdown,
            task,
            outcome,
            proxy,
        })
    }
}

/// What a started service tells about itself before it runs.
struct Started {
    id: String,
    grpc_addr: SocketAddr,
    admin_addr: Option<SocketAddr>,
    http_addr: Option<SocketAddr>,
}

impl Started {
    fn new(
        id: &str,
        grpc_addr: SocketAddr,
        admin_addr: Option<SocketAddr>,
        http_addr: Option<SocketAddr>,
    ) -> Self {
        Started {
            id: id.to_string(),
            grpc_addr,
            admin_addr,
            http_addr,
        }
    }
}

/// How a service's `run` ended: `None` while it runs, then its result, with the error as
/// text so that every waiter can read it.
type Outcome = Option<Result<(), String>>;

/// Spawns a service's `run` and publishes its result when it returns.
fn spawn_run(
    run: impl Future<Output = lmgrid_core::Result<()>> + Send + 'static,
) -> (JoinHandle<()>, watch::Receiver<Outcome>) {
    let (tx, rx) = watch::channel(None);
    let task = tokio::spawn(async move {
        let result = run.await.map_err(|error| error.to_string());
        tx.send_replace(Some(result));
    });
    (task, rx)
}

/// One running (or stopped) service instance of a [`Sandbox`].
///
/// Dropping the last handle aborts an instance that is still running, which behaves like
/// a crash: its record stays in etcd until the lease runs out.
#[derive(Debug)]
pub struct ServiceNode {
    service: &'static str,
    id: String,
    grpc_addr: SocketAddr,
    admin_addr: SocketAddr,
    http_addr: Option<SocketAddr>,
    shutdown: CancellationToken,
    task: JoinHandle<()>,
    outcome: watch::Receiver<Outcome>,
    proxy: Option<TcpProxy>,
}

impl ServiceNode {
    /// The service name in discovery, e.g. `worker`.
    pub fn service(&self) -> &'static str {
        self.service
    }

    /// The instance id, its key in discovery.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The bound gRPC address.
    pub fn grpc_addr(&self) -> SocketAddr {
        self.grpc_addr
    }

    /// The bound admin HTTP address (`/livez`, `/readyz`, `/metrics`).
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    /// The public HTTP address of a gateway.
    ///
    /// # Panics
    ///
    /// Panics for instances other than gateways: the test is wrong.
    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
            .unwrap_or_else(|| panic!("{self} has no public HTTP port"))
    }

    /// The token whose cancellation starts this instance's graceful shutdown.
    pub fn shutdown_token(&self) -> &CancellationToken {
        &self.shutdown
    }

    /// Starts the graceful shutdown (as SIGTERM would) without waiting for it.
    pub fn begin_shutdown(&self) {
        self.shutdown.cancel();
    }

    /// Whether `run` has returned.
    pub fn is_stopped(&self) -> bool {
        self.outcome.borrow().is_some()
    }

    /// Waits until `run` returns, at most [`SETTLE_TIMEOUT`], and passes on its error.
    pub async fn stopped(&self) -> anyhow::Result<()> {
        let mut outcome = self.outcome.clone();
        let finished = tokio::time::timeout(SETTLE_TIMEOUT, outcome.wait_for(Option::is_some))
            .await
            .map_err(|_| anyhow!("{self} still running after {SETTLE_TIMEOUT:?}"))?
            .map_err(|_| anyhow!("{self} ended without a result (its task panicked)"))?;
        match finished.as_ref() {
            Some(Ok(())) => Ok(()),
            Some(Err(error)) => bail!("{self} failed: {error}"),
            None => unreachable!("waited for an outcome"),
        }
    }

    /// The proxy in front of a worker started with [`SandboxBuilder::worker_behind_proxy`].
    pub fn proxy(&self) -> Option<&TcpProxy> {
        self.proxy.as_ref()
    }

    /// Crashes the instance, as far as anyone outside can tell: its connections are reset
    /// and new ones refused (through its proxy, so only for instances behind one), and its
    /// `run` is aborted without deregistering, so its record stays in discovery until the
    /// lease runs out. (The servers it spawned keep running unreachable until the test
    /// ends: in-process there is no process to kill.)
    pub fn crash(&self) {
        if let Some(proxy) = &self.proxy {
            proxy.cut();
        }
        self.task.abort();
    }

    /// Shuts down gracefully and waits until `run` returns.
    pub async fn stop(&self) -> anyhow::Result<()> {
        self.begin_shutdown();
        self.stopped().await
    }
}

impl std::fmt::Display for ServiceNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {} ({})", self.service, self.id, self.grpc_addr)
    }
}

impl Drop for ServiceNode {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_names_match_discovery() {
        let names: Vec<_> = [
            Service::Worker,
            Service::Dispatcher,
            Service::Registry,
            Service::Notification,
        ]
        .iter()
        .map(Service::name)
        .collect();
        assert_eq!(
            names,
            ["worker", "dispatcher", "model-registry", "notification"]
        );
    }
}
