//! The engine: one scheduler thread that owns the model and every sequence's cache.
//!
//! Each step it admits waiting requests while slots and cache budget allow, advances every
//! prefilling sequence by one chunk of its prompt, and decodes one token for every running
//! sequence, so long prompts never stall other streams (continuous batching at the scheduler
//! level; the CPU model computes sequences one after another within a step). A request whose
//! receiver is gone (client disconnected, stop string seen) is cancelled and its slot freed at the
//! next step. Requests beyond the waiting-queue bound are refused at once (HTTP 429).

use fp4_model::{Cache, Logits, Qwen35, Sampler, SamplingParams};
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Instant;
use tokio::sync::mpsc as tmpsc;

/// Tokens of a prompt processed per scheduler step while other sequences wait.
const PREFILL_CHUNK: usize = 256;

#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub max_num_seqs: usize,
    pub max_model_len: usize,
    /// Requests that may wait for a slot before new ones are refused.
    pub max_waiting: usize,
    /// Bytes all sequences' caches may use together.
    pub cache_budget_bytes: usize,
}

/// Penalties applied to logits before sampling (vLLM semantics).
#[derive(Debug, Clone, Copy, Default)]
pub struct Penalties {
    /// Subtracted once from the logit of every token already generated.
    pub presence: f32,
    /// Subtracted per occurrence in the generated tokens.
    pub frequency: f32,
    /// > 1 discourages tokens seen in the prompt or the output (divides positive logits).
    pub repetition: f32,
}

#[derive(Debug, Clone)]
pub struct GenRequest {
    pub prompt: Vec<u32>,
    pub sampling: SamplingParams,
    pub penalties: Penalties,
    pub max_tokens: usize,
    pub stop_ids: Vec<u32>,
    /// Return this many top alternatives' log-probabilities per token (`None`: no logprobs).
    pub logprobs: Option<usize>,
    /// The output must start with one of these token sequences: the engine scores each (sum of
    /// log-probabilities, teacher-forced on a copy of the cache) and emits the likeliest, then
    /// samples freely. Used to pick the function for `tool_choice: required`.
    pub choices: Vec<Vec<u32>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    Stop,
    Length,
}

#[derive(Debug, Clone)]
pub enum Event {
    /// The prompt has been processed (time to first token starts being token-bound).
    Token {
        id: u32,
        logprob: Option<(f32, Vec<(u32, f32)>)>,
    },
    Finished {
        reason: FinishReason,
        prompt_tokens: usize,
        completion_tokens: usize,
    },
    Failed(String),
}

#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    #[error("the server is overloaded: {0} requests are already waiting; retry later")]
    Overloaded(usize),
    #[error("the server is shutting down")]
    ShuttingDown,
}

/// Counters for /metrics.
#[derive(Debug, Default)]
pub struct Stats {
    pub waiting: AtomicUsize,
    pub running: AtomicUsize,
    pub cache_bytes: AtomicUsize,
    pub requests_finished: AtomicU64,
    pub requests_cancelled: AtomicU64,
    pub prompt_tokens: AtomicU64,
    pub generated_tokens: AtomicU64,
}

struct Submission {
    req: GenRequest,
    events: tmpsc::UnboundedSender<Event>,
}

#[derive(Clone)]
pub struct EngineHandle {
    tx: mpsc::SyncSender<Submission>,
    pub stats: Arc<Stats>,
    shutting_down: Arc<AtomicBool>,
    max_waiting: usize,
}

impl EngineHandle {
    /// Queues a request; events arrive on the returned receiver. Dropping the receiver cancels it.
    pub fn submit(&self, req: GenRequest) -> Result<tmpsc::UnboundedReceiver<Event>, SubmitError> {
        if self.shutting_down.load(Ordering::Relaxed) {
            return Err(SubmitError::ShuttingDown);
        }
        let (events, rx) = tmpsc::unbounded_channel();
        match self.tx.try_send(Submission { req, events }) {
            Ok(()) => {
                self.stats.waiting.fetch_add(1, Ordering::Relaxed);
                Ok(rx)
            }
            Err(mpsc::TrySendError::Full(_)) => Err(SubmitError::Overloaded(self.max_waiting)),
            Err(mpsc::TrySendError::Disconnected(_)) => Err(SubmitError::ShuttingDown),
        }
    }

