//! The `qwen3_coder` tool-call parser (vLLM `Qwen3CoderToolParser`, 2026 structural-scan version).
//!
//! Grammar: `[content] (<tool_call> <function=NAME> (<parameter=P>VALUE</parameter>)* </function> </tool_call>)*`.
//! A closing tag counts only where it is *structural* — followed by the next delimiter — so
//! parameter values may contain literal tool-call XML. One leading and one trailing newline are
//! removed from each value, which is then typed from the tool's JSON schema.
//!
//! [`extract`] is the non-streaming result. [`partial`] is what is already certain about a prefix
//! of the output: streaming emits only that, so the streamed pieces always add up to [`extract`].

use crate::pyjson;
use crate::pyliteral::{literal_eval, py_float, py_int};
use serde_json::{Map, Value};
use std::collections::HashSet;

const TC_OPEN: &str = "<tool_call>";
const TC_CLOSE: &str = "</tool_call>";
const FN_OPEN: &str = "<function=";
const FN_CLOSE: &str = "</function>";
const P_OPEN: &str = "<parameter=";
const P_CLOSE: &str = "</parameter>";

/// One parsed call: the function name and its arguments as a JSON object text
/// (`json.dumps(args, ensure_ascii=False)`).
#[derive(Debug, Clone, PartialEq)]
pub struct ParsedCall {
    pub name: String,
    pub arguments: String,
}

/// The non-streaming result.
#[derive(Debug, Clone, PartialEq)]
pub struct Extracted {
    /// Valid calls, in order (invalid function names are dropped).
    pub calls: Vec<ParsedCall>,
    /// Text before the first real tool call; `None` when empty. Meaningful only when `calls`
    /// is non-empty: otherwise the caller keeps the whole output as content.
    pub content: Option<String>,
}

