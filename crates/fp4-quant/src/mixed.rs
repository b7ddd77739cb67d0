//! `auto_mixed`: per fused group, NVFP4, FP8 or BF16, chosen to minimise KL(bf16 ‖ quant) on the
//! calibration data under an effective-bits budget (ModelOpt `auto_quantize` with `kl_div`
//! scoring, nvfp4.md §4.3).
//!
//! Sensitivity: for each group and each format, only that group is quantized and the KL of the
//! final logits is measured (forward only). Selection: total KL is approximated as the sum of
//! the groups' KLs and minimised exactly under the budget (a knapsack, where ModelOpt bisects a
//! threshold and can end on a worse step). The winner's true KL is then measured against all-NVFP4 (the only single-format
//! assignment under any budget below 8 bits), and the better one is exported.
//!
//! Bits convention: NVFP4 = 4.5 bits per weight (4-bit codes + one E4M3 scale per 16), FP8 = 8,
//! BF16 = 16, averaged over the parameters of the candidate groups.

use crate::plan::Strategy;
use crate::rtn::{quantize, Algorithm, Progress, QuantResult, QuantizeOptions};
use crate::{QuantError, Result};
use fp4_format::nvfp4::{self, Fp8Weight};
use fp4_format::Checkpoint;
use fp4_kernels::Tensor;
use fp4_model::{LinearMethod, LoadOptions, Logits, Qwen35};
use std::collections::BTreeMap;

pub const NVFP4_BITS: f64 = 4.5;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Format {
    Nvfp4,
    Fp8,
    Bf16,
}

impl Format {
    pub const ALL: [Format; 3] = [Format::Nvfp4, Format::Fp8, Format::Bf16];

    /// Position in [`Format::ALL`] (and in per-format arrays).
    pub fn index(self) -> usize {
        self as usize
    }

    pub fn bits(self) -> f64 {
        match self {
            Format::Nvfp4 => NVFP4_BITS,
            Format::Fp8 => 8.0,
            Format::Bf16 => 16.0,
        }
    }
}

/// One candidate group: its parameter count and the measured KL of each format (BF16 = 0).
#[derive(Debug, Clone, serde::Serialize)]
pub struct Group {
    pub modules: Vec<String>,
    pub params: usize,
    /// KL per format, indexed like [`Format::ALL`].
    pub kl: [f64; 3],
}

fn effective_bits(groups: &[Group], choice: &[Format]) -> f64 {
    let total: usize = groups.iter().map(|g| g.params).sum();
    groups.iter().zip(choice).map(|(g, f)| g.params as f64 * f.bits()).sum::<f64>() / total.max(1) as f64
}

fn estimated_kl(groups: &[Group], choice: &[Format]) -> f64 {
    groups.iter().zip(choice).map(|(g, f)| g.kl[f.index()]).sum()
}

/// Budget resolution of the exact selection (units of the bits above all-NVFP4).
const BUDGET_UNITS: usize = 4096;

/// The assignment of least estimated KL with effective bits ≤ `target`, or `None` when even
/// all-NVFP4 does not fit. A multiple-choice knapsack solved exactly by dynamic programming over
/// the extra bits above all-NVFP4 (costs rounded up, so the result always fits), then any
/// budget the rounding left is filled greedily.
pub fn select(groups: &[Group], target: f64) -> Option<Vec<Format>> {
    let total: f64 = groups.iter().map(|g| g.params as f64).sum::<f64>().max(1.0);
    let cheapest = vec![Format::Nvfp4; groups.len()];
    if effective_bits(groups, &cheapest) > target + 1e-9 {
        return None;
    }
    let extra_budget = (target - NVFP4_BITS) * total;
    let unit = (extra_budget / BUDGET_UNITS as f64).max(f64::MIN_POSITIVE);
    let cost = |g: &Group, f: Format| ((f.bits() - NVFP4_BITS) * g.params as f64 / unit - 1e-9).ceil().max(0.0);
    // best[b] = (least KL, choices) using at most b units, over the groups seen so far.
    let mut best: Vec<Option<(f64, Vec<Format>)>> = vec![Some((0.0, Vec::new())); BUDGET_UNITS + 1];
    for g in groups {
        let mut next: Vec<Option<(f64, Vec<Format>)>> = vec![None; BUDGET_UNITS + 1];
        for (b, slot) in next.iter_mut().enumerate() {
            for (i, f) in Format::ALL.iter().enumerate() {
                let c = cost(g, *f);
                if c > b as f64 {
                    continue;
                }
                if let Some((kl, choice)) = &best[b - c as usize] {
                    let kl = kl + g.kl[i];
                    if slot.as_ref().is_none_or(|(k, _)| kl < *k) {
                        let mut choice = choice.clone();
                        choice.push(*f);
                        *slot = Some((kl, choice));
                    }
                }
            }
        }
        best = next;
    }
    let mut best = best[BUDGET_UNITS].take().map(|(_, c)| c).unwrap_or(cheapest);
    // Fill what budget is left: best KL saved per extra bit first.
    loop {
        let mut step: Option<(usize, Format, f64)> = None;
        for (i, g) in groups.iter().enumerate() {
            let cur = best[i].index();
            for (j, f) in Format::ALL.iter().enumerate().skip(cur + 1) {
                let mut c = best.clone();
                c[i] = *f;
                let saved = g.kl[cur] - g.kl[j];
                if saved <= 0.0 || effective_bits(groups, &c) > target + 1e-9 {
                    continue;
                }
                let rate = saved / (g.params as f64 * (f.bits() - best[i].bits()));
                if step.is_none_or(|(_, _, r)| rate > r) {
                    step = Some((i, *f, rate));
                }
            }
        }
        match step {
            Some((i, f, _)) => best[i] = f,
            None => break,
        }
    }
    Some(best)
}

