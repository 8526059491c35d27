//! Registration in etcd: what an instance publishes, and how it leaves; and the model
//! records (aliases, traffic weights) that gateways watch.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context as _;
use lmgrid_core::config::{AdminConfig, EtcdConfig, GrpcConfig, NodeConfig};
use lmgrid_core::discovery::{Discovery as _, EtcdDiscovery, Instance, instance_key, model_key};
use lmgrid_integration_tests::{SETTLE_TIMEOUT, Sandbox};
use lmgrid_test_support::{EtcdServer, free_port};
use tokio::time::Instant;

/// What etcd may add to a lease's TTL before a crashed instance's record is gone: it looks
/// for expired leases every half second, then commits the deletion, on a busy machine.
const EXPIRY_MARGIN: Duration = Duration::from_secs(2);

#[tokio::test(flavor = "multi_thread")]
async fn an_instance_registers_its_address_version_and_zone() -> anyhow::Result<()> {
    let etcd = EtcdServer::start().await?;
    let sandbox = Sandbox::builder(&etcd)
        .zone("zone-a")
        .worker()
        .build()
        .await?;
    let worker = sandbox.node("worker");

    let members = sandbox.watch("worker").await?.members();
    assert_eq!(members.len(), 1, "{members:?}");
    let record = &members[worker.id()];
    assert_eq!(record.service, "worker");
    assert_eq!(record.id, worker.id());
    assert_eq!(record.address, worker.grpc_addr().to_string());
    assert_eq!(record.version, lmgrid_core::VERSION);
    assert_eq!(record.zone.as_deref(), Some("zone-a"));

    // The record in etcd is the same JSON, at the documented key, attached to a lease.
    let discovery = sandbox.discovery().await?;
    let key = instance_key(sandbox.prefix(), "worker", worker.id());
    let kv = discovery
        .client()
        .get(&key)
        .await?
        .with_context(|| format!("no record at {key}"))?;
    assert_ne!(kv.lease, 0, "the record at {key} has no lease");
    let stored: Instance = serde_json::from_slice(&kv.value)?;
    assert_eq!(&stored, record);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn instances_of_one_service_register_side_by_side() -> anyhow::Result<()> {
    let etcd = EtcdServer::start().await?;
    let sandbox = Sandbox::builder(&etcd)
        .worker()
        .worker()
        .dispatcher()
        .build()
        .await?;
    let workers = sandbox.nodes("worker");
    let [first, second] = workers.as_slice() else {
        panic!("expected two workers, got {}", workers.len());
    };
    assert_ne!(first.id(), second.id());
    assert_ne!(first.grpc_addr(), second.grpc_addr());

    let members = sandbox.watch("worker").await?.members();
    assert_eq!(members.len(), 2, "{members:?}");
    for worker in &workers {
        let record = members
            .get(worker.id())
            .with_context(|| format!("{worker} missing from {members:?}"))?;
        assert_eq!(record.address, worker.grpc_addr().to_string());
    }

    // Each service has a membership of its own.
    let dispatchers = sandbox.watch("dispatcher").await?.members();
    let dispatcher = sandbox.node("dispatcher");
    assert_eq!(
        dispatchers.keys().collect::<Vec<_>>(),
        [dispatcher.id()],
        "{dispatchers:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_crashed_instance_disappears_from_every_watcher_within_its_ttl() -> anyhow::Result<()> {
    let etcd = EtcdServer::start().await?;
    let sandbox = Sandbox::builder(&etcd).build().await?;
    // Two watchers on connections of their own, as two gateways would have.
    let mut watchers = [
        sandbox.watch("worker").await?,
        sandbox.watch("worker").await?,
    ];

    let record = Instance {
        service: "worker".to_string(),
        id: "doomed".to_string(),
        address: "127.0.0.1:1".to_string(),
        version: lmgrid_core::VERSION.to_string(),
        zone: None,
        models: Vec::new(),
        load: None,
        metadata: Default::default(),
    };
    let crashed_at = crash_after_registering(sandbox.etcd_config(), record).await?;

    for watcher in &mut watchers {
        // A crash revokes nothing, so each watcher saw the instance arrive and still has it.
        let members = tokio::time::timeout(
            SETTLE_TIMEOUT,
            watcher.wait_for(|members| members.contains_key("doomed")),
        )
        .await
        .context("the watcher never saw the instance register")??;
        assert_eq!(members["doomed"].address, "127.0.0.1:1");
    }
    let deadline = crashed_at + sandbox.lease_ttl() + EXPIRY_MARGIN;
    for (n, watcher) in watchers.iter_mut().enumerate() {
        tokio::time::timeout_at(
            deadline,
            watcher.wait_for(|members| !members.contains_key("doomed")),
        )
        .await
        .with_context(|| {
            format!(
                "watcher {n} still lists the crashed instance {:?} after it crashed",
                crashed_at.elapsed()
            )
        })??;
    }
    Ok(())
}

/// Registers `record` from a runtime of its own on another thread, then throws that runtime
/// away: the keep-alive task and the etcd connection vanish without revoking the lease,
/// exactly as when the process is killed. Returns when that happened.
async fn crash_after_registering(config: EtcdConfig, record: Instance) -> anyhow::Result<Instant> {
    let thread = std::thread::spawn(move || -> anyhow::Result<Instant> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()?;
        let registration = runtime.block_on(async {
            let discovery = EtcdDiscovery::connect(&config).await?;
            discovery.register(record).await
        })?;
        runtime.shutdown_background();
        let crashed_at = Instant::now();
        // Dropping the registration now only cancels a token nobody listens to any more.
        drop(registration);
        Ok(crashed_at)
    });
    tokio::task::spawn_blocking(move || thread.join())
        .await?
        .map_err(|_| anyhow::anyhow!("the crashing thread panicked"))?
}

#[tokio::test(flavor = "multi_thread")]
async fn start_fails_fast_with_an_etcd_error_when_etcd_is_unreachable() {
    let endpoint = format!("http://127.0.0.1:{}", free_port());
    let any_port = SocketAddr::from(([127, 0, 0, 1], 0));
    let mut node = NodeConfig {
        grpc: GrpcConfig {
            listen_addr: any_port,
            advertise_addr: None,
        },
        admin: AdminConfig {
            enabled: true,
            listen_addr: any_port,
        },
        ..NodeConfig::default()
    };
    node.discovery.etcd.endpoints = vec![endpoint.clone()];
    node.discovery.etcd.connect_timeout = Duration::from_secs(1);

    // The bound is loose on purpose: the point is that start gives up instead of hanging.
    let result = tokio::time::timeout(
        Duration::from_secs(20),
        lmgrid_worker::Worker::start(lmgrid_worker::Config {
            node,
            ..Default::default()
        }),
    )
    .await
    .expect("Worker::start kept waiting for an unreachable etcd");
    let error = result.expect_err("Worker::start succeeded without etcd");
    let message = error.to_string();
    assert!(message.contains("etcd"), "{message}");
    assert!(message.contains(&endpoint), "{message}");
}

#[tokio::test(flavor = "multi_thread")]
async fn model_records_in_etcd_are_watched_and_unusable_ones_left_out() -> anyhow::Result<()> {
    let etcd = EtcdServer::start().await?;
    let sandbox = Sandbox::builder(&etcd).build().await?;
    let discovery = sandbox.discovery().await?;
    let client = discovery.client();
    let put = |model: &str, json: &str| {
        let key = model_key(sandbox.prefix(), model);
        let value = json.as_bytes().to_vec();
        async move { client.put(&key, value, 0).await }
    };
    put("a", r#"{"aliases": {"stable": "1"}}"#).await?;
    // The registry's own keys below a model are not records; malformed records are skipped.
    put("a/versions/1", r#"{"digest": "sha256:…"}"#).await?;
    put("bad", r#"{"traffic": [{"version": "1", "weight": 0}]}"#).await?;
    let mut table = discovery.watch_models().await?;
    let records = table.records();
    assert_eq!(records.keys().collect::<Vec<_>>(), ["a"]);
    assert_eq!(records["a"].aliases["stable"], "1");

    // Changes arrive through the watch: a new record, a record turned unusable, a deletion.
    put("b", r#"{"traffic": [{"version": "2", "weight": 1}]}"#).await?;
    let settle = Duration::from_secs(10);
    tokio::time::timeout(settle, table.wait_for(|r| r.contains_key("b"))).await??;
    put("a", "not json").await?;
    tokio::time::timeout(settle, table.wait_for(|r| !r.contains_key("a"))).await??;
    client.delete(&model_key(sandbox.prefix(), "b")).await?;
    tokio::time::timeout(settle, table.wait_for(|r| r.is_empty())).await??;
    Ok(())
}
