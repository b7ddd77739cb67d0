//! Calibration-aware strategies on a model whose activations carry outlier channels (built here
//! from the tiny-quant fixture, as tests/reference/awq_outliers.py builds the held-out one it
//! compares with ModelOpt): AWQ-lite's exact fold into Qwen3.5's (1+w) norms and its KL against
//! RTN, auto_mixed's budget and KL, and the seed strategy files end to end.

mod common;

use common::{eval_ids, fixtures, logits};
use fp4_format::dtype::{from_f32, to_f32};
use fp4_format::{Checkpoint, DType};
use fp4_model::{LoadOptions, Precision, Qwen35};
use fp4_quant::export::{self, ExportOptions};
use fp4_quant::rtn::Silent;
use fp4_quant::{quantize, Algorithm, AwqOptions, QuantizeOptions, Strategy};
use std::path::Path;
use std::process::Command;

const OUTLIER_CHANNELS: [usize; 3] = [5, 22, 47];

/// Copies safetensors `src` to `dst` with `edit(name, values, last_dim)` applied to each tensor
/// (values as f32, re-encoded in the tensor's dtype when `edit` returns true).
fn rewrite_safetensors(src: &Path, dst: &Path, edit: impl Fn(&str, &mut [f32], usize) -> bool) {
    let bytes = std::fs::read(src).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut out: Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    for (n, t) in st.tensors() {
        let mut data = t.data().to_vec();
        if let Some(dt) = DType::from_safetensors(t.dtype()) {
            if let Some(mut v) = to_f32(dt, &data) {
                if edit(&n, &mut v, *t.shape().last().unwrap_or(&1)) {
                    data = from_f32(dt, &v).unwrap();
                }
            }
        }
        out.push((n.clone(), t.dtype(), t.shape().to_vec(), data));
    }
    let views: Vec<_> = out
        .iter()
        .map(|(n, d, s, b)| (n.clone(), safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    let meta = std::collections::HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize_to_file(views, Some(meta), dst).unwrap();
}

/// tiny-quant with (1+w) = 16 at a few hidden channels of every decoder norm, and the columns
/// of the linears reading them divided by 8: outlier activations, a tame function.
fn outlier_model(dir: &Path) {
    let src = fixtures().join("tiny-quant");
    std::fs::create_dir_all(dir).unwrap();
    let readers =
        ["q_proj", "k_proj", "v_proj", "in_proj_qkv", "in_proj_z", "in_proj_a", "in_proj_b", "gate_proj", "up_proj"];
    for e in std::fs::read_dir(&src).unwrap().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with("golden") {
            continue;
        }
        if !name.ends_with(".safetensors") {
            std::fs::copy(e.path(), dir.join(&name)).unwrap();
            continue;
        }
        rewrite_safetensors(&e.path(), &dir.join(&name), |n, v, cols| {
            let in_layer = n.contains(".layers.") && !n.starts_with("mtp.");
            let is_norm = n.ends_with("input_layernorm.weight") || n.ends_with("post_attention_layernorm.weight");
            let is_reader = readers.iter().any(|r| n.ends_with(&format!("{r}.weight")));
            if !(in_layer && (is_norm || is_reader)) {
                return false;
            }
            for row in v.chunks_exact_mut(cols) {
                for &c in &OUTLIER_CHANNELS {
                    row[c] = if is_norm { 15.0 } else { row[c] / 8.0 };
                }
            }
            true
        });
    }
}

/// The outlier model with outliers in the inputs of the linears after the mixers and the MLP
/// too: a few `up_proj` rows, V channels (for every query head of their KV head) and GDN
/// gated-norm dimensions (for every value head) × 16, the columns of `down_proj`, `o_proj` and
/// `out_proj` reading them ÷ 16. Powers of two: the bf16 function is unchanged.
fn output_outlier_model(dir: &Path) {
    outlier_model(dir);
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let c = cfg.get("text_config").unwrap_or(&cfg);
    let u = |k: &str| c[k].as_u64().unwrap() as usize;
    let (hq, hkv, d, hv, dv) = (
        u("num_attention_heads"),
        u("num_key_value_heads"),
        u("head_dim"),
        u("linear_num_value_heads"),
        u("linear_value_head_dim"),
    );
    let (mlp_ch, v_dims, gdn_dims) = ([3usize, 17, 40], [2usize, 9], [1usize, 7]);
    let v_rows: Vec<usize> = (0..hkv).flat_map(|g| v_dims.map(|e| g * d + e)).collect();
    let o_cols: Vec<usize> = (0..hq).flat_map(|h| v_dims.map(|e| h * d + e)).collect();
    let out_cols: Vec<usize> = (0..hv).flat_map(|h| gdn_dims.map(|e| h * dv + e)).collect();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let path = e.path();
        if path.extension().is_none_or(|x| x != "safetensors") {
            continue;
        }
        rewrite_safetensors(&path, &path, |n, v, cols| {
            // (tensor suffix, rows (else columns), which, factor)
            let edits: [(&str, bool, &[usize], f32); 6] = [
                ("mlp.up_proj.weight", true, &mlp_ch, 16.0),
                ("mlp.down_proj.weight", false, &mlp_ch, 0.0625),
                ("self_attn.v_proj.weight", true, &v_rows, 16.0),
                ("self_attn.o_proj.weight", false, &o_cols, 0.0625),
                ("linear_attn.norm.weight", false, &gdn_dims, 16.0),
                ("linear_attn.out_proj.weight", false, &out_cols, 0.0625),
            ];
            let in_layer = n.contains(".layers.") && !n.starts_with("mtp.");
            let edit = edits.iter().find(|e| in_layer && n.ends_with(e.0)).map(|e| (e.1, e.2, e.3));
            let Some((rows, which, k)) = edit else { return false };
            for (r, row) in v.chunks_exact_mut(cols).enumerate() {
                for (c, x) in row.iter_mut().enumerate() {
                    if (rows && which.contains(&r)) || (!rows && which.contains(&c)) {
                        *x *= k;
                    }
                }
            }
            true
        });
    }
}

