//! The hub client against a stand-in hub on loopback: the parts of the protocol it relies on
//! (HEAD on `resolve` with `X-Repo-Commit` / ETag headers, LFS files redirected to a CDN host,
//! ranges, the `revision` listing API, the hub's error codes) and faults a real network has
//! (a cut connection, corrupted bytes, a server that is gone).
#![cfg(feature = "hub")]
#![allow(clippy::unwrap_used)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;

#[path = "support/fake_hub.rs"]
mod fake_hub;

use fake_hub::{git_sha1, repo_with, sha256, FakeHub, Seen, State, COMMIT, OLD_COMMIT};
use patchlm_data::hub::{self, Hub, HubOptions, Repo, RepoKind};

fn big(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i * 31 % 251) as u8).collect()
}

fn model_state() -> State {
    let mut st = State::default();
    let weights = big(300_000);
    st.repos.insert(
        "org/model".into(),
        repo_with(&[
            ("config.json", b"{\"model_type\": \"llama\"}", false),
            ("model.safetensors", &weights, true),
            ("nested/dir/notes.txt", b"deep file\n", false),
        ]),
    );
    let mut gated = repo_with(&[("config.json", b"{}", false), ("weights.bin", &big(1000), true)]);
    gated.token = Some("hf_secret".into());
    st.repos.insert("org/gated".into(), gated);
    st.renamed.insert("old-org/model".into(), "org/model".into());
    st
}

/// A client of a hub that is gone (a closed port), with the cache `cache`.
fn gone_hub(cache: &Path) -> Hub {
    let closed = TcpListener::bind("127.0.0.1:0").unwrap();
    let dead = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    Hub::new(HubOptions { progress: false, timeout_secs: 5, ..HubOptions::new(&dead, cache) })
}

fn read(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap()
}

#[test]
fn files_land_in_the_huggingface_hub_cache_layout() {
    let fake = FakeHub::start(model_state());
    let cache = tempfile::tempdir().unwrap();
    let hub = fake.hub(cache.path());
    let repo = Repo::new(RepoKind::Model, "org/model");
    let cfg = hub.file(&repo, "config.json").unwrap();
    let w = hub.file(&repo, "model.safetensors").unwrap();
    let deep = hub.file(&repo, "nested/dir/notes.txt").unwrap();
    let root = cache.path().join("models--org--model");
    assert_eq!(cfg, root.join("snapshots").join(COMMIT).join("config.json"));
    assert_eq!(read(&cfg), b"{\"model_type\": \"llama\"}");
    assert_eq!(read(&w), big(300_000));
    assert_eq!(read(&deep), b"deep file\n");
    // Blobs are named by their ETag (sha256 for LFS, git's sha1 otherwise); snapshot entries are
    // relative symlinks to them; the branch's ref names the commit.
    let blob = root.join("blobs").join(sha256(&big(300_000)));
    assert_eq!(read(&blob), big(300_000));
    assert!(root.join("blobs").join(git_sha1(b"{\"model_type\": \"llama\"}")).is_file());
    #[cfg(unix)]
    {
        let target = std::fs::read_link(&w).unwrap();
        assert_eq!(target, Path::new("../../blobs").join(sha256(&big(300_000))));
        assert_eq!(std::fs::read_link(&deep).unwrap().components().filter(|c| c.as_os_str() == "..").count(), 4);
    }
    assert_eq!(std::fs::read_to_string(root.join("refs/main")).unwrap(), COMMIT);
    assert!(!std::fs::read_dir(root.join("blobs"))
        .unwrap()
        .any(|e| { e.unwrap().file_name().to_string_lossy().ends_with(".incomplete") }));
    // The cache is tagged for backup tools, as huggingface_hub tags it (the standard's signature
    // first); a tag already there is left as it is.
    let tag = cache.path().join("CACHEDIR.TAG");
    assert_eq!(std::fs::read_to_string(&tag).unwrap(), patchlm_data::hub::CACHEDIR_TAG);
    assert!(patchlm_data::hub::CACHEDIR_TAG.starts_with("Signature: 8a477f597d28d172789f06886806bc55\n"));
    std::fs::write(&tag, "Signature: 8a477f597d28d172789f06886806bc55\n# huggingface_hub's\n").unwrap();
    std::fs::remove_file(&deep).unwrap();
    assert_eq!(read(&hub.file(&repo, "nested/dir/notes.txt").unwrap()), b"deep file\n");
    assert!(std::fs::read_to_string(&tag).unwrap().ends_with("# huggingface_hub's\n"));
    // The token is not sent anywhere without one, and the CDN served the LFS file.
    let seen = fake.seen();
    assert!(seen.iter().any(|s| s.method == "GET" && s.path.starts_with("/cdn/")));
    assert!(seen.iter().all(|s| s.auth.is_none()));
}

