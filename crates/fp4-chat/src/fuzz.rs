//! Property tests (proptest) of the output parsers on arbitrary model output: the reasoning and
//! tool-call parsers and the Python-literal parser never panic, whatever the text, and a streamed
//! output merges into exactly the non-streaming message for any split into deltas.
//!
//! The text is drawn from the markup the parsers look for (`<tool_call>`, `<function=`,
//! `<parameter=`, `</think>`, their prefixes, newlines) mixed with arbitrary Unicode, so that
//! the cases reach the parsers' branches instead of being plain content.

use crate::message::{DeltaMerger, DeltaMessage};
use crate::output::{parse, OutputConfig, StreamParser};
use crate::{pyliteral, reasoning, tool_parser};
use proptest::prelude::*;
use serde_json::{json, Value};

/// Pieces of model output: markup, partial markup, names, values and arbitrary text.
fn piece() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => prop::sample::select(vec![
            "<tool_call>", "</tool_call>", "<function=", "</function>", "<parameter=", "</parameter>",
            "<think>", "</think>", ">", "\n", " ", "<tool_", "</para", "<func", "</think", "<",
            "search_memory", "f", "query", "limit", "flag", "opts", "items", "x", "=",
            "1", "-2.5e3", "True", "None", "null", "[1, 'a']", "{'k': (1, 2)}", "\"s\"", "'", "\\",
        ])
        .prop_map(str::to_string),
        1 => any::<String>(),
        1 => "[a-z_ ]{0,6}",
    ]
}

fn output_text() -> impl Strategy<Value = String> {
    prop::collection::vec(piece(), 0..48).prop_map(|p| p.concat())
}

/// Tool lists whose schemas give every branch of the value typing something to do.
fn tools() -> impl Strategy<Value = Vec<Value>> {
    let all = vec![
        json!({"type": "function", "function": {"name": "search_memory", "parameters": {"type": "object", "properties": {
            "query": {"type": "string"}, "limit": {"type": "integer"}}}}}),
        json!({"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
            "x": {"type": "number"}, "flag": {"type": "boolean"}, "opts": {"type": "object"},
            "items": {"type": "array"}, "any": {}}}}}),
        json!({"type": "function", "function": {"name": "web_search"}}),
    ];
    prop::sample::subsequence(all, 0..=3)
}

/// Python-literal-like text: brackets, quotes, escapes, numbers, keywords.
fn literal_text() -> impl Strategy<Value = String> {
    let tok = prop_oneof![
        6 => prop::sample::select(vec![
            "[", "]", "{", "}", "(", ")", ",", ":", "'", "\"", "\\", "\\x4", "\\u12", "\\N{", "0x1F", "0o7", "0b2",
            "1_000", "__", "1e", "e9", "-", "+", ".", "5", "j", "True", "False", "None", "inf", "nan", " ",
            "\n", "'''", "b'", "r'", "u'", "set()", "9999999999999999999999",
        ])
        .prop_map(str::to_string),
        1 => any::<String>(),
    ];
    prop::collection::vec(tok, 0..40).prop_map(|p| p.concat())
}

/// Byte offsets of `text` at which it may be split (char boundaries, both ends included).
fn boundaries(text: &str) -> Vec<usize> {
    text.char_indices().map(|(i, _)| i).chain([text.len()]).collect()
}

/// (content, reasoning, [(name, arguments)]): what a client sees of a message.
type Seen = (Option<String>, Option<String>, Vec<(String, String)>);

fn seen(m: &crate::AssistantMessage) -> Seen {
    let calls = m.tool_calls.iter().map(|c| (c.function.name.clone(), c.function.arguments.clone())).collect();
    (m.content.clone(), m.reasoning_content.clone(), calls)
}

