//! Tokenizer and chat template: from a question and an image to input ids.
//!
//! [`Prompter`] mirrors what `transformers` does with a `LlavaProcessor` / `CLIPProcessor`:
//!
//! * the chat template is rendered like `apply_chat_template` (Jinja with `trim_blocks` and
//!   `lstrip_blocks`, `raise_exception`, `strftime_now`, a Python-style `tojson`, Python string
//!   methods through `minijinja-contrib`'s `pycompat`, and `{% generation %}` accepted);
//! * each `<image>` is expanded in the TEXT to one token per image feature before tokenising;
//! * text is tokenised with `tokenizer.json` and special tokens added by its post-processor.
//!   For a `LlamaTokenizer` outside a LLaVA checkpoint the normaliser / pre-tokeniser / decoder
//!   are rebuilt the way `transformers` 5's `LlamaTokenizer` rebuilds them (a Metaspace
//!   pre-tokeniser instead of the legacy normaliser some hub files carry); a LLaVA checkpoint's
//!   file is used as it is, as `transformers` loads it, so ids match `transformers`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use minijinja::value::{Kwargs, Value as JValue};
use minijinja::{Environment, Error as JError, ErrorKind as JErrorKind};
use serde_json::{json, Value};
use tokenizers::{Tokenizer, TruncationDirection, TruncationParams, TruncationStrategy};

/// The llava-1.5 chat template (as `llava-hf/llava-1.5-7b-hf` ships it), used when a model has
/// no chat template of its own.
pub const DEFAULT_CHAT_TEMPLATE: &str = include_str!("../../prompts/llava-1.5.jinja");

/// The image placeholder of LLaVA checkpoints.
pub const DEFAULT_IMAGE_TOKEN: &str = "<image>";

const TEMPLATE_NAME: &str = "chat";

/// The longest user text (a question or an answer), in bytes, that is tokenised at all. Longer
/// text is refused before tokenising; what passes is then checked in tokens against the model's
/// positions (see [`Prompter::encode_question`]).
pub const MAX_USER_TEXT_BYTES: usize = 64 * 1024;

/// Rendered in place of the question to find where the user's text lies in the prompt (private-use
/// characters, which no chat template produces and no question needs).
const QUESTION_MARKER: &str = "\u{E000}bella-question\u{E001}";

/// The first of the characters that stand in for the template's special tokens while a prompt
/// with user text holding special-token strings is tokenised (supplementary private-use plane A,
/// one character per special token).
const FIRST_STAND_IN: u32 = 0xF0000;

/// The question as asked, without the blanks around it; `None` when nothing visible is left
/// (blanks, control characters or invisible ones alone: a pasted U+200B, byte-order mark or
/// Mongolian vowel separator asks nothing). Every path from a question to tokens goes through
/// it, so training, `ask`, `bench` and `serve` read the same text.
pub fn visible_question(text: &str) -> Option<&str> {
    let invisible = |c: char| c.is_whitespace() || c.is_control() || is_default_ignorable(c);
    let text = text.trim();
    (!text.chars().all(invisible)).then_some(text)
}

/// Unicode's Default_Ignorable_Code_Point (DerivedCoreProperties.txt, Unicode 15.1): characters
/// that render as nothing (zero-width spaces and joiners, directional marks, variation
/// selectors, the soft hyphen, Hangul fillers, tags).
fn is_default_ignorable(c: char) -> bool {
    matches!(
        c,
        '\u{00AD}'
            | '\u{034F}'
            | '\u{061C}'
            | '\u{115F}'..='\u{1160}'
            | '\u{17B4}'..='\u{17B5}'
            | '\u{180B}'..='\u{180F}'
            | '\u{200B}'..='\u{200F}'
            | '\u{202A}'..='\u{202E}'
            | '\u{2060}'..='\u{206F}'
            | '\u{3164}'
            | '\u{FE00}'..='\u{FE0F}'
            | '\u{FEFF}'
            | '\u{FFA0}'
            | '\u{FFF0}'..='\u{FFF8}'
            | '\u{1BCA0}'..='\u{1BCA3}'
            | '\u{1D173}'..='\u{1D17A}'
            | '\u{E0000}'..='\u{E0FFF}'
    )
}

/// Refuses user text longer than [`MAX_USER_TEXT_BYTES`], or holding a character reserved as a
/// stand-in.
pub(crate) fn check_user_text(what: &str, text: &str) -> Result<()> {
    use crate::error::QuestionError::Unusable;
    if text.len() > MAX_USER_TEXT_BYTES {
        return Err(Unusable(format!(
            "the {what} is {} bytes long; at most {MAX_USER_TEXT_BYTES} bytes are accepted",
            text.len()
        ))
        .into());
    }
    if let Some(c) = text
        .chars()
        .find(|&c| (FIRST_STAND_IN..FIRST_STAND_IN + 0x100).contains(&u32::from(c)))
    {
        return Err(Unusable(format!(
            "the {what} holds the private-use character U+{:X}, which bella-vqa reserves for \
             tokenising: remove it",
            u32::from(c)
        ))
        .into());
    }
    Ok(())
}

/// One CLIP text as ids with [`Prompter::clip_tokenizer`]'s `tk`; without `truncate`, a text
/// longer than `max_len` is refused (see [`Prompter::encode_clip_batch`]).
fn encode_clip_text(tk: &Tokenizer, t: &str, max_len: usize, truncate: bool) -> Result<Vec<u32>> {
    check_user_text("text", t)?;
    let e = tk
        .encode(t, true)
        .map_err(|e| anyhow!("tokenizing failed: {e}"))?;
    if !truncate && !e.get_overflowing().is_empty() {
        let shown: String = t.chars().take(120).collect();
        let cut = if shown.len() < t.len() { "…" } else { "" };
        bail!(
            "{shown:?}{cut} is longer than the {max_len} tokens CLIP's text encoder reads, so its \
             end would be cut off: shorten the question or the answer"
        );
    }
    Ok(e.get_ids().to_vec())
}

/// A special token of the template and the character that stands in for it in the text
/// tokenizer (see [`Prompter::encode_question`]).
#[derive(Clone, Debug)]
struct StandIn {
    token: String,
    token_id: u32,
    stand_in: String,
    stand_in_id: u32,
}

/// `(input_ids, attention_mask)` of a padded batch, one row per text.
pub type IdsAndMasks = (Vec<Vec<u32>>, Vec<Vec<u32>>);

