//! `fp4 loop` end to end on mini-Annie on the CPU, reduced to CI's budget (rtn and B, a short
//! suite, one run): quantize, real servers on a real port, smoke test, bench against the BF16
//! peer, KL, the choice; then a resumed run against a dead peer; then `fp4 card` checked against
//! the run's JSON.

mod common;

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn fp4(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_fp4")).args(args).env("RUST_LOG", "warn").output().unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// mini-Annie's suite with two tests per category and gates scaled to match.
fn short_suite(dir: &Path) -> PathBuf {
    let text = std::fs::read_to_string(root().join("configs/bench/mini-annie.toml")).unwrap();
    let mut parts = text.split("[[test]]");
    let mut head = parts.next().unwrap().to_string();
    for (gate, n) in [("tool_calling_min", 2), ("no_markdown_min", 2), ("factual_min", 2), ("reasoning_min", 1)] {
        let start = head.find(&format!("{gate} = ")).unwrap();
        let end = start + head[start..].find('\n').unwrap();
        head.replace_range(start..end, &format!("{gate} = {n}"));
    }
    let mut counts = std::collections::BTreeMap::new();
    for t in parts {
        let cat = t.split("category = \"").nth(1).unwrap().split('"').next().unwrap().to_string();
        let n = counts.entry(cat).or_insert(0);
        if *n < 2 {
            *n += 1;
            head.push_str("[[test]]");
            head.push_str(t);
        }
    }
    let p = dir.join("short.toml");
    std::fs::write(&p, head).unwrap();
    p
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn read_json(p: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))).unwrap()
}

