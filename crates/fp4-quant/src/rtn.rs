//! Layer-by-layer calibration and NVFP4 quantization: max calibration + round-to-nearest
//! (ModelOpt algorithm `max`), optionally preceded by AWQ-lite scale search and folding ([`awq`]).

use crate::awq::{self, AwqOptions};
use crate::plan::{Plan, Strategy};
use crate::{QuantError, Result};
use fp4_format::nvfp4::{self, Fp8Weight, Nvfp4Weight};
use fp4_format::Checkpoint;
use fp4_kernels::Tensor;
use fp4_kernels::{ops, Precision};
use fp4_model::{AmaxObserver, ChannelRecorder, DecoderLayer, GdnAlgo, LayerCache, LayerCtx, LoadOptions, MixerState};
use std::collections::BTreeMap;
use std::time::Instant;

/// Calibration algorithm.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Algorithm {
    Max,
    AwqLite,
}

#[derive(Debug, Clone)]
pub struct QuantizeOptions {
    pub strategy: Strategy,
    pub algorithm: Algorithm,
    /// `--exclude-layers` items (substrings at dot boundaries, or globs).
    pub exclude: Vec<String>,
    /// Precision of the calibration forward (bf16 = what ModelOpt sees on a bf16 model).
    pub precision: Precision,
    /// AWQ-lite knobs (used with `Algorithm::AwqLite`).
    pub awq: AwqOptions,
    /// `--quantize-lm-head`: the LM head's format; `None` keeps it BF16 (ModelOpt's default).
    pub lm_head: Option<LmHeadFormat>,
}

/// A quantized LM head's format. Its weight is rounded to nearest (max calibration) whatever the
/// strategy: no AWQ scale is searched for it, and auto_mixed does not score it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LmHeadFormat {
    Nvfp4,
    Fp8,
}

/// The name of the LM head module in every layout.
pub const LM_HEAD: &str = "lm_head";

/// Long-running steps report here (the CLI draws a progress bar).
pub trait Progress {
    fn start(&self, _what: &str, _total: u64) {}
    fn inc(&self) {}
    fn finish(&self) {}
}

/// No progress output.
pub struct Silent;
impl Progress for Silent {}

/// One quantized linear layer.
#[derive(Debug, Clone)]
pub struct QuantizedLinear {
    pub weight: Nvfp4Weight,
    pub input_scale: f32,
    /// Max |W| over the module's fused group (→ `weight_scale_2`).
    pub weight_amax: f32,
    /// Max |x| over the fused group's calibration inputs (→ `input_scale`).
    pub input_amax: f32,
    /// ‖W − dequant(W)‖ / ‖W‖ (of the AWQ-scaled weight when scaled).
    pub weight_rel_error: f32,
    /// AWQ outcome of the module's group, when AWQ-lite searched it.
    pub awq: Option<GroupAwq>,
    /// Set when auto_mixed chose FP8 for the module: exported as FP8 instead of `weight`.
    pub fp8: Option<Fp8Weight>,
}

/// AWQ-lite outcome for one group of linears sharing an input.
#[derive(Debug, Clone)]
pub struct GroupAwq {
    pub alpha: Option<f32>,
    /// Output MSE (weights fake-quantized, activations not) with s = 1 and with the chosen s.
    pub mse_rtn: f64,
    pub mse_best: f64,
    /// Where `1/s` went: the norm tensor it was folded into, or `None` if written as
    /// `pre_quant_scale`.
    pub folded_into: Option<String>,
    /// `1/s` per input channel when not folded (ModelOpt's `pre_quant_scale` convention).
    pub pre_quant_scale: Option<Vec<f32>>,
    /// Input amax after scaling: `max_c(amax[c] / s[c])`.
    pub input_amax: f32,
}

#[derive(Debug)]
pub struct QuantResult {
    pub plan: Plan,
    pub layers: BTreeMap<String, QuantizedLinear>,
    /// Unquantized tensors whose values changed (AWQ-folded norms and their other readers),
    /// written in the source dtype.
    pub overrides: BTreeMap<String, Vec<f32>>,
    pub algorithm: Algorithm,
    pub samples: usize,
    pub tokens: usize,
    pub calib_secs: f64,
}

