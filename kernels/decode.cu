// Decode-step kernels over a batch of sequences, one token each, reading per-sequence state from
// pools by index and per-step values (positions, slots, block tables) from device memory, so one
// captured CUDA graph serves every step of a batch size. CPU references: fp4_kernels::ops
// (rope_at, kv_write, paged_attention, conv1d_step, gdn_step).
//
// Layouts: paged KV pools [blocks · block_size, Hkv, D] (row = block · block_size + offset; a
// sequence's table row holds its block ids); GDN pools [slots, K-1, C] (conv inputs) and
// [slots, Hv, dk, dv] (recurrent state).
#include <stdint.h>
#include "pdl.cuh"
#include "geometry.h"

__device__ __forceinline__ float silu_f(float x) { return x / (1.f + expf(-x)); }

// In-place rotate-half RoPE of x [B, heads, head_dim], token b at position pos[b].
extern "C" __global__ void rope_at_f32(float* __restrict__ x, const float* __restrict__ inv_freq,
                                       const uint32_t* __restrict__ pos, int heads, int head_dim, int half,
                                       size_t n) {
    pdl_start();
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        int j = i % half;
        size_t th = i / half;
        int t = th / heads;
        float ang = (float)pos[t] * inv_freq[j];
        float c = cosf(ang), s = sinf(ang);
        float* hd = x + th * head_dim;
        float x1 = hd[j], x2 = hd[j + half];
        hd[j] = x1 * c + (-x2 * s);
        hd[j + half] = x2 * c + x1 * s;
    }
}

// k, v [B, row] into the pools at each token's position (one block per token).
extern "C" __global__ void kv_write_paged(const float* __restrict__ k, const float* __restrict__ v,
                                          float* __restrict__ kp, float* __restrict__ vp,
                                          const uint32_t* __restrict__ table, const uint32_t* __restrict__ pos,
                                          int row, int max_blocks, int block_size) {
    pdl_start();
    int b = blockIdx.x;
    uint32_t p = pos[b];
    size_t dst = ((size_t)table[(size_t)b * max_blocks + p / block_size] * block_size + p % block_size) * row;
    for (int i = threadIdx.x; i < row; i += blockDim.x) {
        kp[dst + i] = k[(size_t)b * row + i];
        vp[dst + i] = v[(size_t)b * row + i];
    }
}

