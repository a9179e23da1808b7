//! `cargo xtask bench`: throughput numbers printed as one JSON line each, for the peer scripts in
//! `bench/` to put side by side with Python `tokenizers` and PyTorch.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::{Device, Tensor};
use patchlm_data::{Dataset, Split, TokenizerSource};
use patchlm_model::{init_model, parse_device, ModelConfig};
use rayon::prelude::*;

/// `cargo xtask bench <what>`.
#[derive(clap::Subcommand)]
pub enum BenchCmd {
    /// Tokenization throughput of the data stage and reader throughput.
    Data {
        /// The tokenizer.json to encode with.
        #[arg(long)]
        tokenizer: PathBuf,
        /// A JSONL corpus (field "text").
        #[arg(long)]
        input: PathBuf,
        /// Scratch directory for the shards.
        #[arg(long, default_value = "target/bench-data")]
        out: PathBuf,
    },
    /// Training-step throughput (forward + backward + AdamW) of a preset.
    Model {
        /// Model preset.
        #[arg(long, default_value = "small")]
        preset: String,
        /// Sequences per step.
        #[arg(long, default_value_t = 16)]
        batch: usize,
        /// Positions per sequence.
        #[arg(long, default_value_t = 128)]
        ctx: usize,
        /// Patch sizes to run (1 = token phase).
        #[arg(long, value_delimiter = ',', default_value = "1,4")]
        k: Vec<usize>,
        /// Timed steps (after 2 warmup steps).
        #[arg(long, default_value_t = 5)]
        steps: usize,
        /// cpu, cuda or cuda:N.
        #[arg(long, default_value = "cpu")]
        device: String,
    },
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Runs a benchmark.
pub fn run(cmd: BenchCmd) -> Result<()> {
    match cmd {
        BenchCmd::Data { tokenizer, input, out } => bench_data(&tokenizer, &input, &out),
        BenchCmd::Model { preset, batch, ctx, k, steps, device } => {
            bench_model(&preset, batch, ctx, &k, steps, &device)
        }
    }
}

fn bench_data(tokenizer: &std::path::Path, input: &std::path::Path, out: &std::path::Path) -> Result<()> {
    let tok = patchlm_data::tokenizer::load_tokenizer(tokenizer)?;
    let cfg = patchlm_data::DataConfig::default();
    let specials = patchlm_data::tokenizer::special_tokens(&tok, &cfg.tokenizer)?;
    let texts: Vec<String> = patchlm_data::Documents::open(&[input], &cfg.source)?
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
    // The whole stage: read, tokenize, split, write shards + manifest.
    let t0 = Instant::now();
    let s = patchlm_data::build_shards(&[input], out, &cfg, TokenizerSource::File(tokenizer), false)?;
    let stage = s.bytes as f64 / t0.elapsed().as_secs_f64() / 1e6;
    // Reader: random 1024-token windows and a sequential scan, against a raw read of the bytes.
    let ds = Dataset::open(out)?;
    let train = ds.split(Split::Train);
    let n = train.len();
    let w = 1024u64;
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
        if let patchlm_data::TokenChunk::U16(s) = c {
            seq_sum += s.iter().map(|&x| x as u64).sum::<u64>();
        }
    }
    let seq = n as f64 / t0.elapsed().as_secs_f64();
    let shard = out.join(&ds.manifest().shards[0].file);
    let t0 = Instant::now();
    let raw = std::fs::read(&shard).with_context(|| shard.display().to_string())?;
    let raw_sum: u64 = raw.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]]) as u64).sum();
    let raw_tps = (raw.len() / 2) as f64 / t0.elapsed().as_secs_f64();
    std::hint::black_box((sum, seq_sum, raw_sum));
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

fn bench_model(preset: &str, batch: usize, ctx: usize, ks: &[usize], steps: usize, device: &str) -> Result<()> {
    let device: Device = parse_device(device)?;
    let mut cfg = ModelConfig::preset(preset)?;
    cfg.max_position_embeddings = cfg.max_position_embeddings.max(ctx);
    for &k in ks {
        let (model, varmap) = init_model(&cfg, &device, 0)?;
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
        let mut times = Vec::new();
        for s in 0..steps + 2 {
            let t0 = Instant::now();
            let loss = patchlm_patch::patch_loss(&model, &ids, k)?;
            let grads = loss.backward()?;
            let mut g = std::collections::HashMap::new();
            for (n, v) in &vars {
                if let Some(x) = grads.get(v.as_tensor()) {
                    g.insert(n.clone(), x.clone());
                }
            }
            patchlm_train::clip_grad_norm(&mut g, 1.0)?;
            opt.step(&g, 3e-4)?;
            device.synchronize()?;
            if s >= 2 {
                times.push(t0.elapsed().as_secs_f64());
            }
        }
        let step = median(times);
        let tokens = (batch * ctx * k) as f64;
        println!(
            "{}",
            serde_json::json!({
                "bench": "model", "impl": "patchlm-candle", "preset": preset, "params": params.iter().map(|(_, t)| t.elem_count()).sum::<usize>(),
                "k": k, "batch": batch, "ctx": ctx, "step_ms": step * 1e3, "tokens_per_s": tokens / step,
                "threads": rayon::current_num_threads(),
            })
        );
    }
    Ok(())
}
