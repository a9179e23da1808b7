//! Arrow IPC shards (one row per document, a `tokens` list column) and their `manifest.json`.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow_array::{ArrayRef, ListArray, RecordBatch, UInt16Array, UInt32Array};
use arrow_buffer::OffsetBuffer;
use arrow_schema::{DataType, Field, Schema};
use sha2::{Digest, Sha256};

use crate::error::{io_err, DataError, Result};
use crate::source::SourceStats;
use crate::tokenizer::SpecialTokens;

/// Version of the shard + manifest format written by this crate.
pub const FORMAT_VERSION: u32 = 1;
/// Revision of what a build makes of given inputs and settings: the documents read from them,
/// the tokenizer trained on them, their ids and their split. Raised whenever a change to this
/// crate (or to the `tokenizers` it builds with) would make other shards of the same inputs, so
/// that shards an earlier revision made are made again (by `build_shards`, and by `pretrain`'s
/// shard cache) instead of being reused. It is not the file format ([`FORMAT_VERSION`]): shards
/// of every revision read the same. The test `a_build_makes_what_its_revision_made` pins what
/// this revision makes of a fixed corpus, so a change it did not announce fails there.
///
/// Revision 2: documents longer than the limit are cut past half of it at whitespace when the
/// only newline is in its first half, and paragraphs and lines are cut too when their end comes
/// in the same read, and an interrupted read is read again instead of ending its file.
pub const BUILD_REVISION: u32 = 2;
/// The manifest's file name.
pub const MANIFEST: &str = "manifest.json";
/// The tokenizer's file name beside the shards.
pub const TOKENIZER_FILE: &str = "tokenizer.json";
/// Default target shard size in MiB.
pub const DEFAULT_SHARD_MB: u64 = 256;
/// Tokens per Arrow record batch inside a shard (1 Mi).
pub const BATCH_TOKENS: usize = 1 << 20;

/// Element type of the `tokens` column.
#[derive(Debug, Clone, Copy, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum TokenDtype {
    /// Vocabularies of at most 65,536 ids.
    Uint16,
    /// Larger vocabularies.
    Uint32,
}

impl TokenDtype {
    /// The narrowest dtype holding ids `0..vocab_size`.
    pub fn for_vocab(vocab_size: usize) -> Self {
        if vocab_size <= 1 << 16 {
            TokenDtype::Uint16
        } else {
            TokenDtype::Uint32
        }
    }

    /// The Arrow type of one token.
    pub fn arrow(self) -> DataType {
        match self {
            TokenDtype::Uint16 => DataType::UInt16,
            TokenDtype::Uint32 => DataType::UInt32,
        }
    }

    /// Lower-case name (`uint16`, `uint32`).
    pub fn name(self) -> &'static str {
        match self {
            TokenDtype::Uint16 => "uint16",
            TokenDtype::Uint32 => "uint32",
        }
    }

    fn max(self) -> u64 {
        match self {
            TokenDtype::Uint16 => u16::MAX as u64,
            TokenDtype::Uint32 => u32::MAX as u64,
        }
    }
}

/// Which part of the data a shard holds.
#[derive(Debug, Clone, Copy, serde::Serialize, serde::Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    /// Training documents.
    Train,
    /// Held-out documents.
    Val,
}

impl Split {
    /// `train` or `val`.
    pub fn name(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Val => "val",
        }
    }
}

/// One shard file as recorded in the manifest.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct ShardInfo {
    /// Train or validation.
    pub split: Split,
    /// File name relative to the manifest's directory.
    pub file: String,
    /// Documents (rows).
    pub rows: u64,
    /// Tokens in the shard.
    pub tokens: u64,
    /// File size in bytes.
    pub bytes: u64,
    /// `sha256:<hex>` of the file.
    pub sha256: String,
}

/// `manifest.json`: everything needed to read and trust a directory of shards.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct Manifest {
    /// Always `patchlm-shards`.
    pub format: String,
    /// [`FORMAT_VERSION`] of the writer.
    pub format_version: u32,
    /// [`BUILD_REVISION`] of the build that made the shards (1 in manifests written before it
    /// was recorded, by builds that made what revision 1 makes).
    #[serde(default = "first_revision")]
    pub build_revision: u32,
    /// `sha256:<hex>` of the tokenizer's canonical serialization.
    pub tokenizer_fingerprint: String,
    /// One past the largest token id.
    pub vocab_size: usize,
    /// Element type of the `tokens` column.
    pub dtype: TokenDtype,
    /// Special token ids.
    pub special_tokens: SpecialTokens,
    /// Fraction of documents held out for validation.
    pub val_fraction: f64,
    /// Seed of the hash-based split.
    pub split_seed: u64,
    /// Counters from the sources.
    pub source: SourceStats,
    /// The shard files, train first, in order.
    pub shards: Vec<ShardInfo>,
}