// Split-K decode attention (flash-decoding) with the query heads of one KV head together
// (GQA): grid (B, Hkv, splits), PA_THREADS threads, G = Hq/Hkv ≤ PA_MAX_G heads per block, so
// each K and V row is read once for all of them. Split s of token b takes keys
// [s·c, min((s+1)·c, L)) with L = pos[b] + 1 and c = ceil(L / splits), and writes each head's
// running max, sum and unnormalised output to part [B, Hq, splits, D + 2];
// paged_attention_merge combines the splits. A warp scores PA_GROUP keys at once (lanes split
// D, the K rows in registers, the dots of every head and key reduced together); a warp per head
// does the tile's softmax; each warp sums V over its own keys (PA_GROUP rows in flight per
// lane, where a thread per dim walking every key kept only PA_GROUP loads in flight and ran at a
// third of DRAM bandwidth), and the warps' sums are added at the end.
// Compiled for MAXG ≤ PA_MAX_G heads per block of MAXD ≤ PA_MAX_D dims, and for the 9B's 4
// heads of 256 (paged_attention_split_g4d256): the loops over heads and dims are unrolled to
// the bounds, so the general bounds would leave most of the 9B's lanes predicated off and hold
// twice the registers (three blocks per SM instead of more).
#define PA_TILE 32
#define PA_GROUP 4
template <int PA_MAX_G_, int PA_MAX_D_>
__device__ __forceinline__ void paged_attention_split_impl(const float* __restrict__ q, const float* __restrict__ kp,
                                                           const float* __restrict__ vp,
                                                           const uint32_t* __restrict__ table,
                                                           const uint32_t* __restrict__ pos, float* __restrict__ part,
                                                           int hq, int hkv, int d, int max_blocks, int block_size,
                                                           float scale) {
    __shared__ float qs[PA_MAX_G_][PA_MAX_D_];
    __shared__ float sc[PA_MAX_G_][PA_TILE];
    __shared__ size_t off[PA_TILE];
    __shared__ float ms[PA_MAX_G_], ss[PA_MAX_G_], cs[PA_MAX_G_];  // running max and sum, tile rescale
    static_assert(PA_TILE == 32, "the tile softmax puts one key on each lane of a warp");
    int b = blockIdx.x, kvh = blockIdx.y, s = blockIdx.z, splits = gridDim.z, tid = threadIdx.x;
    int lane = tid % 32, warp = tid / 32, warps = PA_THREADS / 32;
    const int G = hq / hkv;
    int len = pos[b] + 1;
    int per = (len + splits - 1) / splits;
    int j_begin = s * per, j_end = min(len, j_begin + per);
    for (int g = 0; g < G; g++) {
        const float* qr = q + ((size_t)b * hq + kvh * G + g) * d;
        for (int i = tid; i < d; i += PA_THREADS) qs[g][i] = qr[i];
    }
    __syncthreads();
    const uint32_t* tb = table + (size_t)b * max_blocks;
    // Lane l of each warp owns dims l, l + 32, … of every head's output over the warp's keys.
    constexpr int R = PA_MAX_D_ / 32;
    float acc[PA_MAX_G_][R];
    if (tid < PA_MAX_G_) ms[tid] = -INFINITY, ss[tid] = 0.f;
    __syncthreads();
#pragma unroll
    for (int g = 0; g < PA_MAX_G_; g++)
#pragma unroll
        for (int r = 0; r < R; r++) acc[g][r] = 0.f;
    for (int j0 = j_begin; j0 < j_end; j0 += PA_TILE) {
        int n = min(PA_TILE, j_end - j0);
        // The tile's key rows, looked up once: every K/V load below depends on shared memory only.
        if (tid < n) {
            int j = j0 + tid;
            off[tid] = (((size_t)tb[j / block_size] * block_size + j % block_size) * hkv + kvh) * d;
        }
        __syncthreads();
        for (int jj0 = warp; jj0 < n; jj0 += warps * PA_GROUP) {
            float kr[PA_GROUP][PA_MAX_D_ / 32];
#pragma unroll
            for (int u = 0; u < PA_GROUP; u++) {
                int jj = jj0 + u * warps;
#pragma unroll
                for (int r = 0; r < PA_MAX_D_ / 32; r++) {
                    int i = lane + 32 * r;
                    kr[u][r] = jj < n && i < d ? kp[off[jj] + i] : 0.f;
                }
            }
            // Each lane's partial dots of every (head, key), then one reduction of all of them
            // across the warp: each shuffle step hands half of the values still held to the
            // partner lane and keeps the other half, so N = heads × keys sums take
            // N/2 + N/4 + … + 1 (+ 1) shuffles instead of 5 each.
            constexpr int N = PA_MAX_G_ * PA_GROUP;
            static_assert(N <= 32 && (N & (N - 1)) == 0, "heads × keys per warp: a power of two ≤ 32");
            float v[N];
#pragma unroll
            for (int g = 0; g < PA_MAX_G_; g++)
#pragma unroll
                for (int u = 0; u < PA_GROUP; u++) {
                    float dot = 0.f;
#pragma unroll
                    for (int r = 0; r < PA_MAX_D_ / 32; r++)
                        if (g < G && lane + 32 * r < d) dot += qs[g][lane + 32 * r] * kr[u][r];
                    v[g * PA_GROUP + u] = dot;
                }
            int idx = 0;  // which of the N sums this lane ends with
#pragma unroll
            for (int st = 0; st < 5; st++) {
                const int o = 16 >> st, cnt = N >> st;
                if (cnt > 1) {
                    const bool upper = lane & o;
#pragma unroll
                    for (int i = 0; i < cnt / 2; i++) {
                        float send = upper ? v[i] : v[i + cnt / 2], keep = upper ? v[i + cnt / 2] : v[i];
                        v[i] = keep + __shfl_xor_sync(0xffffffffu, send, o);
                    }
                    idx += upper ? cnt / 2 : 0;
                } else {
                    v[0] += __shfl_xor_sync(0xffffffffu, v[0], o);
                }
            }
            {
                int g = idx / PA_GROUP, u = idx % PA_GROUP, jj = jj0 + u * warps;
                if ((lane & (32 / N - 1)) == 0 && g < G && jj < n) sc[g][jj] = v[0] * scale;
            }
        }
        __syncthreads();
        // The tile's online softmax, one warp per head with lane jj on key jj (PA_TILE = 32):
        // max, rescale factor, exponentials and their sum by shuffles, instead of every thread
        // walking the tile's scores in shared memory three times.
        for (int g = warp; g < G; g += warps) {
            float m_old = ms[g], sv = lane < n ? sc[g][lane] : -INFINITY, tmax = sv;
#pragma unroll
            for (int o = 16; o > 0; o >>= 1) tmax = fmaxf(tmax, __shfl_xor_sync(0xffffffffu, tmax, o));
            float new_m = fmaxf(m_old, tmax), e = lane < n ? expf(sv - new_m) : 0.f, tsum = e;
#pragma unroll
            for (int o = 16; o > 0; o >>= 1) tsum += __shfl_xor_sync(0xffffffffu, tsum, o);
            if (lane < n) sc[g][lane] = e;
            __syncwarp();
            if (lane == 0) {
                float c = expf(m_old - new_m);
                ms[g] = new_m, ss[g] = ss[g] * c + tsum, cs[g] = c;
            }
        }
        __syncthreads();
        // The V sum: each warp over its keys of the tile (as in the scoring), PA_GROUP rows in
        // flight per lane, in key order within the warp.
#pragma unroll
        for (int g = 0; g < PA_MAX_G_; g++)
#pragma unroll
            for (int r = 0; r < R; r++) acc[g][r] *= cs[g];
        for (int jj0 = warp; jj0 < n; jj0 += warps * PA_GROUP) {
            float vr[PA_GROUP][R];
#pragma unroll
            for (int u = 0; u < PA_GROUP; u++) {
                int jj = jj0 + u * warps;
#pragma unroll
                for (int r = 0; r < R; r++) {
                    int i = lane + 32 * r;
                    vr[u][r] = jj < n && i < d ? vp[off[jj] + i] : 0.f;
                }
            }
#pragma unroll
            for (int u = 0; u < PA_GROUP; u++) {
                int jj = jj0 + u * warps;
                if (jj >= n) break;
#pragma unroll
                for (int g = 0; g < PA_MAX_G_; g++) {
                    float p = g < G ? sc[g][jj] : 0.f;
#pragma unroll
                    for (int r = 0; r < R; r++) acc[g][r] += p * vr[u][r];
                }
            }
        }
        __syncthreads();
    }
    // The warps' partial outputs added in warp order, one head at a time.
    __shared__ float red[PA_THREADS / 32][PA_MAX_D_];
#pragma unroll
    for (int g = 0; g < PA_MAX_G_; g++) {
        if (g >= G) continue;
#pragma unroll
        for (int r = 0; r < R; r++) {
            int i = lane + 32 * r;
            if (i < d) red[warp][i] = acc[g][r];
        }
        __syncthreads();
        float* o = part + (((size_t)b * hq + kvh * G + g) * splits + s) * (d + 2);
        for (int i = tid; i < d; i += PA_THREADS) {
            float t = 0.f;
#pragma unroll
            for (int w = 0; w < PA_THREADS / 32; w++) t += red[w][i];
            o[i] = t;
        }
        if (tid == 0) {
            o[d] = ms[g];
            o[d + 1] = ss[g];
        }
        __syncthreads();
    }
}

