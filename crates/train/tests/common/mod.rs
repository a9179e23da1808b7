//! What the train crate's test binaries share.

#![allow(dead_code, clippy::unwrap_used)]

use std::path::{Path, PathBuf};

use patchlm_model::ModelConfig;
use patchlm_patch::{build_patch_datasets, PatchConfig, PatchDataConfig};
use patchlm_train::{RunConfig, TrainConfig};

/// Tiny corpus → shards → patch datasets; returns (shards dir, patch data dir, run config).
pub fn pipeline(dir: &Path, lambda: f64) -> (PathBuf, PathBuf, RunConfig) {
    pipeline_of(dir, lambda, |i| {
        let words: Vec<String> = (0..40).map(|j| format!("w{}", (i * 7 + j * 13) % 61)).collect();
        words.join(" ")
    })
}

/// [`pipeline`] over 400 documents that `doc` writes.
pub fn pipeline_of(dir: &Path, lambda: f64, doc: impl Fn(usize) -> String) -> (PathBuf, PathBuf, RunConfig) {
    let mut s = String::new();
    for i in 0..400 {
        s += &serde_json::json!({"text": doc(i)}).to_string();
        s.push('\n');
    }
    let input = dir.join("in.jsonl");
    std::fs::write(&input, s).unwrap();
    let mut data = patchlm_data::DataConfig::default();
    data.tokenizer.vocab_size = 300;
    data.val_fraction = 0.1;
    let shards = dir.join("shards");
    patchlm_data::build_shards(&[&input], &shards, &data, patchlm_data::TokenizerSource::Train, false).unwrap();
    let patch = PatchConfig { k: 4, lambda };
    let blocks = PatchDataConfig { context: 8, seed: 1, epochs: 1, max_val_blocks: 8, max_tokens: 0 };
    let pdir = dir.join("patchdata");
    build_patch_datasets(&shards, &pdir, &patch, &blocks).unwrap();
    let mut model = ModelConfig::preset("tiny").unwrap();
    model.vocab_size = 300;
    model.max_position_embeddings = 8;
    let train = TrainConfig {
        tokens_per_step: 128,
        micro_batch: 2,
        lr: 3e-3,
        warmup_steps: 2,
        eval_every: 3,
        checkpoint_every: 1,
        keep_checkpoints: 2,
        max_steps_per_phase: 6,
        progress: false,
        ..Default::default()
    };
    let cfg = RunConfig { seed: 7, preset: "tiny".into(), data, model, patch, blocks, train };
    (shards, pdir, cfg)
}
