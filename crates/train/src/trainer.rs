//! The phase-aware training loop.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var};
use indicatif::{ProgressBar, ProgressStyle};
use patchlm_model::{init_model, named_tensors, parse_dtype, save_pretrained, Llama};
use patchlm_patch::{patch_forward, patch_loss, BlockFile, BlockReader, PatchManifest};

use crate::checkpoint::{list_checkpoints, load_checkpoint, save_checkpoint, TrainState};
use crate::config::RunConfig;
use crate::error::{io, Result, TrainError};
use crate::optim::{lr_at, AdamW};

/// One phase of a run, planned before training starts.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PhasePlan {
    /// `patch` or `token`.
    pub name: String,
    /// Patch size of the phase (1 for the token phase).
    pub k: usize,
    /// Its block file.
    pub file: BlockFile,
    /// Training tokens one block stands for (K·T, or T for token blocks of T + 1).
    pub block_tokens: usize,
    /// Blocks per optimizer step.
    pub blocks_per_step: usize,
    /// Optimizer steps.
    pub steps: usize,
}

impl PhasePlan {
    /// Tokens consumed per step.
    pub fn tokens_per_step(&self) -> usize {
        self.blocks_per_step * self.block_tokens
    }
}

/// Metrics of one optimizer step (one `metrics.jsonl` line with `"kind": "step"`).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct StepMetrics {
    /// Phase name.
    pub phase: String,
    /// Patch size.
    pub k: usize,
    /// Step within the phase (1-based).
    pub step: usize,
    /// Step over all phases (1-based).
    pub global_step: usize,
    /// Training tokens consumed so far.
    pub tokens_seen: u64,
    /// Mean training loss of the step (patch loss in the patch phase: not comparable to token loss).
    pub loss: f64,
    /// Learning rate used.
    pub lr: f64,
    /// Gradient norm before clipping.
    pub grad_norm: f64,
    /// Training tokens per second.
    pub tokens_per_sec: f64,
    /// Wall time of the step.
    pub step_secs: f64,
    /// Model FLOP utilization against `train.peak_flops`.
    pub mfu: f64,
}

/// One validation measurement (a `metrics.jsonl` line with `"kind": "eval"`): token-level loss on
/// the held-out blocks, measured the same way in every phase.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct EvalMetrics {
    /// Phase at the time.
    pub phase: String,
    /// Step over all phases.
    pub global_step: usize,
    /// Training tokens consumed so far.
    pub tokens_seen: u64,
    /// Training FLOPs spent so far.
    pub flops: f64,
    /// Training wall time so far, seconds.
    pub train_secs: f64,
    /// Mean token-level cross-entropy (nats).
    pub val_loss: f64,
    /// exp(val_loss).
    pub val_ppl: f64,
}

/// What one phase did.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct PhaseSummary {
    /// Phase name.
    pub name: String,
    /// Patch size.
    pub k: usize,
    /// Steps run in this process (0 when the phase finished before a resume).
    pub steps: usize,
    /// Tokens consumed in this process.
    pub tokens: u64,
    /// Wall time in this process.
    pub secs: f64,
    /// Median training tokens per second over its steps.
    pub tokens_per_sec: f64,
}

/// What a run did.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct RunSummary {
    /// Per phase.
    pub phases: Vec<PhaseSummary>,
    /// Training tokens consumed over the run.
    pub tokens: u64,
    /// Training FLOPs of the run (positions × FLOPs per position).
    pub flops: f64,
    /// Cost relative to token-level training on the same tokens: λ/K + (1 − λ) as planned.
    pub relative_cost: f64,
    /// Final token-level validation loss.
    pub val_loss: f64,
    /// Final validation perplexity.
    pub val_ppl: f64,
    /// Training wall time, seconds (across resumes).
    pub train_secs: f64,
    /// The final model directory (HF format); in JSON as text, a byte that is not UTF-8 as U+FFFD.
    #[serde(serialize_with = "path_as_text")]
    pub model_dir: PathBuf,
}

