//! The OpenAI-compatible HTTP API (axum): chat and text completions (streaming or not), models,
//! tokenize/detokenize, health and Prometheus metrics.

use crate::engine::{EngineHandle, Event, FinishReason, GenRequest, Penalties, SubmitError};
use crate::metrics::Metrics;
use crate::protocol::{self, ApiError, ApiResult, GenOptions, Prompt, ToolChoice};
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use fp4_chat::{ChatTemplate, DeltaMessage, Detokenizer, OutputConfig, RenderRequest, StreamParser, Tokenizer};
use fp4_model::SamplingParams;
use futures::Stream;
use serde_json::{json, Map, Value};
use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc::UnboundedReceiver;

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub served_model_name: String,
    pub max_model_len: usize,
    pub api_key: Option<String>,
    /// `--default-chat-template-kwargs`, under each request's own.
    pub default_chat_template_kwargs: Map<String, Value>,
    /// `--reasoning-parser qwen3`.
    pub reasoning_parser: bool,
    /// `--enable-auto-tool-choice --tool-call-parser qwen3_coder`.
    pub tool_parser: bool,
    /// Stop ids (generation_config + config).
    pub eos_ids: Vec<u32>,
    /// `--special-tokens-in-content`: special-token strings inside chat messages act as special
    /// tokens (off: tokenized as text).
    pub special_tokens_in_content: bool,
    /// `--body-read-timeout`: how long a request's body may take to arrive after its headers.
    pub body_read_timeout: Duration,
}

/// Request bodies larger than this are refused (413).
pub const BODY_LIMIT: usize = 2 << 20;

pub struct AppState {
    pub engine: EngineHandle,
    pub tokenizer: Arc<Tokenizer>,
    pub template: Arc<ChatTemplate>,
    pub cfg: ServerConfig,
    pub metrics: Metrics,
    pub ready: AtomicBool,
    pub created: u64,
    pub vocab_size: usize,
}

pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/v1/models", get(models))
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route("/tokenize", post(tokenize))
        .route("/detokenize", post(detokenize))
        .layer(axum::middleware::from_fn_with_state(state.clone(), openai_errors))
        .with_state(state)
}

/// Routes behind `--api-key`: the OpenAI API and tokenize/detokenize (not health or metrics).
fn needs_auth(path: &str) -> bool {
    path.starts_with("/v1/") || path == "/tokenize" || path == "/detokenize"
}

/// Every response is OpenAI-shaped: the API key is checked here, for every route that needs it,
/// before a body is read (so an unauthenticated client gets 401, not 413), and the router's own
/// plain or empty error responses (unknown route, wrong method, body over the limit) become
/// OpenAI error JSON.
async fn openai_errors(
    State(s): State<Arc<AppState>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let (path, method) = (req.uri().path().to_string(), req.method().clone());
    if needs_auth(&path) {
        if let Err(e) = check_auth(&s, req.headers()) {
            return error_response(&e);
        }
    }
    let (parts, body) = req.into_parts();
    let body = match tokio::time::timeout(s.cfg.body_read_timeout, read_body(body)).await {
        Ok(Ok(b)) => b,
        Ok(Err(e)) => return error_response(&e),
        Err(_) => {
            return error_response(&ApiError::new(
                408,
                "invalid_request_error",
                format!("the request body did not arrive within {}s", s.cfg.body_read_timeout.as_secs()),
            ))
        }
    };
    let resp = next.run(axum::extract::Request::from_parts(parts, axum::body::Body::from(body))).await;
    let status = resp.status();
    let json = resp.headers().get(axum::http::header::CONTENT_TYPE).is_some_and(|v| {
        v.as_bytes().starts_with(b"application/json") || v.as_bytes().starts_with(b"text/event-stream")
    });
    if !(status.is_client_error() || status.is_server_error()) || json {
        return resp;
    }
    let e = match status.as_u16() {
        404 => ApiError::new(404, "not_found_error", format!("no route {path}")),
        405 => ApiError::new(405, "invalid_request_error", format!("{path} does not take {method}")),
        code => ApiError::new(code, "invalid_request_error", status.canonical_reason().unwrap_or("request failed")),
    };
    error_response(&e)
}

