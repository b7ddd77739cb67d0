//! Checks on the source checkpoint before any calibration work.

use crate::{QuantError, Result};
use fp4_format::{Checkpoint, NonFinite};

/// Refuses a source whose text model or LM head holds NaN or infinite values, naming every such
/// tensor, its file, how many values and where the first one is. ModelOpt stops on the same
/// checkpoints (its max calibrator asserts "detected nan/inf values in amax" at the first
/// quantizer that sees one, without saying which tensor); fp4 looks at every tensor up front
/// instead, so a NaN in a tensor no quantizer reads (a norm, lm_head) is caught too: quantized,
/// such a model computes NaNs. Vision and MTP tensors, which fp4 carries through unchanged and
/// never computes with, only get a warning.
pub fn check_finite(ckpt: &Checkpoint) -> Result<()> {
    let names: Vec<&str> = ckpt.names().collect();
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).clamp(1, 16);
    let found: Vec<(String, NonFinite)> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads)
            .map(|t| {
                let names = &names;
                s.spawn(move || -> Result<Vec<(String, NonFinite)>> {
                    let mut out = Vec::new();
                    for name in names.iter().skip(t).step_by(threads) {
                        if let Some(nf) = ckpt.non_finite(name)? {
                            out.push((name.to_string(), nf));
                        }
                    }
                    Ok(out)
                })
            })
            .collect();
        workers.into_iter().map(|w| w.join().expect("scan thread")).collect::<Result<Vec<_>>>().map(|v| v.concat())
    })?;
    let mut found = found;
    found.sort_by(|a, b| a.0.cmp(&b.0));
    let carried = |n: &str| n.starts_with("model.visual.") || n.starts_with("mtp.");
    let describe = |(name, nf): &(String, NonFinite)| {
        let file = ckpt.file_of(name).map(|p| p.display().to_string()).unwrap_or_default();
        format!(
            "{name} ({file}): {} of {} values NaN or infinite, the first at flat index {}",
            nf.count, nf.total, nf.first
        )
    };
    for f in found.iter().filter(|f| carried(&f.0)) {
        let msg = format!("{}; copied unchanged (fp4 does not compute with it)", describe(f));
        tracing::warn!("{msg}");
        eprintln!("warning: {msg}");
    }
    let fatal: Vec<String> = found.iter().filter(|f| !carried(&f.0)).map(describe).collect();
    if fatal.is_empty() {
        return Ok(());
    }
    let shown = fatal.iter().take(10).cloned().collect::<Vec<_>>().join("\n  ");
    let more = if fatal.len() > 10 { format!("\n  … and {} more tensors", fatal.len() - 10) } else { String::new() };
    Err(QuantError::Invalid(format!(
        "{}: the source checkpoint holds NaN or infinite weights, which quantize to a model that computes NaNs:\n  {shown}{more}",
        ckpt.dir.display()
    )))
}
