//! Discovery on etcd: each instance is a JSON record under
//! `<prefix>/instances/<service>/<id>`, attached to a lease that a background
//! task keeps alive. A crashed instance stops renewing and its record is
//! deleted by etcd when the lease runs out; a graceful one revokes its lease.
//! Watchers list the service prefix, then watch it from the next revision,
//! and list again after any interruption so no deletion is ever missed.
//! Model records (`<prefix>/models/<model>`) are watched the same way.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lmgrid_proto::etcd::mvccpb::event::EventType;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::{
    Discovery, Instance, Membership, ModelTable, Registration, Result, instance_key, models,
    models_prefix, service_prefix,
};
use crate::config::EtcdConfig;
use crate::etcd::EtcdClient;
use crate::metrics;

/// Discovery backed by an etcd cluster. Cloning shares the connection.
#[derive(Debug, Clone)]
pub struct EtcdDiscovery {
    client: EtcdClient,
    prefix: String,
    lease_ttl: Duration,
}

impl EtcdDiscovery {
    /// Connects and checks that etcd answers, within `connect_timeout`.
    pub async fn connect(config: &EtcdConfig) -> Result<Self> {
        let client = EtcdClient::connect(config).await?;
        Ok(EtcdDiscovery {
            client,
            prefix: config.prefix.clone(),
            lease_ttl: config.lease_ttl,
        })
    }

    /// The client, for other etcd users of the same connection.
    pub fn client(&self) -> &EtcdClient {
        &self.client
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }
}

#[async_trait::async_trait]
impl Discovery for EtcdDiscovery {
    async fn register(&self, instance: Instance) -> Result<Box<dyn Registration>> {
        let key = instance_key(&self.prefix, &instance.service, &instance.id);
        let value = serde_json::to_vec(&instance)?;
        let ttl = self.lease_ttl;
        let lease_id = self.client.grant(ttl).await?;
        self.client.put(&key, value.clone(), lease_id).await?;
        let lease = Arc::new(AtomicI64::new(lease_id));
        let value = Arc::new(Mutex::new(value));
        let stop = CancellationToken::new();
        let task = tokio::spawn(keep_alive(
            self.client.clone(),
            key.clone(),
            ttl,
            lease.clone(),
            value.clone(),
            stop.clone(),
        ));
        tracing::info!(key, lease_id, ttl = ?ttl, "registered in etcd");
        Ok(Box::new(EtcdRegistration {
            client: self.client.clone(),
            key,
            instance,
            lease,
            value,
            stop,
            task: Some(task),
        }))
    }

    async fn watch(&self, service: &str) -> Result<Membership> {
        let reader = Reader {
            what: service.to_string(),
            prefix: service_prefix(&self.prefix, service),
            decode: decode_instance,
            observe: metrics::discovery_members,
        };
        let rx = watch_table(&self.client, reader).await?;
        Ok(Membership::new(service, rx))
    }

    async fn watch_models(&self) -> Result<ModelTable> {
        let reader = Reader {
            what: "models".to_string(),
            prefix: models_prefix(&self.prefix),
            decode: models::decode,
            observe: |_, _| {},
        };
        let rx = watch_table(&self.client, reader).await?;
        Ok(ModelTable::new(rx))
    }
}

