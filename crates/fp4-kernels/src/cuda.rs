//! CUDA launchers (feature `cuda`) for the hand-written kernels in `kernels/*.cu`, embedded as
//! fatbins (sm_90a, sm_120a, sm_121a + compute_90a PTX; the driver picks by compute capability).
//! libcuda is loaded at run time, so a `cuda` binary still starts on a machine without a GPU.

use cudarc::driver::{CudaContext, CudaFunction, CudaSlice, CudaStream, DriverError, LaunchConfig, PushKernelArg};
use cudarc::nvrtc::Ptx;
use fp4_format::nvfp4::Nvfp4Weight;
use std::sync::Arc;

const NVFP4_GEMV: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/nvfp4_gemv.fatbin"));
const NORM: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/norm.fatbin"));
const ELEMENTWISE: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/elementwise.fatbin"));

/// Threads per block of the row-wise kernels (norms, gathers).
const ROW_THREADS: u32 = 256;

/// Rows of the output per thread block in the GEMV kernels (`ROWS_PER_BLOCK` there).
const GEMV_ROWS_PER_BLOCK: u32 = 4;

pub type Result<T> = std::result::Result<T, DriverError>;

/// One GPU: its context, the stream every launch goes to, and the loaded kernels.
pub struct Gpu {
    pub ctx: Arc<CudaContext>,
    pub stream: Arc<CudaStream>,
    gemv: CudaFunction,
    rms_norm: CudaFunction,
    add_rms_norm: CudaFunction,
    silu_mul: CudaFunction,
    embedding: CudaFunction,
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

impl Gpu {
    pub fn new(ordinal: usize) -> Result<Gpu> {
        let ctx = CudaContext::new(ordinal)?;
        let stream = ctx.default_stream();
        let gemv = ctx.load_module(Ptx::from_binary(NVFP4_GEMV.to_vec()))?;
        let norm = ctx.load_module(Ptx::from_binary(NORM.to_vec()))?;
        let elementwise = ctx.load_module(Ptx::from_binary(ELEMENTWISE.to_vec()))?;
        Ok(Gpu {
            gemv: gemv.load_function("nvfp4_gemv_f32")?,
            rms_norm: norm.load_function("rms_norm_f32")?,
            add_rms_norm: norm.load_function("add_rms_norm_f32")?,
            silu_mul: elementwise.load_function("silu_mul_f32")?,
            embedding: elementwise.load_function("embedding_f32")?,
            ctx,
            stream,
        })
    }

    /// Milliseconds the work queued by `f` takes on the stream (CUDA events around it).
    pub fn time_ms(&self, f: impl FnOnce() -> Result<()>) -> Result<f64> {
        let timing = Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT);
        let start = self.stream.record_event(timing)?;
        f()?;
        let end = self.stream.record_event(timing)?;
        Ok(start.elapsed_ms(&end)? as f64)
    }

    pub fn name(&self) -> Result<String> {
        self.ctx.name()
    }

    pub fn upload_nvfp4(&self, w: &Nvfp4Weight) -> Result<GpuNvfp4> {
        Ok(GpuNvfp4 {
            rows: w.rows,
            cols: w.cols,
            packed: self.stream.clone_htod(&w.packed)?,
            scales: self.stream.clone_htod(&w.scales)?,
            scale_2: w.scale_2,
        })
    }

    /// `y [rows] = W x` for one token (decode), W4A16 with f32 activations and accumulation.
    /// Needs `cols % 16 == 0` (NVFP4 blocks).
    pub fn nvfp4_gemv(&self, w: &GpuNvfp4, x: &CudaSlice<f32>, y: &mut CudaSlice<f32>) -> Result<()> {
        assert!(w.cols.is_multiple_of(16) && x.len() >= w.cols && y.len() >= w.rows, "nvfp4_gemv shapes");
        let cfg = LaunchConfig {
            grid_dim: ((w.rows as u32).div_ceil(GEMV_ROWS_PER_BLOCK), 1, 1),
            block_dim: (32, GEMV_ROWS_PER_BLOCK, 1),
            shared_mem_bytes: 0,
        };
        let (n, k) = (w.rows as i32, w.cols as i32);
        let mut launch = self.stream.launch_builder(&self.gemv);
        launch.arg(&w.packed).arg(&w.scales).arg(&w.scale_2).arg(x).arg(y).arg(&n).arg(&k);
        // SAFETY: argument types and order match the kernel signature; shapes checked above.
        unsafe { launch.launch(cfg) }?;
        Ok(())
    }