/// What a prefix of the output already determines.
#[derive(Debug, Clone, PartialEq)]
pub struct Partial {
    /// Bytes of the prefix that are certainly content.
    pub content_end: usize,
    /// Calls whose name is complete: `arguments` is the certain prefix of their final JSON text
    /// (complete, with the closing brace, once `closed`).
    pub calls: Vec<PartialCall>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct PartialCall {
    pub name: String,
    pub arguments: String,
    pub closed: bool,
}

fn find_from(text: &str, pat: &str, from: usize) -> Option<usize> {
    text.get(from..)?.find(pat).map(|i| i + from)
}

/// `parameters.properties` of the tool called `name` (empty if unknown).
fn tool_properties(tools: &[Value], name: &str) -> Map<String, Value> {
    tools
        .iter()
        .map(|t| t.get("function").unwrap_or(t))
        .find(|f| f.get("name").and_then(Value::as_str) == Some(name))
        .and_then(|f| f.get("parameters")?.get("properties")?.as_object().cloned())
        .unwrap_or_default()
}

fn valid_names(props: &Map<String, Value>) -> Option<HashSet<String>> {
    (!props.is_empty()).then(|| props.keys().cloned().collect())
}

/// Next `<parameter=` at position 0 or right after a newline (and, with `valid`, naming a known
/// parameter).
fn next_structural_param_start(text: &str, start: usize, valid: Option<&HashSet<String>>) -> Option<usize> {
    let mut ni = start;
    loop {
        ni = find_from(text, P_OPEN, ni)?;
        if ni == 0 || text.as_bytes()[ni - 1] == b'\n' {
            match valid {
                None => return Some(ni),
                Some(names) => {
                    let name_start = ni + P_OPEN.len();
                    if let Some(name_end) = find_from(text, ">", name_start) {
                        if names.contains(&text[name_start..name_end]) {
                            return Some(ni);
                        }
                    }
                }
            }
        }
        ni += 1;
    }
}

/// A `</function>` followed (after whitespace) by `</tool_call>` or the end.
fn find_true_function_end(text: &str) -> Option<usize> {
    let mut pos = 0;
    loop {
        let idx = find_from(text, FN_CLOSE, pos)?;
        let rest = text[idx + FN_CLOSE.len()..].trim_start();
        if rest.is_empty() || rest.starts_with(TC_CLOSE) {
            return Some(idx);
        }
        pos = idx + FN_CLOSE.len();
    }
}

/// The structural `</parameter>` of a value: followed by a known `<parameter=`, `</function>`,
/// `</tool_call>` or (unless `require_lookahead`) the end; nested literal opens are depth-counted.
fn find_true_param_end(value: &str, valid: Option<&HashSet<String>>, require_lookahead: bool) -> Option<usize> {
    let mut depth = 0usize;
    let mut pos = 0;
    while pos < value.len() {
        let next_open = next_structural_param_start(value, pos, None);
        let next_close = find_from(value, P_CLOSE, pos)?;
        if next_open.is_some_and(|o| o < next_close) {
            depth += 1;
            pos = next_open.unwrap() + P_OPEN.len();
        } else if depth == 0 {
            let rest = value[next_close + P_CLOSE.len()..].trim_start();
            let next_param = rest.starts_with(P_OPEN)
                && match valid {
                    None => true,
                    Some(names) => rest[P_OPEN.len()..]
                        .find('>')
                        .is_some_and(|e| names.contains(&rest[P_OPEN.len()..P_OPEN.len() + e])),
                };
            if (rest.is_empty() && !require_lookahead)
                || next_param
                || rest.starts_with(FN_CLOSE)
                || rest.starts_with(TC_CLOSE)
            {
                return Some(next_close);
            }
            pos = next_close + P_CLOSE.len();
        } else {
            depth -= 1;
            pos = next_close + P_CLOSE.len();
        }
    }
    None
}

/// Walks a function body (text after `<function=NAME>`) parameter by parameter and returns the
/// position of its structural `</function>`, or `None` while incomplete.
fn scan_to_structural_function_end(body: &str, valid: Option<&HashSet<String>>) -> Option<usize> {
    let b = body.as_bytes();
    let mut pos = 0;
    let mut seen: HashSet<String> = HashSet::new();
    while pos < body.len() {
        while pos < body.len() && matches!(b[pos], b' ' | b'\t' | b'\n' | b'\r') {
            pos += 1;
        }
        if pos >= body.len() {
            return None;
        }
        let rest = &body[pos..];
        if rest.starts_with(FN_CLOSE) {
            return Some(pos);
        }
        if !rest.starts_with(P_OPEN) {
            // Unexpected text before </function>: the lookahead heuristic decides.
            return find_true_function_end(rest).map(|e| pos + e);
        }
        let name_end = find_from(body, ">", pos + P_OPEN.len())?;
        let name = &body[pos + P_OPEN.len()..name_end];
        let mut value_start = name_end + 1;
        if b.get(value_start) == Some(&b'\n') {
            value_start += 1;
        }
        match find_true_param_end(&body[value_start..], valid, true) {
            Some(end) => {
                seen.insert(name.to_string());
                pos = value_start + end + P_CLOSE.len();
            }
            None => {
                // Missing </parameter>: the next structural <parameter=NAME> with NAME unseen ends it.
                let unseen: Option<HashSet<String>> =
                    valid.map(|v| v.iter().filter(|n| !seen.contains(*n) && n.as_str() != name).cloned().collect());
                let implicit = next_structural_param_start(&body[value_start..], 0, unseen.as_ref())?;
                seen.insert(name.to_string());
                pos = value_start + implicit;
            }
        }
    }
    None
}

/// Function names that are real identifiers, not template residue (`{{ x }}`) or free text.
fn is_valid_function_name(name: &str) -> bool {
    !name.is_empty() && !name.chars().any(|c| "{}<>\"' \t\n\r".contains(c))
}

/// Removes exactly one leading and one trailing newline.
fn strip_one_newline(v: &str) -> &str {
    let v = v.strip_prefix('\n').unwrap_or(v);
    v.strip_suffix('\n').unwrap_or(v)
}

/// The header of the text after `<function=`: a complete, valid name, the tool's parameter
/// schemas (and their names), and the body after `NAME>`.
struct Header<'a> {
    name: &'a str,
    props: Map<String, Value>,
    valid: Option<HashSet<String>>,
    body: &'a str,
}

fn header<'a>(after: &'a str, tools: &[Value]) -> Option<Header<'a>> {
    let end = after.find('>')?;
    let name = &after[..end];
    if !is_valid_function_name(name) {
        return None;
    }
    let props = tool_properties(tools, name);
    let valid = valid_names(&props);
    Some(Header { name, props, valid, body: &after[end + 1..] })
}

/// Parses `NAME>...params...` (the text after `<function=`, cut at its structural end).
fn parse_function_call(call: &str, tools: &[Value]) -> Option<ParsedCall> {
    let Header { name, props, valid, body: params } = header(call, tools)?;
    let mut args = Map::new();
    let mut pos = 0;
    while let Some(start) = next_structural_param_start(params, pos, None) {
        let name_start = start + P_OPEN.len();
        let Some(name_end) = find_from(params, ">", name_start) else { break };
        let pname = &params[name_start..name_end];
        let value_text = &params[name_end + 1..];
        let value = match find_true_param_end(value_text, valid.as_ref(), false) {
            Some(e) => {
                pos = name_end + 1 + e + P_CLOSE.len();
                &value_text[..e]
            }
            None => match next_structural_param_start(value_text, 0, valid.as_ref()) {
                // Missing </parameter>: the next structural parameter ends the value.
                Some(next) => {
                    pos = name_end + 1 + next;
                    &value_text[..next]
                }
                None => {
                    pos = params.len();
                    &value_text[..find_true_function_end(value_text).unwrap_or(value_text.len())]
                }
            },
        };
        args.insert(pname.to_string(), convert_param_value(strip_one_newline(value), pname, &props));
    }
    Some(ParsedCall { name: name.to_string(), arguments: pyjson::dumps(&Value::Object(args), None) })
}

