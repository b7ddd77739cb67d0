//! AWQ-lite (ModelOpt `awq_lite`, nvfp4.md §4.1) with exact folding into Qwen3.5's (1+w) norms.
//!
//! For a group of linears that read the same input `x` (q/k/v, in_proj_qkv/z, gate/up), search
//! per-input-channel scales `s` so that `(x/s) · Q(W·s)ᵀ` best matches `x · Wᵀ`, where `Q` is
//! NVFP4 weight fake-quant. The winning `1/s` is folded into the norm that produces `x`:
//! the norm computes `x̂·(1+w)`, so `(1+w') = (1+w)/s`, i.e. `w' = (1+w)/s − 1`. ModelOpt 0.47
//! folds `w' = w/s` there, which computes a different function.
//!
//! The linears after the mixers and the MLP have exact folds too (nvfp4.md §4.1b), which
//! ModelOpt cannot export for Qwen3.5: `down_proj` reads `silu(gate)·up`, so `1/s` scales
//! `up_proj`'s output rows; `o_proj` reads `softmax(QKᵀ)·V ⊙ σ(gate)` per head, so `1/s` scales
//! V's output rows — one V channel feeds every query head of its GQA group, so those heads share
//! one scale ([`Tie`]); GDN `out_proj` reads `RMSNorm(o)·w ⊙ silu(z)` with one `w[dv]` for all
//! value heads, so a scale per dimension shared across heads divides `w`. The search runs on the
//! shared scales directly (better than averaging per-channel ones, as ModelOpt's
//! `fuse_grouped_heads` does).

use fp4_format::nvfp4::{self, Nvfp4Weight};
use fp4_kernels::{ops, Precision, Tensor};

/// AWQ-lite knobs.
#[derive(Debug, Clone)]
pub struct AwqOptions {
    /// α grid step (ModelOpt's `alpha_step`, default 0.1 → 11 values).
    pub alpha_step: f32,
    /// Fold scales into the preceding norm (plain `NVFP4` output). When false, foldable groups
    /// keep `pre_quant_scale` instead: the unfolded reference the fold is tested against.
    pub fold: bool,
    /// Also search linears without an exact fold and write their `pre_quant_scale` (`NVFP4_AWQ`).
    pub allow_pre_quant_scale: bool,
    /// Search and fold the linears after the mixers and the MLP (o_proj, out_proj, down_proj)
    /// into their producers; off leaves them at s = 1 (the fold's measured baseline).
    pub output_folds: bool,
    /// The loss sees the activations as a W4A4 server computes them: `x/s` fake-quantized to
    /// NVFP4 under the input_scale the export writes for that `s` (from the per-channel amax).
    /// Off: weight fake-quant only (W4A16, ModelOpt's search).
    pub w4a4: bool,
    /// Calibration input rows kept per group for the search loss.
    pub max_rows: usize,
}

impl Default for AwqOptions {
    fn default() -> Self {
        AwqOptions {
            alpha_step: 0.1,
            fold: true,
            allow_pre_quant_scale: false,
            output_folds: true,
            w4a4: false,
            max_rows: 4096,
        }
    }
}

/// Input channels that must share one scale: channel `c` uses shared scale `of[c]` (< `n`).
#[derive(Debug, Clone)]
pub struct Tie {
    pub of: Vec<usize>,
    pub n: usize,
}

impl Tie {
    /// Every channel its own scale.
    pub fn identity(channels: usize) -> Tie {
        Tie { of: (0..channels).collect(), n: channels }
    }

    /// Channels `h·d + e` of `heads` heads of `d` sharing the scale of `group(h)·d + e`.
    pub fn heads(heads: usize, d: usize, groups: usize, group: impl Fn(usize) -> usize) -> Tie {
        Tie { of: (0..heads * d).map(|c| group(c / d) * d + c % d).collect(), n: groups * d }
    }

