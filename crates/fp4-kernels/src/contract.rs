//! Plain types that name what an op computes, shared by the op layer (`ops`) and the backends
//! that implement it (`cuda`): a leaf module, so the backends do not depend on the op layer.

/// Element-wise ops of two equal-shape inputs.
#[derive(Debug, Clone, Copy)]
pub enum Binary {
    /// `silu(a) · b`
    SiluMul,
    /// `a · sigmoid(b)`
    SigmoidGate,
    /// `a + b`
    Add,
}

/// How the delta rule walks the sequence (on either device).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GdnAlgo {
    /// Chunks of 64 tokens with a triangular solve inside each (prefill).
    Chunked,
    /// One token at a time (decode).
    Recurrent,
}
