//! Choosing a worker for a request, and getting the request answered.
//!
//! A request names a model and maybe a version or an alias. Routing
//! resolves it against the routing table — the ready workers discovery
//! lists, by model, version and kind (`embedding` for `Embed`, `generation`
//! for `Generate`), and the model's record of aliases and traffic weights —
//! to a group of workers: those serving the version it named, the version
//! its alias names, or a version picked by the traffic weights. In the group,
//! the worker is the less loaded of two picked at random (power of two
//! choices on this gateway's outstanding requests plus the load the worker
//! reports), or for generation with prompt affinity on, the worker the
//! prompt's prefix hashes to unless it is over its share of the load.
//!
//! Attempts that fail in a way a retry can fix (the connection failed, the
//! worker said `UNAVAILABLE`, an attempt ran out of time) are retried on
//! another worker of the group, within the deadline and the retry budget
//! ([`attempt`]). Workers that keep failing are ejected for a while
//! ([`endpoint`]).
//!
//! Discovery lists an instance only while it is ready, so membership is
//! readiness: the models listed here are the models that can be served now.

mod attempt;
mod balance;
mod budget;
mod codec;
pub(crate) mod config;
mod connection;
mod endpoint;
mod table;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use lmgrid_core::discovery::{Instance, Membership, ModelRecord, ModelTable};
use lmgrid_core::error::ErrorKind;
use lmgrid_proto::lmgrid::v1 as pb;
use tonic::Status;

pub(crate) use self::attempt::{Outbound, Upstream};
use self::balance::{Rng, prompt_key, two_choices, weighted};
use self::budget::RetryBudget;
pub(crate) use self::codec::Versioned;
use self::config::RoutingConfig;
use self::connection::Connection;
use self::endpoint::{EjectionPolicy, Endpoint, Pending};
use self::table::{Group, ModelRoutes, Table};

/// The model kind that serves `Embed`.
pub(crate) const EMBEDDING: &str = "embedding";
/// The model kind that serves `Generate` and `GenerateStream`.
pub(crate) const GENERATION: &str = "generation";

/// The label value for models that no worker serves, so that metric label
/// sets stay bounded by what discovery lists.
pub(crate) const UNKNOWN_MODEL: &str = "unknown";

/// Why no worker can take a request for a model.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum RouteError {
    #[error("model name is empty")]
    EmptyName,
    #[error("no worker is ready; retry later")]
    NoWorkers,
    #[error("{} is not served by any worker", describe(model, version))]
    NotServed { model: String, version: String },
    #[error("model '{model}' serves {}, not {wanted}", served.join(" and "))]
    WrongKind {
        model: String,
        /// The kinds the model is served as.
        served: Vec<String>,
        wanted: &'static str,
    },
    #[error(
        "every worker serving model '{model}' is out of rotation ({ejected} ejected after \
         failures, {busy} at this gateway's limit of outstanding requests); retry later"
    )]
    Exhausted {
        model: String,
        ejected: usize,
        busy: usize,
    },
}

fn describe(model: &str, version: &str) -> String {
    if version.is_empty() {
        format!("model '{model}'")
    } else {
        format!("model '{model}' version '{version}'")
    }
}

impl RouteError {
    pub(crate) fn kind(&self) -> ErrorKind {
        match self {
            RouteError::EmptyName | RouteError::WrongKind { .. } => ErrorKind::InvalidArgument,
            RouteError::NoWorkers | RouteError::Exhausted { .. } => ErrorKind::Unavailable,
            RouteError::NotServed { .. } => ErrorKind::NotFound,
        }
    }
}

impl From<RouteError> for Status {
    fn from(error: RouteError) -> Status {
        error.kind().status(error.to_string())
    }
}

/// A model as the ready workers serve it, for listings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ModelEntry {
    pub(crate) name: String,
    pub(crate) versions: BTreeSet<String>,
    pub(crate) kinds: BTreeSet<String>,
}

