//! Max calibration + round-to-nearest NVFP4 (ModelOpt `NVFP4_DEFAULT_CFG` / `NVFP4_MLP_ONLY_CFG`
//! with algorithm `max`), run layer by layer.

use crate::plan::{Plan, Strategy};
use crate::{QuantError, Result};
use fp4_format::nvfp4::{self, Nvfp4Weight};
use fp4_format::Checkpoint;
use fp4_kernels::{ops, Precision};
use fp4_model::{AmaxObserver, DecoderLayer, GdnAlgo, LayerCache, LayerCtx, LoadOptions};
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
    /// ‖W − dequant(W)‖ / ‖W‖.
    pub weight_rel_error: f32,
}

#[derive(Debug)]
pub struct QuantResult {
    pub plan: Plan,
    pub layers: BTreeMap<String, QuantizedLinear>,
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
    if opts.algorithm == Algorithm::AwqLite {
        return Err(QuantError::Invalid(
            "--algorithm awq_lite is not implemented yet (it arrives with the AWQ-lite strategy); use --algorithm max"
                .into(),
        ));
    }
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
    let ctx = LayerCtx::new(cfg, p);
    let mut hidden = {
        let embed =
            fp4_model::load_param(ckpt, &ckpt.text_name("embed_tokens.weight"), &[cfg.vocab_size, cfg.hidden_size], p)?;
        samples.iter().map(|ids| ops::embedding(&embed, ids)).collect::<Vec<_>>()
    };
    let mut layers = BTreeMap::new();
    progress.start("calibrating and quantizing layers", cfg.num_hidden_layers as u64);
    for i in 0..cfg.num_hidden_layers {
        let mut layer = DecoderLayer::load(ckpt, i, LoadOptions::new(p))?;
        let mut observers: BTreeMap<String, AmaxObserver> = BTreeMap::new();
        for lin in layer.linears_mut() {
            if plan.module(&lin.name).is_some_and(|m| m.quantize) {
                let o = AmaxObserver::default();
                lin.observer = Some(o.clone());
                observers.insert(lin.name.clone(), o);
            }
        }
        if !observers.is_empty() || i + 1 < cfg.num_hidden_layers {
            for h in hidden.iter_mut() {
                let mut cache = LayerCache::new(cfg, cfg.layer_types[i]);
                *h = layer.forward(h, &mut cache, 0, GdnAlgo::Chunked, &ctx);
            }
        }
        quantize_layer(&mut layer, &plan, &observers, &mut layers);
        progress.inc();
    }
    progress.finish();
    Ok(QuantResult {
        plan,
        layers,
        samples: samples.len(),
        tokens: samples.iter().map(Vec::len).sum(),
        calib_secs: started.elapsed().as_secs_f64(),
    })
}

/// Quantizes one layer's planned linears: fused groups share the max weight amax and input amax.
fn quantize_layer(
    layer: &mut DecoderLayer,
    plan: &Plan,
    observers: &BTreeMap<String, AmaxObserver>,
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
            },
        );
    }
}
