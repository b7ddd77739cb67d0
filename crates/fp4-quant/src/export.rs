//! Writes a quantized checkpoint in ModelOpt's HF export format: NVFP4 tensors per quantized
//! linear (`weight` U8, `weight_scale` F8_E4M3, scalar F32 `weight_scale_2` and `input_scale`),
//! every other tensor copied unchanged, safetensors sharded like the source, `config.json` with
//! `quantization_config`, `hf_quant_config.json`, the source's other files, and
//! `quant_report.json`. Everything goes to a temporary directory that is renamed into place
//! last, so an interrupted run leaves no output directory.

use crate::rtn::QuantResult;
use crate::{QuantError, Result};
use fp4_format::Checkpoint;
use safetensors::tensor::TensorView;
use safetensors::Dtype;
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Files of the source directory that the export regenerates instead of copying.
const REGENERATED: [&str; 4] = ["config.json", "hf_quant_config.json", "model.safetensors.index.json", REPORT];

#[derive(Default)]
pub struct ExportOptions {
    pub force: bool,
    /// Extra fields for `quant_report.json` (options, timings).
    pub report_extra: Map<String, Value>,
    /// The source's layout, or the VL wrapper for a flat source (`crate::layout`).
    pub layout: crate::layout::Layout,
}

fn out_err(path: &Path, msg: impl Into<String>) -> QuantError {
    QuantError::Output { path: path.to_path_buf(), msg: msg.into() }
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> QuantError + '_ {
    move |e| out_err(path, e.to_string())
}

/// The file that marks a directory as an fp4 output (`--force` replaces only such directories).
pub const REPORT: &str = "quant_report.json";

/// Checks that `out` can be written (before any long work starts): it must not exist, or, with
/// `force`, be a previous fp4 output (it holds `quant_report.json`) that neither is nor contains
/// the source. Nothing fp4 did not write is ever replaced.
pub fn check_output(ckpt: &Checkpoint, out: &Path, force: bool) -> Result<()> {
    if !out.exists() {
        return Ok(());
    }
    if !out.is_dir() {
        return Err(out_err(out, "exists and is not a directory; choose a directory to write the checkpoint to"));
    }
    if !force {
        return Err(out_err(out, "already exists; pass --force to replace it (only an earlier fp4 output)"));
    }
    let (src, dst) = (ckpt.dir.canonicalize().ok(), out.canonicalize().ok());
    if let (Some(src), Some(dst)) = (&src, &dst) {
        if src.starts_with(dst) {
            return Err(out_err(out, "is or contains the source checkpoint; choose another output directory"));
        }
    }
    if !out.join(REPORT).is_file() {
        return Err(out_err(
            out,
            format!("is not an fp4 output (no {REPORT}): --force replaces only directories fp4 wrote; remove it yourself or choose another"),
        ));
    }
    Ok(())
}

/// The directory `out` is written in, and the prefix of fp4's temporary directories there.
fn temp_stem(out: &Path) -> Result<(PathBuf, String)> {
    let name = out.file_name().and_then(|n| n.to_str()).ok_or_else(|| out_err(out, "needs a directory name"))?;
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    Ok((parent, format!(".{name}.fp4-tmp-")))
}

/// Removes temporary directories of earlier runs for `out` whose process is gone (killed runs).
pub fn remove_stale_temps(out: &Path) -> Result<()> {
    let (parent, stem) = temp_stem(out)?;
    let Ok(entries) = std::fs::read_dir(&parent) else { return Ok(()) };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = name.strip_prefix(&stem).and_then(|p| p.parse::<u32>().ok()) else { continue };
        let alive = pid == std::process::id() || Path::new("/proc").join(pid.to_string()).exists();
        if !alive && e.path().is_dir() {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
    Ok(())
}

fn temp_dir_for(out: &Path) -> Result<(PathBuf, String)> {
    let (parent, stem) = temp_stem(out)?;
    std::fs::create_dir_all(&parent).map_err(io(&parent))?;
    remove_stale_temps(out)?;
    Ok((parent.join(format!("{stem}{}", std::process::id())), stem))
}

/// Writes the quantized checkpoint to `out`: into a temporary directory beside it, renamed into
/// place last. An earlier output being replaced is moved aside first and removed only once the
/// new one is in place; on any failure the temporary directory is removed and the earlier output
/// stays.
pub fn write(ckpt: &Checkpoint, result: &QuantResult, out: &Path, opts: &ExportOptions) -> Result<()> {
    check_output(ckpt, out, opts.force)?;
    let (tmp, stem) = temp_dir_for(out)?;
    std::fs::create_dir_all(&tmp).map_err(io(&tmp))?;
    let fail = |e: QuantError| {
        let _ = std::fs::remove_dir_all(&tmp);
        Err(e)
    };
    if let Err(e) =
        write_contents(ckpt, result, &tmp, opts).and_then(|()| crate::layout::apply(opts.layout, ckpt, &tmp))
    {
        return fail(e);
    }
    // Not named like a temporary directory: a crash right here must not let a later run delete it.
    let old = out
        .exists()
        .then(|| tmp.with_file_name(format!("{}-replaced-{}", stem.trim_end_matches("-tmp-"), std::process::id())));
    if let Some(old) = &old {
        if let Err(e) = std::fs::rename(out, old) {
            return fail(out_err(out, format!("cannot move the earlier output aside: {e}")));
        }
    }
    if let Err(e) = std::fs::rename(&tmp, out) {
        if let Some(old) = &old {
            let _ = std::fs::rename(old, out);
        }
        return fail(out_err(out, e.to_string()));
    }
    if let Some(old) = &old {
        let _ = std::fs::remove_dir_all(old);
    }
    Ok(())
}

/// Owned bytes of one output tensor, or a borrow of the source's.
struct OutTensor<'a> {
    dtype: Dtype,
    shape: Vec<usize>,
    data: std::borrow::Cow<'a, [u8]>,
}

