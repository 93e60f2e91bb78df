//! The shapes-world generator: readable output, answers consistent with the recorded scenes,
//! held-out pairs kept out of distribution, OOD splits marked, determinism.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;

use bella_vqa::data::shapes::{
    self, eval_size, generate, is_held_out, vocabulary, Color, Scene, SceneObject, Shape,
    ShapesOptions, BACKGROUND, HELD_OUT_PAIRS, SPLITS, UNANSWERABLE,
};
use bella_vqa::data::vqa::{read_jsonl, Dataset, ReadOptions, VqaExample};
use serde_json::Value;

const N: usize = 60;

/// A larger world for the statistical checks (rare cases such as two objects of one colour and
/// shape need a few hundred scenes to show up).
const N_LARGE: usize = 500;

fn options(out: &Path, seed: u64) -> ShapesOptions {
    ShapesOptions {
        out: out.to_path_buf(),
        seed,
        n: N,
        image_size: 32,
        progress: false,
        absent_share: 0.0,
        force: false,
    }
}

/// Generates into a fresh temp dir and reads every split back with image checks.
fn world(seed: u64, n: usize) -> (tempfile::TempDir, BTreeMap<String, Dataset>) {
    let dir = tempfile::tempdir().unwrap();
    let summary = generate(&ShapesOptions {
        n,
        ..options(dir.path(), seed)
    })
    .unwrap();
    let names: Vec<&str> = summary.splits.iter().map(|(s, _)| s.as_str()).collect();
    assert_eq!(names, SPLITS.to_vec());
    let opts = ReadOptions {
        skip_bad: false,
        check_images: true,
    };
    let mut splits = BTreeMap::new();
    for (name, count) in &summary.splits {
        let data = read_jsonl(&dir.path().join(format!("{name}.jsonl")), &opts).unwrap();
        assert_eq!(data.len(), *count, "{name}");
        assert!(data.skipped.is_empty());
        splits.insert(name.clone(), data);
    }
    (dir, splits)
}

fn extra<'a>(e: &'a VqaExample, key: &str) -> &'a Value {
    e.extra
        .get(key)
        .unwrap_or_else(|| panic!("{}: no extra field {key}", e.question_id))
}

fn scene_of(e: &VqaExample, key: &str) -> Scene {
    serde_json::from_value(extra(e, key).clone()).unwrap()
}

fn majority(e: &VqaExample) -> String {
    let mut counts: HashMap<&str, usize> = HashMap::new();
    for a in &e.answers {
        *counts.entry(a.as_str()).or_default() += 1;
    }
    let (best, n) = counts.into_iter().max_by_key(|&(_, n)| n).unwrap();
    assert!(
        2 * n > e.answers.len(),
        "{}: no strict majority in {:?}",
        e.question_id,
        e.answers
    );
    best.to_string()
}

// --- An independent evaluator of the recorded queries --------------------------------------

fn matching<'a>(scene: &'a Scene, filter: &Value) -> Vec<&'a SceneObject> {
    let color = filter["color"]
        .as_str()
        .map(|c| Color::from_name(c).unwrap());
    let shape = filter["shape"]
        .as_str()
        .map(|s| Shape::from_name(s).unwrap());
    scene
        .objects
        .iter()
        .filter(|o| color.is_none_or(|c| c == o.color) && shape.is_none_or(|s| s == o.shape))
        .collect()
}

/// a wholly left/right/above/below b.
fn strictly(rel: &str, a: &SceneObject, b: &SceneObject) -> bool {
    match rel {
        "left" => a.bbox[2] <= b.bbox[0],
        "right" => a.bbox[0] >= b.bbox[2],
        "above" => a.bbox[3] <= b.bbox[1],
        "below" => a.bbox[1] >= b.bbox[3],
        other => panic!("unknown relation {other}"),
    }
}

