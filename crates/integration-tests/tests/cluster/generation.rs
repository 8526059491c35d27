//! Generation through the gateway, against the scripted generation worker
//! (`scripted_worker`): what the gateway sends (messages, sampling, request id, deadline,
//! trace context), how it shapes answers and streams (OpenAI chunks, server-sent events, gRPC
//! relays), and that a client going away cancels the upstream stream. The real generation
//! engine is the subject of the worker's own tests and of the OpenAI SDK test.

use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::Context as _;
use lmgrid_integration_tests::{SETTLE_TIMEOUT, connect, http_post_json, http_request};
use lmgrid_proto::lmgrid::v1 as pb;
use lmgrid_test_support::{EtcdServer, wait_until};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tonic::{Code, Request};

use crate::openai::{assert_openai_error, json_of};
use crate::scripted_worker::{ANSWER, setup, usage};

/// The JSON of each `data:` event of a server-sent event stream, and whether it ended with
/// `[DONE]`.
fn events(body: &str) -> anyhow::Result<(Vec<Value>, bool)> {
    let mut values = Vec::new();
    let mut done = false;
    for event in body.split("\n\n").filter(|e| !e.trim().is_empty()) {
        let data = event
            .strip_prefix("data: ")
            .with_context(|| format!("not a data event: {event:?}"))?;
        anyhow::ensure!(!done, "an event after [DONE]: {data}");
        if data == "[DONE]" {
            done = true;
        } else {
            values.push(serde_json::from_str(data).with_context(|| data.to_string())?);
        }
    }
    Ok((values, done))
}

