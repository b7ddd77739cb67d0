//! `fp4 loop`: the whole loop in one command. For each strategy: quantize (reusing RUN_DIR's
//! finished output), serve it with a child `fp4 serve` on a real port, the smoke test, the bench
//! suite, KL against the BF16 source on held-out data; the peer (an endpoint given with --peer, or
//! the BF16 source served by fp4) is benchmarked once with the same suite. Then the best strategy:
//! every required gate passes, then the lowest TTFT, then the highest decode speed.
//!
//! RUN_DIR holds `<strategy>/` (the checkpoints), `bench/<name>.{json,md}`, `kl/<strategy>.json`,
//! `logs/<name>.serve.log`, `plots/{ttft,decode}.svg` and `summary.{json,md}` (rewritten after
//! every step, so an interrupted run still says how far it got). Without --model everything
//! defaults to the embedded mini-Annie.

mod served;
pub(super) mod summary;

use super::quantize;
use super::{ComputeArgs, DeviceArg, Dtype};
use anyhow::{bail, Context};
use fp4_bench::client::Backend;
use fp4_bench::run::{self as bench_run, BackendResult, RunOptions};
use fp4_bench::suite::Suite;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::Value;
use served::{ServeSpec, Served};
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Duration;
use summary::{CalibInfo, Endpoint, EvalInfo, Measured, Quantized, StrategyRun, SuiteInfo, Summary};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// BF16 source checkpoint. Without it, every input defaults to the embedded mini-Annie
    /// (models/mini-annie, its suite, calibration and eval sets; run from the fp4 checkout).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Calibration data of the strategies (JSONL, as `fp4 quantize --calib-data`).
    #[arg(long)]
    calib_data: Option<PathBuf>,
    /// Calibration data of `rtn`, the naive baseline (default: --calib-data). When it differs,
    /// rtn calibrates on all of it.
    #[arg(long)]
    rtn_calib_data: Option<PathBuf>,
    /// Run directory (default without --model: target/mini-annie). Written only where fp4
    /// writes; an existing checkpoint of the same options is reused.
    #[arg(long, alias = "output")]
    out: Option<PathBuf>,
    /// Strategies in order: `rtn`, the built-in `A`, `B`, `C` (configs/strategies/), another
    /// `fp4 quantize --strategy` (awq_lite, mlp_only, auto_mixed), or a strategy TOML file.
    #[arg(long, value_delimiter = ',', default_value = "rtn,A,B,C")]
    strategies: Vec<String>,
    /// The endpoint to compare with, NAME=URL (e.g. q4km_llama=http://localhost:8003), or
    /// `none`. Default: the BF16 source served by fp4 on --port, named bf16.
    #[arg(long)]
    peer: Option<String>,
    /// Bearer token for the peer.
    #[arg(long, env = "OPENAI_API_KEY", hide_env_values = true)]
    peer_api_key: Option<String>,
    /// Bench suite (default: the built-in Annie suite; mini-Annie's own without --model).
    #[arg(long)]
    suite: Option<PathBuf>,
    /// KL evaluation data (JSONL). Default: the calibration data's samples after the ones the
    /// strategies calibrate on (held out).
    #[arg(long)]
    eval_data: Option<PathBuf>,
    /// KL on at most this many samples (default: all of --eval-data; held out of the calibration
    /// data: a tenth of it, at least 1).
    #[arg(long)]
    eval_samples: Option<usize>,
    /// Calibration samples of the strategies (default: all but the held-out ones; 32 for
    /// mini-Annie).
    #[arg(long)]
    calib_samples: Option<usize>,
    /// auto_mixed: samples that score each group (default: fp4 quantize's; 4 for mini-Annie).
    #[arg(long)]
    score_samples: Option<usize>,
    /// Where the checkpoints are served and evaluated (quantization runs on the CPU).
    #[arg(long, value_enum, default_value_t = DeviceArg::Cpu)]
    device: DeviceArg,
    /// Port of the servers (one at a time).
    #[arg(long, default_value_t = 8000)]
    port: u16,
    /// Unmeasured requests per endpoint (default 2; 1 for mini-Annie).
    #[arg(long)]
    warmup: Option<usize>,
    /// Measured runs per test (default 5; 1 for mini-Annie).
    #[arg(long)]
    runs: Option<usize>,
    /// Per-request timeout in seconds.
    #[arg(long, default_value_t = 120)]
    timeout: u64,
    /// Seconds a server may take to load and warm up.
    #[arg(long, default_value_t = 600)]
    serve_timeout: u64,
    /// Gates reported but not required for the choice, comma list (e.g. ttft_ms_p50). Default:
    /// none; for mini-Annie on the CPU the speed gates (ttft_ms_p50, decode_tok_s_p50), which
    /// the CPU's W4A4 emulation is not built to meet.
    #[arg(long, value_delimiter = ',')]
    skip_gates: Option<Vec<String>>,
    /// Serve and evaluate the quantized checkpoints weight-only (W4A16, Hopper) instead of W4A4
    /// (activations quantized with input_scale, what SM12x computes; the default). Also sets
    /// AWQ-lite's search loss.
    #[arg(long)]
    w4a16: bool,
    /// One more flag for every `fp4 serve` (repeat: --serve-arg=--cache-budget --serve-arg=4GiB).
    #[arg(long, allow_hyphen_values = true)]
    serve_arg: Vec<String>,
    /// How the calibration data was made, for the summary and the model card.
    #[arg(long)]
    calib_description: Option<String>,
}

