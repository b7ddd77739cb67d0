//! Tensor-level ops: check shapes, then dispatch on storage. The model calls only these.
//! Shape mismatches here are programming errors (the model builds every shape from a validated
//! config), so they panic with the shapes involved rather than returning errors. On the GPU the
//! ops compute in f32 (`Precision::Bf16` is a CPU-only reference mode); a failing CUDA call (out
//! of device memory) panics with the driver's message.

pub use crate::contract::{Binary, GdnAlgo};
pub use crate::cpu::{rope_inv_freq, GdnDims, SampleParams};
pub use fused::*;

mod fused;
use crate::{cpu, Precision, Storage, Tensor};

fn check(cond: bool, op: &str, msg: impl FnOnce() -> String) {
    assert!(cond, "{op}: {}", msg());
}

#[cfg(feature = "cuda")]
use crate::cuda::{self, gpu};

/// Unwraps a CUDA result inside an op.
#[cfg(feature = "cuda")]
fn ok<T>(r: cuda::Result<T>, op: &str) -> T {
    r.unwrap_or_else(|e| panic!("{op} on the GPU: {e}"))
}

/// `x [T, in] · wᵀ` with `w [out, in]`, plus an optional bias `[out]`.
pub fn linear(x: &Tensor, w: &Tensor, bias: Option<&Tensor>, p: Precision) -> Tensor {
    let (n_out, n_in) = (w.shape()[0], w.shape()[1]);
    check(x.row_len() == n_in, "linear", || format!("x {:?} vs w {:?}", x.shape(), w.shape()));
    match x.storage() {
        Storage::Cpu(xs) => Tensor::from_vec(
            cpu::linear(xs, w.as_slice(), bias.map(Tensor::as_slice), n_in, n_out, p),
            &[x.rows(), n_out],
        ),
        #[cfg(feature = "cuda")]
        Storage::Cuda(xs) => {
            let mut y = ok(gpu().linear_f32(xs, x.rows(), w.cuda(), n_out, n_in), "linear");
            if let Some(b) = bias {
                ok(gpu().add_bias(&mut y, b.cuda()), "linear bias");
            }
            Tensor::from_cuda(y, &[x.rows(), n_out])
        }
    }
}

/// `x [T, in] · Wᵀ (+ bias)` for a weight held on the GPU (bf16 or NVFP4), the input first
/// multiplied per channel by AWQ's `pre_quant_scale` when there is one, then quantized when the
/// layer quantizes activations (`act`: W4A4 on FP4 tensor cores, or FP8 W8A8).
#[cfg(feature = "cuda")]
pub fn linear_gpu(
    x: &Tensor,
    w: &cuda::GpuWeight,
    bias: Option<&Tensor>,
    pre_quant_scale: Option<&Tensor>,
    act: Option<cuda::ActQuant>,
) -> Tensor {
    use cuda::{ActQuant, GpuWeight};
    check(x.row_len() == w.cols(), "linear", || format!("x {:?} vs w [{}, {}]", x.shape(), w.rows(), w.cols()));
    let g = gpu();
    let t = x.rows();
    let scaled = pre_quant_scale.map(|s| ok(g.mul_cols(x.cuda(), s.cuda()), "pre_quant_scale"));
    let input = scaled.as_ref().unwrap_or(x.cuda());
    let mut y = match (act, w) {
        (Some(ActQuant::Nvfp4 { input_scale }), GpuWeight::Nvfp4(q)) => {
            ok(g.linear_w4a4(input, t, q, input_scale), "W4A4 linear")
        }
        (Some(ActQuant::Fp8 { input_scale }), _) => {
            let xq = ok(g.fake_quant_fp8(input, t * w.cols(), input_scale), "W8A8 activations");
            ok(g.linear(&xq, t, w), "linear")
        }
        (None, GpuWeight::Nvfp4(q)) if scaled.is_none() && g.mma_gemv_applies(t, q) => {
            with_gemv_input(x, |a| ok(g.nvfp4_mma_gemv_on(a, q), "linear"))
        }
        _ => ok(g.linear(input, t, w), "linear"),
    };
    if let Some(b) = bias {
        ok(g.add_bias(&mut y, b.cuda()), "linear bias");
    }
    Tensor::from_cuda(y, &[t, w.rows()])
}

/// `x [T, in]` through several W4A16 NVFP4 weights held on the GPU (one input: q/k/v, gate/up),
/// the activations converted once for all of them. `None` when the tensor-core GEMV does not
/// apply (too many tokens, exact mode, a width it cannot take): run the linears one by one.
#[cfg(feature = "cuda")]
pub fn nvfp4_same_input(x: &Tensor, ws: &[&cuda::GpuNvfp4]) -> Option<Vec<Tensor>> {
    let g = gpu();
    let t = x.rows();
    if ws.is_empty() || !ws.iter().all(|w| w.cols == x.row_len() && g.mma_gemv_applies(t, w)) {
        return None;
    }
    let ys = with_gemv_input(x, |a| ok(g.nvfp4_mma_gemv_group(a, ws), "linear"));
    Some(ys.into_iter().zip(ws).map(|(y, w)| Tensor::from_cuda(y, &[t, w.rows])).collect())
}

/// `x [T, in]` through two small bf16 weights held on the GPU (the GDN's in_proj_b and
/// in_proj_a) in one launch, each output what [`cuda::Gpu::linear`] gives alone. `None` when
/// the row-block GEMV does not take both: run the linears one by one.
#[cfg(feature = "cuda")]
pub fn bf16_small_pair(x: &Tensor, ws: [&cuda::GpuWeight; 2]) -> Option<[Tensor; 2]> {
    let t = x.rows();
    if !matches!(x.storage(), Storage::Cuda(_)) || ws.iter().any(|w| w.cols() != x.row_len()) {
        return None;
    }
    let ys = ok(gpu().bf16_small_pair(x.cuda(), t, ws), "linear")?;
    let [a, b] = ys;
    Some([Tensor::from_cuda(a, &[t, ws[0].rows()]), Tensor::from_cuda(b, &[t, ws[1].rows()])])
}

/// `f` on `x [T, K]` in the tensor-core GEMV's input format: the copy its producer attached,
/// else converted here.
#[cfg(feature = "cuda")]
fn with_gemv_input<R>(x: &Tensor, f: impl FnOnce(&cuda::MmaActivations) -> R) -> R {
    match x.gemv_input() {
        Some(a) => f(a),
        None => f(&ok(gpu().mma_activations(x.cuda(), x.rows(), x.row_len()), "linear activations")),
    }
}

