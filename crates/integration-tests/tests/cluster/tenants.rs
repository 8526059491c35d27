//! API keys and tenants: a gateway that requires keys answers 401 without a valid one and
//! 403 for a model the tenant may not use, over HTTP and gRPC; keys made through the admin
//! API on one gateway work on another within seconds (both follow etcd), rotation revokes
//! the old key everywhere, and concurrent writes through two replicas take turns (a write
//! that did not see another's is refused with 409 `tenant_changed`, never lost).

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context as _;
use lmgrid_integration_tests::{
    HttpResponse, SETTLE_TIMEOUT, Sandbox, ServiceNode, http_get, http_request,
};
use lmgrid_proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use lmgrid_proto::inference::{ModelInferRequest, model_infer_request};
use lmgrid_test_support::{EtcdServer, onnx, wait_until};
use serde_json::{Value, json};
use tempfile::TempDir;
use tonic::metadata::MetadataValue;

use crate::openai::{assert_openai_error, json_of};

/// The admin token of the test gateways.
pub(crate) const ADMIN_TOKEN: &str = "test-admin-token-0123456789";

/// A gateway config that requires keys and serves the admin API.
pub(crate) fn required_auth() -> lmgrid_gateway::AuthConfig {
    lmgrid_gateway::AuthConfig {
        required: true,
        admin_token: Some(ADMIN_TOKEN.to_string()),
        ..Default::default()
    }
}

/// A request to the admin API at `admin` with the admin token.
pub(crate) async fn admin(
    admin: SocketAddr,
    method: &str,
    path: &str,
    body: Value,
) -> anyhow::Result<HttpResponse> {
    let bearer = format!("Bearer {ADMIN_TOKEN}");
    let body = if body.is_null() {
        String::new()
    } else {
        body.to_string()
    };
    http_request(
        admin,
        method,
        path,
        &[
            ("authorization", &bearer),
            ("content-type", "application/json"),
        ],
        body.as_bytes(),
    )
    .await
}

/// Creates a tenant through the admin API and returns its key.
pub(crate) async fn create_tenant(admin_addr: SocketAddr, tenant: Value) -> anyhow::Result<String> {
    let response = admin(admin_addr, "POST", "/admin/v1/tenants", tenant).await?;
    anyhow::ensure!(
        response.status == 201,
        "{} {}",
        response.status,
        response.body
    );
    let key = json_of(&response)?["key"]
        .as_str()
        .context("no key in the answer")?
        .to_string();
    Ok(key)
}

/// `method path` at `http` with `key` as the bearer token.
pub(crate) async fn with_key(
    http: SocketAddr,
    key: &str,
    method: &str,
    path: &str,
    body: &Value,
) -> anyhow::Result<HttpResponse> {
    let bearer = format!("Bearer {key}");
    let body = if body.is_null() {
        String::new()
    } else {
        body.to_string()
    };
    http_request(
        http,
        method,
        path,
        &[
            ("authorization", &bearer),
            ("content-type", "application/json"),
        ],
        body.as_bytes(),
    )
    .await
}

/// Waits until `GET /v1/models` with `key` at `http` answers `status`.
pub(crate) async fn wait_for_key(http: SocketAddr, key: &str, status: u16) -> anyhow::Result<()> {
    let what = format!("GET /v1/models at {http} to answer {status} with the key");
    wait_until(SETTLE_TIMEOUT, &what, || async move {
        matches!(with_key(http, key, "GET", "/v1/models", &Value::Null).await, Ok(r) if r.status == status)
    })
    .await
}

fn infer_body() -> Value {
    json!({"inputs": [
        {"name": "a", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]},
        {"name": "b", "shape": [1, 4], "datatype": "FP32", "data": [1, 1, 1, 1]},
    ]})
}

fn grpc_infer(model: &str, key: Option<&str>) -> tonic::Request<ModelInferRequest> {
    let tensor = |name: &str| model_infer_request::InferInputTensor {
        name: name.to_string(),
        datatype: "FP32".to_string(),
        shape: vec![1, 4],
        ..Default::default()
    };
    let raw: Vec<u8> = [1.0f32, 2.0, 3.0, 4.0]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    let mut request = tonic::Request::new(ModelInferRequest {
        model_name: model.to_string(),
        inputs: vec![tensor("a"), tensor("b")],
        raw_input_contents: vec![raw.clone(), raw],
        ..Default::default()
    });
    if let Some(key) = key
        && let Ok(value) = MetadataValue::try_from(format!("Bearer {key}"))
    {
        request.metadata_mut().insert("authorization", value);
    }
    request
}