fn calib_samples() -> Vec<Vec<u32>> {
    let path = fixtures().join("modelopt/tiny-quant/calib.jsonl");
    fp4_quant::calib::load(&path, &fixtures().join("tiny-quant"), usize::MAX, usize::MAX, 1 << 20).unwrap().samples
}

fn eval_samples() -> Vec<Vec<u32>> {
    let ids = eval_ids("tiny-quant");
    // Two held-out sequences: the eval ids and their reverse.
    vec![ids.clone(), ids.into_iter().rev().collect()]
}

fn quantize_to(model: &Path, out: &Path, algorithm: Algorithm, awq: AwqOptions) -> serde_json::Value {
    let ckpt = Checkpoint::open(model).unwrap();
    let opts = QuantizeOptions {
        strategy: Strategy::Rtn,
        algorithm,
        exclude: vec![],
        precision: Precision::Bf16,
        awq,
        lm_head: None,
    };
    let result = quantize(&ckpt, &calib_samples(), &opts, &Silent).unwrap();
    export::write(&ckpt, &result, out, &ExportOptions { force: true, ..Default::default() }).unwrap();
    serde_json::from_str(&std::fs::read_to_string(out.join("quant_report.json")).unwrap()).unwrap()
}

fn kl_mean(reference: &Path, model: &Path, opts: LoadOptions) -> f64 {
    let r = Qwen35::load(&Checkpoint::open(reference).unwrap(), opts).unwrap();
    let m = Qwen35::load(&Checkpoint::open(model).unwrap(), opts).unwrap();
    fp4_quant::eval::kl(&r, &m, &eval_samples()).unwrap().kl_mean
}

