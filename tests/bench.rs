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

/// `--conversation`: TTFT turn by turn over one growing conversation, the same requests on both
/// backends; the one with prefix caching resumes every turn from the one before.
#[test]
fn conversation_benchmark_times_every_turn_on_both_backends() {
    let a = common::start(&[]);
    let b = common::start(&["--no-enable-prefix-caching"]);
    let dir = tempfile::tempdir().unwrap();
    let suite = dir.path().join("mini.toml");
    std::fs::write(&suite, SUITE).unwrap();
    let out = dir.path().join("conversation.json");
    let md = dir.path().join("conversation.md");
    let url = |p: u16| format!("http://127.0.0.1:{p}");
    let turns = 6;
    let o = Command::new(env!("CARGO_BIN_EXE_fp4"))
        .args(["bench", "--backend-a", "cached", &url(a.port), "--backend-b", "uncached", &url(b.port)])
        .args(["--suite", suite.to_str().unwrap(), "--conversation", &turns.to_string(), "--reply-tokens", "6"])
        .args(["--warmup", "1", "--output", out.to_str().unwrap(), "--markdown", md.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    assert_eq!(v["schema"], "fp4.conversation-bench.v1");
    let backends = v["backends"].as_array().unwrap();
    assert_eq!(backends.len(), 2);
    let column = |b: &serde_json::Value, key: &str| -> Vec<u64> {
        b["turns"].as_array().unwrap().iter().map(|t| t[key].as_u64().unwrap()).collect()
    };
    for b in backends {
        assert_eq!(b["turns"].as_array().unwrap().len(), turns, "{b}");
        assert!(
            b["turns"].as_array().unwrap().iter().all(|t| t["error"].is_null() && t["ttft_any_ms"].is_f64()),
            "{b}"
        );
        let prompts = column(b, "prompt_tokens");
        assert!(prompts.windows(2).all(|w| w[1] > w[0]), "the history grows: {prompts:?}");
    }
    assert_eq!(column(&backends[0], "prompt_tokens"), column(&backends[1], "prompt_tokens"), "same requests");
    let (cached, prompts) = (column(&backends[0], "cached_tokens"), column(&backends[0], "prompt_tokens"));
    // Each turn resumes from where the one before ended its conversation (before its generation
    // prompt, a few tokens short of its whole prompt), not just from the system prompt.
    for t in 1..turns {
        assert!(
            cached[t] + 32 >= prompts[t - 1] && cached[t] < prompts[t],
            "turn {}: {cached:?} of {prompts:?}",
            t + 1
        );
    }
    assert!(column(&backends[1], "cached_tokens").iter().all(|&c| c == 0));
    let report = std::fs::read_to_string(&md).unwrap();
    assert!(
        report.contains("| turn | prompt tokens | cached TTFT ms | cached cached | uncached TTFT ms |"),
        "{report}"
    );
    assert!(report.contains("max ÷ min"), "{report}");
    // A dead backend B is reported as not measured, not as a result.
    let dead = format!(
        "http://127.0.0.1:{}",
        std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
    );
    let out2 = dir.path().join("c2.json");
    let o = Command::new(env!("CARGO_BIN_EXE_fp4"))
        .args(["bench", "--backend-a", "cached", &url(a.port), "--backend-b", "dead", &dead])
        .args(["--suite", suite.to_str().unwrap(), "--conversation", "2", "--reply-tokens", "4", "--warmup", "0"])
        .args(["--output", out2.to_str().unwrap(), "--timeout", "5"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&out2).unwrap()).unwrap();
    assert!(v["backends"][1]["error"].as_str().unwrap().contains("unavailable"), "{v}");
    assert!(v["backends"][1]["turns"].as_array().unwrap().is_empty());
    assert!(String::from_utf8_lossy(&o.stderr).contains("dead"));
}