/// What auto_mixed measured and chose, for `quant_report.json`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct MixedReport {
    pub target_bits: f64,
    pub nvfp4_bits_convention: f64,
    pub effective_bits: f64,
    pub score: &'static str,
    pub score_samples: usize,
    pub groups: Vec<Group>,
    pub chosen: Vec<Format>,
    pub kl_estimated: f64,
    /// Measured KL (mean per token) of the chosen assignment and of all-NVFP4.
    pub kl_chosen: f64,
    pub kl_all_nvfp4: f64,
    pub sensitivity_seconds: f64,
}

/// Reference logits of the scoring samples, and the mean per-token KL of a model against them.
struct Scorer {
    samples: Vec<Vec<u32>>,
    reference: Vec<Vec<Vec<f64>>>,
    vocab: usize,
}

impl Scorer {
    fn new(model: &Qwen35, samples: Vec<Vec<u32>>) -> Result<Scorer> {
        let vocab = model.config.vocab_size;
        let mut reference = Vec::new();
        for ids in &samples {
            let l = model.forward(ids, &mut model.new_cache(), Logits::All)?.into_vec();
            reference.push(l.chunks_exact(vocab).map(crate::eval::log_softmax).collect());
        }
        Ok(Scorer { samples, reference, vocab })
    }

    fn kl(&self, model: &Qwen35) -> Result<f64> {
        let (mut sum, mut n) = (0f64, 0usize);
        for (ids, r) in self.samples.iter().zip(&self.reference) {
            let l = model.forward(ids, &mut model.new_cache(), Logits::All)?.into_vec();
            for (row, lr) in l.chunks_exact(self.vocab).zip(r) {
                sum += crate::eval::token_kl(lr, &crate::eval::log_softmax(row));
                n += 1;
            }
        }
        Ok(sum / n.max(1) as f64)
    }
}

