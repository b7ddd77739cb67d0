//! `fp4 selftest --gpu`: every CUDA kernel against its CPU reference on random (never zero)
//! inputs, then kernel benchmarks against the device's measured copy bandwidth; a table on
//! stdout and, with `--out`, a JSON report (device, commit, date, figures).

use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Run the CUDA kernel checks (needs a build with `--features cuda` and a GPU).
    #[arg(long)]
    gpu: bool,
    /// CUDA device ordinal.
    #[arg(long, default_value_t = 0)]
    device: usize,
    /// Write the JSON report here.
    #[arg(long)]
    out: Option<PathBuf>,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    anyhow::ensure!(a.gpu, "nothing to do: pass --gpu (the CPU checks are `cargo test`)");
    #[cfg(not(feature = "cuda"))]
    anyhow::bail!("this fp4 was built without CUDA: rebuild with `--features cuda` (scripts/nvcc.sh provides nvcc)");
    #[cfg(feature = "cuda")]
    gpu::run(a)
}

#[cfg(feature = "cuda")]
mod gpu {
    use super::Args;
    use anyhow::Context;
    use fp4_format::nvfp4::{self, Nvfp4Weight};
    use fp4_kernels::cuda::Gpu;
    use serde_json::json;

    /// Deterministic normal samples (Box–Muller over a 64-bit LCG): no zeros in practice.
    struct Normal(u64);
    impl Normal {
        fn uniform(&mut self) -> f64 {
            self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((self.0 >> 11) as f64 + 0.5) / (1u64 << 53) as f64
        }
        fn sample(&mut self) -> f32 {
            let (u, v) = (self.uniform(), self.uniform());
            ((-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()) as f32
        }
        fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
            (0..n).map(|_| self.sample() * scale).collect()
        }
    }

    fn random_nvfp4(rng: &mut Normal, rows: usize, cols: usize) -> Nvfp4Weight {
        let mut w = rng.vec(rows * cols, 1.0 / (cols as f32).sqrt());
        // A few large weights, as real checkpoints have, so blocks use different scales.
        for i in (0..w.len()).step_by(977) {
            w[i] *= 12.0;
        }
        Nvfp4Weight::quantize(&w, rows, cols, nvfp4::nvfp4_global_scale(nvfp4::amax(&w)))
    }

    /// Max over rows of |gpu − ref| / Σ|w·x| (the scale of f32 accumulation error).
    fn gemv_check(gpu: &Gpu, rng: &mut Normal, rows: usize, cols: usize) -> anyhow::Result<f64> {
        let q = random_nvfp4(rng, rows, cols);
        let x = rng.vec(cols, 1.0);
        let w = q.dequantize();
        let dw = gpu.upload_nvfp4(&q)?;
        let dx = gpu.stream.clone_htod(&x)?;
        let mut dy = gpu.stream.alloc_zeros::<f32>(rows)?;
        gpu.nvfp4_gemv(&dw, &dx, &mut dy)?;
        let y = gpu.stream.clone_dtoh(&dy)?;
        let mut worst = 0f64;
        for (r, got) in y.iter().enumerate() {
            let row = &w[r * cols..(r + 1) * cols];
            let want: f64 = row.iter().zip(&x).map(|(a, b)| *a as f64 * *b as f64).sum();
            let scale: f64 = row.iter().zip(&x).map(|(a, b)| (*a as f64 * *b as f64).abs()).sum::<f64>() + 1e-30;
            worst = worst.max((*got as f64 - want).abs() / scale);
        }
        Ok(worst)
    }