#[test]
fn loop_quantizes_serves_benches_chooses_resumes_and_writes_the_card() {
    let tmp = tempfile::tempdir().unwrap();
    let suite = short_suite(tmp.path());
    let run = tmp.path().join("run");
    let port = free_port().to_string();
    let p = |rel: &str| root().join(rel).display().to_string();
    let (model, calib, generic, eval) = (
        p("models/mini-annie"),
        p("configs/calib/mini-annie.jsonl"),
        p("configs/calib/mini-annie-generic.jsonl"),
        p("tests/fixtures/mini-annie/eval.jsonl"),
    );
    let common = [
        "loop",
        "--model",
        &model,
        "--calib-data",
        &calib,
        "--rtn-calib-data",
        &generic,
        "--eval-data",
        &eval,
        "--eval-samples",
        "2",
        "--calib-samples",
        "4",
        "--suite",
        suite.to_str().unwrap(),
        "--runs",
        "1",
        "--warmup",
        "0",
        "--port",
        &port,
        "--out",
        run.to_str().unwrap(),
        // Speed on a 2-core CI machine under W4A4 emulation is not what this checks.
        "--skip-gates",
        "ttft_ms_p50,decode_tok_s_p50",
    ];
    let mut first: Vec<&str> = common.to_vec();
    first.extend(["--strategies", "rtn,B"]);
    let o = fp4(&first);
    assert!(o.status.success(), "fp4 loop failed: {}", stderr(&o));
    let s = read_json(&run.join("summary.json"));
    assert_eq!(s["schema"], "fp4.loop.v1");
    let rows = s["strategies"].as_array().unwrap();
    assert_eq!(rows.iter().map(|r| r["name"].as_str().unwrap()).collect::<Vec<_>>(), ["rtn", "B"]);
    for r in rows {
        let name = r["name"].as_str().unwrap();
        assert!(r["error"].is_null(), "{name}: {}", r["error"]);
        assert_eq!(r["quantized"]["reused"], false);
        assert!(run.join(name).join("quant_report.json").is_file());
        assert_eq!(r["smoke"]["pass"], true, "{name}: {}", r["smoke"]);
        assert!(r["smoke"]["content"].as_str().unwrap().contains("Tokyo"));
        assert!(r["kl"]["kl_mean"].as_f64().unwrap() > 0.0);
        assert_eq!(r["kl"]["samples"], 2);
        let gates = r["measured"]["gates"].as_array().unwrap();
        assert_eq!(gates.len(), 8);
        for g in gates {
            let speed = ["ttft_ms_p50", "decode_tok_s_p50"].contains(&g["name"].as_str().unwrap());
            assert_eq!(g["required"], !speed, "{g}");
        }
        assert!(r["ttft_speedup_vs_peer"].as_f64().is_some(), "the BF16 peer was up");
        assert!(run.join("bench").join(format!("{name}.json")).is_file());
        assert!(run.join("kl").join(format!("{name}.json")).is_file());
        assert!(run.join("logs").join(format!("{name}.serve.log")).is_file());
    }
    assert_eq!(rows[0]["quantized"]["quant_algo"], "NVFP4");
    assert_eq!(s["calibration"]["samples"], 4);
    assert_eq!(s["calibration"]["rtn"]["samples"], 64, "rtn calibrates on all of its own file");
    let peer = &s["peer"];
    assert_eq!((peer["name"].as_str(), peer["served_by_fp4"].as_bool()), (Some("bf16"), Some(true)));
    assert!(peer["measured"]["down"].is_null());
    let chosen = s["chosen"].as_str().expect("mini-Annie passes the behaviour gates after rtn and B");
    for f in ["summary.md", "plots/ttft.svg", "plots/decode.svg", "bench/peer.json"] {
        assert!(run.join(f).is_file(), "{f}");
    }
    let md = std::fs::read_to_string(run.join("summary.md")).unwrap();
    assert!(md.contains("| **chosen** |") && md.contains("| bf16 (peer) |"), "{md}");
    // The servers are gone: the port is free again.
    std::net::TcpListener::bind(("127.0.0.1", port.parse::<u16>().unwrap())).expect("a child server outlived the loop");

    // Resumed, rtn only, against a peer that is down: the checkpoint is reused, the peer is
    // reported as down (no gate passes for it), and rtn can still be chosen.
    let mut second: Vec<&str> = common.to_vec();
    second.extend(["--strategies", "rtn", "--peer", "dead=http://127.0.0.1:9"]);
    let o = fp4(&second);
    assert!(o.status.success(), "resumed fp4 loop failed: {}", stderr(&o));
    assert!(stderr(&o).contains("is down"), "{}", stderr(&o));
    let s2 = read_json(&run.join("summary.json"));
    assert_eq!(s2["strategies"][0]["quantized"]["reused"], true);
    let dead = &s2["peer"]["measured"];
    assert!(dead["down"].is_string());
    assert!(dead["gates"].as_array().unwrap().iter().all(|g| g["pass"] == false), "{dead}");
    assert!(s2["strategies"][0]["ttft_speedup_vs_peer"].is_null());
    assert!(std::fs::read_to_string(run.join("summary.md")).unwrap().contains("dead (peer DOWN)"));
    assert_eq!(s2["chosen"], "rtn");

    // The card of the first run's choice (restore its summary: the second run replaced it).
    std::fs::write(run.join("summary.json"), serde_json::to_string_pretty(&s).unwrap()).unwrap();
    let o = fp4(&["card", run.to_str().unwrap(), "--license", "apache-2.0", "--base-model", "example/mini-annie"]);
    assert!(o.status.success(), "fp4 card failed: {}", stderr(&o));
    let card = std::fs::read_to_string(run.join(chosen).join("README.md")).unwrap();
    let row = rows.iter().find(|r| r["name"] == chosen).unwrap();
    let report = read_json(&run.join(chosen).join("quant_report.json"));
    assert!(card.starts_with("---\nlicense: apache-2.0\nbase_model: example/mini-annie\n"), "{card}");
    for tag in ["- dgx-spark", "- blackwell", "- nvfp4", "- qwen3.5"] {
        assert!(card.contains(tag), "{tag}");
    }
    let num = |v: &Value, d: usize| format!("{:.d$}", v.as_f64().unwrap());
    let expect = [
        format!("mean {}", num(&row["kl"]["kl_mean"], 4)),
        format!("top-1 agreement {:.1} %", row["kl"]["top1_agreement"].as_f64().unwrap() * 100.0),
        format!(
            "| TTFT p50 / p95 (ms) | {} / {}",
            num(&row["measured"]["ttft_ms_p50"], 1),
            num(&row["measured"]["ttft_ms_p95"], 1)
        ),
        format!("| decode p50 (tok/s) | {}", num(&row["measured"]["decode_tok_s_p50"], 1)),
        format!("{} / {}", num(&peer["measured"]["ttft_ms_p50"], 1), num(&peer["measured"]["ttft_ms_p95"], 1)),
        format!(
            "| quantized linear layers | {} of {} |",
            report["totals"]["quantized_layers"],
            report["totals"]["quantized_layers"].as_u64().unwrap()
                + report["totals"]["unquantized_layers"].as_u64().unwrap()
        ),
        format!(
            "| calibration | {} samples, {} tokens |",
            report["calibration"]["samples"], report["calibration"]["tokens"]
        ),
        format!(
            "--max-model-len {}",
            read_json(&run.join(chosen).join("config.json"))["text_config"]["max_position_embeddings"]
        ),
    ];
    for e in &expect {
        assert!(card.contains(e.as_str()), "the card lacks `{e}`:\n{card}");
    }
    for g in row["measured"]["gates"].as_array().unwrap() {
        let v = match g["total"].as_u64() {
            Some(t) => format!("{}/{t}", num(&g["value"], 0)),
            None => num(&g["value"], 1),
        };
        assert!(card.contains(&format!("{v} {}", if g["pass"] == true { "✅" } else { "❌" })), "gate {g}");
    }
    // Its own card may be rewritten; a README.md fp4 did not write is never replaced.
    assert!(fp4(&["card", run.to_str().unwrap(), "--license", "mit"]).status.success());
    std::fs::write(run.join(chosen).join("README.md"), "my notes").unwrap();
    let o = fp4(&["card", run.to_str().unwrap(), "--license", "mit"]);
    assert!(!o.status.success() && stderr(&o).contains("not written by fp4"), "{}", stderr(&o));
    assert_eq!(std::fs::read_to_string(run.join(chosen).join("README.md")).unwrap(), "my notes");
    let o = fp4(&["card", run.to_str().unwrap(), "--strategy", "Z", "--output", "-"]);
    assert!(stderr(&o).contains("no strategy `Z`") && stderr(&o).contains("rtn, B"), "{}", stderr(&o));
}

