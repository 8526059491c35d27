//! Who is calling: API keys (`Authorization: Bearer <key>`, for gRPC the
//! `authorization` metadata) map to tenants, each with its limits, priority
//! lane and allowed models.
//!
//! Tenants and key digests live in a [`TenantStore`] (etcd in clusters, a
//! JSON file for `lmgrid up`) that every gateway replica follows, so a key
//! created on one replica works on all of them within moments. Keys are
//! never stored, logged or compared in the clear: only their SHA-256 digest.
//!
//! When `auth.required` is off (`lmgrid up`), a caller on a loopback address
//! may go without a key — as the tenant `anonymous` — until the first key is
//! created.

pub(crate) mod config;
pub(crate) mod etcd_store;
pub(crate) mod keys;
pub(crate) mod store;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use lmgrid_proto::lmgrid::v1 as pb;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

pub(crate) use store::{StoreError, TenantStore};

use self::config::TenantDefaults;

/// The tenant of keyless callers where keys are not required.
pub(crate) const ANONYMOUS: &str = "anonymous";

/// A tenant's priority lane: who goes first when a model's queue forms.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum Priority {
    Low,
    #[default]
    Normal,
    High,
}

impl Priority {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Priority::Low => "low",
            Priority::Normal => "normal",
            Priority::High => "high",
        }
    }

    /// The lane's index in the admission queue: high first.
    pub(crate) fn lane(self) -> usize {
        match self {
            Priority::High => 0,
            Priority::Normal => 1,
            Priority::Low => 2,
        }
    }

    pub(crate) fn to_proto(self) -> pb::Priority {
        match self {
            Priority::Low => pb::Priority::Low,
            Priority::Normal => pb::Priority::Normal,
            Priority::High => pb::Priority::High,
        }
    }

    pub(crate) fn parse(text: &str) -> Option<Priority> {
        match text {
            "low" => Some(Priority::Low),
            "normal" => Some(Priority::Normal),
            "high" => Some(Priority::High),
            _ => None,
        }
    }
}

/// A tenant's limits; 0 means unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    /// Requests per minute.
    pub requests_per_minute: u64,
    /// Prompt plus completion tokens per minute.
    pub tokens_per_minute: u64,
    /// Requests in flight at once.
    pub max_concurrent: u64,
}

/// One of a tenant's keys, as listed (never the key itself).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct KeyInfo {
    /// The key's first characters, for display (`lmg-AbCd1234`).
    pub(crate) id: String,
    /// SHA-256 of the key, in hex.
    pub(crate) sha256: String,
    /// Seconds since the Unix epoch.
    pub(crate) created: u64,
}

/// A tenant as stored (`<prefix>/tenants/<name>`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Tenant {
    pub(crate) name: String,
    #[serde(flatten)]
    pub(crate) limits: Limits,
    #[serde(default)]
    pub(crate) priority: Priority,
    /// Models the tenant may use; empty means every model.
    #[serde(default)]
    pub(crate) allowed_models: Vec<String>,
    #[serde(default)]
    pub(crate) keys: Vec<KeyInfo>,
    #[serde(default)]
    pub(crate) created: u64,
    /// The store's revision of this record (etcd's mod revision), which a
    /// write of the tenant names so that it cannot overwrite a change it did
    /// not see; not part of the stored record. 0 for a tenant not stored.
    #[serde(skip)]
    pub(crate) revision: i64,
}

impl Tenant {
    /// Whether the tenant may use `model`.
    pub(crate) fn allows(&self, model: &str) -> bool {
        self.allowed_models.is_empty() || self.allowed_models.iter().any(|m| m == model)
    }

    /// The anonymous tenant, with `defaults`' limits.
    pub(crate) fn anonymous(defaults: &TenantDefaults) -> Tenant {
        Tenant {
            name: ANONYMOUS.to_string(),
            limits: defaults.limits(),
            priority: defaults.priority,
            allowed_models: Vec::new(),
            keys: Vec::new(),
            created: 0,
            revision: 0,
        }
    }
}

