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
}

impl Loaded {
    /// Warns about each skipped line (the first 20) and the total; returns the samples.
    pub fn report(self, what: &str) -> Vec<Vec<u32>> {
        for e in self.skipped.iter().take(20) {
            tracing::warn!("skipped {what} line: {e}");
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

/// Reads up to `max_samples` samples of at most `seq_len` tokens from `path`. Conversations need
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
    for (i, line) in text.lines().enumerate() {
        let lineno = i + 1;
        if line.trim().is_empty() {
            continue;
        }
        if samples.len() == max_samples {
            break;
        }
        let parsed = (|| -> Result<Vec<u32>> {
            let v: Value = serde_json::from_str(line).map_err(|e| bad(lineno, format!("invalid JSON: {e}")))?;
            let mut ids: Vec<u32> = if let Some(ids) = v.get("input_ids") {
                let arr =
                    ids.as_array().ok_or_else(|| bad(lineno, "`input_ids` must be a list of token ids".into()))?;
                arr.iter()
                    .map(|x| x.as_u64().and_then(|x| u32::try_from(x).ok()))
                    .collect::<Option<Vec<u32>>>()
                    .ok_or_else(|| bad(lineno, "`input_ids` must hold non-negative integers".into()))?
            } else if let Some(Value::Array(messages)) = v.get("messages") {
                if chat.is_none() {
                    let tok =
                        Tokenizer::from_dir(model_dir).map_err(|e| bad(lineno, e.to_string()))?.ok_or_else(|| {
                            bad(lineno, format!("conversations need {} in {}", Tokenizer::FILE, model_dir.display()))
                        })?;
                    let tmpl = ChatTemplate::from_dir(model_dir, true).map_err(|e| bad(lineno, e.to_string()))?;
                    chat = Some((tok, tmpl));
                }
                let (tok, tmpl) = chat.as_ref().expect("set above");
                let tools = v.get("tools").and_then(Value::as_array).filter(|t| !t.is_empty());
                let prompt = tmpl
                    .render(&RenderRequest {
                        messages,
                        tools: tools.map(|t| t.as_slice()),
                        add_generation_prompt: false,
                        kwargs: Default::default(),
                    })
                    .map_err(|e| bad(lineno, e.to_string()))?;
                tok.encode(&prompt).map_err(|e| bad(lineno, e.to_string()))?
            } else {
                return Err(bad(lineno, "expected `input_ids` (pre-tokenized) or `messages` (a conversation)".into()));
            };
            if let Some(&id) = ids.iter().find(|&&id| id as usize >= vocab) {
                return Err(bad(lineno, format!("token id {id} is outside the vocabulary (size {vocab})")));
            }
            ids.truncate(seq_len);
            if ids.is_empty() {
                return Err(bad(lineno, "empty sample".into()));
            }
            Ok(ids)
        })();
        match parsed {
            Ok(ids) => samples.push(ids),
            // A missing tokenizer or template fails every conversation: stop at the first.
            Err(e) if chat.is_none() && line.contains("\"messages\"") && e.to_string().contains(Tokenizer::FILE) => {
                return Err(e)
            }
            Err(e) => skipped.push(e),
        }
    }
    if samples.is_empty() {
        return Err(match skipped.into_iter().next() {
            Some(first) => bad(0, format!("no usable calibration samples (first problem: {first})")),
            None => bad(0, "no calibration samples".into()),
        });
    }
    Ok(Loaded { samples, skipped })
}
