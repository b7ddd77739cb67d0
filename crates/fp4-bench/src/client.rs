//! The HTTP side: model discovery and one streamed chat completion with timestamps.

use serde_json::{json, Value};
use std::io::{BufRead, BufReader};
use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub struct Backend {
    pub name: String,
    /// Base URL, e.g. `http://localhost:8000` (a trailing `/v1` is accepted).
    pub url: String,
    pub api_key: Option<String>,
}

impl Backend {
    fn endpoint(&self, path: &str) -> String {
        let base = self.url.trim_end_matches('/');
        let base = base.strip_suffix("/v1").unwrap_or(base);
        format!("{base}/v1/{path}")
    }

    fn agent(timeout: Duration) -> ureq::Agent {
        ureq::AgentBuilder::new().timeout_connect(Duration::from_secs(10)).timeout_read(timeout).build()
    }

    fn auth(&self, r: ureq::Request) -> ureq::Request {
        match &self.api_key {
            Some(k) => r.set("Authorization", &format!("Bearer {k}")),
            None => r,
        }
    }

    /// The server's speculative-decoding counters from its Prometheus `/metrics` (fp4's and
    /// vLLM's names); `None` when it has no such endpoint or counters.
    pub fn spec_counters(&self, timeout: Duration) -> Option<SpecCounters> {
        let base = self.url.trim_end_matches('/');
        let base = base.strip_suffix("/v1").unwrap_or(base);
        let r = self.auth(Self::agent(timeout).get(&format!("{base}/metrics"))).call().ok()?;
        SpecCounters::parse(&r.into_string().ok()?)
    }

    /// The served model's id (first entry of /v1/models).
    pub fn model(&self, timeout: Duration) -> Result<String, String> {
        let r = self.auth(Self::agent(timeout).get(&self.endpoint("models"))).call().map_err(|e| e.to_string())?;
        let v: Value = r.into_json().map_err(|e| format!("/v1/models did not return JSON: {e}"))?;
        v["data"][0]["id"].as_str().map(str::to_string).ok_or_else(|| format!("/v1/models lists no model: {v}"))
    }
}

/// Speculative decoding as a server counts it: verifies (drafting sequences × steps), tokens
/// drafted, drafted tokens kept.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SpecCounters {
    pub drafts: u64,
    pub draft_tokens: u64,
    pub accepted: u64,
}

impl SpecCounters {
    /// The counters in a Prometheus text page (fp4's `fp4_spec_decode_*_total`, vLLM's
    /// `vllm:spec_decode_*_total`); `None` when it has none.
    pub fn parse(page: &str) -> Option<SpecCounters> {
        let value = |suffix: &str| {
            page.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
                let (name, v) = l.split_once(' ')?;
                let name = name.split('{').next()?;
                let known = ["fp4_spec_decode_", "vllm:spec_decode_"].iter().any(|p| name == format!("{p}{suffix}"));
                known.then(|| v.trim().parse::<f64>().ok()).flatten().map(|x| x as u64)
            })
        };
        Some(SpecCounters {
            drafts: value("num_drafts_total")?,
            draft_tokens: value("num_draft_tokens_total")?,
            accepted: value("num_accepted_tokens_total")?,
        })
    }

    /// What happened between `before` and `self`.
    pub fn since(&self, before: &SpecCounters) -> SpecCounters {
        SpecCounters {
            drafts: self.drafts.saturating_sub(before.drafts),
            draft_tokens: self.draft_tokens.saturating_sub(before.draft_tokens),
            accepted: self.accepted.saturating_sub(before.accepted),
        }
    }
}

/// Speculative decoding over a run, from the server's counters.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Speculative {
    pub drafts: u64,
    pub draft_tokens: u64,
    pub accepted_tokens: u64,
    /// Accepted over drafted tokens.
    pub acceptance_rate: f64,
    /// Tokens per verify: 1 + accepted / drafts.
    pub mean_accepted_length: f64,
}

impl Speculative {
    pub fn of(c: SpecCounters) -> Option<Speculative> {
        (c.drafts > 0 && c.draft_tokens > 0).then(|| Speculative {
            drafts: c.drafts,
            draft_tokens: c.draft_tokens,
            accepted_tokens: c.accepted,
            acceptance_rate: c.accepted as f64 / c.draft_tokens as f64,
            mean_accepted_length: 1.0 + c.accepted as f64 / c.drafts as f64,
        })
    }
}

