// Gated delta rule, token by token (recurrent form), fp32 state [Hv, dk, dv]:
//   S ← e^g·S;  δ = (v − Sᵀk̂)·β;  S ← S + k̂ ⊗ δ;  o = Sᵀq̂
// with k̂ = l2norm(k), q̂ = l2norm(q)/√dk (eps 1e-6 on the sum of squares, as FLA). Value head h
// reads key head h / (Hv/Hk).
//
// Geometry: one warp per (value head, 32 state columns); lane j owns column j of the head's state,
// kept in shared memory as S[i][lane] (conflict-free), so the update needs no cross-lane reduction;
// the warp normalises k and q for each token together. Tokens are walked in order inside the
// kernel, so prefill and decode are one launch each.
#include <stdint.h>
#include "pdl.cuh"
#include "geometry.h"

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

extern "C" __global__ void gdn_recurrent_f32(const float* __restrict__ q, const float* __restrict__ k,
                                             const float* __restrict__ v, const float* __restrict__ g,
                                             const float* __restrict__ beta, float* __restrict__ state,
                                             float* __restrict__ out, int t_len, int hk, int hv, int dk, int dv) {
    pdl_start();
    extern __shared__ float sm[];
    float* S = sm;             // [dk][32]
    float* ks = sm + dk * 32;  // [dk]
    float* qs = ks + dk;       // [dk]
    int h = blockIdx.x, lane = threadIdx.x;
    int j = blockIdx.y * 32 + lane;
    bool on = j < dv;
    int kh = h / (hv / hk);
    float* st = state + (size_t)h * dk * dv;
    for (int i = 0; i < dk; i++) S[i * 32 + lane] = on ? st[(size_t)i * dv + j] : 0.f;
    for (int t = 0; t < t_len; t++) {
        const float* kt = k + ((size_t)t * hk + kh) * dk;
        const float* qt = q + ((size_t)t * hk + kh) * dk;
        float ssk = 0.f, ssq = 0.f;
        for (int i = lane; i < dk; i += 32) {
            ssk += kt[i] * kt[i];
            ssq += qt[i] * qt[i];
        }
        float rk = 1.f / sqrtf(warp_sum(ssk) + 1e-6f), rq = 1.f / sqrtf(warp_sum(ssq) + 1e-6f);
        for (int i = lane; i < dk; i += 32) {
            ks[i] = kt[i] * rk;
            qs[i] = qt[i] * rq / sqrtf((float)dk);
        }
        __syncwarp();
        size_t th = (size_t)t * hv + h;
        float decay = expf(g[th]), b = beta[th];
        if (on) {
            float kv = 0.f;
            for (int i = 0; i < dk; i++) {
                float s = S[i * 32 + lane] * decay;
                S[i * 32 + lane] = s;
                kv += s * ks[i];
            }
            float delta = (v[th * dv + j] - kv) * b;
            float o = 0.f;
            for (int i = 0; i < dk; i++) {
                float s = S[i * 32 + lane] + ks[i] * delta;
                S[i * 32 + lane] = s;
                o += s * qs[i];
            }
            out[th * dv + j] = o;
        }
        __syncwarp();
    }
    if (on)
        for (int i = 0; i < dk; i++) st[(size_t)i * dv + j] = S[i * 32 + lane];
}

// ---- Chunked prefill (torch_chunk_gated_delta_rule; fp4_kernels::cpu::gdn_chunked is the
// reference): chunks of GDN_C tokens. Everything that does not depend on the state is computed for
// all chunks and heads in parallel (gdn_chunk_prep); the state then crosses the chunks in order
// (gdn_chunk_state), each chunk a few small matrix products instead of GDN_C dependent steps.
// Both kernels tile their products in registers (4x4 or 8x4 outputs per thread, float4 operands
// from shared memory): a thread per output column, each multiply-add waiting on its own shared
// loads, made the two 1.6x the rest of a 1k-token prefill's GDN layers (H200, 2026-12-01).
#include "mma.cuh"

#define PREP_LD (GDN_C + 4)  // row stride of gdn_chunk_prep's transposed tiles (16-byte rows)
static_assert(GDN_C == 64 && GDN_PREP_THREADS == 256 && GDN_STATE_THREADS == 128 && GDN_PREP_MAX_DK <= 128,
              "the register tiles below cover 64 chunk rows and up to 128 key dims with these thread counts");

