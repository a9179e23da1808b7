//! `cargo xtask pretrain`: corpus → shards → patch datasets → patch phase → token phase → HF
//! model, with a fully resolved `config.toml`, `metrics.jsonl`, checkpoints and `summary.json`.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use patchlm_data::shard::TOKENIZER_FILE;
use patchlm_data::{Manifest, TokenizerSource};
use patchlm_eval::report::{write_plot, LinePlot, Series};
use patchlm_model::{parse_device, ModelConfig};
use patchlm_patch::{build_patch_datasets, PatchManifest};
use patchlm_train::{RunConfig, RunSummary, Trainer};

/// Arguments of `cargo xtask pretrain`.
#[derive(clap::Args, Clone)]
pub struct PretrainArgs {
    /// A TOML config (keys as in the run's saved config.toml); unset keys keep the defaults.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Override one key, e.g. `--set patch.lambda=0.5 --set train.lr=1e-3` (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// Run directory.
    #[arg(long, default_value = "runs/pretrain")]
    pub out: PathBuf,
    /// Continue a stopped or killed run from its newest checkpoint (one of other settings or
    /// other data is refused).
    #[arg(long)]
    pub resume: bool,
    /// Print the resolved config (defaults ← --config ← --set, checked) as TOML and exit: every
    /// key there is, to edit and pass back with --config.
    #[arg(long)]
    pub print_config: bool,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Compute dtype, f32 or bf16 (mixed precision); the same as `--set train.dtype=...`.
    #[arg(long)]
    pub dtype: Option<String>,
    /// Training text: files, folders or `hf://datasets/<org>/<name>/<path>`; default: the built-in
    /// corpus (`cargo xtask corpus`).
    #[arg(long, num_args = 1..)]
    pub input: Vec<PathBuf>,
    /// Where the default corpus and shared shards are cached.
    #[arg(long, default_value = "data")]
    pub data_dir: PathBuf,
}

/// The built-in default: the `small` preset on the default corpus, sized to finish in about ten
/// minutes on two CPU cores with the paper's K = 4, λ = 2/3.
pub fn default_config() -> RunConfig {
    let mut c = RunConfig { preset: "small".into(), ..Default::default() };
    c.model = ModelConfig::preset("small").unwrap_or_default();
    c.blocks.context = 128;
    c.blocks.max_val_blocks = 64;
    c.blocks.max_tokens = 800_000;
    c.train.tokens_per_step = 8192;
    c.train.micro_batch = 16;
    c.train.lr = 2e-3;
    c.train.warmup_steps = 20;
    c.train.eval_every = 10;
    c.train.checkpoint_every = 50;
    c.train.max_steps_per_phase = 0;
    c
}

/// Writes `over` into `base`: a table into a table key by key (recursively), anything else in
/// place of what was there.
fn merge(base: &mut toml::Value, over: toml::Value) {
    match (base, over) {
        (toml::Value::Table(b), toml::Value::Table(o)) => {
            for (k, v) in o {
                match b.get_mut(&k) {
                    Some(bv) => merge(bv, v),
                    None => {
                        b.insert(k, v);
                    }
                }
            }
        }
        (b, o) => *b = o,
    }
}

fn parse_set(kv: &str) -> Result<toml::Value> {
    let (key, val) = kv.split_once('=').with_context(|| format!("--set {kv}: expected KEY=VALUE"))?;
    // Values are TOML literals; bare words are taken as strings.
    let value: toml::Value = match toml::from_str::<toml::Table>(&format!("v = {val}")) {
        Ok(t) => t.get("v").cloned().unwrap_or(toml::Value::String(val.into())),
        Err(_) => toml::Value::String(val.into()),
    };
    let mut v = value;
    for part in key.trim().split('.').rev() {
        let mut t = toml::Table::new();
        t.insert(part.to_string(), v);
        v = toml::Value::Table(t);
    }
    Ok(v)
}

/// Fails on a key of `user` (a config file's table or one `--set`, named by `source`) that no
/// [`RunConfig`] field takes: serde would drop it, and a misspelt setting would silently run
/// with its default. `input` (the training text) is the one key outside `RunConfig`.
fn check_keys(user: &toml::Value, source: &str) -> Result<()> {
    let mut user = user.clone();
    if let toml::Value::Table(t) = &mut user {
        t.remove("input");
    }
    let mut unknown = Vec::new();
    // A wrong value type is reported by the final deserialization; only dropped keys matter here.
    let _: std::result::Result<RunConfig, _> = serde_ignored::deserialize(user, |path| unknown.push(path.to_string()));
    let Some(key) = unknown.first() else { return Ok(()) };
    let (table, known) = match key.rsplit_once('.') {
        Some((parent, _)) => (format!("[{parent}]"), config_keys(parent)),
        None => ("the top level".to_string(), config_keys("")),
    };
    bail!("{source}: unknown config key `{key}`; {table} has: {}", known.join(", "))
}

