//! `fp4 calib` with fake teachers only: a stub `claude` executable and a local fake OpenAI
//! endpoint (no network).

use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::Path;
use std::process::Command;

const CONFIG: &str = r#"
batches = 3
system_prompt = "You are Annie."
tools = '[{"type": "function", "function": {"name": "search_memory", "parameters": {"type": "object", "properties": {"query": {"type": "string"}}}}}]'
[[category]]
name = "greetings"
count = 3
describe = "Greetings."
[[category]]
name = "memory"
count = 6
tool = "search_memory"
describe = "Memory questions."
"#;

/// A Python stub for the `claude` CLI: reads the prompt, writes the requested conversations as
/// fenced JSON lines. STUB_MODE: good | broken | slow | refuse | fail-call-N (call N exits 1).
const STUB: &str = r#"#!/usr/bin/env python3
import json, os, re, sys, time
args = sys.argv[1:]
assert args[:1] == ["-p"] and "--model" in args and "--output-format" in args, args
prompt = sys.stdin.read()
state = os.environ["STUB_STATE"]
n = int(open(state).read()) + 1 if os.path.exists(state) else 1
open(state, "w").write(str(n))
mode = os.environ.get("STUB_MODE", "good")
if mode == "refuse":
    sys.stderr.write("error: unknown model claude-opus-4-6\n"); sys.exit(1)
if mode == "slow":
    time.sleep(30)
if mode == "broken":
    print("I cannot help with that."); sys.exit(0)
if mode.startswith("fail-call-") and n == int(mode.split("-")[-1]):
    sys.stderr.write("rate limited\n"); sys.exit(1)
print("```json")
for count, cat in re.findall(r'- (\d+) conversations of category "(\w+)"', prompt):
    for i in range(int(count)):
        msgs = [{"role": "system", "content": "You are Annie."}, {"role": "user", "content": f"{cat} question {os.getpid()}-{n}-{i}"}]
        if cat == "memory":
            msgs += [{"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {"name": "search_memory", "arguments": json.dumps({"query": f"q{n}-{i}"})}}]},
                     {"role": "tool", "content": "found"}]
        msgs.append({"role": "assistant", "content": f"Here you go, answer {n}-{i}."})
        print(json.dumps({"category": cat, "messages": msgs, "tools": []}))
print("```")
"#;

fn fp4(args: &[&str], envs: &[(&str, &str)]) -> std::process::Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_fp4"));
    c.args(args).env("RUST_LOG", "error");
    for (k, v) in envs {
        c.env(k, v);
    }
    c.output().unwrap()
}

