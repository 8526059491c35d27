//! The models a worker serves: loading versions from a [`ModelSource`] into
//! ONNX Runtime sessions behind a batcher, unloading and reloading them at
//! run time, and resolving requests to a ready version.
//!
//! A model that fails to load is recorded with its reason and never takes the
//! worker down. Unloading removes a version from the table at once (new
//! requests get NOT_FOUND) while requests already holding it complete.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use lmgrid_core::discovery::{Load, ServedModel};
use tokio::sync::watch;

use crate::batcher::{Batcher, Policy};
use crate::embedding::Embedder;
use crate::engine::{OnnxRuntimeConfig, Runtime, Signature};
use crate::generation::Generator;
use crate::metrics::VersionMetrics;
use crate::repository::{ModelConfig, ModelKind, ModelSource};

/// The state of one model version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VersionState {
    Loading,
    Ready,
    Failed,
}

/// What `ListModels` reports for one model version (or a model that failed
/// before any version could be read: `version` is then empty).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelStatus {
    pub name: String,
    pub version: String,
    pub kind: ModelKind,
    pub state: VersionState,
    pub error: String,
    pub execution_provider: String,
    pub instances: u32,
}

/// A loaded, ready model version.
#[derive(Debug)]
pub struct LoadedVersion {
    pub name: String,
    pub version: u64,
    pub config: ModelConfig,
    pub signature: Signature,
    pub provider: String,
    /// The dynamic batcher of tensor and embedding models.
    pub(crate) batcher: Option<Batcher>,
    pub(crate) metrics: VersionMetrics,
    /// The tokenizer of an embedding model; `None` for tensor models.
    pub(crate) embedder: Option<Embedder>,
    /// The continuous-batching scheduler of a generation model.
    pub(crate) generator: Option<Generator>,
}

impl LoadedVersion {
    /// Requests waiting and requests (or sequences) being computed.
    pub(crate) fn occupancy(&self) -> (usize, usize) {
        match (&self.batcher, &self.generator) {
            (Some(b), _) => (b.queue_depth(), b.in_flight()),
            (None, Some(g)) => g.occupancy(),
            (None, None) => (0, 0),
        }
    }
}

#[derive(Debug)]
enum Slot {
    Loading,
    Ready(Arc<LoadedVersion>),
    Failed(String),
}

#[derive(Debug, Default)]
struct ModelEntry {
    /// Why the model as a whole could not be read (bad config, no versions).
    failure: Option<String>,
    /// The kind its config declared when it was last read.
    kind: ModelKind,
    versions: BTreeMap<u64, Slot>,
}

/// Why a request names no ready version.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResolveError {
    #[error("model '{0}' is not served by this worker")]
    UnknownModel(String),
    #[error("model '{name}' has no ready version '{version}' (ready: {ready})")]
    UnknownVersion {
        name: String,
        version: String,
        ready: String,
    },
}

/// Why a load or unload request failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ManageError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Failed(String),
}

/// The model table of a worker.
#[derive(Debug)]
pub struct ModelManager {
    source: Option<Arc<dyn ModelSource>>,
    runtime: OnnxRuntimeConfig,
    table: RwLock<BTreeMap<String, ModelEntry>>,
    /// Bumped on every change, for re-registration.
    changes: watch::Sender<u64>,
    /// Serializes loads and unloads so two never race on one model.
    admin: tokio::sync::Mutex<()>,
}

