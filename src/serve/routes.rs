//! HTTP handlers: request in, job to the worker, events back out as JSON or server-sent events.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};
use tokio::sync::mpsc::UnboundedReceiver;
use tokio_stream::Stream;

use bitnest::decode::FinishReason;
use bitnest::engine::Engine;

use super::affinity;
use super::api::{self, GenParams, PromptInput};
use super::auth::{self, ApiKey};
use super::error::ApiError;
use super::metrics::Metrics;
use super::worker::{Event, Job, Submitter, TokenLogprob, Usage};

pub struct AppState {
    pub engine: Arc<Engine>,
    pub submit: Submitter,
    pub metrics: Arc<Metrics>,
    /// The id clients see in `/v1/models` and in responses.
    pub model_id: String,
    pub ctx: usize,
    /// Slots (`--parallel`).
    pub parallel: usize,
    pub spec: String,
    pub started: u64,
}

type St = State<Arc<AppState>>;

pub fn router(state: Arc<AppState>, max_body: usize, key: Option<ApiKey>) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(models))
        .route("/v1/models/{id}", get(model))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/tokenize", post(tokenize))
        .route("/detokenize", post(detokenize))
        .fallback(|| async { ApiError::not_found("no such endpoint") })
        .method_not_allowed_fallback(|| async {
            ApiError::invalid("method not allowed on this endpoint", None)
                .with_status(StatusCode::METHOD_NOT_ALLOWED)
                .with_code("method_not_allowed")
        })
        .layer(DefaultBodyLimit::max(max_body))
        .layer(axum::middleware::from_fn_with_state(Arc::new(key), auth::require_key))
        .with_state(state)
}

fn now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn request_id(prefix: &str) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
    format!("{prefix}-{:x}{nanos:08x}{n:04x}", now())
}

/// The body, or a JSON error instead of axum's plain-text rejection. An oversized body is a
/// 400 like every other request-size limit (the contract), with its own `code`.
fn body(b: Result<Bytes, BytesRejection>) -> Result<Bytes, ApiError> {
    b.map_err(|r| {
        let e = ApiError::invalid(r.body_text(), None);
        if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
            e.with_code("request_too_large")
        } else {
            e.with_status(r.status()).with_code("invalid_body")
        }
    })
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Chat,
    Completion,
}

/// Everything needed to turn worker events into response JSON.
struct Reply {
    kind: Kind,
    id: String,
    created: u64,
    model: String,
    params: GenParams,
    engine: Arc<Engine>,
    /// Completions with `echo`: the prompt text, sent before the answer.
    echo: Option<String>,
}

async fn chat(State(st): St, b: Result<Bytes, BytesRejection>) -> Response {
    Metrics::add(&st.metrics.requests_chat, 1);
    let r = async {
        let b = body(b)?;
        let (messages, params) = api::parse_chat(&b)?;
        let key = affinity::chat_key(&messages);
        let engine = st.engine.clone();
        let prompt = tokio::task::spawn_blocking(move || engine.chat_prompt(&messages))
            .await
            .map_err(|e| ApiError::internal(format!("tokenizer task failed: {e}")))?
            .map_err(|e| ApiError::invalid(format!("cannot apply the chat template: {e:#}"), Some("messages")))?;
        Ok::<_, ApiError>((prompt, params, key))
    }
    .await;
    match r {
        Ok((prompt, params, key)) => with_key(start(&st, Kind::Chat, prompt, params, None, "messages").await, &key),
        Err(e) => invalid(&st, e),
    }
}

async fn completions(State(st): St, b: Result<Bytes, BytesRejection>) -> Response {
    Metrics::add(&st.metrics.requests_completion, 1);
    let r = async {
        let b = body(b)?;
        let (prompt, params) = api::parse_completion(&b)?;
        let key = match &prompt {
            PromptInput::Text(t) => affinity::text_key(t),
            PromptInput::Ids(ids) => affinity::ids_key(ids),
        };
        let engine = st.engine.clone();
        let (ids, text) = tokio::task::spawn_blocking(move || match prompt {
            PromptInput::Text(t) => engine.tokenizer.encode(&t, true).map(|ids| (ids, t)),
            PromptInput::Ids(ids) => {
                let vocab = engine.model.config.vocab_size;
                match ids.iter().find(|&&id| id as usize >= vocab) {
                    Some(bad) => Err(anyhow::anyhow!("token id {bad} is outside the vocabulary of {vocab}")),
                    None => engine.tokenizer.decode(&ids).map(|t| (ids, t)),
                }
            }
        })
        .await
        .map_err(|e| ApiError::internal(format!("tokenizer task failed: {e}")))?
        .map_err(|e| ApiError::invalid(format!("{e:#}"), Some("prompt")))?;
        let echo = params.echo.then_some(text);
        Ok::<_, ApiError>((ids, params, echo, key))
    }
    .await;
    match r {
        Ok((ids, params, echo, key)) => with_key(start(&st, Kind::Completion, ids, params, echo, "prompt").await, &key),
        Err(e) => invalid(&st, e),
    }
}

