//! A stand-in for the Hugging Face Hub on loopback, shared by the hub tests of the data crate
//! and of the CLI (`#[path]`-included): the hub's `resolve` endpoint (HEAD with `X-Repo-Commit`
//! and ETag headers, LFS files redirected to a CDN on another origin, ranges), the `revision`
//! listing API, relative redirects of renamed repositories, the hub's error codes, gated
//! repositories, and faults on request (a cut connection, flipped bytes, ignored ranges, a size
//! announced wrong, answers of HTTP 429 or 5xx). It records every request it sees.
#![allow(dead_code, clippy::unwrap_used)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use patchlm_data::hub::{Hub, HubOptions};
use sha2::Digest;

pub const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";
pub const OLD_COMMIT: &str = "fedcba9876543210fedcba9876543210fedcba98";

pub struct FakeFile {
    pub bytes: Vec<u8>,
    pub lfs: bool,
}

#[derive(Default)]
pub struct FakeRepo {
    pub files: HashMap<String, FakeFile>,
    /// Commits by revision name, besides `COMMIT` itself.
    pub refs: HashMap<String, String>,
    pub token: Option<String>,
}

/// One request as the server saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub range: Option<String>,
    pub auth: Option<String>,
}

#[derive(Default)]
pub struct State {
    pub repos: HashMap<String, FakeRepo>,
    /// Old repository ids that the hub redirects (relative) to new ones.
    pub renamed: HashMap<String, String>,
    pub seen: Mutex<Vec<Seen>>,
    /// Cut the next CDN body after this many bytes (0: don't).
    pub cut_after: AtomicUsize,
    /// Cut every CDN body after this many bytes (0: don't).
    pub cut_every: AtomicUsize,
    /// Serve CDN bodies with one byte flipped.
    pub corrupt: AtomicBool,
    /// Ignore Range headers.
    pub no_ranges: AtomicBool,
    /// Announce LFS files this many bytes longer than they are.
    pub announce_extra: AtomicUsize,
    /// Wait this many milliseconds before sending a file's body.
    pub cdn_delay_ms: AtomicUsize,
    /// Answers given instead of the real one, each once, to the first request of its method
    /// (`HEAD`, `GET`), hub and CDN alike: (method, HTTP status, `Retry-After`).
    pub throttle: Mutex<Vec<(&'static str, u16, Option<&'static str>)>>,
}

pub struct FakeHub {
    pub state: Arc<State>,
    pub url: String,
}

