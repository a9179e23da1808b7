//! `cargo xtask`: patchlm's pipelines. Argument parsing and orchestration only; every algorithm
//! lives in the library crates.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

mod bench;
mod compare;
mod eval_cmd;
mod interrupt;
mod model_cmds;
mod plot;
mod pretrain;

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    bin_name = "cargo xtask",
    about = "patchlm: patch-level pretraining pipelines",
    version,
    after_help = "Where stderr is no terminal (a batch job's log), long work prints a line each minute \
                  instead of a progress bar; PATCHLM_LOG_SECS sets the seconds (0: at every step)."
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Assemble the default English corpus (public-domain Shakespeare + Milton) as JSONL.
    Corpus {
        /// Output directory (corpus.jsonl is written there).
        #[arg(long, default_value = "data/corpus")]
        out: PathBuf,
        /// Download cache.
        #[arg(long, default_value = "data/cache")]
        cache: PathBuf,
    },
    /// Text → tokenizer → Arrow shards + manifest. Run again after an interruption with the
    /// same arguments, it resumes: the shards already written (checked against their sha256)
    /// are kept and the rest is written.
    Data {
        /// Input files or directories (text, JSONL, JSON arrays, Parquet, optionally .gz or .zst), or Hugging Face
        /// datasets: `hf://datasets/<org>/<name>[@revision]/<file, folder or glob>`.
        #[arg(long, required = true, num_args = 1..)]
        input: Vec<PathBuf>,
        /// Output directory for shards, tokenizer.json and manifest.json.
        #[arg(long)]
        out: PathBuf,
        /// Use this HF tokenizer.json instead of training one: a file, or a Hugging Face
        /// repository (`org/name[@revision]`) whose tokenizer.json is fetched.
        #[arg(long, conflicts_with = "vocab_size")]
        tokenizer: Option<String>,
        /// Vocabulary size of the trained byte-level BPE.
        #[arg(long)]
        vocab_size: Option<usize>,
        #[command(flatten)]
        source: SourceArgs,
        /// Fraction of documents held out for validation.
        #[arg(long)]
        val_fraction: Option<f64>,
        /// Target shard size in MiB.
        #[arg(long)]
        shard_mb: Option<u64>,
    },
    /// Print each token's log-probability under a model, and the total NLL.
    Score(model_cmds::ScoreArgs),
    /// Sample a continuation with a KV cache.
    Generate(model_cmds::GenerateArgs),
    /// Perplexity / bits per byte on text and zero-shot multiple-choice accuracy of a model.
    Eval(eval_cmd::EvalArgs),
    /// Throughput benchmarks (see bench/*.py for the side-by-side peers). Without a subcommand:
    /// the training-step suite (GPT-2-small and 370M, token and patch phase) on `--device`.
    Bench(bench::BenchArgs),
    /// Patch-level pretraining end to end: corpus → shards → patch phase → token phase → HF model.
    Pretrain(pretrain::PretrainArgs),
    /// The paper's experiment: baseline, patch-level run(s) and equal-compute baseline(s) on the
    /// same data, evaluated side by side in a report with plots.
    Compare(compare::CompareArgs),
    /// Validation loss of several runs (trained apart, or still training) against training
    /// compute, tokens and time on shared axes, and a table of where each run stands.
    Plot(plot::PlotArgs),
}

/// How text inputs are read (`data`, `eval --text`).
#[derive(clap::Args, Default)]
pub(crate) struct SourceArgs {
    /// JSONL key / Parquet column with the text (a field inside a Parquet struct: `meta.text`).
    #[arg(long)]
    text_field: Option<String>,
    /// What one document of a plain text file is: document (the whole file, the default),
    /// paragraph (text between blank lines) or line, as the `sample_by` of Hugging Face
    /// `datasets`' text loader.
    #[arg(long, value_parser = ["document", "paragraph", "line"])]
    sample_by: Option<String>,
    /// What invalid UTF-8 in a text or JSON file does: error (default) or replace (each
    /// invalid sequence becomes U+FFFD, as Python's errors="replace").
    #[arg(long, value_parser = ["error", "replace"])]
    invalid_utf8: Option<String>,
}

