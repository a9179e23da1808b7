//! # patchlm-eval: evaluation harnesses
//!
//! Token-level perplexity, bits per byte and word perplexity ([`sequence_nlls`],
//! [`score_document`], [`perplexity_of_texts`], as lm-evaluation-harness scores text) with
//! non-overlapping or sliding windows, and zero-shot multiple choice
//! with lm-eval-harness semantics ([`load_task`], [`score_task`]): BIG-bench JSON tasks and
//! HellaSwag / PIQA / ARC JSONL, plus a held-out continuation task built from any text
//! ([`continuation_task`]). [`report`] writes comparison reports: a Markdown table and PNG/SVG
//! plots of loss curves. Uses the data crate's sources, shards and tokenizer and the model crate;
//! knows nothing of patches or training.
//!
//! ```
//! use candle_core::Device;
//! use patchlm_eval::{pick, score_document, WindowConfig};
//! use patchlm_model::{init_model, ModelConfig};
//!
//! let cfg = ModelConfig::preset("tiny").unwrap();
//! let (model, _params) = init_model(&cfg, &Device::Cpu, 0).unwrap();
//! let ids: Vec<u32> = (0..100).map(|i| (i * 37 % 250) as u32).collect();
//!
//! // Every token after the first is scored once, in windows of 32 or sliding by 8.
//! let whole = WindowConfig { context: 32, stride: None };
//! let sliding = WindowConfig { context: 32, stride: Some(8) };
//! let text = "the text the ids encode";
//! let a = score_document(&model, &ids, text, &whole, &Device::Cpu).unwrap();
//! let b = score_document(&model, &ids, text, &sliding, &Device::Cpu).unwrap();
//! assert_eq!((a.tokens, b.tokens), (99, 99));
//! // An untrained model is close to uniform over its vocabulary.
//! let uniform = (cfg.vocab_size as f64).ln();
//! assert!((a.mean_nll() - uniform).abs() < 0.5, "{} vs {uniform}", a.mean_nll());
//! println!("perplexity {:.1}, {:.2} bits per byte", a.perplexity(), a.bits_per_byte());
//!
//! // Zero-shot multiple choice picks the highest log-likelihood, raw and per character.
//! assert_eq!(pick(&[-9.0, -4.0, -6.0], &[10, 4, 2]), (1, 0));
//! ```
#![warn(missing_docs)]

mod bigbench;
pub mod error;
pub mod perplexity;
pub mod report;
pub mod tasks;
pub mod zeroshot;

use candle_core::Device;
use patchlm_model::Llama;
use tokenizers::Tokenizer;

pub use error::{EvalError, Result};
pub use perplexity::{count_words, score_document, sequence_nlls, NllSum, WindowConfig};
pub use tasks::{continuation_task, write_task_jsonl, ContinuationConfig};
pub use zeroshot::{
    choice_loglikelihoods, encode_pair, hellaswag_clean, load_task, load_task_files, pair_loglikelihoods, pick,
    score_task, stderr_of, McExample, Sample, TaskResult,
};

/// Perplexity, bits per byte and word perplexity of documents (such as the data crate's
/// [`patchlm_data::Documents`] of text inputs: files, directories, JSONL, Parquet, read with the
/// caller's [`patchlm_data::SourceConfig`]), each scored as lm-evaluation-harness's
/// `loglikelihood_rolling` scores one (its WikiText task): after `prefix` (lm-eval's
/// `prefix_token_id`: the BOS token, or EOS where there is none) every token of the text is
/// predicted, and nothing after it (no EOS). The text is encoded as lm-eval's Hugging Face
/// tokenizer encodes it (`encode(text, add_special_tokens=False)`): the string of a special token
/// in it is that token (the data stage, by contrast, trains on such strings as characters).
/// With `progress`, a progress line on stderr counts documents and tokens scored.
pub fn perplexity_of_texts(
    model: &Llama,
    tok: &Tokenizer,
    prefix: u32,
    docs: impl IntoIterator<Item = patchlm_data::Result<patchlm_data::Document>>,
    windows: &WindowConfig,
    device: &Device,
    progress: bool,
) -> Result<NllSum> {
    let mut total = NllSum::default();
    let mut pb = Progress::new(None, progress, "text");
    for doc in docs {
        let doc = doc?;
        let mut ids = vec![prefix];
        // As lm-eval's HF tokenizer encodes it: a special token's string in the text is that token.
        ids.extend(tok.encode(doc.text.as_str(), false).map_err(|e| EvalError::Tokenizer(e.to_string()))?.get_ids());
        total.add(&score_document(model, &ids, &doc.text, windows, device)?);
        scored(&mut pb, &total);
    }
    pb.finish_and_clear();
    Ok(total)
}

/// A progress line for `len` items (documents, questions), or a count where the length is not
/// known beforehand; hidden without `show`. Where stderr is no terminal (a batch job's log, where
/// indicatif draws nothing), a line at most each `PATCHLM_LOG_SECS` (a minute;
/// [`patchlm_data::progress`]) says how far the work is instead.
pub(crate) struct Progress {
    pb: indicatif::ProgressBar,
    log: patchlm_data::progress::LogClock,
}

impl Progress {
    pub(crate) fn new(len: Option<u64>, show: bool, prefix: &str) -> Self {
        Self::with_clock(len, show, prefix, patchlm_data::progress::LogClock::for_stderr(show))
    }

