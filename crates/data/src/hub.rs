//! Files from the Hugging Face Hub, kept in the cache that Python's `huggingface_hub` uses.
//!
//! A [`Hub`] resolves a repository file to a local path: from the cache when it is there (and
//! the revision is a commit, or the hub cannot be reached, or `HF_HUB_OFFLINE` is set), else by
//! downloading it. Downloads resume after an interruption, are checked against the checksum the
//! hub sends (sha256 for LFS files, git's blob sha1 for the others) and land in the cache only
//! whole. The cache layout is `huggingface_hub`'s (`<kind>s--<org>--<name>/blobs/<etag>`,
//! `snapshots/<commit>/<path>` linking to the blob, `refs/<revision>` holding the commit,
//! `trees/<commit>.json` listing a whole repository at a commit), so Python and patchlm share
//! downloads and listings both ways.
//!
//! Three ways in, for the three things a pipeline takes from the hub:
//! - [`resolve_inputs`]: training text as `hf://datasets/<org>/<name>[@rev]/<path or glob>`;
//! - [`resolve_tokenizer`]: a `tokenizer.json` by local path or by repository id;
//! - [`Hub::snapshot`]: the files of a repository that a caller's filter keeps (a model
//!   directory, say), as one snapshot directory.
//!
//! Settings come from the environment as in `huggingface_hub` ([`HubOptions::from_env`]):
//! `HF_ENDPOINT`, `HF_HUB_CACHE` / `HF_HOME` / `XDG_CACHE_HOME`, `HF_TOKEN` (or the token file
//! `huggingface-cli login` writes), `HF_HUB_OFFLINE`, `HF_HUB_DISABLE_PROGRESS_BARS`. This module
//! knows repositories and files, not what is in them.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use sha2::Digest;

use crate::error::{io_err, DataError, Result};

/// The hub's address unless `HF_ENDPOINT` says otherwise.
pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";
/// The revision used when none is given.
pub const DEFAULT_REVISION: &str = "main";
/// How many times a request is tried again after a transient failure (an interrupted download,
/// HTTP 429 or 5xx) before giving up.
pub const DEFAULT_RETRIES: usize = 3;
/// The longest wait between tries, in seconds: a `Retry-After` that asks for more waits this long.
pub const MAX_RETRY_WAIT_SECS: u64 = 300;
/// Seconds to wait for a connection or for the next bytes of a response.
pub const DEFAULT_TIMEOUT_SECS: u64 = 30;
/// The largest JSON listing read from the hub's API.
const MAX_API_BYTES: u64 = 256 << 20;

/// What kind of repository.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RepoKind {
    /// A model repository (`https://huggingface.co/<id>`).
    Model,
    /// A dataset repository (`https://huggingface.co/datasets/<id>`).
    Dataset,
}

impl RepoKind {
    fn plural(self) -> &'static str {
        match self {
            RepoKind::Model => "models",
            RepoKind::Dataset => "datasets",
        }
    }

    fn url_prefix(self) -> &'static str {
        match self {
            RepoKind::Model => "",
            RepoKind::Dataset => "datasets/",
        }
    }
}

/// A repository at a revision (a branch, a tag or a commit).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Repo {
    /// Model or dataset.
    pub kind: RepoKind,
    /// `org/name`, or a bare `name` for the hub's few unprefixed repositories.
    pub id: String,
    /// Branch, tag or commit ([`DEFAULT_REVISION`] unless given).
    pub revision: String,
}

impl Repo {
    /// A repository at [`DEFAULT_REVISION`].
    pub fn new(kind: RepoKind, id: &str) -> Self {
        Self { kind, id: id.to_string(), revision: DEFAULT_REVISION.to_string() }
    }

    /// The same repository at another revision.
    pub fn at(&self, revision: &str) -> Self {
        Self { revision: revision.to_string(), ..self.clone() }
    }

    /// Parses `org/name[@revision]` (or `name[@revision]`); `None` when `spec` is not shaped
    /// like a repository id (it has more than one `/`, a file extension the hub's ids do not
    /// take, or characters ids cannot hold).
    pub fn parse(spec: &str, kind: RepoKind) -> Option<Self> {
        let (id, revision) = match spec.split_once('@') {
            Some((id, rev)) => (id, percent_decode(rev)),
            None => (spec, DEFAULT_REVISION.to_string()),
        };
        if !is_repo_id(id) || revision.is_empty() {
            return None;
        }
        Some(Self { kind, id: id.to_string(), revision })
    }

    /// The repository's folder in the cache, e.g. `models--org--name`.
    pub fn cache_folder(&self) -> String {
        format!("{}--{}", self.kind.plural(), self.id.replace('/', "--"))
    }

    fn display(&self) -> String {
        format!("{}{}@{}", self.kind.url_prefix(), self.id, self.revision)
    }
}

impl std::fmt::Display for Repo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.display())
    }
}

/// Whether `id` has the shape of a hub repository id: one or two segments of letters, digits,
/// `-`, `_` and `.`, not starting or ending with `-` or `.`, and not `..`.
fn is_repo_id(id: &str) -> bool {
    let parts: Vec<&str> = id.split('/').collect();
    if parts.is_empty() || parts.len() > 2 {
        return false;
    }
    parts.iter().all(|p| {
        !p.is_empty()
            && p.len() <= 96
            && p.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
            && !p.starts_with(['-', '.'])
            && !p.ends_with(['-', '.'])
            && !p.contains("..")
    })
}

/// An `hf://` address: a repository and a path inside it (a file, a folder, a glob or empty).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubUrl {
    /// The repository.
    pub repo: Repo,
    /// The path inside the repository, without leading or trailing `/` (empty: all of it).
    pub path: String,
}

impl HubUrl {
    /// Parses `hf://[datasets/|models/]<org>/<name>[@revision][/path]`; `Ok(None)` when `s`
    /// does not start with `hf://`. A revision holding `/` is written with `%2F`, as
    /// `huggingface_hub`'s `HfFileSystem` does (`@refs%2Fconvert%2Fparquet`).
    pub fn parse(s: &str) -> Result<Option<Self>> {
        let Some(rest) = s.strip_prefix("hf://") else { return Ok(None) };
        let bad = |why: &str| DataError::Hub {
            target: s.to_string(),
            msg: format!("{why}; write hf://datasets/<org>/<name>[@revision]/<path>"),
        };
        let (kind, rest) = if let Some(r) = rest.strip_prefix("datasets/") {
            (RepoKind::Dataset, r)
        } else if let Some(r) = rest.strip_prefix("models/") {
            (RepoKind::Model, r)
        } else if rest.starts_with("spaces/") {
            return Err(bad("spaces are not supported"));
        } else {
            (RepoKind::Model, rest)
        };
        let segs: Vec<&str> = rest.split('/').collect();
        if segs.len() < 2 || segs[0].is_empty() || segs[1].is_empty() {
            return Err(bad("expected <org>/<name> after hf://"));
        }
        let (name, revision) = match segs[1].split_once('@') {
            Some((n, r)) => (n, percent_decode(r)),
            None => (segs[1], DEFAULT_REVISION.to_string()),
        };
        let id = format!("{}/{name}", segs[0]);
        if !is_repo_id(&id) || revision.is_empty() {
            return Err(bad(&format!("`{id}` is not a repository id")));
        }
        let path = segs[2..].iter().filter(|p| !p.is_empty()).copied().collect::<Vec<_>>().join("/");
        if path.split('/').any(|p| p == "..") {
            return Err(bad("`..` is not allowed in a repository path"));
        }
        Ok(Some(Self { repo: Repo { kind, id, revision }, path }))
    }
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        if b[i] == b'%' && i + 2 < b.len() {
            if let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Percent-encodes one URL path segment (everything but unreserved characters).
fn encode_segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for &c in s.as_bytes() {
        if c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.' | b'~') {
            out.push(c as char);
        } else {
            out.push_str(&format!("%{c:02X}"));
        }
    }
    out
}

/// A repository path in a URL: each segment encoded, the `/` between them kept.
fn encode_path(p: &str) -> String {
    p.split('/').map(encode_segment).collect::<Vec<_>>().join("/")
}

/// Where and how a [`Hub`] works. [`HubOptions::from_env`] reads the settings
/// `huggingface_hub` reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubOptions {
    /// The hub's base URL, without a trailing `/` ([`DEFAULT_ENDPOINT`]).
    pub endpoint: String,
    /// The cache directory (the folder holding `models--*` and `datasets--*`).
    pub cache_dir: PathBuf,
    /// An access token for private and gated repositories, sent to the endpoint only.
    pub token: Option<String>,
    /// Never touch the network; answer from the cache or fail.
    pub offline: bool,
    /// Show progress bars for downloads.
    pub progress: bool,
    /// How many times a request is tried again after a transient failure: a download cut off
    /// (resumed where it stopped), or the hub or its CDN answering HTTP 429 (rate limited) or
    /// 5xx ([`DEFAULT_RETRIES`]).
    pub retries: usize,
    /// Connection and read timeout in seconds ([`DEFAULT_TIMEOUT_SECS`]).
    pub timeout_secs: u64,
}

impl HubOptions {
    /// Options at `endpoint` with its cache in `cache_dir`, online, no token, progress bars on.
    pub fn new(endpoint: &str, cache_dir: &Path) -> Self {
        Self {
            endpoint: endpoint.trim_end_matches('/').to_string(),
            cache_dir: cache_dir.to_path_buf(),
            token: None,
            offline: false,
            progress: true,
            retries: DEFAULT_RETRIES,
            timeout_secs: DEFAULT_TIMEOUT_SECS,
        }
    }

