//! Getting a request answered: attempts at workers of the plan's group,
//! retried when that is safe and affordable.
//!
//! - An attempt is bounded by the request's deadline and, when configured,
//!   by `routing.attempt_timeout`; the worker gets the smaller of the two as
//!   its gRPC deadline.
//! - A failed attempt is retried only when nothing was answered yet and the
//!   failure says the worker did not do the work: the connection failed (an
//!   error raised by the transport, not a status the worker sent), the
//!   worker answered `UNAVAILABLE`, or the attempt ran out of time (it is
//!   cancelled at the worker). Never past the deadline, never on a worker
//!   already tried, never beyond `retry.max_attempts`, and only while the
//!   retry budget allows.
//! - Connection failures, `UNAVAILABLE`, `INTERNAL` and attempt timeouts
//!   count against the worker; enough in a row eject it (never more than
//!   half of a model's workers). Any other answer is the worker working.
//!
//! A stream's attempt lasts until its first message, so that a stream is
//! only retried before anything reached the caller. Dropping the future of
//! a call (the caller went away) drops the upstream call, which the worker
//! sees as a cancellation.

use std::error::Error as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::uri::PathAndQuery;
use lmgrid_core::error::ErrorKind;
use lmgrid_core::telemetry::TraceContextInterceptor;
use tonic::client::Grpc;
use tonic::metadata::MetadataMap;
use tonic::service::interceptor::InterceptedService;
use tonic::{Code, Request, Response, Status, Streaming};

use super::codec::Encoded;
use super::connection;
use super::endpoint::{Endpoint, Pending, may_eject};
use super::{Plan, Workers};
use crate::metrics;

type Client = Grpc<InterceptedService<connection::Client, TraceContextInterceptor>>;

/// A request on its way to a worker: the gRPC method, the message encoded
/// once, the metadata each attempt carries, and the deadline.
#[derive(Debug)]
pub(crate) struct Outbound {
    path: &'static str,
    body: Bytes,
    metadata: MetadataMap,
    deadline: Option<Instant>,
}

impl Outbound {
    /// `request` (with its request id and trace metadata) to `path`, to be
    /// answered by `deadline`.
    pub(crate) fn new<M: prost::Message>(
        path: &'static str,
        request: Request<M>,
        deadline: Option<Instant>,
    ) -> Outbound {
        let (metadata, _, message) = request.into_parts();
        Outbound {
            path,
            body: Bytes::from(message.encode_to_vec()),
            metadata,
            deadline,
        }
    }
}

/// An upstream stream that has delivered its first message (or ended).
/// Holds the worker's outstanding count until dropped.
#[derive(Debug)]
pub(crate) struct Upstream<R> {
    first: Option<R>,
    ended: bool,
    stream: Streaming<R>,
    _pending: Pending,
}

impl<R> Upstream<R> {
    /// The next message; `None` once the stream ended.
    pub(crate) async fn message(&mut self) -> Result<Option<R>, Status> {
        if let Some(first) = self.first.take() {
            return Ok(Some(first));
        }
        if self.ended {
            return Ok(None);
        }
        let next = self.stream.message().await;
        self.ended = !matches!(next, Ok(Some(_)));
        next
    }
}

/// Why an attempt counts against a worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Failure {
    /// The connection failed: an error of the transport, not a status the
    /// worker sent.
    Connection,
    Unavailable,
    Internal,
    /// The attempt ran out of `routing.attempt_timeout`.
    Timeout,
}

impl Failure {
    fn of(status: &Status, attempt_bounded: bool) -> Option<Failure> {
        if status.source().is_some() {
            return Some(Failure::Connection);
        }
        match status.code() {
            Code::Unavailable => Some(Failure::Unavailable),
            Code::Internal => Some(Failure::Internal),
            // The worker's side of an attempt timeout, racing this gateway's.
            Code::DeadlineExceeded if attempt_bounded => Some(Failure::Timeout),
            _ => None,
        }
    }

    /// Whether the worker cannot have done the work, so trying another is
    /// safe.
    fn retryable(self) -> bool {
        self != Failure::Internal
    }

