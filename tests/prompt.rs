//! Chat templates, tokenisation and image-token expansion; parity with the fixtures written by
//! `transformers` 5.24.

mod common;

use std::collections::BTreeMap;

use bella_vqa::models::prompt::{
    strftime_utc, strip_generation_tags, ChatTemplate, Prompter, SpecialTokens, TemplateSource,
    DEFAULT_CHAT_TEMPLATE,
};
use candle_core::Tensor;
use common::{fixture, reference};
use serde_json::{json, Value};

fn specials() -> BTreeMap<String, String> {
    let mut m = BTreeMap::new();
    m.insert("bos_token".to_string(), "<s>".to_string());
    m.insert("eos_token".to_string(), "</s>".to_string());
    m
}

fn user(question: &str, with_image: bool) -> Value {
    let mut content = Vec::new();
    if with_image {
        content.push(json!({"type": "image"}));
    }
    content.push(json!({"type": "text", "text": question}));
    json!([{"role": "user", "content": content}])
}

#[test]
fn generation_tags_become_plain_blocks() {
    assert_eq!(
        strip_generation_tags("a{% generation %}b{% endgeneration %}c"),
        "a{% if true %}b{% endif %}c"
    );
    assert_eq!(
        strip_generation_tags("{%- generation -%}x{%-endgeneration%}"),
        "{%- if true -%}x{%- endif %}"
    );
    assert_eq!(
        strip_generation_tags("{%+ generation %}{% endgeneration +%}"),
        "{%+ if true %}{% endif +%}"
    );
    // other uses of the word are left alone
    for s in [
        "{% if generation %}x{% endif %}",
        "{{ generation }}",
        "{% set generations = 1 %}",
        "{% generation_x %}",
        "{%",
        "{% generation",
    ] {
        assert_eq!(strip_generation_tags(s), s);
    }
}

#[test]
fn llava_template_renders_like_transformers() {
    let t = ChatTemplate::new(DEFAULT_CHAT_TEMPLATE).unwrap();
    let s = specials();
    assert_eq!(
        t.render(&user("What color is the circle?", true), true, &s)
            .unwrap(),
        "USER: <image>\nWhat color is the circle? ASSISTANT:"
    );
    assert_eq!(
        t.render(&user("How many shapes are there?", false), true, &s)
            .unwrap(),
        "USER: How many shapes are there? ASSISTANT:"
    );
    assert_eq!(
        t.render(&user("Hi", false), false, &s).unwrap(),
        "USER: Hi "
    );
    // a conversation with an assistant turn (inside {% generation %}) and a system message
    let conv = json!([
        {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Colour?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "red"}]},
        {"role": "user", "content": [{"type": "text", "text": "Sure?"}]}
    ]);
    assert_eq!(
        t.render(&conv, true, &s).unwrap(),
        "Be brief. USER: <image>\nColour? ASSISTANT: red USER: Sure? ASSISTANT:"
    );
}

