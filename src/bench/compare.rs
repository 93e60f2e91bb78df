//! `bench --compare base,DIR,name=DIR`: the same questions with several particle sets (or none),
//! each into its own sub-directory, then one side-by-side table.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::bootstrap::{significant, Bootstrap};
use super::results::{self, ResultsFile, Timing};
use super::samples::{read_samples, Sample, SAMPLES_FILE};
use super::{BenchOptions, ModelSpec};
use crate::answer::{LoadOptions, ModelInputs};
use crate::hub::ModelSource;
use crate::report::{self, plot, Block, Document};

/// One contestant: a name (its sub-directory) and its particles (`None`: the base model).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CompareEntry {
    pub name: String,
    pub adapters: Option<PathBuf>,
}

impl CompareEntry {
    /// `base` (no particles), `name=DIR`, or `DIR` (named after its last component).
    pub fn parse(s: &str) -> Result<Self> {
        let s = s.trim();
        if s.is_empty() {
            bail!("an empty --compare entry: use base, DIR or name=DIR");
        }
        let (name, adapters) = match s.split_once('=') {
            Some((n, d)) => (
                n.trim().to_string(),
                (d.trim() != "base").then(|| PathBuf::from(d.trim())),
            ),
            None if s == "base" => ("base".to_string(), None),
            None => {
                let p = PathBuf::from(s);
                let name = p
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                (name, Some(p))
            }
        };
        if name.is_empty()
            || name == "."
            || name == ".."
            || name.contains(['/', '\\'])
            || name.starts_with('.')
        {
            bail!("--compare entry {s:?}: {name:?} cannot name a sub-directory; write name=DIR");
        }
        // The comparison's own files sit beside the runs' sub-directories.
        if name.starts_with("comparison") {
            bail!(
                "--compare entry {s:?}: {name:?} is taken by the comparison's own files \
                 (comparison.json, comparison.md, …); write another name=DIR"
            );
        }
        Ok(Self { name, adapters })
    }

    /// Parses every entry and checks that the names are distinct.
    pub fn parse_all(items: &[String]) -> Result<Vec<Self>> {
        let entries: Vec<Self> = items
            .iter()
            .map(|s| Self::parse(s))
            .collect::<Result<_>>()?;
        for (i, e) in entries.iter().enumerate() {
            if entries[..i].iter().any(|o| o.name == e.name) {
                bail!(
                    "two --compare entries are named {:?}: give them names with name=DIR",
                    e.name
                );
            }
        }
        if entries.is_empty() {
            bail!("--compare needs at least one entry (base, DIR or name=DIR)");
        }
        Ok(entries)
    }
}

/// One row of `comparison.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ComparedRun {
    pub name: String,
    pub adapters: Option<PathBuf>,
    pub dir: PathBuf,
    pub results: serde_json::Map<String, Value>,
    pub timing: Timing,
    pub complete: bool,
}

/// A run's metrics minus the first run's, with paired bootstrap intervals.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Difference {
    pub name: String,
    /// The run it is compared with (the first entry).
    pub against: String,
    /// Metric key → 95 % paired bootstrap interval of (this run − `against`); empty with
    /// `--bootstrap 0` (the table then gives the differences alone).
    pub intervals: BTreeMap<String, [f64; 2]>,
}

/// `comparison.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Comparison {
    /// The metric keys of the table, in order.
    pub metrics: Vec<String>,
    pub runs: Vec<ComparedRun>,
    /// Every run after the first against the first (empty when the runs did not answer the same
    /// questions).
    #[serde(default)]
    pub differences: Vec<Difference>,
    pub written: String,
}

/// Keys of the comparison table, besides OOD keys.
const TABLE: &[&str] = &[
    "count",
    "vqa_accuracy",
    "coverage",
    "answered_accuracy",
    "ece",
    "ece_equal_mass",
    "nll",
    "brier",
    "error_auroc",
    "error_aupr",
    "aurc",
    "excess_aurc",
    "coverage_at_risk_1pct",
    "coverage_at_risk_5pct",
    "coverage_at_risk_10pct",
    "phi_1",
    "phi_10",
    "phi_100",
    "thresholds_from",
];