/// The whole request body, at most [`BODY_LIMIT`] bytes (a slow sender is bounded by the
/// caller's timeout, so it cannot hold a connection forever).
async fn read_body(body: axum::body::Body) -> ApiResult<Bytes> {
    use futures::StreamExt;
    let mut stream = body.into_data_stream();
    let mut buf = Vec::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk
            .map_err(|e| ApiError::new(400, "invalid_request_error", format!("cannot read the request body: {e}")))?;
        if buf.len() + chunk.len() > BODY_LIMIT {
            return Err(ApiError::new(
                413,
                "invalid_request_error",
                format!("the request body is larger than the server accepts ({} MiB)", BODY_LIMIT >> 20),
            ));
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(buf.into())
}

fn error_response(e: &ApiError) -> Response {
    let status = StatusCode::from_u16(e.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (status, Json(e.body())).into_response()
}

fn check_auth(s: &AppState, headers: &HeaderMap) -> ApiResult<()> {
    let Some(key) = &s.cfg.api_key else { return Ok(()) };
    let given = headers.get("authorization").and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
    if given == Some(key.as_str()) {
        Ok(())
    } else {
        Err(ApiError::new(
            401,
            "authentication_error",
            "missing or invalid API key (send `Authorization: Bearer <key>`)",
        ))
    }
}

fn check_model(s: &AppState, model: &Option<String>) -> ApiResult<()> {
    match model {
        Some(m) if m != &s.cfg.served_model_name => Err(ApiError {
            status: 404,
            kind: "not_found_error",
            message: format!("the model `{m}` does not exist; this server serves `{}`", s.cfg.served_model_name),
            param: Some("model".into()),
        }),
        _ => Ok(()),
    }
}

async fn health(State(s): State<Arc<AppState>>) -> StatusCode {
    if s.ready.load(Ordering::Relaxed) {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    }
}

async fn metrics(State(s): State<Arc<AppState>>) -> impl IntoResponse {
    ([("content-type", "text/plain; version=0.0.4")], s.metrics.render(&s.engine.stats))
}

async fn models(State(s): State<Arc<AppState>>) -> Response {
    Json(json!({"object": "list", "data": [{
        "id": s.cfg.served_model_name, "object": "model", "created": s.created, "owned_by": "fp4",
        "root": s.cfg.served_model_name, "max_model_len": s.cfg.max_model_len
    }]}))
    .into_response()
}

fn now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

fn new_id(prefix: &str) -> String {
    format!("{prefix}-{:032x}", rand::random::<u128>())
}

/// A request ready for the engine.
struct Prepared {
    prompt_ids: Vec<u32>,
    /// Text forced at the start of the output (tool_choice required/named); parsed as output.
    forced: String,
    gen: GenRequest,
    stops: Vec<String>,
    output: OutputConfig,
}

/// The engine request for `prompt` (from the request field `prompt_param`) and its options,
/// checked against the context length and the vocabulary.
fn gen_request(s: &AppState, prompt: Vec<u32>, prompt_param: &str, opts: &GenOptions) -> ApiResult<GenRequest> {
    let max_len = s.cfg.max_model_len;
    if prompt.len() >= max_len {
        return Err(ApiError::bad(
            prompt_param,
            format!(
                "this model's maximum context length is {max_len} tokens, but the prompt has {} tokens",
                prompt.len()
            ),
        ));
    }
    let max_tokens = match opts.max_tokens {
        Some(n) if n > max_len - prompt.len() => {
            return Err(ApiError::bad(
                "max_tokens",
                format!(
                    "this model's maximum context length is {max_len} tokens; the prompt has {} and max_tokens asks for {n} more",
                    prompt.len()
                ),
            ))
        }
        Some(n) => n,
        None => max_len - prompt.len(),
    };
    let vocab = s.vocab_size;
    if let Some(&id) = prompt.iter().find(|&&id| id as usize >= vocab) {
        return Err(ApiError::bad(prompt_param, format!("token id {id} is outside the vocabulary (size {vocab})")));
    }
    let prompt_len = prompt.len();
    Ok(GenRequest {
        prompt,
        sampling: SamplingParams {
            temperature: opts.temperature,
            top_p: opts.top_p,
            top_k: opts.top_k,
            min_p: opts.min_p,
            seed: opts.seed.unwrap_or_else(rand::random),
        },
        penalties: Penalties {
            presence: opts.presence_penalty,
            frequency: opts.frequency_penalty,
            repetition: opts.repetition_penalty,
        },
        max_tokens,
        stop_ids: if opts.ignore_eos { vec![] } else { s.cfg.eos_ids.clone() },
        logprobs: opts.logprobs,
        choices: vec![],
        // Where a continuation of this prompt resumes (chat requests choose their own points).
        snapshot_at: vec![prompt_len],
    })
}

/// Renders chat messages (and tools) with the template; unless `--special-tokens-in-content`,
/// special-token strings inside them are marked to be tokenized as text
/// ([`Tokenizer::protect`]). A template error names the message at fault.
fn render_protected(
    s: &AppState,
    messages: &[Value],
    tools: Option<&[Value]>,
    add_generation_prompt: bool,
    kwargs: Map<String, Value>,
) -> ApiResult<(String, Option<fp4_chat::Literals>)> {
    let mut lit = fp4_chat::Literals::default();
    let protected = (!s.cfg.special_tokens_in_content).then(|| {
        let m: Vec<Value> = messages.iter().map(|m| s.tokenizer.protect(m, &mut lit)).collect();
        let t: Option<Vec<Value>> = tools.map(|t| t.iter().map(|v| s.tokenizer.protect(v, &mut lit)).collect());
        (m, t)
    });
    let (messages, tools) = match &protected {
        Some((m, t)) => (m.as_slice(), t.as_deref()),
        None => (messages, tools),
    };
    let prompt =
        s.template.render(&RenderRequest { messages, tools, add_generation_prompt, kwargs }).map_err(|e| match e {
            fp4_chat::TemplateError::Message { index, msg } => {
                ApiError::bad(&format!("messages[{index}]"), lit.restore(&msg))
            }
            other => ApiError::bad("messages", lit.restore(&other.to_string())),
        })?;
    Ok((prompt, protected.map(|_| lit)))
}

/// Tokenizes a rendered chat prompt: marked literals as text when [`render_protected`] marked
/// them, else as given.
fn encode_chat(s: &AppState, text: &str, lit: Option<&fp4_chat::Literals>) -> ApiResult<Vec<u32>> {
    match lit {
        Some(l) => s.tokenizer.encode_protected(text, l),
        None => s.tokenizer.encode(text),
    }
    .map_err(|e| ApiError::new(500, "server_error", e.to_string()))
}

/// Where the part of the prompt `ids` that every request with the same system message (and
/// tools, which the template puts there) shares ends, when the conversation opens with one:
/// the longest common prefix with the system message followed by an empty user message (the
/// system block and the next turn's opening), rendered the same way. Requests that share it
/// resume from its snapshot. `None` when the template will not render that.
fn system_prompt_end(
    s: &AppState,
    req: &protocol::ChatRequest,
    ids: &[u32],
    kwargs: Map<String, Value>,
) -> Option<usize> {
    if req.messages.len() < 2 || req.messages[0]["role"] != "system" {
        return None;
    }
    let probe = [req.messages[0].clone(), json!({"role": "user", "content": ""})];
    shared_with_rendering(s, &probe, req, ids, kwargs)
}

/// Where the conversation `ids` renders ends before the generation prompt: the longest common
/// prefix with the messages rendered without it. The next turn of the conversation starts with
/// this part. `None` when the template will not render that or nothing is shared.
fn conversation_end(
    s: &AppState,
    req: &protocol::ChatRequest,
    ids: &[u32],
    kwargs: Map<String, Value>,
) -> Option<usize> {
    shared_with_rendering(s, &req.messages, req, ids, kwargs)
}

/// How many leading tokens `ids` shares with `messages` (and the request's tools) rendered
/// without a generation prompt; `None` when that fails, or when nothing or everything is shared.
fn shared_with_rendering(
    s: &AppState,
    messages: &[Value],
    req: &protocol::ChatRequest,
    ids: &[u32],
    kwargs: Map<String, Value>,
) -> Option<usize> {
    let (text, lit) = render_protected(s, messages, req.tools.as_deref(), false, kwargs).ok()?;
    let rendered = encode_chat(s, &text, lit.as_ref()).ok()?;
    let shared = ids.iter().zip(&rendered).take_while(|(a, b)| a == b).count();
    (shared > 0 && shared < ids.len()).then_some(shared)
}

fn prepare_chat(s: &AppState, req: &protocol::ChatRequest) -> ApiResult<Prepared> {
    // vLLM's answer (its wording, which clients match on): a server without a tool parser cannot
    // find calls in free text. `required` and named choices force the call's markup themselves.
    if req.tool_choice == ToolChoice::Auto && req.tools.is_some() && !s.cfg.tool_parser {
        return Err(ApiError::bad(
            "tool_choice",
            "\"auto\" tool choice requires --enable-auto-tool-choice and --tool-call-parser to be set",
        ));
    }
    let mut kwargs = s.cfg.default_chat_template_kwargs.clone();
    kwargs.extend(req.chat_template_kwargs.clone());
    let thinking = kwargs.get("enable_thinking").and_then(Value::as_bool) != Some(false);
    let (prompt, lit) = render_protected(s, &req.messages, req.tools.as_deref(), true, kwargs.clone())?;
    // tool_choice required/named: start the answer with the call (closing an open think block).
    let mut forced = String::new();
    if matches!(req.tool_choice, ToolChoice::Required | ToolChoice::Named(_)) {
        if prompt.ends_with("<think>\n") {
            forced.push_str("\n</think>\n\n");
        }
        forced.push_str("<tool_call>\n<function=");
        if let ToolChoice::Named(n) = &req.tool_choice {
            forced.push_str(n);
            forced.push_str(">\n");
        }
    }
    let ids = encode_chat(s, &format!("{prompt}{forced}"), lit.as_ref())?;
    let mut gen = gen_request(s, ids.clone(), "messages", &req.opts)?;
    // The system prompt's end (shared by other conversations) and the conversation's end before
    // the generation prompt (the next turn renders this turn's reply there, so the prompt's own
    // end, inside the generation prompt, is no prefix of it); the prompt's end only without one.
    let system = system_prompt_end(s, req, &ids, kwargs.clone());
    let conversation = conversation_end(s, req, &ids, kwargs);
    gen.snapshot_at = [system, conversation.or(Some(ids.len()))].into_iter().flatten().collect();
    gen.snapshot_at.dedup();
    if req.tool_choice == ToolChoice::Required {
        // The model must name one of the tools: the engine picks the likeliest `NAME>\n`.
        for t in req.tools.iter().flatten() {
            let name = t["function"]["name"].as_str().unwrap_or_default();
            let toks = s
                .tokenizer
                .encode(&format!("{name}>\n"))
                .map_err(|e| ApiError::new(500, "server_error", e.to_string()))?;
            gen.choices.push(toks);
        }
    }
    let forced_call = matches!(req.tool_choice, ToolChoice::Required | ToolChoice::Named(_));
    let tools_on = req.tools.is_some() && (forced_call || req.tool_choice == ToolChoice::Auto);
    Ok(Prepared {
        prompt_ids: ids,
        forced,
        gen,
        stops: req.opts.stop.clone(),
        output: OutputConfig {
            reasoning_parser: s.cfg.reasoning_parser,
            thinking,
            tools: if tools_on { req.tools.clone() } else { None },
            only_listed_tools: forced_call,
        },
    })
}

/// Text deltas of one generation: detokenized, cut at stop strings (never sending part of
/// one), then the finish reason and token counts.
struct TextStream<'a> {
    rx: UnboundedReceiver<Event>,
    detok: Detokenizer<'a>,
    tok: &'a Tokenizer,
    stops: Vec<String>,
    text: String,
    /// Bytes of `text` handed out.
    sent: usize,
    prompt_tokens: usize,
    /// Of the prompt, tokens restored from the prefix cache.
    cached_tokens: usize,
    tokens: usize,
    finish: Option<FinishReason>,
    done: bool,
    /// Logprob entries of tokens not yet attached to a response piece.
    logprobs: Vec<Value>,
    started: Instant,
    last_token: Option<Instant>,
}

enum Piece {
    Text(String),
    Done(FinishReason),
    Failed(String),
}

impl<'a> TextStream<'a> {
    fn new(rx: UnboundedReceiver<Event>, tok: &'a Tokenizer, stops: Vec<String>, prompt_tokens: usize) -> Self {
        TextStream {
            rx,
            detok: Detokenizer::new(tok, true),
            tok,
            stops,
            text: String::new(),
            sent: 0,
            prompt_tokens,
            cached_tokens: 0,
            tokens: 0,
            finish: None,
            done: false,
            logprobs: Vec::new(),
            started: Instant::now(),
            last_token: None,
        }
    }

    /// Longest proper prefix of a stop string at the end of the text (held back until decided).
    fn held(&self) -> usize {
        let mut hold = 0;
        for s in &self.stops {
            if let Some(n) = (1..s.len()).rev().find(|&n| s.is_char_boundary(n) && self.text.ends_with(&s[..n])) {
                hold = hold.max(n);
            }
        }
        hold
    }

    fn flush(&mut self, upto: usize) -> Option<Piece> {
        (upto > self.sent).then(|| {
            let out = self.text[self.sent..upto].to_string();
            self.sent = upto;
            Piece::Text(out)
        })
    }

    async fn next(&mut self, m: &Metrics) -> Option<Piece> {
        loop {
            if self.done {
                return None;
            }
            if let Some(reason) = self.finish {
                if let Some(p) = self.flush(self.text.len()) {
                    return Some(p);
                }
                self.done = true;
                return Some(Piece::Done(reason));
            }
            match self.rx.recv().await {
                None => {
                    self.done = true;
                    return Some(Piece::Failed("the engine dropped the request".into()));
                }
                Some(Event::Failed(e)) => {
                    self.done = true;
                    return Some(Piece::Failed(e));
                }
                Some(Event::Finished { reason, cached_tokens, .. }) => {
                    if let Ok(Some(rest)) = self.detok.finish() {
                        self.text.push_str(&rest);
                    }
                    self.finish = Some(reason);
                    self.cached_tokens = cached_tokens;
                }
                Some(Event::Token { id, logprob }) => {
                    let now = Instant::now();
                    match self.last_token {
                        None => m.ttft.observe(now.duration_since(self.started).as_secs_f64()),
                        Some(t) => m.itl.observe(now.duration_since(t).as_secs_f64()),
                    }
                    self.last_token = Some(now);
                    self.tokens += 1;
                    if let Some((lp, top)) = logprob {
                        let entry = |id: u32, lp: f32| {
                            let t = self.tok.decode(&[id], false).unwrap_or_default();
                            json!({"token": t, "logprob": lp, "bytes": t.as_bytes()})
                        };
                        let mut e = entry(id, lp);
                        e["top_logprobs"] = Value::Array(top.into_iter().map(|(i, l)| entry(i, l)).collect());
                        self.logprobs.push(e);
                    }
                    let before = self.text.len();
                    if let Ok(Some(delta)) = self.detok.push(id) {
                        self.text.push_str(&delta);
                    }
                    let longest = self.stops.iter().map(String::len).max().unwrap_or(0);
                    let from = before.saturating_sub(longest);
                    let from = (0..=from).rev().find(|&i| self.text.is_char_boundary(i)).unwrap_or(0);
                    let hit =
                        self.stops.iter().filter_map(|s| self.text[from..].find(s.as_str()).map(|i| from + i)).min();
                    if let Some(cut) = hit {
                        // Stop string: keep the text before it and cancel the sequence.
                        self.text.truncate(cut);
                        self.rx.close();
                        self.finish = Some(FinishReason::Stop);
                        continue;
                    }
                    let safe = self.text.len() - self.held();
                    if let Some(p) = self.flush(safe) {
                        return Some(p);
                    }
                }
            }
        }
    }
}

fn finish_name(r: FinishReason) -> &'static str {
    match r {
        FinishReason::Stop => "stop",
        FinishReason::Length => "length",
    }
}

