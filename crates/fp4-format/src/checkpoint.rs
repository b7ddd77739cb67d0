//! An HF model directory: config plus single-file or sharded safetensors, memory-mapped.
//!
//! Tensor names are resolved for both weight layouts: the VL wrapper keeps the text model under
//! `model.language_model.` (vision under `model.visual.`, MTP under `mtp.`, both ignored here)
//! and text-only saves keep it under `model.`. `lm_head.weight` is top-level in both.

use crate::config::{generation_eos_ids, TextConfig};
use crate::dtype::{self, DType};
use crate::quant_config::QuantConfig;
use crate::{FormatError, Result};
use memmap2::Mmap;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

const SINGLE_FILE: &str = "model.safetensors";
const INDEX_FILE: &str = "model.safetensors.index.json";
const VL_PREFIX: &str = "model.language_model.";
const TEXT_PREFIX: &str = "model.";

struct ShardFile {
    path: PathBuf,
    mmap: Mmap,
}

/// Where one tensor lives.
#[derive(Debug, Clone)]
struct TensorEntry {
    file: usize,
    /// `Err(name)` for dtypes fp4 does not read (reported if the tensor is ever loaded).
    dtype: std::result::Result<DType, String>,
    /// The dtype as stored, for copying tensors through unchanged.
    raw_dtype: safetensors::Dtype,
    shape: Vec<usize>,
    /// Byte range inside the file's mmap.
    start: usize,
    end: usize,
}

/// A borrowed tensor: raw little-endian bytes plus dtype and shape.
#[derive(Debug, Clone, Copy)]
pub struct TensorView<'a> {
    pub name: &'a str,
    pub path: &'a Path,
    pub dtype: DType,
    pub shape: &'a [usize],
    pub bytes: &'a [u8],
}

pub struct Checkpoint {
    pub dir: PathBuf,
    pub config: TextConfig,
    /// Stop ids: generation_config.json's, then config.json's, de-duplicated.
    pub eos_token_ids: Vec<u32>,
    /// `model.language_model.` (VL layout) or `model.` (text-only layout).
    pub text_prefix: &'static str,
    /// The quantization config, for quantized checkpoints.
    pub quant: Option<QuantConfig>,
    files: Vec<ShardFile>,
    tensors: BTreeMap<String, TensorEntry>,
}

impl Checkpoint {
    /// Opens `dir`: reads config.json (and generation_config.json), maps every weight file and
    /// indexes every tensor header. No tensor data is read yet.
    pub fn open(dir: &Path) -> Result<Checkpoint> {
        let config_path = dir.join("config.json");
        let text = std::fs::read_to_string(&config_path)
            .map_err(|source| FormatError::Io { path: config_path.clone(), source })?;
        let raw: serde_json::Value =
            serde_json::from_str(&text).map_err(|source| FormatError::Json { path: config_path.clone(), source })?;
        let config = TextConfig::from_json(&raw, &config_path)?;
        let quant = QuantConfig::from_dir(dir, Some(&raw))?;
        let mut eos_token_ids = generation_eos_ids(dir)?;
        for id in &config.eos_token_ids {
            if !eos_token_ids.contains(id) {
                eos_token_ids.push(*id);
            }
        }

        let file_names = weight_files(dir)?;
        let mut files = Vec::with_capacity(file_names.len());
        let mut tensors = BTreeMap::new();
        for (file_idx, name) in file_names.iter().enumerate() {
            let path = dir.join(name);
            let (mmap, entries) = map_safetensors(&path, file_idx)?;
            for (tensor, entry) in entries {
                if let Some(prev) = tensors.insert(tensor.clone(), entry) {
                    return Err(FormatError::Safetensors {
                        path: path.clone(),
                        msg: format!(
                            "tensor `{tensor}` also appears in {}",
                            dir.join(&file_names[prev.file]).display()
                        ),
                    });
                }
            }
            files.push(ShardFile { path, mmap });
        }
        if let Some(index) = read_index(dir)? {
            // Every tensor the index promises must be in the file it names.
            for (tensor, file) in index {
                let found = tensors.get(&tensor).map(|e| file_names[e.file].as_str());
                if found != Some(file.as_str()) {
                    return Err(FormatError::MissingTensor { path: dir.join(&file), tensor });
                }
            }
        }

        let text_prefix = if tensors.contains_key(&format!("{VL_PREFIX}embed_tokens.weight")) {
            VL_PREFIX
        } else if tensors.contains_key(&format!("{TEXT_PREFIX}embed_tokens.weight")) {
            TEXT_PREFIX
        } else {
            return Err(FormatError::MissingTensor {
                path: weights_path(dir, &file_names),
                tensor: format!("{VL_PREFIX}embed_tokens.weight (or {TEXT_PREFIX}embed_tokens.weight)"),
            });
        };
        Ok(Checkpoint { dir: dir.to_path_buf(), config, eos_token_ids, text_prefix, quant, files, tensors })
    }

