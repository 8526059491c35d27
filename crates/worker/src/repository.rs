//! The model repository: a directory in the layout Triton operators know,
//!
//! ```text
//! <repository>/<model>/config.yaml
//! <repository>/<model>/tokenizer.json            (embedding models only)
//! <repository>/<model>/<version>/model.onnx      (version: a positive integer)
//! ```
//!
//! read through the [`ModelSource`] trait so that the registry can become
//! another source without touching the loader.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::engine::ProviderConfig;

/// How a model is served; `<model>/config.yaml`. Every key is optional.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelConfig {
    /// What the model is: a plain tensor model, or a sentence encoder that
    /// `EmbeddingService/Embed` also serves.
    pub kind: ModelKind,
    /// Largest batch one inference runs with. 0: the model has no batch
    /// dimension and every request runs as sent.
    pub max_batch_size: usize,
    /// Queue requests and run them together. Absent: each request runs alone.
    pub dynamic_batching: Option<DynamicBatching>,
    /// Sessions of this model, each on its own thread.
    pub instance_count: usize,
    /// ONNX Runtime intra-op threads per session.
    pub intra_op_threads: usize,
    pub execution_provider: ProviderConfig,
    /// `{latest: N}`, `all` or `{specific: [..]}`: a one-key map, which the YAML
    /// deserializer reads as an enum only when told to (it expects `!latest N`).
    #[serde(with = "yaml_serde::with::singleton_map")]
    pub version_policy: VersionPolicy,
    /// Largest tensor accepted, in elements; larger → RESOURCE_EXHAUSTED.
    pub max_input_elements: usize,
    /// Settings of a `generation` model.
    pub generation: Option<GenerationConfig>,
    /// Another graph file in the version directory that computes the same
    /// function with lmgrid's CPU kernels (operator domain `ai.lmgrid`),
    /// loaded instead of `model.onnx` when the session runs on the CPU and
    /// this CPU has a vector path of the kernels (AVX-512 or AVX2). `model.onnx` stays
    /// the graph for CUDA and for CPUs without it.
    pub cpu_graph: Option<String>,
}

impl Default for ModelConfig {
    fn default() -> Self {
        ModelConfig {
            kind: ModelKind::Tensor,
            max_batch_size: 0,
            dynamic_batching: None,
            instance_count: 1,
            intra_op_threads: 1,
            execution_provider: ProviderConfig::default(),
            version_policy: VersionPolicy::default(),
            max_input_elements: 64 * 1024 * 1024,
            generation: None,
            cpu_graph: None,
        }
    }
}

/// What a model serves.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ModelKind {
    /// Tensors in, tensors out, through the Open Inference Protocol only.
    #[default]
    Tensor,
    /// A sentence encoder: `tokenizer.json` next to the versions, inputs
    /// `input_ids` and `attention_mask` (and optionally `token_type_ids`),
    /// INT64 `[batch, sequence]`, and one FP32 `[batch, dimensions]` output.
    /// It is still a tensor model as well.
    Embedding,
    /// A decoder language model served by `GenerationService`: `tokenizer.json`
    /// next to the versions, a `generation` section, and the KV-cache interface
    /// described in `docs/worker.md`. Not served by the Open Inference Protocol.
    Generation,
}

impl ModelKind {
    /// The name in `config.yaml` and in the discovery record.
    pub fn as_str(self) -> &'static str {
        match self {
            ModelKind::Tensor => "tensor",
            ModelKind::Embedding => "embedding",
            ModelKind::Generation => "generation",
        }
    }
}

/// Which side of a batch row its padding goes, as the decoder graph expects.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Padding {
    /// Every row's tokens end at the last column; new tokens are appended
    /// there and the mask hides the padding before a shorter row (the layout
    /// of decoders exported from Hugging Face models, which take
    /// `position_ids`).
    #[default]
    Left,
    /// Every row starts at column 0 and its new tokens follow its own last
    /// one; the graph reads a row's length off the mask (sum of the row) and
    /// ignores the columns after it — ONNX Runtime's `GroupQueryAttention`.
    Right,
}

