//! Chat-template rendering and tokenization against transformers' `apply_chat_template`
//! (tests/reference/make_chat_golden.py).

use fp4_chat::{ChatTemplate, RenderRequest, TemplateError, Tokenizer};
use serde_json::Value;
use std::path::PathBuf;

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/chat")
}

#[test]
fn renderings_are_byte_identical_to_transformers() {
    let dir = fixture();
    let golden: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("golden.json")).unwrap()).unwrap();
    let tok = Tokenizer::from_dir(&dir).unwrap().expect("fixture has tokenizer.json");
    let cases = golden["cases"].as_array().unwrap();
    assert!(cases.len() >= 15);
    let mut rendered = 0;
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let tools = case["tools"].as_array().cloned();
        let t = ChatTemplate::from_dir(&dir, tools.is_some()).unwrap();
        let req = RenderRequest {
            messages: case["messages"].as_array().unwrap(),
            tools: tools.as_deref(),
            add_generation_prompt: case["add_generation_prompt"].as_bool().unwrap(),
            kwargs: case["kwargs"].as_object().unwrap().clone(),
        };
        let got = t.render(&req);
        match case.get("error") {
            Some(want) => {
                let err = got.expect_err(name);
                // transformers refuses an empty conversation itself, before the template runs.
                if !req.messages.is_empty() {
                    assert!(matches!(&err, TemplateError::Rejected(m) if m == want.as_str().unwrap()), "{name}: {err}");
                }
            }
            None => {
                let text = got.unwrap_or_else(|e| panic!("{name}: {e}"));
                assert_eq!(text, case["text"].as_str().unwrap(), "{name}: rendered text");
                let ids: Vec<u32> =
                    case["ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
                assert_eq!(tok.encode(&text).unwrap(), ids, "{name}: token ids");
                rendered += 1;
            }
        }
    }
    assert!(rendered >= 15, "only {rendered} renderings compared");
}

/// Streaming detokenization of a rendered conversation (multi-byte characters split across
/// byte-level tokens, special tokens kept or skipped) equals decoding it whole.
#[test]
fn incremental_detokenizer_matches_whole_decode() {
    let tok = Tokenizer::from_dir(&fixture()).unwrap().unwrap();
    let text = "<|im_start|>user\nÇa va? 🙂 東京 привет<|im_end|>\n<think>\nok</think>naïve café 🙂🙂";
    let ids = tok.encode(text).unwrap();
    for skip in [false, true] {
        let mut d = fp4_chat::Detokenizer::new(&tok, skip);
        let mut out = String::new();
        let mut held = 0;
        for &id in &ids {
            match d.push(id).unwrap() {
                Some(s) => {
                    assert!(!s.contains('\u{FFFD}'), "{s:?}");
                    out.push_str(&s);
                }
                None => held += 1,
            }
        }
        out.extend(d.finish().unwrap());
        assert_eq!(out, tok.decode(&ids, skip).unwrap(), "skip_special_tokens={skip}");
        assert!(held > 0, "some tokens must end inside a character");
    }
    let mut d = fp4_chat::Detokenizer::new(&tok, true);
    let shown: String = ids.iter().filter_map(|&id| d.push(id).unwrap()).collect();
    assert!(!shown.contains("<|im_start|>") && shown.contains("<think>"), "{shown}");
}
