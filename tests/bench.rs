//! Batch benchmark runs on a small shapes world with the tiny LLaVA: results equal the metrics of
//! the samples, shards merge into the single run, an interrupted run resumes without losing or
//! duplicating anything, bad input is reported clearly, calibration stores only the threshold,
//! comparisons and the command line.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use bella_vqa::answer::confidence_map::{ConfidenceMap, MapChoice};
use bella_vqa::answer::selector::Selector;
use bella_vqa::answer::{AskOptions, BellaVqa, LoadOptions};
use bella_vqa::bella::particles::{ParticleConfig, ParticleSet};
use bella_vqa::bella::{attach, AdapterSpec, InitB};
use bella_vqa::bench::{
    self, calibrate, merge, BenchOptions, CalibrateOptions, CompareEntry, DataInput, Guarantee,
    ModelSpec, Objective, SelectorChoice, Shard,
};
use bella_vqa::data::normalize::normalize_answer;
use bella_vqa::data::shapes::{generate, ShapesOptions};
use bella_vqa::data::{read_jsonl, write_jsonl, ReadOptions};
use bella_vqa::hub::ModelSource;
use bella_vqa::metrics::{self, NormalizeMode, SummaryOptions};
use bella_vqa::models::image::load_image;
use bella_vqa::models::Model;
use common::*;
use serde_json::Value;

const P: usize = 3;

fn source() -> ModelSource {
    ModelSource::parse(fixture("llava-tiny-hub").to_str().unwrap()).unwrap()
}

/// A shapes world with 10 questions per evaluation split (shared by the tests; read-only).
fn world() -> &'static Path {
    static WORLD: OnceLock<tempfile::TempDir> = OnceLock::new();
    WORLD
        .get_or_init(|| {
            let dir = tempfile::tempdir().unwrap();
            generate(&ShapesOptions {
                n: 10,
                ..ShapesOptions::new(dir.path())
            })
            .unwrap();
            dir
        })
        .path()
}

/// Writes P random particles (they disagree, so epistemic uncertainty is not zero).
fn make_particles(dir: &Path) {
    make_n_particles(dir, P);
}

fn make_n_particles(dir: &Path, particles: usize) {
    let loaded = load_model("llava-tiny-hub");
    let Model::Llava(mut m) = loaded.model else {
        panic!("not LLaVA")
    };
    let spec = AdapterSpec {
        targets: vec!["language_model.model.layers.*".into()],
        rank: 8,
        alpha: 16.0,
        particles,
    };
    let layers = attach(m.as_mut(), &spec, InitB::Normal { std: 0.2 }, 7).unwrap();
    let config = ParticleConfig {
        targets: spec.targets.clone(),
        layers,
        rank: spec.rank,
        alpha: spec.alpha,
        particles,
        seed: 7,
        ..tiny_llava_particle_config(&loaded.files)
    };
    ParticleSet::from_model(m.as_ref(), config)
        .save(dir)
        .unwrap();
}

fn particles() -> &'static Path {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        make_particles(dir.path());
        dir
    })
    .path()
}

fn vqa_with_particles() -> &'static BellaVqa {
    static VQA: OnceLock<BellaVqa> = OnceLock::new();
    VQA.get_or_init(|| {
        BellaVqa::load(&source(), Some(particles()), &LoadOptions::default()).unwrap()
    })
}

fn spec() -> ModelSpec {
    ModelSpec {
        source: fixture("llava-tiny-hub").display().to_string(),
        adapters: Some(particles().to_path_buf()),
        answers_file: None,
    }
}

/// Test + validation + two OOD files of the shapes world.
fn options(out: &Path) -> BenchOptions {
    let w = world();
    let mut o = BenchOptions::new(DataInput::new(w.join("test.jsonl")), out);
    o.val = Some(DataInput::new(w.join("val.jsonl")));
    o.ood = vec![
        DataInput::new(w.join("ood-absent.jsonl")),
        DataInput::new(w.join("ood-unanswerable.jsonl")),
    ];
    o.max_new_tokens = 4;
    o
}

/// [`options`] over `data` alone: no validation or OOD files.
fn data_only_options(out: &Path, data: &Path) -> BenchOptions {
    let mut o = options(out);
    o.data = DataInput::new(data);
    o.val = None;
    o.ood.clear();
    o
}

fn run(opts: &BenchOptions) -> bench::BenchOutcome {
    bench::run(vqa_with_particles(), &spec(), opts).unwrap()
}

fn samples_of(dir: &Path) -> Vec<Value> {
    std::fs::read_to_string(dir.join("samples.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Samples keyed by (split, index), to compare runs that answered in different orders.
fn keyed(samples: Vec<Value>) -> BTreeMap<(String, u64), Value> {
    let n = samples.len();
    let map: BTreeMap<(String, u64), Value> = samples
        .into_iter()
        .map(|s| {
            (
                (
                    s["split"].as_str().unwrap().to_string(),
                    s["index"].as_u64().unwrap(),
                ),
                s,
            )
        })
        .collect();
    assert_eq!(map.len(), n, "a question appears twice");
    map
}

fn results_of(dir: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("results.json")).unwrap()).unwrap()
}

/// The parts of results.json that do not depend on timing, paths or when it was written.
fn metrics_part(r: &Value) -> Value {
    let mut m = serde_json::Map::new();
    for k in [
        "results",
        "per_answer_type",
        "ood",
        "validation",
        "summary",
        "progress",
    ] {
        m.insert(k.into(), r[k].clone());
    }
    Value::Object(m)
}

#[test]
fn results_are_the_metrics_of_the_samples_and_the_report_shows_the_plots() {
    let out = tempfile::tempdir().unwrap();
    let outcome = run(&options(out.path()));
    assert_eq!(outcome.answered_now, 40);
    let dir = out.path();
    for f in [
        "results.json",
        "samples.jsonl",
        "bench_config.json",
        "runs.jsonl",
        "report.md",
        "report.html",
        "reliability.svg",
        "risk_coverage.svg",
    ] {
        assert!(dir.join(f).is_file(), "{f} missing");
    }

    // Samples: the §10 fields, the uncertainty split, particle answers, passed-through fields.
    let samples = samples_of(dir);
    assert_eq!(samples.len(), 40);
    for s in &samples {
        for key in [
            "question_id",
            "answer",
            "confidence",
            "abstained",
            "accuracy",
            "vote_share",
            "split",
            "is_ood",
            "answers",
            "family",
            "scene_id",
        ] {
            assert!(s.get(key).is_some(), "sample without {key}: {s}");
        }
        for key in ["total", "aleatoric", "epistemic"] {
            assert!(s["uncertainty"][key].is_f64());
        }
        assert_eq!(s["particles"].as_array().unwrap().len(), P);
        assert!(s["particles"][0]["answer"].is_string());
        let answers: Vec<String> = serde_json::from_value(s["answers"].clone()).unwrap();
        let acc = metrics::vqa_accuracy(
            s["answer"].as_str().unwrap(),
            &answers,
            NormalizeMode::Always,
        );
        assert_eq!(s["accuracy"].as_f64().unwrap(), acc);
        let ood = s["split"].as_str().unwrap().starts_with("ood-");
        assert_eq!(s["is_ood"].as_bool().unwrap(), ood);
        // The generator's own `split` equals ours, so it is not repeated as input_split.
        assert!(s.get("input_split").is_none());
    }
    assert!(
        samples
            .iter()
            .any(|s| s["uncertainty"]["epistemic"].as_f64().unwrap() > 0.0),
        "random particles should disagree somewhere"
    );

    // results.json: the metrics module's summary of the test samples, thresholds from val.
    let r = results_of(dir);
    let preds = |split: &str| -> Vec<metrics::Prediction> {
        samples
            .iter()
            .filter(|s| s["split"] == split)
            .map(|s| metrics::Prediction {
                answer: s["answer"].as_str().unwrap().into(),
                confidence: s["confidence"].as_f64().unwrap(),
                human_answers: serde_json::from_value(s["answers"].clone()).unwrap(),
                answer_type: s["answer_type"].as_str().map(String::from),
                is_ood: None,
                abstained: s["abstained"].as_bool().unwrap(),
                uncertainty: None,
                distribution: None,
                target: None,
                rule: Default::default(),
                score: None,
                known_accuracy: None,
            })
            .collect()
    };
    let (test, val) = (preds("test"), preds("val"));
    assert_eq!(test.len(), 10);
    let summary = metrics::summary(&test, Some(&val), &SummaryOptions::default()).unwrap();
    assert_eq!(r["summary"], serde_json::to_value(&summary).unwrap());
    let res = &r["results"];
    let num = |k: &str| res[k].as_f64();
    assert_eq!(num("vqa_accuracy"), Some(summary.accuracy));
    assert_eq!(num("ece"), Some(summary.ece.ece));
    assert_eq!(num("ece_equal_mass"), Some(summary.ece_equal_mass.ece));
    assert_eq!(num("nll"), Some(summary.nll_binary));
    assert_eq!(num("brier"), Some(summary.brier_binary));
    assert_eq!(num("error_auroc"), summary.error_detection.auroc);
    assert_eq!(num("error_aupr"), summary.error_detection.aupr);
    assert_eq!(num("aurc"), Some(summary.aurc));
    assert_eq!(num("excess_aurc"), Some(summary.excess_aurc));
    assert_eq!(num("coverage"), Some(summary.recorded_decisions.coverage));
    assert_eq!(num("selective_risk"), summary.recorded_decisions.risk);
    for (k, c) in [
        "coverage_at_risk_1pct",
        "coverage_at_risk_5pct",
        "coverage_at_risk_10pct",
    ]
    .iter()
    .zip(&summary.coverage_at_risk)
    {
        assert_eq!(num(k), Some(c.coverage), "{k}");
    }
    for (k, p) in ["phi_1", "phi_10", "phi_100"]
        .iter()
        .zip(&summary.effective_reliability)
    {
        assert_eq!(num(k), Some(p.phi), "{k}");
        assert_eq!(num(&format!("{k}_threshold")), Some(p.threshold), "{k}");
    }
    assert_eq!(res["thresholds_from"], "validation");
    assert_eq!(
        r["per_answer_type"],
        serde_json::to_value(&summary.per_answer_type).unwrap()
    );
    assert!(!summary.per_answer_type.is_empty());

    // OOD detection: each OOD file against the test questions, three scores.
    for split in ["ood-absent", "ood-unanswerable"] {
        let ood: Vec<&Value> = samples.iter().filter(|s| s["split"] == split).collect();
        let tests: Vec<&Value> = samples.iter().filter(|s| s["split"] == "test").collect();
        let all: Vec<&&Value> = tests.iter().chain(ood.iter()).collect();
        let labels: Vec<bool> = all.iter().map(|s| s["is_ood"].as_bool().unwrap()).collect();
        let score: Vec<f64> = all
            .iter()
            .map(|s| s["uncertainty"]["epistemic"].as_f64().unwrap())
            .collect();
        let det = metrics::detection(&score, &labels).unwrap();
        assert_eq!(
            res[format!("ood.{split}.auroc_epistemic")].as_f64(),
            det.auroc
        );
        let score: Vec<f64> = all
            .iter()
            .map(|s| 1.0 - s["confidence"].as_f64().unwrap())
            .collect();
        let det = metrics::detection(&score, &labels).unwrap();
        assert_eq!(
            res[format!("ood.{split}.auroc_confidence")].as_f64(),
            det.auroc
        );
        assert_eq!(r["ood"][split]["count"], 10);
    }

    // Config, progress, timing.
    let c = &r["config"];
    assert_eq!(c["adapters"]["particles"], P);
    assert_eq!(c["adapters"]["method"], "ensemble");
    assert_eq!(c["normalize"], "always");
    assert_eq!(c["threshold"], 0.5);
    assert_eq!(c["data"].as_array().unwrap().len(), 4);
    assert_eq!(r["progress"]["complete"], true);
    assert_eq!(r["progress"]["answered"], 40);
    assert!(r["timing"]["answers_per_second"].as_f64().unwrap() > 0.0);
    assert!(r["timing"]["wall_time_s"].as_f64().unwrap() > 0.0);
    if cfg!(target_os = "linux") {
        assert!(r["timing"]["peak_memory_mib"].as_f64().unwrap() > 1.0);
    }

    // The report references the plots, which are SVG drawings.
    let md = std::fs::read_to_string(dir.join("report.md")).unwrap();
    let html = std::fs::read_to_string(dir.join("report.html")).unwrap();
    for plot in ["reliability.svg", "risk_coverage.svg"] {
        assert!(md.contains(&format!("]({plot})")), "report.md lacks {plot}");
        assert!(
            html.contains(&format!("src=\"{plot}\"")),
            "report.html lacks {plot}"
        );
        let svg = std::fs::read_to_string(dir.join(plot)).unwrap();
        assert!(svg.contains("<svg") && svg.contains("</svg>"), "{plot}");
    }
    assert!(md.contains("Per answer type") && md.contains("ood-absent"));
    assert!(html.starts_with("<!DOCTYPE html>"));
}

#[test]
fn without_validation_the_thresholds_are_flagged_as_chosen_on_the_test_set() {
    let out = tempfile::tempdir().unwrap();
    let mut opts = options(out.path());
    opts.val = None;
    opts.ood.clear();
    opts.limit = Some(6);
    opts.normalize = NormalizeMode::Always;
    run(&opts);
    let r = results_of(out.path());
    assert_eq!(r["results"]["thresholds_from"], "evaluated_set");
    assert_eq!(r["summary"]["thresholds_from"], "evaluated_set");
    assert_eq!(r["results"]["count"], 6);
    assert_eq!(r["config"]["normalize"], "always");
    let notes = r["notes"].to_string();
    assert!(
        notes.contains("chosen on the test questions themselves"),
        "{notes}"
    );
    let md = std::fs::read_to_string(out.path().join("report.md")).unwrap();
    assert!(md.contains("optimistic"));
}

#[test]
fn shards_merge_into_the_single_run() {
    let single = tempfile::tempdir().unwrap();
    run(&options(single.path()));

    let shards = tempfile::tempdir().unwrap();
    let dirs: Vec<PathBuf> = (0..3)
        .map(|i| {
            let dir = shards.path().join(format!("shard{i}"));
            let mut opts = options(&dir);
            opts.shard = Some(Shard::new(i, 3).unwrap());
            let outcome = run(&opts);
            assert!(outcome.answered_now > 0 && outcome.answered_now < 40);
            dir
        })
        .collect();
    let merged = shards.path().join("merged");
    // Shards given in any order.
    merge(
        &[dirs[2].clone(), dirs[0].clone(), dirs[1].clone()],
        &merged,
        &options(&merged).bootstrap,
    )
    .unwrap();

    assert_eq!(
        samples_of(&merged),
        samples_of(single.path()),
        "samples differ"
    );
    let (a, b) = (results_of(&merged), results_of(single.path()));
    assert_eq!(metrics_part(&a), metrics_part(&b));
    assert_eq!(a["config"]["shard"], Value::Null);
    assert_eq!(a["timing"]["invocations"], 3);
    for f in [
        "report.md",
        "report.html",
        "reliability.svg",
        "risk_coverage.svg",
    ] {
        assert!(merged.join(f).is_file(), "{f}");
    }

    // A missing shard, a shard given twice, shards of different runs, an unfinished shard.
    let err = |dirs: &[PathBuf]| {
        let out = shards.path().join("refused");
        format!("{:#}", merge(dirs, &out, &Default::default()).unwrap_err())
    };
    let e = err(&dirs[..2]);
    assert!(e.contains("2/3") && e.contains("missing"), "{e}");
    let e = err(&[dirs[0].clone(), dirs[0].clone(), dirs[1].clone()]);
    assert!(e.contains("given twice"), "{e}");
    let other = shards.path().join("other");
    let mut opts = options(&other);
    opts.shard = Some(Shard::new(2, 3).unwrap());
    opts.normalize = NormalizeMode::Official;
    run(&opts);
    let e = err(&[dirs[0].clone(), dirs[1].clone(), other]);
    assert!(
        e.contains("different runs") && e.contains("normalize"),
        "{e}"
    );
    let e = err(&[single.path().to_path_buf()]);
    assert!(e.contains("not a shard"), "{e}");
    // A shard still being answered (its directory locked by its run).
    {
        let _running = bella_vqa::io::OutputLock::acquire(&dirs[1]).unwrap();
        let e = err(&dirs);
        let pid = std::process::id().to_string();
        assert!(
            e.contains("still being answered by process") && e.contains(&pid),
            "{e}"
        );
    }
    // Into a directory holding answers without their config, or particles: refused, untouched.
    for (name, file, needle) in [
        ("answers", "samples.jsonl", "holds answers"),
        ("particles", "bella_config.json", "holds a particle set"),
    ] {
        let dir = shards.path().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(file), "{\"question_id\": \"x\"}\n").unwrap();
        let e = format!("{:#}", merge(&dirs, &dir, &Default::default()).unwrap_err());
        assert!(e.contains(needle), "{e}");
        assert_eq!(
            std::fs::read_to_string(dir.join(file)).unwrap(),
            "{\"question_id\": \"x\"}\n"
        );
    }
    // Drop the last answer of shard 1: merge names the unanswered question.
    let path = dirs[1].join("samples.jsonl");
    let text = std::fs::read_to_string(&path).unwrap();
    let kept: Vec<&str> = text.lines().collect();
    std::fs::write(&path, kept[..kept.len() - 1].join("\n") + "\n").unwrap();
    let e = err(&dirs);
    assert!(e.contains("not answered") && e.contains("shard 1/3"), "{e}");
    // Duplicate an answer into another shard's file: refused as well.
    let mut dup = std::fs::read_to_string(dirs[0].join("samples.jsonl")).unwrap();
    dup.push_str(kept[0]);
    dup.push('\n');
    std::fs::write(dirs[0].join("samples.jsonl"), dup).unwrap();
    let e = err(&dirs);
    assert!(e.contains("another shard"), "{e}");
}

