//! `cargo xtask eval`: perplexity / bits per byte on text, and zero-shot tasks, for any model
//! directory in HF format.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use candle_core::DType;
use patchlm_eval::{load_task_files, perplexity_of_texts, score_task, McExample, NllSum, WindowConfig};
use patchlm_model::{load_pretrained, parse_device, special_token_ids};

/// Arguments of `cargo xtask eval`.
#[derive(clap::Args)]
pub struct EvalArgs {
    /// Model directory (config.json, model.safetensors, tokenizer.json; a run's directory means
    /// its final model, and a checkpoint's directory loads too), or a Hugging Face repository
    /// (`org/name[@revision]`).
    #[arg(long)]
    model: String,
    /// Text to score (files or directories: text, JSONL, JSON arrays, Parquet, optionally .gz or
    /// .zst; or `hf://datasets/<org>/<name>/<path>`).
    #[arg(long, num_args = 1..)]
    text: Vec<PathBuf>,
    /// How --text inputs are read.
    #[command(flatten)]
    source: crate::SourceArgs,
    /// A shards directory of the data crate: score its validation split (as stored, with the
    /// BOS/EOS framing of training).
    #[arg(long)]
    shards: Option<PathBuf>,
    /// Zero-shot tasks: BIG-bench task.json (its own prompts and grade), or HellaSwag / PIQA / ARC / MMLU / WinoGrande records
    /// (the Hugging Face datasets' fields) as JSONL, a JSON array or Parquet, scored with
    /// lm-eval-harness's prompts; a file, a folder (its files make one task) or `hf://datasets/<org>/<name>/<file, folder or glob>`.
    #[arg(long, num_args = 1..)]
    task: Vec<PathBuf>,
    /// Window length (default: the model's context).
    #[arg(long)]
    context: Option<usize>,
    /// Sliding-window stride (default: non-overlapping windows).
    #[arg(long)]
    stride: Option<usize>,
    /// Also write the results as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// With --json, each question's log-likelihoods and lengths too (lm-eval's --log_samples).
    #[arg(long, requires = "json")]
    samples: bool,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
}

/// How `--text` inputs are read: as the data stage reads them, except that a document is never
/// cut (the data stage cuts one over `max_doc_bytes`, 8 MiB, to bound its memory): lm-eval scores
/// each document whole, and a cut one would be two documents, each after its own BOS.
fn text_source(a: &crate::SourceArgs) -> Result<patchlm_data::SourceConfig> {
    let mut cfg = a.apply(Default::default())?;
    cfg.max_doc_bytes = usize::MAX;
    Ok(cfg)
}

/// Runs the evaluation and prints a table.
pub fn run(a: EvalArgs) -> Result<()> {
    if a.text.is_empty() && a.task.is_empty() && a.shards.is_none() {
        bail!("nothing to evaluate: pass --text PATH..., --shards DIR and/or --task PATH...");
    }
    // Where the results go is checked before an evaluation that may take hours.
    if let Some(p) = &a.json {
        let parent = p.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(std::path::Path::new("."));
        if p.is_dir() {
            bail!("--json {}: is a folder; give the file to write the results to", p.display());
        }
        if !parent.is_dir() {
            bail!("--json {}: there is no folder {} to write it in", p.display(), parent.display());
        }
    }
    let device = parse_device(&a.device)?;
    let dir = crate::model_cmds::model_dir(&a.model)?;
    let (model, cfg) = load_pretrained(&dir, &device, DType::F32)?;
    let tok = crate::model_cmds::tokenizer(&dir)?;
    let (bos, eos) = special_token_ids(&dir)?;
    let mut out = serde_json::json!({ "model": a.model });
    let w = WindowConfig { context: a.context.unwrap_or(cfg.max_position_embeddings), stride: a.stride };
    if !a.text.is_empty() {
        let texts = patchlm_data::hub::resolve_inputs(&a.text)?;
        let prefix = bos.or(eos).with_context(|| {
            format!(
                "{} has neither bos_token_id nor eos_token_id: a text's first token needs one before it",
                dir.display()
            )
        })?;
        let docs = patchlm_data::Documents::open(&texts, &text_source(&a.source)?)?;
        let s = perplexity_of_texts(&model, &tok, prefix, docs, &w, &device, true)?;
        out["perplexity"] = print_nll(("text", "all inputs"), &s, &w);
    }
    if let Some(shards) = &a.shards {
        let ds = patchlm_data::Dataset::open(shards)?;
        ds.manifest().check_tokenizer(shards, &patchlm_data::tokenizer::fingerprint(&tok)?).with_context(|| {
            format!("{} was tokenized with another tokenizer than the model's ({})", shards.display(), dir.display())
        })?;
        let s =
            patchlm_eval::perplexity_of_split(&model, &tok, &ds, patchlm_data::Split::Val, &w, &device, None, true)?;
        out["validation"] = print_nll(("shards", "validation split"), &s, &w);
        out["validation"]["shards"] = shards.to_string_lossy().into();
    }
    let mut tasks = Vec::new();
    for (name, examples) in load_tasks(&a.task)? {
        let mut r = score_task(&model, &tok, bos, &name, &examples, &device, true)?;
        if !a.samples {
            r.samples.clear();
        }
        tasks.push(r);
    }
    if !tasks.is_empty() {
        println!("{:<28}{:>8}{:>18}{:>18}", "task", "n", "acc", "acc_norm");
        for r in &tasks {
            println!(
                "{:<28}{:>8}{:>10.4} ± {:<5.3}{:>10.4} ± {:<5.3}",
                r.task, r.n, r.acc, r.acc_stderr, r.acc_norm, r.acc_norm_stderr
            );
        }
        out["tasks"] = serde_json::to_value(&tasks)?;
        if tasks.len() > 1 {
            // The unweighted mean over tasks, as the paper's "avg zero-shot".
            let n = tasks.len() as f64;
            let (acc, acc_norm) =
                (tasks.iter().map(|r| r.acc).sum::<f64>() / n, tasks.iter().map(|r| r.acc_norm).sum::<f64>() / n);
            println!("{:<28}{:>8}{acc:>10.4}{:8}{acc_norm:>10.4}", format!("average of {} tasks", tasks.len()), "", "");
            out["average"] = serde_json::json!({ "tasks": tasks.len(), "acc": acc, "acc_norm": acc_norm });
        }
    }
    if let Some(p) = a.json {
        patchlm_model::weights::write_atomic(&p, serde_json::to_string_pretty(&out)?.as_bytes())
            .with_context(|| format!("writing {}", p.display()))?;
    }
    Ok(())
}

