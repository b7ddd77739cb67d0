// W4A4 NVFP4 linear (prefill on SM120/SM121; the same kernel, with the MMA emulated, elsewhere):
// activations quantized per 16 under the layer's input_scale (nvfp4_quantize_act, bit-identical to
// fp4_format::nvfp4::quantize_activations), then y = alpha · (A_q · W_qᵀ) on the block-scaled FP4
// tensor cores (mma.sync m16n8k64 kind::mxf4nvf4, scale_vec::4X, UE4M3 scales), with
// alpha = scale_2 · input_scale.
//
// Both operands keep ModelOpt's layout ([rows, K/2] bytes, element 2i in the low nibble;
// [rows, K/16] E4M3 scales), which is already what the MMA wants: a little-endian u32 holds 8
// consecutive K elements, element j in bits 4j..4j+3, and a row's 4 scales for one 64-wide K step
// are 4 consecutive bytes. No repacking, for weights or activations.
//
// Fragments of m16n8k64 (lane = 4·g + q, g = lane/4, q = lane%4; "word" w = K elements 8w..8w+7
// of the current 64-wide step):
//   A (16×64): a0 = row g, word q; a1 = row g+8, word q; a2 = row g, word q+4; a3 = row g+8, word q+4
//   B (8×64, a weight row per column): b0 = row g, word q; b1 = row g, word q+4
//   scale A: the 4 scale bytes of row g + 8·(q&1) (thread-id-a 0 reads lanes with q ∈ {0,1})
//   scale B: the 4 scale bytes of row g (lanes with q = 0)
//   D (16×8 f32): d0 = (g, 2q), d1 = (g, 2q+1), d2 = (g+8, 2q), d3 = (g+8, 2q+1)
// mma_fp4() below is that instruction on SM12x and, elsewhere, an emulation that gathers the
// same registers by warp shuffles and computes the block-scaled products exactly: the loading
// code is one and is tested on Hopper against the CPU emulation (fp4_format::nvfp4::w4a4_matmul).
#include "nvfp4.cuh"
#include "pdl.cuh"
#include "geometry.h"

// One 16-element block: its E4M3 scale sf = e4m3(min(g·amax/6, 448)) with g = 1/input_scale, and
// the 16 E2M1 codes of x·(1/(sf/g)) clamped to ±6 (element i in bits 4i.. of lo, then hi).
__device__ __forceinline__ uint32_t quantize_block(const float* __restrict__ x16, float g, float inv_g,
                                                   uint32_t& lo, uint32_t& hi) {
    const float4* x4 = reinterpret_cast<const float4*>(x16);
    float v[16];
#pragma unroll
    for (int i = 0; i < 4; i++) {
        float4 f = x4[i];
        v[4 * i] = f.x, v[4 * i + 1] = f.y, v[4 * i + 2] = f.z, v[4 * i + 3] = f.w;
    }
    float amax = 0.f;
#pragma unroll
    for (int i = 0; i < 16; i++) amax = fmaxf(amax, fabsf(v[i]));
    const uint32_t sf = e4m3_encode_pos(fminf(g * (amax * (1.0f / 6.0f)), 448.0f));
    const float sfv = e4m3(sf);
    const float out_scale = sfv == 0.f ? 0.f : 1.0f / (sfv * inv_g);
    lo = 0, hi = 0;
#pragma unroll
    for (int i = 0; i < 8; i++) {
        lo |= e2m1_encode(fminf(fmaxf(v[i] * out_scale, -6.f), 6.f)) << (4 * i);
        hi |= e2m1_encode(fminf(fmaxf(v[8 + i] * out_scale, -6.f), 6.f)) << (4 * i);
    }
    return sf;
}

// One thread per 16-element block of x [rows, k]: codes (8 bytes) and scale byte.
extern "C" __global__ void nvfp4_quantize_act(const float* __restrict__ x, float input_scale,
                                              uint8_t* __restrict__ codes, uint8_t* __restrict__ scales,
                                              size_t blocks) {
    pdl_start();
    const float g = 1.0f / input_scale, inv_g = 1.0f / g;
    for (size_t b = blockIdx.x * (size_t)blockDim.x + threadIdx.x; b < blocks; b += (size_t)gridDim.x * blockDim.x) {
        uint32_t lo, hi;
        scales[b] = (uint8_t)quantize_block(x + 16 * b, g, inv_g, lo, hi);
        reinterpret_cast<uint2*>(codes)[b] = make_uint2(lo, hi);
    }
}

