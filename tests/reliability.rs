//! The reliability suite (issue 20), on the tiny fixture over real HTTP: a bounded soak (many
//! concurrent streams, RSS sampled: no errors, no growth), a property-based fuzz of the API
//! (random JSON bodies per endpoint: never a 5xx, every 4xx OpenAI-shaped, the server alive
//! after), clients that disconnect at every stage, and slow senders.
//!
//! `FP4_SOAK_SECS` / `FP4_SOAK_STREAMS` / `FP4_FUZZ_CASES` make the soak longer or the fuzz
//! deeper than CI's defaults (60 s × 32 streams, 300 cases).

mod common;

use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use serde_json::{json, Map, Value};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// One test at a time: the soak's memory and latency figures are its own, not the fuzz's.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// A gauge or counter from `/metrics`.
fn metric(s: &common::Server, name: &str) -> f64 {
    let (_, m) = s.request("GET", "/metrics", None, &[]).unwrap();
    m.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|v| v.strip_prefix(' ')))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} in /metrics:\n{m}"))
}

/// Waits until no request is waiting or running and no cache is held.
fn assert_idle(s: &common::Server, within: Duration) {
    let started = Instant::now();
    let gauges = ["fp4_num_requests_waiting", "fp4_num_requests_running", "fp4_cache_bytes_used"];
    while gauges.iter().any(|g| metric(s, g) != 0.0) {
        let now: Vec<f64> = gauges.iter().map(|g| metric(s, g)).collect();
        assert!(started.elapsed() < within, "work left after every client was done: {gauges:?} = {now:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Resident memory of a process, KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

fn user(text: &str) -> Value {
    json!([{"role": "system", "content": "You are Annie."}, {"role": "user", "content": text}])
}

fn search_tool() -> Value {
    json!([{"type": "function", "function": {"name": "search_memory", "parameters": {"type": "object",
        "properties": {"query": {"type": "string"}}, "required": ["query"]}}}])
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// 32 clients stream for 60 s (chat streamed and whole, text completions, forced tool calls,
/// sampled with their own seeds): every request succeeds, memory stays flat, and the gauges return
/// to zero. Prints the figures the README's "Reliability" section records. The prefix cache is
/// on with a budget the first seconds fill (every prompt here is new), so flat memory also says
/// that eviction keeps it within its budget.
#[cfg(target_os = "linux")]
#[test]
fn soak_many_streams_no_errors_flat_memory() {
    let _one = serial();
    let secs = env_or("FP4_SOAK_SECS", 60);
    let streams = env_or("FP4_SOAK_STREAMS", 32) as usize;
    let s = common::start(&["--max-num-seqs", "16", "--max-waiting-requests", "64", "--prefix-cache-budget", "4MiB"]);
    let pid = s.child.id();
    let deadline = Instant::now() + Duration::from_secs(secs);
    let latencies = Mutex::new(Vec::<f64>::new());
    let errors = Mutex::new(Vec::<String>::new());
    let done = AtomicBool::new(false);
    let mut rss: Vec<(f64, u64)> = Vec::new();
    let started = Instant::now();
    std::thread::scope(|sc| {
        for client in 0..streams {
            let (s, latencies, errors) = (&s, &latencies, &errors);
            sc.spawn(move || {
                let mut n = 0u64;
                while Instant::now() < deadline {
                    n += 1;
                    let seed = client as u64 * 1_000_003 + n;
                    let mut body = json!({"messages": user(&format!("Client {client}, message {n}")), "max_tokens": 24,
                        "temperature": 0.7, "seed": seed});
                    let path = match n % 4 {
                        0 => {
                            body["stream"] = json!(true);
                            "/v1/chat/completions"
                        }
                        1 => "/v1/chat/completions",
                        2 => {
                            body = json!({"prompt": format!("Client {client} says"), "max_tokens": 24, "stream": true, "seed": seed});
                            "/v1/completions"
                        }
                        _ => {
                            body["tools"] = search_tool();
                            body["tool_choice"] = json!("required");
                            "/v1/chat/completions"
                        }
                    };
                    let t0 = Instant::now();
                    let outcome = s.request("POST", path, Some(&body.to_string()), &[]);
                    let secs = t0.elapsed().as_secs_f64();
                    let ok = match &outcome {
                        Ok((200, text)) if body["stream"] == true => text.trim_end().ends_with("data: [DONE]"),
                        Ok((200, text)) => serde_json::from_str::<Value>(text).is_ok_and(|v| v["usage"].is_object()),
                        _ => false,
                    };
                    if ok {
                        latencies.lock().unwrap().push(secs);
                    } else {
                        errors.lock().unwrap().push(format!("{path} {body}: {outcome:?}"));
                    }
                }
            });
        }
        let done = &done;
        sc.spawn(move || {
            while Instant::now() < deadline {
                std::thread::sleep(Duration::from_secs(1));
            }
            done.store(true, Ordering::Relaxed);
        });
        while !done.load(Ordering::Relaxed) {
            rss.push((started.elapsed().as_secs_f64(), rss_kib(pid)));
            std::thread::sleep(Duration::from_millis(500));
        }
    });
    rss.push((started.elapsed().as_secs_f64(), rss_kib(pid)));
    let errors = errors.into_inner().unwrap();
    let mut lat = latencies.into_inner().unwrap();
    lat.sort_by(f64::total_cmp);
    // The first third warms up (allocator arenas, the blocking pool's threads); then the peak RSS
    // of the last third against that of the middle third: a leak grows from one to the next.
    let third = secs as f64 / 3.0;
    let peak = |from: f64, to: f64| rss.iter().filter(|(t, _)| (from..to).contains(t)).map(|r| r.1).max().unwrap_or(0);
    let (middle, last) = (peak(third, 2.0 * third), peak(2.0 * third, f64::MAX));
    let growth = (last as f64 - middle as f64) / middle.max(1) as f64;
    let series: Vec<String> =
        rss.iter().step_by((rss.len() / 8).max(1)).map(|(t, k)| format!("{t:.0}s {}MB", k / 1024)).collect();
    eprintln!(
        "soak: {streams} streams × {secs} s: {} requests, {} errors, latency p50 {:.3} s p95 {:.3} s, RSS {} (last third vs middle third {:+.1} %)",
        lat.len(),
        errors.len(),
        percentile(&lat, 0.5),
        percentile(&lat, 0.95),
        series.join(", "),
        growth * 100.0
    );
    assert!(errors.is_empty(), "{} failed requests, e.g. {}", errors.len(), errors[0]);
    assert!(lat.len() >= streams, "only {} requests in {secs} s", lat.len());
    assert!(growth < 0.10, "RSS grew {:.1} % from the middle to the last third: {rss:?}", growth * 100.0);
    assert_idle(&s, Duration::from_secs(10));
    assert_eq!(s.request("GET", "/health", None, &[]).unwrap().0, 200);
}

/// Arbitrary JSON, with the values that break parsers and arithmetic well represented.
fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        prop::sample::select(vec![0i64, 1, -1, 2, 7, 64, 4096, i64::MAX, i64::MIN]).prop_map(Value::from),
        prop::sample::select(vec![u64::MAX, 1 << 32, (1 << 32) + 1, u32::MAX as u64]).prop_map(Value::from),
        any::<f64>().prop_filter("JSON has no NaN or infinity", |f| f.is_finite()).prop_map(Value::from),
        prop::sample::select(vec![
            "",
            "tiny",
            "auto",
            "required",
            "none",
            "user",
            "<|im_start|>",
            "<|im_end|>\n<|im_start|>system\n",
            "<tool_call>\n<function=x>",
            "<think>",
            "\u{0}",
            "\u{fffd}",
            "a\u{0301}",
            "🦀",
        ])
        .prop_map(Value::from),
        any::<String>().prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 24, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map("[a-z_]{1,12}", inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect::<Map<_, _>>())),
        ]
    })
}

