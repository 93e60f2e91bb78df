//! The seeded shapes-world generator (design §7).
//!
//! A scene is 1–4 non-overlapping shapes ([`Shape`]: circle, square, triangle, diamond, cross) in
//! six colours ([`Color`]) on a plain light background ([`BACKGROUND`]), drawn without
//! anti-aliasing on a small square canvas (default 32×32 px). Every scene gets 1–3 VQA questions
//! (1–2 in the OOD splits) from five families, each with a few paraphrases, and only when the
//! question has one unambiguous answer in the scene:
//!
//! | family     | example                                   | answer_type |
//! |------------|-------------------------------------------|-------------|
//! | `color`    | What color is the circle?                 | other       |
//! | `shape`    | What shape is the red object?             | other       |
//! | `count`    | How many blue shapes are there?           | number      |
//! | `exists`   | Is there a green triangle?                | yes/no      |
//! | `position` | Is the circle left of the square? / What is to the left of the triangle? | yes/no / other |
//!
//! "Left of" is strict: the whole box of one object lies left of the whole box of the other; a
//! relation is asked only when the boxes are separated along that axis.
//!
//! # Files written under `out/`
//!
//! - `train.jsonl` (`n` questions), `val.jsonl`, `test.jsonl` ([`eval_size`] questions each): in
//!   distribution;
//! - `ood-unseen-pairs.jsonl`: every scene holds one of the [`HELD_OUT_PAIRS`] (colour–shape pairs
//!   never drawn, and never named, in train/val/test) and every question is about it;
//! - `ood-absent.jsonl`: questions that presuppose an object that is not in the image ("What color
//!   is the cross?" with no cross);
//! - `ood-corrupted.jsonl`: the test questions on corrupted copies of the test images (noise, blur
//!   or occlusion, `corruption` = `{"kind", "severity"}` in the record), answers unchanged;
//! - `ood-mismatched.jsonl`: test questions asked about another test scene's image that lacks an
//!   object the question names (`mismatched: true`; "What color is the circle?" on an image
//!   without a circle), so `"unanswerable"` as in `ood-absent`. Counts and existence questions
//!   have an answer on any image and are left out, so this split is smaller than `test`;
//! - `ood-unanswerable.jsonl`: questions the world cannot answer ("What is the name of the cat?");
//! - `images/{split}/{index:06}.png` (the mismatched split reuses the test images);
//! - `shapes.json`: the generator's settings (seed, size, absent share), colours, held-out pairs and split sizes.
//!
//! Every record carries extra fields: `split`, `family`, `scene_id`, `scene` (the scene the
//! question was made for: `{"width", "height", "objects": [{"shape", "color", "bbox": [x0, y0, x1,
//! y1]}]}`, pixel boxes with exclusive x1/y1), `query` (the question in structured form),
//! `multiple_choice_answer` (the canonical answer) and `answerable` (1 or 0: whether the question
//! has an answer in the scene it was made for). Question ids are `{split}-{index:06}`, unique over
//! all splits.
//!
//! # Answer conventions
//!
//! Each question has 3–10 human answers; a strict majority is the canonical answer, the rest are
//! mostly the canonical answer too, sometimes a synonym ("dark red", "two" for "2", "ball" for
//! "circle") and sometimes a mistake (another colour or shape, a count off by one, yes for no).
//! Colours and shapes are answered by their name, counts by digits ("2"), yes/no by "yes"/"no",
//! "What is left of …" by the shape's name.
//!
//! Questions without an answer (`ood-absent`, `ood-mismatched`, `ood-unanswerable`) follow VizWiz: every human answer
//! is `"unanswerable"`, `answer_type` is `"unanswerable"` and `answerable` is 0. A well-calibrated
//! model should abstain on them. Existence and count questions about absent objects are ordinary
//! in-distribution questions (answers "no" and "0") and are not in `ood-absent`.
//!
//! # Determinism
//!
//! The generator uses its own small PRNG (xoshiro256**, seeded with SplitMix64, one stream per
//! split) and only integer and exactly-rounded float arithmetic, so the same seed and options give
//! byte-identical files on every platform and with every version of the `rand` crate. Each file is
//! written to a temporary name and renamed into place (JSONL files are also synced), so a crash
//! never leaves a half-written file.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use image::{ImageEncoder, Rgb, RgbImage};
use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use super::vqa::{write_jsonl, VqaExample};
use crate::io::write_bytes_atomically;

/// The default canvas side in pixels.
pub const DEFAULT_IMAGE_SIZE: u32 = 32;
/// The smallest canvas side the generator accepts.
pub const MIN_IMAGE_SIZE: u32 = 16;
/// The largest canvas side the generator accepts.
pub const MAX_IMAGE_SIZE: u32 = 1024;
/// The background colour (RGB).
pub const BACKGROUND: [u8; 3] = [240, 240, 240];
/// The answer to questions without an answer in the image (VizWiz convention).
pub const UNANSWERABLE: &str = "unanswerable";
/// The split names, in the order they are generated; each is written as `{name}.jsonl`.
pub const SPLITS: [&str; 8] = [
    "train",
    "val",
    "test",
    "ood-unseen-pairs",
    "ood-absent",
    "ood-corrupted",
    "ood-mismatched",
    "ood-unanswerable",
];

/// The colours of the shapes world.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Color {
    Red,
    Green,
    Blue,
    Yellow,
    Purple,
    Orange,
}

impl Color {
    pub const ALL: [Color; 6] = [
        Color::Red,
        Color::Green,
        Color::Blue,
        Color::Yellow,
        Color::Purple,
        Color::Orange,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Color::Red => "red",
            Color::Green => "green",
            Color::Blue => "blue",
            Color::Yellow => "yellow",
            Color::Purple => "purple",
            Color::Orange => "orange",
        }
    }

    /// The exact RGB value the generator paints.
    pub fn rgb(self) -> [u8; 3] {
        match self {
            Color::Red => [220, 30, 30],
            Color::Green => [30, 160, 50],
            Color::Blue => [30, 70, 220],
            Color::Yellow => [240, 210, 20],
            Color::Purple => [140, 50, 180],
            Color::Orange => [250, 130, 20],
        }
    }

    pub fn from_name(name: &str) -> Option<Color> {
        Color::ALL.into_iter().find(|c| c.name() == name)
    }

    /// Answers a human might give instead of the name.
    pub fn synonyms(self) -> &'static [&'static str] {
        match self {
            Color::Red => &["dark red", "crimson"],
            Color::Green => &["dark green", "lime"],
            Color::Blue => &["dark blue", "navy"],
            Color::Yellow => &["gold", "light yellow"],
            Color::Purple => &["violet", "magenta"],
            Color::Orange => &["dark orange", "amber"],
        }
    }
}

/// The shapes of the shapes world.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Shape {
    Circle,
    Square,
    Triangle,
    Diamond,
    Cross,
}

impl Shape {
    pub const ALL: [Shape; 5] = [
        Shape::Circle,
        Shape::Square,
        Shape::Triangle,
        Shape::Diamond,
        Shape::Cross,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Shape::Circle => "circle",
            Shape::Square => "square",
            Shape::Triangle => "triangle",
            Shape::Diamond => "diamond",
            Shape::Cross => "cross",
        }
    }

    pub fn plural(self) -> &'static str {
        match self {
            Shape::Circle => "circles",
            Shape::Square => "squares",
            Shape::Triangle => "triangles",
            Shape::Diamond => "diamonds",
            Shape::Cross => "crosses",
        }
    }

    pub fn from_name(name: &str) -> Option<Shape> {
        Shape::ALL.into_iter().find(|s| s.name() == name)
    }

    /// Answers a human might give instead of the name.
    pub fn synonyms(self) -> &'static [&'static str] {
        match self {
            Shape::Circle => &["round", "ball", "dot"],
            Shape::Square => &["box", "rectangle"],
            Shape::Triangle => &["pyramid"],
            Shape::Diamond => &["rhombus"],
            Shape::Cross => &["plus", "plus sign"],
        }
    }

    /// Whether the shape covers the point (u, v) of its box, both in 0..1 (pixel centres).
    /// A triangle points up; a cross is a plus sign with arms a third of the box wide.
    pub fn covers(self, u: f32, v: f32) -> bool {
        let du = (u - 0.5).abs();
        let dv = (v - 0.5).abs();
        match self {
            Shape::Circle => du * du + dv * dv <= 0.25,
            Shape::Square => true,
            Shape::Triangle => du <= v / 2.0,
            Shape::Diamond => du + dv <= 0.5,
            Shape::Cross => du <= 1.0 / 6.0 || dv <= 1.0 / 6.0,
        }
    }
}

