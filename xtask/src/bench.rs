//! `cargo xtask bench`: throughput numbers printed as one JSON line each, for the peer scripts in
//! `bench/` to put side by side with Python `tokenizers` and PyTorch.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::{Device, Tensor};
use patchlm_data::{Dataset, Split, TokenizerSource};
use patchlm_model::{init_model, parse_device, parse_dtype, ModelConfig};
use rayon::prelude::*;

/// `cargo xtask bench [<what>]`: a subcommand, or without one the training-step suite.
#[derive(clap::Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct BenchArgs {
    #[command(subcommand)]
    cmd: Option<BenchCmd>,
    #[command(flatten)]
    suite: Suite,
}

/// The training-step suite: token phase and patch phase (K = 4) of each shape, with the trainer's
/// settings (fused ops, hand-written backward pass, its default attention), then a table.
#[derive(clap::Args)]
pub struct Suite {
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cuda")]
    device: String,
    /// Compute dtype (default: bf16 on CUDA, f32 on the CPU).
    #[arg(long)]
    dtype: Option<String>,
    /// Shapes as preset:BATCHxCTX, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "gpt2-small:8x1024,370m:4x2048")]
    shapes: Vec<String>,
    /// Patch sizes to run (1 = token phase).
    #[arg(long, value_delimiter = ',', default_value = "1,4")]
    k: Vec<usize>,
    /// Timed steps per row (after 2 warmup steps).
    #[arg(long, default_value_t = 5)]
    steps: usize,
    /// Peak FLOP/s for MFU (default: H100 dense bf16, 989 TFLOP/s).
    #[arg(long, default_value_t = 989e12)]
    peak_flops: f64,
}

/// `cargo xtask bench <what>`.
#[derive(clap::Subcommand)]
pub enum BenchCmd {
    /// Tokenization throughput of the data stage and reader throughput.
    Data {
        /// The tokenizer.json to encode with.
        #[arg(long)]
        tokenizer: PathBuf,
        /// The text to encode: files or folders, as `data --input` reads them (JSONL's field
        /// "text"). The shards' train split must hold more than one 1,024-token window.
        #[arg(long, required = true, num_args = 1..)]
        input: Vec<PathBuf>,
        /// Where to write the shards: each run builds into a new folder of its own inside it
        /// (`bench-<pid>`, so an earlier build is never reused and nothing else is touched) and
        /// removes that folder when done.
        #[arg(long, default_value = "target/bench-data")]
        out: PathBuf,
    },
    /// Forward and forward + backward time of each part of one layer of a preset (RMSNorm,
    /// attention with each kernel, SwiGLU MLP), of the embedding and of the LM head with the loss,
    /// with the fused ops and with candle's composed ops: where a training step goes.
    Ops {
        #[command(flatten)]
        shape: Shape,
        /// Timed repetitions (after one warmup).
        #[arg(long, default_value_t = 5)]
        reps: usize,
    },
    /// Flash attention's kernels alone at a preset's attention shape (batch, heads, ctx, head
    /// size): the forward as training runs it (the log-sum-exp kept, the output as rows) and the
    /// backward (dq, dk, dv), each launched `reps` times between two synchronisations; ms per
    /// launch and TFLOP/s with FlashAttention's count of causal FLOPs (forward 4·B·H·T²·d/2,
    /// backward 2.5× that).
    /// `bench/compare_flash.py` runs PyTorch's SDPA flash kernel on the same shapes beside it.
    Flash {
        #[command(flatten)]
        shape: Shape,
        /// Timed launches of each pass (after one warmup).
        #[arg(long, default_value_t = 20)]
        reps: usize,
        /// Kernel variants to time one after the other in this process, each as
        /// WIDE:WIDE_BWD:DQ_ATOMIC:OCC4:WGMMA (the switches of the table in docs/gpu.md, 0 or 1; WGMMA 2:
        /// the wgmma kernels with q in registers), comma-separated; each row then names its
        /// variant as "config". Without it, one row under the environment's switches.
        #[arg(long, value_delimiter = ',')]
        variants: Vec<String>,
    },
    /// Training-step throughput (forward + backward + AdamW) of a preset.
    Model {
        #[command(flatten)]
        shape: Shape,
        /// Patch sizes to run (1 = token phase).
        #[arg(long, value_delimiter = ',', default_value = "1,4")]
        k: Vec<usize>,
        /// Timed steps (after 2 warmup steps).
        #[arg(long, default_value_t = 5)]
        steps: usize,
        /// Fused ops (cross-entropy, RMSNorm, RoPE, causal softmax, embedding, SwiGLU, AdamW): on,
        /// off (composed candle ops) or both (a row each).
        #[arg(long, default_value = "on")]
        fused: String,
        /// Attention with the fused ops: softmax (materialised scores, fused causal softmax),
        /// flash (tiled, no T×T matrix), both (a row each) or auto (the trainer's default: flash
        /// where tensor-core flash kernels are on and apply).
        #[arg(long, default_value = "softmax")]
        attention: String,
        /// Backward pass with the fused ops: tape (hand-written, the trainer's default), autograd
        /// (candle's) or both (a row each).
        #[arg(long, default_value = "tape")]
        backward: String,
        /// Peak FLOP/s for MFU (default: H100 dense bf16).
        #[arg(long, default_value_t = 989e12)]
        peak_flops: f64,
        /// Also time one more step by named spans (CUDA events, no synchronisation inside the
        /// step; `patchlm_model::profile`): a `"profile"` field in each row (ms per span name,
        /// `pass.kind.detail`) and a table of the spans by kind.
        #[arg(long)]
        profile: bool,
    },
}