/// What a key digest points at (`<prefix>/keys/<sha256>`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct KeyRecord {
    pub(crate) tenant: String,
    pub(crate) id: String,
    #[serde(default)]
    pub(crate) created: u64,
}

/// Every tenant and key digest, as one replica last saw them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Directory {
    pub(crate) tenants: BTreeMap<String, Tenant>,
    /// Key digest (hex) → its record.
    pub(crate) keys: HashMap<String, KeyRecord>,
}

/// Whether `name` can name a tenant: 1 to 63 of `a-z 0-9 . _ -`, starting
/// with a letter or digit. Names appear in etcd keys, Redis keys and metric
/// labels, so they are kept plain.
pub(crate) fn valid_tenant_name(name: &str) -> bool {
    let bytes = name.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 63
        && bytes[0].is_ascii_alphanumeric()
        && bytes.iter().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-')
        })
}

/// An authenticated caller.
#[derive(Debug, Clone)]
pub(crate) struct Identity {
    pub(crate) tenant: Arc<Tenant>,
    /// The id of the key used; none for the anonymous tenant.
    pub(crate) key_id: Option<String>,
}

impl Identity {
    pub(crate) fn name(&self) -> &str {
        &self.tenant.name
    }
}

/// Why a caller was not authenticated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AuthError {
    /// No `Authorization` header (or not a bearer token).
    Missing,
    /// A key no tenant has.
    Unknown,
}

impl AuthError {
    pub(crate) fn message(self) -> &'static str {
        match self {
            AuthError::Missing => {
                "this gateway requires an API key: send 'Authorization: Bearer <key>'"
            }
            AuthError::Unknown => "the API key is not valid (unknown, revoked or rotated)",
        }
    }

    /// The metric label of the failure.
    pub(crate) fn reason(self) -> &'static str {
        match self {
            AuthError::Missing => "missing_key",
            AuthError::Unknown => "invalid_key",
        }
    }
}

/// Resolves API keys to tenants from the followed directory.
#[derive(Debug, Clone)]
pub(crate) struct Authenticator {
    directory: watch::Receiver<Arc<Directory>>,
    required: bool,
    anonymous: Arc<Tenant>,
}

impl Authenticator {
    pub(crate) fn new(
        directory: watch::Receiver<Arc<Directory>>,
        required: bool,
        anonymous: &TenantDefaults,
    ) -> Authenticator {
        Authenticator {
            directory,
            required,
            anonymous: Arc::new(Tenant::anonymous(anonymous)),
        }
    }

    /// The caller of a request with this `Authorization` value, arriving
    /// from a loopback address or not.
    pub(crate) fn authenticate(
        &self,
        authorization: Option<&[u8]>,
        loopback: bool,
    ) -> Result<Identity, AuthError> {
        let directory = self.directory.borrow().clone();
        if !self.required && loopback && directory.keys.is_empty() {
            // Keyless mode: whatever the client sends (the OpenAI SDKs always
            // send some key) is the anonymous tenant's.
            return Ok(Identity {
                tenant: self.anonymous.clone(),
                key_id: None,
            });
        }
        let token = authorization
            .and_then(|value| std::str::from_utf8(value).ok())
            .and_then(keys::bearer)
            .ok_or(AuthError::Missing)?;
        let digest = keys::sha256_hex(token.as_bytes());
        let record = directory.keys.get(&digest).ok_or(AuthError::Unknown)?;
        // The tenant must list the key too: a key record that a refused or
        // interrupted admin write left behind is no key.
        let tenant = directory
            .tenants
            .get(&record.tenant)
            .filter(|tenant| tenant.keys.iter().any(|key| key.sha256 == digest))
            .ok_or(AuthError::Unknown)?;
        Ok(Identity {
            tenant: Arc::new(tenant.clone()),
            key_id: Some(record.id.clone()),
        })
    }

