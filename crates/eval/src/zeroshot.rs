//! Zero-shot multiple choice with lm-eval-harness (0.4) semantics: for each choice, the
//! log-likelihood of the continuation given the context; `acc` picks the largest sum of
//! log-probabilities, `acc_norm` the largest sum divided by the choice's length in characters (the
//! choice text without the space that joins it to the context). The task formats are lm-eval's
//! prompts for HellaSwag, PIQA, ARC, MMLU and WinoGrande (the paper's zero-shot suite), read from
//! the records of the Hugging Face datasets as JSONL, a JSON array or Parquet; BIG-bench
//! `task.json` files are posed and graded as BIG-bench itself does (`bigbench` module).

use std::io::Read;
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
    /// Per-choice contexts where the choices differ before a shared continuation (WinoGrande's
    /// partial scoring: continuation `choices[i]` after `contexts[i]`, and `acc_norm` divides by
    /// the length of `contexts[i]`, as lm-eval's multiple-input tasks do); empty: every choice
    /// follows `context`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub contexts: Vec<String>,
    /// What picking each choice earns (BIG-bench's `target_scores`, whose
    /// `multiple_choice_grade` is their mean over questions); empty: 1 for `gold`, 0 for the rest.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub scores: Vec<f64>,
}

impl McExample {
    /// A question whose choices all follow one context.
    pub fn new(context: impl Into<String>, choices: Vec<String>, gold: usize) -> Self {
        Self { context: context.into(), choices, gold, contexts: Vec::new(), scores: Vec::new() }
    }

    /// What picking choice `i` earns: its score, or 1 for the gold choice and 0 for the rest.
    pub fn credit(&self, i: usize) -> f64 {
        match self.scores.get(i) {
            Some(&s) => s,
            None => f64::from(u8::from(i == self.gold)),
        }
    }

    /// The (context, continuation) scored for each choice.
    pub fn pairs(&self) -> impl Iterator<Item = (&str, &str)> {
        self.choices
            .iter()
            .enumerate()
            .map(|(i, c)| (self.contexts.get(i).unwrap_or(&self.context).as_str(), c.as_str()))
    }

    /// The length `acc_norm` divides choice `i`'s log-likelihood by: the characters of the
    /// choice without its leading space (lm-eval's `len(choice)`), or of its context where the
    /// contexts differ.
    pub fn norm_len(&self, i: usize) -> usize {
        match self.contexts.get(i) {
            Some(c) => c.chars().count(),
            None => self.choices[i].strip_prefix(' ').unwrap_or(&self.choices[i]).chars().count(),
        }
    }
}

/// Accuracy of one task.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TaskResult {
    /// Task name (file stem).
    pub task: String,
    /// Questions scored.
    pub n: usize,
    /// Accuracy by summed log-probability (the mean credit of the picks, [`McExample::credit`]:
    /// BIG-bench's `multiple_choice_grade` where choices carry target scores).
    pub acc: f64,
    /// Its standard error.
    pub acc_stderr: f64,
    /// Accuracy by log-likelihood per character of the choice (lm-eval's `acc_norm`).
    pub acc_norm: f64,
    /// Its standard error.
    pub acc_norm_stderr: f64,
    /// Each question's scores, in the task's order (left out of JSON when empty; callers that
    /// only report accuracies may clear them).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub samples: Vec<Sample>,
}

/// One question's scores, as lm-eval's `--log_samples` records them.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct Sample {
    /// The right choice's index.
    pub gold: usize,
    /// Each choice's log-likelihood (natural log) after the context.
    pub loglikelihoods: Vec<f64>,
    /// Each choice's length for `acc_norm` (characters).
    pub lengths: Vec<usize>,
    /// Each choice's credit where the task gives scores ([`McExample::scores`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub scores: Vec<f64>,
}

/// lm-eval's standard error of a mean (`mean_stderr`): the sample standard deviation of the
/// values over sqrt(n); for 0/1 values with mean p, sqrt(p(1 − p)/(n − 1)).
pub fn stderr_of(values: &[f64]) -> f64 {
    let n = values.len();
    if n < 2 {
        return 0.0;
    }
    let mean = values.iter().sum::<f64>() / n as f64;
    let var = values.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
    (var / n as f64).sqrt()
}

/// The choice `acc` and `acc_norm` pick from per-choice log-likelihoods and lengths (the first
/// of equal ones, as numpy's argmax).
pub fn pick(lls: &[f64], lens: &[usize]) -> (usize, usize) {
    let argmax = |v: &[f64]| v.iter().enumerate().fold(0, |b, (i, &x)| if x > v[b] { i } else { b });
    let norm: Vec<f64> = lls.iter().zip(lens).map(|(l, &n)| l / n.max(1) as f64).collect();
    (argmax(lls), argmax(&norm))
}

