//! The bench against scripted fake OpenAI endpoints: every gate must score them exactly.

use fp4_bench::client::Backend;
use fp4_bench::run::{run, RunOptions};
use fp4_bench::suite::{Category, Suite};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::time::Duration;

/// What the fake model answers to a prompt.
#[derive(Clone)]
enum Answer {
    Text(String),
    /// A structured tool call (name, arguments).
    Call(String, String),
    /// An HTTP error status instead of a stream.
    Status(u16),
}

/// Serves /v1/models and streaming /v1/chat/completions on a free port, answering each user
/// prompt from `script` (default: "Sure."). Every content delta is one word.
fn fake(script: Vec<(String, Answer)>) -> String {
    fake_with(script, Answer::Text("Sure.".into()))
}

/// [`fake`] with another answer for prompts the script does not list.
fn fake_with(script: Vec<(String, Answer)>, default: Answer) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let script = script.clone();
            let default = default.clone();
            std::thread::spawn(move || {
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut first = String::new();
                reader.read_line(&mut first).unwrap();
                let mut len = 0;
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
                let mut out = stream;
                if first.starts_with("GET /v1/models") {
                    let b = json!({"data": [{"id": "fake-model"}]}).to_string();
                    let _ = write!(out, "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{b}", b.len());
                    return;
                }
                let req: Value = serde_json::from_slice(&body).unwrap();
                let prompt =
                    req["messages"].as_array().unwrap().last().unwrap()["content"].as_str().unwrap().to_string();
                let answer = script.iter().find(|(p, _)| *p == prompt).map(|(_, a)| a.clone()).unwrap_or(default);
                if let Answer::Status(code) = answer {
                    let _ = write!(out, "HTTP/1.1 {code} Oops\r\nContent-Length: 4\r\nConnection: close\r\n\r\noops");
                    return;
                }
                let _ = write!(out, "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n");
                let chunk = |delta: Value, finish: Option<&str>| {
                    format!("data: {}\n\n", json!({"choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}))
                };
                let _ = out.write_all(chunk(json!({"role": "assistant", "content": ""}), None).as_bytes());
                match answer {
                    Answer::Text(t) => {
                        for w in t.split_inclusive(' ') {
                            std::thread::sleep(Duration::from_millis(2));
                            let _ = out.write_all(chunk(json!({"content": w}), None).as_bytes());
                        }
                        let _ = out.write_all(chunk(json!({}), Some("stop")).as_bytes());
                    }
                    Answer::Call(name, args) => {
                        let tc = json!([{"index": 0, "id": "call_1", "type": "function", "function": {"name": name, "arguments": args}}]);
                        let _ = out.write_all(chunk(json!({"tool_calls": tc}), None).as_bytes());
                        let _ = out.write_all(chunk(json!({}), Some("tool_calls")).as_bytes());
                    }
                    Answer::Status(_) => unreachable!("answered above"),
                }
                let _ = out.write_all(b"data: [DONE]\n\n");
            });
        }
    });
    format!("http://127.0.0.1:{port}")
}