fn first_revision() -> u32 {
    1
}

impl Manifest {
    /// Whether a build of this crate's [`BUILD_REVISION`] would make these shards again from the
    /// same inputs and settings (false: an earlier revision made them, so a cache should not
    /// reuse them).
    pub fn is_current(&self) -> bool {
        self.build_revision == BUILD_REVISION
    }

    /// Reads and validates `dir/manifest.json`.
    pub fn load(dir: &Path) -> Result<Self> {
        let path = dir.join(MANIFEST);
        let bytes = std::fs::read(&path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                DataError::Manifest {
                    path: path.clone(),
                    msg: "not found; is this a shard directory written by `cargo xtask data`?".into(),
                }
            } else {
                DataError::Io { path: path.clone(), source: e }
            }
        })?;
        let m: Manifest = serde_json::from_slice(&bytes)
            .map_err(|e| DataError::Manifest { path: path.clone(), msg: format!("invalid manifest: {e}") })?;
        if m.format != "patchlm-shards" || m.format_version != FORMAT_VERSION {
            return Err(DataError::Manifest {
                path,
                msg: format!(
                    "format {} v{} is not supported (this build reads patchlm-shards v{FORMAT_VERSION})",
                    m.format, m.format_version
                ),
            });
        }
        Ok(m)
    }

    /// Writes `dir/manifest.json` atomically.
    pub fn save(&self, dir: &Path) -> Result<()> {
        let json = serde_json::to_vec_pretty(self)
            .map_err(|e| DataError::Manifest { path: dir.join(MANIFEST), msg: format!("cannot serialize: {e}") })?;
        write_atomic(&dir.join(MANIFEST), &json)
    }

    /// Total tokens in a split.
    pub fn tokens(&self, split: Split) -> u64 {
        self.shards.iter().filter(|s| s.split == split).map(|s| s.tokens).sum()
    }

    /// Total documents in a split.
    pub fn documents(&self, split: Split) -> u64 {
        self.shards.iter().filter(|s| s.split == split).map(|s| s.rows).sum()
    }

    /// Errors unless `fingerprint` is the one the shards were made with.
    pub fn check_tokenizer(&self, dir: &Path, fingerprint: &str) -> Result<()> {
        if self.tokenizer_fingerprint != fingerprint {
            return Err(DataError::TokenizerMismatch {
                path: dir.join(MANIFEST),
                manifest: self.tokenizer_fingerprint.clone(),
                given: fingerprint.to_string(),
            });
        }
        Ok(())
    }
}

/// Holds an exclusive lock (`flock`) on `path`, created if need be, until the returned file is
/// dropped. When another process holds it, says so on stderr (`waiting for {waiting} to finish`)
/// and waits. Where the file system cannot lock, warns and returns `None`: the work goes ahead
/// unlocked (`{unlocked}` names it in the warning).
pub(crate) fn lock_exclusive(path: &Path, waiting: &str, unlocked: &str) -> Result<Option<File>> {
    let mut open = std::fs::OpenOptions::new();
    open.create(true).truncate(false).write(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut open, 0o664);
    let f = open.open(path).map_err(io_err(path))?;
    match f.try_lock() {
        Ok(()) => return Ok(Some(f)),
        Err(std::fs::TryLockError::WouldBlock) => {}
        Err(std::fs::TryLockError::Error(e)) => {
            eprintln!("warning: cannot lock {} ({e}); {unlocked} without a lock", path.display());
            return Ok(None);
        }
    }
    eprintln!("waiting for {waiting} to finish (it holds {})", path.display());
    f.lock().map_err(io_err(path))?;
    Ok(Some(f))
}

/// Writes `bytes` to `path` atomically: a temp file beside it, fsync, rename, fsync the directory.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut w = AtomicFile::create(path)?;
    w.write_all(bytes).map_err(io_err(path))?;
    w.commit()?;
    Ok(())
}

