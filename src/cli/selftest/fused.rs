//! The decode-step fusions on the GPU (feature `cuda`): each fused kernel against the CPU
//! composition of the ops it replaces, and the GEMV inputs its producers write against the
//! standalone conversion, byte for byte.

use super::engine::{ids_both, slot_walks};
use super::gpu::{gpu_t, random_nvfp4, rel_err, Normal, Report, F32};
use fp4_kernels::cuda::Gpu;
use fp4_kernels::ops::{self, BatchIndex, GdnDims};
use fp4_kernels::{Precision, Tensor};
use serde_json::json;

/// Whether `y`'s attached GEMV input has the bytes the standalone conversion of `y` gives.
fn gemv_input_matches(g: &Gpu, y: &Tensor) -> bool {
    let Some(attached) = y.gemv_input() else { return false };
    let converted = g.mma_activations(y.cuda(), y.rows(), y.row_len()).expect("conversion");
    g.download_gemv_input(attached) == g.download_gemv_input(&converted)
}

pub(super) fn fused_checks(g: &Gpu, rep: &mut Report, rng: &mut Normal) {
    g.set_exact_gemm(false);
    // Producers of a GEMV input: values against the CPU, their f16 copy against f16_rowscaled.
    // One row scaled up so rows differ in exponent by far.
    for (rows, d) in [(1, 4096), (3, 12288), (64, 4096), (5, 2048)] {
        let mut x = rng.tensor(&[rows, d], 2.0);
        x.as_mut_slice()[..d].iter_mut().for_each(|v| *v *= 3000.0);
        let y = rng.tensor(&[rows, d], 1.0);
        let w = rng.tensor(&[d], 0.3);
        let (gx, gy, gw) = (gpu_t(&x), gpu_t(&y), gpu_t(&w));
        let got = ops::rms_norm(&gx, &gw, 1e-6, 1.0, F32);
        let err = rel_err(&got, &ops::rms_norm(&x, &w, 1e-6, 1.0, F32));
        rep.check(&format!("rms_norm + GEMV input {rows}x{d}"), err, 1e-5);
        rep.require(
            &format!("rms_norm {rows}x{d}: GEMV input = f16_rowscaled"),
            gemv_input_matches(g, &got),
            json!({}),
        );
        let (got_h, got) = ops::add_rms_norm(&gx, &gy, &gw, 1e-6, 1.0, F32);
        let (want_h, want) = ops::add_rms_norm(&x, &y, &w, 1e-6, 1.0, F32);
        rep.check(
            &format!("add_rms_norm + GEMV input {rows}x{d}"),
            rel_err(&got, &want).max(rel_err(&got_h, &want_h)),
            1e-5,
        );
        rep.require(
            &format!("add_rms_norm {rows}x{d}: GEMV input = f16_rowscaled"),
            gemv_input_matches(g, &got),
            json!({}),
        );
        type Op = fn(&Tensor, &Tensor, Precision) -> Tensor;
        for (name, op) in [("silu_mul", ops::silu_mul as Op), ("sigmoid_gate", ops::sigmoid_gate)] {
            let got = op(&gx, &gy, F32);
            rep.check(&format!("{name} + GEMV input {rows}x{d}"), rel_err(&got, &op(&x, &y, F32)), 1e-6);
            rep.require(
                &format!("{name} {rows}x{d}: GEMV input = f16_rowscaled"),
                gemv_input_matches(g, &got),
                json!({}),
            );
        }
    }

    // The residual add in the GEMV's epilogue: the same bits as the GEMV then the add.
    for (t, n, k) in [(1, 4096, 12288), (7, 300, 4096), (64, 4096, 1024)] {
        let q = g.upload_nvfp4(&random_nvfp4(rng, n, k));
        let (x, r) = (gpu_t(&rng.tensor(&[t, k], 1.0)), gpu_t(&rng.tensor(&[t, n], 1.0)));
        let fused = ops::nvfp4_linear_add(&x, &q, &r).expect("the tensor-core GEMV applies");
        let plain = ops::nvfp4_same_input(&x, &[&q]).expect("the tensor-core GEMV applies").remove(0);
        rep.check(
            &format!("GEMV + residual epilogue {t}x{n}x{k} = GEMV then add"),
            rel_err(&fused, &ops::add(&r, &plain, F32)),
            0.0,
        );
    }

    // The fused GDN step on the slot walks of the plain checks and on slot 4 alone: the 9B's
    // heads (a block per 32 state columns, the gated norm writing out_proj's GEMV input) and a
    // grouped small geometry (a block per head).
    let walks = slot_walks().into_iter().chain([("1 seq in place", vec![4], vec![4], 1)]);
    for (walk, read, write, per_seq) in walks {
        let (rc, rg) = ids_both(read);
        let (wc, wg) = ids_both(write);
        let slots_c = ops::GdnSlots { read: &rc, write: &wc, rows_per_seq: per_seq };
        let slots_g = ops::GdnSlots { read: &rg, write: &wg, rows_per_seq: per_seq };
        for d in [
            GdnDims { key_heads: 16, value_heads: 32, key_dim: 128, value_dim: 128 },
            GdnDims { key_heads: 2, value_heads: 6, key_dim: 16, value_dim: 40 },
        ] {
            let b = wc.len();
            let width = 2 * d.key_heads * d.key_dim + d.value_heads * d.value_dim;
            let mixed = rng.tensor(&[b, width], 1.0);
            let (bp, ap) = (rng.tensor(&[b, d.value_heads], 2.0), rng.tensor(&[b, d.value_heads], 2.0));
            let z = rng.tensor(&[b, d.value_heads * d.value_dim], 1.0);
            let (a_log, dt, norm) =
                (rng.tensor(&[d.value_heads], 1.0), rng.tensor(&[d.value_heads], 1.0), rng.tensor(&[d.value_dim], 0.5));
            let pool = rng.tensor(&[6 * d.value_heads, d.key_dim, d.value_dim], 0.3);
            let wc = ops::GdnStepParams { a_log: &a_log, dt_bias: &dt, norm: &norm, eps: 1e-6, dims: d };
            let (ga, gd, gn) = (gpu_t(&a_log), gpu_t(&dt), gpu_t(&norm));
            let wg = ops::GdnStepParams { a_log: &ga, dt_bias: &gd, norm: &gn, eps: 1e-6, dims: d };
            let (mut pc, mut pg) = (pool.clone(), gpu_t(&pool));
            let want = ops::gdn_decode(&mixed, &bp, &ap, z.clone(), wc, &mut pc, slots_c, F32);
            let got = ops::gdn_decode(&gpu_t(&mixed), &gpu_t(&bp), &gpu_t(&ap), gpu_t(&z), wg, &mut pg, slots_g, F32);
            let what =
                format!("gdn_decode (fused) {walk}, {}x{}/{}x{}", d.key_heads, d.key_dim, d.value_heads, d.value_dim);
            rep.check(&what, rel_err(&got, &want).max(rel_err(&pg, &pc)), 1e-4);
            if d.value_dim == 128 {
                rep.require(&format!("{what}: GEMV input = f16_rowscaled"), gemv_input_matches(g, &got), json!({}));
            }
        }
    }

    // The fused attention prologue: 16/4 heads of 256 (rotary 64), shuffled blocks of 8.
    let (b, hq, hkv, d, block_size, max_blocks) = (3, 16, 4, 256, 8, 4);
    let table: Vec<u32> = (0..(b * max_blocks) as u32).map(|i| (i * 7) % (b * max_blocks) as u32).collect();
    let (tc, tg) = ids_both(table);
    let (pc, pg) = ids_both(vec![0, 13, 31]);
    let ix_c = BatchIndex { pos: &pc, slots: &pc, slots_out: &pc, rows_per_seq: 1, table: &tc, max_blocks, block_size };
    let ix_g = BatchIndex { pos: &pg, slots: &pg, slots_out: &pg, rows_per_seq: 1, table: &tg, max_blocks, block_size };
    let inv = Tensor::from_vec(ops::rope_inv_freq(64, 1e7), &[32]);
    let (qg, k, v) = (rng.tensor(&[b, hq, 2 * d], 1.0), rng.tensor(&[b, hkv, d], 1.0), rng.tensor(&[b, hkv, d], 1.0));
    let (qn, kn) = (rng.tensor(&[d], 0.3), rng.tensor(&[d], 0.3));
    let pool_shape = [b * max_blocks * block_size, hkv, d];
    let (kp, vp) = (rng.tensor(&pool_shape, 1.0), rng.tensor(&pool_shape, 1.0));
    let (mut kpc, mut vpc, mut kpg, mut vpg) = (kp.clone(), vp.clone(), gpu_t(&kp), gpu_t(&vp));
    let wc = ops::AttentionPrepParams { q_norm: &qn, k_norm: &kn, eps: 1e-6, inv_freq: &inv };
    let (gqn, gkn, ginv) = (gpu_t(&qn), gpu_t(&kn), gpu_t(&inv));
    let wg = ops::AttentionPrepParams { q_norm: &gqn, k_norm: &gkn, eps: 1e-6, inv_freq: &ginv };
    let (q_c, gate_c) = ops::attention_decode_prep(&qg, &k, &v, wc, &mut kpc, &mut vpc, ix_c, F32);
    let (q_g, gate_g) =
        ops::attention_decode_prep(&gpu_t(&qg), &gpu_t(&k), &gpu_t(&v), wg, &mut kpg, &mut vpg, ix_g, F32);
    let err = [rel_err(&q_g, &q_c), rel_err(&gate_g, &gate_c), rel_err(&kpg, &kpc), rel_err(&vpg, &vpc)];
    rep.check(
        "attention_decode_prep (fused) 3 seqs 16/4x256 (q, gate, pools)",
        err.iter().copied().fold(0.0, f64::max),
        1e-5,
    );
}
