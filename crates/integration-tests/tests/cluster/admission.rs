//! Admission across gateway replicas sharing one Redis: requests and tokens per minute and
//! requests in flight hold across replicas, refusals are 429 with `Retry-After` and OpenAI's
//! `x-ratelimit-*` headers (RESOURCE_EXHAUSTED over gRPC, with the same as metadata, which
//! admitted gRPC calls carry too), a Redis outage makes each gateway
//! limit on its own share of each limit (failing open, said in its metrics) until Redis is
//! back, usage adds up the same on every replica, and a model's queue at a gateway is bounded
//! in size and in time (503 `model_overloaded`).

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context as _;
use lmgrid_gateway::{AdmissionConfig, RedisConfig};
use lmgrid_integration_tests::{HttpResponse, SETTLE_TIMEOUT, Sandbox, TcpProxy, http_get};
use lmgrid_proto::lmgrid::v1 as pb;
use lmgrid_proto::lmgrid::v1::generation_service_client::GenerationServiceClient;
use lmgrid_test_support::{EtcdServer, RedisServer, wait_until};
use serde_json::{Value, json};
use tonic::metadata::MetadataValue;

use crate::openai::{assert_openai_error, json_of};
use crate::scripted_worker::{Setup, register};
use crate::tenants::{admin, create_tenant, required_auth, with_key};

/// Admission through the Redis at `addr`, under a key prefix no other test uses.
fn shared_admission(redis: &RedisServer, addr: SocketAddr) -> AdmissionConfig {
    AdmissionConfig {
        redis: Some(RedisConfig {
            url: format!("redis://{addr}"),
            key_prefix: format!("{}:", redis.unique_prefix("gw")),
            retry_interval: Duration::from_millis(200),
            ..RedisConfig::default()
        }),
        ..AdmissionConfig::default()
    }
}

/// The Redis server's own address.
fn redis_addr(redis: &RedisServer) -> anyhow::Result<SocketAddr> {
    let authority = redis.url().trim_start_matches("redis://");
    authority
        .rsplit('@')
        .next()
        .and_then(|a| a.split('/').next())
        .context("no address in the redis url")?
        .parse()
        .context("the redis url names no socket address")
}

/// Two gateways requiring keys and sharing `admission`, with the scripted worker, and the
/// key of a tenant created with `tenant`; returns once both gateways list the model.
async fn two_gateways(
    etcd: &EtcdServer,
    admission: AdmissionConfig,
    tenant: Value,
) -> anyhow::Result<(Setup, [SocketAddr; 2], String)> {
    let sandbox = Sandbox::builder(etcd)
        .gateway_auth(required_auth())
        .gateway_admission(admission)
        .gateway()
        .gateway()
        .build()
        .await?;
    let setup = register(sandbox).await?;
    let gateways = setup.sandbox.nodes("gateway");
    let http = [gateways[0].http_addr(), gateways[1].http_addr()];
    let key = create_tenant(gateways[0].admin_addr(), tenant).await?;
    for addr in http {
        let key = key.clone();
        wait_until(
            SETTLE_TIMEOUT,
            "the gateway to know the key and the model",
            || {
                let key = key.clone();
                async move {
                    with_key(addr, &key, "GET", "/v1/models", &Value::Null)
                        .await
                        .is_ok_and(|r| r.status == 200 && r.body.contains("scripted-llm"))
                }
            },
        )
        .await?;
    }
    Ok((setup, http, key))
}

fn chat(max_tokens: u32) -> Value {
    json!({"model": "scripted-llm", "messages": [{"role": "user", "content": "hi"}], "max_tokens": max_tokens})
}

async fn ask(http: SocketAddr, key: &str) -> anyhow::Result<HttpResponse> {
    with_key(http, key, "POST", "/v1/chat/completions", &chat(20)).await
}