#[test]
fn an_interrupted_run_resumes_without_losing_or_duplicating_answers() {
    let whole = tempfile::tempdir().unwrap();
    run(&options(whole.path()));
    let expected = keyed(samples_of(whole.path()));

    let out = tempfile::tempdir().unwrap();
    // A quick look first (4 questions per file), then a kill in the middle of a line.
    let mut opts = options(out.path());
    opts.limit = Some(4);
    let first = run(&opts);
    assert_eq!(first.answered_now, 16);
    assert_eq!(results_of(out.path())["results"]["count"], 4);
    let path = out.path().join("samples.jsonl");
    let text = std::fs::read(&path).unwrap();
    let cut = text.len() - 40;
    std::fs::write(&path, &text[..cut]).unwrap();

    // Restart with the same --out and no limit.
    let second = run(&options(out.path()));
    assert_eq!(second.resumed, 15, "the damaged last line is dropped");
    assert!(second.dropped_damaged_line);
    assert_eq!(second.answered_now, 40 - 15);
    let got = keyed(samples_of(out.path()));
    assert_eq!(got, expected);
    let (a, b) = (results_of(out.path()), results_of(whole.path()));
    assert_eq!(metrics_part(&a), metrics_part(&b));
    assert_eq!(a["timing"]["invocations"], 2);
    assert_eq!(a["timing"]["answered"], 16 + 25);

    // A third start has nothing left to do and changes nothing.
    let third = run(&options(out.path()));
    assert_eq!(third.answered_now, 0);
    assert_eq!(keyed(samples_of(out.path())), expected);

    // Restarting with other settings is refused and leaves the samples alone.
    let before = std::fs::read(&path).unwrap();
    let mut other = options(out.path());
    other.normalize = NormalizeMode::Official;
    let e = format!(
        "{:#}",
        bench::run(vqa_with_particles(), &spec(), &other).unwrap_err()
    );
    assert!(
        e.contains("different benchmark run") && e.contains("pass --normalize always"),
        "{e}"
    );
    let base = BellaVqa::load(&source(), None, &LoadOptions::default()).unwrap();
    let base_spec = ModelSpec {
        adapters: None,
        ..spec()
    };
    let e = format!(
        "{:#}",
        bench::run(&base, &base_spec, &options(out.path())).unwrap_err()
    );
    assert!(e.contains("adapters"), "{e}");
    // Another compute dtype is another run too.
    let bf16 = BellaVqa::load(
        &source(),
        None,
        &LoadOptions {
            compute: bella_vqa::models::compute::ComputeOptions {
                dtype: bella_vqa::models::compute::DTypeChoice::Bf16,
                ..Default::default()
            },
            ..LoadOptions::default()
        },
    )
    .unwrap();
    let e = format!(
        "{:#}",
        bench::run(&bf16, &base_spec, &options(out.path())).unwrap_err()
    );
    assert!(e.contains("compute_dtype"), "{e}");
    assert_eq!(std::fs::read(&path).unwrap(), before);
    // Answers without the configuration that says how they were made are not continued.
    std::fs::remove_file(out.path().join("bench_config.json")).unwrap();
    let e = format!(
        "{:#}",
        bench::run(vqa_with_particles(), &spec(), &options(out.path())).unwrap_err()
    );
    assert!(
        e.contains("holds answers") && e.contains("bench_config.json"),
        "{e}"
    );
    assert_eq!(std::fs::read(&path).unwrap(), before);
}

#[test]
fn a_question_whose_image_changed_is_answered_again_when_the_run_continues() {
    let w = tempfile::tempdir().unwrap();
    generate(&ShapesOptions {
        n: 10,
        ..ShapesOptions::new(w.path())
    })
    .unwrap();
    let out = tempfile::tempdir().unwrap();
    let opts = data_only_options(out.path(), &w.path().join("test.jsonl"));
    run(&opts);
    let before = keyed(samples_of(out.path()));
    let sha = |p: &str| bella_vqa::io::sha256_file(Path::new(p)).unwrap();
    for s in before.values() {
        let image = s["image"].as_str().unwrap();
        assert_eq!(s["image_sha256"].as_str().unwrap(), sha(image));
    }
    // Another picture under the first question's image name.
    let first = before.values().next().unwrap()["image"]
        .as_str()
        .unwrap()
        .to_string();
    let other = before
        .values()
        .map(|s| s["image"].as_str().unwrap().to_string())
        .find(|i| sha(i) != sha(&first))
        .unwrap();
    let original = std::fs::read(&first).unwrap();
    std::fs::copy(&other, &first).unwrap();
    let changed = before.values().filter(|s| s["image"] == first).count();
    let again = run(&opts);
    assert_eq!(again.answered_now, changed);
    assert_eq!(again.resumed, before.len() - changed);
    let after = keyed(samples_of(out.path()));
    assert_eq!(after.len(), before.len());
    for (key, s) in &after {
        if s["image"] == first {
            assert_eq!(s["image_sha256"].as_str().unwrap(), sha(&other));
        } else {
            assert_eq!(
                s, &before[key],
                "an answer about an unchanged image was redone"
            );
        }
    }
    // Nothing changed since: nothing to answer.
    assert_eq!(run(&opts).answered_now, 0);
    // Answers recorded before samples held the hash are kept as they are.
    let path = out.path().join("samples.jsonl");
    let old: String = std::fs::read_to_string(&path)
        .unwrap()
        .lines()
        .map(|l| {
            let mut v: Value = serde_json::from_str(l).unwrap();
            v.as_object_mut().unwrap().remove("image_sha256");
            format!("{v}\n")
        })
        .collect();
    std::fs::write(&path, &old).unwrap();
    std::fs::write(&first, original).unwrap();
    assert_eq!(run(&opts).answered_now, 0);
}

