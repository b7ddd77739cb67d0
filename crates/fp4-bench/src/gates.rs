//! Behaviour checks on one reply, and the gates over a suite.

use regex::Regex;
use std::sync::LazyLock;

/// Markdown that TTS would read out: bold, headers, bullets, numbered lists, backticks, tables.
static MARKDOWN: LazyLock<Vec<(&'static str, Regex)>> = LazyLock::new(|| {
    [
        ("bold", r"\*\*[^*\n]+\*\*|__[^_\n]+__"),
        ("header", r"(?m)^\s{0,3}#{1,6}\s+\S"),
        ("bullet", r"(?m)^\s*[-*•]\s+\S"),
        ("numbered", r"(?m)^\s*\d+[.)]\s+\S"),
        ("backticks", r"`"),
        ("table", r"(?m)^\s*\|.*\|\s*$"),
    ]
    .into_iter()
    .map(|(n, r)| (n, Regex::new(r).expect("static regex")))
    .collect()
});

/// Visible thinking: tags, or a reasoning preamble instead of an answer.
static THINKING: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"(?i)</?think>|^\s*(okay|ok|alright|hmm+)[,.!]?\s+(so\s+)?(the user|let me|i need to|i should)|^\s*(let me think|the user (is asking|wants|asked)|i need to (figure|think|answer))")
        .expect("static regex")
});

/// Names of the markdown constructs found in `text`.
pub fn markdown_hits(text: &str) -> Vec<&'static str> {
    MARKDOWN.iter().filter(|(_, r)| r.is_match(text)).map(|(n, _)| *n).collect()
}

pub fn thinking_leak(text: &str) -> bool {
    THINKING.is_match(text)
}

/// A tool call left as text in the visible content.
pub fn raw_tool_call(text: &str) -> bool {
    text.contains("<tool_call>") || text.contains("<function=")
}

/// Whether the reply mentions one of the accepted answers (case-insensitive, word-bounded).
pub fn answer_found(text: &str, expect: &[String]) -> bool {
    let lower = text.to_lowercase();
    expect.iter().any(|e| {
        let e = e.to_lowercase();
        lower.match_indices(&e).any(|(i, _)| {
            let before = lower[..i].chars().next_back();
            let after = lower[i + e.len()..].chars().next();
            !before.is_some_and(char::is_alphanumeric) && !after.is_some_and(char::is_alphanumeric)
        })
    })
}

/// A structured call to `tool` with a non-empty string `query`.
pub fn tool_call_ok(calls: &[(String, String)], tool: &str) -> bool {
    calls.iter().any(|(name, args)| {
        name == tool
            && serde_json::from_str::<serde_json::Value>(args)
                .ok()
                .and_then(|a| a.get("query").and_then(|q| q.as_str()).map(|q| !q.trim().is_empty()))
                .unwrap_or(false)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detectors() {
        assert_eq!(markdown_hits("Sure! **Tokyo** is the capital."), vec!["bold"]);
        assert_eq!(markdown_hits("## Steps\n1. Boil water\n- add tea"), vec!["header", "bullet", "numbered"]);
        assert!(markdown_hits("Use `reverse()`.").contains(&"backticks"));
        assert!(markdown_hits("| a | b |\n|---|---|").contains(&"table"));
        assert!(markdown_hits("It costs 5 * 3 rupees, about 15 in all.").is_empty());
        assert!(thinking_leak("<think>hmm</think> Tokyo"));
        assert!(thinking_leak("Okay, the user wants to know the capital."));
        assert!(!thinking_leak("Tokyo is the capital of Japan."));
        assert!(answer_found("It's Tokyo!", &["tokyo".into()]));
        assert!(!answer_found("Kyoto, not the capital", &["Tokyo".into()]));
        assert!(!answer_found("it is 1000 degrees", &["100".into()]));
        assert!(tool_call_ok(&[("web_search".into(), r#"{"query": "gold price"}"#.into())], "web_search"));
        assert!(!tool_call_ok(&[("web_search".into(), r#"{"query": " "}"#.into())], "web_search"));
        assert!(!tool_call_ok(&[("search_memory".into(), r#"{"query": "x"}"#.into())], "web_search"));
        assert!(raw_tool_call("<tool_call>\n<function=web_search>"));
    }
}
