//! The OpenAI chat-completions schema as this server speaks it: the request (what is accepted,
//! what is refused with a 400), the response and stream chunks with the `bella` extension, and
//! OpenAI's error object.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response as HttpResponse};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::answer::Response;

/// An error as OpenAI returns it: `{"error": {"message", "type", "param", "code"}}` with a status.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
    /// Seconds for a `Retry-After` header (503).
    pub retry_after: Option<u64>,
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            kind,
            param: None,
            code: None,
            retry_after: None,
        }
    }

    /// 400: the request is wrong; `param` names the field.
    pub fn invalid(param: Option<&str>, message: impl Into<String>) -> Self {
        Self {
            param: param.map(String::from),
            ..Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
        }
    }

    /// 400 for a field this server does not support (with the value it was given).
    pub fn unsupported(param: &str, message: impl Into<String>) -> Self {
        Self {
            code: Some("unsupported_parameter"),
            ..Self::invalid(Some(param), message)
        }
    }

    pub fn unauthorized() -> Self {
        Self {
            code: Some("invalid_api_key"),
            ..Self::new(
                StatusCode::UNAUTHORIZED,
                "authentication_error",
                "missing or wrong API key: send `Authorization: Bearer KEY` with the key the server was started with (--api-key)",
            )
        }
    }

    pub fn model_not_found(asked: &str, served: &str) -> Self {
        Self {
            param: Some("model".into()),
            code: Some("model_not_found"),
            ..Self::new(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                format!("the model `{asked}` does not exist: this server serves `{served}` (GET /v1/models)"),
            )
        }
    }

    pub fn not_found(path: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            format!("no route {path}: the API is POST /v1/chat/completions, GET /v1/models, /health, /metrics and the page at /"),
        )
    }

    pub fn method_not_allowed() -> Self {
        Self::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "invalid_request_error",
            "method not allowed for this route",
        )
    }

    /// 499 (nginx's "client closed request") for a request whose client left `when` (nobody
    /// reads it; /metrics and the access log count it): before sending its whole body, or before
    /// its answer where the server was not reading the connection (see `worker::Peer`).
    pub fn client_closed(when: &str) -> Self {
        Self::new(
            StatusCode::from_u16(super::CLIENT_CLOSED).unwrap_or(StatusCode::BAD_REQUEST),
            "invalid_request_error",
            format!("the client closed the connection {when}"),
        )
    }

    pub fn too_large(limit_bytes: usize) -> Self {
        Self {
            code: Some("request_too_large"),
            ..Self::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "invalid_request_error",
                format!(
                    "the request body is larger than {} MB (--max-body-mb); send a smaller image or less text",
                    limit_bytes / (1024 * 1024)
                ),
            )
        }
    }

    /// 503 with `Retry-After`: the queue is full, the model is loading, or the server stops.
    pub fn unavailable(message: impl Into<String>, retry_after: u64) -> Self {
        Self {
            code: Some("overloaded"),
            retry_after: Some(retry_after),
            ..Self::new(StatusCode::SERVICE_UNAVAILABLE, "server_error", message)
        }
    }

    pub fn timeout(seconds: f64) -> Self {
        Self {
            code: Some("timeout"),
            ..Self::new(
                StatusCode::GATEWAY_TIMEOUT,
                "server_error",
                format!("no answer within the request deadline of {seconds:.0} s (--timeout-secs); try again when the server is less busy"),
            )
        }
    }

    /// 408: the client did not send its request body within the deadline.
    pub fn body_timeout(seconds: f64) -> Self {
        Self {
            code: Some("timeout"),
            ..Self::new(
                StatusCode::REQUEST_TIMEOUT,
                "invalid_request_error",
                format!("the request body did not arrive within {seconds:.0} s (--timeout-secs)"),
            )
        }
    }

    /// 413: one image needs more than all the image memory of the server: no retry helps.
    /// A body sent with a `Content-Encoding` (gzip, …): 415.
    pub fn compressed(encoding: &str) -> Self {
        Self {
            code: Some("unsupported_content_encoding"),
            ..Self::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "invalid_request_error",
                format!(
                    "the request body is compressed (Content-Encoding: {encoding}), which this \
                     server does not accept: send the JSON uncompressed"
                ),
            )
        }
    }

    pub fn image_too_large(message: impl Into<String>) -> Self {
        Self {
            code: Some("image_too_large"),
            ..Self::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "invalid_request_error",
                message,
            )
        }
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", message)
    }
}

