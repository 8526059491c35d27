//! What every forwarded RPC does besides routing: take the caller's deadline, request id
//! and trace context onto the upstream request (with the version routing chose), count and
//! log the call when it ends, and relay streams with their text timed and their usage
//! metered.

use std::time::Instant;

use lmgrid_core::deadline;
use lmgrid_core::error::ErrorKind;
use lmgrid_proto::lmgrid::v1 as pb;
use tonic::metadata::{AsciiMetadataValue, MetadataMap};
use tonic::{Request, Response, Status};

use crate::http::call::{REQUEST_ID, new_request_id};
use crate::metrics::{self, TokenClock};
use crate::routing::{Outbound, Plan, Upstream, Versioned, Workers};

/// Trace-context metadata passed on as it came, so that a trace continues
/// even when this gateway exports no spans itself.
const TRACE_KEYS: [&str; 2] = ["traceparent", "tracestate"];

/// What a forwarded call takes from the caller's request.
#[derive(Debug)]
pub(super) struct Incoming {
    pub(super) deadline: Option<Instant>,
    pub(super) request_id: String,
    trace: Vec<(&'static str, AsciiMetadataValue)>,
}

impl Incoming {
    pub(super) fn of<T>(request: &Request<T>) -> Incoming {
        let metadata = request.metadata();
        let request_id = metadata
            .get(REQUEST_ID)
            .and_then(|v| v.to_str().ok())
            .filter(|id| !id.is_empty() && id.len() <= 128)
            .map_or_else(new_request_id, str::to_string);
        let trace = TRACE_KEYS
            .iter()
            .filter_map(|key| Some((*key, metadata.get(*key)?.clone())))
            .collect();
        Incoming {
            deadline: deadline::from_metadata(metadata),
            request_id,
            trace,
        }
    }

    /// Fills in the request id of an `lmgrid.v1` request context.
    pub(super) fn stamp(&self, context: &mut Option<pb::RequestContext>) {
        let context = context.get_or_insert_with(Default::default);
        if context.request_id.is_empty() {
            context.request_id = self.request_id.clone();
        }
    }

    /// The upstream request: the remaining deadline, the request id and the
    /// trace context.
    pub(super) fn forward<T>(&self, message: T) -> Result<Request<T>, Status> {
        let mut request = Request::new(message);
        if let Some(deadline) = self.deadline {
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return Err(ErrorKind::DeadlineExceeded
                    .status("the deadline passed before the request was sent"));
            }
            request.set_timeout(remaining);
        }
        stamp_request_id(request.metadata_mut(), &self.request_id);
        for (key, value) in &self.trace {
            request.metadata_mut().insert(*key, value.clone());
        }
        Ok(request)
    }

    /// Sends `message` to `method` of a worker of `plan`, with the version
    /// routing chose, and returns the answer.
    pub(super) async fn unary<M, R>(
        &self,
        workers: &Workers,
        plan: &Plan,
        method: &'static str,
        mut message: M,
    ) -> Result<Response<R>, Status>
    where
        M: Versioned,
        R: prost::Message + Default + Send + Sync + 'static,
    {
        if let Some(version) = &plan.version {
            message.set_version(version.clone());
        }
        let out = Outbound::new(method, self.forward(message)?, self.deadline);
        workers.unary(plan, out).await
    }

    /// Starts a generation stream at a worker of `plan`, with the version
    /// routing chose, once its first message arrived.
    pub(super) async fn generate_stream(
        &self,
        workers: &Workers,
        plan: &Plan,
        mut message: pb::GenerateRequest,
    ) -> Result<Upstream<pb::GenerateStreamResponse>, Status> {
        if let Some(version) = &plan.version {
            message.set_version(version.clone());
        }
        let out = Outbound::new(
            super::routes::GENERATE_STREAM,
            self.forward(message)?,
            self.deadline,
        );
        workers.server_streaming(plan, out).await
    }

    /// The answer, or the failure, with its `x-request-id`.
    pub(super) fn answer<T>(
        &self,
        result: Result<Response<T>, Status>,
    ) -> Result<Response<T>, Status> {
        match result {
            Ok(mut response) => {
                stamp_request_id(response.metadata_mut(), &self.request_id);
                Ok(response)
            }
            Err(mut status) => {
                stamp_request_id(status.metadata_mut(), &self.request_id);
                Err(status)
            }
        }
    }
}

fn stamp_request_id(metadata: &mut MetadataMap, request_id: &str) {
    if let Ok(value) = request_id.parse() {
        metadata.insert(REQUEST_ID, value);
    }
}

/// One forwarded call, counted and logged like an HTTP request when it ends
/// (when dropped before its end, as a client that went away: 499).
pub(super) struct Observation {
    route: &'static str,
    model: String,
    request_id: String,
    started: Instant,
    status: Option<u16>,
    _in_flight: metrics::InFlight,
}

impl Observation {
    /// Starts observing a call of `route` for the model labelled `model`.
    pub(super) fn start(route: &'static str, model: String, request_id: &str) -> Observation {
        Observation {
            route,
            model,
            request_id: request_id.to_string(),
            started: Instant::now(),
            status: None,
            _in_flight: metrics::InFlight::start(),
        }
    }