    /// Full name of a text-model tensor, e.g. `layers.0.mlp.up_proj.weight`.
    pub fn text_name(&self, suffix: &str) -> String {
        format!("{}{suffix}", self.text_prefix)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// All tensor names, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    /// The weight files, in load order.
    pub fn files(&self) -> impl Iterator<Item = &Path> {
        self.files.iter().map(|f| f.path.as_path())
    }

    /// Counts and bytes per dtype name over every tensor (for `fp4 inspect`).
    pub fn dtype_stats(&self) -> BTreeMap<String, (usize, usize)> {
        let mut stats = BTreeMap::new();
        for e in self.tensors.values() {
            let name = match &e.dtype {
                Ok(d) => d.name().to_string(),
                Err(n) => n.clone(),
            };
            let s = stats.entry(name).or_insert((0, 0));
            s.0 += 1;
            s.1 += e.end - e.start;
        }
        stats
    }

    fn missing(&self, name: &str) -> FormatError {
        FormatError::MissingTensor { path: self.default_path(), tensor: name.to_string() }
    }

    /// The file a missing tensor is reported against: the index if sharded, else the single file.
    fn default_path(&self) -> PathBuf {
        let names: Vec<String> =
            self.files.iter().map(|f| f.path.file_name().unwrap_or_default().to_string_lossy().into_owned()).collect();
        weights_path(&self.dir, &names)
    }

    /// Borrows a tensor's bytes.
    pub fn tensor(&self, name: &str) -> Result<TensorView<'_>> {
        let (key, e) = self.tensors.get_key_value(name).ok_or_else(|| self.missing(name))?;
        let file = &self.files[e.file];
        let dtype = e.dtype.clone().map_err(|d| FormatError::DType {
            path: file.path.clone(),
            tensor: name.to_string(),
            dtype: d,
            expected: "a dtype fp4 reads (F32, F16, BF16, F8_E4M3, U8, I32, I64)".into(),
        })?;
        Ok(TensorView { name: key, path: &file.path, dtype, shape: &e.shape, bytes: &file.mmap[e.start..e.end] })
    }

    /// Loads a float tensor as f32 (exact for BF16/F16/F32), checking its shape.
    pub fn load_f32(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let t = self.tensor(name)?;
        t.expect_shape(shape)?;
        let v = dtype::to_f32(t.dtype, t.bytes).ok_or_else(|| FormatError::DType {
            path: t.path.to_path_buf(),
            tensor: name.to_string(),
            dtype: t.dtype.name().into(),
            expected: "BF16, F16 or F32".into(),
        })?;
        warn_nonfinite(&t, v.iter().filter(|x| !x.is_finite()).count(), v.len());
        Ok(v)
    }
}

impl Checkpoint {
    /// A tensor exactly as stored (any dtype) and the name of its file, for copying it through.
    pub fn raw(&self, name: &str) -> Result<(safetensors::Dtype, &[usize], &[u8], &str)> {
        let e = self.tensors.get(name).ok_or_else(|| self.missing(name))?;
        let file = &self.files[e.file];
        let file_name = file.path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        Ok((e.raw_dtype, &e.shape, &file.mmap[e.start..e.end], file_name))
    }