/// Every input resolved: flags, then the mini-Annie defaults, then the general ones.
struct Plan {
    model: PathBuf,
    calib_data: PathBuf,
    rtn_calib_data: Option<PathBuf>,
    out: PathBuf,
    strategies: Vec<Spec>,
    peer: PeerSpec,
    suite_file: Option<PathBuf>,
    suite: Suite,
    eval_data: Option<PathBuf>,
    eval_samples: Option<usize>,
    calib_samples: Option<usize>,
    score_samples: Option<usize>,
    bench: RunOptions,
    skip_gates: Vec<String>,
    calib_description: Option<String>,
}

/// A strategy of --strategies: what `fp4 quantize` is asked for, and its directory name.
#[derive(Debug, Clone, PartialEq)]
enum Spec {
    /// `--strategy NAME` (rtn, awq_lite, mlp_only, auto_mixed).
    Plain(String),
    /// One of quantize::BUILT_IN.
    BuiltIn(&'static str),
    /// `--config FILE`.
    File(PathBuf),
}

impl Spec {
    fn parse(s: &str) -> anyhow::Result<Spec> {
        let s = s.trim();
        if let Some((name, _)) = quantize::BUILT_IN.iter().find(|(n, _)| n.eq_ignore_ascii_case(s)) {
            return Ok(Spec::BuiltIn(name));
        }
        if ["rtn", "awq_lite", "mlp_only", "auto_mixed"].contains(&s) {
            return Ok(Spec::Plain(s.into()));
        }
        let p = PathBuf::from(s);
        if p.is_file() {
            return Ok(Spec::File(p));
        }
        bail!("--strategies: `{s}` is neither rtn, A, B, C, awq_lite, mlp_only, auto_mixed nor a strategy file")
    }

    /// The directory (and row) name.
    fn name(&self) -> String {
        match self {
            Spec::Plain(s) => s.clone(),
            Spec::BuiltIn(n) => n.to_string(),
            Spec::File(p) => p.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "custom".into()),
        }
    }

    /// What the run records as its config (also compared when reusing a checkpoint).
    fn config(&self) -> String {
        match self {
            Spec::Plain(s) => format!("--strategy {s}"),
            Spec::BuiltIn(n) => format!("built-in {n}"),
            Spec::File(p) => p.display().to_string(),
        }
    }
}

enum PeerSpec {
    None,
    /// The BF16 source served by fp4.
    Bf16,
    External(Backend),
}

/// mini-Annie's files, relative to the checkout: the current directory when it holds them, else
/// the checkout this fp4 was built from.
fn mini_annie_root() -> anyhow::Result<PathBuf> {
    let probe = "models/mini-annie/config.json";
    if Path::new(probe).is_file() {
        return Ok(PathBuf::new());
    }
    let built = Path::new(env!("CARGO_MANIFEST_DIR"));
    if built.join(probe).is_file() {
        return Ok(built.to_path_buf());
    }
    bail!(
        "fp4 loop without --model runs the embedded mini-Annie, whose files are not here ({probe}): \
         run it from the fp4 checkout, or pass --model, --calib-data and --out"
    )
}