/// A path as text for JSON, which holds only UTF-8 (serde refuses a path that is not).
fn path_as_text<S: serde::Serializer>(p: &Path, s: S) -> std::result::Result<S::Ok, S::Error> {
    s.serialize_str(&p.to_string_lossy())
}

type StepHook<'a> = Box<dyn FnMut(&StepMetrics) + 'a>;
type EvalHook<'a> = Box<dyn FnMut(&EvalMetrics) + 'a>;
type StopHook<'a> = Box<dyn FnMut() -> bool + 'a>;

/// Runs the phases of a [`RunConfig`] over pre-grouped patch datasets.
pub struct Trainer<'a> {
    cfg: RunConfig,
    data_dir: PathBuf,
    run_dir: PathBuf,
    device: Device,
    manifest: PatchManifest,
    plans: Vec<PhasePlan>,
    tokenizer: Option<(String, Option<u32>, Option<u32>)>,
    on_step: Option<StepHook<'a>>,
    on_eval: Option<EvalHook<'a>>,
    stop: Option<StopHook<'a>>,
}

/// Plans the phases of `cfg` over the datasets in `manifest`; fails on any inconsistency.
pub fn plan_phases(cfg: &RunConfig, manifest: &PatchManifest) -> Result<Vec<PhasePlan>> {
    fn bad<T>(m: String) -> Result<T> {
        Err(TrainError::Config(m))
    }
    cfg.validate()?;
    let t = manifest.data.context;
    if manifest.patch.k != cfg.patch.k || (manifest.patch.lambda - cfg.patch.lambda).abs() > 1e-12 {
        return bad(format!(
            "the patch datasets were cut for k={} lambda={}, the run asks for k={} lambda={}; rebuild them",
            manifest.patch.k, manifest.patch.lambda, cfg.patch.k, cfg.patch.lambda
        ));
    }
    if manifest.data.context != cfg.blocks.context {
        return bad(format!("the datasets have context {}, the run asks for {}", t, cfg.blocks.context));
    }
    if cfg.model.max_position_embeddings < t {
        return bad(format!(
            "context length {t} exceeds the model's max_position_embeddings {}",
            cfg.model.max_position_embeddings
        ));
    }
    if manifest.vocab_size > cfg.model.vocab_size {
        return bad(format!(
            "the tokenizer has {} ids but the model's vocabulary is {}",
            manifest.vocab_size, cfg.model.vocab_size
        ));
    }
    let tc = &cfg.train;
    let mut phases = Vec::new();
    let mut add = |name: &str, k: usize, file: &BlockFile, block_tokens: usize| -> Result<()> {
        // A whole number of blocks per step: RunConfig::validate checked it for this context.
        let bps = tc.tokens_per_step / block_tokens;
        let mut steps = (file.blocks as f64 * file.epochs).round() as usize / bps;
        if tc.max_steps_per_phase > 0 {
            steps = steps.min(tc.max_steps_per_phase);
        }
        if steps == 0 {
            return bad(format!(
                "the {name} phase's {} blocks of {block_tokens} tokens are too few for one step of {} tokens; use more data or a smaller tokens_per_step",
                file.blocks, tc.tokens_per_step
            ));
        }
        phases.push(PhasePlan { name: name.into(), k, file: file.clone(), block_tokens, blocks_per_step: bps, steps });
        Ok(())
    };
    if let Some(p) = &manifest.patch_phase {
        add("patch", cfg.patch.k, p, cfg.patch.patch_block_tokens(t))?;
    }
    add("token", 1, &manifest.token_phase, t)?;
    Ok(phases)
}

