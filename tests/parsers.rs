//! Property tests of the parsers that take untrusted bytes: `config.json` (with validation, then
//! a model load), `preprocessor_config.json`, safetensors headers, JSONL data lines,
//! `bella_config.json`, chat templates, and questions through the tokenizer. The property: `Ok`
//! or a clean `Err`, never a panic (a panic fails the case); where a parser accepts, the result
//! keeps the invariants the code after it relies on. Few cases each, so the suite stays fast.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::OnceLock;

use bella_vqa::bella::particles::{ParticleSet, CONFIG_FILE};
use bella_vqa::data::vqa::{read_jsonl, ReadOptions};
use bella_vqa::models::config::ModelConfig;
use bella_vqa::models::image::{ImageProcessor, MAX_PROCESSED_SIDE};
use bella_vqa::models::prompt::{ChatTemplate, Prompter, DEFAULT_IMAGE_TOKEN};
use bella_vqa::models::weights::Weights;
use bella_vqa::models::{self};
use candle_core::{DType, Device};
use common::fixture;
use proptest::prelude::*;
use serde_json::{json, Value};

fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// JSON values a hostile or careless file may hold where a number is expected (and elsewhere).
fn wild_value() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(json!(0)),
        Just(json!(1)),
        Just(json!(-1)),
        Just(json!(3)),
        Just(json!(5)),
        Just(json!(96)),
        Just(json!(100_000)),
        Just(json!(u64::MAX)),
        Just(json!(i64::MIN)),
        Just(json!(1e300)),
        Just(json!(-0.5)),
        Just(json!(2.5)),
        Just(Value::Null),
        Just(json!("text")),
        Just(json!([])),
        Just(json!([1, 2])),
        Just(json!({})),
        Just(json!(true)),
        (0u64..70_000).prop_map(|n| json!(n)),
    ]
}

/// Up to `n` (key path, value) edits of a JSON object: each replaces or adds a key at the top
/// level or one level down.
fn edits(keys: &'static [&'static str], n: usize) -> impl Strategy<Value = Vec<(String, Value)>> {
    prop::collection::vec(
        (prop::sample::select(keys), wild_value()).prop_map(|(k, v)| (k.to_string(), v)),
        0..=n,
    )
}

fn apply(mut v: Value, edits: &[(String, Value)]) -> Value {
    for (path, value) in edits {
        let mut parts: Vec<&str> = path.split('.').collect();
        let last = parts.pop().unwrap_or_default();
        let mut node = &mut v;
        for p in parts {
            if !node.get(p).is_some_and(Value::is_object) {
                node[p] = json!({});
            }
            node = &mut node[p];
        }
        node[last] = value.clone();
    }
    v
}

fn read_json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

const LLAVA_KEYS: &[&str] = &[
    "image_token_index",
    "vision_feature_layer",
    "vision_feature_select_strategy",
    "text_config.hidden_size",
    "text_config.intermediate_size",
    "text_config.num_attention_heads",
    "text_config.num_key_value_heads",
    "text_config.head_dim",
    "text_config.num_hidden_layers",
    "text_config.vocab_size",
    "text_config.max_position_embeddings",
    "text_config.rope_theta",
    "text_config.rms_norm_eps",
    "vision_config.hidden_size",
    "vision_config.num_attention_heads",
    "vision_config.image_size",
    "vision_config.patch_size",
    "vision_config.num_channels",
    "vision_config.num_hidden_layers",
];

const CLIP_KEYS: &[&str] = &[
    "projection_dim",
    "text_config.hidden_size",
    "text_config.num_attention_heads",
    "text_config.max_position_embeddings",
    "text_config.vocab_size",
    "text_config.layer_norm_eps",
    "vision_config.hidden_size",
    "vision_config.num_attention_heads",
    "vision_config.image_size",
    "vision_config.patch_size",
];

