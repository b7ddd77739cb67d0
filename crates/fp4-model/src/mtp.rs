//! Qwen3.5's multi-token-prediction head (`mtp.*`) and speculative decoding with it.
//!
//! The head (vLLM `qwen3_5_mtp.py`): at position i it reads the token after i and the main
//! model's final-normed hidden state at i, `fc([pre_fc_norm_embedding(embed(x_{i+1})) |
//! pre_fc_norm_hidden(h_i)])`, one full-attention decoder layer with its own KV cache, then
//! `mtp.norm`; the main model's LM head turns that into a guess of x_{i+2}. Drafting K tokens
//! feeds each guess and the head's own output back in. The main model then checks the K drafts
//! in one forward over K + 1 tokens and keeps the prefix it accepts, plus its own next token, so
//! the output is what the main model alone gives (greedy: the same tokens; sampled: the same
//! distribution) whatever the head guesses.

use crate::cache::{Cache, LayerCache, LayerPool};
use crate::linear::{Linear, LoadOptions, WeightSource};
use crate::qwen35::{DecoderLayer, Logits, MixerState, Qwen35};
use crate::sampling::{Sampler, SamplingParams};
use crate::{GenerateOptions, ModelError, Result};
use fp4_format::LayerType;
use fp4_kernels::ops::{self, BatchIndex, GdnAlgo};
use fp4_kernels::{Ids, Tensor};

/// The MTP head of a checkpoint (one layer; Qwen3.5 ships `mtp_num_hidden_layers` = 1).
pub struct Mtp {
    fc: Linear,
    pre_fc_norm_embedding: Tensor,
    pre_fc_norm_hidden: Tensor,
    layer: DecoderLayer,
    norm: Tensor,
    /// The LM head the drafts are picked with, when not the main model's: an NVFP4 copy of a BF16
    /// head ([`Mtp::quantize_for_drafting`]), a quarter of the bytes per draft step. The verify
    /// always uses the model's own head, so only the acceptance rate can change.
    draft_head: Option<Linear>,
}

/// The head's own state for one sequence: its layer's KV cache, one row per position.
#[derive(Debug, Clone)]
pub struct MtpCache {
    layer: LayerCache,
    /// Positions the cache holds.
    pub seq_len: usize,
}

impl MtpCache {
    /// The head layer's KV rows (what the batch runner moves into its pools).
    pub fn layer(&self) -> &LayerCache {
        &self.layer
    }
}

impl Mtp {
    /// The head's tensors of `w`, or `None` when the checkpoint has none (`mtp.fc.weight`
    /// absent). Only the first MTP layer is read.
    pub fn load(w: &dyn WeightSource, o: LoadOptions) -> Result<Option<Mtp>> {
        if !w.has("mtp.fc.weight") {
            return Ok(None);
        }
        let h = w.config().hidden_size;
        Ok(Some(Mtp {
            fc: w.linear("mtp.fc", 2 * h, h, false, o)?,
            pre_fc_norm_embedding: w.param("mtp.pre_fc_norm_embedding.weight", &[h], o)?,
            pre_fc_norm_hidden: w.param("mtp.pre_fc_norm_hidden.weight", &[h], o)?,
            layer: DecoderLayer::load_at(w, "mtp.layers.0", LayerType::FullAttention, o)?,
            norm: w.param("mtp.norm.weight", &[h], o)?,
            draft_head: None,
        }))
    }

    /// Drafting from now on reads NVFP4 (round to nearest, on the model's device): a copy of
    /// `model`'s BF16 LM head picks the tokens, and the head's own BF16 linears (fc and its
    /// layer's) are replaced, since only drafts read them. On the 9B a draft step then reads
    /// ~0.7 GB instead of ~2.5. Returns whether the LM head has a copy (a tied or already
    /// quantized one is used as it is).
    pub fn quantize_for_drafting(&mut self, model: &Qwen35) -> bool {
        self.draft_head = model.lm_head().and_then(|h| h.nvfp4_copy("mtp.draft_head"));
        for l in std::iter::once(&mut self.fc).chain(self.layer.linears_mut()) {
            if let Some(q) = l.nvfp4_copy(&l.name) {
                *l = q;
            }
        }
        self.draft_head.is_some()
    }

