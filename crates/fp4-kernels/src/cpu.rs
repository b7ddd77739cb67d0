//! Plain CPU reference implementations on slices. Every op here is the ground truth its CUDA
//! twin is tested against, so each is written for clarity: one loop nest, f32 accumulation,
//! rounding only where `Precision` says transformers rounds.
// Index loops here mirror the subscripts of the math they implement.
#![allow(clippy::needless_range_loop)]

use crate::Precision;

/// Dot product accumulated in f64, rounded once: the reference stays closer to the exact value
/// than any f32 GEMM, so its distance to another implementation is that one's rounding alone.
/// Four f64 lanes take elements 4c + l in order; on x86-64 with AVX2 and FMA one 4-lane vector
/// does it (the product of two f32s is exact in f64, so the fused multiply-add rounds as the
/// separate multiply and add do: the same bits, ~2.5x the speed of the SSE2 baseline).
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    #[cfg(target_arch = "x86_64")]
    if avx2_fma() {
        // SAFETY: the CPU has AVX2 and FMA (checked above).
        return unsafe { dot_avx2(a, b) };
    }
    dot_lanes(a, b)
}

#[cfg(target_arch = "x86_64")]
fn avx2_fma() -> bool {
    static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *HAS.get_or_init(|| std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma"))
}

/// [`dot_lanes`] with the four lanes in one AVX register.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let n = a.len().min(b.len());
    let chunks = n / 4;
    let mut acc = _mm256_setzero_pd();
    for c in 0..chunks {
        // SAFETY: 4c + 3 < n ≤ both lengths.
        let (va, vb) = unsafe { (_mm_loadu_ps(a.as_ptr().add(c * 4)), _mm_loadu_ps(b.as_ptr().add(c * 4))) };
        acc = _mm256_fmadd_pd(_mm256_cvtps_pd(va), _mm256_cvtps_pd(vb), acc);
    }
    let mut l = [0f64; 4];
    // SAFETY: l holds four f64s.
    unsafe { _mm256_storeu_pd(l.as_mut_ptr(), acc) };
    let mut s = (l[0] + l[1]) + (l[2] + l[3]);
    for i in chunks * 4..n {
        s += a[i] as f64 * b[i] as f64;
    }
    s as f32
}

/// The portable dot: lane l accumulates elements 4c + l, the lanes added pairwise, the tail last.
fn dot_lanes(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f64; 4];
    let chunks = a.len() / 4;
    for c in 0..chunks {
        for l in 0..4 {
            acc[l] += a[c * 4 + l] as f64 * b[c * 4 + l] as f64;
        }
    }
    let mut s = (acc[0] + acc[1]) + (acc[2] + acc[3]);
    for i in chunks * 4..a.len() {
        s += a[i] as f64 * b[i] as f64;
    }
    s as f32
}

/// Multiply-adds below which a linear runs on the calling thread (a task costs about a
/// microsecond; this many f64 multiply-adds take about fifty).
const LINEAR_SERIAL_MACS: usize = 1 << 16;
/// Output rows per task: the tile's weights (16 KiB at 256 inputs) stay in L1 while it walks
/// every token, instead of each token streaming the whole matrix.
const LINEAR_ROWS_PER_TASK: usize = 16;

/// `y[t, o] = Σ_i x[t, i]·w[o, i] + bias[o]` (PyTorch `nn.Linear`, weight `[out, in]`).
/// Spread over rayon's threads by tiles of output rows, each tile walking every token; each
/// output is the same f64-accumulated [`dot`] whichever thread computes it and in whatever
/// order, so neither the threading nor the tiling changes a bit of the result.
pub fn linear(x: &[f32], w: &[f32], bias: Option<&[f32]>, n_in: usize, n_out: usize, p: Precision) -> Vec<f32> {
    use rayon::prelude::*;
    let t = x.len() / n_in;
    let one = |tok: usize, o: usize| {
        let b = bias.map_or(0.0, |b| b[o]);
        p.round(dot(&x[tok * n_in..][..n_in], &w[o * n_in..][..n_in]) + b)
    };
    let mut y = vec![0f32; t * n_out];
    if t * n_in * n_out < LINEAR_SERIAL_MACS {
        for tok in 0..t {
            for o in 0..n_out {
                y[tok * n_out + o] = one(tok, o);
            }
        }
        return y;
    }
    // Each tile's outputs token-major ([t, rows of the tile]), then placed into y.
    let tiles: Vec<Vec<f32>> = (0..n_out.div_ceil(LINEAR_ROWS_PER_TASK))
        .into_par_iter()
        .map(|c| {
            let rows = c * LINEAR_ROWS_PER_TASK..((c + 1) * LINEAR_ROWS_PER_TASK).min(n_out);
            (0..t).flat_map(|tok| rows.clone().map(move |o| (tok, o))).map(|(tok, o)| one(tok, o)).collect()
        })
        .collect();
    for (c, tile) in tiles.iter().enumerate() {
        let o0 = c * LINEAR_ROWS_PER_TASK;
        let nr = tile.len() / t.max(1);
        for (tok, part) in tile.chunks_exact(nr).enumerate() {
            y[tok * n_out + o0..][..nr].copy_from_slice(part);
        }
    }
    y
}

