//! CUDA launchers (feature `cuda`) for the hand-written kernels in `kernels/*.cu`, embedded as
//! fatbins (sm_90a, sm_120a, sm_121a + compute_90a PTX; the driver picks by compute capability).
//! libcuda is loaded at run time, so a `cuda` binary still starts on a machine without a GPU.
//!
//! One process-wide [`Gpu`] (set up by [`init`]) owns the context, the stream every launch goes
//! to, cuBLAS and the loaded kernels; GPU tensors (`Storage::Cuda`) live on it. Each launcher
//! checks the buffer sizes its kernel indexes, then launches; the geometry is explained next to
//! each kernel in its `.cu` file.

use crate::ops::{Binary, GdnAlgo};
use cudarc::cublas::{sys as blas_sys, CudaBlas};
use cudarc::driver::{
    CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg,
};
use cudarc::nvrtc::Ptx;
use fp4_format::nvfp4::Nvfp4Weight;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

/// A failed CUDA driver or cuBLAS call.
#[derive(Debug, Clone)]
pub struct CudaError(pub String);

impl std::fmt::Display for CudaError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for CudaError {}

impl From<cudarc::driver::DriverError> for CudaError {
    fn from(e: cudarc::driver::DriverError) -> Self {
        CudaError(format!("CUDA driver: {e}"))
    }
}

impl From<cudarc::cublas::result::CublasError> for CudaError {
    fn from(e: cudarc::cublas::result::CublasError) -> Self {
        CudaError(format!("cuBLAS: {e}"))
    }
}

pub type Result<T> = std::result::Result<T, CudaError>;

/// A captured, instantiated CUDA graph (see [`Gpu::capture`]).
pub type Graph = cudarc::driver::CudaGraph;

const GEMV: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/gemv.fatbin"));
const DEQUANT: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/dequant.fatbin"));
const NORM: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/norm.fatbin"));
const ELEMENTWISE: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/elementwise.fatbin"));
const GDN: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/gdn.fatbin"));
const ATTENTION: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/attention.fatbin"));
const SAMPLING: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/sampling.fatbin"));
const SYNTHETIC: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/synthetic.fatbin"));
const W4A4: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/w4a4.fatbin"));
const DECODE: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/decode.fatbin"));

/// Threads per block of the row-wise kernels (norms, gathers) and the flat element-wise ones.
const ROW_THREADS: u32 = 256;
/// Rows of the output per thread block in the GEMV kernels (`ROWS_PER_BLOCK` there).
const GEMV_ROWS_PER_BLOCK: u32 = 4;
/// Below this many rows a bf16 GEMV gives each row a block of `ROWBLOCK_THREADS` (of
/// `bf16_gemv_rowblock_f32`) instead of a warp: a warp per row would leave the GPU nearly idle.
const ROWBLOCK_MAX_ROWS: usize = 1024;
const ROWBLOCK_THREADS: u32 = 256;
/// Up to this many tokens a linear runs as GEMV (weights streamed once per token, L2-resident
/// after the first); beyond it, as a tensor-core GEMM through cuBLAS.
pub const GEMV_MAX_TOKENS: usize = 8;
/// Up to this many tokens an NVFP4 linear runs on the tensor-core GEMV (`nvfp4_mma_gemv_nt*`:
/// each weight read once for the whole batch, f16 activations); beyond it, dequantize + cuBLAS.
/// In exact mode (f32, for the golden checks) the CUDA-core GEMV above serves decode instead.
pub const MMA_GEMV_MAX_TOKENS: usize = 64;
/// `MMA_WARPS` and `GROUP_MAX` of `nvfp4_mma_gemv_nt*`: warps per block (one 16-row tile each,
/// the whole of K), and how many weights of one input a launch takes.
const MMA_WARPS: u32 = 8;
const MMA_GROUP_MAX: usize = 4;
/// `ROWSCALE_THREADS` of `f16_rowscaled`.
const ROWSCALE_THREADS: u32 = 1024;
/// The `gemv_sweep_*` kernels (name, warps per block, reads the tiled layout).
const GEMV_SWEEP: [(&str, u32, bool); 4] = [
    ("gemv_sweep_w8d4", 8, false),
    ("gemv_sweep_w8d2t", 8, true),
    ("gemv_sweep_w4d2xt", 4, true),
    ("gemv_sweep_w2d4t", 2, true),
];
/// `MAX_CONV_K` and `CONV_T` (tokens per thread) of `causal_conv1d_silu_f32`.
const MAX_CONV_K: usize = 8;
const CONV_T: usize = 64;
/// `ATT_THREADS`, `TILE` and `MAX_D` of `attention_f32`.
const ATT_THREADS: u32 = 128;
const ATT_TILE: usize = 64;
const ATT_MAX_D: usize = 512;
/// `GDN_C`, `PREP_THREADS` and `STATE_WARPS` of the chunked delta-rule kernels.
const GDN_C: usize = 64;
const GDN_PREP_THREADS: u32 = 256;
const GDN_STATE_WARPS: u32 = 16;
/// `PREP_MAX_DK` of `gdn_chunk_prep` (Qwen3.5's key heads are 128 wide).
const GDN_PREP_MAX_DK: usize = 128;

/// Dynamic shared memory of `gdn_chunk_state` for keys of `dk`: the state slice, v_new, the
/// decays, one staged chunk tile and QK (see `kernels/gdn.cu`).
fn gdn_state_smem(dk: usize) -> usize {
    (dk * 32 + GDN_C * 32 + GDN_C + GDN_C * dk + GDN_C * GDN_C) * 4
}
/// `SAMPLE_THREADS` of the sampling kernels.
const SAMPLE_THREADS: u32 = 1024;
/// `W4A4_BM`, `W4A4_BN` and `W4A4_THREADS` of `nvfp4_w4a4_gemm`.
const W4A4_BM: usize = 64;
const W4A4_BN: usize = 64;
const W4A4_THREADS: u32 = 128;
/// `PA_MAX_G`: query heads per KV head one block of `paged_attention_split` serves.
const PA_MAX_G: usize = 8;
/// `PA_THREADS` and `PA_MAX_D` of `paged_attention_split`.
const PA_THREADS: u32 = 128;
const PA_MAX_D: usize = 512;
/// `PA_MAX_SPLITS` and `PA_MERGE_THREADS` of `paged_attention_merge`.
const PA_MAX_SPLITS: usize = 128;
const PA_MERGE_THREADS: u32 = 256;
/// Blocks a decode attention aims for (≈ 4 per SM of an H100/H200): the key ranges per (token,
/// KV head) are this over B · Hkv, so a batch of one still fills the GPU with enough warps to
/// hide latency, and a large batch does not cut its keys finer than it needs.
const PA_TARGET_BLOCKS: usize = 512;

/// Key ranges (splits) per (token, KV head) of a decode attention over `b` tokens: fixed per
/// batch size, so one captured graph serves every context length.
pub fn attention_splits(b: usize, hkv: usize) -> usize {
    (PA_TARGET_BLOCKS / (b * hkv).max(1)).clamp(1, PA_MAX_SPLITS)
}
/// `GDN_STEP_THREADS` and `GDN_STEP_MAX_DK` of `gdn_step_slots`.
const GDN_STEP_THREADS: u32 = 128;
const GDN_STEP_MAX_DK: usize = 128;