fn scalar(v: f32) -> OutTensor<'static> {
    OutTensor { dtype: Dtype::F32, shape: vec![], data: v.to_le_bytes().to_vec().into() }
}

fn write_contents(ckpt: &Checkpoint, result: &QuantResult, dir: &Path, opts: &ExportOptions) -> Result<()> {
    // Tensors per output file, named like the source's files.
    let mut files: BTreeMap<String, Vec<(String, OutTensor)>> = BTreeMap::new();
    for name in ckpt.names() {
        let (dtype, shape, bytes, file) = ckpt.raw(name)?;
        let entry = files.entry(file.to_string()).or_default();
        let module = name.strip_suffix(".weight");
        match module.and_then(|m| result.layers.get(m).map(|q| (m, q))) {
            Some((m, q)) if q.fp8.is_some() => {
                let f8 = q.fp8.as_ref().expect("matched");
                let (rows, cols) = (q.weight.rows, q.weight.cols);
                entry.push((
                    format!("{m}.weight"),
                    OutTensor { dtype: Dtype::F8_E4M3, shape: vec![rows, cols], data: f8.codes.clone().into() },
                ));
                entry.push((format!("{m}.weight_scale"), scalar(f8.scale)));
                entry.push((format!("{m}.input_scale"), scalar(q.input_scale)));
            }
            Some((m, q)) => {
                let w = &q.weight;
                entry.push((
                    format!("{m}.weight"),
                    OutTensor { dtype: Dtype::U8, shape: vec![w.rows, w.cols / 2], data: w.packed.clone().into() },
                ));
                entry.push((
                    format!("{m}.weight_scale"),
                    OutTensor {
                        dtype: Dtype::F8_E4M3,
                        shape: vec![w.rows, w.cols / 16],
                        data: w.scales.clone().into(),
                    },
                ));
                entry.push((format!("{m}.weight_scale_2"), scalar(w.scale_2)));
                entry.push((format!("{m}.input_scale"), scalar(q.input_scale)));
                if let Some(pqs) = q.awq.as_ref().and_then(|a| a.pre_quant_scale.as_ref()) {
                    let data = fp4_format::dtype::from_f32(fp4_format::DType::F32, pqs).expect("f32 encodes");
                    entry.push((
                        format!("{m}.pre_quant_scale"),
                        OutTensor { dtype: Dtype::F32, shape: vec![pqs.len()], data: data.into() },
                    ));
                }
            }
            None => {
                let data = match result.overrides.get(name) {
                    Some(values) => fp4_format::DType::from_safetensors(dtype)
                        .and_then(|d| fp4_format::dtype::from_f32(d, values))
                        .ok_or_else(|| out_err(dir, format!("{name}: cannot write {dtype:?} values")))?
                        .into(),
                    None => bytes.into(),
                };
                entry.push((name.to_string(), OutTensor { dtype, shape: shape.to_vec(), data }))
            }
        }
    }
    let delay = std::env::var("FP4_TEST_EXPORT_DELAY_MS").ok().and_then(|v| v.parse::<u64>().ok());
    let mut weight_map = Map::new();
    let mut total_size = 0usize;
    for (file, tensors) in &files {
        let path = dir.join(file);
        let views = tensors
            .iter()
            .map(|(n, t)| {
                total_size += t.data.len();
                weight_map.insert(n.clone(), Value::String(file.clone()));
                TensorView::new(t.dtype, t.shape.clone(), &t.data).map(|v| (n.clone(), v))
            })
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|e| out_err(&path, e.to_string()))?;
        let mut meta = std::collections::HashMap::new();
        meta.insert("format".to_string(), "pt".to_string());
        safetensors::serialize_to_file(views, Some(meta), &path).map_err(|e| out_err(&path, e.to_string()))?;
        if let Some(ms) = delay {
            // Test hook: widens the export window so a test can interrupt it.
            std::thread::sleep(std::time::Duration::from_millis(ms));
        }
    }
    if ckpt.is_sharded() {
        let index = json!({"metadata": {"total_size": total_size}, "weight_map": weight_map});
        write_json(&dir.join("model.safetensors.index.json"), &index)?;
    }

    let quant = quantization_config(result);
    let config_path = ckpt.dir.join("config.json");
    let mut config: Value = serde_json::from_str(&std::fs::read_to_string(&config_path).map_err(io(&config_path))?)
        .map_err(|e| out_err(&config_path, e.to_string()))?;
    config["quantization_config"] = quant.config_json;
    write_json(&dir.join("config.json"), &config)?;
    write_json(&dir.join("hf_quant_config.json"), &quant.hf_quant_config)?;

    copy_other_files(ckpt, dir)?;
    if config.get("vision_config").is_some() && !dir.join("preprocessor_config.json").exists() {
        write_json(&dir.join("preprocessor_config.json"), &preprocessor_stub(&config))?;
    }
    write_json(&dir.join(REPORT), &report(result, opts))?;
    // safetensors writes its files owner-only; give them the mode every other file got.
    let mode = std::fs::metadata(dir.join(REPORT)).map_err(io(dir))?.permissions();
    for file in files.keys() {
        let path = dir.join(file);
        std::fs::set_permissions(&path, mode.clone()).map_err(io(&path))?;
    }
    Ok(())
}