extern "C" __global__ void __launch_bounds__(PA_THREADS)
    paged_attention_split(const float* __restrict__ q, const float* __restrict__ kp, const float* __restrict__ vp,
                          const uint32_t* __restrict__ table, const uint32_t* __restrict__ pos,
                          float* __restrict__ part, int hq, int hkv, int d, int max_blocks, int block_size,
                          float scale) {
    pdl_start();
    paged_attention_split_impl<PA_MAX_G, PA_MAX_D>(q, kp, vp, table, pos, part, hq, hkv, d, max_blocks, block_size,
                                                   scale);
}

extern "C" __global__ void __launch_bounds__(PA_THREADS)
    paged_attention_split_g4d256(const float* __restrict__ q, const float* __restrict__ kp,
                                 const float* __restrict__ vp, const uint32_t* __restrict__ table,
                                 const uint32_t* __restrict__ pos, float* __restrict__ part, int hq, int hkv, int d,
                                 int max_blocks, int block_size, float scale) {
    pdl_start();
    paged_attention_split_impl<4, 256>(q, kp, vp, table, pos, part, hq, hkv, d, max_blocks, block_size, scale);
}

// Combines the splits of each (token, head): block bh, PA_MERGE_THREADS threads; thread s < splits
// (≤ PA_MAX_SPLITS) takes split s's max and sum, the block reduces them, then each output dim
// sums the splits' unnormalised outputs with their weights (walking the splits in order).
extern "C" __global__ void __launch_bounds__(PA_MERGE_THREADS)
    paged_attention_merge(const float* __restrict__ part, float* __restrict__ out, int splits, int d) {
    pdl_start();
    __shared__ float wsh[PA_MAX_SPLITS], red[PA_MERGE_THREADS / 32];
    size_t bh = blockIdx.x;
    const float* p = part + bh * splits * (d + 2);
    int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    float ms = tid < splits ? p[tid * (d + 2) + d] : -INFINITY;
    float mx = ms;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
    if (lane == 0) red[warp] = mx;
    __syncthreads();
    mx = -INFINITY;
#pragma unroll
    for (int i = 0; i < PA_MERGE_THREADS / 32; i++) mx = fmaxf(mx, red[i]);
    __syncthreads();
    float w = tid < splits && ms != -INFINITY ? expf(ms - mx) : 0.f;
    if (tid < splits) wsh[tid] = w;
    float den = tid < splits && w != 0.f ? w * p[tid * (d + 2) + d + 1] : 0.f;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) den += __shfl_xor_sync(0xffffffffu, den, o);
    if (lane == 0) red[warp] = den;
    __syncthreads();
    den = 0.f;
