//! Routing over an in-memory discovery: resolution of models, versions,
//! aliases and kinds; traffic weights; the choice of a worker; the cap on
//! outstanding requests; ejection; prompt affinity.

use std::collections::BTreeMap;

use lmgrid_core::discovery::{
    Discovery, Load, MemoryDiscovery, Registration, ServedModel, TrafficWeight,
};

use super::config::{StaticModel, StaticWeight};
use super::*;

fn worker(id: &str, models: &[(&str, &str, &str)], busy: u32) -> Instance {
    Instance {
        service: "worker".into(),
        id: id.into(),
        address: format!("127.0.0.1:{}", 7000 + id.len()),
        version: "test".into(),
        zone: None,
        models: models
            .iter()
            .map(|(n, v, k)| ServedModel {
                name: n.to_string(),
                version: v.to_string(),
                kind: k.to_string(),
            })
            .collect(),
        load: Some(Load {
            in_flight: busy,
            ..Load::default()
        }),
        metadata: Default::default(),
    }
}

/// Workers over an in-memory discovery holding `instances`, the discovery
/// (for model records) and the registrations that keep them listed.
async fn workers_with(
    instances: Vec<Instance>,
    config: RoutingConfig,
) -> (Workers, MemoryDiscovery, Vec<Box<dyn Registration>>) {
    let discovery = MemoryDiscovery::new();
    let mut registrations = Vec::new();
    for instance in instances {
        registrations.push(discovery.register(instance).await.unwrap());
    }
    let membership = discovery.watch("worker").await.unwrap();
    let models = discovery.watch_models().await.unwrap();
    let workers = Workers::with_rng(membership, models, &config, Rng::seeded(42));
    (workers, discovery, registrations)
}

fn record(aliases: &[(&str, &str)], traffic: &[(&str, u32)]) -> ModelRecord {
    ModelRecord {
        aliases: aliases
            .iter()
            .map(|(a, v)| (a.to_string(), v.to_string()))
            .collect(),
        traffic: traffic
            .iter()
            .map(|(version, weight)| TrafficWeight {
                version: version.to_string(),
                weight: *weight,
            })
            .collect(),
    }
}

/// The ids of a plan's workers.
fn ids(plan: &Plan) -> Vec<&str> {
    plan.group.endpoints.iter().map(|e| e.id.as_str()).collect()
}

/// Acquires `n` times (releasing each), counting the workers chosen.
fn picks(workers: &Workers, plan: &Plan, n: usize) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for _ in 0..n {
        let pending = workers.acquire(plan, &[]).unwrap();
        *counts.entry(pending.endpoint().id.clone()).or_default() += 1;
    }
    counts
}

#[tokio::test]
async fn two_choices_prefer_the_less_loaded_worker() {
    let m = [("m", "1", "tensor")];
    let (workers, _, _held) = workers_with(
        vec![worker("a", &m, 0), worker("bb", &m, 50)],
        RoutingConfig::default(),
    )
    .await;
    let plan = workers.plan(Target::work("m", "", None)).unwrap();
    assert_eq!(
        picks(&workers, &plan, 100)["a"],
        100,
        "the idle worker wins every pair"
    );
    // This gateway's own outstanding requests count too: with 60 held at
    // `a`, the reported 50 at `bb` is the lighter load.
    let held: Vec<Pending> = (0..60)
        .map(|_| plan.group.endpoints[0].try_acquire(1000).unwrap())
        .collect();
    assert_eq!(picks(&workers, &plan, 20)["bb"], 20);
    drop(held);
}

#[tokio::test]
async fn routing_tells_unknown_models_from_models_of_another_kind() {
    let (workers, _, _held) = workers_with(
        vec![worker(
            "a",
            &[("minilm", "1", EMBEDDING), ("llm", "1", GENERATION)],
            0,
        )],
        RoutingConfig::default(),
    )
    .await;
    assert!(
        workers
            .plan(Target::work("minilm", "", Some(EMBEDDING)))
            .is_ok()
    );
    assert!(
        workers
            .plan(Target::work("llm", "1", Some(GENERATION)))
            .is_ok()
    );
    assert!(workers.plan(Target::about("llm", "")).is_ok());
    let wrong = workers
        .plan(Target::work("minilm", "", Some(GENERATION)))
        .unwrap_err();
    assert_eq!(
        wrong,
        RouteError::WrongKind {
            model: "minilm".into(),
            served: vec![EMBEDDING.into()],
            wanted: GENERATION,
        }
    );
    assert_eq!(
        wrong.to_string(),
        "model 'minilm' serves embedding, not generation"
    );
    assert_eq!(wrong.kind(), ErrorKind::InvalidArgument);
    let missing = workers
        .plan(Target::work("nope", "", Some(GENERATION)))
        .unwrap_err();
    assert_eq!(missing.kind(), ErrorKind::NotFound);
    assert_eq!(
        missing.to_string(),
        "model 'nope' is not served by any worker"
    );
    let version = workers
        .plan(Target::work("minilm", "2", Some(EMBEDDING)))
        .unwrap_err();
    assert_eq!(
        version.to_string(),
        "model 'minilm' version '2' is not served by any worker"
    );
    assert_eq!(
        workers.plan(Target::about("", "")).unwrap_err(),
        RouteError::EmptyName
    );
    assert_eq!(workers.label("llm"), "llm");
    assert_eq!(workers.label("made-up"), UNKNOWN_MODEL);
    let names: Vec<String> = workers.models().into_iter().map(|m| m.name).collect();
    assert_eq!(names, ["llm", "minilm"]);
}

