//! The `routing` section of the gateway's config: attempts and retries,
//! outlier ejection, the cap on outstanding requests per worker, prompt
//! prefix affinity, and model records for when no store holds them.

use std::collections::BTreeMap;
use std::time::Duration;

use lmgrid_core::config::ConfigError;
use lmgrid_core::discovery::{ModelRecord, TrafficWeight};
use serde::Deserialize;

/// How the gateway picks workers and retries failed attempts.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RoutingConfig {
    /// The longest one attempt at a worker may take (for a stream: until its
    /// first message). Unset: only the request's deadline bounds it. An
    /// attempt that runs out is cancelled at the worker and may be retried.
    #[serde(with = "humantime_serde")]
    pub attempt_timeout: Option<Duration>,
    /// How long connecting to a worker may take before the attempt fails.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// The most requests this gateway keeps outstanding at one worker; a
    /// worker at the cap is skipped, and a model whose workers all are is
    /// answered 503 with `Retry-After`.
    pub max_outstanding_per_worker: u32,
    pub retry: RetryConfig,
    pub ejection: EjectionConfig,
    pub affinity: AffinityConfig,
    /// Model records (aliases, traffic weights) used for models that the
    /// store (etcd, written by the model registry) has no record of.
    pub models: BTreeMap<String, StaticModel>,
}

/// Retries of failed attempts.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetryConfig {
    /// Attempts per request, the first included; 1 turns retries off.
    pub max_attempts: u32,
    /// Retries may be at most this share of requests over `window`…
    pub budget_ratio: f64,
    /// …plus this many per second, so that light traffic can retry too.
    pub min_per_second: u32,
    #[serde(with = "humantime_serde")]
    pub window: Duration,
}

/// Outlier ejection: a worker that fails `consecutive_failures` attempts in
/// a row is taken out of rotation for `base_interval` × 2^(ejections so far),
/// at most `max_interval`. Never more than half the workers of a model are
/// out at once.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EjectionConfig {
    /// 0 turns ejection off.
    pub consecutive_failures: u32,
    #[serde(with = "humantime_serde")]
    pub base_interval: Duration,
    #[serde(with = "humantime_serde")]
    pub max_interval: Duration,
}

/// Prompt-prefix affinity for generation: requests whose prompts start the
/// same go to the same worker (consistent hashing), unless it has more than
/// `load_factor` × the average outstanding requests.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AffinityConfig {
    pub enabled: bool,
    /// How much of the prompt (characters) decides the worker.
    pub prefix_chars: usize,
    /// 1 + ε of bounded-load consistent hashing.
    pub load_factor: f64,
}

/// A model record in the config (the same fields as in etcd).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StaticModel {
    pub aliases: BTreeMap<String, String>,
    pub traffic: Vec<StaticWeight>,
}

/// One version's share of traffic in the config.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StaticWeight {
    pub version: String,
    pub weight: u32,
}

impl From<&StaticModel> for ModelRecord {
    fn from(model: &StaticModel) -> ModelRecord {
        ModelRecord {
            aliases: model.aliases.clone(),
            traffic: model
                .traffic
                .iter()
                .map(|w| TrafficWeight {
                    version: w.version.clone(),
                    weight: w.weight,
                })
                .collect(),
        }
    }
}

impl Default for RoutingConfig {
    fn default() -> Self {
        RoutingConfig {
            attempt_timeout: None,
            connect_timeout: Duration::from_secs(1),
            max_outstanding_per_worker: 256,
            retry: RetryConfig::default(),
            ejection: EjectionConfig::default(),
            affinity: AffinityConfig::default(),
            models: BTreeMap::new(),
        }
    }
}

impl Default for RetryConfig {
    fn default() -> Self {
        RetryConfig {
            max_attempts: 3,
            budget_ratio: 0.2,
            min_per_second: 5,
            window: Duration::from_secs(10),
        }
    }
}

impl Default for EjectionConfig {
    fn default() -> Self {
        EjectionConfig {
            consecutive_failures: 5,
            base_interval: Duration::from_secs(10),
            max_interval: Duration::from_secs(300),
        }
    }
}

impl Default for AffinityConfig {
    fn default() -> Self {
        AffinityConfig {
            enabled: false,
            prefix_chars: 256,
            load_factor: 1.25,
        }
    }
}