#pragma unroll
    for (int i = 0; i < PA_MERGE_THREADS / 32; i++) den += red[i];
    for (int i = tid; i < d; i += PA_MERGE_THREADS) {
        float num = 0.f;
#pragma unroll 8
        for (int s = 0; s < splits; s++) num += wsh[s] * p[s * (d + 2) + i];
        out[bh * d + i] = num / den;
    }
}

// Causal-conv steps + SiLU: sequence b's state pool [slots, K-1, C] at slots[b] takes its R
// tokens x rows b·R .. (b+1)·R in order, the state after row r going to slots_out[r] (R = 1 and
// slots_out = slots: the in-place step; R > 1: a speculative verify keeps the state after each
// draft). w [C, K]. Grid (C / 256, B).
extern "C" __global__ void conv1d_step_slots(const float* __restrict__ x, float* __restrict__ pool,
                                             const float* __restrict__ w, const uint32_t* __restrict__ slots,
                                             const uint32_t* __restrict__ slots_out, float* __restrict__ y,
                                             int c_len, int k, int rows_per_seq) {
    pdl_start();
    int c = blockIdx.x * blockDim.x + threadIdx.x, b = blockIdx.y;
    if (c >= c_len) return;
    const float* st = pool + (size_t)slots[b] * (k - 1) * c_len;
    float prev[MAX_CONV_K];
#pragma unroll
    for (int j = 0; j < MAX_CONV_K - 1; j++)
        if (j < k - 1) prev[j] = st[(size_t)j * c_len + c];
    for (int t = 0; t < rows_per_seq; t++) {
        size_t row = (size_t)b * rows_per_seq + t;
        float xin = x[row * c_len + c];
        float acc = w[(size_t)c * k + k - 1] * xin;
#pragma unroll
        for (int j = 0; j < MAX_CONV_K - 1; j++)
            if (j < k - 1) acc += w[(size_t)c * k + j] * prev[j];
        // Shift in xin (compile-time indices: prev stays in registers).
#pragma unroll
        for (int j = 0; j < MAX_CONV_K - 1; j++)
            if (j < k - 1) prev[j] = j + 1 < k - 1 ? prev[j + 1] : xin;
        float* out = pool + (size_t)slots_out[row] * (k - 1) * c_len;
#pragma unroll
        for (int j = 0; j < MAX_CONV_K - 1; j++)
            if (j < k - 1) out[(size_t)j * c_len + c] = prev[j];
        y[row * c_len + c] = silu_f(acc);
    }
}

