//! Parsing teacher output leniently and checking records against the schema.

use serde_json::Value;

/// Blanks out markdown code fences (```json … ```) a teacher may wrap its output in (lines keep
/// their numbers for error messages).
pub fn strip_fences(text: &str) -> String {
    text.lines().map(|l| if l.trim_start().starts_with("```") { "" } else { l }).collect::<Vec<_>>().join("\n")
}

/// Objects in teacher output: a JSON array, or one object per line (fences and blank lines
/// ignored). Unparseable lines come back as errors with their line number.
pub fn parse_objects(text: &str) -> (Vec<Value>, Vec<(usize, String)>) {
    let clean = strip_fences(text);
    if let Ok(Value::Array(items)) = serde_json::from_str::<Value>(clean.trim()) {
        return (items, vec![]);
    }
    let (mut ok, mut bad) = (Vec::new(), Vec::new());
    for (i, line) in clean.lines().enumerate() {
        let l = line.trim().trim_end_matches(',');
        if l.is_empty() || l == "[" || l == "]" {
            continue;
        }
        match serde_json::from_str::<Value>(l) {
            Ok(v @ Value::Object(_)) => ok.push(v),
            Ok(_) => bad.push((i + 1, "not a JSON object".into())),
            Err(e) => bad.push((i + 1, format!("invalid JSON: {e}"))),
        }
    }
    (ok, bad)
}

/// Why a record does not follow the schema (`None`: it does).
pub fn schema_error(r: &Value) -> Option<String> {
    let Some(cat) = r.get("category").and_then(Value::as_str) else { return Some("missing `category`".into()) };
    if cat.is_empty() {
        return Some("empty `category`".into());
    }
    let Some(msgs) = r.get("messages").and_then(Value::as_array) else { return Some("missing `messages` list".into()) };
    if let Some(t) = r.get("tools") {
        if !t.is_array() {
            return Some("`tools` must be a list".into());
        }
    }
    let (mut users, mut assistants) = (0, 0);
    let mut pending_calls = 0usize;
    for (i, m) in msgs.iter().enumerate() {
        let role = m.get("role").and_then(Value::as_str).unwrap_or("");
        let content = m.get("content");
        // Content is a string (or null); an assistant message that only calls tools may omit it.
        let content_ok =
            content.is_some_and(|c| c.is_string() || c.is_null()) || (content.is_none() && role == "assistant");
        if !content_ok {
            return Some(format!("messages[{i}].content must be a string"));
        }
        match role {
            "system" if i == 0 => {}
            "system" => return Some(format!("messages[{i}]: system message not first")),
            "user" => users += 1,
            "assistant" => {
                assistants += 1;
                let calls = m.get("tool_calls").and_then(Value::as_array).map(Vec::as_slice).unwrap_or(&[]);
                for (j, c) in calls.iter().enumerate() {
                    let name = c.pointer("/function/name").and_then(Value::as_str).unwrap_or("");
                    let args = c.pointer("/function/arguments").and_then(Value::as_str);
                    if name.is_empty()
                        || args.and_then(|a| serde_json::from_str::<Value>(a).ok()).is_none_or(|a| !a.is_object())
                    {
                        return Some(format!("messages[{i}].tool_calls[{j}] needs a function name and `arguments` as a JSON object string"));
                    }
                }
                let text = content.and_then(Value::as_str).unwrap_or("");
                if calls.is_empty() && text.trim().is_empty() {
                    return Some(format!("messages[{i}]: empty assistant reply"));
                }
                pending_calls = calls.len();
            }
            "tool" => {
                if pending_calls == 0 {
                    return Some(format!("messages[{i}]: tool message without a preceding tool call"));
                }
                pending_calls -= 1;
            }
            other => return Some(format!("messages[{i}]: unknown role `{other}`")),
        }
    }
    if users == 0 || assistants == 0 {
        return Some("needs at least one user and one assistant message".into());
    }
    if msgs.last().and_then(|m| m.get("role")).and_then(Value::as_str) != Some("assistant") {
        return Some("must end with an assistant reply".into());
    }
    None
}

/// Names of the functions called in a record.
pub fn called_tools(r: &Value) -> Vec<String> {
    r["messages"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|m| m["tool_calls"].as_array().into_iter().flatten())
        .filter_map(|c| c.pointer("/function/name").and_then(Value::as_str).map(str::to_string))
        .collect()
}

/// Assistant texts of a record.
pub fn assistant_texts(r: &Value) -> Vec<String> {
    r["messages"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|m| m["role"] == "assistant")
        .filter_map(|m| m["content"].as_str().map(str::to_string))
        .collect()
}

/// A key identifying duplicates: the messages without whitespace differences.
pub fn dedup_key(r: &Value) -> String {
    let msgs = r["messages"].to_string();
    msgs.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn lenient_parsing() {
        let (ok, bad) = parse_objects("```json\n{\"a\": 1}\n{\"a\": 2},\nnot json\n```");
        assert_eq!(ok.len(), 2);
        assert_eq!(bad.len(), 1);
        assert_eq!(bad[0].0, 4);
        let (ok, bad) = parse_objects("[{\"a\": 1}, {\"a\": 2}]");
        assert_eq!((ok.len(), bad.len()), (2, 0));
    }

    #[test]
    fn schema() {
        let good = json!({"category": "memory", "messages": [
            {"role": "system", "content": "s"}, {"role": "user", "content": "q"},
            {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {"name": "search_memory", "arguments": "{\"query\": \"x\"}"}}]},
            {"role": "tool", "content": "r"}, {"role": "assistant", "content": "a"}]});
        assert_eq!(schema_error(&good), None);
        assert_eq!(called_tools(&good), vec!["search_memory"]);
        let mut bad = good.clone();
        bad["messages"][2]["tool_calls"][0]["function"]["arguments"] = json!("{oops");
        assert!(schema_error(&bad).unwrap().contains("arguments"));
        let orphan = json!({"category": "x", "messages": [{"role": "user", "content": "q"}, {"role": "tool", "content": "r"}, {"role": "assistant", "content": "a"}]});
        assert!(schema_error(&orphan).unwrap().contains("tool message"));
        let empty = json!({"category": "x", "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": " "}]});
        assert!(schema_error(&empty).unwrap().contains("empty"));
    }
}
