//! Calibration-aware NVFP4 quantization of Qwen3.5 checkpoints, exported in NVIDIA ModelOpt's
//! HF format (so vLLM and SGLang load the result too).
//!
//! The flow: plan which linear layers to quantize ([`plan`]), read calibration samples
//! ([`calib`]), run the BF16 model layer by layer over them recording each layer's input amax
//! (peak memory ≈ one layer + activations), quantize each layer right after ([`rtn`]), then write
//! the output directory atomically ([`export`]).

pub mod awq;
pub mod calib;
pub mod eval;
pub mod export;
pub mod layout;
pub mod mixed;
pub mod plan;
pub mod rtn;
pub mod source;

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum QuantError {
    #[error(transparent)]
    Format(#[from] fp4_format::FormatError),
    #[error(transparent)]
    Model(#[from] fp4_model::ModelError),
    #[error("{path}:{line}: {msg}")]
    CalibData { path: PathBuf, line: usize, msg: String },
    #[error("{path}: {msg}")]
    Output { path: PathBuf, msg: String },
    #[error("{0}")]
    Invalid(String),
}

pub type Result<T> = std::result::Result<T, QuantError>;

pub use awq::AwqOptions;
pub use plan::{Plan, Strategy};
pub use rtn::{quantize, Algorithm, LmHeadFormat, Progress, QuantizeOptions};
