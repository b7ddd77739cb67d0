//! The batched decode engine on the GPU (feature `cuda`): its ops against their CPU references,
//! the model runner against per-sequence CPU generation, and the engine benchmarks on random
//! weights of a real shape.

use super::gpu::{gpu_t, rel_err, Normal, Report, F32};
use super::Args;
use anyhow::Context;
use fp4_format::Checkpoint;
use fp4_kernels::cpu;
use fp4_kernels::cuda::Gpu;
use fp4_kernels::ops::{self, BatchIndex, GdnDims};
use fp4_kernels::{Device, Ids, Tensor};
use fp4_model::{
    DecodeRunner, LoadOptions, Logits, Pools, Qwen35, RunnerConfig, SeqState, Synthetic, SyntheticFormat, WeightSource,
};
use serde_json::{json, Value};
use std::time::Instant;

/// The same u32s on the CPU and on the GPU.
pub(super) fn ids_both(v: Vec<u32>) -> (Ids, Ids) {
    (Ids::new(v.clone(), Device::Cpu), Ids::new(v, Device::Cuda))
}

/// The speculative step's small ops (drafts into the verify's rows, on-device greedy acceptance,
/// the head's kept rows into the hidden pool) against their CPU references, random inputs.
fn speculative_op_checks(rep: &mut Report, rng: &mut Normal) {
    let (n, k) = (5usize, 3usize);
    let rows = n * (1 + k);
    let mut draw = |m: u32| -> u32 { (rng.uniform() * f64::from(m)) as u32 % m };
    // Ids from a small alphabet, so that drafts often match the model's choices.
    let verify: Vec<u32> = (0..rows).map(|_| draw(3)).collect();
    let guess: Vec<u32> = (0..n).map(|_| 100 + draw(1000)).collect();
    let (mut dc, mut dg) = ids_both(verify.clone());
    let (sc, sg) = ids_both(guess);
    ops::write_ids_strided(&mut dc, &sc, 2, 1 + k);
    ops::write_ids_strided(&mut dg, &sg, 2, 1 + k);
    rep.require("write_ids_strided 5 ids by 4 from 2", dc.to_vec() == dg.to_vec(), json!({}));

    let best: Vec<u32> = (0..rows).map(|_| draw(3)).collect();
    // Sequence 3 keeps 2 drafts whatever they are; the others follow the rule.
    let force: Vec<u32> = (0..n as u32).map(|b| if b == 3 { 2 } else { u32::MAX }).collect();
    let run = |device: Device| {
        let ids = |v: &[u32]| Ids::new(v.to_vec(), device);
        let (mut h, mut p, mut o) = (ids(&vec![0; rows]), ids(&vec![0; n]), ids(&vec![0; n * (k + 2)]));
        ops::accept_greedy_rows(&ids(&verify), &ids(&best), k, &ids(&force), &mut h, &mut p, &mut o);
        (h.to_vec(), p.to_vec(), o.to_vec())
    };
    let (want, got) = (run(Device::Cpu), run(Device::Cuda));
    let kept: Vec<u32> = (0..n).map(|b| want.2[b * (k + 2) + k]).collect();
    rep.require(
        "accept_greedy_rows 5 seqs, K = 3 (one forced)",
        want == got,
        json!({"kept": kept, "cpu": format!("{want:?}"), "gpu": format!("{got:?}")}),
    );

    let (pool, src) = (rng.tensor(&[9, 64], 1.0), rng.tensor(&[rows, 64], 1.0));
    let (dst_rows, src_rows): (Vec<u32>, Vec<u32>) = (0..n as u32).map(|b| (8 - b, b * (1 + k as u32) + b % 4)).unzip();
    let (dc, dg) = ids_both(dst_rows);
    let (sc, sg) = ids_both(src_rows);
    let (mut want, mut got) = (pool.clone(), gpu_t(&pool));
    ops::scatter_rows(&mut want, &dc, &src, &sc);
    ops::scatter_rows(&mut got, &dg, &gpu_t(&src), &sg);
    rep.check("scatter_rows 5 rows of 64", rel_err(&got, &want), 0.0);

    // The NVFP4 draft head: a bf16 weight quantized on the device, bit for bit as on the CPU
    // (one all-zero block and one of tiny values among random ones), and its linear's output.
    let (rows, cols) = (48usize, 256usize);
    let mut w = rng.tensor(&[rows, cols], 0.05).into_vec();
    w[..16].fill(0.0);
    w[16..32].iter_mut().for_each(|x| *x *= 1e-6);
    let w: Vec<f32> = w.iter().map(|&x| fp4_format::dtype::round_bf16(x)).collect();
    let want = fp4_format::nvfp4::Nvfp4Weight::quantize(
        &w,
        rows,
        cols,
        fp4_format::nvfp4::nvfp4_global_scale(fp4_format::nvfp4::amax(&w)),
    );
    let g = fp4_kernels::cuda::gpu();
    let same = match g.upload_bf16(&w, rows, cols, 1.0) {
        fp4_kernels::cuda::GpuWeight::Bf16 { w: dw, .. } => match g.quantize_nvfp4_bf16(&dw, rows, cols) {
            Ok((codes, scales, scale_2)) => {
                g.download(&codes) == want.packed && g.download(&scales) == want.scales && scale_2 == want.scale_2
            }
            Err(_) => false,
        },
        fp4_kernels::cuda::GpuWeight::Nvfp4(_) => false,
    };
    rep.require("nvfp4 quantize of a bf16 48x256 weight = CPU (bit for bit)", same, json!({}));
    let dense = fp4_model::Linear::dense("head", Tensor::from_vec(w, &[rows, cols]));
    let (cpu_q, gpu_q) = (
        dense.nvfp4_copy("draft"),
        fp4_model::Linear::from_method("head", cols, rows, dense.method.to_gpu(false), false).nvfp4_copy("draft"),
    );
    if let (Some(cpu_q), Some(gpu_q)) = (cpu_q, gpu_q) {
        let x = rng.tensor(&[3, cols], 1.0);
        let err = rel_err(&gpu_q.forward(&gpu_t(&x), F32), &cpu_q.forward(&x, F32));
        rep.check("linear nvfp4_copy of a bf16 head, 3 tokens", err, 2e-3);
    } else {
        rep.require("linear nvfp4_copy of a bf16 head on both devices", false, json!({}));
    }
}