/// How a decoder's KV cache passes from one step to the next.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KvCache {
    /// The graph returns the whole cache, old and new positions, as new
    /// `present.*` tensors, which the next step passes back as past (any
    /// decoder graph).
    #[default]
    Copy,
    /// Each `past_key_values.*` and its `present.*` are bound to one tensor
    /// with room for more positions, and the graph writes only the new ones
    /// in place (ONNX Runtime's `GroupQueryAttention` with right padding).
    /// Checked when the model loads; CPU only — on CUDA the worker copies.
    Shared,
}

impl KvCache {
    /// The name in `config.yaml`.
    pub fn as_str(self) -> &'static str {
        match self {
            KvCache::Copy => "copy",
            KvCache::Shared => "shared",
        }
    }
}

/// How a generation model decodes and how much KV cache it may hold.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GenerationConfig {
    /// The padding side the decoder graph takes.
    pub padding: Padding,
    /// How the cache passes between steps.
    pub kv_cache: KvCache,
    /// Longest sequence (prompt + completion) the model supports.
    pub context_length: usize,
    /// The Jinja chat template, a file in the model directory. Absent: chat
    /// requests are refused and only raw prompts are served.
    pub chat_template: Option<String>,
    /// Values of `bos_token` and `eos_token` in the template.
    pub bos_token: String,
    pub eos_token: String,
    /// Token ids that end a completion.
    pub eos_token_ids: Vec<u32>,
    /// Sequences decoded together, at most.
    pub max_sequences: usize,
    /// KV-cache budget in token positions across the batch: rows times the
    /// longest reserved length (prompt + max_tokens) must stay within it.
    pub max_total_tokens: usize,
    /// `max_tokens` of requests that do not set one.
    pub default_max_tokens: usize,
    /// Requests waiting for a slot, at most; more → RESOURCE_EXHAUSTED.
    pub max_queue_size: usize,
    /// Prompt tokens run per forward pass and prefilled between two decode
    /// steps; a longer prompt goes on over several turns.
    pub prefill_chunk_tokens: usize,
    /// Positions of recently prefilled prompts kept so that a prompt sharing
    /// a beginning with one of them prefills only the rest (0: off).
    pub prefix_cache_tokens: usize,
}

impl Default for GenerationConfig {
    fn default() -> Self {
        GenerationConfig {
            padding: Padding::Left,
            kv_cache: KvCache::Copy,
            context_length: 2048,
            chat_template: None,
            bos_token: String::new(),
            eos_token: String::new(),
            eos_token_ids: Vec::new(),
            max_sequences: 16,
            max_total_tokens: 32768,
            default_max_tokens: 256,
            max_queue_size: 256,
            prefill_chunk_tokens: 1024,
            prefix_cache_tokens: 0,
        }
    }
}

/// Dynamic batching parameters.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DynamicBatching {
    /// Longest a request waits for others to join its batch.
    #[serde(with = "humantime_serde")]
    pub max_queue_delay: Duration,
    /// Batch sizes to run as soon as they can be formed.
    pub preferred_batch_sizes: Vec<usize>,
    /// Requests waiting, at most; more → RESOURCE_EXHAUSTED.
    pub max_queue_size: usize,
    /// Priority levels 1 (highest) ..= this; requests choose one with the
    /// `priority` parameter.
    pub priority_levels: usize,
    /// The level of requests that do not choose one.
    pub default_priority_level: usize,
}

impl Default for DynamicBatching {
    fn default() -> Self {
        DynamicBatching {
            max_queue_delay: Duration::from_micros(200),
            preferred_batch_sizes: Vec::new(),
            max_queue_size: 1024,
            priority_levels: 1,
            default_priority_level: 1,
        }
    }
}

/// Which versions of a model are served.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VersionPolicy {
    /// The newest N versions.
    Latest(usize),
    /// Every version present.
    All,
    /// Exactly these versions.
    Specific(Vec<u64>),
}

impl Default for VersionPolicy {
    fn default() -> Self {
        VersionPolicy::Latest(1)
    }
}

