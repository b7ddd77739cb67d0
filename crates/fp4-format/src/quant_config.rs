//! Quantization configs of checkpoints: ModelOpt (`hf_quant_config.json`, or `config.json`
//! `quantization_config` with `quant_method: modelopt`; single algorithm or `MIXED_PRECISION`) and
//! compressed-tensors (`nvfp4-pack-quantized`). Says, per module name, what the config promises.

use crate::{FormatError, Result};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Per-layer algorithms fp4 can execute.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerAlgo {
    /// W4A4 NVFP4 (weights and activations).
    Nvfp4,
    /// NVFP4 with AWQ pre-quant scales (ModelOpt `NVFP4_AWQ`).
    Nvfp4Awq,
    /// Weight-only NVFP4.
    W4A16Nvfp4,
    /// FP8 E4M3 per-tensor weights and activations.
    Fp8,
}

impl LayerAlgo {
    pub fn parse(s: &str) -> Option<LayerAlgo> {
        Some(match s.to_ascii_uppercase().as_str() {
            "NVFP4" => LayerAlgo::Nvfp4,
            "NVFP4_AWQ" => LayerAlgo::Nvfp4Awq,
            "W4A16_NVFP4" => LayerAlgo::W4A16Nvfp4,
            "FP8" => LayerAlgo::Fp8,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            LayerAlgo::Nvfp4 => "NVFP4",
            LayerAlgo::Nvfp4Awq => "NVFP4_AWQ",
            LayerAlgo::W4A16Nvfp4 => "W4A16_NVFP4",
            LayerAlgo::Fp8 => "FP8",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum QuantConfig {
    /// One algorithm for every module not matched by `exclude`.
    Uniform { producer: String, algo: LayerAlgo, exclude: Vec<String>, source: PathBuf },
    /// ModelOpt `MIXED_PRECISION`: listed modules have their algorithm, the rest are unquantized.
    Mixed { producer: String, layers: BTreeMap<String, LayerAlgo>, exclude: Vec<String>, source: PathBuf },
}

impl QuantConfig {
    /// Reads a model directory's quantization config; `None` for an unquantized checkpoint.
    pub fn from_dir(dir: &Path, config_json: Option<&Value>) -> Result<Option<QuantConfig>> {
        let legacy = dir.join("hf_quant_config.json");
        if legacy.exists() {
            let text =
                std::fs::read_to_string(&legacy).map_err(|source| FormatError::Io { path: legacy.clone(), source })?;
            let v: Value =
                serde_json::from_str(&text).map_err(|source| FormatError::Json { path: legacy.clone(), source })?;
            let q = v.get("quantization").ok_or_else(|| err(&legacy, "quantization", "missing"))?;
            return Self::modelopt(q, &legacy, producer(&v)).map(Some);
        }
        let path = dir.join("config.json");
        let Some(q) = config_json.and_then(|c| c.get("quantization_config")) else { return Ok(None) };
        match q.get("quant_method").and_then(Value::as_str) {
            Some("modelopt") => Self::modelopt(q, &path, producer(q)).map(Some),
            Some("compressed-tensors") => {
                let format = q.get("format").and_then(Value::as_str).unwrap_or("");
                if format != "nvfp4-pack-quantized" {
                    return Err(err(
                        &path,
                        "quantization_config.format",
                        &format!(
                            "compressed-tensors format `{format}` is not supported; fp4 reads `nvfp4-pack-quantized`"
                        ),
                    ));
                }
                let exclude = strings(q.get("ignore"), &path, "quantization_config.ignore")?;
                Ok(Some(QuantConfig::Uniform {
                    producer: "compressed-tensors".into(),
                    algo: LayerAlgo::Nvfp4,
                    exclude,
                    source: path,
                }))
            }
            other => Err(err(
                &path,
                "quantization_config.quant_method",
                &format!("{other:?} is not supported; fp4 reads `modelopt` and `compressed-tensors` checkpoints"),
            )),
        }
    }

    fn modelopt(q: &Value, path: &Path, producer: String) -> Result<QuantConfig> {
        let algo = q.get("quant_algo").and_then(Value::as_str).ok_or_else(|| err(path, "quant_algo", "missing"))?;
        let exclude = match q.get("exclude_modules").or_else(|| q.get("ignore")) {
            Some(v) => strings(Some(v), path, "exclude_modules")?,
            None => Vec::new(),
        };
        if algo.eq_ignore_ascii_case("MIXED_PRECISION") {
            let layers = q
                .get("quantized_layers")
                .and_then(Value::as_object)
                .ok_or_else(|| err(path, "quantized_layers", "missing (required for MIXED_PRECISION)"))?;
            let mut out = BTreeMap::new();
            for (name, cfg) in layers {
                let a = cfg.get("quant_algo").and_then(Value::as_str).unwrap_or("");
                let a = LayerAlgo::parse(a).ok_or_else(|| {
                    err(path, &format!("quantized_layers.{name}.quant_algo"), &format!("`{a}` is not supported"))
                })?;
                out.insert(name.clone(), a);
            }
            return Ok(QuantConfig::Mixed { producer, layers: out, exclude, source: path.to_path_buf() });
        }
        let algo = LayerAlgo::parse(algo).ok_or_else(|| {
            err(
                path,
                "quant_algo",
                &format!("`{algo}` is not supported; fp4 runs NVFP4, NVFP4_AWQ, W4A16_NVFP4, FP8 and MIXED_PRECISION"),
            )
        })?;
        Ok(QuantConfig::Uniform { producer, algo, exclude, source: path.to_path_buf() })
    }

    /// The algorithm the config promises for `module` (`None`: left unquantized).
    pub fn algo_for(&self, module: &str) -> Option<LayerAlgo> {
        match self {
            QuantConfig::Uniform { algo, exclude, .. } => (!excluded(module, exclude)).then_some(*algo),
            QuantConfig::Mixed { layers, exclude, .. } => {
                if excluded(module, exclude) {
                    return None;
                }
                // Names may differ by the VL prefix (`model.language_model.` vs `model.`).
                layers.get(module).or_else(|| layers.get(&alt_name(module))).copied()
            }
        }
    }

    pub fn source(&self) -> &Path {
        match self {
            QuantConfig::Uniform { source, .. } | QuantConfig::Mixed { source, .. } => source,
        }
    }

    /// One line for `fp4 inspect`.
    pub fn summary(&self) -> String {
        match self {
            QuantConfig::Uniform { producer, algo, exclude, .. } => {
                format!("{} by {producer}; {} excluded pattern(s)", algo.name(), exclude.len())
            }
            QuantConfig::Mixed { producer, layers, .. } => {
                let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
                for a in layers.values() {
                    *counts.entry(a.name()).or_default() += 1;
                }
                let parts: Vec<String> = counts.iter().map(|(k, v)| format!("{v} {k}")).collect();
                format!("MIXED_PRECISION by {producer}: {}", parts.join(", "))
            }
        }
    }
}

fn alt_name(module: &str) -> String {
    if let Some(rest) = module.strip_prefix("model.language_model.") {
        format!("model.{rest}")
    } else if let Some(rest) = module.strip_prefix("model.") {
        format!("model.language_model.{rest}")
    } else {
        module.to_string()
    }
}

/// Whether `module` is covered by an exclusion pattern: an exact name, a module subtree
/// (`a.b` covers `a.b.c`), or an fnmatch glob (`model.visual*`, `*linear_attn*`). Names are also
/// tried with the other text prefix, since checkpoints of both layouts exist.
pub fn excluded(module: &str, patterns: &[String]) -> bool {
    let alt = alt_name(module);
    patterns.iter().any(|p| [module, alt.as_str()].iter().any(|m| matches_module(m, p)))
}

fn matches_module(module: &str, pattern: &str) -> bool {
    if pattern.contains(['*', '?', '[']) {
        glob_match(pattern.as_bytes(), module.as_bytes())
    } else {
        module == pattern || module.strip_prefix(pattern).is_some_and(|r| r.starts_with('.'))
    }
}

/// fnmatch: `*` any run, `?` one char, `[abc]`/`[!abc]` classes.
pub fn glob_match(p: &[u8], s: &[u8]) -> bool {
    match p.first() {
        None => s.is_empty(),
        Some(b'*') => (0..=s.len()).any(|i| glob_match(&p[1..], &s[i..])),
        Some(b'?') => !s.is_empty() && glob_match(&p[1..], &s[1..]),
        Some(b'[') => {
            let Some(close) = p.iter().skip(2).position(|&c| c == b']').map(|i| i + 2) else {
                return s.first() == Some(&b'[') && glob_match(&p[1..], &s[1..]);
            };
            let (neg, set) = if p[1] == b'!' { (true, &p[2..close]) } else { (false, &p[1..close]) };
            !s.is_empty() && (class_contains(set, s[0]) != neg) && glob_match(&p[close + 1..], &s[1..])
        }
        Some(&c) => s.first() == Some(&c) && glob_match(&p[1..], &s[1..]),
    }
}

/// Membership in a glob class body such as `abc` or `0-9a-f`.
fn class_contains(set: &[u8], c: u8) -> bool {
    let mut i = 0;
    while i < set.len() {
        if i + 2 < set.len() && set[i + 1] == b'-' {
            if (set[i]..=set[i + 2]).contains(&c) {
                return true;
            }
            i += 3;
        } else {
            if set[i] == c {
                return true;
            }
            i += 1;
        }
    }
    false
}

fn producer(v: &Value) -> String {
    let p = v.get("producer");
    let name = p.and_then(|p| p.get("name")).and_then(Value::as_str).unwrap_or("unknown");
    match p.and_then(|p| p.get("version")).and_then(Value::as_str) {
        Some(ver) => format!("{name} {ver}"),
        None => name.to_string(),
    }
}

fn strings(v: Option<&Value>, path: &Path, field: &str) -> Result<Vec<String>> {
    match v {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(items)) => items
            .iter()
            .map(|i| i.as_str().map(str::to_string).ok_or_else(|| err(path, field, "expected a list of strings")))
            .collect(),
        Some(_) => Err(err(path, field, "expected a list of strings")),
    }
}

fn err(path: &Path, field: &str, msg: &str) -> FormatError {
    FormatError::Config { path: path.to_path_buf(), field: field.to_string(), msg: msg.to_string() }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn exclusion_patterns() {
        let pats: Vec<String> =
            ["lm_head", "model.visual*", "model.language_model.layers.0.linear_attn.in_proj_a", "*layers.3.*"]
                .iter()
                .map(|s| s.to_string())
                .collect();
        assert!(excluded("lm_head", &pats));
        assert!(excluded("model.visual.blocks.0.attn.qkv", &pats));
        assert!(excluded("model.layers.0.linear_attn.in_proj_a", &pats), "the other layout's name");
        assert!(excluded("model.language_model.layers.3.mlp.up_proj", &pats));
        assert!(!excluded("model.language_model.layers.0.linear_attn.in_proj_ab", &pats));
        assert!(!excluded("model.language_model.layers.13.mlp.up_proj", &pats));
        assert!(glob_match(b"a[bc]?d", b"acxd") && !glob_match(b"a[!bc]d", b"abd"));
        assert!(
            glob_match(b"*layers.1[0-9].*", b"m.layers.12.mlp") && !glob_match(b"*layers.1[0-9].*", b"m.layers.1.mlp")
        );
    }

    #[test]
    fn modelopt_configs() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = json!({"quantization_config": {"quant_method": "modelopt", "quant_algo": "MIXED_PRECISION",
            "quantized_layers": {"model.layers.0.mlp.up_proj": {"quant_algo": "FP8"},
                                 "model.layers.0.mlp.down_proj": {"quant_algo": "NVFP4", "group_size": 16}}}});
        let q = QuantConfig::from_dir(dir.path(), Some(&cfg)).unwrap().unwrap();
        assert_eq!(q.algo_for("model.language_model.layers.0.mlp.up_proj"), Some(LayerAlgo::Fp8));
        assert_eq!(q.algo_for("model.layers.0.mlp.down_proj"), Some(LayerAlgo::Nvfp4));
        assert_eq!(q.algo_for("model.layers.0.mlp.gate_proj"), None);
        std::fs::write(
            dir.path().join("hf_quant_config.json"),
            r#"{"producer": {"name": "modelopt", "version": "0.47.0"}, "quantization": {"quant_algo": "NVFP4_SVD", "kv_cache_quant_algo": null}}"#,
        )
        .unwrap();
        let e = QuantConfig::from_dir(dir.path(), None).unwrap_err().to_string();
        assert!(e.contains("hf_quant_config.json") && e.contains("NVFP4_SVD"), "{e}");
    }
}
