//! No lost or stale work, consistent files (issue 13, classes 3 and 8), end to end with the
//! command line on the tiny LLaVA fixture:
//!
//! - kill tests: `train` and `bench` are aborted before each of their file operations in turn
//!   (the `BELLA_FAULT_AFTER_OPS` hook of `src/io.rs`), then resumed; the result is byte for byte
//!   the one of an uninterrupted run and no temporary file is left;
//! - Ctrl-C tests: the same with a SIGINT instead of the abort: `train` keeps the step in
//!   progress with a checkpoint, `bench` every answer, both exit with 130 and say how to go on;
//! - an output directory in use by another process is refused at once, naming the process;
//! - `--resume` refuses other options, other data and another base model, naming the difference;
//! - `data shapes` refuses to overwrite a data set without `--force`;
//! - `calibrate` announces that it replaces a stored threshold and keeps the old one;
//! - every file a run writes has the permissions the umask gives (0640 under umask 027).

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use bella_vqa::data::shapes::{generate, ShapesOptions};
use common::*;

fn bella() -> Command {
    Command::new(env!("CARGO_BIN_EXE_bella-vqa"))
}

fn output(cmd: &mut Command) -> Output {
    cmd.output().expect("bella-vqa runs")
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn run_ok(cmd: &mut Command) -> String {
    let out = output(cmd);
    assert!(out.status.success(), "failed: {}", text(&out));
    text(&out)
}

fn run_err(cmd: &mut Command) -> String {
    let out = output(cmd);
    assert!(!out.status.success(), "should fail: {}", text(&out));
    let t = text(&out);
    assert!(!t.contains("panicked"), "{t}");
    t
}

/// A small shapes world.
fn world() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    generate(&ShapesOptions {
        n: 12,
        ..ShapesOptions::new(dir.path())
    })
    .unwrap();
    dir
}

/// A 4-step SVGD run of 2 particles on 8 questions of the tiny LLaVA, checkpointed every 2 steps.
fn train(world: &Path, out: &Path) -> Command {
    train_with(&fixture("llava-tiny-hub"), world, out, &[])
}

/// [`train`] on `model`, with some options changed.
fn train_with(model: &Path, world: &Path, out: &Path, changed: &[(&str, &str)]) -> Command {
    let options = [
        ("--particles", "2"),
        ("--rank", "2"),
        ("--targets", "language_model.*.q_proj"),
        ("--method", "svgd"),
        ("--epochs", "1"),
        ("--batch-size", "2"),
        ("--limit", "8"),
        ("--checkpoint-every", "2"),
        ("--eval-every", "2"),
        ("--lr", "0.01"),
    ];
    let mut cmd = bella();
    cmd.args(["train", "--quiet", "--model"])
        .arg(model)
        .arg("--data")
        .arg(world.join("train.jsonl"))
        .arg("--out")
        .arg(out);
    for (flag, value) in options {
        let value = changed
            .iter()
            .find(|(f, _)| *f == flag)
            .map_or(value, |(_, v)| v);
        cmd.args([flag, value]);
    }
    cmd
}

/// Every file under `dir`, relative path → bytes.
fn files(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<PathBuf, Vec<u8>>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let path = e.unwrap().path();
            if path.is_dir() {
                walk(root, &path, out);
            } else {
                let rel = path.strip_prefix(root).unwrap().to_path_buf();
                out.insert(rel, std::fs::read(&path).unwrap());
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

fn assert_no_temp_files(dir: &Path) {
    for path in files(dir).keys() {
        assert!(
            !path.to_string_lossy().contains(".tmp-"),
            "{} was left behind",
            path.display()
        );
    }
}

/// The steps and training losses of a `train_log.jsonl` (its timings differ between runs).
fn losses(log: &[u8]) -> Vec<(u64, f64)> {
    String::from_utf8(log.to_vec())
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (
                v["step"].as_u64().unwrap(),
                v["train_loss"].as_f64().unwrap(),
            )
        })
        .collect()
}

/// Runs `cmd` with the fault injector set to abort before file operation `n`; true when it
/// aborted, false when the run finished first (it has fewer operations).
fn aborted_at(cmd: &mut Command, n: u64) -> bool {
    let out = output(cmd.env(bella_vqa::io::FAULT_ENV, n.to_string()));
    if out.status.success() {
        return false;
    }
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(
        out.status.signal(),
        Some(6),
        "op {n}: failed instead of aborting: {}",
        text(&out)
    );
    true
}

/// The kill points to try out of `count`: all of them up to 60, else a spread that keeps the
/// first and last 20 (the commit and the top-level copies of the final checkpoint).
fn kill_points(count: u64) -> Vec<u64> {
    if count <= 60 {
        return (1..=count).collect();
    }
    let mut points: Vec<u64> = (1..=20).chain(count - 19..=count).collect();
    points.extend((21..count - 19).step_by(3));
    points.sort();
    points
}

/// How many file operations a complete run of `make(out)` makes (from a fresh `out`): the
/// fault injector aborts exactly the runs asked to stop at an operation they reach.
fn count_ops(make: &dyn Fn(&Path) -> Command) -> u64 {
    let aborts = |n: u64| aborted_at(&mut make(tempfile::tempdir().unwrap().path()), n);
    let mut high = 1;
    while aborts(high) {
        high *= 2;
    }
    // aborts(low) (or low = 0), not aborts(high).
    let mut low = high / 2;
    while high - low > 1 {
        let mid = (low + high) / 2;
        if aborts(mid) {
            low = mid;
        } else {
            high = mid;
        }
    }
    low
}

#[test]
fn train_killed_before_any_file_operation_resumes_to_the_same_particles() {
    let world = world();
    // A log line every 4 steps, a checkpoint every 2: a resume from step 2 carries the loss
    // of its first two steps into the line at step 4.
    let train = |world: &Path, out: &Path| {
        train_with(
            &fixture("llava-tiny-hub"),
            world,
            out,
            &[("--eval-every", "4")],
        )
    };
    let reference = tempfile::tempdir().unwrap();
    run_ok(&mut train(world.path(), reference.path()));
    let expected = files(reference.path());
    let particles = &expected[Path::new("particles.safetensors")];
    let config = &expected[Path::new("bella_config.json")];

    let count = count_ops(&|out| train(world.path(), out));
    assert!(count > 30, "only {count} file operations counted");
    for n in kill_points(count) {
        let out = tempfile::tempdir().unwrap();
        assert!(aborted_at(&mut train(world.path(), out.path()), n));
        run_ok(train(world.path(), out.path()).arg("--resume"));
        let got = files(out.path());
        assert!(
            got.get(Path::new("particles.safetensors")) == Some(particles),
            "killed before op {n} of {count}: particles differ after --resume"
        );
        assert!(
            got.get(Path::new("bella_config.json")) == Some(config),
            "killed before op {n} of {count}: bella_config.json differs after --resume"
        );
        assert_eq!(
            got.keys().collect::<Vec<_>>(),
            expected.keys().collect::<Vec<_>>(),
            "killed before op {n} of {count}: other files"
        );
        assert_no_temp_files(out.path());
        assert_eq!(
            losses(&got[Path::new("train_log.jsonl")]),
            losses(&expected[Path::new("train_log.jsonl")]),
            "killed before op {n}: the log's steps and losses"
        );
    }
    assert_eq!(
        losses(&expected[Path::new("train_log.jsonl")]).len(),
        1,
        "one line, at step 4"
    );
}

/// Ctrl-C during `calibrate` stops it with the shell's status and says that nothing was stored:
/// the particles keep their file as it was (it ended at once, without a word), and the same
/// command then calibrates them.
#[test]
fn ctrl_c_stops_calibrate_leaving_the_particles_as_they_were() {
    let world = world();
    let particles = tempfile::tempdir().unwrap();
    run_ok(&mut train(world.path(), particles.path()));
    let config = particles.path().join("bella_config.json");
    let before = std::fs::read(&config).unwrap();
    let calibrate = || {
        let mut cmd = bella();
        cmd.args([
            "calibrate",
            "--quiet",
            "--max-new-tokens",
            "4",
            "--adapters",
        ])
        .arg(particles.path())
        .arg("--data")
        .arg(world.path().join("val.jsonl"))
        .args(["--target-coverage", "0.5"]);
        cmd
    };
    let stopped = interrupted_at(&mut calibrate(), 1);
    let said = text(&stopped);
    assert_eq!(stopped.status.code(), Some(130), "{said}");
    assert!(
        said.contains("calibrate stopped after 0 of") && said.contains("nothing was stored"),
        "{said}"
    );
    assert!(std::fs::read(&config).unwrap() == before);
    run_ok(&mut calibrate());
    let calibrated = std::fs::read(&config).unwrap();
    assert!(calibrated != before);
    // A signal at any later point: before the last answer nothing is stored; after it, the
    // finished calibration is stored and said to be (it said "nothing is stored", then stored
    // and exited 0).
    let threshold = |bytes: &[u8]| {
        let v: serde_json::Value = serde_json::from_slice(bytes).unwrap();
        v["abstention"]["threshold"].clone()
    };
    let mut stored_then_stopped = 0;
    for n in 2..200 {
        std::fs::write(&config, &before).unwrap();
        // Each run from the start (the next test covers going on from kept answers).
        let _ = std::fs::remove_file(particles.path().join(KEPT_ANSWERS));
        let out = interrupted_at(&mut calibrate(), n);
        let said = text(&out);
        let now = std::fs::read(&config).unwrap();
        if out.status.success() {
            break; // past its last file operation
        }
        assert_eq!(out.status.code(), Some(130), "op {n}: {said}");
        if said.contains("stopped once the calibration was stored") {
            stored_then_stopped += 1;
            assert_eq!(threshold(&now), threshold(&calibrated), "op {n}: {said}");
        } else {
            assert!(said.contains("nothing was stored"), "op {n}: {said}");
            assert!(now == before, "op {n}: {said}");
        }
    }
    assert!(stored_then_stopped > 0);
}