/// Folding `1/s` into the (1+w) norm computes what the unfolded model (inputs × pre_quant_scale)
/// computes: same quantized weights byte for byte, logits equal up to the bf16 storage of the
/// folded norm weights.
#[test]
fn awq_fold_into_one_plus_w_norms_is_exact() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("outliers");
    outlier_model(&model);
    let (folded, unfolded) = (tmp.path().join("folded"), tmp.path().join("unfolded"));
    // The output-side folds change up_proj/v_proj (and so their groups' shared scales): off here,
    // they have their own test.
    let norms_only = AwqOptions { output_folds: false, ..AwqOptions::default() };
    let rf = quantize_to(&model, &folded, Algorithm::AwqLite, norms_only.clone());
    let ru = quantize_to(&model, &unfolded, Algorithm::AwqLite, AwqOptions { fold: false, ..norms_only });
    assert_eq!(rf["quant_algo"], "NVFP4");
    assert_eq!(ru["quant_algo"], "NVFP4_AWQ");
    let (cf, cu) = (Checkpoint::open(&folded).unwrap(), Checkpoint::open(&unfolded).unwrap());
    assert!(!cf.names().any(|n| n.ends_with("pre_quant_scale")), "a folded checkpoint is plain NVFP4");
    let pqs = cu.names().filter(|n| n.ends_with("pre_quant_scale")).count();
    let folded_norms = rf["modified_tensors"].as_array().unwrap();
    assert!(pqs > 0 && !folded_norms.is_empty());
    let mut same_weights = 0;
    for n in cf.names().filter(|n| n.ends_with(".weight") && cf.tensor(n).unwrap().dtype == DType::U8) {
        assert_eq!(cf.raw(n).unwrap().2, cu.raw(n).unwrap().2, "{n}: quantized weights differ");
        same_weights += 1;
    }
    assert!(same_weights > 20);
    // The folded norms really changed (else this test compares nothing).
    let src = Checkpoint::open(&model).unwrap();
    for n in folded_norms {
        let n = n.as_str().unwrap();
        assert_ne!(cf.raw(n).unwrap().2, src.raw(n).unwrap().2, "{n} unchanged");
    }
    let ids = &eval_samples()[0];
    let f32_w4a16 = LoadOptions::new(Precision::F32);
    let (a, b) = (logits(&folded, f32_w4a16, ids), logits(&unfolded, f32_w4a16, ids));
    let d: f64 = a.iter().zip(&b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let n: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    let rel = (d / n).sqrt();
    eprintln!("folded vs pre_quant_scale logits: rms rel {rel:.2e}");
    assert!(rel < 1e-2, "{rel:.2e}");
}

/// On activation outliers AWQ-lite beats RTN clearly (W4A4 in bf16, as served on Blackwell), and
/// its report records α and the output MSE per layer.
#[test]
fn awq_lite_beats_rtn_on_activation_outliers() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("outliers");
    outlier_model(&model);
    let (rtn, awq) = (tmp.path().join("rtn"), tmp.path().join("awq"));
    quantize_to(&model, &rtn, Algorithm::Max, AwqOptions::default());
    let report = quantize_to(&model, &awq, Algorithm::AwqLite, AwqOptions::default());
    let w4a4 = LoadOptions { quantize_activations: true, ..LoadOptions::new(Precision::Bf16) };
    let (kl_rtn, kl_awq) = (kl_mean(&model, &rtn, w4a4), kl_mean(&model, &awq, w4a4));
    eprintln!("KL rtn {kl_rtn:.3e}  awq_lite {kl_awq:.3e}");
    assert!(kl_awq < 0.6 * kl_rtn, "awq_lite {kl_awq:.3e} vs rtn {kl_rtn:.3e}");
    let layers = report["layers"].as_object().unwrap();
    let mlp = layers.iter().find(|(k, _)| k.ends_with("layers.1.mlp.up_proj")).unwrap().1;
    assert!(mlp["awq"]["alpha"].is_number(), "{mlp}");
    assert!(mlp["awq"]["output_mse_awq"].as_f64() < mlp["awq"]["output_mse_rtn"].as_f64());
    let down = layers.iter().find(|(k, _)| k.ends_with("layers.1.mlp.down_proj")).unwrap().1;
    if down["awq"]["alpha"].is_number() {
        let into = down["awq"]["folded_into"].as_str().unwrap();
        assert!(into.ends_with("layers.1.mlp.up_proj.weight"), "down_proj folds into up_proj's rows ({down})");
    }
}