impl ApiError {
    /// OpenAI's error body: `{"error": {"message", "type", "param", "code"}}`. A message that
    /// quotes a huge value (a whole base64 image given where an object belongs) is cut short.
    pub fn body(&self) -> Value {
        const MAX_MESSAGE: usize = 1000;
        let message = match self.message.char_indices().nth(MAX_MESSAGE) {
            Some((end, _)) => format!("{}… (cut)", &self.message[..end]),
            None => self.message.clone(),
        };
        serde_json::json!({
            "error": {
                "message": message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        })
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> HttpResponse {
        let mut response = (self.status, axum::Json(self.body())).into_response();
        if let Some(secs) = self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}

/// `POST /v1/chat/completions`. Every field OpenAI defines that this server can honour is
/// accepted; the others are accepted only at their neutral value (a 400 names them otherwise);
/// fields OpenAI does not define are refused.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChatRequest {
    #[serde(default)]
    pub model: Option<String>,
    pub messages: Vec<Message>,
    #[serde(default)]
    pub stream: Option<bool>,
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    #[serde(default)]
    pub n: Option<u64>,
    #[serde(default)]
    pub max_tokens: Option<u64>,
    #[serde(default)]
    pub max_completion_tokens: Option<u64>,
    #[serde(default)]
    pub temperature: Option<f64>,
    #[serde(default)]
    pub top_p: Option<f64>,
    /// An integer; a negative one draws a fresh seed, as `-1` does in llama.cpp's server.
    #[serde(default)]
    pub seed: Option<Value>,
    #[serde(default)]
    pub user: Option<String>,
    #[serde(default)]
    pub metadata: Option<Value>,
    #[serde(default)]
    pub store: Option<bool>,
    #[serde(default)]
    pub parallel_tool_calls: Option<bool>,
    /// One tier here: any value is accepted.
    #[serde(default)]
    pub service_tier: Option<String>,
    #[serde(default)]
    pub prompt_cache_key: Option<String>,
    /// No prompt cache here: any value is accepted.
    #[serde(default)]
    pub prompt_cache_retention: Option<String>,
    #[serde(default)]
    pub safety_identifier: Option<String>,
    // Accepted only at their neutral value.
    #[serde(default)]
    pub modalities: Option<Vec<String>>,
    #[serde(default)]
    pub reasoning_effort: Option<Value>,
    #[serde(default)]
    pub verbosity: Option<Value>,
    #[serde(default)]
    pub prediction: Option<Value>,
    #[serde(default)]
    pub audio: Option<Value>,
    #[serde(default)]
    pub web_search_options: Option<Value>,
    /// The deprecated form of `tools` / `tool_choice`.
    #[serde(default)]
    pub functions: Option<Vec<Value>>,
    #[serde(default)]
    pub function_call: Option<Value>,
    #[serde(default)]
    pub stop: Option<Value>,
    #[serde(default)]
    pub frequency_penalty: Option<f64>,
    #[serde(default)]
    pub presence_penalty: Option<f64>,
    /// vLLM's and llama.cpp's sampling extensions, which front ends send with their defaults.
    #[serde(default)]
    pub top_k: Option<i64>,
    #[serde(default)]
    pub min_p: Option<f64>,
    #[serde(default)]
    pub repetition_penalty: Option<f64>,
    #[serde(default)]
    pub logprobs: Option<bool>,
    #[serde(default)]
    pub top_logprobs: Option<u64>,
    #[serde(default)]
    pub logit_bias: Option<serde_json::Map<String, Value>>,
    #[serde(default)]
    pub response_format: Option<Value>,
    #[serde(default)]
    pub tools: Option<Vec<Value>>,
    #[serde(default)]
    pub tool_choice: Option<Value>,
    /// The Bella extension.
    #[serde(default)]
    pub bella: Option<BellaRequest>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
    /// Obfuscation pads chunks against side channels on the public internet; none is sent.
    #[serde(default)]
    pub include_obfuscation: Option<bool>,
}

/// `bella` in a request.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BellaRequest {
    /// Abstain below this score instead of the calibrated rule (threshold and image check), in
    /// [0, 1].
    #[serde(default)]
    pub threshold: Option<f64>,
    /// Append every particle's answer to the message content.
    #[serde(default)]
    pub show_particles: bool,
}

#[derive(Debug, Deserialize)]
pub struct Message {
    pub role: String,
    #[serde(default)]
    pub content: Option<Content>,
}

#[derive(Debug)]
pub enum Content {
    Text(String),
    Parts(Vec<Part>),
}

/// A string or a list of parts, each part's error naming its index and what a part holds. Each
/// part is read from its own JSON text, not from a `Value` (which keeps the last of duplicate
/// keys): a part with a key twice (two texts, two URLs) is refused, as a request with a top-level
/// key twice is, rather than one of them shown to a filter and the other to the model.
impl<'de> Deserialize<'de> for Content {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = Content;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a string or a list of content parts")
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<Content, E> {
                Ok(Content::Text(s.to_string()))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<Content, A::Error> {
                use serde::de::Error;
                let mut parts = Vec::new();
                while let Some(raw) = seq.next_element::<Box<serde_json::value::RawValue>>()? {
                    let part = serde_json::from_str(raw.get()).map_err(|e| {
                        A::Error::custom(format!(
                            "part [{}]: {e}; a part is {{\"type\": \"text\", \"text\": \"…\"}} or \
                             {{\"type\": \"image_url\", \"image_url\": {{\"url\": \"data:image/png;base64,…\"}}}}",
                            parts.len()
                        ))
                    })?;
                    parts.push(part);
                }
                Ok(Content::Parts(parts))
            }
        }
        d.deserialize_any(Visitor)
    }
}

