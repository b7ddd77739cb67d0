//! `fp4 card RUN_DIR [--strategy X]`: the Hugging Face model card (`README.md`) of a checkpoint
//! that `fp4 loop` measured. Everything in it comes from JSON: RUN_DIR/summary.json (gates,
//! speeds, KL, calibration data), the checkpoint's quant_report.json, hf_quant_config.json and
//! config.json, and the source model card's front matter (license, base_model, tags). No number
//! is typed by hand.

use super::r#loop::summary::{self, GateRow, Measured, StrategyRun, Summary};
use anyhow::{bail, Context};
use serde_json::Value;
use std::collections::BTreeMap;
use std::fmt::Write;
use std::path::{Path, PathBuf};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// A directory `fp4 loop` wrote (it holds summary.json).
    run_dir: PathBuf,
    /// The strategy whose checkpoint gets the card (default: the one the loop chose).
    #[arg(long)]
    strategy: Option<String>,
    /// `base_model` of the front matter (default: the source card's, if it has one).
    #[arg(long)]
    base_model: Option<String>,
    /// `license` of the front matter (default: the source card's).
    #[arg(long)]
    license: Option<String>,
    /// Where to write (default: RUN_DIR/<strategy>/README.md; `-`: standard output).
    #[arg(long)]
    output: Option<PathBuf>,
}

/// The line that marks a README.md as written by `fp4 card` (it may be replaced).
const MARKER: &str = "<!-- written by `fp4 card`";

/// The tags every card carries, before the source card's own.
const TAGS: [&str; 4] = ["dgx-spark", "blackwell", "nvfp4", "qwen3.5"];

/// What the card is made from.
struct Inputs {
    summary: Summary,
    row: StrategyRun,
    /// The checkpoint directory.
    dir: PathBuf,
    report: Value,
    hf_quant: Value,
    config: Value,
    source: FrontMatter,
}

fn read_json(path: &Path) -> anyhow::Result<Value> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_slice(&bytes).with_context(|| format!("{} is not valid JSON", path.display()))
}

impl Inputs {
    fn read(run_dir: &Path, strategy: Option<&str>) -> anyhow::Result<Inputs> {
        let path = run_dir.join(summary::FILE);
        let v =
            read_json(&path).with_context(|| format!("{} is not an `fp4 loop` run directory", run_dir.display()))?;
        anyhow::ensure!(
            v["schema"] == summary::SCHEMA,
            "{}: schema {} is not {} (written by another fp4?)",
            path.display(),
            v["schema"],
            summary::SCHEMA
        );
        let summary: Summary =
            serde_json::from_value(v).with_context(|| format!("{}: unexpected fields", path.display()))?;
        let names = || summary.strategies.iter().map(|r| r.name.as_str()).collect::<Vec<_>>().join(", ");
        let name = match strategy.map(str::to_string).or_else(|| summary.chosen.clone()) {
            Some(n) => n,
            None => bail!(
                "{}: the loop chose no strategy (none passed every required gate); pass --strategy NAME ({}) to write a card anyway",
                path.display(),
                names()
            ),
        };
        let row = summary
            .strategies
            .iter()
            .find(|r| r.name == name)
            .cloned()
            .with_context(|| format!("{}: no strategy `{name}` (it has {})", path.display(), names()))?;
        let q = row.quantized.as_ref().with_context(|| {
            format!(
                "{}: strategy `{name}` was not quantized ({})",
                path.display(),
                row.error.as_deref().unwrap_or("no checkpoint")
            )
        })?;
        let dir = run_dir.join(&q.checkpoint);
        let report = read_json(&dir.join(fp4_quant::export::REPORT))?;
        let hf_quant = read_json(&dir.join("hf_quant_config.json"))?;
        let config = read_json(&dir.join("config.json"))?;
        let source = FrontMatter::of_model(&summary.model);
        Ok(Inputs { summary, row, dir, report, hf_quant, config, source })
    }
}

