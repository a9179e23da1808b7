//! Training tests: AdamW + clipping against PyTorch, the schedule, planning errors, exact resume
//! after a real kill -9, NaN handling, and the phase switch.

#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, Var};
use patchlm_train::*;

mod common;
use common::{pipeline, pipeline_of};

#[test]
fn adamw_and_clipping_match_pytorch() {
    // tests/fixtures/make_adamw_golden.py: torch.optim.AdamW + clip_grad_norm_, three steps.
    // Six ways to the same numbers: clipping the gradients (clip_grad_norm), passing the factor to
    // the optimizer (step_scaled) or the norm's computation too (step_clipped, as the trainer
    // does), each with the fused and the tensor update.
    let g: serde_json::Value = serde_json::from_str(include_str!("fixtures/adamw_golden.json")).unwrap();
    let dev = Device::Cpu;
    for (way, fused) in [(0, true), (0, false), (1, true), (1, false), (2, true), (2, false)] {
        let w = Var::from_tensor(&Tensor::new(&[[0.5f32, -1.0, 2.0], [0.1, 0.2, -0.3]], &dev).unwrap()).unwrap();
        let b = Var::from_tensor(&Tensor::new(&[1.0f32, -2.0, 0.5], &dev).unwrap()).unwrap();
        let cfg = AdamWConfig { beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1 };
        let mut opt = AdamW::new(vec![("w".into(), w.clone()), ("b".into(), b.clone())], cfg).unwrap();
        opt.set_fused(fused);
        for (i, step) in g["grads"].as_array().unwrap().iter().enumerate() {
            let gw: Vec<Vec<f32>> = serde_json::from_value(step[0].clone()).unwrap();
            let gb: Vec<f32> = serde_json::from_value(step[1].clone()).unwrap();
            let mut grads: HashMap<String, Tensor> = HashMap::new();
            grads.insert("w".into(), Tensor::new(gw, &dev).unwrap());
            grads.insert("b".into(), Tensor::new(gb, &dev).unwrap());
            let norm = match way {
                0 => {
                    let norm = clip_grad_norm(&mut grads, 1.0).unwrap();
                    opt.step(&grads, 1e-2).unwrap();
                    norm
                }
                1 => {
                    let norm = grad_norm(&grads).unwrap();
                    opt.step_scaled(&grads, 1e-2, clip_scale(norm, 1.0)).unwrap();
                    norm
                }
                _ => opt.step_clipped(&grads, 1e-2, 1.0).unwrap().to_scalar::<f64>().unwrap().sqrt(),
            };
            assert!((norm - g["norms"][i].as_f64().unwrap()).abs() < 1e-5, "step {i}: norm {norm}");
        }
        let want_w: Vec<Vec<f32>> = serde_json::from_value(g["w"].clone()).unwrap();
        let want_b: Vec<f32> = serde_json::from_value(g["b"].clone()).unwrap();
        let got_w = w.as_tensor().to_vec2::<f32>().unwrap();
        let got_b = b.as_tensor().to_vec1::<f32>().unwrap();
        for (r, wr) in got_w.iter().zip(&want_w) {
            for (a, e) in r.iter().zip(wr) {
                assert!((a - e).abs() < 1e-6, "way {way} fused {fused}: w {a} vs {e}");
            }
        }
        for (a, e) in got_b.iter().zip(&want_b) {
            assert!((a - e).abs() < 1e-6, "way {way} fused {fused}: b {a} vs {e}");
        }
        // State round trip.
        let (state, steps) = opt.state();
        assert_eq!(steps, 3);
        let map: HashMap<String, Tensor> = state.into_iter().collect();
        let mut fresh =
            AdamW::new(vec![("w".into(), w.clone()), ("b".into(), b.clone())], AdamWConfig::default()).unwrap();
        fresh.load_state(&map, 3).unwrap();
        assert_eq!(fresh.steps(), 3);
        // A non-finite gradient: step_clipped changes nothing (the trainer stops on the norm).
        let before = (
            w.as_tensor().to_vec2::<f32>().unwrap(),
            opt.state().0[0].1.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        );
        let mut grads: HashMap<String, Tensor> = HashMap::new();
        grads.insert("w".into(), Tensor::new(&[[f32::NAN, 0.0, 0.0], [0.0; 3]], &dev).unwrap());
        grads.insert("b".into(), Tensor::new(&[0.5f32, 0.5, 0.5], &dev).unwrap());
        let sumsq = opt.step_clipped(&grads, 1e-2, 1.0).unwrap().to_scalar::<f64>().unwrap();
        assert!(sumsq.is_nan());
        let after = (
            w.as_tensor().to_vec2::<f32>().unwrap(),
            opt.state().0[0].1.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        );
        assert_eq!(before, after, "way {way} fused {fused}: a NaN gradient moved the parameters");
    }
}

/// One step with ε large enough to matter, against values computed by hand: after one step
/// m̂ = g and v̂ = g², so a matrix goes to p·(1 − lr·wd) − lr·g / (|g| + ε) and a vector (no
/// decay) to p − lr·g / (|g| + ε).
#[test]
fn one_adamw_step_matches_hand_computed_values() {
    let dev = Device::Cpu;
    for fused in [true, false] {
        let w = Var::from_tensor(&Tensor::new(&[[1.0f32, -2.0]], &dev).unwrap()).unwrap();
        let b = Var::from_tensor(&Tensor::new(&[3.0f32], &dev).unwrap()).unwrap();
        let cfg = AdamWConfig { beta1: 0.9, beta2: 0.95, eps: 1.0, weight_decay: 0.1 };
        let mut opt = AdamW::new(vec![("w".into(), w.clone()), ("b".into(), b.clone())], cfg).unwrap();
        opt.set_fused(fused);
        let mut grads: HashMap<String, Tensor> = HashMap::new();
        grads.insert("w".into(), Tensor::new(&[[2.0f32, -0.5]], &dev).unwrap());
        grads.insert("b".into(), Tensor::new(&[1.0f32], &dev).unwrap());
        opt.step(&grads, 0.1).unwrap();
        let want_w = [1.0 * 0.99 - 0.1 * 2.0 / 3.0, -2.0 * 0.99 + 0.1 * 0.5 / 1.5];
        let got_w = w.as_tensor().to_vec2::<f32>().unwrap();
        for (a, e) in got_w[0].iter().zip(want_w) {
            assert!((*a as f64 - e).abs() < 1e-6, "fused {fused}: w {a} vs {e}");
        }
        let got_b = b.as_tensor().to_vec1::<f32>().unwrap()[0] as f64;
        assert!((got_b - (3.0 - 0.1 * 1.0 / 2.0)).abs() < 1e-6, "fused {fused}: b {got_b}");
    }
    // Saved moments of another shape, either of the two, are refused by name.
    let w = Var::from_tensor(&Tensor::zeros((1, 2), candle_core::DType::F32, &dev).unwrap()).unwrap();
    let mut opt = AdamW::new(vec![("w".into(), w)], AdamWConfig::default()).unwrap();
    let (right, wrong) = (
        Tensor::zeros((1, 2), candle_core::DType::F32, &dev).unwrap(),
        Tensor::zeros(2, candle_core::DType::F32, &dev).unwrap(),
    );
    for (m, v) in [(&right, &wrong), (&wrong, &right)] {
        let state = HashMap::from([("m.w".to_string(), m.clone()), ("v.w".to_string(), v.clone())]);
        let e = opt.load_state(&state, 1).unwrap_err().to_string();
        assert!(e.contains("optimizer state for w has the wrong shape"), "{e}");
    }
    let state = HashMap::from([("m.w".to_string(), right.clone()), ("v.w".to_string(), right.clone())]);
    opt.load_state(&state, 1).unwrap();
}

