//! The engine: one scheduler thread that owns the model and every sequence's state.
//!
//! Each step it admits waiting requests while slots and KV blocks allow (the blocks a request's
//! prompt needs now, not its whole prompt + max_tokens: sequences take blocks as they grow, and
//! when the next step's growth does not fit, the most recently admitted sequences are preempted:
//! their state is dropped and recomputed by a prefill of their tokens so far once blocks are
//! free, which their clients do not see), advances every
//! prefilling sequence by one chunk of its prompt (on its own contiguous cache), and then decodes
//! one token for every running sequence in one batched forward of the model runner
//! ([`DecodeRunner`]: GDN state slots and paged KV from the cache budget; on the GPU a CUDA graph
//! per batch-size bucket). Greedy sequences without penalties or logprobs pick their token on the
//! device; the others get their logits row and sample on the host. A request whose receiver is
//! gone (client disconnected, stop string seen) is cancelled and its slot freed at the next step.
//! Requests beyond the waiting-queue bound are refused at once (HTTP 429). With prefix caching
//! on, a prompt that starts with an earlier prompt resumes from that prompt's snapshot
//! ([`crate::prefix`]) and prefills only the rest. With speculative decoding
//! (`--speculative-config`, the checkpoint's MTP head), sequences without penalties, logprobs or
//! forced choices draft K tokens with the head and the runner verifies them in one forward
//! (K + 1 rows each): greedy ones keep exactly the tokens they would get alone, sampled ones
//! follow the same distribution (speculative sampling).

use crate::prefix::PrefixCache;
use fp4_kernels::{ops, Ids, Tensor};
use fp4_model::runner::RunnerError;
use fp4_model::{Cache, DecodeRunner, Logits, Mtp, MtpCache, Qwen35, RunnerConfig, Sampler, SamplingParams, SeqState};
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Instant;
use tokio::sync::mpsc as tmpsc;

/// Tokens of a prompt processed per scheduler step while other sequences wait, by default
/// (`EngineConfig::prefill_chunk`, `--max-num-batched-tokens`).
pub const PREFILL_CHUNK: usize = 256;
/// Tokens per KV block of the runner's paged cache.
const KV_BLOCK: usize = 16;

#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub max_num_seqs: usize,
    pub max_model_len: usize,
    /// Requests that may wait for a slot before new ones are refused.
    pub max_waiting: usize,
    /// Bytes all sequences' caches may use together (the runner's pools: GDN state slots for
    /// `max_num_seqs` sequences, the rest KV blocks).
    pub cache_budget_bytes: usize,
    /// Replay decode steps from CUDA graphs (GPU); `false` = `--enforce-eager`.
    pub cuda_graphs: bool,
    /// Bytes of prompt snapshots kept for prefix caching, taken out of `cache_budget_bytes`
    /// (0: prefix caching off).
    pub prefix_cache_bytes: usize,
    /// Tokens a sequence drafts per step with the MTP head (0: no speculative decoding; needs
    /// the head, [`start_with_head`]).
    pub spec_tokens: usize,
    /// Prompt tokens a prefilling sequence computes per scheduler step (≥ 1): larger chunks give
    /// a long prompt its first token sooner, smaller ones stall the other sequences' decode
    /// less between their steps.
    pub prefill_chunk: usize,
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
    /// Prompt positions (ascending, up to the prompt's length) where the state is kept for the
    /// prefix cache: the prompt's end, where a continuation resumes; in a chat, the end of the
    /// rendered system prompt, which later requests share, and the end of the conversation
    /// before the generation prompt, where its next turn resumes. The prefill always splits its
    /// chunks there, so a prompt resumed from such a snapshot computes exactly what it computes
    /// prefilled from the start. Empty: no snapshot.
    pub snapshot_at: Vec<usize>,
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
        /// Prompt tokens restored from the prefix cache instead of prefilled.
        cached_tokens: usize,
    },
    Failed(String),
}

#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    #[error("the server is overloaded: {0} requests are already waiting; retry later")]
    Overloaded(usize),
    #[error("the server is shutting down")]
    ShuttingDown,
    #[error(
        "the request needs cache for {need} tokens (prompt + max_tokens) but the whole --cache-budget of {budget} bytes holds {capacity}; lower max_tokens or raise --cache-budget"
    )]
    TooLarge { need: usize, capacity: usize, budget: usize },
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
    /// Batched decode steps, the sequences they decoded, those replayed from a CUDA graph, and
    /// their summed wall time in microseconds.
    pub decode_steps: AtomicU64,
    pub decode_batch_tokens: AtomicU64,
    pub graph_replays: AtomicU64,
    pub decode_step_micros: AtomicU64,
    /// Prefix cache: admitted prompts that resumed from a snapshot, those that did not, the
    /// prompt tokens restored instead of prefilled, and the snapshots held and their bytes.
    pub prefix_hits: AtomicU64,
    pub prefix_misses: AtomicU64,
    pub prefix_cached_tokens: AtomicU64,
    pub prefix_entries: AtomicUsize,
    pub prefix_bytes: AtomicUsize,
    /// Sequences preempted (state dropped, recomputed later) because the KV blocks ran out.
    pub preemptions: AtomicU64,
    /// Speculative decoding: verifies (one per sequence per step), tokens drafted, and drafts the
    /// main model kept (each verify also emits one token of its own).
    pub spec_verifies: AtomicU64,
    pub spec_drafted: AtomicU64,
    pub spec_accepted: AtomicU64,
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
    max_model_len: usize,
    budget: usize,
    /// Tokens the KV pool holds in all (one sequence's reservation must fit in it).
    kv_tokens: usize,
}

impl EngineHandle {
    /// Queues a request; events arrive on the returned receiver. Dropping the receiver cancels it.
    pub fn submit(&self, req: GenRequest) -> Result<tmpsc::UnboundedReceiver<Event>, SubmitError> {
        if self.shutting_down.load(Ordering::Relaxed) {
            return Err(SubmitError::ShuttingDown);
        }
        // A sequence must fit the KV pool alone (prompt + max_tokens and the next position): it
        // can always finish, preempting the others.
        let need = req.prompt.len().saturating_add(req.max_tokens).min(self.max_model_len) + 1;
        if need > self.kv_tokens {
            return Err(SubmitError::TooLarge { need, capacity: self.kv_tokens, budget: self.budget });
        }
        // Waiting requests are counted from submission to admission (the engine drains the
        // channel into its own queue, so the channel's capacity alone would bound only bursts).
        if self.stats.waiting.fetch_add(1, Ordering::SeqCst) >= self.max_waiting {
            self.stats.waiting.fetch_sub(1, Ordering::SeqCst);
            return Err(SubmitError::Overloaded(self.max_waiting));
        }
        let (events, rx) = tmpsc::unbounded_channel();
        match self.tx.try_send(Submission { req, events }) {
            Ok(()) => Ok(rx),
            Err(e) => {
                self.stats.waiting.fetch_sub(1, Ordering::SeqCst);
                Err(match e {
                    mpsc::TrySendError::Full(_) => SubmitError::Overloaded(self.max_waiting),
                    mpsc::TrySendError::Disconnected(_) => SubmitError::ShuttingDown,
                })
            }
        }
    }

    /// Stops admitting new requests; running ones finish. The engine thread exits when idle.
    pub fn shutdown(&self) {
        self.shutting_down.store(true, Ordering::Relaxed);
    }
}

/// One turn of [`conversation_ttfts`].
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct TurnTiming {
    /// Submission → first token.
    pub ttft_ms: f64,
    pub prompt_tokens: usize,
    /// Prompt tokens restored from the prefix cache.
    pub cached_tokens: usize,
}

