//! KL divergence of a quantized model against its reference on the same token sequences:
//! per-token KL(p_ref ‖ p_quant), top-1 agreement, and both perplexities.

use crate::Result;
use fp4_model::{Logits, Qwen35};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KlReport {
    pub samples: usize,
    pub tokens: usize,
    pub kl_mean: f64,
    pub kl_p99: f64,
    pub kl_max: f64,
    pub top1_agreement: f64,
    pub ppl_reference: f64,
    pub ppl_model: f64,
}

pub(crate) fn log_softmax(row: &[f32]) -> Vec<f64> {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let lse = max + row.iter().map(|&x| (x as f64 - max).exp()).sum::<f64>().ln();
    row.iter().map(|&x| x as f64 - lse).collect()
}

/// KL(p‖q) of one position from log-probabilities.
pub(crate) fn token_kl(lp: &[f64], lq: &[f64]) -> f64 {
    lp.iter().zip(lq).map(|(a, b)| a.exp() * (a - b)).sum::<f64>().max(0.0)
}

fn argmax(row: &[f32]) -> usize {
    (0..row.len()).fold(0, |b, i| if row[i] > row[b] { i } else { b })
}

/// Compares `model` with `reference` on every position of every sample.
pub fn kl(reference: &Qwen35, model: &Qwen35, samples: &[Vec<u32>]) -> Result<KlReport> {
    kl_with_progress(reference, model, samples, &|_| {})
}

/// [`kl`], calling `progress(samples done)` after each sample.
pub fn kl_with_progress(
    reference: &Qwen35,
    model: &Qwen35,
    samples: &[Vec<u32>],
    progress: &dyn Fn(usize),
) -> Result<KlReport> {
    let vocab = reference.config.vocab_size;
    let (mut kls, mut agree, mut nll_ref, mut nll_q, mut predicted) = (Vec::new(), 0usize, 0f64, 0f64, 0usize);
    for (done, ids) in samples.iter().enumerate() {
        progress(done);
        let r = reference.forward(ids, &mut reference.new_cache(), Logits::All)?.into_vec();
        let q = model.forward(ids, &mut model.new_cache(), Logits::All)?.into_vec();
        for (t, (rr, qr)) in r.chunks_exact(vocab).zip(q.chunks_exact(vocab)).enumerate() {
            let (lr, lq) = (log_softmax(rr), log_softmax(qr));
            kls.push(token_kl(&lr, &lq));
            agree += usize::from(argmax(rr) == argmax(qr));
            if let Some(&next) = ids.get(t + 1) {
                nll_ref -= lr[next as usize];
                nll_q -= lq[next as usize];
                predicted += 1;
            }
        }
    }
    progress(samples.len());
    let n = kls.len().max(1);
    let mut sorted = kls.clone();
    sorted.sort_by(f64::total_cmp);
    let p = predicted.max(1) as f64;
    Ok(KlReport {
        samples: samples.len(),
        tokens: kls.len(),
        kl_mean: kls.iter().sum::<f64>() / n as f64,
        kl_p99: sorted.get(((sorted.len() as f64 - 1.0) * 0.99).round() as usize).copied().unwrap_or(0.0),
        kl_max: sorted.last().copied().unwrap_or(0.0),
        top1_agreement: agree as f64 / n as f64,
        ppl_reference: (nll_ref / p).exp(),
        ppl_model: (nll_q / p).exp(),
    })
}