    /// Device bytes of the LM head's NVFP4 copy (0 without one): weights beyond the model's.
    pub fn draft_head_bytes(&self) -> usize {
        self.draft_head.as_ref().map_or(0, Linear::gpu_weight_bytes)
    }

    /// Logits of the head's normed output rows, as drafting reads them.
    pub fn draft_logits(&self, model: &Qwen35, normed: &Tensor) -> Tensor {
        match &self.draft_head {
            Some(h) => h.forward(normed, model.layer_ctx().precision),
            None => model.head(normed),
        }
    }

    pub fn new_cache(&self) -> MtpCache {
        MtpCache { layer: LayerCache::Attention { k: None, v: None }, seq_len: 0 }
    }

    /// The head at positions `cache.seq_len ..` (one per row): `next_ids[r]` is the token after
    /// that position, `hidden [T, H]` the final-normed hidden state there (the main model's, or
    /// the head's own output when drafting past what the main model has seen). Returns the head's
    /// normed output rows (logits: [`Qwen35::head`]; also the next draft step's `hidden`).
    pub fn forward(&self, model: &Qwen35, next_ids: &[u32], hidden: &Tensor, cache: &mut MtpCache) -> Result<Tensor> {
        let vocab = model.config.vocab_size;
        if next_ids.is_empty() || next_ids.len() != hidden.rows() {
            return Err(ModelError::Unsupported(format!(
                "MTP head: {} tokens for {} hidden rows",
                next_ids.len(),
                hidden.rows()
            )));
        }
        if let Some((i, &id)) = next_ids.iter().enumerate().find(|(_, &id)| id as usize >= vocab) {
            return Err(ModelError::TokenOutOfRange { id, pos: cache.seq_len + i, vocab });
        }
        let ctx = model.layer_ctx();
        let x = self.fc_input(model, &ops::embedding(model.embeddings(), next_ids), hidden);
        let state = MixerState::Sequence { cache: &mut cache.layer, pos0: cache.seq_len, algo: GdnAlgo::Recurrent };
        let x = self.layer.forward(&x, state, ctx);
        cache.seq_len += next_ids.len();
        Ok(ops::rms_norm(&x, &self.norm, ctx.eps, 1.0, ctx.precision))
    }

    /// [`Mtp::forward`] over the rows of a decode batch: row r's next token `next_ids[r]` (within
    /// the vocabulary: the runner feeds drafted and verified ids), its hidden row, its position and
    /// KV blocks at `index` in `pool` (the head's layer; no GDN state).
    pub fn decode(
        &self,
        model: &Qwen35,
        next_ids: &Ids,
        hidden: &Tensor,
        index: BatchIndex,
        pool: &mut LayerPool,
    ) -> Tensor {
        let ctx = model.layer_ctx();
        let x = self.fc_input(model, &ops::embedding_ids(model.embeddings(), next_ids), hidden);
        let x = self.layer.forward(&x, MixerState::Batch { pool, index }, ctx);
        ops::rms_norm(&x, &self.norm, ctx.eps, 1.0, ctx.precision)
    }

    /// `fc([pre_fc_norm_embedding(embedded) | pre_fc_norm_hidden(hidden)])`.
    fn fc_input(&self, model: &Qwen35, embedded: &Tensor, hidden: &Tensor) -> Tensor {
        let ctx = model.layer_ctx();
        let (p, eps) = (ctx.precision, ctx.eps);
        let e = ops::rms_norm(embedded, &self.pre_fc_norm_embedding, eps, 1.0, p);
        let h = ops::rms_norm(hidden, &self.pre_fc_norm_hidden, eps, 1.0, p);
        self.fc.forward(&ops::cat_cols(&e, &h), p)
    }