fn submit(s: &AppState, gen: GenRequest) -> ApiResult<UnboundedReceiver<Event>> {
    s.engine.submit(gen).map_err(|e| match e {
        SubmitError::Overloaded(_) => ApiError::new(429, "rate_limit_error", e.to_string()),
        SubmitError::ShuttingDown => ApiError::new(503, "server_error", e.to_string()),
        SubmitError::TooLarge { .. } => ApiError::bad("max_tokens", e.to_string()),
    })
}

/// Runs a request's CPU-heavy preparation (JSON parsing, template rendering, tokenizing) on the
/// blocking pool, so that large requests never stall the async runtime (health checks, streams).
async fn off_runtime<T: Send + 'static>(f: impl FnOnce() -> ApiResult<T> + Send + 'static) -> ApiResult<T> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|e| Err(ApiError::new(500, "server_error", format!("request preparation failed: {e}"))))
}

async fn chat(State(s): State<Arc<AppState>>, body: Bytes) -> Response {
    s.metrics.requests.fetch_add(1, Ordering::Relaxed);
    let result = async {
        let st = s.clone();
        let (req, prep) = off_runtime(move || {
            let req = protocol::chat_request(&protocol::parse_body(&body)?)?;
            check_model(&st, &req.model)?;
            let prep = prepare_chat(&st, &req)?;
            Ok((req, prep))
        })
        .await?;
        let rx = submit(&s, prep.gen.clone())?;
        Ok::<_, ApiError>((req, prep, rx))
    }
    .await;
    let (req, prep, rx) = match result {
        Ok(v) => v,
        Err(e) => {
            s.metrics.errors.fetch_add(1, Ordering::Relaxed);
            return error_response(&e);
        }
    };
    if req.opts.stream {
        Sse::new(chat_stream(s, req, prep, rx)).into_response()
    } else {
        chat_whole(&s, &req, prep, rx).await
    }
}

