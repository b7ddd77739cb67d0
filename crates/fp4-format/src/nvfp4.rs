//! NVFP4 and FP8 numerics exactly as NVIDIA ModelOpt computes them (reference/nvfp4.md §1):
//! E2M1 elements (sign in bit 3) with round-to-nearest-even and saturation, E4M3 block scales per
//! 16 elements, an f32 per-tensor `weight_scale_2 = amax · f32(1/2688)`, two elements per byte
//! with the even element in the low nibble.

/// Elements per block scale.
pub const BLOCK: usize = 16;
/// Largest E2M1 magnitude.
pub const E2M1_MAX: f32 = 6.0;
/// Largest finite E4M3 (fn) value.
pub const E4M3_MAX: f32 = 448.0;
/// Smallest E4M3 subnormal; ModelOpt clamps block scales up to it.
pub const E4M3_MIN_SUBNORMAL: f32 = 1.0 / 512.0;

/// Value of each E2M1 code (bit 3 = sign).
pub const E2M1_VALUES: [f32; 16] =
    [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0];

/// Nearest E2M1 code (ties to the even code, saturating at ±6). The sign bit is set for every
/// negative input, also when it rounds to zero (ModelOpt writes −0 as code 8).
#[inline]
pub fn e2m1_encode(x: f32) -> u8 {
    const BOUNDS: [f32; 7] = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0];
    let a = x.abs();
    // Index of the first bound >= a (torch.searchsorted, left), then ties that round up.
    let mut code = BOUNDS.iter().filter(|&&b| a > b).count() as u8;
    if a == 0.75 || a == 1.75 || a == 3.5 {
        code += 1;
    }
    code | if x < 0.0 { 8 } else { 0 }
}

#[inline]
pub fn e2m1_decode(code: u8) -> f32 {
    E2M1_VALUES[(code & 0xF) as usize]
}

/// Nearest E4M3 (fn variant) byte, ties to even, for finite `x` in [−448, 448]; larger
/// magnitudes saturate to ±448 (callers clamp first, as ModelOpt does), NaN maps to 0x7F.
pub fn e4m3_encode(x: f32) -> u8 {
    if x.is_nan() {
        return 0x7F;
    }
    let sign = if x.is_sign_negative() { 0x80 } else { 0 };
    let a = (x.abs() as f64).min(E4M3_MAX as f64);
    let min_normal = 2f64.powi(-6);
    let bits = if a < min_normal {
        // Subnormals: multiples of 2^-9; 8·2^-9 is the smallest normal (code 0x08).
        rne(a * 512.0) as u8
    } else {
        let mut e = a.log2().floor() as i32;
        // Guard log2 rounding at exact powers of two.
        if 2f64.powi(e) > a {
            e -= 1;
        } else if 2f64.powi(e + 1) <= a {
            e += 1;
        }
        let mut m = rne((a / 2f64.powi(e) - 1.0) * 8.0) as i32;
        if m == 8 {
            m = 0;
            e += 1;
        }
        (((e + 7) << 3) | m) as u8
    };
    sign | bits.min(0x7E)
}

/// Round half to even.
#[inline]
fn rne(v: f64) -> f64 {
    let r = v.round();
    if (v - v.trunc()).abs() == 0.5 && r % 2.0 != 0.0 {
        r - v.signum()
    } else {
        r
    }
}

/// Value of an E4M3 (fn) byte; 0x7F and 0xFF are NaN.
pub fn e4m3_decode(b: u8) -> f32 {
    let sign = if b & 0x80 != 0 { -1.0 } else { 1.0 };
    let e = ((b >> 3) & 0xF) as i32;
    let m = (b & 7) as f32;
    if e == 0xF && m == 7.0 {
        return f32::NAN;
    }
    let mag = if e == 0 { m / 8.0 * 2f32.powi(-6) } else { (1.0 + m / 8.0) * 2f32.powi(e - 7) };
    sign * mag
}

/// `weight_scale_2` (and any NVFP4 per-tensor scale) from an amax: multiplied by the f32
/// reciprocal of 6·448, as ModelOpt does (a plain division differs in the last bit).
#[inline]
pub fn nvfp4_global_scale(amax: f32) -> f32 {
    amax * (1.0f32 / (E2M1_MAX * E4M3_MAX))
}