fn write_json(path: &Path, v: &Value) -> Result<()> {
    let text = serde_json::to_string_pretty(v).map_err(|e| out_err(path, e.to_string()))?;
    std::fs::write(path, text + "\n").map_err(io(path))
}

/// Copies every non-weight file of the source (tokenizer, chat template, generation config,
/// processor configs, …) so that nothing is lost.
fn copy_other_files(ckpt: &Checkpoint, dir: &Path) -> Result<()> {
    let entries = std::fs::read_dir(&ckpt.dir).map_err(io(&ckpt.dir))?;
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let is_file = e.file_type().map(|t| t.is_file()).unwrap_or(false);
        if !is_file || name.ends_with(".safetensors") || REGENERATED.contains(&name.as_str()) {
            continue;
        }
        std::fs::copy(e.path(), dir.join(&name)).map_err(io(&e.path()))?;
    }
    Ok(())
}

/// vLLM builds a multimodal processor for VL-wrapper checkpoints and needs this file; the values
/// follow the vision config (Qwen3-VL defaults otherwise).
pub(crate) fn preprocessor_stub(config: &Value) -> Value {
    let v = &config["vision_config"];
    json!({
        "image_processor_type": "Qwen2VLImageProcessorFast",
        "processor_class": "Qwen3VLProcessor",
        "patch_size": v.get("patch_size").cloned().unwrap_or(json!(16)),
        "temporal_patch_size": v.get("temporal_patch_size").cloned().unwrap_or(json!(2)),
        "merge_size": v.get("spatial_merge_size").cloned().unwrap_or(json!(2)),
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
        "do_rescale": true,
        "do_normalize": true,
        "do_resize": true,
        "size": {"shortest_edge": 65536, "longest_edge": 16777216}
    })
}

struct QuantConfigs {
    config_json: Value,
    hf_quant_config: Value,
}

fn producer() -> Value {
    json!({"name": "fp4", "version": env!("CARGO_PKG_VERSION")})
}

/// `MIXED_PRECISION` for auto_mixed; else `NVFP4`, or `NVFP4_AWQ` when any layer keeps a
/// `pre_quant_scale` (which vLLM does not load).
pub fn quant_algo(result: &QuantResult) -> &'static str {
    if result.plan.strategy == crate::Strategy::AutoMixed {
        "MIXED_PRECISION"
    } else if result.layers.values().any(|q| q.awq.as_ref().is_some_and(|a| a.pre_quant_scale.is_some())) {
        "NVFP4_AWQ"
    } else {
        "NVFP4"
    }
}