/// Outputs of transformers' own Jinja environment (`_compile_jinja_template(t).render(...)`,
/// transformers 5.24 / jinja2 3.1) for the same templates and messages.
#[test]
fn jinja_environment_matches_transformers() {
    let msgs =
        json!([{"role": "user", "content": "hi there  "}, {"role": "assistant", "content": "ok"}]);
    let cases = [
        (
            "{% for m in messages %}\n  {% if m['role'] == 'user' %}\n    [{{ m['content'] | upper }}]\n  {% else %}\n    <{{ m['content'] }}>\n  {% endif %}\n{% endfor %}\n{% if add_generation_prompt %}\nA:\n{% endif %}\n",
            "    [HI THERE  ]\n    <ok>\nA:\n",
        ),
        (
            "{%- set ns = namespace(n=0) -%}{%- for m in messages -%}{%- set ns.n = ns.n + 1 -%}{%- endfor -%}{{ ns.n }} {{ bos_token }}{{ eos_token }}{{ messages[0]['content'].strip().split(' ')|length }}{% if tools is not none %}T{% endif %}",
            "2 <s></s>2",
        ),
        (
            "{%- for m in messages %}{%- if m.role == 'assistant' %}{%- generation -%}\n  {{ m.content }}\n{%- endgeneration %}{% else %}{{ m.content }}\n{% endif %}{% endfor %}",
            "hi there  \nok",
        ),
        (
            "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}{{ m.content }}{% endfor %}",
            "hi there  ",
        ),
        (
            // transformers' tojson: json.dumps(ensure_ascii=False), ", " / ": " separators
            "{{ {'a': 'é\"\\n', 'b': none, 'c': [1, 2.5, true]} | tojson }}|{{ {'a': [1, {}], 'b': []} | tojson(indent=2) }}",
            "{\"a\": \"é\\\"\\n\", \"b\": null, \"c\": [1, 2.5, true]}|{\n  \"a\": [\n    1,\n    {}\n  ],\n  \"b\": []\n}",
        ),
        (
            "{{ 'x' | tojson(ensure_ascii=true) }}{{ 'é' | tojson(ensure_ascii=true) }}",
            "\"x\"\"\\u00e9\"",
        ),
    ];
    for (src, want) in cases {
        let t = ChatTemplate::new(src).unwrap();
        assert_eq!(t.render(&msgs, true, &specials()).unwrap(), want, "{src}");
    }
}

#[test]
fn raise_exception_and_bad_templates_are_errors() {
    let t = ChatTemplate::new(
        "{% if messages[0]['role'] != 'user' %}{{ raise_exception('Conversations must start with a user turn') }}{% endif %}ok",
    )
    .unwrap();
    assert_eq!(
        t.render(
            &json!([{"role": "user", "content": "x"}]),
            false,
            &specials()
        )
        .unwrap(),
        "ok"
    );
    let err = format!(
        "{:#}",
        t.render(
            &json!([{"role": "system", "content": "x"}]),
            false,
            &specials()
        )
        .unwrap_err()
    );
    assert!(
        err.contains("Conversations must start with a user turn"),
        "{err}"
    );
    let err = format!("{:#}", ChatTemplate::new("{% for %}").unwrap_err());
    assert!(err.contains("does not compile"), "{err}");
    let err = format!(
        "{:#}",
        t.render(&json!({"role": "user"}), false, &specials())
            .unwrap_err()
    );
    assert!(err.contains("list"), "{err}");
}

#[test]
fn strftime_formats_utc_dates() {
    assert_eq!(strftime_utc(0, "%d %b %Y"), "01 Jan 1970");
    // 2023-11-14 22:13:20 UTC, a Tuesday
    assert_eq!(
        strftime_utc(
            1_700_000_000,
            "%Y-%m-%d %H:%M:%S %A %a %B %j %I%p %-d %y %%"
        ),
        "2023-11-14 22:13:20 Tuesday Tue November 318 10PM 14 23 %"
    );
    // leap day
    assert_eq!(strftime_utc(951_782_400, "%d %B %Y"), "29 February 2000");
    let t = ChatTemplate::new("{{ strftime_now('%Y') | length }}").unwrap();
    assert_eq!(t.render(&json!([]), false, &specials()).unwrap(), "4");
}

// ---------------------------------------------------------------------------------------------
// Model directories

fn reference_json(file: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixture(&format!("reference/{file}"))).unwrap())
        .unwrap()
}

fn rows(t: &Tensor) -> Vec<Vec<u32>> {
    t.to_dtype(candle_core::DType::I64)
        .unwrap()
        .to_vec2::<i64>()
        .unwrap()
        .into_iter()
        .map(|r| r.into_iter().map(|x| x as u32).collect())
        .collect()
}

#[test]
fn missing_tokenizer_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let err = format!("{:#}", Prompter::from_dir(dir.path(), None).unwrap_err());
    assert!(err.contains("tokenizer.json"), "{err}");
    std::fs::write(dir.path().join("tokenizer.json"), "{not json").unwrap();
    let err = format!("{:#}", Prompter::from_dir(dir.path(), None).unwrap_err());
    assert!(err.contains("tokenizer.json"), "{err}");
}