    /// Forgets every position from `len` on (drafts the main model rejected, or the head's own
    /// guesses at positions it has since seen for real).
    pub fn truncate(cache: &mut MtpCache, len: usize) {
        if len >= cache.seq_len {
            return;
        }
        if let LayerCache::Attention { k, v } = &mut cache.layer {
            for t in [k, v] {
                *t = t.take().filter(|_| len > 0).map(|x| ops::rows(&x, 0, len));
            }
        }
        cache.seq_len = len;
    }
}

/// `--speculative-config` as vLLM spells it: `{"method": "mtp", "num_speculative_tokens": K}`,
/// plus fp4's optional `"draft_head"`: `"nvfp4"` (drafting reads NVFP4: the MTP head's linears,
/// and a copy of a BF16 LM head to pick the tokens; [`Mtp::quantize_for_drafting`]) or `"model"`
/// (the weights as loaded); unset, `nvfp4` on the GPU and `model` on the CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpeculativeConfig {
    /// Tokens drafted per step (K ≥ 1).
    pub num_speculative_tokens: usize,
    /// Whether drafting reads NVFP4 (`None`: the device decides).
    pub nvfp4_draft_head: Option<bool>,
}

impl SpeculativeConfig {
    /// Parses the flag's JSON; the error says what is wrong with it (the caller names the flag).
    pub fn parse(json: &str) -> std::result::Result<SpeculativeConfig, String> {
        const KEYS: [&str; 3] = ["method", "num_speculative_tokens", "draft_head"];
        let v: serde_json::Value = serde_json::from_str(json).map_err(|e| format!("not JSON ({e}): {json}"))?;
        let obj = v.as_object().ok_or_else(|| format!("expected a JSON object, got {v}"))?;
        if let Some(unknown) = obj.keys().find(|k| !KEYS.contains(&k.as_str())) {
            return Err(format!("unknown key `{unknown}` (fp4 reads {})", KEYS.map(|k| format!("`{k}`")).join(", ")));
        }
        match obj.get("method").and_then(|m| m.as_str()) {
            Some("mtp") => {}
            Some(other) => return Err(format!("method `{other}` is not supported (fp4 has `mtp`)")),
            None => return Err("`method` is missing (fp4 has `mtp`)".into()),
        }
        let k = obj
            .get("num_speculative_tokens")
            .ok_or("`num_speculative_tokens` is missing")?
            .as_u64()
            .filter(|&k| k >= 1)
            .ok_or("`num_speculative_tokens` must be an integer ≥ 1")?;
        let nvfp4_draft_head = match obj.get("draft_head") {
            None => None,
            Some(v) => match v.as_str() {
                Some("nvfp4") => Some(true),
                Some("model") => Some(false),
                _ => return Err(format!("`draft_head` must be \"nvfp4\" or \"model\", got {v}")),
            },
        };
        Ok(SpeculativeConfig { num_speculative_tokens: k as usize, nvfp4_draft_head })
    }

    /// Whether drafting on `device` reads NVFP4.
    pub fn nvfp4_draft_head_on(&self, device: fp4_kernels::Device) -> bool {
        self.nvfp4_draft_head.unwrap_or(device == fp4_kernels::Device::Cuda)
    }
}

/// What a speculative run did: tokens drafted, how many the main model kept, and how many
/// verifying forwards that took.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SpecStats {
    pub drafted: usize,
    pub accepted: usize,
    pub verify_steps: usize,
}

impl SpecStats {
    /// Tokens emitted per verifying forward (accepted drafts plus the main model's own token).
    pub fn mean_accepted_length(&self) -> f64 {
        if self.verify_steps == 0 {
            return 0.0;
        }
        (self.accepted + self.verify_steps) as f64 / self.verify_steps as f64
    }
}

/// What proposes tokens for the main model to verify.
pub trait Drafter {
    /// Positions the main model has verified since the last call, in order: the token after
    /// each (`next_ids`) and the main model's final-normed hidden state there (`hidden` rows).
    fn observe(&mut self, model: &Qwen35, next_ids: &[u32], hidden: &Tensor) -> Result<()>;
    /// `k` guesses of the tokens that follow the last observed position's next token.
    fn draft(&mut self, model: &Qwen35, k: usize) -> Result<Vec<u32>>;
    /// Forgets everything past the first `len` positions (its guesses).
    fn rollback(&mut self, len: usize);
}

