//! Random weights of a real model shape (`--synthetic qwen3.5-9b`), for performance runs: nothing
//! large travels, and on the GPU the weights are generated in place.
//!
//! Every value comes from a counter-based hash of (tensor seed, index), the same on the CPU and in
//! `kernels/synthetic.cu`, so a small synthetic model built on either device is the same model —
//! which makes it a whole-model GPU-vs-CPU check for BF16 and NVFP4 layers alike.

use crate::linear::{Linear, LinearMethod, LoadOptions, WeightSource};
use crate::{ModelError, Result};
use fp4_format::nvfp4::Nvfp4Weight;
use fp4_format::TextConfig;
use fp4_kernels::{Device, Tensor};

/// How the synthetic model's linear layers are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyntheticFormat {
    Bf16,
    /// NVFP4 with ModelOpt's default exclusions (lm_head, `in_proj_a/b` stay BF16); `mlp_only`
    /// quantizes only the MLP projections (the seed's exclusions: attention and GDN stay BF16).
    Nvfp4 {
        mlp_only: bool,
    },
}

/// A [`WeightSource`] of random weights.
pub struct Synthetic {
    config: TextConfig,
    format: SyntheticFormat,
    seed: u64,
    /// Whether it has an MTP head (`mtp.*`, random like the rest).
    mtp: bool,
}

/// The shapes `--synthetic` knows.
pub const SYNTHETIC_MODELS: &[&str] = &["qwen3.5-9b", "tiny"];

impl Synthetic {
    /// `name` is one of [`SYNTHETIC_MODELS`]: `qwen3.5-9b` (the real 9B text shape, reference/qwen35.md
    /// §1.3) or `tiny` (a 4-layer model with the same head structure, for tests).
    pub fn named(name: &str, format: SyntheticFormat, seed: u64) -> Result<Synthetic> {
        let json = match name {
            "qwen3.5-9b" => serde_json::json!({
                "model_type": "qwen3_5_text", "vocab_size": 248320, "hidden_size": 4096,
                "intermediate_size": 12288, "num_hidden_layers": 32, "num_attention_heads": 16,
                "num_key_value_heads": 4, "head_dim": 256, "linear_num_key_heads": 16,
                "linear_num_value_heads": 32, "linear_key_head_dim": 128, "linear_value_head_dim": 128,
                "linear_conv_kernel_dim": 4, "full_attention_interval": 4, "rms_norm_eps": 1e-6,
                "tie_word_embeddings": false, "max_position_embeddings": 262144,
                "rope_parameters": {"rope_type": "default", "rope_theta": 1e7, "partial_rotary_factor": 0.25},
            }),
            "tiny" => serde_json::json!({
                "model_type": "qwen3_5_text", "vocab_size": 512, "hidden_size": 128,
                "intermediate_size": 384, "num_hidden_layers": 4, "num_attention_heads": 4,
                "num_key_value_heads": 1, "head_dim": 64, "linear_num_key_heads": 2,
                "linear_num_value_heads": 4, "linear_key_head_dim": 32, "linear_value_head_dim": 32,
                "linear_conv_kernel_dim": 4, "full_attention_interval": 2, "rms_norm_eps": 1e-6,
                "tie_word_embeddings": false,
                "rope_parameters": {"rope_type": "default", "rope_theta": 1e7, "partial_rotary_factor": 0.25},
            }),
            other => {
                return Err(ModelError::Unsupported(format!(
                    "unknown synthetic model `{other}` (known: {})",
                    SYNTHETIC_MODELS.join(", ")
                )))
            }
        };
        let config = TextConfig::from_json(&json, std::path::Path::new(&format!("<synthetic {name}>")))?;
        Ok(Synthetic { config, format, seed, mtp: false })
    }

    /// The same model with an MTP head (`mtp.*`, kept BF16 as checkpoints keep it).
    pub fn with_mtp(mut self) -> Synthetic {
        self.mtp = true;
        self
    }

    fn quantized(&self, name: &str, n_in: usize) -> bool {
        match self.format {
            SyntheticFormat::Bf16 => false,
            SyntheticFormat::Nvfp4 { mlp_only } => {
                let excluded = name == "lm_head"
                    || name.starts_with("mtp.")
                    || name.ends_with("in_proj_a")
                    || name.ends_with("in_proj_b");
                !excluded && (!mlp_only || name.contains(".mlp.")) && n_in.is_multiple_of(16)
            }
        }
    }