#[test]
fn clip_scale_is_torchs_factor() {
    assert_eq!(clip_scale(0.5, 1.0), 1.0);
    assert_eq!(clip_scale(4.0, 1.0), 1.0 / (4.0 + 1e-6));
    assert_eq!(clip_scale(4.0, 0.0), 1.0, "max_norm 0 turns clipping off");
    assert_eq!(clip_scale(f64::NAN, 1.0), 1.0);
    assert_eq!(clip_scale(f64::INFINITY, 1.0), 1.0);
    // grad_norm over tensors of several shapes and dtypes: √(1 + 4 + 9 + 16 + 0.25) .
    let dev = Device::Cpu;
    let grads: HashMap<String, Tensor> = [
        ("a".to_string(), Tensor::new(&[[1f32, -2.0], [3.0, 0.0]], &dev).unwrap()),
        ("b".to_string(), Tensor::new(&[4f32], &dev).unwrap()),
        ("c".to_string(), Tensor::new(&[-0.5f32], &dev).unwrap().to_dtype(candle_core::DType::BF16).unwrap()),
    ]
    .into();
    assert!((grad_norm(&grads).unwrap() - 30.25f64.sqrt()).abs() < 1e-12);
}

#[test]
fn fused_adamw_equals_the_tensor_path() {
    let dev = Device::Cpu;
    let mut rng = patchlm_model::SplitMix64(9);
    let mut vals = |n: usize| -> Vec<f32> { (0..n).map(|_| rng.normal() as f32).collect() };
    let w0 = Tensor::from_vec(vals(64 * 48), (64, 48), &dev).unwrap();
    let n0 = Tensor::from_vec(vals(48), 48, &dev).unwrap();
    let grads: Vec<(Tensor, Tensor)> = (0..4)
        .map(|_| {
            (Tensor::from_vec(vals(64 * 48), (64, 48), &dev).unwrap(), Tensor::from_vec(vals(48), 48, &dev).unwrap())
        })
        .collect();
    let mut out = Vec::new();
    for fused in [true, false] {
        let w = Var::from_tensor(&w0).unwrap();
        let n = Var::from_tensor(&n0).unwrap();
        let mut opt =
            AdamW::new(vec![("w".into(), w.clone()), ("n".into(), n.clone())], AdamWConfig::default()).unwrap();
        opt.set_fused(fused);
        // Per-step factors (as clipping gives): a constant one would hardly change Adam's update.
        for ((gw, gn), scale) in grads.iter().zip([0.37, 1.0, 0.02, 0.6]) {
            let g: HashMap<String, Tensor> = [("w".to_string(), gw.clone()), ("n".to_string(), gn.clone())].into();
            opt.step_scaled(&g, 1e-2, scale).unwrap();
        }
        let mut v: Vec<f32> = w.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
        v.extend(n.as_tensor().to_vec1::<f32>().unwrap());
        out.push(v);
    }
    let d = out[0].iter().zip(&out[1]).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    assert!(d < 1e-6, "fused and tensor AdamW differ by {d}");
    assert_ne!(
        out[0],
        w0.flatten_all().unwrap().to_vec1::<f32>().unwrap()[..]
            .to_vec()
            .into_iter()
            .chain(n0.to_vec1::<f32>().unwrap())
            .collect::<Vec<_>>()
    );
}

#[test]
fn bf16_gradients_update_like_their_f32_values() {
    // The multi-tensor update (and the tensor path) take bf16 gradients as they are: the same
    // update as the f32 gradients holding the same (bf16-representable) values, and the same
    // gradient norm.
    let dev = Device::Cpu;
    let mut rng = patchlm_model::SplitMix64(4);
    let mut vals = |n: usize| -> Vec<f32> { (0..n).map(|_| rng.normal() as f32).collect() };
    let w0 = Tensor::from_vec(vals(40 * 24), (40, 24), &dev).unwrap();
    let grads: Vec<Tensor> = (0..3)
        .map(|_| Tensor::from_vec(vals(40 * 24), (40, 24), &dev).unwrap().to_dtype(DType::BF16).unwrap())
        .collect();
    let mut out = Vec::new();
    for (fused, bf16) in [(true, false), (true, true), (false, true)] {
        let w = Var::from_tensor(&w0).unwrap();
        let mut opt = AdamW::new(vec![("w".into(), w.clone())], AdamWConfig::default()).unwrap();
        opt.set_fused(fused);
        for (g, scale) in grads.iter().zip([0.5, 1.0, 0.1]) {
            let want = g_norm_f64(g);
            let g = if bf16 { g.clone() } else { g.to_dtype(DType::F32).unwrap() };
            let map: HashMap<String, Tensor> = [("w".to_string(), g)].into();
            let norm = grad_norm(&map).unwrap();
            assert!((norm - want).abs() <= 1e-6 * want, "gradient norm {norm} vs {want}");
            opt.step_scaled(&map, 1e-2, scale).unwrap();
        }
        out.push(w.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap());
    }
    assert_eq!(out[0], out[1], "bf16 gradients through the multi-tensor update");
    let d = out[0].iter().zip(&out[2]).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    assert!(d < 1e-6, "bf16 gradients through the tensor path differ by {d}");
    assert_ne!(out[0], w0.flatten_all().unwrap().to_vec1::<f32>().unwrap());
}

fn g_norm_f64(g: &Tensor) -> f64 {
    g.to_dtype(DType::F64).unwrap().sqr().unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap().sqrt()
}

#[test]
fn warmup_cosine_schedule() {
    // 10 warmup steps to 1.0, cosine to 0.1 over the remaining 90.
    assert!((lr_at(0, 100, 10, 1.0, 0.1) - 0.1).abs() < 1e-12);
    assert!((lr_at(9, 100, 10, 1.0, 0.1) - 1.0).abs() < 1e-12);
    assert!((lr_at(10, 100, 10, 1.0, 0.1) - 1.0).abs() < 1e-12);
    assert!((lr_at(55, 100, 10, 1.0, 0.1) - 0.55).abs() < 1e-12);
    assert!((lr_at(100, 100, 10, 1.0, 0.1) - 0.1).abs() < 1e-12);
    // Warmup longer than the phase is capped.
    assert!((lr_at(0, 4, 2000, 1.0, 0.0) - 0.25).abs() < 1e-12);
}

/// A warmup of a whole phase or longer gets a note, a shorter one none.
#[test]
fn a_warmup_as_long_as_its_phase_or_longer_is_noted() {
    assert_eq!(warmup_note(9, 10), None);
    // Where the two are equal the rate reaches the peak at the phase's last step, and no step
    // decays it, as with any longer warmup (`lr_at` cuts it to the phase).
    let lr = |step, warmup| lr_at(step, 10, warmup, 1.0, 0.0);
    for warmup in [10, 11] {
        assert!((0..9).all(|s| lr(s, warmup) < lr(s + 1, warmup)) && lr(9, warmup) == 1.0);
    }
    let note = warmup_note(10, 10).unwrap();
    assert!(note.starts_with("train.warmup_steps 10 is as long as this phase: its learning rate rises over all 10 steps to the peak and never decays"), "{note}");
    let note = warmup_note(11, 10).unwrap();
    assert!(note.starts_with("train.warmup_steps 11 is longer than this phase"), "{note}");
}

/// The data of `pipeline(dir, 0.5)` and an uninterrupted run on it in `dir/a`, the reference
/// that interrupted runs must end at: (patch data, config, run directory).
fn reference_run(dir: &Path) -> (PathBuf, RunConfig, PathBuf) {
    let (_, pdir, cfg) = pipeline(dir, 0.5);
    let run = dir.join("a");
    Trainer::new(cfg.clone(), &pdir, &run, Device::Cpu).unwrap().run(false).unwrap();
    (pdir, cfg, run)
}

/// A folder holding a run, its patch datasets and shards beside the text is read as the text alone:
/// each of them holds one of the files that mark a patchlm stage's output to a folder's walk.
#[test]
fn a_runs_files_are_not_read_as_text() {
    let dir = tempfile::tempdir().unwrap();
    let (_, _, run) = reference_run(dir.path());
    assert!(run.join("metrics.jsonl").is_file() && run.join(RUN_LOCK_FILE).is_file());
    let files = patchlm_data::source::expand_inputs(&[dir.path()]).unwrap();
    assert_eq!(files, [dir.path().join("in.jsonl")]);
    for marker in [RUN_LOCK_FILE, patchlm_patch::dataset::MANIFEST] {
        assert!(patchlm_data::source::OUTPUT_MARKERS.contains(&marker), "{marker}");
    }
}

fn weights(dir: &Path) -> Vec<u8> {
    std::fs::read(dir.join("model/model.safetensors")).unwrap()
}