/// git's blob id of `b`, from git itself (an independent implementation of the sha1 the
/// library computes; git is wherever the repository was cloned).
pub fn git_sha1(b: &[u8]) -> String {
    let mut child = std::process::Command::new("git")
        .args(["hash-object", "--stdin"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("git is needed to compute blob ids");
    child.stdin.take().unwrap().write_all(b).unwrap();
    let out = child.wait_with_output().unwrap();
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

pub fn sha256(b: &[u8]) -> String {
    hex::encode(sha2::Sha256::digest(b))
}

impl FakeHub {
    /// The hub and its CDN on two listeners (two origins, as on the real hub).
    pub fn start(state: State) -> Self {
        let hub = TcpListener::bind("127.0.0.1:0").unwrap();
        let cdn = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", hub.local_addr().unwrap());
        let cdn_url = format!("http://{}", cdn.local_addr().unwrap());
        let state = Arc::new(state);
        for listener in [hub, cdn] {
            let s = state.clone();
            let (hub_url, cdn_url) = (url.clone(), cdn_url.clone());
            std::thread::spawn(move || {
                for conn in listener.incoming() {
                    let Ok(conn) = conn else { continue };
                    let s = s.clone();
                    let (hub_url, cdn_url) = (hub_url.clone(), cdn_url.clone());
                    std::thread::spawn(move || serve(conn, &s, &hub_url, &cdn_url));
                }
            });
        }
        Self { state, url }
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.state.seen.lock().unwrap().clone()
    }

    pub fn clear(&self) {
        self.state.seen.lock().unwrap().clear();
    }

    pub fn hub(&self, cache: &Path) -> Hub {
        Hub::new(HubOptions { progress: false, ..HubOptions::new(&self.url, cache) })
    }
}

fn respond(conn: &mut TcpStream, status: u16, headers: &[(String, String)], body: &[u8], head: bool) {
    let mut s = format!("HTTP/1.1 {status} X\r\nConnection: close\r\n");
    let mut has_len = false;
    for (k, v) in headers {
        has_len |= k.eq_ignore_ascii_case("content-length");
        s += &format!("{k}: {v}\r\n");
    }
    if !has_len {
        s += &format!("Content-Length: {}\r\n", body.len());
    }
    s += "\r\n";
    let _ = conn.write_all(s.as_bytes());
    if !head {
        let _ = conn.write_all(body);
    }
}

fn body_with_range(
    conn: &mut TcpStream,
    st: &State,
    range: Option<&str>,
    bytes: &[u8],
    mut extra: Vec<(String, String)>,
) {
    let mut bytes = bytes.to_vec();
    if st.corrupt.load(Ordering::SeqCst) && !bytes.is_empty() {
        bytes[0] ^= 1;
    }
    let from = range
        .filter(|_| !st.no_ranges.load(Ordering::SeqCst))
        .and_then(|r| r.strip_prefix("bytes="))
        .and_then(|r| r.strip_suffix('-'))
        .and_then(|n| n.parse::<usize>().ok());
    let (status, part) = match from {
        Some(f) if f >= bytes.len() => (416, &bytes[..0]),
        Some(f) => {
            extra.push(("Content-Range".into(), format!("bytes {f}-{}/{}", bytes.len() - 1, bytes.len())));
            (206, &bytes[f..])
        }
        None => (200, &bytes[..]),
    };
    std::thread::sleep(std::time::Duration::from_millis(st.cdn_delay_ms.load(Ordering::SeqCst) as u64));
    let cut = match st.cut_after.swap(0, Ordering::SeqCst) {
        0 => st.cut_every.load(Ordering::SeqCst),
        once => once,
    };
    if cut > 0 && cut < part.len() {
        // Announce the whole body, send part of it, hang up.
        extra.push(("Content-Length".into(), part.len().to_string()));
        respond(conn, status, &extra, &part[..cut], false);
        let _ = conn.shutdown(std::net::Shutdown::Both);
        return;
    }
    respond(conn, status, &extra, part, false);
}

fn serve(mut conn: TcpStream, st: &State, hub: &str, cdn: &str) {
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    let mut line = String::new();
    if reader.read_line(&mut line).is_err() {
        return;
    }
    let mut parts = line.split_whitespace();
    let (method, target) = (parts.next().unwrap_or("").to_string(), parts.next().unwrap_or("").to_string());
    let mut headers = HashMap::new();
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h).is_err() || h.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.insert(k.trim().to_lowercase(), v.trim().to_string());
        }
    }
    st.seen.lock().unwrap().push(Seen {
        method: method.clone(),
        path: target.clone(),
        range: headers.get("range").cloned(),
        auth: headers.get("authorization").cloned(),
    });
    let head = method == "HEAD";
    let throttled = {
        let mut queue = st.throttle.lock().unwrap();
        queue.iter().position(|(m, ..)| *m == method).map(|i| queue.remove(i))
    };
    if let Some((_, status, after)) = throttled {
        let h: Vec<(String, String)> = after.map(|a| ("Retry-After".to_string(), a.to_string())).into_iter().collect();
        return respond(&mut conn, status, &h, b"", head);
    }
    let (path, query) = target.split_once('?').unwrap_or((&target, ""));
    let decode = |s: &str| s.replace("%2F", "/").replace("%20", " ");
    if let Some(sha) = path.strip_prefix("/cdn/") {
        let bytes =
            st.repos.values().flat_map(|r| r.files.values()).find(|f| sha256(&f.bytes) == sha).map(|f| f.bytes.clone());
        match bytes {
            Some(b) => body_with_range(&mut conn, st, headers.get("range").map(String::as_str), &b, vec![]),
            None => respond(&mut conn, 404, &[], b"", head),
        }
        return;
    }
    let (api, rest) = match path.strip_prefix("/api/") {
        Some(r) => (true, r.to_string()),
        None => (false, path.trim_start_matches('/').to_string()),
    };
    let (kind_prefix, rest) = if api {
        match rest.split_once('/') {
            Some(("datasets", r)) => ("datasets/", r.to_string()),
            Some(("models", r)) => ("", r.to_string()),
            _ => return respond(&mut conn, 404, &[], b"", head),
        }
    } else if let Some(r) = rest.strip_prefix("datasets/") {
        ("datasets/", r.to_string())
    } else {
        ("", rest)
    };
    let segs: Vec<&str> = rest.splitn(5, '/').collect();
    if segs.len() < 4 {
        return respond(&mut conn, 404, &[("X-Error-Code".into(), "RepoNotFound".into())], b"", head);
    }
    let id = format!("{}{}/{}", kind_prefix, segs[0], segs[1]);
    if let Some(new) = st.renamed.get(&id) {
        let loc = format!("/{}{}", new, &path[1 + id.len()..]);
        return respond(&mut conn, 307, &[("Location".into(), loc)], b"", head);
    }
    let Some(repo) = st.repos.get(&id) else {
        return respond(&mut conn, 404, &[("X-Error-Code".into(), "RepoNotFound".into())], b"", head);
    };
    if let Some(t) = &repo.token {
        if headers.get("authorization") != Some(&format!("Bearer {t}")) {
            return respond(&mut conn, 401, &[("X-Error-Message".into(), "gated repo".into())], b"", head);
        }
    }
    let rev = decode(segs[3]);
    let commit = if rev == COMMIT { Some(COMMIT.to_string()) } else { repo.refs.get(&rev).cloned() };
    let Some(commit) = commit else {
        return respond(&mut conn, 404, &[("X-Error-Code".into(), "RevisionNotFound".into())], b"", head);
    };
    match (api, segs[2]) {
        (true, "revision") => {
            let siblings: Vec<serde_json::Value> = repo
                .files
                .iter()
                .map(|(p, f)| {
                    let mut v = serde_json::json!({"rfilename": p, "size": f.bytes.len()});
                    if f.lfs {
                        v["lfs"] = serde_json::json!({"sha256": sha256(&f.bytes), "size": f.bytes.len()});
                    }
                    v
                })
                .collect();
            let body = serde_json::json!({"id": id, "sha": commit, "siblings": siblings}).to_string();
            respond(&mut conn, 200, &[], body.as_bytes(), head);
        }
        (true, "tree") => {
            // Files (and the folders above them) under the folder, recursively, two entries a
            // page, the next page linked as the hub does.
            let folder = segs.get(4).map(|f| decode(f)).unwrap_or_default();
            let inside =
                |p: &str| folder.is_empty() || p.strip_prefix(folder.as_str()).is_some_and(|r| r.starts_with('/'));
            let mut entries: Vec<serde_json::Value> = Vec::new();
            let mut dirs = std::collections::BTreeSet::new();
            for (p, f) in &repo.files {
                if !inside(p) {
                    continue;
                }
                let mut e =
                    serde_json::json!({"type": "file", "path": p, "size": f.bytes.len(), "oid": git_sha1(&f.bytes)});
                if f.lfs {
                    e["lfs"] = serde_json::json!({"oid": sha256(&f.bytes), "size": f.bytes.len(), "pointerSize": 134});
                }
                entries.push(e);
                let mut d = p.as_str();
                while let Some((parent, _)) = d.rsplit_once('/') {
                    if inside(parent) {
                        dirs.insert(parent.to_string());
                    }
                    d = parent;
                }
            }
            if entries.is_empty() && !folder.is_empty() {
                return respond(&mut conn, 404, &[("X-Error-Code".into(), "EntryNotFound".into())], b"", head);
            }
            for d in dirs {
                entries.push(serde_json::json!({"type": "directory", "path": d, "oid": "0"}));
            }
            entries.sort_by(|a, b| a["path"].as_str().cmp(&b["path"].as_str()));
            let cursor: usize =
                query.split('&').find_map(|kv| kv.strip_prefix("cursor=")).and_then(|c| c.parse().ok()).unwrap_or(0);
            let page: Vec<_> = entries.iter().skip(cursor).take(2).cloned().collect();
            let mut h = Vec::new();
            if cursor + 2 < entries.len() {
                let next = format!("{hub}{path}?recursive=true&expand=false&cursor={}", cursor + 2);
                h.push(("Link".to_string(), format!("<{next}>; rel=\"next\"")));
            }
            respond(&mut conn, 200, &h, serde_json::Value::Array(page).to_string().as_bytes(), head);
        }
        (false, "resolve") => {
            let file = segs.get(4).map(|f| decode(f)).unwrap_or_default();
            let Some(f) = repo.files.get(&file) else {
                let h = [("X-Error-Code".into(), "EntryNotFound".into()), ("X-Repo-Commit".into(), commit)];
                return respond(&mut conn, 404, &h, b"", head);
            };
            let mut h = vec![("X-Repo-Commit".to_string(), commit)];
            if f.lfs {
                let sha = sha256(&f.bytes);
                h.push(("X-Linked-Etag".into(), format!("\"{sha}\"")));
                let announced = f.bytes.len() + st.announce_extra.load(Ordering::SeqCst);
                h.push(("X-Linked-Size".into(), announced.to_string()));
                h.push(("ETag".into(), "\"pointer-etag\"".into()));
                h.push(("Location".into(), format!("{cdn}/cdn/{sha}")));
                respond(&mut conn, 302, &h, b"", head);
            } else {
                h.push(("ETag".into(), format!("\"{}\"", git_sha1(&f.bytes))));
                if head {
                    h.push(("Content-Length".into(), f.bytes.len().to_string()));
                    respond(&mut conn, 200, &h, b"", true);
                } else {
                    body_with_range(&mut conn, st, headers.get("range").map(String::as_str), &f.bytes, h);
                }
            }
        }
        _ => respond(&mut conn, 404, &[], b"", head),
    }
}

/// A repository holding `files` (path, bytes, stored in LFS), `main` at `COMMIT`, `v1` at
/// `OLD_COMMIT`.
pub fn repo_with(files: &[(&str, &[u8], bool)]) -> FakeRepo {
    let mut r = FakeRepo::default();
    for (p, b, lfs) in files {
        r.files.insert(p.to_string(), FakeFile { bytes: b.to_vec(), lfs: *lfs });
    }
    r.refs.insert("main".into(), COMMIT.into());
    r.refs.insert("v1".into(), OLD_COMMIT.into());
    r
}