#[test]
fn a_run_is_not_continued_with_particles_of_another_alpha() {
    // The same factors with another alpha (an edited or re-imported config) answer otherwise.
    let copy = tempfile::tempdir().unwrap();
    for f in ["bella_config.json", "particles.safetensors"] {
        std::fs::copy(particles().join(f), copy.path().join(f)).unwrap();
    }
    let spec = ModelSpec {
        adapters: Some(copy.path().to_path_buf()),
        ..spec()
    };
    let load = || BellaVqa::load(&source(), Some(copy.path()), &LoadOptions::default()).unwrap();
    let out = tempfile::tempdir().unwrap();
    let mut opts = data_only_options(out.path(), &world().join("test.jsonl"));
    opts.limit = Some(2);
    bench::run(&load(), &spec, &opts).unwrap();
    let config_path = copy.path().join("bella_config.json");
    let mut config: Value =
        serde_json::from_str(&std::fs::read_to_string(&config_path).unwrap()).unwrap();
    let alpha = config["alpha"].as_f64().unwrap();
    config["alpha"] = (alpha * 2.0).into();
    std::fs::write(&config_path, config.to_string()).unwrap();
    let e = format!("{:#}", bench::run(&load(), &spec, &opts).unwrap_err());
    assert!(
        e.contains("different benchmark run") && e.contains("adapters.alpha"),
        "{e}"
    );
    // A run begun by a version that did not record alpha continues.
    config["alpha"] = alpha.into();
    std::fs::write(&config_path, config.to_string()).unwrap();
    let run_path = out.path().join("bench_config.json");
    let mut run: Value =
        serde_json::from_str(&std::fs::read_to_string(&run_path).unwrap()).unwrap();
    run["adapters"]
        .as_object_mut()
        .unwrap()
        .remove("alpha")
        .unwrap();
    std::fs::write(&run_path, run.to_string()).unwrap();
    assert_eq!(bench::run(&load(), &spec, &opts).unwrap().answered_now, 0);
}

#[test]
fn a_bad_line_in_the_middle_of_the_samples_is_an_error_not_a_silent_loss() {
    let out = tempfile::tempdir().unwrap();
    let mut opts = options(out.path());
    opts.limit = Some(2);
    run(&opts);
    let path = out.path().join("samples.jsonl");
    let text = std::fs::read_to_string(&path).unwrap();
    let mut lines: Vec<&str> = text.lines().collect();
    lines.insert(1, "{not json");
    std::fs::write(&path, lines.join("\n") + "\n").unwrap();
    let e = format!(
        "{:#}",
        bench::run(vqa_with_particles(), &spec(), &opts).unwrap_err()
    );
    assert!(e.contains("samples.jsonl line 2"), "{e}");
}

#[test]
fn bad_input_is_reported_clearly_and_finished_samples_survive() {
    let tmp = tempfile::tempdir().unwrap();
    // A missing data file.
    let mut opts = options(&tmp.path().join("out0"));
    opts.data = DataInput::new(tmp.path().join("nope.jsonl"));
    let e = format!(
        "{:#}",
        bench::run(vqa_with_particles(), &spec(), &opts).unwrap_err()
    );
    assert!(
        e.contains("nope.jsonl") && e.contains("does not exist"),
        "{e}"
    );

    // A bad JSON line: an error naming file and line; with skip_bad it is left out.
    let data = read_jsonl(&world().join("test.jsonl"), &ReadOptions::default()).unwrap();
    let bad_json = tmp.path().join("bad.jsonl");
    write_jsonl(&bad_json, &data.examples[..5]).unwrap();
    let mut text = std::fs::read_to_string(&bad_json).unwrap();
    text.push_str("{\"question_id\": \"x\", \n");
    std::fs::write(&bad_json, text).unwrap();
    let mut opts = data_only_options(&tmp.path().join("out1"), &bad_json);
    let e = format!(
        "{:#}",
        bench::run(vqa_with_particles(), &spec(), &opts).unwrap_err()
    );
    assert!(e.contains("bad.jsonl line 6"), "{e}");
    opts.skip_bad = true;
    let outcome = bench::run(vqa_with_particles(), &spec(), &opts).unwrap();
    assert_eq!(outcome.answered_now, 5);
    assert_eq!(outcome.results.progress.bad_records, 1);

    // A file that is no image is refused before any question is answered.
    let mut examples = data.examples[..6].to_vec();
    let not_image = tmp.path().join("not-an-image.png");
    std::fs::write(&not_image, b"not a png").unwrap();
    let mut bad_header = examples.clone();
    bad_header[3].image = not_image;
    let data_file = tmp.path().join("not-image.jsonl");
    write_jsonl(&data_file, &bad_header).unwrap();
    let out = tmp.path().join("out-header");
    let opts = data_only_options(&out, &data_file);
    let e = format!(
        "{:#}",
        bench::run(vqa_with_particles(), &spec(), &opts).unwrap_err()
    );
    assert!(
        e.contains("line 4") && e.contains("not-an-image.png"),
        "{e}"
    );
    assert!(!out.join("samples.jsonl").exists());

    // An image whose header is good but whose data is cut short is found when its question is
    // answered: the error names the question and the image; earlier answers stay.
    let broken = tmp.path().join("broken.png");
    let png = std::fs::read(&examples[0].image).unwrap();
    std::fs::write(&broken, &png[..png.len() / 2]).unwrap();
    examples[3].image = broken.clone();
    let data_file = tmp.path().join("images.jsonl");
    write_jsonl(&data_file, &examples).unwrap();
    let out = tmp.path().join("out2");
    let mut opts = data_only_options(&out, &data_file);
    // The first three, finished: their results.
    opts.limit = Some(3);
    run(&opts);
    assert!(out.join("results.json").exists() && out.join("report.md").exists());
    // Three of six questions: a server would refuse the file.
    assert!(!out.join("submission.json").exists());
    // Continued over all six: the results of the three are gone before the first new answer,
    // so the run stopped at the bad image leaves none that read as finished.
    opts.limit = None;
    let e = format!(
        "{:#}",
        bench::run(vqa_with_particles(), &spec(), &opts).unwrap_err()
    );
    assert!(
        e.contains(&examples[3].question_id) && e.contains("broken.png"),
        "{e}"
    );
    let kept = samples_of(&out);
    assert_eq!(
        kept.len(),
        3,
        "the three answers before the bad image are kept"
    );
    assert!(!out.join("results.json").exists());
    assert!(!out.join("report.md").exists());
    assert!(!out.join("submission.json").exists());
    assert!(!out.join("reliability.svg").exists());
    // With skip_bad the run finishes and lists the question as skipped.
    opts.skip_bad = true;
    let outcome = bench::run(vqa_with_particles(), &spec(), &opts).unwrap();
    assert_eq!(outcome.resumed, 3);
    assert_eq!(outcome.answered_now, 2);
    let p = &outcome.results.progress;
    assert_eq!((p.answered, p.skipped, p.missing), (5, 1, 0));
    assert!(p.complete);
    let skipped = std::fs::read_to_string(out.join("skipped.jsonl")).unwrap();
    assert!(skipped.contains(&examples[3].question_id));
}

#[test]
fn fixing_records_skip_bad_left_out_continues_the_run_with_its_answers() {
    let tmp = tempfile::tempdir().unwrap();
    let data = read_jsonl(&world().join("test.jsonl"), &ReadOptions::default()).unwrap();
    let good = tmp.path().join("good.jsonl");
    write_jsonl(&good, &data.examples[..7]).unwrap();
    let text = std::fs::read_to_string(&good).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    // The third record is cut short: the questions after it move up one place.
    let with_bad = |third: &str| {
        let mut l = lines.clone();
        l[2] = third;
        l.join("\n") + "\n"
    };
    let file = tmp.path().join("questions.jsonl");
    std::fs::write(&file, with_bad("{\"question_id\": \"x\", ")).unwrap();
    let out = tmp.path().join("out");
    let mut opts = data_only_options(&out, &file);
    opts.skip_bad = true;
    let first = run(&opts);
    assert_eq!(
        (first.answered_now, first.results.progress.bad_records),
        (6, 1)
    );
    // The record left out is listed with its line and why.
    let bad = std::fs::read_to_string(out.join("bad_records.jsonl")).unwrap();
    let bad: Value = serde_json::from_str(bad.trim()).unwrap();
    assert_eq!(
        (bad["split"].as_str(), bad["line"].as_u64()),
        (Some("test"), Some(3))
    );
    assert!(bad["file"].as_str().unwrap().ends_with("questions.jsonl"));

    // An answered question changed meanwhile: refused, naming it; nothing is touched.
    let samples = out.join("samples.jsonl");
    let before = std::fs::read(&samples).unwrap();
    let changed = lines[4].replacen("\"answers\":[\"", "\"answers\":[\"not-", 1);
    assert_ne!(changed, lines[4]);
    let mut l = lines.clone();
    l[2] = "{";
    l[4] = &changed;
    std::fs::write(&file, l.join("\n") + "\n").unwrap();
    let e = format!(
        "{:#}",
        bench::run(vqa_with_particles(), &spec(), &opts).unwrap_err()
    );
    let id = &data.examples[4].question_id;
    assert!(
        e.contains(&format!("{id:?}")) && e.contains("another human answers"),
        "{e}"
    );
    // One that is gone: refused as well.
    let mut l = lines.clone();
    l.remove(5);
    std::fs::write(&file, l.join("\n") + "\n").unwrap();
    let e = format!(
        "{:#}",
        bench::run(vqa_with_particles(), &spec(), &opts).unwrap_err()
    );
    assert!(e.contains("is no longer in it"), "{e}");
    assert_eq!(std::fs::read(&samples).unwrap(), before);

    // The bad record fixed: the six answers are kept, renumbered, and only it is answered, as a
    // run over the fixed file from the start would have.
    std::fs::write(&file, &text).unwrap();
    let second = run(&opts);
    assert_eq!((second.resumed, second.answered_now), (6, 1));
    let p = &second.results.progress;
    assert_eq!((p.answered, p.bad_records, p.complete), (7, 0, true));
    assert!(!out.join("bad_records.jsonl").exists());
    // Continued with a smaller --limit: refused (results of 2 beside 7 samples read as one
    // run), nothing touched.
    let (samples_before, results_before, config_before) = (
        std::fs::read(&samples).unwrap(),
        std::fs::read(out.join("results.json")).unwrap(),
        std::fs::read(out.join("bench_config.json")).unwrap(),
    );
    let mut fewer = opts.clone();
    fewer.limit = Some(2);
    let e = format!(
        "{:#}",
        bench::run(vqa_with_particles(), &spec(), &fewer).unwrap_err()
    );
    assert!(
        e.contains("holds answers to 5 question(s) past --limit 2"),
        "{e}"
    );
    assert_eq!(std::fs::read(&samples).unwrap(), samples_before);
    assert_eq!(
        std::fs::read(out.join("results.json")).unwrap(),
        results_before
    );
    assert_eq!(
        std::fs::read(out.join("bench_config.json")).unwrap(),
        config_before
    );
    let fresh = tmp.path().join("fresh");
    let mut whole = opts.clone();
    whole.out = fresh.clone();
    run(&whole);
    assert_eq!(keyed(samples_of(&out)), keyed(samples_of(&fresh)));
    assert_eq!(
        metrics_part(&results_of(&out)),
        metrics_part(&results_of(&fresh))
    );
}

