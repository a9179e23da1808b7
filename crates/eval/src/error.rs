//! The eval crate's error type.

use std::path::PathBuf;

/// What can go wrong in evaluation.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    /// A task file that cannot be used.
    #[error("{path}: {}{msg}", if .at.is_empty() { String::new() } else { format!("{}: ", .at) })]
    Task {
        /// The file.
        path: PathBuf,
        /// Where in it: `line N` (JSONL), `example N` (BIG-bench, a JSON array) or `row N`
        /// (Parquet); empty for the whole file.
        at: String,
        /// What is wrong.
        msg: String,
    },
    /// A file could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// A plot or report file could not be drawn or written.
    #[error("{path}: {msg}")]
    Plot {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        msg: String,
    },
    /// Input the scorer cannot use.
    #[error("{0}")]
    Input(String),
    /// Encoding failed.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// From the data crate.
    #[error(transparent)]
    Data(#[from] patchlm_data::DataError),
    /// From the model crate.
    #[error(transparent)]
    Model(#[from] patchlm_model::ModelError),
    /// From candle.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// Shorthand for results in this crate.
pub type Result<T, E = EvalError> = std::result::Result<T, E>;
