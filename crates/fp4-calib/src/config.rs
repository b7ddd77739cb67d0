//! Generation config (TOML): batches, Annie's system prompt, tools, categories.

use crate::{CalibError, Result};
use serde::Deserialize;
use std::path::Path;

#[derive(Debug, Clone, Deserialize)]
pub struct Category {
    pub name: String,
    pub count: usize,
    pub describe: String,
    /// The tool every conversation of this category must call.
    #[serde(default)]
    pub tool: Option<String>,
    /// User turns per conversation.
    #[serde(default = "one")]
    pub turns: usize,
}

fn one() -> usize {
    1
}

#[derive(Debug, Clone, Deserialize)]
pub struct CalibConfig {
    pub batches: usize,
    pub system_prompt: String,
    pub tools: String,
    #[serde(rename = "category")]
    pub categories: Vec<Category>,
}

pub const ANNIE: &str = include_str!("../../../configs/calib/annie.toml");

impl CalibConfig {
    pub fn load(path: Option<&Path>) -> Result<CalibConfig> {
        let (text, shown) = match path {
            Some(p) => (
                std::fs::read_to_string(p)
                    .map_err(|e| CalibError::File { path: p.to_path_buf(), msg: e.to_string() })?,
                p.to_path_buf(),
            ),
            None => (ANNIE.to_string(), "configs/calib/annie.toml (built in)".into()),
        };
        let c: CalibConfig =
            toml::from_str(&text).map_err(|e| CalibError::File { path: shown.clone(), msg: e.to_string() })?;
        let bad = |msg: String| CalibError::File { path: shown.clone(), msg };
        if c.batches == 0 || c.categories.is_empty() {
            return Err(bad("needs batches >= 1 and at least one [[category]]".into()));
        }
        let tools = c.tool_values().map_err(&bad)?;
        for cat in &c.categories {
            if let Some(t) = &cat.tool {
                if !tools.iter().any(|x| x["function"]["name"].as_str() == Some(t.as_str())) {
                    return Err(bad(format!(
                        "category `{}` expects tool `{t}`, which `tools` does not define",
                        cat.name
                    )));
                }
            }
        }
        Ok(c)
    }

    pub fn tool_values(&self) -> std::result::Result<Vec<serde_json::Value>, String> {
        serde_json::from_str(&self.tools).map_err(|e| format!("`tools` is not a JSON list: {e}"))
    }

    /// Conversations of `category` in batch `b` (counts spread evenly, remainders to early batches).
    pub fn per_batch(&self, category: &Category, b: usize) -> usize {
        category.count / self.batches + usize::from(b < category.count % self.batches)
    }

    pub fn category(&self, name: &str) -> Option<&Category> {
        self.categories.iter().find(|c| c.name == name)
    }
}
