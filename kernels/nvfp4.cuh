// NVFP4 element decoding shared by the GEMV and dequantization kernels.
#pragma once
#include <stdint.h>

// E2M1 → f32 without a table (a local-memory table costs 30x): the 3 magnitude bits placed at
// f32 bits 24..22 read as 2^(e-127)·(1+m/2) (or the subnormal m·2^-127 for e = 0), so × 2^126
// gives the E2M1 value exactly; bit 3 is the sign.
__device__ __forceinline__ float e2m1(uint32_t code) {
    return __uint_as_float(((code & 7u) << 22) | ((code & 8u) << 28)) * 0x1p126f;
}

// E4M3 (fn) → f32: bias 7, 3 mantissa bits, subnormals m·2^-9. Block scales are never NaN.
__device__ __forceinline__ float e4m3(uint32_t b) {
    uint32_t e = (b >> 3) & 15u, m = b & 7u;
    float v = e == 0 ? (float)m * 0x1p-9f : __uint_as_float(((e + 120u) << 23) | (m << 20));
    return (b & 128u) ? -v : v;
}

// bf16 bits → f32 (exact).
__device__ __forceinline__ float bf16(uint32_t b) { return __uint_as_float(b << 16); }

// f32 → bf16 bits, round to nearest even (inputs are finite activations or weights).
__device__ __forceinline__ uint16_t to_bf16(float f) {
    uint32_t u = __float_as_uint(f);
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}
