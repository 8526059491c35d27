//! Authentication, admission and metering of the public gRPC APIs — the
//! same as `http::call` does for HTTP: the `authorization` metadata
//! (`Bearer <key>`) names the tenant, model RPCs are admitted under its
//! limits and its model allow-list, and usage is settled and metered when
//! the call ends. Refusals are `UNAUTHENTICATED`, `PERMISSION_DENIED`,
//! `RESOURCE_EXHAUSTED` (with `retry-after` metadata in seconds) and
//! `UNAVAILABLE` (the model's queue). Admitted calls and rate-limit refusals
//! carry the tenant's `x-ratelimit-*` windows as metadata, as HTTP responses
//! carry them as headers.

use std::time::{Duration, Instant};

use lmgrid_core::error::ErrorKind;
use lmgrid_proto::lmgrid::v1 as pb;
use tonic::metadata::{MetadataMap, MetadataValue};
use tonic::{Request, Status};

use crate::admission::{Admission, RateWindows, Rejection, Ticket, estimate_tokens, rate_headers};
use crate::auth::{Authenticator, Identity};
use crate::metrics;
use crate::tenancy::Tenancy;
use crate::usage::Usage;

/// How long a gRPC call without a deadline may hold a concurrency slot if
/// its gateway dies.
const DEFAULT_LEASE: Duration = Duration::from_secs(600);

/// The gate every model RPC passes.
#[derive(Debug, Clone)]
pub(crate) struct Gate {
    auth: Authenticator,
    admission: Admission,
    usage: Usage,
}

impl Gate {
    pub(crate) fn new(tenancy: &Tenancy) -> Gate {
        Gate {
            auth: tenancy.auth.clone(),
            admission: tenancy.admission.clone(),
            usage: tenancy.usage.clone(),
        }
    }

    /// The caller of `request`.
    pub(crate) fn authenticate<T>(&self, request: &Request<T>) -> Result<Identity, Status> {
        let loopback = request.remote_addr().is_some_and(|a| a.ip().is_loopback());
        let authorization = request
            .metadata()
            .get("authorization")
            .map(MetadataValue::as_bytes);
        self.auth
            .authenticate(authorization, loopback)
            .map_err(|error| {
                metrics::auth_failure(error.reason());
                Status::unauthenticated(error.message())
            })
    }

    /// Checks that `caller` may use `model` (labelled `label`).
    pub(crate) fn allow(&self, caller: &Identity, model: &str, label: &str) -> Result<(), Status> {
        if caller.tenant.allows(model) {
            return Ok(());
        }
        self.usage
            .rejected(caller.name(), label, "model_not_allowed");
        Err(Status::permission_denied(format!(
            "this API key may not use the model '{model}'"
        )))
    }

    /// Admits a call of `caller` for `model` that may use about `tokens`.
    pub(crate) async fn admit(
        &self,
        caller: &Identity,
        model: &str,
        label: &str,
        tokens: u64,
        request_id: &str,
        deadline: Option<Instant>,
    ) -> Result<Admitted, Status> {
        self.allow(caller, model, label)?;
        let deadline = deadline.unwrap_or_else(|| Instant::now() + DEFAULT_LEASE);
        match self
            .admission
            .admit(&caller.tenant, label, tokens, request_id, deadline)
            .await
        {
            Ok(ticket) => Ok(Admitted {
                ticket,
                tenant: caller.name().to_string(),
                label: label.to_string(),
                usage: self.usage.clone(),
                finished: false,
            }),
            Err(rejection) => {
                self.usage
                    .rejected(caller.name(), label, rejection.reason());
                let message = rejection.message(caller.name(), label);
                let kind = if rejection.is_overload() {
                    ErrorKind::Unavailable
                } else {
                    ErrorKind::ResourceExhausted
                };
                let mut status = kind.status(message);
                if let Some(seconds) = rejection.retry_after() {
                    status
                        .metadata_mut()
                        .insert("retry-after", MetadataValue::from(seconds));
                }
                if let Rejection::Limited { windows, .. } = &rejection {
                    insert_rate_windows(status.metadata_mut(), windows);
                }
                Err(status)
            }
        }
    }
}

