// GEMV for decode: y[t, n] = sum_k W[n, k] * x[t, k] for a handful of tokens t (blockIdx.y).
// One warp per output row, ROWS_PER_BLOCK rows per block, weights decoded in registers, fp32
// accumulation, warp-shuffle reduction. The same code serves SM90 and SM12x (decode is
// bandwidth-bound; SM12x's native FP4 MMA is for prefill).
#include "nvfp4.cuh"
#include "mma.cuh"
#include "pdl.cuh"
#include "geometry.h"


__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// NVFP4 (W4A16): packed u8 [N, K/2] (ModelOpt's element 2i in the low nibble, or the repacked
// layout of nvfp4.cuh), E4M3 block scales [N, K/16], one f32 scale_2. Lane l of a row's warp
// takes 8-weight words l, l+32, …: each warp load reads 128 contiguous bytes of weights and each lane's 8 activations are two
// float4s 32 bytes from its neighbour's, so both streams coalesce (16-byte-per-lane weight loads
// put lanes 128 bytes apart in x: 8x slower).
extern "C" __global__ void nvfp4_gemv_f32(const uint8_t* __restrict__ w, const uint8_t* __restrict__ scales,
                                          float scale_2, const float* __restrict__ x, float* __restrict__ y,
                                          int n, int k, int repacked) {
    pdl_start();
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
        for (int i = 0; i < 8; i++) dot += e2m1(code_of(q, i, repacked)) * xs[i];
        acc += e4m3(__ldg(srow + (c >> 1))) * dot;
    }
    acc = warp_sum(acc);
    if (lane == 0) y[(size_t)blockIdx.y * n + row] = acc * scale_2;
}

// Eight bf16 weights (one uint4) times eight activations, in order.
__device__ __forceinline__ float bf16x8_dot(uint4 q, float4 a, float4 b) {
    return bf16(q.x & 0xffffu) * a.x + bf16(q.x >> 16) * a.y + bf16(q.y & 0xffffu) * a.z + bf16(q.y >> 16) * a.w +
           bf16(q.z & 0xffffu) * b.x + bf16(q.z >> 16) * b.y + bf16(q.w & 0xffffu) * b.z + bf16(q.w >> 16) * b.w;
}

// scale · BF16 weights [N, K] (K % 8 == 0; scale is FP8's per-tensor scale, else 1): lane l takes
// 8-weight (16-byte) chunks l, l+32, … so a warp reads 512 contiguous bytes per step; its
// activations are the matching two float4s.
extern "C" __global__ void bf16_gemv_f32(const uint16_t* __restrict__ w, float scale, const float* __restrict__ x,
                                         float* __restrict__ y, int n, int k) {
    pdl_start();
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
        acc += bf16x8_dot(q, a, b);
    }
    acc = warp_sum(acc);
    if (lane == 0) y[(size_t)blockIdx.y * n + row] = acc * scale;
}

// 16 weight bytes read once and not kept in L1 (ld.global.nc.L1::no_allocate): a batch's
// activations, read for every row, stay there instead of being evicted by the weight stream.
__device__ __forceinline__ uint4 ld_stream(const uint4* p) {
    uint4 v;
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "l"(p));
    return v;
}

// The same product for 2..T tokens with each weight read once for all of them (a batch's LM
// head: at 8 sequences the one-token kernel above streamed the 2 GB head 8 times per step).
// The weights stream past L1 (ld_stream): with them cached, the 8 tokens' activations (128 KiB
// at K = 4096) were evicted and re-read from L2 for every row, and the 8-token LM head ran at
// 34 % of copy bandwidth (1.95 ms against 0.71 ms for one token; H100 profile, 2535537).
// A warp owns R consecutive rows and walks K as bf16_gemv_f32 does; per chunk it loads the R
// rows' 16 bytes once and each token's two float4s once, R rows sharing them (with R = 1 a
// warp would read every token's activations from L1 for each row: 16 B per weight at 8 tokens).
// Each (row, token) sum is the one-token kernel's: the same chunks in the same order, the same
// bf16x8_dot and warp_sum, so a token's logits do not depend on the batch it is in.
// STREAM false: the weights through __ldg instead (the LM-head sweep measures the difference).
template <int T, int R, bool STREAM = true>
__device__ __forceinline__ void bf16_gemv_batch(const uint16_t* __restrict__ w, float scale,
                                                const float* __restrict__ x, float* __restrict__ y, int n, int k,
                                                int t) {
    pdl_start();
    const int row0 = (blockIdx.x * ROWS_PER_BLOCK + threadIdx.y) * R;
    if (row0 >= n) return;
    const int lane = threadIdx.x;
    const uint4* wrow[R];
#pragma unroll
    for (int r = 0; r < R; r++) wrow[r] = reinterpret_cast<const uint4*>(w + (size_t)min(row0 + r, n - 1) * k);
    float acc[R][T];
#pragma unroll
    for (int r = 0; r < R; r++)
#pragma unroll
        for (int j = 0; j < T; j++) acc[r][j] = 0.f;
#pragma unroll 2
    for (int c = lane; c < k / 8; c += 32) {
        uint4 q[R];
#pragma unroll
        for (int r = 0; r < R; r++) q[r] = STREAM ? ld_stream(wrow[r] + c) : __ldg(wrow[r] + c);
#pragma unroll
        for (int j = 0; j < T; j++) {
            if (j < t) {
                const float4* x4 = reinterpret_cast<const float4*>(x + (size_t)j * k);
                float4 a = __ldg(x4 + 2 * c), b = __ldg(x4 + 2 * c + 1);
#pragma unroll
                for (int r = 0; r < R; r++) acc[r][j] += bf16x8_dot(q[r], a, b);
            }
        }
    }
#pragma unroll
    for (int r = 0; r < R; r++)
#pragma unroll
        for (int j = 0; j < T; j++) {
            float v = warp_sum(acc[r][j]);
            if (lane == 0 && j < t && row0 + r < n) y[(size_t)j * n + row0 + r] = v * scale;
        }
}