// Gated-delta-rule steps (the recurrent form of gdn.cu) on the state pool [slots, Hv, dk, dv]:
// sequence b's state at slots[b] takes its R tokens (rows b·R .. (b+1)·R of q, k, v, g, beta) in
// order and the state after row r goes to slots_out[r] (R = 1, slots_out = slots: in place).
// Grid (dv / 32, Hv, B), GDN_STEP_THREADS threads: thread (r, lane) owns column 32·blockIdx.x +
// lane for rows r·dk/4 .. (r+1)·dk/4 in registers (dk ≤ 128) across the R tokens, so state loads
// are coalesced rows of 32 columns, read once; sums over rows meet in shared memory.
extern "C" __global__ void gdn_step_slots(const float* __restrict__ q, const float* __restrict__ k,
                                          const float* __restrict__ v, const float* __restrict__ g,
                                          const float* __restrict__ beta, float* __restrict__ pool,
                                          const uint32_t* __restrict__ slots, const uint32_t* __restrict__ slots_out,
                                          float* __restrict__ out, int hk, int hv, int dk, int dv, int rows_per_seq) {
    pdl_start();
    __shared__ float ks[GDN_STEP_MAX_DK], qs[GDN_STEP_MAX_DK], red[4][32], part[2][4];
    int tid = threadIdx.x, lane = tid & 31, r = tid >> 5;
    int h = blockIdx.y, b = blockIdx.z, j = blockIdx.x * 32 + lane;
    int kh = h / (hv / hk);
    bool on = j < dv;
    int rows = dk / 4, i0 = r * rows;
    const float* st = pool + ((size_t)slots[b] * hv + h) * dk * dv;
    float s[GDN_STEP_MAX_DK / 4];
    // Every load issued before the first use (predicated, no branch between them): the state
    // is one DRAM round trip, not one per row.
#pragma unroll
    for (int i = 0; i < GDN_STEP_MAX_DK / 4; i++) {
        float x = 0.f;
        if (on && i < rows) x = st[(size_t)(i0 + i) * dv + j];
        s[i] = x;
    }
    // Each token's shared values are written only after a barrier that every read of the
    // token before has passed.
    for (int t = 0; t < rows_per_seq; t++) {
        size_t tok = (size_t)b * rows_per_seq + t;
        const float* kt = k + (tok * hk + kh) * dk;
        const float* qt = q + (tok * hk + kh) * dk;
        float ssk = 0.f, ssq = 0.f;
        for (int i = tid; i < dk; i += GDN_STEP_THREADS) {
            ssk += kt[i] * kt[i];
            ssq += qt[i] * qt[i];
        }
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            ssk += __shfl_xor_sync(0xffffffffu, ssk, o);
            ssq += __shfl_xor_sync(0xffffffffu, ssq, o);
        }
        if (lane == 0) part[0][r] = ssk, part[1][r] = ssq;
        __syncthreads();
        float rk = 1.f / sqrtf(part[0][0] + part[0][1] + part[0][2] + part[0][3] + 1e-6f);
        float rq = 1.f / sqrtf(part[1][0] + part[1][1] + part[1][2] + part[1][3] + 1e-6f);
        for (int i = tid; i < dk; i += GDN_STEP_THREADS) {
            ks[i] = kt[i] * rk;
            qs[i] = qt[i] * rq / sqrtf((float)dk);
        }
        __syncthreads();
        size_t th = tok * hv + h;
        float decay = expf(g[th]), bt = beta[th];
        float kv = 0.f;
#pragma unroll
        for (int i = 0; i < GDN_STEP_MAX_DK / 4; i++)
            if (i < rows) {
                s[i] *= decay;
                kv += s[i] * ks[i0 + i];
            }
        red[r][lane] = kv;
        __syncthreads();
        kv = red[0][lane] + red[1][lane] + red[2][lane] + red[3][lane];
        float delta = on ? (v[th * dv + j] - kv) * bt : 0.f;
        float o = 0.f;
        float* so = pool + ((size_t)slots_out[tok] * hv + h) * dk * dv;
#pragma unroll
        for (int i = 0; i < GDN_STEP_MAX_DK / 4; i++)
            if (i < rows) {
                s[i] += ks[i0 + i] * delta;
                o += s[i] * qs[i0 + i];
                if (on) so[(size_t)(i0 + i) * dv + j] = s[i];
            }
        __syncthreads();
        red[r][lane] = o;
        __syncthreads();
        if (r == 0 && on) out[th * dv + j] = red[0][lane] + red[1][lane] + red[2][lane] + red[3][lane];
    }
}

