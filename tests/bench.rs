//! `fp4 bench` end to end against two `fp4 serve` instances: JSON, Markdown and plots.

mod common;

use std::process::Command;

const SUITE: &str = r#"
name = "mini"
system_prompt = "You are Annie."
tools = '[{"type": "function", "function": {"name": "search_memory", "parameters": {"type": "object", "properties": {"query": {"type": "string"}}}}}]'
[params]
temperature = 0.0
max_tokens = 8
[gates]
thinking_leak_max = 0
tool_calling_min = 1
no_markdown_min = 1
factual_min = 1
reasoning_min = 1
verbosity_max_tokens = 80
ttft_ms_max = 100000
decode_tok_s_min = 0.001
[[test]]
name = "md"
category = "markdown"
prompt = "List three fruits."
[[test]]
name = "fact"
category = "factual"
prompt = "Capital of Japan?"
expect = ["Tokyo"]
[[test]]
name = "reason"
category = "reasoning"
prompt = "2+2?"
expect = ["4"]
[[test]]
name = "tool"
category = "tool"
prompt = "What's my sister's name?"
tool = "search_memory"
"#;

#[test]
fn bench_two_servers_writes_json_markdown_and_plots() {
    let a = common::start(&[]);
    let b = common::start(&["--default-chat-template-kwargs", r#"{"enable_thinking": true}"#]);
    let dir = tempfile::tempdir().unwrap();
    let suite = dir.path().join("mini.toml");
    std::fs::write(&suite, SUITE).unwrap();
    let out = dir.path().join("out/results.json");
    let md = dir.path().join("out/report.md");
    let plots = dir.path().join("plots");
    let url = |p: u16| format!("http://127.0.0.1:{p}");
    let o = Command::new(env!("CARGO_BIN_EXE_fp4"))
        .args([
            "bench",
            "--backend-a",
            "fp4-a",
            &url(a.port),
            "--backend-b",
            "fp4-b",
            &url(b.port),
            "--suite",
            suite.to_str().unwrap(),
            "--warmup",
            "1",
            "--runs",
            "2",
            "--output",
            out.to_str().unwrap(),
            "--markdown",
            md.to_str().unwrap(),
            "--plots",
            plots.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    assert_eq!(v["schema"], "fp4.bench.v1");
    assert_eq!(v["backends"].as_array().unwrap().len(), 2);
    for b in v["backends"].as_array().unwrap() {
        assert_eq!(b["model"], "tiny");
        assert_eq!(b["failed_requests"], 0);
        assert_eq!(b["tests"].as_array().unwrap().len(), 4);
        assert!(b["ttft_ms"]["p50"].as_f64().is_some() || b["ttft_any_ms"]["p50"].as_f64().is_some());
        for t in b["tests"].as_array().unwrap() {
            for r in t["runs"].as_array().unwrap() {
                assert!(r["reply"]["completion_tokens"].as_u64().unwrap() > 0, "{r}");
                assert!(r["verdict"]["pass"].is_boolean());
            }
        }
    }
    let report = std::fs::read_to_string(&md).unwrap();
    assert!(report.contains("| gate | threshold | fp4-a (tiny) | fp4-b (tiny) |"), "{report}");
    for f in ["ttft.svg", "decode.svg"] {
        assert!(std::fs::read_to_string(plots.join(f)).unwrap().contains("</svg>"));
    }
    // Random weights fail the behaviour gates: --require-gates turns that into exit status 1.
    let o = Command::new(env!("CARGO_BIN_EXE_fp4"))
        .args([
            "bench",
            "--backend-a",
            "fp4-a",
            &url(a.port),
            "--suite",
            suite.to_str().unwrap(),
            "--warmup",
            "0",
            "--runs",
            "1",
            "--output",
            dir.path().join("r2.json").to_str().unwrap(),
            "--require-gates",
        ])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stderr).contains("gates failed"));
}
