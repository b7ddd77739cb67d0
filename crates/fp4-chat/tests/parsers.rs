//! qwen3 reasoning + qwen3_coder tool parsing: vLLM's conformance cases (qwen35.md §5.4, §6.5),
//! in non-streaming mode and streamed at every split point.
#![allow(clippy::approx_constant)] // 3.14 is vLLM's test value, not π

use fp4_chat::{parse, AssistantMessage, DeltaMerger, OutputConfig, StreamParser};
use serde_json::{json, Value};

fn weather() -> Value {
    json!({"type": "function", "function": {"name": "get_current_weather", "parameters": {"type": "object",
        "properties": {"city": {"type": "string"}, "state": {"type": "string"},
                       "unit": {"type": "string", "enum": ["fahrenheit", "celsius"]}}, "required": ["city", "state"]}}})
}

fn area() -> Value {
    json!({"type": "function", "function": {"name": "calculate_area", "parameters": {"type": "object",
        "properties": {"shape": {"type": "string"}, "dimensions": {"type": "object"}, "precision": {"type": "integer"}}}}})
}

fn tools_wa() -> Vec<Value> {
    vec![weather(), area()]
}

fn cfg(tools: Vec<Value>, reasoning: bool, thinking: bool) -> OutputConfig {
    OutputConfig { reasoning_parser: reasoning, thinking, tools: Some(tools), only_listed_tools: false }
}

const DALLAS: &str = "<tool_call>\n<function=get_current_weather>\n<parameter=city>\nDallas\n</parameter>\n<parameter=state>\nTX\n</parameter>\n<parameter=unit>\nfahrenheit\n</parameter>\n</function>\n</tool_call>";

/// (name, arguments as JSON) of each call.
fn calls(m: &AssistantMessage) -> Vec<(String, Value)> {
    m.tool_calls
        .iter()
        .map(|c| {
            assert_eq!(c.kind, "function");
            let args: Value = serde_json::from_str(&c.function.arguments)
                .unwrap_or_else(|e| panic!("arguments {:?} are not JSON: {e}", c.function.arguments));
            (c.function.name.clone(), args)
        })
        .collect()
}

/// Streams `pieces` and checks the OpenAI delta protocol: one header per call index carrying id,
/// type and name; later fragments carry arguments only.
fn stream(pieces: &[&str], cfg: &OutputConfig) -> AssistantMessage {
    let mut p = StreamParser::new(cfg.clone());
    let mut merger = DeltaMerger::default();
    let mut headers = 0;
    let mut deltas: Vec<_> = pieces.iter().filter_map(|d| p.push(d)).collect();
    deltas.extend(p.finish());
    for d in &deltas {
        for tc in &d.tool_calls {
            if tc.index == headers {
                assert!(tc.id.as_deref().is_some_and(|id| id.starts_with("call_") && id.len() == 29), "{tc:?}");
                assert_eq!(tc.kind, Some("function"));
                assert!(tc.function.name.is_some());
                headers += 1;
            } else {
                assert!(tc.index < headers, "fragment for a call without header: {tc:?}");
                assert!(tc.id.is_none() && tc.kind.is_none() && tc.function.name.is_none(), "{tc:?}");
            }
        }
        merger.push(d);
    }
    merger.finish()
}

/// Non-streaming result, then the same output streamed one char per delta, split once at every
/// position, and split into three at a spread of positions: all must give the same message.
fn check_all_splits(text: &str, cfg: &OutputConfig) -> AssistantMessage {
    let whole = parse(text, cfg);
    let key = |m: &AssistantMessage| (m.content.clone(), m.reasoning_content.clone(), calls(m));
    let chars: Vec<String> = text.chars().map(String::from).collect();
    let one_char = stream(&chars.iter().map(String::as_str).collect::<Vec<_>>(), cfg);
    assert_eq!(key(&one_char), key(&whole), "one char per delta: {text:?}");
    let bounds: Vec<usize> = text.char_indices().map(|(i, _)| i).chain([text.len()]).collect();
    for &i in &bounds {
        let m = stream(&[&text[..i], &text[i..]], cfg);
        assert_eq!(key(&m), key(&whole), "split at {i}: {text:?}");
    }
    for (n, &i) in bounds.iter().enumerate().step_by(7) {
        for &j in bounds[n..].iter().step_by(5) {
            let m = stream(&[&text[..i], &text[i..j], &text[j..]], cfg);
            assert_eq!(key(&m), key(&whole), "split at {i}, {j}: {text:?}");
        }
    }
    whole
}