/// What a LLaVA without a chat template of its own is prompted with, in words (warnings, inspect).
pub const NO_TEMPLATE: &str =
    "the built-in LLaVA-1.5 template (USER: <image>\\n{question} ASSISTANT:)";

/// Where a [`Prompter`]'s chat template came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TemplateSource {
    /// `chat_template.jinja`, `chat_template.json`, `processor_config.json` or
    /// `tokenizer_config.json` in the model directory.
    File(PathBuf),
    /// The built-in llava-1.5 template ([`DEFAULT_CHAT_TEMPLATE`]).
    Default,
    /// Given in code.
    Inline,
}

/// Replaces the `transformers`-only `{% generation %}` / `{% endgeneration %}` tags (which
/// minijinja rejects) by `{% if true %}` / `{% endif %}`, keeping their content and their
/// whitespace-control markers, so the rendered text is unchanged.
pub fn strip_generation_tags(src: &str) -> String {
    let mut out = String::with_capacity(src.len());
    let mut rest = src;
    while let Some(pos) = rest.find("{%") {
        out.push_str(&rest[..pos]);
        let tag = &rest[pos..];
        if let Some((replacement, len)) = parse_generation_tag(tag) {
            out.push_str(&replacement);
            rest = &tag[len..];
        } else {
            out.push_str("{%");
            rest = &tag[2..];
        }
    }
    out.push_str(rest);
    out
}

/// If `tag` starts with a generation tag, its replacement and its length in bytes.
fn parse_generation_tag(tag: &str) -> Option<(String, usize)> {
    let b = tag.as_bytes();
    let mut i = 2;
    let ctrl = |c: u8| c == b'-' || c == b'+';
    let open = if i < b.len() && ctrl(b[i]) {
        i += 1;
        &tag[i - 1..i]
    } else {
        ""
    };
    while i < b.len() && b[i].is_ascii_whitespace() {
        i += 1;
    }
    let start = i;
    while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_') {
        i += 1;
    }
    let keyword = match &tag[start..i] {
        "generation" => "if true",
        "endgeneration" => "endif",
        _ => return None,
    };
    while i < b.len() && b[i].is_ascii_whitespace() {
        i += 1;
    }
    let close = if i < b.len() && ctrl(b[i]) {
        i += 1;
        &tag[i - 1..i]
    } else {
        ""
    };
    if !tag[i..].starts_with("%}") {
        return None;
    }
    Some((format!("{{%{open} {keyword} {close}%}}"), i + 2))
}

/// A compiled chat template with the environment `transformers` renders chat templates in.
pub struct ChatTemplate {
    env: Environment<'static>,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate").finish_non_exhaustive()
    }
}

impl ChatTemplate {
    /// Compiles a Jinja chat template (after [`strip_generation_tags`]).
    pub fn new(source: &str) -> Result<Self> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_keep_trailing_newline(false);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        env.add_template_owned(TEMPLATE_NAME, strip_generation_tags(source))
            .map_err(|e| {
                anyhow!(
                    "the chat template does not compile: {}",
                    describe_jinja_error(&e)
                )
            })?;
        Ok(Self { env })
    }

    /// Renders `messages` (a JSON list of `{"role", "content"}`) like
    /// `apply_chat_template(messages, add_generation_prompt=..., tokenize=False)`; `special_tokens`
    /// are the tokenizer's named special tokens (`bos_token`, `eos_token`, …), visible to the
    /// template as variables.
    pub fn render(
        &self,
        messages: &Value,
        add_generation_prompt: bool,
        special_tokens: &BTreeMap<String, String>,
    ) -> Result<String> {
        if !messages.is_array() {
            bail!("chat messages must be a JSON list of {{\"role\", \"content\"}} objects, got {messages}");
        }
        let mut ctx: BTreeMap<String, JValue> = special_tokens
            .iter()
            .map(|(k, v)| (k.clone(), JValue::from(v.as_str())))
            .collect();
        ctx.insert("messages".into(), JValue::from_serialize(messages));
        ctx.insert(
            "add_generation_prompt".into(),
            JValue::from(add_generation_prompt),
        );
        ctx.insert("tools".into(), JValue::from(()));
        ctx.insert("documents".into(), JValue::from(()));
        let tmpl = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(|e| anyhow!("chat template: {}", describe_jinja_error(&e)))?;
        tmpl.render(JValue::from_serialize(&ctx)).map_err(|e| {
            anyhow!(
                "rendering the chat template failed: {}",
                describe_jinja_error(&e)
            )
        })
    }
}

fn describe_jinja_error(e: &JError) -> String {
    let mut s = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(inner) = src {
        s.push_str(&format!(": {inner}"));
        src = inner.source();
    }
    s
}

fn raise_exception(message: String) -> std::result::Result<JValue, JError> {
    Err(JError::new(
        JErrorKind::InvalidOperation,
        format!("raise_exception: {message}"),
    ))
}

/// `strftime_now(format)`: the current UTC time, with the common `strftime` codes.
fn strftime_now(format: String) -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    strftime_utc(secs, &format)
}

