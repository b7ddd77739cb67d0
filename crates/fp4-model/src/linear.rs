//! Linear layers and their per-layer "method" (how the weight is stored and multiplied).
//! Only dense weights exist so far; NVFP4 and FP8 join as further methods, chosen per layer from
//! the checkpoint's quantization config, never as separate model classes.

use fp4_format::Checkpoint;
use fp4_kernels::{ops, Precision, Tensor};

#[derive(Debug, Clone)]
pub enum LinearMethod {
    /// Full-precision weight `[out, in]` held as f32 (exact for BF16/F16/F32 checkpoints).
    Dense { weight: Tensor, bias: Option<Tensor> },
}

#[derive(Debug, Clone)]
pub struct Linear {
    /// Module name in the checkpoint (e.g. `model.layers.0.mlp.up_proj`), used by quantization.
    pub name: String,
    pub in_features: usize,
    pub out_features: usize,
    pub method: LinearMethod,
}

impl Linear {
    /// Loads `<name>.weight` `[out, in]` (and `<name>.bias` when `bias`), rounded to `p`.
    pub fn load(
        ckpt: &Checkpoint,
        name: &str,
        n_in: usize,
        n_out: usize,
        bias: bool,
        p: Precision,
    ) -> crate::Result<Linear> {
        let weight = load_param(ckpt, &format!("{name}.weight"), &[n_out, n_in], p)?;
        let bias = if bias { Some(load_param(ckpt, &format!("{name}.bias"), &[n_out], p)?) } else { None };
        Ok(Linear {
            name: name.to_string(),
            in_features: n_in,
            out_features: n_out,
            method: LinearMethod::Dense { weight, bias },
        })
    }

    /// `x [T, in] → [T, out]`, output rounded to `p`.
    pub fn forward(&self, x: &Tensor, p: Precision) -> Tensor {
        match &self.method {
            LinearMethod::Dense { weight, bias } => ops::linear(x, weight, bias.as_ref(), p),
        }
    }
}

/// Loads a float parameter as it would sit in a transformers model of dtype `p`: exact in f32,
/// rounded to bf16 for a bf16 model (transformers has no keep-in-fp32 list for Qwen3.5, so even
/// the F32 `A_log` and gated-norm weights are rounded).
pub fn load_param(ckpt: &Checkpoint, name: &str, shape: &[usize], p: Precision) -> crate::Result<Tensor> {
    Ok(Tensor::from_vec(ckpt.load_f32(name, shape)?, shape).round(p))
}