/// Times to first token over a conversation of token ids through a running engine (the offline
/// form of `fp4 bench --conversation`): turn t's prompt is turn t−1's prompt, its reply (greedy,
/// `reply_tokens` long) and `new_tokens` fresh ids standing for the user's next message; each
/// prompt is snapshotted at its end, where the next turn resumes.
pub fn conversation_ttfts(
    handle: &EngineHandle,
    first_prompt: Vec<u32>,
    turns: usize,
    new_tokens: usize,
    reply_tokens: usize,
    vocab: usize,
) -> Result<Vec<TurnTiming>, String> {
    let mut prompt = first_prompt;
    let mut out = Vec::with_capacity(turns);
    for turn in 0..turns {
        let request = GenRequest {
            prompt: prompt.clone(),
            sampling: SamplingParams::default(),
            penalties: Penalties::default(),
            max_tokens: reply_tokens,
            stop_ids: vec![],
            logprobs: None,
            choices: vec![],
            snapshot_at: vec![prompt.len()],
        };
        let started = Instant::now();
        let mut events = handle.submit(request).map_err(|e| e.to_string())?;
        let (mut ttft, mut reply) = (None, Vec::with_capacity(reply_tokens));
        let cached = loop {
            match events.blocking_recv() {
                Some(Event::Token { id, .. }) => {
                    ttft.get_or_insert_with(|| started.elapsed().as_secs_f64() * 1e3);
                    reply.push(id);
                }
                Some(Event::Finished { cached_tokens, .. }) => break cached_tokens,
                Some(Event::Failed(e)) => return Err(format!("turn {}: {e}", turn + 1)),
                None => return Err("the engine stopped".into()),
            }
        };
        let ttft_ms = ttft.ok_or_else(|| format!("turn {}: no token", turn + 1))?;
        out.push(TurnTiming { ttft_ms, prompt_tokens: prompt.len(), cached_tokens: cached });
        prompt.extend(reply);
        let seed = prompt.len() as u64;
        prompt.extend((0..new_tokens as u64).map(|i| ((seed * 7919 + i * 2654435761) % vocab as u64) as u32));
    }
    Ok(out)
}

/// Cache bytes one sequence of `tokens` tokens needs (f32 KV and GDN state).
pub fn cache_bytes(model: &Qwen35, tokens: usize) -> usize {
    let c = &model.config;
    fp4_model::Pools::slot_bytes(c, false)
        + tokens.div_ceil(KV_BLOCK) * fp4_model::Pools::block_bytes(c, KV_BLOCK, false)
}

/// Where a sequence's state lives: its own cache while the prompt is prefilled, then the runner;
/// nowhere once dropped (preempted, waiting to be recomputed; or finished, its slot and blocks
/// given back).
// One per running sequence (at most --max-num-seqs): the prefill state's size does not matter.
#[allow(clippy::large_enum_variant)]
enum SeqCache {
    Prefill(PrefillState),
    Decode(SeqState),
    Dropped,
}

/// A sequence's state while its prompt is prefilled (also what a prefix snapshot keeps).
#[derive(Clone)]
struct PrefillState {
    cache: Cache,
    /// For a sequence that drafts with the MTP head: the head's state.
    head: Option<HeadPrefill>,
}

/// The MTP head over a prompt as it is prefilled. The head at position i reads token i + 1, so
/// it runs one position behind the model: `pending` is the model's hidden state at the last
/// prefilled position, waiting for the token after it (the next chunk's first, or the first
/// output token).
#[derive(Clone)]
struct HeadPrefill {
    cache: MtpCache,
    pending: Option<Tensor>,
}

impl PrefillState {
    fn new(model: &Qwen35, head: Option<&Mtp>) -> PrefillState {
        PrefillState {
            cache: model.new_cache(),
            head: head.map(|h| HeadPrefill { cache: h.new_cache(), pending: None }),
        }
    }

    /// This state for a sequence that drafts (`drafts`: it keeps the head's state) or not (the
    /// head's state of a snapshot a drafting request left is dropped: this one must not draft).
    fn for_drafting(mut self, drafts: bool) -> PrefillState {
        if !drafts {
            self.head = None;
        }
        self
    }
}

impl crate::prefix::Snapshot for PrefillState {
    fn bytes(&self) -> usize {
        let head = self.head.as_ref().map_or(0, |h| {
            let pending = h.pending.as_ref().map_or(0, |t| t.elem_count()) * std::mem::size_of::<f32>();
            crate::prefix::layer_bytes(h.cache.layer()) + pending
        });
        crate::prefix::cache_bytes(&self.cache) + head
    }
}

struct Sequence {
    req: GenRequest,
    events: tmpsc::UnboundedSender<Event>,
    cache: SeqCache,
    /// Prompt tokens processed so far.
    prefilled: usize,
    /// Of those, restored from the prefix cache.
    cached: usize,
    generated: Vec<u32>,
    counts: HashMap<u32, u32>,
    sampler: Sampler,
    /// Last logits row (after prefill or the last host-sampled decode).
    logits: Vec<f32>,
    /// After a preemption: the tokens to prefill again (the prompt and every generated token
    /// but the last, which is the next decode step's input); empty otherwise.
    resume: Vec<u32>,
    /// Admission order (the most recently admitted are preempted first).
    admitted: u64,
    /// Drafts with the MTP head (nothing needing the logits on the host, no forced choices, and
    /// the engine speculates).
    speculative: bool,
}

impl Sequence {
    /// The tokens its prefill runs over: the prompt, or after a preemption what it resumes from.
    fn prefill_tokens(&self) -> &[u32] {
        if self.resume.is_empty() {
            &self.req.prompt
        } else {
            &self.resume
        }
    }

    /// A fresh prefill state (and the MTP head's when it drafts).
    fn new_prefill(&self, model: &Qwen35, head: Option<&Mtp>) -> PrefillState {
        PrefillState::new(model, head.filter(|_| self.speculative))
    }

    /// KV blocks it holds or will take when its prefill moves into the runner.
    fn blocks(&self, runner: &DecodeRunner) -> usize {
        match &self.cache {
            SeqCache::Prefill(_) | SeqCache::Dropped => runner.blocks_for(self.prefill_tokens().len() + 1),
            SeqCache::Decode(state) => state.blocks(),
        }
    }

    /// Whether its next token needs the whole logits row on the host (penalties over the tokens
    /// so far, logprobs); otherwise its sampler runs where the logits are (on the GPU only the
    /// chosen id comes back, not the 248k-float row).
    fn needs_host_logits(&self) -> bool {
        needs_host_logits(&self.req)
    }

    fn finish(&self, reason: FinishReason, stats: &Stats) {
        stats.requests_finished.fetch_add(1, Ordering::Relaxed);
        let _ = self.events.send(Event::Finished {
            reason,
            prompt_tokens: self.req.prompt.len(),
            completion_tokens: self.generated.len(),
            cached_tokens: self.cached,
        });
    }

    /// Appends token `id` to the output and streams it.
    fn record(&mut self, id: u32, logprob: Option<(f32, Vec<(u32, f32)>)>, stats: &Stats) {
        self.generated.push(id);
        *self.counts.entry(id).or_default() += 1;
        stats.generated_tokens.fetch_add(1, Ordering::Relaxed);
        let _ = self.events.send(Event::Token { id, logprob });
    }

    /// Records token `id`; returns true when the sequence is finished.
    fn emit(&mut self, id: u32, logprob: Option<(f32, Vec<(u32, f32)>)>, stats: &Stats) -> bool {
        self.record(id, logprob, stats);
        let reason = if self.req.stop_ids.contains(&id) {
            Some(FinishReason::Stop)
        } else if self.generated.len() >= self.req.max_tokens {
            Some(FinishReason::Length)
        } else {
            None
        };
        if let Some(reason) = reason {
            self.finish(reason, stats);
            return true;
        }
        false
    }

    /// Penalties, then the sampler (and logprobs) on the host over `logits`.
    fn sample_host(&mut self, mut logits: Vec<f32>, stats: &Stats) -> bool {
        apply_penalties(&mut logits, &self.req, &self.counts);
        let id = self.sampler.sample(&logits);
        let logprob = self.req.logprobs.map(|k| logprobs(&logits, id, k));
        self.emit(id, logprob, stats)
    }
}

