//! A local directory → one commit on a Hub revision, like `HfApi.upload_folder` without Xet:
//! create the repo if missing (and the branch), ask the preupload endpoint how each file travels
//! and what the revision holds, skip files whose oid already matches, upload the missing LFS
//! objects (the batch API leaves out those the Hub already stores, so a run that died half-way
//! resumes where it stopped), then one commit of what changed — none when nothing did.

use crate::api::{HubClient, LfsObject, Operation};
use crate::HubError;
use sha1::Digest as _;
use std::io::Read;
use std::path::{Path, PathBuf};

/// What to upload and where.
#[derive(Debug, Clone)]
pub struct UploadOptions {
    /// `namespace/name`, or `name` for the token's own namespace.
    pub repo: String,
    pub revision: String,
    /// Only when the repo is created; an existing repo keeps its visibility.
    pub private: bool,
    pub commit_message: String,
}

/// Where an upload is, for a progress display.
pub trait Progress: Sync {
    /// A new phase: `hashing` or `uploading`, with its total bytes.
    fn phase(&self, _name: &str, _total_bytes: u64) {}
    /// The file being worked on.
    fn file(&self, _path: &str) {}
    /// Bytes done in the current phase.
    fn position(&self, _bytes: u64) {}
    fn finish(&self) {}
}

/// No display.
pub struct Silent;
impl Progress for Silent {}

/// What an upload did.
#[derive(Debug, Clone, Default)]
pub struct UploadReport {
    /// `namespace/name` as resolved.
    pub repo: String,
    pub created_repo: bool,
    pub created_branch: bool,
    /// The repo exists and is public although `private` was asked.
    pub public_despite_private: bool,
    /// Files in the directory.
    pub files: usize,
    /// Files added or changed by the commit.
    pub changed: Vec<String>,
    /// Files left out: already on the revision with the same content.
    pub unchanged: usize,
    /// Files left out by the repo's `.gitignore`.
    pub ignored: Vec<String>,
    /// LFS objects sent in this run, and their bytes.
    pub lfs_uploaded: usize,
    pub lfs_bytes: u64,
    /// LFS objects the Hub had already (e.g. from an interrupted run).
    pub lfs_present: usize,
    /// The new commit, or the revision's head when nothing changed.
    pub commit: String,
    pub commit_url: Option<String>,
}

/// A file of the directory.
#[derive(Debug, Clone)]
struct Local {
    /// Path in the repo (`/`-separated).
    path: String,
    abs: PathBuf,
    size: u64,
    sample: Vec<u8>,
}

/// `DEFAULT_IGNORE_PATTERNS` of huggingface_hub: `.git` (a directory, or a worktree's file) and
/// `.cache/huggingface` anywhere.
fn ignored_dir(rel: &[String]) -> bool {
    rel.last().is_some_and(|c| c == ".git") || rel.windows(2).any(|w| w[0] == ".cache" && w[1] == "huggingface")
}

/// Every file under `dir` (symlinks followed), sorted by path.
fn scan(dir: &Path) -> Result<Vec<Local>, HubError> {
    fn walk(dir: &Path, rel: &mut Vec<String>, out: &mut Vec<Local>) -> Result<(), HubError> {
        let entries = std::fs::read_dir(dir).map_err(|e| HubError::io(dir, e))?;
        for e in entries {
            let e = e.map_err(|e| HubError::io(dir, e))?;
            let abs = e.path();
            let name = e.file_name().to_str().map(str::to_string).ok_or_else(|| {
                HubError::Local(format!("{}: file names must be UTF-8 to go to the Hub", abs.display()))
            })?;
            let meta = std::fs::metadata(&abs).map_err(|e| HubError::io(&abs, e))?;
            rel.push(name);
            if meta.is_dir() {
                if !ignored_dir(rel) {
                    walk(&abs, rel, out)?;
                }
            } else if meta.is_file() && !ignored_dir(rel) {
                let mut sample = Vec::with_capacity(512);
                let f = std::fs::File::open(&abs).map_err(|e| HubError::io(&abs, e))?;
                f.take(512).read_to_end(&mut sample).map_err(|e| HubError::io(&abs, e))?;
                out.push(Local { path: rel.join("/"), abs, size: meta.len(), sample });
            }
            rel.pop();
        }
        Ok(())
    }
    let mut out = vec![];
    walk(dir, &mut vec![], &mut out)?;
    out.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(out)
}

