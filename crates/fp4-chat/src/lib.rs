//! Tokenizer, chat template and (streaming) output parsers of fp4.

mod detok;
#[cfg(test)]
mod fuzz;
mod message;
mod output;
mod pyjson;
mod pyliteral;
mod reasoning;
mod template;
mod tokenizer;
mod tool_parser;

pub use detok::Detokenizer;
pub use message::{
    AssistantMessage, DeltaFunctionCall, DeltaMerger, DeltaMessage, DeltaToolCall, FunctionCall, ToolCall,
};
pub use output::{new_tool_call_id, parse, OutputConfig, StreamParser};
pub use template::{ChatTemplate, RenderRequest, TemplateError, QWEN35_TEMPLATE};
pub use tokenizer::{Literals, Tokenizer, TokenizerError};