/// A temp file's name beside `path`, unique to this process and call
/// (`<path>.<pid>-<n>.tmp`), so that concurrent writers of one path, threads or processes,
/// never write into each other's temp files: the last rename wins, whole.
pub(crate) fn temp_beside(path: &Path) -> PathBuf {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".{}-{n}.tmp", std::process::id()));
    PathBuf::from(tmp)
}

/// A file written to a temp file beside its path (`<path>.<pid>-<n>.tmp`) and renamed into
/// place by [`AtomicFile::commit`], hashing (sha256) and counting what passes through. Dropped
/// without commit, the temp file is removed.
pub struct AtomicFile {
    path: PathBuf,
    tmp: PathBuf,
    inner: Option<BufWriter<File>>,
    hasher: Sha256,
    bytes: u64,
}

impl AtomicFile {
    /// Creates the temp file beside `path`.
    pub fn create(path: &Path) -> Result<Self> {
        let tmp = temp_beside(path);
        let f = File::create(&tmp).map_err(io_err(&tmp))?;
        Ok(Self {
            path: path.to_path_buf(),
            tmp,
            inner: Some(BufWriter::with_capacity(1 << 20, f)),
            hasher: Sha256::new(),
            bytes: 0,
        })
    }

    /// Flushes, fsyncs and renames into place; returns (bytes, `sha256:<hex>`).
    pub fn commit(mut self) -> Result<(u64, String)> {
        let w = self
            .inner
            .take()
            .ok_or_else(|| DataError::Shard { path: self.path.clone(), msg: "already committed".into() })?;
        let f = w.into_inner().map_err(|e| DataError::Io { path: self.tmp.clone(), source: e.into_error() })?;
        f.sync_all().map_err(io_err(&self.tmp))?;
        drop(f);
        std::fs::rename(&self.tmp, &self.path).map_err(io_err(&self.path))?;
        if let Some(dir) = self.path.parent() {
            if let Ok(d) = File::open(dir) {
                let _ = d.sync_all();
            }
        }
        let digest = std::mem::take(&mut self.hasher).finalize();
        Ok((self.bytes, format!("sha256:{}", hex::encode(digest))))
    }
}

impl Write for AtomicFile {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let w = self.inner.as_mut().ok_or_else(|| std::io::Error::other("file already committed"))?;
        let n = w.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self.inner.as_mut() {
            Some(w) => w.flush(),
            None => Ok(()),
        }
    }
}

