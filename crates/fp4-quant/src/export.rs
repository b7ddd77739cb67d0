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

/// `quant_report.json`'s schema: a file of that name with another schema is not fp4's.
const REPORT_SCHEMA: &str = "fp4.quant_report.v1";

/// The line that marks a README.md as written by `fp4 card` (src/cli/card.rs's MARKER): part of
/// an fp4 output that a later `--force` may replace.
const CARD_MARKER: &str = "<!-- written by `fp4 card`";

/// The lock file inside a temporary directory: held by the run writing it, so another run can
/// tell a live temporary directory from one a killed run left (whatever its PID now names).
const LOCK: &str = ".fp4-lock";

/// `path` made absolute with symbolic links resolved, also when it does not exist yet: the
/// longest existing ancestor canonicalized, the rest appended (`..` applied lexically, which
/// is exact for components that do not exist).
pub fn resolve(path: &Path) -> PathBuf {
    let abs = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir().map(|d| d.join(path)).unwrap_or_else(|_| path.to_path_buf())
    };
    let mut rest = Vec::new();
    let mut cur = abs.as_path();
    loop {
        if let Ok(c) = cur.canonicalize() {
            let mut out = c;
            for part in rest.iter().rev() {
                match part {
                    std::path::Component::ParentDir => {
                        out.pop();
                    }
                    std::path::Component::CurDir => {}
                    p => out.push(p.as_os_str()),
                }
            }
            return out;
        }
        match (cur.parent(), cur.components().next_back()) {
            (Some(parent), Some(last)) => {
                rest.push(last);
                cur = parent;
            }
            _ => return abs,
        }
    }
}

/// What is at the output path.
enum OutState {
    Absent,
    /// An empty directory: nothing in it can be lost.
    Empty,
    /// A directory holding an earlier fp4 output that `--force` may replace.
    Fp4Output,
}

/// The entries of an fp4 output directory that fp4 did not write (so `--force` must not remove
/// them): sub-directories (fp4 writes none), and files that its report does not list (reports
/// before the list: any file is taken as fp4's), other than a README.md `fp4 card` wrote.
fn foreign_entries(out: &Path, report: &Value) -> Result<Vec<String>> {
    let listed: Option<Vec<&str>> =
        report.get("files").and_then(Value::as_array).map(|a| a.iter().filter_map(Value::as_str).collect());
    let mut foreign = Vec::new();
    for e in std::fs::read_dir(out).map_err(io(out))? {
        let e = e.map_err(io(out))?;
        let name = e.file_name().to_string_lossy().into_owned();
        let ty = e.file_type().map_err(io(out))?;
        let ours = if ty.is_dir() {
            false
        } else if name == "README.md" && std::fs::read_to_string(e.path()).is_ok_and(|t| t.contains(CARD_MARKER)) {
            true
        } else {
            ty.is_file() && listed.as_ref().is_none_or(|l| l.contains(&name.as_str()))
        };
        if !ours {
            foreign.push(if ty.is_dir() { format!("{name}/") } else { name });
        }
    }
    foreign.sort();
    Ok(foreign)
}

/// Whether `dir` holds an fp4 `quant_report.json` (its schema, not just its name); the report.
fn fp4_report(dir: &Path) -> Option<Value> {
    let v: Value = serde_json::from_slice(&std::fs::read(dir.join(REPORT)).ok()?).ok()?;
    (v.get("schema").and_then(Value::as_str) == Some(REPORT_SCHEMA)).then_some(v)
}

/// Checks that `out` can be written (before any long work starts): it must not be, contain or
/// lie inside the source; it must not exist, be an empty directory, or (with `force`) hold an
/// earlier fp4 output (its `quant_report.json`) and nothing fp4 did not write. Nothing else is
/// ever replaced.
pub fn check_output(ckpt: &Checkpoint, out: &Path, force: bool) -> Result<()> {
    output_state(ckpt, out, force).map(|_| ())
}

