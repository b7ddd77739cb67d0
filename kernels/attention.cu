// Causal GQA softmax attention for prefill, exact in f32: q [T, Hq, D] against k, v [L, Hkv, D], the T queries being
// the last T of the L positions; query head h reads kv head h / (Hq/Hkv). Serves prefill
// (T = L) and decode over the KV cache (T = 1).
//
// Geometry: one block of ATT_THREADS per (query, head). Keys are taken in tiles of ATT_TILE: each
// warp scores keys of the tile (lanes split D, shuffle reduction) into shared memory, then every
// thread updates its D/ATT_THREADS output dims with an online softmax (running max and sum), so
// any L fits in fixed shared memory (q plus one tile of scores).
#include <stdint.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include "geometry.h"
#include "mma.cuh"
#include "pdl.cuh"


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

// ---- Tensor-core prefill attention (flash-attention style; the fast path) ----
//
// The same causal GQA attention on mma.sync: scores S = q·k in f16 (q and k are RMS-normalised,
// so within f16's range, whose 11-bit mantissa keeps them more exactly than bf16), softmax in
// f32 with a running max and sum (exp2 of pre-scaled scores), then O += P·V in bf16 (P in
// [0, 1]; V unbounded, so bf16's range), f32 accumulation throughout. `attention_f32` above
// stays the exact path (`--exact-gemm` and the golden checks).
//
// attention_kv_prep converts k and v once per call for every query tile: k to f16
// [Hkv][Lp][DP] and v to bf16 transposed [Hkv][DP][Lp] (Lp = L rounded up to FA_BC, DP = D
// rounded up to 64/128/256, zeros beyond L and D), so that tiles stream into shared memory with
// cp.async and every B fragment is one aligned 32-bit shared load.
//
// flash_attention_d{DP}: one block of FA_THREADS per (FA_BR queries, query head), warp w owning
// queries 16w..16w+15; blocks run heaviest (latest queries) first. Per key tile: K lands (cp.async
// group), S = Q·Kᵀ, K's buffer refills with the next tile while the softmax and P·V run, V's
// buffer refills while the next S runs. Row padding of 8 halves makes the fragment reads
// conflict-free (row strides of 4 banks mod 32 for Q and K, 20 for Vᵀ).

extern "C" __global__ void attention_kv_prep(const float* __restrict__ k, const float* __restrict__ v,
                                             uint16_t* __restrict__ kh, uint16_t* __restrict__ vt, int l_len,
                                             int lp, int hkv, int d, int dp) {
    pdl_start();
    __shared__ float tile[FA_TILE][FA_TILE + 1];
    int j0 = blockIdx.x * FA_TILE, c0 = blockIdx.y * FA_TILE, kvh = blockIdx.z;
    int tx = threadIdx.x, ty = threadIdx.y;  // 32 x 8
    for (int r = ty; r < FA_TILE; r += 8) {
        int j = j0 + r, c = c0 + tx;
        bool in = j < l_len && c < d;
        size_t src = ((size_t)j * hkv + kvh) * d + c;
        __half kv = __float2half_rn(in ? k[src] : 0.f);
        kh[((size_t)kvh * lp + j) * dp + c] = *reinterpret_cast<uint16_t*>(&kv);
        tile[r][tx] = in ? v[src] : 0.f;
    }
    __syncthreads();
    for (int r = ty; r < FA_TILE; r += 8) {  // r: dim within the tile, tx: key
        __nv_bfloat16 b = __float2bfloat16_rn(tile[tx][r]);
        vt[((size_t)kvh * dp + c0 + r) * lp + j0 + tx] = *reinterpret_cast<uint16_t*>(&b);
    }
}