fn centre_on_side(rel: &str, a: &SceneObject, b: &SceneObject) -> bool {
    let c = |o: &SceneObject, i: usize| o.bbox[i] + o.bbox[i + 2];
    match rel {
        "left" => c(a, 0) < c(b, 0),
        "right" => c(a, 0) > c(b, 0),
        "above" => c(a, 1) < c(b, 1),
        "below" => c(a, 1) > c(b, 1),
        other => panic!("unknown relation {other}"),
    }
}

fn opposite(rel: &str) -> &'static str {
    match rel {
        "left" => "right",
        "right" => "left",
        "above" => "below",
        _ => "above",
    }
}

/// The answer the query has in the scene; panics when the question would be ambiguous.
fn evaluate(scene: &Scene, q: &Value, id: &str) -> String {
    let unique = |f: &Value| -> Option<&SceneObject> {
        let m = matching(scene, f);
        assert!(m.len() <= 1, "{id}: {f} is ambiguous in {scene:?}");
        m.first().copied()
    };
    match q["type"].as_str().unwrap() {
        "color" => unique(&q["subject"]).map_or(UNANSWERABLE.into(), |o| o.color.name().into()),
        "shape" => unique(&q["subject"]).map_or(UNANSWERABLE.into(), |o| o.shape.name().into()),
        "count" => matching(scene, &q["subject"]).len().to_string(),
        "exists" => if matching(scene, &q["subject"]).is_empty() {
            "no"
        } else {
            "yes"
        }
        .into(),
        "relate" => {
            let rel = q["relation"].as_str().unwrap();
            match (unique(&q["subject"]), unique(&q["object"])) {
                (Some(a), Some(b)) => {
                    if strictly(rel, a, b) {
                        "yes".into()
                    } else {
                        assert!(strictly(opposite(rel), a, b), "{id}: relation not clear");
                        "no".into()
                    }
                }
                _ => UNANSWERABLE.into(),
            }
        }
        "what_relation" => {
            let rel = q["relation"].as_str().unwrap();
            let Some(b) = unique(&q["object"]) else {
                return UNANSWERABLE.into();
            };
            let others: Vec<&SceneObject> = scene.objects.iter().filter(|o| *o != b).collect();
            let on_side: Vec<&&SceneObject> =
                others.iter().filter(|o| strictly(rel, o, b)).collect();
            assert_eq!(on_side.len(), 1, "{id}: not exactly one object {rel}");
            for o in &others {
                if *o != *on_side[0] {
                    assert!(
                        !centre_on_side(rel, o, b),
                        "{id}: another object leans {rel}"
                    );
                }
            }
            on_side[0].shape.name().into()
        }
        "unanswerable" => UNANSWERABLE.into(),
        other => panic!("{id}: unknown query type {other}"),
    }
}

fn words(text: &str) -> Vec<String> {
    text.split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(str::to_lowercase)
        .collect()
}

// --- Tests ---------------------------------------------------------------------------------

#[test]
fn generates_all_splits_and_reads_back_with_images() {
    let dir = tempfile::tempdir().unwrap();
    let summary = generate(&options(dir.path(), 7)).unwrap();
    let sizes: HashMap<&str, usize> = summary
        .splits
        .iter()
        .map(|(s, n)| (s.as_str(), *n))
        .collect();
    assert_eq!(sizes["train"], N);
    for split in SPLITS.iter().skip(1) {
        if *split == "ood-mismatched" {
            // only the test questions that name an object (see `ood_splits_are_marked`)
            assert!((1..eval_size(N)).contains(&sizes[split]), "{split}");
        } else {
            assert_eq!(sizes[split], eval_size(N), "{split}");
        }
    }
    let pngs = walk(dir.path())
        .into_keys()
        .filter(|p| p.ends_with(".png"))
        .count();
    assert_eq!(pngs, summary.images);
    assert!(dir.path().join("shapes.json").is_file());
    let meta: Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("shapes.json")).unwrap()).unwrap();
    assert_eq!(meta["seed"], 7);
    assert_eq!(meta["held_out_pairs"].as_array().unwrap().len(), 4);

    let opts = ReadOptions {
        skip_bad: false,
        check_images: true,
    };
    for (name, count) in &summary.splits {
        let path = dir.path().join(format!("{name}.jsonl"));
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(
            text.lines()
                .all(|l| l.contains("\"image\":\"images/")
                    && !l.contains(dir.path().to_str().unwrap())),
            "{name}: image paths must be relative to the output folder"
        );
        let data = read_jsonl(&path, &opts).unwrap();
        assert_eq!(data.len(), *count);
        for e in &data.examples {
            let img = image::open(&e.image).unwrap();
            assert_eq!((img.width(), img.height()), (32, 32));
            assert!((3..=10).contains(&e.answers.len()), "{}", e.question_id);
            assert_eq!(extra(e, "split"), name.as_str());
            for key in [
                "family",
                "scene_id",
                "scene",
                "query",
                "multiple_choice_answer",
                "answerable",
            ] {
                extra(e, key);
            }
        }
    }
}