/// RMSNorm over rows of length `w.len()`: `x·rsqrt(mean(x²)+eps)·(offset + w)`, in f32, rounded once.
/// `offset` is 1 for Qwen3.5's zero-centred norms and 0 for plain ones.
pub fn rms_norm(x: &[f32], w: &[f32], eps: f32, offset: f32, p: Precision) -> Vec<f32> {
    let d = w.len();
    let mut y = vec![0f32; x.len()];
    for (xr, yr) in x.chunks_exact(d).zip(y.chunks_exact_mut(d)) {
        let r = inv_rms(xr, eps);
        for i in 0..d {
            yr[i] = p.round(xr[i] * r * (offset + w[i]));
        }
    }
    y
}

#[inline]
fn inv_rms(x: &[f32], eps: f32) -> f32 {
    let ms = (x.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / x.len() as f64) as f32;
    1.0 / (ms + eps).sqrt()
}

/// Gated RMSNorm of the GDN output (`Qwen3_5RMSNormGated`): per row of `w.len()`,
/// `w · round(x·rsqrt(mean(x²)+eps)) · silu(z)`, the weight plain (not 1+w).
pub fn rms_norm_gated(x: &[f32], z: &[f32], w: &[f32], eps: f32, p: Precision) -> Vec<f32> {
    let d = w.len();
    let mut y = vec![0f32; x.len()];
    for ((xr, zr), yr) in x.chunks_exact(d).zip(z.chunks_exact(d)).zip(y.chunks_exact_mut(d)) {
        let r = inv_rms(xr, eps);
        for i in 0..d {
            let normed = p.round(w[i] * p.round(xr[i] * r));
            yr[i] = p.round(normed * silu(zr[i]));
        }
    }
    y
}

#[inline]
pub fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

#[inline]
pub fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// torch `softplus` (beta 1, threshold 20).
#[inline]
pub fn softplus(x: f32) -> f32 {
    if x > 20.0 {
        x
    } else {
        x.exp().ln_1p()
    }
}

/// SwiGLU: `round(round(silu(gate))·up)`.
pub fn silu_mul(gate: &[f32], up: &[f32], p: Precision) -> Vec<f32> {
    gate.iter().zip(up).map(|(&g, &u)| p.round(p.round(silu(g)) * u)).collect()
}

/// Output gate of gated attention: `round(x·round(sigmoid(gate)))`.
pub fn sigmoid_gate(x: &[f32], gate: &[f32], p: Precision) -> Vec<f32> {
    x.iter().zip(gate).map(|(&v, &g)| p.round(v * p.round(sigmoid(g)))).collect()
}

/// GDN gates per value head from the `b`, `a` projections `[T, Hv]`:
/// `β = round(sigmoid(b))` and the log-decay `g = −exp(A_log)·softplus(a + dt_bias)` (f32).
pub fn gdn_gates(b: &[f32], a: &[f32], a_log: &[f32], dt_bias: &[f32], p: Precision) -> (Vec<f32>, Vec<f32>) {
    let hv = a_log.len();
    let beta = b.iter().map(|&x| p.round(sigmoid(x))).collect();
    let g = a.iter().enumerate().map(|(i, &x)| -a_log[i % hv].exp() * softplus(x + dt_bias[i % hv])).collect();
    (beta, g)
}

/// Residual add, rounded.
pub fn add(a: &[f32], b: &[f32], p: Precision) -> Vec<f32> {
    a.iter().zip(b).map(|(&x, &y)| p.round(x + y)).collect()
}

/// RoPE frequencies as transformers computes them in f32: `1 / θ^(2j/rot)`.
pub fn rope_inv_freq(rotary_dim: usize, theta: f32) -> Vec<f32> {
    (0..rotary_dim / 2).map(|j| 1.0 / theta.powf((2 * j) as f32 / rotary_dim as f32)).collect()
}

/// Rotate-half RoPE on the first `rotary_dim` dims of each head, in place. `x` is
/// `[T, heads, head_dim]`; token t sits at position `pos0 + t`. Dim j pairs with j + rot/2.
/// cos/sin are computed in f32 and rounded to the activation precision, as HF does.
pub fn rope(x: &mut [f32], heads: usize, head_dim: usize, inv_freq: &[f32], pos0: usize, p: Precision) {
    let half = inv_freq.len();
    for (t, tok) in x.chunks_exact_mut(heads * head_dim).enumerate() {
        let pos = (pos0 + t) as f32;
        let (cos, sin): (Vec<f32>, Vec<f32>) =
            inv_freq.iter().map(|f| (p.round((pos * f).cos()), p.round((pos * f).sin()))).unzip();
        for head in tok.chunks_exact_mut(head_dim) {
            for j in 0..half {
                let (x1, x2) = (head[j], head[j + half]);
                head[j] = p.round(p.round(x1 * cos[j]) + p.round(-x2 * sin[j]));
                head[j + half] = p.round(p.round(x2 * cos[j]) + p.round(x1 * sin[j]));
            }
        }
    }
}

