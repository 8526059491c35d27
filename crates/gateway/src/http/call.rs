//! One public HTTP request as it moves through the gateway.
//!
//! Every handler starts by extracting a [`Call`] — where the caller is
//! authenticated (its API key resolved to a tenant) and the request's id,
//! deadline and trace context are settled — then admits the request for its
//! model with [`Call::admit`] (allowed models, rate and concurrency limits,
//! the model's queue), and ends by reporting the usage the worker counted
//! through [`Call::record_usage`], which settles the tokens reserved at
//! admission and meters them. In between, [`Call::upstream`] turns a message
//! into the gRPC request to a worker, with the remaining deadline, the
//! request id and the trace context.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{ConnectInfo, FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, header};
use lmgrid_core::ErrorKind;
use lmgrid_core::deadline::parse_grpc_timeout;
use lmgrid_proto::lmgrid::v1 as pb;
use serde_json::{Map, Value};
use tonic::metadata::{MetadataKey, MetadataValue};

use super::AppState;
use super::encoding::read_body;
use super::error::ApiError;
use super::json::parse_object;
use crate::admission::{RateWindows, Rejection, Ticket};
use crate::auth::Identity;
use crate::metrics;
use crate::usage::Usage;

/// The header that carries a request's id, both ways.
pub(crate) const REQUEST_ID: &str = "x-request-id";

/// A client's own bound on how long a request may take: seconds (`2.5`) or
/// a duration (`500ms`, `30s`, `2m`).
pub(crate) const REQUEST_TIMEOUT: &str = "x-request-timeout";

/// The OpenAI SDKs send their read timeout in seconds in this header; it
/// bounds requests that answer in one piece (a stream only has to keep
/// sending).
pub(crate) const SDK_READ_TIMEOUT: &str = "x-stainless-read-timeout";

/// Trace-context headers passed on to the worker as they came, so that a
/// trace continues even when this gateway exports no spans itself.
const TRACE_HEADERS: [&str; 2] = ["traceparent", "tracestate"];

/// The id of the request, as set by the request middleware.
#[derive(Debug, Clone)]
pub(crate) struct RequestId(pub(crate) Arc<str>);

/// What a handler learned that the middleware needs: the model label and
/// tenant (access log, metrics), the rate-limit windows (`x-ratelimit-*`
/// headers) and, once admitted, where to meter the request's end. Shared
/// between the handler and the middleware, which reads it when the response
/// (stream) ends.
#[derive(Debug, Default)]
pub(crate) struct Observed(Mutex<Seen>);

#[derive(Debug, Default, Clone)]
pub(crate) struct Seen {
    pub(crate) model: Option<String>,
    pub(crate) tenant: Option<String>,
    /// The display id of the API key used (never the key).
    pub(crate) key_id: Option<String>,
    pub(crate) rate: Option<RateWindows>,
    /// Set once admitted.
    pub(crate) usage: Option<Usage>,
}