impl Drop for AtomicFile {
    fn drop(&mut self) {
        if self.inner.is_some() {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// The Arrow schema of a shard.
pub fn shard_schema(dtype: TokenDtype) -> Arc<Schema> {
    Arc::new(Schema::new(vec![Field::new(
        "tokens",
        DataType::List(Arc::new(Field::new("item", dtype.arrow(), false))),
        false,
    )]))
}

/// SHA-256 of `bytes` as `sha256:<hex>`, the form of every checksum and fingerprint here.
pub fn sha256_bytes(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// SHA-256 of a file, streamed, as `sha256:<hex>`.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut f = File::open(path).map_err(io_err(path))?;
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h).map_err(io_err(path))?;
    Ok(format!("sha256:{}", hex::encode(h.finalize())))
}

/// What identifies the shards in `dir`: the SHA-256 of their `manifest.json` (every shard's
/// sha256, the tokenizer's fingerprint, the split's settings), as `sha256:<hex>`. Shards built
/// from other text, with another tokenizer or split, have another.
pub fn shards_identity(dir: &Path) -> Result<String> {
    sha256_file(&dir.join(MANIFEST))
}

/// Writes the shards of one split: `<split>-00000.arrow`, `<split>-00001.arrow`, ... each rolled
/// over once it reaches the target size.
pub struct ShardWriter {
    dir: PathBuf,
    split: Split,
    dtype: TokenDtype,
    vocab_size: usize,
    target_bytes: u64,
    schema: Arc<Schema>,
    current: Option<(arrow_ipc::writer::FileWriter<AtomicFile>, String, u64, u64)>,
    offsets: Vec<i32>,
    values: Vec<u32>,
    done: Vec<ShardInfo>,
}

impl ShardWriter {
    /// A writer into `dir` for `split`.
    pub fn new(dir: &Path, split: Split, dtype: TokenDtype, vocab_size: usize, target_bytes: u64) -> Self {
        Self {
            dir: dir.to_path_buf(),
            split,
            dtype,
            vocab_size,
            target_bytes: target_bytes.max(1),
            schema: shard_schema(dtype),
            current: None,
            offsets: vec![0],
            values: Vec::new(),
            done: Vec::new(),
        }
    }

    /// A writer that continues after `done`, the shards of `split` an interrupted build already
    /// committed in `dir`: the next shard is numbered `done.len()`, and [`ShardWriter::finish`]
    /// returns `done` followed by the new ones.
    pub fn resuming(
        dir: &Path,
        split: Split,
        dtype: TokenDtype,
        vocab_size: usize,
        target_bytes: u64,
        done: Vec<ShardInfo>,
    ) -> Self {
        Self { done, ..Self::new(dir, split, dtype, vocab_size, target_bytes) }
    }

    /// The shards committed so far (renamed into place, checksummed).
    pub fn committed(&self) -> &[ShardInfo] {
        &self.done
    }

    /// Appends one document.
    pub fn push(&mut self, tokens: &[u32]) -> Result<()> {
        let max = self.dtype.max();
        if let Some(&id) = tokens.iter().find(|&&t| t as u64 > max) {
            return Err(DataError::TokenRange { id, dtype: self.dtype.name(), vocab: self.vocab_size });
        }
        self.values.extend_from_slice(tokens);
        self.offsets.push(self.values.len() as i32);
        // A batch never exceeds the shard target, so small targets roll over as asked.
        let width = if self.dtype == TokenDtype::Uint16 { 2 } else { 4 };
        let limit = BATCH_TOKENS.min((self.target_bytes / width) as usize).max(1);
        if self.values.len() >= limit {
            self.flush_batch()?;
        }
        Ok(())
    }

    fn flush_batch(&mut self) -> Result<()> {
        if self.offsets.len() <= 1 {
            return Ok(());
        }
        if self.current.is_none() {
            let file = format!("{}-{:05}.arrow", self.split.name(), self.done.len());
            let path = self.dir.join(&file);
            let af = AtomicFile::create(&path)?;
            let w = arrow_ipc::writer::FileWriter::try_new(af, &self.schema)
                .map_err(|e| DataError::Shard { path: path.clone(), msg: e.to_string() })?;
            self.current = Some((w, file, 0, 0));
        }
        let values: ArrayRef = match self.dtype {
            TokenDtype::Uint16 => Arc::new(UInt16Array::from_iter_values(self.values.iter().map(|&t| t as u16))),
            TokenDtype::Uint32 => Arc::new(UInt32Array::from_iter_values(self.values.iter().copied())),
        };
        let offsets = OffsetBuffer::new(std::mem::replace(&mut self.offsets, vec![0]).into());
        let rows = offsets.len() as u64 - 1;
        let ntok = self.values.len() as u64;
        self.values.clear();
        let item = Arc::new(Field::new("item", self.dtype.arrow(), false));
        let list = ListArray::try_new(item, offsets, values, None)
            .map_err(|e| DataError::Shard { path: self.dir.clone(), msg: e.to_string() })?;
        let batch = RecordBatch::try_new(self.schema.clone(), vec![Arc::new(list)])
            .map_err(|e| DataError::Shard { path: self.dir.clone(), msg: e.to_string() })?;
        let Some((w, file, r, t)) = self.current.as_mut() else { return Ok(()) };
        w.write(&batch).map_err(|e| DataError::Shard { path: self.dir.join(&*file), msg: e.to_string() })?;
        *r += rows;
        *t += ntok;
        // Roll over once the shard reaches its target (2 bytes or 4 per token, plus offsets).
        let width = if self.dtype == TokenDtype::Uint16 { 2 } else { 4 };
        if *t * width >= self.target_bytes {
            self.finish_shard()?;
        }
        Ok(())
    }

    fn finish_shard(&mut self) -> Result<()> {
        let Some((mut w, file, rows, tokens)) = self.current.take() else { return Ok(()) };
        let path = self.dir.join(&file);
        w.finish().map_err(|e| DataError::Shard { path: path.clone(), msg: e.to_string() })?;
        let af = w.into_inner().map_err(|e| DataError::Shard { path: path.clone(), msg: e.to_string() })?;
        let (bytes, sha256) = af.commit()?;
        self.done.push(ShardInfo { split: self.split, file, rows, tokens, bytes, sha256 });
        Ok(())
    }

    /// Flushes and closes the last shard; returns every shard written.
    pub fn finish(mut self) -> Result<Vec<ShardInfo>> {
        self.flush_batch()?;
        self.finish_shard()?;
        Ok(self.done)
    }
}
