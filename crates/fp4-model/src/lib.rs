//! The Qwen3.5 text model: one definition, written against `fp4_kernels::ops`.

mod cache;
mod generate;
mod linear;
mod mtp;
pub mod qwen35;
pub mod runner;
mod sampling;
pub mod synthetic;

pub use cache::{Cache, LayerCache, LayerPool, Pools};
pub use fp4_kernels::ops::GdnAlgo;
pub use fp4_kernels::{Device, Precision, Tensor};
pub use generate::{generate, GenerateOptions};
pub use linear::{
    load_param, AmaxObserver, ChannelRecorder, ChannelStats, Linear, LinearMethod, LoadOptions, WeightSource,
};
pub use mtp::{
    accept_drafts, accept_greedy, generate_speculative, verify_draft, Drafter, Mtp, MtpCache, MtpDrafter, SpecStats,
    SpeculativeConfig,
};
pub use qwen35::{DecoderLayer, LayerCtx, Logits, MixerState, Qwen35};
pub use runner::{DecodeRunner, RunnerConfig, SeqState};
pub use sampling::{Sampler, SamplingParams};
pub use synthetic::{Synthetic, SyntheticFormat};

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error(transparent)]
    Format(#[from] fp4_format::FormatError),
    #[error("token id {id} at position {pos} is outside the vocabulary (size {vocab})")]
    TokenOutOfRange { id: u32, pos: usize, vocab: usize },
    #[error("empty input: at least one token is needed")]
    EmptyInput,
    #[error("invalid sampling parameter: {0}")]
    Sampling(String),
    #[error("unsupported: {0}")]
    Unsupported(String),
}

pub type Result<T> = std::result::Result<T, ModelError>;
