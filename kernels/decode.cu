// Decode-step kernels over a batch of sequences, one token each, reading per-sequence state from
// pools by index and per-step values (positions, slots, block tables) from device memory, so one
// captured CUDA graph serves every step of a batch size. CPU references: fp4_kernels::ops
// (rope_at, kv_write, paged_attention, conv1d_step, gdn_step).
//
// Layouts: paged KV pools [blocks · block_size, Hkv, D] (row = block · block_size + offset; a
// sequence's table row holds its block ids); GDN pools [slots, K-1, C] (conv inputs) and
// [slots, Hv, dk, dv] (recurrent state).
#include <stdint.h>

__device__ __forceinline__ float silu_f(float x) { return x / (1.f + expf(-x)); }

// In-place rotate-half RoPE of x [B, heads, head_dim], token b at position pos[b].
extern "C" __global__ void rope_at_f32(float* __restrict__ x, const float* __restrict__ inv_freq,
                                       const uint32_t* __restrict__ pos, int heads, int head_dim, int half,
                                       size_t n) {
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
// D, the K rows in registers, one dot per head); the V sum walks the keys in order, PA_GROUP
// loads ahead. Per head the arithmetic is in the order of the one-head-per-block version.
#define PA_THREADS 128
#define PA_TILE 32
#define PA_MAX_D 512
#define PA_MAX_G 8
#define PA_GROUP 4
extern "C" __global__ void __launch_bounds__(PA_THREADS)
    paged_attention_split(const float* __restrict__ q, const float* __restrict__ kp, const float* __restrict__ vp,
                          const uint32_t* __restrict__ table, const uint32_t* __restrict__ pos,
                          float* __restrict__ part, int hq, int hkv, int d, int max_blocks, int block_size,
                          float scale) {
    __shared__ float qs[PA_MAX_G][PA_MAX_D];
    __shared__ float sc[PA_MAX_G][PA_TILE];
    __shared__ size_t off[PA_TILE];
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
    constexpr int R = PA_MAX_D / PA_THREADS;
    float acc[PA_MAX_G][R];
    float m[PA_MAX_G], sum[PA_MAX_G];
#pragma unroll
    for (int g = 0; g < PA_MAX_G; g++) {
        m[g] = -INFINITY, sum[g] = 0.f;
#pragma unroll
        for (int r = 0; r < R; r++) acc[g][r] = 0.f;
    }
    for (int j0 = j_begin; j0 < j_end; j0 += PA_TILE) {
        int n = min(PA_TILE, j_end - j0);
        // The tile's key rows, looked up once: every K/V load below depends on shared memory only.
        if (tid < n) {
            int j = j0 + tid;
            off[tid] = (((size_t)tb[j / block_size] * block_size + j % block_size) * hkv + kvh) * d;
        }
        __syncthreads();
        for (int jj0 = warp; jj0 < n; jj0 += warps * PA_GROUP) {
            float kr[PA_GROUP][PA_MAX_D / 32];
#pragma unroll
            for (int u = 0; u < PA_GROUP; u++) {
                int jj = jj0 + u * warps;
#pragma unroll
                for (int r = 0; r < PA_MAX_D / 32; r++) {
                    int i = lane + 32 * r;
                    kr[u][r] = jj < n && i < d ? kp[off[jj] + i] : 0.f;
                }
            }
#pragma unroll
            for (int g = 0; g < PA_MAX_G; g++) {
#pragma unroll
                for (int u = 0; u < PA_GROUP; u++) {
                    if (g >= G) continue;
                    float dot = 0.f;
#pragma unroll
                    for (int r = 0; r < PA_MAX_D / 32; r++)
                        if (lane + 32 * r < d) dot += qs[g][lane + 32 * r] * kr[u][r];
#pragma unroll
                    for (int o = 16; o > 0; o >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, o);
                    int jj = jj0 + u * warps;
                    if (lane == 0 && jj < n) sc[g][jj] = dot * scale;
                }
            }
        }
        __syncthreads();
        float corr[PA_MAX_G];
#pragma unroll
        for (int g = 0; g < PA_MAX_G; g++) {
            corr[g] = 1.f;
            if (g >= G) continue;
            float tile_max = -INFINITY;
            for (int jj = 0; jj < n; jj++) tile_max = fmaxf(tile_max, sc[g][jj]);
            float new_m = fmaxf(m[g], tile_max);
            corr[g] = expf(m[g] - new_m);
            m[g] = new_m;
        }
        __syncthreads();
#pragma unroll
        for (int g = 0; g < PA_MAX_G; g++)
            if (g < G && tid < n) sc[g][tid] = expf(sc[g][tid] - m[g]);
        __syncthreads();
#pragma unroll
        for (int g = 0; g < PA_MAX_G; g++) {
            if (g >= G) continue;
            float tile_sum = 0.f;
            for (int jj = 0; jj < n; jj++) tile_sum += sc[g][jj];
            sum[g] = sum[g] * corr[g] + tile_sum;
        }
#pragma unroll
        for (int r = 0; r < R; r++) {
            int i = tid + r * PA_THREADS;
            if (i < d) {
#pragma unroll
                for (int g = 0; g < PA_MAX_G; g++) acc[g][r] *= corr[g];
                for (int jj0 = 0; jj0 < n; jj0 += PA_GROUP) {
                    float vv[PA_GROUP];
#pragma unroll
                    for (int u = 0; u < PA_GROUP; u++) vv[u] = jj0 + u < n ? vp[off[jj0 + u] + i] : 0.f;
#pragma unroll
                    for (int g = 0; g < PA_MAX_G; g++)
#pragma unroll
                        for (int u = 0; u < PA_GROUP; u++)
                            if (g < G && jj0 + u < n) acc[g][r] += sc[g][jj0 + u] * vv[u];
                }
            }
        }
        __syncthreads();
    }
#pragma unroll
    for (int g = 0; g < PA_MAX_G; g++) {
        if (g >= G) continue;
        float* o = part + (((size_t)b * hq + kvh * G + g) * splits + s) * (d + 2);
#pragma unroll
        for (int r = 0; r < R; r++) {
            int i = tid + r * PA_THREADS;
            if (i < d) o[i] = acc[g][r];
        }
        if (tid == 0) {
            o[d] = m[g];
            o[d + 1] = sum[g];
        }
    }
}

extern "C" __global__ void paged_attention_merge(const float* __restrict__ part, float* __restrict__ out, int splits,
                                                 int d) {
    size_t bh = blockIdx.x;
    const float* p = part + bh * splits * (d + 2);
    float mx = -INFINITY;
    for (int s = 0; s < splits; s++) mx = fmaxf(mx, p[s * (d + 2) + d]);
    float den = 0.f;
    for (int s = 0; s < splits; s++) {
        float ms = p[s * (d + 2) + d];
        if (ms != -INFINITY) den += expf(ms - mx) * p[s * (d + 2) + d + 1];
    }
    for (int i = threadIdx.x; i < d; i += blockDim.x) {
        float num = 0.f;
        for (int s = 0; s < splits; s++) {
            float ms = p[s * (d + 2) + d];
            if (ms != -INFINITY) num += expf(ms - mx) * p[s * (d + 2) + i];
        }
        out[bh * d + i] = num / den;
    }
}

// One causal-conv step + SiLU per sequence: x [B, C], state pool [slots, K-1, C] at slots[b]
// (updated), w [C, K]. Grid (C / 256, B).
#define MAX_CONV_K 8
extern "C" __global__ void conv1d_step_slots(const float* __restrict__ x, float* __restrict__ pool,
                                             const float* __restrict__ w, const uint32_t* __restrict__ slots,
                                             float* __restrict__ y, int c_len, int k) {
    int c = blockIdx.x * blockDim.x + threadIdx.x, b = blockIdx.y;
    if (c >= c_len) return;
    float* st = pool + (size_t)slots[b] * (k - 1) * c_len;
    float xin = x[(size_t)b * c_len + c];
    float acc = w[(size_t)c * k + k - 1] * xin;
    float prev[MAX_CONV_K];
#pragma unroll
    for (int j = 0; j < MAX_CONV_K - 1; j++)
        if (j < k - 1) {
            prev[j] = st[(size_t)j * c_len + c];
            acc += w[(size_t)c * k + j] * prev[j];
        }
#pragma unroll
    for (int j = 0; j + 1 < MAX_CONV_K - 1; j++)
        if (j + 1 < k - 1) st[(size_t)j * c_len + c] = prev[j + 1];
    if (k > 1) st[(size_t)(k - 2) * c_len + c] = xin;
    y[(size_t)b * c_len + c] = silu_f(acc);
}

// One gated-delta-rule step per sequence (the recurrent form of gdn.cu) on the state pool
// [slots, Hv, dk, dv] at slots[b]. Grid (dv / 32, Hv, B), GDN_STEP_THREADS threads: thread
// (r, lane) owns column 32·blockIdx.x + lane for rows r·dk/4 .. (r+1)·dk/4 in registers (dk ≤ 128),
// so state loads are coalesced rows of 32 columns; sums over rows meet in shared memory.
#define GDN_STEP_THREADS 128
#define GDN_STEP_MAX_DK 128
extern "C" __global__ void gdn_step_slots(const float* __restrict__ q, const float* __restrict__ k,
                                          const float* __restrict__ v, const float* __restrict__ g,
                                          const float* __restrict__ beta, float* __restrict__ pool,
                                          const uint32_t* __restrict__ slots, float* __restrict__ out, int hk,
                                          int hv, int dk, int dv) {
    __shared__ float ks[GDN_STEP_MAX_DK], qs[GDN_STEP_MAX_DK], red[4][32], part[2][4];
    int tid = threadIdx.x, lane = tid & 31, r = tid >> 5;
    int h = blockIdx.y, b = blockIdx.z, j = blockIdx.x * 32 + lane;
    int kh = h / (hv / hk);
    const float* kt = k + ((size_t)b * hk + kh) * dk;
    const float* qt = q + ((size_t)b * hk + kh) * dk;
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
    bool on = j < dv;
    size_t th = (size_t)b * hv + h;
    float decay = expf(g[th]), bt = beta[th];
    float* st = pool + ((size_t)slots[b] * hv + h) * dk * dv;
    int rows = dk / 4, i0 = r * rows;
    float s[GDN_STEP_MAX_DK / 4];
    // Every load issued before the first use (predicated, no branch between them): the state
    // is one DRAM round trip, not one per row.
#pragma unroll
    for (int i = 0; i < GDN_STEP_MAX_DK / 4; i++) {
        float x = 0.f;
        if (on && i < rows) x = st[(size_t)(i0 + i) * dv + j];
        s[i] = x;
    }
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
#pragma unroll
    for (int i = 0; i < GDN_STEP_MAX_DK / 4; i++)
        if (i < rows) {
            s[i] += ks[i0 + i] * delta;
            o += s[i] * qs[i0 + i];
            if (on) st[(size_t)(i0 + i) * dv + j] = s[i];
        }
    __syncthreads();
    red[r][lane] = o;
    __syncthreads();
    if (r == 0 && on) out[th * dv + j] = red[0][lane] + red[1][lane] + red[2][lane] + red[3][lane];
}
