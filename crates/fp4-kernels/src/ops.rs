//! Tensor-level ops: check shapes, then dispatch on storage. The model calls only these.
//! Shape mismatches here are programming errors (the model builds every shape from a validated
//! config), so they panic with the shapes involved rather than returning errors.

pub use crate::cpu::{rope_inv_freq, GdnDims};
use crate::{cpu, Precision, Storage, Tensor};

fn check(cond: bool, op: &str, msg: impl FnOnce() -> String) {
    assert!(cond, "{op}: {}", msg());
}

/// `x [T, in] · wᵀ` with `w [out, in]`, plus an optional bias `[out]`.
pub fn linear(x: &Tensor, w: &Tensor, bias: Option<&Tensor>, p: Precision) -> Tensor {
    let (n_out, n_in) = (w.shape()[0], w.shape()[1]);
    check(x.row_len() == n_in, "linear", || format!("x {:?} vs w {:?}", x.shape(), w.shape()));
    match (x.storage(), w.storage()) {
        (Storage::Cpu(xs), Storage::Cpu(ws)) => {
            Tensor::from_vec(cpu::linear(xs, ws, bias.map(Tensor::as_slice), n_in, n_out, p), &[x.rows(), n_out])
        }
    }
}

/// Rows of `x` looked up in `table [vocab, hidden]` (ids already validated against vocab).
pub fn embedding(table: &Tensor, ids: &[u32]) -> Tensor {
    let h = table.shape()[1];
    let t = table.as_slice();
    let mut out = Vec::with_capacity(ids.len() * h);
    for &id in ids {
        out.extend_from_slice(&t[id as usize * h..(id as usize + 1) * h]);
    }
    Tensor::from_vec(out, &[ids.len(), h])
}

/// RMSNorm over the last dimension of `x` (`w.len()`); `offset` 1 gives (1+w).
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f32, offset: f32, p: Precision) -> Tensor {
    check(x.elem_count().is_multiple_of(w.elem_count()), "rms_norm", || format!("x {:?} w {:?}", x.shape(), w.shape()));
    Tensor::from_vec(cpu::rms_norm(x.as_slice(), w.as_slice(), eps, offset, p), x.shape())
}

/// Gated RMSNorm over rows of `w.len()` (per GDN value head), gate `z` shaped like `x`.
pub fn rms_norm_gated(x: &Tensor, z: &Tensor, w: &Tensor, eps: f32, p: Precision) -> Tensor {
    check(x.shape() == z.shape(), "rms_norm_gated", || format!("x {:?} z {:?}", x.shape(), z.shape()));
    Tensor::from_vec(cpu::rms_norm_gated(x.as_slice(), z.as_slice(), w.as_slice(), eps, p), x.shape())
}

pub fn silu_mul(gate: &Tensor, up: &Tensor, p: Precision) -> Tensor {
    check(gate.shape() == up.shape(), "silu_mul", || format!("{:?} vs {:?}", gate.shape(), up.shape()));
    Tensor::from_vec(cpu::silu_mul(gate.as_slice(), up.as_slice(), p), gate.shape())
}

pub fn sigmoid_gate(x: &Tensor, gate: &Tensor, p: Precision) -> Tensor {
    check(x.elem_count() == gate.elem_count(), "sigmoid_gate", || format!("{:?} vs {:?}", x.shape(), gate.shape()));
    Tensor::from_vec(cpu::sigmoid_gate(x.as_slice(), gate.as_slice(), p), x.shape())
}

pub fn add(a: &Tensor, b: &Tensor, p: Precision) -> Tensor {
    check(a.shape() == b.shape(), "add", || format!("{:?} vs {:?}", a.shape(), b.shape()));
    Tensor::from_vec(cpu::add(a.as_slice(), b.as_slice(), p), a.shape())
}

/// Splits the last dimension into consecutive pieces of the given widths (e.g. `[q | k | v]`).
pub fn split_last(x: &Tensor, widths: &[usize]) -> Vec<Tensor> {
    let last = *x.shape().last().expect("split_last of a scalar");
    check(widths.iter().sum::<usize>() == last, "split_last", || format!("{widths:?} vs {:?}", x.shape()));
    let rows = x.elem_count() / last;
    let mut outs: Vec<Vec<f32>> = widths.iter().map(|w| Vec::with_capacity(rows * w)).collect();
    for row in x.as_slice().chunks_exact(last) {
        let mut off = 0;
        for (out, &w) in outs.iter_mut().zip(widths) {
            out.extend_from_slice(&row[off..off + w]);
            off += w;
        }
    }
    outs.into_iter()
        .zip(widths)
        .map(|(data, &w)| {
            let mut shape = x.shape().to_vec();
            *shape.last_mut().unwrap() = w;
            Tensor::from_vec(data, &shape)
        })
        .collect()
}

