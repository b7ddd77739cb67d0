//! `RUN_DIR/summary.json` (schema `fp4.loop.v1`) and `summary.md`: what every strategy measured,
//! and the choice. `fp4 card` reads the same types back.

use fp4_bench::run::BackendResult;
use fp4_bench::smoke::Smoke;
use fp4_quant::eval::KlReport;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt::Write;
use std::path::PathBuf;

pub const SCHEMA: &str = "fp4.loop.v1";
pub const FILE: &str = "summary.json";

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Summary {
    pub schema: String,
    pub fp4_version: String,
    pub started_unix: u64,
    pub finished_unix: Option<u64>,
    /// The BF16 source checkpoint, as given.
    pub model: PathBuf,
    pub device: String,
    /// How the quantized checkpoints were served and evaluated: `w4a4` or `w4a16`.
    pub serve_mode: String,
    pub suite: SuiteInfo,
    pub calibration: CalibInfo,
    pub eval: EvalInfo,
    /// Gates reported but not required for the choice (`--skip-gates`).
    pub skipped_gates: Vec<String>,
    pub peer: Option<Endpoint>,
    pub strategies: Vec<StrategyRun>,
    /// The strategy picked (every required gate passes, then lowest TTFT, then highest decode).
    pub chosen: Option<String>,
    pub verdict: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SuiteInfo {
    pub name: String,
    /// `None`: the built-in Annie suite.
    pub file: Option<PathBuf>,
    pub tests: usize,
    pub warmup: usize,
    pub runs: usize,
    pub temperature: f64,
    pub max_tokens: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CalibInfo {
    pub file: PathBuf,
    /// Samples the strategies calibrate on (the first ones of the file).
    pub samples: usize,
    pub tokens: usize,
    /// Records in the file (non-empty lines) and their kinds.
    pub records: usize,
    pub conversations: usize,
    pub pre_tokenized: usize,
    /// Conversations with at least one assistant tool call, and their share of the conversations.
    pub with_tool_calls: usize,
    pub tool_call_share: Option<f64>,
    /// Records per `category` field (`uncategorised` when absent).
    pub categories: BTreeMap<String, usize>,
    /// How the data was made (`--calib-description`, or what fp4 can tell).
    pub description: String,
    /// rtn's own calibration data when it differs (`--rtn-calib-data`; rtn uses all of it).
    pub rtn: Option<Box<CalibInfo>>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EvalInfo {
    pub file: PathBuf,
    /// True when the samples are the calibration file's own, past the calibration slice.
    pub held_out_of_calibration: bool,
    /// Index of the first sample used (in the file's usable samples).
    pub first_sample: usize,
    pub samples: usize,
    pub tokens: usize,
}

/// One gate of one backend.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GateRow {
    pub name: String,
    /// `None` when nothing was measured (e.g. no reply at all).
    pub value: Option<f64>,
    pub threshold: f64,
    /// `max` (value ≤ threshold) or `min` (value ≥ threshold).
    pub kind: String,
    pub total: Option<usize>,
    pub pass: bool,
    /// Whether the choice requires it (not in `--skip-gates`).
    pub required: bool,
}

/// What the bench measured on one endpoint.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Measured {
    /// `/v1/models`' first id, `None` when the endpoint was down.
    pub model: Option<String>,
    /// Why the endpoint could not be measured.
    pub down: Option<String>,
    pub gates: Vec<GateRow>,
    pub ttft_ms_p50: Option<f64>,
    pub ttft_ms_p95: Option<f64>,
    pub decode_tok_s_p50: Option<f64>,
    pub failed_requests: usize,
    /// The bench JSON (schema fp4.bench.v1), relative to RUN_DIR.
    pub bench_json: PathBuf,
}

impl Measured {
    pub fn from_bench(b: &BackendResult, skipped: &[String], bench_json: PathBuf) -> Measured {
        Measured {
            model: b.model.clone(),
            down: b.error.clone(),
            gates: b
                .gates
                .iter()
                .map(|g| GateRow {
                    name: g.name.to_string(),
                    value: g.value.is_finite().then_some(g.value),
                    threshold: g.threshold,
                    kind: g.kind.to_string(),
                    total: g.total,
                    pass: g.pass,
                    required: !skipped.iter().any(|s| s == g.name),
                })
                .collect(),
            ttft_ms_p50: b.ttft_ms.p50,
            ttft_ms_p95: b.ttft_ms.p95,
            decode_tok_s_p50: b.decode_tok_s.p50,
            failed_requests: b.failed_requests,
            bench_json,
        }
    }

    /// Names of the required gates that failed (all of them when the endpoint was down).
    pub fn failed_required(&self) -> Vec<String> {
        self.gates.iter().filter(|g| g.required && !g.pass).map(|g| g.name.clone()).collect()
    }
}

/// The endpoint compared with.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Endpoint {
    pub name: String,
    pub url: String,
    /// True when `fp4 loop` served the BF16 source itself as the peer.
    pub served_by_fp4: bool,
    pub measured: Option<Measured>,
    /// Why it could not be served or measured.
    pub error: Option<String>,
    /// Bytes of the checkpoint served, when fp4 served the BF16 source.
    pub source_size_bytes: Option<u64>,
}

