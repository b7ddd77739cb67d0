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
}

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
    let cfg = &ckpt.config;
    let plan = Plan::new(ckpt, opts.strategy, &opts.exclude);
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
    progress.start("calibrating and quantizing layers", cfg.num_hidden_layers as u64);
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
        if !observers.is_empty() || i + 1 < cfg.num_hidden_layers {
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

/// Which norm produces a group's input, if the group's AWQ scales can be folded into it.
#[derive(Debug, Clone, Copy, PartialEq)]
enum FoldTarget {
    InputNorm,
    PostAttentionNorm,
}

fn fold_target(module: &str) -> Option<FoldTarget> {
    let suffix = module.rsplit('.').take(2).collect::<Vec<_>>();
    match (suffix[1], suffix[0]) {
        ("self_attn", "q_proj" | "k_proj" | "v_proj") => Some(FoldTarget::InputNorm),
        ("linear_attn", "in_proj_qkv" | "in_proj_z") => Some(FoldTarget::InputNorm),
        ("mlp", "gate_proj" | "up_proj") => Some(FoldTarget::PostAttentionNorm),
        _ => None,
    }
}

/// Searches AWQ-lite scales for each recorded group of layer `index`, scales the group's
/// weights by `s`, and folds `1/s` into the producing norm (plus the norm's other, unquantized
/// readers: GDN `in_proj_a`/`in_proj_b`) or keeps it as a pre-quant scale.
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
    for (&group, rec) in recorders {
        let members: Vec<String> =
            plan.modules.iter().filter(|m| m.group == group && m.quantize).map(|m| m.name.clone()).collect();
        let target = fold_target(&members[0]);
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
        let r = awq::search(&x, &act, &weights.iter().collect::<Vec<_>>(), opts);
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
                Some(t) => {
                    let (input_norm, post_norm) = layer.norms_mut();
                    let (norm, file_name) = match t {
                        FoldTarget::InputNorm => (input_norm, "input_layernorm"),
                        FoldTarget::PostAttentionNorm => (post_norm, "post_attention_layernorm"),
                    };
                    awq::fold_into_one_plus_norm(norm.as_mut_slice(), s);
                    let name = ckpt.text_name(&format!("layers.{index}.{file_name}.weight"));
                    overrides.insert(name.clone(), norm.as_slice().to_vec());
                    info.folded_into = Some(name);
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
                }
                None => info.pre_quant_scale = Some(s.iter().map(|v| 1.0 / v).collect()),
            }
        }
        out.insert(group, info);
    }
    out
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
        let d = q.dequantize();
        let err: f64 = w.iter().zip(&d).map(|(a, b)| ((a - b) as f64).powi(2)).sum::<f64>();
        let norm: f64 = w.iter().map(|a| (*a as f64).powi(2)).sum::<f64>();
        out.insert(
            l.name.clone(),
            QuantizedLinear {
                weight: q,
                input_scale: nvfp4::nvfp4_global_scale(x_amax),
                weight_amax: w_amax,
                input_amax: x_amax,
                weight_rel_error: if norm > 0.0 { (err / norm).sqrt() as f32 } else { 0.0 },
                awq: awq.get(&group_of(&l.name)).cloned(),
                fp8: None,
            },
        );
    }
}
