//! A fake Hugging Face Hub on a loopback port: the endpoints `fp4_hub::api` uses, with the
//! Hub's request and response shapes (as `huggingface_hub` sends and parses them), an in-memory
//! store of repos, branches, commits and LFS objects, and fault injection for the LFS PUTs.
//!
//! Like the Hub: a bad token gets 401 `Invalid credentials in Authorization header`, a read
//! token 403 on writes; preupload sends binary, large or `*.safetensors` files to LFS; the LFS
//! batch API omits `actions` for objects it already stores; presigned PUTs refuse an
//! `Authorization` header (as S3 does) and a missing `Content-Length`; a commit whose `lfsFile`
//! names an object that was never uploaded is refused.

// Checks return the error answer itself (`Result<_, Response>`), as axum handlers do.
#![allow(clippy::result_large_err)]

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use base64::Engine;
use serde_json::{json, Value};
use sha2::Digest as _;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

/// What a fake repo holds at a path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    Regular(Vec<u8>),
    Lfs { oid: String, size: u64 },
}

#[derive(Debug, Clone, Default)]
struct Branch {
    files: BTreeMap<String, Entry>,
    commits: Vec<String>,
}

#[derive(Debug, Default)]
struct Repo {
    private: bool,
    branches: HashMap<String, Branch>,
    /// The LFS store (per repo on the Hub): oid → content.
    objects: HashMap<String, Vec<u8>>,
}

/// Injected failures of presigned PUTs: let `after_ok` succeed, then answer `status` to the
/// next `times`.
#[derive(Debug, Default, Clone, Copy)]
struct PutFault {
    after_ok: usize,
    times: usize,
    status: u16,
}

#[derive(Debug, Default)]
struct Inner {
    url: String,
    user: String,
    write_tokens: Vec<String>,
    read_tokens: Vec<String>,
    repos: HashMap<String, Repo>,
    /// LFS objects larger than this are offered as multipart uploads in parts of `chunk`.
    multipart_above: Option<(u64, u64)>,
    /// Regular files up to this size (the Hub: 10 MiB) unless binary or `*.safetensors`.
    regular_max: u64,
    fault: PutFault,
    /// Multipart parts received: (oid, part) → bytes.
    parts: HashMap<(String, u64), Vec<u8>>,
    log: Vec<String>,
    puts: usize,
    put_bytes: u64,
}

type Shared = Arc<Mutex<Inner>>;

/// A running fake Hub; stops when dropped.
pub struct FakeHub {
    inner: Shared,
    url: String,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// The write token the fake accepts by default.
pub const WRITE_TOKEN: &str = "hf_fake_write_token";
/// A token that may read but not write.
pub const READ_TOKEN: &str = "hf_fake_read_token";

impl FakeHub {
    /// Starts a fake Hub on 127.0.0.1 (a free port) for user `tester`.
    pub fn start() -> FakeHub {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a loopback port");
        listener.set_nonblocking(true).expect("nonblocking");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let inner = Arc::new(Mutex::new(Inner {
            url: url.clone(),
            user: "tester".into(),
            write_tokens: vec![WRITE_TOKEN.into()],
            read_tokens: vec![READ_TOKEN.into()],
            regular_max: 10 << 20,
            ..Default::default()
        }));
        let app = router(inner.clone());
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
                axum::serve(listener, app)
                    .with_graceful_shutdown(async {
                        let _ = rx.await;
                    })
                    .await
                    .expect("fake hub serves");
            });
        });
        FakeHub { inner, url, shutdown: Some(tx), thread: Some(thread) }
    }

    /// The endpoint to point a client (or `HF_ENDPOINT`) at.
    pub fn url(&self) -> &str {
        &self.url
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Offers LFS objects above `above` bytes as multipart uploads in parts of `chunk` bytes.
    pub fn multipart(&self, above: u64, chunk: u64) {
        self.lock().multipart_above = Some((above, chunk));
    }

    /// Lets the next `after_ok` presigned PUTs succeed, then answers `status` to the `times`
    /// after them (`usize::MAX`: until [`FakeHub::heal`]).
    pub fn fail_puts(&self, after_ok: usize, times: usize, status: u16) {
        self.lock().fault = PutFault { after_ok, times, status };
    }

    pub fn heal(&self) {
        self.lock().fault = PutFault::default();
    }

    /// Creates a repo as the Hub does (an initial commit with `.gitattributes`).
    pub fn create_repo(&self, repo: &str, private: bool) {
        let mut g = self.lock();
        create(&mut g, repo, private);
    }

    /// The file at `path` on `rev`: a regular file's bytes or the LFS object's.
    pub fn file(&self, repo: &str, rev: &str, path: &str) -> Option<Vec<u8>> {
        let g = self.lock();
        let r = g.repos.get(repo)?;
        match r.branches.get(rev)?.files.get(path)? {
            Entry::Regular(b) => Some(b.clone()),
            Entry::Lfs { oid, .. } => r.objects.get(oid).cloned(),
        }
    }

    /// How `path` is stored on `rev`.
    pub fn entry(&self, repo: &str, rev: &str, path: &str) -> Option<Entry> {
        self.lock().repos.get(repo)?.branches.get(rev)?.files.get(path).cloned()
    }

    /// Paths on `rev`.
    pub fn paths(&self, repo: &str, rev: &str) -> Vec<String> {
        let g = self.lock();
        g.repos
            .get(repo)
            .and_then(|r| r.branches.get(rev))
            .map(|b| b.files.keys().cloned().collect())
            .unwrap_or_default()
    }

    /// Commits on `rev`, the initial one included.
    pub fn commits(&self, repo: &str, rev: &str) -> usize {
        let g = self.lock();
        g.repos.get(repo).and_then(|r| r.branches.get(rev)).map(|b| b.commits.len()).unwrap_or(0)
    }

    pub fn is_private(&self, repo: &str) -> Option<bool> {
        self.lock().repos.get(repo).map(|r| r.private)
    }

    /// LFS objects stored for `repo`.
    pub fn objects(&self, repo: &str) -> usize {
        self.lock().repos.get(repo).map(|r| r.objects.len()).unwrap_or(0)
    }

    /// Presigned PUTs answered 200, and their bytes.
    pub fn puts(&self) -> (usize, u64) {
        let g = self.lock();
        (g.puts, g.put_bytes)
    }

    /// Every request as `METHOD /path`, in order.
    pub fn log(&self) -> Vec<String> {
        self.lock().log.clone()
    }
}

