//! Autoregressive generation for one sequence: prefill the prompt, then decode token by token.

use crate::qwen35::{Logits, Qwen35};
use crate::sampling::Sampler;
use crate::Result;

#[derive(Debug, Clone)]
pub struct GenerateOptions {
    pub max_tokens: usize,
    /// Generation stops after emitting one of these (the stop token is kept in the output, as
    /// transformers' `generate` keeps it).
    pub stop_ids: Vec<u32>,
}

/// Generates up to `max_tokens` tokens after `prompt`, calling `on_token` for each.
pub fn generate(
    model: &Qwen35,
    prompt: &[u32],
    opts: &GenerateOptions,
    sampler: &mut Sampler,
    mut on_token: impl FnMut(u32),
) -> Result<Vec<u32>> {
    let mut cache = model.new_cache();
    let mut out = Vec::with_capacity(opts.max_tokens);
    if opts.max_tokens == 0 {
        return Ok(out);
    }
    let mut logits = model.forward(prompt, &mut cache, Logits::Last)?;
    loop {
        let next = sampler.sample_tensor(&logits);
        out.push(next);
        on_token(next);
        if out.len() >= opts.max_tokens || opts.stop_ids.contains(&next) {
            return Ok(out);
        }
        logits = model.forward(&[next], &mut cache, Logits::Last)?;
    }
}