/// What a request asks routing for.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Target<'a> {
    pub(crate) model: &'a str,
    /// A version, an alias, or empty for any.
    pub(crate) version: &'a str,
    /// The kind the model must be served as, if the call needs one.
    pub(crate) kind: Option<&'static str>,
    /// Whether a request naming no version is split by the model's traffic
    /// weights: requests for work are; questions about the model (metadata,
    /// readiness) are not.
    pub(crate) weighted: bool,
    /// A generation's input, for prompt-prefix affinity.
    pub(crate) prompt: Option<&'a pb::generate_request::Input>,
}

impl<'a> Target<'a> {
    /// Work for `model` (`version` may be an alias), served as `kind`.
    pub(crate) fn work(model: &'a str, version: &'a str, kind: Option<&'static str>) -> Self {
        Target {
            model,
            version,
            kind,
            weighted: true,
            prompt: None,
        }
    }

    /// A question about `model` that any worker serving it can answer.
    pub(crate) fn about(model: &'a str, version: &'a str) -> Self {
        Target {
            weighted: false,
            ..Target::work(model, version, None)
        }
    }

    /// With `input` deciding the worker when prompt affinity is on.
    pub(crate) fn prompt(self, input: Option<&'a pb::generate_request::Input>) -> Self {
        Target {
            prompt: input,
            ..self
        }
    }
}

/// A resolved request: the version to ask for and the workers that may take
/// it.
#[derive(Debug)]
pub(crate) struct Plan {
    /// The version to write into the request when routing chose it (an
    /// alias's version, a traffic split's pick); `None` leaves the request
    /// as it is.
    pub(crate) version: Option<String>,
    model: String,
    group: Arc<Group>,
    /// Every worker of the model: at most half of these may be ejected.
    model_group: Arc<Group>,
    affinity: Option<u64>,
}

/// What the routing config turns into.
#[derive(Debug)]
struct Settings {
    cap: u32,
    attempt_timeout: Option<Duration>,
    connect_timeout: Duration,
    max_attempts: u32,
    ejection: EjectionPolicy,
    /// Prefix length and load factor, when prompt affinity is on.
    affinity: Option<(usize, f64)>,
}

/// The workers known to this gateway, and the requests it sends them.
#[derive(Debug)]
pub(crate) struct Workers {
    membership: Membership,
    models: ModelTable,
    statics: BTreeMap<String, ModelRecord>,
    settings: Settings,
    table: RwLock<Arc<Table>>,
    /// Every worker's endpoint by id; only table rebuilds touch it.
    endpoints: Mutex<HashMap<String, Arc<Endpoint>>>,
    /// Held while deciding an ejection, so that two concurrent ones cannot
    /// both take the last worker allowed out.
    ejecting: Mutex<()>,
    rng: Rng,
    budget: RetryBudget,
    epoch: Instant,
}

impl Workers {
    pub(crate) fn new(membership: Membership, models: ModelTable, config: &RoutingConfig) -> Self {
        Workers::with_rng(membership, models, config, Rng::from_entropy())
    }

    fn with_rng(
        membership: Membership,
        models: ModelTable,
        config: &RoutingConfig,
        rng: Rng,
    ) -> Self {
        let retry = &config.retry;
        Workers {
            membership,
            models,
            statics: config.records(),
            settings: Settings {
                cap: config.max_outstanding_per_worker,
                attempt_timeout: config.attempt_timeout,
                connect_timeout: config.connect_timeout,
                max_attempts: retry.max_attempts,
                ejection: EjectionPolicy {
                    threshold: config.ejection.consecutive_failures,
                    base: config.ejection.base_interval,
                    max: config.ejection.max_interval,
                },
                affinity: config
                    .affinity
                    .enabled
                    .then_some((config.affinity.prefix_chars, config.affinity.load_factor)),
            },
            table: RwLock::default(),
            endpoints: Mutex::default(),
            ejecting: Mutex::default(),
            rng,
            budget: RetryBudget::new(retry.budget_ratio, retry.min_per_second, retry.window),
            epoch: Instant::now(),
        }
    }