fn plan(a: Args) -> anyhow::Result<Plan> {
    let mini = a.model.is_none();
    let root = if mini { mini_annie_root()? } else { PathBuf::new() };
    let or_mini = |given: Option<PathBuf>, rel: &str| given.or_else(|| mini.then(|| root.join(rel)));
    let model = or_mini(a.model, "models/mini-annie").expect("mini-Annie default");
    let calib_data = or_mini(a.calib_data, "configs/calib/mini-annie.jsonl")
        .context("--calib-data FILE.jsonl is required with --model (the strategies' calibration data)")?;
    let out = or_mini(a.out, "target/mini-annie").context("--out RUN_DIR is required with --model")?;
    let rtn_calib_data = or_mini(a.rtn_calib_data, "configs/calib/mini-annie-generic.jsonl");
    let suite_file = or_mini(a.suite, "configs/bench/mini-annie.toml");
    let eval_data = or_mini(a.eval_data, "tests/fixtures/mini-annie/eval.jsonl");
    let suite = Suite::load(suite_file.as_deref())?;
    let mut strategies = Vec::new();
    for s in &a.strategies {
        let spec = Spec::parse(s)?;
        if strategies.iter().any(|o: &Spec| o.name() == spec.name()) {
            bail!("--strategies names `{}` twice (each gets the directory RUN_DIR/{0})", spec.name());
        }
        strategies.push(spec);
    }
    anyhow::ensure!(!strategies.is_empty(), "--strategies: no strategy given");
    let peer = match a.peer.as_deref() {
        None => PeerSpec::Bf16,
        Some("none") => PeerSpec::None,
        Some("bf16") => PeerSpec::Bf16,
        Some(p) => {
            let (name, url) =
                p.split_once('=').filter(|(n, u)| !n.is_empty() && u.starts_with("http")).with_context(|| {
                    format!("--peer `{p}`: expected NAME=URL (e.g. q4km_llama=http://localhost:8003), bf16 or none")
                })?;
            PeerSpec::External(Backend { name: name.into(), url: url.into(), api_key: a.peer_api_key.clone() })
        }
    };
    let gate_names = fp4_bench::run::GATE_NAMES;
    let skip_gates = match a.skip_gates {
        Some(g) => g.into_iter().map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect(),
        None if mini && a.device == DeviceArg::Cpu => vec!["ttft_ms_p50".into(), "decode_tok_s_p50".into()],
        None => vec![],
    };
    if let Some(bad) = skip_gates.iter().find(|g| !gate_names.contains(&g.as_str())) {
        bail!("--skip-gates: no gate `{bad}` (gates: {})", gate_names.join(", "));
    }
    for (p, what) in [(Some(&model), "--model"), (Some(&calib_data), "--calib-data")]
        .into_iter()
        .chain([(rtn_calib_data.as_ref(), "--rtn-calib-data"), (eval_data.as_ref(), "--eval-data")])
    {
        if let Some(p) = p.filter(|p| !p.exists()) {
            bail!("{what} {}: no such file or directory", p.display());
        }
    }
    check_run_dir(&out, &model)?;
    let n = |v: Option<usize>, what: &str| -> anyhow::Result<Option<usize>> {
        anyhow::ensure!(v != Some(0), "{what} must be at least 1");
        Ok(v)
    };
    let runs = a.runs.unwrap_or(if mini { 1 } else { 5 });
    anyhow::ensure!(runs >= 1, "--runs must be at least 1");
    Ok(Plan {
        model,
        calib_data,
        rtn_calib_data,
        out,
        strategies,
        peer,
        suite_file,
        suite,
        eval_data,
        eval_samples: n(a.eval_samples, "--eval-samples")?,
        calib_samples: n(a.calib_samples, "--calib-samples")?.or(mini.then_some(32)),
        score_samples: n(a.score_samples, "--score-samples")?.or(mini.then_some(4)),
        bench: RunOptions {
            warmup: a.warmup.unwrap_or(if mini { 1 } else { 2 }),
            runs,
            timeout: Duration::from_secs(a.timeout.max(1)),
        },
        skip_gates,
        calib_description: a.calib_description.or_else(|| {
            mini.then(|| "mini-Annie's generator (tests/reference/mini_annie/data.py), no teacher".to_string())
        }),
    })
    .map(|mut p| {
        if p.rtn_calib_data.as_ref() == Some(&p.calib_data) {
            p.rtn_calib_data = None;
        }
        p
    })
}

/// Everything the steps share.
struct Ctx {
    plan: Plan,
    compute: ComputeArgs,
    serve_port: u16,
    serve_timeout: Duration,
    serve_extra: Vec<String>,
    w4a4: bool,
    summary: Summary,
    /// Bench results for the plots: the peer's first, then each strategy's.
    results: Vec<BackendResult>,
    peer_result: Option<BackendResult>,
    /// Load options of KL's models (the GPU is opened on first use), and the BF16 reference.
    load: Option<fp4_model::LoadOptions>,
    reference: Option<fp4_model::Qwen35>,
    eval_samples: Vec<Vec<u32>>,
}

