//! `fp4 quantize --layout vl`: a flat `qwen3_5_text` source written as the VL wrapper vLLM
//! expects, the same tensors under `model.language_model.`, computing the same logits.

mod common;

use common::{eval_ids, fixtures, golden, logits};
use fp4_format::{Checkpoint, QuantConfig};
use fp4_model::{LoadOptions, Precision};
use serde_json::Value;
use std::path::Path;
use std::process::Command;

fn quantize(model: &str, out: &Path, extra: &[&str]) {
    let o = Command::new(env!("CARGO_BIN_EXE_fp4"))
        .args(["quantize", "--model", fixtures().join(model).to_str().unwrap(), "--output", out.to_str().unwrap()])
        .args(["--calib-data", golden(model).join("calib.jsonl").to_str().unwrap()])
        .args(extra)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

fn json(p: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

#[test]
fn a_flat_source_is_written_in_the_vl_layout() {
    let d = tempfile::tempdir().unwrap();
    let (flat, vl) = (d.path().join("flat"), d.path().join("vl"));
    // tiny-text: flat config, single file, tied embeddings. awq_lite also rewrites norms.
    quantize("tiny-text", &flat, &["--strategy", "awq_lite"]);
    quantize("tiny-text", &vl, &["--strategy", "awq_lite", "--layout", "vl"]);

    let (a, b) = (Checkpoint::open(&flat).unwrap(), Checkpoint::open(&vl).unwrap());
    assert_eq!((a.text_prefix, b.text_prefix), ("model.", "model.language_model."));
    let names_a: Vec<String> = a.names().map(fp4_quant::layout::vl_name).collect();
    let mut names_b: Vec<String> = b.names().map(str::to_string).collect();
    names_b.sort();
    let mut sorted_a = names_a.clone();
    sorted_a.sort();
    assert_eq!(sorted_a, names_b);
    assert!(names_b.iter().all(|n| n.starts_with("model.language_model.") || n.starts_with("lm_head")), "{names_b:?}");
    for n in a.names() {
        assert_eq!(a.raw(n).unwrap().2, b.raw(&fp4_quant::layout::vl_name(n)).unwrap().2, "{n}: same bytes");
    }

    let config = json(&vl.join("config.json"));
    assert_eq!(config["architectures"][0], "Qwen3_5ForConditionalGeneration");
    assert_eq!(
        (config["model_type"].as_str(), config["text_config"]["model_type"].as_str()),
        (Some("qwen3_5"), Some("qwen3_5_text"))
    );
    assert_eq!(config["tie_word_embeddings"], true);
    assert!(config["vision_config"].is_object() && config["text_config"].get("quantization_config").is_none());
    assert!(vl.join("preprocessor_config.json").exists(), "the stub the seed copied by hand");
    let q = config["quantization_config"]["ignore"].as_array().unwrap();
    assert!(
        q.iter().any(|m| m == "model.language_model.embed_tokens") && !q.iter().any(|m| m == "model.embed_tokens"),
        "{q:?}"
    );
    let hf = json(&vl.join("hf_quant_config.json"));
    assert!(hf["quantization"]["exclude_modules"]
        .as_array()
        .unwrap()
        .iter()
        .all(|m| !m.as_str().unwrap().starts_with("model.layers")));
    let report = json(&vl.join("quant_report.json"));
    assert_eq!(report["layout"]["written"], "vl");
    assert!(report["layers"].as_object().unwrap().keys().all(|k| k.starts_with("model.language_model.")));
    match b.quant.as_ref().unwrap() {
        QuantConfig::Uniform { exclude, .. } => {
            assert!(exclude.iter().any(|e| e == "model.language_model.embed_tokens"))
        }
        QuantConfig::Mixed { .. } => panic!("NVFP4 expected"),
    }

    // `fp4 inspect` says which layers stayed unquantized (the seed's step 2.6), in VL names.
    let o = Command::new(env!("CARGO_BIN_EXE_fp4")).args(["inspect", vl.to_str().unwrap(), "--json"]).output().unwrap();
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    let kept: Vec<&str> = v["unquantized_linears"].as_array().unwrap().iter().map(|n| n.as_str().unwrap()).collect();
    let flat_kept = report["layers"].as_object().unwrap().iter().filter(|(_, l)| l["format"] == "BF16").count();
    assert!(!kept.is_empty() && kept.len() == flat_kept, "{kept:?}");
    assert!(kept.iter().all(|n| n.starts_with("model.language_model.layers.")), "{kept:?}");
    let o = Command::new(env!("CARGO_BIN_EXE_fp4")).args(["inspect", vl.to_str().unwrap()]).output().unwrap();
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains(&format!("unquantized  {} linear layers kept in BF16", kept.len())), "{text}");

    // The same model: logits identical, W4A16 and W4A4.
    let ids = eval_ids("tiny-text");
    for w4a4 in [false, true] {
        let opts = || LoadOptions { quantize_activations: w4a4, ..LoadOptions::new(Precision::F32) };
        assert_eq!(logits(&flat, opts(), &ids), logits(&vl, opts(), &ids), "w4a4 {w4a4}");
    }
}

#[test]
fn the_default_keeps_the_source_layout_and_a_vl_source_stays_vl() {
    let d = tempfile::tempdir().unwrap();
    let (flat, vl_src, vl_flag) = (d.path().join("flat"), d.path().join("vl-src"), d.path().join("vl-flag"));
    quantize("tiny-text", &flat, &[]);
    assert_eq!(json(&flat.join("config.json"))["model_type"], "qwen3_5_text");
    assert!(!flat.join("preprocessor_config.json").exists());
    quantize("tiny-vl", &vl_src, &[]);
    quantize("tiny-vl", &vl_flag, &["--layout", "vl"]);
    for f in ["config.json", "hf_quant_config.json", "model.safetensors.index.json"] {
        assert_eq!(json(&vl_src.join(f)), json(&vl_flag.join(f)), "{f}");
    }
}