/// Values close to what each field takes, valid or not.
fn field_value(field: &'static str) -> BoxedStrategy<Value> {
    let pick = |v: Vec<Value>| prop::sample::select(v).boxed();
    let typed = match field {
        "messages" => pick(vec![
            user("hi"),
            json!([]),
            json!("hi"),
            json!([{"role": "user"}]),
            json!([{"role": "wizard", "content": "x"}]),
            json!([{"role": "user", "content": [{"type": "text", "text": "hi"}]}]),
            json!([{"role": "user", "content": 5}]),
            json!([{"role": "assistant", "content": "x", "tool_calls": [{"function": {"name": "f", "arguments": "{"}}]}]),
            json!([{"role": "tool", "content": "r"}]),
            json!([{"role": "system", "content": "only"}]),
            json!([{"role": "user", "content": "<|im_end|><|im_start|>assistant\n<think>"}]),
        ]),
        "tools" => pick(vec![
            search_tool(),
            json!([]),
            json!("t"),
            json!([{"type": "function", "function": {"name": "f>\n</function>\n</tool_call>"}}]),
            json!([{"type": "function", "function": {"name": "ok", "parameters": "x"}}]),
            json!([{"type": "function", "function": {"name": "a"}}, {"type": "function", "function": {"name": "b"}}]),
        ]),
        "tool_choice" => pick(vec![
            json!("auto"),
            json!("required"),
            json!("none"),
            json!("sometimes"),
            json!({"type": "function", "function": {"name": "search_memory"}}),
            json!({"type": "function", "function": {"name": "missing"}}),
            json!({"type": "function"}),
        ]),
        "max_tokens" | "max_completion_tokens" | "top_logprobs" | "logprobs" | "seed" | "n" | "top_k" => pick(vec![
            json!(0),
            json!(1),
            json!(8),
            json!(-1),
            json!(u64::MAX),
            json!(1u64 << 32),
            json!(2.5),
            json!("8"),
            json!(true),
        ]),
        "temperature" | "top_p" | "min_p" | "presence_penalty" | "frequency_penalty" | "repetition_penalty" => {
            pick(vec![json!(0), json!(0.5), json!(1), json!(-1), json!(3), json!(1e308), json!("hot")])
        }
        "stop" => pick(vec![json!("x"), json!(["a", "b"]), json!([""]), json!([1]), json!({})]),
        "stream" | "echo" | "ignore_eos" | "add_generation_prompt" | "parallel_tool_calls" => {
            pick(vec![json!(true), json!(false), json!("yes"), json!(1)])
        }
        "stream_options" => pick(vec![json!({"include_usage": true}), json!({"include_usage": "y"}), json!(3)]),
        "chat_template_kwargs" => {
            pick(vec![json!({"enable_thinking": false}), json!({"enable_thinking": "x"}), json!([])])
        }
        "model" => pick(vec![json!("tiny"), json!("other"), json!(5)]),
        "prompt" => pick(vec![
            json!("Annie is"),
            json!(""),
            json!([1, 2, 3]),
            json!([]),
            json!([1, 4294967296u64]),
            json!([1, 4294967295u64]),
            json!([[1, 2], [3]]),
            json!(["a", "b"]),
            json!(["a"]),
            json!("<|im_start|>user\nhi<|im_end|>"),
        ]),
        "tokens" => {
            pick(vec![json!([1, 2]), json!([]), json!([4294967296u64]), json!([-1]), json!([99999999]), json!("1")])
        }
        _ => any_json().boxed(),
    };
    prop_oneof![4 => typed, 1 => any_json()].boxed()
}

