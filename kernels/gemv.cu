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

// ---- NVFP4 × f16 activations on tensor cores: decode and batches of up to 64 tokens ----
//
// Decode is bandwidth-bound, and what limits a GEMV over E2M1 codes is the work per weight
// between the load and the FMA: an H100/H200 SM retires 64 integer ops per clock against ~16
// weight bytes per clock of HBM, so the decode gets ~2 integer ops per element. The CUDA-core
// GEMV above spends ~5 and reaches ~30 % of bandwidth; a shared-memory lookup table moves the cost
// to L1 wavefronts and reaches ~37 %. Here (the trick of vLLM's Marlin FP4 path) two codes 16
// bits apart in a u32 become an f16x2 pair in three integer ops: sign bits already sit at bits
// 15/31, the three magnitude bits move to 9..11, which reads as f16 e2m1 · 2^-14 (0.5 → 2^-15 is
// an f16 subnormal, exact). The pair times (block scale · 2^7) in f16 is e2m1 · scale · 2^-7
// exactly (≤ 6 significant bits, ≥ 2^-17, ≤ 21), and the products go through the tensor cores
// (mma.sync m16n8k16 f16 → f32: SM80+, so SM90 and SM12x alike). One decoded weight serves 8
// tokens per MMA and 64 with 8 MMAs: each weight is read once for the whole batch.
//
// Activations (f16_rowscaled) are f16 scaled per token by a power of two that puts the row's amax
// in [2^14, 2^15) (no overflow for any f32 input, 11-bit precision; undone exactly in the
// epilogue), stored in the order the decode yields pairs: in each group of 8, words
// (x3,x7) (x2,x6) (x1,x5) (x0,x4).
//
// Geometry: a block of MMA_WARPS warps owns 16 output rows (one MMA m-tile) and MMA_KSPLIT
// consecutive k (blockIdx.y selects the k range; partial sums of the ranges are added by
// mma_gemv_reduce, in a fixed order). Each warp takes MMA_UNROLL chunks of 128 k, loaded before
// any is used. In a chunk, thread (g = lane/4, q = lane%4) holds 16 bytes (32 k) of rows g and g+8
// at k = 128c + 32q and the same 32 k of each token's activations. MMA step s (0..7) takes
// word s/2 of the 16 bytes (8 codes, 4 pairs): pairs 2(s%2) and 2(s%2)+1 as the MMA's k
// {2q, 2q+1} and {2q+8, 2q+9}, with the activation words 2s and 2s+1; A and B share that
// mapping, so the sum over k is unchanged. Step s lies in scale block 2q + s/4. The warps'
// partial sums meet in shared memory.
#include <cuda_fp16.h>

#define MMA_WARPS 4
#define MMA_UNROLL 4
#define MMA_CHUNK 128
#define MMA_KSPLIT (MMA_WARPS * MMA_UNROLL * MMA_CHUNK)

// The 4 f16x2 pairs of a word of 8 codes, in the order (3,7) (2,6) (1,5) (0,4), as e2m1 · 2^-14.
__device__ __forceinline__ void e2m1x8_to_f16x2(uint32_t q, uint32_t* p) {
#pragma unroll
    for (int i = 0; i < 4; i++) {
        p[i] = (q & 0x80008000u) | ((q & 0x70007000u) >> 3);
        q <<= 4;
    }
}

__device__ __forceinline__ uint32_t hmul2(uint32_t a, uint32_t b) {
    uint32_t d;
    asm("mul.rn.f16x2 %0, %1, %2;" : "=r"(d) : "r"(a), "r"(b));
    return d;
}

// Two E4M3 bytes (low byte → low half) as f16x2, exactly.
__device__ __forceinline__ uint32_t e4m3x2_to_f16x2(uint32_t two) {
    uint32_t d;
    unsigned short s = (unsigned short)two;
    asm("cvt.rn.f16x2.e4m3x2 %0, %1;" : "=r"(d) : "h"(s));
    return d;
}

