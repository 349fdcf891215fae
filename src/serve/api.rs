//! Request bodies of the OpenAI endpoints, and their validation into [`GenParams`].
//!
//! Parsing is strict about types and lenient about presence: a field of the wrong type is a
//! 400 naming the field, an unknown field is ignored (clients send many we do not implement),
//! and fields we accept but do not act on are listed in `docs/SERVER.md`.

use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use bitnest::chat::Message;
use bitnest::sampling::SamplingParams;

use super::error::ApiError;

/// Most stop strings per request, and bytes per stop string.
pub const MAX_STOPS: usize = 16;
pub const MAX_STOP_BYTES: usize = 256;
/// Most alternatives `top_logprobs` / completions `logprobs` may ask for.
pub const MAX_TOP_LOGPROBS: u32 = 20;

/// Parses a JSON body, naming the offending field in the error.
pub fn parse<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    from_value(&parse_json(body)?)
}

/// Parses the body as JSON of any shape: only syntax errors here.
pub fn parse_json(body: &[u8]) -> Result<Value, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(
            ApiError::invalid("the request body is empty; expected a JSON object", None).with_code("invalid_json")
        );
    }
    serde_json::from_slice(body).map_err(|e| {
        ApiError::invalid(format!("malformed JSON in the request body: {e}"), None).with_code("invalid_json")
    })
}

/// Reads a typed view of `value`; a type error names the field's path as `param`.
pub fn from_value<'a, T: Deserialize<'a>>(value: &'a Value) -> Result<T, ApiError> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let msg = e.inner().to_string();
        // "missing field `x`" names the field itself; the path is its parent.
        let param = match msg.split('`').nth(1).filter(|_| msg.starts_with("missing field")) {
            Some(field) if path == "." => field.to_string(),
            Some(field) => format!("{path}.{field}"),
            None => path.clone(),
        };
        let message = if path == "." { msg } else { format!("{msg} (at `{path}`)") };
        ApiError::invalid(message, (param != ".").then_some(param.as_str()))
    })
}

/// A chat completion request, validated.
pub fn parse_chat(body: &[u8]) -> Result<(Vec<Message>, GenParams), ApiError> {
    let v = parse_json(body)?;
    let req: ChatRequest = from_value(&v)?;
    let common: Common = from_value(&v)?;
    req.validate(&common)
}

/// A (legacy) completion request, validated.
pub fn parse_completion(body: &[u8]) -> Result<(PromptInput, GenParams), ApiError> {
    let v = parse_json(body)?;
    let req: CompletionRequest = from_value(&v)?;
    let common: Common = from_value(&v)?;
    req.validate(&common)
}

/// `stop`: one string or a list of them.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum StopField {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: Option<bool>,
}

/// A message's `content`: a string, or a list of parts of which only text parts are supported.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Clone, Deserialize)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub text: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    #[serde(default)]
    pub content: Option<Content>,
}

/// Sampling and length fields shared by both generation endpoints (read from the same body
/// as the endpoint's own fields; serde's `flatten` would lose the field paths in errors).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Common {
    /// Type-checked and otherwise ignored: the server has one model.
    #[serde(default)]
    #[allow(dead_code)]
    pub model: Option<String>,
    #[serde(default)]
    pub max_tokens: Option<u64>,
    #[serde(default)]
    pub temperature: Option<f32>,
    #[serde(default)]
    pub top_p: Option<f32>,
    /// llama.cpp extensions, accepted because its clients send them.
    #[serde(default)]
    pub top_k: Option<u64>,
    #[serde(default)]
    pub min_p: Option<f32>,
    #[serde(default)]
    pub repeat_penalty: Option<f32>,
    #[serde(default)]
    pub seed: Option<i64>,
    #[serde(default)]
    pub stop: Option<StopField>,
    #[serde(default)]
    pub stream: Option<bool>,
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    #[serde(default)]
    pub n: Option<u64>,
    /// Accepted (type-checked) and ignored.
    #[serde(default)]
    #[allow(dead_code)]
    pub frequency_penalty: Option<f32>,
    #[serde(default)]
    #[allow(dead_code)]
    pub presence_penalty: Option<f32>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ChatRequest {
    pub messages: Vec<ChatMessage>,
    #[serde(default)]
    pub max_completion_tokens: Option<u64>,
    #[serde(default)]
    pub logprobs: Option<bool>,
    #[serde(default)]
    pub top_logprobs: Option<u32>,
}

