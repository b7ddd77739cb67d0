//! Where `fp4 quantize` writes, and what it refuses (issue 20 items 1, 10, 11): it writes only
//! into a directory it creates, an empty one, or one holding an earlier fp4 output, and
//! `--force` replaces only the latter; never the source, a directory holding it or inside it; a
//! killed, interrupted or failing run leaves nothing, and what a SIGKILLed run left is cleared by
//! the next; files get the mode a plain create gives; NaN/Inf weights and over-long calibration
//! samples are reported by name.

mod common;

use common::{fixtures, golden};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

fn fp4(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_fp4")).args(args).env("RUST_LOG", "warn").output().unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A copy of a fixture's files (no sub-directories) in `dst`.
fn copy_model(name: &str, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(fixtures().join(name)).unwrap().flatten() {
        if e.path().is_file() {
            std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
        }
    }
}

/// `fp4 quantize` of `model` into `out` with tiny-text's calibration data and `extra` flags.
fn quantize(model: &Path, out: &Path, extra: &[&str]) -> Output {
    let calib = golden("tiny-text").join("calib.jsonl");
    let mut args = vec!["quantize", "--model", model.to_str().unwrap(), "--output", out.to_str().unwrap()];
    args.extend(["--calib-data", calib.to_str().unwrap()]);
    args.extend(extra);
    fp4(&args)
}

/// fp4's temporary directories (`.NAME.fp4-…`) in `dir`.
fn leftovers(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".fp4-"))
        .collect();
    v.sort();
    v
}

/// Every entry of `dir`, sorted.
fn listing(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> =
        std::fs::read_dir(dir).unwrap().flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
    v.sort();
    v
}

/// The issue's reproduction (`--output` the source's parent with `--force` deleted the source and
/// a sibling) and every other path that is not fp4's to replace: refused before any work, with
/// an error that says why, and nothing touched.
#[test]
fn force_never_replaces_the_source_or_what_fp4_did_not_write() {
    let dir = tempfile::tempdir().unwrap();
    let models = dir.path().join("models");
    let model = models.join("tiny-text");
    copy_model("tiny-text", &model);
    std::fs::write(models.join("notes.txt"), "keep me").unwrap();
    let before = listing(&model);
    let refused = |out: &Path, force: bool, why: &str| {
        let o = quantize(&model, out, if force { &["--force"] } else { &[] });
        let err = stderr(&o);
        assert!(!o.status.success() && err.contains(why), "{}: {err}", out.display());
        assert!(!err.contains("quantized "), "refused only after the work: {err}");
        err
    };
    // The parent holding the source, the source itself (also as `dir/`, `./x/../x`, a symlink),
    // and a path inside it.
    refused(&models, true, "contains the source checkpoint");
    refused(&model, false, "is the source checkpoint");
    refused(&model, true, "is the source checkpoint");
    refused(Path::new(&format!("{}/", model.display())), true, "is the source checkpoint");
    refused(&models.join("x/../tiny-text"), true, "is the source checkpoint");
    let link = dir.path().join("link");
    std::os::unix::fs::symlink(&model, &link).unwrap();
    refused(&link, true, "is the source checkpoint");
    let err = refused(&model.join("nvfp4"), false, "is inside the source checkpoint");
    assert!(err.contains("beside it"), "{err}");
    assert_eq!(listing(&model), before, "nothing written into the source");
    assert_eq!(std::fs::read_to_string(models.join("notes.txt")).unwrap(), "keep me");
    assert!(leftovers(&models).is_empty() && leftovers(&model).is_empty());

    // A directory fp4 did not write, with or without --force; one whose quant_report.json is
    // not fp4's; a file; a path under a file; a symbolic link to another directory.
    let other = dir.path().join("other");
    std::fs::create_dir(&other).unwrap();
    std::fs::write(other.join("data.bin"), "mine").unwrap();
    refused(&other, false, "not an fp4 output");
    refused(&other, true, "not an fp4 output");
    std::fs::write(other.join("quant_report.json"), r#"{"schema": "someone-else.v1"}"#).unwrap();
    refused(&other, true, "not an fp4 output");
    assert_eq!(listing(&other), ["data.bin", "quant_report.json"]);
    let file = dir.path().join("file.out");
    std::fs::write(&file, "a file").unwrap();
    refused(&file, true, "not a directory");
    let err = refused(&file.join("q"), false, "is a file, not a directory");
    assert!(err.contains("file.out"), "{err}");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "a file");
    let to_other = dir.path().join("to-other");
    std::os::unix::fs::symlink(&other, &to_other).unwrap();
    refused(&to_other, true, "symbolic link");
    assert!(leftovers(dir.path()).is_empty(), "{:?}", leftovers(dir.path()));
}

