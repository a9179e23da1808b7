//! `cargo xtask compare`: the paper's Table 1 at any scale. On the same data and model it runs
//! the token-level baseline (λ = 0), patch-level training (K, λ; sweeps with `--k` / `--lambda`)
//! and, for each patch run, the baseline at equal compute (fewer tokens); then evaluates every
//! final model and writes a report (Markdown table, JSON, PNG/SVG plots). Every run is an
//! ordinary `pretrain` run directory: an interrupted compare resumes, a finished run is reused.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::DType;
use patchlm_data::shard::TOKENIZER_FILE;
use patchlm_data::{Dataset, Manifest, Split};
use patchlm_eval::report::{write_report, CurvePoint, Report, ReportRun};
use patchlm_eval::{
    continuation_task, perplexity_of_split, score_task, split_texts, write_task_jsonl, ContinuationConfig, McExample,
    TaskResult, WindowConfig,
};
use patchlm_model::{load_pretrained, parse_device};
use patchlm_train::{read_metrics, RunConfig, RunSummary, TrainError};

use crate::pretrain::{default_config, fit_config, prepare_shards, pretrain, resolve_config};

/// Arguments of `cargo xtask compare`.
#[derive(clap::Args)]
pub struct CompareArgs {
    /// A TOML config for every run (as for `pretrain`); its `[patch]` gives the default K and λ.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Override one key for every run, e.g. `--set blocks.max_tokens=400000` (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// Report directory; runs go to `OUT/runs/<name>`.
    #[arg(long, default_value = "runs/compare")]
    out: PathBuf,
    /// Patch sizes to sweep, e.g. `--k 2,4,8` (default: the config's K, 4).
    #[arg(long, value_delimiter = ',')]
    k: Vec<usize>,
    /// Patch-level fractions to sweep, e.g. `--lambda 0.5,0.667,0.8` (default: the config's λ, 2/3).
    #[arg(long, value_delimiter = ',')]
    lambda: Vec<f64>,
    /// Skip the equal-compute baselines.
    #[arg(long)]
    no_equal_compute: bool,
    /// Extra zero-shot tasks for the report (as `eval --task`: BIG-bench task.json, HellaSwag /
    /// PIQA / ARC / MMLU / WinoGrande records as JSONL, JSON or Parquet, or hf://datasets/...).
    #[arg(long, num_args = 1..)]
    task: Vec<PathBuf>,
    /// Questions of the built-in held-out continuation task (drawn from the validation split;
    /// 0 = skip it).
    #[arg(long, default_value_t = 400)]
    continuation_examples: usize,
    /// Validation documents scored for the table's perplexity and bits per byte.
    #[arg(long, default_value_t = 500)]
    max_eval_documents: usize,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Compute dtype of every run, f32 or bf16 (mixed precision); the same as `--set
    /// train.dtype=...`.
    #[arg(long)]
    dtype: Option<String>,
    /// Training text: files, folders or `hf://datasets/<org>/<name>/<path>`; default: the built-in
    /// corpus.
    #[arg(long, num_args = 1..)]
    input: Vec<PathBuf>,
    /// Where the default corpus and shared shards are cached.
    #[arg(long, default_value = "data")]
    data_dir: PathBuf,
}

/// One planned run.
struct Spec {
    dir_name: String,
    display: String,
    cfg: RunConfig,
    /// For an equal-compute baseline: the patch run whose compute it matches.
    matches: Option<usize>,
}

fn lambda_tag(l: f64) -> String {
    format!("{l:.3}")
}

/// A finished run in `dir` made with exactly `cfg` on the shards `shards` identifies
/// (`patchlm_data::shard::shards_identity`): its summary.
fn finished(dir: &Path, cfg: &RunConfig, shards: &str) -> Option<RunSummary> {
    let text = std::fs::read_to_string(dir.join("summary.json")).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    let old: RunConfig = serde_json::from_value(v.get("config")?.clone()).ok()?;
    if old.fingerprint() != cfg.fingerprint()
        || v.get("shards")?.as_str() != Some(shards)
        || !dir.join("model").join("model.safetensors").is_file()
    {
        return None;
    }
    serde_json::from_value(v.get("summary")?.clone()).ok()
}

