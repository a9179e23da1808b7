//! `TrainConfig` and the fully resolved `RunConfig` saved with every run.

use patchlm_data::DataConfig;
use patchlm_model::ModelConfig;
use patchlm_patch::{PatchConfig, PatchDataConfig};

use crate::error::{Result, TrainError};
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
    /// Evaluate the token-level validation loss every this many steps (default 50; 0: only at
    /// the start and at the end of each phase) and at the end of each phase.
    pub eval_every: usize,
    /// Checkpoint every this many steps (default 100; 0: only at each phase end), at each phase
    /// end and at the end.
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
    /// Model preset the sizes start from (tiny, small, gpt2-small, 370m, 780m, 1.3b, 2.7b): a
    /// `preset` in a `--config` file or a `--set` picks its sizes, and `[model]` keys given
    /// beside it override them (so in a file that lists every `[model]` key, the keys decide).
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
    /// Checks the settings on their own, before any data is read: the model's shape, K and λ,
    /// the blocks' context and epochs, the optimizer's ranges (torch.optim.AdamW's), and a whole
    /// number of blocks per step in each phase (K·T tokens a patch-phase block, T a token-phase
    /// one). [`crate::plan_phases`] checks them again against the datasets.
    pub fn validate(&self) -> Result<()> {
        fn bad<T>(m: String) -> Result<T> {
            Err(TrainError::Config(m))
        }
        self.patch.validate()?;
        self.blocks.validate()?;
        self.model.validate()?;
        let tc = &self.train;
        match patchlm_model::parse_dtype(&tc.dtype) {
            Err(_) => return bad(format!("train.dtype {:?} is not f32 or bf16", tc.dtype)),
            // f16's narrow exponent range loses small gradients without loss scaling, which the
            // trainer does not do (the default token-level baseline in f16 on the CPU ended 0.58 nats
            // above f32).
            Ok(candle_core::DType::F16) => {
                return bad(format!(
                    "train.dtype {:?}: f16 training needs loss scaling, which patchlm does not do; use bf16 \
                     (the same memory and speed, f32's exponent range)",
                    tc.dtype
                ))
            }
            Ok(_) => {}
        }
        if tc.micro_batch == 0 {
            return bad("micro_batch must be at least 1".into());
        }
        if !(tc.lr > 0.0 && tc.lr.is_finite()) {
            return bad(format!("lr must be positive, got {}", tc.lr));
        }
        // The ranges torch.optim.AdamW accepts, and clipping's.
        let a = &tc.adamw;
        for (name, value, ok, range) in [
            ("min_lr_ratio", tc.min_lr_ratio, (0.0..=1.0).contains(&tc.min_lr_ratio), "in [0, 1]"),
            ("grad_clip", tc.grad_clip, tc.grad_clip >= 0.0 && tc.grad_clip.is_finite(), "0 (off) or positive"),
            ("adamw.beta1", a.beta1, (0.0..1.0).contains(&a.beta1), "in [0, 1)"),
            ("adamw.beta2", a.beta2, (0.0..1.0).contains(&a.beta2), "in [0, 1)"),
            ("adamw.eps", a.eps, a.eps >= 0.0 && a.eps.is_finite(), "0 or positive"),
            (
                "adamw.weight_decay",
                a.weight_decay,
                a.weight_decay >= 0.0 && a.weight_decay.is_finite(),
                "0 or positive",
            ),
        ] {
            if !ok {
                return bad(format!("{name} must be {range}, got {value}"));
            }
        }
        let t = self.blocks.context;
        let mut blocks = vec![("token", t)];
        if self.patch.lambda > 0.0 {
            blocks.insert(0, ("patch", self.patch.patch_block_tokens(t)));
        }
        for (name, block_tokens) in blocks {
            if tc.tokens_per_step < block_tokens {
                return bad(format!(
                    "tokens_per_step {} is smaller than one {name}-phase block of {block_tokens} tokens",
                    tc.tokens_per_step
                ));
            }
            if !tc.tokens_per_step.is_multiple_of(block_tokens) {
                return bad(format!(
                    "tokens_per_step {} is not divisible by the {name}-phase block of {block_tokens} tokens, so the phases would not see equal tokens per step; use a multiple of {block_tokens}, e.g. {}",
                    tc.tokens_per_step,
                    tc.tokens_per_step / block_tokens * block_tokens
                ));
            }
        }
        Ok(())
    }

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