/// Max |x|.
pub fn amax(x: &[f32]) -> f32 {
    x.iter().fold(0f32, |m, v| m.max(v.abs()))
}

/// A weight quantized to NVFP4 in ModelOpt's export layout.
#[derive(Debug, Clone, PartialEq)]
pub struct Nvfp4Weight {
    pub rows: usize,
    pub cols: usize,
    /// `[rows, cols/2]`, element 2i in the low nibble.
    pub packed: Vec<u8>,
    /// E4M3 `[rows, cols/16]`.
    pub scales: Vec<u8>,
    /// f32 per-tensor scale.
    pub scale_2: f32,
}

/// The E4M3 block scale for a block with max `block_amax` under `scale_2`: zero blocks get 1.0,
/// others are clamped to [2^-9, 448] before rounding.
#[inline]
pub fn block_scale(block_amax: f32, scale_2: f32) -> u8 {
    let mut s = block_amax / (E2M1_MAX * scale_2);
    if s == 0.0 {
        s = 1.0;
    }
    e4m3_encode(s.clamp(E4M3_MIN_SUBNORMAL, E4M3_MAX))
}

impl Nvfp4Weight {
    /// Quantizes a row-major `[rows, cols]` weight with the given per-tensor scale (computed from
    /// the amax of the weight or of its whole fused group). `cols` must be a multiple of 16.
    pub fn quantize(w: &[f32], rows: usize, cols: usize, scale_2: f32) -> Nvfp4Weight {
        assert!(cols.is_multiple_of(BLOCK) && w.len() == rows * cols, "NVFP4 needs cols % 16 == 0 ({rows}x{cols})");
        let mut packed = vec![0u8; rows * cols / 2];
        let mut scales = vec![0u8; rows * cols / BLOCK];
        for (b, block) in w.chunks_exact(BLOCK).enumerate() {
            let sb = block_scale(amax(block), scale_2);
            scales[b] = sb;
            let div = e4m3_decode(sb) * scale_2;
            for (j, pair) in block.chunks_exact(2).enumerate() {
                let lo = e2m1_encode(pair[0] / div);
                let hi = e2m1_encode(pair[1] / div);
                packed[b * BLOCK / 2 + j] = lo | (hi << 4);
            }
        }
        Nvfp4Weight { rows, cols, packed, scales, scale_2 }
    }

    /// `e2m1(code) · e4m3(scale) · scale_2`, row-major `[rows, cols]`.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = Vec::with_capacity(self.rows * self.cols);
        for (b, &sb) in self.scales.iter().enumerate() {
            let s = e4m3_decode(sb) * self.scale_2;
            for &byte in &self.packed[b * BLOCK / 2..(b + 1) * BLOCK / 2] {
                out.push(e2m1_decode(byte & 0xF) * s);
                out.push(e2m1_decode(byte >> 4) * s);
            }
        }
        out
    }
}

/// Activations quantized to NVFP4 as Blackwell W4A4 kernels do it (vLLM/TRT-LLM
/// `cvt_warp_fp16_to_fp4`, and vLLM's `ref_nvfp4_quant` emulation): with `g = 1/input_scale`,
/// per 16 elements `sf = e4m3(min(g·(blockmax·(1/6)), 448))`, elements scaled by the reciprocal
/// `1/(sf·(1/g))`, clamped to ±6 and rounded to E2M1. Kernels multiply by reciprocals where a
/// plain reference would divide; on bf16 inputs, which often sit exactly on E2M1 ties, that choice
/// decides how ties round, so this follows the kernels. The layout is the weights' (ModelOpt's):
/// the GPU's `nvfp4_quantize_act` writes the same bytes and its W4A4 GEMM reads them as they are.
#[derive(Debug, Clone, PartialEq)]
pub struct Nvfp4Activations {
    pub rows: usize,
    pub cols: usize,
    /// `[rows, cols/2]`, element 2i in the low nibble.
    pub packed: Vec<u8>,
    /// E4M3 `[rows, cols/16]`.
    pub scales: Vec<u8>,
    /// `g = 1/input_scale`: a value is `e2m1(code) · e4m3(scale) / g`.
    pub g: f32,
}

