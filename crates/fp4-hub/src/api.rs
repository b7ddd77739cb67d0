//! The Hub's HTTP endpoints that an upload uses, with the request and response shapes of
//! `huggingface_hub` (`hf_api.py`, `_commit_api.py`, `lfs.py`):
//!
//! | call | endpoint |
//! |---|---|
//! | [`HubClient::whoami`] | `GET /api/whoami-v2` |
//! | [`HubClient::create_repo`] | `POST /api/repos/create` `{"name", "organization", "type", "visibility"?}` (409: exists) |
//! | [`HubClient::revision`] | `GET /api/models/{repo}/revision/{rev}` → `{"sha", "private", "siblings"}` |
//! | [`HubClient::create_branch`] | `POST /api/models/{repo}/branch/{branch}` (409: exists) |
//! | [`HubClient::preupload`] | `POST /api/models/{repo}/preupload/{rev}` `{"files": [{"path", "sample", "size"}]}` → `uploadMode`, `shouldIgnore`, `oid` |
//! | [`HubClient::lfs_batch`] | `POST /{repo}.git/info/lfs/objects/batch` (git-lfs batch API, `basic`/`multipart`) |
//! | [`HubClient::lfs_upload`] | `PUT` to the presigned URL, or one `PUT` per part + `POST` completion; then `verify` |
//! | [`HubClient::commit`] | `POST /api/models/{repo}/commit/{rev}`, NDJSON: `header`, `file` (base64), `lfsFile` (sha256 oid) |
//!
//! Requests that may be repeated safely (everything but the commit) are retried on transport
//! errors and on 429/500/502/503/504 with exponential backoff, as `http_backoff` does.

use crate::token::Token;
use crate::HubError;
use base64::Engine;
use serde_json::{json, Value};
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;
use std::time::Duration;

/// The public Hub; `HF_ENDPOINT` (huggingface_hub's variable) points elsewhere.
pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";

const LFS_CONTENT_TYPE: &str = "application/vnd.git-lfs+json";
const RETRY_STATUS: [u16; 5] = [429, 500, 502, 503, 504];

/// How often and how patiently a repeatable request is retried (`http_backoff`'s defaults:
/// 5 retries, waits 1, 2, 4, 8, 8 s).
#[derive(Debug, Clone, Copy)]
pub struct Retry {
    pub retries: u32,
    pub base_delay: Duration,
    pub max_delay: Duration,
}

impl Default for Retry {
    fn default() -> Self {
        Retry { retries: 5, base_delay: Duration::from_secs(1), max_delay: Duration::from_secs(8) }
    }
}

/// Repo as the Hub reports it at one revision.
#[derive(Debug, Clone)]
pub struct RevisionInfo {
    pub sha: String,
    pub private: bool,
}

/// One file as the preupload endpoint classifies it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UploadMode {
    pub path: String,
    /// `lfs` files go through the LFS batch API; `regular` files travel inline in the commit.
    pub lfs: bool,
    /// Ignored by the repo's `.gitignore`: left out of the commit.
    pub should_ignore: bool,
    /// The oid of the file already at this path on the revision: sha256 of the content for LFS
    /// files, git's blob sha1 for regular ones.
    pub remote_oid: Option<String>,
}

/// An LFS object to upload: its sha256 (hex) and size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LfsObject {
    pub oid: String,
    pub size: u64,
}

/// What the LFS batch API asks for one object; `upload` is `None` when the Hub already has it.
#[derive(Debug, Clone)]
pub struct LfsAction {
    pub oid: String,
    pub size: u64,
    pub upload: Option<Action>,
    pub verify: Option<Action>,
}

#[derive(Debug, Clone)]
pub struct Action {
    pub href: String,
    pub header: serde_json::Map<String, Value>,
}

