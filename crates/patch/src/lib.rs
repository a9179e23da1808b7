//! # patchlm-patch
//!
//! Everything that knows what a patch is: `PatchConfig { k, lambda }` and the cost model,
//! pre-grouped patch datasets built from the data crate's shards, the patch embedding (mean of K
//! token embeddings) and the next-patch loss. The only crate that knows K and λ.
