//! Streaming text sources: plain text, directories, JSONL, Parquet, and their gzip and zstd versions.
//!
//! Memory stays bounded whatever the input: files are read in 64 KiB blocks, and a document longer
//! than [`SourceConfig::max_doc_bytes`] is cut into consecutive documents at a line or word
//! boundary, so neither a 10 GB corpus nor a single 500 MB JSONL line is ever held whole.
//! (Parquet stores a row's value in one page, so a Parquet row is bounded by its page.)

use std::collections::VecDeque;
use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow_array::Array;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::ProjectionMask;

use crate::error::{io_err, DataError, Result};

/// Default JSONL / Parquet field that holds the text.
pub const DEFAULT_TEXT_FIELD: &str = "text";
/// Default longest document, in bytes, before it is cut into consecutive documents (8 MiB).
pub const DEFAULT_MAX_DOC_BYTES: usize = 8 << 20;
const BLOCK: usize = 64 << 10;

/// How sources are read.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq)]
#[serde(default)]
pub struct SourceConfig {
    /// JSONL key / Parquet column holding the text (default `text`, [`DEFAULT_TEXT_FIELD`]); a
    /// Parquet field inside a struct column by its dotted path (`meta.text`).
    pub text_field: String,
    /// Longest document in bytes; longer ones are cut at a line or word boundary (default 8 MiB,
    /// [`DEFAULT_MAX_DOC_BYTES`]).
    pub max_doc_bytes: usize,
    /// What bytes that are not UTF-8 in a text or JSON file do (default: an error naming the
    /// file and line).
    pub invalid_utf8: InvalidUtf8,
    /// What one document of a plain text file is (default: the whole file), as the `sample_by`
    /// of Hugging Face `datasets`' text loader.
    pub sample_by: SampleBy,
}

impl Default for SourceConfig {
    fn default() -> Self {
        Self {
            text_field: DEFAULT_TEXT_FIELD.into(),
            max_doc_bytes: DEFAULT_MAX_DOC_BYTES,
            invalid_utf8: InvalidUtf8::Error,
            sample_by: SampleBy::Document,
        }
    }
}

/// What one document of a plain text file is (JSONL and Parquet files have records).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SampleBy {
    /// The whole file (cut every `max_doc_bytes`): books, articles, one work a file.
    #[default]
    Document,
    /// Each run of lines between blank lines (one corpus file of many texts, nanoGPT's
    /// `input.txt`); the blank lines are not part of any document.
    Paragraph,
    /// Each line, without its line break (one text a line).
    Line,
}

/// What invalid UTF-8 in a text or JSON file does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum InvalidUtf8 {
    /// Stop with an error naming the file and line (the default: a file in another encoding is
    /// better re-encoded than read as replacement characters).
    #[default]
    Error,
    /// Replace each maximal invalid sequence with U+FFFD, as Python's `errors="replace"` and
    /// `String::from_utf8_lossy` do (for UTF-8 files with a few stray bytes); the count is in
    /// [`SourceStats::replaced_invalid_utf8`].
    Replace,
}

/// The format of one input file, decided by its extension (after stripping a compression suffix,
/// see [`Compression`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InputKind {
    /// Plain text: the file is one document (cut at `max_doc_bytes`).
    Text,
    /// JSON Lines (one object per line, the text in a configurable field), or a `.json` file
    /// holding one array of such objects, as Hugging Face `datasets` reads both.
    Jsonl,
    /// Apache Parquet with a column holding the text: strings (plain, large or view) or UTF-8
    /// bytes, either of them dictionary-encoded; any codec (snappy, gzip, zstd, lz4, brotli).
    Parquet,
}

/// How an input file is compressed as a whole, by its last extension (or, for text and JSON
/// files named without one, by its first bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// Not compressed.
    None,
    /// gzip (`.gz`), also several concatenated members.
    Gzip,
    /// Zstandard (`.zst`, `.zstd`), also several concatenated frames, as in The Pile and SlimPajama.
    Zstd,
}

impl Compression {
    /// `name` without its compression suffix, and the compression that suffix names.
    pub fn split(name: &str) -> (&str, Compression) {
        let lower = name.to_ascii_lowercase();
        for (suffix, c) in [(".gz", Compression::Gzip), (".zst", Compression::Zstd), (".zstd", Compression::Zstd)] {
            if lower.ends_with(suffix) {
                return (&name[..name.len() - suffix.len()], c);
            }
        }
        (name, Compression::None)
    }

    /// The compression of a file whose name names none, from its first bytes: gzip's or
    /// Zstandard's magic number (dictd's `.dz` files are gzip, and downloads get renamed). No
    /// UTF-8 text starts with either, so no text file is mistaken for one.
    fn sniff(reader: &mut impl BufRead, path: &Path) -> Result<Compression> {
        let head = reader.fill_buf().map_err(io_err(path))?;
        Ok(if head.starts_with(&[0x1f, 0x8b]) {
            Compression::Gzip
        } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            Compression::Zstd
        } else {
            Compression::None
        })
    }

    /// The decompressed bytes of `file` (at `path`, for errors).
    fn reader(self, file: impl Read + Send + 'static, path: &Path) -> Result<Box<dyn Read + Send>> {
        Ok(match self {
            Compression::None => Box::new(file),
            Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(file)),
            Compression::Zstd => Box::new(zstd::stream::read::Decoder::new(file).map_err(io_err(path))?),
        })
    }
}

impl InputKind {
    /// The kind of `path` and how it is compressed. Unknown extensions read as text.
    pub fn of(path: &Path) -> (InputKind, Compression) {
        let name = path.file_name().map(|n| n.to_string_lossy().to_lowercase()).unwrap_or_default();
        let (stem, compression) = Compression::split(&name);
        let kind = if stem.ends_with(".jsonl") || stem.ends_with(".ndjson") || stem.ends_with(".json") {
            InputKind::Jsonl
        } else if stem.ends_with(".parquet") {
            InputKind::Parquet
        } else {
            InputKind::Text
        };
        (kind, compression)
    }

    fn known_in_dir(path: &Path) -> bool {
        let name = path.file_name().map(|n| n.to_string_lossy().to_lowercase()).unwrap_or_default();
        let stem = Compression::split(&name).0;
        [".txt", ".text", ".md", ".rst", ".jsonl", ".ndjson", ".json", ".parquet"].iter().any(|e| stem.ends_with(e))
    }
}

