//! Model routing records: which version each alias of a model names, and how
//! requests that name no version are split between versions (`stable` 90,
//! `canary` 10). The model registry writes one record per model at
//! `<prefix>/models/<model>`; gateways watch the prefix and route by it.
//!
//! The record is JSON; fields it does not know are ignored, so the registry
//! may keep more about a model in the same record. Keys below a model's key
//! (`<prefix>/models/<model>/...`) are the registry's own and not records.
//!
//! ```json
//! {"aliases": {"stable": "1", "canary": "2"},
//!  "traffic": [{"version": "1", "weight": 90}, {"version": "2", "weight": 10}]}
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

/// The largest weight one version may have; weights are relative, so this
/// only keeps sums far from overflowing.
pub const MAX_WEIGHT: u32 = 1_000_000;

/// How a model's requests reach its versions.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelRecord {
    /// Alias → version: a request naming the alias is served by that version.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub aliases: BTreeMap<String, String>,
    /// How requests that name no version are split between versions, by
    /// relative weight. Empty: any version a ready worker serves.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub traffic: Vec<TrafficWeight>,
}

/// One version's share of a model's traffic.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrafficWeight {
    pub version: String,
    /// Relative weight, 0 to [`MAX_WEIGHT`]; 0 sends the version nothing.
    pub weight: u32,
}

impl ModelRecord {
    /// Checks what a reader cannot route by: empty names, duplicate versions
    /// in `traffic`, weights out of range or all zero.
    pub fn validate(&self) -> Result<(), String> {
        for (alias, version) in &self.aliases {
            if alias.is_empty() || version.is_empty() {
                return Err(format!(
                    "alias {alias:?} → {version:?}: neither may be empty"
                ));
            }
        }
        let mut seen = BTreeSet::new();
        for share in &self.traffic {
            if share.version.is_empty() {
                return Err("traffic: a version is empty".into());
            }
            if !seen.insert(share.version.as_str()) {
                return Err(format!(
                    "traffic: version {:?} is listed twice",
                    share.version
                ));
            }
            if share.weight > MAX_WEIGHT {
                return Err(format!(
                    "traffic: version {:?} has weight {}; the most is {MAX_WEIGHT}",
                    share.version, share.weight
                ));
            }
        }
        if !self.traffic.is_empty() && self.traffic.iter().all(|s| s.weight == 0) {
            return Err("traffic: every weight is 0".into());
        }
        Ok(())
    }
}

/// The model records as last seen, keyed by model name.
pub type ModelRecords = Arc<BTreeMap<String, ModelRecord>>;

/// A locally kept, continuously updated table of the model records.
#[derive(Debug, Clone)]
pub struct ModelTable {
    rx: watch::Receiver<ModelRecords>,
}

impl ModelTable {
    pub(crate) fn new(rx: watch::Receiver<ModelRecords>) -> Self {
        ModelTable { rx }
    }

    /// A table that never changes, e.g. with no store behind it.
    pub fn fixed(records: BTreeMap<String, ModelRecord>) -> Self {
        // A receiver whose sender is gone still reads the last value.
        let (_, rx) = watch::channel(Arc::new(records));
        ModelTable { rx }
    }

    /// The records now.
    pub fn records(&self) -> ModelRecords {
        self.rx.borrow().clone()
    }

    /// Waits until `predicate` holds for the table and returns it.
    pub async fn wait_for(
        &mut self,
        mut predicate: impl FnMut(&BTreeMap<String, ModelRecord>) -> bool,
    ) -> Result<ModelRecords, watch::error::RecvError> {
        let records = self.rx.wait_for(|r| predicate(r)).await?;
        Ok(records.clone())
    }
}

/// The etcd key of a model's record.
pub fn model_key(prefix: &str, model: &str) -> String {
    format!("{prefix}/models/{model}")
}

/// The etcd key prefix of the model records.
pub fn models_prefix(prefix: &str) -> String {
    format!("{prefix}/models/")
}

/// Reads the record stored at `rest` (the key after the models prefix):
/// `None` for keys that are not records (below a model's key), else the
/// record or why it cannot be used.
pub(crate) fn decode(rest: &str, value: &[u8]) -> Option<(String, Result<ModelRecord, String>)> {
    if rest.is_empty() || rest.contains('/') {
        return None;
    }
    let record = serde_json::from_slice::<ModelRecord>(value)
        .map_err(|e| e.to_string())
        .and_then(|record| record.validate().map(|()| record));
    Some((rest.to_string(), record))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_read_the_documented_json_and_ignore_unknown_fields() {
        let json = br#"{"aliases": {"stable": "1", "canary": "2"},
            "traffic": [{"version": "1", "weight": 90}, {"version": "2", "weight": 10}],
            "description": "kept by the registry"}"#;
        let (name, record) = decode("m", json).unwrap();
        let record = record.unwrap();
        assert_eq!(name, "m");
        assert_eq!(record.aliases["canary"], "2");
        assert_eq!(record.traffic[1].weight, 10);
        assert!(
            decode("m/versions/1", json).is_none(),
            "the registry's own keys"
        );
        assert!(decode("", json).is_none());
        let round = serde_json::to_vec(&record).unwrap();
        assert_eq!(decode("m", &round).unwrap().1.unwrap(), record);
    }

    #[test]
    fn unusable_records_say_why() {
        let bad = |json: &str| decode("m", json.as_bytes()).unwrap().1.unwrap_err();
        assert!(bad("not json").contains("expected"));
        assert!(bad(r#"{"traffic": [{"version": "1", "weight": 0}]}"#).contains("every weight"));
        assert!(
            bad(r#"{"traffic": [{"version": "1", "weight": 1}, {"version": "1", "weight": 2}]}"#)
                .contains("twice")
        );
        assert!(bad(r#"{"traffic": [{"version": "1", "weight": 2000000}]}"#).contains("most"));
        assert!(bad(r#"{"aliases": {"stable": ""}}"#).contains("empty"));
        assert!(bad(r#"{"traffic": [{"version": "1", "weight": -1}]}"#).contains("invalid"));
        assert_eq!(
            decode("m", b"{}").unwrap().1.unwrap(),
            ModelRecord::default()
        );
    }
}