#[test]
fn calibration_stores_only_the_threshold_and_ask_uses_it() {
    let dir = tempfile::tempdir().unwrap();
    make_particles(dir.path());
    let config_path = dir.path().join("bella_config.json");
    let before_text = std::fs::read_to_string(&config_path).unwrap();
    let before_particles = std::fs::read(dir.path().join("particles.safetensors")).unwrap();
    let vqa = BellaVqa::load(&source(), Some(dir.path()), &LoadOptions::default()).unwrap();

    // Validation questions where the model is right about half the time: the human answers
    // of every other question are replaced by the model's own answer.
    let ask = AskOptions {
        max_new_tokens: 4,
        ..AskOptions::default()
    };
    let mut examples = read_jsonl(&world().join("val.jsonl"), &ReadOptions::default())
        .unwrap()
        .examples;
    let mut pairs = Vec::new();
    for (i, e) in examples.iter_mut().enumerate() {
        let r = vqa
            .ask_with(&load_image(&e.image).unwrap(), &e.question, &ask)
            .unwrap();
        if i % 2 == 0 {
            e.answers = vec![r.answer.clone(); 3];
        }
        pairs.push((
            r.confidence,
            metrics::vqa_accuracy(&r.answer, &e.answers, NormalizeMode::Official),
        ));
    }
    let val = dir.path().join("val.jsonl");
    write_jsonl(&val, &examples).unwrap();

    for (round, objective) in [
        Objective::TargetRisk(0.3),
        Objective::Phi(10.0),
        Objective::TargetCoverage(0.7),
    ]
    .into_iter()
    .enumerate()
    {
        let mut opts = CalibrateOptions::new(DataInput::new(&val), objective);
        opts.max_new_tokens = 4;
        let outcome = calibrate(&vqa, dir.path(), &opts).unwrap();
        let expected = match objective {
            Objective::TargetRisk(r) => metrics::choose_threshold_for_risk(&pairs, r).unwrap(),
            Objective::Phi(c) => metrics::choose_threshold_phi(&pairs, c).unwrap(),
            Objective::TargetCoverage(_) => {
                // 7 of the 10 questions: the 7th highest confidence
                let mut conf: Vec<f64> = pairs.iter().map(|p| p.0).collect();
                conf.sort_by(|a, b| b.total_cmp(a));
                conf[6]
            }
        };
        assert_eq!(outcome.abstention.threshold, expected);
        if let Objective::TargetCoverage(c) = objective {
            assert!(outcome.coverage >= c, "{}", outcome.coverage);
        }
        assert_eq!(outcome.count, 10);
        assert!(outcome.stored);

        // Only the abstention key changed (the thresholds it replaced are kept in
        // abstention_history); the factors are untouched.
        let after_text = std::fs::read_to_string(&config_path).unwrap();
        let mut before: Value = serde_json::from_str(&before_text).unwrap();
        let mut after: Value = serde_json::from_str(&after_text).unwrap();
        assert_eq!(after["abstention"]["threshold"], expected);
        assert_eq!(
            after["abstention"]["objective"],
            objective_name(objective).as_str()
        );
        assert!(after["abstention"]["data"]
            .as_str()
            .unwrap()
            .ends_with("val.jsonl"));
        let history = after
            .as_object_mut()
            .unwrap()
            .remove("abstention_history")
            .unwrap_or(Value::Array(Vec::new()));
        assert_eq!(history.as_array().unwrap().len(), round, "{history}");
        assert_eq!(outcome.previous.is_some(), round > 0);
        before.as_object_mut().unwrap().remove("abstention");
        after.as_object_mut().unwrap().remove("abstention");
        assert_eq!(before, after);
        // Byte for byte up to the abstention entry (key order kept).
        let head = before_text.split("\"abstention\"").next().unwrap();
        assert!(after_text.starts_with(head));
        assert_eq!(
            std::fs::read(dir.path().join("particles.safetensors")).unwrap(),
            before_particles
        );

        // ask now reports the calibrated threshold.
        let reloaded =
            BellaVqa::load(&source(), Some(dir.path()), &LoadOptions::default()).unwrap();
        let r = reloaded
            .ask_with(
                &load_image(&examples[0].image).unwrap(),
                &examples[0].question,
                &ask,
            )
            .unwrap();
        assert!(r.calibrated);
        assert_eq!(r.threshold, expected);
        assert_eq!(r.abstained, r.confidence < expected);
    }

    // A dry run reports without storing; a set without answers is refused.
    let stored = std::fs::read(&config_path).unwrap();
    let mut opts = CalibrateOptions::new(DataInput::new(&val), Objective::TargetRisk(0.0));
    opts.dry_run = true;
    opts.max_new_tokens = 4;
    assert!(!calibrate(&vqa, dir.path(), &opts).unwrap().stored);
    assert_eq!(std::fs::read(&config_path).unwrap(), stored);
    for e in &mut examples {
        e.answers.clear();
    }
    let unanswered = dir.path().join("unanswered.jsonl");
    write_jsonl(&unanswered, &examples).unwrap();
    let opts = CalibrateOptions::new(DataInput::new(&unanswered), Objective::Phi(1.0));
    let e = format!("{:#}", calibrate(&vqa, dir.path(), &opts).unwrap_err());
    assert!(e.contains("no human answers"), "{e}");
}

fn objective_name(o: Objective) -> String {
    o.describe()
}

#[test]
fn objectives_parse() {
    assert_eq!(Objective::parse("phi10").unwrap(), Objective::Phi(10.0));
    assert_eq!(Objective::parse("phi_100").unwrap(), Objective::Phi(100.0));
    assert_eq!(
        Objective::parse("risk0.05").unwrap(),
        Objective::TargetRisk(0.05)
    );
    assert_eq!(
        Objective::parse("coverage=0.85").unwrap(),
        Objective::TargetCoverage(0.85)
    );
    assert!(Objective::parse("coverage0").is_err());
    // The same ranges as --target-risk: risk 1 always holds, 0 is never certified.
    assert!(Objective::parse("risk1").is_err());
    assert!(Objective::parse("risk0").is_err());
    assert!(Objective::parse("phi1e308").is_err());
    assert!(Objective::parse("accuracy").is_err());
    assert_eq!(Objective::TargetCoverage(0.85).describe(), "coverage>=0.85");
    assert_eq!(Objective::Phi(10.0).describe(), "max phi_10");
    assert_eq!(Objective::TargetRisk(0.05).describe(), "risk<=0.05");
    assert_eq!("1/4".parse::<Shard>().unwrap(), Shard::new(1, 4).unwrap());
    assert!("4/4".parse::<Shard>().is_err());
    assert!("x".parse::<Shard>().is_err());
    let e = CompareEntry::parse_all(&["base".into(), "svgd=/a/b".into(), "/x/ens".into()]).unwrap();
    assert_eq!(e[0].adapters, None);
    assert_eq!(e[1].name, "svgd");
    assert_eq!(e[2].name, "ens");
    assert!(CompareEntry::parse_all(&["/a/x".into(), "/b/x".into()]).is_err());
    // A name of the comparison's own files is refused before any run is answered.
    for taken in ["comparison.json=/a/b", "/a/comparison.md"] {
        let e = CompareEntry::parse(taken).unwrap_err().to_string();
        assert!(e.contains("taken by the comparison's own files"), "{e}");
    }
}

/// `bench::compare` of `entries` (`name` or `name=DIR`) on the base, with `opts`.
fn compare(
    entries: &[String],
    opts: &BenchOptions,
) -> anyhow::Result<(bench::Comparison, Vec<std::path::PathBuf>)> {
    let entries: Vec<CompareEntry> = entries
        .iter()
        .map(|e| CompareEntry::parse(e).unwrap())
        .collect();
    bench::compare(
        &source(),
        &spec(),
        &entries,
        &LoadOptions::default(),
        opts,
        None,
    )
}

#[test]
fn compare_checks_every_particle_set_against_the_base_before_the_first_runs() {
    // A copy of the particles recorded against other base weights, as the last entry.
    let other = tempfile::tempdir().unwrap();
    for f in ["bella_config.json", "particles.safetensors"] {
        std::fs::copy(particles().join(f), other.path().join(f)).unwrap();
    }
    let config = other.path().join("bella_config.json");
    let mut v: Value = serde_json::from_str(&std::fs::read_to_string(&config).unwrap()).unwrap();
    v["base_model"]["weights"][0]["sha256"] = "0".repeat(64).into();
    std::fs::write(&config, v.to_string()).unwrap();
    let out = tempfile::tempdir().unwrap();
    let mut opts = options(out.path());
    opts.limit = Some(2);
    let e = compare(
        &["base".into(), format!("other={}", other.path().display())],
        &opts,
    )
    .unwrap_err();
    assert!(format!("{e:#}").contains("--compare entry other"), "{e:#}");
    // Refused before the base model's run: nothing was answered.
    assert!(!out.path().join("base").exists());
}

/// An entry's directory is the comparison's own while it runs: a run of its own there (which
/// appended to the same answers) is refused, and the other way round.
#[test]
fn compare_locks_every_entry_directory() {
    let out = tempfile::tempdir().unwrap();
    let mut opts = options(out.path());
    opts.limit = Some(1);
    let held = bella_vqa::io::OutputLock::acquire(&out.path().join("particles")).unwrap();
    let e = compare(
        &[
            "base".into(),
            format!("particles={}", particles().display()),
        ],
        &opts,
    )
    .unwrap_err();
    assert!(format!("{e:#}").contains("is in use by process"), "{e:#}");
    // Refused before the first entry answered anything.
    assert!(!out.path().join("base").join("samples.jsonl").exists());
    drop(held);
}

#[test]
fn compare_writes_one_table_over_the_same_questions() {
    let out = tempfile::tempdir().unwrap();
    let mut opts = options(out.path());
    opts.limit = Some(3);
    opts.ood.truncate(1);
    let (comparison, written) = compare(
        &[
            "base".into(),
            format!("particles={}", particles().display()),
        ],
        &opts,
    )
    .unwrap();
    assert_eq!(comparison.runs.len(), 2);
    for name in ["base", "particles"] {
        let r = results_of(&out.path().join(name));
        assert_eq!(r["results"]["count"], 3);
    }
    assert_eq!(
        results_of(&out.path().join("base"))["config"]["adapters"],
        Value::Null
    );
    assert_eq!(
        results_of(&out.path().join("particles"))["config"]["adapters"]["particles"],
        P
    );
    // Same questions in both runs.
    let ids = |n: &str| -> Vec<Value> {
        samples_of(&out.path().join(n))
            .into_iter()
            .map(|s| s["question_id"].clone())
            .collect()
    };
    assert_eq!(ids("base"), ids("particles"));
    let md = std::fs::read_to_string(out.path().join("comparison.md")).unwrap();
    assert!(md.contains("| metric | base | particles |"), "{md}");
    assert!(md.contains("| vqa_accuracy |") && md.contains("ood.ood-absent.auroc_epistemic"));
    assert!(md.contains("comparison_risk_coverage.svg"));
    let json: Value =
        serde_json::from_str(&std::fs::read_to_string(out.path().join("comparison.json")).unwrap())
            .unwrap();
    assert_eq!(json["runs"][1]["name"], "particles");
    assert!(written.iter().any(|w| w.ends_with("comparison.html")));
    // Every metric with its interval, and a paired difference column.
    for name in ["base", "particles"] {
        let r = results_of(&out.path().join(name));
        let v = r["results"]["vqa_accuracy"].as_f64().unwrap();
        let i = &r["intervals"]["vqa_accuracy"];
        assert!(
            i[0].as_f64().unwrap() <= v && v <= i[1].as_f64().unwrap(),
            "{i}"
        );
        assert!(r["intervals"].get("count").is_none());
    }
    let d = &json["differences"][0];
    assert_eq!(
        (d["name"].as_str(), d["against"].as_str()),
        (Some("particles"), Some("base"))
    );
    assert!(d["intervals"]["aurc"].is_array());
    assert!(md.contains("| particles − base |"), "{md}");

    // Without resamples the differences are still given, without intervals.
    let bare = tempfile::tempdir().unwrap();
    let mut opts = options(bare.path());
    opts.limit = Some(3);
    opts.ood.truncate(1);
    opts.bootstrap.resamples = 0;
    let (comparison, _) = compare(
        &[
            "base".into(),
            format!("particles={}", particles().display()),
        ],
        &opts,
    )
    .unwrap();
    let d = &comparison.differences[0];
    assert!(d.name == "particles" && d.intervals.is_empty(), "{d:?}");
    let md = std::fs::read_to_string(bare.path().join("comparison.md")).unwrap();
    assert!(
        md.contains("| particles − base |") && md.contains("no intervals: --bootstrap 0"),
        "{md}"
    );
    let accuracy = |dir: &str| {
        results_of(&bare.path().join(dir))["results"]["vqa_accuracy"]
            .as_f64()
            .unwrap()
    };
    let row = md
        .lines()
        .find(|l| l.starts_with("| vqa_accuracy |"))
        .unwrap();
    let shown = row.trim_end_matches(" |").rsplit("| ").next().unwrap();
    assert!(
        (shown.parse::<f64>().unwrap() - (accuracy("particles") - accuracy("base"))).abs() < 1e-3,
        "{row}"
    );
}

/// Makes `examples` questions `vqa` answers right: their human answers become its own answer
/// (greedy, ≤ 4 tokens, as the calibration tests answer).
fn answered_right<'a>(
    vqa: &BellaVqa,
    examples: impl Iterator<Item = &'a mut bella_vqa::data::VqaExample>,
) {
    let ask = AskOptions {
        max_new_tokens: 4,
        ..AskOptions::default()
    };
    for e in examples {
        let r = vqa
            .ask_with(&load_image(&e.image).unwrap(), &e.question, &ask)
            .unwrap();
        e.answers = vec![r.answer; 3];
    }
}