struct Kernels {
    nvfp4_gemv: CudaFunction,
    /// `nvfp4_mma_gemv_nt{1,2,4,8}`: 8, 16, 32, 64 tokens.
    nvfp4_mma: [CudaFunction; 4],
    /// `gemv_sweep_*`: the one-n-tile GEMV in other geometries, with their warps per block.
    gemv_sweep: Vec<(&'static str, u32, bool, CudaFunction)>,
    nvfp4_tile: CudaFunction,
    f16_rowscaled: CudaFunction,
    bf16_gemv: CudaFunction,
    bf16_gemv_rowblock: CudaFunction,
    nvfp4_dequant_bf16: CudaFunction,
    nvfp4_dequant_f32: CudaFunction,
    bf16_to_f32: CudaFunction,
    f32_to_bf16: CudaFunction,
    rms_norm: CudaFunction,
    add_rms_norm: CudaFunction,
    rms_norm_v4: CudaFunction,
    add_rms_norm_v4: CudaFunction,
    rms_norm_gated: CudaFunction,
    silu_mul: CudaFunction,
    sigmoid_gate: CudaFunction,
    add: CudaFunction,
    add_bias: CudaFunction,
    mul_cols: CudaFunction,
    copy_cols: CudaFunction,
    embedding: CudaFunction,
    gdn_gates: CudaFunction,
    rope: CudaFunction,
    conv1d: CudaFunction,
    gdn_recurrent: CudaFunction,
    gdn_chunk_prep: CudaFunction,
    gdn_chunk_state: CudaFunction,
    attention: CudaFunction,
    argmax: CudaFunction,
    sample: CudaFunction,
    fill_bf16: CudaFunction,
    fill_bytes: CudaFunction,
    fill_e4m3: CudaFunction,
    fill_f32: CudaFunction,
    quantize_act: CudaFunction,
    fake_quant_act: CudaFunction,
    w4a4_gemm: CudaFunction,
    w4a4_native: CudaFunction,
    fp8_fake_quant: CudaFunction,
    rope_at: CudaFunction,
    kv_write: CudaFunction,
    attention_split: CudaFunction,
    /// `paged_attention_split` compiled for ≤ 4 query heads per KV head of ≤ 256 dims (the 9B's).
    attention_split_g4d256: CudaFunction,
    attention_merge: CudaFunction,
    conv1d_step: CudaFunction,
    gdn_step: CudaFunction,
    /// Decode-step fusions (launchers in `cuda/fused.rs`).
    rms_norm_v4_f16: CudaFunction,
    add_rms_norm_v4_f16: CudaFunction,
    silu_mul_f16: CudaFunction,
    sigmoid_gate_f16: CudaFunction,
    gdn_decode_fused: CudaFunction,
    attn_decode_prep: CudaFunction,
}

impl Kernels {
    fn load(ctx: &Arc<CudaContext>) -> Result<Kernels> {
        let m = |bin: &[u8]| -> Result<Arc<CudaModule>> { Ok(ctx.load_module(Ptx::from_binary(bin.to_vec()))?) };
        let (gemv, dequant, norm, elem) = (m(GEMV)?, m(DEQUANT)?, m(NORM)?, m(ELEMENTWISE)?);
        let (gdn, attention, sampling, synthetic) = (m(GDN)?, m(ATTENTION)?, m(SAMPLING)?, m(SYNTHETIC)?);
        let (w4a4, decode) = (m(W4A4)?, m(DECODE)?);
        let gdn_chunk_state = gdn.load_function("gdn_chunk_state")?;
        // Beyond the default 48 KiB of dynamic shared memory (within SM12x's 99 KiB).
        gdn_chunk_state.set_attribute(
            cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            gdn_state_smem(GDN_PREP_MAX_DK) as i32,
        )?;
        Ok(Kernels {
            nvfp4_gemv: gemv.load_function("nvfp4_gemv_f32")?,
            nvfp4_mma: [
                gemv.load_function("nvfp4_mma_gemv_nt1")?,
                gemv.load_function("nvfp4_mma_gemv_nt2")?,
                gemv.load_function("nvfp4_mma_gemv_nt4")?,
                gemv.load_function("nvfp4_mma_gemv_nt8")?,
            ],
            f16_rowscaled: gemv.load_function("f16_rowscaled")?,
            gemv_sweep: GEMV_SWEEP
                .iter()
                .map(|&(name, warps, tiled)| Ok((name, warps, tiled, gemv.load_function(name)?)))
                .collect::<Result<_>>()?,
            nvfp4_tile: gemv.load_function("nvfp4_tile")?,
            bf16_gemv: gemv.load_function("bf16_gemv_f32")?,
            bf16_gemv_rowblock: gemv.load_function("bf16_gemv_rowblock_f32")?,
            nvfp4_dequant_bf16: dequant.load_function("nvfp4_dequant_bf16")?,
            nvfp4_dequant_f32: dequant.load_function("nvfp4_dequant_f32")?,
            bf16_to_f32: dequant.load_function("bf16_to_f32")?,
            f32_to_bf16: dequant.load_function("f32_to_bf16")?,
            rms_norm: norm.load_function("rms_norm_f32")?,
            add_rms_norm: norm.load_function("add_rms_norm_f32")?,
            rms_norm_v4: norm.load_function("rms_norm_v4")?,
            add_rms_norm_v4: norm.load_function("add_rms_norm_v4")?,
            rms_norm_gated: norm.load_function("rms_norm_gated_f32")?,
            silu_mul: elem.load_function("silu_mul_f32")?,
            sigmoid_gate: elem.load_function("sigmoid_gate_f32")?,
            add: elem.load_function("add_f32")?,
            add_bias: elem.load_function("add_bias_f32")?,
            mul_cols: elem.load_function("mul_cols_f32")?,
            copy_cols: elem.load_function("copy_cols_f32")?,
            embedding: elem.load_function("embedding_f32")?,
            gdn_gates: elem.load_function("gdn_gates_f32")?,
            rope: elem.load_function("rope_f32")?,
            conv1d: elem.load_function("causal_conv1d_silu_f32")?,
            gdn_recurrent: gdn.load_function("gdn_recurrent_f32")?,
            gdn_chunk_prep: gdn.load_function("gdn_chunk_prep")?,
            gdn_chunk_state,
            attention: attention.load_function("attention_f32")?,
            argmax: sampling.load_function("argmax_f32")?,
            sample: sampling.load_function("sample_f32")?,
            fill_bf16: synthetic.load_function("fill_bf16_uniform")?,
            fill_bytes: synthetic.load_function("fill_bytes")?,
            fill_e4m3: synthetic.load_function("fill_e4m3_scales")?,
            fill_f32: synthetic.load_function("fill_f32_uniform")?,
            quantize_act: w4a4.load_function("nvfp4_quantize_act")?,
            fake_quant_act: w4a4.load_function("nvfp4_fake_quant_act")?,
            w4a4_gemm: w4a4.load_function("nvfp4_w4a4_gemm")?,
            w4a4_native: w4a4.load_function("w4a4_native")?,
            fp8_fake_quant: w4a4.load_function("fp8_fake_quant_act")?,
            rope_at: decode.load_function("rope_at_f32")?,
            kv_write: decode.load_function("kv_write_paged")?,
            attention_split: decode.load_function("paged_attention_split")?,
            attention_split_g4d256: decode.load_function("paged_attention_split_g4d256")?,
            attention_merge: decode.load_function("paged_attention_merge")?,
            conv1d_step: decode.load_function("conv1d_step_slots")?,
            gdn_step: decode.load_function("gdn_step_slots")?,
            rms_norm_v4_f16: norm.load_function("rms_norm_v4_f16")?,
            add_rms_norm_v4_f16: norm.load_function("add_rms_norm_v4_f16")?,
            silu_mul_f16: elem.load_function("silu_mul_f16")?,
            sigmoid_gate_f16: elem.load_function("sigmoid_gate_f16")?,
            gdn_decode_fused: decode.load_function("gdn_decode_fused")?,
            attn_decode_prep: decode.load_function("attn_decode_prep")?,
        })
    }
}

/// One GPU: its context, the stream every launch goes to, cuBLAS and the loaded kernels.
pub struct Gpu {
    pub ctx: Arc<CudaContext>,
    pub stream: Arc<CudaStream>,
    blas: CudaBlas,
    k: Kernels,
    /// GEMMs in f32 on CUDA cores instead of bf16 tensor cores: slow, but equal to the CPU
    /// reference to f32 rounding (golden checks).
    exact_gemm: AtomicBool,
    /// cuBLAS's workspace, set explicitly so that GEMMs allocate nothing (and can be captured
    /// into CUDA graphs).
    _blas_workspace: CudaSlice<u8>,
}

/// Bytes of the cuBLAS workspace (NVIDIA's recommendation for Hopper is 32 MiB).
const BLAS_WORKSPACE: usize = 32 << 20;

static GPU: OnceLock<Gpu> = OnceLock::new();

/// Sets up GPU `ordinal` for this process (idempotent: later calls return the first GPU).
pub fn init(ordinal: usize) -> Result<&'static Gpu> {
    if let Some(g) = GPU.get() {
        return Ok(g);
    }
    let g = Gpu::new(ordinal)?;
    Ok(GPU.get_or_init(|| g))
}

/// The process's GPU. Panics before [`init`]: GPU tensors only exist after it.
pub fn gpu() -> &'static Gpu {
    GPU.get().expect("cuda::init must run before GPU tensors are used")
}

/// A linear layer's weight in device memory.
pub enum GpuWeight {
    /// `scale · w` with `w [rows, cols]` bf16 (u16 bits): BF16 weights (scale 1) and FP8 ones
    /// (E4M3 values are exact in bf16, the per-tensor scale applied to the output).
    Bf16 {
        w: CudaSlice<u16>,
        rows: usize,
        cols: usize,
        scale: f32,
    },
    Nvfp4(GpuNvfp4),
}

impl std::fmt::Debug for GpuWeight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match self {
            GpuWeight::Bf16 { .. } => "bf16",
            GpuWeight::Nvfp4(_) => "nvfp4",
        };
        write!(f, "GpuWeight::{kind}[{}, {}]", self.rows(), self.cols())
    }
}

impl GpuWeight {
    pub fn rows(&self) -> usize {
        match self {
            GpuWeight::Bf16 { rows, .. } => *rows,
            GpuWeight::Nvfp4(w) => w.rows,
        }
    }

    pub fn cols(&self) -> usize {
        match self {
            GpuWeight::Bf16 { cols, .. } => *cols,
            GpuWeight::Nvfp4(w) => w.cols,
        }
    }

    /// Bytes a GEMV reads for the weight.
    pub fn bytes(&self) -> usize {
        match self {
            GpuWeight::Bf16 { rows, cols, .. } => rows * cols * 2,
            GpuWeight::Nvfp4(w) => w.bytes(),
        }
    }
}

/// An NVFP4 weight in device memory, in ModelOpt's layout.
pub struct GpuNvfp4 {
    pub rows: usize,
    pub cols: usize,
    pub packed: CudaSlice<u8>,
    pub scales: CudaSlice<u8>,
    pub scale_2: f32,
}

impl GpuNvfp4 {
    /// Bytes the GEMV reads for the weight (codes + block scales).
    pub fn bytes(&self) -> usize {
        self.rows * self.cols / 2 + self.rows * self.cols / 16
    }
}

