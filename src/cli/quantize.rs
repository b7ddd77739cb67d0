//! `fp4 quantize`: calibration-aware NVFP4 quantization to a ModelOpt-format checkpoint.

use super::Dtype;
use anyhow::Context;
use clap::ValueEnum;
use fp4_format::Checkpoint;
use fp4_quant::export::{self, ExportOptions};
use fp4_quant::rtn::Algorithm;
use fp4_quant::{quantize, AwqOptions, LmHeadFormat, Progress, QuantizeOptions, Strategy};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;
use std::path::PathBuf;

#[derive(ValueEnum, Clone, Copy, Debug, serde::Deserialize, PartialEq)]
#[serde(rename_all = "snake_case")]
enum StrategyArg {
    /// Every linear layer except ModelOpt's default exclusions (NVFP4_DEFAULT_CFG).
    Rtn,
    /// The layers of `rtn`, with AWQ-lite scales folded exactly into the (1+w) norms.
    #[value(name = "awq_lite", alias = "awq-lite")]
    AwqLite,
    /// Only the MLPs (NVFP4_MLP_ONLY_CFG).
    #[value(name = "mlp_only", alias = "mlp-only")]
    MlpOnly,
    /// Each fused group in NVFP4, FP8 or BF16, least KL within --effective-bits.
    #[value(name = "auto_mixed", alias = "auto-mixed")]
    AutoMixed,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq)]
enum DeviceArg {
    Cpu,
    Cuda,
}

/// How the checkpoint will be served, which AWQ-lite's loss follows.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
enum ServeMode {
    /// Activations quantized to NVFP4 under each layer's input_scale (vLLM and fp4 on SM12x).
    W4a4,
    /// Weight-only (Hopper kernels).
    W4a16,
}

/// `--quantize-lm-head`'s formats.
#[derive(ValueEnum, Clone, Copy, Debug, serde::Deserialize, serde::Serialize, PartialEq)]
#[serde(rename_all = "lowercase")]
enum LmHeadArg {
    Nvfp4,
    Fp8,
}