/// Renews the lease every third of its TTL. If renewal fails or the lease was
/// lost (etcd unreachable for longer than the TTL), registers again under a
/// new lease so the instance comes back as soon as etcd does.
async fn keep_alive(
    client: EtcdClient,
    key: String,
    ttl: Duration,
    lease: Arc<AtomicI64>,
    value: Arc<Mutex<Vec<u8>>>,
    stop: CancellationToken,
) {
    let interval = ttl / 3;
    let mut backoff = Duration::from_millis(200);
    loop {
        let lease_id = lease.load(Ordering::SeqCst);
        let problem = match client.keep_alive(lease_id).await {
            Err(error) => format!("start keep-alive: {error}"),
            Ok(mut stream) => loop {
                let outcome = tokio::select! {
                    _ = stop.cancelled() => return,
                    outcome = tokio::time::timeout(interval.max(Duration::from_secs(1)), stream.renew()) => outcome,
                };
                match outcome {
                    Ok(Ok(remaining)) if remaining > 0 => backoff = Duration::from_millis(200),
                    Ok(Ok(_)) => break "lease expired".to_string(),
                    Ok(Err(error)) => break error.to_string(),
                    Err(_) => break "renewal timed out".to_string(),
                }
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(interval) => {}
                }
            },
        };
        tracing::warn!(key, lease_id, problem, "lost the lease; registering again");
        // Grant a new lease and put the record again until it works.
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(5));
            let record = value.lock().unwrap_or_else(|e| e.into_inner()).clone();
            let attempt = async {
                let id = client.grant(ttl).await?;
                client.put(&key, record, id).await?;
                Ok::<_, crate::etcd::EtcdError>(id)
            };
            match attempt.await {
                Ok(id) => {
                    lease.store(id, Ordering::SeqCst);
                    tracing::info!(key, lease_id = id, "registered in etcd again");
                    break;
                }
                Err(error) => tracing::warn!(key, %error, "register again"),
            }
        }
    }
}

#[derive(Debug)]
struct EtcdRegistration {
    client: EtcdClient,
    key: String,
    instance: Instance,
    lease: Arc<AtomicI64>,
    value: Arc<Mutex<Vec<u8>>>,
    stop: CancellationToken,
    task: Option<JoinHandle<()>>,
}

#[async_trait::async_trait]
impl Registration for EtcdRegistration {
    fn instance(&self) -> &Instance {
        &self.instance
    }

    async fn update(&mut self, instance: Instance) -> Result<()> {
        let value = serde_json::to_vec(&instance)?;
        *self.value.lock().unwrap_or_else(|e| e.into_inner()) = value.clone();
        self.client
            .put(&self.key, value, self.lease.load(Ordering::SeqCst))
            .await?;
        self.instance = instance;
        Ok(())
    }

    async fn deregister(mut self: Box<Self>) -> Result<()> {
        // Stop renewing first, so the keep-alive task cannot put the record
        // back after it is removed.
        self.stop.cancel();
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
        let lease = self.lease.load(Ordering::SeqCst);
        if let Err(error) = self.client.revoke(lease).await {
            tracing::warn!(key = self.key, %error, "revoke lease; deleting the record instead");
            self.client.delete(&self.key).await?;
        }
        tracing::info!(key = self.key, lease, "deregistered from etcd");
        Ok(())
    }
}

impl Drop for EtcdRegistration {
    // Dropped without deregistering: stop renewing and let the lease run out,
    // exactly as if the process had died.
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// How the records under one watched prefix become a table: the table's
/// name (a service, or `models`) for logs and metrics, and how a record is
/// read from the key after the prefix and its value.
struct Reader<T> {
    what: String,
    prefix: String,
    decode: fn(&str, &[u8]) -> Decoded<T>,
    /// Called with the table's size after every change.
    observe: fn(&str, usize),
}

type Table<T> = Arc<BTreeMap<String, T>>;

/// A record read from its key (after the prefix) and value: `None` for keys
/// that are not records of the table; an `Err` for a record that cannot be
/// used, left out of the table with a warning.
type Decoded<T> = Option<(String, std::result::Result<T, String>)>;

impl<T> Reader<T> {
    /// The table key and usable record at `key`, `Some((key, None))` for an
    /// unusable record, and `None` for keys outside the table.
    fn read(&self, key: &[u8], value: &[u8]) -> Option<(String, Option<T>)> {
        let key = std::str::from_utf8(key).ok()?;
        let rest = key.strip_prefix(&self.prefix)?;
        let (id, record) = (self.decode)(rest, value)?;
        match record {
            Ok(record) => Some((id, Some(record))),
            Err(error) => {
                tracing::warn!(key, %error, table = self.what, "ignoring malformed record");
                Some((id, None))
            }
        }
    }

