//! # patchlm-eval: evaluation harnesses
//!
//! Token-level perplexity and bits per byte ([`sequence_nlls`], [`score_document`],
//! [`perplexity_of_texts`]) with non-overlapping or sliding windows, and zero-shot multiple choice
//! with lm-eval-harness semantics ([`load_task`], [`score_task`]): BIG-bench JSON tasks and
//! HellaSwag / PIQA / ARC JSONL, plus a held-out continuation task built from any text
//! ([`continuation_task`]). [`report`] writes comparison reports: a Markdown table and PNG/SVG
//! plots of loss curves. Uses the data crate's sources, shards and tokenizer and the model crate;
//! knows nothing of patches or training.
#![warn(missing_docs)]

pub mod error;
pub mod perplexity;
pub mod report;
pub mod tasks;
pub mod zeroshot;

use std::path::Path;

use candle_core::Device;
use patchlm_model::Llama;
use tokenizers::Tokenizer;

pub use error::{EvalError, Result};
pub use perplexity::{score_document, sequence_nlls, NllSum, WindowConfig};
pub use tasks::{continuation_task, write_task_jsonl, ContinuationConfig};
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

/// Perplexity and bits per byte of one split of the data crate's shards (e.g. the validation
/// split): each stored document is scored as stored (the data stage framed it with BOS/EOS), its
/// byte count taken from its decoded text. `max_documents` caps how many documents are scored.
pub fn perplexity_of_split(
    model: &Llama,
    tok: &Tokenizer,
    ds: &patchlm_data::Dataset,
    split: patchlm_data::Split,
    windows: &WindowConfig,
    device: &Device,
    max_documents: Option<usize>,
) -> Result<NllSum> {
    let mut total = NllSum::default();
    let stream = ds.split(split);
    let n = stream.num_documents().min(max_documents.map_or(u64::MAX, |m| m as u64));
    for i in 0..n {
        let ids = stream.document(i)?.to_vec();
        let text = tok.decode(&ids, true).map_err(|e| EvalError::Tokenizer(e.to_string()))?;
        total.add(&score_document(model, &ids, text.len() as u64, windows, device)?);
    }
    Ok(total)
}

/// The texts of one split's documents (decoded without special tokens), e.g. to build a
/// held-out task from the validation split.
pub fn split_texts(tok: &Tokenizer, ds: &patchlm_data::Dataset, split: patchlm_data::Split) -> Result<Vec<String>> {
    let stream = ds.split(split);
    (0..stream.num_documents())
        .map(|i| {
            let ids = stream.document(i)?.to_vec();
            tok.decode(&ids, true).map_err(|e| EvalError::Tokenizer(e.to_string()))
        })
        .collect()
}