#[test]
fn calibration_fits_a_selector_a_temperature_and_a_confidence_map_that_ask_and_bench_use() {
    let dir = tempfile::tempdir().unwrap();
    make_particles(dir.path());
    let vqa = BellaVqa::load(&source(), Some(dir.path()), &LoadOptions::default()).unwrap();
    let ask = AskOptions {
        max_new_tokens: 4,
        ..AskOptions::default()
    };
    // Right on every other question (its human answers become the model's own answer).
    let mut examples = read_jsonl(&world().join("val.jsonl"), &ReadOptions::default())
        .unwrap()
        .examples;
    answered_right(&vqa, examples.iter_mut().step_by(2));
    let val = dir.path().join("val.jsonl");
    write_jsonl(&val, &examples).unwrap();

    let mut opts = CalibrateOptions::new(DataInput::new(&val), Objective::Phi(1.0));
    opts.max_new_tokens = 4;
    opts.selector = SelectorChoice::Auto;
    opts.temperature = Some(bella_vqa::answer::selector::TemperatureObjective::Answers);
    // Ten questions are too few for auto to cross-fit a map: ask for one.
    opts.confidence_map = MapChoice::Isotonic;
    opts.ood_val = Some(DataInput::new(world().join("ood-absent.jsonl")));
    let outcome = calibrate(&vqa, dir.path(), &opts).unwrap();
    let names: Vec<&str> = outcome
        .selectors
        .iter()
        .map(|r| r.selector.name())
        .collect();
    assert_eq!(
        names,
        ["confidence", "epistemic", "risk-averse", "vote", "learned"]
    );
    let best = outcome
        .selectors
        .iter()
        .min_by(|a, b| a.aurc.total_cmp(&b.aurc))
        .unwrap();
    assert_eq!(outcome.abstention.selector, best.selector);
    assert_eq!(outcome.ood_count, 10);
    let t = outcome.abstention.temperature.unwrap();
    assert!(t > 0.0 && t.is_finite());
    let config: Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("bella_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        config["abstention"]["selector"]["name"],
        best.selector.name()
    );
    assert_eq!(config["abstention"]["temperature"], t);
    let map: ConfidenceMap =
        serde_json::from_value(config["abstention"]["confidence_map"].clone()).unwrap();
    assert_eq!(Some(&map), outcome.abstention.confidence_map.as_ref());
    assert_eq!(map.name(), "isotonic");
    // Platt's smoothed targets keep it claiming no certainty ten questions cannot show: within
    // [1/(N₋+2), (N₊+1)/(N₊+2)], N₊ + N₋ = 10, both at least 1.
    let ConfidenceMap::Isotonic { knots } = &map else {
        panic!("{map:?}")
    };
    assert!(knots
        .iter()
        .all(|k| (1.0 / 11.0..=10.0 / 11.0).contains(&k[1])));

    // ask and bench score with the stored selector at the stored temperature.
    let calibrated = BellaVqa::load(&source(), Some(dir.path()), &LoadOptions::default()).unwrap();
    assert_eq!(calibrated.selector(), &best.selector);
    let e = &examples[1];
    let r = calibrated
        .ask_with(&load_image(&e.image).unwrap(), &e.question, &ask)
        .unwrap();
    assert_eq!(r.selector, best.selector.name());
    assert_eq!(r.abstained, r.score < r.threshold);
    assert_eq!(r.threshold, outcome.abstention.threshold);
    // The confidence shown is the stored map of the model average (the top candidate's
    // probability, at the temperature).
    assert_eq!(r.confidence, map.apply(r.candidates[0].probability));
    let out = tempfile::tempdir().unwrap();
    let mut bench_opts = BenchOptions::new(DataInput::new(&val), out.path());
    bench_opts.max_new_tokens = 4;
    bench_opts.bootstrap.resamples = 0;
    let spec = ModelSpec {
        adapters: Some(dir.path().to_path_buf()),
        ..spec()
    };
    let outcome = bench::run(&calibrated, &spec, &bench_opts).unwrap();
    assert!(outcome.results.intervals.is_empty());
    for s in samples_of(out.path()) {
        assert_eq!(s["selector"], best.selector.name());
        let top = s["candidates"][0]["probability"].as_f64().unwrap();
        assert_eq!(s["confidence"].as_f64().unwrap(), map.apply(top));
        let score = s["score"].as_f64().unwrap();
        assert_eq!(s["abstained"].as_bool().unwrap(), score < r.threshold);
    }

    // A config written before selectors (no selector, no temperature, no map) is the
    // confidence selector at temperature 1, showing the confidence it scores.
    let mut old = config.clone();
    let a = old["abstention"].as_object_mut().unwrap();
    a.remove("selector");
    a.remove("temperature");
    a.remove("confidence_map");
    std::fs::write(
        dir.path().join("bella_config.json"),
        serde_json::to_vec_pretty(&old).unwrap(),
    )
    .unwrap();
    let plain = BellaVqa::load(&source(), Some(dir.path()), &LoadOptions::default()).unwrap();
    assert_eq!(plain.selector(), &Selector::Confidence);
    let r = plain
        .ask_with(&load_image(&e.image).unwrap(), &e.question, &ask)
        .unwrap();
    assert_eq!((r.selector.as_str(), r.score), ("confidence", r.confidence));

    // The confidence selector scores the confidence shown: through the (increasing) map it answers
    // the same questions, at the threshold the map makes of the one it would have without.
    let mut opts = CalibrateOptions::new(DataInput::new(&val), Objective::TargetCoverage(0.5));
    opts.max_new_tokens = 4;
    opts.dry_run = true;
    let without = calibrate(&vqa, dir.path(), &opts).unwrap();
    opts.confidence_map = MapChoice::Isotonic;
    let with = calibrate(&vqa, dir.path(), &opts).unwrap();
    let map = with.abstention.confidence_map.as_ref().unwrap();
    assert!(without.abstention.confidence_map.is_none());
    assert_eq!(with.coverage, without.coverage);
    assert!((with.abstention.threshold - map.apply(without.abstention.threshold)).abs() < 1e-12);

    // Ten questions cannot support a 5 % risk with 90 % confidence.
    let mut opts = CalibrateOptions::new(DataInput::new(&val), Objective::TargetRisk(0.05));
    opts.max_new_tokens = 4;
    opts.guarantee = Guarantee::Ltt { delta: 0.1 };
    let e = format!("{:#}", calibrate(&vqa, dir.path(), &opts).unwrap_err());
    assert!(
        e.contains("no threshold meets risk 0.05 with confidence 1 − 0.1 on 10 questions"),
        "{e}"
    );
}

fn bella() -> Command {
    Command::new(env!("CARGO_BIN_EXE_bella-vqa"))
}

/// `bench merge --bootstrap 50` of `shards` into `out`, which must succeed; its stderr.
fn merge_ok(shards: &[PathBuf], out: &Path) -> String {
    let (ok, _, err) = output(
        bella()
            .args(["bench", "merge", "--bootstrap", "50"])
            .args(shards)
            .arg("--out")
            .arg(out),
    );
    assert!(ok, "{err}");
    err
}