/// The front matter of a model card: `key: value` scalars and `key:` + `- item` (or `[a, b]`)
/// lists, the subset of YAML that Hugging Face cards use.
#[derive(Debug, Default, Clone)]
struct FrontMatter {
    fields: BTreeMap<String, Vec<String>>,
}

impl FrontMatter {
    /// The source directory's README.md front matter (empty when it has none).
    fn of_model(dir: &Path) -> FrontMatter {
        std::fs::read_to_string(dir.join("README.md")).map(|t| FrontMatter::parse(&t)).unwrap_or_default()
    }

    fn parse(text: &str) -> FrontMatter {
        let mut fields: BTreeMap<String, Vec<String>> = BTreeMap::new();
        let mut lines = text.lines();
        if lines.next().map(str::trim) != Some("---") {
            return FrontMatter::default();
        }
        let unquote = |s: &str| s.trim().trim_matches(|c| c == '"' || c == '\'').to_string();
        let mut current: Option<String> = None;
        for line in lines {
            if line.trim() == "---" {
                break;
            }
            if let Some(item) = line.trim_start().strip_prefix("- ") {
                if let Some(k) = &current {
                    fields.entry(k.clone()).or_default().push(unquote(item));
                }
                continue;
            }
            if line.starts_with(' ') {
                continue; // nested mappings: not used here
            }
            let Some((k, v)) = line.split_once(':') else { continue };
            let (k, v) = (k.trim().to_string(), v.trim());
            let values: Vec<String> = match v.strip_prefix('[').and_then(|v| v.strip_suffix(']')) {
                Some(list) => list.split(',').map(unquote).filter(|s| !s.is_empty()).collect(),
                None if v.is_empty() => vec![],
                None => vec![unquote(v)],
            };
            fields.insert(k.clone(), values);
            current = Some(k);
        }
        FrontMatter { fields }
    }

    fn first(&self, key: &str) -> Option<&str> {
        self.fields.get(key).and_then(|v| v.first()).map(String::as_str)
    }

    fn list(&self, key: &str) -> &[String] {
        self.fields.get(key).map(Vec::as_slice).unwrap_or_default()
    }
}

fn f(v: Option<f64>, digits: usize) -> String {
    v.map_or("–".into(), |x| format!("{x:.digits$}"))
}

fn mb(bytes: u64) -> String {
    format!("{:.2} MB", bytes as f64 / 1e6)
}

fn gate_value(g: &GateRow) -> String {
    let v = match (g.value, g.total) {
        (Some(v), Some(t)) => format!("{v:.0}/{t}"),
        (Some(v), None) => format!("{v:.1}"),
        (None, _) => "–".into(),
    };
    format!("{v} {}", if g.pass { "✅" } else { "❌" })
}

/// `model.language_model.layers.3.mlp.gate_proj` → (`mlp.gate_proj`, 3).
fn module_kind(name: &str) -> (String, Option<usize>) {
    let Some(i) = name.find("layers.") else { return (name.to_string(), None) };
    let rest = &name[i + "layers.".len()..];
    match rest.split_once('.') {
        Some((n, kind)) => (kind.to_string(), n.parse().ok()),
        None => (name.to_string(), None),
    }
}

/// Layer indices as ranges: 1,2,3,5 → "1–3, 5".
fn ranges(mut v: Vec<usize>) -> String {
    v.sort_unstable();
    v.dedup();
    let mut out: Vec<String> = Vec::new();
    let mut i = 0;
    while i < v.len() {
        let mut j = i;
        while j + 1 < v.len() && v[j + 1] == v[j] + 1 {
            j += 1;
        }
        out.push(if i == j { v[i].to_string() } else { format!("{}–{}", v[i], v[j]) });
        i = j + 1;
    }
    out.join(", ")
}