    /// Whether the weights came with a `model.safetensors.index.json`.
    pub fn is_sharded(&self) -> bool {
        self.dir.join(INDEX_FILE).exists()
    }

    /// Loads a one-element float tensor (0-dim or `[1]`), e.g. `weight_scale_2`.
    pub fn load_scalar(&self, name: &str) -> Result<f32> {
        let t = self.tensor(name)?;
        if t.shape.iter().product::<usize>() != 1 {
            return Err(FormatError::Shape {
                path: t.path.to_path_buf(),
                tensor: name.to_string(),
                expected: vec![],
                got: t.shape.to_vec(),
            });
        }
        let v = dtype::to_f32(t.dtype, t.bytes).ok_or_else(|| FormatError::DType {
            path: t.path.to_path_buf(),
            tensor: name.to_string(),
            dtype: t.dtype.name().into(),
            expected: "F32, BF16 or F16".into(),
        })?;
        warn_nonfinite(&t, usize::from(!v[0].is_finite()), 1);
        Ok(v[0])
    }

    /// Raw bytes of a tensor, checking dtype and shape.
    pub fn load_raw(&self, name: &str, dtype: DType, shape: &[usize]) -> Result<&[u8]> {
        let t = self.tensor(name)?;
        t.expect_shape(shape)?;
        if t.dtype != dtype {
            return Err(FormatError::DType {
                path: t.path.to_path_buf(),
                tensor: name.to_string(),
                dtype: t.dtype.name().into(),
                expected: dtype.name().into(),
            });
        }
        if dtype == DType::F8E4M3 {
            // E4M3 has no infinities; S.1111.111 is NaN.
            warn_nonfinite(&t, t.bytes.iter().filter(|&&b| b & 0x7f == 0x7f).count(), t.bytes.len());
        }
        Ok(t.bytes)
    }
}

/// NaN/Inf values found in one tensor ([`Checkpoint::non_finite`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NonFinite {
    /// How many values are NaN or ±Inf, of `total`.
    pub count: usize,
    pub total: usize,
    /// Flat index of the first one.
    pub first: usize,
}

/// Counts the NaN/Inf values of `bytes` stored as `dtype` (floats only; other dtypes have none).
pub fn non_finite_in(dtype: DType, bytes: &[u8]) -> Option<NonFinite> {
    // A value is NaN or infinite exactly when its exponent bits are all set (E4M3 has no
    // infinities, and only S.1111.111 is NaN).
    fn scan<const N: usize>(bytes: &[u8], bad: impl Fn([u8; N]) -> bool) -> Option<NonFinite> {
        let (mut count, mut first) = (0, None);
        for (i, c) in bytes.chunks_exact(N).enumerate() {
            if bad(c.try_into().expect("chunk of N")) {
                count += 1;
                first.get_or_insert(i);
            }
        }
        first.map(|first| NonFinite { count, total: bytes.len() / N, first })
    }
    match dtype {
        DType::F32 => scan::<4>(bytes, |b| u32::from_le_bytes(b) & 0x7f80_0000 == 0x7f80_0000),
        DType::F16 => scan::<2>(bytes, |b| u16::from_le_bytes(b) & 0x7c00 == 0x7c00),
        DType::BF16 => scan::<2>(bytes, |b| u16::from_le_bytes(b) & 0x7f80 == 0x7f80),
        DType::F8E4M3 => scan::<1>(bytes, |b| b[0] & 0x7f == 0x7f),
        DType::U8 | DType::I32 | DType::I64 => None,
    }
}

impl Checkpoint {
    /// The NaN/Inf values of a stored float tensor, if it has any (`None` for integer tensors
    /// and dtypes fp4 does not read).
    pub fn non_finite(&self, name: &str) -> Result<Option<NonFinite>> {
        let e = self.tensors.get(name).ok_or_else(|| self.missing(name))?;
        let Ok(dtype) = e.dtype else { return Ok(None) };
        Ok(non_finite_in(dtype, &self.files[e.file].mmap[e.start..e.end]))
    }

