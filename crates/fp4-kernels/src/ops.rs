//! Tensor-level ops: check shapes, then dispatch on storage. The model calls only these.
//! Shape mismatches here are programming errors (the model builds every shape from a validated
//! config), so they panic with the shapes involved rather than returning errors. On the GPU the
//! ops compute in f32 (`Precision::Bf16` is a CPU-only reference mode); a failing CUDA call (out
//! of device memory) panics with the driver's message.

pub use crate::cpu::{rope_inv_freq, GdnDims, SampleParams};
use crate::{cpu, Precision, Storage, Tensor};

fn check(cond: bool, op: &str, msg: impl FnOnce() -> String) {
    assert!(cond, "{op}: {}", msg());
}

#[cfg(feature = "cuda")]
use crate::cuda::{self, gpu};

/// Element-wise ops of two equal-shape inputs.
#[derive(Debug, Clone, Copy)]
pub enum Binary {
    /// `silu(a) · b`
    SiluMul,
    /// `a · sigmoid(b)`
    SigmoidGate,
    /// `a + b`
    Add,
}

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
        _ => ok(g.linear(input, t, w), "linear"),
    };
    if let Some(b) = bias {
        ok(g.add_bias(&mut y, b.cuda()), "linear bias");
    }
    Tensor::from_cuda(y, &[t, w.rows()])
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
        Storage::Cuda(xs) => Tensor::from_cuda(ok(gpu().rms_norm(xs, w.cuda(), eps, offset), "rms_norm"), x.shape()),
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
        Storage::Cuda(av) => Tensor::from_cuda(ok(gpu().binary(op, av, b.cuda()), "element-wise op"), a.shape()),
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

/// How the delta rule walks the sequence (on either device).
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
