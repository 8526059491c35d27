//! OpenTelemetry traces of real `lmgrid` processes, as a collector receives them. The test
//! runs an OTLP/gRPC trace receiver of its own (the collector's
//! `opentelemetry.proto.collector.trace.v1.TraceService/Export`), points a real
//! `lmgrid worker` and `lmgrid gateway` at it, and sends requests with a W3C `traceparent` of
//! its own through the gateway's REST and gRPC APIs. It then stops both processes and checks
//! that what they flushed on the way out is one trace per request, across both processes:
//! the gateway's request span is a child of the caller's span, and the worker's is a child of
//! a gateway span. An endpoint that cannot be reached stops start-up instead.

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::net::SocketAddr;
use std::process::Command;
use std::sync::{Arc, Mutex};

use common::{PATIENCE, Running, free_addrs, http_get, http_request, lmgrid, run_service};
use lmgrid_proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use lmgrid_proto::inference::model_infer_request::InferInputTensor;
use lmgrid_proto::inference::{InferTensorContents, ModelInferRequest};
use lmgrid_test_support::onnx::{self, ElemType};
use lmgrid_test_support::{EtcdServer, free_port, wait_until};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{KeyValue, any_value};
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use tokio::task::JoinHandle;
use tonic::transport::server::TcpIncoming;

/// The `service.name` each binary exports under (`lmgrid-<service>`).
const GATEWAY: &str = "lmgrid-gateway";
const WORKER: &str = "lmgrid-worker";

/// The span of every incoming request, HTTP and gRPC (`lmgrid_core::telemetry`).
const HTTP_REQUEST: &str = "http.request";
const GRPC_REQUEST: &str = "grpc.request";

/// The worker's method the gateway forwards inference to.
const MODEL_INFER: &str = "/inference.GRPCInferenceService/ModelInfer";

/// The callers' spans: a trace id and a span id each, as a client that traces would send.
const REST_CALLER: (&str, &str) = ("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7");
const GRPC_CALLER: (&str, &str) = ("0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331");

/// `OTEL_BSP_SCHEDULE_DELAY` (milliseconds) for the processes: far longer than the test, so
/// that the spans reach the receiver only when shutdown flushes them, which is what the test
/// means to see. The default would export every 5 s.
const NO_SCHEDULED_EXPORT: &str = "600000";

