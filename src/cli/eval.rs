//! `fp4 eval kl`: how far a quantized model is from its reference.

use super::{load_model, ComputeArgs};
use anyhow::Context;
use clap::Subcommand;
use std::path::PathBuf;

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Per-token KL(reference ‖ model), top-1 agreement and perplexities on a JSONL data file.
    Kl(KlArgs),
}

#[derive(clap::Args, Debug)]
pub struct KlArgs {
    /// The unquantized checkpoint.
    #[arg(long)]
    reference: PathBuf,
    /// The checkpoint to evaluate (quantized, or any other of the same vocabulary).
    #[arg(long)]
    model: PathBuf,
    /// JSONL: `{"input_ids": [...]}` or conversations (rendered with the reference's template).
    #[arg(long)]
    data: PathBuf,
    #[arg(long)]
    samples: Option<usize>,
    #[arg(long)]
    seq_len: Option<usize>,
    /// Print JSON.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    compute: ComputeArgs,
}

pub fn run(cmd: Command) -> anyhow::Result<()> {
    let Command::Kl(a) = cmd;
    let opts = a.compute.load_options()?;
    let (ref_ckpt, reference) = load_model(&a.reference, opts)?;
    let (_, model) = load_model(&a.model, opts)?;
    anyhow::ensure!(
        reference.config.vocab_size == model.config.vocab_size,
        "{} and {} have different vocabularies ({} vs {})",
        a.reference.display(),
        a.model.display(),
        reference.config.vocab_size,
        model.config.vocab_size
    );
    let samples = fp4_quant::calib::load(
        &a.data,
        &a.reference,
        a.samples.unwrap_or(usize::MAX),
        a.seq_len.unwrap_or(ref_ckpt.config.max_position_embeddings).min(ref_ckpt.config.max_position_embeddings),
        ref_ckpt.config.vocab_size,
    )
    .context("cannot read the evaluation data")?
    .report("evaluation data");
    let r = fp4_quant::eval::kl(&reference, &model, &samples)?;
    if a.json {
        println!("{}", serde_json::to_string(&r)?);
    } else {
        println!(
            "{} vs {}: {} samples, {} tokens\nKL mean {:.6}  p99 {:.6}  max {:.6}\ntop-1 agreement {:.2}%\nperplexity: reference {:.3}, model {:.3}",
            a.model.display(),
            a.reference.display(),
            r.samples,
            r.tokens,
            r.kl_mean,
            r.kl_p99,
            r.kl_max,
            r.top1_agreement * 100.0,
            r.ppl_reference,
            r.ppl_model
        );
    }
    Ok(())
}
