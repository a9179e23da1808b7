//! A zero-shot task anyone can build from their own held-out text: given a few lines of a
//! document, pick its true next line among lines drawn from other documents. Like HellaSwag's
//! "which ending follows", but needing no download; built from the validation split it measures
//! what a model learnt about text it never trained on.

use std::path::Path;

use crate::error::{EvalError, Result};
use crate::zeroshot::McExample;
use patchlm_model::SplitMix64;

/// How [`continuation_task`] draws its questions.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct ContinuationConfig {
    /// Questions to draw (fewer if the text has fewer usable places). Default 400.
    pub examples: usize,
    /// Choices per question, the true line included. Default 4.
    pub choices: usize,
    /// Lines of context before the line to predict. Default 3.
    pub context_lines: usize,
    /// Shortest usable line in bytes (after collapsing whitespace). Default 16.
    pub min_line_bytes: usize,
    /// Longest usable line in bytes. Default 200.
    pub max_line_bytes: usize,
    /// Seed of the draw. Default 1234.
    pub seed: u64,
}

impl Default for ContinuationConfig {
    fn default() -> Self {
        Self { examples: 400, choices: 4, context_lines: 3, min_line_bytes: 16, max_line_bytes: 200, seed: 1234 }
    }
}

fn clean(line: &str) -> String {
    line.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Builds the continuation task from documents' texts. Each question's context is
/// `context_lines` consecutive non-empty lines of one document joined by spaces; the choices are
/// the line that follows (gold) and lines of similar length (½× to 2× its bytes) from other
/// documents, in a seeded random order. Each choice starts with a space (lm-eval's convention:
/// the continuation is encoded on its own and follows the context's last word). Deterministic for
/// a given seed.
pub fn continuation_task(texts: &[String], cfg: &ContinuationConfig) -> Vec<McExample> {
    let docs: Vec<Vec<String>> =
        texts.iter().map(|t| t.lines().map(clean).filter(|l| !l.is_empty()).collect()).collect();
    let usable = |l: &str| (cfg.min_line_bytes..=cfg.max_line_bytes).contains(&l.len());
    // Every usable line, for distractors.
    let pool: Vec<(usize, &str)> = docs
        .iter()
        .enumerate()
        .flat_map(|(d, ls)| ls.iter().filter(|l| usable(l)).map(move |l| (d, l.as_str())))
        .collect();
    let c = cfg.context_lines.max(1);
    let mut places: Vec<(usize, usize)> = docs
        .iter()
        .enumerate()
        .flat_map(|(d, ls)| (c..ls.len()).filter(|&i| usable(&ls[i])).map(move |i| (d, i)))
        .collect();
    let mut rng = SplitMix64(cfg.seed);
    for i in (1..places.len()).rev() {
        let j = rng.below(i + 1);
        places.swap(i, j);
    }
    let mut out = Vec::new();
    for (d, i) in places {
        if out.len() >= cfg.examples {
            break;
        }
        let gold = docs[d][i].as_str();
        let mut picked: Vec<&str> = Vec::new();
        for _ in 0..400 {
            if picked.len() + 1 >= cfg.choices || pool.is_empty() {
                break;
            }
            let (od, l) = pool[rng.below(pool.len())];
            let fits = l.len() * 2 >= gold.len() && l.len() <= gold.len() * 2;
            if od != d && fits && l != gold && !picked.contains(&l) {
                picked.push(l);
            }
        }
        if picked.len() + 1 < cfg.choices.max(2) {
            continue;
        }
        let g = rng.below(picked.len() + 1);
        let mut choices: Vec<String> = picked.iter().map(|s| format!(" {s}")).collect();
        choices.insert(g, format!(" {gold}"));
        out.push(McExample::new(docs[d][i - c..i].join(" "), choices, g));
    }
    out
}

/// Writes examples as HellaSwag-style JSONL (`ctx`, `endings`, `label`), which [`crate::load_task`]
/// reads back to the same examples (endings are stored without the leading space the loader
/// adds), so a generated task can be rescored with `cargo xtask eval --task`. Atomic.
pub fn write_task_jsonl(path: &Path, examples: &[McExample]) -> Result<()> {
    let mut s = String::new();
    for e in examples {
        let endings: Vec<&str> = e.choices.iter().map(|c| c.strip_prefix(' ').unwrap_or(c)).collect();
        let v = serde_json::json!({ "ctx": e.context, "endings": endings, "label": e.gold });
        s.push_str(&v.to_string());
        s.push('\n');
    }
    patchlm_data::shard::write_atomic(path, s.as_bytes()).map_err(EvalError::from)
}
