//! Qwen3.5 text model (`Qwen3_5ForCausalLM` / the text half of `Qwen3_5ForConditionalGeneration`).
//!
//! Order follows transformers' `modeling_qwen3_5.py`: gated attention, Gated DeltaNet, MLP,
//! decoder layer, model. Every numbered step names the HF line it mirrors; rounding points
//! (bf16 mode) are where HF stores a bf16 tensor.

use crate::cache::{Cache, LayerCache, LayerPool, Pools};
use crate::linear::{forward_many, Linear, LoadOptions, WeightSource};
use crate::{ModelError, Result};
use fp4_format::{LayerType, TextConfig};
use fp4_kernels::ops::{self, BatchIndex, GdnAlgo, GdnDims};
use fp4_kernels::{Device, Ids, Precision, Tensor};

/// Which positions get logits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logits {
    /// Every position: `[T, vocab]` (for `fp4 logits` and evaluation).
    All,
    /// Only the last position: `[1, vocab]` (generation never builds `[T, vocab]`).
    Last,
}

/// Where a layer's token mixer reads and writes its state.
pub enum MixerState<'a> {
    /// One sequence (any number of tokens) with its own cache, tokens from position `pos0`.
    Sequence { cache: &'a mut LayerCache, pos0: usize, algo: GdnAlgo },
    /// A decode batch: one token per sequence, state in the pools at `index`.
    Batch { pool: &'a mut LayerPool, index: BatchIndex<'a> },
}

/// SwiGLU MLP: `down(silu(gate(x)) · up(x))`.
struct Mlp {
    gate: Linear,
    up: Linear,
    down: Linear,
}

impl Mlp {
    fn load(w: &dyn WeightSource, prefix: &str, cfg: &TextConfig, o: LoadOptions) -> Result<Mlp> {
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        Ok(Mlp {
            gate: w.linear(&format!("{prefix}.gate_proj"), h, i, false, o)?,
            up: w.linear(&format!("{prefix}.up_proj"), h, i, false, o)?,
            down: w.linear(&format!("{prefix}.down_proj"), i, h, false, o)?,
        })
    }

    /// `residual + mlp(x)`.
    fn forward_add(&self, x: &Tensor, residual: &Tensor, p: Precision) -> Tensor {
        let [gate, up] = forward_many(x, [&self.gate, &self.up], p);
        let act = ops::silu_mul(&gate, &up, p);
        self.down.forward_add(&act, residual, p)
    }
}

/// Gated softmax attention (`Qwen3_5Attention`).
struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    q_norm: Tensor,
    k_norm: Tensor,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
}

impl Attention {
    fn load(w: &dyn WeightSource, prefix: &str, cfg: &TextConfig, o: LoadOptions) -> Result<Attention> {
        let (h, hq, hkv, d, bias) =
            (cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.attention_bias);
        Ok(Attention {
            // q_proj rows are per head [query D | gate D].
            q_proj: w.linear(&format!("{prefix}.q_proj"), h, hq * d * 2, bias, o)?,
            k_proj: w.linear(&format!("{prefix}.k_proj"), h, hkv * d, bias, o)?,
            v_proj: w.linear(&format!("{prefix}.v_proj"), h, hkv * d, bias, o)?,
            o_proj: w.linear(&format!("{prefix}.o_proj"), hq * d, h, bias, o)?,
            q_norm: w.param(&format!("{prefix}.q_norm.weight"), &[d], o)?,
            k_norm: w.param(&format!("{prefix}.k_norm.weight"), &[d], o)?,
            heads: hq,
            kv_heads: hkv,
            head_dim: d,
        })
    }

