//! `fp4 calib generate`: asks a teacher for conversations batch by batch, keeps what validates,
//! writes `batch_NN.jsonl` beside the output (good batches are skipped on the next run), retries
//! failures with backoff, then merges the batches into the output file.

use crate::config::CalibConfig;
use crate::record::parse_objects;
use crate::validate::{behaviour_problem, clean, write_jsonl};
use crate::{CalibError, Result};
use serde_json::{json, Value};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

#[derive(Debug, Clone)]
pub enum Teacher {
    /// The Claude Code CLI in print mode (`claude -p --model M --output-format text --max-turns 1`).
    Claude { bin: String, model: String },
    /// Any OpenAI-compatible endpoint.
    OpenAi { base_url: String, model: String, api_key: Option<String> },
}

#[derive(Debug, Clone)]
pub struct GenOptions {
    pub out: PathBuf,
    /// Re-run only these batches (1-based), even if they exist.
    pub only: Option<Vec<usize>>,
    pub jobs: usize,
    pub attempts: usize,
    pub retry_delay: Duration,
    pub timeout: Duration,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct BatchOutcome {
    pub batch: usize,
    /// "skipped" (already good), "generated", or "failed".
    pub status: &'static str,
    pub records: usize,
    pub attempts: usize,
    pub error: Option<String>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct GenReport {
    pub batches: Vec<BatchOutcome>,
    pub merged_records: usize,
    pub output: PathBuf,
}

impl GenReport {
    pub fn failed(&self) -> Vec<usize> {
        self.batches.iter().filter(|b| b.status == "failed").map(|b| b.batch).collect()
    }
}

pub fn batch_path(out: &Path, b: usize) -> PathBuf {
    out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new(".")).join(format!("batch_{b:02}.jsonl"))
}

/// The prompt for one batch: the exact record format, Annie's rules and the categories' counts.
pub fn batch_prompt(cfg: &CalibConfig, b: usize) -> String {
    let tools = cfg.tool_values().unwrap_or_default();
    let mut p = String::from(
        "Write calibration conversations for a voice assistant named Annie. Output ONLY JSON, one conversation object per line (JSON Lines), no prose and no markdown fences.\n\n\
Each object: {\"category\": <category name>, \"messages\": [...], \"tools\": <tools>}.\n\
- messages[0] is {\"role\": \"system\", \"content\": <the system prompt below, verbatim>}.\n\
- Then user and assistant messages in the OpenAI chat format. Assistant replies are one or two spoken sentences: no markdown, no lists, no emojis, never any visible thinking.\n\
- When a tool is needed the assistant message is {\"role\": \"assistant\", \"content\": \"\", \"tool_calls\": [{\"type\": \"function\", \"function\": {\"name\": <tool>, \"arguments\": <a JSON object encoded as a string, e.g. \"{\\\"query\\\": \\\"...\\\"}\">}}]}, followed by {\"role\": \"tool\", \"content\": <a plausible result>} and a final assistant answer.\n\
- \"tools\" is the tools list below for categories that use tools and [] otherwise.\n\n",
    );
    p.push_str(&format!(
        "System prompt:\n{}\n\nTools:\n{}\n\nWrite exactly:\n",
        cfg.system_prompt,
        Value::Array(tools)
    ));
    for c in &cfg.categories {
        let n = cfg.per_batch(c, b - 1);
        if n == 0 {
            continue;
        }
        let tool = c.tool.as_deref().map(|t| format!(" Every conversation calls `{t}`.")).unwrap_or_default();
        p.push_str(&format!(
            "- {n} conversations of category \"{}\" ({} user turn(s)): {}{tool}\n",
            c.name, c.turns, c.describe
        ));
    }
    p.push_str("\nVary names, topics and phrasing; do not repeat conversations.\n");
    p
}

fn ask(teacher: &Teacher, prompt: &str, timeout: Duration) -> std::result::Result<String, String> {
    match teacher {
        Teacher::Claude { bin, model } => {
            let mut child = Command::new(bin)
                .args(["-p", "--model", model, "--output-format", "text", "--max-turns", "1"])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .map_err(|e| format!("cannot run `{bin}`: {e} (is the Claude Code CLI installed and on PATH?)"))?;
            child.stdin.take().expect("piped").write_all(prompt.as_bytes()).map_err(|e| e.to_string())?;
            let out = wait_with_timeout(child, timeout)?;
            if !out.status.success() {
                let err = String::from_utf8_lossy(&out.stderr);
                let hint = if err.contains("model") {
                    format!(" (if `--model {model}` is refused, check `{bin} --help`)")
                } else {
                    String::new()
                };
                return Err(format!("`{bin}` exited with {}: {}{hint}", out.status, err.trim()));
            }
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        }
        Teacher::OpenAi { base_url, model, api_key } => {
            let base = base_url.trim_end_matches('/');
            let url = format!("{}/v1/chat/completions", base.strip_suffix("/v1").unwrap_or(base));
            let agent = ureq::AgentBuilder::new().timeout(timeout).build();
            let mut req = agent.post(&url);
            if let Some(k) = api_key {
                req = req.set("Authorization", &format!("Bearer {k}"));
            }
            let body = json!({"model": model, "messages": [{"role": "user", "content": prompt}], "temperature": 0.8});
            let v: Value = req.send_json(body).map_err(|e| e.to_string())?.into_json().map_err(|e| e.to_string())?;
            v.pointer("/choices/0/message/content")
                .and_then(Value::as_str)
                .map(str::to_string)
                .ok_or_else(|| format!("no message in the response: {v}"))
        }
    }
}

fn wait_with_timeout(
    mut child: std::process::Child,
    timeout: Duration,
) -> std::result::Result<std::process::Output, String> {
    let start = std::time::Instant::now();
    loop {
        match child.try_wait() {
            Ok(Some(_)) => return child.wait_with_output().map_err(|e| e.to_string()),
            Ok(None) if start.elapsed() > timeout => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("the teacher did not answer within {}s", timeout.as_secs()));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => return Err(e.to_string()),
        }
    }
}

