// Dequantization and conversions feeding the cuBLAS prefill GEMM (Hopper path: NVFP4 → BF16
// weights + BF16 activations on tensor cores, scale_2 applied as the GEMM's alpha). E2M1 × E4M3
// products have at most 6 significant bits, so the BF16 weight is exact. Grid-stride loops.
#include "nvfp4.cuh"
#include "pdl.cuh"

// One thread per 16-weight block (8 packed bytes, one E4M3 scale): 16 bf16 = e2m1 · e4m3, no
// scale_2, written as two 16-byte stores (byte-wide loads and 2-byte stores ran at 42 % of copy
// bandwidth on an H200). `repacked`: the codes are in the GEMV layout (nvfp4.cuh).
extern "C" __global__ void nvfp4_dequant_bf16(const uint8_t* __restrict__ w, const uint8_t* __restrict__ scales,
                                              uint16_t* __restrict__ out, size_t blocks, int repacked) {
    pdl_wait();  // no early trigger: cuBLAS kernels follow these (see kernels/pdl.cuh)
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < blocks; i += (size_t)gridDim.x * blockDim.x) {
        uint2 q = reinterpret_cast<const uint2*>(w)[i];
        float s = e4m3(scales[i]);
        uint32_t o[8];
#pragma unroll
        for (int b = 0; b < 8; b++) {
            uint32_t word = b < 4 ? q.x : q.y;
            int c = 2 * (b % 4);
            o[b] = (uint32_t)to_bf16(e2m1(code_of(word, c, repacked)) * s) |
                   ((uint32_t)to_bf16(e2m1(code_of(word, c + 1, repacked)) * s) << 16);
        }
        uint4* dst = reinterpret_cast<uint4*>(out) + 2 * i;
        dst[0] = make_uint4(o[0], o[1], o[2], o[3]);
        dst[1] = make_uint4(o[4], o[5], o[6], o[7]);
    }
}

// Same, to f32 (the exact-GEMM mode used to compare against the CPU reference), one thread per
// 8-code word.
extern "C" __global__ void nvfp4_dequant_f32(const uint8_t* __restrict__ w, const uint8_t* __restrict__ scales,
                                             float* __restrict__ out, size_t words, int repacked) {
    pdl_wait();  // no early trigger: cuBLAS kernels follow these (see kernels/pdl.cuh)
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < words; i += (size_t)gridDim.x * blockDim.x) {
        uint32_t q = reinterpret_cast<const uint32_t*>(w)[i];
        float s = e4m3(scales[i / 2]);
#pragma unroll
        for (int c = 0; c < 8; c++) out[8 * i + c] = e2m1(code_of(q, c, repacked)) * s;
    }
}

extern "C" __global__ void bf16_to_f32(const uint16_t* __restrict__ x, float* __restrict__ out, size_t n) {
    pdl_wait();  // no early trigger: cuBLAS kernels follow these (see kernels/pdl.cuh)
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        out[i] = bf16(x[i]);
}

// Four values per thread (16-byte loads, 8-byte stores), the n % 4 tail by the first threads.
extern "C" __global__ void f32_to_bf16(const float* __restrict__ x, uint16_t* __restrict__ out, size_t n) {
    pdl_wait();  // no early trigger: cuBLAS kernels follow these (see kernels/pdl.cuh)
    size_t first = blockIdx.x * (size_t)blockDim.x + threadIdx.x, stride = (size_t)gridDim.x * blockDim.x;
    for (size_t i = first; i < n / 4; i += stride) {
        float4 v = reinterpret_cast<const float4*>(x)[i];
        uint2 o = make_uint2((uint32_t)to_bf16(v.x) | ((uint32_t)to_bf16(v.y) << 16),
                             (uint32_t)to_bf16(v.z) | ((uint32_t)to_bf16(v.w) << 16));
        reinterpret_cast<uint2*>(out)[i] = o;
    }
    if (first < n % 4) out[n / 4 * 4 + first] = to_bf16(x[n / 4 * 4 + first]);
}

// The max |w| of bf16 weights into *out (a float's bits, 0 before the launch): non-negative floats
// order as their bits do, so an integer atomicMax finds it.
extern "C" __global__ void amax_bf16(const uint16_t* __restrict__ w, size_t n, unsigned int* __restrict__ out) {
    pdl_start();
    float m = 0.f;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        m = fmaxf(m, fabsf(bf16(w[i])));
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
    if (threadIdx.x % 32 == 0) atomicMax(out, __float_as_uint(m));
}

// bf16 weights → NVFP4 in ModelOpt's layout under the per-tensor scale_2, one thread per 16-weight
// block, as fp4_format::nvfp4::Nvfp4Weight::quantize (round to nearest: the block scale
// e4m3(clamp(amax / (6·scale_2), 2^-9, 448)), 1 for an all-zero block; each code
// e2m1(w / (scale · scale_2)); element 2i in the low nibble).
extern "C" __global__ void nvfp4_quantize_bf16(const uint16_t* __restrict__ w, float scale_2,
                                               uint8_t* __restrict__ codes, uint8_t* __restrict__ scales,
                                               size_t blocks) {
    pdl_start();
    for (size_t b = blockIdx.x * (size_t)blockDim.x + threadIdx.x; b < blocks; b += (size_t)gridDim.x * blockDim.x) {
        const uint4* src = reinterpret_cast<const uint4*>(w) + 2 * b;
        uint4 h0 = src[0], h1 = src[1];
        const uint32_t words[8] = {h0.x, h0.y, h0.z, h0.w, h1.x, h1.y, h1.z, h1.w};
        float v[16];
#pragma unroll
        for (int i = 0; i < 8; i++) v[2 * i] = bf16(words[i] & 0xffffu), v[2 * i + 1] = bf16(words[i] >> 16);
        float amax = 0.f;
#pragma unroll
        for (int i = 0; i < 16; i++) amax = fmaxf(amax, fabsf(v[i]));
        float s = amax / (6.0f * scale_2);
        if (s == 0.f) s = 1.0f;
        const uint32_t sf = e4m3_encode_pos(fminf(fmaxf(s, 0x1p-9f), 448.0f));
        const float div = e4m3(sf) * scale_2;
        uint32_t lo = 0, hi = 0;
#pragma unroll
        for (int i = 0; i < 8; i++) lo |= e2m1_encode(v[i] / div) << (4 * i);
#pragma unroll
        for (int i = 0; i < 8; i++) hi |= e2m1_encode(v[8 + i] / div) << (4 * i);
        scales[b] = (uint8_t)sf;
        reinterpret_cast<uint2*>(codes)[b] = make_uint2(lo, hi);
    }
}