/// The MTP head as a [`Drafter`]: greedy guesses, each fed back with the head's own output.
pub struct MtpDrafter<'a> {
    mtp: &'a Mtp,
    cache: MtpCache,
    /// The head's output at the last position it has run (the next draft's hidden input).
    last: Option<Tensor>,
    greedy: Sampler,
}

impl<'a> MtpDrafter<'a> {
    pub fn new(mtp: &'a Mtp) -> Result<MtpDrafter<'a>> {
        Ok(MtpDrafter { mtp, cache: mtp.new_cache(), last: None, greedy: Sampler::new(SamplingParams::default())? })
    }
}

impl Drafter for MtpDrafter<'_> {
    fn observe(&mut self, model: &Qwen35, next_ids: &[u32], hidden: &Tensor) -> Result<()> {
        let g = self.mtp.forward(model, next_ids, hidden, &mut self.cache)?;
        self.last = Some(ops::rows(&g, g.rows() - 1, g.rows()));
        Ok(())
    }

    fn draft(&mut self, model: &Qwen35, k: usize) -> Result<Vec<u32>> {
        let mut last =
            self.last.clone().ok_or_else(|| ModelError::Unsupported("MTP draft before any position".into()))?;
        let mut drafts = Vec::with_capacity(k);
        for i in 0..k {
            let d = self.greedy.sample_tensor(&self.mtp.draft_logits(model, &last));
            drafts.push(d);
            if i + 1 < k {
                last = self.mtp.forward(model, &[d], &last, &mut self.cache)?;
            }
        }
        Ok(drafts)
    }

    fn rollback(&mut self, len: usize) {
        Mtp::truncate(&mut self.cache, len);
    }
}

/// Generation with `k` drafts per step under `params` (speculative sampling): each draft is kept
/// with the probability the main model gives it under the sampling controls, and where one is
/// not, the token is drawn from the main model's distribution without it ([`verify_draft`]), so
/// every token follows the main model's distribution whatever the drafter guesses. Greedy
/// (temperature 0) gives the same tokens as [`crate::generate`]. The main model verifies with the
/// recurrent GDN walk, which computes each token as a one-token step does; rejected drafts are
/// undone by restoring the state from before the verify and running the kept tokens again (the
/// reference; the batch runner keeps the GDN state after each draft position instead:
/// [`crate::DecodeRunner::step_speculative_with`]).
/// The draws come from a [`Sampler`] of `params` (seeded), as the serving engine's do, so a
/// seeded run repeats and the engine gives the same tokens; not those of the same seed without
/// drafts (the draws are used differently).
pub fn generate_speculative(
    model: &Qwen35,
    drafter: &mut dyn Drafter,
    prompt: &[u32],
    opts: &GenerateOptions,
    k: usize,
    params: SamplingParams,
    mut on_token: impl FnMut(u32),
) -> Result<(Vec<u32>, SpecStats)> {
    if k == 0 {
        return Err(ModelError::Unsupported("speculative decoding needs at least one draft token".into()));
    }
    params.validate()?;
    // The first token as any sampled request's (one draw of the sampler's stream), then the
    // acceptance draws from the same stream: the serving engine draws the same way.
    let mut sampler = Sampler::new(params)?;
    let controls = params.kernel();
    let probs =
        |normed: &Tensor, row: usize| ops::sample_probs(&model.head(&ops::rows(normed, row, row + 1)), controls);
    let mut stats = SpecStats::default();
    let mut out = Vec::with_capacity(opts.max_tokens);
    if opts.max_tokens == 0 {
        return Ok((out, stats));
    }
    let mut cache: Cache = model.new_cache();
    let h = model.forward_normed(prompt, &mut cache, Logits::All)?;
    let mut next = sampler.sample_tensor(&model.head(&ops::last_row(&h)));
    // Positions the drafter has not seen yet: the token after each and the main model's hidden.
    let mut pending_ids: Vec<u32> = prompt[1..].iter().copied().chain([next]).collect();
    let mut pending_hidden = h;
    loop {
        out.push(next);
        on_token(next);
        if out.len() >= opts.max_tokens || opts.stop_ids.contains(&next) {
            return Ok((out, stats));
        }
        drafter.observe(model, &pending_ids, &pending_hidden)?;
        let drafts = drafter.draft(model, k)?;
        // Verify `next` and the drafts in one forward of the main model.
        let verified_len = cache.seq_len;
        let before = cache.clone();
        let input: Vec<u32> = [next].into_iter().chain(drafts.iter().copied()).collect();
        let mut hv = model.forward_normed_with(&input, &mut cache, Logits::All, GdnAlgo::Recurrent)?;
        let (kept, own) = accept_drafts(&drafts, |j| probs(&hv, j), || sampler.uniform());
        stats.drafted += k;
        stats.accepted += kept;
        stats.verify_steps += 1;
        if kept < k {
            // Undo the rejected drafts: the state after `next` and the kept drafts only.
            cache = before;
            hv = model.forward_normed_with(&input[..=kept], &mut cache, Logits::All, GdnAlgo::Recurrent)?;
        }
        for &d in &drafts[..kept] {
            out.push(d);
            on_token(d);
            if out.len() >= opts.max_tokens || opts.stop_ids.contains(&d) {
                return Ok((out, stats));
            }
        }
        // The drafter's guesses past `verified_len` give way to what the main model has now.
        drafter.rollback(verified_len);
        pending_ids = fp4_kernels::cpu::tokens_after_accept(&drafts, kept, own).take(kept + 1).collect();
        pending_hidden = ops::rows(&hv, 0, kept + 1);
        next = own;
    }
}