/// `GemvGroup` of `kernels/gemv.cu`: the weights of one launch of `nvfp4_mma_gemv_nt*`.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct GemvGroup {
    w: [u64; MMA_GROUP_MAX],
    s: [u64; MMA_GROUP_MAX],
    y: [u64; MMA_GROUP_MAX],
    r: [u64; MMA_GROUP_MAX],
    scale_2: [f32; MMA_GROUP_MAX],
    n: [i32; MMA_GROUP_MAX],
    tiles_end: [i32; MMA_GROUP_MAX],
    count: i32,
}

// SAFETY: plain-old-data with the C layout of the kernel's struct (device pointers as u64).
unsafe impl cudarc::driver::DeviceRepr for GemvGroup {}

/// Activations converted for the tensor-core GEMV: f16 `[t, k]` in its pair order, and each
/// token's power-of-two scale to undo.
pub struct MmaActivations {
    xh: CudaSlice<u16>,
    inv: CudaSlice<f32>,
    t: usize,
    k: usize,
}

impl MmaActivations {
    /// Tokens (rows).
    pub fn rows(&self) -> usize {
        self.t
    }

    /// Values per token.
    pub fn cols(&self) -> usize {
        self.k
    }
}

impl std::fmt::Debug for MmaActivations {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MmaActivations[{}, {}]", self.t, self.k)
    }
}

/// Activation quantization a layer applies before its GEMM (`--w4a4`; the default for NVFP4
/// layers on SM12x, whose FP4 tensor cores need both operands in FP4).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ActQuant {
    /// NVFP4 per 16 under the layer's `input_scale`: W4A4 on block-scaled FP4 MMA.
    Nvfp4 { input_scale: f32 },
    /// FP8 E4M3 under the layer's `input_scale` (W8A8), applied as a fake quantization.
    Fp8 { input_scale: f32 },
}

/// Launches kernel `$f` of `$gpu` with `$cfg` and the arguments in order.
macro_rules! launch {
    ($gpu:expr, $f:ident, $cfg:expr $(, $a:expr)* $(,)?) => {{
        let mut b = $gpu.stream.launch_builder(&$gpu.k.$f);
        $( b.arg($a); )*
        // SAFETY: every launcher passes its kernel's parameters in order and type (kernels/*.cu)
        // after checking the sizes of the buffers the kernel indexes.
        unsafe { b.launch($cfg) }?;
    }};
}

/// The delta rule's buffers `[q, k, v, g, beta, state]` against its dims and `t` tokens.
fn check_gdn_shapes(b: [&CudaSlice<f32>; 6], d: crate::cpu::GdnDims, t: usize) {
    let crate::cpu::GdnDims { key_heads: hk, value_heads: hv, key_dim: dk, value_dim: dv } = d;
    let want = [t * hk * dk, t * hk * dk, t * hv * dv, t * hv, t * hv, hv * dk * dv];
    let got = b.map(|x| x.len());
    assert_eq!(got, want, "gated_delta_rule: buffer sizes [q, k, v, g, beta, state] for {t} tokens, {d:?}");
}

/// Grid-stride launch over `n` elements.
fn flat(n: usize) -> LaunchConfig {
    let blocks = n.div_ceil(ROW_THREADS as usize).clamp(1, 65536) as u32;
    LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (ROW_THREADS, 1, 1), shared_mem_bytes: 0 }
}

/// The GEMV kernels' grid: `GEMV_ROWS_PER_BLOCK` output rows per block, one token per grid row.
fn gemv_cfg(n: usize, t: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: ((n as u32).div_ceil(GEMV_ROWS_PER_BLOCK), t as u32, 1),
        block_dim: (32, GEMV_ROWS_PER_BLOCK, 1),
        shared_mem_bytes: 0,
    }
}

/// `rms_norm_v4` / `add_rms_norm_v4` over `rows` of `d`: d/4 threads rounded up to a warp (at
/// most 1024), when `d % 4 == 0` and the row fits in their registers (`NORM_HELD` float4 each).
fn norm_v4(rows: usize, d: usize) -> Option<LaunchConfig> {
    const NORM_HELD: usize = 4;
    let threads = (d / 4).div_ceil(32).clamp(1, 32) * 32;
    (d.is_multiple_of(4) && d / 4 <= NORM_HELD * threads).then_some(LaunchConfig {
        grid_dim: (rows as u32, 1, 1),
        block_dim: (threads as u32, 1, 1),
        shared_mem_bytes: 0,
    })
}

/// One block per row.
fn per_row(rows: usize) -> LaunchConfig {
    LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (ROW_THREADS, 1, 1), shared_mem_bytes: 0 }
}

