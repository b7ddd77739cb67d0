//! GEMV and GEMM launchers (`kernels/gemv.cu`, cuBLAS over dequantized weights): every linear layer's product, and the weights' upload.

use super::*;

impl Gpu {
    /// An NVFP4 weight for W4A16 layers, its codes in the GEMV's repacked layout (repacked on
    /// the device: a 9B's codes take seconds through the host's `gemv_repack`, which selftest
    /// checks this against).
    pub fn upload_nvfp4(&self, w: &Nvfp4Weight) -> GpuNvfp4 {
        let packed = self
            .repack_codes(&self.upload(&w.packed))
            .unwrap_or_else(|e| panic!("nvfp4_repack of a [{}, {}] weight: {e}", w.rows, w.cols));
        let (rows, cols, scale_2) = (w.rows, w.cols, w.scale_2);
        GpuNvfp4 { rows, cols, packed, scales: self.upload(&w.scales), scale_2, layout: Nvfp4Layout::Repacked }
    }

    /// A bf16 weight `[rows, cols]` quantized to NVFP4 on the device (round to nearest under the
    /// per-tensor scale of its amax, as `Nvfp4Weight::quantize`), in ModelOpt's layout: codes,
    /// E4M3 block scales and `scale_2`.
    pub fn quantize_nvfp4_bf16(
        &self,
        w: &DeviceBuf<u16>,
        rows: usize,
        cols: usize,
    ) -> Result<(DeviceBuf<u8>, DeviceBuf<u8>, f32)> {
        assert!(w.len() == rows * cols && cols.is_multiple_of(16), "quantize_nvfp4_bf16: [{rows}, {cols}]");
        let n = w.len();
        let mut amax = self.upload(&[0u32]);
        launch!(self, amax_bf16, flat(n), w, &n, &mut amax);
        let scale_2 = fp4_format::nvfp4::nvfp4_global_scale(f32::from_bits(self.download(&amax)[0]));
        let blocks = n / 16;
        let (mut codes, mut scales) = (self.alloc::<u8>(n / 2)?, self.alloc::<u8>(blocks)?);
        launch!(self, nvfp4_quantize_bf16, flat(blocks), w, &scale_2, &mut codes, &mut scales, &blocks);
        Ok((codes, scales, scale_2))
    }

    /// [`Gpu::quantize_nvfp4_bf16`] as a W4A16 weight (codes in the GEMV's repacked layout).
    pub fn nvfp4_from_bf16(&self, w: &DeviceBuf<u16>, rows: usize, cols: usize) -> Result<GpuNvfp4> {
        let (codes, scales, scale_2) = self.quantize_nvfp4_bf16(w, rows, cols)?;
        let packed = self.repack_codes(&codes)?;
        Ok(GpuNvfp4 { rows, cols, packed, scales, scale_2, layout: Nvfp4Layout::Repacked })
    }

    /// ModelOpt-ordered codes in the repacked layout (`nvfp4_repack`).
    pub(super) fn repack_codes(&self, packed: &DeviceBuf<u8>) -> Result<DeviceBuf<u8>> {
        assert_eq!(packed.len() % 4, 0, "nvfp4_repack: whole 8-code words");
        let words = packed.len() / 4;
        let mut out = self.alloc::<u8>(packed.len())?;
        launch!(self, nvfp4_repack, flat(words), packed, &mut out, &words);
        Ok(out)
    }

    /// An NVFP4 weight in ModelOpt's layout (W4A4 layers: the block-scaled GEMM reads it).
    pub fn upload_nvfp4_modelopt(&self, w: &Nvfp4Weight) -> GpuNvfp4 {
        GpuNvfp4 {
            rows: w.rows,
            cols: w.cols,
            packed: self.upload(&w.packed),
            scales: self.upload(&w.scales),
            scale_2: w.scale_2,
            layout: Nvfp4Layout::ModelOpt,
        }
    }

    /// `scale ·` a bf16 weight from f32 values (rounded to nearest even; exact for BF16
    /// checkpoints and E4M3 codes).
    pub fn upload_bf16(&self, w: &[f32], rows: usize, cols: usize, scale: f32) -> GpuWeight {
        assert_eq!(w.len(), rows * cols, "upload_bf16 shape");
        let bits: Vec<u16> = w.iter().map(|&x| (fp4_format::dtype::round_bf16(x).to_bits() >> 16) as u16).collect();
        GpuWeight::Bf16 { w: self.upload(&bits), rows, cols, scale }
    }