#[test]
fn cached_files_are_not_downloaded_again_and_pinned_commits_need_no_network() {
    let fake = FakeHub::start(model_state());
    let cache = tempfile::tempdir().unwrap();
    let hub = fake.hub(cache.path());
    let repo = Repo::new(RepoKind::Model, "org/model");
    let first = hub.file(&repo, "model.safetensors").unwrap();
    fake.clear();
    // A branch is asked about (one HEAD), but the blob is not fetched again.
    assert_eq!(hub.file(&repo, "model.safetensors").unwrap(), first);
    let seen = fake.seen();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0].method, "HEAD");
    fake.clear();
    // A commit with a snapshot in the cache: no request at all.
    assert_eq!(hub.file(&repo.at(COMMIT), "model.safetensors").unwrap(), first);
    assert!(fake.seen().is_empty());
    // A snapshot entry removed while its blob stays is linked again, without a download.
    std::fs::remove_file(&first).unwrap();
    assert_eq!(hub.file(&repo, "model.safetensors").unwrap(), first);
    assert_eq!(read(&first), big(300_000));
    assert!(fake.seen().iter().all(|s| s.method == "HEAD"), "{:?}", fake.seen());
    // A branch recorded at an older commit is moved to the one the hub names now.
    let main_ref = cache.path().join("models--org--model/refs/main");
    std::fs::write(&main_ref, OLD_COMMIT).unwrap();
    assert_eq!(hub.file(&repo, "model.safetensors").unwrap(), first);
    assert_eq!(std::fs::read_to_string(&main_ref).unwrap(), COMMIT);
    // A blob of the wrong size (cut short by something else) is downloaded again, whole.
    let blob = cache.path().join("models--org--model/blobs").join(sha256(&big(300_000)));
    std::fs::write(&blob, &big(300_000)[..1000]).unwrap();
    fake.clear();
    assert_eq!(hub.file(&repo, "model.safetensors").unwrap(), first);
    assert_eq!(read(&first), big(300_000));
    assert!(fake.seen().iter().any(|s| s.method == "GET" && s.path.starts_with("/cdn/")), "{:?}", fake.seen());
}

#[test]
fn offline_and_unreachable_hubs_are_answered_from_the_cache() {
    let fake = FakeHub::start(model_state());
    let cache = tempfile::tempdir().unwrap();
    let repo = Repo::new(RepoKind::Model, "org/model");
    let online = fake.hub(cache.path()).file(&repo, "config.json").unwrap();
    fake.clear();
    let offline = Hub::new(HubOptions { offline: true, progress: false, ..HubOptions::new(&fake.url, cache.path()) });
    assert_eq!(offline.file(&repo, "config.json").unwrap(), online);
    let e = offline.file(&repo, "model.safetensors").unwrap_err().to_string();
    assert!(e.contains("org/model@main/model.safetensors"), "{e}");
    let e2 = offline.file(&Repo::new(RepoKind::Model, "org/other"), "config.json").unwrap_err().to_string();
    assert!(e2.contains("HF_HUB_OFFLINE"), "{e2}");
    assert!(fake.seen().is_empty(), "offline touched the network");
    let listed = offline.list(&repo, "").unwrap();
    assert_eq!((listed.commit.as_str(), listed.files.len()), (COMMIT, 1));

    // A hub that is gone.
    let gone = gone_hub(cache.path());
    assert_eq!(gone.file(&repo, "config.json").unwrap(), online);
    let e = gone.file(&repo, "model.safetensors").unwrap_err().to_string();
    assert!(e.contains("cannot reach") && e.contains("HF_HUB_CACHE"), "{e}");
}