/// The model and batch shape a model benchmark runs.
#[derive(clap::Args)]
pub struct Shape {
    /// Model preset.
    #[arg(long, default_value = "small")]
    preset: String,
    /// Sequences per step.
    #[arg(long, default_value_t = 16)]
    batch: usize,
    /// Positions per sequence.
    #[arg(long, default_value_t = 128)]
    ctx: usize,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Compute dtype: f32 or bf16 (mixed precision, f32 master weights).
    #[arg(long, default_value = "f32")]
    dtype: String,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Runs a benchmark.
pub fn run(args: BenchArgs) -> Result<()> {
    let Some(cmd) = args.cmd else { return run_suite(&args.suite) };
    match cmd {
        BenchCmd::Data { tokenizer, input, out } => bench_data(&tokenizer, &input, &out),
        BenchCmd::Ops { shape: Shape { preset, batch, ctx, device, dtype }, reps } => {
            if reps == 0 || batch == 0 || ctx == 0 {
                anyhow::bail!("bench ops: --reps, --batch and --ctx must be at least 1");
            }
            bench_ops(&preset, batch, ctx, reps, &device, &dtype)
        }
        BenchCmd::Flash { shape: Shape { preset, batch, ctx, device, dtype }, reps, variants } => {
            if reps == 0 || batch == 0 || ctx == 0 {
                anyhow::bail!("bench flash: --reps, --batch and --ctx must be at least 1");
            }
            let variants = variants.iter().map(|v| FlashVariant::parse(v)).collect::<Result<Vec<_>>>()?;
            bench_flash(&preset, batch, ctx, reps, &device, &dtype, &variants)
        }
        BenchCmd::Model {
            shape: Shape { preset, batch, ctx, device, dtype },
            k,
            steps,
            fused,
            attention,
            backward,
            peak_flops,
            profile,
        } => {
            if steps == 0 || batch == 0 || ctx == 0 {
                anyhow::bail!("bench model: --steps, --batch and --ctx must be at least 1");
            }
            bench_model(&ModelBench {
                preset: &preset,
                batch,
                ctx,
                ks: &k,
                steps,
                device: &device,
                dtype: &dtype,
                fused: &fused,
                attention: &attention,
                backward: &backward,
                peak_flops,
                profile,
            })
            .map(|_| ())
        }
    }
}

/// `preset:BATCHxCTX` → (preset, batch, ctx).
fn parse_shape(s: &str) -> Result<(String, usize, usize)> {
    let bad = || anyhow::anyhow!("--shapes {s}: expected preset:BATCHxCTX, e.g. gpt2-small:8x1024");
    let (preset, dims) = s.split_once(':').ok_or_else(bad)?;
    let (b, t) = dims.split_once('x').ok_or_else(bad)?;
    let (b, t): (usize, usize) = (b.parse().map_err(|_| bad())?, t.parse().map_err(|_| bad())?);
    if preset.is_empty() || b == 0 || t == 0 {
        return Err(bad());
    }
    Ok((preset.to_string(), b, t))
}

fn run_suite(s: &Suite) -> Result<()> {
    if s.steps == 0 || s.k.is_empty() || s.k.contains(&0) {
        anyhow::bail!("bench: --steps and every --k must be at least 1");
    }
    let shapes = s.shapes.iter().map(|x| parse_shape(x)).collect::<Result<Vec<_>>>()?;
    let dtype = s.dtype.clone().unwrap_or_else(|| if s.device == "cpu" { "f32" } else { "bf16" }.to_string());
    let mut rows = Vec::new();
    for (preset, batch, ctx) in &shapes {
        rows.extend(bench_model(&ModelBench {
            preset,
            batch: *batch,
            ctx: *ctx,
            ks: &s.k,
            steps: s.steps,
            device: &s.device,
            dtype: &dtype,
            fused: "on",
            attention: "auto",
            backward: "tape",
            peak_flops: s.peak_flops,
            profile: false,
        })?);
    }
    println!(
        "\ntraining step, {} {dtype}; MFU against a peak of {:.0} TFLOP/s (--peak-flops)",
        s.device,
        s.peak_flops / 1e12
    );
    println!(
        "{:>12} {:>9} {:>6} {:>12} {:>7} {:>9} {:>9} {:>9}",
        "preset", "batch", "phase", "tokens/s", "MFU", "step ms", "peak GiB", "attention"
    );
    for r in &rows {
        let k = r["k"].as_u64().unwrap_or(0);
        println!(
            "{:>12} {:>9} {:>6} {:>12.0} {:>6.1}% {:>9.1} {:>9} {:>9}",
            r["preset"].as_str().unwrap_or("?"),
            format!("{}x{}", r["batch"], r["ctx"]),
            if k == 1 { "token".to_string() } else { format!("K={k}") },
            r["tokens_per_s"].as_f64().unwrap_or(f64::NAN),
            100.0 * r["mfu"].as_f64().unwrap_or(f64::NAN),
            r["step_ms"].as_f64().unwrap_or(f64::NAN),
            r["peak_mem_gib"].as_f64().map_or("-".to_string(), |g| format!("{g:.2}")),
            r["attention"].as_str().unwrap_or("?"),
        );
    }
    Ok(())
}

fn bench_data(tokenizer: &std::path::Path, inputs: &[PathBuf], out: &std::path::Path) -> Result<()> {
    let tok = patchlm_data::tokenizer::load_tokenizer(tokenizer)?;
    let cfg = patchlm_data::DataConfig::default();
    let specials = patchlm_data::tokenizer::special_tokens(&tok, &cfg.tokenizer)?;
    let texts: Vec<String> = patchlm_data::Documents::open(inputs, &cfg.source)?
        .map(|d| d.map(|d| d.text))
        .collect::<std::result::Result<_, _>>()?;
    let bytes: usize = texts.iter().map(|t| t.len()).sum();
    // Encoding alone, as the data stage does it (documents in parallel on all cores).
    let mut enc = Vec::new();
    for _ in 0..3 {
        let t0 = Instant::now();
        let ids: Vec<Vec<u32>> = texts
            .par_iter()
            .map(|t| patchlm_data::tokenizer::encode_document(&tok, t, &specials))
            .collect::<std::result::Result<_, _>>()?;
        enc.push(bytes as f64 / t0.elapsed().as_secs_f64() / 1e6);
        std::hint::black_box(ids);
    }
    // The whole stage (read, tokenize, split, write shards + manifest) into a folder of this run's.
    std::fs::create_dir_all(out).with_context(|| format!("{}: cannot create the folder", out.display()))?;
    let scratch = out.join(format!("bench-{}", std::process::id()));
    std::fs::create_dir(&scratch).with_context(|| format!("{}: cannot create the folder", scratch.display()))?;
    let timed = bench_stage_and_reader(tokenizer, inputs, &scratch, &cfg);
    let removed = std::fs::remove_dir_all(&scratch);
    let (stage, random, seq, raw_tps) = timed?;
    removed.with_context(|| format!("{}: cannot remove the benchmark's shards", scratch.display()))?;
    println!(
        "{}",
        serde_json::json!({
            "bench": "data", "text_mb": bytes as f64 / 1e6, "threads": rayon::current_num_threads(),
            "encode_mb_per_s": median(enc), "stage_mb_per_s": stage,
            "random_1024_windows_tokens_per_s": random, "sequential_scan_tokens_per_s": seq,
            "raw_read_tokens_per_s": raw_tps,
        })
    );
    Ok(())
}

/// The data stage built into `out` (MB of text a second), then its train split read as random
/// 1024-token windows, as a sequential scan and, the peer, as a raw read of the first train
/// shard's file (tokens a second).
fn bench_stage_and_reader(
    tokenizer: &std::path::Path,
    inputs: &[PathBuf],
    out: &std::path::Path,
    cfg: &patchlm_data::DataConfig,
) -> Result<(f64, f64, f64, f64)> {
    let t0 = Instant::now();
    let s = patchlm_data::build_shards(inputs, out, cfg, TokenizerSource::File(tokenizer), false)?;
    let stage = s.bytes as f64 / t0.elapsed().as_secs_f64() / 1e6;
    // Reader: random 1024-token windows and a sequential scan, against a raw read of the bytes.
    let ds = Dataset::open(out)?;
    let train = ds.split(Split::Train);
    let n = train.len();
    let w = 1024u64;
    if n <= w {
        anyhow::bail!(
            "bench data: the train split holds {n} tokens, too few for random {w}-token windows: give --input more text"
        );
    }
    let mut rng = patchlm_model::SplitMix64(1);
    let mut buf = Vec::new();
    let reads = 20_000;
    let t0 = Instant::now();
    let mut sum = 0u64;
    for _ in 0..reads {
        let a = rng.next_u64() % (n - w);
        train.read_into(a, a + w, &mut buf)?;
        sum += buf[0] as u64;
    }
    let random = (reads as u64 * w) as f64 / t0.elapsed().as_secs_f64();
    let t0 = Instant::now();
    let mut seq_sum = 0u64;
    for c in train.chunks(0, n)? {
        seq_sum += match c {
            patchlm_data::TokenChunk::U16(s) => s.iter().map(|&x| x as u64).sum::<u64>(),
            patchlm_data::TokenChunk::U32(s) => s.iter().map(|&x| x as u64).sum::<u64>(),
        };
    }
    let seq = n as f64 / t0.elapsed().as_secs_f64();
    // The peer: the first train shard's file read whole and summed as tokens of the shards'
    // width (its Arrow framing included), per token the shard holds.
    let first = ds.manifest().shards.iter().find(|s| s.split == Split::Train).context("bench data: no train shard")?;
    let shard = out.join(&first.file);
    let t0 = Instant::now();
    let raw = std::fs::read(&shard).with_context(|| shard.display().to_string())?;
    let raw_sum: u64 = match ds.manifest().dtype {
        patchlm_data::TokenDtype::Uint16 => raw.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]]) as u64).sum(),
        patchlm_data::TokenDtype::Uint32 => {
            raw.chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]) as u64).sum()
        }
    };
    let raw_tps = first.tokens as f64 / t0.elapsed().as_secs_f64();
    std::hint::black_box((sum, seq_sum, raw_sum));
    Ok((stage, random, seq, raw_tps))
}