    /// Mean of `v` over the channels of each shared scale.
    fn reduce(&self, v: &[f32]) -> Vec<f32> {
        let (mut sum, mut count) = (vec![0f64; self.n], vec![0usize; self.n]);
        for (&i, &x) in self.of.iter().zip(v) {
            sum[i] += x as f64;
            count[i] += 1;
        }
        sum.iter().zip(&count).map(|(s, &c)| (s / c.max(1) as f64) as f32).collect()
    }

    /// The per-channel scales of shared scales `s`.
    pub fn expand(&self, s: &[f32]) -> Vec<f32> {
        self.of.iter().map(|&i| s[i]).collect()
    }
}

/// Result of the search for one group.
#[derive(Debug, Clone)]
pub struct Search {
    /// Winning α; `None` when no scaling (s = 1) beat every α.
    pub alpha: Option<f32>,
    /// Per-input-channel scale `s` (weights carry `W·s`, inputs `x/s`).
    pub scale: Vec<f32>,
    /// The shared scales `scale` expands ([`Tie`]; equal to `scale` without one).
    pub shared: Vec<f32>,
    /// Output MSE of plain RTN (s = 1) and of the chosen scales.
    pub mse_rtn: f64,
    pub mse_best: f64,
}

/// `w_s[c]`: mean over rows of `|W[r,c]|` relative to its 16-block's max (ModelOpt `get_weight_scale`).
pub fn weight_stat(weights: &[&Tensor]) -> Vec<f32> {
    let cols = weights[0].row_len();
    let mut acc = vec![0f64; cols];
    let mut rows = 0usize;
    for w in weights {
        for row in w.as_slice().chunks_exact(cols) {
            for (blk, out) in row.chunks(nvfp4::BLOCK).zip(acc.chunks_mut(nvfp4::BLOCK)) {
                let m = blk.iter().fold(0f32, |m, v| m.max(v.abs()));
                if m > 0.0 {
                    for (o, v) in out.iter_mut().zip(blk) {
                        *o += (v.abs() / m) as f64;
                    }
                }
            }
            rows += 1;
        }
    }
    acc.iter().map(|v| (v / rows.max(1) as f64) as f32).collect()
}

/// `s = clamp(a^α / (w^(1−α) + 1e-4), 1e-4, 1e4) / sqrt(max·min)` (ModelOpt `get_scale`).
pub fn scale_for(act: &[f32], wstat: &[f32], alpha: f32) -> Vec<f32> {
    let mut s: Vec<f32> =
        act.iter().zip(wstat).map(|(&a, &w)| (a.powf(alpha) / (w.powf(1.0 - alpha) + 1e-4)).clamp(1e-4, 1e4)).collect();
    let (mx, mn) = s.iter().fold((f32::MIN, f32::MAX), |(mx, mn), &v| (mx.max(v), mn.min(v)));
    let norm = (mx * mn).sqrt();
    s.iter_mut().for_each(|v| *v /= norm);
    s
}

/// Columns of `w [out, in]` multiplied by `s`.
pub fn scale_columns(w: &Tensor, s: &[f32]) -> Tensor {
    let mut out = w.clone();
    for row in out.as_mut_slice().chunks_exact_mut(s.len()) {
        row.iter_mut().zip(s).for_each(|(v, k)| *v *= k);
    }
    out
}

