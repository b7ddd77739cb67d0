//! `fp4 quantize` against NVIDIA ModelOpt 0.47 (tests/reference/make_modelopt_golden.py, run on a
//! GPU machine), and fp4 loading ModelOpt / compressed-tensors NVFP4 checkpoints.

mod common;

use common::{eval_ids, fixtures, golden, logits};
use fp4_format::quant_config::excluded;
use fp4_format::{Checkpoint, DType, QuantConfig};
use fp4_model::{Linear, LoadOptions, Precision, Tensor};
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Command;

fn fp4(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_fp4")).args(args).env("RUST_LOG", "warn").output().unwrap()
}

fn quantize(model: &str, strategy: &str, out: &Path) {
    let o = fp4(&[
        "quantize",
        "--model",
        fixtures().join(model).to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
        "--strategy",
        strategy,
        "--calib-data",
        golden(model).join("calib.jsonl").to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

fn f32s(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect()
}

fn safetensors_f32(path: &Path, name: &str) -> Vec<f32> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    f32s(st.tensor(name).unwrap().data())
}

/// Quantized modules (those with a U8 `.weight`) of a checkpoint.
fn quantized_modules(c: &Checkpoint) -> BTreeSet<String> {
    c.names()
        .filter_map(|n| n.strip_suffix(".weight"))
        .filter(|m| c.tensor(&format!("{m}.weight")).unwrap().dtype == DType::U8)
        .map(str::to_string)
        .collect()
}

fn exclude_list(q: &QuantConfig) -> Vec<String> {
    match q {
        QuantConfig::Uniform { exclude, .. } => exclude.clone(),
        QuantConfig::Mixed { .. } => panic!("expected a single-algorithm config"),
    }
}

/// The acceptance check: same quantized set, byte-identical weight / weight_scale /
/// weight_scale_2, input_scale within 2 %, same quant_algo, equivalent exclusions.
fn assert_matches_modelopt(ours_dir: &Path, theirs_dir: &Path) {
    let ours = Checkpoint::open(ours_dir).unwrap();
    let theirs = Checkpoint::open(theirs_dir).unwrap();
    let qs = quantized_modules(&ours);
    assert_eq!(qs, quantized_modules(&theirs), "quantized modules");
    assert!(!qs.is_empty());
    let mut worst_input = 0f32;
    for m in &qs {
        for t in ["weight", "weight_scale", "weight_scale_2"] {
            let name = format!("{m}.{t}");
            let (a, b) = (ours.tensor(&name).unwrap(), theirs.tensor(&name).unwrap());
            assert_eq!((a.dtype, a.shape), (b.dtype, b.shape), "{name}");
            assert!(a.bytes == b.bytes, "{name} differs from ModelOpt's export");
        }
        let name = format!("{m}.input_scale");
        let (a, b) = (ours.load_scalar(&name).unwrap(), theirs.load_scalar(&name).unwrap());
        worst_input = worst_input.max((a - b).abs() / b);
    }
    eprintln!(
        "{}: {} modules byte-identical; worst input_scale difference {:.3}%",
        ours_dir.display(),
        qs.len(),
        worst_input * 100.0
    );
    assert!(worst_input < 0.02, "input_scale differs by {worst_input}");
    let (qa, qb) = (ours.quant.as_ref().unwrap(), theirs.quant.as_ref().unwrap());
    assert_eq!(qa.algo_for(qs.first().unwrap()), qb.algo_for(qs.first().unwrap()));
    // Equivalent exclusions: every module name of the model is excluded by both lists or by neither.
    let (ea, eb) = (exclude_list(qa), exclude_list(qb));
    let mut names: BTreeSet<String> =
        theirs.names().filter_map(|n| n.rsplit_once('.').map(|(m, _)| m.to_string())).collect();
    names.extend(["lm_head".to_string(), theirs.text_name("embed_tokens")]);
    for n in names.iter().filter(|n| !n.starts_with("mtp.")) {
        assert_eq!(excluded(n, &ea), excluded(n, &eb), "exclusion of {n}: ours {ea:?} theirs {eb:?}");
    }
}

#[test]
fn rtn_export_is_byte_identical_to_modelopt() {
    let dir = tempfile::tempdir().unwrap();
    for model in ["tiny-vl", "tiny-text", "tiny-quant"] {
        let out = dir.path().join(format!("{model}-rtn"));
        quantize(model, "rtn", &out);
        assert_matches_modelopt(&out, &golden(model).join("nvfp4_default"));
    }
}

#[test]
fn mlp_only_export_is_byte_identical_to_modelopt() {
    let dir = tempfile::tempdir().unwrap();
    for model in ["tiny-vl", "tiny-text", "tiny-quant"] {
        let out = dir.path().join(format!("{model}-mlp"));
        quantize(model, "mlp_only", &out);
        assert_matches_modelopt(&out, &golden(model).join("nvfp4_mlp_only"));
    }
}

/// ‖a − b‖ / ‖b‖.
fn rms_rel(a: &[f32], b: &[f32]) -> f32 {
    let d: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let n: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (d / n).sqrt() as f32
}

fn rel(a: &[f32], b: &[f32]) -> f32 {
    let m = b.iter().fold(0f32, |m, x| m.max(x.abs()));
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max) / m
}

/// W4A16 in f32 is exactly the function the checkpoint's tensors define: transformers running
/// the dequantized weights (× pre_quant_scale columns for AWQ) in fp32
/// (tests/reference/dequant_reference.py). Covers ModelOpt NVFP4 / MLP-only / NVFP4_AWQ exports
/// and a compressed-tensors checkpoint.
#[test]
fn quantized_checkpoints_compute_what_their_tensors_define() {
    let ids = eval_ids("tiny-quant");
    for name in ["nvfp4_default", "nvfp4_mlp_only", "nvfp4_awq_lite", "ct_nvfp4"] {
        let dir = golden("tiny-quant").join(name);
        let want = safetensors_f32(&golden("tiny-quant").join(format!("{name}.dense.safetensors")), "logits");
        let got = logits(&dir, LoadOptions::new(Precision::F32), &ids);
        let err = rel(&got, &want);
        eprintln!("{name}: W4A16 f32 vs dequantized reference {err:.2e}");
        assert!(err < 1e-4, "{name}: {err:.2e}");
    }
}

/// Input shape, input and ModelOpt's output of one linear.
type LayerIo = (Vec<usize>, Vec<f32>, Vec<f32>);

/// Single quantized linears, W4A4 in bf16, against ModelOpt's fake-quant module on the same
/// inputs: the activation and weight quantization semantics agree to bf16 rounding.
#[test]
fn w4a4_linears_match_modelopt_fake_quant() {
    for name in ["nvfp4_default", "nvfp4_mlp_only", "nvfp4_awq_lite"] {
        let dir = golden("tiny-quant").join(name);
        let ckpt = Checkpoint::open(&dir).unwrap();
        let io_path = golden("tiny-quant").join(format!("{name}.layers.safetensors"));
        let bytes = std::fs::read(&io_path).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let mut modules: BTreeMap<String, LayerIo> = BTreeMap::new();
        for (n, t) in st.tensors() {
            if let Some(m) = n.strip_suffix(".x") {
                let y = f32s(st.tensor(&format!("{m}.y")).unwrap().data());
                modules.insert(m.to_string(), (t.shape().to_vec(), f32s(t.data()), y));
            }
        }
        let mut checked = 0;
        for (m, (shape, x, y)) in &modules {
            // AWQ exports fold some pre-quant scales into the preceding norm: those layers no
            // longer compute what ModelOpt's fake-quant module computes on its own.
            if name == "nvfp4_awq_lite" && !ckpt.contains(&format!("{m}.pre_quant_scale")) {
                continue;
            }
            let n_out = y.len() / shape[0];
            let opts = LoadOptions { quantize_activations: true, ..LoadOptions::new(Precision::Bf16) };
            let lin = Linear::load(&ckpt, m, shape[1], n_out, false, opts).unwrap();
            let got = lin.forward(&Tensor::from_vec(x.clone(), shape), Precision::Bf16).into_vec();
            let err = rms_rel(&got, y);
            // What quantizing the activations changes at all: the same layer as W4A16.
            let mut w4a16 = lin.clone();
            w4a16.quantize_activations = false;
            let act_effect =
                rms_rel(&w4a16.forward(&Tensor::from_vec(x.clone(), shape), Precision::Bf16).into_vec(), y);
            eprintln!("{name} {m}: W4A4 rms error {err:.2e} (W4A16 would be {act_effect:.2e})");
            assert!(err < 3e-2 && err < act_effect / 4.0, "{name} {m}: {err:.2e} vs {act_effect:.2e}");
            checked += 1;
        }
        assert!(checked >= 3, "{name}: only {checked} layers compared");
    }
}

/// Whole models, W4A4 in bf16, against ModelOpt's fake-quant model (after the fused-scale
/// sharing its export applies). Rounding ties go differently in a few activations per layer (see
/// the single-layer test: ~0.5 % RMS per linear) and that accumulates over a model's ~30 linears,
/// so the check is statistical: fp4 is clearly closer to ModelOpt's quantized model than the
/// unquantized model is, and agrees on the top token. (For NVFP4_AWQ exports ModelOpt's folded (1+w) norms make the export compute
/// a different function; see `quantized_checkpoints_compute_what_their_tensors_define`.)
#[test]
fn w4a4_models_track_modelopt_fake_quant() {
    let ids = eval_ids("tiny-quant");
    let root = golden("tiny-quant");
    let bf16 = safetensors_f32(&root.join("bf16.logits.safetensors"), "logits");
    let vocab = bf16.len() / ids.len();
    let argmax = |v: &[f32]| -> Vec<usize> {
        v.chunks_exact(vocab).map(|r| (0..vocab).fold(0, |b, i| if r[i] > r[b] { i } else { b })).collect()
    };
    for (name, reference) in
        [("nvfp4_default", "nvfp4_default"), ("nvfp4_mlp_only", "nvfp4_mlp_only"), ("ct_nvfp4", "nvfp4_default")]
    {
        let want = safetensors_f32(&root.join(format!("{reference}.fused_logits.safetensors")), "logits");
        let opts = LoadOptions { quantize_activations: true, ..LoadOptions::new(Precision::Bf16) };
        let got = logits(&root.join(name), opts, &ids);
        let err = rms_rel(&got, &want);
        let quant_effect = rms_rel(&bf16, &want);
        let agree = argmax(&got).iter().zip(argmax(&want)).filter(|(a, b)| **a == *b).count();
        eprintln!("{name}: rms error vs ModelOpt fake-quant {err:.2e} (unquantized model: {quant_effect:.2e}); top-1 {agree}/{}", ids.len());
        assert!(err < 0.6 * quant_effect, "{name}: {err:.2e} vs {quant_effect:.2e}");
        assert!(agree * 10 >= ids.len() * 9, "{name}: top-1 agreement {agree}/{}", ids.len());
    }
}

#[test]
fn quantize_refuses_to_overwrite_and_names_bad_calibration_lines() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("q");
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("mine.txt"), "not fp4's").unwrap();
    let model = fixtures().join("tiny-text");
    let calib = golden("tiny-text").join("calib.jsonl");
    // Runs quantize expecting failure; returns stderr.
    let fails = |model: &Path, out: &Path, calib: &Path| -> String {
        let o = fp4(&[
            "quantize",
            "--model",
            model.to_str().unwrap(),
            "--output",
            out.to_str().unwrap(),
            "--calib-data",
            calib.to_str().unwrap(),
        ]);
        assert!(!o.status.success());
        String::from_utf8_lossy(&o.stderr).into_owned()
    };
    let err = fails(&model, &out, &calib);
    assert!(err.contains("not an fp4 output"), "{err}");
    let bad = dir.path().join("bad.jsonl");
    // A bad line is skipped and reported; the good ones are used.
    std::fs::write(&bad, "{\"input_ids\": [1, 2, 3]}\n{\"input_ids\": [1, 99999]}\nnot json\n").unwrap();
    let o = fp4(&[
        "quantize",
        "--model",
        model.to_str().unwrap(),
        "--output",
        dir.path().join("q1").to_str().unwrap(),
        "--calib-data",
        bad.to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(
        err.contains("1 samples, 2 bad lines skipped") && err.contains("bad.jsonl:2") && err.contains("99999"),
        "{err}"
    );
    // Samples longer than --calib-seq-len are cut, and the run says so; a length beyond the model's
    // positions is refused.
    let long: Vec<u32> = (0..40).map(|i| 1 + i % 50).collect();
    std::fs::write(&bad, format!("{}\n", serde_json::json!({"input_ids": long}))).unwrap();
    let (m, c) = (model.to_str().unwrap(), bad.to_str().unwrap());
    let o = fp4(&[
        "quantize",
        "--model",
        m,
        "--output",
        dir.path().join("q5").to_str().unwrap(),
        "--calib-data",
        c,
        "--calib-seq-len",
        "16",
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success() && err.contains("1 of 1 samples cut to 16 tokens (the longest had 40)"), "{err}");
    let o = fp4(&[
        "quantize",
        "--model",
        m,
        "--output",
        dir.path().join("q6").to_str().unwrap(),
        "--calib-data",
        c,
        "--calib-seq-len",
        "40000",
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("exceeds the model's max_position_embeddings (32768)"), "{err}");
    std::fs::write(&bad, "{\"input_ids\": [1, 99999]}\n").unwrap();
    let err = fails(&model, &dir.path().join("q2"), &bad);
    assert!(
        err.contains("no usable calibration samples") && err.contains("bad.jsonl:1") && err.contains("99999"),
        "{err}"
    );
    std::fs::write(&bad, "{\"text\": \"hello\"}\n").unwrap();
    let err = fails(&model, &dir.path().join("q3"), &bad);
    assert!(err.contains("bad.jsonl:1") && err.contains("messages"), "{err}");
    assert!(!dir.path().join("q2").exists() && !dir.path().join("q3").exists());
    let err = fails(&golden("tiny-text").join("nvfp4_default"), &dir.path().join("q4"), &calib);
    assert!(err.contains("already quantized"), "{err}");
}

/// Conversations (with tool calls) are rendered with the model's chat template and tokenized;
/// user exclusions keep whole fused groups in BF16; the export loads and runs; its report and
/// `fp4 inspect` describe it.
#[test]
fn quantize_from_conversations_with_exclusions() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    std::fs::create_dir(&model).unwrap();
    for e in std::fs::read_dir(fixtures().join("tiny-quant")).unwrap().flatten() {
        std::fs::copy(e.path(), model.join(e.file_name())).unwrap();
    }
    let template = Path::new(env!("CARGO_MANIFEST_DIR")).join("crates/fp4-chat/templates/qwen3_5.jinja");
    std::fs::copy(template, model.join("chat_template.jinja")).unwrap();
    let calib = dir.path().join("calib.jsonl");
    let conv = serde_json::json!({"messages": [
        {"role": "system", "content": "You are Annie."},
        {"role": "user", "content": "What's the capital of Japan?"},
        {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {"name": "web_search", "arguments": "{\"query\": \"capital of Japan\"}"}}]},
        {"role": "tool", "content": "Tokyo"},
        {"role": "assistant", "content": "It's Tokyo."}],
        "tools": [{"type": "function", "function": {"name": "web_search", "parameters": {"type": "object", "properties": {"query": {"type": "string"}}}}}]});
    std::fs::write(&calib, format!("{conv}\n{{\"input_ids\": [5, 6, 7, 8]}}\n")).unwrap();
    let out = dir.path().join("out");
    let o = fp4(&[
        "quantize",
        "--model",
        model.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
        "--calib-data",
        calib.to_str().unwrap(),
        "--exclude-layers",
        "linear_attn,layers.0,self_attn.k_proj",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("quant_report.json")).unwrap()).unwrap();
    assert_eq!(report["calibration"]["samples"], 2);
    assert!(report["calibration"]["tokens"].as_u64().unwrap() > 40);
    // k_proj named alone: q_proj and v_proj stay BF16 with it.
    let widened: Vec<String> = serde_json::from_value(report["widened_exclusions"].clone()).unwrap();
    assert!(widened.iter().any(|n| n.ends_with("layers.1.self_attn.q_proj")), "{widened:?}");
    let ckpt = Checkpoint::open(&out).unwrap();
    let q = quantized_modules(&ckpt);
    assert!(q.iter().all(|m| m.contains(".mlp.") || m.ends_with("o_proj")), "{q:?}");
    assert!(!q.iter().any(|m| m.contains("layers.0.")), "{q:?}");
    assert!(q.contains("model.language_model.layers.5.mlp.down_proj"));
    // Nothing lost: every source tensor other than quantized weights is still there, unchanged.
    let src = Checkpoint::open(&model).unwrap();
    for n in src.names() {
        if !q.iter().any(|m| n == format!("{m}.weight")) {
            assert_eq!(src.raw(n).unwrap().2, ckpt.raw(n).unwrap().2, "{n}");
        }
    }
    assert!(
        out.join("chat_template.jinja").exists()
            && out.join("tokenizer.json").exists()
            && out.join("preprocessor_config.json").exists()
    );
    let ids = eval_ids("tiny-quant");
    let got = logits(&out, LoadOptions::new(Precision::F32), &ids);
    assert!(got.iter().all(|v| v.is_finite()));
    let o = fp4(&["inspect", out.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains("NVFP4") && text.contains("quantized"), "{text}");
}

/// An `--exclude-layers` item that names nothing is an error naming it (`--allow-unmatched`:
/// a warning), `layers.last` names the last layer, and asking for more calibration samples than
/// the file holds says so with both counts.
#[test]
fn unmatched_exclusions_refused_and_short_calibration_reported() {
    let dir = tempfile::tempdir().unwrap();
    let model = fixtures().join("tiny-quant");
    let calib = fixtures().join("modelopt/tiny-quant/calib.jsonl");
    let run = |out: &str, extra: &[&str]| {
        let out = dir.path().join(out);
        let mut args = vec!["quantize", "--model", model.to_str().unwrap(), "--calib-data", calib.to_str().unwrap()];
        args.extend(["--output", out.to_str().unwrap()]);
        args.extend(extra);
        (fp4(&args), out)
    };
    let (o, out) = run("a", &["--exclude-layers", "layers.0,layers.31"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("layers.31") && err.contains("--allow-unmatched"), "{err}");
    assert!(!err.contains("layers.0,"), "only the unmatched item is named: {err}");
    assert!(!out.exists(), "nothing written");
    let (o, out) =
        run("b", &["--exclude-layers", "layers.31,layers.last", "--allow-unmatched", "--calib-samples", "1000"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("warning") && err.contains("layers.31"), "{err}");
    let available = std::fs::read_to_string(&calib).unwrap().lines().filter(|l| !l.trim().is_empty()).count();
    assert!(
        err.contains("--calib-samples 1000") && err.contains(&format!("holds {available} usable samples")),
        "{err}"
    );
    let last = Checkpoint::open(&model).unwrap().config.num_hidden_layers - 1;
    let q = quantized_modules(&Checkpoint::open(&out).unwrap());
    assert!(!q.is_empty() && !q.iter().any(|m| m.contains(&format!("layers.{last}."))), "{q:?}");
}