fn expect(text: &str, tools: Vec<Value>, want_calls: Vec<(&str, Value)>, want_content: Option<&str>) {
    let m = check_all_splits(text, &cfg(tools, false, true));
    let want: Vec<(String, Value)> = want_calls.into_iter().map(|(n, a)| (n.to_string(), a)).collect();
    assert_eq!(calls(&m), want, "{text:?}");
    assert_eq!(m.content.as_deref(), want_content, "{text:?}");
}

#[test]
fn case_01_no_tool_calls() {
    let t = "This is a test response without any tool calls";
    expect(t, tools_wa(), vec![], Some(t));
}

#[test]
fn case_02_single_call() {
    expect(
        DALLAS,
        tools_wa(),
        vec![("get_current_weather", json!({"city": "Dallas", "state": "TX", "unit": "fahrenheit"}))],
        None,
    );
}

#[test]
fn case_03_content_before_call() {
    let t = format!("Sure! Let me check the weather for you.{DALLAS}");
    let args = json!({"city": "Dallas", "state": "TX", "unit": "fahrenheit"});
    expect(&t, tools_wa(), vec![("get_current_weather", args)], Some("Sure! Let me check the weather for you."));
    // One piece per delta: the first delta is content only, and there are many.
    let pieces: Vec<String> = t.chars().map(String::from).collect();
    let mut p = StreamParser::new(cfg(tools_wa(), false, true));
    let deltas: Vec<_> = pieces.iter().filter_map(|d| p.push(d)).collect();
    assert!(deltas.len() > 3);
    assert!(deltas[0].content.is_some() && deltas[0].tool_calls.is_empty());
    // Without finish, a well-formed call is already complete.
    let mut merger = DeltaMerger::default();
    deltas.iter().for_each(|d| merger.push(d));
    let m = merger.finish();
    assert_eq!(m.tool_calls.len(), 1);
    assert_eq!(
        serde_json::from_str::<Value>(&m.tool_calls[0].function.arguments).unwrap(),
        json!({"city": "Dallas", "state": "TX", "unit": "fahrenheit"})
    );
}

#[test]
fn case_04_multiline_object_param() {
    let t = "<tool_call>\n<function=calculate_area>\n<parameter=shape>\nrectangle\n</parameter>\n<parameter=dimensions>\n{\"width\": 10, \n \"height\": 20}\n</parameter>\n<parameter=precision>\n2\n</parameter>\n</function>\n</tool_call>";
    expect(
        t,
        tools_wa(),
        vec![(
            "calculate_area",
            json!({"shape": "rectangle", "dimensions": {"width": 10, "height": 20}, "precision": 2}),
        )],
        None,
    );
}

#[test]
fn case_05_parallel_calls() {
    let orlando = DALLAS.replace("Dallas", "Orlando").replace("TX", "FL");
    let t = format!("{DALLAS}\n{orlando}");
    expect(
        &t,
        tools_wa(),
        vec![
            ("get_current_weather", json!({"city": "Dallas", "state": "TX", "unit": "fahrenheit"})),
            ("get_current_weather", json!({"city": "Orlando", "state": "FL", "unit": "fahrenheit"})),
        ],
        None,
    );
}

#[test]
fn case_06_content_and_typed_params() {
    let t = "Let me calculate that area for you.<tool_call>\n<function=calculate_area>\n<parameter=shape>\ncircle\n</parameter>\n<parameter=dimensions>\n{\"radius\": 15.5}\n</parameter>\n<parameter=precision>\n3\n</parameter>\n</function>\n</tool_call>";
    expect(
        t,
        tools_wa(),
        vec![("calculate_area", json!({"shape": "circle", "dimensions": {"radius": 15.5}, "precision": 3}))],
        Some("Let me calculate that area for you."),
    );
}

#[test]
fn case_07_function_without_tool_call_tags() {
    let t = "<function=get_current_weather>\n<parameter=city>\nDallas\n</parameter>\n<parameter=state>\nTX\n</parameter>\n</function>";
    expect(t, tools_wa(), vec![("get_current_weather", json!({"city": "Dallas", "state": "TX"}))], None);
}