/// Sum of squared output errors of the group under scales `s` (weights fake-quantized with the
/// group's shared amax, as they will be exported; with `input_amax`, the per-channel input
/// amax, the inputs `x/s` too, under the input_scale `max_c(amax[c]/s[c])` gives).
fn group_sse(x: &Tensor, refs: &[Tensor], weights: &[&Tensor], s: &[f32], input_amax: Option<&[f32]>) -> f64 {
    let inv: Vec<f32> = s.iter().map(|v| 1.0 / v).collect();
    let mut xs = scale_columns(x, &inv);
    if let Some(amax) = input_amax {
        let a = amax.iter().zip(s).fold(0f32, |m, (a, k)| m.max(a / k));
        if a > 0.0 && xs.row_len().is_multiple_of(nvfp4::BLOCK) {
            nvfp4::fake_quantize_activations(xs.as_mut_slice(), nvfp4::nvfp4_global_scale(a));
        }
    }
    let scaled: Vec<Tensor> = weights.iter().map(|w| scale_columns(w, s)).collect();
    let amax = scaled.iter().map(|w| nvfp4::amax(w.as_slice())).fold(0f32, f32::max);
    let gs = nvfp4::nvfp4_global_scale(amax);
    let mut sse = 0f64;
    for (w, r) in scaled.iter().zip(refs) {
        let (rows, cols) = (w.shape()[0], w.shape()[1]);
        let q = Nvfp4Weight::quantize(w.as_slice(), rows, cols, gs).dequantize();
        let y = ops::linear(&xs, &Tensor::from_vec(q, &[rows, cols]), None, Precision::F32);
        sse += y.as_slice().iter().zip(r.as_slice()).map(|(a, b)| ((a - b) as f64).powi(2)).sum::<f64>();
    }
    sse
}

/// Searches α for a group of linears sharing input rows `x [n, in]` with per-channel mean |x|
/// `act`. The identity scale (plain RTN) is a candidate too, so the search never loses to RTN
/// on its own objective.
pub fn search(x: &Tensor, act: &[f32], weights: &[&Tensor], opts: &AwqOptions) -> Search {
    search_tied(x, act, None, weights, opts, &Tie::identity(act.len()))
}

/// [`search`] with scales shared across the channels `tie` groups: the statistics are averaged
/// per shared scale, the candidates computed there and expanded for the loss. `amax` (the
/// per-channel input amax) is what a W4A4 loss ([`AwqOptions::w4a4`]) quantizes the inputs by.
pub fn search_tied(
    x: &Tensor,
    act: &[f32],
    amax: Option<&[f32]>,
    weights: &[&Tensor],
    opts: &AwqOptions,
    tie: &Tie,
) -> Search {
    let refs: Vec<Tensor> = weights.iter().map(|w| ops::linear(x, w, None, Precision::F32)).collect();
    let n_out: usize = refs.iter().map(Tensor::elem_count).sum();
    let input_amax = amax.filter(|_| opts.w4a4);
    let mse = |s: &[f32]| group_sse(x, &refs, weights, s, input_amax) / n_out.max(1) as f64;
    let ones = vec![1f32; act.len()];
    let mse_rtn = mse(&ones);
    let mut best = Search { alpha: None, scale: ones, shared: vec![1f32; tie.n], mse_rtn, mse_best: mse_rtn };
    let (act, wstat) = (tie.reduce(act), tie.reduce(&weight_stat(weights)));
    let steps = (1.0 / opts.alpha_step).round() as usize;
    for k in 0..=steps {
        let alpha = k as f32 * opts.alpha_step;
        let shared = scale_for(&act, &wstat, alpha);
        let s = tie.expand(&shared);
        let m = mse(&s);
        if m < best.mse_best {
            best = Search { alpha: Some(alpha), scale: s, shared, mse_rtn, mse_best: m };
        }
    }
    best
}

/// Rows of `w [out, in]` divided by `s[row]` (the producer side of an output-row fold).
pub fn divide_rows(w: &Tensor, s: &[f32]) -> Tensor {
    let mut out = w.clone();
    let cols = w.row_len();
    for (row, k) in out.as_mut_slice().chunks_exact_mut(cols).zip(s) {
        row.iter_mut().for_each(|v| *v /= k);
    }
    out
}