/// Valid records of a teacher answer for batch `b`, or why it is not good enough (fewer than 80 %
/// of the requested conversations valid).
fn accept(cfg: &CalibConfig, b: usize, answer: &str) -> std::result::Result<Vec<Value>, String> {
    let wanted: usize = cfg.categories.iter().map(|c| cfg.per_batch(c, b - 1)).sum();
    let mut c = clean(&[(format!("batch {b}"), answer.to_string())]);
    let known = |v: &Value| v["category"].as_str().and_then(|n| cfg.category(n)).is_some();
    c.kept.retain(|v| known(v) && behaviour_problem(v).is_none());
    if c.kept.len() * 5 < wanted * 4 {
        let (_, bad) = parse_objects(answer);
        return Err(format!(
            "only {} of {wanted} requested conversations were valid ({} unparseable lines)",
            c.kept.len(),
            bad.len()
        ));
    }
    Ok(c.kept)
}

fn good_batch(cfg: &CalibConfig, path: &Path, b: usize) -> Option<usize> {
    let text = std::fs::read_to_string(path).ok()?;
    accept(cfg, b, &text).ok().map(|v| v.len())
}

pub fn generate(
    cfg: &CalibConfig,
    teacher: &Teacher,
    opts: &GenOptions,
    progress: &(dyn Fn(usize, usize) + Sync),
) -> Result<GenReport> {
    if let Some(only) = &opts.only {
        if let Some(b) = only.iter().find(|&&b| b == 0 || b > cfg.batches) {
            return Err(CalibError::Invalid(format!("--only-batches: batch {b} does not exist (1..={})", cfg.batches)));
        }
    }
    let todo: Vec<usize> = (1..=cfg.batches).collect();
    let outcomes = Mutex::new(Vec::new());
    let next = AtomicUsize::new(0);
    let done = AtomicUsize::new(0);
    std::thread::scope(|s| {
        for _ in 0..opts.jobs.max(1) {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                let Some(&b) = todo.get(i) else { break };
                let path = batch_path(&opts.out, b);
                let forced = opts.only.as_ref().is_some_and(|o| o.contains(&b));
                let outcome = if opts.only.is_some() && !forced {
                    let n = good_batch(cfg, &path, b);
                    BatchOutcome {
                        batch: b,
                        status: if n.is_some() { "skipped" } else { "failed" },
                        records: n.unwrap_or(0),
                        attempts: 0,
                        error: n.is_none().then(|| "not selected by --only-batches and not present".into()),
                    }
                } else if let (false, Some(n)) = (forced, good_batch(cfg, &path, b)) {
                    BatchOutcome { batch: b, status: "skipped", records: n, attempts: 0, error: None }
                } else {
                    run_batch(cfg, teacher, opts, b, &path)
                };
                outcomes.lock().unwrap_or_else(|e| e.into_inner()).push(outcome);
                progress(done.fetch_add(1, Ordering::SeqCst) + 1, todo.len());
            });
        }
    });
    let mut batches = outcomes.into_inner().unwrap_or_else(|e| e.into_inner());
    batches.sort_by_key(|o| o.batch);
    // Merge every good batch into the output.
    let inputs: Vec<(String, String)> = (1..=cfg.batches)
        .filter_map(|b| {
            std::fs::read_to_string(batch_path(&opts.out, b)).ok().map(|t| (format!("batch_{b:02}.jsonl"), t))
        })
        .collect();
    let merged = clean(&inputs);
    write_jsonl(&opts.out, &merged.kept)?;
    Ok(GenReport { batches, merged_records: merged.kept.len(), output: opts.out.clone() })
}

fn run_batch(cfg: &CalibConfig, teacher: &Teacher, opts: &GenOptions, b: usize, path: &Path) -> BatchOutcome {
    let prompt = batch_prompt(cfg, b);
    let mut last = String::new();
    for attempt in 1..=opts.attempts.max(1) {
        match ask(teacher, &prompt, opts.timeout).and_then(|a| accept(cfg, b, &a)) {
            Ok(records) => {
                return match write_jsonl(path, &records) {
                    Ok(()) => BatchOutcome {
                        batch: b,
                        status: "generated",
                        records: records.len(),
                        attempts: attempt,
                        error: None,
                    },
                    Err(e) => BatchOutcome {
                        batch: b,
                        status: "failed",
                        records: 0,
                        attempts: attempt,
                        error: Some(e.to_string()),
                    },
                };
            }
            Err(e) => {
                tracing::warn!(batch = b, attempt, error = %e, "batch failed");
                last = e;
                if attempt < opts.attempts {
                    std::thread::sleep(opts.retry_delay * 2u32.pow(attempt as u32 - 1));
                }
            }
        }
    }
    BatchOutcome { batch: b, status: "failed", records: 0, attempts: opts.attempts.max(1), error: Some(last) }
}