#[test]
fn case_08_type_conversion() {
    let tools = vec![
        json!({"type": "function", "function": {"name": "test_types", "parameters": {"type": "object", "properties": {
        "int_param": {"type": "integer"}, "float_param": {"type": "float"}, "bool_param": {"type": "boolean"},
        "str_param": {"type": "string"}, "obj_param": {"type": "object"}}}}}),
    ];
    let t = "<tool_call>\n<function=test_types>\n<parameter=int_param>\n42\n</parameter>\n<parameter=float_param>\n3.14\n</parameter>\n<parameter=bool_param>\ntrue\n</parameter>\n<parameter=str_param>\nhello world\n</parameter>\n<parameter=obj_param>\n{\"key\": \"value\"}\n</parameter>\n</function>\n</tool_call>";
    expect(
        t,
        tools,
        vec![(
            "test_types",
            json!({"int_param": 42, "float_param": 3.14, "bool_param": true, "str_param": "hello world", "obj_param": {"key": "value"}}),
        )],
        None,
    );
}

#[test]
fn case_09_anyof_and_nullable() {
    let tools = vec![
        json!({"type": "function", "function": {"name": "test_anyof", "parameters": {"type": "object", "properties": {
        "anyof_int": {"anyOf": [{"type": "integer"}, {"type": "null"}], "default": 5},
        "anyof_str": {"anyOf": [{"type": "string"}, {"type": "null"}]},
        "anyof_array": {"anyOf": [{"type": "array", "items": {"type": "string"}}, {"type": "null"}]},
        "anyof_obj": {"anyOf": [{"type": "object"}, {"type": "null"}]},
        "type_as_array": {"type": ["integer", "null"]},
        "multi_non_null": {"anyOf": [{"type": "string"}, {"type": "integer"}, {"type": "null"}]},
        "nullable_str": {"anyOf": [{"type": "string"}, {"type": "null"}]},
        "plain_str": {"type": "string"}}}}}),
    ];
    let p = |n: &str, v: &str| format!("<parameter={n}>\n{v}\n</parameter>\n");
    let t = format!(
        "<tool_call>\n<function=test_anyof>\n{}{}{}{}{}{}{}{}</function>\n</tool_call>",
        p("anyof_int", "5"),
        p("anyof_str", "hello"),
        p("anyof_array", "[\"a\", \"b\", \"c\"]"),
        p("anyof_obj", "{\"key\": \"value\"}"),
        p("type_as_array", "42"),
        p("multi_non_null", "some text"),
        p("nullable_str", "None"),
        p("plain_str", "null"),
    );
    expect(
        &t,
        tools,
        vec![(
            "test_anyof",
            json!({"anyof_int": 5, "anyof_str": "hello", "anyof_array": ["a", "b", "c"], "anyof_obj": {"key": "value"},
                   "type_as_array": 42, "multi_non_null": "some text", "nullable_str": null, "plain_str": "null"}),
        )],
        None,
    );
}

#[test]
fn case_10_missing_closing_parameter() {
    let t = "Let me check the weather for you:\n<tool_call>\n<function=get_current_weather>\n<parameter=city>\nDallas\n<parameter=state>\nTX\n</parameter>\n<parameter=unit>\nfahrenheit\n</parameter>\n</function>\n</tool_call>";
    expect(
        t,
        tools_wa(),
        vec![("get_current_weather", json!({"city": "Dallas", "state": "TX", "unit": "fahrenheit"}))],
        Some("Let me check the weather for you:\n"),
    );
}

#[test]
fn case_11_invalid_function_name_skipped() {
    let t = "<tool_call>\n<function=bad_func_no_gt\n</function>\n</tool_call>\n<tool_call>\n<function=get_current_weather>\n<parameter=city>Dallas</parameter>\n<parameter=state>TX</parameter>\n</function>\n</tool_call>";
    expect(t, tools_wa(), vec![("get_current_weather", json!({"city": "Dallas", "state": "TX"}))], None);
}

#[test]
fn literal_tool_call_xml_inside_a_parameter_value() {
    let tools = vec![json!({"type": "function", "function": {"name": "write_file", "parameters": {"type": "object",
        "properties": {"path": {"type": "string"}, "content": {"type": "string"}}}}})];
    let inner = "<tool_call>\n<function=get_current_weather>\n<parameter=city>\nDallas\n</parameter>\n</function>\n</tool_call>";
    let t = format!("<tool_call>\n<function=write_file>\n<parameter=path>\ntest.txt\n</parameter>\n<parameter=content>\n{inner}\n</parameter>\n</function>\n</tool_call>");
    expect(&t, tools, vec![("write_file", json!({"path": "test.txt", "content": inner}))], None);
}