/// Formats a Unix time (UTC) with `%Y %y %m %d %e %H %I %M %S %p %b %B %a %A %j %%` (and the
/// glibc `%-d`, `%-m`, `%-H`, `%-I`, `%-M`, `%-S`, `%-j` forms).
pub fn strftime_utc(unix_secs: i64, format: &str) -> String {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    const DAYS: [&str; 7] = [
        "Monday",
        "Tuesday",
        "Wednesday",
        "Thursday",
        "Friday",
        "Saturday",
        "Sunday",
    ];
    let days = unix_secs.div_euclid(86_400);
    let sod = unix_secs.rem_euclid(86_400);
    let (hour, minute, second) = (sod / 3600, (sod % 3600) / 60, sod % 60);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy_mar = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy_mar + 2) / 153;
    let day = doy_mar - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
    let cum = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334];
    let yday = cum[(month - 1) as usize] + day + i64::from(leap && month > 2);
    let weekday = (days + 3).rem_euclid(7) as usize; // 1970-01-01 was a Thursday
    let hour12 = if hour % 12 == 0 { 12 } else { hour % 12 };
    let mut out = String::new();
    let mut chars = format.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let no_pad = chars.peek() == Some(&'-');
        if no_pad {
            chars.next();
        }
        let num = |v: i64, width: usize| {
            if no_pad {
                v.to_string()
            } else {
                format!("{v:0width$}")
            }
        };
        match chars.next() {
            Some('Y') => out.push_str(&year.to_string()),
            Some('y') => out.push_str(&num(year.rem_euclid(100), 2)),
            Some('m') => out.push_str(&num(month, 2)),
            Some('d') => out.push_str(&num(day, 2)),
            Some('e') => out.push_str(&format!("{day:2}")),
            Some('H') => out.push_str(&num(hour, 2)),
            Some('I') => out.push_str(&num(hour12, 2)),
            Some('M') => out.push_str(&num(minute, 2)),
            Some('S') => out.push_str(&num(second, 2)),
            Some('j') => out.push_str(&num(yday, 3)),
            Some('p') => out.push_str(if hour < 12 { "AM" } else { "PM" }),
            Some('b') => out.push_str(&MONTHS[(month - 1) as usize][..3]),
            Some('B') => out.push_str(MONTHS[(month - 1) as usize]),
            Some('a') => out.push_str(&DAYS[weekday][..3]),
            Some('A') => out.push_str(DAYS[weekday]),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                if no_pad {
                    out.push('-');
                }
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

/// `tojson` as `transformers` defines it: Python's `json.dumps(x, ensure_ascii=False,
/// indent=None, separators=None, sort_keys=False)` (no HTML escaping, `", "` and `": "`
/// separators).
fn tojson(value: JValue, kwargs: Kwargs) -> std::result::Result<String, JError> {
    let ensure_ascii: Option<bool> = kwargs.get("ensure_ascii")?;
    let indent: Option<JValue> = kwargs.get("indent")?;
    let separators: Option<JValue> = kwargs.get("separators")?;
    let _sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    kwargs.assert_all_used()?;
    let indent = match indent {
        None => None,
        Some(v) if v.is_none() || v.is_undefined() => None,
        Some(v) => {
            if let Some(s) = v.as_str() {
                Some(s.to_string())
            } else {
                let n = i64::try_from(v.clone()).map_err(|_| {
                    JError::new(
                        JErrorKind::InvalidOperation,
                        "tojson: indent must be an integer",
                    )
                })?;
                Some(" ".repeat(n.max(0) as usize))
            }
        }
    };
    let (item_sep, key_sep) = match separators {
        Some(v) if !v.is_none() && !v.is_undefined() => {
            let parts: Vec<String> = v
                .try_iter()?
                .map(|x| x.as_str().map(str::to_string))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| {
                    JError::new(
                        JErrorKind::InvalidOperation,
                        "tojson: separators must be strings",
                    )
                })?;
            if parts.len() != 2 {
                return Err(JError::new(
                    JErrorKind::InvalidOperation,
                    "tojson: separators must be a pair",
                ));
            }
            (parts[0].clone(), parts[1].clone())
        }
        _ => (
            (if indent.is_some() { "," } else { ", " }).to_string(),
            ": ".to_string(),
        ),
    };
    let json = serde_json::to_value(&value)
        .map_err(|e| JError::new(JErrorKind::InvalidOperation, format!("tojson: {e}")))?;
    let mut out = String::new();
    let opts = DumpOptions {
        indent: indent.as_deref(),
        item_sep: &item_sep,
        key_sep: &key_sep,
        ensure_ascii: ensure_ascii.unwrap_or(false),
    };
    python_json_dump(&json, &opts, 0, &mut out);
    Ok(out)
}

struct DumpOptions<'a> {
    indent: Option<&'a str>,
    item_sep: &'a str,
    key_sep: &'a str,
    ensure_ascii: bool,
}

fn python_json_dump(v: &Value, o: &DumpOptions<'_>, level: usize, out: &mut String) {
    let newline = |out: &mut String, level: usize| {
        if let Some(ind) = o.indent {
            out.push('\n');
            for _ in 0..level {
                out.push_str(ind);
            }
        }
    };
    match v {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => out.push_str(&n.to_string()),
        Value::String(s) => python_json_string(s, o.ensure_ascii, out),
        Value::Array(a) => {
            if a.is_empty() {
                out.push_str("[]");
                return;
            }
            out.push('[');
            for (i, x) in a.iter().enumerate() {
                if i > 0 {
                    out.push_str(o.item_sep);
                }
                newline(out, level + 1);
                python_json_dump(x, o, level + 1, out);
            }
            newline(out, level);
            out.push(']');
        }
        Value::Object(m) => {
            if m.is_empty() {
                out.push_str("{}");
                return;
            }
            out.push('{');
            for (i, (k, x)) in m.iter().enumerate() {
                if i > 0 {
                    out.push_str(o.item_sep);
                }
                newline(out, level + 1);
                python_json_string(k, o.ensure_ascii, out);
                out.push_str(o.key_sep);
                python_json_dump(x, o, level + 1, out);
            }
            newline(out, level);
            out.push('}');
        }
    }
}