/// OpenAI's usage object; `prompt_tokens_details.cached_tokens` counts the prompt tokens the
/// prefix cache restored instead of prefilling.
fn usage(ts: &TextStream) -> Value {
    let (prompt, completion) = (ts.prompt_tokens, ts.tokens);
    json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
           "prompt_tokens_details": {"cached_tokens": ts.cached_tokens}})
}

async fn chat_whole(
    s: &AppState,
    req: &protocol::ChatRequest,
    prep: Prepared,
    rx: UnboundedReceiver<Event>,
) -> Response {
    let mut ts = TextStream::new(rx, &s.tokenizer, prep.stops.clone(), prep.prompt_ids.len());
    let mut text = prep.forced.clone();
    let reason = loop {
        match ts.next(&s.metrics).await {
            Some(Piece::Text(t)) => text.push_str(&t),
            Some(Piece::Done(r)) => break r,
            Some(Piece::Failed(e)) => return failure(s, e),
            None => return failure(s, "generation ended without a result".into()),
        }
    };
    let mut msg = fp4_chat::parse(&text, &prep.output);
    if !req.parallel_tool_calls {
        msg.tool_calls.truncate(1);
    }
    let finish = if msg.tool_calls.is_empty() { finish_name(reason) } else { "tool_calls" };
    let logprobs = req.opts.logprobs.map(|_| json!({"content": ts.logprobs}));
    Json(json!({
        "id": new_id("chatcmpl"), "object": "chat.completion", "created": now(), "model": s.cfg.served_model_name,
        "choices": [{"index": 0, "message": msg, "logprobs": logprobs, "finish_reason": finish}],
        "usage": usage(&ts),
    }))
    .into_response()
}