#[tokio::test(flavor = "multi_thread")]
async fn two_gateways_share_one_budget_and_one_usage_in_redis() -> anyhow::Result<()> {
    let (etcd, redis) = tokio::try_join!(EtcdServer::start(), RedisServer::start())?;
    let admission = shared_admission(&redis, redis_addr(&redis)?);
    let tenant = json!({"name": "acme", "requests_per_minute": 4, "tokens_per_minute": 0});
    let (setup, [a, b], key) = two_gateways(&etcd, admission, tenant).await?;

    // Four requests per minute in all, whichever gateway takes them.
    for (i, gateway) in [a, b, a, b].into_iter().enumerate() {
        let response = ask(gateway, &key).await?;
        assert_eq!(response.status, 200, "{}", response.body);
        assert_eq!(response.header("x-ratelimit-limit-requests"), Some("4"));
        let left = (3 - i).to_string();
        assert_eq!(
            response.header("x-ratelimit-remaining-requests"),
            Some(left.as_str())
        );
        assert!(response.header("x-ratelimit-reset-requests").is_some());
        assert!(
            response.header("x-ratelimit-limit-tokens").is_none(),
            "tokens are unlimited"
        );
    }
    for gateway in [a, b] {
        let response = ask(gateway, &key).await?;
        assert_openai_error(
            &response,
            429,
            "rate_limit_exceeded",
            None,
            "4 requests per minute",
        )?;
        assert_eq!(json_of(&response)?["error"]["type"], "rate_limit_error");
        let retry: u64 = response
            .header("retry-after")
            .context("no retry-after")?
            .parse()?;
        assert!((1..=15).contains(&retry), "retry after {retry}");
        assert_eq!(response.header("x-ratelimit-remaining-requests"), Some("0"));
    }

    // Tokens per minute: 21 reserved a request (the prompt and max_tokens), settled to the
    // 16 the worker counts; a third request cannot fit in 50 either way.
    let tokens = create_tenant(
        setup.sandbox.nodes("gateway")[1].admin_addr(),
        json!({"name": "tokens", "tokens_per_minute": 50}),
    )
    .await?;
    crate::tenants::wait_for_key(a, &tokens, 200).await?;
    for gateway in [a, b] {
        let response = ask(gateway, &tokens).await?;
        assert_eq!(response.status, 200, "{}", response.body);
        assert_eq!(response.header("x-ratelimit-limit-tokens"), Some("50"));
    }
    let response = ask(a, &tokens).await?;
    assert_openai_error(&response, 429, "rate_limit_exceeded", None, "50 tokens")?;
    let too_big = with_key(b, &tokens, "POST", "/v1/chat/completions", &chat(100)).await?;
    assert_openai_error(
        &too_big,
        429,
        "rate_limit_exceeded",
        None,
        "ask for fewer tokens",
    )?;
    assert!(
        too_big.header("retry-after").is_none(),
        "waiting would not help"
    );

    // Usage adds up in Redis: every replica reports the same totals.
    let want = |body: &Value| {
        let totals = &body["totals"];
        totals["requests"] == 4
            && totals["prompt_tokens"] == 36
            && totals["completion_tokens"] == 28
            && totals["rejected"]["requests_per_minute"] == 2
    };
    for gateway in [a, b] {
        let key = key.clone();
        wait_until(SETTLE_TIMEOUT, "usage to add up", || {
            let key = key.clone();
            async move {
                let Ok(response) = with_key(gateway, &key, "GET", "/v1/usage", &Value::Null).await
                else {
                    return false;
                };
                json_of(&response).is_ok_and(|body| want(&body) && body["source"] == "shared")
            }
        })
        .await?;
    }
    let usage = with_key(b, &key, "GET", "/v1/usage", &Value::Null).await?;
    let body = json_of(&usage)?;
    assert_eq!(body["tenant"], "acme");
    assert_eq!(body["models"]["scripted-llm"]["total_tokens"], 64, "{body}");
    let all = admin(
        setup.sandbox.nodes("gateway")[0].admin_addr(),
        "GET",
        "/admin/v1/usage",
        Value::Null,
    )
    .await?;
    let all = json_of(&all)?;
    let acme = all["data"]
        .as_array()
        .and_then(|d| d.iter().find(|t| t["tenant"] == "acme"))
        .context("acme is not in the admin usage")?;
    assert_eq!(acme["totals"]["requests"], 4, "{all}");
    let tokens_usage = all["data"]
        .as_array()
        .and_then(|d| d.iter().find(|t| t["tenant"] == "tokens"))
        .context("tokens is not in the admin usage")?;
    assert_eq!(
        tokens_usage["totals"]["rejected"]["tokens_per_minute"], 1,
        "{all}"
    );
    assert_eq!(
        tokens_usage["totals"]["rejected"]["request_too_large"], 1,
        "{all}"
    );
    Ok(())
}

fn generate(prompt: &str, key: &str) -> tonic::Request<pb::GenerateRequest> {
    let mut request = tonic::Request::new(pb::GenerateRequest {
        model: Some(pb::ModelRef {
            name: "scripted-llm".into(),
            version: String::new(),
        }),
        input: Some(pb::generate_request::Input::Prompt(prompt.into())),
        sampling: Some(pb::SamplingParams {
            max_tokens: 8,
            ..Default::default()
        }),
        ..Default::default()
    });
    if let Ok(value) = MetadataValue::try_from(format!("Bearer {key}")) {
        request.metadata_mut().insert("authorization", value);
    }
    request
}