#[derive(ValueEnum, Clone, Copy, Debug, serde::Deserialize, PartialEq)]
#[serde(rename_all = "snake_case")]
enum AlgorithmArg {
    Max,
    #[value(name = "awq_lite", alias = "awq-lite")]
    AwqLite,
}

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Source BF16 checkpoint (HF directory, VL wrapper or text-only).
    #[arg(long)]
    model: PathBuf,
    /// Output directory: new or empty (written to `.NAME.fp4-tmp-PID` beside it, then renamed);
    /// never the source, inside it or holding it.
    #[arg(long, short, alias = "out")]
    output: PathBuf,
    /// What to quantize and how (default rtn; or from --config).
    #[arg(long, value_enum)]
    strategy: Option<StrategyArg>,
    /// Calibration algorithm (default: awq_lite for --strategy awq_lite, else max).
    #[arg(long, value_enum)]
    algorithm: Option<AlgorithmArg>,
    /// Strategy file (TOML: strategy, algorithm, exclude_layers, calib_samples, calib_seq_len,
    /// allow_pre_quant_scale, quantize_lm_head); flags given on the command line win.
    #[arg(long)]
    config: Option<PathBuf>,
    /// The strategy file's text (set from --config or a built-in strategy), for the report.
    #[arg(skip)]
    config_toml: Option<String>,
    /// Where the exclusions came from when not from `--exclude-layers` (the strategy file).
    #[arg(skip)]
    exclude_from: Option<String>,
    /// AWQ: also scale linears whose input has no exact fold and write their `pre_quant_scale`
    /// (in Qwen3.5 every searched linear folds — into a norm, up_proj's or V's rows, or the GDN
    /// gated norm — except o_proj when attention has biases). The checkpoint becomes NVFP4_AWQ,
    /// which fp4 serves but vLLM and SGLang do not load.
    #[arg(long)]
    allow_pre_quant_scale: bool,
    /// auto_mixed: average bits per weight of the candidate layers (NVFP4 counts 4.5, FP8 8,
    /// BF16 16). Default 4.8.
    #[arg(long)]
    effective_bits: Option<f64>,
    /// auto_mixed: calibration samples used to score each group's KL sensitivity.
    #[arg(long, default_value_t = 16)]
    score_samples: usize,
    /// Calibration JSONL: `{"input_ids": [...]}` or `{"messages": [...], "tools": [...]}` per line.
    #[arg(long)]
    calib_data: PathBuf,
    /// Use at most this many samples (default: all of them).
    #[arg(long)]
    calib_samples: Option<usize>,
    /// Truncate samples to this many tokens (default: keep them whole, as ModelOpt would see
    /// the same pre-tokenized ids).
    #[arg(long)]
    calib_seq_len: Option<usize>,
    /// Extra layers to keep in BF16: comma list of names (matched at dot boundaries, e.g.
    /// `linear_attn,layers.0,layers.last`; `layers.last` / `layers.-1` is the last decoder layer,
    /// `layers.-2` the one before) or globs (`*layers.3[01].*`). An item that names nothing in
    /// the model is an error (`embed_tokens` and `lm_head` count: they are never quantized).
    #[arg(long, value_delimiter = ',')]
    exclude_layers: Vec<String>,
    /// Warn instead of failing when an `--exclude-layers` item names nothing in the model.
    #[arg(long)]
    allow_unmatched: bool,
    /// Quantize the LM head too (default: kept BF16, as ModelOpt does): NVFP4 (a plain NVFP4
    /// checkpoint) or FP8 (the checkpoint becomes MIXED_PRECISION). Its weight is rounded to
    /// nearest whatever the strategy; `input_scale` comes from the calibration data. The 9B's
    /// BF16 head is a third of the bytes a decode step reads.
    #[arg(long, value_enum)]
    quantize_lm_head: Option<LmHeadArg>,
    /// How the checkpoint will be served: AWQ-lite's search loss quantizes the activations as a
    /// W4A4 server does (the default: vLLM and `fp4 serve` on the user's SM12x), or not (W4A16).
    #[arg(long, value_enum, default_value_t = ServeMode::W4a4)]
    serve_mode: ServeMode,
    /// Where calibration runs. Only `cpu` exists so far: the CUDA calibration path comes with the
    /// CUDA kernels.
    #[arg(long, value_enum, default_value_t = DeviceArg::Cpu)]
    device: DeviceArg,
    /// Precision of the calibration forward pass.
    #[arg(long, value_enum, default_value_t = Dtype::Bf16)]
    calib_dtype: Dtype,
    /// Replace the output directory if it is an earlier fp4 output (holds fp4's quant_report.json)
    /// and holds nothing fp4 did not write; nothing else is ever replaced.
    #[arg(long)]
    force: bool,
    /// Tensor and config layout of the output: `source` keeps the source's; `vl` writes a flat
    /// `qwen3_5_text` source as the VL wrapper vLLM expects for Qwen3.5
    /// (`Qwen3_5ForConditionalGeneration`, `model.language_model.*`, `preprocessor_config.json`;
    /// serve with `--language-model-only`). A VL source is VL either way.
    #[arg(long, value_enum, default_value_t = LayoutArg::Source)]
    layout: LayoutArg,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq)]
enum LayoutArg {
    Source,
    Vl,
}

/// The strategy files built into fp4 (`configs/strategies/`), so that `fp4 loop` needs no
/// checkout: the seed's A, B and C.
pub(super) const BUILT_IN: [(&str, &str); 3] = [
    ("A", include_str!("../../configs/strategies/A.toml")),
    ("B", include_str!("../../configs/strategies/B.toml")),
    ("C", include_str!("../../configs/strategies/C.toml")),
];