#[tokio::test(flavor = "multi_thread")]
async fn a_request_is_one_trace_across_gateway_and_worker_at_the_collector() -> anyhow::Result<()> {
    let receiver = Receiver::start()?;
    let etcd = EtcdServer::start().await?;
    let prefix = etcd.unique_prefix("tracing");
    let models = tempfile::tempdir()?;
    let identity = onnx::identity(ElemType::Float, &[4]);
    onnx::model_repository(
        models.path(),
        "identity",
        &[("1", &identity)],
        "max_batch_size: 8\n",
    )?;

    let mut worker = common::worker_command(&etcd, &prefix, "traced-worker", "10s", "0s");
    worker
        .command
        .env("LMGRID__MODEL_REPOSITORY", models.path());
    exporting_to(&mut worker.command, &receiver);
    let mut worker = Running::spawn(&mut worker.command, "lmgrid worker")?;
    // Without API keys (callers on loopback are the tenant `anonymous`) and an admin port.
    let mut gateway = common::gateway_command(&etcd, &prefix, "traced-gateway");
    gateway
        .command
        .env("LMGRID__NODE__ADMIN__ENABLED", "false")
        .env("LMGRID__AUTH__REQUIRED", "false");
    exporting_to(&mut gateway.command, &receiver);
    let (http, grpc) = (gateway.http_addr, gateway.grpc_addr);
    let mut gateway = Running::spawn(&mut gateway.command, "lmgrid gateway")?;
    wait_until(PATIENCE, "the gateway to route to the worker", || async {
        matches!(
            http_get(http, "/v2/models/identity/ready").await,
            Ok((200, _))
        )
    })
    .await?;

    // One request over REST, one over gRPC, each continuing a trace of the caller's.
    let body =
        r#"{"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}"#;
    let rest_traceparent = traceparent(REST_CALLER);
    let (status, answer) = http_request(
        http,
        "POST",
        "/v2/models/identity/infer",
        &[("traceparent", &rest_traceparent)],
        body,
    )
    .await?;
    assert_eq!(status, 200, "{answer}");
    assert!(answer.contains(r#""name":"y""#), "{answer}");

    let channel = tonic::transport::Endpoint::from_shared(format!("http://{grpc}"))?
        .connect()
        .await?;
    let mut request = tonic::Request::new(ModelInferRequest {
        model_name: "identity".to_string(),
        inputs: vec![InferInputTensor {
            name: "x".to_string(),
            datatype: "FP32".to_string(),
            shape: vec![1, 4],
            contents: Some(InferTensorContents {
                fp32_contents: vec![1.0, 2.0, 3.0, 4.0],
                ..Default::default()
            }),
            ..Default::default()
        }],
        ..Default::default()
    });
    request
        .metadata_mut()
        .insert("traceparent", traceparent(GRPC_CALLER).parse()?);
    let answer = GrpcInferenceServiceClient::new(channel)
        .model_infer(request)
        .await?
        .into_inner();
    let y = answer.outputs[0].contents.clone().unwrap_or_default();
    assert_eq!(y.fp32_contents, [1.0, 2.0, 3.0, 4.0]);

    // Shutdown flushes the spans; the gateway first, as traffic would stop. An export returns
    // once the receiver has answered, so what the processes sent is all here when they exit.
    for process in [&mut gateway, &mut worker] {
        process.terminate()?;
        let status = process.exit_status(PATIENCE).await?;
        assert_eq!(status.code(), Some(0), "exited {status} after SIGTERM");
    }
    let spans = receiver.spans();
    println!("{}", listing(&spans));
    check_trace(&spans, REST_CALLER, HTTP_REQUEST);
    check_trace(&spans, GRPC_CALLER, GRPC_REQUEST);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unreachable_otlp_endpoint_stops_start_up_with_status_1() -> anyhow::Result<()> {
    // Nothing listens on a port that was free a moment ago.
    let endpoint = format!("http://127.0.0.1:{}", free_port());
    let expected = format!("cannot reach OTLP endpoint {endpoint}");
    for subcommand in ["worker", "gateway"] {
        let env = [("LMGRID__NODE__TELEMETRY__OTLP_ENDPOINT", endpoint.as_str())];
        let (status, stderr) = run_service(subcommand, None, &env).await?;
        assert_eq!(status.code(), Some(1), "lmgrid {subcommand}: {stderr}");
        assert!(stderr.contains(&expected), "lmgrid {subcommand}: {stderr}");
    }

    let data = tempfile::tempdir()?;
    let [http, grpc] = free_addrs();
    let mut up = lmgrid();
    up.arg("up")
        .arg("--data-dir")
        .arg(data.path().join("lmgrid-data"))
        .args(["--http", &http.to_string(), "--grpc", &grpc.to_string()])
        .arg("--model-repository")
        .arg(data.path())
        .args(["--otlp-endpoint", &endpoint]);
    let mut up = Running::spawn(&mut up, "lmgrid up")?;
    let status = up.exit_status(PATIENCE).await?;
    let stderr = up.stderr();
    assert_eq!(status.code(), Some(1), "lmgrid up: {stderr}");
    assert!(stderr.contains(&expected), "lmgrid up: {stderr}");
    Ok(())
}

/// Checks the trace of the request `caller` sent: the gateway's `entry` span is the caller's
/// span's child, a worker's `ModelInfer` span is a gateway span's child, and every span of
/// the trace descends from the caller's span (none is missing or parented elsewhere).
/// Panics, so that the processes' logs are printed, when it is not so.
fn check_trace(spans: &[ReceivedSpan], caller: (&str, &str), entry: &str) {
    let (trace, caller_span) = caller;
    let trace_spans: Vec<&ReceivedSpan> = spans.iter().filter(|s| s.trace_id == trace).collect();
    let of = |service: &'static str| {
        trace_spans
            .iter()
            .copied()
            .filter(move |s| s.service == service)
    };

    assert!(
        of(GATEWAY).any(|s| s.name == entry
            && s.kind == SpanKind::Server
            && s.parent_span_id == caller_span),
        "trace {trace}: no {GATEWAY} {entry} server span with the caller's span {caller_span} \
         as its parent"
    );
    let gateway_ids: HashSet<&str> = of(GATEWAY).map(|s| s.span_id.as_str()).collect();
    assert!(
        of(WORKER).any(|s| s.name == GRPC_REQUEST
            && s.kind == SpanKind::Server
            && s.attributes.get("rpc.method").map(String::as_str) == Some(MODEL_INFER)
            && gateway_ids.contains(s.parent_span_id.as_str())),
        "trace {trace}: no {WORKER} {GRPC_REQUEST} server span for {MODEL_INFER} with a \
         {GATEWAY} span as its parent"
    );
    let ids: HashSet<&str> = trace_spans.iter().map(|s| s.span_id.as_str()).collect();
    for span in &trace_spans {
        assert!(
            span.parent_span_id == caller_span || ids.contains(span.parent_span_id.as_str()),
            "trace {trace}: the parent of {span} was not received"
        );
    }
}

/// One line per span of the callers' traces, then how many spans of other traces (health
/// checks, readiness polls, the long-lived `node` spans) each service sent, by name.
fn listing(spans: &[ReceivedSpan]) -> String {
    let callers = [REST_CALLER.0, GRPC_CALLER.0];
    let mut lines = vec![format!("{} spans received:", spans.len())];
    let mut others: BTreeMap<(&str, &str), usize> = BTreeMap::new();
    for span in spans {
        if callers.contains(&span.trace_id.as_str()) {
            lines.push(format!("  {span}"));
        } else {
            *others.entry((&span.service, &span.name)).or_default() += 1;
        }
    }
    for ((service, name), count) in others {
        lines.push(format!("  {service} {name}: {count} in other traces"));
    }
    lines.join("\n")
}

/// A W3C `traceparent` for the caller's span, sampled.
fn traceparent((trace, span): (&str, &str)) -> String {
    format!("00-{trace}-{span}-01")
}

/// Makes `command` export its traces to `receiver` and to nothing else.
fn exporting_to(command: &mut Command, receiver: &Receiver) {
    for (key, _) in std::env::vars_os() {
        if key.to_str().is_some_and(|key| key.starts_with("OTEL_")) {
            command.env_remove(key);
        }
    }
    command
        .env(
            "LMGRID__NODE__TELEMETRY__OTLP_ENDPOINT",
            receiver.endpoint(),
        )
        .env("OTEL_BSP_SCHEDULE_DELAY", NO_SCHEDULED_EXPORT);
}

/// One span as the receiver got it, with the `service.name` of the process that sent it.
#[derive(Debug, Clone)]
struct ReceivedSpan {
    service: String,
    name: String,
    kind: SpanKind,
    /// Lowercase hex, as in `traceparent`.
    trace_id: String,
    span_id: String,
    /// Empty for a root span.
    parent_span_id: String,
    /// The attributes with string values.
    attributes: HashMap<String, String>,
}

impl fmt::Display for ReceivedSpan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parent = if self.parent_span_id.is_empty() {
            "none"
        } else {
            &self.parent_span_id
        };
        write!(
            f,
            "{} {} ({}) trace {} span {} parent {parent}",
            self.service,
            self.name,
            self.kind.as_str_name(),
            self.trace_id,
            self.span_id,
        )?;
        for key in ["http.route", "rpc.method"] {
            if let Some(value) = self.attributes.get(key) {
                write!(f, " {key}={value}")?;
            }
        }
        Ok(())
    }
}