/// Causal depthwise conv + SiLU over `x` `[T, C]`, continuing from `state` `[K-1, C]` (the
/// last K-1 pre-conv inputs; zeros at the start). `w` is `[C, K]`, tap K-1 multiplies the
/// current token. Updates `state` to the last K-1 inputs. Rounds the conv output, then the SiLU.
pub fn causal_conv1d_silu(x: &[f32], state: &mut [f32], w: &[f32], channels: usize, p: Precision) -> Vec<f32> {
    let k = w.len() / channels;
    let t = x.len() / channels;
    // The stream the conv sees: state rows followed by the new rows.
    let mut stream = Vec::with_capacity(state.len() + x.len());
    stream.extend_from_slice(state);
    stream.extend_from_slice(x);
    let mut y = vec![0f32; x.len()];
    for ti in 0..t {
        for c in 0..channels {
            let mut acc = 0f32;
            for j in 0..k {
                acc += w[c * k + j] * stream[(ti + j) * channels + c];
            }
            y[ti * channels + c] = p.round(silu(p.round(acc)));
        }
    }
    let keep = state.len();
    state.copy_from_slice(&stream[stream.len() - keep..]);
    y
}

/// Head geometry of a Gated DeltaNet layer.
#[derive(Debug, Clone, Copy)]
pub struct GdnDims {
    pub key_heads: usize,
    pub value_heads: usize,
    pub key_dim: usize,
    pub value_dim: usize,
}

impl GdnDims {
    /// Value head h reads query/key head `h / (Hv/Hk)`: each key head serves that many
    /// consecutive value heads (HF `repeat_interleave`), never `h % Hk`.
    #[inline]
    pub fn key_head_of(&self, h: usize) -> usize {
        h / (self.value_heads / self.key_heads)
    }
}

/// Token-major inputs of the delta rule: `q, k [T, Hk, dk]`, `v [T, Hv, dv]`, `g, beta [T, Hv]`.
#[derive(Debug, Clone, Copy)]
pub struct GdnInputs<'a> {
    pub q: &'a [f32],
    pub k: &'a [f32],
    pub v: &'a [f32],
    pub g: &'a [f32],
    pub beta: &'a [f32],
}

/// `x · rsqrt(Σx² + 1e-6)` (the FLA-compatible l2norm: eps on the sum).
fn l2norm(x: &[f32]) -> Vec<f32> {
    let r = 1.0 / ((x.iter().map(|&v| v as f64 * v as f64).sum::<f64>() as f32) + 1e-6).sqrt();
    x.iter().map(|v| v * r).collect()
}

/// Per-head inputs of the delta rule after grouping: normalised q and k, v, g, β over T tokens.
struct HeadSeq {
    q: Vec<Vec<f32>>,
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
    g: Vec<f32>,
    beta: Vec<f32>,
}

/// Gathers value head `h`'s sequence from token-major `q,k [T,Hk,dk]`, `v [T,Hv,dv]`,
/// `g, beta [T,Hv]`, applying the l2norm to q and k and `q_scale` to q.
fn head_seq(x: GdnInputs, d: GdnDims, h: usize, q_scale: impl Fn(f32) -> f32) -> HeadSeq {
    let GdnInputs { q, k, v, g, beta } = x;
    let t = g.len() / d.value_heads;
    let kh = d.key_head_of(h);
    let qk_row = d.key_heads * d.key_dim;
    let v_row = d.value_heads * d.value_dim;
    let mut s = HeadSeq { q: vec![], k: vec![], v: vec![], g: vec![], beta: vec![] };
    for ti in 0..t {
        let off = ti * qk_row + kh * d.key_dim;
        s.q.push(l2norm(&q[off..off + d.key_dim]).into_iter().map(&q_scale).collect());
        s.k.push(l2norm(&k[off..off + d.key_dim]));
        let voff = ti * v_row + h * d.value_dim;
        s.v.push(v[voff..voff + d.value_dim].to_vec());
        s.g.push(g[ti * d.value_heads + h]);
        s.beta.push(beta[ti * d.value_heads + h]);
    }
    s
}

/// Gated delta rule, one token at a time (`torch_recurrent_gated_delta_rule`). `state` is
/// `[Hv, dk, dv]` f32 and is updated. Returns `o [T, Hv, dv]` in f32.
pub fn gdn_recurrent(x: GdnInputs, state: &mut [f32], d: GdnDims) -> Vec<f32> {
    let t = x.g.len() / d.value_heads;
    let (dk, dv) = (d.key_dim, d.value_dim);
    let scale = (dk as f32).sqrt();
    let mut out = vec![0f32; t * d.value_heads * dv];
    for h in 0..d.value_heads {
        let seq = head_seq(x, d, h, |x| x / scale);
        let s = &mut state[h * dk * dv..(h + 1) * dk * dv];
        for ti in 0..t {
            let decay = seq.g[ti].exp();
            s.iter_mut().for_each(|x| *x *= decay);
            let kt = &seq.k[ti];
            // kv_mem[j] = Σ_i S[i,j]·k[i]; delta = (v − kv_mem)·β
            let mut delta = vec![0f32; dv];
            for (i, &ki) in kt.iter().enumerate() {
                for j in 0..dv {
                    delta[j] += s[i * dv + j] * ki;
                }
            }
            for j in 0..dv {
                delta[j] = (seq.v[ti][j] - delta[j]) * seq.beta[ti];
            }
            for (i, &ki) in kt.iter().enumerate() {
                for j in 0..dv {
                    s[i * dv + j] += ki * delta[j];
                }
            }
            let o = &mut out[(ti * d.value_heads + h) * dv..][..dv];
            for (i, &qi) in seq.q[ti].iter().enumerate() {
                for j in 0..dv {
                    o[j] += s[i * dv + j] * qi;
                }
            }
        }
    }
    out
}