/// A commit operation.
#[derive(Debug, Clone)]
pub enum Operation {
    /// A regular (non-LFS) file, sent inline.
    File { path: String, content: Vec<u8> },
    /// An LFS file whose object is on the Hub already.
    LfsFile { path: String, oid: String, size: u64 },
}

#[derive(Debug, Clone)]
pub struct CommitInfo {
    pub oid: String,
    pub url: String,
}

/// A client of one Hub endpoint with one token.
pub struct HubClient {
    endpoint: String,
    token: Token,
    agent: ureq::Agent,
    retry: Retry,
}

fn encode_segment(s: &str) -> String {
    // `quote(revision, safe="")`: everything but unreserved characters is escaped.
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The message of a Hub error response: `X-Error-Message`, else the JSON body's `error`, else
/// the start of the body.
fn error_message(r: ureq::Response) -> (Option<String>, String) {
    let code = r.header("X-Error-Code").map(str::to_string);
    let header = r.header("X-Error-Message").map(str::to_string);
    let body = r.into_string().unwrap_or_default();
    let from_body = serde_json::from_str::<Value>(&body)
        .ok()
        .and_then(|v| v.get("error").map(|e| e.as_str().map(str::to_string).unwrap_or_else(|| e.to_string())));
    let msg = header.or(from_body).unwrap_or_else(|| body.chars().take(300).collect());
    (code, msg)
}

enum Body<'a> {
    Empty,
    Json(&'a Value, &'static str),
    Bytes(&'a [u8], &'static str),
    /// `len` bytes of a file from `offset`, reopened on every attempt.
    File {
        path: &'a Path,
        offset: u64,
        len: u64,
        progress: &'a dyn Fn(u64),
    },
}

/// A request as data, so that it can be sent again.
struct Req<'a> {
    method: &'static str,
    url: String,
    auth: bool,
    headers: Vec<(String, String)>,
    body: Body<'a>,
    retry: bool,
}

impl HubClient {
    pub fn new(endpoint: &str, token: Token) -> HubClient {
        let agent = ureq::AgentBuilder::new()
            .timeout_connect(Duration::from_secs(30))
            .timeout_read(Duration::from_secs(300))
            .timeout_write(Duration::from_secs(300))
            .user_agent(&format!("fp4/{}", env!("CARGO_PKG_VERSION")))
            .build();
        HubClient { endpoint: endpoint.trim_end_matches('/').to_string(), token, agent, retry: Retry::default() }
    }

    pub fn with_retry(mut self, retry: Retry) -> HubClient {
        self.retry = retry;
        self
    }

    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    pub fn token(&self) -> &Token {
        &self.token
    }

    /// `fix_hf_endpoint_in_url`: URLs the Hub returns name the public Hub even when a mirror
    /// or staging endpoint answered; point them at ours.
    fn fix_url(&self, url: &str) -> String {
        match url.strip_prefix(DEFAULT_ENDPOINT) {
            Some(rest) if self.endpoint != DEFAULT_ENDPOINT => format!("{}{rest}", self.endpoint),
            _ => url.to_string(),
        }
    }

    fn api(&self, repo: &str, what: &str, rev: &str) -> String {
        format!("{}/api/models/{repo}/{what}/{}", self.endpoint, encode_segment(rev))
    }

    // ureq's own error type, matched on right away by `send`.
    #[allow(clippy::result_large_err)]
    fn send_once(&self, r: &Req) -> Result<ureq::Response, ureq::Error> {
        let mut q = self.agent.request(r.method, &r.url);
        if r.auth {
            q = q.set("Authorization", &format!("Bearer {}", self.token.value));
        }
        for (k, v) in &r.headers {
            q = q.set(k, v);
        }
        match &r.body {
            Body::Empty => q.call(),
            Body::Json(v, ct) => q.set("Content-Type", ct).send_bytes(&serde_json::to_vec(v).expect("JSON")),
            Body::Bytes(b, ct) => q.set("Content-Type", ct).send_bytes(b),
            Body::File { path, offset, len, progress } => {
                let mut f = std::fs::File::open(path).map_err(|e| {
                    ureq::Error::from(std::io::Error::new(e.kind(), format!("{}: {e}", path.display())))
                })?;
                f.seek(SeekFrom::Start(*offset))?;
                let reader = Counting { inner: f.take(*len), sent: 0, progress: *progress };
                // An explicit Content-Length: presigned S3 PUTs refuse chunked bodies.
                q.set("Content-Length", &len.to_string()).send(reader)
            }
        }
    }