/// Rows of `x` looked up in `table [vocab, hidden]` (ids already validated against vocab).
pub fn embedding(table: &Tensor, ids: &[u32]) -> Tensor {
    let h = table.shape()[1];
    match table.storage() {
        Storage::Cpu(t) => {
            let mut out = Vec::with_capacity(ids.len() * h);
            for &id in ids {
                out.extend_from_slice(&t[id as usize * h..(id as usize + 1) * h]);
            }
            Tensor::from_vec(out, &[ids.len(), h])
        }
        #[cfg(feature = "cuda")]
        Storage::Cuda(t) => Tensor::from_cuda(ok(gpu().embedding(t, h, ids), "embedding"), &[ids.len(), h]),
    }
}

/// RMSNorm over the last dimension of `x` (`w.len()`); `offset` 1 gives (1+w).
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f32, offset: f32, p: Precision) -> Tensor {
    check(x.elem_count().is_multiple_of(w.elem_count()), "rms_norm", || format!("x {:?} w {:?}", x.shape(), w.shape()));
    match x.storage() {
        Storage::Cpu(xs) => Tensor::from_vec(cpu::rms_norm(xs, w.as_slice(), eps, offset, p), x.shape()),
        #[cfg(feature = "cuda")]
        Storage::Cuda(xs) => {
            // A whole-row norm feeds a linear: write its GEMV input too when that applies.
            if w.elem_count() == x.row_len() {
                if let Some((y, a)) = ok(gpu().rms_norm_f16(xs, w.cuda(), eps, offset), "rms_norm") {
                    return Tensor::from_cuda(y, x.shape()).with_gemv_input(a);
                }
            }
            Tensor::from_cuda(ok(gpu().rms_norm(xs, w.cuda(), eps, offset), "rms_norm"), x.shape())
        }
    }
}

/// Gated RMSNorm over rows of `w.len()` (per GDN value head), gate `z` shaped like `x`.
pub fn rms_norm_gated(x: &Tensor, z: &Tensor, w: &Tensor, eps: f32, p: Precision) -> Tensor {
    check(x.shape() == z.shape(), "rms_norm_gated", || format!("x {:?} z {:?}", x.shape(), z.shape()));
    match x.storage() {
        Storage::Cpu(xs) => Tensor::from_vec(cpu::rms_norm_gated(xs, z.as_slice(), w.as_slice(), eps, p), x.shape()),
        #[cfg(feature = "cuda")]
        Storage::Cuda(xs) => {
            Tensor::from_cuda(ok(gpu().rms_norm_gated(xs, z.cuda(), w.cuda(), eps), "rms_norm_gated"), x.shape())
        }
    }
}

/// An element-wise op of two same-size tensors: the CPU function or the GPU kernel.
fn binary(a: &Tensor, b: &Tensor, op: Binary, p: Precision) -> Tensor {
    match a.storage() {
        Storage::Cpu(av) => {
            let f = match op {
                Binary::SiluMul => cpu::silu_mul,
                Binary::SigmoidGate => cpu::sigmoid_gate,
                Binary::Add => cpu::add,
            };
            Tensor::from_vec(f(av, b.as_slice(), p), a.shape())
        }
        #[cfg(feature = "cuda")]
        Storage::Cuda(av) => {
            // SwiGLU's and the attention gate's outputs feed a linear: their GEMV input too.
            if a.shape().len() == 2 {
                if let Some((y, x)) = ok(gpu().binary_f16(op, av, b.cuda(), a.row_len()), "element-wise op") {
                    return Tensor::from_cuda(y, a.shape()).with_gemv_input(x);
                }
            }
            Tensor::from_cuda(ok(gpu().binary(op, av, b.cuda()), "element-wise op"), a.shape())
        }
    }
}

pub fn silu_mul(gate: &Tensor, up: &Tensor, p: Precision) -> Tensor {
    check(gate.shape() == up.shape(), "silu_mul", || format!("{:?} vs {:?}", gate.shape(), up.shape()));
    binary(gate, up, Binary::SiluMul, p)
}

pub fn sigmoid_gate(x: &Tensor, gate: &Tensor, p: Precision) -> Tensor {
    check(x.elem_count() == gate.elem_count(), "sigmoid_gate", || format!("{:?} vs {:?}", x.shape(), gate.shape()));
    binary(x, gate, Binary::SigmoidGate, p)
}

pub fn add(a: &Tensor, b: &Tensor, p: Precision) -> Tensor {
    check(a.shape() == b.shape(), "add", || format!("{:?} vs {:?}", a.shape(), b.shape()));
    binary(a, b, Binary::Add, p)
}

/// `(h + delta, rms_norm(h + delta))`: a decoder layer's residual add and the norm after it,
/// one kernel on the GPU. The same values as [`add`] then [`rms_norm`].
pub fn add_rms_norm(h: &Tensor, delta: &Tensor, w: &Tensor, eps: f32, offset: f32, p: Precision) -> (Tensor, Tensor) {
    check(h.shape() == delta.shape(), "add_rms_norm", || format!("{:?} vs {:?}", h.shape(), delta.shape()));
    match (h.storage(), delta.storage()) {
        #[cfg(feature = "cuda")]
        (Storage::Cuda(hs), Storage::Cuda(ds)) => {
            if w.elem_count() == h.row_len() {
                if let Some((sum, y, a)) = ok(gpu().add_rms_norm_f16(hs, ds, w.cuda(), eps, offset), "add_rms_norm") {
                    return (Tensor::from_cuda(sum, h.shape()), Tensor::from_cuda(y, h.shape()).with_gemv_input(a));
                }
            }
            let (sum, y) = ok(gpu().add_rms_norm(hs, ds, w.cuda(), eps, offset), "add_rms_norm");
            (Tensor::from_cuda(sum, h.shape()), Tensor::from_cuda(y, h.shape()))
        }
        _ => {
            let sum = add(h, delta, p);
            let y = rms_norm(&sum, w, eps, offset, p);
            (sum, y)
        }
    }
}

