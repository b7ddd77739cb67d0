//! The seed's smoke test, run before a full benchmark: ask for the capital of Japan with the
//! suite's system prompt and parameters; the answer must name Tokyo, without markdown, without
//! visible thinking and without reasoning content (thinking is off).

use crate::client::{self, Backend, Reply};
use crate::gates;
use crate::suite::Suite;
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::time::Duration;

/// The question the seed's decision tree starts with.
pub const QUESTION: &str = "What is the capital of Japan?";
/// The answer it must contain (word-bounded, any case).
pub const ANSWER: &str = "Tokyo";

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Smoke {
    pub pass: bool,
    pub question: String,
    pub content: String,
    pub reasoning: String,
    /// What went wrong, one phrase each (empty when it passed).
    pub problems: Vec<String>,
    pub ttft_ms: Option<f64>,
}

/// Asks `backend` (serving `model`) the question once, greedily, with the suite's system prompt,
/// token budget and thinking setting (no tools: the answer is plain text).
pub fn run(backend: &Backend, model: &str, suite: &Suite, timeout: Duration) -> Smoke {
    let body = json!({
        "messages": [{"role": "system", "content": suite.system_prompt}, {"role": "user", "content": QUESTION}],
        "temperature": 0.0,
        "max_tokens": suite.params.max_tokens,
        "chat_template_kwargs": {"enable_thinking": suite.params.enable_thinking},
    });
    judge(&client::chat(backend, model, &body, timeout))
}

/// The verdict on one reply.
pub fn judge(r: &Reply) -> Smoke {
    let mut problems = Vec::new();
    if let Some(e) = &r.error {
        problems.push(format!("request failed: {e}"));
    }
    if !gates::answer_found(&r.content, &[ANSWER.to_string()]) {
        problems.push(format!("the answer does not contain \"{ANSWER}\""));
    }
    let md = gates::markdown_hits(&r.content);
    if !md.is_empty() {
        problems.push(format!("markdown ({})", md.join(", ")));
    }
    if gates::thinking_leak(&r.content) {
        problems.push("visible thinking in the answer".into());
    }
    if !r.reasoning.trim().is_empty() {
        problems.push("reasoning content although thinking is off".into());
    }
    Smoke {
        pass: problems.is_empty(),
        question: QUESTION.into(),
        content: r.content.clone(),
        reasoning: r.reasoning.clone(),
        problems,
        ttft_ms: r.ttft_ms,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(content: &str, reasoning: &str) -> Reply {
        Reply { content: content.into(), reasoning: reasoning.into(), ..Default::default() }
    }

    #[test]
    fn smoke_verdicts() {
        assert!(judge(&reply("The capital of Japan is Tokyo.", "")).pass);
        let bad = judge(&reply("**Kyoto**, I think.", ""));
        assert!(!bad.pass);
        assert_eq!(bad.problems.len(), 2, "{:?}", bad.problems);
        assert!(judge(&reply("<think>hmm</think> Tokyo.", "")).problems[0].contains("thinking"));
        assert!(!judge(&reply("Tokyo.", "The user asks about Japan.")).pass);
        let down = judge(&Reply { error: Some("connection refused".into()), ..Default::default() });
        assert!(!down.pass && down.problems[0].contains("connection refused"));
    }
}