proptest! {
    /// Every parser entry point, on the text and on each of its prefixes (what streaming sees).
    #[test]
    fn output_parsers_never_panic(text in output_text(), tools in tools()) {
        for end in boundaries(&text) {
            let t = &text[..end];
            let _ = reasoning::split(t);
            let _ = reasoning::split_partial(t);
            let _ = tool_parser::extract(t, &tools);
            let p = tool_parser::partial(t, &tools);
            prop_assert!(p.content_end <= t.len() && t.is_char_boundary(p.content_end));
        }
        for (reasoning_parser, thinking, only_listed_tools) in [(true, true, false), (false, false, true)] {
            let cfg = OutputConfig { reasoning_parser, thinking, tools: Some(tools.clone()), only_listed_tools };
            let _ = parse(&text, &cfg);
        }
    }

    /// Streamed deltas, for any split of the output, merge into the non-streaming message; calls to
    /// unlisted functions are dropped from both when `only_listed_tools` says so.
    #[test]
    fn streamed_equals_whole(
        text in output_text(),
        tools in tools(),
        cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..8),
        reasoning_parser in any::<bool>(),
        only_listed_tools in any::<bool>(),
    ) {
        let cfg = OutputConfig { reasoning_parser, thinking: true, tools: Some(tools.clone()), only_listed_tools };
        let whole = parse(&text, &cfg);
        let b = boundaries(&text);
        let mut at: Vec<usize> = cuts.iter().map(|i| b[i.index(b.len())]).collect();
        at.push(text.len());
        at.sort_unstable();
        let mut p = StreamParser::new(cfg.clone());
        let mut merged = DeltaMerger::default();
        let mut from = 0;
        let mut deltas: Vec<DeltaMessage> = Vec::new();
        for &to in &at {
            deltas.extend(p.push(&text[from..to]));
            from = to;
        }
        deltas.extend(p.finish());
        for d in &deltas {
            merged.push(d);
        }
        prop_assert_eq!(seen(&merged.finish()), seen(&whole), "splits at {:?} of {:?}", at, text);
        if only_listed_tools {
            let listed = |n: &str| tools.iter().any(|t| t["function"]["name"] == n);
            prop_assert!(whole.tool_calls.iter().all(|c| listed(&c.function.name)), "{:?}", whole.tool_calls);
        }
    }

    /// `ast.literal_eval`, `int()` and `float()` stand-ins never panic, and whatever they accept is
    /// a JSON value that serializes.
    #[test]
    fn python_literals_never_panic(text in literal_text()) {
        if let Some(v) = pyliteral::literal_eval(&text) {
            prop_assert!(serde_json::to_string(&v).is_ok());
        }
        let _ = pyliteral::py_int(&text);
        if let Some(f) = pyliteral::py_float(&text) {
            prop_assert!(f.is_finite());
        }
    }

    /// Deeply nested input is refused, not a stack overflow.
    #[test]
    fn nesting_is_bounded(depth in 0usize..5000, open in prop::sample::select(vec!["[", "{'a': ", "(", "{"])) {
        let _ = pyliteral::literal_eval(&open.repeat(depth));
        let text = format!("<tool_call>\n<function=f>\n<parameter=opts>\n{}\n</parameter>\n</function>\n</tool_call>", open.repeat(depth));
        let _ = tool_parser::extract(&text, &[json!({"type": "function", "function": {"name": "f",
            "parameters": {"properties": {"opts": {"type": "object"}}}}})]);
    }
}

/// `only_listed_tools`: a call to a function the request did not list never reaches the client,
/// whole or streamed, while the listed one around it does.
#[test]
fn only_listed_tools_drops_unlisted_calls() {
    let tools = vec![json!({"type": "function", "function": {"name": "f", "parameters": {}}})];
    let text =
        "<tool_call>\n<function=g>\n</function>\n</tool_call>\n<tool_call>\n<function=f>\n</function>\n</tool_call>";
    let cfg = OutputConfig { reasoning_parser: false, thinking: false, tools: Some(tools), only_listed_tools: true };
    let whole = parse(text, &cfg);
    assert_eq!(seen(&whole).2, vec![("f".to_string(), "{}".to_string())]);
    let mut p = StreamParser::new(cfg.clone());
    let mut merged = DeltaMerger::default();
    for c in text.chars() {
        if let Some(d) = p.push(&c.to_string()) {
            merged.push(&d);
        }
    }
    if let Some(d) = p.finish() {
        merged.push(&d);
    }
    assert_eq!(seen(&merged.finish()), seen(&whole));
    let open = OutputConfig { only_listed_tools: false, ..cfg };
    assert_eq!(parse(text, &open).tool_calls.len(), 2, "vLLM's parser keeps unlisted names");
}
