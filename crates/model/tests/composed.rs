//! The whole model with the fused ops (materialised attention with the fused softmax, and flash
//! attention) against the same model built from composed candle ops, in f32 and with bf16
//! compute: loss and every parameter's gradient. In its own test binary because it flips the
//! process-wide `set_fused_ops` / `set_flash_attention` switches.

#![allow(clippy::unwrap_used)]

use candle_core::{DType, Device, Tensor};
use patchlm_model::ops::{
    ce_lse_supported, flash_attention_enabled, flash_attention_for, layout_ops_supported, set_flash_attention,
    set_fused_ops, set_layout_cuda, set_rows_cuda, set_swiglu_cuda, swiglu_supported,
};
use patchlm_model::*;
use std::sync::Mutex;

/// Held by each test here while it flips the switches.
static SWITCHES: Mutex<()> = Mutex::new(());

#[test]
fn fused_and_composed_models_agree_in_f32_and_bf16() {
    let _switches = SWITCHES.lock().unwrap_or_else(|e| e.into_inner());
    let dev = Device::Cpu;
    let mut cfg = ModelConfig::preset("tiny").unwrap();
    cfg.num_key_value_heads = 1; // grouped-query attention too
    let (model, varmap) = init_model(&cfg, &dev, 5).unwrap();
    let ids: Vec<u32> = (0..2 * 17).map(|i| (i * 53 % cfg.vocab_size) as u32).collect();
    let ids = Tensor::from_vec(ids, (2, 17), &dev).unwrap();
    let targets = ids.narrow(1, 1, 16).unwrap().reshape((32, 1)).unwrap();
    for (dtype, tol) in [(DType::F32, 1e-4f32), (DType::BF16, 3e-2)] {
        let m = model.clone().with_compute_dtype(dtype);
        let mut runs = Vec::new();
        // (fused ops, flash attention): the composed run is last, the reference.
        for (fused, flash) in [(true, false), (true, true), (false, false)] {
            set_fused_ops(fused);
            set_flash_attention(flash);
            // As set: the switch, not a default, decides (the runs would agree either way).
            let head_dim = cfg.hidden_size / cfg.num_attention_heads;
            assert_eq!(flash_attention_for(&dev, dtype, head_dim), flash, "{dtype:?}");
            assert_eq!(flash_attention_enabled(&dev), flash);
            let logits = m.forward(&ids.narrow(1, 0, 16).unwrap()).unwrap();
            let logits = logits.to_dtype(DType::F32).unwrap().reshape((32, cfg.vocab_size)).unwrap();
            // The composed loss: log-softmax and a gather, in f32.
            let lse = logits.exp().unwrap().sum_keepdim(1).unwrap().log().unwrap();
            let picked = logits.gather(&targets, 1).unwrap();
            let loss = (lse - picked).unwrap().mean_all().unwrap();
            let grads = loss.backward().unwrap();
            runs.push((loss.to_scalar::<f32>().unwrap(), grads));
        }
        set_fused_ops(true);
        set_flash_attention(false);
        let (lb, gb) = &runs[2];
        for (which, (la, ga)) in ["fused", "flash"].iter().zip(&runs[..2]) {
            assert!((la - lb).abs() < tol * la.abs(), "{dtype:?}: loss {la} ({which}) vs {lb} (composed)");
            for v in varmap.all_vars() {
                let (x, y) = (ga.get(v.as_tensor()).unwrap(), gb.get(v.as_tensor()).unwrap());
                let diff = (x - y).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap();
                let scale = y.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
                let diff = diff.to_scalar::<f32>().unwrap();
                assert!(scale > 0.0, "{dtype:?}: a zero gradient for {:?}", v.dims());
                assert!(
                    diff <= tol * 10.0 * scale,
                    "{dtype:?} {which}: gradient of {:?} differs by {diff} (max {scale})",
                    v.dims()
                );
            }
        }
    }
}

#[test]
fn the_lse_loss_swiglu_and_layout_ops_run_fused_on_the_cpu_with_the_fused_ops_whatever_the_cuda_switches() {
    let _switches = SWITCHES.lock().unwrap_or_else(|e| e.into_inner());
    let cpu = Device::Cpu;
    let all = || [ce_lse_supported(&cpu), swiglu_supported(&cpu), layout_ops_supported(&cpu)];
    assert_eq!(all(), [true; 3]);
    // The CUDA kernels' switches say nothing about the CPU.
    set_rows_cuda(false);
    set_swiglu_cuda(false);
    set_layout_cuda(false);
    assert_eq!(all(), [true; 3]);
    set_rows_cuda(true);
    set_swiglu_cuda(true);
    set_layout_cuda(true);
    set_fused_ops(false);
    assert_eq!(all(), [false; 3]);
    set_fused_ops(true);
}