fn failure(s: &AppState, msg: String) -> Response {
    s.metrics.errors.fetch_add(1, Ordering::Relaxed);
    error_response(&ApiError::new(500, "server_error", msg))
}

fn sse(v: &Value) -> Result<SseEvent, Infallible> {
    Ok(SseEvent::default().data(v.to_string()))
}

fn chat_stream(
    s: Arc<AppState>,
    req: protocol::ChatRequest,
    prep: Prepared,
    rx: UnboundedReceiver<Event>,
) -> impl Stream<Item = Result<SseEvent, Infallible>> {
    async_stream::stream! {
        let id = new_id("chatcmpl");
        let created = now();
        let model = s.cfg.served_model_name.clone();
        let chunk = |delta: Value, finish: Option<&str>, logprobs: Option<Value>| json!({
            "id": id, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}],
        });
        yield sse(&chunk(json!({"role": "assistant", "content": ""}), None, None));
        let mut parser = StreamParser::new(prep.output.clone());
        let mut ts = TextStream::new(rx, &s.tokenizer, prep.stops.clone(), prep.prompt_ids.len());
        let mut any_tool_call = false;
        let mut pending: Option<DeltaMessage> = if prep.forced.is_empty() { None } else { parser.push(&prep.forced) };
        let single = !req.parallel_tool_calls;
        let keep = |mut d: DeltaMessage| {
            if single {
                d.tool_calls.retain(|t| t.index == 0);
            }
            (!d.is_empty()).then_some(d)
        };
        let reason = loop {
            if let Some(d) = pending.take().and_then(keep) {
                any_tool_call |= !d.tool_calls.is_empty();
                let lp = req.opts.logprobs.map(|_| json!({"content": std::mem::take(&mut ts.logprobs)}));
                yield sse(&chunk(serde_json::to_value(&d).unwrap_or_default(), None, lp));
            }
            match ts.next(&s.metrics).await {
                Some(Piece::Text(t)) => pending = parser.push(&t),
                Some(Piece::Done(r)) => break Some(r),
                Some(Piece::Failed(e)) => {
                    s.metrics.errors.fetch_add(1, Ordering::Relaxed);
                    yield sse(&ApiError::new(500, "server_error", e).body());
                    break None;
                }
                None => break None,
            }
        };
        if let Some(reason) = reason {
            if let Some(d) = parser.finish().and_then(keep) {
                any_tool_call |= !d.tool_calls.is_empty();
                yield sse(&chunk(serde_json::to_value(&d).unwrap_or_default(), None, None));
            }
            let finish = if any_tool_call { "tool_calls" } else { finish_name(reason) };
            yield sse(&chunk(json!({}), Some(finish), None));
            if req.opts.include_usage {
                yield sse(&json!({"id": id, "object": "chat.completion.chunk", "created": created, "model": model,
                                  "choices": [], "usage": usage(&ts)}));
            }
        }
        yield Ok(SseEvent::default().data("[DONE]"));
    }
}

