//! The decode model runner: every running sequence's state lives in [`Pools`] (GDN state slots,
//! paged KV blocks); each step runs one forward over the whole batch (weights read once per step)
//! and picks the next tokens on the device. On the GPU each batch-size bucket's step is captured
//! once as a CUDA graph and replayed: the step's inputs are device buffers the graph reads, so
//! a step costs one small upload, one graph launch and one download of the chosen ids.
//!
//! The same runner works on the CPU (eagerly), where it is the reference the GPU is tested against.

use crate::cache::{Cache, Pools};
use crate::mtp::Mtp;
use crate::qwen35::Qwen35;
use fp4_format::TextConfig;
use fp4_kernels::cpu::tokens_after_accept;
use fp4_kernels::ops::{self, BatchIndex};
use fp4_kernels::{Device, Ids, Tensor};

/// Batch sizes a step is padded to (one captured graph each).
pub const BUCKETS: [usize; 7] = [1, 2, 4, 8, 16, 32, 64];

/// Verify rows up to which a speculative step is captured as a graph: the tensor-core GEMV's
/// tokens. Past them every linear dequantizes its whole weight into a scratch buffer per call,
/// which a captured graph would hold for each linear; those steps run eagerly.
const SPEC_GRAPH_MAX_ROWS: usize = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunnerConfig {
    /// Sequences decoded together at most (≤ 64).
    pub max_seqs: usize,
    /// Longest sequence (prompt + output), in tokens.
    pub max_model_len: usize,
    /// KV blocks in the pool (shared by all sequences).
    pub kv_blocks: usize,
    /// Tokens per KV block.
    pub block_size: usize,
    /// Capture and replay CUDA graphs (GPU only); `false` runs every step eagerly.
    pub graphs: bool,
    /// Tokens drafted per speculative step (MTP), 0 for none. Each sequence then holds this many
    /// more GDN slots (a verify keeps the state after every draft) and KV blocks hold the MTP
    /// head's KV too.
    pub spec_tokens: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RunnerError {
    #[error(
        "the cache budget of {budget} bytes cannot hold {max_seqs} sequences' state ({need} bytes) and one KV block"
    )]
    BudgetTooSmall { budget: usize, max_seqs: usize, need: usize },
    #[error("all {0} sequence slots are in use")]
    NoSlot(usize),
    #[error("the KV cache is full: {need} more blocks needed, {free} free")]
    OutOfBlocks { need: usize, free: usize },
    #[error("the sequence reached the context limit of {0} tokens")]
    ContextFull(usize),
    #[error("a step of {got} sequences exceeds the runner's {max}")]
    BatchTooLarge { got: usize, max: usize },
    #[error("CUDA graph capture failed: {0}")]
    Graph(String),
    #[error("speculative decoding: {0}")]
    Speculation(String),
}

impl RunnerConfig {
    /// A runner for `max_seqs` sequences taking `budget` bytes: every sequence's GDN state slots
    /// (1 + `spec_tokens` each) plus a scratch slot first, the rest as KV blocks of `block_size`
    /// tokens (one of them scratch).
    pub fn from_budget(
        cfg: &TextConfig,
        max_seqs: usize,
        max_model_len: usize,
        block_size: usize,
        budget: usize,
        graphs: bool,
        spec_tokens: usize,
    ) -> Result<RunnerConfig, RunnerError> {
        let max_seqs = max_seqs.clamp(1, *BUCKETS.last().expect("buckets"));
        let slots = (max_seqs * (1 + spec_tokens) + 1) * Pools::slot_bytes(cfg, spec_tokens > 0);
        let block = Pools::block_bytes(cfg, block_size, spec_tokens > 0).max(1);
        if budget < slots + 2 * block {
            return Err(RunnerError::BudgetTooSmall { budget, max_seqs, need: slots + 2 * block });
        }
        let kv_blocks = (budget - slots) / block - 1;
        Ok(RunnerConfig { max_seqs, max_model_len, kv_blocks, block_size, graphs, spec_tokens })
    }

    /// GDN state slots the pools hold (the last one scratch).
    fn slots(&self) -> usize {
        self.max_seqs * (1 + self.spec_tokens) + 1
    }

    /// Device bytes the pools take.
    pub fn bytes(&self, cfg: &TextConfig) -> usize {
        self.slots() * Pools::slot_bytes(cfg, self.spec_tokens > 0)
            + (self.kv_blocks + 1) * Pools::block_bytes(cfg, self.block_size, self.spec_tokens > 0)
    }
}