impl Endpoint {
    pub fn is_up(&self) -> bool {
        self.measured.as_ref().is_some_and(|m| m.down.is_none())
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Quantized {
    /// The checkpoint directory, relative to RUN_DIR.
    pub checkpoint: PathBuf,
    /// True when RUN_DIR already held it from an earlier run with the same options.
    pub reused: bool,
    /// From its quant_report.json.
    pub quant_algo: String,
    pub quantize_seconds: Option<f64>,
    /// Bytes of its safetensors files, and of the source's.
    pub size_bytes: u64,
    pub source_size_bytes: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StrategyRun {
    /// As given to --strategies (`rtn`, `A`, a file).
    pub name: String,
    /// What it ran: `--strategy rtn`, `built-in A`, or the strategy file.
    pub config: String,
    pub quantized: Option<Quantized>,
    pub smoke: Option<Smoke>,
    pub measured: Option<Measured>,
    pub kl: Option<KlReport>,
    /// TTFT p50 of the peer divided by this strategy's (> 1: faster than the peer), and decode
    /// p50 of this strategy divided by the peer's (> 1: faster).
    pub ttft_speedup_vs_peer: Option<f64>,
    pub decode_speedup_vs_peer: Option<f64>,
    /// The step that failed, and why (quantize, serve, smoke test, bench, KL).
    pub error: Option<String>,
}

impl StrategyRun {
    /// Why it cannot be chosen (empty: it can).
    pub fn blockers(&self) -> Vec<String> {
        if let Some(e) = &self.error {
            return vec![e.clone()];
        }
        if let Some(s) = self.smoke.as_ref().filter(|s| !s.pass) {
            return vec![format!("smoke test failed ({})", s.problems.join("; "))];
        }
        match &self.measured {
            None => vec!["not benchmarked".into()],
            Some(m) => m.failed_required().into_iter().map(|g| format!("gate {g}")).collect(),
        }
    }
}

/// The best strategy: every required gate passes, then the lowest TTFT p50, then the highest
/// decode p50 (unmeasured speeds sort last).
pub fn choose(runs: &[StrategyRun]) -> Option<usize> {
    let key = |r: &StrategyRun| {
        let m = r.measured.as_ref().expect("candidates are measured");
        (m.ttft_ms_p50.unwrap_or(f64::INFINITY), -m.decode_tok_s_p50.unwrap_or(0.0))
    };
    (0..runs.len()).filter(|&i| runs[i].blockers().is_empty()).min_by(|&a, &b| {
        let (ka, kb) = (key(&runs[a]), key(&runs[b]));
        ka.0.total_cmp(&kb.0).then(ka.1.total_cmp(&kb.1))
    })
}

fn opt(v: Option<f64>, digits: usize) -> String {
    v.map_or("–".into(), |x| format!("{x:.digits$}"))
}

fn gate_cell(g: &GateRow) -> String {
    let v = match (g.value, g.total) {
        (Some(v), Some(t)) => format!("{v:.0}/{t}"),
        (Some(v), None) => format!("{v:.1}"),
        (None, _) => "–".into(),
    };
    let mark = if g.pass {
        "✅"
    } else if g.required {
        "❌"
    } else {
        "⚠️"
    };
    format!("{mark} {v}")
}

/// The Markdown summary: one row per strategy (and the peer), one column per gate, then KL,
/// size, TTFT and decode; the choice below.
pub fn markdown(s: &Summary) -> String {
    let mut md = String::new();
    let _ = writeln!(md, "# fp4 loop: {}\n", s.model.display());
    let _ = writeln!(
        md,
        "Suite `{}` ({} tests, {} warm-up + {} measured runs), served on `{}` ({}). Calibration: {} samples of `{}`; KL on {} samples of `{}`{}.\n",
        s.suite.name,
        s.suite.tests,
        s.suite.warmup,
        s.suite.runs,
        s.device,
        s.serve_mode.to_uppercase(),
        s.calibration.samples,
        s.calibration.file.display(),
        s.eval.samples,
        s.eval.file.display(),
        if s.eval.held_out_of_calibration { " (held out of calibration)" } else { "" }
    );
    let gate_names: Vec<String> = s
        .strategies
        .iter()
        .filter_map(|r| r.measured.as_ref())
        .chain(s.peer.iter().filter_map(|p| p.measured.as_ref()))
        .find(|m| !m.gates.is_empty())
        .map(|m| m.gates.iter().map(|g| g.name.clone()).collect())
        .unwrap_or_default();
    let _ = writeln!(
        md,
        "| strategy | smoke | {} | all required | KL mean | top-1 | size (MB) | TTFT vs peer | decode vs peer |",
        gate_names.join(" | ")
    );
    let _ = writeln!(md, "|---|---|{}---|---|---|---|---|---|", "---|".repeat(gate_names.len()));
    let times = |v: Option<f64>| v.map_or("–".into(), |x| format!("{x:.2}×"));
    let gate_cells = |m: Option<&Measured>| -> Vec<String> {
        gate_names
            .iter()
            .map(|n| m.and_then(|m| m.gates.iter().find(|g| &g.name == n)).map(gate_cell).unwrap_or_else(|| "–".into()))
            .collect()
    };
    for r in &s.strategies {
        let m = r.measured.as_ref();
        let smoke = match &r.smoke {
            Some(x) if x.pass => "✅",
            Some(_) => "❌",
            None => "–",
        };
        let verdict = if s.chosen.as_deref() == Some(r.name.as_str()) {
            "**chosen**".to_string()
        } else if r.blockers().is_empty() {
            "pass".into()
        } else {
            "FAIL".into()
        };
        let _ = writeln!(
            md,
            "| {} | {smoke} | {} | {verdict} | {} | {} | {} | {} | {} |",
            r.name,
            gate_cells(m).join(" | "),
            opt(r.kl.as_ref().map(|k| k.kl_mean), 4),
            opt(r.kl.as_ref().map(|k| k.top1_agreement), 3),
            opt(r.quantized.as_ref().map(|q| q.size_bytes as f64 / 1e6), 2),
            times(r.ttft_speedup_vs_peer),
            times(r.decode_speedup_vs_peer),
        );
    }
    if let Some(p) = &s.peer {
        let m = p.measured.as_ref();
        let state = if p.is_up() { "peer" } else { "peer DOWN" };
        let _ = writeln!(
            md,
            "| {} ({state}) | – | {} | – | – | – | {} | 1× | 1× |",
            p.name,
            gate_cells(m).join(" | "),
            opt(p.source_size_bytes.map(|b| b as f64 / 1e6), 2),
        );
    }
    let _ = writeln!(
        md,
        "\n✅ pass, ❌ fail, ⚠️ fail in a gate not required (--skip-gates). TTFT vs peer: the peer's TTFT p50 over \
         the strategy's (> 1× is faster); decode vs peer: the strategy's decode p50 over the peer's.\n"
    );
    if let Some(p) = &s.peer {
        match (&p.error, p.measured.as_ref().and_then(|m| m.down.as_ref())) {
            (Some(e), _) | (None, Some(e)) => {
                let _ = writeln!(md, "Peer **{}** ({}) is down: {e}\n", p.name, p.url);
            }
            _ => {}
        }
    }
    for r in &s.strategies {
        let b = r.blockers();
        if !b.is_empty() {
            let _ = writeln!(md, "- {}: {}", r.name, b.join(", "));
        }
    }
    let _ = writeln!(md, "\n{}", s.verdict);
    md
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(name: &str, ttft: f64, decode: f64, pass: bool) -> StrategyRun {
        let gate = |name: &str, pass: bool, required: bool| GateRow {
            name: name.into(),
            value: Some(1.0),
            threshold: 0.0,
            kind: "max".into(),
            total: None,
            pass,
            required,
        };
        StrategyRun {
            name: name.into(),
            config: name.into(),
            quantized: None,
            smoke: None,
            measured: Some(Measured {
                model: Some("m".into()),
                down: None,
                gates: vec![gate("factual", pass, true), gate("ttft_ms_p50", false, false)],
                ttft_ms_p50: Some(ttft),
                ttft_ms_p95: None,
                decode_tok_s_p50: Some(decode),
                failed_requests: 0,
                bench_json: "x.json".into(),
            }),
            kl: None,
            ttft_speedup_vs_peer: None,
            decode_speedup_vs_peer: None,
            error: None,
        }
    }

    #[test]
    fn choice_needs_every_required_gate_then_ttft_then_decode() {
        let runs = vec![run("a", 10.0, 50.0, false), run("b", 20.0, 50.0, true), run("c", 20.0, 60.0, true)];
        assert_eq!(choose(&runs), Some(2), "b and c tie on TTFT; c decodes faster; a fails a gate");
        assert_eq!(runs[0].blockers(), vec!["gate factual".to_string()], "skipped gates do not block");
        let mut failed = run("d", 1.0, 1.0, true);
        failed.error = Some("quantize: boom".into());
        assert_eq!(choose(&[failed, run("e", 5.0, 1.0, false)]), None);
    }
}