// The same quantization, written out dequantized (e2m1 · (sf/g)): W4A4 decode runs the W4A16
// GEMV on these values, which multiplies out to the W4A4 product (the GEMV is bandwidth-bound and a
// 64-row MMA tile would be 1/64 used for one token).
extern "C" __global__ void nvfp4_fake_quant_act(const float* __restrict__ x, float* __restrict__ out,
                                                float input_scale, size_t blocks) {
    pdl_start();
    const float g = 1.0f / input_scale, inv_g = 1.0f / g;
    for (size_t b = blockIdx.x * (size_t)blockDim.x + threadIdx.x; b < blocks; b += (size_t)gridDim.x * blockDim.x) {
        uint32_t lo, hi;
        const float deq = e4m3(quantize_block(x + 16 * b, g, inv_g, lo, hi)) / g;
#pragma unroll
        for (int i = 0; i < 8; i++) {
            out[16 * b + i] = e2m1(lo >> (4 * i)) * deq;
            out[16 * b + 8 + i] = e2m1(hi >> (4 * i)) * deq;
        }
    }
}

// FP8 layers when activations are quantized (W8A8): out = e4m3(clamp(x/s, ±448))·s, as fp4_model's
// CPU path computes it; the GEMM then runs on the quantized values.
extern "C" __global__ void fp8_fake_quant_act(const float* __restrict__ x, float* __restrict__ out, float s,
                                              size_t n) {
    pdl_start();
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        const float r = fminf(fmaxf(x[i] / s, -448.0f), 448.0f);
        const float v = e4m3(e4m3_encode_pos(fabsf(r))) * s;
        out[i] = signbit(r) ? -v : v;
    }
}

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 1200 && __CUDA_ARCH__ < 1300
#define NATIVE_FP4_MMA 1
#endif

// d += A·Bᵀ for one m16n8k64 block-scaled FP4 tile held in the fragment registers above.
__device__ __forceinline__ void mma_fp4(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], uint32_t sfa,
                                        uint32_t sfb) {
#ifdef NATIVE_FP4_MMA
    asm volatile(
        "mma.sync.aligned.m16n8k64.row.col.kind::mxf4nvf4.block_scale.scale_vec::4X.f32.e2m1.e2m1.f32.ue4m3 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3}, {%10}, {%11,%12}, {%13}, {%14,%15};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "r"(sfa), "h"((uint16_t)0),
          "h"((uint16_t)0), "r"(sfb), "h"((uint16_t)0), "h"((uint16_t)0));
#else
    // Emulation: lane (g, q) owns rows g, g+8 and columns 2q, 2q+1 of D. Word w of row r sits in
    // lane 4·(r%8) + w%4, register a0/a1 (w < 4) or a2/a3; of column c in lane 4c + w%4, b0/b1.
    const unsigned all = 0xffffffffu;
    const int lane = threadIdx.x & 31, g = lane >> 2, q = lane & 3;
    const uint32_t sa0 = __shfl_sync(all, sfa, 4 * g), sa1 = __shfl_sync(all, sfa, 4 * g + 1);
    const uint32_t sb0 = __shfl_sync(all, sfb, 8 * q), sb1 = __shfl_sync(all, sfb, 8 * q + 4);
#pragma unroll
    for (int blk = 0; blk < 4; blk++) {  // 16-element scale blocks = word pairs (2·blk, 2·blk+1)
        float s[4] = {0.f, 0.f, 0.f, 0.f};  // (row g | g+8) × (col 2q | 2q+1), exact block sums
#pragma unroll
        for (int h = 0; h < 2; h++) {
            const int w = 2 * blk + h, src = w & 3;
            const uint32_t r0 = __shfl_sync(all, w < 4 ? a[0] : a[2], 4 * g + src);
            const uint32_t r1 = __shfl_sync(all, w < 4 ? a[1] : a[3], 4 * g + src);
            const uint32_t c0 = __shfl_sync(all, w < 4 ? b[0] : b[1], 8 * q + src);
            const uint32_t c1 = __shfl_sync(all, w < 4 ? b[0] : b[1], 8 * q + 4 + src);
#pragma unroll
            for (int i = 0; i < 8; i++) {
                const float x0 = e2m1(r0 >> (4 * i)), x1 = e2m1(r1 >> (4 * i));
                const float y0 = e2m1(c0 >> (4 * i)), y1 = e2m1(c1 >> (4 * i));
                s[0] += x0 * y0, s[1] += x0 * y1, s[2] += x1 * y0, s[3] += x1 * y1;
            }
        }
        const float fa0 = e4m3((sa0 >> (8 * blk)) & 255u), fa1 = e4m3((sa1 >> (8 * blk)) & 255u);
        const float fb0 = e4m3((sb0 >> (8 * blk)) & 255u), fb1 = e4m3((sb1 >> (8 * blk)) & 255u);
        d[0] += s[0] * (fa0 * fb0), d[1] += s[1] * (fa0 * fb1);
        d[2] += s[2] * (fa1 * fb0), d[3] += s[3] * (fa1 * fb1);
    }
#endif
}

