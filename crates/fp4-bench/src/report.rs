//! Outputs: the JSON record (schema `fp4.bench.v1`), a Markdown A-vs-B report, SVG plots.

use crate::run::{BackendResult, RunOptions};
use crate::suite::Suite;
use crate::{BenchError, Result};
use serde_json::{json, Value};
use std::fmt::Write;
use std::path::Path;

/// The JSON document: suite, options, timestamps, and per backend its gates, speed
/// distributions and every raw reply with its verdict.
pub fn json_report(suite: &Suite, opts: &RunOptions, results: &[BackendResult], started: u64, finished: u64) -> Value {
    json!({
        "schema": "fp4.bench.v1",
        "producer": {"name": "fp4", "version": env!("CARGO_PKG_VERSION")},
        "started_unix": started,
        "finished_unix": finished,
        "suite": {"name": suite.name, "description": suite.description, "params": suite.params, "gates": suite.gates,
                  "system_prompt": suite.system_prompt, "tests": suite.tests.len()},
        "options": {"warmup": opts.warmup, "runs": opts.runs, "timeout_s": opts.timeout.as_secs_f64()},
        "backends": results,
        "all_gates_pass": results.iter().map(|b| (b.name.clone(), Value::Bool(b.all_gates_pass()))).collect::<serde_json::Map<_, _>>(),
    })
}

/// Writes `text` to `path` (creating its folder) through a uniquely named temporary file beside
/// it (removed on any error), so a reader never sees half a file and two files of one stem
/// (`x.json`, `x.md`) written at once cannot swap contents; it gets the mode any new file gets.
pub fn write_text(path: &Path, text: &str) -> Result<()> {
    let out = |p: &Path, e: &dyn std::fmt::Display| BenchError::Output { path: p.to_path_buf(), msg: e.to_string() };
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| out(dir, &e))?;
    // Mode 0666 less the umask, as a plain create gives (tempfile's default is 0600).
    let mut builder = tempfile::Builder::new();
    #[cfg(unix)]
    builder.permissions(std::os::unix::fs::PermissionsExt::from_mode(0o666));
    let mut tmp = builder.tempfile_in(dir).map_err(|e| out(dir, &e))?;
    std::io::Write::write_all(&mut tmp, text.as_bytes()).map_err(|e| out(tmp.path(), &e))?;
    tmp.persist(path).map_err(|e| out(path, &e.error))?;
    Ok(())
}

pub fn write_json(path: &Path, v: &Value) -> Result<()> {
    write_text(path, &(serde_json::to_string_pretty(v).unwrap_or_default() + "\n"))
}

fn fmt_opt(v: Option<f64>, digits: usize) -> String {
    v.map_or("–".into(), |x| format!("{x:.digits$}"))
}