    /// The settings `huggingface_hub` takes from the environment: `HF_ENDPOINT`; the cache in
    /// `HF_HUB_CACHE`, else `HF_HOME/hub`, else `XDG_CACHE_HOME/huggingface/hub`, else
    /// `~/.cache/huggingface/hub`; the token in `HF_TOKEN`, else the file `HF_TOKEN_PATH`, else
    /// `HF_HOME/token` (or `~/.cache/huggingface/token`); `HF_HUB_OFFLINE=1`;
    /// `HF_HUB_DISABLE_PROGRESS_BARS=1`. A variable set to the empty string counts as unset.
    pub fn from_env() -> Self {
        Self::from_vars(|k| std::env::var(k).ok().filter(|v| !v.is_empty()))
    }

    /// [`HubOptions::from_env`] over any variable lookup (for tests and embedding).
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Self {
        let truthy = |k: &str| var(k).is_some_and(|v| matches!(v.to_lowercase().as_str(), "1" | "on" | "yes" | "true"));
        let hf_home = var("HF_HOME").map(PathBuf::from).unwrap_or_else(|| {
            let base = var("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .or_else(|| var("HOME").map(|h| Path::new(&h).join(".cache")))
                .unwrap_or_else(|| PathBuf::from(".cache"));
            base.join("huggingface")
        });
        let cache_dir = var("HF_HUB_CACHE").map(PathBuf::from).unwrap_or_else(|| hf_home.join("hub"));
        let token = var("HF_TOKEN").or_else(|| var("HUGGING_FACE_HUB_TOKEN")).or_else(|| {
            let file = var("HF_TOKEN_PATH").map(PathBuf::from).unwrap_or_else(|| hf_home.join("token"));
            std::fs::read_to_string(file).ok().map(|t| t.trim().to_string()).filter(|t| !t.is_empty())
        });
        let endpoint = var("HF_ENDPOINT").unwrap_or_else(|| DEFAULT_ENDPOINT.to_string());
        Self {
            token,
            offline: truthy("HF_HUB_OFFLINE"),
            progress: !truthy("HF_HUB_DISABLE_PROGRESS_BARS"),
            ..Self::new(&endpoint, &cache_dir)
        }
    }
}

/// One file of a repository listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RepoFile {
    /// Path inside the repository.
    pub path: String,
    /// Size in bytes, when the listing gives it.
    pub size: Option<u64>,
}

/// A repository's files at one commit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listing {
    /// The commit the revision pointed at.
    pub commit: String,
    /// The files, sorted by path.
    pub files: Vec<RepoFile>,
}

/// What the hub says of a file before it is downloaded.
struct Meta {
    commit: String,
    etag: String,
    size: Option<u64>,
    url: String,
}

/// The hub's answer about one file.
enum Resolved {
    /// The file, and where to download it.
    Found(Meta),
    /// No such file (at this commit, when the hub said which).
    Absent(Option<String>),
}

/// Why a request got no usable answer.
enum Fetch {
    /// The network or the server failed: the cache may answer instead.
    Unreachable(String),
    /// The hub answered, and the answer is final.
    Refused(DataError),
}

/// Whether an HTTP status says to try again later: rate limited (429) or a server failure (5xx).
fn is_transient(status: u16) -> bool {
    status == 429 || status >= 500
}

/// How long to wait before try `attempt` + 1 (`attempt` counts from 1): what the server's
/// `Retry-After` asks (whole seconds; at most [`MAX_RETRY_WAIT_SECS`]), else 0.5 s doubled each
/// try up to 16 s. (`Retry-After` as an HTTP date is not read: the doubling applies.)
fn retry_wait(attempt: usize, retry_after: Option<&str>) -> Duration {
    match retry_after.and_then(|v| v.trim().parse::<u64>().ok()) {
        Some(secs) => Duration::from_secs(secs.min(MAX_RETRY_WAIT_SECS)),
        None => Duration::from_millis(250 << attempt.clamp(1, 6)),
    }
}

/// What an answer of HTTP `status` means when tries ran out on it.
fn transient_why(status: u16) -> String {
    if status == 429 {
        format!("HTTP {status}: the hub is limiting this client's request rate; wait and run again (a token, HF_TOKEN, gets a higher limit)")
    } else {
        format!("HTTP {status}")
    }
}

/// The error of a download given up after `tries` (the last failure `why`), which a later run
/// resumes from byte `have`.
fn download_failed(target: &str, tries: usize, why: &str, have: u64) -> DataError {
    DataError::Hub {
        target: target.to_string(),
        msg: format!("download failed after {tries} tries ({why}); run again to resume from {have} bytes"),
    }
}

/// A client for the hub and its local cache. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Hub {
    opts: HubOptions,
    agent: ureq::Agent,
}

impl Hub {
    /// A client with these options.
    pub fn new(opts: HubOptions) -> Self {
        let t = Some(Duration::from_secs(opts.timeout_secs.max(1)));
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .max_redirects(0)
            .timeout_connect(t)
            .timeout_recv_response(t)
            .timeout_per_read(t)
            .user_agent(concat!("patchlm/", env!("CARGO_PKG_VERSION")))
            .build()
            .into();
        Self { opts, agent }
    }

    /// A client configured from the environment ([`HubOptions::from_env`]).
    pub fn from_env() -> Self {
        Self::new(HubOptions::from_env())
    }

    /// The options in use.
    pub fn options(&self) -> &HubOptions {
        &self.opts
    }

    fn repo_dir(&self, repo: &Repo) -> PathBuf {
        self.opts.cache_dir.join(repo.cache_folder())
    }

    /// The commit the cache knows for `repo`'s revision: the revision itself when it is a
    /// commit, else the one `refs/<revision>` names.
    fn cached_commit(&self, repo: &Repo) -> Option<String> {
        if is_commit(&repo.revision) {
            return Some(repo.revision.clone());
        }
        let c = std::fs::read_to_string(self.repo_dir(repo).join("refs").join(&repo.revision)).ok()?;
        let c = c.trim().to_string();
        is_commit(&c).then_some(c)
    }

    /// The cached copy of `filename` at `repo`'s revision, if the cache has one.
    pub fn cached(&self, repo: &Repo, filename: &str) -> Option<PathBuf> {
        let commit = self.cached_commit(repo)?;
        let p = self.repo_dir(repo).join("snapshots").join(commit).join(filename);
        p.is_file().then_some(p)
    }

    /// `filename` of `repo`, downloaded into the cache unless it is there; returns its path in
    /// the snapshot folder. With a branch or tag as the revision the hub is asked which commit
    /// it names (a cached copy answers when the hub cannot be reached); with a commit, a cached
    /// copy is used without asking.
    pub fn file(&self, repo: &Repo, filename: &str) -> Result<PathBuf> {
        self.optional_file(repo, filename)?.ok_or_else(|| DataError::Hub {
            target: format!("{repo}/{filename}"),
            msg: format!("no such file in the repository (check the name and the revision; {})", self.opts.endpoint),
        })
    }

    /// Like [`Hub::file`], but `Ok(None)` when the repository has no such file. An absence the
    /// hub reported is remembered as `huggingface_hub` does (`.no_exist/<commit>/<path>`), so
    /// it is known offline too.
    pub fn optional_file(&self, repo: &Repo, filename: &str) -> Result<Option<PathBuf>> {
        for (what, p) in [("file name", filename), ("revision", repo.revision.as_str())] {
            if !is_relative_path(p) {
                return Err(DataError::Hub {
                    target: format!("{repo}/{filename}"),
                    msg: format!("the {what} `{p}` is not a relative path inside the repository"),
                });
            }
        }
        let dir = self.repo_dir(repo);
        // Some(Some(path)): cached; Some(None): known to be absent; None: the cache cannot say.
        let from_cache = || -> Option<Option<PathBuf>> {
            let commit = self.cached_commit(repo)?;
            let p = dir.join("snapshots").join(&commit).join(filename);
            if p.is_file() {
                return Some(Some(p));
            }
            dir.join(".no_exist").join(&commit).join(filename).is_file().then_some(None)
        };
        if self.opts.offline {
            return from_cache().ok_or_else(|| self.offline_miss(repo, filename));
        }
        if is_commit(&repo.revision) {
            if let Some(hit) = from_cache() {
                return Ok(hit);
            }
        }
        // With a copy in the cache, a transient answer is not waited out: the cache answers.
        let retries = if from_cache().is_some() { 0 } else { self.opts.retries };
        let meta = match self.metadata(repo, filename, retries) {
            Ok(Resolved::Found(m)) => m,
            Ok(Resolved::Absent(commit)) => {
                if let Some(c) = commit {
                    let marker = dir.join(".no_exist").join(&c).join(filename);
                    if let Some(parent) = marker.parent() {
                        let _ = std::fs::create_dir_all(parent).and_then(|_| File::create(&marker));
                    }
                    if repo.revision != c {
                        write_ref(&dir, &repo.revision, &c)?;
                    }
                }
                return Ok(None);
            }
            Err(Fetch::Refused(e)) => return Err(e),
            Err(Fetch::Unreachable(why)) => {
                if let Some(hit) = from_cache() {
                    eprintln!("warning: {}: {why}; answering {repo}/{filename} from the cache", self.opts.endpoint);
                    return Ok(hit);
                }
                return Err(DataError::Hub {
                    target: format!("{repo}/{filename}"),
                    msg: format!(
                        "cannot reach {} ({why}) and the cache {} has no copy; download it where the hub can be \
                         reached and point HF_HUB_CACHE at that cache",
                        self.opts.endpoint,
                        self.opts.cache_dir.display()
                    ),
                });
            }
        };
        let blob = dir.join("blobs").join(&meta.etag);
        let missing = || !blob.is_file() || meta.size.is_some_and(|s| file_len(&blob) != Some(s));
        let link = dir.join("snapshots").join(&meta.commit).join(filename);
        if missing() || !link.is_file() {
            // One download of a blob at a time, across processes (huggingface_hub's too).
            let target = format!("{repo}/{filename}");
            let _lock = self.lock_blob(repo, &meta.etag, &target)?;
            if missing() {
                self.download(&meta, &blob, &target)?;
            }
            link_blob(&blob, &link)?;
            tag_cache(&self.opts.cache_dir);
        }
        if repo.revision != meta.commit {
            write_ref(&dir, &repo.revision, &meta.commit)?;
        }
        Ok(Some(link))
    }