impl ModelManager {
    pub fn new(source: Option<Arc<dyn ModelSource>>, runtime: OnnxRuntimeConfig) -> Self {
        ModelManager {
            source,
            runtime,
            table: RwLock::new(BTreeMap::new()),
            changes: watch::Sender::new(0),
            admin: tokio::sync::Mutex::new(()),
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, ModelEntry>> {
        self.table.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<String, ModelEntry>> {
        self.table.write().unwrap_or_else(|e| e.into_inner())
    }

    fn changed(&self) {
        self.changes.send_modify(|n| *n += 1);
    }

    /// Notifies on every change of the table.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// Loads every model of the source. Failures are recorded, not returned.
    pub async fn load_all(&self) {
        let Some(source) = self.source.clone() else {
            return;
        };
        let names = match tokio::task::spawn_blocking(move || source.list()).await {
            Ok(Ok(names)) => names,
            Ok(Err(error)) => {
                tracing::error!(error, "list the model repository");
                return;
            }
            Err(error) => {
                tracing::error!(%error, "list the model repository");
                return;
            }
        };
        for name in names {
            if let Err(error) = self.load(&name, None).await {
                tracing::warn!(model = name, %error, "model not loaded");
            }
        }
    }

    /// Loads (or reloads) a model: the versions its policy selects, or just
    /// `version`. Versions no longer selected are unloaded.
    pub async fn load(
        &self,
        name: &str,
        version: Option<u64>,
    ) -> Result<Vec<ModelStatus>, ManageError> {
        let _admin = self.admin.lock().await;
        let source = self
            .source
            .clone()
            .ok_or_else(|| ManageError::NotFound("this worker has no model repository".into()))?;
        let model = name.to_string();
        let files = tokio::task::spawn_blocking(move || source.model(&model))
            .await
            .map_err(|e| ManageError::Failed(e.to_string()))?;
        let files = match files {
            Ok(files) => files,
            Err(error) => {
                let known = source_knows(&self.source, name).await;
                if !known {
                    return Err(ManageError::NotFound(error));
                }
                let mut table = self.write();
                table.entry(name.to_string()).or_default().failure = Some(error.clone());
                drop(table);
                self.changed();
                return Err(ManageError::Failed(error));
            }
        };
        let wanted: Vec<(u64, std::path::PathBuf)> = match version {
            Some(v) => match files.versions.iter().find(|(found, _)| *found == v) {
                Some(found) => vec![found.clone()],
                None => {
                    return Err(ManageError::NotFound(format!(
                        "model '{name}' has no version {v} in the repository"
                    )));
                }
            },
            None => files.selected(),
        };
        let selected: Vec<u64> = wanted.iter().map(|(v, _)| *v).collect();
        {
            let mut table = self.write();
            let entry = table.entry(name.to_string()).or_default();
            entry.failure = None;
            entry.kind = files.config.kind;
            // A version that is serving keeps serving until its reload is done.
            for v in &selected {
                if !matches!(entry.versions.get(v), Some(Slot::Ready(_))) {
                    entry.versions.insert(*v, Slot::Loading);
                }
            }
        }
        self.changed();
        let mut failures: Vec<String> = Vec::new();
        for (v, path) in wanted {
            let runtime = self.runtime.clone();
            let config = files.config.clone();
            let tokenizer = files.tokenizer.clone();
            let chat_template = files.chat_template.clone();
            let model = name.to_string();
            let loaded = tokio::task::spawn_blocking(move || {
                load_version(
                    &runtime,
                    &model,
                    v,
                    &path,
                    tokenizer.as_deref(),
                    chat_template.clone(),
                    config,
                )
            })
            .await
            .unwrap_or_else(|e| Err(e.to_string()));
            let slot = match loaded {
                Ok(loaded) => {
                    tracing::info!(
                        model = name,
                        version = v,
                        provider = loaded.provider,
                        "model ready"
                    );
                    Slot::Ready(Arc::new(loaded))
                }
                Err(error) => {
                    tracing::warn!(
                        model = name,
                        version = v,
                        error,
                        "model version failed to load"
                    );
                    Slot::Failed(error)
                }
            };
            let mut table = self.write();
            let entry = table.entry(name.to_string()).or_default();
            if let (Slot::Failed(error), Some(Slot::Ready(_))) = (&slot, entry.versions.get(&v)) {
                // A failed reload keeps the version that was serving.
                tracing::warn!(
                    model = name,
                    version = v,
                    error,
                    "reload failed; the loaded version keeps serving"
                );
                drop(table);
                failures.push(error.clone());
                continue;
            }
            drop(table);
            self.write()
                .entry(name.to_string())
                .or_default()
                .versions
                .insert(v, slot);
            self.changed();
        }
        // Versions the policy no longer selects go only now that their
        // successors are ready, so requests never find the model without a
        // ready version; if none of the selected ones loaded, they stay.
        if version.is_none() {
            let mut table = self.write();
            if let Some(entry) = table.get_mut(name) {
                let successor = selected
                    .iter()
                    .any(|v| matches!(entry.versions.get(v), Some(Slot::Ready(_))));
                if successor {
                    entry.versions.retain(|v, _| selected.contains(v));
                }
            }
            drop(table);
            self.changed();
        }
        if !failures.is_empty() {
            return Err(ManageError::Failed(format!(
                "reload of model '{name}' failed, the loaded version keeps serving: {}",
                failures.join("; ")
            )));
        }
        Ok(self
            .statuses()
            .into_iter()
            .filter(|s| s.name == name)
            .collect())
    }

    /// Unloads one version, or the whole model.
    pub async fn unload(&self, name: &str, version: Option<u64>) -> Result<(), ManageError> {
        let _admin = self.admin.lock().await;
        let mut table = self.write();
        let Some(entry) = table.get_mut(name) else {
            return Err(ManageError::NotFound(format!(
                "model '{name}' is not loaded"
            )));
        };
        match version {
            None => {
                table.remove(name);
            }
            Some(v) => {
                if entry.versions.remove(&v).is_none() {
                    return Err(ManageError::NotFound(format!(
                        "model '{name}' has no version {v} loaded"
                    )));
                }
                if entry.versions.is_empty() {
                    table.remove(name);
                }
            }
        }
        drop(table);
        tracing::info!(model = name, version = ?version, "unloaded");
        self.changed();
        Ok(())
    }

    /// The ready version a request names; an empty version means the newest
    /// ready one.
    pub fn resolve(&self, name: &str, version: &str) -> Result<Arc<LoadedVersion>, ResolveError> {
        let table = self.read();
        let entry = table
            .get(name)
            .ok_or_else(|| ResolveError::UnknownModel(name.to_string()))?;
        let ready = || -> String {
            let list: Vec<String> = entry
                .versions
                .iter()
                .filter(|(_, s)| matches!(s, Slot::Ready(_)))
                .map(|(v, _)| v.to_string())
                .collect();
            if list.is_empty() {
                "none".to_string()
            } else {
                list.join(", ")
            }
        };
        let found = if version.is_empty() {
            entry.versions.values().rev().find_map(|s| match s {
                Slot::Ready(loaded) => Some(loaded.clone()),
                _ => None,
            })
        } else {
            version
                .parse::<u64>()
                .ok()
                .and_then(|v| match entry.versions.get(&v) {
                    Some(Slot::Ready(loaded)) => Some(loaded.clone()),
                    _ => None,
                })
        };
        found.ok_or_else(|| ResolveError::UnknownVersion {
            name: name.to_string(),
            version: if version.is_empty() {
                "(latest)".to_string()
            } else {
                version.to_string()
            },
            ready: ready(),
        })
    }

    /// Whether the model is known at all (loading, ready or failed).
    pub fn knows(&self, name: &str) -> bool {
        self.read().contains_key(name)
    }

    /// Every model version and its state.
    pub fn statuses(&self) -> Vec<ModelStatus> {
        let table = self.read();
        let mut out = Vec::new();
        for (name, entry) in table.iter() {
            if let Some(error) = &entry.failure {
                out.push(ModelStatus {
                    name: name.clone(),
                    version: String::new(),
                    kind: entry.kind,
                    state: VersionState::Failed,
                    error: error.clone(),
                    execution_provider: String::new(),
                    instances: 0,
                });
            }
            for (version, slot) in &entry.versions {
                let (state, error, provider, instances) = match slot {
                    Slot::Loading => (VersionState::Loading, String::new(), String::new(), 0),
                    Slot::Failed(e) => (VersionState::Failed, e.clone(), String::new(), 0),
                    Slot::Ready(l) => (
                        VersionState::Ready,
                        String::new(),
                        l.provider.clone(),
                        u32::try_from(l.config.instance_count).unwrap_or(u32::MAX),
                    ),
                };
                out.push(ModelStatus {
                    name: name.clone(),
                    version: version.to_string(),
                    kind: entry.kind,
                    state,
                    error,
                    execution_provider: provider,
                    instances,
                });
            }
        }
        out
    }

    /// Ready versions, for every ready one.
    pub fn ready(&self) -> Vec<Arc<LoadedVersion>> {
        self.read()
            .values()
            .flat_map(|e| e.versions.values())
            .filter_map(|s| match s {
                Slot::Ready(l) => Some(l.clone()),
                _ => None,
            })
            .collect()
    }

    /// The models to register in discovery.
    pub fn served(&self) -> Vec<ServedModel> {
        self.ready()
            .iter()
            .map(|l| ServedModel {
                name: l.name.clone(),
                version: l.version.to_string(),
                kind: l.config.kind.as_str().to_string(),
            })
            .collect()
    }

    /// Load to publish in discovery.
    pub fn load_report(&self) -> Load {
        let ready = self.ready();
        let mut load = Load {
            accelerator: "cpu".to_string(),
            ..Load::default()
        };
        for l in &ready {
            let (waiting, running) = l.occupancy();
            load.queue_depth += u32::try_from(waiting).unwrap_or(u32::MAX);
            load.in_flight += u32::try_from(running).unwrap_or(u32::MAX);
            load.instances += u32::try_from(l.config.instance_count).unwrap_or(u32::MAX);
            if l.provider.starts_with("cuda") {
                load.accelerator = l.provider.clone();
            }
        }
        load
    }
}

async fn source_knows(source: &Option<Arc<dyn ModelSource>>, name: &str) -> bool {
    let Some(source) = source.clone() else {
        return false;
    };
    let name = name.to_string();
    tokio::task::spawn_blocking(move || source.list().map(|l| l.contains(&name)).unwrap_or(false))
        .await
        .unwrap_or(false)
}

/// Creates the sessions of one version and starts its batcher. Blocking.
fn load_version(
    runtime: &OnnxRuntimeConfig,
    name: &str,
    version: u64,
    path: &std::path::Path,
    tokenizer: Option<&std::path::Path>,
    chat_template: Option<String>,
    config: ModelConfig,
) -> Result<LoadedVersion, String> {
    let runtime = Runtime::get(runtime).map_err(|e| e.to_string())?;
    let cpu_model = match &config.cpu_graph {
        Some(file) => {
            let cpu = path.with_file_name(file);
            if !cpu.is_file() {
                return Err(format!(
                    "cpu_graph: '{file}' is not a file next to {}",
                    path.display()
                ));
            }
            Some(cpu)
        }
        None => None,
    };
    let mut sessions = Vec::with_capacity(config.instance_count);
    let mut provider = String::new();
    for _ in 0..config.instance_count {
        let (session, used, graph) = runtime
            .session(
                path,
                cpu_model.as_deref(),
                &config.execution_provider,
                config.intra_op_threads,
            )
            .map_err(|e| e.to_string())?;
        if cpu_model.is_some() {
            tracing::info!(model = name, version, graph = %graph.display(), provider = %used, "graph chosen for the provider");
        }
        provider = used;
        sessions.push(session);
    }
    let signature = crate::engine::signature(&sessions[0]).map_err(|e| e.to_string())?;
    let metrics = VersionMetrics::new(name, &version.to_string());
    if config.kind == ModelKind::Generation {
        let (Some(generation), Some(tokenizer), Some(session)) =
            (config.generation.clone(), tokenizer, sessions.pop())
        else {
            return Err(
                "a generation model needs a generation section and a tokenizer.json".into(),
            );
        };
        let generator = Generator::start(
            name,
            version,
            generation,
            session,
            &signature,
            &provider,
            tokenizer,
            chat_template,
        )?;
        return Ok(LoadedVersion {
            name: name.to_string(),
            version,
            config,
            signature,
            provider,
            batcher: None,
            metrics,
            embedder: None,
            generator: Some(generator),
        });
    }
    if config.max_batch_size > 0 {
        for spec in signature.inputs.iter().chain(&signature.outputs) {
            if spec.shape.first() != Some(&-1) {
                return Err(format!(
                    "max_batch_size is {} but '{}' has shape {:?}: batching needs a dynamic first dimension (set max_batch_size: 0 for models without one)",
                    config.max_batch_size, spec.name, spec.shape
                ));
            }
        }
    }
    // The tokenizer loads once per version, before any thread starts.
    let embedder = match (config.kind, tokenizer) {
        (ModelKind::Tensor | ModelKind::Generation, _) => None,
        (ModelKind::Embedding, Some(tokenizer)) => Some(Embedder::load(tokenizer, &signature)?),
        (ModelKind::Embedding, None) => {
            return Err("an embedding model needs a tokenizer.json".to_string());
        }
    };
    let outputs = signature
        .outputs
        .iter()
        .map(|o| (o.name.clone(), o.dtype))
        .collect();
    let policy = Policy {
        max_batch_size: config.max_batch_size,
        dynamic: config.dynamic_batching.clone(),
    };
    let batcher = Batcher::start(
        &format!("ort-{name}-{version}"),
        policy,
        sessions,
        outputs,
        metrics.clone(),
    )
    .map_err(|e| format!("start instance threads: {e}"))?;
    Ok(LoadedVersion {
        name: name.to_string(),
        version,
        config,
        signature,
        provider,
        batcher: Some(batcher),
        metrics,
        embedder,
        generator: None,
    })
}