/// The A-vs-B table: one row per gate, one column per backend, then speed and per-test results.
pub fn markdown(suite: &Suite, opts: &RunOptions, results: &[BackendResult]) -> String {
    let mut md = String::new();
    let _ = writeln!(md, "# fp4 bench: suite `{}`\n", suite.name);
    let _ = writeln!(
        md,
        "{} tests, {} warm-up + {} measured runs per test and backend, temperature {}, max_tokens {}, thinking {}.\n",
        suite.tests.len(),
        opts.warmup,
        opts.runs,
        suite.params.temperature,
        suite.params.max_tokens,
        if suite.params.enable_thinking { "on" } else { "off" }
    );
    let names: Vec<String> =
        results.iter().map(|b| format!("{} ({})", b.name, b.model.as_deref().unwrap_or("unreachable"))).collect();
    let _ = writeln!(md, "| gate | threshold | {} |", names.join(" | "));
    let _ = writeln!(md, "|---|---|{}", "---|".repeat(results.len()));
    for (gi, g) in results.first().map(|b| b.gates.clone()).unwrap_or_default().iter().enumerate() {
        let rule = format!("{} {}", if g.kind == "max" { "≤" } else { "≥" }, g.threshold);
        let cells: Vec<String> = results
            .iter()
            .map(|b| {
                let g = &b.gates[gi];
                let v = match g.total {
                    Some(t) => format!("{}/{t}", g.value),
                    None => format!("{:.1}", g.value),
                };
                format!("{v} {}", if g.pass { "✅" } else { "❌" })
            })
            .collect();
        let _ = writeln!(md, "| {} | {rule} | {} |", g.name, cells.join(" | "));
    }
    let _ = writeln!(md, "\n| speed | {} |\n|---|{}", names.join(" | "), "---|".repeat(results.len()));
    let row = |md: &mut String, label: &str, f: &dyn Fn(&BackendResult) -> String| {
        let cells: Vec<String> = results.iter().map(f).collect();
        let _ = writeln!(md, "| {label} | {} |", cells.join(" | "));
    };
    row(&mut md, "TTFT visible content p50 / p95 (ms)", &|b| {
        format!("{} / {}", fmt_opt(b.ttft_ms.p50, 1), fmt_opt(b.ttft_ms.p95, 1))
    });
    row(&mut md, "TTFT any delta p50 (ms)", &|b| fmt_opt(b.ttft_any_ms.p50, 1));
    row(&mut md, "decode p50 / min (tok/s)", &|b| {
        format!("{} / {}", fmt_opt(b.decode_tok_s.p50, 1), fmt_opt(b.decode_tok_s.min, 1))
    });
    row(&mut md, "failed requests", &|b| b.failed_requests.to_string());
    row(&mut md, "tool calls left as text", &|b| b.raw_tool_call_text.to_string());
    if results.iter().any(|b| b.speculative.is_some()) {
        row(&mut md, "speculative: drafts kept, tokens per verify", &|b| {
            b.speculative.as_ref().map_or("–".into(), |s| {
                format!("{:.0} % of {}, {:.2}", 100.0 * s.acceptance_rate, s.draft_tokens, s.mean_accepted_length)
            })
        });
    }
    let _ = writeln!(md, "\n| test | category | {} |\n|---|---|{}", names.join(" | "), "---|".repeat(results.len()));
    for (ti, t) in suite.tests.iter().enumerate() {
        let cells: Vec<String> = results
            .iter()
            .map(|b| {
                let tr = &b.tests[ti];
                let ok = tr.runs.iter().filter(|r| r.verdict.pass).count();
                format!("{} {ok}/{}", if tr.pass { "✅" } else { "❌" }, tr.runs.len())
            })
            .collect();
        let _ = writeln!(md, "| {} | {:?} | {} |", t.name, t.category, cells.join(" | "));
    }
    md
}

const COLORS: [&str; 4] = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728"];

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

/// TTFT of every measured run, one row of dots per backend, with the p50 marked.
pub fn ttft_svg(results: &[BackendResult]) -> String {
    let all: Vec<f64> = results
        .iter()
        .flat_map(|b| b.tests.iter().flat_map(|t| t.runs.iter().filter_map(|r| r.reply.ttft_ms)))
        .collect();
    let max = all.iter().copied().fold(1.0f64, f64::max) * 1.05;
    let (w, row_h, left) = (720.0, 60.0, 160.0);
    let h = 50.0 + row_h * results.len() as f64;
    let x = |v: f64| left + (w - left - 20.0) * v / max;
    let mut s = format!("<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n");
    let _ = writeln!(
        s,
        "<text x=\"10\" y=\"18\" font-size=\"14\">Time to first visible token (ms), every measured run</text>"
    );
    for (i, b) in results.iter().enumerate() {
        let y = 50.0 + row_h * i as f64;
        let c = COLORS[i % COLORS.len()];
        let _ = writeln!(s, "<text x=\"10\" y=\"{}\">{}</text>", y + 4.0, esc(&b.name));
        for v in b.tests.iter().flat_map(|t| t.runs.iter().filter_map(|r| r.reply.ttft_ms)) {
            let _ = writeln!(s, "<circle cx=\"{:.1}\" cy=\"{y}\" r=\"3\" fill=\"{c}\" fill-opacity=\"0.5\"/>", x(v));
        }
        if let Some(p) = b.ttft_ms.p50 {
            let _ = writeln!(s, "<line x1=\"{0:.1}\" x2=\"{0:.1}\" y1=\"{1}\" y2=\"{2}\" stroke=\"black\" stroke-width=\"2\"/><text x=\"{0:.1}\" y=\"{3}\">p50 {4:.0}</text>", x(p), y - 12.0, y + 12.0, y + 26.0, p);
        }
    }
    let _ = writeln!(
        s,
        "<line x1=\"{left}\" x2=\"{}\" y1=\"{}\" y2=\"{}\" stroke=\"#999\"/><text x=\"{}\" y=\"{}\">{max:.0} ms</text>",
        w - 20.0,
        h - 8.0,
        h - 8.0,
        w - 80.0,
        h - 12.0
    );
    s.push_str("</svg>\n");
    s
}