fn python_json_string(s: &str, ensure_ascii: bool, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c if ensure_ascii && (c as u32) > 0x7e => {
                let mut buf = [0u16; 2];
                for unit in c.encode_utf16(&mut buf) {
                    out.push_str(&format!("\\u{unit:04x}"));
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// The named special tokens of a tokenizer, as strings.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SpecialTokens {
    /// Beginning of sequence.
    pub bos: Option<String>,
    /// End of sequence.
    pub eos: Option<String>,
    /// Unknown.
    pub unk: Option<String>,
    /// Padding.
    pub pad: Option<String>,
}

impl SpecialTokens {
    /// The variables a chat template sees (`bos_token`, `eos_token`, `unk_token`, `pad_token`).
    pub fn template_variables(&self) -> BTreeMap<String, String> {
        let mut m = BTreeMap::new();
        for (k, v) in [
            ("bos_token", &self.bos),
            ("eos_token", &self.eos),
            ("unk_token", &self.unk),
            ("pad_token", &self.pad),
        ] {
            if let Some(v) = v {
                m.insert(k.to_string(), v.clone());
            }
        }
        m
    }
}

/// What `processor_config.json` says about image tokens (LLaVA).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProcessorInfo {
    /// The vision tower's patch size.
    pub patch_size: Option<usize>,
    /// Extra tokens the vision tower adds (1 for CLIP's CLS token).
    pub num_additional_image_tokens: usize,
    /// `"default"` drops the CLS feature, `"full"` keeps it.
    pub vision_feature_select_strategy: Option<String>,
}

impl ProcessorInfo {
    /// `LlavaProcessor`'s count: `(h / patch) * (w / patch) + num_additional_image_tokens`, minus
    /// one with the `"default"` strategy. `None` without a patch size.
    pub fn num_image_tokens(&self, height: usize, width: usize) -> Option<usize> {
        let p = self.patch_size.filter(|&p| p > 0)?;
        let mut n = (height / p) * (width / p) + self.num_additional_image_tokens;
        if self.vision_feature_select_strategy.as_deref() == Some("default") {
            n = n.saturating_sub(1);
        }
        Some(n)
    }
}

/// Tokenizer + chat template of one model directory.
pub struct Prompter {
    tokenizer: Tokenizer,
    /// The same tokenizer with special-token parsing off, and a stand-in token for each special
    /// token: user text goes through it.
    text_tokenizer: Tokenizer,
    stand_ins: Vec<StandIn>,
    /// The strings of the tokenizer's added tokens (`<s>`, `</s>`, `<image>`, …).
    added_tokens: Vec<String>,
    /// The model's positions: longer prompts are refused before the model sees them.
    max_positions: Option<usize>,
    template: ChatTemplate,
    template_source: TemplateSource,
    special: SpecialTokens,
    bos_id: Option<u32>,
    eos_id: Option<u32>,
    pad_id: Option<u32>,
    image_token: Option<String>,
    image_token_id: Option<u32>,
    processor: ProcessorInfo,
    strip_word_suffix: Option<String>,
}

impl std::fmt::Debug for Prompter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Prompter")
            .field("template_source", &self.template_source)
            .field("special", &self.special)
            .field("bos_id", &self.bos_id)
            .field("eos_id", &self.eos_id)
            .field("pad_id", &self.pad_id)
            .field("image_token", &self.image_token)
            .field("image_token_id", &self.image_token_id)
            .finish_non_exhaustive()
    }
}

fn read_json_opt(path: &Path) -> Result<Option<Value>> {
    if !path.exists() {
        return Ok(None);
    }
    let text = crate::input::read_to_string(path, "tokenizer or processor config")?;
    let v = serde_json::from_str(&text)
        .with_context(|| format!("{} is not valid JSON", path.display()))?;
    Ok(Some(v))
}

/// A token given as `"<s>"` or as `{"content": "<s>", ...}` (an `AddedToken`).
fn token_string(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(str::to_string),
        _ => None,
    }
}

/// The tokenizer family, from `tokenizer_config.json`'s `tokenizer_class` (or `config.json`),
/// and whether the class was named explicitly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Family {
    Llama,
    Clip,
    Other,
}

fn family_of(tokenizer_config: Option<&Value>, model_config: Option<&Value>) -> (Family, bool) {
    if let Some(class) = tokenizer_config
        .and_then(|c| c.get("tokenizer_class"))
        .and_then(Value::as_str)
    {
        let class = class.trim_end_matches("Fast");
        return match class {
            "LlamaTokenizer" => (Family::Llama, true),
            "CLIPTokenizer" => (Family::Clip, true),
            _ => (Family::Other, true),
        };
    }
    let model_type = model_config
        .and_then(|c| {
            c.get("text_config")
                .and_then(|t| t.get("model_type"))
                .or_else(|| c.get("model_type"))
        })
        .and_then(Value::as_str);
    match model_type {
        Some("llama") | Some("llava") => (Family::Llama, false),
        Some("clip") | Some("clip_text_model") => (Family::Clip, false),
        _ => (Family::Other, false),
    }
}

/// Rebuilds the parts of a LLaMA `tokenizer.json` that `transformers` 5's `LlamaTokenizer`
/// replaces: no normaliser, a Metaspace pre-tokeniser (`prepend_scheme` "first" unless
/// `legacy`), the SentencePiece-style decoder.
fn patch_llama_tokenizer_json(tj: &mut Value, tokenizer_config: Option<&Value>) {
    let get_bool = |k: &str| {
        tokenizer_config
            .and_then(|c| c.get(k))
            .and_then(Value::as_bool)
    };
    let add_prefix_space = get_bool("add_prefix_space").unwrap_or(true);
    let legacy = get_bool("legacy").unwrap_or(false);
    let scheme = match (add_prefix_space, legacy) {
        (false, _) => "never",
        (true, true) => "always",
        (true, false) => "first",
    };
    tj["normalizer"] = Value::Null;
    tj["pre_tokenizer"] =
        json!({"type": "Metaspace", "replacement": "▁", "prepend_scheme": scheme, "split": false});
    let mut decoders = vec![
        json!({"type": "Replace", "pattern": {"String": "▁"}, "content": " "}),
        json!({"type": "ByteFallback"}),
        json!({"type": "Fuse"}),
    ];
    if add_prefix_space {
        decoders.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
    }
    tj["decoder"] = json!({"type": "Sequence", "decoders": decoders});
    if let Some(model) = tj.get_mut("model").and_then(Value::as_object_mut) {
        if model.get("type").and_then(Value::as_str) == Some("BPE") {
            model.insert("fuse_unk".into(), Value::Bool(true));
            model.insert("byte_fallback".into(), Value::Bool(true));
            model.insert("dropout".into(), Value::Null);
        }
    }
}

fn vocab_id(tj: &Value, token: &str) -> Option<u32> {
    if let Some(added) = tj.get("added_tokens").and_then(Value::as_array) {
        for t in added {
            if t.get("content").and_then(Value::as_str) == Some(token) {
                return t
                    .get("id")
                    .and_then(Value::as_u64)
                    .and_then(|i| u32::try_from(i).ok());
            }
        }
    }
    tj.get("model")
        .and_then(|m| m.get("vocab"))
        .and_then(|v| v.get(token))
        .and_then(Value::as_u64)
        .and_then(|i| u32::try_from(i).ok())
}

impl Prompter {
    /// The token with the largest id in the vocabulary (added tokens included), and its id.
    pub fn largest_token_id(&self) -> Option<(String, u32)> {
        self.tokenizer
            .get_vocab(true)
            .into_iter()
            .max_by_key(|(_, id)| *id)
    }