/// A sequence held by the runner: its GDN slot, its KV blocks and how many tokens it has cached.
#[derive(Debug)]
pub struct SeqState {
    slot: u32,
    /// In a speculative runner: `spec_tokens` more slots, where a verify keeps the GDN state
    /// after each draft.
    spare: Vec<u32>,
    blocks: Vec<u32>,
    /// Tokens in the cache (the position of the next input token).
    pub len: usize,
    /// Its row of the MTP head's hidden pool (`Pools::mtp_hidden`: the head's normed output at
    /// position `len` − 1, the next draft's input): the slot it was admitted with, one of its
    /// own whatever the verifies swap, so no two live sequences share it.
    home: u32,
    /// Whether it drafts with the MTP head.
    speculating: bool,
}

impl SeqState {
    /// KV blocks it holds.
    pub fn blocks(&self) -> usize {
        self.blocks.len()
    }

    /// Whether it drafts with the MTP head.
    pub fn speculates(&self) -> bool {
        self.speculating
    }

    /// Stops drafting for it (it decodes one token per step from now on).
    pub fn stop_speculating(&mut self) {
        self.speculating = false;
    }
}

/// What a greedy speculative step did, per sequence: the head's guesses, and the new tokens
/// (the kept drafts, then the main model's own).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpeculativeStep {
    pub guessed: Vec<Vec<u32>>,
    pub emitted: Vec<Vec<u32>>,
}

/// One bucket's step inputs and outputs (fixed device buffers) and its captured graph.
struct Bucket {
    size: usize,
    ids: Ids,
    pos: Ids,
    slots: Ids,
    table: Ids,
    out: Ids,
    /// Each row's sampling controls (`ops::sample_rows`) for a sampled step.
    controls: Ids,
    /// The greedy step's graph and the sampled step's.
    #[cfg(feature = "cuda")]
    graph: Option<fp4_kernels::cuda::Graph>,
    #[cfg(feature = "cuda")]
    sampled_graph: Option<fp4_kernels::cuda::Graph>,
}

/// One bucket's speculative step (`size` sequences, K drafts each, `size·(1 + K)` verify rows)
/// in fixed device buffers: the drafting, the verify, the acceptance and the head over the kept
/// positions read and write only these, so the whole greedy step is one captured graph.
struct SpecBucket {
    size: usize,
    /// Each sequence's row of the head's hidden pool.
    home: Ids,
    /// Draft step i (< K − 1): the head at position len + i, over the sequence's blocks.
    draft_pos: Vec<Ids>,
    draft_table: Ids,
    /// The head's guesses of the current draft step.
    guess: Ids,
    /// The scratch GDN slot, for every head row (the head has no GDN layer).
    scratch: Ids,
    /// Verify row b·(1 + K) + j: sequence b's input (j = 0) or draft j, at position len + j,
    /// its GDN state read from `read[b]` and the state after it written to `write[row]`.
    ids: Ids,
    pos: Ids,
    table: Ids,
    read: Ids,
    write: Ids,
    /// The main model's argmax after each verify row.
    best: Ids,
    /// Per sequence: drafts kept whatever they are (> K: the greedy rule).
    force: Ids,
    /// The head's ids at the verified positions and each sequence's row of its output to keep.
    head_ids: Ids,
    picks: Ids,
    /// Per sequence: its K drafts, how many it kept, the main model's next token.
    out: Ids,
    #[cfg(feature = "cuda")]
    graph: Option<fp4_kernels::cuda::Graph>,
}

impl SpecBucket {
    fn new(size: usize, k: usize, max_blocks: usize, scratch: u32, device: Device) -> SpecBucket {
        let ids = |n: usize| Ids::new(vec![0; n], device);
        let rows = size * (1 + k);
        SpecBucket {
            size,
            home: ids(size),
            draft_pos: (0..k.saturating_sub(1)).map(|_| ids(size)).collect(),
            draft_table: ids(size * max_blocks),
            guess: ids(size),
            scratch: Ids::new(vec![scratch; rows], device),
            ids: ids(rows),
            pos: ids(rows),
            table: ids(rows * max_blocks),
            read: ids(size),
            write: ids(rows),
            best: ids(rows),
            force: ids(size),
            head_ids: ids(rows),
            picks: ids(size),
            out: ids(size * (k + 2)),
            #[cfg(feature = "cuda")]
            graph: None,
        }
    }
}

pub struct DecodeRunner {
    cfg: RunnerConfig,
    device: Device,
    pools: Pools,
    free_slots: Vec<u32>,
    free_blocks: Vec<u32>,
    max_blocks: usize,
    scratch_slot: u32,
    scratch_block: u32,
    buckets: Vec<Bucket>,
    /// The speculative step's buckets (none without drafts).
    spec: Vec<SpecBucket>,
    /// Drafts every speculative step keeps whatever they are (benchmarks only).
    forced_kept: Option<usize>,
    /// Steps replayed from a captured graph / run eagerly.
    pub graph_replays: u64,
    pub eager_steps: u64,
    /// Programmatic (PDL) edges of the largest graph captured so far.
    pub programmatic_edges: usize,
}