#[test]
fn loop_rejects_bad_input_before_any_work() {
    let tmp = tempfile::tempdir().unwrap();
    let model = root().join("models/mini-annie").display().to_string();
    let out = tmp.path().join("r").display().to_string();
    let calib = root().join("configs/calib/mini-annie.jsonl").display().to_string();
    let cases: [(&[&str], &str); 5] = [
        (&["loop", "--model", &model, "--out", &out], "--calib-data FILE.jsonl is required"),
        (&["loop", "--model", &model, "--calib-data", &calib], "--out RUN_DIR is required"),
        (&["loop", "--model", &model, "--calib-data", &calib, "--out", &out, "--strategies", "rtn,Z"], "`Z`"),
        (
            &["loop", "--model", &model, "--calib-data", &calib, "--out", &out, "--skip-gates", "speed"],
            "no gate `speed`",
        ),
        (&["loop", "--model", &model, "--calib-data", &calib, "--out", &out, "--peer", "localhost:8003"], "NAME=URL"),
    ];
    for (args, msg) in cases {
        let o = fp4(args);
        assert!(!o.status.success() && stderr(&o).contains(msg), "{args:?}: {}", stderr(&o));
    }
    assert!(!tmp.path().join("r").exists(), "nothing is written before the inputs are checked");
}

/// The loop's child servers end with their parent: `fp4 serve --exit-on-stdin-eof` shuts down
/// when its standard input closes (the parent's end of the pipe goes with the parent).
#[test]
fn a_child_server_exits_when_its_stdin_closes() {
    let (_dir, model) = common::model_dir();
    let port = free_port();
    let mut child = Command::new(env!("CARGO_BIN_EXE_fp4"))
        .args(["serve", "--model", model.to_str().unwrap(), "--host", "127.0.0.1", "--port", &port.to_string()])
        .arg("--exit-on-stdin-eof")
        .env("RUST_LOG", "warn")
        .stdin(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let started = Instant::now();
    let health = format!("http://127.0.0.1:{port}/health");
    while !ureq::get(&health).call().is_ok_and(|r| r.status() == 200) {
        assert!(started.elapsed() < Duration::from_secs(60), "the server never became ready");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(child.try_wait().unwrap().is_none(), "it runs while the pipe is open");
    drop(child.stdin.take());
    let closed = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "{status}");
            break;
        }
        assert!(closed.elapsed() < Duration::from_secs(30), "the server outlived its stdin");
        std::thread::sleep(Duration::from_millis(50));
    }
}
