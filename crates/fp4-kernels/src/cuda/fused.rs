//! Launchers of the decode-step fusions: kernels that write the next GEMV's input format
//! themselves (`rms_norm_v4_f16`, `add_rms_norm_v4_f16`, `silu_mul_f16`, `sigmoid_gate_f16`:
//! `kernels/rowscale.cuh`), the fused GDN step and the fused attention prologue
//! (`kernels/decode.cu`). Each computes what a sequence of the plain launchers computes (the
//! CPU references compose the plain ops); a decode step of the 9B takes ~300 fewer launches.

use super::DeviceBuf;
use super::{geometry, norm_v4, Gpu, MmaActivations, Result, MMA_GEMV_MAX_TOKENS};
use crate::contract::Binary;
use crate::cpu::GdnDims;
use cudarc::driver::{LaunchConfig, PushKernelArg};
use std::sync::atomic::Ordering;

/// `GDN_FUSED_THREADS` of `gdn_decode_fused`, and the head sizes it takes.
const GDN_FUSED_THREADS: u32 = geometry::GDN_FUSED_THREADS as u32;
const GDN_FUSED_MAX_D: usize = geometry::GDN_FUSED_MAX_D;
/// `ROWS_HELD` of the `*_f16` element-wise kernels (float4s per thread, 1024 threads at most).
const ROWS_HELD: usize = geometry::ROWS_HELD;
/// Largest head `attn_decode_prep` takes (one thread per dim; its shared row).
const PREP_MAX_D: usize = geometry::ATT_PREP_MAX_D;

impl Gpu {
    /// Whether the input of a linear, `t` rows of `k`, can be produced in the tensor-core GEMV's
    /// format (the same rule as [`Gpu::mma_gemv_applies`]).
    pub fn gemv_input_applies(&self, t: usize, k: usize) -> bool {
        !self.exact_gemm.load(Ordering::Relaxed) && (1..=MMA_GEMV_MAX_TOKENS).contains(&t) && k.is_multiple_of(32)
    }

    /// The bytes of a GEMV input on the host: the f16 values (GEMV pair order) and each row's
    /// inverse scale (for checks that two producers wrote the same input).
    pub fn download_gemv_input(&self, a: &MmaActivations) -> (Vec<u16>, Vec<f32>) {
        (self.download(&a.xh), self.download(&a.inv))
    }

    fn gemv_input_buffers(&self, t: usize, k: usize) -> Result<MmaActivations> {
        Ok(MmaActivations { xh: self.alloc::<u16>(t * k)?, inv: self.alloc::<f32>(t)?, t, k })
    }

    /// [`Gpu::rms_norm`] of full rows (`w.len()` = the row) that also writes the GEMV format;
    /// `None` when that does not apply (too many rows, a width it cannot take).
    pub fn rms_norm_f16(
        &self,
        x: &DeviceBuf<f32>,
        w: &DeviceBuf<f32>,
        eps: f32,
        offset: f32,
    ) -> Result<Option<(DeviceBuf<f32>, MmaActivations)>> {
        let d = w.len();
        let rows = x.len() / d;
        let Some(cfg) = norm_v4(rows, d).filter(|_| self.gemv_input_applies(rows, d) && x.len() == rows * d) else {
            return Ok(None);
        };
        let (mut y, mut a) = (self.alloc::<f32>(x.len())?, self.gemv_input_buffers(rows, d)?);
        let di = d as i32;
        launch!(self, rms_norm_v4_f16, cfg, x, w, &mut y, &mut a.xh, &mut a.inv, &di, &eps, &offset);
        Ok(Some((y, a)))
    }

    /// [`Gpu::add_rms_norm`] that also writes the GEMV format of the norm: `(h', y, y as GEMV
    /// input)`, or `None` when that does not apply.
    #[allow(clippy::type_complexity)]
    pub fn add_rms_norm_f16(
        &self,
        h: &DeviceBuf<f32>,
        delta: &DeviceBuf<f32>,
        w: &DeviceBuf<f32>,
        eps: f32,
        offset: f32,
    ) -> Result<Option<(DeviceBuf<f32>, DeviceBuf<f32>, MmaActivations)>> {
        let d = w.len();
        let rows = h.len() / d;
        let applies = self.gemv_input_applies(rows, d) && h.len() == rows * d && delta.len() == h.len();
        let Some(cfg) = norm_v4(rows, d).filter(|_| applies) else {
            return Ok(None);
        };
        let (mut sum, mut y) = (self.alloc::<f32>(h.len())?, self.alloc::<f32>(h.len())?);
        let mut a = self.gemv_input_buffers(rows, d)?;
        let di = d as i32;
        launch!(
            self,
            add_rms_norm_v4_f16,
            cfg,
            h,
            delta,
            &mut sum,
            w,
            &mut y,
            &mut a.xh,
            &mut a.inv,
            &di,
            &eps,
            &offset
        );
        Ok(Some((sum, y, a)))
    }

