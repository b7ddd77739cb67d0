// Launch geometry the kernels and their Rust launchers (crates/fp4-kernels/src/cuda.rs) must
// agree on, defined once: build.rs turns every `#define NAME VALUE` line here into
// `pub const NAME: usize` (OUT_DIR/geometry.rs), so changing a value here changes both sides.
// Only plain integer values on one line.
#pragma once

// gemv.cu
#define ROWS_PER_BLOCK 4      // CUDA-core GEMVs: output rows (warps) per block
#define BF16_WIDE_ROWS 4      // bf16_gemv_wide_t*: output rows per warp
#define ROWBLOCK_THREADS 256  // bf16_gemv_rowblock_f32: threads per (row, token)
#define MMA_WARPS 8           // tensor-core GEMV: warps per 16-row tile
#define MMA_CHUNK 128         // tensor-core GEMV: k per chunk
#define GROUP_MAX 4           // tensor-core GEMV: weights of one input per launch
#define ROWS_WARPS 4          // row-splitting tensor-core GEMV: warps (16-row tiles) per block
#define ROWSCALE_THREADS 1024 // f16_rowscaled: threads per row
// norm.cu, elementwise.cu
#define NORM_HELD 4           // float4s per thread of the register-resident norms
#define ROWS_HELD 4           // float4s per thread of the *_f16 element-wise kernels
#define MAX_CONV_K 8          // causal conv: widest kernel
#define CONV_T 64             // causal conv prefill: tokens per thread
// attention.cu
#define ATT_THREADS 128
#define ATT_TILE 64           // keys per tile
#define ATT_MAX_D 512
#define FA_BR 64              // tensor-core prefill attention: queries per block (16 per warp)
#define FA_BC 32              // tensor-core prefill attention: keys per tile
#define FA_THREADS 128
#define FA_MAX_D 256          // widest head it serves (dims padded to 64, 128 or 256)
#define FA_TILE 32            // attention_kv_prep: keys x dims per block
// decode.cu
#define PA_THREADS 128        // paged decode attention: threads per (token, KV head, split)
#define PA_MAX_D 512
#define PA_MAX_G 8            // query heads per KV head
#define PA_MAX_SPLITS 128
#define PA_MERGE_THREADS 256
#define GDN_STEP_THREADS 128
#define GDN_STEP_MAX_DK 128
#define GDN_FUSED_THREADS 512 // gdn_decode_fused: 4 column groups × 4 row groups of 32
#define GDN_FUSED_MAX_D 128
#define GATED_F16_D 128      // rms_norm_gated_f16: the head width (a float4 per lane of a warp)
#define ATT_PREP_MAX_D 512    // attn_decode_prep: one thread per dim
// gdn.cu
#define GDN_C 64              // chunked prefill: tokens per chunk
#define GDN_PREP_THREADS 256
#define GDN_STATE_THREADS 128 // gdn_chunk_state: 16 x 8 threads, 4x4 outputs each
#define GDN_PREP_MAX_DK 128
// sampling.cu
#define SAMPLE_THREADS 1024
#define SAMPLE_CONTROLS 5     // sample_rows_f32: words per row (ops::SAMPLE_CONTROLS)
// w4a4.cu
#define W4A4_BM 64            // tokens per block
#define W4A4_BN 64            // output features per block
#define W4A4_THREADS 128
