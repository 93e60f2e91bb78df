//! `bench merge`: combine shard directories into the directory a single run would have written.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use super::config::RunConfig;
use super::results::{self, ResultsFile, RunRecord, SkippedQuestion};
use super::samples::{read_samples, write_samples, Sample, SAMPLES_FILE};

/// Each `--compare` entry's name and merged results.
pub type EntryResults = Vec<(String, ResultsFile)>;

/// Merges the shard directories of a `bench --compare … --shard i/n` run (each holds one
/// shard directory per entry and the comparison of those shards): every entry's shards into
/// `out/{entry}` ([`merge`]), then the comparison of the merged entries, as the unsharded
/// comparison writes it. Returns each entry's results and the files written.
pub fn merge_comparison(
    dirs: &[PathBuf],
    out: &Path,
    bootstrap: &super::Bootstrap,
) -> Result<(EntryResults, Vec<PathBuf>)> {
    use super::compare::{write_comparison, CompareEntry, Comparison};
    let read = |d: &Path| -> Result<Comparison> {
        let path = d.join(COMPARISON_FILE);
        let text = crate::input::read_to_string(&path, "bench comparison")?;
        serde_json::from_str(&text)
            .with_context(|| format!("{} is not a bench comparison", path.display()))
    };
    let first = read(&dirs[0])?;
    let names: Vec<&str> = first.runs.iter().map(|r| r.name.as_str()).collect();
    for d in &dirs[1..] {
        let other = read(d)?;
        let theirs: Vec<&str> = other.runs.iter().map(|r| r.name.as_str()).collect();
        if theirs != names {
            bail!(
                "{} and {} are shards of different comparisons (entries {names:?} and \
                 {theirs:?})",
                dirs[0].display(),
                d.display()
            );
        }
    }
    let mut done = Vec::with_capacity(first.runs.len());
    let mut written = Vec::new();
    let mut results = Vec::with_capacity(first.runs.len());
    for run in &first.runs {
        let entry_dirs: Vec<PathBuf> = dirs.iter().map(|d| d.join(&run.name)).collect();
        let entry_out = out.join(&run.name);
        let (merged, files) = merge(&entry_dirs, &entry_out, bootstrap)
            .with_context(|| format!("--compare entry {}", run.name))?;
        written.extend(files);
        let entry = CompareEntry {
            name: run.name.clone(),
            adapters: run.adapters.clone(),
        };
        results.push((run.name.clone(), merged.clone()));
        done.push((entry, entry_out, merged));
    }
    let (_, files) = write_comparison(out, &done, bootstrap)?;
    written.extend(files);
    Ok((results, written))
}

/// The comparison a `bench --compare` run writes beside its entries' directories.
pub const COMPARISON_FILE: &str = "comparison.json";

