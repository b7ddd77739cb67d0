// The activation format of the tensor-core NVFP4 GEMV (gemv.cu): each token's row as f16 times
// a power of two 2^e that puts the row's amax in [2^14, 2^15), stored in the GEMV's pair order
// (within each group of 8: words (x3,x7) (x2,x6) (x1,x5) (x0,x4)), and inv = 2^-e per row.
// `f16_rowscaled` converts an f32 row; the kernels that produce a GEMV's input (norms, SwiGLU,
// the attention gate) write this copy themselves from the values they hold, so the conversion
// costs no launch. Both use these helpers, so their bytes are identical.
#pragma once
#include <cuda_fp16.h>
#include <stdint.h>

__device__ __forceinline__ uint32_t f16x2_of(float lo, float hi) {
    return (uint32_t)__half_as_ushort(__float2half_rn(lo)) | ((uint32_t)__half_as_ushort(__float2half_rn(hi)) << 16);
}

// e with amax · 2^e in [2^14, 2^15) (0 for an all-zero row; capped so 2^e stays finite).
__device__ __forceinline__ int rowscale_exponent(float amax) { return amax > 0.f ? min(14 - ilogbf(amax), 100) : 0; }

__device__ __forceinline__ float absmax4(float4 v) {
    return fmaxf(fmaxf(fabsf(v.x), fabsf(v.y)), fmaxf(fabsf(v.z), fabsf(v.w)));
}

// Max over the block (every thread gets it); `shared` holds 32 floats no other reduction uses.
__device__ __forceinline__ float block_max(float v, float* shared) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    if (lane == 0) shared[warp] = v;
    __syncthreads();
    int warps = (blockDim.x + 31) / 32;
    float m = 0.f;
    for (int i = 0; i < warps; i++) m = fmaxf(m, shared[i]);
    return m;
}

// A row held as float4s (float4 i = threadIdx.x + j·blockDim.x in v[j], blockDim.x a multiple
// of 32, n4 = row length / 4 a multiple of 2) written in the rowscaled format for the row's
// amax. Float4s 2g and 2g+1 (neighbouring lanes) make group g: each lane trades its float4
// with its neighbour and writes half of the group's 16 bytes. Every lane must call this.
template <int HELD>
__device__ __forceinline__ void store_rowscaled(const float4 (&v)[HELD], int n4, float amax, uint16_t* __restrict__ out,
                                                float* __restrict__ inv) {
    int e = rowscale_exponent(amax);
    float s = ldexpf(1.f, e);
    if (threadIdx.x == 0) *inv = ldexpf(1.f, -e);
    uint2* o = reinterpret_cast<uint2*>(out);
#pragma unroll
    for (int j = 0; j < HELD; j++) {
        int i = threadIdx.x + j * blockDim.x;
        float4 p;
        p.x = __shfl_xor_sync(0xffffffffu, v[j].x, 1);
        p.y = __shfl_xor_sync(0xffffffffu, v[j].y, 1);
        p.z = __shfl_xor_sync(0xffffffffu, v[j].z, 1);
        p.w = __shfl_xor_sync(0xffffffffu, v[j].w, 1);
        if (i < n4) {
            bool odd = i & 1;
            float4 a = odd ? p : v[j], b = odd ? v[j] : p;  // elements 8g..8g+3 and 8g+4..8g+7
            o[i] = odd ? make_uint2(f16x2_of(a.y * s, b.y * s), f16x2_of(a.x * s, b.x * s))
                       : make_uint2(f16x2_of(a.w * s, b.w * s), f16x2_of(a.z * s, b.z * s));
        }
    }
}
