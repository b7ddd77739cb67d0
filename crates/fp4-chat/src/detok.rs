//! Incremental detokenization: text deltas from a growing list of token ids that never split a
//! UTF-8 character (byte-level BPE tokens can end mid-character) and never re-emit text.

use crate::{Tokenizer, TokenizerError};

pub struct Detokenizer<'a> {
    tok: &'a Tokenizer,
    ids: Vec<u32>,
    /// Start of the window decoded for context (byte-level merges can change earlier text).
    prefix_offset: usize,
    /// Tokens up to here have been emitted.
    read_offset: usize,
    skip_special_tokens: bool,
}

impl<'a> Detokenizer<'a> {
    pub fn new(tok: &'a Tokenizer, skip_special_tokens: bool) -> Detokenizer<'a> {
        Detokenizer { tok, ids: Vec::new(), prefix_offset: 0, read_offset: 0, skip_special_tokens }
    }

    /// Adds one token; returns new text once it forms complete characters.
    pub fn push(&mut self, id: u32) -> Result<Option<String>, TokenizerError> {
        self.ids.push(id);
        let prefix = self.tok.decode(&self.ids[self.prefix_offset..self.read_offset], self.skip_special_tokens)?;
        let full = self.tok.decode(&self.ids[self.prefix_offset..], self.skip_special_tokens)?;
        // An incomplete character decodes to U+FFFD: wait for the rest of its bytes.
        if full.len() <= prefix.len() || full.ends_with('\u{FFFD}') {
            return Ok(None);
        }
        let Some(new) = full.get(prefix.len()..).filter(|_| full.starts_with(&prefix)) else {
            return Ok(None);
        };
        let new = new.to_string();
        self.prefix_offset = self.read_offset;
        self.read_offset = self.ids.len();
        Ok(Some(new))
    }

    /// Whatever is still held back (an incomplete character at the end of the output).
    pub fn finish(&mut self) -> Result<Option<String>, TokenizerError> {
        if self.read_offset == self.ids.len() {
            return Ok(None);
        }
        let prefix = self.tok.decode(&self.ids[self.prefix_offset..self.read_offset], self.skip_special_tokens)?;
        let full = self.tok.decode(&self.ids[self.prefix_offset..], self.skip_special_tokens)?;
        self.read_offset = self.ids.len();
        Ok(full.get(prefix.len()..).map(str::to_string).filter(|s| !s.is_empty()))
    }
}