__device__ __forceinline__ void mma_f16(float* c, uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0,
                                        uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// Scales of one row's two blocks as f16x2 pairs (block i in both halves) times 2^7.
__device__ __forceinline__ void block_scales(uint32_t two, uint32_t* s) {
    const uint32_t x128 = 0x58005800u;  // f16x2 (128, 128)
    uint32_t f = hmul2(e4m3x2_to_f16x2(two), x128);
    s[0] = __byte_perm(f, 0, 0x1010);
    s[1] = __byte_perm(f, 0, 0x3232);
}

// NT n-tiles of 8 tokens. `part` is y itself (already scaled) when gridDim.y == 1, else
// [gridDim.y, t, n] partial sums for mma_gemv_reduce.
template <int NT>
__device__ __forceinline__ void nvfp4_mma_gemv(const uint8_t* __restrict__ w, const uint8_t* __restrict__ scales,
                                               float scale_2, const uint16_t* __restrict__ xh,
                                               const float* __restrict__ xinv, float* __restrict__ part, int n,
                                               int k, int t) {
    __shared__ float red[MMA_WARPS][16][8 * NT];
    int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    int g = lane >> 2, q = lane & 3;
    int r0 = blockIdx.x * 16 + g, r1 = r0 + 8;
    // Load every chunk of this warp first: MMA_UNROLL × 32 bytes per thread in flight.
    uint4 w0[MMA_UNROLL], w1[MMA_UNROLL];
    uint32_t s0[MMA_UNROLL], s1[MMA_UNROLL];
    int kbase = blockIdx.y * MMA_KSPLIT + warp * MMA_UNROLL * MMA_CHUNK + 32 * q;
#pragma unroll
    for (int u = 0; u < MMA_UNROLL; u++) {
        int k0 = kbase + u * MMA_CHUNK;
        w0[u] = w1[u] = make_uint4(0, 0, 0, 0);
        s0[u] = s1[u] = 0;
        if (k0 < k) {
            if (r0 < n) {
                w0[u] = __ldg(reinterpret_cast<const uint4*>(w + (size_t)r0 * (k / 2) + k0 / 2));
                s0[u] = __ldg(reinterpret_cast<const uint16_t*>(scales + (size_t)r0 * (k / 16) + k0 / 16));
            }
            if (r1 < n) {
                w1[u] = __ldg(reinterpret_cast<const uint4*>(w + (size_t)r1 * (k / 2) + k0 / 2));
                s1[u] = __ldg(reinterpret_cast<const uint16_t*>(scales + (size_t)r1 * (k / 16) + k0 / 16));
            }
        }
    }
    // One accumulator chain per chunk for a single n-tile (MMA latency), else per n-tile.
    constexpr int CH = NT == 1 ? MMA_UNROLL : 1;
    float c[CH][NT][4];
#pragma unroll
    for (int a = 0; a < CH; a++)
#pragma unroll
        for (int j = 0; j < NT; j++) c[a][j][0] = c[a][j][1] = c[a][j][2] = c[a][j][3] = 0.f;
#pragma unroll
    for (int u = 0; u < MMA_UNROLL; u++) {
        int k0 = kbase + u * MMA_CHUNK;
        if (k0 - 32 * q >= k) break;  // the warp's whole chunk is past K (uniform: mma.sync needs all lanes)
        uint32_t sa[2], sb[2];
        block_scales(s0[u], sa);
        block_scales(s1[u], sb);
        uint32_t a0[16], a1[16];
        const uint32_t wa[4] = {w0[u].x, w0[u].y, w0[u].z, w0[u].w}, wb[4] = {w1[u].x, w1[u].y, w1[u].z, w1[u].w};
#pragma unroll
        for (int j = 0; j < 4; j++) {
            e2m1x8_to_f16x2(wa[j], a0 + 4 * j);
            e2m1x8_to_f16x2(wb[j], a1 + 4 * j);
#pragma unroll
            for (int i = 0; i < 4; i++) {
                a0[4 * j + i] = hmul2(a0[4 * j + i], sa[j >> 1]);
                a1[4 * j + i] = hmul2(a1[4 * j + i], sb[j >> 1]);
            }
        }
#pragma unroll
        for (int j = 0; j < NT; j++) {
            int tok = 8 * j + g;
            uint4 xv[4] = {make_uint4(0, 0, 0, 0), make_uint4(0, 0, 0, 0), make_uint4(0, 0, 0, 0),
                           make_uint4(0, 0, 0, 0)};
            if (tok < t && k0 < k) {
                const uint4* xp = reinterpret_cast<const uint4*>(xh + (size_t)tok * k + k0);
#pragma unroll
                for (int v = 0; v < 4; v++) xv[v] = __ldg(xp + v);
            }
            const uint32_t* xw = reinterpret_cast<const uint32_t*>(xv);
            float* acc = c[CH == 1 ? 0 : u][j];
#pragma unroll
            for (int s = 0; s < 8; s++)
                mma_f16(acc, a0[2 * s], a1[2 * s], a0[2 * s + 1], a1[2 * s + 1], xw[2 * s], xw[2 * s + 1]);
        }
    }
    // c[.][j]: (row g, tokens 8j+2q, +1) and (row g+8, the same tokens).
    constexpr int COLS = 8 * NT;
#pragma unroll
    for (int j = 0; j < NT; j++) {
        float v[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
        for (int a = 0; a < CH; a++)
#pragma unroll
            for (int e = 0; e < 4; e++) v[e] += c[a][j][e];
        int col = 8 * j + 2 * q;
        red[warp][g][col] = v[0];
        red[warp][g][col + 1] = v[1];
        red[warp][g + 8][col] = v[2];
        red[warp][g + 8][col + 1] = v[3];
    }
    __syncthreads();
    bool direct = gridDim.y == 1;
    for (int i = tid; i < 16 * COLS; i += blockDim.x) {
        int row = i & 15, tok = i >> 4;
        float acc = 0.f;
#pragma unroll
        for (int wi = 0; wi < MMA_WARPS; wi++) acc += red[wi][row][tok];
        int gr = blockIdx.x * 16 + row;
        if (gr < n && tok < t) {
            // The decode's 2^-7 (e2m1 · 2^-14 times scale · 2^7) and the activation's 2^e_t.
            if (direct)
                part[(size_t)tok * n + gr] = acc * (scale_2 * 128.f) * xinv[tok];
            else
                part[((size_t)blockIdx.y * t + tok) * n + gr] = acc;
        }
    }
}

#define NVFP4_MMA_GEMV(NT)                                                                                     \
    extern "C" __global__ void __launch_bounds__(MMA_WARPS * 32) nvfp4_mma_gemv_nt##NT(                       \
        const uint8_t* __restrict__ w, const uint8_t* __restrict__ scales, float scale_2,                    \
        const uint16_t* __restrict__ xh, const float* __restrict__ xinv, float* __restrict__ part, int n,    \
        int k, int t) {                                                                                        \
        nvfp4_mma_gemv<NT>(w, scales, scale_2, xh, xinv, part, n, k, t);                                     \
    }
NVFP4_MMA_GEMV(1)
NVFP4_MMA_GEMV(2)
NVFP4_MMA_GEMV(4)
NVFP4_MMA_GEMV(8)

// y[tok, i] = scale_2 · 2^7 · xinv[tok] · Σ_s part[s][tok, i] over the k ranges, in order.
extern "C" __global__ void mma_gemv_reduce(const float* __restrict__ part, const float* __restrict__ xinv,
                                           float* __restrict__ y, int splits, float scale_2, int n, size_t len) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < len; i += (size_t)gridDim.x * blockDim.x) {
        float acc = 0.f;
        for (int s = 0; s < splits; s++) acc += part[(size_t)s * len + i];
        y[i] = acc * (scale_2 * 128.f) * xinv[i / n];
    }
}

