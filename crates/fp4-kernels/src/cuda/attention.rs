//! Prefill attention launchers (`kernels/attention.cu`).

use super::*;

impl Gpu {
    /// Causal GQA attention of `q [T, Hq, D]` over `k, v [L, Hkv, D]`: on tensor cores
    /// (`flash_attention_d*`, f16 scores and bf16 values with f32 accumulation) for heads up to
    /// `FA_MAX_D` wide, in f32 on CUDA cores (`attention_f32`) in exact mode or beyond that.
    #[allow(clippy::too_many_arguments)]
    pub fn attention(
        &self,
        q: &DeviceBuf<f32>,
        k: &DeviceBuf<f32>,
        v: &DeviceBuf<f32>,
        t: usize,
        l: usize,
        dims: crate::cpu::AttnDims,
        scale: f32,
    ) -> Result<DeviceBuf<f32>> {
        let crate::cpu::AttnDims { q_heads: hq, kv_heads: hkv, head_dim: d } = dims;
        assert!(
            q.len() == t * hq * d && k.len() == l * hkv * d && v.len() == k.len() && l >= t && hq % hkv == 0,
            "attention shapes"
        );
        if !self.exact_gemm.load(Ordering::Relaxed) && d <= FA_MAX_D {
            return self.flash_attention(q, k, v, t, l, dims, scale);
        }
        assert!(d <= ATT_MAX_D, "attention_f32: head_dim {d} > {ATT_MAX_D}");
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

    #[allow(clippy::too_many_arguments)]
    fn flash_attention(
        &self,
        q: &DeviceBuf<f32>,
        k: &DeviceBuf<f32>,
        v: &DeviceBuf<f32>,
        t: usize,
        l: usize,
        dims: crate::cpu::AttnDims,
        scale: f32,
    ) -> Result<DeviceBuf<f32>> {
        let crate::cpu::AttnDims { q_heads: hq, kv_heads: hkv, head_dim: d } = dims;
        let which = FA_DIMS.iter().position(|&w| d <= w).expect("d <= FA_MAX_D");
        let dp = FA_DIMS[which];
        let lp = l.next_multiple_of(FA_BC);
        // k as f16 [Hkv][Lp][DP], v as bf16 transposed [Hkv][DP][Lp], zero-padded.
        let mut kh = self.alloc::<u16>(hkv * lp * dp)?;
        let mut vt = self.alloc::<u16>(hkv * dp * lp)?;
        let tile = geometry::FA_TILE as u32;
        let prep = LaunchConfig {
            grid_dim: (lp as u32 / tile, dp as u32 / tile, hkv as u32),
            block_dim: (tile, 8, 1),
            shared_mem_bytes: 0,
        };
        let (li, lpi, hqi, hkvi, di, dpi, ti) =
            (l as i32, lp as i32, hq as i32, hkv as i32, d as i32, dp as i32, t as i32);
        launch!(self, attention_kv_prep, prep, k, v, &mut kh, &mut vt, &li, &lpi, &hkvi, &di, &dpi);
        let mut out = self.alloc::<f32>(q.len())?;
        let cfg = LaunchConfig {
            grid_dim: (t.div_ceil(FA_BR) as u32, hq as u32, 1),
            block_dim: (FA_THREADS, 1, 1),
            shared_mem_bytes: flash_smem(dp) as u32,
        };
        let scale_log2 = scale * std::f32::consts::LOG2_E;
        let mut b = self.stream.launch_builder(&self.k.flash_attention[which]);
        b.arg(q).arg(&kh).arg(&vt).arg(&mut out).arg(&ti).arg(&li).arg(&lpi).arg(&hqi).arg(&hkvi).arg(&di);
        b.arg(&scale_log2);
        // SAFETY: the parameters of flash_attention_d* in order and type; kh and vt are sized
        // [Hkv, Lp, DP] as the kernel indexes them, q and out [T, Hq, D], k and v [L, Hkv, D].
        unsafe { b.launch(cfg) }?;
        Ok(out)
    }
}
