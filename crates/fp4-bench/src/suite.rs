//! Suite files (TOML): system prompt, tools, request parameters, gate thresholds and tests.

use crate::{BenchError, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Category {
    /// Prompts that invite markdown; the reply must have none.
    Markdown,
    /// The reply must contain one of `expect`.
    Factual,
    /// The reply must contain one of `expect`.
    Reasoning,
    /// The reply must be a structured call to `tool` with a non-empty `query`.
    Tool,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct Test {
    pub name: String,
    pub category: Category,
    pub prompt: String,
    #[serde(default)]
    pub expect: Vec<String>,
    #[serde(default)]
    pub tool: Option<String>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct Params {
    #[serde(default = "default_temperature")]
    pub temperature: f64,
    #[serde(default = "default_max_tokens")]
    pub max_tokens: u32,
    #[serde(default)]
    pub enable_thinking: bool,
}

fn default_temperature() -> f64 {
    0.7
}
fn default_max_tokens() -> u32 {
    200
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct Gates {
    pub thinking_leak_max: usize,
    pub tool_calling_min: usize,
    pub no_markdown_min: usize,
    pub factual_min: usize,
    pub reasoning_min: usize,
    pub verbosity_max_tokens: f64,
    pub ttft_ms_max: f64,
    pub decode_tok_s_min: f64,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct Suite {
    pub name: String,
    #[serde(default)]
    pub description: String,
    pub system_prompt: String,
    /// OpenAI tool definitions as a JSON text.
    #[serde(default)]
    pub tools: String,
    pub params: Params,
    pub gates: Gates,
    #[serde(rename = "test")]
    pub tests: Vec<Test>,
}

/// The suite built into fp4 (`configs/bench/annie.toml`).
pub const ANNIE: &str = include_str!("../../../configs/bench/annie.toml");

impl Suite {
    pub fn load(path: Option<&Path>) -> Result<Suite> {
        let (text, shown) = match path {
            Some(p) => (
                std::fs::read_to_string(p)
                    .map_err(|e| BenchError::Suite { path: p.to_path_buf(), msg: e.to_string() })?,
                p.to_path_buf(),
            ),
            None => (ANNIE.to_string(), "configs/bench/annie.toml (built in)".into()),
        };
        let suite: Suite =
            toml::from_str(&text).map_err(|e| BenchError::Suite { path: shown.clone(), msg: e.to_string() })?;
        suite.validate().map_err(|msg| BenchError::Suite { path: shown, msg })?;
        Ok(suite)
    }

    fn validate(&self) -> std::result::Result<(), String> {
        if self.tests.is_empty() {
            return Err("the suite has no [[test]]".into());
        }
        let tools = self.tool_values()?;
        let names: Vec<&str> = tools.iter().filter_map(|t| t["function"]["name"].as_str()).collect();
        for t in &self.tests {
            match t.category {
                Category::Factual | Category::Reasoning if t.expect.is_empty() => {
                    return Err(format!("test `{}` needs `expect` (accepted answers)", t.name))
                }
                Category::Tool => match &t.tool {
                    None => return Err(format!("test `{}` needs `tool`", t.name)),
                    Some(n) if !names.contains(&n.as_str()) => {
                        return Err(format!("test `{}` expects tool `{n}`, which `tools` does not define", t.name))
                    }
                    _ => {}
                },
                _ => {}
            }
        }
        Ok(())
    }

    pub fn tool_values(&self) -> std::result::Result<Vec<serde_json::Value>, String> {
        if self.tools.trim().is_empty() {
            return Ok(vec![]);
        }
        serde_json::from_str(&self.tools).map_err(|e| format!("`tools` is not a JSON list of tools: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn built_in_suite_has_the_seed_shape() {
        let s = Suite::load(None).unwrap();
        let count = |c: Category| s.tests.iter().filter(|t| t.category == c).count();
        assert_eq!(
            (count(Category::Markdown), count(Category::Factual), count(Category::Reasoning), count(Category::Tool)),
            (15, 5, 5, 10)
        );
        assert_eq!(s.tests.iter().filter(|t| t.tool.as_deref() == Some("web_search")).count(), 5);
        assert_eq!(s.tool_values().unwrap().len(), 2);
        assert!(!s.params.enable_thinking);
    }

    #[test]
    fn bad_suites_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s.toml");
        std::fs::write(
            &p,
            ANNIE.replace(
                "tool = \"web_search\"\n[[test]]\nname = \"web_news\"",
                "tool = \"nope\"\n[[test]]\nname = \"web_news\"",
            ),
        )
        .unwrap();
        let e = Suite::load(Some(&p)).unwrap_err().to_string();
        assert!(e.contains("s.toml") && e.contains("nope"), "{e}");
    }
}
