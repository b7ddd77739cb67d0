//! `tokenizer.json` through the `tokenizers` crate (no network features).

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("{path}: cannot load tokenizer: {msg}")]
    Load { path: PathBuf, msg: String },
    #[error("tokenizer failed: {0}")]
    Encode(String),
}

pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
}

impl Tokenizer {
    pub const FILE: &'static str = "tokenizer.json";

    /// Loads `<dir>/tokenizer.json`; `Ok(None)` when the directory has none.
    pub fn from_dir(dir: &Path) -> Result<Option<Tokenizer>, TokenizerError> {
        let path = dir.join(Self::FILE);
        if !path.exists() {
            return Ok(None);
        }
        let inner = tokenizers::Tokenizer::from_file(&path)
            .map_err(|e| TokenizerError::Load { path: path.clone(), msg: e.to_string() })?;
        Ok(Some(Tokenizer { inner }))
    }

    /// Encodes text as-is (Qwen adds no BOS; special-token strings in the text are recognised).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        let enc = self.inner.encode(text, false).map_err(|e| TokenizerError::Encode(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String, TokenizerError> {
        self.inner.decode(ids, skip_special_tokens).map_err(|e| TokenizerError::Encode(e.to_string()))
    }
}