    /// `y [t, rows] = x [t, cols] · Wᵀ`: GEMV kernels for up to [`GEMV_MAX_TOKENS`] tokens, else
    /// dequantize W (bf16, or f32 in exact mode) and run a cuBLAS GEMM with f32 accumulation
    /// (NVFP4's scale_2 as the GEMM's alpha).
    pub fn linear(&self, x: &DeviceBuf<f32>, t: usize, w: &GpuWeight) -> Result<DeviceBuf<f32>> {
        let (n, k) = (w.rows(), w.cols());
        assert!(x.len() >= t * k, "linear: x has {} elements, needs {t}×{k}", x.len());
        let exact = self.exact_gemm.load(Ordering::Relaxed);
        if let GpuWeight::Nvfp4(q) = w {
            if let Some(y) = self.nvfp4_small_batch(x, t, q)? {
                return Ok(y);
            }
        }
        // Small BF16 weights (the GDN's 32-row in_proj_b/a) stay on the row-block GEMV up to the
        // tensor-core GEMV's batch: through cuBLAS each took a conversion, a split-K GEMM and its
        // reduction (20 µs a layer at 32 tokens, H200), all for 256 KiB of weights.
        let small = n < ROWBLOCK_MAX_ROWS && t <= MMA_GEMV_MAX_TOKENS;
        let gemv_ok = (t <= GEMV_MAX_TOKENS || small) && k.is_multiple_of(8);
        if let (true, true, GpuWeight::Bf16 { w, scale, .. }) = (gemv_ok, small, w) {
            return Ok(self.bf16_rowblock(x, t, &[(w, *scale, n)])?.pop().expect("one output"));
        }
        let mut y = self.alloc::<f32>(t * n)?;
        if let (true, GpuWeight::Bf16 { w, scale, .. }) = (gemv_ok, w) {
            let (ni, ki) = (n as i32, k as i32);
            if t == 1 {
                launch!(self, bf16_gemv, gemv_cfg(n, t), w, scale, x, &mut y, &ni, &ki);
            } else {
                let (f, cfg) = self.bf16_gemv_batch(n, t);
                let ti = t as i32;
                launch!(self, fn f, cfg, w, scale, x, &mut y, &ni, &ki, &ti);
            }
            return Ok(y);
        }
        let (elems, bytes) = (n * k, n * k / 2);
        match (w, exact) {
            (GpuWeight::Nvfp4(q), false) => {
                let mut wd = self.alloc::<u16>(elems)?;
                // One thread per 16-weight block (k is a multiple of 16 in every NVFP4 weight).
                let blocks = elems / 16;
                let repacked = (q.layout == Nvfp4Layout::Repacked) as i32;
                launch!(self, nvfp4_dequant_bf16, flat(blocks), &q.packed, &q.scales, &mut wd, &blocks, &repacked);
                let xb = self.to_bf16(x, t * k)?;
                self.gemm(&xb, &wd, &mut y, t, n, k, q.scale_2, blas_sys::cudaDataType::CUDA_R_16BF)?;
            }
            (GpuWeight::Nvfp4(q), true) => {
                let mut wd = self.alloc::<f32>(elems)?;
                let (words, repacked) = (bytes / 4, (q.layout == Nvfp4Layout::Repacked) as i32);
                launch!(self, nvfp4_dequant_f32, flat(words), &q.packed, &q.scales, &mut wd, &words, &repacked);
                self.gemm(x, &wd, &mut y, t, n, k, q.scale_2, blas_sys::cudaDataType::CUDA_R_32F)?;
            }
            (GpuWeight::Bf16 { w, scale, .. }, false) => self.bf16_gemm_into(x, t, w, *scale, n, k, &mut y)?,
            (GpuWeight::Bf16 { w, scale, .. }, true) => {
                let mut wd = self.alloc::<f32>(elems)?;
                launch!(self, bf16_to_f32, flat(elems), w, &mut wd, &elems);
                self.gemm(x, &wd, &mut y, t, n, k, *scale, blas_sys::cudaDataType::CUDA_R_32F)?;
            }
        }
        Ok(y)
    }

    /// `y = scale · x · Wᵀ` on cuBLAS with x rounded to bf16 (bf16 weights past the GEMV's tokens).
    #[allow(clippy::too_many_arguments)]
    fn bf16_gemm_into(
        &self,
        x: &DeviceBuf<f32>,
        t: usize,
        w: &DeviceBuf<u16>,
        scale: f32,
        n: usize,
        k: usize,
        y: &mut DeviceBuf<f32>,
    ) -> Result<()> {
        let xb = self.to_bf16(x, t * k)?;
        self.gemm(&xb, w, y, t, n, k, scale, blas_sys::cudaDataType::CUDA_R_16BF)
    }

    /// The cuBLAS path of a bf16 weight at any token count (the LM-head sweep times it against
    /// the GEMV at 2–8 tokens; its activations are rounded to bf16, so its sums differ).
    pub fn bf16_gemm_sweep(&self, x: &DeviceBuf<f32>, t: usize, w: &GpuWeight) -> Result<DeviceBuf<f32>> {
        let GpuWeight::Bf16 { w, rows, cols, scale } = w else { panic!("bf16_gemm_sweep: a bf16 weight") };
        let mut y = self.alloc::<f32>(t * rows)?;
        self.bf16_gemm_into(x, t, w, *scale, *rows, *cols, &mut y)?;
        Ok(y)
    }