// One block per (chunk, value head). Per chunk (rows past T are zero and change nothing):
//   Γ = cumsum(g) (sequential, as the reference), k̂, q̂ = l2norm(k), l2norm(q)·q_scale,
//   L = strictly_lower((β·k̂)·k̂ᵀ ⊙ e^{Γi−Γj}),  QK = lower((q̂·k̂ᵀ) ⊙ e^{Γi−Γj}),
//   (I + L)·[nv | kcd] = [β·v | β·k̂·e^Γ] by forward substitution (a thread per column, the
//   column in registers).
// k̂ and q̂ sit transposed in shared memory (kT[a][i]) so the Gram products read float4s.
// Dynamic shared memory (floats): kT and qT dk·(C+4) each, L C·(C+4), Γ, β and the norms 4·C:
// 86 KiB for the 9B's dk = 128, within SM12x's 99 KiB (cuda.rs's gdn_prep_smem).
// Outputs per (chunk, head), in the layouts gdn_chunk_state reads: qkT [C][C] (= QKᵀ, row l
// column i), qgT [dk][C] (= (q̂·e^Γ)ᵀ), knd [C][dk] (= k̂·e^{Γ_last−Γ}), kcdT [dk][C], nv [C][dv],
// gam [C].
extern "C" __global__ void __launch_bounds__(GDN_PREP_THREADS)
    gdn_chunk_prep(const float* __restrict__ q, const float* __restrict__ k, const float* __restrict__ v,
                   const float* __restrict__ g, const float* __restrict__ beta, int t_len, int hk, int hv, int dk,
                   int dv, float q_scale, float* __restrict__ qkT, float* __restrict__ qgT, float* __restrict__ knd,
                   float* __restrict__ kcdT, float* __restrict__ nv, float* __restrict__ gam) {
    pdl_start();
    extern __shared__ float4 prep_sm4[];
    float* kT = reinterpret_cast<float*>(prep_sm4);  // [dk][PREP_LD]
    float* qT = kT + dk * PREP_LD;                    // [dk][PREP_LD]
    float* Ls = qT + dk * PREP_LD;                    // [C][PREP_LD]
    float *gs = Ls + GDN_C * PREP_LD, *bs = gs + GDN_C, *rk = bs + GDN_C, *rq = rk + GDN_C;
    const int chunk = blockIdx.x, h = blockIdx.y, kh = h / (hv / hk), t0 = chunk * GDN_C;
    const int n = min(GDN_C, t_len - t0), tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const size_t ch = (size_t)chunk * hv + h;  // (chunk, head) slot of the outputs
    // Every global load of a phase in flight at once (unrolled): looping over rows or elements
    // one latency at a time cost more than all the arithmetic.
    if (tid < GDN_C) gs[tid] = tid < n ? g[(size_t)(t0 + tid) * hv + h] : 0.f;
#pragma unroll
    for (int r = 0; r < GDN_C / (GDN_PREP_THREADS / 32); r++) {
        const int i = warp + r * (GDN_PREP_THREADS / 32);
        float ssk = 0.f, ssq = 0.f;
        if (i < n) {
            const float* kt = k + ((size_t)(t0 + i) * hk + kh) * dk;
            const float* qt = q + ((size_t)(t0 + i) * hk + kh) * dk;
            for (int a = lane; a < dk; a += 32) ssk += kt[a] * kt[a], ssq += qt[a] * qt[a];
        }
        ssk = warp_sum(ssk), ssq = warp_sum(ssq);
        if (lane == 0) {
            rk[i] = i < n ? 1.f / sqrtf(ssk + 1e-6f) : 0.f;
            rq[i] = i < n ? 1.f / sqrtf(ssq + 1e-6f) : 0.f;
            bs[i] = i < n ? beta[(size_t)(t0 + i) * hv + h] : 0.f;
        }
    }
    __syncthreads();
    if (tid == 0)  // Γ = cumsum(g) in order, as the reference sums it
        for (int i = 1; i < GDN_C; i++) gs[i] += gs[i - 1];
    __syncthreads();
#pragma unroll 8
    for (int idx = tid; idx < GDN_C * dk; idx += GDN_PREP_THREADS) {
        const int i = idx / dk, a = idx % dk;
        const size_t src = ((size_t)(t0 + i) * hk + kh) * dk + a;
        kT[a * PREP_LD + i] = i < n ? k[src] * rk[i] : 0.f;
        qT[a * PREP_LD + i] = i < n ? q[src] * rq[i] * q_scale : 0.f;
    }
    if (tid < GDN_C) gam[ch * GDN_C + tid] = gs[tid];
    __syncthreads();
    {  // Gram products, 4x4 per thread: rows 4·ti.., columns 4·tj.. (16 x 16 threads).
        const int ti = tid / 16, tj = tid % 16;
        float kk[4][4] = {}, qk[4][4] = {};
        if (tj <= ti) {
            for (int a = 0; a < dk; a++) {
                const float4 ki = *reinterpret_cast<const float4*>(kT + a * PREP_LD + 4 * ti);
                const float4 qi = *reinterpret_cast<const float4*>(qT + a * PREP_LD + 4 * ti);
                const float4 kj = *reinterpret_cast<const float4*>(kT + a * PREP_LD + 4 * tj);
                const float kiv[4] = {ki.x, ki.y, ki.z, ki.w}, qiv[4] = {qi.x, qi.y, qi.z, qi.w};
                const float kjv[4] = {kj.x, kj.y, kj.z, kj.w};
#pragma unroll
                for (int r = 0; r < 4; r++)
#pragma unroll
                    for (int c = 0; c < 4; c++) kk[r][c] += kiv[r] * kjv[c], qk[r][c] += qiv[r] * kjv[c];
            }
        }
        float* qkT_c = qkT + ch * GDN_C * GDN_C;
#pragma unroll
        for (int r = 0; r < 4; r++)
#pragma unroll
            for (int c = 0; c < 4; c++) {
                const int i = 4 * ti + r, j = 4 * tj + c;
                const float decay = j <= i ? expf(gs[i] - gs[j]) : 0.f;
                Ls[i * PREP_LD + j] = j < i ? bs[i] * kk[r][c] * decay : 0.f;
                qkT_c[j * GDN_C + i] = j <= i && i < n ? qk[r][c] * decay : 0.f;
            }
    }
    {  // q̂·e^Γ transposed and k̂·e^{Γ_last−Γ} row-major, straight from the tiles.
        float *qg_c = qgT + ch * GDN_C * dk, *knd_c = knd + ch * GDN_C * dk;
        const float last = gs[GDN_C - 1];
        for (int idx = tid; idx < GDN_C * dk; idx += GDN_PREP_THREADS) {
            const int a = idx / GDN_C, i = idx % GDN_C;
            qg_c[idx] = qT[a * PREP_LD + i] * expf(gs[i]);
            const int l = idx / dk, b = idx % dk;
            knd_c[idx] = kT[b * PREP_LD + l] * expf(last - gs[l]);
        }
    }
    __syncthreads();  // Ls complete
    for (int col = tid; col < dv + dk; col += GDN_PREP_THREADS) {
        const bool is_v = col < dv;
        float x[GDN_C];
#pragma unroll
        for (int i = 0; i < GDN_C; i++) {
            if (is_v) x[i] = i < n ? v[((size_t)(t0 + i) * hv + h) * dv + col] * bs[i] : 0.f;
            else x[i] = (kT[(col - dv) * PREP_LD + i] * bs[i]) * expf(gs[i]);
        }
#pragma unroll
        for (int i = 1; i < GDN_C; i++) {
            float r = x[i];
#pragma unroll
            for (int j = 0; j < i; j++) r -= Ls[i * PREP_LD + j] * x[j];
            x[i] = r;
        }
        if (is_v) {
            float* nv_c = nv + ch * GDN_C * dv + col;
#pragma unroll
            for (int i = 0; i < GDN_C; i++) nv_c[(size_t)i * dv] = x[i];
        } else {
            float4* kc = reinterpret_cast<float4*>(kcdT + ch * GDN_C * dk + (size_t)(col - dv) * GDN_C);
#pragma unroll
            for (int i = 0; i < GDN_C / 4; i++) kc[i] = make_float4(x[4 * i], x[4 * i + 1], x[4 * i + 2], x[4 * i + 3]);
        }
    }
}

