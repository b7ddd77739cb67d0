//! `upload_folder` against the fake Hub: a first upload, an idempotent re-run, multipart,
//! transient and persistent 5xx on the presigned PUTs, resume, auth failures, branches.

use fp4_hub::api::HubClient;
use fp4_hub::{upload_folder, HubError, Retry, Token, TokenSource, UploadOptions};
use fp4_hub_fake::{Entry, FakeHub, READ_TOKEN, WRITE_TOKEN};
use std::path::Path;
use std::time::Duration;

fn client(hub: &FakeHub, token: &str) -> HubClient {
    let token = Token { value: token.into(), source: TokenSource::Env("HF_TOKEN") };
    HubClient::new(hub.url(), token).with_retry(Retry {
        retries: 2,
        base_delay: Duration::from_millis(5),
        max_delay: Duration::from_millis(20),
    })
}

fn opts(repo: &str) -> UploadOptions {
    UploadOptions { repo: repo.into(), revision: "main".into(), private: false, commit_message: "Upload".into() }
}

/// A checkpoint-like directory: two shards (LFS), JSON files (regular), an empty file, a
/// nested file and a `.git` directory that must stay home.
fn checkpoint(dir: &Path) {
    let shard = |seed: u8, n: usize| (0..n).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect::<Vec<u8>>();
    std::fs::write(dir.join("model-00001-of-00002.safetensors"), shard(1, 70_000)).unwrap();
    std::fs::write(dir.join("model-00002-of-00002.safetensors"), shard(2, 50_000)).unwrap();
    std::fs::write(dir.join("config.json"), "{\"model_type\": \"qwen3_5_text\"}\n").unwrap();
    std::fs::write(dir.join("README.md"), "---\nlicense: apache-2.0\n---\n# card\n").unwrap();
    std::fs::write(dir.join("empty.txt"), "").unwrap();
    std::fs::create_dir_all(dir.join("extra")).unwrap();
    std::fs::write(dir.join("extra/notes.txt"), "nested\n").unwrap();
    std::fs::create_dir_all(dir.join(".git")).unwrap();
    std::fs::write(dir.join(".git/HEAD"), "ref: refs/heads/main\n").unwrap();
}

fn assert_same(hub: &FakeHub, repo: &str, rev: &str, dir: &Path) {
    for p in [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "config.json",
        "README.md",
        "empty.txt",
        "extra/notes.txt",
    ] {
        assert_eq!(hub.file(repo, rev, p).as_deref(), Some(std::fs::read(dir.join(p)).unwrap().as_slice()), "{p}");
    }
    assert!(hub.file(repo, rev, ".git/HEAD").is_none());
}

#[test]
fn upload_then_rerun_uploads_nothing() {
    let hub = FakeHub::start();
    let d = tempfile::tempdir().unwrap();
    checkpoint(d.path());
    let c = client(&hub, WRITE_TOKEN);
    let r = upload_folder(&c, d.path(), &opts("tester/m"), &fp4_hub::upload::Silent).unwrap();
    assert!(r.created_repo);
    assert_eq!((r.files, r.changed.len(), r.lfs_uploaded, r.lfs_bytes), (6, 6, 2, 120_000));
    assert_same(&hub, "tester/m", "main", d.path());
    assert!(matches!(
        hub.entry("tester/m", "main", "model-00001-of-00002.safetensors"),
        Some(Entry::Lfs { size: 70_000, .. })
    ));
    assert!(matches!(hub.entry("tester/m", "main", "config.json"), Some(Entry::Regular(_))));
    assert!(matches!(hub.entry("tester/m", "main", "empty.txt"), Some(Entry::Regular(_))));
    assert_eq!(hub.commits("tester/m", "main"), 2, "initial commit + one upload commit");
    assert_eq!(hub.is_private("tester/m"), Some(false));

    // Again: nothing is sent, no commit is made.
    let (puts, logged) = (hub.puts(), hub.log().len());
    let r2 = upload_folder(&c, d.path(), &opts("m"), &fp4_hub::upload::Silent).unwrap();
    assert_eq!(r2.repo, "tester/m", "a bare name lands in the token's namespace");
    assert!(!r2.created_repo && r2.changed.is_empty());
    assert_eq!((r2.unchanged, r2.lfs_uploaded), (6, 0));
    assert_eq!(hub.puts(), puts);
    assert_eq!(hub.commits("tester/m", "main"), 2);
    assert_eq!(r2.commit, r.commit, "the head commit is reported");
    let again = &hub.log()[logged..];
    assert!(!again.iter().any(|l| l.contains("/info/lfs/") || l.contains("/commit/")), "{again:?}");

    // One file changes: only it goes up.
    std::fs::write(d.path().join("config.json"), "{\"model_type\": \"qwen3_5\"}\n").unwrap();
    let r3 = upload_folder(&c, d.path(), &opts("tester/m"), &fp4_hub::upload::Silent).unwrap();
    assert_eq!(r3.changed, ["config.json"]);
    assert_eq!(hub.puts(), puts);
    assert_same(&hub, "tester/m", "main", d.path());
}