/// Whether a request's tokens need the whole logits row on the host: penalties over the tokens
/// so far, logprobs.
fn needs_host_logits(req: &GenRequest) -> bool {
    let p = req.penalties;
    req.logprobs.is_some() || p.presence != 0.0 || p.frequency != 0.0 || (p.repetition != 1.0 && p.repetition > 0.0)
}

/// What a group of decoding sequences runs this step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StepKind {
    /// Draft with the MTP head, verify in one forward.
    Speculative,
    /// One token each, chosen on the device (greedy or by its sampling controls).
    Device,
    /// One token each, its logits on the host (penalties, logprobs).
    Host,
}

/// Rows a decoding sequence takes in its next step (1 + the drafts when it drafts).
fn decode_rows(runner: &DecodeRunner, st: &SeqState) -> usize {
    if runner.can_speculate(st) {
        1 + runner.config().spec_tokens
    } else {
        1
    }
}

/// Starts the engine thread. Fails when the cache budget cannot hold `max_num_seqs` sequences'
/// state and a KV block.
pub fn start(model: Qwen35, cfg: EngineConfig) -> Result<EngineHandle, RunnerError> {
    start_with_head(model, None, cfg)
}

/// [`start`] with the checkpoint's MTP head, which drafts `cfg.spec_tokens` tokens per step
/// for every sequence that can draft (speculative decoding).
pub fn start_with_head(model: Qwen35, head: Option<Mtp>, cfg: EngineConfig) -> Result<EngineHandle, RunnerError> {
    if cfg.spec_tokens > 0 && head.is_none() {
        return Err(RunnerError::Speculation(format!(
            "{} draft tokens asked for, but the checkpoint has no MTP head (mtp.* tensors)",
            cfg.spec_tokens
        )));
    }
    let head = head.filter(|_| cfg.spec_tokens > 0);
    let runner_cfg = RunnerConfig::from_budget(
        &model.config,
        cfg.max_num_seqs,
        cfg.max_model_len,
        KV_BLOCK,
        cfg.cache_budget_bytes.saturating_sub(cfg.prefix_cache_bytes),
        cfg.cuda_graphs,
        cfg.spec_tokens,
    )?;
    let (tx, rx) = mpsc::sync_channel::<Submission>(cfg.max_waiting);
    let stats = Arc::new(Stats::default());
    let shutting_down = Arc::new(AtomicBool::new(false));
    let handle = EngineHandle {
        tx,
        stats: stats.clone(),
        shutting_down,
        max_waiting: cfg.max_waiting,
        max_model_len: cfg.max_model_len,
        budget: cfg.cache_budget_bytes,
        kv_tokens: runner_cfg.kv_blocks * runner_cfg.block_size,
    };
    std::thread::Builder::new()
        .name("fp4-engine".into())
        .spawn(move || {
            // The runner (device buffers, captured graphs) lives on this thread.
            let runner = DecodeRunner::new(&model, runner_cfg);
            run(model, head, runner, cfg, rx, stats)
        })
        .expect("spawn engine thread");
    Ok(handle)
}

