//! Token-level perplexity and bits per byte.

use candle_core::Device;
use patchlm_model::{score_tokens, Llama};

use crate::error::{EvalError, Result};

/// How sequences are cut into windows.
#[derive(Debug, Clone, Copy, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct WindowConfig {
    /// Positions per window (at least 1, at most the model's context; more is refused).
    pub context: usize,
    /// Sliding stride, at most `context`; `None` or `Some(context)` gives non-overlapping
    /// windows. With a smaller stride every window after the first scores only its last `stride`
    /// tokens, given the rest of the window as context (as in HF's perplexity guide).
    pub stride: Option<usize>,
}

/// Sums over scored tokens.
#[derive(Debug, Clone, Copy, Default, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct NllSum {
    /// Tokens scored.
    pub tokens: u64,
    /// Total negative log-likelihood in nats.
    pub nll: f64,
    /// UTF-8 bytes of the text the tokens encode (for bits per byte).
    pub bytes: u64,
    /// Words of that text, as lm-evaluation-harness counts them ([`count_words`]; for word
    /// perplexity).
    #[serde(default)]
    pub words: u64,
    /// Documents scored.
    pub documents: u64,
}

impl NllSum {
    /// Adds another sum.
    pub fn add(&mut self, o: &NllSum) {
        self.tokens += o.tokens;
        self.nll += o.nll;
        self.bytes += o.bytes;
        self.words += o.words;
        self.documents += o.documents;
    }

    /// Mean NLL per token (nats).
    pub fn mean_nll(&self) -> f64 {
        self.nll / self.tokens.max(1) as f64
    }

    /// exp(mean NLL).
    pub fn perplexity(&self) -> f64 {
        self.mean_nll().exp()
    }

    /// Total NLL in bits over the UTF-8 bytes of the text: tokenizer-independent.
    pub fn bits_per_byte(&self) -> f64 {
        self.nll / std::f64::consts::LN_2 / self.bytes.max(1) as f64
    }

    /// exp(total NLL / words): perplexity per word, as lm-evaluation-harness's `word_perplexity`
    /// (WikiText's headline number); tokenizer-independent too.
    pub fn word_perplexity(&self) -> f64 {
        (self.nll / self.words.max(1) as f64).exp()
    }
}

/// The words of `text` as lm-evaluation-harness counts them (`len(re.split(r"\s+", text))`):
/// one more than its runs of whitespace, so leading or trailing whitespace counts an empty word
/// and an empty text has one. Whitespace is Python's (`str.isspace`): Unicode's, and the
/// separators U+001C–U+001F.
pub fn count_words(text: &str) -> u64 {
    let mut words = 1;
    let mut in_space = false;
    for c in text.chars() {
        let space = c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c);
        words += u64::from(space && !in_space);
        in_space = space;
    }
    words
}

/// Per-token NLLs of `ids[1..]`, each token scored exactly once. A window feeds `ids[a..b)`
/// (at most `cfg.context` tokens) and scores the targets in `(a, b]` not scored before: the first
/// window has b = context; each next one moves b on by the stride (non-overlapping windows when
/// the stride is the context, so the first token of each window is predicted from one token of
/// context, as in training's T + 1 blocks); a = b − context.
pub fn sequence_nlls(model: &Llama, ids: &[u32], cfg: &WindowConfig, device: &Device) -> Result<Vec<f64>> {
    if cfg.context == 0 || cfg.stride == Some(0) {
        return Err(EvalError::Input(format!(
            "a scoring window needs a context and a stride of at least 1 token (got context {}, stride {})",
            cfg.context,
            cfg.stride.map_or("none".to_string(), |s| s.to_string())
        )));
    }
    let positions = model.config().max_position_embeddings;
    if cfg.context > positions {
        return Err(EvalError::Input(format!(
            "a scoring window of {} tokens is longer than the model's {positions} positions",
            cfg.context
        )));
    }
    let t = cfg.context;
    if cfg.stride.is_some_and(|s| s > t) {
        return Err(EvalError::Input(format!(
            "a stride of {} tokens is longer than the window ({t}): the tokens between windows would go unscored",
            cfg.stride.unwrap_or_default()
        )));
    }
    let stride = cfg.stride.unwrap_or(t);
    let n = ids.len();
    let mut out = Vec::with_capacity(n.saturating_sub(1));
    let mut done = 0usize; // targets 1..=done are scored
    while done + 1 < n {
        let b = if done == 0 { t.min(n - 1) } else { (done + stride).min(n - 1) };
        let a = b.saturating_sub(t);
        // ids[a..=b]: the window's input ids[a..b) and its targets ids[a + 1..=b]; those after
        // `done` are new.
        let lp = score_tokens(model, &ids[a..=b], device)?;
        out.extend(lp[done - a..].iter().map(|&x| -f64::from(x)));
        done = b;
    }
    Ok(out)
}

/// Scores one document's token ids (every id after the first is scored), whose text is `text`
/// (for its bytes and words).
pub fn score_document(model: &Llama, ids: &[u32], text: &str, cfg: &WindowConfig, device: &Device) -> Result<NllSum> {
    let nlls = sequence_nlls(model, ids, cfg, device)?;
    Ok(NllSum {
        tokens: nlls.len() as u64,
        nll: nlls.iter().sum(),
        bytes: text.len() as u64,
        words: count_words(text),
        documents: 1,
    })
}
