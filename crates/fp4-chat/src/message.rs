//! OpenAI assistant messages and streaming deltas as fp4 produces them. Reasoning is written
//! under both `reasoning_content` (what most clients read) and `reasoning` (current vLLM).

use serde::ser::{SerializeMap, Serializer};
use serde::Serialize;

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FunctionCall {
    pub name: String,
    /// The arguments as a JSON object text.
    pub arguments: String,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ToolCall {
    pub id: String,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub function: FunctionCall,
}

/// A complete assistant message.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct AssistantMessage {
    pub content: Option<String>,
    pub reasoning_content: Option<String>,
    pub tool_calls: Vec<ToolCall>,
}

impl Serialize for AssistantMessage {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(None)?;
        m.serialize_entry("role", "assistant")?;
        m.serialize_entry("content", &self.content)?;
        m.serialize_entry("reasoning_content", &self.reasoning_content)?;
        m.serialize_entry("reasoning", &self.reasoning_content)?;
        m.serialize_entry("tool_calls", &self.tool_calls)?;
        m.end()
    }
}

#[derive(Debug, Clone, PartialEq, Default, Serialize)]
pub struct DeltaFunctionCall {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub arguments: Option<String>,
}

/// One tool-call fragment: the first for an index carries `id`, `type` and the name.
#[derive(Debug, Clone, PartialEq, Default, Serialize)]
pub struct DeltaToolCall {
    pub index: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    pub kind: Option<&'static str>,
    pub function: DeltaFunctionCall,
}

/// One streaming delta (`choices[].delta`).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct DeltaMessage {
    pub content: Option<String>,
    pub reasoning_content: Option<String>,
    pub tool_calls: Vec<DeltaToolCall>,
}

impl DeltaMessage {
    pub fn is_empty(&self) -> bool {
        self.content.is_none() && self.reasoning_content.is_none() && self.tool_calls.is_empty()
    }
}

impl Serialize for DeltaMessage {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(None)?;
        if let Some(c) = &self.content {
            m.serialize_entry("content", c)?;
        }
        if let Some(r) = &self.reasoning_content {
            m.serialize_entry("reasoning_content", r)?;
            m.serialize_entry("reasoning", r)?;
        }
        if !self.tool_calls.is_empty() {
            m.serialize_entry("tool_calls", &self.tool_calls)?;
        }
        m.end()
    }
}

/// Folds streamed deltas back into one message (what a client does).
#[derive(Debug, Default)]
pub struct DeltaMerger {
    content: Option<String>,
    reasoning: Option<String>,
    calls: Vec<ToolCall>,
}

impl DeltaMerger {
    pub fn push(&mut self, d: &DeltaMessage) {
        if let Some(c) = &d.content {
            self.content.get_or_insert_with(String::new).push_str(c);
        }
        if let Some(r) = &d.reasoning_content {
            self.reasoning.get_or_insert_with(String::new).push_str(r);
        }
        for tc in &d.tool_calls {
            if tc.index == self.calls.len() {
                self.calls.push(ToolCall {
                    id: tc.id.clone().unwrap_or_default(),
                    kind: "function",
                    function: FunctionCall { name: String::new(), arguments: String::new() },
                });
            }
            if let Some(call) = self.calls.get_mut(tc.index) {
                if let Some(n) = &tc.function.name {
                    call.function.name.push_str(n);
                }
                if let Some(a) = &tc.function.arguments {
                    call.function.arguments.push_str(a);
                }
            }
        }
    }

    pub fn finish(self) -> AssistantMessage {
        let none_if_empty = |s: Option<String>| s.filter(|x| !x.is_empty());
        AssistantMessage {
            content: none_if_empty(self.content),
            reasoning_content: self.reasoning,
            tool_calls: self.calls,
        }
    }
}