    /// Resolves `target` to the version to ask for and the workers that may
    /// take the request.
    pub(crate) fn plan(&self, target: Target<'_>) -> Result<Plan, RouteError> {
        let Target {
            model,
            version,
            kind,
            ..
        } = target;
        if model.is_empty() {
            return Err(RouteError::EmptyName);
        }
        let table = self.table();
        if table.members.is_empty() {
            return Err(RouteError::NoWorkers);
        }
        let not_served = || RouteError::NotServed {
            model: model.to_string(),
            version: version.to_string(),
        };
        let routes = table.models.get(model).ok_or_else(not_served)?;
        let model_group = routes.all.get(None).cloned().unwrap_or_default();
        let (chosen, group) = if !version.is_empty() {
            // An exact version first, then an alias; weights do not apply.
            let (resolved, kinds) = match routes.versions.get(version) {
                Some(kinds) => (None, kinds),
                None => {
                    let aliased = routes
                        .record
                        .as_ref()
                        .and_then(|r| r.aliases.get(version))
                        .ok_or_else(not_served)?;
                    let kinds = routes.versions.get(aliased).ok_or_else(not_served)?;
                    (Some(aliased.clone()), kinds)
                }
            };
            let group = kinds
                .get(kind)
                .ok_or_else(|| wrong_kind(model, kinds.kinds(), kind))?;
            (resolved, group.clone())
        } else {
            let split = if target.weighted {
                self.split(routes, kind)
            } else {
                None
            };
            match split {
                Some((version, group)) => (Some(version), group),
                None => {
                    let group = routes
                        .all
                        .get(kind)
                        .ok_or_else(|| wrong_kind(model, routes.all.kinds(), kind))?;
                    (None, group.clone())
                }
            }
        };
        let affinity = match (self.settings.affinity, target.prompt) {
            (Some((chars, _)), Some(input)) => Some(prompt_key(input, chars)),
            _ => None,
        };
        Ok(Plan {
            version: chosen,
            model: model.to_string(),
            group,
            model_group,
            affinity,
        })
    }

    /// A version picked by the model's traffic weights among the versions
    /// with a worker that can take a request now, and its workers; `None`
    /// when the model has no weights or no weighted version can serve.
    fn split(&self, routes: &ModelRoutes, kind: Option<&str>) -> Option<(String, Arc<Group>)> {
        let record = routes.record.as_ref().filter(|r| !r.traffic.is_empty())?;
        let now = self.now();
        let open = |version: &str| {
            routes
                .versions
                .get(version)
                .and_then(|kinds| kinds.get(kind))
                .filter(|group| {
                    group
                        .endpoints
                        .iter()
                        .any(|e| !e.health().is_ejected(now) && e.outstanding() < self.settings.cap)
                })
        };
        let weights = record.traffic.iter().map(|share| {
            if open(&share.version).is_some() {
                share.weight
            } else {
                0
            }
        });
        let index = weighted(&self.rng, weights)?;
        let version = &record.traffic[index].version;
        Some((version.clone(), open(version)?.clone()))
    }

    /// Takes a worker of `plan` that is not in `tried`, not ejected and
    /// under the outstanding cap, counting the request as outstanding there.
    fn acquire(&self, plan: &Plan, tried: &[Arc<Endpoint>]) -> Result<Pending, RouteError> {
        let endpoints = &plan.group.endpoints;
        let now = self.now();
        let cap = self.settings.cap;
        // Workers found at the cap between picking and counting are skipped.
        let mut full: Vec<usize> = Vec::new();
        loop {
            let eligible = |i: usize| {
                let e = &endpoints[i];
                !full.contains(&i)
                    && !tried.iter().any(|t| Arc::ptr_eq(t, e))
                    && !e.health().is_ejected(now)
                    && e.outstanding() < cap
            };
            let picked = match (plan.affinity, self.settings.affinity) {
                (Some(key), Some((_, factor))) => {
                    plan.group
                        .ring
                        .choose(key, endpoints.len(), factor, eligible, |i| {
                            u64::from(endpoints[i].outstanding())
                        })
                }
                _ => two_choices(&self.rng, endpoints.len(), eligible, |i| {
                    endpoints[i].score()
                }),
            };
            let Some(index) = picked else {
                let ejected = endpoints
                    .iter()
                    .filter(|e| e.health().is_ejected(now))
                    .count();
                return Err(RouteError::Exhausted {
                    model: plan.model.clone(),
                    ejected,
                    busy: endpoints.len() - ejected,
                });
            };
            match endpoints[index].try_acquire(cap) {
                Some(pending) => return Ok(pending),
                None => full.push(index),
            }
        }
    }

