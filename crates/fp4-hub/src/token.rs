//! The user's Hub token, found where `huggingface_hub` looks (`utils/_auth.py::get_token`): the
//! `HF_TOKEN` environment variable (or the older `HUGGING_FACE_HUB_TOKEN`), else the file that
//! `huggingface-cli login` / `hf auth login` writes: `$HF_TOKEN_PATH`, else `$HF_HOME/token`,
//! `HF_HOME` defaulting to `$XDG_CACHE_HOME/huggingface`, i.e. `~/.cache/huggingface`.

use crate::HubError;
use std::fmt;
use std::path::PathBuf;

/// A token and where it came from (named in every authentication error).
#[derive(Clone)]
pub struct Token {
    pub value: String,
    pub source: TokenSource,
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print the secret.
        f.debug_struct("Token").field("source", &self.source).finish_non_exhaustive()
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TokenSource {
    /// An environment variable (`HF_TOKEN` or `HUGGING_FACE_HUB_TOKEN`).
    Env(&'static str),
    /// The login token file.
    File(PathBuf),
    /// Given by the caller.
    Given,
}

impl fmt::Display for TokenSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TokenSource::Env(v) => write!(f, "${v}"),
            TokenSource::File(p) => write!(f, "the token file {}", p.display()),
            TokenSource::Given => write!(f, "the given token"),
        }
    }
}

/// Where `huggingface-cli login` stores the token, for this environment.
pub fn token_path(env: &dyn Fn(&str) -> Option<String>) -> PathBuf {
    let set = |k: &str| env(k).filter(|v| !v.is_empty());
    if let Some(p) = set("HF_TOKEN_PATH") {
        return PathBuf::from(p);
    }
    let home = match set("HF_HOME") {
        Some(h) => PathBuf::from(h),
        None => {
            let cache = set("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from(set("HOME").unwrap_or_else(|| "~".into())).join(".cache"));
            cache.join("huggingface")
        }
    };
    home.join("token")
}

/// `huggingface_hub`'s `_clean_token`: line breaks removed, surrounding space trimmed, empty = none.
fn clean(raw: &str) -> Option<String> {
    let t = raw.replace(['\r', '\n'], "");
    let t = t.trim();
    (!t.is_empty()).then(|| t.to_string())
}

/// Finds the token; `env` reads an environment variable (`|k| std::env::var(k).ok()` in the
/// binary). No token anywhere is an error that says how to provide one.
pub fn resolve(env: &dyn Fn(&str) -> Option<String>) -> Result<Token, HubError> {
    for var in ["HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"] {
        if let Some(value) = env(var).as_deref().and_then(clean) {
            return Ok(Token { value, source: TokenSource::Env(var) });
        }
    }
    let path = token_path(env);
    match std::fs::read_to_string(&path) {
        Ok(text) => match clean(&text) {
            Some(value) => Ok(Token { value, source: TokenSource::File(path) }),
            None => Err(HubError::Auth(format!(
                "no Hugging Face token: {} is empty; set HF_TOKEN or run `huggingface-cli login`",
                path.display()
            ))),
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(HubError::Auth(format!(
            "no Hugging Face token: HF_TOKEN is not set and there is no token file at {} \
             (`huggingface-cli login` writes it); create a write token at https://huggingface.co/settings/tokens",
            path.display()
        ))),
        Err(e) => Err(HubError::Auth(format!("cannot read the token file {}: {e}", path.display()))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let m: HashMap<String, String> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        move |k| m.get(k).cloned()
    }

    #[test]
    fn env_wins_then_file_paths_follow_huggingface_hub() {
        let dir = tempfile::tempdir().unwrap();
        let home = dir.path().to_str().unwrap();
        std::fs::create_dir_all(dir.path().join(".cache/huggingface")).unwrap();
        std::fs::write(dir.path().join(".cache/huggingface/token"), "hf_file\n").unwrap();
        let t = resolve(&env(&[("HF_TOKEN", " hf_env\r\n"), ("HOME", home)])).unwrap();
        assert_eq!((t.value.as_str(), t.source), ("hf_env", TokenSource::Env("HF_TOKEN")));
        let t = resolve(&env(&[("HUGGING_FACE_HUB_TOKEN", "hf_old"), ("HOME", home)])).unwrap();
        assert_eq!(t.source, TokenSource::Env("HUGGING_FACE_HUB_TOKEN"));
        let t = resolve(&env(&[("HF_TOKEN", ""), ("HOME", home)])).unwrap();
        assert_eq!(t.value, "hf_file");
        assert_eq!(t.source, TokenSource::File(dir.path().join(".cache/huggingface/token")));
        assert_eq!(token_path(&env(&[("HF_HOME", "/h"), ("HOME", home)])), PathBuf::from("/h/token"));
        assert_eq!(
            token_path(&env(&[("XDG_CACHE_HOME", "/x"), ("HOME", home)])),
            PathBuf::from("/x/huggingface/token")
        );
        assert_eq!(token_path(&env(&[("HF_TOKEN_PATH", "/t"), ("HF_HOME", "/h")])), PathBuf::from("/t"));
    }

    #[test]
    fn missing_token_names_both_places() {
        let dir = tempfile::tempdir().unwrap();
        let e = resolve(&env(&[("HF_HOME", dir.path().to_str().unwrap())])).unwrap_err().to_string();
        assert!(e.contains("HF_TOKEN") && e.contains(&dir.path().join("token").display().to_string()), "{e}");
        assert!(e.contains("huggingface-cli login"), "{e}");
        std::fs::write(dir.path().join("token"), "\n").unwrap();
        let e = resolve(&env(&[("HF_HOME", dir.path().to_str().unwrap())])).unwrap_err().to_string();
        assert!(e.contains("is empty"), "{e}");
    }

    #[test]
    fn debug_hides_the_secret() {
        let t = Token { value: "hf_secret".into(), source: TokenSource::Given };
        assert!(!format!("{t:?}").contains("hf_secret"));
    }
}
