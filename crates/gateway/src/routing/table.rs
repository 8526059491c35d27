//! The routing table: for every model the ready workers serve, its versions
//! and the workers of each (by kind), with the model's record (aliases,
//! traffic weights). Built from discovery's members and the model records
//! whenever either changes, and shared read-only by requests until the next
//! change.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use lmgrid_core::discovery::{Instance, Members, ModelRecord, ModelRecords};

use super::balance::Ring;
use super::endpoint::Endpoint;

/// Workers that can take a request, with their ring for prompt affinity.
#[derive(Debug, Default)]
pub(crate) struct Group {
    pub(super) endpoints: Vec<Arc<Endpoint>>,
    pub(super) ring: Ring,
}

impl Group {
    fn new(endpoints: Vec<Arc<Endpoint>>, affinity: bool) -> Group {
        let ring = if affinity {
            Ring::new(endpoints.iter().map(|e| e.id.as_str()))
        } else {
            Ring::default()
        };
        Group { endpoints, ring }
    }
}

/// Groups of the workers serving something, by the kind they serve it as.
#[derive(Debug, Default)]
pub(super) struct Kinds {
    /// Every worker, whatever its kind.
    any: Arc<Group>,
    by_kind: Vec<(String, Arc<Group>)>,
}

impl Kinds {
    /// The group serving as `kind`, or every worker when `kind` is `None`.
    pub(super) fn get(&self, kind: Option<&str>) -> Option<&Arc<Group>> {
        match kind {
            None => Some(&self.any),
            Some(kind) => self
                .by_kind
                .iter()
                .find(|(k, _)| k == kind)
                .map(|(_, group)| group),
        }
    }

    pub(super) fn kinds(&self) -> impl Iterator<Item = &str> {
        self.by_kind.iter().map(|(kind, _)| kind.as_str())
    }
}

/// One model.
#[derive(Debug, Default)]
pub(super) struct ModelRoutes {
    /// Every worker serving any version.
    pub(super) all: Kinds,
    pub(super) versions: BTreeMap<String, Kinds>,
    /// The store's record, else the config's.
    pub(super) record: Option<ModelRecord>,
}

/// The table as of one view of discovery and the model records.
#[derive(Debug, Default)]
pub(super) struct Table {
    pub(super) members: Members,
    pub(super) records: ModelRecords,
    pub(super) models: HashMap<String, ModelRoutes>,
}

impl Table {
    /// The table for `members` and `records` (`statics` stand in for models
    /// without a record), reusing `endpoints` of workers seen before; it is
    /// left holding exactly the workers of `members`.
    pub(super) fn build(
        members: Members,
        records: ModelRecords,
        statics: &BTreeMap<String, ModelRecord>,
        endpoints: &mut HashMap<String, Arc<Endpoint>>,
        new_endpoint: &mut dyn FnMut(&Instance) -> Option<Endpoint>,
        affinity: bool,
    ) -> Table {
        endpoints.retain(|id, endpoint| {
            let stays = members
                .get(id)
                .is_some_and(|worker| worker.address == endpoint.address);
            if !stays {
                crate::metrics::forget_worker(id);
            }
            stays
        });
        // Model → version → kind → workers, in discovery's order.
        let mut served: BTreeMap<&str, BTreeMap<&str, ByKind<'_>>> = BTreeMap::new();
        for worker in members.values() {
            let endpoint = match endpoints.get(&worker.id) {
                Some(endpoint) => endpoint.clone(),
                None => {
                    let Some(endpoint) = new_endpoint(worker) else {
                        continue;
                    };
                    let endpoint = Arc::new(endpoint);
                    endpoints.insert(worker.id.clone(), endpoint.clone());
                    endpoint
                }
            };
            let load = worker
                .load
                .as_ref()
                .map_or(0, |l| l.in_flight.saturating_add(l.queue_depth));
            endpoint.set_reported(load);
            for model in &worker.models {
                served
                    .entry(&model.name)
                    .or_default()
                    .entry(&model.version)
                    .or_default()
                    .entry(&model.kind)
                    .or_default()
                    .push(endpoint.clone());
            }
        }
        let models = served
            .into_iter()
            .map(|(name, versions)| {
                let mut all = ByKind::new();
                for kinds in versions.values() {
                    for (kind, workers) in kinds {
                        all.entry(kind).or_default().extend(workers.iter().cloned());
                    }
                }
                let routes = ModelRoutes {
                    all: kinds_of(all, affinity),
                    versions: versions
                        .into_iter()
                        .map(|(version, kinds)| (version.to_string(), kinds_of(kinds, affinity)))
                        .collect(),
                    record: records.get(name).or_else(|| statics.get(name)).cloned(),
                };
                (name.to_string(), routes)
            })
            .collect();
        Table {
            members,
            records,
            models,
        }
    }
}

/// Workers by the kind they serve something as.
type ByKind<'a> = BTreeMap<&'a str, Vec<Arc<Endpoint>>>;

/// The groups of `by_kind`, each worker once per group.
fn kinds_of(by_kind: ByKind<'_>, affinity: bool) -> Kinds {
    let mut any: Vec<Arc<Endpoint>> = Vec::new();
    let mut seen = BTreeSet::new();
    let by_kind = by_kind
        .into_iter()
        .map(|(kind, mut workers)| {
            let mut in_kind = BTreeSet::new();
            workers.retain(|w| in_kind.insert(w.id.clone()));
            for worker in &workers {
                if seen.insert(worker.id.clone()) {
                    any.push(worker.clone());
                }
            }
            (kind.to_string(), Arc::new(Group::new(workers, affinity)))
        })
        .collect();
    Kinds {
        any: Arc::new(Group::new(any, affinity)),
        by_kind,
    }
}