#[tokio::test(flavor = "multi_thread")]
async fn keys_name_tenants_and_tenants_may_use_only_their_models() -> anyhow::Result<()> {
    let repo = TempDir::new()?;
    for name in ["add_mul", "hidden"] {
        onnx::model_repository(
            repo.path(),
            name,
            &[("1", &onnx::add_mul())],
            "max_batch_size: 8\n",
        )?;
    }
    let etcd = EtcdServer::start().await?;
    let sandbox = Sandbox::builder(&etcd)
        .gateway_auth(required_auth())
        .worker_with_models(repo.path())
        .gateway()
        .build()
        .await?;
    let gateway = sandbox.node("gateway");
    let (http, admin_addr) = (gateway.http_addr(), gateway.admin_addr());

    // Without a key, or with one nobody has: 401, asking for a bearer token.
    let embed = json!({"model": "add_mul", "input": "hi"});
    let response = http_request(
        http,
        "POST",
        "/v1/embeddings",
        &[],
        embed.to_string().as_bytes(),
    )
    .await?;
    assert_openai_error(
        &response,
        401,
        "invalid_api_key",
        None,
        "requires an API key",
    )?;
    assert_eq!(response.header("www-authenticate"), Some("Bearer"));
    let response = with_key(http, "lmg-not-a-key", "POST", "/v1/embeddings", &embed).await?;
    assert_openai_error(&response, 401, "invalid_api_key", None, "not valid")?;
    // Health needs no key.
    assert_eq!(http_get(http, "/v2/health/live").await?.status, 200);

    // The admin API wants its token.
    let response = http_get(admin_addr, "/admin/v1/tenants").await?;
    assert_openai_error(&response, 401, "invalid_admin_token", None, "admin token")?;
    let response = with_key(
        admin_addr,
        "wrong-token-wrong-token",
        "GET",
        "/admin/v1/tenants",
        &Value::Null,
    )
    .await?;
    assert_eq!(response.status, 401);

    let key = create_tenant(
        admin_addr,
        json!({"name": "acme", "requests_per_minute": 100, "priority": "high", "allowed_models": ["add_mul"]}),
    )
    .await?;
    assert!(key.starts_with("lmg-"), "{key}");
    let listed = admin(admin_addr, "GET", "/admin/v1/tenants", Value::Null).await?;
    assert_eq!(listed.status, 200, "{}", listed.body);
    let tenant = &json_of(&listed)?["data"][0];
    assert_eq!(tenant["name"], "acme");
    assert_eq!(tenant["priority"], "high");
    assert_eq!(tenant["keys"][0]["id"], key[..12]);
    assert!(!listed.body.contains(&key), "the key is shown only once");
    assert!(!listed.body.contains("sha256"), "digests are not shown");

    // The tenant sees and uses only its models.
    wait_until(SETTLE_TIMEOUT, "add_mul to be listed", || async {
        with_key(http, &key, "GET", "/v1/models", &Value::Null)
            .await
            .is_ok_and(|r| r.body.contains("add_mul"))
    })
    .await?;
    let models = with_key(http, &key, "GET", "/v1/models", &Value::Null).await?;
    assert!(!models.body.contains("hidden"), "{}", models.body);
    let response = with_key(
        http,
        &key,
        "POST",
        "/v2/models/add_mul/infer",
        &infer_body(),
    )
    .await?;
    assert_eq!(response.status, 200, "{}", response.body);
    assert_eq!(response.header("x-ratelimit-limit-requests"), Some("100"));
    assert_eq!(
        response.header("x-ratelimit-remaining-requests"),
        Some("99")
    );
    let response = with_key(http, &key, "POST", "/v2/models/hidden/infer", &infer_body()).await?;
    assert_eq!(response.status, 403, "{}", response.body);
    assert!(
        json_of(&response)?["error"]
            .as_str()
            .is_some_and(|e| e.contains("'hidden'"))
    );
    let response = with_key(
        http,
        &key,
        "POST",
        "/v1/embeddings",
        &json!({"model": "hidden", "input": "x"}),
    )
    .await?;
    assert_openai_error(
        &response,
        403,
        "model_not_allowed",
        Some("model"),
        "'hidden'",
    )?;

    // The same over gRPC.
    let channel = lmgrid_integration_tests::connect(gateway.grpc_addr()).await?;
    let mut client = GrpcInferenceServiceClient::new(channel);
    let status = client
        .model_infer(grpc_infer("add_mul", None))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status:?}");
    let status = client
        .model_infer(grpc_infer("hidden", Some(&key)))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
    let answer = client
        .model_infer(grpc_infer("add_mul", Some(&key)))
        .await?;
    assert_eq!(answer.into_inner().model_name, "add_mul");

    let metrics = http_get(admin_addr, "/metrics").await?.body;
    for needle in [
        r#"lmgrid_gateway_auth_failures_total{reason="missing_key"}"#,
        r#"lmgrid_gateway_auth_failures_total{reason="invalid_key"}"#,
        r#"lmgrid_gateway_rejected_requests_total{reason="model_not_allowed",tenant="acme"}"#,
        r#"lmgrid_gateway_tenant_requests_total{model="add_mul",outcome="ok",tenant="acme"}"#,
    ] {
        assert!(metrics.contains(needle), "no {needle} in\n{metrics}");
    }
    Ok(())
}

