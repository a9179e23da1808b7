//! The data crate's error type.

use std::path::PathBuf;

/// Everything that can go wrong in the data stage. Every variant names the file (and where it
/// helps, the line or row) and says what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// An I/O error while touching `path`.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory involved.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A path (an input, a tokenizer) does not exist.
    #[error("{0}: no such file or directory")]
    Missing(PathBuf),
    /// A symbolic link (an input, or in an input folder) whose target cannot be reached.
    #[error("{path}: a symbolic link to {}, which {reason}; fix or remove the link", target.display())]
    BrokenLink {
        /// The link.
        path: PathBuf,
        /// What it points to.
        target: PathBuf,
        /// Why it cannot be followed: `does not exist`, or `cannot be followed (<the operating
        /// system's reason>)`.
        reason: String,
    },
    /// An input that exists but is neither a regular file nor a folder (a pipe, a device).
    #[error(
        "{0}: not a regular file or folder (a pipe or a device?); the data stage reads its inputs more than once \
         (tokenizer training, then tokenization): save the text to a file and name that"
    )]
    NotAFile(PathBuf),
    /// An input folder with no file that a folder's files are read by (their extensions).
    #[error(
        "{path}: no file to read in this folder (a folder's files are read by their extension: .txt .text .md .rst \
         .jsonl .ndjson .json .parquet, each also .gz / .zst / .zstd){holds}; name a file itself to read it whatever \
         its name"
    )]
    NothingInFolder {
        /// The folder.
        path: PathBuf,
        /// What it holds instead (`"; it holds a.csv, b.html"`), or nothing.
        holds: String,
    },
    /// An input folder that is the output of a patchlm stage (shards, patch datasets, a run
    /// directory: [`crate::source::OUTPUT_MARKERS`]), not text.
    #[error(
        "{0}: the output of a patchlm stage (a data build's shards, patch datasets or a training run), not text to \
         build from; give the text it was made from"
    )]
    OutputFolder(PathBuf),
    /// Text that is not valid UTF-8.
    #[error(
        "{path}: line {line}: invalid utf-8; if the file is in another encoding, re-encode it as utf-8 (e.g. `iconv -f \
         latin1 -t utf-8`); if it is utf-8 with stray bytes, have them replaced with U+FFFD (`--invalid-utf8 replace`, \
         config: data.source.invalid_utf8 = \"replace\")"
    )]
    InvalidUtf8 {
        /// The file.
        path: PathBuf,
        /// 1-based line number where the bad bytes start.
        line: u64,
    },
    /// Text in an encoding other than UTF-8, told by its byte-order mark.
    #[error("{path}: the file is {encoding} (it starts with that byte-order mark); re-encode it as utf-8 (e.g. `iconv -f {} -t utf-8`, which reads the mark)", .encoding.get(..6).unwrap_or(.encoding))]
    NotUtf8 {
        /// The file.
        path: PathBuf,
        /// The encoding its byte-order mark names (`utf-16le`, `utf-16be`, `utf-32le`, `utf-32be`).
        encoding: &'static str,
    },
    /// A JSONL record that cannot be used.
    #[error("{path}: line {line}: {msg}")]
    Jsonl {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: u64,
        /// What is wrong.
        msg: String,
    },
    /// A Parquet file that cannot be used.
    #[error("{path}: {msg}")]
    Parquet {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        msg: String,
    },
    /// An Arrow shard that cannot be read or written.
    #[error("{path}: {msg}")]
    Shard {
        /// The shard file.
        path: PathBuf,
        /// What is wrong.
        msg: String,
    },
    /// A shard whose bytes do not match the manifest's checksum.
    #[error("{path}: checksum mismatch (manifest {expected}, file {actual}); the shard is truncated or corrupted: rebuild it with `cargo xtask data`")]
    Checksum {
        /// The shard file.
        path: PathBuf,
        /// Checksum recorded in the manifest.
        expected: String,
        /// Checksum of the bytes on disk.
        actual: String,
    },
    /// A manifest that cannot be used.
    #[error("{path}: {msg}")]
    Manifest {
        /// The manifest file.
        path: PathBuf,
        /// What is wrong.
        msg: String,
    },
    /// Tokenizer training, loading or encoding failed.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// The tokenizer given does not match the one the shards were made with.
    #[error("tokenizer fingerprint {given} does not match the manifest's {manifest} ({path}); use the tokenizer.json saved beside the shards or rebuild the shards")]
    TokenizerMismatch {
        /// The manifest file.
        path: PathBuf,
        /// Fingerprint recorded in the manifest.
        manifest: String,
        /// Fingerprint of the tokenizer given.
        given: String,
    },
    /// A token id that does not fit the shard dtype.
    #[error(
        "token id {id} does not fit {dtype} (vocabulary size {vocab}); the tokenizer emits ids beyond its vocabulary"
    )]
    TokenRange {
        /// The offending id.
        id: u32,
        /// The shard dtype.
        dtype: &'static str,
        /// The tokenizer's vocabulary size.
        vocab: usize,
    },
    /// A request outside the dataset (e.g. a token range past the end).
    #[error("{0}")]
    OutOfRange(String),
    /// A bad setting.
    #[error("invalid setting: {0}")]
    Config(String),
    /// A file or listing from the Hugging Face Hub could not be had.
    #[error("{target}: {msg}")]
    Hub {
        /// The repository, file or address involved.
        target: String,
        /// What went wrong and what to do.
        msg: String,
    },
    /// A corpus could not be assembled.
    #[error("corpus: {0}")]
    Corpus(String),
}

/// Shorthand for results in this crate.
pub type Result<T, E = DataError> = std::result::Result<T, E>;

pub(crate) fn io_err(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> DataError {
    let path = path.into();
    move |source| DataError::Io { path, source }
}