/// What one `bench model` invocation measures.
pub struct ModelBench<'a> {
    preset: &'a str,
    batch: usize,
    ctx: usize,
    ks: &'a [usize],
    steps: usize,
    device: &'a str,
    dtype: &'a str,
    fused: &'a str,
    attention: &'a str,
    backward: &'a str,
    peak_flops: f64,
    profile: bool,
}

/// `--flag off|on|both` → the settings to run, one row each (`both`: off first).
fn one_or_both(flag: &str, value: &str, off: &str, on: &str) -> Result<Vec<bool>> {
    match value {
        v if v == off => Ok(vec![false]),
        v if v == on => Ok(vec![true]),
        "both" => Ok(vec![false, true]),
        other => anyhow::bail!("--{flag} {other}: expected {off}, {on} or both"),
    }
}

/// Runs the rows `b` asks for (each printed as a JSON line as it is measured) and returns them.
fn bench_model(b: &ModelBench) -> Result<Vec<serde_json::Value>> {
    let settings = one_or_both("fused", b.fused, "off", "on")?;
    // `auto` leaves attention to the default (flash_attention_for), as training does.
    let flash: Vec<Option<bool>> = match b.attention {
        "auto" => vec![None],
        a => match one_or_both("attention", a, "softmax", "flash") {
            Ok(v) => v.into_iter().map(Some).collect(),
            Err(_) => anyhow::bail!("--attention {a}: expected softmax, flash, both or auto"),
        },
    };
    let tape = one_or_both("backward", b.backward, "autograd", "tape")?;
    let mut rows = Vec::new();
    for fused in settings {
        for &fl in &flash {
            for &tp in &tape {
                // Flash attention and the tape are built from the fused ops: with them off, no
                // flash row and one backward row (autograd).
                if !fused && (fl == Some(true) || (tp && tape.len() > 1)) {
                    continue;
                }
                patchlm_model::ops::set_fused_ops(fused);
                if let Some(fl) = fl {
                    patchlm_model::ops::set_flash_attention(fl);
                }
                patchlm_model::set_tape_backward(tp);
                rows.extend(bench_model_once(b, fused)?);
            }
        }
    }
    patchlm_model::ops::set_fused_ops(true);
    if flash.iter().any(Option::is_some) {
        patchlm_model::ops::set_flash_attention(false);
    }
    patchlm_model::set_tape_backward(true);
    Ok(rows)
}