/// The keys of the config table at the dotted `path` ("" for the top level), `input` included
/// at the top, sub-tables listed by name.
fn config_keys(path: &str) -> Vec<String> {
    let mut v = every_key_config();
    for part in path.split('.').filter(|p| !p.is_empty()) {
        v = v.get(part).cloned().unwrap_or(toml::Value::Table(toml::Table::new()));
    }
    let mut keys: Vec<String> = v.as_table().map(|t| t.keys().cloned().collect()).unwrap_or_default();
    if path.is_empty() {
        keys.push("input".into());
    }
    keys.sort();
    keys
}

/// A config as TOML with every key there is, those too that a config leaves out while they are
/// at their default (TrainConfig::dtype, TokenizerConfig::file, ModelConfig::tie_word_embeddings
/// and rope_scaling).
fn every_key_config() -> toml::Value {
    let mut all = default_config();
    all.train.dtype = "bf16".into();
    all.data.tokenizer.file = Some(String::new());
    all.model.tie_word_embeddings = true;
    all.model.rope_scaling = Some(patchlm_model::RopeScaling::Linear { factor: 1.0 });
    toml::Value::try_from(&all).unwrap_or(toml::Value::Table(toml::Table::new()))
}

/// The dotted paths of `v`'s keys (a table's own key, not its keys, where `v` has it but
/// `like` lacks it altogether), of those not in `like`.
fn keys_missing(v: &toml::Value, like: &toml::Value, prefix: &str, out: &mut Vec<String>) {
    let Some(table) = v.as_table() else { return };
    for (k, sub) in table {
        let path = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
        match like.get(k) {
            None => out.push(path),
            Some(there) if sub.is_table() && there.is_table() => keys_missing(sub, there, &path, out),
            Some(_) => {}
        }
    }
}

/// Resolves the run config: built-in default ← `--config` ← `--set`; a `preset` key picks the
/// model sizes that `[model]` keys then override.
pub fn resolve_config(config: Option<&Path>, sets: &[String], base: RunConfig) -> Result<(RunConfig, Vec<PathBuf>)> {
    let mut user = toml::Value::Table(toml::Table::new());
    if let Some(p) = config {
        let text = std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
        let v: toml::Value = toml::from_str(&text).with_context(|| format!("{}: invalid TOML", p.display()))?;
        check_keys(&v, &p.display().to_string())?;
        merge(&mut user, v);
    }
    for s in sets {
        let v = parse_set(s)?;
        check_keys(&v, &format!("--set {s}"))?;
        merge(&mut user, v);
    }
    let mut base = base;
    if let Some(preset) = user.get("preset").and_then(|p| p.as_str()) {
        base.model = ModelConfig::preset(preset)?;
        base.preset = preset.to_string();
    }
    let inputs: Vec<PathBuf> = user
        .get("input")
        .and_then(|v| v.as_array())
        .map(|a| a.iter().filter_map(|x| x.as_str().map(PathBuf::from)).collect())
        .unwrap_or_default();
    if let toml::Value::Table(t) = &mut user {
        t.remove("input");
    }
    let mut merged = toml::Value::try_from(&base).context("serializing the default config")?;
    merge(&mut merged, user);
    let cfg: RunConfig = merged.try_into().context("invalid config (check key names and value types)")?;
    Ok((cfg, inputs))
}

