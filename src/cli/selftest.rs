//! `fp4 selftest --gpu`: every CUDA op against its CPU reference on random (never zero) inputs,
//! whole models (the committed fixtures, every checkpoint format, and small synthetic models) on
//! the GPU against the CPU, then benchmarks: kernels against the device's measured copy bandwidth
//! and, with `--synthetic`, decode speed and TTFT of a real-shape model. A table on stdout and,
//! with `--out`, a JSON report (device, figures; the script adds commit and date).

use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Run the CUDA kernel checks (needs a build with `--features cuda` and a GPU).
    #[arg(long)]
    gpu: bool,
    /// CUDA device ordinal.
    #[arg(long, default_value_t = 0)]
    device: usize,
    /// Write the JSON report here.
    #[arg(long)]
    out: Option<PathBuf>,
    /// The committed test fixtures (tiny models and ModelOpt exports).
    #[arg(long, default_value = "tests/fixtures")]
    fixtures: PathBuf,
    /// More checkpoint directories to run on both devices (e.g. an `fp4 quantize` output).
    #[arg(long)]
    model: Vec<PathBuf>,
    /// Benchmark decode and TTFT on random weights of this shape (`qwen3.5-9b`), NVFP4 and BF16.
    #[arg(long)]
    synthetic: Option<String>,
    /// Prompt length of the TTFT benchmark.
    #[arg(long, default_value_t = 1000)]
    ttft_tokens: usize,
    /// Decode steps timed per format.
    #[arg(long, default_value_t = 128)]
    decode_tokens: usize,
    /// Kernel iteration: only the linear, decode-op and runner checks, then the benchmarks (no op, W4A4 or
    /// whole-model checks, no per-model decode loop). The report says so; it is not a full run.
    #[arg(long)]
    quick: bool,
    /// Profiling: no checks at all, only the benchmarks (kernels first).
    #[arg(long, hide = true)]
    bench_only: bool,
    /// Kernel development: time the GEMV geometry-sweep kernels against the shipped one and stop.
    #[arg(long, hide = true)]
    gemv_sweep: bool,
    /// Profiling (nsys): only `--decode-tokens` graph-replayed batch-1 decode steps of the
    /// `--synthetic` NVFP4 model after a 1k-token prompt, then stop.
    #[arg(long, hide = true)]
    profile_decode: bool,
    /// Sequences decoded together under `--profile-decode`.
    #[arg(long, hide = true, default_value_t = 1)]
    profile_batch: usize,
    /// Context depth (tokens) each sequence decodes at under `--profile-decode` (its KV blocks
    /// are taken, not filled: attention reads that many positions).
    #[arg(long, hide = true, default_value_t = 0)]
    profile_depth: usize,
    /// Kernel development: only one of the engine benchmarks on `--synthetic` (`mtp` or
    /// `conversation`), its JSON to `--out`, then stop.
    #[arg(long, hide = true)]
    engine_part: Option<String>,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    anyhow::ensure!(a.gpu, "nothing to do: pass --gpu (the CPU checks are `cargo test`)");
    #[cfg(not(feature = "cuda"))]
    anyhow::bail!("this fp4 was built without CUDA: rebuild with `--features cuda` (scripts/nvcc.sh provides nvcc)");
    #[cfg(feature = "cuda")]
    gpu::run(a)
}

#[cfg(feature = "cuda")]
mod engine;
#[cfg(feature = "cuda")]
mod fused;
#[cfg(feature = "cuda")]
mod gpu;
