//! Broken checkpoints give clear errors that name the file and the key, never a panic.

mod common;

use std::path::Path;

use bella_vqa::models;
use candle_core::{DType, Device};
use common::fixture;

fn copy_fixture(name: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(fixture(name)).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.path().join(entry.file_name())).unwrap();
    }
    dir
}

fn load_err(dir: &Path) -> String {
    let files = common::dir_files(dir).expect("files resolve");
    match models::load(&files, &Device::Cpu, DType::F32) {
        Ok(_) => panic!("loading {} should fail", dir.display()),
        Err(e) => format!("{e:#}"),
    }
}

fn edit_config(dir: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    let path = dir.join("config.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(path, serde_json::to_string_pretty(&v).unwrap()).unwrap();
}

#[test]
fn config_without_model_type_is_named() {
    let dir = copy_fixture("clip-tiny");
    edit_config(dir.path(), |v| {
        v.as_object_mut().unwrap().remove("model_type");
    });
    let err = load_err(dir.path());
    assert!(
        err.contains("model_type") && err.contains("config.json"),
        "{err}"
    );
}

#[test]
fn config_with_a_bad_value_names_the_key_path() {
    let dir = copy_fixture("llava-tiny-hub");
    edit_config(dir.path(), |v| {
        v["text_config"]["hidden_size"] = "sixty-four".into()
    });
    let err = load_err(dir.path());
    assert!(
        err.contains("text_config.hidden_size") && err.contains("config.json"),
        "{err}"
    );
}

#[test]
fn config_that_disagrees_with_the_weights_names_tensor_file_and_shapes() {
    let dir = copy_fixture("llava-tiny-hub");
    edit_config(dir.path(), |v| {
        v["text_config"]["intermediate_size"] = 128.into()
    });
    let err = load_err(dir.path());
    assert!(
        err.contains("language_model.model.layers.0.mlp.gate_proj.weight"),
        "{err}"
    );
    assert!(
        err.contains("model-0000") && err.contains("[128, 64]") && err.contains("[96, 64]"),
        "{err}"
    );
}

#[test]
fn tensor_of_the_wrong_shape_is_named() {
    let dir = copy_fixture("clip-tiny");
    let path = dir.path().join("model.safetensors");
    let mut tensors = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    let w = tensors["text_projection.weight"]
        .t()
        .unwrap()
        .contiguous()
        .unwrap();
    tensors.insert("text_projection.weight".into(), w);
    candle_core::safetensors::save(&tensors, &path).unwrap();
    let err = load_err(dir.path());
    assert!(
        err.contains("text_projection.weight") && err.contains("model.safetensors"),
        "{err}"
    );
}

#[test]
fn missing_tensor_is_named() {
    let dir = copy_fixture("clip-tiny");
    let path = dir.path().join("model.safetensors");
    let mut tensors = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    tensors.remove("vision_model.pre_layrnorm.bias");
    candle_core::safetensors::save(&tensors, &path).unwrap();
    let err = load_err(dir.path());
    assert!(err.contains("vision_model.pre_layrnorm.bias"), "{err}");
}

#[test]
fn truncated_safetensors_file_is_named() {
    let dir = copy_fixture("llava-tiny-hub");
    let shard = dir.path().join("model-00002-of-00002.safetensors");
    let bytes = std::fs::read(&shard).unwrap();
    std::fs::write(&shard, &bytes[..bytes.len() / 2]).unwrap();
    let err = load_err(dir.path());
    assert!(err.contains("model-00002-of-00002.safetensors"), "{err}");
}

#[test]
fn garbage_instead_of_safetensors_is_named() {
    let dir = copy_fixture("clip-tiny");
    std::fs::write(
        dir.path().join("model.safetensors"),
        b"not a safetensors file",
    )
    .unwrap();
    let err = load_err(dir.path());
    assert!(err.contains("model.safetensors"), "{err}");
}