fn bench_model_once(b: &ModelBench, fused: bool) -> Result<Vec<serde_json::Value>> {
    let ModelBench { preset, batch, ctx, ks, steps, .. } = *b;
    let device: Device = parse_device(b.device)?;
    let dtype = parse_dtype(b.dtype)?;
    let mut rows = Vec::new();
    let mut cfg = ModelConfig::preset(preset)?;
    cfg.max_position_embeddings = cfg.max_position_embeddings.max(ctx);
    for &k in ks {
        let (model, varmap) = init_model(&cfg, &device, 0)?;
        let model = model.with_compute_dtype(dtype);
        let params = patchlm_model::named_tensors(&varmap)?;
        let vars: Vec<(String, candle_core::Var)> = {
            let d = varmap.data().lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
            d.iter().map(|(n, v)| (n.clone(), v.clone())).collect()
        };
        let mut opt = patchlm_train::AdamW::new(vars.clone(), Default::default())?;
        // A patch step reads K·ctx + K tokens per sequence: ctx input patches, one target patch.
        let len = k * (ctx + 1);
        let mut rng = patchlm_model::SplitMix64(3);
        let ids: Vec<u32> = (0..batch * len).map(|_| (rng.next_u64() % cfg.vocab_size as u64) as u32).collect();
        let ids = Tensor::from_vec(ids, (batch, len), &device)?;
        let mut step = |parts: bool| train_step(&model, &ids, k, &device, &vars, &mut opt, parts);
        // The headline: whole steps, synchronised once at the end of each (as a training loop
        // runs them), after two warm-up steps.
        let mut times = Vec::new();
        // The memory high-water mark over every step of this row.
        patchlm_model::device_memory_peak(&device, true);
        for s in 0..steps + 2 {
            let t0 = Instant::now();
            step(false)?;
            device.synchronize()?;
            if s >= 2 {
                times.push(t0.elapsed().as_secs_f64());
            }
        }
        // Where a step goes: further steps synchronised after each part (host time to enqueue
        // the forward pass, forward, backward and its enqueue time, clipping + optimizer;
        // enqueue ≈ the synchronised time means the host, not the GPU, limits).
        let mut parts: [Vec<f64>; 6] = Default::default();
        for _ in 0..steps.min(3) {
            let p = step(true)?;
            for (v, x) in parts.iter_mut().zip(p) {
                v.push(x * 1e3);
            }
        }
        let profile = if b.profile { Some(profile_step(&mut step, &device)?) } else { None };
        let step = median(times);
        let [enq_ms, fwd_ms, bwd_ms, opt_ms, bwd_enq_ms, parts_ms] = parts.map(median);
        let tokens = (batch * ctx * k) as f64;
        // The model runs ctx positions per sequence in both phases (patches in the patch phase).
        let mfu = (batch * ctx) as f64 * cfg.flops_per_position(ctx) / step / b.peak_flops;
        let hd = cfg.hidden_size / cfg.num_attention_heads;
        let flash = patchlm_model::ops::flash_attention_for(&device, dtype, hd);
        let fr = if flash { patchlm_model::ops::flash_runs(&device, dtype, hd) } else { Default::default() };
        let row = serde_json::json!({
                "bench": "model", "impl": "patchlm-candle", "preset": preset, "params": params.iter().map(|(_, t)| t.elem_count()).sum::<usize>(),
                "k": k, "batch": batch, "ctx": ctx, "step_ms": step * 1e3, "tokens_per_s": tokens / step,
                "threads": rayon::current_num_threads(), "dtype": b.dtype, "mfu": mfu, "peak_flops": b.peak_flops,
                "peak_mem_gib": patchlm_model::device_memory_peak(&device, false).map_or(f64::NAN, |b| b as f64 / (1u64 << 30) as f64), "fused": fused && patchlm_model::fused_ops_supported(&device),
                "attention": if flash { "flash" } else { "softmax" },
                "backward": if patchlm_model::tape_supported(&device) { "tape" } else { "autograd" },
                "parts_step_ms": parts_ms, "fwd_enqueue_ms": enq_ms, "fwd_ms": fwd_ms, "bwd_enqueue_ms": bwd_enq_ms, "bwd_ms": bwd_ms, "opt_ms": opt_ms,
                // The switchable kernel families this run used (docs/gpu.md): what ran, not only
                // what was asked for (see ops::FlashRuns).
                "optin": {
                    "layout": device.is_cuda() && patchlm_model::ops::layout_ops_supported(&device),
                    "rows": device.is_cuda() && patchlm_model::ops::rows_cuda_enabled(),
                    "bf16_grads": patchlm_model::compute_dtype_grads(),
                    "device_clip": device.is_cuda() && patchlm_model::ops::device_clip_enabled(),
                    "flash_mma": device.is_cuda() && flash && patchlm_model::ops::flash_mma_enabled(dtype, hd),
                    "flash_dq_atomic": fr.dq_atomic, "flash_wide": fr.wide, "flash_wide_bwd": fr.wide_bwd,
                    "flash_occ4": fr.occ4, "flash_wgmma": fr.wgmma, "flash_wgmma_qreg": fr.wgmma_qreg,
                    "embedding_sorted": device.is_cuda() && patchlm_model::ops::embedding_sorted_enabled(),
                },
        });
        let mut row = row;
        if let Some((spans, step_ms)) = profile {
            print_profile(&format!("{preset} k={k}"), &spans, step_ms);
            row["profile_step_ms"] = step_ms.into();
            row["profile"] = spans.iter().map(|s| (s.name.to_string(), serde_json::json!(s.ms))).collect();
        }
        println!("{row}");
        rows.push(row);
    }
    Ok(rows)
}