    fn forward(&self, x: &Tensor, state: MixerState, m: &LayerCtx) -> Tensor {
        let (t, d, p, eps) = (x.rows(), self.head_dim, m.precision, m.eps);
        // 1. q_proj → [T, Hq, 2D] (per head query | gate); k and v [T, Hkv, D].
        let [qg, k, v] = forward_many(x, [&self.q_proj, &self.k_proj, &self.v_proj], p);
        let qg = qg.reshape(&[t, self.heads, 2 * d]);
        let k = k.reshape(&[t, self.kv_heads, d]);
        let v = v.reshape(&[t, self.kv_heads, d]);
        let scale = (d as f32).powf(-0.5);
        let (o, gate) = match state {
            MixerState::Sequence { cache, pos0, .. } => {
                let [q, gate]: [Tensor; 2] = ops::split_last(&qg, &[d, d]).try_into().expect("two halves");
                // 2. Per-head (1+w) RMSNorm on q and k; v unnormalised.
                let mut q = ops::rms_norm(&q, &self.q_norm, eps, 1.0, p);
                let mut k = ops::rms_norm(&k, &self.k_norm, eps, 1.0, p);
                // 3. Partial rotate-half RoPE on the first rotary_dim dims of each head.
                ops::rope(&mut q, &m.inv_freq, pos0, p);
                ops::rope(&mut k, &m.inv_freq, pos0, p);
                // 4. Append to the KV cache, attend causally over everything cached.
                let LayerCache::Attention { k: kc, v: vc } = cache else {
                    unreachable!("attention layer with a GDN cache")
                };
                let (k_all, v_all) = match (kc.take(), vc.take()) {
                    (Some(kp), Some(vp)) => (ops::cat_rows(&kp, &k), ops::cat_rows(&vp, &v)),
                    _ => (k, v),
                };
                let o = ops::attention(&q, &k_all, &v_all, scale, p);
                *kc = Some(k_all);
                *vc = Some(v_all);
                (o, gate)
            }
            MixerState::Batch { pool, index } => {
                // 2–4 for a decode batch (one fused op): norms, RoPE at each token's own
                // position, K and V into their paged blocks; then attention over them.
                let LayerPool::Attention { k: kp, v: vp } = pool else {
                    unreachable!("attention layer with a GDN pool")
                };
                let w =
                    ops::AttentionPrepParams { q_norm: &self.q_norm, k_norm: &self.k_norm, eps, inv_freq: &m.inv_freq };
                let (q, gate) = ops::attention_decode_prep(&qg, &k, &v, w, kp, vp, index, p);
                (ops::paged_attention(&q, kp, vp, index, scale, p), gate)
            }
        };
        // 5. Sigmoid output gate, then o_proj.
        let o = ops::sigmoid_gate(&o.reshape(&[t, self.heads * d]), &gate.reshape(&[t, self.heads * d]), p);
        self.o_proj.forward(&o, p)
    }
}

/// Gated DeltaNet (`Qwen3_5GatedDeltaNet`).
struct GatedDeltaNet {
    in_proj_qkv: Linear,
    in_proj_z: Linear,
    in_proj_b: Linear,
    in_proj_a: Linear,
    out_proj: Linear,
    /// Depthwise conv weight `[conv_dim, K]` (checkpoint `[conv_dim, 1, K]`).
    conv: Tensor,
    a_log: Tensor,
    dt_bias: Tensor,
    /// Gated-norm weight `[dv]`, plain w, shared by all value heads.
    norm: Tensor,
    dims: GdnDims,
}

impl GatedDeltaNet {
    fn load(w: &dyn WeightSource, prefix: &str, cfg: &TextConfig, o: LoadOptions) -> Result<GatedDeltaNet> {
        let (h, hv, k) = (cfg.hidden_size, cfg.linear_num_value_heads, cfg.linear_conv_kernel_dim);
        let conv_dim = cfg.linear_conv_dim();
        let conv = w.param(&format!("{prefix}.conv1d.weight"), &[conv_dim, 1, k], o)?.reshape(&[conv_dim, k]);
        Ok(GatedDeltaNet {
            in_proj_qkv: w.linear(&format!("{prefix}.in_proj_qkv"), h, conv_dim, false, o)?,
            in_proj_z: w.linear(&format!("{prefix}.in_proj_z"), h, cfg.linear_value_dim(), false, o)?,
            in_proj_b: w.linear(&format!("{prefix}.in_proj_b"), h, hv, false, o)?,
            in_proj_a: w.linear(&format!("{prefix}.in_proj_a"), h, hv, false, o)?,
            out_proj: w.linear(&format!("{prefix}.out_proj"), cfg.linear_value_dim(), h, false, o)?,
            conv,
            a_log: w.param(&format!("{prefix}.A_log"), &[hv], o)?,
            dt_bias: w.param(&format!("{prefix}.dt_bias"), &[hv], o)?,
            norm: w.param(&format!("{prefix}.norm.weight"), &[cfg.linear_value_head_dim], o)?,
            dims: GdnDims {
                key_heads: cfg.linear_num_key_heads,
                value_heads: hv,
                key_dim: cfg.linear_key_head_dim,
                value_dim: cfg.linear_value_head_dim,
            },
        })
    }