/// sha256 of a file, hex; `progress` gets the bytes read so far.
pub fn sha256_file(path: &Path, progress: &dyn Fn(u64)) -> Result<String, HubError> {
    let mut f = std::fs::File::open(path).map_err(|e| HubError::io(path, e))?;
    let mut h = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut done = 0u64;
    loop {
        let n = f.read(&mut buf).map_err(|e| HubError::io(path, e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        done += n as u64;
        progress(done);
    }
    Ok(hex(&h.finalize()))
}

/// git's blob id (`git hash-object`): sha1 of `blob {len}\0` + content, the oid the Hub gives
/// regular files.
pub fn git_blob_sha1(data: &[u8]) -> String {
    let mut h = sha1::Sha1::new();
    h.update(format!("blob {}\0", data.len()).as_bytes());
    h.update(data);
    hex(&h.finalize())
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Uploads `dir` to `opts.repo` at `opts.revision` in one commit (see the module doc).
pub fn upload_folder(
    client: &HubClient,
    dir: &Path,
    opts: &UploadOptions,
    progress: &dyn Progress,
) -> Result<UploadReport, HubError> {
    if !dir.is_dir() {
        return Err(HubError::Local(format!("{} is not a directory", dir.display())));
    }
    // The token first: a bad one fails before anything is hashed.
    let user = client.whoami()?;
    let repo = if opts.repo.contains('/') { opts.repo.clone() } else { format!("{user}/{}", opts.repo) };
    let mut report = UploadReport { repo: repo.clone(), ..Default::default() };
    let files = scan(dir)?;
    if files.is_empty() {
        return Err(HubError::Local(format!("{} holds no file to upload", dir.display())));
    }
    report.files = files.len();

    match client.revision(&repo, "main")? {
        None => report.created_repo = client.create_repo(&repo, opts.private)?,
        Some(info) => report.public_despite_private = opts.private && !info.private,
    }
    if client.revision(&repo, &opts.revision)?.is_none() {
        report.created_branch = client.create_branch(&repo, &opts.revision)?;
    }

    // How each file travels, and what the revision has at its path.
    let asked: Vec<(String, u64, Vec<u8>)> = files.iter().map(|f| (f.path.clone(), f.size, f.sample.clone())).collect();
    let modes = client.preupload(&repo, &opts.revision, &asked)?;
    let mode_of = |p: &str| modes.iter().find(|m| m.path == p);

    // Local oids: sha256 for LFS files (hashing is the slow part: one pass, with progress),
    // git's blob sha1 for regular ones (small: the Hub sends large files to LFS).
    let lfs_total: u64 =
        files.iter().filter(|f| mode_of(&f.path).is_some_and(|m| m.lfs && f.size > 0)).map(|f| f.size).sum();
    progress.phase("hashing", lfs_total);
    let mut hashed = 0u64;
    let mut ops = vec![];
    let mut lfs_files: Vec<(&Local, String)> = vec![];
    for f in &files {
        let m = mode_of(&f.path).ok_or_else(|| HubError::Protocol(format!("preupload: no answer for {}", f.path)))?;
        if m.should_ignore {
            report.ignored.push(f.path.clone());
            continue;
        }
        // Empty files cannot go through LFS (S3 answers 501): regular, as huggingface_hub does.
        if m.lfs && f.size > 0 {
            progress.file(&f.path);
            let base = hashed;
            let oid = sha256_file(&f.abs, &|n| progress.position(base + n))?;
            hashed += f.size;
            if m.remote_oid.as_deref() == Some(oid.as_str()) {
                report.unchanged += 1;
                continue;
            }
            ops.push(Operation::LfsFile { path: f.path.clone(), oid: oid.clone(), size: f.size });
            lfs_files.push((f, oid));
        } else {
            let content = std::fs::read(&f.abs).map_err(|e| HubError::io(&f.abs, e))?;
            if m.remote_oid.as_deref() == Some(git_blob_sha1(&content).as_str()) {
                report.unchanged += 1;
                continue;
            }
            ops.push(Operation::File { path: f.path.clone(), content });
        }
        report.changed.push(f.path.clone());
    }
    progress.finish();

    if ops.is_empty() {
        let head = client
            .revision(&repo, &opts.revision)?
            .ok_or_else(|| HubError::Protocol(format!("{repo}@{}: revision vanished", opts.revision)))?;
        report.commit = head.sha;
        return Ok(report);
    }

    // LFS objects: the batch API gives upload actions only for objects the Hub lacks.
    let mut objects: Vec<LfsObject> =
        lfs_files.iter().map(|(f, oid)| LfsObject { oid: oid.clone(), size: f.size }).collect();
    objects.dedup_by(|a, b| a.oid == b.oid);
    if !objects.is_empty() {
        let actions = client.lfs_batch(&repo, &opts.revision, &objects)?;
        let to_send: Vec<_> = actions.iter().filter(|a| a.upload.is_some()).collect();
        report.lfs_present = actions.len() - to_send.len();
        let total: u64 = to_send.iter().map(|a| a.size).sum();
        progress.phase("uploading", total);
        let mut sent = 0u64;
        for a in to_send {
            let (f, _) = lfs_files
                .iter()
                .find(|(_, oid)| *oid == a.oid)
                .ok_or_else(|| HubError::Protocol(format!("LFS batch: an action for an unknown object {}", a.oid)))?;
            progress.file(&f.path);
            let base = sent;
            client.lfs_upload(a, &f.abs, &|n| progress.position(base + n)).map_err(|e| e.context(&f.path))?;
            sent += a.size;
            report.lfs_uploaded += 1;
            report.lfs_bytes += a.size;
        }
        progress.finish();
    }

    let info = client.commit(&repo, &opts.revision, &opts.commit_message, &ops)?;
    report.commit = info.oid;
    report.commit_url = Some(info.url).filter(|u| !u.is_empty());
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn git_blob_sha1_is_gits() {
        // `git hash-object` of "Hello, World!" (huggingface_hub's docstring example).
        assert_eq!(git_blob_sha1(b"Hello, World!"), "b45ef6fec89518d314f546fd6c3025367b721684");
    }

    #[test]
    fn scan_skips_git_and_hub_cache() {
        let d = tempfile::tempdir().unwrap();
        for p in ["a.json", "sub/b.bin", ".git/HEAD", ".cache/huggingface/x", "sub/.git/y", ".cache/keep"] {
            let p = d.path().join(p);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, "x").unwrap();
        }
        let got: Vec<String> = scan(d.path()).unwrap().into_iter().map(|f| f.path).collect();
        assert_eq!(got, [".cache/keep", "a.json", "sub/b.bin"]);
    }
}
