//! A small etcd v3 client over lmgrid's generated stubs: key ranges, leases
//! with keep-alive streams, and prefix watches — what discovery and model
//! metadata need, and nothing more.
//!
//! Unary calls get a per-call timeout; the long-lived keep-alive and watch
//! streams do not, and rely on HTTP/2 keep-alive pings to notice a dead peer.

use std::time::Duration;

use lmgrid_proto::etcd::etcdserverpb as pb;
use lmgrid_proto::etcd::mvccpb::KeyValue;
use pb::kv_client::KvClient;
use pb::lease_client::LeaseClient;
use pb::watch_client::WatchClient;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;
use tonic::transport::{Channel, Endpoint};

use crate::config::EtcdConfig;

/// Result alias for etcd calls.
pub type Result<T, E = EtcdError> = std::result::Result<T, E>;

/// An etcd failure.
#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    #[error("connect to etcd at {endpoints}: {message}")]
    Connect { endpoints: String, message: String },
    #[error("etcd {action}: {status}")]
    Rpc {
        action: &'static str,
        status: tonic::Status,
    },
    #[error("etcd {action}: no answer within {timeout:?}")]
    Timeout {
        action: &'static str,
        timeout: Duration,
    },
    #[error("etcd {action}: {message}")]
    Refused {
        action: &'static str,
        message: String,
    },
}

/// A connection to an etcd cluster. Cloning shares the channel.
#[derive(Debug, Clone)]
pub struct EtcdClient {
    kv: KvClient<Channel>,
    lease: LeaseClient<Channel>,
    watch: WatchClient<Channel>,
    timeout: Duration,
}

impl EtcdClient {
    /// Connects to the configured endpoints and checks that etcd answers.
    pub async fn connect(config: &EtcdConfig) -> Result<Self> {
        let joined = config.endpoints.join(",");
        let mut endpoints = Vec::with_capacity(config.endpoints.len());
        for url in &config.endpoints {
            let url = if url.contains("://") {
                url.clone()
            } else {
                format!("http://{url}")
            };
            let endpoint = Endpoint::from_shared(url)
                .map_err(|e| EtcdError::Connect {
                    endpoints: joined.clone(),
                    message: e.to_string(),
                })?
                .connect_timeout(config.connect_timeout)
                .http2_keep_alive_interval(Duration::from_secs(5))
                .keep_alive_timeout(Duration::from_secs(5))
                .keep_alive_while_idle(true);
            endpoints.push(endpoint);
        }
        let channel = Channel::balance_list(endpoints.into_iter());
        let client = EtcdClient {
            kv: KvClient::new(channel.clone()),
            lease: LeaseClient::new(channel.clone()),
            watch: WatchClient::new(channel),
            timeout: config.connect_timeout.max(Duration::from_secs(5)),
        };
        let probe = pb::RangeRequest {
            key: config.prefix.as_bytes().to_vec(),
            count_only: true,
            ..Default::default()
        };
        let mut kv = client.kv.clone();
        match tokio::time::timeout(config.connect_timeout, kv.range(probe)).await {
            Ok(Ok(_)) => Ok(client),
            Ok(Err(status)) => Err(EtcdError::Connect {
                endpoints: joined,
                message: status.to_string(),
            }),
            Err(_) => Err(EtcdError::Connect {
                endpoints: joined,
                message: format!("no answer within {:?}", config.connect_timeout),
            }),
        }
    }

    async fn unary<T>(
        &self,
        action: &'static str,
        call: impl Future<Output = std::result::Result<tonic::Response<T>, tonic::Status>>,
    ) -> Result<T> {
        match tokio::time::timeout(self.timeout, call).await {
            Ok(Ok(response)) => Ok(response.into_inner()),
            Ok(Err(status)) => Err(EtcdError::Rpc { action, status }),
            Err(_) => Err(EtcdError::Timeout {
                action,
                timeout: self.timeout,
            }),
        }
    }

    /// Every key under `prefix`, with the store revision they were read at.
    pub async fn get_prefix(&self, prefix: &str) -> Result<(Vec<KeyValue>, i64)> {
        let request = pb::RangeRequest {
            key: prefix.as_bytes().to_vec(),
            range_end: prefix_range_end(prefix.as_bytes()),
            ..Default::default()
        };
        let mut kv = self.kv.clone();
        let response = self.unary("range", kv.range(request)).await?;
        let revision = response.header.map_or(0, |h| h.revision);
        Ok((response.kvs, revision))
    }

    /// One key, if present.
    pub async fn get(&self, key: &str) -> Result<Option<KeyValue>> {
        let request = pb::RangeRequest {
            key: key.as_bytes().to_vec(),
            ..Default::default()
        };
        let mut kv = self.kv.clone();
        Ok(self
            .unary("range", kv.range(request))
            .await?
            .kvs
            .into_iter()
            .next())
    }

    /// Writes a key, attached to `lease` unless it is 0. Returns the revision.
    pub async fn put(&self, key: &str, value: Vec<u8>, lease: i64) -> Result<i64> {
        let request = pb::PutRequest {
            key: key.as_bytes().to_vec(),
            value,
            lease,
            prev_kv: false,
        };
        let mut kv = self.kv.clone();
        let response = self.unary("put", kv.put(request)).await?;
        Ok(response.header.map_or(0, |h| h.revision))
    }