impl Observed {
    pub(crate) fn seen(&self) -> Seen {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn update(&self, change: impl FnOnce(&mut Seen)) {
        change(&mut self.0.lock().unwrap_or_else(|e| e.into_inner()));
    }
}

/// One admitted request.
#[derive(Debug)]
pub(crate) struct Call {
    request_id: Arc<str>,
    started: Instant,
    deadline: Instant,
    /// The SDK's read timeout, for requests answered in one piece.
    read_deadline: Option<Instant>,
    trace: Vec<(&'static str, HeaderValue)>,
    observed: Arc<Observed>,
    state: AppState,
    model_label: String,
    identity: Identity,
    /// Set by [`Call::admit`].
    ticket: Option<Ticket>,
}

impl Call {
    /// Starts a request: authenticates the caller and settles its id,
    /// deadline and trace context.
    pub(crate) fn begin(parts: &Parts, state: &AppState) -> Result<Call, ApiError> {
        let started = Instant::now();
        let loopback = parts
            .extensions
            .get::<ConnectInfo<SocketAddr>>()
            .is_some_and(|peer| peer.0.ip().is_loopback());
        let authorization = parts
            .headers
            .get(header::AUTHORIZATION)
            .map(HeaderValue::as_bytes);
        let identity = state
            .auth
            .authenticate(authorization, loopback)
            .map_err(|error| {
                metrics::auth_failure(error.reason());
                ApiError::unauthenticated(error.message())
            })?;
        let request_id = parts
            .extensions
            .get::<RequestId>()
            .map(|id| id.0.clone())
            .unwrap_or_else(|| request_id_from(&parts.headers).into());
        let observed = parts
            .extensions
            .get::<Arc<Observed>>()
            .cloned()
            .unwrap_or_default();
        observed.update(|seen| {
            seen.tenant = Some(identity.name().to_string());
            seen.key_id = identity.key_id.clone();
        });
        let mut deadline = started + state.limits.default_timeout;
        for (name, parse) in [
            (
                REQUEST_TIMEOUT,
                parse_seconds_or_duration as fn(&str) -> Option<Duration>,
            ),
            ("grpc-timeout", parse_grpc_timeout),
        ] {
            if let Some(timeout) = timeout_header(&parts.headers, name, parse)? {
                // A bound too far away to represent is no bound.
                if let Some(bound) = started.checked_add(timeout) {
                    deadline = deadline.min(bound);
                }
            }
        }
        let read_deadline = timeout_header(&parts.headers, SDK_READ_TIMEOUT, parse_seconds)?
            .and_then(|timeout| started.checked_add(timeout));
        let trace = TRACE_HEADERS
            .iter()
            .filter_map(|name| Some((*name, parts.headers.get(*name)?.clone())))
            .collect();
        Ok(Call {
            request_id,
            started,
            deadline,
            read_deadline,
            trace,
            observed,
            state: state.clone(),
            model_label: crate::routing::UNKNOWN_MODEL.to_string(),
            identity,
            ticket: None,
        })
    }

    /// The authenticated caller.
    pub(crate) fn identity(&self) -> &Identity {
        &self.identity
    }

    pub(crate) fn request_id(&self) -> &str {
        &self.request_id
    }

    pub(crate) fn started(&self) -> Instant {
        self.started
    }

    /// Names the model the request is for, for logs and metrics (`unknown`
    /// unless a ready worker serves it), and checks that the caller may use
    /// it (403 otherwise).
    pub(crate) fn set_model(&mut self, model: &str) -> Result<(), ApiError> {
        self.model_label = self.state.workers.label(model);
        let label = self.model_label.clone();
        self.observed.update(|seen| seen.model = Some(label));
        if !self.identity.tenant.allows(model) {
            self.state
                .usage
                .rejected(self.identity.name(), &self.model_label, "model_not_allowed");
            return Err(ApiError::model_not_allowed(model));
        }
        Ok(())
    }

    /// Admits a request for `model` that may use about `tokens` tokens
    /// (prompt estimate plus `max_tokens`): the model must be allowed, the
    /// tenant within its limits, and the model's queue must let it through.
    pub(crate) async fn admit(&mut self, model: &str, tokens: u64) -> Result<(), ApiError> {
        self.set_model(model)?;
        // The longest the request may run bounds its concurrency lease (and
        // its wait in the queue, with `max_wait`).
        let deadline = self.deadline(true);
        let admitted = self
            .state
            .admission
            .admit(
                &self.identity.tenant,
                &self.model_label,
                tokens,
                &self.request_id,
                deadline,
            )
            .await;
        match admitted {
            Ok(ticket) => {
                let (rate, usage) = (ticket.windows(), self.state.usage.clone());
                self.observed.update(|seen| {
                    seen.rate = Some(rate);
                    seen.usage = Some(usage);
                });
                self.ticket = Some(ticket);
                Ok(())
            }
            Err(rejection) => {
                let tenant = self.identity.name();
                self.state
                    .usage
                    .rejected(tenant, &self.model_label, rejection.reason());
                if let Rejection::Limited { windows, .. } = &rejection {
                    let windows = *windows;
                    self.observed.update(|seen| seen.rate = Some(windows));
                }
                let message = rejection.message(tenant, &self.model_label);
                Err(if rejection.is_overload() {
                    ApiError::overloaded(message)
                } else {
                    ApiError::rate_limited(message, rejection.retry_after())
                })
            }
        }
    }