/// Expands the inputs: files stay as given, directories are walked recursively (sorted, hidden
/// entries skipped, only files with a known extension: .txt .text .md .rst .jsonl .ndjson .json
/// .parquet, each optionally compressed: .gz, .zst, .zstd). Links are followed, and a folder
/// reached again within one input's walk (a link back up its tree, two links to one folder) is
/// walked once. The output of a patchlm stage in a folder (shards, patch datasets, a run
/// directory: [`OUTPUT_MARKERS`]) is passed over, and named as an input it is an error
/// ([`DataError::OutputFolder`]). A folder in which nothing is read is
/// an error ([`DataError::NothingInFolder`], naming what it holds), as is a link that leads
/// nowhere ([`DataError::BrokenLink`]).
pub fn expand_inputs<P: AsRef<Path>>(inputs: &[P]) -> Result<Vec<PathBuf>> {
    struct Walk {
        files: Vec<PathBuf>,
        passed_over: Vec<PathBuf>,
        walked: std::collections::HashSet<PathBuf>,
    }
    fn walk(dir: &Path, w: &mut Walk) -> Result<()> {
        if !w.walked.insert(dir.canonicalize().map_err(io_err(dir))?) {
            return Ok(());
        }
        let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(io_err(dir))?
            .map(|e| e.map(|e| e.path()).map_err(io_err(dir)))
            .collect::<Result<_>>()?;
        entries.sort();
        for p in entries {
            let hidden = p.file_name().is_some_and(|n| n.to_string_lossy().starts_with('.'));
            if hidden {
                continue;
            }
            check_link(&p)?;
            if p.is_dir() {
                // A stage's output below an input folder (`--input . --out shards`, the build's
                // own while it runs; a run directory) is passed over: its JSON is metadata.
                if is_output_folder(&p) {
                    w.passed_over.push(p);
                } else {
                    walk(&p, w)?;
                }
            } else if InputKind::known_in_dir(&p) {
                w.files.push(p);
            } else {
                w.passed_over.push(p);
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    for p in inputs {
        let p = p.as_ref();
        check_link(p)?;
        if p.is_dir() {
            if is_output_folder(p) {
                return Err(DataError::OutputFolder(p.to_path_buf()));
            }
            let mut w = Walk { files: Vec::new(), passed_over: Vec::new(), walked: Default::default() };
            walk(p, &mut w)?;
            if w.files.is_empty() {
                let n = w.passed_over.len();
                let names: Vec<String> = w
                    .passed_over
                    .iter()
                    .take(4)
                    .map(|f| f.strip_prefix(p).unwrap_or(f).display().to_string())
                    .collect();
                let holds = match n {
                    0 => String::new(),
                    _ if n > names.len() => format!("; it holds {} and {} more", names.join(", "), n - names.len()),
                    _ => format!("; it holds {}", names.join(", ")),
                };
                return Err(DataError::NothingInFolder { path: p.to_path_buf(), holds });
            }
            out.extend(w.files);
        } else if p.is_file() {
            out.push(p.to_path_buf());
        } else if std::fs::metadata(p).is_ok() {
            return Err(DataError::NotAFile(p.to_path_buf()));
        } else {
            return Err(DataError::Missing(p.to_path_buf()));
        }
    }
    Ok(out)
}

/// The files that mark a folder as the output of a patchlm stage, which a walk of an input folder
/// passes over (its JSON files are metadata, not text): a data build's lock, journal and record,
/// a patch dataset's manifest (`patchlm_patch::MANIFEST`) and a training run's lock
/// (`patchlm_train::RUN_LOCK_FILE`).
pub const OUTPUT_MARKERS: [&str; 5] =
    [crate::resume::LOCK_FILE, crate::resume::PROGRESS_FILE, crate::resume::BUILD_FILE, "patch_manifest.json", ".lock"];

/// Whether `dir` is a patchlm stage's output: it holds one of [`OUTPUT_MARKERS`].
fn is_output_folder(dir: &Path) -> bool {
    OUTPUT_MARKERS.iter().any(|f| dir.join(f).exists())
}

/// A symbolic link whose target cannot be reached (missing, or a chain of links that loops) is
/// an error naming the link and its target; anything else passes.
fn check_link(p: &Path) -> Result<()> {
    let Ok(target) = std::fs::read_link(p) else { return Ok(()) };
    match std::fs::metadata(p) {
        Ok(_) => Ok(()),
        Err(e) => {
            let reason = if e.kind() == std::io::ErrorKind::NotFound {
                "does not exist".to_string()
            } else {
                format!("cannot be followed ({e})")
            };
            Err(DataError::BrokenLink { path: p.to_path_buf(), target, reason })
        }
    }
}

/// The files that occur more than once in `files` (the same name in the same folder, the folder
/// by its canonical path: named twice, or by name and through its folder), each once, in order.
/// Their documents would be read as often as they occur. The file itself is not followed: two
/// links to one blob (as the Hugging Face cache stores identical files) are two files.
pub fn repeated_files(files: &[PathBuf]) -> Vec<PathBuf> {
    let mut seen = std::collections::HashMap::new();
    let mut out = Vec::new();
    for f in files {
        let dir = f.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
        let key = match (dir.canonicalize(), f.file_name()) {
            (Ok(d), Some(name)) => d.join(name),
            _ => f.clone(),
        };
        let n = seen.entry(key).or_insert(0usize);
        *n += 1;
        if *n == 2 {
            out.push(f.clone());
        }
    }
    out
}

/// Opens `path` for reading as the text inputs are read: gzip or zstd decompressed (known by a
/// `.gz` / `.zst` / `.zstd` name, or else by the first bytes), a UTF-8 byte-order mark skipped and
/// UTF-16/32 refused by name.
pub fn open_text(path: &Path) -> Result<Box<dyn Read + Send>> {
    let mut file = BufReader::new(File::open(path).map_err(io_err(path))?);
    let compression = match Compression::split(&path.file_name().unwrap_or_default().to_string_lossy()).1 {
        Compression::None => Compression::sniff(&mut file, path)?,
        named => named,
    };
    without_bom(compression.reader(file, path)?, path)
}

/// What identifies a file's contents for a cache key, cheaply: `[path, size, mtime in ns]`
/// (`null` for what cannot be read), so that an edited input is noticed without reading it.
pub fn file_stamp(path: &Path) -> serde_json::Value {
    let meta = path.metadata().ok();
    let mtime = meta
        .as_ref()
        .and_then(|m| m.modified().ok())
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| d.as_nanos() as u64);
    serde_json::json!([path_key(path), meta.map(|m| m.len()), mtime])
}

/// A path as a JSON value that tells all paths apart: its text, or where it is not UTF-8 (a
/// Latin-1 file name on Linux) `{"bytes": "<hex>"}` of its bytes.
fn path_key(path: &Path) -> serde_json::Value {
    if let Some(s) = path.to_str() {
        return s.into();
    }
    #[cfg(unix)]
    let bytes = std::os::unix::ffi::OsStrExt::as_bytes(path.as_os_str()).to_vec();
    #[cfg(not(unix))]
    let bytes = path.to_string_lossy().as_bytes().to_vec();
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    serde_json::json!({ "bytes": hex })
}

/// One document (or one piece of a document longer than the limit).
#[derive(Debug, Clone)]
pub struct Document {
    /// The file it came from.
    pub source: Arc<Path>,
    /// 1-based line (JSONL), row (Parquet) or piece (text) number within the file.
    pub position: u64,
    /// The text.
    pub text: String,
}

/// Counters of what the sources produced and skipped.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct SourceStats {
    /// Files opened.
    pub files: u64,
    /// Documents produced (pieces of cut documents count one each).
    pub documents: u64,
    /// UTF-8 bytes of text produced.
    pub bytes: u64,
    /// Empty or whitespace-only documents skipped (including JSON nulls).
    pub skipped_empty: u64,
    /// Extra documents created by cutting documents longer than the limit.
    pub cut_pieces: u64,
    /// Invalid UTF-8 sequences replaced with U+FFFD ([`InvalidUtf8::Replace`]).
    #[serde(default)]
    pub replaced_invalid_utf8: u64,
}

/// A streaming iterator over the documents of several inputs, in order.
pub struct Documents {
    files: VecDeque<PathBuf>,
    current: Option<Box<dyn FileDocs>>,
    cfg: SourceConfig,
    stats: SourceStats,
    failed: bool,
    /// Invalid UTF-8 sequences replaced so far, counted by the files' [`LossyUtf8`] readers.
    replaced: Arc<std::sync::atomic::AtomicU64>,
}

impl Documents {
    /// Opens `inputs` (files or directories; see [`expand_inputs`]).
    pub fn open<P: AsRef<Path>>(inputs: &[P], cfg: &SourceConfig) -> Result<Self> {
        if cfg.max_doc_bytes < 64 {
            return Err(DataError::Config(format!("max_doc_bytes must be at least 64, got {}", cfg.max_doc_bytes)));
        }
        let files = expand_inputs(inputs)?;
        Ok(Self {
            files: files.into(),
            current: None,
            cfg: cfg.clone(),
            stats: SourceStats::default(),
            failed: false,
            replaced: Arc::default(),
        })
    }

    /// What has been read so far.
    pub fn stats(&self) -> &SourceStats {
        &self.stats
    }

    fn open_file(&self, path: &Path) -> Result<Box<dyn FileDocs>> {
        let (kind, compression) = InputKind::of(path);
        let src: Arc<Path> = Arc::from(path);
        if kind == InputKind::Parquet {
            return Ok(Box::new(ParquetDocs::open(src, compression, &self.cfg.text_field, self.cfg.max_doc_bytes)?));
        }
        let mut reader = open_text(path)?;
        if self.cfg.invalid_utf8 == InvalidUtf8::Replace {
            reader = Box::new(LossyUtf8::new(reader, self.replaced.clone()));
        }
        let pieces = PieceBuf::new(self.cfg.max_doc_bytes);
        Ok(match kind {
            InputKind::Text => Box::new(TextDocs::new(src, reader, pieces, self.cfg.sample_by)),
            _ => Box::new(JsonlDocs::new(src, reader, pieces, self.cfg.text_field.clone())),
        })
    }
}

impl Iterator for Documents {
    type Item = Result<Document>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed {
            return None;
        }
        loop {
            if self.current.is_none() {
                let path = self.files.pop_front()?;
                match self.open_file(&path) {
                    Ok(f) => {
                        self.stats.files += 1;
                        self.current = Some(f);
                    }
                    Err(e) => {
                        self.failed = true;
                        return Some(Err(e));
                    }
                }
            }
            let cur = self.current.as_mut()?;
            match cur.next_piece() {
                Ok(Some(piece)) => {
                    if piece.cut {
                        self.stats.cut_pieces += 1;
                    }
                    if piece.text.trim().is_empty() {
                        self.stats.skipped_empty += 1;
                        continue;
                    }
                    self.stats.documents += 1;
                    self.stats.bytes += piece.text.len() as u64;
                    return Some(Ok(Document { source: cur.source(), position: piece.position, text: piece.text }));
                }
                Ok(None) => {
                    // A file is done: its replacements are all counted.
                    self.current = None;
                    self.stats.replaced_invalid_utf8 = self.replaced.load(std::sync::atomic::Ordering::Relaxed);
                }
                Err(e) => {
                    self.failed = true;
                    return Some(Err(e));
                }
            }
        }
    }
}