    fn offline_miss(&self, repo: &Repo, filename: &str) -> DataError {
        DataError::Hub {
            target: format!("{repo}/{filename}"),
            msg: format!(
                "not in the cache {} and HF_HUB_OFFLINE is set; unset it to download, or point HF_HUB_CACHE at a \
                 cache that has it",
                self.opts.cache_dir.display()
            ),
        }
    }

    /// GET of `url` (for `target`), from byte `range_from` on, tried again at most `retries`
    /// times while the answer is transient ([`Hub::call_retrying`]).
    fn get(
        &self,
        url: &str,
        range_from: u64,
        target: &str,
        retries: usize,
    ) -> std::result::Result<ureq::http::Response<ureq::Body>, ureq::Error> {
        self.call_retrying(target, retries, || {
            // The bytes as stored (what the size and checksum describe), never a compressed encoding.
            let mut req = self.agent.get(url).header("Accept-Encoding", "identity");
            if range_from > 0 {
                req = req.header("Range", &format!("bytes={range_from}-"));
            }
            if let Some(t) = self.token_for(url) {
                req = req.header("Authorization", &format!("Bearer {t}"));
            }
            req
        })
    }

    /// Sends what `make` builds, and again while the answer is transient (HTTP 429 or 5xx), at
    /// most `retries` more times ([`HubOptions::retries`], or 0 where the cache can answer),
    /// waiting as [`retry_wait`] says (with progress on, a line says so); the last answer stands.
    /// A failed connection is returned at once (the cache may answer instead, without a wait).
    fn call_retrying(
        &self,
        target: &str,
        retries: usize,
        make: impl Fn() -> ureq::RequestBuilder<ureq::typestate::WithoutBody>,
    ) -> std::result::Result<ureq::http::Response<ureq::Body>, ureq::Error> {
        let mut attempt = 0;
        loop {
            let resp = make().call()?;
            let status = resp.status().as_u16();
            if !is_transient(status) || attempt >= retries {
                return Ok(resp);
            }
            attempt += 1;
            let after = resp.headers().get("retry-after").and_then(|v| v.to_str().ok());
            let wait = retry_wait(attempt, after);
            if self.opts.progress {
                eprintln!(
                    "note: {target}: HTTP {status}; trying again in {:.1} s (retry {attempt} of {retries})",
                    wait.as_secs_f64(),
                );
            }
            drop(resp);
            std::thread::sleep(wait);
        }
    }

    /// The token, for URLs on the endpoint only (a CDN the hub redirects to gets none).
    fn token_for(&self, url: &str) -> Option<&str> {
        let on_endpoint = url.strip_prefix(&self.opts.endpoint).is_some_and(|r| r.is_empty() || r.starts_with('/'));
        self.opts.token.as_deref().filter(|_| on_endpoint)
    }

    /// Asks the hub what `filename` is at `repo`'s revision (a transient answer tried again at
    /// most `retries` times).
    fn metadata(&self, repo: &Repo, filename: &str, retries: usize) -> std::result::Result<Resolved, Fetch> {
        let mut url = format!(
            "{}/{}{}/resolve/{}/{}",
            self.opts.endpoint,
            repo.kind.url_prefix(),
            repo.id,
            encode_segment(&repo.revision),
            encode_path(filename)
        );
        let target = format!("{repo}/{filename}");
        for _ in 0..10 {
            let resp = self
                .call_retrying(&target, retries, || {
                    let req = self.agent.head(&url).header("Accept-Encoding", "identity");
                    match self.token_for(&url) {
                        Some(t) => req.header("Authorization", &format!("Bearer {t}")),
                        None => req,
                    }
                })
                .map_err(|e| Fetch::Unreachable(e.to_string()))?;
            let status = resp.status().as_u16();
            let header = |k: &str| resp.headers().get(k).and_then(|v| v.to_str().ok()).map(str::to_string);
            let location = header("location");
            // A relative redirect (a renamed repository) is the hub's own: follow it and ask again.
            if (300..400).contains(&status) {
                if let Some(loc) = location.as_deref().filter(|l| l.starts_with('/')) {
                    url = format!("{}{loc}", origin(&url));
                    continue;
                }
            }
            if is_transient(status) {
                return Err(Fetch::Unreachable(transient_why(status)));
            }
            if status == 404 {
                let code = header("x-error-code").unwrap_or_default();
                return match code.as_str() {
                    "RepoNotFound" => Err(Fetch::Refused(DataError::Hub {
                        target,
                        msg: "no such repository (or it is private: set HF_TOKEN to a token with access)".into(),
                    })),
                    "RevisionNotFound" => Err(Fetch::Refused(DataError::Hub {
                        target,
                        msg: format!("no revision `{}` in the repository", repo.revision),
                    })),
                    _ => Ok(Resolved::Absent(header("x-repo-commit").filter(|c| is_commit(c)))),
                };
            }
            if status == 401 || status == 403 {
                let msg = header("x-error-message").unwrap_or_else(|| format!("HTTP {status}"));
                return Err(Fetch::Refused(DataError::Hub {
                    target,
                    msg: format!(
                        "access denied ({msg}); the repository is private or gated: accept its terms on the hub and \
                         set HF_TOKEN (or run `huggingface-cli login`)"
                    ),
                }));
            }
            if !(200..400).contains(&status) {
                return Err(Fetch::Refused(DataError::Hub { target, msg: format!("the hub answered HTTP {status}") }));
            }
            let commit = header("x-repo-commit").filter(|c| is_commit(c));
            let etag = header("x-linked-etag").or_else(|| header("etag")).map(|e| normalize_etag(&e));
            let (Some(commit), Some(etag)) = (commit, etag.filter(|e| is_safe_name(e))) else {
                return Err(Fetch::Refused(DataError::Hub {
                    target,
                    msg: format!(
                        "{} answered without a commit (X-Repo-Commit) or an ETag; is HF_ENDPOINT a Hugging Face hub?",
                        self.opts.endpoint
                    ),
                }));
            };
            let size = header("x-linked-size").or_else(|| header("content-length")).and_then(|s| s.parse().ok());
            let url = match location {
                Some(loc) if (300..400).contains(&status) => loc,
                _ => url,
            };
            return Ok(Resolved::Found(Meta { commit, etag, size, url }));
        }
        Err(Fetch::Refused(DataError::Hub { target, msg: "too many redirects".into() }))
    }

    /// Holds the lock that `huggingface_hub` takes around writing a blob,
    /// `<cache>/.locks/<repo folder>/<etag>.lock` (an exclusive `flock`, as Python's `filelock`
    /// takes it), until the returned file is dropped. Where the file system cannot lock, the
    /// download goes ahead unlocked, as `huggingface_hub` does.
    fn lock_blob(&self, repo: &Repo, etag: &str, target: &str) -> Result<Option<File>> {
        let dir = self.opts.cache_dir.join(".locks").join(repo.cache_folder());
        std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        let path = dir.join(format!("{etag}.lock"));
        crate::shard::lock_exclusive(&path, &format!("another download of {target}"), &format!("downloading {target}"))
    }

    /// Downloads `meta.url` into `blob` through `<blob>.incomplete`, resuming a partial one,
    /// and checks the size and checksum before the rename.
    fn download(&self, meta: &Meta, blob: &Path, target: &str) -> Result<()> {
        let dir = blob.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
        let mut part = blob.as_os_str().to_owned();
        part.push(".incomplete");
        let part = PathBuf::from(part);
        let mut f = OpenOptions::new().create(true).append(true).read(true).open(&part).map_err(io_err(&part))?;
        let pb = self.bar(meta.size, target);
        let mut attempt = 0;
        loop {
            let have = f.metadata().map_err(io_err(&part))?.len();
            if meta.size.is_some_and(|s| have >= s) {
                break;
            }
            match self.fetch_into(&meta.url, target, &mut f, &part, have, &pb) {
                Ok(()) => break,
                Err(Fetch::Refused(e)) => return Err(e),
                Err(Fetch::Unreachable(why)) => {
                    attempt += 1;
                    if attempt > self.opts.retries {
                        return Err(download_failed(target, attempt, &why, file_len(&part).unwrap_or(0)));
                    }
                    std::thread::sleep(retry_wait(attempt, None));
                }
            }
        }
        pb.finish_and_clear();
        f.sync_all().map_err(io_err(&part))?;
        let len = f.metadata().map_err(io_err(&part))?.len();
        drop(f);
        let fail = |msg: String| {
            let _ = std::fs::remove_file(&part);
            DataError::Hub {
                target: target.to_string(),
                msg: format!("{msg}; the partial download was removed, run again"),
            }
        };
        if let Some(s) = meta.size.filter(|&s| s != len) {
            return Err(fail(format!("got {len} bytes, the hub announced {s}")));
        }
        if let Some(actual) = checksum_of(&part, &meta.etag, len)? {
            if actual != meta.etag {
                return Err(fail(format!("checksum mismatch (hub {}, downloaded {actual})", meta.etag)));
            }
        }
        std::fs::rename(&part, blob).map_err(io_err(blob))?;
        sync_dir(dir);
        Ok(())
    }