/// One more step with the spans of `patchlm_model::profile` recorded: the spans summed by name,
/// and the step's time (synchronised at its end only, as the headline steps).
fn profile_step(
    step: &mut impl FnMut(bool) -> Result<[f64; 6]>,
    device: &Device,
) -> Result<(Vec<patchlm_model::profile::SpanTotal>, f64)> {
    device.synchronize()?;
    patchlm_model::profile::take_profile()?;
    patchlm_model::profile::set_profiling(true);
    let t0 = Instant::now();
    let done = step(false).and_then(|_| Ok(device.synchronize()?));
    let ms = t0.elapsed().as_secs_f64() * 1e3;
    patchlm_model::profile::set_profiling(false);
    done?;
    Ok((patchlm_model::profile::take_profile()?, ms))
}

/// The profiled step's spans, by kind (the second part of `pass.kind.detail`), then each span;
/// "outside spans" is the step's time that no span covers.
fn print_profile(what: &str, spans: &[patchlm_model::profile::SpanTotal], step_ms: f64) {
    let covered: f64 = spans.iter().map(|s| s.ms).sum();
    let mut kinds: Vec<(String, f64)> = Vec::new();
    for s in spans {
        let kind = s.name.split('.').nth(1).unwrap_or(s.name).to_string();
        match kinds.iter_mut().find(|(k, _)| *k == kind) {
            Some((_, ms)) => *ms += s.ms,
            None => kinds.push((kind, s.ms)),
        }
    }
    kinds.sort_by(|a, b| b.1.total_cmp(&a.1));
    println!("profile of one step, {what}: {step_ms:.2} ms ({covered:.2} ms in spans)");
    for (kind, ms) in &kinds {
        println!("  {kind:<24} {ms:>9.2} ms {:>6.1}%", 100.0 * ms / step_ms);
    }
    println!("  {:<24} {:>9.2} ms {:>6.1}%", "outside spans", step_ms - covered, 100.0 * (step_ms - covered) / step_ms);
    for s in spans {
        println!("    {:<28} {:>9.3} ms {:>5} spans", s.name, s.ms, s.calls);
    }
}

/// One training step of a model benchmark: forward, backward, clipping and the optimizer. With
/// `parts`, synchronises after each part and returns their times in seconds (forward enqueue,
/// forward, backward, clipping + optimizer, backward enqueue, the whole step).
fn train_step(
    model: &patchlm_model::Llama,
    ids: &Tensor,
    k: usize,
    device: &Device,
    vars: &[(String, candle_core::Var)],
    opt: &mut patchlm_train::AdamW,
    parts: bool,
) -> Result<[f64; 6]> {
    let sync = |on: bool| if on { device.synchronize() } else { Ok(()) };
    let t0 = Instant::now();
    let pass = patchlm_patch::patch_forward(model, ids, k)?;
    let t_enq = t0.elapsed().as_secs_f64();
    sync(parts)?;
    let t_fwd = t0.elapsed().as_secs_f64();
    let (_, g) = pass.backward(model, vars, 1.0)?;
    let t_bwd_enq = t0.elapsed().as_secs_f64() - t_fwd;
    sync(parts)?;
    let t_bwd = t0.elapsed().as_secs_f64();
    // As the trainer: the update enqueued with the clipping to norm 1, the norm read after.
    let sumsq = patchlm_model::profile::span("opt.optimizer", device, || {
        opt.step_clipped(&g, 3e-4, 1.0).map_err(|e| candle_core::Error::Msg(e.to_string()))
    })?;
    sync(parts)?;
    sumsq.to_scalar::<f64>()?;
    let t = t0.elapsed().as_secs_f64();
    Ok([t_enq, t_fwd, t_bwd - t_fwd, t - t_bwd, t_bwd_enq, t])
}

