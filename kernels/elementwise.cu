// Element-wise ops of the Qwen3.5 layer (f32).
#include <stdint.h>

// out = silu(gate) · up (the SwiGLU MLP).
extern "C" __global__ void silu_mul_f32(const float* __restrict__ gate, const float* __restrict__ up,
                                        float* __restrict__ out, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) {
        float g = gate[i];
        out[i] = g / (1.f + expf(-g)) * up[i];
    }
}

// out[t, :] = table[ids[t], :] (token embedding gather).
extern "C" __global__ void embedding_f32(const float* __restrict__ table, const uint32_t* __restrict__ ids,
                                         float* __restrict__ out, int d) {
    size_t t = blockIdx.x;
    const float* src = table + (size_t)ids[t] * d;
    for (int i = threadIdx.x; i < d; i += blockDim.x) out[t * d + i] = src[i];
}