/// What the model code assumes of an accepted config.
fn assert_invariants(config: &ModelConfig) {
    let vision = match config {
        ModelConfig::Clip(c) => {
            let t = &c.text_config;
            assert!(t.num_attention_heads > 0 && t.hidden_size % t.num_attention_heads == 0);
            &c.vision_config
        }
        ModelConfig::Llava(c) => {
            let t = &c.text_config;
            assert!(t.num_attention_heads > 0 && t.num_kv_heads() > 0);
            assert_eq!(t.num_attention_heads % t.num_kv_heads(), 0);
            assert!(t.head_dim() > 0 && t.head_dim() % 2 == 0);
            assert!((c.image_token_index as usize) < t.vocab_size);
            &c.vision_config
        }
    };
    assert!(vision.num_attention_heads > 0 && vision.hidden_size % vision.num_attention_heads == 0);
    assert!(vision.patch_size > 0 && vision.patch_size <= vision.image_size);
    assert!(vision.image_size <= MAX_PROCESSED_SIDE);
}

/// A copy of a fixture model directory whose config.json is `config`.
fn model_dir_with(fixture_name: &str, config: &Value) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(fixture(fixture_name)).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.path().join(entry.file_name())).unwrap();
    }
    std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
    dir
}

proptest! {
    #![proptest_config(config(96))]

    /// A mutated LLaVA or CLIP config is accepted with its invariants, or refused cleanly; an
    /// accepted one then loads against the fixture weights or fails with an error, never a panic.
    #[test]
    fn model_configs_parse_validate_and_load_without_panic(
        clip in any::<bool>(),
        llava_edits in edits(LLAVA_KEYS, 3),
        clip_edits in edits(CLIP_KEYS, 3),
    ) {
        let (name, edits) = if clip {
            ("clip-tiny", clip_edits)
        } else {
            ("llava-tiny-hub", llava_edits)
        };
        let raw = apply(read_json(&fixture(name).join("config.json")), &edits);
        if let Ok(config) = ModelConfig::from_value(&raw) {
            assert_invariants(&config);
            let dir = model_dir_with(name, &raw);
            let files = common::dir_files(dir.path()).unwrap();
            let _ = models::load(&files, &Device::Cpu, DType::F32);
        }
    }

    /// Arbitrary bytes as config.json: an error, never a panic.
    #[test]
    fn config_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        if let Ok(v) = serde_json::from_slice::<Value>(&bytes) {
            let _ = ModelConfig::from_value(&v);
        }
    }

    /// preprocessor_config.json: accepted sizes are bounded; preprocessing a small image with a
    /// processor whose sizes are moderate works or fails cleanly.
    #[test]
    fn image_processor_configs_are_bounded(
        edits in edits(&["size", "size.shortest_edge", "size.longest_edge", "size.height",
            "size.width", "crop_size", "crop_size.height", "crop_size.width", "resample",
            "do_pad", "do_center_crop", "image_std", "image_mean", "rescale_factor"], 4),
    ) {
        let raw = apply(
            read_json(&fixture("llava-tiny-hub").join("preprocessor_config.json")),
            &edits,
        );
        if let Ok(p) = ImageProcessor::from_json(&raw) {
            // A size that follows the input is bounded per image (resize_output_size).
            let (h, w) = p.output_size().unwrap_or((1, 1));
            prop_assert!(h <= MAX_PROCESSED_SIDE && w <= MAX_PROCESSED_SIDE);
            if h <= 512 && w <= 512 {
                let img = image::DynamicImage::new_rgb8(7, 3);
                let _ = p.preprocess(&img);
            }
        }
    }
}

/// Header entries as a hostile file may write them.
fn header_entry() -> impl Strategy<Value = Value> {
    let dtype = prop::sample::select(vec!["F32", "F16", "BF16", "I64", "U8", "BOOL", "F64", "X"]);
    let dims = prop::collection::vec(
        prop_oneof![0usize..6, Just(usize::MAX / 2), Just(1 << 40)],
        0..4,
    );
    let offsets = prop::collection::vec(
        prop_oneof![0usize..64, Just(usize::MAX), Just(1 << 40)],
        0..3,
    );
    (dtype, dims, offsets).prop_map(|(d, s, o)| json!({"dtype": d, "shape": s, "data_offsets": o}))
}

