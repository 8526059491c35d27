//! The `admission` section of the gateway's config: the shared limiter's
//! Redis and the per-model queue.

use std::time::Duration;

use lmgrid_core::config::ConfigError;
use serde::Deserialize;

/// Rate limits, concurrency and queueing.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdmissionConfig {
    /// Where replicas share limits and usage. Without it each replica
    /// limits on its own, to its share of each limit.
    pub redis: Option<RedisConfig>,
    pub queue: QueueConfig,
}

/// The Redis the gateways share.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RedisConfig {
    /// `redis://[user:password@]host:port[/db]`.
    pub url: String,
    /// Every key the gateway writes starts with this.
    pub key_prefix: String,
    /// Longest wait for one Redis call before falling back to local limits.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// After a failure, how long to limit locally before trying Redis again.
    #[serde(with = "humantime_serde")]
    pub retry_interval: Duration,
    /// How long daily usage totals are kept.
    #[serde(with = "humantime_serde")]
    pub usage_retention: Duration,
}

impl Default for RedisConfig {
    fn default() -> Self {
        RedisConfig {
            url: "redis://127.0.0.1:6379".to_string(),
            key_prefix: "lmgrid:gw:".to_string(),
            timeout: Duration::from_millis(250),
            retry_interval: Duration::from_secs(1),
            usage_retention: Duration::from_secs(90 * 24 * 3600),
        }
    }
}

/// The bounded queue in front of each model's workers, per gateway.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct QueueConfig {
    /// Requests for one model that go to workers at once; more wait in the
    /// queue. 0 turns the queue off.
    pub max_outstanding_per_model: usize,
    /// Requests that may wait per model; more are answered 503.
    pub max_queued_per_model: usize,
    /// Longest wait in the queue (the request's deadline also bounds it).
    #[serde(with = "humantime_serde")]
    pub max_wait: Duration,
}

impl Default for QueueConfig {
    fn default() -> Self {
        QueueConfig {
            max_outstanding_per_model: 256,
            max_queued_per_model: 1024,
            max_wait: Duration::from_secs(30),
        }
    }
}

impl AdmissionConfig {
    pub(crate) fn validate_at(&self, prefix: &str) -> Result<(), ConfigError> {
        if let Some(redis) = &self.redis {
            if redis::Client::open(redis.url.as_str()).is_err()
                || !(redis.url.starts_with("redis://") || redis.url.starts_with("redis+unix://"))
            {
                return Err(ConfigError::new(
                    format!("{prefix}.redis.url"),
                    "expected redis://host:port (TLS is not built in)",
                ));
            }
            if redis.key_prefix.is_empty() || redis.key_prefix.contains(['{', '}', ' ']) {
                return Err(ConfigError::new(
                    format!("{prefix}.redis.key_prefix"),
                    "must be non-empty, without braces or spaces",
                ));
            }
            if redis.timeout < Duration::from_millis(1) || redis.timeout > Duration::from_secs(30) {
                return Err(ConfigError::new(
                    format!("{prefix}.redis.timeout"),
                    "must be between 1ms and 30s",
                ));
            }
            if redis.retry_interval.is_zero() {
                return Err(ConfigError::new(
                    format!("{prefix}.redis.retry_interval"),
                    "must be greater than zero",
                ));
            }
            if redis.usage_retention < Duration::from_secs(24 * 3600) {
                return Err(ConfigError::new(
                    format!("{prefix}.redis.usage_retention"),
                    "must be at least 1 day",
                ));
            }
        }
        if self.queue.max_outstanding_per_model > 0 && self.queue.max_wait.is_zero() {
            return Err(ConfigError::new(
                format!("{prefix}.queue.max_wait"),
                "must be greater than zero while the queue is on",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redis_settings_are_checked() {
        let mut config = AdmissionConfig {
            redis: Some(RedisConfig::default()),
            ..AdmissionConfig::default()
        };
        config.validate_at("admission").unwrap();
        if let Some(redis) = config.redis.as_mut() {
            redis.url = "http://x:1".into();
        }
        assert_eq!(
            config.validate_at("admission").unwrap_err().key,
            "admission.redis.url"
        );
        if let Some(redis) = config.redis.as_mut() {
            redis.url = "redis://127.0.0.1:6379".into();
            redis.key_prefix = "a{b}".into();
        }
        assert_eq!(
            config.validate_at("admission").unwrap_err().key,
            "admission.redis.key_prefix"
        );
    }
}