impl RoutingConfig {
    /// Checks every key, naming the first bad one under `prefix`.
    pub(crate) fn validate_at(&self, prefix: &str) -> Result<(), ConfigError> {
        let key = |name: &str| format!("{prefix}.{name}");
        if self
            .attempt_timeout
            .is_some_and(|t| t < Duration::from_millis(1))
        {
            return Err(ConfigError::new(
                key("attempt_timeout"),
                "must be at least 1ms",
            ));
        }
        if !(Duration::from_millis(10)..=Duration::from_secs(60)).contains(&self.connect_timeout) {
            return Err(ConfigError::new(
                key("connect_timeout"),
                "must be between 10ms and 60s",
            ));
        }
        if self.max_outstanding_per_worker == 0 {
            return Err(ConfigError::new(
                key("max_outstanding_per_worker"),
                "must be at least 1",
            ));
        }
        if !(1..=10).contains(&self.retry.max_attempts) {
            return Err(ConfigError::new(
                key("retry.max_attempts"),
                "must be between 1 and 10",
            ));
        }
        if !(0.0..=1.0).contains(&self.retry.budget_ratio) {
            return Err(ConfigError::new(
                key("retry.budget_ratio"),
                "must be between 0 and 1",
            ));
        }
        if !(Duration::from_secs(1)..=Duration::from_secs(600)).contains(&self.retry.window) {
            return Err(ConfigError::new(
                key("retry.window"),
                "must be between 1s and 10m",
            ));
        }
        let ejection = &self.ejection;
        if ejection.base_interval < Duration::from_millis(10) {
            return Err(ConfigError::new(
                key("ejection.base_interval"),
                "must be at least 10ms",
            ));
        }
        if ejection.max_interval < ejection.base_interval {
            return Err(ConfigError::new(
                key("ejection.max_interval"),
                "must be at least ejection.base_interval",
            ));
        }
        if self.affinity.prefix_chars == 0 {
            return Err(ConfigError::new(
                key("affinity.prefix_chars"),
                "must be at least 1",
            ));
        }
        if !(self.affinity.load_factor > 1.0 && self.affinity.load_factor <= 10.0) {
            return Err(ConfigError::new(
                key("affinity.load_factor"),
                "must be above 1 and at most 10",
            ));
        }
        for (model, record) in &self.models {
            if model.is_empty() || model.contains('/') {
                return Err(ConfigError::new(
                    key("models"),
                    format!("{model:?} is not a model name"),
                ));
            }
            ModelRecord::from(record)
                .validate()
                .map_err(|message| ConfigError::new(key(&format!("models.{model}")), message))?;
        }
        Ok(())
    }

    /// The configured model records.
    pub(crate) fn records(&self) -> BTreeMap<String, ModelRecord> {
        self.models
            .iter()
            .map(|(name, model)| (name.clone(), ModelRecord::from(model)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_defaults_are_valid_and_bad_values_name_their_key() {
        RoutingConfig::default().validate_at("routing").unwrap();
        let check = |edit: fn(&mut RoutingConfig)| {
            let mut config = RoutingConfig::default();
            edit(&mut config);
            config.validate_at("routing").unwrap_err().key
        };
        assert_eq!(
            check(|c| c.max_outstanding_per_worker = 0),
            "routing.max_outstanding_per_worker"
        );
        assert_eq!(
            check(|c| c.retry.max_attempts = 0),
            "routing.retry.max_attempts"
        );
        assert_eq!(
            check(|c| c.retry.budget_ratio = 1.5),
            "routing.retry.budget_ratio"
        );
        assert_eq!(
            check(|c| c.ejection.max_interval = Duration::from_millis(20)),
            "routing.ejection.max_interval"
        );
        assert_eq!(
            check(|c| c.affinity.load_factor = 1.0),
            "routing.affinity.load_factor"
        );
        assert_eq!(
            check(|c| {
                c.models.insert(
                    "m".into(),
                    StaticModel {
                        traffic: vec![StaticWeight {
                            version: "1".into(),
                            weight: 0,
                        }],
                        ..StaticModel::default()
                    },
                );
            }),
            "routing.models.m"
        );
    }

    #[test]
    fn yaml_reads_every_section() {
        let yaml = "attempt_timeout: 2s\nretry:\n  max_attempts: 2\nejection:\n  base_interval: 1s\n\
                    affinity:\n  enabled: true\nmodels:\n  m:\n    aliases: {stable: '1'}\n    \
                    traffic: [{version: '1', weight: 90}, {version: '2', weight: 10}]\n";
        let config: RoutingConfig = yaml_serde::from_str(yaml).unwrap();
        config.validate_at("routing").unwrap();
        assert_eq!(config.attempt_timeout, Some(Duration::from_secs(2)));
        assert!(config.affinity.enabled);
        assert_eq!(config.records()["m"].traffic[1].weight, 10);
        assert!(yaml_serde::from_str::<RoutingConfig>("retries: {}\n").is_err());
    }
}
