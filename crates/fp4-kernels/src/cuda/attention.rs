//! Prefill attention launcher (`kernels/attention.cu`).

use super::*;

impl Gpu {
    /// Causal GQA attention of `q [T, Hq, D]` over `k, v [L, Hkv, D]`.
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
}