#[test]
fn answers_are_consistent_with_the_recorded_scenes() {
    let (_dir, splits) = world(11, N_LARGE);
    let mut families: HashMap<String, usize> = HashMap::new();
    for (name, data) in &splits {
        for e in &data.examples {
            let id = &e.question_id;
            // A mismatched question is answered from the image it is shown with.
            let shown = if e.extra.contains_key("image_scene") {
                "image_scene"
            } else {
                "scene"
            };
            let scene = scene_of(e, shown);
            let query = extra(e, "query");
            let expected = evaluate(&scene, query, id);
            let canonical = extra(e, "multiple_choice_answer").as_str().unwrap();
            assert_eq!(
                majority(e),
                expected,
                "{id} ({name}): {} {:?}",
                e.question,
                e.answers
            );
            assert_eq!(canonical, expected, "{id}");
            let family = extra(e, "family").as_str().unwrap();
            *families.entry(family.to_string()).or_default() += 1;
            let answer_type = e.answer_type.as_deref().unwrap();
            let expected_type = match (family, expected.as_str()) {
                (_, UNANSWERABLE) => "unanswerable",
                ("count", _) => "number",
                ("exists", _) => "yes/no",
                ("position", "yes" | "no") => "yes/no",
                _ => "other",
            };
            assert_eq!(answer_type, expected_type, "{id}: {}", e.question);
            assert_eq!(
                extra(e, "answerable"),
                &Value::from(u8::from(expected != UNANSWERABLE)),
                "{id}"
            );
            // The text names what the query says.
            let w = words(&e.question);
            let subject = &query["subject"];
            match query["type"].as_str().unwrap() {
                "color" => assert!(
                    w.contains(&subject["shape"].as_str().unwrap().to_string()),
                    "{id}"
                ),
                "shape" => assert!(
                    w.contains(&subject["color"].as_str().unwrap().to_string()),
                    "{id}"
                ),
                "count" | "exists" => {
                    if let Some(c) = subject["color"].as_str() {
                        assert!(w.contains(&c.to_string()), "{id}: {}", e.question);
                    }
                    if let Some(s) = subject["shape"].as_str() {
                        assert!(w.iter().any(|x| x.starts_with(s)), "{id}: {}", e.question);
                    }
                }
                "relate" | "what_relation" => {
                    let rel = query["relation"].as_str().unwrap();
                    assert!(w.contains(&rel.to_string()), "{id}: {}", e.question);
                }
                _ => {}
            }
        }
    }
    for f in [
        "color",
        "shape",
        "count",
        "exists",
        "position",
        "unanswerable",
    ] {
        assert!(
            families.get(f).copied().unwrap_or(0) > 0,
            "no {f} questions"
        );
    }
}