/// RUN_DIR may be new, empty, or an earlier run's (what `loop` writes there: summary.json,
/// bench/, kl/, logs/): never the source, inside it or holding it, and never a directory of
/// something else, where `loop` would write its files among the user's.
fn check_run_dir(out: &Path, model: &Path) -> anyhow::Result<()> {
    let (src, dst) = (fp4_quant::export::resolve(model), fp4_quant::export::resolve(out));
    if src.starts_with(&dst) || dst.starts_with(&src) {
        bail!(
            "--out {}: {} the source model {}; choose a run directory outside it",
            out.display(),
            if src == dst {
                "is"
            } else if src.starts_with(&dst) {
                "contains"
            } else {
                "is inside"
            },
            model.display()
        );
    }
    let Ok(mut entries) = std::fs::read_dir(out) else { return Ok(()) };
    let empty = entries.next().is_none();
    let ours = ["summary.json", "bench", "kl", "logs"].iter().any(|f| out.join(f).exists());
    anyhow::ensure!(
        empty || ours,
        "--out {}: exists and is not an fp4 loop run directory (no summary.json, bench/, kl/ or logs/); \
         choose a new or empty directory",
        out.display()
    );
    Ok(())
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    let (device, port, serve_timeout, w4a16) = (a.device, a.port, a.serve_timeout, a.w4a16);
    let serve_args = a.serve_arg.clone();
    let plan = plan(a)?;
    let ckpt = fp4_format::Checkpoint::open(&plan.model)
        .with_context(|| format!("cannot open model {}", plan.model.display()))?;
    let compute = ComputeArgs { dtype: Dtype::F32, w4a4: !w4a16, w4a16, device, exact_gemm: false };
    let mut serve_extra = serve_args;
    if device == DeviceArg::Cuda {
        serve_extra.extend(["--device".to_string(), "cuda".to_string()]);
    }
    let (calibration, eval, eval_samples, calib_samples) = data_plan(&plan, &ckpt)?;
    // Inputs checked: only now is anything written.
    for d in ["", "bench", "kl", "logs"] {
        let d = plan.out.join(d);
        std::fs::create_dir_all(&d).with_context(|| format!("cannot create {}", d.display()))?;
    }
    let mut plan = plan;
    plan.calib_samples = Some(calib_samples);
    let summary = Summary {
        schema: summary::SCHEMA.into(),
        fp4_version: env!("CARGO_PKG_VERSION").into(),
        started_unix: unix_now(),
        finished_unix: None,
        model: plan.model.clone(),
        device: format!("{device:?}").to_lowercase(),
        serve_mode: if w4a16 { "w4a16" } else { "w4a4" }.into(),
        suite: SuiteInfo {
            name: plan.suite.name.clone(),
            file: plan.suite_file.clone(),
            tests: plan.suite.tests.len(),
            warmup: plan.bench.warmup,
            runs: plan.bench.runs,
            temperature: plan.suite.params.temperature,
            max_tokens: plan.suite.params.max_tokens,
        },
        calibration,
        eval,
        skipped_gates: plan.skip_gates.clone(),
        peer: None,
        strategies: vec![],
        chosen: None,
        verdict: "running".into(),
    };
    let mut cx = Ctx {
        plan,
        compute,
        serve_port: port,
        serve_timeout: Duration::from_secs(serve_timeout),
        serve_extra,
        w4a4: !w4a16,
        summary,
        results: vec![],
        peer_result: None,
        load: None,
        reference: None,
        eval_samples,
    };
    let total = cx.plan.strategies.len();
    eprintln!(
        "fp4 loop: {} → {} ({} strategies: {}; peer: {})",
        cx.plan.model.display(),
        cx.plan.out.display(),
        total,
        cx.plan.strategies.iter().map(Spec::name).collect::<Vec<_>>().join(", "),
        match &cx.plan.peer {
            PeerSpec::None => "none".to_string(),
            PeerSpec::Bf16 => "the BF16 source, served by fp4".to_string(),
            PeerSpec::External(b) => format!("{} at {}", b.name, b.url),
        }
    );
    peer_step(&mut cx)?;
    let source_size = safetensors_bytes(&cx.plan.model);
    for (i, spec) in cx.plan.strategies.clone().iter().enumerate() {
        eprintln!("[{}/{total}] strategy {}", i + 1, spec.name());
        let row = strategy_steps(&mut cx, spec, source_size);
        cx.summary.strategies.push(row);
        write_summary(&cx)?;
    }
    let chosen = summary::choose(&cx.summary.strategies);
    cx.summary.chosen = chosen.map(|i| cx.summary.strategies[i].name.clone());
    let blocked: Vec<String> = cx
        .summary
        .strategies
        .iter()
        .filter(|r| !r.blockers().is_empty())
        .map(|r| format!("{}: {}", r.name, r.blockers().join(", ")))
        .collect();
    cx.summary.verdict = match &cx.summary.chosen {
        Some(c) => {
            let r = &cx.summary.strategies[chosen.expect("chosen")];
            format!(
                "Chosen: **{c}** (every required gate passes; TTFT p50 {} ms, decode p50 {} tok/s) → {}",
                r.measured.as_ref().and_then(|m| m.ttft_ms_p50).map_or("–".into(), |v| format!("{v:.1}")),
                r.measured.as_ref().and_then(|m| m.decode_tok_s_p50).map_or("–".into(), |v| format!("{v:.1}")),
                cx.plan.out.join(c).display()
            )
        }
        None => "No strategy passed every required gate.".into(),
    };
    cx.summary.finished_unix = Some(unix_now());
    if !cx.results.is_empty() {
        fp4_bench::report::write_plots(&cx.plan.out.join("plots"), &cx.results)?;
    }
    write_summary(&cx)?;
    println!("{}", summary::markdown(&cx.summary));
    eprintln!(
        "fp4 loop finished in {:.0} s: {} (+ summary.json, plots/)",
        started.elapsed().as_secs_f64(),
        cx.plan.out.join("summary.md").display()
    );
    if cx.summary.chosen.is_none() {
        bail!("no strategy passed every required gate:\n  {}", blocked.join("\n  "));
    }
    Ok(())
}

fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// Calibration and KL data: the stats of the calibration file, the samples KL runs on, and how
/// many samples the strategies calibrate on.
fn data_plan(
    plan: &Plan,
    ckpt: &fp4_format::Checkpoint,
) -> anyhow::Result<(CalibInfo, EvalInfo, Vec<Vec<u32>>, usize)> {
    let positions = ckpt.config.max_position_embeddings;
    let vocab = ckpt.config.vocab_size;
    let all = fp4_quant::calib::load(&plan.calib_data, &plan.model, usize::MAX, positions, vocab)
        .with_context(|| format!("--calib-data {}", plan.calib_data.display()))?
        .report("calibration data");
    let (eval_file, first, eval) = match &plan.eval_data {
        Some(f) => {
            let max = plan.eval_samples.unwrap_or(usize::MAX);
            let s = fp4_quant::calib::load(f, &plan.model, max, positions, vocab)
                .with_context(|| format!("--eval-data {}", f.display()))?
                .report("evaluation data");
            (f.clone(), 0, s)
        }
        None => {
            let held = plan.eval_samples.unwrap_or((all.len() / 10).max(1));
            anyhow::ensure!(
                held < all.len(),
                "{} holds {} usable samples: too few to hold {held} out for KL; pass --eval-data FILE",
                plan.calib_data.display(),
                all.len()
            );
            let first = all.len() - held;
            (plan.calib_data.clone(), first, all[first..].to_vec())
        }
    };
    let available = if plan.eval_data.is_some() { all.len() } else { first };
    let calib_samples = match plan.calib_samples {
        Some(n) if n > available => {
            eprintln!(
                "warning: --calib-samples {n}, but {} holds {available} usable samples{}: calibrating on {available}",
                plan.calib_data.display(),
                if plan.eval_data.is_none() { " before the held-out ones" } else { "" }
            );
            available
        }
        Some(n) => n,
        None => available,
    };
    let mut calib = calib_stats(
        &plan.calib_data,
        calib_samples,
        all[..calib_samples].iter().map(Vec::len).sum(),
        plan.calib_description.clone(),
    )?;
    if let Some(f) = &plan.rtn_calib_data {
        let rtn = fp4_quant::calib::load(f, &plan.model, usize::MAX, positions, vocab)
            .with_context(|| format!("--rtn-calib-data {}", f.display()))?
            .samples;
        let tokens = rtn.iter().map(Vec::len).sum();
        let what = "generic data for the naive rtn baseline (--rtn-calib-data)".to_string();
        calib.rtn = Some(Box::new(calib_stats(f, rtn.len(), tokens, Some(what))?));
    }
    let eval_info = EvalInfo {
        file: eval_file,
        held_out_of_calibration: plan.eval_data.is_none(),
        first_sample: first,
        samples: eval.len(),
        tokens: eval.iter().map(Vec::len).sum(),
    };
    Ok((calib, eval_info, eval, calib_samples))
}

/// Counts, categories and tool-call share of a calibration file.
fn calib_stats(path: &Path, samples: usize, tokens: usize, description: Option<String>) -> anyhow::Result<CalibInfo> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let (mut records, mut conversations, mut pre_tokenized, mut with_tool_calls) = (0, 0, 0, 0);
    let mut categories = std::collections::BTreeMap::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        records += 1;
        let Ok(v) = serde_json::from_str::<Value>(line) else { continue };
        if v.get("input_ids").is_some() {
            pre_tokenized += 1;
        } else if v.get("messages").is_some() {
            conversations += 1;
            with_tool_calls += usize::from(!fp4_calib::record::called_tools(&v).is_empty());
        }
        let cat = v.get("category").and_then(Value::as_str).unwrap_or("uncategorised");
        *categories.entry(cat.to_string()).or_insert(0) += 1;
    }
    let batches = fp4_calib::generate::batch_path(path, 0).is_file();
    let description = description.unwrap_or_else(|| {
        if batches {
            "fp4 calib generate (its batch files are beside the data)".into()
        } else {
            "not recorded (fp4 loop --calib-description says how it was made)".into()
        }
    });
    Ok(CalibInfo {
        file: path.to_path_buf(),
        samples,
        tokens,
        records,
        conversations,
        pre_tokenized,
        with_tool_calls,
        tool_call_share: (conversations > 0).then(|| with_tool_calls as f64 / conversations as f64),
        categories,
        description,
        rtn: None,
    })
}

