//! Typed configuration: a YAML file, then environment overrides, then
//! validation — all before any port is bound.
//!
//! Every service config is a struct with `#[serde(deny_unknown_fields)]`, so a
//! misspelled key is an error that names it rather than a silently ignored
//! setting. Environment variables of the form `LMGRID__A__B=value` override the
//! key `a.b`; the value is parsed as YAML, so lists and numbers work
//! (`LMGRID__NODE__DISCOVERY__ETCD__ENDPOINTS='[http://etcd:2379]'`).

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use serde::de::DeserializeOwned;

use crate::discovery::Discovery;

/// Prefix of the environment variables that override configuration keys.
pub const ENV_PREFIX: &str = "LMGRID__";

/// A configuration problem, naming the key it is about.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid config at `{key}`: {message}")]
pub struct ConfigError {
    /// Dotted path of the offending key (`node.grpc.listen_addr`), or the file.
    pub key: String,
    pub message: String,
}

impl ConfigError {
    pub fn new(key: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError {
            key: key.into(),
            message: message.into(),
        }
    }
}

/// Checks that go beyond what deserialization can express.
pub trait Validate {
    /// Returns the first problem found, naming its key.
    fn validate(&self) -> Result<(), ConfigError>;
}

/// Loads a config from an optional YAML file and the process environment.
pub fn load<T: DeserializeOwned + Validate>(path: Option<&Path>) -> Result<T, ConfigError> {
    let text = match path {
        Some(path) => std::fs::read_to_string(path).map_err(|e| {
            ConfigError::new(path.display().to_string(), format!("cannot read file: {e}"))
        })?,
        None => String::new(),
    };
    load_from(&text, std::env::vars())
}

/// Loads a config from YAML text and `(name, value)` environment pairs.
pub fn load_from<T: DeserializeOwned + Validate>(
    yaml: &str,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<T, ConfigError> {
    let mut root: yaml_serde::Value = if yaml.trim().is_empty() {
        yaml_serde::Value::Mapping(Default::default())
    } else {
        yaml_serde::from_str(yaml).map_err(|e| ConfigError::new("<file>", e.to_string()))?
    };
    if root.is_null() {
        root = yaml_serde::Value::Mapping(Default::default());
    }
    let mut overrides: Vec<(String, String)> = env
        .into_iter()
        .filter(|(name, _)| name.starts_with(ENV_PREFIX))
        .collect();
    overrides.sort();
    for (name, value) in overrides {
        apply_override(&mut root, &name, &value)?;
    }
    let config: T = serde_path_to_error::deserialize(root).map_err(|e| {
        let path = e.path().to_string();
        let key = if path == "." {
            "<root>".to_string()
        } else {
            path
        };
        ConfigError::new(key, e.into_inner().to_string())
    })?;
    config.validate()?;
    Ok(config)
}

fn apply_override(
    root: &mut yaml_serde::Value,
    name: &str,
    value: &str,
) -> Result<(), ConfigError> {
    let keys: Vec<String> = name[ENV_PREFIX.len()..]
        .split("__")
        .map(|k| k.to_ascii_lowercase())
        .collect();
    let dotted = keys.join(".");
    if keys.iter().any(String::is_empty) {
        return Err(ConfigError::new(
            name,
            "empty key segment in environment override",
        ));
    }
    let parsed: yaml_serde::Value = yaml_serde::from_str(value)
        .map_err(|e| ConfigError::new(&dotted, format!("from {name}: {e}")))?;
    let mut node = root;
    for key in &keys {
        if node.is_null() {
            *node = yaml_serde::Value::Mapping(Default::default());
        }
        let Some(map) = node.as_mapping_mut() else {
            return Err(ConfigError::new(
                &dotted,
                format!("from {name}: parent is not a mapping"),
            ));
        };
        node = map
            .entry(yaml_serde::Value::String(key.clone()))
            .or_insert(yaml_serde::Value::Null);
    }
    *node = parsed;
    Ok(())
}

/// Settings every service node shares: identity, ports, discovery, telemetry
/// and shutdown.
#[derive(Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NodeConfig {
    /// Unique id of this instance; defaults to a random UUID.
    pub instance_id: Option<String>,
    /// Failure domain reported in discovery (e.g. the Kubernetes zone).
    pub zone: Option<String>,
    pub grpc: GrpcConfig,
    pub admin: AdminConfig,
    pub discovery: DiscoveryConfig,
    pub telemetry: TelemetryConfig,
    pub shutdown: ShutdownConfig,
    /// An in-process discovery to use instead of etcd (set by `lmgrid up`,
    /// never read from a file).
    #[serde(skip)]
    pub in_process_discovery: Option<Arc<dyn Discovery>>,
}

impl std::fmt::Debug for NodeConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeConfig")
            .field("instance_id", &self.instance_id)
            .field("zone", &self.zone)
            .field("grpc", &self.grpc)
            .field("admin", &self.admin)
            .field("discovery", &self.discovery)
            .field("telemetry", &self.telemetry)
            .field("shutdown", &self.shutdown)
            .field("in_process_discovery", &self.in_process_discovery.is_some())
            .finish()
    }
}