/// Chunk length of the chunked delta rule (HF and FLA both use 64).
pub const GDN_CHUNK: usize = 64;

/// Gated delta rule over chunks of [`GDN_CHUNK`] tokens (`torch_chunk_gated_delta_rule`): within a
/// chunk the updates are condensed by solving the unit-lower-triangular UT system, then chunks are
/// scanned in order. Same contract as [`gdn_recurrent`]; the two agree up to rounding.
pub fn gdn_chunked(x: GdnInputs, state: &mut [f32], d: GdnDims) -> Vec<f32> {
    let t = x.g.len() / d.value_heads;
    let (dk, dv, c) = (d.key_dim, d.value_dim, GDN_CHUNK);
    let scale = (dk as f32).powf(-0.5);
    let mut out = vec![0f32; t * d.value_heads * dv];
    for h in 0..d.value_heads {
        let seq = head_seq(x, d, h, |x| x * scale);
        let s = &mut state[h * dk * dv..(h + 1) * dk * dv];
        for start in (0..t).step_by(c) {
            // Padded positions (past T) have q=k=v=0, β=0, g=0 and so change nothing.
            let n = (t - start).min(c);
            let idx = |i: usize| start + i;
            let mut cum = vec![0f32; c];
            // Sequential f32 cumsum, as torch's CPU cumsum: Γ_i − Γ_j of two large sums cancels, and
            // the logits are sensitive to exactly how Γ was rounded (f64 here moved us 10x away from HF).
            let mut acc = 0f32;
            for (i, cv) in cum.iter_mut().enumerate() {
                if i < n {
                    acc += seq.g[idx(i)];
                }
                *cv = acc;
            }
            let kb: Vec<Vec<f32>> =
                (0..n).map(|i| seq.k[idx(i)].iter().map(|x| x * seq.beta[idx(i)]).collect()).collect();
            let vb: Vec<Vec<f32>> =
                (0..n).map(|i| seq.v[idx(i)].iter().map(|x| x * seq.beta[idx(i)]).collect()).collect();
            let decay = |i: usize, j: usize| (cum[i] - cum[j]).exp();
            // Forward substitution of (I + strictly_lower(kβ·kᵀ ⊙ decay)) X = rhs.
            let solve = |rhs: &[Vec<f32>]| -> Vec<Vec<f32>> {
                let mut x: Vec<Vec<f32>> = Vec::with_capacity(n);
                for i in 0..n {
                    let mut row = rhs[i].clone();
                    for (j, xj) in x.iter().enumerate() {
                        let l = dot(&kb[i], &seq.k[idx(j)]) * decay(i, j);
                        row.iter_mut().zip(xj).for_each(|(r, xv)| *r -= l * xv);
                    }
                    x.push(row);
                }
                x
            };
            let new_values = solve(&vb);
            let decayed_kb: Vec<Vec<f32>> = (0..n).map(|i| kb[i].iter().map(|x| x * cum[i].exp()).collect()).collect();
            let k_cumdecay = solve(&decayed_kb);

            // v_new = new_values − k_cumdecay·S
            let v_new: Vec<Vec<f32>> = (0..n)
                .map(|i| {
                    let mut row = new_values[i].clone();
                    for (a, &w) in k_cumdecay[i].iter().enumerate() {
                        row.iter_mut().zip(&s[a * dv..(a + 1) * dv]).for_each(|(r, sv)| *r -= w * sv);
                    }
                    row
                })
                .collect();
            // o_i = (q_i·e^{Γ_i})·S + Σ_{j≤i} (q_i·k_j)·e^{Γ_i−Γ_j}·v_new_j
            for i in 0..n {
                let o = &mut out[(idx(i) * d.value_heads + h) * dv..][..dv];
                let qd = cum[i].exp();
                for (a, &qa) in seq.q[idx(i)].iter().enumerate() {
                    let w = qa * qd;
                    o.iter_mut().zip(&s[a * dv..(a + 1) * dv]).for_each(|(r, sv)| *r += w * sv);
                }
                for j in 0..=i {
                    let w = dot(&seq.q[idx(i)], &seq.k[idx(j)]) * decay(i, j);
                    o.iter_mut().zip(&v_new[j]).for_each(|(r, vv)| *r += w * vv);
                }
            }
            // S = S·e^{Γ_last} + Σ_j (k_j·e^{Γ_last−Γ_j}) ⊗ v_new_j  (Γ_last over the padded chunk)
            let last = cum[c - 1];
            let chunk_decay = last.exp();
            s.iter_mut().for_each(|x| *x *= chunk_decay);
            for j in 0..n {
                let kd = (last - cum[j]).exp();
                for (a, &ka) in seq.k[idx(j)].iter().enumerate() {
                    let w = ka * kd;
                    s[a * dv..(a + 1) * dv].iter_mut().zip(&v_new[j]).for_each(|(r, vv)| *r += w * vv);
                }
            }
        }
    }
    out
}

