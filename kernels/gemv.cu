// GEMV for decode: y[t, n] = sum_k W[n, k] * x[t, k] for a handful of tokens t (blockIdx.y).
// One warp per output row, ROWS_PER_BLOCK rows per block, weights decoded in registers, fp32
// accumulation, warp-shuffle reduction. The same code serves SM90 and SM12x (decode is
// bandwidth-bound; SM12x's native FP4 MMA is for prefill).
#include "nvfp4.cuh"

#define ROWS_PER_BLOCK 4

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// NVFP4 (W4A16) as ModelOpt stores it: packed u8 [N, K/2] (element 2i in the low nibble), E4M3
// block scales [N, K/16], one f32 scale_2. Lane l of a row's warp takes 8-weight words l, l+32, …:
// each warp load reads 128 contiguous bytes of weights and each lane's 8 activations are two
// float4s 32 bytes from its neighbour's, so both streams coalesce (16-byte-per-lane weight loads
// put lanes 128 bytes apart in x: 8x slower).
extern "C" __global__ void nvfp4_gemv_f32(const uint8_t* __restrict__ w, const uint8_t* __restrict__ scales,
                                          float scale_2, const float* __restrict__ x, float* __restrict__ y,
                                          int n, int k) {
    int row = blockIdx.x * ROWS_PER_BLOCK + threadIdx.y;
    if (row >= n) return;
    int lane = threadIdx.x;
    const uint32_t* wrow = reinterpret_cast<const uint32_t*>(w + (size_t)row * (k / 2));
    const uint8_t* srow = scales + (size_t)row * (k / 16);
    const float4* x4 = reinterpret_cast<const float4*>(x + (size_t)blockIdx.y * k);
    float acc = 0.f;
#pragma unroll 4
    for (int c = lane; c < k / 8; c += 32) {
        uint32_t q = __ldg(wrow + c);
        float4 a = __ldg(x4 + 2 * c), b = __ldg(x4 + 2 * c + 1);
        float xs[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
        float dot = 0.f;
#pragma unroll
        for (int i = 0; i < 8; i++) dot += e2m1((q >> (4 * i)) & 15u) * xs[i];
        acc += e4m3(__ldg(srow + (c >> 1))) * dot;
    }
    acc = warp_sum(acc);
    if (lane == 0) y[(size_t)blockIdx.y * n + row] = acc * scale_2;
}

// scale · BF16 weights [N, K] (K % 8 == 0; scale is FP8's per-tensor scale, else 1): lane l takes
// 8-weight (16-byte) chunks l, l+32, … so a warp reads 512 contiguous bytes per step; its
// activations are the matching two float4s.
extern "C" __global__ void bf16_gemv_f32(const uint16_t* __restrict__ w, float scale, const float* __restrict__ x,
                                         float* __restrict__ y, int n, int k) {
    int row = blockIdx.x * ROWS_PER_BLOCK + threadIdx.y;
    if (row >= n) return;
    int lane = threadIdx.x;
    const uint4* wrow = reinterpret_cast<const uint4*>(w + (size_t)row * k);
    const float4* x4 = reinterpret_cast<const float4*>(x + (size_t)blockIdx.y * k);
    float acc = 0.f;
#pragma unroll 4
    for (int c = lane; c < k / 8; c += 32) {
        uint4 q = __ldg(wrow + c);
        float4 a = __ldg(x4 + 2 * c), b = __ldg(x4 + 2 * c + 1);
        acc += bf16(q.x & 0xffffu) * a.x + bf16(q.x >> 16) * a.y + bf16(q.y & 0xffffu) * a.z +
               bf16(q.y >> 16) * a.w + bf16(q.z & 0xffffu) * b.x + bf16(q.z >> 16) * b.y +
               bf16(q.w & 0xffffu) * b.z + bf16(q.w >> 16) * b.w;
    }
    acc = warp_sum(acc);
    if (lane == 0) y[(size_t)blockIdx.y * n + row] = acc * scale;
}