fn write_summary(cx: &Ctx) -> anyhow::Result<()> {
    let out = &cx.plan.out;
    fp4_bench::report::write_text(&out.join(summary::FILE), &(serde_json::to_string_pretty(&cx.summary)? + "\n"))?;
    fp4_bench::report::write_text(&out.join("summary.md"), &summary::markdown(&cx.summary))?;
    Ok(())
}

/// Bytes of a directory's safetensors files.
fn safetensors_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "safetensors"))
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.len())
        .sum()
}

fn bar(template: &str) -> ProgressBar {
    ProgressBar::new(0)
        .with_style(ProgressStyle::with_template(template).expect("static template").progress_chars("=> "))
}

/// Runs the suite against one endpoint with a progress bar; writes `bench/<file>.{json,md}`
/// (with the peer beside it when there is one).
fn bench(cx: &Ctx, backend: &Backend, file: &str) -> anyhow::Result<BackendResult> {
    let pb = bar(&format!("  bench {} [{{bar:30}}] {{pos}}/{{len}} requests, {{elapsed}} (eta {{eta}})", backend.name));
    let started = unix_now();
    let mut results = bench_run::run(&cx.plan.suite, std::slice::from_ref(backend), &cx.plan.bench, &|done, total| {
        pb.set_length(total as u64);
        pb.set_position(done as u64);
    })?;
    pb.finish_and_clear();
    let result = results.remove(0);
    let mut shown = vec![result.clone()];
    shown.extend(cx.peer_result.iter().cloned());
    let suite = &cx.plan.suite;
    let doc = fp4_bench::report::json_report(suite, &cx.plan.bench, &shown, started, unix_now());
    fp4_bench::report::write_json(&cx.plan.out.join("bench").join(format!("{file}.json")), &doc)?;
    let md = fp4_bench::report::markdown(suite, &cx.plan.bench, &shown);
    fp4_bench::report::write_text(&cx.plan.out.join("bench").join(format!("{file}.md")), &md)?;
    Ok(result)
}

fn measured(cx: &Ctx, r: &BackendResult, file: &str) -> Measured {
    Measured::from_bench(r, &cx.plan.skip_gates, PathBuf::from("bench").join(format!("{file}.json")))
}

/// Benchmarks the peer once (serving the BF16 source first when it is fp4's own).
fn peer_step(cx: &mut Ctx) -> anyhow::Result<()> {
    let (backend, served_by_fp4) = match &cx.plan.peer {
        PeerSpec::None => return Ok(()),
        PeerSpec::External(b) => (b.clone(), false),
        PeerSpec::Bf16 => {
            (Backend { name: "bf16".into(), url: format!("http://127.0.0.1:{}", cx.serve_port), api_key: None }, true)
        }
    };
    eprintln!(
        "peer {}: {}",
        backend.name,
        if served_by_fp4 { "serving the BF16 source" } else { backend.url.as_str() }
    );
    let mut endpoint = Endpoint {
        name: backend.name.clone(),
        url: backend.url.clone(),
        served_by_fp4,
        measured: None,
        error: None,
        source_size_bytes: served_by_fp4.then(|| safetensors_bytes(&cx.plan.model)),
    };
    let server = if served_by_fp4 {
        let log = cx.plan.out.join("logs/peer.serve.log");
        let spec = ServeSpec {
            model: &cx.plan.model,
            served_name: "bf16",
            port: cx.serve_port,
            extra: &cx.serve_extra,
            log: &log,
            timeout: cx.serve_timeout,
        };
        match Served::start(&spec) {
            Ok(s) => Some(s),
            Err(e) => {
                endpoint.error = Some(format!("{e:#}"));
                eprintln!("warning: the BF16 peer could not be served: {e:#}");
                cx.summary.peer = Some(endpoint);
                return write_summary(cx);
            }
        }
    } else {
        None
    };
    let r = bench(cx, &backend, "peer")?;
    drop(server);
    if let Some(e) = &r.error {
        eprintln!("warning: peer {} at {} is down ({e}): it is reported as down", backend.name, backend.url);
    }
    endpoint.measured = Some(measured(cx, &r, "peer"));
    cx.results.push(r.clone());
    cx.peer_result = Some(r);
    cx.summary.peer = Some(endpoint);
    write_summary(cx)
}