#[tokio::test(flavor = "multi_thread")]
async fn requests_in_flight_are_limited_across_gateways() -> anyhow::Result<()> {
    let (etcd, redis) = tokio::try_join!(EtcdServer::start(), RedisServer::start())?;
    let admission = shared_admission(&redis, redis_addr(&redis)?);
    let tenant = json!({"name": "acme", "max_concurrent": 1, "requests_per_minute": 0});
    let (setup, [_, b], key) = two_gateways(&etcd, admission, tenant).await?;
    let grpc = setup.sandbox.nodes("gateway")[0].grpc_addr();
    let mut client = GenerationServiceClient::new(lmgrid_integration_tests::connect(grpc).await?);

    // An endless stream holds the tenant's one slot.
    let mut stream = client
        .generate_stream(generate("forever", &key))
        .await?
        .into_inner();
    let first = stream.message().await?.context("no first message")?;
    assert_eq!(first.text_delta, "tick ");
    let response = ask(b, &key).await?;
    assert_openai_error(
        &response,
        429,
        "rate_limit_exceeded",
        None,
        "1 requests in flight",
    )?;
    assert_eq!(response.header("retry-after"), Some("1"));
    let status = client.generate(generate("hi", &key)).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
    assert_eq!(
        status
            .metadata()
            .get("retry-after")
            .and_then(|v| v.to_str().ok()),
        Some("1")
    );

    // Dropping the stream frees the slot.
    drop(stream);
    wait_until(SETTLE_TIMEOUT, "the slot to be freed", || async {
        ask(b, &key).await.is_ok_and(|r| r.status == 200)
    })
    .await?;
    let answer = client.generate(generate("hi", &key)).await?.into_inner();
    assert_eq!(answer.usage.map(|u| u.prompt_tokens), Some(9));
    Ok(())
}

/// A metadata value of a gRPC response or status, as text.
fn meta<'a>(metadata: &'a tonic::metadata::MetadataMap, name: &str) -> Option<&'a str> {
    metadata.get(name).and_then(|v| v.to_str().ok())
}