    /// max |gpu − cpu| / max(|cpu|, 1e-30).
    fn rel_err(gpu: &[f32], cpu: &[f32]) -> f64 {
        let m = cpu.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-30) as f64;
        gpu.iter().zip(cpu).map(|(a, b)| (a - b).abs() as f64).fold(0f64, f64::max) / m
    }

    /// The row-wise and element-wise kernels against `fp4_kernels::cpu` on random rows.
    fn small_kernel_checks(gpu: &Gpu, rng: &mut Normal) -> anyhow::Result<Vec<(String, f64)>> {
        use fp4_kernels::{cpu, Precision};
        let mut out = Vec::new();
        for (rows, d) in [(1, 4096), (7, 64), (3, 1000)] {
            let x = rng.vec(rows * d, 2.0);
            let w = rng.vec(d, 0.3);
            let delta = rng.vec(rows * d, 1.0);
            let (dx, dw) = (gpu.stream.clone_htod(&x)?, gpu.stream.clone_htod(&w)?);
            let mut dy = gpu.stream.alloc_zeros::<f32>(rows * d)?;
            gpu.rms_norm(&dx, &dw, &mut dy, 1e-6, 1.0)?;
            let want = cpu::rms_norm(&x, &w, 1e-6, 1.0, Precision::F32);
            out.push((format!("rms_norm {rows}x{d}"), rel_err(&gpu.stream.clone_dtoh(&dy)?, &want)));

            let mut dh = gpu.stream.clone_htod(&x)?;
            let ddelta = gpu.stream.clone_htod(&delta)?;
            gpu.add_rms_norm(&mut dh, &ddelta, &dw, &mut dy, 1e-6, 1.0)?;
            let h: Vec<f32> = x.iter().zip(&delta).map(|(a, b)| a + b).collect();
            let want = cpu::rms_norm(&h, &w, 1e-6, 1.0, Precision::F32);
            let err = rel_err(&gpu.stream.clone_dtoh(&dy)?, &want).max(rel_err(&gpu.stream.clone_dtoh(&dh)?, &h));
            out.push((format!("add_rms_norm {rows}x{d}"), err));

            let mut dout = gpu.stream.alloc_zeros::<f32>(rows * d)?;
            gpu.silu_mul(&dx, &ddelta, &mut dout)?;
            let want = cpu::silu_mul(&x, &delta, Precision::F32);
            out.push((format!("silu_mul {}", rows * d), rel_err(&gpu.stream.clone_dtoh(&dout)?, &want)));
        }
        let (vocab, d) = (1000, 96);
        let table = rng.vec(vocab * d, 1.0);
        let ids: Vec<u32> = (0..37).map(|i| (i * 7919 % vocab) as u32).collect();
        let mut dout = gpu.stream.alloc_zeros::<f32>(ids.len() * d)?;
        gpu.embedding(&gpu.stream.clone_htod(&table)?, d, &gpu.stream.clone_htod(&ids)?, &mut dout)?;
        let want: Vec<f32> = ids.iter().flat_map(|&i| table[i as usize * d..(i as usize + 1) * d].to_vec()).collect();
        out.push((format!("embedding {}x{d}", ids.len()), rel_err(&gpu.stream.clone_dtoh(&dout)?, &want)));
        Ok(out)
    }

    /// Device-to-device copy bandwidth (read + write bytes per second) over a 1 GiB buffer.
    fn copy_bandwidth(gpu: &Gpu) -> anyhow::Result<f64> {
        let n = 1usize << 30;
        let src = gpu.stream.alloc_zeros::<u8>(n)?;
        let mut dst = gpu.stream.alloc_zeros::<u8>(n)?;
        gpu.stream.memcpy_dtod(&src, &mut dst)?;
        let iters = 20;
        let ms = gpu.time_ms(|| {
            for _ in 0..iters {
                gpu.stream.memcpy_dtod(&src, &mut dst)?;
            }
            Ok(())
        })?;
        Ok(2.0 * n as f64 * iters as f64 / (ms / 1e3))
    }

    /// NVFP4 GEMV on a 9B decode shape: weight bytes read per second.
    fn gemv_bandwidth(gpu: &Gpu, rng: &mut Normal, rows: usize, cols: usize) -> anyhow::Result<(f64, f64)> {
        let q = random_nvfp4(rng, rows, cols);
        let dw = gpu.upload_nvfp4(&q)?;
        let dx = gpu.stream.clone_htod(&rng.vec(cols, 1.0))?;
        let mut dy = gpu.stream.alloc_zeros::<f32>(rows)?;
        for _ in 0..10 {
            gpu.nvfp4_gemv(&dw, &dx, &mut dy)?;
        }
        let iters = 200;
        let ms = gpu.time_ms(|| {
            for _ in 0..iters {
                gpu.nvfp4_gemv(&dw, &dx, &mut dy)?;
            }
            Ok(())
        })?;
        let us = ms * 1e3 / iters as f64;
        Ok((us, dw.bytes() as f64 / (us / 1e6)))
    }

    pub fn run(a: Args) -> anyhow::Result<()> {
        let gpu = Gpu::new(a.device).context("cannot open the CUDA device")?;
        let name = gpu.name()?;
        println!("device: {name}");
        let mut rng = Normal(0x5eed);
        let mut checks = Vec::new();
        let mut ok = true;
        // Tiny-model, odd (K % 32 == 16) and 9B shapes.
        for (rows, cols) in [(48, 64), (96, 144), (131, 4096), (4096, 12288), (24576, 4096)] {
            let err = gemv_check(&gpu, &mut rng, rows, cols)?;
            let pass = err < 1e-5;
            ok &= pass;
            println!("nvfp4_gemv {rows:>6}x{cols:<6} max err/Σ|wx| {err:.2e} {}", if pass { "ok" } else { "FAIL" });
            checks.push(json!({"kernel": "nvfp4_gemv", "rows": rows, "cols": cols, "max_rel_err": err, "pass": pass}));
        }
        for (what, err) in small_kernel_checks(&gpu, &mut rng)? {
            let pass = err < 1e-5;
            ok &= pass;
            println!("{what:<28} max rel err {err:.2e} {}", if pass { "ok" } else { "FAIL" });
            checks.push(json!({"kernel": what, "max_rel_err": err, "pass": pass}));
        }
        let copy = copy_bandwidth(&gpu)?;
        println!("copy bandwidth (d2d, read+write): {:.0} GB/s", copy / 1e9);
        let mut benches = Vec::new();
        for (what, rows, cols) in
            [("gate_up (fused)", 24576, 4096), ("down_proj", 4096, 12288), ("q_proj+gate", 8192, 4096)]
        {
            let (us, bw) = gemv_bandwidth(&gpu, &mut rng, rows, cols)?;
            println!(
                "nvfp4_gemv {what:<16} {rows}x{cols}: {us:.1} µs, {:.0} GB/s = {:.0} % of copy",
                bw / 1e9,
                100.0 * bw / copy
            );
            benches.push(json!({"kernel": "nvfp4_gemv", "shape": what, "rows": rows, "cols": cols,
                "us": us, "gb_per_s": bw / 1e9, "fraction_of_copy": bw / copy}));
        }
        let report = json!({
            "schema": "fp4.selftest.v1",
            "device": name,
            "unix_time": std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs(),
            "copy_gb_per_s": copy / 1e9,
            "checks": checks,
            "benchmarks": benches,
            "all_passed": ok,
        });
        if let Some(p) = &a.out {
            std::fs::write(p, serde_json::to_string_pretty(&report)? + "\n")
                .with_context(|| format!("cannot write {}", p.display()))?;
        }
        anyhow::ensure!(ok, "some GPU kernel checks failed");
        Ok(())
    }
}
