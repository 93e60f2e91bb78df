//! What a benchmark run is: the model, the particles, the data files, the settings
//! (`bench_config.json`). Restarting a run and merging shards both require the same
//! configuration; paths may differ (files are identified by their SHA-256).

use std::fmt;
use std::path::Path;
use std::str::FromStr;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::bella::particles::{Abstention, FileHash, ParticleConfig, PARTICLES_FILE};
use crate::data::DataFormat;
use crate::metrics::NormalizeMode;

/// The file name of the run configuration.
pub const CONFIG_FILE: &str = "bench_config.json";

/// The `i`-th of `n` deterministic slices of every data file: the questions whose position `k`
/// (after `--limit`) has `k % n == i`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Shard {
    pub index: usize,
    pub count: usize,
}

impl Shard {
    pub fn new(index: usize, count: usize) -> Result<Self> {
        if count == 0 || index >= count {
            bail!("shard {index}/{count} does not exist: use i/n with 0 <= i < n (e.g. 0/4 … 3/4)");
        }
        Ok(Self { index, count })
    }

    /// Whether the question at position `k` belongs to this shard.
    pub fn contains(&self, k: usize) -> bool {
        k % self.count == self.index
    }
}

impl fmt::Display for Shard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

impl FromStr for Shard {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        let parse = || -> Option<(usize, usize)> {
            let (i, n) = s.split_once('/')?;
            Some((i.trim().parse().ok()?, n.trim().parse().ok()?))
        };
        match parse() {
            Some((i, n)) => Shard::new(i, n),
            None => bail!("--shard {s:?}: expected i/n, e.g. 0/4 for the first of four shards"),
        }
    }
}

/// Which part a data file plays.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// `--data`: the evaluated questions.
    Test,
    /// `--val`: used only to choose thresholds.
    Val,
    /// `--ood-data`: out-of-distribution questions, detected against the test questions.
    Ood,
}

/// The base model.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelRecord {
    /// As given to `--model`.
    pub source: String,
    /// The hub commit the files came from (a hub id's branch moves on; the weights' SHA-256s
    /// below are what is compared).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commit: Option<String>,
    pub architecture: String,
    pub weights: Vec<FileHash>,
    /// `--quantize` (`q8_0`, `q4k`, `+vision` with `--quantize-vision`); absent: a dense base.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quantization: Option<String>,
    /// The dtype the model computed in (`--dtype`, resolved): answers in another one are not
    /// mixed into the same run.
    #[serde(default)]
    pub compute_dtype: String,
}

/// How [`ModelRecord::quantization`] names `--quantize KIND` (with `--quantize-vision`).
pub fn quantization_name(kind: &str, vision: bool) -> String {
    format!("{kind}{}", if vision { "+vision" } else { "" })
}

/// The particle directory.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AdaptersRecord {
    /// As given to `--adapters`.
    pub path: String,
    /// SHA-256 of `particles.safetensors`.
    pub sha256: String,
    /// The base model named in the particles' config.
    pub base: String,
    pub method: String,
    pub particles: usize,
    pub rank: usize,
    /// The LoRA scale's numerator (`bella_config.json`'s alpha; not in the factors' file, so an
    /// edited or re-imported alpha is another run). Absent in runs of earlier versions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alpha: Option<f64>,
    pub targets: Vec<String>,
    pub abstention: Option<Abstention>,
}

impl AdaptersRecord {
    pub fn read(dir: &Path) -> Result<Self> {
        let config: ParticleConfig = crate::bella::particles::ParticleSet::read_config(dir)?;
        Ok(Self {
            path: crate::io::stored_path(dir),
            sha256: crate::io::sha256_file(&dir.join(PARTICLES_FILE))?,
            base: config.base_model.source,
            method: config.method,
            particles: config.particles,
            rank: config.rank,
            alpha: Some(config.alpha),
            targets: config.targets,
            abstention: config.abstention,
        })
    }
}

/// One data file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DataRecord {
    /// The `split` of its samples: `test`, `val` or the OOD file's name.
    pub split: String,
    pub role: Role,
    /// As given.
    pub path: String,
    pub format: DataFormat,
    pub sha256: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotations: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotations_sha256: Option<String>,
    /// Good questions in the file.
    pub questions: usize,
    /// Bad records left out with `--skip-bad`.
    pub skipped_records: usize,
    /// Questions after `--limit` (before `--shard`).
    pub selected: usize,
    /// Of the selected questions, those that are training questions of the particles
    /// ([`crate::data::seen`]); absent when the particles record none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub training_questions: Option<usize>,
}