/// Data stage for a run: default corpus if no input, shards reused when the same settings built
/// them before (keyed by the data config and inputs).
pub fn prepare_shards(cfg: &RunConfig, inputs: &[PathBuf], data_dir: &Path) -> Result<PathBuf> {
    let inputs: Vec<PathBuf> = if inputs.is_empty() {
        let s = patchlm_data::corpus::assemble_default_corpus(&data_dir.join("corpus"), &data_dir.join("cache"))?;
        if !s.cached {
            println!("default corpus: {} works, {} documents, {:.1} MB", s.works, s.documents, s.bytes as f64 / 1e6);
        }
        vec![s.path]
    } else {
        inputs.to_vec()
    };
    // hf:// inputs become files in the Hugging Face cache (their paths name the commit).
    let inputs = patchlm_data::hub::resolve_inputs(&inputs)?;
    let tok_file = cfg.data.tokenizer.file.as_deref().map(patchlm_data::hub::resolve_tokenizer).transpose()?;
    // The cache key covers the settings, every input file's path, size and mtime, so edited
    // inputs are re-tokenized rather than served stale, and the tokenizer file's.
    // By canonical path: `corpus.jsonl`, `./corpus.jsonl` and its absolute path are one input.
    let stamp = |f: &Path| patchlm_data::source::file_stamp(&f.canonicalize().unwrap_or(f.to_path_buf()));
    let expanded = patchlm_data::source::expand_inputs(&inputs)?;
    let files: Vec<serde_json::Value> = expanded.iter().map(|f| stamp(f)).collect();
    let mut key = serde_json::json!({ "data": cfg.data, "inputs": files });
    // Only when set, so that the key (and the cache) of a run that trains its tokenizer stays
    // what it was.
    if let Some(t) = &tok_file {
        key["tokenizer"] = stamp(t);
    }
    // SHA-256, not std's hasher, whose output may change with the Rust release that builds it
    // (a new toolchain would have tokenized the corpus again).
    let digest = patchlm_data::shard::sha256_bytes(key.to_string().as_bytes());
    let hash = digest.trim_start_matches("sha256:").get(..16).unwrap_or("0");
    let shards = data_dir.join(format!("shards-{hash}"));
    let src = match &tok_file {
        Some(p) => TokenizerSource::File(p),
        None => TokenizerSource::Train,
    };
    // Kept only where they are this build's (by the identity the build recorded, without hashing
    // the shards: the reader checks them); shards an earlier revision of the data crate made, or
    // another build wrote there (`data --out` naming this folder), are made again in place.
    if patchlm_data::holds_build(&inputs, &shards, &cfg.data, &src)? {
        return Ok(shards);
    }
    crate::warn_repeated(&expanded);
    let s = patchlm_data::build_shards(&inputs, &shards, &cfg.data, src, true)
        .with_context(|| format!("building shards into {}", shards.display()))?;
    crate::print_data_summary(&s, &shards, tok_file.is_none().then_some(&cfg.data.tokenizer));
    Ok(shards)
}

/// The config a run on these shards trains with: the model's vocabulary covers the tokenizer's
/// ids (rounded up to a multiple of 64) and its positions cover the context.
pub fn fit_config(mut cfg: RunConfig, manifest: &Manifest) -> RunConfig {
    cfg.model.vocab_size = manifest.vocab_size.div_ceil(64) * 64;
    cfg.model.max_position_embeddings = cfg.model.max_position_embeddings.max(cfg.blocks.context);
    cfg
}

/// The loss curves of a run, from its `metrics.jsonl`: validation loss (token level in every
/// phase, the switch to the token phase marked) and each phase's training loss, against
/// training tokens.
pub fn loss_plot(metrics: &Path, title: &str) -> Result<LinePlot> {
    let (steps, evals) = patchlm_train::read_metrics(metrics)?;
    let switch = patchlm_train::phase_switch(&evals);
    let mut series = vec![Series {
        name: "validation loss (token level)".into(),
        points: evals.iter().map(|e| (e.tokens_seen as f64, e.val_loss)).collect(),
        dots: true,
        marker: switch.map(|e| (e.tokens_seen as f64, e.val_loss)),
    }];
    for s in &steps {
        let name = if s.k > 1 {
            format!("training loss, {} phase (mean over the K={} tokens of the next patch)", s.phase, s.k)
        } else {
            format!("training loss, {} phase", s.phase)
        };
        if series.last().is_none_or(|l| l.name != name) {
            series.push(Series { name, points: Vec::new(), dots: false, marker: None });
        }
        if let Some(l) = series.last_mut() {
            l.points.push((s.tokens_seen as f64, s.loss));
        }
    }
    Ok(LinePlot {
        title: title.to_string(),
        x_label: "training tokens".into(),
        y_label: "loss (nats/token)".into(),
        series,
        marker_label: "patch → token switch".into(),
    })
}

/// Draws `<run>/loss.png` and `<run>/loss.svg` from the run's metrics.
pub fn write_loss_plot(run: &Path) -> Result<()> {
    let name = run.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let plot = loss_plot(&run.join("metrics.jsonl"), &format!("Loss of run {name}"))?;
    write_plot(run, LOSS_PLOT, &plot)?;
    Ok(())
}

/// The stem of a run's loss plot (`loss.png`, `loss.svg`).
pub const LOSS_PLOT: &str = "loss";
/// Redraw the loss plot at a validation at most this often while a run trains.
const PLOT_EVERY_SECS: u64 = 30;

/// What a run directory holds (besides leftovers of an interrupted write: [`is_leftover`]).
const RUN_FILES: &[&str] = &[
    patchlm_train::RUN_LOCK_FILE,
    "config.toml",
    "metrics.jsonl",
    "summary.json",
    "loss.png",
    "loss.svg",
    "checkpoints",
    "patchdata",
    "model",
];