/// One 16-element activation block under `g = 1/input_scale`: its E4M3 scale and 16 E2M1 codes.
fn quantize_act_block(block: &[f32], g: f32) -> (u8, [u8; BLOCK]) {
    let inv_g = 1.0 / g;
    let sf = e4m3_encode((g * (amax(block) * (1.0f32 / E2M1_MAX))).min(E4M3_MAX));
    let sfv = e4m3_decode(sf);
    let out_scale = if sfv == 0.0 { 0.0 } else { 1.0 / (sfv * inv_g) };
    let mut codes = [0u8; BLOCK];
    for (c, &v) in codes.iter_mut().zip(block) {
        *c = e2m1_encode((v * out_scale).clamp(-E2M1_MAX, E2M1_MAX));
    }
    (sf, codes)
}

impl Nvfp4Activations {
    /// Quantizes row-major `x [rows, cols]` (`cols` a multiple of 16) under `input_scale`.
    pub fn quantize(x: &[f32], cols: usize, input_scale: f32) -> Nvfp4Activations {
        assert!(cols.is_multiple_of(BLOCK) && x.len().is_multiple_of(cols), "NVFP4 activations need cols % 16 == 0");
        let g = 1.0 / input_scale;
        let mut packed = vec![0u8; x.len() / 2];
        let mut scales = vec![0u8; x.len() / BLOCK];
        for (b, block) in x.chunks_exact(BLOCK).enumerate() {
            let (sf, codes) = quantize_act_block(block, g);
            scales[b] = sf;
            for (j, pair) in codes.chunks_exact(2).enumerate() {
                packed[b * BLOCK / 2 + j] = pair[0] | (pair[1] << 4);
            }
        }
        Nvfp4Activations { rows: x.len() / cols, cols, packed, scales, g }
    }

    /// `e2m1(code) · (e4m3(scale) / g)`, row-major `[rows, cols]`.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = Vec::with_capacity(self.rows * self.cols);
        for (b, &sf) in self.scales.iter().enumerate() {
            let deq = e4m3_decode(sf) / self.g;
            for &byte in &self.packed[b * BLOCK / 2..(b + 1) * BLOCK / 2] {
                out.push(e2m1_decode(byte & 0xF) * deq);
                out.push(e2m1_decode(byte >> 4) * deq);
            }
        }
        out
    }
}

/// Activation fake-quantization (W4A4 emulation), in place: `x` (a multiple of 16 long) replaced
/// by its NVFP4 quantize-dequantize under `input_scale`, value for value what
/// [`Nvfp4Activations::quantize`] then `dequantize` give.
pub fn fake_quantize_activations(x: &mut [f32], input_scale: f32) {
    assert!(x.len().is_multiple_of(BLOCK), "NVFP4 activations need a multiple of 16 elements");
    let g = 1.0 / input_scale;
    for block in x.chunks_exact_mut(BLOCK) {
        let (sf, codes) = quantize_act_block(block, g);
        let deq = e4m3_decode(sf) / g;
        for (v, &c) in block.iter_mut().zip(&codes) {
            *v = e2m1_decode(c) * deq;
        }
    }
}

/// `y [t, n] = A_q · W_qᵀ` computed as block-scaled FP4 tensor cores do (the CPU emulation of the
/// GPU's W4A4 GEMM): per 16-element block the exact sum of E2M1 products times the two E4M3
/// scales, accumulated in f32 in K order, then `· scale_2 / g`.
pub fn w4a4_matmul<'a>(a: &'a Nvfp4Activations, w: &'a Nvfp4Weight) -> Vec<f32> {
    assert_eq!(a.cols, w.cols, "w4a4_matmul: K differs");
    let (blocks, alpha) = (a.cols / BLOCK, w.scale_2 / a.g);
    let mut y = vec![0f32; a.rows * w.rows];
    for (r, yr) in y.chunks_mut(w.rows).enumerate() {
        for (c, out) in yr.iter_mut().enumerate() {
            let mut acc = 0f32;
            for b in 0..blocks {
                let (ab, wb) = (r * blocks + b, c * blocks + b);
                let codes = |p: &'a [u8], blk: usize| &p[blk * BLOCK / 2..(blk + 1) * BLOCK / 2];
                let mut s = 0f32; // exact: multiples of 1/4 below 2^10
                for (x, v) in codes(&a.packed, ab).iter().zip(codes(&w.packed, wb)) {
                    s += e2m1_decode(x & 0xF) * e2m1_decode(v & 0xF) + e2m1_decode(x >> 4) * e2m1_decode(v >> 4);
                }
                acc += s * (e4m3_decode(a.scales[ab]) * e4m3_decode(w.scales[wb]));
            }
            *out = acc * alpha;
        }
    }
    y
}