#[test]
fn phases_plan_equal_tokens_per_step_and_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let (shards, pdir, mut cfg) = pipeline(dir.path(), 0.5);
    cfg.train.min_lr_ratio = 0.1;
    let run = dir.path().join("run");
    let tok = std::fs::read_to_string(shards.join("tokenizer.json")).unwrap();
    // Each validation reaches the hook once its line can be read back from metrics.jsonl.
    let hooked = std::cell::RefCell::new(Vec::new());
    let metrics_file = run.join("metrics.jsonl");
    let mut tr = Trainer::new(cfg.clone(), &pdir, &run, Device::Cpu)
        .unwrap()
        .with_tokenizer(tok, Some(0), Some(1))
        .unwrap()
        .on_eval(|e| {
            let (_, in_file) = patchlm_train::read_metrics(&metrics_file).unwrap();
            hooked.borrow_mut().push((e.global_step, in_file.last().map(|l| (l.global_step, l.val_loss))));
        });
    let plans = tr.plans().to_vec();
    assert_eq!(plans.len(), 2);
    assert_eq!((plans[0].name.as_str(), plans[0].k, plans[0].blocks_per_step), ("patch", 4, 4));
    assert_eq!((plans[1].name.as_str(), plans[1].k, plans[1].blocks_per_step), ("token", 1, 16));
    assert_eq!((plans[0].tokens_per_step(), plans[1].tokens_per_step()), (128, 128));
    assert_eq!(cfg.train.tokens_per_step, 128);
    let s = tr.run(false).unwrap();
    assert_eq!(s.phases.iter().map(|p| p.steps).collect::<Vec<_>>(), vec![6, 6]);
    assert!((s.relative_cost - 0.625).abs() < 1e-9, "{}", s.relative_cost);
    assert!(s.val_loss.is_finite());
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let steps: Vec<&serde_json::Value> = lines.iter().filter(|l| l["kind"] == "step").collect();
    assert_eq!(steps.len(), 12);
    assert_eq!(steps[0]["k"], 4);
    assert_eq!(steps[11]["k"], 1);
    for k in ["loss", "lr", "grad_norm", "tokens_per_sec", "step_secs", "mfu", "tokens_seen"] {
        assert!(steps[5][k].is_number(), "{k}");
    }
    // A fresh optimizer and schedule per phase: in each, two steps of linear warmup to 3e-3,
    // then a cosine to 3e-4 (hand-computed: 3e-4 + 1.35e-3 · (1 + cos(π·i/4)) at step 2 + i).
    let want = [0.0015, 0.003, 0.003, 0.002604594154601839, 0.00165, 0.0006954058453981609];
    for (i, st) in steps.iter().enumerate() {
        let lr = st["lr"].as_f64().unwrap();
        assert!((lr - want[i % 6]).abs() < 1e-15, "step {i}: lr {lr}, want {}", want[i % 6]);
    }
    // The first step's loss and gradient norm (before clipping) are the initial model's on the
    // step's four patch blocks, as candle's autograd computes them in one batch (the trainer
    // runs two micro-batches of two through the hand-written backward pass).
    let (model, varmap) = patchlm_model::init_model(&cfg.model, &Device::Cpu, cfg.seed).unwrap();
    let patch_blocks = patchlm_patch::BlockReader::open(&pdir, &plans[0].file).unwrap();
    let mut buf = Vec::new();
    patch_blocks.read_blocks(0, 4, &mut buf);
    let ids = Tensor::from_vec(buf, (4, 32), &Device::Cpu).unwrap();
    let loss = patchlm_patch::patch_loss(&model, &ids, 4).unwrap();
    let grads = loss.backward().unwrap();
    let sumsq: f64 = varmap
        .all_vars()
        .iter()
        .map(|v| grads.get(v).unwrap().sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap() as f64)
        .sum();
    let (l0, g0) = (steps[0]["loss"].as_f64().unwrap(), steps[0]["grad_norm"].as_f64().unwrap());
    let want_loss = loss.to_scalar::<f32>().unwrap() as f64;
    assert!((l0 - want_loss).abs() < 1e-5 * want_loss, "loss {l0}, autograd {want_loss}");
    assert!((g0 - sumsq.sqrt()).abs() < 1e-4 * g0, "grad norm {g0}, autograd {}", sumsq.sqrt());
    let evals: Vec<&serde_json::Value> = lines.iter().filter(|l| l["kind"] == "eval").collect();
    // Before the first step, every third step (eval_every) and at each phase's end.
    let eval_steps: Vec<u64> = evals.iter().map(|e| e["global_step"].as_u64().unwrap()).collect();
    assert_eq!(eval_steps, [0, 3, 6, 9, 12]);
    let hooked = hooked.borrow();
    assert_eq!(hooked.len(), evals.len());
    for (h, e) in hooked.iter().zip(&evals) {
        let step = e["global_step"].as_u64().unwrap() as usize;
        assert_eq!(*h, (step, Some((step, e["val_loss"].as_f64().unwrap()))));
    }
    // Validation loss fell from the initial model.
    assert!(evals.last().unwrap()["val_loss"].as_f64().unwrap() < evals[0]["val_loss"].as_f64().unwrap());
    assert!(run.join("model/config.json").is_file());
    let cks = list_checkpoints(&run).unwrap();
    assert_eq!(cks.len(), 2);
    // Each checkpoint carries the resolved config; the final model carries the tokenizer.
    let saved: RunConfig =
        serde_json::from_str(&std::fs::read_to_string(cks[1].join(RUN_CONFIG_FILE)).unwrap()).unwrap();
    assert_eq!(saved, cfg);
    assert!(run.join("model/tokenizer.json").is_file());
    // A checkpoint is an HF model directory too: the last one (the final step) holds the final
    // model's files byte for byte, so it loads wherever the model does.
    assert!(cks[1].ends_with("step-00000012"));
    for f in ["model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json"] {
        assert_eq!(std::fs::read(cks[1].join(f)).unwrap(), std::fs::read(run.join("model").join(f)).unwrap(), "{f}");
    }
    // read_metrics gives the same records, typed; the patch phase's last validation is its end.
    let (st, ev) = patchlm_train::read_metrics(&run.join("metrics.jsonl")).unwrap();
    assert_eq!((st.len(), ev.len()), (12, evals.len()));
    assert_eq!((st[11].global_step, st[11].tokens_seen), (12, s.tokens));
    let switch = patchlm_train::phase_switch(&ev).unwrap();
    assert_eq!((switch.phase.as_str(), switch.global_step, switch.tokens_seen), ("patch", 6, 6 * 128));
    // A run still in its patch phase, or one with no patch phase, has no switch.
    assert!(patchlm_train::phase_switch(&ev[..3]).is_none());
    assert!(patchlm_train::phase_switch(&ev[3..]).is_none());
    assert_eq!(s.phases.iter().map(|p| p.tokens).collect::<Vec<_>>(), [6 * 128, 6 * 128]);
    // FLOPs at the switch: the patch phase's positions only, K-fold fewer than its tokens.
    let fpp = cfg.model.flops_per_position(cfg.blocks.context);
    assert!((switch.flops - switch.tokens_seen as f64 / 4.0 * fpp).abs() < 1e-6 * switch.flops);
    // Each step's throughput and MFU from its time: 128 tokens, over 4 patch blocks of 8
    // patches or 16 token blocks of 8 positions.
    for (i, m) in st.iter().enumerate() {
        let positions = if i < 6 { 4.0 * 8.0 } else { 16.0 * 8.0 };
        assert!((m.tokens_per_sec - 128.0 / m.step_secs).abs() < 1e-9 * m.tokens_per_sec, "{m:?}");
        let mfu = positions * fpp / m.step_secs / cfg.train.peak_flops;
        assert!((m.mfu - mfu).abs() < 1e-9 * mfu, "{m:?}");
    }
    // A phase's throughput is the median of its steps' (the upper of the middle two).
    for (p, steps) in s.phases.iter().zip(st.chunks(6)) {
        let mut tps: Vec<f64> = steps.iter().map(|m| m.tokens_per_sec).collect();
        tps.sort_by(f64::total_cmp);
        // (metrics.jsonl's decimal may be off by the last bit: serde_json parses it fast.)
        assert!((p.tokens_per_sec - tps[3]).abs() < 1e-12 * tps[3], "{} vs {tps:?}", p.tokens_per_sec);
    }
    // Training time grows from validation to validation, up to the run's.
    assert!(ev.windows(2).all(|w| w[0].train_secs < w[1].train_secs), "{ev:?}");
    assert!(ev.last().unwrap().train_secs <= s.train_secs);
    // And halfway through the patch phase, its three steps' only.
    let third = ev.iter().find(|e| e.global_step == 3).unwrap();
    assert!((third.flops - 3.0 * 128.0 / 4.0 * fpp).abs() < 1e-6 * third.flops, "{}", third.flops);
    assert!((ev.last().unwrap().flops - s.flops).abs() < 1e-6 * s.flops);
    assert!(ev.windows(2).all(|w| w[1].train_secs >= w[0].train_secs));
    // A second run into the same directory without --resume is refused.
    let e = Trainer::new(cfg.clone(), &pdir, &run, Device::Cpu).unwrap().run(false).unwrap_err().to_string();
    assert!(e.contains("--resume"), "{e}");
    // A fresh start drops metrics of an attempt that never reached a checkpoint.
    let fresh = dir.path().join("fresh");
    std::fs::create_dir_all(&fresh).unwrap();
    std::fs::write(fresh.join("metrics.jsonl"), "{\"kind\": \"step\", \"stale\": true}\n").unwrap();
    let mut c2 = cfg;
    c2.train.max_steps_per_phase = 1;
    Trainer::new(c2, &pdir, &fresh, Device::Cpu).unwrap().run(true).unwrap();
    let (st, _) = patchlm_train::read_metrics(&fresh.join("metrics.jsonl")).unwrap();
    assert_eq!(st.iter().map(|s| s.global_step).collect::<Vec<_>>(), vec![1, 2]);
    // A line that is not a record is named.
    std::fs::write(fresh.join("bad.jsonl"), "{\"kind\": \"eval\"}\n").unwrap();
    let e = patchlm_train::read_metrics(&fresh.join("bad.jsonl")).unwrap_err().to_string();
    assert!(e.contains("bad.jsonl: line 1"), "{e}");
    // A last line still being written (no newline, cut short) is left out; the same cut line
    // before others, or finished with its newline, is damage and named.
    let text = std::fs::read_to_string(fresh.join("metrics.jsonl")).unwrap();
    let first = text.lines().next().unwrap();
    let cut = &first[..first.len() / 2];
    std::fs::write(fresh.join("live.jsonl"), format!("{text}{cut}")).unwrap();
    let (live, _) = patchlm_train::read_metrics(&fresh.join("live.jsonl")).unwrap();
    assert_eq!(live.iter().map(|s| s.global_step).collect::<Vec<_>>(), vec![1, 2]);
    let n = text.lines().count();
    for (damaged, line) in [(format!("{text}{cut}\n"), n + 1), (format!("{cut}\n{text}"), 1)] {
        std::fs::write(fresh.join("cut.jsonl"), damaged).unwrap();
        let e = patchlm_train::read_metrics(&fresh.join("cut.jsonl")).unwrap_err().to_string();
        assert!(e.contains(&format!("cut.jsonl: line {line}:")), "{e}");
    }
    // As is a record of another kind, by its line.
    std::fs::write(fresh.join("other.jsonl"), format!("{text}{{\"kind\": \"note\"}}\n")).unwrap();
    let e = patchlm_train::read_metrics(&fresh.join("other.jsonl")).unwrap_err().to_string();
    assert!(
        e.contains(&format!("other.jsonl: line {}: neither", n + 1))
            && e.contains("neither a \"step\" nor an \"eval\" record"),
        "{e}"
    );
}

