//! The gateway's configuration: the node, the public HTTP server and its
//! request limits, the services it waits for, and routing.

use std::net::SocketAddr;
use std::time::Duration;

use lmgrid_core::config::{ConfigError, NodeConfig, Validate};
use serde::Deserialize;

pub use crate::admission::config::{AdmissionConfig, QueueConfig, RedisConfig};
pub use crate::auth::config::{AuthConfig, TenantDefaults};
use crate::peers::PEER_SERVICES;
use crate::routing::config::RoutingConfig;

/// Gateway configuration.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub node: NodeConfig,
    pub http: HttpConfig,
    /// Services that must each have a ready instance before the gateway
    /// reports ready. Empty in clusters (the gateway answers 503 while no
    /// worker is ready); `lmgrid up` lists every service so that its
    /// `/readyz` means "the whole platform is up".
    pub require_services: Vec<String>,
    /// How workers are picked, attempts retried and failing workers ejected.
    pub routing: RoutingConfig,
    /// API keys, tenants and the admin API.
    pub auth: AuthConfig,
    /// Rate limits, concurrency and the per-model queue.
    pub admission: AdmissionConfig,
}

/// The public HTTP server: the OpenAI-compatible and Open Inference Protocol
/// REST APIs.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpConfig {
    pub listen_addr: SocketAddr,
    /// Also serve `/livez`, `/readyz` and `/metrics` on the public port.
    pub serve_admin: bool,
    /// The largest request body accepted; a larger one is answered 413.
    pub max_body_bytes: usize,
    /// The most tokens one request may ask to generate (`max_tokens`); more
    /// is answered 400. A request that names no limit gets the model's
    /// default (`generation.default_max_tokens` in its config).
    pub max_tokens_cap: u32,
    /// How long a request may take end to end, streamed generations
    /// included, unless the client asks for less (`x-request-timeout`,
    /// `grpc-timeout`). The remaining budget travels to the worker as the
    /// gRPC deadline.
    #[serde(with = "humantime_serde")]
    pub default_timeout: Duration,
    /// Compress answers of 1 KiB or more with gzip or deflate when the
    /// client's `Accept-Encoding` asks for it (streams excepted). Off where
    /// a proxy in front compresses instead.
    pub compress_responses: bool,
}

/// The default of [`HttpConfig::max_body_bytes`]: 2 MiB.
pub const DEFAULT_MAX_BODY_BYTES: usize = 2 * 1024 * 1024;

/// The default of [`HttpConfig::max_tokens_cap`].
pub const DEFAULT_MAX_TOKENS_CAP: u32 = 4096;

/// The default of [`HttpConfig::default_timeout`].
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(300);

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            listen_addr: SocketAddr::from(([0, 0, 0, 0], 8080)),
            serve_admin: false,
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            max_tokens_cap: DEFAULT_MAX_TOKENS_CAP,
            default_timeout: DEFAULT_TIMEOUT,
            compress_responses: true,
        }
    }
}

impl Validate for Config {
    fn validate(&self) -> Result<(), ConfigError> {
        self.node.validate_at("node")?;
        if self.http.listen_addr == self.node.grpc.listen_addr
            || (self.node.admin.enabled && self.http.listen_addr == self.node.admin.listen_addr)
        {
            return Err(ConfigError::new(
                "http.listen_addr",
                "must differ from node.grpc.listen_addr and node.admin.listen_addr",
            ));
        }
        if !(1024..=1 << 30).contains(&self.http.max_body_bytes) {
            return Err(ConfigError::new(
                "http.max_body_bytes",
                "must be between 1024 (1 KiB) and 1073741824 (1 GiB)",
            ));
        }
        if self.http.max_tokens_cap == 0 {
            return Err(ConfigError::new(
                "http.max_tokens_cap",
                "must be at least 1",
            ));
        }
        if self.http.default_timeout < Duration::from_millis(100)
            || self.http.default_timeout > Duration::from_secs(24 * 3600)
        {
            return Err(ConfigError::new(
                "http.default_timeout",
                "must be between 100ms and 24h",
            ));
        }
        self.routing.validate_at("routing")?;
        self.auth.validate_at("auth")?;
        self.admission.validate_at("admission")?;
        if self.auth.store_path.is_some() && self.node.in_process_discovery.is_none() {
            return Err(ConfigError::new(
                "auth.store_path",
                "only for lmgrid up; a cluster keeps tenants in etcd",
            ));
        }
        for service in &self.require_services {
            if !PEER_SERVICES.contains(&service.as_str()) {
                return Err(ConfigError::new(
                    "require_services",
                    format!("unknown service {service:?}; expected one of {PEER_SERVICES:?}"),
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_defaults_are_valid() {
        Config::default().validate().unwrap();
        let http = HttpConfig::default();
        assert_eq!(http.max_body_bytes, 2 * 1024 * 1024);
        assert_eq!(http.default_timeout, Duration::from_secs(300));
    }

    #[test]
    fn limits_out_of_range_name_their_key() {
        let mut config = Config::default();
        config.http.max_body_bytes = 10;
        assert_eq!(config.validate().unwrap_err().key, "http.max_body_bytes");
        let mut config = Config::default();
        config.http.max_tokens_cap = 0;
        assert_eq!(config.validate().unwrap_err().key, "http.max_tokens_cap");
        let mut config = Config::default();
        config.http.default_timeout = Duration::ZERO;
        assert_eq!(config.validate().unwrap_err().key, "http.default_timeout");
    }
}