/// With outliers in the inputs of o_proj, down_proj and out_proj, folding their AWQ scales into
/// V's rows, up_proj's rows and the GDN gated norm (plain NVFP4 still) beats leaving them at
/// s = 1 under W4A4 and comes close to keeping every scale as a pre_quant_scale (NVFP4_AWQ);
/// with the W4A4-aware search loss too.
#[test]
fn awq_output_folds_help_when_mixer_and_mlp_outputs_carry_outliers() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("outliers");
    output_outlier_model(&model);
    let dirs = ["rtn", "no_output_folds", "awq", "pqs", "awq_w4a4_loss"].map(|d| tmp.path().join(d));
    quantize_to(&model, &dirs[0], Algorithm::Max, AwqOptions::default());
    quantize_to(&model, &dirs[1], Algorithm::AwqLite, AwqOptions { output_folds: false, ..AwqOptions::default() });
    let report = quantize_to(&model, &dirs[2], Algorithm::AwqLite, AwqOptions::default());
    let pqs = AwqOptions { fold: false, allow_pre_quant_scale: true, ..AwqOptions::default() };
    quantize_to(&model, &dirs[3], Algorithm::AwqLite, pqs);
    quantize_to(&model, &dirs[4], Algorithm::AwqLite, AwqOptions { w4a4: true, ..AwqOptions::default() });
    assert_eq!(report["quant_algo"], "NVFP4");
    let w4a4 = LoadOptions { quantize_activations: true, ..LoadOptions::new(Precision::Bf16) };
    let kl = dirs.clone().map(|d| kl_mean(&model, &d, w4a4));
    eprintln!(
        "W4A4 KL rtn {:.3e}  awq without output folds {:.3e}  awq {:.3e}  awq pre_quant_scale {:.3e}  awq w4a4 loss {:.3e}",
        kl[0], kl[1], kl[2], kl[3], kl[4]
    );
    assert!(kl[2] < 0.75 * kl[1], "output folds: {:.3e} vs {:.3e} without", kl[2], kl[1]);
    assert!(kl[2] < kl[0] && kl[2] < 1.5 * kl[3], "{kl:?}");
    // The W4A4-aware loss (what `fp4 quantize` uses by default) keeps the gain.
    assert!(kl[4] < 0.75 * kl[1], "{kl:?}");
    let layers = report["layers"].as_object().unwrap();
    for (consumer, producer) in [
        ("mlp.down_proj", "mlp.up_proj.weight"),
        ("self_attn.o_proj", "self_attn.v_proj.weight"),
        ("linear_attn.out_proj", "linear_attn.norm.weight"),
    ] {
        let folded = layers
            .iter()
            .filter(|(k, _)| k.ends_with(consumer))
            .filter_map(|(_, v)| v["awq"]["folded_into"].as_str())
            .filter(|into| into.ends_with(producer))
            .count();
        assert!(folded > 0, "no {consumer} folded into {producer}");
    }
}

/// auto_mixed stays within its bit budget, measures no worse than all-NVFP4 (the only
/// single-format assignment under 8 bits) on its scoring data, spends the budget on the groups
/// that matter, and exports a MIXED_PRECISION checkpoint whose KL fp4 then confirms.
#[test]
fn auto_mixed_meets_its_budget_and_beats_all_nvfp4() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("outliers");
    outlier_model(&model);
    let ckpt = Checkpoint::open(&model).unwrap();
    let samples = calib_samples();
    let opts = QuantizeOptions {
        strategy: Strategy::AutoMixed,
        algorithm: Algorithm::Max,
        exclude: vec![],
        precision: Precision::Bf16,
        awq: AwqOptions::default(),
        lm_head: None,
    };
    let (result, report) = fp4_quant::mixed::auto_mixed(&ckpt, &samples, &opts, 5.0, 4, &Silent).unwrap();
    eprintln!(
        "auto_mixed at 5.0 bits: {:.3} bits, KL {:.3e} vs all-NVFP4 {:.3e}",
        report.effective_bits, report.kl_chosen, report.kl_all_nvfp4
    );
    assert!(report.effective_bits <= 5.0 && report.effective_bits > 4.5, "{}", report.effective_bits);
    assert!(report.kl_chosen < report.kl_all_nvfp4);
    assert!(report.chosen.iter().any(|f| *f != fp4_quant::mixed::Format::Nvfp4));
    let out = tmp.path().join("mixed");
    export::write(&ckpt, &result, &out, &ExportOptions::default()).unwrap();
    let rtn = tmp.path().join("rtn");
    quantize_to(&model, &rtn, Algorithm::Max, AwqOptions::default());
    let w4a4 = LoadOptions { quantize_activations: true, ..LoadOptions::new(Precision::Bf16) };
    let reference = Qwen35::load(&ckpt, w4a4).unwrap();
    let kl = |dir: &Path| {
        let m = Qwen35::load(&Checkpoint::open(dir).unwrap(), w4a4).unwrap();
        fp4_quant::eval::kl(&reference, &m, &samples[..4]).unwrap().kl_mean
    };
    let (kl_mixed, kl_rtn) = (kl(&out), kl(&rtn));
    eprintln!("exported: mixed {kl_mixed:.3e}, rtn {kl_rtn:.3e}");
    assert!((kl_mixed - report.kl_chosen).abs() < 0.05 * report.kl_chosen, "export computes what was scored");
    assert!(kl_mixed < kl_rtn);
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("hf_quant_config.json")).unwrap()).unwrap();
    let layers = config["quantization"]["quantized_layers"].as_object().unwrap();
    assert_eq!(layers.len(), result.layers.len());
    assert!(
        layers.values().any(|v| v["quant_algo"] == "FP8") || report.chosen.contains(&fp4_quant::mixed::Format::Bf16)
    );
}