/// Everything that decides the answers of a run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunConfig {
    pub model: ModelRecord,
    pub adapters: Option<AdaptersRecord>,
    /// Test first, then validation, then the OOD files, in the order given.
    pub data: Vec<DataRecord>,
    pub normalize: NormalizeMode,
    /// The abstention threshold the answers were given with.
    pub threshold: f64,
    /// Where it came from: `calibration (…)`, `--threshold` or `default, uncalibrated`.
    pub threshold_from: String,
    pub max_new_tokens: usize,
    /// Whether an answer was limited to the room its prompt leaves in the model's positions
    /// (the default limit) or the limit was kept (`--max-new-tokens` given). Absent in runs of
    /// earlier versions, which answered no question that needs the room: either matches them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub answers_within_room: Option<bool>,
    /// CLIP: the candidate answers (`--answers`), if given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub answers_file_sha256: Option<String>,
    pub decoding: String,
    pub limit: Option<usize>,
    pub shard: Option<Shard>,
    pub bella_vqa_version: String,
    /// When the run (its first invocation) started, UTC.
    pub created: String,
}

impl RunConfig {
    /// The test data record.
    pub fn test(&self) -> Option<&DataRecord> {
        self.data.iter().find(|d| d.role == Role::Test)
    }

    /// The positions of the questions of `data` this run answers.
    pub fn selection(&self, data: &DataRecord) -> impl Iterator<Item = usize> + '_ {
        let shard = self.shard;
        (0..data.selected).filter(move |&k| shard.is_none_or(|s| s.contains(k)))
    }

    /// The comparable part: no paths, no version; without the limit and selection when
    /// `ignore_limit` (restarting), without the shard when `ignore_shard` (merging).
    fn identity(&self, ignore_limit: bool, ignore_shard: bool) -> Value {
        let mut v = serde_json::to_value(self).unwrap_or(Value::Null);
        let Some(c) = v.as_object_mut() else {
            return v;
        };
        c.remove("bella_vqa_version");
        c.remove("created");
        if ignore_limit {
            c.remove("limit");
        }
        if ignore_shard {
            c.remove("shard");
        }
        if let Some(m) = c.get_mut("model").and_then(Value::as_object_mut) {
            m.remove("source");
            m.remove("commit");
        }
        if let Some(a) = c.get_mut("adapters").and_then(Value::as_object_mut) {
            a.remove("path");
        }
        for d in c
            .get_mut("data")
            .and_then(Value::as_array_mut)
            .into_iter()
            .flatten()
            .filter_map(Value::as_object_mut)
        {
            d.remove("path");
            d.remove("annotations");
            // Follows from the data and the particles, which are compared themselves.
            d.remove("training_questions");
            if ignore_limit {
                d.remove("selected");
            }
        }
        v
    }

    /// This stored run with what its version did not record taken from `current` (the run
    /// that would continue it), so that only what both recorded is compared.
    pub fn with_unrecorded_from(mut self, current: &RunConfig) -> Self {
        if let (Some(old), Some(new)) = (&mut self.adapters, &current.adapters) {
            old.alpha = old.alpha.or(new.alpha);
        }
        self.answers_within_room = self.answers_within_room.or(current.answers_within_room);
        self
    }

    /// What differs between two runs that should be the same (empty when they match).
    pub fn differences(
        &self,
        other: &RunConfig,
        ignore_limit: bool,
        ignore_shard: bool,
    ) -> Vec<String> {
        let mut out = Vec::new();
        diff(
            "",
            &self.identity(ignore_limit, ignore_shard),
            &other.identity(ignore_limit, ignore_shard),
            &mut out,
        );
        out
    }

    pub fn read(dir: &Path) -> Result<Self> {
        let path = dir.join(CONFIG_FILE);
        let text =
            crate::input::read_to_string(&path, "bench configuration").with_context(|| {
                format!(
                    "cannot read {} (is {} a bench directory?)",
                    path.display(),
                    dir.display()
                )
            })?;
        serde_json::from_str(&text)
            .with_context(|| format!("{} is not a bench configuration", path.display()))
    }

    pub fn write(&self, dir: &Path) -> Result<()> {
        let json = serde_json::to_vec_pretty(self).context("serialising the configuration")?;
        crate::io::write_bytes_atomically(&dir.join(CONFIG_FILE), &json)
    }
}