#[test]
fn multipart_objects_are_sent_in_parts_and_completed() {
    let hub = FakeHub::start();
    hub.multipart(60_000, 16_384);
    let d = tempfile::tempdir().unwrap();
    checkpoint(d.path());
    let c = client(&hub, WRITE_TOKEN);
    upload_folder(&c, d.path(), &opts("tester/mp"), &fp4_hub::upload::Silent).unwrap();
    assert_same(&hub, "tester/mp", "main", d.path());
    let log = hub.log();
    // 70 000 bytes in parts of 16 384: 5 part PUTs and one completion; the 50 000-byte shard in one PUT.
    assert_eq!(
        log.iter().filter(|l| l.starts_with("PUT /s3/tester/mp/") && l.matches('/').count() == 5).count(),
        5,
        "{log:?}"
    );
    assert_eq!(log.iter().filter(|l| l.contains("/complete/")).count(), 1);
    assert_eq!(hub.puts().0, 6);
}

#[test]
fn a_transient_5xx_is_retried_in_the_same_run() {
    let hub = FakeHub::start();
    hub.fail_puts(1, 1, 503); // the second PUT fails once
    let d = tempfile::tempdir().unwrap();
    checkpoint(d.path());
    let r = upload_folder(&client(&hub, WRITE_TOKEN), d.path(), &opts("tester/t"), &fp4_hub::upload::Silent).unwrap();
    assert_eq!(r.lfs_uploaded, 2);
    assert_same(&hub, "tester/t", "main", d.path());
    assert_eq!(hub.log().iter().filter(|l| l.starts_with("PUT ")).count(), 3, "one PUT sent twice");
}

#[test]
fn a_persistent_5xx_fails_without_commit_and_the_next_run_resumes() {
    let hub = FakeHub::start();
    hub.fail_puts(1, usize::MAX, 500); // the first shard goes up, the second never does
    let d = tempfile::tempdir().unwrap();
    checkpoint(d.path());
    let c = client(&hub, WRITE_TOKEN);
    let e = upload_folder(&c, d.path(), &opts("tester/r"), &fp4_hub::upload::Silent).unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, HubError::File { .. }), "{e:?}");
    assert!(msg.contains("model-00002-of-00002.safetensors") && msg.contains("HTTP 500"), "{msg}");
    assert_eq!(hub.commits("tester/r", "main"), 1, "nothing committed");
    assert_eq!(hub.objects("tester/r"), 1, "the first object is on the Hub");

    hub.heal();
    let puts = hub.puts();
    let r = upload_folder(&c, d.path(), &opts("tester/r"), &fp4_hub::upload::Silent).unwrap();
    assert_eq!((r.lfs_uploaded, r.lfs_present, r.lfs_bytes), (1, 1, 50_000), "only the missing object is sent");
    assert_eq!(hub.puts(), (puts.0 + 1, puts.1 + 50_000));
    assert_same(&hub, "tester/r", "main", d.path());
    assert_eq!(hub.commits("tester/r", "main"), 2);
}

#[test]
fn auth_failures_name_the_token_source() {
    let hub = FakeHub::start();
    let d = tempfile::tempdir().unwrap();
    checkpoint(d.path());
    let e =
        upload_folder(&client(&hub, "hf_wrong"), d.path(), &opts("tester/a"), &fp4_hub::upload::Silent).unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, HubError::Auth(_)), "{e:?}");
    assert!(msg.contains("$HF_TOKEN") && msg.contains("401") && msg.contains("Invalid credentials"), "{msg}");
    assert!(hub.log().iter().all(|l| l == "GET /api/whoami-v2"), "nothing else was tried: {:?}", hub.log());

    let e =
        upload_folder(&client(&hub, READ_TOKEN), d.path(), &opts("tester/a"), &fp4_hub::upload::Silent).unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, HubError::Auth(_)) && msg.contains("403") && msg.contains("write access"), "{msg}");
    assert!(hub.is_private("tester/a").is_none());
}

#[test]
fn private_repos_and_branches() {
    let hub = FakeHub::start();
    let d = tempfile::tempdir().unwrap();
    checkpoint(d.path());
    let c = client(&hub, WRITE_TOKEN);
    let o = UploadOptions { private: true, revision: "nvfp4".into(), ..opts("tester/p") };
    let r = upload_folder(&c, d.path(), &o, &fp4_hub::upload::Silent).unwrap();
    assert!(r.created_repo && r.created_branch);
    assert_eq!(hub.is_private("tester/p"), Some(true));
    assert_same(&hub, "tester/p", "nvfp4", d.path());
    assert_eq!(hub.paths("tester/p", "main"), [".gitattributes"], "main untouched");

    // An existing public repo stays public; the report says so.
    hub.create_repo("tester/pub", false);
    let o = UploadOptions { private: true, ..opts("tester/pub") };
    let r = upload_folder(&c, d.path(), &o, &fp4_hub::upload::Silent).unwrap();
    assert!(!r.created_repo && r.public_despite_private);
}
