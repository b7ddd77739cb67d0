//! The GPU half of `fp4 selftest` (feature `cuda`).

use super::Args;
use anyhow::Context;
use fp4_format::nvfp4::{self, Nvfp4Weight};
use fp4_format::Checkpoint;
use fp4_kernels::cuda::{self, Gpu, GpuWeight, Nvfp4Layout};
use fp4_kernels::ops::{self, GdnAlgo, GdnDims, SampleParams};
use fp4_kernels::{cpu, Device, Ids, Precision, Tensor};
use fp4_model::{LoadOptions, Logits, Qwen35, Synthetic, SyntheticFormat, WeightSource};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::time::Instant;

pub(super) const F32: Precision = Precision::F32;

/// Deterministic normal samples (Box–Muller over a 64-bit LCG): no zeros in practice.
pub(super) struct Normal(pub(super) u64);

impl Normal {
    pub(super) fn uniform(&mut self) -> f64 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((self.0 >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }
    pub(super) fn sample(&mut self) -> f32 {
        let (u, v) = (self.uniform(), self.uniform());
        ((-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()) as f32
    }
    pub(super) fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.sample() * scale).collect()
    }
    pub(super) fn tensor(&mut self, shape: &[usize], scale: f32) -> Tensor {
        Tensor::from_vec(self.vec(shape.iter().product(), scale), shape)
    }
}

/// Pass/fail table rows and the JSON behind them.
#[derive(Default)]
pub(super) struct Report {
    checks: Vec<Value>,
    failed: usize,
}

impl Report {
    pub(super) fn check(&mut self, what: &str, err: f64, tol: f64) {
        let pass = err.is_finite() && err <= tol;
        self.failed += usize::from(!pass);
        println!("{what:<52} err {err:.2e} (tol {tol:.0e}) {}", if pass { "ok" } else { "FAIL" });
        self.checks.push(json!({"check": what, "err": err, "tol": tol, "pass": pass}));
    }

    pub(super) fn require(&mut self, what: &str, pass: bool, detail: Value) {
        self.failed += usize::from(!pass);
        println!("{what:<52} {}", if pass { "ok" } else { "FAIL" });
        self.checks.push(json!({"check": what, "pass": pass, "detail": detail}));
    }
}

pub(super) fn gpu_t(t: &Tensor) -> Tensor {
    t.to_device(Device::Cuda)
}

/// max |gpu − cpu| / max |cpu|.
pub(super) fn rel_err(gpu: &Tensor, cpu: &Tensor) -> f64 {
    let (g, c) = (gpu.to_vec(), cpu.to_vec());
    assert_eq!(g.len(), c.len(), "compared tensors differ in size");
    let m = c.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-30) as f64;
    g.iter().zip(&c).map(|(a, b)| (a - b).abs() as f64).fold(0f64, f64::max) / m
}

pub(super) fn random_nvfp4(rng: &mut Normal, rows: usize, cols: usize) -> Nvfp4Weight {
    let mut w = rng.vec(rows * cols, 1.0 / (cols as f32).sqrt());
    // A few large weights, as real checkpoints have, so blocks use different scales.
    for i in (0..w.len()).step_by(977) {
        w[i] *= 12.0;
    }
    Nvfp4Weight::quantize(&w, rows, cols, nvfp4::nvfp4_global_scale(nvfp4::amax(&w)))
}

/// Several NVFP4 weights of one input in one tensor-core GEMV launch (as q/k/v, gate/up and the
/// GDN input projections run), each against the CPU; and a token's result is the same bits
/// whatever batch it is in (1, 13 or 64 tokens: each n-tile walks K in the same order).
fn mma_group_checks(g: &Gpu, rep: &mut Report, rng: &mut Normal) {
    g.set_exact_gemm(false);
    // The device repack (nvfp4_repack) = the host one (fp4_format::nvfp4::gemv_repack) that W4A16
    // uploads use.
    let q = random_nvfp4(rng, 48, 4096);
    let on_device = g.download(&g.nvfp4_repacked(&g.upload_nvfp4_modelopt(&q)).expect("repack").packed);
    let same = on_device == nvfp4::gemv_repack(&q.packed);
    rep.require("nvfp4_repack on the device = gemv_repack on the host, bytes", same, json!({}));
    for cols in [160, 4096] {
        // More weights than one launch takes (4), rows not multiples of the 16-row tile.
        let rows = [131, 16, 7, 64, 50];
        let qs: Vec<Nvfp4Weight> = rows.iter().map(|&r| random_nvfp4(rng, r, cols)).collect();
        let gq: Vec<cuda::GpuNvfp4> = qs.iter().map(|q| g.upload_nvfp4(q)).collect();
        let refs: Vec<&cuda::GpuNvfp4> = gq.iter().collect();
        let x = rng.tensor(&[64, cols], 1.0);
        let mut first_token: Vec<Vec<f32>> = Vec::new();
        for t in [1, 13, 64] {
            let xt = Tensor::from_vec(x.as_slice()[..t * cols].to_vec(), &[t, cols]);
            let ys = ops::nvfp4_same_input(&gpu_t(&xt), &refs).expect("the tensor-core GEMV applies");
            let mut err = 0f64;
            for (y, q) in ys.iter().zip(&qs) {
                let w = Tensor::from_vec(q.dequantize(), &[q.rows, q.cols]);
                err = err.max(rel_err(y, &ops::linear(&xt, &w, None, F32)));
            }
            rep.check(&format!("mma gemv group of {} weights {t}x{cols}", rows.len()), err, 2e-3);
            let row0: Vec<f32> = ys.iter().flat_map(|y| y.to_vec()[..y.shape()[1]].to_vec()).collect();
            first_token.push(row0);
        }
        let same = first_token.iter().all(|r| r.iter().zip(&first_token[0]).all(|(a, b)| a.to_bits() == b.to_bits()));
        rep.require(&format!("mma gemv token 0 bit-identical at batch 1/13/64 (k={cols})"), same, json!({}));
        // Both kernels and every geometry give the same bits (the row-splitting kernel folds K in
        // the K-splitting kernel's order; the deep pipeline only loads earlier).
        let weights = &refs;
        let bits_of = |t: usize| {
            let xt = g.upload(&x.as_slice()[..t * cols]);
            let act = g.mma_activations(&xt, t, cols).expect("activations");
            move |k: cuda::GemvKernel| -> Vec<u32> {
                let ys = g.nvfp4_mma_gemv_group_with(k, &act, weights).expect("gemv");
                ys.iter().flat_map(|y| g.download(y)).map(f32::to_bits).collect()
            }
        };
        for t in [1, 5, 8] {
            let run = bits_of(t);
            let same = run(cuda::GemvKernel::SplitKDeep) == run(cuda::GemvKernel::SplitK { nt: 1 });
            rep.require(&format!("mma gemv deep pipeline = split-K kernel, bit for bit, {t}x{cols}"), same, json!({}));
        }
        for t in [17, 33, 64] {
            let run = bits_of(t);
            let nt = t.div_ceil(8).next_power_of_two();
            let want = run(cuda::GemvKernel::SplitK { nt });
            let same = run(cuda::GemvKernel::Rows { nt }) == want;
            rep.require(&format!("mma gemv rows kernel = split-K kernel, bit for bit, {t}x{cols}"), same, json!({}));
            let same = run(cuda::GemvKernel::SplitRows { nt }) == want;
            rep.require(
                &format!("mma gemv split-rows kernel = split-K kernel, bit for bit, {t}x{cols}"),
                same,
                json!({}),
            );
        }
    }
}