    /// `[y_b, y_a] = x · [W_b, W_a]ᵀ` for two small bf16 weights of one input (the GDN's
    /// in_proj_b and in_proj_a) in one launch, when the row-block GEMV takes both (each row's
    /// sum is the one [`Gpu::linear`] gives it alone); `None` otherwise.
    pub fn bf16_small_pair(
        &self,
        x: &DeviceBuf<f32>,
        t: usize,
        ws: [&GpuWeight; 2],
    ) -> Result<Option<[DeviceBuf<f32>; 2]>> {
        let k = ws[0].cols();
        fn small(w: &GpuWeight, k: usize) -> Option<(&DeviceBuf<u16>, f32, usize)> {
            match w {
                GpuWeight::Bf16 { w, rows, cols, scale } if *rows < ROWBLOCK_MAX_ROWS && *cols == k => {
                    Some((w, *scale, *rows))
                }
                _ => None,
            }
        }
        let (Some(b), Some(a)) = (small(ws[0], k), small(ws[1], k)) else { return Ok(None) };
        // Where [`Gpu::linear`] takes the row-block GEMV.
        if !(1..=MMA_GEMV_MAX_TOKENS).contains(&t) || !k.is_multiple_of(8) {
            return Ok(None);
        }
        assert!(x.len() >= t * k, "bf16_small_pair: x has {} elements, needs {t}×{k}", x.len());
        let [yb, ya]: [DeviceBuf<f32>; 2] = self.bf16_rowblock(x, t, &[b, a])?.try_into().expect("two outputs");
        Ok(Some([yb, ya]))
    }