#[test]
fn an_interrupted_download_resumes_with_a_range_request() {
    let fake = FakeHub::start(model_state());
    fake.state.cut_after.store(100_000, Ordering::SeqCst);
    let cache = tempfile::tempdir().unwrap();
    let w = fake.hub(cache.path()).file(&Repo::new(RepoKind::Model, "org/model"), "model.safetensors").unwrap();
    assert_eq!(read(&w), big(300_000));
    let cdn: Vec<Seen> = fake.seen().into_iter().filter(|s| s.path.starts_with("/cdn/")).collect();
    assert_eq!(cdn.len(), 2, "{cdn:?}");
    assert_eq!(cdn[0].range, None);
    assert_eq!(cdn[1].range.as_deref(), Some("bytes=100000-"));

    // Cut every time: with two retries, the third cut ends the run with an error that says how
    // far it got, and the next run resumes from there.
    let fake = FakeHub::start(model_state());
    fake.state.cut_every.store(1000, Ordering::SeqCst);
    let cache = tempfile::tempdir().unwrap();
    let hub = Hub::new(HubOptions { progress: false, retries: 2, ..HubOptions::new(&fake.url, cache.path()) });
    let repo = Repo::new(RepoKind::Model, "org/model");
    let e = hub.file(&repo, "model.safetensors").unwrap_err().to_string();
    assert!(e.contains("download failed after 3 tries") && e.contains("resume from 3000 bytes"), "{e}");
    let cdn = || -> Vec<Option<String>> {
        fake.seen().into_iter().filter(|s| s.path.starts_with("/cdn/")).map(|s| s.range).collect()
    };
    assert_eq!(cdn(), [None, Some("bytes=1000-".into()), Some("bytes=2000-".into())]);
    fake.state.cut_every.store(0, Ordering::SeqCst);
    fake.clear();
    assert_eq!(read(&hub.file(&repo, "model.safetensors").unwrap()), big(300_000));
    assert_eq!(cdn(), [Some("bytes=3000-".to_string())]);

    // A server that ignores ranges: the download starts over and still comes out whole.
    let fake = FakeHub::start(model_state());
    fake.state.cut_after.store(100_000, Ordering::SeqCst);
    fake.state.no_ranges.store(true, Ordering::SeqCst);
    let cache = tempfile::tempdir().unwrap();
    let w = fake.hub(cache.path()).file(&Repo::new(RepoKind::Model, "org/model"), "model.safetensors").unwrap();
    assert_eq!(read(&w), big(300_000));
}

#[test]
fn concurrent_downloads_of_one_blob_take_turns() {
    // Two downloaders (separate clients, as two processes would be) start on the same file at
    // once while the CDN is slow to answer: the first holds huggingface_hub's lock file, the
    // second waits for it and then finds the blob whole, so the bytes are fetched once.
    let fake = FakeHub::start(model_state());
    fake.state.cdn_delay_ms.store(400, Ordering::SeqCst);
    let cache = tempfile::tempdir().unwrap();
    let start = std::sync::Barrier::new(2);
    let paths: Vec<PathBuf> = std::thread::scope(|s| {
        let run = || {
            let hub = fake.hub(cache.path());
            start.wait();
            hub.file(&Repo::new(RepoKind::Model, "org/model"), "model.safetensors")
        };
        let a = s.spawn(run);
        let b = s.spawn(run);
        [a, b].map(|t| t.join().unwrap().unwrap()).to_vec()
    });
    assert_eq!(paths[0], paths[1]);
    assert_eq!(read(&paths[0]), big(300_000));
    let cdn = fake.seen().into_iter().filter(|s| s.path.starts_with("/cdn/")).count();
    assert_eq!(cdn, 1, "the second downloader fetched the blob again");
    let lock = cache.path().join(".locks/models--org--model").join(format!("{}.lock", sha256(&big(300_000))));
    assert!(lock.is_file(), "no lock file at {}", lock.display());
    let blobs: Vec<_> = std::fs::read_dir(cache.path().join("models--org--model/blobs")).unwrap().collect();
    assert_eq!(blobs.len(), 1, "a partial download was left behind: {blobs:?}");
}

#[test]
fn corrupted_bytes_never_reach_the_cache() {
    let fake = FakeHub::start(model_state());
    fake.state.corrupt.store(true, Ordering::SeqCst);
    let cache = tempfile::tempdir().unwrap();
    let hub = fake.hub(cache.path());
    let repo = Repo::new(RepoKind::Model, "org/model");
    for file in ["model.safetensors", "config.json"] {
        let e = hub.file(&repo, file).unwrap_err().to_string();
        assert!(e.contains("checksum mismatch") && e.contains(file), "{e}");
    }
    let blobs = cache.path().join("models--org--model/blobs");
    let left: Vec<_> = std::fs::read_dir(&blobs).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert!(left.is_empty(), "{left:?}");
    assert!(hub.cached(&repo, "model.safetensors").is_none());
    // Right bytes, but not as many as the hub announced.
    fake.state.corrupt.store(false, Ordering::SeqCst);
    fake.state.announce_extra.store(1, Ordering::SeqCst);
    let e = hub.file(&repo, "model.safetensors").unwrap_err().to_string();
    assert!(e.contains("got 300000 bytes, the hub announced 300001"), "{e}");
    assert!(hub.cached(&repo, "model.safetensors").is_none());
    // Once the answers are right, the same call succeeds.
    fake.state.announce_extra.store(0, Ordering::SeqCst);
    assert_eq!(read(&hub.file(&repo, "model.safetensors").unwrap()), big(300_000));
}