/// The batched bf16 GEMV (2–8 tokens, each weight read once): a narrow weight (a row per warp)
/// and one wide enough for several rows per warp (rows not a multiple of them), against the CPU,
/// and every token's outputs the same bits as that token alone (the one-token kernel).
fn bf16_batch_checks(g: &Gpu, rep: &mut Report, rng: &mut Normal) {
    for (rows, cols) in [(1536, 512), (8451, 256)] {
        let w: Vec<f32> = rng.vec(rows * cols, 0.05).into_iter().map(fp4_format::dtype::round_bf16).collect();
        let scale = 0.37;
        let gw = g.upload_bf16(&w, rows, cols, scale);
        let w = Tensor::from_vec(w.iter().map(|v| v * scale).collect(), &[rows, cols]);
        let x = rng.tensor(&[cuda::GEMV_MAX_TOKENS, cols], 1.0);
        let alone: Vec<Vec<u32>> = (0..cuda::GEMV_MAX_TOKENS)
            .map(|i| {
                let xi = Tensor::from_vec(x.as_slice()[i * cols..(i + 1) * cols].to_vec(), &[1, cols]);
                ops::linear_gpu(&gpu_t(&xi), &gw, None, None, None).to_vec().into_iter().map(f32::to_bits).collect()
            })
            .collect();
        let (mut err, mut same) = (0f64, true);
        for t in 2..=cuda::GEMV_MAX_TOKENS {
            let xt = Tensor::from_vec(x.as_slice()[..t * cols].to_vec(), &[t, cols]);
            let got = ops::linear_gpu(&gpu_t(&xt), &gw, None, None, None);
            err = err.max(rel_err(&got, &ops::linear(&xt, &w, None, F32)));
            let bits: Vec<u32> = got.to_vec().into_iter().map(f32::to_bits).collect();
            same &= bits.chunks(rows).zip(&alone).all(|(b, a)| b == a.as_slice());
        }
        rep.check(&format!("linear bf16 batched gemv 2..8 tokens x{cols}→{rows}"), err, 1e-5);
        rep.require(&format!("bf16 batched gemv = one token alone, bit for bit ({rows} rows)"), same, json!({}));
    }
    // Two small weights of one input in one launch (the GDN's in_proj_b and in_proj_a) = each alone.
    let cols = 4096;
    let small: Vec<GpuWeight> = [(32, 1.0), (48, 0.37)]
        .iter()
        .map(|&(rows, scale)| {
            let w: Vec<f32> = rng.vec(rows * cols, 0.05).into_iter().map(fp4_format::dtype::round_bf16).collect();
            g.upload_bf16(&w, rows, cols, scale)
        })
        .collect();
    for t in [1, 7, 64] {
        let x = gpu_t(&rng.tensor(&[t, cols], 1.0));
        let bits = |y: &Tensor| -> Vec<u32> { y.to_vec().into_iter().map(f32::to_bits).collect() };
        let pair = ops::bf16_small_pair(&x, [&small[0], &small[1]]);
        let same = pair.is_some_and(|ys| {
            ys.iter().zip(&small).all(|(y, w)| bits(y) == bits(&ops::linear_gpu(&x, w, None, None, None)))
        });
        rep.require(
            &format!("bf16 pair of small weights in one launch = each alone, bit for bit ({t} tokens)"),
            same,
            json!({}),
        );
    }
}

/// Linear layers: NVFP4 and bf16 (scale 1 and an FP8-style per-tensor scale) through the GEMV
/// (≤ 8 tokens) and the GEMM (exact f32 and bf16 tensor cores), with bias and pre_quant_scale.
fn linear_checks(g: &Gpu, rep: &mut Report, rng: &mut Normal) {
    // K not a multiple of the MMA GEMV's 128-wide chunk (64, 160) or of 32 (144: CUDA-core GEMV
    // only), rows not a multiple of its 16-row tile (131, 50), the 9B's down_proj.
    for (rows, cols) in [(48, 64), (96, 144), (50, 160), (131, 4096), (4096, 12288)] {
        let q = random_nvfp4(rng, rows, cols);
        let w_nv = Tensor::from_vec(q.dequantize(), &[rows, cols]);
        let gw_nv = GpuWeight::Nvfp4(g.upload_nvfp4(&q));
        let w_bf: Vec<f32> = rng.vec(rows * cols, 0.05).into_iter().map(fp4_format::dtype::round_bf16).collect();
        let fp8_scale = 0.37;
        let gw_bf = g.upload_bf16(&w_bf, rows, cols, fp8_scale);
        let w_bf = Tensor::from_vec(w_bf.iter().map(|v| v * fp8_scale).collect(), &[rows, cols]);
        let tokens: &[usize] = if rows * cols > 1 << 24 { &[1, 8, 64] } else { &[1, 3, 8, 13, 40, 64, 70] };
        for &t in tokens {
            let mut x = rng.tensor(&[t, cols], 1.0);
            if t == 3 {
                x.as_mut_slice()[5] = 3.0e5; // far beyond f16's range: the per-token scale absorbs it
            }
            for (name, gw, w) in [("nvfp4", &gw_nv, &w_nv), ("bf16·scale", &gw_bf, &w_bf)] {
                let want = ops::linear(&x, w, None, F32);
                for exact in [true, false] {
                    g.set_exact_gemm(exact);
                    let got = ops::linear_gpu(&gpu_t(&x), gw, None, None, None);
                    let mma = name == "nvfp4" && t <= cuda::MMA_GEMV_MAX_TOKENS && cols % 32 == 0;
                    // f16 activations: 2^-11 relative per element.
                    let (path, tol) = match (t <= cuda::GEMV_MAX_TOKENS, exact, mma) {
                        (true, true, _) | (true, false, false) => ("gemv f32", 1e-5),
                        (false, true, _) => ("gemm f32", 1e-5),
                        (_, false, true) => ("mma gemv f16", 2e-3),
                        (false, false, false) => ("gemm bf16", 2e-2),
                    };
                    rep.check(&format!("linear {name} {path} {t}x{cols}→{rows}"), rel_err(&got, &want), tol);
                }
            }
        }
    }
    mma_group_checks(g, rep, rng);
    bf16_batch_checks(g, rep, rng);
    g.set_exact_gemm(true);
    // Bias and AWQ pre_quant_scale on both paths; an f32 weight (tied LM head) through cuBLAS.
    let (rows, cols) = (80, 256);
    let q = random_nvfp4(rng, rows, cols);
    let w = Tensor::from_vec(q.dequantize(), &[rows, cols]);
    let gw = GpuWeight::Nvfp4(g.upload_nvfp4(&q));
    let bias = rng.tensor(&[rows], 0.5);
    let pqs = Tensor::from_vec(rng.vec(cols, 0.5).iter().map(|v| 1.0 + v.abs()).collect(), &[cols]);
    for t in [2, 33] {
        let x = rng.tensor(&[t, cols], 1.0);
        let xs = Tensor::from_vec(
            x.as_slice().chunks(cols).flat_map(|r| r.iter().zip(pqs.as_slice()).map(|(a, b)| a * b)).collect(),
            &[t, cols],
        );
        let want = ops::linear(&xs, &w, Some(&bias), F32);
        let got = ops::linear_gpu(&gpu_t(&x), &gw, Some(&gpu_t(&bias)), Some(&gpu_t(&pqs)), None);
        rep.check(&format!("linear nvfp4 + bias + pre_quant_scale {t} tokens"), rel_err(&got, &want), 1e-5);
        let wf = rng.tensor(&[rows, cols], 0.1);
        let want = ops::linear(&x, &wf, Some(&bias), F32);
        let got = ops::linear(&gpu_t(&x), &gpu_t(&wf), Some(&gpu_t(&bias)), F32);
        rep.check(&format!("linear f32 weight + bias {t} tokens"), rel_err(&got, &want), 1e-5);
    }
}