/// The seed strategy files run end to end through the CLI.
#[test]
fn seed_strategy_configs_run_end_to_end() {
    let tmp = tempfile::tempdir().unwrap();
    for (name, quantized_attn) in [("A", true), ("B", false), ("C", true)] {
        let out = tmp.path().join(name);
        let o = Command::new(env!("CARGO_BIN_EXE_fp4"))
            .args(["quantize", "--model"])
            .arg(fixtures().join("tiny-quant"))
            .arg("--calib-data")
            .arg(fixtures().join("modelopt/tiny-quant/calib.jsonl"))
            .arg("--config")
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("configs/strategies/{name}.toml")))
            .arg("--output")
            .arg(&out)
            .env("RUST_LOG", "warn")
            .output()
            .unwrap();
        assert!(o.status.success(), "{name}: {}", String::from_utf8_lossy(&o.stderr));
        let report: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("quant_report.json")).unwrap()).unwrap();
        // The file's text is recorded: `fp4 loop` reuses a checkpoint only for the same text.
        let file = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("configs/strategies/{name}.toml"));
        assert_eq!(report["options"]["config_toml"].as_str(), Some(std::fs::read_to_string(file).unwrap().as_str()));
        let layers = report["layers"].as_object().unwrap();
        let fmt = |suffix: &str| layers.iter().find(|(k, _)| k.ends_with(suffix)).unwrap().1["format"].clone();
        if name == "C" {
            assert_eq!(report["quant_algo"], "MIXED_PRECISION");
            assert!(report["auto_mixed"]["effective_bits"].as_f64().unwrap() <= 4.8);
            assert_ne!(fmt("layers.2.linear_attn.in_proj_qkv"), "BF16", "rtn's layers are candidates");
            // fp4 serves what it wrote.
            Qwen35::load(&Checkpoint::open(&out).unwrap(), LoadOptions::new(Precision::F32)).unwrap();
            continue;
        }
        assert_eq!(report["algorithm"], "awq_lite", "{name}");
        assert_eq!(report["quant_algo"], "NVFP4", "{name}");
        // The seed's exclusions in both: the first and the last decoder layer stay BF16.
        let last = Checkpoint::open(&fixtures().join("tiny-quant")).unwrap().config.num_hidden_layers - 1;
        assert_eq!(fmt("layers.0.mlp.up_proj"), "BF16", "{name}");
        assert_eq!(fmt(&format!("layers.{last}.mlp.up_proj")), "BF16", "{name}");
        assert_eq!(fmt("layers.2.linear_attn.in_proj_qkv"), "BF16", "{name}");
        assert_eq!(fmt("layers.1.self_attn.q_proj"), if quantized_attn { "NVFP4" } else { "BF16" }, "{name}");
        assert_eq!(fmt("layers.2.mlp.up_proj"), "NVFP4", "{name}");
    }
}