    fn forward(&self, x: &Tensor, state: MixerState, m: &LayerCtx) -> Tensor {
        let (t, d, p) = (x.rows(), self.dims, m.precision);
        // 1. Projections: qkv [T, conv_dim], z [T, Hv·dv], b and a [T, Hv].
        let [mixed, z, b, a] =
            forward_many(x, [&self.in_proj_qkv, &self.in_proj_z, &self.in_proj_b, &self.in_proj_a], p);
        let key_width = d.key_heads * d.key_dim;
        let o = match state {
            MixerState::Sequence { cache, algo, .. } => {
                let LayerCache::Gdn { conv, state } = cache else { unreachable!("GDN layer with an attention cache") };
                // 2. Causal depthwise conv + SiLU over q, k and v channels, continuing the cached inputs.
                let conv_out = ops::causal_conv1d_silu(&mixed, conv, &self.conv, p);
                let [q, k, v]: [Tensor; 3] =
                    ops::split_last(&conv_out, &[key_width, key_width, d.value_heads * d.value_dim])
                        .try_into()
                        .expect("three parts");
                // 3. β = sigmoid(b), g = −exp(A_log)·softplus(a + dt_bias).
                let (beta, g) = ops::gdn_gates(&b, &a, &self.a_log, &self.dt_bias, p);
                // 4. Delta rule in f32 (l2norm of q, k and the 1/√dk scale inside), output rounded.
                let o = ops::gated_delta_rule(&q, &k, &v, &g, &beta, state, d, algo).round(p);
                // 5. Gated RMSNorm per value head.
                let rows = [t * d.value_heads, d.value_dim];
                ops::rms_norm_gated(&o.reshape(&rows), &z.reshape(&rows), &self.norm, m.eps, p)
            }
            MixerState::Batch { pool, index } => {
                // 2–5 for a decode batch: the conv step, then gates, delta rule and gated norm as
                // one fused op, the state in the pools at each sequence's slot.
                let LayerPool::Gdn { conv, state } = pool else { unreachable!("GDN layer with an attention pool") };
                let conv_out = ops::conv1d_step(&mixed, conv, &self.conv, index.gdn_slots(), p);
                let w = ops::GdnStepParams {
                    a_log: &self.a_log,
                    dt_bias: &self.dt_bias,
                    norm: &self.norm,
                    eps: m.eps,
                    dims: d,
                };
                ops::gdn_decode(&conv_out, &b, &a, z, w, state, index.gdn_slots(), p)
            }
        };
        // 6. out_proj.
        self.out_proj.forward(&o.reshape(&[t, d.value_heads * d.value_dim]), p)
    }
}

enum Mixer {
    Attention(Box<Attention>),
    Gdn(Box<GatedDeltaNet>),
}

/// What every layer needs besides its weights.
pub struct LayerCtx {
    pub precision: Precision,
    pub eps: f32,
    /// RoPE inverse frequencies (`rotary_dim / 2`), on the model's device.
    pub inv_freq: Tensor,
}

impl LayerCtx {
    pub fn new(cfg: &TextConfig, precision: Precision, device: Device) -> LayerCtx {
        let inv_freq = ops::rope_inv_freq(cfg.rotary_dim(), cfg.rope_theta as f32);
        let n = inv_freq.len();
        LayerCtx {
            precision,
            eps: cfg.rms_norm_eps as f32,
            inv_freq: Tensor::from_vec(inv_freq, &[n]).into_device(device),
        }
    }
}

/// One decoder layer: `h += mixer(norm(h)); h += mlp(norm(h))`.
pub struct DecoderLayer {
    input_norm: Tensor,
    post_norm: Tensor,
    mixer: Mixer,
    mlp: Mlp,
}

impl DecoderLayer {
    /// Loads layer `i` (the quantizer loads one layer at a time through this).
    pub fn load(w: &dyn WeightSource, i: usize, o: LoadOptions) -> Result<DecoderLayer> {
        let cfg = w.config();
        DecoderLayer::load_at(w, &w.text_name(&format!("layers.{i}")), cfg.layer_types[i], o)
    }

    /// Loads the layer of type `kind` whose tensors are under `prefix` (the MTP head's layer is
    /// `mtp.layers.0`, full attention).
    pub fn load_at(w: &dyn WeightSource, prefix: &str, kind: LayerType, o: LoadOptions) -> Result<DecoderLayer> {
        let cfg = w.config();
        let mixer = match kind {
            LayerType::FullAttention => {
                Mixer::Attention(Box::new(Attention::load(w, &format!("{prefix}.self_attn"), cfg, o)?))
            }
            LayerType::LinearAttention => {
                Mixer::Gdn(Box::new(GatedDeltaNet::load(w, &format!("{prefix}.linear_attn"), cfg, o)?))
            }
        };
        let h = [cfg.hidden_size];
        Ok(DecoderLayer {
            input_norm: w.param(&format!("{prefix}.input_layernorm.weight"), &h, o)?,
            post_norm: w.param(&format!("{prefix}.post_attention_layernorm.weight"), &h, o)?,
            mixer,
            mlp: Mlp::load(w, &format!("{prefix}.mlp"), cfg, o)?,
        })
    }