/// Head geometry of a softmax attention layer.
#[derive(Debug, Clone, Copy)]
pub struct AttnDims {
    pub q_heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

/// Causal GQA softmax attention for `q [T, Hq, D]` against `k, v [L, Hkv, D]` where the T
/// queries are the last T of the L positions. Query head h reads kv head `h / (Hq/Hkv)`.
/// Rounds as transformers' eager attention does in bf16: the scores `q·k`, their scaling, the
/// softmax output (computed in f32) and the weighted sum of values.
pub fn attention(q: &[f32], k: &[f32], v: &[f32], d: AttnDims, scale: f32, p: Precision) -> Vec<f32> {
    let AttnDims { q_heads, kv_heads, head_dim } = d;
    let t = q.len() / (q_heads * head_dim);
    let l = k.len() / (kv_heads * head_dim);
    let past = l - t;
    let group = q_heads / kv_heads;
    let mut out = vec![0f32; q.len()];
    let mut scores = vec![0f32; l];
    for ti in 0..t {
        let visible = past + ti + 1;
        for h in 0..q_heads {
            let kvh = h / group;
            let qv = &q[(ti * q_heads + h) * head_dim..][..head_dim];
            for (j, sc) in scores[..visible].iter_mut().enumerate() {
                *sc = p.round(p.round(dot(qv, &k[(j * kv_heads + kvh) * head_dim..][..head_dim])) * scale);
            }
            let max = scores[..visible].iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0f32;
            for sc in scores[..visible].iter_mut() {
                *sc = (*sc - max).exp();
                sum += *sc;
            }
            let o = &mut out[(ti * q_heads + h) * head_dim..][..head_dim];
            for (j, sc) in scores[..visible].iter().enumerate() {
                let w = p.round(sc / sum);
                let vv = &v[(j * kv_heads + kvh) * head_dim..][..head_dim];
                o.iter_mut().zip(vv).for_each(|(r, x)| *r += w * x);
            }
            o.iter_mut().for_each(|x| *x = p.round(*x));
        }
    }
    out
}

/// Sampling controls (validated by the model's `SamplingParams`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SampleParams {
    /// 0 = greedy.
    pub temperature: f32,
    /// Keep the k most likely tokens; 0 = off.
    pub top_k: usize,
    /// Nucleus mass in (0, 1]; 1 = off.
    pub top_p: f32,
    /// Drop tokens less likely than `min_p` × the most likely one; 0 = off.
    pub min_p: f32,
}

/// Picks a token from one row of logits with the draw `u ∈ [0, 1)`: greedy (first maximum) at
/// temperature 0; otherwise logits / temperature, then top-k, min-p and top-p (transformers'
/// order), each as a threshold on the scaled logit (ties at a threshold are all kept), and `u`
/// walks the kept tokens in index order. Probabilities are normalised over the top-k set, as
/// after transformers' TopK warper. The GPU kernel (`kernels/sampling.cu`) implements exactly this.
pub fn sample(logits: &[f32], p: SampleParams, u: f32) -> u32 {
    if p.temperature == 0.0 {
        return argmax(logits);
    }
    let kept = Kept::new(logits, p);
    let total: f64 = kept.z.iter().filter(|&&v| kept.chosen(v)).map(|&v| kept.prob(v) as f64).sum();
    let mut r = u as f64 * total;
    let mut last = 0;
    for (i, &v) in kept.z.iter().enumerate() {
        if kept.chosen(v) {
            let pr = kept.prob(v) as f64;
            if r < pr {
                return i as u32;
            }
            r -= pr;
            last = i;
        }
    }
    last as u32
}

/// The distribution [`sample`] draws from: every token it can pick, in index order, with its
/// probability (summing to 1); greedy is the first maximum with probability 1.
pub fn sample_probs(logits: &[f32], p: SampleParams) -> Vec<(u32, f64)> {
    if p.temperature == 0.0 {
        return vec![(argmax(logits), 1.0)];
    }
    let kept = Kept::new(logits, p);
    let chosen: Vec<(u32, f64)> = (0..kept.z.len() as u32)
        .filter(|&i| kept.chosen(kept.z[i as usize]))
        .map(|i| (i, kept.prob(kept.z[i as usize]) as f64))
        .collect();
    let total: f64 = chosen.iter().map(|c| c.1).sum();
    chosen.into_iter().map(|(i, pr)| (i, pr / total)).collect()
}

/// The first maximum.
fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// What a sampling step keeps: logits / temperature, then top-k, min-p and top-p as thresholds
/// on the scaled logit (see [`sample`]).
struct Kept {
    z: Vec<f32>,
    max: f32,
    /// The softmax normaliser over the top-k set.
    s1: f32,
    top_k_floor: f32,
    min_p: f32,
    min_p_floor: f32,
    top_p_floor: f32,
}

