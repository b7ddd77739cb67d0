//! Qwen3.5 text configuration, resolved from either config layout HF writes:
//! the VL wrapper (`model_type: qwen3_5`, fields under `text_config`) or the flat text-only
//! config (`model_type: qwen3_5_text`). Missing fields take `Qwen3_5TextConfig`'s defaults
//! (which are the 9B model's values), exactly as transformers does.

use crate::{FormatError, Result};
use serde_json::{Map, Value};
use std::path::{Path, PathBuf};

/// Which token mixer a decoder layer uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerType {
    /// Gated DeltaNet (`linear_attn.*`).
    LinearAttention,
    /// Gated softmax attention (`self_attn.*`).
    FullAttention,
}

/// Where the config keeps the text model's fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelLayout {
    /// `qwen3_5`: nested `text_config` (Qwen3_5ForConditionalGeneration).
    VisionLanguage,
    /// `qwen3_5_text`: flat config (Qwen3_5ForCausalLM).
    TextOnly,
}

/// The resolved text-model configuration: every field the model needs, validated.
#[derive(Debug, Clone)]
pub struct TextConfig {
    pub layout: ModelLayout,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub partial_rotary_factor: f64,
    pub attention_bias: bool,
    pub linear_conv_kernel_dim: usize,
    pub linear_key_head_dim: usize,
    pub linear_value_head_dim: usize,
    pub linear_num_key_heads: usize,
    pub linear_num_value_heads: usize,
    pub layer_types: Vec<LayerType>,
    pub tie_word_embeddings: bool,
    pub max_position_embeddings: usize,
    /// Stop ids from config.json (generation_config.json is merged in by the caller).
    pub eos_token_ids: Vec<u32>,
    /// `quantization_config` from config.json, kept raw for the quantization readers.
    pub quantization_config: Option<Value>,
}