#define BF16_BATCH_ENTRY(NAME, T, R)                                                                     \
    extern "C" __global__ void NAME(const uint16_t* __restrict__ w, float scale, const float* __restrict__ x, \
                                    float* __restrict__ y, int n, int k, int t) {                            \
        /* pdl_start() in bf16_gemv_batch */                                                                 \
        bf16_gemv_batch<T, R>(w, scale, x, y, n, k, t);                                                      \
    }
// A row per warp for weights too narrow to give every SM several blocks of BF16_WIDE_ROWS-row
// warps; BF16_WIDE_ROWS rows per warp for the wide ones (the LM head).
BF16_BATCH_ENTRY(bf16_gemv_t2, 2, 1)
BF16_BATCH_ENTRY(bf16_gemv_t4, 4, 1)
BF16_BATCH_ENTRY(bf16_gemv_t8, 8, 1)
BF16_BATCH_ENTRY(bf16_gemv_wide_t2, 2, BF16_WIDE_ROWS)
BF16_BATCH_ENTRY(bf16_gemv_wide_t4, 4, BF16_WIDE_ROWS)
BF16_BATCH_ENTRY(bf16_gemv_wide_t8, 8, BF16_WIDE_ROWS)
// LM-head sweep (selftest --gemv-sweep): more rows per warp (8: half the activation loads per
// weight byte), and the shipped geometry with the weights through L1 (__ldg). Name: tokens, rows
// per warp. Same sums in the same order as the shipped kernels.
#define BF16_SWEEP_ENTRY(NAME, T, R, STREAM)                                                             \
    extern "C" __global__ void NAME(const uint16_t* __restrict__ w, float scale, const float* __restrict__ x, \
                                    float* __restrict__ y, int n, int k, int t) {                            \
        /* pdl_start() in bf16_gemv_batch */                                                                 \
        bf16_gemv_batch<T, R, STREAM>(w, scale, x, y, n, k, t);                                              \
    }
BF16_SWEEP_ENTRY(bf16_sweep_t2_r8, 2, 8, true)
BF16_SWEEP_ENTRY(bf16_sweep_t4_r8, 4, 8, true)
BF16_SWEEP_ENTRY(bf16_sweep_t8_r8, 8, 8, true)
BF16_SWEEP_ENTRY(bf16_sweep_t8_r4_ldg, 8, BF16_WIDE_ROWS, false)