fn output_state(ckpt: &Checkpoint, out: &Path, force: bool) -> Result<OutState> {
    let (src, dst) = (resolve(&ckpt.dir), resolve(out));
    if src == dst {
        return Err(out_err(out, "is the source checkpoint; choose another output directory"));
    }
    if src.starts_with(&dst) {
        return Err(out_err(
            out,
            format!("contains the source checkpoint {}; choose another output directory", ckpt.dir.display()),
        ));
    }
    if dst.starts_with(&src) {
        return Err(out_err(
            out,
            format!(
                "is inside the source checkpoint {}; write the output beside it (e.g. {}-nvfp4)",
                ckpt.dir.display(),
                ckpt.dir.display().to_string().trim_end_matches('/')
            ),
        ));
    }
    let meta = match std::fs::symlink_metadata(out) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(OutState::Absent),
        Err(e) if e.kind() == std::io::ErrorKind::NotADirectory => {
            let file = out.ancestors().skip(1).find(|a| a.is_file()).unwrap_or(out);
            return Err(out_err(out, format!("cannot be made: {} is a file, not a directory", file.display())));
        }
        Err(e) => return Err(out_err(out, e.to_string())),
    };
    if meta.file_type().is_symlink() {
        return Err(out_err(out, "is a symbolic link; give the directory it points to, or another path"));
    }
    if !meta.is_dir() {
        return Err(out_err(out, "exists and is not a directory; choose a directory to write the checkpoint to"));
    }
    if std::fs::read_dir(out).map_err(io(out))?.next().is_none() {
        return Ok(OutState::Empty);
    }
    let Some(report) = fp4_report(out) else {
        return Err(out_err(
            out,
            format!(
                "already exists and is not an fp4 output (no fp4 {REPORT}); fp4 replaces only directories it wrote: \
                 choose another directory, or empty this one yourself"
            ),
        ));
    };
    if !force {
        return Err(out_err(out, "holds an earlier fp4 output; pass --force to replace it"));
    }
    let foreign = foreign_entries(out, &report)?;
    if !foreign.is_empty() {
        let shown = foreign.iter().take(8).cloned().collect::<Vec<_>>().join(", ");
        let more = if foreign.len() > 8 { format!(" and {} more", foreign.len() - 8) } else { String::new() };
        return Err(out_err(
            out,
            format!(
                "holds an earlier fp4 output, and entries fp4 did not write: {shown}{more}; --force would remove them: \
                 move them out first, or choose another directory"
            ),
        ));
    }
    Ok(OutState::Fp4Output)
}

/// The directory `out` is written in, and `out`'s name.
fn parent_and_name(out: &Path) -> Result<(PathBuf, String)> {
    let name = out.file_name().and_then(|n| n.to_str()).ok_or_else(|| out_err(out, "needs a directory name"))?;
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    Ok((parent, name.to_string()))
}

/// `.NAME.fp4-tmp-PID` (the checkpoint being written) and `.NAME.fp4-replaced-PID` (the earlier
/// output, moved aside for the instant of the swap): fp4's own temporary directories.
fn temp_name(name: &str, kind: &str, pid: u32) -> String {
    format!(".{name}.fp4-{kind}-{pid}")
}

/// Splits a temporary directory's name into (output name, kind, PID).
fn parse_temp_name(entry: &str) -> Option<(&str, &str, u32)> {
    let rest = entry.strip_prefix('.')?;
    for kind in ["tmp", "replaced"] {
        let marker = format!(".fp4-{kind}-");
        if let Some(i) = rest.rfind(&marker) {
            let pid = rest[i + marker.len()..].parse::<u32>().ok()?;
            return (i > 0).then(|| (&rest[..i], kind, pid));
        }
    }
    None
}

/// Whether `pid` may still be writing: alive on this machine and not this process (a previous
/// process with this PID, e.g. PID 1 in a container, is gone).
fn may_be_alive(pid: u32) -> bool {
    pid != std::process::id() && Path::new("/proc").join(pid.to_string()).exists()
}