#[test]
fn llava_prompts_and_ids_equal_transformers() {
    let meta = reference_json("llava.json");
    let r = reference("llava");
    let n_img = meta["num_image_tokens"].as_u64().unwrap() as usize;
    for dir in ["llava-tiny-hub", "llava-tiny-v5"] {
        let p = Prompter::from_dir(&fixture(dir), None).unwrap();
        assert!(
            matches!(p.template_source(), TemplateSource::File(_)),
            "{dir}: {:?}",
            p.template_source()
        );
        assert_eq!(p.image_token(), Some("<image>"));
        assert_eq!(
            p.image_token_id(),
            Some(meta["image_token_index"].as_u64().unwrap() as u32)
        );
        assert_eq!(p.bos_token_id(), Some(1));
        assert_eq!(p.eos_token_id(), Some(2));
        assert_eq!(
            p.pad_token_id(),
            Some(meta["pad_token_id"].as_u64().unwrap() as u32)
        );
        assert_eq!(p.num_image_tokens(30, 30), Some(n_img), "{dir}");

        // single prompt with an image
        let q = &meta["prompts"]["image"];
        let prompt = p
            .render_question(q["question"].as_str().unwrap(), true)
            .unwrap();
        assert_eq!(prompt, q["prompt"].as_str().unwrap(), "{dir}");
        let ids = p.encode(&prompt, n_img).unwrap();
        assert_eq!(vec![ids.clone()], rows(&r["image.input_ids"]), "{dir}");
        assert_eq!(
            ids.iter()
                .filter(|&&i| Some(i) == p.image_token_id())
                .count(),
            n_img
        );

        // text only
        let q = &meta["prompts"]["text"];
        let prompt = p
            .render_question(q["question"].as_str().unwrap(), false)
            .unwrap();
        assert_eq!(prompt, q["prompt"].as_str().unwrap(), "{dir}");
        assert_eq!(
            vec![p.encode(&prompt, n_img).unwrap()],
            rows(&r["text.input_ids"]),
            "{dir}"
        );

        // left-padded batch
        let batch: Vec<String> = meta["prompts"]["batch"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| {
                let prompt = p
                    .render_question(b["question"].as_str().unwrap(), true)
                    .unwrap();
                assert_eq!(prompt, b["prompt"].as_str().unwrap());
                prompt
            })
            .collect();
        let (ids, mask) = p.encode_batch_left_padded(&batch, n_img).unwrap();
        assert_eq!(ids, rows(&r["batch.input_ids"]), "{dir}");
        assert_eq!(mask, rows(&r["batch.attention_mask"]), "{dir}");
    }
}

#[test]
fn llava_decode_matches_transformers() {
    let p = Prompter::from_dir(&fixture("llava-tiny-hub"), None).unwrap();
    let ids = [1, 382, 301, 266, 290, 298, 380, 359, 333, 321, 262, 384];
    // tokenizer.decode(ids, skip_special_tokens=...) in transformers 5.24
    assert_eq!(
        p.decode(&ids, true).unwrap(),
        "USER: How many shapes are there? ASSISTANT:"
    );
    assert_eq!(
        p.decode(&ids, false).unwrap(),
        "<s> USER: How many shapes are there? ASSISTANT:"
    );
    let ids = [1, 382, 301, 420, 420, 13, 275, 345];
    assert_eq!(p.decode(&ids, true).unwrap(), "USER: \nWhat");
    assert_eq!(
        p.decode(&ids, false).unwrap(),
        "<s> USER: <image><image>\nWhat"
    );
    // tokenizer("Hello  world\n<image>x").input_ids
    assert_eq!(
        p.encode("Hello  world\n<image>x", 1).unwrap(),
        vec![1, 301, 266, 410, 326, 301, 327, 290, 293, 287, 280, 13, 420, 299]
    );
    assert_eq!(
        p.expand_image_tokens("a<image>b<image>", 3).unwrap(),
        "a<image><image><image>b<image><image><image>"
    );
    assert!(p.expand_image_tokens("a<image>", 0).is_err());
    assert_eq!(p.expand_image_tokens("no image", 0).unwrap(), "no image");
}