/// A weight quantized to FP8 E4M3 with one f32 per-tensor scale (`amax/448`).
#[derive(Debug, Clone, PartialEq)]
pub struct Fp8Weight {
    pub codes: Vec<u8>,
    pub scale: f32,
}

impl Fp8Weight {
    pub fn quantize(w: &[f32]) -> Fp8Weight {
        let mut scale = amax(w) / E4M3_MAX;
        if scale == 0.0 {
            scale = 1.0;
        }
        Fp8Weight { codes: w.iter().map(|&v| e4m3_encode((v / scale).clamp(-E4M3_MAX, E4M3_MAX))).collect(), scale }
    }

    pub fn dequantize(&self) -> Vec<f32> {
        self.codes.iter().map(|&c| e4m3_decode(c) * self.scale).collect()
    }
}

/// Where the GPU's W4A16 layout puts code c (0..7, ModelOpt's order) of each 32-bit word of 8
/// codes: the lowest of its 3 magnitude bits, and its sign bit (`kernels/nvfp4.cuh` holds the same
/// tables). Chosen so that the tensor-core GEMV decodes a word into four f16x2 pairs (code i in
/// the low half, code i + 4 in the high one: sign at bit 15/31, magnitude at 9..11/25..27) with
/// 11 instructions instead of the 16 that ModelOpt's nibbles need.
pub const GEMV_MAG_AT: [u32; 8] = [2, 5, 9, 12, 18, 21, 25, 28];
pub const GEMV_SIGN_AT: [u32; 8] = [8, 0, 15, 1, 24, 16, 31, 17];

/// ModelOpt's packed codes (`[rows, cols/2]`, code 2i in the low nibble of byte i) in the GPU's
/// W4A16 layout: each little-endian 32-bit word's 8 codes moved to [`GEMV_MAG_AT`] /
/// [`GEMV_SIGN_AT`]. `packed.len()` is a multiple of 4 (NVFP4 rows are multiples of 16 codes).
pub fn gemv_repack(packed: &[u8]) -> Vec<u8> {
    assert!(packed.len().is_multiple_of(4), "gemv_repack: whole 8-code words");
    let mut out = Vec::with_capacity(packed.len());
    for w in packed.chunks_exact(4) {
        let q = u32::from_le_bytes([w[0], w[1], w[2], w[3]]);
        let mut r = 0u32;
        for c in 0..8 {
            let v = (q >> (4 * c)) & 15;
            r |= ((v & 7) << GEMV_MAG_AT[c]) | ((v >> 3) << GEMV_SIGN_AT[c]);
        }
        out.extend_from_slice(&r.to_le_bytes());
    }
    out
}