/// Times `f` on fresh leaf variables: forward alone and forward + backward (a random upstream
/// gradient), synchronised, median of `reps`; prints one JSON line.
fn time_op(
    name: &str,
    device: &Device,
    reps: usize,
    inputs: &[Tensor],
    f: &dyn Fn(&[Tensor]) -> candle_core::Result<Tensor>,
) -> Result<()> {
    use candle_core::{DType, Var};
    let vars: Vec<Var> = inputs.iter().map(Var::from_tensor).collect::<candle_core::Result<_>>()?;
    let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let probe = f(&ts)?;
    let up = Tensor::randn(0f32, 1.0, probe.shape(), device)?;
    let (mut fwd, mut both) = (Vec::new(), Vec::new());
    for r in 0..=reps {
        device.synchronize()?;
        let t0 = Instant::now();
        let y = f(&ts)?;
        device.synchronize()?;
        let t_f = t0.elapsed().as_secs_f64();
        let loss = (y.to_dtype(DType::F32)? * &up)?.sum_all()?;
        let _grads = loss.backward()?;
        device.synchronize()?;
        if r > 0 {
            fwd.push(t_f * 1e3);
            both.push(t0.elapsed().as_secs_f64() * 1e3);
        }
    }
    println!(
        "{}",
        serde_json::json!({
            "bench": "ops", "op": name, "fused": patchlm_model::fused_ops_supported(device),
            "fwd_ms": median(fwd), "fwd_bwd_ms": median(both),
        })
    );
    Ok(())
}

/// Causal attention FLOPs of one forward pass as FlashAttention counts them: two products of
/// B·H·T²·d multiply-adds each, half of them masked.
fn flash_fwd_flops(batch: usize, heads: usize, ctx: usize, head_dim: usize) -> f64 {
    4.0 * (batch * heads) as f64 * (ctx as f64).powi(2) * head_dim as f64 / 2.0
}

/// One setting of flash attention's kernel switches for `bench flash --variants`.
#[derive(Clone, Copy, Debug, PartialEq)]
struct FlashVariant {
    wide: bool,
    wide_bwd: bool,
    dq_atomic: bool,
    occ4: bool,
    /// 0: off, 1: the wgmma kernels, 2: with q in registers.
    wgmma: u8,
}

impl FlashVariant {
    /// From WIDE:WIDE_BWD:DQ_ATOMIC:OCC4:WGMMA, e.g. `1:0:0:0:2`.
    fn parse(spec: &str) -> Result<Self> {
        let bad = || {
            anyhow::anyhow!(
                "bench flash --variants: {spec:?} is not WIDE:WIDE_BWD:DQ_ATOMIC:OCC4:WGMMA (0 or 1 each; WGMMA 0, 1, or 2 \
                 for the wgmma kernels with q in registers), e.g. 1:0:0:0:2"
            )
        };
        let f: Vec<u8> = spec.trim().split(':').map(|x| x.parse::<u8>().map_err(|_| bad())).collect::<Result<_>>()?;
        match f[..] {
            [w, b, d, o, g] if w <= 1 && b <= 1 && d <= 1 && o <= 1 && g <= 2 => {
                Ok(Self { wide: w == 1, wide_bwd: b == 1, dq_atomic: d == 1, occ4: o == 1, wgmma: g })
            }
            _ => Err(bad()),
        }
    }

    /// Sets the process-wide switches.
    fn apply(&self) {
        use patchlm_model::ops;
        ops::set_flash_wide(self.wide);
        ops::set_flash_wide_bwd(self.wide_bwd);
        ops::set_flash_dq_atomic(self.dq_atomic);
        ops::set_flash_occ4(self.occ4);
        ops::set_flash_wgmma(self.wgmma > 0);
        ops::set_flash_wgmma_qreg(self.wgmma == 2);
    }

    /// As parsed.
    fn spec(&self) -> String {
        let b = |x: bool| u8::from(x);
        format!("{}:{}:{}:{}:{}", b(self.wide), b(self.wide_bwd), b(self.dq_atomic), b(self.occ4), self.wgmma)
    }
}

fn bench_flash(
    preset: &str,
    batch: usize,
    ctx: usize,
    reps: usize,
    device: &str,
    dtype: &str,
    variants: &[FlashVariant],
) -> Result<()> {
    let device = parse_device(device)?;
    let dtype = parse_dtype(dtype)?;
    let cfg = ModelConfig::preset(preset)?;
    let heads = cfg.num_attention_heads;
    let hd = cfg.hidden_size / heads;
    let randn = || Tensor::randn(0f32, 1.0, (batch, heads, ctx, hd), &device)?.to_dtype(dtype);
    let (q, k, v) = (randn()?, randn()?, randn()?);
    // The output and its gradient as rows (B, T, H·hd), as the trainer runs them.
    let dout = Tensor::randn(0f32, 1.0, (batch, ctx, heads * hd), &device)?.to_dtype(dtype)?;
    let shape = FlashShape { preset, batch, heads, ctx, hd, reps, dtype };
    if variants.is_empty() {
        return flash_row(&device, &shape, [&q, &k, &v, &dout], None);
    }
    for variant in variants {
        variant.apply();
        flash_row(&device, &shape, [&q, &k, &v, &dout], Some(variant))?;
    }
    Ok(())
}

