//! The patch crate's error type.

use std::path::PathBuf;

/// What can go wrong building or reading patch datasets, or computing the patch objective.
#[derive(Debug, thiserror::Error)]
pub enum PatchError {
    /// Invalid settings.
    #[error("invalid patch setting: {0}")]
    Config(String),
    /// Too little data for what was asked.
    #[error("{0}")]
    TooSmall(String),
    /// A dataset file problem.
    #[error("{path}: {msg}")]
    File {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        msg: String,
    },
    /// From the data crate.
    #[error(transparent)]
    Data(#[from] patchlm_data::DataError),
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// Shorthand for results in this crate.
pub type Result<T, E = PatchError> = std::result::Result<T, E>;
