//! `PatchConfig { k, lambda }` and the cost model.

use crate::error::{PatchError, Result};

/// Default patch size K (the paper's).
pub const DEFAULT_K: usize = 4;
/// Default fraction λ of the data trained at patch level (the paper's 2/3).
pub const DEFAULT_LAMBDA: f64 = 2.0 / 3.0;

/// Patch-level training settings.
#[derive(Debug, Clone, Copy, serde::Serialize, serde::Deserialize, PartialEq)]
#[serde(default)]
pub struct PatchConfig {
    /// Tokens per patch, K ≥ 1 (default 4). K = 1 is ordinary token-level training.
    pub k: usize,
    /// Fraction of the training data (or of the epochs) trained at patch level, in [0, 1)
    /// (default 2/3). λ = 0 is the token-level baseline.
    pub lambda: f64,
}

impl Default for PatchConfig {
    fn default() -> Self {
        Self { k: DEFAULT_K, lambda: DEFAULT_LAMBDA }
    }
}

impl PatchConfig {
    /// Checks K ≥ 1 and λ in [0, 1).
    pub fn validate(&self) -> Result<()> {
        if self.k == 0 {
            return Err(PatchError::Config("patch size k must be at least 1 (k = 1 is token-level training)".into()));
        }
        if !(0.0..1.0).contains(&self.lambda) || self.lambda.is_nan() {
            return Err(PatchError::Config(format!(
                "lambda must be in [0, 1) (the fraction of data trained at patch level), got {}",
                self.lambda
            )));
        }
        Ok(())
    }

    /// Training tokens in one patch-phase block at context `t`: T patches of K tokens, K·T (a
    /// token-phase block of T + 1 tokens holds T).
    pub fn patch_block_tokens(&self, t: usize) -> usize {
        self.k * t
    }

    /// Cost relative to token-level training on the same data: λ/K + (1 − λ).
    pub fn relative_cost(&self) -> f64 {
        self.lambda / self.k as f64 + (1.0 - self.lambda)
    }

    /// Training FLOPs of a run over `tokens` training tokens, given the model's FLOPs per
    /// position: the patch phase runs λ·tokens/K positions, the token phase (1 − λ)·tokens.
    pub fn run_flops(&self, tokens: f64, flops_per_position: f64) -> f64 {
        tokens * self.relative_cost() * flops_per_position
    }

    /// Tokens a token-level run may train on for the same compute as this config on `tokens`
    /// tokens (the paper's "equal compute" baseline): round(tokens · (λ/K + 1 − λ)).
    pub fn equal_compute_tokens(&self, tokens: u64) -> u64 {
        (tokens as f64 * self.relative_cost()).round() as u64
    }
}