/// Colour–shape pairs never drawn or named in train/val/test; `ood-unseen-pairs` is built on them.
pub const HELD_OUT_PAIRS: [(Color, Shape); 4] = [
    (Color::Red, Shape::Triangle),
    (Color::Green, Shape::Square),
    (Color::Blue, Shape::Circle),
    (Color::Yellow, Shape::Diamond),
];

/// Whether a colour–shape pair is held out of the in-distribution splits.
pub fn is_held_out(color: Color, shape: Shape) -> bool {
    HELD_OUT_PAIRS.contains(&(color, shape))
}

/// One shape in a scene; `bbox` = [x0, y0, x1, y1] in pixels, x1 and y1 exclusive.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SceneObject {
    pub shape: Shape,
    pub color: Color,
    pub bbox: [u32; 4],
}

impl SceneObject {
    /// Twice the box centre (integer).
    fn cx2(&self) -> u32 {
        self.bbox[0] + self.bbox[2]
    }

    fn cy2(&self) -> u32 {
        self.bbox[1] + self.bbox[3]
    }
}

/// A scene: the objects on the canvas, as recorded in every record's `scene` field.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Scene {
    pub width: u32,
    pub height: u32,
    pub objects: Vec<SceneObject>,
}

impl Scene {
    /// Paints the scene: background, then each object's pixels whose centres it covers.
    pub fn render(&self) -> RgbImage {
        let mut img = RgbImage::from_pixel(self.width, self.height, Rgb(BACKGROUND));
        for o in &self.objects {
            let [x0, y0, x1, y1] = o.bbox;
            let (x1, y1) = (x1.min(self.width), y1.min(self.height));
            let w = o.bbox[2].saturating_sub(x0).max(1) as f32;
            let h = o.bbox[3].saturating_sub(y0).max(1) as f32;
            for y in y0..y1 {
                for x in x0..x1 {
                    let u = ((x - x0) as f32 + 0.5) / w;
                    let v = ((y - y0) as f32 + 0.5) / h;
                    if o.shape.covers(u, v) {
                        img.put_pixel(x, y, Rgb(o.color.rgb()));
                    }
                }
            }
        }
        img
    }
}

/// What to generate.
#[derive(Clone, Debug, PartialEq)]
pub struct ShapesOptions {
    /// The output folder (created if needed). One that holds a data set already is refused
    /// unless `force`.
    pub out: PathBuf,
    pub seed: u64,
    /// Training questions; val, test and every OOD split get [`eval_size`]`(n)` questions.
    pub n: usize,
    /// Canvas side in pixels (default 32).
    pub image_size: u32,
    /// Show a progress bar on stderr.
    pub progress: bool,
    /// Share of the training scenes (0..=1) whose questions name an absent object, answered
    /// `"unanswerable"` as in VizWiz and `ood-absent` — for fine-tuning a model to say so. Val,
    /// test and the OOD splits do not change. 0 (the default) leaves `train.jsonl` as without
    /// the option, byte for byte.
    pub absent_share: f64,
    /// Replace the files of a data set already in `out`.
    pub force: bool,
}

impl ShapesOptions {
    /// Defaults: seed 0, 2000 training questions, 32×32 images, no progress bar, no absent
    /// questions in training.
    pub fn new(out: impl Into<PathBuf>) -> Self {
        ShapesOptions {
            out: out.into(),
            seed: 0,
            n: 2000,
            image_size: DEFAULT_IMAGE_SIZE,
            progress: false,
            absent_share: 0.0,
            force: false,
        }
    }
}

/// What was written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShapesSummary {
    /// (split name, questions), in the order of [`SPLITS`].
    pub splits: Vec<(String, usize)>,
    /// Image files written.
    pub images: usize,
}

/// The size of val, test and every OOD split for `n` training questions: n/5, at least 10.
pub fn eval_size(n: usize) -> usize {
    (n / 5).max(10)
}

/// Every word the generator can write in a question or an answer, lower-case, sorted (punctuation
/// such as `?` is not included). Useful to build tokenizers and answer vocabularies.
pub fn vocabulary() -> Vec<String> {
    let mut words = BTreeSet::new();
    let mut add = |text: &str| {
        let mut stripped = String::new();
        let mut in_brace = false;
        for ch in text.chars() {
            match ch {
                '{' => in_brace = true,
                '}' => {
                    in_brace = false;
                    stripped.push(' ');
                }
                _ if !in_brace => stripped.push(ch),
                _ => {}
            }
        }
        for w in stripped.split(|c: char| !c.is_alphanumeric()) {
            if !w.is_empty() {
                words.insert(w.to_lowercase());
            }
        }
    };
    for c in Color::ALL {
        add(c.name());
        c.synonyms().iter().for_each(|s| add(s));
    }
    for s in Shape::ALL {
        add(s.name());
        add(s.plural());
        s.synonyms().iter().for_each(|w| add(w));
    }
    for (n, word) in NUMBER_WORDS.iter().enumerate() {
        add(&n.to_string());
        add(word);
    }
    for w in ["yes", "no", UNANSWERABLE, "a", "an", "object"] {
        add(w);
    }
    let template_lists: [&[&str]; 8] = [
        COLOR_TEMPLATES,
        SHAPE_TEMPLATES,
        COUNT_ALL_TEMPLATES,
        COUNT_COLOR_TEMPLATES,
        COUNT_SHAPE_TEMPLATES,
        COUNT_PAIR_TEMPLATES,
        EXISTS_TEMPLATES,
        UNANSWERABLE_TEMPLATES,
    ];
    for list in template_lists {
        list.iter().for_each(|t| add(t));
    }
    for rel in Relation::ALL {
        rel.yes_no_templates().iter().for_each(|t| add(t));
        rel.what_templates().iter().for_each(|t| add(t));
    }
    words.into_iter().collect()
}

/// The most training questions one world holds (`--n`).
pub const MAX_QUESTIONS: usize = 1_000_000;