/// An empty directory is written into; an earlier fp4 output is replaced by `--force` as a whole
/// (a model card `fp4 card` wrote there is fp4's), but not when it holds files or directories fp4
/// did not write, which are named.
#[test]
fn force_replaces_an_earlier_fp4_output_and_nothing_else() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny-text");
    copy_model("tiny-text", &model);
    let out = dir.path().join("q");
    std::fs::create_dir(&out).unwrap();
    let o = quantize(&model, &out, &[]);
    assert!(o.status.success(), "an empty directory is fine: {}", stderr(&o));
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("quant_report.json")).unwrap()).unwrap();
    let files: Vec<String> = serde_json::from_value(report["files"].clone()).unwrap();
    assert_eq!(files, listing(&out), "the report lists every file of the output");

    let o = quantize(&model, &out, &[]);
    assert!(!o.status.success() && stderr(&o).contains("pass --force"), "{}", stderr(&o));
    std::fs::write(out.join("my-notes.txt"), "mine").unwrap();
    std::fs::create_dir(out.join("evals")).unwrap();
    let o = quantize(&model, &out, &["--force"]);
    let err = stderr(&o);
    assert!(!o.status.success() && err.contains("my-notes.txt") && err.contains("evals/"), "{err}");
    assert!(out.join("my-notes.txt").is_file() && out.join("evals").is_dir());
    std::fs::remove_file(out.join("my-notes.txt")).unwrap();
    std::fs::remove_dir(out.join("evals")).unwrap();

    // fp4 card's README.md is part of the output it replaces.
    std::fs::write(out.join("README.md"), "---\nlicense: mit\n---\n\n<!-- written by `fp4 card` 0.1.0 -->\n").unwrap();
    let o = quantize(&model, &out, &["--force", "--calib-samples", "3"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("quant_report.json")).unwrap()).unwrap();
    assert_eq!(report["calibration"]["samples"], 3, "the new output");
    assert!(!out.join("README.md").exists());
    assert!(leftovers(dir.path()).is_empty(), "{:?}", leftovers(dir.path()));
}

/// Every file of the output gets the mode a plain create gives under the caller's umask:
/// safetensors (written by the crate through an owner-only temporary file), JSON, and the
/// files copied from the source (whatever their mode there).
#[test]
fn output_files_get_the_umask_mode() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny-text");
    copy_model("tiny-text", &model);
    std::fs::set_permissions(model.join("tokenizer.json"), std::fs::Permissions::from_mode(0o600)).unwrap();
    let calib = golden("tiny-text").join("calib.jsonl");
    for (umask, want) in [("022", 0o644), ("027", 0o640)] {
        let out = dir.path().join(format!("q{umask}"));
        let o = Command::new("sh")
            .arg("-c")
            .arg(format!("umask {umask} && exec \"$0\" quantize --model \"$1\" --output \"$2\" --calib-data \"$3\""))
            .args([env!("CARGO_BIN_EXE_fp4"), model.to_str().unwrap(), out.to_str().unwrap(), calib.to_str().unwrap()])
            .env("RUST_LOG", "warn")
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", stderr(&o));
        for f in listing(&out) {
            let mode = std::fs::metadata(out.join(&f)).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, want, "{f} under umask {umask}: {mode:o}");
        }
    }
}