/// Runs the benchmark `opts` for every entry into `opts.out/{name}` (each resumable), then writes
/// `comparison.json`, `comparison.md`, `comparison.html` and `comparison_risk_coverage.svg` into
/// `opts.out`. `answers`: a CLIP's candidate answers for every entry (`--answers`).
pub fn compare(
    source: &ModelSource,
    model: &ModelSpec,
    entries: &[CompareEntry],
    load: &LoadOptions,
    opts: &BenchOptions,
    answers: Option<&[String]>,
) -> Result<(Comparison, Vec<PathBuf>)> {
    // Every entry is checked before the first runs (its particles against the base's weights,
    // the answer list against its calibration): a typo or another base in the last one should
    // not cost the hours the others take (the weights' hashes are remembered, so the loads
    // check them again cheaply).
    let inputs = entries
        .iter()
        .map(|e| {
            ModelInputs::check(
                source.clone(),
                e.adapters.clone(),
                answers.map(<[String]>::to_vec),
                opts.threshold.is_some(),
                load,
            )
            .with_context(|| format!("--compare entry {}", e.name))
        })
        .collect::<Result<Vec<_>>>()?;
    // Each entry's directory is locked for the whole comparison: a `bench --out OUT/name`
    // started beside it would append to the same answers.
    let locks = entries
        .iter()
        .map(|e| crate::io::OutputLock::acquire(&opts.out.join(&e.name)))
        .collect::<Result<Vec<_>>>()?;
    let mut done: Vec<(CompareEntry, PathBuf, ResultsFile)> = Vec::new();
    for (e, inputs) in entries.iter().zip(&inputs) {
        // A Ctrl-C after an entry: the next one is not loaded.
        if crate::interrupt::requested() {
            return Err(crate::interrupt::Interrupted(format!(
                "interrupted before --compare entry {}; the entries before it are kept: the \
                 same command continues",
                e.name
            ))
            .into());
        }
        if opts.progress {
            crate::note!(
                "== {}: {}",
                e.name,
                e.adapters
                    .as_ref()
                    .map_or("base model".into(), |a| a.display().to_string())
            );
        }
        let vqa = inputs.load(load)?;
        let dir = opts.out.join(&e.name);
        let sub = BenchOptions {
            out: dir.clone(),
            ..opts.clone()
        };
        let spec = ModelSpec {
            adapters: e.adapters.clone(),
            ..model.clone()
        };
        let outcome = super::run(&vqa, &spec, &sub)?;
        done.push((e.clone(), dir, outcome.results));
    }
    let written = write_comparison(&opts.out, &done, &opts.bootstrap);
    drop(locks);
    written
}

/// Paired intervals of every run after the first against the first, resampling the same
/// questions for all; `None` when the runs did not answer the same questions of the same data.
fn differences(
    done: &[(CompareEntry, PathBuf, ResultsFile)],
    bootstrap: &Bootstrap,
) -> Result<Option<Vec<Difference>>> {
    let Some((first, _, base)) = done.first() else {
        return Ok(None);
    };
    if done.len() < 2 {
        return Ok(None);
    }
    let config = &base.config;
    let mut samples = Vec::with_capacity(done.len());
    for (_, dir, r) in done {
        let same_data = r.config.normalize == config.normalize
            && r.config.data.len() == config.data.len()
            && r.config.data.iter().zip(&config.data).all(|(a, b)| {
                a.split == b.split && a.sha256 == b.sha256 && a.selected == b.selected
            });
        if !same_data || !r.progress.complete {
            return Ok(None);
        }
        samples.push(read_samples(&dir.join(SAMPLES_FILE))?.samples);
    }
    let against_first = |intervals: Vec<BTreeMap<String, [f64; 2]>>| {
        done.iter()
            .skip(1)
            .zip(intervals)
            .map(|((e, _, _), intervals)| Difference {
                name: e.name.clone(),
                against: first.name.clone(),
                intervals,
            })
            .collect()
    };
    if bootstrap.resamples == 0 {
        // The differences without intervals.
        return Ok(Some(against_first(vec![BTreeMap::new(); done.len() - 1])));
    }
    let groups: Vec<Vec<Vec<&Sample>>> = done
        .iter()
        .zip(&samples)
        .map(|((_, _, r), s)| {
            let (chosen, _) = results::select(&r.config, s, &[]);
            results::split_samples(&r.config, &chosen)
        })
        .collect();
    let runs: Vec<&[Vec<&Sample>]> = groups.iter().map(Vec::as_slice).collect();
    let metric = |drawn: &[Vec<&Sample>]| {
        let (test, val, ood) = results::roles(config, drawn);
        Ok(results::metrics_of(config, &test, &val, &ood)?.results)
    };
    let of_group = |key: &str, g: usize| results::is_metric_of(config, key, g);
    let diffs = super::bootstrap::paired(&runs, bootstrap, metric, of_group)?;
    Ok(Some(against_first(diffs)))
}