/// The zero-shot tasks `--task` names, each with its name: a local file is one task named by its
/// stem; a local folder is one task of its `.parquet`, `.jsonl`, `.ndjson` and `.json` files
/// (`.gz` and `.zst` too, walked in name order), or the BIG-bench task of its `task.json`, named by the folder; an
/// `hf://datasets/...` file, folder or glob is one task of all the files it names (say MMLU's 57
/// subjects), named by the path after `hf://datasets/` (a BIG-bench composite's subtask files
/// among them count once, with it: [`load_task_files`]).
pub fn load_tasks(specs: &[PathBuf]) -> Result<Vec<(String, Vec<McExample>)>> {
    let mut tasks = Vec::new();
    for spec in specs {
        let text = spec.to_string_lossy();
        let stem = || spec.file_stem().map(|s| s.to_string_lossy().to_string()).unwrap_or_default();
        let (name, files) = match text.strip_prefix("hf://datasets/") {
            Some(rest) => (rest.to_string(), patchlm_data::hub::resolve_inputs(std::slice::from_ref(spec))?),
            None if spec.join("task.json").is_file() => (stem(), vec![spec.join("task.json")]),
            None if spec.is_dir() => {
                let listed = match patchlm_data::source::expand_inputs(std::slice::from_ref(spec)) {
                    Err(patchlm_data::DataError::NothingInFolder { .. }) => Vec::new(),
                    listed => listed?,
                };
                let files: Vec<PathBuf> = listed
                    .into_iter()
                    // The files the data stage reads as records (JSON, JSONL, Parquet), not as text.
                    .filter(|f| patchlm_data::source::InputKind::of(f).0 != patchlm_data::source::InputKind::Text)
                    .collect();
                if files.is_empty() {
                    bail!("task {text}: the folder holds no .parquet, .jsonl or .json file");
                }
                (stem(), files)
            }
            None if !spec.is_file() => bail!("task {text}: no such file or folder"),
            None => (stem(), vec![spec.clone()]),
        };
        tasks.push((name, load_task_files(&files).with_context(|| format!("task {text}"))?));
    }
    Ok(tasks)
}

/// A perplexity as its table prints it: with three decimals, or from 1e9 on (an untrained model's
/// or foreign text's run to many digits) in scientific notation, so that the columns stay apart.
fn fmt_ppl(v: f64) -> String {
    if v < 1e9 {
        format!("{v:.3}")
    } else {
        format!("{v:.4e}")
    }
}

/// Prints one table of token loss, perplexity, bits per byte and word perplexity; returns them as
/// JSON.
fn print_nll((header, row): (&str, &str), s: &NllSum, w: &WindowConfig) -> serde_json::Value {
    println!(
        "{header:<28}{:>12}{:>12}{:>12}{:>14}{:>10}{:>14}",
        "documents", "tokens", "loss", "perplexity", "bpb", "word ppl"
    );
    println!(
        "{row:<28}{:>12}{:>12}{:>12.4}{:>14}{:>10.4}{:>14}",
        s.documents,
        s.tokens,
        s.mean_nll(),
        fmt_ppl(s.perplexity()),
        s.bits_per_byte(),
        fmt_ppl(s.word_perplexity())
    );
    serde_json::json!({
        "documents": s.documents, "tokens": s.tokens, "bytes": s.bytes, "words": s.words, "nll": s.nll,
        "loss": s.mean_nll(), "perplexity": s.perplexity(), "bits_per_byte": s.bits_per_byte(),
        "word_perplexity": s.word_perplexity(), "context": w.context, "stride": w.stride,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Three decimals below 1e9, scientific notation from it on.
    #[test]
    fn wide_perplexities_are_printed_in_scientific_notation() {
        let got: Vec<String> = [12.34567, 999_999_999.0, 1e9, 5.25e12].map(fmt_ppl).into();
        assert_eq!(got, ["12.346", "999999999.000", "1.0000e9", "5.2500e12"]);
    }

    /// A text file of 9 MiB is one document to score (the data stage's cut at 8 MiB made it two,
    /// the second after a BOS of its own, unlike lm-eval).
    #[test]
    fn eval_reads_a_long_document_whole() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("book.txt");
        let text = "All the world's a stage, and all the men and women merely players.\n".repeat(9 << 20 >> 6);
        std::fs::write(&f, &text).unwrap();
        let args = crate::SourceArgs::default();
        let docs: Vec<_> =
            patchlm_data::Documents::open(&[&f], &text_source(&args).unwrap()).unwrap().map(|d| d.unwrap()).collect();
        assert_eq!(docs.len(), 1);
        assert_eq!(docs[0].text.len(), text.len());
        // The data stage's own reading cuts it.
        let cut = patchlm_data::Documents::open(&[&f], &args.apply(Default::default()).unwrap()).unwrap().count();
        assert_eq!(cut, 2);
    }
}