    /// `bf16_gemv_rowblock_f32` over one or two `(weight, scale, rows)` of `x [t, k]`.
    fn bf16_rowblock(
        &self,
        x: &DeviceBuf<f32>,
        t: usize,
        ws: &[(&DeviceBuf<u16>, f32, usize)],
    ) -> Result<Vec<DeviceBuf<f32>>> {
        assert!((1..=2).contains(&ws.len()), "bf16_gemv_rowblock_f32 takes one or two weights");
        let n: usize = ws.iter().map(|w| w.2).sum();
        let k = ws[0].0.len() / ws[0].2;
        let mut ys = ws.iter().map(|w| self.alloc::<f32>(t * w.2)).collect::<Result<Vec<_>>>()?;
        let mut ptrs = Vec::new();
        let mut guards = Vec::new();
        for ((w, _, _), y) in ws.iter().zip(ys.iter_mut()) {
            let (wp, gw) = w.device_ptr(&self.stream);
            let (yp, gy) = y.device_ptr_mut(&self.stream);
            ptrs.push((wp, yp));
            guards.push((gw, gy));
        }
        // One weight: the second slot repeats the first with no rows (never read).
        let second = if ws.len() == 2 { (ptrs[1], ws[1].1, ws[1].2 as i32) } else { (ptrs[0], ws[0].1, 0) };
        let (n0, ki) = (ws[0].2 as i32, k as i32);
        let cfg = LaunchConfig {
            grid_dim: (n as u32, t as u32, 1),
            block_dim: (ROWBLOCK_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut b = self.stream.launch_builder(&self.k.bf16_gemv_rowblock);
        b.arg(&ptrs[0].0).arg(&ws[0].1).arg(&ptrs[0].1).arg(&n0);
        b.arg(&second.0 .0).arg(&second.1).arg(&second.0 .1).arg(&second.2);
        b.arg(x).arg(&ki);
        // SAFETY: bf16_gemv_rowblock_f32's signature; each weight holds rows × k bf16, each
        // output t × rows floats, x t × k (checked by the callers); the guards keep the
        // pointers' buffers ordered on this stream until the launch is queued.
        unsafe { b.launch(cfg) }?;
        drop(guards);
        Ok(ys)
    }

    /// The batched bf16 GEMV for `2 ≤ t ≤ GEMV_MAX_TOKENS` tokens over `n` rows (each weight
    /// read once for all tokens): `BF16_WIDE_ROWS` rows per warp where that still gives every SM
    /// four blocks, else one.
    fn bf16_gemv_batch(&self, n: usize, t: usize) -> (&CudaFunction, LaunchConfig) {
        debug_assert!((2..=GEMV_MAX_TOKENS).contains(&t));
        let per_block = GEMV_ROWS_PER_BLOCK as usize * geometry::BF16_WIDE_ROWS;
        let wide = n.div_ceil(per_block) >= 4 * self.sms as usize;
        let f = &self.k.bf16_gemv_batch[wide as usize][t.next_power_of_two().trailing_zeros() as usize - 1];
        (f, bf16_batch_cfg(n, if wide { geometry::BF16_WIDE_ROWS } else { 1 }))
    }

    /// The GEMV paths of an NVFP4 linear, when one applies: the tensor-core GEMV for up to
    /// [`MMA_GEMV_MAX_TOKENS`] tokens (`k % 32 == 0`), or in exact mode the f32 CUDA-core GEMV
    /// for up to [`GEMV_MAX_TOKENS`]. `None`: use a GEMM.
    pub(super) fn nvfp4_small_batch(
        &self,
        x: &DeviceBuf<f32>,
        t: usize,
        q: &GpuNvfp4,
    ) -> Result<Option<DeviceBuf<f32>>> {
        let k = q.cols;
        if self.mma_gemv_applies(t, q) {
            return self.nvfp4_mma_gemv(x, t, q).map(Some);
        }
        if t <= GEMV_MAX_TOKENS && k.is_multiple_of(8) {
            return self.nvfp4_gemv(x, t, q).map(Some);
        }
        Ok(None)
    }

    /// `y [t, n] = x [t, k] · Wᵀ` on the tensor cores (`t ≤ 64`, `k % 32 == 0`): x to f16 with a
    /// power-of-two scale per token (`f16_rowscaled`), then `nvfp4_mma_gemv_nt*`, one block per
    /// 16-row tile over the whole of K (see `kernels/gemv.cu`).
    pub fn nvfp4_mma_gemv(&self, x: &DeviceBuf<f32>, t: usize, q: &GpuNvfp4) -> Result<DeviceBuf<f32>> {
        let act = self.mma_activations(x, t, q.cols)?;
        self.nvfp4_mma_gemv_on(&act, q)
    }

    /// Whether an NVFP4 linear of `t` tokens runs on the tensor-core GEMV (in the current mode):
    /// up to 64 tokens in the repacked layout, up to 8 in ModelOpt's (W4A4 layers' decode).
    pub fn mma_gemv_applies(&self, t: usize, q: &GpuNvfp4) -> bool {
        let max = match q.layout {
            Nvfp4Layout::Repacked => MMA_GEMV_MAX_TOKENS,
            Nvfp4Layout::ModelOpt => MMA_MODELOPT_MAX_TOKENS,
        };
        !self.exact_gemm.load(Ordering::Relaxed) && (1..=max).contains(&t) && q.cols.is_multiple_of(32)
    }

    /// `x [t, k]` as the tensor-core GEMV reads it (`f16_rowscaled`): converted once, it serves
    /// every linear of that input (q/k/v, gate/up, the GDN input projections).
    pub fn mma_activations(&self, x: &DeviceBuf<f32>, t: usize, k: usize) -> Result<MmaActivations> {
        assert!(
            (1..=MMA_GEMV_MAX_TOKENS).contains(&t) && x.len() >= t * k && k.is_multiple_of(32),
            "nvfp4_mma_gemv: x [{t}, {k}]"
        );
        let (mut xh, mut inv) = (self.alloc::<u16>(t * k)?, self.alloc::<f32>(t)?);
        let ki = k as i32;
        let cfg = LaunchConfig { grid_dim: (t as u32, 1, 1), block_dim: (ROWSCALE_THREADS, 1, 1), shared_mem_bytes: 0 };
        launch!(self, f16_rowscaled, cfg, x, &mut xh, &mut inv, &ki);
        Ok(MmaActivations { xh, inv, t, k })
    }

    /// The tensor-core GEMV over converted activations (see [`Gpu::nvfp4_mma_gemv`]).
    pub fn nvfp4_mma_gemv_on(&self, a: &MmaActivations, q: &GpuNvfp4) -> Result<DeviceBuf<f32>> {
        Ok(self.nvfp4_mma_gemv_group(a, &[q])?.pop().expect("one output per weight"))
    }

    /// `y_i [t, n_i] = x · W_iᵀ` for weights of one input, up to [`MMA_GROUP_MAX`] per launch
    /// (the kernel's grid runs over the 16-row tiles of all of them).
    pub fn nvfp4_mma_gemv_group(&self, a: &MmaActivations, ws: &[&GpuNvfp4]) -> Result<Vec<DeviceBuf<f32>>> {
        self.gemv_group_res_on(Gemv::Auto, a, ws, &vec![None; ws.len()])
    }

    /// [`Gpu::nvfp4_mma_gemv_group`] through a given kernel (benchmarks and checks compare them).
    pub fn nvfp4_mma_gemv_group_with(
        &self,
        kernel: GemvKernel,
        a: &MmaActivations,
        ws: &[&GpuNvfp4],
    ) -> Result<Vec<DeviceBuf<f32>>> {
        self.gemv_group_res_on(Gemv::Kernel(kernel), a, ws, &vec![None; ws.len()])
    }

    /// `residual + x · Wᵀ` on the tensor-core GEMV, the add in its epilogue (a decoder layer's
    /// `h + down_proj(·)`): the same floats as the GEMV then [`Gpu::binary`]'s add.
    pub fn nvfp4_mma_gemv_add(
        &self,
        a: &MmaActivations,
        q: &GpuNvfp4,
        residual: &DeviceBuf<f32>,
    ) -> Result<DeviceBuf<f32>> {
        let mut ys = self.gemv_group_res_on(Gemv::Auto, a, &[q], &[Some(residual)])?;
        Ok(ys.pop().expect("one output per weight"))
    }

    /// The tensor-core GEMV for `t` tokens over `tiles` 16-row tiles. Up to 16 tokens the
    /// K-splitting kernel (up to 8 its deep-pipeline twin on weights of at most two tiles per
    /// SM: too few blocks to keep the memory system busy at depth 2); from 17 on the
    /// range-splitting one, except at 17-32 tokens on weights wide enough for two blocks of
    /// `ROWS_WARPS` tiles per SM (gate/up), where the row-splitting one is faster. All agree bit
    /// for bit (see `kernels/gemv.cu`). Measured by selftest ("gemv kernels", H200, 6181347):
    /// down at 32 tokens 40.7 µs split-K, 65.9 rows, 23.1 split-rows; gate/up 101.9, 43.5,
    /// 51.9; at 64 tokens split-rows is fastest on every 9B shape.
    pub fn gemv_kernel(&self, t: usize, tiles: usize) -> GemvKernel {
        let nt = t.div_ceil(8).next_power_of_two();
        let row_blocks = tiles.div_ceil(geometry::ROWS_WARPS);
        if nt == 1 && tiles <= 2 * self.sms as usize {
            GemvKernel::SplitKDeep
        } else if nt < 4 {
            GemvKernel::SplitK { nt }
        } else if nt == 4 && row_blocks >= 2 * self.sms as usize {
            GemvKernel::Rows { nt }
        } else {
            GemvKernel::SplitRows { nt }
        }
    }

    /// The function, warps per block, blocks along x and y of a launch of `t` tokens over
    /// `tiles` tiles, and for the range-splitting kernel the n-tiles its reduction takes.
    fn gemv_launch<'a>(
        &'a self,
        g: &Gemv<'a>,
        t: usize,
        tiles: usize,
        layout: Nvfp4Layout,
    ) -> (&'a CudaFunction, u32, (u32, u32), Option<usize>) {
        let kernel = match *g {
            Gemv::Fixed(f, warps) => return (f, warps, (tiles as u32, 1), None),
            Gemv::Auto if layout == Nvfp4Layout::ModelOpt => {
                assert!(t <= MMA_MODELOPT_MAX_TOKENS, "nvfp4_mma_gemv_nt1_modelopt takes up to 8 tokens");
                return (&self.k.nvfp4_mma_modelopt, MMA_WARPS, (tiles as u32, 1), None);
            }
            Gemv::Auto => self.gemv_kernel(t, tiles),
            Gemv::Kernel(k) => {
                assert_eq!(layout, Nvfp4Layout::Repacked, "{k:?} reads the repacked layout");
                k
            }
        };
        let row_blocks = tiles.div_ceil(geometry::ROWS_WARPS) as u32;
        let four_or_eight = |nt: usize| {
            assert!(nt == 4 || nt == 8, "{kernel:?}: the row-splitting GEMVs have 4 and 8 n-tiles");
            (nt == 8) as usize
        };
        match kernel {
            GemvKernel::SplitK { nt } => {
                (&self.k.nvfp4_mma[nt.trailing_zeros() as usize], MMA_WARPS, (tiles as u32, 1), None)
            }
            GemvKernel::SplitKDeep => {
                assert!(t <= 8, "nvfp4_mma_gemv_nt1_deep takes up to 8 tokens");
                (&self.k.nvfp4_mma_deep, MMA_WARPS, (tiles as u32, 1), None)
            }
            GemvKernel::Rows { nt } => {
                (&self.k.nvfp4_rows[four_or_eight(nt)], geometry::ROWS_WARPS as u32, (row_blocks, 1), None)
            }
            GemvKernel::SplitRows { nt } => {
                (&self.k.nvfp4_split[four_or_eight(nt)], geometry::ROWS_WARPS as u32, (row_blocks, MMA_WARPS), Some(nt))
            }
        }
    }

    /// Names of the GEMV geometry-sweep kernels (one n-tile: up to 8 tokens).
    pub fn gemv_sweep_names(&self) -> Vec<&'static str> {
        self.k.gemv_sweep.iter().map(|v| v.0).collect()
    }