    /// Stops admitting new requests; running ones finish. The engine thread exits when idle.
    pub fn shutdown(&self) {
        self.shutting_down.store(true, Ordering::Relaxed);
    }
}

/// Cache bytes one sequence of `tokens` tokens needs (f32 CPU caches).
pub fn cache_bytes(model: &Qwen35, tokens: usize) -> usize {
    let c = &model.config;
    let attn = c.num_layers_of(fp4_format::LayerType::FullAttention);
    let gdn = c.num_layers_of(fp4_format::LayerType::LinearAttention);
    let kv = attn * 2 * c.num_key_value_heads * c.head_dim * tokens;
    let state = gdn
        * (c.linear_num_value_heads * c.linear_key_head_dim * c.linear_value_head_dim
            + (c.linear_conv_kernel_dim - 1) * c.linear_conv_dim());
    (kv + state) * 4
}

struct Sequence {
    req: GenRequest,
    events: tmpsc::UnboundedSender<Event>,
    cache: Cache,
    /// Prompt tokens processed so far.
    prefilled: usize,
    generated: Vec<u32>,
    counts: HashMap<u32, u32>,
    sampler: Sampler,
    /// Last logits row (after prefill or the last decode).
    logits: Vec<f32>,
    reserved: usize,
}

/// Starts the engine thread.
pub fn start(model: Qwen35, cfg: EngineConfig) -> EngineHandle {
    let (tx, rx) = mpsc::sync_channel::<Submission>(cfg.max_waiting);
    let stats = Arc::new(Stats::default());
    let shutting_down = Arc::new(AtomicBool::new(false));
    let handle = EngineHandle { tx, stats: stats.clone(), shutting_down, max_waiting: cfg.max_waiting };
    std::thread::Builder::new()
        .name("fp4-engine".into())
        .spawn(move || run(model, cfg, rx, stats))
        .expect("spawn engine thread");
    handle
}

