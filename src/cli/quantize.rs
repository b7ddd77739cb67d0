//! `fp4 quantize`: calibration-aware NVFP4 quantization to a ModelOpt-format checkpoint.

use super::Dtype;
use anyhow::Context;
use clap::ValueEnum;
use fp4_format::Checkpoint;
use fp4_quant::export::{self, ExportOptions};
use fp4_quant::rtn::Algorithm;
use fp4_quant::{quantize, Progress, QuantizeOptions, Strategy};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;
use std::path::PathBuf;

#[derive(ValueEnum, Clone, Copy, Debug)]
enum StrategyArg {
    /// Every linear layer except ModelOpt's default exclusions (NVFP4_DEFAULT_CFG).
    Rtn,
    /// Only the MLPs (NVFP4_MLP_ONLY_CFG).
    #[value(name = "mlp_only", alias = "mlp-only")]
    MlpOnly,
}

#[derive(ValueEnum, Clone, Copy, Debug)]
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
    /// Output directory (written to a temporary directory, then renamed).
    #[arg(long, short, alias = "out")]
    output: PathBuf,
    #[arg(long, value_enum, default_value_t = StrategyArg::Rtn)]
    strategy: StrategyArg,
    #[arg(long, value_enum, default_value_t = AlgorithmArg::Max)]
    algorithm: AlgorithmArg,
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
    /// `linear_attn,layers.0,layers.31`) or globs (`*layers.3[01].*`).
    #[arg(long, value_delimiter = ',')]
    exclude_layers: Vec<String>,
    /// Precision of the calibration forward pass.
    #[arg(long, value_enum, default_value_t = Dtype::Bf16)]
    calib_dtype: Dtype,
    /// Replace the output directory if it exists.
    #[arg(long)]
    force: bool,
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

pub fn run(a: Args) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    let ckpt = Checkpoint::open(&a.model).with_context(|| format!("cannot open model {}", a.model.display()))?;
    export::check_output(&ckpt, &a.output, a.force)?;
    anyhow::ensure!(
        a.calib_samples != Some(0) && a.calib_seq_len != Some(0),
        "--calib-samples and --calib-seq-len must be positive"
    );
    let samples = fp4_quant::calib::load(
        &a.calib_data,
        &a.model,
        a.calib_samples.unwrap_or(usize::MAX),
        a.calib_seq_len.unwrap_or(usize::MAX),
        ckpt.config.vocab_size,
    )?;
    let exclude: Vec<String> =
        a.exclude_layers.iter().map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect();
    let opts = QuantizeOptions {
        strategy: match a.strategy {
            StrategyArg::Rtn => Strategy::Rtn,
            StrategyArg::MlpOnly => Strategy::MlpOnly,
        },
        algorithm: match a.algorithm {
            AlgorithmArg::Max => Algorithm::Max,
            AlgorithmArg::AwqLite => Algorithm::AwqLite,
        },
        exclude: exclude.clone(),
        precision: a.calib_dtype.into(),
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
    let result = quantize(&ckpt, &samples, &opts, &Bar(bar))?;
    for name in &result.plan.widened {
        tracing::warn!(module = %name, "kept in BF16 because other members of its fused group are excluded");
    }
    let mut extra = serde_json::Map::new();
    extra.insert(
        "options".into(),
        json!({
            "model": a.model, "calib_data": a.calib_data, "calib_samples": a.calib_samples,
            "calib_seq_len": a.calib_seq_len, "exclude_layers": exclude, "calib_dtype": format!("{:?}", a.calib_dtype).to_lowercase(),
            "algorithm": "max",
        }),
    );
    extra.insert("seconds_total".into(), json!(started.elapsed().as_secs_f64()));
    export::write(&ckpt, &result, &a.output, &ExportOptions { force: a.force, report_extra: extra })?;
    eprintln!(
        "quantized {} of {} linear layers to NVFP4 ({} samples, {} tokens) in {:.1}s → {}",
        result.layers.len(),
        result.plan.modules.len(),
        result.samples,
        result.tokens,
        started.elapsed().as_secs_f64(),
        a.output.display()
    );
    Ok(())
}
