// Element-wise and gather ops of the Qwen3.5 layer (f32 activations). Flat kernels use one
// thread per element with a grid-stride loop; row kernels one block per row.
#include <stdint.h>

#define FOR_EACH(i, n) \
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < (size_t)(n); i += (size_t)gridDim.x * blockDim.x)

__device__ __forceinline__ float silu(float x) { return x / (1.f + expf(-x)); }
__device__ __forceinline__ float sigmoid(float x) { return 1.f / (1.f + expf(-x)); }

// out = silu(gate) · up (the SwiGLU MLP).
extern "C" __global__ void silu_mul_f32(const float* __restrict__ gate, const float* __restrict__ up,
                                        float* __restrict__ out, size_t n) {
    FOR_EACH(i, n) out[i] = silu(gate[i]) * up[i];
}

// out = x · sigmoid(gate) (gated attention's output gate).
extern "C" __global__ void sigmoid_gate_f32(const float* __restrict__ x, const float* __restrict__ gate,
                                            float* __restrict__ out, size_t n) {
    FOR_EACH(i, n) out[i] = x[i] * sigmoid(gate[i]);
}

extern "C" __global__ void add_f32(const float* __restrict__ a, const float* __restrict__ b, float* __restrict__ out,
                                   size_t n) {
    FOR_EACH(i, n) out[i] = a[i] + b[i];
}

// y[r, c] += bias[c] over rows of `cols`.
extern "C" __global__ void add_bias_f32(float* __restrict__ y, const float* __restrict__ bias, int cols, size_t n) {
    FOR_EACH(i, n) y[i] += bias[i % cols];
}

// out[r, c] = x[r, c] · s[c] (AWQ's pre_quant_scale on a linear's input).
extern "C" __global__ void mul_cols_f32(const float* __restrict__ x, const float* __restrict__ s,
                                        float* __restrict__ out, int cols, size_t n) {
    FOR_EACH(i, n) out[i] = x[i] * s[i % cols];
}

// out[r, c] = src[r, off + c] for c < width (one piece of a split last dimension).
extern "C" __global__ void copy_cols_f32(const float* __restrict__ src, float* __restrict__ out, int src_cols,
                                         int off, int width, size_t n) {
    FOR_EACH(i, n) out[i] = src[(i / width) * src_cols + off + i % width];
}

// out[t, :] = table[ids[t], :] (token embedding gather), one block per token.
extern "C" __global__ void embedding_f32(const float* __restrict__ table, const uint32_t* __restrict__ ids,
                                         float* __restrict__ out, int d) {
    size_t t = blockIdx.x;
    const float* src = table + (size_t)ids[t] * d;
    for (int i = threadIdx.x; i < d; i += blockDim.x) out[t * d + i] = src[i];
}

// GDN gates per value head: beta = sigmoid(b), g = -exp(A_log[h]) · softplus(a + dt_bias[h])
// (torch softplus: threshold 20).
extern "C" __global__ void gdn_gates_f32(const float* __restrict__ b, const float* __restrict__ a,
                                         const float* __restrict__ a_log, const float* __restrict__ dt_bias,
                                         float* __restrict__ beta, float* __restrict__ g, int heads, size_t n) {
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

#define MAX_CONV_K 8

// Causal depthwise conv + SiLU over x [T, C], continuing from state [K-1, C] (the last K-1
// pre-conv inputs), which is updated. w [C, K], tap K-1 multiplies the current token. One thread
// per channel walks the tokens with its window in registers (K <= MAX_CONV_K, checked by the host).
extern "C" __global__ void causal_conv1d_silu_f32(const float* __restrict__ x, float* __restrict__ state,
                                                  const float* __restrict__ w, float* __restrict__ y, int t_len,
                                                  int c_len, int k) {
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= c_len) return;
    float win[MAX_CONV_K], wc[MAX_CONV_K];
#pragma unroll
    for (int j = 0; j < MAX_CONV_K; j++) {
        win[j] = j < k - 1 ? state[(size_t)j * c_len + c] : 0.f;
        wc[j] = j < k ? w[(size_t)c * k + j] : 0.f;
    }
    for (int t = 0; t < t_len; t++) {
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
#pragma unroll
    for (int j = 0; j < MAX_CONV_K; j++)
        if (j < k - 1) state[(size_t)j * c_len + c] = win[j];
}