/// Greedy acceptance over one verify (the reference of the runner's on-device acceptance).
pub use fp4_kernels::cpu::accept_greedy;

/// Speculative sampling over one verify: `probs(j)` is the main model's distribution at row j
/// (j = 0 ..= K, after the input and j drafts). Drafts are kept ([`verify_draft`]) until one is
/// not, whose replacement is the main model's own token; with all K kept, the own token is drawn
/// from row K. Returns (drafts kept, own token); `draw` gives the uniform draws.
pub fn accept_drafts(
    drafts: &[u32],
    mut probs: impl FnMut(usize) -> Vec<(u32, f64)>,
    mut draw: impl FnMut() -> f64,
) -> (usize, u32) {
    for (j, &d) in drafts.iter().enumerate() {
        if let Some(token) = verify_draft(&probs(j), d, draw(), draw()) {
            return (j, token);
        }
    }
    (drafts.len(), draw_from(&probs(drafts.len()), draw()))
}

/// One verified draft position of speculative sampling: `d`, proposed with certainty, is kept
/// (`None`) when `u` falls under the main model's probability of it in `probs` (the tokens the
/// sampler can pick and their probabilities, `cpu::sample_probs`); otherwise the token is drawn
/// with `v` from `probs` without `d`, renormalised. Either way the result follows `probs`.
pub fn verify_draft(probs: &[(u32, f64)], d: u32, u: f64, v: f64) -> Option<u32> {
    let p_d = probs.iter().find(|x| x.0 == d).map_or(0.0, |x| x.1);
    if u < p_d {
        return None;
    }
    let mut r = v * (1.0 - p_d);
    let mut last = d;
    for &(token, p) in probs.iter().filter(|x| x.0 != d) {
        if r < p {
            return Some(token);
        }
        r -= p;
        last = token;
    }
    Some(last)
}