#[test]
fn conflicting_strategy_flags_are_refused() {
    let o = Command::new(env!("CARGO_BIN_EXE_fp4"))
        .args(["quantize", "--strategy", "awq_lite", "--algorithm", "max", "--output", "/nonexistent/x", "--model"])
        .arg(fixtures().join("tiny-quant"))
        .arg("--calib-data")
        .arg(fixtures().join("modelopt/tiny-quant/calib.jsonl"))
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("drop --algorithm max"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// A strategy file's exclusion that names nothing in the model is an error naming the item and
/// the file (the seed's own files name the last layer `layers.last`, so they fit any depth);
/// `allow_unmatched = true` in the file makes it a warning.
#[test]
fn strategy_file_exclusions_that_match_nothing_name_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let run = |file: &Path, out: &str| {
        Command::new(env!("CARGO_BIN_EXE_fp4"))
            .args(["quantize", "--model"])
            .arg(fixtures().join("tiny-quant"))
            .arg("--calib-data")
            .arg(fixtures().join("modelopt/tiny-quant/calib.jsonl"))
            .arg("--config")
            .arg(file)
            .arg("--output")
            .arg(tmp.path().join(out))
            .env("RUST_LOG", "warn")
            .output()
            .unwrap()
    };
    let strict = tmp.path().join("nine-b.toml");
    std::fs::write(&strict, "strategy = \"mlp_only\"\nexclude_layers = [\"layers.0\", \"layers.31\"]\n").unwrap();
    let o = run(&strict, "a");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{err}");
    assert!(err.contains("exclude_layers of") && err.contains("nine-b.toml") && err.contains("layers.31"), "{err}");
    assert!(err.contains("layers.last") && err.contains("--allow-unmatched"), "{err}");
    assert!(!tmp.path().join("a").exists());
    let lenient = tmp.path().join("lenient.toml");
    std::fs::write(&lenient, "strategy = \"mlp_only\"\nexclude_layers = [\"layers.31\"]\nallow_unmatched = true\n")
        .unwrap();
    let o = run(&lenient, "b");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success() && err.contains("warning") && err.contains("layers.31"), "{err}");
}