/// The decode-batch ops (per-token RoPE, paged KV write and attention, conv and delta-rule steps
/// on state slots) against their CPU references, on random (never zero) inputs.
pub(super) fn decode_op_checks(rep: &mut Report, rng: &mut Normal) {
    speculative_op_checks(rep, rng);
    // RoPE at per-token positions.
    let x = rng.tensor(&[5, 16, 256], 1.0);
    let inv = Tensor::from_vec(ops::rope_inv_freq(64, 1e7), &[32]);
    let (pc, pg) = ids_both(vec![0, 7, 1234, 4095, 30000]);
    let (mut want, mut got) = (x.clone(), gpu_t(&x));
    ops::rope_at(&mut want, &inv, &pc, F32);
    ops::rope_at(&mut got, &gpu_t(&inv), &pg, F32);
    rep.check("rope_at 5x16x256 rotary 64, positions 0..30000", rel_err(&got, &want), 1e-5);

    // Paged KV: write each token at its position, then attend over every cached position.
    // Blocks are handed out shuffled so that tables, not layout, decide what is read.
    for (lens, block_size, hq, hkv, d) in [
        (vec![1usize, 17, 60], 8usize, 16usize, 4usize, 256usize),
        (vec![3000], 32, 16, 4, 256),
        (vec![5, 9], 4, 6, 2, 40),
        // 8 query heads per KV head: the general kernel (the others take the 4-head one).
        (vec![7, 33], 8, 16, 2, 64),
    ] {
        let max_blocks = lens.iter().max().expect("lengths").div_ceil(block_size);
        let blocks = lens.iter().map(|l| l.div_ceil(block_size)).sum::<usize>() + 3;
        let mut order: Vec<u32> = (0..blocks as u32).collect();
        for i in (1..order.len()).rev() {
            order.swap(i, (rng.uniform() * (i + 1) as f64) as usize);
        }
        let mut table = vec![0u32; lens.len() * max_blocks];
        let mut next = order.into_iter();
        for (b, l) in lens.iter().enumerate() {
            for j in 0..l.div_ceil(block_size) {
                table[b * max_blocks + j] = next.next().expect("enough blocks");
            }
        }
        let pool_shape = [blocks * block_size, hkv, d];
        let (kp, vp) = (rng.tensor(&pool_shape, 1.0), rng.tensor(&pool_shape, 1.0));
        let b = lens.len();
        let (kn, vn, q) = (rng.tensor(&[b, hkv, d], 1.0), rng.tensor(&[b, hkv, d], 1.0), rng.tensor(&[b, hq, d], 1.0));
        let (tc, tg) = ids_both(table);
        let (pc, pg) = ids_both(lens.iter().map(|l| *l as u32 - 1).collect());
        let ix_c =
            BatchIndex { pos: &pc, slots: &pc, slots_out: &pc, rows_per_seq: 1, table: &tc, max_blocks, block_size };
        let ix_g =
            BatchIndex { pos: &pg, slots: &pg, slots_out: &pg, rows_per_seq: 1, table: &tg, max_blocks, block_size };
        let (mut kpc, mut vpc, mut kpg, mut vpg) = (kp.clone(), vp.clone(), gpu_t(&kp), gpu_t(&vp));
        ops::kv_write(&kn, &vn, &mut kpc, &mut vpc, ix_c);
        ops::kv_write(&gpu_t(&kn), &gpu_t(&vn), &mut kpg, &mut vpg, ix_g);
        rep.check(
            &format!("kv_write lens {lens:?} block {block_size}"),
            rel_err(&kpg, &kpc).max(rel_err(&vpg, &vpc)),
            0.0,
        );
        let scale = (d as f32).powf(-0.5);
        let want = ops::paged_attention(&q, &kpc, &vpc, ix_c, scale, F32);
        let got = ops::paged_attention(&gpu_t(&q), &kpg, &vpg, ix_g, scale, F32);
        rep.check(
            &format!("paged_attention lens {lens:?} block {block_size} {hq}/{hkv}x{d}"),
            rel_err(&got, &want),
            1e-5,
        );
    }

    for (what, read, write, per_seq) in slot_walks() {
        let (rc, rg) = ids_both(read);
        let (wc, wg) = ids_both(write);
        let (slots_c, slots_g) = (
            ops::GdnSlots { read: &rc, write: &wc, rows_per_seq: per_seq },
            ops::GdnSlots { read: &rg, write: &wg, rows_per_seq: per_seq },
        );
        let rows = wc.len();
        // Conv steps.
        let (c, k) = (96, 4);
        let x = rng.tensor(&[rows, c], 1.0);
        let w = rng.tensor(&[c, k], 0.5);
        let pool = rng.tensor(&[6 * (k - 1), c], 1.0);
        let (mut pc, mut pg) = (pool.clone(), gpu_t(&pool));
        let want = ops::conv1d_step(&x, &mut pc, &w, slots_c, F32);
        let got = ops::conv1d_step(&gpu_t(&x), &mut pg, &gpu_t(&w), slots_g, F32);
        rep.check(&format!("conv1d_step {what}, C 96 K 4"), rel_err(&got, &want).max(rel_err(&pg, &pc)), 1e-6);

        // Delta-rule steps: the 9B's heads and a grouped small geometry.
        for d in [
            GdnDims { key_heads: 16, value_heads: 32, key_dim: 128, value_dim: 128 },
            GdnDims { key_heads: 2, value_heads: 6, key_dim: 16, value_dim: 40 },
        ] {
            let q = rng.tensor(&[rows, d.key_heads * d.key_dim], 1.0);
            let kk = rng.tensor(&[rows, d.key_heads * d.key_dim], 1.0);
            let v = rng.tensor(&[rows, d.value_heads * d.value_dim], 1.0);
            let g = Tensor::from_vec(
                rng.vec(rows * d.value_heads, 0.5).iter().map(|x| -x.abs()).collect(),
                &[rows, d.value_heads],
            );
            let beta = Tensor::from_vec(
                rng.vec(rows * d.value_heads, 1.0).iter().map(|x| cpu::sigmoid(*x)).collect(),
                &[rows, d.value_heads],
            );
            let pool = rng.tensor(&[6 * d.value_heads, d.key_dim, d.value_dim], 0.3);
            let (mut pc, mut pg) = (pool.clone(), gpu_t(&pool));
            let want = ops::gdn_step(&q, &kk, &v, &g, &beta, &mut pc, slots_c, d);
            let got =
                ops::gdn_step(&gpu_t(&q), &gpu_t(&kk), &gpu_t(&v), &gpu_t(&g), &gpu_t(&beta), &mut pg, slots_g, d);
            let what = format!("gdn_step {what}, {}x{}/{}x{}", d.key_heads, d.key_dim, d.value_heads, d.value_dim);
            rep.check(&what, rel_err(&got, &want).max(rel_err(&pg, &pc)), 1e-4);
        }
    }
}