/// Whether the run that made temporary directory `dir` is gone, by its lock: `Some(true)` when
/// the lock file is there and nobody holds it, `Some(false)` when it is held, `None` when there
/// is no lock file (the run is just starting or finishing, or older fp4) or no lock support.
fn lock_says_dead(dir: &Path) -> Option<bool> {
    let f = std::fs::File::open(dir.join(LOCK)).ok()?;
    match f.try_lock() {
        Ok(()) => Some(true),
        Err(std::fs::TryLockError::WouldBlock) => Some(false),
        Err(std::fs::TryLockError::Error(_)) => None,
    }
}

/// Removes (or restores) what killed runs left in `parent`: temporary directories whose writer
/// is gone — proved by their unheld lock, or for `out`'s own by their PID being gone — and an
/// earlier output a run moved aside for the swap and did not get back (put back at its place
/// when that is free). Live runs' directories and anything not named like fp4's are left alone.
pub fn remove_stale_temps(out: &Path) -> Result<()> {
    let (parent, name) = parent_and_name(out)?;
    let Ok(entries) = std::fs::read_dir(&parent) else { return Ok(()) };
    let mut entries: Vec<String> = entries.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
    entries.sort();
    // Temporary directories first: a moved-aside output is restored only once they are gone.
    entries.sort_by_key(|e| !e.contains(".fp4-tmp-"));
    for entry in entries {
        let Some((target, kind, pid)) = parse_temp_name(&entry) else { continue };
        let path = parent.join(&entry);
        if !std::fs::symlink_metadata(&path).is_ok_and(|m| m.is_dir()) {
            continue;
        }
        let dead = match (kind, lock_says_dead(&path)) {
            ("tmp", Some(d)) => d,
            // No lock to ask: only the PID, and only for this output's own temporary
            // directories (another output's may be a live run on another machine).
            (_, _) => target == name && !may_be_alive(pid),
        };
        if !dead {
            continue;
        }
        if kind == "tmp" {
            match std::fs::remove_dir_all(&path) {
                Ok(()) => eprintln!("removed {}: left by an fp4 run that was killed (pid {pid})", path.display()),
                Err(e) => tracing::warn!("cannot remove the stale temporary directory {}: {e}", path.display()),
            }
            continue;
        }
        // An earlier output moved aside by a run killed in the middle of the swap.
        let home = parent.join(target);
        if std::fs::symlink_metadata(&home).is_err() {
            std::fs::rename(&path, &home).map_err(io(&home))?;
            eprintln!(
                "restored {}: an fp4 run (pid {pid}) was killed while replacing it, and its new output was lost",
                home.display()
            );
        } else if fp4_report(&home).is_some() {
            std::fs::remove_dir_all(&path).map_err(io(&path))?;
            eprintln!("removed {}: the output it held was replaced by {}", path.display(), home.display());
        } else {
            let msg = format!(
                "{} holds an earlier fp4 output of {} that a killed run moved aside; {} is now something else, so it is left for you",
                path.display(),
                home.display(),
                home.display()
            );
            tracing::warn!("{msg}");
            eprintln!("warning: {msg}");
        }
    }
    Ok(())
}

/// Where a checkpoint is written before it appears at its output path: a temporary directory
/// beside it (`.NAME.fp4-tmp-PID`, locked while this run lives), made when the run starts, so a
/// path that cannot be written fails before any work. Dropped without [`Staging::commit`]
/// (an error, a panic), it removes itself; a killed run's is removed by the next run.
pub struct Staging {
    out: PathBuf,
    tmp: PathBuf,
    force: bool,
    /// Held for the run's lifetime (the lock goes with the process, however it ends).
    _lock: Option<std::fs::File>,
    committed: bool,
}

