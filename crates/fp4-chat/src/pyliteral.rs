//! A small `ast.literal_eval` for the values models write into tool-call parameters:
//! numbers, strings, `True`/`False`/`None`, lists, tuples, sets and dicts, as JSON values.

use serde_json::{Map, Number, Value};

/// Parses a Python literal; `None` when `ast.literal_eval` would raise.
pub fn literal_eval(text: &str) -> Option<Value> {
    let mut p = Parser { s: text.as_bytes(), src: text, i: 0 };
    p.ws();
    let v = p.value(0)?;
    p.ws();
    (p.i == p.s.len()).then_some(v)
}

/// Python's `int(text)`: optional sign, digits with single underscores between them,
/// surrounding whitespace allowed.
pub fn py_int(text: &str) -> Option<i64> {
    let t = text.trim();
    let (neg, digits) = match t.as_bytes().first()? {
        b'-' => (true, &t[1..]),
        b'+' => (false, &t[1..]),
        _ => (false, t),
    };
    if digits.is_empty() || digits.starts_with('_') || digits.ends_with('_') || digits.contains("__") {
        return None;
    }
    let clean: String = digits.chars().filter(|c| *c != '_').collect();
    if !clean.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let v: i64 = clean.parse().ok()?;
    Some(if neg { -v } else { v })
}

/// Python's `float(text)` for finite values (`inf`/`nan` give `None`: they have no JSON form).
pub fn py_float(text: &str) -> Option<f64> {
    let t = text.trim();
    if t.is_empty() || t.contains("__") || t.starts_with('_') || t.ends_with('_') {
        return None;
    }
    let clean: String = t.chars().filter(|c| *c != '_').collect();
    let ok = clean.bytes().all(|b| b.is_ascii_digit() || matches!(b, b'.' | b'e' | b'E' | b'+' | b'-'));
    if !ok {
        return None;
    }
    clean.parse::<f64>().ok().filter(|f| f.is_finite())
}

struct Parser<'a> {
    s: &'a [u8],
    src: &'a str,
    i: usize,
}

const MAX_DEPTH: usize = 64;

