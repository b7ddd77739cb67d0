// Causal GQA softmax attention, f32: q [T, Hq, D] against k, v [L, Hkv, D], the T queries being
// the last T of the L positions; query head h reads kv head h / (Hq/Hkv). Serves prefill
// (T = L) and decode over the KV cache (T = 1).
//
// Geometry: one block of ATT_THREADS per (query, head). Keys are taken in tiles of ATT_TILE: each
// warp scores keys of the tile (lanes split D, shuffle reduction) into shared memory, then every
// thread updates its D/ATT_THREADS output dims with an online softmax (running max and sum), so
// any L fits in fixed shared memory (q plus one tile of scores).
#include <stdint.h>
#include "pdl.cuh"
#include "geometry.h"


extern "C" __global__ void attention_f32(const float* __restrict__ q, const float* __restrict__ k,
                                         const float* __restrict__ v, float* __restrict__ out, int t_len, int l_len,
                                         int hq, int hkv, int d, float scale) {
    pdl_start();
    extern __shared__ float sm[];
    float* qs = sm;      // [d]
    float* sc = sm + d;  // [ATT_TILE]
    int ti = blockIdx.x, h = blockIdx.y, tid = threadIdx.x;
    int lane = tid % 32, warp = tid / 32, warps = ATT_THREADS / 32;
    int kvh = h / (hq / hkv);
    int visible = l_len - t_len + ti + 1;
    const float* qr = q + ((size_t)ti * hq + h) * d;
    for (int i = tid; i < d; i += ATT_THREADS) qs[i] = qr[i];
    __syncthreads();
    float acc[ATT_MAX_D / ATT_THREADS];
#pragma unroll
    for (int r = 0; r < ATT_MAX_D / ATT_THREADS; r++) acc[r] = 0.f;
    float m = -INFINITY, sum = 0.f;
    for (int j0 = 0; j0 < visible; j0 += ATT_TILE) {
        int n = min(ATT_TILE, visible - j0);
        for (int jj = warp; jj < n; jj += warps) {
            const float* kr = k + ((size_t)(j0 + jj) * hkv + kvh) * d;
            float dot = 0.f;
            for (int i = lane; i < d; i += 32) dot += qs[i] * kr[i];
#pragma unroll
            for (int o = 16; o > 0; o >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, o);
            if (lane == 0) sc[jj] = dot * scale;
        }
        __syncthreads();
        float tile_max = -INFINITY;
        for (int jj = 0; jj < n; jj++) tile_max = fmaxf(tile_max, sc[jj]);
        float new_m = fmaxf(m, tile_max);
        float corr = expf(m - new_m);  // 0 on the first tile (m = -inf)
        __syncthreads();
        if (tid < n) sc[tid] = expf(sc[tid] - new_m);
        __syncthreads();
        float tile_sum = 0.f;
        for (int jj = 0; jj < n; jj++) tile_sum += sc[jj];
        sum = sum * corr + tile_sum;
#pragma unroll
        for (int r = 0; r < ATT_MAX_D / ATT_THREADS; r++) {
            int i = tid + r * ATT_THREADS;
            if (i < d) {
                float a = acc[r] * corr;
                for (int jj = 0; jj < n; jj++) a += sc[jj] * v[((size_t)(j0 + jj) * hkv + kvh) * d + i];
                acc[r] = a;
            }
        }
        m = new_m;
        __syncthreads();
    }
    float* o = out + ((size_t)ti * hq + h) * d;
#pragma unroll
    for (int r = 0; r < ATT_MAX_D / ATT_THREADS; r++) {
        int i = tid + r * ATT_THREADS;
        if (i < d) o[i] = acc[r] / sum;
    }
}