/// W4A4: activation quantization (bytes equal to the CPU's), the block-scaled FP4 GEMM against
/// the CPU emulation of the tensor-core instruction, and the model's W4A4 linear against the CPU
/// fake-quant path, with calibrated and too-small input scales (saturating blocks), K not a
/// multiple of 64 and partial tiles. On SM12x the GEMM runs the native MMA, elsewhere the emulated
/// one (same fragment loads), so the same checks cover both.
fn w4a4_checks(g: &Gpu, rep: &mut Report, rng: &mut Normal) -> anyhow::Result<()> {
    use fp4_format::nvfp4::Nvfp4Activations;
    // The f32 references below need exact GEMMs (the f16 serving path is checked on its own).
    g.set_exact_gemm(true);
    let native = g.w4a4_native()?;
    println!("W4A4 GEMM: {} block-scaled FP4 MMA", if native { "native" } else { "emulated" });
    for (t, n, k) in [(1, 64, 64), (5, 96, 80), (37, 300, 208), (130, 520, 1024), (70, 1024, 4096)] {
        let mut x = rng.vec(t * k, 1.0);
        for (i, v) in x.iter_mut().enumerate() {
            *v *= 1.0 + (i / 16 % 5) as f32; // block magnitudes vary
        }
        let q = random_nvfp4(rng, n, k);
        let gw = GpuWeight::Nvfp4(g.upload_nvfp4_modelopt(&q));
        let GpuWeight::Nvfp4(gq) = &gw else { unreachable!() };
        let calibrated = nvfp4::nvfp4_global_scale(nvfp4::amax(&x));
        for (label, input_scale) in [("calibrated", calibrated), ("saturating", calibrated * 0.25)] {
            let want = Nvfp4Activations::quantize(&x, k, input_scale);
            let xg = g.upload(&x);
            let (codes, scales) = g.quantize_act_nvfp4(&xg, t, k, input_scale)?;
            let (codes, scales) = (g.download(&codes), g.download(&scales));
            let diff = codes.iter().zip(&want.packed).filter(|(a, b)| a != b).count()
                + scales.iter().zip(&want.scales).filter(|(a, b)| a != b).count();
            let what = format!("nvfp4 activation quant {t}x{k} {label}: bytes = CPU");
            rep.require(&what, diff == 0, json!({"differing_bytes": diff}));
            let y_cpu = Tensor::from_vec(nvfp4::w4a4_matmul(&want, &q), &[t, n]);
            let (ac, asc) = (g.upload(&want.packed), g.upload(&want.scales));
            let y = Tensor::from_cuda(g.w4a4_gemm(&ac, &asc, t, want.g, gq)?, &[t, n]);
            rep.check(&format!("w4a4 gemm {t}x{k}→{n} {label} vs CPU emulation"), rel_err(&y, &y_cpu), 1e-5);
            let mut fq = x.clone();
            nvfp4::fake_quantize_activations(&mut fq, input_scale);
            let w = Tensor::from_vec(q.dequantize(), &[n, k]);
            let want = ops::linear(&Tensor::from_vec(fq, &[t, k]), &w, None, F32);
            let act = Some(cuda::ActQuant::Nvfp4 { input_scale });
            let xg = gpu_t(&Tensor::from_vec(x.clone(), &[t, k]));
            let got = ops::linear_gpu(&xg, &gw, None, None, act);
            let path = if t <= cuda::GEMV_MAX_TOKENS { "fake-quant + gemv" } else { "fp4 mma" };
            let what = format!("linear w4a4 ({path}) {t}x{k}→{n} {label} vs CPU fake quant");
            rep.check(&what, rel_err(&got, &want), 1e-5);
            if t <= cuda::GEMV_MAX_TOKENS && k % 32 == 0 {
                // The serving path: fake-quantized activations through the tensor-core GEMV (f16).
                g.set_exact_gemm(false);
                let got = ops::linear_gpu(&xg, &gw, None, None, act);
                g.set_exact_gemm(true);
                let what = format!("linear w4a4 (fake-quant + mma gemv f16) {t}x{k}→{n} {label} vs CPU fake quant");
                rep.check(&what, rel_err(&got, &want), 2e-3);
            }
        }
    }
    Ok(())
}