impl SourceArgs {
    /// `cfg` with the settings given.
    pub(crate) fn apply(&self, mut cfg: patchlm_data::SourceConfig) -> Result<patchlm_data::SourceConfig> {
        if let Some(f) = &self.text_field {
            cfg.text_field = f.clone();
        }
        if let Some(v) = &self.sample_by {
            cfg.sample_by = setting(v.clone()).context("--sample-by")?;
        }
        if let Some(v) = &self.invalid_utf8 {
            cfg.invalid_utf8 = setting(v.clone()).context("--invalid-utf8")?;
        }
        Ok(cfg)
    }
}

fn main() -> std::process::ExitCode {
    match run(Cli::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // With RUST_BACKTRACE set, anyhow's own report (with the backtrace).
            if std::env::var_os("RUST_BACKTRACE").is_some_and(|v| v != "0") {
                eprintln!("Error: {e:?}");
            } else {
                eprintln!("{}", error_report(&e));
            }
            std::process::ExitCode::FAILURE
        }
    }
}

/// `e` and what caused it, as anyhow prints them, leaving out a cause whose message the one
/// before already ends with (a library error naming a file and the I/O error it wraps: "x: no
/// such file" and then "no such file").
fn error_report(e: &anyhow::Error) -> String {
    let mut out = format!("Error: {e}");
    let mut last = e.to_string();
    let mut causes = Vec::new();
    for cause in e.chain().skip(1) {
        let text = cause.to_string();
        if !last.ends_with(&text) {
            causes.push(text.clone());
        }
        last = text;
    }
    match &causes[..] {
        [] => {}
        [one] => out += &format!("\n\nCaused by:\n    {one}"),
        many => {
            out += "\n\nCaused by:";
            for (i, c) in many.iter().enumerate() {
                out += &format!("\n    {i}: {c}");
            }
        }
    }
    out
}

fn run(cli: Cli) -> Result<()> {
    // Checked once here, where it can stop the run; the libraries read it at each progress bar.
    patchlm_data::progress::log_interval()?;
    // Large tensors freed each step are reused instead of mapped and zero-filled afresh.
    patchlm_model::keep_freed_memory();
    match cli.cmd {
        Cmd::Corpus { out, cache } => {
            let s = patchlm_data::corpus::assemble_default_corpus(&out, &cache)?;
            if s.cached {
                println!(
                    "corpus already at {} ({} works, {} documents, {:.1} MB)",
                    s.path.display(),
                    s.works,
                    s.documents,
                    s.bytes as f64 / 1e6
                );
            } else {
                println!(
                    "wrote {}: {} works, {} documents, {:.1} MB",
                    s.path.display(),
                    s.works,
                    s.documents,
                    s.bytes as f64 / 1e6
                );
            }
        }
        Cmd::Data { input, out, tokenizer, vocab_size, source, val_fraction, shard_mb } => {
            let mut cfg = patchlm_data::DataConfig::default();
            if let Some(v) = vocab_size {
                cfg.tokenizer.vocab_size = v;
            }
            cfg.source = source.apply(cfg.source)?;
            if let Some(f) = val_fraction {
                cfg.val_fraction = f;
            }
            if let Some(m) = shard_mb {
                cfg.shard_mb = m;
            }
            let tok_file = tokenizer.as_deref().map(patchlm_data::hub::resolve_tokenizer).transpose()?;
            let src = match &tok_file {
                Some(p) => patchlm_data::TokenizerSource::File(p),
                None => patchlm_data::TokenizerSource::Train,
            };
            let input = patchlm_data::hub::resolve_inputs(&input)?;
            warn_repeated(&patchlm_data::source::expand_inputs(&input)?);
            let trained = tok_file.is_none().then_some(&cfg.tokenizer);
            let s = patchlm_data::build_shards(&input, &out, &cfg, src, true)
                .with_context(|| format!("building shards into {}", out.display()))?;
            print_data_summary(&s, &out, trained);
        }
        Cmd::Score(a) => model_cmds::score(a)?,
        Cmd::Generate(a) => model_cmds::generate(a)?,
        Cmd::Pretrain(a) => pretrain::run(a)?,
        Cmd::Bench(b) => bench::run(b)?,
        Cmd::Eval(a) => eval_cmd::run(a)?,
        Cmd::Compare(a) => compare::run(a)?,
        Cmd::Plot(a) => plot::run(a)?,
    }
    Ok(())
}