    /// Loads `tokenizer.json` (required), the chat template and the special tokens of a model
    /// directory. `image_token` overrides the image placeholder (default: `processor_config.json`'s
    /// `image_token`, else `<image>` when the vocabulary has it).
    pub fn from_dir(dir: &Path, image_token: Option<&str>) -> Result<Self> {
        let tokenizer_path = dir.join("tokenizer.json");
        if !tokenizer_path.exists() {
            bail!(
                "no tokenizer.json in {}: prompting needs the model's tokenizer.json (the \"fast\" \
                 tokenizer file that transformers saves)",
                dir.display()
            );
        }
        let tokenizer_config = read_json_opt(&dir.join("tokenizer_config.json"))?;
        let special_map = read_json_opt(&dir.join("special_tokens_map.json"))?;
        let processor_config = read_json_opt(&dir.join("processor_config.json"))?;
        let model_config = read_json_opt(&dir.join("config.json"))?;

        let text = crate::input::read_to_string(&tokenizer_path, "tokenizer")?;
        let mut tj: Value = serde_json::from_str(&text)
            .with_context(|| format!("{} is not valid JSON", tokenizer_path.display()))?;
        if !tj.is_object() {
            bail!(
                "{} is not a tokenizers file (expected a JSON object)",
                tokenizer_path.display()
            );
        }

        // Special tokens: class defaults, then tokenizer_config.json, then (legacy)
        // special_tokens_map.json, then the padding settings of tokenizer.json.
        let (family, explicit_class) = family_of(tokenizer_config.as_ref(), model_config.as_ref());
        let mut special = match family {
            Family::Llama => SpecialTokens {
                bos: Some("<s>".into()),
                eos: Some("</s>".into()),
                unk: Some("<unk>".into()),
                pad: None,
            },
            Family::Clip => SpecialTokens {
                bos: Some("<|startoftext|>".into()),
                eos: Some("<|endoftext|>".into()),
                unk: Some("<|endoftext|>".into()),
                pad: Some("<|endoftext|>".into()),
            },
            Family::Other => SpecialTokens::default(),
        };
        let apply = |special: &mut SpecialTokens, src: &Value| {
            for (key, slot) in [
                ("bos_token", &mut special.bos),
                ("eos_token", &mut special.eos),
                ("unk_token", &mut special.unk),
                ("pad_token", &mut special.pad),
            ] {
                if let Some(v) = src.get(key) {
                    *slot = token_string(v);
                }
            }
        };
        if let Some(tc) = &tokenizer_config {
            apply(&mut special, tc);
        }
        let modern = tokenizer_config
            .as_ref()
            .is_some_and(|c| c.get("added_tokens_decoder").is_some());
        if let (Some(sm), false) = (&special_map, modern) {
            apply(&mut special, sm);
        }
        if special.pad.is_none() {
            special.pad = tj
                .get("padding")
                .and_then(|p| p.get("pad_token"))
                .and_then(token_string);
        }
        // Drop tokens the vocabulary does not have (transformers would add them; we cannot).
        for slot in [
            &mut special.bos,
            &mut special.eos,
            &mut special.unk,
            &mut special.pad,
        ] {
            if slot.as_deref().is_some_and(|t| vocab_id(&tj, t).is_none()) {
                *slot = None;
            }
        }

        // Tokenizer pipeline as transformers builds it: its `LlamaTokenizer` rebuilds the file's
        // pipeline, but LLaVA checkpoints are loaded with the file as it is (`TokenizersBackend`,
        // transformers 5.24's MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS), so a legacy normaliser
        // stays and gives the `▁` after `<image>` that LLaVA-1.5 was trained with.
        let file_as_is = model_config
            .as_ref()
            .and_then(|c| c.get("model_type"))
            .and_then(Value::as_str)
            .is_some_and(|t| matches!(t, "llava" | "llava_next" | "vipllava"));
        if family == Family::Llama && explicit_class && !file_as_is {
            patch_llama_tokenizer_json(&mut tj, tokenizer_config.as_ref());
        }
        // With a tokenizer.json, transformers ignores `add_bos_token` / `add_eos_token` from
        // tokenizer_config.json and keeps the file's post-processor.
        // transformers resets padding and truncation on every call without those arguments.
        tj["padding"] = Value::Null;
        tj["truncation"] = Value::Null;
        let strip_word_suffix = tj
            .get("model")
            .and_then(|m| m.get("end_of_word_suffix"))
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty() && family == Family::Clip)
            .map(str::to_string);
        let tokenizer: Tokenizer = serde_json::from_value(tj).map_err(|e| {
            anyhow!(
                "{} is not a tokenizer file this crate can load: {e}",
                tokenizer_path.display()
            )
        })?;

        // Chat template.
        let (template_src, template_source) =
            find_chat_template(dir, processor_config.as_ref(), tokenizer_config.as_ref())?;
        let template =
            ChatTemplate::new(&template_src).with_context(|| match &template_source {
                TemplateSource::File(p) => format!("chat template from {}", p.display()),
                _ => "the built-in llava-1.5 chat template".to_string(),
            })?;

