//! Tokenizer, chat template and (streaming) output parsers of fp4.

mod pyjson;
mod template;
mod tokenizer;

pub use template::{ChatTemplate, RenderRequest, TemplateError, QWEN35_TEMPLATE};
pub use tokenizer::{Tokenizer, TokenizerError};