fn short(v: &Value) -> String {
    let s = v.to_string();
    if s.chars().count() > 80 {
        format!("{}…", s.chars().take(80).collect::<String>())
    } else {
        s
    }
}

/// The leaves where `a` and `b` differ, as `path: a vs b`. Lists of different lengths are
/// compared entry by entry, a missing entry standing as an empty object, so that what an extra
/// data file is shows field by field (`data[1].role: null vs "val"`).
fn diff(path: &str, a: &Value, b: &Value, out: &mut Vec<String>) {
    let empty = serde_json::Map::new();
    let join = |k: &str| {
        if path.is_empty() {
            k.to_string()
        } else {
            format!("{path}.{k}")
        }
    };
    let objects = match (a, b) {
        (Value::Object(x), Value::Object(y)) => Some((x, y)),
        (Value::Object(x), Value::Null) => Some((x, &empty)),
        (Value::Null, Value::Object(y)) => Some((&empty, y)),
        _ => None,
    };
    if let Some((x, y)) = objects {
        let keys: std::collections::BTreeSet<&String> = x.keys().chain(y.keys()).collect();
        for k in keys {
            let (u, v) = (
                x.get(k).unwrap_or(&Value::Null),
                y.get(k).unwrap_or(&Value::Null),
            );
            diff(&join(k), u, v, out);
        }
        return;
    }
    match (a, b) {
        // A vector of numbers (an image check's mean, a map's knots) is one line, not one per
        // value, so that the differences that tell runs apart are not buried.
        (Value::Array(x), Value::Array(y))
            if x.len() == y.len() && x.iter().chain(y).all(Value::is_number) =>
        {
            let differ: Vec<usize> = (0..x.len()).filter(|&i| x[i] != y[i]).collect();
            if let Some(&i) = differ.first() {
                out.push(format!(
                    "{path}: {} of {} values differ (the first, [{i}]: {} vs {})",
                    differ.len(),
                    x.len(),
                    short(&x[i]),
                    short(&y[i])
                ));
            }
        }
        (Value::Array(x), Value::Array(y)) => {
            if x.len() != y.len() {
                out.push(format!("{path}: {} vs {} entries", x.len(), y.len()));
            }
            for i in 0..x.len().max(y.len()) {
                let (u, v) = (
                    x.get(i).unwrap_or(&Value::Null),
                    y.get(i).unwrap_or(&Value::Null),
                );
                diff(&format!("{path}[{i}]"), u, v, out);
            }
        }
        _ if a != b => out.push(format!("{path}: {} vs {}", short(a), short(b))),
        _ => {}
    }
}

/// The current UTC time as RFC 3339 (`2026-05-01T12:34:56Z`).
pub fn utc_timestamp() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// The peak resident set size of this process in KiB (`VmHWM` of `/proc/self/status`; Linux only).
pub fn peak_memory_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    #[test]
    fn a_vector_of_numbers_that_differs_is_one_line() {
        let mut out = Vec::new();
        super::diff(
            "",
            &json!({"method": "svgd", "mean": [1.0, 2.0, 3.0]}),
            &json!({"method": "ensemble", "mean": [1.0, 2.5, 3.5]}),
            &mut out,
        );
        assert_eq!(
            out,
            [
                "mean: 2 of 3 values differ (the first, [1]: 2.0 vs 2.5)",
                "method: \"svgd\" vs \"ensemble\""
            ]
        );
    }

    #[test]
    fn an_extra_data_file_shows_field_by_field() {
        let mut out = Vec::new();
        super::diff(
            "",
            &json!({"data": [{"role": "test", "questions": 400}], "normalize": "official"}),
            &json!({"data": [{"role": "test", "questions": 400}, {"role": "val", "questions": 50}],
                    "normalize": "official"}),
            &mut out,
        );
        assert_eq!(
            out,
            [
                "data: 1 vs 2 entries",
                "data[1].questions: null vs 50",
                "data[1].role: null vs \"val\""
            ]
        );
    }
}