        // Image token.
        let image_token = match image_token {
            Some(t) => {
                if tokenizer.token_to_id(t).is_none() {
                    bail!(
                        "the image token {t:?} is not in the vocabulary of {}",
                        tokenizer_path.display()
                    );
                }
                Some(t.to_string())
            }
            None => {
                let configured = processor_config
                    .as_ref()
                    .and_then(|c| c.get("image_token"))
                    .or_else(|| tokenizer_config.as_ref().and_then(|c| c.get("image_token")))
                    .and_then(token_string);
                configured
                    .or_else(|| Some(DEFAULT_IMAGE_TOKEN.to_string()))
                    .filter(|t| tokenizer.token_to_id(t).is_some())
            }
        };
        let processor = ProcessorInfo {
            patch_size: processor_config
                .as_ref()
                .and_then(|c| c.get("patch_size"))
                .and_then(Value::as_u64)
                .map(|p| p as usize),
            num_additional_image_tokens: processor_config
                .as_ref()
                .and_then(|c| c.get("num_additional_image_tokens"))
                .and_then(Value::as_u64)
                .unwrap_or(0) as usize,
            vision_feature_select_strategy: processor_config
                .as_ref()
                .and_then(|c| c.get("vision_feature_select_strategy"))
                .and_then(Value::as_str)
                .map(str::to_string),
        };
        Ok(Self::assemble(
            tokenizer,
            template,
            template_source,
            special,
            image_token,
            processor,
            strip_word_suffix,
        ))
    }

    /// A prompter from parts (tests, or models assembled in code). Special token ids are looked up
    /// in `tokenizer`; without a template the built-in llava-1.5 template is used.
    pub fn from_parts(
        tokenizer: Tokenizer,
        chat_template: Option<&str>,
        special: SpecialTokens,
        image_token: Option<&str>,
    ) -> Result<Self> {
        let (template, source) = match chat_template {
            Some(t) => (ChatTemplate::new(t)?, TemplateSource::Inline),
            None => (
                ChatTemplate::new(DEFAULT_CHAT_TEMPLATE)?,
                TemplateSource::Default,
            ),
        };
        let image_token = image_token.map(str::to_string);
        Ok(Self::assemble(
            tokenizer,
            template,
            source,
            special,
            image_token,
            ProcessorInfo::default(),
            None,
        ))
    }

    fn assemble(
        tokenizer: Tokenizer,
        template: ChatTemplate,
        template_source: TemplateSource,
        special: SpecialTokens,
        image_token: Option<String>,
        processor: ProcessorInfo,
        strip_word_suffix: Option<String>,
    ) -> Self {
        let id = |t: &Option<String>| t.as_deref().and_then(|t| tokenizer.token_to_id(t));
        let (bos_id, eos_id, pad_id) = (id(&special.bos), id(&special.eos), id(&special.pad));
        let image_token_id = id(&image_token);
        let mut text_tokenizer = tokenizer.clone();
        text_tokenizer.set_encode_special_tokens(true);
        let mut specials: Vec<(u32, tokenizers::AddedToken)> = tokenizer
            .get_added_tokens_decoder()
            .into_iter()
            .filter(|(_, t)| t.special && !t.content.is_empty())
            .collect();
        specials.sort_by_key(|(id, _)| *id);
        let stand_ins: Vec<StandIn> = specials
            .into_iter()
            .zip((FIRST_STAND_IN..FIRST_STAND_IN + 0x100).filter_map(char::from_u32))
            .filter_map(|((token_id, t), c)| {
                // Not special, so parsed with special tokens off; matched as the token it stands
                // for would be (its whitespace and normalisation flags).
                let stand_in = tokenizers::AddedToken {
                    content: c.to_string(),
                    special: false,
                    ..t.clone()
                };
                text_tokenizer.add_tokens([stand_in]).ok()?;
                Some(StandIn {
                    stand_in_id: text_tokenizer.token_to_id(&c.to_string())?,
                    stand_in: c.to_string(),
                    token: t.content,
                    token_id,
                })
            })
            .collect();
        let added_tokens = tokenizer
            .get_added_tokens_decoder()
            .into_values()
            .map(|t| t.content)
            .filter(|t| !t.is_empty())
            .collect();
        Self {
            tokenizer,
            text_tokenizer,
            stand_ins,
            added_tokens,
            max_positions: None,
            template,
            template_source,
            special,
            bos_id,
            eos_id,
            pad_id,
            image_token,
            image_token_id,
            processor,
            strip_word_suffix,
        }
    }

    /// Refuses prompts longer than `positions` tokens in [`Self::encode_question`] (the model's
    /// `max_position_embeddings`).
    pub fn with_max_positions(mut self, positions: usize) -> Self {
        self.max_positions = Some(positions);
        self
    }

    /// Replaces the chat template.
    pub fn with_chat_template(mut self, template: &str) -> Result<Self> {
        self.template = ChatTemplate::new(template)?;
        self.template_source = TemplateSource::Inline;
        Ok(self)
    }

    /// Renders a conversation like `apply_chat_template(messages, add_generation_prompt=...,
    /// tokenize=False)`.
    pub fn render(&self, messages: &Value, add_generation_prompt: bool) -> Result<String> {
        self.template.render(
            messages,
            add_generation_prompt,
            &self.special.template_variables(),
        )
    }

    /// One user turn (`[{"type": "image"}, {"type": "text", "text": question}]`, or text only)
    /// with the generation prompt, e.g. `"USER: <image>\nWhat is it? ASSISTANT:"` for llava-1.5.
    pub fn render_question(&self, question: &str, with_image: bool) -> Result<String> {
        let mut content = Vec::new();
        if with_image {
            content.push(json!({"type": "image"}));
        }
        content.push(json!({"type": "text", "text": question}));
        self.render(&json!([{"role": "user", "content": content}]), true)
    }

    /// Expands every image token in `text` to `num_image_tokens` copies, as `LlavaProcessor`
    /// does before tokenising. A text without image tokens (or a tokenizer without one) is
    /// returned unchanged.
    pub fn expand_image_tokens(&self, text: &str, num_image_tokens: usize) -> Result<String> {
        let Some(tok) = self.image_token.as_deref() else {
            return Ok(text.to_string());
        };
        if !text.contains(tok) {
            return Ok(text.to_string());
        }
        if num_image_tokens == 0 {
            bail!("the text contains {tok:?} but num_image_tokens is 0 (it must be the number of image features)");
        }
        Ok(text.replace(tok, &tok.repeat(num_image_tokens)))
    }

    /// Token ids of the prompt for one question (the chat template with the generation prompt,
    /// [`Self::render_question`]), followed by `answer` when given (teacher forcing: `"{prompt}
    /// {answer}"`).
    ///
    /// The question and the answer are user text, and user text is text: a question holding
    /// `</s>`, `<image>` or any other added-token string never becomes that token (`transformers`
    /// would turn it into the token; `</s>` would end the prompt). Text without such strings is
    /// tokenised as one string, exactly as `transformers` does. Text with them is tokenised as
    /// one string too, by the tokenizer with special-token parsing off, in which each special
    /// token of the template (image tokens expanded) is replaced by a stand-in: a private-use
    /// character added to that tokenizer as an ordinary token with the special token's flags,
    /// whose id is then replaced by the special token's. So the prompt splits where the template's
    /// special tokens are, as `transformers` splits it, and nowhere in the user's text (tokenising
    /// pieces one by one would give each piece the word-start `▁` of a first piece). Added tokens
    /// that are not special (ordinary words added to a vocabulary) still match.
    ///
    /// User text is refused above [`MAX_USER_TEXT_BYTES`] before tokenising, and the prompt
    /// above the model's positions ([`Self::with_max_positions`]) before any model runs.
    pub fn encode_question(
        &self,
        question: &str,
        with_image: bool,
        num_image_tokens: usize,
        answer: Option<&str>,
    ) -> Result<Vec<u32>> {
        let question = visible_question(question).ok_or(crate::error::QuestionError::Empty)?;
        check_user_text("question", question)?;
        let answer = answer.map(str::trim);
        if let Some(a) = answer {
            check_user_text("answer", a)?;
        }
        let holds_token = |text: &str| {
            self.added_tokens.iter().any(|t| text.contains(t.as_str()))
                || self
                    .image_token
                    .as_deref()
                    .is_some_and(|t| text.contains(t))
        };
        let ids = if holds_token(question) || answer.is_some_and(holds_token) {
            self.encode_user_text_in_pieces(question, with_image, num_image_tokens, answer)?
        } else {
            let prompt = self.render_question(question, with_image)?;
            match answer {
                Some(a) => self.encode(&format!("{prompt} {a}"), num_image_tokens)?,
                None => self.encode(&prompt, num_image_tokens)?,
            }
        };
        if let Some(max) = self.max_positions {
            if ids.len() > max {
                let (what, fix) = match answer {
                    Some(_) => (
                        "prompt with its answer",
                        "shorten the question or the answer",
                    ),
                    None => ("prompt", "shorten the question"),
                };
                return Err(crate::error::QuestionError::Unusable(format!(
                    "the {what} is {} tokens long, more than the model's {max} positions \
                     (max_position_embeddings): {fix}",
                    ids.len()
                ))
                .into());
            }
        }
        Ok(ids)
    }

    /// The slow path of [`Self::encode_question`]: the prompt with the template's special tokens
    /// replaced by their stand-ins, tokenised in one piece with special-token parsing off.
    fn encode_user_text_in_pieces(
        &self,
        question: &str,
        with_image: bool,
        num_image_tokens: usize,
        answer: Option<&str>,
    ) -> Result<Vec<u32>> {
        let marked = self.render_question(QUESTION_MARKER, with_image)?;
        let mut parts = marked.split(QUESTION_MARKER);
        let (Some(before), Some(after), None) = (parts.next(), parts.next(), parts.next()) else {
            bail!(
                "the question holds a special-token string, and the chat template changes the \
                 question text, so it cannot be kept as text: remove the token from the question"
            );
        };
        let mut text = self.with_stand_ins(&self.expand_image_tokens(before, num_image_tokens)?);
        text.push_str(question);
        text.push_str(&self.with_stand_ins(&self.expand_image_tokens(after, num_image_tokens)?));
        if let Some(a) = answer {
            text.push(' ');
            text.push_str(a);
        }
        let encoded = self
            .text_tokenizer
            .encode(text.as_str(), true)
            .map_err(|e| anyhow!("tokenizing failed: {e}"))?;
        Ok(encoded
            .get_ids()
            .iter()
            .map(|&id| {
                self.stand_ins
                    .iter()
                    .find(|s| s.stand_in_id == id)
                    .map_or(id, |s| s.token_id)
            })
            .collect())
    }

    /// Template text with each special-token string replaced by its stand-in (the longest match
    /// first, left to right, as the tokenizer matches added tokens).
    fn with_stand_ins(&self, text: &str) -> String {
        let mut out = String::with_capacity(text.len());
        let mut rest = text;
        while let Some(c) = rest.chars().next() {
            let found = self
                .stand_ins
                .iter()
                .filter(|s| rest.starts_with(s.token.as_str()))
                .max_by_key(|s| s.token.len());
            match found {
                Some(s) => {
                    out.push_str(&s.stand_in);
                    rest = &rest[s.token.len()..];
                }
                None => {
                    out.push(c);
                    rest = &rest[c.len_utf8()..];
                }
            }
        }
        out
    }

    /// Tokens of user text on its own, as text (special-token strings are not tokens here, as in
    /// [`Self::encode_question`]) and with no special tokens added.
    pub fn count_text_tokens(&self, text: &str) -> Result<usize> {
        check_user_text("text", text)?;
        let enc = self
            .text_tokenizer
            .encode(text, false)
            .map_err(|e| anyhow!("tokenizing failed: {e}"))?;
        Ok(enc.len())
    }

    /// Token ids of `text` with its image tokens expanded and special tokens (BOS) added.
    pub fn encode(&self, text: &str, num_image_tokens: usize) -> Result<Vec<u32>> {
        let text = self.expand_image_tokens(text, num_image_tokens)?;
        let enc = self
            .tokenizer
            .encode(text.as_str(), true)
            .map_err(|e| anyhow!("tokenizing failed: {e}"))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Encodes several texts and pads them on the LEFT with the pad token to the longest:
    /// `(input_ids, attention_mask)`, as `tokenizer(texts, padding=True)` with
    /// `padding_side="left"`. Errors if the tokenizer has no pad token.
    pub fn encode_batch_left_padded(
        &self,
        texts: &[String],
        num_image_tokens: usize,
    ) -> Result<IdsAndMasks> {
        let pad = self.pad_id.ok_or_else(|| {
            anyhow!("the tokenizer has no pad token, so a batch cannot be padded")
        })?;
        let encoded = texts
            .iter()
            .map(|t| self.encode(t, num_image_tokens))
            .collect::<Result<Vec<_>>>()?;
        let longest = encoded.iter().map(Vec::len).max().unwrap_or(0);
        let mut ids = Vec::with_capacity(encoded.len());
        let mut masks = Vec::with_capacity(encoded.len());
        for e in encoded {
            let n_pad = longest - e.len();
            let mut row = vec![pad; n_pad];
            row.extend_from_slice(&e);
            let mut mask = vec![0u32; n_pad];
            mask.extend(std::iter::repeat_n(1u32, e.len()));
            ids.push(row);
            masks.push(mask);
        }
        Ok((ids, masks))
    }

    /// CLIP text input: each text with BOS/EOS, truncated to `max_len` tokens (special tokens
    /// kept), padded on the RIGHT to the longest with the pad token, like
    /// `tokenizer(texts, padding=True, truncation=True, max_length=max_len)`, except that
    /// special-token strings inside the texts stay text (see [`Self::encode_question`]).
    /// Without `truncate`, a text longer than `max_len` is refused instead: a question-and-answer
    /// text cut on the right loses its answer, and every answer would score alike.
    pub fn encode_clip_batch(
        &self,
        texts: &[String],
        max_len: usize,
        truncate: bool,
    ) -> Result<IdsAndMasks> {
        let pad = self.pad_id.ok_or_else(|| {
            anyhow!("the tokenizer has no pad token, so a batch cannot be padded")
        })?;
        let tk = self.clip_tokenizer(max_len)?;
        let encoded = texts
            .iter()
            .map(|t| encode_clip_text(&tk, t, max_len, truncate))
            .collect::<Result<Vec<_>>>()?;
        let longest = encoded.iter().map(Vec::len).max().unwrap_or(0);
        let mut ids = Vec::with_capacity(encoded.len());
        let mut masks = Vec::with_capacity(encoded.len());
        for mut e in encoded {
            let n = e.len();
            let mut mask = vec![1u32; n];
            e.resize(longest, pad);
            mask.resize(longest, 0);
            ids.push(e);
            masks.push(mask);
        }
        Ok((ids, masks))
    }

    /// For each of `texts`, why CLIP's text encoder cannot read it whole (longer than `max_len`
    /// tokens, or not acceptable user text), `None` when it can: one check of many texts (a
    /// training set's), the tokenizer set up once.
    pub fn clip_texts_unfit(
        &self,
        texts: &[String],
        max_len: usize,
    ) -> Result<Vec<Option<String>>> {
        let tk = self.clip_tokenizer(max_len)?;
        Ok(texts
            .iter()
            .map(|t| {
                encode_clip_text(&tk, t, max_len, false)
                    .err()
                    .map(|e| format!("{e:#}"))
            })
            .collect())
    }

    /// The tokenizer as CLIP's texts are encoded: truncated to `max_len` tokens, special-token
    /// strings in the texts (questions and answers: user text) read as text.
    fn clip_tokenizer(&self, max_len: usize) -> Result<Tokenizer> {
        let mut tk = self.tokenizer.clone();
        tk.with_truncation(Some(TruncationParams {
            direction: TruncationDirection::Right,
            max_length: max_len,
            strategy: TruncationStrategy::LongestFirst,
            stride: 0,
        }))
        .map_err(|e| anyhow!("cannot truncate to {max_len} tokens: {e}"))?;
        tk.set_encode_special_tokens(true);
        Ok(tk)
    }

    /// Text of `ids` (as `tokenizer.decode`).
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        let text = self
            .tokenizer
            .decode(ids, skip_special_tokens)
            .map_err(|e| anyhow!("decoding failed: {e}"))?;
        Ok(match &self.strip_word_suffix {
            // CLIPTokenizer's decode: the end-of-word suffix becomes a space, then strip.
            Some(suffix) => text.replace(suffix.as_str(), " ").trim().to_string(),
            None => text,
        })
    }

    /// The id of the image placeholder token, if the tokenizer has one.
    pub fn image_token_id(&self) -> Option<u32> {
        self.image_token_id
    }

    /// The image placeholder token string (`<image>`), if the tokenizer has one.
    pub fn image_token(&self) -> Option<&str> {
        self.image_token.as_deref()
    }

    /// BOS id.
    pub fn bos_token_id(&self) -> Option<u32> {
        self.bos_id
    }

    /// EOS id.
    pub fn eos_token_id(&self) -> Option<u32> {
        self.eos_id
    }

    /// Pad id.
    pub fn pad_token_id(&self) -> Option<u32> {
        self.pad_id
    }

    /// The named special tokens.
    pub fn special_tokens(&self) -> &SpecialTokens {
        &self.special
    }

    /// Where the chat template came from.
    pub fn template_source(&self) -> &TemplateSource {
        &self.template_source
    }

    /// `processor_config.json`'s image-token settings (empty when there is none).
    pub fn processor_info(&self) -> &ProcessorInfo {
        &self.processor
    }

    /// The number of image tokens `LlavaProcessor` would expand `<image>` to for pixel values of
    /// `height × width` (from `processor_config.json`); `None` without a patch size there.
    pub fn num_image_tokens(&self, height: usize, width: usize) -> Option<usize> {
        self.processor.num_image_tokens(height, width)
    }

    /// The underlying `tokenizers` tokenizer (padding and truncation disabled).
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }
}