    /// The directory now.
    pub(crate) fn directory(&self) -> Arc<Directory> {
        self.directory.borrow().clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn directory_with(secret: &str) -> Directory {
        let mut directory = Directory::default();
        let sha = keys::sha256_hex(secret.as_bytes());
        directory.tenants.insert(
            "acme".into(),
            Tenant {
                name: "acme".into(),
                limits: Limits::default(),
                priority: Priority::High,
                allowed_models: vec!["minilm".into()],
                keys: vec![KeyInfo {
                    id: keys::key_id(secret),
                    sha256: sha.clone(),
                    created: 1,
                }],
                created: 1,
                revision: 1,
            },
        );
        directory.keys.insert(
            sha,
            KeyRecord {
                tenant: "acme".into(),
                id: keys::key_id(secret),
                created: 1,
            },
        );
        directory
    }

    fn authenticator(directory: Directory, required: bool) -> Authenticator {
        let (_tx, rx) = watch::channel(Arc::new(directory));
        Authenticator::new(rx, required, &TenantDefaults::default())
    }

    #[test]
    fn a_key_its_tenant_does_not_list_is_unknown() {
        let mut directory = directory_with("lmg-secret-one");
        directory.tenants.get_mut("acme").unwrap().keys.clear();
        let auth = authenticator(directory, true);
        assert_eq!(
            auth.authenticate(Some(b"Bearer lmg-secret-one"), false)
                .unwrap_err(),
            AuthError::Unknown
        );
    }

    #[test]
    fn keys_resolve_to_their_tenant() {
        let auth = authenticator(directory_with("lmg-secret-one"), true);
        let who = auth
            .authenticate(Some(b"Bearer lmg-secret-one"), false)
            .unwrap();
        assert_eq!(who.name(), "acme");
        assert_eq!(who.key_id.as_deref(), Some("lmg-secret-o"));
        assert_eq!(who.tenant.priority, Priority::High);
        assert!(who.tenant.allows("minilm") && !who.tenant.allows("gpt-4"));
        assert_eq!(
            auth.authenticate(Some(b"Bearer lmg-other"), true)
                .unwrap_err(),
            AuthError::Unknown
        );
        assert_eq!(
            auth.authenticate(None, true).unwrap_err(),
            AuthError::Missing
        );
        assert_eq!(
            auth.authenticate(Some(b"Basic abc"), true).unwrap_err(),
            AuthError::Missing
        );
        assert_eq!(
            auth.authenticate(Some(&[0xff, 0xfe]), true).unwrap_err(),
            AuthError::Missing
        );
    }

    #[test]
    fn keyless_callers_are_anonymous_only_on_loopback_until_a_key_exists() {
        let open = authenticator(Directory::default(), false);
        let who = open.authenticate(Some(b"Bearer anything"), true).unwrap();
        assert_eq!(who.name(), ANONYMOUS);
        assert!(who.key_id.is_none());
        assert_eq!(
            open.authenticate(None, false).unwrap_err(),
            AuthError::Missing
        );
        let with_keys = authenticator(directory_with("lmg-k"), false);
        assert_eq!(
            with_keys.authenticate(None, true).unwrap_err(),
            AuthError::Missing
        );
        let required = authenticator(Directory::default(), true);
        assert!(required.authenticate(None, true).is_err());
    }

    #[test]
    fn tenant_names_are_plain() {
        for good in ["acme", "a", "team-1.prod_x", "0abc"] {
            assert!(valid_tenant_name(good), "{good}");
        }
        for bad in ["", "Acme", "-x", "a/b", "a b", "a:b", "é", &"x".repeat(64)] {
            assert!(!valid_tenant_name(bad), "{bad}");
        }
    }

    #[test]
    fn tenants_round_trip_as_json() {
        let directory = directory_with("lmg-secret");
        let tenant = &directory.tenants["acme"];
        let json = serde_json::to_value(tenant).unwrap();
        assert_eq!(json["requests_per_minute"], 0);
        assert_eq!(json["priority"], "high");
        assert!(json.get("revision").is_none(), "the store keeps revisions");
        let back: Tenant = serde_json::from_value(json).unwrap();
        assert_eq!(back.revision, 0);
        assert_eq!(
            back,
            Tenant {
                revision: 0,
                ..tenant.clone()
            }
        );
    }
}