struct Piece {
    text: String,
    position: u64,
    /// True when this piece ends at a cut rather than at the end of its document.
    cut: bool,
}

trait FileDocs: Send {
    fn next_piece(&mut self) -> Result<Option<Piece>>;
    fn source(&self) -> Arc<Path>;
}

/// Accumulates the bytes of one document and cuts it at the size limit.
struct PieceBuf {
    buf: Vec<u8>,
    max: usize,
}

impl PieceBuf {
    fn new(max: usize) -> Self {
        Self { buf: Vec::new(), max }
    }

    /// If the buffer holds more than the limit, cuts a piece at the last newline (else the last
    /// whitespace) past half the limit, else before the character that crosses the limit, and
    /// returns it. A buffer of exactly the limit is left whole: its document may end there.
    fn take_full(&mut self) -> Option<Vec<u8>> {
        if self.buf.len() <= self.max {
            return None;
        }
        let window = &self.buf[..self.max];
        // Just after the last byte that `pred` takes, if that is past half the limit.
        let after = |pred: fn(&u8) -> bool| window.iter().rposition(pred).map(|i| i + 1).filter(|&i| i > self.max / 2);
        let cut = after(|&b| b == b'\n').or_else(|| after(u8::is_ascii_whitespace)).unwrap_or_else(|| {
            let mut i = self.max;
            while i > 0 && (self.buf[i] & 0xC0) == 0x80 {
                i -= 1;
            }
            i
        });
        let rest = self.buf.split_off(cut);
        Some(std::mem::replace(&mut self.buf, rest))
    }

    fn take_rest(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.buf)
    }
}

/// `reader` past a UTF-8 byte-order mark at its start (as Windows tools write); a UTF-16 or UTF-32
/// mark is refused with what to do.
fn without_bom(mut reader: Box<dyn Read + Send>, path: &Path) -> Result<Box<dyn Read + Send>> {
    // Up to four bytes, fewer only at the end (std's read_to_end reads again when interrupted).
    let mut head = Vec::with_capacity(4);
    reader.by_ref().take(4).read_to_end(&mut head).map_err(io_err(path))?;
    let encoding = match head.as_slice() {
        [0xFF, 0xFE, 0, 0] => Some("utf-32le"),
        [0, 0, 0xFE, 0xFF] => Some("utf-32be"),
        [0xFF, 0xFE, ..] => Some("utf-16le"),
        [0xFE, 0xFF, ..] => Some("utf-16be"),
        _ => None,
    };
    if let Some(encoding) = encoding {
        return Err(DataError::NotUtf8 { path: path.to_path_buf(), encoding });
    }
    if head.starts_with(&[0xEF, 0xBB, 0xBF]) {
        head.drain(..3);
    }
    Ok(Box::new(std::io::Cursor::new(head).chain(reader)))
}

/// One read into `buf`, read again while it is interrupted (a signal is not the end of a file).
fn read_retrying<R: Read + ?Sized>(reader: &mut R, buf: &mut [u8]) -> std::io::Result<usize> {
    loop {
        match reader.read(buf) {
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            r => return r,
        }
    }
}

/// A byte stream made valid UTF-8 on the way: each maximal invalid sequence becomes U+FFFD
/// (counted in `replaced`), as `String::from_utf8_lossy` would turn the whole stream; a
/// sequence split between two reads is completed by the next one, not replaced.
struct LossyUtf8 {
    inner: Box<dyn Read + Send>,
    /// Valid bytes ready to hand out, from `at` on.
    out: Vec<u8>,
    at: usize,
    /// The start of a sequence that the next read may complete.
    carry: Vec<u8>,
    replaced: Arc<std::sync::atomic::AtomicU64>,
}

impl LossyUtf8 {
    fn new(inner: Box<dyn Read + Send>, replaced: Arc<std::sync::atomic::AtomicU64>) -> Self {
        Self { inner, out: Vec::new(), at: 0, carry: Vec::new(), replaced }
    }