fn bar(len: u64, show: bool, name: &str, k: usize) -> ProgressBar {
    if !show {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new(len);
    if let Ok(s) =
        ProgressStyle::with_template("{prefix:>12} [{elapsed_precise}] {wide_bar} {pos}/{len} steps, eta {eta} {msg}")
    {
        pb.set_style(s);
    }
    pb.set_prefix(format!("{name} (K={k})"));
    pb
}

/// Status lines besides the progress bar: one at each validation (above the bar on a terminal),
/// and where stderr is no terminal (a batch job's log, where the bar is not drawn) also a step
/// line each `PATCHLM_LOG_SECS` (a minute; [`patchlm_data::progress`]) in between.
struct Status {
    show: bool,
    tty: bool,
    log: patchlm_data::progress::LogClock,
}

impl Status {
    fn new(show: bool) -> Self {
        use std::io::IsTerminal;
        Self { show, tty: std::io::stderr().is_terminal(), log: patchlm_data::progress::LogClock::for_stderr(show) }
    }

    /// Prints `text()`, formatted only when lines are shown.
    fn line(&mut self, pb: Option<&ProgressBar>, text: impl FnOnce() -> String) {
        if !self.show {
            return;
        }
        let text = text();
        match pb {
            Some(pb) if self.tty => pb.println(text),
            _ => eprintln!("{text}"),
        }
        self.log.restart();
    }

    /// Whether a step line is due in a log (the interval then starts again).
    fn step_due(&self) -> bool {
        self.log.strike()
    }
}

/// Where a status line stands: `patch step     10/65 (0:00:06)`.
fn step_at(phase: &str, step: usize, steps: usize, secs: f64) -> String {
    format!("{phase:>5} step {step:>6}/{steps} ({})", clock(secs))
}

/// `h:mm:ss` (hours not wrapped: `27:00:00`).
fn clock(secs: f64) -> String {
    let s = secs.max(0.0).round() as u64;
    format!("{}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
}

impl<'a> Trainer<'a> {
    /// A trainer for `cfg` over the patch datasets in `data_dir`, writing into `run_dir`.
    /// Everything is validated here, before any training.
    pub fn new(cfg: RunConfig, data_dir: &Path, run_dir: &Path, device: Device) -> Result<Self> {
        let manifest = PatchManifest::load(data_dir)?;
        let plans = plan_phases(&cfg, &manifest)?;
        Ok(Self {
            cfg,
            data_dir: data_dir.to_path_buf(),
            run_dir: run_dir.to_path_buf(),
            device,
            manifest,
            plans,
            tokenizer: None,
            on_step: None,
            on_eval: None,
            stop: None,
        })
    }

    /// The planned phases.
    pub fn plans(&self) -> &[PhasePlan] {
        &self.plans
    }

    /// Saves this tokenizer (its canonical `tokenizer.json`, as the data crate writes it beside
    /// the shards, and its bos/eos ids) with the final model. Refused unless it is the tokenizer
    /// the datasets were made with.
    pub fn with_tokenizer(mut self, json: String, bos: Option<u32>, eos: Option<u32>) -> Result<Self> {
        let given = patchlm_data::shard::sha256_bytes(json.as_bytes());
        if given != self.manifest.tokenizer_fingerprint {
            return Err(TrainError::Config(format!(
                "the tokenizer ({given}) is not the one the datasets were made with ({}); use the tokenizer.json saved beside the shards",
                self.manifest.tokenizer_fingerprint
            )));
        }
        self.tokenizer = Some((json, bos, eos));
        Ok(self)
    }

    /// Calls `f` after every optimizer step (e.g. for custom logging).
    pub fn on_step(mut self, f: impl FnMut(&StepMetrics) + 'a) -> Self {
        self.on_step = Some(Box::new(f));
        self
    }

    /// Calls `f` after every validation, once its line is in `metrics.jsonl` (e.g. to redraw a
    /// loss plot from the file).
    pub fn on_eval(mut self, f: impl FnMut(&EvalMetrics) + 'a) -> Self {
        self.on_eval = Some(Box::new(f));
        self
    }

    /// Asks `f` after every optimizer step whether to stop (e.g. a flag a signal handler sets).
    /// When it says yes, that step's checkpoint is written and [`Trainer::run`] returns
    /// [`TrainError::Stopped`] naming it; `run(true)` continues from there as if never stopped.
    pub fn stop_when(mut self, f: impl FnMut() -> bool + 'a) -> Self {
        self.stop = Some(Box::new(f));
        self
    }

    fn evaluate(&self, model: &Llama, val: &BlockReader) -> Result<f64> {
        // No graph: validation needs no backward pass.
        let model = &model.detach();
        let n = val.num_blocks() as usize;
        let mb = self.cfg.train.micro_batch.max(1);
        let mut buf = Vec::new();
        let mut total = 0.0;
        let mut i = 0;
        while i < n {
            let c = mb.min(n - i);
            val.read_blocks(i as u64, c, &mut buf);
            let ids = Tensor::from_vec(buf.clone(), (c, val.block_len()), &self.device)?;
            total += patch_loss(model, &ids, 1)?.to_scalar::<f32>()? as f64 * c as f64;
            i += c;
        }
        Ok(total / n as f64)
    }

    /// Runs (or with `resume`, continues from the newest checkpoint) all phases, then saves the
    /// final model in HF format to `run_dir/model`. The run claims `run_dir` ([`crate::RunLock`])
    /// while it runs: a run of another process there is refused, not overwritten.
    pub fn run(&mut self, resume: bool) -> Result<RunSummary> {
        let run_dir = self.run_dir.clone();
        std::fs::create_dir_all(&run_dir).map_err(io(&run_dir))?;
        let _claim = crate::RunLock::acquire(&run_dir)?;
        crate::checkpoint::remove_partial_checkpoints(&run_dir)?;
        let fingerprint = self.cfg.fingerprint();
        // What each checkpoint holds besides weights, optimizer and state: the run's config and
        // the files that make it an HF model directory too (`eval --model <checkpoint>`).
        let (tok, bos, eos) = match &self.tokenizer {
            Some((j, b, e)) => (Some(j.as_str()), *b, *e),
            None => (None, None, None),
        };
        let mut ck_files = patchlm_model::weights::model_files(&self.cfg.model, tok, bos, eos)?;
        let run_json = serde_json::to_vec_pretty(&self.cfg).map_err(|e| TrainError::Config(e.to_string()))?;
        ck_files.push((crate::checkpoint::RUN_CONFIG_FILE, run_json));
        let (model, varmap) = init_model(&self.cfg.model, &self.device, self.cfg.seed)?;
        let dtype = parse_dtype(&self.cfg.train.dtype).map_err(|e| TrainError::Config(e.to_string()))?;
        let model = model.with_compute_dtype(dtype);
        let params: Vec<(String, Var)> = {
            let data = varmap.data().lock().map_err(|_| TrainError::Config("poisoned var map".into()))?;
            let mut v: Vec<(String, Var)> = data.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
            v.sort_by(|a, b| a.0.cmp(&b.0));
            v
        };
        let mut state = TrainState {
            config_fingerprint: fingerprint.clone(),
            data_fingerprint: self.manifest.training_data_fingerprint(),
            phase: 0,
            phase_step: 0,
            global_step: 0,
            tokens_seen: 0,
            optimizer_step: 0,
            elapsed_secs: 0.0,
            seed: self.cfg.seed,
        };
        let mut resumed_opt: Option<HashMap<String, Tensor>> = None;
        let metrics_path = run_dir.join("metrics.jsonl");
        if resume {
            if let Some(ck) = newest_loadable_checkpoint(&run_dir, &self.device)? {
                if ck.config_fingerprint() != fingerprint {
                    return Err(TrainError::Checkpoint {
                        path: ck.path,
                        msg: "was written by a run with a different config; resume with the same config, or start a fresh --out".into(),
                    });
                }
                let data = &state.data_fingerprint;
                if !ck.state.data_fingerprint.is_empty() && ck.state.data_fingerprint != *data {
                    return Err(TrainError::Checkpoint {
                        path: ck.path,
                        msg:
                            "was trained on other data (another tokenizer, or other blocks: the inputs changed since); \
                              resume with the inputs it was trained on, or start a fresh --out"
                                .into(),
                    });
                }
                for (name, var) in &params {
                    let t = ck.model.get(name).ok_or_else(|| TrainError::Checkpoint {
                        path: ck.path.clone(),
                        msg: format!("lacks parameter {name}"),
                    })?;
                    if t.dims() != var.dims() {
                        return Err(TrainError::Checkpoint {
                            path: ck.path.clone(),
                            msg: format!("{name} has the wrong shape"),
                        });
                    }
                    var.set(t)?;
                }
                state = TrainState { data_fingerprint: state.data_fingerprint, ..ck.state };
                resumed_opt = Some(ck.optimizer);
                // Keep only metrics up to the checkpoint: later lines are recomputed.
                if let Ok(text) = std::fs::read_to_string(&metrics_path) {
                    let kept: String = text
                        .lines()
                        .filter(|l| {
                            serde_json::from_str::<serde_json::Value>(l)
                                .ok()
                                .and_then(|v| v["global_step"].as_u64())
                                .is_some_and(|s| s as usize <= state.global_step)
                        })
                        .map(|l| format!("{l}\n"))
                        .collect();
                    patchlm_model::weights::write_atomic(&metrics_path, kept.as_bytes())?;
                }
            }
        } else if list_checkpoints(&run_dir)?.last().is_some() {
            return Err(TrainError::Config(format!(
                "{} already holds checkpoints; pass --resume to continue it, or choose another --out",
                run_dir.display()
            )));
        }
        if state.global_step == 0 && metrics_path.exists() {
            // A fresh start: lines of an earlier attempt that never reached a checkpoint go.
            std::fs::remove_file(&metrics_path).map_err(io(&metrics_path))?;
        }
        let mut metrics =
            std::fs::OpenOptions::new().create(true).append(true).open(&metrics_path).map_err(io(&metrics_path))?;
        // Each line in one write, so that a reader (`cargo xtask plot` of a run that trains)
        // sees at most the one line being written unfinished.
        let mut log = |v: serde_json::Value| -> Result<()> {
            metrics.write_all(format!("{v}\n").as_bytes()).map_err(io(&metrics_path))?;
            metrics.flush().map_err(io(&metrics_path))
        };
        let val = BlockReader::open(&self.data_dir, &self.manifest.val)?;
        let t = self.cfg.blocks.context;
        let fpp = self.cfg.model.flops_per_position(t);
        let flops_of = |tokens_by_phase: f64, k: usize| tokens_by_phase / k as f64 * fpp;
        // FLOPs spent so far, from the tokens each phase consumed.
        let spent = |st: &TrainState, plans: &[PhasePlan]| -> f64 {
            let mut f = 0.0;
            for (i, p) in plans.iter().enumerate() {
                let steps = if i < st.phase {
                    p.steps
                } else if i == st.phase {
                    st.phase_step
                } else {
                    0
                };
                f += flops_of((steps * p.tokens_per_step()) as f64, p.k);
            }
            f
        };
        let started = Instant::now();
        let base_elapsed = state.elapsed_secs;
        let mut status = Status::new(self.cfg.train.progress);
        if state.global_step == 0 {
            let vl = self.evaluate(&model, &val)?;
            let first = &self.plans[0];
            status.line(None, || format!("{}: validation loss {vl:.4}", step_at(&first.name, 0, first.steps, 0.0)));
            let ev = EvalMetrics {
                phase: self.plans[0].name.clone(),
                global_step: 0,
                tokens_seen: 0,
                flops: 0.0,
                train_secs: 0.0,
                val_loss: vl,
                val_ppl: vl.exp(),
            };
            log(metrics_line("eval", &ev)?)?;
            if let Some(f) = self.on_eval.as_mut() {
                f(&ev);
            }
        }
        let mut summaries = Vec::new();
        let tc = self.cfg.train.clone();
        let mut last_val = f64::NAN;
        let n_phases = self.plans.len();
        for pi in 0..n_phases {
            let plan = self.plans[pi].clone();
            if pi < state.phase {
                summaries.push(PhaseSummary {
                    name: plan.name.clone(),
                    k: plan.k,
                    steps: 0,
                    tokens: 0,
                    secs: 0.0,
                    tokens_per_sec: 0.0,
                });
                continue;
            }
            let reader = BlockReader::open(&self.data_dir, &plan.file)?;
            let mut opt = AdamW::new(params.clone(), tc.adamw.clone())?;
            if let Some(o) = resumed_opt.take() {
                if state.optimizer_step > 0 {
                    opt.load_state(&o, state.optimizer_step)?;
                }
            }
            let pb = bar(plan.steps as u64, tc.progress, &plan.name, plan.k);
            pb.set_position(state.phase_step as u64);
            let phase_start = Instant::now();
            let mut tps = Vec::new();
            let bps = plan.blocks_per_step;
            let block_len = plan.file.block_len;
            let mut buf = Vec::new();
            let mut steps_here = 0;
            while state.phase_step < plan.steps {
                let t0 = Instant::now();
                let lr = lr_at(state.phase_step, plan.steps, tc.warmup_steps, tc.lr, tc.lr * tc.min_lr_ratio);
                let first = (state.phase_step * bps) as u64;
                let mut acc: HashMap<String, Tensor> = HashMap::new();
                // Each micro-batch's loss and weight, read back once all are enqueued (reading a
                // value waits for the device: one wait per step, not one per micro-batch).
                let mut losses = Vec::new();
                let mut done = 0;
                while done < bps {
                    let c = tc.micro_batch.min(bps - done);
                    reader.read_blocks(first + done as u64, c, &mut buf);
                    let ids = Tensor::from_vec(buf.clone(), (c, block_len), &self.device)?;
                    let w = c as f64 / bps as f64;
                    // The gradient of w · loss: the hand-written backward pass where the device
                    // has it, else candle's autograd. The loss comes back without its graph, so a
                    // micro-batch's activations are freed before the next one runs.
                    let (loss, grads) = patch_forward(&model, &ids, plan.k)?.backward(&model, &params, w)?;
                    losses.push((loss, w));
                    for (name, g) in grads {
                        // Micro-batch gradients add up in f32 (they may come in bf16).
                        let sum = match acc.remove(&name) {
                            Some(a) => (a.to_dtype(DType::F32)? + g.to_dtype(DType::F32)?)?,
                            None => g,
                        };
                        acc.insert(name, sum);
                    }
                    done += c;
                }
                // The update goes in before anything is read back: with the norm on the device
                // (ops::set_device_clip) the step waits for the device only here, once.
                let sumsq = opt.step_clipped(&acc, lr, tc.grad_clip)?;
                let non_finite = |what| {
                    pb.abandon();
                    TrainError::NonFinite {
                        what,
                        phase: plan.name.clone(),
                        step: state.phase_step + 1,
                        global_step: state.global_step + 1,
                    }
                };
                let mut loss_sum = 0.0;
                for (loss, w) in losses {
                    let lv = loss.to_scalar::<f32>()? as f64;
                    if !lv.is_finite() {
                        return Err(non_finite("loss"));
                    }
                    loss_sum += lv * w;
                }
                let gn = sumsq.to_scalar::<f64>()?.sqrt();
                if !gn.is_finite() {
                    return Err(non_finite("gradient norm"));
                }
                let dt = t0.elapsed().as_secs_f64();
                state.phase_step += 1;
                state.global_step += 1;
                state.optimizer_step = opt.steps();
                let tokens = plan.tokens_per_step() as u64;
                state.tokens_seen += tokens;
                state.elapsed_secs = base_elapsed + started.elapsed().as_secs_f64();
                steps_here += 1;
                tps.push(tokens as f64 / dt);
                let positions = (bps * t) as f64;
                let sm = StepMetrics {
                    phase: plan.name.clone(),
                    k: plan.k,
                    step: state.phase_step,
                    global_step: state.global_step,
                    tokens_seen: state.tokens_seen,
                    loss: loss_sum,
                    lr,
                    grad_norm: gn,
                    tokens_per_sec: tokens as f64 / dt,
                    step_secs: dt,
                    mfu: positions * fpp / dt / tc.peak_flops,
                };
                log(metrics_line("step", &sm)?)?;
                pb.set_position(state.phase_step as u64);
                pb.set_message(format!("loss {:.3} {:.0} tok/s", sm.loss, sm.tokens_per_sec));
                let at = || step_at(&plan.name, state.phase_step, plan.steps, state.elapsed_secs);
                if status.step_due() {
                    let left = (plan.steps - state.phase_step) as f64 * dt;
                    status.line(Some(&pb), || {
                        format!(
                            "{}: loss {:.4}, {:.0} tokens/s, phase eta {}",
                            at(),
                            sm.loss,
                            sm.tokens_per_sec,
                            clock(left)
                        )
                    });
                }
                if let Some(f) = self.on_step.as_mut() {
                    f(&sm);
                }
                let phase_end = state.phase_step == plan.steps;
                if (tc.eval_every > 0 && state.global_step.is_multiple_of(tc.eval_every)) || phase_end {
                    let vl = self.evaluate(&model, &val)?;
                    last_val = vl;
                    let ev = EvalMetrics {
                        phase: plan.name.clone(),
                        global_step: state.global_step,
                        tokens_seen: state.tokens_seen,
                        flops: spent(&state, &self.plans),
                        train_secs: state.elapsed_secs,
                        val_loss: vl,
                        val_ppl: vl.exp(),
                    };
                    log(metrics_line("eval", &ev)?)?;
                    status.line(Some(&pb), || {
                        format!("{}: validation loss {vl:.4} (training loss {:.4})", at(), sm.loss)
                    });
                    if let Some(f) = self.on_eval.as_mut() {
                        f(&ev);
                    }
                }
                let periodic = tc.checkpoint_every > 0 && state.global_step.is_multiple_of(tc.checkpoint_every);
                let stop = self.stop.as_mut().is_some_and(|f| f());
                if periodic || phase_end || stop {
                    let mut st = state.clone();
                    let (opt_tensors, opt_step) = opt.state();
                    let opt_tensors = if phase_end {
                        // The next phase starts a fresh optimizer and schedule.
                        st.phase += 1;
                        st.phase_step = 0;
                        st.optimizer_step = 0;
                        Vec::new()
                    } else {
                        st.optimizer_step = opt_step;
                        opt_tensors
                    };
                    let checkpoint = save_checkpoint(
                        &run_dir,
                        &named_tensors(&varmap)?,
                        &opt_tensors,
                        &st,
                        &ck_files,
                        tc.keep_checkpoints,
                    )
                    .map_err(|e| {
                        pb.abandon();
                        write_failed(&run_dir, format!("the checkpoint of step {}", state.global_step), &state, e)
                    })?;
                    if stop {
                        pb.abandon();
                        return Err(TrainError::Stopped { global_step: state.global_step, checkpoint });
                    }
                }
            }
            pb.finish_and_clear();
            state.phase = pi + 1;
            state.phase_step = 0;
            state.optimizer_step = 0;
            let mut sorted = tps.clone();
            sorted.sort_by(|a, b| a.total_cmp(b));
            summaries.push(PhaseSummary {
                name: plan.name.clone(),
                k: plan.k,
                steps: steps_here,
                tokens: (steps_here * plan.tokens_per_step()) as u64,
                secs: phase_start.elapsed().as_secs_f64(),
                tokens_per_sec: sorted.get(sorted.len() / 2).copied().unwrap_or(0.0),
            });
        }
        if !last_val.is_finite() {
            last_val = self.evaluate(&model, &val)?;
        }
        let model_dir = run_dir.join("model");
        save_pretrained(&model_dir, &self.cfg.model, &varmap, tok, bos, eos)
            .map_err(|e| write_failed(&run_dir, "the final model".into(), &state, e.into()))?;
        let tokens: u64 = self.plans.iter().map(|p| (p.steps * p.tokens_per_step()) as u64).sum();
        let flops = self.plans.iter().map(|p| flops_of((p.steps * p.tokens_per_step()) as f64, p.k)).sum::<f64>();
        let token_equiv = tokens as f64 * fpp;
        Ok(RunSummary {
            phases: summaries,
            tokens,
            flops,
            relative_cost: flops / token_equiv,
            val_loss: last_val,
            val_ppl: last_val.exp(),
            train_secs: base_elapsed + started.elapsed().as_secs_f64(),
            model_dir,
        })
    }
}

/// The error of a checkpoint or model write that failed after `state`'s step.
fn write_failed(run_dir: &Path, what: String, state: &TrainState, e: TrainError) -> TrainError {
    let resume_from = list_checkpoints(run_dir).ok().and_then(|c| c.last().cloned());
    TrainError::WriteFailed { what, global_step: state.global_step, resume_from, error: Box::new(e) }
}

/// The validation where a run switched from the patch phase to the token phase: the patch
/// phase's last one, if a token-phase validation follows (a run still in its patch phase, or a
/// token-level run, has none).
pub fn phase_switch(evals: &[EvalMetrics]) -> Option<&EvalMetrics> {
    evals.iter().rfind(|e| e.phase == "patch").filter(|_| evals.iter().any(|e| e.phase != "patch"))
}

/// The lines of a run's `metrics.jsonl`: its training steps and its validations, in file order.
/// Lines that are not step or eval records are an error naming the file and line, except an
/// unfinished last one (no newline yet, not JSON: the line a running trainer is writing, or
/// was writing when it was killed), which is left out.
pub fn read_metrics(path: &Path) -> Result<(Vec<StepMetrics>, Vec<EvalMetrics>)> {
    let text = std::fs::read_to_string(path).map_err(io(path))?;
    let (mut steps, mut evals) = (Vec::new(), Vec::new());
    for (i, line) in text.split_inclusive('\n').enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let bad =
            |e: serde_json::Error| TrainError::Metrics { path: path.to_path_buf(), line: i + 1, msg: e.to_string() };
        let v: serde_json::Value = match serde_json::from_str(line) {
            Ok(v) => v,
            // Only the last piece can lack its newline.
            Err(_) if !line.ends_with('\n') => break,
            Err(e) => return Err(bad(e)),
        };
        match v["kind"].as_str() {
            Some("step") => steps.push(serde_json::from_value(v).map_err(bad)?),
            Some("eval") => evals.push(serde_json::from_value(v).map_err(bad)?),
            _ => {
                return Err(TrainError::Metrics {
                    path: path.to_path_buf(),
                    line: i + 1,
                    msg: "neither a \"step\" nor an \"eval\" record".into(),
                })
            }
        }
    }
    Ok((steps, evals))
}

/// One metrics.jsonl line: `rec`'s fields plus `"kind": kind`.
fn metrics_line<T: serde::Serialize>(kind: &str, rec: &T) -> Result<serde_json::Value> {
    let mut v = serde_json::to_value(rec).map_err(|e| TrainError::Config(e.to_string()))?;
    v["kind"] = kind.into();
    Ok(v)
}

/// The newest checkpoint of a run that loads (its checksums match, its files parse), or none if
/// the run has none. A newer one that does not load is kept on disk and passed over with a
/// warning; if none loads, the newest one's error.
fn newest_loadable_checkpoint(run_dir: &Path, device: &Device) -> Result<Option<crate::checkpoint::Checkpoint>> {
    let all = list_checkpoints(run_dir)?;
    let mut first_err = None;
    for path in all.iter().rev() {
        match load_checkpoint(path, device) {
            Ok(ck) => return Ok(Some(ck)),
            Err(e) => {
                eprintln!("warning: {e}; trying the checkpoint before it");
                first_err.get_or_insert(e);
            }
        }
    }
    first_err.map_or(Ok(None), Err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_times_read_as_hours_minutes_seconds() {
        assert_eq!(clock(0.0), "0:00:00");
        assert_eq!(clock(59.4), "0:00:59");
        assert_eq!(clock(59.6), "0:01:00");
        assert_eq!(clock(3725.0), "1:02:05");
        assert_eq!(clock(97_200.0), "27:00:00");
        assert_eq!(clock(-3.0), "0:00:00");
        assert_eq!(step_at("patch", 10, 65, 6.0), "patch step     10/65 (0:00:06)");
        assert_eq!(step_at("token", 1234567, 2000000, 3600.0), "token step 1234567/2000000 (1:00:00)");
    }
}