/// A setting named as its serde name (as in `--set data.source.sample_by=paragraph`).
fn setting<T: serde::de::DeserializeOwned>(name: String) -> Result<T> {
    Ok(serde_json::from_value(serde_json::Value::String(name))?)
}

/// Warns of input files (as `expand_inputs` lists them) that would be read more than once (named
/// twice, or by name and through their folder): their documents count as often.
pub(crate) fn warn_repeated(files: &[std::path::PathBuf]) {
    for f in patchlm_data::source::repeated_files(files) {
        eprintln!(
            "warning: {} is read more than once (named twice, or by name and through its folder): its documents count \
             as often as it is read",
            f.display()
        );
    }
}

/// Prints what a data build made; `trained`: the settings the tokenizer was trained with, if it
/// was (a vocabulary smaller than asked is said to be).
pub(crate) fn print_data_summary(
    s: &patchlm_data::BuildSummary,
    out: &std::path::Path,
    trained: Option<&patchlm_data::tokenizer::TokenizerConfig>,
) {
    println!("shards in {}", out.display());
    println!("  documents      {} ({} validation)", s.documents, s.val_documents);
    println!("  tokens         {} (train {}, validation {})", s.tokens, s.train_tokens, s.val_tokens);
    println!("  text           {:.2} MB, {:.3} tokens/byte", s.bytes as f64 / 1e6, s.tokens_per_byte());
    match trained {
        Some(t) if s.vocab_size < t.vocab_size => println!(
            "  vocabulary     {} (of {} asked: the text has no more pairs of tokens occurring at least {} times to merge)",
            s.vocab_size, t.vocab_size, t.min_frequency
        ),
        _ => println!("  vocabulary     {}", s.vocab_size),
    }
    if s.skipped_empty > 0 {
        println!("  skipped        {} empty documents", s.skipped_empty);
    }
    if s.val_documents == 0 {
        println!(
            "  warning        no document fell in the validation split; pretraining needs some: give more, smaller \
             documents (a text file is one document unless --sample-by, data.source.sample_by, says paragraph or line) or a \
             larger --val-fraction (data.val_fraction)"
        );
    }
    if s.documents > 0 && s.val_documents == s.documents {
        println!(
            "  warning        every document fell in the validation split, none in the training split: give more, \
             smaller documents (--sample-by paragraph or line) or a smaller --val-fraction (data.val_fraction)"
        );
    }
    if s.replaced_invalid_utf8 > 0 {
        println!("  replaced       {} invalid utf-8 sequences with U+FFFD", s.replaced_invalid_utf8);
    }
    if s.resumed_shards > 0 {
        println!("  kept           {} shards of an earlier build of the same inputs and settings", s.resumed_shards);
        println!("  time           {:.1} s", s.secs);
    } else {
        println!(
            "  time           {:.1} s ({:.1} s tokenizer training), {:.2} MB/s",
            s.secs,
            s.tokenizer_secs,
            s.bytes as f64 / 1e6 / (s.secs - s.tokenizer_secs).max(1e-9)
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A cause the message before already ends with is left out; other causes stay, numbered
    /// when there are several, as anyhow prints them.
    #[test]
    fn error_report_leaves_out_repeated_causes() {
        let io = || std::io::Error::new(std::io::ErrorKind::NotFound, "no such file");
        let lib = patchlm_data::DataError::Io { path: "/data/x".into(), source: io() };
        let e = anyhow::Error::new(lib).context("building shards into out");
        assert_eq!(error_report(&e), "Error: building shards into out\n\nCaused by:\n    /data/x: no such file");
        let e = anyhow::Error::new(io()).context("reading a.toml").context("pretrain");
        assert_eq!(error_report(&e), "Error: pretrain\n\nCaused by:\n    0: reading a.toml\n    1: no such file");
        assert_eq!(error_report(&anyhow::anyhow!("plain")), "Error: plain");
    }
}