/// A temp file that a write of one of the run's files left when it was killed or failed (a full
/// disk): `<file>.tmp`, `<file>.<pid>-<n>.tmp`, or `.loss.tmp.png` / `.loss.tmp.svg` (the loss
/// plot's temp files before plots were written like every other file).
fn is_leftover(name: &str) -> bool {
    let Some(stem) = name.strip_suffix(".tmp") else {
        return [".loss.tmp.png", ".loss.tmp.svg"].contains(&name);
    };
    RUN_FILES.iter().any(|f| stem == *f || stem.strip_prefix(f).is_some_and(|rest| rest.starts_with('.')))
}

/// Removes what interrupted writes left in a run directory (see [`is_leftover`]). Only while the
/// run holds the directory: another run's temp file may be in the middle of its write.
fn remove_leftovers(out: &Path, _claim: &patchlm_train::RunLock) {
    let Ok(entries) = std::fs::read_dir(out) else { return };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        if is_leftover(&name) && e.file_type().is_ok_and(|t| t.is_file()) {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// Refuses an `--out` that holds anything but a run's own files (a run writes `config.toml`,
/// `summary.json`, ... there: another directory's files would be overwritten).
fn check_run_dir(out: &Path) -> Result<()> {
    if out.exists() && !out.is_dir() {
        bail!("{} is a file, not a directory: give --out a new or empty directory", out.display());
    }
    let Ok(entries) = std::fs::read_dir(out) else { return Ok(()) };
    let mut foreign: Vec<String> = entries
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|n| !RUN_FILES.contains(&n.as_str()) && !is_leftover(n))
        .collect();
    // A config.toml there must be a run's: its keys a RunConfig's, its tables filled in.
    let saved = out.join("config.toml");
    if saved.is_file() {
        let text = std::fs::read_to_string(&saved).unwrap_or_default();
        let run_config = toml::from_str::<toml::Value>(&text).ok().filter(|v| {
            check_keys(v, "").is_ok()
                && ["model", "train", "patch"].iter().all(|t| v.get(t).is_some_and(|x| x.is_table()))
        });
        if run_config.is_none() {
            foreign.push("config.toml (not a run's)".into());
        }
    }
    if foreign.is_empty() {
        return Ok(());
    }
    foreign.sort();
    foreign.truncate(5);
    bail!(
        "{} holds files that are not a run's ({}); a run writes config.toml, summary.json and more there: choose a new \
         or empty --out",
        out.display(),
        foreign.join(", ")
    )
}

/// Runs one pretraining run end to end; returns its summary.
pub fn pretrain(
    mut cfg: RunConfig,
    inputs: &[PathBuf],
    out: &Path,
    data_dir: &Path,
    device: &str,
    resume: bool,
) -> Result<RunSummary> {
    let wall = Instant::now();
    let device = parse_device(device)?;
    // Every setting is checked before the data stage, which can take long on a large corpus.
    cfg.validate()?;
    // The run directory too, and it is claimed before the data stage: a second run there (of
    // this process or another) is refused before it writes anything.
    check_run_dir(out)?;
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let claim = patchlm_train::RunLock::acquire(out)?;
    remove_leftovers(out, &claim);
    let shards = prepare_shards(&cfg, inputs, data_dir)?;
    let manifest = Manifest::load(&shards)?;
    cfg = fit_config(cfg, &manifest);
    if resume {
        let saved = out.join("config.toml");
        if saved.is_file() {
            let text = std::fs::read_to_string(&saved)?;
            let old: RunConfig = toml::from_str(&text).with_context(|| format!("{}: invalid", saved.display()))?;
            if old.fingerprint() != cfg.fingerprint() {
                bail!(
                    "{} was made with a different config; resume with the same --config/--set, or use another --out",
                    out.display()
                );
            }
        }
    }
    // With its inputs, so that `--config <run>/config.toml` repeats the run on the same text.
    let header = "# The settings this run was made with, fully resolved (model.vocab_size from its tokenizer).\n\
                  # `cargo xtask pretrain --config <this file> --out <new dir>` repeats the run.\n";
    // Local inputs by absolute path, so that the file repeats the run from any directory.
    let named: Vec<PathBuf> = inputs
        .iter()
        .map(|p| if p.exists() { std::path::absolute(p).unwrap_or(p.clone()) } else { p.clone() })
        .collect();
    let text = config_toml(header, &cfg, &named)?;
    patchlm_model::weights::write_atomic(&out.join("config.toml"), text.as_bytes())?;
    let pdir = out.join("patchdata");
    // The blocks are cut again unless they were cut from these very shards with these settings.
    let shards_id = patchlm_data::shard::shards_identity(&shards)?;
    let fresh = match PatchManifest::load(&pdir) {
        Ok(m) => m.patch != cfg.patch || m.data != cfg.blocks || m.shards_manifest_sha256 != shards_id,
        Err(_) => true,
    };
    if fresh {
        build_patch_datasets(&shards, &pdir, &cfg.patch, &cfg.blocks)?;
    }
    let tok_json = std::fs::read_to_string(shards.join(TOKENIZER_FILE))?;
    let sp = manifest.special_tokens;
    // The loss plot is redrawn during training (at a validation, at most every PLOT_EVERY_SECS)
    // and once at the end; a plot that fails costs a warning, not the run.
    let mut last_plot: Option<Instant> = None;
    let plot_now = |force: bool, last: &mut Option<Instant>| {
        if force || last.is_none_or(|t| t.elapsed().as_secs() >= PLOT_EVERY_SECS) {
            if let Err(e) = write_loss_plot(out) {
                eprintln!("warning: loss plot of {}: {e:#}", out.display());
            }
            *last = Some(Instant::now());
        }
    };
    // Ctrl-C or SIGTERM stops the run after its current step, checkpointed for --resume.
    let signals = crate::interrupt::StopOnSignal::install();
    let mut trainer = Trainer::new(cfg.clone(), &pdir, out, device)?
        .with_tokenizer(tok_json, sp.bos, Some(sp.eos))?
        .on_eval(|_| plot_now(false, &mut last_plot))
        .stop_when(|| signals.asked());
    for p in trainer.plans() {
        println!(
            "phase {:<5} K={} {:>5} steps × {} tokens ({} blocks of {} tokens)",
            p.name,
            p.k,
            p.steps,
            p.tokens_per_step(),
            p.blocks_per_step,
            p.file.block_len
        );
        if let Some(note) = patchlm_train::warmup_note(cfg.train.warmup_steps, p.steps) {
            println!("  note: {note}");
        }
    }
    let summary = trainer.run(resume);
    drop(trainer);
    drop(signals);
    // The plot shows where the run got to, whether it ended, stopped or failed after a step.
    if summary.is_ok() || out.join("metrics.jsonl").is_file() {
        plot_now(true, &mut last_plot);
    }
    let summary = summary?;
    let json = serde_json::json!({
        "summary": summary,
        "config": cfg,
        "shards": shards_id,
        "wall_secs": wall.elapsed().as_secs_f64(),
    });
    patchlm_model::weights::write_atomic(&out.join("summary.json"), serde_json::to_string_pretty(&json)?.as_bytes())?;
    Ok(summary)
}

/// The patch phase's tokens/s over the token phase's, and its K, where a run has both and both
/// trained in this process (one finished before a resume has no speed here).
fn throughput_ratio(phases: &[patchlm_train::PhaseSummary]) -> Option<(f64, usize)> {
    match phases {
        [a, b] if a.tokens_per_sec > 0.0 && b.tokens_per_sec > 0.0 => Some((a.tokens_per_sec / b.tokens_per_sec, a.k)),
        _ => None,
    }
}

/// Prints a run summary.
pub fn print_summary(s: &RunSummary, cfg: &RunConfig) {
    if cfg.patch.lambda > 0.0 {
        println!("run summary (K={}, lambda={:.3})", cfg.patch.k, cfg.patch.lambda);
    } else {
        println!("run summary (token level: lambda 0)");
    }
    for p in &s.phases {
        if p.steps > 0 {
            println!(
                "  {:<5} phase  K={}  {:>5} steps  {:>9} tokens  {:>7.1} s  {:>8.0} tokens/s",
                p.name, p.k, p.steps, p.tokens, p.secs, p.tokens_per_sec
            );
        }
    }
    if let Some((ratio, k)) = throughput_ratio(&s.phases) {
        println!("  patch/token throughput ratio {ratio:.2} (K = {k})");
    }
    println!("  tokens {}  cost {:.3}× of token-level training on the same tokens", s.tokens, s.relative_cost);
    println!("  validation loss {:.4}  perplexity {:.2}", s.val_loss, s.val_ppl);
    println!("  training time {:.1} s; model in {}", s.train_secs, s.model_dir.display());
}

/// `cargo xtask pretrain`.
pub fn run(a: PretrainArgs) -> Result<()> {
    let (mut cfg, mut inputs) = resolve_config(a.config.as_deref(), &a.set, default_config())?;
    if !a.input.is_empty() {
        inputs = a.input.clone();
    }
    if let Some(d) = &a.dtype {
        cfg.train.dtype = d.clone();
    }
    if a.print_config {
        cfg.validate()?;
        print!("{}", config_toml(PRINTED_HEADER, &cfg, &inputs)?);
        return Ok(());
    }
    let s = pretrain(cfg.clone(), &inputs, &a.out, &a.data_dir, &a.device, a.resume)?;
    print_summary(&s, &cfg);
    let run = a.out.display();
    println!("next: cargo xtask generate --model {run} --prompt \"...\"");
    println!("      cargo xtask eval --model {run} --text FILE... --task FILE...");
    println!("      cargo xtask plot {run} OTHER_RUN...");
    Ok(())
}

/// The first lines of what `--print-config` prints.
const PRINTED_HEADER: &str =
    "# A pretrain config, fully resolved (built-in default <- --config <- --set); run it with --config.\n\
     # model.vocab_size follows the tokenizer, and model.max_position_embeddings is raised to\n\
     # blocks.context, when the run starts (its saved config.toml has the values it ran with).\n";

/// `cfg` as a TOML file that `--config` reads back, after the comment lines `header`: the keys
/// left out at their default named, its inputs (if any), then every key below its doc comment.
fn config_toml(header: &str, cfg: &RunConfig, inputs: &[PathBuf]) -> Result<String> {
    let mut text = header.to_string();
    let resolved = toml::Value::try_from(cfg).context("serializing the config")?;
    let mut absent = Vec::new();
    keys_missing(&every_key_config(), &resolved, "", &mut absent);
    if !absent.is_empty() {
        text += "# Also settable, left out while at their default:\n";
        for key in &absent {
            text += &wrap_comment(&format!("{key}: {}", config_doc(key).unwrap_or("")), "#  -", "#   ", 98);
        }
    }
    if !inputs.is_empty() {
        // TOML holds only UTF-8: a path that is not (a Latin-1 file name) is written with U+FFFD.
        for p in inputs.iter().filter(|p| p.to_str().is_none()) {
            eprintln!(
                "warning: input {} is not UTF-8, which a TOML file cannot hold: the run's config.toml names it \
                 with U+FFFD in its place, and --config with that file will not find it (rename it, or give it \
                 again with --input)",
                p.display()
            );
        }
        let list: Vec<String> = inputs.iter().map(|p| p.to_string_lossy().into_owned()).collect();
        text += &toml::to_string(&toml::toml! { input = list }).context("serializing the inputs")?;
    }
    text += &with_docs(&toml::to_string_pretty(cfg).context("serializing the config")?);
    Ok(text)
}

mod docs {
    include!(concat!(env!("OUT_DIR"), "/config_docs.rs"));
}

/// The doc comment of a config key (`train.adamw.beta1`), as the API docs give it.
fn config_doc(path: &str) -> Option<&'static str> {
    docs::CONFIG_DOCS.iter().find(|(k, _)| *k == path).map(|(_, d)| *d).filter(|d| !d.is_empty())
}

