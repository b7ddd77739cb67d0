//! With feature `cuda`: compiles every `kernels/*.cu` into one fatbin (sm_90a, sm_120a, sm_121a
//! cubins plus compute_90a PTX) with the pinned nvcc of `scripts/nvcc.sh` (or `$CUDA_HOME`).
//! Without it: nothing, so the CPU build needs no CUDA at all.

use std::path::{Path, PathBuf};
use std::process::Command;

const GENCODE: [&str; 4] = [
    "arch=compute_90a,code=sm_90a",
    "arch=compute_120a,code=sm_120a",
    "arch=compute_121a,code=sm_121a",
    "arch=compute_90a,code=compute_90a",
];

fn nvcc(root: &Path) -> PathBuf {
    if let Ok(home) = std::env::var("CUDA_HOME") {
        return PathBuf::from(home).join("bin/nvcc");
    }
    let lib = root.join("target/nvcc/lib");
    let found = std::fs::read_dir(&lib)
        .ok()
        .and_then(|d| d.flatten().map(|e| e.path().join("site-packages/nvidia/cu13/bin/nvcc")).find(|p| p.exists()));
    found.unwrap_or_else(|| {
        panic!("feature `cuda` needs nvcc: run scripts/nvcc.sh (pinned CUDA 13.0 wheels) or set CUDA_HOME")
    })
}

fn main() {
    println!("cargo:rerun-if-env-changed=CUDA_HOME");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let kernels = root.join("kernels");
    println!("cargo:rerun-if-changed={}", kernels.display());
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let nvcc = nvcc(&root);
    let mut sources: Vec<PathBuf> = std::fs::read_dir(&kernels)
        .expect("kernels/ exists")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "cu"))
        .collect();
    sources.sort();
    for src in sources {
        println!("cargo:rerun-if-changed={}", src.display());
        let stem = src.file_stem().and_then(|s| s.to_str()).expect("utf-8 kernel names");
        let mut cmd = Command::new(&nvcc);
        cmd.args(["-fatbin", "-O3", "-std=c++17", "-lineinfo"]);
        for g in GENCODE {
            cmd.args(["-gencode", g]);
        }
        cmd.arg(&src).arg("-o").arg(out.join(format!("{stem}.fatbin")));
        let status = cmd.status().unwrap_or_else(|e| panic!("cannot run {}: {e}", nvcc.display()));
        assert!(status.success(), "nvcc failed on {}", src.display());
    }
}