fn run(model: Qwen35, cfg: EngineConfig, rx: mpsc::Receiver<Submission>, stats: Arc<Stats>) {
    let mut waiting: VecDeque<Submission> = VecDeque::new();
    let mut running: Vec<Sequence> = Vec::new();
    let mut used = 0usize;
    loop {
        // Take new submissions; block only when there is nothing to do.
        if running.is_empty() && waiting.is_empty() {
            match rx.recv() {
                Ok(s) => waiting.push_back(s),
                Err(_) => return,
            }
        }
        while let Ok(s) = rx.try_recv() {
            waiting.push_back(s);
        }
        // Admit while slots and cache budget allow (reserving the sequence's whole length).
        while running.len() < cfg.max_num_seqs {
            let Some(s) = waiting.front() else { break };
            if s.events.is_closed() {
                waiting.pop_front();
                stats.waiting.fetch_sub(1, Ordering::Relaxed);
                stats.requests_cancelled.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            let need = cache_bytes(&model, (s.req.prompt.len() + s.req.max_tokens).min(cfg.max_model_len));
            if used + need > cfg.cache_budget_bytes && !running.is_empty() {
                break;
            }
            let s = waiting.pop_front().expect("front exists");
            stats.waiting.fetch_sub(1, Ordering::Relaxed);
            if need > cfg.cache_budget_bytes {
                let _ = s.events.send(Event::Failed(format!(
                    "the request needs {need} bytes of cache but the whole budget is {} bytes",
                    cfg.cache_budget_bytes
                )));
                continue;
            }
            match Sampler::new(s.req.sampling) {
                Ok(sampler) => {
                    used += need;
                    stats.prompt_tokens.fetch_add(s.req.prompt.len() as u64, Ordering::Relaxed);
                    running.push(Sequence {
                        cache: model.new_cache(),
                        prefilled: 0,
                        generated: Vec::new(),
                        counts: HashMap::new(),
                        sampler,
                        logits: Vec::new(),
                        reserved: need,
                        req: s.req,
                        events: s.events,
                    });
                }
                Err(e) => {
                    let _ = s.events.send(Event::Failed(e.to_string()));
                }
            }
        }
        stats.running.store(running.len(), Ordering::Relaxed);
        stats.cache_bytes.store(used, Ordering::Relaxed);

        // One step for every running sequence.
        let step_started = Instant::now();
        let mut i = 0;
        while i < running.len() {
            let done = step(&model, &mut running[i], &stats);
            if done {
                let seq = running.swap_remove(i);
                used -= seq.reserved;
            } else {
                i += 1;
            }
        }
        tracing::trace!(secs = step_started.elapsed().as_secs_f64(), running = running.len(), "step");
    }
}

/// Advances one sequence; returns true when it is finished or cancelled.
fn step(model: &Qwen35, seq: &mut Sequence, stats: &Stats) -> bool {
    if seq.events.is_closed() {
        stats.requests_cancelled.fetch_add(1, Ordering::Relaxed);
        return true;
    }
    let fail = |seq: &Sequence, e: String| {
        let _ = seq.events.send(Event::Failed(e));
        true
    };
    if seq.prefilled < seq.req.prompt.len() {
        let end = (seq.prefilled + PREFILL_CHUNK).min(seq.req.prompt.len());
        match model.forward(&seq.req.prompt[seq.prefilled..end], &mut seq.cache, Logits::Last) {
            Ok(l) => seq.logits = l.into_vec(),
            Err(e) => return fail(seq, e.to_string()),
        }
        seq.prefilled = end;
        if seq.prefilled < seq.req.prompt.len() {
            return false;
        }
    } else {
        let last = *seq.generated.last().expect("decode follows a sampled token");
        match model.forward(&[last], &mut seq.cache, Logits::Last) {
            Ok(l) => seq.logits = l.into_vec(),
            Err(e) => return fail(seq, e.to_string()),
        }
    }
    if seq.generated.is_empty() && !seq.req.choices.is_empty() {
        if let Err(e) = force_best_choice(model, seq, stats) {
            return fail(seq, e);
        }
        if seq.generated.len() >= seq.req.max_tokens {
            stats.requests_finished.fetch_add(1, Ordering::Relaxed);
            let _ = seq.events.send(Event::Finished {
                reason: FinishReason::Length,
                prompt_tokens: seq.req.prompt.len(),
                completion_tokens: seq.generated.len(),
            });
            return true;
        }
    }
    let mut logits = std::mem::take(&mut seq.logits);
    apply_penalties(&mut logits, &seq.req, &seq.counts);
    let id = seq.sampler.sample(&logits);
    let logprob = seq.req.logprobs.map(|k| logprobs(&logits, id, k));
    seq.generated.push(id);
    *seq.counts.entry(id).or_default() += 1;
    stats.generated_tokens.fetch_add(1, Ordering::Relaxed);
    let _ = seq.events.send(Event::Token { id, logprob });
    let reason = if seq.req.stop_ids.contains(&id) {
        Some(FinishReason::Stop)
    } else if seq.generated.len() >= seq.req.max_tokens {
        Some(FinishReason::Length)
    } else {
        None
    };
    if let Some(reason) = reason {
        stats.requests_finished.fetch_add(1, Ordering::Relaxed);
        let _ = seq.events.send(Event::Finished {
            reason,
            prompt_tokens: seq.req.prompt.len(),
            completion_tokens: seq.generated.len(),
        });
        return true;
    }
    false
}

/// Scores every allowed start (teacher-forced on a copy of the cache), then emits the likeliest
/// as if it had been generated.
fn force_best_choice(model: &Qwen35, seq: &mut Sequence, stats: &Stats) -> Result<(), String> {
    let lse = |l: &[f32]| {
        let m = l.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        m + l.iter().map(|x| (x - m).exp()).sum::<f32>().ln()
    };
    let mut best: Option<(f32, usize)> = None;
    for (ci, choice) in seq.req.choices.iter().enumerate() {
        let mut cache = seq.cache.clone();
        let mut logits = seq.logits.clone();
        let mut score = 0f32;
        for &t in choice {
            score += logits.get(t as usize).copied().unwrap_or(f32::NEG_INFINITY) - lse(&logits);
            logits = model.forward(&[t], &mut cache, Logits::Last).map_err(|e| e.to_string())?.into_vec();
        }
        if best.is_none_or(|(b, _)| score > b) {
            best = Some((score, ci));
        }
    }
    let Some((_, ci)) = best else { return Ok(()) };
    for t in seq.req.choices[ci].clone() {
        if seq.generated.len() >= seq.req.max_tokens {
            break;
        }
        seq.generated.push(t);
        *seq.counts.entry(t).or_default() += 1;
        stats.generated_tokens.fetch_add(1, Ordering::Relaxed);
        let _ = seq.events.send(Event::Token { id: t, logprob: None });
        seq.logits = model.forward(&[t], &mut seq.cache, Logits::Last).map_err(|e| e.to_string())?.into_vec();
    }
    Ok(())
}

fn apply_penalties(logits: &mut [f32], req: &GenRequest, counts: &HashMap<u32, u32>) {
    let p = req.penalties;
    if p.repetition != 1.0 && p.repetition > 0.0 {
        let mut seen: Vec<u32> = req.prompt.clone();
        seen.extend(counts.keys());
        seen.sort_unstable();
        seen.dedup();
        for id in seen {
            if let Some(l) = logits.get_mut(id as usize) {
                *l = if *l > 0.0 { *l / p.repetition } else { *l * p.repetition };
            }
        }
    }
    if p.presence != 0.0 || p.frequency != 0.0 {
        for (&id, &n) in counts {
            if let Some(l) = logits.get_mut(id as usize) {
                *l -= p.presence + p.frequency * n as f32;
            }
        }
    }
}

/// Log-probability of `id` and the `k` most likely tokens, from one logits row.
fn logprobs(logits: &[f32], id: u32, k: usize) -> (f32, Vec<(u32, f32)>) {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let lse = max + logits.iter().map(|l| (l - max).exp()).sum::<f32>().ln();
    let mut top: Vec<(u32, f32)> = logits.iter().enumerate().map(|(i, &l)| (i as u32, l - lse)).collect();
    top.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    top.truncate(k);
    (logits[id as usize] - lse, top)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn penalties_follow_vllm() {
        let req = GenRequest {
            prompt: vec![0],
            sampling: SamplingParams::default(),
            penalties: Penalties { presence: 0.5, frequency: 0.25, repetition: 2.0 },
            max_tokens: 4,
            stop_ids: vec![],
            logprobs: None,
            choices: vec![],
        };
        let mut logits = vec![2.0f32, -2.0, 1.0, 3.0];
        let counts: HashMap<u32, u32> = [(1, 2), (2, 1)].into_iter().collect();
        apply_penalties(&mut logits, &req, &counts);
        assert_eq!(logits, vec![1.0, -4.0 - 0.5 - 0.5, 0.5 - 0.5 - 0.25, 3.0]);
    }

    #[test]
    fn logprobs_are_normalised() {
        let (lp, top) = logprobs(&[0.0, 1.0f32.ln(), 3.0f32.ln()], 2, 2);
        assert!((lp - (3.0f32 / 5.0).ln()).abs() < 1e-6);
        assert_eq!(top[0].0, 2);
        assert_eq!(top.len(), 2);
    }
}
