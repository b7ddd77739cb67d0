//! Per-sequence state carried between forward calls.

use fp4_format::{LayerType, TextConfig};
use fp4_kernels::ops::BatchIndex;
use fp4_kernels::{Device, Ids, Tensor};

/// State of one decoder layer.
#[derive(Debug, Clone)]
pub enum LayerCache {
    /// Post-norm, post-RoPE keys and values: `[L, Hkv, D]` each (`None` before the first token).
    Attention { k: Option<Tensor>, v: Option<Tensor> },
    /// GDN: the last K−1 pre-conv inputs `[K−1, conv_dim]` and the f32 recurrent state `[Hv, dk, dv]`.
    Gdn { conv: Tensor, state: Tensor },
}

impl LayerCache {
    /// An empty cache for one layer of kind `t` on `device`.
    pub fn new(cfg: &TextConfig, t: LayerType, device: Device) -> LayerCache {
        match t {
            LayerType::FullAttention => LayerCache::Attention { k: None, v: None },
            LayerType::LinearAttention => LayerCache::Gdn {
                conv: Tensor::zeros_on(&[cfg.linear_conv_kernel_dim - 1, cfg.linear_conv_dim()], device),
                state: Tensor::zeros_on(
                    &[cfg.linear_num_value_heads, cfg.linear_key_head_dim, cfg.linear_value_head_dim],
                    device,
                ),
            },
        }
    }
}

/// The cache of one sequence: per-layer state plus how many tokens it has seen.
#[derive(Debug, Clone)]
pub struct Cache {
    pub layers: Vec<LayerCache>,
    /// Tokens processed so far (the position of the next token).
    pub seq_len: usize,
}

impl Cache {
    pub fn new(cfg: &TextConfig, device: Device) -> Cache {
        let layers = cfg.layer_types.iter().map(|&t| LayerCache::new(cfg, t, device)).collect();
        Cache { layers, seq_len: 0 }
    }
}

/// The decode state of one layer for every sequence of a batch engine.
#[derive(Debug)]
pub enum LayerPool {
    /// Paged KV: `[blocks · block_size, Hkv, D]` each.
    Attention { k: Tensor, v: Tensor },
    /// GDN: conv inputs `[slots · (K−1), conv_dim]` and recurrent state `[slots · Hv, dk, dv]`.
    Gdn { conv: Tensor, state: Tensor },
}

/// Decode state of many sequences: per-layer pools of GDN state slots and paged KV blocks, sized
/// once (from the cache budget) and indexed by the step's slots and block tables.
#[derive(Debug)]
pub struct Pools {
    pub layers: Vec<LayerPool>,
    /// The MTP head's layer (full attention) when the runner speculates: its KV in blocks of the
    /// same ids as the model's, so one block table serves both.
    pub mtp: Option<LayerPool>,
    /// With the MTP head: its normed output `[slots, H]` at each speculating sequence's last
    /// position (the next draft's input), a row per GDN slot (a sequence's row is one of its slots).
    pub mtp_hidden: Option<Tensor>,
    pub slots: usize,
    pub blocks: usize,
    pub block_size: usize,
    device: Device,
}

impl Pools {
    /// Pools of `slots` GDN state slots and `blocks` KV blocks; with `mtp`, KV blocks for the MTP
    /// head's layer too.
    pub fn new(cfg: &TextConfig, slots: usize, blocks: usize, block_size: usize, mtp: bool, device: Device) -> Pools {
        let kv_row = [cfg.num_key_value_heads, cfg.head_dim];
        let kv_pool = || {
            let shape = [blocks * block_size, kv_row[0], kv_row[1]];
            LayerPool::Attention { k: Tensor::zeros_on(&shape, device), v: Tensor::zeros_on(&shape, device) }
        };
        let layers = cfg
            .layer_types
            .iter()
            .map(|t| match t {
                LayerType::FullAttention => kv_pool(),
                LayerType::LinearAttention => LayerPool::Gdn {
                    conv: Tensor::zeros_on(&[slots * (cfg.linear_conv_kernel_dim - 1), cfg.linear_conv_dim()], device),
                    state: Tensor::zeros_on(
                        &[slots * cfg.linear_num_value_heads, cfg.linear_key_head_dim, cfg.linear_value_head_dim],
                        device,
                    ),
                },
            })
            .collect();
        let mtp_hidden = mtp.then(|| Tensor::zeros_on(&[slots, cfg.hidden_size], device));
        Pools { layers, mtp: mtp.then(kv_pool), mtp_hidden, slots, blocks, block_size, device }
    }