#[test]
fn text_after_calls_and_python_literals() {
    let tools = vec![json!({"type": "function", "function": {"name": "f", "parameters": {"type": "object",
        "properties": {"d": {"type": "object"}, "n": {"type": "number"}, "b": {"type": "boolean"}, "i": {"type": "integer"}}}}})];
    // A parameter the schema does not know keeps its raw text. (After a known parameter it would
    // not be structural: vLLM only ends a value at a schema-known `<parameter=`.)
    let t = "Calling.\n<tool_call>\n<function=f>\n<parameter=extra>\nraw\n</parameter>\n<parameter=d>\n{'k': 'v', 'ok': True}\n</parameter>\n<parameter=n>\n3.0\n</parameter>\n<parameter=b>\nyes\n</parameter>\n<parameter=i>\n3.5\n</parameter>\n</function>\n</tool_call>\nDone, anything else?";
    expect(
        t,
        tools,
        vec![("f", json!({"extra": "raw", "d": {"k": "v", "ok": true}, "n": 3, "b": false, "i": "3.5"}))],
        Some("Calling.\n"),
    );
}

#[test]
fn reasoning_vectors_streamed() {
    let c = OutputConfig { reasoning_parser: true, thinking: true, tools: None, only_listed_tools: false };
    for (text, r, content) in [
        (
            "This is a reasoning section</think>This is the rest",
            Some("This is a reasoning section"),
            Some("This is the rest"),
        ),
        ("<think>This is a reasoning section</think>", Some("This is a reasoning section"), None),
        (
            "<think>This is a reasoning\nsection</think>This is the rest\nThat",
            Some("This is a reasoning\nsection"),
            Some("This is the rest\nThat"),
        ),
        ("<think>This is a reasoning section", Some("This is a reasoning section"), None),
        ("This is the rest", Some("This is the rest"), None),
    ] {
        let m = check_all_splits(text, &c);
        assert_eq!((m.reasoning_content.as_deref(), m.content.as_deref()), (r, content), "{text:?}");
    }
    for pieces in [
        vec!["<think>This is a reasoning section", "</think>", "This is the rest"],
        vec!["reasoning section", "</think>This is the rest"],
    ] {
        let m = stream(&pieces, &c);
        assert_eq!(m.content.as_deref(), Some("This is the rest"));
    }
    let m = stream(&["<think>reasoning</think>"], &c);
    assert_eq!((m.reasoning_content.as_deref(), m.content.as_deref()), (Some("reasoning"), None));
}

#[test]
fn thinking_disabled_is_all_content() {
    let tool = "I need to read the file.\n\n<tool_call>\n<function=bash>\n<parameter=command>\ncat /etc/hosts\n</parameter>\n</function>\n</tool_call>";
    let c = OutputConfig { reasoning_parser: true, thinking: false, tools: None, only_listed_tools: false };
    for text in ["This is plain content", "Some output without think tokens", tool] {
        let m = check_all_splits(text, &c);
        assert_eq!((m.reasoning_content.as_deref(), m.content.as_deref()), (None, Some(text)));
    }
}

#[test]
fn tool_call_inside_unclosed_reasoning_is_recovered() {
    let text = format!("I should look this up.\n\n{DALLAS}");
    let m = check_all_splits(&text, &cfg(tools_wa(), true, true));
    assert_eq!(m.reasoning_content.as_deref(), Some("I should look this up.\n\n"));
    assert_eq!(m.content, None);
    assert_eq!(
        calls(&m),
        vec![("get_current_weather".to_string(), json!({"city": "Dallas", "state": "TX", "unit": "fahrenheit"}))]
    );
    // With the think block closed, the call after it is parsed as usual.
    let text = format!("Let me check.\n</think>\n\n{DALLAS}");
    let m = check_all_splits(&text, &cfg(tools_wa(), true, true));
    assert_eq!(m.reasoning_content.as_deref(), Some("Let me check.\n"));
    assert_eq!(m.content.as_deref(), Some("\n\n"));
    assert_eq!(m.tool_calls.len(), 1);
    // A bare <tool_call> mention does not end reasoning.
    let m = check_all_splits("The <tool_call> tag is used for tools.", &cfg(tools_wa(), true, true));
    assert_eq!(m.reasoning_content.as_deref(), Some("The <tool_call> tag is used for tools."));
}