    /// One GET of `url` (the bytes of `target`) from byte `from` on, appended to `f`.
    fn fetch_into(
        &self,
        url: &str,
        target: &str,
        f: &mut File,
        part: &Path,
        from: u64,
        pb: &crate::progress::ByteBar,
    ) -> std::result::Result<(), Fetch> {
        let resp = self.get(url, from, target, self.opts.retries).map_err(|e| Fetch::Unreachable(e.to_string()))?;
        let status = resp.status().as_u16();
        let io = |e: std::io::Error| Fetch::Refused(DataError::Io { path: part.to_path_buf(), source: e });
        match status {
            206 => {}
            // The server ignored the range: start over.
            200 => {
                f.set_len(0).map_err(io)?;
                f.seek(SeekFrom::Start(0)).map_err(io)?;
            }
            416 => return Ok(()),
            // Tried again already (`get`): final for this run, which can be resumed.
            s if is_transient(s) => {
                return Err(Fetch::Refused(download_failed(target, self.opts.retries + 1, &transient_why(s), from)))
            }
            s => {
                return Err(Fetch::Refused(DataError::Hub {
                    target: target.to_string(),
                    msg: format!("download refused with HTTP {s}"),
                }))
            }
        }
        pb.set_position(if status == 206 { from } else { 0 });
        let mut body = resp.into_body().into_reader();
        let mut buf = vec![0u8; 1 << 16];
        loop {
            let n = match body.read(&mut buf) {
                Ok(0) => return Ok(()),
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(Fetch::Unreachable(e.to_string())),
            };
            f.write_all(&buf[..n]).map_err(io)?;
            pb.inc(n as u64);
        }
    }

    fn bar(&self, size: Option<u64>, target: &str) -> crate::progress::ByteBar {
        crate::progress::ByteBar::with_template(
            size.unwrap_or(0),
            self.opts.progress,
            &format!("downloading {target}"),
            "{msg} [{wide_bar}] {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec} eta {eta}",
        )
    }

    /// The files of `repo` at its revision under the folder `under` (`""`: the whole
    /// repository), with the commit the revision names. The commit is asked of the hub (its
    /// `revision` API) unless the revision is one; the files come from the listing cached for
    /// that commit (`trees/<commit>.json`, kept by this client and by `huggingface_hub` after
    /// listing a whole repository), else from the hub's `tree` API, page by page. Offline, or
    /// when the hub cannot be reached, the cache answers: its listing, else the files of the
    /// cached snapshot (only those downloaded so far; a warning says so).
    pub fn list(&self, repo: &Repo, under: &str) -> Result<Listing> {
        self.list_from(repo, under).map(|(l, _)| l)
    }

    /// [`Hub::list`], and whether the hub answered it or the cache did (offline, or the hub
    /// could not be reached).
    fn list_from(&self, repo: &Repo, under: &str) -> Result<(Listing, ListedBy)> {
        let under = under.trim_matches('/');
        let inside = |p: &str| under.is_empty() || p.strip_prefix(under).is_some_and(|r| r.starts_with('/'));
        let listed = |commit: &str| -> Option<Listing> {
            let mut files = self.read_tree(repo, commit)?;
            files.retain(|f| inside(&f.path));
            Some(Listing { commit: commit.to_string(), files })
        };
        let from_cache = || -> Option<CachedListing> {
            let commit = self.cached_commit(repo)?;
            if let Some(l) = listed(&commit) {
                return Some(CachedListing::Whole(l));
            }
            let root = self.repo_dir(repo).join("snapshots").join(&commit);
            if !root.is_dir() {
                return None;
            }
            let mut files = Vec::new();
            walk_files(&root, &root.join(under), &mut files);
            files.sort_by(|a: &RepoFile, b| a.path.cmp(&b.path));
            Some(CachedListing::Downloaded(Listing { commit, files }))
        };
        let target = repo.to_string();
        if self.opts.offline {
            return from_cache().map(|c| (c.listing(), ListedBy::Cache)).ok_or_else(|| DataError::Hub {
                target,
                msg: format!(
                    "no snapshot in the cache {} and HF_HUB_OFFLINE is set; unset it to download",
                    self.opts.cache_dir.display()
                ),
            });
        }
        let unreachable = |why: String| -> Result<(Listing, ListedBy)> {
            match from_cache() {
                Some(CachedListing::Whole(l)) => {
                    eprintln!(
                        "warning: {}: {why}; listing {repo} from the cache (all {} files of commit {})",
                        self.opts.endpoint,
                        l.files.len(),
                        &l.commit[..12]
                    );
                    Ok((l, ListedBy::Cache))
                }
                Some(CachedListing::Downloaded(l)) => {
                    eprintln!(
                        "warning: {}: {why}; listing {repo} from the cache, which knows only the {} files downloaded \
                         before (any others are left out)",
                        self.opts.endpoint,
                        l.files.len()
                    );
                    Ok((l, ListedBy::Cache))
                }
                None => Err(DataError::Hub {
                    target: target.clone(),
                    msg: format!("cannot reach {} ({why}) and the cache has no snapshot", self.opts.endpoint),
                }),
            }
        };
        // Transient answers are waited out even with a snapshot in the cache, which may hold only
        // some of the files (those downloaded so far), or an old commit of a branch.
        let retries = self.opts.retries;
        let api = format!("{}/api/{}/{}", self.opts.endpoint, repo.kind.plural(), repo.id);
        let commit = if is_commit(&repo.revision) {
            repo.revision.clone()
        } else {
            let url = format!("{api}/revision/{}", encode_segment(&repo.revision));
            let text = match self.api_json(&url, &target, retries)? {
                Ok(t) => t,
                Err(why) => return unreachable(why),
            };
            let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| DataError::Hub {
                target: target.clone(),
                msg: format!("the hub's answer is not JSON: {e}"),
            })?;
            match v["sha"].as_str().filter(|c| is_commit(c)) {
                Some(c) => c.to_string(),
                None => return Err(DataError::Hub { target, msg: "the hub's answer names no commit (`sha`)".into() }),
            }
        };
        if let Some(l) = listed(&commit) {
            return Ok((l, ListedBy::Hub));
        }
        let folder = if under.is_empty() { String::new() } else { format!("/{}", encode_segment(under)) };
        let mut next = Some(format!("{api}/tree/{commit}{folder}?recursive=true&expand=false"));
        let mut entries = Vec::new();
        while let Some(url) = next.take() {
            let resp = match self.get(&url, 0, &target, retries) {
                Ok(r) if is_transient(r.status().as_u16()) => return unreachable(transient_why(r.status().as_u16())),
                Ok(r) => r,
                Err(e) => return unreachable(e.to_string()),
            };
            let status = resp.status().as_u16();
            if status == 404 && !under.is_empty() {
                // Not a folder of the repository (a file, or nothing): an empty listing here.
                break;
            }
            if status >= 400 {
                return Err(self.api_refusal(status, &target));
            }
            next = resp.headers().get("link").and_then(|v| v.to_str().ok()).and_then(next_link);
            let text = read_api_body(resp, &target)?;
            entries.extend(parse_tree(&text).map_err(|msg| DataError::Hub { target: target.clone(), msg })?);
        }
        entries.sort_by(|a, b| a.0.path.cmp(&b.0.path));
        if under.is_empty() {
            // The whole repository: kept for offline listings and for the next listing of this
            // commit (by this client or by huggingface_hub), when every entry has what the cache
            // file needs.
            let whole: Option<Vec<(RepoFile, TreeCacheEntry)>> =
                entries.iter().map(|(f, e)| e.clone().map(|e| (f.clone(), e))).collect();
            if let Some(whole) = whole {
                self.write_tree(repo, &commit, &whole);
            }
        }
        Ok((Listing { commit, files: entries.into_iter().map(|(f, _)| f).collect() }, ListedBy::Hub))
    }

    fn tree_path(&self, repo: &Repo, commit: &str) -> PathBuf {
        self.repo_dir(repo).join("trees").join(format!("{commit}.json"))
    }

    /// Every file of `repo` at `commit`, from the listing cache; `None` when it has no listing
    /// of that commit, or one this reader cannot use (a warning says why, and the repository is
    /// listed afresh).
    fn read_tree(&self, repo: &Repo, commit: &str) -> Option<Vec<RepoFile>> {
        let path = self.tree_path(repo, commit);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
            Err(e) => {
                eprintln!("warning: {}: {e}; listing {repo} without it", path.display());
                return None;
            }
        };
        match parse_tree_cache(&text) {
            Ok(files) => files,
            Err(why) => {
                eprintln!("warning: {}: {why}; listing {repo} without it", path.display());
                None
            }
        }
    }

    /// Saves a whole repository's listing at `commit` (atomically); a cache that cannot be
    /// written costs a warning, not the listing.
    fn write_tree(&self, repo: &Repo, commit: &str, files: &[(RepoFile, TreeCacheEntry)]) {
        let path = self.tree_path(repo, commit);
        let saved = path
            .parent()
            .map_or(Ok(()), |dir| std::fs::create_dir_all(dir).map_err(io_err(dir)))
            .and_then(|_| crate::shard::write_atomic(&path, &tree_cache_json(files)));
        if let Err(e) = saved {
            eprintln!("warning: the listing of {repo} is not kept for offline use: {e}");
        }
    }

    /// GET of an API URL: `Ok(Ok(body))`, `Ok(Err(why))` when the hub cannot be reached, or the
    /// hub's refusal.
    fn api_json(&self, url: &str, target: &str, retries: usize) -> Result<std::result::Result<String, String>> {
        let resp = match self.get(url, 0, target, retries) {
            Ok(r) if is_transient(r.status().as_u16()) => return Ok(Err(transient_why(r.status().as_u16()))),
            Ok(r) => r,
            Err(e) => return Ok(Err(e.to_string())),
        };
        let status = resp.status().as_u16();
        if status >= 400 {
            return Err(self.api_refusal(status, target));
        }
        Ok(Ok(read_api_body(resp, target)?))
    }

    fn api_refusal(&self, status: u16, target: &str) -> DataError {
        DataError::Hub {
            target: target.to_string(),
            msg: format!(
                "HTTP {status}: no such repository or revision, or it is private or gated (set HF_TOKEN to a token \
                 with access)"
            ),
        }
    }

    /// Downloads the files of `repo` that `keep` accepts, all from the one commit the revision
    /// names, and returns the snapshot folder that holds them. Offline, or when the hub cannot
    /// be reached, the snapshot is what the cache holds of them (a warning names the others;
    /// whoever reads the folder says if it needs them).
    pub fn snapshot(&self, repo: &Repo, keep: impl Fn(&str) -> bool) -> Result<PathBuf> {
        let (listing, by) = self.list_from(repo, "")?;
        let cached = by == ListedBy::Cache;
        let mut names: Vec<String> = listing.files.iter().filter(|f| keep(&f.path)).map(|f| f.path.clone()).collect();
        if cached {
            let at = repo.at(&listing.commit);
            let (have, lack): (Vec<String>, Vec<String>) =
                names.into_iter().partition(|n| self.cached(&at, n).is_some());
            if !lack.is_empty() {
                eprintln!(
                    "warning: {repo}: {} of its files wanted here are not in the cache, so not in the snapshot: {}",
                    lack.len(),
                    lack.join(", ")
                );
            }
            names = have;
        }
        if names.is_empty() {
            return Err(DataError::Hub {
                target: repo.to_string(),
                msg: format!(
                    "none of its {} files is one that is wanted here{}",
                    listing.files.len(),
                    if cached { " and in the cache" } else { "" }
                ),
            });
        }
        self.fetch_at(repo, &listing.commit, &names)?;
        Ok(self.repo_dir(repo).join("snapshots").join(&listing.commit))
    }

    /// The files `names` of `repo` as of `commit` (a listing's), so that they come from one
    /// snapshot whatever the branch does meanwhile; `repo`'s revision is recorded as naming
    /// that commit.
    fn fetch_at(&self, repo: &Repo, commit: &str, names: &[String]) -> Result<Vec<PathBuf>> {
        let pinned = repo.at(commit);
        let paths = names.iter().map(|n| self.file(&pinned, n)).collect::<Result<Vec<_>>>()?;
        if repo.revision != commit && !self.opts.offline {
            write_ref(&self.repo_dir(repo), &repo.revision, commit)?;
        }
        Ok(paths)
    }
}