/// Every other op of the model on shapes of the tiny fixtures and of the 9B.
fn op_checks(rep: &mut Report, rng: &mut Normal) {
    // Vectorised norms (d % 4 == 0, up to 16384) and the scalar ones (1002; 20000).
    for (rows, d) in [(1, 4096), (7, 64), (3, 1000), (2, 1002), (1, 20000)] {
        let x = rng.tensor(&[rows, d], 2.0);
        let y = rng.tensor(&[rows, d], 1.0);
        let w = rng.tensor(&[d], 0.3);
        for offset in [1.0, 0.0] {
            let want = ops::rms_norm(&x, &w, 1e-6, offset, F32);
            let got = ops::rms_norm(&gpu_t(&x), &gpu_t(&w), 1e-6, offset, F32);
            rep.check(&format!("rms_norm {rows}x{d} offset {offset}"), rel_err(&got, &want), 1e-5);
        }
        let (want_h, want) = ops::add_rms_norm(&x, &y, &w, 1e-6, 1.0, F32);
        let (got_h, got) = ops::add_rms_norm(&gpu_t(&x), &gpu_t(&y), &gpu_t(&w), 1e-6, 1.0, F32);
        rep.check(
            &format!("add_rms_norm {rows}x{d} (sum, norm)"),
            rel_err(&got_h, &want_h).max(rel_err(&got, &want)),
            1e-5,
        );
        let want = ops::rms_norm_gated(&x, &y, &w, 1e-6, F32);
        let got = ops::rms_norm_gated(&gpu_t(&x), &gpu_t(&y), &gpu_t(&w), 1e-6, F32);
        rep.check(&format!("rms_norm_gated {rows}x{d}"), rel_err(&got, &want), 1e-5);
        type Op = fn(&Tensor, &Tensor, Precision) -> Tensor;
        for (name, op) in [("silu_mul", ops::silu_mul as Op), ("sigmoid_gate", ops::sigmoid_gate), ("add", ops::add)] {
            let got = op(&gpu_t(&x), &gpu_t(&y), F32);
            rep.check(&format!("{name} {rows}x{d}"), rel_err(&got, &op(&x, &y, F32)), 1e-6);
        }
    }
    let table = rng.tensor(&[1000, 96], 1.0);
    let ids: Vec<u32> = (0..37).map(|i| (i * 7919 % 1000) as u32).collect();
    let got = ops::embedding(&gpu_t(&table), &ids);
    rep.check("embedding 37 of 1000x96", rel_err(&got, &ops::embedding(&table, &ids)), 0.0);

    let x = rng.tensor(&[5, 40], 1.0);
    let (want, got) = (ops::split_last(&x, &[16, 8, 16]), ops::split_last(&gpu_t(&x), &[16, 8, 16]));
    let err = want.iter().zip(&got).map(|(w, g)| rel_err(g, w)).fold(0.0, f64::max);
    rep.check("split_last 5x40 → 16|8|16", err, 0.0);
    let (a, b) = (rng.tensor(&[5, 24], 1.0), rng.tensor(&[5, 40], 1.0));
    let got = ops::cat_cols(&gpu_t(&a), &gpu_t(&b));
    rep.check("cat_cols 5x24 | 5x40", rel_err(&got, &ops::cat_cols(&a, &b)), 0.0);
    let y = rng.tensor(&[3, 40], 1.0);
    rep.check("cat_rows 5+3 x40", rel_err(&ops::cat_rows(&gpu_t(&x), &gpu_t(&y)), &ops::cat_rows(&x, &y)), 0.0);
    rep.check("last_row 5x40", rel_err(&ops::last_row(&gpu_t(&x)), &ops::last_row(&x)), 0.0);

    // Partial RoPE (rotary 64 of head 256) at positions far from 0.
    let inv = ops::rope_inv_freq(64, 1e7);
    let inv = Tensor::from_vec(inv.clone(), &[inv.len()]);
    let mut want = rng.tensor(&[6, 4, 256], 1.0);
    let mut got = gpu_t(&want);
    ops::rope(&mut want, &inv, 1234, F32);
    ops::rope(&mut got, &gpu_t(&inv), 1234, F32);
    rep.check("rope 6x4x256 rotary 64 at pos 1234", rel_err(&got, &want), 1e-5);

    // Conv: a 9-token prefill then 2 single-token steps, outputs and state.
    let (c, k) = (8192, 4);
    let w = rng.tensor(&[c, k], 0.5);
    let mut s_cpu = rng.tensor(&[k - 1, c], 1.0);
    let mut s_gpu = gpu_t(&s_cpu);
    for t in [9, 1, 1, 200] {
        let x = rng.tensor(&[t, c], 1.0);
        let want = ops::causal_conv1d_silu(&x, &mut s_cpu, &w, F32);
        let got = ops::causal_conv1d_silu(&gpu_t(&x), &mut s_gpu, &gpu_t(&w), F32);
        let err = rel_err(&got, &want).max(rel_err(&s_gpu, &s_cpu));
        rep.check(&format!("causal_conv1d_silu {t}x{c} k{k} (+state)"), err, 1e-5);
    }

    let (b, a) = (rng.tensor(&[5, 32], 2.0), rng.tensor(&[5, 32], 2.0));
    let (a_log, dt) = (rng.tensor(&[32], 1.0), rng.tensor(&[32], 1.0));
    let (beta_c, g_c) = ops::gdn_gates(&b, &a, &a_log, &dt, F32);
    let (beta_g, g_g) = ops::gdn_gates(&gpu_t(&b), &gpu_t(&a), &gpu_t(&a_log), &gpu_t(&dt), F32);
    rep.check("gdn_gates 5x32", rel_err(&beta_g, &beta_c).max(rel_err(&g_g, &g_c)), 1e-6);

    // Delta rule: 9B head geometry and a grouped small one; prefill against both CPU algorithms.
    for (d, t) in [
        (GdnDims { key_heads: 16, value_heads: 32, key_dim: 128, value_dim: 128 }, 1),
        (GdnDims { key_heads: 16, value_heads: 32, key_dim: 128, value_dim: 128 }, 70),
        (GdnDims { key_heads: 2, value_heads: 6, key_dim: 16, value_dim: 40 }, 130),
        (GdnDims { key_heads: 2, value_heads: 4, key_dim: 64, value_dim: 64 }, 200),
    ] {
        let q = rng.tensor(&[t, d.key_heads * d.key_dim], 1.0);
        let k = rng.tensor(&[t, d.key_heads * d.key_dim], 1.0);
        let v = rng.tensor(&[t, d.value_heads * d.value_dim], 1.0);
        let g =
            Tensor::from_vec(rng.vec(t * d.value_heads, 0.5).iter().map(|x| -x.abs()).collect(), &[t, d.value_heads]);
        let beta = Tensor::from_vec(
            rng.vec(t * d.value_heads, 1.0).iter().map(|x| cpu::sigmoid(*x)).collect(),
            &[t, d.value_heads],
        );
        let init = rng.tensor(&[d.value_heads, d.key_dim, d.value_dim], 0.3);
        let (qg, kg, vg, gg, bg) = (gpu_t(&q), gpu_t(&k), gpu_t(&v), gpu_t(&g), gpu_t(&beta));
        for gpu_algo in [GdnAlgo::Recurrent, GdnAlgo::Chunked] {
            let mut s_gpu = gpu_t(&init);
            let got = ops::gated_delta_rule(&qg, &kg, &vg, &gg, &bg, &mut s_gpu, d, gpu_algo);
            for algo in [GdnAlgo::Recurrent, GdnAlgo::Chunked] {
                let mut s_cpu = init.clone();
                let want = ops::gated_delta_rule(&q, &k, &v, &g, &beta, &mut s_cpu, d, algo);
                let err = rel_err(&got, &want).max(rel_err(&s_gpu, &s_cpu));
                let what = format!(
                    "gated_delta_rule {gpu_algo:?} {t} tok {}x{}/{}x{} vs CPU {algo:?}",
                    d.key_heads, d.key_dim, d.value_heads, d.value_dim
                );
                rep.check(&what, err, 1e-4);
            }
        }
    }

    // Attention: prefill (T = L), decode over a cache (T = 1), continuing prefill; GQA 16/4 and 6/2;
    // exact (f32 on CUDA cores) and on tensor cores (f16 scores, bf16 values: ~2^-9 relative).
    let g = cuda::gpu();
    for (t, l, hq, hkv, d) in [
        (37, 37, 16, 4, 256),
        (1, 300, 16, 4, 256),
        (5, 140, 16, 4, 256),
        (300, 300, 16, 4, 256),
        (1000, 1000, 16, 4, 256),
        (70, 1100, 16, 4, 256),
        (130, 200, 6, 2, 64),
        (9, 20, 6, 2, 40),
        (100, 100, 4, 4, 128),
    ] {
        let q = rng.tensor(&[t, hq, d], 1.0);
        let k = rng.tensor(&[l, hkv, d], 1.0);
        let v = rng.tensor(&[l, hkv, d], 1.0);
        let scale = (d as f32).powf(-0.5);
        let want = ops::attention(&q, &k, &v, scale, F32);
        for (exact, path, tol) in [(true, "f32", 1e-5), (false, "tensor cores", 1e-2)] {
            g.set_exact_gemm(exact);
            let got = ops::attention(&gpu_t(&q), &gpu_t(&k), &gpu_t(&v), scale, F32);
            let what = format!("attention ({path}) q {t} over {l} keys, {hq}/{hkv} heads x{d}");
            rep.check(&what, rel_err(&got, &want), tol);
        }
    }
    g.set_exact_gemm(true);

    // Sampling: greedy, then the same draws through both implementations.
    let logits = rng.tensor(&[248320], 3.0);
    let dl = gpu_t(&logits);
    let greedy = SampleParams { temperature: 0.0, top_k: 0, top_p: 1.0, min_p: 0.0 };
    let same = ops::sample(&dl, greedy, 0.0) == ops::sample(&logits, greedy, 0.0);
    rep.require("sample greedy 248320", same, json!(null));
    for p in [
        SampleParams { temperature: 0.7, top_k: 20, top_p: 0.8, min_p: 0.0 },
        SampleParams { temperature: 1.0, top_k: 0, top_p: 0.95, min_p: 0.0 },
        SampleParams { temperature: 1.3, top_k: 50, top_p: 1.0, min_p: 0.05 },
    ] {
        let draws = 64;
        let agree = (0..draws)
            .filter(|i| {
                let u = (*i as f32 + 0.5) / draws as f32;
                ops::sample(&dl, p, u) == ops::sample(&logits, p, u)
            })
            .count();
        // A draw can only differ where u·mass lands within f32 rounding of a token boundary.
        let what =
            format!("sample t{} k{} p{} min_p{}: {agree}/{draws} equal", p.temperature, p.top_k, p.top_p, p.min_p);
        rep.require(&what, agree + 1 >= draws, json!({"agree": agree, "draws": draws}));
    }

    // A batch sampled row by row on the device, each row by its own controls (greedy rows
    // included): the same ids as one-row sampling on the device, and the CPU's but for rounding.
    let rows = 8;
    let logits = rng.tensor(&[rows, 248320], 3.0);
    let dl = gpu_t(&logits);
    let params = [
        greedy,
        SampleParams { temperature: 0.2, top_k: 0, top_p: 1.0, min_p: 0.0 },
        SampleParams { temperature: 0.7, top_k: 20, top_p: 0.8, min_p: 0.0 },
        SampleParams { temperature: 1.3, top_k: 50, top_p: 1.0, min_p: 0.05 },
    ];
    let controls: Vec<u32> = (0..rows)
        .flat_map(|r| ops::sample_controls(params[r % params.len()], (r as f32 + 0.37) / rows as f32))
        .collect();
    let (mut got, mut want) = (Ids::new(vec![0; rows], Device::Cuda), Ids::new(vec![0; rows], Device::Cpu));
    ops::sample_rows(&dl, &Ids::new(controls.clone(), Device::Cuda), &mut got);
    ops::sample_rows(&logits, &Ids::new(controls, Device::Cpu), &mut want);
    let one_by_one: Vec<u32> = (0..rows)
        .map(|r| ops::sample(&ops::rows(&dl, r, r + 1), params[r % params.len()], (r as f32 + 0.37) / rows as f32))
        .collect();
    let (got, want) = (got.to_vec(), want.to_vec());
    let agree = got.iter().zip(&want).filter(|(a, b)| a == b).count();
    rep.require(
        "sample_rows 8x248320, mixed controls = one-row sampling (GPU), ≈ CPU",
        got == one_by_one && agree + 1 >= rows,
        json!({"gpu": got, "one_by_one": one_by_one, "cpu": want}),
    );
}