impl TextConfig {
    /// Reads and resolves `<dir>/config.json`.
    pub fn from_dir(dir: &Path) -> Result<TextConfig> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).map_err(|source| FormatError::Io { path: path.clone(), source })?;
        let value: Value =
            serde_json::from_str(&text).map_err(|source| FormatError::Json { path: path.clone(), source })?;
        Self::from_json(&value, &path)
    }

    /// Resolves a parsed config.json; `path` is only used in error messages.
    pub fn from_json(value: &Value, path: &Path) -> Result<TextConfig> {
        let top = Fields::new(value, path, "")?;
        let model_type = top.str("model_type", None)?;
        let (layout, text) = match model_type.as_str() {
            "qwen3_5" => {
                let tc = top
                    .obj
                    .get("text_config")
                    .ok_or_else(|| top.err("text_config", "missing (required for model_type qwen3_5)"))?;
                (ModelLayout::VisionLanguage, Fields::new(tc, path, "text_config.")?)
            }
            "qwen3_5_text" => (ModelLayout::TextOnly, top.clone()),
            other => {
                return Err(top.err(
                    "model_type",
                    &format!("`{other}` is not supported; fp4 runs Qwen3.5 dense models (`qwen3_5` or `qwen3_5_text`)"),
                ))
            }
        };
        if layout == ModelLayout::VisionLanguage {
            if let Some(Value::String(t)) = text.obj.get("model_type") {
                if t != "qwen3_5_text" {
                    return Err(text.err("model_type", &format!("`{t}` is not supported; expected `qwen3_5_text`")));
                }
            }
        }

        let num_hidden_layers = text.usize("num_hidden_layers", Some(32))?;
        let hidden_size = text.usize("hidden_size", Some(4096))?;
        let num_attention_heads = text.usize("num_attention_heads", Some(16))?;
        let num_key_value_heads = text.usize("num_key_value_heads", Some(4))?;
        let head_dim = text.usize("head_dim", Some(256))?;
        let linear_num_key_heads = text.usize("linear_num_key_heads", Some(16))?;
        let linear_num_value_heads = text.usize("linear_num_value_heads", Some(32))?;

        let layer_types = match text.obj.get("layer_types") {
            None | Some(Value::Null) => {
                let interval = text.usize("full_attention_interval", Some(4))?;
                if interval == 0 {
                    return Err(text.err("full_attention_interval", "must be at least 1"));
                }
                (0..num_hidden_layers)
                    .map(
                        |i| if (i + 1) % interval != 0 { LayerType::LinearAttention } else { LayerType::FullAttention },
                    )
                    .collect()
            }
            Some(Value::Array(items)) => {
                let mut types = Vec::with_capacity(items.len());
                for (i, item) in items.iter().enumerate() {
                    types.push(match item.as_str() {
                        Some("linear_attention") => LayerType::LinearAttention,
                        Some("full_attention") => LayerType::FullAttention,
                        _ => {
                            return Err(text.err(
                                &format!("layer_types[{i}]"),
                                &format!("{item} is not `linear_attention` or `full_attention`"),
                            ))
                        }
                    });
                }
                if types.len() != num_hidden_layers {
                    return Err(text.err(
                        "layer_types",
                        &format!("has {} entries but num_hidden_layers is {num_hidden_layers}", types.len()),
                    ));
                }
                types
            }
            Some(other) => return Err(text.err("layer_types", &format!("expected a list, got {other}"))),
        };

        // RoPE: `rope_parameters` (transformers >= 5) or the legacy `rope_theta` / `rope_scaling`.
        let rope = match text.obj.get("rope_parameters").or_else(|| text.obj.get("rope_scaling")) {
            Some(v @ Value::Object(_)) => Some(Fields::new(v, path, &format!("{}rope_parameters.", text.prefix))?),
            _ => None,
        };
        let mut rope_theta = text.f64("rope_theta", Some(10000.0))?;
        let mut partial_rotary_factor = text.f64("partial_rotary_factor", Some(0.25))?;
        if let Some(rope) = &rope {
            let rope_type = rope.str("rope_type", Some("default"))?;
            if rope_type != "default" {
                return Err(rope.err(
                    "rope_type",
                    &format!("`{rope_type}` is not supported yet; only `default` RoPE is implemented"),
                ));
            }
            rope_theta = rope.f64("rope_theta", Some(rope_theta))?;
            partial_rotary_factor = rope.f64("partial_rotary_factor", Some(partial_rotary_factor))?;
        }

        let hidden_act = text.str("hidden_act", Some("silu"))?;
        if hidden_act != "silu" {
            return Err(text.err("hidden_act", &format!("`{hidden_act}` is not supported; Qwen3.5 uses `silu`")));
        }

        // The VL wrapper decides tying at the top level; older saves only set it in text_config.
        let tie_word_embeddings = match layout {
            ModelLayout::VisionLanguage => match top.obj.get("tie_word_embeddings") {
                Some(_) => top.bool("tie_word_embeddings", Some(false))?,
                None => text.bool("tie_word_embeddings", Some(false))?,
            },
            ModelLayout::TextOnly => text.bool("tie_word_embeddings", Some(false))?,
        };

        let mut eos_token_ids = text.ids("eos_token_id")?;
        if eos_token_ids.is_empty() {
            eos_token_ids = top.ids("eos_token_id")?;
        }

        let cfg = TextConfig {
            layout,
            vocab_size: text.usize("vocab_size", Some(248320))?,
            hidden_size,
            intermediate_size: text.usize("intermediate_size", Some(12288))?,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rms_norm_eps: text.f64("rms_norm_eps", Some(1e-6))?,
            rope_theta,
            partial_rotary_factor,
            attention_bias: text.bool("attention_bias", Some(false))?,
            linear_conv_kernel_dim: text.usize("linear_conv_kernel_dim", Some(4))?,
            linear_key_head_dim: text.usize("linear_key_head_dim", Some(128))?,
            linear_value_head_dim: text.usize("linear_value_head_dim", Some(128))?,
            linear_num_key_heads,
            linear_num_value_heads,
            layer_types,
            tie_word_embeddings,
            max_position_embeddings: text.usize("max_position_embeddings", Some(32768))?,
            eos_token_ids,
            quantization_config: top.obj.get("quantization_config").cloned(),
        };
        cfg.validate(&text)?;
        Ok(cfg)
    }

    fn validate(&self, f: &Fields) -> Result<()> {
        let positive = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
            ("head_dim", self.head_dim),
            ("linear_conv_kernel_dim", self.linear_conv_kernel_dim),
            ("linear_key_head_dim", self.linear_key_head_dim),
            ("linear_value_head_dim", self.linear_value_head_dim),
            ("linear_num_key_heads", self.linear_num_key_heads),
            ("linear_num_value_heads", self.linear_num_value_heads),
        ];
        for (name, v) in positive {
            if v == 0 {
                return Err(f.err(name, "must be positive"));
            }
        }
        if !self.num_attention_heads.is_multiple_of(self.num_key_value_heads) {
            return Err(f.err(
                "num_key_value_heads",
                &format!(
                    "{} does not divide num_attention_heads {}",
                    self.num_key_value_heads, self.num_attention_heads
                ),
            ));
        }
        if !self.linear_num_value_heads.is_multiple_of(self.linear_num_key_heads) {
            return Err(f.err(
                "linear_num_key_heads",
                &format!(
                    "{} does not divide linear_num_value_heads {}",
                    self.linear_num_key_heads, self.linear_num_value_heads
                ),
            ));
        }
        let rot = self.rotary_dim();
        if !rot.is_multiple_of(2) || rot > self.head_dim {
            return Err(f.err(
                "partial_rotary_factor",
                &format!(
                    "gives a rotary dim of {rot} for head_dim {}; it must be even and at most head_dim",
                    self.head_dim
                ),
            ));
        }
        if self.rms_norm_eps.is_nan() || self.rms_norm_eps <= 0.0 {
            return Err(f.err("rms_norm_eps", "must be positive"));
        }
        Ok(())
    }

    /// Dimensions of each attention head that RoPE rotates (`int(head_dim * partial_rotary_factor)`).
    pub fn rotary_dim(&self) -> usize {
        (self.head_dim as f64 * self.partial_rotary_factor) as usize
    }

    /// GDN key width (`Hk·dk`): the size of each of the q and k blocks of `in_proj_qkv`.
    pub fn linear_key_dim(&self) -> usize {
        self.linear_num_key_heads * self.linear_key_head_dim
    }

    /// GDN value width (`Hv·dv`).
    pub fn linear_value_dim(&self) -> usize {
        self.linear_num_value_heads * self.linear_value_head_dim
    }

    /// Channels of the GDN causal conv (`2·key_dim + value_dim`).
    pub fn linear_conv_dim(&self) -> usize {
        2 * self.linear_key_dim() + self.linear_value_dim()
    }

    pub fn num_layers_of(&self, t: LayerType) -> usize {
        self.layer_types.iter().filter(|&&x| x == t).count()
    }
}

