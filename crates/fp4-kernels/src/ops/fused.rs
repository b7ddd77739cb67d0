//! Fused decode ops: each is defined as the composition of plain ops it replaces (the CPU path,
//! and the GPU path where the fused kernel does not apply), and on the GPU runs as one kernel
//! (`cuda/fused.rs`). The model calls them from its decode-batch branches.

use super::{check, gdn_gates, gdn_step, kv_write, rms_norm, rms_norm_gated, rope_at, split_last};
#[cfg(feature = "cuda")]
use super::{gpu, ok, with_gemv_input};
use super::{BatchIndex, GdnDims, GdnSlots};
#[cfg(feature = "cuda")]
use crate::Storage;
use crate::{Precision, Tensor};

/// The per-layer parameters of a GDN decode step besides the state.
#[derive(Clone, Copy)]
pub struct GdnStepParams<'a> {
    pub a_log: &'a Tensor,
    pub dt_bias: &'a Tensor,
    /// Gated-norm weight `[dv]`.
    pub norm: &'a Tensor,
    pub eps: f32,
    pub dims: GdnDims,
}

/// GDN decode steps after the conv: `mixed [rows, 2·Hk·dk + Hv·dv]` (the conv output: q | k | v),
/// the gate projections `b, a [rows, Hv]` and `z [rows, Hv·dv]`; state `pool [slots·Hv, dk, dv]`
/// walked per sequence by `slots` ([`GdnSlots`]). Returns the gated-normed output `[rows, Hv·dv]`
/// (out_proj's input): [`gdn_gates`], [`gdn_step`] and [`rms_norm_gated`] in a row.
#[allow(clippy::too_many_arguments)]
pub fn gdn_decode(
    mixed: &Tensor,
    b: &Tensor,
    a: &Tensor,
    z: Tensor,
    w: GdnStepParams,
    pool: &mut Tensor,
    slots: GdnSlots,
    p: Precision,
) -> Tensor {
    let d = w.dims;
    let (t, key_width, value_width) = (mixed.rows(), d.key_heads * d.key_dim, d.value_heads * d.value_dim);
    check(mixed.row_len() == 2 * key_width + value_width, "gdn_decode", || {
        format!("mixed {:?} for {d:?}", mixed.shape())
    });
    #[cfg(feature = "cuda")]
    if let Storage::Cuda(ms) = mixed.storage() {
        let g = gpu();
        if g.gdn_decode_applies(d) {
            let o = g.gdn_decode(
                ms,
                b.cuda(),
                a.cuda(),
                w.a_log.cuda(),
                w.dt_bias.cuda(),
                z.cuda(),
                w.norm.cuda(),
                w.eps,
                pool.cuda_mut(),
                (slots.read.cuda(), slots.write.cuda(), slots.rows_per_seq),
                d,
            );
            let (o, act) = ok(o, "gdn_decode");
            let o = Tensor::from_cuda(o, &[t, value_width]);
            return match act {
                Some(a) => o.with_gemv_input(a),
                None => o,
            };
        }
    }
    let [q, k, v]: [Tensor; 3] =
        split_last(mixed, &[key_width, key_width, value_width]).try_into().expect("three parts");
    let (beta, g) = gdn_gates(b, a, w.a_log, w.dt_bias, p);
    let o = gdn_step(&q, &k, &v, &g, &beta, pool, slots, d).round(p);
    let rows = [t * d.value_heads, d.value_dim];
    rms_norm_gated(&o.reshape(&rows), &z.reshape(&rows), w.norm, w.eps, p).reshape(&[t, value_width])
}

/// The per-layer parameters of the attention decode prologue.
#[derive(Clone, Copy)]
pub struct AttentionPrepParams<'a> {
    /// Per-head (1+w) RMSNorm weights `[D]` of q and k.
    pub q_norm: &'a Tensor,
    pub k_norm: &'a Tensor,
    pub eps: f32,
    /// RoPE inverse frequencies (`rotary_dim / 2`).
    pub inv_freq: &'a Tensor,
}

/// The attention decode prologue, one token per sequence: `qg [B, Hq, 2D]` (q_proj's output,
/// per head query | gate), `k, v [B, Hkv, D]`. q and k get their (1+w) RMSNorm and RoPE at
/// `ix.pos`; k and v go into the paged pools. Returns `(q [B, Hq, D], gate [B, Hq·D])`:
/// [`split_last`], [`rms_norm`], [`rope_at`] and [`kv_write`] in a row.
#[allow(clippy::too_many_arguments)]
pub fn attention_decode_prep(
    qg: &Tensor,
    k: &Tensor,
    v: &Tensor,
    w: AttentionPrepParams,
    k_pool: &mut Tensor,
    v_pool: &mut Tensor,
    ix: BatchIndex,
    p: Precision,
) -> (Tensor, Tensor) {
    let (t, hq, d) = (qg.shape()[0], qg.shape()[1], qg.shape()[2] / 2);
    check(k.shape().len() == 3 && k.shape()[2] == d && v.shape() == k.shape(), "attention_decode_prep", || {
        format!("qg {:?} k {:?} v {:?}", qg.shape(), k.shape(), v.shape())
    });
    #[cfg(feature = "cuda")]
    if let Storage::Cuda(qs) = qg.storage() {
        let (g, hkv) = (gpu(), k.shape()[1]);
        if g.attention_prep_applies(d, w.inv_freq.elem_count()) {
            let (q, gate) = ok(
                g.attention_decode_prep(
                    qs,
                    k.cuda(),
                    v.cuda(),
                    (w.q_norm.cuda(), w.k_norm.cuda()),
                    w.inv_freq.cuda(),
                    w.eps,
                    (k_pool.cuda_mut(), v_pool.cuda_mut()),
                    (ix.pos.cuda(), ix.table.cuda(), ix.max_blocks, ix.block_size),
                    (hq, hkv),
                ),
                "attention_decode_prep",
            );
            return (Tensor::from_cuda(q, &[t, hq, d]), Tensor::from_cuda(gate, &[t, hq * d]));
        }
    }
    let [q, gate]: [Tensor; 2] = split_last(qg, &[d, d]).try_into().expect("two halves");
    let mut q = rms_norm(&q, w.q_norm, w.eps, 1.0, p);
    let mut k = rms_norm(k, w.k_norm, w.eps, 1.0, p);
    rope_at(&mut q, w.inv_freq, ix.pos, p);
    rope_at(&mut k, w.inv_freq, ix.pos, p);
    kv_write(&k, v, k_pool, v_pool, ix);
    (q, gate.reshape(&[t, hq * d]))
}

/// `residual + x · Wᵀ` for a W4A16 NVFP4 weight with the add in the tensor-core GEMV's
/// epilogue (a decoder layer's `h + down_proj(·)`); `None` when that GEMV does not apply (the
/// caller adds). The same floats as the linear then [`super::add`].
#[cfg(feature = "cuda")]
pub fn nvfp4_linear_add(x: &Tensor, q: &crate::cuda::GpuNvfp4, residual: &Tensor) -> Option<Tensor> {
    let g = gpu();
    let t = x.rows();
    if x.row_len() != q.cols || residual.elem_count() != t * q.rows || !g.mma_gemv_applies(t, q) {
        return None;
    }
    let y = with_gemv_input(x, |a| ok(g.nvfp4_mma_gemv_add(a, q, residual.cuda()), "linear"));
    Some(Tensor::from_cuda(y, residual.shape()))
}
