//! # patchlm-eval: evaluation harnesses
//!
//! Token-level perplexity and bits per byte ([`sequence_nlls`], [`score_document`],
//! [`perplexity_of_texts`]) with non-overlapping or sliding windows, and zero-shot multiple choice
//! with lm-eval-harness semantics ([`load_task`], [`score_task`]): BIG-bench JSON tasks and
//! HellaSwag / PIQA / ARC JSONL. Uses the data crate's sources and tokenizer and the model crate;
//! knows nothing of patches.
#![warn(missing_docs)]

pub mod error;
pub mod perplexity;
pub mod zeroshot;

use std::path::Path;

use candle_core::Device;
use patchlm_model::Llama;
use tokenizers::Tokenizer;

pub use error::{EvalError, Result};
pub use perplexity::{score_document, sequence_nlls, NllSum, WindowConfig};
pub use zeroshot::{choice_loglikelihoods, load_task, pick, score_task, stderr_of, McExample, TaskResult};

/// Perplexity and bits per byte of text inputs (files, directories, JSONL, Parquet; see the data
/// crate's sources): each document framed as in training (BOS if given, the tokens, EOS).
pub fn perplexity_of_texts<P: AsRef<Path>>(
    model: &Llama,
    tok: &Tokenizer,
    specials: &patchlm_data::tokenizer::SpecialTokens,
    inputs: &[P],
    windows: &WindowConfig,
    device: &Device,
) -> Result<NllSum> {
    let mut total = NllSum::default();
    for doc in patchlm_data::Documents::open(inputs, &patchlm_data::SourceConfig::default())? {
        let doc = doc?;
        let ids = patchlm_data::tokenizer::encode_document(tok, &doc.text, specials)?;
        total.add(&score_document(model, &ids, doc.text.len() as u64, windows, device)?);
    }
    Ok(total)
}