/// `--quantize-lm-head`: the head is exported as ModelOpt exports any quantized linear (its
/// tensors under `lm_head.`, not in `exclude_modules`; FP8 makes the checkpoint
/// MIXED_PRECISION with the head under `quantized_layers`), its weight bytes are the
/// round-to-nearest of the source head (the formula ModelOpt's max calibration writes), the
/// checkpoint loads with a quantized head that changes the logits, and a tied head is refused.
#[test]
fn quantized_lm_head_is_exported_like_modelopt_and_loads_quantized() {
    use fp4_format::nvfp4::{self, Fp8Weight, Nvfp4Weight};
    use fp4_model::LinearMethod;
    use fp4_quant::LmHeadFormat;
    let tmp = tempfile::tempdir().unwrap();
    let model = fixtures().join("tiny-quant");
    let ckpt = Checkpoint::open(&model).unwrap();
    let cfg = ckpt.config.clone();
    let head = fp4_model::load_param(&ckpt, "lm_head.weight", &[cfg.vocab_size, cfg.hidden_size], Precision::Bf16)
        .unwrap()
        .as_slice()
        .to_vec();
    let base = QuantizeOptions {
        strategy: Strategy::Rtn,
        algorithm: Algorithm::Max,
        exclude: vec![],
        precision: Precision::Bf16,
        awq: AwqOptions::default(),
        lm_head: None,
    };
    let write = |opts: &QuantizeOptions, name: &str| {
        let result = quantize(&ckpt, &calib_samples(), opts, &Silent).unwrap();
        let out = tmp.path().join(name);
        export::write(&ckpt, &result, &out, &ExportOptions { force: true, ..Default::default() }).unwrap();
        out
    };
    let plain = write(&base, "plain");
    let opts = LoadOptions::new(Precision::F32);
    for (format, algo) in [(LmHeadFormat::Nvfp4, "NVFP4"), (LmHeadFormat::Fp8, "MIXED_PRECISION")] {
        let out = write(&QuantizeOptions { lm_head: Some(format), ..base.clone() }, &format!("{format:?}"));
        let hf: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("hf_quant_config.json")).unwrap()).unwrap();
        let q = &hf["quantization"];
        assert_eq!(q["quant_algo"], algo);
        assert!(!q["exclude_modules"].as_array().unwrap().iter().any(|m| m == "lm_head"), "{q}");
        let qc = Checkpoint::open(&out).unwrap();
        let (dtype, shape, bytes, _) = qc.raw("lm_head.weight").unwrap();
        let report: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("quant_report.json")).unwrap()).unwrap();
        let input_amax = report["layers"]["lm_head"]["input_amax"].as_f64().unwrap() as f32;
        assert!(input_amax > 0.0 && input_amax.is_finite());
        let input_scale = to_f32(DType::F32, qc.raw("lm_head.input_scale").unwrap().2).unwrap()[0];
        match format {
            LmHeadFormat::Nvfp4 => {
                let want = Nvfp4Weight::quantize(
                    &head,
                    cfg.vocab_size,
                    cfg.hidden_size,
                    nvfp4::nvfp4_global_scale(nvfp4::amax(&head)),
                );
                assert_eq!(format!("{dtype:?}"), "U8");
                assert_eq!(shape, [cfg.vocab_size, cfg.hidden_size / 2]);
                assert!(bytes == want.packed.as_slice(), "NVFP4 codes differ from the RTN of the source head");
                assert!(qc.raw("lm_head.weight_scale").unwrap().2 == want.scales.as_slice());
                assert_eq!(to_f32(DType::F32, qc.raw("lm_head.weight_scale_2").unwrap().2).unwrap()[0], want.scale_2);
                assert_eq!(input_scale, nvfp4::nvfp4_global_scale(input_amax));
            }
            LmHeadFormat::Fp8 => {
                assert_eq!(q["quantized_layers"]["lm_head"]["quant_algo"], "FP8", "{q}");
                assert_eq!(q["quantized_layers"][ckpt.text_name("layers.1.mlp.up_proj")]["quant_algo"], "NVFP4", "{q}");
                assert_eq!(format!("{dtype:?}"), "F8_E4M3");
                assert_eq!(shape, [cfg.vocab_size, cfg.hidden_size]);
                assert!(
                    bytes == Fp8Weight::quantize(&head).codes.as_slice(),
                    "FP8 codes differ from the source head's"
                );
                assert_eq!(input_scale, input_amax / nvfp4::E4M3_MAX);
            }
        }
        let m = Qwen35::load(&qc, opts).unwrap();
        let method = &m.lm_head().expect("untied head").method;
        assert!(
            matches!(
                (format, method),
                (LmHeadFormat::Nvfp4, LinearMethod::Nvfp4 { .. }) | (LmHeadFormat::Fp8, LinearMethod::Fp8 { .. })
            ),
            "{format:?} head loaded as {method:?}"
        );
        let kl = kl_mean(&plain, &out, opts);
        assert!(kl > 0.0 && kl.is_finite(), "{format:?}: KL to the BF16-head export {kl}");
    }
    let tied = Checkpoint::open(&fixtures().join("tiny-text")).unwrap();
    let err =
        quantize(&tied, &[vec![1, 2, 3]], &QuantizeOptions { lm_head: Some(LmHeadFormat::Nvfp4), ..base }, &Silent)
            .unwrap_err()
            .to_string();
    assert!(err.contains("tie_word_embeddings"), "{err}");
}

/// `--quantize-lm-head` with an exclusion that keeps lm_head BF16 (strategy A's file names it) is
/// refused before any work, naming both.
#[test]
fn quantize_lm_head_conflicts_with_an_lm_head_exclusion() {
    let tmp = tempfile::tempdir().unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_fp4"))
        .args(["quantize", "--quantize-lm-head", "nvfp4", "--config"])
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/strategies/A.toml"))
        .arg("--model")
        .arg(fixtures().join("tiny-quant"))
        .arg("--calib-data")
        .arg(fixtures().join("modelopt/tiny-quant/calib.jsonl"))
        .arg("--output")
        .arg(tmp.path().join("out"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{err}");
    assert!(err.contains("--quantize-lm-head nvfp4") && err.contains("A.toml") && err.contains("(lm_head)"), "{err}");
    assert!(!tmp.path().join("out").exists());
}
