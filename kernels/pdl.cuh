// Programmatic dependent launch (sm_90+). fp4's CUDA graphs turn each edge between two of its
// kernels into a programmatic one (crates/fp4-kernels/src/cuda/graph.rs), so a kernel may start
// while the kernel before it drains. The contract every kernel here keeps (build.rs checks that
// each calls pdl_wait()):
// - before pdl_wait() it reads only data no recent kernel writes (weights; a layer's recurrent
//   state from an earlier step) and writes nothing;
// - pdl_wait() returns once the kernel before it has completed and its writes are visible;
// - pdl_trigger(), which lets the next kernel start, comes only after pdl_wait(). So when a
//   kernel starts, every kernel before its predecessor has completed.
// Launched without the programmatic attribute (eager mode), both are no-ops, with one catch:
// cuBLAS launches its own kernels programmatically, so an early trigger in the kernel before a
// GEMM lets cuBLAS start while that kernel runs. The conversions that feed cuBLAS
// (kernels/dequant.cu) therefore only wait: with the trigger, a 1k-token prefill took 85.9 ms
// instead of 81.2 (H200, 2026-12-01); decode graphs, which run no cuBLAS, keep it.
#pragma once

__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

__device__ __forceinline__ void pdl_trigger() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// The common case: nothing to do before the wait.
__device__ __forceinline__ void pdl_start() {
    pdl_wait();
    pdl_trigger();
}