/// β and g of a GDN layer from its `b, a [T, Hv]` projections and per-head `A_log`, `dt_bias`.
pub fn gdn_gates(b: &Tensor, a: &Tensor, a_log: &Tensor, dt_bias: &Tensor, p: Precision) -> (Tensor, Tensor) {
    check(b.shape() == a.shape() && a.row_len() == a_log.elem_count(), "gdn_gates", || {
        format!("b {:?} a {:?} A_log {:?}", b.shape(), a.shape(), a_log.shape())
    });
    let (beta, g) = cpu::gdn_gates(b.as_slice(), a.as_slice(), a_log.as_slice(), dt_bias.as_slice(), p);
    (Tensor::from_vec(beta, b.shape()), Tensor::from_vec(g, a.shape()))
}

/// Appends the rows of `b` after the rows of `a` (same row shape).
pub fn cat_rows(a: &Tensor, b: &Tensor) -> Tensor {
    check(a.shape()[1..] == b.shape()[1..], "cat_rows", || format!("{:?} vs {:?}", a.shape(), b.shape()));
    let mut data = a.as_slice().to_vec();
    data.extend_from_slice(b.as_slice());
    let mut shape = a.shape().to_vec();
    shape[0] += b.rows();
    Tensor::from_vec(data, &shape)
}

/// The last row of `x` as a `[1, ...]` tensor.
pub fn last_row(x: &Tensor) -> Tensor {
    let n = x.row_len();
    let mut shape = x.shape().to_vec();
    shape[0] = 1;
    Tensor::from_vec(x.as_slice()[x.elem_count() - n..].to_vec(), &shape)
}

/// In-place rotate-half RoPE on `x [T, heads, head_dim]` starting at position `pos0`.
pub fn rope(x: &mut Tensor, inv_freq: &[f32], pos0: usize, p: Precision) {
    let (heads, head_dim) = (x.shape()[1], x.shape()[2]);
    check(2 * inv_freq.len() <= head_dim, "rope", || {
        format!("rotary dim {} > head dim {head_dim}", 2 * inv_freq.len())
    });
    cpu::rope(x.as_mut_slice(), heads, head_dim, inv_freq, pos0, p);
}

/// Causal depthwise conv + SiLU on `x [T, C]`, continuing from `state [K-1, C]` (updated).
pub fn causal_conv1d_silu(x: &Tensor, state: &mut Tensor, w: &Tensor, p: Precision) -> Tensor {
    let c = x.shape()[1];
    check(w.shape()[0] == c && state.shape() == [w.shape()[1] - 1, c], "causal_conv1d", || {
        format!("x {:?} state {:?} w {:?}", x.shape(), state.shape(), w.shape())
    });
    Tensor::from_vec(cpu::causal_conv1d_silu(x.as_slice(), state.as_mut_slice(), w.as_slice(), c, p), x.shape())
}

/// How the delta rule walks the sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GdnAlgo {
    /// Chunks of 64 tokens with a triangular solve inside each (prefill).
    Chunked,
    /// One token at a time (decode).
    Recurrent,
}

/// Gated delta rule over `q, k [T, Hk·dk]`, `v [T, Hv·dv]`, `g, beta [T, Hv]`, from and into
/// `state [Hv, dk, dv]` (f32). Returns `o [T, Hv, dv]` in f32.
#[allow(clippy::too_many_arguments)]
pub fn gated_delta_rule(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    g: &Tensor,
    beta: &Tensor,
    state: &mut Tensor,
    d: GdnDims,
    algo: GdnAlgo,
) -> Tensor {
    let t = q.rows();
    check(
        q.elem_count() == t * d.key_heads * d.key_dim
            && k.elem_count() == q.elem_count()
            && v.elem_count() == t * d.value_heads * d.value_dim
            && g.elem_count() == t * d.value_heads
            && beta.elem_count() == g.elem_count()
            && state.elem_count() == d.value_heads * d.key_dim * d.value_dim,
        "gated_delta_rule",
        || {
            format!(
                "q {:?} k {:?} v {:?} g {:?} state {:?} dims {d:?}",
                q.shape(),
                k.shape(),
                v.shape(),
                g.shape(),
                state.shape()
            )
        },
    );
    let f = match algo {
        GdnAlgo::Chunked => cpu::gdn_chunked,
        GdnAlgo::Recurrent => cpu::gdn_recurrent,
    };
    let x =
        cpu::GdnInputs { q: q.as_slice(), k: k.as_slice(), v: v.as_slice(), g: g.as_slice(), beta: beta.as_slice() };
    let o = f(x, state.as_mut_slice(), d);
    Tensor::from_vec(o, &[t, d.value_heads, d.value_dim])
}

/// Causal GQA attention of `q [T, Hq, D]` over `k, v [L, Hkv, D]` (the queries are the last T).
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f32, p: Precision) -> Tensor {
    let (hq, d) = (q.shape()[1], q.shape()[2]);
    let hkv = k.shape()[1];
    check(k.shape() == v.shape() && k.shape()[2] == d && hq % hkv == 0 && k.rows() >= q.rows(), "attention", || {
        format!("q {:?} k {:?} v {:?}", q.shape(), k.shape(), v.shape())
    });
    let dims = cpu::AttnDims { q_heads: hq, kv_heads: hkv, head_dim: d };
    Tensor::from_vec(cpu::attention(q.as_slice(), k.as_slice(), v.as_slice(), dims, scale, p), q.shape())
}
