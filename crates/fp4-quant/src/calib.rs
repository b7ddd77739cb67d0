//! Calibration samples: JSONL, one sample per line, either pre-tokenized (`{"input_ids": [...]}`)
//! or a conversation (`{"messages": [...], "tools": [...]}`, rendered with the model's chat
//! template exactly as it will be served, then tokenized).

use crate::{QuantError, Result};
use fp4_chat::{ChatTemplate, RenderRequest, Tokenizer};
use serde_json::Value;
use std::path::Path;

/// Calibration samples, and the lines that were skipped (each error names its file and line).
#[derive(Debug)]
pub struct Loaded {
    pub samples: Vec<Vec<u32>>,
    pub skipped: Vec<QuantError>,
    /// Samples cut to the sequence length (longest original length).
    pub truncated: usize,
    pub longest: usize,
    pub seq_len: usize,
}

impl Loaded {
    /// Warns about each skipped line (the first 20) and the total; returns the samples.
    pub fn report(self, what: &str) -> Vec<Vec<u32>> {
        for e in self.skipped.iter().take(20) {
            tracing::warn!("skipped {what} line: {e}");
        }
        if self.truncated > 0 {
            eprintln!(
                "{what}: {} of {} samples cut to {} tokens (the longest had {})",
                self.truncated,
                self.samples.len(),
                self.seq_len,
                self.longest
            );
        }
        if !self.skipped.is_empty() {
            eprintln!(
                "{what}: {} samples, {} bad lines skipped (first: {})",
                self.samples.len(),
                self.skipped.len(),
                self.skipped[0]
            );
        }
        self.samples
    }
}

/// Reads up to `max_samples` samples of at most `seq_len` tokens from `path` (longer ones are cut
/// and counted). Conversations need
/// the model directory's tokenizer and chat template. A bad line is skipped and reported; no
/// usable line at all is an error.
pub fn load(path: &Path, model_dir: &Path, max_samples: usize, seq_len: usize, vocab: usize) -> Result<Loaded> {
    let text = std::fs::read_to_string(path).map_err(|e| QuantError::CalibData {
        path: path.to_path_buf(),
        line: 0,
        msg: e.to_string(),
    })?;
    let bad = |line: usize, msg: String| QuantError::CalibData { path: path.to_path_buf(), line, msg };
    let mut chat: Option<(Tokenizer, ChatTemplate)> = None;
    let mut samples = Vec::new();
    let mut skipped = Vec::new();
    let (mut truncated, mut longest) = (0, 0);
    for (i, line) in text.lines().enumerate() {
        let lineno = i + 1;
        if line.trim().is_empty() {
            continue;
        }
        if samples.len() == max_samples {
            break;
        }
        let v: Value = match serde_json::from_str(line) {
            Ok(v) => v,
            Err(e) => {
                skipped.push(bad(lineno, format!("invalid JSON: {e}")));
                continue;
            }
        };
        if chat.is_none() && v.get("input_ids").is_none() && matches!(v.get("messages"), Some(Value::Array(_))) {
            // Every conversation needs the tokenizer and template: a missing one stops the run.
            chat = Some(load_chat(model_dir).map_err(|msg| bad(lineno, msg))?);
        }
        match sample_ids(&v, chat.as_ref(), vocab) {
            Ok(mut ids) => {
                if ids.len() > seq_len {
                    truncated += 1;
                    longest = longest.max(ids.len());
                    ids.truncate(seq_len);
                }
                samples.push(ids)
            }
            Err(msg) => skipped.push(bad(lineno, msg)),
        }
    }
    if samples.is_empty() {
        return Err(match skipped.into_iter().next() {
            Some(first) => bad(0, format!("no usable calibration samples (first problem: {first})")),
            None => bad(0, "no calibration samples".into()),
        });
    }
    Ok(Loaded { samples, skipped, truncated, longest, seq_len })
}

fn load_chat(model_dir: &Path) -> std::result::Result<(Tokenizer, ChatTemplate), String> {
    let tok = Tokenizer::from_dir(model_dir)
        .map_err(|e| e.to_string())?
        .ok_or_else(|| format!("conversations need {} in {}", Tokenizer::FILE, model_dir.display()))?;
    let tmpl = ChatTemplate::from_dir(model_dir, true).map_err(|e| e.to_string())?;
    Ok((tok, tmpl))
}

/// The token ids of one parsed line; `chat` is loaded whenever the line is a conversation.
fn sample_ids(
    v: &Value,
    chat: Option<&(Tokenizer, ChatTemplate)>,
    vocab: usize,
) -> std::result::Result<Vec<u32>, String> {
    let ids: Vec<u32> = if let Some(ids) = v.get("input_ids") {
        let arr = ids.as_array().ok_or("`input_ids` must be a list of token ids")?;
        arr.iter()
            .map(|x| x.as_u64().and_then(|x| u32::try_from(x).ok()))
            .collect::<Option<Vec<u32>>>()
            .ok_or("`input_ids` must hold non-negative integers")?
    } else if let (Some(Value::Array(messages)), Some((tok, tmpl))) = (v.get("messages"), chat) {
        let tools = v.get("tools").and_then(Value::as_array).filter(|t| !t.is_empty());
        let prompt = tmpl
            .render(&RenderRequest {
                messages,
                tools: tools.map(|t| t.as_slice()),
                add_generation_prompt: false,
                kwargs: Default::default(),
            })
            .map_err(|e| e.to_string())?;
        tok.encode(&prompt).map_err(|e| e.to_string())?
    } else {
        return Err("expected `input_ids` (pre-tokenized) or `messages` (a conversation)".into());
    };
    if let Some(&id) = ids.iter().find(|&&id| id as usize >= vocab) {
        return Err(format!("token id {id} is outside the vocabulary (size {vocab})"));
    }
    if ids.is_empty() {
        return Err("empty sample".into());
    }
    Ok(ids)
}