impl Parser<'_> {
    fn ws(&mut self) {
        while self.i < self.s.len() && matches!(self.s[self.i], b' ' | b'\t' | b'\n' | b'\r') {
            self.i += 1;
        }
    }

    fn eat(&mut self, c: u8) -> bool {
        self.ws();
        if self.s.get(self.i) == Some(&c) {
            self.i += 1;
            true
        } else {
            false
        }
    }

    fn value(&mut self, depth: usize) -> Option<Value> {
        if depth > MAX_DEPTH {
            return None;
        }
        self.ws();
        match *self.s.get(self.i)? {
            b'[' => self.seq(b']', depth).map(Value::Array),
            b'(' => self.seq(b')', depth).map(Value::Array),
            b'{' => self.dict_or_set(depth),
            b'\'' | b'"' => self.string().map(Value::String),
            b'-' | b'+' | b'0'..=b'9' | b'.' => self.number(),
            _ => {
                let rest = &self.src[self.i..];
                for (word, v) in [("True", Value::Bool(true)), ("False", Value::Bool(false)), ("None", Value::Null)] {
                    if rest.starts_with(word)
                        && !rest[word.len()..].starts_with(|c: char| c.is_alphanumeric() || c == '_')
                    {
                        self.i += word.len();
                        return Some(v);
                    }
                }
                None
            }
        }
    }

    fn seq(&mut self, close: u8, depth: usize) -> Option<Vec<Value>> {
        self.i += 1;
        let mut items = Vec::new();
        loop {
            if self.eat(close) {
                return Some(items);
            }
            items.push(self.value(depth + 1)?);
            if !self.eat(b',') {
                return self.eat(close).then_some(items);
            }
        }
    }

    fn dict_or_set(&mut self, depth: usize) -> Option<Value> {
        self.i += 1;
        if self.eat(b'}') {
            return Some(Value::Object(Map::new()));
        }
        let first = self.value(depth + 1)?;
        if self.eat(b':') {
            let mut map = Map::new();
            let mut key = first;
            loop {
                let k = match key {
                    Value::String(s) => s,
                    Value::Number(n) => n.to_string(),
                    Value::Bool(b) => if b { "true" } else { "false" }.to_string(),
                    Value::Null => "null".to_string(),
                    _ => return None,
                };
                map.insert(k, self.value(depth + 1)?);
                if self.eat(b'}') {
                    return Some(Value::Object(map));
                }
                if !self.eat(b',') {
                    return None;
                }
                if self.eat(b'}') {
                    return Some(Value::Object(map));
                }
                key = self.value(depth + 1)?;
                if !self.eat(b':') {
                    return None;
                }
            }
        } else {
            // A set literal becomes a list.
            let mut items = vec![first];
            while self.eat(b',') {
                if self.eat(b'}') {
                    return Some(Value::Array(items));
                }
                items.push(self.value(depth + 1)?);
            }
            self.eat(b'}').then_some(Value::Array(items))
        }
    }

    fn string(&mut self) -> Option<String> {
        let q = self.s[self.i];
        self.i += 1;
        let mut out = String::new();
        loop {
            let c = self.src[self.i..].chars().next()?;
            self.i += c.len_utf8();
            match c {
                c if c as u32 == q as u32 => return Some(out),
                '\n' => return None,
                '\\' => {
                    let e = self.src[self.i..].chars().next()?;
                    self.i += e.len_utf8();
                    match e {
                        'n' => out.push('\n'),
                        't' => out.push('\t'),
                        'r' => out.push('\r'),
                        '0' => out.push('\0'),
                        '\\' | '\'' | '"' => out.push(e),
                        '\n' => {}
                        'x' | 'u' | 'U' => {
                            let n = match e {
                                'x' => 2,
                                'u' => 4,
                                _ => 8,
                            };
                            let hex = self.src.get(self.i..self.i + n)?;
                            out.push(char::from_u32(u32::from_str_radix(hex, 16).ok()?)?);
                            self.i += n;
                        }
                        other => {
                            out.push('\\');
                            out.push(other);
                        }
                    }
                }
                c => out.push(c),
            }
        }
    }

    fn number(&mut self) -> Option<Value> {
        let start = self.i;
        while self.i < self.s.len() && matches!(self.s[self.i], b'0'..=b'9' | b'.' | b'e' | b'E' | b'+' | b'-' | b'_') {
            // A sign only starts the number or follows an exponent.
            if matches!(self.s[self.i], b'+' | b'-') && self.i > start && !matches!(self.s[self.i - 1], b'e' | b'E') {
                break;
            }
            self.i += 1;
        }
        let text = &self.src[start..self.i];
        if let Some(v) = py_int(text) {
            return Some(Value::Number(v.into()));
        }
        py_float(text).and_then(Number::from_f64).map(Value::Number)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn literals_like_python() {
        assert_eq!(
            literal_eval("{'k': 'v', 'n': [1, 2.5, True, None]}"),
            Some(json!({"k": "v", "n": [1, 2.5, true, null]}))
        );
        assert_eq!(literal_eval("(1, 2)"), Some(json!([1, 2])));
        assert_eq!(literal_eval(" -3 "), Some(json!(-3)));
        assert_eq!(literal_eval("'it\\'s'"), Some(json!("it's")));
        assert_eq!(literal_eval("{1, 2}"), Some(json!([1, 2])));
        assert_eq!(literal_eval("{}"), Some(json!({})));
        assert_eq!(literal_eval("{'a': {'b': 1}}"), Some(json!({"a": {"b": 1}})));
        for bad in ["hello", "[1, 2", "True False", "os.system('x')", ""] {
            assert_eq!(literal_eval(bad), None, "{bad}");
        }
    }

    #[test]
    fn int_and_float_like_python() {
        assert_eq!(py_int(" 42 "), Some(42));
        assert_eq!(py_int("1_000"), Some(1000));
        assert_eq!(py_int("3.5"), None);
        assert_eq!(py_float("1e3"), Some(1000.0));
        assert_eq!(py_float("abc"), None);
    }
}
