//! Element-wise, gather, RoPE and causal-conv launchers (`kernels/elementwise.cu`).

use super::*;

impl Gpu {
    /// Element-wise binary ops on equal-length buffers.
    pub fn binary(&self, op: Binary, a: &DeviceBuf<f32>, b: &DeviceBuf<f32>) -> Result<DeviceBuf<f32>> {
        let n = a.len();
        assert_eq!(b.len(), n, "{op:?} shapes");
        let mut out = self.alloc::<f32>(n)?;
        match op {
            Binary::SiluMul => launch!(self, silu_mul, flat(n), a, b, &mut out, &n),
            Binary::SigmoidGate => launch!(self, sigmoid_gate, flat(n), a, b, &mut out, &n),
            Binary::Add => launch!(self, add, flat(n), a, b, &mut out, &n),
        }
        Ok(out)
    }

    /// `y[r, c] += bias[c]`.
    pub fn add_bias(&self, y: &mut DeviceBuf<f32>, bias: &DeviceBuf<f32>) -> Result<()> {
        let (n, cols) = (y.len(), bias.len() as i32);
        assert!(n.is_multiple_of(bias.len()), "add_bias shapes");
        launch!(self, add_bias, flat(n), y, bias, &cols, &n);
        Ok(())
    }

    /// `out[r, c] = x[r, c] · s[c]`.
    pub fn mul_cols(&self, x: &DeviceBuf<f32>, s: &DeviceBuf<f32>) -> Result<DeviceBuf<f32>> {
        let (n, cols) = (x.len(), s.len() as i32);
        assert!(n.is_multiple_of(s.len()), "mul_cols shapes");
        let mut out = self.alloc::<f32>(n)?;
        launch!(self, mul_cols, flat(n), x, s, &mut out, &cols, &n);
        Ok(out)
    }

    /// Columns `[off, off + width)` of the rows (length `src_cols`) of `src`.
    pub fn copy_cols(&self, src: &DeviceBuf<f32>, src_cols: usize, off: usize, width: usize) -> Result<DeviceBuf<f32>> {
        assert!(src.len().is_multiple_of(src_cols) && off + width <= src_cols, "copy_cols shapes");
        let n = src.len() / src_cols * width;
        let mut out = self.alloc::<f32>(n)?;
        let (sc, o, w) = (src_cols as i32, off as i32, width as i32);
        launch!(self, copy_cols, flat(n), src, &mut out, &sc, &o, &w, &n);
        Ok(out)
    }

    /// `[a | b]` row by row for `a [R, m]`, `b [R, n]`.
    pub fn cat_cols(&self, a: &DeviceBuf<f32>, m: usize, b: &DeviceBuf<f32>, n: usize) -> Result<DeviceBuf<f32>> {
        assert!(m > 0 && n > 0 && a.len().is_multiple_of(m) && a.len() / m * n == b.len(), "cat_cols shapes");
        let total = a.len() + b.len();
        let mut out = self.alloc::<f32>(total)?;
        let (mi, ni) = (m as i32, n as i32);
        launch!(self, cat_cols, flat(total), a, b, &mut out, &mi, &ni, &total);
        Ok(out)
    }

    /// Rows `ids` of a `[vocab, d]` table (ids validated against the vocabulary by the caller).
    pub fn embedding(&self, table: &DeviceBuf<f32>, d: usize, ids: &[u32]) -> Result<DeviceBuf<f32>> {
        assert!(table.len().is_multiple_of(d), "embedding shapes");
        let dev_ids = self.upload(ids);
        let mut out = self.alloc::<f32>(ids.len() * d)?;
        let di = d as i32;
        launch!(self, embedding, per_row(ids.len()), table, &dev_ids, &mut out, &di);
        Ok(out)
    }

    /// Rows `ids` (on the device) of a `[vocab, d]` table.
    pub fn embedding_ids(&self, table: &DeviceBuf<f32>, d: usize, ids: &DeviceBuf<u32>) -> Result<DeviceBuf<f32>> {
        assert!(table.len().is_multiple_of(d), "embedding shapes");
        let mut out = self.alloc::<f32>(ids.len() * d)?;
        let di = d as i32;
        launch!(self, embedding, per_row(ids.len()), table, ids, &mut out, &di);
        Ok(out)
    }

    /// `dst[dst_rows[i]] = src[src_rows[i]]` over rows of `d` floats (see `ops::scatter_rows`).
    pub fn scatter_rows(
        &self,
        dst: &mut DeviceBuf<f32>,
        dst_rows: &DeviceBuf<u32>,
        src: &DeviceBuf<f32>,
        src_rows: &DeviceBuf<u32>,
        d: usize,
    ) -> Result<()> {
        assert!(
            dst_rows.len() == src_rows.len() && dst.len().is_multiple_of(d) && src.len().is_multiple_of(d),
            "scatter_rows shapes"
        );
        let di = d as i32;
        launch!(self, scatter_rows, per_row(dst_rows.len()), dst, dst_rows, src, src_rows, &di);
        Ok(())
    }

    /// `(β, g)` of a GDN layer from `b, a [T, Hv]`.
    pub fn gdn_gates(
        &self,
        b: &DeviceBuf<f32>,
        a: &DeviceBuf<f32>,
        a_log: &DeviceBuf<f32>,
        dt_bias: &DeviceBuf<f32>,
    ) -> Result<(DeviceBuf<f32>, DeviceBuf<f32>)> {
        let (n, heads) = (a.len(), a_log.len() as i32);
        assert!(b.len() == n && n.is_multiple_of(a_log.len()) && dt_bias.len() == a_log.len(), "gdn_gates shapes");
        let (mut beta, mut g) = (self.alloc::<f32>(n)?, self.alloc::<f32>(n)?);
        launch!(self, gdn_gates, flat(n), b, a, a_log, dt_bias, &mut beta, &mut g, &heads, &n);
        Ok((beta, g))
    }

    /// In-place RoPE on `x [T, heads, head_dim]` from position `pos0`.
    pub fn rope(
        &self,
        x: &mut DeviceBuf<f32>,
        inv_freq: &DeviceBuf<f32>,
        heads: usize,
        head_dim: usize,
        pos0: usize,
    ) -> Result<()> {
        let half = inv_freq.len();
        assert!(2 * half <= head_dim && x.len().is_multiple_of(heads * head_dim), "rope shapes");
        let n = x.len() / head_dim * half;
        let (h, d, hf, p) = (heads as i32, head_dim as i32, half as i32, pos0 as i32);
        launch!(self, rope, flat(n), x, inv_freq, &h, &d, &hf, &p, &n);
        Ok(())
    }

    /// Causal depthwise conv + SiLU of `x [T, C]` continuing (and updating) `state [K-1, C]`.
    pub fn causal_conv1d_silu(
        &self,
        x: &DeviceBuf<f32>,
        state: &mut DeviceBuf<f32>,
        w: &DeviceBuf<f32>,
        c: usize,
    ) -> Result<DeviceBuf<f32>> {
        let k = w.len() / c;
        assert!(k <= MAX_CONV_K && state.len() == (k - 1) * c && x.len().is_multiple_of(c), "conv1d shapes");
        let t = x.len() / c;
        let mut y = self.alloc::<f32>(x.len())?;
        let (ti, ci, ki) = (t as i32, c as i32, k as i32);
        let cfg = LaunchConfig {
            grid_dim: ((c as u32).div_ceil(ROW_THREADS), t.div_ceil(CONV_T).max(1) as u32, 1),
            block_dim: (ROW_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        launch!(self, conv1d, cfg, x, state, w, &mut y, &ti, &ci, &ki);
        Ok(y)
    }
}