#[test]
fn clip_text_ids_equal_transformers() {
    let meta = reference_json("clip.json");
    let r = reference("clip");
    let p = Prompter::from_dir(&fixture("clip-tiny"), None).unwrap();
    assert_eq!(p.bos_token_id(), Some(512));
    assert_eq!(p.eos_token_id(), Some(513));
    assert_eq!(p.pad_token_id(), Some(513));
    assert_eq!(p.image_token_id(), None);
    let texts: Vec<String> = meta["texts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap().to_string())
        .collect();
    let (ids, mask) = p.encode_clip_batch(&texts, 32, true).unwrap();
    assert_eq!(ids, rows(&r["text.input_ids"]));
    assert_eq!(mask, rows(&r["text.attention_mask"]));
    // the tokens transformers printed
    for (row, toks) in ids.iter().zip(meta["tokenized"].as_array().unwrap()) {
        let got: Vec<String> = row
            .iter()
            .take(toks.as_array().unwrap().len())
            .map(|&i| p.tokenizer().id_to_token(i).unwrap())
            .collect();
        let want: Vec<String> = toks
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_str().unwrap().to_string())
            .collect();
        assert_eq!(got, want);
    }
    // tokenizer(texts, padding=True, truncation=True, max_length=8)
    let (ids, mask) = p.encode_clip_batch(&texts, 8, true).unwrap();
    assert_eq!(
        ids,
        vec![
            vec![512, 320, 562, 538, 320, 564, 534, 513],
            vec![512, 555, 556, 518, 516, 541, 286, 513]
        ]
    );
    assert_eq!(mask, vec![vec![1; 8], vec![1; 8]]);
    // A question-and-answer text is not cut (its answer is at the end): refused instead.
    let e = p
        .encode_clip_batch(&texts, 8, false)
        .unwrap_err()
        .to_string();
    assert!(e.contains("longer than the 8 tokens"), "{e}");
    assert!(p.encode_clip_batch(&texts, 32, false).is_ok());
    // tokenizer.decode
    let row = rows(&r["text.input_ids"])[0].clone();
    assert_eq!(
        p.decode(&row, true).unwrap(),
        "a photo of a red circle on a chequered mat"
    );
    assert_eq!(
        p.decode(&row, false).unwrap(),
        "<|startoftext|>a photo of a red circle on a chequered mat <|endoftext|>"
    );
}

/// A model directory assembled from a fixture tokenizer and the given extra files.
fn model_dir(files: &[(&str, String)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        fixture("llava-tiny-hub/tokenizer.json"),
        dir.path().join("tokenizer.json"),
    )
    .unwrap();
    for (name, text) in files {
        std::fs::write(dir.path().join(name), text).unwrap();
    }
    dir
}

