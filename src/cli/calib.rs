//! `fp4 calib generate | validate | clean`: calibration conversations for `fp4 quantize`.

use anyhow::{bail, Context};
use clap::{Subcommand, ValueEnum};
use fp4_calib::config::CalibConfig;
use fp4_calib::generate::{generate, GenOptions, Teacher};
use fp4_calib::validate::{self, Thresholds};
use indicatif::{ProgressBar, ProgressStyle};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Ask a teacher model for conversations, batch by batch (resumable).
    Generate(GenerateArgs),
    /// Check a calibration file against the schema and Annie's rules.
    Validate(ValidateArgs),
    /// Merge files, keeping only valid, well-behaved, unique records.
    Clean(CleanArgs),
}

#[derive(ValueEnum, Clone, Copy, Debug)]
enum TeacherKind {
    Claude,
    Openai,
}

#[derive(clap::Args, Debug)]
pub struct GenerateArgs {
    /// Output JSONL; batches are written beside it as batch_NN.jsonl.
    #[arg(long, default_value = "data/calibration/annie_calibration.jsonl")]
    out: PathBuf,
    /// Generation config (default: the built-in configs/calib/annie.toml).
    #[arg(long)]
    config: Option<PathBuf>,
    #[arg(long, value_enum, default_value_t = TeacherKind::Claude)]
    teacher: TeacherKind,
    /// Teacher model (claude: e.g. claude-opus-4-6; openai: the served model name).
    #[arg(long, default_value = "claude-opus-4-6")]
    model: String,
    /// OpenAI-compatible endpoint for --teacher openai.
    #[arg(long)]
    base_url: Option<String>,
    #[arg(long, env = "OPENAI_API_KEY")]
    api_key: Option<String>,
    /// The claude executable.
    #[arg(long, default_value = "claude")]
    claude_bin: String,
    /// Number of batches (overrides the config).
    #[arg(long)]
    batches: Option<usize>,
    /// Batches generated at the same time.
    #[arg(long, default_value_t = 1)]
    jobs: usize,
    /// Re-run only these batches (comma list, 1-based).
    #[arg(long, value_delimiter = ',')]
    only_batches: Option<Vec<usize>>,
    #[arg(long, default_value_t = 3)]
    attempts: usize,
    /// First retry delay; doubles each attempt.
    #[arg(long, default_value_t = 5000)]
    retry_delay_ms: u64,
    /// Seconds one teacher call may take.
    #[arg(long, default_value_t = 900)]
    timeout: u64,
}

#[derive(clap::Args, Debug)]
pub struct ValidateArgs {
    file: PathBuf,
    #[arg(long)]
    config: Option<PathBuf>,
    /// Also write the report as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
    #[arg(long, default_value_t = 400)]
    min_valid: usize,
    #[arg(long, default_value_t = 80)]
    min_tool_calls: usize,
    #[arg(long, default_value_t = 0)]
    max_markdown: usize,
}

#[derive(clap::Args, Debug)]
pub struct CleanArgs {
    #[arg(required = true)]
    inputs: Vec<PathBuf>,
    #[arg(long)]
    out: PathBuf,
}

pub fn run(cmd: Command) -> anyhow::Result<()> {
    match cmd {
        Command::Generate(a) => run_generate(a),
        Command::Validate(a) => run_validate(a),
        Command::Clean(a) => run_clean(a),
    }
}

