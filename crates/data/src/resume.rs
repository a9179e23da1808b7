//! What lets an interrupted [`crate::build_shards`] continue where it stopped: a journal,
//! `build-progress.json`, rewritten atomically each time a shard is committed, naming the build
//! (settings, every input file's path, size and modification time, the tokenizer) and the shards
//! written so far with their checksums. A later build with the same identity keeps those shards
//! (after checking each against its size and sha256), skips the documents they hold without
//! tokenizing them, and writes the rest; its output is byte for byte that of an uninterrupted
//! build, because shard boundaries depend only on the sequence of documents of each split.

use std::path::{Path, PathBuf};

use crate::error::{io_err, Result};
use crate::shard::{sha256_file, write_atomic, ShardInfo, Split};

/// The journal's file name inside the output directory.
pub const PROGRESS_FILE: &str = "build-progress.json";
/// A finished build's identity and shards, beside its manifest (which stays free of machine
/// details such as file times, so that it is the same wherever the same text is built).
pub const BUILD_FILE: &str = "build.json";
/// The lock a build holds on its output directory, so that two builds into one directory (two
/// runs of the same data settings started at once) take turns.
pub(crate) const LOCK_FILE: &str = ".build.lock";

/// The journal of a build in progress.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub(crate) struct Journal {
    /// `sha256:<hex>` of the identity's canonical JSON: what must match for a build to resume.
    pub identity_sha256: String,
    /// The identity itself, for people reading the file.
    pub identity: serde_json::Value,
    /// Fingerprint of the tokenizer the shards were made with.
    pub tokenizer_fingerprint: String,
    /// Shards committed so far, both splits, each split in order.
    pub shards: Vec<ShardInfo>,
    /// Whether this was read from a finished build's manifest rather than a journal.
    #[serde(skip)]
    pub finished: bool,
}

/// A build's identity: the data settings, the input files (canonical path, size, mtime), where
/// the tokenizer came from (`train`, or the fingerprint of the one given) and the revision of the
/// build ([`crate::shard::BUILD_REVISION`]: a build by another revision starts over). By
/// canonical path, so that a build resumes whichever way its inputs are spelled (`corpus`,
/// `./corpus`, an absolute path, a link to it).
pub(crate) fn identity(config: &impl serde::Serialize, files: &[PathBuf], tokenizer: &str) -> serde_json::Value {
    let stamps: Vec<serde_json::Value> = files
        .iter()
        .map(|f| crate::source::file_stamp(&f.canonicalize().unwrap_or_else(|_| f.to_path_buf())))
        .collect();
    serde_json::json!({
        "format_version": crate::shard::FORMAT_VERSION,
        "build_revision": crate::shard::BUILD_REVISION,
        "config": config,
        "inputs": stamps,
        "tokenizer": tokenizer,
    })
}

/// `sha256:<hex>` of `value`'s JSON (serde_json writes object keys in a fixed order).
pub(crate) fn digest(value: &serde_json::Value) -> String {
    crate::shard::sha256_bytes(value.to_string().as_bytes())
}

impl Journal {
    /// The journal `dir/name`, if there is a readable one (an unreadable one is ignored: the
    /// build then starts over).
    fn load(dir: &Path, name: &str) -> Option<Self> {
        let bytes = std::fs::read(dir.join(name)).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    /// What an interrupted build left (its journal), or else what a finished build wrote: its
    /// identity (`build.json`) with the shards its manifest lists, if this build revision made
    /// them.
    pub fn find(dir: &Path) -> Option<Self> {
        if let Some(j) = Self::load(dir, PROGRESS_FILE) {
            return Some(j);
        }
        let done = Self::load(dir, BUILD_FILE)?;
        let m = crate::shard::Manifest::load(dir).ok()?;
        (m.is_current() && m.shards == done.shards && m.tokenizer_fingerprint == done.tokenizer_fingerprint)
            .then_some(Self { finished: true, ..done })
    }

    /// Writes the journal into `dir/name` atomically.
    pub fn save(&self, dir: &Path, name: &str) -> Result<()> {
        let path = dir.join(name);
        let json = serde_json::to_vec_pretty(self)
            .map_err(|e| crate::DataError::Shard { path: path.clone(), msg: format!("cannot serialize: {e}") })?;
        write_atomic(&path, &json)
    }

    /// The journal's shards of `split` that are still in `dir` whole (size and sha256 as
    /// recorded), up to the first that is not.
    pub fn intact(&self, dir: &Path, split: Split) -> Vec<ShardInfo> {
        let mut kept = Vec::new();
        for (i, s) in self.shards.iter().filter(|s| s.split == split).enumerate() {
            let path = dir.join(&s.file);
            let whole = s.file == format!("{}-{i:05}.arrow", split.name())
                && path.metadata().is_ok_and(|m| m.len() == s.bytes)
                && sha256_file(&path).is_ok_and(|h| h == s.sha256);
            if !whole {
                break;
            }
            kept.push(s.clone());
        }
        kept
    }
}

/// Removes an earlier build's `manifest.json` and `build.json` (the directory is complete again only when this
/// build writes its own), the shard files in `dir` that `keep` does not name, and temp files that
/// writers killed mid-write left behind (`<shard>.<pid>-<n>.tmp`, `manifest.json.<…>.tmp`, …).
pub(crate) fn clear_except(dir: &Path, keep: &[ShardInfo]) -> Result<()> {
    for e in std::fs::read_dir(dir).map_err(io_err(dir))?.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        let shard = (name.starts_with("train-") || name.starts_with("val-")) && name.ends_with(".arrow");
        let temp = name.ends_with(".tmp")
            && (name.starts_with("train-")
                || name.starts_with("val-")
                || name.starts_with(crate::shard::MANIFEST)
                || name.starts_with(crate::shard::TOKENIZER_FILE)
                || name.starts_with(PROGRESS_FILE)
                || name.starts_with(BUILD_FILE));
        let finished = name == crate::shard::MANIFEST || name == BUILD_FILE;
        if (shard && !keep.iter().any(|k| k.file == name)) || temp || finished {
            std::fs::remove_file(e.path()).map_err(io_err(e.path()))?;
        }
    }
    Ok(())
}
