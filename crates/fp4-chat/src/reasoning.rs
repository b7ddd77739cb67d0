//! The `qwen3` reasoning parser (vLLM `Qwen3ReasoningParser`). Qwen3.5 templates put `<think>` in
//! the prompt, so the output is `reasoning</think>content`; a `<tool_call>` followed by
//! `<function` also ends reasoning (the model sometimes calls a tool without closing `</think>`),
//! and without either the output was cut short inside the reasoning.

use crate::tool_parser::partial_tag_overlap;

const THINK_OPEN: &str = "<think>";
const THINK_CLOSE: &str = "</think>";
const TOOL_CALL: &str = "<tool_call>";
const FUNCTION: &str = "<function";

/// Drops a `<think>` that opens the output (templates that let the model write it). Only at the
/// very start: vLLM also drops text *before* a later `<think>`, which its own streaming has
/// already sent by then, so streamed and whole answers would differ.
fn after_think_open(text: &str) -> &str {
    text.strip_prefix(THINK_OPEN).unwrap_or(text)
}

/// `<function` followed by whitespace or `=` (the regex `<function[\s=]`).
fn is_function_open(s: &str) -> bool {
    s.strip_prefix(FUNCTION).and_then(|r| r.chars().next()).is_some_and(|c| c == '=' || c.is_whitespace())
}

/// Non-streaming split of an output (thinking on): `(reasoning, content)`.
pub fn split(text: &str) -> (Option<String>, Option<String>) {
    let text = after_think_open(text);
    let some = |s: &str| (!s.is_empty()).then(|| s.to_string());
    if let Some(i) = text.find(THINK_CLOSE) {
        return (Some(text[..i].to_string()), some(&text[i + THINK_CLOSE.len()..]));
    }
    if let Some(i) = text.find(TOOL_CALL) {
        if is_function_open(text[i + TOOL_CALL.len()..].trim_start()) {
            return (some(&text[..i]), some(&text[i..]));
        }
    }
    (Some(text.to_string()), None)
}

/// What a prefix of the output already determines: the reasoning that is certain, and the
/// content text once reasoning has ended.
pub fn split_partial(text: &str) -> (&str, Option<&str>) {
    let seen_open = text.starts_with(THINK_OPEN);
    let t = after_think_open(text);
    if let Some(i) = t.find(THINK_CLOSE) {
        return (&t[..i], Some(&t[i + THINK_CLOSE.len()..]));
    }
    let mut hold = partial_tag_overlap(t, THINK_CLOSE);
    if !seen_open && THINK_OPEN.starts_with(t) {
        // The output may still be opening with `<think>`.
        hold = t.len();
    }
    if let Some(i) = t.find(TOOL_CALL) {
        let after = t[i + TOOL_CALL.len()..].trim_start();
        if is_function_open(after) {
            return (&t[..i], Some(&t[i..]));
        }
        if FUNCTION.starts_with(after) || after == FUNCTION {
            // Not decided yet: hold the tag back.
            return (&t[..i], None);
        }
        // Only the first <tool_call> can end reasoning; this one did not.
    } else {
        hold = hold.max(partial_tag_overlap(t, TOOL_CALL));
    }
    (&t[..t.len() - hold], None)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// vLLM's test vectors (tests/reasoning/test_qwen3_reasoning_parser.py), thinking on.
    #[test]
    fn vllm_vectors() {
        let s = |x: &str| Some(x.to_string());
        let tool = "I need to read the file.\n\n<tool_call>\n<function=bash>\n<parameter=command>\ncat /etc/hosts\n</parameter>\n</function>\n</tool_call>";
        let cases: Vec<(String, Option<String>, Option<String>)> = vec![
            (
                "This is a reasoning section</think>This is the rest".into(),
                s("This is a reasoning section"),
                s("This is the rest"),
            ),
            ("This is a reasoning section</think>".into(), s("This is a reasoning section"), None),
            (
                "<think>This is a reasoning section</think>This is the rest".into(),
                s("This is a reasoning section"),
                s("This is the rest"),
            ),
            ("This is the rest".into(), s("This is the rest"), None),
            ("<think>This is a reasoning section</think>".into(), s("This is a reasoning section"), None),
            (
                "<think>This is a reasoning\nsection</think>This is the rest\nThat".into(),
                s("This is a reasoning\nsection"),
                s("This is the rest\nThat"),
            ),
            ("<think>This is a reasoning section".into(), s("This is a reasoning section"), None),
            (tool.into(), s("I need to read the file.\n\n"), s(&tool[26..])),
            (format!("<think>{tool}"), s("I need to read the file.\n\n"), s(&tool[26..])),
            ("Mentions <tool_call> in passing".into(), s("Mentions <tool_call> in passing"), None),
        ];
        for (out, r, c) in cases {
            assert_eq!(split(&out), (r, c), "{out:?}");
        }
    }

    #[test]
    fn partial_holds_back_tags() {
        assert_eq!(split_partial("abc</th"), ("abc", None));
        assert_eq!(split_partial("<thi"), ("", None));
        assert_eq!(split_partial("abc\n<tool_call>\n<func"), ("abc\n", None));
        assert_eq!(split_partial("abc<tool_call>x"), ("abc<tool_call>x", None));
        assert_eq!(split_partial("r</think>c"), ("r", Some("c")));
        // `<think>` opens the reasoning only at the start of the output; later it is text.
        assert_eq!(split_partial("<tool_call><t"), ("<tool_call><t", None));
        assert_eq!(split("<tool_call><think>"), (Some("<tool_call><think>".into()), None));
    }
}
