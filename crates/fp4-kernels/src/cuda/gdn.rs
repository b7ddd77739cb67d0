//! Gated delta rule launchers (`kernels/gdn.cu`): the recurrent form and the chunked prefill.

use super::*;

impl Gpu {
    /// The gated delta rule over `t` tokens, updating `state [Hv, dk, dv]`; returns `o [T, Hv, dv]`.
    /// `Chunked` walks chunks of 64 tokens (prefill; up to 128-wide keys, which a chunk keeps in
    /// shared memory — wider ones walk token by token), `Recurrent` token by token in one launch.
    #[allow(clippy::too_many_arguments)]
    pub fn gated_delta_rule(
        &self,
        q: &DeviceBuf<f32>,
        k: &DeviceBuf<f32>,
        v: &DeviceBuf<f32>,
        g: &DeviceBuf<f32>,
        beta: &DeviceBuf<f32>,
        state: &mut DeviceBuf<f32>,
        dims: crate::cpu::GdnDims,
        t: usize,
        algo: GdnAlgo,
    ) -> Result<DeviceBuf<f32>> {
        check_gdn_shapes([q, k, v, g, beta, state], dims, t);
        match algo {
            GdnAlgo::Chunked if t > 0 && dims.key_dim <= GDN_PREP_MAX_DK && dims.key_dim.is_multiple_of(4) => {
                self.gdn_chunked(q, k, v, g, beta, state, dims, t)
            }
            _ => self.gdn_recurrent(q, k, v, g, beta, state, dims, t),
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn gdn_recurrent(
        &self,
        q: &DeviceBuf<f32>,
        k: &DeviceBuf<f32>,
        v: &DeviceBuf<f32>,
        g: &DeviceBuf<f32>,
        beta: &DeviceBuf<f32>,
        state: &mut DeviceBuf<f32>,
        dims: crate::cpu::GdnDims,
        t: usize,
    ) -> Result<DeviceBuf<f32>> {
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
    pub(super) fn gdn_chunked(
        &self,
        q: &DeviceBuf<f32>,
        k: &DeviceBuf<f32>,
        v: &DeviceBuf<f32>,
        g: &DeviceBuf<f32>,
        beta: &DeviceBuf<f32>,
        state: &mut DeviceBuf<f32>,
        dims: crate::cpu::GdnDims,
        t: usize,
    ) -> Result<DeviceBuf<f32>> {
        let crate::cpu::GdnDims { key_heads: hk, value_heads: hv, key_dim: dk, value_dim: dv } = dims;
        let chunks = t.div_ceil(GDN_C);
        let slots = chunks * hv * GDN_C;
        let (mut qk_t, mut qg_t) = (self.alloc::<f32>(slots * GDN_C)?, self.alloc::<f32>(slots * dk)?);
        let (mut knd, mut kcd_t) = (self.alloc::<f32>(slots * dk)?, self.alloc::<f32>(slots * dk)?);
        let (mut nv, mut gam) = (self.alloc::<f32>(slots * dv)?, self.alloc::<f32>(slots)?);
        let (ti, hki, hvi, dki, dvi) = (t as i32, hk as i32, hv as i32, dk as i32, dv as i32);
        let q_scale = (dk as f32).powf(-0.5);
        let prep = LaunchConfig {
            grid_dim: (chunks as u32, hv as u32, 1),
            block_dim: (GDN_PREP_THREADS, 1, 1),
            shared_mem_bytes: gdn_prep_smem(dk) as u32,
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
            &mut qk_t,
            &mut qg_t,
            &mut knd,
            &mut kcd_t,
            &mut nv,
            &mut gam
        );
        let mut out = self.alloc::<f32>(t * hv * dv)?;
        let cfg = LaunchConfig {
            grid_dim: (hv as u32, dv.div_ceil(32) as u32, 1),
            block_dim: (GDN_STATE_THREADS, 1, 1),
            shared_mem_bytes: gdn_state_smem(dk) as u32,
        };
        launch!(
            self,
            gdn_chunk_state,
            cfg,
            &qk_t,
            &qg_t,
            &knd,
            &kcd_t,
            &nv,
            &gam,
            state,
            &mut out,
            &ti,
            &hvi,
            &dki,
            &dvi
        );
        Ok(out)
    }
}