/// Folds `1/s` into a (1+w) norm weight: `w' = (1+w)/s − 1`.
pub fn fold_into_one_plus_norm(norm: &mut [f32], s: &[f32]) {
    norm.iter_mut().zip(s).for_each(|(w, k)| *w = (1.0 + *w) / k - 1.0);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lcg(seed: u64, n: usize) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((s >> 33) as f32 / (1u64 << 31) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    #[test]
    fn fold_is_exact_for_one_plus_w_norms() {
        let x = lcg(1, 32);
        let w = lcg(2, 32);
        let s: Vec<f32> = lcg(3, 32).iter().map(|v| 0.5 + v.abs()).collect();
        let mut folded = w.clone();
        fold_into_one_plus_norm(&mut folded, &s);
        for i in 0..32 {
            // norm(x)·(1+w')  ==  norm(x)·(1+w) / s
            let a = x[i] * (1.0 + folded[i]);
            let b = x[i] * (1.0 + w[i]) / s[i];
            assert!((a - b).abs() < 1e-5, "{i}: {a} vs {b}");
        }
    }

    #[test]
    fn scale_is_normalised_and_alpha_zero_ignores_activations() {
        let act: Vec<f32> = (1..=32).map(|v| v as f32).collect();
        let wstat: Vec<f32> = (1..=32).map(|v| 1.0 / v as f32).collect();
        let s = scale_for(&act, &wstat, 0.5);
        let (mx, mn) = s.iter().fold((f32::MIN, f32::MAX), |(a, b), &v| (a.max(v), b.min(v)));
        assert!((mx * mn - 1.0).abs() < 1e-4, "geometric centre is 1");
        let s0 = scale_for(&act, &wstat, 0.0);
        let s0b = scale_for(&[7.0; 32], &wstat, 0.0);
        assert_eq!(s0, s0b);
    }

    #[test]
    fn tied_scales_are_shared_and_identity_tie_changes_nothing() {
        let tie = Tie::heads(4, 3, 2, |h| h / 2);
        assert_eq!(tie.of, vec![0, 1, 2, 0, 1, 2, 3, 4, 5, 3, 4, 5]);
        assert_eq!(tie.reduce(&[1., 2., 3., 3., 4., 5., 0., 0., 0., 2., 2., 2.]), vec![2., 3., 4., 1., 1., 1.]);
        let tie = Tie::heads(4, 8, 2, |h| h / 2);
        let (n, cin, cout) = (32, 32, 8);
        let x = Tensor::from_vec(lcg(7, n * cin).iter().map(|v| v * 3.0).collect(), &[n, cin]);
        let w = Tensor::from_vec(lcg(8, cout * cin), &[cout, cin]);
        let act: Vec<f32> = (0..cin).map(|c| 0.5 + c as f32).collect();
        let r = search_tied(&x, &act, None, &[&w], &AwqOptions::default(), &tie);
        for c in 0..cin {
            assert_eq!(r.scale[c], r.shared[tie.of[c]], "channel {c} uses its shared scale");
        }
        let plain = search(&x, &act, &[&w], &AwqOptions::default());
        let ident = search_tied(&x, &act, None, &[&w], &AwqOptions::default(), &Tie::identity(cin));
        assert_eq!((plain.alpha, plain.scale, plain.mse_best), (ident.alpha, ident.scale, ident.mse_best));
    }

    #[test]
    fn search_helps_inputs_with_outlier_channels() {
        let (n, cin, cout) = (64, 64, 48);
        let mut x = lcg(4, n * cin);
        // Three outlier channels, 40x larger than the rest.
        for row in x.chunks_exact_mut(cin) {
            for c in [5, 17, 40] {
                row[c] *= 40.0;
            }
        }
        let x = Tensor::from_vec(x, &[n, cin]);
        let w = Tensor::from_vec(lcg(5, cout * cin), &[cout, cin]);
        let mut act = vec![0f32; cin];
        for row in x.as_slice().chunks_exact(cin) {
            act.iter_mut().zip(row).for_each(|(a, v)| *a += v.abs() / n as f32);
        }
        let r = search(&x, &act, &[&w], &AwqOptions::default());
        assert!(r.alpha.is_some(), "an α beats plain RTN here");
        assert!(r.mse_best < 0.8 * r.mse_rtn, "{} vs {}", r.mse_best, r.mse_rtn);
    }
}