fn lines(p: &Path) -> Vec<Value> {
    std::fs::read_to_string(p).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

#[test]
fn generate_with_claude_stub_resumes_after_a_failed_batch() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("calib.toml"), CONFIG).unwrap();
    let stub = d.join("claude");
    std::fs::write(&stub, STUB).unwrap();
    Command::new("chmod").args(["+x", stub.to_str().unwrap()]).status().unwrap();
    let out = d.join("data/out.jsonl");
    let state = d.join("state");
    let base = [
        "calib",
        "generate",
        "--config",
        d.join("calib.toml").to_str().unwrap().to_string().leak(),
        "--out",
        out.to_str().unwrap().to_string().leak(),
        "--claude-bin",
        stub.to_str().unwrap().to_string().leak(),
        "--retry-delay-ms",
        "1",
    ];
    let st = state.to_str().unwrap();
    // Call 2 (batch 2) fails and, with one attempt, stays failed: the others are written and merged.
    let mut args = base.to_vec();
    args.extend(["--attempts", "1"]);
    let o = fp4(&args, &[("STUB_MODE", "fail-call-2"), ("STUB_STATE", st)]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("batch 02: failed") && err.contains("--only-batches 2"), "{err}");
    assert!(
        d.join("data/batch_01.jsonl").exists()
            && !d.join("data/batch_02.jsonl").exists()
            && d.join("data/batch_03.jsonl").exists()
    );
    assert_eq!(lines(&out).len(), 6);
    // Resume: only batch 2 is generated (one more stub call).
    std::fs::remove_file(&state).unwrap();
    let o = fp4(&base, &[("STUB_MODE", "good"), ("STUB_STATE", st)]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(std::fs::read_to_string(&state).unwrap(), "1");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("batch 01: skipped") && err.contains("batch 02: generated"), "{err}");
    let all = lines(&out);
    assert_eq!(all.len(), 9);
    assert_eq!(all.iter().filter(|r| r["category"] == "memory").count(), 6);
    // Retries: call 1 fails, the retry succeeds.
    let mut args = base.to_vec();
    args.extend(["--only-batches", "3", "--attempts", "2"]);
    std::fs::remove_file(&state).unwrap();
    let o = fp4(&args, &[("STUB_MODE", "fail-call-1"), ("STUB_STATE", st)]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stderr).contains("batch 03: generated"));
    // Broken and refusing teachers are reported, with the --help hint for a refused model.
    for (mode, needle) in [("broken", "valid"), ("refuse", "--help")] {
        let mut args = base.to_vec();
        args.extend(["--only-batches", "1", "--attempts", "1"]);
        let o = fp4(&args, &[("STUB_MODE", mode), ("STUB_STATE", st)]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && err.contains(needle), "{mode}: {err}");
    }
    // A slow teacher times out.
    let mut args = base.to_vec();
    args.extend(["--only-batches", "1", "--attempts", "1", "--timeout", "1"]);
    let o = fp4(&args, &[("STUB_MODE", "slow"), ("STUB_STATE", st)]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("did not answer"), "{}", String::from_utf8_lossy(&o.stderr));
    // The merged file passes validation with thresholds for its size.
    let o = fp4(
        &[
            "calib",
            "validate",
            out.to_str().unwrap(),
            "--config",
            d.join("calib.toml").to_str().unwrap(),
            "--min-valid",
            "9",
            "--min-tool-calls",
            "6",
        ],
        &[],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stdout));
}

/// A fake OpenAI endpoint answering batch prompts with a JSON array of conversations.
fn fake_openai() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for (call, stream) in listener.incoming().flatten().enumerate() {
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let (mut first, mut len) = (String::new(), 0usize);
            reader.read_line(&mut first).unwrap();
            loop {
                let mut h = String::new();
                reader.read_line(&mut h).unwrap();
                if h.trim().is_empty() {
                    break;
                }
                if let Some(v) = h.to_ascii_lowercase().strip_prefix("content-length:") {
                    len = v.trim().parse().unwrap();
                }
            }
            let mut body = vec![0u8; len];
            reader.read_exact(&mut body).unwrap();
            let req: Value = serde_json::from_slice(&body).unwrap();
            let prompt = req["messages"][0]["content"].as_str().unwrap().to_string();
            let mut records = Vec::new();
            for line in prompt.lines().filter(|l| l.starts_with("- ") && l.contains("conversations of category")) {
                let n: usize = line[2..].split_whitespace().next().unwrap().parse().unwrap();
                let cat = line.split('"').nth(1).unwrap();
                for i in 0..n {
                    let mut msgs = vec![
                        json!({"role": "system", "content": "You are Annie."}),
                        json!({"role": "user", "content": format!("{cat} {call} {i}")}),
                    ];
                    if cat == "memory" {
                        msgs.push(json!({"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {"name": "search_memory", "arguments": "{\"query\": \"x\"}"}}]}));
                        msgs.push(json!({"role": "tool", "content": "found"}));
                    }
                    msgs.push(json!({"role": "assistant", "content": format!("Sure, {call} {i}.")}));
                    records.push(json!({"category": cat, "messages": msgs, "tools": []}));
                }
            }
            let content = Value::Array(records).to_string();
            let b = json!({"choices": [{"message": {"role": "assistant", "content": content}}]}).to_string();
            let mut out = stream;
            let _ = write!(out, "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{b}", b.len());
        }
    });
    format!("http://127.0.0.1:{port}")
}