fn output(cmd: &mut Command) -> (bool, String, String) {
    let out = cmd.output().expect("runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `bench merge` of the shards of a `--compare` run writes what the unsharded comparison
/// writes: every entry's answers and metrics, and the comparison with its paired intervals.
#[test]
fn compare_shards_merge_into_the_unsharded_comparison() {
    let tmp = tempfile::tempdir().unwrap();
    let w = world();
    let bench_cmd = |out: &Path, extra: &[&str]| {
        let mut c = bella();
        c.args(["bench", "--quiet", "--max-new-tokens", "4", "--limit", "6"])
            .args(["--bootstrap", "50", "--model"])
            .arg(fixture("llava-tiny-hub"))
            .arg("--data")
            .arg(w.join("test.jsonl"))
            .args(["--compare", "base", "--compare"])
            .arg(format!("ens={}", particles().display()))
            .arg("--out")
            .arg(out)
            .args(extra);
        c
    };
    let whole = tmp.path().join("whole");
    let (ok, _, err) = output(&mut bench_cmd(&whole, &[]));
    assert!(ok, "{err}");
    let shards: Vec<PathBuf> = (0..2)
        .map(|i| {
            let dir = tmp.path().join(format!("s{i}"));
            let (ok, _, err) = output(&mut bench_cmd(&dir, &["--shard", &format!("{i}/2")]));
            assert!(ok, "{err}");
            dir
        })
        .collect();
    let merged = tmp.path().join("merged");
    let err = merge_ok(&shards, &merged);
    assert!(
        err.contains("base: merged 2 shard(s)") && err.contains("ens: merged 2 shard(s)"),
        "{err}"
    );
    for entry in ["base", "ens"] {
        let (m, w) = (merged.join(entry), whole.join(entry));
        assert_eq!(samples_of(&m), samples_of(&w), "{entry}");
        assert_eq!(metrics_part(&results_of(&m)), metrics_part(&results_of(&w)));
    }
    let comparison = |dir: &Path| -> Value {
        let text = std::fs::read_to_string(dir.join("comparison.json")).unwrap();
        serde_json::from_str(&text).unwrap()
    };
    let (m, w) = (comparison(&merged), comparison(&whole));
    assert!(!w["differences"].as_array().unwrap().is_empty(), "{w}");
    assert_eq!(m["differences"], w["differences"]);
    assert_eq!(m["metrics"], w["metrics"]);
    for (a, b) in m["runs"]
        .as_array()
        .unwrap()
        .iter()
        .zip(w["runs"].as_array().unwrap())
    {
        assert_eq!((&a["name"], &a["results"]), (&b["name"], &b["results"]));
    }
}

#[test]
fn command_line_bench_shards_merge_and_calibrate() {
    let tmp = tempfile::tempdir().unwrap();
    let w = world();
    let model = fixture("llava-tiny-hub");
    let bench_cmd = |out: &Path, extra: &[&str]| {
        let mut c = bella();
        c.args([
            "bench",
            "--quiet",
            "--max-new-tokens",
            "4",
            "--limit",
            "4",
            "--model",
        ])
        .arg(&model)
        .arg("--adapters")
        .arg(particles())
        .arg("--data")
        .arg(w.join("test.jsonl"))
        .arg("--val")
        .arg(w.join("val.jsonl"))
        .arg("--ood-data")
        .arg(w.join("ood-absent.jsonl"))
        .arg("--out")
        .arg(out)
        .args(extra);
        c
    };
    let whole = tmp.path().join("whole");
    let (ok, _, err) = output(&mut bench_cmd(&whole, &["--bootstrap", "50"]));
    assert!(ok, "{err}");
    // The validation file again as OOD questions (written through `..`): refused before the
    // model load, nothing written.
    let same = tmp.path().join("same");
    let val_again = w.join("..").join(w.file_name().unwrap()).join("val.jsonl");
    let (ok, _, err) = output(&mut bench_cmd(
        &same,
        &["--ood-data", val_again.to_str().unwrap()],
    ));
    assert!(
        !ok && err.contains("is the --val file: its questions would count as both in and out"),
        "{err}"
    );
    assert!(!same.exists());
    // The test file as validation questions: the thresholds would be chosen on the test
    // questions and called held out. Refused likewise.
    let (ok, _, err) = output(
        bella()
            .args(["bench", "--quiet", "--limit", "4", "--model"])
            .arg(&model)
            .arg("--data")
            .arg(w.join("test.jsonl"))
            .arg("--val")
            .arg(val_again.with_file_name("test.jsonl"))
            .arg("--out")
            .arg(&same),
    );
    assert!(!ok && err.contains("is the --data file"), "{err}");
    assert!(!same.exists());
    let mut shard_dirs = Vec::new();
    for i in 0..2 {
        let dir = tmp.path().join(format!("s{i}"));
        let shard = format!("{i}/2");
        let (ok, _, err) = output(&mut bench_cmd(
            &dir,
            &["--shard", &shard, "--bootstrap", "50"],
        ));
        assert!(ok, "{err}");
        shard_dirs.push(dir);
    }
    let merged = tmp.path().join("merged");
    let err = merge_ok(&shard_dirs, &merged);
    assert!(err.contains("merged 2 shard(s)"), "{err}");
    assert_eq!(samples_of(&merged), samples_of(&whole));
    let (merged_results, whole_results) = (results_of(&merged), results_of(&whole));
    assert_eq!(metrics_part(&merged_results), metrics_part(&whole_results));
    // The intervals too: the merge resampled as the whole run did.
    assert_eq!(merged_results["intervals"], whole_results["intervals"]);

    // Clear errors: a bad shard, a missing data file, a missing flag.
    let (ok, _, err) = output(&mut bench_cmd(&tmp.path().join("x"), &["--shard", "2/2"]));
    assert!(!ok && err.contains("shard 2/2 does not exist"), "{err}");
    let (ok, _, err) = output(
        bella()
            .args(["bench", "--model"])
            .arg(&model)
            .args(["--data", "missing.jsonl", "--out"])
            .arg(tmp.path().join("y")),
    );
    assert!(!ok && err.contains("missing.jsonl"), "{err}");
    let (ok, _, err) = output(bella().args(["bench", "--data", "x.jsonl"]));
    assert!(!ok && err.contains("--model"), "{err}");
    // An input where the run writes one of its files is refused, and left as it was.
    let inside = tmp.path().join("inside");
    std::fs::create_dir_all(&inside).unwrap();
    std::fs::copy(w.join("val.jsonl"), inside.join("samples.jsonl")).unwrap();
    let before = std::fs::read(inside.join("samples.jsonl")).unwrap();
    let (ok, _, err) = output(
        bella()
            .args(["bench", "--model"])
            .arg(&model)
            .arg("--data")
            .arg(w.join("test.jsonl"))
            .arg("--val")
            .arg(inside.join(".").join("samples.jsonl"))
            .arg("--out")
            .arg(&inside),
    );
    assert!(
        !ok && err.contains("--val") && err.contains("is the samples.jsonl that bench writes"),
        "{err}"
    );
    assert_eq!(std::fs::read(inside.join("samples.jsonl")).unwrap(), before);

    // calibrate on a copy of the particles.
    let adapters = tmp.path().join("particles");
    std::fs::create_dir_all(&adapters).unwrap();
    for f in ["bella_config.json", "particles.safetensors"] {
        std::fs::copy(particles().join(f), adapters.join(f)).unwrap();
    }
    let (ok, out, err) = output(
        bella()
            .args([
                "calibrate",
                "--quiet",
                "--max-new-tokens",
                "4",
                "--objective",
                "phi10",
                "--model",
            ])
            .arg(&model)
            .arg("--adapters")
            .arg(&adapters)
            .arg("--data")
            .arg(w.join("val.jsonl")),
    );
    assert!(ok, "{err}");
    assert!(
        out.contains("threshold") && out.contains("coverage") && out.contains("risk"),
        "{out}"
    );
    let config: Value =
        serde_json::from_str(&std::fs::read_to_string(adapters.join("bella_config.json")).unwrap())
            .unwrap();
    assert_eq!(config["abstention"]["objective"], "max phi_10");
    assert_eq!(config["abstention"]["computed_in"], "f32");
    // Answering with the base in another dtype than the calibration's is allowed, and noted.
    let image = Path::new(env!("CARGO_MANIFEST_DIR")).join("eval/demo/red-circle.png");
    let (ok, _, err) = output(
        bella()
            .args(["ask", "--dtype", "bf16", "--max-new-tokens", "4", "--model"])
            .arg(&model)
            .arg("--adapters")
            .arg(&adapters)
            .arg("--image")
            .arg(&image)
            .arg("What color is the circle?"),
    );
    assert!(
        ok && err.contains("calibrated with the base computing in f32, now in bf16"),
        "{err}"
    );
    let (ok, _, err) = output(
        bella()
            .args([
                "calibrate",
                "--target-risk",
                "0.1",
                "--objective",
                "phi10",
                "--model",
            ])
            .arg(&model)
            .arg("--adapters")
            .arg(&adapters)
            .arg("--data")
            .arg(w.join("val.jsonl")),
    );
    assert!(!ok && err.contains("cannot be used with"), "{err}");
    // Every selector's AURC, a fitted temperature; the guarantee refuses on 10 questions.
    let calibrate = |extra: &[&str]| {
        output(
            bella()
                .args(["calibrate", "--quiet", "--dry-run", "--max-new-tokens", "4"])
                .args(extra)
                .arg("--model")
                .arg(&model)
                .arg("--adapters")
                .arg(&adapters)
                .arg("--data")
                .arg(w.join("val.jsonl")),
        )
    };
    let (ok, out, err) = calibrate(&["--selector", "auto", "--objective", "phi1"]);
    assert!(ok, "{err}");
    assert!(out.contains("← chosen") && out.contains("learned") && out.contains("temperature"));
    // Without --ood-val one AURC column (the second, the validation questions alone, would
    // repeat it).
    assert!(
        out.contains("selector   AURC (cross-fitted)\n") && !out.contains("val alone"),
        "{out}"
    );
    // The maps' table, without a map by default (ten questions are too few to cross-fit one on
    // five folds anyway); a named map is fitted on all ten.
    let maps = "confidence map (Brier, cross-fitted on the validation questions): none ";
    assert!(
        out.contains(maps) && out.contains("none 0.") && out.contains("platt —"),
        "{out}"
    );
    // These particles get every validation question wrong: nothing to fit a map to.
    let (ok, _, err) = calibrate(&["--confidence-map", "platt"]);
    assert!(
        !ok && err.contains(
            "--confidence-map: a confidence map needs validation questions the model gets both \
             right and wrong (auto keeps no map then, or choose none)"
        ),
        "{err}"
    );
    let (ok, _, err) = calibrate(&["--target-risk", "0.05"]);
    assert!(
        !ok && err.contains("no threshold meets risk 0.05 with confidence 1 − 0.1 on 10 questions"),
        "{err}"
    );
    let (ok, out, err) = calibrate(&["--target-risk", "0.05", "--guarantee", "none"]);
    assert!(ok && !out.contains("guarantee"), "{err}");
    // A bad record left out by --skip-bad is said and counted: the validation set is smaller
    // than the file.
    let with_bad = tmp.path().join("val-with-a-bad-line.jsonl");
    let mut text = String::new();
    for line in std::fs::read_to_string(w.join("val.jsonl"))
        .unwrap()
        .lines()
    {
        let mut record: Value = serde_json::from_str(line).unwrap();
        let image = w.join(record["image"].as_str().unwrap());
        record["image"] = Value::from(image.to_str().unwrap());
        text += &format!("{record}\n");
    }
    text += "{not json\n";
    std::fs::write(&with_bad, text).unwrap();
    let (ok, json, err) = output(
        bella()
            .args(["calibrate", "--dry-run", "--json", "--max-new-tokens", "4"])
            .args(["--guarantee", "none", "--skip-bad", "--model"])
            .arg(&model)
            .arg("--adapters")
            .arg(&adapters)
            .arg("--data")
            .arg(&with_bad),
    );
    assert!(ok, "{err}");
    assert!(
        err.contains("skipped 1 bad record(s) in") && err.contains("line 11"),
        "{err}"
    );
    let outcome: Value = serde_json::from_str(&json).unwrap();
    assert_eq!(
        (outcome["count"].as_u64(), outcome["skipped"].as_u64()),
        (Some(10), Some(1))
    );
    // Without --model: the base model the particles were trained on, said so (as ask does).
    let (ok, without, err) = output(
        bella()
            .args(["calibrate", "--dry-run", "--max-new-tokens", "4"])
            .args(["--target-risk", "0.05", "--guarantee", "none", "--adapters"])
            .arg(&adapters)
            .arg("--data")
            .arg(w.join("val.jsonl")),
    );
    assert!(ok, "{err}");
    assert!(
        err.contains(&format!(
            "base model {}: the one the particles were trained on",
            model.display()
        )),
        "{err}"
    );
    assert_eq!(without, out);
}

#[test]
fn vizwiz_input_and_a_test_set_without_answers() {
    let tmp = tempfile::tempdir().unwrap();
    let data = read_jsonl(&world().join("test.jsonl"), &ReadOptions::default()).unwrap();
    let records = |with_answers: bool| -> Value {
        Value::Array(
            data.examples[..5]
                .iter()
                .map(|e| {
                    let mut r = serde_json::json!({
                        "question_id": e.question_id,
                        "image": e.image.file_name().unwrap().to_str().unwrap(),
                        "question": e.question,
                        "answer_type": e.answer_type,
                        "answerable": 1,
                    });
                    if with_answers {
                        r["answers"] = e
                            .answers
                            .iter()
                            .map(|a| serde_json::json!({"answer": a, "answer_confidence": "yes"}))
                            .collect();
                    }
                    r
                })
                .collect(),
        )
    };
    let images = world().join("images/test");
    for (name, with_answers) in [("vizwiz", true), ("vizwiz-test", false)] {
        let file = tmp.path().join(format!("{name}.json"));
        std::fs::write(&file, records(with_answers).to_string()).unwrap();
        let out = tmp.path().join(name);
        let mut opts = BenchOptions::new(
            DataInput {
                path: file,
                annotations: None,
                images: Some(images.clone()),
            },
            &out,
        );
        opts.max_new_tokens = 4;
        let outcome = run(&opts);
        assert_eq!(outcome.answered_now, 5);
        let r = results_of(&out);
        assert_eq!(r["config"]["data"][0]["format"], "vizwiz");
        assert_eq!(r["results"]["count"], 5);
        let samples = samples_of(&out);
        assert_eq!(samples[0]["answerable"], 1);
        assert_eq!(r["summary"].is_null(), !with_answers);
        // Without human answers a question has no accuracy (it read 0.0).
        assert_eq!(samples[0]["accuracy"].is_null(), !with_answers);
        let md = std::fs::read_to_string(out.join("report.md")).unwrap();
        assert_eq!(md.contains("No accuracy metrics"), !with_answers);
        // The share answered needs no human answers: reported either way, as the samples say.
        let answered = samples.iter().filter(|s| s["abstained"] == false).count();
        assert_eq!(
            r["results"]["coverage"].as_f64(),
            Some(answered as f64 / 5.0),
            "{}",
            r["results"]
        );
        // The answers in EvalAI's VizWiz upload format, in the file's order.
        let submission: Value =
            serde_json::from_slice(&std::fs::read(out.join("submission.json")).unwrap()).unwrap();
        let expected: Vec<Value> = samples
            .iter()
            .map(|s| {
                let image = std::path::Path::new(s["image"].as_str().unwrap());
                serde_json::json!({
                    "image": image.file_name().unwrap().to_str().unwrap(),
                    "answer": normalize_answer(s["answer"].as_str().unwrap()),
                })
            })
            .collect();
        assert_eq!(submission, Value::Array(expected));
    }
    // Part of a test set without answers: no file a server would refuse, and the run says why.
    let out = tmp.path().join("vizwiz-test-part");
    let mut opts = BenchOptions::new(
        DataInput {
            path: tmp.path().join("vizwiz-test.json"),
            annotations: None,
            images: Some(images),
        },
        &out,
    );
    opts.max_new_tokens = 4;
    opts.limit = Some(2);
    run(&opts);
    assert!(!out.join("submission.json").exists());
    let notes = results_of(&out)["notes"].to_string();
    assert!(
        notes.contains("no submission.json: --limit kept 2 of the 5 questions"),
        "{notes}"
    );
}

#[test]
fn textvqa_gqa_and_aokvqa_files_are_benched_like_jsonl_with_their_submission_formats() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let data = read_jsonl(&world().join("test.jsonl"), &ReadOptions::default()).unwrap();
    let records = &data.examples[..4];
    let (mut textvqa, mut gqa, mut aokvqa) = (Vec::new(), serde_json::Map::new(), Vec::new());
    for (i, e) in records.iter().enumerate() {
        // Each format's own image names and folders (the files are PNGs; contents decide).
        let stem = format!("img{i:02}");
        for name in [
            format!("train_images/{stem}.jpg"),
            format!("images/{stem}.jpg"),
            format!("val2017/{:012}.jpg", i + 1),
        ] {
            std::fs::create_dir_all(dir.join(&name).parent().unwrap()).unwrap();
            std::fs::copy(&e.image, dir.join(name)).unwrap();
        }
        textvqa.push(
            serde_json::json!({"question_id": 500 + i, "question": e.question,
            "image_id": stem, "answers": e.answers, "set_name": "val"}),
        );
        gqa.insert(
            format!("0{i}"),
            serde_json::json!({"imageId": stem,
            "question": e.question, "answer": e.answers[0], "fullAnswer": "…"}),
        );
        aokvqa.push(serde_json::json!({"split": "val", "image_id": i + 1,
            "question_id": format!("aok{i}"), "question": e.question,
            "choices": ["a", "b"], "correct_choice_idx": 0, "direct_answers": e.answers}));
    }
    let files = [
        (
            "textvqa",
            serde_json::json!({"dataset_name": "textvqa", "data": textvqa}),
        ),
        ("gqa", Value::Object(gqa)),
        ("aokvqa", Value::Array(aokvqa)),
    ];
    let bench_file = |file: PathBuf, name: &str| -> (Value, Vec<Value>, Value) {
        let out = dir.join(format!("out-{name}"));
        let mut opts = BenchOptions::new(DataInput::new(file), &out);
        opts.max_new_tokens = 4;
        assert_eq!(run(&opts).answered_now, 4);
        let submission =
            serde_json::from_slice(&std::fs::read(out.join("submission.json")).unwrap()).unwrap();
        let mut samples = samples_of(&out);
        samples.sort_by_key(|s| s["index"].as_u64());
        (results_of(&out), samples, submission)
    };
    // Submissions hold the answers as they are scored (--normalize always, the default).
    let normalised = |s: &Value| normalize_answer(s["answer"].as_str().unwrap());
    // The same questions as our JSONL, for the answers every reader must reproduce.
    let jsonl = dir.join("same.jsonl");
    write_jsonl(&jsonl, records).unwrap();
    let (_, reference, _) = bench_file(jsonl, "jsonl");
    for (name, content) in files {
        let file = dir.join(format!("{name}.json"));
        std::fs::write(&file, content.to_string()).unwrap();
        let (results, samples, submission) = bench_file(file, name);
        assert_eq!(results["config"]["data"][0]["format"], name);
        let notes = results["notes"].to_string();
        assert_eq!(
            notes.contains("A-OKVQA's direct-answer rule"),
            name == "aokvqa",
            "{notes}"
        );
        let answers: Vec<&Value> = samples.iter().map(|s| &s["answer"]).collect();
        let expected: Vec<&Value> = reference.iter().map(|s| &s["answer"]).collect();
        assert_eq!(
            answers, expected,
            "{name}: the same image and question answer alike"
        );
        for (s, e) in samples.iter().zip(records) {
            let humans: Vec<String> = match name {
                "gqa" => vec![e.answers[0].clone()],
                _ => e.answers.clone(),
            };
            // A-OKVQA's own rule (eval_predictions.py), the VQA rule for the others.
            let answer = s["answer"].as_str().unwrap();
            let acc = match name {
                "aokvqa" => {
                    metrics::direct_answer_accuracy(answer, &humans, NormalizeMode::default())
                }
                _ => metrics::vqa_accuracy(answer, &humans, NormalizeMode::default()),
            };
            assert_eq!(s["accuracy"].as_f64().unwrap(), acc, "{name}");
        }
        let expected = match name {
            "textvqa" => Value::Array(
                samples
                    .iter()
                    .enumerate()
                    .map(|(i, s)| serde_json::json!({"question_id": 500 + i, "answer": normalised(s)}))
                    .collect(),
            ),
            "gqa" => Value::Array(
                samples
                    .iter()
                    .enumerate()
                    .map(|(i, s)| {
                        serde_json::json!({"questionId": format!("0{i}"), "prediction": normalised(s)})
                    })
                    .collect(),
            ),
            _ => Value::Object(
                samples
                    .iter()
                    .enumerate()
                    .map(|(i, s)| (format!("aok{i}"), serde_json::json!({"direct_answer": normalised(s)})))
                    .collect(),
            ),
        };
        assert_eq!(submission, expected, "{name}");
    }
}

/// Samples of an A-OKVQA run written before its own rule was applied (no `accuracy_rule`,
/// scored by the VQA rule, no alpha recorded), in a run continued or shards merged after the
/// upgrade, are scored again by A-OKVQA's rule: a run must not hold two metrics' scores, nor
/// report one as the other.
#[test]
fn older_samples_of_aokvqa_data_are_scored_again_by_its_rule() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let data = read_jsonl(&world().join("test.jsonl"), &ReadOptions::default()).unwrap();
    let file = dir.join("aokvqa_v1p0_val.json");
    let write_file = |humans: &dyn Fn(usize) -> Vec<String>| {
        let records: Vec<Value> = data.examples[..6]
            .iter()
            .enumerate()
            .map(|(i, e)| {
                let name = format!("val2017/{:012}.jpg", i + 1);
                std::fs::create_dir_all(dir.join("val2017")).unwrap();
                std::fs::copy(&e.image, dir.join(name)).unwrap();
                serde_json::json!({"split": "val", "image_id": i + 1,
                    "question_id": format!("q{i}"), "question": e.question, "choices": ["a"],
                    "correct_choice_idx": 0, "direct_answers": humans(i)})
            })
            .collect();
        std::fs::write(&file, Value::Array(records).to_string()).unwrap();
    };
    let bench_into = |out: &Path, shard: Option<Shard>| {
        let mut opts = BenchOptions::new(DataInput::new(file.clone()), out);
        opts.max_new_tokens = 4;
        opts.shard = shard;
        run(&opts);
    };
    // What an older version wrote: the VQA rule's accuracy, no rule named.
    let make_old = |out: &Path| {
        let lines: Vec<String> = samples_of(out)
            .into_iter()
            .map(|mut s| {
                let humans: Vec<String> = serde_json::from_value(s["answers"].clone()).unwrap();
                let answer = s["answer"].as_str().unwrap().to_string();
                s["accuracy"] =
                    metrics::vqa_accuracy(&answer, &humans, NormalizeMode::default()).into();
                s.as_object_mut().unwrap().remove("accuracy_rule");
                s.to_string()
            })
            .collect();
        std::fs::write(out.join("samples.jsonl"), lines.join("\n") + "\n").unwrap();
        // Nor did it record the particles' alpha.
        let path = out.join("bench_config.json");
        let mut config: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        let adapters = config["adapters"].as_object_mut().unwrap();
        assert!(adapters.remove("alpha").is_some());
        std::fs::write(&path, config.to_string()).unwrap();
    };
    let check = |out: &Path| {
        let samples = samples_of(out);
        let mut differ = 0;
        let mut sum = 0.0;
        for s in &samples {
            let humans: Vec<String> = serde_json::from_value(s["answers"].clone()).unwrap();
            let answer = s["answer"].as_str().unwrap();
            let da = metrics::direct_answer_accuracy(answer, &humans, NormalizeMode::default());
            differ += usize::from(da != metrics::vqa_accuracy(answer, &humans, Default::default()));
            assert_eq!(s["accuracy"].as_f64(), Some(da), "{s}");
            assert_eq!(s["accuracy_rule"], "direct_answer", "{s}");
            sum += da;
        }
        assert!(differ > 0, "no answer tells the rules apart");
        let acc = results_of(out)["results"]["vqa_accuracy"].as_f64().unwrap();
        assert!((acc - sum / samples.len() as f64).abs() < 1e-12, "{acc}");
    };
    // The model's answers first; then three of ten annotators give each: A-OKVQA's rule says
    // 1, the VQA rule 0.9.
    write_file(&|_| vec!["red".to_string()]);
    let probe = dir.join("probe");
    bench_into(&probe, None);
    let mut given = samples_of(&probe);
    given.sort_by_key(|s| s["index"].as_u64());
    write_file(&|i| {
        let mut humans = vec![given[i]["answer"].as_str().unwrap().to_string(); 3];
        humans.extend(std::iter::repeat_n("something else".to_string(), 7));
        humans
    });
    // A finished run continued by the new version (its metrics computed again).
    let whole = dir.join("whole");
    bench_into(&whole, None);
    make_old(&whole);
    bench_into(&whole, None);
    check(&whole);
    // Shards, one of them old, merged (and merged again into the same directory).
    let shards: Vec<PathBuf> = (0..2)
        .map(|i| {
            let d = dir.join(format!("shard{i}"));
            bench_into(&d, Some(Shard::new(i, 2).unwrap()));
            d
        })
        .collect();
    make_old(&shards[0]);
    let merged = dir.join("merged");
    for _ in 0..2 {
        merge(&shards, &merged, &Default::default()).unwrap();
        check(&merged);
    }
}