#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Part {
    Text {
        text: String,
    },
    ImageUrl {
        image_url: ImageUrl,
    },
    #[serde(other)]
    Other,
}

#[derive(Debug)]
pub struct ImageUrl {
    pub url: String,
    pub detail: Option<String>,
}

/// `{"url": …, "detail": …}` as OpenAI's API has it, or the URL alone as a string (as vLLM
/// and llama.cpp's server also take it).
impl<'de> Deserialize<'de> for ImageUrl {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        struct Object {
            url: String,
            #[serde(default)]
            detail: Option<String>,
        }
        // A visitor rather than an untagged enum, whose errors say only that neither form fits
        // (a key twice in the object is then named as such).
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = ImageUrl;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a URL, or an object {\"url\": …}")
            }
            fn visit_str<E: serde::de::Error>(self, url: &str) -> Result<ImageUrl, E> {
                Ok(ImageUrl {
                    url: url.to_string(),
                    detail: None,
                })
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<ImageUrl, A::Error> {
                let Object { url, detail } =
                    Object::deserialize(serde::de::value::MapAccessDeserializer::new(map))?;
                Ok(ImageUrl { url, detail })
            }
        }
        d.deserialize_any(Visitor)
    }
}

/// `stop` as OpenAI takes it: a string, or a list of up to 4 strings; none empty.
fn stop_sequences(stop: Option<Value>) -> Result<Vec<String>, ApiError> {
    let invalid = |why: &str| ApiError::invalid(Some("stop"), format!("stop {why}"));
    let stops = match stop {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(s)) => vec![s],
        Some(Value::Array(items)) => items
            .into_iter()
            .map(|v| match v {
                Value::String(s) => Ok(s),
                _ => Err(invalid("must be a string or a list of strings")),
            })
            .collect::<Result<_, _>>()?,
        Some(_) => return Err(invalid("must be a string or a list of strings")),
    };
    if stops.len() > 4 {
        return Err(invalid("takes at most 4 sequences"));
    }
    if stops.iter().any(String::is_empty) {
        return Err(invalid("sequences must not be empty"));
    }
    Ok(stops)
}

/// `text` up to the first occurrence of any of `stops` (OpenAI: the returned text does not
/// contain the stop sequence).
pub fn cut_at_stop(text: &str, stops: &[String]) -> String {
    let end = stops
        .iter()
        .filter_map(|s| text.find(s.as_str()))
        .min()
        .unwrap_or(text.len());
    text[..end].to_string()
}

/// What a chat request asks, once checked.
#[derive(Debug)]
pub struct Ask {
    pub question: String,
    /// The image's URL (`data:` or, when allowed, `http(s)://`), fetched and decoded later.
    pub image_url: String,
    /// Where the image is in the request (`messages[0].content[1].image_url.url`), for errors.
    pub image_param: String,
    pub stream: bool,
    pub include_usage: bool,
    /// `max_tokens` (or `max_completion_tokens`), at most the server's limit: an upper bound,
    /// as in OpenAI's API, further bounded by the room the prompt leaves in the model.
    pub max_new_tokens: Option<usize>,
    /// `Some((temperature, top_p, seed))` when sampling.
    pub sampling: Option<(f64, f64, u64)>,
    pub threshold: Option<f64>,
    pub show_particles: bool,
    /// `stop`: the returned text ends before the first of these (the `bella` object keeps the
    /// whole answer).
    pub stop: Vec<String>,
}