async fn completions(State(s): State<Arc<AppState>>, body: Bytes) -> Response {
    s.metrics.requests.fetch_add(1, Ordering::Relaxed);
    let result = async {
        let st = s.clone();
        let (req, prompt_text, gen) = off_runtime(move || {
            let req = protocol::completion_request(&protocol::parse_body(&body)?)?;
            check_model(&st, &req.model)?;
            let (ids, prompt_text) = match &req.prompt {
                Prompt::Text(t) => {
                    (st.tokenizer.encode(t).map_err(|e| ApiError::new(500, "server_error", e.to_string()))?, t.clone())
                }
                Prompt::Ids(ids) => (ids.clone(), st.tokenizer.decode(ids, false).unwrap_or_default()),
            };
            if ids.is_empty() {
                return Err(ApiError::bad("prompt", "`prompt` must not be empty"));
            }
            let gen = gen_request(&st, ids, "prompt", &req.opts)?;
            Ok((req, prompt_text, gen))
        })
        .await?;
        let prompt_tokens = gen.prompt.len();
        let rx = submit(&s, gen)?;
        Ok::<_, ApiError>((req, prompt_text, prompt_tokens, rx))
    }
    .await;
    let (req, prompt_text, prompt_tokens, rx) = match result {
        Ok(v) => v,
        Err(e) => {
            s.metrics.errors.fetch_add(1, Ordering::Relaxed);
            return error_response(&e);
        }
    };
    let id = new_id("cmpl");
    let created = now();
    if req.opts.stream {
        let stream = async_stream::stream! {
            let model = s.cfg.served_model_name.clone();
            let chunk = |text: &str, finish: Option<&str>| json!({
                "id": id, "object": "text_completion", "created": created, "model": model,
                "choices": [{"index": 0, "text": text, "logprobs": null, "finish_reason": finish}],
            });
            if req.echo {
                yield sse(&chunk(&prompt_text, None));
            }
            let mut ts = TextStream::new(rx, &s.tokenizer, req.opts.stop.clone(), prompt_tokens);
            loop {
                match ts.next(&s.metrics).await {
                    Some(Piece::Text(t)) => yield sse(&chunk(&t, None)),
                    Some(Piece::Done(r)) => {
                        yield sse(&chunk("", Some(finish_name(r))));
                        if req.opts.include_usage {
                            yield sse(&json!({"id": id, "object": "text_completion", "created": created, "model": model,
                                              "choices": [], "usage": usage(&ts)}));
                        }
                        break;
                    }
                    Some(Piece::Failed(e)) => {
                        yield sse(&ApiError::new(500, "server_error", e).body());
                        break;
                    }
                    None => break,
                }
            }
            yield Ok(SseEvent::default().data("[DONE]"));
        };
        return Sse::new(stream).into_response();
    }
    let mut ts = TextStream::new(rx, &s.tokenizer, req.opts.stop.clone(), prompt_tokens);
    let mut text = if req.echo { prompt_text } else { String::new() };
    let reason = loop {
        match ts.next(&s.metrics).await {
            Some(Piece::Text(t)) => text.push_str(&t),
            Some(Piece::Done(r)) => break r,
            Some(Piece::Failed(e)) => return failure(&s, e),
            None => return failure(&s, "generation ended without a result".into()),
        }
    };
    let logprobs = req.opts.logprobs.map(|_| json!({"content": ts.logprobs}));
    Json(json!({
        "id": id, "object": "text_completion", "created": created, "model": s.cfg.served_model_name,
        "choices": [{"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish_name(reason)}],
        "usage": usage(&ts),
    }))
    .into_response()
}

async fn tokenize(State(s): State<Arc<AppState>>, body: Bytes) -> Response {
    let result = off_runtime(move || {
        let m = protocol::parse_body(&body)?;
        let (text, lit) = if let Some(Value::Array(messages)) = m.get("messages") {
            let gen = m.get("add_generation_prompt").and_then(Value::as_bool).unwrap_or(true);
            let kwargs = m.get("chat_template_kwargs").and_then(Value::as_object).cloned().unwrap_or_default();
            let tools = m.get("tools").and_then(Value::as_array).cloned();
            render_protected(&s, messages, tools.as_deref(), gen, kwargs)?
        } else if let Some(Value::String(p)) = m.get("prompt") {
            (p.clone(), None)
        } else {
            return Err(ApiError::bad("prompt", "give `prompt` (a string) or `messages`"));
        };
        let tokens = encode_chat(&s, &text, lit.as_ref())?;
        Ok(json!({"count": tokens.len(), "max_model_len": s.cfg.max_model_len, "tokens": tokens}))
    })
    .await;
    match result {
        Ok(v) => Json(v).into_response(),
        Err(e) => error_response(&e),
    }
}

async fn detokenize(State(s): State<Arc<AppState>>, body: Bytes) -> Response {
    let result = (|| {
        let m = protocol::parse_body(&body)?;
        let ids: Vec<u64> = m
            .get("tokens")
            .and_then(Value::as_array)
            .and_then(|a| a.iter().map(Value::as_u64).collect())
            .ok_or_else(|| ApiError::bad("tokens", "`tokens` must be a list of token ids"))?;
        let tokens = protocol::token_ids(&ids, "tokens", s.vocab_size)?;
        let prompt =
            s.tokenizer.decode(&tokens, false).map_err(|e| ApiError::new(500, "server_error", e.to_string()))?;
        Ok(json!({"prompt": prompt}))
    })();
    match result {
        Ok(v) => Json(v).into_response(),
        Err(e) => error_response(&e),
    }
}
