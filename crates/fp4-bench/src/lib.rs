//! `fp4 bench`: speed (TTFT, decode tok/s) and behaviour gates (thinking leak, tool calling,
//! markdown, factual, reasoning, verbosity) for one or two OpenAI-compatible endpoints side by
//! side, over plain HTTP: it works against llama-server, vLLM and fp4 alike; and TTFT turn by
//! turn over a growing conversation (`conversation`).

pub mod client;
pub mod conversation;
pub mod gates;
pub mod report;
pub mod run;
pub mod smoke;
pub mod suite;

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("{path}: {msg}")]
    Suite { path: std::path::PathBuf, msg: String },
    #[error("backend {name} ({url}): {msg}")]
    Backend { name: String, url: String, msg: String },
    #[error("{path}: {msg}")]
    Output { path: std::path::PathBuf, msg: String },
}

pub type Result<T> = std::result::Result<T, BenchError>;
