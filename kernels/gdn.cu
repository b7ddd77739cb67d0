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

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

extern "C" __global__ void gdn_recurrent_f32(const float* __restrict__ q, const float* __restrict__ k,
                                             const float* __restrict__ v, const float* __restrict__ g,
                                             const float* __restrict__ beta, float* __restrict__ state,
                                             float* __restrict__ out, int t_len, int hk, int hv, int dk, int dv) {
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
