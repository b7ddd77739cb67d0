use super::{load_model, parse_ids, ComputeArgs};
use anyhow::Context;
use fp4_model::Logits;
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Model directory.
    #[arg(long)]
    model: PathBuf,
    /// Comma-separated token ids.
    #[arg(long)]
    input_ids: String,
    /// Output safetensors file; tensor `logits`, f32, `[T, vocab]`.
    #[arg(long)]
    out: PathBuf,
    #[command(flatten)]
    compute: ComputeArgs,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let ids = parse_ids(&a.input_ids)?;
    let (_, model) = load_model(&a.model, a.compute.load_options()?)?;
    let mut cache = model.new_cache();
    let logits = model.forward(&ids, &mut cache, Logits::All)?;
    let shape = logits.shape().to_vec();
    let bytes: Vec<u8> = logits.as_slice().iter().flat_map(|x| x.to_le_bytes()).collect();
    let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), &bytes)?;
    // Write beside the target, then rename, so a failed run never leaves a partial file.
    let tmp = a.out.with_extension("safetensors.tmp");
    safetensors::serialize_to_file([("logits", view)], None, &tmp)
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, &a.out).with_context(|| format!("cannot write {}", a.out.display()))?;
    tracing::info!(out = %a.out.display(), ?shape, "logits written");
    Ok(())
}