/// `toml` (a RunConfig as `toml::to_string_pretty` writes it) with each key's and each table's
/// doc comment above it as `#` lines.
fn with_docs(toml: &str) -> String {
    let mut out = String::new();
    let mut table = String::new();
    for line in toml.lines() {
        let path = if let Some(t) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            table = t.to_string();
            Some(table.clone())
        } else {
            // Any other line with " = " in it (an input's path in an array) names no config key.
            line.split_once(" = ").map(|(k, _)| if table.is_empty() { k.to_string() } else { format!("{table}.{k}") })
        };
        if let Some(doc) = path.as_deref().and_then(config_doc) {
            out += &wrap_comment(doc, "#", "#", 98);
        }
        out += line;
        out.push('\n');
    }
    out
}

/// `text` as comment lines of at most `width` characters, the first starting with `first` and
/// a space, the others with `rest` and a space (a longer word gets a line of its own).
fn wrap_comment(text: &str, first: &str, rest: &str, width: usize) -> String {
    let (mut out, mut line, mut empty) = (String::new(), first.to_string(), true);
    for word in text.split_whitespace() {
        if !empty && line.chars().count() + 1 + word.chars().count() > width {
            out += &line;
            out.push('\n');
            line = rest.to_string();
        }
        line.push(' ');
        line += word;
        empty = false;
    }
    if !empty {
        out += &line;
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sets(s: &[&str]) -> Vec<String> {
        s.iter().map(|x| x.to_string()).collect()
    }

    /// `--out` may be new, empty or a run's own directory; anything else there is refused by name,
    /// so that a run never overwrites another directory's config.toml or summary.json.
    #[test]
    fn out_must_be_a_run_directory() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("run");
        check_run_dir(&out).unwrap(); // not there yet
        std::fs::write(&out, "a file").unwrap();
        let e = check_run_dir(&out).unwrap_err().to_string();
        assert!(e.contains("is a file, not a directory"), "{e}");
        std::fs::remove_file(&out).unwrap();
        std::fs::create_dir(&out).unwrap();
        check_run_dir(&out).unwrap(); // empty
        let cfg = toml::to_string_pretty(&default_config()).unwrap();
        std::fs::write(out.join("config.toml"), &cfg).unwrap();
        // With what interrupted writes leave: temp files of each kind of atomic write.
        let leftovers = ["summary.json.tmp", "loss.png.4242-0.tmp", "metrics.jsonl.17-3.tmp", ".loss.tmp.png"];
        for f in ["metrics.jsonl", "loss.svg"].iter().chain(&leftovers) {
            std::fs::write(out.join(f), "").unwrap();
        }
        std::fs::create_dir(out.join("checkpoints")).unwrap();
        check_run_dir(&out).unwrap(); // a run's

        // Removed once the run holds the directory; the run's own files stay.
        let claim = patchlm_train::RunLock::acquire(&out).unwrap();
        remove_leftovers(&out, &claim);
        drop(claim);
        for f in leftovers {
            assert!(!out.join(f).exists(), "{f} was left");
        }
        for f in ["config.toml", "metrics.jsonl", "loss.svg", "checkpoints"] {
            assert!(out.join(f).exists(), "{f} was removed");
        }
        // Names that merely look like leftovers are someone else's.
        for f in ["notes.tmp", "loss.pngs.tmp", "model-old.tmp"] {
            std::fs::write(out.join(f), "").unwrap();
            let e = check_run_dir(&out).unwrap_err().to_string();
            assert!(e.contains(f), "{f}: {e}");
            std::fs::remove_file(out.join(f)).unwrap();
        }
        std::fs::write(out.join("notes.txt"), "mine").unwrap();
        let e = check_run_dir(&out).unwrap_err().to_string();
        assert!(e.contains("notes.txt") && e.contains("--out"), "{e}");
        std::fs::remove_file(out.join("notes.txt")).unwrap();
        for other in ["my notes", "[server]\nport = 8080\n", "seed = 1\n"] {
            std::fs::write(out.join("config.toml"), other).unwrap();
            let e = check_run_dir(&out).unwrap_err().to_string();
            assert!(e.contains("config.toml (not a run's)"), "{other:?}: {e}");
        }
    }

    #[test]
    fn misspelt_or_unknown_keys_are_refused_with_the_keys_that_exist() {
        let err = resolve_config(None, &sets(&["train.lrr=1e-3"]), default_config()).unwrap_err().to_string();
        assert!(err.contains("--set train.lrr=1e-3: unknown config key `train.lrr`"), "{err}");
        assert!(err.contains("[train] has: ") && err.contains(" lr,") && err.contains(" dtype,"), "{err}");
        let err = resolve_config(None, &sets(&["nonsense.key=1"]), default_config()).unwrap_err().to_string();
        assert!(err.contains("unknown config key `nonsense`") && err.contains("the top level has: "), "{err}");
        assert!(err.contains(" input,") && err.contains(" train"), "{err}");
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("run.toml");
        std::fs::write(&file, "[model]\nhidden_size = 64\n[model.extra]\nx = 1\n").unwrap();
        let err = resolve_config(Some(&file), &[], default_config()).unwrap_err().to_string();
        assert!(err.contains("run.toml: unknown config key `model.extra`"), "{err}");
        assert!(err.contains("[model] has: ") && err.contains("hidden_size"), "{err}");
    }

    #[test]
    fn every_key_of_a_saved_config_is_accepted() {
        // A run's saved config.toml, with the one key saved only when set, fed back whole.
        let mut cfg = default_config();
        cfg.train.dtype = "bf16".into();
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("config.toml");
        std::fs::write(&file, toml::to_string(&cfg).unwrap()).unwrap();
        let extra = sets(&["train.dtype=f32", "input=[\"a.txt\"]", "preset=tiny", "patch.k=8"]);
        let (got, inputs) = resolve_config(Some(&file), &extra, default_config()).unwrap();
        assert_eq!(inputs, vec![PathBuf::from("a.txt")]);
        assert_eq!((got.train.dtype.as_str(), got.patch.k, got.model.clone()), ("f32", 8, cfg.model.clone()));
        cfg.train.dtype = "f32".into();
        cfg.patch.k = 8;
        assert_eq!(got, RunConfig { preset: "tiny".into(), ..cfg });
    }

    /// `--print-config` prints what `--config` reads back to the same config and inputs, and names
    /// the keys it leaves out at their default (and only those).
    #[test]
    fn a_printed_config_reads_back_the_same() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("printed.toml");
        let set = sets(&["patch.k=8", "model.tie_word_embeddings=true", "blocks.context=256", "seed=3"]);
        let (cfg, _) = resolve_config(None, &set, default_config()).unwrap();
        let inputs = vec![PathBuf::from("my texts/a.jsonl"), PathBuf::from("hf://datasets/org/x/data")];
        let text = config_toml(PRINTED_HEADER, &cfg, &inputs).unwrap();
        let absent: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("#  - ").and_then(|l| l.split_once(':')).map(|(k, _)| k))
            .collect();
        assert_eq!(absent, ["data.tokenizer.file", "model.rope_scaling", "train.dtype"], "{text}");
        std::fs::write(&file, &text).unwrap();
        let (back, back_inputs) = resolve_config(Some(&file), &[], default_config()).unwrap();
        assert_eq!((back, back_inputs), (cfg, inputs));
    }

    /// Every key of the run config, and every table, is explained in a printed config by its
    /// field's doc comment (collected by build.rs), above it, in lines of at most 98 characters;
    /// an enum's values are listed.
    #[test]
    fn a_printed_config_explains_every_key() {
        let mut keys = Vec::new();
        fn paths(v: &toml::Value, prefix: &str, out: &mut Vec<String>) {
            for (k, sub) in v.as_table().into_iter().flatten() {
                let path = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
                // An enum's own fields (RoPE scaling's) are explained with it.
                if sub.is_table() && !path.starts_with("model.rope_scaling") {
                    paths(sub, &path, out);
                }
                out.push(path);
            }
        }
        paths(&every_key_config(), "", &mut keys);
        assert!(keys.len() > 40, "{keys:?}");
        for k in &keys {
            assert!(config_doc(k).is_some_and(|d| d.len() > 8), "no doc for {k}");
        }
        assert_eq!(config_doc("train.lr"), Some("Peak learning rate (default 3e-4, the paper's)."));
        assert!(config_doc("data.source.sample_by").unwrap().ends_with("One of: document, paragraph, line."));
        assert!(config_doc("model.rope_scaling").unwrap().ends_with("One of: linear, llama3."));
        assert_eq!(config_doc("no.such.key"), None);
        // Each key and table of the printed file has its doc right above it.
        let mut cfg = default_config();
        cfg.model.rope_scaling = Some(patchlm_model::RopeScaling::Linear { factor: 2.0 });
        let text = config_toml(PRINTED_HEADER, &cfg, &[]).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        for (i, want) in [
            ("[train.adamw]", "AdamW settings."),
            ("lr = 0.002", "Peak learning rate"),
            ("[model.rope_scaling]", "One of: linear, llama3."),
        ] {
            let at = lines.iter().position(|l| *l == i).unwrap_or_else(|| panic!("no {i} in\n{text}"));
            let comment: Vec<&str> = lines[..at].iter().rev().take_while(|l| l.starts_with('#')).copied().collect();
            let comment =
                comment.into_iter().rev().map(|l| l.trim_start_matches('#').trim()).collect::<Vec<_>>().join(" ");
            assert!(comment.contains(want), "{i}: {comment}");
        }
        assert!(lines.iter().all(|l| l.chars().count() <= 98 || !l.starts_with("# ")), "{text}");
        assert_eq!(lines.iter().filter(|l| l.starts_with('[')).count(), 9, "{text}");
        // Every key and table, `tokens_per_step` and `[data.tokenizer]` alike, has one (but the
        // keys of the RoPE scaling's table, explained with it).
        let (mut explained, mut table) = (0, "");
        for (i, l) in lines.iter().enumerate() {
            if l.starts_with('[') {
                table = l;
            } else if l.starts_with('#') || !l.contains(" = ") || table == "[model.rope_scaling]" {
                continue;
            }
            assert!(i > 0 && lines[i - 1].starts_with("# "), "{l} has no doc above it in\n{text}");
            explained += 1;
        }
        assert!(explained > 40, "{text}");
    }

    /// A ratio of two phases that both trained here; none where either did not (it finished
    /// before a resume) or where the run has one phase.
    #[test]
    fn the_throughput_ratio_needs_both_phases_timed() {
        let phase = |k: usize, tokens_per_sec: f64| patchlm_train::PhaseSummary {
            name: if k > 1 { "patch" } else { "token" }.into(),
            k,
            steps: usize::from(tokens_per_sec > 0.0),
            tokens: 0,
            secs: 0.0,
            tokens_per_sec,
        };
        assert_eq!(throughput_ratio(&[phase(4, 300.0), phase(1, 100.0)]), Some((3.0, 4)));
        for (a, b) in [(0.0, 100.0), (300.0, 0.0), (0.0, 0.0)] {
            assert_eq!(throughput_ratio(&[phase(4, a), phase(1, b)]), None, "{a} {b}");
        }
        assert_eq!(throughput_ratio(&[phase(1, 100.0)]), None);
    }

    /// Comment lines break between words at the width; a word longer than it stays whole.
    #[test]
    fn comments_wrap_at_words() {
        assert_eq!(wrap_comment("aa bb cc", "#", "#", 7), "# aa bb\n# cc\n");
        assert_eq!(wrap_comment("k: aaaaaaaaaa b", "#  -", "#   ", 8), "#  - k:\n#    aaaaaaaaaa\n#    b\n");
        assert_eq!(wrap_comment("", "#", "#", 7), "");
    }
}