impl Gpu {
    pub fn new(ordinal: usize) -> Result<Gpu> {
        let ctx = CudaContext::new(ordinal)?;
        // One stream: cross-stream event tracking would only add work to every launch.
        // SAFETY: nothing here uses a second stream.
        unsafe { ctx.disable_event_tracking() };
        // A stream of our own: the legacy default stream cannot be captured into graphs.
        let stream = ctx.new_stream()?;
        let blas = CudaBlas::new(stream.clone())?;
        let k = Kernels::load(&ctx)?;
        let ws = stream.alloc_zeros::<u8>(BLAS_WORKSPACE)?;
        {
            let (p, _g) = ws.device_ptr(&stream);
            // SAFETY: the handle and the workspace live as long as this Gpu (same struct).
            let status = unsafe { blas_sys::cublasSetWorkspace_v2(*blas.handle(), p as *mut _, BLAS_WORKSPACE) };
            if status != blas_sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
                return Err(CudaError(format!("cuBLAS: cannot set the workspace: {status:?}")));
            }
        }
        Ok(Gpu { k, blas, ctx, stream, exact_gemm: AtomicBool::new(false), _blas_workspace: ws })
    }

    pub fn name(&self) -> Result<String> {
        Ok(self.ctx.name()?)
    }

    /// f32 GEMMs (exact against the CPU reference) instead of bf16 tensor-core GEMMs.
    pub fn set_exact_gemm(&self, exact: bool) {
        self.exact_gemm.store(exact, Ordering::Relaxed);
    }

    pub fn synchronize(&self) -> Result<()> {
        Ok(self.stream.synchronize()?)
    }

    /// Milliseconds the work queued by `f` takes on the stream (CUDA events around it).
    pub fn time_ms(&self, f: impl FnOnce() -> Result<()>) -> Result<f64> {
        let timing = Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT);
        let start = self.stream.record_event(timing)?;
        f()?;
        let end = self.stream.record_event(timing)?;
        Ok(start.elapsed_ms(&end)? as f64)
    }

    /// Captures the work `f` queues on the stream as a CUDA graph (nothing runs until the graph
    /// is launched). Buffers `f` allocates and drops become the graph's own memory; `f` must not
    /// synchronise or copy from host memory.
    pub fn capture(&self, f: impl FnOnce() -> Result<()>) -> Result<cudarc::driver::CudaGraph> {
        use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
        self.stream.begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)?;
        let queued = f();
        let graph = self.stream.end_capture(CUgraphInstantiate_flags(0));
        queued?;
        graph?.ok_or_else(|| CudaError("stream capture produced no graph".into()))
    }

    /// An uninitialised buffer; every caller's kernel writes all of it.
    pub fn alloc<T: cudarc::driver::DeviceRepr>(&self, n: usize) -> Result<CudaSlice<T>> {
        // SAFETY: the contents are written by the kernel the buffer is allocated for before any read.
        Ok(unsafe { self.stream.alloc::<T>(n.max(1)) }?)
    }

    pub fn zeros(&self, n: usize) -> CudaSlice<f32> {
        self.stream.alloc_zeros(n.max(1)).unwrap_or_else(|e| panic!("GPU allocation of {n} floats: {e}"))
    }

    pub fn upload<T: cudarc::driver::DeviceRepr>(&self, v: &[T]) -> CudaSlice<T> {
        self.stream.clone_htod(v).unwrap_or_else(|e| panic!("upload of {} elements: {e}", v.len()))
    }

    pub fn download<T: cudarc::driver::DeviceRepr + Default + Clone>(&self, s: &CudaSlice<T>) -> Vec<T> {
        self.stream.clone_dtoh(s).unwrap_or_else(|e| panic!("download of {} elements: {e}", s.len()))
    }

    pub fn upload_nvfp4(&self, w: &Nvfp4Weight) -> GpuNvfp4 {
        GpuNvfp4 {
            rows: w.rows,
            cols: w.cols,
            packed: self.upload(&w.packed),
            scales: self.upload(&w.scales),
            scale_2: w.scale_2,
        }
    }

    /// `scale ·` a bf16 weight from f32 values (rounded to nearest even; exact for BF16
    /// checkpoints and E4M3 codes).
    pub fn upload_bf16(&self, w: &[f32], rows: usize, cols: usize, scale: f32) -> GpuWeight {
        assert_eq!(w.len(), rows * cols, "upload_bf16 shape");
        let bits: Vec<u16> = w.iter().map(|&x| (fp4_format::dtype::round_bf16(x).to_bits() >> 16) as u16).collect();
        GpuWeight::Bf16 { w: self.upload(&bits), rows, cols, scale }
    }

    /// `y [t, rows] = x [t, cols] · Wᵀ`: GEMV kernels for up to [`GEMV_MAX_TOKENS`] tokens, else
    /// dequantize W (bf16, or f32 in exact mode) and run a cuBLAS GEMM with f32 accumulation
    /// (NVFP4's scale_2 as the GEMM's alpha).
    pub fn linear(&self, x: &CudaSlice<f32>, t: usize, w: &GpuWeight) -> Result<CudaSlice<f32>> {
        let (n, k) = (w.rows(), w.cols());
        assert!(x.len() >= t * k, "linear: x has {} elements, needs {t}×{k}", x.len());
        let exact = self.exact_gemm.load(Ordering::Relaxed);
        if let GpuWeight::Nvfp4(q) = w {
            if let Some(y) = self.nvfp4_small_batch(x, t, q)? {
                return Ok(y);
            }
        }
        let gemv_ok = t <= GEMV_MAX_TOKENS && k.is_multiple_of(8);
        let mut y = self.alloc::<f32>(t * n)?;
        if let (true, GpuWeight::Bf16 { w, scale, .. }) = (gemv_ok, w) {
            let (ni, ki) = (n as i32, k as i32);
            if n < ROWBLOCK_MAX_ROWS {
                let cfg = LaunchConfig {
                    grid_dim: (n as u32, t as u32, 1),
                    block_dim: (ROWBLOCK_THREADS, 1, 1),
                    shared_mem_bytes: 0,
                };
                launch!(self, bf16_gemv_rowblock, cfg, w, scale, x, &mut y, &ni, &ki);
            } else {
                launch!(self, bf16_gemv, gemv_cfg(n, t), w, scale, x, &mut y, &ni, &ki);
            }
            return Ok(y);
        }
        let (elems, bytes) = (n * k, n * k / 2);
        match (w, exact) {
            (GpuWeight::Nvfp4(q), false) => {
                let mut wd = self.alloc::<u16>(elems)?;
                launch!(self, nvfp4_dequant_bf16, flat(bytes), &q.packed, &q.scales, &mut wd, &bytes);
                let xb = self.to_bf16(x, t * k)?;
                self.gemm(&xb, &wd, &mut y, t, n, k, q.scale_2, blas_sys::cudaDataType::CUDA_R_16BF)?;
            }
            (GpuWeight::Nvfp4(q), true) => {
                let mut wd = self.alloc::<f32>(elems)?;
                launch!(self, nvfp4_dequant_f32, flat(bytes), &q.packed, &q.scales, &mut wd, &bytes);
                self.gemm(x, &wd, &mut y, t, n, k, q.scale_2, blas_sys::cudaDataType::CUDA_R_32F)?;
            }
            (GpuWeight::Bf16 { w, scale, .. }, false) => {
                let xb = self.to_bf16(x, t * k)?;
                self.gemm(&xb, w, &mut y, t, n, k, *scale, blas_sys::cudaDataType::CUDA_R_16BF)?;
            }
            (GpuWeight::Bf16 { w, scale, .. }, true) => {
                let mut wd = self.alloc::<f32>(elems)?;
                launch!(self, bf16_to_f32, flat(elems), w, &mut wd, &elems);
                self.gemm(x, &wd, &mut y, t, n, k, *scale, blas_sys::cudaDataType::CUDA_R_32F)?;
            }
        }
        Ok(y)
    }

    /// The GEMV paths of an NVFP4 linear, when one applies: the tensor-core GEMV for up to
    /// [`MMA_GEMV_MAX_TOKENS`] tokens (`k % 32 == 0`), or in exact mode the f32 CUDA-core GEMV
    /// for up to [`GEMV_MAX_TOKENS`]. `None`: use a GEMM.
    fn nvfp4_small_batch(&self, x: &CudaSlice<f32>, t: usize, q: &GpuNvfp4) -> Result<Option<CudaSlice<f32>>> {
        let k = q.cols;
        if self.mma_gemv_applies(t, q) {
            return self.nvfp4_mma_gemv(x, t, q).map(Some);
        }
        if t <= GEMV_MAX_TOKENS && k.is_multiple_of(8) {
            return self.nvfp4_gemv(x, t, q).map(Some);
        }
        Ok(None)
    }

    /// `y [t, n] = x [t, k] · Wᵀ` on the tensor cores (`t ≤ 64`, `k % 32 == 0`): x to f16 with a
    /// power-of-two scale per token (`f16_rowscaled`), then `nvfp4_mma_gemv_nt*`, one block per
    /// 16-row tile over the whole of K (see `kernels/gemv.cu`).
    pub fn nvfp4_mma_gemv(&self, x: &CudaSlice<f32>, t: usize, q: &GpuNvfp4) -> Result<CudaSlice<f32>> {
        let act = self.mma_activations(x, t, q.cols)?;
        self.nvfp4_mma_gemv_on(&act, q)
    }

    /// Whether an NVFP4 linear of `t` tokens runs on the tensor-core GEMV (in the current mode).
    pub fn mma_gemv_applies(&self, t: usize, q: &GpuNvfp4) -> bool {
        !self.exact_gemm.load(Ordering::Relaxed) && (1..=MMA_GEMV_MAX_TOKENS).contains(&t) && q.cols.is_multiple_of(32)
    }

    /// `x [t, k]` as the tensor-core GEMV reads it (`f16_rowscaled`): converted once, it serves
    /// every linear of that input (q/k/v, gate/up, the GDN input projections).
    pub fn mma_activations(&self, x: &CudaSlice<f32>, t: usize, k: usize) -> Result<MmaActivations> {
        assert!(
            (1..=MMA_GEMV_MAX_TOKENS).contains(&t) && x.len() >= t * k && k.is_multiple_of(32),
            "nvfp4_mma_gemv: x [{t}, {k}]"
        );
        let (mut xh, mut inv) = (self.alloc::<u16>(t * k)?, self.alloc::<f32>(t)?);
        let ki = k as i32;
        let cfg = LaunchConfig { grid_dim: (t as u32, 1, 1), block_dim: (ROWSCALE_THREADS, 1, 1), shared_mem_bytes: 0 };
        launch!(self, f16_rowscaled, cfg, x, &mut xh, &mut inv, &ki);
        Ok(MmaActivations { xh, inv, t, k })
    }

    /// The tensor-core GEMV over converted activations (see [`Gpu::nvfp4_mma_gemv`]).
    pub fn nvfp4_mma_gemv_on(&self, a: &MmaActivations, q: &GpuNvfp4) -> Result<CudaSlice<f32>> {
        Ok(self.nvfp4_mma_gemv_group(a, &[q])?.pop().expect("one output per weight"))
    }

    /// `y_i [t, n_i] = x · W_iᵀ` for weights of one input, up to [`MMA_GROUP_MAX`] per launch
    /// (the kernel's grid runs over the 16-row tiles of all of them).
    pub fn nvfp4_mma_gemv_group(&self, a: &MmaActivations, ws: &[&GpuNvfp4]) -> Result<Vec<CudaSlice<f32>>> {
        self.gemv_group_res_on(self.mma_kernel(a.t), MMA_WARPS, a, ws, &vec![None; ws.len()])
    }

    /// `residual + x · Wᵀ` on the tensor-core GEMV, the add in its epilogue (a decoder layer's
    /// `h + down_proj(·)`): the same floats as the GEMV then [`Gpu::binary`]'s add.
    pub fn nvfp4_mma_gemv_add(
        &self,
        a: &MmaActivations,
        q: &GpuNvfp4,
        residual: &CudaSlice<f32>,
    ) -> Result<CudaSlice<f32>> {
        let mut ys = self.gemv_group_res_on(self.mma_kernel(a.t), MMA_WARPS, a, &[q], &[Some(residual)])?;
        Ok(ys.pop().expect("one output per weight"))
    }

    /// The `nvfp4_mma_gemv_nt*` kernel for `t` tokens.
    fn mma_kernel(&self, t: usize) -> &CudaFunction {
        &self.k.nvfp4_mma[t.div_ceil(8).next_power_of_two().trailing_zeros() as usize]
    }

    /// Names of the GEMV geometry-sweep kernels (one n-tile: up to 8 tokens).
    pub fn gemv_sweep_names(&self) -> Vec<&'static str> {
        self.k.gemv_sweep.iter().map(|v| v.0).collect()
    }

    /// [`Gpu::nvfp4_mma_gemv_group`] through sweep kernel `i` (`a.t ≤ 8`); `tiled` holds each
    /// weight in the tiled layout (`nvfp4_tile`) for the kernels that read it.
    pub fn nvfp4_mma_gemv_sweep(
        &self,
        i: usize,
        a: &MmaActivations,
        ws: &[&GpuNvfp4],
        tiled: &[GpuNvfp4],
    ) -> Result<Vec<CudaSlice<f32>>> {
        assert!(a.t <= 8, "the sweep kernels take one n-tile");
        let (_, warps, is_tiled, f) = &self.k.gemv_sweep[i];
        if *is_tiled {
            let refs: Vec<&GpuNvfp4> = tiled.iter().collect();
            return self.gemv_group_on(f, *warps, a, &refs);
        }
        self.gemv_group_on(f, *warps, a, ws)
    }

    /// `q` in the tiled layout of `kernels/gemv.cu` (same rows, cols, scale_2).
    pub fn nvfp4_tiled(&self, q: &GpuNvfp4) -> Result<GpuNvfp4> {
        let (tiles, chunks) = (q.rows.div_ceil(16), q.cols.div_ceil(128));
        let (mut wt, mut st) = (self.alloc::<u8>(tiles * chunks * 1024)?, self.alloc::<u8>(tiles * chunks * 128)?);
        let (ni, ki) = (q.rows as i32, q.cols as i32);
        launch!(self, nvfp4_tile, flat(tiles * chunks * 32), &q.packed, &q.scales, &mut wt, &mut st, &ni, &ki);
        Ok(GpuNvfp4 { rows: q.rows, cols: q.cols, packed: wt, scales: st, scale_2: q.scale_2 })
    }

    /// Converts `x [t, k]` for the tensor-core GEMV (timing the conversion alone).
    pub fn mma_activations_only(&self, x: &CudaSlice<f32>, t: usize, k: usize) -> Result<()> {
        self.mma_activations(x, t, k).map(drop)
    }

    fn gemv_group_on(
        &self,
        f: &CudaFunction,
        warps: u32,
        a: &MmaActivations,
        ws: &[&GpuNvfp4],
    ) -> Result<Vec<CudaSlice<f32>>> {
        let none = vec![None; ws.len()];
        self.gemv_group_res_on(f, warps, a, ws, &none)
    }

    /// [`Gpu::gemv_group_on`] with `residuals[i]` (`[t, n_i]`) added to output i where given.
    fn gemv_group_res_on(
        &self,
        f: &CudaFunction,
        warps: u32,
        a: &MmaActivations,
        ws: &[&GpuNvfp4],
        residuals: &[Option<&CudaSlice<f32>>],
    ) -> Result<Vec<CudaSlice<f32>>> {
        let (k, t) = (a.k, a.t);
        assert_eq!(residuals.len(), ws.len(), "nvfp4_mma_gemv: one residual slot per weight");
        let mut ys = Vec::with_capacity(ws.len());
        for (group, res) in ws.chunks(MMA_GROUP_MAX).zip(residuals.chunks(MMA_GROUP_MAX)) {
            let mut args = GemvGroup::default();
            let mut outs: Vec<CudaSlice<f32>> = Vec::with_capacity(group.len());
            for q in group {
                assert_eq!(q.cols, k, "nvfp4_mma_gemv: activations of width {k} for a weight of {} columns", q.cols);
                outs.push(self.alloc::<f32>(t * q.rows)?);
            }
            let mut guards = Vec::new();
            let mut res_guards = Vec::new();
            let mut tiles = 0;
            for (i, ((q, y), r)) in group.iter().zip(outs.iter_mut()).zip(res).enumerate() {
                let (w, gw) = q.packed.device_ptr(&self.stream);
                let (s, gs) = q.scales.device_ptr(&self.stream);
                let (yp, gy) = y.device_ptr_mut(&self.stream);
                guards.push((gw, gs, gy));
                if let Some(r) = r {
                    assert_eq!(r.len(), t * q.rows, "nvfp4_mma_gemv: residual of {} for [{t}, {}]", r.len(), q.rows);
                    let (rp, gr) = r.device_ptr(&self.stream);
                    res_guards.push(gr);
                    args.r[i] = rp;
                }
                tiles += q.rows.div_ceil(16) as i32;
                (args.w[i], args.s[i], args.y[i]) = (w, s, yp);
                (args.scale_2[i], args.n[i], args.tiles_end[i]) = (q.scale_2, q.rows as i32, tiles);
            }
            args.count = group.len() as i32;
            let cfg =
                LaunchConfig { grid_dim: (tiles as u32, 1, 1), block_dim: (warps * 32, 1, 1), shared_mem_bytes: 0 };
            let (ki, ti) = (k as i32, t as i32);
            let mut b = self.stream.launch_builder(f);
            b.arg(&args).arg(&a.xh).arg(&a.inv).arg(&ki).arg(&ti);
            // SAFETY: the arguments follow nvfp4_mma_gemv_nt*'s signature; xh and inv hold t rows of
            // k (checked when converted), each weight is [n_i, k] with k % 32 == 0 (the pointers
            // stay valid: the weights outlive the launch), each output and residual t·n_i floats.
            unsafe { b.launch(cfg) }?;
            drop(guards);
            drop(res_guards);
            ys.extend(outs);
        }
        Ok(ys)
    }

    /// `y [t, n] = x [t, k] · Wᵀ` by the NVFP4 GEMV (W4A16; a few tokens, `k % 8 == 0`).
    fn nvfp4_gemv(&self, x: &CudaSlice<f32>, t: usize, q: &GpuNvfp4) -> Result<CudaSlice<f32>> {
        let (n, k) = (q.rows, q.cols);
        assert!(x.len() >= t * k && k.is_multiple_of(8), "nvfp4_gemv: x [{t}, {k}]");
        let mut y = self.alloc::<f32>(t * n)?;
        let (ni, ki) = (n as i32, k as i32);
        launch!(self, nvfp4_gemv, gemv_cfg(n, t), &q.packed, &q.scales, &q.scale_2, x, &mut y, &ni, &ki);
        Ok(y)
    }

    /// `y [t, n] = x [t, k] · w [n, k]ᵀ` for an f32 weight (a tied LM head), cuBLAS f32.
    pub fn linear_f32(
        &self,
        x: &CudaSlice<f32>,
        t: usize,
        w: &CudaSlice<f32>,
        n: usize,
        k: usize,
    ) -> Result<CudaSlice<f32>> {
        assert!(x.len() >= t * k && w.len() >= n * k, "linear_f32 shapes");
        let mut y = self.alloc::<f32>(t * n)?;
        self.gemm(x, w, &mut y, t, n, k, 1.0, blas_sys::cudaDataType::CUDA_R_32F)?;
        Ok(y)
    }

    fn to_bf16(&self, x: &CudaSlice<f32>, n: usize) -> Result<CudaSlice<u16>> {
        let mut xb = self.alloc::<u16>(n)?;
        launch!(self, f32_to_bf16, flat(n), x, &mut xb, &n);
        Ok(xb)
    }

    /// Row-major `y [t, n] = alpha · x [t, k] · w [n, k]ᵀ` with f32 output and accumulation: in
    /// cuBLAS's column-major terms `yᵀ [n, t] = wᵀᵀ · xᵀ` (A = w read transposed, lda = k).
    #[allow(clippy::too_many_arguments)]
    fn gemm<A: cudarc::driver::DeviceRepr, B: cudarc::driver::DeviceRepr>(
        &self,
        x: &CudaSlice<A>,
        w: &CudaSlice<B>,
        y: &mut CudaSlice<f32>,
        t: usize,
        n: usize,
        k: usize,
        alpha: f32,
        dtype: blas_sys::cudaDataType,
    ) -> Result<()> {
        let beta = 0f32;
        let (xp, _gx) = x.device_ptr(&self.stream);
        let (wp, _gw) = w.device_ptr(&self.stream);
        let (yp, _gy) = y.device_ptr_mut(&self.stream);
        // SAFETY: pointers come from live buffers of at least t·k, n·k and t·n elements of the
        // declared types (checked by the callers); alpha/beta are host f32 as CUBLAS_COMPUTE_32F needs.
        unsafe {
            cudarc::cublas::result::gemm_ex(
                *self.blas.handle(),
                blas_sys::cublasOperation_t::CUBLAS_OP_T,
                blas_sys::cublasOperation_t::CUBLAS_OP_N,
                n as i32,
                t as i32,
                k as i32,
                (&alpha) as *const f32 as *const _,
                wp as *const _,
                dtype,
                k as i32,
                xp as *const _,
                dtype,
                k as i32,
                (&beta) as *const f32 as *const _,
                yp as *mut _,
                blas_sys::cudaDataType::CUDA_R_32F,
                n as i32,
                blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )?;
        }
        Ok(())
    }

    /// `y = x · rsqrt(mean(x²) + eps) · (offset + w)` per row of `w.len()`.
    pub fn rms_norm(&self, x: &CudaSlice<f32>, w: &CudaSlice<f32>, eps: f32, offset: f32) -> Result<CudaSlice<f32>> {
        let d = w.len();
        assert!(x.len().is_multiple_of(d), "rms_norm shapes");
        let mut y = self.alloc::<f32>(x.len())?;
        let di = d as i32;
        match norm_v4(x.len() / d, d) {
            Some(cfg) => launch!(self, rms_norm_v4, cfg, x, w, &mut y, &di, &eps, &offset),
            None => launch!(self, rms_norm, per_row(x.len() / d), x, w, &mut y, &di, &eps, &offset),
        }
        Ok(y)
    }

    /// `h' = h + delta` and `y = rms_norm(h')` in one kernel: `(h', y)`.
    pub fn add_rms_norm(
        &self,
        h: &CudaSlice<f32>,
        delta: &CudaSlice<f32>,
        w: &CudaSlice<f32>,
        eps: f32,
        offset: f32,
    ) -> Result<(CudaSlice<f32>, CudaSlice<f32>)> {
        let d = w.len();
        assert!(h.len().is_multiple_of(d) && delta.len() == h.len(), "add_rms_norm shapes");
        let rows = h.len() / d;
        let (mut sum, mut y) = (self.alloc::<f32>(h.len())?, self.alloc::<f32>(h.len())?);
        let di = d as i32;
        match norm_v4(rows, d) {
            Some(cfg) => launch!(self, add_rms_norm_v4, cfg, h, delta, &mut sum, w, &mut y, &di, &eps, &offset),
            None => launch!(self, add_rms_norm, per_row(rows), h, delta, &mut sum, w, &mut y, &di, &eps, &offset),
        }
        Ok((sum, y))
    }

    /// Gated RMSNorm per row of `w.len()`: `w · x·rsqrt(mean(x²)+eps) · silu(z)`.
    pub fn rms_norm_gated(
        &self,
        x: &CudaSlice<f32>,
        z: &CudaSlice<f32>,
        w: &CudaSlice<f32>,
        eps: f32,
    ) -> Result<CudaSlice<f32>> {
        let d = w.len();
        assert!(x.len().is_multiple_of(d) && z.len() == x.len(), "rms_norm_gated shapes");
        let mut y = self.alloc::<f32>(x.len())?;
        let di = d as i32;
        launch!(self, rms_norm_gated, per_row(x.len() / d), x, z, w, &mut y, &di, &eps);
        Ok(y)
    }

    /// Element-wise binary ops on equal-length buffers.
    pub fn binary(&self, op: Binary, a: &CudaSlice<f32>, b: &CudaSlice<f32>) -> Result<CudaSlice<f32>> {
        let n = a.len();
        assert_eq!(b.len(), n, "{op:?} shapes");
        let mut out = self.alloc::<f32>(n)?;
        match op {
            Binary::SiluMul => launch!(self, silu_mul, flat(n), a, b, &mut out, &n),
            Binary::SigmoidGate => launch!(self, sigmoid_gate, flat(n), a, b, &mut out, &n),
            Binary::Add => launch!(self, add, flat(n), a, b, &mut out, &n),
        }
        Ok(out)
    }

    /// `y[r, c] += bias[c]`.
    pub fn add_bias(&self, y: &mut CudaSlice<f32>, bias: &CudaSlice<f32>) -> Result<()> {
        let (n, cols) = (y.len(), bias.len() as i32);
        assert!(n.is_multiple_of(bias.len()), "add_bias shapes");
        launch!(self, add_bias, flat(n), y, bias, &cols, &n);
        Ok(())
    }

    /// `out[r, c] = x[r, c] · s[c]`.
    pub fn mul_cols(&self, x: &CudaSlice<f32>, s: &CudaSlice<f32>) -> Result<CudaSlice<f32>> {
        let (n, cols) = (x.len(), s.len() as i32);
        assert!(n.is_multiple_of(s.len()), "mul_cols shapes");
        let mut out = self.alloc::<f32>(n)?;
        launch!(self, mul_cols, flat(n), x, s, &mut out, &cols, &n);
        Ok(out)
    }

    /// Columns `[off, off + width)` of the rows (length `src_cols`) of `src`.
    pub fn copy_cols(&self, src: &CudaSlice<f32>, src_cols: usize, off: usize, width: usize) -> Result<CudaSlice<f32>> {
        assert!(src.len().is_multiple_of(src_cols) && off + width <= src_cols, "copy_cols shapes");
        let n = src.len() / src_cols * width;
        let mut out = self.alloc::<f32>(n)?;
        let (sc, o, w) = (src_cols as i32, off as i32, width as i32);
        launch!(self, copy_cols, flat(n), src, &mut out, &sc, &o, &w, &n);
        Ok(out)
    }

    /// Rows `ids` of a `[vocab, d]` table (ids validated against the vocabulary by the caller).
    pub fn embedding(&self, table: &CudaSlice<f32>, d: usize, ids: &[u32]) -> Result<CudaSlice<f32>> {
        assert!(table.len().is_multiple_of(d), "embedding shapes");
        let dev_ids = self.upload(ids);
        let mut out = self.alloc::<f32>(ids.len() * d)?;
        let di = d as i32;
        launch!(self, embedding, per_row(ids.len()), table, &dev_ids, &mut out, &di);
        Ok(out)
    }

    /// `(β, g)` of a GDN layer from `b, a [T, Hv]`.
    pub fn gdn_gates(
        &self,
        b: &CudaSlice<f32>,
        a: &CudaSlice<f32>,
        a_log: &CudaSlice<f32>,
        dt_bias: &CudaSlice<f32>,
    ) -> Result<(CudaSlice<f32>, CudaSlice<f32>)> {
        let (n, heads) = (a.len(), a_log.len() as i32);
        assert!(b.len() == n && n.is_multiple_of(a_log.len()) && dt_bias.len() == a_log.len(), "gdn_gates shapes");
        let (mut beta, mut g) = (self.alloc::<f32>(n)?, self.alloc::<f32>(n)?);
        launch!(self, gdn_gates, flat(n), b, a, a_log, dt_bias, &mut beta, &mut g, &heads, &n);
        Ok((beta, g))
    }

    /// In-place RoPE on `x [T, heads, head_dim]` from position `pos0`.
    pub fn rope(
        &self,
        x: &mut CudaSlice<f32>,
        inv_freq: &CudaSlice<f32>,
        heads: usize,
        head_dim: usize,
        pos0: usize,
    ) -> Result<()> {
        let half = inv_freq.len();
        assert!(2 * half <= head_dim && x.len().is_multiple_of(heads * head_dim), "rope shapes");
        let n = x.len() / head_dim * half;
        let (h, d, hf, p) = (heads as i32, head_dim as i32, half as i32, pos0 as i32);
        launch!(self, rope, flat(n), x, inv_freq, &h, &d, &hf, &p, &n);
        Ok(())
    }

    /// Causal depthwise conv + SiLU of `x [T, C]` continuing (and updating) `state [K-1, C]`.
    pub fn causal_conv1d_silu(
        &self,
        x: &CudaSlice<f32>,
        state: &mut CudaSlice<f32>,
        w: &CudaSlice<f32>,
        c: usize,
    ) -> Result<CudaSlice<f32>> {
        let k = w.len() / c;
        assert!(k <= MAX_CONV_K && state.len() == (k - 1) * c && x.len().is_multiple_of(c), "conv1d shapes");
        let t = x.len() / c;
        let mut y = self.alloc::<f32>(x.len())?;
        let (ti, ci, ki) = (t as i32, c as i32, k as i32);
        let cfg = LaunchConfig {
            grid_dim: ((c as u32).div_ceil(ROW_THREADS), t.div_ceil(CONV_T).max(1) as u32, 1),
            block_dim: (ROW_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        launch!(self, conv1d, cfg, x, state, w, &mut y, &ti, &ci, &ki);
        Ok(y)
    }

    /// The gated delta rule over `t` tokens, updating `state [Hv, dk, dv]`; returns `o [T, Hv, dv]`.
    /// `Chunked` walks chunks of 64 tokens (prefill; up to 128-wide keys, which a chunk keeps in
    /// shared memory — wider ones walk token by token), `Recurrent` token by token in one launch.
    #[allow(clippy::too_many_arguments)]
    pub fn gated_delta_rule(
        &self,
        q: &CudaSlice<f32>,
        k: &CudaSlice<f32>,
        v: &CudaSlice<f32>,
        g: &CudaSlice<f32>,
        beta: &CudaSlice<f32>,
        state: &mut CudaSlice<f32>,
        dims: crate::cpu::GdnDims,
        t: usize,
        algo: GdnAlgo,
    ) -> Result<CudaSlice<f32>> {
        check_gdn_shapes([q, k, v, g, beta, state], dims, t);
        match algo {
            GdnAlgo::Chunked if t > 0 && dims.key_dim <= GDN_PREP_MAX_DK && dims.key_dim.is_multiple_of(4) => {
                self.gdn_chunked(q, k, v, g, beta, state, dims, t)
            }
            _ => self.gdn_recurrent(q, k, v, g, beta, state, dims, t),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn gdn_recurrent(
        &self,
        q: &CudaSlice<f32>,
        k: &CudaSlice<f32>,
        v: &CudaSlice<f32>,
        g: &CudaSlice<f32>,
        beta: &CudaSlice<f32>,
        state: &mut CudaSlice<f32>,
        dims: crate::cpu::GdnDims,
        t: usize,
    ) -> Result<CudaSlice<f32>> {
        let crate::cpu::GdnDims { key_heads: hk, value_heads: hv, key_dim: dk, value_dim: dv } = dims;
        let mut out = self.alloc::<f32>(t * hv * dv)?;
        let cfg = LaunchConfig {
            grid_dim: (hv as u32, dv.div_ceil(32) as u32, 1),
            block_dim: (32, 1, 1),
            shared_mem_bytes: ((dk * 32 + 2 * dk) * 4) as u32,
        };
        let (ti, hki, hvi, dki, dvi) = (t as i32, hk as i32, hv as i32, dk as i32, dv as i32);
        launch!(self, gdn_recurrent, cfg, q, k, v, g, beta, state, &mut out, &ti, &hki, &hvi, &dki, &dvi);
        Ok(out)
    }

    /// The delta rule over chunks of 64 tokens (`cpu::gdn_chunked` is the reference): the
    /// state-independent part of every chunk in parallel, then the state across the chunks.
    #[allow(clippy::too_many_arguments)]
    fn gdn_chunked(
        &self,
        q: &CudaSlice<f32>,
        k: &CudaSlice<f32>,
        v: &CudaSlice<f32>,
        g: &CudaSlice<f32>,
        beta: &CudaSlice<f32>,
        state: &mut CudaSlice<f32>,
        dims: crate::cpu::GdnDims,
        t: usize,
    ) -> Result<CudaSlice<f32>> {
        let crate::cpu::GdnDims { key_heads: hk, value_heads: hv, key_dim: dk, value_dim: dv } = dims;
        let chunks = t.div_ceil(GDN_C);
        let slots = chunks * hv * GDN_C;
        let (mut kn, mut qn, mut kcd) =
            (self.alloc::<f32>(slots * dk)?, self.alloc::<f32>(slots * dk)?, self.alloc::<f32>(slots * dk)?);
        let (mut nv, mut gam) = (self.alloc::<f32>(slots * dv)?, self.alloc::<f32>(slots)?);
        let (mut qk, mut lw) = (self.alloc::<f32>(slots * GDN_C)?, self.alloc::<f32>(slots * GDN_C)?);
        let (ti, hki, hvi, dki, dvi) = (t as i32, hk as i32, hv as i32, dk as i32, dv as i32);
        let q_scale = (dk as f32).powf(-0.5);
        let prep = LaunchConfig {
            grid_dim: (chunks as u32, hv as u32, 1),
            block_dim: (GDN_PREP_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        launch!(
            self,
            gdn_chunk_prep,
            prep,
            q,
            k,
            v,
            g,
            beta,
            &ti,
            &hki,
            &hvi,
            &dki,
            &dvi,
            &q_scale,
            &mut kn,
            &mut qn,
            &mut gam,
            &mut qk,
            &mut lw,
            &mut nv,
            &mut kcd
        );
        let mut out = self.alloc::<f32>(t * hv * dv)?;
        let cfg = LaunchConfig {
            grid_dim: (hv as u32, dv.div_ceil(32) as u32, 1),
            block_dim: (GDN_STATE_WARPS * 32, 1, 1),
            shared_mem_bytes: gdn_state_smem(dk) as u32,
        };
        launch!(self, gdn_chunk_state, cfg, &kn, &qn, &gam, &qk, &nv, &kcd, state, &mut out, &ti, &hvi, &dki, &dvi);
        Ok(out)
    }

    /// Causal GQA attention of `q [T, Hq, D]` over `k, v [L, Hkv, D]`.
    #[allow(clippy::too_many_arguments)]
    pub fn attention(
        &self,
        q: &CudaSlice<f32>,
        k: &CudaSlice<f32>,
        v: &CudaSlice<f32>,
        t: usize,
        l: usize,
        dims: crate::cpu::AttnDims,
        scale: f32,
    ) -> Result<CudaSlice<f32>> {
        let crate::cpu::AttnDims { q_heads: hq, kv_heads: hkv, head_dim: d } = dims;
        assert!(
            d <= ATT_MAX_D && q.len() == t * hq * d && k.len() == l * hkv * d && v.len() == k.len() && l >= t,
            "attention shapes"
        );
        let mut out = self.alloc::<f32>(q.len())?;
        let cfg = LaunchConfig {
            grid_dim: (t as u32, hq as u32, 1),
            block_dim: (ATT_THREADS, 1, 1),
            shared_mem_bytes: ((d + ATT_TILE) * 4) as u32,
        };
        let (ti, li, hqi, hkvi, di) = (t as i32, l as i32, hq as i32, hkv as i32, d as i32);
        launch!(self, attention, cfg, q, k, v, &mut out, &ti, &li, &hqi, &hkvi, &di, &scale);
        Ok(out)
    }

    /// Greedy (temperature 0) or sampled token from one logits row (see `kernels/sampling.cu`).
    pub fn sample(&self, logits: &CudaSlice<f32>, p: crate::cpu::SampleParams, u: f32) -> Result<u32> {
        let n = logits.len() as i32;
        let mut out = self.alloc::<u32>(1)?;
        let cfg = LaunchConfig { grid_dim: (1, 1, 1), block_dim: (SAMPLE_THREADS, 1, 1), shared_mem_bytes: 0 };
        if p.temperature == 0.0 {
            launch!(self, argmax, cfg, logits, &n, &mut out);
        } else {
            let k = p.top_k.min(i32::MAX as usize) as i32;
            launch!(self, sample, cfg, logits, &n, &p.temperature, &k, &p.top_p, &p.min_p, &u, &mut out);
        }
        Ok(self.download(&out)[0])
    }

    /// Random bf16 weights uniform in `[-scale, scale)`, generated on the device.
    pub fn random_bf16(&self, rows: usize, cols: usize, seed: u64, scale: f32) -> Result<GpuWeight> {
        let n = rows * cols;
        let mut w = self.alloc::<u16>(n)?;
        launch!(self, fill_bf16, flat(n), &mut w, &n, &seed, &scale);
        Ok(GpuWeight::Bf16 { w, rows, cols, scale: 1.0 })
    }

    /// `center` + uniform in `[-scale, scale)`, f32, generated on the device.
    pub fn random_f32(&self, n: usize, seed: u64, center: f32, scale: f32) -> Result<CudaSlice<f32>> {
        let mut out = self.alloc::<f32>(n)?;
        launch!(self, fill_f32, flat(n), &mut out, &n, &seed, &center, &scale);
        Ok(out)
    }

    /// A random NVFP4 weight (any codes, positive block scales), generated on the device.
    pub fn random_nvfp4(&self, rows: usize, cols: usize, seed: u64, scale_2: f32) -> Result<GpuWeight> {
        assert!(cols.is_multiple_of(16), "NVFP4 needs cols % 16 == 0");
        let (nb, ns) = (rows * cols / 2, rows * cols / 16);
        let (mut packed, mut scales) = (self.alloc::<u8>(nb)?, self.alloc::<u8>(ns)?);
        let seed2 = seed ^ 0x5ca1e;
        launch!(self, fill_bytes, flat(nb), &mut packed, &nb, &seed);
        launch!(self, fill_e4m3, flat(ns), &mut scales, &ns, &seed2);
        Ok(GpuWeight::Nvfp4(GpuNvfp4 { rows, cols, packed, scales, scale_2 }))
    }

    /// Compute capability (major, minor) of the device.
    pub fn compute_capability(&self) -> Result<(i32, i32)> {
        use cudarc::driver::sys::CUdevice_attribute as A;
        let major = self.ctx.attribute(A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?;
        let minor = self.ctx.attribute(A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?;
        Ok((major, minor))
    }

    /// Whether the W4A4 GEMM runs on native block-scaled FP4 tensor cores here (the cubin the
    /// driver picked is SM12x's) rather than its emulation.
    pub fn w4a4_native(&self) -> Result<bool> {
        let mut out = self.upload(&[0i32]);
        let one = LaunchConfig { grid_dim: (1, 1, 1), block_dim: (1, 1, 1), shared_mem_bytes: 0 };
        launch!(self, w4a4_native, one, &mut out);
        Ok(self.download(&out)[0] == 1)
    }

    /// NVFP4 codes `[rows, k/2]` and E4M3 scales `[rows, k/16]` of `x [rows, k]` under
    /// `input_scale`: the bytes of `fp4_format::nvfp4::Nvfp4Activations::quantize`.
    pub fn quantize_act_nvfp4(
        &self,
        x: &CudaSlice<f32>,
        rows: usize,
        k: usize,
        input_scale: f32,
    ) -> Result<(CudaSlice<u8>, CudaSlice<u8>)> {
        assert!(k.is_multiple_of(16) && x.len() >= rows * k, "quantize_act_nvfp4: x [{rows}, {k}], k % 16 == 0");
        let blocks = rows * k / 16;
        let (mut codes, mut scales) = (self.alloc::<u8>(rows * k / 2)?, self.alloc::<u8>(blocks)?);
        launch!(self, quantize_act, flat(blocks), x, &input_scale, &mut codes, &mut scales, &blocks);
        Ok((codes, scales))
    }

    /// `y [t, n] = A_q · W_qᵀ · scale_2 / g` from quantized activations (`g = 1/input_scale`).
    pub fn w4a4_gemm(
        &self,
        a_codes: &CudaSlice<u8>,
        a_scales: &CudaSlice<u8>,
        t: usize,
        g: f32,
        w: &GpuNvfp4,
    ) -> Result<CudaSlice<f32>> {
        let (n, k) = (w.rows, w.cols);
        assert!(a_codes.len() >= t * k / 2 && a_scales.len() >= t * k / 16, "w4a4_gemm: activations [{t}, {k}]");
        let mut y = self.alloc::<f32>(t * n)?;
        let cfg = LaunchConfig {
            grid_dim: (n.div_ceil(W4A4_BN) as u32, t.div_ceil(W4A4_BM) as u32, 1),
            block_dim: (W4A4_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let (alpha, ti, ni, ki) = (w.scale_2 / g, t as i32, n as i32, k as i32);
        launch!(self, w4a4_gemm, cfg, a_codes, a_scales, &w.packed, &w.scales, &alpha, &mut y, &ti, &ni, &ki);
        Ok(y)
    }

    /// W4A4 linear: `x [t, k]` quantized under `input_scale`, then the block-scaled FP4 GEMM; up to
    /// [`GEMV_MAX_TOKENS`] tokens, the quantized activations dequantized through the W4A16 GEMV
    /// instead (the same product, and decode is bandwidth-bound).
    pub fn linear_w4a4(&self, x: &CudaSlice<f32>, t: usize, w: &GpuNvfp4, input_scale: f32) -> Result<CudaSlice<f32>> {
        let k = w.cols;
        if t <= GEMV_MAX_TOKENS {
            assert!(k.is_multiple_of(16) && x.len() >= t * k, "linear_w4a4: x [{t}, {k}], k % 16 == 0");
            let mut xq = self.alloc::<f32>(t * k)?;
            let blocks = t * k / 16;
            launch!(self, fake_quant_act, flat(blocks), x, &mut xq, &input_scale, &blocks);
            return Ok(self.nvfp4_small_batch(&xq, t, w)?.expect("t ≤ GEMV_MAX_TOKENS, k % 16 == 0"));
        }
        let (codes, scales) = self.quantize_act_nvfp4(x, t, k, input_scale)?;
        self.w4a4_gemm(&codes, &scales, t, 1.0 / input_scale, w)
    }

    /// `e4m3(clamp(x/s, ±448))·s` for the first `n` elements of `x` (W8A8 activations).
    pub fn fake_quant_fp8(&self, x: &CudaSlice<f32>, n: usize, s: f32) -> Result<CudaSlice<f32>> {
        assert!(x.len() >= n, "fake_quant_fp8: x has {} elements, needs {n}", x.len());
        let mut out = self.alloc::<f32>(n)?;
        launch!(self, fp8_fake_quant, flat(n), x, &mut out, &s, &n);
        Ok(out)
    }

    /// Rows `ids` (on the device) of a `[vocab, d]` table.
    pub fn embedding_ids(&self, table: &CudaSlice<f32>, d: usize, ids: &CudaSlice<u32>) -> Result<CudaSlice<f32>> {
        assert!(table.len().is_multiple_of(d), "embedding shapes");
        let mut out = self.alloc::<f32>(ids.len() * d)?;
        let di = d as i32;
        launch!(self, embedding, per_row(ids.len()), table, ids, &mut out, &di);
        Ok(out)
    }

    /// The argmax of each row of `logits [rows, n]` into `out[..rows]` (stays on the device).
    pub fn argmax_rows(&self, logits: &CudaSlice<f32>, n: usize, out: &mut CudaSlice<u32>) -> Result<()> {
        let rows = logits.len() / n;
        assert!(logits.len() == rows * n && out.len() >= rows, "argmax_rows shapes");
        let ni = n as i32;
        let cfg =
            LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (SAMPLE_THREADS, 1, 1), shared_mem_bytes: 0 };
        launch!(self, argmax, cfg, logits, &ni, out);
        Ok(())
    }

    /// In-place RoPE on `x [B, heads, head_dim]`, token b at position `pos[b]`.
    pub fn rope_at(
        &self,
        x: &mut CudaSlice<f32>,
        inv_freq: &CudaSlice<f32>,
        pos: &CudaSlice<u32>,
        heads: usize,
        head_dim: usize,
    ) -> Result<()> {
        let half = inv_freq.len();
        let b = x.len() / (heads * head_dim);
        assert!(2 * half <= head_dim && x.len() == b * heads * head_dim && pos.len() >= b, "rope_at shapes");
        let n = b * heads * half;
        let (h, d, hf) = (heads as i32, head_dim as i32, half as i32);
        launch!(self, rope_at, flat(n), x, inv_freq, pos, &h, &d, &hf, &n);
        Ok(())
    }

    /// `k, v [B, row]` into the paged pools at each token's position (`table [B, max_blocks]`).
    #[allow(clippy::too_many_arguments)]
    pub fn kv_write(
        &self,
        k: &CudaSlice<f32>,
        v: &CudaSlice<f32>,
        kp: &mut CudaSlice<f32>,
        vp: &mut CudaSlice<f32>,
        table: &CudaSlice<u32>,
        pos: &CudaSlice<u32>,
        row: usize,
        max_blocks: usize,
        block_size: usize,
    ) -> Result<()> {
        let b = k.len() / row;
        assert!(
            k.len() == b * row && v.len() == k.len() && table.len() >= b * max_blocks && pos.len() >= b,
            "kv_write shapes"
        );
        let (ri, mi, bsi) = (row as i32, max_blocks as i32, block_size as i32);
        launch!(self, kv_write, per_row(b), k, v, kp, vp, table, pos, &ri, &mi, &bsi);
        Ok(())
    }

    /// Decode attention of `q [B, Hq, D]` over each token's paged KV (positions `0..=pos[b]`),
    /// split into [`attention_splits`] key ranges and merged.
    #[allow(clippy::too_many_arguments)]
    pub fn paged_attention(
        &self,
        q: &CudaSlice<f32>,
        kp: &CudaSlice<f32>,
        vp: &CudaSlice<f32>,
        table: &CudaSlice<u32>,
        pos: &CudaSlice<u32>,
        dims: crate::cpu::AttnDims,
        max_blocks: usize,
        block_size: usize,
        scale: f32,
    ) -> Result<CudaSlice<f32>> {
        let crate::cpu::AttnDims { q_heads: hq, kv_heads: hkv, head_dim: d } = dims;
        let b = q.len() / (hq * d);
        assert!(d <= PA_MAX_D && q.len() == b * hq * d && table.len() >= b * max_blocks, "paged_attention shapes");
        assert!(
            hq.is_multiple_of(hkv) && hq / hkv <= PA_MAX_G,
            "paged_attention: {hq} query heads over {hkv} KV heads"
        );
        let splits = attention_splits(b, hkv);
        let mut part = self.alloc::<f32>(b * hq * splits * (d + 2))?;
        let cfg = LaunchConfig {
            grid_dim: (b as u32, hkv as u32, splits as u32),
            block_dim: (PA_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let (hqi, hkvi, di, mi, bsi) = (hq as i32, hkv as i32, d as i32, max_blocks as i32, block_size as i32);
        if hq / hkv <= 4 && d <= 256 {
            launch!(
                self,
                attention_split_g4d256,
                cfg,
                q,
                kp,
                vp,
                table,
                pos,
                &mut part,
                &hqi,
                &hkvi,
                &di,
                &mi,
                &bsi,
                &scale
            );
        } else {
            launch!(self, attention_split, cfg, q, kp, vp, table, pos, &mut part, &hqi, &hkvi, &di, &mi, &bsi, &scale);
        }
        let mut out = self.alloc::<f32>(q.len())?;
        let si = splits as i32;
        let merge = LaunchConfig {
            grid_dim: ((b * hq) as u32, 1, 1),
            block_dim: (PA_MERGE_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        launch!(self, attention_merge, merge, &part, &mut out, &si, &di);
        Ok(out)
    }

    /// One causal-conv step + SiLU per sequence: `x [B, C]` with state `pool [slots, K-1, C]`
    /// at `slots[b]` (updated).
    pub fn conv1d_step(
        &self,
        x: &CudaSlice<f32>,
        pool: &mut CudaSlice<f32>,
        w: &CudaSlice<f32>,
        slots: &CudaSlice<u32>,
        c: usize,
    ) -> Result<CudaSlice<f32>> {
        let k = w.len() / c;
        let b = x.len() / c;
        assert!(k <= MAX_CONV_K && x.len() == b * c && slots.len() >= b, "conv1d_step shapes");
        let mut y = self.alloc::<f32>(x.len())?;
        let cfg = LaunchConfig {
            grid_dim: ((c as u32).div_ceil(ROW_THREADS), b as u32, 1),
            block_dim: (ROW_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let (ci, ki) = (c as i32, k as i32);
        launch!(self, conv1d_step, cfg, x, pool, w, slots, &mut y, &ci, &ki);
        Ok(y)
    }

    /// One delta-rule step per sequence on the state `pool [slots, Hv, dk, dv]` at `slots[b]`.
    #[allow(clippy::too_many_arguments)]
    pub fn gdn_step(
        &self,
        q: &CudaSlice<f32>,
        k: &CudaSlice<f32>,
        v: &CudaSlice<f32>,
        g: &CudaSlice<f32>,
        beta: &CudaSlice<f32>,
        pool: &mut CudaSlice<f32>,
        slots: &CudaSlice<u32>,
        dims: crate::cpu::GdnDims,
    ) -> Result<CudaSlice<f32>> {
        let crate::cpu::GdnDims { key_heads: hk, value_heads: hv, key_dim: dk, value_dim: dv } = dims;
        let b = g.len() / hv;
        assert!(
            dk <= GDN_STEP_MAX_DK && dk.is_multiple_of(4) && q.len() == b * hk * dk && v.len() == b * hv * dv,
            "gdn_step shapes"
        );
        let mut out = self.alloc::<f32>(b * hv * dv)?;
        let cfg = LaunchConfig {
            grid_dim: (dv.div_ceil(32) as u32, hv as u32, b as u32),
            block_dim: (GDN_STEP_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let (hki, hvi, dki, dvi) = (hk as i32, hv as i32, dk as i32, dv as i32);
        launch!(self, gdn_step, cfg, q, k, v, g, beta, pool, slots, &mut out, &hki, &hvi, &dki, &dvi);
        Ok(out)
    }

    /// Writes `src` into `dst` starting at element `at` (a prefilled sequence's state moving
    /// into its pool slot or blocks).
    pub fn write_at(&self, dst: &mut CudaSlice<f32>, at: usize, src: &CudaSlice<f32>) -> Result<()> {
        assert!(at + src.len() <= dst.len(), "write_at: {} + {} > {}", at, src.len(), dst.len());
        self.stream.memcpy_dtod(src, &mut dst.slice_mut(at..at + src.len()))?;
        Ok(())
    }

    /// A copy of `a` followed by `b` (the KV cache growing by the new tokens' rows).
    pub fn concat(&self, a: &CudaSlice<f32>, b: &CudaSlice<f32>) -> Result<CudaSlice<f32>> {
        let mut out = self.alloc::<f32>(a.len() + b.len())?;
        self.stream.memcpy_dtod(a, &mut out.slice_mut(..a.len()))?;
        self.stream.memcpy_dtod(b, &mut out.slice_mut(a.len()..))?;
        Ok(out)
    }

    /// Elements `[start, start + len)` as a new buffer.
    pub fn copy_range(&self, a: &CudaSlice<f32>, start: usize, len: usize) -> Result<CudaSlice<f32>> {
        let mut out = self.alloc::<f32>(len)?;
        self.stream.memcpy_dtod(&a.slice(start..start + len), &mut out)?;
        Ok(out)
    }
}

// After `launch!`, which the launchers there use.
mod fused;
