// RMSNorm over rows of d (f32): y = x · rsqrt(mean(x²) + eps) · (offset + w). offset = 1 for
// Qwen3.5's zero-centred (1+w) norms. `add_rms_norm` first adds the residual branch
// (h_out = h + delta), the fusion of every decoder layer's middle. One block per row.
#include <stdint.h>
#include "pdl.cuh"
#include "geometry.h"
#include "rowscale.cuh"

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

// Rows with d % 4 == 0 (every norm of the model): blockDim.x threads (d/4 rounded up to a warp,
// at most 1024) hold up to NORM_HELD float4 each in registers, so the row is read once with all
// loads in flight (a one-row decode norm is latency-bound, not bandwidth-bound). With ADD the
// residual branch is added first (h_out = h + delta). With F16 the output is also written in
// the tensor-core GEMV's format (rowscale.cuh) to yh / inv: the next linear's input, converted
// here instead of by a launch of its own.
template <bool ADD, bool F16>
__device__ __forceinline__ void norm_row_v4(const float* h, const float* delta, float* h_out, const float* w, float* y,
                                            int d, float eps, float offset, uint16_t* yh, float* inv) {
    __shared__ float shared[32], shared_max[32];
    const int n4 = d / 4;
    float4 v[NORM_HELD];
    float ss = 0.f;
#pragma unroll
    for (int j = 0; j < NORM_HELD; j++) {
        int i = threadIdx.x + j * blockDim.x;
        v[j] = make_float4(0.f, 0.f, 0.f, 0.f);
        if (i < n4) {
            v[j] = reinterpret_cast<const float4*>(h)[i];
            if (ADD) {
                float4 e = reinterpret_cast<const float4*>(delta)[i];
                v[j].x += e.x, v[j].y += e.y, v[j].z += e.z, v[j].w += e.w;
                reinterpret_cast<float4*>(h_out)[i] = v[j];
            }
        }
        ss += v[j].x * v[j].x + v[j].y * v[j].y + v[j].z * v[j].z + v[j].w * v[j].w;
    }
    float r = rsqrtf(block_sum(ss, shared) / d + eps);
    float m = 0.f;
#pragma unroll
    for (int j = 0; j < NORM_HELD; j++) {
        int i = threadIdx.x + j * blockDim.x;
        if (i < n4) {
            float4 g = reinterpret_cast<const float4*>(w)[i];
            v[j] = make_float4(v[j].x * r * (offset + g.x), v[j].y * r * (offset + g.y), v[j].z * r * (offset + g.z),
                               v[j].w * r * (offset + g.w));
            reinterpret_cast<float4*>(y)[i] = v[j];
            m = fmaxf(m, absmax4(v[j]));
        }
    }
    if (F16) store_rowscaled<NORM_HELD>(v, n4, block_max(m, shared_max), yh, inv);
}

extern "C" __global__ void rms_norm_v4(const float* __restrict__ x, const float* __restrict__ w, float* __restrict__ y,
                                       int d, float eps, float offset) {
    pdl_start();
    size_t row = blockIdx.x;
    norm_row_v4<false, false>(x + row * d, nullptr, nullptr, w, y + row * d, d, eps, offset, nullptr, nullptr);
}

// h_out = h + delta, y = rms_norm(h_out): the residual add fused with the next norm.
extern "C" __global__ void add_rms_norm_v4(const float* __restrict__ h, const float* __restrict__ delta,
                                           float* __restrict__ h_out, const float* __restrict__ w,
                                           float* __restrict__ y, int d, float eps, float offset) {
    pdl_start();
    size_t row = blockIdx.x;
    norm_row_v4<true, false>(h + row * d, delta + row * d, h_out + row * d, w, y + row * d, d, eps, offset, nullptr,
                             nullptr);
}