    /// The file that holds a tensor (for messages).
    pub fn file_of(&self, name: &str) -> Option<&Path> {
        self.tensors.get(name).map(|e| self.files[e.file].path.as_path())
    }
}

/// A checkpoint with NaN/Inf weights loads (the user may be inspecting a broken export), but
/// says so, naming the tensor: such a model computes NaNs.
fn warn_nonfinite(t: &TensorView<'_>, bad: usize, total: usize) {
    if bad > 0 {
        tracing::warn!(tensor = t.name, file = %t.path.display(), "{bad} of {total} values are NaN or infinite");
    }
}

impl TensorView<'_> {
    pub fn expect_shape(&self, expected: &[usize]) -> Result<()> {
        if self.shape != expected {
            return Err(FormatError::Shape {
                path: self.path.to_path_buf(),
                tensor: self.name.to_string(),
                expected: expected.to_vec(),
                got: self.shape.to_vec(),
            });
        }
        Ok(())
    }
}

fn weights_path(dir: &Path, files: &[String]) -> PathBuf {
    if dir.join(INDEX_FILE).exists() {
        dir.join(INDEX_FILE)
    } else if files.len() == 1 {
        dir.join(&files[0])
    } else {
        dir.to_path_buf()
    }
}

/// Reads `model.safetensors.index.json`'s `weight_map` (tensor → file), if the file exists.
fn read_index(dir: &Path) -> Result<Option<BTreeMap<String, String>>> {
    let path = dir.join(INDEX_FILE);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(FormatError::Io { path, source }),
    };
    #[derive(serde::Deserialize)]
    struct Index {
        weight_map: BTreeMap<String, String>,
    }
    let index: Index = serde_json::from_str(&text).map_err(|source| FormatError::Json { path, source })?;
    Ok(Some(index.weight_map))
}

/// The weight files of a model dir: those named by the index, else `model.safetensors`, else
/// every `*.safetensors` in the directory (sorted).
fn weight_files(dir: &Path) -> Result<Vec<String>> {
    if let Some(index) = read_index(dir)? {
        let mut files: Vec<String> = index.into_values().collect();
        files.sort();
        files.dedup();
        for f in &files {
            if Path::new(f).components().count() != 1 {
                return Err(FormatError::Config {
                    path: dir.join(INDEX_FILE),
                    field: "weight_map".into(),
                    msg: format!("file name `{f}` must be a plain name inside the model directory"),
                });
            }
        }
        if files.is_empty() {
            return Err(FormatError::NoWeights { dir: dir.to_path_buf() });
        }
        return Ok(files);
    }
    if dir.join(SINGLE_FILE).is_file() {
        return Ok(vec![SINGLE_FILE.to_string()]);
    }
    let entries = std::fs::read_dir(dir).map_err(|source| FormatError::Io { path: dir.to_path_buf(), source })?;
    let mut files: Vec<String> = entries
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".safetensors"))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(FormatError::NoWeights { dir: dir.to_path_buf() });
    }
    Ok(files)
}