const KEPT_ANSWERS: &str = bella_vqa::bench::kept_answers::FILE;

/// calibrate keeps its answers with the particles until it stores a calibration: stopped by a
/// Ctrl-C part way, the same command answers only the other questions and stores what an
/// uninterrupted run stores; a --dry-run's answers serve the next run; a replaced image, or
/// another --max-new-tokens, is answered again.
#[test]
fn calibrate_goes_on_from_the_answers_it_kept() {
    let world = world();
    let particles = tempfile::tempdir().unwrap();
    run_ok(&mut train(world.path(), particles.path()));
    let copy = tempfile::tempdir().unwrap();
    for (name, bytes) in files(particles.path()) {
        let path = copy.path().join(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, bytes).unwrap();
    }
    let val = world.path().join("val.jsonl");
    let calibrate = |dir: &Path, tokens: &str| {
        let mut cmd = bella();
        cmd.args(["calibrate", "--max-new-tokens", tokens, "--adapters"])
            .arg(dir)
            .arg("--data")
            .arg(&val)
            .args(["--target-coverage", "0.5"]);
        cmd
    };
    let abstention = |dir: &Path| {
        let text = std::fs::read(dir.join("bella_config.json")).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&text).unwrap();
        let a = &v["abstention"];
        (
            a["threshold"].clone(),
            a["temperature"].clone(),
            a["selector"].clone(),
        )
    };
    let kept_lines = || {
        std::fs::read_to_string(particles.path().join(KEPT_ANSWERS))
            .map_or(0, |t| t.lines().count())
    };
    let questions: Vec<serde_json::Value> = std::fs::read_to_string(&val)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let total = questions.len();
    run_ok(&mut calibrate(copy.path(), "4"));
    let expected = abstention(copy.path());
    assert!(
        !copy.path().join(KEPT_ANSWERS).exists(),
        "removed once stored"
    );

    // Stopped part way: the answers so far are kept, and said to be.
    let mut kept = 0;
    for n in 2..400 {
        let out = interrupted_at(&mut calibrate(particles.path(), "4"), n);
        let said = text(&out);
        assert_eq!(out.status.code(), Some(130), "op {n}: {said}");
        assert!(said.contains(KEPT_ANSWERS), "op {n}: {said}");
        kept = kept_lines();
        if kept >= 2 {
            break;
        }
    }
    assert!((2..total).contains(&kept), "{kept} of {total} kept");
    let said = run_ok(&mut calibrate(particles.path(), "4"));
    assert!(
        said.contains(&format!("{kept} of the {total} answers")),
        "{said}"
    );
    assert_eq!(abstention(particles.path()), expected);
    assert!(!particles.path().join(KEPT_ANSWERS).exists());

    // A --dry-run keeps every answer; a replaced image is answered again.
    let said = run_ok(calibrate(particles.path(), "4").arg("--dry-run"));
    assert!(!said.contains("were kept"), "{said}");
    assert_eq!(kept_lines(), total);
    let image_of = |q: &serde_json::Value| world.path().join(q["image"].as_str().unwrap());
    let first = image_of(&questions[0]);
    let other = questions
        .iter()
        .map(image_of)
        .find(|i| std::fs::read(i).unwrap() != std::fs::read(&first).unwrap())
        .unwrap();
    std::fs::copy(&other, &first).unwrap();
    let again = questions.iter().filter(|q| image_of(q) == first).count();
    let said = run_ok(calibrate(particles.path(), "4").arg("--dry-run"));
    assert!(
        said.contains(&format!("{} of the {total} answers", total - again)),
        "{said}"
    );
    let said = run_ok(calibrate(particles.path(), "4").arg("--dry-run"));
    assert!(said.contains(&format!("all {total} answers")), "{said}");
    // Another token limit makes other answers: none is taken.
    let said = run_ok(calibrate(particles.path(), "3").arg("--dry-run"));
    assert!(!said.contains("were kept"), "{said}");
    assert_eq!(
        kept_lines(),
        total,
        "the other limit's answers replace them"
    );
    // So does another image preprocessing of the same weights (a copy of the model, edited).
    let model = tempfile::tempdir().unwrap();
    for (name, bytes) in files(&fixture("llava-tiny-hub")) {
        std::fs::write(model.path().join(name), bytes).unwrap();
    }
    let on_copy = || {
        let mut cmd = calibrate(particles.path(), "3");
        cmd.arg("--dry-run").arg("--model").arg(model.path());
        cmd
    };
    let said = run_ok(&mut on_copy());
    assert!(said.contains(&format!("all {total} answers")), "{said}");
    let config = model.path().join("preprocessor_config.json");
    let edited = std::fs::read_to_string(&config).unwrap().replacen(
        "\"image_mean\"",
        "\"image_mean_was\"",
        1,
    );
    std::fs::write(&config, edited).unwrap();
    let said = run_ok(&mut on_copy());
    assert!(!said.contains("were kept"), "{said}");
}

/// Runs `cmd` with one SIGINT (a Ctrl-C) sent before its file operation `n`.
fn interrupted_at(cmd: &mut Command, n: u64) -> Output {
    output(
        cmd.env(bella_vqa::io::FAULT_ENV, n.to_string())
            .env(bella_vqa::io::FAULT_SIGNAL_ENV, "int"),
    )
}

#[test]
fn ctrl_c_keeps_the_step_in_progress_and_resume_gives_the_same_particles() {
    use std::os::unix::process::ExitStatusExt;
    let world = world();
    // 4 steps, a log line after each, a checkpoint only at the end: a step an interrupt keeps
    // is saved by the interrupt alone.
    let train = |out: &Path| {
        train_with(
            &fixture("llava-tiny-hub"),
            world.path(),
            out,
            &[("--eval-every", "1"), ("--checkpoint-every", "100")],
        )
    };
    let reference = tempfile::tempdir().unwrap();
    run_ok(&mut train(reference.path()));
    let expected = files(reference.path());
    let same = |name: &str, got: &BTreeMap<PathBuf, Vec<u8>>| {
        got.get(Path::new(name)) == expected.get(Path::new(name))
    };
    let count = count_ops(&|out| train(out));
    let mut kept_steps = std::collections::BTreeSet::new();
    for n in 1..=count {
        let out = tempfile::tempdir().unwrap();
        let o = interrupted_at(&mut train(out.path()), n);
        let t = text(&o);
        assert!(!t.contains("panicked"), "op {n}: {t}");
        match (o.status.code(), o.status.signal()) {
            (Some(130), _) => {
                if let Some(rest) = t.split("interrupted at step ").nth(1) {
                    let step: u64 = rest.split('/').next().unwrap().parse().unwrap();
                    assert!((1..4).contains(&step), "op {n}: {t}");
                    assert!(t.contains("--resume continues"), "op {n}: {t}");
                    let checkpoint = format!("checkpoints/step-{step:08}/trainer_state.json");
                    assert!(
                        out.path().join(checkpoint).is_file(),
                        "op {n}: no checkpoint of step {step}"
                    );
                    kept_steps.insert(step);
                } else {
                    assert!(t.contains("before the first training step"), "op {n}: {t}");
                }
            }
            // Before the handler is installed a Ctrl-C stops the process as it always did.
            (None, Some(2)) => {}
            // The signal came after the last step.
            (Some(0), _) => {}
            other => panic!("op {n}: {other:?}: {t}"),
        }
        run_ok(train(out.path()).arg("--resume"));
        let got = files(out.path());
        for name in ["particles.safetensors", "bella_config.json"] {
            assert!(
                same(name, &got),
                "Ctrl-C before op {n}: {name} differs after --resume"
            );
        }
        assert_eq!(
            losses(&got[Path::new("train_log.jsonl")]),
            losses(&expected[Path::new("train_log.jsonl")]),
            "Ctrl-C before op {n}: the log's steps and losses"
        );
        assert_no_temp_files(out.path());
    }
    assert!(
        kept_steps.len() >= 2,
        "Ctrl-C kept steps {kept_steps:?} only"
    );
}

/// The lines of a `train_log.jsonl` without their timings (which differ between runs).
fn log_without_timings(log: &[u8]) -> Vec<serde_json::Value> {
    String::from_utf8(log.to_vec())
        .unwrap()
        .lines()
        .map(|l| {
            let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
            let line = v.as_object_mut().unwrap();
            for timing in [
                "examples_per_second",
                "particle_examples_per_second",
                "elapsed_seconds",
            ] {
                assert!(line.remove(timing).is_some(), "{timing} missing: {l}");
            }
            v
        })
        .collect()
}

