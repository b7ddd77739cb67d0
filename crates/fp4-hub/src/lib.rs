//! Publishing to the Hugging Face Hub over its HTTP API, without Python, git or git-lfs.
//!
//! [`upload::upload_folder`] does what `huggingface-cli upload REPO DIR` does with the classic
//! LFS transfer (the Hub still offers it next to Xet): create the repo, preupload, LFS batch,
//! PUT to presigned URLs (multipart for large objects), one commit. Re-running it uploads only
//! what changed. The `hf-hub` crate (1.0) was checked first: its uploads go through Xet only
//! and fall back to sending LFS files inline in the commit, and it never skips unchanged files,
//! so this crate speaks the endpoints itself ([`api`]). The `fp4-hub-fake` crate serves the same
//! endpoints locally for tests.

pub mod api;
pub mod token;
pub mod upload;

pub use api::{HubClient, Retry, DEFAULT_ENDPOINT};
pub use token::{Token, TokenSource};
pub use upload::{upload_folder, Progress, UploadOptions, UploadReport};

use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum HubError {
    /// No token, or the Hub refused it: the message says where the token came from and what to do.
    #[error("{0}")]
    Auth(String),
    #[error("{method} {url}: HTTP {status}: {message}")]
    Http { method: &'static str, url: String, status: u16, code: Option<String>, message: String },
    #[error("{method} {url}: {message}")]
    Transport { method: &'static str, url: String, message: String },
    /// The Hub answered something this client does not understand.
    #[error("{0}")]
    Protocol(String),
    /// The local directory.
    #[error("{0}")]
    Local(String),
    /// The same error, while uploading one file.
    #[error("uploading {path}: {source}")]
    File { path: String, source: Box<HubError> },
}

impl HubError {
    fn io(path: &Path, e: std::io::Error) -> HubError {
        HubError::Local(format!("{}: {e}", path.display()))
    }

    fn context(self, path: &str) -> HubError {
        HubError::File { path: path.to_string(), source: Box::new(self) }
    }
}
