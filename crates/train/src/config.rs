//! `TrainConfig` and the fully resolved `RunConfig` saved with every run.

use patchlm_data::DataConfig;
use patchlm_model::ModelConfig;
use patchlm_patch::{PatchConfig, PatchDataConfig};

use crate::optim::AdamWConfig;

/// Training settings. Defaults follow the paper where it gives one.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq)]
#[serde(default)]
pub struct TrainConfig {
    /// Tokens consumed per optimizer step, the same in both phases (default 16384).
    pub tokens_per_step: usize,
    /// Sequences per forward pass; a step accumulates gradients over as many micro-batches as
    /// its batch needs (default 8).
    pub micro_batch: usize,
    /// Peak learning rate (default 3e-4, the paper's).
    pub lr: f64,
    /// Final learning rate of the cosine decay, as a fraction of `lr` (default 0).
    pub min_lr_ratio: f64,
    /// Warmup steps of each phase, capped at the phase's length (default 2000, the paper's).
    pub warmup_steps: usize,
    /// AdamW settings.
    pub adamw: AdamWConfig,
    /// Global grad-norm clip (default 1.0; 0 turns it off).
    pub grad_clip: f64,
    /// Evaluate the token-level validation loss every this many steps (default 50) and at the
    /// end of each phase.
    pub eval_every: usize,
    /// Checkpoint every this many steps (default 100), at each phase end and at the end.
    pub checkpoint_every: usize,
    /// Checkpoints kept (default 3).
    pub keep_checkpoints: usize,
    /// Stop each phase after at most this many steps (default 0 = no limit).
    pub max_steps_per_phase: usize,
    /// Peak FLOP/s for the MFU estimate (default 989e12: H100 dense bf16).
    pub peak_flops: f64,
    /// Show progress bars (default true).
    pub progress: bool,
    /// Compute dtype of activations and matmuls: `f32` (default) or `bf16` (mixed precision:
    /// f32 master weights and optimizer state, f32 norm statistics, softmax and loss). Left out
    /// of the saved config when f32, so configs from before this setting keep their fingerprint.
    #[serde(skip_serializing_if = "is_f32")]
    pub dtype: String,
}

fn is_f32(s: &str) -> bool {
    s == "f32"
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            tokens_per_step: 16384,
            micro_batch: 8,
            lr: 3e-4,
            min_lr_ratio: 0.0,
            warmup_steps: 2000,
            adamw: AdamWConfig::default(),
            grad_clip: 1.0,
            eval_every: 50,
            checkpoint_every: 100,
            keep_checkpoints: 3,
            max_steps_per_phase: 0,
            peak_flops: 989e12,
            progress: true,
            dtype: "f32".into(),
        }
    }
}

/// Everything that defines a run, fully resolved; saved as `config.toml` in the run directory
/// and fingerprinted into every checkpoint.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq, Default)]
#[serde(default)]
pub struct RunConfig {
    /// Seed of the model initialization.
    pub seed: u64,
    /// Model preset the sizes started from (informational; `model` is authoritative).
    pub preset: String,
    /// Data stage settings.
    pub data: DataConfig,
    /// The model (vocabulary size taken from the tokenizer).
    pub model: ModelConfig,
    /// K and λ.
    pub patch: PatchConfig,
    /// How blocks are cut (context length T, seed, epochs).
    pub blocks: PatchDataConfig,
    /// Training settings.
    pub train: TrainConfig,
}

impl RunConfig {
    /// `sha256:<hex>` of the parts that determine the trained weights (everything but the
    /// display and bookkeeping settings), so a checkpoint from a different config is refused.
    pub fn fingerprint(&self) -> String {
        let mut c = self.clone();
        c.train.progress = true;
        c.train.checkpoint_every = 0;
        c.train.keep_checkpoints = 0;
        c.train.eval_every = 0;
        c.train.peak_flops = 0.0;
        let json = serde_json::to_string(&c).unwrap_or_default();
        patchlm_data::shard::sha256_bytes(json.as_bytes())
    }
}