#[test]
fn declined_counts_abstentions_and_unanswerable_answers() {
    use bella_vqa::bench::results::declined;
    use bella_vqa::bench::samples::Sample;
    let sample = |answer: &str, abstained: bool| -> Sample {
        serde_json::from_value(serde_json::json!({
            "question_id": "q", "split": "test", "is_ood": false, "index": 0, "question": "?",
            "image": "x.png", "answers": [], "answer": answer, "confidence": 0.5,
            "abstained": abstained, "accuracy": 0.0,
            "uncertainty": {"total": 0.0, "aleatoric": 0.0, "epistemic": 0.0},
            "vote_share": 1.0, "particles": [], "candidates": [], "response": ""
        }))
        .unwrap()
    };
    let samples = [
        sample("red", false),
        sample("red", true),
        sample("unanswerable.", false), // normalised like any answer
        sample("unanswerable", true),
    ];
    let refs: Vec<&Sample> = samples.iter().collect();
    assert_eq!(declined(&refs), 0.75);
    assert_eq!(declined(&refs[..1]), 0.0);
    assert_eq!(declined(&[]), 0.0);
}

#[test]
fn bench_takes_the_abstain_on_everything_threshold_calibrate_stores() {
    // Calibrate stores "abstain on everything" as the f64 just above the highest score, 1;
    // ask accepts it, and bench must too (it refused anything above 1).
    let dir = tempfile::tempdir().unwrap();
    make_particles(dir.path());
    let above_one = f64::from_bits(1.0f64.to_bits() + 1);
    bench::store_abstention(dir.path(), &test_abstention(above_one)).unwrap();
    let vqa = BellaVqa::load(&source(), Some(dir.path()), &LoadOptions::default()).unwrap();
    let spec = ModelSpec {
        adapters: Some(dir.path().to_path_buf()),
        ..spec()
    };
    let out = tempfile::tempdir().unwrap();
    let mut opts = BenchOptions::new(DataInput::new(world().join("test.jsonl")), out.path());
    opts.max_new_tokens = 4;
    opts.limit = Some(3);
    opts.bootstrap.resamples = 0;
    bench::run(&vqa, &spec, &opts).unwrap();
    let samples = samples_of(out.path());
    assert_eq!(samples.len(), 3);
    assert!(
        samples.iter().all(|s| s["abstained"] == true),
        "{samples:?}"
    );
    assert_eq!(results_of(out.path())["results"]["threshold"], above_one);

    // A --threshold outside [0, 1] is refused, saying what to give instead.
    let out = tempfile::tempdir().unwrap();
    let mut opts = BenchOptions::new(DataInput::new(world().join("test.jsonl")), out.path());
    opts.threshold = Some(above_one);
    let e = format!("{:#}", bench::run(&vqa, &spec, &opts).unwrap_err());
    assert!(
        e.contains("--threshold 1.0000000000000002 is not a score in [0, 1]")
            && e.contains("leave --threshold out"),
        "{e}"
    );
}

