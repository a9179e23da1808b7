//! The model crate's error type.

use std::path::PathBuf;

/// What can go wrong building, loading or saving a model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// A configuration that does not fit together.
    #[error("invalid model config: {0}")]
    Config(String),
    /// A file could not be read or written.
    #[error("{path}: {msg}")]
    File {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        msg: String,
    },
    /// An argument out of its range (a prompt longer than the context, a negative temperature).
    #[error("{0}")]
    Input(String),
    /// A device that does not exist or is not compiled in.
    #[error("device: {0}")]
    Device(String),
}

/// Shorthand for results in this crate.
pub type Result<T, E = ModelError> = std::result::Result<T, E>;