    /// As [`Progress::new`], with log lines when `log` strikes.
    fn with_clock(len: Option<u64>, show: bool, prefix: &str, log: patchlm_data::progress::LogClock) -> Self {
        use indicatif::{ProgressBar, ProgressStyle};
        let (pb, template) = match len {
            _ if !show => (ProgressBar::hidden(), ""),
            Some(n) => {
                (ProgressBar::new(n), "{prefix:>12} [{elapsed_precise}] {wide_bar} {pos}/{len}, eta {eta}  {msg}")
            }
            None => (ProgressBar::new_spinner(), "{prefix:>12} [{elapsed_precise}] {spinner} {pos} documents, {msg}"),
        };
        if let Ok(style) = ProgressStyle::with_template(template) {
            pb.set_style(style);
        }
        pb.set_prefix(prefix.to_string());
        Self { pb, log }
    }

    /// One more item done, with the message to show beside the count (made only where a bar
    /// or a log line shows it).
    pub(crate) fn inc(&mut self, msg: impl FnOnce() -> Option<String>) {
        self.pb.inc(1);
        if !self.pb.is_hidden() || self.log.is_on() {
            if let Some(m) = msg() {
                self.pb.set_message(m);
            }
        }
        if self.log.strike() {
            eprintln!("{}", self.log_line());
        }
    }

    /// Where the work stands, as a log line: `hellaswag: 40/400 (10%), acc 0.31, eta 2 minutes`,
    /// or without a length `text: 3 documents, 2048 tokens, 900 tokens/s`.
    fn log_line(&self) -> String {
        let (pos, msg) = (self.pb.position(), self.pb.message());
        let sep = if msg.is_empty() { "" } else { ", " };
        match self.pb.length() {
            Some(n) => format!(
                "{}: {pos}/{n} ({:.0}%){sep}{msg}, eta {}",
                self.pb.prefix(),
                100.0 * pos as f64 / n.max(1) as f64,
                indicatif::HumanDuration(self.pb.eta())
            ),
            None => {
                let unit = if pos == 1 { "document" } else { "documents" };
                format!("{}: {pos} {unit}{sep}{msg}", self.pb.prefix())
            }
        }
    }

    pub(crate) fn finish_and_clear(&self) {
        self.pb.finish_and_clear();
    }
}

/// Moves a perplexity progress line on by one document.
fn scored(pb: &mut Progress, total: &NllSum) {
    let elapsed = pb.pb.elapsed();
    pb.inc(|| {
        let secs = elapsed.as_secs_f64().max(1e-9);
        Some(format!("{} tokens, {:.0} tokens/s", total.tokens, total.tokens as f64 / secs))
    });
}

/// Perplexity, bits per byte and word perplexity of one split of the data crate's shards (e.g.
/// the validation split): each stored document is scored as training saw it (BOS, the text, EOS:
/// the EOS is predicted too, unlike [`perplexity_of_texts`]), its bytes and words taken from its
/// decoded text. `max_documents` caps how many documents are scored. With `progress`, a progress
/// bar on stderr.
#[allow(clippy::too_many_arguments)]
pub fn perplexity_of_split(
    model: &Llama,
    tok: &Tokenizer,
    ds: &patchlm_data::Dataset,
    split: patchlm_data::Split,
    windows: &WindowConfig,
    device: &Device,
    max_documents: Option<usize>,
    progress: bool,
) -> Result<NllSum> {
    let mut total = NllSum::default();
    let stream = ds.split(split);
    let n = stream.num_documents().min(max_documents.map_or(u64::MAX, |m| m as u64));
    let mut pb = Progress::new(Some(n), progress, "shards");
    for i in 0..n {
        let ids = stream.document(i)?.to_vec();
        let text = tok.decode(&ids, true).map_err(|e| EvalError::Tokenizer(e.to_string()))?;
        total.add(&score_document(model, &ids, &text, windows, device)?);
        scored(&mut pb, &total);
    }
    pb.finish_and_clear();
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

#[cfg(test)]
mod tests {
    use super::*;
    use patchlm_data::progress::LogClock;

    fn every_step() -> LogClock {
        LogClock::every(Some(std::time::Duration::ZERO))
    }

    #[test]
    fn log_lines_say_how_far_the_work_is() {
        // Tests have no terminal: the bar draws nothing, and the lines carry the message.
        let mut p = Progress::with_clock(Some(4), true, "hellaswag", every_step());
        p.inc(|| Some("acc 0.50".into()));
        let line = p.log_line();
        assert!(line.starts_with("hellaswag: 1/4 (25%), acc 0.50, eta "), "{line}");
        p.inc(|| None);
        assert!(p.log_line().starts_with("hellaswag: 2/4 (50%), acc 0.50, eta "), "{}", p.log_line());
        // Without a length: documents counted, one in the singular; the perplexity message.
        let mut p = Progress::with_clock(None, true, "text", every_step());
        let total = NllSum { tokens: 2048, ..NllSum::default() };
        scored(&mut p, &total);
        let line = p.log_line();
        assert!(line.starts_with("text: 1 document, 2048 tokens, ") && line.ends_with(" tokens/s"), "{line}");
        p.inc(|| None);
        assert!(p.log_line().starts_with("text: 2 documents, 2048 tokens"), "{}", p.log_line());
        // No message: no separator.
        let mut p = Progress::with_clock(Some(2), true, "piqa", every_step());
        p.inc(|| None);
        assert!(p.log_line().starts_with("piqa: 1/2 (50%), eta "), "{}", p.log_line());
    }
}