#[test]
fn ctrl_c_in_a_step_drops_it_and_resume_gives_the_same_particles_and_log() {
    // A Ctrl-C at each place a step pauses to look for one: between the forward and backward
    // passes (plain, and under gradient checkpointing, between the layers of the backward
    // one), and before each validation question.
    let world = world();
    for checkpointing in [false, true] {
        let train = |out: &Path| {
            let mut cmd = train_with(
                &fixture("llava-tiny-hub"),
                world.path(),
                out,
                &[("--eval-every", "2"), ("--checkpoint-every", "100")],
            );
            cmd.arg("--val")
                .arg(world.path().join("val.jsonl"))
                .args(["--val-sample", "2"]);
            if checkpointing {
                cmd.arg("--gradient-checkpointing");
            }
            cmd
        };
        let reference = tempfile::tempdir().unwrap();
        run_ok(&mut train(reference.path()));
        let expected = files(reference.path());
        let expected_log = log_without_timings(&expected[Path::new("train_log.jsonl")]);
        assert_eq!(expected_log.len(), 2, "lines at steps 2 and 4");
        assert!(expected_log.iter().all(|l| l["val_accuracy"].is_f64()));
        let (mut in_passes, mut in_evaluations) = (0, 0);
        for n in 1.. {
            let out = tempfile::tempdir().unwrap();
            let o =
                output(train(out.path()).env(bella_vqa::interrupt::CHECK_FAULT_ENV, n.to_string()));
            let t = text(&o);
            if o.status.success() {
                // Fewer places than n: every one was tried.
                assert!(n > 6, "only {} places to stop: {t}", n - 1);
                break;
            }
            assert_eq!(o.status.code(), Some(130), "place {n}: {t}");
            let state = |step: u64| {
                let path = format!("checkpoints/step-{step:08}/trainer_state.json");
                let text = std::fs::read_to_string(out.path().join(path)).unwrap();
                serde_json::from_str::<serde_json::Value>(&text).unwrap()
            };
            match t.split("interrupted at step ").nth(1) {
                Some(rest) => {
                    let step: u64 = rest.split('/').next().unwrap().parse().unwrap();
                    let in_evaluation = t.contains(", in its evaluation (--resume makes it first)");
                    if state(step)["pending_evaluation"].is_null() {
                        assert!(!in_evaluation, "place {n}: {t}");
                        in_passes += 1;
                    } else {
                        assert!([2, 4].contains(&step), "place {n}: evaluated at {step}");
                        assert!(in_evaluation, "place {n}: {t}");
                        in_evaluations += 1;
                        // A resume that writes the pending line, then stops in its first step
                        // (its 2 validation questions, then the step's first place), before
                        // any checkpoint: the line is not written twice by the next resume.
                        if step < 4 {
                            let o = output(
                                train(out.path())
                                    .arg("--resume")
                                    .env(bella_vqa::interrupt::CHECK_FAULT_ENV, "3"),
                            );
                            assert_eq!(o.status.code(), Some(130), "place {n}: {}", text(&o));
                        }
                    }
                }
                None => {
                    assert!(
                        t.contains("before the first training step finished"),
                        "{n}: {t}"
                    );
                    assert!(!out.path().join("particles.safetensors").exists());
                    in_passes += 1;
                }
            }
            run_ok(train(out.path()).arg("--resume"));
            let got = files(out.path());
            for name in ["particles.safetensors", "bella_config.json"] {
                assert!(
                    got.get(Path::new(name)) == expected.get(Path::new(name)),
                    "checkpointing {checkpointing}, Ctrl-C at place {n}: {name} differs after \
                     --resume"
                );
            }
            assert_eq!(
                log_without_timings(&got[Path::new("train_log.jsonl")]),
                expected_log,
                "checkpointing {checkpointing}, Ctrl-C at place {n}: the log"
            );
            assert_no_temp_files(out.path());
        }
        // 4 steps and 2 evaluations of 2 questions. A step pauses between its passes, and
        // under checkpointing also before each of the 3 layers its backward pass runs again.
        let per_step = if checkpointing { 4 } else { 1 };
        assert_eq!(
            (in_passes, in_evaluations),
            (4 * per_step, 4),
            "{checkpointing}"
        );
    }
}

#[test]
fn ctrl_c_stops_bench_between_questions_and_the_same_command_continues() {
    let world = world();
    let bench5 = |out: &Path| bench_limit(world.path(), out, 5);
    let reference = tempfile::tempdir().unwrap();
    run_ok(&mut bench5(reference.path()));
    let expected = files(reference.path())[Path::new("samples.jsonl")].clone();
    let count = count_ops(&|out| bench5(out));
    let mut stopped_with = std::collections::BTreeSet::new();
    for n in 1..=count {
        let out = tempfile::tempdir().unwrap();
        let o = interrupted_at(&mut bench5(out.path()), n);
        let t = text(&o);
        assert!(!t.contains("panicked"), "op {n}: {t}");
        if o.status.code() == Some(130) {
            // After the last question: the results are left to the same command.
            let left: usize = if t.contains("interrupted before the results were computed") {
                0
            } else {
                t.split("interrupted with ")
                    .nth(1)
                    .and_then(|r| r.split(' ').next())
                    .and_then(|x| x.parse().ok())
                    .unwrap_or_else(|| panic!("op {n}: {t}"))
            };
            assert!(t.contains("the same command continues"), "{t}");
            let samples = std::fs::read_to_string(out.path().join("samples.jsonl")).unwrap();
            assert_eq!(samples.lines().count(), 5 - left, "op {n}: {t}");
            let runs = std::fs::read_to_string(out.path().join("runs.jsonl")).unwrap();
            let last: serde_json::Value =
                serde_json::from_str(runs.lines().last().unwrap()).unwrap();
            assert_eq!(
                last["interrupted"].as_bool().unwrap_or(false),
                left > 0,
                "op {n}"
            );
            assert_eq!(last["answered"], 5 - left, "op {n}");
            assert!(!out.path().join("results.json").exists(), "op {n}");
            stopped_with.insert(left);
        }
        run_ok(&mut bench5(out.path()));
        let got = files(out.path());
        assert!(
            got.get(Path::new("samples.jsonl")) == Some(&expected),
            "Ctrl-C before op {n}: samples differ after the rerun"
        );
    }
    assert!(
        stopped_with.len() >= 2,
        "stopped with {stopped_with:?} left only"
    );
}

/// A Ctrl-C while a question is answered stops it at the model's next layer: that question is
/// not written (a whole question is not waited for), and the same command answers it again.
#[test]
fn ctrl_c_stops_bench_inside_a_question_and_the_same_command_continues() {
    let world = world();
    let bench5 = |out: &Path| bench_limit(world.path(), out, 5);
    let reference = tempfile::tempdir().unwrap();
    run_ok(&mut bench5(reference.path()));
    let expected = files(reference.path())[Path::new("samples.jsonl")].clone();
    let mut stopped_with = std::collections::BTreeSet::new();
    // The signal comes before the N-th pause between the model's layers.
    for n in [1, 2, 5, 13, 34, 55] {
        let out = tempfile::tempdir().unwrap();
        let o =
            output(bench5(out.path()).env(bella_vqa::interrupt::CHECK_FAULT_ENV, n.to_string()));
        let t = text(&o);
        assert_eq!(o.status.code(), Some(130), "pause {n}: {t}");
        let left: usize = t
            .split("interrupted with ")
            .nth(1)
            .and_then(|r| r.split(' ').next())
            .and_then(|x| x.parse().ok())
            .unwrap_or_else(|| panic!("pause {n}: {t}"));
        let samples = std::fs::read_to_string(out.path().join("samples.jsonl")).unwrap();
        assert_eq!(samples.lines().count(), 5 - left, "pause {n}: {t}");
        if n == 1 {
            // In the first question's first layer: nothing was finished, nothing is kept.
            assert_eq!(left, 5, "{t}");
        }
        stopped_with.insert(left);
        run_ok(&mut bench5(out.path()));
        assert!(
            files(out.path()).get(Path::new("samples.jsonl")) == Some(&expected),
            "Ctrl-C at pause {n}: samples differ after the rerun"
        );
    }
    assert!(
        stopped_with.len() >= 3,
        "stopped with {stopped_with:?} left only"
    );
}

fn bench(world: &Path, out: &Path) -> Command {
    bench_limit(world, out, 3)
}

/// [`bench`] of the first `limit` test questions.
fn bench_limit(world: &Path, out: &Path, limit: usize) -> Command {
    let mut cmd = bella();
    cmd.args(["bench", "--quiet", "--max-new-tokens", "4", "--model"])
        .arg(fixture("llava-tiny-hub"))
        .arg("--data")
        .arg(world.join("test.jsonl"))
        .args(["--limit", &limit.to_string(), "--out"])
        .arg(out);
    cmd
}

/// A bench run continued in another --dtype or --quantize is refused before its model loads
/// (here: a model that is not there), naming what to pass; the same options continue it.
#[test]
fn bench_in_another_dtype_or_quantization_is_refused_before_the_model_loads() {
    let world = world();
    let out = tempfile::tempdir().unwrap();
    run_ok(bench_limit(world.path(), out.path(), 2).args(["--dtype", "f32"]));
    let refused = |option: [&str; 2]| {
        let mut cmd = bella();
        cmd.args([
            "bench",
            "--quiet",
            "--model",
            "/nonexistent/model",
            "--data",
        ])
        .arg(world.path().join("test.jsonl"))
        .args(["--limit", "2"])
        .args(option)
        .arg("--out")
        .arg(out.path());
        run_err(&mut cmd)
    };
    let err = refused(["--dtype", "bf16"]);
    assert!(
        err.contains("computed in f32, so it cannot be continued in bf16")
            && err.contains("pass --dtype f32"),
        "{err}"
    );
    let err = refused(["--quantize", "q8_0"]);
    assert!(
        err.contains("a benchmark run of a dense base, so it cannot be continued with a q8_0 one")
            && err.contains("pass no --quantize"),
        "{err}"
    );
    run_ok(bench_limit(world.path(), out.path(), 2).args(["--dtype", "f32"]));
}