fn render(x: &Inputs, base_model: Option<&str>, license: Option<&str>) -> anyhow::Result<String> {
    let (s, row, report) = (&x.summary, &x.row, &x.report);
    let q = row.quantized.as_ref().expect("Inputs::read checks");
    let license = license.or(x.source.first("license")).with_context(|| {
        format!("the source {} has no model card with a license: pass --license (e.g. apache-2.0)", s.model.display())
    })?;
    let base_model = base_model.map(str::to_string).or_else(|| x.source.first("base_model").map(str::to_string));
    let quant_algo = x.hf_quant["quantization"]["quant_algo"].as_str().unwrap_or(&q.quant_algo).to_string();
    let mut md = String::new();
    // 1. Front matter.
    let _ = writeln!(md, "---\nlicense: {license}");
    if let Some(b) = &base_model {
        let _ = writeln!(md, "base_model: {b}\nbase_model_relation: quantized");
    }
    if let Some(p) = x.source.first("pipeline_tag") {
        let _ = writeln!(md, "pipeline_tag: {p}");
    }
    let mut tags: Vec<String> = TAGS.iter().map(|t| t.to_string()).collect();
    for t in x.source.list("tags") {
        if !tags.contains(t) {
            tags.push(t.clone());
        }
    }
    let _ = writeln!(md, "tags:");
    for t in &tags {
        let _ = writeln!(md, "- {t}");
    }
    let _ = writeln!(md, "---\n");
    let _ = writeln!(
        md,
        "{MARKER} {} from {}/summary.json and the checkpoint's JSON; every number below is measured -->\n",
        s.fp4_version,
        x.dir.parent().map(|p| p.display().to_string()).unwrap_or_default()
    );
    // 2. Title and source.
    let source = base_model.clone().unwrap_or_else(|| s.model.display().to_string());
    let _ = writeln!(md, "# {source} — {quant_algo} (`fp4 loop` strategy {})\n", row.name);
    let chosen = s.chosen.as_deref() == Some(row.name.as_str());
    let _ = writeln!(
        md,
        "Quantized from `{source}` by fp4 {} with strategy `{}` ({}). {}\n",
        s.fp4_version,
        row.name,
        row.config,
        if chosen {
            format!(
                "`fp4 loop` chose it among the {} strategies it ran: it passes every required gate with the lowest TTFT.",
                s.strategies.len()
            )
        } else {
            match s.chosen.as_deref() {
                Some(c) => format!("Not the loop's choice (that was `{c}`)."),
                None => "The loop chose no strategy; see the gates below.".into(),
            }
        }
    );
    // 3. Quantization.
    let totals = &report["totals"];
    let (qp, qb) = (totals["quantized_params"].as_f64(), totals["quantized_bytes"].as_f64());
    let (ql, ul) =
        (totals["quantized_layers"].as_u64().unwrap_or(0), totals["unquantized_layers"].as_u64().unwrap_or(0));
    let _ = writeln!(md, "## Quantization\n\n| | |\n|---|---|");
    let _ = writeln!(
        md,
        "| strategy | `{}` (algorithm `{}`) |",
        report["strategy"].as_str().unwrap_or("?"),
        report["algorithm"].as_str().unwrap_or("?")
    );
    let _ = writeln!(
        md,
        "| format | ModelOpt `{quant_algo}`{} |",
        x.hf_quant["quantization"]["group_size"].as_u64().map_or(String::new(), |g| format!(", group size {g}"))
    );
    let _ = writeln!(md, "| quantized linear layers | {ql} of {} |", ql + ul);
    match report["auto_mixed"]["effective_bits"].as_f64() {
        Some(b) => {
            let _ = writeln!(
                md,
                "| effective bits per weight (candidate layers) | {b:.3} (target {}, NVFP4 counted as {}) |",
                report["auto_mixed"]["target_bits"], report["auto_mixed"]["nvfp4_bits_convention"]
            );
        }
        None => {
            let bits = qp.zip(qb).filter(|(p, _)| *p > 0.0).map(|(p, b)| b * 8.0 / p);
            let _ = writeln!(md, "| bits per weight of the quantized layers (scales included) | {} |", f(bits, 3));
        }
    }
    let _ = writeln!(
        md,
        "| checkpoint size | {} (source {}, {}) |",
        mb(q.size_bytes),
        mb(q.source_size_bytes),
        f((q.source_size_bytes > 0).then(|| q.size_bytes as f64 / q.source_size_bytes as f64), 3) + "×"
    );
    let _ = writeln!(md, "| mean relative weight error | {} |", f(totals["mean_weight_rel_error"].as_f64(), 4));
    let cal = &report["calibration"];
    let _ = writeln!(md, "| calibration | {} samples, {} tokens |", cal["samples"], cal["tokens"]);
    let _ = writeln!(md, "| served as | {} |\n", s.serve_mode.to_uppercase());
    // Formats per module kind.
    let mut kinds: BTreeMap<(String, String), Vec<usize>> = BTreeMap::new();
    if let Some(layers) = report["layers"].as_object() {
        for (name, l) in layers {
            let (kind, idx) = module_kind(name);
            let entry = kinds.entry((kind, l["format"].as_str().unwrap_or("?").to_string())).or_default();
            entry.extend(idx);
        }
    }
    let _ = writeln!(md, "Formats per module (decoder layer indices):\n\n| module | format | layers |\n|---|---|---|");
    for ((kind, format), idx) in &kinds {
        let _ = writeln!(md, "| `{kind}` | {format} | {} |", ranges(idx.clone()));
    }
    let excluded: Vec<String> = x.hf_quant["quantization"]["exclude_modules"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| v.as_str().map(|s| format!("`{s}`")))
        .collect();
    let _ = writeln!(
        md,
        "\nKept in BF16 (`exclude_modules`): {}.\n",
        if excluded.is_empty() { "none".into() } else { excluded.join(", ") }
    );
    // 4. Calibration data: the file this checkpoint calibrated on (rtn may have its own).
    let used = report["options"]["calib_data"].as_str().map(PathBuf::from);
    let c = match &s.calibration.rtn {
        Some(r) if used.as_ref() == Some(&r.file) => r.as_ref(),
        _ => &s.calibration,
    };
    let _ = writeln!(md, "## Calibration data\n");
    let _ = writeln!(
        md,
        "`{}`: {} records ({} conversations, {} pre-tokenized); the first {} samples ({} tokens) calibrate. {}.",
        c.file.display(),
        c.records,
        c.conversations,
        c.pre_tokenized,
        c.samples,
        c.tokens,
        c.description
    );
    if let Some(share) = c.tool_call_share {
        let _ = writeln!(
            md,
            "Conversations with tool calls: {} of {} ({:.1} %).",
            c.with_tool_calls,
            c.conversations,
            share * 100.0
        );
    }
    let _ = writeln!(md, "\n| category | records |\n|---|---|");
    for (cat, n) in &c.categories {
        let _ = writeln!(md, "| {cat} | {n} |");
    }
    // 5. Results.
    let e = &s.eval;
    let _ = writeln!(
        md,
        "\n## Measured results\n\nSuite `{}` ({} tests, {} warm-up + {} measured runs each, temperature {}, max_tokens {}), served on `{}`.",
        s.suite.name, s.suite.tests, s.suite.warmup, s.suite.runs, s.suite.temperature, s.suite.max_tokens, s.device
    );
    let peer = s.peer.as_ref();
    let peer_m: Option<&Measured> = peer.and_then(|p| p.measured.as_ref()).filter(|_| peer.is_some_and(|p| p.is_up()));
    if let Some(p) = peer {
        let _ = writeln!(
            md,
            "Compared with **{}** ({}{}){}.",
            p.name,
            p.url,
            if p.served_by_fp4 { ", the BF16 source served by fp4" } else { "" },
            if p.is_up() { "" } else { ": it was down, so there is no comparison" }
        );
    }
    if let Some(smoke) = &row.smoke {
        let _ = writeln!(
            md,
            "\nSmoke test (\"{}\"): {} — \"{}\"",
            smoke.question,
            if smoke.pass { "pass" } else { "FAIL" },
            smoke.content.trim()
        );
    }
    if let Some(m) = &row.measured {
        let _ = writeln!(
            md,
            "\n| gate | threshold | {} |{}\n|---|---|---|{}",
            row.name,
            peer_m.map_or(String::new(), |_| format!(" {} |", peer.expect("peer").name)),
            if peer_m.is_some() { "---|" } else { "" }
        );
        for g in &m.gates {
            let rule = format!("{} {}", if g.kind == "max" { "≤" } else { "≥" }, g.threshold);
            let note = if g.required { "" } else { " (not required)" };
            let other = peer_m
                .and_then(|p| p.gates.iter().find(|o| o.name == g.name))
                .map_or(String::new(), |o| format!(" {} |", gate_value(o)));
            let _ = writeln!(md, "| {}{note} | {rule} | {} |{other}", g.name, gate_value(g));
        }
        let _ = writeln!(
            md,
            "\n| speed | {} |{}\n|---|---|{}",
            row.name,
            if peer_m.is_some() { " peer | ratio |" } else { "" },
            if peer_m.is_some() { "---|---|" } else { "" }
        );
        let ratio = |v: Option<f64>| v.map_or("–".into(), |x| format!("{x:.2}×"));
        let _ = writeln!(
            md,
            "| TTFT p50 / p95 (ms) | {} / {} |{}",
            f(m.ttft_ms_p50, 1),
            f(m.ttft_ms_p95, 1),
            peer_m.map_or(String::new(), |p| format!(
                " {} / {} | {} |",
                f(p.ttft_ms_p50, 1),
                f(p.ttft_ms_p95, 1),
                ratio(row.ttft_speedup_vs_peer)
            ))
        );
        let _ = writeln!(
            md,
            "| decode p50 (tok/s) | {} |{}",
            f(m.decode_tok_s_p50, 1),
            peer_m.map_or(String::new(), |p| format!(
                " {} | {} |",
                f(p.decode_tok_s_p50, 1),
                ratio(row.decode_speedup_vs_peer)
            ))
        );
    }
    if row.measured.is_some() && peer_m.is_some() {
        let _ = writeln!(md, "\nRatio: the peer's TTFT over this one's, this decode speed over the peer's (above 1× this checkpoint is faster).");
    }
    if let Some(k) = &row.kl {
        let _ = writeln!(
            md,
            "\nKL(BF16 ‖ this) on {} samples ({} tokens) of `{}`{}: mean {:.4}, p99 {:.4}, max {:.4}; top-1 agreement {:.1} %; perplexity {:.3} (BF16 {:.3}).",
            k.samples,
            k.tokens,
            e.file.display(),
            if e.held_out_of_calibration { ", held out of calibration" } else { "" },
            k.kl_mean,
            k.kl_p99,
            k.kl_max,
            k.top1_agreement * 100.0,
            k.ppl_model,
            k.ppl_reference
        );
    }
    let _ = writeln!(md, "\nEvery strategy the loop ran:\n\n| strategy | required gates | KL mean | TTFT p50 (ms) | decode p50 (tok/s) | size |\n|---|---|---|---|---|---|");
    for r in &s.strategies {
        let blockers = r.blockers();
        let _ = writeln!(
            md,
            "| {}{} | {} | {} | {} | {} | {} |",
            r.name,
            if s.chosen.as_deref() == Some(r.name.as_str()) { " (chosen)" } else { "" },
            if blockers.is_empty() { "pass".to_string() } else { format!("fail: {}", blockers.join(", ")) },
            f(r.kl.as_ref().map(|k| k.kl_mean), 4),
            f(r.measured.as_ref().and_then(|m| m.ttft_ms_p50), 1),
            f(r.measured.as_ref().and_then(|m| m.decode_tok_s_p50), 1),
            r.quantized.as_ref().map_or("–".into(), |q| mb(q.size_bytes))
        );
    }
    // 6. Serving.
    let max_len = x.config["text_config"]["max_position_embeddings"]
        .as_u64()
        .or(x.config["max_position_embeddings"].as_u64())
        .context("config.json has no max_position_embeddings")?;
    let dir = x.dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let _ = writeln!(md, "\n## Serving\n\nWith fp4 (W4A4 on SM120/SM121 by default, W4A16 elsewhere):\n");
    let _ = writeln!(
        md,
        "```sh\nfp4 serve --model {dir} --port 8000 --max-model-len {max_len} \\\n    --reasoning-parser qwen3 --enable-auto-tool-choice --tool-call-parser qwen3_coder\n```\n"
    );
    if quant_algo == "NVFP4_AWQ" {
        let _ = writeln!(
            md,
            "This checkpoint is `NVFP4_AWQ` (pre_quant_scale): vLLM and SGLang do not load it; serve it with fp4."
        );
    } else {
        let _ = writeln!(
            md,
            "With vLLM (`--quantization modelopt`; `--language-model-only` because Qwen3.5 is a VL architecture):\n"
        );
        let _ = writeln!(
            md,
            "```sh\ndocker run --gpus all --ipc=host -p 8000:8000 -v \"$PWD/{dir}:/model\" vllm/vllm-openai:cu130-nightly \\\n    --model /model --served-model-name {dir} --quantization modelopt --language-model-only \\\n    --max-model-len {max_len} --gpu-memory-utilization 0.3 \\\n    --reasoning-parser qwen3 --enable-auto-tool-choice --tool-call-parser qwen3_coder\n```"
        );
    }
    Ok(md)
}

