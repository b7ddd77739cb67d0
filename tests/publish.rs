//! `fp4 publish` against the fake Hub (the fp4-hub-fake crate): upload of a quantized
//! checkpoint, an idempotent re-run, auth failures, an interrupted upload resumed.

use fp4_hub_fake::{Entry, FakeHub, WRITE_TOKEN};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The tiny-quant fixture (sharded NVFP4 safetensors + JSON + tokenizer) plus a model card.
fn checkpoint() -> (tempfile::TempDir, PathBuf) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = tempfile::tempdir().unwrap();
    let ckpt = dir.path().join("ckpt");
    std::fs::create_dir(&ckpt).unwrap();
    for e in std::fs::read_dir(root.join("tests/fixtures/tiny-quant")).unwrap().flatten() {
        std::fs::copy(e.path(), ckpt.join(e.file_name())).unwrap();
    }
    std::fs::write(ckpt.join("README.md"), "---\nlicense: apache-2.0\ntags:\n- nvfp4\n---\n# tiny\n").unwrap();
    (dir, ckpt)
}

/// Runs `fp4 publish` with only the environment given (no HF_TOKEN or token file of the host).
fn publish(hub: &FakeHub, home: &Path, env: &[(&str, &str)], args: &[&str]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_fp4"));
    c.arg("publish").args(args).env_clear().env("HOME", home).env("HF_ENDPOINT", hub.url()).env("RUST_LOG", "warn");
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().unwrap()
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

fn weights(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".safetensors"))
        .collect();
    v.sort();
    v
}

#[test]
fn publish_uploads_then_a_rerun_uploads_nothing() {
    let hub = FakeHub::start();
    let (tmp, ckpt) = checkpoint();
    let env = [("HF_TOKEN", WRITE_TOKEN)];
    let o = publish(&hub, tmp.path(), &env, &["tester/tiny-nvfp4", ckpt.to_str().unwrap(), "--private"]);
    assert!(o.status.success(), "{}", text(&o));
    let out = text(&o);
    assert!(out.contains("created") && out.contains("committed"), "{out}");
    assert_eq!(hub.is_private("tester/tiny-nvfp4"), Some(true));
    let shards = weights(&ckpt);
    assert!(shards.len() >= 7);
    for e in std::fs::read_dir(&ckpt).unwrap().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let got = hub.file("tester/tiny-nvfp4", "main", &name);
        assert_eq!(got.as_deref(), Some(std::fs::read(e.path()).unwrap().as_slice()), "{name}");
        let lfs = matches!(hub.entry("tester/tiny-nvfp4", "main", &name), Some(Entry::Lfs { .. }));
        assert_eq!(lfs, name.ends_with(".safetensors"), "{name}: weights through LFS, the rest inline");
    }
    assert_eq!(hub.commits("tester/tiny-nvfp4", "main"), 2, "one commit for the whole directory");
    assert_eq!(hub.puts().0, shards.len());

    // The token file of `huggingface-cli login` works as well, and nothing new goes up.
    let hf_home = tmp.path().join("hf");
    std::fs::create_dir(&hf_home).unwrap();
    std::fs::write(hf_home.join("token"), format!("{WRITE_TOKEN}\n")).unwrap();
    let o = publish(
        &hub,
        tmp.path(),
        &[("HF_HOME", hf_home.to_str().unwrap())],
        &["tester/tiny-nvfp4", ckpt.to_str().unwrap()],
    );
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("nothing to upload"), "{}", text(&o));
    assert_eq!(hub.commits("tester/tiny-nvfp4", "main"), 2);
    assert_eq!(hub.puts().0, shards.len());
}

#[test]
fn publish_auth_failures_say_what_to_do() {
    let hub = FakeHub::start();
    let (tmp, ckpt) = checkpoint();
    // No token at all: the error names HF_TOKEN and the token file it looked for.
    let o = publish(&hub, tmp.path(), &[], &["tester/x", ckpt.to_str().unwrap()]);
    assert!(!o.status.success());
    let msg = text(&o);
    let file = tmp.path().join(".cache/huggingface/token");
    assert!(
        msg.contains("HF_TOKEN") && msg.contains(&file.display().to_string()) && msg.contains("huggingface-cli login"),
        "{msg}"
    );
    assert!(hub.log().is_empty(), "no request without a token");
    // A wrong token from the file: the Hub's 401, and which token it was.
    std::fs::create_dir_all(file.parent().unwrap()).unwrap();
    std::fs::write(&file, "hf_revoked\n").unwrap();
    let o = publish(&hub, tmp.path(), &[], &["tester/x", ckpt.to_str().unwrap()]);
    assert!(!o.status.success());
    let msg = text(&o);
    assert!(msg.contains("401") && msg.contains(&file.display().to_string()) && !msg.contains("panicked"), "{msg}");
    assert!(hub.is_private("tester/x").is_none(), "no repo created");
}

#[test]
fn an_interrupted_publish_resumes() {
    let hub = FakeHub::start();
    let (tmp, ckpt) = checkpoint();
    let env = [("HF_TOKEN", WRITE_TOKEN)];
    let shards = weights(&ckpt);
    // The Hub's storage fails for good after 3 objects.
    hub.fail_puts(3, usize::MAX, 503);
    let o = publish(&hub, tmp.path(), &env, &["tester/r", ckpt.to_str().unwrap(), "--retries", "0"]);
    assert!(!o.status.success());
    let msg = text(&o);
    assert!(msg.contains("503") && msg.contains(".safetensors"), "{msg}");
    assert_eq!(hub.commits("tester/r", "main"), 1, "no commit from the failed run");
    assert_eq!(hub.objects("tester/r"), 3);

    // A storage hiccup on the next run is retried within it; the 3 objects are not sent again.
    hub.fail_puts(0, 1, 500);
    let o = publish(&hub, tmp.path(), &env, &["tester/r", ckpt.to_str().unwrap(), "--retries", "1"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("3 LFS objects already on the Hub"), "{}", text(&o));
    assert_eq!(hub.puts().0, shards.len(), "each object stored once");
    assert_eq!(hub.commits("tester/r", "main"), 2);
    for s in &shards {
        assert_eq!(hub.file("tester/r", "main", s).unwrap(), std::fs::read(ckpt.join(s)).unwrap(), "{s}");
    }
}
