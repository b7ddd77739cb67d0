// RMSNorm over rows of d (f32): y = x · rsqrt(mean(x²) + eps) · (offset + w). offset = 1 for
// Qwen3.5's zero-centred (1+w) norms. `add_rms_norm` first adds the residual branch in place
// (h += delta), the fusion every decoder layer does twice. One block per row.
#include <stdint.h>

__device__ __forceinline__ float block_sum(float v, float* shared) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    if (lane == 0) shared[warp] = v;
    __syncthreads();
    int warps = (blockDim.x + 31) / 32;
    v = lane < warps ? shared[lane] : 0.f;
    if (warp == 0) {
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
        if (lane == 0) shared[0] = v;
    }
    __syncthreads();
    return shared[0];
}

__device__ __forceinline__ void norm_row(const float* x, const float* w, float* y, int d, float eps, float offset) {
    __shared__ float shared[32];
    float ss = 0.f;
    for (int i = threadIdx.x; i < d; i += blockDim.x) ss += x[i] * x[i];
    float r = rsqrtf(block_sum(ss, shared) / d + eps);
    for (int i = threadIdx.x; i < d; i += blockDim.x) y[i] = x[i] * r * (offset + w[i]);
}

extern "C" __global__ void rms_norm_f32(const float* __restrict__ x, const float* __restrict__ w,
                                        float* __restrict__ y, int d, float eps, float offset) {
    size_t row = blockIdx.x;
    norm_row(x + row * d, w, y + row * d, d, eps, offset);
}

extern "C" __global__ void add_rms_norm_f32(float* __restrict__ h, const float* __restrict__ delta,
                                            const float* __restrict__ w, float* __restrict__ y, int d, float eps,
                                            float offset) {
    size_t row = blockIdx.x;
    float* hr = h + row * d;
    for (int i = threadIdx.x; i < d; i += blockDim.x) hr[i] += delta[row * d + i];
    __syncthreads();
    norm_row(hr, w, y + row * d, d, eps, offset);
}

// Gated RMSNorm of the GDN output (Qwen3_5RMSNormGated): y = w · x·rsqrt(mean(x²)+eps) · silu(z),
// the weight plain (not 1+w), one block per row of d (one value head of one token).
extern "C" __global__ void rms_norm_gated_f32(const float* __restrict__ x, const float* __restrict__ z,
                                              const float* __restrict__ w, float* __restrict__ y, int d, float eps) {
    __shared__ float shared[32];
    size_t row = blockIdx.x;
    const float* xr = x + row * d;
    const float* zr = z + row * d;
    float ss = 0.f;
    for (int i = threadIdx.x; i < d; i += blockDim.x) ss += xr[i] * xr[i];
    float r = rsqrtf(block_sum(ss, shared) / d + eps);
    for (int i = threadIdx.x; i < d; i += blockDim.x) {
        float g = zr[i];
        y[row * d + i] = w[i] * (xr[i] * r) * (g / (1.f + expf(-g)));
    }
}