/// The `x-ratelimit-*` metadata of `windows` (none for unlimited ones).
pub(crate) fn insert_rate_windows(metadata: &mut MetadataMap, windows: &RateWindows) {
    for (name, value) in rate_headers(windows) {
        if let Ok(value) = MetadataValue::try_from(value) {
            metadata.insert(name, value);
        }
    }
}

/// Fills in who a request is for: the tenant and its priority always come
/// from the key, whatever the caller sent.
pub(crate) fn stamp(caller: &Identity, context: &mut Option<pb::RequestContext>) {
    let context = context.get_or_insert_with(Default::default);
    context.tenant = caller.name().to_string();
    context.priority = caller.tenant.priority.to_proto() as i32;
}

/// The tokens to reserve for a generation request.
pub(crate) fn generation_tokens(request: &pb::GenerateRequest) -> u64 {
    let prompt = match &request.input {
        Some(pb::generate_request::Input::Prompt(text)) => text.len(),
        Some(pb::generate_request::Input::Chat(chat)) => {
            chat.messages.iter().map(|m| m.content.len()).sum()
        }
        None => 0,
    };
    let sampling = request.sampling.clone().unwrap_or_default();
    let completions = u64::from(sampling.max_tokens) * u64::from(sampling.n.max(1));
    estimate_tokens(prompt).saturating_add(completions)
}

/// The tokens to reserve for an embedding request.
pub(crate) fn embedding_tokens(request: &pb::EmbedRequest) -> u64 {
    estimate_tokens(request.inputs.iter().map(String::len).sum())
}

/// An admitted call: metered as one request when finished (as failed when
/// dropped before, e.g. a stream the caller abandoned).
#[derive(Debug)]
pub(crate) struct Admitted {
    ticket: Ticket,
    tenant: String,
    label: String,
    usage: Usage,
    finished: bool,
}

impl Admitted {
    /// The tenant's rate-limit windows as admission left them.
    pub(crate) fn windows(&self) -> RateWindows {
        self.ticket.windows()
    }

    /// The call goes to a worker now.
    pub(crate) fn started(&self) {
        self.ticket.started();
    }

    /// Meters and settles the usage the worker reported.
    pub(crate) fn record_usage(&self, usage: Option<&pb::Usage>) {
        if let Some(usage) = usage {
            self.usage.tokens(
                &self.tenant,
                &self.label,
                usage.prompt_tokens,
                usage.completion_tokens,
            );
            self.ticket
                .settle(u64::from(usage.prompt_tokens) + u64::from(usage.completion_tokens));
        }
    }

    /// Records a unary call's usage (read from its response by `usage`),
    /// adds the rate-limit windows to a successful response's metadata, and
    /// finishes the call, failed when it failed.
    pub(crate) fn settle<T>(
        self,
        response: &mut Result<tonic::Response<T>, tonic::Status>,
        usage: impl FnOnce(&T) -> Option<&pb::Usage>,
    ) {
        if let Ok(response) = response {
            self.record_usage(usage(response.get_ref()));
            insert_rate_windows(response.metadata_mut(), &self.windows());
        }
        self.finish(response.is_err());
    }

    /// Counts the call, failed or not.
    pub(crate) fn finish(mut self, failed: bool) {
        self.finished = true;
        self.usage.request(&self.tenant, &self.label, failed);
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        if !self.finished {
            self.usage.request(&self.tenant, &self.label, true);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reservations_estimate_prompts_and_completions() {
        let request = pb::GenerateRequest {
            input: Some(pb::generate_request::Input::Prompt("12345678".into())),
            sampling: Some(pb::SamplingParams {
                max_tokens: 10,
                n: 2,
                ..Default::default()
            }),
            ..Default::default()
        };
        assert_eq!(generation_tokens(&request), 2 + 20);
        assert_eq!(generation_tokens(&pb::GenerateRequest::default()), 0);
        let embed = pb::EmbedRequest {
            inputs: vec!["abcd".into(), "efghi".into()],
            ..Default::default()
        };
        assert_eq!(embedding_tokens(&embed), 3);
    }
}