/// Which tensor of a safetensors header the crate's validation refused, and why: its errors for
/// a size that does not match the shape, an overflow or a misaligned slice name no tensor.
fn bad_tensor_in_header(bytes: &[u8]) -> Option<String> {
    let n = u64::from_le_bytes(bytes.get(..8)?.try_into().ok()?) as usize;
    let header: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(bytes.get(8..8usize.checked_add(n)?)?).ok()?;
    let bits = |d: &str| -> Option<u128> {
        Some(match d {
            "BOOL" | "U8" | "I8" | "F8_E4M3" | "F8_E5M2" | "F8_E8M0" => 8,
            "U16" | "I16" | "F16" | "BF16" => 16,
            "U32" | "I32" | "F32" => 32,
            "U64" | "I64" | "F64" => 64,
            "F4" => 4,
            "F6_E2M3" | "F6_E3M2" => 6,
            _ => return None,
        })
    };
    for (name, info) in header.iter().filter(|(k, _)| *k != "__metadata__") {
        let dtype = info["dtype"].as_str().unwrap_or("?");
        let shape: Option<Vec<u128>> = info["shape"].as_array()?.iter().map(|v| v.as_u64().map(u128::from)).collect();
        let offsets: Option<Vec<u128>> =
            info["data_offsets"].as_array()?.iter().map(|v| v.as_u64().map(u128::from)).collect();
        let (Some(shape), Some(offsets), Some(b)) = (shape, offsets, bits(dtype)) else {
            return Some(format!("tensor `{name}`: unreadable dtype, shape or data_offsets ({info})"));
        };
        let elems = shape.iter().try_fold(1u128, |a, &d| a.checked_mul(d));
        let held = offsets.get(1).zip(offsets.first()).and_then(|(e, s)| e.checked_sub(*s));
        let bits_total = elems.and_then(|e| e.checked_mul(b));
        if let Some(bits) = bits_total.filter(|bits| bits % 8 != 0) {
            return Some(format!(
                "tensor `{name}`: shape {shape:?} of {dtype} is {bits} bits, not a whole number of bytes"
            ));
        }
        let need = bits_total.map(|bits| bits / 8);
        if need.is_none() || need != held {
            let need = need.map_or("more than 2^125".to_string(), |v| v.to_string());
            let held = held.map_or("no".to_string(), |v| v.to_string());
            return Some(format!(
                "tensor `{name}`: shape {shape:?} of {dtype} needs {need} bytes, its data_offsets {offsets:?} hold {held}"
            ));
        }
    }
    None
}

/// Where a header's tensors end against the data the file holds, when they differ (a truncated
/// or padded file: the crate says only "file not fully covered").
fn uncovered_data(bytes: &[u8]) -> Option<String> {
    let n = u64::from_le_bytes(bytes.get(..8)?.try_into().ok()?) as usize;
    let header: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(bytes.get(8..8usize.checked_add(n)?)?).ok()?;
    let (last, end) = header
        .iter()
        .filter(|(k, _)| *k != "__metadata__")
        .filter_map(|(k, v)| Some((k, v["data_offsets"].as_array()?.get(1)?.as_u64()?)))
        .max_by_key(|(_, end)| *end)?;
    let held = bytes.len().checked_sub(8 + n)? as u64;
    (held != end).then(|| {
        let what =
            if held < end { "truncated (an interrupted download or copy?)" } else { "longer than its header says" };
        format!("the header's tensors end at data byte {end} (last: `{last}`), the file holds {held}: {what}")
    })
}

/// Maps one safetensors file and indexes its header.
fn map_safetensors(path: &Path, file_idx: usize) -> Result<(Mmap, Vec<(String, TensorEntry)>)> {
    let file = std::fs::File::open(path).map_err(|source| FormatError::Io { path: path.to_path_buf(), source })?;
    // SAFETY: the mapping is read-only; a checkpoint rewritten while fp4 runs is outside its contract.
    let mmap = unsafe { Mmap::map(&file) }.map_err(|source| FormatError::Io { path: path.to_path_buf(), source })?;
    let (header_len, metadata) = safetensors::SafeTensors::read_metadata(&mmap).map_err(|e| {
        let msg = match bad_tensor_in_header(&mmap).or_else(|| uncovered_data(&mmap)) {
            Some(why) => format!("{e}: {why}"),
            None => e.to_string(),
        };
        FormatError::Safetensors { path: path.to_path_buf(), msg }
    })?;
    let data_start = 8 + header_len;
    let mut entries = Vec::new();
    for (name, info) in metadata.tensors() {
        let dtype = DType::from_safetensors(info.dtype).ok_or_else(|| format!("{:?}", info.dtype));
        let (a, b) = info.data_offsets;
        entries.push((
            name,
            TensorEntry {
                file: file_idx,
                dtype,
                raw_dtype: info.dtype,
                shape: info.shape.clone(),
                start: data_start + a,
                end: data_start + b,
            },
        ));
    }
    Ok((mmap, entries))
}