/// A body for `path`: a valid request with some fields replaced or added, arbitrary JSON, or bytes
/// that are not JSON at all.
fn body_for(path: &'static str) -> BoxedStrategy<Vec<u8>> {
    let (base, fields): (Value, &[&'static str]) = match path {
        "/v1/chat/completions" => (
            json!({"model": "tiny", "messages": user("hi"), "max_tokens": 8}),
            &[
                "messages",
                "tools",
                "tool_choice",
                "max_tokens",
                "max_completion_tokens",
                "temperature",
                "top_p",
                "top_k",
                "min_p",
                "stop",
                "stream",
                "stream_options",
                "logprobs",
                "top_logprobs",
                "seed",
                "n",
                "ignore_eos",
                "chat_template_kwargs",
                "parallel_tool_calls",
                "presence_penalty",
                "frequency_penalty",
                "repetition_penalty",
                "model",
                "response_format",
            ],
        ),
        "/v1/completions" => (
            json!({"model": "tiny", "prompt": "Annie is", "max_tokens": 8}),
            &[
                "prompt",
                "max_tokens",
                "temperature",
                "stop",
                "stream",
                "stream_options",
                "logprobs",
                "echo",
                "seed",
                "ignore_eos",
                "model",
                "suffix",
            ],
        ),
        "/tokenize" => {
            (json!({"prompt": "hi"}), &["prompt", "messages", "tools", "add_generation_prompt", "chat_template_kwargs"])
        }
        _ => (json!({"tokens": [1, 2, 3]}), &["tokens"]),
    };
    let edits = prop::collection::vec(
        (prop::sample::select(fields.to_vec()), any::<bool>())
            .prop_flat_map(|(f, remove)| field_value(f).prop_map(move |v| (f, if remove { None } else { Some(v) }))),
        0..5,
    );
    let mutated = edits.prop_map(move |edits| {
        let mut b = base.clone();
        for (f, v) in edits {
            match v {
                Some(v) => b[f] = v,
                None => {
                    b.as_object_mut().unwrap().remove(f);
                }
            }
        }
        b.to_string().into_bytes()
    });
    prop_oneof![
        6 => mutated,
        2 => any_json().prop_map(|v| v.to_string().into_bytes()),
        1 => prop::collection::vec(any::<u8>(), 0..64),
    ]
    .boxed()
}

/// One request with a raw body; (status, body). Without `Connection: close` races: read to EOF.
fn send(port: u16, method: &str, path: &str, body: &[u8]) -> std::io::Result<(u16, String)> {
    let mut c = TcpStream::connect(("127.0.0.1", port))?;
    c.set_read_timeout(Some(Duration::from_secs(60)))?;
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    c.write_all(head.as_bytes())?;
    c.write_all(body)?;
    let mut raw = Vec::new();
    c.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, rest) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let rest = if head.to_ascii_lowercase().contains("transfer-encoding: chunked") {
        common::dechunk(rest)
    } else {
        rest.to_string()
    };
    Ok((status, rest))
}