    /// Bytes of one GDN state slot (every GDN layer's conv inputs and recurrent state, f32; with
    /// `mtp`, the MTP head's hidden row too).
    pub fn slot_bytes(cfg: &TextConfig, mtp: bool) -> usize {
        let per_layer = (cfg.linear_conv_kernel_dim - 1) * cfg.linear_conv_dim()
            + cfg.linear_num_value_heads * cfg.linear_key_head_dim * cfg.linear_value_head_dim;
        (cfg.num_layers_of(LayerType::LinearAttention) * per_layer + if mtp { cfg.hidden_size } else { 0 }) * 4
    }

    /// Bytes of one KV block of `block_size` tokens over every attention layer (f32 K and V), the
    /// MTP head's with `mtp`.
    pub fn block_bytes(cfg: &TextConfig, block_size: usize, mtp: bool) -> usize {
        let layers = cfg.num_layers_of(LayerType::FullAttention) + usize::from(mtp);
        layers * 2 * block_size * cfg.num_key_value_heads * cfg.head_dim * 4
    }

    /// Moves a prefilled sequence's cache into `slot` and the KV blocks `blocks` (in order; enough
    /// of them for `cache.seq_len` tokens).
    pub fn store(&mut self, cache: &Cache, slot: usize, blocks: &[u32]) {
        assert!(slot < self.slots && blocks.len() * self.block_size >= cache.seq_len, "Pools::store shapes");
        let placement = KvPlacement::new(cache.seq_len, blocks, self.block_size, self.device);
        for (pool, lc) in self.layers.iter_mut().zip(&cache.layers) {
            match (pool, lc) {
                (LayerPool::Gdn { conv, state }, LayerCache::Gdn { conv: c, state: s }) => {
                    fp4_kernels::ops::write_rows(conv, slot * c.rows(), c);
                    fp4_kernels::ops::write_rows(state, slot * s.rows(), s);
                }
                (LayerPool::Attention { k, v }, LayerCache::Attention { k: Some(kc), v: Some(vc) }) => {
                    placement.store((k, v), (kc, vc))
                }
                (LayerPool::Attention { .. }, LayerCache::Attention { .. }) => {}
                _ => unreachable!("pool and cache layer kinds come from the same config"),
            }
        }
    }

    /// Moves the MTP head's prefilled KV (`LayerCache::Attention`, rows from position 0) into
    /// `blocks` (the sequence's, in order).
    pub fn store_mtp(&mut self, layer: &LayerCache, blocks: &[u32]) {
        let (bs, device) = (self.block_size, self.device);
        match (&mut self.mtp, layer) {
            (Some(LayerPool::Attention { k, v }), LayerCache::Attention { k: Some(kc), v: Some(vc) }) => {
                assert!(blocks.len() * bs >= kc.rows(), "Pools::store_mtp shapes");
                KvPlacement::new(kc.rows(), blocks, bs, device).store((k, v), (kc, vc))
            }
            (Some(_), LayerCache::Attention { .. }) => {}
            _ => unreachable!("MTP state for pools without an MTP layer"),
        }
    }
}

/// Where a sequence's KV rows go in the paged pools: row r (position r) into block
/// `blocks[r / block_size]`, as a decode step's `kv_write` places a token, every row reading the
/// same block list (`max_blocks` 0). One write per layer instead of two copies per block.
struct KvPlacement {
    pos: Ids,
    table: Ids,
    block_size: usize,
}

impl KvPlacement {
    fn new(rows: usize, blocks: &[u32], block_size: usize, device: Device) -> KvPlacement {
        let pos = Ids::new((0..rows as u32).collect(), device);
        KvPlacement { pos, table: Ids::new(blocks.to_vec(), device), block_size }
    }