/// `prompt`: a string, a list with one string, or token ids.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Prompt {
    Text(String),
    Texts(Vec<String>),
    Ids(Vec<u32>),
    IdLists(Vec<Vec<u32>>),
}

#[derive(Debug, Clone, Deserialize)]
pub struct CompletionRequest {
    pub prompt: Prompt,
    #[serde(default)]
    pub echo: Option<bool>,
    #[serde(default)]
    pub logprobs: Option<u32>,
    #[serde(default)]
    pub suffix: Option<String>,
    #[serde(default)]
    pub best_of: Option<u64>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct TokenizeRequest {
    pub content: String,
    #[serde(default)]
    pub add_special: Option<bool>,
    #[serde(default)]
    pub parse_special: Option<bool>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct DetokenizeRequest {
    pub tokens: Vec<u32>,
}

/// A generation request after validation; what the worker needs, minus the prompt.
#[derive(Debug, Clone, PartialEq)]
pub struct GenParams {
    /// `None`: until an end token or the context is full.
    pub max_tokens: Option<usize>,
    pub sampling: SamplingParams,
    pub stop: Vec<String>,
    pub stream: bool,
    pub include_usage: bool,
    /// `Some(n)`: report each token's log-probability and its `n` most likely alternatives.
    pub logprobs: Option<usize>,
    /// Completions: send the prompt text before the answer.
    pub echo: bool,
}

impl Common {
    /// Validates the shared fields; `max_tokens` is the effective limit the endpoint chose
    /// (chat also accepts `max_completion_tokens`).
    fn validate(&self, max_tokens: Option<u64>, logprobs: Option<usize>) -> Result<GenParams, ApiError> {
        if let Some(n) = self.n
            && n != 1
        {
            return Err(ApiError::invalid(format!("n = {n} is not supported; only n = 1"), Some("n")));
        }
        let max_tokens = match max_tokens {
            Some(0) => return Err(ApiError::invalid("max_tokens must be at least 1", Some("max_tokens"))),
            Some(m) => Some(usize::try_from(m).unwrap_or(usize::MAX)),
            None => None,
        };
        let mut s = SamplingParams::default();
        if let Some(t) = self.temperature {
            if !(0.0..=2.0).contains(&t) {
                return Err(ApiError::invalid(format!("temperature must be in [0, 2], got {t}"), Some("temperature")));
            }
            s.temperature = t;
        }
        if let Some(p) = self.top_p {
            s.top_p = p;
        }
        if let Some(k) = self.top_k {
            s.top_k = usize::try_from(k).unwrap_or(usize::MAX);
        }
        if let Some(m) = self.min_p {
            s.min_p = m;
        }
        if let Some(r) = self.repeat_penalty {
            s.repeat_penalty = r;
        }
        s.seed = self.seed.map(|v| v as u64);
        if let Err(e) = s.validate() {
            let msg = e.to_string();
            let param = msg.split_whitespace().next().unwrap_or("").to_string();
            return Err(ApiError::invalid(msg, Some(param.as_str())));
        }
        let stop = match &self.stop {
            None => Vec::new(),
            Some(StopField::One(s)) => vec![s.clone()],
            Some(StopField::Many(v)) => v.clone(),
        };
        if stop.len() > MAX_STOPS {
            return Err(ApiError::invalid(format!("at most {MAX_STOPS} stop strings are allowed"), Some("stop")));
        }
        if stop.iter().any(|s| s.len() > MAX_STOP_BYTES) {
            return Err(ApiError::invalid(
                format!("stop strings may be at most {MAX_STOP_BYTES} bytes long"),
                Some("stop"),
            ));
        }
        let stream = self.stream.unwrap_or(false);
        let include_usage = self.stream_options.as_ref().and_then(|o| o.include_usage).unwrap_or(false);
        Ok(GenParams { max_tokens, sampling: s, stop, stream, include_usage, logprobs, echo: false })
    }
}

impl ChatRequest {
    pub fn validate(&self, common: &Common) -> Result<(Vec<Message>, GenParams), ApiError> {
        if self.messages.is_empty() {
            return Err(ApiError::invalid("messages must not be empty", Some("messages")));
        }
        let mut out = Vec::with_capacity(self.messages.len());
        for (i, m) in self.messages.iter().enumerate() {
            let role = match m.role.as_str() {
                "system" | "user" | "assistant" | "tool" => m.role.clone(),
                // OpenAI's newer name for the system role.
                "developer" => "system".to_string(),
                other => {
                    return Err(ApiError::invalid(
                        format!("unknown role {other:?} (system, developer, user, assistant, tool)"),
                        Some(&format!("messages[{i}].role")),
                    ));
                }
            };
            let content = match &m.content {
                None => String::new(),
                Some(Content::Text(t)) => t.clone(),
                Some(Content::Parts(parts)) => {
                    let mut text = String::new();
                    for (j, p) in parts.iter().enumerate() {
                        match (p.kind.as_str(), &p.text) {
                            ("text", Some(t)) => text.push_str(t),
                            _ => {
                                return Err(ApiError::invalid(
                                    format!("content part of type {:?} is not supported; only text", p.kind),
                                    Some(&format!("messages[{i}].content[{j}]")),
                                ));
                            }
                        }
                    }
                    text
                }
            };
            out.push(Message::new(role, content));
        }
        let logprobs = match (self.logprobs.unwrap_or(false), self.top_logprobs) {
            (_, Some(n)) if n > MAX_TOP_LOGPROBS => {
                return Err(ApiError::invalid(
                    format!("top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {n}"),
                    Some("top_logprobs"),
                ));
            }
            (false, Some(n)) if n > 0 => {
                return Err(ApiError::invalid("top_logprobs requires logprobs: true", Some("top_logprobs")));
            }
            (true, n) => Some(n.unwrap_or(0) as usize),
            (false, _) => None,
        };
        let max = self.max_completion_tokens.or(common.max_tokens);
        let params = common.validate(max, logprobs)?;
        Ok((out, params))
    }
}

/// What a completion request's prompt is, after validation.
#[derive(Debug, Clone, PartialEq)]
pub enum PromptInput {
    Text(String),
    Ids(Vec<u32>),
}

/// OpenAI's default for `/v1/completions` when `max_tokens` is absent.
pub const COMPLETION_DEFAULT_MAX_TOKENS: u64 = 16;

impl CompletionRequest {
    pub fn validate(&self, common: &Common) -> Result<(PromptInput, GenParams), ApiError> {
        let one = || ApiError::invalid("only one prompt per request is supported", Some("prompt"));
        let prompt = match &self.prompt {
            Prompt::Text(t) => PromptInput::Text(t.clone()),
            Prompt::Texts(v) if v.len() == 1 => PromptInput::Text(v[0].clone()),
            Prompt::Texts(_) => return Err(one()),
            Prompt::Ids(ids) => PromptInput::Ids(ids.clone()),
            Prompt::IdLists(v) if v.len() == 1 => PromptInput::Ids(v[0].clone()),
            Prompt::IdLists(_) => return Err(one()),
        };
        if self.suffix.as_deref().is_some_and(|s| !s.is_empty()) {
            return Err(ApiError::invalid("suffix (insertion) is not supported", Some("suffix")));
        }
        if let Some(b) = self.best_of
            && b != 1
        {
            return Err(ApiError::invalid("best_of other than 1 is not supported", Some("best_of")));
        }
        if let Some(n) = self.logprobs
            && n > MAX_TOP_LOGPROBS
        {
            return Err(ApiError::invalid(
                format!("logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {n}"),
                Some("logprobs"),
            ));
        }
        let max = Some(common.max_tokens.unwrap_or(COMPLETION_DEFAULT_MAX_TOKENS));
        let mut params = common.validate(max, self.logprobs.map(|n| n as usize))?;
        params.echo = self.echo.unwrap_or(false);
        Ok((prompt, params))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chat(body: &str) -> Result<(Vec<Message>, GenParams), ApiError> {
        parse_chat(body.as_bytes())
    }

    fn completion(body: &str) -> Result<(PromptInput, GenParams), ApiError> {
        parse_completion(body.as_bytes())
    }

    #[test]
    fn minimal_chat_request_gets_defaults() {
        let (msgs, p) = chat(r#"{"messages":[{"role":"user","content":"hi"}]}"#).unwrap();
        assert_eq!(msgs, vec![Message::new("user", "hi")]);
        assert_eq!(p.max_tokens, None);
        assert_eq!(p.sampling, SamplingParams::default());
        assert!(!p.stream && !p.include_usage && p.logprobs.is_none() && p.stop.is_empty());
    }

    #[test]
    fn chat_fields_are_read_and_unknown_ones_ignored() {
        let (msgs, p) = chat(
            r#"{"model":"x","messages":[{"role":"developer","content":[{"type":"text","text":"a"},{"type":"text","text":"b"}]},
                {"role":"assistant","content":null},{"role":"user","content":"q","name":"bob"}],
                "max_tokens":5,"max_completion_tokens":7,"temperature":0,"top_p":0.5,"seed":-1,
                "stop":"\n","stream":true,"stream_options":{"include_usage":true},"logprobs":true,"top_logprobs":3,
                "frequency_penalty":0.1,"tools":[],"whatever":{"nested":[1,2]}}"#,
        )
        .unwrap();
        assert_eq!(msgs[0], Message::new("system", "ab"));
        assert_eq!(msgs[1], Message::new("assistant", ""));
        assert_eq!(p.max_tokens, Some(7));
        assert_eq!(p.sampling.temperature, 0.0);
        assert_eq!(p.sampling.top_p, 0.5);
        assert_eq!(p.sampling.seed, Some(u64::MAX));
        assert_eq!(p.stop, vec!["\n".to_string()]);
        assert!(p.stream && p.include_usage);
        assert_eq!(p.logprobs, Some(3));
    }

    #[test]
    fn malformed_json_is_a_400_without_param() {
        for body in [r#"{"messages": ["#, "not json", r#"{"messages":[]} trailing"#, "", "  "] {
            let e = chat(body).unwrap_err();
            assert_eq!(e.status.as_u16(), 400, "{body}");
            assert_eq!(e.param, None, "{body}");
        }
    }

    #[test]
    fn missing_and_mistyped_fields_name_the_field() {
        let e = chat(r#"{"model":"m"}"#).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("messages"), "{e:?}");
        let e = chat(r#"{"messages":[{"role":"user","content":"x"}],"temperature":"hot"}"#).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("temperature"), "{e:?}");
        let e = chat(r#"{"messages":[{"content":"x"}]}"#).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("messages[0].role"), "{e:?}");
        let e = chat(r#"{"messages":[{"role":"user","content":"x"}],"max_tokens":-3}"#).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("max_tokens"), "{e:?}");
        let e = chat(r#"[1,2]"#).unwrap_err();
        assert_eq!(e.status.as_u16(), 400);
    }

    #[test]
    fn out_of_range_values_are_rejected() {
        let msg = r#""messages":[{"role":"user","content":"x"}]"#;
        for (extra, param) in [
            (r#""temperature":3"#, "temperature"),
            (r#""top_p":0"#, "top_p"),
            (r#""max_tokens":0"#, "max_tokens"),
            (r#""n":2"#, "n"),
            (r#""top_logprobs":50,"logprobs":true"#, "top_logprobs"),
            (r#""top_logprobs":2"#, "top_logprobs"),
            (r#""stop":["a","b","c","d","e","f","g","h","i","j","k","l","m","n","o","p","q"]"#, "stop"),
        ] {
            let e = chat(&format!("{{{msg},{extra}}}")).unwrap_err();
            assert_eq!(e.param.as_deref(), Some(param), "{extra}: {e:?}");
        }
        let e = chat(r#"{"messages":[]}"#).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("messages"));
        let e = chat(r#"{"messages":[{"role":"wizard","content":"x"}]}"#).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("messages[0].role"));
        let e = chat(r#"{"messages":[{"role":"user","content":[{"type":"image_url"}]}]}"#).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("messages[0].content[0]"));
    }

    #[test]
    fn completion_prompt_shapes() {
        let (p, g) = completion(r#"{"prompt":"abc"}"#).unwrap();
        assert_eq!(p, PromptInput::Text("abc".into()));
        assert_eq!(g.max_tokens, Some(COMPLETION_DEFAULT_MAX_TOKENS as usize));
        assert_eq!(completion(r#"{"prompt":["abc"]}"#).unwrap().0, PromptInput::Text("abc".into()));
        assert_eq!(completion(r#"{"prompt":[1,2,3]}"#).unwrap().0, PromptInput::Ids(vec![1, 2, 3]));
        assert_eq!(completion(r#"{"prompt":[[4]]}"#).unwrap().0, PromptInput::Ids(vec![4]));
        assert_eq!(completion(r#"{"prompt":["a","b"]}"#).unwrap_err().param.as_deref(), Some("prompt"));
        assert_eq!(completion(r#"{"prompt":7}"#).unwrap_err().param.as_deref(), Some("prompt"));
        assert_eq!(completion(r#"{}"#).unwrap_err().param.as_deref(), Some("prompt"));
        assert_eq!(completion(r#"{"prompt":"a","logprobs":2}"#).unwrap().1.logprobs, Some(2));
        assert_eq!(completion(r#"{"prompt":"a","suffix":"z"}"#).unwrap_err().param.as_deref(), Some("suffix"));
    }
}