impl ModelConfig {
    /// Checks the config; errors name the key.
    pub fn validate(&self) -> Result<(), String> {
        if self.instance_count == 0 {
            return Err("instance_count: must be at least 1".into());
        }
        if self.intra_op_threads == 0 {
            return Err("intra_op_threads: must be at least 1".into());
        }
        if self.max_input_elements == 0 {
            return Err("max_input_elements: must be at least 1".into());
        }
        if let Some(file) = &self.cpu_graph {
            let simple = std::path::Path::new(file)
                .file_name()
                .is_some_and(|name| name == file.as_str());
            if !simple || !file.ends_with(".onnx") {
                return Err(format!(
                    "cpu_graph: '{file}' must be the name of an .onnx file in the version directory"
                ));
            }
        }
        if self.kind == ModelKind::Embedding && self.max_batch_size == 0 {
            return Err("kind: an embedding model needs max_batch_size > 0".into());
        }
        match (self.kind, &self.generation) {
            (ModelKind::Generation, None) => {
                return Err("generation: a generation model needs a generation section".into());
            }
            (ModelKind::Generation, Some(g)) => g.validate()?,
            (_, Some(_)) => return Err("generation: only for kind: generation".into()),
            (_, None) => {}
        }
        if self.kind == ModelKind::Generation && self.instance_count != 1 {
            return Err(
                "instance_count: a generation model runs one scheduler over one session; set 1"
                    .into(),
            );
        }
        if self.kind == ModelKind::Generation && self.dynamic_batching.is_some() {
            return Err(
                "dynamic_batching: generation models batch continuously; remove this section"
                    .into(),
            );
        }
        if let VersionPolicy::Latest(0) = self.version_policy {
            return Err("version_policy.latest: must be at least 1".into());
        }
        if let Some(batching) = &self.dynamic_batching {
            if self.max_batch_size == 0 {
                return Err("dynamic_batching: needs max_batch_size > 0".into());
            }
            if batching.max_queue_size == 0 {
                return Err("dynamic_batching.max_queue_size: must be at least 1".into());
            }
            if let Some(bad) = batching
                .preferred_batch_sizes
                .iter()
                .find(|&&s| s == 0 || s > self.max_batch_size)
            {
                return Err(format!(
                    "dynamic_batching.preferred_batch_sizes: {bad} is not within 1..={}",
                    self.max_batch_size
                ));
            }
            if batching.priority_levels == 0 {
                return Err("dynamic_batching.priority_levels: must be at least 1".into());
            }
            if batching.default_priority_level == 0
                || batching.default_priority_level > batching.priority_levels
            {
                return Err(format!(
                    "dynamic_batching.default_priority_level: must be within 1..={}",
                    batching.priority_levels
                ));
            }
        }
        Ok(())
    }
}

impl GenerationConfig {
    fn validate(&self) -> Result<(), String> {
        let positive = [
            ("context_length", self.context_length),
            ("max_sequences", self.max_sequences),
            ("max_total_tokens", self.max_total_tokens),
            ("default_max_tokens", self.default_max_tokens),
            ("max_queue_size", self.max_queue_size),
            ("prefill_chunk_tokens", self.prefill_chunk_tokens),
        ];
        for (key, value) in positive {
            if value == 0 {
                return Err(format!("generation.{key}: must be at least 1"));
            }
        }
        if self.eos_token_ids.is_empty() {
            return Err("generation.eos_token_ids: name at least one token id".into());
        }
        if self.default_max_tokens >= self.context_length {
            return Err("generation.default_max_tokens: must be below context_length".into());
        }
        if self.kv_cache == KvCache::Shared && self.padding != Padding::Right {
            return Err(
                "generation.kv_cache: shared needs padding: right (each row's new positions are written after its own, from column 0)"
                    .into(),
            );
        }
        Ok(())
    }
}

/// One model as found in a source.
#[derive(Debug, Clone)]
pub struct ModelFiles {
    pub config: ModelConfig,
    /// Version → ONNX file, ascending by version.
    pub versions: Vec<(u64, PathBuf)>,
    /// The tokenizer of an embedding or generation model, shared by its versions.
    pub tokenizer: Option<PathBuf>,
    /// The chat template's text (generation models that name one).
    pub chat_template: Option<String>,
}

impl ModelFiles {
    /// The versions the model's policy selects.
    pub fn selected(&self) -> Vec<(u64, PathBuf)> {
        match &self.config.version_policy {
            VersionPolicy::All => self.versions.clone(),
            VersionPolicy::Latest(n) => {
                self.versions.iter().rev().take(*n).rev().cloned().collect()
            }
            VersionPolicy::Specific(wanted) => self
                .versions
                .iter()
                .filter(|(v, _)| wanted.contains(v))
                .cloned()
                .collect(),
        }
    }
}

