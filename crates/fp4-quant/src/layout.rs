//! The layout an export is written in. `Source` keeps the source's (what ModelOpt does). `Vl`
//! writes a flat text-only source (`qwen3_5_text`, tensors under `model.`) as the VL wrapper
//! that vLLM's Qwen3.5 support expects (`Qwen3_5ForConditionalGeneration`, `model_type: qwen3_5`,
//! the text config under `text_config`, tensors under `model.language_model.`), plus the
//! `preprocessor_config.json` stub vLLM's multimodal processor needs — the fixes the seed's
//! §3.1 made by hand (reference/annie.md §4.6–4.8; qwen35.md §2.1). Serve it with vLLM's
//! `--language-model-only`: there are no vision weights.
//!
//! [`apply`] rewrites a finished export directory (the temporary one, before it is renamed into
//! place): tensor names in every safetensors header (the data bytes are copied unchanged), the
//! index, `config.json`, `hf_quant_config.json`, and the names in `quant_report.json`.

use crate::{QuantError, Result};
use fp4_format::Checkpoint;
use serde_json::{json, Map, Value};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;

const VL_PREFIX: &str = "model.language_model.";

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Layout {
    /// The source's layout, flat or VL.
    #[default]
    Source,
    /// The VL wrapper.
    Vl,
}

fn out_err(path: &Path, msg: impl Into<String>) -> QuantError {
    QuantError::Output { path: path.to_path_buf(), msg: msg.into() }
}

/// The VL name of a flat text-model name (`model.layers.0.…` → `model.language_model.layers.0.…`;
/// `lm_head`, `mtp.*` and globs that do not start with `model.` are the same in both layouts).
pub fn vl_name(name: &str) -> String {
    match name.strip_prefix("model.") {
        Some(rest) if !name.starts_with(VL_PREFIX) && !name.starts_with("model.visual") => format!("{VL_PREFIX}{rest}"),
        _ => name.to_string(),
    }
}

/// Rewrites the export in `dir`, made from `ckpt`, into `layout`. Nothing to do for `Source`, or
/// for a source that is already in the VL layout.
pub fn apply(layout: Layout, ckpt: &Checkpoint, dir: &Path) -> Result<()> {
    if layout == Layout::Source || ckpt.text_prefix == VL_PREFIX {
        return Ok(());
    }
    let entries = std::fs::read_dir(dir).map_err(|e| out_err(dir, e.to_string()))?;
    for e in entries.flatten() {
        if e.file_name().to_string_lossy().ends_with(".safetensors") {
            rename_tensors(&e.path())?;
        }
    }
    let index = dir.join("model.safetensors.index.json");
    if index.exists() {
        let mut v = read_json(&index)?;
        if let Some(map) = v["weight_map"].as_object() {
            v["weight_map"] = Value::Object(map.iter().map(|(k, f)| (vl_name(k), f.clone())).collect());
        }
        write_json(&index, &v)?;
    }
    let config_path = dir.join("config.json");
    let config = vl_config(&read_json(&config_path)?, dir);
    write_json(&config_path, &config)?;
    let hf_quant = dir.join("hf_quant_config.json");
    if hf_quant.exists() {
        let mut v = read_json(&hf_quant)?;
        rename_quant_names(&mut v["quantization"]);
        write_json(&hf_quant, &v)?;
    }
    if !dir.join("preprocessor_config.json").exists() {
        write_json(&dir.join("preprocessor_config.json"), &crate::export::preprocessor_stub(&config))?;
    }
    let report = dir.join(crate::export::REPORT);
    if report.exists() {
        let mut v = read_json(&report)?;
        if let Some(layers) = v["layers"].as_object() {
            v["layers"] = Value::Object(layers.iter().map(|(k, l)| (vl_name(k), l.clone())).collect());
        }
        for key in ["exclude_modules", "widened_exclusions", "modified_tensors"] {
            rename_list(&mut v[key]);
        }
        v["layout"] = json!({"written": "vl", "source": "text-only (model.*)"});
        // The stub is fp4's too (a later --force replaces only what the report lists).
        if let Some(files) = v["files"].as_array_mut() {
            if !files.iter().any(|f| f == "preprocessor_config.json") {
                files.push(json!("preprocessor_config.json"));
            }
        }
        write_json(&report, &v)?;
    }
    Ok(())
}

