//! Decode-batch launchers (`kernels/decode.cu`): per-token RoPE, paged KV and attention, conv and delta-rule steps on state slots.

use super::*;

impl Gpu {
    /// In-place RoPE on `x [B, heads, head_dim]`, token b at position `pos[b]`.
    pub fn rope_at(
        &self,
        x: &mut DeviceBuf<f32>,
        inv_freq: &DeviceBuf<f32>,
        pos: &DeviceBuf<u32>,
        heads: usize,
        head_dim: usize,
    ) -> Result<()> {
        let half = inv_freq.len();
        let b = x.len() / (heads * head_dim);
        assert!(2 * half <= head_dim && x.len() == b * heads * head_dim && pos.len() >= b, "rope_at shapes");
        let n = b * heads * half;
        let (h, d, hf) = (heads as i32, head_dim as i32, half as i32);
        launch!(self, rope_at, flat(n), x, inv_freq, pos, &h, &d, &hf, &n);
        Ok(())
    }

    /// `k, v [B, row]` into the paged pools at each token's position (`table [B, max_blocks]`).
    #[allow(clippy::too_many_arguments)]
    pub fn kv_write(
        &self,
        k: &DeviceBuf<f32>,
        v: &DeviceBuf<f32>,
        kp: &mut DeviceBuf<f32>,
        vp: &mut DeviceBuf<f32>,
        table: &DeviceBuf<u32>,
        pos: &DeviceBuf<u32>,
        row: usize,
        max_blocks: usize,
        block_size: usize,
    ) -> Result<()> {
        let b = k.len() / row;
        assert!(
            k.len() == b * row && v.len() == k.len() && table.len() >= b * max_blocks && pos.len() >= b,
            "kv_write shapes"
        );
        let (ri, mi, bsi) = (row as i32, max_blocks as i32, block_size as i32);
        launch!(self, kv_write, per_row(b), k, v, kp, vp, table, pos, &ri, &mi, &bsi);
        Ok(())
    }

    /// Decode attention of `q [B, Hq, D]` over each token's paged KV (positions `0..=pos[b]`),
    /// split into [`attention_splits`] key ranges and merged.
    #[allow(clippy::too_many_arguments)]
    pub fn paged_attention(
        &self,
        q: &DeviceBuf<f32>,
        kp: &DeviceBuf<f32>,
        vp: &DeviceBuf<f32>,
        table: &DeviceBuf<u32>,
        pos: &DeviceBuf<u32>,
        dims: crate::cpu::AttnDims,
        max_blocks: usize,
        block_size: usize,
        scale: f32,
    ) -> Result<DeviceBuf<f32>> {
        let crate::cpu::AttnDims { q_heads: hq, kv_heads: hkv, head_dim: d } = dims;
        let b = q.len() / (hq * d);
        assert!(d <= PA_MAX_D && q.len() == b * hq * d && table.len() >= b * max_blocks, "paged_attention shapes");
        assert!(
            hq.is_multiple_of(hkv) && hq / hkv <= PA_MAX_G,
            "paged_attention: {hq} query heads over {hkv} KV heads"
        );
        let splits = attention_splits(b, hkv);
        let mut part = self.alloc::<f32>(b * hq * splits * (d + 2))?;
        let cfg = LaunchConfig {
            grid_dim: (b as u32, hkv as u32, splits as u32),
            block_dim: (PA_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let (hqi, hkvi, di, mi, bsi) = (hq as i32, hkv as i32, d as i32, max_blocks as i32, block_size as i32);
        if hq / hkv <= 4 && d <= 256 {
            launch!(
                self,
                attention_split_g4d256,
                cfg,
                q,
                kp,
                vp,
                table,
                pos,
                &mut part,
                &hqi,
                &hkvi,
                &di,
                &mi,
                &bsi,
                &scale
            );
        } else {
            launch!(self, attention_split, cfg, q, kp, vp, table, pos, &mut part, &hqi, &hkvi, &di, &mi, &bsi, &scale);
        }
        let mut out = self.alloc::<f32>(q.len())?;
        let si = splits as i32;
        let merge = LaunchConfig {
            grid_dim: ((b * hq) as u32, 1, 1),
            block_dim: (PA_MERGE_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        launch!(self, attention_merge, merge, &part, &mut out, &si, &di);
        Ok(out)
    }

    /// Causal-conv steps + SiLU: `x [rows, C]`, the state `pool [slots, K-1, C]` read per
    /// sequence at `slots.0[b]`, its `slots.2` rows taken in order, the state after row r
    /// written at `slots.1[r]` (`ops::GdnSlots`).
    pub fn conv1d_step(
        &self,
        x: &DeviceBuf<f32>,
        pool: &mut DeviceBuf<f32>,
        w: &DeviceBuf<f32>,
        slots: (&DeviceBuf<u32>, &DeviceBuf<u32>, usize),
        c: usize,
    ) -> Result<DeviceBuf<f32>> {
        let (read, write, per_seq) = slots;
        let k = w.len() / c;
        let rows = x.len() / c;
        let seqs = rows / per_seq.max(1);
        assert!(
            k <= MAX_CONV_K
                && x.len() == rows * c
                && per_seq >= 1
                && seqs * per_seq == rows
                && read.len() >= seqs
                && write.len() >= rows,
            "conv1d_step shapes"
        );
        let mut y = self.alloc::<f32>(x.len())?;
        let cfg = LaunchConfig {
            grid_dim: ((c as u32).div_ceil(ROW_THREADS), seqs as u32, 1),
            block_dim: (ROW_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let (ci, ki, ri) = (c as i32, k as i32, per_seq as i32);
        launch!(self, conv1d_step, cfg, x, pool, w, read, write, &mut y, &ci, &ki, &ri);
        Ok(y)
    }

    /// Delta-rule steps on the state `pool [slots, Hv, dk, dv]`, walked per sequence as
    /// [`Gpu::conv1d_step`] walks the conv state.
    #[allow(clippy::too_many_arguments)]
    pub fn gdn_step(
        &self,
        q: &DeviceBuf<f32>,
        k: &DeviceBuf<f32>,
        v: &DeviceBuf<f32>,
        g: &DeviceBuf<f32>,
        beta: &DeviceBuf<f32>,
        pool: &mut DeviceBuf<f32>,
        slots: (&DeviceBuf<u32>, &DeviceBuf<u32>, usize),
        dims: crate::cpu::GdnDims,
    ) -> Result<DeviceBuf<f32>> {
        let crate::cpu::GdnDims { key_heads: hk, value_heads: hv, key_dim: dk, value_dim: dv } = dims;
        let (read, write, per_seq) = slots;
        let rows = g.len() / hv;
        let seqs = rows / per_seq.max(1);
        assert!(
            dk <= GDN_STEP_MAX_DK
                && dk.is_multiple_of(4)
                && q.len() == rows * hk * dk
                && v.len() == rows * hv * dv
                && per_seq >= 1
                && seqs * per_seq == rows
                && read.len() >= seqs
                && write.len() >= rows,
            "gdn_step shapes"
        );
        let mut out = self.alloc::<f32>(rows * hv * dv)?;
        let cfg = LaunchConfig {
            grid_dim: (dv.div_ceil(32) as u32, hv as u32, seqs as u32),
            block_dim: (GDN_STEP_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let (hki, hvi, dki, dvi, ri) = (hk as i32, hv as i32, dk as i32, dv as i32, per_seq as i32);
        launch!(self, gdn_step, cfg, q, k, v, g, beta, pool, read, write, &mut out, &hki, &hvi, &dki, &dvi, &ri);
        Ok(out)
    }
}