impl DecodeRunner {
    pub fn new(model: &Qwen35, cfg: RunnerConfig) -> DecodeRunner {
        let device = model.device;
        let slots = cfg.slots();
        let pools = Pools::new(&model.config, slots, cfg.kv_blocks + 1, cfg.block_size, cfg.spec_tokens > 0, device);
        // A table row never needs more entries than the pool has blocks (a long --max-model-len
        // with a small budget would otherwise upload mostly padding every step).
        let max_blocks = cfg.max_model_len.div_ceil(cfg.block_size).min(cfg.kv_blocks).max(1);
        let top = BUCKETS.iter().copied().find(|&b| b >= cfg.max_seqs).unwrap_or(BUCKETS[BUCKETS.len() - 1]);
        let buckets = BUCKETS
            .iter()
            .filter(|&&b| b <= top)
            .map(|&size| Bucket {
                size,
                ids: Ids::new(vec![0; size], device),
                pos: Ids::new(vec![0; size], device),
                slots: Ids::new(vec![slots as u32 - 1; size], device),
                table: Ids::new(vec![cfg.kv_blocks as u32; size * max_blocks], device),
                out: Ids::new(vec![0; size], device),
                controls: Ids::new(vec![0; size * ops::SAMPLE_CONTROLS], device),
                #[cfg(feature = "cuda")]
                graph: None,
                #[cfg(feature = "cuda")]
                sampled_graph: None,
            })
            .collect();
        let spec = match cfg.spec_tokens {
            0 => Vec::new(),
            k => BUCKETS
                .iter()
                .filter(|&&b| b <= top)
                .map(|&size| SpecBucket::new(size, k, max_blocks, slots as u32 - 1, device))
                .collect(),
        };
        DecodeRunner {
            device,
            pools,
            spec,
            forced_kept: None,
            free_slots: (0..slots as u32 - 1).rev().collect(),
            free_blocks: (0..cfg.kv_blocks as u32).rev().collect(),
            max_blocks,
            scratch_slot: slots as u32 - 1,
            scratch_block: cfg.kv_blocks as u32,
            buckets,
            cfg,
            graph_replays: 0,
            eager_steps: 0,
            programmatic_edges: 0,
        }
    }

    pub fn config(&self) -> RunnerConfig {
        self.cfg
    }

    pub fn free_blocks(&self) -> usize {
        self.free_blocks.len()
    }

    pub fn free_slots(&self) -> usize {
        self.free_slots.len()
    }

