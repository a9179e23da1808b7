//! Zero-shot multiple choice with lm-eval-harness semantics: for each choice, the log-likelihood
//! of the continuation given the context; `acc` picks the largest sum of log-probabilities,
//! `acc_norm` the largest sum divided by the continuation's byte length.

use std::path::Path;

use candle_core::{Device, Tensor};
use patchlm_model::{log_softmax, Llama};
use tokenizers::Tokenizer;

use crate::error::{EvalError, Result};

/// One multiple-choice question.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct McExample {
    /// The context (question, prompt).
    pub context: String,
    /// Continuations, each scored after the context (usually starting with a space).
    pub choices: Vec<String>,
    /// Index of the correct choice.
    pub gold: usize,
}

/// Accuracy of one task.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TaskResult {
    /// Task name (file stem).
    pub task: String,
    /// Questions scored.
    pub n: usize,
    /// Accuracy by summed log-probability.
    pub acc: f64,
    /// Its standard error.
    pub acc_stderr: f64,
    /// Accuracy by log-probability per continuation byte.
    pub acc_norm: f64,
    /// Its standard error.
    pub acc_norm_stderr: f64,
}

/// lm-eval's sample standard error of a mean of 0/1 values: sqrt(p(1 − p)/(n − 1)).
pub fn stderr_of(p: f64, n: usize) -> f64 {
    if n < 2 {
        return 0.0;
    }
    (p * (1.0 - p) / (n - 1) as f64).sqrt()
}

/// The choice `acc` and `acc_norm` pick from per-choice log-likelihoods and byte lengths.
pub fn pick(lls: &[f64], byte_lens: &[usize]) -> (usize, usize) {
    let argmax = |v: &[f64]| v.iter().enumerate().fold(0, |b, (i, &x)| if x > v[b] { i } else { b });
    let norm: Vec<f64> = lls.iter().zip(byte_lens).map(|(l, &n)| l / n.max(1) as f64).collect();
    (argmax(lls), argmax(&norm))
}

fn bad(path: &Path, line: usize, msg: impl Into<String>) -> EvalError {
    EvalError::Task { path: path.to_path_buf(), line, msg: msg.into() }
}

/// Loads a task: a BIG-bench `task.json` (`examples` with `input` and `target_scores`), or JSONL
/// in the HellaSwag (`ctx`, `endings`, `label`), PIQA (`goal`, `sol1`, `sol2`, `label`) or ARC
/// (`question`, `choices: {text, label}`, `answerKey`) format.
pub fn load_task(path: &Path) -> Result<Vec<McExample>> {
    let text = std::fs::read_to_string(path).map_err(|e| EvalError::Io { path: path.to_path_buf(), source: e })?;
    let trimmed = text.trim_start();
    if trimmed.starts_with('{') && path.extension().is_none_or(|e| e != "jsonl") {
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) {
            if let Some(examples) = v.get("examples").and_then(|e| e.as_array()) {
                return examples.iter().enumerate().map(|(i, e)| bigbench(path, i + 1, e)).collect();
            }
        }
    }
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let v: serde_json::Value =
            serde_json::from_str(line).map_err(|e| bad(path, i + 1, format!("invalid json: {e}")))?;
        out.push(jsonl_example(path, i + 1, &v)?);
    }
    if out.is_empty() {
        return Err(bad(path, 0, "no examples"));
    }
    Ok(out)
}

fn bigbench(path: &Path, n: usize, e: &serde_json::Value) -> Result<McExample> {
    let input = e.get("input").and_then(|x| x.as_str()).ok_or_else(|| bad(path, n, "example lacks \"input\""))?;
    let scores = e
        .get("target_scores")
        .and_then(|x| x.as_object())
        .ok_or_else(|| bad(path, n, "example lacks \"target_scores\" (not a multiple-choice task?)"))?;
    let mut choices = Vec::new();
    let mut gold = None;
    let mut best = f64::MIN;
    for (c, s) in scores {
        let s = s.as_f64().unwrap_or(0.0);
        if s > best {
            best = s;
            gold = Some(choices.len());
        }
        choices.push(format!(" {c}"));
    }
    let gold = gold.ok_or_else(|| bad(path, n, "no choices"))?;
    Ok(McExample { context: input.to_string(), choices, gold })
}

fn label_index(v: &serde_json::Value, keys: &[String]) -> Option<usize> {
    if let Some(i) = v.as_u64() {
        return Some(i as usize);
    }
    let s = v.as_str()?;
    if let Some(i) = keys.iter().position(|k| k == s) {
        return Some(i);
    }
    s.parse().ok()
}