// The same two with the GEMV copy of y (d % 32 == 0): yh [rows, d], inv [rows].
extern "C" __global__ void rms_norm_v4_f16(const float* __restrict__ x, const float* __restrict__ w,
                                           float* __restrict__ y, uint16_t* __restrict__ yh, float* __restrict__ inv,
                                           int d, float eps, float offset) {
    pdl_start();
    size_t row = blockIdx.x;
    norm_row_v4<false, true>(x + row * d, nullptr, nullptr, w, y + row * d, d, eps, offset, yh + row * d, inv + row);
}

extern "C" __global__ void add_rms_norm_v4_f16(const float* __restrict__ h, const float* __restrict__ delta,
                                               float* __restrict__ h_out, const float* __restrict__ w,
                                               float* __restrict__ y, uint16_t* __restrict__ yh,
                                               float* __restrict__ inv, int d, float eps, float offset) {
    pdl_start();
    size_t row = blockIdx.x;
    norm_row_v4<true, true>(h + row * d, delta + row * d, h_out + row * d, w, y + row * d, d, eps, offset,
                            yh + row * d, inv + row);
}

extern "C" __global__ void rms_norm_f32(const float* __restrict__ x, const float* __restrict__ w,
                                        float* __restrict__ y, int d, float eps, float offset) {
    pdl_start();
    size_t row = blockIdx.x;
    norm_row(x + row * d, w, y + row * d, d, eps, offset);
}

extern "C" __global__ void add_rms_norm_f32(const float* __restrict__ h, const float* __restrict__ delta,
                                            float* __restrict__ h_out, const float* __restrict__ w,
                                            float* __restrict__ y, int d, float eps, float offset) {
    pdl_start();
    size_t row = blockIdx.x;
    float* hr = h_out + row * d;
    for (int i = threadIdx.x; i < d; i += blockDim.x) hr[i] = h[row * d + i] + delta[row * d + i];
    __syncthreads();
    norm_row(hr, w, y + row * d, d, eps, offset);
}

// Gated RMSNorm of the GDN output (Qwen3_5RMSNormGated): y = w · x·rsqrt(mean(x²)+eps) · silu(z),
// the weight plain (not 1+w), one block per row of d (one value head of one token).
extern "C" __global__ void rms_norm_gated_f32(const float* __restrict__ x, const float* __restrict__ z,
                                              const float* __restrict__ w, float* __restrict__ y, int d, float eps) {
    pdl_start();
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

// rms_norm_gated_f32 over the heads of a whole token at once, the output also in the
// tensor-core GEMV's format (out_proj's input): one block of 32·H threads per token row of H
// heads of GATED_F16_D (gdn_decode_cols's raw outputs, H ≤ 32), warp h holding head h a float4
// per lane, so each head's sum stays in its warp and the row's amax is one block reduction.
extern "C" __global__ void rms_norm_gated_f16(const float* __restrict__ x, const float* __restrict__ z,
                                              const float* __restrict__ w, float* __restrict__ y,
                                              uint16_t* __restrict__ yh, float* __restrict__ inv, float eps) {
    pdl_start();
    __shared__ float shared_max[32];
    const int n4 = blockDim.x, lane = threadIdx.x & 31;
    const size_t row = blockIdx.x, at = row * n4 + threadIdx.x;
    const float4 v = reinterpret_cast<const float4*>(x)[at], g = reinterpret_cast<const float4*>(z)[at];
    const float4 wv = reinterpret_cast<const float4*>(w)[lane];
    float ss = v.x * v.x + v.y * v.y + v.z * v.z + v.w * v.w;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
    const float r = rsqrtf(ss / GATED_F16_D + eps);
    auto gate = [](float a) { return a / (1.f + expf(-a)); };
    float4 out[1];
    out[0] = make_float4(wv.x * (v.x * r) * gate(g.x), wv.y * (v.y * r) * gate(g.y), wv.z * (v.z * r) * gate(g.z),
                         wv.w * (v.w * r) * gate(g.w));
    reinterpret_cast<float4*>(y)[at] = out[0];
    store_rowscaled<1>(out, n4, block_max(absmax4(out[0]), shared_max), yh + row * n4 * 4, inv + row);
}