fn rename_list(v: &mut Value) {
    if let Some(a) = v.as_array_mut() {
        for s in a.iter_mut() {
            if let Some(n) = s.as_str() {
                *s = Value::String(vl_name(n));
            }
        }
    }
}

/// Module names in a `quantization_config` / `hf_quant_config.json` `quantization` object.
fn rename_quant_names(q: &mut Value) {
    for key in ["ignore", "exclude_modules"] {
        rename_list(&mut q[key]);
    }
    if let Some(layers) = q["quantized_layers"].as_object() {
        q["quantized_layers"] = Value::Object(layers.iter().map(|(k, l)| (vl_name(k), l.clone())).collect());
    }
}

/// The id of a special token in the directory's tokenizer, if it has it.
fn special_id(dir: &Path, token: &str) -> Option<u64> {
    let text = std::fs::read_to_string(dir.join("tokenizer.json")).ok()?;
    let v: Value = serde_json::from_str(&text).ok()?;
    v["added_tokens"].as_array()?.iter().find(|t| t["content"] == token)?["id"].as_u64()
}

/// `Qwen3_5Config` around a flat `Qwen3_5TextConfig`: the text fields under `text_config`
/// (`model_type: qwen3_5_text`), `Qwen3_5VisionConfig`'s defaults with `out_hidden_size` = the
/// text hidden size, the vision token ids from the tokenizer (Qwen3.5's otherwise), tying and
/// `quantization_config` (with VL names) at the top.
fn vl_config(flat: &Value, dir: &Path) -> Value {
    let mut text: Map<String, Value> = flat.as_object().cloned().unwrap_or_default();
    let quant = text.remove("quantization_config");
    text.remove("architectures");
    text.remove("auto_map");
    text.insert("model_type".into(), json!("qwen3_5_text"));
    let hidden = text.get("hidden_size").cloned().unwrap_or(json!(4096));
    let mut top = Map::new();
    top.insert("architectures".into(), json!(["Qwen3_5ForConditionalGeneration"]));
    top.insert("model_type".into(), json!("qwen3_5"));
    for (key, token, default) in [
        ("image_token_id", "<|image_pad|>", 248056),
        ("video_token_id", "<|video_pad|>", 248057),
        ("vision_start_token_id", "<|vision_start|>", 248053),
        ("vision_end_token_id", "<|vision_end|>", 248054),
    ] {
        top.insert(key.into(), json!(special_id(dir, token).unwrap_or(default)));
    }
    top.insert("tie_word_embeddings".into(), text.get("tie_word_embeddings").cloned().unwrap_or(json!(false)));
    for key in ["dtype", "torch_dtype", "transformers_version"] {
        if let Some(v) = text.get(key) {
            top.insert(key.into(), v.clone());
        }
    }
    top.insert(
        "vision_config".into(),
        json!({
            "model_type": "qwen3_5_vision", "depth": 27, "hidden_size": 1152, "hidden_act": "gelu_pytorch_tanh",
            "intermediate_size": 4304, "num_heads": 16, "in_channels": 3, "patch_size": 16,
            "spatial_merge_size": 2, "temporal_patch_size": 2, "out_hidden_size": hidden,
            "num_position_embeddings": 2304, "deepstack_visual_indexes": [], "initializer_range": 0.02,
        }),
    );
    top.insert("text_config".into(), Value::Object(text));
    if let Some(mut q) = quant {
        rename_quant_names(&mut q);
        top.insert("quantization_config".into(), q);
    }
    Value::Object(top)
}

fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(|e| out_err(path, e.to_string()))?;
    serde_json::from_str(&text).map_err(|e| out_err(path, e.to_string()))
}

fn write_json(path: &Path, v: &Value) -> Result<()> {
    let text = serde_json::to_string_pretty(v).map_err(|e| out_err(path, e.to_string()))?;
    std::fs::write(path, text + "\n").map_err(|e| out_err(path, e.to_string()))
}