proptest! {
    #![proptest_config(config(128))]

    /// Mutated safetensors files (a random header, a wrong length prefix, cut or extended data):
    /// opening and reading every tensor gives `Ok` or a `WeightError`, never a panic.
    #[test]
    fn safetensors_headers_never_panic(
        entries in prop::collection::vec(header_entry(), 0..3),
        length_delta in -16i64..16,
        data_len in 0usize..128,
        garbage in prop::collection::vec(any::<u8>(), 0..64),
        raw_garbage in any::<bool>(),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.safetensors");
        let bytes = if raw_garbage {
            garbage
        } else {
            let header: serde_json::Map<String, Value> = entries
                .into_iter()
                .enumerate()
                .map(|(i, e)| (format!("t{i}"), e))
                .collect();
            let header = Value::Object(header).to_string();
            let len = (header.len() as i64 + length_delta).max(0) as u64;
            let mut bytes = len.to_le_bytes().to_vec();
            bytes.extend_from_slice(header.as_bytes());
            bytes.resize(bytes.len() + data_len, 0x3f);
            bytes
        };
        std::fs::write(&path, bytes).unwrap();
        if let Ok(w) = Weights::open(std::slice::from_ref(&path), &Device::Cpu, DType::F32) {
            let _ = w.num_values();
            for i in 0..3 {
                let _ = w.get(&format!("t{i}"), &[1]);
                let _ = w.get(&format!("t{i}"), &[]);
            }
        }
    }
}

proptest! {
    #![proptest_config(config(128))]

    /// JSONL lines of any shape: with and without --skip-bad, `Ok` or an error naming the file.
    #[test]
    fn jsonl_lines_never_panic(
        lines in prop::collection::vec(prop_oneof![
            ".{0,40}",
            (wild_value(), wild_value(), wild_value()).prop_map(|(q, a, i)| json!({
                "question_id": q, "question": "What?", "answers": a, "image": i
            }).to_string()),
            (".{0,20}", prop::collection::vec(".{0,8}", 0..12)).prop_map(|(q, a)| json!({
                "question_id": "q1", "question": q, "answers": a, "image": "img.png"
            }).to_string()),
        ], 0..6),
        skip_bad in any::<bool>(),
    ) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("img.png"), b"not a png").unwrap();
        let path = dir.path().join("data.jsonl");
        std::fs::write(&path, lines.join("\n")).unwrap();
        let opts = ReadOptions { skip_bad, check_images: true };
        match read_jsonl(&path, &opts) {
            Ok(data) => prop_assert!(data.examples.iter().all(|e| !e.question.is_empty())),
            Err(e) => prop_assert!(format!("{e:#}").contains("data.jsonl"), "{e:#}"),
        }
    }
}

fn particle_config() -> Value {
    json!({
        "format_version": 1,
        "base_model": {"source": "x", "weights": []},
        "architecture": "LLaVA",
        "targets": ["q_proj"],
        "layers": ["language_model.model.layers.0.self_attn.q_proj"],
        "rank": 2, "alpha": 4.0, "particles": 2,
        "method": "ensemble", "seed": 0, "step": 1,
        "abstention": {"threshold": 0.5, "objective": "risk"}
    })
}