/// Runs calibration over `samples` and quantizes the planned layers.
pub fn quantize(
    ckpt: &Checkpoint,
    samples: &[Vec<u32>],
    opts: &QuantizeOptions,
    progress: &dyn Progress,
) -> Result<QuantResult> {
    if let Some(q) = &ckpt.quant {
        return Err(QuantError::Invalid(format!(
            "{} is already quantized ({}); quantize the BF16 checkpoint instead",
            ckpt.dir.display(),
            q.summary()
        )));
    }
    crate::source::check_finite(ckpt)?;
    let cfg = &ckpt.config;
    if opts.lm_head.is_some() && cfg.tie_word_embeddings {
        return Err(QuantError::Invalid(format!(
            "--quantize-lm-head: {} ties the LM head to the embeddings (config.json tie_word_embeddings: true), \
             so there is no lm_head weight to quantize",
            ckpt.dir.display()
        )));
    }
    let mut plan = Plan::new(ckpt, opts.strategy, &opts.exclude);
    let started = Instant::now();
    let p = opts.precision;
    let ctx = LayerCtx::new(cfg, p, fp4_kernels::Device::Cpu);
    let mut hidden = {
        let embed =
            fp4_model::load_param(ckpt, &ckpt.text_name("embed_tokens.weight"), &[cfg.vocab_size, cfg.hidden_size], p)?;
        samples.iter().map(|ids| ops::embedding(&embed, ids)).collect::<Vec<_>>()
    };
    let mut layers = BTreeMap::new();
    let mut overrides = BTreeMap::new();
    let awq_on = opts.algorithm == Algorithm::AwqLite;
    // The layers, then the LM head when it is quantized too (one more step of the bar).
    let steps = cfg.num_hidden_layers + usize::from(opts.lm_head.is_some());
    progress.start("calibrating and quantizing layers", steps as u64);
    for i in 0..cfg.num_hidden_layers {
        let mut layer = DecoderLayer::load(ckpt, i, LoadOptions::new(p))?;
        let mut observers: BTreeMap<String, AmaxObserver> = BTreeMap::new();
        // One recorder per fused group: its members read the same input.
        let mut recorders: BTreeMap<usize, ChannelRecorder> = BTreeMap::new();
        for lin in layer.linears_mut() {
            let Some(m) = plan.module(&lin.name).filter(|m| m.quantize) else { continue };
            let o = AmaxObserver::default();
            lin.observer = Some(o.clone());
            observers.insert(lin.name.clone(), o);
            if awq_on && !recorders.contains_key(&m.group) {
                let r = ChannelRecorder::new(lin.in_features, opts.awq.max_rows);
                lin.recorder = Some(r.clone());
                recorders.insert(m.group, r);
            }
        }
        if !observers.is_empty() || i + 1 < cfg.num_hidden_layers || opts.lm_head.is_some() {
            for h in hidden.iter_mut() {
                let mut cache = LayerCache::new(cfg, cfg.layer_types[i], fp4_kernels::Device::Cpu);
                let state = MixerState::Sequence { cache: &mut cache, pos0: 0, algo: GdnAlgo::Chunked };
                *h = layer.forward(h, state, &ctx);
            }
        }
        let awq = apply_awq(ckpt, i, &mut layer, &plan, &recorders, &opts.awq, &mut overrides);
        quantize_layer(&mut layer, &plan, &observers, &awq, &mut layers);
        progress.inc();
    }
    if let Some(format) = opts.lm_head {
        layers.insert(LM_HEAD.to_string(), quantize_lm_head(ckpt, &hidden, &ctx, format)?);
        plan.quantize_lm_head(ckpt);
        progress.inc();
    }
    progress.finish();
    Ok(QuantResult {
        plan,
        layers,
        overrides,
        algorithm: opts.algorithm,
        samples: samples.len(),
        tokens: samples.iter().map(Vec::len).sum(),
        calib_secs: started.elapsed().as_secs_f64(),
    })
}

