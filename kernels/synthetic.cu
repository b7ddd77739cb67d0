// Random weights generated in place on the GPU (`--synthetic`), so performance runs need no
// multi-GB upload. Values come from a counter-based hash of (seed, index): reproducible and
// independent of launch geometry.
#include "nvfp4.cuh"
#include "pdl.cuh"

__device__ __forceinline__ uint32_t hash(uint64_t i, uint64_t seed) {
    uint64_t z = i + seed * 0x9e3779b97f4a7c15ull;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return (uint32_t)((z ^ (z >> 31)) >> 32);
}

#define FOR_EACH(i, n) \
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < (n); i += (size_t)gridDim.x * blockDim.x)

// Uniform in [-scale, scale), stored as bf16. The _rn intrinsics forbid fused multiply-adds so the
// values equal the CPU's (fp4_model::synthetic).
extern "C" __global__ void fill_bf16_uniform(uint16_t* __restrict__ out, size_t n, uint64_t seed, float scale) {
    pdl_start();
    FOR_EACH(i, n) out[i] = to_bf16(__fmul_rn(__fsub_rn((float)hash(i, seed) * 0x1p-31f, 1.f), scale));
}

// Random bytes (packed E2M1 pairs: every nibble is a valid code).
extern "C" __global__ void fill_bytes(uint8_t* __restrict__ out, size_t n, uint64_t seed) {
    pdl_start();
    FOR_EACH(i, n) out[i] = (uint8_t)hash(i, seed);
}

// Positive E4M3 block scales with exponents 8..15 (2 … 448; code 0x7f would be NaN, so the top
// exponent keeps mantissa ≤ 6), like a ModelOpt export whose scale_2 maps the largest block to 448.
extern "C" __global__ void fill_e4m3_scales(uint8_t* __restrict__ out, size_t n, uint64_t seed) {
    pdl_start();
    FOR_EACH(i, n) {
        uint32_t h = hash(i, seed);
        uint32_t e = 8 + (h & 7u), m = (h >> 3) & 7u;
        if (e == 15 && m == 7) m = 6;
        out[i] = (uint8_t)((e << 3) | m);
    }
}

// center + uniform in [-scale, scale), f32 (norm weights, embeddings, GDN parameters).
extern "C" __global__ void fill_f32_uniform(float* __restrict__ out, size_t n, uint64_t seed, float center, float scale) {
    pdl_start();
    FOR_EACH(i, n) out[i] = __fadd_rn(center, __fmul_rn(__fsub_rn((float)hash(i, seed) * 0x1p-31f, 1.f), scale));
}
