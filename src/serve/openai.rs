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

    pub fn too_large(limit_bytes: usize) -> Self {
        Self {
            code: Some("request_too_large"),
            ..Self::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "invalid_request_error",
                format!(
                    "the request body is larger than {} MB (--max-body-mb); send a smaller image",
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

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> HttpResponse {
        let body = serde_json::json!({
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        });
        let mut response = (self.status, axum::Json(body)).into_response();
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
    #[serde(default)]
    pub seed: Option<u64>,
    #[serde(default)]
    pub user: Option<String>,
    #[serde(default)]
    pub metadata: Option<Value>,
    #[serde(default)]
    pub store: Option<bool>,
    #[serde(default)]
    pub parallel_tool_calls: Option<bool>,
    // Accepted only at their neutral value.
    #[serde(default)]
    pub stop: Option<Value>,
    #[serde(default)]
    pub frequency_penalty: Option<f64>,
    #[serde(default)]
    pub presence_penalty: Option<f64>,
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

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<Part>),
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

#[derive(Debug, Deserialize)]
pub struct ImageUrl {
    pub url: String,
    #[serde(default)]
    pub detail: Option<String>,
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
    pub max_new_tokens: Option<usize>,
    /// `Some((temperature, top_p, seed))` when sampling.
    pub sampling: Option<(f64, f64, u64)>,
    pub threshold: Option<f64>,
    pub show_particles: bool,
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
        let max_new_tokens = match (self.max_completion_tokens, self.max_tokens) {
            (Some(m), _) | (None, Some(m)) => {
                let param = if self.max_completion_tokens.is_some() {
                    "max_completion_tokens"
                } else {
                    "max_tokens"
                };
                if m == 0 || m > max_new_tokens_limit as u64 {
                    return Err(ApiError::invalid(
                        Some(param),
                        format!("{param} must be between 1 and {max_new_tokens_limit} (the answer length in tokens), not {m}"),
                    ));
                }
                Some(m as usize)
            }
            (None, None) => None,
        };
        let sampling = match self.temperature {
            Some(t) if !t.is_finite() || !(0.0..=2.0).contains(&t) => {
                return Err(ApiError::invalid(
                    Some("temperature"),
                    format!("temperature must be between 0 and 2, not {t}"),
                ))
            }
            Some(t) if t > 0.0 => {
                let top_p = self.top_p.unwrap_or(1.0);
                if !(top_p > 0.0 && top_p <= 1.0) {
                    return Err(ApiError::invalid(
                        Some("top_p"),
                        format!("top_p must be in (0, 1], not {top_p}"),
                    ));
                }
                Some((t, top_p, self.seed.unwrap_or(0)))
            }
            // Greedy: the default (the calibrated threshold assumes greedy answers).
            _ => None,
        };
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
        let stop_set = match &self.stop {
            None | Some(Value::Null) => false,
            Some(Value::Array(a)) => !a.is_empty(),
            Some(_) => true,
        };
        if stop_set {
            return refuse("stop", "answers are short and end at the model's end token");
        }
        for (param, v) in [
            ("frequency_penalty", self.frequency_penalty),
            ("presence_penalty", self.presence_penalty),
        ] {
            if v.is_some_and(|v| v != 0.0) {
                return refuse(param, "only 0 is accepted");
            }
        }
        if self.logprobs == Some(true) || self.top_logprobs.is_some_and(|n| n > 0) {
            return refuse(
                "logprobs",
                "each particle's answer log-likelihood is in the `bella` object",
            );
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
        if self.tools.as_ref().is_some_and(|t| !t.is_empty()) {
            return refuse("tools", "a VQA model does not call tools");
        }
        let tool_choice_neutral = match &self.tool_choice {
            None | Some(Value::Null) => true,
            Some(Value::String(s)) => s == "none" || s == "auto",
            Some(_) => false,
        };
        if !tool_choice_neutral {
            return refuse("tool_choice", "a VQA model does not call tools");
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
            "system" | "developer" | "user" | "assistant" | "tool"
        ) {
            return Err(ApiError::invalid(
                Some(&format!("messages[{i}].role")),
                format!(
                    "unknown role {:?} (system, developer, user, assistant or tool)",
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
                    Part::ImageUrl { image_url } => images.push(image_at(last_user, j, image_url)),
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
    let question = texts.join("\n").trim().to_string();
    if question.is_empty() {
        return Err(ApiError::invalid(
            Some(&param),
            "the last user message has no text: ask a question about the image",
        ));
    }
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
                    "no image in the conversation: add a content part {\"type\": \"image_url\", \"image_url\": {\"url\": \"data:image/png;base64,…\"}}",
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
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
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
        v["tools"] = serde_json::json!([{"type": "function"}]);
        assert_eq!(
            parse(v.clone()).unwrap_err().param.as_deref(),
            Some("tools")
        );
        v["tools"] = serde_json::json!([]);
        v["bella"] = serde_json::json!({"threshold": 1.5});
        assert_eq!(
            parse(v.clone()).unwrap_err().param.as_deref(),
            Some("bella.threshold")
        );
        v["bella"] = serde_json::json!({"threshold": 0.3, "show_particles": true});
        let ask = parse(v).expect("valid");
        assert_eq!(ask.sampling, Some((0.7, 1.0, 0)));
        assert_eq!(ask.max_new_tokens, Some(8));
        assert_eq!(ask.threshold, Some(0.3));
        assert!(ask.show_particles);
    }

    #[test]
    fn unknown_fields_are_refused() {
        let mut v = user(Value::String("q".into()));
        v["frobnicate"] = true.into();
        let err = serde_json::from_value::<ChatRequest>(v).unwrap_err();
        assert!(err.to_string().contains("frobnicate"), "{err}");
    }
}