    /// The `reason` label of the retry metric.
    fn reason(self) -> &'static str {
        match self {
            Failure::Connection => "connection",
            Failure::Unavailable => "unavailable",
            Failure::Internal => "internal",
            Failure::Timeout => "attempt_timeout",
        }
    }
}

impl Workers {
    /// Sends a unary call to a worker of `plan`, retrying as the module
    /// says.
    pub(crate) async fn unary<R>(&self, plan: &Plan, out: Outbound) -> Result<Response<R>, Status>
    where
        R: prost::Message + Default + Send + Sync + 'static,
    {
        let path = out.path;
        let (response, _pending) = self
            .attempts(plan, &out, |mut client, request| async move {
                client.ready().await.map_err(not_ready)?;
                client
                    .unary(
                        request,
                        PathAndQuery::from_static(path),
                        Encoded::<R>::default(),
                    )
                    .await
            })
            .await?;
        Ok(response)
    }

    /// Opens a server stream at a worker of `plan` and waits for its first
    /// message, retrying as the module says.
    pub(crate) async fn server_streaming<R>(
        &self,
        plan: &Plan,
        out: Outbound,
    ) -> Result<Upstream<R>, Status>
    where
        R: prost::Message + Default + Send + Sync + 'static,
    {
        let path = out.path;
        let ((stream, first), pending) = self
            .attempts(plan, &out, |mut client, request| async move {
                client.ready().await.map_err(not_ready)?;
                let mut stream = client
                    .server_streaming(
                        request,
                        PathAndQuery::from_static(path),
                        Encoded::<R>::default(),
                    )
                    .await?
                    .into_inner();
                let first = stream.message().await?;
                Ok((stream, first))
            })
            .await?;
        Ok(Upstream {
            ended: first.is_none(),
            first,
            stream,
            _pending: pending,
        })
    }

    async fn attempts<T, F, Fut>(
        &self,
        plan: &Plan,
        out: &Outbound,
        mut call: F,
    ) -> Result<(T, Pending), Status>
    where
        F: FnMut(Client, Request<Bytes>) -> Fut,
        Fut: Future<Output = Result<T, Status>>,
    {
        self.budget.record_request(Instant::now());
        let mut tried: Vec<Arc<Endpoint>> = Vec::new();
        let mut last: Option<(Status, Failure)> = None;
        loop {
            let remaining = out
                .deadline
                .map(|deadline| deadline.saturating_duration_since(Instant::now()));
            if remaining.is_some_and(|r| r.is_zero()) {
                return Err(match last {
                    Some((status, _)) => status,
                    None => ErrorKind::DeadlineExceeded
                        .status("the deadline passed before the request was sent"),
                });
            }
            let pending = match self.acquire(plan, &tried) {
                Ok(pending) => pending,
                Err(error) => return Err(last.map_or_else(|| error.into(), |(status, _)| status)),
            };
            if let Some((status, failure)) = last.take() {
                if !self.budget.try_retry(Instant::now()) {
                    metrics::retry_refused();
                    return Err(status);
                }
                metrics::retry(failure.reason());
            }
            let endpoint = pending.endpoint().clone();
            let (limit, attempt_bounded) = match (self.settings.attempt_timeout, remaining) {
                (Some(attempt), Some(left)) if attempt < left => (Some(attempt), true),
                (Some(attempt), None) => (Some(attempt), true),
                (_, left) => (left, false),
            };
            let mut request =
                Request::from_parts(out.metadata.clone(), Default::default(), out.body.clone());
            if let Some(limit) = limit {
                request.set_timeout(limit);
            }
            let attempt = async {
                let client = endpoint
                    .connection
                    .client()
                    .await
                    .map_err(|error| Status::from_error(Box::new(error)))?;
                let client = Grpc::new(InterceptedService::new(client, TraceContextInterceptor));
                call(client, request).await
            };
            let result = match limit {
                Some(limit) => tokio::time::timeout(limit, attempt).await,
                None => Ok(attempt.await),
            };
            let now = self.now();
            let (status, failure) = match result {
                Ok(Ok(answer)) => {
                    endpoint.health().succeeded(now, &self.settings.ejection);
                    return Ok((answer, pending));
                }
                Ok(Err(status)) => match Failure::of(&status, attempt_bounded) {
                    // Whatever code the transport's error mapped to, the client
                    // learns that the worker could not be reached.
                    Some(Failure::Connection) => {
                        (unreachable(&endpoint, &status), Some(Failure::Connection))
                    }
                    failure => (status, failure),
                },
                Err(_) if attempt_bounded => (
                    attempt_timed_out(&endpoint, limit.unwrap_or_default()),
                    Some(Failure::Timeout),
                ),
                Err(_) => {
                    return Err(ErrorKind::DeadlineExceeded
                        .status("the deadline passed before the worker answered"));
                }
            };
            drop(pending);
            let Some(failure) = failure else {
                // The worker answered; the answer is an error of the request.
                endpoint.health().succeeded(now, &self.settings.ejection);
                return Err(status);
            };
            self.count_failure(&endpoint, plan, now);
            tracing::debug!(
                worker = endpoint.id, address = endpoint.address, reason = failure.reason(),
                code = ?status.code(), message = status.message(), "attempt failed"
            );
            tried.push(endpoint);
            if !failure.retryable() || tried.len() >= self.settings.max_attempts as usize {
                return Err(status);
            }
            last = Some((status, failure));
        }
    }

