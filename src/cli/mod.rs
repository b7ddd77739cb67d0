//! Command-line interface: one module per subcommand.

mod bench;
mod calib;
mod card;
mod chat;
mod eval;
mod generate;
mod inspect;
mod logits;
mod r#loop;
mod publish;
mod quantize;
mod selftest;
mod serve;

use clap::{Parser, Subcommand, ValueEnum};
use fp4_model::Precision;

#[derive(Parser, Debug)]
#[command(name = "fp4", version, about = "Native NVFP4 quantizer and OpenAI-compatible server for Qwen3.5")]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Summarise a model directory: config, tensors per dtype, quantization.
    Inspect(inspect::Args),
    /// Generate tokens from a prompt (or token ids) on the CPU reference model.
    Generate(generate::Args),
    /// Write the f32 logits of every position to a safetensors file.
    Logits(logits::Args),
    /// Quantize a BF16 checkpoint to NVFP4 (ModelOpt format, loadable by vLLM/SGLang too).
    Quantize(quantize::Args),
    /// OpenAI-compatible server (vLLM's flags are accepted).
    Serve(serve::Args),
    /// Benchmark one or two OpenAI endpoints: TTFT, decode speed and behaviour gates.
    Bench(bench::Args),
    /// The whole loop: quantize each strategy, serve it, smoke test, bench against a peer, KL,
    /// pick the best (no arguments: the embedded mini-Annie).
    Loop(Box<r#loop::Args>),
    /// Write the Hugging Face model card (README.md) of a checkpoint `fp4 loop` measured, from
    /// its run directory's JSON.
    Card(card::Args),
    /// Upload a checkpoint directory to the Hugging Face Hub in one commit (creates the repo;
    /// LFS for weights; a re-run uploads only what changed). Token: HF_TOKEN or
    /// `huggingface-cli login`'s token file.
    Publish(publish::Args),
    /// Calibration conversations: generate from a teacher, validate, clean.
    #[command(subcommand)]
    Calib(calib::Command),
    /// Check the CUDA kernels against their CPU references and benchmark them.
    Selftest(selftest::Args),
    /// Evaluate a quantized model against its reference.
    #[command(subcommand)]
    Eval(eval::Command),
    /// Chat layer tools: render prompts, parse model output.
    #[command(subcommand)]
    Chat(chat::Command),
}

pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Inspect(a) => inspect::run(a),
        Command::Generate(a) => generate::run(a),
        Command::Logits(a) => logits::run(a),
        Command::Chat(c) => chat::run(c),
        Command::Quantize(a) => quantize::run(a),
        Command::Serve(a) => serve::run(a),
        Command::Bench(a) => bench::run(a),
        Command::Loop(a) => r#loop::run(*a),
        Command::Card(a) => card::run(a),
        Command::Publish(a) => publish::run(a),
        Command::Calib(c) => calib::run(c),
        Command::Eval(c) => eval::run(c),
        Command::Selftest(a) => selftest::run(a),
    }
}

/// Compute precision of the CPU model.
#[derive(ValueEnum, Clone, Copy, Debug)]
enum Dtype {
    /// f32 everywhere: the reference that matches transformers' fp32 forward.
    F32,
    /// Round where transformers' bf16 forward rounds.
    Bf16,
}

impl From<Dtype> for Precision {
    fn from(d: Dtype) -> Precision {
        match d {
            Dtype::F32 => Precision::F32,
            Dtype::Bf16 => Precision::Bf16,
        }
    }
}