    /// Runs `h [T, hidden]` through the layer, reading and updating its mixer's state.
    pub fn forward(&self, h: &Tensor, state: MixerState, ctx: &LayerCtx) -> Tensor {
        let p = ctx.precision;
        let x = ops::rms_norm(h, &self.input_norm, ctx.eps, 1.0, p);
        let mixed = match &self.mixer {
            Mixer::Attention(a) => a.forward(&x, state, ctx),
            Mixer::Gdn(g) => g.forward(&x, state, ctx),
        };
        let (h, x) = ops::add_rms_norm(h, &mixed, &self.post_norm, ctx.eps, 1.0, p);
        self.mlp.forward_add(&x, &h, p)
    }

    /// The (1+w) norm before the token mixer and the one before the MLP.
    pub fn norms_mut(&mut self) -> (&mut Tensor, &mut Tensor) {
        (&mut self.input_norm, &mut self.post_norm)
    }

    /// The GDN mixer's gated-norm weight `[dv]` (plain w, shared by all value heads); `None` for
    /// an attention layer.
    pub fn gdn_norm_mut(&mut self) -> Option<&mut Tensor> {
        match &mut self.mixer {
            Mixer::Gdn(g) => Some(&mut g.norm),
            Mixer::Attention(_) => None,
        }
    }

    /// Every linear layer, in checkpoint order (mixer projections, then MLP).
    pub fn linears_mut(&mut self) -> Vec<&mut Linear> {
        let mut out: Vec<&mut Linear> = match &mut self.mixer {
            Mixer::Attention(a) => vec![&mut a.q_proj, &mut a.k_proj, &mut a.v_proj, &mut a.o_proj],
            Mixer::Gdn(g) => {
                vec![&mut g.in_proj_qkv, &mut g.in_proj_z, &mut g.in_proj_b, &mut g.in_proj_a, &mut g.out_proj]
            }
        };
        out.extend([&mut self.mlp.gate, &mut self.mlp.up, &mut self.mlp.down]);
        out
    }
}

/// The text model plus LM head.
pub struct Qwen35 {
    pub config: TextConfig,
    pub precision: Precision,
    pub device: Device,
    /// How GDN layers walk a multi-token input; single tokens always use the recurrent step.
    pub prefill_algo: GdnAlgo,
    embed_tokens: Tensor,
    layers: Vec<DecoderLayer>,
    norm: Tensor,
    /// `None` when tied to the embeddings.
    lm_head: Option<Linear>,
    ctx: LayerCtx,
}

impl Qwen35 {
    /// Loads every text weight of `w` (a checkpoint, or random weights) onto `o.device`.
    pub fn load(w: &dyn WeightSource, o: LoadOptions) -> Result<Qwen35> {
        let cfg = w.config().clone();
        let p = o.precision;
        if o.device == Device::Cuda && !cfg!(feature = "cuda") {
            return Err(ModelError::Unsupported("this fp4 was built without the `cuda` feature".into()));
        }
        if o.device == Device::Cuda && p != Precision::F32 {
            return Err(ModelError::Unsupported(
                "the GPU path computes in f32 (with bf16/NVFP4/FP8 weights): use --dtype f32".into(),
            ));
        }
        let embed_tokens = w.param(&w.text_name("embed_tokens.weight"), &[cfg.vocab_size, cfg.hidden_size], o)?;
        let layers = (0..cfg.num_hidden_layers).map(|i| DecoderLayer::load(w, i, o)).collect::<Result<Vec<_>>>()?;
        let norm = w.param(&w.text_name("norm.weight"), &[cfg.hidden_size], o)?;
        let lm_head = if cfg.tie_word_embeddings {
            None
        } else {
            Some(w.linear("lm_head", cfg.hidden_size, cfg.vocab_size, false, o)?)
        };
        let ctx = LayerCtx::new(&cfg, p, o.device);
        Ok(Qwen35 {
            config: cfg,
            precision: p,
            device: o.device,
            prefill_algo: GdnAlgo::Chunked,
            embed_tokens,
            layers,
            norm,
            lm_head,
            ctx,
        })
    }