impl NodeConfig {
    /// Validates the node settings; `prefix` is the dotted path of this
    /// section in the service config (e.g. `node`).
    pub fn validate_at(&self, prefix: &str) -> Result<(), ConfigError> {
        if let Some(id) = &self.instance_id
            && (id.is_empty() || id.contains('/'))
        {
            return Err(ConfigError::new(
                format!("{prefix}.instance_id"),
                "must be non-empty and contain no '/'",
            ));
        }
        if let Some(addr) = &self.grpc.advertise_addr
            && !is_host_port(addr)
        {
            return Err(ConfigError::new(
                format!("{prefix}.grpc.advertise_addr"),
                format!("expected host:port, got {addr:?}"),
            ));
        }
        if self.admin.enabled && self.admin.listen_addr == self.grpc.listen_addr {
            return Err(ConfigError::new(
                format!("{prefix}.admin.listen_addr"),
                "must differ from grpc.listen_addr",
            ));
        }
        self.discovery
            .etcd
            .validate_at(&format!("{prefix}.discovery.etcd"))?;
        self.telemetry.validate_at(&format!("{prefix}.telemetry"))?;
        if self.shutdown.grace_period.is_zero() {
            return Err(ConfigError::new(
                format!("{prefix}.shutdown.grace_period"),
                "must be greater than zero",
            ));
        }
        Ok(())
    }
}

fn is_host_port(addr: &str) -> bool {
    match addr.rsplit_once(':') {
        Some((host, port)) => !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p != 0),
        None => false,
    }
}

/// The gRPC server of a node.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GrpcConfig {
    pub listen_addr: SocketAddr,
    /// The `host:port` other instances use to reach this one. Defaults to the
    /// listen address, or the host name when listening on all interfaces.
    pub advertise_addr: Option<String>,
}

impl Default for GrpcConfig {
    fn default() -> Self {
        GrpcConfig {
            listen_addr: SocketAddr::from(([0, 0, 0, 0], 8081)),
            advertise_addr: None,
        }
    }
}

/// The admin HTTP server: `/livez`, `/readyz`, `/metrics`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdminConfig {
    pub enabled: bool,
    pub listen_addr: SocketAddr,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            enabled: true,
            listen_addr: SocketAddr::from(([0, 0, 0, 0], 9090)),
        }
    }
}

/// Where instances register and find each other.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DiscoveryConfig {
    pub etcd: EtcdConfig,
}

/// The etcd cluster used for membership and configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EtcdConfig {
    pub endpoints: Vec<String>,
    /// Key prefix of everything lmgrid stores.
    pub prefix: String,
    /// Lease time-to-live: a crashed instance disappears within this long.
    #[serde(with = "humantime_serde")]
    pub lease_ttl: Duration,
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
}

impl Default for EtcdConfig {
    fn default() -> Self {
        EtcdConfig {
            endpoints: vec!["http://127.0.0.1:2379".to_string()],
            prefix: "/lmgrid/v1".to_string(),
            lease_ttl: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(5),
        }
    }
}

impl EtcdConfig {
    fn validate_at(&self, prefix: &str) -> Result<(), ConfigError> {
        if self.endpoints.is_empty() {
            return Err(ConfigError::new(
                format!("{prefix}.endpoints"),
                "must not be empty",
            ));
        }
        for endpoint in &self.endpoints {
            let rest = endpoint
                .strip_prefix("http://")
                .or_else(|| endpoint.strip_prefix("https://"))
                .unwrap_or(endpoint);
            if !is_host_port(rest.trim_end_matches('/')) {
                return Err(ConfigError::new(
                    format!("{prefix}.endpoints"),
                    format!("expected [http://]host:port, got {endpoint:?}"),
                ));
            }
        }
        if !self.prefix.starts_with('/') || self.prefix.ends_with('/') {
            return Err(ConfigError::new(
                format!("{prefix}.prefix"),
                "must start with '/' and not end with '/'",
            ));
        }
        if self.lease_ttl < Duration::from_secs(2) || self.lease_ttl > Duration::from_secs(3600) {
            return Err(ConfigError::new(
                format!("{prefix}.lease_ttl"),
                "must be between 2s and 1h",
            ));
        }
        Ok(())
    }
}

/// Log output format.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    #[default]
    Plain,
    Json,
}

/// Logs and traces.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TelemetryConfig {
    pub log_format: LogFormat,
    /// An `EnvFilter` directive; `RUST_LOG` wins when set.
    pub log_filter: String,
    /// OTLP/gRPC collector endpoint (`http://collector:4317`); traces are
    /// exported only when set, and start-up fails if it cannot be reached.
    pub otlp_endpoint: Option<String>,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        TelemetryConfig {
            log_format: LogFormat::Plain,
            log_filter: "info,ort=warn".into(),
            otlp_endpoint: None,
        }
    }
}

