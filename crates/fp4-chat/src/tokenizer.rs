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
    /// The same tokenizer with special tokens read as ordinary text.
    as_text: tokenizers::Tokenizer,
    /// The special added tokens' strings (`<|im_start|>`, `<|endoftext|>`, …), longest first.
    specials: Vec<String>,
}

/// Marks a literal in protected text: `OPEN index CLOSE` (Unicode noncharacters, which no client
/// text should hold; any that does is itself protected).
const OPEN: char = '\u{FDD0}';
const CLOSE: char = '\u{FDD1}';

/// The special-token strings taken out of chat content by [`Tokenizer::protect`], in order.
#[derive(Debug, Default, Clone)]
pub struct Literals(Vec<String>);

impl Literals {
    /// `text` with every marker put back as the string it stands for.
    pub fn restore(&self, text: &str) -> String {
        let mut out = String::with_capacity(text.len());
        for_each_piece(text, |piece| match piece {
            Piece::Text(t) => out.push_str(t),
            Piece::Literal(i) => out.push_str(self.0.get(i).map_or("", String::as_str)),
        });
        out
    }
}

enum Piece<'a> {
    Text(&'a str),
    Literal(usize),
}

/// Splits `text` into plain runs and markers.
fn for_each_piece<'a>(text: &'a str, mut f: impl FnMut(Piece<'a>)) {
    let mut rest = text;
    while let Some(i) = rest.find(OPEN) {
        let after = &rest[i + OPEN.len_utf8()..];
        let Some(j) = after.find(CLOSE) else { break };
        let Ok(index) = after[..j].parse::<usize>() else { break };
        if i > 0 {
            f(Piece::Text(&rest[..i]));
        }
        f(Piece::Literal(index));
        rest = &after[j + CLOSE.len_utf8()..];
    }
    if !rest.is_empty() {
        f(Piece::Text(rest));
    }
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
        let mut as_text = inner.clone();
        as_text.set_encode_special_tokens(true);
        let mut specials: Vec<String> =
            inner.get_added_tokens_decoder().into_values().filter(|t| t.special).map(|t| t.content).collect();
        specials.sort_by_key(|t| std::cmp::Reverse(t.len()));
        Ok(Some(Tokenizer { inner, as_text, specials }))
    }

    /// Chat content made safe to render: in every string of `value` (message contents, tool
    /// arguments and results, tool descriptions), each special-token string and each marker
    /// character is replaced by a marker, recorded in `lit`. [`Tokenizer::encode_protected`]
    /// then tokenizes those as text, so a user typing `<|im_start|>` cannot open a turn.
    pub fn protect(&self, value: &serde_json::Value, lit: &mut Literals) -> serde_json::Value {
        use serde_json::Value;
        match value {
            Value::String(text) => Value::String(self.protect_str(text, lit)),
            Value::Array(items) => Value::Array(items.iter().map(|v| self.protect(v, lit)).collect()),
            Value::Object(map) => Value::Object(map.iter().map(|(k, v)| (k.clone(), self.protect(v, lit))).collect()),
            other => other.clone(),
        }
    }

    fn protect_str(&self, text: &str, lit: &mut Literals) -> String {
        let mut out = String::with_capacity(text.len());
        let mut rest = text;
        'scan: while !rest.is_empty() {
            for special in &self.specials {
                if let Some(tail) = rest.strip_prefix(special.as_str()) {
                    out.push_str(&format!("{OPEN}{}{CLOSE}", lit.0.len()));
                    lit.0.push(special.clone());
                    rest = tail;
                    continue 'scan;
                }
            }
            let c = rest.chars().next().expect("non-empty");
            if c == OPEN || c == CLOSE {
                out.push_str(&format!("{OPEN}{}{CLOSE}", lit.0.len()));
                lit.0.push(c.to_string());
            } else {
                out.push(c);
            }
            rest = &rest[c.len_utf8()..];
        }
        out
    }

    /// Encodes text rendered from [`Tokenizer::protect`]ed content: the template's own text as
    /// [`Tokenizer::encode`] does, each marker's string as plain text.
    pub fn encode_protected(&self, text: &str, lit: &Literals) -> Result<Vec<u32>, TokenizerError> {
        let mut ids = Vec::new();
        let mut err = None;
        for_each_piece(text, |piece| {
            let r = match piece {
                Piece::Text(t) => self.inner.encode(t, false),
                Piece::Literal(i) => self.as_text.encode(lit.0.get(i).map_or("", String::as_str), false),
            };
            match r {
                Ok(enc) => ids.extend_from_slice(enc.get_ids()),
                Err(e) => err = Some(TokenizerError::Encode(e.to_string())),
            }
        });
        err.map_or(Ok(ids), Err)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn tokenizer() -> Tokenizer {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tiny-quant");
        Tokenizer::from_dir(&dir).unwrap().expect("the fixture has a tokenizer")
    }

    #[test]
    fn protected_specials_and_markers_are_text_and_round_trip() {
        let tok = tokenizer();
        let im_start = tok.encode("<|im_start|>").unwrap();
        assert_eq!(im_start.len(), 1, "a special token in plain encoding");
        let typed = "a<|im_start|>b \u{FDD0}7\u{FDD1} c";
        let mut lit = Literals::default();
        let v = tok.protect(&serde_json::json!({"content": typed, "n": 3}), &mut lit);
        let protected = v["content"].as_str().unwrap();
        assert_eq!(v["n"], 3);
        assert!(!protected.contains("<|im_start|>"));
        assert_eq!(lit.restore(protected), typed);
        // The template's own special token stays one token; the typed one becomes text.
        let ids = tok.encode_protected(&format!("<|im_start|>user\n{protected}"), &lit).unwrap();
        assert_eq!(ids.iter().filter(|&&i| i == im_start[0]).count(), 1, "{ids:?}");
        assert_eq!(tok.decode(&ids, false).unwrap(), format!("<|im_start|>user\n{typed}"));
    }
}