#[test]
fn images_show_the_recorded_scenes() {
    let (_dir, splits) = world(3, N);
    for name in ["train", "test", "ood-unseen-pairs", "ood-absent"] {
        for e in &splits[name].examples {
            let scene = scene_of(e, "scene");
            let img = image::open(&e.image).unwrap().to_rgb8();
            assert_eq!(img, scene.render(), "{}", e.question_id);
            for o in &scene.objects {
                let [x0, y0, x1, y1] = o.bbox;
                // A point every shape covers: the centre column, two thirds down.
                let (x, y) = ((x0 + x1) / 2, y0 + (y1 - y0) * 2 / 3);
                assert_eq!(
                    img.get_pixel(x, y).0,
                    o.color.rgb(),
                    "{} {o:?}",
                    e.question_id
                );
                assert!((1..=4).contains(&scene.objects.len()));
                assert!(x1 <= 32 && y1 <= 32);
            }
            let corner_free = scene.objects.iter().all(|o| o.bbox[0] > 0 || o.bbox[1] > 0);
            if corner_free {
                assert_eq!(img.get_pixel(0, 0).0, BACKGROUND);
            }
        }
    }
}

#[test]
fn held_out_pairs_appear_only_in_the_unseen_pairs_split() {
    let (_dir, splits) = world(5, N_LARGE);
    let held_out_phrases: Vec<String> = HELD_OUT_PAIRS
        .iter()
        .map(|(c, s)| format!("{} {}", c.name(), s.name()))
        .collect();
    let held_out_plurals: Vec<String> = HELD_OUT_PAIRS
        .iter()
        .map(|(c, s)| format!("{} {}", c.name(), s.plural()))
        .collect();
    for (name, data) in &splits {
        let unseen = name == "ood-unseen-pairs";
        for e in &data.examples {
            let mut scenes = vec![scene_of(e, "scene")];
            if let Some(v) = e.extra.get("image_scene") {
                scenes.push(serde_json::from_value(v.clone()).unwrap());
            }
            let has_held_out = scenes
                .iter()
                .flat_map(|s| &s.objects)
                .any(|o| is_held_out(o.color, o.shape));
            let q = e.question.to_lowercase();
            let names_held_out = held_out_phrases
                .iter()
                .chain(&held_out_plurals)
                .any(|p| q.contains(p.as_str()));
            if unseen {
                assert!(has_held_out, "{}: no held-out pair", e.question_id);
                assert!(!extra(e, "held_out_pairs").as_array().unwrap().is_empty());
            } else {
                assert!(
                    !has_held_out,
                    "{}: held-out pair drawn in {name}",
                    e.question_id
                );
                assert!(
                    !names_held_out,
                    "{}: held-out pair named: {}",
                    e.question_id, e.question
                );
            }
        }
    }
}