fn read_api_body(resp: ureq::http::Response<ureq::Body>, target: &str) -> Result<String> {
    resp.into_body()
        .with_config()
        .limit(MAX_API_BYTES)
        .read_to_string()
        .map_err(|e| DataError::Hub { target: target.to_string(), msg: format!("reading the hub's answer: {e}") })
}

/// The files of one page of the `tree` API (folders are skipped, and so is a path that is not
/// [`is_relative_path`]: joined to the snapshot folder it would leave it), with what
/// `huggingface_hub` keeps of each in its listing cache.
fn parse_tree(text: &str) -> std::result::Result<Vec<(RepoFile, Option<TreeCacheEntry>)>, String> {
    let v: serde_json::Value = serde_json::from_str(text).map_err(|e| format!("the hub's listing is not JSON: {e}"))?;
    let entries = v.as_array().ok_or("the hub's listing is not a list of entries")?;
    Ok(entries
        .iter()
        .filter(|e| e["type"].as_str() == Some("file"))
        .filter_map(|e| {
            let path = e["path"].as_str()?;
            let size = e["lfs"]["size"].as_u64().or_else(|| e["size"].as_u64());
            let cached = match (e["size"].as_u64(), e["oid"].as_str()) {
                (Some(size), Some(oid)) => Some(TreeCacheEntry {
                    size,
                    blob_id: oid.to_string(),
                    lfs_sha256: e["lfs"]["oid"].as_str().map(str::to_string),
                    lfs_size: e["lfs"]["oid"].as_str().and(e["lfs"]["size"].as_u64()),
                    xet_hash: e["xetHash"].as_str().filter(|h| is_xet_hash(h)).map(str::to_string),
                }),
                _ => None,
            };
            Some((RepoFile { path: path.to_string(), size }, cached))
        })
        .filter(|(f, _)| is_relative_path(&f.path))
        .collect())
}

/// Who answered a listing: the hub (its commit asked of it; the files may still come from the
/// listing kept for that commit), or the cache alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ListedBy {
    Hub,
    Cache,
}

/// A listing the cache can give without the hub.
enum CachedListing {
    /// Every file of the commit: the listing kept for it.
    Whole(Listing),
    /// Only the files of the commit's snapshot folder, those downloaded so far.
    Downloaded(Listing),
}

impl CachedListing {
    fn listing(self) -> Listing {
        match self {
            CachedListing::Whole(l) | CachedListing::Downloaded(l) => l,
        }
    }
}

/// The version of `huggingface_hub`'s listing cache format that is read and written.
const TREE_CACHE_FORMAT: u64 = 1;

/// `trees/<commit>.json` in a repository's cache folder: every file of the repository at one
/// commit, as `huggingface_hub` (2.4 on) writes it when it lists a whole repository. A commit
/// never changes, so neither does its listing.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct TreeCache {
    format_version: u64,
    files: std::collections::BTreeMap<String, TreeCacheEntry>,
}

/// One file of a [`TreeCache`] (field names and order as `huggingface_hub` writes them).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct TreeCacheEntry {
    size: u64,
    /// git's blob id.
    blob_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    lfs_sha256: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    lfs_size: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    xet_hash: Option<String>,
}

/// A Xet content hash as `huggingface_hub` accepts one: 64 hex digits.
fn is_xet_hash(h: &str) -> bool {
    h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit())
}

/// The files a listing cache holds, or why it cannot be used: `Ok(None)` for a format this
/// reader does not know (a newer one: listed afresh, as `huggingface_hub` does).
fn parse_tree_cache(text: &str) -> std::result::Result<Option<Vec<RepoFile>>, String> {
    let v: serde_json::Value = serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))?;
    if v.get("format_version").and_then(serde_json::Value::as_u64) != Some(TREE_CACHE_FORMAT) {
        return Ok(None);
    }
    let tree: TreeCache = serde_json::from_value(v).map_err(|e| e.to_string())?;
    if let Some(bad) = tree.files.keys().find(|p| !is_relative_path(p)) {
        return Err(format!("the path `{bad}` is not a relative path inside the repository"));
    }
    if tree.files.values().any(|e| e.xet_hash.as_deref().is_some_and(|h| !is_xet_hash(h))) {
        return Err("a `xet_hash` is not 64 hex digits".into());
    }
    Ok(Some(
        tree.files.into_iter().map(|(path, e)| RepoFile { path, size: Some(e.lfs_size.unwrap_or(e.size)) }).collect(),
    ))
}

/// `files` as a listing cache file, in `huggingface_hub`'s layout (one-space indents, paths
/// sorted).
fn tree_cache_json(files: &[(RepoFile, TreeCacheEntry)]) -> Vec<u8> {
    let tree = TreeCache {
        format_version: TREE_CACHE_FORMAT,
        files: files.iter().map(|(f, e)| (f.path.clone(), e.clone())).collect(),
    };
    let mut out = Vec::new();
    let mut ser = serde_json::Serializer::with_formatter(&mut out, serde_json::ser::PrettyFormatter::with_indent(b" "));
    // A map of strings to plain structs: serializing it cannot fail.
    let _ = serde::Serialize::serialize(&tree, &mut ser);
    out
}

/// The `rel="next"` URL of a `Link` header (the hub pages its listings as GitHub does).
fn next_link(header: &str) -> Option<String> {
    header.split(',').find_map(|part| {
        let (url, params) = part.split_once(';')?;
        let is_next = params.split(';').any(|p| p.trim().replace(' ', "") == "rel=\"next\"");
        let url = url.trim().strip_prefix('<')?.strip_suffix('>')?;
        is_next.then(|| url.to_string())
    })
}