#[test]
fn bench_killed_before_any_file_operation_completes_with_the_same_samples() {
    let world = world();
    let reference = tempfile::tempdir().unwrap();
    run_ok(&mut bench(world.path(), reference.path()));
    let expected = files(reference.path());
    let samples = &expected[Path::new("samples.jsonl")];
    assert_eq!(samples.iter().filter(|&&b| b == b'\n').count(), 3);

    let count = count_ops(&|out| bench(world.path(), out));
    assert!(count > 15, "only {count} file operations counted");
    for n in kill_points(count) {
        let out = tempfile::tempdir().unwrap();
        assert!(aborted_at(&mut bench(world.path(), out.path()), n));
        run_ok(&mut bench(world.path(), out.path()));
        let got = files(out.path());
        assert!(
            got.get(Path::new("samples.jsonl")) == Some(samples),
            "killed before op {n} of {count}: samples differ after the rerun"
        );
        let results: serde_json::Value =
            serde_json::from_slice(&got[Path::new("results.json")]).unwrap();
        assert_eq!(
            results["progress"]["complete"], true,
            "killed before op {n}"
        );
        assert_eq!(
            got.keys().collect::<Vec<_>>(),
            expected.keys().collect::<Vec<_>>(),
            "killed before op {n} of {count}: other files"
        );
        assert_no_temp_files(out.path());
    }
}

/// A write past the file-size limit (`ulimit -f`) is an error like a full disk: said, exit
/// status 1 (SIGXFSZ killed the process without a word), the answer it was writing cut off again
/// (it was left half-written), and the same command without the limit completes the run.
#[cfg(target_os = "linux")]
#[test]
fn a_file_size_limit_stops_bench_with_an_error_and_whole_records() {
    let world = world();
    let reference = tempfile::tempdir().unwrap();
    run_ok(&mut bench_limit(world.path(), reference.path(), 6));
    let samples = std::fs::read(reference.path().join("samples.jsonl")).unwrap();
    let lines: Vec<usize> = samples
        .iter()
        .enumerate()
        .filter_map(|(i, &b)| (b == b'\n').then_some(i + 1))
        .collect();
    // Room for two answers and half of the third.
    let limit = (lines[1] + (lines[2] - lines[1]) / 2) as u64;
    let out = tempfile::tempdir().unwrap();
    let mut cmd = bench_limit(world.path(), out.path(), 6);
    limited(&mut cmd, Limit::FileSize, limit);
    let failed = output(&mut cmd);
    let said = text(&failed);
    assert_eq!(failed.status.code(), Some(1), "{said}");
    assert!(said.contains("File too large"), "{said}");
    let kept = std::fs::read(out.path().join("samples.jsonl")).unwrap();
    assert!(
        kept == samples[..lines[1]],
        "{} bytes kept: two whole answers are {}",
        kept.len(),
        lines[1]
    );
    run_ok(&mut bench_limit(world.path(), out.path(), 6));
    assert!(std::fs::read(out.path().join("samples.jsonl")).unwrap() == samples);
}

/// The lines of a JSON-lines file (none when it is missing).
fn json_lines(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn a_killed_bench_stays_in_runs_jsonl_as_unfinished_beside_the_one_that_completes_it() {
    let world = world();
    // The first kill point after an answer was written: killed midway through the questions.
    let mut tried = 0;
    let (out, answered_before) = loop {
        tried += 1;
        assert!(tried < 100, "no kill point after an answer");
        let out = tempfile::tempdir().unwrap();
        assert!(aborted_at(&mut bench(world.path(), out.path()), tried));
        let answered = json_lines(&out.path().join("samples.jsonl")).len();
        if answered > 0 {
            break (out, answered);
        }
    };
    assert!(answered_before < 3, "killed after the last answer");
    let runs_path = out.path().join("runs.jsonl");
    let killed = json_lines(&runs_path);
    assert_eq!(
        killed.len(),
        1,
        "the killed invocation is not in runs.jsonl"
    );
    assert_eq!(killed[0]["finished"], false, "{}", killed[0]);
    assert!(killed[0]["pid"].as_u64().is_some(), "{}", killed[0]);
    assert!(killed[0]["started"].as_str().is_some(), "{}", killed[0]);

    run_ok(&mut bench(world.path(), out.path()));
    let runs = json_lines(&runs_path);
    assert_eq!(runs.len(), 2, "{runs:?}");
    assert_eq!(runs[0], killed[0], "the killed invocation's line changed");
    assert_eq!(runs[1]["finished"], true, "{}", runs[1]);
    assert_eq!(runs[1]["failed"], false, "{}", runs[1]);
    assert_eq!(runs[1]["answered"], 3 - answered_before, "{}", runs[1]);
    let results: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.path().join("results.json")).unwrap()).unwrap();
    assert_eq!(results["progress"]["complete"], true);
    assert_eq!(results["progress"]["answered"], 3);
    assert_eq!(results["timing"]["invocations"], 2, "{}", results["timing"]);
    assert_eq!(results["timing"]["unfinished"], 1, "{}", results["timing"]);
    let report = std::fs::read_to_string(out.path().join("report.md")).unwrap();
    assert!(
        report.contains("| 2 (1 killed before their end) |"),
        "{report}"
    );
}

/// A process that has just taken the lock writes its PID a moment later: the refusal waits for
/// it rather than naming "(unknown)".
#[test]
fn a_lock_taken_a_moment_ago_is_refused_naming_its_process() {
    let busy = tempfile::tempdir().unwrap();
    let _lock = bella_vqa::io::OutputLock::acquire(busy.path()).unwrap();
    let lock_file = busy.path().join(bella_vqa::io::LOCK_FILE);
    std::fs::write(&lock_file, "").unwrap();
    let writer = {
        let lock_file = lock_file.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(150));
            std::fs::write(lock_file, "424242\n").unwrap();
        })
    };
    let err = bella_vqa::io::OutputLock::acquire(busy.path())
        .err()
        .expect("the directory is in use");
    writer.join().unwrap();
    assert!(
        format!("{err:#}").contains("is in use by process 424242"),
        "{err:#}"
    );
}

#[test]
fn an_output_directory_in_use_is_refused_at_once_naming_the_process() {
    let world = world();
    let busy = tempfile::tempdir().unwrap();
    let _lock = bella_vqa::io::OutputLock::acquire(busy.path()).unwrap();
    let me = format!(
        "{} is in use by process {}",
        busy.path().display(),
        std::process::id()
    );
    // A model that does not exist: the lock is checked before anything is loaded.
    let mut commands: Vec<Command> = Vec::new();
    let mut c = bella();
    c.args(["train", "--model", "/nonexistent/model", "--data"])
        .arg(world.path().join("train.jsonl"))
        .arg("--out")
        .arg(busy.path());
    commands.push(c);
    let mut c = bella();
    c.args(["bench", "--model", "/nonexistent/model", "--data"])
        .arg(world.path().join("test.jsonl"))
        .arg("--out")
        .arg(busy.path());
    commands.push(c);
    let mut c = bella();
    c.args(["data", "shapes", "--n", "4", "--out"])
        .arg(busy.path());
    commands.push(c);
    let mut c = bella();
    c.args([
        "export-peft",
        "--adapters",
        "/nonexistent/particles",
        "--out",
    ])
    .arg(busy.path());
    commands.push(c);
    let mut c = bella();
    c.args(["bench", "merge", "/nonexistent/shard", "--out"])
        .arg(busy.path());
    commands.push(c);
    for mut cmd in commands {
        let started = Instant::now();
        let err = run_err(&mut cmd);
        assert!(err.contains(&me), "{err}");
        assert!(started.elapsed() < Duration::from_secs(10));
    }
    // calibrate locks the particle directory it writes.
    let particles = tempfile::tempdir().unwrap();
    run_ok(&mut train(world.path(), particles.path()));
    let _held = bella_vqa::io::OutputLock::acquire(particles.path()).unwrap();
    let err = run_err(
        bella()
            .args(["calibrate", "--model", "/nonexistent/model", "--adapters"])
            .arg(particles.path())
            .arg("--data")
            .arg(world.path().join("val.jsonl")),
    );
    assert!(
        err.contains(&format!(
            "{} is in use by process {}",
            particles.path().display(),
            std::process::id()
        )),
        "{err}"
    );
    drop(_lock);
    // A child that another test's thread forks keeps a copy of the lock's descriptor until it
    // execs (a moment, longer on a loaded machine): the lock is free once that one has gone.
    let freed = Instant::now() + Duration::from_secs(10);
    while bella_vqa::io::lock_holder(busy.path()).is_some() && Instant::now() < freed {
        std::thread::sleep(Duration::from_millis(20));
    }
    // Free again: the next run goes ahead (and fails on the model, not the lock).
    let err = run_err(
        bella()
            .args(["bench", "--model", "/nonexistent/model", "--data"])
            .arg(world.path().join("test.jsonl"))
            .arg("--out")
            .arg(busy.path()),
    );
    assert!(!err.contains("in use"), "{err}");
}