#[test]
fn chat_template_sources_and_special_tokens() {
    let q = "Q?";
    // nothing but tokenizer.json: built-in llava-1.5 template, LLaMA specials unknown → none
    let d = model_dir(&[]);
    let p = Prompter::from_dir(d.path(), None).unwrap();
    assert_eq!(p.template_source(), &TemplateSource::Default);
    assert_eq!(
        p.render_question(q, true).unwrap(),
        "USER: <image>\nQ? ASSISTANT:"
    );
    assert_eq!(p.image_token_id(), Some(420)); // "<image>" is in the vocabulary
    let err = format!(
        "{:#}",
        p.encode_batch_left_padded(&["a".to_string()], 1)
            .unwrap_err()
    );
    assert!(err.contains("pad token"), "{err}");

    // tokenizer_config.json: list-form template, AddedToken-style special tokens
    let tc = json!({
        "tokenizer_class": "LlamaTokenizer",
        "bos_token": {"content": "<s>", "lstrip": false, "__type": "AddedToken"},
        "eos_token": "</s>",
        "pad_token": {"content": "<pad>"},
        "chat_template": [
            {"name": "tool_use", "template": "TOOLS"},
            {"name": "default", "template": "{{ bos_token }}[{{ messages[0]['content'][-1]['text'] }}]{{ eos_token }}"}
        ]
    });
    let d = model_dir(&[("tokenizer_config.json", tc.to_string())]);
    let p = Prompter::from_dir(d.path(), None).unwrap();
    assert!(
        matches!(p.template_source(), TemplateSource::File(f) if f.ends_with("tokenizer_config.json"))
    );
    assert_eq!(p.render_question(q, false).unwrap(), "<s>[Q?]</s>");
    assert_eq!(
        (p.bos_token_id(), p.eos_token_id(), p.pad_token_id()),
        (Some(1), Some(2), Some(421))
    );
    let special = p.special_tokens();
    assert_eq!(
        special,
        &SpecialTokens {
            bos: Some("<s>".into()),
            eos: Some("</s>".into()),
            unk: Some("<unk>".into()),
            pad: Some("<pad>".into())
        }
    );

    // The order of transformers 5's processor (get_processor_dict): processor_config.json's key,
    // then the legacy chat_template.json, then chat_template.jinja; tokenizer_config.json last.
    let d = model_dir(&[
        ("tokenizer_config.json", tc.to_string()),
        (
            "chat_template.jinja",
            "jinja:{{ add_generation_prompt }}\n".to_string(),
        ),
    ]);
    let p = Prompter::from_dir(d.path(), None).unwrap();
    assert_eq!(p.render_question(q, false).unwrap(), "jinja:True");
    // An empty chat_template.jinja is no template (transformers passes over it).
    let d = model_dir(&[
        (
            "tokenizer_config.json",
            json!({"chat_template": "tc"}).to_string(),
        ),
        ("chat_template.jinja", " \n".to_string()),
    ]);
    let p = Prompter::from_dir(d.path(), None).unwrap();
    assert_eq!(p.render_question(q, false).unwrap(), "tc");
    let d = model_dir(&[
        ("tokenizer_config.json", tc.to_string()),
        (
            "chat_template.json",
            json!({"chat_template": "json:{{ messages|length }}"}).to_string(),
        ),
        ("chat_template.jinja", "jinja".to_string()),
    ]);
    let p = Prompter::from_dir(d.path(), None).unwrap();
    assert_eq!(p.render_question(q, false).unwrap(), "json:1");
    let d = model_dir(&[
        ("tokenizer_config.json", tc.to_string()),
        (
            "processor_config.json",
            json!({"chat_template": "key"}).to_string(),
        ),
        (
            "chat_template.json",
            json!({"chat_template": "json"}).to_string(),
        ),
        ("chat_template.jinja", "jinja".to_string()),
    ]);
    let p = Prompter::from_dir(d.path(), None).unwrap();
    assert_eq!(p.render_question(q, false).unwrap(), "key");
    let p = p.with_chat_template("inline").unwrap();
    assert_eq!(p.render(&json!([]), false).unwrap(), "inline");

    // legacy special_tokens_map.json (no added_tokens_decoder in tokenizer_config.json)
    let d = model_dir(&[(
        "special_tokens_map.json",
        json!({"pad_token": {"content": "<unk>"}, "eos_token": "</s>"}).to_string(),
    )]);
    let p = Prompter::from_dir(d.path(), None).unwrap();
    assert_eq!(p.pad_token_id(), Some(0));

    // an explicit image token must exist
    let d = model_dir(&[]);
    assert!(Prompter::from_dir(d.path(), Some("<img>")).is_err());
    let p = Prompter::from_dir(d.path(), Some("<pad>")).unwrap();
    assert_eq!(p.image_token_id(), Some(421));

    // a broken template names its file
    let d = model_dir(&[("chat_template.jinja", "{% for %}".to_string())]);
    let err = format!("{:#}", Prompter::from_dir(d.path(), None).unwrap_err());
    assert!(err.contains("chat_template.jinja"), "{err}");
}