impl Staging {
    /// Clears what killed runs left beside `out`, checks `out` ([`check_output`]) and makes the
    /// temporary directory.
    pub fn create(ckpt: &Checkpoint, out: &Path, force: bool) -> Result<Staging> {
        // First what killed runs left (an output they moved aside is back before it is judged).
        remove_stale_temps(out)?;
        output_state(ckpt, out, force)?;
        let (parent, name) = parent_and_name(out)?;
        std::fs::create_dir_all(&parent)
            .map_err(|e| out_err(out, format!("cannot create the directory it goes in, {}: {e}", parent.display())))?;
        let tmp = parent.join(temp_name(&name, "tmp", std::process::id()));
        std::fs::create_dir(&tmp).map_err(|e| out_err(out, format!("cannot create {}: {e}", tmp.display())))?;
        let mut staging = Staging { out: out.to_path_buf(), tmp, force, _lock: None, committed: false };
        register(&staging.tmp);
        // Locked under another name, then renamed: a lock file another run finds is always held.
        let init = staging.tmp.join(".fp4-lock-init");
        let lock = std::fs::File::create(&init).map_err(io(&staging.tmp))?;
        if lock.try_lock().is_ok() {
            staging._lock = Some(lock);
        }
        std::fs::rename(&init, staging.tmp.join(LOCK)).map_err(|e| {
            out_err(out, format!("{} vanished as it was made (another run removed it?): {e}", staging.tmp.display()))
        })?;
        Ok(staging)
    }

    /// The temporary directory to write into.
    pub fn dir(&self) -> &Path {
        &self.tmp
    }

    /// Moves the finished checkpoint to its output path. An earlier output being replaced is
    /// moved aside first and removed once the new one is in place (put back if the move fails).
    /// The output is checked again first: it may have changed during a long run.
    pub fn commit(mut self, ckpt: &Checkpoint) -> Result<()> {
        let state = output_state(ckpt, &self.out, self.force).map_err(|e| match e {
            QuantError::Output { path, msg } => QuantError::Output {
                path,
                msg: format!("changed while quantizing: {msg}; the new checkpoint was discarded"),
            },
            e => e,
        })?;
        let (parent, name) = parent_and_name(&self.out)?;
        let old =
            matches!(state, OutState::Fp4Output).then(|| parent.join(temp_name(&name, "replaced", std::process::id())));
        {
            // A signal handler waits for the swap ([`remove_on_signal`]).
            let mut live = LIVE.lock().unwrap_or_else(|e| e.into_inner());
            let _ = std::fs::remove_file(self.tmp.join(LOCK));
            if let Some(old) = &old {
                std::fs::rename(&self.out, old)
                    .map_err(|e| out_err(&self.out, format!("cannot move the earlier output aside: {e}")))?;
            }
            if let Err(e) = std::fs::rename(&self.tmp, &self.out) {
                if let Some(old) = &old {
                    let _ = std::fs::rename(old, &self.out);
                }
                return Err(out_err(&self.out, format!("cannot move the new checkpoint into place: {e}")));
            }
            self.committed = true;
            live.retain(|p| *p != self.tmp);
        }
        if let Some(old) = &old {
            let _ = std::fs::remove_dir_all(old);
        }
        Ok(())
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_dir_all(&self.tmp);
            unregister(&self.tmp);
        }
    }
}

/// Temporary directories of this process's live [`Staging`]s, for [`remove_on_signal`].
static LIVE: std::sync::Mutex<Vec<PathBuf>> = std::sync::Mutex::new(Vec::new());

fn register(tmp: &Path) {
    LIVE.lock().unwrap_or_else(|e| e.into_inner()).push(tmp.to_path_buf());
}

fn unregister(tmp: &Path) {
    LIVE.lock().unwrap_or_else(|e| e.into_inner()).retain(|p| p != tmp);
}