    /// [`Gpu::nvfp4_mma_gemv_group`] through sweep kernel `i` (`a.t ≤ 8`) over weights in
    /// ModelOpt's layout (`ws`), or `tiled`, the same in the tiled layout (`nvfp4_tile`), for the
    /// kernels that read it.
    pub fn nvfp4_mma_gemv_sweep(
        &self,
        i: usize,
        a: &MmaActivations,
        ws: &[&GpuNvfp4],
        tiled: &[GpuNvfp4],
    ) -> Result<Vec<DeviceBuf<f32>>> {
        assert!(a.t <= 8, "the sweep kernels take one n-tile");
        assert!(ws.iter().all(|w| w.layout == Nvfp4Layout::ModelOpt), "the sweep kernels read ModelOpt's layout");
        let (_, warps, layout, f) = &self.k.gemv_sweep[i];
        if *layout == SweepLayout::Tiled {
            let refs: Vec<&GpuNvfp4> = tiled.iter().collect();
            return self.gemv_group_on(f, *warps, a, &refs);
        }
        self.gemv_group_on(f, *warps, a, ws)
    }

    /// The LM-head sweep's bf16 kernels: name and tokens (`bf16_gemv_sweep`'s `i`).
    pub fn bf16_sweep_kernels(&self) -> Vec<(&'static str, usize)> {
        self.k.bf16_sweep.iter().map(|v| (v.0, v.1)).collect()
    }