/// The attention shape `bench flash` times.
struct FlashShape<'a> {
    preset: &'a str,
    batch: usize,
    heads: usize,
    ctx: usize,
    hd: usize,
    reps: usize,
    dtype: candle_core::DType,
}

/// Times flash attention's forward and backward under the current switches and prints one JSON
/// row (with `variant`, its "config").
fn flash_row(device: &Device, sh: &FlashShape, x: [&Tensor; 4], variant: Option<&FlashVariant>) -> Result<()> {
    use patchlm_model::ops;
    let FlashShape { preset, batch, heads, ctx, hd, reps, dtype } = *sh;
    let [q, k, v, dout] = x;
    let scale = 1.0 / (hd as f64).sqrt();
    let fwd = || ops::flash_attention_lse_rows(q, k, v, scale);
    let (o, lse) = fwd()?;
    let bwd = || ops::grad::flash_attention_lse(q, k, v, &o, &lse, dout, scale);
    bwd()?;
    let time = |f: &dyn Fn() -> candle_core::Result<()>| -> Result<f64> {
        device.synchronize()?;
        let t0 = Instant::now();
        for _ in 0..reps {
            f()?;
        }
        device.synchronize()?;
        Ok(t0.elapsed().as_secs_f64() * 1e3 / reps as f64)
    };
    let fwd_ms = time(&|| fwd().map(|_| ()))?;
    let bwd_ms = time(&|| bwd().map(|_| ()))?;
    let flops = flash_fwd_flops(batch, heads, ctx, hd);
    let fr = ops::flash_runs(device, dtype, hd);
    let kernels = if device.is_cpu() {
        "cpu"
    } else if fr.wgmma {
        "wgmma"
    } else if ops::flash_mma_enabled(dtype, hd) {
        "mma"
    } else {
        "cuda-core"
    };
    let mut row = serde_json::json!({
        "bench": "flash", "preset": preset, "batch": batch, "heads": heads, "ctx": ctx, "head_dim": hd,
        "dtype": format!("{dtype:?}").to_lowercase(), "kernels": kernels, "reps": reps,
        // What ran (see the model rows' "optin").
        "dq_atomic": fr.dq_atomic, "wide": fr.wide, "wide_bwd": fr.wide_bwd, "occ4": fr.occ4,
        "wgmma": fr.wgmma, "wgmma_qreg": fr.wgmma_qreg,
        "fwd_ms": fwd_ms, "bwd_ms": bwd_ms,
        "fwd_tflops": flops / (fwd_ms * 1e-3) / 1e12, "bwd_tflops": 2.5 * flops / (bwd_ms * 1e-3) / 1e12,
    });
    if let Some(v) = variant {
        row["config"] = v.spec().into();
    }
    println!("{row}");
    Ok(())
}