/// How the CPU model computes, shared by `generate` and `logits`.
#[derive(clap::Args, Debug, Clone, Copy)]
struct ComputeArgs {
    /// Compute precision of the CPU model.
    #[arg(long, value_enum, default_value_t = Dtype::F32)]
    dtype: Dtype,
    /// For NVFP4/FP8 checkpoints: also quantize activations with each layer's input_scale
    /// (W4A4 / W8A8, what Blackwell kernels compute). The default on SM120/SM121 GPUs, whose FP4
    /// tensor cores run it natively; on other GPUs and the CPU it is emulated, and the default
    /// is weight-only (W4A16, as on Hopper).
    #[arg(long, conflicts_with = "w4a16")]
    w4a4: bool,
    /// Keep activations in f32 (weight-only W4A16) on SM120/SM121 too.
    #[arg(long)]
    w4a16: bool,
    /// Where the model runs: `cpu` (the exact reference) or `cuda` (GPU 0; builds with
    /// `--features cuda`; f32 activations with bf16/NVFP4/FP8 weights).
    #[arg(long, value_enum, default_value_t = DeviceArg::Cpu)]
    device: DeviceArg,
    /// GPU only: run prefill GEMMs and attention in f32 on CUDA cores (slow; equal to the CPU
    /// reference to rounding) instead of on tensor cores (bf16 GEMMs, f16/bf16 attention).
    #[arg(long)]
    exact_gemm: bool,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum DeviceArg {
    Cpu,
    Cuda,
}

impl ComputeArgs {
    /// The load options, opening the GPU first when `--device cuda` asks for it.
    fn load_options(self) -> anyhow::Result<fp4_model::LoadOptions> {
        let (device, quantize_activations) = match self.device {
            DeviceArg::Cpu => (fp4_model::Device::Cpu, self.w4a4),
            DeviceArg::Cuda => {
                let native_fp4 = open_gpu(self.exact_gemm)?;
                let w4a4 = self.w4a4 || (native_fp4 && !self.w4a16);
                if native_fp4 && w4a4 && !self.w4a4 {
                    tracing::info!("FP4 tensor cores: NVFP4 layers run W4A4 (activations quantized with input_scale; --w4a16 keeps them in f32)");
                }
                (fp4_model::Device::Cuda, w4a4)
            }
        };
        Ok(fp4_model::LoadOptions { precision: self.dtype.into(), quantize_activations, device })
    }
}

/// Opens GPU 0 for this process; true where its W4A4 GEMM runs on native FP4 tensor cores.
#[cfg(feature = "cuda")]
fn open_gpu(exact_gemm: bool) -> anyhow::Result<bool> {
    let gpu = fp4_kernels::cuda::init(0).map_err(|e| anyhow::anyhow!("cannot open the CUDA device: {e}"))?;
    gpu.set_exact_gemm(exact_gemm);
    let native_fp4 = gpu.w4a4_native().map_err(|e| anyhow::anyhow!("CUDA device: {e}"))?;
    tracing::info!(device = %gpu.name().unwrap_or_default(), exact_gemm, native_fp4, "GPU ready");
    Ok(native_fp4)
}

#[cfg(not(feature = "cuda"))]
fn open_gpu(_exact_gemm: bool) -> anyhow::Result<bool> {
    anyhow::bail!("--device cuda: this fp4 was built without CUDA; rebuild with `--features cuda` (scripts/nvcc.sh provides nvcc)")
}

/// Parses `1,2,3` (spaces allowed) into token ids.
fn parse_ids(s: &str) -> anyhow::Result<Vec<u32>> {
    let ids = s
        .split(',')
        .map(str::trim)
        .filter(|x| !x.is_empty())
        .map(|x| x.parse::<u32>().map_err(|_| anyhow::anyhow!("--input-ids: `{x}` is not a token id")))
        .collect::<anyhow::Result<Vec<u32>>>()?;
    anyhow::ensure!(!ids.is_empty(), "--input-ids: no token ids given");
    Ok(ids)
}

/// Opens a checkpoint and loads the model, with the directory in any error.
fn load_model(
    dir: &std::path::Path,
    opts: fp4_model::LoadOptions,
) -> anyhow::Result<(fp4_format::Checkpoint, fp4_model::Qwen35)> {
    use anyhow::Context;
    let ckpt = fp4_format::Checkpoint::open(dir).with_context(|| format!("cannot open model {}", dir.display()))?;
    let started = std::time::Instant::now();
    let model = fp4_model::Qwen35::load(&ckpt, opts).with_context(|| format!("cannot load model {}", dir.display()))?;
    tracing::info!(dir = %dir.display(), secs = started.elapsed().as_secs_f32(), "model loaded");
    Ok((ckpt, model))
}

#[cfg(test)]
mod tests {
    use super::parse_ids;

    #[test]
    fn ids_parse_and_bad_ids_are_named() {
        assert_eq!(parse_ids("1, 2,3").unwrap(), vec![1, 2, 3]);
        assert!(parse_ids("1,x").unwrap_err().to_string().contains("`x`"));
        assert!(parse_ids(" , ").is_err());
    }
}