template <int DP>
__device__ __forceinline__ void flash_attention(const float* __restrict__ q, const uint16_t* __restrict__ kh,
                                                const uint16_t* __restrict__ vt, float* __restrict__ out, int t_len,
                                                int l_len, int lp, int hq, int hkv, int d, float scale_log2) {
    constexpr int QS = DP + 8, VS = FA_BC + 8, NT_S = FA_BC / 8, NT_O = DP / 8;
    extern __shared__ __align__(16) uint16_t fa_smem[];
    uint16_t* qs = fa_smem;           // [FA_BR][QS] f16
    uint16_t* ks = qs + FA_BR * QS;   // [FA_BC][QS] f16
    uint16_t* vs = ks + FA_BC * QS;   // [DP][VS] bf16 (vᵀ)
    int tid = threadIdx.x, lane = tid % 32, warp = tid / 32, g = lane / 4, c = lane % 4;
    int q0 = (gridDim.x - 1 - blockIdx.x) * FA_BR, h = blockIdx.y, kvh = h / (hq / hkv);
    int past = l_len - t_len;
    int last_key = min(l_len, past + min(q0 + FA_BR, t_len)) - 1;
    int tiles = last_key / FA_BC + 1;
    const uint16_t* kbase = kh + (size_t)kvh * lp * DP;
    const uint16_t* vbase = vt + (size_t)kvh * DP * lp;
    auto load_k = [&](int j) {
        for (int u = tid; u < FA_BC * DP / 8; u += FA_THREADS) {
            int r = u / (DP / 8), col = (u % (DP / 8)) * 8;
            cp_async16(ks + r * QS + col, kbase + (size_t)(j * FA_BC + r) * DP + col);
        }
        cp_async_commit();
    };
    auto load_v = [&](int j) {
        for (int u = tid; u < DP * FA_BC / 8; u += FA_THREADS) {
            int r = u / (FA_BC / 8), col = (u % (FA_BC / 8)) * 8;
            cp_async16(vs + r * VS + col, vbase + (size_t)r * lp + j * FA_BC + col);
        }
        cp_async_commit();
    };
    pdl_wait();
    load_k(0);
    load_v(0);
    for (int e = tid; e < FA_BR * DP / 2; e += FA_THREADS) {
        int r = e / (DP / 2), col = (e % (DP / 2)) * 2, qi = q0 + r;
        const float* src = q + ((size_t)qi * hq + h) * d;
        float x0 = qi < t_len && col < d ? src[col] : 0.f;
        float x1 = qi < t_len && col + 1 < d ? src[col + 1] : 0.f;
        *reinterpret_cast<uint32_t*>(qs + r * QS + col) = pack_f16x2(x0, x1);
    }
    pdl_trigger();
    float o[NT_O][4];
#pragma unroll
    for (int n = 0; n < NT_O; n++) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;
    float m[2] = {-INFINITY, -INFINITY}, lsum[2] = {0.f, 0.f};
    // The last key each of this thread's two rows sees (rows g and g + 8 of the warp's 16).
    int vis[2] = {past + q0 + warp * 16 + g, past + q0 + warp * 16 + g + 8};
    const uint16_t* qw = qs + (warp * 16 + g) * QS + 2 * c;
    for (int j = 0; j < tiles; j++) {
        cp_async_wait<1>();  // K(j) has landed (V(j) may still be in flight)
        __syncthreads();
        float s[NT_S][4];
#pragma unroll
        for (int n = 0; n < NT_S; n++) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.f;
#pragma unroll
        for (int kk = 0; kk < DP / 16; kk++) {
            const uint16_t* qa = qw + kk * 16;
            uint32_t a0 = *reinterpret_cast<const uint32_t*>(qa);
            uint32_t a1 = *reinterpret_cast<const uint32_t*>(qa + 8 * QS);
            uint32_t a2 = *reinterpret_cast<const uint32_t*>(qa + 8);
            uint32_t a3 = *reinterpret_cast<const uint32_t*>(qa + 8 * QS + 8);
#pragma unroll
            for (int n = 0; n < NT_S; n++) {
                const uint16_t* kb = ks + (n * 8 + g) * QS + kk * 16 + 2 * c;
                mma_f16(s[n], a0, a1, a2, a3, *reinterpret_cast<const uint32_t*>(kb),
                        *reinterpret_cast<const uint32_t*>(kb + 8));
            }
        }
        __syncthreads();  // every warp is done with K(j)
        if (j + 1 < tiles) load_k(j + 1);
        else cp_async_commit();  // an empty group keeps the wait counts uniform
        // Mask (causal, and keys past L), scale, online softmax per row.
        float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
        for (int n = 0; n < NT_S; n++) {
#pragma unroll
            for (int e = 0; e < 4; e++) {
                int key = j * FA_BC + n * 8 + 2 * c + (e & 1), r = e / 2;
                float x = key <= vis[r] && key < l_len ? s[n][e] * scale_log2 : -INFINITY;
                s[n][e] = x;
                mx[r] = fmaxf(mx[r], x);
            }
        }
        float corr[2];
#pragma unroll
        for (int r = 0; r < 2; r++) {
            mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
            mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
            float nm = fmaxf(m[r], mx[r]);  // finite: key 0 is visible to every row in tile 0
            corr[r] = exp2f(m[r] - nm);
            m[r] = nm;
            lsum[r] *= corr[r];
        }
        uint32_t pa[FA_BC / 16][4];
#pragma unroll
        for (int n = 0; n < NT_S; n++) {
            float p0 = exp2f(s[n][0] - m[0]), p1 = exp2f(s[n][1] - m[0]);
            float p2 = exp2f(s[n][2] - m[1]), p3 = exp2f(s[n][3] - m[1]);
            lsum[0] += p0 + p1;
            lsum[1] += p2 + p3;
            pa[n / 2][(n % 2) * 2] = pack_bf16x2(p0, p1);
            pa[n / 2][(n % 2) * 2 + 1] = pack_bf16x2(p2, p3);
        }
#pragma unroll
        for (int n = 0; n < NT_O; n++) {
            o[n][0] *= corr[0];
            o[n][1] *= corr[0];
            o[n][2] *= corr[1];
            o[n][3] *= corr[1];
        }
        cp_async_wait<1>();  // V(j) has landed (K(j+1) may still be in flight)
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < FA_BC / 16; kk++) {
#pragma unroll
            for (int n = 0; n < NT_O; n++) {
                const uint16_t* vb = vs + (n * 8 + g) * VS + kk * 16 + 2 * c;
                mma_bf16(o[n], pa[kk][0], pa[kk][1], pa[kk][2], pa[kk][3], *reinterpret_cast<const uint32_t*>(vb),
                         *reinterpret_cast<const uint32_t*>(vb + 8));
            }
        }
        __syncthreads();  // every warp is done with V(j)
        if (j + 1 < tiles) load_v(j + 1);
        else cp_async_commit();
    }
    cp_async_wait<0>();