/// A JSON object with the path and key prefix used in error messages.
#[derive(Clone)]
struct Fields<'a> {
    obj: &'a Map<String, Value>,
    path: PathBuf,
    prefix: String,
}

impl<'a> Fields<'a> {
    fn new(value: &'a Value, path: &Path, prefix: &str) -> Result<Fields<'a>> {
        match value {
            Value::Object(obj) => Ok(Fields { obj, path: path.to_path_buf(), prefix: prefix.to_string() }),
            _ => Err(FormatError::Config {
                path: path.to_path_buf(),
                field: prefix.trim_end_matches('.').to_string(),
                msg: "expected a JSON object".into(),
            }),
        }
    }

    fn err(&self, field: &str, msg: &str) -> FormatError {
        FormatError::Config { path: self.path.clone(), field: format!("{}{field}", self.prefix), msg: msg.to_string() }
    }

    fn get(&self, name: &str) -> Option<&'a Value> {
        self.obj.get(name).filter(|v| !v.is_null())
    }

    fn missing(&self, name: &str) -> FormatError {
        self.err(name, "missing")
    }

    fn usize(&self, name: &str, default: Option<usize>) -> Result<usize> {
        match self.get(name) {
            None => default.ok_or_else(|| self.missing(name)),
            Some(v) => v
                .as_u64()
                .map(|x| x as usize)
                .ok_or_else(|| self.err(name, &format!("expected a non-negative integer, got {v}"))),
        }
    }

    fn f64(&self, name: &str, default: Option<f64>) -> Result<f64> {
        match self.get(name) {
            None => default.ok_or_else(|| self.missing(name)),
            Some(v) => v.as_f64().ok_or_else(|| self.err(name, &format!("expected a number, got {v}"))),
        }
    }

    fn bool(&self, name: &str, default: Option<bool>) -> Result<bool> {
        match self.get(name) {
            None => default.ok_or_else(|| self.missing(name)),
            Some(v) => v.as_bool().ok_or_else(|| self.err(name, &format!("expected true or false, got {v}"))),
        }
    }

