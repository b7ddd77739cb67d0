//! Checkpoint formats: HF Qwen3.5 model directories (config variants, single-file or sharded
//! safetensors) and the numeric types stored in them.

pub mod checkpoint;
pub mod config;
pub mod dtype;
mod error;
pub mod nvfp4;
pub mod quant_config;

pub use checkpoint::{Checkpoint, NonFinite, TensorView};
pub use config::{LayerType, ModelLayout, TextConfig};
pub use dtype::DType;
pub use error::FormatError;
pub use quant_config::{LayerAlgo, QuantConfig};

pub type Result<T> = std::result::Result<T, FormatError>;