/// Returns the request's prefix-affinity key ([`affinity`]) in the response header.
fn with_key(mut r: Response, key: &str) -> Response {
    if let Ok(v) = HeaderValue::from_str(key) {
        r.headers_mut().insert(affinity::HEADER, v);
    }
    r
}

fn invalid(st: &AppState, e: ApiError) -> Response {
    if e.status.is_client_error() {
        Metrics::add(&st.metrics.requests_invalid, 1);
    }
    e.into_response()
}

/// Checks the prompt against the context, queues the job and answers (streaming or not).
async fn start(
    st: &Arc<AppState>,
    kind: Kind,
    prompt: Vec<u32>,
    params: GenParams,
    echo: Option<String>,
    prompt_param: &str,
) -> Response {
    if prompt.is_empty() {
        return invalid(st, ApiError::invalid("the prompt is empty", Some(prompt_param)));
    }
    if prompt.len() >= st.ctx {
        let e = ApiError::invalid(
            format!(
                "the prompt has {} tokens but the context holds {} (the server's --ctx); shorten it",
                prompt.len(),
                st.ctx
            ),
            Some(prompt_param),
        )
        .with_code("context_length_exceeded");
        return invalid(st, e);
    }
    let room = st.ctx - prompt.len();
    let max_tokens = params.max_tokens.unwrap_or(room).min(room);
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let job = Job { prompt, params: params.clone(), max_tokens, events: tx, queued: std::time::Instant::now() };
    if let Err(e) = st.submit.submit(job) {
        return e.into_response();
    }
    let reply = Reply {
        kind,
        id: request_id(if kind == Kind::Chat { "chatcmpl" } else { "cmpl" }),
        created: now(),
        model: st.model_id.clone(),
        params,
        engine: st.engine.clone(),
        echo,
    };
    if reply.params.stream {
        let stream = SseStream { rx, reply, queue: VecDeque::new(), started: false, done: false, sent: 0 };
        Sse::new(stream).into_response()
    } else {
        whole(rx, reply).await
    }
}

fn finish_str(f: FinishReason) -> &'static str {
    match f {
        FinishReason::Stop => "stop",
        FinishReason::Length | FinishReason::Cancelled => "length",
    }
}

fn usage_json(u: &Usage) -> Value {
    json!({
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": u.cached_tokens},
    })
}

impl Reply {
    fn token_text(&self, id: u32) -> String {
        self.engine.tokenizer.decode(&[id]).unwrap_or_default()
    }

    /// Chat's `logprobs.content` entries.
    fn chat_logprobs(&self, lps: &[TokenLogprob]) -> Value {
        let entry = |id: u32, lp: f32| {
            let t = self.token_text(id);
            json!({"token": t, "logprob": finite(lp), "bytes": t.as_bytes()})
        };
        let content: Vec<Value> = lps
            .iter()
            .map(|l| {
                let mut e = entry(l.id, l.logprob);
                e["top_logprobs"] = l.top.iter().map(|&(id, lp)| entry(id, lp)).collect();
                e
            })
            .collect();
        json!({ "content": content })
    }

