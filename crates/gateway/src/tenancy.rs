//! Puts authentication, admission, usage metering and the admin API
//! together from the gateway's config: the tenant store (etcd, or
//! `lmgrid up`'s file), the shared limiter's Redis when configured, and the
//! queue.

use std::sync::Arc;

use lmgrid_core::config::{ConfigError, NodeConfig};
use lmgrid_core::discovery::Discovery;

use crate::admin::{self, AdminState};
use crate::admission::Admission;
use crate::admission::queue::Queues;
use crate::admission::redis::{RedisLimiter, connect};
use crate::auth::etcd_store::EtcdStore;
use crate::auth::store::FileStore;
use crate::auth::{Authenticator, TenantStore};
use crate::config::Config;
use crate::usage::Usage;

/// What the handlers need to authenticate, admit and meter.
#[derive(Debug)]
pub(crate) struct Tenancy {
    pub(crate) auth: Authenticator,
    pub(crate) admission: Admission,
    pub(crate) usage: Usage,
    /// The admin API, when an admin token is configured.
    pub(crate) admin: Option<axum::Router>,
    /// Keeps the store (and its watches) alive.
    _store: Arc<dyn TenantStore>,
}

/// Builds the tenancy of a gateway whose node uses `discovery`.
pub(crate) async fn build(
    config: &Config,
    discovery: Arc<dyn Discovery>,
) -> lmgrid_core::Result<Tenancy> {
    let store = open_store(config).await?;
    let auth = Authenticator::new(
        store.directory(),
        config.auth.required,
        &config.auth.anonymous,
    );
    let redis = match &config.admission.redis {
        Some(redis) => Some((
            connect(&redis.url, redis.timeout).map_err(|e| {
                lmgrid_core::Error::Config(ConfigError::new("admission.redis.url", e.to_string()))
            })?,
            redis,
        )),
        None => None,
    };
    let queue = &config.admission.queue;
    let admission = Admission::new(
        redis.as_ref().map(|(connection, redis)| {
            RedisLimiter::new(connection.clone(), &redis.key_prefix, redis.timeout)
        }),
        config
            .admission
            .redis
            .as_ref()
            .map_or(std::time::Duration::from_secs(1), |r| r.retry_interval),
        Some(discovery.watch(crate::SERVICE).await?),
        Queues::new(
            queue.max_outstanding_per_model,
            queue.max_queued_per_model,
            queue.max_wait,
        ),
    );
    let usage = match &redis {
        Some((connection, redis)) => Usage::shared(
            connection.clone(),
            &redis.key_prefix,
            redis.usage_retention,
            redis.timeout,
        ),
        None => Usage::local(),
    };
    let admin = config.auth.admin_token.as_ref().map(|token| {
        admin::router(AdminState {
            store: store.clone(),
            auth: auth.clone(),
            usage: usage.clone(),
            token: token.as_str().into(),
            defaults: config.auth.defaults,
            writes: Default::default(),
        })
    });
    if admin.is_none() {
        tracing::info!("no auth.admin_token: the admin API is off");
    }
    Ok(Tenancy {
        auth,
        admission,
        usage,
        admin,
        _store: store,
    })
}

/// The tenant store: a file (or memory) for `lmgrid up`, etcd otherwise.
async fn open_store(config: &Config) -> lmgrid_core::Result<Arc<dyn TenantStore>> {
    let node: &NodeConfig = &config.node;
    if node.in_process_discovery.is_some() {
        return Ok(match &config.auth.store_path {
            Some(path) => Arc::new(FileStore::open(path).await.map_err(|e| {
                lmgrid_core::Error::Config(ConfigError::new("auth.store_path", e.to_string()))
            })?),
            None => Arc::new(FileStore::in_memory()),
        });
    }
    let store = EtcdStore::connect(&node.discovery.etcd)
        .await
        .map_err(|e| lmgrid_core::Error::Discovery(format!("tenant store: {e}")))?;
    Ok(store)
}
