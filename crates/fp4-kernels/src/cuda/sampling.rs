//! Sampling launchers (`kernels/sampling.cu`).

use super::*;

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
}