#[test]
fn the_hubs_refusals_become_errors_that_say_what_to_do() {
    let fake = FakeHub::start(model_state());
    let cache = tempfile::tempdir().unwrap();
    let hub = fake.hub(cache.path());
    let repo = Repo::new(RepoKind::Model, "org/model");
    let e = hub.file(&Repo::new(RepoKind::Model, "org/nothing"), "config.json").unwrap_err().to_string();
    assert!(e.contains("org/nothing@main/config.json: no such repository") && e.contains("HF_TOKEN"), "{e}");
    let e = hub.file(&repo, "missing.json").unwrap_err().to_string();
    assert!(e.contains("org/model@main/missing.json: no such file"), "{e}");
    assert_eq!(hub.optional_file(&repo, "missing.json").unwrap(), None);
    // The absence is remembered where huggingface_hub keeps it, so offline knows it too, while
    // a file never asked about stays unknown offline.
    assert!(cache.path().join("models--org--model/.no_exist").join(COMMIT).join("missing.json").is_file());
    let offline = Hub::new(HubOptions { offline: true, progress: false, ..HubOptions::new(&fake.url, cache.path()) });
    assert_eq!(offline.optional_file(&repo, "missing.json").unwrap(), None);
    assert!(offline.optional_file(&repo, "never-asked.json").unwrap_err().to_string().contains("HF_HUB_OFFLINE"));
    let e = hub.file(&repo.at("nope"), "config.json").unwrap_err().to_string();
    assert!(e.contains("no revision `nope`"), "{e}");
    let gated = Repo::new(RepoKind::Model, "org/gated");
    let e = hub.file(&gated, "config.json").unwrap_err().to_string();
    assert!(e.contains("access denied (gated repo)") && e.contains("HF_TOKEN"), "{e}");
    // With the token: allowed, and the token goes to the hub but not to the CDN.
    let with_token = Hub::new(HubOptions {
        token: Some("hf_secret".into()),
        progress: false,
        ..HubOptions::new(&fake.url, cache.path())
    });
    fake.clear();
    assert_eq!(read(&with_token.file(&gated, "weights.bin").unwrap()), big(1000));
    let seen = fake.seen();
    assert!(seen.iter().any(|s| !s.path.starts_with("/cdn/") && s.auth.as_deref() == Some("Bearer hf_secret")));
    assert!(seen.iter().filter(|s| s.path.starts_with("/cdn/")).all(|s| s.auth.is_none()), "{seen:?}");
    // A renamed repository: the hub's relative redirect is followed. Its cache folder stays the
    // name asked for, as in huggingface_hub.
    let p = hub.file(&Repo::new(RepoKind::Model, "old-org/model"), "config.json").unwrap();
    assert!(p.starts_with(cache.path().join("models--old-org--model")));
    // Another revision resolves to its own commit.
    let p = hub.file(&repo.at("v1"), "config.json").unwrap();
    assert!(p.to_string_lossy().contains(OLD_COMMIT));
    assert_eq!(std::fs::read_to_string(cache.path().join("models--org--model/refs/v1")).unwrap(), OLD_COMMIT);
}

