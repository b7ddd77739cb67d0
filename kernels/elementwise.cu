// Element-wise and gather ops of the Qwen3.5 layer (f32 activations). Flat kernels use one
// thread per element with a grid-stride loop; row kernels one block per row.
#include <stdint.h>
#include "pdl.cuh"
#include "geometry.h"
#include "rowscale.cuh"

#define FOR_EACH(i, n) \
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < (size_t)(n); i += (size_t)gridDim.x * blockDim.x)

__device__ __forceinline__ float silu(float x) { return x / (1.f + expf(-x)); }
__device__ __forceinline__ float sigmoid(float x) { return 1.f / (1.f + expf(-x)); }

// out = silu(gate) · up (the SwiGLU MLP).
extern "C" __global__ void silu_mul_f32(const float* __restrict__ gate, const float* __restrict__ up,
                                        float* __restrict__ out, size_t n) {
    pdl_start();
    FOR_EACH(i, n) out[i] = silu(gate[i]) * up[i];
}

// out = x · sigmoid(gate) (gated attention's output gate).
extern "C" __global__ void sigmoid_gate_f32(const float* __restrict__ x, const float* __restrict__ gate,
                                            float* __restrict__ out, size_t n) {
    pdl_start();
    FOR_EACH(i, n) out[i] = x[i] * sigmoid(gate[i]);
}

// The same two a row per block (d % 32 == 0, d/4 ≤ ROWS_HELD · blockDim.x), the output also in
// the tensor-core GEMV's format (rowscale.cuh): SwiGLU's result is down_proj's input and the
// gated attention output o_proj's, converted here instead of by a launch of their own.
template <bool SILU_MUL>
__device__ __forceinline__ void binary_row_f16(const float* __restrict__ a, const float* __restrict__ b,
                                               float* __restrict__ out, uint16_t* __restrict__ oh,
                                               float* __restrict__ inv, int d) {
    __shared__ float shared_max[32];
    size_t row = blockIdx.x;
    const int n4 = d / 4;
    const float4* a4 = reinterpret_cast<const float4*>(a + row * d);
    const float4* b4 = reinterpret_cast<const float4*>(b + row * d);
    float4 v[ROWS_HELD];
    float m = 0.f;
#pragma unroll
    for (int j = 0; j < ROWS_HELD; j++) {
        int i = threadIdx.x + j * blockDim.x;
        v[j] = make_float4(0.f, 0.f, 0.f, 0.f);
        if (i < n4) {
            float4 x = a4[i], y = b4[i];
            v[j] = SILU_MUL ? make_float4(silu(x.x) * y.x, silu(x.y) * y.y, silu(x.z) * y.z, silu(x.w) * y.w)
                            : make_float4(x.x * sigmoid(y.x), x.y * sigmoid(y.y), x.z * sigmoid(y.z), x.w * sigmoid(y.w));
            reinterpret_cast<float4*>(out + row * d)[i] = v[j];
            m = fmaxf(m, absmax4(v[j]));
        }
    }
    store_rowscaled<ROWS_HELD>(v, n4, block_max(m, shared_max), oh + row * d, inv + row);
}

extern "C" __global__ void silu_mul_f16(const float* __restrict__ gate, const float* __restrict__ up,
                                        float* __restrict__ out, uint16_t* __restrict__ oh, float* __restrict__ inv,
                                        int d) {
    pdl_start();
    binary_row_f16<true>(gate, up, out, oh, inv, d);
}

extern "C" __global__ void sigmoid_gate_f16(const float* __restrict__ x, const float* __restrict__ gate,
                                            float* __restrict__ out, uint16_t* __restrict__ oh,
                                            float* __restrict__ inv, int d) {
    pdl_start();
    binary_row_f16<false>(x, gate, out, oh, inv, d);
}

extern "C" __global__ void add_f32(const float* __restrict__ a, const float* __restrict__ b, float* __restrict__ out,
                                   size_t n) {
    pdl_start();
    FOR_EACH(i, n) out[i] = a[i] + b[i];
}

// y[r, c] += bias[c] over rows of `cols`.
extern "C" __global__ void add_bias_f32(float* __restrict__ y, const float* __restrict__ bias, int cols, size_t n) {
    pdl_start();
    FOR_EACH(i, n) y[i] += bias[i % cols];
}

// out[r, c] = x[r, c] · s[c] (AWQ's pre_quant_scale on a linear's input).
extern "C" __global__ void mul_cols_f32(const float* __restrict__ x, const float* __restrict__ s,
                                        float* __restrict__ out, int cols, size_t n) {
    pdl_start();
    FOR_EACH(i, n) out[i] = x[i] * s[i % cols];
}

// out[r, c] = src[r, off + c] for c < width (one piece of a split last dimension).
extern "C" __global__ void copy_cols_f32(const float* __restrict__ src, float* __restrict__ out, int src_cols,
                                         int off, int width, size_t n) {
    pdl_start();
    FOR_EACH(i, n) out[i] = src[(i / width) * src_cols + off + i % width];
}

// out[r, :] = [a[r, :] | b[r, :]] for a [R, m], b [R, n] (columns side by side).
extern "C" __global__ void cat_cols_f32(const float* __restrict__ a, const float* __restrict__ b,
                                        float* __restrict__ out, int m, int n, size_t total) {
    pdl_start();
    FOR_EACH(i, total) {
        size_t r = i / (m + n), c = i % (m + n);
        out[i] = c < (size_t)m ? a[r * m + c] : b[r * n + c - m];
    }
}