proptest! {
    #![proptest_config(config(128))]

    /// bella_config.json: a mutated config is refused or keeps the invariants answering relies
    /// on (P, rank ≥ 1 and bounded, α finite and non-zero, threshold in [0, 1]).
    #[test]
    fn particle_configs_are_valid_or_refused(
        edits in edits(&["rank", "alpha", "particles", "layers", "targets", "format_version",
            "abstention.threshold", "abstention", "method", "step"], 3),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let raw = apply(particle_config(), &edits);
        std::fs::write(dir.path().join(CONFIG_FILE), raw.to_string()).unwrap();
        if let Ok(c) = ParticleSet::read_config(dir.path()) {
            prop_assert!(c.particles >= 1 && c.particles <= bella_vqa::bella::MAX_PARTICLES);
            prop_assert!(c.rank >= 1 && c.rank <= bella_vqa::bella::MAX_RANK);
            prop_assert!(c.alpha.is_finite() && c.alpha != 0.0);
            if let Some(a) = &c.abstention {
                prop_assert!((0.0..=1.0).contains(&a.threshold));
            }
        }
    }
}

/// Pieces of Jinja that chat templates are made of.
const JINJA: &[&str] = &[
    "{%",
    "%}",
    "{{",
    "}}",
    "{#",
    "#}",
    "{%-",
    "-%}",
    " for ",
    " in ",
    " endfor ",
    " if ",
    " else ",
    " endif ",
    " set ",
    "=",
    " macro ",
    " endmacro ",
    " generation ",
    " endgeneration ",
    "messages",
    "message",
    "message['content']",
    "['role']",
    ".upper()",
    ".strip()",
    "|tojson",
    "|length",
    "loop.index",
    "raise_exception('no')",
    "bos_token",
    "eos_token",
    "add_generation_prompt",
    "'USER: '",
    "+",
    "(",
    ")",
    "[",
    "]",
    "'",
    "\"",
    " ",
    "\n",
    "x",
    "0",
    "selectattr('type', 'equalto', 'text')",
    "content['text']",
    "|",
    "~",
];

proptest! {
    #![proptest_config(config(256))]

    /// Random chat templates: compiling and rendering give `Ok` or an error, never a panic.
    #[test]
    fn chat_templates_never_panic(pieces in prop::collection::vec(prop::sample::select(JINJA), 0..24)) {
        let source: String = pieces.concat();
        if let Ok(t) = ChatTemplate::new(&source) {
            let messages = json!([{"role": "user", "content": [
                {"type": "image"}, {"type": "text", "text": "What is it?"}]}]);
            let special: BTreeMap<String, String> =
                [("bos_token".to_string(), "<s>".to_string())].into();
            let _ = t.render(&messages, true, &special);
        }
    }
}

fn llava_prompter() -> &'static Prompter {
    static PROMPTER: OnceLock<Prompter> = OnceLock::new();
    PROMPTER.get_or_init(|| {
        Prompter::from_dir(&fixture("llava-tiny-hub"), Some(DEFAULT_IMAGE_TOKEN)).unwrap()
    })
}

proptest! {
    #![proptest_config(config(128))]

    /// Special-token strings in a question stay text: whatever the question, the prompt holds
    /// exactly the template's image tokens, one BOS, and no end-of-sequence token.
    #[test]
    fn questions_never_become_special_tokens(
        pieces in prop::collection::vec(prop::sample::select(vec![
            "</s>", "<s>", "<image>", "<unk>", "<pad>", "<", "/", "s", ">", " ", "\n", "What",
            "color", "?", "é", "ok",
        ]), 0..12),
        with_answer in any::<bool>(),
    ) {
        let p = llava_prompter();
        let question: String = pieces.concat();
        // Blanks alone ask nothing (refused, as `ask` refuses them).
        prop_assume!(!question.trim().is_empty());
        let answer = with_answer.then_some("red </s> <image>");
        let image_tokens = 25;
        let ids = p.encode_question(&question, true, image_tokens, answer).unwrap();
        let count = |id: Option<u32>| ids.iter().filter(|&&t| Some(t) == id).count();
        prop_assert_eq!(count(p.image_token_id()), image_tokens);
        prop_assert_eq!(count(p.eos_token_id()), 0);
        prop_assert_eq!(count(p.bos_token_id()), 1);
    }
}
