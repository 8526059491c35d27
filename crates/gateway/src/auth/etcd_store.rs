//! Tenants and key digests in etcd: `<prefix>/tenants/<name>` holds a tenant
//! (JSON) and `<prefix>/keys/<sha256>` the tenant a key belongs to. Each
//! gateway lists both prefixes at start-up and then watches them, listing
//! again after any interruption (as discovery does), so a change made
//! through any replica reaches every replica within moments.

use std::sync::Arc;
use std::time::Duration;

use lmgrid_core::config::EtcdConfig;
use lmgrid_core::etcd::EtcdClient;
use lmgrid_proto::etcd::mvccpb::KeyValue;
use lmgrid_proto::etcd::mvccpb::event::EventType;
use tokio::sync::watch;

use super::store::{StoreError, TenantStore};
use super::{Directory, KeyRecord, Tenant, keys, valid_tenant_name};

/// The tenant store of clusters.
#[derive(Debug)]
pub(crate) struct EtcdStore {
    client: EtcdClient,
    tenants_prefix: String,
    keys_prefix: String,
    tx: watch::Sender<Arc<Directory>>,
}

/// Which half of the directory a prefix feeds.
#[derive(Debug, Clone, Copy)]
enum Half {
    Tenants,
    Keys,
}

impl EtcdStore {
    /// Connects, reads every tenant and key, and starts following changes
    /// (until the store is dropped).
    pub(crate) async fn connect(config: &EtcdConfig) -> Result<Arc<EtcdStore>, StoreError> {
        let client = EtcdClient::connect(config).await?;
        let store = EtcdStore {
            client,
            tenants_prefix: format!("{}/tenants/", config.prefix),
            keys_prefix: format!("{}/keys/", config.prefix),
            tx: watch::Sender::new(Arc::default()),
        };
        let mut revisions = Vec::new();
        for half in [Half::Tenants, Half::Keys] {
            let (kvs, revision) = store.client.get_prefix(store.prefix(half)).await?;
            store
                .tx
                .send_modify(|d| replace(Arc::make_mut(d), half, store.prefix(half), &kvs));
            revisions.push((half, revision));
        }
        let store = Arc::new(store);
        for (half, revision) in revisions {
            tokio::spawn(follow(Arc::downgrade(&store), half, revision));
        }
        Ok(store)
    }

    fn prefix(&self, half: Half) -> &str {
        match half {
            Half::Tenants => &self.tenants_prefix,
            Half::Keys => &self.keys_prefix,
        }
    }
}

/// Replaces one half of `directory` with what `kvs` hold.
fn replace(directory: &mut Directory, half: Half, prefix: &str, kvs: &[KeyValue]) {
    match half {
        Half::Tenants => directory.tenants.clear(),
        Half::Keys => directory.keys.clear(),
    }
    for kv in kvs {
        apply(directory, half, prefix, kv, false);
    }
}

/// Applies one record (or its deletion) to `directory`. Malformed records
/// are skipped with a warning rather than stopping the gateway.
fn apply(directory: &mut Directory, half: Half, prefix: &str, kv: &KeyValue, deleted: bool) {
    let Some(name) = std::str::from_utf8(&kv.key)
        .ok()
        .and_then(|key| key.strip_prefix(prefix))
    else {
        return;
    };
    match half {
        Half::Tenants if deleted => {
            directory.tenants.remove(name);
        }
        Half::Keys if deleted => {
            directory.keys.remove(name);
        }
        Half::Tenants => match serde_json::from_slice::<Tenant>(&kv.value) {
            Ok(tenant) if tenant.name == name && valid_tenant_name(name) => {
                insert_tenant(
                    directory,
                    Tenant {
                        revision: kv.mod_revision,
                        ..tenant
                    },
                );
            }
            Ok(_) => tracing::warn!(name, "ignoring a tenant record whose name is not its key"),
            Err(error) => tracing::warn!(name, %error, "ignoring a malformed tenant record"),
        },
        Half::Keys => match serde_json::from_slice::<KeyRecord>(&kv.value) {
            Ok(record) if keys::is_sha256_hex(name) => {
                directory.keys.insert(name.to_string(), record);
            }
            Ok(_) => tracing::warn!("ignoring a key record whose name is not a SHA-256 digest"),
            Err(error) => tracing::warn!(%error, "ignoring a malformed key record"),
        },
    }
}

/// Puts `tenant` in `directory` unless it already holds a later revision: a
/// replica's own write is applied at once, and the watch's event for an
/// earlier write may come after it.
fn insert_tenant(directory: &mut Directory, tenant: Tenant) {
    let newer = directory
        .tenants
        .get(&tenant.name)
        .is_some_and(|held| held.revision > tenant.revision);
    if !newer {
        directory.tenants.insert(tenant.name.clone(), tenant);
    }
}