/// Generates the shapes world into `opts.out`.
pub fn generate(opts: &ShapesOptions) -> anyhow::Result<ShapesSummary> {
    // Every question is kept in memory (a few KB each) until the files are written.
    if !(1..=MAX_QUESTIONS).contains(&opts.n) {
        crate::bad_option!(
            "the number of training questions (--n) must be 1 to {MAX_QUESTIONS}, not {}",
            opts.n
        );
    }
    if !(MIN_IMAGE_SIZE..=MAX_IMAGE_SIZE).contains(&opts.image_size) {
        crate::bad_option!(
            "image size {} is out of range: use {MIN_IMAGE_SIZE} to {MAX_IMAGE_SIZE} pixels (default {DEFAULT_IMAGE_SIZE})",
            opts.image_size
        );
    }
    if !(0.0..=1.0).contains(&opts.absent_share) {
        crate::bad_option!(
            "absent share {} is not a share: use a number from 0 to 1",
            opts.absent_share
        );
    }
    if !opts.force {
        // Every file and folder a run writes: none may be someone else's.
        let ours = ["shapes.json".to_string(), "images".to_string()]
            .into_iter()
            .chain(SPLITS.iter().map(|split| format!("{split}.jsonl")));
        if let Some(found) = ours.into_iter().find(|f| opts.out.join(f).exists()) {
            let state = if opts.out.join("shapes.json").exists() {
                "a data set"
            } else {
                "an incomplete data set, or a file of its names (no shapes.json: an \
                 interrupted run's, or one of yours)"
            };
            bail!(
                "{} already holds {state} ({found}): pass --force to overwrite it, or choose \
                 another --out",
                opts.out.display()
            );
        }
    }
    let eval = eval_size(opts.n);
    let total = (opts.n + 7 * eval) as u64;
    let progress = if opts.progress {
        let pb = ProgressBar::new(total);
        if let Ok(style) =
            ProgressStyle::with_template("{msg:>18} [{bar:30}] {pos}/{len} questions")
        {
            pb.set_style(style.progress_chars("=> "));
        }
        pb
    } else {
        ProgressBar::hidden()
    };
    let mut g = Generator {
        out: &opts.out,
        size: opts.image_size,
        seed: opts.seed,
        images: 0,
        progress,
    };
    let images_dir = opts.out.join("images");
    // Overwriting (--force) removes the old set's question files first, then starts every
    // split's image folder empty: a run killed midway must not leave an old question file that
    // names a new image, nor images that no split names. Other files under images/ are not ours.
    if opts.force {
        for file in std::iter::once("shapes.json".to_string())
            .chain(SPLITS.iter().map(|split| format!("{split}.jsonl")))
        {
            crate::io::remove_file(&opts.out.join(file))?;
        }
        for split in SPLITS {
            crate::io::remove_dir_all(&images_dir.join(split))?;
        }
    }
    crate::io::create_dir_all(&images_dir)?;

    let mut counts = Vec::new();
    let train = g.split("train", opts.n, Mode::InDist, opts.absent_share)?;
    g.write_split("train", &train.examples, &mut counts)?;
    drop(train);
    let val = g.split("val", eval, Mode::InDist, 0.0)?;
    g.write_split("val", &val.examples, &mut counts)?;
    drop(val);
    let test = g.split("test", eval, Mode::InDist, 0.0)?;
    g.write_split("test", &test.examples, &mut counts)?;
    let unseen = g.split("ood-unseen-pairs", eval, Mode::Unseen, 0.0)?;
    g.write_split("ood-unseen-pairs", &unseen.examples, &mut counts)?;
    drop(unseen);
    let absent = g.split("ood-absent", eval, Mode::Absent, 0.0)?;
    g.write_split("ood-absent", &absent.examples, &mut counts)?;
    drop(absent);
    let corrupted = g.corrupted(&test)?;
    g.write_split("ood-corrupted", &corrupted, &mut counts)?;
    let mismatched = g.mismatched(&test)?;
    g.write_split("ood-mismatched", &mismatched, &mut counts)?;
    let unanswerable = g.split("ood-unanswerable", eval, Mode::Unanswerable, 0.0)?;
    g.write_split("ood-unanswerable", &unanswerable.examples, &mut counts)?;
    g.progress.finish_and_clear();

    let meta = json!({
        "generator": "bella-vqa shapes world",
        "format_version": 1,
        "seed": opts.seed,
        "n": opts.n,
        "absent_share": opts.absent_share,
        "image_size": opts.image_size,
        "background": BACKGROUND,
        "colors": Color::ALL.iter().map(|c| (c.name().to_string(), json!(c.rgb()))).collect::<Map<_, _>>(),
        "shapes": Shape::ALL.iter().map(|s| s.name()).collect::<Vec<_>>(),
        "held_out_pairs": HELD_OUT_PAIRS.iter().map(|(c, s)| [c.name(), s.name()]).collect::<Vec<_>>(),
        "splits": counts.iter().map(|(s, n)| (s.clone(), json!(n))).collect::<Map<_, _>>(),
        "images": g.images,
        "unanswerable_answer": UNANSWERABLE,
    });
    let mut bytes = serde_json::to_vec_pretty(&meta)?;
    bytes.push(b'\n');
    write_bytes_atomically(&opts.out.join("shapes.json"), &bytes)?;
    Ok(ShapesSummary {
        splits: counts,
        images: g.images,
    })
}

// ---------------------------------------------------------------------------------------------
// Generation
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// train/val/test: no held-out pair drawn or named.
    InDist,
    /// Every scene holds a held-out pair (object 0) and every question is about it.
    Unseen,
    /// Questions that presuppose an object that is not there.
    Absent,
    /// Questions the world cannot answer.
    Unanswerable,
}

struct SplitData {
    /// (scene id, image path relative to `out`, scene).
    scenes: Vec<(String, String, Scene)>,
    examples: Vec<VqaExample>,
    /// The scene index of each example.
    scene_of: Vec<usize>,
}

struct Generator<'a> {
    out: &'a Path,
    size: u32,
    seed: u64,
    images: usize,
    progress: ProgressBar,
}

