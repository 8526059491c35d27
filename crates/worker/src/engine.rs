//! ONNX Runtime: finding its shared library, creating sessions on an
//! execution provider, reading a model's signature from the graph, and running
//! a batch. Everything here is blocking and runs on the batcher's instance
//! threads, never on the async executor.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use half::f16;
use ort::environment::Environment;
use ort::ep::ExecutionProvider as _;
use ort::session::Session;
use ort::value::{DynValue, TensorElementType, ValueType};
use serde::Deserialize;

use crate::tensor::{DataType, Tensor, TensorData};

/// The ONNX Runtime release lmgrid is built against (`api-31`).
pub const ORT_VERSION: &str = "1.31.1";
/// The library file in the `onnxruntime` PyPI wheel (there is no unversioned symlink).
pub const ORT_LIBRARY: &str = "libonnxruntime.so.1.31.1";

/// A failure to set up or run ONNX Runtime.
#[derive(Debug, Clone, thiserror::Error)]
pub enum EngineError {
    #[error(
        "ONNX Runtime {ORT_VERSION} library not found (looked in: {tried}); run `cargo xtask deps` (or `lmgrid up`, on its first start) to install it into the cache, or point ORT_DYLIB_PATH or onnxruntime.library_path at {ORT_LIBRARY}"
    )]
    LibraryMissing { tried: String },
    #[error("load ONNX Runtime from {path}: {message}")]
    LibraryLoad { path: String, message: String },
    #[error("{0}")]
    Model(String),
    #[error(
        "the CUDA execution provider is not available in the loaded ONNX Runtime library ({0}); install onnxruntime-gpu=={ORT_VERSION} with CUDA 13 and cuDNN 9, or set execution_provider.on_unavailable: fallback_to_cpu"
    )]
    CudaUnavailable(String),
    #[error("inference failed: {0}")]
    Run(String),
}

/// Where to find ONNX Runtime.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OnnxRuntimeConfig {
    /// Path to `libonnxruntime.so.1.31.1`. Otherwise `ORT_DYLIB_PATH`, then
    /// the cache that `cargo xtask deps` and `lmgrid up` fill.
    pub library_path: Option<PathBuf>,
}

/// Which hardware runs a model.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProviderKind {
    #[default]
    Cpu,
    Cuda,
}

/// What to do when CUDA is asked for but not available.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnUnavailable {
    /// The model fails to load, saying why.
    #[default]
    Fail,
    /// The model runs on the CPU; the fallback is logged and shown in the
    /// model's execution provider (`cpu (cuda unavailable)`).
    FallbackToCpu,
}

/// The execution provider of a model.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ProviderConfig {
    pub kind: ProviderKind,
    /// CUDA device ordinal.
    pub device_id: i32,
    /// CUDA memory arena limit in bytes (none: ONNX Runtime's default).
    pub memory_limit_bytes: Option<u64>,
    pub on_unavailable: OnUnavailable,
}

/// The process-wide ONNX Runtime environment.
#[derive(Debug)]
pub struct Runtime {
    env: Environment,
    library: PathBuf,
}

static RUNTIME: OnceLock<Result<Runtime, EngineError>> = OnceLock::new();