fn run(
    model: Qwen35,
    head: Option<Mtp>,
    mut runner: DecodeRunner,
    cfg: EngineConfig,
    rx: mpsc::Receiver<Submission>,
    stats: Arc<Stats>,
) {
    let head = head.as_ref();
    let mut waiting: VecDeque<Submission> = VecDeque::new();
    // Sequences preempted for KV blocks, in preemption order: admitted again before new requests.
    let mut preempted: VecDeque<Sequence> = VecDeque::new();
    let mut running: Vec<Sequence> = Vec::new();
    let rc = runner.config();
    let total_blocks = rc.kv_blocks;
    let mut admissions = 0u64;
    // A sequence's GDN slots (one more per draft token with speculative decoding) and a KV block.
    let (slot_bytes, block_bytes) = (
        fp4_model::Pools::slot_bytes(&model.config, rc.spec_tokens > 0) * (1 + rc.spec_tokens),
        fp4_model::Pools::block_bytes(&model.config, rc.block_size, rc.spec_tokens > 0),
    );
    let mut prefixes: PrefixCache<PrefillState> = PrefixCache::new(cfg.prefix_cache_bytes);
    let committed =
        |running: &[Sequence], runner: &DecodeRunner| running.iter().map(|s| s.blocks(runner)).sum::<usize>();
    loop {
        // Take new submissions; block only when there is nothing to do.
        if running.is_empty() && waiting.is_empty() && preempted.is_empty() {
            match rx.recv() {
                Ok(s) => waiting.push_back(s),
                Err(_) => return,
            }
        }
        while let Ok(s) = rx.try_recv() {
            waiting.push_back(s);
        }
        // Admit while slots and KV blocks allow: the blocks a prompt needs now, beside what the
        // running sequences hold and one block of headroom each for their growth.
        while running.len() < rc.max_seqs {
            let free = total_blocks.saturating_sub(committed(&running, &runner) + running.len());
            if let Some(seq) = preempted.front() {
                if seq.events.is_closed() {
                    preempted.pop_front();
                    stats.requests_cancelled.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                if seq.blocks(&runner) > free && !running.is_empty() {
                    break;
                }
                let mut seq = preempted.pop_front().expect("front exists");
                // Recomputed from a prefix snapshot where one matches (not counted as a hit: the
                // request was counted when first admitted).
                let usable = |p: &PrefillState| p.head.is_some() || !seq.speculative;
                let (state, n) = prefixes
                    .lookup(seq.prefill_tokens(), usable)
                    .map(|(state, n)| (state.for_drafting(seq.speculative), n))
                    .unwrap_or_else(|| (seq.new_prefill(&model, head), 0));
                (seq.cache, seq.prefilled) = (SeqCache::Prefill(state), n);
                admissions += 1;
                seq.admitted = admissions;
                running.push(seq);
                continue;
            }
            let Some(s) = waiting.front() else { break };
            if s.events.is_closed() {
                waiting.pop_front();
                stats.waiting.fetch_sub(1, Ordering::Relaxed);
                stats.requests_cancelled.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            let need = runner.blocks_for(s.req.prompt.len() + 1);
            if need > free && !running.is_empty() {
                break;
            }
            let s = waiting.pop_front().expect("front exists");
            stats.waiting.fetch_sub(1, Ordering::Relaxed);
            // A sequence must be able to finish alone (preemption frees everything else for it).
            let whole =
                runner.blocks_for(s.req.prompt.len().saturating_add(s.req.max_tokens).min(cfg.max_model_len) + 1);
            if whole > total_blocks {
                let _ = s.events.send(Event::Failed(format!(
                    "the request needs {} bytes of cache but the whole budget is {} bytes",
                    slot_bytes + whole * block_bytes,
                    cfg.cache_budget_bytes
                )));
                continue;
            }
            match Sampler::new(s.req.sampling) {
                Ok(sampler) => {
                    stats.prompt_tokens.fetch_add(s.req.prompt.len() as u64, Ordering::Relaxed);
                    let speculative = head.is_some() && !needs_host_logits(&s.req) && s.req.choices.is_empty();
                    let usable = |p: &PrefillState| p.head.is_some() || !speculative;
                    let (state, cached) = match prefixes.lookup(&s.req.prompt, usable) {
                        Some((state, n)) => {
                            stats.prefix_hits.fetch_add(1, Ordering::Relaxed);
                            stats.prefix_cached_tokens.fetch_add(n as u64, Ordering::Relaxed);
                            (state.for_drafting(speculative), n)
                        }
                        None => {
                            stats.prefix_misses.fetch_add(1, Ordering::Relaxed);
                            (PrefillState::new(&model, head.filter(|_| speculative)), 0)
                        }
                    };
                    admissions += 1;
                    running.push(Sequence {
                        speculative,
                        cache: SeqCache::Prefill(state),
                        prefilled: cached,
                        cached,
                        generated: Vec::new(),
                        counts: HashMap::new(),
                        sampler,
                        logits: Vec::new(),
                        resume: Vec::new(),
                        admitted: admissions,
                        req: s.req,
                        events: s.events,
                    });
                }
                Err(e) => {
                    let _ = s.events.send(Event::Failed(e.to_string()));
                }
            }
        }
        let cache_used = |running: &[Sequence], runner: &DecodeRunner| {
            running.len() * slot_bytes + committed(running, runner) * block_bytes
        };
        stats.running.store(running.len(), Ordering::Relaxed);
        stats.cache_bytes.store(cache_used(&running, &runner), Ordering::Relaxed);

        // Prefill chunks (one sequence at a time), first tokens, hand-over to the runner.
        let step_started = Instant::now();
        let mut done = vec![false; running.len()];
        for (i, seq) in running.iter_mut().enumerate() {
            if seq.events.is_closed() {
                stats.requests_cancelled.fetch_add(1, Ordering::Relaxed);
                done[i] = true;
            } else if matches!(seq.cache, SeqCache::Prefill(_)) {
                done[i] = guarded("the prefill", || {
                    prefill_step(&model, head, &mut runner, cfg.prefill_chunk, seq, &mut prefixes, &stats)
                })
                .unwrap_or_else(|e| {
                    let _ = seq.events.send(Event::Failed(e));
                    true
                });
            }
        }
        // Sequences finished or cancelled so far give their slot and blocks back before the
        // decode takes new blocks.
        for (seq, _) in running.iter_mut().zip(&done).filter(|(_, &d)| d) {
            if let SeqCache::Decode(state) = std::mem::replace(&mut seq.cache, SeqCache::Dropped) {
                runner.release(state);
            }
        }
        // The blocks this step's decode takes must fit beside what every other sequence holds or
        // is promised: else the most recently admitted sequences give theirs up.
        loop {
            let live = || (0..running.len()).filter(|&i| !done[i]);
            let held: usize = live().map(|i| running[i].blocks(&runner)).sum();
            let growth: usize = live()
                .map(|i| match &running[i].cache {
                    SeqCache::Decode(st) => runner.blocks_to_grow(st, decode_rows(&runner, st)),
                    _ => 0,
                })
                .sum();
            if held + growth <= total_blocks || live().count() < 2 {
                break;
            }
            let victim = live().max_by_key(|&i| running[i].admitted).expect("two live sequences");
            done.swap_remove(victim);
            let seq = preempt(running.swap_remove(victim), &mut runner, &stats);
            preempted.push_back(seq);
        }
        // One batched decode step for every sequence in the runner.
        let decoding: Vec<usize> =
            (0..running.len()).filter(|&i| !done[i] && matches!(running[i].cache, SeqCache::Decode(_))).collect();
        if !decoding.is_empty() {
            let t0 = Instant::now();
            let replays = runner.graph_replays;
            let drafts = |i: &usize| matches!(&running[*i].cache, SeqCache::Decode(st) if runner.can_speculate(st));
            let (spec, plain): (Vec<usize>, Vec<usize>) = decoding.iter().partition(|&i| drafts(i));
            let (device, host): (Vec<usize>, Vec<usize>) =
                plain.iter().partition(|&&i| !running[i].needs_host_logits());
            for (group, kind) in [(spec, StepKind::Speculative), (device, StepKind::Device), (host, StepKind::Host)] {
                if group.is_empty() {
                    continue;
                }
                let step = || match (kind, head) {
                    (StepKind::Speculative, Some(head)) => {
                        speculative_step(&model, head, &mut runner, &mut running, &group, &mut done, &stats)
                    }
                    _ => {
                        let on_device = kind == StepKind::Device;
                        // A drafting sequence that cannot draft this step (near the context
                        // end) decodes one token at a time from now on.
                        for &i in &group {
                            if let SeqCache::Decode(st) = &mut running[i].cache {
                                st.stop_speculating();
                            }
                        }
                        decode_step(&model, &mut runner, &mut running, &group, on_device, &mut done, &stats)
                    }
                };
                if let Err(e) = guarded("the decode step", step) {
                    for &i in &group {
                        let _ = running[i].events.send(Event::Failed(e.clone()));
                        done[i] = true;
                    }
                }
            }
            stats.decode_steps.fetch_add(1, Ordering::Relaxed);
            stats.decode_batch_tokens.fetch_add(decoding.len() as u64, Ordering::Relaxed);
            stats.graph_replays.fetch_add(runner.graph_replays - replays, Ordering::Relaxed);
            stats.decode_step_micros.fetch_add(t0.elapsed().as_micros() as u64, Ordering::Relaxed);
        }
        // Finished and cancelled sequences give their slot and blocks back.
        for i in (0..running.len()).rev() {
            if done[i] {
                let seq = running.swap_remove(i);
                if let SeqCache::Decode(state) = seq.cache {
                    runner.release(state);
                }
            }
        }
        stats.running.store(running.len(), Ordering::Relaxed);
        stats.cache_bytes.store(cache_used(&running, &runner), Ordering::Relaxed);
        tracing::trace!(secs = step_started.elapsed().as_secs_f64(), running = running.len(), "step");
    }
}

/// Runs `f`, one piece of a step, turning a panic into an error naming `what`: a failed GPU call
/// panics in the op that made it, and then only the requests of that piece fail (their state is
/// given back as for any finished request) while the engine keeps serving the others.
fn guarded<T>(what: &str, f: impl FnOnce() -> T) -> Result<T, String> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).map_err(|p| {
        let msg = p
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "unknown error".into());
        tracing::error!(%msg, "{what} failed; its requests fail, the engine goes on");
        format!("{what} failed: {msg}")
    })
}

#[cfg(test)]
/// Makes the next decode step of a sequence whose prompt starts with [`FAIL_PROMPT`] panic, as a
/// failed GPU call does (the engine's recovery test; other tests' sequences never match).
static FAIL_NEXT_DECODE: AtomicBool = AtomicBool::new(false);
#[cfg(test)]
const FAIL_PROMPT: [u32; 3] = [509, 510, 511];

/// Drops a sequence's state (its runner slot and blocks, or its prefill cache) so that it can be
/// recomputed later from its tokens: the prompt and every generated token but the last, which
/// stays the next decode step's input.
fn preempt(mut seq: Sequence, runner: &mut DecodeRunner, stats: &Stats) -> Sequence {
    if let SeqCache::Decode(state) = std::mem::replace(&mut seq.cache, SeqCache::Dropped) {
        runner.release(state);
    }
    seq.resume = match seq.generated.split_last() {
        Some((_, before)) => seq.req.prompt.iter().chain(before).copied().collect(),
        None => Vec::new(),
    };
    seq.prefilled = 0;
    stats.preemptions.fetch_add(1, Ordering::Relaxed);
    tracing::info!(
        tokens = seq.prefill_tokens().len(),
        generated = seq.generated.len(),
        "KV cache full: a sequence is preempted and will be recomputed"
    );
    seq
}