    /// Decodes `carry` + the next read into `out`; false at the end of the stream.
    fn refill(&mut self) -> std::io::Result<bool> {
        let mut buf = std::mem::take(&mut self.carry);
        let had = buf.len();
        buf.resize(had + BLOCK, 0);
        let n = read_retrying(&mut self.inner, &mut buf[had..])?;
        buf.truncate(had + n);
        self.out.clear();
        self.at = 0;
        let mut rest = &buf[..];
        let mut replaced = 0;
        while !rest.is_empty() {
            match std::str::from_utf8(rest) {
                Ok(_) => {
                    self.out.extend_from_slice(rest);
                    break;
                }
                Err(e) => {
                    let (good, bad) = rest.split_at(e.valid_up_to());
                    self.out.extend_from_slice(good);
                    match e.error_len() {
                        // Cut short by the end of this read: the next one may complete it.
                        None if n > 0 => {
                            self.carry = bad.to_vec();
                            break;
                        }
                        len => {
                            self.out.extend_from_slice("\u{FFFD}".as_bytes());
                            replaced += 1;
                            rest = &bad[len.unwrap_or(bad.len())..];
                        }
                    }
                }
            }
        }
        self.replaced.fetch_add(replaced, std::sync::atomic::Ordering::Relaxed);
        Ok(n > 0 || !self.out.is_empty())
    }
}