/// The GDN slot walks the decode-batch checks run, on a pool of 6 slots: (label, read slots,
/// write slots, rows per sequence). Plain decode updates slots 3, 0, 5, 1 in place; a speculative
/// verify of 2 sequences × 3 rows keeps the state after each row (each sequence's first row in
/// place, the others in slots no other sequence reads).
pub(super) fn slot_walks() -> [(&'static str, Vec<u32>, Vec<u32>, usize); 2] {
    [
        ("4 seqs in place on slots of 6", vec![3, 0, 5, 1], vec![3, 0, 5, 1], 1),
        ("2 seqs x 3 rows, a slot per row", vec![3, 0], vec![3, 1, 4, 0, 2, 5], 3),
    ]
}

/// Prompts of different lengths (1..50 tokens) for `n` sequences.
fn prompts(n: usize, vocab: u64) -> Vec<Vec<u32>> {
    (0..n)
        .map(|i| {
            let len = 1 + (i * 7 + 3) % 50;
            (0..len as u64).map(|j| ((j * 2654435761 + 17 + 31 * i as u64) % vocab) as u32).collect()
        })
        .collect()
}

/// Greedy continuations of every prompt by the runner, all sequences decoded together: each
/// prompt prefilled alone (`Qwen35::forward`), its cache moved into the runner, then `steps - 1`
/// batched decode steps.
fn runner_generate(model: &Qwen35, prompts: &[Vec<u32>], steps: usize, graphs: bool) -> anyhow::Result<Vec<Vec<u32>>> {
    runner_generate_at(model, prompts, steps, graphs, 0.0)
}

/// [`runner_generate`] with each sequence sampled at `temperature` on the device (seeded by its
/// index; greedy at 0).
fn runner_generate_at(
    model: &Qwen35,
    prompts: &[Vec<u32>],
    steps: usize,
    graphs: bool,
    temperature: f32,
) -> anyhow::Result<Vec<Vec<u32>>> {
    let cfg = RunnerConfig {
        max_seqs: prompts.len(),
        max_model_len: 128,
        kv_blocks: prompts.len() * 8,
        block_size: 16,
        graphs,
        spec_tokens: 0,
    };
    let mut runner = DecodeRunner::new(model, cfg);
    let params = |seed| fp4_model::SamplingParams { temperature, seed, ..Default::default() };
    let mut samplers =
        (0..prompts.len() as u64).map(|s| fp4_model::Sampler::new(params(s))).collect::<Result<Vec<_>, _>>()?;
    let mut seqs = Vec::new();
    let mut out: Vec<Vec<u32>> = Vec::new();
    for (p, sampler) in prompts.iter().zip(&mut samplers) {
        let mut cache = model.new_cache();
        let logits = model.forward(p, &mut cache, Logits::Last)?;
        out.push(vec![sampler.sample_tensor(&logits)]);
        seqs.push(runner.admit(&cache)?);
    }
    for _ in 1..steps {
        let inputs: Vec<u32> = out.iter().map(|o| *o.last().expect("first token")).collect();
        let mut refs: Vec<&mut SeqState> = seqs.iter_mut().collect();
        let next = if temperature == 0.0 {
            runner.step_greedy(model, &mut refs, &inputs)?
        } else {
            let controls: Vec<_> = samplers.iter_mut().map(fp4_model::Sampler::next_controls).collect();
            runner.step_sampled(model, &mut refs, &inputs, &controls)?
        };
        for (o, t) in out.iter_mut().zip(next) {
            o.push(t);
        }
    }
    anyhow::ensure!(!graphs || runner.graph_replays == (steps - 1) as u64, "the runner did not replay graphs");
    // Every edge of a decode graph joins two of fp4's kernels: all of them programmatic (PDL).
    anyhow::ensure!(!graphs || runner.programmatic_edges > 0, "the decode graph has no programmatic edges");
    Ok(out)
}

/// The runner (paged KV, state slots, batched steps, CUDA graphs or eager) against plain
/// per-sequence generation on the CPU: greedy, token for token, at batch sizes 1 to 64.
pub(super) fn runner_checks(g: &Gpu, rep: &mut Report, a: &Args) -> anyhow::Result<()> {
    let f = &a.fixtures;
    let mut sources: Vec<(String, Box<dyn WeightSource>)> = Vec::new();
    for dir in [f.join("tiny-text"), f.join("modelopt/tiny-quant/nvfp4_default")] {
        let ckpt = Checkpoint::open(&dir).with_context(|| format!("cannot open {}", dir.display()))?;
        sources.push((super::gpu::short(&dir), Box::new(ckpt)));
    }
    sources.push((
        "synthetic tiny nvfp4".into(),
        Box::new(Synthetic::named("tiny", SyntheticFormat::Nvfp4 { mlp_only: false }, 5)?),
    ));
    let steps = 12;
    for (name, src) in &sources {
        let cpu_model = Qwen35::load(src.as_ref(), LoadOptions::new(F32))?;
        let gpu_model = Qwen35::load(src.as_ref(), LoadOptions::new(F32).on(Device::Cuda))?;
        let all = prompts(64, cpu_model.config.vocab_size as u64);
        let mut sampler = fp4_model::Sampler::new(fp4_model::SamplingParams::default())?;
        let opts = fp4_model::GenerateOptions { max_tokens: steps, stop_ids: vec![] };
        let want: Vec<Vec<u32>> = all
            .iter()
            .map(|p| fp4_model::generate(&cpu_model, p, &opts, &mut sampler, |_| {}))
            .collect::<Result<_, _>>()?;
        g.set_exact_gemm(true);
        for n in [1, 3, 8, 64] {
            for graphs in [true, false] {
                let got = runner_generate(&gpu_model, &all[..n], steps, graphs)?;
                let same = got == want[..n];
                let mode = if graphs { "graph" } else { "eager" };
                let what = format!("runner {name}: {n} seqs batched ({mode}) = CPU one by one, greedy {steps}");
                let detail = if same { json!({}) } else { json!({"cpu": &want[..n], "gpu": got}) };
                rep.require(&what, same, detail);
            }
        }
        // The serving kernels (tensor-core GEMV, bf16 activations): graph replay = eager, bit for bit.
        g.set_exact_gemm(false);
        let (eager, graph) = (
            runner_generate(&gpu_model, &all[..8], steps, false)?,
            runner_generate(&gpu_model, &all[..8], steps, true)?,
        );
        rep.require(&format!("runner {name}: fast kernels, graph = eager (8 seqs)"), eager == graph, json!({}));
        // Sampled on the device (temperature 0.8, seeded): graph replay = eager, and the tokens are
        // not the greedy ones (the controls reach the kernel).
        let (eager, graph) = (
            runner_generate_at(&gpu_model, &all[..8], steps, false, 0.8)?,
            runner_generate_at(&gpu_model, &all[..8], steps, true, 0.8)?,
        );
        let greedy = runner_generate(&gpu_model, &all[..8], steps, false)?;
        rep.require(
            &format!("runner {name}: sampled t0.8 on the device, graph = eager (8 seqs), ≠ greedy"),
            eager == graph && graph != greedy,
            json!({}),
        );
    }
    speculative_runner_checks(g, rep)
}

/// Speculative decoding through the GPU runner (the head drafting on the device, the verify's
/// multi-row GDN walks, the kept row's slot taking over) on the tiny synthetic model with an MTP
/// head: with oracle drafts right, partly right and wrong, and with the head's own drafts, 1 and
/// 3 sequences give exactly the CPU's plain greedy tokens (exact kernels).
fn speculative_runner_checks(g: &Gpu, rep: &mut Report) -> anyhow::Result<()> {
    g.set_exact_gemm(true);
    let src = Synthetic::named("tiny", SyntheticFormat::Bf16, 5)?.with_mtp();
    let cpu_model = Qwen35::load(&src, LoadOptions::new(F32))?;
    let o = LoadOptions::new(F32).on(Device::Cuda);
    let (model, mtp) = (Qwen35::load(&src, o)?, fp4_model::Mtp::load(&src, o)?.context("the synthetic head")?);
    let (k, steps) = (3, 12);
    let all = prompts(3, cpu_model.config.vocab_size as u64);
    let mut sampler = fp4_model::Sampler::new(fp4_model::SamplingParams::default())?;
    let opts = fp4_model::GenerateOptions { max_tokens: steps + 2 * (k + 1), stop_ids: vec![] };
    let want: Vec<Vec<u32>> = all
        .iter()
        .map(|p| fp4_model::generate(&cpu_model, p, &opts, &mut sampler, |_| {}))
        .collect::<Result<_, _>>()?;
    for n in [1, 3] {
        // Oracle drafts run eagerly; the head's own, eagerly and as one replayed graph per step.
        for (oracle, graphs) in [(true, false), (false, false), (false, true)] {
            let cfg = RunnerConfig {
                max_seqs: n,
                max_model_len: 128,
                kv_blocks: n * 16,
                block_size: 8,
                graphs,
                spec_tokens: k,
            };
            let mut runner = DecodeRunner::new(&model, cfg);
            let mut seqs = Vec::new();
            let mut out: Vec<Vec<u32>> = Vec::new();
            for p in &all[..n] {
                let (s, first) = runner.prefill_speculative(&model, &mtp, p)?;
                seqs.push(s);
                out.push(vec![first]);
            }
            for step in 0..steps {
                // Sequence b's oracle drafts are right up to index (step + b) % (K + 1).
                let drafts = oracle.then(|| {
                    out.iter()
                        .enumerate()
                        .map(|(b, o)| {
                            let wrong_from = (step + b) % (k + 1);
                            (0..k).map(|i| want[b][o.len() + i] ^ u32::from(i >= wrong_from)).collect()
                        })
                        .collect()
                });
                let inputs: Vec<u32> = out.iter().map(|o| *o.last().expect("a first token")).collect();
                let mut refs: Vec<&mut SeqState> = seqs.iter_mut().collect();
                let step = runner.step_speculative_greedy(&model, &mtp, &mut refs, &inputs, drafts)?;
                for (o, e) in out.iter_mut().zip(step.emitted) {
                    o.extend(e);
                }
                if out.iter().any(|o| o.len() + k + 1 > want[0].len()) {
                    break;
                }
            }
            let same = out.iter().enumerate().all(|(b, o)| o[..] == want[b][..o.len()])
                && (runner.graph_replays > 0) == graphs;
            let drafts = match (oracle, graphs) {
                (true, _) => "oracle drafts",
                (false, false) => "the head's drafts",
                (false, true) => "the head's drafts, graph replays",
            };
            let what = format!("speculative runner, {n} seqs, K = {k}, {drafts} = CPU plain greedy");
            rep.require(&what, same, if same { json!({}) } else { json!({"cpu": &want[..n], "gpu": out}) });
        }
    }
    g.set_exact_gemm(false);
    Ok(())
}

/// Tokens per second of `steps` greedy decode steps of every sequence in `seqs`.
fn decode_rate(
    runner: &mut DecodeRunner,
    model: &Qwen35,
    seqs: &mut [SeqState],
    warm: usize,
    steps: usize,
) -> anyhow::Result<f64> {
    decode_rate_at(runner, model, seqs, warm, steps, 0.0)
}

/// [`decode_rate`] with each token sampled on the device at `temperature` (seeded samplers, one
/// per sequence; greedy at 0).
fn decode_rate_at(
    runner: &mut DecodeRunner,
    model: &Qwen35,
    seqs: &mut [SeqState],
    warm: usize,
    steps: usize,
    temperature: f32,
) -> anyhow::Result<f64> {
    let params = |seed| fp4_model::SamplingParams { temperature, seed, ..Default::default() };
    let mut samplers =
        (0..seqs.len() as u64).map(|s| fp4_model::Sampler::new(params(s))).collect::<Result<Vec<_>, _>>()?;
    let mut inputs: Vec<u32> = vec![1; seqs.len()];
    let mut run = |runner: &mut DecodeRunner, seqs: &mut [SeqState]| -> anyhow::Result<()> {
        let mut refs: Vec<&mut SeqState> = seqs.iter_mut().collect();
        inputs = if temperature == 0.0 {
            runner.step_greedy(model, &mut refs, &inputs)?
        } else {
            let controls: Vec<_> = samplers.iter_mut().map(fp4_model::Sampler::next_controls).collect();
            runner.step_sampled(model, &mut refs, &inputs, &controls)?
        };
        Ok(())
    };
    for _ in 0..warm {
        run(runner, seqs)?;
    }
    let t0 = Instant::now();
    for _ in 0..steps {
        run(runner, seqs)?;
    }
    Ok((steps * seqs.len()) as f64 / t0.elapsed().as_secs_f64())
}

/// Speculative decode through the runner with the acceptance forced (random weights draft
/// nothing the main model agrees with): step t keeps `kept[t % len]` drafts, otherwise every
/// step does the real work (K head steps, the K + 1-row verify, the LM head and argmax over its
/// rows, the acceptance, the head over the verified rows), as one graph replay when the runner
/// captures graphs. Tokens per second, counting kept drafts + 1 per sequence and step.
fn speculative_rate(
    runner: &mut DecodeRunner,
    model: &Qwen35,
    mtp: &fp4_model::Mtp,
    seqs: &mut [SeqState],
    kept: &[usize],
    warm: usize,
    steps: usize,
) -> anyhow::Result<f64> {
    let mut inputs: Vec<u32> = vec![1; seqs.len()];
    let mut tokens = 0usize;
    let mut run = |runner: &mut DecodeRunner, step: usize| -> anyhow::Result<usize> {
        let mut refs: Vec<&mut SeqState> = seqs.iter_mut().collect();
        runner.force_acceptance_for_benchmark(Some(kept[step % kept.len()]));
        let out = runner.step_speculative_greedy(model, mtp, &mut refs, &inputs, None)?;
        inputs = out.emitted.iter().map(|e| *e.last().expect("a token per sequence")).collect();
        Ok(out.emitted.iter().map(Vec::len).sum())
    };
    for step in 0..warm {
        run(runner, step)?;
    }
    let t0 = Instant::now();
    for step in 0..steps {
        tokens += run(runner, step)?;
    }
    runner.force_acceptance_for_benchmark(None);
    Ok(tokens as f64 / t0.elapsed().as_secs_f64())
}

/// One engine benchmark by name (`mtp`, `conversation`) on the synthetic model `name`.
pub(super) fn engine_part(name: &str, part: &str) -> anyhow::Result<Value> {
    match part {
        "mtp" => mtp_bench(name),
        "conversation" => conversation_bench(name),
        other => anyhow::bail!("--engine-part {other}: expected mtp or conversation"),
    }
}

/// MTP speculative decoding on the synthetic model (NVFP4, its head BF16) at K = 3 with the
/// acceptance forced to a mean accepted length of 2.5 (1 or 2 drafts kept, alternately: the
/// published range for Qwen3.5's head is 2–3), graph-replayed and eager, drafting in NVFP4 (the
/// MTP layer and a copy of the LM head) and in BF16, against plain decode of the same sequences
/// (graphs and eager), at 1, 8 and 32 streams.
fn mtp_bench(name: &str) -> anyhow::Result<Value> {
    let src = Synthetic::named(name, SyntheticFormat::Nvfp4 { mlp_only: false }, 1)?.with_mtp();
    let o = LoadOptions::new(F32).on(Device::Cuda);
    let (model, mut mtp) = (Qwen35::load(&src, o)?, fp4_model::Mtp::load(&src, o)?.context("the synthetic head")?);
    let (k, kept) = (3, [1usize, 2]);
    let vocab = model.config.vocab_size as u64;
    let prompt: Vec<u32> = (0..1000u64).map(|i| ((i * 2654435761 + 5) % vocab) as u32).collect();
    let mut cache = model.new_cache();
    let h = model.forward_normed(&prompt, &mut cache, Logits::All)?;
    let next: Vec<u32> = prompt[1..].iter().copied().chain([1]).collect();
    let mut head_cache = mtp.new_cache();
    let g = mtp.forward(&model, &next, &h, &mut head_cache)?;
    let last = ops::rows(&g, g.rows() - 1, g.rows());
    let mut out = json!({"k": k, "mean_accepted_length": 1.0 + kept.iter().sum::<usize>() as f64 / kept.len() as f64});
    // 32 streams: past 64 verify rows the step runs eagerly (where speculation should lose).
    let streams = [1usize, 8, 32];
    // Each sequence holds 1 + K GDN state slots (~53 MB each on the 9B) and ~1k tokens of KV.
    let cfg =
        |n: usize| RunnerConfig::from_budget(&model.config, n, 4096, 32, (8usize << 30).max(n * (384 << 20)), true, k);
    let speculative = |mtp: &fp4_model::Mtp, n: usize, graphs: bool| -> anyhow::Result<f64> {
        let mut runner = DecodeRunner::new(&model, RunnerConfig { graphs, ..cfg(n)? });
        let mut seqs = (0..n)
            .map(|_| runner.admit_speculative(&cache, &head_cache, last.clone()))
            .collect::<Result<Vec<_>, _>>()?;
        speculative_rate(&mut runner, &model, mtp, &mut seqs, &kept, 2, 32)
    };
    // Drafting with the weights as loaded (BF16 LM head and MTP layer), then in NVFP4 (`fp4
    // serve`'s GPU default: Mtp::quantize_for_drafting).
    let mut model_head = Vec::new();
    for &n in &streams {
        model_head.push((speculative(&mtp, n, true)?, speculative(&mtp, n, false)?));
    }
    anyhow::ensure!(mtp.quantize_for_drafting(&model), "the synthetic LM head has no NVFP4 copy");
    for (&n, (spec_bf16, eager_bf16)) in streams.iter().zip(model_head) {
        let (spec, spec_eager) = (speculative(&mtp, n, true)?, speculative(&mtp, n, false)?);
        let plain = |graphs: bool| -> anyhow::Result<f64> {
            let mut r = DecodeRunner::new(&model, RunnerConfig { graphs, ..cfg(n)? });
            let mut seqs = (0..n).map(|_| r.admit(&cache)).collect::<Result<Vec<_>, _>>()?;
            decode_rate(&mut r, &model, &mut seqs, 4, 64)
        };
        let (without, without_eager) = (plain(true)?, plain(false)?);
        println!(
            "engine {name} nvfp4: MTP K={k} mean accepted length 2.5, {n} streams: {spec:.1} tok/s graphs \
             ({spec_eager:.1} eager; drafting in BF16 {spec_bf16:.1} graphs, {eager_bf16:.1} eager) \
             against {without:.1} without (graphs; {without_eager:.1} eager)"
        );
        out[format!("streams_{n}")] = json!({"decode_tok_s": spec, "decode_tok_s_eager": spec_eager,
            "decode_tok_s_bf16_draft_head": spec_bf16, "decode_tok_s_bf16_draft_head_eager": eager_bf16,
            "decode_tok_s_without": without, "decode_tok_s_without_eager": without_eager});
    }
    Ok(out)
}

/// Times to first token of an `n`-token prompt (prefill, pick the token), sorted: three runs
/// after a warm-up.
pub(super) fn ttft_runs_ms(model: &Qwen35, n: usize) -> anyhow::Result<Vec<f64>> {
    let vocab = model.config.vocab_size as u64;
    let ids: Vec<u32> = (0..n as u64).map(|i| ((i * 2654435761 + 11) % vocab) as u32).collect();
    let mut sampler = fp4_model::Sampler::new(fp4_model::SamplingParams::default())?;
    let mut runs = Vec::new();
    for i in 0..4 {
        let t0 = Instant::now();
        let l = model.forward(&ids, &mut model.new_cache(), Logits::Last)?;
        sampler.sample_tensor(&l);
        if i > 0 {
            runs.push(t0.elapsed().as_secs_f64() * 1e3);
        }
    }
    runs.sort_by(f64::total_cmp);
    Ok(runs)
}

/// Graph decode of `batch` sequences (a 1k-token prompt each) of the synthetic NVFP4 model and
/// nothing else, for a profiler's trace.
pub(super) fn profile_decode(g: &Gpu, name: &str, steps: usize, batch: usize, depth: usize) -> anyhow::Result<()> {
    g.set_exact_gemm(false);
    let src = Synthetic::named(name, SyntheticFormat::Nvfp4 { mlp_only: false }, 1)?;
    let model = Qwen35::load(&src, LoadOptions::new(F32).on(Device::Cuda))?;
    let max_len = (depth + 8 + steps + 64).max(4096);
    let budget = (8usize << 30).max(2 * batch * max_len * Pools::block_bytes(&model.config, 1, false));
    let cfg = RunnerConfig::from_budget(&model.config, batch, max_len, 32, budget, true, 0)?;
    let mut runner = DecodeRunner::new(&model, cfg);
    let vocab = model.config.vocab_size as u64;
    let prompt: Vec<u32> = (0..1000u64).map(|i| ((i * 2654435761 + 5) % vocab) as u32).collect();
    let mut cache = model.new_cache();
    model.forward(&prompt, &mut cache, Logits::Last)?;
    let mut seqs = (0..batch).map(|_| runner.admit(&cache)).collect::<Result<Vec<_>, _>>()?;
    if depth > 0 {
        for s in &mut seqs {
            runner.set_len_for_benchmark(s, depth)?;
        }
    }
    let r = decode_rate(&mut runner, &model, &mut seqs, 8, steps)?;
    println!("profile decode {name} nvfp4 bs={batch} depth {depth}: {r:.1} tok/s over {steps} steps");
    Ok(())
}

/// Through the serving engine (`fp4 serve`'s scheduler thread: admission, chunked prefill, the
/// batched runner's graph step, per-token events): the decode tokens per second of one greedy
/// request, counted from its first token to its last (what the server adds to the runner's step),
/// and the TTFT of 1k and 4k prompts (median of three, each prompt new). The HTTP layer runs on
/// other threads and is not in these figures.
fn served_benches(
    model: Qwen35,
    prompt: &[u32],
    tokens: usize,
    prefill_chunk: usize,
) -> anyhow::Result<(f64, Vec<(usize, f64)>)> {
    use fp4_server::engine::{self, EngineConfig, Event, GenRequest, Penalties};
    let cfg = EngineConfig {
        max_num_seqs: 8,
        max_model_len: 4096 + 8,
        max_waiting: 8,
        cache_budget_bytes: 4 << 30,
        cuda_graphs: true,
        prefix_cache_bytes: 0,
        spec_tokens: 0,
        prefill_chunk,
    };
    let vocab = model.config.vocab_size as u64;
    let handle = engine::start(model, cfg)?;
    let request = |prompt: Vec<u32>, max_tokens| GenRequest {
        prompt,
        sampling: fp4_model::SamplingParams::default(),
        penalties: Penalties::default(),
        max_tokens,
        stop_ids: vec![],
        logprobs: None,
        choices: vec![],
        snapshot_at: vec![],
    };
    // Each token's arrival time, from the submission.
    let run = |req: GenRequest| -> anyhow::Result<Vec<Instant>> {
        let mut events = handle.submit(req)?;
        let mut times = Vec::new();
        loop {
            match events.blocking_recv() {
                Some(Event::Token { .. }) => times.push(Instant::now()),
                Some(Event::Finished { .. }) => return Ok(times),
                Some(Event::Failed(e)) => anyhow::bail!("the serving engine failed the request: {e}"),
                None => anyhow::bail!("the serving engine stopped"),
            }
        }
    };
    let mut rate = 0.0;
    // The first request captures the step's graph; the second is timed.
    for _ in 0..2 {
        let times = run(request(prompt.to_vec(), tokens + 1))?;
        let (first, last) = (times.first().context("no tokens")?, times.last().context("no tokens")?);
        rate = (times.len() - 1) as f64 / last.duration_since(*first).as_secs_f64();
    }
    // TTFT as a client of the engine sees it: chunked prefill, the first token on the host.
    let mut ttft = Vec::new();
    for n in [1000usize, 4000] {
        let mut runs: Vec<f64> = (0..3u64)
            .map(|r| {
                let ids: Vec<u32> = (0..n as u64).map(|i| ((i * 2654435761 + 101 * r + 7) % vocab) as u32).collect();
                let t0 = Instant::now();
                let times = run(request(ids, 1))?;
                Ok(times.first().context("no tokens")?.duration_since(t0).as_secs_f64() * 1e3)
            })
            .collect::<anyhow::Result<_>>()?;
        runs.sort_by(f64::total_cmp);
        ttft.push((n, runs[1]));
    }
    handle.shutdown();
    Ok((rate, ttft))
}

/// TTFT turn by turn over a 20-turn conversation through the serving engine (a 1k-token start,
/// 32-token replies and 30-token user messages), with and without prefix caching: issue 16's
/// `ttft_ms_per_turn: {cached, uncached}`, plus each turn's prompt and cached tokens; and cached
/// with one-token replies (31 new tokens a turn: the target case).
fn conversation_bench(name: &str) -> anyhow::Result<Value> {
    use fp4_server::engine::{self, EngineConfig};
    let mut out = json!({});
    // The third: one-token replies, so each turn prefills 31 new tokens after the cached prefix
    // (the "~30 new tokens"; a real reply's tokens come back in the next prompt).
    for (label, prefix_cache_bytes, reply) in
        [("cached", 8usize << 30, 32), ("uncached", 0, 32), ("cached_31_new_tokens", 8 << 30, 1)]
    {
        let src = Synthetic::named(name, SyntheticFormat::Nvfp4 { mlp_only: false }, 1)?;
        let model = Qwen35::load(&src, LoadOptions::new(F32).on(Device::Cuda))?;
        let vocab = model.config.vocab_size;
        let cfg = EngineConfig {
            max_num_seqs: 8,
            max_model_len: 8192,
            max_waiting: 8,
            cache_budget_bytes: (4 << 30) + prefix_cache_bytes,
            cuda_graphs: true,
            prefix_cache_bytes,
            spec_tokens: 0,
            prefill_chunk: engine::PREFILL_CHUNK,
        };
        let handle = engine::start(model, cfg)?;
        let first: Vec<u32> = (0..1000u64).map(|i| ((i * 2654435761 + 17) % vocab as u64) as u32).collect();
        let turns = engine::conversation_ttfts(&handle, first, 20, 30, reply, vocab).map_err(|e| anyhow::anyhow!(e))?;
        handle.shutdown();
        let ttfts: Vec<f64> = turns.iter().map(|t| t.ttft_ms).collect();
        println!(
            "engine {name} conversation ({label}): TTFT per turn {:?} ms",
            ttfts.iter().map(|x| x.round()).collect::<Vec<_>>()
        );
        out[label] = json!(ttfts);
        out[format!("{label}_turns")] = json!(turns);
    }
    Ok(out)
}

/// The engine benchmarks (schema `fp4.engine-bench.v1`'s `fp4` part): decode at batch 1 through
/// the runner (graph and eager), aggregate decode of 1/8/32/64 streams after a 1k prompt, decode
/// at context depth, TTFT of 1k and 4k prompts, and
/// decode at batch 1 through the serving engine.
pub(super) fn engine_benches(g: &Gpu, _a: &Args, name: &str, copy: f64) -> anyhow::Result<Value> {
    g.set_exact_gemm(false);
    let mut out = json!({"copy_gb_per_s": copy / 1e9});
    for (label, format) in [("nvfp4", SyntheticFormat::Nvfp4 { mlp_only: false }), ("bf16", SyntheticFormat::Bf16)] {
        let src = Synthetic::named(name, format, 1)?;
        let mut model = Qwen35::load(&src, LoadOptions::new(F32).on(Device::Cuda))?;
        let bytes: usize = model.linears_mut().iter().map(|l| l.gpu_weight_bytes()).sum::<usize>()
            + model.lm_head().map_or(0, |l| l.gpu_weight_bytes());
        let model = model;
        let cfg = RunnerConfig::from_budget(&model.config, 64, 33_000, 32, 16 << 30, true, 0)?;
        let mut runner = DecodeRunner::new(&model, cfg);
        let vocab = model.config.vocab_size as u64;
        let prompt: Vec<u32> = (0..1000u64).map(|i| ((i * 2654435761 + 5) % vocab) as u32).collect();
        let mut cache = model.new_cache();
        model.forward(&prompt, &mut cache, Logits::Last)?;
        let roofline = copy / bytes as f64;
        out[format!("bytes_per_token_{label}")] = json!(bytes);

        let mut one = vec![runner.admit(&cache)?];
        let bs1 = decode_rate(&mut runner, &model, &mut one, 8, 128)?;
        out[format!("decode_bs1_{label}")] = json!(bs1);
        if label == "nvfp4" {
            // Annie's harness samples at temperature 0.2: drawn on the device, graph-replayed.
            let sampled = decode_rate_at(&mut runner, &model, &mut one, 8, 128, 0.2)?;
            out["decode_bs1_nvfp4_sampled_t0.2"] = json!(sampled);
            println!("engine {name} {label}: decode bs=1 sampled at temperature 0.2: {sampled:.1} tok/s (graphs)");
        }
        println!("engine {name} {label}: decode bs=1 {bs1:.1} tok/s (graphs; {:.0} % of the {roofline:.0} tok/s copy roofline)", 100.0 * bs1 / roofline);
        if label == "nvfp4" {
            let mut eager = DecodeRunner::new(&model, RunnerConfig { graphs: false, ..cfg });
            let mut e1 = vec![eager.admit(&cache)?];
            let bs1_eager = decode_rate(&mut eager, &model, &mut e1, 4, 64)?;
            drop(eager);
            out["decode_bs1_nvfp4_eager"] = json!(bs1_eager);
            println!("engine {name} {label}: decode bs=1 eager {bs1_eager:.1} tok/s");
            g.set_programmatic_launch(false);
            let mut plain = DecodeRunner::new(&model, cfg);
            let mut p1 = vec![plain.admit(&cache)?];
            let bs1_plain = decode_rate(&mut plain, &model, &mut p1, 4, 64)?;
            drop(plain);
            g.set_programmatic_launch(true);
            out["decode_bs1_nvfp4_graphs_without_pdl"] = json!(bs1_plain);
            println!("engine {name} {label}: decode bs=1 graphs without PDL {bs1_plain:.1} tok/s");
            println!("engine {name} {label}: graph memory {:.1} MiB", g.graph_memory_bytes() as f64 / (1 << 20) as f64);
            let mut depth = serde_json::Map::new();
            for d in [0usize, 4096, 16384, 32768] {
                runner.set_len_for_benchmark(&mut one[0], d)?;
                let r = decode_rate(&mut runner, &model, &mut one, 4, 64)?;
                println!("engine {name} {label}: decode at depth {d}: {r:.1} tok/s");
                depth.insert(d.to_string(), json!(r));
            }
            out["decode_depth"] = Value::Object(depth);
        }
        runner.release(one.pop().expect("one sequence"));
        let mut agg = serde_json::Map::new();
        let streams: &[usize] = if label == "nvfp4" { &[1, 8, 32, 64] } else { &[1, 8] };
        for &n in streams {
            let mut seqs = (0..n).map(|_| runner.admit(&cache)).collect::<Result<Vec<_>, _>>()?;
            let r = decode_rate(&mut runner, &model, &mut seqs, 4, 64)?;
            println!("engine {name} {label}: aggregate decode {n} streams (1k prompt): {r:.0} tok/s");
            agg.insert(n.to_string(), json!(r));
            for s in seqs {
                runner.release(s);
            }
        }
        out[format!("aggregate_decode_{label}")] = Value::Object(agg);
        if label == "nvfp4" {
            drop(runner);
            for n in [1000, 4000] {
                let ms = ttft_runs_ms(&model, n)?[1];
                println!("engine {name} {label}: TTFT {n} tokens {ms:.1} ms");
                out[format!("ttft_{}k_nvfp4_ms", n / 1000)] = json!(ms);
            }
            let (served, served_ttft) = served_benches(model, &prompt, 128, fp4_server::engine::PREFILL_CHUNK)?;
            for (n, ms) in served_ttft {
                println!("engine {name} {label}: TTFT {n} tokens through the serving engine {ms:.1} ms");
                out[format!("ttft_{}k_nvfp4_served_ms", n / 1000)] = json!(ms);
            }
            // The same with 2048-token prefill chunks (`--max-num-batched-tokens 2048`, vLLM's
            // usual budget), on a fresh copy of the model (the engine keeps the first).
            let fresh = Qwen35::load(&src, LoadOptions::new(F32).on(Device::Cuda))?;
            for (n, ms) in served_benches(fresh, &prompt, 8, 2048)?.1 {
                println!(
                    "engine {name} {label}: TTFT {n} tokens through the serving engine, 2048-token chunks {ms:.1} ms"
                );
                out[format!("ttft_{}k_nvfp4_served_chunk2048_ms", n / 1000)] = json!(ms);
            }
            let overhead = 1.0 - served / bs1;
            println!(
                "engine {name} {label}: decode bs=1 through the serving engine {served:.1} tok/s \
                 (runner alone {bs1:.1}: the engine's own cost {:.1} % of a step)",
                100.0 * overhead
            );
            out["decode_bs1_nvfp4_served"] = json!(served);
            out["server_overhead_fraction"] = json!(overhead);
            out["conversation_ttft_ms"] = conversation_bench(name)?;
            // Last, and its failure recorded rather than losing the figures above.
            out["mtp"] = mtp_bench(name).unwrap_or_else(|e| json!({"error": format!("{e:#}")}));
        }
    }
    Ok(out)
}