fn chat(content: &str, extra: Value) -> String {
    let mut body = json!({
        "model": "scripted-llm",
        "messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": content},
        ],
    });
    if let (Some(body), Value::Object(extra)) = (body.as_object_mut(), extra) {
        body.extend(extra);
    }
    body.to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn chat_and_completions_reach_a_generation_worker() -> anyhow::Result<()> {
    let etcd = EtcdServer::start().await?;
    let setup = setup(&etcd).await?;
    let http = setup.http;

    // Unary chat: the worker gets the conversation, the sampling, the request id, a
    // deadline and the trace context.
    let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let body = chat(
        "What is the capital of France?",
        json!({"temperature": 0, "max_tokens": 20, "seed": 3}),
    );
    let response = http_request(
        http,
        "POST",
        "/v1/chat/completions",
        &[
            ("x-request-id", "chat-1"),
            ("x-request-timeout", "20s"),
            ("traceparent", traceparent),
        ],
        body.as_bytes(),
    )
    .await?;
    assert_eq!(response.status, 200, "{}", response.body);
    let answer = json_of(&response)?;
    assert_eq!(answer["object"], "chat.completion");
    assert!(
        answer["id"]
            .as_str()
            .is_some_and(|id| id.starts_with("chatcmpl-"))
    );
    assert_eq!(answer["model"], "scripted-llm");
    assert_eq!(
        answer["choices"],
        json!([{"index": 0, "message": {"role": "assistant", "content": ANSWER.concat()},
                "logprobs": null, "finish_reason": "stop"}])
    );
    assert_eq!(
        answer["usage"],
        json!({"prompt_tokens": 9, "completion_tokens": 7, "total_tokens": 16})
    );
    let (request, metadata) = setup.seen.last();
    let Some(pb::generate_request::Input::Chat(conversation)) = &request.input else {
        panic!("not a chat: {request:?}");
    };
    let roles: Vec<&str> = conversation
        .messages
        .iter()
        .map(|m| m.role.as_str())
        .collect();
    assert_eq!(roles, ["system", "user"]);
    let sampling = request.sampling.clone().unwrap_or_default();
    assert_eq!(
        (sampling.temperature, sampling.max_tokens, sampling.seed),
        (Some(0.0), 20, Some(3))
    );
    assert_eq!(
        request.context.map(|c| c.request_id),
        Some("chat-1".to_string())
    );
    assert_eq!(
        metadata.get("x-request-id").map(|v| v.to_str().ok()),
        Some(Some("chat-1"))
    );
    assert_eq!(
        metadata.get("traceparent").map(|v| v.to_str().ok()),
        Some(Some(traceparent))
    );
    let timeout = metadata
        .get("grpc-timeout")
        .and_then(|v| v.to_str().ok())
        .and_then(lmgrid_core::deadline::parse_grpc_timeout)
        .context("no deadline reached the worker")?;
    assert!(
        timeout <= Duration::from_secs(20) && timeout > Duration::from_secs(10),
        "{timeout:?}"
    );

    // Unary completion; without max_tokens the model's default applies (0 on the wire).
    let body = json!({"model": "scripted-llm", "prompt": "The capital of France is", "n": 2});
    let response = http_post_json(http, "/v1/completions", &body.to_string()).await?;
    assert_eq!(response.status, 200, "{}", response.body);
    let answer = json_of(&response)?;
    assert_eq!(answer["object"], "text_completion");
    assert_eq!(answer["choices"][1]["text"], ANSWER.concat());
    assert_eq!(answer["choices"][1]["finish_reason"], "stop");
    let (request, _) = setup.seen.last();
    assert_eq!(
        request.input,
        Some(pb::generate_request::Input::Prompt(
            "The capital of France is".into()
        ))
    );
    let sampling = request.sampling.unwrap_or_default();
    assert_eq!((sampling.max_tokens, sampling.n), (0, 2));

    // A streamed chat with usage: the role first, the text, the finish, the usage, [DONE].
    let body = chat(
        "Stream it",
        json!({"stream": true, "stream_options": {"include_usage": true}}),
    );
    let response = http_post_json(http, "/v1/chat/completions", &body).await?;
    assert_eq!(response.status, 200, "{}", response.body);
    assert_eq!(response.header("content-type"), Some("text/event-stream"));
    let (chunks, done) = events(&response.body)?;
    assert!(done, "no [DONE]: {}", response.body);
    assert_eq!(chunks[0]["object"], "chat.completion.chunk");
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(text, ANSWER.concat());
    let finishes: Vec<&Value> = chunks
        .iter()
        .map(|c| &c["choices"][0]["finish_reason"])
        .filter(|f| !f.is_null())
        .collect();
    assert_eq!(finishes, [&json!("stop")]);
    let last = chunks.last().context("no chunks")?;
    assert_eq!(last["choices"], json!([]));
    assert_eq!(last["usage"]["total_tokens"], 16);
    assert!(chunks.iter().all(|c| c["id"] == chunks[0]["id"]));

    // A streamed completion without usage.
    let body = json!({"model": "scripted-llm", "prompt": "Say", "stream": true});
    let response = http_post_json(http, "/v1/completions", &body.to_string()).await?;
    let (chunks, done) = events(&response.body)?;
    assert!(done);
    assert!(
        chunks
            .iter()
            .all(|c| c["object"] == "text_completion" && c.get("usage").is_none())
    );
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["text"].as_str())
        .collect();
    assert_eq!(text, ANSWER.concat());

    // A refusal before the first message is an HTTP error; a failure later is an error event.
    let response = http_post_json(
        http,
        "/v1/chat/completions",
        &chat("refuse", json!({"stream": true})),
    )
    .await?;
    assert_openai_error(&response, 400, "invalid_argument", None, "refuses")?;
    let response = http_post_json(
        http,
        "/v1/chat/completions",
        &chat("fail midway", json!({"stream": true})),
    )
    .await?;
    assert_eq!(response.status, 200);
    let (chunks, done) = events(&response.body)?;
    assert!(
        !done,
        "a failed stream must not end with [DONE]: {}",
        response.body
    );
    let error = &chunks.last().context("no events")?["error"];
    assert_eq!(error["code"], "resource_exhausted", "{}", response.body);
    assert!(
        error["message"]
            .as_str()
            .is_some_and(|m| m.contains("KV cache"))
    );

    // An embedding model cannot chat.
    let body = json!({"model": "scripted-embedder", "prompt": "x"});
    let response = http_post_json(http, "/v1/completions", &body.to_string()).await?;
    assert_openai_error(
        &response,
        400,
        "invalid_argument",
        Some("model"),
        "an embedding model",
    )?;

    // The gateway timed the streamed text.
    let metrics =
        lmgrid_integration_tests::http_get(setup.sandbox.node("gateway").admin_addr(), "/metrics")
            .await?;
    for needle in [
        r#"lmgrid_gateway_time_to_first_token_seconds_count{model="scripted-llm"}"#,
        r#"lmgrid_gateway_inter_token_latency_seconds_count{model="scripted-llm"}"#,
        r#"lmgrid_gateway_completion_tokens_total{model="scripted-llm"}"#,
        r#"route="/v1/chat/completions",status="400""#,
    ] {
        assert!(
            metrics.body.contains(needle),
            "{needle} not in {}",
            metrics.body
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_that_goes_away_cancels_the_upstream_stream() -> anyhow::Result<()> {
    let etcd = EtcdServer::start().await?;
    let setup = setup(&etcd).await?;

    // Over HTTP: read the first event, then hang up.
    let mut stream = tokio::net::TcpStream::connect(setup.http).await?;
    let body = chat("forever", json!({"stream": true}));
    let request = format!(
        "POST /v1/chat/completions HTTP/1.0\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await?;
    let mut received = Vec::new();
    while !String::from_utf8_lossy(&received).contains("tick") {
        let mut buffer = [0u8; 1024];
        let read = tokio::time::timeout(SETTLE_TIMEOUT, stream.read(&mut buffer)).await??;
        anyhow::ensure!(
            read > 0,
            "the stream ended: {}",
            String::from_utf8_lossy(&received)
        );
        received.extend_from_slice(&buffer[..read]);
    }
    drop(stream);
    let seen = setup.seen.clone();
    wait_until(
        SETTLE_TIMEOUT,
        "the worker to see the HTTP stream cancelled",
        || {
            let seen = seen.clone();
            async move { seen.cancelled.load(Ordering::SeqCst) == 1 }
        },
    )
    .await?;

    // Over gRPC: read two messages, then drop the stream.
    let channel = connect(setup.sandbox.node("gateway").grpc_addr()).await?;
    let mut client = pb::generation_service_client::GenerationServiceClient::new(channel);
    let request = pb::GenerateRequest {
        model: Some(pb::ModelRef {
            name: "scripted-llm".into(),
            version: String::new(),
        }),
        input: Some(pb::generate_request::Input::Prompt("forever".into())),
        ..Default::default()
    };
    let mut deltas = client.generate_stream(request).await?.into_inner();
    for _ in 0..2 {
        let message = deltas.message().await?.context("the stream ended")?;
        assert_eq!(message.text_delta, "tick ");
    }
    drop(deltas);
    wait_until(
        SETTLE_TIMEOUT,
        "the worker to see the gRPC stream cancelled",
        || {
            let seen = seen.clone();
            async move { seen.cancelled.load(Ordering::SeqCst) == 2 }
        },
    )
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_that_goes_away_cancels_the_upstream_unary_call() -> anyhow::Result<()> {
    let etcd = EtcdServer::start().await?;
    let setup = setup(&etcd).await?;
    let seen = setup.seen.clone();
    let cancelled = |n: usize, what: &'static str| {
        let seen = seen.clone();
        wait_until(SETTLE_TIMEOUT, what, move || {
            let seen = seen.clone();
            async move { seen.cancelled.load(Ordering::SeqCst) == n }
        })
    };
    let reached = |n: usize| {
        let seen = seen.clone();
        wait_until(
            SETTLE_TIMEOUT,
            "the request to reach the worker",
            move || {
                let seen = seen.clone();
                async move { seen.requests.lock().unwrap().len() == n }
            },
        )
    };

    // Over HTTP: send a unary completion the worker never answers, then hang up.
    let mut stream = tokio::net::TcpStream::connect(setup.http).await?;
    let body = chat("forever", json!({}));
    let request = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: gateway\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await?;
    reached(1).await?;
    drop(stream);
    cancelled(1, "the worker to see the HTTP call cancelled").await?;

    // Over gRPC: a unary Generate whose caller gives up.
    let channel = connect(setup.sandbox.node("gateway").grpc_addr()).await?;
    let mut client = pb::generation_service_client::GenerationServiceClient::new(channel);
    let request = pb::GenerateRequest {
        model: Some(pb::ModelRef {
            name: "scripted-llm".into(),
            version: String::new(),
        }),
        input: Some(pb::generate_request::Input::Prompt("forever".into())),
        ..Default::default()
    };
    let call = tokio::spawn(async move { client.generate(request).await });
    reached(2).await?;
    call.abort();
    cancelled(2, "the worker to see the gRPC call cancelled").await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn the_gateway_forwards_generation_over_grpc() -> anyhow::Result<()> {
    let etcd = EtcdServer::start().await?;
    let setup = setup(&etcd).await?;
    let channel = connect(setup.sandbox.node("gateway").grpc_addr()).await?;
    let mut client = pb::generation_service_client::GenerationServiceClient::new(channel);
    let request = |model: &str, include_usage: bool| pb::GenerateRequest {
        model: Some(pb::ModelRef {
            name: model.into(),
            version: String::new(),
        }),
        input: Some(pb::generate_request::Input::Prompt("Hello".into())),
        include_usage,
        ..Default::default()
    };

    let mut unary = Request::new(request("scripted-llm", false));
    unary.set_timeout(Duration::from_secs(7));
    unary
        .metadata_mut()
        .insert("x-request-id", "grpc-1".parse()?);
    let response = client.generate(unary).await?;
    assert_eq!(
        response
            .metadata()
            .get("x-request-id")
            .map(|v| v.to_str().ok()),
        Some(Some("grpc-1"))
    );
    let response = response.into_inner();
    assert_eq!(response.completions[0].text, ANSWER.concat());
    assert_eq!(response.usage, Some(usage(1)));
    let (seen, metadata) = setup.seen.last();
    assert_eq!(
        seen.context.map(|c| c.request_id),
        Some("grpc-1".to_string())
    );
    let timeout = metadata
        .get("grpc-timeout")
        .and_then(|v| v.to_str().ok())
        .and_then(lmgrid_core::deadline::parse_grpc_timeout)
        .context("no deadline reached the worker")?;
    assert!(timeout <= Duration::from_secs(7), "{timeout:?}");

    // Streams are relayed; usage only when asked for, though the gateway always meters it.
    for include_usage in [false, true] {
        let mut deltas = client
            .generate_stream(request("scripted-llm", include_usage))
            .await?
            .into_inner();
        let mut text = String::new();
        let mut last = None;
        while let Some(message) = deltas.message().await? {
            text.push_str(&message.text_delta);
            last = Some(message);
        }
        assert_eq!(text, ANSWER.concat());
        let last = last.context("no messages")?;
        assert_eq!(last.finish_reason(), pb::FinishReason::Stop);
        assert_eq!(last.usage.is_some(), include_usage);
        let (seen, _) = setup.seen.last();
        assert!(seen.include_usage, "the gateway asks for usage to meter it");
    }

    let status = client
        .generate(request("scripted-embedder", false))
        .await
        .expect_err("an embedding model");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(
        status
            .message()
            .contains("serves embedding, not generation"),
        "{status:?}"
    );
    let status = client
        .generate_stream(request("nope", false))
        .await
        .err()
        .context("an unknown model")?;
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    Ok(())
}