#[test]
fn resume_refuses_other_options_data_or_base_model_naming_the_difference() {
    let world = world();
    let out = tempfile::tempdir().unwrap();
    run_ok(train(world.path(), out.path()).args(["--max-steps", "2"]));
    let particles = std::fs::read(out.path().join("particles.safetensors")).unwrap();

    let err = run_err(
        train_with(
            &fixture("llava-tiny-hub"),
            world.path(),
            out.path(),
            &[("--lr", "0.5")],
        )
        .arg("--resume"),
    );
    assert!(
        err.contains("option lr: 0.01 in the checkpoint, 0.5 now"),
        "{err}"
    );
    let err = run_err(
        train_with(
            &fixture("llava-tiny-hub"),
            world.path(),
            out.path(),
            &[("--limit", "6")],
        )
        .arg("--resume"),
    );
    assert!(
        err.contains("training data: 8 questions") && err.contains("6 questions"),
        "{err}"
    );
    // Another compute dtype or quantization makes other particles.
    let err = run_err(train(world.path(), out.path()).args(["--resume", "--dtype", "bf16"]));
    assert!(
        err.contains("the base computes in f32 in the checkpoint, bf16 now")
            && err.contains("--quantize-vision"),
        "{err}"
    );
    // Same files, one weight changed.
    let base = tempfile::tempdir().unwrap();
    for e in std::fs::read_dir(fixture("llava-tiny-hub")).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), base.path().join(e.file_name())).unwrap();
    }
    let shard = base.path().join("model-00002-of-00002.safetensors");
    let mut bytes = std::fs::read(&shard).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x40;
    std::fs::write(&shard, bytes).unwrap();
    let err = run_err(train_with(base.path(), world.path(), out.path(), &[]).arg("--resume"));
    assert!(
        err.contains("base model weights: ") && err.contains("model-00002-of-00002.safetensors"),
        "{err}"
    );
    // Nothing was written by the refused runs; the right one continues.
    assert_eq!(
        std::fs::read(out.path().join("particles.safetensors")).unwrap(),
        particles
    );
    // Another validation set changes only the log's evaluations: said, not refused.
    let val = world.path().join("val.jsonl");
    let done = run_ok(
        train(world.path(), out.path())
            .arg("--resume")
            .arg("--val")
            .arg(&val),
    );
    assert!(
        done.contains("warning: the validation sample differs from the one this run began with")
            && done.contains("up to step 2"),
        "{done}"
    );
    let done = run_ok(
        train(world.path(), out.path())
            .arg("--resume")
            .arg("--val")
            .arg(&val),
    );
    assert!(done.is_empty(), "{done}");
    let err = run_err(&mut train_with(
        &fixture("llava-tiny-hub"),
        world.path(),
        out.path(),
        &[("--limit", "0")],
    ));
    assert!(err.contains("--limit"), "{err}");
}

/// A full disk stops data shapes with what its rerun needs: the incomplete set is its own, and
/// only --force replaces it (the message said to run the same command, which refused it).
#[test]
fn data_shapes_on_a_full_disk_says_to_rerun_with_force() {
    let out = tempfile::tempdir().unwrap();
    let shapes = |extra: &[&str]| {
        let mut c = bella();
        c.args(["data", "shapes", "--quiet", "--n", "4", "--out"])
            .arg(out.path().join("w"))
            .args(extra);
        c
    };
    let err = failed_at(&mut shapes(&[]), 30).expect("the run reaches its 30th file operation");
    assert!(
        says_disk_full(&err) && err.contains("the same command with --force replaces"),
        "{err}"
    );
    let err = run_err(&mut shapes(&[]));
    assert!(err.contains("an incomplete data set"), "{err}");
    run_ok(&mut shapes(&["--force"]));
}

#[test]
fn data_shapes_does_not_overwrite_a_data_set_without_force() {
    let out = tempfile::tempdir().unwrap();
    let shapes = |extra: &[&str]| {
        let mut c = bella();
        c.args(["data", "shapes", "--quiet", "--n", "4", "--out"])
            .arg(out.path())
            .args(extra);
        c
    };
    run_ok(&mut shapes(&["--seed", "1"]));
    let first = std::fs::read(out.path().join("train.jsonl")).unwrap();
    let err = run_err(&mut shapes(&["--seed", "2"]));
    assert!(
        err.contains("already holds a data set") && err.contains("--force"),
        "{err}"
    );
    assert_eq!(
        std::fs::read(out.path().join("train.jsonl")).unwrap(),
        first
    );
    run_ok(&mut shapes(&["--seed", "2", "--force"]));
    assert_ne!(
        std::fs::read(out.path().join("train.jsonl")).unwrap(),
        first
    );
    // A file of the user's with the name of one the run writes (any split's) is not
    // overwritten either.
    let theirs = tempfile::tempdir().unwrap();
    std::fs::write(theirs.path().join("ood-absent.jsonl"), b"mine").unwrap();
    let err = run_err(
        bella()
            .args(["data", "shapes", "--quiet", "--n", "4", "--out"])
            .arg(theirs.path()),
    );
    assert!(
        err.contains("ood-absent.jsonl") && err.contains("--force"),
        "{err}"
    );
    assert_eq!(
        std::fs::read(theirs.path().join("ood-absent.jsonl")).unwrap(),
        b"mine"
    );
    // Overwriting a larger set leaves exactly the images the new one names; a file of the
    // user's beside the split folders stays.
    let stray = out.path().join("images/train/999999.png");
    std::fs::write(&stray, b"left over").unwrap();
    let theirs = out.path().join("images/README.txt");
    std::fs::write(&theirs, b"mine").unwrap();
    run_ok(&mut shapes(&["--seed", "3", "--force"]));
    assert!(!stray.exists() && theirs.is_file());
    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.path().join("shapes.json")).unwrap()).unwrap();
    let files = walkdir(&out.path().join("images")) - 1;
    assert_eq!(files as u64, meta["images"].as_u64().unwrap());
}

/// The regular files under `dir`, recursively.
fn walkdir(dir: &std::path::Path) -> usize {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .map(|p| if p.is_dir() { walkdir(&p) } else { 1 })
        .sum()
}

#[test]
fn calibrate_announces_a_rewrite_and_keeps_the_old_threshold() {
    let world = world();
    let particles = tempfile::tempdir().unwrap();
    run_ok(&mut train(world.path(), particles.path()));
    let calibrate = |objective: &str| {
        let mut c = bella();
        c.args(["calibrate", "--max-new-tokens", "4", "--model"])
            .arg(fixture("llava-tiny-hub"))
            .arg("--adapters")
            .arg(particles.path())
            .args(["--data", "val.jsonl", "--objective", objective])
            .current_dir(world.path());
        c
    };
    let config = || -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(particles.path().join("bella_config.json")).unwrap())
            .unwrap()
    };
    let first = run_ok(&mut calibrate("coverage0.5"));
    assert!(!first.contains("rewriting"), "{first}");
    assert!(config().get("abstention_history").is_none());
    let old = config()["abstention"].clone();
    assert_eq!(old["objective"], "coverage>=0.5");

    let second = run_ok(&mut calibrate("coverage1"));
    let announced = format!(
        "rewriting the threshold stored in {}: {:.6} (coverage>=0.5) → ",
        particles.path().join("bella_config.json").display(),
        old["threshold"].as_f64().unwrap()
    );
    assert!(second.contains(&announced), "{second}");
    let new = config();
    assert_eq!(new["abstention"]["objective"], "coverage>=1");
    assert_eq!(new["abstention_history"], serde_json::json!([old]));
    // The data path, given relative, is stored absolute.
    assert_eq!(
        Path::new(old["data"].as_str().unwrap()),
        world.path().join("val.jsonl")
    );
    // The particle set still loads with its history.
    bella_vqa::bella::particles::ParticleSet::read_config(particles.path()).unwrap();
    // Calibrating again and again keeps only the most recent replaced calibrations.
    let mut abstention = bella_vqa::bella::particles::ParticleSet::read_config(particles.path())
        .unwrap()
        .abstention
        .unwrap();
    for k in 0..15 {
        abstention.threshold = k as f64 / 100.0;
        bella_vqa::bench::store_abstention(particles.path(), &abstention).unwrap();
    }
    let history = config()["abstention_history"].as_array().unwrap().clone();
    assert_eq!(history.len(), bella_vqa::bench::MAX_ABSTENTION_HISTORY);
    // The newest replaced one is last: the threshold stored just before the current 0.14.
    assert_eq!(history.last().unwrap()["threshold"], 0.13);
    // A set whose config predates the factors' hash gets it with its calibration.
    let sha = config()["particles_sha256"].clone();
    assert!(sha.is_string());
    let path = particles.path().join("bella_config.json");
    let mut old_style = config();
    old_style
        .as_object_mut()
        .unwrap()
        .remove("particles_sha256");
    std::fs::write(&path, serde_json::to_vec(&old_style).unwrap()).unwrap();
    bella_vqa::bench::store_abstention(particles.path(), &abstention).unwrap();
    assert_eq!(config()["particles_sha256"], sha);
}

