//! Scoring text and sampling with a KV cache.

use candle_core::{DType, Device, Tensor, D};

use crate::config::ModelConfig;
use crate::error::{ModelError, Result};
use crate::llama::{KvCache, Llama};
use crate::weights::SplitMix64;

/// Log-softmax over the last dimension in f32, from basic ops.
pub fn log_softmax(logits: &Tensor) -> candle_core::Result<Tensor> {
    let x = logits.to_dtype(DType::F32)?;
    let m = x.max_keepdim(D::Minus1)?.detach();
    let shifted = x.broadcast_sub(&m)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    shifted.broadcast_sub(&lse)
}

/// Log-probability of each token given the ones before it: `out[i] = log p(ids[i+1] | ids[..=i])`
/// (length `ids.len() - 1`), in one forward pass over `ids[..ids.len() - 1]`, so at most
/// `max_position_embeddings + 1` ids (a training block). The targets are picked on the device:
/// only `ids.len() - 1` values come back, not the vocabulary's log-probabilities.
pub fn score_tokens(model: &Llama, ids: &[u32], device: &Device) -> Result<Vec<f32>> {
    if ids.len() < 2 {
        return Ok(Vec::new());
    }
    let n = ids.len() - 1;
    let input = Tensor::new(&ids[..n], device)?.unsqueeze(0)?;
    let lp = log_softmax(&model.forward(&input)?)?.squeeze(0)?;
    let targets = Tensor::new(&ids[1..], device)?.unsqueeze(1)?;
    Ok(lp.gather(&targets, 1)?.squeeze(1)?.to_vec1::<f32>()?)
}

/// Sampling settings, applied as Hugging Face `generate` applies its warpers: temperature, then
/// top-k, then top-p over the probabilities left.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct SamplingConfig {
    /// Softmax temperature; 0 means greedy (default 0.8).
    pub temperature: f64,
    /// Keep only the k most likely tokens; 0 keeps all (default 50).
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches p; 1 keeps all (default 0.95).
    pub top_p: f64,
    /// RNG seed (default 0).
    pub seed: u64,
}

impl SamplingConfig {
    /// Checks that each setting is in its range (a finite temperature of at least 0, a top-p
    /// from 0 to 1).
    pub fn validate(&self) -> Result<()> {
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return Err(ModelError::Input(format!(
                "temperature {} is out of range: give 0 (greedy) or more",
                self.temperature
            )));
        }
        if !(0.0..=1.0).contains(&self.top_p) {
            return Err(ModelError::Input(format!(
                "top-p {} is out of range: give a value from 0 to 1 (1 keeps all)",
                self.top_p
            )));
        }
        Ok(())
    }
}

impl Default for SamplingConfig {
    fn default() -> Self {
        Self { temperature: 0.8, top_k: 50, top_p: 0.95, seed: 0 }
    }
}

/// The distribution [`sample`] draws from: the tokens left of `logits` after temperature, top-k
/// and top-p, as HF transformers' `TemperatureLogitsWarper`, `TopKLogitsWarper` and
/// `TopPLogitsWarper` leave them (in that order), with their probabilities, most likely first.
/// Top-k keeps every token tied with the k-th largest logit; top-p keeps the most likely tokens
/// until their mass reaches `top_p` (the token that crosses it included), ties ranked as torch's
/// ascending sort leaves them (the later index first). A temperature of 0 is greedy: the first
/// largest logit alone.
pub fn sampling_distribution(logits: &[f32], cfg: &SamplingConfig) -> Vec<(u32, f64)> {
    if logits.is_empty() {
        return Vec::new();
    }
    if cfg.temperature <= 0.0 {
        let argmax = logits.iter().enumerate().fold(0usize, |b, (i, &v)| if v > logits[b] { i } else { b });
        return vec![(argmax as u32, 1.0)];
    }
    let mut idx: Vec<usize> = (0..logits.len()).collect();
    idx.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(b.cmp(&a)));
    if cfg.top_k > 0 && cfg.top_k < idx.len() {
        let kth = logits[idx[cfg.top_k - 1]];
        let keep = idx.iter().take_while(|&&i| logits[i] >= kth).count();
        idx.truncate(keep);
    }
    let maxl = logits[idx[0]] as f64;
    let mut probs: Vec<f64> = idx.iter().map(|&i| ((logits[i] as f64 - maxl) / cfg.temperature).exp()).collect();
    let total: f64 = probs.iter().sum();
    probs.iter_mut().for_each(|p| *p /= total);
    if cfg.top_p < 1.0 {
        let mut acc = 0.0;
        let mut keep = probs.len();
        for (j, p) in probs.iter().enumerate() {
            acc += p;
            if acc >= cfg.top_p {
                keep = j + 1;
                break;
            }
        }
        probs.truncate(keep);
        idx.truncate(keep);
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= total);
    }
    idx.into_iter().map(|i| i as u32).zip(probs).collect()
}