/// A `configs/strategies/*.toml` file.
#[derive(serde::Deserialize, Default, Debug)]
#[serde(deny_unknown_fields)]
struct StrategyFile {
    #[serde(default)]
    description: Option<String>,
    strategy: Option<StrategyArg>,
    algorithm: Option<AlgorithmArg>,
    #[serde(default)]
    exclude_layers: Vec<String>,
    calib_samples: Option<usize>,
    calib_seq_len: Option<usize>,
    #[serde(default)]
    allow_pre_quant_scale: bool,
    #[serde(default)]
    allow_unmatched: bool,
    effective_bits: Option<f64>,
    quantize_lm_head: Option<LmHeadArg>,
    /// auto_mixed scoring; only `kl_div` (ModelOpt's forward-only method) exists.
    score: Option<String>,
    /// The file's text, recorded in the report (a run reusing a checkpoint compares it).
    #[serde(skip)]
    text: String,
}

impl StrategyFile {
    fn read(path: &std::path::Path) -> anyhow::Result<StrategyFile> {
        let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
        Self::parse(&text, &path.display().to_string())
    }

    fn parse(text: &str, shown: &str) -> anyhow::Result<StrategyFile> {
        let file: StrategyFile = toml::from_str(text).with_context(|| format!("{shown}: invalid strategy file"))?;
        Ok(StrategyFile { text: text.to_string(), ..file })
    }
}

/// Command-line flags over the strategy file over the defaults.
fn merge(mut a: Args, file: StrategyFile) -> anyhow::Result<Args> {
    if let Some(d) = &file.description {
        tracing::info!(config = %a.config.as_ref().map(|p| p.display().to_string()).unwrap_or_default(), "{d}");
    }
    if a.config.is_some() {
        a.config_toml = Some(file.text.clone());
    }
    a.strategy = a.strategy.or(file.strategy).or(Some(StrategyArg::Rtn));
    a.quantize_lm_head = a.quantize_lm_head.or(file.quantize_lm_head);
    let default_algo = if a.strategy == Some(StrategyArg::AwqLite) { AlgorithmArg::AwqLite } else { AlgorithmArg::Max };
    a.algorithm = a.algorithm.or(file.algorithm).or(Some(default_algo));
    anyhow::ensure!(
        !(a.strategy == Some(StrategyArg::AwqLite) && a.algorithm == Some(AlgorithmArg::Max)),
        "--strategy awq_lite calibrates with AWQ-lite; drop --algorithm max (or use --strategy rtn)"
    );
    if a.exclude_layers.is_empty() && !file.exclude_layers.is_empty() {
        a.exclude_layers = file.exclude_layers;
        a.exclude_from = a.config.as_ref().map(|p| p.display().to_string());
    }
    a.calib_samples = a.calib_samples.or(file.calib_samples);
    a.calib_seq_len = a.calib_seq_len.or(file.calib_seq_len);
    a.allow_pre_quant_scale |= file.allow_pre_quant_scale;
    a.allow_unmatched |= file.allow_unmatched;
    a.effective_bits = a.effective_bits.or(file.effective_bits);
    if let Some(score) = file.score.as_deref().filter(|s| *s != "kl_div") {
        anyhow::bail!(
            "{}: score `{score}` is not supported (auto_mixed scores with kl_div)",
            a.config.as_ref().expect("from a file").display()
        );
    }
    anyhow::ensure!(
        a.effective_bits.is_none() || a.strategy == Some(StrategyArg::AutoMixed),
        "--effective-bits applies to --strategy auto_mixed only"
    );
    Ok(a)
}

struct Bar(ProgressBar);

impl Progress for Bar {
    fn start(&self, what: &str, total: u64) {
        self.0.set_length(total);
        self.0.set_message(what.to_string());
    }
    fn inc(&self) {
        self.0.inc(1);
    }
    fn finish(&self) {
        self.0.finish_and_clear();
    }
}