#[test]
fn ood_splits_are_marked() {
    let (_dir, splits) = world(9, N);
    let test_ids: HashMap<&str, &VqaExample> = splits["test"]
        .examples
        .iter()
        .map(|e| (e.question_id.as_str(), e))
        .collect();
    for name in SPLITS.iter().filter(|s| s.starts_with("ood-")) {
        assert!(!splits[*name].is_empty(), "{name} is empty");
    }
    for e in &splits["ood-absent"].examples {
        assert!(e.answers.iter().all(|a| a == UNANSWERABLE));
        assert_eq!(e.answer_type.as_deref(), Some("unanswerable"));
        assert_eq!(extra(e, "answerable"), 0);
    }
    for e in &splits["ood-unanswerable"].examples {
        assert!(e.answers.iter().all(|a| a == UNANSWERABLE));
        assert_eq!(e.answer_type.as_deref(), Some("unanswerable"));
        assert_eq!(extra(e, "family"), "unanswerable");
    }
    let mut kinds = HashSet::new();
    for e in &splits["ood-corrupted"].examples {
        let c = extra(e, "corruption");
        kinds.insert(c["kind"].as_str().unwrap().to_string());
        assert!((1..=3).contains(&c["severity"].as_u64().unwrap()));
        let source = test_ids[extra(e, "source_question_id").as_str().unwrap()];
        assert_eq!(e.question, source.question);
        assert_eq!(e.answers, source.answers);
        assert_ne!(e.image, source.image);
        let clean = scene_of(source, "scene").render();
        let corrupted = image::open(&e.image).unwrap().to_rgb8();
        assert_ne!(
            clean, corrupted,
            "{}: corruption changed nothing",
            e.question_id
        );
    }
    assert!(!kinds.is_empty());
    let mismatched = &splits["ood-mismatched"].examples;
    for e in mismatched {
        assert_eq!(extra(e, "mismatched"), true);
        let source = test_ids[extra(e, "source_question_id").as_str().unwrap()];
        assert_eq!(e.question, source.question);
        assert!(e.answers.iter().all(|a| a == UNANSWERABLE));
        assert_eq!(e.answers.len(), source.answers.len());
        assert_eq!(e.answer_type.as_deref(), Some("unanswerable"));
        assert_eq!(extra(e, "answerable"), 0);
        assert_ne!(e.image, source.image, "{}: same image", e.question_id);
        assert_ne!(extra(e, "image_scene_id"), extra(e, "scene_id"));
        let shown = image::open(&e.image).unwrap().to_rgb8();
        assert_eq!(shown, scene_of(e, "image_scene").render());
        // The shown image lacks an object the question names.
        let query = extra(e, "query");
        let named: Vec<&Value> = match query["type"].as_str().unwrap() {
            "color" | "shape" => vec![&query["subject"]],
            "relate" => vec![&query["subject"], &query["object"]],
            "what_relation" => vec![&query["object"]],
            other => panic!("{}: a {other} question fits every image", e.question_id),
        };
        let shown_scene = scene_of(e, "image_scene");
        let present = |f: &Value| {
            shown_scene.objects.iter().any(|o| {
                f["color"].as_str().is_none_or(|c| c == o.color.name())
                    && f["shape"].as_str().is_none_or(|s| s == o.shape.name())
            })
        };
        assert!(
            named.iter().any(|f| !present(f)),
            "{}: the shown image has everything the question names",
            e.question_id
        );
    }
    // Every colour, shape and position question finds an image it does not fit.
    let fitting_any = splits["test"]
        .examples
        .iter()
        .filter(|e| matches!(extra(e, "family").as_str(), Some("exists" | "count")))
        .count();
    assert!(mismatched.len() > (splits["test"].len() - fitting_any) * 9 / 10);
}

#[test]
fn question_ids_are_unique_across_splits() {
    let (_dir, splits) = world(13, N);
    let mut seen = HashSet::new();
    for data in splits.values() {
        for e in &data.examples {
            assert!(seen.insert(e.question_id.clone()), "{}", e.question_id);
        }
    }
}

#[test]
fn vocabulary_covers_every_question_and_answer() {
    let (_dir, splits) = world(17, N_LARGE);
    let vocab: HashSet<String> = vocabulary().into_iter().collect();
    for w in [
        "what",
        "color",
        "red",
        "circle",
        "crosses",
        "unanswerable",
        "2",
        "two",
        "yes",
    ] {
        assert!(vocab.contains(w), "{w}");
    }
    for data in splits.values() {
        for e in &data.examples {
            for text in std::iter::once(&e.question).chain(&e.answers) {
                for w in words(text) {
                    assert!(vocab.contains(&w), "{:?} (from {text:?}) missing", w);
                }
            }
        }
    }
}

fn walk(root: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else {
                let rel = path
                    .strip_prefix(root)
                    .unwrap()
                    .to_string_lossy()
                    .into_owned();
                out.insert(rel, std::fs::read(&path).unwrap());
            }
        }
    }
    out
}

#[test]
fn same_seed_gives_identical_bytes_and_other_seeds_differ() {
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    let c = tempfile::tempdir().unwrap();
    generate(&options(a.path(), 42)).unwrap();
    generate(&options(b.path(), 42)).unwrap();
    generate(&options(c.path(), 43)).unwrap();
    let (fa, fb, fc) = (walk(a.path()), walk(b.path()), walk(c.path()));
    assert!(fa.len() > 20);
    assert_eq!(fa.keys().collect::<Vec<_>>(), fb.keys().collect::<Vec<_>>());
    for (name, bytes) in &fa {
        assert!(
            bytes == &fb[name],
            "{name} differs between two runs with the same seed"
        );
        assert!(!name.contains(".tmp"), "temporary file left: {name}");
    }
    assert_ne!(fa["train.jsonl"], fc["train.jsonl"]);
    assert_ne!(fa["images/train/000000.png"], fc["images/train/000000.png"]);
}