/// Where a group's `1/s` folds exactly (see [`awq`]): the (1+w) norm that produces its input,
/// or the producer of a mixer's / the MLP's output.
#[derive(Debug, Clone, Copy, PartialEq)]
enum FoldTarget {
    InputNorm,
    PostAttentionNorm,
    /// down_proj: `up_proj`'s output rows.
    UpRows,
    /// o_proj: `v_proj`'s output rows, shared by the query heads of a KV head.
    ValueRows,
    /// GDN out_proj: the gated norm's weight, shared by the value heads.
    GdnNorm,
}

impl FoldTarget {
    /// Output-side folds change another linear's weight, so they run before the input-side
    /// searches that read it.
    fn changes_a_producer(self) -> bool {
        matches!(self, FoldTarget::UpRows | FoldTarget::ValueRows | FoldTarget::GdnNorm)
    }
}

fn fold_target(module: &str) -> Option<FoldTarget> {
    let suffix = module.rsplit('.').take(2).collect::<Vec<_>>();
    match (suffix[1], suffix[0]) {
        ("self_attn", "q_proj" | "k_proj" | "v_proj") => Some(FoldTarget::InputNorm),
        ("linear_attn", "in_proj_qkv" | "in_proj_z") => Some(FoldTarget::InputNorm),
        ("mlp", "gate_proj" | "up_proj") => Some(FoldTarget::PostAttentionNorm),
        ("mlp", "down_proj") => Some(FoldTarget::UpRows),
        ("self_attn", "o_proj") => Some(FoldTarget::ValueRows),
        ("linear_attn", "out_proj") => Some(FoldTarget::GdnNorm),
        _ => None,
    }
}

/// The channels of a group's input that must share a scale for its fold to be exact.
fn tie_for(target: Option<FoldTarget>, cfg: &fp4_format::TextConfig, channels: usize) -> awq::Tie {
    match target {
        Some(FoldTarget::ValueRows) => {
            let (hq, hkv, d) = (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim);
            awq::Tie::heads(hq, d, hkv, |h| h / (hq / hkv))
        }
        Some(FoldTarget::GdnNorm) => awq::Tie::heads(cfg.linear_num_value_heads, cfg.linear_value_head_dim, 1, |_| 0),
        _ => awq::Tie::identity(channels),
    }
}