/// The text after each `<function=` to parse, one per tool-call block.
fn function_call_texts<'a>(text: &'a str, tools: &[Value]) -> Vec<&'a str> {
    let mut blocks = Vec::new();
    let mut search = 0;
    while let Some(tc) = find_from(text, TC_OPEN, search) {
        let after_open = &text[tc + TC_OPEN.len()..];
        // A structural </tool_call> is followed by another <tool_call> or the end.
        let mut inner = 0;
        let close = loop {
            match find_from(after_open, TC_CLOSE, inner) {
                None => break None,
                Some(i) => {
                    let rest = after_open[i + TC_CLOSE.len()..].trim_start();
                    if rest.is_empty() || rest.starts_with(TC_OPEN) {
                        break Some(i);
                    }
                    inner = i + TC_CLOSE.len();
                }
            }
        };
        match close {
            None => {
                blocks.push(after_open);
                break;
            }
            Some(c) => {
                blocks.push(&after_open[..c]);
                search = tc + TC_OPEN.len() + c + TC_CLOSE.len();
            }
        }
    }
    if blocks.is_empty() {
        blocks.push(text);
    }
    let mut calls = Vec::new();
    for block in blocks {
        let Some(fs) = block.find(FN_OPEN) else { continue };
        let after = &block[fs + FN_OPEN.len()..];
        let (valid, body_start) = match after.find('>') {
            Some(e) => (valid_names(&tool_properties(tools, &after[..e])), e + 1),
            None => (None, 0),
        };
        if let Some(end) = scan_to_structural_function_end(&after[body_start..], valid.as_ref()) {
            calls.push(&after[..body_start + end]);
        } else {
            calls.push(&after[..find_true_function_end(after).unwrap_or(after.len())]);
        }
    }
    calls
}

/// Non-streaming extraction (`extract_tool_calls`).
pub fn extract(text: &str, tools: &[Value]) -> Extracted {
    if !text.contains(FN_OPEN) {
        return Extracted { calls: Vec::new(), content: Some(text.to_string()) };
    }
    let calls: Vec<ParsedCall> =
        function_call_texts(text, tools).into_iter().filter_map(|c| parse_function_call(c, tools)).collect();
    // Content ends at the first <tool_call> block holding a <function=; else at the first <function=.
    let mut content_end = None;
    let mut search = 0;
    while let Some(tc) = find_from(text, TC_OPEN, search) {
        let close = find_from(text, TC_CLOSE, tc + TC_OPEN.len());
        let limit = close.unwrap_or(text.len());
        if text[tc + TC_OPEN.len()..limit].contains(FN_OPEN) {
            content_end = Some(tc);
            break;
        }
        search = close.map_or(limit, |c| c + TC_CLOSE.len());
    }
    let end = content_end.or_else(|| text.find(FN_OPEN)).unwrap_or(text.len());
    let content = &text[..end];
    Extracted { calls, content: (!content.is_empty()).then(|| content.to_string()) }
}

/// Length of the longest suffix of `text` that is a proper prefix of `tag`.
pub(crate) fn partial_tag_overlap(text: &str, tag: &str) -> usize {
    (1..tag.len().min(text.len() + 1)).rev().find(|&n| text.ends_with(&tag[..n])).unwrap_or(0)
}

/// What a prefix of the output already determines (see the module docs).
pub fn partial(text: &str, tools: &[Value]) -> Partial {
    let first_tag = [text.find(TC_OPEN), text.find(FN_OPEN)].into_iter().flatten().min();
    let content_end = first_tag
        .unwrap_or_else(|| text.len() - partial_tag_overlap(text, TC_OPEN).max(partial_tag_overlap(text, FN_OPEN)));
    let mut calls = Vec::new();
    let mut search = 0;
    while let Some(tc) = find_from(text, TC_OPEN, search) {
        let after_open = &text[tc + TC_OPEN.len()..];
        // While streaming, a </tool_call> ends its block only once the next <tool_call> follows.
        let mut inner = 0;
        let close = loop {
            match find_from(after_open, TC_CLOSE, inner) {
                None => break None,
                Some(i) if after_open[i + TC_CLOSE.len()..].trim_start().starts_with(TC_OPEN) => break Some(i),
                Some(i) => inner = i + TC_CLOSE.len(),
            }
        };
        let block = &after_open[..close.unwrap_or(after_open.len())];
        let call = block.find(FN_OPEN).and_then(|fs| partial_call(&block[fs + FN_OPEN.len()..], tools));
        match (call, close) {
            (Some(c), Some(_)) => calls.push(c),
            (Some(c), None) => {
                calls.push(c);
                break;
            }
            (None, Some(_)) => {}
            (None, None) => break,
        }
        search = tc + TC_OPEN.len() + close.map_or(after_open.len(), |c| c + TC_CLOSE.len());
    }
    Partial { content_end, calls }
}