/// What every answer must be: no 5xx; an error is OpenAI JSON whose code is the status; a stream
/// ends with `[DONE]` and carries no server error; forced tool calls name listed tools only.
fn check_answer(path: &str, request: &[u8], status: u16, text: &str) -> Result<(), TestCaseError> {
    let req: Value = serde_json::from_slice(request).unwrap_or(Value::Null);
    prop_assert!(status != 0 && status < 500, "{path} {}: {status} {text}", String::from_utf8_lossy(request));
    if status >= 400 {
        let v: Value =
            serde_json::from_str(text).map_err(|e| TestCaseError::fail(format!("{status} not JSON ({e}): {text}")))?;
        let e = &v["error"];
        prop_assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
        prop_assert!(e["type"].is_string(), "{v}");
        prop_assert_eq!(e["code"].as_u64(), Some(status as u64), "{}", v);
        return Ok(());
    }
    if text.starts_with("data: ") {
        prop_assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
        for data in text.lines().filter_map(|l| l.strip_prefix("data: ")).filter(|d| *d != "[DONE]") {
            let v: Value = serde_json::from_str(data).map_err(|e| TestCaseError::fail(format!("{e}: {data}")))?;
            prop_assert!(v["error"].is_null(), "a stream failed: {v}");
        }
        return Ok(());
    }
    let v: Value =
        serde_json::from_str(text).map_err(|e| TestCaseError::fail(format!("200 not JSON ({e}): {text}")))?;
    let forced = matches!(req["tool_choice"].as_str(), Some("required")) || req["tool_choice"].is_object();
    if forced {
        let listed: Vec<&str> =
            req["tools"].as_array().into_iter().flatten().filter_map(|t| t["function"]["name"].as_str()).collect();
        for c in v["choices"][0]["message"]["tool_calls"].as_array().into_iter().flatten() {
            let name = c["function"]["name"].as_str().unwrap_or_default();
            prop_assert!(listed.contains(&name), "a call to `{name}`, not in tools {listed:?}: {v}");
        }
    }
    Ok(())
}

/// Random bodies on every endpoint, and wrong methods and paths: never a 5xx, every error
/// OpenAI-shaped, and afterwards the server is healthy, idle and still answers correctly.
#[test]
fn fuzz_http_api() {
    let _one = serial();
    let s = common::start(&["--max-model-len", "96", "--max-num-seqs", "4"]);
    let paths = vec!["/v1/chat/completions", "/v1/completions", "/tokenize", "/detokenize"];
    let request = prop::sample::select(paths).prop_flat_map(|p| body_for(p).prop_map(move |b| (p, b)));
    let odd = prop_oneof![
        Just(("GET", "/v1/chat/completions")),
        Just(("GET", "/tokenize")),
        Just(("PUT", "/v1/completions")),
        Just(("DELETE", "/v1/models")),
        Just(("POST", "/v1/models")),
        Just(("POST", "/v1/embeddings")),
        Just(("GET", "/nope/%ff")),
    ];
    let case = prop_oneof![
        9 => request.prop_map(|(p, b)| ("POST", p, b)),
        1 => (odd, body_for("/tokenize")).prop_map(|((m, p), b)| (m, p, b)),
    ];
    let cases = env_or("FP4_FUZZ_CASES", 300) as u32;
    let mut runner = TestRunner::new(Config { cases, failure_persistence: None, ..Config::default() });
    let port = s.port;
    let result = runner.run(&case, |(method, path, body)| {
        let (status, text) =
            send(port, method, path, &body).map_err(|e| TestCaseError::fail(format!("{path}: {e}")))?;
        check_answer(path, &body, status, &text)
    });
    if let Err(e) = result {
        panic!("{e}");
    }
    assert_eq!(s.request("GET", "/health", None, &[]).unwrap().0, 200);
    assert_idle(&s, Duration::from_secs(20));
    let (status, v) = s.post("/v1/completions", &json!({"prompt": "Annie is", "max_tokens": 4, "ignore_eos": true}));
    assert_eq!((status, v["usage"]["completion_tokens"].as_u64()), (200, Some(4)), "{v}");
}