/// The token `v ∈ [0, 1)` falls on, walking `probs` in order.
fn draw_from(probs: &[(u32, f64)], v: f64) -> u32 {
    let mut r = v;
    for &(token, p) in probs {
        if r < p {
            return token;
        }
        r -= p;
    }
    probs.last().map_or(0, |x| x.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{generate, Precision, Synthetic, SyntheticFormat};
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    fn tiny(mtp: bool) -> (Synthetic, LoadOptions) {
        tiny_as(mtp, SyntheticFormat::Bf16, Precision::F32)
    }

    fn tiny_as(mtp: bool, format: SyntheticFormat, p: Precision) -> (Synthetic, LoadOptions) {
        let s = Synthetic::named("tiny", format, 11).unwrap();
        (if mtp { s.with_mtp() } else { s }, LoadOptions::new(p))
    }

    /// The tiny model (bf16/f32) and its MTP head.
    fn tiny_with_head() -> (Qwen35, Mtp) {
        let (src, o) = tiny(true);
        (Qwen35::load(&src, o).unwrap(), Mtp::load(&src, o).unwrap().expect("an MTP head"))
    }

    fn plain_greedy(model: &Qwen35, prompt: &[u32], max_tokens: usize) -> Vec<u32> {
        let opts = GenerateOptions { max_tokens, stop_ids: vec![] };
        generate(model, prompt, &opts, &mut Sampler::new(SamplingParams::default()).unwrap(), |_| {}).unwrap()
    }

    /// Guesses from the known greedy continuation, wrong where `wrong(step, i)` says.
    struct Oracle {
        truth: Vec<u32>,
        prompt_len: usize,
        seen: usize,
        step: usize,
        wrong: fn(usize, usize) -> bool,
    }

    impl Oracle {
        fn new(truth: Vec<u32>, prompt_len: usize, wrong: fn(usize, usize) -> bool) -> Oracle {
            Oracle { truth, prompt_len, seen: 0, step: 0, wrong }
        }
    }

    impl Drafter for Oracle {
        fn observe(&mut self, _: &Qwen35, next_ids: &[u32], _: &Tensor) -> Result<()> {
            self.seen += next_ids.len();
            Ok(())
        }

        fn draft(&mut self, _: &Qwen35, k: usize) -> Result<Vec<u32>> {
            // The token after the last observed position is output token seen − prompt_len.
            let start = self.seen - self.prompt_len + 1;
            let step = self.step;
            self.step += 1;
            Ok((0..k)
                .map(|i| if (self.wrong)(step, i) { self.truth[start + i] ^ 1 } else { self.truth[start + i] })
                .collect())
        }

        fn rollback(&mut self, len: usize) {
            self.seen = self.seen.min(len);
        }
    }

    #[test]
    fn speculative_config_parses_as_vllm_spells_it() {
        let ok = SpeculativeConfig::parse(r#"{"method": "mtp", "num_speculative_tokens": 3}"#);
        assert_eq!(ok, Ok(SpeculativeConfig { num_speculative_tokens: 3, nvfp4_draft_head: None }));
        let model_head =
            SpeculativeConfig::parse(r#"{"method": "mtp", "num_speculative_tokens": 2, "draft_head": "model"}"#);
        assert_eq!(model_head, Ok(SpeculativeConfig { num_speculative_tokens: 2, nvfp4_draft_head: Some(false) }));
        for (bad, says) in [
            (r#"{"method": "ngram", "num_speculative_tokens": 3}"#, "`ngram`"),
            (r#"{"method": "mtp", "num_speculative_tokens": 0}"#, "≥ 1"),
            (r#"{"method": "mtp"}"#, "missing"),
            (r#"{"num_speculative_tokens": 2}"#, "`method`"),
            (r#"{"method": "mtp", "num_speculative_tokens": 2, "model": "x"}"#, "`model`"),
            ("mtp", "not JSON"),
            ("[1]", "object"),
            (r#"{"method": "mtp", "num_speculative_tokens": 2, "draft_head": "fp8"}"#, "`draft_head`"),
        ] {
            let e = SpeculativeConfig::parse(bad).unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }

    #[test]
    fn mtp_head_loads_only_where_the_checkpoint_has_one() {
        for with in [false, true] {
            let (src, o) = tiny(with);
            assert_eq!(Mtp::load(&src, o).unwrap().is_some(), with);
        }
    }

    #[test]
    fn greedy_with_the_mtp_head_is_greedy_without() {
        let nvfp4 = SyntheticFormat::Nvfp4 { mlp_only: false };
        for (format, p, ks) in
            [(SyntheticFormat::Bf16, Precision::F32, &[1, 2, 3][..]), (nvfp4, Precision::Bf16, &[2][..])]
        {
            let (src, o) = tiny_as(true, format, p);
            greedy_equal(&Qwen35::load(&src, o).unwrap(), &Mtp::load(&src, o).unwrap().expect("an MTP head"), ks);
        }
    }

    fn greedy_equal(model: &Qwen35, mtp: &Mtp, ks: &[usize]) {
        let prompt: Vec<u32> = (0..13).map(|i| (i * 37 + 5) % 512).collect();
        let want = plain_greedy(model, &prompt, 24);
        for &k in ks {
            let opts = GenerateOptions { max_tokens: 24, stop_ids: vec![] };
            let mut streamed = Vec::new();
            let mut drafter = MtpDrafter::new(mtp).unwrap();
            let (got, stats) =
                generate_speculative(model, &mut drafter, &prompt, &opts, k, SamplingParams::default(), |t| {
                    streamed.push(t)
                })
                .unwrap();
            assert_eq!(got, want, "k = {k}");
            assert_eq!(streamed, want, "k = {k}: streamed tokens");
            assert_eq!(stats.drafted, k * stats.verify_steps);
            assert!(stats.accepted <= stats.drafted);
        }
    }

    #[test]
    fn kept_drafts_are_emitted_and_rejected_ones_undone() {
        let (src, o) = tiny(false);
        let model = Qwen35::load(&src, o).unwrap();
        let prompt: Vec<u32> = (0..9).map(|i| (i * 101 + 7) % 512).collect();
        let k = 3;
        let truth = plain_greedy(&model, &prompt, 40 + k);
        let run = |max_tokens: usize, wrong: fn(usize, usize) -> bool| {
            let mut oracle = Oracle::new(truth.clone(), prompt.len(), wrong);
            let opts = GenerateOptions { max_tokens, stop_ids: vec![] };
            generate_speculative(&model, &mut oracle, &prompt, &opts, k, SamplingParams::default(), |_| {}).unwrap()
        };
        // Always right: every step keeps all k drafts and adds its own token.
        let (got, stats) = run(1 + 4 * (k + 1), |_, _| false);
        assert_eq!(got, truth[..1 + 4 * (k + 1)]);
        assert_eq!(stats, SpecStats { drafted: 4 * k, accepted: 4 * k, verify_steps: 4 });
        assert_eq!(stats.mean_accepted_length(), (k + 1) as f64);
        // Wrong at draft (step mod 3) of each step: kept 0, 1, 2, 0, 1, 2, …
        let (got, stats) = run(40, |step, i| i == step % 3);
        assert_eq!(got, truth[..40]);
        assert!(stats.accepted > 0 && stats.accepted < stats.drafted, "{stats:?}");
        // Always wrong: one token per verify, as plain decoding.
        let (got, stats) = run(12, |_, _| true);
        assert_eq!(got, truth[..12]);
        assert_eq!(stats, SpecStats { drafted: 11 * k, accepted: 0, verify_steps: 11 });
        // A stop token among kept drafts ends the output there.
        let stop = truth[6];
        let first = truth.iter().position(|&t| t == stop).unwrap();
        let mut oracle = Oracle::new(truth.clone(), prompt.len(), |_, _| false);
        let opts = GenerateOptions { max_tokens: 40, stop_ids: vec![stop] };
        let (got, _) =
            generate_speculative(&model, &mut oracle, &prompt, &opts, k, SamplingParams::default(), |_| {}).unwrap();
        assert_eq!(got, truth[..=first]);
    }

    /// A verified draft position yields each token with the main model's probability, whether the
    /// draft is likely, unlikely or impossible.
    #[test]
    fn verify_draft_keeps_the_main_models_distribution() {
        let probs = [(2u32, 0.1), (5, 0.45), (7, 0.05), (9, 0.4)];
        let mut rng = StdRng::seed_from_u64(9);
        for d in [5u32, 7, 3] {
            let n = 200_000;
            let mut counts = std::collections::HashMap::new();
            for _ in 0..n {
                let t = verify_draft(&probs, d, rng.random(), rng.random()).unwrap_or(d);
                *counts.entry(t).or_insert(0usize) += 1;
            }
            for &(t, p) in &probs {
                let f = counts.get(&t).copied().unwrap_or(0) as f64 / n as f64;
                assert!((f - p).abs() < 0.005, "draft {d}: token {t} at {f}, want {p}");
            }
            assert!(!counts.contains_key(&3), "a token outside the distribution");
        }
    }

    /// End to end at temperature > 0: the first two tokens, drafted by a random MTP head (mostly
    /// rejected) or by an oracle proposing the likeliest token (mostly kept), are distributed as
    /// plain sampling's.
    #[test]
    fn speculative_sampling_matches_plain_sampling() {
        let (model, mtp) = tiny_with_head();
        let prompt: Vec<u32> = (0..7).map(|i| (i * 29 + 3) % 512).collect();
        let params = |seed| SamplingParams { temperature: 1.0, top_k: 3, top_p: 1.0, min_p: 0.0, seed };
        let opts = GenerateOptions { max_tokens: 2, stop_ids: vec![] };
        let runs = 1500u64;
        let histogram = |sample: &mut dyn FnMut(u64) -> Vec<u32>| {
            let mut h = std::collections::HashMap::new();
            (0..runs).for_each(|seed| *h.entry(sample(seed)).or_insert(0usize) += 1);
            h
        };
        let plain = histogram(&mut |seed| {
            generate(&model, &prompt, &opts, &mut Sampler::new(params(seed)).unwrap(), |_| {}).unwrap()
        });
        let greedy2 = plain_greedy(&model, &prompt, 3);
        let drafted: [&mut dyn FnMut(u64) -> Vec<u32>; 2] = [
            &mut |seed| {
                let mut d = MtpDrafter::new(&mtp).unwrap();
                generate_speculative(&model, &mut d, &prompt, &opts, 2, params(seed), |_| {}).unwrap().0
            },
            &mut |seed| {
                let mut d = Oracle::new(greedy2.clone(), prompt.len(), |_, _| false);
                generate_speculative(&model, &mut d, &prompt, &opts, 2, params(seed + 10_000), |_| {}).unwrap().0
            },
        ];
        for (which, sample) in drafted.into_iter().enumerate() {
            let spec = histogram(sample);
            let keys: std::collections::HashSet<&Vec<u32>> = plain.keys().chain(spec.keys()).collect();
            let tv: f64 = keys
                .iter()
                .map(|k| {
                    let f = |h: &std::collections::HashMap<Vec<u32>, usize>| h.get(*k).copied().unwrap_or(0) as f64;
                    (f(&plain) - f(&spec)).abs() / runs as f64
                })
                .sum::<f64>()
                / 2.0;
            assert!(tv < 0.08, "drafter {which}: total variation {tv:.3} between plain and speculative sampling");
        }
    }

    #[test]
    fn truncated_head_cache_recomputes_what_it_forgot() {
        let (model, mtp) = tiny_with_head();
        let ids: Vec<u32> = (0..6).map(|i| (i * 53 + 1) % 512).collect();
        let hidden = model.forward_normed(&ids, &mut model.new_cache(), Logits::All).unwrap();
        let mut cache = mtp.new_cache();
        let all = mtp.forward(&model, &ids, &hidden, &mut cache).unwrap().to_vec();
        Mtp::truncate(&mut cache, 3);
        assert_eq!(cache.seq_len, 3);
        let again = mtp.forward(&model, &ids[3..], &ops::rows(&hidden, 3, 6), &mut cache).unwrap().to_vec();
        assert_eq!(again, all[3 * 128..], "rows 3..6 after truncating to 3");
        assert!(mtp.forward(&model, &[512], &ops::rows(&hidden, 0, 1), &mut cache).is_err(), "token out of range");
    }
}
