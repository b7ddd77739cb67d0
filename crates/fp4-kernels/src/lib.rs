//! The op set the Qwen3.5 model is written against.
//!
//! Each op takes [`Tensor`]s and dispatches on their storage. The CPU branch is the plain,
//! obviously-correct reference: f32 arithmetic with f32 accumulation, rounding to bf16 exactly
//! where transformers rounds when [`Precision::Bf16`] is asked for. Layouts are token-major
//! (`[T, ...]`, one sequence).

mod contract;
pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod ops;
mod tensor;

pub use tensor::{Device, Ids, Precision, Storage, Tensor};