/// Several epochs: the first λ of the passes at patch level, fractions included (λ = 4/5 of 6
/// epochs: 4.8 passes over the patch blocks, 1.2 over the token blocks).
#[test]
fn epochs_split_at_lambda_including_a_fraction_of_a_pass() {
    let dir = tempfile::tempdir().unwrap();
    let (shards, _, mut cfg) = pipeline(dir.path(), 0.8);
    cfg.blocks.epochs = 6;
    cfg.train.max_steps_per_phase = 0;
    let pdir = dir.path().join("six");
    let m = patchlm_patch::build_patch_datasets(&shards, &pdir, &cfg.patch, &cfg.blocks).unwrap();
    let plans = patchlm_train::plan_phases(&cfg, &m).unwrap();
    let (p, t) = (&plans[0], &plans[1]);
    let pp = m.patch_phase.as_ref().unwrap();
    assert_eq!(p.steps, (pp.blocks as f64 * 4.8).round() as usize / p.blocks_per_step);
    assert_eq!(t.steps, (m.token_phase.blocks as f64 * 1.2).round() as usize / t.blocks_per_step);
    // Both phases read the whole stream: 4.8 and 1.2 times its tokens, up to a step's rounding.
    let n = patchlm_data::Dataset::open(&shards).unwrap().train().len() as f64;
    for (plan, block_len, passes) in [(p, pp.block_len, 4.8), (t, m.token_phase.block_len, 1.2)] {
        let read = (plan.steps * plan.blocks_per_step * block_len) as f64;
        let step = (plan.blocks_per_step * block_len) as f64;
        assert!((read - passes * n).abs() <= step + 2.0 * block_len as f64, "{}: {read} of {n}", plan.name);
    }
}

#[test]
fn bad_settings_fail_before_training() {
    let dir = tempfile::tempdir().unwrap();
    let (_, pdir, cfg) = pipeline(dir.path(), 0.5);
    let run = dir.path().join("run");
    let check = |c: RunConfig, want: &str| {
        let e = Trainer::new(c, &pdir, &run, Device::Cpu).err().unwrap().to_string();
        assert!(e.contains(want), "{e}");
        assert!(!run.exists(), "nothing may be written before training starts");
    };
    // Settings wrong on their own are refused by RunConfig::validate too, with no data at all
    // (pretrain checks them before its data stage).
    let setting = |c: RunConfig, want: &str| {
        let e = c.validate().err().unwrap().to_string();
        assert!(e.contains(want), "{e}");
        check(c, want);
    };
    assert!(cfg.validate().is_ok());
    let mut c = cfg.clone();
    c.patch.k = 0;
    setting(c, "k must");
    let mut c = cfg.clone();
    c.patch.lambda = 1.0;
    setting(c, "lambda");
    // f16 (any spelling) is refused: without loss scaling small gradients are lost; bf16 is not.
    for f16 in ["f16", "fp16", "float16"] {
        let mut c = cfg.clone();
        c.train.dtype = f16.into();
        setting(c, "f16 training needs loss scaling");
    }
    let mut c = cfg.clone();
    c.train.dtype = "bf16".into();
    assert!(c.validate().is_ok());
    let mut c = cfg.clone();
    c.train.dtype = "f8".into();
    setting(c, "train.dtype \"f8\" is not f32 or bf16");
    let mut c = cfg.clone();
    c.blocks.context = 1;
    assert!(c.validate().err().unwrap().to_string().contains("context length must be at least 2"));
    let mut c = cfg.clone();
    c.patch.lambda = 0.25;
    check(c, "rebuild them");
    let mut c = cfg.clone();
    c.train.tokens_per_step = 1 << 30;
    check(c, "too few for one step");
    let mut c = cfg.clone();
    c.train.tokens_per_step = 16;
    setting(c, "smaller than one patch-phase block");
    // A step of exactly one block is a step; without a patch phase only the token block counts.
    let (k, t) = (cfg.patch.k, cfg.blocks.context);
    let mut c = cfg.clone();
    c.train.tokens_per_step = k * t;
    c.validate().unwrap();
    let mut c = cfg.clone();
    c.patch.lambda = 0.0;
    c.train.tokens_per_step = t;
    c.validate().unwrap();
    let mut c = cfg.clone();
    c.train.tokens_per_step = 100;
    setting(c, "not divisible");
    // Optimizer settings outside what torch.optim.AdamW takes (β1 = 1 made the loss NaN at step
    // 2), a negative clip, a final learning rate above the peak.
    type Edit = fn(&mut RunConfig);
    let cases: [(Edit, &str); 12] = [
        (|c| c.train.adamw.eps = f64::INFINITY, "adamw.eps must be 0 or positive, got inf"),
        (|c| c.train.lr = 0.0, "lr must be positive, got 0"),
        (|c| c.train.lr = -1e-3, "lr must be positive"),
        (|c| c.train.lr = f64::INFINITY, "lr must be positive, got inf"),
        (|c| c.train.lr = f64::NAN, "lr must be positive, got NaN"),
        (|c| c.train.grad_clip = f64::INFINITY, "grad_clip must be 0 (off) or positive, got inf"),
        (|c| c.train.adamw.beta1 = 1.0, "adamw.beta1 must be in [0, 1), got 1"),
        (|c| c.train.adamw.beta2 = -0.5, "adamw.beta2 must be in [0, 1)"),
        (|c| c.train.adamw.eps = f64::NAN, "adamw.eps must be 0 or positive, got NaN"),
        (|c| c.train.adamw.weight_decay = -0.1, "adamw.weight_decay must be 0 or positive"),
        (|c| c.train.grad_clip = -1.0, "grad_clip must be 0 (off) or positive, got -1"),
        (|c| c.train.min_lr_ratio = 2.0, "min_lr_ratio must be in [0, 1], got 2"),
    ];
    for (set, want) in cases {
        let mut c = cfg.clone();
        set(&mut c);
        setting(c, want);
    }
    // A tokenizer other than the datasets' is refused before training.
    let t = Trainer::new(cfg.clone(), &pdir, &run, Device::Cpu).unwrap();
    let e = t.with_tokenizer("{}".into(), None, Some(1)).err().unwrap().to_string();
    assert!(e.contains("not the one the datasets were made with"), "{e}");
    assert!(!run.exists());
    let mut c = cfg.clone();
    c.model.max_position_embeddings = 4;
    check(c, "exceeds the model");
    let mut c = cfg.clone();
    c.model.vocab_size = 100;
    check(c, "vocabulary");
    let mut c = cfg.clone();
    c.model.num_attention_heads = 3;
    check(c, "divisible");
}