#[test]
fn a_file_of_one_question_keeps_the_other_files_intervals_and_the_notes_say_why_it_has_none() {
    // A 1-question --val and a 1-question --ood-data beside the 10 test questions: every
    // interval of the run disappeared, while the notes still announced them.
    let dir = tempfile::tempdir().unwrap();
    let one = |name: &str, from: &str| {
        let mut examples = read_jsonl(&world().join(from), &ReadOptions::default())
            .unwrap()
            .examples;
        examples.truncate(1);
        let path = dir.path().join(name);
        write_jsonl(&path, &examples).unwrap();
        DataInput::new(path)
    };
    let out = tempfile::tempdir().unwrap();
    let mut opts = options(out.path());
    opts.val = Some(one("val1.jsonl", "val.jsonl"));
    opts.ood = vec![one("absent1.jsonl", "ood-absent.jsonl")];
    opts.bootstrap.resamples = 50;
    run(&opts);
    let r = results_of(out.path());
    let intervals = r["intervals"].as_object().unwrap();
    // The test file's metrics keep their intervals (the tiny model's confidences vary, so the
    // NLL's has a width).
    for key in ["vqa_accuracy", "coverage", "aurc", "ece", "nll"] {
        let [lo, hi] = [0, 1].map(|i| intervals[key][i].as_f64().unwrap());
        let point = r["results"][key].as_f64().unwrap();
        assert!(lo <= point && point <= hi, "{key}: {point} [{lo}, {hi}]");
    }
    assert!(intervals["nll"][0].as_f64() < intervals["nll"][1].as_f64());
    // The 1-question OOD file's own metrics have none; the test file's keep theirs.
    assert!(r["results"]["ood.absent1.coverage"].is_number());
    assert!(
        !intervals.keys().any(|k| k.starts_with("ood.absent1.")),
        "{intervals:?}"
    );
    let notes: Vec<&str> = r["notes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n.as_str().unwrap())
        .collect();
    for (split, consequence) in [
        ("val", "the thresholds chosen on it do not vary"),
        ("absent1", "its metrics (ood.…) have no interval"),
    ] {
        assert!(
            notes.iter().any(|n| n.contains(&format!("{split} ("))
                && n.contains("has one question")
                && n.contains(consequence)),
            "{notes:?}"
        );
    }
}

#[test]
fn selectors_that_cannot_rank_are_refused_or_flagged() {
    // One particle: epistemic (MI 0) and vote (share 1) score every question 1, and calibrate
    // stored them with an objective that never abstains. Refused by name, skipped by auto.
    let dir = tempfile::tempdir().unwrap();
    make_n_particles(dir.path(), 1);
    let vqa = BellaVqa::load(&source(), Some(dir.path()), &LoadOptions::default()).unwrap();
    let val = world().join("val.jsonl");
    for name in ["epistemic", "vote"] {
        let mut opts = CalibrateOptions::new(DataInput::new(&val), Objective::TargetCoverage(0.8));
        opts.selector = SelectorChoice::Named(name);
        let e = format!("{:#}", calibrate(&vqa, dir.path(), &opts).unwrap_err());
        assert!(
            e.contains(&format!("--selector {name}")) && e.contains("with 1 particle"),
            "{e}"
        );
    }
    let mut opts = CalibrateOptions::new(DataInput::new(&val), Objective::TargetCoverage(0.8));
    opts.max_new_tokens = 4;
    opts.selector = SelectorChoice::Auto;
    opts.dry_run = true;
    let outcome = calibrate(&vqa, dir.path(), &opts).unwrap();
    let names: Vec<&str> = outcome
        .selectors
        .iter()
        .map(|r| r.selector.name())
        .collect();
    assert_eq!(names, ["confidence", "risk-averse", "learned"]);

    // All right (the human answers are the model's own): a learned selector has nothing to
    // learn and scores every question alike; calibrate says so.
    let mut examples = read_jsonl(&val, &ReadOptions::default()).unwrap().examples;
    answered_right(&vqa, examples.iter_mut());
    let right = dir.path().join("right.jsonl");
    write_jsonl(&right, &examples).unwrap();
    let mut opts = CalibrateOptions::new(DataInput::new(&right), Objective::TargetCoverage(0.8));
    opts.max_new_tokens = 4;
    opts.selector = SelectorChoice::Named("learned");
    opts.dry_run = true;
    let outcome = calibrate(&vqa, dir.path(), &opts).unwrap();
    assert_eq!(outcome.accuracy, 1.0);
    assert!(
        outcome.warnings.iter().any(|w| w
            .contains("the learned selector gives every validation question the same score")
            && w.contains("all right: nothing to tell apart")),
        "{:?}",
        outcome.warnings
    );
    // The confidence selector still ranks these questions: no warning of it (a few questions
    // all answered right are said to be thin evidence).
    opts.selector = SelectorChoice::Named("confidence");
    let warnings = calibrate(&vqa, dir.path(), &opts).unwrap().warnings;
    assert!(
        !warnings.iter().any(|w| w.contains("same score"))
            && warnings
                .iter()
                .any(|w| w.contains("every validation question was answered right")),
        "{warnings:?}"
    );
}

#[test]
fn calibrate_warns_when_ood_val_questions_are_validation_questions() {
    // The validation file as --ood-val: every question is both to answer right and to decline.
    let val = world().join("val.jsonl");
    let warnings = |ood: PathBuf| {
        let mut opts = CalibrateOptions::new(DataInput::new(&val), Objective::TargetCoverage(0.8));
        opts.max_new_tokens = 4;
        opts.dry_run = true;
        opts.ood_val = Some(DataInput::new(ood));
        calibrate(vqa_with_particles(), particles(), &opts)
            .unwrap()
            .warnings
    };
    let w = warnings(val.clone());
    assert!(
        w.iter()
            .any(|w| w.contains("10 of the 10 --ood-val questions")
                && w.contains("are also validation questions")),
        "{w:?}"
    );
    // The same image and question under another id, in another file, is found too.
    let dir = tempfile::tempdir().unwrap();
    let mut examples = read_jsonl(&val, &ReadOptions::default()).unwrap().examples;
    examples.truncate(2);
    for e in &mut examples {
        e.question_id = format!("copy-{}", e.question_id);
    }
    let copy = dir.path().join("copy.jsonl");
    write_jsonl(&copy, &examples).unwrap();
    let w = warnings(copy);
    assert!(
        w.iter().any(|w| w.contains("2 of the 2 --ood-val")),
        "{w:?}"
    );
    // And with the image paths written otherwise: through `..` and a link to the images.
    std::os::unix::fs::symlink(world().join("images"), dir.path().join("images")).unwrap();
    let relative = dir.path().join("sub/copy.jsonl");
    std::fs::create_dir_all(relative.parent().unwrap()).unwrap();
    let lines: String = examples
        .iter()
        .map(|e| {
            let name = e.image.strip_prefix(world()).unwrap().display().to_string();
            serde_json::json!({"question_id": e.question_id, "image": format!("../{name}"),
                               "question": e.question, "answers": e.answers})
            .to_string()
                + "\n"
        })
        .collect();
    std::fs::write(&relative, lines).unwrap();
    let w = warnings(relative);
    assert!(
        w.iter().any(|w| w.contains("2 of the 2 --ood-val")),
        "{w:?}"
    );
    // Questions of another file: no warning of them.
    let w = warnings(world().join("ood-absent.jsonl"));
    assert!(!w.iter().any(|w| w.contains("--ood-val")), "{w:?}");
}

/// A 200-question shapes world of `seed` in `dir/w` and a copy of the particle set `from` in
/// `dir/particles` (calibrate writes into it): the validation file and the copy.
fn world_and_particles(dir: &Path, seed: u64, from: &Path) -> (PathBuf, PathBuf) {
    generate(&ShapesOptions {
        n: 200,
        seed,
        ..ShapesOptions::new(dir.join("w"))
    })
    .unwrap();
    let adapters = dir.join("particles");
    std::fs::create_dir_all(&adapters).unwrap();
    for f in ["bella_config.json", "particles.safetensors"] {
        std::fs::copy(from.join(f), adapters.join(f)).unwrap();
    }
    (dir.join("w/val.jsonl"), adapters)
}

/// Answers that normalise to nothing are declined by ask and bench whatever their score, so
/// calibrate counts them as declined too: the coverage it reports (and aims at) is the one bench
/// then measures on the same questions (it counted them as answered: 100 % against 85 %).
#[test]
fn calibrate_counts_answers_that_say_nothing_as_declined() {
    let tmp = tempfile::tempdir().unwrap();
    let (val, adapters) = world_and_particles(tmp.path(), 3, particles());
    // One new token: some of these random particles' answers are empty.
    let calibrated = calibrate_then_bench(
        &fixture("llava-tiny-hub"),
        &adapters,
        &val,
        "1",
        &["--target-coverage", "0.5", "--no-image-check"],
        &tmp.path().join("bench"),
    );
    let samples: Vec<Value> = std::fs::read_to_string(tmp.path().join("bench/samples.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let empty = samples
        .iter()
        .filter(|s| {
            bella_vqa::data::normalize::normalize_answer(s["answer"].as_str().unwrap()).is_empty()
        })
        .count();
    assert!(empty > 0, "no empty answer: the case is not exercised");
    let answered = samples.iter().filter(|s| s["abstained"] == false).count();
    let coverage = answered as f64 / samples.len() as f64;
    assert!(
        (calibrated["coverage"].as_f64().unwrap() - coverage).abs() < 1e-9,
        "calibrate {} against bench {coverage} ({empty} empty of {})",
        calibrated["coverage"],
        samples.len()
    );
}

/// calibrate ranks the selectors as bench ranks the answers, a flagged image below all: the
/// AURC it reports for the selector it stores is the one bench then measures on the same
/// questions (it ranked them before the image check was fitted).
#[test]
fn calibrate_ranks_selectors_with_the_image_check_as_bench_does() {
    let tmp = tempfile::tempdir().unwrap();
    // The demo's particles: answers right and wrong, so that the order matters.
    let demo = bella_vqa::demo::path(bella_vqa::demo::PARTICLES).unwrap();
    let (val, adapters) = world_and_particles(tmp.path(), 5, &demo);
    let calibrated = calibrate_then_bench(
        &bella_vqa::demo::path(bella_vqa::demo::LLAVA).unwrap(),
        &adapters,
        &val,
        "2",
        &[
            "--target-coverage",
            "0.5",
            "--selector",
            "confidence",
            "--image-check-alpha",
            "0.2",
        ],
        &tmp.path().join("bench"),
    );
    assert!(
        calibrated["image_flagged"]["val"].as_f64().unwrap() > 0.0,
        "no validation image flagged: the case is not exercised: {calibrated}"
    );
    let results: Value = serde_json::from_str(
        &std::fs::read_to_string(tmp.path().join("bench/results.json")).unwrap(),
    )
    .unwrap();
    let bench_aurc = results["results"]["aurc"].as_f64().unwrap();
    let calibrate_aurc = calibrated["selectors"][0]["aurc_val"].as_f64().unwrap();
    assert!(
        (bench_aurc - calibrate_aurc).abs() < 1e-9,
        "calibrate {calibrate_aurc} against bench {bench_aurc}: {}",
        calibrated["selectors"]
    );
}

/// `calibrate --json` of `adapters` on `model` with `options` on the questions of `val`, then
/// `bench` of them on the same questions into `out`, both with `max_new_tokens`: what calibrate
/// said.
fn calibrate_then_bench(
    model: &Path,
    adapters: &Path,
    val: &Path,
    max_new_tokens: &str,
    options: &[&str],
    out: &Path,
) -> Value {
    let (ok, said, err) = output(
        bella()
            .args([
                "calibrate",
                "--quiet",
                "--json",
                "--max-new-tokens",
                max_new_tokens,
            ])
            .args(options)
            .arg("--model")
            .arg(model)
            .arg("--adapters")
            .arg(adapters)
            .arg("--data")
            .arg(val),
    );
    assert!(ok, "{err}");
    let (ok, _, err) = output(
        bella()
            .args(["bench", "--quiet", "--max-new-tokens", max_new_tokens])
            .args(["--bootstrap", "0", "--model"])
            .arg(model)
            .arg("--adapters")
            .arg(adapters)
            .arg("--data")
            .arg(val)
            .arg("--out")
            .arg(out),
    );
    assert!(ok, "{err}");
    serde_json::from_str(&said).unwrap()
}

/// A run directory continued with another data file is refused naming what it holds, not
/// calling the new file an earlier version of itself.
#[test]
fn a_run_continued_on_another_file_is_refused_saying_so() {
    let tmp = tempfile::tempdir().unwrap();
    let w = world();
    let out = tmp.path().join("run");
    let run = |data: &str| {
        output(
            bella()
                .args(["bench", "--quiet", "--limit", "2", "--max-new-tokens", "2"])
                .arg("--model")
                .arg(fixture("llava-tiny-hub"))
                .arg("--data")
                .arg(w.join(data))
                .arg("--out")
                .arg(&out),
        )
    };
    let (ok, _, err) = run("test.jsonl");
    assert!(ok, "{err}");
    let (ok, _, err) = run("val.jsonl");
    assert!(
        !ok && err.contains("holds answers to test questions that")
            && err.contains("the run was of another file, or this one changed since"),
        "{err}"
    );
}