/// Renames the tensors of one safetensors file: a new header (padded to 8 bytes, as the
/// safetensors crate writes it), then the data bytes as they were.
fn rename_tensors(path: &Path) -> Result<()> {
    let err = |m: String| out_err(path, m);
    let mut f = std::fs::File::open(path).map_err(|e| err(e.to_string()))?;
    let mut len = [0u8; 8];
    f.read_exact(&mut len).map_err(|e| err(format!("not a safetensors file: {e}")))?;
    let n = u64::from_le_bytes(len);
    let total = f.metadata().map_err(|e| err(e.to_string()))?.len();
    if n > total.saturating_sub(8) || n > 100 << 20 {
        return Err(err(format!("safetensors header length {n} does not fit a {total}-byte file")));
    }
    let mut header = vec![0u8; n as usize];
    f.read_exact(&mut header).map_err(|e| err(e.to_string()))?;
    let v: Map<String, Value> = serde_json::from_slice(&header).map_err(|e| err(format!("safetensors header: {e}")))?;
    let renamed: Map<String, Value> =
        v.into_iter().map(|(k, t)| if k == "__metadata__" { (k, t) } else { (vl_name(&k), t) }).collect();
    let mut new_header = serde_json::to_vec(&renamed).map_err(|e| err(e.to_string()))?;
    while new_header.len() % 8 != 0 {
        new_header.push(b' ');
    }
    let tmp = path.with_extension("safetensors.vl-tmp");
    let mut write = || -> std::io::Result<()> {
        let mut out = std::io::BufWriter::new(std::fs::File::create(&tmp)?);
        out.write_all(&(new_header.len() as u64).to_le_bytes())?;
        out.write_all(&new_header)?;
        f.seek(SeekFrom::Start(8 + n))?;
        std::io::copy(&mut f, &mut out)?;
        out.into_inner().map_err(|e| e.into_error())?.sync_all()?;
        std::fs::set_permissions(&tmp, std::fs::metadata(path)?.permissions())?;
        std::fs::rename(&tmp, path)
    };
    write().map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        err(e.to_string())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_only_the_text_model() {
        assert_eq!(vl_name("model.layers.0.mlp.up_proj.weight"), "model.language_model.layers.0.mlp.up_proj.weight");
        assert_eq!(vl_name("model.embed_tokens"), "model.language_model.embed_tokens");
        assert_eq!(vl_name("model.layers.1.linear_attn*"), "model.language_model.layers.1.linear_attn*");
        for same in [
            "lm_head",
            "lm_head.weight",
            "mtp.fc.weight",
            "mtp*",
            "*linear_attn*",
            "model.language_model.norm.weight",
            "model.visual*",
        ] {
            assert_eq!(vl_name(same), same);
        }
    }

    #[test]
    fn the_vl_config_wraps_the_flat_one() {
        let flat = json!({
            "architectures": ["Qwen3_5ForCausalLM"], "model_type": "qwen3_5_text", "hidden_size": 64,
            "tie_word_embeddings": true, "eos_token_id": 7, "dtype": "bfloat16",
            "quantization_config": {"quant_algo": "NVFP4", "ignore": ["lm_head", "model.embed_tokens", "model.layers.0.linear_attn*"]},
        });
        let d = tempfile::tempdir().unwrap();
        let v = vl_config(&flat, d.path());
        assert_eq!(v["architectures"], json!(["Qwen3_5ForConditionalGeneration"]));
        assert_eq!(
            (v["model_type"].as_str(), v["text_config"]["model_type"].as_str()),
            (Some("qwen3_5"), Some("qwen3_5_text"))
        );
        assert_eq!(v["text_config"]["eos_token_id"], 7);
        assert!(
            v["text_config"].get("architectures").is_none() && v["text_config"].get("quantization_config").is_none()
        );
        assert_eq!(
            (v["tie_word_embeddings"].as_bool(), v["vision_config"]["out_hidden_size"].as_u64()),
            (Some(true), Some(64))
        );
        assert_eq!(v["image_token_id"], 248056);
        assert_eq!(
            v["quantization_config"]["ignore"],
            json!(["lm_head", "model.language_model.embed_tokens", "model.language_model.layers.0.linear_attn*"])
        );
    }
}