#[test]
fn every_written_file_has_the_permissions_of_the_umask() {
    use std::os::unix::fs::PermissionsExt;
    let world = world();
    let tmp = tempfile::tempdir().unwrap();
    let (particles, peft, runs, data) = (
        tmp.path().join("particles"),
        tmp.path().join("peft"),
        tmp.path().join("runs"),
        tmp.path().join("data"),
    );
    // Under umask 027 a plain file create gives 0640. Run in the fixtures folder.
    let sh = |cmd: &Command| {
        let mut line = format!(
            "cd '{}' && umask 027 && exec '{}'",
            fixture("").display(),
            cmd.get_program().to_string_lossy()
        );
        for a in cmd.get_args() {
            line.push_str(&format!(" '{}'", a.to_string_lossy()));
        }
        let mut c = Command::new("sh");
        c.arg("-c").arg(line);
        c
    };
    run_ok(&mut sh(&train_with(
        Path::new("llava-tiny-hub"),
        world.path(),
        &particles,
        &[],
    )));
    let mut c = bella();
    c.args([
        "calibrate",
        "--quiet",
        "--max-new-tokens",
        "4",
        "--target-coverage",
        "0.5",
    ])
    .arg("--model")
    .arg(fixture("llava-tiny-hub"))
    .arg("--adapters")
    .arg(&particles)
    .arg("--data")
    .arg(world.path().join("val.jsonl"));
    run_ok(&mut sh(&c));
    let mut c = bella();
    c.args(["export-peft", "--quiet", "--adapters"])
        .arg(&particles)
        .arg("--out")
        .arg(&peft);
    run_ok(&mut sh(&c));
    run_ok(&mut sh(&bench(world.path(), &runs)));
    let mut c = bella();
    c.args(["data", "shapes", "--quiet", "--n", "4", "--out"])
        .arg(&data);
    run_ok(&mut sh(&c));

    let mut seen = 0;
    for dir in [&particles, &peft, &runs, &data] {
        for rel in files(dir).keys() {
            let mode = std::fs::metadata(dir.join(rel))
                .unwrap()
                .permissions()
                .mode()
                & 0o777;
            assert_eq!(mode, 0o640, "{} has mode {mode:o}", dir.join(rel).display());
            seen += 1;
        }
    }
    assert!(seen > 20, "{seen} files");
    // The model, given relative to the working directory, is stored absolute.
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(particles.join("bella_config.json")).unwrap())
            .unwrap();
    assert_eq!(
        Path::new(config["base_model"]["source"].as_str().unwrap()),
        fixture("llava-tiny-hub")
    );
}

#[test]
fn calibrating_or_benchmarking_on_training_questions_is_flagged() {
    let world = world();
    let particles = tempfile::tempdir().unwrap();
    run_ok(&mut train(world.path(), particles.path()));
    assert!(particles.path().join(bella_vqa::data::seen::FILE).is_file());
    let calibrate = |data: &str| {
        let mut c = bella();
        c.args(["calibrate", "--max-new-tokens", "4", "--dry-run", "--model"])
            .arg(fixture("llava-tiny-hub"))
            .arg("--adapters")
            .arg(particles.path())
            .args(["--data", data, "--objective", "coverage0.5", "--limit", "8"])
            .current_dir(world.path());
        output(&mut c)
    };
    // The training file (its first 8 questions are the 8 trained on): warned, and counted.
    let out = calibrate("train.jsonl");
    assert!(out.status.success(), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("8 of 8 validation questions are training questions"),
        "{stderr}"
    );
    // Held-out questions: no warning.
    let out = calibrate("val.jsonl");
    assert!(out.status.success(), "{}", text(&out));
    assert!(!String::from_utf8_lossy(&out.stderr).contains("training questions"));
    // A benchmark on the training file says so in its notes.
    let runs = tempfile::tempdir().unwrap();
    let mut cmd = bella();
    cmd.args([
        "bench",
        "--quiet",
        "--max-new-tokens",
        "4",
        "--bootstrap",
        "0",
        "--model",
    ])
    .arg(fixture("llava-tiny-hub"))
    .arg("--adapters")
    .arg(particles.path())
    .arg("--data")
    .arg(world.path().join("train.jsonl"))
    .args(["--limit", "3", "--out"])
    .arg(runs.path().join("on-train"));
    run_ok(&mut cmd);
    let results: serde_json::Value =
        serde_json::from_slice(&std::fs::read(runs.path().join("on-train/results.json")).unwrap())
            .unwrap();
    let notes = results["notes"].to_string();
    assert!(
        notes.contains("test: 3 of 3 questions are training questions"),
        "{notes}"
    );
    // Training with the training file as --val: warned (the 8 trained on are among its first).
    let again = tempfile::tempdir().unwrap();
    let mut cmd = train(world.path(), again.path());
    cmd.arg("--val").arg(world.path().join("train.jsonl"));
    let out = output(&mut cmd);
    assert!(out.status.success(), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("are training questions of these particles"),
        "{stderr}"
    );
}

#[test]
fn only_stale_temporaries_of_this_output_are_removed() {
    let out = tempfile::tempdir().unwrap();
    let dead = 4_194_305; // above Linux's largest PID: no such process
    let live = std::process::id(); // this test
    let put = |rel: &str| {
        let path = out.path().join(rel);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, "x").unwrap();
        path
    };
    let stale = [
        put(&format!(".results.json.tmp-{dead}")),
        put(&format!("checkpoints/.latest.tmp-{dead}")),
        put(&format!("images/train/.000001.png.tmp-{dead}")),
    ];
    let kept = [
        // another process's file in progress
        put(&format!(".samples.jsonl.tmp-{live}")),
        // the output of another run inside this one (it holds its own lock)
        put(&format!("child/.particles.safetensors.tmp-{dead}")),
        // deeper than this program writes: someone else's
        put(&format!("notes/deep/er/.draft.tmp-{dead}")),
    ];
    std::fs::write(out.path().join("child/.bella-vqa.lock"), "1").unwrap();
    let particles = bella_vqa::demo::path(bella_vqa::demo::PARTICLES).unwrap();
    run_ok(
        bella()
            .args(["export-peft", "--quiet", "--adapters"])
            .arg(particles)
            .arg("--out")
            .arg(out.path()),
    );
    for path in &stale {
        assert!(!path.exists(), "{} was left", path.display());
    }
    for path in &kept {
        assert!(path.exists(), "{} was removed", path.display());
    }
}

#[test]
fn an_interrupted_overwrite_leaves_no_old_question_file_beside_new_images() {
    let shapes = |out: &Path, seed: &str, force: bool| {
        let mut c = bella();
        c.args([
            "data", "shapes", "--quiet", "--n", "4", "--seed", seed, "--out",
        ])
        .arg(out);
        if force {
            c.arg("--force");
        }
        c
    };
    let (old, new) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    run_ok(&mut shapes(old.path(), "1", false));
    run_ok(&mut shapes(new.path(), "2", false));
    let same = |a: &Path, b: &Path| std::fs::read(a).ok() == std::fs::read(b).ok();
    let out = tempfile::tempdir().unwrap();
    let mut tried = 0;
    for n in [3, 8, 20, 60, 150] {
        run_ok(&mut shapes(out.path(), "1", true));
        if !aborted_at(&mut shapes(out.path(), "2", true), n) {
            continue;
        }
        tried += 1;
        // A question file left is the new set's, or the old one's with every image it names
        // still the old one's.
        for entry in std::fs::read_dir(out.path()).unwrap().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if !name.ends_with(".jsonl") {
                continue;
            }
            if same(&entry.path(), &new.path().join(&name)) {
                continue;
            }
            assert!(
                same(&entry.path(), &old.path().join(&name)),
                "op {n}: {name} is neither set's"
            );
            let text = std::fs::read_to_string(entry.path()).unwrap();
            for line in text.lines() {
                let record: serde_json::Value = serde_json::from_str(line).unwrap();
                let image = record["image"].as_str().unwrap();
                assert!(
                    same(&out.path().join(image), &old.path().join(image)),
                    "op {n}: the old {name} names {image}, which is not its image any more"
                );
            }
        }
        // Rerun without --force: refused, saying whether the set there is whole.
        let err = run_err(&mut shapes(out.path(), "2", false));
        let whole = out.path().join("shapes.json").exists();
        assert_eq!(err.contains("incomplete data set"), !whole, "op {n}: {err}");
    }
    assert!(tried >= 3, "the run finished before most kill points");
}

#[test]
fn particles_and_their_question_list_are_never_those_of_two_runs() {
    let world = world();
    let list = Path::new(bella_vqa::data::seen::FILE);
    let particles = Path::new("particles.safetensors");
    let log = Path::new("train_log.jsonl");
    // The new run's files, from an uninterrupted run on other questions (--limit 6).
    let new = tempfile::tempdir().unwrap();
    let other = [("--limit", "6")];
    let llava = fixture("llava-tiny-hub");
    run_ok(&mut train_with(&llava, world.path(), new.path(), &other));
    let new_files = files(new.path());
    // An old set with its list, its checkpoints deleted (so --force may train over it).
    let old = tempfile::tempdir().unwrap();
    run_ok(&mut train(world.path(), old.path()));
    std::fs::remove_dir_all(old.path().join("checkpoints")).unwrap();
    let old_files = files(old.path());
    assert_ne!(old_files.get(list), new_files.get(list));
    assert_ne!(losses(&old_files[log]), losses(&new_files[log]));
    let mut tried = 0;
    for n in kill_points(40) {
        let out = tempfile::tempdir().unwrap();
        for (rel, bytes) in &old_files {
            std::fs::write(out.path().join(rel), bytes).unwrap();
        }
        let mut cmd = train_with(&llava, world.path(), out.path(), &other);
        if !aborted_at(cmd.arg("--force"), n) {
            break;
        }
        tried += 1;
        let now = files(out.path());
        let of = |set: &BTreeMap<PathBuf, Vec<u8>>| set.get(particles) == now.get(particles);
        let expected = if of(&old_files) {
            old_files.get(list)
        } else {
            // New particles (of some step): the new list or none, never the old one.
            new_files.get(list)
        };
        assert!(
            !now.contains_key(list) || now.get(list) == expected,
            "op {n}: the particles there have another run's question list"
        );
        // Resuming gives the new particles their list, and the log the new run's lines only
        // (a kill between the first commit and the log's own rename kept the old run's).
        if out.path().join("checkpoints/latest").exists() {
            run_ok(train_with(&llava, world.path(), out.path(), &other).arg("--resume"));
            let resumed = files(out.path());
            assert_eq!(resumed.get(list), new_files.get(list), "op {n}");
            assert_eq!(
                losses(&resumed[log]),
                losses(&new_files[log]),
                "op {n}: the log after --resume is not the new run's"
            );
        }
    }
    assert!(tried >= 10, "the run finished before most kill points");
}