/// Greedy continuation with the model's own sampler path (GPU: argmax on the device).
fn greedy(model: &Qwen35, prompt: &[u32], n: usize) -> anyhow::Result<Vec<u32>> {
    let mut sampler = fp4_model::Sampler::new(fp4_model::SamplingParams::default())?;
    let opts = fp4_model::GenerateOptions { max_tokens: n, stop_ids: vec![] };
    Ok(fp4_model::generate(model, prompt, &opts, &mut sampler, |_| {})?)
}

/// One model on both devices: all-position logits with exact and tensor-core GEMMs, and a
/// greedy continuation (prefill of 40 tokens, then 24 decode steps).
fn model_check(g: &Gpu, rep: &mut Report, name: &str, src: &dyn WeightSource) -> anyhow::Result<()> {
    let opts = LoadOptions::new(F32);
    let cpu_model = Qwen35::load(src, opts).with_context(|| format!("{name} on the CPU"))?;
    let gpu_model = Qwen35::load(src, opts.on(Device::Cuda)).with_context(|| format!("{name} on the GPU"))?;
    let vocab = cpu_model.config.vocab_size as u64;
    let ids: Vec<u32> = (0..40u64).map(|i| ((i * 2654435761 + 17) % vocab) as u32).collect();
    let want = cpu_model.forward(&ids, &mut cpu_model.new_cache(), Logits::All)?;
    // Tensor-core GEMMs round the prefill activations to bf16. On these random tiny models any
    // rounding is amplified (transformers' own bf16 forward — the CPU's bf16 mode — lands 3e-2 to
    // 1.2e-1 from f32), so the bound is twice that gap: the same order as HF bf16, while a broken
    // GEMM errs by O(1). The per-linear checks above bound the GEMM itself.
    let bf16_model = Qwen35::load(src, LoadOptions::new(Precision::Bf16))?;
    let bf16_gap = rel_err(&bf16_model.forward(&ids, &mut bf16_model.new_cache(), Logits::All)?, &want);
    for exact in [true, false] {
        g.set_exact_gemm(exact);
        let got = gpu_model.forward(&ids, &mut gpu_model.new_cache(), Logits::All)?;
        let (mode, tol) = if exact { ("f32 GEMM", 1e-4) } else { ("bf16 GEMM, tol 2x HF-bf16 gap", 2.0 * bf16_gap) };
        rep.check(&format!("model {name}: logits T=40 ({mode})"), rel_err(&got, &want), tol);
    }
    g.set_exact_gemm(true);
    let (c, d) = (greedy(&cpu_model, &ids, 24)?, greedy(&gpu_model, &ids, 24)?);
    rep.require(&format!("model {name}: greedy 24 tokens GPU = CPU"), c == d, json!({"cpu": c, "gpu": d}));
    g.set_exact_gemm(false);
    Ok(())
}

/// A quantized checkpoint with activations quantized on both devices (`--w4a4`): W4A4 GEMMs on
/// the GPU, fake quantization on the CPU. An activation within rounding of an E2M1 boundary can
/// take the other code on the other device, so the bound is 1e-3 rather than 1e-4.
fn model_check_w4a4(g: &Gpu, rep: &mut Report, name: &str, src: &dyn WeightSource) -> anyhow::Result<()> {
    let opts = LoadOptions { quantize_activations: true, ..LoadOptions::new(F32) };
    let cpu_model = Qwen35::load(src, opts).with_context(|| format!("{name} on the CPU"))?;
    let gpu_model = Qwen35::load(src, opts.on(Device::Cuda)).with_context(|| format!("{name} on the GPU"))?;
    let vocab = cpu_model.config.vocab_size as u64;
    let ids: Vec<u32> = (0..40u64).map(|i| ((i * 2654435761 + 17) % vocab) as u32).collect();
    g.set_exact_gemm(true); // the FP8 layers' GEMMs
    let want = cpu_model.forward(&ids, &mut cpu_model.new_cache(), Logits::All)?;
    let got = gpu_model.forward(&ids, &mut gpu_model.new_cache(), Logits::All)?;
    rep.check(&format!("model {name} W4A4: logits T=40"), rel_err(&got, &want), 1e-3);
    let (c, d) = (greedy(&cpu_model, &ids, 24)?, greedy(&gpu_model, &ids, 24)?);
    rep.require(&format!("model {name} W4A4: greedy 24 tokens GPU = CPU"), c == d, json!({"cpu": c, "gpu": d}));
    g.set_exact_gemm(false);
    Ok(())
}

fn model_checks(g: &Gpu, rep: &mut Report, a: &Args) -> anyhow::Result<()> {
    let f = &a.fixtures;
    let mut dirs: Vec<PathBuf> = ["tiny-text", "tiny-vl", "tiny-quant"].iter().map(|d| f.join(d)).collect();
    for cfg in ["nvfp4_default", "nvfp4_mlp_only", "nvfp4_awq_lite", "ct_nvfp4"] {
        dirs.push(f.join("modelopt/tiny-quant").join(cfg));
    }
    dirs.extend(a.model.iter().cloned());
    for dir in &dirs {
        let ckpt = Checkpoint::open(dir).with_context(|| format!("cannot open {}", dir.display()))?;
        model_check(g, rep, &short(dir), &ckpt)?;
        if ckpt.quant.is_some() {
            model_check_w4a4(g, rep, &short(dir), &ckpt)?;
        }
    }
    for (label, format) in [("bf16", SyntheticFormat::Bf16), ("nvfp4", SyntheticFormat::Nvfp4 { mlp_only: false })] {
        model_check(g, rep, &format!("synthetic tiny {label}"), &Synthetic::named("tiny", format, 3)?)?;
    }
    Ok(())
}

pub(super) fn short(p: &Path) -> String {
    let parts: Vec<_> = p.components().rev().take(2).map(|c| c.as_os_str().to_string_lossy().into_owned()).collect();
    parts.into_iter().rev().collect::<Vec<_>>().join("/")
}

