//! Random-weight launchers for benchmarks (`kernels/synthetic.cu`).

use super::*;

impl Gpu {
    /// Random bf16 weights uniform in `[-scale, scale)`, generated on the device.
    pub fn random_bf16(&self, rows: usize, cols: usize, seed: u64, scale: f32) -> Result<GpuWeight> {
        let n = rows * cols;
        let mut w = self.alloc::<u16>(n)?;
        launch!(self, fill_bf16, flat(n), &mut w, &n, &seed, &scale);
        Ok(GpuWeight::Bf16 { w, rows, cols, scale: 1.0 })
    }

    /// `center` + uniform in `[-scale, scale)`, f32, generated on the device.
    pub fn random_f32(&self, n: usize, seed: u64, center: f32, scale: f32) -> Result<DeviceBuf<f32>> {
        let mut out = self.alloc::<f32>(n)?;
        launch!(self, fill_f32, flat(n), &mut out, &n, &seed, &center, &scale);
        Ok(out)
    }

    /// A random NVFP4 weight (any codes, positive block scales), generated on the device in
    /// ModelOpt's layout (the bytes `fp4_model`'s synthetic weights make on the CPU), then
    /// repacked for the GEMV when `layout` says so.
    pub fn random_nvfp4(
        &self,
        rows: usize,
        cols: usize,
        seed: u64,
        scale_2: f32,
        layout: Nvfp4Layout,
    ) -> Result<GpuWeight> {
        assert!(cols.is_multiple_of(16), "NVFP4 needs cols % 16 == 0");
        let (nb, ns) = (rows * cols / 2, rows * cols / 16);
        let (mut packed, mut scales) = (self.alloc::<u8>(nb)?, self.alloc::<u8>(ns)?);
        let seed2 = seed ^ 0x5ca1e;
        launch!(self, fill_bytes, flat(nb), &mut packed, &nb, &seed);
        launch!(self, fill_e4m3, flat(ns), &mut scales, &ns, &seed2);
        let packed = match layout {
            Nvfp4Layout::ModelOpt => packed,
            Nvfp4Layout::Repacked => self.repack_codes(&packed)?,
        };
        Ok(GpuWeight::Nvfp4(GpuNvfp4 { rows, cols, packed, scales, scale_2, layout }))
    }
}
