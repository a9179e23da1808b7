//! # patchlm-train: phase-aware training
//!
//! A run is a list of phases over pre-grouped datasets from `patchlm-patch`: the patch phase
//! (K tokens per position, on the first λ of the data) and the token phase (K = 1, on the
//! rest). Each phase gets a fresh [`AdamW`] and its own warmup + cosine schedule; the token phase
//! starts from all parameters of the patch phase. Tokens per optimizer step are the same in both
//! phases, with gradient accumulation over micro-batches. Checkpoints (weights, optimizer state,
//! position) are written atomically and a killed run resumes bit-identically on CPU. Metrics go
//! to `metrics.jsonl`, one line per step and per evaluation.
#![warn(missing_docs)]

pub mod checkpoint;
pub mod config;
pub mod error;
pub mod optim;
pub mod trainer;

pub use checkpoint::{list_checkpoints, load_checkpoint, save_checkpoint, Checkpoint, TrainState};
pub use config::{RunConfig, TrainConfig};
pub use error::{Result, TrainError};
pub use optim::{clip_grad_norm, clip_scale, grad_norm, lr_at, AdamW, AdamWConfig};
pub use trainer::{plan_phases, read_metrics, EvalMetrics, PhasePlan, PhaseSummary, RunSummary, StepMetrics, Trainer};