    pub(crate) fn model_label(&self) -> &str {
        &self.model_label
    }

    /// When the request must be answered by: the streamed part of a
    /// response only has the client's and the gateway's own bounds.
    pub(crate) fn deadline(&self, streaming: bool) -> Instant {
        match self.read_deadline {
            Some(read) if !streaming => self.deadline.min(read),
            _ => self.deadline,
        }
    }

    /// Who the request is for, as internal services read it.
    pub(crate) fn context(&self) -> pb::RequestContext {
        pb::RequestContext {
            tenant: self.identity.name().to_string(),
            request_id: self.request_id.to_string(),
            priority: self.identity.tenant.priority.to_proto() as i32,
        }
    }

    /// The gRPC request to a worker carrying `message`, bounded by what is
    /// left of the deadline.
    pub(crate) fn upstream<T>(
        &self,
        message: T,
        streaming: bool,
    ) -> Result<tonic::Request<T>, ApiError> {
        let remaining = self
            .deadline(streaming)
            .saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            return Err(ApiError::new(
                ErrorKind::DeadlineExceeded,
                "the request's deadline passed before it reached a worker",
            ));
        }
        if let Some(ticket) = &self.ticket {
            ticket.started();
        }
        let mut request = tonic::Request::new(message);
        request.set_timeout(remaining);
        let metadata = request.metadata_mut();
        if let Ok(id) = MetadataValue::try_from(&*self.request_id) {
            metadata.insert(REQUEST_ID, id);
        }
        for (name, value) in &self.trace {
            if let Ok(value) = MetadataValue::try_from(value.as_bytes()) {
                metadata.insert(MetadataKey::from_static(name), value);
            }
        }
        Ok(request)
    }

    /// Awaits a unary call to a worker within the deadline, mapping its
    /// failure to the client's error.
    pub(crate) async fn unary<T>(
        &self,
        call: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    ) -> Result<T, ApiError> {
        match tokio::time::timeout_at(self.deadline(false).into(), call).await {
            Ok(Ok(response)) => Ok(response.into_inner()),
            Ok(Err(status)) => Err(ApiError::from_status(&status)),
            Err(_) => Err(deadline_exceeded()),
        }
    }

    /// Meters what the worker counted for this request, and charges it
    /// against the tenant's tokens per minute instead of the reservation.
    pub(crate) fn record_usage(&self, usage: Option<&pb::Usage>) {
        if let Some(usage) = usage {
            metrics::tokens(
                &self.model_label,
                usage.prompt_tokens,
                usage.completion_tokens,
            );
            self.state.usage.tokens(
                self.identity.name(),
                &self.model_label,
                usage.prompt_tokens,
                usage.completion_tokens,
            );
            if let Some(ticket) = &self.ticket {
                ticket.settle(u64::from(usage.prompt_tokens) + u64::from(usage.completion_tokens));
            }
        }
    }