    /// SwiGLU or the attention output gate over `rows` rows of `d` ([`Gpu::binary`]) that also
    /// writes the GEMV format; `None` for other ops or when it does not apply.
    pub fn binary_f16(
        &self,
        op: Binary,
        a: &DeviceBuf<f32>,
        b: &DeviceBuf<f32>,
        d: usize,
    ) -> Result<Option<(DeviceBuf<f32>, MmaActivations)>> {
        let rows = a.len() / d.max(1);
        let threads = (d / 4).div_ceil(32).clamp(1, 32) * 32;
        let fits = d / 4 <= ROWS_HELD * threads && a.len() == rows * d && b.len() == a.len();
        if matches!(op, Binary::Add) || !fits || !self.gemv_input_applies(rows, d) {
            return Ok(None);
        }
        let cfg =
            LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (threads as u32, 1, 1), shared_mem_bytes: 0 };
        let (mut out, mut act) = (self.alloc::<f32>(a.len())?, self.gemv_input_buffers(rows, d)?);
        let di = d as i32;
        match op {
            Binary::SiluMul => launch!(self, silu_mul_f16, cfg, a, b, &mut out, &mut act.xh, &mut act.inv, &di),
            _ => launch!(self, sigmoid_gate_f16, cfg, a, b, &mut out, &mut act.xh, &mut act.inv, &di),
        }
        Ok(Some((out, act)))
    }

    /// Whether [`Gpu::gdn_decode`] takes heads of these sizes.
    pub fn gdn_decode_applies(&self, d: GdnDims) -> bool {
        d.key_dim <= GDN_FUSED_MAX_D
            && d.value_dim <= GDN_FUSED_MAX_D
            && d.key_dim.is_multiple_of(4)
            && d.value_heads.is_multiple_of(d.key_heads)
    }

    /// GDN decode steps after the conv, fused (`gdn_decode_fused`): gates from `b, a [rows, Hv]`,
    /// l2norm, delta rule on the state pool walked per sequence as [`Gpu::conv1d_step`] walks
    /// the conv state (`slots`: read slots, write slots, rows per sequence), gated RMSNorm with
    /// `z` and `norm_w`. `mixed` is the conv output `[rows, 2·Hk·dk + Hv·dv]`; returns `[rows,
    /// Hv·dv]`, and for the 9B's heads (128 × 128, up to 32 value heads) also that output as
    /// out_proj's GEMV input: there a block per 32 state columns (`gdn_decode_cols_k128v128`,
    /// four times the blocks of one per head, for a batch of one) and the gated norm after it
    /// (`rms_norm_gated_f16`). Several rows per sequence (a speculative verify) take the
    /// `_multi` kernels, which walk a sequence's rows with its state held in registers.
    #[allow(clippy::too_many_arguments)]
    pub fn gdn_decode(
        &self,
        mixed: &DeviceBuf<f32>,
        b_proj: &DeviceBuf<f32>,
        a_proj: &DeviceBuf<f32>,
        a_log: &DeviceBuf<f32>,
        dt_bias: &DeviceBuf<f32>,
        z: &DeviceBuf<f32>,
        norm_w: &DeviceBuf<f32>,
        eps: f32,
        pool: &mut DeviceBuf<f32>,
        slots: (&DeviceBuf<u32>, &DeviceBuf<u32>, usize),
        dims: GdnDims,
    ) -> Result<(DeviceBuf<f32>, Option<MmaActivations>)> {
        let GdnDims { key_heads: hk, value_heads: hv, key_dim: dk, value_dim: dv } = dims;
        let (read, write, per_seq) = slots;
        let rows = b_proj.len() / hv;
        let seqs = rows / per_seq.max(1);
        assert!(
            self.gdn_decode_applies(dims)
                && mixed.len() == rows * (2 * hk * dk + hv * dv)
                && a_proj.len() == rows * hv
                && a_log.len() == hv
                && dt_bias.len() == hv
                && z.len() == rows * hv * dv
                && norm_w.len() == dv
                && per_seq >= 1
                && seqs * per_seq == rows
                && read.len() >= seqs
                && write.len() >= rows
                && pool.len().is_multiple_of(hv * dk * dv),
            "gdn_decode shapes"
        );
        let multi = per_seq > 1;
        let mut out = self.alloc::<f32>(rows * hv * dv)?;
        let by_cols =
            (dk, dv) == (128, 128) && dv == geometry::GATED_F16_D && hv <= 32 && self.gemv_input_applies(rows, hv * dv);
        let (f, cfg) = if by_cols {
            let cfg = LaunchConfig {
                grid_dim: (hv as u32, seqs as u32, (dv / 32) as u32),
                block_dim: (128, 1, 1),
                shared_mem_bytes: 0,
            };
            let f = if multi { &self.k.gdn_decode_cols_multi_k128v128 } else { &self.k.gdn_decode_cols_k128v128 };
            (f, cfg)
        } else {
            let cfg = LaunchConfig {
                grid_dim: (hv as u32, seqs as u32, 1),
                block_dim: (GDN_FUSED_THREADS, 1, 1),
                shared_mem_bytes: 0,
            };
            let f = match (multi, (dk, dv) == (128, 128)) {
                (true, _) => &self.k.gdn_decode_fused_multi,
                (false, true) => &self.k.gdn_decode_fused_k128v128,
                (false, false) => &self.k.gdn_decode_fused,
            };
            (f, cfg)
        };
        let (hki, hvi, dki, dvi, ri) = (hk as i32, hv as i32, dk as i32, dv as i32, per_seq as i32);
        launch!(
            self,
            fn f,
            cfg,
            mixed,
            b_proj,
            a_proj,
            a_log,
            dt_bias,
            z,
            norm_w,
            pool,
            read,
            write,
            &mut out,
            &hki,
            &hvi,
            &dki,
            &dvi,
            &eps,
            &ri
        );
        if !by_cols {
            return Ok((out, None));
        }
        // out holds the raw outputs: the gated norm, one block of 32 · Hv threads per token.
        let (mut y, mut act) = (self.alloc::<f32>(rows * hv * dv)?, self.gemv_input_buffers(rows, hv * dv)?);
        let cfg =
            LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (32 * hv as u32, 1, 1), shared_mem_bytes: 0 };
        launch!(self, rms_norm_gated_f16, cfg, &out, z, norm_w, &mut y, &mut act.xh, &mut act.inv, &eps);
        Ok((y, Some(act)))
    }

    /// Whether [`Gpu::attention_decode_prep`] takes heads of `d` with `half` rotary pairs.
    pub fn attention_prep_applies(&self, d: usize, half: usize) -> bool {
        d <= PREP_MAX_D && 2 * half <= d
    }

    /// The attention decode prologue fused (`attn_decode_prep`): q and k (1+w)-normed and
    /// rotated at `pos`, k and v written into the paged pools at each token's position.
    /// `qg [B, Hq, 2D]` (per head query | gate), `k, v [B, Hkv, D]`; returns `(q [B, Hq, D],
    /// gate [B, Hq·D])`.
    #[allow(clippy::too_many_arguments)]
    pub fn attention_decode_prep(
        &self,
        qg: &DeviceBuf<f32>,
        k: &DeviceBuf<f32>,
        v: &DeviceBuf<f32>,
        norms: (&DeviceBuf<f32>, &DeviceBuf<f32>),
        inv_freq: &DeviceBuf<f32>,
        eps: f32,
        pools: (&mut DeviceBuf<f32>, &mut DeviceBuf<f32>),
        index: (&DeviceBuf<u32>, &DeviceBuf<u32>, usize, usize),
        heads: (usize, usize),
    ) -> Result<(DeviceBuf<f32>, DeviceBuf<f32>)> {
        let ((q_norm, k_norm), (kp, vp), (pos, table, max_blocks, block_size), (hq, hkv)) =
            (norms, pools, index, heads);
        let d = q_norm.len();
        let half = inv_freq.len();
        let b = k.len() / (hkv * d);
        assert!(
            self.attention_prep_applies(d, half)
                && qg.len() == b * hq * 2 * d
                && k.len() == b * hkv * d
                && v.len() == k.len()
                && k_norm.len() == d
                && pos.len() >= b
                && table.len() >= b * max_blocks
                && kp.len() == vp.len()
                && kp.len().is_multiple_of(hkv * d),
            "attention_decode_prep shapes"
        );
        let (mut q, mut gate) = (self.alloc::<f32>(b * hq * d)?, self.alloc::<f32>(b * hq * d)?);
        let threads = d.div_ceil(32) as u32 * 32;
        let cfg = LaunchConfig {
            grid_dim: ((hq + hkv) as u32, b as u32, 1),
            block_dim: (threads, 1, 1),
            shared_mem_bytes: 0,
        };
        let (hqi, hkvi, di, halfi, mbi, bsi) =
            (hq as i32, hkv as i32, d as i32, half as i32, max_blocks as i32, block_size as i32);
        launch!(
            self,
            attn_decode_prep,
            cfg,
            qg,
            k,
            v,
            q_norm,
            k_norm,
            inv_freq,
            pos,
            table,
            &mut q,
            &mut gate,
            kp,
            vp,
            &hqi,
            &hkvi,
            &di,
            &halfi,
            &mbi,
            &bsi,
            &eps
        );
        Ok((q, gate))
    }
}
