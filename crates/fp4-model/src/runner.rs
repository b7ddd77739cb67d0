//! The decode model runner: every running sequence's state lives in [`Pools`] (GDN state slots,
//! paged KV blocks); each step runs one forward over the whole batch (weights read once per step)
//! and picks the next tokens on the device. On the GPU each batch-size bucket's step is captured
//! once as a CUDA graph and replayed: the step's inputs are device buffers the graph reads, so
//! a step costs one small upload, one graph launch and one download of the chosen ids.
//!
//! The same runner works on the CPU (eagerly), where it is the reference the GPU is tested against.

use crate::cache::{Cache, Pools};
use crate::qwen35::Qwen35;
use fp4_format::TextConfig;
use fp4_kernels::ops::{self, BatchIndex};
use fp4_kernels::{Device, Ids, Tensor};

/// Batch sizes a step is padded to (one captured graph each).
pub const BUCKETS: [usize; 7] = [1, 2, 4, 8, 16, 32, 64];

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
}

impl RunnerConfig {
    /// A runner for `max_seqs` sequences taking `budget` bytes: every sequence's GDN state slot
    /// plus a scratch slot first, the rest as KV blocks of `block_size` tokens (one of them
    /// scratch).
    pub fn from_budget(
        cfg: &TextConfig,
        max_seqs: usize,
        max_model_len: usize,
        block_size: usize,
        budget: usize,
        graphs: bool,
    ) -> Result<RunnerConfig, RunnerError> {
        let max_seqs = max_seqs.clamp(1, *BUCKETS.last().expect("buckets"));
        let slots = (max_seqs + 1) * Pools::slot_bytes(cfg);
        let block = Pools::block_bytes(cfg, block_size).max(1);
        if budget < slots + 2 * block {
            return Err(RunnerError::BudgetTooSmall { budget, max_seqs, need: slots + 2 * block });
        }
        let kv_blocks = (budget - slots) / block - 1;
        Ok(RunnerConfig { max_seqs, max_model_len, kv_blocks, block_size, graphs })
    }

    /// Device bytes the pools take.
    pub fn bytes(&self, cfg: &TextConfig) -> usize {
        (self.max_seqs + 1) * Pools::slot_bytes(cfg) + (self.kv_blocks + 1) * Pools::block_bytes(cfg, self.block_size)
    }
}

/// A sequence held by the runner: its GDN slot, its KV blocks and how many tokens it has cached.
#[derive(Debug)]
pub struct SeqState {
    slot: u32,
    blocks: Vec<u32>,
    /// Tokens in the cache (the position of the next input token).
    pub len: usize,
}

impl SeqState {
    /// KV blocks it holds.
    pub fn blocks(&self) -> usize {
        self.blocks.len()
    }

    /// Whether its next step takes a new KV block (its next position starts one).
    pub fn needs_block(&self, block_size: usize) -> bool {
        self.blocks.len() * block_size <= self.len
    }
}

/// One bucket's step inputs and outputs (fixed device buffers) and its captured graph.
struct Bucket {
    size: usize,
    ids: Ids,
    pos: Ids,
    slots: Ids,
    table: Ids,
    out: Ids,
    #[cfg(feature = "cuda")]
    graph: Option<fp4_kernels::cuda::Graph>,
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
    /// Steps replayed from a captured graph / run eagerly.
    pub graph_replays: u64,
    pub eager_steps: u64,
    /// Programmatic (PDL) edges of the largest graph captured so far.
    pub programmatic_edges: usize,
}

impl DecodeRunner {
    pub fn new(model: &Qwen35, cfg: RunnerConfig) -> DecodeRunner {
        let device = model.device;
        let pools = Pools::new(&model.config, cfg.max_seqs + 1, cfg.kv_blocks + 1, cfg.block_size, device);
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
                slots: Ids::new(vec![cfg.max_seqs as u32; size], device),
                table: Ids::new(vec![cfg.kv_blocks as u32; size * max_blocks], device),
                out: Ids::new(vec![0; size], device),
                #[cfg(feature = "cuda")]
                graph: None,
            })
            .collect();
        DecodeRunner {
            device,
            pools,
            free_slots: (0..cfg.max_seqs as u32).rev().collect(),
            free_blocks: (0..cfg.kv_blocks as u32).rev().collect(),
            max_blocks,
            scratch_slot: cfg.max_seqs as u32,
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
        let slot = self.free_slots.pop().ok_or(RunnerError::NoSlot(self.cfg.max_seqs))?;
        let blocks: Vec<u32> = (0..need).map(|_| self.free_blocks.pop().expect("checked")).collect();
        self.pools.store(cache, slot as usize, &blocks);
        Ok(SeqState { slot, blocks, len: cache.seq_len })
    }

    /// Gives a finished sequence's slot and blocks back.
    pub fn release(&mut self, seq: SeqState) {
        self.free_slots.push(seq.slot);
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
            if s.len >= self.cfg.max_model_len {
                return Err(RunnerError::ContextFull(self.cfg.max_model_len));
            }
            while s.needs_block(self.cfg.block_size) {
                let b = self.free_blocks.pop().ok_or(RunnerError::OutOfBlocks { need: 1, free: 0 })?;
                s.blocks.push(b);
            }
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
        if self.cfg.graphs && self.device == Device::Cuda {
            self.replay(model, bi)?;
            self.graph_replays += 1;
        } else {
            let logits = self.forward(model, bi);
            ops::argmax_rows(&logits, &mut self.buckets[bi].out);
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
    fn replay(&mut self, model: &Qwen35, bi: usize) -> Result<(), RunnerError> {
        let g = fp4_kernels::cuda::gpu();
        let (max_blocks, block_size) = (self.max_blocks, self.cfg.block_size);
        let Bucket { ids, pos, slots, table, out, graph, .. } = &mut self.buckets[bi];
        if graph.is_none() {
            let pools = &mut self.pools;
            let captured = g.capture(|| {
                let index = BatchIndex { pos, slots, slots_out: slots, rows_per_seq: 1, table, max_blocks, block_size };
                let logits = model.decode(ids, index, pools);
                ops::argmax_rows(&logits, out);
                Ok(())
            });
            let captured = captured.map_err(|e| RunnerError::Graph(e.to_string()))?;
            self.programmatic_edges = self.programmatic_edges.max(captured.programmatic_edges());
            *graph = Some(captured);
        }
        graph.as_ref().expect("captured above").launch().map_err(|e| RunnerError::Graph(e.to_string()))
    }

    #[cfg(not(feature = "cuda"))]
    fn replay(&mut self, _model: &Qwen35, _bi: usize) -> Result<(), RunnerError> {
        unreachable!("GPU runners need the cuda feature")
    }

    /// Sets a sequence's cached length without computing it (benchmarks of decode at a given
    /// context depth: the KV contents do not change the time a step takes).
    pub fn set_len_for_benchmark(&mut self, seq: &mut SeqState, len: usize) -> Result<(), RunnerError> {
        let need = self.blocks_for(len + 1);
        while seq.blocks.len() < need {
            let b = self.free_blocks.pop().ok_or(RunnerError::OutOfBlocks { need, free: 0 })?;
            seq.blocks.push(b);
        }
        seq.len = len;
        Ok(())
    }
}
