//! What every lmgrid service shares: typed configuration, telemetry,
//! discovery, health and readiness, graceful shutdown, the node lifecycle that
//! ties them together, and the one mapping from errors to gRPC codes and HTTP
//! statuses.
//!
//! A service is a library with `run(config, shutdown)`; it binds its ports
//! through [`node::Node`], which owns the order of start-up (validate, bind,
//! serve, become ready, register) and shutdown (fail readiness, deregister,
//! stop accepting, drain under a grace timeout).

pub mod coalesce;
pub mod config;
pub mod deadline;
pub mod discovery;
pub mod error;
pub mod etcd;
pub mod health;
pub mod metrics;
pub mod node;
pub mod oip;
pub mod shutdown;
pub mod telemetry;

pub use config::{ConfigError, NodeConfig};
pub use error::{Error, ErrorKind, Result};

/// The version every service reports in discovery, metrics and metadata.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