    pub fn new_cache(&self) -> Cache {
        Cache::new(&self.config, self.device)
    }

    /// The untied LM head (`None` when tied to the embeddings).
    pub fn lm_head(&self) -> Option<&Linear> {
        self.lm_head.as_ref()
    }

    /// Every decoder-layer linear (calibration algorithms swap their methods).
    pub fn linears_mut(&mut self) -> Vec<&mut Linear> {
        self.layers.iter_mut().flat_map(DecoderLayer::linears_mut).collect()
    }

    /// Runs `ids` after whatever `cache` already holds and returns f32 logits (rounded to bf16
    /// in bf16 mode, as HF's lm_head output is).
    pub fn forward(&self, ids: &[u32], cache: &mut Cache, which: Logits) -> Result<Tensor> {
        Ok(self.head(&self.forward_normed(ids, cache, which)?))
    }

    /// [`Qwen35::forward`] up to the final norm: the normed hidden states the LM head (and the
    /// MTP head) reads.
    pub fn forward_normed(&self, ids: &[u32], cache: &mut Cache, which: Logits) -> Result<Tensor> {
        let algo = if ids.len() == 1 { GdnAlgo::Recurrent } else { self.prefill_algo };
        self.forward_normed_with(ids, cache, which, algo)
    }

    /// [`Qwen35::forward_normed`] with the GDN layers walking the tokens by `algo` (the
    /// recurrent walk computes each token as a one-token step does).
    pub fn forward_normed_with(&self, ids: &[u32], cache: &mut Cache, which: Logits, algo: GdnAlgo) -> Result<Tensor> {
        if ids.is_empty() {
            return Err(ModelError::EmptyInput);
        }
        let vocab = self.config.vocab_size;
        if let Some((i, &id)) = ids.iter().enumerate().find(|(_, &id)| id as usize >= vocab) {
            return Err(ModelError::TokenOutOfRange { id, pos: cache.seq_len + i, vocab });
        }
        let pos0 = cache.seq_len;
        let mut h = ops::embedding(&self.embed_tokens, ids);
        for (layer, lc) in self.layers.iter().zip(cache.layers.iter_mut()) {
            h = layer.forward(&h, MixerState::Sequence { cache: lc, pos0, algo }, &self.ctx);
        }
        cache.seq_len += ids.len();
        let h = match which {
            Logits::All => h,
            Logits::Last => ops::last_row(&h),
        };
        Ok(self.final_norm(&h))
    }

    /// The final norm over the rows of `h`.
    fn final_norm(&self, h: &Tensor) -> Tensor {
        ops::rms_norm(h, &self.norm, self.ctx.eps, 1.0, self.ctx.precision)
    }

    /// The LM head over normed rows (the model's or the MTP head's).
    pub fn head(&self, normed: &Tensor) -> Tensor {
        let p = self.ctx.precision;
        match &self.lm_head {
            Some(head) => head.forward(normed, p),
            None => ops::linear(normed, &self.embed_tokens, None, p),
        }
    }

    /// The token embeddings `[vocab, hidden]` (the MTP head shares them).
    pub(crate) fn embeddings(&self) -> &Tensor {
        &self.embed_tokens
    }

    /// What every layer needs besides its weights (the MTP head's layer too).
    pub(crate) fn layer_ctx(&self) -> &LayerCtx {
        &self.ctx
    }

    /// One decode step of a batch: token `ids[b]` of sequence b at position `index.pos[b]`, its
    /// state in `pools` at `index`. Returns logits `[B, vocab]`. Ids must be within the
    /// vocabulary (the runner feeds back sampled ids). Allocation-free in the sense a CUDA graph
    /// needs: every buffer it creates is dropped before it returns.
    pub fn decode(&self, ids: &Ids, index: BatchIndex, pools: &mut Pools) -> Tensor {
        self.head(&self.decode_normed(ids, index, pools))
    }

    /// [`Qwen35::decode`] up to the final norm (what the LM head and the MTP head read). With
    /// `index.rows_per_seq` = R > 1, each sequence has R consecutive rows (a speculative verify):
    /// their KV at their own positions, their GDN state walked in order ([`ops::GdnSlots`]).
    pub fn decode_normed(&self, ids: &Ids, index: BatchIndex, pools: &mut Pools) -> Tensor {
        let mut h = ops::embedding_ids(&self.embed_tokens, ids);
        for (layer, pool) in self.layers.iter().zip(pools.layers.iter_mut()) {
            h = layer.forward(&h, MixerState::Batch { pool, index }, &self.ctx);
        }
        self.final_norm(&h)
    }
}