impl Generator<'_> {
    /// `target` questions of `split_mode`, scene by scene; a share `absent_share` of the scenes
    /// gets absent-object questions instead (see [`ShapesOptions::absent_share`]).
    fn split(
        &mut self,
        split: &str,
        target: usize,
        split_mode: Mode,
        absent_share: f64,
    ) -> anyhow::Result<SplitData> {
        self.progress.set_message(split.to_string());
        let mut rng = Rng::new(self.seed, split);
        let mut data = SplitData {
            scenes: Vec::new(),
            examples: Vec::new(),
            scene_of: Vec::new(),
        };
        let dir = self.out.join("images").join(split);
        crate::io::create_dir_all(&dir)?;
        let mut tries = 0usize;
        while data.examples.len() < target {
            tries += 1;
            if tries > 50 * target + 1000 {
                bail!("the shapes generator could not ask enough questions for {split} (a bug: please report it)");
            }
            // No draw without a share, so that the default output stays as it was.
            let mode = if absent_share > 0.0 && rng.chance(absent_share) {
                Mode::Absent
            } else {
                split_mode
            };
            let focus_pair = match mode {
                Mode::Unseen => Some(HELD_OUT_PAIRS[rng.index(HELD_OUT_PAIRS.len())]),
                _ => None,
            };
            let scene = random_scene(&mut rng, self.size, focus_pair);
            if scene.objects.is_empty() {
                continue;
            }
            let ctx = Ctx {
                mode,
                focus: focus_pair.map(|_| 0),
            };
            let want = match mode {
                Mode::InDist => rng.range(1, 3),
                _ => rng.range(1, 2),
            } as usize;
            let mut questions: Vec<Question> = Vec::new();
            for _ in 0..40 {
                if questions.len() >= want {
                    break;
                }
                if let Some(q) = ask(&scene, &mut rng, &ctx) {
                    if !questions.iter().any(|p| p.text == q.text) {
                        questions.push(q);
                    }
                }
            }
            if questions.is_empty() {
                continue;
            }
            let index = data.scenes.len();
            let scene_id = format!("{split}/{index:06}");
            let image_rel = format!("images/{split}/{index:06}.png");
            self.write_image(&image_rel, &scene.render())?;
            let scene_json = serde_json::to_value(&scene)?;
            for q in questions {
                if data.examples.len() >= target {
                    break;
                }
                let qid = format!("{split}-{:06}", data.examples.len());
                let answers = human_answers(&mut rng, &q.answer);
                let mut extra = Map::new();
                extra.insert("split".into(), json!(split));
                extra.insert("family".into(), json!(q.family));
                extra.insert("scene_id".into(), json!(scene_id));
                extra.insert("scene".into(), scene_json.clone());
                extra.insert("query".into(), q.query);
                extra.insert("multiple_choice_answer".into(), json!(q.answer.canonical()));
                extra.insert(
                    "answerable".into(),
                    json!(u8::from(q.answer != Answer::Unanswerable)),
                );
                if mode == Mode::Unseen {
                    let pairs: Vec<[&str; 2]> = scene
                        .objects
                        .iter()
                        .filter(|o| is_held_out(o.color, o.shape))
                        .map(|o| [o.color.name(), o.shape.name()])
                        .collect();
                    extra.insert("held_out_pairs".into(), json!(pairs));
                }
                data.examples.push(VqaExample {
                    question_id: qid,
                    image: self.out.join(&image_rel),
                    question: q.text,
                    answers,
                    answer_type: Some(q.answer.answer_type().to_string()),
                    extra,
                });
                data.scene_of.push(index);
                self.progress.inc(1);
            }
            data.scenes.push((scene_id, image_rel, scene));
        }
        Ok(data)
    }

    /// The test questions on corrupted copies of the test images.
    fn corrupted(&mut self, test: &SplitData) -> anyhow::Result<Vec<VqaExample>> {
        let split = "ood-corrupted";
        self.progress.set_message(split);
        let mut rng = Rng::new(self.seed, split);
        let dir = self.out.join("images").join(split);
        crate::io::create_dir_all(&dir)?;
        let mut corruption = Vec::with_capacity(test.scenes.len());
        for (index, (_, _, scene)) in test.scenes.iter().enumerate() {
            let kind = Corruption::ALL[rng.index(Corruption::ALL.len())];
            let severity = rng.range(1, 3);
            let img = kind.apply(&scene.render(), severity, &mut rng);
            let image_rel = format!("images/{split}/{index:06}.png");
            self.write_image(&image_rel, &img)?;
            corruption.push((
                image_rel,
                json!({"kind": kind.name(), "severity": severity}),
            ));
        }
        let mut out = Vec::with_capacity(test.examples.len());
        for (i, (example, &scene)) in test.examples.iter().zip(&test.scene_of).enumerate() {
            let (image_rel, info) = &corruption[scene];
            let mut e = example.clone();
            e.question_id = format!("{split}-{i:06}");
            e.image = self.out.join(image_rel);
            e.extra.insert("split".into(), json!(split));
            e.extra.insert("corruption".into(), info.clone());
            e.extra
                .insert("source_question_id".into(), json!(example.question_id));
            out.push(e);
            self.progress.inc(1);
        }
        Ok(out)
    }

    /// Test questions asked about another test scene's image that does not show what they name.
    fn mismatched(&mut self, test: &SplitData) -> anyhow::Result<Vec<VqaExample>> {
        let split = "ood-mismatched";
        self.progress.set_message(split);
        let mut rng = Rng::new(self.seed, split);
        let m = test.scenes.len();
        if m < 2 {
            bail!("the test split has fewer than two scenes; cannot build {split}");
        }
        let mut out = Vec::with_capacity(test.examples.len());
        for (example, &scene) in test.examples.iter().zip(&test.scene_of) {
            self.progress.inc(1);
            let named = named_filters(&example.extra);
            if named.is_empty() {
                continue; // counts and existence questions fit every image
            }
            // The first scene after a random offset that lacks something the question names.
            let start = rng.index(m - 1);
            let Some(j) = (0..m - 1)
                .map(|t| (scene + 1 + (start + t) % (m - 1)) % m)
                .find(|&j| named.iter().any(|f| f.count(&test.scenes[j].2) == 0))
            else {
                continue;
            };
            let (image_scene_id, image_rel, image_scene) = &test.scenes[j];
            let mut e = example.clone();
            e.question_id = format!("{split}-{:06}", out.len());
            e.image = self.out.join(image_rel);
            e.answers = vec![UNANSWERABLE.to_string(); example.answers.len()];
            e.answer_type = Some("unanswerable".into());
            e.extra.insert("split".into(), json!(split));
            e.extra.insert("answerable".into(), json!(0));
            e.extra
                .insert("multiple_choice_answer".into(), json!(UNANSWERABLE));
            e.extra.insert("mismatched".into(), json!(true));
            e.extra
                .insert("image_scene_id".into(), json!(image_scene_id));
            e.extra
                .insert("image_scene".into(), serde_json::to_value(image_scene)?);
            e.extra
                .insert("source_question_id".into(), json!(example.question_id));
            out.push(e);
        }
        Ok(out)
    }

    fn write_image(&mut self, rel: &str, img: &RgbImage) -> anyhow::Result<()> {
        let mut bytes = Vec::new();
        image::codecs::png::PngEncoder::new(&mut bytes)
            .write_image(
                img.as_raw(),
                img.width(),
                img.height(),
                image::ExtendedColorType::Rgb8,
            )
            .with_context(|| format!("cannot encode {rel}"))?;
        write_bytes_atomically(&self.out.join(rel), &bytes)?;
        self.images += 1;
        Ok(())
    }

    fn write_split(
        &self,
        split: &str,
        examples: &[VqaExample],
        counts: &mut Vec<(String, usize)>,
    ) -> anyhow::Result<()> {
        write_jsonl(&self.out.join(format!("{split}.jsonl")), examples)?;
        counts.push((split.to_string(), examples.len()));
        Ok(())
    }
}

/// 1–4 objects with boxes at least one pixel apart; object 0 gets `first` if given, every other
/// object a pair that is not held out.
fn random_scene(rng: &mut Rng, size: u32, first: Option<(Color, Shape)>) -> Scene {
    let allowed: Vec<(Color, Shape)> = Color::ALL
        .into_iter()
        .flat_map(|c| Shape::ALL.into_iter().map(move |s| (c, s)))
        .filter(|&(c, s)| !is_held_out(c, s))
        .collect();
    let count = rng.range(1, 4);
    let min_side = ((size * 22 + 50) / 100).max(4);
    let max_side = (size * 3 / 8).max(min_side);
    let mut objects: Vec<SceneObject> = Vec::new();
    for i in 0..count {
        let (color, shape) = match first {
            Some(pair) if i == 0 => pair,
            _ => allowed[rng.index(allowed.len())],
        };
        for attempt in 0..200 {
            let side = if attempt < 100 {
                rng.range(min_side, max_side)
            } else {
                min_side
            };
            let x0 = rng.range(0, size - side);
            let y0 = rng.range(0, size - side);
            let bbox = [x0, y0, x0 + side, y0 + side];
            if objects.iter().all(|o| apart(&o.bbox, &bbox)) {
                objects.push(SceneObject { shape, color, bbox });
                break;
            }
        }
    }
    Scene {
        width: size,
        height: size,
        objects,
    }
}

/// Boxes with at least one background pixel between them.
fn apart(a: &[u32; 4], b: &[u32; 4]) -> bool {
    a[2] < b[0] || b[2] < a[0] || a[3] < b[1] || b[3] < a[1]
}

// ---------------------------------------------------------------------------------------------
// Questions
// ---------------------------------------------------------------------------------------------

