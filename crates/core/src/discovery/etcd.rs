//! Discovery on etcd: each instance is a JSON record under
//! `<prefix>/instances/<service>/<id>`, attached to a lease that a background
//! task keeps alive. A crashed instance stops renewing and its record is
//! deleted by etcd when the lease runs out; a graceful one revokes its lease.
//! Watchers list the service prefix, then watch it from the next revision,
//! and list again after any interruption so no deletion is ever missed.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lmgrid_proto::etcd::mvccpb::event::EventType;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::{
    Discovery, Instance, Members, Membership, Registration, Result, instance_key, service_prefix,
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
        let prefix = service_prefix(&self.prefix, service);
        let (members, revision) = list(&self.client, &prefix).await?;
        metrics::discovery_members(service, members.len());
        let (tx, rx) = watch::channel(Arc::new(members));
        tokio::spawn(watch_loop(
            self.client.clone(),
            service.to_string(),
            prefix,
            revision,
            tx,
        ));
        Ok(Membership::new(service, rx))
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

async fn list(client: &EtcdClient, prefix: &str) -> Result<(BTreeMap<String, Instance>, i64)> {
    let (kvs, revision) = client.get_prefix(prefix).await?;
    let members = kvs
        .iter()
        .filter_map(|kv| decode(prefix, &kv.key, &kv.value))
        .collect();
    Ok((members, revision))
}

fn decode(prefix: &str, key: &[u8], value: &[u8]) -> Option<(String, Instance)> {
    let key = std::str::from_utf8(key).ok()?;
    let id = key.strip_prefix(prefix)?.to_string();
    match serde_json::from_slice::<Instance>(value) {
        Ok(instance) => Some((id, instance)),
        Err(error) => {
            tracing::warn!(key, %error, "ignoring malformed instance record");
            None
        }
    }
}

async fn watch_loop(
    client: EtcdClient,
    service: String,
    prefix: String,
    mut revision: i64,
    tx: watch::Sender<Members>,
) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let Some(reason) = watch_from(&client, &service, &prefix, &mut revision, &tx).await else {
            return;
        };
        tracing::warn!(
            service,
            reason,
            "discovery watch interrupted; listing again"
        );
        loop {
            tokio::select! {
                _ = tx.closed() => return,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(5));
            match list(&client, &prefix).await {
                Ok((members, rev)) => {
                    revision = rev;
                    metrics::discovery_members(&service, members.len());
                    tx.send_replace(Arc::new(members));
                    backoff = Duration::from_millis(100);
                    break;
                }
                Err(error) => tracing::warn!(service, %error, "list instances"),
            }
        }
    }
}

/// Applies watch events to the table until every receiver is gone (`None`)
/// or the watch is interrupted (`Some(reason)`).
async fn watch_from(
    client: &EtcdClient,
    service: &str,
    prefix: &str,
    revision: &mut i64,
    tx: &watch::Sender<Members>,
) -> Option<String> {
    let mut stream = match client.watch_prefix(prefix, *revision + 1).await {
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
        tx.send_modify(|members| {
            let members = Arc::make_mut(members);
            for event in &response.events {
                let Some(kv) = &event.kv else { continue };
                *revision = (*revision).max(kv.mod_revision);
                if event.r#type == EventType::Delete as i32 {
                    if let Some(id) = std::str::from_utf8(&kv.key)
                        .ok()
                        .and_then(|k| k.strip_prefix(prefix))
                    {
                        members.remove(id);
                    }
                } else if let Some((id, instance)) = decode(prefix, &kv.key, &kv.value) {
                    members.insert(id, instance);
                }
            }
            metrics::discovery_members(service, members.len());
        });
    }
}
