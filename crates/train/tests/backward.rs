//! Training through the model's hand-written backward pass (the default) and through candle's
//! autograd give the same run: per-step losses, gradient norms and final weights. In its own test
//! binary because it flips the process-wide `set_tape_backward` switch.

#![allow(clippy::unwrap_used)]

use candle_core::Device;
use patchlm_model::set_tape_backward;
use patchlm_train::{read_metrics, Trainer};

mod common;

#[test]
fn tape_and_autograd_train_the_same_run() {
    let dir = tempfile::tempdir().unwrap();
    let (_, pdir, cfg) = common::pipeline(dir.path(), 0.5);
    let mut runs = Vec::new();
    for tape in [true, false] {
        set_tape_backward(tape);
        let run = dir.path().join(format!("run-tape-{tape}"));
        Trainer::new(cfg.clone(), &pdir, &run, Device::Cpu).unwrap().run(false).unwrap();
        let (steps, _) = read_metrics(&run.join("metrics.jsonl")).unwrap();
        let w = candle_core::safetensors::load(run.join("model/model.safetensors"), &Device::Cpu).unwrap();
        runs.push((steps, w));
    }
    set_tape_backward(true);
    let ((a, wa), (b, wb)) = (&runs[0], &runs[1]);
    assert_eq!(a.len(), 12);
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(b) {
        let s = x.global_step;
        assert!((x.loss - y.loss).abs() <= 1e-4 * x.loss, "step {s}: loss {} (tape) vs {} (autograd)", x.loss, y.loss);
        let (gx, gy) = (x.grad_norm, y.grad_norm);
        assert!((gx - gy).abs() <= 1e-3 * gy, "step {s}: grad norm {gx} (tape) vs {gy} (autograd)");
    }
    assert_eq!(wa.len(), wb.len());
    for (name, x) in wa {
        let y = &wb[name];
        let d = (x - y).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        let m = y.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(d <= 1e-3 * m, "{name}: final weights differ by {d} (max {m})");
    }
}