impl Drop for FakeHub {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

const GITATTRIBUTES: &str =
    "*.safetensors filter=lfs diff=lfs merge=lfs -text\n*.bin filter=lfs diff=lfs merge=lfs -text\n";

fn create(g: &mut Inner, repo: &str, private: bool) {
    let mut main = Branch::default();
    main.files.insert(".gitattributes".into(), Entry::Regular(GITATTRIBUTES.as_bytes().to_vec()));
    main.commits.push(commit_id(repo, 0, "initial commit"));
    let r = Repo { private, branches: HashMap::from([("main".to_string(), main)]), objects: HashMap::new() };
    g.repos.insert(repo.to_string(), r);
}

fn commit_id(repo: &str, n: usize, msg: &str) -> String {
    hex(&sha1::Sha1::digest(format!("{repo}\0{n}\0{msg}").as_bytes()))
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn err(status: StatusCode, code: Option<&str>, msg: &str) -> Response {
    let mut r = (status, Json(json!({"error": msg}))).into_response();
    if let Some(c) = code {
        r.headers_mut().insert("X-Error-Code", c.parse().expect("header"));
    }
    r.headers_mut().insert("X-Error-Message", msg.parse().expect("header"));
    r
}

enum Access {
    Write,
    Read,
}

/// The Hub's check of `Authorization: Bearer …`.
fn auth(g: &Inner, headers: &HeaderMap) -> Result<Access, Response> {
    let bearer = headers.get("authorization").and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
    match bearer {
        Some(t) if g.write_tokens.iter().any(|w| w == t) => Ok(Access::Write),
        Some(t) if g.read_tokens.iter().any(|w| w == t) => Ok(Access::Read),
        _ => Err(err(StatusCode::UNAUTHORIZED, None, "Invalid credentials in Authorization header")),
    }
}

fn writer(g: &Inner, headers: &HeaderMap, what: &str) -> Result<(), Response> {
    match auth(g, headers)? {
        Access::Write => Ok(()),
        Access::Read => Err(err(StatusCode::FORBIDDEN, None, &format!("You don't have the rights to {what}"))),
    }
}

fn not_found_repo() -> Response {
    err(StatusCode::NOT_FOUND, Some("RepoNotFound"), "Repository not found")
}

fn not_found_rev(rev: &str) -> Response {
    err(StatusCode::NOT_FOUND, Some("RevisionNotFound"), &format!("Invalid rev id: {rev}"))
}

fn router(inner: Shared) -> Router {
    Router::new()
        .route("/api/whoami-v2", get(whoami))
        .route("/api/repos/create", post(create_repo))
        .route("/api/models/{ns}/{name}/revision/{rev}", get(revision))
        .route("/api/models/{ns}/{name}/branch/{branch}", post(create_branch))
        .route("/api/models/{ns}/{name}/preupload/{rev}", post(preupload))
        .route("/api/models/{ns}/{name}/commit/{rev}", post(commit))
        .route("/{ns}/{name_git}/info/lfs/objects/batch", post(lfs_batch))
        .route("/s3/{ns}/{name}/{oid}", put(s3_put))
        .route("/s3/{ns}/{name}/{oid}/{part}", put(s3_put_part))
        .route("/lfs/{ns}/{name}/complete/{oid}", post(complete))
        .route("/lfs/{ns}/{name}/verify", post(verify))
        .layer(DefaultBodyLimit::max(1 << 30))
        .layer(axum::middleware::from_fn_with_state(inner.clone(), log_request))
        .with_state(inner)
}

async fn log_request(State(s): State<Shared>, req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let line = format!("{} {}", req.method(), req.uri().path());
    s.lock().unwrap_or_else(|e| e.into_inner()).log.push(line);
    next.run(req).await
}

fn lock(s: &Shared) -> std::sync::MutexGuard<'_, Inner> {
    s.lock().unwrap_or_else(|e| e.into_inner())
}

async fn whoami(State(s): State<Shared>, headers: HeaderMap) -> Response {
    let g = lock(&s);
    let role = match auth(&g, &headers) {
        Ok(Access::Write) => "write",
        Ok(Access::Read) => "read",
        Err(r) => return r,
    };
    Json(json!({
        "type": "user", "id": "0", "name": g.user, "fullname": "Test User", "orgs": [],
        "auth": {"type": "access_token", "accessToken": {"displayName": "test", "role": role}},
    }))
    .into_response()
}

async fn create_repo(State(s): State<Shared>, headers: HeaderMap, Json(body): Json<Value>) -> Response {
    let mut g = lock(&s);
    if let Err(r) = writer(&g, &headers, "create a repo") {
        return r;
    }
    let Some(name) = body["name"].as_str() else {
        return err(StatusCode::BAD_REQUEST, None, "name is required");
    };
    if body["type"].as_str().is_some_and(|t| t != "model") {
        return err(StatusCode::BAD_REQUEST, None, "the fake Hub has model repos only");
    }
    let org = body["organization"].as_str().unwrap_or(&g.user).to_string();
    if org != g.user {
        return err(
            StatusCode::FORBIDDEN,
            None,
            &format!("You don't have the rights to create a model under the namespace \"{org}\""),
        );
    }
    let repo = format!("{org}/{name}");
    let url = format!("{}/{repo}", g.url);
    if g.repos.contains_key(&repo) {
        return (StatusCode::CONFLICT, Json(json!({"error": "You already created this model repo", "url": url})))
            .into_response();
    }
    let private = body["visibility"].as_str() == Some("private") || body["private"].as_bool() == Some(true);
    create(&mut g, &repo, private);
    Json(json!({"url": url, "name": repo, "id": repo})).into_response()
}

async fn revision(
    State(s): State<Shared>,
    headers: HeaderMap,
    Path((ns, name, rev)): Path<(String, String, String)>,
) -> Response {
    let g = lock(&s);
    if let Err(r) = auth(&g, &headers) {
        return r;
    }
    let repo = format!("{ns}/{name}");
    let Some(r) = g.repos.get(&repo) else { return not_found_repo() };
    let Some(b) = r.branches.get(&rev) else { return not_found_rev(&rev) };
    let siblings: Vec<Value> = b.files.keys().map(|k| json!({"rfilename": k})).collect();
    Json(json!({"id": repo, "modelId": repo, "sha": b.commits.last(), "private": r.private, "siblings": siblings}))
        .into_response()
}

async fn create_branch(
    State(s): State<Shared>,
    headers: HeaderMap,
    Path((ns, name, branch)): Path<(String, String, String)>,
) -> Response {
    let mut g = lock(&s);
    if let Err(r) = writer(&g, &headers, "create a branch") {
        return r;
    }
    let Some(r) = g.repos.get_mut(&format!("{ns}/{name}")) else { return not_found_repo() };
    if r.branches.contains_key(&branch) {
        return err(StatusCode::CONFLICT, None, "Reference already exists");
    }
    let main = r.branches["main"].clone();
    r.branches.insert(branch, main);
    Json(json!({})).into_response()
}

/// The Hub's choice: LFS for `*.safetensors` / `*.bin`, binary samples (a NUL byte) and files
/// over the regular limit.
fn wants_lfs(g: &Inner, path: &str, size: u64, sample: &[u8]) -> bool {
    path.ends_with(".safetensors") || path.ends_with(".bin") || size > g.regular_max || sample.contains(&0)
}

async fn preupload(
    State(s): State<Shared>,
    headers: HeaderMap,
    Path((ns, name, rev)): Path<(String, String, String)>,
    Json(body): Json<Value>,
) -> Response {
    let g = lock(&s);
    if let Err(r) = writer(&g, &headers, "upload") {
        return r;
    }
    let Some(r) = g.repos.get(&format!("{ns}/{name}")) else { return not_found_repo() };
    let Some(b) = r.branches.get(&rev) else { return not_found_rev(&rev) };
    let Some(files) = body["files"].as_array() else {
        return err(StatusCode::BAD_REQUEST, None, "files is required");
    };
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut out = vec![];
    for f in files {
        let (Some(path), Some(size), Some(sample)) = (f["path"].as_str(), f["size"].as_u64(), f["sample"].as_str())
        else {
            return err(StatusCode::BAD_REQUEST, None, "each file needs path, size and sample");
        };
        let Ok(sample) = b64.decode(sample) else { return err(StatusCode::BAD_REQUEST, None, "sample is not base64") };
        if sample.len() > 512 {
            return err(StatusCode::BAD_REQUEST, None, "sample is longer than 512 bytes");
        }
        let oid = b.files.get(path).map(|e| match e {
            Entry::Regular(c) => fp4_hub::upload::git_blob_sha1(c),
            Entry::Lfs { oid, .. } => oid.clone(),
        });
        let mode = if wants_lfs(&g, path, size, &sample) { "lfs" } else { "regular" };
        out.push(json!({"path": path, "uploadMode": mode, "shouldIgnore": false, "oid": oid}));
    }
    Json(json!({"files": out, "commitOid": b.commits.last()})).into_response()
}

async fn lfs_batch(
    State(s): State<Shared>,
    headers: HeaderMap,
    Path((ns, name_git)): Path<(String, String)>,
    Json(body): Json<Value>,
) -> Response {
    let g = lock(&s);
    let Some(name) = name_git.strip_suffix(".git") else { return not_found_repo() };
    if let Err(r) = writer(&g, &headers, "upload") {
        return r;
    }
    if headers.get("accept").and_then(|v| v.to_str().ok()) != Some("application/vnd.git-lfs+json") {
        return err(StatusCode::NOT_ACCEPTABLE, None, "Accept must be application/vnd.git-lfs+json");
    }
    let repo = format!("{ns}/{name}");
    let Some(r) = g.repos.get(&repo) else { return not_found_repo() };
    if body["operation"] != "upload" || body["hash_algo"] != "sha256" {
        return err(StatusCode::BAD_REQUEST, None, "operation upload and hash_algo sha256 expected");
    }
    let transfers: Vec<&str> =
        body["transfers"].as_array().map(|a| a.iter().filter_map(Value::as_str).collect()).unwrap_or_default();
    let Some(objects) = body["objects"].as_array() else {
        return err(StatusCode::BAD_REQUEST, None, "objects expected");
    };
    let mut out = vec![];
    let mut transfer = "basic";
    for o in objects {
        let (Some(oid), Some(size)) = (o["oid"].as_str(), o["size"].as_u64()) else {
            return err(StatusCode::BAD_REQUEST, None, "oid and size expected");
        };
        if oid.len() != 64 || !oid.bytes().all(|c| c.is_ascii_hexdigit()) {
            out.push(json!({"oid": oid, "size": size, "error": {"code": 422, "message": "Invalid oid"}}));
            continue;
        }
        if r.objects.contains_key(oid) {
            out.push(json!({"oid": oid, "size": size}));
            continue;
        }
        let verify = json!({"href": format!("{}/lfs/{repo}/verify", g.url)});
        let upload = match g.multipart_above {
            Some((above, chunk)) if size > above && transfers.contains(&"multipart") => {
                transfer = "multipart";
                let mut header = serde_json::Map::new();
                header.insert("chunk_size".into(), json!(chunk.to_string()));
                for p in 1..=size.div_ceil(chunk) {
                    header.insert(
                        format!("{p:05}"),
                        json!(format!("{}/s3/{repo}/{oid}/{p}?uploadId=fake&X-Amz-Signature=x", g.url)),
                    );
                }
                json!({"href": format!("{}/lfs/{repo}/complete/{oid}", g.url), "header": header})
            }
            _ => json!({"href": format!("{}/s3/{repo}/{oid}?X-Amz-Signature=x", g.url)}),
        };
        out.push(
            json!({"oid": oid, "size": size, "authenticated": true, "actions": {"upload": upload, "verify": verify}}),
        );
    }
    let mut resp = Json(json!({"transfer": transfer, "objects": out, "hash_algo": "sha256"})).into_response();
    resp.headers_mut().insert("content-type", "application/vnd.git-lfs+json".parse().expect("header"));
    resp
}

/// S3's checks of a presigned PUT, then the injected faults.
fn presigned_put(g: &mut Inner, headers: &HeaderMap, body: &Bytes) -> Result<(), Response> {
    if headers.contains_key("authorization") {
        return Err(err(StatusCode::BAD_REQUEST, Some("InvalidArgument"), "Only one auth mechanism allowed"));
    }
    let len = headers.get("content-length").and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    if len != Some(body.len() as u64) {
        return Err(err(
            StatusCode::LENGTH_REQUIRED,
            Some("MissingContentLength"),
            "You must provide the Content-Length HTTP header.",
        ));
    }
    let f = &mut g.fault;
    if f.after_ok > 0 {
        f.after_ok -= 1;
    } else if f.times > 0 {
        f.times -= 1;
        let status = StatusCode::from_u16(f.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        return Err(err(status, Some("InternalError"), "We encountered an internal error. Please try again."));
    }
    g.puts += 1;
    g.put_bytes += body.len() as u64;
    Ok(())
}

async fn s3_put(
    State(s): State<Shared>,
    headers: HeaderMap,
    Path((ns, name, oid)): Path<(String, String, String)>,
    body: Bytes,
) -> Response {
    let mut g = lock(&s);
    if let Err(r) = presigned_put(&mut g, &headers, &body) {
        return r;
    }
    let Some(r) = g.repos.get_mut(&format!("{ns}/{name}")) else { return not_found_repo() };
    if hex(&sha2::Sha256::digest(&body)) != oid {
        return err(
            StatusCode::BAD_REQUEST,
            Some("BadDigest"),
            "The sha256 you specified did not match what we received.",
        );
    }
    r.objects.insert(oid, body.to_vec());
    let mut resp = StatusCode::OK.into_response();
    resp.headers_mut().insert("etag", format!("\"{}\"", &hex(&sha1::Sha1::digest(&body))).parse().expect("header"));
    resp
}

async fn s3_put_part(
    State(s): State<Shared>,
    headers: HeaderMap,
    Path((_ns, _name, oid, part)): Path<(String, String, String, u64)>,
    body: Bytes,
) -> Response {
    let mut g = lock(&s);
    if let Err(r) = presigned_put(&mut g, &headers, &body) {
        return r;
    }
    let etag = format!("\"{}\"", hex(&sha1::Sha1::digest(&body)));
    g.parts.insert((oid, part), body.to_vec());
    let mut resp = StatusCode::OK.into_response();
    resp.headers_mut().insert("etag", etag.parse().expect("header"));
    resp
}

async fn complete(
    State(s): State<Shared>,
    Path((ns, name, oid)): Path<(String, String, String)>,
    Json(body): Json<Value>,
) -> Response {
    let mut g = lock(&s);
    if body["oid"].as_str() != Some(oid.as_str()) {
        return err(StatusCode::BAD_REQUEST, None, "oid does not match the upload");
    }
    let Some(parts) = body["parts"].as_array() else { return err(StatusCode::BAD_REQUEST, None, "parts expected") };
    let mut data = vec![];
    for (i, p) in parts.iter().enumerate() {
        let n = i as u64 + 1;
        if p["partNumber"].as_u64() != Some(n) {
            return err(StatusCode::BAD_REQUEST, None, "parts must be numbered 1, 2, …");
        }
        let Some(bytes) = g.parts.get(&(oid.clone(), n)) else {
            return err(StatusCode::BAD_REQUEST, Some("InvalidPart"), &format!("part {n} was not uploaded"));
        };
        if p["etag"].as_str() != Some(format!("\"{}\"", hex(&sha1::Sha1::digest(bytes))).as_str()) {
            return err(StatusCode::BAD_REQUEST, Some("InvalidPart"), &format!("part {n}: wrong etag"));
        }
        data.extend_from_slice(bytes);
    }
    if hex(&sha2::Sha256::digest(&data)) != oid {
        return err(StatusCode::BAD_REQUEST, None, "the parts do not hash to the oid");
    }
    let Some(r) = g.repos.get_mut(&format!("{ns}/{name}")) else { return not_found_repo() };
    r.objects.insert(oid, data);
    Json(json!({})).into_response()
}

async fn verify(
    State(s): State<Shared>,
    headers: HeaderMap,
    Path((ns, name)): Path<(String, String)>,
    Json(body): Json<Value>,
) -> Response {
    let g = lock(&s);
    if let Err(r) = writer(&g, &headers, "upload") {
        return r;
    }
    let Some(r) = g.repos.get(&format!("{ns}/{name}")) else { return not_found_repo() };
    let (Some(oid), Some(size)) = (body["oid"].as_str(), body["size"].as_u64()) else {
        return err(StatusCode::BAD_REQUEST, None, "oid and size expected");
    };
    match r.objects.get(oid) {
        Some(o) if o.len() as u64 == size => Json(json!({})).into_response(),
        _ => err(StatusCode::NOT_FOUND, None, "Object not found"),
    }
}

async fn commit(
    State(s): State<Shared>,
    headers: HeaderMap,
    Path((ns, name, rev)): Path<(String, String, String)>,
    body: Bytes,
) -> Response {
    let mut g = lock(&s);
    if let Err(r) = writer(&g, &headers, "commit") {
        return r;
    }
    if headers.get("content-type").and_then(|v| v.to_str().ok()) != Some("application/x-ndjson") {
        return err(StatusCode::BAD_REQUEST, None, "Content-Type must be application/x-ndjson");
    }
    let url = g.url.clone();
    let repo = format!("{ns}/{name}");
    let Some(r) = g.repos.get_mut(&repo) else { return not_found_repo() };
    let Some(branch) = r.branches.get(&rev).cloned() else { return not_found_rev(&rev) };
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut files = branch.files.clone();
    let mut summary = None;
    for (i, line) in body.split(|&b| b == b'\n').filter(|l| !l.is_empty()).enumerate() {
        let Ok(v) = serde_json::from_slice::<Value>(line) else {
            return err(StatusCode::BAD_REQUEST, None, &format!("line {}: not JSON", i + 1));
        };
        let val = &v["value"];
        match (i, v["key"].as_str()) {
            (0, Some("header")) => summary = val["summary"].as_str().map(str::to_string),
            (0, _) => return err(StatusCode::BAD_REQUEST, None, "the first line must be the header"),
            (_, Some("file")) => {
                let (Some(path), Some("base64"), Some(content)) =
                    (val["path"].as_str(), val["encoding"].as_str(), val["content"].as_str())
                else {
                    return err(StatusCode::BAD_REQUEST, None, "file needs path, encoding base64 and content");
                };
                let Ok(content) = b64.decode(content) else {
                    return err(StatusCode::BAD_REQUEST, None, "content is not base64");
                };
                files.insert(path.to_string(), Entry::Regular(content));
            }
            (_, Some("lfsFile")) => {
                let (Some(path), Some("sha256"), Some(oid), Some(size)) =
                    (val["path"].as_str(), val["algo"].as_str(), val["oid"].as_str(), val["size"].as_u64())
                else {
                    return err(StatusCode::BAD_REQUEST, None, "lfsFile needs path, algo sha256, oid and size");
                };
                if r.objects.get(oid).map(|o| o.len() as u64) != Some(size) {
                    return err(
                        StatusCode::BAD_REQUEST,
                        None,
                        &format!("Your push was rejected because an LFS pointer pointed to a file that does not exist. ({path})"),
                    );
                }
                files.insert(path.to_string(), Entry::Lfs { oid: oid.to_string(), size });
            }
            (_, k) => return err(StatusCode::BAD_REQUEST, None, &format!("unknown key {k:?}")),
        }
    }
    let Some(summary) = summary.filter(|s| !s.is_empty()) else {
        return err(StatusCode::BAD_REQUEST, None, "the header needs a summary");
    };
    let b = r.branches.get_mut(&rev).expect("checked");
    let oid = commit_id(&repo, b.commits.len(), &summary);
    b.commits.push(oid.clone());
    b.files = files;
    Json(json!({"success": true, "commitOid": oid, "commitUrl": format!("{url}/{repo}/commit/{oid}"), "hookOutput": "", "pullRequestUrl": null}))
        .into_response()
}