    /// Sends `r`, retrying what may be retried; an HTTP error becomes a [`HubError`] that
    /// names the request (and the token's source on 401/403).
    fn send(&self, r: Req) -> Result<ureq::Response, HubError> {
        let mut delay = self.retry.base_delay;
        let mut attempt = 0;
        loop {
            let outcome = self.send_once(&r);
            let retryable = match &outcome {
                Ok(_) => false,
                Err(ureq::Error::Status(code, _)) => RETRY_STATUS.contains(code),
                Err(ureq::Error::Transport(_)) => true,
            };
            if r.retry && retryable && attempt < self.retry.retries {
                attempt += 1;
                let why = match &outcome {
                    Err(ureq::Error::Status(code, _)) => format!("HTTP {code}"),
                    Err(e) => e.to_string(),
                    Ok(_) => unreachable!(),
                };
                tracing::warn!(method = r.method, url = %r.url, %why, attempt, "retrying in {delay:?}");
                std::thread::sleep(delay);
                delay = (delay * 2).min(self.retry.max_delay);
                continue;
            }
            return match outcome {
                Ok(resp) => Ok(resp),
                Err(ureq::Error::Status(status, resp)) => {
                    let (code, message) = error_message(resp);
                    if r.auth && (status == 401 || status == 403) {
                        let hint = if status == 401 {
                            "set HF_TOKEN to a valid token or run `huggingface-cli login` again"
                        } else {
                            "use a token with write access to this repo (https://huggingface.co/settings/tokens)"
                        };
                        return Err(HubError::Auth(format!(
                            "the Hub refused the token from {} ({} {}: HTTP {status}: {message}); {hint}",
                            self.token.source, r.method, r.url
                        )));
                    }
                    Err(HubError::Http { method: r.method, url: r.url.clone(), status, code, message })
                }
                Err(ureq::Error::Transport(t)) => {
                    // ureq's Display repeats the URL, which the error names already.
                    let mut message = t.kind().to_string();
                    if let Some(m) = t.message() {
                        message = format!("{message}: {m}");
                    }
                    if let Some(cause) = std::error::Error::source(&t) {
                        message = format!("{message}: {cause}");
                    }
                    Err(HubError::Transport { method: r.method, url: r.url.clone(), message })
                }
            };
        }
    }

    fn json(&self, resp: ureq::Response, what: &str) -> Result<Value, HubError> {
        resp.into_json().map_err(|e| HubError::Protocol(format!("{what}: the Hub did not answer JSON: {e}")))
    }

    /// The account the token belongs to (and so checks the token before any hashing).
    pub fn whoami(&self) -> Result<String, HubError> {
        let r = self.send(Req {
            method: "GET",
            url: format!("{}/api/whoami-v2", self.endpoint),
            auth: true,
            headers: vec![],
            body: Body::Empty,
            retry: true,
        })?;
        let v = self.json(r, "whoami")?;
        v["name"].as_str().map(str::to_string).ok_or_else(|| HubError::Protocol(format!("whoami: no name in {v}")))
    }

    /// Creates a model repo; `Ok(false)` when it exists already (HTTP 409), as
    /// `create_repo(exist_ok=True)`.
    pub fn create_repo(&self, repo: &str, private: bool) -> Result<bool, HubError> {
        let (org, name) = repo.split_once('/').map(|(o, n)| (Some(o), n)).unwrap_or((None, repo));
        let mut body = json!({"name": name, "organization": org, "type": "model"});
        if private {
            body["visibility"] = json!("private");
        }
        self.post_creating(format!("{}/api/repos/create", self.endpoint), &body)
    }

