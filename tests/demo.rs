//! The shipped demo models (`demo/llava`, `demo/clip`, trained by scripts/demo/train_base.py)
//! against transformers (references from scripts/demo/check_parity.py), and `ask` on a shipped
//! demo image.

mod common;

use std::path::PathBuf;
use std::process::Command;

use bella_vqa::models::image::load_image;
use bella_vqa::models::llava::LlavaInput;
use bella_vqa::models::{self, LoadedModel, Model};
use candle_core::{DType, Device};
use common::*;

const IMAGE: &str = "eval/demo/red-circle.png";
const QUESTION: &str = "What color is the circle?";

fn repo(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn load(dir: &str) -> LoadedModel {
    let files = dir_files(&repo(dir)).expect("demo model files");
    models::load(&files, &Device::Cpu, DType::F32).expect("demo model loads")
}

fn pixels(m: &LoadedModel) -> candle_core::Tensor {
    let processor = m.image_processor.as_ref().expect("an image processor");
    processor
        .preprocess(&load_image(&repo(IMAGE)).unwrap())
        .unwrap()
        .unsqueeze(0)
        .unwrap()
}

#[test]
fn demo_llava_matches_transformers() {
    let loaded = load("demo/llava");
    let r = reference("demo");
    // The prompt as the Rust side builds it: chat template, image tokens, tokenizer.json.
    let prompter = loaded.prompter().unwrap();
    let prompt = prompter.render_question(QUESTION, true).unwrap();
    assert_eq!(prompt, format!("USER: <image>\n{QUESTION} ASSISTANT:"));
    let n_image = prompter.num_image_tokens(32, 32).unwrap();
    assert_eq!(n_image, 64);
    let prompt_ids = prompter.encode(&prompt, n_image).unwrap();
    assert_eq!(prompt_ids, ids(get(&r, "llava.input_ids"))[0]);
    let pixel_values = pixels(&loaded);
    assert_close(
        "llava.pixel_values",
        &pixel_values,
        get(&r, "llava.pixel_values"),
    );

    let Model::Llava(m) = &loaded.model else {
        panic!("demo/llava is not a LLaVA model")
    };
    let input_ids = get(&r, "llava.input_ids").to_dtype(DType::U32).unwrap();
    let keep = keep_from_mask(&ids(get(&r, "llava.attention_mask")));
    let input = LlavaInput {
        input_ids: &input_ids,
        pixel_values: Some(&pixel_values),
        keep: &keep,
        expanded: false,
    };
    let mut cache = m.language_model.new_cache();
    let out = m.forward(&input, &mut cache, 1, false).unwrap();
    assert_close("llava.logits", &out.logits, get(&r, "llava.logits"));

    // Greedy answer: the same tokens (answer + </s>) as transformers' generate().
    let expected = ids(get(&r, "llava.greedy_tokens"))[0].clone();
    let tokens = greedy(m, &input, 1, expected.len());
    assert_eq!(tokens[0], expected);
    assert_eq!(prompter.decode(&expected, true).unwrap().trim(), "red");
}

#[test]
fn demo_clip_matches_transformers() {
    let loaded = load("demo/clip");
    let r = reference("demo");
    let vocab: Vec<String> = std::fs::read_to_string(repo("demo/clip/answers.txt"))
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect();
    assert_eq!(vocab.len(), 18);
    let texts: Vec<String> = vocab
        .iter()
        .map(|a| bella_vqa::answer::candidates::clip_prompt(QUESTION, a))
        .collect();
    let Model::Clip(m) = &loaded.model else {
        panic!("demo/clip is not a CLIP model")
    };
    let max_len = m.config().text_config.max_position_embeddings;
    let (rows, masks) = loaded
        .prompter()
        .unwrap()
        .encode_clip_batch(&texts, max_len)
        .unwrap();
    assert_eq!(rows, ids(get(&r, "clip.input_ids")));
    assert_eq!(masks, ids(get(&r, "clip.attention_mask")));
    let pixel_values = pixels(&loaded);
    assert_close(
        "clip.pixel_values",
        &pixel_values,
        get(&r, "clip.pixel_values"),
    );
    let logits = m
        .logits_per_image(&pixel_values, &ids_tensor(&rows), Some(&ids_tensor(&masks)))
        .unwrap();
    assert_close(
        "clip.logits_per_image",
        &logits,
        get(&r, "clip.logits_per_image"),
    );
    let best = logits
        .squeeze(0)
        .unwrap()
        .argmax(0)
        .unwrap()
        .to_scalar::<u32>()
        .unwrap();
    assert_eq!(vocab[best as usize], "red");
}

fn ask_json(args: &[&str]) -> serde_json::Value {
    let out = Command::new(env!("CARGO_BIN_EXE_bella-vqa"))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(["ask", "--json"])
        .args(args)
        .output()
        .expect("runs");
    assert!(
        out.status.success(),
        "ask failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("one JSON object")
}

#[test]
fn ask_demo_llava_answers_a_shipped_image() {
    let v = ask_json(&["--model", "demo/llava", "--image", IMAGE, QUESTION]);
    assert_eq!(v["answer"], "red", "{v}");
    assert!(v["confidence"].as_f64().unwrap() > 0.9, "{v}");
    let v = ask_json(&[
        "--model",
        "demo/llava",
        "--image",
        "eval/demo/two-blue-squares.png",
        "How many squares are there?",
    ]);
    assert_eq!(v["answer"], "2", "{v}");
}

#[test]
fn ask_demo_clip_answers_from_its_vocabulary() {
    let v = ask_json(&[
        "--model",
        "demo/clip",
        "--answers",
        "demo/clip/answers.txt",
        "--image",
        IMAGE,
        QUESTION,
    ]);
    assert_eq!(v["answer"], "red", "{v}");
}

/// The README's first command: no model argument, the embedded demo LLaVA with its calibrated
/// particles (written to a fresh cache directory here).
#[test]
fn ask_without_a_model_uses_the_embedded_demo_with_calibrated_particles() {
    let cache = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_bella-vqa"))
        .env("BELLA_VQA_CACHE", cache.path())
        .args(["ask", "--json", "--image"])
        .arg(repo(IMAGE))
        .arg(QUESTION)
        .output()
        .expect("runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["answer"], "red", "{v}");
    assert_eq!(v["calibrated"], true, "{v}");
    assert!(v["particles"].as_array().unwrap().len() > 1, "{v}");
    assert_eq!(v["abstained"], false, "{v}");
    // The embedded files landed in the cache, complete (beside the file-hash cache).
    let dirs: Vec<_> = std::fs::read_dir(cache.path())
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("demo-"))
        .collect();
    assert_eq!(dirs.len(), 1);
    assert!(dirs[0].path().join(".complete").exists());
    assert!(dirs[0].path().join("llava/model.safetensors").exists());
}