/// Splits the last dimension into consecutive pieces of the given widths (e.g. `[q | k | v]`).
pub fn split_last(x: &Tensor, widths: &[usize]) -> Vec<Tensor> {
    let last = *x.shape().last().expect("split_last of a scalar");
    check(widths.iter().sum::<usize>() == last, "split_last", || format!("{widths:?} vs {:?}", x.shape()));
    let piece_shape = |w: usize| {
        let mut shape = x.shape().to_vec();
        *shape.last_mut().unwrap() = w;
        shape
    };
    #[cfg(feature = "cuda")]
    if let Storage::Cuda(xs) = x.storage() {
        let offsets = widths.iter().scan(0, |off, &w| {
            *off += w;
            Some(*off - w)
        });
        return offsets
            .zip(widths)
            .map(|(off, &w)| Tensor::from_cuda(ok(gpu().copy_cols(xs, last, off, w), "split_last"), &piece_shape(w)))
            .collect();
    }
    let rows = x.elem_count() / last;
    let mut outs: Vec<Vec<f32>> = widths.iter().map(|w| Vec::with_capacity(rows * w)).collect();
    for row in x.as_slice().chunks_exact(last) {
        let mut off = 0;
        for (out, &w) in outs.iter_mut().zip(widths) {
            out.extend_from_slice(&row[off..off + w]);
            off += w;
        }
    }
    outs.into_iter().zip(widths).map(|(data, &w)| Tensor::from_vec(data, &piece_shape(w))).collect()
}

/// β and g of a GDN layer from its `b, a [T, Hv]` projections and per-head `A_log`, `dt_bias`.
pub fn gdn_gates(b: &Tensor, a: &Tensor, a_log: &Tensor, dt_bias: &Tensor, p: Precision) -> (Tensor, Tensor) {
    check(b.shape() == a.shape() && a.row_len() == a_log.elem_count(), "gdn_gates", || {
        format!("b {:?} a {:?} A_log {:?}", b.shape(), a.shape(), a_log.shape())
    });
    match b.storage() {
        Storage::Cpu(bs) => {
            let (beta, g) = cpu::gdn_gates(bs, a.as_slice(), a_log.as_slice(), dt_bias.as_slice(), p);
            (Tensor::from_vec(beta, b.shape()), Tensor::from_vec(g, a.shape()))
        }
        #[cfg(feature = "cuda")]
        Storage::Cuda(bs) => {
            let (beta, g) = ok(gpu().gdn_gates(bs, a.cuda(), a_log.cuda(), dt_bias.cuda()), "gdn_gates");
            (Tensor::from_cuda(beta, b.shape()), Tensor::from_cuda(g, a.shape()))
        }
    }
}

/// Appends the rows of `b` after the rows of `a` (same row shape).
pub fn cat_rows(a: &Tensor, b: &Tensor) -> Tensor {
    check(a.shape()[1..] == b.shape()[1..], "cat_rows", || format!("{:?} vs {:?}", a.shape(), b.shape()));
    let mut shape = a.shape().to_vec();
    shape[0] += b.rows();
    match a.storage() {
        Storage::Cpu(av) => {
            let mut data = av.clone();
            data.extend_from_slice(b.as_slice());
            Tensor::from_vec(data, &shape)
        }
        #[cfg(feature = "cuda")]
        Storage::Cuda(av) => Tensor::from_cuda(ok(gpu().concat(av, b.cuda()), "cat_rows"), &shape),
    }
}

/// `[a | b]` row by row: `a [T, m]` and `b [T, n]` → `[T, m + n]` (the MTP head's input). GPU
/// tensors go through the host (the MTP head runs in the CPU reference for now).
pub fn cat_cols(a: &Tensor, b: &Tensor) -> Tensor {
    let two_d = |t: &Tensor| t.shape().len() == 2 && t.row_len() > 0;
    check(two_d(a) && two_d(b) && a.rows() == b.rows(), "cat_cols", || format!("{:?} vs {:?}", a.shape(), b.shape()));
    let (m, n) = (a.row_len(), b.row_len());
    #[cfg(feature = "cuda")]
    if let Storage::Cuda(xa) = a.storage() {
        return Tensor::from_cuda(ok(gpu().cat_cols(xa, m, b.cuda(), n), "cat_cols"), &[a.rows(), m + n]);
    }
    let mut out = Vec::with_capacity(a.elem_count() + b.elem_count());
    for (ra, rb) in a.as_slice().chunks_exact(m).zip(b.as_slice().chunks_exact(n)) {
        out.extend_from_slice(ra);
        out.extend_from_slice(rb);
    }
    Tensor::from_vec(out, &[a.rows(), m + n])
}

/// The last row of `x` as a `[1, ...]` tensor.
pub fn last_row(x: &Tensor) -> Tensor {
    let n = x.row_len();
    let mut shape = x.shape().to_vec();
    shape[0] = 1;
    match x.storage() {
        Storage::Cpu(xs) => Tensor::from_vec(xs[x.elem_count() - n..].to_vec(), &shape),
        #[cfg(feature = "cuda")]
        Storage::Cuda(xs) => Tensor::from_cuda(ok(gpu().copy_range(xs, x.elem_count() - n, n), "last_row"), &shape),
    }
}

/// In-place rotate-half RoPE on `x [T, heads, head_dim]` starting at position `pos0`;
/// `inv_freq` (`rotary_dim / 2` entries) lives on the same device as `x`.
pub fn rope(x: &mut Tensor, inv_freq: &Tensor, pos0: usize, p: Precision) {
    let (heads, head_dim) = (x.shape()[1], x.shape()[2]);
    check(2 * inv_freq.elem_count() <= head_dim, "rope", || {
        format!("rotary dim {} > head dim {head_dim}", 2 * inv_freq.elem_count())
    });
    match x.device() {
        crate::Device::Cpu => cpu::rope(x.as_mut_slice(), heads, head_dim, inv_freq.as_slice(), pos0, p),
        #[cfg(feature = "cuda")]
        crate::Device::Cuda => ok(gpu().rope(x.cuda_mut(), inv_freq.cuda(), heads, head_dim, pos0), "rope"),
        #[cfg(not(feature = "cuda"))]
        crate::Device::Cuda => unreachable!("GPU tensors need the cuda feature"),
    }
}