// out[t, :] = table[ids[t], :] (token embedding gather), one block per token.
extern "C" __global__ void embedding_f32(const float* __restrict__ table, const uint32_t* __restrict__ ids,
                                         float* __restrict__ out, int d) {
    pdl_start();
    size_t t = blockIdx.x;
    const float* src = table + (size_t)ids[t] * d;
    for (int i = threadIdx.x; i < d; i += blockDim.x) out[t * d + i] = src[i];
}

// GDN gates per value head: beta = sigmoid(b), g = -exp(A_log[h]) · softplus(a + dt_bias[h])
// (torch softplus: threshold 20).
extern "C" __global__ void gdn_gates_f32(const float* __restrict__ b, const float* __restrict__ a,
                                         const float* __restrict__ a_log, const float* __restrict__ dt_bias,
                                         float* __restrict__ beta, float* __restrict__ g, int heads, size_t n) {
    pdl_start();
    FOR_EACH(i, n) {
        int h = i % heads;
        float x = a[i] + dt_bias[h];
        float sp = x > 20.f ? x : log1pf(expf(x));
        beta[i] = sigmoid(b[i]);
        g[i] = -expf(a_log[h]) * sp;
    }
}

// In-place rotate-half RoPE on x [T, heads, head_dim]: dim j pairs with j + half for j < half
// (= rotary_dim / 2); token t sits at pos0 + t. One thread per (token, head, j).
extern "C" __global__ void rope_f32(float* __restrict__ x, const float* __restrict__ inv_freq, int heads,
                                    int head_dim, int half, int pos0, size_t n) {
    pdl_start();
    FOR_EACH(i, n) {
        int j = i % half;
        size_t th = i / half;  // token · heads + head
        int t = th / heads;
        float ang = (float)(pos0 + t) * inv_freq[j];
        float c = cosf(ang), s = sinf(ang);
        float* hd = x + th * head_dim;
        float x1 = hd[j], x2 = hd[j + half];
        hd[j] = x1 * c + (-x2 * s);
        hd[j + half] = x2 * c + x1 * s;
    }
}


// Causal depthwise conv + SiLU over x [T, C], continuing from state [K-1, C] (the last K-1
// pre-conv inputs), which is updated. w [C, K], tap K-1 multiplies the current token. Grid
// (C / blockDim, T / CONV_T): thread (c, tile) walks tokens [CONV_T·tile, +CONV_T) of channel c
// with its window in registers (K <= MAX_CONV_K, checked by the host), the window's first K-1
// inputs read from x or, before token 0, from the state. Tile 0 alone reads the old state and
// writes the new one (the last K-1 inputs), so no tile reads a state another has overwritten.
extern "C" __global__ void causal_conv1d_silu_f32(const float* __restrict__ x, float* __restrict__ state,
                                                  const float* __restrict__ w, float* __restrict__ y, int t_len,
                                                  int c_len, int k) {
    pdl_start();
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= c_len) return;
    const int t0 = blockIdx.y * CONV_T, t1 = min(t_len, t0 + CONV_T);
    float win[MAX_CONV_K], wc[MAX_CONV_K], old[MAX_CONV_K];
#pragma unroll
    for (int j = 0; j < MAX_CONV_K; j++) {
        int t = t0 - (k - 1) + j;  // the input window slot j holds before token t0
        old[j] = blockIdx.y == 0 && j < k - 1 ? state[(size_t)j * c_len + c] : 0.f;
        win[j] = j < k - 1 ? (t >= 0 ? x[(size_t)t * c_len + c] : old[j]) : 0.f;
        wc[j] = j < k ? w[(size_t)c * k + j] : 0.f;
    }
    for (int t = t0; t < t1; t++) {
        float acc = 0.f;
#pragma unroll
        for (int j = 0; j < MAX_CONV_K; j++) {
            if (j == k - 1) win[j] = x[(size_t)t * c_len + c];
            if (j < k) acc += wc[j] * win[j];
        }
        y[(size_t)t * c_len + c] = silu(acc);
#pragma unroll
        for (int j = 0; j + 1 < MAX_CONV_K; j++) win[j] = win[j + 1];
    }
    if (blockIdx.y != 0) return;
#pragma unroll
    for (int j = 0; j < MAX_CONV_K; j++) {
        int t = t_len - (k - 1) + j;  // input t, or old state slot t + K-1 before token 0
        if (j < k - 1) state[(size_t)j * c_len + c] = t >= 0 ? x[(size_t)t * c_len + c] : old[t + k - 1];
    }
}

// dst[dst_rows[i]] = src[src_rows[i]], one block per row of d floats.
extern "C" __global__ void scatter_rows_f32(float* __restrict__ dst, const uint32_t* __restrict__ dst_rows,
                                            const float* __restrict__ src, const uint32_t* __restrict__ src_rows,
                                            int d) {
    pdl_start();
    const float* s = src + (size_t)src_rows[blockIdx.x] * d;
    float* o = dst + (size_t)dst_rows[blockIdx.x] * d;
    for (int i = threadIdx.x; i < d; i += blockDim.x) o[i] = s[i];
}
