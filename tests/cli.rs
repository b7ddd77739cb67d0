//! End-to-end tests of the `fp4` binary's stable interfaces (inspect, generate, logits) and of
//! its errors on bad input.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

fn fp4(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_fp4")).args(args).env("RUST_LOG", "warn").output().unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Runs fp4 expecting failure; returns stderr, which must be an error, never a panic.
fn fp4_err(args: &[&str]) -> String {
    let o = fp4(args);
    let err = stderr(&o);
    assert!(!o.status.success(), "expected failure for {args:?}");
    assert!(!err.contains("panicked"), "panic instead of an error: {err}");
    err
}

fn golden_json(name: &str) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(fixture(name).join("golden.json")).unwrap()).unwrap()
}

fn golden_tensor(name: &str, tensor: &str) -> Vec<u8> {
    let bytes = std::fs::read(fixture(name).join("golden.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensor(tensor).unwrap().data().to_vec()
}

fn golden_ids(name: &str, n: usize) -> String {
    golden_tensor(name, &format!("ids_{n}"))
        .chunks_exact(8)
        .map(|c| i64::from_le_bytes(c.try_into().unwrap()).to_string())
        .collect::<Vec<_>>()
        .join(",")
}

#[test]
fn inspect_summarises_both_layouts() {
    let o = fp4(&["inspect", fixture("tiny-vl").to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(out.contains("LALLLA") && out.contains("model.language_model.") && out.contains("F32"), "{out}");
    let o = fp4(&["inspect", "--json", fixture("tiny-text").to_str().unwrap()]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["weight_prefix"], "model.");
    assert_eq!(v["tie_word_embeddings"], true);
    assert_eq!(v["full_attention_layers"], 1);
}

#[test]
fn logits_writes_f32_logits_of_every_position() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("l.safetensors");
    let ids = golden_ids("tiny-text", 40);
    let o = fp4(&[
        "logits",
        "--model",
        fixture("tiny-text").to_str().unwrap(),
        "--input-ids",
        &ids,
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let bytes = std::fs::read(&out).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let t = st.tensor("logits").unwrap();
    assert_eq!(t.dtype(), safetensors::Dtype::F32);
    assert_eq!(t.shape(), &[40, 384]);
    let f = |b: &[u8]| -> Vec<f32> { b.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect() };
    let (got, want) = (f(t.data()), f(&golden_tensor("tiny-text", "logits_40")));
    let max = want.iter().fold(0f32, |m, x| m.max(x.abs()));
    let err = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max) / max;
    assert!(err < 1e-4, "relative error {err:.2e}");
    assert!(!dir.path().join("l.safetensors.tmp").exists());
}

#[test]
fn generate_json_matches_transformers_generate() {
    let g = golden_json("tiny-vl");
    let ids = golden_ids("tiny-vl", 40);
    let o = fp4(&[
        "generate",
        "--model",
        fixture("tiny-vl").to_str().unwrap(),
        "--input-ids",
        &ids,
        "--max-tokens",
        "24",
        "--json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    let v: serde_json::Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    assert_eq!(v["output_ids"], g["generate_tokens"]);
    assert_eq!(v["text"], g["generate_text"]);
    assert_eq!(v["input_ids"].as_array().unwrap().len(), 40);
}

#[test]
fn generate_from_prompt_text_samples_reproducibly() {
    let model = fixture("tiny-text");
    let run = |seed: &str| {
        let o = fp4(&[
            "generate",
            "--model",
            model.to_str().unwrap(),
            "--prompt",
            "The capital of Japan is",
            "--max-tokens",
            "8",
            "--temperature",
            "0.8",
            "--top-p",
            "0.9",
            "--top-k",
            "50",
            "--seed",
            seed,
            "--ignore-eos",
            "--json",
        ]);
        assert!(o.status.success(), "{}", stderr(&o));
        serde_json::from_str::<serde_json::Value>(stdout(&o).lines().last().unwrap()).unwrap()
    };
    let (a, b) = (run("3"), run("3"));
    assert_eq!(a, b, "same seed, same output");
    assert_eq!(a["output_ids"].as_array().unwrap().len(), 8, "--ignore-eos runs to max tokens");
    assert!(a["text"].is_string());
    assert!(!a["input_ids"].as_array().unwrap().is_empty());
}

/// Copies a fixture into a temp dir, rewriting its weights with `edit` (tensor name → keep/replace).
fn edited_copy(name: &str, edit: impl Fn(&str, &[usize], &[u8]) -> Option<(Vec<usize>, Vec<u8>)>) -> tempfile::TempDir {
    rewritten_copy(name, edit, Vec::new())
}

/// [`edited_copy`] plus `extra` f32 tensors (name, shape, values).
fn rewritten_copy(
    name: &str,
    edit: impl Fn(&str, &[usize], &[u8]) -> Option<(Vec<usize>, Vec<u8>)>,
    extra: Vec<(String, Vec<usize>, Vec<f32>)>,
) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(fixture(name)).unwrap() {
        let p = entry.unwrap().path();
        std::fs::copy(&p, dir.path().join(p.file_name().unwrap())).unwrap();
    }
    let path = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut kept = Vec::new();
    for (n, t) in st.tensors() {
        if let Some((shape, data)) = edit(&n, t.shape(), t.data()) {
            kept.push((n, t.dtype(), shape, data));
        }
    }
    for (n, shape, values) in extra {
        kept.push((n, safetensors::Dtype::F32, shape, values.iter().flat_map(|v| v.to_le_bytes()).collect()));
    }
    let views: Vec<(String, safetensors::tensor::TensorView)> = kept
        .iter()
        .map(|(n, d, s, b)| (n.clone(), safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    safetensors::serialize_to_file(views, None, &path).unwrap();
    dir
}

#[test]
fn missing_and_misshaped_tensors_are_named() {
    const T: &str = "model.layers.1.linear_attn.in_proj_z.weight";
    let dir = edited_copy("tiny-text", |n, s, b| (n != T).then(|| (s.to_vec(), b.to_vec())));
    let err = fp4_err(&["generate", "--model", dir.path().to_str().unwrap(), "--input-ids", "1,2"]);
    assert!(err.contains(T) && err.contains("model.safetensors") && err.contains("missing"), "{err}");

    let dir = edited_copy("tiny-text", |n, s, b| {
        Some(if n == T { (vec![s[0] / 2, s[1]], b[..b.len() / 2].to_vec()) } else { (s.to_vec(), b.to_vec()) })
    });
    let err = fp4_err(&["logits", "--model", dir.path().to_str().unwrap(), "--input-ids", "1", "--out", "/dev/null"]);
    assert!(err.contains(T) && err.contains("shape"), "{err}");
}

#[test]
fn bad_inputs_give_clear_errors() {
    let model = fixture("tiny-text");
    let m = model.to_str().unwrap();
    let err = fp4_err(&["generate", "--model", m, "--input-ids", "1,99999"]);
    assert!(err.contains("99999") && err.contains("vocabulary"), "{err}");
    let err = fp4_err(&["generate", "--model", m, "--input-ids", "1,two"]);
    assert!(err.contains("`two`"), "{err}");
    let err = fp4_err(&["generate", "--model", "/nonexistent/model", "--input-ids", "1"]);
    assert!(err.contains("/nonexistent/model"), "{err}");
    let err = fp4_err(&["generate", "--model", m, "--input-ids", "1", "--temperature", "-1"]);
    assert!(err.contains("temperature"), "{err}");
    // The CPU build says how to get the GPU path instead of failing somewhere inside.
    if !cfg!(feature = "cuda") {
        let err = fp4_err(&["generate", "--model", m, "--input-ids", "1", "--device", "cuda"]);
        assert!(err.contains("--device cuda") && err.contains("--features cuda"), "{err}");
    }
    let err = fp4_err(&["generate", "--model", m, "--input-ids", "1", "--w4a4", "--w4a16"]);
    assert!(err.contains("--w4a4") && err.contains("--w4a16"), "{err}");

    // A model dir without tokenizer.json cannot take --prompt.
    let dir = edited_copy("tiny-text", |_, s, b| Some((s.to_vec(), b.to_vec())));
    std::fs::remove_file(dir.path().join("tokenizer.json")).unwrap();
    let err = fp4_err(&["generate", "--model", dir.path().to_str().unwrap(), "--prompt", "hi"]);
    assert!(err.contains("tokenizer.json") && err.contains("--input-ids"), "{err}");
    // Without a tokenizer, --json has no text field.
    let o = fp4(&[
        "generate",
        "--model",
        dir.path().to_str().unwrap(),
        "--input-ids",
        "1,2",
        "--max-tokens",
        "2",
        "--json",
    ]);
    let v: serde_json::Value = serde_json::from_str(stdout(&o).lines().last().unwrap()).unwrap();
    assert!(v.get("text").is_none() && v["output_ids"].is_array());

    // Unsupported config names the file and field.
    let cfg = dir.path().join("config.json");
    let text = std::fs::read_to_string(&cfg).unwrap().replace("\"qwen3_5_text\"", "\"qwen3_next\"");
    std::fs::write(&cfg, text).unwrap();
    let err = fp4_err(&["inspect", dir.path().to_str().unwrap()]);
    assert!(err.contains("config.json") && err.contains("model_type") && err.contains("qwen3_next"), "{err}");
}

fn fp4_stdin(args: &[&str], input: &str) -> Output {
    use std::io::Write;
    let mut child = Command::new(env!("CARGO_BIN_EXE_fp4"))
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    child.wait_with_output().unwrap()
}

#[test]
fn chat_render_prints_the_golden_prompt_and_ids() {
    let golden = serde_json::from_str::<serde_json::Value>(
        &std::fs::read_to_string(fixture("chat").join("golden.json")).unwrap(),
    )
    .unwrap();
    let case = golden["cases"].as_array().unwrap().iter().find(|c| c["name"] == "tool_round_trip").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let request = serde_json::json!({"messages": case["messages"], "tools": case["tools"]});
    std::fs::write(dir.path().join("req.json"), request.to_string()).unwrap();
    let o = fp4(&[
        "chat",
        "render",
        "--model",
        fixture("chat").to_str().unwrap(),
        "--messages",
        dir.path().join("req.json").to_str().unwrap(),
        "--json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["prompt"], case["text"]);
    assert_eq!(v["ids"], case["ids"]);
}

#[test]
fn chat_parse_whole_and_streamed_agree() {
    let dir = tempfile::tempdir().unwrap();
    let tools = dir.path().join("tools.json");
    std::fs::write(&tools, r#"{"tools": [{"type": "function", "function": {"name": "search_memory", "parameters": {"type": "object", "properties": {"query": {"type": "string"}, "limit": {"type": "integer"}}}}}]}"#).unwrap();
    let output = "I should check memory.\n</think>\n\n<tool_call>\n<function=search_memory>\n<parameter=query>\nbirthday\n</parameter>\n<parameter=limit>\n3\n</parameter>\n</function>\n</tool_call>";
    let chunks = dir.path().join("chunks.json");
    std::fs::write(&chunks, serde_json::json!([&output[..30], &output[30..77], &output[77..]]).to_string()).unwrap();
    let t = tools.to_str().unwrap();
    let model = fixture("chat");
    let runs = [
        vec!["chat", "parse", "--tools", t],
        vec!["chat", "parse", "--tools", t, "--stream"],
        vec!["chat", "parse", "--tools", t, "--stream", "--chunks", chunks.to_str().unwrap()],
        vec!["chat", "parse", "--tools", t, "--stream", "--model", model.to_str().unwrap()],
    ];
    for args in runs {
        let o = fp4_stdin(&args, output);
        assert!(o.status.success(), "{args:?}: {}", stderr(&o));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(v["reasoning_content"], "I should check memory.\n", "{args:?}");
        assert_eq!(v["content"], "\n\n", "{args:?}");
        assert_eq!(v["tool_calls"][0]["function"]["name"], "search_memory");
        assert_eq!(v["tool_calls"][0]["function"]["arguments"], r#"{"query": "birthday", "limit": 3}"#, "{args:?}");
    }
    let o = fp4_stdin(&["chat", "parse", "--no-thinking"], output);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["content"], output);
    assert!(v["reasoning_content"].is_null() && v["tool_calls"].as_array().unwrap().is_empty());
    let bad = dir.path().join("bad.json");
    std::fs::write(&bad, r#"["not", "the", "same"]"#).unwrap();
    let o = fp4_stdin(&["chat", "parse", "--stream", "--chunks", bad.to_str().unwrap()], output);
    assert!(!o.status.success() && stderr(&o).contains("bad.json"), "{}", stderr(&o));
}

/// A safetensors header whose sizes do not add up names the tensor at fault (the crate's own
/// error does not), and NaN/Inf weights load with a warning naming the tensor.
#[test]
fn broken_headers_and_nonfinite_weights_are_named() {
    let dir = edited_copy("tiny-text", |_, s, b| Some((s.to_vec(), b.to_vec())));
    let header = br#"{"model.norm.weight":{"dtype":"F32","shape":[2,2],"data_offsets":[0,12]}}"#;
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header);
    bytes.extend_from_slice(&[0u8; 12]);
    std::fs::write(dir.path().join("model.safetensors"), bytes).unwrap();
    let err = fp4_err(&["inspect", dir.path().to_str().unwrap()]);
    assert!(err.contains("model.safetensors") && err.contains("`model.norm.weight`"), "{err}");
    assert!(err.contains("needs 16 bytes") && err.contains("hold 12"), "{err}");

    const T: &str = "model.norm.weight";
    let dir = edited_copy("tiny-text", |n, s, b| {
        let mut b = b.to_vec();
        if n == T {
            b[..2].copy_from_slice(&0x7fc0u16.to_le_bytes()); // a bf16 NaN
        }
        Some((s.to_vec(), b))
    });
    let o = fp4(&["generate", "--model", dir.path().to_str().unwrap(), "--input-ids", "1,2", "--max-tokens", "1"]);
    let err = stderr(&o);
    assert!(err.contains(T) && err.contains("1 of") && err.contains("NaN or infinite"), "{err}");
}

/// Every safetensors header the crate refuses without naming a tensor — sizes that do not add
/// up, sizes that overflow, a sub-byte dtype cut mid-byte — and a truncated or padded file:
/// the error names the file and the tensor (or where the data ends), not just "invalid shape,
/// data type, or offset for tensor".
#[test]
fn every_broken_header_names_its_tensor_and_file() {
    let dir = edited_copy("tiny-text", |_, s, b| Some((s.to_vec(), b.to_vec())));
    let cases: [(&str, usize, &[&str]); 5] = [
        (
            r#"{"model.norm.weight":{"dtype":"BF16","shape":[4,4],"data_offsets":[0,30]}}"#,
            30,
            &["needs 32 bytes", "hold 30"],
        ),
        (
            r#"{"model.norm.weight":{"dtype":"BF16","shape":[4611686018427387904,4611686018427387904],"data_offsets":[0,32]}}"#,
            32,
            &["more than 2^125"],
        ),
        (
            r#"{"model.norm.weight":{"dtype":"F4","shape":[3],"data_offsets":[0,2]}}"#,
            2,
            &["12 bits, not a whole number of bytes"],
        ),
        (
            r#"{"model.norm.weight":{"dtype":"BF16","shape":[4,4],"data_offsets":[0,32]}}"#,
            20,
            &["end at data byte 32", "holds 20", "truncated"],
        ),
        (
            r#"{"model.norm.weight":{"dtype":"BF16","shape":[4,4],"data_offsets":[0,32]}}"#,
            40,
            &["holds 40", "longer than its header"],
        ),
    ];
    for (header, data, want) in cases {
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header.as_bytes());
        bytes.extend(std::iter::repeat_n(0u8, data));
        std::fs::write(dir.path().join("model.safetensors"), bytes).unwrap();
        let err = fp4_err(&["inspect", dir.path().to_str().unwrap()]);
        assert!(err.contains("model.safetensors") && err.contains("model.norm.weight"), "{header}: {err}");
        for w in want {
            assert!(err.contains(w), "{header}: `{w}` in {err}");
        }
    }
}

/// tiny-text with a random MTP head (`mtp.*`, f32), shaped from its config.
fn tiny_text_with_mtp() -> tempfile::TempDir {
    let c: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("tiny-text").join("config.json")).unwrap()).unwrap();
    let n = |k: &str| c[k].as_u64().unwrap() as usize;
    let (h, i, hq, hkv, d) =
        (n("hidden_size"), n("intermediate_size"), n("num_attention_heads"), n("num_key_value_heads"), n("head_dim"));
    let shapes: Vec<(&str, Vec<usize>)> = vec![
        ("fc.weight", vec![h, 2 * h]),
        ("pre_fc_norm_embedding.weight", vec![h]),
        ("pre_fc_norm_hidden.weight", vec![h]),
        ("norm.weight", vec![h]),
        ("layers.0.input_layernorm.weight", vec![h]),
        ("layers.0.post_attention_layernorm.weight", vec![h]),
        ("layers.0.self_attn.q_proj.weight", vec![hq * d * 2, h]),
        ("layers.0.self_attn.k_proj.weight", vec![hkv * d, h]),
        ("layers.0.self_attn.v_proj.weight", vec![hkv * d, h]),
        ("layers.0.self_attn.o_proj.weight", vec![h, hq * d]),
        ("layers.0.self_attn.q_norm.weight", vec![d]),
        ("layers.0.self_attn.k_norm.weight", vec![d]),
        ("layers.0.mlp.gate_proj.weight", vec![i, h]),
        ("layers.0.mlp.up_proj.weight", vec![i, h]),
        ("layers.0.mlp.down_proj.weight", vec![h, i]),
    ];
    let mut state = 0x2545f4914f6cdd1du64;
    let extra = shapes
        .into_iter()
        .map(|(name, shape)| {
            let count: usize = shape.iter().product();
            let values = (0..count)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.2
                })
                .collect();
            (format!("mtp.{name}"), shape, values)
        })
        .collect();
    rewritten_copy("tiny-text", |_, s, b| Some((s.to_vec(), b.to_vec())), extra)
}

#[test]
fn generate_with_the_mtp_head_gives_the_same_tokens() {
    let dir = tiny_text_with_mtp();
    let model = dir.path().to_str().unwrap();
    let base =
        ["generate", "--model", model, "--input-ids", "5,9,2,77,31", "--max-tokens", "12", "--ignore-eos", "--json"];
    let run = |extra: &[&str]| -> serde_json::Value {
        let o = fp4(&[&base[..], extra].concat());
        assert!(o.status.success(), "{}", stderr(&o));
        serde_json::from_str(stdout(&o).lines().last().unwrap()).unwrap()
    };
    let plain = run(&[]);
    for k in ["1", "3"] {
        let cfg = format!(r#"{{"method": "mtp", "num_speculative_tokens": {k}}}"#);
        let spec = run(&["--speculative-config", &cfg]);
        assert_eq!(spec["output_ids"], plain["output_ids"], "k = {k}");
        let s = &spec["speculative"];
        assert!(s["verify_steps"].as_u64().unwrap() >= 1, "{s}");
        assert_eq!(s["drafted"].as_u64(), Some(s["verify_steps"].as_u64().unwrap() * k.parse::<u64>().unwrap()));
    }
    // Bad input is named: the flag, the checkpoint without a head, sampling.
    let err = fp4_err(
        &[&base[..], &["--speculative-config", r#"{"method": "eagle", "num_speculative_tokens": 2}"#]].concat(),
    );
    assert!(err.contains("--speculative-config") && err.contains("eagle"), "{err}");
    let mtp = r#"{"method": "mtp", "num_speculative_tokens": 2}"#;
    // Sampled: speculative sampling, the same length and a seeded run repeats.
    let sampled = ["--speculative-config", mtp, "--temperature", "0.9", "--seed", "4"];
    let (a, b) = (run(&sampled), run(&sampled));
    assert_eq!(a["output_ids"], b["output_ids"]);
    assert_eq!(a["output_ids"].as_array().unwrap().len(), 12);
    let fixture_dir = fixture("tiny-text");
    let no_head =
        ["generate", "--model", fixture_dir.to_str().unwrap(), "--input-ids", "5,9", "--speculative-config", mtp];
    let err = fp4_err(&no_head);
    assert!(err.contains("no MTP head") && err.contains("tiny-text"), "{err}");
}

/// `fp4 serve --speculative-config` over HTTP on tiny-text with a random MTP head: the same
/// greedy completions as without, batched requests included, and /metrics counts the drafts.
#[test]
fn serve_with_the_mtp_head_gives_the_same_completions() {
    let serve = |extra: &[&str]| {
        let dir = tiny_text_with_mtp();
        for f in ["tokenizer.json", "chat_template.jinja"] {
            std::fs::copy(fixture("chat").join(f), dir.path().join(f)).unwrap();
        }
        let model = dir.path().to_path_buf();
        common::start_model(dir, &model, extra)
    };
    let prompts: Vec<Vec<u32>> =
        (0..3u32).map(|s| (0..12).map(|i| (i * 37 + s * 11 + 5) % 300 + 5).collect()).collect();
    let body = |p: &[u32], t: f32| serde_json::json!({"model": "tiny", "prompt": p, "max_tokens": 10, "temperature": t, "seed": 3, "ignore_eos": true});
    let run = |s: &common::Server, t: f32| -> Vec<String> {
        // All three in flight together, so that they are decoded (and drafted) as a batch.
        std::thread::scope(|sc| {
            let handles: Vec<_> =
                prompts.iter().map(|p| sc.spawn(move || s.post("/v1/completions", &body(p, t)))).collect();
            handles
                .into_iter()
                .map(|h| {
                    let (status, v) = h.join().unwrap();
                    assert_eq!(status, 200, "{v}");
                    v["choices"][0]["text"].as_str().unwrap().to_string()
                })
                .collect()
        })
    };
    let plain = serve(&[]);
    let want = run(&plain, 0.0);
    drop(plain);
    let spec = serve(&["--speculative-config", r#"{"method": "mtp", "num_speculative_tokens": 3}"#]);
    assert_eq!(run(&spec, 0.0), want, "greedy completions with drafts");
    let sampled = run(&spec, 0.9);
    assert!(sampled.iter().all(|t| !t.is_empty()));
    let (_, metrics) = spec.request("GET", "/metrics", None, &[]).unwrap();
    let count = |name: &str| -> u64 {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
            .unwrap_or_else(|| panic!("{name} in {metrics}"))
    };
    let drafts = count("fp4_spec_decode_num_drafts_total");
    assert!(drafts > 0, "{metrics}");
    assert_eq!(count("fp4_spec_decode_num_draft_tokens_total"), 3 * drafts);
}
