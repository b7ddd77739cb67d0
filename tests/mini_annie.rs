//! mini-Annie (issue 10) through the whole loop: served by `fp4 serve` (BF16, and after
//! `fp4 quantize` with W4A4 emulation), measured by `fp4 bench` with its own suite.

mod common;

use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Runs the mini-Annie suite against `server`; gate name → (value, pass).
fn bench(server: &common::Server, out: &Path) -> BTreeMap<String, (f64, bool)> {
    let json = out.join("bench.json");
    let o = Command::new(env!("CARGO_BIN_EXE_fp4"))
        .args(["bench", "--backend-a", "fp4", &format!("http://127.0.0.1:{}", server.port)])
        .args(["--suite", root().join("configs/bench/mini-annie.toml").to_str().unwrap()])
        .args(["--runs", "1", "--warmup", "0", "--output", json.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(o.status.success(), "fp4 bench failed: {}", String::from_utf8_lossy(&o.stderr));
    let v: Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    v["backends"][0]["gates"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| {
            (g["name"].as_str().unwrap().to_string(), (g["value"].as_f64().unwrap(), g["pass"].as_bool().unwrap()))
        })
        .collect()
}

/// Every behaviour gate of the suite must pass (thinking leak, tool calls, no markdown, facts,
/// held-out arithmetic, verbosity).
fn assert_behaves(what: &str, gates: &BTreeMap<String, (f64, bool)>) {
    eprintln!("{what}: {gates:?}");
    for g in ["thinking_leak", "tool_calling", "no_markdown", "factual", "reasoning", "verbosity_tokens"] {
        assert!(gates[g].1, "{what}: gate {g} failed: {:?}", gates[g]);
    }
}

#[test]
fn mini_annie_passes_the_behaviour_gates_in_bf16_and_after_quantization() {
    let tmp = tempfile::tempdir().unwrap();
    let bf16 = common::start_model(tempfile::tempdir().unwrap(), &root().join("models/mini-annie"), &[]);
    assert_behaves("bf16", &bench(&bf16, tmp.path()));
    drop(bf16);

    // Strategy B (AWQ-lite on the MLPs) with Annie's calibration conversations, served as the
    // user's Blackwell GPU computes it (activations quantized with the calibrated input_scale).
    let q = tmp.path().join("B");
    let o = Command::new(env!("CARGO_BIN_EXE_fp4"))
        .args(["quantize", "--model", root().join("models/mini-annie").to_str().unwrap()])
        .args(["--config", root().join("configs/strategies/B.toml").to_str().unwrap()])
        .args(["--calib-data", root().join("configs/calib/mini-annie.jsonl").to_str().unwrap()])
        .args(["--calib-samples", "8", "--output", q.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(o.status.success(), "fp4 quantize failed: {}", String::from_utf8_lossy(&o.stderr));
    let served = common::start_model(tempfile::tempdir().unwrap(), &q, &["--w4a4"]);
    assert_behaves("strategy B, W4A4", &bench(&served, tmp.path()));
}