    /// Counts a failure against `endpoint`, ejecting it when its streak is
    /// long enough and at least half of the model's workers stay in.
    pub(super) fn count_failure(&self, endpoint: &Arc<Endpoint>, plan: &Plan, now: u64) {
        let policy = &self.settings.ejection;
        if !endpoint.health().failed(now, policy) {
            return;
        }
        let _deciding = self.ejecting.lock().unwrap_or_else(|e| e.into_inner());
        if endpoint.health().is_ejected(now) {
            return;
        }
        let workers = &plan.model_group.endpoints;
        let ejected = workers
            .iter()
            .filter(|e| e.health().is_ejected(now))
            .count();
        if !may_eject(ejected, workers.len()) {
            tracing::debug!(
                worker = endpoint.id,
                model = plan.model,
                ejected,
                workers = workers.len(),
                "not ejecting a failing worker: half the model's workers are out already"
            );
            return;
        }
        let interval = endpoint.health().eject(now, policy);
        metrics::ejection(interval);
        tracing::warn!(
            worker = endpoint.id,
            address = endpoint.address,
            model = plan.model,
            ?interval,
            "ejecting a worker after consecutive failures"
        );
    }
}

/// A client that cannot become ready: its channel is gone, which is the
/// connection's failure (the status keeps the error as its source).
fn not_ready(error: impl Into<tonic::codegen::StdError>) -> Status {
    Status::from_error(error.into())
}

/// `UNAVAILABLE` for a worker the connection to which failed.
fn unreachable(endpoint: &Endpoint, status: &Status) -> Status {
    ErrorKind::Unavailable.status(format!(
        "worker {} at {} could not be reached: {}",
        endpoint.id,
        endpoint.address,
        status.message()
    ))
}

fn attempt_timed_out(endpoint: &Endpoint, limit: Duration) -> Status {
    ErrorKind::DeadlineExceeded.status(format!(
        "worker {} did not answer within the attempt timeout of {limit:?}",
        endpoint.id
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_are_told_apart() {
        let sent = |code| Failure::of(&Status::new(code, "from the worker"), false);
        assert_eq!(sent(Code::Unavailable), Some(Failure::Unavailable));
        assert_eq!(sent(Code::Internal), Some(Failure::Internal));
        assert_eq!(sent(Code::InvalidArgument), None);
        assert_eq!(sent(Code::ResourceExhausted), None);
        assert_eq!(sent(Code::DeadlineExceeded), None, "the caller's deadline");
        let bounded = Status::deadline_exceeded("attempt timeout");
        assert_eq!(Failure::of(&bounded, true), Some(Failure::Timeout));
        // A status the transport raised carries its error as the source,
        // whatever its code.
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset");
        let transport = Status::from_error(Box::new(io));
        assert!(transport.source().is_some());
        assert_eq!(Failure::of(&transport, false), Some(Failure::Connection));
        assert!(Failure::Connection.retryable() && Failure::Timeout.retryable());
        assert!(!Failure::Internal.retryable());
    }
}