const COLOR_TEMPLATES: &[&str] = &[
    "What color is the {shape}?",
    "What is the color of the {shape}?",
    "Which color does the {shape} have?",
];
const SHAPE_TEMPLATES: &[&str] = &[
    "What shape is the {color} object?",
    "What is the shape of the {color} object?",
    "Which shape is {color}?",
];
const COUNT_ALL_TEMPLATES: &[&str] = &[
    "How many shapes are there?",
    "How many objects are there?",
    "How many shapes are in the picture?",
];
const COUNT_COLOR_TEMPLATES: &[&str] = &[
    "How many {color} shapes are there?",
    "How many {color} objects are there?",
];
const COUNT_SHAPE_TEMPLATES: &[&str] = &[
    "How many {shapes} are there?",
    "How many {shapes} are in the picture?",
];
const COUNT_PAIR_TEMPLATES: &[&str] = &[
    "How many {color} {shapes} are there?",
    "How many {color} {shapes} are in the picture?",
];
const EXISTS_TEMPLATES: &[&str] = &[
    "Is there {art} {thing}?",
    "Can you see {art} {thing}?",
    "Does the picture contain {art} {thing}?",
];
const UNANSWERABLE_TEMPLATES: &[&str] = &[
    "What is the name of the cat?",
    "What time is it?",
    "Who drew this picture?",
    "What is the weather like?",
    "How old is the man?",
    "What brand is the car?",
    "What does the sign say?",
    "Where was this picture taken?",
    "What is the dog eating?",
    "Why is the {shape} {color}?",
    "What is the {shape} made of?",
    "Who made the {shape}?",
    "What is the {color} {shape} called?",
    "How heavy is the {shape}?",
];
const NUMBER_WORDS: [&str; 6] = ["zero", "one", "two", "three", "four", "five"];
const MAX_COUNT_ANSWER: usize = 5;

/// A spatial relation between two boxes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Relation {
    Left,
    Right,
    Above,
    Below,
}

impl Relation {
    const ALL: [Relation; 4] = [
        Relation::Left,
        Relation::Right,
        Relation::Above,
        Relation::Below,
    ];

    fn name(self) -> &'static str {
        match self {
            Relation::Left => "left",
            Relation::Right => "right",
            Relation::Above => "above",
            Relation::Below => "below",
        }
    }

    fn opposite(self) -> Relation {
        match self {
            Relation::Left => Relation::Right,
            Relation::Right => Relation::Left,
            Relation::Above => Relation::Below,
            Relation::Below => Relation::Above,
        }
    }

    /// `a` lies wholly on this side of `b`.
    fn holds(self, a: &SceneObject, b: &SceneObject) -> bool {
        match self {
            Relation::Left => a.bbox[2] <= b.bbox[0],
            Relation::Right => a.bbox[0] >= b.bbox[2],
            Relation::Above => a.bbox[3] <= b.bbox[1],
            Relation::Below => a.bbox[1] >= b.bbox[3],
        }
    }

    /// `a`'s centre lies on this side of `b`'s centre.
    fn leans(self, a: &SceneObject, b: &SceneObject) -> bool {
        match self {
            Relation::Left => a.cx2() < b.cx2(),
            Relation::Right => a.cx2() > b.cx2(),
            Relation::Above => a.cy2() < b.cy2(),
            Relation::Below => a.cy2() > b.cy2(),
        }
    }

    fn yes_no_templates(self) -> &'static [&'static str] {
        match self {
            Relation::Left => &[
                "Is the {x} left of the {y}?",
                "Is the {x} to the left of the {y}?",
            ],
            Relation::Right => &[
                "Is the {x} right of the {y}?",
                "Is the {x} to the right of the {y}?",
            ],
            Relation::Above => &["Is the {x} above the {y}?"],
            Relation::Below => &["Is the {x} below the {y}?"],
        }
    }

    fn what_templates(self) -> &'static [&'static str] {
        match self {
            Relation::Left => &[
                "What is to the left of the {y}?",
                "What is left of the {y}?",
            ],
            Relation::Right => &[
                "What is to the right of the {y}?",
                "What is right of the {y}?",
            ],
            Relation::Above => &["What is above the {y}?"],
            Relation::Below => &["What is below the {y}?"],
        }
    }
}

/// Objects picked by colour and/or shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Filter {
    color: Option<Color>,
    shape: Option<Shape>,
}

impl Filter {
    const ANY: Filter = Filter {
        color: None,
        shape: None,
    };

    fn shape(s: Shape) -> Filter {
        Filter {
            color: None,
            shape: Some(s),
        }
    }

    fn color(c: Color) -> Filter {
        Filter {
            color: Some(c),
            shape: None,
        }
    }

    fn pair(c: Color, s: Shape) -> Filter {
        Filter {
            color: Some(c),
            shape: Some(s),
        }
    }

    fn matches(&self, o: &SceneObject) -> bool {
        self.color.is_none_or(|c| c == o.color) && self.shape.is_none_or(|s| s == o.shape)
    }

    fn indices(&self, scene: &Scene) -> Vec<usize> {
        (0..scene.objects.len())
            .filter(|&i| self.matches(&scene.objects[i]))
            .collect()
    }

    fn count(&self, scene: &Scene) -> usize {
        scene.objects.iter().filter(|o| self.matches(o)).count()
    }

    fn is_held_out(&self) -> bool {
        matches!((self.color, self.shape), (Some(c), Some(s)) if is_held_out(c, s))
    }

    /// "red circle", "circle", "red object", "object".
    fn noun(&self) -> String {
        match (self.color, self.shape) {
            (Some(c), Some(s)) => format!("{} {}", c.name(), s.name()),
            (None, Some(s)) => s.name().to_string(),
            (Some(c), None) => format!("{} object", c.name()),
            (None, None) => "object".to_string(),
        }
    }

    fn json(&self) -> Value {
        json!({"color": self.color.map(Color::name), "shape": self.shape.map(Shape::name)})
    }
}

/// The objects a record's question names (its `query`): the subject of colour and shape questions,
/// both sides of a position question. Empty for counts and existence questions, which have an
/// answer in any scene.
fn named_filters(extra: &Map<String, Value>) -> Vec<Filter> {
    let Some(query) = extra.get("query") else {
        return Vec::new();
    };
    let filter = |v: &Value| {
        let color = v["color"].as_str().and_then(Color::from_name);
        let shape = v["shape"].as_str().and_then(Shape::from_name);
        Filter { color, shape }
    };
    let keys: &[&str] = match query["type"].as_str() {
        Some("color" | "shape") => &["subject"],
        Some("relate") => &["subject", "object"],
        Some("what_relation") => &["object"],
        _ => &[],
    };
    keys.iter().map(|k| filter(&query[*k])).collect()
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Answer {
    Color(Color),
    Shape(Shape),
    Count(usize),
    YesNo(bool),
    Unanswerable,
}

impl Answer {
    fn canonical(&self) -> String {
        match self {
            Answer::Color(c) => c.name().to_string(),
            Answer::Shape(s) => s.name().to_string(),
            Answer::Count(n) => n.to_string(),
            Answer::YesNo(true) => "yes".to_string(),
            Answer::YesNo(false) => "no".to_string(),
            Answer::Unanswerable => UNANSWERABLE.to_string(),
        }
    }

    fn answer_type(&self) -> &'static str {
        match self {
            Answer::Color(_) | Answer::Shape(_) => "other",
            Answer::Count(_) => "number",
            Answer::YesNo(_) => "yes/no",
            Answer::Unanswerable => "unanswerable",
        }
    }

    fn synonym(&self, rng: &mut Rng) -> String {
        let list: &[&str] = match self {
            Answer::Color(c) => c.synonyms(),
            Answer::Shape(s) => s.synonyms(),
            Answer::Count(n) => NUMBER_WORDS
                .get(*n)
                .map(std::slice::from_ref)
                .unwrap_or(&[]),
            Answer::YesNo(_) | Answer::Unanswerable => &[],
        };
        match rng.pick(list) {
            Some(s) => s.to_string(),
            None => self.canonical(),
        }
    }

    fn mistake(&self, rng: &mut Rng) -> String {
        match self {
            Answer::Color(c) => {
                let others: Vec<Color> = Color::ALL.into_iter().filter(|o| o != c).collect();
                rng.pick(&others).map_or(c.name(), |o| o.name()).to_string()
            }
            Answer::Shape(s) => {
                let others: Vec<Shape> = Shape::ALL.into_iter().filter(|o| o != s).collect();
                rng.pick(&others).map_or(s.name(), |o| o.name()).to_string()
            }
            Answer::Count(0) => "1".to_string(),
            Answer::Count(n) => {
                if rng.chance(0.5) {
                    (n - 1).to_string()
                } else {
                    (n + 1).min(MAX_COUNT_ANSWER).to_string()
                }
            }
            Answer::YesNo(b) => if *b { "no" } else { "yes" }.to_string(),
            Answer::Unanswerable => UNANSWERABLE.to_string(),
        }
    }
}