/// Removes every live temporary directory of this process: for a signal handler that is about
/// to end the process (Ctrl-C, SIGTERM), where no destructor runs.
/// Returns how many there were.
pub fn remove_on_signal() -> usize {
    let mut live = LIVE.lock().unwrap_or_else(|e| e.into_inner());
    for p in live.iter() {
        // The writer may add a file while it goes: try again.
        for _ in 0..5 {
            if std::fs::remove_dir_all(p).is_ok() || !p.exists() {
                break;
            }
        }
    }
    std::mem::take(&mut *live).len()
}

/// Writes the quantized checkpoint to `out` ([`Staging::create`], [`write_into`],
/// [`Staging::commit`]); on any failure nothing appears at `out` and an earlier output stays.
pub fn write(ckpt: &Checkpoint, result: &QuantResult, out: &Path, opts: &ExportOptions) -> Result<()> {
    let staging = Staging::create(ckpt, out, opts.force)?;
    write_into(ckpt, result, &staging, opts)?;
    staging.commit(ckpt)
}

/// Writes the checkpoint's files into `staging`'s temporary directory.
pub fn write_into(ckpt: &Checkpoint, result: &QuantResult, staging: &Staging, opts: &ExportOptions) -> Result<()> {
    write_contents(ckpt, result, staging.dir(), opts)
        .and_then(|()| crate::layout::apply(opts.layout, ckpt, staging.dir()))
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
    // Every file of the output, so that a later --force can tell what fp4 wrote.
    let mut written: Vec<String> = std::fs::read_dir(dir)
        .map_err(io(dir))?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n != LOCK)
        .chain([REPORT.to_string()])
        .collect();
    written.sort();
    written.dedup();
    write_json(&dir.join(REPORT), &report(result, opts, &written))?;
    // safetensors writes its files owner-only (a temporary file renamed); give them the mode
    // every other file got from a plain create (0666 less the umask).
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
        // Created, not `fs::copy`'d: the copy gets the mode a new file gets (the umask), like
        // every other file of the output, not the source's.
        let mut from = std::fs::File::open(e.path()).map_err(io(&e.path()))?;
        let to_path = dir.join(&name);
        let mut to = std::fs::File::create(&to_path).map_err(io(&to_path))?;
        std::io::copy(&mut from, &mut to).map_err(io(&to_path))?;
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

/// `MIXED_PRECISION` for auto_mixed or any FP8 layer (an FP8 LM head); else `NVFP4`, or
/// `NVFP4_AWQ` when any layer keeps a `pre_quant_scale` (which vLLM does not load).
pub fn quant_algo(result: &QuantResult) -> &'static str {
    if result.plan.strategy == crate::Strategy::AutoMixed || result.layers.values().any(|q| q.fp8.is_some()) {
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

fn report(result: &QuantResult, opts: &ExportOptions, files: &[String]) -> Value {
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
        "schema": REPORT_SCHEMA,
        "producer": producer(),
        "strategy": result.plan.strategy.name(),
        "algorithm": match result.algorithm { crate::Algorithm::Max => "max", crate::Algorithm::AwqLite => "awq_lite" },
        "quant_algo": quant_algo(result),
        "modified_tensors": result.overrides.keys().collect::<Vec<_>>(),
        "calibration": {"samples": result.samples, "tokens": result.tokens, "seconds": result.calib_secs},
        "totals": {
            "quantized_layers": result.layers.len(),
            "unquantized_layers": result.plan.modules.iter().filter(|m| !m.quantize).count(),
            "quantized_params": q_params,
            "quantized_bytes": q_bytes,
            "mean_weight_rel_error": if result.layers.is_empty() { 0.0 } else {
                result.layers.values().map(|q| q.weight_rel_error as f64).sum::<f64>() / result.layers.len() as f64
            },
        },
        "exclude_modules": result.plan.exclude_modules,
        "widened_exclusions": result.plan.widened,
        "layers": layers,
        "files": files,
    });
    for (k, val) in &opts.report_extra {
        v[k] = val.clone();
    }
    v
}