#[tokio::test]
async fn without_workers_routing_is_unavailable() {
    let (workers, _, _held) = workers_with(Vec::new(), RoutingConfig::default()).await;
    let error = workers.plan(Target::about("llm", "")).unwrap_err();
    assert_eq!(error, RouteError::NoWorkers);
    assert_eq!(Status::from(error).code(), tonic::Code::Unavailable);
    assert!(!workers.any_ready());
}

/// How often each version is picked in `n` plans for `m`.
fn split(workers: &Workers, n: usize) -> BTreeMap<Option<String>, usize> {
    let mut counts = BTreeMap::new();
    for _ in 0..n {
        let plan = workers.plan(Target::work("m", "", None)).unwrap();
        *counts.entry(plan.version).or_default() += 1;
    }
    counts
}

#[tokio::test]
async fn traffic_weights_aliases_and_exact_versions() {
    let (workers, discovery, _held) = workers_with(
        vec![
            worker("one", &[("m", "1", "tensor")], 0),
            worker("two", &[("m", "2", "tensor")], 0),
        ],
        RoutingConfig::default(),
    )
    .await;
    // Without a record: any worker, and the version left to the worker.
    assert_eq!(split(&workers, 10)[&None], 10);

    discovery
        .set_model(
            "m",
            record(&[("stable", "1"), ("canary", "2")], &[("1", 90), ("2", 10)]),
        )
        .unwrap();
    let n = 10_000;
    let counts = split(&workers, n);
    let (one, two) = (counts[&Some("1".into())], counts[&Some("2".into())]);
    assert_eq!(one + two, n);
    let expected = [0.9 * n as f64, 0.1 * n as f64];
    let chi2 = (one as f64 - expected[0]).powi(2) / expected[0]
        + (two as f64 - expected[1]).powi(2) / expected[1];
    assert!(chi2 < 10.83, "chi-square {chi2}: {one} vs {two}");

    // An alias resolves to its version, which is then asked for.
    let canary = workers.plan(Target::work("m", "canary", None)).unwrap();
    assert_eq!(
        (canary.version.as_deref(), ids(&canary)),
        (Some("2"), vec!["two"])
    );
    // An exact version bypasses the weights and is left as it is.
    let exact = workers.plan(Target::work("m", "1", None)).unwrap();
    assert_eq!((exact.version.as_deref(), ids(&exact)), (None, vec!["one"]));
    // Unknown versions and aliases are not found.
    let unknown = workers.plan(Target::work("m", "beta", None)).unwrap_err();
    assert_eq!(unknown.kind(), ErrorKind::NotFound);
    // Questions about the model are not split.
    let about = workers.plan(Target::about("m", "")).unwrap();
    assert_eq!((about.version.as_deref(), ids(&about).len()), (None, 2));

    // A change of weights applies to the next request.
    discovery
        .set_model("m", record(&[("canary", "3")], &[("1", 0), ("2", 5)]))
        .unwrap();
    assert_eq!(split(&workers, 100)[&Some("2".into())], 100);
    // An alias naming a version no worker serves is not found either.
    let gone = workers.plan(Target::work("m", "canary", None)).unwrap_err();
    assert_eq!(gone.kind(), ErrorKind::NotFound);

    // Versions whose workers are all ejected get no share.
    let two = workers.plan(Target::work("m", "2", None)).unwrap();
    two.group.endpoints[0]
        .health()
        .eject(workers.now(), &workers.settings.ejection);
    discovery
        .set_model("m", record(&[], &[("1", 50), ("2", 50)]))
        .unwrap();
    assert_eq!(split(&workers, 100)[&Some("1".into())], 100);
}

#[tokio::test]
async fn records_in_the_config_stand_in_for_the_store() {
    let mut config = RoutingConfig::default();
    config.models.insert(
        "m".into(),
        StaticModel {
            aliases: [("stable".to_string(), "1".to_string())].into(),
            traffic: vec![StaticWeight {
                version: "1".into(),
                weight: 1,
            }],
        },
    );
    let (workers, discovery, _held) = workers_with(
        vec![worker(
            "w",
            &[("m", "1", "tensor"), ("m", "2", "tensor")],
            0,
        )],
        config,
    )
    .await;
    assert_eq!(split(&workers, 20)[&Some("1".into())], 20);
    let stable = workers.plan(Target::work("m", "stable", None)).unwrap();
    assert_eq!(stable.version.as_deref(), Some("1"));
    // The store's record wins.
    discovery.set_model("m", record(&[], &[("2", 1)])).unwrap();
    assert_eq!(split(&workers, 20)[&Some("2".into())], 20);
    assert!(workers.plan(Target::work("m", "stable", None)).is_err());
}