fn bench_ops(preset: &str, batch: usize, ctx: usize, reps: usize, device: &str, dtype: &str) -> Result<()> {
    use candle_core::{DType, Module};
    use patchlm_model::llama::{Attention, Mlp, RmsNorm, Rope};
    let device = parse_device(device)?;
    let dtype = parse_dtype(dtype)?;
    let mut cfg = ModelConfig::preset(preset)?;
    cfg.max_position_embeddings = cfg.max_position_embeddings.max(ctx);
    let (d, v) = (cfg.hidden_size, cfg.vocab_size);
    let varmap = patchlm_model::candle_nn::VarMap::new();
    let vb = patchlm_model::candle_nn::VarBuilder::from_varmap(&varmap, DType::F32, &device);
    let norm = RmsNorm::new(vb.pp("norm"), d, cfg.rms_norm_eps)?;
    let attn = Attention::new(vb.pp("attn"), &cfg)?;
    let mlp = Mlp::new(vb.pp("mlp"), &cfg)?;
    let rope = Rope::new(&cfg, &device)?;
    let head = (Tensor::randn(0f32, 0.02, (v, d), &device)?, Tensor::randn(0f32, 0.02, (v, d), &device)?);
    let x = Tensor::randn(0f32, 1.0, (batch, ctx, d), &device)?.to_dtype(dtype)?;
    let mut rng = patchlm_model::SplitMix64(5);
    let ids: Vec<u32> = (0..batch * ctx).map(|_| (rng.next_u64() % v as u64) as u32).collect();
    let ids = Tensor::from_vec(ids, (batch, ctx), &device)?;
    let targets = ids.reshape((batch, ctx, 1))?;
    for fused in [true, false] {
        patchlm_model::ops::set_fused_ops(fused);
        time_op("rms_norm", &device, reps, std::slice::from_ref(&x), &|t| norm.forward(&t[0]))?;
        for flash in [false, true] {
            if flash && !fused {
                continue;
            }
            patchlm_model::ops::set_flash_attention(flash);
            let name = if flash { "attention (flash)" } else { "attention (softmax)" };
            time_op(name, &device, reps, std::slice::from_ref(&x), &|t| attn.forward(&t[0], &rope, 0, None))?;
        }
        patchlm_model::ops::set_flash_attention(false);
        time_op("mlp", &device, reps, std::slice::from_ref(&x), &|t| mlp.forward(&t[0]))?;
        time_op("embedding", &device, reps, std::slice::from_ref(&head.1), &|t| {
            if patchlm_model::fused_ops_supported(&device) {
                patchlm_model::embedding(&t[0], &ids)
            } else {
                patchlm_model::candle_nn::Embedding::new(t[0].clone(), d).forward(&ids)
            }
        })?;
        time_op("lm_head + loss", &device, reps, &[x.clone(), head.0.clone()], &|t| {
            let logits = t[0].broadcast_matmul(&t[1].to_dtype(dtype)?.t()?)?;
            patchlm_patch::next_patch_loss_from_logits(&logits, &targets)
                .map_err(|e| candle_core::Error::Msg(e.to_string()))
        })?;
    }
    patchlm_model::ops::set_fused_ops(true);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The middle value of an odd count; of an even count, the upper of the two middle ones.
    #[test]
    fn median_takes_the_middle_in_order() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![5.0, -1.0, 4.0, 0.5]), 4.0);
        assert_eq!(median(vec![7.5]), 7.5);
    }

    #[test]
    fn shapes_read_as_preset_batch_ctx() {
        assert_eq!(parse_shape("gpt2-small:8x1024").unwrap(), ("gpt2-small".to_string(), 8, 1024));
        assert_eq!(parse_shape("370m:4x2048").unwrap(), ("370m".to_string(), 4, 2048));
        for bad in
            ["gpt2-small", "gpt2-small:8", ":8x1024", "tiny:0x8", "tiny:8x0", "tiny:ax8", "tiny:8xb", "tiny:-1x8"]
        {
            let e = parse_shape(bad).unwrap_err().to_string();
            assert_eq!(e, format!("--shapes {bad}: expected preset:BATCHxCTX, e.g. gpt2-small:8x1024"));
        }
    }

    #[test]
    fn a_switch_reads_off_on_or_both() {
        assert_eq!(one_or_both("fused", "off", "off", "on").unwrap(), [false]);
        assert_eq!(one_or_both("fused", "on", "off", "on").unwrap(), [true]);
        assert_eq!(one_or_both("attention", "both", "softmax", "flash").unwrap(), [false, true]);
        let e = one_or_both("backward", "jit", "autograd", "tape").unwrap_err().to_string();
        assert_eq!(e, "--backward jit: expected autograd, tape or both");
    }

    /// FlashAttention's causal count, by hand: B=2, H=3, T=4, d=5 gives 4·6·16·5/2 = 960.
    #[test]
    fn flash_flops_are_flash_attentions_causal_count() {
        assert_eq!(flash_fwd_flops(2, 3, 4, 5), 960.0);
        assert_eq!(flash_fwd_flops(1, 1, 1, 1), 2.0);
    }

    /// Each switch of a variant from its own place in the spec, and back to the same spec.
    #[test]
    fn flash_variants_parse_each_switch_and_print_back() {
        let v = |wide, wide_bwd, dq_atomic, occ4, wgmma| FlashVariant { wide, wide_bwd, dq_atomic, occ4, wgmma };
        for (spec, want) in [
            ("0:0:0:0:0", v(false, false, false, false, 0)),
            ("1:0:0:0:0", v(true, false, false, false, 0)),
            ("0:1:0:0:0", v(false, true, false, false, 0)),
            ("0:0:1:0:0", v(false, false, true, false, 0)),
            ("0:0:0:1:0", v(false, false, false, true, 0)),
            ("0:0:0:0:1", v(false, false, false, false, 1)),
            (" 1:1:1:1:2 ", v(true, true, true, true, 2)),
        ] {
            let got = FlashVariant::parse(spec).unwrap();
            assert_eq!(got, want, "{spec}");
            assert_eq!(got.spec(), spec.trim());
        }
        // Applied, each switch asks for its own kernels (where they apply: bf16, head size 64,
        // the mma.sync kernels on; the four-block dq only without the wide kernels). Only CUDA
        // devices read these switches.
        use candle_core::DType::BF16;
        use patchlm_model::ops;
        ops::set_flash_mma(true);
        let asked = || {
            (
                ops::flash_wide_enabled(BF16, 64),
                ops::flash_wide_bwd_enabled(BF16, 64),
                ops::flash_dq_atomic_enabled(BF16, 64),
                ops::flash_occ4_enabled(BF16, 64),
                ops::flash_wgmma_enabled(BF16, 64),
                ops::flash_wgmma_qreg_enabled(BF16, 64),
            )
        };
        for (spec, want) in [
            ("1:0:0:0:0", (true, false, false, false, false, false)),
            ("0:1:0:0:0", (false, true, false, false, false, false)),
            ("0:0:1:0:0", (false, false, true, false, false, false)),
            ("0:0:0:1:0", (false, false, false, true, false, false)),
            ("0:0:0:0:1", (false, false, false, false, true, false)),
            ("0:0:0:0:2", (false, false, false, false, true, true)),
            ("0:0:0:0:0", (false, false, false, false, false, false)),
        ] {
            FlashVariant::parse(spec).unwrap().apply();
            assert_eq!(asked(), want, "{spec}");
        }
        for bad in
            ["2:0:0:0:0", "0:2:0:0:0", "0:0:2:0:0", "0:0:0:2:0", "0:0:0:0:3", "0:0:0:0", "0:0:0:0:0:0", "", "a:0:0:0:0"]
        {
            let e = FlashVariant::parse(bad).unwrap_err().to_string();
            assert!(e.starts_with(&format!("bench flash --variants: {bad:?} is not WIDE:WIDE_BWD")), "{bad}: {e}");
        }
    }
}
