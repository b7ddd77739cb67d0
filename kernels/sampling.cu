// Token selection on the GPU, one block of SAMPLE_THREADS per logits row (batch 1), so that only
// the chosen id travels back to the host.
//
// argmax: the first maximum (torch.argmax). sample: temperature, then top-k, min-p and top-p as
// *thresholds* on the logit: the kept set is every token at or above the k-th largest scaled logit,
// whose probability is at least min_p × the top one, and at or above the smallest logit of the
// top-p prefix (ties at a threshold are all kept). Thresholds are found by a 32-step bitwise
// search over order-preserving integer keys of the floats (no sort). The draw u ∈ [0,1) then
// walks the kept tokens in index order. `cpu::sample` is the reference with the same semantics.
#include <stdint.h>
#include "pdl.cuh"
#include "geometry.h"


__device__ __forceinline__ uint32_t order_key(float f) {
    uint32_t u = __float_as_uint(f);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// Block-wide sum (all threads get the result). `tmp` has SAMPLE_THREADS / 32 slots.
__device__ float block_sum(float v, float* tmp) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    __syncthreads();
    if (threadIdx.x % 32 == 0) tmp[threadIdx.x / 32] = v;
    __syncthreads();
    float r = 0.f;
    for (int w = 0; w < SAMPLE_THREADS / 32; w++) r += tmp[w];
    return r;
}

__device__ float block_max(float v, float* tmp) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    __syncthreads();
    if (threadIdx.x % 32 == 0) tmp[threadIdx.x / 32] = v;
    __syncthreads();
    float r = -INFINITY;
    for (int w = 0; w < SAMPLE_THREADS / 32; w++) r = fmaxf(r, tmp[w]);
    return r;
}

// The argmax (first maximum) of x [n] into out[0], by a whole block of SAMPLE_THREADS.
__device__ void argmax_row(const float* __restrict__ x, int n, uint32_t* __restrict__ out) {
    __shared__ float vals[SAMPLE_THREADS];
    __shared__ int idxs[SAMPLE_THREADS];
    float best = -INFINITY;
    int bi = n;  // no candidate yet
    for (int i = threadIdx.x; i < n; i += SAMPLE_THREADS)
        if (x[i] > best || bi == n) best = x[i], bi = i;
    vals[threadIdx.x] = best;
    idxs[threadIdx.x] = bi;
    __syncthreads();
    for (int s = SAMPLE_THREADS / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) {
            float v = vals[threadIdx.x + s];
            int j = idxs[threadIdx.x + s];
            if (v > vals[threadIdx.x] || (v == vals[threadIdx.x] && j < idxs[threadIdx.x]))
                vals[threadIdx.x] = v, idxs[threadIdx.x] = j;
        }
        __syncthreads();
    }
    if (threadIdx.x == 0) out[0] = idxs[0];
}

// One block per row of x [rows, n] (a batch's logits): out[row] = its argmax.
extern "C" __global__ void argmax_f32(const float* __restrict__ x, int n, uint32_t* __restrict__ out) {
    pdl_start();
    argmax_row(x + (size_t)blockIdx.x * n, n, out + blockIdx.x);
}

