//! The public HTTP server: the OpenAI-compatible API under `/v1`, the Open
//! Inference Protocol's REST API under `/v2`, JSON errors in each family's
//! shape for everything else, and one middleware around every route that
//! gives each request an id (`x-request-id`, both ways), a span joined to the
//! caller's trace, an access-log line and the request metrics — taken when
//! the response body ends, so streams count whole.

pub(crate) mod call;
pub(crate) mod encoding;
pub(crate) mod error;
pub(crate) mod forward;
pub(crate) mod json;

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{MatchedPath, Request};
use axum::http::{HeaderValue, Method, Uri};
use axum::middleware::{Next, from_fn};
use axum::response::Response;
use http_body::{Body as _, Frame, SizeHint};
use lmgrid_core::health::Readiness;
use lmgrid_core::telemetry;
use tracing::Instrument;

use self::call::{Observed, REQUEST_ID, RequestId, request_id_from};
use self::error::{ApiError, Shape};
use crate::admission::{Admission, rate_headers};
use crate::auth::Authenticator;
use crate::metrics;
use crate::routing::Workers;
use crate::usage::Usage;

/// What every handler shares.
#[derive(Debug, Clone)]
pub(crate) struct AppState {
    pub(crate) workers: Arc<Workers>,
    pub(crate) readiness: Readiness,
    pub(crate) limits: Limits,
    pub(crate) auth: Authenticator,
    pub(crate) admission: Admission,
    pub(crate) usage: Usage,
}

/// The request limits and the answer compression switch of `http.*` in the
/// gateway's config.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    pub(crate) max_body_bytes: usize,
    pub(crate) max_tokens_cap: u32,
    pub(crate) default_timeout: Duration,
    pub(crate) compress_responses: bool,
}

/// Routes whose requests are probes and scrapes, not traffic: no metrics,
/// and their log lines at debug level.
const ADMIN_ROUTES: [&str; 3] = ["/livez", "/readyz", "/metrics"];

/// The public router; `admin` (`/livez`, `/readyz`, `/metrics`, and the
/// admin API when configured so) is served beside the APIs when given.
pub(crate) fn router(state: AppState, admin: Option<Router>) -> Router {
    let openai = crate::openai::routes().layer(from_fn(|request: Request, next: Next| {
        error::render(Shape::OpenAi, request, next)
    }));
    let oip = crate::oip_rest::routes().layer(from_fn(|request: Request, next: Next| {
        error::render(Shape::Oip, request, next)
    }));
    let mut apis = Router::new().merge(openai).merge(oip);
    if state.limits.compress_responses {
        apis = apis.layer(from_fn(encoding::compress));
    }
    let mut router = apis.fallback(no_route).with_state(state);
    if let Some(admin) = admin {
        router = router.merge(admin);
    }
    router.layer(from_fn(observe))
}

async fn no_route(method: Method, uri: Uri) -> Response {
    let path = uri.path();
    let error = ApiError::no_route(method.as_str(), path);
    let mut response = error.render(Shape::of_path(path));
    response.extensions_mut().insert(error);
    response
}

/// Gives the request its id and span, and observes its response to the end.
async fn observe(mut request: Request, next: Next) -> Response {
    let started = Instant::now();
    let request_id: Arc<str> = request_id_from(request.headers()).into();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", MatchedPath::as_str)
        .to_string();
    let method = request.method().clone();
    let observed = Arc::new(Observed::default());
    request
        .extensions_mut()
        .insert(RequestId(request_id.clone()));
    request.extensions_mut().insert(observed.clone());
    // The admin API logs its own requests (when served on this port too).
    let admin = ADMIN_ROUTES.contains(&route.as_str()) || route.starts_with("/admin/");
    let in_flight = (!admin).then(metrics::InFlight::start);
    let span = telemetry::http_request_span(&method, &route, &request_id, request.headers());

    let mut response = next.run(request).instrument(span).await;
    if let Ok(value) = HeaderValue::from_str(&request_id) {
        response.headers_mut().insert(REQUEST_ID, value);
    }
    if let Some(windows) = observed.seen().rate {
        for (name, value) in rate_headers(&windows) {
            if let Ok(value) = HeaderValue::from_str(&value) {
                response.headers_mut().insert(name, value);
            }
        }
    }
    let done = Done {
        method,
        route,
        request_id,
        observed,
        started,
        status: response.status().as_u16(),
        admin,
        _in_flight: in_flight,
    };
    response.map(|inner| {
        Body::new(ObservedBody {
            inner,
            done: Some(done),
        })
    })
}

/// What is logged and counted once a response has ended.
struct Done {
    method: Method,
    route: String,
    request_id: Arc<str>,
    observed: Arc<Observed>,
    started: Instant,
    status: u16,
    admin: bool,
    _in_flight: Option<metrics::InFlight>,
}

impl Done {
    /// `completed` is false when the client went away before the end.
    fn finish(self, completed: bool) {
        let elapsed = self.started.elapsed();
        let seen = self.observed.seen();
        let model = seen.model.unwrap_or_default();
        let tenant = seen.tenant.unwrap_or_default();
        let key_id = seen.key_id.unwrap_or_default();
        let duration_us = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
        if self.admin {
            tracing::debug!(
                method = %self.method, route = %self.route, status = self.status,
                duration_us, request_id = %self.request_id, "request"
            );
            return;
        }
        metrics::request(&self.route, &model, self.status, elapsed);
        if let Some(usage) = seen.usage {
            usage.request(&tenant, &model, self.status >= 400);
        }
        tracing::info!(
            target: "lmgrid_gateway::access",
            method = %self.method,
            route = %self.route,
            model = %model,
            tenant = %tenant,
            key_id = %key_id,
            status = self.status,
            duration_us,
            completed,
            request_id = %self.request_id,
            "request"
        );
    }
}

/// A response body that finishes its request's observation when it ends or
/// is dropped (the client went away).
struct ObservedBody {
    inner: Body,
    done: Option<Done>,
}

impl http_body::Body for ObservedBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(None) = polled
            && let Some(done) = self.done.take()
        {
            done.finish(true);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for ObservedBody {
    fn drop(&mut self) {
        if let Some(done) = self.done.take() {
            let completed = self.inner.is_end_stream();
            done.finish(completed);
        }
    }
}
