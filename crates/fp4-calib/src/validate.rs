//! `fp4 calib validate`: counts, schema, tool use per category, markdown, thinking leaks,
//! empty replies and duplicates; and `clean`, which keeps only what passes.

use crate::record::{assistant_texts, called_tools, dedup_key, parse_objects, schema_error};
use crate::{CalibError, Result};
use fp4_bench::gates::{markdown_hits, thinking_leak};
use serde::Serialize;
use serde_json::Value;
use std::collections::{BTreeMap, HashSet};
use std::path::Path;

#[derive(Debug, Clone, Serialize, Default)]
pub struct CategoryStats {
    pub records: usize,
    pub with_tool_calls: usize,
    /// Records calling the category's expected tool (when the config names one).
    pub expected_tool_calls: usize,
}

#[derive(Debug, Clone, Serialize, Default)]
pub struct Report {
    pub total_lines: usize,
    pub valid_json: usize,
    pub valid_schema: usize,
    pub with_tool_calls: usize,
    pub markdown_records: usize,
    pub thinking_leaks: usize,
    pub empty_replies: usize,
    pub duplicates: usize,
    pub per_category: BTreeMap<String, CategoryStats>,
    /// (line, reason) of every rejected line.
    pub problems: Vec<(usize, String)>,
}

/// What a good file must reach (the seed's bar by default).
#[derive(Debug, Clone, Copy)]
pub struct Thresholds {
    pub min_valid: usize,
    pub min_tool_calls: usize,
    pub max_markdown: usize,
}

impl Default for Thresholds {
    fn default() -> Self {
        Thresholds { min_valid: 400, min_tool_calls: 80, max_markdown: 0 }
    }
}

impl Report {
    /// The reasons the file misses the bar (empty: it passes).
    pub fn failures(&self, t: &Thresholds) -> Vec<String> {
        let mut f = Vec::new();
        if self.valid_schema < t.min_valid {
            f.push(format!("{} valid records, need at least {}", self.valid_schema, t.min_valid));
        }
        if self.with_tool_calls < t.min_tool_calls {
            f.push(format!("{} records with tool_calls, need at least {}", self.with_tool_calls, t.min_tool_calls));
        }
        if self.markdown_records > t.max_markdown {
            f.push(format!("{} records with markdown, at most {} allowed", self.markdown_records, t.max_markdown));
        }
        f
    }
}

/// Why a schema-valid record is not fit for Annie's calibration (`None`: it is).
pub fn behaviour_problem(r: &Value) -> Option<String> {
    for t in assistant_texts(r) {
        if !markdown_hits(&t).is_empty() {
            return Some(format!("markdown in an assistant reply ({})", markdown_hits(&t).join(", ")));
        }
        if thinking_leak(&t) {
            return Some("visible thinking in an assistant reply".into());
        }
    }
    None
}

/// Validates JSONL text (one record per line). `expected_tool` maps categories to the tool they
/// must call.
pub fn validate_text(text: &str, expected_tool: &BTreeMap<String, String>) -> Report {
    let mut rep = Report::default();
    let mut seen = HashSet::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        rep.total_lines += 1;
        let lineno = i + 1;
        let v: Value = match serde_json::from_str(line) {
            Ok(v) => v,
            Err(e) => {
                rep.problems.push((lineno, format!("invalid JSON: {e}")));
                continue;
            }
        };
        rep.valid_json += 1;
        if let Some(e) = schema_error(&v) {
            rep.problems.push((lineno, e));
            continue;
        }
        rep.valid_schema += 1;
        let cat = v["category"].as_str().unwrap_or_default().to_string();
        let calls = called_tools(&v);
        let stats = rep.per_category.entry(cat.clone()).or_default();
        stats.records += 1;
        if !calls.is_empty() {
            stats.with_tool_calls += 1;
            rep.with_tool_calls += 1;
        }
        if let Some(t) = expected_tool.get(&cat) {
            if calls.contains(t) {
                stats.expected_tool_calls += 1;
            }
        }
        let texts = assistant_texts(&v);
        if texts.iter().any(|t| !markdown_hits(t).is_empty()) {
            rep.markdown_records += 1;
            rep.problems.push((lineno, "markdown in an assistant reply".into()));
        }
        if texts.iter().any(|t| thinking_leak(t)) {
            rep.thinking_leaks += 1;
            rep.problems.push((lineno, "visible thinking in an assistant reply".into()));
        }
        let last_empty = v["messages"]
            .as_array()
            .and_then(|m| m.last())
            .and_then(|m| m["content"].as_str())
            .is_none_or(|c| c.trim().is_empty());
        if last_empty {
            rep.empty_replies += 1;
        }
        if !seen.insert(dedup_key(&v)) {
            rep.duplicates += 1;
            rep.problems.push((lineno, "duplicate of an earlier record".into()));
        }
    }
    rep
}

pub fn validate_file(path: &Path, expected_tool: &BTreeMap<String, String>) -> Result<Report> {
    let text =
        std::fs::read_to_string(path).map_err(|e| CalibError::File { path: path.to_path_buf(), msg: e.to_string() })?;
    Ok(validate_text(&text, expected_tool))
}

/// Outcome of cleaning: kept records and (source, reason) of every dropped one.
#[derive(Debug, Default, Serialize)]
pub struct Cleaned {
    pub kept: Vec<Value>,
    pub dropped: Vec<(String, String)>,
}

/// Merges inputs (teacher output or JSONL; fences stripped), keeping schema-valid, well-behaved,
/// unique records.
pub fn clean(inputs: &[(String, String)]) -> Cleaned {
    let mut out = Cleaned::default();
    let mut seen = HashSet::new();
    for (name, text) in inputs {
        let (objects, bad) = parse_objects(text);
        out.dropped.extend(bad.into_iter().map(|(l, e)| (format!("{name}:{l}"), e)));
        for (i, v) in objects.into_iter().enumerate() {
            let at = format!("{name} record {}", i + 1);
            if let Some(e) = schema_error(&v).or_else(|| behaviour_problem(&v)) {
                out.dropped.push((at, e));
            } else if !seen.insert(dedup_key(&v)) {
                out.dropped.push((at, "duplicate".into()));
            } else {
                out.kept.push(v);
            }
        }
    }
    out
}

/// Writes records as JSONL atomically: through a uniquely named temporary file beside `path`,
/// removed on any error (a directory at `path` is refused, not left with a `.tmp` beside it),
/// with the mode a plain create gives.
pub fn write_jsonl(path: &Path, records: &[Value]) -> Result<()> {
    let mut text = String::new();
    for r in records {
        text.push_str(&r.to_string());
        text.push('\n');
    }
    if path.is_dir() {
        return Err(CalibError::File { path: path.to_path_buf(), msg: "is a directory; give a file name".into() });
    }
    fp4_bench::report::write_text(path, &text)
        .map_err(|e| CalibError::File { path: path.to_path_buf(), msg: e.to_string() })
}