    /// The model label.
    pub(super) fn model(&self) -> &str {
        &self.model
    }

    pub(super) fn finish<T>(mut self, result: &Result<T, Status>) {
        self.status = Some(match result {
            Ok(_) => 200,
            Err(status) => http_status(status),
        });
    }
}

fn http_status(status: &Status) -> u16 {
    ErrorKind::from_grpc_code(status.code())
        .http_status()
        .as_u16()
}

impl Drop for Observation {
    fn drop(&mut self) {
        let status = self
            .status
            .unwrap_or_else(|| ErrorKind::Cancelled.http_status().as_u16());
        let elapsed = self.started.elapsed();
        metrics::request(self.route, &self.model, status, elapsed);
        tracing::info!(
            target: "lmgrid_gateway::access",
            protocol = "grpc",
            route = self.route,
            model = %self.model,
            status,
            duration_us = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX),
            request_id = %self.request_id,
            "request"
        );
    }
}

/// Relays one upstream generation stream to the caller, timing its text,
/// metering its usage, and ending it at the caller's deadline.
pub(super) struct Relay {
    clock: TokenClock,
    /// Taken when the stream ends; dropped with the stream otherwise.
    observation: Option<Observation>,
    pass_usage: bool,
    deadline: Option<Instant>,
}

impl Relay {
    pub(super) fn new(
        observation: Observation,
        pass_usage: bool,
        deadline: Option<Instant>,
    ) -> Relay {
        Relay {
            clock: TokenClock::new(observation.model.clone(), observation.started),
            observation: Some(observation),
            pass_usage,
            deadline,
        }
    }

    pub(super) async fn next(
        &mut self,
        upstream: &mut Upstream<pb::GenerateStreamResponse>,
    ) -> Option<Result<pb::GenerateStreamResponse, Status>> {
        let observation = self.observation.as_ref()?;
        let next = match self.deadline {
            Some(deadline) => tokio::time::timeout_at(deadline.into(), upstream.message())
                .await
                .unwrap_or_else(|_| {
                    Err(ErrorKind::DeadlineExceeded
                        .status("the deadline passed before the generation finished"))
                }),
            None => upstream.message().await,
        };
        match next {
            Ok(Some(mut message)) => {
                if !message.text_delta.is_empty() {
                    self.clock.tick();
                }
                if let Some(usage) = message.usage {
                    metrics::tokens(
                        &observation.model,
                        usage.prompt_tokens,
                        usage.completion_tokens,
                    );
                    if !self.pass_usage {
                        message.usage = None;
                    }
                }
                Some(Ok(message))
            }
            Err(status) => {
                if let Some(observation) = self.observation.take() {
                    observation.finish::<()>(&Err(status.clone()));
                }
                Some(Err(status))
            }
            Ok(None) => {
                if let Some(observation) = self.observation.take() {
                    observation.finish::<()>(&Ok(()));
                }
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwarded_requests_carry_deadline_request_id_and_trace() {
        let mut request = Request::new(());
        request
            .metadata_mut()
            .insert("grpc-timeout", "5S".parse().unwrap());
        request
            .metadata_mut()
            .insert(REQUEST_ID, "abc".parse().unwrap());
        request.metadata_mut().insert(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
                .parse()
                .unwrap(),
        );
        let incoming = Incoming::of(&request);
        assert_eq!(incoming.request_id, "abc");
        let forwarded = incoming.forward(7u8).unwrap();
        let metadata = forwarded.metadata();
        assert_eq!(metadata.get(REQUEST_ID).unwrap(), "abc");
        assert!(metadata.get("traceparent").is_some());
        let timeout = metadata.get("grpc-timeout").unwrap().to_str().unwrap();
        assert!(
            deadline::parse_grpc_timeout(timeout).unwrap() <= std::time::Duration::from_secs(5)
        );

        let mut context = None;
        incoming.stamp(&mut context);
        assert_eq!(context.unwrap().request_id, "abc");
        let mut given = Some(pb::RequestContext {
            request_id: "mine".into(),
            ..Default::default()
        });
        incoming.stamp(&mut given);
        assert_eq!(given.unwrap().request_id, "mine");
    }

    #[test]
    fn a_caller_without_a_request_id_gets_one() {
        let incoming = Incoming::of(&Request::new(()));
        assert!(incoming.request_id.starts_with("req-"));
        assert!(incoming.deadline.is_none());
        let answer = incoming.answer(Ok(Response::new(()))).unwrap();
        assert_eq!(
            answer.metadata().get(REQUEST_ID).unwrap().to_str().unwrap(),
            incoming.request_id
        );
        let failure = incoming
            .answer::<()>(Err(Status::not_found("nope")))
            .unwrap_err();
        assert_eq!(
            failure
                .metadata()
                .get(REQUEST_ID)
                .unwrap()
                .to_str()
                .unwrap(),
            incoming.request_id
        );
    }
}