    /// A per-tensor seed: FNV-1a of the name mixed with the model seed.
    fn seed_of(&self, name: &str) -> u64 {
        name.bytes().fold(0xcbf29ce484222325u64 ^ self.seed, |h, b| (h ^ b as u64).wrapping_mul(0x100000001b3))
    }
}

/// SplitMix64 finaliser of (index, seed), top 32 bits (`hash` in kernels/synthetic.cu).
pub fn hash(i: u64, seed: u64) -> u32 {
    let mut z = i.wrapping_add(seed.wrapping_mul(0x9e3779b97f4a7c15));
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58476d1ce4e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d049bb133111eb);
    ((z ^ (z >> 31)) >> 32) as u32
}

/// `center + uniform[-scale, scale)` as `fill_f32_uniform` computes it (no fused multiply-add there).
fn uniform(n: usize, seed: u64, center: f32, scale: f32) -> Vec<f32> {
    (0..n as u64).map(|i| center + (hash(i, seed) as f32 * 2f32.powi(-31) - 1.0) * scale).collect()
}

/// Random NVFP4 codes and block scales as `fill_bytes` / `fill_e4m3_scales` make them.
fn nvfp4(rows: usize, cols: usize, seed: u64, scale_2: f32) -> Nvfp4Weight {
    let packed = (0..(rows * cols / 2) as u64).map(|i| hash(i, seed) as u8).collect();
    let scales = (0..(rows * cols / 16) as u64)
        .map(|i| {
            let h = hash(i, seed ^ 0x5ca1e);
            let (e, mut m) = (8 + (h & 7), (h >> 3) & 7);
            if e == 15 && m == 7 {
                m = 6;
            }
            ((e << 3) | m) as u8
        })
        .collect();
    Nvfp4Weight { rows, cols, packed, scales, scale_2 }
}

/// `input_scale` of every synthetic NVFP4 layer (used with `quantize_activations`): activations
/// here are about unit-variance, so a calibrated amax would be near 8.
const INPUT_SCALE: f32 = 8.0 / (6.0 * 448.0);

impl WeightSource for Synthetic {
    fn config(&self) -> &TextConfig {
        &self.config
    }

    fn text_name(&self, suffix: &str) -> String {
        format!("model.{suffix}")
    }

    fn linear(&self, name: &str, n_in: usize, n_out: usize, bias: bool, o: LoadOptions) -> Result<Linear> {
        let seed = self.seed_of(name);
        // Uniform weights of variance 1/n_in keep unit-variance activations unit-variance.
        let a = (3.0 / n_in as f32).sqrt();
        // Random E2M1 codes (rms ≈ 2.9) times block scales (rms ≈ 150): about the same spread.
        let scale_2 = 1.0 / (440.0 * (n_in as f32).sqrt());
        let bias = if bias { Some(self.param(&format!("{name}.bias"), &[n_out], o)?) } else { None };
        let quantized = self.quantized(name, n_in);
        let method = match o.device {
            Device::Cpu if quantized => {
                let q = nvfp4(n_out, n_in, seed, scale_2);
                let weight = Tensor::from_vec(q.dequantize(), &[n_out, n_in]);
                LinearMethod::Nvfp4 { q, input_scale: Some(INPUT_SCALE), pre_quant_scale: None, weight, bias }
            }
            Device::Cpu => {
                let w = uniform(n_out * n_in, seed, 0.0, a).into_iter().map(fp4_format::dtype::round_bf16).collect();
                LinearMethod::Dense { weight: Tensor::from_vec(w, &[n_out, n_in]), bias }
            }
            #[cfg(feature = "cuda")]
            Device::Cuda => {
                let g = fp4_kernels::cuda::gpu();
                let act = (quantized && o.quantize_activations)
                    .then_some(fp4_kernels::cuda::ActQuant::Nvfp4 { input_scale: INPUT_SCALE });
                // As a checkpoint's weights are held: W4A4 in ModelOpt's layout, W4A16 repacked
                // (the same codes as the CPU's, moved).
                let layout = match act {
                    Some(_) => fp4_kernels::cuda::Nvfp4Layout::ModelOpt,
                    None => fp4_kernels::cuda::Nvfp4Layout::Repacked,
                };
                let weight = if quantized {
                    g.random_nvfp4(n_out, n_in, seed, scale_2, layout)
                } else {
                    g.random_bf16(n_out, n_in, seed, a)
                }
                .map_err(|e| ModelError::Unsupported(format!("{name}: {e}")))?;
                let format = if quantized { "nvfp4" } else { "bf16" };
                LinearMethod::Gpu { weight: std::sync::Arc::new(weight), pre_quant_scale: None, bias, act, format }
            }
            #[cfg(not(feature = "cuda"))]
            Device::Cuda => unreachable!("Qwen35::load refuses the GPU in builds without cuda"),
        };
        Ok(Linear::from_method(name, n_in, n_out, method, false))
    }