fn run_generate(a: GenerateArgs) -> anyhow::Result<()> {
    let mut cfg = CalibConfig::load(a.config.as_deref())?;
    if let Some(b) = a.batches {
        anyhow::ensure!(b > 0, "--batches must be at least 1");
        cfg.batches = b;
    }
    let teacher = match a.teacher {
        TeacherKind::Claude => Teacher::Claude { bin: a.claude_bin.clone(), model: a.model.clone() },
        TeacherKind::Openai => Teacher::OpenAi {
            base_url: a.base_url.clone().context("--teacher openai needs --base-url")?,
            model: a.model.clone(),
            api_key: a.api_key.clone(),
        },
    };
    let opts = GenOptions {
        out: a.out.clone(),
        only: a.only_batches.clone(),
        jobs: a.jobs,
        attempts: a.attempts,
        retry_delay: Duration::from_millis(a.retry_delay_ms),
        timeout: Duration::from_secs(a.timeout.max(1)),
    };
    let bar = ProgressBar::new(cfg.batches as u64).with_style(
        ProgressStyle::with_template("batches [{bar:30}] {pos}/{len}, {elapsed}")
            .expect("static")
            .progress_chars("=> "),
    );
    let report = generate(&cfg, &teacher, &opts, &|done, _| bar.set_position(done as u64))?;
    bar.finish_and_clear();
    for b in &report.batches {
        match &b.error {
            Some(e) => eprintln!("batch {:02}: {} after {} attempt(s): {e}", b.batch, b.status, b.attempts),
            None => eprintln!("batch {:02}: {} ({} records)", b.batch, b.status, b.records),
        }
    }
    eprintln!("{} conversations merged into {}", report.merged_records, report.output.display());
    let failed = report.failed();
    if !failed.is_empty() {
        let list: Vec<String> = failed.iter().map(usize::to_string).collect();
        bail!(
            "{} batch(es) failed ({}); run again to resume, or --only-batches {}",
            failed.len(),
            list.join(","),
            list.join(",")
        );
    }
    Ok(())
}

fn run_validate(a: ValidateArgs) -> anyhow::Result<()> {
    let cfg = CalibConfig::load(a.config.as_deref())?;
    let expected: BTreeMap<String, String> =
        cfg.categories.iter().filter_map(|c| c.tool.clone().map(|t| (c.name.clone(), t))).collect();
    let rep = validate::validate_file(&a.file, &expected)?;
    println!(
        "{}: {} lines, {} valid JSON, {} valid records",
        a.file.display(),
        rep.total_lines,
        rep.valid_json,
        rep.valid_schema
    );
    println!(
        "with tool_calls {}, markdown {}, thinking leaks {}, empty replies {}, duplicates {}",
        rep.with_tool_calls, rep.markdown_records, rep.thinking_leaks, rep.empty_replies, rep.duplicates
    );
    for (cat, s) in &rep.per_category {
        let exp = expected.get(cat).map(|t| format!(", {} call {t}", s.expected_tool_calls)).unwrap_or_default();
        println!("  {cat:<12} {:>5} records, {} with tool_calls{exp}", s.records, s.with_tool_calls);
    }
    for (line, why) in rep.problems.iter().take(20) {
        println!("  line {line}: {why}");
    }
    if rep.problems.len() > 20 {
        println!("  … {} more problems (see --json)", rep.problems.len() - 20);
    }
    if let Some(p) = &a.json {
        fp4_bench::report::write_text(p, &(serde_json::to_string_pretty(&rep)? + "\n"))
            .with_context(|| format!("cannot write {}", p.display()))?;
    }
    let failures = rep.failures(&Thresholds {
        min_valid: a.min_valid,
        min_tool_calls: a.min_tool_calls,
        max_markdown: a.max_markdown,
    });
    if !failures.is_empty() {
        bail!("{} does not meet the bar: {}", a.file.display(), failures.join("; "));
    }
    Ok(())
}

fn run_clean(a: CleanArgs) -> anyhow::Result<()> {
    let mut inputs = Vec::new();
    for p in &a.inputs {
        inputs.push((
            p.display().to_string(),
            std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()))?,
        ));
    }
    let c = validate::clean(&inputs);
    validate::write_jsonl(&a.out, &c.kept)?;
    for (at, why) in &c.dropped {
        eprintln!("dropped {at}: {why}");
    }
    eprintln!("kept {} records, dropped {} → {}", c.kept.len(), c.dropped.len(), a.out.display());
    Ok(())
}