    /// `y [t, n] = x [t, k] · Wᵀ` (a bf16 weight) through LM-head sweep kernel `i` (its tokens:
    /// `t`; the same sums as the shipped batched GEMV).
    pub fn bf16_gemv_sweep(&self, i: usize, x: &DeviceBuf<f32>, w: &GpuWeight) -> Result<DeviceBuf<f32>> {
        let (name, t, r, f) = &self.k.bf16_sweep[i];
        let GpuWeight::Bf16 { w, rows, cols, scale } = w else { panic!("{name}: a bf16 weight") };
        assert!(x.len() >= t * cols && cols.is_multiple_of(8), "{name}: x [{t}, {cols}]");
        let mut y = self.alloc::<f32>(t * rows)?;
        let (ni, ki, ti) = (*rows as i32, *cols as i32, *t as i32);
        launch!(self, fn f, bf16_batch_cfg(*rows, *r), w, scale, x, &mut y, &ni, &ki, &ti);
        Ok(y)
    }

    /// `q` (ModelOpt's layout) in the GEMV's repacked layout, on the device; the rest as it was.
    pub fn nvfp4_repacked(&self, q: &GpuNvfp4) -> Result<GpuNvfp4> {
        assert_eq!(q.layout, Nvfp4Layout::ModelOpt, "nvfp4_repack: from ModelOpt's layout");
        let out = self.repack_codes(&q.packed)?;
        let (rows, cols, scale_2) = (q.rows, q.cols, q.scale_2);
        Ok(GpuNvfp4 { rows, cols, packed: out, scales: q.scales.clone(), scale_2, layout: Nvfp4Layout::Repacked })
    }

    /// `q` in the tiled layout of `kernels/gemv.cu` (same rows, cols, scale_2).
    pub fn nvfp4_tiled(&self, q: &GpuNvfp4) -> Result<GpuNvfp4> {
        let (tiles, chunks) = (q.rows.div_ceil(16), q.cols.div_ceil(geometry::MMA_CHUNK));
        let (mut wt, mut st) = (self.alloc::<u8>(tiles * chunks * 1024)?, self.alloc::<u8>(tiles * chunks * 128)?);
        assert_eq!(q.layout, Nvfp4Layout::ModelOpt, "nvfp4_tile: from ModelOpt's layout");
        let (ni, ki) = (q.rows as i32, q.cols as i32);
        launch!(self, nvfp4_tile, flat(tiles * chunks * 32), &q.packed, &q.scales, &mut wt, &mut st, &ni, &ki);
        // Tiled codes keep ModelOpt's order within each word (the sweep's tiled kernels read it).
        let layout = Nvfp4Layout::ModelOpt;
        Ok(GpuNvfp4 { rows: q.rows, cols: q.cols, packed: wt, scales: st, scale_2: q.scale_2, layout })
    }

    /// Converts `x [t, k]` for the tensor-core GEMV (timing the conversion alone).
    pub fn mma_activations_only(&self, x: &DeviceBuf<f32>, t: usize, k: usize) -> Result<()> {
        self.mma_activations(x, t, k).map(drop)
    }

    pub(super) fn gemv_group_on(
        &self,
        f: &CudaFunction,
        warps: u32,
        a: &MmaActivations,
        ws: &[&GpuNvfp4],
    ) -> Result<Vec<DeviceBuf<f32>>> {
        let none = vec![None; ws.len()];
        self.gemv_group_res_on(Gemv::Fixed(f, warps), a, ws, &none)
    }

