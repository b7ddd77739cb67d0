//! Shared by the end-to-end tests: a running `fp4 serve` on a tiny servable model.
#![allow(dead_code)]

use serde_json::Value;
use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Server {
    pub child: Child,
    pub port: u16,
    _dir: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The tiny-quant fixture plus fp4's Qwen3.5 chat template: a servable model directory.
pub fn model_dir() -> (tempfile::TempDir, PathBuf) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    std::fs::create_dir(&model).unwrap();
    for e in std::fs::read_dir(root.join("tests/fixtures/tiny-quant")).unwrap().flatten() {
        std::fs::copy(e.path(), model.join(e.file_name())).unwrap();
    }
    std::fs::copy(root.join("crates/fp4-chat/templates/qwen3_5.jinja"), model.join("chat_template.jinja")).unwrap();
    (dir, model)
}

pub fn start(extra: &[&str]) -> Server {
    let (dir, model) = model_dir();
    start_model(dir, &model, extra)
}

/// Serves `model` (kept alive with `dir`) with Annie's production flags plus `extra`.
pub fn start_model(dir: tempfile::TempDir, model: &Path, extra: &[&str]) -> Server {
    let mut args =
        vec!["--reasoning-parser", "qwen3", "--enable-auto-tool-choice", "--tool-call-parser", "qwen3_coder"];
    args.extend(extra);
    start_bare(dir, model, &args)
}

/// Serves `model` with only the test's address and names plus `extra` (no parsers).
pub fn start_bare(dir: tempfile::TempDir, model: &Path, extra: &[&str]) -> Server {
    start_logged(dir, model, extra, Stdio::null())
}

/// [`start`]'s server with its log (warnings and errors) in the returned file.
pub fn start_with_log(extra: &[&str]) -> (Server, PathBuf) {
    let (dir, model) = model_dir();
    let log = dir.path().join("serve.log");
    let file = std::fs::File::create(&log).unwrap();
    (start_logged(dir, &model, extra, Stdio::from(file)), log)
}

fn start_logged(dir: tempfile::TempDir, model: &Path, extra: &[&str], stderr: Stdio) -> Server {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut args: Vec<String> = vec![
        "serve".into(),
        "--model".into(),
        model.display().to_string(),
        "--host".into(),
        "127.0.0.1".into(),
        "--port".into(),
        port.to_string(),
        "--served-model-name".into(),
        "tiny".into(),
    ];
    if !extra.contains(&"--max-model-len") {
        args.extend(["--max-model-len".into(), "2048".into()]);
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    let child =
        Command::new(env!("CARGO_BIN_EXE_fp4")).args(&args).env("RUST_LOG", "warn").stderr(stderr).spawn().unwrap();
    let server = Server { child, port, _dir: dir };
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(60) {
        if let Ok((200, _)) = server.request("GET", "/health", None, &[]) {
            return server;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("server did not become healthy");
}

impl Server {
    /// One HTTP/1.1 request; returns (status, body).
    pub fn request(
        &self,
        method: &str,
        path: &str,
        body: Option<&str>,
        headers: &[(&str, &str)],
    ) -> std::io::Result<(u16, String)> {
        let mut s = TcpStream::connect(("127.0.0.1", self.port))?;
        s.set_read_timeout(Some(Duration::from_secs(120)))?;
        let body = body.unwrap_or("");
        let mut req = format!("{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n", body.len());
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        req.push_str("\r\n");
        req.push_str(body);
        // A server may answer (401, 413) and close before it has read a large body: the write
        // then fails, but the answer it sent is still there to read.
        let sent = s.write_all(req.as_bytes());
        let cut_off = |e: &std::io::Error| matches!(e.kind(), ErrorKind::BrokenPipe | ErrorKind::ConnectionReset);
        if let Err(e) = &sent {
            if !cut_off(e) {
                return Err(sent.unwrap_err());
            }
        }
        let mut raw = Vec::new();
        match s.read_to_end(&mut raw) {
            Ok(_) => {}
            Err(e) if cut_off(&e) && !raw.is_empty() => {}
            Err(e) => return Err(e),
        }
        if raw.is_empty() {
            sent?;
        }
        let text = String::from_utf8_lossy(&raw).into_owned();
        let (head, rest) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        let status: u16 = head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
        let chunked = head.to_ascii_lowercase().contains("transfer-encoding: chunked");
        Ok((status, if chunked { dechunk(rest) } else { rest.to_string() }))
    }

    pub fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        let (status, text) = self.request("POST", path, Some(&body.to_string()), &[]).unwrap();
        (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
    }

    /// A streaming request: the `data:` payloads in order.
    pub fn stream(&self, body: &Value) -> Vec<String> {
        let (status, text) = self.request("POST", "/v1/chat/completions", Some(&body.to_string()), &[]).unwrap();
        assert_eq!(status, 200, "{text}");
        text.lines().filter_map(|l| l.strip_prefix("data: ")).map(str::to_string).collect()
    }
}

/// The body of a chunked HTTP/1.1 response.
pub fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((len, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(len.trim(), 16).unwrap_or(0);
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// `tests/fixtures`.
pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// ModelOpt goldens of a fixture model (`tests/fixtures/modelopt/<model>`).
pub fn golden(model: &str) -> PathBuf {
    fixtures().join("modelopt").join(model)
}

/// The held-out eval ids stored with a model's ModelOpt goldens.
pub fn eval_ids(model: &str) -> Vec<u32> {
    let bytes = std::fs::read(golden(model).join("eval.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensor("ids").unwrap().data().chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap()) as u32).collect()
}

/// Logits of every position of `ids` for the checkpoint in `dir`.
pub fn logits(dir: &Path, opts: fp4_model::LoadOptions, ids: &[u32]) -> Vec<f32> {
    let model = fp4_model::Qwen35::load(&fp4_format::Checkpoint::open(dir).unwrap(), opts).unwrap();
    model.forward(ids, &mut model.new_cache(), fp4_model::Logits::All).unwrap().into_vec()
}