    fn rows(rows: usize) -> LaunchConfig {
        LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (ROW_THREADS, 1, 1), shared_mem_bytes: 0 }
    }

    /// `y = x · rsqrt(mean(x²) + eps) · (offset + w)` per row of `w.len()`.
    pub fn rms_norm(
        &self,
        x: &CudaSlice<f32>,
        w: &CudaSlice<f32>,
        y: &mut CudaSlice<f32>,
        eps: f32,
        offset: f32,
    ) -> Result<()> {
        let d = w.len();
        assert!(x.len().is_multiple_of(d) && y.len() >= x.len(), "rms_norm shapes");
        let mut launch = self.stream.launch_builder(&self.rms_norm);
        let di = d as i32;
        launch.arg(x).arg(w).arg(y).arg(&di).arg(&eps).arg(&offset);
        // SAFETY: argument types and order match the kernel; shapes checked above.
        unsafe { launch.launch(Self::rows(x.len() / d)) }?;
        Ok(())
    }

    /// `h += delta`, then `y = rms_norm(h)` (the residual add fused with the next norm).
    pub fn add_rms_norm(
        &self,
        h: &mut CudaSlice<f32>,
        delta: &CudaSlice<f32>,
        w: &CudaSlice<f32>,
        y: &mut CudaSlice<f32>,
        eps: f32,
        offset: f32,
    ) -> Result<()> {
        let d = w.len();
        assert!(h.len().is_multiple_of(d) && delta.len() == h.len() && y.len() >= h.len(), "add_rms_norm shapes");
        let rows = h.len() / d;
        let mut launch = self.stream.launch_builder(&self.add_rms_norm);
        let di = d as i32;
        launch.arg(h).arg(delta).arg(w).arg(y).arg(&di).arg(&eps).arg(&offset);
        // SAFETY: as above.
        unsafe { launch.launch(Self::rows(rows)) }?;
        Ok(())
    }

    /// `out = silu(gate) · up`.
    pub fn silu_mul(&self, gate: &CudaSlice<f32>, up: &CudaSlice<f32>, out: &mut CudaSlice<f32>) -> Result<()> {
        let n = gate.len();
        assert!(up.len() == n && out.len() >= n, "silu_mul shapes");
        let mut launch = self.stream.launch_builder(&self.silu_mul);
        let ni = n as i32;
        launch.arg(gate).arg(up).arg(out).arg(&ni);
        // SAFETY: as above.
        unsafe { launch.launch(LaunchConfig::for_num_elems(n as u32)) }?;
        Ok(())
    }

    /// `out[t] = table[ids[t]]` for a `[vocab, d]` table. Ids must be `< vocab` (checked on the host
    /// by the caller's tokenizer/vocabulary validation).
    pub fn embedding(
        &self,
        table: &CudaSlice<f32>,
        d: usize,
        ids: &CudaSlice<u32>,
        out: &mut CudaSlice<f32>,
    ) -> Result<()> {
        assert!(table.len().is_multiple_of(d) && out.len() >= ids.len() * d, "embedding shapes");
        let mut launch = self.stream.launch_builder(&self.embedding);
        let di = d as i32;
        launch.arg(table).arg(ids).arg(out).arg(&di);
        // SAFETY: as above.
        unsafe { launch.launch(Self::rows(ids.len())) }?;
        Ok(())
    }
}
