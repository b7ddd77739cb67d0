//! Splits model output into an OpenAI assistant message: reasoning (`qwen3` parser), content and
//! tool calls (`qwen3_coder` parser), whole or streamed.
//!
//! Streaming re-reads the accumulated text at every delta and emits only what is already
//! certain (see `reasoning::split_partial` and `tool_parser::partial`); `finish` emits whatever
//! the final non-streaming parse adds. So the concatenated deltas equal the non-streaming
//! message, for any split of the output into deltas.

use crate::message::{AssistantMessage, DeltaFunctionCall, DeltaMessage, DeltaToolCall, FunctionCall, ToolCall};
use crate::{reasoning, tool_parser};
use serde_json::Value;

/// Which parsers run, as a vLLM server is configured per request.
#[derive(Debug, Clone, Default)]
pub struct OutputConfig {
    /// `--reasoning-parser qwen3`.
    pub reasoning_parser: bool,
    /// `chat_template_kwargs.enable_thinking` (on unless the request turns it off). With thinking
    /// off the prompt already closed the think block, so all output is content.
    pub thinking: bool,
    /// `--tool-call-parser qwen3_coder` with the request's tools (`None`: no tool parsing).
    pub tools: Option<Vec<Value>>,
    /// Keep only calls to functions named in `tools` (`tool_choice: required` or a named
    /// choice, where a call to anything else would break the request's contract). Off, calls
    /// to unlisted names are returned as vLLM's parser returns them.
    pub only_listed_tools: bool,
}

/// Whether `name` is one of `tools`' function names.
fn is_listed(tools: &[Value], name: &str) -> bool {
    tools.iter().any(|t| t.get("function").unwrap_or(t).get("name").and_then(Value::as_str) == Some(name))
}

/// `call_` + 24 hex digits, as vLLM names streamed calls.
pub fn new_tool_call_id() -> String {
    format!("call_{:024x}", rand::random::<u128>() & ((1u128 << 96) - 1))
}

fn non_empty(s: Option<String>) -> Option<String> {
    s.filter(|x| !x.is_empty())
}

/// Parses a complete output.
pub fn parse(text: &str, cfg: &OutputConfig) -> AssistantMessage {
    let (reasoning, content) =
        if cfg.reasoning_parser && cfg.thinking { reasoning::split(text) } else { (None, Some(text.to_string())) };
    let mut msg = AssistantMessage { content, reasoning_content: non_empty(reasoning), tool_calls: Vec::new() };
    if let (Some(tools), Some(content)) = (&cfg.tools, &msg.content) {
        let mut ex = tool_parser::extract(content, tools);
        if cfg.only_listed_tools {
            ex.calls.retain(|c| is_listed(tools, &c.name));
        }
        if !ex.calls.is_empty() {
            msg.content = ex.content;
            msg.tool_calls = ex
                .calls
                .into_iter()
                .map(|c| ToolCall {
                    id: new_tool_call_id(),
                    kind: "function",
                    function: FunctionCall { name: c.name, arguments: c.arguments },
                })
                .collect();
        }
    }
    msg.content = non_empty(msg.content);
    msg
}

/// Incremental parser for one streamed response.
pub struct StreamParser {
    cfg: OutputConfig,
    text: String,
    sent_reasoning: String,
    sent_content: String,
    /// Per call index: (name, arguments sent so far).
    sent_calls: Vec<(String, String)>,
}

/// `new` minus the `sent` prefix; empty if `new` does not extend `sent` (never expected: the
/// partial views only grow).
fn suffix<'a>(new: &'a str, sent: &str) -> &'a str {
    new.strip_prefix(sent).unwrap_or("")
}

impl StreamParser {
    pub fn new(cfg: OutputConfig) -> StreamParser {
        StreamParser {
            cfg,
            text: String::new(),
            sent_reasoning: String::new(),
            sent_content: String::new(),
            sent_calls: Vec::new(),
        }
    }

    /// The text received so far.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// Feeds one piece of output; returns the delta to send, if any.
    pub fn push(&mut self, delta: &str) -> Option<DeltaMessage> {
        self.text.push_str(delta);
        let text = std::mem::take(&mut self.text);
        let (reasoning, content) = if self.cfg.reasoning_parser && self.cfg.thinking {
            reasoning::split_partial(&text)
        } else {
            ("", Some(text.as_str()))
        };
        let mut calls = Vec::new();
        let content = content.map(|c| match &self.cfg.tools {
            Some(tools) => {
                let p = tool_parser::partial(c, tools);
                calls = p
                    .calls
                    .into_iter()
                    .filter(|c| !self.cfg.only_listed_tools || is_listed(tools, &c.name))
                    .map(|c| (c.name, c.arguments))
                    .collect();
                &c[..p.content_end]
            }
            None => c,
        });
        let out = self.emit(reasoning, content.unwrap_or(""), &calls);
        self.text = text;
        out
    }

    /// Ends the stream: emits whatever the complete parse adds to what was sent.
    pub fn finish(&mut self) -> Option<DeltaMessage> {
        let msg = parse(&self.text, &self.cfg);
        let calls: Vec<(String, String)> =
            msg.tool_calls.into_iter().map(|c| (c.function.name, c.function.arguments)).collect();
        self.emit(msg.reasoning_content.as_deref().unwrap_or(""), msg.content.as_deref().unwrap_or(""), &calls)
    }

    fn emit(&mut self, reasoning: &str, content: &str, calls: &[(String, String)]) -> Option<DeltaMessage> {
        let mut d = DeltaMessage::default();
        let r = suffix(reasoning, &self.sent_reasoning);
        if !r.is_empty() {
            d.reasoning_content = Some(r.to_string());
            self.sent_reasoning.push_str(r);
        }
        let c = suffix(content, &self.sent_content);
        if !c.is_empty() {
            d.content = Some(c.to_string());
            self.sent_content.push_str(c);
        }
        for (index, (name, args)) in calls.iter().enumerate() {
            if index == self.sent_calls.len() {
                // Header: id, type and name once, with the arguments known so far.
                d.tool_calls.push(DeltaToolCall {
                    index,
                    id: Some(new_tool_call_id()),
                    kind: Some("function"),
                    function: DeltaFunctionCall { name: Some(name.clone()), arguments: Some(args.clone()) },
                });
                self.sent_calls.push((name.clone(), args.clone()));
            } else if let Some((sent_name, sent_args)) = self.sent_calls.get_mut(index) {
                let more = suffix(args, sent_args);
                if name == sent_name && !more.is_empty() {
                    d.tool_calls.push(DeltaToolCall {
                        index,
                        function: DeltaFunctionCall { name: None, arguments: Some(more.to_string()) },
                        ..Default::default()
                    });
                    sent_args.push_str(more);
                }
            }
        }
        (!d.is_empty()).then_some(d)
    }
}