/// Whether fp4 may replace `path`: absent, written by `fp4 card`, or the source's README.md that
/// `fp4 quantize` copied.
fn replaceable(path: &Path, source: &Path) -> bool {
    let Ok(text) = std::fs::read_to_string(path) else { return !path.exists() };
    text.contains(MARKER) || std::fs::read_to_string(source.join("README.md")).is_ok_and(|s| s == text)
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let x = Inputs::read(&a.run_dir, a.strategy.as_deref())?;
    if a.base_model.is_none() && x.source.first("base_model").is_none() {
        eprintln!(
            "note: the source {} names no base_model in its card: the front matter has none (pass --base-model ORG/NAME)",
            x.summary.model.display()
        );
    }
    let text = render(&x, a.base_model.as_deref(), a.license.as_deref())?;
    let out = a.output.clone().unwrap_or_else(|| x.dir.join("README.md"));
    if out.as_os_str() == "-" {
        print!("{text}");
        return Ok(());
    }
    anyhow::ensure!(
        replaceable(&out, &x.summary.model),
        "{} exists and was not written by fp4: move it or pass --output FILE",
        out.display()
    );
    fp4_bench::report::write_text(&out, &text)?;
    eprintln!("model card for {} → {}", x.row.name, out.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn front_matter_scalars_and_lists() {
        let fm = FrontMatter::parse(
            "---\nlicense: apache-2.0\nbase_model:\n- Qwen/Qwen3.5-9B\ntags: [qwen, \"chat\"]\npipeline_tag: text-generation\nwidget:\n  - text: hi\n---\n# Card\nlicense: not this",
        );
        assert_eq!(fm.first("license"), Some("apache-2.0"));
        assert_eq!(fm.first("base_model"), Some("Qwen/Qwen3.5-9B"));
        assert_eq!(fm.list("tags"), ["qwen".to_string(), "chat".to_string()]);
        assert!(FrontMatter::parse("# no front matter\nlicense: x").fields.is_empty());
    }

    #[test]
    fn module_kinds_and_ranges() {
        assert_eq!(module_kind("model.language_model.layers.12.mlp.up_proj"), ("mlp.up_proj".into(), Some(12)));
        assert_eq!(module_kind("lm_head"), ("lm_head".into(), None));
        assert_eq!(ranges(vec![5, 1, 2, 3, 7, 8]), "1–3, 5, 7–8");
    }
}