fn run_one(
    spec: &Spec,
    i: usize,
    n: usize,
    a: &CompareArgs,
    inputs: &[PathBuf],
    runs_dir: &Path,
    shards: &str,
) -> Result<RunSummary> {
    let dir = runs_dir.join(&spec.dir_name);
    println!("== run {}/{}: {} ({})", i + 1, n, spec.display, dir.display());
    if let Some(s) = finished(&dir, &spec.cfg, shards) {
        println!("   finished before; reused (val loss {:.4})", s.val_loss);
        return Ok(s);
    }
    let resume = dir.join("config.toml").is_file();
    let s = match pretrain(spec.cfg.clone(), inputs, &dir, &a.data_dir, &a.device, resume) {
        Ok(s) => s,
        // Stopped by Ctrl-C or SIGTERM: compare itself resumes its runs.
        Err(e) => match e.downcast_ref() {
            Some(TrainError::Stopped { global_step, checkpoint }) => bail!(
                "run {} stopped on request after step {global_step}, its checkpoint {}; run the same \
                 `cargo xtask compare` again to continue it",
                spec.display,
                checkpoint.display()
            ),
            _ => return Err(e.context(format!("run {} in {}", spec.display, dir.display()))),
        },
    };
    crate::pretrain::print_summary(&s, &spec.cfg);
    Ok(s)
}

