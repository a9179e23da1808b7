//! What lets an interrupted [`crate::build_shards`] continue where it stopped: a journal,
//! `build-progress.json`, rewritten atomically each time a shard is committed, naming the build
//! (settings, every input file's path, size and modification time, the tokenizer) and the shards
//! written so far with their checksums. A later build with the same identity keeps those shards
//! (after checking each against its size and sha256), skips the documents they hold without
//! tokenizing them, and writes the rest; its output is byte for byte that of an uninterrupted
//! build, because shard boundaries depend only on the sequence of documents of each split.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::error::{io_err, Result};
use crate::shard::{sha256_file, write_atomic, ShardInfo, Split};

/// The journal's file name inside the output directory.
pub const PROGRESS_FILE: &str = "build-progress.json";

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
}

/// A build's identity: the data settings, the input files (path, size, mtime) and where the
/// tokenizer came from (`train`, or the fingerprint of the one given).
pub(crate) fn identity(config: &impl serde::Serialize, files: &[PathBuf], tokenizer: &str) -> serde_json::Value {
    let stamps: Vec<serde_json::Value> = files.iter().map(|f| crate::source::file_stamp(f)).collect();
    serde_json::json!({
        "format_version": crate::shard::FORMAT_VERSION,
        "config": config,
        "inputs": stamps,
        "tokenizer": tokenizer,
    })
}

/// `sha256:<hex>` of `value`'s JSON (serde_json writes object keys in a fixed order).
pub(crate) fn digest(value: &serde_json::Value) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(value.to_string().as_bytes())))
}

impl Journal {
    /// The journal in `dir`, if there is a readable one (an unreadable one is ignored: the build
    /// then starts over).
    pub fn load(dir: &Path) -> Option<Self> {
        let bytes = std::fs::read(dir.join(PROGRESS_FILE)).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    /// Writes the journal into `dir` atomically.
    pub fn save(&self, dir: &Path) -> Result<()> {
        let path = dir.join(PROGRESS_FILE);
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

/// Removes an earlier build's `manifest.json` (the directory is complete again only when this
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
                || name.starts_with(PROGRESS_FILE));
        if (shard && !keep.iter().any(|k| k.file == name)) || temp || name == crate::shard::MANIFEST {
            std::fs::remove_file(e.path()).map_err(io_err(e.path()))?;
        }
    }
    Ok(())
}