/// Device-to-device copy bandwidth (read + write bytes per second) over a 1 GiB buffer.
pub(super) fn copy_bandwidth(g: &Gpu) -> anyhow::Result<f64> {
    let n = 1usize << 30;
    let src = g.stream.alloc_zeros::<u8>(n)?;
    let mut dst = g.stream.alloc_zeros::<u8>(n)?;
    g.stream.memcpy_dtod(&src, &mut dst)?;
    let iters = 20;
    let ms = g.time_ms(|| {
        for _ in 0..iters {
            g.stream.memcpy_dtod(&src, &mut dst)?;
        }
        Ok(())
    })?;
    Ok(2.0 * n as f64 * iters as f64 / (ms / 1e3))
}

/// A decode-shape linear of `t` tokens: µs per call (activation conversion included) and weight
/// bytes read per second. Timed as CUDA-graph replays, so host launch cost is left out (the
/// engine replays graphs too).
fn gemv_bandwidth(g: &Gpu, w: &GpuWeight, t: usize) -> anyhow::Result<(f64, f64)> {
    let x = Tensor::from_cuda(g.random_f32(t * w.cols(), 9, 0.0, 1.0)?, &[t, w.cols()]);
    let us = graph_us(g, 20, || {
        ops::linear_gpu(&x, w, None, None, None);
    })?;
    Ok((us, w.bytes() as f64 / (us / 1e6)))
}

/// Microseconds per call of `f`: `calls` calls captured in one CUDA graph, replayed 10 times.
fn graph_us(g: &Gpu, calls: usize, mut f: impl FnMut()) -> anyhow::Result<f64> {
    let graph = g.capture(|| {
        for _ in 0..calls {
            f();
        }
        Ok(())
    })?;
    graph.launch()?;
    let replays = 10;
    let ms = g.time_ms(|| {
        for _ in 0..replays {
            graph.launch()?;
        }
        Ok(())
    })?;
    Ok(ms * 1e3 / (calls * replays) as f64)
}

/// Random NVFP4 weights of the given `(rows, cols)` in `layout`.
fn random_group(g: &Gpu, dims: &[(usize, usize)], layout: Nvfp4Layout) -> cuda::Result<Vec<cuda::GpuNvfp4>> {
    dims.iter()
        .enumerate()
        .map(|(i, &(r, c))| match g.random_nvfp4(r, c, 3 + i as u64, 1e-4, layout)? {
            GpuWeight::Nvfp4(q) => Ok(q),
            GpuWeight::Bf16 { .. } => unreachable!("random_nvfp4 makes NVFP4"),
        })
        .collect()
}

/// Each GEMV sweep geometry on the 9B's decode groups (1 and 8 tokens): µs, bandwidth, and the
/// largest difference from the shipped kernel's output (0 when the k order matches).
fn gemv_sweep(g: &Gpu, out: Option<&Path>) -> anyhow::Result<()> {
    let copy = copy_bandwidth(g)?;
    let groups: [(&str, &[(usize, usize)]); 4] = [
        ("gate, up", &[(12288, 4096), (12288, 4096)]),
        ("qkv, z, b, a", &[(8192, 4096), (4096, 4096), (32, 4096), (32, 4096)]),
        ("down", &[(4096, 12288)]),
        ("o_proj", &[(4096, 4096)]),
    ];
    let mut rows = Vec::new();
    for (shape, dims) in groups {
        // ModelOpt's layout for the sweep kernels; the shipped kernel reads the same weights
        // repacked on the device.
        let ws = random_group(g, dims, Nvfp4Layout::ModelOpt)?;
        let refs: Vec<&cuda::GpuNvfp4> = ws.iter().collect();
        let tiled = ws.iter().map(|w| g.nvfp4_tiled(w)).collect::<cuda::Result<Vec<_>>>()?;
        let repacked = ws.iter().map(|w| g.nvfp4_repacked(w)).collect::<cuda::Result<Vec<_>>>()?;
        let shipped: Vec<&cuda::GpuNvfp4> = repacked.iter().collect();
        let bytes: usize = ws.iter().map(|w| w.bytes()).sum();
        let k = dims[0].1;
        for t in [1, 8] {
            let x = g.random_f32(t * k, 9, 0.0, 1.0)?;
            let act = g.mma_activations(&x, t, k)?;
            let want: Vec<f32> = g.nvfp4_mma_gemv_group(&act, &shipped)?.iter().flat_map(|y| g.download(y)).collect();
            let names = g.gemv_sweep_names();
            // Then the shipped kernels: split-K at depth 2 and 4, and the one chosen by size.
            let shipped_kernels = [
                ("nt1 (depth 2)", Some(cuda::GemvKernel::SplitK { nt: 1 })),
                ("nt1_deep (depth 4)", Some(cuda::GemvKernel::SplitKDeep)),
                ("shipped (chosen)", None),
            ];
            for v in 0..names.len() + shipped_kernels.len() {
                let shipped_kernel = v.checked_sub(names.len()).map(|i| shipped_kernels[i]);
                let name = shipped_kernel.map_or_else(|| names[v], |s| s.0);
                let run = || match shipped_kernel {
                    None => g.nvfp4_mma_gemv_sweep(v, &act, &refs, &tiled),
                    Some((_, Some(kernel))) => g.nvfp4_mma_gemv_group_with(kernel, &act, &shipped),
                    Some((_, None)) => g.nvfp4_mma_gemv_group(&act, &shipped),
                };
                let got: Vec<f32> = run()?.iter().flat_map(|y| g.download(y)).collect();
                let us = graph_us(g, 20, || {
                    run().expect("sweep launch");
                })?;
                rows.push(sweep_result(shape, t, name, (&got, &want), us, bytes, copy));
            }
            let us = graph_us(g, 20, || g.mma_activations_only(&x, t, k).expect("conversion"))?;
            println!("sweep {shape:<14} t={t} f16_rowscaled      {us:7.1} µs");
            rows.push(json!({"shape": shape, "tokens": t, "kernel": "f16_rowscaled", "us": us}));
        }
    }
    // The 9B's BF16 LM head at 1–8 tokens: the shipped kernels against the sweep's (the same
    // sums: a difference other than 0 is a bug) and cuBLAS (bf16 activations: a small difference).
    let (vocab, hidden) = (248320, 4096);
    let head = g.random_bf16(vocab, hidden, 3, 0.02)?;
    let bytes = vocab * hidden * 2;
    let candidates = g.bf16_sweep_kernels();
    #[derive(Clone, Copy)]
    enum Head {
        Shipped,
        Sweep(usize),
        Cublas,
    }
    for t in [1usize, 2, 4, 8] {
        let x = g.random_f32(t * hidden, 11, 0.0, 1.0)?;
        let want = g.download(&g.linear(&x, t, &head)?);
        let sweep = candidates.iter().enumerate().filter(|(_, c)| c.1 == t).map(|(i, c)| (c.0, Head::Sweep(i)));
        let variants =
            std::iter::once(("shipped", Head::Shipped)).chain(sweep).chain([("cublas (x in bf16)", Head::Cublas)]);
        for (name, kernel) in variants {
            let run = || match kernel {
                Head::Shipped => g.linear(&x, t, &head),
                Head::Sweep(i) => g.bf16_gemv_sweep(i, &x, &head),
                Head::Cublas => g.bf16_gemm_sweep(&x, t, &head),
            };
            let got = g.download(&run()?);
            let us = graph_us(g, 10, || {
                run().expect("sweep launch");
            })?;
            rows.push(sweep_result("lm_head bf16", t, name, (&got, &want), us, bytes, copy));
        }
    }
    if let Some(p) = out {
        std::fs::write(
            p,
            serde_json::to_string_pretty(&json!({"gemv_sweep": rows, "copy_gb_per_s": copy / 1e9}))? + "\n",
        )?;
    }
    Ok(())
}