/// Searches AWQ-lite scales for each recorded group of layer `index`, scales the group's
/// weights by `s`, and folds `1/s` where it goes exactly ([`FoldTarget`]: a norm, plus the
/// norm's other, unquantized readers GDN `in_proj_a`/`in_proj_b`; or a producer's rows / the GDN
/// gated norm) or keeps it as a pre-quant scale. Output-side groups go first: their folds change
/// `up_proj` and `v_proj`, which the input-side searches then see as they will be quantized.
fn apply_awq(
    ckpt: &Checkpoint,
    index: usize,
    layer: &mut DecoderLayer,
    plan: &Plan,
    recorders: &BTreeMap<usize, ChannelRecorder>,
    opts: &AwqOptions,
    overrides: &mut BTreeMap<String, Vec<f32>>,
) -> BTreeMap<usize, GroupAwq> {
    let mut out = BTreeMap::new();
    let members_of = |group: usize| -> Vec<String> {
        plan.modules.iter().filter(|m| m.group == group && m.quantize).map(|m| m.name.clone()).collect()
    };
    let target_of = |group: usize| fold_target(&members_of(group)[0]);
    let mut order: Vec<usize> = recorders.keys().copied().collect();
    order.sort_by_key(|&g| !target_of(g).is_some_and(FoldTarget::changes_a_producer));
    for group in order {
        let rec = &recorders[&group];
        let members = members_of(group);
        let mut target = fold_target(&members[0]);
        if target == Some(FoldTarget::ValueRows) && ckpt.config.attention_bias {
            target = None; // V's bias would need the scale too: left unscaled.
        }
        if target.is_some_and(FoldTarget::changes_a_producer) && !opts.output_folds {
            target = None;
        }
        if target.is_none() && !opts.allow_pre_quant_scale {
            continue; // No exact fold: s = 1 keeps the checkpoint plain NVFP4.
        }
        let mut stats = rec.stats();
        let cin = stats.amax.len();
        let act: Vec<f32> = stats.mean_abs_sum.iter().map(|v| (v / stats.calls.max(1) as f64) as f32).collect();
        let n = stats.rows.len() / cin;
        let x = Tensor::from_vec(std::mem::take(&mut stats.rows), &[n, cin]);
        let mut lins: Vec<_> = layer.linears_mut().into_iter().filter(|l| members.contains(&l.name)).collect();
        let weights: Vec<Tensor> = lins.iter().map(|l| l.weight().clone()).collect();
        let tie = tie_for(target, &ckpt.config, cin);
        let r = awq::search_tied(&x, &act, Some(&stats.amax), &weights.iter().collect::<Vec<_>>(), opts, &tie);
        let mut info = GroupAwq {
            alpha: r.alpha,
            mse_rtn: r.mse_rtn,
            mse_best: r.mse_best,
            folded_into: None,
            pre_quant_scale: None,
            input_amax: stats.amax.iter().fold(0f32, |m, v| m.max(*v)),
        };
        if r.alpha.is_some() {
            let s = &r.scale;
            for (l, w) in lins.iter_mut().zip(&weights) {
                *l.dense_weight_mut().expect("calibration loads dense weights") = awq::scale_columns(w, s);
            }
            info.input_amax = stats.amax.iter().zip(s).fold(0f32, |m, (a, k)| m.max(a / k));
            match target.filter(|_| opts.fold) {
                Some(t) => info.folded_into = Some(fold(ckpt, index, layer, plan, t, &r.shared, overrides)),
                None => info.pre_quant_scale = Some(s.iter().map(|v| 1.0 / v).collect()),
            }
        }
        out.insert(group, info);
    }
    out
}

/// Folds `1/s` (the shared scales of `t`'s tie) into `t` and returns the tensor it went into.
/// Changed tensors that will not be quantized are recorded in `overrides`.
fn fold(
    ckpt: &Checkpoint,
    index: usize,
    layer: &mut DecoderLayer,
    plan: &Plan,
    t: FoldTarget,
    s: &[f32],
    overrides: &mut BTreeMap<String, Vec<f32>>,
) -> String {
    let text = |suffix: &str| ckpt.text_name(&format!("layers.{index}.{suffix}"));
    match t {
        FoldTarget::InputNorm | FoldTarget::PostAttentionNorm => {
            let (input_norm, post_norm) = layer.norms_mut();
            let (norm, file_name) = match t {
                FoldTarget::InputNorm => (input_norm, "input_layernorm"),
                _ => (post_norm, "post_attention_layernorm"),
            };
            awq::fold_into_one_plus_norm(norm.as_mut_slice(), s);
            let name = text(&format!("{file_name}.weight"));
            overrides.insert(name.clone(), norm.as_slice().to_vec());
            if t == FoldTarget::InputNorm {
                // The GDN gate projections read the same normed input.
                for l in layer.linears_mut() {
                    if l.name.ends_with("in_proj_a") || l.name.ends_with("in_proj_b") {
                        let name = format!("{}.weight", l.name);
                        let w = l.dense_weight_mut().expect("GDN gate projections stay dense");
                        *w = awq::scale_columns(w, s);
                        overrides.insert(name, w.as_slice().to_vec());
                    }
                }
            }
            name
        }
        FoldTarget::UpRows | FoldTarget::ValueRows => {
            let producer = if t == FoldTarget::UpRows { "mlp.up_proj" } else { "self_attn.v_proj" };
            let module = text(producer);
            let l = layer.linears_mut().into_iter().find(|l| l.name == module).expect("the layer has its producer");
            let w = l.dense_weight_mut().expect("calibration loads dense weights");
            *w = awq::divide_rows(w, s);
            let name = format!("{module}.weight");
            if !plan.module(&module).is_some_and(|m| m.quantize) {
                overrides.insert(name.clone(), w.as_slice().to_vec());
            }
            name
        }
        FoldTarget::GdnNorm => {
            let norm = layer.gdn_norm_mut().expect("a GDN layer has its gated norm");
            norm.as_mut_slice().iter_mut().zip(s).for_each(|(w, k)| *w /= k);
            let name = text("linear_attn.norm.weight");
            overrides.insert(name.clone(), norm.as_slice().to_vec());
            name
        }
    }
}