    pub(crate) fn state(&self) -> &AppState {
        &self.state
    }
}

/// 504 for a request whose deadline passed while the worker was working.
pub(crate) fn deadline_exceeded() -> ApiError {
    ApiError::new(
        ErrorKind::DeadlineExceeded,
        "the request's deadline passed before the worker answered",
    )
}

impl FromRequestParts<AppState> for Call {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Call, ApiError> {
        Call::begin(parts, state)
    }
}

/// The client's request id when it sent a usable one (up to 128 visible
/// ASCII characters), else a new one.
pub(crate) fn request_id_from(headers: &HeaderMap) -> String {
    headers
        .get(REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .filter(|id| !id.is_empty() && id.len() <= 128 && id.bytes().all(|b| b.is_ascii_graphic()))
        .map_or_else(new_request_id, str::to_string)
}

/// A new request id: this process's random 64-bit prefix and a counter, so
/// ids are unique across replicas without a random draw (a syscall) per
/// request. Ids are for correlation, not secrets.
pub(crate) fn new_request_id() -> String {
    static PREFIX: std::sync::LazyLock<u64> =
        std::sync::LazyLock::new(|| uuid::Uuid::new_v4().as_u64_pair().0);
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("req-{:016x}{n:016x}", *PREFIX)
}

fn timeout_header(
    headers: &HeaderMap,
    name: &'static str,
    parse: fn(&str) -> Option<Duration>,
) -> Result<Option<Duration>, ApiError> {
    let Some(value) = headers.get(name) else {
        return Ok(None);
    };
    let parsed = value
        .to_str()
        .ok()
        .and_then(|v| parse(v.trim()))
        .filter(|d| !d.is_zero());
    match parsed {
        Some(timeout) => Ok(Some(timeout)),
        None => Err(ApiError::bad_request(format!(
            "header {name}: {value:?} is not a timeout; send a positive number of seconds or a \
             duration such as 500ms or 30s"
        ))),
    }
}

fn parse_seconds(value: &str) -> Option<Duration> {
    let seconds: f64 = value.parse().ok()?;
    Duration::try_from_secs_f64(seconds).ok()
}

fn parse_seconds_or_duration(value: &str) -> Option<Duration> {
    parse_seconds(value).or_else(|| humantime::parse_duration(value).ok())
}

/// A request body that must be a JSON object, at most
/// `http.max_body_bytes` long.
#[derive(Debug)]
pub(crate) struct JsonBody(pub(crate) Map<String, Value>);

impl FromRequest<AppState> for JsonBody {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &AppState) -> Result<JsonBody, ApiError> {
        let bytes = read_body(request, state.limits.max_body_bytes).await?;
        Ok(JsonBody(parse_object(&bytes)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_are_distinct_and_share_the_process_prefix() {
        let a = new_request_id();
        let b = new_request_id();
        assert_ne!(a, b);
        assert!(a.starts_with("req-") && a.len() == 4 + 32, "{a}");
        assert_eq!(a[..20], b[..20], "one random prefix per process");
    }

    #[test]
    fn timeouts_read_seconds_and_durations() {
        assert_eq!(parse_seconds("2.5"), Some(Duration::from_millis(2500)));
        assert_eq!(parse_seconds("600.0"), Some(Duration::from_secs(600)));
        assert_eq!(parse_seconds("-1"), None);
        assert_eq!(parse_seconds("inf"), None);
        assert_eq!(parse_seconds("NaN"), None);
        assert!(parse_seconds("1e300").is_none());
        assert!(parse_seconds("1e18").is_some(), "checked when added to now");
        assert_eq!(parse_seconds("soon"), None);
        assert_eq!(
            parse_seconds_or_duration("500ms"),
            Some(Duration::from_millis(500))
        );
        assert_eq!(
            parse_seconds_or_duration("2m"),
            Some(Duration::from_secs(120))
        );
        let mut headers = HeaderMap::new();
        headers.insert(REQUEST_TIMEOUT, HeaderValue::from_static("0"));
        let err = timeout_header(&headers, REQUEST_TIMEOUT, parse_seconds_or_duration).unwrap_err();
        assert_eq!(err.status(), 400);
        assert!(err.message().contains("x-request-timeout"), "{err:?}");
    }

    #[test]
    fn request_ids_are_the_clients_when_usable() {
        let mut headers = HeaderMap::new();
        assert!(request_id_from(&headers).starts_with("req-"));
        headers.insert(REQUEST_ID, HeaderValue::from_static("abc-123"));
        assert_eq!(request_id_from(&headers), "abc-123");
        headers.insert(REQUEST_ID, HeaderValue::from_static("has space"));
        assert!(request_id_from(&headers).starts_with("req-"));
        let long = "x".repeat(129);
        headers.insert(REQUEST_ID, HeaderValue::from_str(&long).unwrap());
        assert!(request_id_from(&headers).starts_with("req-"));
    }
}