// The GDN decode step fused after the conv: gates, l2norm of q and k, the delta rule and the
// gated RMSNorm, for one (value head, sequence) per block. `mixed` is the conv output [rows,
// 2·Hk·dk + Hv·dv] (q | k | v), b and a [rows, Hv] the gate projections, z [rows, Hv·dv]; out
// [rows, Hv·dv] is the normed, gated output out_proj reads. Sequence b's state at slots[b] takes its
// R = rows_per_seq tokens (rows b·R .. (b+1)·R) in order, the state after row r going to
// slots_out[r] (R = 1, slots_out = slots: the in-place decode step; R > 1: a speculative verify,
// which keeps the state after every draft so a rejected one costs no recompute). The same
// arithmetic as gdn_gates_f32, gdn_step_slots and rms_norm_gated_f32 in a row, minus the
// launches and copies between them.
// A block is CG column groups of 32 × 4 row groups (dk, dv ≤ 128, dk % 4 == 0): thread (cg, r,
// lane) owns column 32·(CG·blockIdx.z + cg) + lane for rows r·dk/4 … in registers, as in
// gdn_step_slots. With CG·32 ≥ dv a block holds the whole head and applies the gated norm itself;
// with fewer (gdn_decode_cols, CG = 1: four times the blocks, so a batch of one sequence reads its
// 2 MiB of state per layer with 128 blocks instead of 32) out gets the head's raw outputs and
// rms_norm_gated_f16 normalises them after.
// Compiled for any dk, dv ≤ 128 (gdn_decode_fused) and for the 9B's 128 × 128
// (gdn_decode_fused_k128v128, gdn_decode_cols_k128v128): with the sizes known, the 32 state rows
// a thread holds sit at constant offsets from one address, so the kernel fits two blocks per SM
// (64 registers, no spills) instead of one (128 registers), and the state loads of one block
// overlap another's arithmetic (at 32 sequences it ran at 33 % of DRAM bandwidth with one).
template <int DK, int DV, int CG, bool MULTI>
__device__ __forceinline__ void gdn_decode_fused_impl(const float* __restrict__ mixed, const float* __restrict__ b_proj,
                     const float* __restrict__ a_proj, const float* __restrict__ a_log,
                     const float* __restrict__ dt_bias, const float* __restrict__ z, const float* __restrict__ norm_w,
                     float* __restrict__ pool, const uint32_t* __restrict__ slots,
                     const uint32_t* __restrict__ slots_out, float* __restrict__ out, int hk, int hv, int dk_,
                     int dv_, float eps, int rows_per_seq) {
    const int dk = DK ? DK : dk_, dv = DV ? DV : dv_;
    const bool whole_head = CG * 32 >= dv;
    __shared__ float ks[GDN_STEP_MAX_DK], qs[GDN_STEP_MAX_DK], os[GDN_FUSED_MAX_D], red[CG][4][32], part[2][4], nsum[4];
    int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, cg = warp >> 2, r = warp & 3;
    int h = blockIdx.x, b = blockIdx.y, j = (CG * blockIdx.z + cg) * 32 + lane;
    int kh = h / (hv / hk);
    // This thread's slice of the state, loaded before the wait: the pool was last written by this
    // layer a step ago and the slot table before the step (kernels/pdl.cuh), so the largest read
    // overlaps the kernel before and the norms below instead of following them.
    bool on = j < dv;
    const float* st = pool + ((size_t)slots[b] * hv + h) * dk * dv;
    int rows = dk / 4, i0 = r * rows;
    float s[GDN_STEP_MAX_DK / 4];
#pragma unroll
    for (int i = 0; i < GDN_STEP_MAX_DK / 4; i++) {
        float v = 0.f;
        if (on && i < rows) v = st[(size_t)(i0 + i) * dv + j];
        s[i] = v;
    }
    pdl_start();
    const size_t row = (size_t)2 * hk * dk + (size_t)hv * dv;
    // Each token's shared values are written only after a barrier that every read of the token
    // before has passed. The one-token kernels compile without the loop (the 9B's k128v128 one
    // spills with it).
    const int r_len = MULTI ? rows_per_seq : 1;
    for (int t = 0; t < r_len; t++) {
        size_t tok = (size_t)b * r_len + t;
        const float* qt = mixed + tok * row + (size_t)kh * dk;
        const float* kt = qt + (size_t)hk * dk;
        const float* vt = mixed + tok * row + (size_t)2 * hk * dk + (size_t)h * dv;
        // l2norm of q and k (the first 4 warps, as gdn_step_slots does).
        if (warp < 4) {
            float ssk = 0.f, ssq = 0.f;
            for (int i = tid; i < dk; i += 128) {
                ssk += kt[i] * kt[i];
                ssq += qt[i] * qt[i];
            }
#pragma unroll
            for (int o = 16; o > 0; o >>= 1) {
                ssk += __shfl_xor_sync(0xffffffffu, ssk, o);
                ssq += __shfl_xor_sync(0xffffffffu, ssq, o);
            }
            if (lane == 0) part[0][warp] = ssk, part[1][warp] = ssq;
        }
        __syncthreads();
        float rk = 1.f / sqrtf(part[0][0] + part[0][1] + part[0][2] + part[0][3] + 1e-6f);
        float rq = 1.f / sqrtf(part[1][0] + part[1][1] + part[1][2] + part[1][3] + 1e-6f);
        for (int i = tid; i < dk; i += CG * 128) {
            ks[i] = kt[i] * rk;
            qs[i] = qt[i] * rq / sqrtf((float)dk);
        }
        // Gates (gdn_gates_f32): beta = sigmoid(b), g = -exp(A_log) · softplus(a + dt_bias).
        size_t th = tok * hv + h;
        float x = a_proj[th] + dt_bias[h];
        float sp = x > 20.f ? x : log1pf(expf(x));
        float bt = 1.f / (1.f + expf(-b_proj[th]));
        float decay = expf(-expf(a_log[h]) * sp);
        __syncthreads();
        float kv = 0.f;
#pragma unroll
        for (int i = 0; i < GDN_STEP_MAX_DK / 4; i++)
            if (i < rows) {
                s[i] *= decay;
                kv += s[i] * ks[i0 + i];
            }
        red[cg][r][lane] = kv;
        __syncthreads();
        kv = red[cg][0][lane] + red[cg][1][lane] + red[cg][2][lane] + red[cg][3][lane];
        float delta = on ? (vt[j] - kv) * bt : 0.f;
        float o = 0.f;
        float* so = pool + ((size_t)slots_out[tok] * hv + h) * dk * dv;
#pragma unroll
        for (int i = 0; i < GDN_STEP_MAX_DK / 4; i++)
            if (i < rows) {
                s[i] += ks[i0 + i] * delta;
                o += s[i] * qs[i0 + i];
                if (on) so[(size_t)(i0 + i) * dv + j] = s[i];
            }
        __syncthreads();
        red[cg][r][lane] = o;
        __syncthreads();
        o = red[cg][0][lane] + red[cg][1][lane] + red[cg][2][lane] + red[cg][3][lane];
        if (!whole_head) {
            if (r == 0 && on) out[th * dv + j] = o;
            continue;
        }
        if (r == 0 && on) os[j] = o;
        __syncthreads();
        // Gated RMSNorm over the head's dv outputs (rms_norm_gated_f32), the first 4 warps.
        if (warp < 4) {
            float ss = 0.f;
            for (int i = tid; i < dv; i += 128) ss += os[i] * os[i];
#pragma unroll
            for (int o2 = 16; o2 > 0; o2 >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o2);
            if (lane == 0) nsum[warp] = ss;
        }
        __syncthreads();
        float rn = rsqrtf((nsum[0] + nsum[1] + nsum[2] + nsum[3]) / dv + eps);
        for (int i = tid; i < dv; i += CG * 128) {
            float g = z[th * dv + i];
            out[th * dv + i] = norm_w[i] * (os[i] * rn) * (g / (1.f + expf(-g)));
        }
    }
}