    /// [`Gpu::gemv_group_on`] with `residuals[i]` (`[t, n_i]`) added to output i where given.
    pub(super) fn gemv_group_res_on(
        &self,
        gemv: Gemv<'_>,
        a: &MmaActivations,
        ws: &[&GpuNvfp4],
        residuals: &[Option<&DeviceBuf<f32>>],
    ) -> Result<Vec<DeviceBuf<f32>>> {
        let (k, t) = (a.k, a.t);
        assert_eq!(residuals.len(), ws.len(), "nvfp4_mma_gemv: one residual slot per weight");
        let mut ys = Vec::with_capacity(ws.len());
        for (group, res) in ws.chunks(MMA_GROUP_MAX).zip(residuals.chunks(MMA_GROUP_MAX)) {
            let mut args = GemvGroup::default();
            let mut outs: Vec<DeviceBuf<f32>> = Vec::with_capacity(group.len());
            for q in group {
                assert_eq!(q.cols, k, "nvfp4_mma_gemv: activations of width {k} for a weight of {} columns", q.cols);
                outs.push(self.alloc::<f32>(t * q.rows)?);
            }
            let mut guards = Vec::new();
            let mut res_guards = Vec::new();
            let mut tiles = 0;
            for (i, ((q, y), r)) in group.iter().zip(outs.iter_mut()).zip(res).enumerate() {
                let (w, gw) = q.packed.device_ptr(&self.stream);
                let (s, gs) = q.scales.device_ptr(&self.stream);
                let (yp, gy) = y.device_ptr_mut(&self.stream);
                guards.push((gw, gs, gy));
                if let Some(r) = r {
                    assert_eq!(r.len(), t * q.rows, "nvfp4_mma_gemv: residual of {} for [{t}, {}]", r.len(), q.rows);
                    let (rp, gr) = r.device_ptr(&self.stream);
                    res_guards.push(gr);
                    args.r[i] = rp;
                }
                tiles += q.rows.div_ceil(16) as i32;
                (args.w[i], args.s[i], args.y[i]) = (w, s, yp);
                (args.scale_2[i], args.n[i], args.tiles_end[i]) = (q.scale_2, q.rows as i32, tiles);
            }
            args.count = group.len() as i32;
            let layout = group[0].layout;
            assert!(group.iter().all(|q| q.layout == layout), "nvfp4_mma_gemv: one weight layout per launch");
            let (f, warps, (bx, by), split) = self.gemv_launch(&gemv, t, tiles as usize, layout);
            let cfg = LaunchConfig { grid_dim: (bx, by, 1), block_dim: (warps * 32, 1, 1), shared_mem_bytes: 0 };
            let (ki, ti) = (k as i32, t as i32);
            // The range-splitting kernel's chains: [range][tile][8·nt tokens][16 rows].
            let mut part = match split {
                Some(nt) => Some(self.alloc::<f32>(MMA_WARPS as usize * tiles as usize * 8 * nt * 16)?),
                None => None,
            };
            let mut b = self.stream.launch_builder(f);
            b.arg(&args).arg(&a.xh).arg(&a.inv).arg(&ki).arg(&ti);
            if let Some(p) = part.as_mut() {
                b.arg(p);
            }
            // SAFETY: the arguments follow nvfp4_mma_gemv_nt*'s (and nvfp4_mma_split_nt*'s, with
            // part sized as it indexes) signature; xh and inv hold t rows of k (checked when
            // converted), each weight is [n_i, k] with k % 32 == 0 (the pointers stay valid: the
            // weights outlive the launch), each output and residual t·n_i floats.
            unsafe { b.launch(cfg) }?;
            if let (Some(nt), Some(p)) = (split, part.as_ref()) {
                let cols = (8 * nt) as i32;
                let mut b = self.stream.launch_builder(&self.k.nvfp4_split_reduce);
                b.arg(&args).arg(p).arg(&a.inv).arg(&ti).arg(&cols);
                // SAFETY: nvfp4_mma_split_reduce's signature; part as written above, the outputs
                // and residuals of args as checked above.
                unsafe { b.launch(flat(tiles as usize * 16 * t)) }?;
            }
            drop(guards);
            drop(res_guards);
            ys.extend(outs);
        }
        Ok(ys)
    }

    /// `y [t, n] = x [t, k] · Wᵀ` by the NVFP4 GEMV (W4A16; a few tokens, `k % 8 == 0`).
    pub(super) fn nvfp4_gemv(&self, x: &DeviceBuf<f32>, t: usize, q: &GpuNvfp4) -> Result<DeviceBuf<f32>> {
        let (n, k) = (q.rows, q.cols);
        assert!(x.len() >= t * k && k.is_multiple_of(8), "nvfp4_gemv: x [{t}, {k}]");
        let mut y = self.alloc::<f32>(t * n)?;
        let (ni, ki) = (n as i32, k as i32);
        let repacked = (q.layout == Nvfp4Layout::Repacked) as i32;
        launch!(self, nvfp4_gemv, gemv_cfg(n, t), &q.packed, &q.scales, &q.scale_2, x, &mut y, &ni, &ki, &repacked);
        Ok(y)
    }