impl ChatRequest {
    /// Checks the request against what this server supports and extracts the question: the text
    /// of the last user message and the most recent image of the conversation.
    pub fn into_ask(self, max_new_tokens_limit: usize) -> Result<Ask, ApiError> {
        self.check_neutral()?;
        if let Some(n) = self.n {
            if n != 1 {
                return Err(ApiError::unsupported(
                    "n",
                    format!("n = {n} is not supported (only 1): the particles already give several answers, listed in the `bella` object"),
                ));
            }
        }
        // Either limit, when given, is checked (max_completion_tokens is the one that counts).
        for (param, value) in [
            ("max_completion_tokens", self.max_completion_tokens),
            ("max_tokens", self.max_tokens),
        ] {
            if value == Some(0) {
                return Err(ApiError::invalid(
                    Some(param),
                    format!("{param} must be at least 1 (the answer length in tokens)"),
                ));
            }
        }
        let max_new_tokens = match (self.max_completion_tokens, self.max_tokens) {
            (Some(m), _) | (None, Some(m)) => Some(
                usize::try_from(m).map_or(max_new_tokens_limit, |m| m.min(max_new_tokens_limit)),
            ),
            (None, None) => None,
        };
        let top_p = self.top_p.unwrap_or(1.0);
        if !(top_p > 0.0 && top_p <= 1.0) {
            return Err(ApiError::invalid(
                Some("top_p"),
                format!("top_p must be in (0, 1], not {top_p:?}"),
            ));
        }
        let seed = match &self.seed {
            None | Some(Value::Null) => None,
            Some(Value::Number(n)) if n.as_i64().is_some_and(|s| s < 0) => None,
            Some(Value::Number(n)) if n.as_u64().is_some() => n.as_u64(),
            Some(other) => {
                return Err(ApiError::invalid(
                    Some("seed"),
                    format!(
                        "seed must be a whole number from 0 to {} (a negative one is ignored), \
                         not {other}",
                        u64::MAX
                    ),
                ))
            }
        };
        let sampling = match self.temperature {
            Some(t) if !t.is_finite() || !(0.0..=2.0).contains(&t) => {
                return Err(ApiError::invalid(
                    Some("temperature"),
                    format!("temperature must be between 0 and 2, not {t:?}"),
                ))
            }
            // Without a seed every request samples afresh, as in OpenAI's API.
            Some(t) if t > 0.0 => Some((t, top_p, seed.unwrap_or_else(rand::random))),
            // Greedy: the default (the calibrated threshold assumes greedy answers).
            _ => None,
        };
        // As OpenAI's API and vLLM: options of a stream for a reply that is none are a mistake.
        if self.stream_options.is_some() && self.stream != Some(true) {
            return Err(ApiError::invalid(
                Some("stream_options"),
                "stream_options is only allowed with \"stream\": true",
            ));
        }
        let bella = self.bella.unwrap_or_default();
        if let Some(t) = bella.threshold {
            if !(0.0..=1.0).contains(&t) {
                return Err(ApiError::invalid(
                    Some("bella.threshold"),
                    format!("bella.threshold must be a number in [0, 1], not {t}"),
                ));
            }
        }
        let (question, (image_url, image_param)) = question_and_image(&self.messages)?;
        Ok(Ask {
            question,
            image_url,
            image_param,
            stream: self.stream.unwrap_or(false),
            include_usage: self.stream_options.is_some_and(|o| o.include_usage),
            max_new_tokens,
            sampling,
            threshold: bella.threshold,
            show_particles: bella.show_particles,
            stop: stop_sequences(self.stop)?,
        })
    }