    fn has(&self, name: &str) -> bool {
        self.mtp || !name.starts_with("mtp.")
    }

    fn param(&self, name: &str, shape: &[usize], o: LoadOptions) -> Result<Tensor> {
        let n = shape.iter().product();
        let (center, scale) = if name.ends_with("A_log") {
            (1.0, 1.0)
        } else if name.ends_with("dt_bias") || name.ends_with("conv1d.weight") {
            (0.0, 0.5)
        } else if name.ends_with("linear_attn.norm.weight") {
            (1.0, 0.1) // the gated norm's weight is plain w
        } else if name.ends_with("embed_tokens.weight") {
            (0.0, 1.0)
        } else {
            (0.0, 0.1) // (1+w) norms, biases
        };
        let seed = self.seed_of(name);
        match o.device {
            Device::Cpu => Ok(Tensor::from_vec(uniform(n, seed, center, scale), shape)),
            #[cfg(feature = "cuda")]
            Device::Cuda => {
                let s = fp4_kernels::cuda::gpu()
                    .random_f32(n, seed, center, scale)
                    .map_err(|e| ModelError::Unsupported(format!("{name}: {e}")))?;
                Ok(Tensor::from_cuda(s, shape))
            }
            #[cfg(not(feature = "cuda"))]
            Device::Cuda => unreachable!("Qwen35::load refuses the GPU in builds without cuda"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Logits, Precision, Qwen35};

    /// The 9B shape has the header-verified text parameter count of Qwen3.5-9B (reference/qwen35.md
    /// §1.3: 8,953,803,264), computed from the config the way the model allocates its tensors.
    #[test]
    fn nine_b_shape_has_the_real_parameter_count() {
        let s = Synthetic::named("qwen3.5-9b", SyntheticFormat::Bf16, 0).unwrap();
        let c = s.config();
        let (h, i) = (c.hidden_size, c.intermediate_size);
        let mlp = 3 * h * i + 2 * h;
        let gdn = h * c.linear_conv_dim()
            + 2 * h * c.linear_value_dim()
            + 2 * h * c.linear_num_value_heads
            + c.linear_conv_dim() * c.linear_conv_kernel_dim
            + 2 * c.linear_num_value_heads
            + c.linear_value_head_dim;
        let (hq, hkv, d) = (c.num_attention_heads, c.num_key_value_heads, c.head_dim);
        let attn = h * hq * d * 2 + 2 * h * hkv * d + hq * d * h + 2 * d;
        let layers: usize = c
            .layer_types
            .iter()
            .map(|t| mlp + if *t == fp4_format::LayerType::FullAttention { attn } else { gdn })
            .sum();
        assert_eq!(layers + 2 * c.vocab_size * h + h, 8_953_803_264);
        assert_eq!(c.rotary_dim(), 64);
    }

    /// The tiny synthetic model runs, is deterministic, and its NVFP4 form differs from BF16.
    #[test]
    fn tiny_synthetic_model_runs_and_is_reproducible() {
        let logits = |format| {
            let s = Synthetic::named("tiny", format, 7).unwrap();
            let m = Qwen35::load(&s, LoadOptions::new(Precision::F32)).unwrap();
            m.forward(&[1, 2, 3, 4, 5], &mut m.new_cache(), Logits::Last).unwrap().into_vec()
        };
        let bf16 = logits(SyntheticFormat::Bf16);
        assert!(bf16.iter().all(|x| x.is_finite()) && bf16.iter().any(|x| x.abs() > 1e-3));
        assert_eq!(bf16, logits(SyntheticFormat::Bf16));
        assert_ne!(bf16, logits(SyntheticFormat::Nvfp4 { mlp_only: false }));
        assert!(Synthetic::named("qwen9", SyntheticFormat::Bf16, 0).is_err());
    }
}