/// Quantizes one layer's planned linears: fused groups share the max weight amax and input amax.
fn quantize_layer(
    layer: &mut DecoderLayer,
    plan: &Plan,
    observers: &BTreeMap<String, AmaxObserver>,
    awq: &BTreeMap<usize, GroupAwq>,
    out: &mut BTreeMap<String, QuantizedLinear>,
) {
    let lins: Vec<_> = layer.linears_mut().into_iter().filter(|l| observers.contains_key(&l.name)).collect();
    let group_of = |name: &str| plan.module(name).map(|m| m.group).unwrap_or(usize::MAX);
    let mut group_amax: BTreeMap<usize, (f32, f32)> = BTreeMap::new();
    for l in &lins {
        let e = group_amax.entry(group_of(&l.name)).or_insert((0.0, 0.0));
        e.0 = e.0.max(nvfp4::amax(l.weight().as_slice()));
        e.1 = e.1.max(observers[&l.name].get());
    }
    for (g, a) in awq {
        if let Some(e) = group_amax.get_mut(g) {
            e.1 = a.input_amax;
        }
    }
    for l in lins {
        let (w_amax, x_amax) = group_amax[&group_of(&l.name)];
        let w = l.weight().as_slice();
        let q = Nvfp4Weight::quantize(w, l.out_features, l.in_features, nvfp4::nvfp4_global_scale(w_amax));
        let weight_rel_error = rel_error(w, &q.dequantize());
        out.insert(
            l.name.clone(),
            QuantizedLinear {
                weight: q,
                input_scale: nvfp4::nvfp4_global_scale(x_amax),
                weight_amax: w_amax,
                input_amax: x_amax,
                weight_rel_error,
                awq: awq.get(&group_of(&l.name)).cloned(),
                fp8: None,
            },
        );
    }
}

/// The LM head in `format`: weight rounded to nearest, `input_scale` from the calibration inputs
/// it reads (the final norm of the last layer's outputs `hidden`).
fn quantize_lm_head(
    ckpt: &Checkpoint,
    hidden: &[Tensor],
    ctx: &LayerCtx,
    format: LmHeadFormat,
) -> Result<QuantizedLinear> {
    let cfg = &ckpt.config;
    let p = ctx.precision;
    let norm = fp4_model::load_param(ckpt, &ckpt.text_name("norm.weight"), &[cfg.hidden_size], p)?;
    let x_amax =
        hidden.iter().map(|h| nvfp4::amax(ops::rms_norm(h, &norm, ctx.eps, 1.0, p).as_slice())).fold(0f32, f32::max);
    let (rows, cols) = (cfg.vocab_size, cfg.hidden_size);
    let w = fp4_model::load_param(ckpt, &format!("{LM_HEAD}.weight"), &[rows, cols], p)?;
    let w = w.as_slice();
    let w_amax = nvfp4::amax(w);
    let weight = Nvfp4Weight::quantize(w, rows, cols, nvfp4::nvfp4_global_scale(w_amax));
    let (fp8, input_scale, deq) = match format {
        LmHeadFormat::Nvfp4 => (None, nvfp4::nvfp4_global_scale(x_amax), weight.dequantize()),
        LmHeadFormat::Fp8 => {
            let f8 = Fp8Weight::quantize(w);
            let deq = f8.dequantize();
            (Some(f8), x_amax / nvfp4::E4M3_MAX, deq)
        }
    };
    Ok(QuantizedLinear {
        weight_rel_error: rel_error(w, &deq),
        weight,
        input_scale,
        weight_amax: w_amax,
        input_amax: x_amax,
        awq: None,
        fp8,
    })
}