impl Runtime {
    /// Loads ONNX Runtime once per process. The first call decides which
    /// library is used; a failure is remembered (restart after installing).
    pub fn get(config: &OnnxRuntimeConfig) -> Result<&'static Runtime, EngineError> {
        RUNTIME
            .get_or_init(|| Runtime::load(config))
            .as_ref()
            .map_err(Clone::clone)
    }

    fn load(config: &OnnxRuntimeConfig) -> Result<Runtime, EngineError> {
        let library = find_library(config)?;
        let env = ort::init_from(&library)
            .map_err(|e| EngineError::LibraryLoad {
                path: library.display().to_string(),
                message: e.to_string(),
            })?
            .with_name("lmgrid")
            .build()
            .map_err(|e| EngineError::LibraryLoad {
                path: library.display().to_string(),
                message: e.to_string(),
            })?;
        tracing::info!(library = %library.display(), "loaded ONNX Runtime");
        Ok(Runtime { env, library })
    }

    pub fn library(&self) -> &Path {
        &self.library
    }

    /// Whether the loaded library has the CUDA execution provider.
    pub fn cuda_available(&self) -> Result<bool, EngineError> {
        ort::ep::CUDA::is_available().map_err(|e| EngineError::Model(e.to_string()))
    }

    /// A session builder with `threads` intra-op threads, one inter-op
    /// thread and lmgrid's custom operators registered: what
    /// [`Runtime::session`] starts from, for callers that set more options
    /// (the benchmarks' profiling).
    pub fn builder(&self, threads: usize) -> ort::Result<ort::session::builder::SessionBuilder> {
        Ok(Session::builder(&self.env)?
            .with_intra_threads(threads.max(1))?
            .with_inter_threads(1)?
            .with_operators(lmgrid_kernels::domain()?)?)
    }

    /// Creates a session for `model` on `provider` with `threads` intra-op
    /// threads, with lmgrid's custom operators registered. When the session
    /// runs on the CPU and `cpu_model` is given, that graph is loaded
    /// instead if this CPU has the kernels' vector path
    /// ([`lmgrid_kernels::q4::accelerated`]). Returns the session, the
    /// provider actually used and the graph file loaded.
    pub fn session(
        &self,
        model: &Path,
        cpu_model: Option<&Path>,
        provider: &ProviderConfig,
        threads: usize,
    ) -> Result<(Session, String, PathBuf), EngineError> {
        let err = |e: ort::Error| EngineError::Model(format!("{}: {e}", model.display()));
        let mut builder = self.builder(threads).map_err(err)?;
        let used = match provider.kind {
            ProviderKind::Cpu => "cpu".to_string(),
            ProviderKind::Cuda => {
                let available = self.cuda_available()?;
                match (available, provider.on_unavailable) {
                    (true, _) => {
                        let mut cuda = ort::ep::CUDA::default().with_device_id(provider.device_id);
                        if let Some(limit) = provider.memory_limit_bytes {
                            cuda = cuda
                                .with_memory_limit(usize::try_from(limit).unwrap_or(usize::MAX));
                        }
                        builder = builder
                            .with_execution_providers([cuda.build().error_on_failure()])
                            .map_err(|e| err(e.into()))?;
                        format!("cuda:{}", provider.device_id)
                    }
                    (false, OnUnavailable::Fail) => {
                        return Err(EngineError::CudaUnavailable(
                            self.library.display().to_string(),
                        ));
                    }
                    (false, OnUnavailable::FallbackToCpu) => {
                        tracing::warn!(model = %model.display(), "CUDA unavailable; running on the CPU as configured");
                        "cpu (cuda unavailable)".to_string()
                    }
                }
            }
        };
        let file = match cpu_model {
            Some(cpu) if used.starts_with("cpu") && lmgrid_kernels::q4::accelerated() => cpu,
            _ => model,
        };
        let session = builder
            .commit_from_file(file)
            .map_err(|e| EngineError::Model(format!("{}: {e}", file.display())))?;
        Ok((session, used, file.to_path_buf()))
    }
}

fn find_library(config: &OnnxRuntimeConfig) -> Result<PathBuf, EngineError> {
    let mut tried = Vec::new();
    let mut candidates: Vec<PathBuf> = Vec::new();
    if let Some(path) = &config.library_path {
        candidates.push(path.clone());
    }
    if let Some(path) = std::env::var_os("ORT_DYLIB_PATH").filter(|p| !p.is_empty()) {
        candidates.push(PathBuf::from(path));
    }
    if let Some(cache) = cache_dir() {
        candidates.push(
            cache
                .join("onnxruntime")
                .join(ORT_VERSION)
                .join(ORT_LIBRARY),
        );
    }
    for candidate in candidates {
        if candidate.is_file() {
            return Ok(candidate);
        }
        tried.push(candidate.display().to_string());
    }
    Err(EngineError::LibraryMissing {
        tried: tried.join(", "),
    })
}

/// `LMGRID_CACHE_DIR`, else `$HOME/.cache/lmgrid` — where `cargo xtask deps` and `lmgrid up`
/// install (`lmgrid_setup::cache_dir` resolves it the same way).
fn cache_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("LMGRID_CACHE_DIR").filter(|d| !d.is_empty()) {
        return Some(PathBuf::from(dir));
    }
    std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .map(|h| Path::new(&h).join(".cache/lmgrid"))
}

/// A model input or output as declared by the graph; -1 marks a dynamic dimension.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorSpec {
    pub name: String,
    pub dtype: DataType,
    pub shape: Vec<i64>,
}

/// The inputs and outputs of a model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signature {
    pub inputs: Vec<TensorSpec>,
    pub outputs: Vec<TensorSpec>,
}

/// Reads the signature from a session's graph.
pub fn signature(session: &Session) -> Result<Signature, EngineError> {
    let spec = |outlet: &ort::value::Outlet, what: &str| -> Result<TensorSpec, EngineError> {
        let ValueType::Tensor { ty, shape, .. } = outlet.dtype() else {
            return Err(EngineError::Model(format!(
                "{what} '{}' is not a tensor; only tensor models are served",
                outlet.name()
            )));
        };
        let dtype = from_ort(*ty).ok_or_else(|| {
            EngineError::Model(format!(
                "{what} '{}' has unsupported element type {ty:?}",
                outlet.name()
            ))
        })?;
        Ok(TensorSpec {
            name: outlet.name().to_string(),
            dtype,
            shape: shape.to_vec(),
        })
    };
    Ok(Signature {
        inputs: session
            .inputs()
            .iter()
            .map(|o| spec(o, "input"))
            .collect::<Result<_, _>>()?,
        outputs: session
            .outputs()
            .iter()
            .map(|o| spec(o, "output"))
            .collect::<Result<_, _>>()?,
    })
}