fn walk_files(root: &Path, dir: &Path, out: &mut Vec<RepoFile>) {
    let Ok(rd) = std::fs::read_dir(dir) else { return };
    for e in rd.flatten() {
        let p = e.path();
        if p.is_dir() {
            walk_files(root, &p, out);
        } else if let Ok(rel) = p.strip_prefix(root) {
            let path = rel.components().map(|c| c.as_os_str().to_string_lossy()).collect::<Vec<_>>().join("/");
            out.push(RepoFile { path, size: file_len(&p) });
        }
    }
}

/// `scheme://host[:port]` of a URL.
fn origin(url: &str) -> &str {
    let after = url.find("://").map_or(0, |i| i + 3);
    match url[after..].find('/') {
        Some(i) => &url[..after + i],
        None => url,
    }
}

/// A path of `/`-separated, non-empty segments, none of them `.` or `..` (so joined to a
/// cache folder it stays inside it).
fn is_relative_path(p: &str) -> bool {
    !p.is_empty() && !p.contains('\\') && p.split('/').all(|seg| !seg.is_empty() && seg != "." && seg != "..")
}

fn is_commit(s: &str) -> bool {
    s.len() == 40 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Whether `s` can name a file in a cache folder (a blob by its ETag) and stays inside it.
fn is_safe_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && s != "."
        && s != ".."
}

/// The tag of the Cache Directory Tagging Standard (<https://bford.info/cachedir/>): its first
/// line tells backup tools to pass over the folder.
pub const CACHEDIR_TAG: &str = "Signature: 8a477f597d28d172789f06886806bc55\n\
    # This file is a cache directory tag created by patchlm (huggingface_hub writes the same tag).\n\
    # For information about cache directory tags, see:\n\
    #\thttps://bford.info/cachedir/\n";

/// Puts [`CACHEDIR_TAG`] into the cache's root where it has none, as `huggingface_hub` does
/// when it fetches a file; best effort (a cache that cannot take it still serves files).
fn tag_cache(cache: &Path) {
    let tag = cache.join("CACHEDIR.TAG");
    if !tag.exists() {
        let _ = crate::shard::write_atomic(&tag, CACHEDIR_TAG.as_bytes());
    }
}

/// An ETag without its weak prefix and quotes, as `huggingface_hub` stores blobs.
fn normalize_etag(e: &str) -> String {
    e.trim().trim_start_matches("W/").trim_matches('"').to_string()
}

fn file_len(p: &Path) -> Option<u64> {
    std::fs::metadata(p).ok().map(|m| m.len())
}

/// The checksum of `path` in the form `etag` has: sha256 for a 64-digit etag (LFS files),
/// git's blob sha1 for a 40-digit one; `None` when the etag is neither.
fn checksum_of(path: &Path, etag: &str, len: u64) -> Result<Option<String>> {
    let hex = etag.bytes().all(|b| b.is_ascii_hexdigit());
    enum H {
        S256(sha2::Sha256),
        S1(sha1::Sha1),
    }
    let mut h = match etag.len() {
        64 if hex => H::S256(sha2::Sha256::new()),
        40 if hex => {
            let mut s = sha1::Sha1::new();
            s.update(format!("blob {len}\0").as_bytes());
            H::S1(s)
        }
        _ => return Ok(None),
    };
    let mut f = File::open(path).map_err(io_err(path))?;
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = f.read(&mut buf).map_err(io_err(path))?;
        if n == 0 {
            break;
        }
        match &mut h {
            H::S256(s) => s.update(&buf[..n]),
            H::S1(s) => s.update(&buf[..n]),
        }
    }
    Ok(Some(match h {
        H::S256(s) => hex::encode(s.finalize()),
        H::S1(s) => hex::encode(s.finalize()),
    }))
}

/// Points `link` (in a snapshot) at `blob`: a relative symlink as `huggingface_hub` makes, or
/// where links cannot be made, a copy. Replaces an existing entry atomically.
fn link_blob(blob: &Path, link: &Path) -> Result<()> {
    let parent = link.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(io_err(parent))?;
    let tmp = crate::shard::temp_beside(link);
    #[cfg(unix)]
    let linked = {
        // snapshots/<commit>/<a>/<b>/file → ../../../../blobs/<etag>: one `..` per folder below
        // the repository folder.
        let repo_dir = blob.parent().and_then(Path::parent).unwrap_or(Path::new("."));
        let depth = parent.strip_prefix(repo_dir).map(|r| r.components().count()).unwrap_or(0);
        let mut rel = PathBuf::new();
        for _ in 0..depth {
            rel.push("..");
        }
        rel.push("blobs");
        rel.push(blob.file_name().unwrap_or_default());
        std::os::unix::fs::symlink(&rel, &tmp).is_ok()
    };
    #[cfg(not(unix))]
    let linked = false;
    if !linked {
        std::fs::copy(blob, &tmp).map_err(io_err(&tmp))?;
    }
    std::fs::rename(&tmp, link).map_err(io_err(link))?;
    Ok(())
}

fn write_ref(repo_dir: &Path, revision: &str, commit: &str) -> Result<()> {
    let path = repo_dir.join("refs").join(revision);
    if std::fs::read_to_string(&path).is_ok_and(|c| c.trim() == commit) {
        return Ok(());
    }
    let parent = path.parent().unwrap_or(repo_dir);
    std::fs::create_dir_all(parent).map_err(io_err(parent))?;
    crate::shard::write_atomic(&path, commit.as_bytes())
}

fn sync_dir(dir: &Path) {
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}

/// Whether a file of a dataset repository is training text: `.parquet`, `.jsonl`, `.ndjson`,
/// `.json` or `.txt`, optionally compressed (`.gz`, `.zst`; a repository's README and other
/// documents are not).
pub fn is_data_file(path: &str) -> bool {
    let name = path.rsplit('/').next().unwrap_or(path).to_lowercase();
    if name.starts_with('.') {
        return false;
    }
    let stem = crate::source::Compression::split(&name).0;
    [".parquet", ".jsonl", ".ndjson", ".json", ".txt"].iter().any(|e| stem.ends_with(e))
        && !matches!(stem, "dataset_info.json" | "dataset_infos.json" | "state.json")
}

/// Whether `path` matches `pattern`, where `*` matches within a path segment, `**` across
/// segments and `?` one character.
pub fn glob_match(pattern: &str, path: &str) -> bool {
    fn go(p: &[u8], s: &[u8]) -> bool {
        match p.first() {
            None => s.is_empty(),
            // `**/`: zero or more whole segments.
            Some(b'*') if p.get(1) == Some(&b'*') && p.get(2) == Some(&b'/') => {
                (0..=s.len()).any(|i| (i == 0 || s[i - 1] == b'/') && go(&p[3..], &s[i..]))
            }
            // `**` elsewhere: any characters, `/` included.
            Some(b'*') if p.get(1) == Some(&b'*') => (0..=s.len()).any(|i| go(&p[2..], &s[i..])),
            Some(b'*') => (0..=s.len()).take_while(|&i| i == 0 || s[i - 1] != b'/').any(|i| go(&p[1..], &s[i..])),
            Some(b'?') => s.first().is_some_and(|&c| c != b'/') && go(&p[1..], &s[1..]),
            Some(&c) => s.first() == Some(&c) && go(&p[1..], &s[1..]),
        }
    }
    go(pattern.as_bytes(), path.as_bytes())
}

/// The folder to list for an `hf://` path: the path itself, or for a glob the segments
/// before the first one with a wildcard.
fn listing_folder(path: &str) -> String {
    path.split('/').take_while(|seg| !seg.contains(['*', '?'])).collect::<Vec<_>>().join("/")
}

/// The files an `hf://` address names in `listing`: the file itself; every file matching a
/// glob; or every data file ([`is_data_file`]) under a folder (the whole repository for an
/// empty path).
pub fn select_files(url: &HubUrl, listing: &Listing) -> Vec<String> {
    let p = url.path.as_str();
    if let Some(f) = listing.files.iter().find(|f| f.path == p) {
        return vec![f.path.clone()];
    }
    let glob = p.contains(['*', '?']);
    listing
        .files
        .iter()
        .map(|f| f.path.as_str())
        .filter(|f| {
            if glob {
                glob_match(p, f)
            } else {
                (p.is_empty() || f.strip_prefix(p).is_some_and(|r| r.starts_with('/'))) && is_data_file(f)
            }
        })
        .map(str::to_string)
        .collect()
}