#[test]
fn generate_with_openai_teacher_in_parallel() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("calib.toml"), CONFIG).unwrap();
    let out = d.join("out.jsonl");
    let url = fake_openai();
    let o = fp4(
        &[
            "calib",
            "generate",
            "--config",
            d.join("calib.toml").to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--teacher",
            "openai",
            "--base-url",
            &url,
            "--model",
            "teacher",
            "--jobs",
            "3",
        ],
        &[],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(lines(&out).len(), 9);
}

#[test]
fn validate_counts_exactly_and_clean_keeps_the_good() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mem = |q: &str, answer: &str| {
        json!({"category": "memory", "messages": [
        {"role": "user", "content": q},
        {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {"name": "search_memory", "arguments": "{\"query\": \"x\"}"}}]},
        {"role": "tool", "content": "r"}, {"role": "assistant", "content": answer}]})
    };
    let chat = |q: &str, answer: &str| json!({"category": "greetings", "messages": [{"role": "user", "content": q}, {"role": "assistant", "content": answer}]});
    let wrong_tool = json!({"category": "memory", "messages": [{"role": "user", "content": "q"},
        {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {"name": "web_search", "arguments": "{\"query\": \"x\"}"}}]},
        {"role": "tool", "content": "r"}, {"role": "assistant", "content": "ok"}]});
    let file = [
        mem("sister?", "Her name is Priya.").to_string(),
        mem("mom?", "Her birthday is in May.").to_string(),
        wrong_tool.to_string(),
        chat("hi", "Hi Rajesh, good to hear you!").to_string(),
        chat("hi", "Hi Rajesh, good to hear you!").to_string(),
        chat("tea?", "Here is how:\n- boil water\n- add tea").to_string(),
        chat("why?", "<think>hmm</think> Because.").to_string(),
        "{not json".to_string(),
        json!({"category": "greetings", "messages": [{"role": "user", "content": "x"}]}).to_string(),
        String::new(),
    ]
    .join("\n");
    let path = d.join("held.jsonl");
    std::fs::write(&path, &file).unwrap();
    let report = d.join("report.json");
    let o = fp4(&["calib", "validate", path.to_str().unwrap(), "--json", report.to_str().unwrap()], &[]);
    assert!(!o.status.success(), "the seed's bar (400 valid) is not met");
    let r: Value = serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    assert_eq!(r["total_lines"], 9);
    assert_eq!(r["valid_json"], 8);
    assert_eq!(r["valid_schema"], 7);
    assert_eq!(r["with_tool_calls"], 3);
    assert_eq!(r["per_category"]["memory"]["expected_tool_calls"], 2);
    assert_eq!(r["markdown_records"], 1);
    assert_eq!(r["thinking_leaks"], 1);
    assert_eq!(r["duplicates"], 1);
    let o = fp4(
        &[
            "calib",
            "validate",
            path.to_str().unwrap(),
            "--min-valid",
            "7",
            "--min-tool-calls",
            "3",
            "--max-markdown",
            "1",
        ],
        &[],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // Clean: fenced teacher output plus the file above; keeps valid, clean, unique records.
    let fenced = d.join("raw.txt");
    std::fs::write(
        &fenced,
        format!("```json\n{}\n{}\n```\n", mem("new?", "Found it."), mem("sister?", "Her name is Priya.")),
    )
    .unwrap();
    let cleaned = d.join("clean.jsonl");
    let o = fp4(
        &["calib", "clean", path.to_str().unwrap(), fenced.to_str().unwrap(), "--out", cleaned.to_str().unwrap()],
        &[],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let kept = lines(&cleaned);
    assert_eq!(kept.len(), 5, "2 memory + wrong-tool + 1 greeting + the new one: {kept:?}");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("duplicate")
            && err.contains("markdown")
            && err.contains("thinking")
            && err.contains("invalid JSON"),
        "{err}"
    );
}
