//! W4A4 and FP8 activation launchers (`kernels/w4a4.cu`): NVFP4 activation quantization and the block-scaled FP4 GEMM.

use super::*;

impl Gpu {
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
        x: &DeviceBuf<f32>,
        rows: usize,
        k: usize,
        input_scale: f32,
    ) -> Result<(DeviceBuf<u8>, DeviceBuf<u8>)> {
        assert!(k.is_multiple_of(16) && x.len() >= rows * k, "quantize_act_nvfp4: x [{rows}, {k}], k % 16 == 0");
        let blocks = rows * k / 16;
        let (mut codes, mut scales) = (self.alloc::<u8>(rows * k / 2)?, self.alloc::<u8>(blocks)?);
        launch!(self, quantize_act, flat(blocks), x, &input_scale, &mut codes, &mut scales, &blocks);
        Ok((codes, scales))
    }

    /// `y [t, n] = A_q · W_qᵀ · scale_2 / g` from quantized activations (`g = 1/input_scale`).
    pub fn w4a4_gemm(
        &self,
        a_codes: &DeviceBuf<u8>,
        a_scales: &DeviceBuf<u8>,
        t: usize,
        g: f32,
        w: &GpuNvfp4,
    ) -> Result<DeviceBuf<f32>> {
        let (n, k) = (w.rows, w.cols);
        assert!(a_codes.len() >= t * k / 2 && a_scales.len() >= t * k / 16, "w4a4_gemm: activations [{t}, {k}]");
        assert_eq!(w.layout, Nvfp4Layout::ModelOpt, "w4a4_gemm reads ModelOpt's layout");
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
    pub fn linear_w4a4(&self, x: &DeviceBuf<f32>, t: usize, w: &GpuNvfp4, input_scale: f32) -> Result<DeviceBuf<f32>> {
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
    pub fn fake_quant_fp8(&self, x: &DeviceBuf<f32>, n: usize, s: f32) -> Result<DeviceBuf<f32>> {
        assert!(x.len() >= n, "fake_quant_fp8: x has {} elements, needs {n}", x.len());
        let mut out = self.alloc::<f32>(n)?;
        launch!(self, fp8_fake_quant, flat(n), x, &mut out, &s, &n);
        Ok(out)
    }
}