#[test]
fn rate_limits_and_server_failures_are_tried_again() {
    let fake = FakeHub::start(model_state());
    let cache = tempfile::tempdir().unwrap();
    let hub = fake.hub(cache.path());
    let repo = Repo::new(RepoKind::Model, "org/model");
    let throttle = |answers: &[(&'static str, u16, Option<&'static str>)]| {
        fake.state.throttle.lock().unwrap().extend_from_slice(answers);
    };
    let count = |method: &str| fake.seen().iter().filter(|s| s.method == method).count();
    // The listing API rate limited once (this was once taken for a missing repository).
    throttle(&[("GET", 429, Some("0"))]);
    // (First, while the cache has no snapshot to answer with.)
    let listing = hub.list(&repo, "").unwrap();
    assert_eq!(listing.files.len(), 3);
    assert!(fake.state.throttle.lock().unwrap().is_empty());
    // The file's metadata: rate limited (come back at once), then a server failure, then the answer.
    fake.clear();
    throttle(&[("HEAD", 429, Some("0")), ("HEAD", 503, None)]);
    assert_eq!(read(&hub.file(&repo, "config.json").unwrap()), b"{\"model_type\": \"llama\"}");
    assert_eq!(count("HEAD"), 3);
    // The CDN failing once on an LFS file's bytes.
    fake.clear();
    throttle(&[("GET", 502, None)]);
    assert_eq!(read(&hub.file(&repo, "model.safetensors").unwrap()), big(300_000));
    assert_eq!(count("GET"), 2);

    // With one retry and nothing cached, what stays transient becomes an error that says so.
    let other = tempfile::tempdir().unwrap();
    let strict = Hub::new(HubOptions { progress: false, retries: 1, ..HubOptions::new(&fake.url, other.path()) });
    fake.clear();
    throttle(&[("HEAD", 503, None), ("HEAD", 503, None)]);
    let e = strict.file(&repo, "config.json").unwrap_err().to_string();
    assert!(e.contains("org/model@main/config.json: cannot reach") && e.contains("(HTTP 503)"), "{e}");
    assert_eq!(count("HEAD"), 2, "one try and one retry");
    throttle(&[("HEAD", 429, Some("0")), ("HEAD", 429, Some("0"))]);
    let e = strict.file(&repo, "config.json").unwrap_err().to_string();
    assert!(e.contains("HTTP 429: the hub is limiting this client's request rate") && e.contains("HF_TOKEN"), "{e}");
    throttle(&[("GET", 429, Some("0")), ("GET", 429, Some("0"))]);
    let e = strict.list(&repo, "").unwrap_err().to_string();
    assert!(e.contains("HTTP 429") && !e.contains("no such repository"), "{e}");
    // The same for a page of the tree listing (a commit is listed without the revision call).
    throttle(&[("GET", 503, None), ("GET", 503, None)]);
    let e = strict.list(&repo.at(COMMIT), "").unwrap_err().to_string();
    assert!(e.contains("cannot reach") && e.contains("(HTTP 503) and the cache has no snapshot"), "{e}");
    // A refusal that is not transient (the CDN's 403, as for a signed URL that expired) is
    // final at once and says so.
    fake.clear();
    throttle(&[("GET", 403, None)]);
    let e = strict.file(&repo, "model.safetensors").unwrap_err().to_string();
    assert!(e.contains("model.safetensors: download refused with HTTP 403"), "{e}");
    assert_eq!(count("GET"), 1, "tried again");
    // A download refused twice stops, and the next run fetches it.
    throttle(&[("GET", 503, None), ("GET", 503, None)]);
    let e = strict.file(&repo, "model.safetensors").unwrap_err().to_string();
    assert!(e.contains("download failed after 2 tries (HTTP 503); run again to resume from 0 bytes"), "{e}");
    assert_eq!(read(&strict.file(&repo, "model.safetensors").unwrap()), big(300_000));
    // Where the cache has a copy of the file, a transient answer is not waited out: the cache
    // answers. A listing is (the cached snapshot holds only the files downloaded so far).
    fake.clear();
    throttle(&[("HEAD", 429, Some("300")), ("GET", 503, None)]);
    assert_eq!(read(&hub.file(&repo, "config.json").unwrap()), b"{\"model_type\": \"llama\"}");
    assert_eq!(count("HEAD"), 1);
    assert_eq!(hub.list(&repo, "").unwrap(), listing, "the whole listing, from the hub");
    assert!(fake.state.throttle.lock().unwrap().is_empty());
    // A failure that is final is not tried again.
    fake.clear();
    assert!(strict.file(&Repo::new(RepoKind::Model, "org/nothing"), "config.json").is_err());
    assert_eq!(count("HEAD"), 1);
}

fn dataset_state() -> State {
    let mut st = State::default();
    let mut lines = String::new();
    for i in 0..60 {
        lines += &format!("{{\"text\": \"hub document {i}: a line of text about rivers and hills.\"}}\n");
    }
    let train0 = lines.clone();
    let train1 = lines.replace("rivers", "forests");
    st.repos.insert(
        "datasets/org/set".into(),
        repo_with(&[
            ("README.md", b"# a dataset card, not training text\n", false),
            (".gitattributes", b"*.parquet filter=lfs\n", false),
            ("data/train-0.jsonl", train0.as_bytes(), true),
            ("data/train-1.jsonl", train1.as_bytes(), false),
            ("data/test.jsonl", b"{\"text\": \"held out\"}\n", false),
            ("other/notes.txt", b"also text\n", false),
        ]),
    );
    st
}