impl Kept {
    fn new(logits: &[f32], p: SampleParams) -> Kept {
        let z: Vec<f32> = logits.iter().map(|l| l / p.temperature).collect();
        // The values in descending order, sorted only as far as needed: the top-k floor and the
        // top-p prefix are usually among the first few hundred of 248k (a full sort per token
        // took ~10 ms on one core).
        let mut order = Descending::new(&z);
        let max = order.get(0);
        let top_k_floor = if p.top_k > 0 && p.top_k < z.len() { order.get(p.top_k - 1) } else { f32::NEG_INFINITY };
        // Sums in f64: exact next to the GPU's f32 tree sums, whose error is then the only
        // difference (a sequential f32 sum over 248k tokens drifts by ~1e-4 and moves the top-p cut).
        let s1 = z.iter().filter(|&&v| v >= top_k_floor).map(|&v| (v - max).exp() as f64).sum::<f64>() as f32;
        let mut kept = Kept {
            z,
            max,
            s1,
            top_k_floor,
            min_p: p.min_p,
            min_p_floor: p.min_p * (1.0 / s1),
            top_p_floor: f32::NEG_INFINITY,
        };
        // top-p: the smallest descending prefix of kept tokens whose mass reaches top_p; its
        // last value is the threshold (all kept tokens if the mass never reaches it).
        if p.top_p < 1.0 {
            let mut mass = 0f64;
            for i in 0..kept.z.len() {
                let v = order.get(i);
                if !kept.kept(v) {
                    continue;
                }
                mass += kept.prob(v) as f64;
                if mass >= p.top_p as f64 {
                    kept.top_p_floor = v;
                    break;
                }
            }
        }
        kept
    }

    fn prob(&self, v: f32) -> f32 {
        (v - self.max).exp() / self.s1
    }

    /// Within top-k and min-p.
    fn kept(&self, v: f32) -> bool {
        v >= self.top_k_floor && (self.min_p == 0.0 || self.prob(v) >= self.min_p_floor)
    }

    /// Within top-p too: the tokens the draw walks over.
    fn chosen(&self, v: f32) -> bool {
        self.kept(v) && v >= self.top_p_floor
    }
}

/// The values of a slice in descending `total_cmp` order, sorted lazily: the first `SORTED_HEAD`
/// after one selection pass, all of them once an index beyond that is asked for.
struct Descending {
    values: Vec<f32>,
    sorted: usize,
}

/// How many leading values [`Descending`] sorts at first.
const SORTED_HEAD: usize = 512;

impl Descending {
    fn new(v: &[f32]) -> Descending {
        let mut values = v.to_vec();
        let head = SORTED_HEAD.min(values.len());
        if head < values.len() {
            values.select_nth_unstable_by(head, |a, b| b.total_cmp(a));
        }
        values[..head].sort_unstable_by(|a, b| b.total_cmp(a));
        Descending { values, sorted: head }
    }

    /// The `i`-th largest value.
    fn get(&mut self, i: usize) -> f32 {
        if i >= self.sorted {
            self.values.sort_unstable_by(|a, b| b.total_cmp(a));
            self.sorted = self.values.len();
        }
        self.values[i]
    }
}

/// Greedy acceptance over one speculative verify: the drafts are kept while they equal the main
/// model's own choices `own` (its argmax at each of the K + 1 rows), and its choice after the
/// last kept one is its next token. Returns (drafts kept, own token).
pub fn accept_greedy(drafts: &[u32], own: &[u32]) -> (usize, u32) {
    let kept = drafts.iter().zip(own).take_while(|(d, t)| d == t).count();
    (kept, own[kept])
}