/// The certain part of one call from the text after its `<function=`; `None` until the name is
/// complete, and for invalid names.
fn partial_call(after: &str, tools: &[Value]) -> Option<PartialCall> {
    let Header { name, props, valid, body } = header(after, tools)?;
    if let Some(end) = scan_to_structural_function_end(body, valid.as_ref()) {
        let parsed = parse_function_call(&after[..after.len() - body.len() + end], tools)?;
        return Some(PartialCall { name: parsed.name, arguments: parsed.arguments, closed: true });
    }
    // Open body: the parameters whose structural end has been seen, as the final parse will read them.
    let mut args = String::from("{");
    let mut pos = 0;
    while let Some(start) = next_structural_param_start(body, pos, None) {
        let name_start = start + P_OPEN.len();
        let Some(pname_end) = find_from(body, ">", name_start) else { break };
        let pname = &body[name_start..pname_end];
        let value_text = &body[pname_end + 1..];
        let Some(e) = find_true_param_end(value_text, valid.as_ref(), true) else { break };
        let value = convert_param_value(strip_one_newline(&value_text[..e]), pname, &props);
        if args.len() > 1 {
            args.push_str(", ");
        }
        args.push_str(&pyjson::dumps(&Value::String(pname.to_string()), None));
        args.push_str(": ");
        args.push_str(&pyjson::dumps(&value, None));
        pos = pname_end + 1 + e + P_CLOSE.len();
    }
    Some(PartialCall { name: name.to_string(), arguments: args, closed: false })
}

/// Types a raw parameter value from the tool's schema (`_convert_param_value`).
pub fn convert_param_value(value: &str, name: &str, props: &Map<String, Value>) -> Value {
    let raw = || Value::String(value.to_string());
    let Some(schema) = props.get(name) else { return raw() };
    let mut allows_null = false;
    let ty = match (schema.get("type"), schema.get("anyOf")) {
        (Some(t), _) => {
            let t = pyjson::py_str(t).trim().to_lowercase();
            allows_null = t == "null";
            t
        }
        (None, Some(Value::Array(options))) => {
            let mut picked: Option<String> = None;
            for o in options {
                if let Some(t) = o.get("type") {
                    let t = pyjson::py_str(t).trim().to_lowercase();
                    if t == "null" {
                        allows_null = true;
                    } else if picked.is_none() {
                        picked = Some(t);
                    }
                }
            }
            picked.unwrap_or_else(|| "string".into())
        }
        _ => "string".into(),
    };
    let is_null_word = matches!(value.to_lowercase().as_str(), "null" | "none");
    if allows_null && is_null_word {
        return Value::Null;
    }
    if ["string", "str", "text", "varchar", "char", "enum"].contains(&ty.as_str()) {
        return raw();
    }
    if is_null_word {
        return Value::Null;
    }
    if ["int", "uint", "long", "short", "unsigned"].iter().any(|p| ty.starts_with(p)) {
        return py_int(value).map_or_else(raw, |v| Value::Number(v.into()));
    }
    if ty.starts_with("num") || ty.starts_with("float") {
        return match py_float(value) {
            // Integral values become ints (`3.0` → 3), as vLLM does.
            Some(f) if f.fract() == 0.0 && f.abs() < 9.2e18 => Value::Number((f as i64).into()),
            Some(f) => serde_json::Number::from_f64(f).map_or_else(raw, Value::Number),
            None => raw(),
        };
    }
    if ["boolean", "bool", "binary"].contains(&ty.as_str()) {
        return Value::Bool(value.to_lowercase() == "true");
    }
    let container =
        ["object", "array", "arr"].contains(&ty.as_str()) || ty.starts_with("dict") || ty.starts_with("list");
    if container {
        if let Ok(parsed) = serde_json::from_str::<Value>(value) {
            // A JSON-encoded Python repr ("{'k': 'v'}") gets one more parse.
            if let Value::String(s) = &parsed {
                return literal_eval(s).unwrap_or(parsed);
            }
            return parsed;
        }
    }
    match literal_eval(value) {
        Some(Value::String(s)) if container => literal_eval(&s).unwrap_or(Value::String(s)),
        Some(v) => v,
        None => raw(),
    }
}
