//! Where tenants and key digests are kept: the [`TenantStore`] trait, and its
//! in-process implementation for `lmgrid up`, optionally persisted to a JSON
//! file so keys survive a restart. The etcd implementation used in clusters
//! is in `etcd_store`.
//!
//! Every store publishes the whole [`Directory`] on a watch channel that the
//! authenticator reads on each request; writes apply to it at once, so a
//! replica reads its own writes.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::sync::{Mutex, watch};

use super::{Directory, KeyRecord, Tenant};

/// A failure to read or write the store.
#[derive(Debug, thiserror::Error)]
pub(crate) enum StoreError {
    #[error(transparent)]
    Etcd(#[from] lmgrid_core::etcd::EtcdError),
    #[error("{action} {path}: {message}")]
    File {
        action: &'static str,
        path: String,
        message: String,
    },
    #[error("encode a record: {0}")]
    Encode(#[from] serde_json::Error),
    /// A compare-and-set write found the tenant changed since it was read.
    #[error("tenant '{0}' changed since it was read")]
    Conflict(String),
}

/// Tenants and key digests, followed by every gateway replica.
#[tonic::async_trait]
pub(crate) trait TenantStore: Send + Sync + fmt::Debug {
    /// The directory, kept up to date while the store lives.
    fn directory(&self) -> watch::Receiver<Arc<Directory>>;

    /// Creates or replaces a tenant, if its record is still at
    /// `tenant.revision` (0: if there is none); otherwise
    /// [`StoreError::Conflict`]. Returns the tenant as stored, with its new
    /// revision.
    async fn put_tenant(&self, tenant: &Tenant) -> Result<Tenant, StoreError>;

    /// Removes a tenant (its keys are removed separately).
    async fn delete_tenant(&self, name: &str) -> Result<(), StoreError>;

    /// Records that the key with this digest belongs to `key.tenant`.
    async fn put_key(&self, sha256: &str, key: &KeyRecord) -> Result<(), StoreError>;

    /// Revokes the key with this digest.
    async fn delete_key(&self, sha256: &str) -> Result<(), StoreError>;
}

/// The in-process store of `lmgrid up`: the directory in memory, written to
/// `path` (when given) after every change.
#[derive(Debug)]
pub(crate) struct FileStore {
    path: Option<PathBuf>,
    /// Serialises writers, so the file always holds the latest directory.
    write: Mutex<()>,
    tx: watch::Sender<Arc<Directory>>,
}

impl FileStore {
    /// A store kept only in memory.
    pub(crate) fn in_memory() -> FileStore {
        FileStore {
            path: None,
            write: Mutex::new(()),
            tx: watch::Sender::new(Arc::default()),
        }
    }

    /// A store persisted to `path`, loaded from it when it exists.
    pub(crate) async fn open(path: &Path) -> Result<FileStore, StoreError> {
        let mut directory: Directory = match tokio::fs::read(path).await {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| StoreError::File {
                action: "read",
                path: path.display().to_string(),
                message: format!("not a tenant directory: {e}"),
            })?,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Directory::default(),
            Err(error) => {
                return Err(StoreError::File {
                    action: "read",
                    path: path.display().to_string(),
                    message: error.to_string(),
                });
            }
        };
        // Stored tenants have a revision other than 0, which means "none".
        for tenant in directory.tenants.values_mut() {
            tenant.revision = 1;
        }
        Ok(FileStore {
            path: Some(path.to_path_buf()),
            write: Mutex::new(()),
            tx: watch::Sender::new(Arc::new(directory)),
        })
    }

    async fn change<T>(
        &self,
        apply: impl FnOnce(&mut Directory) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let _writer = self.write.lock().await;
        let mut next = (**self.tx.borrow()).clone();
        let result = apply(&mut next)?;
        if let Some(path) = &self.path {
            persist(path, &next).await?;
        }
        self.tx.send_replace(Arc::new(next));
        Ok(result)
    }
}

/// Writes `directory` to `path` through a temporary file and a rename, so a
/// crash never leaves half a file; readable by the owner only.
async fn persist(path: &Path, directory: &Directory) -> Result<(), StoreError> {
    let bytes = serde_json::to_vec_pretty(directory)?;
    let temporary = path.with_extension("json.tmp");
    let failed = |action: &'static str| {
        let shown = path.display().to_string();
        move |error: std::io::Error| StoreError::File {
            action,
            path: shown,
            message: error.to_string(),
        }
    };
    let mut options = tokio::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    options.mode(0o600);
    let mut file = options.open(&temporary).await.map_err(failed("write"))?;
    tokio::io::AsyncWriteExt::write_all(&mut file, &bytes)
        .await
        .map_err(failed("write"))?;
    file.sync_all().await.map_err(failed("write"))?;
    drop(file);
    tokio::fs::rename(&temporary, path)
        .await
        .map_err(failed("replace"))
}