    /// Completions' legacy `logprobs` object; `offset` is the text length before these tokens.
    fn completion_logprobs(&self, lps: &[TokenLogprob], mut offset: usize) -> Value {
        let (mut tokens, mut token_lps, mut tops, mut offsets) = (vec![], vec![], vec![], vec![]);
        for l in lps {
            let t = self.token_text(l.id);
            offsets.push(offset);
            offset += t.len();
            tokens.push(t);
            token_lps.push(finite(l.logprob));
            let top: serde_json::Map<String, Value> =
                l.top.iter().map(|&(id, lp)| (self.token_text(id), finite(lp).into())).collect();
            tops.push(Value::Object(top));
        }
        json!({"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets})
    }

    fn envelope(&self, object: &str, choices: Value) -> Value {
        json!({
            "id": self.id, "object": object, "created": self.created, "model": self.model,
            "system_fingerprint": concat!("bitnest-", env!("CARGO_PKG_VERSION")), "choices": choices,
        })
    }

    /// One streamed chunk carrying `text` (and its logprobs) or the finish reason.
    fn chunk(&self, text: Option<&str>, lps: &[TokenLogprob], offset: usize, finish: Option<FinishReason>) -> Value {
        let want_lp = self.params.logprobs.is_some() && !lps.is_empty();
        let fin = finish.map(finish_str);
        match self.kind {
            Kind::Chat => {
                let delta = match text {
                    Some(t) => json!({"content": t}),
                    None => json!({}),
                };
                let lp = if want_lp { self.chat_logprobs(lps) } else { Value::Null };
                let choice = json!({"index": 0, "delta": delta, "logprobs": lp, "finish_reason": fin});
                self.envelope("chat.completion.chunk", json!([choice]))
            }
            Kind::Completion => {
                let lp = if want_lp { self.completion_logprobs(lps, offset) } else { Value::Null };
                let choice = json!({"index": 0, "text": text.unwrap_or(""), "logprobs": lp, "finish_reason": fin});
                self.envelope("text_completion", json!([choice]))
            }
        }
    }
}

/// JSON has no -inf: a token the model rules out entirely is reported at OpenAI's floor.
fn finite(lp: f32) -> f32 {
    if lp.is_finite() { lp } else { -9999.0 }
}

/// Non-streaming: gathers the whole answer. If the client goes away, this future is dropped
/// with the receiver, which the worker notices.
async fn whole(mut rx: UnboundedReceiver<Event>, reply: Reply) -> Response {
    let mut text = reply.echo.clone().unwrap_or_default();
    let mut lps: Vec<TokenLogprob> = Vec::new();
    while let Some(ev) = rx.recv().await {
        match ev {
            Event::Text { text: t, logprobs } => {
                text.push_str(&t);
                lps.extend(logprobs);
            }
            Event::Error(msg) => return ApiError::internal(msg).into_response(),
            Event::ShuttingDown => return ApiError::shutting_down().into_response(),
            Event::Done { finish, usage } => {
                let fin = finish_str(finish);
                let choice = match reply.kind {
                    Kind::Chat => {
                        let lp = if reply.params.logprobs.is_some() { reply.chat_logprobs(&lps) } else { Value::Null };
                        json!({"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": lp, "finish_reason": fin})
                    }
                    Kind::Completion => {
                        let start = reply.echo.as_ref().map_or(0, String::len);
                        let lp = if reply.params.logprobs.is_some() {
                            reply.completion_logprobs(&lps, start)
                        } else {
                            Value::Null
                        };
                        json!({"index": 0, "text": text, "logprobs": lp, "finish_reason": fin})
                    }
                };
                let object = if reply.kind == Kind::Chat { "chat.completion" } else { "text_completion" };
                let mut v = reply.envelope(object, json!([choice]));
                v["usage"] = usage_json(&usage);
                return axum::Json(v).into_response();
            }
        }
    }
    ApiError::shutting_down().into_response()
}

/// Streaming: worker events become SSE chunks. Dropping the response body (client gone) drops
/// the receiver, which the worker notices at the request's next step.
struct SseStream {
    rx: UnboundedReceiver<Event>,
    reply: Reply,
    queue: VecDeque<SseEvent>,
    started: bool,
    done: bool,
    /// Bytes of text sent so far (completions' `text_offset`).
    sent: usize,
}

impl SseStream {
    fn push(&mut self, v: &Value) {
        self.queue.push_back(SseEvent::default().data(v.to_string()));
    }

    fn on_event(&mut self, ev: Option<Event>) {
        match ev {
            Some(Event::Text { text, logprobs }) => {
                let v = self.reply.chunk(Some(&text), &logprobs, self.sent, None);
                self.sent += text.len();
                self.push(&v);
            }
            Some(Event::Done { finish, usage }) => {
                let v = self.reply.chunk(None, &[], 0, Some(finish));
                self.push(&v);
                if self.reply.params.include_usage {
                    let object =
                        if self.reply.kind == Kind::Chat { "chat.completion.chunk" } else { "text_completion" };
                    let mut v = self.reply.envelope(object, json!([]));
                    v["usage"] = usage_json(&usage);
                    self.push(&v);
                }
                self.queue.push_back(SseEvent::default().data("[DONE]"));
                self.done = true;
            }
            Some(Event::Error(msg)) => {
                self.push(&ApiError::internal(msg).body());
                self.done = true;
            }
            Some(Event::ShuttingDown) => {
                self.push(&ApiError::shutting_down().body());
                self.done = true;
            }
            None => {
                self.push(&ApiError::shutting_down().body());
                self.done = true;
            }
        }
    }
}

impl Stream for SseStream {
    type Item = Result<SseEvent, Infallible>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        if !this.started {
            this.started = true;
            // The first chunk announces the role (chat) or carries the echoed prompt.
            let first = match this.reply.kind {
                Kind::Chat => {
                    let choice = json!({"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null});
                    Some(this.reply.envelope("chat.completion.chunk", json!([choice])))
                }
                Kind::Completion => this.reply.echo.clone().map(|e| {
                    this.sent = e.len();
                    this.reply.chunk(Some(&e), &[], 0, None)
                }),
            };
            if let Some(v) = first {
                this.push(&v);
            }
        }
        loop {
            if let Some(e) = this.queue.pop_front() {
                return Poll::Ready(Some(Ok(e)));
            }
            if this.done {
                return Poll::Ready(None);
            }
            match this.rx.poll_recv(cx) {
                Poll::Ready(ev) => this.on_event(ev),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

async fn models(State(st): St) -> Response {
    axum::Json(json!({"object": "list", "data": [model_json(&st)]})).into_response()
}

async fn model(State(st): St, Path(id): Path<String>) -> Response {
    if id == st.model_id {
        axum::Json(model_json(&st)).into_response()
    } else {
        ApiError::not_found(format!("the model {id:?} does not exist; this server has {:?}", st.model_id))
            .with_code("model_not_found")
            .into_response()
    }
}

fn model_json(st: &AppState) -> Value {
    json!({"id": st.model_id, "object": "model", "created": st.started, "owned_by": "bitnest",
           "meta": {"n_ctx": st.ctx, "n_vocab": st.engine.model.config.vocab_size}})
}

/// Ready (the [`readiness`](super::readiness) gate answers 503 before and after): with the
/// slot and queue figures llama.cpp's `/health` gives, for a router or autoscaler to read.
async fn health(State(st): St) -> Response {
    let active = st.metrics.active.load(Ordering::Relaxed) as usize;
    axum::Json(json!({
        "status": "ok",
        "slots_idle": st.parallel.saturating_sub(active),
        "slots_processing": active,
        "queue_depth": st.metrics.queue_depth.load(Ordering::Relaxed),
    }))
    .into_response()
}

async fn metrics(State(st): St) -> Response {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], st.metrics.render(&st.spec)).into_response()
}

async fn tokenize(State(st): St, b: Result<Bytes, BytesRejection>) -> Response {
    let r = async {
        let b = body(b)?;
        let req: api::TokenizeRequest = api::parse(&b)?;
        let engine = st.engine.clone();
        tokio::task::spawn_blocking(move || {
            let parse_special = req.parse_special.unwrap_or(true);
            let mut ids = engine.tokenizer.encode(&req.content, parse_special)?;
            // `encode` adds BOS when the model asks for it; llama.cpp's endpoint only does with
            // `add_special`.
            let bos = engine.tokenizer.bos_id();
            if !req.add_special.unwrap_or(false)
                && engine.tokenizer.add_bos()
                && bos.is_some()
                && ids.first() == bos.as_ref()
            {
                ids.remove(0);
            }
            Ok::<_, anyhow::Error>(ids)
        })
        .await
        .map_err(|e| ApiError::internal(format!("tokenizer task failed: {e}")))?
        .map_err(|e| ApiError::invalid(format!("{e:#}"), Some("content")))
    }
    .await;
    match r {
        Ok(ids) => axum::Json(json!({ "tokens": ids })).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn detokenize(State(st): St, b: Result<Bytes, BytesRejection>) -> Response {
    let r = async {
        let b = body(b)?;
        let req: api::DetokenizeRequest = api::parse(&b)?;
        let vocab = st.engine.model.config.vocab_size;
        if let Some(bad) = req.tokens.iter().find(|&&id| id as usize >= vocab) {
            return Err(ApiError::invalid(
                format!("token id {bad} is outside the vocabulary of {vocab}"),
                Some("tokens"),
            ));
        }
        st.engine.tokenizer.decode(&req.tokens).map_err(|e| ApiError::invalid(format!("{e:#}"), Some("tokens")))
    }
    .await;
    match r {
        Ok(text) => axum::Json(json!({ "content": text })).into_response(),
        Err(e) => e.into_response(),
    }
}