/// Two gateways that require keys and serve the admin API, and their nodes.
async fn two_replicas(etcd: &EtcdServer) -> anyhow::Result<(Sandbox, [Arc<ServiceNode>; 2])> {
    let sandbox = Sandbox::builder(etcd)
        .gateway_auth(required_auth())
        .gateway()
        .gateway()
        .build()
        .await?;
    let nodes = [0, 1].map(|i| sandbox.nodes("gateway")[i].clone());
    Ok((sandbox, nodes))
}

#[tokio::test(flavor = "multi_thread")]
async fn keys_reach_every_replica_and_rotation_revokes_the_old_key() -> anyhow::Result<()> {
    let etcd = EtcdServer::start().await?;
    let (_sandbox, [a, b]) = two_replicas(&etcd).await?;

    let first = create_tenant(a.admin_addr(), json!({"name": "acme"})).await?;
    wait_for_key(a.http_addr(), &first, 200).await?;
    // The other replica learns of the key from etcd.
    wait_for_key(b.http_addr(), &first, 200).await?;

    // Rotating on the other replica revokes the old key on both.
    let rotated = admin(
        b.admin_addr(),
        "POST",
        "/admin/v1/tenants/acme/keys",
        json!({"revoke_existing": true}),
    )
    .await?;
    assert_eq!(rotated.status, 201, "{}", rotated.body);
    let rotated = json_of(&rotated)?;
    let second = rotated["key"].as_str().context("no key")?.to_string();
    assert_eq!(rotated["revoked"], json!([&first[..12]]));
    for gateway in [&a, &b] {
        wait_for_key(gateway.http_addr(), &first, 401).await?;
        wait_for_key(gateway.http_addr(), &second, 200).await?;
    }

    // A second key, then revoking it alone.
    let added = admin(
        a.admin_addr(),
        "POST",
        "/admin/v1/tenants/acme/keys",
        Value::Null,
    )
    .await?;
    assert_eq!(added.status, 201, "{}", added.body);
    let added = json_of(&added)?;
    let third = added["key"].as_str().context("no key")?.to_string();
    wait_for_key(b.http_addr(), &third, 200).await?;
    wait_for_key(b.http_addr(), &second, 200).await?;
    let id = added["key_id"].as_str().context("no key id")?;
    let revoked = admin(
        a.admin_addr(),
        "DELETE",
        &format!("/admin/v1/tenants/acme/keys/{id}"),
        Value::Null,
    )
    .await?;
    assert_eq!(revoked.status, 204, "{}", revoked.body);
    wait_for_key(b.http_addr(), &third, 401).await?;

    // Mistakes are refused with their reason.
    let again = admin(
        a.admin_addr(),
        "POST",
        "/admin/v1/tenants",
        json!({"name": "acme"}),
    )
    .await?;
    assert_openai_error(&again, 409, "tenant_exists", Some("name"), "exists")?;
    let bad = admin(
        a.admin_addr(),
        "POST",
        "/admin/v1/tenants",
        json!({"name": "Not/OK"}),
    )
    .await?;
    assert_openai_error(
        &bad,
        400,
        "invalid_argument",
        Some("name"),
        "cannot name a tenant",
    )?;
    let bad = admin(
        a.admin_addr(),
        "PATCH",
        "/admin/v1/tenants/acme",
        json!({"priority": "urgent"}),
    )
    .await?;
    assert_openai_error(&bad, 400, "invalid_argument", Some("priority"), "'urgent'")?;
    let missing = admin(
        a.admin_addr(),
        "GET",
        "/admin/v1/tenants/nobody",
        Value::Null,
    )
    .await?;
    assert_openai_error(&missing, 404, "tenant_not_found", None, "nobody")?;

    // Removing the tenant revokes its keys everywhere.
    let removed = admin(
        b.admin_addr(),
        "DELETE",
        "/admin/v1/tenants/acme",
        Value::Null,
    )
    .await?;
    assert_eq!(removed.status, 204, "{}", removed.body);
    for gateway in [&a, &b] {
        wait_for_key(gateway.http_addr(), &second, 401).await?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_compare_and_set_put_writes_only_over_the_revision_it_names() -> anyhow::Result<()> {
    let etcd = EtcdServer::start().await?;
    let client = lmgrid_core::etcd::EtcdClient::connect(&lmgrid_core::config::EtcdConfig {
        endpoints: vec![etcd.endpoint().to_string()],
        ..Default::default()
    })
    .await?;
    let key = format!("{}/cas", etcd.unique_prefix("cas"));
    // 0: only if the key does not exist.
    let first = client.put_if_revision(&key, b"a".to_vec(), 0).await?;
    let first = first.context("the first write to a new key was refused")?;
    assert_eq!(client.put_if_revision(&key, b"x".to_vec(), 0).await?, None);
    let second = client.put_if_revision(&key, b"b".to_vec(), first).await?;
    let second = second.context("a write naming the current revision was refused")?;
    assert!(second > first);
    // A writer that read the first value lost: nothing written.
    assert_eq!(
        client.put_if_revision(&key, b"y".to_vec(), first).await?,
        None
    );
    let stored = client.get(&key).await?.context("no value")?;
    assert_eq!((stored.value, stored.mod_revision), (b"b".to_vec(), second));
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_rotations_through_two_replicas_leave_one_key_and_lose_none()
-> anyhow::Result<()> {
    let etcd = EtcdServer::start().await?;
    let (_sandbox, [a, b]) = two_replicas(&etcd).await?;
    let original = create_tenant(a.admin_addr(), json!({"name": "acme"})).await?;
    wait_for_key(b.http_addr(), &original, 200).await?;

    // Six rotations at once, three through each replica.
    let rotations = (0..6).map(|i| {
        let admin_addr = [&a, &b][i % 2].admin_addr();
        async move {
            let body = json!({"revoke_existing": true});
            admin(admin_addr, "POST", "/admin/v1/tenants/acme/keys", body).await
        }
    });
    let mut handed_out = Vec::new();
    let mut revoked = std::collections::HashSet::new();
    for answer in futures::future::join_all(rotations).await {
        let answer = answer?;
        match answer.status {
            201 => {
                let body = json_of(&answer)?;
                let key = body["key"].as_str().context("no key")?.to_string();
                handed_out.push(key);
                for id in body["revoked"].as_array().context("no revoked list")? {
                    revoked.insert(id.as_str().context("a key id")?.to_string());
                }
            }
            _ => assert_openai_error(&answer, 409, "tenant_changed", None, "changed while")?,
        }
    }
    assert!(!handed_out.is_empty(), "no rotation succeeded");

    // Successful rotations took turns: every key handed out but one was revoked by a later
    // rotation, which says so; none was silently overwritten.
    let tenant =
        json_of(&admin(a.admin_addr(), "GET", "/admin/v1/tenants/acme", Value::Null).await?)?;
    let listed: Vec<&str> = tenant["keys"]
        .as_array()
        .context("no keys")?
        .iter()
        .filter_map(|k| k["id"].as_str())
        .collect();
    assert_eq!(listed.len(), 1, "{tenant}");
    let unaccounted: Vec<&str> = handed_out
        .iter()
        .map(|key| &key[..12])
        .filter(|id| !revoked.contains(*id))
        .collect();
    assert_eq!(
        unaccounted, listed,
        "keys handed out: {handed_out:?}, revoked: {revoked:?}"
    );
    assert!(revoked.contains(&original[..12]), "{revoked:?}");

    // And only that key works, on both replicas.
    let current = handed_out
        .iter()
        .find(|key| key[..12] == *listed[0])
        .context("the listed key was not handed out")?;
    for gateway in [&a, &b] {
        wait_for_key(gateway.http_addr(), current, 200).await?;
        for key in handed_out
            .iter()
            .chain([&original])
            .filter(|k| *k != current)
        {
            wait_for_key(gateway.http_addr(), key, 401).await?;
        }
    }
    Ok(())
}