/// One prefill chunk of `seq`; after the last one, its first token (choices, penalties and the
/// sampler on the host) and the move of its cache into the runner. Returns true when finished.
fn prefill_step(
    model: &Qwen35,
    head: Option<&Mtp>,
    runner: &mut DecodeRunner,
    chunk_tokens: usize,
    seq: &mut Sequence,
    prefixes: &mut PrefixCache<PrefillState>,
    stats: &Stats,
) -> bool {
    let fail = |seq: &Sequence, e: String| {
        let _ = seq.events.send(Event::Failed(e));
        true
    };
    let (total, resuming) = (seq.prefill_tokens().len(), !seq.resume.is_empty());
    let mut end = (seq.prefilled + chunk_tokens.max(1)).min(total);
    if let Some(&at) = seq.req.snapshot_at.iter().find(|&&at| at > seq.prefilled && at < end) {
        end = at;
    }
    // The prompt (or resume) tokens and the cache are separate fields: borrowed side by side.
    let tokens: &[u32] = if resuming { &seq.resume } else { &seq.req.prompt };
    let chunk = &tokens[seq.prefilled..end];
    let SeqCache::Prefill(state) = &mut seq.cache else { unreachable!("prefill of a decoding sequence") };
    // Only the prompt's last position's logits are read (its first token): earlier chunks and a
    // recomputation skip the LM head (2 GB of BF16 on the 9B) and the row's trip to the host,
    // which would also stall the device until the next chunk is queued.
    let logits = end == total && !resuming;
    let run = match (&mut state.head, head) {
        (Some(h), Some(mtp)) => prefill_with_head(model, mtp, &mut state.cache, h, tokens, chunk, logits),
        _ if logits => model.forward(chunk, &mut state.cache, Logits::Last).map(Some),
        _ => model.forward_normed(chunk, &mut state.cache, Logits::Last).map(|_| None),
    };
    match run {
        Ok(Some(l)) => seq.logits = l.into_vec(),
        Ok(None) => {}
        Err(e) => return fail(seq, e.to_string()),
    }
    seq.prefilled = end;
    // The state at the request's snapshot points (see GenRequest::snapshot_at); a recomputation
    // after a preemption kept them the first time.
    if !resuming && end <= seq.req.prompt.len() && seq.req.snapshot_at.contains(&end) {
        prefixes.insert(&seq.req.prompt[..end], state);
        let (entries, bytes) = prefixes.usage();
        stats.prefix_entries.store(entries, Ordering::Relaxed);
        stats.prefix_bytes.store(bytes, Ordering::Relaxed);
    }
    if seq.prefilled < total {
        return false;
    }
    if resuming {
        // Recomputed up to the last generated token, the next decode step's input.
        seq.resume.clear();
        seq.logits.clear();
        return admit(model, head, runner, seq);
    }
    if !seq.req.choices.is_empty() {
        if let Err(e) = force_best_choice(model, seq, stats) {
            return fail(seq, e);
        }
        if seq.generated.len() >= seq.req.max_tokens {
            seq.finish(FinishReason::Length, stats);
            return true;
        }
    }
    let logits = std::mem::take(&mut seq.logits);
    if seq.sample_host(logits, stats) {
        return true;
    }
    admit(model, head, runner, seq)
}

/// A prefill chunk of a drafting sequence: the model's hidden states over `chunk` (the part of
/// `tokens` after what `cache` holds) also feed the MTP head at every position whose next token
/// is now known. Returns the last position's logits when `logits`.
fn prefill_with_head(
    model: &Qwen35,
    mtp: &Mtp,
    cache: &mut Cache,
    head: &mut HeadPrefill,
    tokens: &[u32],
    chunk: &[u32],
    logits: bool,
) -> fp4_model::Result<Option<Tensor>> {
    let h = model.forward_normed(chunk, cache, Logits::All)?;
    let logits = logits.then(|| model.head(&ops::last_row(&h)));
    let rows = match head.pending.take() {
        Some(p) => ops::cat_rows(&p, &h),
        None => h,
    };
    let (n, pos0) = (rows.rows(), head.cache.seq_len);
    if n > 1 {
        mtp.forward(model, &tokens[pos0 + 1..pos0 + n], &ops::rows(&rows, 0, n - 1), &mut head.cache)?;
    }
    head.pending = Some(ops::last_row(&rows));
    Ok(logits)
}

/// Moves a prefilled sequence's cache into the runner (a drafting sequence's head first sees the
/// last prompt position, whose next token is now known); returns true when that failed (the
/// sequence is finished with the error).
fn admit(model: &Qwen35, mtp: Option<&Mtp>, runner: &mut DecodeRunner, seq: &mut Sequence) -> bool {
    let SeqCache::Prefill(state) = &mut seq.cache else { unreachable!("still prefilling") };
    let admitted = match (state.head.as_mut(), mtp) {
        (Some(h), Some(mtp)) => {
            let next = *seq.generated.last().expect("a first token before the runner");
            let pending = h.pending.take().expect("the last prefilled position waits for its next token");
            mtp.forward(model, &[next], &pending, &mut h.cache)
                .map_err(|e| e.to_string())
                .and_then(|g| runner.admit_speculative(&state.cache, &h.cache, g).map_err(|e| e.to_string()))
        }
        _ => runner.admit(&state.cache).map_err(|e| e.to_string()),
    };
    match admitted {
        Ok(st) => {
            seq.cache = SeqCache::Decode(st);
            false
        }
        Err(e) => {
            let _ = seq.events.send(Event::Failed(format!("cannot continue the sequence: {e}")));
            true
        }
    }
}

/// What a step of the decoding sequences `group` (sorted) reads, in group order: each one's
/// input token (its last), its runner state, and its sampler with its sampling parameters.
type GroupParts<'a> = (Vec<u32>, Vec<&'a mut SeqState>, Vec<(SamplingParams, &'a mut Sampler)>);

fn group_parts<'a>(running: &'a mut [Sequence], group: &[usize]) -> GroupParts<'a> {
    let (mut inputs, mut states, mut samplers) = (Vec::new(), Vec::new(), Vec::new());
    for (_, seq) in running.iter_mut().enumerate().filter(|(i, _)| group.contains(i)) {
        let Sequence { cache, sampler, req, generated, .. } = seq;
        inputs.push(*generated.last().expect("decode follows a token"));
        match cache {
            SeqCache::Decode(state) => states.push(state),
            SeqCache::Prefill(_) | SeqCache::Dropped => unreachable!("only decoding sequences are grouped"),
        }
        samplers.push((req.sampling, sampler));
    }
    (inputs, states, samplers)
}

/// One batched decode step of the sequences `group` (all decoding): each token picked on the
/// device (greedy, or sampled by its request's controls: only the ids come back), or, for
/// requests with penalties or logprobs, from its logits on the host.
fn decode_step(
    model: &Qwen35,
    runner: &mut DecodeRunner,
    running: &mut [Sequence],
    group: &[usize],
    on_device: bool,
    done: &mut [bool],
    stats: &Stats,
) {
    #[cfg(test)]
    if group.iter().any(|&i| running[i].req.prompt.starts_with(&FAIL_PROMPT))
        && FAIL_NEXT_DECODE.swap(false, Ordering::SeqCst)
    {
        panic!("injected failure");
    }
    let (inputs, mut states, mut samplers) = group_parts(running, group);
    // Greedy groups keep the plain argmax step; sampled rows draw on the device from the
    // controls their samplers give (the same draw as on the host).
    let controls: Option<Vec<_>> = (on_device && samplers.iter().any(|(p, _)| p.temperature != 0.0))
        .then(|| samplers.iter_mut().map(|(_, s)| s.next_controls()).collect());
    let fail_all = |running: &mut [Sequence], done: &mut [bool], e: RunnerError| {
        for &i in group {
            let _ = running[i].events.send(Event::Failed(format!("decode step failed: {e}")));
            done[i] = true;
        }
    };
    if on_device {
        let step = match &controls {
            None => runner.step_greedy(model, &mut states, &inputs),
            Some(c) => runner.step_sampled(model, &mut states, &inputs, c),
        };
        match step {
            Ok(ids) => {
                for (&i, id) in group.iter().zip(ids) {
                    done[i] = running[i].emit(id, None, stats);
                }
            }
            Err(e) => fail_all(running, done, e),
        }
    } else {
        // Every row of this group needs its logits on the host (penalties, logprobs).
        match runner.step_logits(model, &mut states, &inputs) {
            Ok(logits) => {
                let (vocab, rows) = (logits.row_len(), logits.to_vec());
                for (r, &i) in group.iter().enumerate() {
                    done[i] = running[i].sample_host(rows[r * vocab..(r + 1) * vocab].to_vec(), stats);
                }
            }
            Err(e) => fail_all(running, done, e),
        }
    }
}