/// Merges the shard directories `dirs` (every shard `i/n` of one run, each complete) into
/// `out`: the samples in canonical order, the invocation logs, then `results.json` and the
/// report, as [`super::finalize`] writes them. Refuses shards of different runs, a shard given
/// twice or missing, a question answered twice, and a question not answered. The intervals take
/// `bootstrap` (as `bench --bootstrap` would for the whole run).
pub fn merge(
    dirs: &[PathBuf],
    out: &Path,
    bootstrap: &super::Bootstrap,
) -> Result<(ResultsFile, Vec<PathBuf>)> {
    if dirs.is_empty() {
        bail!("give the shard directories to merge");
    }
    let mut configs = Vec::with_capacity(dirs.len());
    for d in dirs {
        if crate::io::same_path(d, out) {
            bail!(
                "--out {} is one of the shard directories; merge into a new directory",
                out.display()
            );
        }
        let c = RunConfig::read(d)?;
        // A shard still being answered (its output locked): merging now would miss answers.
        if let Some(holder) = crate::io::lock_holder(d) {
            bail!(
                "shard {} is still being answered by process {holder}: wait for it to finish, \
                 then merge",
                d.display()
            );
        }
        if c.shard.is_none() {
            bail!(
                "{} is a whole run, not a shard (it was run without --shard); there is nothing \
                 to merge",
                d.display()
            );
        }
        configs.push(c);
    }
    // What an older version did not record (shards begun before an upgrade) is taken from the
    // shards that did.
    let first = configs
        .iter()
        .fold(configs[0].clone(), |f, c| f.with_unrecorded_from(c));
    let count = first.shard.map_or(1, |s| s.count);
    let mut by_index: BTreeMap<usize, &Path> = BTreeMap::new();
    for (d, c) in dirs.iter().zip(&configs) {
        let diffs = first.differences(&c.clone().with_unrecorded_from(&first), false, true);
        if !diffs.is_empty() {
            bail!(
                "{} and {} are shards of different runs:\n  {}",
                dirs[0].display(),
                d.display(),
                diffs.join("\n  ")
            );
        }
        let Some(s) = c.shard else { continue };
        if s.count != count {
            bail!(
                "{} is shard {s}, but {} is one of {count} shards: every shard must split the \
                 data the same way",
                d.display(),
                dirs[0].display()
            );
        }
        if let Some(other) = by_index.insert(s.index, d) {
            bail!(
                "shard {s} is given twice: {} and {}",
                other.display(),
                d.display()
            );
        }
    }
    let missing_shards: Vec<String> = (0..count)
        .filter(|i| !by_index.contains_key(i))
        .map(|i| format!("{i}/{count}"))
        .collect();
    if !missing_shards.is_empty() {
        bail!(
            "shard(s) {} missing: merge needs all {count} shards",
            missing_shards.join(", ")
        );
    }

    let mut merged = first.clone();
    merged.shard = None;
    // Every question once: answered, or skipped as unreadable.
    let mut answered: HashMap<(String, usize), (Sample, &Path)> = HashMap::new();
    let mut skipped: Vec<SkippedQuestion> = Vec::new();
    let mut runs: Vec<RunRecord> = Vec::new();
    for (d, c) in dirs.iter().zip(&configs) {
        let shard = c.shard.context("a shard")?;
        let samples = read_samples(&d.join(SAMPLES_FILE))?;
        let shard_skipped: Vec<SkippedQuestion> =
            results::read_lines(&d.join(results::SKIPPED_FILE))?;
        for s in samples.samples {
            if !shard.contains(s.index) {
                bail!(
                    "{} holds question {:?} (position {} of {}), which belongs to another shard \
                     than {shard}",
                    d.join(SAMPLES_FILE).display(),
                    s.question_id,
                    s.index,
                    s.split
                );
            }
            let key = (s.split.clone(), s.index);
            if let Some((prev, other)) = answered.get(&key) {
                bail!(
                    "question {:?} of {} is answered twice: in {} and in {}",
                    prev.question_id,
                    s.split,
                    other.display(),
                    d.display()
                );
            }
            answered.insert(key, (s, d.as_path()));
        }
        skipped.extend(
            shard_skipped
                .into_iter()
                .filter(|q| !answered.contains_key(&(q.split.clone(), q.index))),
        );
        runs.extend(results::read_lines::<RunRecord>(
            &d.join(results::RUNS_FILE),
        )?);
    }
    let skipped_keys: std::collections::HashSet<(String, usize)> =
        skipped.iter().map(|q| (q.split.clone(), q.index)).collect();
    let mut ordered = Vec::new();
    let mut missing: Vec<String> = Vec::new();
    let mut missing_count = 0usize;
    for d in &merged.data {
        for k in merged.selection(d) {
            let key = (d.split.clone(), k);
            match answered.remove(&key) {
                Some((s, _)) => ordered.push(s),
                None if skipped_keys.contains(&key) => {}
                None => {
                    missing_count += 1;
                    if missing.len() < 10 {
                        let shard = k % count;
                        let dir = by_index
                            .get(&shard)
                            .map_or(String::new(), |p| p.display().to_string());
                        missing.push(format!("{} #{k} (shard {shard}/{count}, {dir})", d.split));
                    }
                }
            }
        }
    }
    if missing_count > 0 {
        bail!(
            "{missing_count} question(s) are not answered in the shards, e.g.:\n  {}\nfinish those \
             shards (rerun `bella-vqa bench` with the same --shard and --out) and merge again",
            missing.join("\n  ")
        );
    }
    skipped.sort_by(|a, b| (&a.split, a.index).cmp(&(&b.split, b.index)));
    skipped.dedup_by(|a, b| a.split == b.split && a.index == b.index);

    crate::io::create_dir_all(out)?;
    // What `bench` itself would not continue, merge does not replace either.
    let samples = out.join(SAMPLES_FILE);
    if !out.join(super::config::CONFIG_FILE).exists()
        && samples.metadata().is_ok_and(|m| m.len() > 0)
    {
        bail!(
            "{} holds answers ({}) that no {} describes; merge into a new or empty directory",
            out.display(),
            samples.display(),
            super::config::CONFIG_FILE
        );
    }
    if crate::bella::particles::ParticleSet::is_in(out) {
        bail!(
            "{} holds a particle set; merge into a new or empty directory",
            out.display()
        );
    }
    if out.join(super::config::CONFIG_FILE).exists() {
        let old = RunConfig::read(out)?.with_unrecorded_from(&merged);
        let diffs = old.differences(&merged, false, false);
        if !diffs.is_empty() || old.shard.is_some() {
            bail!(
                "{} already holds another run; merge into a new or empty directory",
                out.display()
            );
        }
    }
    let rescored = super::samples::rescore(
        &mut ordered,
        |split| {
            merged
                .data
                .iter()
                .find(|d| d.split == split)
                .map(|d| d.format.accuracy_rule())
        },
        merged.normalize,
    );
    if rescored > 0 && bootstrap.progress {
        crate::note!("{}", super::samples::rescored_note(rescored, &samples));
    }
    merged.write(out)?;
    write_samples(&samples, &ordered)?;
    crate::io::write_bytes_atomically(&out.join(results::RUNS_FILE), &results::json_lines(&runs)?)?;
    results::replace_lines(&out.join(results::SKIPPED_FILE), &skipped)?;
    // The same data in every shard: the first one's list of bad records.
    let bad: Vec<results::BadRecordLine> =
        results::read_lines(&dirs[0].join(results::BAD_RECORDS_FILE))?;
    results::replace_lines(&out.join(results::BAD_RECORDS_FILE), &bad)?;
    super::finalize(out, bootstrap)
}
