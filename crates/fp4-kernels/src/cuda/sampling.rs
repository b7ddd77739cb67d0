//! Sampling launchers (`kernels/sampling.cu`).

use super::*;

const _: () = assert!(crate::ops::SAMPLE_CONTROLS == geometry::SAMPLE_CONTROLS, "kernels/geometry.h");

impl Gpu {
    /// Greedy (temperature 0) or sampled token from one logits row (see `kernels/sampling.cu`).
    pub fn sample(&self, logits: &DeviceBuf<f32>, p: crate::cpu::SampleParams, u: f32) -> Result<u32> {
        let n = logits.len() as i32;
        let mut out = self.alloc::<u32>(1)?;
        let cfg = LaunchConfig { grid_dim: (1, 1, 1), block_dim: (SAMPLE_THREADS, 1, 1), shared_mem_bytes: 0 };
        if p.temperature == 0.0 {
            launch!(self, argmax, cfg, logits, &n, &mut out);
        } else {
            let k = p.top_k.min(i32::MAX as usize) as i32;
            launch!(self, sample, cfg, logits, &n, &p.temperature, &k, &p.top_p, &p.min_p, &u, &mut out);
        }
        Ok(self.download(&out)[0])
    }

    /// The argmax of each row of `logits [rows, n]` into `out[..rows]` (stays on the device).
    pub fn argmax_rows(&self, logits: &DeviceBuf<f32>, n: usize, out: &mut DeviceBuf<u32>) -> Result<()> {
        let rows = logits.len() / n;
        assert!(logits.len() == rows * n && out.len() >= rows, "argmax_rows shapes");
        let ni = n as i32;
        let cfg =
            LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (SAMPLE_THREADS, 1, 1), shared_mem_bytes: 0 };
        launch!(self, argmax, cfg, logits, &ni, out);
        Ok(())
    }

    /// A token per row of `logits [rows, n]` by each row's controls (see `ops::sample_rows`).
    pub fn sample_rows(
        &self,
        logits: &DeviceBuf<f32>,
        n: usize,
        controls: &DeviceBuf<u32>,
        out: &mut DeviceBuf<u32>,
    ) -> Result<()> {
        let rows = logits.len() / n;
        assert!(
            logits.len() == rows * n && controls.len() >= rows * geometry::SAMPLE_CONTROLS && out.len() >= rows,
            "sample_rows shapes"
        );
        let ni = n as i32;
        let cfg =
            LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (SAMPLE_THREADS, 1, 1), shared_mem_bytes: 0 };
        launch!(self, sample_rows, cfg, logits, &ni, controls, out);
        Ok(())
    }

    /// `dst[start + stride·i] = src[i]` (see `ops::write_ids_strided`).
    pub fn write_ids_strided(
        &self,
        dst: &mut DeviceBuf<u32>,
        src: &DeviceBuf<u32>,
        start: usize,
        stride: usize,
    ) -> Result<()> {
        let n = src.len();
        assert!(n == 0 || start + stride * (n - 1) < dst.len(), "write_ids_strided shapes");
        let (ni, si, ti) = (n as i32, start as i32, stride as i32);
        launch!(self, write_ids_strided, flat(n), dst, src, &ni, &si, &ti);
        Ok(())
    }

    /// Greedy acceptance of a speculative verify (see `ops::accept_greedy_rows`).
    #[allow(clippy::too_many_arguments)]
    pub fn accept_greedy_rows(
        &self,
        ids: &DeviceBuf<u32>,
        best: &DeviceBuf<u32>,
        n: usize,
        k: usize,
        force: &DeviceBuf<u32>,
        head_ids: &mut DeviceBuf<u32>,
        picks: &mut DeviceBuf<u32>,
        out: &mut DeviceBuf<u32>,
    ) -> Result<()> {
        let rows = n * (k + 1);
        assert!(
            ids.len() >= rows
                && best.len() >= rows
                && force.len() >= n
                && head_ids.len() >= rows
                && picks.len() >= n
                && out.len() >= n * (k + 2),
            "accept_greedy_rows shapes"
        );
        let (ni, ki) = (n as i32, k as i32);
        launch!(self, accept_greedy_rows, flat(n), ids, best, &ni, &ki, force, head_ids, picks, out);
        Ok(())
    }
}
