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
#define STATE_ROWS (GDN_C / GDN_STATE_WARPS)  // chunk rows per warp in gdn_chunk_state
#define STATE_AROWS 8                     // state rows per register group in the state update

// One block per (chunk, value head). Per chunk (padded rows past T are zero and change nothing):
//   Γ = cumsum(g) (sequential, as the reference), k̂, q̂ = l2norm(k), l2norm(q)·q_scale,
//   L = strictly_lower((β·k̂)·k̂ᵀ ⊙ e^{Γi−Γj}),  QK = lower((q̂·k̂ᵀ) ⊙ e^{Γi−Γj}),
//   (I + L)·[nv | kcd] = [β·v | β·k̂·e^Γ] by forward substitution, one thread per column.
// k̂ of the chunk sits in shared memory (rows padded to dk+1 floats: a warp reading 32 rows at one
// column hits 32 banks); L goes through global memory (read back as warp-uniform broadcasts).
// Outputs per (chunk, head), row-major: kn, qn, kcd [C, dk]; nv [C, dv]; qk, lw [C, C]; gam [C].
extern "C" __global__ void __launch_bounds__(GDN_PREP_THREADS)
    gdn_chunk_prep(const float* __restrict__ q, const float* __restrict__ k, const float* __restrict__ v,
                   const float* __restrict__ g, const float* __restrict__ beta, int t_len, int hk, int hv, int dk,
                   int dv, float q_scale, float* __restrict__ kn, float* __restrict__ qn, float* __restrict__ gam,
                   float* __restrict__ qk, float* __restrict__ lw, float* __restrict__ nv, float* __restrict__ kcd) {
    pdl_start();
    __shared__ float ks[GDN_C][GDN_PREP_MAX_DK + 1];
    __shared__ float gs[GDN_C], bs[GDN_C], rk[GDN_C], rq[GDN_C];
    const int chunk = blockIdx.x, h = blockIdx.y, kh = h / (hv / hk), t0 = chunk * GDN_C;
    const int n = min(GDN_C, t_len - t0), tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const size_t ch = (size_t)chunk * hv + h;  // (chunk, head) slot of the outputs
    float *kn_c = kn + ch * GDN_C * dk, *qn_c = qn + ch * GDN_C * dk, *kcd_c = kcd + ch * GDN_C * dk;
    float *nv_c = nv + ch * GDN_C * dv, *qk_c = qk + ch * GDN_C * GDN_C, *l_c = lw + ch * GDN_C * GDN_C;
    for (int i = warp; i < GDN_C; i += GDN_PREP_THREADS / 32) {
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
    if (tid == 0) {
        float acc = 0.f;
        for (int i = 0; i < GDN_C; i++) {
            if (i < n) acc += g[(size_t)(t0 + i) * hv + h];
            gs[i] = acc;
        }
    }
    __syncthreads();
    for (int idx = tid; idx < GDN_C * dk; idx += GDN_PREP_THREADS) {
        const int i = idx / dk, a = idx % dk;
        const size_t src = ((size_t)(t0 + i) * hk + kh) * dk + a;
        const float kv = i < n ? k[src] * rk[i] : 0.f;
        ks[i][a] = kv;
        kn_c[idx] = kv;
        qn_c[idx] = i < n ? q[src] * rq[i] * q_scale : 0.f;
    }
    if (tid < GDN_C) gam[ch * GDN_C + tid] = gs[tid];
    __syncthreads();  // ks, and qn_c (written by this block, read back below)
    for (int idx = tid; idx < GDN_C * GDN_C; idx += GDN_PREP_THREADS) {
        const int i = idx / GDN_C, j = idx % GDN_C;  // a warp: one i, 32 j
        float l = 0.f, s = 0.f;
        if (i < n && j <= i) {
            const float* qi = qn_c + i * dk;
            const float decay = expf(gs[i] - gs[j]);
            for (int a = 0; a < dk; a++) l += (ks[i][a] * bs[i]) * ks[j][a], s += qi[a] * ks[j][a];
            l *= decay, s *= decay;
        }
        l_c[idx] = j < i ? l : 0.f;
        qk_c[idx] = s;
    }
    __syncthreads();  // l_c complete
    for (int col = tid; col < dv + dk; col += GDN_PREP_THREADS) {
        const bool is_v = col < dv;
        float* x = is_v ? nv_c + col : kcd_c + (col - dv);
        const int stride = is_v ? dv : dk;
        for (int i = 0; i < GDN_C; i++) {
            float r = 0.f;
            if (i < n) {
                r = is_v ? v[((size_t)(t0 + i) * hv + h) * dv + col] * bs[i] : (ks[i][col - dv] * bs[i]) * expf(gs[i]);
                for (int j = 0; j < i; j++) r -= l_c[i * GDN_C + j] * x[j * stride];
            }
            x[i * stride] = r;
        }
    }
}

// One block of GDN_STATE_WARPS warps per (value head, 32 state columns); lane = column j. The state
// slice S[dk][32] stays in shared memory across the chunks, walked in order:
//   v_new = nv − kcd·S;  o = (q̂·e^Γ)·S + QK·v_new;  S = S·e^{Γ_last} + (k̂·e^{Γ_last−Γ})ᵀ·v_new
// Each warp takes STATE_ROWS chunk rows for v_new and o, then state rows for the update. The
// chunk's kcd, q̂ (with QK) and k̂ tiles are staged in shared memory one at a time by all threads
// (every load in flight at once) before the loops that read them: read in place, each loop
// iteration waited on an L2 round trip. Shared memory (floats): S dk·32, vn C·32, kd C, the tile
// C·dk, QK C·C: 72 KiB for the 9B's dk = 128, within SM12x's 99 KiB.
__device__ __forceinline__ void stage(float* __restrict__ dst, const float* __restrict__ src, int n) {
    const float4* s4 = reinterpret_cast<const float4*>(src);
    float4* d4 = reinterpret_cast<float4*>(dst);
    for (int i = threadIdx.x; i < n / 4; i += blockDim.x) d4[i] = s4[i];
}

extern "C" __global__ void __launch_bounds__(GDN_STATE_WARPS * 32)
    gdn_chunk_state(const float* __restrict__ kn, const float* __restrict__ qn, const float* __restrict__ gam,
                    const float* __restrict__ qk, const float* __restrict__ nv, const float* __restrict__ kcd,
                    float* __restrict__ state, float* __restrict__ out, int t_len, int hv, int dk, int dv) {
    pdl_start();
    extern __shared__ float4 sm4[];
    float* sm = reinterpret_cast<float*>(sm4);
    float* S = sm;                                                   // [dk][32]
    float(*vn)[32] = reinterpret_cast<float(*)[32]>(sm + dk * 32);  // [GDN_C][32]
    float* kd = sm + dk * 32 + GDN_C * 32;                           // [GDN_C] e^{Γ_last − Γ_l}
    float* tile = kd + GDN_C;                                        // [GDN_C][dk]: kcd, q̂, then k̂
    float* qks = tile + GDN_C * dk;                                  // [GDN_C][GDN_C]
    const int h = blockIdx.x, warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int j = blockIdx.y * 32 + lane;
    const bool on = j < dv;
    float* st = state + (size_t)h * dk * dv;
    for (int a = warp; a < dk; a += GDN_STATE_WARPS) S[a * 32 + lane] = on ? st[(size_t)a * dv + j] : 0.f;
    const int chunks = (t_len + GDN_C - 1) / GDN_C;
    for (int c = 0; c < chunks; c++) {
        const size_t ch = (size_t)c * hv + h;
        const float *kn_c = kn + ch * GDN_C * dk, *qn_c = qn + ch * GDN_C * dk, *kcd_c = kcd + ch * GDN_C * dk;
        const float *nv_c = nv + ch * GDN_C * dv, *qk_c = qk + ch * GDN_C * GDN_C, *gam_c = gam + ch * GDN_C;
        const int n = min(GDN_C, t_len - c * GDN_C), r0 = warp * STATE_ROWS;
        const float last = gam_c[GDN_C - 1];
        if (threadIdx.x < GDN_C) kd[threadIdx.x] = expf(last - gam_c[threadIdx.x]);
        stage(tile, kcd_c, GDN_C * dk);
        __syncthreads();  // S (first chunk), kd and kcd ready
        float acc[STATE_ROWS];
#pragma unroll
        for (int r = 0; r < STATE_ROWS; r++) acc[r] = (on && r0 + r < n) ? nv_c[(r0 + r) * dv + j] : 0.f;
#pragma unroll 4
        for (int a = 0; a < dk; a++) {
            const float s = S[a * 32 + lane];
#pragma unroll
            for (int r = 0; r < STATE_ROWS; r++) acc[r] -= tile[(r0 + r) * dk + a] * s;
        }
#pragma unroll
        for (int r = 0; r < STATE_ROWS; r++) vn[r0 + r][lane] = acc[r];
        __syncthreads();  // vn complete, every warp done with kcd
        stage(tile, qn_c, GDN_C * dk);
        stage(qks, qk_c, GDN_C * GDN_C);
        __syncthreads();
        float eg[STATE_ROWS];
#pragma unroll
        for (int r = 0; r < STATE_ROWS; r++) acc[r] = 0.f, eg[r] = expf(gam_c[r0 + r]);
#pragma unroll 4
        for (int a = 0; a < dk; a++) {
            const float s = S[a * 32 + lane];
#pragma unroll
            for (int r = 0; r < STATE_ROWS; r++) acc[r] += (tile[(r0 + r) * dk + a] * eg[r]) * s;
        }
#pragma unroll
        for (int r = 0; r < STATE_ROWS; r++) {
            const int i = r0 + r;
            for (int l = 0; l <= i; l++) acc[r] += qks[i * GDN_C + l] * vn[l][lane];
            if (on && i < n) out[((size_t)(c * GDN_C + i) * hv + h) * dv + j] = acc[r];
        }
        __syncthreads();  // every warp has read S and the q̂ tile
        stage(tile, kn_c, GDN_C * dk);
        __syncthreads();
        const float chunk_decay = expf(last);
        for (int a0 = warp * STATE_AROWS; a0 < dk; a0 += GDN_STATE_WARPS * STATE_AROWS) {
            float s[STATE_AROWS];
#pragma unroll
            for (int r = 0; r < STATE_AROWS; r++) s[r] = a0 + r < dk ? S[(a0 + r) * 32 + lane] * chunk_decay : 0.f;
#pragma unroll 4
            for (int l = 0; l < n; l++) {
                const float vv = vn[l][lane], w = kd[l];
#pragma unroll
                for (int r = 0; r < STATE_AROWS; r++)
                    if (a0 + r < dk) s[r] += (tile[l * dk + a0 + r] * w) * vv;
            }
#pragma unroll
            for (int r = 0; r < STATE_AROWS; r++)
                if (a0 + r < dk) S[(a0 + r) * 32 + lane] = s[r];
        }
        __syncthreads();  // S updated before the next chunk reads it
    }
    if (on)
        for (int a = warp; a < dk; a += GDN_STATE_WARPS) st[(size_t)a * dv + j] = S[a * 32 + lane];
}
