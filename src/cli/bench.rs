//! `fp4 bench`: one or two OpenAI endpoints side by side on a suite (speed + behaviour gates).

use fp4_bench::client::Backend;
use fp4_bench::run::{self, RunOptions};
use fp4_bench::{conversation, report, suite::Suite};
use indicatif::{ProgressBar, ProgressStyle};
use std::path::PathBuf;
use std::time::Duration;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// First backend: a name and its base URL (e.g. `fp4 http://localhost:8000`).
    #[arg(long, num_args = 2, value_names = ["NAME", "URL"], required = true)]
    backend_a: Vec<String>,
    /// Second backend to compare with (e.g. `llama http://localhost:8003`).
    #[arg(long, num_args = 2, value_names = ["NAME", "URL"])]
    backend_b: Option<Vec<String>>,
    /// Suite file (default: the built-in Annie suite, configs/bench/annie.toml).
    #[arg(long)]
    suite: Option<PathBuf>,
    /// Unmeasured requests per backend before measuring.
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    /// Measured requests per test and backend.
    #[arg(long, default_value_t = 5, conflicts_with = "conversation")]
    runs: usize,
    /// JSON results (schema fp4.bench.v1).
    #[arg(long, default_value = "results.json")]
    output: PathBuf,
    /// Markdown A-vs-B report.
    #[arg(long)]
    markdown: Option<PathBuf>,
    /// Directory for SVG plots (ttft.svg, decode.svg).
    #[arg(long, conflicts_with = "conversation")]
    plots: Option<PathBuf>,
    /// Exit with status 1 if any gate of backend A fails.
    #[arg(long, conflicts_with = "conversation")]
    require_gates: bool,
    /// Per-request timeout in seconds.
    #[arg(long, default_value_t = 120)]
    timeout: u64,
    /// Bearer token sent to both backends.
    #[arg(long, env = "OPENAI_API_KEY")]
    api_key: Option<String>,
    /// Instead of the suite's tests: one conversation of this many turns (the suite's system
    /// prompt and tools, its test prompts as the user's turns, each request carrying the whole
    /// history; backend A's replies make the history and B gets the same requests), TTFT turn by
    /// turn (JSON schema fp4.conversation-bench.v1).
    #[arg(long, value_name = "TURNS", value_parser = clap::value_parser!(u32).range(1..=1000))]
    conversation: Option<u32>,
    /// Tokens per reply in --conversation (the history grows by each reply).
    #[arg(long, default_value_t = 48, requires = "conversation")]
    reply_tokens: u32,
}

fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let suite = Suite::load(a.suite.as_deref())?;
    let backend = |v: &[String]| Backend { name: v[0].clone(), url: v[1].clone(), api_key: a.api_key.clone() };
    let mut backends = vec![backend(&a.backend_a)];
    if let Some(b) = &a.backend_b {
        backends.push(backend(b));
    }
    let opts = RunOptions { warmup: a.warmup, runs: a.runs, timeout: Duration::from_secs(a.timeout.max(1)) };
    let bar = ProgressBar::new(0).with_style(
        ProgressStyle::with_template("benchmark [{bar:30}] {pos}/{len} requests, {elapsed} (eta {eta})")
            .expect("static template")
            .progress_chars("=> "),
    );
    let progress = |done: usize, total: usize| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
    };
    let started = unix_now();
    if let Some(turns) = a.conversation {
        let copts = conversation::ConversationOptions {
            turns: turns as usize,
            warmup: a.warmup,
            max_tokens: a.reply_tokens,
            timeout: opts.timeout,
        };
        let results = conversation::run(&suite, &backends, &copts, &progress);
        bar.finish_and_clear();
        report::write_json(&a.output, &conversation::json_report(&suite, &copts, &results, started, unix_now()))?;
        let md = conversation::markdown(&copts, &results);
        write_markdown(&a, &md)?;
        results.iter().for_each(|b| say_unreachable(&b.name, &b.url, &b.error));
        anyhow::ensure!(results[0].error.is_none(), "backend {} was not measured", results[0].name);
        return Ok(());
    }
    let results = run::run(&suite, &backends, &opts, &progress)?;
    bar.finish_and_clear();
    let doc = report::json_report(&suite, &opts, &results, started, unix_now());
    report::write_json(&a.output, &doc)?;
    let md = report::markdown(&suite, &opts, &results);
    if let Some(dir) = &a.plots {
        report::write_plots(dir, &results)?;
    }
    write_markdown(&a, &md)?;
    results.iter().for_each(|b| say_unreachable(&b.name, &b.url, &b.error));
    if a.require_gates && !results[0].all_gates_pass() {
        let failed: Vec<&str> = results[0].gates.iter().filter(|g| !g.pass).map(|g| g.name).collect();
        // An error like any other (exit status 1), after every report is written.
        anyhow::bail!("gates failed for {}: {}", results[0].name, failed.join(", "));
    }
    Ok(())
}

/// The Markdown report to `--markdown` when given, and to stdout.
fn write_markdown(a: &Args, md: &str) -> anyhow::Result<()> {
    if let Some(p) = &a.markdown {
        report::write_text(p, md)?;
    }
    println!("{md}");
    Ok(())
}

fn say_unreachable(name: &str, url: &str, error: &Option<String>) {
    if let Some(e) = error {
        eprintln!("backend {name} ({url}) was unreachable: {e}");
    }
}
