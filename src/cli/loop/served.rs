//! A checkpoint served by a child `fp4 serve` (this same binary) on a real port, for as long as
//! the [`Served`] value lives.
//!
//! The child is killed when the value is dropped (the normal end, an error, a panic). It also
//! holds the read end of a pipe on its standard input and shuts down when that closes
//! (`--exit-on-stdin-eof`), so it ends with this process even when this process is killed
//! outright; Ctrl-C reaches both, as they share the terminal's process group.

use anyhow::{bail, Context};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Served {
    child: Child,
    /// Held open for the child's lifetime: closing it tells the child to exit.
    _stdin: Option<ChildStdin>,
    pub url: String,
    pub log: PathBuf,
}

/// How to start one server.
pub struct ServeSpec<'a> {
    pub model: &'a Path,
    pub served_name: &'a str,
    pub port: u16,
    /// Flags after Annie's production flags (`--w4a4`, `--device cuda`, the user's extras).
    pub extra: &'a [String],
    /// The child's stdout and stderr go here.
    pub log: &'a Path,
    /// How long loading and warm-up may take before /health says ready.
    pub timeout: Duration,
}

impl Served {
    pub fn start(spec: &ServeSpec) -> anyhow::Result<Served> {
        // A server already on the port would answer /health for us: refuse rather than measure it.
        std::net::TcpListener::bind(("127.0.0.1", spec.port)).with_context(|| {
            format!("port {} is in use (an earlier server still running?); free it or pass --port", spec.port)
        })?;
        let exe = std::env::current_exe().context("cannot find the fp4 executable to run `fp4 serve`")?;
        let log = std::fs::File::create(spec.log).with_context(|| format!("cannot create {}", spec.log.display()))?;
        let err_log = log.try_clone().with_context(|| format!("cannot write {}", spec.log.display()))?;
        let mut child = Command::new(exe)
            .arg("serve")
            .arg("--model")
            .arg(spec.model)
            .args(["--host", "127.0.0.1", "--port", &spec.port.to_string()])
            .args(["--served-model-name", spec.served_name])
            .args(["--reasoning-parser", "qwen3", "--enable-auto-tool-choice", "--tool-call-parser", "qwen3_coder"])
            .arg("--exit-on-stdin-eof")
            .args(spec.extra)
            .stdin(Stdio::piped())
            .stdout(log)
            .stderr(err_log)
            .spawn()
            .context("cannot start `fp4 serve`")?;
        let stdin = child.stdin.take();
        let mut served = Served {
            child,
            _stdin: stdin,
            url: format!("http://127.0.0.1:{}", spec.port),
            log: spec.log.to_path_buf(),
        };
        served.wait_healthy(spec.timeout).with_context(|| format!("serving {}", spec.model.display()))?;
        Ok(served)
    }

    /// Polls /health until it answers 200; fails with the log's tail if the child exits first.
    fn wait_healthy(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let agent = ureq::AgentBuilder::new().timeout(Duration::from_secs(5)).build();
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!("`fp4 serve` exited ({status}) before it was ready:\n{}", log_tail(&self.log, 15));
            }
            if let Ok(r) = agent.get(&format!("{}/health", self.url)).call() {
                if r.status() == 200 {
                    return Ok(());
                }
            }
            if started.elapsed() > timeout {
                bail!(
                    "`fp4 serve` was not ready after {} s (raise --serve-timeout); its log:\n{}",
                    timeout.as_secs(),
                    log_tail(&self.log, 15)
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The last `n` lines of a log file (for error messages).
pub fn log_tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let tail = lines[lines.len().saturating_sub(n)..].join("\n");
    format!("{tail}\n(full log: {})", path.display())
}