#[tokio::test(flavor = "multi_thread")]
async fn grpc_answers_carry_the_rate_limit_windows_as_metadata() -> anyhow::Result<()> {
    let (etcd, redis) = tokio::try_join!(EtcdServer::start(), RedisServer::start())?;
    let admission = shared_admission(&redis, redis_addr(&redis)?);
    let tenant = json!({"name": "acme", "requests_per_minute": 3, "tokens_per_minute": 1000});
    let (setup, _, key) = two_gateways(&etcd, admission, tenant).await?;
    let grpc = setup.sandbox.nodes("gateway")[1].grpc_addr();
    let mut client = GenerationServiceClient::new(lmgrid_integration_tests::connect(grpc).await?);

    for left in ["2", "1"] {
        let answer = client.generate(generate("hi", &key)).await?;
        let metadata = answer.metadata();
        assert_eq!(meta(metadata, "x-ratelimit-limit-requests"), Some("3"));
        assert_eq!(meta(metadata, "x-ratelimit-remaining-requests"), Some(left));
        assert!(meta(metadata, "x-ratelimit-reset-requests").is_some());
        assert_eq!(meta(metadata, "x-ratelimit-limit-tokens"), Some("1000"));
    }
    // A stream's windows come with its headers, before the first message.
    let stream = client.generate_stream(generate("hi", &key)).await?;
    let metadata = stream.metadata();
    assert_eq!(meta(metadata, "x-ratelimit-remaining-requests"), Some("0"));
    let mut stream = stream.into_inner();
    while stream.message().await?.is_some() {}

    let status = client.generate(generate("hi", &key)).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
    let metadata = status.metadata();
    assert!(meta(metadata, "retry-after").is_some(), "{status:?}");
    assert_eq!(meta(metadata, "x-ratelimit-limit-requests"), Some("3"));
    assert_eq!(meta(metadata, "x-ratelimit-remaining-requests"), Some("0"));
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn without_redis_each_gateway_limits_to_its_share_until_redis_is_back() -> anyhow::Result<()>
{
    let (etcd, redis) = tokio::try_join!(EtcdServer::start(), RedisServer::start())?;
    let proxy = TcpProxy::bind().await?;
    proxy.forward_to(redis_addr(&redis)?);
    let admission = shared_admission(&redis, proxy.addr());
    let tenant = json!({"name": "acme", "requests_per_minute": 4});
    let (setup, [a, b], key) = two_gateways(&etcd, admission, tenant).await?;
    let admin_a = setup.sandbox.nodes("gateway")[0].admin_addr();

    let response = ask(a, &key).await?;
    assert_eq!(response.status, 200, "{}", response.body);
    assert_eq!(response.header("x-ratelimit-remaining-requests"), Some("3"));

    // Redis goes away: requests still go through, each gateway with half of the limit.
    proxy.cut();
    for gateway in [a, b] {
        for _ in 0..2 {
            let response = ask(gateway, &key).await?;
            assert_eq!(response.status, 200, "{}", response.body);
            assert_eq!(response.header("x-ratelimit-limit-requests"), Some("2"));
        }
        let response = ask(gateway, &key).await?;
        assert_openai_error(
            &response,
            429,
            "rate_limit_exceeded",
            None,
            "2 requests per minute",
        )?;
    }
    let metrics = http_get(admin_a, "/metrics").await?.body;
    assert!(
        metrics.contains("lmgrid_gateway_limiter_redis_up 0"),
        "{metrics}"
    );
    let fallbacks = metrics
        .lines()
        .find_map(|l| l.strip_prefix("lmgrid_gateway_limiter_fallback_total "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .unwrap_or(0.0);
    assert!(fallbacks >= 3.0, "{metrics}");

    // Back again: the shared budget (one request spent) is the truth again.
    proxy.heal();
    wait_until(SETTLE_TIMEOUT, "redis to be used again", || async {
        ask(a, &key)
            .await
            .is_ok_and(|r| r.header("x-ratelimit-limit-requests") == Some("4"))
    })
    .await?;
    let metrics = http_get(admin_a, "/metrics").await?.body;
    assert!(
        metrics.contains("lmgrid_gateway_limiter_redis_up 1"),
        "{metrics}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_models_queue_is_bounded_in_size_and_in_time() -> anyhow::Result<()> {
    let etcd = EtcdServer::start().await?;
    let admission = AdmissionConfig {
        queue: lmgrid_gateway::QueueConfig {
            max_outstanding_per_model: 1,
            max_queued_per_model: 1,
            max_wait: Duration::from_millis(500),
        },
        ..AdmissionConfig::default()
    };
    // Keys are not required: the tests' loopback calls are the tenant `anonymous`.
    let sandbox = Sandbox::builder(&etcd)
        .gateway_admission(admission)
        .gateway()
        .build()
        .await?;
    let setup = register(sandbox).await?;
    crate::openai::wait_for_models(setup.http, &["scripted-llm"]).await?;
    let gateway = setup.sandbox.node("gateway");
    let mut client =
        GenerationServiceClient::new(lmgrid_integration_tests::connect(gateway.grpc_addr()).await?);

    // An endless stream takes the model's one slot at this gateway.
    let mut request = generate("forever", "");
    request.metadata_mut().remove("authorization");
    let mut stream = client.generate_stream(request).await?.into_inner();
    stream.message().await?.context("no first message")?;

    // One request may wait; it gives up after max_wait.
    let http = setup.http;
    let waiting = tokio::spawn(async move {
        crate::tenants::with_key(http, "unused", "POST", "/v1/chat/completions", &chat(8)).await
    });
    let admin_addr = gateway.admin_addr();
    wait_until(SETTLE_TIMEOUT, "a request to wait in the queue", || async {
        http_get(admin_addr, "/metrics").await.is_ok_and(|m| {
            m.body
                .contains(r#"lmgrid_gateway_queue_depth{model="scripted-llm"} 1"#)
        })
    })
    .await?;
    let full = with_key(http, "unused", "POST", "/v1/chat/completions", &chat(8)).await?;
    assert_openai_error(
        &full,
        503,
        "model_overloaded",
        None,
        "waiting at this gateway",
    )?;
    assert_eq!(full.header("retry-after"), Some("1"));
    let waited = waiting.await??;
    assert_openai_error(&waited, 503, "model_overloaded", None, "waited too long")?;

    // The slot frees when the stream goes.
    drop(stream);
    wait_until(SETTLE_TIMEOUT, "the model's slot to be free", || async {
        with_key(http, "unused", "POST", "/v1/chat/completions", &chat(8))
            .await
            .is_ok_and(|r| r.status == 200)
    })
    .await?;
    let usage = with_key(http, "unused", "GET", "/v1/usage", &Value::Null).await?;
    let usage = json_of(&usage)?;
    assert_eq!(usage["tenant"], "anonymous", "{usage}");
    assert_eq!(usage["source"], "replica", "{usage}");
    assert_eq!(usage["totals"]["rejected"]["queue_full"], 1, "{usage}");
    assert_eq!(usage["totals"]["rejected"]["queue_timeout"], 1, "{usage}");
    Ok(())
}