#define GDN_DECODE_ARGS                                                                                           \
    const float *__restrict__ mixed, const float *__restrict__ b_proj, const float *__restrict__ a_proj,          \
        const float *__restrict__ a_log, const float *__restrict__ dt_bias, const float *__restrict__ z,          \
        const float *__restrict__ norm_w, float *__restrict__ pool, const uint32_t *__restrict__ slots,           \
        const uint32_t *__restrict__ slots_out, float *__restrict__ out, int hk, int hv, int dk, int dv,          \
        float eps, int rows_per_seq
#define GDN_DECODE_PASS \
    mixed, b_proj, a_proj, a_log, dt_bias, z, norm_w, pool, slots, slots_out, out, hk, hv, dk, dv, eps, rows_per_seq

extern "C" __global__ void __launch_bounds__(GDN_FUSED_THREADS) gdn_decode_fused(GDN_DECODE_ARGS) {
    // pdl_start() in the impl, after the state loads.
    gdn_decode_fused_impl<0, 0, GDN_FUSED_THREADS / 128, false>(GDN_DECODE_PASS);
}

extern "C" __global__ void __launch_bounds__(GDN_FUSED_THREADS, 2) gdn_decode_fused_k128v128(GDN_DECODE_ARGS) {
    // pdl_start() in the impl, after the state loads.
    gdn_decode_fused_impl<128, 128, GDN_FUSED_THREADS / 128, false>(GDN_DECODE_PASS);
}