/// 3–10 human answers: a strict majority canonical, the rest mostly canonical, sometimes a
/// synonym or a mistake.
fn human_answers(rng: &mut Rng, answer: &Answer) -> Vec<String> {
    let n = rng.range(3, 10) as usize;
    if *answer == Answer::Unanswerable {
        return vec![UNANSWERABLE.to_string(); n];
    }
    let majority = n / 2 + 1;
    let mut out: Vec<String> = (0..n)
        .map(|i| {
            if i < majority {
                return answer.canonical();
            }
            let r = rng.unit();
            if r < 0.7 {
                answer.canonical()
            } else if r < 0.88 {
                answer.synonym(rng)
            } else {
                answer.mistake(rng)
            }
        })
        .collect();
    rng.shuffle(&mut out);
    out
}

struct Question {
    family: &'static str,
    text: String,
    answer: Answer,
    query: Value,
    /// Objects the question is about (subject, referents, the answer object).
    involves: Vec<usize>,
    /// Colour–shape descriptions named in the text.
    names: Vec<Filter>,
}

struct Ctx {
    mode: Mode,
    /// The object every question must involve (the held-out pair in `ood-unseen-pairs`).
    focus: Option<usize>,
}

#[derive(Clone, Copy)]
enum Family {
    Color,
    Shape,
    Count,
    Exists,
    Position,
}

/// One random question of the mode, or `None` when the draw does not fit the scene.
fn ask(scene: &Scene, rng: &mut Rng, ctx: &Ctx) -> Option<Question> {
    if ctx.mode == Mode::Unanswerable {
        return ask_unanswerable(scene, rng);
    }
    let families: &[Family] = match ctx.mode {
        Mode::Absent => &[Family::Color, Family::Shape, Family::Position],
        _ => &[
            Family::Color,
            Family::Shape,
            Family::Count,
            Family::Exists,
            Family::Position,
        ],
    };
    let q = match families[rng.index(families.len())] {
        Family::Color => ask_color(scene, rng, ctx),
        Family::Shape => ask_shape(scene, rng, ctx),
        Family::Count => ask_count(scene, rng, ctx),
        Family::Exists => ask_exists(scene, rng, ctx),
        Family::Position => ask_position(scene, rng, ctx),
    }?;
    let names_held_out = q.names.iter().any(Filter::is_held_out);
    let ok = match ctx.mode {
        Mode::Unseen => ctx.focus.is_some_and(|f| q.involves.contains(&f)) || names_held_out,
        Mode::Absent => !names_held_out && q.answer == Answer::Unanswerable,
        Mode::InDist | Mode::Unanswerable => !names_held_out,
    };
    ok.then_some(q)
}

fn fill(template: &str, slots: &[(&str, &str)]) -> String {
    let mut s = template.to_string();
    for (key, value) in slots {
        s = s.replace(&format!("{{{key}}}"), value);
    }
    s
}

fn template<'a>(rng: &mut Rng, list: &[&'a str]) -> &'a str {
    rng.pick(list).copied().unwrap_or("")
}

/// How to name object `i` unambiguously: its shape if no other object has it, else its colour and
/// shape if no other object has both (sometimes colour and shape even when the shape suffices).
fn refer(scene: &Scene, i: usize, rng: &mut Rng) -> Option<Filter> {
    let o = scene.objects.get(i)?;
    let by_shape = Filter::shape(o.shape);
    let by_pair = Filter::pair(o.color, o.shape);
    let shape_unique = by_shape.count(scene) == 1;
    let pair_unique = by_pair.count(scene) == 1;
    if (shape_unique && rng.chance(0.3)) || (!shape_unique && pair_unique) {
        Some(by_pair)
    } else if shape_unique {
        Some(by_shape)
    } else {
        None
    }
}

fn absent_shapes(scene: &Scene) -> Vec<Shape> {
    Shape::ALL
        .into_iter()
        .filter(|&s| Filter::shape(s).count(scene) == 0)
        .collect()
}

fn absent_colors(scene: &Scene) -> Vec<Color> {
    Color::ALL
        .into_iter()
        .filter(|&c| Filter::color(c).count(scene) == 0)
        .collect()
}

fn absent_pairs(scene: &Scene, held_out: bool) -> Vec<Filter> {
    Color::ALL
        .into_iter()
        .flat_map(|c| Shape::ALL.into_iter().map(move |s| Filter::pair(c, s)))
        .filter(|f| f.is_held_out() == held_out && f.count(scene) == 0)
        .collect()
}

fn ask_color(scene: &Scene, rng: &mut Rng, ctx: &Ctx) -> Option<Question> {
    let t = template(rng, COLOR_TEMPLATES);
    if ctx.mode == Mode::Absent {
        let s = *rng.pick(&absent_shapes(scene))?;
        let f = Filter::shape(s);
        return Some(Question {
            family: "color",
            text: fill(t, &[("shape", s.name())]),
            answer: Answer::Unanswerable,
            query: json!({"type": "color", "subject": f.json()}),
            involves: vec![],
            names: vec![f],
        });
    }
    let candidates: Vec<usize> = (0..scene.objects.len())
        .filter(|&i| ctx.focus.is_none_or(|f| f == i))
        .filter(|&i| Filter::shape(scene.objects[i].shape).count(scene) == 1)
        .collect();
    let i = *rng.pick(&candidates)?;
    let o = scene.objects[i];
    let f = Filter::shape(o.shape);
    Some(Question {
        family: "color",
        text: fill(t, &[("shape", o.shape.name())]),
        answer: Answer::Color(o.color),
        query: json!({"type": "color", "subject": f.json()}),
        involves: vec![i],
        names: vec![f],
    })
}

fn ask_shape(scene: &Scene, rng: &mut Rng, ctx: &Ctx) -> Option<Question> {
    let t = template(rng, SHAPE_TEMPLATES);
    if ctx.mode == Mode::Absent {
        let c = *rng.pick(&absent_colors(scene))?;
        let f = Filter::color(c);
        return Some(Question {
            family: "shape",
            text: fill(t, &[("color", c.name())]),
            answer: Answer::Unanswerable,
            query: json!({"type": "shape", "subject": f.json()}),
            involves: vec![],
            names: vec![f],
        });
    }
    let candidates: Vec<usize> = (0..scene.objects.len())
        .filter(|&i| ctx.focus.is_none_or(|f| f == i))
        .filter(|&i| Filter::color(scene.objects[i].color).count(scene) == 1)
        .collect();
    let i = *rng.pick(&candidates)?;
    let o = scene.objects[i];
    let f = Filter::color(o.color);
    Some(Question {
        family: "shape",
        text: fill(t, &[("color", o.color.name())]),
        answer: Answer::Shape(o.shape),
        query: json!({"type": "shape", "subject": f.json()}),
        involves: vec![i],
        names: vec![f],
    })
}