    /// Fields this server cannot honour are accepted only at the value that changes nothing.
    fn check_neutral(&self) -> Result<(), ApiError> {
        let refuse = |param: &str, what: &str| {
            Err(ApiError::unsupported(
                param,
                format!("{param} is not supported by this server ({what})"),
            ))
        };
        for (param, v) in [
            ("frequency_penalty", self.frequency_penalty),
            ("presence_penalty", self.presence_penalty),
        ] {
            if v.is_some_and(|v| v != 0.0) {
                return refuse(param, "only 0 is accepted");
            }
        }
        // Their neutral values: top-k off (0 or -1, as vLLM and llama.cpp take them), no
        // min-p, no repetition penalty.
        if self.top_k.is_some_and(|k| k > 0) {
            return refuse("top_k", "only 0 or -1 (off) is accepted");
        }
        if self.min_p.is_some_and(|p| p != 0.0) {
            return refuse("min_p", "only 0 is accepted");
        }
        if self.repetition_penalty.is_some_and(|r| r != 1.0) {
            return refuse("repetition_penalty", "only 1 is accepted");
        }
        for (param, asked) in [
            ("logprobs", self.logprobs == Some(true)),
            ("top_logprobs", self.top_logprobs.is_some_and(|n| n > 0)),
        ] {
            if asked {
                return refuse(
                    param,
                    "each particle's answer log-likelihood is in the `bella` object",
                );
            }
        }
        if self.logit_bias.as_ref().is_some_and(|m| !m.is_empty()) {
            return refuse("logit_bias", "only an empty map is accepted");
        }
        let text_format = match &self.response_format {
            None | Some(Value::Null) => true,
            Some(v) => v.get("type").and_then(Value::as_str) == Some("text"),
        };
        if !text_format {
            return refuse("response_format", "only {\"type\": \"text\"}");
        }
        // Tools a front end offers are accepted and never called: `auto` (the default) lets the
        // model answer in text, `none` asks for that; a call it must make is refused.
        let tool_choice_neutral = match &self.tool_choice {
            None | Some(Value::Null) => true,
            Some(Value::String(s)) => s == "none" || s == "auto",
            Some(_) => false,
        };
        if !tool_choice_neutral {
            return refuse("tool_choice", "a VQA model does not call tools");
        }
        let function_call_neutral = match &self.function_call {
            None | Some(Value::Null) => true,
            Some(Value::String(s)) => s == "none" || s == "auto",
            Some(_) => false,
        };
        if !function_call_neutral {
            return refuse("function_call", "a VQA model does not call functions");
        }
        if self
            .modalities
            .as_ref()
            .is_some_and(|m| m.iter().any(|m| m != "text"))
        {
            return refuse("modalities", "the answer is text: only [\"text\"]");
        }
        // "medium" is OpenAI's default verbosity: asking for it changes nothing.
        if self
            .verbosity
            .as_ref()
            .is_some_and(|v| !v.is_null() && v.as_str() != Some("medium"))
        {
            return refuse("verbosity", "answers are as short as the model makes them");
        }
        for (param, value, what) in [
            (
                "reasoning_effort",
                &self.reasoning_effort,
                "the model does not reason in steps",
            ),
            ("prediction", &self.prediction, "no predicted outputs"),
            ("audio", &self.audio, "the answer is text"),
            (
                "web_search_options",
                &self.web_search_options,
                "no web search",
            ),
        ] {
            if value.as_ref().is_some_and(|v| !v.is_null()) {
                return refuse(param, what);
            }
        }
        Ok(())
    }
}

/// The question (text of the last user message) and the most recent image of the conversation
/// (its URL and where it is in the request), so a follow-up question without a new image asks
/// about the last one shown.
fn question_and_image(messages: &[Message]) -> Result<(String, (String, String)), ApiError> {
    let image_at = |i: usize, j: usize, url: &ImageUrl| {
        (
            url.url.clone(),
            format!("messages[{i}].content[{j}].image_url.url"),
        )
    };
    for (i, m) in messages.iter().enumerate() {
        if !matches!(
            m.role.as_str(),
            // "function": the deprecated form of "tool", which LangChain's FunctionMessage sends.
            "system" | "developer" | "user" | "assistant" | "tool" | "function"
        ) {
            return Err(ApiError::invalid(
                Some(&format!("messages[{i}].role")),
                format!(
                    "unknown role {:?} (system, developer, user, assistant, tool or function)",
                    m.role
                ),
            ));
        }
    }
    let last_user = messages
        .iter()
        .rposition(|m| m.role == "user")
        .ok_or_else(|| {
            ApiError::invalid(
                Some("messages"),
                "the conversation has no user message to answer",
            )
        })?;
    let param = format!("messages[{last_user}].content");
    let mut texts = Vec::new();
    let mut images = Vec::new();
    match &messages[last_user].content {
        Some(Content::Text(t)) => texts.push(t.as_str()),
        Some(Content::Parts(parts)) => {
            for (j, part) in parts.iter().enumerate() {
                match part {
                    Part::Text { text } => texts.push(text.as_str()),
                    Part::ImageUrl { image_url } => {
                        if let Some(detail) = &image_url.detail {
                            if !matches!(detail.as_str(), "auto" | "low" | "high") {
                                return Err(ApiError::invalid(
                                    Some(&format!("{param}[{j}].image_url.detail")),
                                    format!("detail must be auto, low or high, not {detail:?} (the image is read at the model's resolution either way)"),
                                ));
                            }
                        }
                        images.push(image_at(last_user, j, image_url))
                    }
                    Part::Other => {
                        return Err(ApiError::unsupported(
                            &format!("{param}[{j}].type"),
                            "only `text` and `image_url` content parts are supported",
                        ))
                    }
                }
            }
        }
        None => {}
    }
    if images.len() > 1 {
        return Err(ApiError::invalid(
            Some(&param),
            format!(
                "the question has {} images: ask about one image at a time",
                images.len()
            ),
        ));
    }
    // Joined as LLaVA's chat templates join text parts (each followed by a space).
    let joined = texts.join(" ");
    let Some(question) = crate::models::prompt::visible_question(&joined).map(str::to_string)
    else {
        return Err(ApiError::invalid(
            Some(&param),
            "the last user message has no text (or only blanks, control or invisible \
             characters): ask a question about the image",
        ));
    };
    let image = match images.pop() {
        Some(url) => url,
        // An earlier user message's image (the newest one).
        None => messages[..last_user]
            .iter()
            .enumerate()
            .rev()
            .filter(|(_, m)| m.role == "user")
            .filter_map(|(i, m)| match &m.content {
                Some(Content::Parts(parts)) => {
                    parts.iter().enumerate().rev().find_map(|(j, p)| match p {
                        Part::ImageUrl { image_url } => Some(image_at(i, j, image_url)),
                        _ => None,
                    })
                }
                _ => None,
            })
            .next()
            .ok_or_else(|| {
                ApiError::invalid(
                    Some(&param),
                    "no image in the conversation's user messages: add a content part {\"type\": \"image_url\", \"image_url\": {\"url\": \"data:image/png;base64,…\"}}",
                )
            })?,
    };
    Ok((question, image))
}

