// NVFP4 GEMV for decode (W4A16): y[n] = scale_2 * sum_k dec(w[n,k]) * x[k].
// Weights as ModelOpt stores them: packed u8 [N, K/2] (element 2i in the low nibble), E4M3 block
// scales [N, K/16], one f32 scale_2. One warp per output row, ROWS_PER_BLOCK rows per block;
// weights dequantized in registers; fp32 accumulation; warp-shuffle reduction. The same code serves SM90 and SM12x (decode is
// bandwidth-bound; SM12x's native FP4 MMA is for prefill).
#include <stdint.h>

#define ROWS_PER_BLOCK 4

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

// Dot product of 8 packed weights (one u32, low nibble first) with x[0..8).
__device__ __forceinline__ float dot8(uint32_t w, const float* x) {
    float acc = 0.f;
#pragma unroll
    for (int i = 0; i < 8; i++) acc += e2m1((w >> (4 * i)) & 15u) * x[i];
    return acc;
}

// Lane l of a row's warp takes 8-weight words l, l+32, …: each warp load reads 128 contiguous
// bytes of weights and each lane's 8 activations are two float4s 32 bytes from its neighbour's, so
// both streams coalesce (16-byte-per-lane weight loads put lanes 128 bytes apart in x: 8x slower).
extern "C" __global__ void nvfp4_gemv_f32(const uint8_t* __restrict__ w, const uint8_t* __restrict__ scales,
                                          float scale_2, const float* __restrict__ x, float* __restrict__ y,
                                          int n, int k) {
    int row = blockIdx.x * ROWS_PER_BLOCK + threadIdx.y;
    if (row >= n) return;
    int lane = threadIdx.x;
    const uint32_t* wrow = reinterpret_cast<const uint32_t*>(w + (size_t)row * (k / 2));
    const uint8_t* srow = scales + (size_t)row * (k / 16);
    const float4* x4 = reinterpret_cast<const float4*>(x);
    float acc = 0.f;
#pragma unroll 4
    for (int c = lane; c < k / 8; c += 32) {
        uint32_t q = __ldg(wrow + c);
        float4 a = __ldg(x4 + 2 * c), b = __ldg(x4 + 2 * c + 1);
        float xs[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
        acc += e4m3(__ldg(srow + (c >> 1))) * dot8(q, xs);
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
    if (lane == 0) y[row] = acc * scale_2;
}
