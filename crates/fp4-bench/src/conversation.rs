//! The conversation benchmark (`fp4 bench --conversation N`): time to first token turn by turn
//! over one growing conversation, the way a voice assistant talks: the suite's system prompt and
//! tools, its test prompts as the user's turns (in order, repeated when there are fewer than N),
//! each request carrying the whole history so far. The first backend's own replies make the
//! history; every other backend gets exactly the same requests, so their TTFTs compare like for
//! like. A server that re-processes the whole prompt every turn shows a TTFT growing with the
//! history; one with a prefix cache for its hybrid state stays flat (`cached_tokens` says how
//! much of each prompt it did not prefill, where the server reports it).

use crate::client::{self, Backend, Reply, Speculative};
use crate::run::Dist;
use crate::suite::Suite;
use serde::Serialize;
use serde_json::{json, Value};
use std::time::Duration;

#[derive(Debug, Clone)]
pub struct ConversationOptions {
    pub turns: usize,
    /// Unmeasured requests per backend first (a short prompt unrelated to the conversation, so
    /// that its first turn stays cold).
    pub warmup: usize,
    /// Tokens per reply (the history grows by each reply).
    pub max_tokens: u32,
    pub timeout: Duration,
}

/// One turn on one backend.
#[derive(Debug, Clone, Serialize)]
pub struct Turn {
    pub turn: usize,
    /// Request sent → first visible content (or tool call); `ttft_any_ms` counts reasoning too.
    pub ttft_ms: Option<f64>,
    pub ttft_any_ms: Option<f64>,
    /// As the server reported them in `usage` (absent when it does not).
    pub prompt_tokens: Option<usize>,
    pub cached_tokens: Option<usize>,
    pub completion_tokens: usize,
    pub error: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ConversationResult {
    pub name: String,
    pub url: String,
    pub model: Option<String>,
    /// Why the backend could not be measured at all (then `turns` is empty).
    pub error: Option<String>,
    pub turns: Vec<Turn>,
    /// Over the turns with a TTFT.
    pub ttft_ms: Dist,
    /// Largest over smallest TTFT: ≈ 1 when the TTFT stays flat over the conversation.
    pub ttft_max_over_min: Option<f64>,
    /// The same from the second turn on (the first cannot resume from anything).
    pub ttft_max_over_min_after_first: Option<f64>,
    /// Speculative decoding over the turns, from the server's /metrics (absent when it reports
    /// none or drafted nothing).
    pub speculative: Option<Speculative>,
}

/// The request of every turn, built while `first` answers them (its replies become the history).
fn converse(
    suite: &Suite,
    first: &Backend,
    model: &str,
    opts: &ConversationOptions,
    progress: &mut dyn FnMut(),
) -> (Vec<Value>, Vec<Reply>) {
    let mut messages = vec![json!({"role": "system", "content": suite.system_prompt})];
    let (mut bodies, mut replies) = (Vec::with_capacity(opts.turns), Vec::with_capacity(opts.turns));
    for t in 0..opts.turns {
        messages.push(json!({"role": "user", "content": suite.tests[t % suite.tests.len()].prompt}));
        let body = request(suite, &messages, opts.max_tokens);
        let reply = client::chat(first, model, &body, opts.timeout);
        progress();
        messages.extend(history_of(&reply, t));
        bodies.push(body);
        replies.push(reply);
    }
    (bodies, replies)
}

fn request(suite: &Suite, messages: &[Value], max_tokens: u32) -> Value {
    let mut body = json!({
        "messages": messages,
        // Greedy, so that a rerun asks the same questions with the same history.
        "temperature": 0.0,
        "max_tokens": max_tokens,
        "chat_template_kwargs": {"enable_thinking": suite.params.enable_thinking},
    });
    if let Ok(tools) = suite.tool_values() {
        if !tools.is_empty() {
            body["tools"] = Value::Array(tools);
        }
    }
    body
}

/// The messages a reply adds to the history: the assistant's turn (with its tool calls, each
/// answered by an empty tool result, as a client without that tool would).
fn history_of(reply: &Reply, turn: usize) -> Vec<Value> {
    let content = if reply.error.is_some() { "(no reply)" } else { reply.content.as_str() };
    if reply.tool_calls.is_empty() {
        return vec![json!({"role": "assistant", "content": content})];
    }
    let id = |i: usize| format!("call_{turn}_{i}");
    let calls: Vec<Value> = reply
        .tool_calls
        .iter()
        .enumerate()
        .map(
            |(i, (name, args))| json!({"id": id(i), "type": "function", "function": {"name": name, "arguments": args}}),
        )
        .collect();
    let mut out = vec![json!({"role": "assistant", "content": content, "tool_calls": calls})];
    out.extend((0..reply.tool_calls.len()).map(|i| json!({"role": "tool", "tool_call_id": id(i), "content": "{}"})));
    out
}

fn turn_of(turn: usize, r: &Reply) -> Turn {
    Turn {
        turn: turn + 1,
        ttft_ms: r.ttft_ms,
        ttft_any_ms: r.ttft_any_ms,
        prompt_tokens: r.prompt_tokens,
        cached_tokens: r.cached_tokens,
        completion_tokens: r.completion_tokens,
        error: r.error.clone(),
    }
}

fn result(
    b: &Backend,
    model: Option<String>,
    error: Option<String>,
    turns: Vec<Turn>,
    speculative: Option<Speculative>,
) -> ConversationResult {
    let ttfts = |from: usize| -> Dist {
        Dist::of(turns.iter().skip(from).filter_map(|t| t.ttft_ms.or(t.ttft_any_ms)).collect())
    };
    let spread = |d: &Dist| match (d.min, d.max) {
        (Some(lo), Some(hi)) if lo > 0.0 => Some(hi / lo),
        _ => None,
    };
    let ttft_ms = ttfts(0);
    let (ttft_max_over_min, ttft_max_over_min_after_first) = (spread(&ttft_ms), spread(&ttfts(1)));
    ConversationResult {
        name: b.name.clone(),
        url: b.url.clone(),
        model,
        error,
        turns,
        ttft_ms,
        ttft_max_over_min,
        ttft_max_over_min_after_first,
        speculative,
    }
}

/// Runs the conversation on every backend, the first one's replies making the history.
pub fn run(
    suite: &Suite,
    backends: &[Backend],
    opts: &ConversationOptions,
    progress: &dyn Fn(usize, usize),
) -> Vec<ConversationResult> {
    let total = backends.len() * (opts.warmup + opts.turns);
    let mut done = 0;
    let mut tick = || {
        done += 1;
        progress(done, total);
    };
    let warm = json!({"messages": [{"role": "user", "content": "Hello."}], "temperature": 0.0, "max_tokens": 4});
    let mut script: Option<Vec<Value>> = None;
    let mut out = Vec::with_capacity(backends.len());
    for b in backends {
        let model = match b.model(opts.timeout) {
            Ok(m) => m,
            Err(e) => {
                (0..opts.warmup + opts.turns).for_each(|_| tick());
                out.push(result(b, None, Some(format!("backend unavailable: {e}")), Vec::new(), None));
                continue;
            }
        };
        for _ in 0..opts.warmup {
            let _ = client::chat(b, &model, &warm, opts.timeout);
            tick();
        }
        let counters_before = b.spec_counters(opts.timeout);
        let turns = match &script {
            None => {
                let (bodies, replies) = converse(suite, b, &model, opts, &mut tick);
                script = Some(bodies);
                replies.iter().enumerate().map(|(t, r)| turn_of(t, r)).collect()
            }
            Some(bodies) => bodies
                .iter()
                .enumerate()
                .map(|(t, body)| {
                    let r = client::chat(b, &model, body, opts.timeout);
                    tick();
                    turn_of(t, &r)
                })
                .collect(),
        };
        let speculative = match (counters_before, b.spec_counters(opts.timeout)) {
            (Some(before), Some(after)) => Speculative::of(after.since(&before)),
            _ => None,
        };
        out.push(result(b, Some(model), None, turns, speculative));
    }
    out
}

/// `schema: fp4.conversation-bench.v1`.
pub fn json_report(
    suite: &Suite,
    opts: &ConversationOptions,
    results: &[ConversationResult],
    started: u64,
    finished: u64,
) -> Value {
    json!({
        "schema": "fp4.conversation-bench.v1",
        "suite": suite.name,
        "turns": opts.turns,
        "max_tokens": opts.max_tokens,
        "unix_time_start": started,
        "unix_time_end": finished,
        "backends": results,
    })
}

/// A turn-by-turn table (prompt tokens, TTFT and cached tokens per backend) and a summary line.
pub fn markdown(opts: &ConversationOptions, results: &[ConversationResult]) -> String {
    let mut md = format!("# Conversation: TTFT over {} turns\n\n| turn | prompt tokens |", opts.turns);
    for r in results {
        md += &format!(" {} TTFT ms | {} cached |", r.name, r.name);
    }
    md += "\n|---|---|";
    md += &"---|---|".repeat(results.len());
    md += "\n";
    let num = |v: Option<f64>| v.map_or("–".to_string(), |x| format!("{x:.0}"));
    let count = |v: Option<usize>| v.map_or("–".to_string(), |x| x.to_string());
    for t in 0..opts.turns {
        let prompt = results.iter().find_map(|r| r.turns.get(t).and_then(|x| x.prompt_tokens));
        md += &format!("| {} | {} |", t + 1, count(prompt));
        for r in results {
            match r.turns.get(t) {
                Some(x) if x.error.is_some() => md += " error | – |",
                Some(x) => md += &format!(" {} | {} |", num(x.ttft_ms.or(x.ttft_any_ms)), count(x.cached_tokens)),
                None => md += " – | – |",
            }
        }
        md += "\n";
    }
    md += "\n";
    for r in results {
        match &r.error {
            Some(e) => md += &format!("- {}: not measured ({e})\n", r.name),
            None => {
                let ratio = |x: Option<f64>| x.map_or("–".into(), |x| format!("{x:.2}"));
                md += &format!(
                    "- {}: TTFT min {} / p50 {} / max {} ms, max ÷ min {} ({} from turn 2 on)\n",
                    r.name,
                    num(r.ttft_ms.min),
                    num(r.ttft_ms.p50),
                    num(r.ttft_ms.max),
                    ratio(r.ttft_max_over_min),
                    ratio(r.ttft_max_over_min_after_first)
                );
                if let Some(s) = &r.speculative {
                    md += &format!(
                        "- {}: speculative decoding kept {} of {} drafted tokens ({:.0} %), {:.2} tokens per verify\n",
                        r.name,
                        s.accepted_tokens,
                        s.draft_tokens,
                        100.0 * s.acceptance_rate,
                        s.mean_accepted_length
                    );
                }
            }
        }
    }
    md
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::SpecCounters;

    #[test]
    fn tool_calls_enter_the_history_with_their_results() {
        let reply = Reply {
            content: String::new(),
            tool_calls: vec![("search_memory".into(), r#"{"query": "sister"}"#.into())],
            ..Default::default()
        };
        let h = history_of(&reply, 3);
        assert_eq!(h.len(), 2);
        assert_eq!(h[0]["tool_calls"][0]["id"], "call_3_0");
        assert_eq!(h[0]["tool_calls"][0]["function"]["name"], "search_memory");
        assert_eq!(h[1]["role"], "tool");
        assert_eq!(h[1]["tool_call_id"], "call_3_0");
        let failed = Reply { error: Some("HTTP 500".into()), ..Default::default() };
        assert_eq!(history_of(&failed, 0), vec![json!({"role": "assistant", "content": "(no reply)"})]);
    }

    #[test]
    fn speculative_counters_come_from_either_servers_metrics() {
        let fp4 = "# HELP fp4_spec_decode_num_drafts_total x\n# TYPE fp4_spec_decode_num_drafts_total counter\n\
                   fp4_spec_decode_num_drafts_total 10\nfp4_spec_decode_num_draft_tokens_total 30\n\
                   fp4_spec_decode_num_accepted_tokens_total 12\n";
        let c = SpecCounters::parse(fp4).unwrap();
        assert_eq!(c, SpecCounters { drafts: 10, draft_tokens: 30, accepted: 12 });
        let vllm = "vllm:spec_decode_num_drafts_total{model_name=\"m\"} 4.0\n\
                    vllm:spec_decode_num_draft_tokens_total{model_name=\"m\"} 12.0\n\
                    vllm:spec_decode_num_accepted_tokens_total{model_name=\"m\"} 6.0\n";
        let before = SpecCounters { drafts: 2, draft_tokens: 6, accepted: 1 };
        let s = Speculative::of(SpecCounters::parse(vllm).unwrap().since(&before)).unwrap();
        assert_eq!((s.drafts, s.draft_tokens, s.accepted_tokens), (2, 6, 5));
        assert!((s.acceptance_rate - 5.0 / 6.0).abs() < 1e-12 && (s.mean_accepted_length - 3.5).abs() < 1e-12);
        assert!(SpecCounters::parse("fp4_requests_total 3\n").is_none());
        assert!(Speculative::of(SpecCounters::default()).is_none(), "nothing drafted: no figures");
    }

    #[test]
    fn flatness_is_max_over_min() {
        let b = Backend { name: "a".into(), url: "u".into(), api_key: None };
        let t = |ms: f64| Turn {
            turn: 1,
            ttft_ms: Some(ms),
            ttft_any_ms: Some(ms),
            prompt_tokens: None,
            cached_tokens: None,
            completion_tokens: 1,
            error: None,
        };
        let r = result(&b, None, None, vec![t(10.0), t(12.0), t(25.0)], None);
        assert_eq!(r.ttft_max_over_min, Some(2.5));
        assert_eq!(r.ttft_max_over_min_after_first, Some(25.0 / 12.0));
        let md = markdown(
            &ConversationOptions { turns: 3, warmup: 0, max_tokens: 8, timeout: Duration::from_secs(1) },
            &[r],
        );
        assert!(md.contains("| 3 | – | 25 | – |"), "{md}");
        assert!(md.contains("max ÷ min 2.50"), "{md}");
    }
}