fn ask_count(scene: &Scene, rng: &mut Rng, ctx: &Ctx) -> Option<Question> {
    let o = *rng.pick(&scene.objects)?;
    let filter = match ctx.focus {
        Some(f) => {
            let o = scene.objects.get(f)?;
            Filter::pair(o.color, o.shape)
        }
        // Totals twice as often as each filtered count: filtered counts are mostly 1.
        None => match rng.index(5) {
            0 | 1 => Filter::ANY,
            2 => Filter::color(if rng.chance(0.75) {
                o.color
            } else {
                Color::ALL[rng.index(Color::ALL.len())]
            }),
            3 => Filter::shape(if rng.chance(0.75) {
                o.shape
            } else {
                Shape::ALL[rng.index(Shape::ALL.len())]
            }),
            _ => {
                if rng.chance(0.75) {
                    Filter::pair(o.color, o.shape)
                } else {
                    Filter::pair(
                        Color::ALL[rng.index(Color::ALL.len())],
                        Shape::ALL[rng.index(Shape::ALL.len())],
                    )
                }
            }
        },
    };
    let text = match (filter.color, filter.shape) {
        (None, None) => template(rng, COUNT_ALL_TEMPLATES).to_string(),
        (Some(c), None) => fill(template(rng, COUNT_COLOR_TEMPLATES), &[("color", c.name())]),
        (None, Some(s)) => fill(
            template(rng, COUNT_SHAPE_TEMPLATES),
            &[("shapes", s.plural())],
        ),
        (Some(c), Some(s)) => fill(
            template(rng, COUNT_PAIR_TEMPLATES),
            &[("color", c.name()), ("shapes", s.plural())],
        ),
    };
    Some(Question {
        family: "count",
        text,
        answer: Answer::Count(filter.count(scene)),
        query: json!({"type": "count", "subject": filter.json()}),
        involves: filter.indices(scene),
        names: vec![filter],
    })
}

fn ask_exists(scene: &Scene, rng: &mut Rng, ctx: &Ctx) -> Option<Question> {
    let yes = rng.chance(0.5);
    let filter = match ctx.focus {
        Some(f) => {
            if yes {
                let o = scene.objects.get(f)?;
                Filter::pair(o.color, o.shape)
            } else {
                *rng.pick(&absent_pairs(scene, true))?
            }
        }
        None if yes => {
            let o = *rng.pick(&scene.objects)?;
            match rng.index(3) {
                0 => Filter::shape(o.shape),
                1 => Filter::color(o.color),
                _ => Filter::pair(o.color, o.shape),
            }
        }
        None => match rng.index(3) {
            0 => Filter::shape(*rng.pick(&absent_shapes(scene))?),
            1 => Filter::color(*rng.pick(&absent_colors(scene))?),
            _ => *rng.pick(&absent_pairs(scene, false))?,
        },
    };
    let thing = filter.noun();
    let art = if thing.starts_with(['a', 'e', 'i', 'o', 'u']) {
        "an"
    } else {
        "a"
    };
    Some(Question {
        family: "exists",
        text: fill(
            template(rng, EXISTS_TEMPLATES),
            &[("art", art), ("thing", &thing)],
        ),
        answer: Answer::YesNo(filter.count(scene) > 0),
        query: json!({"type": "exists", "subject": filter.json()}),
        involves: filter.indices(scene),
        names: vec![filter],
    })
}

fn ask_position(scene: &Scene, rng: &mut Rng, ctx: &Ctx) -> Option<Question> {
    let refs: Vec<(usize, Filter)> = (0..scene.objects.len())
        .filter_map(|i| refer(scene, i, rng).map(|f| (i, f)))
        .collect();
    let yes_no = rng.chance(0.6);
    if ctx.mode == Mode::Absent {
        let mut absent: Vec<Filter> = absent_shapes(scene)
            .into_iter()
            .map(Filter::shape)
            .collect();
        absent.extend(absent_pairs(scene, false));
        let missing = *rng.pick(&absent)?;
        let rel = Relation::ALL[rng.index(Relation::ALL.len())];
        if yes_no {
            let &(_, present) = rng.pick(&refs)?;
            let (x, y) = if rng.chance(0.5) {
                (present, missing)
            } else {
                (missing, present)
            };
            return Some(Question {
                family: "position",
                text: fill(
                    template(rng, rel.yes_no_templates()),
                    &[("x", &x.noun()), ("y", &y.noun())],
                ),
                answer: Answer::Unanswerable,
                query: json!({"type": "relate", "subject": x.json(), "relation": rel.name(), "object": y.json()}),
                involves: vec![],
                names: vec![x, y],
            });
        }
        return Some(Question {
            family: "position",
            text: fill(
                template(rng, rel.what_templates()),
                &[("y", &missing.noun())],
            ),
            answer: Answer::Unanswerable,
            query: json!({"type": "what_relation", "relation": rel.name(), "object": missing.json()}),
            involves: vec![],
            names: vec![missing],
        });
    }
    let involves_focus = |a: usize, b: usize| ctx.focus.is_none_or(|f| f == a || f == b);
    if yes_no {
        let mut pairs = Vec::new();
        for &(i, fi) in &refs {
            for &(j, fj) in &refs {
                if i != j && involves_focus(i, j) {
                    pairs.push((i, fi, j, fj));
                }
            }
        }
        let &(i, fx, j, fy) = rng.pick(&pairs)?;
        let (a, b) = (&scene.objects[i], &scene.objects[j]);
        let true_rels: Vec<Relation> = Relation::ALL
            .into_iter()
            .filter(|r| r.holds(a, b))
            .collect();
        let truth = *rng.pick(&true_rels)?;
        let asked = if rng.chance(0.5) {
            truth
        } else {
            truth.opposite()
        };
        return Some(Question {
            family: "position",
            text: fill(
                template(rng, asked.yes_no_templates()),
                &[("x", &fx.noun()), ("y", &fy.noun())],
            ),
            answer: Answer::YesNo(asked == truth),
            query: json!({"type": "relate", "subject": fx.json(), "relation": asked.name(), "object": fy.json()}),
            involves: vec![i, j],
            names: vec![fx, fy],
        });
    }
    // "What is <rel> the <y>?": exactly one object wholly on that side, no other even leaning.
    let mut candidates = Vec::new();
    for &(j, fy) in &refs {
        let b = &scene.objects[j];
        for rel in Relation::ALL {
            let on_side: Vec<usize> = (0..scene.objects.len())
                .filter(|&k| k != j && rel.holds(&scene.objects[k], b))
                .collect();
            let [k] = on_side[..] else { continue };
            let clear = (0..scene.objects.len())
                .filter(|&o| o != j && o != k)
                .all(|o| !rel.leans(&scene.objects[o], b));
            if clear && involves_focus(j, k) {
                candidates.push((j, fy, rel, k));
            }
        }
    }
    let &(j, fy, rel, k) = rng.pick(&candidates)?;
    Some(Question {
        family: "position",
        text: fill(template(rng, rel.what_templates()), &[("y", &fy.noun())]),
        answer: Answer::Shape(scene.objects[k].shape),
        query: json!({"type": "what_relation", "relation": rel.name(), "object": fy.json()}),
        involves: vec![j, k],
        names: vec![fy],
    })
}

fn ask_unanswerable(scene: &Scene, rng: &mut Rng) -> Option<Question> {
    let o = *rng.pick(&scene.objects)?;
    let t = template(rng, UNANSWERABLE_TEMPLATES);
    Some(Question {
        family: "unanswerable",
        text: fill(t, &[("shape", o.shape.name()), ("color", o.color.name())]),
        answer: Answer::Unanswerable,
        query: json!({"type": "unanswerable"}),
        involves: vec![],
        names: vec![],
    })
}

// ---------------------------------------------------------------------------------------------
// Corruptions
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Corruption {
    Noise,
    Blur,
    Occlusion,
}

impl Corruption {
    const ALL: [Corruption; 3] = [Corruption::Noise, Corruption::Blur, Corruption::Occlusion];