/// Replaces every `hf://` input by the local files it names (downloading them into the cache
/// with `hub`), keeping the others as they are. A dataset folder gives its data files, sorted
/// by path, all from one commit.
pub fn resolve_inputs_with<P: AsRef<Path>>(hub: &Hub, inputs: &[P]) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for input in inputs {
        let input = input.as_ref();
        let Some(url) = HubUrl::parse(&input.to_string_lossy())? else {
            out.push(input.to_path_buf());
            continue;
        };
        let listing = hub.list(&url.repo, &listing_folder(&url.path))?;
        let mut names = select_files(&url, &listing);
        if names.is_empty() && !url.path.contains(['*', '?']) {
            // Perhaps a file: list its folder instead.
            let parent = url.path.rsplit_once('/').map_or("", |(p, _)| p);
            names = select_files(&url, &hub.list(&url.repo.at(&listing.commit), parent)?);
        }
        if names.is_empty() {
            let some: Vec<&str> = listing.files.iter().take(8).map(|f| f.path.as_str()).collect();
            return Err(DataError::Hub {
                target: input.display().to_string(),
                msg: format!(
                    "names no data file (.parquet, .jsonl, .json, .txt, optionally .gz or .zst){}{}",
                    if some.is_empty() { "" } else { "; there are " },
                    some.join(", ")
                ),
            });
        }
        let bytes: u64 = listing.files.iter().filter(|f| names.contains(&f.path)).filter_map(|f| f.size).sum();
        eprintln!(
            "{}: {} file{}, {:.1} MB, commit {}",
            input.display(),
            names.len(),
            if names.len() == 1 { "" } else { "s" },
            bytes as f64 / 1e6,
            &listing.commit[..12]
        );
        out.extend(hub.fetch_at(&url.repo, &listing.commit, &names)?);
    }
    Ok(out)
}

/// [`resolve_inputs_with`] with a hub configured from the environment; no hub is touched when
/// no input starts with `hf://`.
pub fn resolve_inputs<P: AsRef<Path>>(inputs: &[P]) -> Result<Vec<PathBuf>> {
    if !inputs.iter().any(|p| p.as_ref().to_string_lossy().starts_with("hf://")) {
        return Ok(inputs.iter().map(|p| p.as_ref().to_path_buf()).collect());
    }
    resolve_inputs_with(&Hub::from_env(), inputs)
}

/// A tokenizer given as a local `tokenizer.json` (or a folder holding one), an `hf://` address
/// of a file, or a repository id (`org/name[@revision]`, whose `tokenizer.json` is fetched). A
/// local path wins over a repository id of the same spelling.
pub fn resolve_tokenizer_with(hub: &Hub, spec: &str) -> Result<PathBuf> {
    let local = Path::new(spec);
    if local.is_file() {
        return Ok(local.to_path_buf());
    }
    if local.is_dir() {
        let f = local.join(crate::shard::TOKENIZER_FILE);
        return if f.is_file() { Ok(f) } else { Err(DataError::Missing(f)) };
    }
    if let Some(url) = HubUrl::parse(spec)? {
        let name = if url.path.is_empty() { crate::shard::TOKENIZER_FILE.to_string() } else { url.path.clone() };
        return hub.file(&url.repo, &name);
    }
    // A path that starts with `.`, `/` or `~`, or holds a backslash, is no repository id already; a
    // `*.json` name may look like one (`org/tok.json`).
    match Repo::parse(spec, RepoKind::Model).filter(|_| !spec.ends_with(".json")) {
        Some(repo) => hub.file(&repo, crate::shard::TOKENIZER_FILE).map_err(|e| match e {
            DataError::Hub { target, msg } => {
                DataError::Hub { target, msg: format!("{msg} (`{spec}` is no local file either)") }
            }
            e => e,
        }),
        None => Err(DataError::Missing(local.to_path_buf())),
    }
}