/// An OTLP/gRPC trace receiver on a loopback port, keeping every span it is sent; stopped
/// on drop.
struct Receiver {
    addr: SocketAddr,
    spans: Arc<Mutex<Vec<ReceivedSpan>>>,
    server: JoinHandle<Result<(), tonic::transport::Error>>,
}

impl Receiver {
    fn start() -> anyhow::Result<Receiver> {
        let incoming = TcpIncoming::bind(SocketAddr::from(([127, 0, 0, 1], 0)))
            .map_err(|error| anyhow::anyhow!("bind the OTLP receiver: {error}"))?;
        let addr = incoming.local_addr()?;
        let collector = Collector::default();
        let spans = collector.0.clone();
        let server = tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(TraceServiceServer::new(collector))
                .serve_with_incoming(incoming),
        );
        Ok(Receiver {
            addr,
            spans,
            server,
        })
    }

    fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn spans(&self) -> Vec<ReceivedSpan> {
        self.spans.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.server.abort();
    }
}

/// The `TraceService` a collector serves.
#[derive(Debug, Default)]
struct Collector(Arc<Mutex<Vec<ReceivedSpan>>>);

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut received = Vec::new();
        for resource_spans in request.into_inner().resource_spans {
            let resource = resource_spans.resource.unwrap_or_default();
            let service = strings(&resource.attributes)
                .remove("service.name")
                .unwrap_or_default();
            for span in resource_spans
                .scope_spans
                .into_iter()
                .flat_map(|scope| scope.spans)
            {
                received.push(ReceivedSpan {
                    service: service.clone(),
                    kind: SpanKind::try_from(span.kind).unwrap_or(SpanKind::Unspecified),
                    trace_id: hex(&span.trace_id),
                    span_id: hex(&span.span_id),
                    parent_span_id: hex(&span.parent_span_id),
                    attributes: strings(&span.attributes),
                    name: span.name,
                });
            }
        }
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend(received);
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

/// The attributes with string values, by key.
fn strings(attributes: &[KeyValue]) -> HashMap<String, String> {
    attributes
        .iter()
        .filter_map(|attribute| match &attribute.value.as_ref()?.value {
            Some(any_value::Value::StringValue(value)) => {
                Some((attribute.key.clone(), value.clone()))
            }
            _ => None,
        })
        .collect()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}