/// `fp4 quantize` as parsed from a command line (`quantize --model …`): `fp4 loop` builds its
/// quantize steps this way, so the defaults stay those of `fp4 quantize`.
pub(super) fn parse_args<I: IntoIterator<Item = std::ffi::OsString>>(argv: I) -> anyhow::Result<Args> {
    #[derive(clap::Parser)]
    struct Quantize {
        #[command(flatten)]
        args: Args,
    }
    use clap::Parser;
    Ok(Quantize::try_parse_from(argv)?.args)
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let file = match &a.config {
        Some(p) => StrategyFile::read(p)?,
        None => StrategyFile::default(),
    };
    run_merged(merge(a, file)?)
}

/// Quantizes with one of the [`BUILT_IN`] strategy files (`name`); `--config` in `a` is ignored
/// and recorded as `built-in NAME`.
pub(super) fn run_built_in(mut a: Args, name: &str) -> anyhow::Result<()> {
    let (_, text) = BUILT_IN
        .iter()
        .find(|(n, _)| *n == name)
        .with_context(|| format!("no built-in strategy `{name}` (built in: A, B, C)"))?;
    let shown = format!("built-in {name}");
    let file = StrategyFile::parse(text, &shown)?;
    a.config = Some(PathBuf::from(shown));
    run_merged(merge(a, file)?)
}

/// Ctrl-C or SIGTERM while quantizing removes the temporary directory before the process ends
/// (exit status 130 or 143), as the destructors that a signal skips would have; after SIGKILL
/// the next run removes it.
fn remove_temps_on_signal() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        use tokio::signal::unix::{signal, SignalKind};
        let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() else { return };
        // Registered here, before quantizing starts; waited for on a thread of its own.
        let signals = {
            let _in_rt = rt.enter();
            signal(SignalKind::interrupt()).and_then(|i| Ok((i, signal(SignalKind::terminate())?)))
        };
        let Ok((mut int, mut term)) = signals else { return };
        std::thread::spawn(move || {
            let code = rt.block_on(async {
                tokio::select! {
                    _ = int.recv() => 130,
                    _ = term.recv() => 143,
                }
            });
            if export::remove_on_signal() > 0 {
                eprintln!("\ninterrupted: the unfinished output was removed");
            }
            std::process::exit(code);
        });
    });
}