    /// KV rows `kv` (from position 0, as many as placed) into the pools.
    fn store(&self, pools: (&mut Tensor, &mut Tensor), kv: (&Tensor, &Tensor)) {
        let ((k, v), (kc, vc)) = (pools, kv);
        if kc.rows() == 0 {
            return;
        }
        assert_eq!(kc.rows(), self.pos.len(), "KvPlacement::store rows");
        let ix = BatchIndex {
            pos: &self.pos,
            slots: &self.pos,
            slots_out: &self.pos,
            rows_per_seq: 1,
            table: &self.table,
            max_blocks: 0,
            block_size: self.block_size,
        };
        fp4_kernels::ops::kv_write(kc, vc, k, v, ix);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Synthetic, SyntheticFormat, WeightSource};

    /// A prefilled cache moves into the pools row by row: position r into block
    /// `blocks[r / block_size]` at offset r % block_size, whatever order the blocks come in, and
    /// the GDN state into its slot; nothing else in the pools changes.
    #[test]
    fn stored_rows_land_in_their_blocks() {
        let src = Synthetic::named("tiny", SyntheticFormat::Bf16, 3).unwrap();
        let cfg = src.config();
        let (len, bs, slot) = (37usize, 8usize, 2usize);
        let mut cache = Cache::new(cfg, Device::Cpu);
        let mut fill = 0.5f32;
        let mut next = |n: usize| {
            (0..n)
                .map(|_| {
                    fill = (fill * 3.7 + 0.13) % 1.0;
                    fill - 0.5
                })
                .collect::<Vec<f32>>()
        };
        let row = cfg.num_key_value_heads * cfg.head_dim;
        for layer in &mut cache.layers {
            match layer {
                LayerCache::Attention { k, v } => {
                    let shape = [len, cfg.num_key_value_heads, cfg.head_dim];
                    *k = Some(Tensor::from_vec(next(len * row), &shape));
                    *v = Some(Tensor::from_vec(next(len * row), &shape));
                }
                LayerCache::Gdn { conv, state } => {
                    *conv = Tensor::from_vec(next(conv.elem_count()), conv.shape());
                    *state = Tensor::from_vec(next(state.elem_count()), state.shape());
                }
            }
        }
        cache.seq_len = len;
        let kinds =
            |attention| cache.layers.iter().filter(|l| matches!(l, LayerCache::Attention { .. }) == attention).count();
        assert!(kinds(true) > 0 && kinds(false) > 0, "the tiny model has both kinds of layer");
        let blocks = [6u32, 1, 9, 0, 4];
        let mut pools = Pools::new(cfg, 4, 10, bs, false, Device::Cpu);
        pools.store(&cache, slot, &blocks);
        for (pool, lc) in pools.layers.iter().zip(&cache.layers) {
            match (pool, lc) {
                (LayerPool::Attention { k, v }, LayerCache::Attention { k: Some(kc), v: Some(vc) }) => {
                    let mut written = vec![false; k.rows()];
                    for r in 0..len {
                        let at = blocks[r / bs] as usize * bs + r % bs;
                        written[at] = true;
                        assert_eq!(k.as_slice()[at * row..][..row], kc.as_slice()[r * row..][..row], "k row {r}");
                        assert_eq!(v.as_slice()[at * row..][..row], vc.as_slice()[r * row..][..row], "v row {r}");
                    }
                    let untouched = (0..k.rows()).filter(|&i| !written[i]);
                    assert!(untouched.clone().all(|i| k.as_slice()[i * row..][..row].iter().all(|&x| x == 0.0)));
                    assert!(untouched.clone().all(|i| v.as_slice()[i * row..][..row].iter().all(|&x| x == 0.0)));
                }
                (LayerPool::Gdn { conv, state }, LayerCache::Gdn { conv: c, state: s }) => {
                    let (cn, sn) = (c.elem_count(), s.elem_count());
                    assert_eq!(conv.as_slice()[slot * cn..][..cn], c.as_slice()[..]);
                    assert_eq!(state.as_slice()[slot * sn..][..sn], s.as_slice()[..]);
                }
                _ => unreachable!("the same config"),
            }
        }
    }
}
