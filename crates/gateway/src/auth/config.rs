//! The `auth` section of the gateway's config: whether keys are required,
//! the admin token, where `lmgrid up` keeps its tenants, and default limits.

use std::path::PathBuf;

use lmgrid_core::config::ConfigError;
use serde::Deserialize;

use super::{Limits, Priority};

/// API keys, tenants and the admin API.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// Require an API key on every model request. When off (`lmgrid up`),
    /// callers on a loopback address may go without one, as the tenant
    /// `anonymous`, until the first key is created.
    pub required: bool,
    /// The bearer token of the admin API (`/admin/v1`). Without one the
    /// admin API answers 404 — set it (`LMGRID__AUTH__ADMIN_TOKEN`) to
    /// manage tenants.
    pub admin_token: Option<String>,
    /// Also serve the admin API on the public HTTP port (it is always on the
    /// admin port when a token is set).
    pub admin_on_public_port: bool,
    /// Keep tenants and key digests in this JSON file instead of etcd. Only
    /// for `lmgrid up` (in-process discovery); clusters keep them in etcd.
    pub store_path: Option<PathBuf>,
    /// Limits of new tenants whose creation names none.
    pub defaults: TenantDefaults,
    /// Limits of the `anonymous` tenant (keyless callers on loopback, where
    /// keys are not required): unlimited unless set, as the machine is the
    /// caller's own.
    pub anonymous: TenantDefaults,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            required: true,
            admin_token: None,
            admin_on_public_port: false,
            store_path: None,
            defaults: TenantDefaults::default(),
            anonymous: TenantDefaults::UNLIMITED,
        }
    }
}

/// Limits (0 is unlimited) and priority lane of a tenant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TenantDefaults {
    pub requests_per_minute: u64,
    pub tokens_per_minute: u64,
    pub max_concurrent: u64,
    pub priority: Priority,
}

impl Default for TenantDefaults {
    fn default() -> Self {
        TenantDefaults {
            requests_per_minute: 600,
            tokens_per_minute: 1_000_000,
            max_concurrent: 64,
            priority: Priority::Normal,
        }
    }
}

impl TenantDefaults {
    /// No limits, normal priority.
    pub const UNLIMITED: TenantDefaults = TenantDefaults {
        requests_per_minute: 0,
        tokens_per_minute: 0,
        max_concurrent: 0,
        priority: Priority::Normal,
    };

    pub fn limits(&self) -> Limits {
        Limits {
            requests_per_minute: self.requests_per_minute,
            tokens_per_minute: self.tokens_per_minute,
            max_concurrent: self.max_concurrent,
        }
    }
}

/// The most any limit may be: far beyond any real rate, and small enough
/// that the limiter's arithmetic stays exact.
pub(crate) const MAX_LIMIT: u64 = 1_000_000_000;

impl AuthConfig {
    pub(crate) fn validate_at(&self, prefix: &str) -> Result<(), ConfigError> {
        if let Some(token) = &self.admin_token
            && (token.len() < 16 || token.chars().any(|c| c.is_whitespace() || c.is_control()))
        {
            return Err(ConfigError::new(
                format!("{prefix}.admin_token"),
                "must be at least 16 characters, without spaces",
            ));
        }
        for (key, defaults) in [("defaults", &self.defaults), ("anonymous", &self.anonymous)] {
            for (name, value) in [
                ("requests_per_minute", defaults.requests_per_minute),
                ("tokens_per_minute", defaults.tokens_per_minute),
                ("max_concurrent", defaults.max_concurrent),
            ] {
                if value > MAX_LIMIT {
                    return Err(ConfigError::new(
                        format!("{prefix}.{key}.{name}"),
                        format!("must be at most {MAX_LIMIT} (0 is unlimited)"),
                    ));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_admin_tokens_and_huge_limits_are_refused() {
        let mut config = AuthConfig {
            admin_token: Some("short".into()),
            ..AuthConfig::default()
        };
        assert_eq!(
            config.validate_at("auth").unwrap_err().key,
            "auth.admin_token"
        );
        config.admin_token = Some("a-long-enough-admin-token".into());
        config.validate_at("auth").unwrap();
        config.anonymous.tokens_per_minute = u64::MAX;
        assert_eq!(
            config.validate_at("auth").unwrap_err().key,
            "auth.anonymous.tokens_per_minute"
        );
    }
}