/// Quantize (or reuse), serve + smoke test + bench, KL: one strategy's row. A failed step ends
/// the row with its error; the loop goes on with the next strategy.
fn strategy_steps(cx: &mut Ctx, spec: &Spec, source_size: u64) -> StrategyRun {
    let name = spec.name();
    let mut row = StrategyRun {
        name: name.clone(),
        config: spec.config(),
        quantized: None,
        smoke: None,
        measured: None,
        kl: None,
        ttft_speedup_vs_peer: None,
        decode_speedup_vs_peer: None,
        error: None,
    };
    let dir = cx.plan.out.join(&name);
    match quantize_step(cx, spec, &dir) {
        Ok((reused, report)) => {
            row.quantized = Some(Quantized {
                checkpoint: PathBuf::from(&name),
                reused,
                quant_algo: report["quant_algo"].as_str().unwrap_or("?").into(),
                quantize_seconds: report["seconds_total"].as_f64(),
                size_bytes: safetensors_bytes(&dir),
                source_size_bytes: source_size,
            })
        }
        Err(e) => {
            eprintln!("  {name}: quantization failed: {e:#}");
            row.error = Some(format!("quantize: {e:#}"));
            return row;
        }
    }
    if let Err(e) = serve_and_bench(cx, &name, &dir, &mut row) {
        eprintln!("  {name}: {e:#}");
        row.error = Some(format!("serve/bench: {e:#}"));
        return row;
    }
    if row.smoke.as_ref().is_some_and(|s| !s.pass) {
        return row;
    }
    match kl_step(cx, &name, &dir) {
        Ok(k) => row.kl = Some(k),
        Err(e) => {
            eprintln!("  {name}: KL failed: {e:#}");
            row.error = Some(format!("kl: {e:#}"));
        }
    }
    row
}

/// The `fp4 quantize` arguments of a strategy (also what a reusable checkpoint must have used).
fn quantize_argv(cx: &Ctx, spec: &Spec, dir: &Path) -> (Vec<OsString>, PathBuf, Option<usize>) {
    let is_rtn = *spec == Spec::Plain("rtn".into());
    let (calib, samples) = match (&cx.plan.rtn_calib_data, is_rtn) {
        (Some(f), true) => (f.clone(), None),
        _ => (cx.plan.calib_data.clone(), cx.plan.calib_samples),
    };
    let mut argv: Vec<OsString> = vec!["quantize".into(), "--model".into(), cx.plan.model.clone().into()];
    argv.extend(["--output".into(), dir.as_os_str().to_owned(), "--calib-data".into(), calib.clone().into()]);
    if let Some(n) = samples {
        argv.extend(["--calib-samples".into(), n.to_string().into()]);
    }
    if let Some(n) = cx.plan.score_samples {
        argv.extend(["--score-samples".into(), n.to_string().into()]);
    }
    argv.extend(["--serve-mode".into(), if cx.w4a4 { "w4a4" } else { "w4a16" }.into()]);
    match spec {
        Spec::Plain(s) => argv.extend(["--strategy".into(), s.into()]),
        Spec::File(p) => argv.extend(["--config".into(), p.clone().into()]),
        Spec::BuiltIn(_) => {}
    }
    (argv, calib, samples)
}

/// Why an existing checkpoint does not match what this run asks for (`None`: it does).
fn reuse_mismatch(report: &Value, cx: &Ctx, spec: &Spec, calib: &Path, samples: Option<usize>) -> Option<String> {
    let o = &report["options"];
    let s = |p: &Path| Value::String(p.display().to_string());
    let config = match spec {
        Spec::Plain(_) => Value::Null,
        _ => Value::String(spec.config()),
    };
    let strategy_ok = match spec {
        Spec::Plain(n) => report["strategy"].as_str() == Some(n.as_str()),
        _ => true,
    };
    let score_ok = o["score_samples"].is_null()
        || cx.plan.score_samples.is_none()
        || o["score_samples"].as_u64() == cx.plan.score_samples.map(|n| n as u64);
    // The strategy file's text as it is now (a built-in or a file edited since is a new config).
    let toml = match spec {
        Spec::Plain(_) => None,
        Spec::BuiltIn(n) => quantize::BUILT_IN.iter().find(|(b, _)| b == n).map(|(_, t)| t.to_string()),
        Spec::File(p) => std::fs::read_to_string(p).ok(),
    };
    let checks = [
        ("model", o["model"] == s(&cx.plan.model)),
        ("strategy file", o["config_toml"].as_str() == toml.as_deref()),
        ("calibration data", o["calib_data"] == s(calib)),
        ("calibration samples", o["calib_samples"] == samples.map_or(Value::Null, |n| n.into())),
        ("strategy config", o["config"] == config && strategy_ok),
        ("serve mode", report["serve_mode"] == if cx.w4a4 { "w4a4" } else { "w4a16" }),
        ("score samples", score_ok),
    ];
    checks.iter().find(|(_, ok)| !ok).map(|(what, _)| what.to_string())
}