/// The tokens after a verify's K + 1 positions once `kept` of the K `drafts` are kept: the kept
/// drafts, then the main model's `next`, repeated past the kept ones. The first `kept + 1` are the
/// new tokens; all K + 1 are what the MTP head reads at those positions (its KV past the kept ones
/// is overwritten by the next step before anything reads it).
pub fn tokens_after_accept(drafts: &[u32], kept: usize, next: u32) -> impl Iterator<Item = u32> + '_ {
    drafts[..kept].iter().copied().chain(std::iter::repeat_n(next, drafts.len() + 1 - kept))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `sample` as it was written first: one full sort per call (the reference for the lazy one).
    fn sample_by_full_sort(logits: &[f32], p: SampleParams, u: f32) -> u32 {
        let z: Vec<f32> = logits.iter().map(|l| l / p.temperature).collect();
        let mut sorted = z.clone();
        sorted.sort_by(|a, b| b.total_cmp(a));
        let max = sorted[0];
        let top_k_floor = if p.top_k > 0 && p.top_k < z.len() { sorted[p.top_k - 1] } else { f32::NEG_INFINITY };
        let s1 = z.iter().filter(|&&v| v >= top_k_floor).map(|&v| (v - max).exp() as f64).sum::<f64>() as f32;
        let prob = |v: f32| (v - max).exp() / s1;
        let min_p_floor = p.min_p * (1.0 / s1);
        let kept = |v: f32| v >= top_k_floor && (p.min_p == 0.0 || prob(v) >= min_p_floor);
        let mut top_p_floor = f32::NEG_INFINITY;
        if p.top_p < 1.0 {
            let mut mass = 0f64;
            for &v in sorted.iter().filter(|&&v| kept(v)) {
                mass += prob(v) as f64;
                if mass >= p.top_p as f64 {
                    top_p_floor = v;
                    break;
                }
            }
        }
        let chosen = |v: f32| kept(v) && v >= top_p_floor;
        let total: f64 = z.iter().filter(|&&v| chosen(v)).map(|&v| prob(v) as f64).sum();
        let mut r = u as f64 * total;
        let mut last = 0;
        for (i, &v) in z.iter().enumerate() {
            if chosen(v) {
                let pr = prob(v) as f64;
                if r < pr {
                    return i as u32;
                }
                r -= pr;
                last = i;
            }
        }
        last as u32
    }

    /// The distribution `sample_probs` gives is the one `sample` draws from: walking it with the
    /// same draw picks the same token.
    #[test]
    fn sample_probs_is_what_sample_draws_from() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        let logits = rand_vec(&mut rng, 3000, 6.0);
        for (t, k, tp, mp) in [(0.0, 0, 1.0, 0.0), (0.7, 0, 0.9, 0.0), (1.0, 20, 1.0, 0.0), (1.2, 0, 1.0, 0.02)] {
            let p = SampleParams { temperature: t, top_k: k, top_p: tp, min_p: mp };
            let probs = sample_probs(&logits, p);
            assert!((probs.iter().map(|x| x.1).sum::<f64>() - 1.0).abs() < 1e-9);
            assert!(probs.windows(2).all(|w| w[0].0 < w[1].0), "index order");
            for u in [0.0f32, 0.2, 0.5, 0.93] {
                let mut r = u as f64;
                let walked = probs.iter().find(|x| {
                    r -= x.1;
                    r < 0.0
                });
                let walked = walked.unwrap_or(probs.last().unwrap()).0;
                assert_eq!(walked, sample(&logits, p, u), "{p:?} u {u}");
            }
        }
    }

    /// The lazily sorted sampler picks what the fully sorted one picks: flat and peaked logits
    /// (top-p cut inside and far beyond the first sorted values), ties, every control.
    #[test]
    fn lazy_sort_sampler_equals_the_full_sort() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(17);
        for case in 0..60 {
            let n = [7, 600, 5000, 248_320][case % 4];
            let scale = [0.5, 4.0, 20.0][case % 3];
            let mut logits = rand_vec(&mut rng, n, scale);
            if case % 5 == 0 {
                // Ties around the head.
                let v = logits[0];
                logits.iter_mut().step_by(3).for_each(|x| *x = v);
            }
            for (t, k, tp, mp) in [
                (0.7, 0, 0.9, 0.0),
                (1.0, 40, 1.0, 0.0),
                (1.3, 0, 0.999, 0.0),
                (0.5, 600, 0.95, 0.05),
                (1.0, 0, 1.0, 0.1),
            ] {
                let p = SampleParams { temperature: t, top_k: k, top_p: tp, min_p: mp };
                for u in [0.0, 0.31, 0.77, 0.999] {
                    assert_eq!(sample(&logits, p, u), sample_by_full_sort(&logits, p, u), "n {n} {p:?} u {u}");
                }
            }
        }
    }
    use rand::{Rng, SeedableRng};

    fn rand_vec(rng: &mut rand::rngs::StdRng, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| rng.random_range(-1.0..1.0) * scale).collect()
    }

    /// The AVX2 dot (where the CPU has it) gives the portable dot's bits, lengths with and
    /// without a tail, values over many binades.
    #[test]
    fn dot_paths_agree_bit_for_bit() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        for n in [0, 1, 3, 4, 7, 64, 255, 1000] {
            let a: Vec<f32> =
                (0..n).map(|_| rng.random_range(-1.0f32..1.0) * 2f32.powi(rng.random_range(-20..20))).collect();
            let b = rand_vec(&mut rng, n, 3.0);
            assert_eq!(dot(&a, &b).to_bits(), dot_lanes(&a, &b).to_bits(), "dot of {n}");
        }
    }

    /// The threaded, tiled linear gives the bits of one dot per output in plain loops, for
    /// shapes below and above the serial threshold, one token and many, a partial last tile.
    #[test]
    fn linear_tiles_and_threads_change_no_bit() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for (t, n_in, n_out) in [(1, 64, 40), (1, 256, 1000), (3, 64, 1000), (37, 96, 130)] {
            let x = rand_vec(&mut rng, t * n_in, 1.0);
            let w = rand_vec(&mut rng, n_out * n_in, 0.3);
            let b = rand_vec(&mut rng, n_out, 0.1);
            for p in [Precision::F32, Precision::Bf16] {
                let got = linear(&x, &w, Some(&b), n_in, n_out, p);
                let want: Vec<f32> = (0..t * n_out)
                    .map(|i| {
                        let (tok, o) = (i / n_out, i % n_out);
                        p.round(dot(&x[tok * n_in..][..n_in], &w[o * n_in..][..n_in]) + b[o])
                    })
                    .collect();
                let same = got.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(same && got.len() == want.len(), "linear {t}x{n_in}→{n_out} {p:?}");
            }
        }
    }

    fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
        a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
    }

    /// The chunked and recurrent delta rules agree on lengths around chunk boundaries, with a
    /// grouped head layout (3 value heads per key head, dk ≠ dv) and a non-zero initial state.
    #[test]
    fn chunked_delta_rule_matches_recurrent() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let d = GdnDims { key_heads: 2, value_heads: 6, key_dim: 8, value_dim: 12 };
        for t in [1usize, 5, 64, 65, 130] {
            let q = rand_vec(&mut rng, t * 2 * 8, 1.0);
            let k = rand_vec(&mut rng, t * 2 * 8, 1.0);
            let v = rand_vec(&mut rng, t * 6 * 12, 1.0);
            let g: Vec<f32> = (0..t * 6).map(|_| -rng.random_range(0.0..1.5f32)).collect();
            let beta: Vec<f32> = (0..t * 6).map(|_| rng.random_range(0.0..1.0f32)).collect();
            let init = rand_vec(&mut rng, 6 * 8 * 12, 0.5);
            let (mut s1, mut s2) = (init.clone(), init.clone());
            let x = GdnInputs { q: &q, k: &k, v: &v, g: &g, beta: &beta };
            let o1 = gdn_recurrent(x, &mut s1, d);
            let o2 = gdn_chunked(x, &mut s2, d);
            assert!(max_abs_diff(&o1, &o2) < 1e-4, "t={t}: out diff {}", max_abs_diff(&o1, &o2));
            assert!(max_abs_diff(&s1, &s2) < 1e-4, "t={t}: state diff {}", max_abs_diff(&s1, &s2));
            assert!(o1.iter().any(|x| x.abs() > 1e-3), "output must not be trivially zero");
        }
    }

    /// One step of the recurrence by hand: S = e^g S + k⊗((v − Sᵀk)β), o = Sᵀq.
    #[test]
    fn recurrent_step_matches_closed_form() {
        let d = GdnDims { key_heads: 1, value_heads: 1, key_dim: 2, value_dim: 1 };
        let (q, k, v) = ([3.0f32, 4.0], [1.0f32, 0.0], [2.0f32]);
        let (g, beta) = ([-0.5f32], [0.25f32]);
        let mut s = vec![1.0f32, 1.0];
        let o = gdn_recurrent(GdnInputs { q: &q, k: &k, v: &v, g: &g, beta: &beta }, &mut s, d);
        let e = (-0.5f32).exp();
        let s0 = e + 1.0 * ((2.0 - e) * 0.25);
        let s1 = e;
        assert!((s[0] - s0).abs() < 1e-6 && (s[1] - s1).abs() < 1e-6);
        let qn = [3.0 / 5.0 / 2f32.sqrt(), 4.0 / 5.0 / 2f32.sqrt()];
        assert!((o[0] - (qn[0] * s0 + qn[1] * s1)).abs() < 1e-5);
    }

    #[test]
    fn conv_state_continuation_equals_one_shot() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let (c, k, t) = (5, 4, 9);
        let w = rand_vec(&mut rng, c * k, 1.0);
        let x = rand_vec(&mut rng, t * c, 1.0);
        let mut s_one = vec![0f32; (k - 1) * c];
        let one = causal_conv1d_silu(&x, &mut s_one, &w, c, Precision::F32);
        let mut s = vec![0f32; (k - 1) * c];
        let mut pieces = causal_conv1d_silu(&x[..2 * c], &mut s, &w, c, Precision::F32);
        pieces.extend(causal_conv1d_silu(&x[2 * c..3 * c], &mut s, &w, c, Precision::F32));
        pieces.extend(causal_conv1d_silu(&x[3 * c..], &mut s, &w, c, Precision::F32));
        assert_eq!(one, pieces);
        assert_eq!(s, s_one);
        // First output only sees the current token through tap K-1.
        assert!((one[0] - silu(w[k - 1] * x[0])).abs() < 1e-6);
    }

    #[test]
    fn rope_rotates_pairs_j_and_j_plus_half() {
        let inv = rope_inv_freq(4, 10000.0);
        // one token, one head of dim 6: dims 4,5 pass through.
        let mut x = vec![1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0];
        rope(&mut x, 1, 6, &inv, 1, Precision::F32);
        let (c0, s0) = (1f32.cos(), 1f32.sin());
        assert!((x[0] - (1.0 * c0 - 3.0 * s0)).abs() < 1e-6);
        assert!((x[2] - (3.0 * c0 + 1.0 * s0)).abs() < 1e-6);
        assert_eq!(&x[4..], &[5.0, 6.0]);
    }

    #[test]
    fn attention_is_causal_and_grouped() {
        // 2 query heads share 1 kv head; the first query sees only the first key.
        let q = vec![1.0f32, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0];
        let k = vec![1.0f32, 0.0, 0.0, 1.0];
        let v = vec![10.0f32, 20.0, 30.0, 40.0];
        let o = attention(&q, &k, &v, AttnDims { q_heads: 2, kv_heads: 1, head_dim: 2 }, 1.0, Precision::F32);
        assert_eq!(&o[..4], &[10.0, 20.0, 10.0, 20.0]);
        let e = 1f32.exp();
        let w0 = e / (e + 1.0);
        assert!((o[4] - (w0 * 10.0 + (1.0 - w0) * 30.0)).abs() < 1e-4);
    }

    #[test]
    fn norms_use_one_plus_w_and_gate() {
        let x = [3.0f32, 4.0];
        let r = 1.0 / (12.5f32 + 1e-6).sqrt();
        let y = rms_norm(&x, &[0.5, -0.5], 1e-6, 1.0, Precision::F32);
        assert!((y[0] - 3.0 * r * 1.5).abs() < 1e-6 && (y[1] - 4.0 * r * 0.5).abs() < 1e-6);
        let y = rms_norm_gated(&x, &[1.0, -2.0], &[0.5, 2.0], 1e-6, Precision::F32);
        assert!((y[0] - 0.5 * 3.0 * r * silu(1.0)).abs() < 1e-6);
        assert!((y[1] - 2.0 * 4.0 * r * silu(-2.0)).abs() < 1e-6);
    }
}