// Copies n floats (a multiple of 4, 16-byte aligned) into shared memory with cp.async.
__device__ __forceinline__ void stage_async(float* __restrict__ dst, const float* __restrict__ src, int n) {
    for (int i = threadIdx.x; i < n / 4; i += blockDim.x) cp_async16(dst + 4 * i, src + 4 * i);
    cp_async_commit();
}

// One block of GDN_STATE_THREADS per (value head, 32 state columns). The state slice S[dk][32]
// stays in shared memory across the chunks, walked in order:
//   v_new = nv − kcd·S;  o = (q̂·e^Γ)·S + QK·v_new;  S = S·e^{Γ_last} + (k̂·e^{Γ_last−Γ})ᵀ·v_new
// Thread (ty, tx) of 16 x 8 owns columns 4·tx.. and chunk rows 4·ty.. (v_new, o) or state rows
// 8·ty.. (the update). Each operand tile is staged in shared memory (cp.async) before its product.
// Dynamic shared memory (floats): S dk·32, vn C·32, one tile C·dk, QKᵀ C·C: 72 KiB for dk = 128
// (cuda.rs's gdn_state_smem).
extern "C" __global__ void __launch_bounds__(GDN_STATE_THREADS)
    gdn_chunk_state(const float* __restrict__ qkT, const float* __restrict__ qgT, const float* __restrict__ knd,
                    const float* __restrict__ kcdT, const float* __restrict__ nv, const float* __restrict__ gam,
                    float* __restrict__ state, float* __restrict__ out, int t_len, int hv, int dk, int dv) {
    pdl_start();
    extern __shared__ float4 state_sm4[];
    float* S = reinterpret_cast<float*>(state_sm4);  // [dk][32]
    float* vn = S + dk * 32;                          // [C][32]
    float* tile = vn + GDN_C * 32;                    // [dk][C] or [C][dk]
    float* qks = tile + GDN_C * dk;                   // [C][C]
    const int h = blockIdx.x, tid = threadIdx.x, tx = tid % 8, ty = tid / 8;
    const int j0 = blockIdx.y * 32, c4 = 4 * tx, i4 = 4 * ty, a8 = 8 * ty;
    float* st = state + (size_t)h * dk * dv;
    for (int idx = tid; idx < dk * 32; idx += GDN_STATE_THREADS) {
        const int a = idx / 32, j = j0 + idx % 32;
        S[idx] = j < dv ? st[(size_t)a * dv + j] : 0.f;
    }
    const int chunks = (t_len + GDN_C - 1) / GDN_C;
    for (int c = 0; c < chunks; c++) {
        const size_t ch = (size_t)c * hv + h;
        const int n = min(GDN_C, t_len - c * GDN_C);
        // kcdᵀ and QKᵀ (not read until the output) and nv head for shared memory and registers
        // together; only kcdᵀ is waited on before the first product.
        stage_async(tile, kcdT + ch * GDN_C * dk, GDN_C * dk);
        stage_async(qks, qkT + ch * GDN_C * GDN_C, GDN_C * GDN_C);
        const float chunk_decay = expf(gam[ch * GDN_C + GDN_C - 1]);
        float acc[4][4];
        const float* nv_c = nv + ch * GDN_C * dv;
#pragma unroll
        for (int r = 0; r < 4; r++)
#pragma unroll
            for (int s = 0; s < 4; s++) {
                const int j = j0 + c4 + s;
                acc[r][s] = j < dv ? nv_c[(size_t)(i4 + r) * dv + j] : 0.f;
            }
        cp_async_wait<1>();
        __syncthreads();  // kcdᵀ staged (and S, on the first chunk)
#pragma unroll 4
        for (int a = 0; a < dk; a++) {
            const float4 t = *reinterpret_cast<const float4*>(tile + a * GDN_C + i4);
            const float4 sv = *reinterpret_cast<const float4*>(S + a * 32 + c4);
            const float tv[4] = {t.x, t.y, t.z, t.w}, svv[4] = {sv.x, sv.y, sv.z, sv.w};
#pragma unroll
            for (int r = 0; r < 4; r++)
#pragma unroll
                for (int s = 0; s < 4; s++) acc[r][s] -= tv[r] * svv[s];
        }
#pragma unroll
        for (int r = 0; r < 4; r++)
            *reinterpret_cast<float4*>(vn + (i4 + r) * 32 + c4) = make_float4(acc[r][0], acc[r][1], acc[r][2], acc[r][3]);
        __syncthreads();  // vn complete, every thread done with kcdᵀ
        stage_async(tile, qgT + ch * GDN_C * dk, GDN_C * dk);
        cp_async_wait<0>();
        __syncthreads();
#pragma unroll
        for (int r = 0; r < 4; r++)
#pragma unroll
            for (int s = 0; s < 4; s++) acc[r][s] = 0.f;
#pragma unroll 4
        for (int a = 0; a < dk; a++) {
            const float4 t = *reinterpret_cast<const float4*>(tile + a * GDN_C + i4);
            const float4 sv = *reinterpret_cast<const float4*>(S + a * 32 + c4);
            const float tv[4] = {t.x, t.y, t.z, t.w}, svv[4] = {sv.x, sv.y, sv.z, sv.w};
#pragma unroll
            for (int r = 0; r < 4; r++)
#pragma unroll
                for (int s = 0; s < 4; s++) acc[r][s] += tv[r] * svv[s];
        }
        // QK is lower-triangular (QKᵀ zero for l > i): rows 4·ty.. need l < 4·ty + 4 only.
        for (int l = 0; l < min(i4 + 4, n); l++) {
            const float4 qv = *reinterpret_cast<const float4*>(qks + l * GDN_C + i4);
            const float4 vv = *reinterpret_cast<const float4*>(vn + l * 32 + c4);
            const float qa[4] = {qv.x, qv.y, qv.z, qv.w}, va[4] = {vv.x, vv.y, vv.z, vv.w};
#pragma unroll
            for (int r = 0; r < 4; r++)
#pragma unroll
                for (int s = 0; s < 4; s++) acc[r][s] += qa[r] * va[s];
        }
#pragma unroll
        for (int r = 0; r < 4; r++) {
            const int i = i4 + r;
            if (i >= n) continue;
            float* o = out + ((size_t)(c * GDN_C + i) * hv + h) * dv;
#pragma unroll
            for (int s = 0; s < 4; s++)
                if (j0 + c4 + s < dv) o[j0 + c4 + s] = acc[r][s];
        }
        __syncthreads();  // every thread has read S and the q̂ tile
        stage_async(tile, knd + ch * GDN_C * dk, GDN_C * dk);
        cp_async_wait<0>();
        __syncthreads();
        if (a8 < dk) {
            float sa[8][4];
#pragma unroll
            for (int r = 0; r < 8; r++)
#pragma unroll
                for (int s = 0; s < 4; s++) sa[r][s] = a8 + r < dk ? S[(a8 + r) * 32 + c4 + s] * chunk_decay : 0.f;
#pragma unroll 2
            for (int l = 0; l < n; l++) {
                const float4 k0 = *reinterpret_cast<const float4*>(tile + l * dk + a8);
                const float4 k1 = *reinterpret_cast<const float4*>(tile + l * dk + a8 + 4);
                const float4 vv = *reinterpret_cast<const float4*>(vn + l * 32 + c4);
                const float kv[8] = {k0.x, k0.y, k0.z, k0.w, k1.x, k1.y, k1.z, k1.w}, va[4] = {vv.x, vv.y, vv.z, vv.w};
#pragma unroll
                for (int r = 0; r < 8; r++)
#pragma unroll
                    for (int s = 0; s < 4; s++) sa[r][s] += kv[r] * va[s];
            }
#pragma unroll
            for (int r = 0; r < 8; r++)
                if (a8 + r < dk)
                    *reinterpret_cast<float4*>(S + (a8 + r) * 32 + c4) = make_float4(sa[r][0], sa[r][1], sa[r][2], sa[r][3]);
        }
        __syncthreads();  // S updated before the next chunk reads it
    }
    for (int idx = tid; idx < dk * 32; idx += GDN_STATE_THREADS) {
        const int a = idx / 32, j = j0 + idx % 32;
        if (j < dv) st[(size_t)a * dv + j] = S[idx];
    }
}