#[test]
fn resume_refuses_a_different_config_and_nan_keeps_the_last_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let (_, pdir, cfg) = pipeline(dir.path(), 0.5);
    let run = dir.path().join("run");
    let mut c = cfg.clone();
    c.train.max_steps_per_phase = 2;
    Trainer::new(c.clone(), &pdir, &run, Device::Cpu).unwrap().run(false).unwrap();
    let mut other = c.clone();
    other.train.lr = 1e-3;
    let e = Trainer::new(other, &pdir, &run, Device::Cpu).unwrap().run(true).unwrap_err().to_string();
    assert!(e.contains("different config"), "{e}");
    // The same config over other data (the inputs edited: a retrained tokenizer, other blocks)
    // is refused rather than continued on ids the checkpoint never saw.
    let other = dir.path().join("other");
    std::fs::create_dir(&other).unwrap();
    let (_, other_pdir, _) = pipeline_of(&other, 0.5, |i| format!("a different document {i}: z{} y{}", i % 5, i % 9));
    let e = Trainer::new(c.clone(), &other_pdir, &run, Device::Cpu).unwrap().run(true).unwrap_err().to_string();
    assert!(e.contains("was trained on other data") && e.contains("fresh --out"), "{e}");
    // A checkpoint written before a setting existed (its stored config lacks the key, its
    // state's fingerprint was computed without it) resumes: the stored config is fingerprinted
    // again with the new setting at its default.
    // (The older of the two kept, so that the resumed run writes one more.)
    let cks = list_checkpoints(&run).unwrap();
    let ck = cks[0].clone();
    std::fs::remove_dir_all(&cks[1]).unwrap();
    let mut stored: serde_json::Value =
        serde_json::from_slice(&std::fs::read(ck.join(RUN_CONFIG_FILE)).unwrap()).unwrap();
    stored["data"]["source"].as_object_mut().unwrap().remove("sample_by").unwrap();
    let mut state: serde_json::Value = serde_json::from_slice(&std::fs::read(ck.join("state.json")).unwrap()).unwrap();
    state["config_fingerprint"] = "sha256:written-by-an-older-version".into();
    state.as_object_mut().unwrap().remove("data_fingerprint").unwrap(); // not kept then either
    let mut sums: serde_json::Value = serde_json::from_slice(&std::fs::read(ck.join(CHECKSUMS_FILE)).unwrap()).unwrap();
    for (f, v) in [(RUN_CONFIG_FILE, &stored), ("state.json", &state)] {
        let bytes = serde_json::to_vec_pretty(v).unwrap();
        sums[f] = patchlm_data::shard::sha256_bytes(&bytes).into();
        std::fs::write(ck.join(f), bytes).unwrap();
    }
    std::fs::write(ck.join(CHECKSUMS_FILE), serde_json::to_vec_pretty(&sums).unwrap()).unwrap();
    Trainer::new(c.clone(), &pdir, &run, Device::Cpu).unwrap().run(true).unwrap();
    // The checkpoints written after it know the data again.
    let newest = load_checkpoint(&list_checkpoints(&run).unwrap().pop().unwrap(), &Device::Cpu).unwrap();
    assert_ne!(newest.path, ck);
    let manifest = patchlm_patch::PatchManifest::load(&pdir).unwrap();
    assert_eq!(newest.state.data_fingerprint, manifest.training_data_fingerprint());
    // An absurd learning rate blows up; the error says so and good checkpoints remain.
    let run2 = dir.path().join("nan");
    let mut c = cfg.clone();
    c.train.lr = 1e25;
    c.train.warmup_steps = 0;
    c.train.grad_clip = 0.0;
    let e = Trainer::new(c, &pdir, &run2, Device::Cpu).unwrap().run(false).unwrap_err();
    assert!(matches!(e, TrainError::NonFinite { .. }), "{e}");
    assert!(e.to_string().contains("last good checkpoint"));
    let cks = list_checkpoints(&run2).unwrap();
    assert!(!cks.is_empty());
    let ck = load_checkpoint(cks.last().unwrap(), &Device::Cpu).unwrap();
    // The error names the step that failed: the one after the last good checkpoint.
    let TrainError::NonFinite { phase, step, global_step, .. } = &e else { unreachable!() };
    let next = ck.state.global_step + 1;
    assert_eq!((phase.as_str(), *step, *global_step), ("patch", next, next), "{e}");
    for (name, t) in &ck.model {
        let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
        assert!(v.iter().all(|x| x.is_finite()), "{name} in the kept checkpoint is not finite");
    }
}

/// Checkpoints carry the sha256 of each file: one whose weights were damaged on disk fails its
/// check by name, resuming passes it over to the one before (and ends where the undamaged run
/// ended, bit for bit), and with every checkpoint damaged the resume refuses. A checkpoint from
/// before checksums (no checksums.json) still loads.
#[test]
fn a_corrupt_checkpoint_is_detected_and_passed_over() {
    let dir = tempfile::tempdir().unwrap();
    let (_, pdir, mut cfg) = pipeline(dir.path(), 0.5);
    cfg.train.max_steps_per_phase = 3;
    let run = dir.path().join("run");
    Trainer::new(cfg.clone(), &pdir, &run, Device::Cpu).unwrap().run(false).unwrap();
    let done = weights(&run);
    let cks = list_checkpoints(&run).unwrap();
    assert_eq!(cks.len(), 2);
    let damage = |ck: &Path| {
        let f = ck.join("model.safetensors");
        let mut bytes = std::fs::read(&f).unwrap();
        let n = bytes.len();
        bytes[n - 5] ^= 0x40; // a bit of the last weight, past the header
        std::fs::write(&f, bytes).unwrap();
    };
    damage(&cks[1]);
    let e = verify_checkpoint(&cks[1]).unwrap_err().to_string();
    assert!(e.contains("step-00000006") && e.contains("model.safetensors: checksum mismatch"), "{e}");
    assert!(load_checkpoint(&cks[1], &Device::Cpu).is_err());
    verify_checkpoint(&cks[0]).unwrap();
    // Resuming goes back to step 5 and redoes step 6: the same final weights.
    Trainer::new(cfg.clone(), &pdir, &run, Device::Cpu).unwrap().run(true).unwrap();
    assert_eq!(weights(&run), done, "resuming past a damaged checkpoint changed the result");
    // Step 6 was written again.
    verify_checkpoint(&cks[1]).unwrap();
    // Every checkpoint damaged: no resume from garbage.
    for ck in &list_checkpoints(&run).unwrap() {
        damage(ck);
    }
    let e = Trainer::new(cfg, &pdir, &run, Device::Cpu).unwrap().run(true).unwrap_err().to_string();
    assert!(e.contains("checksum mismatch"), "{e}");
    // No checksums.json (an older checkpoint): loaded as it is.
    std::fs::remove_file(cks[0].join(CHECKSUMS_FILE)).unwrap();
    verify_checkpoint(&cks[0]).unwrap();
    // One that cannot be read is not taken for an absent one.
    std::fs::create_dir(cks[0].join(CHECKSUMS_FILE)).unwrap();
    let e = verify_checkpoint(&cks[0]).unwrap_err().to_string();
    assert!(e.contains("step-00000005") && e.contains(&format!("{CHECKSUMS_FILE}: ")), "{e}");
}