#[test]
fn resuming_with_max_steps_below_the_checkpoint_leaves_it_where_it_is() {
    let world = world();
    let out = tempfile::tempdir().unwrap();
    run_ok(&mut train(world.path(), out.path()));
    let summary = |out: &Path| -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(out.join("train_summary.json")).unwrap()).unwrap()
    };
    let step = summary(out.path())["step"].clone();
    assert_eq!(step, 4);
    let particles = std::fs::read(out.path().join("particles.safetensors")).unwrap();
    run_ok(train(world.path(), out.path()).args(["--resume", "--max-steps", "2"]));
    assert_eq!(summary(out.path())["step"], step);
    assert_eq!(
        std::fs::read(out.path().join("particles.safetensors")).unwrap(),
        particles
    );
}

/// Runs `cmd` with its `n`-th file operation failing as on a full disk; `None` when the run
/// finished first, else its output (a failure, never an abort or a panic).
fn failed_at(cmd: &mut Command, n: u64) -> Option<String> {
    let out = output(
        cmd.env(bella_vqa::io::FAULT_ENV, n.to_string())
            .env(bella_vqa::io::FAULT_SIGNAL_ENV, "full"),
    );
    if out.status.success() {
        return None;
    }
    let t = text(&out);
    assert_eq!(out.status.code(), Some(1), "op {n}: {t}");
    assert!(!t.contains("panicked"), "op {n}: {t}");
    Some(t)
}

/// A full disk named as such: the output file (not its temporary), and what to do.
fn says_disk_full(message: &str) -> bool {
    message.contains("the disk (or quota) is full")
        && message.contains("free space there and run the same command again")
        && !message.contains(".tmp-")
}

/// Copies the files `set` (relative path → bytes) into `dir`.
fn put(set: &BTreeMap<PathBuf, Vec<u8>>, dir: &Path) {
    for (rel, bytes) in set {
        let path = dir.join(rel);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, bytes).unwrap();
    }
}

/// The files of a particle directory but its lock file (which holds the last writer's PID).
fn set_files(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut set = files(dir);
    set.remove(Path::new(bella_vqa::io::LOCK_FILE));
    set
}

#[test]
fn a_train_force_that_fails_leaves_the_old_set_whole_with_its_questions_and_log() {
    let world = world();
    let llava = fixture("llava-tiny-hub");
    let (list, particles) = (
        Path::new(bella_vqa::data::seen::FILE),
        Path::new("particles.safetensors"),
    );
    // An old set with its list and log, its checkpoints deleted (so --force may train over it).
    let old = tempfile::tempdir().unwrap();
    run_ok(&mut train(world.path(), old.path()));
    std::fs::remove_dir_all(old.path().join("checkpoints")).unwrap();
    let old_files = set_files(old.path());
    let other = [("--limit", "6")];
    let (mut tried, mut told) = (0, false);
    for n in 1.. {
        let out = tempfile::tempdir().unwrap();
        put(&old_files, out.path());
        let mut cmd = train_with(&llava, world.path(), out.path(), &other);
        let Some(err) = failed_at(cmd.arg("--force"), n) else {
            break;
        };
        tried += 1;
        told |= says_disk_full(&err);
        if says_disk_full(&err) {
            assert!(err.contains("with --resume continues"), "op {n}: {err}");
        }
        let now = set_files(out.path());
        if out.path().join("checkpoints/latest").exists() {
            // Committed: the set there is the new run's, which --resume completes.
            assert_ne!(now.get(list), old_files.get(list), "op {n}: the old list");
            run_ok(train_with(&llava, world.path(), out.path(), &other).arg("--resume"));
            assert!(out.path().join(list).is_file(), "op {n}");
        } else {
            assert_eq!(now.get(particles), old_files.get(particles), "op {n}");
            for kept in [
                bella_vqa::data::seen::FILE,
                "train_log.jsonl",
                "train_summary.json",
                "bella_config.json",
            ] {
                let kept = Path::new(kept);
                assert_eq!(
                    now.get(kept),
                    old_files.get(kept),
                    "op {n}: {} of the old set changed: {err}",
                    kept.display()
                );
            }
        }
        assert_no_temp_files(out.path());
    }
    assert!(tried >= 20, "the run finished before most fault points");
    assert!(told, "no failure said the disk was full and what to do");
}

/// `export-peft --force` killed at any point leaves the old set or the new one, whole: a kill
/// during the swap leaves its journal, which import-peft refuses to read past and the next lock
/// of the folder (the next export into it) completes (it left a mix of old and new adapters).
#[test]
fn an_export_peft_force_killed_at_any_point_leaves_one_set_whole() {
    let world = world();
    let (old_set, new_set) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    run_ok(&mut train(world.path(), old_set.path()));
    run_ok(&mut train_with(
        &fixture("llava-tiny-hub"),
        world.path(),
        new_set.path(),
        &[("--limit", "6")],
    ));
    let export = |set: &Path, out: &Path| {
        let mut c = bella();
        c.args(["export-peft", "--quiet", "--force", "--adapters"])
            .arg(set)
            .arg("--out")
            .arg(out);
        c
    };
    let (old, new) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    run_ok(&mut export(old_set.path(), old.path()));
    run_ok(&mut export(new_set.path(), new.path()));
    let (old_files, new_files) = (set_files(old.path()), set_files(new.path()));
    let (mut killed, mut torn) = (0, 0);
    for n in 1.. {
        let out = tempfile::tempdir().unwrap();
        put(&set_files(old.path()), out.path());
        if !aborted_at(&mut export(new_set.path(), out.path()), n) {
            break;
        }
        killed += 1;
        if bella_vqa::io::unfinished_swap(out.path()).is_some() {
            torn += 1;
            let err = run_err(
                bella()
                    .args(["import-peft", "--quiet", "--model"])
                    .arg(fixture("llava-tiny-hub"))
                    .arg("--peft")
                    .arg(out.path().join("particle-0"))
                    .arg(out.path().join("particle-1"))
                    .arg("--out")
                    .arg(out.path().join("imported")),
            );
            assert!(err.contains("is being replaced as a set"), "op {n}: {err}");
        }
        drop(bella_vqa::io::OutputLock::acquire(out.path()).unwrap());
        let got = set_files(out.path());
        assert!(
            got == old_files || got == new_files,
            "killed at op {n}: neither set whole: {:?}",
            got.keys().collect::<Vec<_>>()
        );
    }
    assert!(killed >= 5, "the export finished before most kill points");
    assert!(torn >= 2, "no kill fell inside the swap");

    // For a moment of the swap an adapter folder is not there: a relative path, which reads
    // as a hub id when no such folder exists, is refused as being replaced, not looked up in
    // the hub cache.
    let work = tempfile::tempdir().unwrap();
    std::fs::create_dir(work.path().join("exs")).unwrap();
    let journal = work.path().join("exs").join(".bella-vqa.swap-0");
    std::fs::write(&journal, "").unwrap();
    assert_eq!(
        bella_vqa::io::unfinished_swap(&work.path().join("exs")),
        Some(journal)
    );
    let err = run_err(
        bella()
            .current_dir(work.path())
            .args(["import-peft", "--quiet", "--model"])
            .arg(fixture("llava-tiny-hub"))
            .args(["--peft", "exs/particle-0", "--out", "imported"]),
    );
    assert!(
        err.contains("exs/particle-0 is being replaced as a set") && !err.contains("hub"),
        "{err}"
    );
}