fn run_merged(a: Args) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    anyhow::ensure!(
        a.device == DeviceArg::Cpu,
        "--device cuda: calibration on the GPU is not available in this build yet; use --device cpu"
    );
    let (strategy, algorithm) = (a.strategy.expect("merged"), a.algorithm.expect("merged"));
    let ckpt = Checkpoint::open(&a.model).with_context(|| format!("cannot open model {}", a.model.display()))?;
    anyhow::ensure!(
        a.calib_samples != Some(0) && a.calib_seq_len != Some(0),
        "--calib-samples and --calib-seq-len must be positive"
    );
    export::remove_stale_temps(&a.output)?;
    export::check_output(&ckpt, &a.output, a.force)?;
    let positions = ckpt.config.max_position_embeddings;
    if let Some(n) = a.calib_seq_len {
        anyhow::ensure!(
            n <= positions,
            "--calib-seq-len {n} exceeds the model's max_position_embeddings ({positions})"
        );
    }
    let mut loaded = fp4_quant::calib::load(
        &a.calib_data,
        &a.model,
        a.calib_samples.unwrap_or(usize::MAX),
        a.calib_seq_len.unwrap_or(positions),
        ckpt.config.vocab_size,
    )?;
    let truncated = (loaded.truncated > 0)
        .then(|| json!({"samples": loaded.truncated, "to_tokens": loaded.seq_len, "longest_tokens": loaded.longest}));
    if loaded.truncated > 0 && a.calib_seq_len.is_none() {
        // Longer than the model's positions: cut, as ModelOpt's calibration loader truncates
        // every sample to its calib_seq; said loudly, since nobody asked for it.
        let msg = format!(
            "{}: {} of {} samples are longer than the model's max_position_embeddings ({positions}; the longest has {} tokens): \
             each is cut to its first {positions} tokens; --calib-seq-len sets another length",
            a.calib_data.display(),
            loaded.truncated,
            loaded.samples.len(),
            loaded.longest
        );
        tracing::warn!("{msg}");
        eprintln!("warning: {msg}");
        loaded.truncated = 0;
    }
    let samples = loaded.report("calibration data");
    if let Some(asked) = a.calib_samples.filter(|&n| n > samples.len()) {
        let msg = format!(
            "--calib-samples {asked} asked for, but {} holds {} usable samples: calibrating on {}",
            a.calib_data.display(),
            samples.len(),
            samples.len()
        );
        tracing::warn!("{msg}");
        eprintln!("warning: {msg}");
    }
    let exclude: Vec<String> =
        a.exclude_layers.iter().map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect();
    if let Some(fmt) = a.quantize_lm_head {
        let resolved = fp4_quant::plan::resolve_patterns(&exclude, ckpt.config.num_hidden_layers);
        if let Some((item, _)) =
            exclude.iter().zip(&resolved).find(|(_, r)| fp4_quant::plan::user_pattern_matches(r, "lm_head"))
        {
            let what = match &a.exclude_from {
                Some(file) => format!("exclude_layers of {file}"),
                None => "--exclude-layers".to_string(),
            };
            anyhow::bail!(
                "--quantize-lm-head {} asks for lm_head quantized, but {what} keeps it BF16 ({item}): drop one of them",
                format!("{fmt:?}").to_lowercase()
            );
        }
    }
    let unmatched = fp4_quant::plan::unmatched_patterns(&ckpt, &exclude);
    if !unmatched.is_empty() {
        let layers = ckpt.config.num_hidden_layers;
        let what = match &a.exclude_from {
            Some(file) => format!("exclude_layers of {file}"),
            None => "--exclude-layers".to_string(),
        };
        let msg = format!(
            "{what}: {} {} no module of {} ({layers} decoder layers, 0..{}; `layers.last` names the last)",
            unmatched.join(","),
            if unmatched.len() == 1 { "matches" } else { "match" },
            a.model.display(),
            layers - 1
        );
        anyhow::ensure!(a.allow_unmatched, "{msg}; pass --allow-unmatched to go on without it");
        tracing::warn!("{msg}");
        eprintln!("warning: {msg}");
    }
    // The inputs are checked: the output's temporary directory is made before any long work,
    // so a path that cannot be written fails now, not after calibration.
    remove_temps_on_signal();
    let staging = export::Staging::create(&ckpt, &a.output, a.force)?;
    let opts = QuantizeOptions {
        strategy: match strategy {
            StrategyArg::Rtn => Strategy::Rtn,
            StrategyArg::AwqLite => Strategy::AwqLite,
            StrategyArg::MlpOnly => Strategy::MlpOnly,
            StrategyArg::AutoMixed => Strategy::AutoMixed,
        },
        algorithm: match algorithm {
            AlgorithmArg::Max => Algorithm::Max,
            AlgorithmArg::AwqLite => Algorithm::AwqLite,
        },
        exclude: exclude.clone(),
        precision: a.calib_dtype.into(),
        awq: AwqOptions {
            allow_pre_quant_scale: a.allow_pre_quant_scale,
            w4a4: a.serve_mode == ServeMode::W4a4,
            ..AwqOptions::default()
        },
        lm_head: a.quantize_lm_head.map(|f| match f {
            LmHeadArg::Nvfp4 => LmHeadFormat::Nvfp4,
            LmHeadArg::Fp8 => LmHeadFormat::Fp8,
        }),
    };
    tracing::info!(
        samples = samples.len(),
        tokens = samples.iter().map(Vec::len).sum::<usize>(),
        "calibration data loaded"
    );
    let bar = ProgressBar::new(0).with_style(
        ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} layers, {elapsed} (eta {eta})")
            .expect("static template")
            .progress_chars("=> "),
    );
    let mut extra = serde_json::Map::new();
    let result = if strategy == StrategyArg::AutoMixed {
        let target = a.effective_bits.unwrap_or(4.8);
        eprintln!(
            "auto_mixed: target {target} effective bits (NVFP4 = {} bits/weight incl. its E4M3 block scales, FP8 = 8, BF16 = 16)",
            fp4_quant::mixed::NVFP4_BITS
        );
        let (result, report) =
            fp4_quant::mixed::auto_mixed(&ckpt, &samples, &opts, target, a.score_samples, &Bar(bar))?;
        let count = |f| report.groups.iter().zip(&report.chosen).filter(|(_, c)| **c == f).count();
        eprintln!(
            "auto_mixed: {} groups NVFP4, {} FP8, {} BF16 → {:.3} effective bits; KL {:.3e} (all-NVFP4 {:.3e})",
            count(fp4_quant::mixed::Format::Nvfp4),
            count(fp4_quant::mixed::Format::Fp8),
            count(fp4_quant::mixed::Format::Bf16),
            report.effective_bits,
            report.kl_chosen,
            report.kl_all_nvfp4
        );
        extra.insert("auto_mixed".into(), serde_json::to_value(&report)?);
        result
    } else {
        quantize(&ckpt, &samples, &opts, &Bar(bar))?
    };
    for name in &result.plan.widened {
        tracing::warn!(module = %name, "kept in BF16 because other members of its fused group are excluded");
    }
    extra.insert(
        "options".into(),
        json!({
            "model": a.model, "calib_data": a.calib_data, "calib_samples": a.calib_samples,
            "calib_seq_len": a.calib_seq_len, "exclude_layers": exclude, "calib_dtype": format!("{:?}", a.calib_dtype).to_lowercase(),
            "algorithm": format!("{algorithm:?}"), "config": a.config, "config_toml": a.config_toml,
            "allow_pre_quant_scale": a.allow_pre_quant_scale, "effective_bits": a.effective_bits,
            "quantize_lm_head": a.quantize_lm_head,
            "score_samples": (strategy == StrategyArg::AutoMixed).then_some(a.score_samples),
        }),
    );
    extra.insert("serve_mode".into(), json!(a.serve_mode));
    extra.insert("calibration_truncated".into(), json!(truncated));
    extra.insert("seconds_total".into(), json!(started.elapsed().as_secs_f64()));
    let layout = match a.layout {
        LayoutArg::Source => fp4_quant::layout::Layout::Source,
        LayoutArg::Vl => fp4_quant::layout::Layout::Vl,
    };
    export::write_into(&ckpt, &result, &staging, &ExportOptions { force: a.force, report_extra: extra, layout })?;
    staging.commit(&ckpt)?;
    if export::quant_algo(&result) == "NVFP4_AWQ" {
        eprintln!(
            "note: the checkpoint is NVFP4_AWQ (pre_quant_scale on layers without an exact fold): fp4 serves it, \
             vLLM and SGLang refuse it; drop --allow-pre-quant-scale for a plain NVFP4 checkpoint"
        );
    }
    let searched: Vec<_> = result.layers.values().filter_map(|q| q.awq.as_ref()).collect();
    if !searched.is_empty() {
        let scaled = searched.iter().filter(|a| a.alpha.is_some()).count();
        eprintln!("awq_lite: {scaled} of {} searched layers scaled (others kept s = 1)", searched.len());
    }
    eprintln!(
        "quantized {} of {} linear layers to {} ({} samples, {} tokens) in {:.1}s → {}",
        result.layers.len(),
        result.plan.modules.len(),
        export::quant_algo(&result),
        result.samples,
        result.tokens,
        started.elapsed().as_secs_f64(),
        a.output.display()
    );
    Ok(())
}
