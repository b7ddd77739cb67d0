//! Chat templates rendered with transformers' Jinja semantics: `trim_blocks`, `lstrip_blocks`,
//! loop controls, Python string/dict methods, `tojson` as `json.dumps(ensure_ascii=False)`,
//! `|string` as Python `str()`, and `raise_exception`.

use crate::pyjson;
use minijinja::value::{Kwargs, Value as JValue};
use minijinja::{Environment, ErrorKind};
use serde_json::{Map, Value};
use std::path::{Path, PathBuf};

/// The Qwen3.5 (9B-style, thinking on by default) template shipped with fp4, for model
/// directories that carry none.
pub const QWEN35_TEMPLATE: &str = include_str!("../templates/qwen3_5.jinja");

#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    #[error("{path}: {msg}")]
    Load { path: PathBuf, msg: String },
    #[error("{dir}: no chat template (looked for chat_template.jinja and tokenizer_config.json `chat_template`); pass one explicitly")]
    Missing { dir: PathBuf },
    #[error("chat template syntax error: {0}")]
    Syntax(String),
    /// The template itself rejected the conversation (`raise_exception`).
    #[error("the chat template rejected the conversation: {0}")]
    Rejected(String),
    #[error("chat template failed: {0}")]
    Render(String),
    #[error("messages[{index}]: {msg}")]
    Message { index: usize, msg: String },
}

/// Inputs of one rendering.
#[derive(Debug, Clone, Default)]
pub struct RenderRequest<'a> {
    /// OpenAI-style messages (as JSON objects).
    pub messages: &'a [Value],
    /// OpenAI tool definitions (`{"type": "function", "function": {...}}`), if any.
    pub tools: Option<&'a [Value]>,
    pub add_generation_prompt: bool,
    /// Extra template variables (`chat_template_kwargs`, e.g. `enable_thinking`).
    pub kwargs: Map<String, Value>,
}

pub struct ChatTemplate {
    env: Environment<'static>,
    /// Special-token strings exposed to the template (`bos_token`, `eos_token`, …).
    special: Map<String, Value>,
}

const TEMPLATE_NAME: &str = "chat";

impl ChatTemplate {
    pub fn new(source: &str) -> Result<ChatTemplate, TemplateError> {
        let mut env = Environment::new();
        let syntax = minijinja::syntax::SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .map_err(|e| TemplateError::Syntax(e.to_string()))?;
        env.set_syntax(syntax);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_filter("tojson", tojson);
        env.add_filter("string", py_string);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_template_owned(TEMPLATE_NAME.to_string(), source.to_string())
            .map_err(|e| TemplateError::Syntax(format!("{e:#}")))?;
        Ok(ChatTemplate { env, special: Map::new() })
    }

    /// The template of a model directory: `chat_template.jinja`, else `tokenizer_config.json`'s
    /// `chat_template` (a string, or a list of named templates: `tool_use` when `tools` is
    /// wanted and present, else `default`). Special tokens come from `tokenizer_config.json`.
    pub fn from_dir(dir: &Path, with_tools: bool) -> Result<ChatTemplate, TemplateError> {
        let config_path = dir.join("tokenizer_config.json");
        let config: Option<Value> = match std::fs::read_to_string(&config_path) {
            Ok(text) => Some(
                serde_json::from_str(&text)
                    .map_err(|e| TemplateError::Load { path: config_path.clone(), msg: e.to_string() })?,
            ),
            Err(_) => None,
        };
        let jinja_path = dir.join("chat_template.jinja");
        let source = if jinja_path.exists() {
            std::fs::read_to_string(&jinja_path)
                .map_err(|e| TemplateError::Load { path: jinja_path.clone(), msg: e.to_string() })?
        } else {
            match config.as_ref().and_then(|c| c.get("chat_template")) {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Array(named)) => pick_named(named, with_tools)
                    .ok_or_else(|| TemplateError::Load {
                        path: config_path.clone(),
                        msg: "`chat_template` list has no `default` entry".into(),
                    })?
                    .to_string(),
                Some(_) => {
                    return Err(TemplateError::Load {
                        path: config_path,
                        msg: "`chat_template` must be a string or a list of {name, template}".into(),
                    })
                }
                None => return Err(TemplateError::Missing { dir: dir.to_path_buf() }),
            }
        };
        let mut t = ChatTemplate::new(&source)?;
        if let Some(Value::Object(c)) = &config {
            for key in ["bos_token", "eos_token", "pad_token", "unk_token"] {
                let token = match c.get(key) {
                    Some(Value::String(s)) => Some(s.clone()),
                    // AddedToken form: {"content": "...", ...}
                    Some(Value::Object(o)) => o.get("content").and_then(Value::as_str).map(str::to_string),
                    _ => None,
                };
                if let Some(tok) = token {
                    t.special.insert(key.to_string(), Value::String(tok));
                }
            }
        }
        Ok(t)
    }

    /// Renders a conversation to the prompt text.
    pub fn render(&self, req: &RenderRequest) -> Result<String, TemplateError> {
        let messages = prepare_messages(req.messages)?;
        let mut ctx = self.special.clone();
        ctx.insert("messages".into(), Value::Array(messages));
        ctx.insert("tools".into(), req.tools.map_or(Value::Null, |t| Value::Array(t.to_vec())));
        ctx.insert("add_generation_prompt".into(), Value::Bool(req.add_generation_prompt));
        for (k, v) in &req.kwargs {
            ctx.insert(k.clone(), v.clone());
        }
        if req.tools.is_none() {
            ctx.remove("tools");
        }
        let tmpl = self.env.get_template(TEMPLATE_NAME).map_err(|e| TemplateError::Render(e.to_string()))?;
        tmpl.render(JValue::from(minijinja::value::Serde(&ctx))).map_err(|e| match e.kind() {
            ErrorKind::InvalidOperation if e.detail().is_some_and(|d| d.starts_with(RAISED)) => {
                TemplateError::Rejected(e.detail().unwrap_or_default()[RAISED.len()..].to_string())
            }
            _ => TemplateError::Render(format!("{e:#}")),
        })
    }
}