/// One kernel of the GEMV sweep, printed and as JSON: its time, its share of copy bandwidth over
/// `bytes` of weights, and its largest difference to the shipped kernel's output (`got`, `want`),
/// relative to the largest output.
fn sweep_result(shape: &str, t: usize, name: &str, out: (&[f32], &[f32]), us: f64, bytes: usize, copy: f64) -> Value {
    let (got, want) = out;
    let m = want.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-30);
    let diff = got.iter().zip(want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max) / m;
    let bw = bytes as f64 / (us / 1e6);
    println!(
        "sweep {shape:<14} t={t} {name:<20} {us:7.1} µs {:5.0} GB/s {:3.0} % diff {diff:.1e}",
        bw / 1e9,
        100.0 * bw / copy
    );
    json!({"shape": shape, "tokens": t, "kernel": name, "us": us, "fraction_of_copy": bw / copy, "rel_diff": diff})
}

fn kernel_benches(g: &Gpu, copy: f64) -> anyhow::Result<Vec<Value>> {
    let mut out = Vec::new();
    // The 9B's decode shapes, fused as a serving engine fuses them (q/k/v, qkv/z, gate/up).
    let shapes = [
        ("gate_up (fused)", 24576, 4096),
        ("down_proj", 4096, 12288),
        ("q_proj+gate", 8192, 4096),
        ("q/k/v (fused)", 10240, 4096),
        ("in_proj_qkv+z (fused)", 12288, 4096),
        ("o_proj / out_proj", 4096, 4096),
    ];
    for (shape, rows, cols) in shapes {
        for (fmt, w) in [
            ("nvfp4", g.random_nvfp4(rows, cols, 1, 1e-4, Nvfp4Layout::Repacked)?),
            ("bf16", g.random_bf16(rows, cols, 1, 0.02)?),
        ] {
            let tokens: &[usize] = if fmt == "nvfp4" { &[1, 8, 32, 64] } else { &[1] };
            for &t in tokens {
                let (us, bw) = gemv_bandwidth(g, &w, t)?;
                println!(
                    "{fmt} gemv {shape:<22} {rows}x{cols} {t:>2} tokens: {us:.1} µs, weights at {:.0} GB/s = {:.0} % of copy",
                    bw / 1e9,
                    100.0 * bw / copy
                );
                out.push(json!({"kernel": format!("{fmt}_gemv"), "shape": shape, "rows": rows, "cols": cols,
                    "tokens": t, "us": us, "gb_per_s": bw / 1e9, "fraction_of_copy": bw / copy}));
            }
        }
    }
    // The same weights as separate linears of one input in one launch (what the model runs).
    let groups: [(&str, &[(usize, usize)]); 3] = [
        ("gate, up (grouped)", &[(12288, 4096), (12288, 4096)]),
        ("qkv, z, b, a (grouped)", &[(8192, 4096), (4096, 4096), (32, 4096), (32, 4096)]),
        ("q, k, v (grouped)", &[(8192, 4096), (1024, 4096), (1024, 4096)]),
    ];
    for (shape, dims) in groups {
        let ws = random_group(g, dims, Nvfp4Layout::Repacked)?;
        let refs: Vec<&cuda::GpuNvfp4> = ws.iter().collect();
        let bytes: usize = ws.iter().map(|w| w.bytes()).sum();
        for t in [1, 8, 32, 64] {
            let x = Tensor::from_cuda(g.random_f32(t * dims[0].1, 9, 0.0, 1.0)?, &[t, dims[0].1]);
            let us = graph_us(g, 20, || {
                ops::nvfp4_same_input(&x, &refs);
            })?;
            let bw = bytes as f64 / (us / 1e6);
            println!(
                "nvfp4 gemv {shape:<22} {t:>2} tokens: {us:.1} µs, weights at {:.0} GB/s = {:.0} % of copy",
                bw / 1e9,
                100.0 * bw / copy
            );
            out.push(json!({"kernel": "nvfp4_gemv_group", "shape": shape, "weights": dims, "tokens": t, "us": us,
                "gb_per_s": bw / 1e9, "fraction_of_copy": bw / copy}));
        }
    }
    // The two tensor-core GEMV designs on the decode groups at 32 and 64 tokens.
    let cmp: [(&str, &[(usize, usize)]); 5] = [
        ("gate, up", &[(12288, 4096), (12288, 4096)]),
        ("qkv, z, b, a", &[(8192, 4096), (4096, 4096), (32, 4096), (32, 4096)]),
        ("q, k, v", &[(8192, 4096), (1024, 4096), (1024, 4096)]),
        ("down", &[(4096, 12288)]),
        ("o_proj", &[(4096, 4096)]),
    ];
    for (shape, dims) in cmp {
        let ws = random_group(g, dims, Nvfp4Layout::Repacked)?;
        let refs: Vec<&cuda::GpuNvfp4> = ws.iter().collect();
        let bytes: usize = ws.iter().map(|w| w.bytes()).sum();
        let k = dims[0].1;
        for t in [32, 64] {
            let x = g.random_f32(t * k, 9, 0.0, 1.0)?;
            let act = g.mma_activations(&x, t, k)?;
            let nt = t.div_ceil(8).next_power_of_two();
            let mut line = format!("gemv kernels {shape:<13} t={t:>2}:");
            for kern in
                [cuda::GemvKernel::SplitK { nt }, cuda::GemvKernel::Rows { nt }, cuda::GemvKernel::SplitRows { nt }]
            {
                let us = graph_us(g, 20, || {
                    g.nvfp4_mma_gemv_group_with(kern, &act, &refs).expect("gemv");
                })?;
                let frac = bytes as f64 / (us / 1e6) / copy;
                line += &format!(" {kern:?} {us:.1} µs ({:.0} %);", 100.0 * frac);
                out.push(
                    json!({"kernel": "nvfp4_gemv_design", "design": format!("{kern:?}"), "shape": shape, "tokens": t,
                    "us": us, "fraction_of_copy": frac}),
                );
            }
            println!("{line}");
        }
    }
    // One Gated DeltaNet layer's delta rule over a 1,000-token prompt (9B heads), both walks.
    let (d, t) = (GdnDims { key_heads: 16, value_heads: 32, key_dim: 128, value_dim: 128 }, 1000);
    let x = |n: usize, seed: u64, center: f32, scale: f32| g.random_f32(n, seed, center, scale);
    let (q, k, v) = (x(t * 16 * 128, 1, 0.0, 1.0)?, x(t * 16 * 128, 2, 0.0, 1.0)?, x(t * 32 * 128, 3, 0.0, 1.0)?);
    let (gates, beta) = (x(t * 32, 4, -0.3, 0.2)?, x(t * 32, 5, 0.5, 0.4)?);
    for algo in [GdnAlgo::Recurrent, GdnAlgo::Chunked] {
        let mut state = g.zeros(32 * 128 * 128);
        let mut run = || -> cuda::Result<()> {
            g.gated_delta_rule(&q, &k, &v, &gates, &beta, &mut state, d, t, algo)?;
            Ok(())
        };
        run()?;
        let mut runs = Vec::new();
        for _ in 0..5 {
            runs.push(g.time_ms(&mut run)?);
        }
        runs.sort_by(f64::total_cmp);
        let ms = runs[2];
        println!("gated delta rule {algo:?} 1000 tokens, 32 heads 128x128: {ms:.3} ms");
        out.push(json!({"kernel": format!("gdn_{algo:?}").to_lowercase(), "tokens": t, "ms": ms}));
    }
    // One attention layer over a 1,000-token prompt (9B heads: 16 query, 4 KV, 256 wide).
    let (hq, hkv, hd) = (16, 4, 256);
    let dims = cpu::AttnDims { q_heads: hq, kv_heads: hkv, head_dim: hd };
    let (q, k, v) = (x(t * hq * hd, 6, 0.0, 1.0)?, x(t * hkv * hd, 7, 0.0, 1.0)?, x(t * hkv * hd, 8, 0.0, 1.0)?);
    for exact in [true, false] {
        g.set_exact_gemm(exact);
        let run = || -> cuda::Result<()> {
            g.attention(&q, &k, &v, t, t, dims, (hd as f32).powf(-0.5))?;
            Ok(())
        };
        run()?;
        let mut runs = Vec::new();
        for _ in 0..5 {
            runs.push(g.time_ms(run)?);
        }
        runs.sort_by(f64::total_cmp);
        let (ms, kernel) = (runs[2], if exact { "attention_f32" } else { "flash_attention" });
        println!("prefill attention ({kernel}) 1000 tokens, {hq}/{hkv} heads x{hd}: {ms:.3} ms");
        out.push(json!({"kernel": kernel, "tokens": t, "ms": ms}));
    }
    g.set_exact_gemm(false);
    Ok(out)
}