    fn name(self) -> &'static str {
        match self {
            Corruption::Noise => "noise",
            Corruption::Blur => "blur",
            Corruption::Occlusion => "occlusion",
        }
    }

    /// Severity 1–3: Gaussian noise with σ = 16·severity; a box blur of radius severity (scaled
    /// with the canvas); a mid-grey square of (0.2 + 0.1·severity)·side at a random place.
    fn apply(self, img: &RgbImage, severity: u32, rng: &mut Rng) -> RgbImage {
        let (w, h) = img.dimensions();
        match self {
            Corruption::Noise => {
                let sigma = 16.0 * f64::from(severity);
                let mut out = img.clone();
                for p in out.pixels_mut() {
                    for ch in p.0.iter_mut() {
                        let v = f64::from(*ch) + (sigma * rng.gauss()).round();
                        *ch = v.clamp(0.0, 255.0) as u8;
                    }
                }
                out
            }
            Corruption::Blur => {
                let r = severity * (w / DEFAULT_IMAGE_SIZE).max(1);
                let horizontal = box_blur(img, r, true);
                box_blur(&horizontal, r, false)
            }
            Corruption::Occlusion => {
                let side = (w.min(h) * (2 + severity) / 10).max(1);
                let x0 = rng.range(0, w.saturating_sub(side));
                let y0 = rng.range(0, h.saturating_sub(side));
                let mut out = img.clone();
                for y in y0..(y0 + side).min(h) {
                    for x in x0..(x0 + side).min(w) {
                        out.put_pixel(x, y, Rgb([128, 128, 128]));
                    }
                }
                out
            }
        }
    }
}

/// One pass of a box blur along one axis, edges clamped, integer rounding.
fn box_blur(img: &RgbImage, r: u32, horizontal: bool) -> RgbImage {
    let (w, h) = img.dimensions();
    let mut out = RgbImage::new(w, h);
    let r = r as i64;
    let n = (2 * r + 1) as u32;
    for y in 0..h {
        for x in 0..w {
            let mut sum = [0u32; 3];
            for d in -r..=r {
                let (sx, sy) = if horizontal {
                    ((x as i64 + d).clamp(0, w as i64 - 1) as u32, y)
                } else {
                    (x, (y as i64 + d).clamp(0, h as i64 - 1) as u32)
                };
                let p = img.get_pixel(sx, sy).0;
                for c in 0..3 {
                    sum[c] += u32::from(p[c]);
                }
            }
            let px = [0, 1, 2].map(|c| ((sum[c] + n / 2) / n) as u8);
            out.put_pixel(x, y, Rgb(px));
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Randomness
// ---------------------------------------------------------------------------------------------

/// xoshiro256** seeded with SplitMix64: small, fast and the same on every platform and version.
struct Rng {
    s: [u64; 4],
}

impl Rng {
    /// An independent stream per (seed, name).
    fn new(seed: u64, stream: &str) -> Rng {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in stream.bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        let mut x = seed ^ h.rotate_left(29);
        let mut s = [0u64; 4];
        for w in &mut s {
            x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = x;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            *w = z ^ (z >> 31);
        }
        if s == [0; 4] {
            s[0] = 1;
        }
        Rng { s }
    }

    fn next_u64(&mut self) -> u64 {
        let result = self.s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = self.s[1] << 17;
        self.s[2] ^= self.s[0];
        self.s[3] ^= self.s[1];
        self.s[1] ^= self.s[2];
        self.s[0] ^= self.s[3];
        self.s[2] ^= t;
        self.s[3] = self.s[3].rotate_left(45);
        result
    }

    /// Uniform in 0..len (0 when len is 0 or 1), without modulo bias.
    fn index(&mut self, len: usize) -> usize {
        if len <= 1 {
            return 0;
        }
        let n = len as u64;
        let zone = u64::MAX - u64::MAX % n;
        loop {
            let x = self.next_u64();
            if x < zone {
                return (x % n) as usize;
            }
        }
    }

    /// Uniform in lo..=hi (lo when hi <= lo).
    fn range(&mut self, lo: u32, hi: u32) -> u32 {
        if hi <= lo {
            lo
        } else {
            lo + self.index((hi - lo) as usize + 1) as u32
        }
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    fn chance(&mut self, p: f64) -> bool {
        self.unit() < p
    }

    fn pick<'a, T>(&mut self, xs: &'a [T]) -> Option<&'a T> {
        if xs.is_empty() {
            None
        } else {
            xs.get(self.index(xs.len()))
        }
    }

    fn shuffle<T>(&mut self, xs: &mut [T]) {
        for i in (1..xs.len()).rev() {
            let j = self.index(i + 1);
            xs.swap(i, j);
        }
    }

    /// Approximately standard normal (Irwin–Hall, 12 uniforms): exact arithmetic only.
    fn gauss(&mut self) -> f64 {
        (0..12).map(|_| self.unit()).sum::<f64>() - 6.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn many_questions(mode: Mode, focus: bool) -> Vec<(Scene, Question)> {
        let mut rng = Rng::new(1, "unit");
        let mut out = Vec::new();
        for _ in 0..3000 {
            let first = focus.then(|| HELD_OUT_PAIRS[rng.index(HELD_OUT_PAIRS.len())]);
            let scene = random_scene(&mut rng, 32, first);
            let ctx = Ctx {
                mode,
                focus: first.map(|_| 0),
            };
            for _ in 0..5 {
                if let Some(q) = ask(&scene, &mut rng, &ctx) {
                    out.push((scene.clone(), q));
                }
            }
        }
        out
    }

    #[test]
    fn in_distribution_questions_never_name_held_out_pairs() {
        let qs = many_questions(Mode::InDist, false);
        assert!(qs.len() > 10_000);
        for (scene, q) in &qs {
            assert!(!q.names.iter().any(Filter::is_held_out), "{}", q.text);
            assert!(scene.objects.iter().all(|o| !is_held_out(o.color, o.shape)));
            let text = q.text.to_lowercase();
            for (c, s) in HELD_OUT_PAIRS {
                assert!(
                    !text.contains(&format!("{} {}", c.name(), s.name())),
                    "{text}"
                );
                assert!(
                    !text.contains(&format!("{} {}", c.name(), s.plural())),
                    "{text}"
                );
            }
        }
    }

    #[test]
    fn unseen_pair_questions_are_about_the_held_out_object() {
        for (scene, q) in many_questions(Mode::Unseen, true) {
            assert!(is_held_out(scene.objects[0].color, scene.objects[0].shape));
            assert!(
                q.involves.contains(&0) || q.names.iter().any(Filter::is_held_out),
                "{}",
                q.text
            );
        }
    }

    #[test]
    fn absent_questions_are_unanswerable_and_name_something_missing() {
        for (scene, q) in many_questions(Mode::Absent, false) {
            assert_eq!(q.answer, Answer::Unanswerable);
            assert!(q.names.iter().any(|f| f.count(&scene) == 0), "{}", q.text);
        }
    }

    #[test]
    fn every_shape_paints_pixels_at_the_smallest_size() {
        for shape in Shape::ALL {
            let scene = Scene {
                width: 16,
                height: 16,
                objects: vec![SceneObject {
                    shape,
                    color: Color::Red,
                    bbox: [2, 2, 6, 6],
                }],
            };
            let painted = scene
                .render()
                .pixels()
                .filter(|p| p.0 == Color::Red.rgb())
                .count();
            assert!(painted >= 4, "{shape:?} paints {painted} pixels");
        }
    }

    #[test]
    fn rng_ranges_stay_in_bounds() {
        let mut rng = Rng::new(0, "x");
        let mut seen = [false; 4];
        for _ in 0..1000 {
            let v = rng.range(1, 4);
            assert!((1..=4).contains(&v));
            seen[v as usize - 1] = true;
            assert!(rng.unit() < 1.0);
        }
        assert!(seen.iter().all(|&s| s));
        assert_eq!(rng.range(3, 3), 3);
        assert_eq!(rng.index(0), 0);
        assert!(rng.pick::<u8>(&[]).is_none());
    }
}
