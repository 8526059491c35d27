//! Small ONNX models built in Rust, so tests and benchmarks need neither Python nor model
//! files checked into the repository.
//!
//! - [`proto`] holds the part of the ONNX protobuf schema the models use, as `prost`
//!   messages; [`ModelProto::to_bytes`] gives the `.onnx` file contents.
//! - [`GraphBuilder`] declares inputs, outputs, constants and nodes, described with
//!   [`ElemType`] and [`Dim`].
//! - The fixtures, all with a dynamic leading `batch` axis: [`identity`] for every element
//!   type, [`add_mul`] with two outputs, [`mlp`] with seeded weights and a plain-Rust
//!   [`Mlp::reference`], [`variable_seq`] with a dynamic second axis, and [`broken`] bytes.
//! - [`write_model`] and [`model_repository`] lay models out on disk as the worker reads them:
//!   `<root>/<model>/<version>/model.onnx` beside `<root>/<model>/config.yaml`.
//!
//! Models use IR version [`IR_VERSION`] and the default ONNX domain at [`OPSET_VERSION`],
//! which ONNX Runtime 1.31 runs. Every fixture passes `onnx.checker.check_model` with
//! `full_check=True` and gives the expected results in ONNX Runtime; that was verified once
//! by hand, since CI must not depend on Python's `onnx` package.

mod builder;
mod fixtures;
pub mod proto;

use std::io;
use std::path::{Path, PathBuf};

pub use builder::{Dim, ElemType, GraphBuilder};
pub use fixtures::{Linear, Mlp, add_mul, broken, identity, mlp, random_f32, variable_seq};
pub use proto::{
    AttributeProto, GraphProto, ModelProto, NodeProto, OperatorSetIdProto, TensorProto,
    TensorShapeProto, TypeProto, ValueInfoProto,
};

/// The ONNX IR version of built models (IR version 8 came with ONNX 1.10).
pub const IR_VERSION: i64 = 8;

/// The version of the default ONNX operator set that built models import.
pub const OPSET_VERSION: i64 = 17;

/// The `producer_name` of built models.
pub const PRODUCER_NAME: &str = "lmgrid-test-support";

/// The file name of a model version's ONNX file.
pub const MODEL_FILE: &str = "model.onnx";

/// The file name of a model's configuration, beside its version directories.
pub const CONFIG_FILE: &str = "config.yaml";

/// Writes `model` to `<dir>/model.onnx`, creating `dir` if needed, and returns the file's
/// path.
pub fn write_model(dir: &Path, model: &ModelProto) -> io::Result<PathBuf> {
    write_model_bytes(dir, &model.to_bytes())
}

/// Writes `bytes` (such as [`broken`]'s) to `<dir>/model.onnx`, creating `dir` if needed, and
/// returns the file's path.
pub fn write_model_bytes(dir: &Path, bytes: &[u8]) -> io::Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let path = dir.join(MODEL_FILE);
    std::fs::write(&path, bytes)?;
    Ok(path)
}

/// Lays out one model of a model repository and returns its directory, `<root>/<model_name>`:
/// each `(version, model)` goes to `<version>/model.onnx` in it, and `config_yaml` to
/// `config.yaml`. The worker defines what the configuration says.
pub fn model_repository(
    root: &Path,
    model_name: &str,
    versions: &[(&str, &ModelProto)],
    config_yaml: &str,
) -> io::Result<PathBuf> {
    let dir = root.join(model_name);
    std::fs::create_dir_all(&dir)?;
    for (version, model) in versions {
        write_model(&dir.join(version), model)?;
    }
    std::fs::write(dir.join(CONFIG_FILE), config_yaml)?;
    Ok(dir)
}

#[cfg(test)]
mod tests;