// One token of logits [n] by the controls (temperature > 0), written to out[0] by a whole block.
__device__ void sample_row(const float* __restrict__ logits, int n, float temperature, int top_k, float top_p,
                           float min_p, float u, uint32_t* __restrict__ out) {
    __shared__ float tmp[SAMPLE_THREADS / 32];
    __shared__ float chunk_mass[SAMPLE_THREADS];
    int tid = threadIdx.x;
    float m = -INFINITY;
    for (int i = tid; i < n; i += SAMPLE_THREADS) m = fmaxf(m, logits[i] / temperature);
    m = block_max(m, tmp);
    // top-k: the largest key t with count(key >= t) >= k is the k-th largest value's key.
    uint32_t tk = 0;
    if (top_k > 0 && top_k < n) {
        for (int b = 31; b >= 0; b--) {
            uint32_t c = tk | (1u << b);
            float cnt = 0.f;
            for (int i = tid; i < n; i += SAMPLE_THREADS) cnt += order_key(logits[i] / temperature) >= c;
            if (block_sum(cnt, tmp) >= (float)top_k) tk = c;
        }
    }
    // Probabilities are normalised over the top-k set; min-p keeps p >= min_p · p_max.
    float s1 = 0.f;
    for (int i = tid; i < n; i += SAMPLE_THREADS) {
        float z = logits[i] / temperature;
        if (order_key(z) >= tk) s1 += expf(z - m);
    }
    s1 = block_sum(s1, tmp);
    float floor = min_p * (1.f / s1);
#define KEPT(z) (order_key(z) >= tk && (min_p == 0.f || expf((z) - m) / s1 >= floor))
    // top-p: the largest key t whose kept mass at or above it still reaches top_p.
    uint32_t tp = 0;
    if (top_p < 1.f) {
        for (int b = 31; b >= 0; b--) {
            uint32_t c = tp | (1u << b);
            float mass = 0.f;
            for (int i = tid; i < n; i += SAMPLE_THREADS) {
                float z = logits[i] / temperature;
                if (KEPT(z) && order_key(z) >= c) mass += expf(z - m) / s1;
            }
            if (block_sum(mass, tmp) >= top_p) tp = c;
        }
    }
    // Walk the kept tokens in index order: each thread owns one contiguous chunk and sums its
    // kept mass; thread 0 finds the chunk where u·total falls and walks it token by token.
    __shared__ int chunk_last[SAMPLE_THREADS];
    int per = (n + SAMPLE_THREADS - 1) / SAMPLE_THREADS;
    int lo = min(n, tid * per), hi = min(n, lo + per);
    float mass = 0.f;
    int last = -1;
    for (int i = lo; i < hi; i++) {
        float z = logits[i] / temperature;
        if (KEPT(z) && order_key(z) >= tp) mass += expf(z - m) / s1, last = i;
    }
    chunk_mass[tid] = mass;
    chunk_last[tid] = last;
    __syncthreads();
    if (tid != 0) return;
    float total = 0.f;
    for (int c = 0; c < SAMPLE_THREADS; c++) total += chunk_mass[c];
    float r = u * total;
    for (int c = 0; c < SAMPLE_THREADS; c++) {
        if (chunk_last[c] >= 0) last = chunk_last[c];
        if (r >= chunk_mass[c]) {
            r -= chunk_mass[c];
            continue;
        }
        for (int i = min(n, c * per); i <= chunk_last[c]; i++) {
            float z = logits[i] / temperature;
            if (KEPT(z) && order_key(z) >= tp) {
                float p = expf(z - m) / s1;
                if (r < p) {
                    out[0] = i;
                    return;
                }
                r -= p;
            }
        }
        break;  // rounding inside the chunk: its last kept token
    }
    out[0] = last;  // rounding left r at or past the total: the last kept token
#undef KEPT
}

extern "C" __global__ void sample_f32(const float* __restrict__ logits, int n, float temperature, int top_k,
                                      float top_p, float min_p, float u, uint32_t* __restrict__ out) {
    pdl_start();
    sample_row(logits, n, temperature, top_k, top_p, min_p, u, out);
}

// One block per row of logits [rows, n], each by its own controls: SAMPLE_CONTROLS words per row,
// (temperature, top_k, top_p, min_p, u) with the floats as their bits (ops::sample_rows); a row of
// temperature 0 takes its argmax.
extern "C" __global__ void sample_rows_f32(const float* __restrict__ logits, int n,
                                           const uint32_t* __restrict__ controls, uint32_t* __restrict__ out) {
    pdl_start();
    const uint32_t* c = controls + (size_t)blockIdx.x * SAMPLE_CONTROLS;
    const float* row = logits + (size_t)blockIdx.x * n;
    const float temperature = __uint_as_float(c[0]);
    if (temperature == 0.f)
        argmax_row(row, n, out + blockIdx.x);
    else
        sample_row(row, n, temperature, (int)c[1], __uint_as_float(c[2]), __uint_as_float(c[3]), __uint_as_float(c[4]),
                   out + blockIdx.x);
}

// dst[start + stride·i] = src[i] (the drafts into a speculative verify's rows).
extern "C" __global__ void write_ids_strided(uint32_t* __restrict__ dst, const uint32_t* __restrict__ src, int n,
                                             int start, int stride) {
    pdl_start();
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x)
        dst[start + stride * i] = src[i];
}

// Greedy acceptance of a speculative verify, one thread per sequence (ops::accept_greedy_rows,
// whose CPU branch is the reference): rows b·(1+k) .. of ids are its input and k drafts, of best
// the model's argmax after each. Drafts are kept while each equals the model's choice before it;
// force[b] ≤ k keeps that many whatever they are (benchmarks).
extern "C" __global__ void accept_greedy_rows(const uint32_t* __restrict__ ids, const uint32_t* __restrict__ best,
                                              int n, int k, const uint32_t* __restrict__ force,
                                              uint32_t* __restrict__ head_ids,
                                              uint32_t* __restrict__ picks, uint32_t* __restrict__ out) {
    pdl_start();
    int b = blockIdx.x * blockDim.x + threadIdx.x;
    if (b >= n) return;
    const int r0 = b * (k + 1);
    int m = 0;
    if (force[b] <= (uint32_t)k)
        m = force[b];
    else
        while (m < k && ids[r0 + 1 + m] == best[r0 + m]) m++;
    const uint32_t next = best[r0 + m];
    for (int j = 0; j <= k; j++) head_ids[r0 + j] = j < m ? ids[r0 + 1 + j] : next;
    picks[b] = r0 + m;
    uint32_t* o = out + (size_t)b * (k + 2);
    for (int j = 0; j < k; j++) o[j] = ids[r0 + 1 + j];
    o[k] = m;
    o[k + 1] = next;
}