/// p50 decode speed per test, grouped bars per backend.
pub fn decode_svg(results: &[BackendResult]) -> String {
    let tests = results.first().map(|b| b.tests.len()).unwrap_or(0);
    let p50 = |b: &BackendResult, ti: usize| {
        crate::run::Dist::of(b.tests[ti].runs.iter().filter_map(|r| r.reply.decode_tok_s).collect()).p50
    };
    let max = results.iter().flat_map(|b| (0..tests).filter_map(move |ti| p50(b, ti))).fold(1.0f64, f64::max) * 1.1;
    let (bar, gap, top, plot_h) = (8.0, 10.0, 40.0, 260.0);
    let group = bar * results.len() as f64 + gap;
    let w = 60.0 + group * tests as f64;
    let h = top + plot_h + 140.0;
    let mut s = format!("<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"11\">\n");
    let _ =
        writeln!(s, "<text x=\"10\" y=\"18\" font-size=\"14\">Decode speed per test (tok/s, p50); max {max:.0}</text>");
    for (bi, b) in results.iter().enumerate() {
        let _ = writeln!(
            s,
            "<rect x=\"{}\" y=\"24\" width=\"10\" height=\"10\" fill=\"{}\"/><text x=\"{}\" y=\"33\">{}</text>",
            300.0 + 140.0 * bi as f64,
            COLORS[bi % COLORS.len()],
            314.0 + 140.0 * bi as f64,
            esc(&b.name)
        );
    }
    for ti in 0..tests {
        let gx = 50.0 + group * ti as f64;
        for (bi, b) in results.iter().enumerate() {
            if let Some(v) = p50(b, ti) {
                let bh = plot_h * v / max;
                let _ = writeln!(
                    s,
                    "<rect x=\"{:.1}\" y=\"{:.1}\" width=\"{bar}\" height=\"{bh:.1}\" fill=\"{}\"/>",
                    gx + bar * bi as f64,
                    top + plot_h - bh,
                    COLORS[bi % COLORS.len()]
                );
            }
        }
        let name = results.first().map(|b| b.tests[ti].test.name.clone()).unwrap_or_default();
        let _ = writeln!(
            s,
            "<text transform=\"translate({:.1},{}) rotate(60)\">{}</text>",
            gx,
            top + plot_h + 8.0,
            esc(&name)
        );
    }
    s.push_str("</svg>\n");
    s
}

pub fn write_plots(dir: &Path, results: &[BackendResult]) -> Result<()> {
    write_text(&dir.join("ttft.svg"), &ttft_svg(results))?;
    write_text(&dir.join("decode.svg"), &decode_svg(results))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `x.json` and `x.md` written at the same time keep their own contents (a temporary name
    /// derived from the stem was shared by both).
    #[test]
    fn reports_of_one_stem_written_at_once_keep_their_contents() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (json, md) = (dir.path().join("r.json"), dir.path().join("r.md"));
        std::thread::scope(|s| {
            for (p, text) in [(&json, "json"), (&md, "md")] {
                s.spawn(move || {
                    for i in 0..200 {
                        write_text(p, &format!("{text} {i}")).expect("write");
                        let got = std::fs::read_to_string(p).expect("read");
                        assert!(got.starts_with(text), "{} holds {got:?}", p.display());
                    }
                });
            }
        });
        let names: Vec<_> = std::fs::read_dir(dir.path()).expect("list").flatten().map(|e| e.file_name()).collect();
        assert_eq!(names.len(), 2, "only the two reports remain: {names:?}");
    }

    #[test]
    fn an_unwritable_report_is_an_error_naming_it() {
        let dir = tempfile::tempdir().expect("temp dir");
        let target = dir.path().join("taken");
        std::fs::create_dir(&target).expect("a directory where the report goes");
        let err = write_text(&target, "x").expect_err("cannot replace a directory").to_string();
        assert!(err.contains("taken"), "{err}");
        let names: Vec<_> = std::fs::read_dir(dir.path()).expect("list").flatten().map(|e| e.file_name()).collect();
        assert_eq!(names.len(), 1, "no temporary file left: {names:?}");
    }
}