// One column group per block, grid (Hv, B, dv / 32): out gets the raw outputs (see above).
extern "C" __global__ void __launch_bounds__(128, 6) gdn_decode_cols_k128v128(GDN_DECODE_ARGS) {
    // pdl_start() in the impl, after the state loads.
    gdn_decode_fused_impl<128, 128, 1, false>(GDN_DECODE_PASS);
}

// Several tokens per sequence (a speculative verify), any dk, dv ≤ 128 and the 9B's heads.
extern "C" __global__ void __launch_bounds__(GDN_FUSED_THREADS) gdn_decode_fused_multi(GDN_DECODE_ARGS) {
    // pdl_start() in the impl, after the state loads.
    gdn_decode_fused_impl<0, 0, GDN_FUSED_THREADS / 128, true>(GDN_DECODE_PASS);
}

extern "C" __global__ void __launch_bounds__(128, 6) gdn_decode_cols_multi_k128v128(GDN_DECODE_ARGS) {
    // pdl_start() in the impl, after the state loads.
    gdn_decode_fused_impl<128, 128, 1, true>(GDN_DECODE_PASS);
}

// Attention decode prologue fused: per head of one token (grid (Hq + Hkv, B), one thread per
// dim, D ≤ 512): the (1+w) RMSNorm of q or k, partial rotate-half RoPE at pos[b] (the first
// 2·half dims), then q to q_out [B, Hq, D] and the gate half of qg to gate [B, Hq·D], or k and v
// into their paged pools. qg is q_proj's output [B, Hq, 2D] (per head [query | gate]).
extern "C" __global__ void attn_decode_prep(const float* __restrict__ qg, const float* __restrict__ k,
                                            const float* __restrict__ v, const float* __restrict__ q_norm,
                                            const float* __restrict__ k_norm, const float* __restrict__ inv_freq,
                                            const uint32_t* __restrict__ pos, const uint32_t* __restrict__ table,
                                            float* __restrict__ q_out, float* __restrict__ gate,
                                            float* __restrict__ kp, float* __restrict__ vp, int hq, int hkv, int d,
                                            int half, int max_blocks, int block_size, float eps) {
    pdl_start();
    __shared__ float y[ATT_PREP_MAX_D], sums[ATT_PREP_MAX_D / 32];
    int h = blockIdx.x, b = blockIdx.y, i = threadIdx.x, lane = i & 31, warp = i >> 5;
    bool is_q = h < hq;
    int kvh = h - hq;
    const float* x = is_q ? qg + ((size_t)b * hq + h) * 2 * d : k + ((size_t)b * hkv + kvh) * d;
    const float* w = is_q ? q_norm : k_norm;
    float xi = i < d ? x[i] : 0.f;
    float ss = xi * xi;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
    if (lane == 0) sums[warp] = ss;
    __syncthreads();
    float tot = 0.f;
    for (int wi = 0; wi < (int)(blockDim.x + 31) / 32; wi++) tot += sums[wi];
    float rn = rsqrtf(tot / d + eps);
    if (i < d) y[i] = xi * rn * (1.f + w[i]);
    __syncthreads();
    float outv = i < d ? y[i] : 0.f;
    uint32_t p = pos[b];
    if (i < 2 * half) {
        int jj = i < half ? i : i - half;
        float ang = (float)p * inv_freq[jj];
        float c = cosf(ang), sn = sinf(ang);
        float x1 = y[jj], x2 = y[jj + half];
        outv = i < half ? x1 * c + (-x2 * sn) : x2 * c + x1 * sn;
    }
    if (i >= d) return;
    if (is_q) {
        size_t at = ((size_t)b * hq + h) * d + i;
        q_out[at] = outv;
        gate[at] = x[d + i];
    } else {
        size_t dst = ((size_t)table[(size_t)b * max_blocks + p / block_size] * block_size + p % block_size) * hkv;
        kp[(dst + kvh) * d + i] = outv;
        vp[(dst + kvh) * d + i] = v[((size_t)b * hkv + kvh) * d + i];
    }
}