/// Token counts as OpenAI reports them.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
}

#[derive(Debug, Serialize)]
pub struct Completion<'a> {
    pub id: &'a str,
    pub object: &'static str,
    pub created: u64,
    pub model: &'a str,
    pub choices: Vec<Choice<'a>>,
    pub usage: Usage,
    pub bella: &'a Response,
}

#[derive(Debug, Serialize)]
pub struct Choice<'a> {
    pub index: usize,
    pub message: AssistantMessage<'a>,
    pub finish_reason: &'static str,
    pub logprobs: Option<()>,
}

#[derive(Debug, Serialize)]
pub struct AssistantMessage<'a> {
    pub role: &'static str,
    pub content: &'a str,
}

/// One server-sent event of a streamed answer.
#[derive(Debug, Serialize)]
pub struct Chunk<'a> {
    pub id: &'a str,
    pub object: &'static str,
    pub created: u64,
    pub model: &'a str,
    pub choices: Vec<ChunkChoice<'a>>,
    /// With `stream_options.include_usage`: `null` in every chunk but the last, which holds the
    /// counts (as OpenAI sends them); absent otherwise.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Option<Usage>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bella: Option<&'a Response>,
}

#[derive(Debug, Serialize)]
pub struct ChunkChoice<'a> {
    pub index: usize,
    pub delta: Delta<'a>,
    pub finish_reason: Option<&'static str>,
    pub logprobs: Option<()>,
}