fn pick_named(named: &[Value], with_tools: bool) -> Option<&str> {
    let find = |name: &str| {
        named
            .iter()
            .find(|t| t.get("name").and_then(Value::as_str) == Some(name))
            .and_then(|t| t.get("template")?.as_str())
    };
    if with_tools {
        if let Some(t) = find("tool_use") {
            return Some(t);
        }
    }
    find("default")
}

/// What vLLM does to messages before rendering: assistant tool-call `arguments` given as JSON
/// strings become objects (templates iterate them), and `reasoning` is accepted as
/// `reasoning_content`.
fn prepare_messages(messages: &[Value]) -> Result<Vec<Value>, TemplateError> {
    let mut out = Vec::with_capacity(messages.len());
    for (index, m) in messages.iter().enumerate() {
        let Value::Object(obj) = m else {
            return Err(TemplateError::Message { index, msg: "a message must be a JSON object".into() });
        };
        let mut obj = obj.clone();
        if !obj.contains_key("reasoning_content") {
            if let Some(r) = obj.remove("reasoning") {
                obj.insert("reasoning_content".into(), r);
            }
        }
        if let Some(Value::Array(calls)) = obj.get_mut("tool_calls") {
            for (ci, call) in calls.iter_mut().enumerate() {
                let args = call.get_mut("function").and_then(|f| f.get_mut("arguments"));
                if let Some(a @ Value::String(_)) = args {
                    let text = a.as_str().unwrap_or_default();
                    *a = serde_json::from_str(text).map_err(|e| TemplateError::Message {
                        index,
                        msg: format!("tool_calls[{ci}].function.arguments is not valid JSON: {e}"),
                    })?;
                }
            }
        }
        out.push(Value::Object(obj));
    }
    Ok(out)
}

const RAISED: &str = "raise_exception: ";

fn raise_exception(msg: String) -> Result<JValue, minijinja::Error> {
    Err(minijinja::Error::new(ErrorKind::InvalidOperation, format!("{RAISED}{msg}")))
}

/// `strftime_now(format)`: the current UTC date and time (templates put today's date in prompts).
fn strftime_now(format: String) -> String {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let (y, m, d) = civil_from_days((secs / 86400) as i64);
    let months = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    let rem = secs % 86400;
    format
        .replace("%Y", &format!("{y:04}"))
        .replace("%m", &format!("{m:02}"))
        .replace("%d", &format!("{d:02}"))
        .replace("%B", months[(m - 1) as usize])
        .replace("%b", &months[(m - 1) as usize][..3])
        .replace("%H", &format!("{:02}", rem / 3600))
        .replace("%M", &format!("{:02}", rem % 3600 / 60))
        .replace("%S", &format!("{:02}", rem % 60))
}

/// Days since 1970-01-01 to (year, month, day) in the proleptic Gregorian calendar.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719468;
    let era = z.div_euclid(146097);
    let doe = z.rem_euclid(146097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

fn to_json(v: &JValue) -> Result<Value, minijinja::Error> {
    serde_json::to_value(v).map_err(|e| minijinja::Error::new(ErrorKind::InvalidOperation, e.to_string()))
}

/// `|tojson(indent=None)` as transformers defines it: `json.dumps(x, ensure_ascii=False)`.
fn tojson(v: JValue, kwargs: Kwargs) -> Result<JValue, minijinja::Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    kwargs.assert_all_used()?;
    Ok(JValue::from_safe_string(pyjson::dumps(&to_json(&v)?, indent)))
}

/// `|string` as Python's `str()` (`True`, `None`, `3.0`).
fn py_string(v: JValue) -> Result<JValue, minijinja::Error> {
    if v.is_undefined() {
        return Ok(JValue::from(""));
    }
    if let Some(s) = v.as_str() {
        return Ok(JValue::from(s));
    }
    Ok(JValue::from(pyjson::py_str(&to_json(&v)?)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn render(msgs: Value, tools: Option<Value>, gen: bool, kwargs: Value) -> Result<String, TemplateError> {
        let t = ChatTemplate::new(QWEN35_TEMPLATE).unwrap();
        let messages = msgs.as_array().unwrap().clone();
        let tools = tools.map(|t| t.as_array().unwrap().clone());
        t.render(&RenderRequest {
            messages: &messages,
            tools: tools.as_deref(),
            add_generation_prompt: gen,
            kwargs: kwargs.as_object().unwrap().clone(),
        })
    }

    #[test]
    fn thinking_default_on_and_off() {
        let m = json!([{"role": "user", "content": " Hi "}]);
        assert_eq!(
            render(m.clone(), None, true, json!({})).unwrap(),
            "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\n"
        );
        assert!(render(m, None, true, json!({"enable_thinking": false})).unwrap().ends_with("<think>\n\n</think>\n\n"));
    }

    #[test]
    fn template_errors_are_reported() {
        let e = render(json!([{"role": "system", "content": "x"}]), None, true, json!({})).unwrap_err();
        assert!(matches!(&e, TemplateError::Rejected(m) if m == "No user query found in messages."), "{e}");
        let e = render(json!([{"role": "assistant", "content": "x", "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": "{bad"}}]}]), None, false, json!({})).unwrap_err();
        assert!(e.to_string().contains("messages[0]") && e.to_string().contains("arguments"), "{e}");
    }

    #[test]
    fn civil_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(20_783), (2026, 11, 26));
    }
}
