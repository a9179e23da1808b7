//! The train crate's error type.

use std::path::PathBuf;

/// What can go wrong in training.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// Invalid settings, caught before training starts.
    #[error("invalid training setting: {0}")]
    Config(String),
    /// A NaN or Inf loss or gradient; the last good checkpoint is kept.
    #[error("non-finite {what} at {phase} step {step} (global step {global_step}); training stopped, the last good checkpoint is kept; lower the learning rate or check the data")]
    NonFinite {
        /// `loss` or `gradient norm`.
        what: &'static str,
        /// Phase name.
        phase: String,
        /// Step within the phase.
        step: usize,
        /// Global step.
        global_step: usize,
    },
    /// A checkpoint that cannot be used.
    #[error("{path}: {msg}")]
    Checkpoint {
        /// The checkpoint.
        path: PathBuf,
        /// What is wrong.
        msg: String,
    },
    /// The run stopped on request ([`crate::Trainer::stop_when`]) after a step whose checkpoint it
    /// wrote.
    #[error("stopped on request after step {global_step}; its checkpoint is {}: continue with --resume", checkpoint.display())]
    Stopped {
        /// The last step done.
        global_step: usize,
        /// Its checkpoint.
        checkpoint: PathBuf,
    },
    /// A checkpoint or the final model could not be written (a full disk, say): training stopped
    /// there, and `--resume` continues from the last checkpoint written.
    #[error("could not write {what}: {error}; training stopped after step {global_step}: free space (or fix the cause) and run again with --resume to continue from {}", resume_from.as_ref().map_or("the first step".to_string(), |p| p.display().to_string()))]
    WriteFailed {
        /// What was being written: `the checkpoint of step N` or `the final model`.
        what: String,
        /// The last step done.
        global_step: usize,
        /// The newest checkpoint on disk, where `--resume` continues.
        resume_from: Option<PathBuf>,
        /// Why the write failed.
        error: Box<TrainError>,
    },
    /// The run directory is claimed by another process's run ([`crate::RunLock`]).
    #[error("{} is in use by another run ({}); wait for it to finish or stop it, or choose another --out", dir.display(), pid.map_or("its process id unknown".to_string(), |p| format!("process {p}")))]
    InUse {
        /// The run directory.
        dir: PathBuf,
        /// The process id the lock file names, if it could be read.
        pid: Option<u32>,
    },
    /// A `metrics.jsonl` line that cannot be read.
    #[error("{path}: line {line}: {msg}")]
    Metrics {
        /// The file.
        path: PathBuf,
        /// 1-based line.
        line: usize,
        /// What is wrong.
        msg: String,
    },
    /// A file operation failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// From the patch crate.
    #[error(transparent)]
    Patch(#[from] patchlm_patch::PatchError),
    /// From the model crate.
    #[error(transparent)]
    Model(#[from] patchlm_model::ModelError),
    /// From candle.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// Shorthand for results in this crate.
pub type Result<T, E = TrainError> = std::result::Result<T, E>;

pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> TrainError {
    let path = path.into();
    move |source| TrainError::Io { path, source }
}