#[derive(Debug, Default, Serialize)]
pub struct Delta<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<&'a str>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(v: Value) -> Result<Ask, ApiError> {
        serde_json::from_value::<ChatRequest>(v)
            .expect("schema")
            .into_ask(64)
    }

    fn user(content: Value) -> Value {
        serde_json::json!({"messages": [{"role": "user", "content": content}]})
    }

    #[test]
    fn question_is_the_last_user_text_and_image_the_newest() {
        let ask = parse(serde_json::json!({"messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:a"}}, {"type": "text", "text": "first?"}]},
            {"role": "assistant", "content": "red"},
            {"role": "user", "content": "  and the shape? "}
        ]}))
        .expect("valid");
        assert_eq!(ask.question, "and the shape?");
        assert_eq!(ask.image_url, "data:a");
        assert_eq!(ask.image_param, "messages[1].content[0].image_url.url");
        assert!(ask.sampling.is_none() && !ask.stream);
    }

    #[test]
    fn text_parts_are_joined_as_the_chat_template_joins_them() {
        // transformers renders these parts with llava-1.5's template (and the demo's) as
        // "USER: <image>\nWhat color is the shape? ASSISTANT:", as the one-part question.
        let ask = parse(user(serde_json::json!([
            {"type": "image_url", "image_url": {"url": "data:a"}},
            {"type": "text", "text": "What color"},
            {"type": "text", "text": "is the shape?"}
        ])))
        .expect("valid");
        assert_eq!(ask.question, "What color is the shape?");
    }

    #[test]
    fn refusals_name_the_field() {
        let no_image = parse(user(Value::String("what?".into()))).unwrap_err();
        assert_eq!(no_image.param.as_deref(), Some("messages[0].content"));
        assert!(
            no_image.message.contains("no image"),
            "{}",
            no_image.message
        );

        let two = parse(user(serde_json::json!([
            {"type": "image_url", "image_url": {"url": "data:a"}},
            {"type": "image_url", "image_url": {"url": "data:b"}},
            {"type": "text", "text": "q"}
        ])))
        .unwrap_err();
        assert!(two.message.contains("2 images"), "{}", two.message);

        let mut v = user(
            serde_json::json!([{"type": "image_url", "image_url": {"url": "data:a"}}, {"type": "text", "text": "q"}]),
        );
        v["n"] = 3.into();
        assert_eq!(parse(v.clone()).unwrap_err().param.as_deref(), Some("n"));
        v["n"] = 1.into();
        v["max_tokens"] = 0.into();
        assert_eq!(
            parse(v.clone()).unwrap_err().param.as_deref(),
            Some("max_tokens")
        );
        v["max_tokens"] = 8.into();
        v["temperature"] = 3.0.into();
        assert_eq!(
            parse(v.clone()).unwrap_err().param.as_deref(),
            Some("temperature")
        );
        v["temperature"] = 0.7.into();
        // Tools offered are never called (the answer is text, as `auto` allows); a call the
        // client requires is refused.
        v["tools"] = serde_json::json!([{"type": "function", "function": {"name": "search"}}]);
        assert!(parse(v.clone()).is_ok());
        v["tool_choice"] = "required".into();
        assert_eq!(
            parse(v.clone()).unwrap_err().param.as_deref(),
            Some("tool_choice")
        );
        v["tool_choice"] = "none".into();
        v["bella"] = serde_json::json!({"threshold": 1.5});
        assert_eq!(
            parse(v.clone()).unwrap_err().param.as_deref(),
            Some("bella.threshold")
        );
        v["bella"] = serde_json::json!({"threshold": 0.3, "show_particles": true});
        v["seed"] = 5.into();
        let ask = parse(v.clone()).expect("valid");
        assert_eq!(ask.sampling, Some((0.7, 1.0, 5)));
        assert_eq!(ask.max_new_tokens, Some(8));
        assert_eq!(ask.threshold, Some(0.3));
        assert!(ask.show_particles);

        // max_tokens is an upper bound: a front end's 4096 is the server's limit (64 here).
        v["max_tokens"] = 4096.into();
        assert_eq!(parse(v.clone()).expect("valid").max_new_tokens, Some(64));
        // Without a seed, sampling draws a fresh one per request.
        v.as_object_mut().unwrap().remove("seed");
        let seeds: std::collections::BTreeSet<u64> = (0..4)
            .map(|_| {
                parse(v.clone())
                    .expect("valid")
                    .sampling
                    .expect("sampling")
                    .2
            })
            .collect();
        assert!(seeds.len() > 1, "{seeds:?}");
        // top_p is checked with greedy decoding too.
        v["temperature"] = 0.0.into();
        v["top_p"] = 1.5.into();
        assert_eq!(
            parse(v.clone()).unwrap_err().param.as_deref(),
            Some("top_p")
        );
    }

    #[test]
    fn openai_fields_are_accepted_at_their_neutral_value_and_named_otherwise() {
        let base = user(serde_json::json!([
            {"type": "image_url", "image_url": {"url": "data:a", "detail": "low"}},
            {"type": "text", "text": "q"}
        ]));
        let with = |key: &str, value: Value| {
            let mut v = base.clone();
            v[key] = value;
            v
        };
        for (key, value) in [
            ("service_tier", serde_json::json!("auto")),
            ("prompt_cache_key", serde_json::json!("k")),
            ("prompt_cache_retention", serde_json::json!("24h")),
            ("safety_identifier", serde_json::json!("u")),
            ("modalities", serde_json::json!(["text"])),
            ("reasoning_effort", Value::Null),
            ("verbosity", serde_json::json!("medium")),
            ("functions", serde_json::json!([])),
            ("functions", serde_json::json!([{"name": "f"}])),
            ("function_call", serde_json::json!("none")),
            ("top_k", serde_json::json!(-1)),
            ("top_k", serde_json::json!(0)),
            ("min_p", serde_json::json!(0.0)),
            ("repetition_penalty", serde_json::json!(1.0)),
            ("stream_options", Value::Null),
        ] {
            parse(with(key, value)).unwrap_or_else(|e| panic!("{key}: {}", e.message));
        }
        // Stream options with a stream; refused without one (as OpenAI's API and vLLM do).
        let mut streamed = with(
            "stream_options",
            serde_json::json!({"include_usage": true, "include_obfuscation": false}),
        );
        streamed["stream"] = true.into();
        parse(streamed).unwrap_or_else(|e| panic!("stream_options: {}", e.message));
        let e = parse(with(
            "stream_options",
            serde_json::json!({"include_usage": true}),
        ))
        .unwrap_err();
        assert!(
            e.message.contains("only allowed with \"stream\": true"),
            "{}",
            e.message
        );
        for (key, value) in [
            ("modalities", serde_json::json!(["text", "audio"])),
            ("reasoning_effort", serde_json::json!("high")),
            ("verbosity", serde_json::json!("low")),
            ("audio", serde_json::json!({"voice": "alloy"})),
            ("function_call", serde_json::json!({"name": "f"})),
            ("web_search_options", serde_json::json!({})),
            ("top_k", serde_json::json!(40)),
            ("min_p", serde_json::json!(0.05)),
            ("repetition_penalty", serde_json::json!(1.1)),
        ] {
            let err = parse(with(key, value)).unwrap_err();
            assert_eq!(err.param.as_deref(), Some(key));
            assert_eq!(err.code, Some("unsupported_parameter"));
        }
        let mut v = base.clone();
        v["messages"][0]["content"][0]["image_url"]["detail"] = "ultra".into();
        let err = parse(v).unwrap_err();
        assert_eq!(
            err.param.as_deref(),
            Some("messages[0].content[0].image_url.detail")
        );
    }

    #[test]
    fn malformed_content_says_what_a_part_is() {
        for (content, expected) in [
            (
                serde_json::json!(5),
                "invalid type: integer `5`, expected a string or a list of content parts",
            ),
            (
                serde_json::json!([{"type": "image_url", "image_url": 5}]),
                "part [0]",
            ),
            (
                serde_json::json!(["q", {"type": "text", "text": 5}]),
                "part [0]",
            ),
        ] {
            let err = serde_json::from_value::<ChatRequest>(user(content)).unwrap_err();
            let text = err.to_string();
            assert!(text.contains(expected), "{text}");
            assert!(
                text.contains("\"type\": \"image_url\"") || expected.starts_with("invalid type"),
                "{text}"
            );
        }
    }

    #[test]
    fn an_image_url_may_be_the_url_alone_and_a_negative_seed_draws_a_fresh_one() {
        let ask = parse(user(serde_json::json!([
            {"type": "image_url", "image_url": "data:a"},
            {"type": "text", "text": "q"}
        ])))
        .expect("valid");
        assert_eq!(ask.image_url, "data:a");
        let mut v = user(serde_json::json!([
            {"type": "image_url", "image_url": {"url": "data:a"}},
            {"type": "text", "text": "q"}
        ]));
        v["temperature"] = 1.0.into();
        v["seed"] = (-1).into();
        let seeds: std::collections::BTreeSet<u64> = (0..4)
            .map(|_| {
                parse(v.clone())
                    .expect("valid")
                    .sampling
                    .expect("sampled")
                    .2
            })
            .collect();
        assert!(seeds.len() > 1, "{seeds:?}");
        v["seed"] = serde_json::json!(u64::MAX);
        assert_eq!(
            parse(v.clone())
                .expect("valid")
                .sampling
                .expect("sampled")
                .2,
            u64::MAX
        );
        for bad in [serde_json::json!(1.5), serde_json::json!("5")] {
            v["seed"] = bad;
            assert_eq!(parse(v.clone()).unwrap_err().param.as_deref(), Some("seed"));
        }
    }

    #[test]
    fn stop_sequences_cut_the_text_before_the_first_of_them() {
        let mut v = user(serde_json::json!([
            {"type": "image_url", "image_url": {"url": "data:a"}},
            {"type": "text", "text": "q"}
        ]));
        v["stop"] = "\n".into();
        assert_eq!(parse(v.clone()).unwrap().stop, vec!["\n".to_string()]);
        v["stop"] = serde_json::json!(["User:", "."]);
        let stops = parse(v.clone()).unwrap().stop;
        assert_eq!(
            cut_at_stop("I'm not sure. Most likely: red (40 %)", &stops),
            "I'm not sure"
        );
        assert_eq!(cut_at_stop("red", &stops), "red");
        assert_eq!(cut_at_stop("red\nUser: hi", &stops), "red\n");
        for bad in [
            serde_json::json!(["a", "b", "c", "d", "e"]),
            serde_json::json!([""]),
            serde_json::json!(5),
            serde_json::json!([1]),
        ] {
            v["stop"] = bad;
            assert_eq!(parse(v.clone()).unwrap_err().param.as_deref(), Some("stop"));
        }
    }

    #[test]
    fn unknown_fields_are_refused() {
        let mut v = user(Value::String("q".into()));
        v["frobnicate"] = true.into();
        let err = serde_json::from_value::<ChatRequest>(v).unwrap_err();
        assert!(err.to_string().contains("frobnicate"), "{err}");
    }
}
