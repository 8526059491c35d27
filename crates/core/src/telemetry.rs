//! One telemetry set-up for every binary: `tracing` with an env filter, plain
//! or JSON logs, and OpenTelemetry traces exported over OTLP/gRPC when an
//! endpoint is configured. W3C trace context crosses every gRPC and HTTP hop
//! through the helpers here.

use std::time::Duration;

use opentelemetry::propagation::{Extractor, Injector};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::config::{LogFormat, TelemetryConfig};
use crate::{Error, Result};

/// Keeps the trace exporter alive; [`Telemetry::shutdown`] flushes it.
#[derive(Debug)]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

/// Installs the global subscriber and, when `otlp_endpoint` is set, the OTLP
/// trace exporter. Fails loudly — rather than running blind — when the
/// endpoint is configured but cannot be reached or the exporter cannot start.
pub async fn init(config: &TelemetryConfig, service_name: &str) -> Result<Telemetry> {
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());

    let filter = match std::env::var("RUST_LOG") {
        Ok(directives) if !directives.is_empty() => EnvFilter::try_new(&directives)
            .map_err(|e| Error::Telemetry(format!("RUST_LOG: {e}")))?,
        _ => EnvFilter::try_new(&config.log_filter)
            .map_err(|e| Error::Telemetry(format!("log_filter: {e}")))?,
    };
    let fmt = match config.log_format {
        LogFormat::Plain => tracing_subscriber::fmt::layer().with_target(true).boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .boxed(),
    };

    let provider = match &config.otlp_endpoint {
        Some(endpoint) => Some(otlp_provider(endpoint, service_name).await?),
        None => None,
    };
    let otel = provider
        .as_ref()
        .map(|p| tracing_opentelemetry::layer().with_tracer(p.tracer(service_name.to_string())));

    tracing_subscriber::registry()
        .with(filter)
        .with(fmt)
        .with(otel)
        .try_init()
        .map_err(|e| Error::Telemetry(format!("install subscriber: {e}")))?;
    if let Some(endpoint) = &config.otlp_endpoint {
        tracing::info!(endpoint, "exporting traces over OTLP");
    }
    Ok(Telemetry { provider })
}

async fn otlp_provider(endpoint: &str, service_name: &str) -> Result<SdkTracerProvider> {
    use opentelemetry_otlp::WithExportConfig;

    // The exporter connects lazily; check the collector answers now so that a
    // wrong endpoint stops start-up instead of silently dropping every span.
    let authority = endpoint
        .trim_start_matches("http://")
        .trim_start_matches("https://")
        .trim_end_matches('/');
    match tokio::time::timeout(
        Duration::from_secs(3),
        tokio::net::TcpStream::connect(authority),
    )
    .await
    {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => {
            return Err(Error::Telemetry(format!(
                "cannot reach OTLP endpoint {endpoint}: {e}"
            )));
        }
        Err(_) => {
            return Err(Error::Telemetry(format!(
                "cannot reach OTLP endpoint {endpoint}: timed out"
            )));
        }
    }
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint)
        .build()
        .map_err(|e| Error::Telemetry(format!("start OTLP exporter for {endpoint}: {e}")))?;
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name(service_name.to_string())
        .build();
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource)
        .build();
    opentelemetry::global::set_tracer_provider(provider.clone());
    Ok(provider)
}

impl Telemetry {
    /// Flushes buffered spans; the last step of shutdown.
    pub fn shutdown(self) {
        if let Some(provider) = self.provider
            && let Err(error) = provider.shutdown()
        {
            eprintln!("flush traces: {error}");
        }
    }
}

struct HeaderInjector<'a>(&'a mut http::HeaderMap);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(name), Ok(value)) = (
            http::HeaderName::from_bytes(key.as_bytes()),
            http::HeaderValue::from_str(&value),
        ) {
            self.0.insert(name, value);
        }
    }
}

struct HeaderExtractor<'a>(&'a http::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

/// Writes the current span's trace context (`traceparent`, `tracestate`) into
/// outgoing HTTP headers or gRPC metadata (which travel as HTTP/2 headers).
pub fn inject_context(headers: &mut http::HeaderMap) {
    let context = tracing::Span::current().context();
    opentelemetry::global::get_text_map_propagator(|propagator| {
        propagator.inject_context(&context, &mut HeaderInjector(headers));
    });
}

/// Reads the caller's trace context from incoming headers.
pub fn extract_context(headers: &http::HeaderMap) -> opentelemetry::Context {
    opentelemetry::global::get_text_map_propagator(|propagator| {
        propagator.extract(&HeaderExtractor(headers))
    })
}

/// A span for one incoming gRPC request, child of the caller's trace; for
/// tonic's `Server::builder().trace_fn`.
pub fn grpc_request_span(request: &http::Request<()>) -> tracing::Span {
    let span = tracing::info_span!(
        "grpc.request",
        otel.kind = "server",
        rpc.system = "grpc",
        rpc.method = %request.uri().path(),
    );
    // Without an OpenTelemetry layer there is no trace to join; that is fine.
    let _ = span.set_parent(extract_context(request.headers()));
    span
}

/// A span for one incoming HTTP request, child of the caller's trace (its
/// `traceparent` header). `route` is the matched route template, so that span
/// names stay few.
pub fn http_request_span(
    method: &http::Method,
    route: &str,
    request_id: &str,
    headers: &http::HeaderMap,
) -> tracing::Span {
    let span = tracing::info_span!(
        "http.request",
        otel.kind = "server",
        http.request.method = %method,
        http.route = route,
        request_id,
    );
    let _ = span.set_parent(extract_context(headers));
    span
}

/// Propagates the current trace context on every outgoing gRPC call:
/// `Client::with_interceptor(channel, TraceContextInterceptor)`.
#[derive(Debug, Clone, Copy, Default)]
pub struct TraceContextInterceptor;

impl tonic::service::Interceptor for TraceContextInterceptor {
    fn call(&mut self, request: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        let (metadata, extensions, message) = request.into_parts();
        let mut headers = metadata.into_headers();
        inject_context(&mut headers);
        Ok(tonic::Request::from_parts(
            tonic::metadata::MetadataMap::from_headers(headers),
            extensions,
            message,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extract_reads_a_w3c_traceparent() {
        use opentelemetry::trace::TraceContextExt;

        opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
        let mut headers = http::HeaderMap::new();
        headers.insert(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
                .parse()
                .unwrap(),
        );
        let context = extract_context(&headers);
        let span = context.span();
        let span_context = span.span_context();
        assert!(span_context.is_valid());
        assert_eq!(
            span_context.trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert!(span_context.is_remote());
    }

    #[test]
    fn inject_writes_what_extract_reads() {
        use opentelemetry::trace::{SpanContext, TraceContextExt, TraceFlags, TraceState};
        use opentelemetry::trace::{SpanId, TraceId};

        opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
        let context = opentelemetry::Context::new().with_remote_span_context(SpanContext::new(
            TraceId::from_hex("0af7651916cd43dd8448eb211c80319c").unwrap(),
            SpanId::from_hex("b7ad6b7169203331").unwrap(),
            TraceFlags::SAMPLED,
            true,
            TraceState::default(),
        ));
        let mut headers = http::HeaderMap::new();
        opentelemetry::global::get_text_map_propagator(|p| {
            p.inject_context(&context, &mut HeaderInjector(&mut headers));
        });
        assert_eq!(
            headers["traceparent"],
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
        );
        let back = extract_context(&headers);
        assert_eq!(
            back.span().span_context().span_id().to_string(),
            "b7ad6b7169203331"
        );
    }
}