// The same product for few rows (the GDN's [32, 4096] in_proj_b/a): one block of
// ROWBLOCK_THREADS per (row, token), the row's chunks spread over all its warps and their sums
// added in warp order, so a handful of rows still keeps many loads in flight. Two weights of the
// same input in one launch (b and a: blocks past n0 take weight 1; n1 = 0 for one weight), each
// row's sum the same whichever launch it is in.
extern "C" __global__ void __launch_bounds__(ROWBLOCK_THREADS)
    bf16_gemv_rowblock_f32(const uint16_t* __restrict__ w0, float scale0, float* __restrict__ y0, int n0,
                           const uint16_t* __restrict__ w1, float scale1, float* __restrict__ y1, int n1,
                           const float* __restrict__ x, int k) {
    pdl_start();
    __shared__ float part[ROWBLOCK_THREADS / 32];
    const bool second = (int)blockIdx.x >= n0;
    const int row = second ? blockIdx.x - n0 : blockIdx.x, n = second ? n1 : n0;
    const uint16_t* w = second ? w1 : w0;
    const uint4* wrow = reinterpret_cast<const uint4*>(w + (size_t)row * k);
    const float4* x4 = reinterpret_cast<const float4*>(x + (size_t)blockIdx.y * k);
    float acc = 0.f;
    for (int c = threadIdx.x; c < k / 8; c += ROWBLOCK_THREADS) {
        uint4 q = __ldg(wrow + c);
        float4 a = __ldg(x4 + 2 * c), b = __ldg(x4 + 2 * c + 1);
        acc += bf16x8_dot(q, a, b);
    }
    acc = warp_sum(acc);
    if ((threadIdx.x & 31) == 0) part[threadIdx.x >> 5] = acc;
    __syncthreads();
    if (threadIdx.x == 0) {
        float sum = 0.f;
#pragma unroll
        for (int i = 0; i < ROWBLOCK_THREADS / 32; i++) sum += part[i];
        (second ? y1 : y0)[(size_t)blockIdx.y * n + row] = sum * (second ? scale1 : scale0);
    }
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
// Geometry: a block of MMA_WARPS warps owns 16 output rows (one MMA m-tile) and the whole of K,
// cut into chunks of 128 k. In a chunk, thread (g = lane/4, q = lane%4) holds 16 bytes (32 k) of
// rows g and g+8 at k = 128c + 32q and the same 32 k of each token's activations. MMA step s
// (0..7) takes word s/2 of the 16 bytes (8 codes, 4 pairs): pairs 2(s%2) and 2(s%2)+1 as the
// MMA's k {2q, 2q+1} and {2q+8, 2q+9}, with the activation words 2s and 2s+1; A and B share that
// mapping, so the sum over k is unchanged. Step s lies in scale block 2q + s/4. The warps'
// partial sums meet in shared memory and are added in warp order.
#include "rowscale.cuh"

#define MMA_DEPTH 2

// The 4 f16x2 pairs of a word of 8 codes, in the order (3,7) (2,6) (1,5) (0,4), as e2m1 · 2^-14.
__device__ __forceinline__ void e2m1x8_to_f16x2(uint32_t q, uint32_t* p) {
#pragma unroll
    for (int i = 0; i < 4; i++) {
        p[i] = (q & 0x80008000u) | ((q & 0x70007000u) >> 3);
        q <<= 4;
    }
}

// The same 4 pairs from a word in the repacked layout (nvfp4.cuh): two pairs need one AND, the
// other two two shifted copies and two LOP3s, 11 instructions a word instead of 16 (ModelOpt's
// nibbles keep the sign one bit above the magnitude, four short of f16's layout; no layout lets
// every pair decode with one shift and one AND).
__device__ __forceinline__ void e2m1x8_repacked_to_f16x2(uint32_t q, uint32_t* p) {
    const uint32_t mag = 0x0E000E00u, sign = 0x80008000u;
    p[0] = ((q >> 3) & mag) | ((q << 14) & sign);
    p[1] = q & (mag | sign);
    p[2] = ((q << 4) & mag) | ((q << 15) & sign);
    p[3] = (q << 7) & (mag | sign);
}

// ModelOpt words → the repacked layout (nvfp4.cuh), one thread per word.
extern "C" __global__ void nvfp4_repack(const uint32_t* __restrict__ in, uint32_t* __restrict__ out, size_t words) {
    pdl_start();
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < words; i += (size_t)gridDim.x * blockDim.x) {
        uint32_t q = in[i], r = 0;
#pragma unroll
        for (int c = 0; c < 8; c++) {
            uint32_t v = (q >> (4 * c)) & 15u;
            r |= ((v & 7u) << REPACK_MAG_AT[c]) | ((v >> 3) << REPACK_SIGN_AT[c]);
        }
        out[i] = r;
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

// Scales of one row's two blocks as f16x2 pairs (block i in both halves) times 2^7.
__device__ __forceinline__ void block_scales(uint32_t two, uint32_t* s) {
    const uint32_t x128 = 0x58005800u;  // f16x2 (128, 128)
    uint32_t f = hmul2(e4m3x2_to_f16x2(two), x128);
    s[0] = __byte_perm(f, 0, 0x1010);
    s[1] = __byte_perm(f, 0, 0x3232);
}

// Up to GROUP_MAX weights of the same input (q/k/v, gate/up, the GDN input projections) in one
// launch: blockIdx.x runs over the 16-row tiles of all of them, weight after weight.
struct GemvGroup {
    const uint8_t* w[GROUP_MAX];
    const uint8_t* s[GROUP_MAX];
    float* y[GROUP_MAX];
    const float* r[GROUP_MAX];  // a residual [t, n_i] added to the output, or null
    float scale_2[GROUP_MAX];
    int n[GROUP_MAX];
    int tiles_end[GROUP_MAX];  // cumulative tile counts
    int count;
};

// One chunk (128 k) of rows r0 and r0 + 8 for thread (g, q): 16 code bytes and 2 scale bytes
// each, zero past n or k.
struct Chunk {
    uint4 w0, w1;
    uint32_t s0, s1;
};

__device__ __forceinline__ Chunk load_chunk(const uint8_t* __restrict__ w, const uint8_t* __restrict__ scales,
                                            int r0, int n, int k, int k0) {
    Chunk c = {make_uint4(0, 0, 0, 0), make_uint4(0, 0, 0, 0), 0, 0};
    int r1 = r0 + 8;
    // Unsigned offsets (k, k0 ≥ 0): a signed k0 / 2 costs three instructions per use, and this
    // runs once per chunk in the GEMV's inner loop.
    const size_t wk = (unsigned)k >> 1, sk = (unsigned)k >> 4, wo = (unsigned)k0 >> 1, so = (unsigned)k0 >> 4;
    if (k0 < k) {
        if (r0 < n) {
            c.w0 = __ldg(reinterpret_cast<const uint4*>(w + (size_t)r0 * wk + wo));
            c.s0 = __ldg(reinterpret_cast<const uint16_t*>(scales + (size_t)r0 * sk + so));
        }
        if (r1 < n) {
            c.w1 = __ldg(reinterpret_cast<const uint4*>(w + (size_t)r1 * wk + wo));
            c.s1 = __ldg(reinterpret_cast<const uint16_t*>(scales + (size_t)r1 * sk + so));
        }
    }
    return c;
}

// A token's 32 k of a chunk (4 × 16 bytes) of the activations, zero past t or k.
struct Xs {
    uint4 v[4];
};

__device__ __forceinline__ Xs load_x(const uint16_t* __restrict__ xh, int tok, int k, int t, int k0) {
    Xs x = {{make_uint4(0, 0, 0, 0), make_uint4(0, 0, 0, 0), make_uint4(0, 0, 0, 0), make_uint4(0, 0, 0, 0)}};
    if (tok < t && k0 < k) {
        const uint4* xp = reinterpret_cast<const uint4*>(xh + (size_t)tok * k + k0);
#pragma unroll
        for (int v = 0; v < 4; v++) x.v[v] = __ldg(xp + v);
    }
    return x;
}

// The tiled layout (`nvfp4_tile`): for tile T and chunk c, 1024 code bytes at (T·C + c)·1024 —
// row g's 16 bytes for lane (g, q) at 16·lane, row g+8's at 512 + 16·lane — and 128 scale bytes
// at (T·C + c)·128, lane's 4 at 4·lane (row g's two, then row g+8's). A warp's loads are 512
// and 128 contiguous bytes, a tile's whole weight one contiguous stream, padding zero.
__device__ __forceinline__ Chunk load_chunk_tiled(const uint8_t* __restrict__ w, const uint8_t* __restrict__ scales,
                                                  int tile, int chunks, int c, int lane) {
    size_t at = (size_t)tile * chunks + c;
    const uint4* wp = reinterpret_cast<const uint4*>(w + at * 1024) + lane;
    uint32_t s = __ldg(reinterpret_cast<const uint32_t*>(scales + at * 128) + lane);
    return Chunk{__ldg(wp), __ldg(wp + 32), s & 0xffffu, s >> 16};
}

// ModelOpt layout [n, k/2] codes, [n, k/16] scales → the tiled layout, one thread per (tile,
// chunk, lane); rows past n and k past k are zero.
extern "C" __global__ void nvfp4_tile(const uint8_t* __restrict__ w, const uint8_t* __restrict__ scales,
                                      uint8_t* __restrict__ wt, uint8_t* __restrict__ st, int n, int k) {
    pdl_start();
    int chunks = (k + MMA_CHUNK - 1) / MMA_CHUNK, tiles = (n + 15) / 16;
    size_t total = (size_t)tiles * chunks * 32;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < total; i += (size_t)gridDim.x * blockDim.x) {
        int lane = i & 31;
        size_t at = i >> 5;
        int c = at % chunks, tile = at / chunks;
        Chunk ch = load_chunk(w, scales, tile * 16 + (lane >> 2), n, k, c * MMA_CHUNK + 32 * (lane & 3));
        uint4* wp = reinterpret_cast<uint4*>(wt + at * 1024) + lane;
        wp[0] = ch.w0;
        wp[32] = ch.w1;
        reinterpret_cast<uint32_t*>(st + at * 128)[lane] = (ch.s0 & 0xffffu) | (ch.s1 << 16);
    }
}

// The chunk's weights as MMA A fragments (e2m1 · scale · 2^-7 in f16, see above); REPACKED:
// words in `nvfp4_repack`'s layout.
template <bool REPACKED>
__device__ __forceinline__ void decode_chunk(const Chunk& ch, uint32_t* a0, uint32_t* a1) {
    uint32_t sa[2], sb[2];
    block_scales(ch.s0, sa);
    block_scales(ch.s1, sb);
    const uint32_t wa[4] = {ch.w0.x, ch.w0.y, ch.w0.z, ch.w0.w}, wb[4] = {ch.w1.x, ch.w1.y, ch.w1.z, ch.w1.w};
#pragma unroll
    for (int j = 0; j < 4; j++) {
        if (REPACKED) {
            e2m1x8_repacked_to_f16x2(wa[j], a0 + 4 * j);
            e2m1x8_repacked_to_f16x2(wb[j], a1 + 4 * j);
        } else {
            e2m1x8_to_f16x2(wa[j], a0 + 4 * j);
            e2m1x8_to_f16x2(wb[j], a1 + 4 * j);
        }
#pragma unroll
        for (int i = 0; i < 4; i++) {
            a0[4 * j + i] = hmul2(a0[4 * j + i], sa[j >> 1]);
            a1[4 * j + i] = hmul2(a1[4 * j + i], sb[j >> 1]);
        }
    }
}

// The chunk's 8 MMA steps of one n-tile (see the mapping above), into c.
__device__ __forceinline__ void mma_steps(const uint32_t* a0, const uint32_t* a1, const Xs& x, float* c) {
    const uint32_t* xw = reinterpret_cast<const uint32_t*>(x.v);
#pragma unroll
    for (int s = 0; s < 8; s++) mma_f16(c, a0[2 * s], a1[2 * s], a0[2 * s + 1], a1[2 * s + 1], xw[2 * s], xw[2 * s + 1]);
}

// Weight layouts the K-splitting GEMV reads: ModelOpt's, `nvfp4_tile`'s, `nvfp4_repack`'s.
#define LAYOUT_MODELOPT 0
#define LAYOUT_TILED 1
#define LAYOUT_REPACKED 2

// NT n-tiles of 8 tokens (t ≤ 8·NT). A block of W warps owns one 16-row tile of one weight of
// the group and the whole of K: warp w takes the w-th of W contiguous ranges of chunks (the last
// ones may be short or empty) and keeps D of them in flight
// (the next loads are issued before a chunk's MMAs), so the weight stream never waits on the
// arithmetic. With XP (one n-tile only) the chunk's activations ride in the same pipeline.
// Each n-tile has one accumulator chain walking the chunks in the same order whatever NT is,
// so a token's result does not depend on the batch it is in. LAYOUT: how the weights are stored.
template <int NT, int W, int D, bool XP, int LAYOUT>
__device__ __forceinline__ void nvfp4_mma_gemv(const GemvGroup& grp, const uint16_t* __restrict__ xh,
                                               const float* __restrict__ xinv, int k, int t) {
    static_assert(!XP || NT == 1, "activations ride in the pipeline for one n-tile only");
    __shared__ float red[W][16][8 * NT];
    int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    int g = lane >> 2, q = lane & 3;
    int bid = blockIdx.x, gi = 0;
#pragma unroll
    for (int i = 1; i < GROUP_MAX; i++) gi += (i < grp.count && bid >= grp.tiles_end[i - 1]);
    const uint8_t* w = grp.w[gi];
    const uint8_t* scales = grp.s[gi];
    const int n = grp.n[gi];
    const int tile = bid - (gi ? grp.tiles_end[gi - 1] : 0);
    const int r0 = tile * 16 + g;
    const int chunks = (k + MMA_CHUNK - 1) / MMA_CHUNK;
    // Warp w takes the w-th of W contiguous ranges of chunks (the order nvfp4_mma_gemv_rows
    // reproduces).
    const int range = (chunks + W - 1) / W, first = warp * range;
    const int mine = max(0, min(range, chunks - first));
    auto k_of = [&](int i) { return (first + i) * MMA_CHUNK + 32 * q; };
    auto load = [&](int i) {
        return LAYOUT == LAYOUT_TILED ? load_chunk_tiled(w, scales, tile, chunks, first + i, lane) : load_chunk(w, scales, r0, n, k, k_of(i));
    };
    Chunk buf[D];
    Xs xbuf[XP ? D : 1];
    // The weights never change under a graph: their first loads go out before the wait for the
    // kernel that writes the activations (kernels/pdl.cuh).
#pragma unroll
    for (int d = 0; d < D; d++) buf[d] = d < mine ? load(d) : Chunk{};
    pdl_start();
#pragma unroll
    for (int d = 0; d < D; d++)
        if (XP) xbuf[XP ? d : 0] = load_x(xh, g, k, d < mine ? t : 0, k_of(d));
    float c[NT][4];
#pragma unroll
    for (int j = 0; j < NT; j++) c[j][0] = c[j][1] = c[j][2] = c[j][3] = 0.f;
    for (int base = 0; base < mine; base += D) {
#pragma unroll
        for (int d = 0; d < D; d++) {
            int i = base + d;
            if (i >= mine) break;  // uniform across the warp: mma.sync needs every lane
            Chunk cur = buf[d];
            Xs xcur = xbuf[XP ? d : 0];
            if (i + D < mine) {
                buf[d] = load(i + D);
                if (XP) xbuf[XP ? d : 0] = load_x(xh, g, k, t, k_of(i + D));
            }
            uint32_t a0[16], a1[16];
            decode_chunk<LAYOUT == LAYOUT_REPACKED>(cur, a0, a1);
#pragma unroll
            for (int j = 0; j < NT; j++) mma_steps(a0, a1, XP ? xcur : load_x(xh, 8 * j + g, k, t, k_of(i)), c[j]);
        }
    }
    // c[j]: (row g, tokens 8j+2q, +1) and (row g+8, the same tokens).
    constexpr int COLS = 8 * NT;
#pragma unroll
    for (int j = 0; j < NT; j++) {
        int col = 8 * j + 2 * q;
        red[warp][g][col] = c[j][0];
        red[warp][g][col + 1] = c[j][1];
        red[warp][g + 8][col] = c[j][2];
        red[warp][g + 8][col + 1] = c[j][3];
    }
    __syncthreads();
    float* y = grp.y[gi];
    const float* res = grp.r[gi];
    // The decode's 2^-7 (e2m1 · 2^-14 times scale · 2^7) and the activation's 2^e_t.
    const float alpha = grp.scale_2[gi] * 128.f;
    for (int i = tid; i < 16 * COLS; i += blockDim.x) {
        int row = i & 15, tok = i >> 4;
        float acc = 0.f;
#pragma unroll
        for (int wi = 0; wi < W; wi++) acc += red[wi][row][tok];
        int gr = tile * 16 + row;
        if (gr < n && tok < t) {
            size_t at = (size_t)tok * n + gr;
            float v = acc * alpha * xinv[tok];
            y[at] = res ? v + res[at] : v;
        }
    }
}

// The same product for batches (NT > 1) of wide weights. Each chunk's activations are NT·8
// token rows of 256 bytes; read from global memory on demand they stall every chunk (a 64-token
// gate/up ran at 7 % of copy bandwidth). Here the warps of a block split rows (one 16-row tile
// each) and all walk K in order, and the block stages each chunk's activations in shared memory
// ROWS_STAGES - 1 chunks ahead (cp.async), so the B fragments come from shared memory. The sum
// is folded range by range in the order of nvfp4_mma_gemv's MMA_WARPS warps (a fresh chain per
// range of ceil(C / MMA_WARPS) chunks, added to the total in range order, zeros for empty ranges
// included): its floats are bit-identical to that kernel's, so a token's result does not depend
// on the batch it is in or on which of the two ran.
#define ROWS_STAGES 3

// Shared-memory slot of 16-byte unit u (0..15) of token row r: conflict-free B-fragment reads
// (each quarter-warp's eight 16-byte loads land in eight different bank groups).
__device__ __forceinline__ int rows_swizzle(int u, int r) { return u ^ ((u >> 3) & 1) ^ ((r & 1) << 1); }

// With SPLIT (nvfp4_mma_split_nt*) a block walks one of the MMA_WARPS ranges only (blockIdx.y) and
// writes that range's chain to part[range][tile][token][row] for nvfp4_mma_split_reduce, which adds
// the ranges in order: the same floats again, for weights too narrow to give every SM a block of
// ROWS_WARPS tiles (the 9B's 4096-row down, o_proj and out_proj), where the K-splitting kernel
// re-read each token's activations from L2 once per tile.
template <int NT, int W, int D, bool SPLIT>
__device__ __forceinline__ void nvfp4_mma_gemv_rows(const GemvGroup& grp, const uint16_t* __restrict__ xh,
                                                    const float* __restrict__ xinv, int k, int t,
                                                    float* __restrict__ part) {
    __shared__ uint4 xs[ROWS_STAGES][8 * NT][16];
    int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    int g = lane >> 2, q = lane & 3;
    const int gt = blockIdx.x * W + warp;  // this warp's tile over the whole group
    const bool live = gt < grp.tiles_end[grp.count - 1];
    int gi = 0;
#pragma unroll
    for (int i = 1; i < GROUP_MAX; i++) gi += (i < grp.count && gt >= grp.tiles_end[i - 1]);
    const uint8_t* w = grp.w[gi];
    const uint8_t* scales = grp.s[gi];
    const int n = grp.n[gi];
    const int tile = gt - (gi ? grp.tiles_end[gi - 1] : 0);
    const int r0 = tile * 16 + g;
    const int chunks = (k + MMA_CHUNK - 1) / MMA_CHUNK;
    const int range = (chunks + MMA_WARPS - 1) / MMA_WARPS;
    const int c_begin = SPLIT ? min(chunks, (int)blockIdx.y * range) : 0;
    const int c_end = SPLIT ? min(chunks, c_begin + range) : chunks;
    auto k_of = [&](int i) { return i * MMA_CHUNK + 32 * q; };
    Chunk buf[D];
#pragma unroll
    for (int d = 0; d < D; d++)
        buf[d] = live && c_begin + d < c_end ? load_chunk(w, scales, r0, n, k, k_of(c_begin + d)) : Chunk{};
    pdl_start();
    // Chunk c's activations into slot c % ROWS_STAGES (zeros past t and k); one commit group
    // per chunk, empty past the end, so the wait counts stay uniform.
    auto stage = [&](int c) {
        if (c < c_end) {
            for (int i = tid; i < 8 * NT * 16; i += W * 32) {
                int r = i >> 4, u = i & 15, kk = c * MMA_CHUNK + 8 * u;
                uint4* dst = &xs[c % ROWS_STAGES][r][rows_swizzle(u, r)];
                if (r < t && kk < k)
                    cp_async16(dst, xh + (size_t)r * k + kk);
                else
                    *dst = make_uint4(0, 0, 0, 0);
            }
        }
        cp_async_commit();
    };
#pragma unroll
    for (int s = 0; s < ROWS_STAGES - 1; s++) stage(c_begin + s);
    float c[NT][4], total[NT][4];
#pragma unroll
    for (int j = 0; j < NT; j++)
#pragma unroll
        for (int e = 0; e < 4; e++) c[j][e] = total[j][e] = 0.f;
    int ranges_done = 0;
    for (int base = c_begin; base < c_end; base += D) {
#pragma unroll
        for (int d = 0; d < D; d++) {
            int i = base + d;
            if (i >= c_end) break;  // uniform across the block
            cp_async_wait<ROWS_STAGES - 2>();
            __syncthreads();  // chunk i visible to all; slot (i - 1) % S free again
            stage(i + ROWS_STAGES - 1);
            if (live) {
                Chunk cur = buf[d];
                if (i + D < c_end) buf[d] = load_chunk(w, scales, r0, n, k, k_of(i + D));
                uint32_t a0[16], a1[16];
                decode_chunk<true>(cur, a0, a1);
                const int slot = i % ROWS_STAGES;
#pragma unroll
                for (int j = 0; j < NT; j++) {
                    const int r = 8 * j + g;
                    Xs x;
#pragma unroll
                    for (int v = 0; v < 4; v++) x.v[v] = xs[slot][r][rows_swizzle(4 * q + v, r)];
                    mma_steps(a0, a1, x, c[j]);
                }
                if (!SPLIT && ((i + 1) % range == 0 || i + 1 == chunks)) {
#pragma unroll
                    for (int j = 0; j < NT; j++)
#pragma unroll
                        for (int e = 0; e < 4; e++) {
                            total[j][e] += c[j][e];
                            c[j][e] = 0.f;
                        }
                    ranges_done++;
                }
            }
        }
    }
    cp_async_wait<0>();
    if (!live) return;
    if (SPLIT) {  // this range's chain (zeros for an empty range), reduced in range order later
        const int tiles = grp.tiles_end[grp.count - 1];
        float* p = part + ((size_t)blockIdx.y * tiles + gt) * (8 * NT) * 16;
#pragma unroll
        for (int j = 0; j < NT; j++)
#pragma unroll
            for (int e = 0; e < 4; e++) p[(8 * j + 2 * q + (e & 1)) * 16 + g + 8 * (e >> 1)] = c[j][e];
        return;
    }
    for (; ranges_done < MMA_WARPS; ranges_done++)
#pragma unroll
        for (int j = 0; j < NT; j++)
#pragma unroll
            for (int e = 0; e < 4; e++) total[j][e] += 0.f;
    float* y = grp.y[gi];
    const float* res = grp.r[gi];
    const float alpha = grp.scale_2[gi] * 128.f;
#pragma unroll
    for (int j = 0; j < NT; j++)
#pragma unroll
        for (int e = 0; e < 4; e++) {
            int gr = tile * 16 + g + 8 * (e >> 1), tok = 8 * j + 2 * q + (e & 1);
            if (gr < n && tok < t) {
                size_t at = (size_t)tok * n + gr;
                float v = total[j][e] * alpha * xinv[tok];
                y[at] = res ? v + res[at] : v;
            }
        }
}

#define ROWS_ENTRY(NAME, NT, W, MINB)                                                                      \
    extern "C" __global__ void __launch_bounds__(W * 32, MINB)                                             \
        NAME(const GemvGroup grp, const uint16_t* __restrict__ xh, const float* __restrict__ xinv, int k,  \
             int t) { /* pdl_wait() in nvfp4_mma_gemv_rows, after its first weight loads */           \
        nvfp4_mma_gemv_rows<NT, W, MMA_DEPTH, false>(grp, xh, xinv, k, t, nullptr);                         \
    }
#define SPLIT_ENTRY(NAME, NT, W, MINB)                                                                     \
    extern "C" __global__ void __launch_bounds__(W * 32, MINB)                                             \
        NAME(const GemvGroup grp, const uint16_t* __restrict__ xh, const float* __restrict__ xinv, int k,  \
             int t, float* __restrict__ part) { /* pdl_wait() in nvfp4_mma_gemv_rows */                  \
        nvfp4_mma_gemv_rows<NT, W, MMA_DEPTH, true>(grp, xh, xinv, k, t, part);                             \
    }
// Four warps (64 rows) per block: on the 9B's gate/up at 32 tokens 8 warps took 69 µs against
// 44, and at 16 tokens (two n-tiles) the K-splitting kernel was as fast (selftest's "gemv
// kernels" lines, 2026-12-01), so there are 32- and 64-token kernels only.
ROWS_ENTRY(nvfp4_mma_rows_nt4, 4, ROWS_WARPS, 2)
ROWS_ENTRY(nvfp4_mma_rows_nt8, 8, ROWS_WARPS, 1)
SPLIT_ENTRY(nvfp4_mma_split_nt4, 4, ROWS_WARPS, 2)
SPLIT_ENTRY(nvfp4_mma_split_nt8, 8, ROWS_WARPS, 1)

// The ranges of nvfp4_mma_split_nt* added in range order (as nvfp4_mma_gemv_nt*'s warps are),
// then the epilogue of both: y = acc · scale_2 · 2^7 · 2^-e_t (+ residual). One thread per
// (token, row) of the group, rows fastest; `cols` = 8·NT, the part rows per tile.
extern "C" __global__ void nvfp4_mma_split_reduce(const GemvGroup grp, const float* __restrict__ part,
                                                  const float* __restrict__ xinv, int t, int cols) {
    pdl_start();
    const int tiles = grp.tiles_end[grp.count - 1];
    const size_t rows = (size_t)tiles * 16;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < rows * t; i += (size_t)gridDim.x * blockDim.x) {
        const int tok = i / rows, grow = i % rows, gt = grow / 16, row = grow % 16;
        int gi = 0;
#pragma unroll
        for (int c = 1; c < GROUP_MAX; c++) gi += (c < grp.count && gt >= grp.tiles_end[c - 1]);
        const int gr = (gt - (gi ? grp.tiles_end[gi - 1] : 0)) * 16 + row, n = grp.n[gi];
        if (gr >= n) continue;
        float acc = 0.f;
#pragma unroll
        for (int r = 0; r < MMA_WARPS; r++) acc += part[(((size_t)r * tiles + gt) * cols + tok) * 16 + row];
        const size_t at = (size_t)tok * n + gr;
        const float v = acc * (grp.scale_2[gi] * 128.f) * xinv[tok];
        grp.y[gi][at] = grp.r[gi] ? v + grp.r[gi][at] : v;
    }
}