#[test]
fn gates_score_scripted_replies_exactly() {
    let suite = Suite::load(None).unwrap();
    let of = |c: Category| suite.tests.iter().filter(move |t| t.category == c).collect::<Vec<_>>();
    let mut script = Vec::new();
    // Markdown prompts: 4 of 15 answered with markdown (bold, header, bullets, backticks).
    let md =
        ["Boil it with **ginger**.", "## Cars\nBoth are fine.", "Steps:\n- create it\n- activate it", "Use `split`."];
    for (i, t) in of(Category::Markdown).iter().enumerate() {
        let text = md.get(i).map(|s| s.to_string()).unwrap_or_else(|| "Take it slow and enjoy it.".into());
        script.push((t.prompt.clone(), Answer::Text(text)));
    }
    // Factual: two correct but leaking thinking, one wrong, two clean.
    let fact = of(Category::Factual);
    script.push((fact[0].prompt.clone(), Answer::Text("<think>easy</think> Tokyo.".into())));
    script
        .push((fact[1].prompt.clone(), Answer::Text("Okay, the user wants a number. It boils at 100 degrees.".into())));
    script.push((fact[2].prompt.clone(), Answer::Text("Saturn is the biggest.".into())));
    script.push((fact[3].prompt.clone(), Answer::Text("William Shakespeare wrote it.".into())));
    script.push((fact[4].prompt.clone(), Answer::Text("Kenya is in Africa.".into())));
    // Reasoning: all right.
    let answers = [
        "You have 6 apples.",
        "It will be Thursday.",
        "It goes 150 kilometres.",
        "Chitra is the youngest.",
        "You get 180 rupees back.",
    ];
    for (t, a) in of(Category::Reasoning).iter().zip(answers) {
        script.push((t.prompt.clone(), Answer::Text(a.into())));
    }
    // Tools: 4 right calls, 1 wrong function, 1 empty query, 2 left as raw text, 2 plain answers.
    let tools = of(Category::Tool);
    for (i, t) in tools.iter().enumerate() {
        let expected = t.tool.clone().unwrap();
        let a = match i {
            0..=3 => Answer::Call(expected, r#"{"query": "it"}"#.into()),
            4 => Answer::Call(
                if expected == "web_search" { "search_memory".into() } else { "web_search".into() },
                r#"{"query": "it"}"#.into(),
            ),
            5 => Answer::Call(expected, r#"{"query": ""}"#.into()),
            6 | 7 => Answer::Text(format!(
                "<tool_call>\n<function={expected}>\n<parameter=query>\nit\n</parameter>\n</function>\n</tool_call>"
            )),
            _ => Answer::Text("I am not sure.".into()),
        };
        script.push((t.prompt.clone(), a));
    }
    let a = Backend { name: "scripted".into(), url: fake(script), api_key: None };
    // The second backend says "Sure." to everything; the third is down.
    let b = Backend { name: "plain".into(), url: fake(vec![]) + "/v1", api_key: None };
    let c = Backend { name: "down".into(), url: "http://127.0.0.1:9".into(), api_key: None };
    let opts = RunOptions { warmup: 1, runs: 2, timeout: Duration::from_secs(10) };
    let results = run(&suite, &[a, b, c], &opts, &|_, _| {}).unwrap();
    let gate = |bi: usize, name: &str| results[bi].gates.iter().find(|g| g.name == name).unwrap().clone();
    let names: Vec<&str> = results[0].gates.iter().map(|g| g.name).collect();
    assert_eq!(names, fp4_bench::run::GATE_NAMES);
    assert_eq!(gate(0, "no_markdown").value, 11.0);
    assert!(!gate(0, "no_markdown").pass, "11/15 is under the 12/15 gate");
    assert_eq!(gate(0, "thinking_leak").value, 2.0);
    assert_eq!(gate(0, "thinking_leak").total, Some(25));
    assert_eq!(gate(0, "factual").value, 4.0, "a thinking leak does not make a right answer wrong");
    assert_eq!(gate(0, "reasoning").value, 5.0);
    assert_eq!(gate(0, "tool_calling").value, 4.0);
    assert!(!gate(0, "tool_calling").pass);
    assert_eq!(results[0].raw_tool_call_text, 2);
    assert_eq!(results[0].failed_requests, 0);
    assert!(results[0].ttft_ms.p50.is_some() && results[0].decode_tok_s.p50.is_some());
    // Every reply is kept with its verdict.
    assert!(results[0].tests.iter().all(|t| t.runs.len() == 2));
    // "Sure." to everything: no markdown, no leaks, nothing right.
    assert_eq!(
        (
            gate(1, "no_markdown").value,
            gate(1, "thinking_leak").value,
            gate(1, "factual").value,
            gate(1, "tool_calling").value
        ),
        (15.0, 0.0, 0.0, 0.0)
    );
    assert_eq!(results[1].model.as_deref(), Some("fake-model"));
    // A backend that is down is reported, not a crash.
    assert!(results[2].error.is_some());
    assert_eq!(results[2].failed_requests, suite.tests.len() * 2);
    assert!(!results[2].all_gates_pass());
    // Saying nothing is no proof of not leaking: a dead backend fails every gate, the thinking
    // leak gate included (it used to pass with 0 leaks).
    for g in &results[2].gates {
        assert!(!g.pass, "gate {} passed for a backend that is down: {g:?}", g.name);
    }
    assert_eq!(gate(2, "thinking_leak").value, 25.0, "every unanswered non-tool test counts");
    // Reports and plots render for all three.
    let md = fp4_bench::report::markdown(&suite, &opts, &results);
    assert!(md.contains("| no_markdown | ≥ 12 | 11/15 ❌ | 15/15 ✅ |"), "{md}");
    let svg = fp4_bench::report::ttft_svg(&results);
    assert!(svg.starts_with("<svg") && svg.contains("scripted") && svg.trim_end().ends_with("</svg>"));
    assert!(fp4_bench::report::decode_svg(&results).contains("<rect"));
    let doc = fp4_bench::report::json_report(&suite, &opts, &results, 0, 1);
    assert_eq!(doc["schema"], "fp4.bench.v1");
    assert_eq!(doc["backends"][0]["tests"][0]["runs"][0]["reply"]["content"], "Boil it with **ginger**.");
}

#[test]
fn a_backend_that_answers_only_errors_passes_no_gate() {
    let suite = Suite::load(None).unwrap();
    // Up (it lists a model) but every chat completion is an HTTP 500.
    let b = Backend { name: "erring".into(), url: fake_with(vec![], Answer::Status(500)), api_key: None };
    let opts = RunOptions { warmup: 0, runs: 1, timeout: Duration::from_secs(10) };
    let r = &run(&suite, &[b], &opts, &|_, _| {}).unwrap()[0];
    assert!(r.error.is_none(), "the backend is reachable");
    assert_eq!(r.failed_requests, suite.tests.len());
    for g in &r.gates {
        assert!(!g.pass, "gate {} passed on error replies only: {g:?}", g.name);
    }
}
