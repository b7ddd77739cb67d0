//! fp4's inference engine and OpenAI-compatible HTTP server.

pub mod engine;
pub mod http;
pub mod metrics;
pub mod prefix;
pub mod protocol;

pub use engine::{EngineConfig, EngineHandle};
pub use http::{router, AppState, ServerConfig};
