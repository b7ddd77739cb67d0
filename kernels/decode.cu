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

// Split-K decode attention (flash-decoding): grid (B, Hq, splits), ATT_THREADS threads. Split s of
// token b takes keys [s·c, min((s+1)·c, L)) with L = pos[b] + 1 and c = ceil(L / splits), and
// writes its running max, sum and unnormalised output to part [B, Hq, splits, D + 2];
// paged_attention_merge combines the splits. Keys are scored one warp per key (lanes split D).
#define PA_THREADS 128
#define PA_TILE 32
#define PA_MAX_D 512
extern "C" __global__ void paged_attention_split(const float* __restrict__ q, const float* __restrict__ kp,
                                                 const float* __restrict__ vp, const uint32_t* __restrict__ table,
                                                 const uint32_t* __restrict__ pos, float* __restrict__ part, int hq,
                                                 int hkv, int d, int max_blocks, int block_size, float scale) {
    __shared__ float qs[PA_MAX_D];
    __shared__ float sc[PA_TILE];
    int b = blockIdx.x, h = blockIdx.y, s = blockIdx.z, splits = gridDim.z, tid = threadIdx.x;
    int lane = tid % 32, warp = tid / 32, warps = PA_THREADS / 32;
    int kvh = h / (hq / hkv);
    int len = pos[b] + 1;
    int per = (len + splits - 1) / splits;
    int j_begin = s * per, j_end = min(len, j_begin + per);
    const float* qr = q + ((size_t)b * hq + h) * d;
    for (int i = tid; i < d; i += PA_THREADS) qs[i] = qr[i];
    __syncthreads();
    const uint32_t* tb = table + (size_t)b * max_blocks;
    float acc[PA_MAX_D / PA_THREADS];
#pragma unroll
    for (int r = 0; r < PA_MAX_D / PA_THREADS; r++) acc[r] = 0.f;
    float m = -INFINITY, sum = 0.f;
    for (int j0 = j_begin; j0 < j_end; j0 += PA_TILE) {
        int n = min(PA_TILE, j_end - j0);
        for (int jj = warp; jj < n; jj += warps) {
            int j = j0 + jj;
            const float* kr = kp + (((size_t)tb[j / block_size] * block_size + j % block_size) * hkv + kvh) * d;
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
        float corr = expf(m - new_m);
        __syncthreads();
        if (tid < n) sc[tid] = expf(sc[tid] - new_m);
        __syncthreads();
        float tile_sum = 0.f;
        for (int jj = 0; jj < n; jj++) tile_sum += sc[jj];
        sum = sum * corr + tile_sum;
#pragma unroll
        for (int r = 0; r < PA_MAX_D / PA_THREADS; r++) {
            int i = tid + r * PA_THREADS;
            if (i < d) {
                float a = acc[r] * corr;
                for (int jj = 0; jj < n; jj++) {
                    int j = j0 + jj;
                    a += sc[jj] * vp[(((size_t)tb[j / block_size] * block_size + j % block_size) * hkv + kvh) * d + i];
                }
                acc[r] = a;
            }
        }
        m = new_m;
        __syncthreads();
    }
    float* o = part + (((size_t)b * hq + h) * splits + s) * (d + 2);
#pragma unroll
    for (int r = 0; r < PA_MAX_D / PA_THREADS; r++) {
        int i = tid + r * PA_THREADS;
        if (i < d) o[i] = acc[r];
    }
    if (tid == 0) {
        o[d] = m;
        o[d + 1] = sum;
    }
}

// out [B, Hq, D] = Σ_s e^{m_s − M} acc_s / Σ_s e^{m_s − M} sum_s (empty splits have m = −inf).
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
    float kv = 0.f;
#pragma unroll
    for (int i = 0; i < GDN_STEP_MAX_DK / 4; i++)
        if (i < rows) {
            s[i] = on ? st[(size_t)(i0 + i) * dv + j] * decay : 0.f;
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