/// ‖w − d‖ / ‖w‖ (0 for an all-zero weight).
fn rel_error(w: &[f32], d: &[f32]) -> f32 {
    let err: f64 = w.iter().zip(d).map(|(a, b)| ((a - b) as f64).powi(2)).sum::<f64>();
    let norm: f64 = w.iter().map(|a| (*a as f64).powi(2)).sum::<f64>();
    if norm > 0.0 {
        (err / norm).sqrt() as f32
    } else {
        0.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fp4_format::LayerType;

    /// Scaling a consumer's input columns by `s` and folding `1/s` into its producer leaves
    /// every layer of the tiny-quant fixture computing what it computed (f32, random inputs).
    #[test]
    fn output_folds_keep_each_layer_function() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tiny-quant");
        let ckpt = Checkpoint::open(&dir).unwrap();
        let cfg = &ckpt.config;
        let ctx = LayerCtx::new(cfg, Precision::F32, fp4_kernels::Device::Cpu);
        let plan = Plan::new(&ckpt, Strategy::Rtn, &[]);
        let mut seed = 11u64;
        let h: Vec<f32> = (0..5 * cfg.hidden_size)
            .map(|_| {
                seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((seed >> 40) as f32 / (1u64 << 24) as f32) * 4.0 - 2.0
            })
            .collect();
        let h = Tensor::from_vec(h, &[5, cfg.hidden_size]);
        for i in 0..cfg.num_hidden_layers {
            let run = |layer: &DecoderLayer| {
                let mut cache = LayerCache::new(cfg, cfg.layer_types[i], fp4_kernels::Device::Cpu);
                let state = MixerState::Sequence { cache: &mut cache, pos0: 0, algo: GdnAlgo::Chunked };
                layer.forward(&h, state, &ctx)
            };
            let mut layer = DecoderLayer::load(&ckpt, i, LoadOptions::new(Precision::F32)).unwrap();
            let want = run(&layer);
            let mixer = match cfg.layer_types[i] {
                LayerType::FullAttention => (FoldTarget::ValueRows, "self_attn.o_proj"),
                LayerType::LinearAttention => (FoldTarget::GdnNorm, "linear_attn.out_proj"),
            };
            let mut overrides = BTreeMap::new();
            for (t, consumer) in [(FoldTarget::UpRows, "mlp.down_proj"), mixer] {
                let name = ckpt.text_name(&format!("layers.{i}.{consumer}"));
                let l = layer.linears_mut().into_iter().find(|l| l.name == name).unwrap();
                let tie = tie_for(Some(t), cfg, l.in_features);
                let shared: Vec<f32> = (0..tie.n).map(|j| 0.5 + (j % 7) as f32 * 0.25).collect();
                let w = l.dense_weight_mut().unwrap();
                *w = awq::scale_columns(w, &tie.expand(&shared));
                let into = fold(&ckpt, i, &mut layer, &plan, t, &shared, &mut overrides);
                assert!(into.starts_with(&ckpt.text_name(&format!("layers.{i}."))), "{into}");
            }
            let got = run(&layer);
            let m = want.as_slice().iter().fold(0f32, |m, v| m.max(v.abs()));
            let err = got.as_slice().iter().zip(want.as_slice()).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max) / m;
            assert!(err < 1e-5, "layer {i} ({:?}): rel err {err:.2e}", cfg.layer_types[i]);
            // The GDN norm is not quantized, so it must reach the export; up/v_proj are quantized.
            let gdn_norm = ckpt.text_name(&format!("layers.{i}.linear_attn.norm.weight"));
            assert_eq!(overrides.contains_key(&gdn_norm), cfg.layer_types[i] == LayerType::LinearAttention);
        }
    }
}