/// `config.json` `quantization_config` and `hf_quant_config.json`, as ModelOpt writes them.
fn quantization_config(result: &QuantResult) -> QuantConfigs {
    let exclude = result.plan.exclude_modules.clone();
    let algo = quant_algo(result);
    let block = json!({"dynamic": false, "num_bits": 4, "type": "float", "group_size": 16});
    if algo == "MIXED_PRECISION" {
        // ModelOpt's auto_quantize export: per-module algorithms under `quantized_layers`.
        let layers: Map<String, Value> = result
            .layers
            .iter()
            .map(|(n, q)| {
                let v = if q.fp8.is_some() {
                    json!({"quant_algo": "FP8"})
                } else {
                    json!({"quant_algo": "NVFP4", "group_size": 16})
                };
                (n.clone(), v)
            })
            .collect();
        return QuantConfigs {
            config_json: json!({
                "quant_method": "modelopt",
                "quant_algo": "MIXED_PRECISION",
                "kv_cache_quant_algo": null,
                "quantized_layers": layers,
                "ignore": exclude,
                "producer": producer(),
            }),
            hf_quant_config: json!({
                "producer": producer(),
                "quantization": {"quant_algo": "MIXED_PRECISION", "kv_cache_quant_algo": null,
                                 "quantized_layers": layers, "exclude_modules": exclude}
            }),
        };
    }
    QuantConfigs {
        config_json: json!({
            "config_groups": {"group_0": {"input_activations": block, "weights": block, "targets": ["Linear"]}},
            "ignore": exclude,
            "quant_algo": algo,
            "producer": producer(),
            "quant_method": "modelopt"
        }),
        hf_quant_config: json!({
            "producer": producer(),
            "quantization": {"quant_algo": algo, "kv_cache_quant_algo": null, "group_size": 16, "exclude_modules": exclude}
        }),
    }
}

fn report(result: &QuantResult, opts: &ExportOptions) -> Value {
    let mut layers = Map::new();
    let (mut q_params, mut q_bytes) = (0usize, 0usize);
    for (name, q) in &result.layers {
        let n = q.weight.rows * q.weight.cols;
        q_params += n;
        q_bytes += match &q.fp8 {
            Some(f8) => f8.codes.len() + 8,
            None => q.weight.packed.len() + q.weight.scales.len() + 8,
        };
        let awq = q.awq.as_ref().map(|a| {
            json!({
                "alpha": a.alpha,
                "output_mse_rtn": a.mse_rtn,
                "output_mse_awq": a.mse_best,
                "folded_into": a.folded_into,
                "pre_quant_scale": a.pre_quant_scale.is_some(),
            })
        });
        layers.insert(
            name.clone(),
            json!({
                "format": if q.fp8.is_some() { "FP8" }
                    else if awq.as_ref().is_some_and(|a| a["pre_quant_scale"] == true) { "NVFP4_AWQ" } else { "NVFP4" },
                "awq": awq,
                "shape": [q.weight.rows, q.weight.cols],
                "weight_amax": q.weight_amax,
                "input_amax": q.input_amax,
                "weight_scale_2": q.weight.scale_2,
                "input_scale": q.input_scale,
                "weight_rel_error": q.weight_rel_error,
            }),
        );
    }
    for m in result.plan.modules.iter().filter(|m| !m.quantize) {
        layers.insert(m.name.clone(), json!({"format": "BF16"}));
    }
    let mut v = json!({
        "schema": "fp4.quant_report.v1",
        "producer": producer(),
        "strategy": result.plan.strategy.name(),
        "algorithm": match result.algorithm { crate::Algorithm::Max => "max", crate::Algorithm::AwqLite => "awq_lite" },
        "quant_algo": quant_algo(result),
        "modified_tensors": result.overrides.keys().collect::<Vec<_>>(),
        "calibration": {"samples": result.samples, "tokens": result.tokens, "seconds": result.calib_secs},
        "totals": {
            "quantized_layers": result.layers.len(),
            "unquantized_layers": result.plan.modules.len() - result.layers.len(),
            "quantized_params": q_params,
            "quantized_bytes": q_bytes,
            "mean_weight_rel_error": if result.layers.is_empty() { 0.0 } else {
                result.layers.values().map(|q| q.weight_rel_error as f64).sum::<f64>() / result.layers.len() as f64
            },
        },
        "exclude_modules": result.plan.exclude_modules,
        "widened_exclusions": result.plan.widened,
        "layers": layers,
    });
    for (k, val) in &opts.report_extra {
        v[k] = val.clone();
    }
    v
}