/// Draws a token id from `logits` with temperature, top-k and top-p (from
/// [`sampling_distribution`]).
pub fn sample(logits: &[f32], cfg: &SamplingConfig, rng: &mut SplitMix64) -> u32 {
    let dist = sampling_distribution(logits, cfg);
    let Some(&(last, _)) = dist.last() else { return 0 };
    if cfg.temperature <= 0.0 {
        return last;
    }
    let mut u = rng.uniform();
    for &(id, p) in &dist {
        if u < p {
            return id;
        }
        u -= p;
    }
    last
}

/// Continues `prompt` by up to `max_tokens` tokens, using a KV cache. Stops early at any id of
/// `stop` (drawn and returned), or once the last token drawn was predicted from a full context
/// (`max_position_embeddings` positions). An empty prompt, one longer than the context, or settings out of range
/// ([`SamplingConfig::validate`]) are refused.
pub fn generate(
    model: &Llama,
    prompt: &[u32],
    max_tokens: usize,
    cfg: &SamplingConfig,
    stop: &[u32],
    device: &Device,
) -> Result<Vec<u32>> {
    generate_streaming(model, prompt, max_tokens, cfg, stop, device, |_| {})
}

/// Refuses a prompt that [`generate`] cannot continue: no tokens, or more than the model's
/// context (`max_position_embeddings`) holds.
pub fn check_prompt(model: &ModelConfig, prompt: &[u32]) -> Result<()> {
    let limit = model.max_position_embeddings;
    if prompt.is_empty() {
        return Err(ModelError::Input("the prompt has no tokens: generating needs at least one".into()));
    }
    if prompt.len() > limit {
        return Err(ModelError::Input(format!(
            "the prompt has {} tokens and the model's context holds {limit}: shorten the prompt to at most {limit} tokens",
            prompt.len()
        )));
    }
    Ok(())
}

/// [`generate`], handing each token to `on_token` as soon as it is drawn (to print a
/// continuation as it grows); the same tokens, in the same order, as [`generate`] returns.
pub fn generate_streaming(
    model: &Llama,
    prompt: &[u32],
    max_tokens: usize,
    cfg: &SamplingConfig,
    stop: &[u32],
    device: &Device,
    mut on_token: impl FnMut(u32),
) -> Result<Vec<u32>> {
    cfg.validate()?;
    check_prompt(model.config(), prompt)?;
    let limit = model.config().max_position_embeddings;
    let mut rng = SplitMix64(cfg.seed);
    let mut cache = KvCache::new(model.config());
    let mut out = Vec::new();
    let mut logits = model.forward_cached(&Tensor::new(prompt, device)?.unsqueeze(0)?, &mut cache)?;
    for _ in 0..max_tokens {
        let row = logits.squeeze(0)?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        let next = sample(&row, cfg, &mut rng);
        out.push(next);
        on_token(next);
        // The next token would go at position cache.len(): past the context, stop.
        if stop.contains(&next) || cache.len() >= limit {
            break;
        }
        logits = model.forward_cached(&Tensor::new(&[next], device)?.unsqueeze(0)?, &mut cache)?;
    }
    Ok(out)
}