    /// The table key of a deleted `key`, if it was a record of this table.
    fn deleted(&self, key: &[u8]) -> Option<String> {
        let rest = std::str::from_utf8(key).ok()?.strip_prefix(&self.prefix)?;
        (self.decode)(rest, b"").map(|(id, _)| id)
    }
}

fn decode_instance(
    rest: &str,
    value: &[u8],
) -> Option<(String, std::result::Result<Instance, String>)> {
    let record = serde_json::from_slice::<Instance>(value).map_err(|e| e.to_string());
    Some((rest.to_string(), record))
}

/// Starts watching `reader`'s prefix: lists it, then follows it from the
/// next revision in a background task that lives while a receiver does.
async fn watch_table<T: Clone + Send + Sync + 'static>(
    client: &EtcdClient,
    reader: Reader<T>,
) -> Result<watch::Receiver<Table<T>>> {
    let (records, revision) = list(client, &reader).await?;
    (reader.observe)(&reader.what, records.len());
    let (tx, rx) = watch::channel(Arc::new(records));
    tokio::spawn(watch_loop(client.clone(), reader, revision, tx));
    Ok(rx)
}

async fn list<T>(client: &EtcdClient, reader: &Reader<T>) -> Result<(BTreeMap<String, T>, i64)> {
    let (kvs, revision) = client.get_prefix(&reader.prefix).await?;
    let records = kvs
        .iter()
        .filter_map(|kv| match reader.read(&kv.key, &kv.value)? {
            (id, Some(record)) => Some((id, record)),
            (_, None) => None,
        })
        .collect();
    Ok((records, revision))
}

async fn watch_loop<T: Clone>(
    client: EtcdClient,
    reader: Reader<T>,
    mut revision: i64,
    tx: watch::Sender<Table<T>>,
) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let Some(reason) = watch_from(&client, &reader, &mut revision, &tx).await else {
            return;
        };
        tracing::warn!(
            table = reader.what,
            reason,
            "discovery watch interrupted; listing again"
        );
        loop {
            tokio::select! {
                _ = tx.closed() => return,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(5));
            match list(&client, &reader).await {
                Ok((records, rev)) => {
                    revision = rev;
                    (reader.observe)(&reader.what, records.len());
                    tx.send_replace(Arc::new(records));
                    backoff = Duration::from_millis(100);
                    break;
                }
                Err(error) => tracing::warn!(table = reader.what, %error, "list records"),
            }
        }
    }
}

/// Applies watch events to the table until every receiver is gone (`None`)
/// or the watch is interrupted (`Some(reason)`).
async fn watch_from<T: Clone>(
    client: &EtcdClient,
    reader: &Reader<T>,
    revision: &mut i64,
    tx: &watch::Sender<Table<T>>,
) -> Option<String> {
    let mut stream = match client.watch_prefix(&reader.prefix, *revision + 1).await {
        Ok(stream) => stream,
        Err(error) => return Some(error.to_string()),
    };
    loop {
        let message = tokio::select! {
            _ = tx.closed() => return None,
            message = stream.next() => message,
        };
        let response = match message {
            Ok(Some(response)) => response,
            Ok(None) => return Some("stream ended".into()),
            Err(error) => return Some(error.to_string()),
        };
        if response.canceled {
            return Some(format!(
                "watch cancelled (compacted at {}): {}",
                response.compact_revision, response.cancel_reason
            ));
        }
        if response.events.is_empty() {
            continue;
        }
        tx.send_modify(|records| {
            let records = Arc::make_mut(records);
            for event in &response.events {
                let Some(kv) = &event.kv else { continue };
                *revision = (*revision).max(kv.mod_revision);
                if event.r#type == EventType::Delete as i32 {
                    if let Some(id) = reader.deleted(&kv.key) {
                        records.remove(&id);
                    }
                } else {
                    // An unusable record replaces what was there: the table
                    // holds what a fresh listing would.
                    match reader.read(&kv.key, &kv.value) {
                        Some((id, Some(record))) => {
                            records.insert(id, record);
                        }
                        Some((id, None)) => {
                            records.remove(&id);
                        }
                        None => {}
                    }
                }
            }
            (reader.observe)(&reader.what, records.len());
        });
    }
}