/// Decode tok/s at batch 1 and TTFT of a long prompt on random weights of a real shape.
fn model_benches(g: &Gpu, a: &Args, name: &str, copy: f64) -> anyhow::Result<Vec<Value>> {
    let mut out = Vec::new();
    g.set_exact_gemm(false);
    let nvfp4 = SyntheticFormat::Nvfp4 { mlp_only: false };
    let mut variants = vec![("nvfp4", nvfp4, false), ("bf16", SyntheticFormat::Bf16, false)];
    if g.w4a4_native()? {
        variants.insert(1, ("nvfp4 w4a4", nvfp4, true)); // FP4 tensor cores (SM12x)
    }
    for (label, format, w4a4) in variants {
        let started = Instant::now();
        let src = Synthetic::named(name, format, 1)?;
        let opts = LoadOptions { quantize_activations: w4a4, ..LoadOptions::new(F32) };
        let mut model = Qwen35::load(&src, opts.on(Device::Cuda))?;
        g.synchronize()?;
        let build_s = started.elapsed().as_secs_f64();
        let bytes: usize = model.linears_mut().iter().map(|l| l.gpu_weight_bytes()).sum::<usize>()
            + model.lm_head().map_or(0, |l| l.gpu_weight_bytes());
        let vocab = model.config.vocab_size as u64;
        let prompt = |n: u64| -> Vec<u32> { (0..n).map(|i| ((i * 2654435761 + 11) % vocab) as u32).collect() };
        let mut sampler = fp4_model::Sampler::new(fp4_model::SamplingParams::default())?;

        // Decode: prefill 16 tokens, 8 warm-up steps, then time `decode_tokens` steps.
        let mut cache = model.new_cache();
        let mut logits = model.forward(&prompt(16), &mut cache, Logits::Last)?;
        let mut step = |logits: &mut Tensor, cache: &mut fp4_model::Cache| -> anyhow::Result<()> {
            let next = sampler.sample_tensor(logits);
            *logits = model.forward(&[next], cache, Logits::Last)?;
            Ok(())
        };
        for _ in 0..8 {
            step(&mut logits, &mut cache)?;
        }
        g.synchronize()?;
        let t0 = Instant::now();
        for _ in 0..a.decode_tokens {
            step(&mut logits, &mut cache)?;
        }
        g.synchronize()?;
        let decode_s = t0.elapsed().as_secs_f64();
        let tok_s = a.decode_tokens as f64 / decode_s;
        let roofline = copy / bytes as f64;

        let ttft = super::engine::ttft_runs_ms(&model, a.ttft_tokens)?;
        let ttft_ms = ttft[ttft.len() / 2];
        println!(
            "{name} {label}: decode {tok_s:.1} tok/s ({:.0} % of the {roofline:.0} tok/s copy roofline over {:.2} GB/token); TTFT {} tokens {ttft_ms:.1} ms; built in {build_s:.1} s",
            100.0 * tok_s / roofline,
            bytes as f64 / 1e9,
            a.ttft_tokens
        );
        out.push(json!({"model": name, "weights": label, "decode_tok_per_s": tok_s, "decode_tokens": a.decode_tokens,
            "weight_bytes_per_token": bytes, "copy_roofline_tok_per_s": roofline, "fraction_of_roofline": tok_s / roofline,
            "ttft_ms": ttft_ms, "ttft_prompt_tokens": a.ttft_tokens, "ttft_runs_ms": ttft, "build_s": build_s}));
    }
    Ok(out)
}

fn checks(g: &Gpu, rep: &mut Report, rng: &mut Normal, a: &Args) -> anyhow::Result<()> {
    linear_checks(g, rep, rng);
    super::engine::decode_op_checks(rep, rng);
    super::fused::fused_checks(g, rep, rng);
    if !a.quick {
        w4a4_checks(g, rep, rng)?;
        op_checks(rep, rng);
        model_checks(g, rep, a)?;
    }
    super::engine::runner_checks(g, rep, a)
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let g = cuda::init(a.device).map_err(|e| anyhow::anyhow!("cannot open the CUDA device: {e}"))?;
    let name = g.name()?;
    println!("device: {name}");
    let mut rng = Normal(0x5eed);
    let mut rep = Report::default();
    if a.gemv_sweep {
        return gemv_sweep(g, a.out.as_deref());
    }
    if a.profile_decode {
        let name = a.synthetic.as_deref().context("--profile-decode needs --synthetic")?;
        return super::engine::profile_decode(g, name, a.decode_tokens, a.profile_batch, a.profile_depth);
    }
    if let Some(part) = &a.engine_part {
        let name = a.synthetic.as_deref().context("--engine-part needs --synthetic")?;
        let out = super::engine::engine_part(name, part)?;
        println!("{}", serde_json::to_string_pretty(&out)?);
        if let Some(p) = &a.out {
            std::fs::write(p, serde_json::to_string_pretty(&out)? + "\n")
                .with_context(|| format!("cannot write {}", p.display()))?;
        }
        return Ok(());
    }
    if !a.bench_only {
        checks(g, &mut rep, &mut rng, &a)?;
    }
    let copy = copy_bandwidth(g)?;
    println!("copy bandwidth (d2d, read+write): {:.0} GB/s", copy / 1e9);
    let benches = kernel_benches(g, copy)?;
    let models = match &a.synthetic {
        Some(s) if !a.quick => model_benches(g, &a, s, copy)?,
        _ => Vec::new(),
    };
    let engine = match &a.synthetic {
        Some(s) => Some(super::engine::engine_benches(g, &a, s, copy)?),
        None => None,
    };
    let report = json!({
        "schema": "fp4.selftest.v2",
        "device": name,
        "unix_time": std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs(),
        "copy_gb_per_s": copy / 1e9,
        "checks": rep.checks,
        "failed": rep.failed,
        "kernel_benchmarks": benches,
        "model_benchmarks": models,
        "engine": engine,
        "all_passed": rep.failed == 0,
        "quick": a.quick || a.bench_only,
    });
    if let Some(p) = &a.out {
        std::fs::write(p, serde_json::to_string_pretty(&report)? + "\n")
            .with_context(|| format!("cannot write {}", p.display()))?;
    }
    anyhow::ensure!(rep.failed == 0, "{} GPU checks failed", rep.failed);
    Ok(())
}