#pragma unroll
    for (int r = 0; r < 2; r++) {
        lsum[r] += __shfl_xor_sync(0xffffffffu, lsum[r], 1);
        lsum[r] += __shfl_xor_sync(0xffffffffu, lsum[r], 2);
    }
#pragma unroll
    for (int r = 0; r < 2; r++) {
        int qi = q0 + warp * 16 + g + 8 * r;
        if (qi >= t_len) continue;
        float inv = 1.f / lsum[r];
        float* dst = out + ((size_t)qi * hq + h) * d;
#pragma unroll
        for (int n = 0; n < NT_O; n++) {
            int col = n * 8 + 2 * c;
            if (col < d) dst[col] = o[n][2 * r] * inv;
            if (col + 1 < d) dst[col + 1] = o[n][2 * r + 1] * inv;
        }
    }
}

#define FLASH_ATTENTION(DP)                                                                                     \
    extern "C" __global__ void __launch_bounds__(FA_THREADS) flash_attention_d##DP(                             \
        const float* __restrict__ q, const uint16_t* __restrict__ kh, const uint16_t* __restrict__ vt,         \
        float* __restrict__ out, int t_len, int l_len, int lp, int hq, int hkv, int d, float scale_log2) {      \
        /* pdl_wait() in flash_attention */                                                                   \
        flash_attention<DP>(q, kh, vt, out, t_len, l_len, lp, hq, hkv, d, scale_log2);                         \
    }
FLASH_ATTENTION(64)
FLASH_ATTENTION(128)
FLASH_ATTENTION(256)