#[test]
fn hf_urls_name_files_folders_and_globs_of_a_dataset() {
    let fake = FakeHub::start(dataset_state());
    let cache = tempfile::tempdir().unwrap();
    let hub = fake.hub(cache.path());
    let names = |url: &str| -> Vec<String> {
        hub::resolve_inputs_with(&hub, &[url])
            .unwrap()
            .iter()
            .map(|p| {
                p.strip_prefix(cache.path().join("datasets--org--set/snapshots").join(COMMIT))
                    .unwrap()
                    .display()
                    .to_string()
            })
            .collect()
    };
    fake.clear();
    assert_eq!(names("hf://datasets/org/set/data/train-*.jsonl"), ["data/train-0.jsonl", "data/train-1.jsonl"]);
    // Only the glob's folder was listed, at the commit the branch names.
    let trees: Vec<String> = fake.seen().into_iter().filter(|s| s.path.contains("/tree/")).map(|s| s.path).collect();
    assert!(
        !trees.is_empty() && trees.iter().all(|p| p.starts_with(&format!("/api/datasets/org/set/tree/{COMMIT}/data?"))),
        "{trees:?}"
    );
    fake.clear();
    assert_eq!(names("hf://datasets/org/set/data"), ["data/test.jsonl", "data/train-0.jsonl", "data/train-1.jsonl"]);
    // A folder is listed once (its parent only when it names no file: perhaps it is a file).
    let trees: Vec<String> = fake.seen().into_iter().filter(|s| s.path.contains("/tree/")).map(|s| s.path).collect();
    assert!(trees.iter().all(|p| p.starts_with(&format!("/api/datasets/org/set/tree/{COMMIT}/data?"))), "{trees:?}");
    assert_eq!(
        names("hf://datasets/org/set"),
        ["data/test.jsonl", "data/train-0.jsonl", "data/train-1.jsonl", "other/notes.txt"]
    );
    assert_eq!(names("hf://datasets/org/set/README.md"), ["README.md"]);
    let e = hub::resolve_inputs_with(&hub, &["hf://datasets/org/set/nothing/here"]).unwrap_err().to_string();
    assert!(e.contains("hf://datasets/org/set/nothing/here: names no data file"), "{e}");
    // Local paths pass through untouched.
    assert_eq!(hub::resolve_inputs_with(&hub, &["local/dir"]).unwrap(), [PathBuf::from("local/dir")]);
}

#[test]
fn a_hub_dataset_and_tokenizer_feed_the_shard_pipeline() {
    let mut st = dataset_state();
    // A tokenizer repository: a tokenizer trained here, served as the hub would serve it.
    let tok = {
        let texts: Vec<String> = (0..50).map(|i| format!("hub document {i}: rivers, hills and forests")).collect();
        let cfg = patchlm_data::tokenizer::TokenizerConfig { vocab_size: 300, ..Default::default() };
        let t = patchlm_data::tokenizer::train_bpe(texts.iter(), &cfg).unwrap();
        patchlm_data::tokenizer::tokenizer_json(&t).unwrap()
    };
    st.repos.insert("org/tok".into(), repo_with(&[("tokenizer.json", tok.as_bytes(), false)]));
    let fake = FakeHub::start(st);
    let cache = tempfile::tempdir().unwrap();
    let hub = fake.hub(cache.path());
    let inputs = hub::resolve_inputs_with(&hub, &["hf://datasets/org/set/data/train-*.jsonl"]).unwrap();
    let tok_path = hub::resolve_tokenizer_with(&hub, "org/tok").unwrap();
    assert_eq!(std::fs::read_to_string(&tok_path).unwrap(), tok);
    let out = tempfile::tempdir().unwrap();
    let cfg = patchlm_data::DataConfig { val_fraction: 0.0, ..Default::default() };
    let s =
        patchlm_data::build_shards(&inputs, out.path(), &cfg, patchlm_data::TokenizerSource::File(&tok_path), false)
            .unwrap();
    assert_eq!(s.documents, 120);
    // The same via an hf:// address of the file, and a local path that shadows a repository id.
    assert_eq!(hub::resolve_tokenizer_with(&hub, "hf://org/tok/tokenizer.json").unwrap(), tok_path);
    let local = out.path().join("tokenizer.json");
    assert_eq!(hub::resolve_tokenizer_with(&hub, &local.to_string_lossy()).unwrap(), local);
    let e = hub::resolve_tokenizer_with(&hub, "no/such").unwrap_err().to_string();
    assert!(e.contains("no such repository") && e.contains("no local file either"), "{e}");
    let e = hub::resolve_tokenizer_with(&hub, "missing-tokenizer.json").unwrap_err().to_string();
    assert!(e.contains("missing-tokenizer.json: no such file or directory"), "{e}");
}