/// Finds the chat template: `processor_config.json`'s `chat_template`, `chat_template.json`,
/// `chat_template.jinja`, `tokenizer_config.json`'s `chat_template` (a string, or a list of
/// `{name, template}` of which "default" is taken), else the built-in template.
fn find_chat_template(
    dir: &Path,
    processor_config: Option<&Value>,
    tokenizer_config: Option<&Value>,
) -> Result<(String, TemplateSource)> {
    // The order of transformers 5's processor (ProcessorMixin.get_processor_dict): a
    // "chat_template" key in processor_config.json, then the legacy chat_template.json, then
    // chat_template.jinja; the tokenizer's own last.
    let key_in = |name: &str, cfg: Option<&Value>| -> Result<Option<(String, TemplateSource)>> {
        let Some(v) = cfg.and_then(|c| c.get("chat_template")) else {
            return Ok(None);
        };
        let path = dir.join(name);
        Ok(template_from_value(v)
            .with_context(|| format!("key \"chat_template\" in {}", path.display()))?
            .map(|t| (t, TemplateSource::File(path))))
    };
    if let Some(found) = key_in("processor_config.json", processor_config)? {
        return Ok(found);
    }
    let json_path = dir.join("chat_template.json");
    if let Some(v) = read_json_opt(&json_path)? {
        let t = template_from_value(v.get("chat_template").unwrap_or(&Value::Null))
            .with_context(|| format!("key \"chat_template\" in {}", json_path.display()))?
            .ok_or_else(|| anyhow!("{} has no \"chat_template\" string", json_path.display()))?;
        return Ok((t, TemplateSource::File(json_path)));
    }
    let jinja = dir.join("chat_template.jinja");
    if jinja.exists() {
        let t = crate::input::read_to_string(&jinja, "chat template")?;
        // An empty file is no template (transformers passes over it too).
        if !t.trim().is_empty() {
            return Ok((t, TemplateSource::File(jinja)));
        }
    }
    if let Some(found) = key_in("tokenizer_config.json", tokenizer_config)? {
        return Ok(found);
    }
    Ok((DEFAULT_CHAT_TEMPLATE.to_string(), TemplateSource::Default))
}

fn template_from_value(v: &Value) -> Result<Option<String>> {
    match v {
        Value::Null => Ok(None),
        Value::String(s) => Ok(Some(s.clone())),
        Value::Array(list) => {
            for item in list {
                if item.get("name").and_then(Value::as_str) == Some("default") {
                    let t = item
                        .get("template")
                        .and_then(Value::as_str)
                        .ok_or_else(|| {
                            anyhow!("the \"default\" entry has no \"template\" string")
                        })?;
                    return Ok(Some(t.to_string()));
                }
            }
            bail!("a list of templates without one named \"default\"")
        }
        other => bail!("expected a string or a list of {{name, template}}, got {other}"),
    }
}
