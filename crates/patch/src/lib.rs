//! # patchlm-patch: everything that knows what a patch is
//!
//! Patch-level training (Shao et al., 2024) trains the first fraction λ of the data at patch
//! level: every K consecutive tokens are averaged into one patch embedding, the model reads the
//! sequence of patches and predicts all K tokens of the next patch with its one LM head. This
//! crate holds [`PatchConfig`] and the cost model, the pre-grouped patch/token datasets cut from
//! the data crate's shards ([`build_patch_datasets`], [`BlockReader`]), and the objective
//! ([`patch_embeddings`], [`patch_loss`]) with its parameter gradients ([`patch_forward`] →
//! [`PatchPass::backward`]). It is the only crate that knows K and λ.
//!
//! ```
//! use patchlm_patch::PatchConfig;
//! let paper = PatchConfig { k: 4, lambda: 2.0 / 3.0 };
//! assert!((paper.relative_cost() - 0.5).abs() < 1e-12);
//! ```
#![warn(missing_docs)]

pub mod config;
pub mod dataset;
pub mod error;
pub mod objective;

pub use config::{PatchConfig, DEFAULT_K, DEFAULT_LAMBDA};
pub use dataset::{
    build_patch_datasets, permutation, permuted_index, BlockFile, BlockReader, PatchDataConfig, PatchManifest,
};
pub use error::{PatchError, Result};
pub use objective::{
    next_patch_loss_composed, next_patch_loss_from_logits, patch_backward_tape, patch_embeddings, patch_forward,
    patch_forward_tape, patch_loss, patch_loss_and_grads, PatchPass, PatchTape,
};