#[test]
fn a_snapshot_holds_the_files_a_filter_keeps() {
    let fake = FakeHub::start(model_state());
    let cache = tempfile::tempdir().unwrap();
    let hub = fake.hub(cache.path());
    let dir = hub.snapshot(&Repo::new(RepoKind::Model, "org/model"), |p| !p.contains('/')).unwrap();
    assert_eq!(dir, cache.path().join("models--org--model/snapshots").join(COMMIT));
    assert!(dir.join("config.json").is_file() && dir.join("model.safetensors").is_file());
    assert!(!dir.join("nested").exists());
    // The branch is recorded as naming the snapshot's commit; a snapshot of a commit records
    // no ref.
    let refs = |c: &Path| -> Vec<(String, String)> {
        let Ok(entries) = std::fs::read_dir(c.join("models--org--model/refs")) else { return Vec::new() };
        entries
            .map(|e| e.unwrap())
            .map(|e| (e.file_name().to_string_lossy().into_owned(), std::fs::read_to_string(e.path()).unwrap()))
            .collect()
    };
    assert_eq!(refs(cache.path()), [("main".to_string(), COMMIT.to_string())]);
    let pinned = tempfile::tempdir().unwrap();
    let dir = fake.hub(pinned.path()).snapshot(&Repo::new(RepoKind::Model, "org/model").at(COMMIT), |_| true).unwrap();
    assert!(dir.join("nested/dir/notes.txt").is_file());
    assert_eq!(refs(pinned.path()), []);
    let e = hub.snapshot(&Repo::new(RepoKind::Model, "org/model"), |_| false).unwrap_err().to_string();
    assert!(e.contains("none of its 3 files"), "{e}");

    // Offline, or with the hub gone, the snapshot is what the cache holds of the wanted files,
    // though the listing kept for the commit names more (a model's loader says what it lacks).
    let partial = tempfile::tempdir().unwrap();
    let repo = Repo::new(RepoKind::Model, "org/model");
    let hub = fake.hub(partial.path());
    hub.file(&repo, "config.json").unwrap();
    assert_eq!(hub.list(&repo, "").unwrap().files.len(), 3);
    let offline = Hub::new(HubOptions { offline: true, progress: false, ..HubOptions::new(&fake.url, partial.path()) });
    for h in [&offline, &gone_hub(partial.path())] {
        let dir = h.snapshot(&repo, |p| !p.contains('/')).unwrap();
        assert!(dir.join("config.json").is_file() && !dir.join("model.safetensors").exists());
        let e = h.snapshot(&repo, |p| p.ends_with(".safetensors")).unwrap_err().to_string();
        assert!(e.contains("none of its 3 files is one that is wanted here and in the cache"), "{e}");
    }
}

