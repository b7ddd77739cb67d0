//! `fp4 publish`: a checkpoint directory → one commit on a Hugging Face Hub repo (fp4-hub).

use anyhow::Context;
use fp4_hub::{upload_folder, HubClient, Retry, UploadOptions};
use indicatif::{ProgressBar, ProgressStyle};
use std::path::PathBuf;
use std::time::Duration;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Hub repo, `namespace/name` (a bare `name` goes to the token's own namespace). Created
    /// when missing.
    repo_id: String,
    /// The directory to upload (e.g. the checkpoint `fp4 loop` chose, after `fp4 card`).
    dir: PathBuf,
    /// Create the repo private (an existing repo keeps its visibility).
    #[arg(long)]
    private: bool,
    /// Branch to commit to; created from main when missing.
    #[arg(long, default_value = "main")]
    revision: String,
    /// The commit's title.
    #[arg(long, default_value = "Upload with fp4 publish")]
    commit_message: String,
    /// Hub endpoint.
    #[arg(long, env = "HF_ENDPOINT", default_value = fp4_hub::DEFAULT_ENDPOINT)]
    endpoint: String,
    /// Retries of each repeatable request on 429/5xx and network errors (waits 1, 2, 4, 8, 8 s).
    #[arg(long, default_value_t = 5)]
    retries: u32,
}

/// indicatif bars for the hashing and uploading phases.
struct Bars(ProgressBar);

impl fp4_hub::Progress for Bars {
    fn phase(&self, name: &str, total: u64) {
        self.0.reset();
        self.0.set_length(total);
        self.0.set_prefix(name.to_string());
        self.0.set_position(0);
    }
    fn file(&self, path: &str) {
        self.0.set_message(path.to_string());
    }
    fn position(&self, bytes: u64) {
        self.0.set_position(bytes);
    }
    fn finish(&self) {
        self.0.finish_and_clear();
    }
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let token = fp4_hub::token::resolve(&|k| std::env::var(k).ok())?;
    let retry = Retry { retries: a.retries, ..Retry::default() };
    let client = HubClient::new(&a.endpoint, token).with_retry(retry);
    let opts = UploadOptions {
        repo: a.repo_id.clone(),
        revision: a.revision.clone(),
        private: a.private,
        commit_message: a.commit_message.clone(),
    };
    let bar = ProgressBar::new(0).with_style(
        ProgressStyle::with_template(
            "{prefix} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} (eta {eta}) {wide_msg}",
        )
        .expect("static template")
        .progress_chars("=> "),
    );
    bar.set_prefix("preparing");
    bar.enable_steady_tick(Duration::from_millis(200));
    let r = upload_folder(&client, &a.dir, &opts, &Bars(bar.clone()));
    bar.finish_and_clear();
    let r = r.with_context(|| format!("fp4 publish {} {}", a.repo_id, a.dir.display()))?;
    if r.created_repo {
        eprintln!("created {}/{} ({})", a.endpoint, r.repo, if a.private { "private" } else { "public" });
    }
    if r.public_despite_private {
        eprintln!("warning: {} exists and is public; --private applies only when fp4 creates the repo", r.repo);
    }
    if r.created_branch {
        eprintln!("created branch {}", a.revision);
    }
    for p in &r.ignored {
        eprintln!("left out by the repo's .gitignore: {p}");
    }
    if r.changed.is_empty() {
        println!(
            "nothing to upload: {}@{} already has all {} files (commit {})",
            r.repo, a.revision, r.files, r.commit
        );
        return Ok(());
    }
    let present = if r.lfs_present > 0 {
        format!(", {} LFS objects already on the Hub (an earlier run)", r.lfs_present)
    } else {
        String::new()
    };
    println!(
        "committed {} of {} files to {}@{} ({} LFS objects uploaded, {:.1} MB{present}): {}",
        r.changed.len(),
        r.files,
        r.repo,
        a.revision,
        r.lfs_uploaded,
        r.lfs_bytes as f64 / 1e6,
        r.commit_url.as_deref().unwrap_or(&r.commit)
    );
    Ok(())
}