/// `cargo xtask compare`.
pub fn run(a: CompareArgs) -> Result<()> {
    let (mut base, mut inputs) = resolve_config(a.config.as_deref(), &a.set, default_config())?;
    if !a.input.is_empty() {
        inputs = a.input.clone();
    }
    if let Some(d) = &a.dtype {
        base.train.dtype = d.clone();
    }
    let ks = if a.k.is_empty() { vec![base.patch.k] } else { a.k.clone() };
    let lambdas = if a.lambda.is_empty() { vec![base.patch.lambda] } else { a.lambda.clone() };
    for &k in &ks {
        if k < 2 {
            bail!("--k {k}: patch sizes must be at least 2 (K = 1 is the baseline, which compare always runs)");
        }
    }
    for &l in &lambdas {
        if !(l > 0.0 && l < 1.0) {
            bail!("--lambda {l}: fractions must be in (0, 1) (λ = 0 is the baseline, which compare always runs)");
        }
    }
    // Every run's settings (say a K whose blocks do not divide tokens_per_step) are checked
    // before the data stage and the first run.
    for (k, l) in ks.iter().flat_map(|&k| lambdas.iter().map(move |&l| (k, l))).chain([(1, 0.0)]) {
        let mut c = base.clone();
        (c.patch.k, c.patch.lambda) = (k, l);
        c.validate().with_context(|| format!("the run with K = {k}, λ = {l}"))?;
    }
    let shards = prepare_shards(&base, &inputs, &a.data_dir)?;
    let manifest = Manifest::load(&shards)?;
    let shards_id = patchlm_data::shard::shards_identity(&shards)?;
    let base = fit_config(base, &manifest);

    // The plan: baseline, patch runs, then their equal-compute baselines (budgets known once the
    // patch runs have finished).
    let mut specs = Vec::new();
    let mut baseline = base.clone();
    baseline.patch.k = 1;
    baseline.patch.lambda = 0.0;
    specs.push(Spec { dir_name: "baseline".into(), display: "baseline".into(), cfg: baseline, matches: None });
    for &k in &ks {
        for &l in &lambdas {
            let mut c = base.clone();
            c.patch.k = k;
            c.patch.lambda = l;
            specs.push(Spec {
                dir_name: format!("patch-k{k}-l{}", lambda_tag(l)),
                display: format!("patch K={k} λ={}", lambda_tag(l)),
                cfg: c,
                matches: None,
            });
        }
    }
    let n_patch = specs.len() - 1;
    if !a.no_equal_compute {
        for i in 1..=n_patch {
            let p = specs[i].cfg.patch;
            specs.push(Spec {
                dir_name: format!("baseline-eq-k{}-l{}", p.k, lambda_tag(p.lambda)),
                display: format!("baseline, compute of K={} λ={}", p.k, lambda_tag(p.lambda)),
                cfg: specs[0].cfg.clone(),
                matches: Some(i),
            });
        }
    }
    let runs_dir = a.out.join("runs");
    std::fs::create_dir_all(&runs_dir).with_context(|| format!("creating {}", runs_dir.display()))?;
    let n = specs.len();
    let mut summaries: Vec<RunSummary> = Vec::new();
    for i in 0..n {
        if let Some(m) = specs[i].matches {
            // The budget counts tokens over every pass; max_tokens caps the data each pass reads.
            let budget = specs[m].cfg.patch.equal_compute_tokens(summaries[m].tokens);
            specs[i].cfg.blocks.max_tokens = budget.div_ceil(specs[i].cfg.blocks.epochs.max(1) as u64);
        }
        let s = run_one(&specs[i], i, n, &a, &inputs, &runs_dir, &shards_id)?;
        summaries.push(s);
    }

    // Evaluation of every final model on the same held-out text and tasks.
    let device = parse_device(&a.device)?;
    let tok = patchlm_data::tokenizer::load_tokenizer(&shards.join(TOKENIZER_FILE))?;
    let ds = Dataset::open(&shards)?;
    let mut tasks: Vec<(String, Vec<McExample>)> = Vec::new();
    if a.continuation_examples > 0 {
        let texts = split_texts(&tok, &ds, Split::Val)?;
        let cc = ContinuationConfig { examples: a.continuation_examples, ..Default::default() };
        let ex = continuation_task(&texts, &cc);
        if ex.is_empty() {
            println!("the validation split has no usable lines for the continuation task; skipped");
        } else {
            let p = a.out.join("continuation.jsonl");
            std::fs::create_dir_all(&a.out)?;
            write_task_jsonl(&p, &ex)?;
            println!("continuation task: {} questions from the validation split ({})", ex.len(), p.display());
            tasks.push(("continuation".into(), ex));
        }
    }
    tasks.extend(crate::eval_cmd::load_tasks(&a.task)?);
    let reference_flops = summaries[0].flops;
    let mut rows = Vec::new();
    for (spec, s) in specs.iter().zip(&summaries) {
        let dir = runs_dir.join(&spec.dir_name);
        println!("evaluating {}", spec.display);
        let (model, mcfg) = load_pretrained(&dir.join("model"), &device, DType::F32)?;
        let w = WindowConfig { context: spec.cfg.blocks.context.min(mcfg.max_position_embeddings), stride: None };
        let nll = perplexity_of_split(&model, &tok, &ds, Split::Val, &w, &device, Some(a.max_eval_documents), true)?;
        let bos = manifest.special_tokens.bos;
        let results = tasks
            .iter()
            .map(|(name, ex)| {
                // The report keeps accuracies, not every question's scores.
                score_task(&model, &tok, bos, name, ex, &device, true).map(|r| TaskResult { samples: Vec::new(), ..r })
            })
            .collect::<patchlm_eval::Result<Vec<_>>>()?;
        let metrics = dir.join("metrics.jsonl");
        let (_, evals) = read_metrics(&metrics)?;
        let point = |e: &patchlm_train::EvalMetrics| CurvePoint {
            tokens: e.tokens_seen as f64,
            compute: e.flops / reference_flops,
            secs: e.train_secs,
            loss: e.val_loss,
        };
        let curve: Vec<CurvePoint> = evals.iter().map(point).collect();
        let marker = patchlm_train::phase_switch(&evals).map(point);
        rows.push(ReportRun {
            name: spec.display.clone(),
            labels: vec![
                ("K".into(), spec.cfg.patch.k.to_string()),
                ("λ".into(), if spec.cfg.patch.lambda > 0.0 { lambda_tag(spec.cfg.patch.lambda) } else { "0".into() }),
            ],
            cost: s.flops / reference_flops,
            tokens: s.tokens,
            wall_secs: s.train_secs,
            val_loss: nll.mean_nll(),
            val_ppl: nll.perplexity(),
            bits_per_byte: nll.bits_per_byte(),
            tasks: results,
            curve,
            marker,
        });
    }
    let c = &base;
    let notes = vec![
        format!(
            "Model: `{}` preset ({} layers, hidden {}, {:.2}M parameters), context {}, {} tokens per step, peak lr {}. \
             Data: {} training tokens available ({} validation), vocabulary {}; each run reads the same token stream \
             from its start. Patch runs train the first λ of their tokens with K tokens per position, then the rest \
             token by token; cost is training compute relative to the baseline.",
            c.preset,
            c.model.num_hidden_layers,
            c.model.hidden_size,
            c.model.num_params() as f64 / 1e6,
            c.blocks.context,
            c.train.tokens_per_step,
            c.train.lr,
            manifest.tokens(Split::Train),
            manifest.tokens(Split::Val),
            manifest.vocab_size,
        ),
        format!(
            "Table: each final model scored by the eval crate on up to {} validation documents (non-overlapping \
             windows of the context; bits per byte over their UTF-8 text){}. Plots: validation loss on held-out \
             blocks measured during training; rings and vertical lines mark each patch run's switch to token level.",
            a.max_eval_documents,
            if tasks.is_empty() {
                String::new()
            } else {
                "; zero-shot accuracy in %, where `continuation` asks which of 4 lines follows 3 lines of a \
                 validation document (chance 25%)"
                    .to_string()
            }
        ),
        format!("Device: {}. Run directories: `{}`.", a.device, runs_dir.display()),
    ];
    let report = Report {
        title: "Patch-level training vs token-level baseline".into(),
        notes,
        runs: rows,
        marker_label: "patch → token switch".into(),
    };
    let files = write_report(&a.out, &report)?;
    println!();
    print!("{}", patchlm_eval::report::markdown_table(&report));
    println!();
    for f in files {
        println!("wrote {}", f.display());
    }
    Ok(())
}