// x [T, K] f32 → f16 · 2^e_t per row (one block per row; K % 8 == 0), e_t putting the row's amax
// in [2^14, 2^15), in the GEMV's pair order: within each 8, (x3,x7) (x2,x6) (x1,x5) (x0,x4).
// inv[t] = 2^-e_t. An all-zero row keeps e_t = 0.
extern "C" __global__ void f16_rowscaled(const float* __restrict__ x, uint16_t* __restrict__ out,
                                         float* __restrict__ inv, int k) {
    __shared__ float part[32];
    const float* row = x + (size_t)blockIdx.x * k;
    float m = 0.f;
    for (int i = threadIdx.x; i < k; i += blockDim.x) m = fmaxf(m, fabsf(row[i]));
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
    if ((threadIdx.x & 31) == 0) part[threadIdx.x >> 5] = m;
    __syncthreads();
    m = 0.f;
    for (int i = 0; i < (int)(blockDim.x >> 5); i++) m = fmaxf(m, part[i]);
    int e = m > 0.f ? min(14 - ilogbf(m), 100) : 0;
    float s = ldexpf(1.f, e);
    if (threadIdx.x == 0) inv[blockIdx.x] = ldexpf(1.f, -e);
    uint16_t* o = out + (size_t)blockIdx.x * k;
    for (int i = threadIdx.x; i < k; i += blockDim.x) {
        int r = i & 7;
        o[(i & ~7) + 2 * (3 - (r & 3)) + (r >> 2)] = __half_as_ushort(__float2half_rn(row[i] * s));
    }
}