/// Code c (0..7) of a word in [`gemv_repack`]'s layout.
pub fn gemv_code(word: u32, c: usize) -> u8 {
    (((word >> GEMV_MAG_AT[c]) & 7) | (((word >> GEMV_SIGN_AT[c]) & 1) << 3)) as u8
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e2m1_codes_round_trip_and_boundaries() {
        for code in 0..16u8 {
            let v = e2m1_decode(code);
            // −0.0 is not < 0, so it encodes as +0 (as torch computes the sign bit).
            let want = if code == 8 { 0 } else { code };
            assert_eq!(e2m1_encode(v), want, "code {code} value {v}");
        }
        // Every midpoint: ties go to the even code; just above/below go to the neighbours.
        let grid = [0.0f32, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0];
        for i in 0..7 {
            let mid = (grid[i] + grid[i + 1]) / 2.0;
            let even = if i % 2 == 0 { i } else { i + 1 } as u8;
            assert_eq!(e2m1_encode(mid), even, "tie at {mid}");
            assert_eq!(e2m1_encode(mid.next_up()), i as u8 + 1, "above {mid}");
            assert_eq!(e2m1_encode(mid.next_down()), i as u8, "below {mid}");
            assert_eq!(e2m1_encode(-mid), even | 8, "negative tie at {mid}");
        }
        assert_eq!(e2m1_encode(100.0), 7);
        assert_eq!(e2m1_encode(-7.0), 15);
        assert_eq!(e2m1_encode(-0.1), 8, "negative values that round to 0 keep the sign");
    }

    /// E4M3: every finite code round-trips, every midpoint between neighbours rounds to the even
    /// code, and values just off the midpoint round to the nearer one.
    #[test]
    fn e4m3_exhaustive() {
        let finite: Vec<u8> = (0u8..=0x7E).collect();
        for &c in &finite {
            assert_eq!(e4m3_encode(e4m3_decode(c)), c, "code {c:#x}");
            assert_eq!(e4m3_encode(-e4m3_decode(c)), c | 0x80, "code -{c:#x}");
        }
        for w in finite.windows(2) {
            let (lo, hi) = (e4m3_decode(w[0]), e4m3_decode(w[1]));
            let mid = (lo + hi) / 2.0;
            let even = if w[0] % 2 == 0 { w[0] } else { w[1] };
            assert_eq!(e4m3_encode(mid), even, "tie between {lo} and {hi}");
            assert_eq!(e4m3_encode(mid.next_up()), w[1]);
            assert_eq!(e4m3_encode(mid.next_down()), w[0]);
        }
        assert_eq!(e4m3_decode(0x38), 1.0);
        assert_eq!(e4m3_decode(0x7E), 448.0);
        assert_eq!(e4m3_decode(0x01), 1.0 / 512.0);
        assert!(e4m3_decode(0x7F).is_nan() && e4m3_decode(0xFF).is_nan());
        assert_eq!(e4m3_encode(1000.0), 0x7E, "saturates");
    }

    #[test]
    fn nvfp4_block_quantization() {
        // One row, two blocks: outliers, and an all-zero block (scale 1.0, codes 0).
        let mut w: Vec<f32> = (0..16).map(|i| (i as f32 - 7.5) * 0.37).collect();
        w[3] = 9.0;
        w.extend([0.0f32; 16]);
        let s2 = nvfp4_global_scale(amax(&w));
        let q = Nvfp4Weight::quantize(&w, 1, 32, s2);
        assert_eq!(q.scales[1], 0x38, "zero block gets scale 1.0");
        assert!(q.packed[8..].iter().all(|&b| b == 0));
        // The block max maps to code 7 (6.0) and the dequantized block is within a step of the input.
        let d = q.dequantize();
        assert_eq!(q.packed[1] >> 4, 7, "element 3 is the high nibble of byte 1");
        let step = e4m3_decode(q.scales[0]) * s2;
        for (x, y) in w[..16].iter().zip(&d[..16]) {
            assert!((x - y).abs() <= step * 1.0 + 1e-6, "{x} vs {y}");
        }
        assert_eq!(q.packed.len(), 16);
        assert_eq!(q.packed[0] & 0xF, e2m1_encode(w[0] / step), "even element in the low nibble");
        assert_eq!(q.packed[0] >> 4, e2m1_encode(w[1] / step));
        // scale_2 multiplies by the f32 reciprocal.
        assert_eq!(nvfp4_global_scale(2688.0), 2688.0 * (1.0f32 / 2688.0));
    }

    #[test]
    fn tiny_blocks_clamp_to_the_smallest_subnormal() {
        let mut w = vec![1e-7f32; 16];
        w.extend(vec![1000.0f32; 16]);
        let q = Nvfp4Weight::quantize(&w, 1, 32, nvfp4_global_scale(1000.0));
        assert_eq!(q.scales[0], 0x01);
        assert_eq!(q.scales[1], e4m3_encode(448.0));
    }

    #[test]
    fn activation_fake_quant_matches_the_kernel_formula() {
        let mut x: Vec<f32> = (0..32).map(|i| ((i * 37 % 17) as f32 - 8.0) * 0.3).collect();
        let orig = x.clone();
        let input_scale = nvfp4_global_scale(amax(&x));
        fake_quantize_activations(&mut x, input_scale);
        let g = 1.0 / input_scale;
        for (b, block) in orig.chunks(16).enumerate() {
            let sf = e4m3_decode(e4m3_encode(g * (amax(block) * (1.0 / 6.0))));
            for (j, v) in block.iter().enumerate() {
                let code = e2m1_encode((v * (1.0 / (sf * (1.0 / g)))).clamp(-6.0, 6.0));
                assert_eq!(x[b * 16 + j], e2m1_decode(code) * (sf / g));
                // Within one E2M1 step of the input (the block max maps to ±6 or less).
                assert!((x[b * 16 + j] - v).abs() <= sf / g + 1e-6);
            }
        }
        let mut zeros = vec![0f32; 16];
        fake_quantize_activations(&mut zeros, 1.0);
        assert!(zeros.iter().all(|&v| v == 0.0));
    }

    /// The tensor-core emulation (block sums × scale pairs) equals the plain product of the two
    /// dequantized operands, on random non-zero data with a spread of block magnitudes and a K that
    /// is not a multiple of 64.
    #[test]
    fn w4a4_matmul_equals_the_dequantized_product() {
        let (t, n, k) = (5, 7, 80);
        let mut state = 0x9e3779b97f4a7c15u64;
        let mut rnd = |i: usize| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let u = (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
            u * (1.0 + (i % 7) as f32) // block magnitudes vary by 7x
        };
        let x: Vec<f32> = (0..t * k).map(|i| rnd(i / 16)).collect();
        let w: Vec<f32> = (0..n * k).map(|i| rnd(i / 16) * 0.1).collect();
        let a = Nvfp4Activations::quantize(&x, k, nvfp4_global_scale(amax(&x)));
        let q = Nvfp4Weight::quantize(&w, n, k, nvfp4_global_scale(amax(&w)));
        let mut fq = x.clone();
        fake_quantize_activations(&mut fq, 1.0 / a.g);
        assert_eq!(a.dequantize(), fq, "packed activations dequantize to the fake-quantized ones");
        let (ad, wd) = (a.dequantize(), q.dequantize());
        let y = w4a4_matmul(&a, &q);
        let scale = y.iter().fold(0f32, |m, v| m.max(v.abs()));
        assert!(scale > 0.0);
        for r in 0..t {
            for c in 0..n {
                let want: f64 = (0..k).map(|i| ad[r * k + i] as f64 * wd[c * k + i] as f64).sum();
                let got = y[r * n + c] as f64;
                assert!((got - want).abs() <= 1e-6 * scale as f64, "({r},{c}): {got} vs {want}");
            }
        }
    }

    #[test]
    fn fp8_weights() {
        let w = [0.5f32, -2.0, 3.0, 0.0];
        let q = Fp8Weight::quantize(&w);
        assert_eq!(q.scale, 3.0 / 448.0);
        assert_eq!(q.codes[2], 0x7E);
        let d = q.dequantize();
        assert!(w.iter().zip(&d).all(|(a, b)| (a - b).abs() <= a.abs() * 0.07));
    }

    #[test]
    fn gemv_repack_moves_every_code_and_its_f16_pairs_decode_with_shifts_and_masks() {
        // Every code value in every slot, and a spread of words.
        let mut words: Vec<u32> = (0..16u32).map(|v| v * 0x1111_1111).collect();
        let mut x = 0x9e37_79b9u32;
        for _ in 0..4096 {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            words.push(x);
        }
        let packed: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
        let repacked = gemv_repack(&packed);
        assert_eq!(repacked.len(), packed.len());
        for (q, r) in words.iter().zip(repacked.chunks_exact(4)) {
            let r = u32::from_le_bytes([r[0], r[1], r[2], r[3]]);
            for c in 0..8 {
                assert_eq!(gemv_code(r, c), ((q >> (4 * c)) & 15) as u8, "word {q:#010x} code {c}");
            }
            // The GEMV's decode (kernels/gemv.cu, e2m1x8_repacked_to_f16x2) equals ModelOpt's
            // (e2m1x8_to_f16x2): pairs (3,7) (2,6) (1,5) (0,4), each e2m1 · 2^-14 as f16.
            let (mag, sign) = (0x0E00_0E00u32, 0x8000_8000u32);
            let new = [
                ((r >> 3) & mag) | ((r << 14) & sign),
                r & (mag | sign),
                ((r << 4) & mag) | ((r << 15) & sign),
                (r << 7) & (mag | sign),
            ];
            let mut old = [0u32; 4];
            let mut s = *q;
            for o in old.iter_mut() {
                *o = (s & sign) | ((s & 0x7000_7000) >> 3);
                s <<= 4;
            }
            assert_eq!(new, old, "word {q:#010x}");
        }
    }
}