/// Where model files come from.
pub trait ModelSource: Send + Sync + std::fmt::Debug {
    /// Names of the models available.
    fn list(&self) -> Result<Vec<String>, String>;
    /// A model's config and version files.
    fn model(&self, name: &str) -> Result<ModelFiles, String>;
}

/// A model repository directory.
#[derive(Debug, Clone)]
pub struct DirectorySource {
    root: PathBuf,
}

impl DirectorySource {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        DirectorySource { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

impl ModelSource for DirectorySource {
    fn list(&self) -> Result<Vec<String>, String> {
        let entries = std::fs::read_dir(&self.root)
            .map_err(|e| format!("read model repository {}: {e}", self.root.display()))?;
        let mut names = Vec::new();
        for entry in entries.flatten() {
            let Ok(name) = entry.file_name().into_string() else {
                continue;
            };
            if entry.path().is_dir() && valid_name(&name) {
                names.push(name);
            }
        }
        names.sort();
        Ok(names)
    }

    fn model(&self, name: &str) -> Result<ModelFiles, String> {
        if !valid_name(name) {
            return Err(format!("invalid model name {name:?}"));
        }
        let dir = self.root.join(name);
        if !dir.is_dir() {
            return Err(format!("model '{name}' is not in the repository"));
        }
        let config_path = dir.join("config.yaml");
        let config = match std::fs::read_to_string(&config_path) {
            Ok(text) if text.trim().is_empty() => ModelConfig::default(),
            Ok(text) => yaml_serde::from_str::<ModelConfig>(&text)
                .map_err(|e| format!("{}: {e}", config_path.display()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => ModelConfig::default(),
            Err(e) => return Err(format!("read {}: {e}", config_path.display())),
        };
        config
            .validate()
            .map_err(|e| format!("{}: {e}", config_path.display()))?;
        let mut versions = Vec::new();
        let entries =
            std::fs::read_dir(&dir).map_err(|e| format!("read {}: {e}", dir.display()))?;
        for entry in entries.flatten() {
            let Ok(file_name) = entry.file_name().into_string() else {
                continue;
            };
            let Ok(version) = file_name.parse::<u64>() else {
                continue;
            };
            let model = entry.path().join("model.onnx");
            if version > 0 && model.is_file() {
                versions.push((version, model));
            }
        }
        versions.sort();
        if versions.is_empty() {
            return Err(format!(
                "model '{name}' has no version: expected {}/<version>/model.onnx",
                dir.display()
            ));
        }
        let tokenizer = match config.kind {
            ModelKind::Tensor => None,
            ModelKind::Embedding | ModelKind::Generation => {
                let path = dir.join("tokenizer.json");
                if !path.is_file() {
                    return Err(format!(
                        "model '{name}' is {} model but has no {}",
                        match config.kind {
                            ModelKind::Embedding => "an embedding",
                            _ => "a generation",
                        },
                        path.display()
                    ));
                }
                Some(path)
            }
        };
        let chat_template = match config
            .generation
            .as_ref()
            .and_then(|g| g.chat_template.as_ref())
        {
            None => None,
            Some(file) => {
                if !valid_name(file) {
                    return Err(format!(
                        "{}: generation.chat_template: {file:?} must be a file name in the model directory",
                        config_path.display()
                    ));
                }
                let path = dir.join(file);
                Some(
                    std::fs::read_to_string(&path)
                        .map_err(|e| format!("read chat template {}: {e}", path.display()))?,
                )
            }
        };
        Ok(ModelFiles {
            config,
            versions,
            tokenizer,
            chat_template,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files(policy: VersionPolicy) -> ModelFiles {
        ModelFiles {
            config: ModelConfig {
                version_policy: policy,
                ..ModelConfig::default()
            },
            versions: (1..=4)
                .map(|v| (v, PathBuf::from(format!("{v}/model.onnx"))))
                .collect(),
            tokenizer: None,
            chat_template: None,
        }
    }

    #[test]
    fn version_policies_select_versions() {
        let pick = |p| {
            files(p)
                .selected()
                .into_iter()
                .map(|(v, _)| v)
                .collect::<Vec<_>>()
        };
        assert_eq!(pick(VersionPolicy::Latest(1)), vec![4]);
        assert_eq!(pick(VersionPolicy::Latest(2)), vec![3, 4]);
        assert_eq!(pick(VersionPolicy::All), vec![1, 2, 3, 4]);
        assert_eq!(pick(VersionPolicy::Specific(vec![1, 3, 9])), vec![1, 3]);
    }

    #[test]
    fn config_parses_and_validates() {
        let config: ModelConfig = yaml_serde::from_str(
            "max_batch_size: 32\ndynamic_batching:\n  max_queue_delay: 2ms\n  preferred_batch_sizes: [8, 16]\ninstance_count: 2\nversion_policy:\n  latest: 2\nexecution_provider:\n  kind: cuda\n  on_unavailable: fallback_to_cpu\n",
        )
        .unwrap();
        assert_eq!(
            config.dynamic_batching.as_ref().unwrap().max_queue_delay,
            Duration::from_millis(2)
        );
        assert_eq!(config.version_policy, VersionPolicy::Latest(2));
        config.validate().unwrap();

        let all: ModelConfig = yaml_serde::from_str("version_policy: all\n").unwrap();
        assert_eq!(all.version_policy, VersionPolicy::All);

        let bad = ModelConfig {
            max_batch_size: 8,
            dynamic_batching: Some(DynamicBatching {
                preferred_batch_sizes: vec![16],
                ..DynamicBatching::default()
            }),
            ..ModelConfig::default()
        };
        assert!(
            bad.validate()
                .unwrap_err()
                .contains("preferred_batch_sizes")
        );
        assert!(yaml_serde::from_str::<ModelConfig>("max_batch: 3\n").is_err());

        let embedding: ModelConfig =
            yaml_serde::from_str("kind: embedding\nmax_batch_size: 32\n").unwrap();
        assert_eq!(embedding.kind, ModelKind::Embedding);
        embedding.validate().unwrap();
        let unbatched: ModelConfig = yaml_serde::from_str("kind: embedding\n").unwrap();
        assert!(unbatched.validate().unwrap_err().starts_with("kind:"));
        assert!(yaml_serde::from_str::<ModelConfig>("kind: llm\n").is_err());
    }

    #[test]
    fn generation_configs_are_checked_key_by_key() {
        let parse = |text: &str| yaml_serde::from_str::<ModelConfig>(text).unwrap();
        let good = parse(
            "kind: generation\nintra_op_threads: 2\ngeneration:\n  context_length: 8192\n  chat_template: chat_template.jinja\n  eos_token_ids: [2, 0]\n  max_sequences: 8\n",
        );
        good.validate().unwrap();
        let generation = good.generation.as_ref().unwrap();
        assert_eq!(generation.eos_token_ids, vec![2, 0]);
        assert_eq!(generation.max_total_tokens, 32768, "defaults fill the rest");

        let error = |text: &str| parse(text).validate().unwrap_err();
        assert!(error("kind: generation\n").starts_with("generation:"));
        assert!(
            error("kind: generation\ngeneration:\n  max_sequences: 4\n").contains("eos_token_ids")
        );
        assert!(
            error("kind: generation\ngeneration:\n  eos_token_ids: [2]\n  max_sequences: 0\n")
                .contains("generation.max_sequences")
        );
        assert!(
            error("kind: generation\ngeneration:\n  eos_token_ids: [2]\n  context_length: 100\n  default_max_tokens: 100\n")
                .contains("default_max_tokens")
        );
        assert!(
            error("kind: generation\ngeneration:\n  eos_token_ids: [2]\n  kv_cache: shared\n")
                .contains("padding: right")
        );
        let shared = parse(
            "kind: generation\ngeneration:\n  eos_token_ids: [2]\n  padding: right\n  kv_cache: shared\n",
        );
        assert!(shared.validate().is_ok());
        assert_eq!(shared.generation.unwrap().kv_cache, KvCache::Shared);
        assert!(
            error("kind: generation\ninstance_count: 2\ngeneration:\n  eos_token_ids: [2]\n")
                .starts_with("instance_count")
        );
        assert!(
            error("kind: generation\nmax_batch_size: 4\ndynamic_batching: {}\ngeneration:\n  eos_token_ids: [2]\n")
                .starts_with("dynamic_batching")
        );
        assert!(error("generation:\n  eos_token_ids: [2]\n").contains("only for kind: generation"));
        assert!(
            yaml_serde::from_str::<ModelConfig>("kind: generation\ngeneration:\n  max_seqs: 3\n")
                .is_err(),
            "unknown keys are refused"
        );
    }
}