#define GEMV_ENTRY(NAME, NT, W, D, XP, LAYOUT, MINB)                                                         \
    extern "C" __global__ void __launch_bounds__(W * 32, MINB)                                             \
        NAME(const GemvGroup grp, const uint16_t* __restrict__ xh, const float* __restrict__ xinv, int k,  \
             int t) { /* pdl_wait() in nvfp4_mma_gemv, after its first weight loads */                \
        nvfp4_mma_gemv<NT, W, D, XP, LAYOUT>(grp, xh, xinv, k, t);                                          \
    }
// Three blocks per SM (≤ 85 registers) for one n-tile, two (≤ 128) for two, else one (no
// spills). Measured on the 9B's shapes (selftest --gemv-sweep): deeper pipelines, activations in
// the pipeline, 2/4/16 warps or a tile-contiguous weight layout were no faster or ≤ 6 % faster.
GEMV_ENTRY(nvfp4_mma_gemv_nt1, 1, MMA_WARPS, MMA_DEPTH, false, LAYOUT_REPACKED, 3)
GEMV_ENTRY(nvfp4_mma_gemv_nt2, 2, MMA_WARPS, MMA_DEPTH, false, LAYOUT_REPACKED, 2)
GEMV_ENTRY(nvfp4_mma_gemv_nt4, 4, MMA_WARPS, MMA_DEPTH, false, LAYOUT_REPACKED, 1)
GEMV_ENTRY(nvfp4_mma_gemv_nt8, 8, MMA_WARPS, MMA_DEPTH, false, LAYOUT_REPACKED, 1)
// Twice the chunks in flight per warp, two blocks per SM: for weights of too few tiles to give
// every SM three blocks (down, o_proj: 256 tiles), where the shallow pipeline leaves the memory
// system idle (down at 1 token: 82 % of copy bandwidth instead of 63 %, H100). Same sums, same
// order: bit-identical to nt1.
GEMV_ENTRY(nvfp4_mma_gemv_nt1_deep, 1, MMA_WARPS, 2 * MMA_DEPTH, false, LAYOUT_REPACKED, 2)
// Weights in ModelOpt's layout (W4A4 layers, whose prefill GEMM reads that layout, decoding up to 8
// fake-quantized tokens through this GEMV).
GEMV_ENTRY(nvfp4_mma_gemv_nt1_modelopt, 1, MMA_WARPS, MMA_DEPTH, false, LAYOUT_MODELOPT, 3)
// Geometry sweep (selftest --gemv-sweep) on ModelOpt's layout or the tiled one (both decoded the
// ModelOpt way): name = warps, depth, x: activations in the pipeline, t: tiled layout.
GEMV_ENTRY(gemv_sweep_w8d4, 1, 8, 4, false, LAYOUT_MODELOPT, 2)
GEMV_ENTRY(gemv_sweep_w8d2t, 1, 8, 2, false, LAYOUT_TILED, 3)
GEMV_ENTRY(gemv_sweep_w4d2xt, 1, 4, 2, true, LAYOUT_TILED, 4)
GEMV_ENTRY(gemv_sweep_w2d4t, 1, 2, 4, false, LAYOUT_TILED, 8)