/// Causal depthwise conv + SiLU on `x [T, C]`, continuing from `state [K-1, C]` (updated).
pub fn causal_conv1d_silu(x: &Tensor, state: &mut Tensor, w: &Tensor, p: Precision) -> Tensor {
    let c = x.shape()[1];
    check(w.shape()[0] == c && state.shape() == [w.shape()[1] - 1, c], "causal_conv1d", || {
        format!("x {:?} state {:?} w {:?}", x.shape(), state.shape(), w.shape())
    });
    match x.storage() {
        Storage::Cpu(xs) => {
            Tensor::from_vec(cpu::causal_conv1d_silu(xs, state.as_mut_slice(), w.as_slice(), c, p), x.shape())
        }
        #[cfg(feature = "cuda")]
        Storage::Cuda(xs) => Tensor::from_cuda(
            ok(gpu().causal_conv1d_silu(xs, state.cuda_mut(), w.cuda(), c), "causal_conv1d"),
            x.shape(),
        ),
    }
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
    #[cfg(feature = "cuda")]
    if let Storage::Cuda(qs) = q.storage() {
        let o = gpu().gated_delta_rule(qs, k.cuda(), v.cuda(), g.cuda(), beta.cuda(), state.cuda_mut(), d, t, algo);
        let o = ok(o, "gated_delta_rule");
        return Tensor::from_cuda(o, &[t, d.value_heads, d.value_dim]);
    }
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
    match q.storage() {
        Storage::Cpu(qs) => Tensor::from_vec(cpu::attention(qs, k.as_slice(), v.as_slice(), dims, scale, p), q.shape()),
        #[cfg(feature = "cuda")]
        Storage::Cuda(qs) => Tensor::from_cuda(
            ok(gpu().attention(qs, k.cuda(), v.cuda(), q.rows(), k.rows(), dims, scale), "attention"),
            q.shape(),
        ),
    }
}

/// A token from the logits row `[vocab]` or `[1, vocab]` with the draw `u` (see [`cpu::sample`]);
/// on the GPU only the chosen id comes back to the host.
pub fn sample(logits: &Tensor, p: SampleParams, u: f32) -> u32 {
    match logits.storage() {
        Storage::Cpu(l) => cpu::sample(l, p, u),
        #[cfg(feature = "cuda")]
        Storage::Cuda(l) => ok(gpu().sample(l, p, u), "sample"),
    }
}

/// Words per row of [`sample_rows`]' controls.
pub const SAMPLE_CONTROLS: usize = 5;

/// One row's controls for [`sample_rows`]: the parameters and the draw `u` its sampler made
/// (temperature, top_k, top_p, min_p, u; the floats as their bits).
pub fn sample_controls(p: SampleParams, u: f32) -> [u32; SAMPLE_CONTROLS] {
    let k = p.top_k.min(i32::MAX as usize) as u32;
    [p.temperature.to_bits(), k, p.top_p.to_bits(), p.min_p.to_bits(), u.to_bits()]
}

/// A token for each row of `logits [B, vocab]` by its own controls (`controls` rows of
/// [`sample_controls`]) into `out[..B]`, on the logits' device: row by row what [`sample`] picks
/// (greedy rows their argmax), with only the ids left on the device.
pub fn sample_rows(logits: &Tensor, controls: &Ids, out: &mut Ids) {
    let (rows, n) = (logits.rows(), logits.row_len());
    check(controls.len() >= rows * SAMPLE_CONTROLS && out.len() >= rows, "sample_rows", || {
        format!("{rows} rows, {} control words, {} outputs", controls.len(), out.len())
    });
    match logits.storage() {
        Storage::Cpu(l) => {
            let c = controls.as_slice();
            let ids: Vec<u32> = l
                .chunks(n)
                .zip(c.chunks(SAMPLE_CONTROLS))
                .map(|(row, c)| {
                    let f = f32::from_bits;
                    let p = SampleParams { temperature: f(c[0]), top_k: c[1] as usize, top_p: f(c[2]), min_p: f(c[3]) };
                    cpu::sample(row, p, f(c[4]))
                })
                .collect();
            out.write(&ids);
        }
        #[cfg(feature = "cuda")]
        Storage::Cuda(l) => ok(gpu().sample_rows(l, n, controls.cuda(), out.cuda_mut()), "sample_rows"),
    }
}

/// The distribution [`sample`] draws from for one row of logits (`cpu::sample_probs`): on the
/// GPU greedy stays there (only the id comes back), other controls read the row on the host.
pub fn sample_probs(logits: &Tensor, p: SampleParams) -> Vec<(u32, f64)> {
    match logits.storage() {
        Storage::Cpu(l) => cpu::sample_probs(l, p),
        #[cfg(feature = "cuda")]
        Storage::Cuda(_) if p.temperature == 0.0 => vec![(sample(logits, p, 0.0), 1.0)],
        #[cfg(feature = "cuda")]
        Storage::Cuda(_) => cpu::sample_probs(&logits.to_vec(), p),
    }
}

// ---- Decode over a batch of sequences (one token each) with state in pools ----
//
// The per-step values (positions, pool slots, KV block tables) are `Ids`, so on the GPU they stay
// in device buffers a captured graph reads on every replay. The CPU branches are the references:
// each sequence gathered and run through the single-sequence CPU ops above.

/// Where each row of a decode batch keeps its state: `pos[r]` (its position, = tokens cached
/// before it), `table[r·max_blocks ..]` (its sequence's KV block ids), and its sequence's GDN
/// state ([`GdnSlots`]: `slots`, `slots_out`, `rows_per_seq`). A plain decode step has one row
/// per sequence updating its slot in place (`slots_out` = `slots`); a speculative verify has
/// `rows_per_seq` rows per sequence (consecutive), and keeps the GDN state after each. With
/// `max_blocks` 0 every row reads the same table: one sequence's rows (a prefilled cache moving
/// into the pools through [`kv_write`]).
#[derive(Debug, Clone, Copy)]
pub struct BatchIndex<'a> {
    pub pos: &'a Ids,
    pub slots: &'a Ids,
    pub slots_out: &'a Ids,
    pub rows_per_seq: usize,
    pub table: &'a Ids,
    pub max_blocks: usize,
    pub block_size: usize,
}

impl<'a> BatchIndex<'a> {
    /// The GDN slots of the batch.
    pub fn gdn_slots(&self) -> GdnSlots<'a> {
        GdnSlots { read: self.slots, write: self.slots_out, rows_per_seq: self.rows_per_seq }
    }
}

/// The GDN state of a decode batch: sequence b's state is read from slot `read[b]`, takes the
/// batch's rows `b·R .. (b+1)·R` (R = `rows_per_seq`) in order, and the state after row r is
/// written to slot `write[r]`.
#[derive(Debug, Clone, Copy)]
pub struct GdnSlots<'a> {
    pub read: &'a Ids,
    pub write: &'a Ids,
    pub rows_per_seq: usize,
}