fn from_ort(ty: TensorElementType) -> Option<DataType> {
    Some(match ty {
        TensorElementType::Bool => DataType::Bool,
        TensorElementType::Uint8 => DataType::Uint8,
        TensorElementType::Uint16 => DataType::Uint16,
        TensorElementType::Uint32 => DataType::Uint32,
        TensorElementType::Uint64 => DataType::Uint64,
        TensorElementType::Int8 => DataType::Int8,
        TensorElementType::Int16 => DataType::Int16,
        TensorElementType::Int32 => DataType::Int32,
        TensorElementType::Int64 => DataType::Int64,
        TensorElementType::Float16 => DataType::Fp16,
        TensorElementType::Float32 => DataType::Fp32,
        TensorElementType::Float64 => DataType::Fp64,
        TensorElementType::String => DataType::Bytes,
        _ => return None,
    })
}

fn to_value(tensor: Tensor) -> Result<DynValue, ort::Error> {
    use ort::value::Tensor as T;
    let shape = tensor.shape;
    Ok(match tensor.data {
        TensorData::Bool(v) => T::from_array((shape, v))?.into_dyn(),
        TensorData::Uint8(v) => T::from_array((shape, v))?.into_dyn(),
        TensorData::Uint16(v) => T::from_array((shape, v))?.into_dyn(),
        TensorData::Uint32(v) => T::from_array((shape, v))?.into_dyn(),
        TensorData::Uint64(v) => T::from_array((shape, v))?.into_dyn(),
        TensorData::Int8(v) => T::from_array((shape, v))?.into_dyn(),
        TensorData::Int16(v) => T::from_array((shape, v))?.into_dyn(),
        TensorData::Int32(v) => T::from_array((shape, v))?.into_dyn(),
        TensorData::Int64(v) => T::from_array((shape, v))?.into_dyn(),
        TensorData::Fp16(v) => T::from_array((shape, v))?.into_dyn(),
        TensorData::Fp32(v) => T::from_array((shape, v))?.into_dyn(),
        TensorData::Fp64(v) => T::from_array((shape, v))?.into_dyn(),
        TensorData::Bytes(v) => T::<String>::from_string_array((shape, v.as_slice()))?.into_dyn(),
    })
}

fn from_value(name: &str, value: &DynValue, dtype: DataType) -> Result<Tensor, ort::Error> {
    fn take<T: ort::value::PrimitiveTensorElementType + Clone>(
        value: &DynValue,
    ) -> Result<(Vec<i64>, Vec<T>), ort::Error> {
        let (shape, data) = value.try_extract_tensor::<T>()?;
        Ok((shape.to_vec(), data.to_vec()))
    }
    let (shape, data) = match dtype {
        DataType::Bool => take::<bool>(value).map(|(s, d)| (s, TensorData::Bool(d)))?,
        DataType::Uint8 => take::<u8>(value).map(|(s, d)| (s, TensorData::Uint8(d)))?,
        DataType::Uint16 => take::<u16>(value).map(|(s, d)| (s, TensorData::Uint16(d)))?,
        DataType::Uint32 => take::<u32>(value).map(|(s, d)| (s, TensorData::Uint32(d)))?,
        DataType::Uint64 => take::<u64>(value).map(|(s, d)| (s, TensorData::Uint64(d)))?,
        DataType::Int8 => take::<i8>(value).map(|(s, d)| (s, TensorData::Int8(d)))?,
        DataType::Int16 => take::<i16>(value).map(|(s, d)| (s, TensorData::Int16(d)))?,
        DataType::Int32 => take::<i32>(value).map(|(s, d)| (s, TensorData::Int32(d)))?,
        DataType::Int64 => take::<i64>(value).map(|(s, d)| (s, TensorData::Int64(d)))?,
        DataType::Fp16 => take::<f16>(value).map(|(s, d)| (s, TensorData::Fp16(d)))?,
        DataType::Fp32 => take::<f32>(value).map(|(s, d)| (s, TensorData::Fp32(d)))?,
        DataType::Fp64 => take::<f64>(value).map(|(s, d)| (s, TensorData::Fp64(d)))?,
        DataType::Bytes => {
            let (shape, strings) = value.try_extract_strings()?;
            (shape.to_vec(), TensorData::Bytes(strings))
        }
    };
    Ok(Tensor {
        name: name.to_string(),
        shape,
        data,
    })
}

/// Runs one (possibly batched) inference. `outputs` names the outputs to
/// return, with their datatypes from the signature.
pub fn run(
    session: &mut Session,
    inputs: Vec<Tensor>,
    outputs: &[(String, DataType)],
) -> Result<Vec<Tensor>, EngineError> {
    let values = inputs
        .into_iter()
        .map(|t| {
            let name = t.name.clone();
            to_value(t).map(|v| (name, v))
        })
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| EngineError::Run(e.to_string()))?;
    let results = session
        .run(values)
        .map_err(|e| EngineError::Run(e.to_string()))?;
    outputs
        .iter()
        .map(|(name, dtype)| {
            let value = results.get(name).ok_or_else(|| {
                EngineError::Run(format!("the model produced no output '{name}'"))
            })?;
            from_value(name, value, *dtype).map_err(|e| EngineError::Run(e.to_string()))
        })
        .collect()
}