#define W4A4_WORDS 8 // u32 code words per row per 64-wide K step

// Loads rows [row0, row0 + 64) of one 64-wide K step into shared memory: code words (zero beyond
// `rows` or K) and the 4 scale bytes as one u32 (zero likewise: a zero scale nulls the block).
__device__ __forceinline__ void w4a4_load_tile(const uint8_t* __restrict__ codes, const uint8_t* __restrict__ scales,
                                               int rows, int k, int row0, int kstep, uint32_t (*tile)[W4A4_WORDS + 1],
                                               uint32_t* tile_scales) {
    const int words = k / 8, blocks = k / 16;
    const uint32_t* c32 = reinterpret_cast<const uint32_t*>(codes);
    for (int i = threadIdx.x; i < W4A4_BM * W4A4_WORDS; i += W4A4_THREADS) {
        const int r = i / W4A4_WORDS, w = i % W4A4_WORDS, gw = kstep * W4A4_WORDS + w;
        tile[r][w] = (row0 + r < rows && gw < words) ? __ldg(c32 + (size_t)(row0 + r) * words + gw) : 0u;
    }
    for (int r = threadIdx.x; r < W4A4_BM; r += W4A4_THREADS) {
        uint32_t s = 0;
        if (row0 + r < rows) {
            const uint8_t* row = scales + (size_t)(row0 + r) * blocks;
#pragma unroll
            for (int j = 0; j < 4; j++) {
                const int gb = kstep * 4 + j;
                if (gb < blocks) s |= (uint32_t)__ldg(row + gb) << (8 * j);
            }
        }
        tile_scales[r] = s;
    }
}

// y [t, n] = alpha · A_q [t, k] · W_q [n, k]ᵀ. Block: 64 tokens × 64 features, 4 warps as 2×2, each
// warp 32×32 = 2 m16 tiles × 4 n8 tiles. K (a multiple of 16) is walked 64 at a time; a partial
// last step is zero-filled. Rows are 4-byte aligned because K/2 is a multiple of 8.
extern "C" __global__ void __launch_bounds__(W4A4_THREADS)
    nvfp4_w4a4_gemm(const uint8_t* __restrict__ a_codes, const uint8_t* __restrict__ a_scales,
                    const uint8_t* __restrict__ w_codes, const uint8_t* __restrict__ w_scales, float alpha,
                    float* __restrict__ y, int t, int n, int k) {
    pdl_start();
    __shared__ uint32_t as[W4A4_BM][W4A4_WORDS + 1], ws[W4A4_BN][W4A4_WORDS + 1];  // +1: no bank conflicts
    __shared__ uint32_t as_s[W4A4_BM], ws_s[W4A4_BN];
    const int m0 = blockIdx.y * W4A4_BM, n0 = blockIdx.x * W4A4_BN;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, q = lane & 3;
    const int wm = (warp & 1) * 32, wn = (warp >> 1) * 32;
    float d[2][4][4] = {};
    const int ksteps = (k + 63) / 64;
    for (int ks = 0; ks < ksteps; ks++) {
        w4a4_load_tile(a_codes, a_scales, t, k, m0, ks, as, as_s);
        w4a4_load_tile(w_codes, w_scales, n, k, n0, ks, ws, ws_s);
        __syncthreads();
        uint32_t af[2][4], sfa[2];
#pragma unroll
        for (int mi = 0; mi < 2; mi++) {
            const int r = wm + 16 * mi + g;
            af[mi][0] = as[r][q], af[mi][1] = as[r + 8][q], af[mi][2] = as[r][q + 4], af[mi][3] = as[r + 8][q + 4];
            sfa[mi] = as_s[r + 8 * (q & 1)];
        }
#pragma unroll
        for (int ni = 0; ni < 4; ni++) {
            const int c = wn + 8 * ni + g;
            const uint32_t bf[2] = {ws[c][q], ws[c][q + 4]};
#pragma unroll
            for (int mi = 0; mi < 2; mi++) mma_fp4(d[mi][ni], af[mi], bf, sfa[mi], ws_s[c]);
        }
        __syncthreads();
    }
#pragma unroll
    for (int mi = 0; mi < 2; mi++)
#pragma unroll
        for (int ni = 0; ni < 4; ni++)
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const int r = m0 + wm + 16 * mi + g + 8 * (e >> 1), c = n0 + wn + 8 * ni + 2 * q + (e & 1);
                if (r < t && c < n) y[(size_t)r * n + c] = alpha * d[mi][ni][e];
            }
}

// Which MMA this build of the kernel runs: 1 = native block-scaled FP4, 0 = emulated.
extern "C" __global__ void w4a4_native(int* out) {
    pdl_start();
#ifdef NATIVE_FP4_MMA
    *out = 1;
#else
    *out = 0;
#endif
}