    /// KV blocks a sequence of `tokens` tokens occupies.
    pub fn blocks_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.cfg.block_size)
    }

    /// Takes over a prefilled sequence: its cache moves into a free slot and enough KV blocks.
    pub fn admit(&mut self, cache: &Cache) -> Result<SeqState, RunnerError> {
        if cache.seq_len >= self.cfg.max_model_len {
            return Err(RunnerError::ContextFull(self.cfg.max_model_len));
        }
        let need = self.blocks_for(cache.seq_len + 1);
        if need > self.free_blocks.len() {
            return Err(RunnerError::OutOfBlocks { need, free: self.free_blocks.len() });
        }
        if self.free_slots.len() < 1 + self.cfg.spec_tokens {
            return Err(RunnerError::NoSlot(self.cfg.max_seqs));
        }
        let slot = self.free_slots.pop().expect("checked");
        let spare = (0..self.cfg.spec_tokens).map(|_| self.free_slots.pop().expect("checked")).collect();
        let blocks: Vec<u32> = (0..need).map(|_| self.free_blocks.pop().expect("checked")).collect();
        self.pools.store(cache, slot as usize, &blocks);
        Ok(SeqState { slot, home: slot, spare, blocks, len: cache.seq_len, speculating: false })
    }

    /// [`DecodeRunner::admit`] for a sequence that drafts with the MTP head: `mtp` is the head's
    /// cache over every position of `cache` (position i read token i + 1; the last one, the first
    /// output token) and `last` the head's output at the last position.
    pub fn admit_speculative(
        &mut self,
        cache: &Cache,
        mtp: &crate::MtpCache,
        last: Tensor,
    ) -> Result<SeqState, RunnerError> {
        if self.cfg.spec_tokens == 0 || mtp.seq_len != cache.seq_len || last.rows() != 1 {
            return Err(RunnerError::Speculation(format!(
                "a speculating sequence needs a runner with drafts ({}) and the head's cache over every position ({} of {})",
                self.cfg.spec_tokens, mtp.seq_len, cache.seq_len
            )));
        }
        let mut seq = self.admit(cache)?;
        self.pools.store_mtp(mtp.layer(), &seq.blocks);
        let hidden = self.pools.mtp_hidden.as_mut().expect("a speculative runner has the head's hidden pool");
        ops::write_rows(hidden, seq.home as usize, &last);
        seq.speculating = true;
        Ok(seq)
    }

    /// Gives a finished sequence's slots and blocks back.
    pub fn release(&mut self, seq: SeqState) {
        self.free_slots.push(seq.slot);
        self.free_slots.extend(seq.spare);
        self.free_blocks.extend(seq.blocks);
    }

    /// Fills the smallest bucket that holds `seqs` with their inputs (taking KV blocks where a
    /// sequence crosses into a new one); returns the bucket's index.
    fn prepare(&mut self, seqs: &mut [&mut SeqState], inputs: &[u32]) -> Result<usize, RunnerError> {
        let n = seqs.len();
        assert_eq!(n, inputs.len(), "one input token per sequence");
        let bi = self
            .buckets
            .iter()
            .position(|b| b.size >= n)
            .filter(|_| n <= self.cfg.max_seqs)
            .ok_or(RunnerError::BatchTooLarge { got: n, max: self.cfg.max_seqs })?;
        for s in seqs.iter_mut() {
            let end = s.len + 1;
            self.reserve(s, end)?;
        }
        let size = self.buckets[bi].size;
        let mb = self.max_blocks;
        let mut ids = vec![0u32; size];
        let mut pos = vec![0u32; size];
        let mut slots = vec![self.scratch_slot; size];
        let mut table = vec![self.scratch_block; size * mb];
        for (i, s) in seqs.iter().enumerate() {
            ids[i] = inputs[i];
            pos[i] = s.len as u32;
            slots[i] = s.slot;
            table[i * mb..i * mb + s.blocks.len()].copy_from_slice(&s.blocks);
        }
        let b = &mut self.buckets[bi];
        b.ids.write(&ids);
        b.pos.write(&pos);
        b.slots.write(&slots);
        b.table.write(&table);
        Ok(bi)
    }

    /// One greedy decode step: sequence i takes `inputs[i]` and gets its next token back.
    pub fn step_greedy(
        &mut self,
        model: &Qwen35,
        seqs: &mut [&mut SeqState],
        inputs: &[u32],
    ) -> Result<Vec<u32>, RunnerError> {
        let bi = self.prepare(seqs, inputs)?;
        self.step_on_device(model, seqs, bi, false)
    }

    /// One decode step with each sequence's token picked on the device by its own sampling
    /// controls (`controls[i]`: [`crate::Sampler::next_controls`], the draw its sampler would make
    /// on the host): greedy rows take the argmax, sampled rows follow `cpu::sample`. Graph-replayed
    /// like [`DecodeRunner::step_greedy`]; only the ids come back.
    pub fn step_sampled(
        &mut self,
        model: &Qwen35,
        seqs: &mut [&mut SeqState],
        inputs: &[u32],
        controls: &[[u32; ops::SAMPLE_CONTROLS]],
    ) -> Result<Vec<u32>, RunnerError> {
        assert_eq!(controls.len(), seqs.len(), "one set of controls per sequence");
        let bi = self.prepare(seqs, inputs)?;
        // Padding rows are greedy (temperature 0).
        let mut words = vec![0u32; self.buckets[bi].size * ops::SAMPLE_CONTROLS];
        words[..controls.len() * ops::SAMPLE_CONTROLS].copy_from_slice(controls.as_flattened());
        self.buckets[bi].controls.write(&words);
        self.step_on_device(model, seqs, bi, true)
    }

    /// The step of prepared bucket `bi`, its tokens picked on the device (argmax, or each row's
    /// controls when `sampled`), replayed from its graph or eagerly; the sequences advance.
    fn step_on_device(
        &mut self,
        model: &Qwen35,
        seqs: &mut [&mut SeqState],
        bi: usize,
        sampled: bool,
    ) -> Result<Vec<u32>, RunnerError> {
        if self.cfg.graphs && self.device == Device::Cuda {
            self.replay(model, bi, sampled)?;
            self.graph_replays += 1;
        } else {
            let logits = self.forward(model, bi);
            let b = &mut self.buckets[bi];
            if sampled {
                ops::sample_rows(&logits, &b.controls, &mut b.out);
            } else {
                ops::argmax_rows(&logits, &mut b.out);
            }
            self.eager_steps += 1;
        }
        let out = self.buckets[bi].out.to_vec();
        for s in seqs.iter_mut() {
            s.len += 1;
        }
        Ok(out[..seqs.len()].to_vec())
    }

    /// One decode step returning the logits `[n, vocab]` (eager; for sampling, penalties and
    /// logprobs, which pick tokens on the host).
    pub fn step_logits(
        &mut self,
        model: &Qwen35,
        seqs: &mut [&mut SeqState],
        inputs: &[u32],
    ) -> Result<Tensor, RunnerError> {
        let n = seqs.len();
        let bi = self.prepare(seqs, inputs)?;
        let logits = self.forward(model, bi);
        self.eager_steps += 1;
        for s in seqs.iter_mut() {
            s.len += 1;
        }
        Ok(if self.buckets[bi].size == n { logits } else { ops::rows(&logits, 0, n) })
    }

    /// Whether `seq` drafts in the next step: it speculates and a verify's `1 + spec_tokens`
    /// positions fit in the context.
    pub fn can_speculate(&self, seq: &SeqState) -> bool {
        seq.speculates() && seq.len + 1 + self.cfg.spec_tokens <= self.cfg.max_model_len
    }

    /// KV blocks `seq` takes before its next step (`rows` positions from its length).
    pub fn blocks_to_grow(&self, seq: &SeqState, rows: usize) -> usize {
        self.blocks_for(seq.len + rows).saturating_sub(seq.blocks.len())
    }

    /// Takes KV blocks for `seq` up to position `end` (exclusive).
    fn reserve(&mut self, seq: &mut SeqState, end: usize) -> Result<(), RunnerError> {
        if end > self.cfg.max_model_len {
            return Err(RunnerError::ContextFull(self.cfg.max_model_len));
        }
        let need = self.blocks_for(end);
        while seq.blocks.len() < need {
            let free = self.free_blocks.len();
            let b = self.free_blocks.pop().ok_or(RunnerError::OutOfBlocks { need: need - seq.blocks.len(), free })?;
            seq.blocks.push(b);
        }
        Ok(())
    }

    fn check_speculating(&self, seqs: &[&mut SeqState]) -> Result<(), RunnerError> {
        if seqs.len() > self.cfg.max_seqs {
            return Err(RunnerError::BatchTooLarge { got: seqs.len(), max: self.cfg.max_seqs });
        }
        if let Some(s) = seqs.iter().find(|s| !self.can_speculate(s)) {
            return Err(RunnerError::Speculation(format!(
                "a sequence of {} tokens cannot draft {} more (speculating: {}, context {})",
                s.len,
                self.cfg.spec_tokens,
                s.speculates(),
                self.cfg.max_model_len
            )));
        }
        Ok(())
    }

    /// Fills the smallest speculative bucket that holds `seqs` (every one speculating) for a
    /// step from `inputs` (taking the KV blocks its verify needs); returns the bucket's index.
    /// Padding sequences name the scratch slot and block.
    fn prepare_speculative(&mut self, seqs: &mut [&mut SeqState], inputs: &[u32]) -> Result<usize, RunnerError> {
        self.check_speculating(seqs)?;
        let (n, k, mb) = (seqs.len(), self.cfg.spec_tokens, self.max_blocks);
        assert_eq!(n, inputs.len(), "one input token per sequence");
        let bi = self.spec.iter().position(|b| b.size >= n).expect("a bucket holds max_seqs");
        for s in seqs.iter_mut() {
            let end = s.len + 1 + k;
            self.reserve(s, end)?;
        }
        let (size, scratch, scratch_block) = (self.spec[bi].size, self.scratch_slot, self.scratch_block);
        let rows = size * (1 + k);
        let (mut ids, mut pos, mut write) = (vec![0u32; rows], vec![0u32; rows], vec![scratch; rows]);
        let mut table = vec![scratch_block; rows * mb];
        let (mut home, mut read) = (vec![scratch; size], vec![scratch; size]);
        let mut draft_pos = vec![vec![0u32; size]; k.saturating_sub(1)];
        let mut draft_table = vec![scratch_block; size * mb];
        for (b, s) in seqs.iter().enumerate() {
            home[b] = s.home;
            read[b] = s.slot;
            ids[b * (1 + k)] = inputs[b];
            draft_table[b * mb..b * mb + s.blocks.len()].copy_from_slice(&s.blocks);
            for j in 0..=k {
                let r = b * (1 + k) + j;
                pos[r] = (s.len + j) as u32;
                write[r] = if j == 0 { s.slot } else { s.spare[j - 1] };
                table[r * mb..r * mb + s.blocks.len()].copy_from_slice(&s.blocks);
            }
            for (i, p) in draft_pos.iter_mut().enumerate() {
                p[b] = (s.len + i) as u32;
            }
        }
        let force = self.forced_kept.map_or(u32::MAX, |m| m.min(k) as u32);
        let sb = &mut self.spec[bi];
        sb.home.write(&home);
        for (buf, p) in sb.draft_pos.iter_mut().zip(&draft_pos) {
            buf.write(p);
        }
        sb.draft_table.write(&draft_table);
        sb.ids.write(&ids);
        sb.pos.write(&pos);
        sb.table.write(&table);
        sb.read.write(&read);
        sb.write.write(&write);
        sb.force.write(&vec![force; size]);
        Ok(bi)
    }

    /// Benchmarks on random weights (whose head guesses nothing the model agrees with): every
    /// later speculative step keeps `kept` drafts per sequence whatever they are (`None`: the
    /// greedy rule). The step still does all of its work.
    pub fn force_acceptance_for_benchmark(&mut self, kept: Option<usize>) {
        self.forced_kept = kept;
    }

    /// The drafting of bucket `bi`: `spec_tokens` greedy guesses per sequence from the MTP head,
    /// each fed back with the head's own output, written into the verify's rows.
    fn draft_phase(&mut self, model: &Qwen35, mtp: &Mtp, bi: usize) {
        let (k, max_blocks, block_size) = (self.cfg.spec_tokens, self.max_blocks, self.cfg.block_size);
        let sb = &mut self.spec[bi];
        let Pools { mtp: Some(pool), mtp_hidden: Some(hidden), .. } = &mut self.pools else {
            unreachable!("a speculative runner has the MTP head's pools")
        };
        let mut g = ops::embedding_ids(hidden, &sb.home);
        for i in 0..k {
            ops::argmax_rows(&mtp.draft_logits(model, &g), &mut sb.guess);
            ops::write_ids_strided(&mut sb.ids, &sb.guess, 1 + i, 1 + k);
            if i + 1 < k {
                let index = BatchIndex {
                    pos: &sb.draft_pos[i],
                    slots: &sb.scratch,
                    slots_out: &sb.scratch,
                    rows_per_seq: 1,
                    table: &sb.draft_table,
                    max_blocks,
                    block_size,
                };
                g = mtp.decode(model, &sb.guess, &g, index, pool);
            }
        }
    }

    /// The verify of bucket `bi`: the main model over every sequence's input and drafts; the
    /// final-normed hidden rows `[size·(1 + K), H]`.
    fn verify_phase(&mut self, model: &Qwen35, bi: usize) -> Tensor {
        let sb = &self.spec[bi];
        let index = BatchIndex {
            pos: &sb.pos,
            slots: &sb.read,
            slots_out: &sb.write,
            rows_per_seq: 1 + self.cfg.spec_tokens,
            table: &sb.table,
            max_blocks: self.max_blocks,
            block_size: self.cfg.block_size,
        };
        model.decode_normed(&sb.ids, index, &mut self.pools)
    }

    /// Greedy acceptance of bucket `bi`'s verify on the device: the main model's argmax per row,
    /// then each sequence's kept drafts and next token (`out`), the head's ids and picked rows.
    fn accept_phase(&mut self, model: &Qwen35, bi: usize, hidden: &Tensor) {
        let sb = &mut self.spec[bi];
        ops::argmax_rows(&model.head(hidden), &mut sb.best);
        let k = self.cfg.spec_tokens;
        ops::accept_greedy_rows(&sb.ids, &sb.best, k, &sb.force, &mut sb.head_ids, &mut sb.picks, &mut sb.out);
    }

    /// The MTP head over bucket `bi`'s verified positions (position len + j reads the token
    /// after it: a kept draft, then the main model's own; rows past a sequence's kept drafts
    /// write KV the next step overwrites before anything reads it), and each sequence's head
    /// output at its last kept position into the hidden pool: the next draft's input.
    fn head_phase(&mut self, model: &Qwen35, mtp: &Mtp, bi: usize, hidden: &Tensor) {
        let sb = &self.spec[bi];
        let index = BatchIndex {
            pos: &sb.pos,
            slots: &sb.scratch,
            slots_out: &sb.scratch,
            rows_per_seq: 1,
            table: &sb.table,
            max_blocks: self.max_blocks,
            block_size: self.cfg.block_size,
        };
        let Pools { mtp: Some(pool), mtp_hidden: Some(pool_hidden), .. } = &mut self.pools else {
            unreachable!("a speculative runner has the MTP head's pools")
        };
        let g = mtp.decode(model, &sb.head_ids, hidden, index, pool);
        ops::scatter_rows(pool_hidden, &sb.home, &g, &sb.picks);
    }

    /// Commits a step's acceptance: sequence b kept `kept[b]` drafts, so its cache takes its
    /// input and those drafts, with the GDN state after the last of them (no recompute: the
    /// verify kept it in a spare slot).
    fn commit(seqs: &mut [&mut SeqState], kept: &[usize]) {
        for (s, &m) in seqs.iter_mut().zip(kept) {
            if m > 0 {
                std::mem::swap(&mut s.slot, &mut s.spare[m - 1]);
            }
            s.len += m + 1;
        }
    }

    /// One speculative step whose acceptance the host decides (sampled requests), eagerly: the
    /// head's drafts and the verify as in [`DecodeRunner::step_speculative_greedy`], then
    /// `decide(drafts, hidden)` — each sequence's drafts and the verify's final-normed hidden rows
    /// (sequence b's at `b·(1 + K) ..`, padding rows after the last sequence's; logits:
    /// [`Qwen35::head`]) — gives each sequence's kept drafts and the main model's token after
    /// them. The head then sees the verified positions and the sequences advance (the GDN state
    /// after the last kept row, no recompute). Returns each sequence's new tokens.
    pub fn step_speculative_with(
        &mut self,
        model: &Qwen35,
        mtp: &Mtp,
        seqs: &mut [&mut SeqState],
        inputs: &[u32],
        decide: impl FnOnce(&[Vec<u32>], &Tensor) -> Vec<(usize, u32)>,
    ) -> Result<Vec<Vec<u32>>, RunnerError> {
        let (n, k) = (seqs.len(), self.cfg.spec_tokens);
        let bi = self.prepare_speculative(seqs, inputs)?;
        self.draft_phase(model, mtp, bi);
        let drafts = Self::drafts_of(&self.spec[bi].ids.to_vec(), n, k);
        let hidden = self.verify_phase(model, bi);
        self.eager_steps += k as u64 + 1;
        let decided = decide(&drafts, &hidden);
        if decided.len() != n || decided.iter().any(|&(m, _)| m > k) {
            return Err(RunnerError::Speculation(format!("{n} sequences with {k} drafts each: {decided:?} kept")));
        }
        let size = self.spec[bi].size;
        let (mut ids, mut picks) = (vec![0u32; size * (1 + k)], vec![0u32; size]);
        for (b, &(m, next)) in decided.iter().enumerate() {
            for (slot, id) in
                ids[b * (1 + k)..(b + 1) * (1 + k)].iter_mut().zip(tokens_after_accept(&drafts[b], m, next))
            {
                *slot = id;
            }
            picks[b] = (b * (1 + k) + m) as u32;
        }
        self.spec[bi].head_ids.write(&ids);
        self.spec[bi].picks.write(&picks);
        self.head_phase(model, mtp, bi, &hidden);
        let kept: Vec<usize> = decided.iter().map(|d| d.0).collect();
        Self::commit(seqs, &kept);
        Ok(drafts
            .iter()
            .zip(&decided)
            .map(|(d, &(m, next))| tokens_after_accept(d, m, next).take(m + 1).collect())
            .collect())
    }

    /// Prefills `prompt` on its own (the model, then the MTP head over every position), picks
    /// the first token greedily and admits the sequence to draft: its state and first token.
    pub fn prefill_speculative(
        &mut self,
        model: &Qwen35,
        mtp: &Mtp,
        prompt: &[u32],
    ) -> Result<(SeqState, u32), RunnerError> {
        let failed = |e: crate::ModelError| RunnerError::Speculation(e.to_string());
        let mut cache = model.new_cache();
        let h = model.forward_normed(prompt, &mut cache, crate::Logits::All).map_err(failed)?;
        let mut first = Ids::new(vec![0], self.device);
        ops::argmax_rows(&model.head(&ops::last_row(&h)), &mut first);
        let first = first.to_vec()[0];
        let next: Vec<u32> = prompt[1..].iter().copied().chain([first]).collect();
        let mut head_cache = mtp.new_cache();
        let g = mtp.forward(model, &next, &h, &mut head_cache).map_err(failed)?;
        Ok((self.admit_speculative(&cache, &head_cache, ops::last_row(&g))?, first))
    }

    /// One greedy speculative step of `seqs` (inputs: each one's last token): the head's
    /// drafts (or `drafts` in their place: a test's oracle), the verify, each sequence keeping
    /// the drafts that match the main model's own choices, then its next token; all of it on
    /// the device, as one replayed CUDA graph per bucket on the GPU. Returns the head's guesses
    /// and each sequence's new tokens: what plain greedy steps give.
    pub fn step_speculative_greedy(
        &mut self,
        model: &Qwen35,
        mtp: &Mtp,
        seqs: &mut [&mut SeqState],
        inputs: &[u32],
        drafts: Option<Vec<Vec<u32>>>,
    ) -> Result<SpeculativeStep, RunnerError> {
        let k = self.cfg.spec_tokens;
        let bi = self.prepare_speculative(seqs, inputs)?;
        let mut guessed = None;
        let graph_rows = self.spec[bi].size * (1 + k) <= SPEC_GRAPH_MAX_ROWS;
        if self.cfg.graphs && self.device == Device::Cuda && drafts.is_none() && graph_rows {
            self.replay_speculative(model, mtp, bi)?;
            self.graph_replays += 1;
        } else {
            self.draft_phase(model, mtp, bi);
            if let Some(oracle) = drafts {
                // The head's guesses are reported; the oracle's are verified.
                let mut ids = self.spec[bi].ids.to_vec();
                guessed = Some(Self::drafts_of(&ids, seqs.len(), k));
                for (b, d) in oracle.iter().enumerate().take(seqs.len()) {
                    ids[b * (1 + k) + 1..(b + 1) * (1 + k)].copy_from_slice(d);
                }
                self.spec[bi].ids.write(&ids);
            }
            let hidden = self.verify_phase(model, bi);
            self.accept_phase(model, bi, &hidden);
            self.head_phase(model, mtp, bi, &hidden);
            self.eager_steps += 1;
        }
        let out = self.spec[bi].out.to_vec();
        let per = |b: usize| &out[b * (k + 2)..(b + 1) * (k + 2)];
        let kept: Vec<usize> = (0..seqs.len()).map(|b| per(b)[k] as usize).collect();
        let emitted = (0..seqs.len())
            .map(|b| tokens_after_accept(&per(b)[..k], kept[b], per(b)[k + 1]).take(kept[b] + 1).collect())
            .collect();
        let guessed = guessed.unwrap_or_else(|| (0..seqs.len()).map(|b| per(b)[..k].to_vec()).collect());
        Self::commit(seqs, &kept);
        Ok(SpeculativeStep { guessed, emitted })
    }

    /// Each sequence's drafts from a verify's ids (`1 + k` rows per sequence).
    fn drafts_of(ids: &[u32], n: usize, k: usize) -> Vec<Vec<u32>> {
        (0..n).map(|b| ids[b * (1 + k) + 1..(b + 1) * (1 + k)].to_vec()).collect()
    }

    #[cfg(feature = "cuda")]
    fn replay_speculative(&mut self, model: &Qwen35, mtp: &Mtp, bi: usize) -> Result<(), RunnerError> {
        if self.spec[bi].graph.is_none() {
            let g = fp4_kernels::cuda::gpu();
            let captured = g.capture(|| {
                self.draft_phase(model, mtp, bi);
                let hidden = self.verify_phase(model, bi);
                self.accept_phase(model, bi, &hidden);
                self.head_phase(model, mtp, bi, &hidden);
                Ok(())
            });
            let captured = captured.map_err(|e| RunnerError::Graph(e.to_string()))?;
            self.programmatic_edges = self.programmatic_edges.max(captured.programmatic_edges());
            self.spec[bi].graph = Some(captured);
        }
        let graph = self.spec[bi].graph.as_ref().expect("captured above");
        graph.launch().map_err(|e| RunnerError::Graph(e.to_string()))
    }

    #[cfg(not(feature = "cuda"))]
    fn replay_speculative(&mut self, _model: &Qwen35, _mtp: &Mtp, _bi: usize) -> Result<(), RunnerError> {
        unreachable!("GPU runners need the cuda feature")
    }

    fn forward(&mut self, model: &Qwen35, bi: usize) -> Tensor {
        let b = &self.buckets[bi];
        let index = BatchIndex {
            pos: &b.pos,
            slots: &b.slots,
            slots_out: &b.slots,
            rows_per_seq: 1,
            table: &b.table,
            max_blocks: self.max_blocks,
            block_size: self.cfg.block_size,
        };
        model.decode(&b.ids, index, &mut self.pools)
    }

    #[cfg(feature = "cuda")]
    fn replay(&mut self, model: &Qwen35, bi: usize, sampled: bool) -> Result<(), RunnerError> {
        let g = fp4_kernels::cuda::gpu();
        let (max_blocks, block_size) = (self.max_blocks, self.cfg.block_size);
        let Bucket { ids, pos, slots, table, out, controls, graph, sampled_graph, .. } = &mut self.buckets[bi];
        let graph = if sampled { sampled_graph } else { graph };
        if graph.is_none() {
            let pools = &mut self.pools;
            let captured = g.capture(|| {
                let index = BatchIndex { pos, slots, slots_out: slots, rows_per_seq: 1, table, max_blocks, block_size };
                let logits = model.decode(ids, index, pools);
                if sampled {
                    ops::sample_rows(&logits, controls, out);
                } else {
                    ops::argmax_rows(&logits, out);
                }
                Ok(())
            });
            let captured = captured.map_err(|e| RunnerError::Graph(e.to_string()))?;
            self.programmatic_edges = self.programmatic_edges.max(captured.programmatic_edges());
            *graph = Some(captured);
        }
        graph.as_ref().expect("captured above").launch().map_err(|e| RunnerError::Graph(e.to_string()))
    }

    #[cfg(not(feature = "cuda"))]
    fn replay(&mut self, _model: &Qwen35, _bi: usize, _sampled: bool) -> Result<(), RunnerError> {
        unreachable!("GPU runners need the cuda feature")
    }

    /// Sets a sequence's cached length without computing it (benchmarks of decode at a given
    /// context depth: the KV contents do not change the time a step takes).
    pub fn set_len_for_benchmark(&mut self, seq: &mut SeqState, len: usize) -> Result<(), RunnerError> {
        self.reserve(seq, len + 1)?;
        seq.len = len;
        Ok(())
    }
}