/// One streamed reply and its timing.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Reply {
    pub content: String,
    pub reasoning: String,
    /// (function name, arguments JSON text)
    pub tool_calls: Vec<(String, String)>,
    pub finish_reason: Option<String>,
    /// Server usage count when sent, else the number of content/reasoning deltas.
    pub completion_tokens: usize,
    pub usage_reported: bool,
    /// `usage.prompt_tokens` and `usage.prompt_tokens_details.cached_tokens` when reported.
    pub prompt_tokens: Option<usize>,
    pub cached_tokens: Option<usize>,
    /// Request sent → first delta of any kind.
    pub ttft_any_ms: Option<f64>,
    /// Request sent → first delta with visible content (what a voice pipeline waits for).
    pub ttft_ms: Option<f64>,
    pub decode_tok_s: Option<f64>,
    pub total_ms: f64,
    pub error: Option<String>,
}

/// Sends one streaming chat completion and times it. Network errors, HTTP errors, timeouts and
/// garbage end up in `error`, never as a panic.
pub fn chat(backend: &Backend, model: &str, body: &Value, timeout: Duration) -> Reply {
    let mut body = body.clone();
    body["model"] = json!(model);
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let started = Instant::now();
    let mut reply = Reply::default();
    let resp = backend.auth(Backend::agent(timeout).post(&backend.endpoint("chat/completions"))).send_json(body);
    let resp = match resp {
        Ok(r) => r,
        Err(ureq::Error::Status(code, r)) => {
            reply.error = Some(format!(
                "HTTP {code}: {}",
                r.into_string().unwrap_or_default().chars().take(300).collect::<String>()
            ));
            reply.total_ms = started.elapsed().as_secs_f64() * 1e3;
            return reply;
        }
        Err(e) => {
            reply.error = Some(e.to_string());
            reply.total_ms = started.elapsed().as_secs_f64() * 1e3;
            return reply;
        }
    };
    let (mut deltas, mut first_content, mut last_content) = (0usize, None::<Instant>, None::<Instant>);
    for line in BufReader::new(resp.into_reader()).lines() {
        let line = match line {
            Ok(l) => l,
            Err(e) => {
                reply.error = Some(format!("stream broke off: {e}"));
                break;
            }
        };
        let Some(data) = line.strip_prefix("data:").map(str::trim) else { continue };
        if data == "[DONE]" {
            break;
        }
        let v: Value = match serde_json::from_str(data) {
            Ok(v) => v,
            Err(_) => {
                reply.error = Some(format!("not JSON in the stream: {}", data.chars().take(120).collect::<String>()));
                continue;
            }
        };
        if let Some(e) = v.get("error") {
            reply.error = Some(format!("error in the stream: {e}"));
            continue;
        }
        if let Some(n) = v["usage"]["completion_tokens"].as_u64() {
            reply.completion_tokens = n as usize;
            reply.usage_reported = true;
        }
        if let Some(n) = v["usage"]["prompt_tokens"].as_u64() {
            reply.prompt_tokens = Some(n as usize);
        }
        if let Some(n) = v["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64() {
            reply.cached_tokens = Some(n as usize);
        }
        let Some(choice) = v["choices"].get(0) else { continue };
        let now = Instant::now();
        let d = &choice["delta"];
        let content = d["content"].as_str().unwrap_or("");
        let reasoning = d["reasoning_content"].as_str().or(d["reasoning"].as_str()).unwrap_or("");
        let tools = d["tool_calls"].as_array();
        if !content.is_empty() || !reasoning.is_empty() || tools.is_some() {
            reply.ttft_any_ms.get_or_insert(now.duration_since(started).as_secs_f64() * 1e3);
        }
        if !content.is_empty() || !reasoning.is_empty() {
            deltas += 1;
        }
        if !content.trim().is_empty() || tools.is_some() {
            first_content.get_or_insert(now);
            last_content = Some(now);
        }
        reply.content.push_str(content);
        reply.reasoning.push_str(reasoning);
        for tc in tools.into_iter().flatten() {
            let i = tc["index"].as_u64().unwrap_or(reply.tool_calls.len() as u64) as usize;
            while reply.tool_calls.len() <= i {
                reply.tool_calls.push((String::new(), String::new()));
            }
            if let Some(n) = tc["function"]["name"].as_str() {
                reply.tool_calls[i].0.push_str(n);
            }
            if let Some(a) = tc["function"]["arguments"].as_str() {
                reply.tool_calls[i].1.push_str(a);
            }
        }
        if let Some(f) = choice["finish_reason"].as_str() {
            reply.finish_reason = Some(f.to_string());
        }
    }
    reply.total_ms = started.elapsed().as_secs_f64() * 1e3;
    if !reply.usage_reported {
        reply.completion_tokens = deltas;
    }
    if let Some(first) = first_content {
        reply.ttft_ms = Some(first.duration_since(started).as_secs_f64() * 1e3);
        let span = last_content.map(|l| l.duration_since(first).as_secs_f64()).unwrap_or(0.0);
        if reply.completion_tokens > 1 && span > 0.0 {
            reply.decode_tok_s = Some((reply.completion_tokens - 1) as f64 / span);
        }
    }
    reply
}