/// Where a record is in a task file, for errors.
#[derive(Clone, Copy)]
pub(crate) enum At {
    File,
    Line(usize),
    Example(usize),
    Row(usize),
}

impl std::fmt::Display for At {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            At::File => Ok(()),
            At::Line(n) => write!(f, "line {n}"),
            At::Example(n) => write!(f, "example {n}"),
            At::Row(n) => write!(f, "row {n}"),
        }
    }
}

pub(crate) fn bad(path: &Path, at: At, msg: impl Into<String>) -> EvalError {
    EvalError::Task { path: path.to_path_buf(), at: at.to_string(), msg: msg.into() }
}

/// Loads a task: a BIG-bench `task.json` (`examples` with `input` and `target_scores`, posed as
/// BIG-bench's `JsonTask` poses them zero-shot, each choice's target score its credit; a
/// composite's `subtasks`, or the `task.json` of each folder beside it, together), or records
/// as JSONL, a JSON array or Parquet (as the Hugging Face datasets serve them) in one of these
/// formats, each made into lm-eval-harness's prompt:
/// - HellaSwag (`Rowan/hellaswag`: `activity_label`, `ctx_a`, `ctx_b`, `endings`, `label`):
///   "{activity_label}: {ctx_a} {Ctx_b}" and the endings, cleaned of WikiHow's bracketed markers;
///   or just `ctx`, `endings`, `label`, taken as they are;
/// - PIQA (`goal`, `sol1`, `sol2`, `label`): "Question: {goal}\nAnswer:";
/// - ARC (`question`, `choices: {text, label}`, `answerKey`): "Question: {question}\nAnswer:";
/// - MMLU (`question`, `choices: [..]`, `answer`, optional `subject`): the subject's
///   description line, the question, the lettered options, "Answer:", and the letters as choices;
/// - WinoGrande (`sentence` with one `_`, `option1`, `option2`, `answer` "1" or "2"): each option
///   in the blank as the context, the rest of the sentence as the continuation;
/// - BIG-bench as its Hugging Face dataset serves it (`inputs`, `multiple_choice_targets`,
///   `targets`), as lm-eval's bigbench multiple-choice tasks pose it: `inputs` as they are, the
///   first of `targets` right; records without choices are left out.
pub fn load_task(path: &Path) -> Result<Vec<McExample>> {
    let name = path.file_name().map(|n| n.to_string_lossy().to_lowercase()).unwrap_or_default();
    let (name, compression) = patchlm_data::source::Compression::split(&name);
    let records: Vec<(At, serde_json::Value)> = if name.ends_with(".parquet") {
        if compression != patchlm_data::source::Compression::None {
            return Err(bad(
                path,
                At::File,
                "a compressed Parquet file; Parquet compresses itself, decompress it first",
            ));
        }
        let rows = patchlm_data::parquet_rows_json(path)?;
        rows.into_iter().enumerate().map(|(i, r)| (At::Row(i + 1), serde_json::Value::Object(r))).collect()
    } else {
        // JSON and JSONL gzip- or zstd-compressed too, as the data stage reads them.
        let mut text = String::new();
        patchlm_data::source::open_text(path)?
            .read_to_string(&mut text)
            .map_err(|e| EvalError::Io { path: path.to_path_buf(), source: e })?;
        let text = text.as_str();
        let trimmed = text.trim_start();
        if trimmed.starts_with('{') && !name.ends_with(".jsonl") {
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(text) {
                if crate::bigbench::is_task(path, &v) {
                    return crate::bigbench::load(path, text, &v);
                }
                // One object over several lines is no JSONL record: most likely a composite's
                // task.json named without the folders that hold its subtasks.
                if v.is_object() && text.trim().contains('\n') {
                    return Err(bad(
                        path,
                        At::File,
                        "a JSON object that is no task: a BIG-bench task.json needs \"examples\", \"subtasks\" or \
                         folders beside it holding task.json (for a composite, name its folder, locally or as an \
                         hf:// path, so that its subtasks come with it)",
                    ));
                }
            }
        }
        if trimmed.starts_with('[') {
            let v: Vec<serde_json::Value> = serde_json::from_str(text)
                .map_err(|e| bad(path, At::File, format!("invalid json array of records: {e}")))?;
            v.into_iter().enumerate().map(|(i, v)| (At::Example(i + 1), v)).collect()
        } else {
            let mut out = Vec::new();
            for (i, line) in text.lines().enumerate() {
                if line.trim().is_empty() {
                    continue;
                }
                let v = serde_json::from_str(line).map_err(|e| {
                    bad(
                        path,
                        At::Line(i + 1),
                        format!(
                            "invalid json: {e} (a task is a BIG-bench task.json, JSONL with a record a line, a JSON \
                             array or Parquet)"
                        ),
                    )
                })?;
                out.push((At::Line(i + 1), v));
            }
            out
        }
    };
    let mut out = Vec::with_capacity(records.len());
    for (at, v) in &records {
        // lm-eval's BIG-bench tasks drop records without choices (generative ones).
        if let Some(e) = record_example(path, *at, v)? {
            out.push(e);
        }
    }
    if out.is_empty() {
        return Err(bad(path, At::File, "no examples"));
    }
    Ok(out)
}