/// A hub tokenizer.json with the legacy SentencePiece normaliser (Prepend "▁" + Replace) is
/// rebuilt for `LlamaTokenizer` the way transformers 5 rebuilds it, so ids match transformers
/// rather than the raw file.
#[test]
fn legacy_llama_normalizer_is_rebuilt() {
    let mut tj: Value = serde_json::from_str(
        &std::fs::read_to_string(fixture("llava-tiny-hub/tokenizer.json")).unwrap(),
    )
    .unwrap();
    tj["normalizer"] = json!({"type": "Sequence", "normalizers": [
        {"type": "Prepend", "prepend": "▁"},
        {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}
    ]});
    tj["pre_tokenizer"] = Value::Null;
    let tc =
        json!({"tokenizer_class": "LlamaTokenizerFast", "legacy": false, "pad_token": "<pad>"});
    let d = tempfile::tempdir().unwrap();
    std::fs::write(d.path().join("tokenizer.json"), tj.to_string()).unwrap();
    std::fs::write(d.path().join("tokenizer_config.json"), tc.to_string()).unwrap();
    let p = Prompter::from_dir(d.path(), None).unwrap();
    let want = Prompter::from_dir(&fixture("llava-tiny-hub"), None).unwrap();
    let text = "USER: <image>\nWhat color is the circle? ASSISTANT:";
    assert_eq!(p.encode(text, 25).unwrap(), want.encode(text, 25).unwrap());
    // without the class the file is used as it is (legacy: "▁" before the "\n")
    std::fs::write(d.path().join("tokenizer_config.json"), "{}").unwrap();
    let raw = Prompter::from_dir(d.path(), None).unwrap();
    assert_ne!(
        raw.encode(text, 25).unwrap(),
        want.encode(text, 25).unwrap()
    );
}

/// A LLaVA checkpoint whose tokenizer.json has the legacy LLaMA normaliser (Prepend "▁" +
/// Replace, no pre-tokeniser), as older hub files do: transformers 5.24 loads a LLaVA's tokenizer
/// with the file as it is (TokenizersBackend; checked: `AutoProcessor` gives `<image>…, ▁, \n, …`
/// where `LlamaTokenizer` would drop the `▁`), so the ids are the raw `tokenizers` file's, with
/// the `▁` after the image tokens that LLaVA-1.5 was trained with.
#[test]
fn a_llava_tokenizer_with_the_legacy_normaliser_is_used_as_it_is() {
    let dir = tempfile::tempdir().unwrap();
    let src = fixture("llava-tiny-hub");
    for entry in std::fs::read_dir(&src).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, dir.path().join(path.file_name().unwrap())).unwrap();
    }
    let path = dir.path().join("tokenizer.json");
    let mut tj: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    tj["normalizer"] = json!({"type": "Sequence", "normalizers": [
        {"type": "Prepend", "prepend": "▁"},
        {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]});
    tj["pre_tokenizer"] = Value::Null;
    std::fs::write(&path, tj.to_string()).unwrap();
    let raw = tokenizers::Tokenizer::from_file(&path).unwrap();

    let p = Prompter::from_dir(dir.path(), None).unwrap();
    let question = "What is it?";
    let ids = p.encode_question(question, true, 3, None).unwrap();
    let prompt = p
        .expand_image_tokens(&p.render_question(question, true).unwrap(), 3)
        .unwrap();
    assert_eq!(ids, raw.encode(prompt.as_str(), true).unwrap().get_ids());
    let image = p.image_token_id().unwrap();
    let after = ids.iter().rposition(|&t| t == image).unwrap() + 1;
    assert_eq!(raw.id_to_token(ids[after]).as_deref(), Some("▁"), "{ids:?}");
}
