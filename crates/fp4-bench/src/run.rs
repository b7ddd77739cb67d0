//! Running a suite against backends: warm-up, interleaved measured runs, verdicts and gates.

use crate::client::{self, Backend, Reply, Speculative};
use crate::gates;
use crate::suite::{Category, Suite, Test};
use crate::{BenchError, Result};
use serde::Serialize;
use serde_json::{json, Value};
use std::time::Duration;

/// The gates every backend result has, in order.
pub const GATE_NAMES: [&str; 8] = [
    "thinking_leak",
    "tool_calling",
    "no_markdown",
    "factual",
    "reasoning",
    "verbosity_tokens",
    "ttft_ms_p50",
    "decode_tok_s_p50",
];

#[derive(Debug, Clone)]
pub struct RunOptions {
    pub warmup: usize,
    pub runs: usize,
    pub timeout: Duration,
}

/// What one reply shows.
#[derive(Debug, Clone, Serialize)]
pub struct Verdict {
    /// The test's own check (no markdown / right answer / right tool call).
    pub pass: bool,
    pub markdown: Vec<&'static str>,
    pub thinking_leak: bool,
    pub raw_tool_call: bool,
    pub error: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct Run {
    pub reply: Reply,
    pub verdict: Verdict,
}

#[derive(Debug, Clone, Serialize)]
pub struct TestResult {
    pub test: Test,
    /// Passed in the majority of its measured runs.
    pub pass: bool,
    pub runs: Vec<Run>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Gate {
    pub name: &'static str,
    pub value: f64,
    /// `value <= threshold` (max gates) or `value >= threshold` (min gates).
    pub threshold: f64,
    pub kind: &'static str,
    /// Denominator for count gates.
    pub total: Option<usize>,
    pub pass: bool,
}

#[derive(Debug, Clone, Serialize, Default)]
pub struct Dist {
    pub n: usize,
    pub p50: Option<f64>,
    pub p95: Option<f64>,
    pub min: Option<f64>,
    pub max: Option<f64>,
}

impl Dist {
    pub fn of(mut v: Vec<f64>) -> Dist {
        v.retain(|x| x.is_finite());
        v.sort_by(f64::total_cmp);
        let q = |p: f64| v.get(((v.len() as f64 - 1.0) * p).round() as usize).copied();
        Dist { n: v.len(), p50: q(0.5), p95: q(0.95), min: v.first().copied(), max: v.last().copied() }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct BackendResult {
    pub name: String,
    pub url: String,
    pub model: Option<String>,
    pub error: Option<String>,
    pub gates: Vec<Gate>,
    pub ttft_ms: Dist,
    pub ttft_any_ms: Dist,
    pub decode_tok_s: Dist,
    pub failed_requests: usize,
    pub raw_tool_call_text: usize,
    /// Speculative decoding over the measured runs, from the server's /metrics (absent when it
    /// reports none or drafted nothing).
    pub speculative: Option<Speculative>,
    pub tests: Vec<TestResult>,
}

impl BackendResult {
    pub fn all_gates_pass(&self) -> bool {
        self.error.is_none() && self.gates.iter().all(|g| g.pass)
    }
}

pub fn request_body(suite: &Suite, test: &Test) -> Value {
    let mut body = json!({
        "messages": [{"role": "system", "content": suite.system_prompt}, {"role": "user", "content": test.prompt}],
        "temperature": suite.params.temperature,
        "max_tokens": suite.params.max_tokens,
        "chat_template_kwargs": {"enable_thinking": suite.params.enable_thinking},
    });
    if let Ok(tools) = suite.tool_values() {
        if !tools.is_empty() {
            body["tools"] = Value::Array(tools);
        }
    }
    body
}

pub fn judge(test: &Test, r: &Reply) -> Verdict {
    let markdown = gates::markdown_hits(&r.content);
    let thinking_leak = gates::thinking_leak(&r.content);
    let raw_tool_call = gates::raw_tool_call(&r.content);
    let error = r.error.is_some();
    let pass = !error
        && match test.category {
            Category::Markdown => markdown.is_empty(),
            Category::Factual | Category::Reasoning => gates::answer_found(&r.content, &test.expect),
            Category::Tool => gates::tool_call_ok(&r.tool_calls, test.tool.as_deref().unwrap_or_default()),
        };
    Verdict { pass, markdown, thinking_leak, raw_tool_call, error }
}

/// Runs the suite on every backend: `warmup` unmeasured requests each, then for every test
/// `runs` measured requests, alternating backends so that drift hits all of them alike.
pub fn run(
    suite: &Suite,
    backends: &[Backend],
    opts: &RunOptions,
    progress: &dyn Fn(usize, usize),
) -> Result<Vec<BackendResult>> {
    if opts.runs == 0 {
        return Err(BenchError::Backend { name: "-".into(), url: "-".into(), msg: "--runs must be at least 1".into() });
    }
    let models: Vec<std::result::Result<String, String>> = backends.iter().map(|b| b.model(opts.timeout)).collect();
    let total = backends.len() * (opts.warmup + suite.tests.len() * opts.runs);
    let mut done = 0;
    for (b, m) in backends.iter().zip(&models) {
        if let Ok(model) = m {
            for i in 0..opts.warmup {
                let t = &suite.tests[i % suite.tests.len()];
                let _ = client::chat(b, model, &request_body(suite, t), opts.timeout);
                done += 1;
                progress(done, total);
            }
        } else {
            done += opts.warmup;
        }
    }
    let counters = || backends.iter().map(|b| b.spec_counters(opts.timeout)).collect::<Vec<_>>();
    let counters_before = counters();
    let mut per_backend: Vec<Vec<Vec<Run>>> = vec![vec![Vec::new(); suite.tests.len()]; backends.len()];
    for (ti, t) in suite.tests.iter().enumerate() {
        let body = request_body(suite, t);
        for _ in 0..opts.runs {
            for (bi, b) in backends.iter().enumerate() {
                let reply = match &models[bi] {
                    Ok(model) => client::chat(b, model, &body, opts.timeout),
                    Err(e) => Reply { error: Some(format!("backend unavailable: {e}")), ..Default::default() },
                };
                let verdict = judge(t, &reply);
                per_backend[bi][ti].push(Run { reply, verdict });
                done += 1;
                progress(done, total);
            }
        }
    }
    let speculative = counters_before.into_iter().zip(counters()).map(|c| match c {
        (Some(before), Some(after)) => Speculative::of(after.since(&before)),
        _ => None,
    });
    Ok(backends
        .iter()
        .zip(models)
        .zip(per_backend)
        .zip(speculative)
        .map(|(((b, m), runs), spec)| summarize(suite, b, m, runs, spec))
        .collect())
}

fn summarize(
    suite: &Suite,
    b: &Backend,
    model: std::result::Result<String, String>,
    runs: Vec<Vec<Run>>,
    speculative: Option<Speculative>,
) -> BackendResult {
    let tests: Vec<TestResult> = suite
        .tests
        .iter()
        .zip(runs)
        .map(|(t, runs)| {
            let passed = runs.iter().filter(|r| r.verdict.pass).count();
            TestResult { test: t.clone(), pass: passed * 2 > runs.len(), runs }
        })
        .collect();
    let majority = |t: &TestResult, f: &dyn Fn(&Verdict) -> bool| {
        t.runs.iter().filter(|r| f(&r.verdict)).count() * 2 > t.runs.len()
    };
    let of = |c: Category| tests.iter().filter(move |t| t.test.category == c);
    let non_tool: Vec<&TestResult> = tests.iter().filter(|t| t.test.category != Category::Tool).collect();
    // A test shows no leak only through replies: one whose runs mostly failed counts as a leak,
    // so a backend that is down (or erring) never passes this gate by saying nothing.
    let leaks = non_tool.iter().filter(|t| majority(t, &|v| v.thinking_leak || v.error)).count();
    let reachable = model.is_ok();
    let count = |c: Category| of(c).filter(|t| t.pass).count();
    let all_runs = || tests.iter().flat_map(|t| t.runs.iter());
    let non_tool_tokens: Vec<f64> = non_tool
        .iter()
        .flat_map(|t| t.runs.iter())
        .filter(|r| r.reply.error.is_none())
        .map(|r| r.reply.completion_tokens as f64)
        .collect();
    let verbosity = if non_tool_tokens.is_empty() {
        f64::INFINITY
    } else {
        non_tool_tokens.iter().sum::<f64>() / non_tool_tokens.len() as f64
    };
    let ttft = Dist::of(all_runs().filter_map(|r| r.reply.ttft_ms).collect());
    let decode = Dist::of(all_runs().filter_map(|r| r.reply.decode_tok_s).collect());
    let g = &suite.gates;
    let min_gate = |name, value: usize, threshold: usize, total: usize| Gate {
        name,
        value: value as f64,
        threshold: threshold as f64,
        kind: "min",
        total: Some(total),
        pass: value >= threshold,
    };
    let mut gates = vec![
        Gate {
            name: "thinking_leak",
            value: leaks as f64,
            threshold: g.thinking_leak_max as f64,
            kind: "max",
            total: Some(non_tool.len()),
            pass: leaks <= g.thinking_leak_max,
        },
        min_gate("tool_calling", count(Category::Tool), g.tool_calling_min, of(Category::Tool).count()),
        min_gate("no_markdown", count(Category::Markdown), g.no_markdown_min, of(Category::Markdown).count()),
        min_gate("factual", count(Category::Factual), g.factual_min, of(Category::Factual).count()),
        min_gate("reasoning", count(Category::Reasoning), g.reasoning_min, of(Category::Reasoning).count()),
        Gate {
            name: "verbosity_tokens",
            value: verbosity,
            threshold: g.verbosity_max_tokens,
            kind: "max",
            total: None,
            pass: verbosity <= g.verbosity_max_tokens,
        },
        Gate {
            name: "ttft_ms_p50",
            value: ttft.p50.unwrap_or(f64::INFINITY),
            threshold: g.ttft_ms_max,
            kind: "max",
            total: None,
            pass: ttft.p50.is_some_and(|v| v <= g.ttft_ms_max),
        },
        Gate {
            name: "decode_tok_s_p50",
            value: decode.p50.unwrap_or(0.0),
            threshold: g.decode_tok_s_min,
            kind: "min",
            total: None,
            pass: decode.p50.is_some_and(|v| v >= g.decode_tok_s_min),
        },
    ];
    if !reachable {
        // Nothing was measured: no gate (even one with a zero threshold) passes.
        gates.iter_mut().for_each(|g| g.pass = false);
    }
    BackendResult {
        name: b.name.clone(),
        url: b.url.clone(),
        error: model.as_ref().err().cloned(),
        model: model.ok(),
        gates,
        ttft_any_ms: Dist::of(all_runs().filter_map(|r| r.reply.ttft_any_ms).collect()),
        ttft_ms: ttft,
        decode_tok_s: decode,
        failed_requests: all_runs().filter(|r| r.reply.error.is_some()).count(),
        raw_tool_call_text: of(Category::Tool).filter(|t| majority(t, &|v| v.raw_tool_call)).count(),
        speculative,
        tests,
    }
}
