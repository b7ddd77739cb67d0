// NVFP4 GEMV for decode (W4A16): y[n] = scale_2 * sum_k dec(w[n,k]) * x[k].
// Weights as ModelOpt stores them: packed u8 [N, K/2] (element 2i in the low nibble), E4M3 block
// scales [N, K/16], one f32 scale_2. One warp per output row, ROWS_PER_BLOCK rows per block; each
// lane loads 16 bytes (32 weights = two scale blocks) at a time and dequantizes in registers;
// fp32 accumulation; warp-shuffle reduction. The same code serves SM90 and SM12x (decode is
// bandwidth-bound; SM12x's native FP4 MMA is for prefill).
#include <stdint.h>

#define ROWS_PER_BLOCK 4

__device__ __forceinline__ float e2m1(uint32_t code) {
    // 0, 0.5, 1, 1.5, 2, 3, 4, 6 and their negatives (bit 3 = sign).
    const float mag[8] = {0.f, 0.5f, 1.f, 1.5f, 2.f, 3.f, 4.f, 6.f};
    float v = mag[code & 7u];
    return (code & 8u) ? -v : v;
}

__device__ __forceinline__ float e4m3(uint32_t b) {
    uint32_t e = (b >> 3) & 15u, m = b & 7u;
    float v = e == 0 ? ldexpf((float)m, -9) : ldexpf((float)(8u + m), (int)e - 10);
    return (b & 128u) ? -v : v;
}

// Dot product of 8 packed weights (one u32, low nibble first) with x[0..8).
__device__ __forceinline__ float dot8(uint32_t w, const float* x) {
    float acc = 0.f;
#pragma unroll
    for (int i = 0; i < 8; i++) acc += e2m1((w >> (4 * i)) & 15u) * x[i];
    return acc;
}

// K % 32 == 0: 16-byte weight loads.
extern "C" __global__ void nvfp4_gemv_f32_v16(const uint8_t* __restrict__ w, const uint8_t* __restrict__ scales,
                                              float scale_2, const float* __restrict__ x, float* __restrict__ y,
                                              int n, int k) {
    int row = blockIdx.x * ROWS_PER_BLOCK + threadIdx.y;
    if (row >= n) return;
    int lane = threadIdx.x;
    const uint4* wrow = reinterpret_cast<const uint4*>(w + (size_t)row * (k / 2));
    const uint8_t* srow = scales + (size_t)row * (k / 16);
    float acc = 0.f;
    for (int c = lane; c < k / 32; c += 32) {
        uint4 q = __ldg(wrow + c);
        const float* xs = x + c * 32;
        float s0 = e4m3(srow[2 * c]), s1 = e4m3(srow[2 * c + 1]);
        acc += s0 * (dot8(q.x, xs) + dot8(q.y, xs + 8)) + s1 * (dot8(q.z, xs + 16) + dot8(q.w, xs + 24));
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
    if (lane == 0) y[row] = acc * scale_2;
}

// Any K % 16 == 0: 8-byte loads, one scale block per load.
extern "C" __global__ void nvfp4_gemv_f32_v8(const uint8_t* __restrict__ w, const uint8_t* __restrict__ scales,
                                             float scale_2, const float* __restrict__ x, float* __restrict__ y,
                                             int n, int k) {
    int row = blockIdx.x * ROWS_PER_BLOCK + threadIdx.y;
    if (row >= n) return;
    int lane = threadIdx.x;
    const uint2* wrow = reinterpret_cast<const uint2*>(w + (size_t)row * (k / 2));
    const uint8_t* srow = scales + (size_t)row * (k / 16);
    float acc = 0.f;
    for (int c = lane; c < k / 16; c += 32) {
        uint2 q = __ldg(wrow + c);
        const float* xs = x + c * 16;
        acc += e4m3(srow[c]) * (dot8(q.x, xs) + dot8(q.y, xs + 8));
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
    if (lane == 0) y[row] = acc * scale_2;
}