#[test]
fn checkpoints_are_listed_oldest_first_and_only_whole_ones() {
    let dir = tempfile::tempdir().unwrap();
    let cks = dir.path().join("checkpoints");
    assert!(list_checkpoints(dir.path()).unwrap().is_empty());
    // A killed write's temp directory and one with no state.json are not checkpoints, even when
    // the temp directory got as far as its state.json.
    for (name, whole) in [
        ("step-00000010", true),
        ("step-00000002", true),
        ("step-00000003.tmp", true),
        ("step-00000004", false),
        ("notes", true),
    ] {
        std::fs::create_dir_all(cks.join(name)).unwrap();
        if whole {
            std::fs::write(cks.join(name).join("state.json"), "{}").unwrap();
        }
    }
    assert_eq!(list_checkpoints(dir.path()).unwrap(), [cks.join("step-00000002"), cks.join("step-00000010")]);
}

const CHILD_ENV: &str = "PATCHLM_RESUME_CHILD_DIR";

/// In a child process that [`child_test`] started (`env` naming its directory): the directory
/// and the patch datasets and config of [`pipeline`] built there.
fn as_child(env: &str) -> Option<(PathBuf, PathBuf, RunConfig)> {
    let dir = PathBuf::from(std::env::var(env).ok()?);
    let (_, pdir, cfg) = pipeline(&dir, 0.5);
    Some((dir, pdir, cfg))
}

/// This test binary, to run only the ignored test `name`, with `env` naming `dir`.
fn child_test(name: &str, env: &str, dir: &Path) -> std::process::Command {
    let mut cmd = std::process::Command::new(std::env::current_exe().unwrap());
    cmd.args(["--exact", name, "--ignored", "--nocapture", "--test-threads=1"]).env(env, dir);
    cmd
}

/// Not a test on its own: the child process of `kill_and_resume_is_bit_identical`.
#[test]
#[ignore]
fn resume_child() {
    let Some((dir, pdir, cfg)) = as_child(CHILD_ENV) else { return };
    // Slow steps so the parent's kill lands in the patch phase.
    let t = Trainer::new(cfg, &pdir, &dir.join("run"), Device::Cpu).unwrap();
    let mut t = t.on_step(|_| std::thread::sleep(std::time::Duration::from_millis(400)));
    t.run(false).unwrap();
}

/// A stop asked for after the `n`-th step.
fn stop_after(n: usize) -> impl FnMut() -> bool {
    let mut asked = 0;
    move || {
        asked += 1;
        asked == n
    }
}

/// A stop asked for between steps (what `pretrain` does on Ctrl-C or SIGTERM) writes that step's
/// checkpoint, even where none was due, and returns naming it; resuming ends where an
/// uninterrupted run ends, bit for bit.
#[test]
fn a_requested_stop_checkpoints_and_resumes_bit_identically() {
    let dir = tempfile::tempdir().unwrap();
    let (_, pdir, mut cfg) = pipeline(dir.path(), 0.5);
    cfg.train.checkpoint_every = 0; // checkpoints only at the phases' ends, or on a stop
    let run_a = dir.path().join("a");
    Trainer::new(cfg.clone(), &pdir, &run_a, Device::Cpu).unwrap().run(false).unwrap();
    let run_b = dir.path().join("b");
    let e = Trainer::new(cfg.clone(), &pdir, &run_b, Device::Cpu).unwrap().stop_when(stop_after(2)).run(false);
    match e {
        Err(TrainError::Stopped { global_step: 2, checkpoint }) => {
            assert_eq!(checkpoint, run_b.join("checkpoints/step-00000002"));
            assert_eq!(list_checkpoints(&run_b).unwrap(), std::slice::from_ref(&checkpoint));
            let e = TrainError::Stopped { global_step: 2, checkpoint }.to_string();
            assert!(e.contains("--resume"), "{e}");
        }
        other => panic!("expected a stop after step 2, got {other:?}"),
    }
    assert!(!run_b.join("model").exists());
    Trainer::new(cfg.clone(), &pdir, &run_b, Device::Cpu).unwrap().run(true).unwrap();
    assert_eq!(weights(&run_a), weights(&run_b), "resumed weights differ from the uninterrupted run");
    // A stop at the phase switch: its checkpoint holds no optimizer state (the token phase
    // starts a fresh one), and the run resumes from it all the same.
    let run_c = dir.path().join("c");
    let e = Trainer::new(cfg.clone(), &pdir, &run_c, Device::Cpu).unwrap().stop_when(stop_after(6)).run(false);
    assert!(matches!(e, Err(TrainError::Stopped { global_step: 6, .. })), "{e:?}");
    let ck = load_checkpoint(&list_checkpoints(&run_c).unwrap().pop().unwrap(), &Device::Cpu).unwrap();
    assert_eq!((ck.state.phase, ck.state.optimizer_step, ck.optimizer.len()), (1, 0, 0));
    Trainer::new(cfg, &pdir, &run_c, Device::Cpu).unwrap().run(true).unwrap();
    assert_eq!(weights(&run_a), weights(&run_c), "resumed at the switch, the weights differ");
}

/// A checkpoint that cannot be written (here a file in the way of its directory; a full disk
/// alike) stops the run with an error that names the checkpoint `--resume` continues from, and
/// leaves no partial checkpoint; a run killed while writing one leaves a temp directory that the
/// next run removes. Resumed, the run ends where an uninterrupted one ends, bit for bit.
#[test]
fn a_checkpoint_that_cannot_be_written_stops_the_run_for_resume() {
    let dir = tempfile::tempdir().unwrap();
    let (pdir, cfg, run_a) = reference_run(dir.path());
    let run_b = dir.path().join("b");
    let cks = run_b.join("checkpoints");
    std::fs::create_dir_all(&cks).unwrap();
    std::fs::write(cks.join("step-00000004"), "in the way").unwrap();
    let e = Trainer::new(cfg.clone(), &pdir, &run_b, Device::Cpu).unwrap().run(false).unwrap_err();
    match &e {
        TrainError::WriteFailed { global_step: 4, resume_from: Some(p), .. } => {
            assert_eq!(*p, cks.join("step-00000003"))
        }
        other => panic!("expected a failed write at step 4, got {other:?}"),
    }
    let msg = e.to_string();
    assert!(msg.starts_with("could not write the checkpoint of step 4: "), "{msg}");
    assert!(msg.contains("--resume to continue from ") && msg.ends_with("step-00000003"), "{msg}");
    assert!(!cks.join("step-00000004.tmp").exists(), "the partial checkpoint was left");
    std::fs::remove_file(cks.join("step-00000004")).unwrap();
    // A kill during a checkpoint's write leaves its temp directory: the next run removes it.
    std::fs::create_dir(cks.join("step-00000009.tmp")).unwrap();
    std::fs::write(cks.join("step-00000009.tmp/model.safetensors"), "partial").unwrap();
    let mut seen = None;
    Trainer::new(cfg, &pdir, &run_b, Device::Cpu)
        .unwrap()
        .on_step(|_| {
            seen.get_or_insert(cks.join("step-00000009.tmp").exists());
        })
        .run(true)
        .unwrap();
    assert_eq!(seen, Some(false), "the killed write's temp directory was not removed");
    assert_eq!(weights(&run_a), weights(&run_b), "resumed weights differ from the uninterrupted run");
}

