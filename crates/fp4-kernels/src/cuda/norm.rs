//! RMSNorm launchers (`kernels/norm.cu`).

use super::*;

impl Gpu {
    /// `y = x · rsqrt(mean(x²) + eps) · (offset + w)` per row of `w.len()`.
    pub fn rms_norm(&self, x: &DeviceBuf<f32>, w: &DeviceBuf<f32>, eps: f32, offset: f32) -> Result<DeviceBuf<f32>> {
        let d = w.len();
        assert!(x.len().is_multiple_of(d), "rms_norm shapes");
        let mut y = self.alloc::<f32>(x.len())?;
        let di = d as i32;
        match norm_v4(x.len() / d, d) {
            Some(cfg) => launch!(self, rms_norm_v4, cfg, x, w, &mut y, &di, &eps, &offset),
            None => launch!(self, rms_norm, per_row(x.len() / d), x, w, &mut y, &di, &eps, &offset),
        }
        Ok(y)
    }

    /// `h' = h + delta` and `y = rms_norm(h')` in one kernel: `(h', y)`.
    pub fn add_rms_norm(
        &self,
        h: &DeviceBuf<f32>,
        delta: &DeviceBuf<f32>,
        w: &DeviceBuf<f32>,
        eps: f32,
        offset: f32,
    ) -> Result<(DeviceBuf<f32>, DeviceBuf<f32>)> {
        let d = w.len();
        assert!(h.len().is_multiple_of(d) && delta.len() == h.len(), "add_rms_norm shapes");
        let rows = h.len() / d;
        let (mut sum, mut y) = (self.alloc::<f32>(h.len())?, self.alloc::<f32>(h.len())?);
        let di = d as i32;
        match norm_v4(rows, d) {
            Some(cfg) => launch!(self, add_rms_norm_v4, cfg, h, delta, &mut sum, w, &mut y, &di, &eps, &offset),
            None => launch!(self, add_rms_norm, per_row(rows), h, delta, &mut sum, w, &mut y, &di, &eps, &offset),
        }
        Ok((sum, y))
    }

    /// Gated RMSNorm per row of `w.len()`: `w · x·rsqrt(mean(x²)+eps) · silu(z)`.
    pub fn rms_norm_gated(
        &self,
        x: &DeviceBuf<f32>,
        z: &DeviceBuf<f32>,
        w: &DeviceBuf<f32>,
        eps: f32,
    ) -> Result<DeviceBuf<f32>> {
        let d = w.len();
        assert!(x.len().is_multiple_of(d) && z.len() == x.len(), "rms_norm_gated shapes");
        let mut y = self.alloc::<f32>(x.len())?;
        let di = d as i32;
        launch!(self, rms_norm_gated, per_row(x.len() / d), x, z, w, &mut y, &di, &eps);
        Ok(y)
    }
}