/// Runs auto_mixed: max calibration of every planned layer, per-group sensitivity, selection
/// under `target_bits`, and the resulting mixed [`QuantResult`].
pub fn auto_mixed(
    ckpt: &Checkpoint,
    samples: &[Vec<u32>],
    opts: &QuantizeOptions,
    target_bits: f64,
    score_samples: usize,
    progress: &dyn Progress,
) -> Result<(QuantResult, MixedReport)> {
    if opts.algorithm != Algorithm::Max {
        return Err(QuantError::Invalid(
            "auto_mixed calibrates with --algorithm max (AWQ is not combined with it)".into(),
        ));
    }
    if target_bits < NVFP4_BITS {
        return Err(QuantError::Invalid(format!(
            "--effective-bits {target_bits} is below NVFP4's {NVFP4_BITS} bits per weight: no assignment fits"
        )));
    }
    let mut result =
        quantize(ckpt, samples, &QuantizeOptions { strategy: Strategy::AutoMixed, ..opts.clone() }, progress)?;
    let started = std::time::Instant::now();
    let p = opts.precision;
    let mut model = Qwen35::load(ckpt, LoadOptions { quantize_activations: true, ..LoadOptions::new(p) })?;
    let scorer = Scorer::new(&model, samples.iter().take(score_samples.max(1)).cloned().collect())?;

    // The three methods of every candidate module.
    let mut methods: BTreeMap<String, [LinearMethod; 3]> = BTreeMap::new();
    for l in model.linears_mut() {
        let Some(q) = result.layers.get(&l.name) else { continue };
        let dense = l.method.clone();
        let (rows, cols) = (l.out_features, l.in_features);
        let nvfp4 = LinearMethod::Nvfp4 {
            q: q.weight.clone(),
            input_scale: Some(q.input_scale),
            pre_quant_scale: None,
            weight: Tensor::from_vec(q.weight.dequantize(), &[rows, cols]).round(p),
            bias: None,
        };
        let f8 = Fp8Weight::quantize(l.weight().as_slice());
        let fp8 = LinearMethod::Fp8 {
            weight: Tensor::from_vec(f8.dequantize(), &[rows, cols]).round(p),
            q: f8,
            input_scale: Some(q.input_amax / nvfp4::E4M3_MAX),
            bias: None,
        };
        methods.insert(l.name.clone(), [nvfp4, fp8, dense]);
    }
    let mut by_group: BTreeMap<usize, Vec<String>> = BTreeMap::new();
    for m in result.plan.quantized() {
        by_group.entry(m.group).or_default().push(m.name.clone());
    }
    let set = |model: &mut Qwen35, members: &[String], f: Format| {
        for l in model.linears_mut().into_iter().filter(|l| members.contains(&l.name)) {
            l.method = methods[&l.name][f.index()].clone();
        }
    };
    progress.start("auto_mixed: scoring groups", by_group.len() as u64);
    let mut groups = Vec::new();
    for members in by_group.values() {
        let params = members.iter().map(|n| result.layers[n].weight.rows * result.layers[n].weight.cols).sum();
        let mut kl = [0f64; 3];
        for f in [Format::Nvfp4, Format::Fp8] {
            set(&mut model, members, f);
            kl[f.index()] = scorer.kl(&model)?;
        }
        set(&mut model, members, Format::Bf16);
        groups.push(Group { modules: members.clone(), params, kl });
        progress.inc();
    }
    progress.finish();
    let chosen = select(&groups, target_bits).expect("all-NVFP4 fits: checked above");
    let measure = |model: &mut Qwen35, choice: &[Format]| -> Result<f64> {
        for (g, f) in groups.iter().zip(choice) {
            set(model, &g.modules, *f);
        }
        scorer.kl(model)
    };
    let all_nvfp4 = vec![Format::Nvfp4; groups.len()];
    let kl_chosen = measure(&mut model, &chosen)?;
    let kl_all_nvfp4 = measure(&mut model, &all_nvfp4)?;
    let (chosen, kl_final) = if kl_all_nvfp4 < kl_chosen { (all_nvfp4, kl_all_nvfp4) } else { (chosen, kl_chosen) };

    let mut keep_bf16 = Vec::new();
    for (g, f) in groups.iter().zip(&chosen) {
        for name in &g.modules {
            match f {
                Format::Nvfp4 => {}
                Format::Fp8 => {
                    let q = result.layers.get_mut(name).expect("quantized above");
                    let LinearMethod::Fp8 { q: f8, .. } = &methods[name][Format::Fp8.index()] else {
                        unreachable!("the FP8 slot holds an FP8 method")
                    };
                    q.fp8 = Some(f8.clone());
                    q.input_scale = q.input_amax / nvfp4::E4M3_MAX;
                }
                Format::Bf16 => {
                    result.layers.remove(name);
                    keep_bf16.push(name.clone());
                }
            }
        }
    }
    result.plan.keep_unquantized(ckpt, &keep_bf16);
    let report = MixedReport {
        target_bits,
        nvfp4_bits_convention: NVFP4_BITS,
        effective_bits: effective_bits(&groups, &chosen),
        score: "kl_div",
        score_samples: scorer.samples.len(),
        kl_estimated: estimated_kl(&groups, &chosen),
        kl_chosen: kl_final,
        kl_all_nvfp4,
        chosen,
        groups,
        sensitivity_seconds: started.elapsed().as_secs_f64(),
    };
    Ok((result, report))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn brute_force(groups: &[Group], target: f64) -> f64 {
        let n = groups.len();
        let mut best = f64::INFINITY;
        for code in 0..3usize.pow(n as u32) {
            let c: Vec<Format> = (0..n).map(|i| Format::ALL[(code / 3usize.pow(i as u32)) % 3]).collect();
            if effective_bits(groups, &c) <= target + 1e-9 {
                best = best.min(estimated_kl(groups, &c));
            }
        }
        best
    }

    #[test]
    fn selection_meets_the_budget_and_is_near_the_exhaustive_optimum() {
        let mut s = 12345u64;
        let mut rnd = || {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (s >> 33) as f64 / (1u64 << 31) as f64
        };
        for _ in 0..50 {
            let groups: Vec<Group> = (0..7)
                .map(|i| {
                    let k4 = rnd() * 0.01;
                    Group {
                        modules: vec![format!("g{i}")],
                        params: 1 + (rnd() * 100.0) as usize,
                        kl: [k4, k4 * rnd() * 0.2, 0.0],
                    }
                })
                .collect();
            // Budgets a group boundary does not land on exactly (there, rounding costs up may
            // exclude the optimum).
            for target in [4.5, 4.8, 5.5, 6.7, 16.0] {
                let c = select(&groups, target).unwrap();
                assert!(effective_bits(&groups, &c) <= target + 1e-9);
                let (got, opt) = (estimated_kl(&groups, &c), brute_force(&groups, target));
                let all4 = estimated_kl(&groups, &vec![Format::Nvfp4; groups.len()]);
                assert!(got <= all4 + 1e-15, "never worse than all-NVFP4");
                assert!(got <= opt * 1.02 + 1e-12, "target {target}: {got} vs optimum {opt}");
            }
            assert!(select(&groups, 4.4).is_none());
            assert_eq!(estimated_kl(&groups, &select(&groups, 16.0).unwrap()), 0.0);
        }
    }
}