#[test]
fn an_import_peft_force_that_fails_leaves_the_old_set_whole() {
    let world = world();
    let llava = fixture("llava-tiny-hub");
    let old = tempfile::tempdir().unwrap();
    run_ok(&mut train(world.path(), old.path()));
    let old_files = set_files(old.path());
    // Adapters of other particles.
    let other = tempfile::tempdir().unwrap();
    run_ok(&mut train_with(
        &llava,
        world.path(),
        other.path(),
        &[("--limit", "6")],
    ));
    let peft = tempfile::tempdir().unwrap();
    run_ok(
        bella()
            .args(["export-peft", "--quiet", "--force", "--adapters"])
            .arg(other.path())
            .arg("--out")
            .arg(peft.path()),
    );
    let import = |out: &Path| {
        let mut cmd = bella();
        cmd.args(["import-peft", "--quiet", "--force", "--peft"])
            .arg(peft.path().join("particle-0"))
            .arg(peft.path().join("particle-1"))
            .arg("--out")
            .arg(out)
            .arg("--model")
            .arg(&llava);
        cmd
    };
    let mut tried = 0;
    for n in 1.. {
        let out = tempfile::tempdir().unwrap();
        put(&old_files, out.path());
        let Some(err) = failed_at(&mut import(out.path()), n) else {
            break;
        };
        tried += 1;
        let now = set_files(out.path());
        if now.get(Path::new("particles.safetensors"))
            == old_files.get(Path::new("particles.safetensors"))
        {
            assert_eq!(now, old_files, "op {n}: the old set changed: {err}");
        }
        assert_no_temp_files(out.path());
    }
    assert!(tried >= 5, "the import finished before most fault points");
    // Killed at any point: until the new particles are in place the old set stays whole, its
    // checkpoints, log and question list included (it can still resume).
    assert!(old_files.keys().any(|p| p.starts_with("checkpoints")));
    let (mut killed, mut left_behind) = (0, 0);
    for n in 1.. {
        let out = tempfile::tempdir().unwrap();
        put(&old_files, out.path());
        if !aborted_at(&mut import(out.path()), n) {
            break;
        }
        killed += 1;
        let mut now = set_files(out.path());
        now.retain(|p, _| !p.to_string_lossy().contains(".tmp-"));
        if now.get(Path::new("particles.safetensors"))
            == old_files.get(Path::new("particles.safetensors"))
        {
            assert!(
                now == old_files,
                "killed at op {n}: the old set changed: now {:?}",
                now.keys().collect::<Vec<_>>()
            );
        } else if out.path().join("checkpoints").exists()
            && bella_vqa::bella::particles::ParticleSet::read_config(out.path())
                .is_ok_and(|c| c.method == bella_vqa::bella::peft::IMPORTED_METHOD)
        {
            // Imported, the old run's files not yet removed: they do not count for the import
            // (resuming put the old particles back; the old question list made calibrate see
            // training questions).
            left_behind += 1;
            let err = run_err(train(world.path(), out.path()).arg("--resume"));
            assert!(
                err.contains("were imported from PEFT adapters") && !err.contains("write its name"),
                "op {n}: {err}"
            );
            assert_eq!(bella_vqa::data::seen::read(out.path()).unwrap(), None);
        }
    }
    assert!(killed >= 5, "the import finished before most kill points");
    assert!(
        left_behind >= 1,
        "no kill fell between the import and its removals"
    );
    // Cut short between its two files (only the particles written): the same command without
    // --force completes it.
    let out = tempfile::tempdir().unwrap();
    std::fs::copy(
        other.path().join("particles.safetensors"),
        out.path().join("particles.safetensors"),
    )
    .unwrap();
    let cmd = import(out.path());
    let args: Vec<_> = cmd
        .get_args()
        .filter(|a| *a != "--force")
        .map(ToOwned::to_owned)
        .collect();
    run_ok(bella().args(&args));
    assert!(out.path().join("bella_config.json").is_file());
    // With a config there, it is a set: refused without --force.
    let err = run_err(bella().args(&args));
    assert!(err.contains("already holds a particle set"), "{err}");
}

#[cfg(unix)]
#[test]
fn bench_merge_refuses_a_fifo_in_a_shard_instead_of_hanging() {
    let world = world();
    let shards: Vec<tempfile::TempDir> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    for (i, dir) in shards.iter().enumerate() {
        run_ok(bench_limit(world.path(), dir.path(), 4).args([
            "--bootstrap",
            "0",
            "--shard",
            &format!("{i}/2"),
        ]));
    }
    for name in ["bench_config.json", "runs.jsonl", "skipped.jsonl"] {
        let copy = tempfile::tempdir().unwrap();
        put(&files(shards[1].path()), copy.path());
        let fifo = copy.path().join(name);
        let _ = std::fs::remove_file(&fifo);
        assert!(Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success());
        let merged = tempfile::tempdir().unwrap();
        let mut child = bella()
            .args(["bench", "merge", "--quiet", "--bootstrap", "0"])
            .arg(shards[0].path())
            .arg(copy.path())
            .arg("--out")
            .arg(merged.path().join("m"))
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let started = Instant::now();
        while child.try_wait().unwrap().is_none() {
            if started.elapsed() > Duration::from_secs(60) {
                child.kill().unwrap();
                panic!("bench merge hung on a FIFO {name}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let out = child.wait_with_output().unwrap();
        let t = text(&out);
        assert!(!out.status.success(), "{name}: {t}");
        assert!(t.contains("FIFO") && t.contains(name), "{name}: {t}");
    }
}

#[test]
fn a_signal_while_bench_computes_its_intervals_stops_it_and_the_same_command_continues() {
    use std::io::BufRead as _;
    let world = world();
    let out = tempfile::tempdir().unwrap();
    run_ok(&mut bench_limit(world.path(), out.path(), 10));
    let results_before = std::fs::read(out.path().join("results.json")).unwrap();
    // Every question answered: only the results are left, with many resamples (seconds).
    let cmd = bench_limit(world.path(), out.path(), 10);
    let args: Vec<_> = cmd.get_args().filter(|a| *a != "--quiet").collect();
    let mut cmd = bella();
    cmd.args(args).args(["--bootstrap", "100000"]);
    let mut child = cmd
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("bella-vqa starts");
    let mut stderr = std::io::BufReader::new(child.stderr.take().unwrap());
    let mut said = String::new();
    while !said.contains("bootstrap intervals") {
        let mut line = String::new();
        assert!(
            stderr.read_line(&mut line).unwrap() > 0,
            "ended early: {said}"
        );
        said.push_str(&line);
    }
    // SAFETY: a plain kill(2) of the child this test started.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut stderr, &mut rest).unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(143), "after SIGTERM: {said}{rest}");
    assert!(
        rest.contains("stopping the metrics in progress")
            && rest.contains("interrupted while computing the bootstrap intervals"),
        "{rest}"
    );
    // The results of the same answers stay as they were, not half written.
    let results_now = std::fs::read(out.path().join("results.json")).unwrap();
    assert!(results_now == results_before, "results.json changed");
    // The invocation's line says it was stopped.
    let runs = std::fs::read_to_string(out.path().join("runs.jsonl")).unwrap();
    let last: serde_json::Value = serde_json::from_str(runs.lines().last().unwrap()).unwrap();
    assert_eq!(last["interrupted"], true, "{runs}");
    assert_eq!(last["finished"], true, "{runs}");
    // The same command (here with the usual resamples) computes them.
    run_ok(&mut bench_limit(world.path(), out.path(), 10));
    let results: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.path().join("results.json")).unwrap()).unwrap();
    assert_eq!(results["progress"]["complete"], true);
}

/// A Ctrl-C while `bench --compare` runs stops it at the next safe point: between questions, or
/// after an entry, before the next one loads (it went on with the next entry); the same command
/// then finishes the comparison as an uninterrupted run does.
#[test]
fn ctrl_c_between_compare_entries_does_not_start_the_next() {
    let world = world();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let compare = |out: &Path| {
        let mut cmd = bella();
        cmd.args([
            "bench",
            "--quiet",
            "--bootstrap",
            "0",
            "--limit",
            "2",
            "--model",
        ])
        .arg(root.join("demo/llava"))
        .arg("--compare")
        .arg(format!(
            "base,ens={}",
            root.join("demo/particles/llava-ensemble").display()
        ))
        .arg("--data")
        .arg(world.path().join("test.jsonl"))
        .arg("--out")
        .arg(out);
        cmd
    };
    let reference = tempfile::tempdir().unwrap();
    run_ok(&mut compare(reference.path()));
    let samples =
        |dir: &Path, entry: &str| std::fs::read(dir.join(entry).join("samples.jsonl")).ok();
    let count = count_ops(&|out| compare(out));
    let (mut between, mut within_entry) = (0, 0);
    for n in 1..=count {
        let out = tempfile::tempdir().unwrap();
        let o = interrupted_at(&mut compare(out.path()), n);
        let t = text(&o);
        assert!(!t.contains("panicked"), "op {n}: {t}");
        if t.contains("interrupted before --compare entry ens") {
            assert_eq!(o.status.code(), Some(130), "op {n}: {t}");
            assert!(
                samples(out.path(), "ens").is_none(),
                "op {n}: the next entry ran"
            );
            between += 1;
        }
        if t.contains("interrupted with") {
            // Stopped while an entry answered (the second too, after the first's metrics).
            assert!(
                t.contains("stopping at the model's next layer"),
                "op {n}: {t}"
            );
            within_entry += 1;
        }
        run_ok(&mut compare(out.path()));
        for entry in ["base", "ens"] {
            assert!(
                samples(out.path(), entry) == samples(reference.path(), entry),
                "Ctrl-C before op {n}: {entry}'s answers differ after the rerun"
            );
        }
    }
    assert!(between > 0, "no Ctrl-C fell between the entries");
    assert!(within_entry > 0, "no Ctrl-C fell while an entry answered");
}

/// A run continued with a larger --limit on the same files (a bad record between the two
/// limits makes the count of questions differ) says so, not that its data changed; its answers
/// are kept.
#[test]
fn a_larger_limit_is_said_to_change_the_questions_not_the_data() {
    let world = world();
    let test = std::fs::read_to_string(world.path().join("test.jsonl")).unwrap();
    let mut lines: Vec<&str> = test.lines().collect();
    lines.insert(2, "not json");
    let data = world.path().join("with-bad.jsonl");
    std::fs::write(&data, lines.join("\n")).unwrap();
    let out = tempfile::tempdir().unwrap();
    let bench = |limit: &str| {
        let mut cmd = bella();
        cmd.args([
            "bench",
            "--skip-bad",
            "--bootstrap",
            "0",
            "--max-new-tokens",
            "4",
        ])
        .arg("--model")
        .arg(fixture("llava-tiny-hub"))
        .arg("--data")
        .arg(&data)
        .args(["--limit", limit, "--out"])
        .arg(out.path());
        run_ok(&mut cmd)
    };
    bench("2");
    let said = bench("3");
    assert!(
        said.contains("the questions it takes changed (--limit)")
            && said.contains("its 2 answers")
            && !said.contains("the data changed"),
        "{said}"
    );
}
