//! Tokenizer (and, later, chat template, detokenizer and parsers) for fp4.

mod tokenizer;

pub use tokenizer::{Tokenizer, TokenizerError};
