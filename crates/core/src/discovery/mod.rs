//! Service discovery: instances register themselves with their address and
//! load, and clients watch a service's members into a local table. The same
//! store carries the model records gateways route by (aliases and traffic
//! weights, see [`ModelRecord`]).
//!
//! One trait, [`Discovery`], with two implementations: [`EtcdDiscovery`] for
//! clusters (leases with keep-alive, prefix watches) and [`MemoryDiscovery`]
//! for `lmgrid up`, where every service runs in one process. etcd is
//! membership and configuration, never the data path.

mod etcd;
mod memory;
mod models;

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

pub use etcd::EtcdDiscovery;
pub use memory::MemoryDiscovery;
pub use models::{
    MAX_WEIGHT, ModelRecord, ModelRecords, ModelTable, TrafficWeight, model_key, models_prefix,
};

/// Result alias for discovery operations.
pub type Result<T, E = DiscoveryError> = std::result::Result<T, E>;

/// A discovery failure.
#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    #[error(transparent)]
    Etcd(#[from] crate::etcd::EtcdError),
    #[error("encode instance record: {0}")]
    Encode(#[from] serde_json::Error),
}

impl From<DiscoveryError> for crate::Error {
    fn from(err: DiscoveryError) -> Self {
        crate::Error::Discovery(err.to_string())
    }
}

/// What one registered instance tells the others about itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Instance {
    /// Service name: `gateway`, `dispatcher`, `worker`, `model-registry`,
    /// `notification`.
    pub service: String,
    /// Unique within the service.
    pub id: String,
    /// `host:port` of the instance's gRPC server.
    pub address: String,
    /// lmgrid version the instance runs.
    pub version: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
    /// Models served (workers only).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub models: Vec<ServedModel>,
    /// Current load (workers only), refreshed while registered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load: Option<Load>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metadata: BTreeMap<String, String>,
}

/// One model version an instance serves.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServedModel {
    pub name: String,
    pub version: String,
    /// What the model serves: `tensor` (Open Inference Protocol only),
    /// `embedding` (also `Embed`) or `generation` (`Generate`). Records
    /// written before the field existed read as `tensor`.
    #[serde(default = "tensor_kind")]
    pub kind: String,
}

fn tensor_kind() -> String {
    "tensor".to_string()
}

/// Load an instance reports so that routers can pick the least busy one.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Load {
    pub in_flight: u32,
    pub queue_depth: u32,
    /// Model instances (sessions) running.
    pub instances: u32,
    /// `cpu` or `cuda:<device>`.
    pub accelerator: String,
}

/// The members of one service as last seen, keyed by instance id.
pub type Members = Arc<BTreeMap<String, Instance>>;

/// Registers instances and watches services.
#[async_trait::async_trait]
pub trait Discovery: Send + Sync + fmt::Debug {
    /// Publishes `instance` until the returned registration is deregistered
    /// or dropped. Dropping without deregistering behaves like a crash: the
    /// record disappears once its lease runs out.
    async fn register(&self, instance: Instance) -> Result<Box<dyn Registration>>;

    /// Watches the members of `service`. The returned table is complete when
    /// this returns and stays up to date while it is held.
    async fn watch(&self, service: &str) -> Result<Membership>;

    /// Watches the model records (aliases, traffic weights). Complete when
    /// this returns and kept up to date while held; a record that does not
    /// validate is left out, with a warning.
    async fn watch_models(&self) -> Result<ModelTable>;
}

/// A live registration.
#[async_trait::async_trait]
pub trait Registration: Send + Sync + fmt::Debug {
    /// The record as currently published.
    fn instance(&self) -> &Instance;

    /// Replaces the published record (same service and id), e.g. with new load.
    async fn update(&mut self, instance: Instance) -> Result<()>;

    /// Removes the record at once.
    async fn deregister(self: Box<Self>) -> Result<()>;
}

/// A locally kept, continuously updated table of one service's members.
#[derive(Debug, Clone)]
pub struct Membership {
    service: String,
    rx: watch::Receiver<Members>,
}

impl Membership {
    pub(crate) fn new(service: &str, rx: watch::Receiver<Members>) -> Self {
        Membership {
            service: service.to_string(),
            rx,
        }
    }

    pub fn service(&self) -> &str {
        &self.service
    }

    /// The members now.
    pub fn members(&self) -> Members {
        self.rx.borrow().clone()
    }

    /// Waits for the next change of the table; errors when the watch ended.
    pub async fn changed(&mut self) -> Result<Members, watch::error::RecvError> {
        self.rx.changed().await?;
        Ok(self.rx.borrow_and_update().clone())
    }

    /// Waits until `predicate` holds for the table and returns it.
    pub async fn wait_for(
        &mut self,
        mut predicate: impl FnMut(&BTreeMap<String, Instance>) -> bool,
    ) -> Result<Members, watch::error::RecvError> {
        let members = self.rx.wait_for(|m| predicate(m)).await?;
        Ok(members.clone())
    }
}

/// The etcd key of an instance record.
pub fn instance_key(prefix: &str, service: &str, id: &str) -> String {
    format!("{prefix}/instances/{service}/{id}")
}

/// The etcd key prefix of a service's instance records.
pub fn service_prefix(prefix: &str, service: &str) -> String {
    format!("{prefix}/instances/{service}/")
}