// x [T, K] f32 → f16 · 2^e_t per row (one block of ROWSCALE_THREADS per row; K % 8 == 0), e_t
// putting the row's amax in [2^14, 2^15), in the GEMV's pair order: within each 8, (x3,x7)
// (x2,x6) (x1,x5) (x0,x4). inv[t] = 2^-e_t. An all-zero row keeps e_t = 0. Each thread holds
// up to ROWSCALE_HELD groups of 8 in registers (K ≤ 32768 is read once), beyond that re-reads.
#define ROWSCALE_HELD 4
extern "C" __global__ void __launch_bounds__(ROWSCALE_THREADS) f16_rowscaled(const float* __restrict__ x,
                                                                               uint16_t* __restrict__ out,
                                                                               float* __restrict__ inv, int k) {
    pdl_start();
    __shared__ float part[ROWSCALE_THREADS / 32];
    const float4* row = reinterpret_cast<const float4*>(x + (size_t)blockIdx.x * k);
    const int groups = k / 8;
    float4 held[ROWSCALE_HELD][2];
    float m = 0.f;
#pragma unroll
    for (int j = 0; j < ROWSCALE_HELD; j++) {
        int gidx = threadIdx.x + j * ROWSCALE_THREADS;
        held[j][0] = held[j][1] = make_float4(0.f, 0.f, 0.f, 0.f);
        if (gidx < groups) {
            held[j][0] = __ldg(row + 2 * gidx);
            held[j][1] = __ldg(row + 2 * gidx + 1);
        }
        const float4 a = held[j][0], b = held[j][1];
        m = fmaxf(m, fmaxf(fmaxf(fmaxf(fabsf(a.x), fabsf(a.y)), fmaxf(fabsf(a.z), fabsf(a.w))),
                           fmaxf(fmaxf(fabsf(b.x), fabsf(b.y)), fmaxf(fabsf(b.z), fabsf(b.w)))));
    }
    for (int gidx = threadIdx.x + ROWSCALE_HELD * ROWSCALE_THREADS; gidx < groups; gidx += ROWSCALE_THREADS) {
        const float4 a = __ldg(row + 2 * gidx), b = __ldg(row + 2 * gidx + 1);
        m = fmaxf(m, fmaxf(fmaxf(fmaxf(fabsf(a.x), fabsf(a.y)), fmaxf(fabsf(a.z), fabsf(a.w))),
                           fmaxf(fmaxf(fabsf(b.x), fabsf(b.y)), fmaxf(fabsf(b.z), fabsf(b.w)))));
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
    if ((threadIdx.x & 31) == 0) part[threadIdx.x >> 5] = m;
    __syncthreads();
    m = 0.f;
#pragma unroll
    for (int i = 0; i < ROWSCALE_THREADS / 32; i++) m = fmaxf(m, part[i]);
    int e = rowscale_exponent(m);
    float s = ldexpf(1.f, e);
    if (threadIdx.x == 0) inv[blockIdx.x] = ldexpf(1.f, -e);
    uint4* o = reinterpret_cast<uint4*>(out + (size_t)blockIdx.x * k);
    auto put = [&](int gidx, float4 a, float4 b) {
        o[gidx] = make_uint4(f16x2_of(a.w * s, b.w * s), f16x2_of(a.z * s, b.z * s), f16x2_of(a.y * s, b.y * s),
                             f16x2_of(a.x * s, b.x * s));
    };
#pragma unroll
    for (int j = 0; j < ROWSCALE_HELD; j++) {
        int gidx = threadIdx.x + j * ROWSCALE_THREADS;
        if (gidx < groups) put(gidx, held[j][0], held[j][1]);
    }
    for (int gidx = threadIdx.x + ROWSCALE_HELD * ROWSCALE_THREADS; gidx < groups; gidx += ROWSCALE_THREADS)
        put(gidx, __ldg(row + 2 * gidx), __ldg(row + 2 * gidx + 1));
}