    /// Every model some ready worker serves, by name.
    pub(crate) fn models(&self) -> Vec<ModelEntry> {
        let members = self.membership.members();
        let mut models: BTreeMap<&str, ModelEntry> = BTreeMap::new();
        for served in members.values().flat_map(|w| &w.models) {
            let entry = models
                .entry(served.name.as_str())
                .or_insert_with(|| ModelEntry {
                    name: served.name.clone(),
                    versions: BTreeSet::new(),
                    kinds: BTreeSet::new(),
                });
            entry.versions.insert(served.version.clone());
            entry.kinds.insert(served.kind.clone());
        }
        models.into_values().collect()
    }

    /// Whether any worker is ready.
    pub(crate) fn any_ready(&self) -> bool {
        !self.membership.members().is_empty()
    }

    /// The metric label for `model`: its name when a ready worker serves it,
    /// else [`UNKNOWN_MODEL`], so that clients cannot grow label sets.
    pub(crate) fn label(&self, model: &str) -> String {
        if self.table().models.contains_key(model) {
            model.to_string()
        } else {
            UNKNOWN_MODEL.to_string()
        }
    }

    /// The table for the current members and records, rebuilt when either
    /// changed since it was built.
    fn table(&self) -> Arc<Table> {
        let members = self.membership.members();
        let records = self.models.records();
        let current = |table: &Table| {
            Arc::ptr_eq(&table.members, &members) && Arc::ptr_eq(&table.records, &records)
        };
        {
            let table = self.table.read().unwrap_or_else(|e| e.into_inner());
            if current(&table) {
                return table.clone();
            }
        }
        let mut endpoints = self.endpoints.lock().unwrap_or_else(|e| e.into_inner());
        {
            // Another request may have rebuilt it while this one waited.
            let table = self.table.read().unwrap_or_else(|e| e.into_inner());
            if current(&table) {
                return table.clone();
            }
        }
        let table = Arc::new(Table::build(
            members,
            records,
            &self.statics,
            &mut endpoints,
            &mut |worker| self.endpoint_for(worker),
            self.settings.affinity.is_some(),
        ));
        *self.table.write().unwrap_or_else(|e| e.into_inner()) = table.clone();
        table
    }

    /// The endpoint of a worker new to this gateway: a connection made on
    /// first use and kept for as long as the worker stays.
    fn endpoint_for(&self, worker: &Instance) -> Option<Endpoint> {
        let connection = Connection::new(&worker.address, self.settings.connect_timeout)
            .inspect_err(|error| {
                tracing::warn!(
                    worker = worker.id, %error, "ignoring a worker whose address is not usable"
                );
            })
            .ok()?;
        Some(Endpoint::new(&worker.id, &worker.address, connection))
    }

    /// Nanoseconds since this router started: the clock of worker health.
    fn now(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }
}

fn wrong_kind<'a>(
    model: &str,
    served: impl Iterator<Item = &'a str>,
    wanted: Option<&'static str>,
) -> RouteError {
    let served: Vec<String> = served.map(str::to_string).collect();
    match wanted {
        Some(wanted) if !served.is_empty() => RouteError::WrongKind {
            model: model.to_string(),
            served,
            wanted,
        },
        _ => RouteError::NotServed {
            model: model.to_string(),
            version: String::new(),
        },
    }
}

#[cfg(test)]
mod tests;