/// Polls `dir` until an fp4 temporary directory holding some file appears.
fn wait_for_temp(dir: &Path, child: &mut Child) -> PathBuf {
    let started = Instant::now();
    loop {
        let found = std::fs::read_dir(dir).unwrap().flatten().find(|e| {
            e.file_name().to_string_lossy().contains(".fp4-tmp-")
                && std::fs::read_dir(e.path())
                    .map(|d| d.flatten().any(|f| f.file_name() != ".fp4-lock"))
                    .unwrap_or(false)
        });
        if let Some(e) = found {
            return e.path();
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("the run ended ({status}) before its export started");
        }
        assert!(started.elapsed() < Duration::from_secs(120), "the export never started");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A run of quantize of `model` into `out` whose export waits `delay_ms` after each shard.
fn slow_run(model: &Path, out: &Path, delay_ms: u32) -> Child {
    let calib = golden("tiny-vl").join("calib.jsonl");
    Command::new(env!("CARGO_BIN_EXE_fp4"))
        .args(["quantize", "--model", model.to_str().unwrap(), "--output", out.to_str().unwrap()])
        .args(["--calib-data", calib.to_str().unwrap()])
        .env("FP4_TEST_EXPORT_DELAY_MS", delay_ms.to_string())
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// The PID of a process that has ended.
fn dead_pid() -> u32 {
    let mut c = Command::new("true").spawn().unwrap();
    let pid = c.id();
    c.wait().unwrap();
    pid
}

/// A run SIGKILLed in the middle of its export leaves no output, only its (complete-looking)
/// temporary directory; the next run into the same directory — for another output, even — removes
/// it, because no live run holds its lock. A temporary directory named with a PID that is now
/// another live process (a container's PID 1, this test's own) goes too; an older one without a
/// lock file goes when its PID is gone and it is the same output's; a live run's stays.
#[test]
fn a_killed_run_is_cleaned_up_by_the_next() {
    let dir = tempfile::tempdir().unwrap();
    let model = fixtures().join("tiny-vl");
    let out = dir.path().join("killed");
    let mut child = slow_run(&model, &out, 300);
    let tmp = wait_for_temp(dir.path(), &mut child);
    child.kill().unwrap(); // SIGKILL: no destructor, no handler
    child.wait().unwrap();
    assert!(!out.exists(), "a killed run must not leave {}", out.display());
    assert!(tmp.join(".fp4-lock").is_file(), "the kill came after the export finished; the test proved nothing");

    // What else may lie there: a stale directory named with a live PID but unlocked, an old one
    // without a lock for this output (dead PID), one for another output without a lock (cannot
    // be proved dead: kept), and something that only looks similar.
    let stale_live_pid = dir.path().join(format!(".x.fp4-tmp-{}", std::process::id()));
    std::fs::create_dir(&stale_live_pid).unwrap();
    std::fs::write(stale_live_pid.join(".fp4-lock"), "").unwrap();
    let old_same = dir.path().join(format!(".next.fp4-tmp-{}", dead_pid()));
    std::fs::create_dir(&old_same).unwrap();
    let old_other = dir.path().join(format!(".other.fp4-tmp-{}", dead_pid()));
    std::fs::create_dir(&old_other).unwrap();
    let lookalike = dir.path().join(".killed.fp4-tmp-notapid");
    std::fs::create_dir(&lookalike).unwrap();

    let next = dir.path().join("next");
    let o = quantize(&fixtures().join("tiny-text"), &next, &[]);
    let err = stderr(&o);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("left by an fp4 run that was killed"), "the removal is reported: {err}");
    assert!(!tmp.exists() && !stale_live_pid.exists() && !old_same.exists(), "{:?}", leftovers(dir.path()));
    assert!(old_other.exists() && lookalike.exists(), "only what is provably stale goes");
    assert!(next.join("quant_report.json").is_file());
    std::fs::remove_dir(&old_other).unwrap();
    std::fs::remove_dir(&lookalike).unwrap();

    // A run that is alive keeps its temporary directory while another run comes and goes.
    let live_out = dir.path().join("live");
    let mut live = slow_run(&model, &live_out, 400);
    let live_tmp = wait_for_temp(dir.path(), &mut live);
    let o = quantize(&fixtures().join("tiny-text"), &dir.path().join("meanwhile"), &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(live_tmp.exists(), "a live run's temporary directory was removed");
    let done = live.wait_with_output().unwrap();
    assert!(done.status.success(), "{}", String::from_utf8_lossy(&done.stderr));
    assert!(live_out.join("quant_report.json").is_file());
    assert!(leftovers(dir.path()).is_empty(), "{:?}", leftovers(dir.path()));
}

/// A run killed in the instant between moving the earlier output aside and moving the new one
/// in: the next run puts the earlier output back.
#[test]
fn an_output_moved_aside_by_a_killed_run_is_restored() {
    let dir = tempfile::tempdir().unwrap();
    let model = fixtures().join("tiny-text");
    let out = dir.path().join("q");
    let o = quantize(&model, &out, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let aside = dir.path().join(format!(".q.fp4-replaced-{}", dead_pid()));
    std::fs::rename(&out, &aside).unwrap();
    let o = quantize(&model, &out, &[]);
    let err = stderr(&o);
    assert!(!o.status.success() && err.contains("restored") && err.contains("pass --force"), "{err}");
    assert!(out.join("quant_report.json").is_file() && !aside.exists());
}

/// Ctrl-C (SIGINT) or SIGTERM during a run: the temporary directory is removed before the
/// process ends, with the conventional exit status.
#[test]
fn an_interrupted_run_removes_its_temporary_directory() {
    for (signal, code) in [("INT", 130), ("TERM", 143)] {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("q");
        let mut child = slow_run(&fixtures().join("tiny-vl"), &out, 300);
        let tmp = wait_for_temp(dir.path(), &mut child);
        let k = Command::new("kill").args([&format!("-{signal}"), &child.id().to_string()]).status().unwrap();
        assert!(k.success());
        let o = child.wait_with_output().unwrap();
        assert_eq!(o.status.code(), Some(code), "SIG{signal}: {}", String::from_utf8_lossy(&o.stderr));
        assert!(String::from_utf8_lossy(&o.stderr).contains("interrupted"));
        assert!(!tmp.exists() && !out.exists(), "SIG{signal}: {:?}", listing(dir.path()));
    }
}

/// The output path taken while the run works (here: a file appears there): the final move fails
/// with an error saying so, and no hidden complete checkpoint stays behind.
#[test]
fn a_failed_final_move_leaves_no_hidden_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("q");
    let mut child = slow_run(&fixtures().join("tiny-vl"), &out, 300);
    let _tmp = wait_for_temp(dir.path(), &mut child);
    std::fs::write(&out, "someone else's").unwrap();
    let o = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("changed while quantizing") && err.contains("not a directory"),
        "{err}"
    );
    assert_eq!(std::fs::read_to_string(&out).unwrap(), "someone else's");
    assert!(leftovers(dir.path()).is_empty(), "{:?}", leftovers(dir.path()));
}

/// Sets the first value of tensor `name` in safetensors file `file` to a bf16 NaN or +Inf.
fn poison(file: &Path, name: &str, bits: u16) {
    let mut bytes = std::fs::read(file).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let t = &header[name];
    assert_eq!(t["dtype"], "BF16", "{name}");
    let at = 8 + n + t["data_offsets"][0].as_u64().unwrap() as usize + 2 * 7;
    bytes[at..at + 2].copy_from_slice(&bits.to_le_bytes());
    std::fs::write(file, bytes).unwrap();
}

/// NaN or Inf in the source's weights stop the run before any work, naming every such tensor,
/// its file, the count and the first position: also in a tensor no quantizer reads (the final
/// norm), which ModelOpt's calibration assert never sees. Vision and MTP tensors, carried
/// through unchanged, only warn.
#[test]
fn nonfinite_source_weights_are_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("m");
    copy_model("tiny-text", &model);
    poison(&model.join("model.safetensors"), "model.layers.1.mlp.up_proj.weight", 0x7fc0);
    poison(&model.join("model.safetensors"), "model.norm.weight", 0x7f80);
    let out = dir.path().join("q");
    let o = quantize(&model, &out, &[]);
    let err = stderr(&o);
    assert!(!o.status.success(), "{err}");
    for t in ["model.layers.1.mlp.up_proj.weight", "model.norm.weight"] {
        assert!(err.contains(t), "{t}: {err}");
    }
    assert!(err.contains("model.safetensors") && err.contains("1 of") && err.contains("flat index 7"), "{err}");
    assert!(!out.exists() && leftovers(dir.path()).is_empty(), "{:?}", listing(dir.path()));

    let vl = dir.path().join("vl");
    copy_model("tiny-vl", &vl);
    let bytes = std::fs::read(vl.join("model-mtp.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut names: Vec<String> =
        st.tensors().into_iter().filter(|(_, t)| t.dtype() == safetensors::Dtype::BF16).map(|(n, _)| n).collect();
    names.sort();
    let mtp = names.first().expect("a BF16 MTP tensor").clone();
    drop(st);
    poison(&vl.join("model-mtp.safetensors"), &mtp, 0x7fc0);
    let calib = golden("tiny-vl").join("calib.jsonl");
    let out = dir.path().join("qvl");
    let o = fp4(&[
        "quantize",
        "--model",
        vl.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
        "--calib-data",
        calib.to_str().unwrap(),
    ]);
    let err = stderr(&o);
    assert!(o.status.success() && err.contains("warning") && err.contains(&mtp) && err.contains("unchanged"), "{err}");
}

/// A calibration sample longer than the model's max_position_embeddings is cut to it, as
/// ModelOpt's calibration loader truncates to its calib_seq, with a warning that says so and
/// the report recording it; a --calib-seq-len beyond the positions is refused.
#[test]
fn overlong_calibration_samples_are_cut_with_a_warning() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("m");
    copy_model("tiny-text", &model);
    let cfg = model.join("config.json");
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&cfg).unwrap()).unwrap();
    v["max_position_embeddings"] = 64.into();
    std::fs::write(&cfg, v.to_string()).unwrap();
    let calib = dir.path().join("long.jsonl");
    let long: Vec<u32> = (0..100).map(|i| 1 + i % 50).collect();
    std::fs::write(&calib, format!("{}\n{}\n", serde_json::json!({"input_ids": long}), r#"{"input_ids": [1, 2, 3]}"#))
        .unwrap();
    let (m, c) = (model.to_str().unwrap(), calib.to_str().unwrap());
    let out = dir.path().join("q");
    let o = fp4(&["quantize", "--model", m, "--output", out.to_str().unwrap(), "--calib-data", c]);
    let err = stderr(&o);
    assert!(o.status.success(), "{err}");
    assert!(
        err.contains("warning")
            && err.contains("1 of 2 samples are longer than the model's max_position_embeddings (64")
            && err.contains("100 tokens")
            && err.contains("cut to its first 64 tokens"),
        "{err}"
    );
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("quant_report.json")).unwrap()).unwrap();
    assert_eq!(report["calibration"]["tokens"], 64 + 3);
    assert_eq!(
        report["calibration_truncated"],
        serde_json::json!({"samples": 1, "to_tokens": 64, "longest_tokens": 100})
    );
    let o = fp4(&["quantize", "--model", m, "--output", dir.path().join("q2").to_str().unwrap(), "--calib-data", c]);
    assert!(o.status.success());
    let o = fp4(&[
        "quantize",
        "--model",
        m,
        "--output",
        dir.path().join("q3").to_str().unwrap(),
        "--calib-data",
        c,
        "--calib-seq-len",
        "65",
    ]);
    assert!(!o.status.success() && stderr(&o).contains("exceeds the model's max_position_embeddings (64)"));
}