#[tokio::test]
async fn workers_at_the_cap_or_ejected_are_skipped_then_exhausted() {
    let config = RoutingConfig {
        max_outstanding_per_worker: 2,
        ..RoutingConfig::default()
    };
    let m = [("m", "1", "tensor")];
    let (workers, _, _held) =
        workers_with(vec![worker("a", &m, 0), worker("bb", &m, 0)], config).await;
    let plan = workers.plan(Target::work("m", "", None)).unwrap();
    let held: Vec<Pending> = (0..4)
        .map(|_| workers.acquire(&plan, &[]).unwrap())
        .collect();
    let full = workers.acquire(&plan, &[]).unwrap_err();
    assert_eq!(
        full,
        RouteError::Exhausted {
            model: "m".into(),
            ejected: 0,
            busy: 2
        }
    );
    assert_eq!(full.kind(), ErrorKind::Unavailable);
    drop(held);
    // A worker already tried is not tried again.
    let a = plan.group.endpoints[0].clone();
    for _ in 0..20 {
        let pending = workers.acquire(&plan, std::slice::from_ref(&a)).unwrap();
        assert_eq!(pending.endpoint().id, "bb");
    }
    // An ejected worker is skipped; with both out the model is exhausted.
    let now = workers.now();
    a.health().eject(now, &workers.settings.ejection);
    assert_eq!(picks(&workers, &plan, 20)["bb"], 20);
    plan.group.endpoints[1]
        .health()
        .eject(now, &workers.settings.ejection);
    let out = workers.acquire(&plan, &[]).unwrap_err();
    assert!(
        out.to_string()
            .contains("2 ejected after failures, 0 at this gateway's limit"),
        "{out}"
    );
}

#[tokio::test]
async fn failures_eject_at_most_half_of_a_models_workers() {
    let mut config = RoutingConfig::default();
    config.ejection.consecutive_failures = 2;
    let m = [("m", "1", "tensor")];
    let (workers, _, _held) = workers_with(
        vec![
            worker("a", &m, 0),
            worker("bb", &m, 0),
            worker("ccc", &m, 0),
        ],
        config,
    )
    .await;
    let plan = workers.plan(Target::work("m", "", None)).unwrap();
    let [a, b, c] = [0, 1, 2].map(|i| plan.group.endpoints[i].clone());
    let now = workers.now();
    workers.count_failure(&a, &plan, now);
    assert!(!a.health().is_ejected(now), "one failure is no streak");
    workers.count_failure(&a, &plan, now);
    assert!(a.health().is_ejected(now));
    // A second of three would leave fewer than half in rotation.
    for _ in 0..5 {
        workers.count_failure(&b, &plan, now);
    }
    assert!(!b.health().is_ejected(now));
    // Once the first is back (10 s later), the next streak may eject.
    let later = now + 10_000_000_000;
    workers.count_failure(&c, &plan, later);
    workers.count_failure(&c, &plan, later);
    assert!(c.health().is_ejected(later));
    assert!(!a.health().is_ejected(later));
}

#[tokio::test]
async fn prompt_affinity_keeps_a_prefix_on_one_worker_within_its_load_bound() {
    let mut config = RoutingConfig::default();
    config.affinity.enabled = true;
    config.affinity.prefix_chars = 16;
    let m = [("llm", "1", GENERATION)];
    let (workers, _, _held) = workers_with(
        (0..4).map(|i| worker(&format!("w{i}"), &m, 0)).collect(),
        config,
    )
    .await;
    let input = |text: &str| pb::generate_request::Input::Prompt(text.to_string());
    let plan_for = |text: &pb::generate_request::Input| {
        workers
            .plan(Target::work("llm", "", Some(GENERATION)).prompt(Some(text)))
            .unwrap()
    };
    let shared = input("You are a pirate. Say hello");
    let plan = plan_for(&shared);
    let home = workers.acquire(&plan, &[]).unwrap().endpoint().id.clone();
    for question in ["Say goodbye", "What is the time?", "Sing"] {
        let other = input(&format!("You are a pirate. {question}"));
        let pending = workers.acquire(&plan_for(&other), &[]).unwrap();
        assert_eq!(pending.endpoint().id, home, "same 16-character prefix");
    }
    // Many prefixes spread over the workers.
    let mut spread = BTreeMap::<String, usize>::new();
    for i in 0..400 {
        let text = input(&format!("{i:>16}"));
        let pending = workers.acquire(&plan_for(&text), &[]).unwrap();
        *spread.entry(pending.endpoint().id.clone()).or_default() += 1;
    }
    assert_eq!(spread.len(), 4, "{spread:?}");
    assert!(spread.values().all(|&n| n > 40), "{spread:?}");
    // Requests held at home push the prefix elsewhere: bound
    // ceil(1.25 × (5 + 1) / 4) = 2.
    let held: Vec<Pending> = (0..5)
        .map(|_| workers.acquire(&plan, &[]).unwrap())
        .collect();
    let at_home = held.iter().filter(|p| p.endpoint().id == home).count();
    assert!(at_home < 5, "bounded load moved some away: {at_home}");
}