/// A listing cache written by `huggingface_hub` itself (tests/fixtures/make_tree_caches.py).
fn hf_tree(name: &str) -> Vec<u8> {
    read(&Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hf_trees").join(name))
}

#[test]
fn whole_listings_are_kept_by_commit_as_huggingface_hub_keeps_them() {
    let fake = FakeHub::start(model_state());
    let cache = tempfile::tempdir().unwrap();
    let hub = fake.hub(cache.path());
    let repo = Repo::new(RepoKind::Model, "org/model");
    let trees = cache.path().join("models--org--model/trees");
    // A folder's listing is not the repository's: nothing is kept.
    assert_eq!(hub.list(&repo, "nested").unwrap().files.len(), 1);
    assert!(!trees.exists());
    // A folder the repository lacks lists empty (the hub answers 404); a repository it lacks is
    // an error, also at a commit (no revision call first).
    assert_eq!(hub.list(&repo, "no/such/folder").unwrap().files, []);
    let e = hub.list(&Repo::new(RepoKind::Model, "org/none").at(COMMIT), "").unwrap_err().to_string();
    assert!(e.contains("HTTP 404: no such repository"), "{e}");
    // The whole repository's is, byte for byte as huggingface_hub writes it for these files.
    let listing = hub.list(&repo, "").unwrap();
    assert_eq!(listing.files.len(), 3);
    let kept = trees.join(format!("{COMMIT}.json"));
    assert_eq!(String::from_utf8(read(&kept)).unwrap(), String::from_utf8(hf_tree("model.json")).unwrap());
    // The next listing of that commit, whole or a folder, asks the hub nothing more than which
    // commit a branch names.
    fake.clear();
    assert_eq!(hub.list(&repo.at(COMMIT), "").unwrap(), listing);
    assert!(fake.seen().is_empty(), "{:?}", fake.seen());
    let nested = hub.list(&repo, "nested/").unwrap();
    assert_eq!(nested.files.iter().map(|f| f.path.as_str()).collect::<Vec<_>>(), ["nested/dir/notes.txt"]);
    assert_eq!(nested.files[0].size, Some(10));
    let seen = fake.seen();
    assert!(seen.len() == 1 && seen[0].path.contains("/revision/main"), "{seen:?}");

    // Offline, with one file of three downloaded: the listing is whole all the same, and the
    // files that are missing are reported missing, not left out.
    hub.file(&repo, "config.json").unwrap();
    let offline = Hub::new(HubOptions { offline: true, progress: false, ..HubOptions::new(&fake.url, cache.path()) });
    assert_eq!(offline.list(&repo, "").unwrap(), listing);
    let e = hub::resolve_inputs_with(&offline, &["hf://org/model/nested"]).unwrap_err().to_string();
    assert!(e.contains("nested/dir/notes.txt: not in the cache"), "{e}");
    // So is a hub that cannot be reached.
    let gone = gone_hub(cache.path());
    assert_eq!(gone.list(&repo, "").unwrap(), listing);

    // A kept listing that cannot be used is listed afresh and replaced: one that is not JSON,
    // one that names a path outside the repository, one with an entry short of a field
    // huggingface_hub needs; one of a later format is replaced too (as huggingface_hub does).
    let v1 = read(&kept);
    let text = String::from_utf8(v1.clone()).unwrap();
    for bad in [
        "{\"format_version\": 1, \"files\": ".to_string(),
        text.replace("nested/dir/notes.txt", "../notes.txt"),
        text.replace("\"blob_id\": \"230d5f4da0da586aad26ead694ea67cd15bd6df1\"", "\"blob\": \"x\""),
        text.replace("\"format_version\": 1", "\"format_version\": 2"),
        // A Xet hash must be 64 hex digits.
        text.replace(
            "\"blob_id\": \"230d5f4da0da586aad26ead694ea67cd15bd6df1\"",
            "\"blob_id\": \"230d5f4da0da586aad26ead694ea67cd15bd6df1\", \"xet_hash\": \"abc\"",
        ),
    ] {
        assert_ne!(bad.as_bytes(), v1.as_slice());
        std::fs::write(&kept, &bad).unwrap();
        fake.clear();
        assert_eq!(hub.list(&repo.at(COMMIT), "").unwrap(), listing, "{bad}");
        assert!(fake.seen().iter().any(|s| s.path.contains("/tree/")), "{bad}: not listed afresh");
        assert_eq!(read(&kept), v1, "{bad}: not replaced");
    }
}

#[test]
fn listings_that_huggingface_hub_kept_are_read() {
    // huggingface_hub's own file, with a Xet hash, a non-ASCII path (written as \u escapes) and
    // files in LFS: read offline, where the snapshot holds none of the files.
    let cache = tempfile::tempdir().unwrap();
    let root = cache.path().join("datasets--org--rich");
    std::fs::create_dir_all(root.join("trees")).unwrap();
    std::fs::create_dir_all(root.join("refs")).unwrap();
    std::fs::write(root.join("trees").join(format!("{COMMIT}.json")), hf_tree("rich.json")).unwrap();
    std::fs::write(root.join("refs/main"), COMMIT).unwrap();
    let offline =
        Hub::new(HubOptions { offline: true, progress: false, ..HubOptions::new("http://127.0.0.1:9", cache.path()) });
    let repo = Repo::new(RepoKind::Dataset, "org/rich");
    let l = offline.list(&repo, "").unwrap();
    assert_eq!(l.commit, COMMIT);
    let got: Vec<(&str, Option<u64>)> = l.files.iter().map(|f| (f.path.as_str(), f.size)).collect();
    assert_eq!(
        got,
        [
            (".gitattributes", Some(21)),
            ("README.md", Some(7)),
            ("data/extra/späť.jsonl", Some(15)),
            ("data/train-00000-of-00002.parquet", Some(5000)),
            ("data/train-00001-of-00002.parquet", Some(7000)),
        ]
    );
    let url = hub::HubUrl::parse("hf://datasets/org/rich/data").unwrap().unwrap();
    let folder = offline.list(&repo, "data").unwrap();
    assert_eq!(hub::select_files(&url, &folder).len(), 3);
    let e = hub::resolve_inputs_with(&offline, &["hf://datasets/org/rich/data"]).unwrap_err().to_string();
    assert!(e.contains("data/extra/späť.jsonl: not in the cache"), "{e}");
}