    fn str(&self, name: &str, default: Option<&str>) -> Result<String> {
        match self.get(name) {
            None => default.map(str::to_string).ok_or_else(|| self.missing(name)),
            Some(v) => {
                v.as_str().map(str::to_string).ok_or_else(|| self.err(name, &format!("expected a string, got {v}")))
            }
        }
    }

    /// A token id or a list of them (HF allows both for `eos_token_id`); missing = empty.
    fn ids(&self, name: &str) -> Result<Vec<u32>> {
        let bad = |v: &Value| self.err(name, &format!("expected a token id or a list of ids, got {v}"));
        match self.get(name) {
            None => Ok(Vec::new()),
            Some(Value::Array(items)) => {
                items.iter().map(|v| v.as_u64().and_then(|x| u32::try_from(x).ok()).ok_or_else(|| bad(v))).collect()
            }
            Some(v) => Ok(vec![v.as_u64().and_then(|x| u32::try_from(x).ok()).ok_or_else(|| bad(v))?]),
        }
    }
}

/// Reads stop ids from `<dir>/generation_config.json` (`eos_token_id`, an id or a list);
/// an absent file gives an empty list.
pub fn generation_eos_ids(dir: &Path) -> Result<Vec<u32>> {
    let path = dir.join("generation_config.json");
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => return Err(FormatError::Io { path, source }),
    };
    let value: Value =
        serde_json::from_str(&text).map_err(|source| FormatError::Json { path: path.clone(), source })?;
    Fields::new(&value, &path, "")?.ids("eos_token_id")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(v: Value) -> Result<TextConfig> {
        TextConfig::from_json(&v, Path::new("config.json"))
    }

    #[test]
    fn vl_config_resolves_nested_fields_and_defaults() {
        let cfg = parse(json!({
            "model_type": "qwen3_5",
            "tie_word_embeddings": true,
            "text_config": {
                "model_type": "qwen3_5_text", "hidden_size": 64, "num_hidden_layers": 8,
                "rope_parameters": {"rope_type": "default", "rope_theta": 1e7, "partial_rotary_factor": 0.25},
                "eos_token_id": 7
            }
        }))
        .unwrap();
        assert_eq!(cfg.layout, ModelLayout::VisionLanguage);
        assert_eq!(cfg.hidden_size, 64);
        assert_eq!(cfg.head_dim, 256);
        assert!(cfg.tie_word_embeddings);
        assert_eq!(cfg.rope_theta, 1e7);
        assert_eq!(cfg.rotary_dim(), 64);
        assert_eq!(cfg.eos_token_ids, vec![7]);
        // interval 4: layers 3 and 7 are full attention.
        let full: Vec<usize> = (0..8).filter(|&i| cfg.layer_types[i] == LayerType::FullAttention).collect();
        assert_eq!(full, vec![3, 7]);
    }

    #[test]
    fn bad_configs_name_the_field() {
        let e = parse(json!({"model_type": "qwen3_next"})).unwrap_err().to_string();
        assert!(e.contains("model_type") && e.contains("qwen3_next"), "{e}");
        let e = parse(json!({"model_type": "qwen3_5_text", "num_hidden_layers": 2,
                             "layer_types": ["full_attention", "mamba"]}))
        .unwrap_err()
        .to_string();
        assert!(e.contains("layer_types[1]"), "{e}");
        let e = parse(json!({"model_type": "qwen3_5_text", "num_hidden_layers": 3,
                             "layer_types": ["full_attention"]}))
        .unwrap_err()
        .to_string();
        assert!(e.contains("has 1 entries"), "{e}");
        let e = parse(json!({"model_type": "qwen3_5_text", "linear_num_key_heads": 3})).unwrap_err().to_string();
        assert!(e.contains("linear_num_key_heads"), "{e}");
        let e = parse(json!({"model_type": "qwen3_5_text", "hidden_size": "big"})).unwrap_err().to_string();
        assert!(e.contains("hidden_size") && e.contains("integer"), "{e}");
        let e = parse(json!({"model_type": "qwen3_5", "text_config": {"rope_parameters": {"rope_type": "yarn"}}}))
            .unwrap_err()
            .to_string();
        assert!(e.contains("text_config.rope_parameters.rope_type"), "{e}");
    }
}