fn jsonl_example(path: &Path, line: usize, v: &serde_json::Value) -> Result<McExample> {
    let s = |k: &str| v.get(k).and_then(|x| x.as_str());
    if let (Some(ctx), Some(endings)) = (s("ctx"), v.get("endings").and_then(|x| x.as_array())) {
        let choices: Vec<String> = endings.iter().filter_map(|e| e.as_str()).map(|e| format!(" {e}")).collect();
        let gold =
            v.get("label").and_then(|l| label_index(l, &[])).ok_or_else(|| bad(path, line, "missing \"label\""))?;
        return check(path, line, McExample { context: ctx.to_string(), choices, gold });
    }
    if let (Some(goal), Some(a), Some(b)) = (s("goal"), s("sol1"), s("sol2")) {
        let gold =
            v.get("label").and_then(|l| label_index(l, &[])).ok_or_else(|| bad(path, line, "missing \"label\""))?;
        let choices = vec![format!(" {a}"), format!(" {b}")];
        return check(path, line, McExample { context: format!("Question: {goal}\nAnswer:"), choices, gold });
    }
    if let (Some(q), Some(ch)) = (s("question"), v.get("choices")) {
        let texts: Vec<String> = ch
            .get("text")
            .and_then(|t| t.as_array())
            .map(|a| a.iter().filter_map(|x| x.as_str()).map(|x| format!(" {x}")).collect())
            .ok_or_else(|| bad(path, line, "\"choices\" lacks \"text\""))?;
        let labels: Vec<String> = ch
            .get("label")
            .and_then(|t| t.as_array())
            .map(|a| a.iter().filter_map(|x| x.as_str().map(str::to_string)).collect())
            .unwrap_or_default();
        let gold = v
            .get("answerKey")
            .and_then(|l| label_index(l, &labels))
            .ok_or_else(|| bad(path, line, "missing or unknown \"answerKey\""))?;
        return check(path, line, McExample { context: format!("Question: {q}\nAnswer:"), choices: texts, gold });
    }
    Err(bad(path, line, "not a HellaSwag (ctx, endings, label), PIQA (goal, sol1, sol2, label) or ARC (question, choices, answerKey) record"))
}

fn check(path: &Path, line: usize, e: McExample) -> Result<McExample> {
    if e.choices.len() < 2 || e.gold >= e.choices.len() {
        return Err(bad(path, line, format!("{} choices with gold index {}", e.choices.len(), e.gold)));
    }
    Ok(e)
}

/// Log-likelihood of each continuation after the context, all choices of a question in one
/// batched forward pass (right-padded; causal attention keeps padding out of every score).
/// Token ids are `bos? + context + continuation`, left-truncated to the model's context.
pub fn choice_loglikelihoods(model: &Llama, ctx: &[u32], conts: &[Vec<u32>], device: &Device) -> Result<Vec<f64>> {
    let limit = model.config().max_position_embeddings;
    let seqs: Vec<(Vec<u32>, usize)> = conts
        .iter()
        .map(|c| {
            let mut s: Vec<u32> = ctx.iter().chain(c).copied().collect();
            if s.len() > limit + 1 {
                s.drain(..s.len() - (limit + 1));
            }
            (s, c.len())
        })
        .collect();
    let len = seqs.iter().map(|(s, _)| s.len() - 1).max().unwrap_or(1).max(1);
    let mut flat = Vec::with_capacity(seqs.len() * len);
    for (s, _) in &seqs {
        flat.extend(&s[..s.len() - 1]);
        flat.extend(std::iter::repeat_n(0u32, len - (s.len() - 1)));
    }
    let input = Tensor::from_vec(flat, (seqs.len(), len), device)?;
    let lp: Vec<Vec<Vec<f32>>> = log_softmax(&model.forward(&input)?)?.to_vec3()?;
    Ok(seqs
        .iter()
        .enumerate()
        .map(|(b, (s, clen))| {
            let n = s.len();
            (n - clen..n).map(|target| lp[b][target - 1][s[target] as usize] as f64).sum()
        })
        .collect())
}

/// Scores a task. The context is encoded with BOS (if given) prepended; each continuation is
/// encoded on its own, as lm-eval-harness does.
pub fn score_task(
    model: &Llama,
    tok: &Tokenizer,
    bos: Option<u32>,
    name: &str,
    examples: &[McExample],
    device: &Device,
    progress: bool,
) -> Result<TaskResult> {
    let pb =
        if progress { indicatif::ProgressBar::new(examples.len() as u64) } else { indicatif::ProgressBar::hidden() };
    let enc = |s: &str| -> Result<Vec<u32>> {
        Ok(tok.encode(s, false).map_err(|e| EvalError::Tokenizer(e.to_string()))?.get_ids().to_vec())
    };
    let (mut hits, mut hits_norm) = (0usize, 0usize);
    for e in examples {
        let mut ctx: Vec<u32> = bos.into_iter().collect();
        ctx.extend(enc(&e.context)?);
        let conts: Vec<Vec<u32>> = e.choices.iter().map(|c| enc(c)).collect::<Result<_>>()?;
        let lls = choice_loglikelihoods(model, &ctx, &conts, device)?;
        let lens: Vec<usize> = e.choices.iter().map(|c| c.len()).collect();
        let (a, an) = pick(&lls, &lens);
        hits += usize::from(a == e.gold);
        hits_norm += usize::from(an == e.gold);
        pb.inc(1);
    }
    pb.finish_and_clear();
    let n = examples.len();
    let (acc, acc_norm) = (hits as f64 / n.max(1) as f64, hits_norm as f64 / n.max(1) as f64);
    Ok(TaskResult {
        task: name.to_string(),
        n,
        acc,
        acc_stderr: stderr_of(acc, n),
        acc_norm,
        acc_norm_stderr: stderr_of(acc_norm, n),
    })
}