    /// The revision's head commit, or `None` when the repo or the revision does not exist.
    pub fn revision(&self, repo: &str, rev: &str) -> Result<Option<RevisionInfo>, HubError> {
        let r = self.send(Req {
            method: "GET",
            url: self.api(repo, "revision", rev),
            auth: true,
            headers: vec![],
            body: Body::Empty,
            retry: true,
        });
        let v = match r {
            Ok(r) => self.json(r, "revision")?,
            Err(HubError::Http { status: 404, .. }) => return Ok(None),
            Err(e) => return Err(e),
        };
        let sha = v["sha"].as_str().ok_or_else(|| HubError::Protocol(format!("revision: no sha in {v}")))?;
        Ok(Some(RevisionInfo { sha: sha.to_string(), private: v["private"].as_bool().unwrap_or(false) }))
    }

    /// Creates `branch` from the default branch; `Ok(false)` when it exists (HTTP 409).
    pub fn create_branch(&self, repo: &str, branch: &str) -> Result<bool, HubError> {
        let url = format!("{}/api/models/{repo}/branch/{}", self.endpoint, encode_segment(branch));
        self.post_creating(url, &json!({}))
    }

    /// A POST that creates something: `Ok(true)` when created, `Ok(false)` when it already
    /// exists (HTTP 409). Not retried: a lost answer to a create is not worth a second one.
    fn post_creating(&self, url: String, body: &Value) -> Result<bool, HubError> {
        let r = self.send(Req {
            method: "POST",
            url,
            auth: true,
            headers: vec![],
            body: Body::Json(body, "application/json"),
            retry: false,
        });
        match r {
            Ok(_) => Ok(true),
            Err(HubError::Http { status: 409, .. }) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Asks how each file must travel (`_fetch_upload_modes`); `files` are (path in repo, size,
    /// first 512 bytes). Sent in chunks of 256 files, as huggingface_hub does.
    pub fn preupload(
        &self,
        repo: &str,
        rev: &str,
        files: &[(String, u64, Vec<u8>)],
    ) -> Result<Vec<UploadMode>, HubError> {
        let b64 = base64::engine::general_purpose::STANDARD;
        let mut modes = Vec::with_capacity(files.len());
        for chunk in files.chunks(256) {
            let body = json!({"files": chunk.iter().map(|(p, size, sample)| json!({
                "path": p, "sample": b64.encode(sample), "size": size,
            })).collect::<Vec<_>>()});
            let r = self.send(Req {
                method: "POST",
                url: self.api(repo, "preupload", rev),
                auth: true,
                headers: vec![],
                body: Body::Json(&body, "application/json"),
                retry: true,
            })?;
            let v = self.json(r, "preupload")?;
            let bad = || HubError::Protocol(format!("preupload: malformed answer {v}"));
            for f in v["files"].as_array().ok_or_else(bad)? {
                let mode = f["uploadMode"].as_str().ok_or_else(bad)?;
                if mode != "lfs" && mode != "regular" {
                    return Err(bad());
                }
                modes.push(UploadMode {
                    path: f["path"].as_str().ok_or_else(bad)?.to_string(),
                    lfs: mode == "lfs",
                    should_ignore: f["shouldIgnore"].as_bool().unwrap_or(false),
                    remote_oid: f["oid"].as_str().map(str::to_string),
                });
            }
        }
        Ok(modes)
    }

    /// The git-lfs batch API (`post_lfs_batch_info`), transfers `basic` and `multipart`;
    /// per-object errors fail the call with every message.
    pub fn lfs_batch(&self, repo: &str, rev: &str, objects: &[LfsObject]) -> Result<Vec<LfsAction>, HubError> {
        let mut out = Vec::with_capacity(objects.len());
        for chunk in objects.chunks(256) {
            let body = json!({
                "operation": "upload",
                "transfers": ["basic", "multipart"],
                "objects": chunk.iter().map(|o| json!({"oid": o.oid, "size": o.size})).collect::<Vec<_>>(),
                "hash_algo": "sha256",
                "ref": {"name": rev},
            });
            let r = self.send(Req {
                method: "POST",
                url: format!("{}/{repo}.git/info/lfs/objects/batch", self.endpoint),
                auth: true,
                headers: vec![("Accept".into(), LFS_CONTENT_TYPE.into())],
                body: Body::Json(&body, LFS_CONTENT_TYPE),
                retry: true,
            })?;
            let v = self.json(r, "LFS batch")?;
            let bad = || HubError::Protocol(format!("LFS batch: malformed answer {v}"));
            let mut errors = vec![];
            for o in v["objects"].as_array().ok_or_else(bad)? {
                let oid = o["oid"].as_str().ok_or_else(bad)?.to_string();
                let size = o["size"].as_u64().ok_or_else(bad)?;
                if let Some(e) = o.get("error") {
                    errors.push(format!("{oid}: {} ({})", e["message"].as_str().unwrap_or("?"), e["code"]));
                    continue;
                }
                let action = |name: &str| -> Result<Option<Action>, HubError> {
                    match o.get("actions").and_then(|a| a.get(name)) {
                        None | Some(Value::Null) => Ok(None),
                        Some(a) => Ok(Some(Action {
                            href: a["href"].as_str().ok_or_else(bad)?.to_string(),
                            header: a.get("header").and_then(Value::as_object).cloned().unwrap_or_default(),
                        })),
                    }
                };
                out.push(LfsAction { upload: action("upload")?, verify: action("verify")?, oid, size });
            }
            if !errors.is_empty() {
                return Err(HubError::Protocol(format!("the LFS batch API refused: {}", errors.join("; "))));
            }
        }
        Ok(out)
    }

    /// Uploads one object as the batch API asked (`lfs.py::lfs_upload`): one PUT of the whole
    /// file to the presigned URL, or with `chunk_size` in the header one PUT per part (URLs
    /// under the keys `00001`, `00002`, …) then a completion POST to `href` with every part's
    /// ETag; then the verify POST if asked. `progress` gets the bytes sent of this object.
    pub fn lfs_upload(&self, action: &LfsAction, path: &Path, progress: &dyn Fn(u64)) -> Result<(), HubError> {
        let Some(upload) = &action.upload else { return Ok(()) };
        let chunk = match upload.header.get("chunk_size") {
            None => None,
            Some(v) => {
                Some(v.as_u64().or_else(|| v.as_str().and_then(|s| s.parse().ok())).filter(|&c| c > 0).ok_or_else(
                    || HubError::Protocol(format!("LFS batch: chunk_size {v} is not a positive integer")),
                )?)
            }
        };
        match chunk {
            None => {
                // The basic transfer: headers the batch API gives are sent with the PUT (git-lfs
                // spec); the presigned URL carries its own authorization, so no token goes there.
                let headers =
                    upload.header.iter().filter_map(|(k, v)| v.as_str().map(|v| (k.clone(), v.to_string()))).collect();
                self.send(Req {
                    method: "PUT",
                    url: self.fix_url(&upload.href),
                    auth: false,
                    headers,
                    body: Body::File { path, offset: 0, len: action.size, progress },
                    retry: true,
                })?;
            }
            Some(chunk) => {
                let mut parts: Vec<(u64, String)> = upload
                    .header
                    .iter()
                    .filter(|(k, _)| !k.is_empty() && k.bytes().all(|b| b.is_ascii_digit()))
                    .filter_map(|(k, v)| Some((k.parse().ok()?, v.as_str()?.to_string())))
                    .collect();
                parts.sort();
                if parts.len() as u64 != action.size.div_ceil(chunk) {
                    return Err(HubError::Protocol(format!(
                        "LFS batch: {} part URLs for {} bytes in parts of {chunk}",
                        parts.len(),
                        action.size
                    )));
                }
                let mut etags = Vec::with_capacity(parts.len());
                for (i, (_, url)) in parts.iter().enumerate() {
                    let offset = i as u64 * chunk;
                    let len = chunk.min(action.size - offset);
                    let before = offset;
                    let r = self.send(Req {
                        method: "PUT",
                        url: self.fix_url(url),
                        auth: false,
                        headers: vec![],
                        body: Body::File { path, offset, len, progress: &|n| progress(before + n) },
                        retry: true,
                    })?;
                    let etag = r.header("ETag").filter(|e| !e.is_empty()).ok_or_else(|| {
                        HubError::Protocol(format!("part {} of {}: no ETag in the answer", i + 1, path.display()))
                    })?;
                    etags.push(json!({"partNumber": i + 1, "etag": etag}));
                }
                let body = json!({"oid": action.oid, "parts": etags});
                self.send(Req {
                    method: "POST",
                    url: self.fix_url(&upload.href),
                    auth: false,
                    headers: vec![("Accept".into(), LFS_CONTENT_TYPE.into())],
                    body: Body::Json(&body, LFS_CONTENT_TYPE),
                    retry: true,
                })?;
            }
        }
        if let Some(verify) = &action.verify {
            let body = json!({"oid": action.oid, "size": action.size});
            self.send(Req {
                method: "POST",
                url: self.fix_url(&verify.href),
                auth: true,
                headers: vec![],
                body: Body::Json(&body, "application/json"),
                retry: true,
            })?;
        }
        Ok(())
    }

    /// One commit of `ops` on `rev` (`_send_commit`; not retried: a commit whose answer was lost
    /// would be made twice).
    pub fn commit(&self, repo: &str, rev: &str, message: &str, ops: &[Operation]) -> Result<CommitInfo, HubError> {
        let b64 = base64::engine::general_purpose::STANDARD;
        let mut lines = vec![json!({"key": "header", "value": {"summary": message, "description": ""}})];
        for op in ops {
            lines.push(match op {
                Operation::File { path, content } => json!({"key": "file", "value": {
                    "content": b64.encode(content), "path": path, "encoding": "base64",
                }}),
                Operation::LfsFile { path, oid, size } => json!({"key": "lfsFile", "value": {
                    "path": path, "algo": "sha256", "oid": oid, "size": size,
                }}),
            });
        }
        let mut body = Vec::new();
        for l in &lines {
            serde_json::to_writer(&mut body, l).expect("JSON");
            body.push(b'\n');
        }
        let r = self.send(Req {
            method: "POST",
            url: self.api(repo, "commit", rev),
            auth: true,
            headers: vec![],
            body: Body::Bytes(&body, "application/x-ndjson"),
            retry: false,
        })?;
        let v = self.json(r, "commit")?;
        let oid = v["commitOid"].as_str().ok_or_else(|| HubError::Protocol(format!("commit: no commitOid in {v}")))?;
        Ok(CommitInfo { oid: oid.to_string(), url: v["commitUrl"].as_str().unwrap_or_default().to_string() })
    }
}

/// A body reader that reports how much of it has been read (sent).
struct Counting<'a, R> {
    inner: R,
    sent: u64,
    progress: &'a dyn Fn(u64),
}

impl<R: Read> Read for Counting<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.sent += n as u64;
        (self.progress)(self.sent);
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::encode_segment;

    #[test]
    fn revisions_are_quoted_like_python_quote_safe_empty() {
        assert_eq!(encode_segment("main"), "main");
        assert_eq!(encode_segment("refs/pr/1"), "refs%2Fpr%2F1");
        assert_eq!(encode_segment("v1 x"), "v1%20x");
    }
}