/// One speculative step of the drafting sequences `group`: the MTP head drafts, the runner
/// verifies every draft in one forward, and each sequence keeps drafts by its sampling rule:
/// greedy ones while they match the main model's own choices (then its next token: what plain
/// greedy steps give), sampled ones by speculative sampling ([`fp4_model::accept_drafts`]: each
/// token follows the main model's distribution under the request's controls).
fn speculative_step(
    model: &Qwen35,
    mtp: &Mtp,
    runner: &mut DecodeRunner,
    running: &mut [Sequence],
    group: &[usize],
    done: &mut [bool],
    stats: &Stats,
) {
    let k = runner.config().spec_tokens;
    // Per sequence: its new tokens (the drafts it kept, then the main model's own).
    let mut step = || -> Result<Vec<Vec<u32>>, RunnerError> {
        let (inputs, mut states, mut samplers) = group_parts(running, group);
        if samplers.iter().all(|(p, _)| p.temperature == 0.0) {
            // The whole step on the device (one graph replay on the GPU): only the ids come back.
            return Ok(runner.step_speculative_greedy(model, mtp, &mut states, &inputs, None)?.emitted);
        }
        runner.step_speculative_with(model, mtp, &mut states, &inputs, |drafts, hidden| {
            let logits = model.head(hidden);
            // Greedy rows pick on the device; only the ids come back.
            let mut best = Ids::new(vec![0; hidden.rows()], model.device);
            ops::argmax_rows(&logits, &mut best);
            let best = best.to_vec();
            let mut decided = Vec::with_capacity(drafts.len());
            for (b, (d, (params, sampler))) in drafts.iter().zip(samplers.iter_mut()).enumerate() {
                let r0 = b * (k + 1);
                decided.push(if params.temperature == 0.0 {
                    fp4_model::accept_greedy(d, &best[r0..r0 + k + 1])
                } else {
                    // Rows come to the host only up to the first rejected draft.
                    let controls = params.kernel();
                    let probs = |j: usize| ops::sample_probs(&ops::rows(&logits, r0 + j, r0 + j + 1), controls);
                    fp4_model::accept_drafts(d, probs, || sampler.uniform())
                });
            }
            decided
        })
    };
    match step() {
        Ok(emitted) => {
            stats.spec_verifies.fetch_add(group.len() as u64, Ordering::Relaxed);
            stats.spec_drafted.fetch_add((group.len() * k) as u64, Ordering::Relaxed);
            let kept: usize = emitted.iter().map(|e| e.len() - 1).sum();
            stats.spec_accepted.fetch_add(kept as u64, Ordering::Relaxed);
            for (b, &i) in group.iter().enumerate() {
                for &id in &emitted[b] {
                    if running[i].emit(id, None, stats) {
                        done[i] = true;
                        break;
                    }
                }
            }
        }
        Err(e) => {
            for &i in group {
                let _ = running[i].events.send(Event::Failed(format!("decode step failed: {e}")));
                done[i] = true;
            }
        }
    }
}