/// `fp4 loop`'s run directory follows the same rule: never the source, inside it or holding it,
/// never someone else's directory (before anything is written).
#[test]
fn loop_run_dir_is_never_the_source_or_a_foreign_directory() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("models/m");
    copy_model("tiny-text", &model);
    let calib = golden("tiny-text").join("calib.jsonl");
    let run = |out: &Path| {
        fp4(&[
            "loop",
            "--model",
            model.to_str().unwrap(),
            "--calib-data",
            calib.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--peer",
            "none",
        ])
    };
    let before = listing(&model);
    for (out, why) in [
        (model.clone(), "is the source model"),
        (dir.path().join("models"), "contains the source model"),
        (model.join("run"), "is inside the source model"),
    ] {
        let o = run(&out);
        assert!(!o.status.success() && stderr(&o).contains(why), "{}: {}", out.display(), stderr(&o));
    }
    assert_eq!(listing(&model), before);
    let foreign = dir.path().join("foreign");
    std::fs::create_dir(&foreign).unwrap();
    std::fs::write(foreign.join("summary.md"), "my summary").unwrap();
    let o = run(&foreign);
    assert!(!o.status.success() && stderr(&o).contains("not an fp4 loop run directory"), "{}", stderr(&o));
    assert_eq!(listing(&foreign), ["summary.md"]);
}