#[test]
fn other_image_sizes_work_and_bad_options_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let mut opts = options(dir.path(), 1);
    opts.n = 12;
    opts.image_size = 48;
    let summary = generate(&opts).unwrap();
    assert_eq!(summary.splits[0], ("train".to_string(), 12));
    let data = read_jsonl(&dir.path().join("val.jsonl"), &ReadOptions::default()).unwrap();
    let img = image::open(&data.examples[0].image).unwrap();
    assert_eq!((img.width(), img.height()), (48, 48));

    opts.image_size = 4;
    let err = generate(&opts).unwrap_err().to_string();
    assert!(err.contains("image size 4"), "{err}");
    opts.image_size = 32;
    opts.n = 0;
    assert!(generate(&opts).is_err());
    // Too many to hold: refused at once (u64::MAX overflowed the generator's guard, which then
    // blamed itself as a bug; 1e18 grew memory until killed).
    opts.n = usize::MAX;
    let err = generate(&opts).unwrap_err().to_string();
    assert!(err.contains("--n") && err.contains("1000000"), "{err}");
    // The module's defaults.
    let d = ShapesOptions::new("x");
    assert_eq!(d.image_size, shapes::DEFAULT_IMAGE_SIZE);
}

#[test]
fn an_absent_share_adds_unanswerable_training_questions_and_changes_nothing_else() {
    let plain = tempfile::tempdir().unwrap();
    let mixed = tempfile::tempdir().unwrap();
    generate(&options(plain.path(), 5)).unwrap();
    generate(&ShapesOptions {
        absent_share: 0.25,
        ..options(mixed.path(), 5)
    })
    .unwrap();
    let train = read_jsonl(&mixed.path().join("train.jsonl"), &ReadOptions::default()).unwrap();
    let absent: Vec<&VqaExample> = train
        .examples
        .iter()
        .filter(|e| extra(e, "answerable") == 0)
        .collect();
    // A quarter of the scenes, 1–2 questions each against 1–3: roughly 10–30 % of questions.
    let share = absent.len() as f64 / train.len() as f64;
    assert!((0.08..0.35).contains(&share), "{share}");
    for e in absent {
        assert!(e.answers.iter().all(|a| a == UNANSWERABLE));
        assert_eq!(e.answer_type.as_deref(), Some("unanswerable"));
        // the question names something the image does not show
        let scene = scene_of(e, "scene");
        assert_eq!(
            evaluate(&scene, extra(e, "query"), &e.question_id),
            UNANSWERABLE
        );
    }
    // Only the training split changes.
    let (a, b) = (walk(plain.path()), walk(mixed.path()));
    for name in [
        "val.jsonl",
        "test.jsonl",
        "ood-absent.jsonl",
        "ood-mismatched.jsonl",
    ] {
        assert!(a[name] == b[name], "{name} changed");
    }
    assert_ne!(a["train.jsonl"], b["train.jsonl"]);
    // shapes.json records the share, so a report can say which world it describes.
    for (dir, share) in [(&plain, 0.0), (&mixed, 0.25)] {
        let meta: Value =
            serde_json::from_slice(&std::fs::read(dir.path().join("shapes.json")).unwrap())
                .unwrap();
        assert_eq!(meta["absent_share"], share);
    }

    for bad in [-0.1, 1.5, f64::NAN] {
        let err = generate(&ShapesOptions {
            absent_share: bad,
            ..options(mixed.path(), 5)
        })
        .unwrap_err()
        .to_string();
        assert!(err.contains("absent share"), "{err}");
    }
}