impl TelemetryConfig {
    fn validate_at(&self, prefix: &str) -> Result<(), ConfigError> {
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.log_filter) {
            return Err(ConfigError::new(
                format!("{prefix}.log_filter"),
                e.to_string(),
            ));
        }
        if let Some(endpoint) = &self.otlp_endpoint {
            let rest = endpoint
                .strip_prefix("http://")
                .or_else(|| endpoint.strip_prefix("https://"));
            if !rest.is_some_and(|r| is_host_port(r.trim_end_matches('/'))) {
                return Err(ConfigError::new(
                    format!("{prefix}.otlp_endpoint"),
                    format!("expected http://host:port, got {endpoint:?}"),
                ));
            }
        }
        Ok(())
    }
}

/// Graceful shutdown timing.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ShutdownConfig {
    /// After deregistering, keep accepting for this long so that clients
    /// whose membership view is a little stale are still served.
    #[serde(with = "humantime_serde")]
    pub drain_delay: Duration,
    /// Longest wait for in-flight requests once accepting stops.
    #[serde(with = "humantime_serde")]
    pub grace_period: Duration,
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        ShutdownConfig {
            drain_delay: Duration::from_secs(2),
            grace_period: Duration::from_secs(25),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Default, Deserialize)]
    #[serde(default, deny_unknown_fields)]
    struct TestConfig {
        node: NodeConfig,
        threads: u32,
    }

    impl Validate for TestConfig {
        fn validate(&self) -> Result<(), ConfigError> {
            self.node.validate_at("node")
        }
    }

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn empty_file_gives_defaults() {
        let config: TestConfig = load_from("", env(&[])).unwrap();
        assert_eq!(config.node.grpc.listen_addr.port(), 8081);
        assert_eq!(
            config.node.discovery.etcd.lease_ttl,
            Duration::from_secs(10)
        );
    }

    #[test]
    fn file_values_and_durations_parse() {
        let yaml = "node:\n  grpc:\n    listen_addr: 127.0.0.1:7000\n  discovery:\n    etcd:\n      lease_ttl: 3s\nthreads: 4\n";
        let config: TestConfig = load_from(yaml, env(&[])).unwrap();
        assert_eq!(
            config.node.grpc.listen_addr,
            "127.0.0.1:7000".parse().unwrap()
        );
        assert_eq!(config.node.discovery.etcd.lease_ttl, Duration::from_secs(3));
        assert_eq!(config.threads, 4);
    }

    #[test]
    fn unknown_key_is_named() {
        let err = load_from::<TestConfig>("node:\n  grpc:\n    listen: 1\n", env(&[])).unwrap_err();
        assert_eq!(err.key, "node.grpc.listen");
        assert!(err.message.contains("unknown field `listen`"), "{err}");
    }

    #[test]
    fn wrong_type_is_named() {
        let err = load_from::<TestConfig>("threads: many\n", env(&[])).unwrap_err();
        assert_eq!(err.key, "threads");
    }

    #[test]
    fn env_overrides_win_over_the_file() {
        let config: TestConfig = load_from(
            "threads: 1\n",
            env(&[
                ("LMGRID__THREADS", "8"),
                (
                    "LMGRID__NODE__DISCOVERY__ETCD__ENDPOINTS",
                    "[http://10.0.0.1:2379, 10.0.0.2:2379]",
                ),
                ("UNRELATED", "x"),
            ]),
        )
        .unwrap();
        assert_eq!(config.threads, 8);
        assert_eq!(config.node.discovery.etcd.endpoints.len(), 2);
    }

    #[test]
    fn env_override_of_unknown_key_is_an_error() {
        let err = load_from::<TestConfig>("", env(&[("LMGRID__NODE__NOPE", "1")])).unwrap_err();
        assert!(err.message.contains("unknown field `nope`"), "{err}");
    }

    #[test]
    fn validation_names_the_key() {
        let err = load_from::<TestConfig>(
            "node:\n  discovery:\n    etcd:\n      lease_ttl: 1s\n",
            env(&[]),
        )
        .unwrap_err();
        assert_eq!(err.key, "node.discovery.etcd.lease_ttl");
        let err = load_from::<TestConfig>(
            "node:\n  discovery:\n    etcd:\n      endpoints: []\n",
            env(&[]),
        )
        .unwrap_err();
        assert_eq!(err.key, "node.discovery.etcd.endpoints");
        let err = load_from::<TestConfig>("node:\n  grpc:\n    advertise_addr: nohost\n", env(&[]))
            .unwrap_err();
        assert_eq!(err.key, "node.grpc.advertise_addr");
        let err =
            load_from::<TestConfig>("node:\n  telemetry:\n    otlp_endpoint: nope\n", env(&[]))
                .unwrap_err();
        assert_eq!(err.key, "node.telemetry.otlp_endpoint");
    }

    #[test]
    fn malformed_yaml_is_an_error() {
        let err = load_from::<TestConfig>("node: [", env(&[])).unwrap_err();
        assert_eq!(err.key, "<file>");
    }
}