impl<'a> GdnSlots<'a> {
    /// One row per sequence, each slot updated in place.
    pub fn in_place(slots: &'a Ids) -> GdnSlots<'a> {
        GdnSlots { read: slots, write: slots, rows_per_seq: 1 }
    }

    /// Whether `rows` rows fit: a whole number of sequences, with a slot to read for each and one
    /// to write for each row.
    fn fits(&self, rows: usize) -> bool {
        self.rows_per_seq >= 1
            && rows.is_multiple_of(self.rows_per_seq)
            && self.read.len() >= rows / self.rows_per_seq
            && self.write.len() >= rows
    }

    /// The CPU reference's walk: for each sequence, its state (`per` floats of `pool` at its read
    /// slot) is copied out, `f(row, state)` runs its rows in order on the copy, and after each
    /// row the copy is stored at that row's write slot.
    fn walk_cpu(&self, rows: usize, pool: &mut [f32], per: usize, mut f: impl FnMut(usize, &mut [f32])) {
        let r_len = self.rows_per_seq;
        for b in 0..rows / r_len {
            let s = self.read.as_slice()[b] as usize;
            let mut state = pool[s * per..(s + 1) * per].to_vec();
            for row in b * r_len..(b + 1) * r_len {
                f(row, &mut state);
                let o = self.write.as_slice()[row] as usize;
                pool[o * per..(o + 1) * per].copy_from_slice(&state);
            }
        }
    }
}

use crate::Ids;

/// In-place RoPE on `x [B, heads, head_dim]`, token b at position `pos[b]`.
pub fn rope_at(x: &mut Tensor, inv_freq: &Tensor, pos: &Ids, p: Precision) {
    let (heads, head_dim) = (x.shape()[1], x.shape()[2]);
    check(pos.len() >= x.rows(), "rope_at", || format!("{} positions for {} tokens", pos.len(), x.rows()));
    match x.device() {
        crate::Device::Cpu => {
            let row = heads * head_dim;
            for (b, chunk) in x.as_mut_slice().chunks_mut(row).enumerate() {
                cpu::rope(chunk, heads, head_dim, inv_freq.as_slice(), pos.as_slice()[b] as usize, p);
            }
        }
        #[cfg(feature = "cuda")]
        crate::Device::Cuda => ok(gpu().rope_at(x.cuda_mut(), inv_freq.cuda(), pos.cuda(), heads, head_dim), "rope_at"),
        #[cfg(not(feature = "cuda"))]
        crate::Device::Cuda => unreachable!("GPU tensors need the cuda feature"),
    }
}

/// Row of the paged pool where token position `p` of table row `b` lives.
fn pool_row(ix: &BatchIndex, b: usize, p: usize) -> usize {
    ix.table.as_slice()[b * ix.max_blocks + p / ix.block_size] as usize * ix.block_size + p % ix.block_size
}

/// `k, v [B, Hkv, D]` into the paged pools `[blocks·block_size, Hkv, D]` at each token's position.
pub fn kv_write(k: &Tensor, v: &Tensor, k_pool: &mut Tensor, v_pool: &mut Tensor, ix: BatchIndex) {
    let row = k.row_len();
    check(k.shape() == v.shape() && k_pool.row_len() == row && v_pool.shape() == k_pool.shape(), "kv_write", || {
        format!("k {:?} v {:?} pools {:?}", k.shape(), v.shape(), k_pool.shape())
    });
    match k.storage() {
        Storage::Cpu(ks) => {
            for b in 0..k.rows() {
                let r = pool_row(&ix, b, ix.pos.as_slice()[b] as usize);
                k_pool.as_mut_slice()[r * row..(r + 1) * row].copy_from_slice(&ks[b * row..(b + 1) * row]);
                v_pool.as_mut_slice()[r * row..(r + 1) * row].copy_from_slice(&v.as_slice()[b * row..(b + 1) * row]);
            }
        }
        #[cfg(feature = "cuda")]
        Storage::Cuda(ks) => ok(
            gpu().kv_write(
                ks,
                v.cuda(),
                k_pool.cuda_mut(),
                v_pool.cuda_mut(),
                ix.table.cuda(),
                ix.pos.cuda(),
                row,
                ix.max_blocks,
                ix.block_size,
            ),
            "kv_write",
        ),
    }
}

/// Decode attention: query b of `q [B, Hq, D]` over positions `0..=pos[b]` of its paged KV.
pub fn paged_attention(
    q: &Tensor,
    k_pool: &Tensor,
    v_pool: &Tensor,
    ix: BatchIndex,
    scale: f32,
    p: Precision,
) -> Tensor {
    let (hq, d) = (q.shape()[1], q.shape()[2]);
    let hkv = k_pool.shape()[1];
    check(k_pool.shape()[2] == d && hq % hkv == 0, "paged_attention", || {
        format!("q {:?} pool {:?}", q.shape(), k_pool.shape())
    });
    let dims = cpu::AttnDims { q_heads: hq, kv_heads: hkv, head_dim: d };
    match q.storage() {
        Storage::Cpu(qs) => {
            let row = hkv * d;
            let mut out = Vec::with_capacity(q.elem_count());
            for b in 0..q.rows() {
                let len = ix.pos.as_slice()[b] as usize + 1;
                let (mut ks, mut vs) = (Vec::with_capacity(len * row), Vec::with_capacity(len * row));
                for j in 0..len {
                    let r = pool_row(&ix, b, j);
                    ks.extend_from_slice(&k_pool.as_slice()[r * row..(r + 1) * row]);
                    vs.extend_from_slice(&v_pool.as_slice()[r * row..(r + 1) * row]);
                }
                out.extend(cpu::attention(&qs[b * hq * d..(b + 1) * hq * d], &ks, &vs, dims, scale, p));
            }
            Tensor::from_vec(out, q.shape())
        }
        #[cfg(feature = "cuda")]
        Storage::Cuda(qs) => {
            let o = gpu().paged_attention(
                qs,
                k_pool.cuda(),
                v_pool.cuda(),
                ix.table.cuda(),
                ix.pos.cuda(),
                dims,
                ix.max_blocks,
                ix.block_size,
                scale,
            );
            Tensor::from_cuda(ok(o, "paged_attention"), q.shape())
        }
    }
}

/// Causal-conv steps + SiLU: `x [rows, C]`, state `pool [slots·(K-1), C]` walked per sequence
/// by `slots` ([`GdnSlots`]), conv weight `w [C, K]`.
pub fn conv1d_step(x: &Tensor, pool: &mut Tensor, w: &Tensor, slots: GdnSlots, p: Precision) -> Tensor {
    let (c, k) = (x.shape()[1], w.shape()[1]);
    check(w.shape()[0] == c && pool.shape()[1] == c && slots.fits(x.rows()), "conv1d_step", || {
        format!("x {:?} pool {:?} w {:?} slots {slots:?}", x.shape(), pool.shape(), w.shape())
    });
    match x.storage() {
        Storage::Cpu(xs) => {
            let mut y = vec![0f32; xs.len()];
            slots.walk_cpu(x.rows(), pool.as_mut_slice(), (k - 1) * c, |r, state| {
                let out = cpu::causal_conv1d_silu(&xs[r * c..(r + 1) * c], state, w.as_slice(), c, p);
                y[r * c..(r + 1) * c].copy_from_slice(&out);
            });
            Tensor::from_vec(y, x.shape())
        }
        #[cfg(feature = "cuda")]
        Storage::Cuda(xs) => Tensor::from_cuda(
            ok(
                gpu().conv1d_step(
                    xs,
                    pool.cuda_mut(),
                    w.cuda(),
                    (slots.read.cuda(), slots.write.cuda(), slots.rows_per_seq),
                    c,
                ),
                "conv1d_step",
            ),
            x.shape(),
        ),
    }
}

/// Gated-delta-rule steps: `q, k [rows, Hk·dk]`, `v [rows, Hv·dv]`, `g, beta [rows, Hv]`, state
/// `pool [slots·Hv, dk, dv]` walked per sequence by `slots` ([`GdnSlots`]). Returns `o [rows, Hv, dv]`.
#[allow(clippy::too_many_arguments)]
pub fn gdn_step(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    g: &Tensor,
    beta: &Tensor,
    pool: &mut Tensor,
    slots: GdnSlots,
    d: GdnDims,
) -> Tensor {
    let b = q.rows();
    check(
        q.elem_count() == b * d.key_heads * d.key_dim
            && k.elem_count() == q.elem_count()
            && v.elem_count() == b * d.value_heads * d.value_dim
            && g.elem_count() == b * d.value_heads
            && beta.elem_count() == g.elem_count()
            && slots.fits(b),
        "gdn_step",
        || {
            format!(
                "q {:?} v {:?} g {:?} pool {:?} dims {d:?} slots {slots:?}",
                q.shape(),
                v.shape(),
                g.shape(),
                pool.shape()
            )
        },
    );
    let shape = [b, d.value_heads, d.value_dim];
    #[cfg(feature = "cuda")]
    if let Storage::Cuda(qs) = q.storage() {
        let ix = (slots.read.cuda(), slots.write.cuda(), slots.rows_per_seq);
        let o = gpu().gdn_step(qs, k.cuda(), v.cuda(), g.cuda(), beta.cuda(), pool.cuda_mut(), ix, d);
        return Tensor::from_cuda(ok(o, "gdn_step"), &shape);
    }
    let (qk, vw, hv) = (d.key_heads * d.key_dim, d.value_heads * d.value_dim, d.value_heads);
    let mut out = vec![0f32; b * vw];
    slots.walk_cpu(b, pool.as_mut_slice(), hv * d.key_dim * d.value_dim, |i, state| {
        let x = cpu::GdnInputs {
            q: &q.as_slice()[i * qk..(i + 1) * qk],
            k: &k.as_slice()[i * qk..(i + 1) * qk],
            v: &v.as_slice()[i * vw..(i + 1) * vw],
            g: &g.as_slice()[i * hv..(i + 1) * hv],
            beta: &beta.as_slice()[i * hv..(i + 1) * hv],
        };
        out[i * vw..(i + 1) * vw].copy_from_slice(&cpu::gdn_recurrent(x, state, d));
    });
    Tensor::from_vec(out, &shape)
}

/// Rows of `table [vocab, hidden]` for ids held on the table's device (validated by the caller).
pub fn embedding_ids(table: &Tensor, ids: &Ids) -> Tensor {
    match table.storage() {
        Storage::Cpu(_) => embedding(table, ids.as_slice()),
        #[cfg(feature = "cuda")]
        Storage::Cuda(t) => {
            let h = table.shape()[1];
            Tensor::from_cuda(ok(gpu().embedding_ids(t, h, ids.cuda()), "embedding"), &[ids.len(), h])
        }
    }
}

/// The argmax (first maximum) of each row of `logits [B, vocab]` into `out[..B]`, on the logits' device.
pub fn argmax_rows(logits: &Tensor, out: &mut Ids) {
    let n = logits.row_len();
    match logits.storage() {
        Storage::Cpu(l) => {
            let ids: Vec<u32> = l.chunks(n).map(|row| cpu::sample(row, greedy(), 0.0)).collect();
            out.write(&ids);
        }
        #[cfg(feature = "cuda")]
        Storage::Cuda(l) => ok(gpu().argmax_rows(l, n, out.cuda_mut()), "argmax"),
    }
}

fn greedy() -> SampleParams {
    SampleParams { temperature: 0.0, top_k: 0, top_p: 1.0, min_p: 0.0 }
}

/// `dst[start + stride·i] = src[i]` for every i (on their device): a batch's ids into every
/// `stride`-th row of a longer batch (the drafts into a speculative verify's rows).
pub fn write_ids_strided(dst: &mut Ids, src: &Ids, start: usize, stride: usize) {
    let n = src.len();
    check(stride >= 1 && (n == 0 || start + stride * (n - 1) < dst.len()), "write_ids_strided", || {
        format!("{n} ids from {start} by {stride} into {}", dst.len())
    });
    match src {
        Ids::Cpu(v) => {
            let mut d = dst.to_vec();
            for (i, &id) in v.iter().enumerate() {
                d[start + stride * i] = id;
            }
            dst.write(&d);
        }
        #[cfg(feature = "cuda")]
        Ids::Cuda(v) => ok(gpu().write_ids_strided(dst.cuda_mut(), v, start, stride), "write_ids_strided"),
    }
}

/// Greedy acceptance of a speculative verify on the device. Rows `b·(1+k) ..` of `ids` are
/// sequence b's input then its k drafts, of `best` the main model's argmax after each of them.
/// Sequence b keeps its drafts while each equals the model's choice before it (`m` of them) and
/// then takes `best[b·(1+k) + m]` (as [`crate::cpu::accept_greedy`] does). Writes, per sequence:
/// `head_ids` rows (the kept drafts, then the model's token repeated: the ids the MTP head reads
/// at each verified position), `picks[b] = b·(1+k) + m` (the row whose head output the next draft
/// starts from), and `out[b·(k+2) ..]` = its k drafts, m, the model's token. `force[b]` ≤ k
/// keeps that many drafts whatever they are (benchmarks of a given acceptance on random weights);
/// a larger value applies the rule.
pub fn accept_greedy_rows(
    ids: &Ids,
    best: &Ids,
    k: usize,
    force: &Ids,
    head_ids: &mut Ids,
    picks: &mut Ids,
    out: &mut Ids,
) {
    let n = picks.len();
    check(
        ids.len() == n * (k + 1)
            && best.len() >= n * (k + 1)
            && force.len() == n
            && head_ids.len() == n * (k + 1)
            && out.len() == n * (k + 2),
        "accept_greedy_rows",
        || {
            format!(
                "{n} sequences of {k} drafts: ids {}, best {}, head_ids {}, out {}",
                ids.len(),
                best.len(),
                head_ids.len(),
                out.len()
            )
        },
    );
    match ids {
        Ids::Cpu(v) => {
            let (best, force) = (best.as_slice(), force.as_slice());
            let (mut h, mut p, mut o) = (vec![0; n * (k + 1)], vec![0; n], vec![0; n * (k + 2)]);
            for b in 0..n {
                let r0 = b * (k + 1);
                let (m, next) = match force[b] as usize {
                    m if m <= k => (m, best[r0 + m]),
                    _ => crate::cpu::accept_greedy(&v[r0 + 1..r0 + 1 + k], &best[r0..r0 + k + 1]),
                };
                for (h, id) in h[r0..=r0 + k].iter_mut().zip(cpu::tokens_after_accept(&v[r0 + 1..=r0 + k], m, next)) {
                    *h = id;
                }
                p[b] = (r0 + m) as u32;
                o[b * (k + 2)..b * (k + 2) + k].copy_from_slice(&v[r0 + 1..r0 + 1 + k]);
                o[b * (k + 2) + k] = m as u32;
                o[b * (k + 2) + k + 1] = next;
            }
            head_ids.write(&h);
            picks.write(&p);
            out.write(&o);
        }
        #[cfg(feature = "cuda")]
        Ids::Cuda(v) => ok(
            gpu().accept_greedy_rows(
                v,
                best.cuda(),
                n,
                k,
                force.cuda(),
                head_ids.cuda_mut(),
                picks.cuda_mut(),
                out.cuda_mut(),
            ),
            "accept_greedy_rows",
        ),
    }
}

/// `dst[dst_rows[i]] = src[src_rows[i]]` for each i (rows of equal length, same device).
pub fn scatter_rows(dst: &mut Tensor, dst_rows: &Ids, src: &Tensor, src_rows: &Ids) {
    let d = dst.row_len();
    check(src.row_len() == d && dst_rows.len() == src_rows.len(), "scatter_rows", || {
        format!("{} rows of {:?} into {:?} ({} targets)", src_rows.len(), src.shape(), dst.shape(), dst_rows.len())
    });
    match src.storage() {
        Storage::Cpu(s) => {
            let (rows_out, rows_in) = (dst_rows.as_slice(), src_rows.as_slice());
            let (dn, sn) = (dst.rows(), src.rows());
            let out = dst.as_mut_slice();
            for (&o, &i) in rows_out.iter().zip(rows_in) {
                let (o, i) = (o as usize, i as usize);
                check(o < dn && i < sn, "scatter_rows", || format!("row {i} of {sn} to row {o} of {dn}"));
                out[o * d..(o + 1) * d].copy_from_slice(&s[i * d..(i + 1) * d]);
            }
        }
        #[cfg(feature = "cuda")]
        Storage::Cuda(s) => {
            ok(gpu().scatter_rows(dst.cuda_mut(), dst_rows.cuda(), s, src_rows.cuda(), d), "scatter_rows")
        }
    }
}

/// Writes `src` into the rows of `dst` starting at row `row0` (same row length, same device).
pub fn write_rows(dst: &mut Tensor, row0: usize, src: &Tensor) {
    let n = dst.row_len();
    check(src.row_len() == n && row0 + src.rows() <= dst.rows(), "write_rows", || {
        format!("{:?} at row {row0} of {:?}", src.shape(), dst.shape())
    });
    match src.storage() {
        Storage::Cpu(s) => dst.as_mut_slice()[row0 * n..row0 * n + s.len()].copy_from_slice(s),
        #[cfg(feature = "cuda")]
        Storage::Cuda(s) => ok(gpu().write_at(dst.cuda_mut(), row0 * n, s), "write_rows"),
    }
}

/// Rows `[r0, r1)` of `x` as a new tensor.
pub fn rows(x: &Tensor, r0: usize, r1: usize) -> Tensor {
    let n = x.row_len();
    let mut shape = x.shape().to_vec();
    shape[0] = r1 - r0;
    match x.storage() {
        Storage::Cpu(xs) => Tensor::from_vec(xs[r0 * n..r1 * n].to_vec(), &shape),
        #[cfg(feature = "cuda")]
        Storage::Cuda(xs) => Tensor::from_cuda(ok(gpu().copy_range(xs, r0 * n, (r1 - r0) * n), "rows"), &shape),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Device;

    #[test]
    fn greedy_acceptance_keeps_matching_drafts_then_the_models_token() {
        let cpu = |v: Vec<u32>| Ids::new(v, Device::Cpu);
        // Two sequences, K = 2: rows [input, d1, d2] and the model's choice after each.
        let ids = cpu(vec![5, 7, 8, 5, 7, 8]);
        let best = cpu(vec![7, 9, 4, 7, 8, 6]);
        let (mut h, mut p, mut o) = (cpu(vec![0; 6]), cpu(vec![0; 2]), cpu(vec![0; 8]));
        accept_greedy_rows(&ids, &best, 2, &cpu(vec![u32::MAX; 2]), &mut h, &mut p, &mut o);
        // Sequence 0 keeps 7 and then takes 9; sequence 1 keeps both and takes 6.
        assert_eq!(o.to_vec(), vec![7, 8, 1, 9, 7, 8, 2, 6]);
        assert_eq!(h.to_vec(), vec![7, 9, 9, 7, 8, 6]);
        assert_eq!(p.to_vec(), vec![1, 5]);
        // Forced: sequence 0 keeps none, sequence 1 keeps one whatever they are.
        accept_greedy_rows(&ids, &best, 2, &cpu(vec![0, 1]), &mut h, &mut p, &mut o);
        assert_eq!(o.to_vec(), vec![7, 8, 0, 7, 7, 8, 1, 8]);
        assert_eq!(h.to_vec(), vec![7, 7, 7, 7, 8, 8]);
        assert_eq!(p.to_vec(), vec![0, 4]);
    }

    #[test]
    fn rows_sampled_by_their_own_controls_match_one_row_sampling() {
        let logits = Tensor::from_vec((0..40).map(|i| ((i * 7919) % 13) as f32 * 0.3).collect(), &[4, 10]);
        let params = [
            SampleParams { temperature: 0.0, top_k: 0, top_p: 1.0, min_p: 0.0 },
            SampleParams { temperature: 0.7, top_k: 3, top_p: 1.0, min_p: 0.0 },
            SampleParams { temperature: 1.2, top_k: 0, top_p: 0.8, min_p: 0.0 },
            SampleParams { temperature: 0.2, top_k: 0, top_p: 1.0, min_p: 0.1 },
        ];
        let u = [0.0, 0.9, 0.4, 0.71];
        let controls: Vec<u32> = (0..4).flat_map(|r| sample_controls(params[r], u[r])).collect();
        let mut out = Ids::new(vec![0; 4], Device::Cpu);
        sample_rows(&logits, &Ids::new(controls, Device::Cpu), &mut out);
        let want: Vec<u32> = (0..4).map(|r| sample(&rows(&logits, r, r + 1), params[r], u[r])).collect();
        assert_eq!(out.to_vec(), want);
    }

    #[test]
    fn strided_ids_and_scattered_rows_land_where_named() {
        let mut dst = Ids::new(vec![0; 8], Device::Cpu);
        write_ids_strided(&mut dst, &Ids::new(vec![1, 2, 3], Device::Cpu), 1, 3);
        assert_eq!(dst.to_vec(), vec![0, 1, 0, 0, 2, 0, 0, 3]);
        let mut pool = Tensor::from_vec(vec![0.0; 6], &[3, 2]);
        let src = Tensor::from_vec(vec![1.0, 2.0, 3.0, 4.0], &[2, 2]);
        scatter_rows(&mut pool, &Ids::new(vec![2, 0], Device::Cpu), &src, &Ids::new(vec![0, 1], Device::Cpu));
        assert_eq!(pool.to_vec(), vec![3.0, 4.0, 0.0, 0.0, 1.0, 2.0]);
    }

    #[test]
    fn cat_cols_joins_rows_side_by_side() {
        let a = Tensor::from_vec(vec![1.0, 2.0, 3.0, 4.0], &[2, 2]);
        let b = Tensor::from_vec(vec![5.0, 6.0], &[2, 1]);
        let c = cat_cols(&a, &b);
        assert_eq!(c.shape(), &[2, 3]);
        assert_eq!(c.to_vec(), vec![1.0, 2.0, 5.0, 3.0, 4.0, 6.0]);
    }

    /// Deterministic values in (-1, 1), never zero.
    fn values(n: usize, seed: u32) -> Vec<f32> {
        (0..n as u32).map(|i| ((i.wrapping_mul(2654435761) ^ seed) % 1999) as f32 / 1000.0 - 0.9995).collect()
    }

    fn t(shape: &[usize], seed: u32) -> Tensor {
        Tensor::from_vec(values(shape.iter().product(), seed), shape)
    }

    /// A walk of R rows per sequence (a speculative verify) gives each row the output and leaves
    /// in each row's write slot the state that R one-row in-place steps give after that row.
    #[test]
    fn multi_row_gdn_walks_equal_one_row_steps() {
        let d = GdnDims { key_heads: 2, value_heads: 4, key_dim: 8, value_dim: 6 };
        let (read, write, per_seq) = (vec![3u32, 0], vec![3u32, 1, 4, 0, 2, 5], 3);
        let rows = write.len();
        let (c, k) = (2 * 2 * 8 + 4 * 6, 4);
        let w = t(&[c, k], 1);
        let conv_pool = t(&[6 * (k - 1), c], 2);
        let state_pool = t(&[6 * 4, 8, 6], 3);
        let x = t(&[rows, c], 4);
        let (bp, ap, z) = (t(&[rows, 4], 5), t(&[rows, 4], 6), t(&[rows, 4 * 6], 7));
        let (a_log, dt, norm) = (t(&[4], 8), t(&[4], 9), t(&[6], 10));
        let params = GdnStepParams { a_log: &a_log, dt_bias: &dt, norm: &norm, eps: 1e-6, dims: d };
        let (r_ids, w_ids) = (Ids::new(read.clone(), crate::Device::Cpu), Ids::new(write.clone(), crate::Device::Cpu));
        let walk = GdnSlots { read: &r_ids, write: &w_ids, rows_per_seq: per_seq };
        let (mut cp, mut sp) = (conv_pool.clone(), state_pool.clone());
        let conv_out = conv1d_step(&x, &mut cp, &w, walk, Precision::F32);
        let out = gdn_decode(&conv_out, &bp, &ap, z.clone(), params, &mut sp, walk, Precision::F32);
        // The same rows one step at a time, each sequence in its own read slot.
        let (mut cp1, mut sp1) = (conv_pool, state_pool);
        for (b, &slot) in read.iter().enumerate() {
            let one = Ids::new(vec![slot], crate::Device::Cpu);
            for (r, &o_slot) in write.iter().enumerate().skip(b * per_seq).take(per_seq) {
                let row = |x: &Tensor| rows_of(x, r);
                let y = conv1d_step(&row(&x), &mut cp1, &w, GdnSlots::in_place(&one), Precision::F32);
                assert_eq!(y.to_vec(), row(&conv_out).to_vec(), "conv row {r}");
                let o = gdn_decode(
                    &y,
                    &row(&bp),
                    &row(&ap),
                    row(&z),
                    params,
                    &mut sp1,
                    GdnSlots::in_place(&one),
                    Precision::F32,
                );
                assert_eq!(o.to_vec(), row(&out).to_vec(), "output row {r}");
                let o_slot = o_slot as usize;
                let (cs, ss) = ((k - 1) * c, 4 * 8 * 6);
                assert_eq!(
                    cp.as_slice()[o_slot * cs..(o_slot + 1) * cs],
                    cp1.as_slice()[slot as usize * cs..(slot as usize + 1) * cs]
                );
                assert_eq!(
                    sp.as_slice()[o_slot * ss..(o_slot + 1) * ss],
                    sp1.as_slice()[slot as usize * ss..(slot as usize + 1) * ss]
                );
            }
        }
    }

    fn rows_of(x: &Tensor, r: usize) -> Tensor {
        rows(x, r, r + 1)
    }
}