/// Loads several task files as one task ([`load_task`] each, in order), as an `hf://` folder or a
/// local folder of them makes one: a BIG-bench subtask `task.json` that a composite among them
/// reads from its folders is counted with that composite only, not twice.
pub fn load_task_files<P: AsRef<Path>>(files: &[P]) -> Result<Vec<McExample>> {
    let set: std::collections::HashSet<&Path> = files.iter().map(AsRef::as_ref).collect();
    let mut out = Vec::new();
    for f in files.iter().map(AsRef::as_ref) {
        if !crate::bigbench::read_by_composite(f, &set) {
            out.extend(load_task(f)?);
        }
    }
    Ok(out)
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

/// lm-eval's HellaSwag cleaning of WikiHow text: trimmed, `" [title]"` made a sentence end, other
/// bracketed markers (within a line) removed, double spaces made single.
pub fn hellaswag_clean(text: &str) -> String {
    let t = text.trim().replace(" [title]", ". ");
    let mut out = String::with_capacity(t.len());
    let mut rest = t.as_str();
    while let Some(open) = rest.find('[') {
        match rest[open..].find(['\n', ']']) {
            Some(close) if rest.as_bytes()[open + close] == b']' => {
                out.push_str(&rest[..open]);
                rest = &rest[open + close + 1..];
            }
            // No `]` on this line: the `[` stays.
            _ => {
                out.push_str(&rest[..=open]);
                rest = &rest[open + 1..];
            }
        }
    }
    out.push_str(rest);
    out.replace("  ", " ")
}

/// Python's `str.capitalize`: the first character upper-cased, the rest lower-cased.
fn capitalize(s: &str) -> String {
    let mut chars = s.chars();
    match chars.next() {
        Some(first) => first.to_uppercase().chain(chars.as_str().to_lowercase().chars()).collect(),
        None => String::new(),
    }
}

/// One record as a question; `None` for a record that is left out (a BIG-bench one without
/// choices).
fn record_example(path: &Path, at: At, v: &serde_json::Value) -> Result<Option<McExample>> {
    if crate::bigbench::is_hub_record(v) {
        return crate::bigbench::hub_record(path, at, v);
    }
    suite_record(path, at, v).map(Some)
}

/// A record of the paper's suite (HellaSwag, PIQA, ARC, MMLU, WinoGrande).
fn suite_record(path: &Path, at: At, v: &serde_json::Value) -> Result<McExample> {
    let s = |k: &str| v.get(k).and_then(|x| x.as_str());
    let strings = |x: &serde_json::Value| -> Option<Vec<String>> {
        x.as_array()?.iter().map(|e| e.as_str().map(str::to_string)).collect()
    };
    let label =
        |k: &str| v.get(k).and_then(|l| label_index(l, &[])).ok_or_else(|| bad(path, at, format!("missing \"{k}\"")));
    if let Some(endings) = v.get("endings").and_then(strings) {
        if let (Some(activity), Some(a), Some(b)) = (s("activity_label"), s("ctx_a"), s("ctx_b")) {
            let context = hellaswag_clean(&format!("{activity}: {a} {}", capitalize(b)));
            let choices = endings.iter().map(|e| format!(" {}", hellaswag_clean(e))).collect();
            return check(path, at, McExample::new(context, choices, label("label")?));
        }
        if let Some(ctx) = s("ctx") {
            let choices = endings.iter().map(|e| format!(" {e}")).collect();
            return check(path, at, McExample::new(ctx, choices, label("label")?));
        }
    }
    if let (Some(goal), Some(a), Some(b)) = (s("goal"), s("sol1"), s("sol2")) {
        let choices = vec![format!(" {a}"), format!(" {b}")];
        return check(path, at, McExample::new(format!("Question: {goal}\nAnswer:"), choices, label("label")?));
    }
    if let (Some(sentence), Some(o1), Some(o2)) = (s("sentence"), s("option1"), s("option2")) {
        let blank = sentence.find('_').ok_or_else(|| bad(path, at, "the sentence has no \"_\" blank"))?;
        let gold = match s("answer") {
            Some("1") => 0,
            Some("2") => 1,
            _ => return Err(bad(path, at, "\"answer\" is not \"1\" or \"2\"")),
        };
        let rest = format!(" {}", sentence[blank + 1..].trim());
        let contexts = vec![format!("{}{o1}", &sentence[..blank]), format!("{}{o2}", &sentence[..blank])];
        let e = McExample { contexts, ..McExample::new(&sentence[..blank], vec![rest.clone(), rest], gold) };
        return check(path, at, e);
    }
    if let (Some(q), Some(ch)) = (s("question"), v.get("choices")) {
        if let Some(options) = strings(ch) {
            // MMLU (cais/mmlu): lettered options, the letter as the answer.
            if options.len() > 26 {
                return Err(bad(path, at, "more than 26 choices"));
            }
            let letters: Vec<String> = (b'A'..).take(options.len()).map(|c| (c as char).to_string()).collect();
            let mut context = match s("subject") {
                Some(sub) => format!(
                    "The following are multiple choice questions (with answers) about {}.\n\n",
                    sub.replace('_', " ")
                ),
                None => String::new(),
            };
            context.push_str(q.trim());
            for (l, o) in letters.iter().zip(&options) {
                context.push_str(&format!("\n{l}. {o}"));
            }
            context.push_str("\nAnswer:");
            let gold = v
                .get("answer")
                .and_then(|a| label_index(a, &letters))
                .ok_or_else(|| bad(path, at, "missing or unknown \"answer\""))?;
            return check(path, at, McExample::new(context, letters.iter().map(|l| format!(" {l}")).collect(), gold));
        }
        let texts = ch.get("text").and_then(strings).ok_or_else(|| bad(path, at, "\"choices\" lacks \"text\""))?;
        let labels = ch.get("label").and_then(strings).unwrap_or_default();
        let gold = v
            .get("answerKey")
            .and_then(|l| label_index(l, &labels))
            .ok_or_else(|| bad(path, at, "missing or unknown \"answerKey\""))?;
        let choices = texts.iter().map(|t| format!(" {t}")).collect();
        return check(path, at, McExample::new(format!("Question: {q}\nAnswer:"), choices, gold));
    }
    Err(bad(
        path,
        at,
        "not a HellaSwag (activity_label, ctx_a, ctx_b or ctx; endings, label), PIQA (goal, sol1, sol2, label), \
         ARC (question, choices {text, label}, answerKey), MMLU (question, choices [..], answer), WinoGrande \
         (sentence, option1, option2, answer) or BIG-bench (inputs, multiple_choice_targets, targets) record",
    ))
}

pub(crate) fn check(path: &Path, at: At, e: McExample) -> Result<McExample> {
    if e.choices.len() < 2 || e.gold >= e.choices.len() {
        return Err(bad(path, at, format!("{} choices with gold index {}", e.choices.len(), e.gold)));
    }
    Ok(e)
}

/// Log-likelihood of each continuation after the context, all choices of a question in one
/// batched forward pass (right-padded; causal attention keeps padding out of every score).
/// Token ids are `bos? + context + continuation`, left-truncated to the model's context.
pub fn choice_loglikelihoods(model: &Llama, ctx: &[u32], conts: &[Vec<u32>], device: &Device) -> Result<Vec<f64>> {
    let pairs: Vec<(Vec<u32>, Vec<u32>)> = conts.iter().map(|c| (ctx.to_vec(), c.clone())).collect();
    pair_loglikelihoods(model, &pairs, device)
}

/// Log-likelihood of each continuation after its own context, in one batched forward pass (as
/// [`choice_loglikelihoods`]). A context must hold at least one token.
pub fn pair_loglikelihoods(model: &Llama, pairs: &[(Vec<u32>, Vec<u32>)], device: &Device) -> Result<Vec<f64>> {
    if pairs.iter().any(|(ctx, _)| ctx.is_empty()) {
        return Err(EvalError::Input("an empty context (and no BOS token) leaves the first token unscored".into()));
    }
    let limit = model.config().max_position_embeddings;
    if let Some((_, c)) = pairs.iter().find(|(_, c)| c.len() > limit) {
        return Err(EvalError::Input(format!(
            "a continuation of {} tokens does not fit the model's context of {limit} with a token of context before it",
            c.len()
        )));
    }
    let seqs: Vec<(Vec<u32>, usize)> = pairs
        .iter()
        .map(|(ctx, c)| {
            let mut s: Vec<u32> = ctx.iter().chain(c).copied().collect();
            s.drain(..s.len().saturating_sub(limit + 1));
            (s, c.len())
        })
        .collect();
    let len = seqs.iter().map(|(s, _)| s.len() - 1).max().unwrap_or(1).max(1);
    // Inputs s[..n-1] and targets s[1..], right-padded with 0; the targets are picked on the
    // device, so only (batch, len) log-probabilities come back, not the vocabulary's.
    let (mut inputs, mut targets) = (vec![0u32; seqs.len() * len], vec![0u32; seqs.len() * len]);
    for (b, (s, _)) in seqs.iter().enumerate() {
        inputs[b * len..b * len + s.len() - 1].copy_from_slice(&s[..s.len() - 1]);
        targets[b * len..b * len + s.len() - 1].copy_from_slice(&s[1..]);
    }
    let input = Tensor::from_vec(inputs, (seqs.len(), len), device)?;
    let targets = Tensor::from_vec(targets, (seqs.len(), len, 1), device)?;
    let lp: Vec<Vec<f32>> = log_softmax(&model.forward(&input)?)?.gather(&targets, 2)?.squeeze(2)?.to_vec2()?;
    Ok(seqs
        .iter()
        .enumerate()
        .map(|(b, (s, clen))| {
            let n = s.len();
            (n - clen..n).map(|target| f64::from(lp[b][target - 1])).sum()
        })
        .collect())
}

/// The token ids lm-eval-harness (0.4) scores for one (context, continuation) pair: whitespace at
/// the end of the context moves to the continuation's start; the context is encoded, and the
/// continuation is what follows the context's tokens in the encoding of the two together. `bos`
/// (if given) starts the context.
pub fn encode_pair(
    tok: &Tokenizer,
    bos: Option<u32>,
    context: &str,
    continuation: &str,
) -> Result<(Vec<u32>, Vec<u32>)> {
    let enc = |s: &str| -> Result<Vec<u32>> {
        Ok(tok.encode(s, false).map_err(|e| EvalError::Tokenizer(e.to_string()))?.get_ids().to_vec())
    };
    let kept = context.trim_end();
    let continuation = format!("{}{continuation}", &context[kept.len()..]);
    let ctx = enc(kept)?;
    let whole = enc(&format!("{kept}{continuation}"))?;
    let cont = whole.get(ctx.len()..).unwrap_or_default().to_vec();
    Ok((bos.into_iter().chain(ctx).collect(), cont))
}

/// Scores a task: each choice's (context, continuation) pair encoded as [`encode_pair`] does,
/// BOS (if given) prepended to the context.
pub fn score_task(
    model: &Llama,
    tok: &Tokenizer,
    bos: Option<u32>,
    name: &str,
    examples: &[McExample],
    device: &Device,
    progress: bool,
) -> Result<TaskResult> {
    let mut pb = crate::Progress::new(Some(examples.len() as u64), progress, name);
    let (mut credits, mut credits_norm) = (Vec::with_capacity(examples.len()), Vec::with_capacity(examples.len()));
    let mut samples = Vec::with_capacity(examples.len());
    for e in examples {
        let pairs: Vec<(Vec<u32>, Vec<u32>)> =
            e.pairs().map(|(ctx, cont)| encode_pair(tok, bos, ctx, cont)).collect::<Result<_>>()?;
        let lls = pair_loglikelihoods(model, &pairs, device)?;
        let lens: Vec<usize> = (0..e.choices.len()).map(|i| e.norm_len(i)).collect();
        let (a, an) = pick(&lls, &lens);
        credits.push(e.credit(a));
        credits_norm.push(e.credit(an));
        samples.push(Sample { gold: e.gold, loglikelihoods: lls, lengths: lens, scores: e.scores.clone() });
        pb.inc(|| None);
    }
    pb.finish_and_clear();
    let n = examples.len();
    let mean = |v: &[f64]| v.iter().sum::<f64>() / n.max(1) as f64;
    Ok(TaskResult {
        task: name.to_string(),
        n,
        acc: mean(&credits),
        acc_stderr: stderr_of(&credits),
        acc_norm: mean(&credits_norm),
        acc_norm_stderr: stderr_of(&credits_norm),
        samples,
    })
}