#[tonic::async_trait]
impl TenantStore for FileStore {
    fn directory(&self) -> watch::Receiver<Arc<Directory>> {
        self.tx.subscribe()
    }

    async fn put_tenant(&self, tenant: &Tenant) -> Result<Tenant, StoreError> {
        self.change(|d| {
            let current = d.tenants.get(&tenant.name).map_or(0, |t| t.revision);
            if current != tenant.revision {
                return Err(StoreError::Conflict(tenant.name.clone()));
            }
            // Revisions here only need to differ between writes: one more
            // than the newest in the directory.
            let newest = d.tenants.values().map(|t| t.revision).max().unwrap_or(0);
            let stored = Tenant {
                revision: newest + 1,
                ..tenant.clone()
            };
            d.tenants.insert(tenant.name.clone(), stored.clone());
            Ok(stored)
        })
        .await
    }

    async fn delete_tenant(&self, name: &str) -> Result<(), StoreError> {
        self.change(|d| {
            d.tenants.remove(name);
            Ok(())
        })
        .await
    }

    async fn put_key(&self, sha256: &str, key: &KeyRecord) -> Result<(), StoreError> {
        self.change(|d| {
            d.keys.insert(sha256.to_string(), key.clone());
            Ok(())
        })
        .await
    }

    async fn delete_key(&self, sha256: &str) -> Result<(), StoreError> {
        self.change(|d| {
            d.keys.remove(sha256);
            Ok(())
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::{Limits, Priority};

    fn tenant(name: &str) -> Tenant {
        Tenant {
            name: name.into(),
            limits: Limits {
                requests_per_minute: 5,
                tokens_per_minute: 100,
                max_concurrent: 2,
            },
            priority: Priority::Low,
            allowed_models: vec![],
            keys: vec![],
            created: 7,
            revision: 0,
        }
    }

    #[tokio::test]
    async fn the_file_store_survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tenants.json");
        let store = FileStore::open(&path).await.unwrap();
        let mut seen = store.directory();
        store.put_tenant(&tenant("acme")).await.unwrap();
        let record = KeyRecord {
            tenant: "acme".into(),
            id: "lmg-abcdefgh".into(),
            created: 7,
        };
        store.put_key(&"a".repeat(64), &record).await.unwrap();
        assert!(seen.has_changed().unwrap());
        assert_eq!(seen.borrow_and_update().keys.len(), 1);
        drop(store);

        let reopened = FileStore::open(&path).await.unwrap();
        let directory = reopened.directory().borrow().clone();
        let stored = Tenant {
            revision: 1,
            ..tenant("acme")
        };
        assert_eq!(directory.tenants["acme"], stored);
        assert_eq!(directory.keys[&"a".repeat(64)], record);
        reopened.delete_key(&"a".repeat(64)).await.unwrap();
        reopened.delete_tenant("acme").await.unwrap();
        let again = FileStore::open(&path).await.unwrap();
        assert_eq!(*again.directory().borrow().clone(), Directory::default());
    }

    #[tokio::test]
    async fn a_tenant_write_must_name_the_revision_it_read() {
        let store = FileStore::in_memory();
        let created = store.put_tenant(&tenant("acme")).await.unwrap();
        assert_ne!(created.revision, 0);
        // Created again, or written from a stale read: refused.
        for stale in [
            tenant("acme"),
            Tenant {
                revision: created.revision + 7,
                ..tenant("acme")
            },
        ] {
            let error = store.put_tenant(&stale).await.unwrap_err();
            assert!(
                matches!(error, StoreError::Conflict(ref name) if name == "acme"),
                "{error}"
            );
        }
        let mut changed = created.clone();
        changed.limits.requests_per_minute = 9;
        let updated = store.put_tenant(&changed).await.unwrap();
        assert_ne!(updated.revision, created.revision);
        // The write that read `created` lost: it did not see `updated`.
        let error = store.put_tenant(&created).await.unwrap_err();
        assert!(matches!(error, StoreError::Conflict(_)), "{error}");
        let directory = store.directory().borrow().clone();
        assert_eq!(directory.tenants["acme"], updated);
        assert_eq!(directory.tenants["acme"].limits.requests_per_minute, 9);
    }

    #[tokio::test]
    async fn a_corrupt_file_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tenants.json");
        std::fs::write(&path, b"{not json").unwrap();
        let error = FileStore::open(&path).await.unwrap_err().to_string();
        assert!(error.contains("tenants.json"), "{error}");
    }
}