/// Quantizes into `dir` unless it already holds this strategy's finished output; returns
/// (reused, its quant_report.json).
fn quantize_step(cx: &Ctx, spec: &Spec, dir: &Path) -> anyhow::Result<(bool, Value)> {
    let report_path = dir.join(fp4_quant::export::REPORT);
    let (mut argv, calib, samples) = quantize_argv(cx, spec, dir);
    if report_path.is_file() {
        let report: Value = serde_json::from_slice(&std::fs::read(&report_path)?)
            .with_context(|| format!("{} is not JSON", report_path.display()))?;
        match reuse_mismatch(&report, cx, spec, &calib, samples) {
            None => {
                eprintln!("  quantize: reusing {} (same options)", dir.display());
                return Ok((true, report));
            }
            Some(what) => {
                eprintln!("  quantize: {} was made with another {what}: quantizing again", dir.display());
                argv.push("--force".into());
            }
        }
    }
    let args = quantize::parse_args(argv)?;
    match spec {
        Spec::BuiltIn(name) => quantize::run_built_in(args, name)?,
        _ => quantize::run(args)?,
    }
    let report: Value = serde_json::from_slice(&std::fs::read(&report_path)?)
        .with_context(|| format!("{} is not JSON", report_path.display()))?;
    Ok((false, report))
}

/// Serves the checkpoint, smoke-tests it and (when that passes) benchmarks it.
fn serve_and_bench(cx: &mut Ctx, name: &str, dir: &Path, row: &mut StrategyRun) -> anyhow::Result<()> {
    let log = cx.plan.out.join("logs").join(format!("{name}.serve.log"));
    let mut extra = cx.serve_extra.clone();
    if cx.w4a4 {
        extra.push("--w4a4".into());
    }
    let spec = ServeSpec {
        model: dir,
        served_name: name,
        port: cx.serve_port,
        extra: &extra,
        log: &log,
        timeout: cx.serve_timeout,
    };
    let server = Served::start(&spec)?;
    let backend = Backend { name: name.into(), url: server.url.clone(), api_key: None };
    let model = backend.model(cx.plan.bench.timeout).map_err(|e| anyhow::anyhow!("/v1/models: {e}"))?;
    let smoke = fp4_bench::smoke::run(&backend, &model, &cx.plan.suite, cx.plan.bench.timeout);
    if smoke.pass {
        eprintln!("  smoke test passed: {:?}", smoke.content);
    } else {
        eprintln!("  smoke test FAILED ({}): {:?}; skipping {name}", smoke.problems.join("; "), smoke.content);
    }
    let pass = smoke.pass;
    row.smoke = Some(smoke);
    if !pass {
        return Ok(());
    }
    let r = bench(cx, &backend, name)?;
    drop(server);
    let m = measured(cx, &r, name);
    if let Some(p) = cx.summary.peer.as_ref().filter(|p| p.is_up()).and_then(|p| p.measured.as_ref()) {
        row.ttft_speedup_vs_peer = p.ttft_ms_p50.zip(m.ttft_ms_p50).map(|(p, s)| p / s);
        row.decode_speedup_vs_peer = m.decode_tok_s_p50.zip(p.decode_tok_s_p50).map(|(s, p)| s / p);
    }
    row.measured = Some(m);
    cx.results.push(r);
    Ok(())
}

/// KL(BF16 ‖ strategy) on the eval samples; writes `kl/<name>.json`.
fn kl_step(cx: &mut Ctx, name: &str, dir: &Path) -> anyhow::Result<fp4_quant::eval::KlReport> {
    let opts = match cx.load {
        Some(o) => o,
        None => *cx.load.insert(cx.compute.load_options()?),
    };
    if cx.reference.is_none() {
        cx.reference = Some(super::load_model(&cx.plan.model, opts)?.1);
    }
    let (_, model) = super::load_model(dir, opts)?;
    let reference = cx.reference.as_ref().expect("loaded above");
    anyhow::ensure!(
        reference.config.vocab_size == model.config.vocab_size,
        "{} has another vocabulary than the source",
        dir.display()
    );
    let pb = bar(&format!("  KL {name} [{{bar:30}}] {{pos}}/{{len}} samples, {{elapsed}} (eta {{eta}})"));
    pb.set_length(cx.eval_samples.len() as u64);
    let r = fp4_quant::eval::kl_with_progress(reference, &model, &cx.eval_samples, &|d| pb.set_position(d as u64))?;
    pb.finish_and_clear();
    eprintln!("  KL mean {:.4}, top-1 agreement {:.3} ({} tokens)", r.kl_mean, r.top1_agreement, r.tokens);
    fp4_bench::report::write_text(
        &cx.plan.out.join("kl").join(format!("{name}.json")),
        &(serde_json::to_string_pretty(&r)? + "\n"),
    )?;
    Ok(r)
}
