use super::{load_model, parse_ids, ComputeArgs};
use anyhow::Context;
use fp4_chat::Tokenizer;
use fp4_model::{
    generate, generate_speculative, GenerateOptions, Mtp, MtpDrafter, Sampler, SamplingParams, SpeculativeConfig,
};
use std::io::Write;
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Model directory.
    #[arg(long)]
    model: PathBuf,
    /// Prompt text (needs tokenizer.json in the model directory).
    #[arg(long, conflicts_with = "input_ids", required_unless_present = "input_ids")]
    prompt: Option<String>,
    /// Prompt as comma-separated token ids.
    #[arg(long)]
    input_ids: Option<String>,
    #[arg(long, default_value_t = 32)]
    max_tokens: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    temperature: f32,
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// 0 = off.
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Keep generating past stop tokens.
    #[arg(long)]
    ignore_eos: bool,
    #[command(flatten)]
    compute: ComputeArgs,
    /// Speculative decoding with the checkpoint's MTP head, as vLLM spells it:
    /// '{"method": "mtp", "num_speculative_tokens": K}'. Greedy output is the same as without;
    /// sampled output follows the same distribution (speculative sampling), though not the same
    /// tokens for a seed. The acceptance is logged and, with --json, reported.
    #[arg(long, value_name = "JSON")]
    speculative_config: Option<String>,
    /// Print one JSON object as the last line: {"input_ids","output_ids","text"} (and
    /// "speculative": {drafted, accepted, verify_steps, mean_accepted_length} with MTP).
    #[arg(long)]
    json: bool,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let speculative = match &a.speculative_config {
        Some(json) => Some(SpeculativeConfig::parse(json).map_err(|e| anyhow::anyhow!("--speculative-config: {e}"))?),
        None => None,
    };
    let params =
        SamplingParams { temperature: a.temperature, top_p: a.top_p, top_k: a.top_k, min_p: 0.0, seed: a.seed };
    let mut sampler = Sampler::new(params)?;
    let tokenizer = Tokenizer::from_dir(&a.model)?;
    let input_ids = match (&a.prompt, &a.input_ids) {
        (Some(text), _) => {
            let tok = tokenizer.as_ref().with_context(|| {
                format!("--prompt needs {} in {}; pass --input-ids instead", Tokenizer::FILE, a.model.display())
            })?;
            tok.encode(text)?
        }
        (None, Some(ids)) => parse_ids(ids)?,
        (None, None) => anyhow::bail!("give --prompt or --input-ids"),
    };
    let load = a.compute.load_options()?;
    let (ckpt, model) = load_model(&a.model, load)?;
    let mtp = match speculative {
        Some(_) => Some(Mtp::load(&ckpt, load)?.with_context(|| {
            format!("--speculative-config asks for MTP, but {} has no MTP head (no mtp.* tensors)", a.model.display())
        })?),
        None => None,
    };
    let stop_ids = if a.ignore_eos { Vec::new() } else { ckpt.eos_token_ids.clone() };
    let opts = GenerateOptions { max_tokens: a.max_tokens, stop_ids };

    let started = std::time::Instant::now();
    let mut stdout = std::io::stdout();
    let (output_ids, spec) = match (&mtp, speculative) {
        (Some(mtp), Some(cfg)) => {
            let mut drafter = MtpDrafter::new(mtp)?;
            let k = cfg.num_speculative_tokens;
            let (ids, stats) = generate_speculative(&model, &mut drafter, &input_ids, &opts, k, params, |_| {})?;
            (ids, Some(stats))
        }
        _ => (generate(&model, &input_ids, &opts, &mut sampler, |_| {})?, None),
    };
    let secs = started.elapsed().as_secs_f64();
    tracing::info!(tokens = output_ids.len(), tok_per_s = output_ids.len() as f64 / secs, "generated");
    if let Some(s) = spec {
        tracing::info!(
            drafted = s.drafted,
            accepted = s.accepted,
            mean_accepted_length = s.mean_accepted_length(),
            "MTP speculative decoding"
        );
    }
    let text = match &tokenizer {
        Some(tok) => Some(tok.decode(&output_ids, true)?),
        None => None,
    };
    if a.json {
        let mut v = serde_json::json!({"input_ids": input_ids, "output_ids": output_ids});
        if let Some(t) = text {
            v["text"] = t.into();
        }
        if let Some(s) = spec {
            v["speculative"] = serde_json::json!({"drafted": s.drafted, "accepted": s.accepted,
                "verify_steps": s.verify_steps, "mean_accepted_length": s.mean_accepted_length()});
        }
        writeln!(stdout, "{v}")?;
    } else {
        match text {
            Some(t) => writeln!(stdout, "{t}")?,
            None => writeln!(stdout, "{}", output_ids.iter().map(u32::to_string).collect::<Vec<_>>().join(","))?,
        }
    }
    Ok(())
}