/// Writes the comparison files of finished runs.
pub fn write_comparison(
    out: &Path,
    done: &[(CompareEntry, PathBuf, ResultsFile)],
    bootstrap: &Bootstrap,
) -> Result<(Comparison, Vec<PathBuf>)> {
    let differences = differences(done, bootstrap)?;
    let mut metrics: Vec<String> = TABLE.iter().map(|s| s.to_string()).collect();
    for (_, _, r) in done {
        for k in r.results.keys() {
            if k.starts_with("ood.") && !metrics.contains(k) && !k.ends_with(".count") {
                metrics.push(k.clone());
            }
        }
    }
    let comparison = Comparison {
        metrics: metrics.clone(),
        runs: done
            .iter()
            .map(|(e, dir, r)| ComparedRun {
                name: e.name.clone(),
                // Absolute, as every stored path (crate::io::stored_path).
                adapters: e
                    .adapters
                    .as_deref()
                    .map(|a| PathBuf::from(crate::io::stored_path(a))),
                dir: PathBuf::from(crate::io::stored_path(dir)),
                results: r.results.clone(),
                timing: r.timing.clone(),
                complete: r.progress.complete,
            })
            .collect(),
        differences: differences.clone().unwrap_or_default(),
        written: super::config::utc_timestamp(),
    };
    let mut written = Vec::new();
    let json_path = out.join("comparison.json");
    crate::io::write_bytes_atomically(&json_path, &serde_json::to_vec_pretty(&comparison)?)?;
    written.push(json_path);

    let mut doc = Document::new("Comparison");
    if let Some((_, _, r)) = done.first() {
        doc.para(format!(
            "Model {}; {} questions in all its files; normalisation {}. Each run is in its own \
             sub-directory \
             with its full report.",
            r.config.model.source,
            r.progress.questions,
            report::normalize_name(r.config.normalize)
        ));
    }
    doc.table(
        &["name", "particles", "directory", "report"],
        done.iter()
            .map(|(e, dir, r)| {
                vec![
                    e.name.clone(),
                    r.config
                        .adapters
                        .as_ref()
                        .map_or("none (base)".into(), |a| {
                            format!("{} × {} ({})", a.particles, a.method, a.path)
                        }),
                    dir.display().to_string(),
                    format!("{}/{}", e.name, report::REPORT_MD),
                ]
            })
            .collect(),
    );
    let mut header: Vec<String> = vec!["metric".into()];
    header.extend(done.iter().map(|(e, _, _)| e.name.clone()));
    let diffs = differences.as_deref().unwrap_or_default();
    header.extend(diffs.iter().map(|d| format!("{} − {}", d.name, d.against)));
    let mut rows: Vec<Vec<String>> = metrics
        .iter()
        .map(|k| {
            let mut row = vec![k.clone()];
            row.extend(done.iter().map(|(_, _, r)| match r.results.get(k) {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Number(n)) if n.is_u64() => n.to_string(),
                Some(_) => report::with_interval(r, k),
                None => "—".into(),
            }));
            row.extend(diffs.iter().zip(&done[1..]).map(|(d, (_, _, r))| {
                let value = report::metric(r, k)
                    .zip(report::metric(&done[0].2, k))
                    .map(|(a, b)| a - b);
                match (value, d.intervals.get(k)) {
                    (Some(v), Some(i)) => format!(
                        "{} {}{}",
                        report::fmt(Some(v)),
                        report::interval(i),
                        if significant(i) { " *" } else { "" }
                    ),
                    (v, _) => report::fmt(v),
                }
            }));
            row
        })
        .collect();
    let mut timing_row = vec!["answers per second".to_string()];
    timing_row.extend(
        done.iter()
            .map(|(_, _, r)| report::fmt(r.timing.answers_per_second)),
    );
    timing_row.extend(diffs.iter().map(|_| String::new()));
    rows.push(timing_row);
    doc.push(Block::Table { header, rows });

    let curves: Vec<plot::Curve> = done
        .iter()
        .filter_map(|(e, _, r)| {
            let s = r.summary.as_ref()?;
            Some(plot::Curve::of_run(&e.name, s))
        })
        .collect();
    if !curves.is_empty() {
        let svg = plot::risk_coverage_svg(&curves, None, "Risk–coverage")?;
        let path = out.join("comparison_risk_coverage.svg");
        crate::io::write_bytes_atomically(&path, svg.as_bytes())?;
        written.push(path);
        doc.push(Block::Image {
            src: "comparison_risk_coverage.svg".into(),
            alt: "Risk–coverage curves".into(),
        });
    }
    if !diffs.is_empty() && bootstrap.resamples == 0 {
        doc.para(format!(
            "The difference columns give each run minus {} (no intervals: --bootstrap 0).",
            done[0].0.name
        ));
    } else if !diffs.is_empty() {
        doc.para(format!(
            "Values with their 95 % bootstrap interval over the questions ({} resamples, seed {}); \
             the difference columns give each run minus {} with a paired interval (the same \
             resampled questions for both), marked * when it excludes 0.",
            bootstrap.resamples, bootstrap.seed, done[0].0.name
        ));
    } else if bootstrap.resamples > 0 && done.len() > 1 {
        doc.para("No paired intervals: the runs did not all answer the same questions.");
    }
    if done.iter().any(|(_, _, r)| {
        r.results.get("thresholds_from").and_then(Value::as_str) == Some("evaluated_set")
    }) {
        doc.para("⚠ Without --val the Φ_c thresholds were chosen on the test questions themselves (optimistic).");
    }
    written.extend(doc.write(out, "comparison")?);
    Ok((comparison, written))
}