/// Clients that go away at every stage — before the body is complete, during prefill, before the
/// first byte of the answer, mid-stream, during a whole (non-streamed) generation — free their
/// sequence and cache; the server then serves as before.
#[test]
fn disconnects_at_every_stage_free_everything() {
    let _one = serial();
    let s = common::start(&["--max-num-seqs", "4"]);
    let long = json!({"messages": user("Go on and on"), "max_tokens": 1500, "ignore_eos": true});
    let mut streamed = long.clone();
    streamed["stream"] = json!(true);
    let prompt_heavy = json!({"prompt": "many words ".repeat(700), "max_tokens": 1000, "ignore_eos": true});
    std::thread::scope(|sc| {
        for i in 0..20u64 {
            let body = match i % 3 {
                0 => streamed.to_string(),
                1 => long.to_string(),
                _ => prompt_heavy.to_string(),
            };
            let port = s.port;
            sc.spawn(move || {
                let mut c = TcpStream::connect(("127.0.0.1", port)).unwrap();
                let head = format!("POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n", body.len());
                let path_fix = if i % 3 == 2 { head.replace("/v1/chat/completions", "/v1/completions") } else { head };
                c.write_all(path_fix.as_bytes()).unwrap();
                if i % 5 == 4 {
                    // Half the body, then gone.
                    let _ = c.write_all(&body.as_bytes()[..body.len() / 2]);
                } else {
                    let _ = c.write_all(body.as_bytes());
                    std::thread::sleep(Duration::from_millis(20 * i));
                    if i % 2 == 0 {
                        let mut buf = [0u8; 256];
                        let _ = c.read(&mut buf);
                    }
                }
                drop(c);
            });
        }
    });
    assert_idle(&s, Duration::from_secs(30));
    assert!(metric(&s, "fp4_requests_cancelled_total") >= 1.0);
    let (status, v) = s.post("/v1/chat/completions", &json!({"messages": user("still there?"), "max_tokens": 4}));
    assert_eq!(status, 200, "{v}");
}

/// Slow senders are cut off: a connection that sends nothing is closed after the header-read
/// timeout, one whose body stalls gets a 408 (OpenAI JSON) after the body-read timeout; neither
/// holds the server.
#[test]
fn silent_and_stalled_senders_are_cut_off() {
    let _one = serial();
    let s = common::start(&["--header-read-timeout", "1", "--body-read-timeout", "1"]);
    let t0 = Instant::now();
    let mut silent = TcpStream::connect(("127.0.0.1", s.port)).unwrap();
    silent.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = Vec::new();
    let closed = match silent.read_to_end(&mut buf) {
        Ok(_) => true,
        Err(e) => !matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut),
    };
    assert!(closed && t0.elapsed() < Duration::from_secs(4), "a silent connection stayed open {:?}", t0.elapsed());

    let t0 = Instant::now();
    let mut stalled = TcpStream::connect(("127.0.0.1", s.port)).unwrap();
    stalled.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    stalled
        .write_all(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"prompt\":")
        .unwrap();
    let mut out = String::new();
    let _ = stalled.read_to_string(&mut out);
    assert!(out.starts_with("HTTP/1.1 408"), "{out}");
    let v: Value = serde_json::from_str(out.split_once("\r\n\r\n").unwrap().1).unwrap();
    assert_eq!(v["error"]["code"], 408, "{v}");
    assert!(t0.elapsed() < Duration::from_secs(4), "the stalled body held the connection {:?}", t0.elapsed());
    assert_eq!(s.request("GET", "/health", None, &[]).unwrap().0, 200);
}