/// Scores every allowed start (teacher-forced on a copy of the cache), then emits the likeliest
/// as if it had been generated.
fn force_best_choice(model: &Qwen35, seq: &mut Sequence, stats: &Stats) -> Result<(), String> {
    let lse = |l: &[f32]| {
        let m = l.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        m + l.iter().map(|x| (x - m).exp()).sum::<f32>().ln()
    };
    let SeqCache::Prefill(PrefillState { cache: seq_cache, .. }) = &mut seq.cache else {
        unreachable!("choices are scored after the prompt")
    };
    let mut best: Option<(f32, usize)> = None;
    for (ci, choice) in seq.req.choices.iter().enumerate() {
        let mut cache = seq_cache.clone();
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
        seq.record(t, None, stats);
        let SeqCache::Prefill(PrefillState { cache, .. }) = &mut seq.cache else { unreachable!("still prefilling") };
        seq.logits = model.forward(&[t], cache, Logits::Last).map_err(|e| e.to_string())?.into_vec();
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
            snapshot_at: vec![],
        };
        let mut logits = vec![2.0f32, -2.0, 1.0, 3.0];
        let counts: HashMap<u32, u32> = [(1, 2), (2, 1)].into_iter().collect();
        apply_penalties(&mut logits, &req, &counts);
        assert_eq!(logits, vec![1.0, -4.0 - 0.5 - 0.5, 0.5 - 0.5 - 0.25, 3.0]);
    }

    /// The tiny synthetic model (bf16 weights, f32 compute) on the CPU.
    fn tiny_model() -> Qwen35 {
        use fp4_model::{LoadOptions, Precision, Synthetic, SyntheticFormat};
        Qwen35::load(&Synthetic::named("tiny", SyntheticFormat::Bf16, 5).unwrap(), LoadOptions::new(Precision::F32))
            .unwrap()
    }

    /// An engine without CUDA graphs; `cache_budget_bytes` besides the prefix cache's bytes.
    fn test_engine(
        model: Qwen35,
        max_num_seqs: usize,
        max_model_len: usize,
        cache_budget_bytes: usize,
        prefix_cache_bytes: usize,
    ) -> EngineHandle {
        let cfg = EngineConfig {
            max_num_seqs,
            max_model_len,
            max_waiting: 8,
            cache_budget_bytes: cache_budget_bytes + prefix_cache_bytes,
            cuda_graphs: false,
            prefix_cache_bytes,
            spec_tokens: 0,
            prefill_chunk: PREFILL_CHUNK,
        };
        start(model, cfg).unwrap()
    }

    /// A request of `max_tokens` tokens, greedy, without stop ids or snapshots.
    fn greedy_request(prompt: Vec<u32>, max_tokens: usize) -> GenRequest {
        GenRequest {
            prompt,
            sampling: SamplingParams::default(),
            penalties: Penalties::default(),
            max_tokens,
            stop_ids: vec![],
            logprobs: None,
            choices: vec![],
            snapshot_at: vec![],
        }
    }

    /// A request's tokens once it has finished (as many as it reports), or its error.
    fn outcome(rx: &mut tmpsc::UnboundedReceiver<Event>) -> Result<Vec<u32>, String> {
        let mut ids = Vec::new();
        loop {
            match rx.blocking_recv() {
                Some(Event::Token { id, .. }) => ids.push(id),
                Some(Event::Finished { completion_tokens, .. }) => {
                    assert_eq!(completion_tokens, ids.len());
                    return Ok(ids);
                }
                Some(Event::Failed(e)) => return Err(e),
                None => panic!("the engine stopped"),
            }
        }
    }

    /// Greedy outputs of `prompts` (each to `max_tokens`) through an engine whose KV pool has
    /// `kv_blocks` blocks, all submitted at once; and its preemption count.
    fn serve_all(prompts: &[Vec<u32>], max_tokens: usize, kv_blocks: usize, prefix: bool) -> (Vec<Vec<u32>>, u64) {
        let (outputs, stats) = serve_all_with(prompts, max_tokens, kv_blocks, prefix, 0, false);
        (outputs, stats.preemptions.load(Ordering::Relaxed))
    }

    /// [`serve_all`] drafting `spec_tokens` per step with the tiny model's MTP head (0: none),
    /// `in_turn`: each prompt submitted when the one before has finished; the engine's counters
    /// after.
    fn serve_all_with(
        prompts: &[Vec<u32>],
        max_tokens: usize,
        kv_blocks: usize,
        prefix: bool,
        spec_tokens: usize,
        in_turn: bool,
    ) -> (Vec<Vec<u32>>, Arc<Stats>) {
        let request = |p: &Vec<u32>| GenRequest { snapshot_at: vec![p.len()], ..greedy_request(p.clone(), max_tokens) };
        serve_requests(prompts.iter().map(request).collect(), kv_blocks, prefix, spec_tokens, in_turn)
    }

    /// The tiny model (seed 5) and its MTP head.
    fn tiny_with_head() -> (Qwen35, Option<Mtp>) {
        use fp4_model::{LoadOptions, Precision, Synthetic, SyntheticFormat};
        let src = Synthetic::named("tiny", SyntheticFormat::Bf16, 5).unwrap().with_mtp();
        let o = LoadOptions::new(Precision::F32);
        (Qwen35::load(&src, o).unwrap(), Mtp::load(&src, o).unwrap())
    }

    /// The outputs of `requests` served by the tiny model (see [`serve_all_with`]).
    fn serve_requests(
        requests: Vec<GenRequest>,
        kv_blocks: usize,
        prefix: bool,
        spec_tokens: usize,
        in_turn: bool,
    ) -> (Vec<Vec<u32>>, Arc<Stats>) {
        use fp4_model::Pools;
        let (model, head) = tiny_with_head();
        let max_num_seqs = 3;
        let c = &model.config;
        let pools = (max_num_seqs * (1 + spec_tokens) + 1) * Pools::slot_bytes(c, spec_tokens > 0)
            + (kv_blocks + 1) * Pools::block_bytes(c, KV_BLOCK, spec_tokens > 0);
        let prefix_cache_bytes = if prefix { 64 << 20 } else { 0 };
        let cfg = EngineConfig {
            max_num_seqs,
            max_model_len: 512,
            max_waiting: 8,
            cache_budget_bytes: pools + prefix_cache_bytes,
            cuda_graphs: false,
            prefix_cache_bytes,
            spec_tokens,
            prefill_chunk: PREFILL_CHUNK,
        };
        let handle = start_with_head(model, head, cfg).unwrap();
        let outputs = if in_turn {
            requests.into_iter().map(|r| outcome(&mut handle.submit(r).unwrap()).unwrap()).collect()
        } else {
            let mut receivers: Vec<_> = requests.into_iter().map(|r| handle.submit(r).unwrap()).collect();
            receivers.iter_mut().map(|rx| outcome(rx).unwrap()).collect()
        };
        let stats = handle.stats.clone();
        handle.shutdown();
        (outputs, stats)
    }

    /// A request that must not draft (logprobs) resuming from a snapshot a drafting request left
    /// decodes one token at a time with its logprobs.
    #[test]
    fn a_non_drafting_request_resumes_from_a_drafting_snapshot_without_drafting() {
        let first: Vec<u32> = (0..30).map(|i| (i * 13 + 1) % 512).collect();
        let second: Vec<u32> = first.iter().copied().chain([7, 8, 9]).collect();
        let (model, head) = tiny_with_head();
        let c = &model.config;
        let pools = 7 * fp4_model::Pools::slot_bytes(c, true) + 65 * fp4_model::Pools::block_bytes(c, KV_BLOCK, true);
        let cfg = EngineConfig {
            max_num_seqs: 2,
            max_model_len: 512,
            max_waiting: 8,
            cache_budget_bytes: pools + (64 << 20),
            cuda_graphs: false,
            prefix_cache_bytes: 64 << 20,
            spec_tokens: 2,
            prefill_chunk: PREFILL_CHUNK,
        };
        let handle = start_with_head(model, head, cfg).unwrap();
        let snap = |p: &Vec<u32>| GenRequest { snapshot_at: vec![p.len()], ..greedy_request(p.clone(), 6) };
        outcome(&mut handle.submit(snap(&first)).unwrap()).unwrap();
        let verifies = handle.stats.spec_verifies.load(Ordering::Relaxed);
        assert!(verifies > 0);
        let mut rx = handle.submit(GenRequest { logprobs: Some(2), ..snap(&second) }).unwrap();
        let mut with_logprobs = 0;
        loop {
            match rx.blocking_recv() {
                Some(Event::Token { logprob, .. }) => {
                    assert!(logprob.is_some(), "a token without its logprobs");
                    with_logprobs += 1;
                }
                Some(Event::Finished { cached_tokens, .. }) => {
                    assert_eq!(cached_tokens, first.len(), "resumed from the first request's snapshot");
                    break;
                }
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(with_logprobs, 6);
        assert_eq!(handle.stats.spec_verifies.load(Ordering::Relaxed), verifies, "it did not draft");
        handle.shutdown();
    }

    /// Sampled requests that draft with the MTP head, batched, give the single-sequence
    /// speculative sampler's tokens for their seeds (`generate_speculative`: the same draws from
    /// the same stream; its output follows the plain sampler's distribution, tested in mtp.rs).
    #[test]
    fn sampled_speculative_requests_follow_the_single_sequence_reference() {
        use fp4_model::{generate_speculative, GenerateOptions, MtpDrafter};
        let sampling = |seed| SamplingParams { temperature: 0.8, top_p: 0.9, top_k: 0, min_p: 0.0, seed };
        let prompts: Vec<Vec<u32>> = (0..3u32).map(|s| (0..9).map(|i| (i * 41 + s * 7 + 2) % 512).collect()).collect();
        let (model, head) = tiny_with_head();
        let head = head.expect("an MTP head");
        let opts = GenerateOptions { max_tokens: 16, stop_ids: vec![] };
        let want: Vec<Vec<u32>> = prompts
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let mut drafter = MtpDrafter::new(&head).unwrap();
                generate_speculative(&model, &mut drafter, p, &opts, 3, sampling(i as u64), |_| {}).unwrap().0
            })
            .collect();
        let requests = prompts
            .iter()
            .enumerate()
            .map(|(i, p)| GenRequest { sampling: sampling(i as u64), ..greedy_request(p.clone(), 16) })
            .collect();
        let (got, stats) = serve_requests(requests, 64, false, 3, false);
        assert_eq!(got, want);
        assert!(stats.spec_verifies.load(Ordering::Relaxed) > 0);
    }

    /// Greedy requests that draft with the MTP head get the tokens they get without, batched,
    /// preempted and recomputed, and resumed from prefix snapshots (which then hold the head's
    /// state too); the counters say drafts were verified.
    #[test]
    fn speculative_decoding_keeps_the_greedy_tokens() {
        let prompts: Vec<Vec<u32>> =
            (0..3u32).map(|s| (0..20 + 7 * s).map(|i| (i * 31 + s * 101 + 3) % 512).collect()).collect();
        let (plain, _) = serve_all_with(&prompts, 40, 64, false, 0, false);
        for (kv_blocks, prefix) in [(64, false), (64, true), (12, false)] {
            let (spec, stats) = serve_all_with(&prompts, 40, kv_blocks, prefix, 3, false);
            let what = format!("{kv_blocks} blocks, prefix cache {prefix}");
            assert_eq!(spec, plain, "{what}");
            let verifies = stats.spec_verifies.load(Ordering::Relaxed);
            assert!(verifies > 0, "{what}: nothing verified");
            assert_eq!(stats.spec_drafted.load(Ordering::Relaxed), 3 * verifies, "{what}");
            if kv_blocks == 12 {
                assert!(stats.preemptions.load(Ordering::Relaxed) > 0, "{what}: no preemption");
            }
        }
        // A conversation whose second turn resumes from the first's snapshot, the head's state
        // included.
        let first: Vec<u32> = (0..30).map(|i| (i * 13 + 1) % 512).collect();
        let second: Vec<u32> = first.iter().copied().chain([7, 8, 9]).collect();
        let (plain, _) = serve_all_with(&[first.clone(), second.clone()], 12, 64, false, 0, true);
        let (spec, stats) = serve_all_with(&[first, second], 12, 64, true, 2, true);
        assert_eq!(spec, plain);
        assert_eq!(stats.prefix_cached_tokens.load(Ordering::Relaxed), 30, "the second turn resumed");
        assert!(stats.spec_verifies.load(Ordering::Relaxed) > 0);
    }

    /// Sequences are admitted by the blocks their prompts need, not prompt + max_tokens; when
    /// their growth runs out of blocks the newest are preempted and recomputed, and every output
    /// is what the sequence gives with room to spare (here bit for bit; in general the recomputing
    /// prefill rounds differently from the step-by-step decode, as vLLM's recomputation does).
    /// A prompt of several prefill chunks (the LM head only after the last) gives the tokens of
    /// one forward over the whole prompt, plain and with the MTP head drafting.
    #[test]
    fn prompts_of_several_chunks_give_the_one_pass_tokens() {
        use fp4_model::{generate, GenerateOptions, Sampler};
        let prompt: Vec<u32> = (0..PREFILL_CHUNK as u32 + 200).map(|i| (i * 31 + 5) % 512).collect();
        let (model, _) = tiny_with_head();
        let mut sampler = Sampler::new(SamplingParams::default()).unwrap();
        let opts = GenerateOptions { max_tokens: 6, stop_ids: vec![] };
        let want = generate(&model, &prompt, &opts, &mut sampler, |_| {}).unwrap();
        for spec_tokens in [0, 3] {
            let (out, _) = serve_requests(vec![greedy_request(prompt.clone(), 6)], 40, false, spec_tokens, true);
            assert_eq!(out[0], want, "{spec_tokens} draft tokens");
        }
        // Chunks of 64 tokens (`--max-num-batched-tokens 64`): eight of them.
        let cfg = EngineConfig {
            max_num_seqs: 2,
            max_model_len: 1024,
            max_waiting: 8,
            cache_budget_bytes: 256 << 20,
            cuda_graphs: false,
            prefix_cache_bytes: 0,
            spec_tokens: 0,
            prefill_chunk: 64,
        };
        let handle = start(model, cfg).unwrap();
        assert_eq!(outcome(&mut handle.submit(greedy_request(prompt, 6)).unwrap()), Ok(want));
        handle.shutdown();
    }

    #[test]
    fn preempted_sequences_are_recomputed_with_the_same_output() {
        let prompts: Vec<Vec<u32>> =
            (0..3u32).map(|s| (0..20 + 7 * s).map(|i| (i * 31 + s * 101 + 3) % 512).collect()).collect();
        // 60 tokens each: 6 blocks of 16 per sequence at the end, 18 for the three; 12 in the pool.
        let (roomy, none) = serve_all(&prompts, 60, 64, false);
        assert_eq!(none, 0);
        for prefix in [false, true] {
            let (tight, preemptions) = serve_all(&prompts, 60, 12, prefix);
            assert!(preemptions > 0, "prefix cache {prefix}: no preemption in a pool too small for all three");
            assert_eq!(tight, roomy, "prefix cache {prefix}");
        }
    }

    /// The offline conversation: with prefix caching every turn resumes from the one before.
    #[test]
    fn conversation_turns_resume_from_the_turn_before() {
        for prefix in [true, false] {
            let handle = test_engine(tiny_model(), 2, 1024, 256 << 20, if prefix { 64 << 20 } else { 0 });
            let first: Vec<u32> = (0..40).map(|i| (i * 13 + 1) % 512).collect();
            let turns = conversation_ttfts(&handle, first, 4, 7, 5, 512).unwrap();
            handle.shutdown();
            assert_eq!(turns.len(), 4);
            for (t, w) in turns.iter().zip(turns.iter().skip(1)) {
                assert_eq!(w.prompt_tokens, t.prompt_tokens + 5 + 7, "reply and new message appended");
                assert_eq!(w.cached_tokens, if prefix { t.prompt_tokens } else { 0 }, "prefix caching {prefix}");
            }
            assert!(turns.iter().all(|t| t.ttft_ms > 0.0));
        }
    }

    /// Conversations four at a time (each four turns long) over a prefix cache that holds about
    /// ten snapshots, while each conversation leaves one per turn: the snapshots never exceed
    /// their budget (the least recently used go: earlier turns', finished conversations'), every
    /// turn is counted as a hit or a miss, every turn after a conversation's first resumes from
    /// its last (room for a turn's four new snapshots beside the four it resumed from), and when
    /// all is done the running sequences hold nothing.
    #[test]
    fn a_soak_of_conversations_keeps_the_prefix_cache_within_its_budget() {
        let model = tiny_model();
        let one = crate::prefix::cache_bytes(&{
            let mut c = model.new_cache();
            model.forward(&(0..60).collect::<Vec<u32>>(), &mut c, Logits::Last).unwrap();
            c
        });
        let budget = 10 * one;
        let handle = test_engine(model, 4, 1024, 64 << 20, budget);
        let mut prompts: Vec<Vec<u32>> =
            (0..12u32).map(|c| (0..40).map(|i| (i * 7 + c * 31 + 1) % 512).collect()).collect();
        let (mut requests, turns) = (0u64, 4);
        for group in prompts.chunks_mut(4) {
            for turn in 0..turns {
                // The group's four conversations in flight together.
                let mut receivers: Vec<_> = group
                    .iter()
                    .map(|p| {
                        let req = GenRequest { snapshot_at: vec![p.len()], ..greedy_request(p.clone(), 5) };
                        handle.submit(req).unwrap()
                    })
                    .collect();
                for (p, rx) in group.iter_mut().zip(&mut receivers) {
                    p.extend(outcome(rx).unwrap());
                    p.extend([turn + 2, 9]);
                    requests += 1;
                }
                let used = handle.stats.prefix_bytes.load(Ordering::Relaxed);
                assert!(used <= budget, "{used} bytes of snapshots in a budget of {budget}");
            }
        }
        let (hits, misses) =
            (handle.stats.prefix_hits.load(Ordering::Relaxed), handle.stats.prefix_misses.load(Ordering::Relaxed));
        assert_eq!((hits, misses), (requests - 12, 12), "each conversation's first turn misses, the others hit");
        assert!(handle.stats.prefix_entries.load(Ordering::Relaxed) <= 10);
        let quiet = Instant::now();
        while handle.stats.running.load(Ordering::Relaxed) > 0 && quiet.elapsed().as_secs() < 10 {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert_eq!(handle.stats.cache_bytes.load(Ordering::Relaxed), 0, "finished sequences hold nothing");
        handle.shutdown();
    }

    /// A step that panics (as a failed GPU call does) fails its requests with an error event and
    /// the engine goes on serving the next ones.
    #[test]
    fn a_failed_step_fails_its_requests_and_the_engine_goes_on() {
        let handle = test_engine(tiny_model(), 2, 256, 64 << 20, 0);
        let request = || greedy_request([&FAIL_PROMPT[..], &[3, 1, 4]].concat(), 6);
        FAIL_NEXT_DECODE.store(true, Ordering::SeqCst);
        let err = outcome(&mut handle.submit(request()).unwrap()).unwrap_err();
        assert!(err.contains("the decode step failed") && err.contains("injected failure"), "{err}");
        let served = outcome(&mut handle.submit(request()).unwrap()).map(|ids| ids.len());
        assert_eq!(served, Ok(6), "the next request is served");
        handle.shutdown();
    }

    /// Sampled requests (seeded) give the single-sequence sampler's tokens, whether their token is
    /// drawn where the logits are or from the row on the host (logprobs), and batched together.
    #[test]
    fn sampled_requests_match_the_single_sequence_sampler() {
        use fp4_model::{generate, GenerateOptions, Sampler};
        let sampling = |seed| SamplingParams { temperature: 0.8, top_p: 0.9, top_k: 0, min_p: 0.0, seed };
        let prompts: Vec<Vec<u32>> = (0..3u32).map(|s| (0..9).map(|i| (i * 41 + s * 7 + 2) % 512).collect()).collect();
        let model = tiny_model();
        let want: Vec<Vec<u32>> = prompts
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let mut sampler = Sampler::new(sampling(i as u64)).unwrap();
                generate(&model, p, &GenerateOptions { max_tokens: 12, stop_ids: vec![] }, &mut sampler, |_| {})
                    .unwrap()
            })
            .collect();
        let handle = test_engine(model, 4, 256, 64 << 20, 0);
        let mut receivers: Vec<_> = prompts
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let req = GenRequest {
                    sampling: sampling(i as u64),
                    penalties: Penalties { repetition: 1.0, ..Default::default() },
                    // The second request's rows come to the host; the others' do not.
                    logprobs: (i == 1).then_some(2),
                    ..greedy_request(p.clone(), 12)
                };
                handle.submit(req).unwrap()
            })
            .collect();
        for (rx, want) in receivers.iter_mut().zip(&want) {
            assert_eq!(&outcome(rx).unwrap(), want);
        }
        handle.shutdown();
    }

    #[test]
    fn logprobs_are_normalised() {
        let (lp, top) = logprobs(&[0.0, 1.0f32.ln(), 3.0f32.ln()], 2, 2);
        assert!((lp - (3.0f32 / 5.0).ln()).abs() < 1e-6);
        assert_eq!(top[0].0, 2);
        assert_eq!(top.len(), 2);
    }
}
