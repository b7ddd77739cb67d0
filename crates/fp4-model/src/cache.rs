//! Per-sequence state carried between forward calls.

use fp4_format::{LayerType, TextConfig};
use fp4_kernels::{Device, Tensor};

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
