// Dequantization and conversions feeding the cuBLAS prefill GEMM (Hopper path: NVFP4 → BF16
// weights + BF16 activations on tensor cores, scale_2 applied as the GEMM's alpha). E2M1 × E4M3
// products have at most 6 significant bits, so the BF16 weight is exact. Grid-stride loops.
#include "nvfp4.cuh"
#include "pdl.cuh"

// One thread per packed byte: out[2i], out[2i+1] = e2m1(nibbles) · e4m3(block scale), no scale_2.
extern "C" __global__ void nvfp4_dequant_bf16(const uint8_t* __restrict__ w, const uint8_t* __restrict__ scales,
                                              uint16_t* __restrict__ out, size_t bytes) {
    pdl_wait();  // no early trigger: cuBLAS kernels follow these (see kernels/pdl.cuh)
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < bytes; i += (size_t)gridDim.x * blockDim.x) {
        uint32_t b = w[i];
        float s = e4m3(scales[i / 8]);
        out[2 * i] = to_bf16(e2m1(b & 15u) * s);
        out[2 * i + 1] = to_bf16(e2m1(b >> 4) * s);
    }
}

// Same, to f32 (the exact-GEMM mode used to compare against the CPU reference).
extern "C" __global__ void nvfp4_dequant_f32(const uint8_t* __restrict__ w, const uint8_t* __restrict__ scales,
                                             float* __restrict__ out, size_t bytes) {
    pdl_wait();  // no early trigger: cuBLAS kernels follow these (see kernels/pdl.cuh)
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < bytes; i += (size_t)gridDim.x * blockDim.x) {
        uint32_t b = w[i];
        float s = e4m3(scales[i / 8]);
        out[2 * i] = e2m1(b & 15u) * s;
        out[2 * i + 1] = e2m1(b >> 4) * s;
    }
}

extern "C" __global__ void bf16_to_f32(const uint16_t* __restrict__ x, float* __restrict__ out, size_t n) {
    pdl_wait();  // no early trigger: cuBLAS kernels follow these (see kernels/pdl.cuh)
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        out[i] = bf16(x[i]);
}

extern "C" __global__ void f32_to_bf16(const float* __restrict__ x, uint16_t* __restrict__ out, size_t n) {
    pdl_wait();  // no early trigger: cuBLAS kernels follow these (see kernels/pdl.cuh)
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        out[i] = to_bf16(x[i]);
}