    /// `y [t, n] = x [t, k] · w [n, k]ᵀ` for an f32 weight (a tied LM head), cuBLAS f32.
    pub fn linear_f32(
        &self,
        x: &DeviceBuf<f32>,
        t: usize,
        w: &DeviceBuf<f32>,
        n: usize,
        k: usize,
    ) -> Result<DeviceBuf<f32>> {
        assert!(x.len() >= t * k && w.len() >= n * k, "linear_f32 shapes");
        let mut y = self.alloc::<f32>(t * n)?;
        self.gemm(x, w, &mut y, t, n, k, 1.0, blas_sys::cudaDataType::CUDA_R_32F)?;
        Ok(y)
    }

    pub(super) fn to_bf16(&self, x: &DeviceBuf<f32>, n: usize) -> Result<DeviceBuf<u16>> {
        let mut xb = self.alloc::<u16>(n)?;
        launch!(self, f32_to_bf16, flat(n.div_ceil(4)), x, &mut xb, &n);
        Ok(xb)
    }

    /// Row-major `y [t, n] = alpha · x [t, k] · w [n, k]ᵀ` with f32 output and accumulation: in
    /// cuBLAS's column-major terms `yᵀ [n, t] = wᵀᵀ · xᵀ` (A = w read transposed, lda = k).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn gemm<A: cudarc::driver::DeviceRepr, B: cudarc::driver::DeviceRepr>(
        &self,
        x: &DeviceBuf<A>,
        w: &DeviceBuf<B>,
        y: &mut DeviceBuf<f32>,
        t: usize,
        n: usize,
        k: usize,
        alpha: f32,
        dtype: blas_sys::cudaDataType,
    ) -> Result<()> {
        let beta = 0f32;
        let (xp, _gx) = x.device_ptr(&self.stream);
        let (wp, _gw) = w.device_ptr(&self.stream);
        let (yp, _gy) = y.device_ptr_mut(&self.stream);
        // SAFETY: pointers come from live buffers of at least t·k, n·k and t·n elements of the
        // declared types (checked by the callers); alpha/beta are host f32 as CUBLAS_COMPUTE_32F needs.
        unsafe {
            cudarc::cublas::result::gemm_ex(
                *self.blas.handle(),
                blas_sys::cublasOperation_t::CUBLAS_OP_T,
                blas_sys::cublasOperation_t::CUBLAS_OP_N,
                n as i32,
                t as i32,
                k as i32,
                (&alpha) as *const f32 as *const _,
                wp as *const _,
                dtype,
                k as i32,
                xp as *const _,
                dtype,
                k as i32,
                (&beta) as *const f32 as *const _,
                yp as *mut _,
                blas_sys::cudaDataType::CUDA_R_32F,
                n as i32,
                blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )?;
        }
        Ok(())
    }
}

/// Which tensor-core GEMV runs a launch (`kernels/gemv.cu`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GemvKernel {
    /// `nvfp4_mma_gemv_nt*` (`nt` n-tiles of 8 tokens): a block per 16-row tile, its warps
    /// splitting K.
    SplitK { nt: usize },
    /// `nvfp4_mma_gemv_nt1_deep` (up to 8 tokens): `SplitK { nt: 1 }` with twice the chunks in
    /// flight per warp, for weights of too few tiles to fill the GPU (bit-identical to it).
    SplitKDeep,
    /// `nvfp4_mma_rows_nt*` (`nt` 4 or 8): a warp per 16-row tile over all of K, the block's
    /// activations staged in shared memory.
    Rows { nt: usize },
    /// `nvfp4_mma_split_nt*` (`nt` 4 or 8) then `nvfp4_mma_split_reduce`: the row-splitting
    /// kernel over one of the K-splitting kernel's ranges per block, the ranges added after.
    SplitRows { nt: usize },
}

/// A GEMV launch's kernel: chosen by size, a named one, or one loaded function (the sweep).
pub(super) enum Gemv<'a> {
    Auto,
    Kernel(GemvKernel),
    Fixed(&'a CudaFunction, u32),
}

/// The batched bf16 GEMV's grid over `n` rows: warps of `rows_per_warp` rows,
/// `GEMV_ROWS_PER_BLOCK` warps a block.
fn bf16_batch_cfg(n: usize, rows_per_warp: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (n.div_ceil(GEMV_ROWS_PER_BLOCK as usize * rows_per_warp) as u32, 1, 1),
        block_dim: (32, GEMV_ROWS_PER_BLOCK, 1),
        shared_mem_bytes: 0,
    }
}