#[test]
fn kill_and_resume_is_bit_identical() {
    let dir_a = tempfile::tempdir().unwrap();
    let (_, cfg, run_a) = reference_run(dir_a.path());

    // The same run in a child process, killed with SIGKILL during the patch phase.
    let dir_b = tempfile::tempdir().unwrap();
    let mut child = child_test("resume_child", CHILD_ENV, dir_b.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let run_b = dir_b.path().join("run");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    loop {
        let cks = list_checkpoints(&run_b).unwrap_or_default();
        if cks.iter().any(|p| p.ends_with("step-00000003")) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "child made no progress");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    // While the child trains, a second run in its directory is refused, the child named.
    let pdir_b = dir_b.path().join("patchdata");
    let e = Trainer::new(cfg.clone(), &pdir_b, &run_b, Device::Cpu).unwrap().run(true).unwrap_err();
    assert!(matches!(e, TrainError::InUse { pid: Some(p), .. } if p == child.id()), "{e}");
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let cks = list_checkpoints(&run_b).unwrap();
    let last = load_checkpoint(cks.last().unwrap(), &Device::Cpu).unwrap();
    assert_eq!(last.state.phase, 0, "the kill must fall in the patch phase");
    assert!(!run_b.join("model").exists(), "the child must not have finished");

    // Resume in this process (the killed child's claim went with it): it crosses the phase
    // switch and must end bit-identical.
    let s = Trainer::new(cfg, &pdir_b, &run_b, Device::Cpu).unwrap().run(true).unwrap();
    assert_eq!(s.phases[1].steps, 6);
    assert_eq!(weights(&run_a), weights(&run_b), "resumed weights differ from the uninterrupted run");
    // The metrics log has exactly one line per step after the resume.
    let steps = std::fs::read_to_string(run_b.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter(|l| l.contains("\"kind\":\"step\""))
        .count();
    assert_eq!(steps, 12);
}

#[test]
fn bf16_mixed_precision_tracks_the_f32_loss_curve() {
    let dir = tempfile::tempdir().unwrap();
    let (_, pdir, cfg) = pipeline(dir.path(), 0.5);
    let curve = |dtype: &str| -> Vec<f64> {
        let mut c = cfg.clone();
        c.train.dtype = dtype.into();
        let run = dir.path().join(format!("run-{dtype}"));
        Trainer::new(c, &pdir, &run, Device::Cpu).unwrap().run(false).unwrap();
        let (steps, _) = patchlm_train::read_metrics(&run.join("metrics.jsonl")).unwrap();
        steps.iter().map(|s| s.loss).collect()
    };
    let (f, b) = (curve("f32"), curve("bf16"));
    assert_eq!(f.len(), 12);
    for (i, (x, y)) in f.iter().zip(&b).enumerate() {
        assert!((x - y).abs() < 0.03 * x, "step {}: f32 {x} vs bf16 {y}", i + 1);
    }
    assert!(f != b, "bf16 really ran in lower precision");
    // The f32 config's fingerprint does not mention the dtype (configs from before it still match).
    assert!(!toml::to_string(&cfg).unwrap().contains("dtype"));
    let mut bad = cfg.clone();
    bad.train.dtype = "int4".into();
    let e = Trainer::new(bad, &pdir, &dir.path().join("bad"), Device::Cpu).err().unwrap().to_string();
    assert!(e.contains("train.dtype"), "{e}");
}

#[test]
fn accumulating_micro_batches_trains_as_one_batch() {
    // A step's blocks in one micro-batch, or in micro-batches of 3 (patch phase: 3 + 1 of its
    // 4 blocks; token phase: 5 × 3 + 1 of 16), weighted by size: the same losses, gradient norms
    // and weights, up to f32 summation order (which AdamW amplifies where a gradient is near 0).
    let dir = tempfile::tempdir().unwrap();
    let (_, pdir, cfg) = pipeline(dir.path(), 0.5);
    let mut runs = Vec::new();
    for mb in [16, 3] {
        let mut c = cfg.clone();
        c.train.micro_batch = mb;
        let run = dir.path().join(format!("run-mb{mb}"));
        Trainer::new(c, &pdir, &run, Device::Cpu).unwrap().run(false).unwrap();
        let (steps, _) = read_metrics(&run.join("metrics.jsonl")).unwrap();
        let w = candle_core::safetensors::load(run.join("model/model.safetensors"), &Device::Cpu).unwrap();
        runs.push((steps, w));
    }
    let ((a, wa), (b, wb)) = (&runs[0], &runs[1]);
    assert_eq!((a.len(), b.len()), (12, 12));
    for (x, y) in a.iter().zip(b) {
        let s = x.global_step;
        assert!((x.loss - y.loss).abs() <= 1e-5 * x.loss, "step {s}: loss {} vs {}", x.loss, y.loss);
        assert!(
            (x.grad_norm - y.grad_norm).abs() <= 1e-4 * x.grad_norm,
            "step {s}: {} vs {}",
            x.grad_norm,
            y.grad_norm
        );
    }
    for (name, x) in wa {
        let y = &wb[name];
        let d = (x - y).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        let m = y.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(d <= 1e-3 * m, "{name}: final weights differ by {d} (max {m})");
    }
}

/// A run's summary serializes whatever its directory's name (`summary.json`; serde refuses a
/// path that is not UTF-8, and xtask panicked writing it).
#[cfg(unix)]
#[test]
fn a_summary_of_a_run_in_a_directory_not_named_in_utf8_serializes() {
    use std::os::unix::ffi::OsStrExt;
    let s = patchlm_train::RunSummary {
        phases: Vec::new(),
        tokens: 1,
        flops: 1.0,
        relative_cost: 1.0,
        val_loss: 1.0,
        val_ppl: 1.0f64.exp(),
        train_secs: 1.0,
        model_dir: Path::new(std::ffi::OsStr::from_bytes(b"r\xe9")).join("model"),
    };
    let json = serde_json::to_string(&s).unwrap();
    assert!(json.contains("\"model_dir\":\"r\u{fffd}/model\""), "{json}");
    let back: patchlm_train::RunSummary = serde_json::from_str(&json).unwrap();
    assert_eq!(back.tokens, 1);
}

#[test]
fn a_run_directory_is_claimed_again_after_a_claim_ends() {
    let dir = tempfile::tempdir().unwrap();
    drop(RunLock::acquire(dir.path()).unwrap());
    // A claim ended, then one held: a third claim from this process shares the held one (and is
    // not refused by the lock this process holds).
    let held = RunLock::acquire(dir.path()).unwrap();
    let again = RunLock::acquire(dir.path()).unwrap();
    drop(held);
    assert!(patchlm_train::lock::is_held(dir.path()));
    drop(again);
}

#[test]
fn bf16_is_kept_in_the_saved_config_and_f32_is_left_out() {
    let f32_cfg = RunConfig::default();
    assert_eq!(f32_cfg.train.dtype, "f32");
    let bf16 = RunConfig { train: TrainConfig { dtype: "bf16".into(), ..f32_cfg.train.clone() }, ..f32_cfg.clone() };
    let text = |c: &RunConfig| serde_json::to_value(c).unwrap()["train"].clone();
    assert_eq!(text(&bf16)["dtype"], "bf16");
    assert!(text(&f32_cfg).get("dtype").is_none(), "{}", text(&f32_cfg));
    assert_ne!(bf16.fingerprint(), f32_cfg.fingerprint());
}

const STATUS_CHILD_ENV: &str = "PATCHLM_STATUS_CHILD_DIR";

/// Not a test on its own: the child process of `status_lines_in_a_batch_log_follow_the_settings`.
#[test]
#[ignore]
fn status_child() {
    let Some((dir, pdir, mut cfg)) = as_child(STATUS_CHILD_ENV) else { return };
    cfg.train.progress = std::env::var("PATCHLM_STATUS_CHILD_PROGRESS").as_deref() == Ok("1");
    Trainer::new(cfg, &pdir, &dir.join("run"), Device::Cpu).unwrap().run(false).unwrap();
}

/// Where stderr is no terminal (a batch job's log), training writes a line at each validation,
/// and a step line each PATCHLM_LOG_SECS; with `progress = false`, nothing.
#[test]
fn status_lines_in_a_batch_log_follow_the_settings() {
    let run = |progress: bool, log_secs: Option<&str>| -> (Vec<String>, Vec<f64>, Vec<(String, usize)>) {
        let dir = tempfile::tempdir().unwrap();
        let mut cmd = child_test("status_child", STATUS_CHILD_ENV, dir.path());
        cmd.env("PATCHLM_STATUS_CHILD_PROGRESS", if progress { "1" } else { "0" })
            .env_remove(patchlm_data::progress::LOG_SECS_ENV);
        if let Some(s) = log_secs {
            cmd.env(patchlm_data::progress::LOG_SECS_ENV, s);
        }
        let out = cmd.output().unwrap();
        let err = String::from_utf8(out.stderr).unwrap();
        assert!(out.status.success(), "{err}");
        let lines = err.lines().filter(|l| l.contains(" step ")).map(str::to_string).collect();
        let (steps, evals) = patchlm_train::read_metrics(&dir.path().join("run/metrics.jsonl")).unwrap();
        (
            lines,
            evals.iter().map(|e| e.val_loss).collect(),
            steps.iter().map(|s| (s.phase.clone(), s.global_step)).collect(),
        )
    };
    let (lines, val_losses, steps) = run(true, Some("0"));
    // Every validation, the first one before any step included, with the loss metrics.jsonl has.
    let val_lines: Vec<&String> = lines.iter().filter(|l| l.contains(": validation loss ")).collect();
    assert_eq!(val_lines.len(), val_losses.len(), "{lines:#?}");
    for (l, v) in val_lines.iter().zip(&val_losses) {
        assert!(l.contains(&format!("validation loss {v:.4}")), "{l}");
    }
    assert!(val_lines[0].starts_with("patch step      0/6 (0:00:00): validation loss "), "{}", val_lines[0]);
    // A line at every step (PATCHLM_LOG_SECS=0): where each phase stands, and the time as h:mm:ss.
    let step_lines: Vec<&String> = lines.iter().filter(|l| l.contains(": loss ")).collect();
    assert_eq!(step_lines.len(), steps.len(), "{lines:#?}");
    for (i, (l, (phase, _))) in step_lines.iter().zip(&steps).enumerate() {
        let prefix = format!("{phase:>5} step {:>6}/6 (", i % 6 + 1);
        assert!(l.starts_with(&prefix), "{l} (wanted {prefix})");
        let time = &l[prefix.len()..l.find(')').unwrap()];
        let parts: Vec<&str> = time.split(':').collect();
        assert!(parts.len() == 3 && parts[1].len() == 2 && parts[2].len() == 2, "{l}");
        assert!(parts.iter().all(|p| p.parse::<u64>().is_ok()), "{l}");
        assert!(l.contains(" tokens/s, phase eta 0:00:"), "{l}");
    }
    // The default interval (a minute) is longer than this run: validations only.
    let (lines, val_losses, _) = run(true, None);
    assert_eq!(lines.len(), val_losses.len(), "{lines:#?}");
    assert!(lines.iter().all(|l| l.contains(": validation loss ")), "{lines:#?}");
    // Asked for no progress: no lines.
    let (lines, _, _) = run(false, Some("0"));
    assert!(lines.is_empty(), "{lines:#?}");
}

/// The validation loss is the mean next-token loss over every validation block, the last
/// micro-batch short or not: the final one logged equals the saved model's loss computed here a
/// block at a time.
#[test]
fn validation_loss_is_the_mean_over_every_validation_block() {
    let dir = tempfile::tempdir().unwrap();
    let (shards, _, mut cfg) = pipeline(dir.path(), 0.5);
    // Seven validation blocks in micro-batches of two: the last holds one block.
    let pdir = dir.path().join("seven");
    let blocks = patchlm_patch::PatchDataConfig { max_val_blocks: 7, ..cfg.blocks.clone() };
    let m = patchlm_patch::build_patch_datasets(&shards, &pdir, &cfg.patch, &blocks).unwrap();
    assert_eq!((m.val.blocks, cfg.train.micro_batch), (7, 2));
    cfg.train.max_steps_per_phase = 2;
    let run = dir.path().join("run");
    let s = Trainer::new(cfg, &pdir, &run, Device::Cpu).unwrap().run(false).unwrap();
    let (model, _) = patchlm_model::load_pretrained(&run.join("model"), &Device::Cpu, DType::F32).unwrap();
    let val = patchlm_patch::BlockReader::open(&pdir, &m.val).unwrap();
    let mut buf = Vec::new();
    let mut sum = 0.0;
    for b in 0..7 {
        val.read_blocks(b, 1, &mut buf);
        let ids = Tensor::from_vec(buf.clone(), (1, 9), &Device::Cpu).unwrap();
        sum += patchlm_patch::patch_loss(&model, &ids, 1).unwrap().to_scalar::<f32>().unwrap() as f64;
    }
    let want = sum / 7.0;
    let (_, evals) = patchlm_train::read_metrics(&run.join("metrics.jsonl")).unwrap();
    let logged = evals.last().unwrap().val_loss;
    assert!((logged - want).abs() < 1e-5 * want, "logged {logged}, computed {want}");
    assert_eq!(s.val_loss, logged);
}

/// Validations and checkpoints come every so many steps, and at each phase's end; with 0, only
/// there (validation also before the first step).
#[test]
fn validations_and_checkpoints_come_when_asked() {
    let dir = tempfile::tempdir().unwrap();
    let (_, pdir, cfg) = pipeline(dir.path(), 0.5);
    for (i, (eval_every, checkpoint_every, evals, cks)) in
        [(5, 4, vec![0, 5, 6, 10, 12], vec![4, 6, 8, 12]), (0, 0, vec![0, 6, 12], vec![6, 12])].into_iter().enumerate()
    {
        let mut c = cfg.clone();
        (c.train.eval_every, c.train.checkpoint_every, c.train.keep_checkpoints) = (eval_every, checkpoint_every, 100);
        let run = dir.path().join(format!("run{i}"));
        Trainer::new(c, &pdir, &run, Device::Cpu).unwrap().run(false).unwrap();
        let (_, ev) = patchlm_train::read_metrics(&run.join("metrics.jsonl")).unwrap();
        assert_eq!(ev.iter().map(|e| e.global_step).collect::<Vec<_>>(), evals);
        let names: Vec<String> = list_checkpoints(&run)
            .unwrap()
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        let want: Vec<String> = cks.iter().map(|n| format!("step-{n:08}")).collect();
        assert_eq!(names, want);
    }
}

/// Each step trains on the next blocks of its phase's file: a step's logged loss is the loss of
/// the checkpoint before it on those blocks (patch step 2 on patch blocks 4..8, token step 2 on
/// token blocks 16..32).
#[test]
fn each_step_reads_the_next_blocks() {
    let dir = tempfile::tempdir().unwrap();
    let (_, pdir, mut cfg) = pipeline(dir.path(), 0.5);
    cfg.train.keep_checkpoints = 100;
    let run = dir.path().join("run");
    let mut tr = Trainer::new(cfg, &pdir, &run, Device::Cpu).unwrap();
    let plans = tr.plans().to_vec();
    tr.run(false).unwrap();
    let (steps, _) = patchlm_train::read_metrics(&run.join("metrics.jsonl")).unwrap();
    for (global, plan, first) in [(2, &plans[0], 4), (8, &plans[1], 16)] {
        let before = run.join(format!("checkpoints/step-{:08}", global - 1));
        let (model, _) = patchlm_model::load_pretrained(&before, &Device::Cpu, DType::F32).unwrap();
        let blocks = patchlm_patch::BlockReader::open(&pdir, &plan.file).unwrap();
        let mut buf = Vec::new();
        blocks.read_blocks(first, plan.blocks_per_step, &mut buf);
        let ids = Tensor::from_vec(buf, (plan.blocks_per_step, plan.file.block_len), &Device::Cpu).unwrap();
        let want = patchlm_patch::patch_loss(&model, &ids, plan.k).unwrap().to_scalar::<f32>().unwrap() as f64;
        let got = steps[global - 1].loss;
        assert!((got - want).abs() < 1e-5 * want, "step {global}: logged {got}, blocks {first}.. give {want}");
    }
}