/// [`resolve_tokenizer_with`] with a hub configured from the environment (a local path
/// touches no network).
pub fn resolve_tokenizer(spec: &str) -> Result<PathBuf> {
    resolve_tokenizer_with(&Hub::from_env(), spec)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repo_ids_and_hf_urls_parse() {
        let r = Repo::parse("openai-community/gpt2", RepoKind::Model).unwrap();
        assert_eq!((r.id.as_str(), r.revision.as_str()), ("openai-community/gpt2", "main"));
        assert_eq!(r.cache_folder(), "models--openai-community--gpt2");
        let r = Repo::parse("gpt2@v1.0", RepoKind::Model).unwrap();
        assert_eq!((r.id.as_str(), r.revision.as_str()), ("gpt2", "v1.0"));
        for bad in ["a/b/c", "", "/x", "x/", "a/..b", "-a/b", "a b/c", "org/name@"] {
            assert!(Repo::parse(bad, RepoKind::Model).is_none(), "{bad}");
        }
        let u = HubUrl::parse("hf://datasets/org/set@refs%2Fconvert%2Fparquet/data/train-*.parquet").unwrap().unwrap();
        assert_eq!(
            u.repo,
            Repo { kind: RepoKind::Dataset, id: "org/set".into(), revision: "refs/convert/parquet".into() }
        );
        assert_eq!(u.path, "data/train-*.parquet");
        assert_eq!(u.repo.cache_folder(), "datasets--org--set");
        let u = HubUrl::parse("hf://org/model/").unwrap().unwrap();
        assert_eq!((u.repo.kind, u.repo.revision.as_str(), u.path.as_str()), (RepoKind::Model, "main", ""));
        assert!(HubUrl::parse("data/corpus").unwrap().is_none());
        for (bad, why) in [
            ("hf://datasets/org", "expected <org>/<name> after hf://"),
            ("hf://datasets//name", "expected <org>/<name> after hf://"),
            ("hf://datasets/org/", "expected <org>/<name> after hf://"),
            ("hf://spaces/a/b", "spaces are not supported"),
            ("hf://datasets/a/b/../c", "`..` is not allowed"),
            ("hf://a b/c", "`a b/c` is not a repository id"),
            ("hf://a/b@", "`a/b` is not a repository id"),
        ] {
            let e = HubUrl::parse(bad).unwrap_err().to_string();
            assert!(e.starts_with(bad) && e.contains(why) && e.contains("hf://datasets/<org>/<name>"), "{e}");
        }
    }

    #[test]
    fn percent_coding_round_trips() {
        assert_eq!(percent_decode("refs%2Fpr%2F1"), "refs/pr/1");
        assert_eq!(percent_decode("a%2"), "a%2");
        assert_eq!(percent_decode("%zz%41"), "%zzA");
        assert_eq!(encode_segment("refs/pr/1"), "refs%2Fpr%2F1");
        assert_eq!(encode_path("data/a b+c.parquet"), "data/a%20b%2Bc.parquet");
    }

    #[test]
    fn globs_match_within_and_across_segments() {
        assert!(glob_match("data/train-*.parquet", "data/train-00000-of-00002.parquet"));
        assert!(!glob_match("data/train-*.parquet", "data/sub/train-0.parquet"));
        assert!(!glob_match("data/*.parquet", "data/x.parquet.gz"));
        assert!(glob_match("**/*.jsonl", "a/b/c.jsonl"));
        assert!(glob_match("**/*.jsonl", "c.jsonl"));
        assert!(glob_match("data/**", "data/a/b.txt"));
        assert!(!glob_match("data/**", "other/a.txt"));
        assert!(glob_match("a/**/b.txt", "a/b.txt") && glob_match("a/**/b.txt", "a/x/y/b.txt"));
        assert!(!glob_match("a/**/b.txt", "a/xb.txt"));
        assert!(glob_match("part-?.txt", "part-1.txt"));
        assert!(!glob_match("part-?.txt", "part-10.txt"));
        // One `*` before a `/` stays within its segment (and must match what it stands for).
        assert!(!glob_match("data/*a/x.txt", "data/x.txt") && glob_match("data/*a/x.txt", "data/ba/x.txt"));
    }

    #[test]
    fn pages_follow_the_next_link_and_globs_list_their_literal_folder() {
        let h = "<https://hub/api/x?cursor=abc&recursive=true>; rel=\"next\", <https://hub/api/x>; rel=\"first\"";
        assert_eq!(next_link(h).as_deref(), Some("https://hub/api/x?cursor=abc&recursive=true"));
        assert_eq!(next_link("<https://hub/api/x>; rel=\"prev\""), None);
        assert_eq!(listing_folder("data/train-*.parquet"), "data");
        assert_eq!(listing_folder("sample/10BT/*.parquet"), "sample/10BT");
        assert_eq!(listing_folder("**/*.jsonl"), "");
        assert_eq!(listing_folder("data"), "data");
    }

    #[test]
    fn data_files_exclude_repository_documents() {
        for yes in ["data/train.parquet", "x.jsonl.gz", "a/b.txt", "c.JSON", "d.ndjson", "e.jsonl.zst"] {
            assert!(is_data_file(yes), "{yes}");
        }
        for no in ["README.md", ".gitattributes", "dataset_info.json", "x.py", "a/.hidden.jsonl", "img.png"] {
            assert!(!is_data_file(no), "{no}");
        }
    }

    #[test]
    fn options_follow_huggingface_hub_environment() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| pairs.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string())
        };
        let o = HubOptions::from_vars(env(&[("HOME", "/home/u")]));
        assert_eq!(o.cache_dir, Path::new("/home/u/.cache/huggingface/hub"));
        assert_eq!((o.endpoint.as_str(), o.offline, o.progress), (DEFAULT_ENDPOINT, false, true));
        let o = HubOptions::from_vars(env(&[("HOME", "/home/u"), ("XDG_CACHE_HOME", "/x")]));
        assert_eq!(o.cache_dir, Path::new("/x/huggingface/hub"));
        let o = HubOptions::from_vars(env(&[
            ("HF_HOME", "/h"),
            ("HF_ENDPOINT", "http://local:1/"),
            ("HF_HUB_OFFLINE", "True"),
        ]));
        assert_eq!(
            (o.cache_dir.as_path(), o.endpoint.as_str(), o.offline),
            (Path::new("/h/hub"), "http://local:1", true)
        );
        let o = HubOptions::from_vars(env(&[
            ("HF_HOME", "/h"),
            ("HF_HUB_CACHE", "/c"),
            ("HF_TOKEN", "hf_abc"),
            ("HF_HUB_DISABLE_PROGRESS_BARS", "1"),
        ]));
        assert_eq!((o.cache_dir.as_path(), o.token.as_deref(), o.progress), (Path::new("/c"), Some("hf_abc"), false));
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("token"), "hf_fromfile\n").unwrap();
        let home = dir.path().to_string_lossy().into_owned();
        let o = HubOptions::from_vars(move |k| (k == "HF_HOME").then(|| home.clone()));
        assert_eq!(o.token.as_deref(), Some("hf_fromfile"));
    }

    /// `from_env` reads this process's environment, an empty variable counting as unset: run in a
    /// child process of this test binary, given an environment of its own.
    #[test]
    fn options_come_from_the_environment_with_empty_variables_unset() {
        const CHILD: &str = "PATCHLM_HUB_ENV_CHILD";
        if std::env::var_os(CHILD).is_some() {
            let o = HubOptions::from_env();
            println!("options: {} {} {:?} {}", o.cache_dir.display(), o.endpoint, o.token, o.offline);
            // The resolvers use the same settings: offline here, with nothing in the cache.
            println!("local: {:?}", resolve_inputs(&["a.txt", "some/dir"]).map_err(|e| e.to_string()));
            println!("hub: {:?}", resolve_inputs(&["a.txt", "hf://datasets/org/set/data"]).map_err(|e| e.to_string()));
            println!("tokenizer: {:?}", resolve_tokenizer("org/name").map_err(|e| e.to_string()));
            return;
        }
        let name = "hub::tests::options_come_from_the_environment_with_empty_variables_unset";
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([name, "--exact", "--nocapture", "--test-threads=1"])
            .env_clear()
            .env(CHILD, "1")
            .envs([
                ("HOME", "/home/u"),
                ("HF_HOME", ""),
                ("HF_HUB_CACHE", ""),
                ("XDG_CACHE_HOME", "/x"),
                ("HF_TOKEN", ""),
                ("HF_TOKEN_PATH", "/nonexistent/token"),
                ("HF_ENDPOINT", "http://local:1"),
                ("HF_HUB_OFFLINE", "1"),
            ])
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        // (The harness may print the test's name on the same line first.)
        let line = |key: &str| stdout.lines().find_map(|l| l.split_once(key).map(|(_, o)| o.to_string()));
        assert_eq!(line("options: ").as_deref(), Some("/x/huggingface/hub http://local:1 None true"), "{stdout}");
        assert_eq!(line("local: ").as_deref(), Some(r#"Ok(["a.txt", "some/dir"])"#), "{stdout}");
        for key in ["hub: ", "tokenizer: "] {
            let got = line(key).unwrap_or_default();
            assert!(got.starts_with("Err(") && got.contains("HF_HUB_OFFLINE"), "{key}{got}");
        }
        // A local tokenizer file needs no hub.
        let dir = tempfile::tempdir().unwrap();
        let tok = dir.path().join("tokenizer.json");
        std::fs::write(&tok, "{}").unwrap();
        assert_eq!(resolve_tokenizer(&tok.to_string_lossy()).unwrap(), tok);
        assert_eq!(resolve_tokenizer(&dir.path().to_string_lossy()).unwrap(), tok);
        // What is spelt as a path is not taken for a repository id: it is missing.
        let offline = Hub::new(HubOptions { offline: true, ..HubOptions::new("http://127.0.0.1:9", dir.path()) });
        for spec in ["./org/tok", "/org/tok", "~/tok", "org\\tok", "org/tok.json", "../tok"] {
            assert!(matches!(resolve_tokenizer_with(&offline, spec), Err(DataError::Missing(_))), "{spec}");
        }
    }

    #[test]
    fn paths_that_would_leave_the_cache_are_refused() {
        let hub =
            Hub::new(HubOptions { offline: true, ..HubOptions::new("http://127.0.0.1:9", Path::new("/nonexistent")) });
        let repo = Repo::new(RepoKind::Model, "org/m");
        for bad in ["../x", "a/../../x", "/etc/passwd", "a//b", "", "./a", "a\\b"] {
            let e = hub.file(&repo, bad).unwrap_err().to_string();
            assert!(e.contains("is not a relative path inside the repository"), "{bad}: {e}");
        }
        let e = hub.file(&repo.at("../../x"), "config.json").unwrap_err().to_string();
        assert!(e.contains("the revision `../../x`"), "{e}");
        assert!(is_relative_path("refs/pr/1") && is_relative_path("data/train-0.parquet"));
    }

    #[test]
    fn a_listing_keeps_files_inside_the_repository() {
        let page = r#"[
            {"type": "directory", "path": "data", "oid": "d0", "size": 0},
            {"type": "file", "path": "data/a.jsonl", "oid": "b1", "size": 12},
            {"type": "file", "path": "w.safetensors", "oid": "b2", "size": 130,
             "lfs": {"oid": "5e", "size": 4096, "pointerSize": 130}},
            {"type": "file", "path": "../escape", "oid": "b3", "size": 1},
            {"type": "file", "path": "a/./b", "oid": "b4", "size": 1},
            {"type": "file", "path": "a\\b", "oid": "b5", "size": 1},
            {"type": "file", "path": "/abs", "oid": "b6", "size": 1},
            {"type": "file", "path": "no-oid", "size": 3}
        ]"#;
        let files = parse_tree(page).unwrap();
        let got: Vec<(&str, Option<u64>, bool)> =
            files.iter().map(|(f, e)| (f.path.as_str(), f.size, e.is_some())).collect();
        assert_eq!(
            got,
            [("data/a.jsonl", Some(12), true), ("w.safetensors", Some(4096), true), ("no-oid", Some(3), false)]
        );
        let lfs = files[1].1.as_ref().unwrap();
        assert_eq!((lfs.size, lfs.lfs_size, lfs.lfs_sha256.as_deref()), (130, Some(4096), Some("5e")));
        assert!(parse_tree("{}").unwrap_err().contains("not a list"));
    }

    #[test]
    fn tokens_go_to_the_endpoint_only() {
        let hub =
            Hub::new(HubOptions { token: Some("t".into()), ..HubOptions::new("https://hub.example", Path::new("/c")) });
        assert_eq!(hub.token_for("https://hub.example/org/m/resolve/main/x"), Some("t"));
        assert_eq!(hub.token_for("https://hub.example.evil/x"), None);
        assert_eq!(hub.token_for("https://cdn.example/blob"), None);
        assert_eq!(origin("http://127.0.0.1:8080/a/b?c"), "http://127.0.0.1:8080");
        assert_eq!(origin("http://h/a/b"), "http://h");
        assert_eq!(origin("https://hub.example"), "https://hub.example");
    }

    #[test]
    fn waits_follow_retry_after_or_double() {
        let ms = |attempt, after| retry_wait(attempt, after).as_millis();
        assert_eq!(ms(1, Some("7")), 7000);
        assert_eq!(ms(3, Some(" 0 ")), 0);
        assert_eq!(ms(1, Some("100000")), 300_000, "capped at MAX_RETRY_WAIT_SECS");
        // An HTTP date or nonsense: the doubling.
        assert_eq!(ms(2, Some("Wed, 21 Oct 2026 07:28:00 GMT")), 1000);
        assert_eq!([1, 2, 3, 6, 40].map(|a| ms(a, None)), [500, 1000, 2000, 16_000, 16_000]);
        assert!(is_transient(429) && is_transient(500) && is_transient(503));
        assert!(!is_transient(404) && !is_transient(401) && !is_transient(416) && !is_transient(200));
    }

    #[test]
    fn etags_normalize_and_checksums_follow_their_form() {
        assert_eq!(normalize_etag("W/\"abc\""), "abc");
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, b"hello\n").unwrap();
        // `printf 'hello\n' | git hash-object --stdin` and `sha256sum`.
        let git = "ce013625030ba8dba906f756967f9e9ca394464a";
        let sha = "5891b5b522d5df086d0ff0b110fbd9d21bb4fc7163af34d08286a2e846f6be03";
        assert_eq!(checksum_of(&p, git, 6).unwrap().as_deref(), Some(git));
        assert_eq!(checksum_of(&p, sha, 6).unwrap().as_deref(), Some(sha));
        assert_eq!(checksum_of(&p, "opaque-etag", 6).unwrap(), None);
        // Of the lengths of a checksum but not hex: opaque too.
        assert_eq!(checksum_of(&p, &"g".repeat(64), 6).unwrap(), None);
        assert_eq!(checksum_of(&p, &"g".repeat(40), 6).unwrap(), None);
    }

    #[test]
    fn commits_and_blob_names_have_their_shapes() {
        assert!(is_commit("0123456789abcdefABCDEF0123456789abcdef01"));
        for bad in ["a".repeat(39), "a".repeat(41), "g".repeat(40), String::new()] {
            assert!(!is_commit(&bad), "{bad}");
        }
        for good in ["5891b5b522d5df086d0ff0b110fbd9d21bb4fc7163af34d08286a2e846f6be03", "a-b_c.d", &"a".repeat(128)] {
            assert!(is_safe_name(good), "{good}");
        }
        for bad in ["", ".", "..", "a/b", "a b", "é", "a\\b", &"a".repeat(129)] {
            assert!(!is_safe_name(bad), "{bad}");
        }
    }
}
