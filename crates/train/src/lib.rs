//! # patchlm-train: phase-aware training
//!
//! A run is a list of phases over pre-grouped datasets from `patchlm-patch`: the patch phase
//! (K tokens per position, on the first λ of the data) and the token phase (K = 1, on the
//! rest). Each phase gets a fresh [`AdamW`] and its own warmup + cosine schedule; the token phase
//! starts from all parameters of the patch phase. Tokens per optimizer step are the same in both
//! phases, with gradient accumulation over micro-batches. Checkpoints (weights, optimizer state,
//! position) are written atomically and a killed run resumes bit-identically on CPU. Metrics go
//! to `metrics.jsonl`, one line per step and per evaluation.
//!
//! The pipeline that `cargo xtask pretrain` runs, as library calls (a toy corpus and model):
//!
//! ```
//! use candle_core::Device;
//! use patchlm_model::ModelConfig;
//! use patchlm_patch::{build_patch_datasets, PatchConfig, PatchDataConfig};
//! use patchlm_train::{RunConfig, TrainConfig, Trainer};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let dir = tempfile::tempdir()?;
//! let corpus = dir.path().join("corpus.jsonl");
//! let line = |i: usize| format!("{{\"text\": \"note {i}: the cat sat on the mat, the dog sat on the log.\"}}\n");
//! std::fs::write(&corpus, (0..300).map(line).collect::<String>())?;
//!
//! // Text → tokenizer + shards (the data crate), then blocks of 16 positions (the patch crate):
//! // patches of K = 4 tokens for the first λ = 2/3 of the data, single tokens for the rest.
//! let mut data = patchlm_data::DataConfig::default();
//! data.tokenizer.vocab_size = 300;
//! let shards = dir.path().join("shards");
//! patchlm_data::build_shards(&[&corpus], &shards, &data, patchlm_data::TokenizerSource::Train, false)?;
//! let patch = PatchConfig { k: 4, lambda: 2.0 / 3.0 };
//! let blocks = PatchDataConfig { context: 16, ..Default::default() };
//! let blocks_dir = dir.path().join("patchdata");
//! build_patch_datasets(&shards, &blocks_dir, &patch, &blocks)?;
//!
//! // A tiny model over the tokenizer's 300 ids; the run directory gets metrics, checkpoints and
//! // the final model (HF format).
//! let mut model = ModelConfig::preset("tiny")?;
//! model.vocab_size = 300;
//! model.max_position_embeddings = 16;
//! let train = TrainConfig { tokens_per_step: 256, warmup_steps: 2, progress: false, ..Default::default() };
//! let cfg = RunConfig { seed: 1, preset: "tiny".into(), data, model, patch, blocks, train };
//! let run = dir.path().join("run");
//! let summary = Trainer::new(cfg, &blocks_dir, &run, Device::Cpu)?.run(false)?;
//! let phases: Vec<usize> = summary.phases.iter().map(|p| p.k).collect();
//! assert_eq!(phases, [4, 1]); // the patch phase, then the token phase from its weights
//! // λ/K + (1 − λ) = 1/2 of token-level training's cost, up to whole steps (here 15 and 7).
//! assert!((summary.relative_cost - 0.5).abs() < 0.02, "{}", summary.relative_cost);
//! assert!(summary.model_dir.join("model.safetensors").is_file() && run.join("metrics.jsonl").is_file());
//! # Ok(())
//! # }
//! ```
#![warn(missing_docs)]

pub mod checkpoint;
pub mod config;
pub mod error;
pub mod lock;
pub mod optim;
pub mod trainer;

pub use checkpoint::{
    list_checkpoints, load_checkpoint, save_checkpoint, verify_checkpoint, Checkpoint, TrainState, CHECKSUMS_FILE,
    RUN_CONFIG_FILE,
};
pub use config::{RunConfig, TrainConfig};
pub use error::{Result, TrainError};
pub use lock::{holder_pid, is_held, RunLock, RUN_LOCK_FILE};
pub use optim::{clip_grad_norm, clip_scale, grad_norm, lr_at, warmup_note, AdamW, AdamWConfig};
pub use trainer::{
    phase_switch, plan_phases, read_metrics, EvalMetrics, PhasePlan, PhaseSummary, RunSummary, StepMetrics, Trainer,
};