impl Read for LossyUtf8 {
    fn read(&mut self, dst: &mut [u8]) -> std::io::Result<usize> {
        while self.at == self.out.len() {
            if !self.refill()? {
                return Ok(0);
            }
        }
        let n = dst.len().min(self.out.len() - self.at);
        dst[..n].copy_from_slice(&self.out[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

/// `bytes` as a document's text, which keeps no more memory than it needs (a short file's read
/// buffer holds a whole block, and a batch of documents is sized by their text), or the error
/// naming the line of the first invalid byte.
fn utf8(mut bytes: Vec<u8>, path: &Path, first_line: u64) -> Result<String> {
    if bytes.capacity() > bytes.len() + bytes.len() / 4 + 64 {
        bytes.shrink_to_fit();
    }
    String::from_utf8(bytes).map_err(|e| {
        let bad = e.utf8_error().valid_up_to();
        let line = first_line + e.as_bytes()[..bad].iter().filter(|&&b| b == b'\n').count() as u64;
        DataError::InvalidUtf8 { path: path.to_path_buf(), line }
    })
}

struct TextDocs {
    src: Arc<Path>,
    reader: Box<dyn Read + Send>,
    pieces: PieceBuf,
    eof: bool,
    piece_no: u64,
    line: u64,
    sample_by: SampleBy,
    /// Bytes of `pieces.buf` past `consumed` already searched for a document's end.
    scanned: usize,
    /// Bytes at the start of `pieces.buf` already handed out as documents (or skipped as blank
    /// lines): a line or paragraph moves this mark instead of shifting the rest of the buffer,
    /// which is compacted once before each read.
    consumed: usize,
}

impl TextDocs {
    fn new(src: Arc<Path>, reader: Box<dyn Read + Send>, pieces: PieceBuf, sample_by: SampleBy) -> Self {
        Self { src, reader, pieces, eof: false, piece_no: 0, line: 1, sample_by, scanned: 0, consumed: 0 }
    }

    /// `bytes` as the next document (numbered, or placed by its first line), the line count
    /// moved past it.
    fn emit(&mut self, bytes: Vec<u8>, cut: bool) -> Result<Option<Piece>> {
        let first_line = self.line;
        self.line += bytes.iter().filter(|&&b| b == b'\n').count() as u64;
        self.piece_no += 1;
        self.scanned = 0;
        let text = utf8(bytes, &self.src, first_line)?;
        // Documents of a whole file are numbered; lines and paragraphs go by their first line.
        let position = if self.sample_by == SampleBy::Document { self.piece_no } else { first_line };
        Ok(Some(Piece { text, position, cut }))
    }

    /// With lines or paragraphs as documents, where the first one in the buffer ends and how
    /// long its separator is (a line break; a blank line, `\r\n` too).
    fn find_end(&mut self) -> Option<(usize, usize)> {
        let buf = &self.pieces.buf[self.consumed..];
        let cr_before = |i: usize| usize::from(i > 0 && buf[i - 1] == b'\r');
        let mut i = self.scanned;
        let (found, scanned) = match self.sample_by {
            SampleBy::Document => (None, buf.len()),
            SampleBy::Line => match buf[i..].iter().position(|&b| b == b'\n') {
                Some(j) => (Some((i + j - cr_before(i + j), 1 + cr_before(i + j))), 0),
                None => (None, buf.len()),
            },
            SampleBy::Paragraph => loop {
                let Some(j) = buf[i..].iter().position(|&b| b == b'\n') else { break (None, buf.len()) };
                i += j;
                match &buf[i + 1..] {
                    [b'\n', ..] => break (Some((i - cr_before(i), 2 + cr_before(i))), 0),
                    [b'\r', b'\n', ..] => break (Some((i - cr_before(i), 3 + cr_before(i))), 0),
                    // Too few bytes yet to tell: look here again after the next read.
                    [] | [b'\r'] => break (None, i),
                    _ => i += 1,
                }
            },
        };
        self.scanned = scanned;
        found
    }

    /// Drops the line breaks before a paragraph (the blank lines between paragraphs).
    fn skip_blank_lines(&mut self) {
        if self.sample_by != SampleBy::Paragraph {
            return;
        }
        let rest = &self.pieces.buf[self.consumed..];
        let n = rest.iter().take_while(|&&b| b == b'\n' || b == b'\r').count();
        if n > 0 {
            self.line += rest[..n].iter().filter(|&&b| b == b'\n').count() as u64;
            self.consumed += n;
            self.scanned = 0;
        }
    }
}

impl FileDocs for TextDocs {
    fn next_piece(&mut self) -> Result<Option<Piece>> {
        loop {
            self.skip_blank_lines();
            if let Some((end, sep)) = self.find_end() {
                if end > self.pieces.max {
                    // Its end is here, but it is longer than the limit: cut as one still read.
                    self.pieces.buf.drain(..self.consumed);
                    self.consumed = 0;
                    if let Some(p) = self.pieces.take_full() {
                        return self.emit(p, true);
                    }
                }
                let doc = self.pieces.buf[self.consumed..self.consumed + end].to_vec();
                self.consumed += end + sep;
                let piece = self.emit(doc, false);
                self.line += 1 + u64::from(self.sample_by == SampleBy::Paragraph);
                return piece;
            }
            // No document's end in what is left: the rest moves to the front of the buffer
            // (once per read), which the size limit and the reads below take from there.
            if self.consumed > 0 {
                self.pieces.buf.drain(..self.consumed);
                self.consumed = 0;
            }
            if let Some(p) = self.pieces.take_full() {
                return self.emit(p, true);
            }
            if self.eof {
                let mut rest = self.pieces.take_rest();
                // After the last piece, stop; an empty file yields one empty document so that it
                // is counted as skipped.
                if rest.is_empty() && self.piece_no > 0 {
                    return Ok(None);
                }
                // The last line or paragraph ends at the end of the file, its line break too.
                if self.sample_by != SampleBy::Document && rest.ends_with(b"\n") {
                    rest.pop();
                    if rest.ends_with(b"\r") {
                        rest.pop();
                    }
                }
                return self.emit(rest, false);
            }
            let start = self.pieces.buf.len();
            self.pieces.buf.resize(start + BLOCK, 0);
            let n = match read_retrying(&mut self.reader, &mut self.pieces.buf[start..]) {
                Ok(n) => n,
                Err(e) => {
                    self.pieces.buf.truncate(start);
                    return Err(DataError::Io { path: self.src.to_path_buf(), source: e });
                }
            };
            self.pieces.buf.truncate(start + n);
            if n == 0 {
                self.eof = true;
            }
        }
    }

    fn source(&self) -> Arc<Path> {
        self.src.clone()
    }
}

/// A streaming scanner for JSON Lines that extracts one string field without holding the line.
struct JsonlDocs {
    src: Arc<Path>,
    reader: Box<dyn Read + Send>,
    block: Vec<u8>,
    pos: usize,
    len: usize,
    eof: bool,
    line: u64,
    field: String,
    pieces: PieceBuf,
    /// Inside the text field's string value of the current line.
    in_text: bool,
    /// Line on which the current record started.
    record_start_line: u64,
    /// Whether the file is one JSON array of records (its first non-blank byte is `[`) rather
    /// than JSON Lines, and where in it the scanner is.
    array: Option<ArrayAt>,
    /// Whether a record has been read (a file that starts with `[` is an array).
    seen_record: bool,
}

/// Where a scanner of a JSON array of records is between records.
#[derive(Clone, Copy, PartialEq)]
enum ArrayAt {
    /// After `[`: a record or `]`.
    Start,
    /// After a record: `,` or `]`.
    AfterRecord,
    /// After `,`: a record.
    AfterComma,
    /// After `]`: only whitespace to the end of the file.
    End,
}

enum Tok {
    Str,
    Other,
}

impl JsonlDocs {
    fn new(src: Arc<Path>, reader: Box<dyn Read + Send>, pieces: PieceBuf, field: String) -> Self {
        Self {
            src,
            reader,
            block: vec![0; BLOCK],
            pos: 0,
            len: 0,
            eof: false,
            line: 1,
            field,
            pieces,
            in_text: false,
            record_start_line: 1,
            array: None,
            seen_record: false,
        }
    }

    fn err(&self, msg: impl Into<String>) -> DataError {
        DataError::Jsonl { path: self.src.to_path_buf(), line: self.line, msg: msg.into() }
    }

    fn peek(&mut self) -> Result<Option<u8>> {
        if self.pos == self.len {
            if self.eof {
                return Ok(None);
            }
            let n = read_retrying(&mut self.reader, &mut self.block)
                .map_err(|e| DataError::Io { path: self.src.to_path_buf(), source: e })?;
            self.pos = 0;
            self.len = n;
            if n == 0 {
                self.eof = true;
                return Ok(None);
            }
        }
        Ok(Some(self.block[self.pos]))
    }

    fn bump(&mut self) -> Result<Option<u8>> {
        let b = self.peek()?;
        if b.is_some() {
            self.pos += 1;
        }
        Ok(b)
    }

    fn expect_byte(&mut self) -> Result<u8> {
        self.bump()?.ok_or_else(|| self.err("unexpected end of file inside a json value"))
    }

    /// Skips spaces and tabs, and in a JSON array newlines too (in JSON Lines a newline ends a
    /// record).
    fn skip_ws(&mut self) -> Result<()> {
        while let Some(b) = self.peek()? {
            if b == b' ' || b == b'\t' || b == b'\r' {
                self.pos += 1;
            } else if b == b'\n' && self.array.is_some() {
                self.pos += 1;
                self.line += 1;
            } else {
                break;
            }
        }
        Ok(())
    }

    /// Reads a string's body after its opening quote. With `to_pieces`, bytes go to the piece buffer
    /// (stopping early once it holds more than the limit: returns false then); otherwise to `out`.
    fn string_body(&mut self, mut out: Option<&mut Vec<u8>>, to_pieces: bool) -> Result<bool> {
        loop {
            if to_pieces && self.pieces.buf.len() > self.pieces.max {
                return Ok(false);
            }
            // Fast path: copy a run of plain bytes from the block.
            if self.peek()?.is_none() {
                return Err(self.err("unterminated string"));
            }
            let start = self.pos;
            let mut end = start;
            while end < self.len {
                let b = self.block[end];
                if b == b'"' || b == b'\\' || b == b'\n' {
                    break;
                }
                end += 1;
            }
            if end > start {
                let run = &self.block[start..end];
                if to_pieces {
                    self.pieces.buf.extend_from_slice(run);
                } else if let Some(o) = out.as_deref_mut() {
                    o.extend_from_slice(run);
                }
                self.pos = end;
                continue;
            }
            match self.expect_byte()? {
                b'"' => return Ok(true),
                b'\n' => return Err(self.err("newline inside a json string (unterminated string?)")),
                _ => {
                    let c = self.escape()?;
                    let mut tmp = [0u8; 4];
                    let enc = c.encode_utf8(&mut tmp).as_bytes();
                    if to_pieces {
                        self.pieces.buf.extend_from_slice(enc);
                    } else if let Some(o) = out.as_deref_mut() {
                        o.extend_from_slice(enc);
                    }
                }
            }
        }
    }

    fn hex4(&mut self) -> Result<u32> {
        let mut v = 0u32;
        for _ in 0..4 {
            let b = self.expect_byte()?;
            let d = (b as char).to_digit(16).ok_or_else(|| self.err("bad \\u escape"))?;
            v = v * 16 + d;
        }
        Ok(v)
    }

    fn escape(&mut self) -> Result<char> {
        Ok(match self.expect_byte()? {
            b'"' => '"',
            b'\\' => '\\',
            b'/' => '/',
            b'b' => '\u{8}',
            b'f' => '\u{c}',
            b'n' => '\n',
            b'r' => '\r',
            b't' => '\t',
            b'u' => {
                let hi = self.hex4()?;
                if (0xD800..0xDC00).contains(&hi) {
                    if self.expect_byte()? != b'\\' || self.expect_byte()? != b'u' {
                        return Ok('\u{FFFD}');
                    }
                    let lo = self.hex4()?;
                    let c = 0x10000 + ((hi - 0xD800) << 10) + (lo.wrapping_sub(0xDC00) & 0x3FF);
                    char::from_u32(c).unwrap_or('\u{FFFD}')
                } else {
                    char::from_u32(hi).unwrap_or('\u{FFFD}')
                }
            }
            other => return Err(self.err(format!("bad escape \\{}", other as char))),
        })
    }

    /// Skips one JSON value.
    fn skip_value(&mut self) -> Result<Tok> {
        self.skip_ws()?;
        let b = self.expect_byte()?;
        match b {
            b'"' => {
                self.string_body(None, false)?;
                Ok(Tok::Str)
            }
            b'{' | b'[' => {
                let mut depth = 1usize;
                while depth > 0 {
                    match self.expect_byte()? {
                        b'"' => {
                            self.string_body(None, false)?;
                        }
                        b'{' | b'[' => depth += 1,
                        b'}' | b']' => depth -= 1,
                        b'\n' if self.array.is_some() => self.line += 1,
                        b'\n' => return Err(self.err("newline inside a json value")),
                        _ => {}
                    }
                }
                Ok(Tok::Other)
            }
            _ => {
                // number, true, false, null: consume up to a delimiter.
                while let Some(c) = self.peek()? {
                    if matches!(c, b',' | b'}' | b']' | b'\n' | b' ' | b'\t' | b'\r') {
                        break;
                    }
                    self.pos += 1;
                }
                Ok(Tok::Other)
            }
        }
    }

    /// After the text value (or after `{` when it was not found yet): skips the rest of the
    /// object. Returns whether the text field was present with a string value.
    fn rest_of_object(&mut self, mut found: bool, mut first: bool) -> Result<bool> {
        loop {
            self.skip_ws()?;
            match self.expect_byte()? {
                b'}' => break,
                b',' if !first => {}
                b'"' if first => {
                    self.pos -= 1;
                }
                _ => return Err(self.err("malformed json object")),
            }
            first = false;
            self.skip_ws()?;
            if self.expect_byte()? != b'"' {
                return Err(self.err("expected a key"));
            }
            let mut key = Vec::new();
            self.string_body(Some(&mut key), false)?;
            self.skip_ws()?;
            if self.expect_byte()? != b':' {
                return Err(self.err("expected ':' after a key"));
            }
            self.skip_ws()?;
            if !found && key == self.field.as_bytes() {
                match self.peek()? {
                    Some(b'"') => {
                        self.pos += 1;
                        self.in_text = true;
                        return Ok(true);
                    }
                    Some(b'n') => {
                        self.skip_value()?;
                        found = true; // null: an empty document
                    }
                    other => {
                        let what = match other {
                            None => "the end of the file",
                            Some(b'\n') => "the end of the line (a JSONL record is one line)",
                            Some(b'{') => "an object",
                            Some(b'[') => "an array",
                            Some(b't' | b'f') => "true or false",
                            Some(b'-' | b'0'..=b'9') => "a number",
                            Some(_) => "not json",
                        };
                        return Err(self.err(format!("field \"{}\" is not a string: it is {what}", self.field)));
                    }
                }
            } else {
                self.skip_value()?;
            }
        }
        if !found {
            return Err(self.err(format!(
                "no \"{}\" field in this record; name the field that holds the text with --text-field \
                 (data.source.text_field in a pretrain config)",
                self.field
            )));
        }
        match self.array {
            // (In an array, the next record's start reads the separator.)
            Some(_) => self.array = Some(ArrayAt::AfterRecord),
            // End of a line's record: only whitespace may follow before the newline.
            None => {
                self.skip_ws()?;
                match self.bump()? {
                    None | Some(b'\n') => {}
                    Some(_) => return Err(self.err("trailing characters after the json object")),
                }
                self.line += 1;
            }
        }
        Ok(false)
    }
}

impl FileDocs for JsonlDocs {
    fn next_piece(&mut self) -> Result<Option<Piece>> {
        loop {
            if self.in_text {
                let closed = self.string_body(None, true)?;
                if !closed {
                    let p = self.pieces.take_full().unwrap_or_default();
                    let text = utf8(p, &self.src, self.line)?;
                    return Ok(Some(Piece { text, position: self.line, cut: true }));
                }
                self.in_text = false;
                let line = self.line;
                self.rest_of_object(true, false)?;
                let text = utf8(self.pieces.take_rest(), &self.src, line)?;
                return Ok(Some(Piece { text, position: line, cut: false }));
            }
            // Start of a record.
            self.skip_ws()?;
            let b = self.bump()?;
            match (self.array, b) {
                (None | Some(ArrayAt::End), None) => return Ok(None),
                (Some(_), None) => {
                    return Err(self.err("unexpected end of file inside the json array (no closing ']')"))
                }
                (None, Some(b'\n')) => {
                    self.line += 1;
                    continue;
                }
                (None, Some(b'[')) if !self.seen_record => {
                    self.array = Some(ArrayAt::Start);
                    continue;
                }
                (Some(ArrayAt::Start | ArrayAt::AfterRecord), Some(b']')) => {
                    self.array = Some(ArrayAt::End);
                    continue;
                }
                (Some(ArrayAt::AfterRecord), Some(b',')) => {
                    self.array = Some(ArrayAt::AfterComma);
                    continue;
                }
                (Some(ArrayAt::End), Some(_)) => return Err(self.err("trailing characters after the json array")),
                (Some(ArrayAt::AfterRecord), Some(_)) => {
                    return Err(self.err("expected ',' or ']' after a record of the json array"))
                }
                (None | Some(ArrayAt::Start | ArrayAt::AfterComma), Some(b'{')) => {
                    self.seen_record = true;
                    self.record_start_line = self.line;
                    if !self.rest_of_object(false, true)? {
                        // null text: an empty document (counted as skipped)
                        return Ok(Some(Piece { text: String::new(), position: self.record_start_line, cut: false }));
                    }
                }
                (Some(_), Some(_)) => return Err(self.err("expected a json object in the array")),
                (None, Some(_)) => return Err(self.err("expected a json object per line")),
            }
        }
    }

    fn source(&self) -> Arc<Path> {
        self.src.clone()
    }
}

struct ParquetDocs {
    src: Arc<Path>,
    reader: parquet::arrow::arrow_reader::ParquetRecordBatchReader,
    batch: Vec<Option<String>>,
    next: usize,
    row: u64,
    max: usize,
    pending: VecDeque<Piece>,
    _tmp: Option<TempFile>,
}

/// A file deleted on drop (a decompressed `.parquet.gz` or `.parquet.zst`).
struct TempFile(PathBuf);
impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

impl ParquetDocs {
    fn open(src: Arc<Path>, compression: Compression, field: &str, max: usize) -> Result<Self> {
        let perr = |msg: String| DataError::Parquet { path: src.to_path_buf(), msg };
        let (file, tmp) = if compression != Compression::None {
            // A name of its own per call (`patchlm-<name>.<pid>-<n>.tmp`): two readers of files
            // named alike (one name in two folders, in threads of one process) never share one.
            let name = src.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
            let tmp_path = crate::shard::temp_beside(&std::env::temp_dir().join(format!("patchlm-{name}")));
            let mut dec = compression.reader(File::open(&src).map_err(io_err(src.to_path_buf()))?, &src)?;
            let mut out = File::create(&tmp_path).map_err(io_err(&tmp_path))?;
            // Removed on drop from here on, also when decompressing fails part way.
            let guard = TempFile(tmp_path);
            std::io::copy(&mut dec, &mut out).map_err(io_err(src.to_path_buf()))?;
            let f = File::open(&guard.0).map_err(io_err(&guard.0))?;
            (f, Some(guard))
        } else {
            (File::open(&src).map_err(io_err(src.to_path_buf()))?, None)
        };
        let builder = ParquetRecordBatchReaderBuilder::try_new(file)
            .map_err(|e| perr(format!("not a readable parquet file: {e}")))?;
        let schema = builder.parquet_schema();
        let idx = (0..schema.num_columns()).find(|&i| schema.column(i).path().string() == field);
        let Some(idx) = idx else {
            let cols: Vec<String> = (0..schema.num_columns()).map(|i| schema.column(i).path().string()).collect();
            let nested: Vec<&str> = cols
                .iter()
                .map(String::as_str)
                .filter(|c| c.strip_prefix(field).is_some_and(|r| r.starts_with('.')))
                .collect();
            let what = if nested.is_empty() {
                format!("no column \"{field}\" (columns: {})", cols.join(", "))
            } else {
                format!(
                    "column \"{field}\" does not hold strings but a list or struct (its leaves: {})",
                    nested.join(", ")
                )
            };
            return Err(perr(format!(
                "{what}; name the column that holds the text with --text-field (data.source.text_field in a pretrain \
                 config; a field inside a struct by its dotted path)"
            )));
        };
        let mask = ProjectionMask::leaves(schema, [idx]);
        let reader = builder
            .with_projection(mask)
            .with_batch_size(256)
            .build()
            .map_err(|e| perr(format!("cannot read: {e}")))?;
        Ok(Self { src, reader, batch: Vec::new(), next: 0, row: 0, pending: VecDeque::new(), _tmp: tmp, max })
    }

    fn load_batch(&mut self) -> Result<bool> {
        let perr = |msg: String| DataError::Parquet { path: self.src.to_path_buf(), msg };
        let Some(batch) = self.reader.next() else { return Ok(false) };
        let batch = batch.map_err(|e| perr(format!("row {}: {e}", self.row + 1)))?;
        let first = self.row;
        // A field inside a struct (`--text-field meta.text`) is read as the struct around its one
        // projected leaf: the text is that leaf (null where the struct is, by the leaf's levels).
        let mut col = batch.column(0).as_ref();
        while let Some(s) = col.as_any().downcast_ref::<arrow_array::StructArray>() {
            col = s.column(0).as_ref();
        }
        self.batch = column_texts(col, &|i| format!("row {}", first + i as u64 + 1)).map_err(perr)?;
        self.next = 0;
        Ok(true)
    }
}

/// Each row's text in a Parquet text column: UTF-8 strings (plain, large or view), binary that
/// holds UTF-8 (plain, large or view), or either of them dictionary-encoded (as pandas categoricals
/// are written). `row(i)` names the column's i-th entry in errors.
fn column_texts(col: &dyn Array, row: &dyn Fn(usize) -> String) -> std::result::Result<Vec<Option<String>>, String> {
    use arrow_schema::DataType as T;
    let textual =
        |t: &T| matches!(t, T::Utf8 | T::LargeUtf8 | T::Utf8View | T::Binary | T::LargeBinary | T::BinaryView);
    let ok = match col.data_type() {
        T::Dictionary(_, values) => textual(values),
        t => textual(t),
    };
    if !ok {
        return Err(format!("text column has type {}, expected strings (or UTF-8 bytes)", col.data_type()));
    }
    let values = crate::parquet_io::json_values(col, row)?;
    Ok(values.into_iter().map(|v| if let serde_json::Value::String(s) = v { Some(s) } else { None }).collect())
}

impl FileDocs for ParquetDocs {
    fn next_piece(&mut self) -> Result<Option<Piece>> {
        if let Some(p) = self.pending.pop_front() {
            return Ok(Some(p));
        }
        while self.next >= self.batch.len() {
            if !self.load_batch()? {
                return Ok(None);
            }
        }
        let text = self.batch[self.next].take().unwrap_or_default();
        self.next += 1;
        self.row += 1;
        let max = self.max;
        if text.len() <= max {
            return Ok(Some(Piece { text, position: self.row, cut: false }));
        }
        let mut pb = PieceBuf::new(max);
        pb.buf = text.into_bytes();
        while let Some(p) = pb.take_full() {
            // Valid UTF-8 in, cut at char boundaries: this cannot fail, but stay total.
            let text = utf8(p, &self.src, self.row)?;
            self.pending.push_back(Piece { text, position: self.row, cut: true });
        }
        let text = utf8(pb.take_rest(), &self.src, self.row)?;
        self.pending.push_back(Piece { text, position: self.row, cut: false });
        Ok(self.pending.pop_front())
    }

    fn source(&self) -> Arc<Path> {
        self.src.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Hands out its bytes a few at a time (1 to 7), so multi-byte sequences split across reads,
    /// and about one read in eight is interrupted (`ErrorKind::Interrupted`, as a signal does),
    /// which a reader must retry without losing what it held.
    struct Trickle(Vec<u8>, usize, u64);
    impl Read for Trickle {
        fn read(&mut self, dst: &mut [u8]) -> std::io::Result<usize> {
            self.2 = self.2.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            if (self.2 >> 58) & 7 == 0 {
                return Err(std::io::ErrorKind::Interrupted.into());
            }
            let n = (1 + (self.2 >> 61) as usize).min(dst.len()).min(self.0.len() - self.1);
            dst[..n].copy_from_slice(&self.0[self.1..self.1 + n]);
            self.1 += n;
            Ok(n)
        }
    }

    /// The stream decodes as `String::from_utf8_lossy` decodes the whole (each maximal invalid
    /// sequence one U+FFFD, as Python's errors="replace"), however the reads split it.
    #[test]
    fn lossy_utf8_matches_from_utf8_lossy_across_split_reads() {
        let pieces: [&[u8]; 9] = [
            "plain ascii ".as_bytes(),
            "é 日本 😀 ".as_bytes(),
            b"\x92",             // a cp1252 quote: one replacement
            b"\xe6\x97",         // a 3-byte sequence cut short: one
            b"\xf0\x9f\x98\x80", // a whole emoji
            b"\xc0\xaf",         // an overlong encoding: two
            b"\xed\xa0\x80",     // a surrogate: three
            b"\n",
            b"\xf0\x9f", // cut short by the end of the stream: one
        ];
        let mut rng = 1u64;
        for seed in 0..200u64 {
            let mut bytes = Vec::new();
            for _ in 0..20 {
                rng = rng.wrapping_mul(6364136223846793005).wrapping_add(seed | 1);
                bytes.extend_from_slice(pieces[(rng >> 33) as usize % pieces.len()]);
            }
            if seed % 2 == 0 {
                bytes.extend_from_slice(pieces[8]);
            }
            let want = String::from_utf8_lossy(&bytes).into_owned();
            let count = Arc::new(std::sync::atomic::AtomicU64::new(0));
            let mut got = String::new();
            LossyUtf8::new(Box::new(Trickle(bytes, 0, seed)), count.clone()).read_to_string(&mut got).unwrap();
            assert_eq!(got, want, "seed {seed}");
            assert_eq!(count.load(std::sync::atomic::Ordering::Relaxed) as usize, want.matches('\u{FFFD}').count());
        }
    }

    /// Every piece a file reader yields: its text, position and whether it ends at a cut.
    fn pieces_of(mut docs: Box<dyn FileDocs>) -> Result<Vec<(String, u64, bool)>> {
        let mut out = Vec::new();
        while let Some(p) = docs.next_piece()? {
            out.push((p.text, p.position, p.cut));
        }
        Ok(out)
    }

    fn text_docs(reader: Box<dyn Read + Send>, sample_by: SampleBy, max: usize) -> Box<dyn FileDocs> {
        Box::new(TextDocs::new(Arc::from(Path::new("t.txt")), reader, PieceBuf::new(max), sample_by))
    }

    fn jsonl_docs(reader: Box<dyn Read + Send>, max: usize) -> Box<dyn FileDocs> {
        Box::new(JsonlDocs::new(Arc::from(Path::new("t.jsonl")), reader, PieceBuf::new(max), "text".into()))
    }

    /// Text and JSONL files give the same documents (texts, positions, cuts) however their reads
    /// are split (1 to 7 bytes) and interrupted, as when read whole: line breaks, CRLF,
    /// separators, escapes, multi-byte characters and the 64-byte cuts all across reads.
    #[test]
    fn documents_are_the_same_however_reads_split_and_interrupt() {
        let text = "Para one,\r\nline two é.\r\n\r\nPara 日本 two\n\n\n".to_string()
            + &"a long line of words that must be cut somewhere ".repeat(4)
            + "\n\nxx\r\n\n😀 last";
        for sample_by in [SampleBy::Document, SampleBy::Paragraph, SampleBy::Line] {
            let whole = pieces_of(text_docs(Box::new(std::io::Cursor::new(text.clone())), sample_by, 64)).unwrap();
            assert!(whole.len() >= 3, "{sample_by:?}: {whole:?}");
            assert!(whole.iter().all(|p| p.0.len() <= 64), "{sample_by:?}: a piece over the limit: {whole:?}");
            for seed in 0..40 {
                let split = pieces_of(text_docs(Box::new(Trickle(text.clone().into_bytes(), 0, seed)), sample_by, 64));
                assert_eq!(split.unwrap(), whole, "{sample_by:?} seed {seed}");
            }
        }
        let jsonl = concat!(
            "{\"id\": 1, \"text\": \"caf\\u00e9 \\\"q\\\" \\ud83d\\ude00 日本\", \"meta\": {\"text\": \"no\"}}\n",
            "\n{\"meta\": [1, \"]\"], \"text\": \"two\\nlines\\t",
            "and a long string that the 64-byte limit cuts in two or three pieces\"}\r\n",
            "{\"text\": null}\n{\"text\": \"last\"}"
        );
        let whole = pieces_of(jsonl_docs(Box::new(std::io::Cursor::new(jsonl)), 64)).unwrap();
        assert_eq!(whole.first().map(|p| p.0.as_str()), Some("café \"q\" 😀 日本"));
        assert_eq!(whole.last().map(|p| (p.0.as_str(), p.1)), Some(("last", 5)));
        assert!(whole.iter().all(|p| p.0.len() <= 64) && whole.iter().any(|p| p.2), "{whole:?}");
        for seed in 0..40 {
            let split = pieces_of(jsonl_docs(Box::new(Trickle(jsonl.as_bytes().to_vec(), 0, seed)), 64));
            assert_eq!(split.unwrap(), whole, "jsonl seed {seed}");
        }
        // A read that fails is an error naming the file, not the end of it.
        for ok in [0, 3, 100] {
            let e = pieces_of(text_docs(Box::new(Failing(ok)), SampleBy::Document, 64)).unwrap_err().to_string();
            assert!(e.contains("t.txt") && e.contains("disk on fire"), "{e}");
            let e = pieces_of(jsonl_docs(Box::new(Failing(ok)), 64)).unwrap_err().to_string();
            assert!(e.contains("t.jsonl") && e.contains("disk on fire"), "{e}");
        }
    }

    /// Gives `ok` spaces, then fails as a disk does.
    struct Failing(usize);
    impl Read for Failing {
        fn read(&mut self, dst: &mut [u8]) -> std::io::Result<usize> {
            if self.0 == 0 {
                return Err(std::io::Error::other("disk on fire"));
            }
            let n = self.0.min(dst.len());
            dst[..n].fill(b' ');
            self.0 -= n;
            Ok(n)
        }
    }

    /// The byte-order mark is found and skipped however the reads split and interrupt it; a read
    /// that fails is an error naming the file, in both the mark's reader and the lossy decoder.
    #[test]
    fn interrupted_reads_are_retried_and_failed_ones_reported() {
        for seed in 0..64 {
            let text = [&[0xEF, 0xBB, 0xBF][..], "héllo 日本\n".as_bytes()].concat();
            let mut got = String::new();
            without_bom(Box::new(Trickle(text, 0, seed)), Path::new("t.txt"))
                .unwrap()
                .read_to_string(&mut got)
                .unwrap();
            assert_eq!(got, "héllo 日本\n", "seed {seed}");
        }
        for ok in [0, 2, 9] {
            match without_bom(Box::new(Failing(ok)), Path::new("t.txt")) {
                Err(e) => assert!(ok < 4 && e.to_string().contains("t.txt") && e.to_string().contains("disk on fire")),
                Ok(mut r) => {
                    assert!(ok >= 4, "{ok} bytes read without the failure");
                    assert!(r.read_to_end(&mut Vec::new()).unwrap_err().to_string().contains("disk on fire"));
                }
            }
        }
        let count = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let e = LossyUtf8::new(Box::new(Failing(5)), count).read_to_end(&mut Vec::new()).unwrap_err();
        assert!(e.to_string().contains("disk on fire"), "{e}");
    }

    /// Parquet rows are numbered from 1 (a row cut into pieces keeps its number). A compressed
    /// file is read through a temp file of its own: two files named alike in two folders, read
    /// at once, each give their own rows; the temp files go when the readers are dropped, and
    /// when decompressing fails part way.
    #[test]
    fn parquet_rows_are_numbered_and_compressed_ones_read_through_temp_files_of_their_own() {
        use std::io::Write;
        let dir = tempfile::tempdir().unwrap();
        // A name no other test's file has, to find this test's temp files by.
        let name = format!("rows-{}.parquet.gz", dir.path().file_name().unwrap().to_string_lossy());
        let gz_parquet = |rows: &[Option<&str>]| -> Vec<u8> {
            let values: arrow_array::ArrayRef = Arc::new(arrow_array::StringArray::from(rows.to_vec()));
            let schema = Arc::new(arrow_schema::Schema::new(vec![arrow_schema::Field::new(
                "text",
                arrow_schema::DataType::Utf8,
                true,
            )]));
            let batch = arrow_array::RecordBatch::try_new(schema.clone(), vec![values]).unwrap();
            let mut buf = Vec::new();
            let mut w = parquet::arrow::ArrowWriter::try_new(&mut buf, schema, None).unwrap();
            w.write(&batch).unwrap();
            w.close().unwrap();
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
            e.write_all(&buf).unwrap();
            e.finish().unwrap()
        };
        let put = |sub: &str, bytes: &[u8]| -> Arc<Path> {
            std::fs::create_dir_all(dir.path().join(sub)).unwrap();
            let p = dir.path().join(sub).join(&name);
            std::fs::write(&p, bytes).unwrap();
            Arc::from(p)
        };
        let temps = || -> usize {
            let prefix = format!("patchlm-{name}.");
            std::fs::read_dir(std::env::temp_dir())
                .unwrap()
                .filter(|e| e.as_ref().is_ok_and(|e| e.file_name().to_string_lossy().starts_with(&prefix)))
                .count()
        };
        let long = "abc ".repeat(25);
        let a = put("a", &gz_parquet(&[Some("first"), None, Some(&long), Some("last")]));
        let b = put("b", &gz_parquet(&[Some("other"), Some("rows")]));
        let mut da = ParquetDocs::open(a, Compression::Gzip, "text", 64).unwrap();
        let mut db = ParquetDocs::open(b, Compression::Gzip, "text", 64).unwrap();
        assert_eq!(temps(), 2);
        let (mut got_a, mut got_b) = (Vec::new(), Vec::new());
        loop {
            let pa = da.next_piece().unwrap();
            let pb = db.next_piece().unwrap();
            if pa.is_none() && pb.is_none() {
                break;
            }
            got_a.extend(pa.map(|p| (p.text, p.position, p.cut)));
            got_b.extend(pb.map(|p| (p.text, p.position, p.cut)));
        }
        assert_eq!(got_b, [("other".to_string(), 1, false), ("rows".to_string(), 2, false)]);
        let positions: Vec<(u64, bool)> = got_a.iter().map(|(_, p, c)| (*p, *c)).collect();
        assert_eq!(positions, [(1, false), (2, false), (3, true), (3, false), (4, false)]);
        assert_eq!([&got_a[0].0, &got_a[1].0, &got_a[4].0], ["first", "", "last"]);
        assert_eq!(got_a[2].0.clone() + &got_a[3].0, long);
        drop(da);
        assert_eq!(temps(), 1);
        drop(db);
        assert_eq!(temps(), 0);

        // Cut short: decompressing fails, with the file's name, and leaves no temp file.
        let whole = gz_parquet(&[Some("x")]);
        let c = put("c", &whole[..whole.len() / 2]);
        let Err(e) = ParquetDocs::open(c, Compression::Gzip, "text", 64) else { panic!("a cut gzip file was read") };
        assert!(e.to_string().contains(&name), "{e}");
        assert_eq!(temps(), 0);
    }
}
