// NVFP4 element decoding shared by the GEMV and dequantization kernels.
#pragma once
#include <stdint.h>

// E2M1 → f32 without a table (a local-memory table costs 30x): the 3 magnitude bits placed at
// f32 bits 24..22 read as 2^(e-127)·(1+m/2) (or the subnormal m·2^-127 for e = 0), so × 2^126
// gives the E2M1 value exactly; bit 3 is the sign.
__device__ __forceinline__ float e2m1(uint32_t code) {
    return __uint_as_float(((code & 7u) << 22) | ((code & 8u) << 28)) * 0x1p126f;
}

// The GEMV weight layout (fp4_format::nvfp4::gemv_repack, the Rust twin of these tables): within
// each 32-bit word of 8 codes (ModelOpt: code c at bits 4c..4c+3, sign bit 3), code c's 3
// magnitude bits start at REPACK_MAG_AT[c] and its sign sits at REPACK_SIGN_AT[c], placed so that
// the tensor-core GEMV turns a word into four f16x2 pairs with 11 instructions instead of 16
// (gemv.cu, e2m1x8_repacked_to_f16x2). Every W4A16 NVFP4 weight on the GPU is held this way;
// W4A4 weights keep ModelOpt's layout (the block-scaled MMA reads it as it is).
__device__ __constant__ const int REPACK_MAG_AT[8] = {2, 5, 9, 12, 18, 21, 25, 28};
__device__ __constant__ const int REPACK_SIGN_AT[8] = {8, 0, 15, 1, 24, 16, 31, 17};

// Code c (0..7, ModelOpt's order) of a word in either layout.
__device__ __forceinline__ uint32_t code_of(uint32_t q, int c, bool repacked) {
    if (!repacked) return (q >> (4 * c)) & 15u;
    return ((q >> REPACK_MAG_AT[c]) & 7u) | (((q >> REPACK_SIGN_AT[c]) & 1u) << 3);
}

// E4M3 (fn) → f32: bias 7, 3 mantissa bits, subnormals m·2^-9. Block scales are never NaN.
__device__ __forceinline__ float e4m3(uint32_t b) {
    uint32_t e = (b >> 3) & 15u, m = b & 7u;
    float v = e == 0 ? (float)m * 0x1p-9f : __uint_as_float(((e + 120u) << 23) | (m << 20));
    return (b & 128u) ? -v : v;
}

// Nearest E4M3 (fn) code of a finite x ≥ 0, ties to even, saturating at 448 (0x7E): the same
// rounding as fp4_format::nvfp4::e4m3_encode.
__device__ __forceinline__ uint32_t e4m3_encode_pos(float x) {
    if (x < 0x1p-6f) return (uint32_t)rintf(x * 512.0f);  // subnormals (and 0x08, the first normal)
    uint32_t u = __float_as_uint(x);
    uint32_t e = (u >> 23) - 127u + 7u, m = u & 0x7fffffu;
    uint32_t code = (e << 3) + ((m + 0x7ffffu + ((m >> 20) & 1u)) >> 20);  // a mantissa carry bumps e
    return code > 0x7eu ? 0x7eu : code;
}

// Nearest E2M1 code of x (|x| ≤ 6 after clamping), ties to even; sign bit for x < 0. As
// fp4_format::nvfp4::e2m1_encode.
__device__ __forceinline__ uint32_t e2m1_encode(float x) {
    float a = fabsf(x);
    uint32_t c = (a > 0.25f) + (a > 0.75f) + (a > 1.25f) + (a > 1.75f) + (a > 2.5f) + (a > 3.5f) + (a > 5.0f);
    c += (a == 0.75f) | (a == 1.75f) | (a == 3.5f);
    return c | (x < 0.f ? 8u : 0u);
}

// bf16 bits → f32 (exact).
__device__ __forceinline__ float bf16(uint32_t b) { return __uint_as_float(b << 16); }

// f32 → bf16 bits, round to nearest even (inputs are finite activations or weights).
__device__ __forceinline__ uint16_t to_bf16(float f) {
    uint32_t u = __float_as_uint(f);
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}