/// Follows one prefix until the store is dropped.
async fn follow(store: std::sync::Weak<EtcdStore>, half: Half, mut revision: i64) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let Some(current) = store.upgrade() else {
            return;
        };
        let client = current.client.clone();
        let prefix = current.prefix(half).to_string();
        drop(current);
        let reason = match client.watch_prefix(&prefix, revision + 1).await {
            Err(error) => error.to_string(),
            Ok(mut stream) => loop {
                let response = match stream.next().await {
                    Ok(Some(response)) => response,
                    Ok(None) => break "stream ended".to_string(),
                    Err(error) => break error.to_string(),
                };
                let Some(current) = store.upgrade() else {
                    return;
                };
                if response.canceled {
                    break format!("watch cancelled: {}", response.cancel_reason);
                }
                current.tx.send_modify(|d| {
                    let d = Arc::make_mut(d);
                    for event in &response.events {
                        if let Some(kv) = &event.kv {
                            revision = revision.max(kv.mod_revision);
                            let deleted = event.r#type == EventType::Delete as i32;
                            apply(d, half, &prefix, kv, deleted);
                        }
                    }
                });
                backoff = Duration::from_millis(100);
            },
        };
        tracing::warn!(prefix, reason, "tenant watch interrupted; listing again");
        loop {
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(5));
            let Some(current) = store.upgrade() else {
                return;
            };
            match current.client.get_prefix(&prefix).await {
                Ok((kvs, rev)) => {
                    revision = rev;
                    current
                        .tx
                        .send_modify(|d| replace(Arc::make_mut(d), half, &prefix, &kvs));
                    break;
                }
                Err(error) => tracing::warn!(prefix, %error, "list tenants"),
            }
        }
    }
}

#[tonic::async_trait]
impl TenantStore for EtcdStore {
    fn directory(&self) -> watch::Receiver<Arc<Directory>> {
        self.tx.subscribe()
    }

    async fn put_tenant(&self, tenant: &Tenant) -> Result<Tenant, StoreError> {
        let key = format!("{}{}", self.tenants_prefix, tenant.name);
        let Some(revision) = self
            .client
            .put_if_revision(&key, serde_json::to_vec(tenant)?, tenant.revision)
            .await?
        else {
            return Err(StoreError::Conflict(tenant.name.clone()));
        };
        let stored = Tenant {
            revision,
            ..tenant.clone()
        };
        self.tx.send_modify(|d| {
            insert_tenant(Arc::make_mut(d), stored.clone());
        });
        Ok(stored)
    }

    async fn delete_tenant(&self, name: &str) -> Result<(), StoreError> {
        self.client
            .delete(&format!("{}{name}", self.tenants_prefix))
            .await?;
        self.tx.send_modify(|d| {
            Arc::make_mut(d).tenants.remove(name);
        });
        Ok(())
    }

    async fn put_key(&self, sha256: &str, key: &KeyRecord) -> Result<(), StoreError> {
        let path = format!("{}{sha256}", self.keys_prefix);
        self.client.put(&path, serde_json::to_vec(key)?, 0).await?;
        self.tx.send_modify(|d| {
            Arc::make_mut(d)
                .keys
                .insert(sha256.to_string(), key.clone());
        });
        Ok(())
    }

    async fn delete_key(&self, sha256: &str) -> Result<(), StoreError> {
        self.client
            .delete(&format!("{}{sha256}", self.keys_prefix))
            .await?;
        self.tx.send_modify(|d| {
            Arc::make_mut(d).keys.remove(sha256);
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kv(key: &str, value: &str) -> KeyValue {
        KeyValue {
            key: key.as_bytes().to_vec(),
            value: value.as_bytes().to_vec(),
            ..Default::default()
        }
    }

    #[test]
    fn a_tenant_event_older_than_the_record_held_is_skipped() {
        let mut d = Directory::default();
        let record = |rpm: u32, revision: i64| KeyValue {
            mod_revision: revision,
            ..kv(
                "/p/tenants/acme",
                &format!(
                    r#"{{"name":"acme","requests_per_minute":{rpm},"tokens_per_minute":0,"max_concurrent":0}}"#
                ),
            )
        };
        apply(&mut d, Half::Tenants, "/p/tenants/", &record(5, 12), false);
        assert_eq!(d.tenants["acme"].revision, 12);
        // The watch's event for an earlier write, after this replica's own later one.
        apply(&mut d, Half::Tenants, "/p/tenants/", &record(4, 11), false);
        assert_eq!(d.tenants["acme"].limits.requests_per_minute, 5);
        apply(&mut d, Half::Tenants, "/p/tenants/", &record(6, 13), false);
        assert_eq!(
            (
                d.tenants["acme"].limits.requests_per_minute,
                d.tenants["acme"].revision
            ),
            (6, 13)
        );
    }

    #[test]
    fn records_apply_and_malformed_ones_are_skipped() {
        let mut d = Directory::default();
        let tenant =
            r#"{"name":"acme","requests_per_minute":1,"tokens_per_minute":2,"max_concurrent":3}"#;
        apply(
            &mut d,
            Half::Tenants,
            "/p/tenants/",
            &kv("/p/tenants/acme", tenant),
            false,
        );
        apply(
            &mut d,
            Half::Tenants,
            "/p/tenants/",
            &kv("/p/tenants/other", tenant),
            false,
        );
        apply(
            &mut d,
            Half::Tenants,
            "/p/tenants/",
            &kv("/p/tenants/bad", "{"),
            false,
        );
        assert_eq!(d.tenants.keys().collect::<Vec<_>>(), ["acme"]);
        assert_eq!(d.tenants["acme"].limits.max_concurrent, 3);

        let sha = "0".repeat(64);
        let record = r#"{"tenant":"acme","id":"lmg-12345678"}"#;
        apply(
            &mut d,
            Half::Keys,
            "/p/keys/",
            &kv(&format!("/p/keys/{sha}"), record),
            false,
        );
        apply(
            &mut d,
            Half::Keys,
            "/p/keys/",
            &kv("/p/keys/short", record),
            false,
        );
        assert_eq!(d.keys.len(), 1);
        apply(
            &mut d,
            Half::Keys,
            "/p/keys/",
            &kv(&format!("/p/keys/{sha}"), ""),
            true,
        );
        assert!(d.keys.is_empty());
        replace(&mut d, Half::Tenants, "/p/tenants/", &[]);
        assert!(d.tenants.is_empty());
    }
}
