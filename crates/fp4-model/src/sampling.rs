//! Token selection: greedy or sampled with temperature, top-k, min-p and top-p (applied in that
//! order, as transformers' logits processors are). The selection itself is an op
//! (`fp4_kernels::cpu::sample` and its GPU kernel), so CPU and GPU pick the same token.

use crate::{ModelError, Result};
use fp4_kernels::ops::SampleParams;
use fp4_kernels::Tensor;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplingParams {
    /// 0 = greedy.
    pub temperature: f32,
    /// Nucleus mass in (0, 1]; 1 = off.
    pub top_p: f32,
    /// Keep the k most likely tokens; 0 = off.
    pub top_k: usize,
    /// Drop tokens less likely than `min_p` × the most likely one; 0 = off.
    pub min_p: f32,
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams { temperature: 0.0, top_p: 1.0, top_k: 0, min_p: 0.0, seed: 0 }
    }
}

impl SamplingParams {
    /// The controls the sampling op takes.
    pub fn kernel(&self) -> SampleParams {
        SampleParams { temperature: self.temperature, top_k: self.top_k, top_p: self.top_p, min_p: self.min_p }
    }

    pub fn validate(&self) -> Result<()> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return Err(ModelError::Sampling(format!("temperature must be >= 0, got {}", self.temperature)));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(ModelError::Sampling(format!("top_p must be in (0, 1], got {}", self.top_p)));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return Err(ModelError::Sampling(format!("min_p must be in [0, 1], got {}", self.min_p)));
        }
        Ok(())
    }
}

pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Result<Sampler> {
        params.validate()?;
        Ok(Sampler { params, rng: StdRng::seed_from_u64(params.seed) })
    }

    /// Picks the next token from one row of logits (see `fp4_kernels::cpu::sample`).
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        let u = self.draw();
        fp4_kernels::cpu::sample(logits, self.kernel_params(), u)
    }

    /// Same, for a logits row on any device: on the GPU only the chosen id is copied back.
    pub fn sample_tensor(&mut self, logits: &Tensor) -> u32 {
        let u = self.draw();
        fp4_kernels::ops::sample(logits, self.kernel_params(), u)
    }

    /// A uniform draw in [0, 1) from this sampler's stream (speculative sampling's acceptance
    /// tests).
    /// The controls of its next token for a batch sampled on the device
    /// ([`fp4_kernels::ops::sample_rows`]): its parameters and the draw [`Sampler::sample_tensor`]
    /// would make, so either way gives the same token from the same logits.
    pub fn next_controls(&mut self) -> [u32; fp4_kernels::ops::SAMPLE_CONTROLS] {
        let u = self.draw();
        fp4_kernels::ops::sample_controls(self.kernel_params(), u)
    }

    pub fn uniform(&mut self) -> f64 {
        self.rng.random::<f64>()
    }

    /// The uniform draw of one step (none when greedy, so greedy runs leave the stream alone).
    fn draw(&mut self) -> f32 {
        if self.params.temperature == 0.0 {
            0.0
        } else {
            self.rng.random::<f32>()
        }
    }

    fn kernel_params(&self) -> SampleParams {
        self.params.kernel()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_takes_first_max() {
        let mut s = Sampler::new(SamplingParams::default()).unwrap();
        assert_eq!(s.sample(&[0.0, 2.0, 2.0, 1.0]), 1);
    }

    #[test]
    fn top_k_one_is_greedy_and_seed_is_reproducible() {
        let logits = [0.1f32, 0.5, 3.0, 0.2];
        let p = SamplingParams { temperature: 1.0, top_k: 1, ..Default::default() };
        let mut s = Sampler::new(p).unwrap();
        assert!((0..20).all(|_| s.sample(&logits) == 2));
        let p = SamplingParams { temperature: 1.5, seed: 42, ..Default::default() };
        let draw = |p| {
            let mut s = Sampler::new(p).unwrap();
            (0..50).map(|_| s.sample(&logits)).collect::<Vec<_>>()
        };
        let a = draw(p);
        assert_eq!(a, draw(p));
        assert!(a.iter().any(|&t| t != 2), "temperature 1.5 should sometimes pick another token");
    }

    #[test]
    fn top_p_cuts_the_tail() {
        // p = softmax([10, 9, 0, 0]): the first two hold > 0.999 of the mass.
        let logits = [10.0f32, 9.0, 0.0, 0.0];
        let p = SamplingParams { temperature: 1.0, top_p: 0.9, seed: 1, ..Default::default() };
        let mut s = Sampler::new(p).unwrap();
        assert!((0..200).all(|_| s.sample(&logits) < 2));
    }

    #[test]
    fn min_p_drops_unlikely_tokens() {
        // p ≈ [0.73, 0.27, 0.0003, ...]: min_p 0.1 keeps the first two.
        let logits = [5.0f32, 4.0, -3.0, -3.0];
        let p = SamplingParams { temperature: 1.0, min_p: 0.1, seed: 9, ..Default::default() };
        let mut s = Sampler::new(p).unwrap();
        let draws: Vec<u32> = (0..300).map(|_| s.sample(&logits)).collect();
        assert!(draws.iter().all(|&t| t < 2) && draws.contains(&1));
    }

    #[test]
    fn bad_parameters_are_rejected() {
        assert!(Sampler::new(SamplingParams { temperature: -1.0, ..Default::default() }).is_err());
        assert!(Sampler::new(SamplingParams { top_p: 0.0, ..Default::default() }).is_err());
    }
}