    /// Writes a key (without a lease) only if its mod revision is `revision` —
    /// 0 meaning that the key does not exist — in one transaction. Returns the
    /// revision of the write, or `None` when the key had changed (or existed,
    /// or did not) and nothing was written.
    pub async fn put_if_revision(
        &self,
        key: &str,
        value: Vec<u8>,
        revision: i64,
    ) -> Result<Option<i64>> {
        let request = pb::TxnRequest {
            compare: vec![pb::Compare {
                result: pb::compare::CompareResult::Equal as i32,
                target: pb::compare::CompareTarget::Mod as i32,
                key: key.as_bytes().to_vec(),
                target_union: Some(pb::compare::TargetUnion::ModRevision(revision)),
                range_end: Vec::new(),
            }],
            success: vec![pb::RequestOp {
                request: Some(pb::request_op::Request::RequestPut(pb::PutRequest {
                    key: key.as_bytes().to_vec(),
                    value,
                    lease: 0,
                    prev_kv: false,
                })),
            }],
            failure: Vec::new(),
        };
        let mut kv = self.kv.clone();
        let response = self.unary("txn", kv.txn(request)).await?;
        Ok(response
            .succeeded
            .then(|| response.header.map_or(0, |h| h.revision)))
    }

    /// Deletes a key; returns how many keys were deleted.
    pub async fn delete(&self, key: &str) -> Result<i64> {
        let request = pb::DeleteRangeRequest {
            key: key.as_bytes().to_vec(),
            ..Default::default()
        };
        let mut kv = self.kv.clone();
        Ok(self
            .unary("delete", kv.delete_range(request))
            .await?
            .deleted)
    }

    /// Grants a lease of `ttl` (rounded up to whole seconds).
    pub async fn grant(&self, ttl: Duration) -> Result<i64> {
        let ttl = i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX).max(1);
        let mut lease = self.lease.clone();
        let response = self
            .unary(
                "grant lease",
                lease.lease_grant(pb::LeaseGrantRequest { ttl, id: 0 }),
            )
            .await?;
        if !response.error.is_empty() {
            return Err(EtcdError::Refused {
                action: "grant lease",
                message: response.error,
            });
        }
        Ok(response.id)
    }

    /// Revokes a lease, deleting every key attached to it.
    pub async fn revoke(&self, id: i64) -> Result<()> {
        let mut lease = self.lease.clone();
        self.unary(
            "revoke lease",
            lease.lease_revoke(pb::LeaseRevokeRequest { id }),
        )
        .await?;
        Ok(())
    }

    /// Opens a keep-alive stream for a lease.
    pub async fn keep_alive(&self, id: i64) -> Result<KeepAlive> {
        let (tx, rx) = mpsc::channel(4);
        // etcd sends response headers only with its first message, so the
        // first request must be queued before the call is awaited.
        let _ = tx.try_send(pb::LeaseKeepAliveRequest { id });
        let mut lease = self.lease.clone();
        let responses = self
            .unary(
                "keep lease alive",
                lease.lease_keep_alive(ReceiverStream::new(rx)),
            )
            .await?;
        Ok(KeepAlive {
            id,
            tx,
            responses,
            first_sent: true,
        })
    }

    /// Watches every key under `prefix` from `start_revision` on.
    pub async fn watch_prefix(&self, prefix: &str, start_revision: i64) -> Result<WatchStream> {
        let (tx, rx) = mpsc::channel(1);
        let create = pb::WatchCreateRequest {
            key: prefix.as_bytes().to_vec(),
            range_end: prefix_range_end(prefix.as_bytes()),
            start_revision,
            ..Default::default()
        };
        let _ = tx.try_send(pb::WatchRequest {
            request_union: Some(pb::watch_request::RequestUnion::CreateRequest(create)),
        });
        let mut watch = self.watch.clone();
        let responses = self
            .unary("watch", watch.watch(ReceiverStream::new(rx)))
            .await?;
        Ok(WatchStream { _tx: tx, responses })
    }
}

/// A lease keep-alive stream.
#[derive(Debug)]
pub struct KeepAlive {
    id: i64,
    tx: mpsc::Sender<pb::LeaseKeepAliveRequest>,
    responses: Streaming<pb::LeaseKeepAliveResponse>,
    first_sent: bool,
}

impl KeepAlive {
    /// Renews the lease once; returns the remaining TTL in seconds, which is
    /// 0 when the lease no longer exists.
    pub async fn renew(&mut self) -> Result<i64> {
        if !std::mem::take(&mut self.first_sent) {
            self.tx
                .send(pb::LeaseKeepAliveRequest { id: self.id })
                .await
                .map_err(|_| EtcdError::Refused {
                    action: "keep lease alive",
                    message: "stream closed".into(),
                })?;
        }
        match self.responses.message().await {
            Ok(Some(response)) => Ok(response.ttl),
            Ok(None) => Err(EtcdError::Refused {
                action: "keep lease alive",
                message: "stream ended".into(),
            }),
            Err(status) => Err(EtcdError::Rpc {
                action: "keep lease alive",
                status,
            }),
        }
    }
}

/// A watch stream; dropping it cancels the watch.
#[derive(Debug)]
pub struct WatchStream {
    _tx: mpsc::Sender<pb::WatchRequest>,
    responses: Streaming<pb::WatchResponse>,
}

impl WatchStream {
    /// The next batch of events; `None` when the stream ended.
    pub async fn next(&mut self) -> Result<Option<pb::WatchResponse>> {
        self.responses
            .message()
            .await
            .map_err(|status| EtcdError::Rpc {
                action: "watch",
                status,
            })
    }
}

/// The end of the key range covering every key that starts with `prefix`.
pub fn prefix_range_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // An all-0xff (or empty) prefix: "\0" means "to the end of the keyspace".
    vec![0]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn range_end_increments_the_last_byte() {
        assert_eq!(prefix_range_end(b"/a/"), b"/a0");
        assert_eq!(prefix_range_end(b"a\xff"), b"b");
        assert_eq!(prefix_range_end(b"\xff\xff"), b"\0");
        assert_eq!(prefix_range_end(b""), b"\0");
    }
}
