//! The CUDA kernels (kernels/fused.cu) against their CPU twins on random inputs (the CPU twins
//! are themselves tested against references in tests/model.rs and the train crate). Needs the `cuda`
//! feature and a GPU, so the tests are `#[ignore]`d: `scripts/gpu_check.sh` runs them on the
//! device with `--ignored`.

#![cfg(feature = "cuda")]
#![allow(clippy::unwrap_used)]

mod common;
use candle_core::{DType, Device, Tensor, Var};
use common::max_rel;
use patchlm_model::ops::{adamw_multi, adamw_update, rms_norm, sum_of_squares, AdamWSlot, AdamWStep};
use patchlm_model::{
    causal_softmax, cross_entropy_multi, embedding, flash_attention, fused_ops_supported, ops, rope, swiglu, SplitMix64,
};

fn gpu() -> Device {
    // As the CLI gets it (one shared device, event tracking off).
    let d = patchlm_model::parse_device("cuda").expect("these tests need a CUDA GPU");
    assert!(fused_ops_supported(&d));
    d
}

#[test]
#[ignore]
fn cuda_cross_entropy_matches_cpu() {
    let g = gpu();
    let mut rng = SplitMix64(5);
    for (n, v, k) in [(64usize, 50304usize, 1usize), (33, 8192, 4), (7, 1000, 8)] {
        for (dtype, tol) in [(DType::F32, 1e-4f32), (DType::BF16, 1e-2)] {
            let x = Tensor::randn(0f32, 3.0, (n, v), &Device::Cpu).unwrap().to_dtype(dtype).unwrap();
            let t: Vec<u32> = (0..n * k).map(|_| (rng.next_u64() % v as u64) as u32).collect();
            let t = Tensor::from_vec(t, (n, k), &Device::Cpu).unwrap();
            let xc = Var::from_tensor(&x).unwrap();
            let xg = Var::from_tensor(&x.to_device(&g).unwrap()).unwrap();
            let lc = cross_entropy_multi(xc.as_tensor(), &t).unwrap();
            let lg = cross_entropy_multi(xg.as_tensor(), &t.to_device(&g).unwrap()).unwrap();
            let e = max_rel(&lg, &lc);
            assert!(e < tol, "loss n={n} v={v} k={k} {dtype:?}: rel err {e}");
            let gc = lc.backward().unwrap();
            let gg = lg.backward().unwrap();
            let e = max_rel(gg.get(xg.as_tensor()).unwrap(), gc.get(xc.as_tensor()).unwrap());
            assert!(e < tol * 10.0, "grad n={n} v={v} k={k} {dtype:?}: rel err {e}");
            // The log-sum-exp-keeping kernels (PATCHLM_ROWS_CUDA); an odd vocabulary (37, 1001)
            // takes their element-by-element tail, a row offset of 1 their unaligned path.
            patchlm_model::ops::set_rows_cuda(true);
            let tv: Vec<u32> = t.flatten_all().unwrap().to_vec1().unwrap();
            for (xs, what) in [(x.clone(), "aligned"), (x.narrow(1, 1, v - 1).unwrap().contiguous().unwrap(), "odd")] {
                let w = xs.dim(1).unwrap() as u32;
                let ts =
                    Tensor::from_vec(tv.iter().map(|&id| id % w).collect::<Vec<u32>>(), (n, k), &Device::Cpu).unwrap();
                let (lc, sc) = ops::cross_entropy_multi_lse(&xs, &ts).unwrap();
                let (xsg, tsg) = (xs.to_device(&g).unwrap(), ts.to_device(&g).unwrap());
                let (lg, sg) = ops::cross_entropy_multi_lse(&xsg, &tsg).unwrap();
                assert!(max_rel(&lg, &lc) < tol, "lse loss {what} n={n} v={v} k={k} {dtype:?}");
                assert!(max_rel(&sg, &sc) < 1e-5, "lse rows {what} n={n} v={v} k={k} {dtype:?}");
                let dc = ops::grad::cross_entropy_multi_lse(&xs, &ts, &sc, 0.7).unwrap();
                let dg = ops::grad::cross_entropy_multi_lse(&xsg, &tsg, &sg, 0.7).unwrap();
                let e = max_rel(&dg, &dc);
                assert!(e < tol * 10.0, "lse grad {what} n={n} v={v} k={k} {dtype:?}: rel err {e}");
                // Rows that start off a 16-byte boundary: a view one row in.
                if n > 1 {
                    let xo = xsg.narrow(0, 1, n - 1).unwrap();
                    let to = tsg.narrow(0, 1, n - 1).unwrap();
                    let (_, so) = ops::cross_entropy_multi_lse(&xo, &to).unwrap();
                    assert!(max_rel(&so, &sc.narrow(0, 1, n - 1).unwrap()) < 1e-5, "lse rows at an offset {what}");
                }
            }
            patchlm_model::ops::set_rows_cuda(false);
        }
    }
}

/// A target id outside the vocabulary: refused on the CPU; on CUDA (nothing checks ids on the
/// host) the loss is NaN and the gradient has no entry for it, the row's other entries as the CPU
/// gives them with that target left out. Both kernel pairs (PATCHLM_ROWS_CUDA off and on).
#[test]
#[ignore]
fn cuda_cross_entropy_target_outside_the_vocabulary_is_nan() {
    let g = gpu();
    let (n, v) = (4usize, 1000usize);
    let x = Tensor::randn(0f32, 3.0, (n, v), &Device::Cpu).unwrap();
    let bad = Tensor::new(&[[3u32, 9], [v as u32, 7], [2, 2], [11, 999]], &Device::Cpu).unwrap();
    assert!(cross_entropy_multi(&x, &bad).is_err(), "the CPU refuses the id");
    // The reference gradient: the CPU's with the bad target swapped for a copy of the row's
    // other one, less that copy's −1/(N·K) entry.
    let swapped = Tensor::new(&[[3u32, 9], [7, 7], [2, 2], [11, 999]], &Device::Cpu).unwrap();
    let xc = Var::from_tensor(&x).unwrap();
    let want = cross_entropy_multi(xc.as_tensor(), &swapped).unwrap().backward().unwrap();
    let mut want = want.get(xc.as_tensor()).unwrap().to_vec2::<f32>().unwrap();
    want[1][7] += 1.0 / (n * 2) as f32;
    let want = Tensor::new(want, &Device::Cpu).unwrap();
    for rows in [false, true] {
        patchlm_model::ops::set_rows_cuda(rows);
        let xg = Var::from_tensor(&x.to_device(&g).unwrap()).unwrap();
        let loss = cross_entropy_multi(xg.as_tensor(), &bad.to_device(&g).unwrap()).unwrap();
        let lv = loss.to_scalar::<f32>().unwrap();
        assert!(lv.is_nan(), "rows kernels {rows}: loss {lv}, not NaN");
        let grads = loss.backward().unwrap();
        let e = max_rel(grads.get(xg.as_tensor()).unwrap(), &want);
        assert!(e < 1e-4, "rows kernels {rows}: gradient rel err {e}");
    }
    patchlm_model::ops::set_rows_cuda(false);
}

#[test]
#[ignore]
fn cuda_rms_norm_matches_cpu() {
    let g = gpu();
    // Both kernel families: block per row, then warp per row (PATCHLM_ROWS_CUDA).
    for ((n, d), warp) in
        [(333usize, 768usize), (64, 1024), (5, 100), (9, 3000)].into_iter().flat_map(|s| [(s, false), (s, true)])
    {
        patchlm_model::ops::set_rows_cuda(warp);
        for (dtype, tol) in [(DType::F32, 1e-4f32), (DType::BF16, 2e-2)] {
            let x = Tensor::randn(0f32, 1.0, (n, d), &Device::Cpu).unwrap().to_dtype(dtype).unwrap();
            let w = Tensor::randn(1f32, 0.2, d, &Device::Cpu).unwrap().to_dtype(dtype).unwrap();
            let up = Tensor::randn(0f32, 1.0, (n, d), &Device::Cpu).unwrap().to_dtype(dtype).unwrap();
            let (xc, wc) = (Var::from_tensor(&x).unwrap(), Var::from_tensor(&w).unwrap());
            let xg = Var::from_tensor(&x.to_device(&g).unwrap()).unwrap();
            let wg = Var::from_tensor(&w.to_device(&g).unwrap()).unwrap();
            let yc = rms_norm(xc.as_tensor(), wc.as_tensor(), 1e-5).unwrap();
            let yg = rms_norm(xg.as_tensor(), wg.as_tensor(), 1e-5).unwrap();
            assert!(max_rel(&yg, &yc) < tol, "forward n={n} d={d} {dtype:?} warp {warp}");
            let gc = (&yc * &up).unwrap().sum_all().unwrap().backward().unwrap();
            let gg = (&yg * &up.to_device(&g).unwrap()).unwrap().sum_all().unwrap().backward().unwrap();
            for (name, c, gv) in [("x", &xc, &xg), ("weight", &wc, &wg)] {
                let e = max_rel(gg.get(gv.as_tensor()).unwrap(), gc.get(c.as_tensor()).unwrap());
                assert!(e < tol * 5.0, "d{name} n={n} d={d} {dtype:?} warp {warp}: rel err {e}");
            }
            // The residual add fused into the norm, and the backward with a residual gradient
            // (warp-per-row kernels; without them, separate adds).
            let b = Tensor::randn(0f32, 1.0, (n, d), &Device::Cpu).unwrap().to_dtype(dtype).unwrap();
            let to = |t: &Tensor| t.to_device(&g).unwrap();
            let (sc, yc) = patchlm_model::ops::add_rms_norm(&x, &b, &w, 1e-5).unwrap();
            let (sg, yg) = patchlm_model::ops::add_rms_norm(&to(&x), &to(&b), &to(&w), 1e-5).unwrap();
            assert!(
                max_rel(&sg, &sc) < tol && max_rel(&yg, &yc) < tol,
                "add_rms_norm n={n} d={d} {dtype:?} warp {warp}"
            );
            let rc = patchlm_model::ops::grad::rms_norm_residual(&sc, &w, &up, &b, 1e-5).unwrap();
            let rg = patchlm_model::ops::grad::rms_norm_residual(&to(&sc), &to(&w), &to(&up), &to(&b), 1e-5).unwrap();
            assert!(max_rel(&rg.0, &rc.0) < tol * 5.0, "residual dx n={n} d={d} {dtype:?} warp {warp}");
            assert!(max_rel(&rg.1, &rc.1) < tol * 5.0, "residual dw n={n} d={d} {dtype:?} warp {warp}");
        }
    }
    patchlm_model::ops::set_rows_cuda(false);
}

/// Forward and gradient of `op` on the GPU against the CPU, with a random upstream gradient.
fn check_unary(name: &str, x: &Tensor, tol: f32, op: impl Fn(&Tensor) -> Tensor) {
    let g = gpu();
    let xc = Var::from_tensor(x).unwrap();
    let xg = Var::from_tensor(&x.to_device(&g).unwrap()).unwrap();
    let (yc, yg) = (op(xc.as_tensor()), op(xg.as_tensor()));
    assert_eq!(yc.dims(), yg.dims());
    let e = max_rel(&yg, &yc);
    assert!(e < tol, "{name} forward: rel err {e}");
    let up = Tensor::randn(0f32, 1.0, yc.dims(), &Device::Cpu).unwrap().to_dtype(yc.dtype()).unwrap();
    let gc = (&yc * &up).unwrap().to_dtype(DType::F32).unwrap().sum_all().unwrap().backward().unwrap();
    let upg = up.to_device(&g).unwrap();
    let gg = (&yg * &upg).unwrap().to_dtype(DType::F32).unwrap().sum_all().unwrap().backward().unwrap();
    let e = max_rel(gg.get(xg.as_tensor()).unwrap(), gc.get(xc.as_tensor()).unwrap());
    assert!(e < tol * 5.0, "{name} gradient: rel err {e}");
}

#[test]
#[ignore]
fn cuda_causal_softmax_matches_cpu() {
    // (b, h, t, s): square, unaligned rows, long rows, one query, and queries that are the last
    // t of s keys (the blocks of chunked attention) with aligned and unaligned rows.
    let shapes = [
        (2usize, 3usize, 128usize, 128usize),
        (1, 2, 5, 37),
        (1, 4, 1024, 1024),
        (2, 1, 1, 9),
        (1, 3, 7, 7),
        (2, 2, 64, 256),
        (1, 2, 333, 1000),
    ];
    for ((b, h, t, s), warp) in shapes.into_iter().flat_map(|s| [(s, false), (s, true)]) {
        patchlm_model::ops::set_rows_cuda(warp);
        for (dtype, tol) in [(DType::F32, 1e-5f32), (DType::BF16, 1e-2)] {
            let x = Tensor::randn(0f32, 3.0, (b, h, t, s), &Device::Cpu).unwrap().to_dtype(dtype).unwrap();
            check_unary(&format!("causal_softmax {b}x{h}x{t}x{s} {dtype:?} warp {warp}"), &x, tol, |x| {
                causal_softmax(x, 0.125).unwrap()
            });
        }
    }
    patchlm_model::ops::set_rows_cuda(false);
}

#[test]
#[ignore]
fn cuda_rope_matches_cpu() {
    for (b, h, t, hd) in [(2usize, 12usize, 1024usize, 64usize), (1, 3, 7, 16)] {
        let cos = Tensor::randn(0f32, 1.0, (t, hd), &Device::Cpu).unwrap();
        let sin = Tensor::randn(0f32, 1.0, (t, hd), &Device::Cpu).unwrap();
        for (dtype, tol) in [(DType::F32, 1e-5f32), (DType::BF16, 1e-2)] {
            let x = Tensor::randn(0f32, 1.0, (b, h, t, hd), &Device::Cpu).unwrap().to_dtype(dtype).unwrap();
            check_unary(&format!("rope {b}x{h}x{t}x{hd} {dtype:?}"), &x, tol, |x| {
                let d = x.device();
                rope(x, &cos.to_device(d).unwrap(), &sin.to_device(d).unwrap()).unwrap()
            });
        }
    }
}

#[test]
#[ignore]
fn cuda_embedding_matches_cpu() {
    embedding_matches_cpu();
}

/// The same with the backward that groups the ids instead of adding with float atomics
/// (PATCHLM_EMBEDDING_SORTED); named apart so that `gpu_check.sh` runs it in a process of its own
/// and its verdict decides that switch alone.
#[test]
#[ignore]
fn cuda_sorted_embedding_matches_cpu() {
    ops::set_embedding_sorted(true);
    embedding_matches_cpu();
    ops::set_embedding_sorted(false);
}

fn embedding_matches_cpu() {
    let mut rng = SplitMix64(7);
    for (v, d, n) in [(50304usize, 768usize, 8192usize), (100, 33, 500)] {
        // Skewed ids (many repeats), as in text.
        let ids: Vec<u32> = (0..n).map(|_| ((rng.next_u64() % v as u64) as f64).sqrt() as u32).collect();
        let ids = Tensor::from_vec(ids, (4, n / 4), &Device::Cpu).unwrap();
        for (dtype, tol) in [(DType::F32, 1e-5f32), (DType::BF16, 1e-2)] {
            let w = Tensor::randn(0f32, 1.0, (v, d), &Device::Cpu).unwrap().to_dtype(dtype).unwrap();
            check_unary(&format!("embedding {v}x{d} n={n} {dtype:?}"), &w, tol, |w| {
                embedding(w, &ids.to_device(w.device()).unwrap()).unwrap()
            });
            // The mean over bags of 4 consecutive ids (the patch embedding at K = 4).
            check_unary(&format!("embedding_mean k=4 {v}x{d} n={n} {dtype:?}"), &w, tol, |w| {
                ops::embedding_mean(w, &ids.to_device(w.device()).unwrap(), 4).unwrap()
            });
        }
    }
}

#[test]
#[ignore]
fn cuda_adamw_matches_cpu() {
    let g = gpu();
    let n = 1_000_003usize;
    let p = Tensor::randn(0f32, 1.0, n, &Device::Cpu).unwrap();
    let gr = Tensor::randn(0f32, 0.1, n, &Device::Cpu).unwrap();
    let mv = (Tensor::randn(0f32, 0.01, (2, n), &Device::Cpu).unwrap().abs().unwrap() * 0.5).unwrap();
    let h = AdamWStep { lr: 3e-4, beta1: 0.9, beta2: 0.95, eps: 1e-8, decay: 1.0 - 3e-5, bias1: 0.19, bias2: 0.0975 };
    let (pc, mc) = adamw_update(&p, &gr, &mv, &h).unwrap();
    let (pg, mg) =
        adamw_update(&p.to_device(&g).unwrap(), &gr.to_device(&g).unwrap(), &mv.to_device(&g).unwrap(), &h).unwrap();
    assert!(max_rel(&mg, &mc) < 1e-6, "moments");
    let dp = |a: &Tensor| (a - &p).unwrap();
    let e = max_rel(&dp(&pg.to_device(&Device::Cpu).unwrap()), &dp(&pc));
    assert!(e < 1e-3, "parameter update: rel err {e}");
}

/// Parameters for the multi-tensor tests: sizes around the 16384-element chunks, a matrix whose
/// gradient is a transposed (non-contiguous) view. (Empty tensors in the block table are covered
/// by the unit test of `launch::multi_table`.)
fn multi_inputs() -> Vec<(Tensor, Tensor, Tensor, bool)> {
    let shapes: [&[usize]; 6] = [&[1], &[16384], &[16385], &[300, 257], &[100_003], &[7, 3]];
    shapes
        .iter()
        .enumerate()
        .map(|(i, sh)| {
            let p = Tensor::randn(0f32, 1.0, *sh, &Device::Cpu).unwrap();
            let gr = if sh.len() == 2 {
                Tensor::randn(0f32, 0.1, (sh[1], sh[0]), &Device::Cpu).unwrap().t().unwrap()
            } else {
                Tensor::randn(0f32, 0.1, *sh, &Device::Cpu).unwrap()
            };
            let n = p.elem_count();
            let mv = (Tensor::randn(0f32, 0.01, (2, n), &Device::Cpu).unwrap().abs().unwrap() * 0.5).unwrap();
            (p, gr, mv, i % 2 == 0)
        })
        .collect()
}

#[test]
#[ignore]
fn cuda_multi_tensor_adamw_matches_cpu() {
    let g = gpu();
    patchlm_model::ops::set_multi_tensor_cuda(true);
    let h = AdamWStep { lr: 3e-4, beta1: 0.9, beta2: 0.95, eps: 1e-8, decay: 1.0 - 3e-5, bias1: 0.19, bias2: 0.0975 };
    let inputs = multi_inputs();
    // `clip`: clipped to norm 0.5 by `adamw_multi_clipped`, the norm computed by the kernel on
    // the GPU (ops::set_device_clip) and read by the host on the CPU; else a given factor.
    patchlm_model::ops::set_device_clip(true);
    let run = |d: &Device, clip: bool| {
        let vars: Vec<Var> = inputs.iter().map(|(p, ..)| Var::from_tensor(&p.to_device(d).unwrap()).unwrap()).collect();
        // Every third gradient in bf16 (read as it is by the kernel, cast on the CPU).
        let grads: Vec<Tensor> = inputs
            .iter()
            .enumerate()
            .map(|(i, (_, gr, ..))| {
                let gr = if i % 3 == 1 { gr.to_dtype(DType::BF16).unwrap() } else { gr.clone() };
                gr.to_device(d).unwrap()
            })
            .collect();
        // Moments as a view at an offset into a larger buffer (as adamw_update returns them).
        let mut moments: Vec<Tensor> = inputs
            .iter()
            .map(|(.., mv, _)| {
                let pad = Tensor::zeros((1, mv.dim(1).unwrap()), DType::F32, &Device::Cpu).unwrap();
                Tensor::cat(&[&pad, mv], 0).unwrap().to_device(d).unwrap().narrow(0, 1, 2).unwrap()
            })
            .collect();
        let mut slots: Vec<AdamWSlot> = vars
            .iter()
            .zip(&grads)
            .zip(moments.iter_mut())
            .zip(&inputs)
            .map(|(((param, grad), moments), x)| AdamWSlot { param, grad, moments, decay: x.3 })
            .collect();
        if clip {
            let refs: Vec<&Tensor> = grads.iter().collect();
            let sumsq = sum_of_squares(&refs).unwrap();
            patchlm_model::ops::adamw_multi_clipped(&mut slots, &h, &sumsq, 0.5).unwrap();
        } else {
            adamw_multi(&mut slots, &h, 0.43).unwrap();
        }
        drop(slots);
        let cpu = |t: &Tensor| t.to_device(&Device::Cpu).unwrap();
        vars.iter().zip(&moments).map(|(v, m)| (cpu(v.as_tensor()), cpu(m))).collect::<Vec<_>>()
    };
    for clip in [false, true] {
        let (want, got) = (run(&Device::Cpu, clip), run(&g, clip));
        for (i, ((pc, mc), (pg, mg))) in want.iter().zip(&got).enumerate() {
            assert!(max_rel(mg, mc) < 1e-6, "clip {clip}: tensor {i}: moments");
            let p0 = &inputs[i].0;
            let e = max_rel(&(pg - p0).unwrap(), &(pc - p0).unwrap());
            assert!(e < 1e-3, "clip {clip}: tensor {i}: parameter update rel err {e}");
        }
    }
    patchlm_model::ops::set_device_clip(false);
}

#[test]
#[ignore]
fn cuda_multi_tensor_sum_of_squares_matches_cpu() {
    let g = gpu();
    patchlm_model::ops::set_multi_tensor_cuda(true);
    let inputs = multi_inputs();
    let mut ts: Vec<Tensor> = inputs.iter().map(|(_, gr, ..)| gr.clone()).collect();
    ts.push(Tensor::randn(0f32, 1.0, 5000, &Device::Cpu).unwrap().to_dtype(DType::BF16).unwrap());
    let want: f64 = ts
        .iter()
        .map(|t| t.to_dtype(DType::F64).unwrap().sqr().unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap())
        .sum();
    let on_gpu: Vec<Tensor> = ts.iter().map(|t| t.to_device(&g).unwrap()).collect();
    let refs: Vec<&Tensor> = on_gpu.iter().collect();
    let got = sum_of_squares(&refs).unwrap().to_scalar::<f64>().unwrap();
    assert!((got - want).abs() <= 1e-5 * want, "sum of squares {got} vs {want}");
    let cpu_refs: Vec<&Tensor> = ts.iter().collect();
    let cpu = sum_of_squares(&cpu_refs).unwrap().to_scalar::<f64>().unwrap();
    assert!((cpu - want).abs() <= 1e-5 * want, "cpu sum of squares {cpu} vs {want}");
}

#[test]
#[ignore]
fn cuda_flash_attention_matches_cpu() {
    let g = gpu();
    // Row counts that are not multiples of the 64-row blocks, T < S, every head size.
    for (b, h, t, s, hd) in [
        (2usize, 3usize, 130usize, 130usize, 64usize),
        (1, 2, 5, 77, 16),
        (1, 2, 100, 100, 32),
        (1, 2, 200, 200, 128),
        (1, 4, 1024, 1024, 64),
    ] {
        for (dtype, tol) in [(DType::F32, 1e-4f32), (DType::BF16, 2e-2)] {
            autograd_flash_matches_cpu(&g, (b, h, t, s, hd), dtype, 0.125, tol, tol * 5.0);
        }
    }
}

/// [`flash_attention`] and candle's autograd through it (whose backward takes the log-sum-exp
/// again) on `g` against the CPU: output within `tol`, dq, dk and dv within `tol_grad`.
fn autograd_flash_matches_cpu(
    g: &Device,
    (b, h, t, s, hd): (usize, usize, usize, usize, usize),
    dtype: DType,
    scale: f64,
    tol: f32,
    tol_grad: f32,
) {
    let mk = |n: usize| Tensor::randn(0f32, 1.0, (b, h, n, hd), &Device::Cpu).unwrap().to_dtype(dtype).unwrap();
    let (q, k, v) = (mk(t), mk(s), mk(s));
    let up = mk(t);
    let run = |d: &Device| {
        let vars: Vec<Var> = [&q, &k, &v].iter().map(|x| Var::from_tensor(&x.to_device(d).unwrap()).unwrap()).collect();
        let y = flash_attention(vars[0].as_tensor(), vars[1].as_tensor(), vars[2].as_tensor(), scale).unwrap();
        let loss = (&y * &up.to_device(d).unwrap()).unwrap().to_dtype(DType::F32).unwrap().sum_all().unwrap();
        let grads = loss.backward().unwrap();
        let gs: Vec<Tensor> = vars.iter().map(|x| grads.get(x.as_tensor()).unwrap().clone()).collect();
        (y, gs)
    };
    let ((yc, gc), (yg, gg)) = (run(&Device::Cpu), run(g));
    let name = format!("flash {b}x{h}x{t}x{s}x{hd} {dtype:?}");
    let e = max_rel(&yg, &yc);
    assert!(e < tol, "{name} forward: rel err {e}");
    for (which, (x, r)) in ["dq", "dk", "dv"].iter().zip(gg.iter().zip(&gc)) {
        let e = max_rel(x, r);
        assert!(e < tol_grad, "{name} {which}: rel err {e}");
    }
}

/// Which tensor-core flash kernels a test turns on.
#[derive(Clone, Copy, PartialEq, Debug)]
enum Tc {
    /// None: the CUDA-core kernels.
    Off,
    /// mma.sync (PATCHLM_FLASH_MMA).
    Mma,
    /// mma.sync with dq, dk and dv from one backward pass (PATCHLM_FLASH_DQ_ATOMIC).
    MmaDqAtomic,
    /// mma.sync with the wide forward (PATCHLM_FLASH_WIDE: 128 rows a block).
    MmaWide,
    /// mma.sync with dq compiled for four blocks an SM (PATCHLM_FLASH_OCC4).
    MmaOcc4,
    /// mma.sync with the forward, dq and dk/dv on Hopper's warpgroup MMAs (PATCHLM_FLASH_WGMMA;
    /// bf16, head size 64).
    MmaWgmma,
    /// The same with dq, dk and dv from one backward pass (PATCHLM_FLASH_DQ_ATOMIC too:
    /// `flash_wg_dkvq`).
    MmaWgmmaDqAtomic,
    /// The wgmma kernels with q in registers in the forward and dq (PATCHLM_FLASH_WGMMA_QREG too:
    /// `flash_wg_fwdr`, `flash_wg_dqr`).
    MmaWgmmaQreg,
    /// The wgmma kernels with the two-warpgroup forward, dq and dk/dv (PATCHLM_FLASH_WIDE and
    /// PATCHLM_FLASH_WIDE_BWD too: `flash_wg_fwdw`, `flash_wg_dqw`, `flash_wg_dkvw`).
    MmaWgmmaWide,
    /// The same with q in registers (`flash_wg_fwdwr`, `flash_wg_dqwr`).
    MmaWgmmaWideQreg,
    /// mma.sync with the wide backward (PATCHLM_FLASH_WIDE_BWD: 128 keys a block at head size 64).
    MmaWideBwd,
    /// The same with dq, dk and dv from one backward pass.
    MmaWideBwdDqAtomic,
    /// mma.sync at head sizes 80, 96 and 128 (PATCHLM_FLASH_MMA_LARGE_HEADS), two passes.
    MmaLarge,
    /// The same with the one-pass backward (at 128).
    MmaLargeDqAtomic,
}

fn set_tc(tc: Tc) {
    patchlm_model::ops::set_flash_mma(tc != Tc::Off);
    patchlm_model::ops::set_flash_dq_atomic(matches!(
        tc,
        Tc::MmaDqAtomic | Tc::MmaWideBwdDqAtomic | Tc::MmaLargeDqAtomic | Tc::MmaWgmmaDqAtomic
    ));
    patchlm_model::ops::set_flash_mma_large_heads(matches!(tc, Tc::MmaLarge | Tc::MmaLargeDqAtomic));
    patchlm_model::ops::set_flash_wide(matches!(tc, Tc::MmaWide | Tc::MmaWgmmaWide | Tc::MmaWgmmaWideQreg));
    patchlm_model::ops::set_flash_occ4(tc == Tc::MmaOcc4);
    patchlm_model::ops::set_flash_wgmma(matches!(
        tc,
        Tc::MmaWgmma | Tc::MmaWgmmaDqAtomic | Tc::MmaWgmmaQreg | Tc::MmaWgmmaWide | Tc::MmaWgmmaWideQreg
    ));
    patchlm_model::ops::set_flash_wgmma_qreg(matches!(tc, Tc::MmaWgmmaQreg | Tc::MmaWgmmaWideQreg));
    patchlm_model::ops::set_flash_wide_bwd(matches!(
        tc,
        Tc::MmaWideBwd | Tc::MmaWideBwdDqAtomic | Tc::MmaWgmmaWide | Tc::MmaWgmmaWideQreg
    ));
}

/// The mma.sync kernels (PATCHLM_FLASH_MMA; bf16/f16, head sizes 32 and 64) through the
/// graph-free pair the tape uses: output, log-sum-exp and the three gradients against the CPU.
/// Their math runs without a GPU in tests/emulated.rs; this is the same on the tensor cores.
#[test]
#[ignore]
fn cuda_mma_flash_attention_matches_cpu() {
    tensor_core_flash_matches_cpu(Tc::Mma);
}

/// The mma.sync kernels with dq, dk and dv from one backward pass (dq summed in f32 atomics;
/// PATCHLM_FLASH_DQ_ATOMIC), as above; named apart so that `gpu_check.sh` runs it in a process of
/// its own.
#[test]
#[ignore]
fn cuda_dq_atomic_flash_attention_matches_cpu() {
    tensor_core_flash_matches_cpu(Tc::MmaDqAtomic);
}

/// The mma.sync kernels with the wide forward (128 rows a block; PATCHLM_FLASH_WIDE), as above;
/// named apart (no `_mma_`) so that `gpu_check.sh` runs it in a process of its own and a fault
/// there leaves the default kernels' verdict alone.
#[test]
#[ignore]
fn cuda_flash_wide_forward_matches_cpu() {
    tensor_core_flash_matches_cpu(Tc::MmaWide);
}

/// The forward, dq and dk/dv on Hopper's warpgroup MMAs (PATCHLM_FLASH_WGMMA, kernels/hopper.cu;
/// bf16 at head size 64, the rest as mma.sync), as above; on a Hopper only (elsewhere the mma.sync kernels
/// run); in a process of its own.
#[test]
#[ignore]
fn cuda_flash_wgmma_matches_cpu() {
    tensor_core_flash_matches_cpu(Tc::MmaWgmma);
}

/// The wgmma kernels with the one-pass backward (PATCHLM_FLASH_WGMMA and PATCHLM_FLASH_DQ_ATOMIC:
/// `flash_wg_dkvq`, its dq product with both operands transposed from shared memory), as above,
/// and the tape with them; in a process of its own (the name), so that a failure here turns off
/// only this combination (`gpu_check.sh`).
#[test]
#[ignore]
fn cuda_wg_one_pass_flash_matches_cpu() {
    tensor_core_flash_matches_cpu(Tc::MmaWgmmaDqAtomic);
    tape_matches_cpu(1, 1, Tc::MmaWgmmaDqAtomic);
}

/// The wgmma forward and dq with q in registers (PATCHLM_FLASH_WGMMA_QREG: s = q·kᵀ with the
/// register operand and k K-major from shared memory, the form the wgmma dk/dv pass uses), as
/// above; in a process of its own (the name), so that a failure here turns
/// off only this variant.
#[test]
#[ignore]
fn cuda_wg_qreg_flash_matches_cpu() {
    tensor_core_flash_matches_cpu(Tc::MmaWgmmaQreg);
}

/// The wgmma forward and dq with two warpgroups of 64 query rows a block (PATCHLM_FLASH_WIDE
/// with PATCHLM_FLASH_WGMMA: `flash_wg_fwdw`, `flash_wg_dqw` with 64 KB of dynamic shared memory),
/// without and with q in registers, and the dk/dv pass with two warpgroups of 64 keys
/// (PATCHLM_FLASH_WIDE_BWD: `flash_wg_dkvw`), as above; in a process of its own (the name).
#[test]
#[ignore]
fn cuda_wg_wide_flash_matches_cpu() {
    tensor_core_flash_matches_cpu(Tc::MmaWgmmaWide);
    tensor_core_flash_matches_cpu(Tc::MmaWgmmaWideQreg);
}

/// The mma.sync dq compiled for four blocks an SM (PATCHLM_FLASH_OCC4), as above; in a
/// process of its own.
#[test]
#[ignore]
fn cuda_flash_occ4_matches_cpu() {
    tensor_core_flash_matches_cpu(Tc::MmaOcc4);
}

/// The mma.sync kernels with the wide backward (128 keys a block of 8 warps, head size 64;
/// PATCHLM_FLASH_WIDE_BWD), as two passes and as one, as above; in a process of its own.
#[test]
#[ignore]
fn cuda_flash_wide_backward_matches_cpu() {
    tensor_core_flash_matches_cpu(Tc::MmaWideBwd);
    tensor_core_flash_matches_cpu(Tc::MmaWideBwdDqAtomic);
}

/// The mma.sync kernels at head sizes 80, 96 and 128 (PATCHLM_FLASH_MMA_LARGE_HEADS), two passes
/// and one, as above; in a process of its own.
#[test]
#[ignore]
fn cuda_flash_large_heads_match_cpu() {
    tensor_core_flash_matches_cpu(Tc::MmaLarge);
    tensor_core_flash_matches_cpu(Tc::MmaLargeDqAtomic);
    // Autograd's path, whose backward takes the log-sum-exp again (at 80 and 96 from the mma
    // forward: no CUDA-core kernel has those sizes).
    let g = gpu();
    set_tc(Tc::MmaLarge);
    for hd in [80usize, 96, 128] {
        autograd_flash_matches_cpu(&g, (1, 3, 90, 90, hd), DType::BF16, 0.1, 4e-2, 4e-2);
    }
    set_tc(Tc::Off);
    drop(g);
}

fn tensor_core_flash_matches_cpu(tc: Tc) {
    use patchlm_model::ops::{flash_attention_lse, flash_attention_lse_rows, grad};
    let g = gpu();
    set_tc(tc);
    // The wgmma variants fall back to mma.sync off Hopper or without a build for it: a pass there
    // would say nothing about them.
    let wgmma =
        matches!(tc, Tc::MmaWgmma | Tc::MmaWgmmaDqAtomic | Tc::MmaWgmmaQreg | Tc::MmaWgmmaWide | Tc::MmaWgmmaWideQreg);
    assert!(
        !wgmma || patchlm_model::ops::flash_wgmma_runs(&g, DType::BF16, 64),
        "{tc:?}: the wgmma kernels do not run here (they need a Hopper GPU and a build with CUDA_COMPUTE_CAP=90)"
    );
    // `misalign`: the GPU inputs start one element into their buffers (not 16-byte aligned), so
    // the kernels take their element-wise load path.
    let shapes: &[(usize, usize, usize, usize, usize, bool)] = if matches!(tc, Tc::MmaLarge | Tc::MmaLargeDqAtomic) {
        &[
            (2, 3, 130, 130, 128, false),
            (1, 2, 33, 80, 96, false),
            (1, 2, 33, 80, 128, true),
            (2, 8, 1024, 1024, 128, false),
            (2, 8, 512, 512, 96, false),
            (1, 2, 70, 90, 80, true),
            (2, 8, 512, 512, 80, false),
        ]
    } else {
        &[
            (2, 3, 130, 130, 64, false),
            (1, 2, 33, 80, 32, false),
            (1, 2, 33, 80, 32, true),
            (1, 2, 100, 100, 32, false),
            (2, 12, 1024, 1024, 64, false),
        ]
    };
    for &(b, h, t, s, hd, misalign) in shapes {
        for (dtype, tol) in [(DType::BF16, 2e-2f32), (DType::F16, 4e-3)] {
            let mk = |n: usize| Tensor::randn(0f32, 1.0, (b, h, n, hd), &Device::Cpu).unwrap().to_dtype(dtype).unwrap();
            let (q, k, v, up) = (mk(t), mk(s), mk(s), mk(t));
            let scale = 1.0 / (hd as f64).sqrt();
            let run = |d: &Device| {
                let on = |x: &Tensor| {
                    if misalign && d.is_cuda() {
                        let flat = Tensor::cat(
                            &[&Tensor::zeros(1, dtype, &Device::Cpu).unwrap(), &x.flatten_all().unwrap()],
                            0,
                        )
                        .unwrap()
                        .to_device(d)
                        .unwrap();
                        flat.narrow(0, 1, x.elem_count()).unwrap().reshape(x.shape()).unwrap()
                    } else {
                        x.to_device(d).unwrap()
                    }
                };
                let (o, lse) = flash_attention_lse(&on(&q), &on(&k), &on(&v), scale).unwrap();
                let (dq, dk, dv) =
                    grad::flash_attention_lse(&on(&q), &on(&k), &on(&v), &o, &lse, &on(&up), scale).unwrap();
                // The output and its gradient as (B, T, H·hd) rows (read and written in place on
                // the GPU); the output back as heads for the comparison.
                let up_rows = on(&up.transpose(1, 2).unwrap().reshape((b, t, h * hd)).unwrap());
                let (y, lse_r) = flash_attention_lse_rows(&on(&q), &on(&k), &on(&v), scale).unwrap();
                let (dq_r, dk_r, dv_r) =
                    grad::flash_attention_lse(&on(&q), &on(&k), &on(&v), &y, &lse_r, &up_rows, scale).unwrap();
                let y = y.reshape((b, t, h, hd)).unwrap().transpose(1, 2).unwrap();
                [o, lse, dq, dk, dv, y, lse_r, dq_r, dk_r, dv_r]
            };
            let (c, gg) = (run(&Device::Cpu), run(&g));
            let name = format!("{tc:?} flash {b}x{h}x{t}x{s}x{hd} {dtype:?} misaligned {misalign}");
            let parts = ["output", "lse", "dq", "dk", "dv"];
            for (i, which) in parts.iter().chain(&parts).enumerate() {
                let e = max_rel(&gg[i], &c[i]);
                let bound = match i % 5 {
                    0 => tol,
                    1 => 1e-3,
                    _ => tol * 2.0,
                };
                let layout = if i < 5 { "" } else { " (o and dO as rows)" };
                assert!(e < bound, "{name} {which}{layout}: rel err {e}");
            }
        }
    }
    set_tc(Tc::Off);
    drop(g);
}

/// A (64·16-element) operand of the wgmma probes in `dims`, values k/16 (products and their sums
/// exact), `m` the pattern's multiplier.
fn probe_operand(m: usize, dims: (usize, usize)) -> Tensor {
    let v: Vec<f32> = (0..64 * 16).map(|i| ((i * m + 11) % 29) as f32 / 16.0 - 0.875).collect();
    Tensor::from_vec(v, dims, &Device::Cpu).unwrap().to_dtype(DType::BF16).unwrap()
}

/// How many of the 4096 values of `ops::wgmma_probe(form, a, b)` on the GPU differ from the CPU's
/// product, and the first of them.
fn wgmma_probe_misses(g: &Device, form: patchlm_model::ops::WgmmaForm, a: &Tensor, b: &Tensor) -> (usize, String) {
    let flat = |t: &Tensor| t.to_device(&Device::Cpu).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let want = flat(&ops::wgmma_probe(form, a, b).unwrap());
    let got = flat(&ops::wgmma_probe(form, &a.to_device(g).unwrap(), &b.to_device(g).unwrap()).unwrap());
    let bad: Vec<usize> = (0..want.len()).filter(|&i| want[i] != got[i]).collect();
    let first = bad
        .first()
        .map_or(String::new(), |&i| format!("first D[{}][{}] = {} (want {})", i / 64, i % 64, got[i], want[i]));
    (bad.len(), first)
}

/// The one-pass backward's dq product form on the GPU (`WgmmaForm::SharedTransposed`: both
/// operands MN-major in shared memory, transposed by the instruction) against the CPU, the
/// descriptor's offsets both ways round as above, one of which must match; run with the one-pass
/// kernel's device test (the name), so that a failure here turns off only that kernel
/// (`gpu_check.sh`).
#[test]
#[ignore]
fn cuda_wg_one_pass_probe_matches_cpu() {
    use patchlm_model::ops::WgmmaForm;
    let g = gpu();
    let (a, b) = (probe_operand(37, (16, 64)), probe_operand(53, (16, 64)));
    let (along_k, first) = wgmma_probe_misses(&g, WgmmaForm::SharedTransposed { lbo: 1024, sbo: 128 }, &a, &b);
    let (along_mn, _) = wgmma_probe_misses(&g, WgmmaForm::SharedTransposed { lbo: 128, sbo: 1024 }, &a, &b);
    // Either reading will do for the kernels (the launcher takes the build for the one the GPU
    // has, `wgmma_reading`), as long as one matches exactly.
    assert!(
        along_k == 0 || along_mn == 0,
        "wgmma probe, both operands transposed from shared memory: with LBO along K (the emulator's reading) \
         {along_k} of 4096 values differ ({first}); with LBO along M/N {along_mn} differ"
    );
    if along_k != 0 {
        println!("this GPU reads LBO along M/N for MN-major operands: the flash_wgs kernels run");
    }
    drop(g);
}

/// Hopper's warpgroup MMA as kernels/hopper.cu issues it (`ops::wgmma_probe`, m64n64k16) against
/// the CPU: both operands in shared memory through unswizzled K-major descriptors (q·kᵀ's form),
/// then A from registers and B transposed from shared memory (p·v's form), the latter with the
/// descriptor's two offsets both ways round, so that a failure says which reading the GPU has.
/// Checks the layouts, descriptor encoding and fence protocol that the emulator assumes
/// (tests/emulated.rs) before any kernel relies on them. Values k/16: every sum is exact.
/// Hopper only (the module is compute_90a); in a process of its own (`gpu_check.sh`).
#[test]
#[ignore]
fn cuda_hopper_wgmma_probe_matches_cpu() {
    use patchlm_model::ops::WgmmaForm;
    let g = gpu();
    let run = |form: WgmmaForm, a: &Tensor, b: &Tensor| wgmma_probe_misses(&g, form, a, b);
    let mk = probe_operand;
    let (a, b) = (mk(37, (64, 16)), mk(53, (64, 16)));
    let (bad, first) = run(WgmmaForm::SharedKMajor, &a, &b);
    assert_eq!(bad, 0, "wgmma probe, both operands in shared memory: {bad} of 4096 values differ, {first}");
    let bt = mk(53, (16, 64));
    let (along_k, first_k) = run(WgmmaForm::RegisterTransposed { lbo: 1024, sbo: 128 }, &a, &bt);
    let (along_n, _) = run(WgmmaForm::RegisterTransposed { lbo: 128, sbo: 1024 }, &a, &bt);
    assert!(
        along_k == 0,
        "wgmma probe, A in registers, B transposed: with LBO along K (the emulator's reading) {along_k} of 4096 \
         values differ ({first_k}); with LBO along N {along_n} differ{}",
        if along_n == 0 {
            ": the GPU reads LBO along N for MN-major operands (the launcher then runs the flash_wgs kernels, built \
             for that reading; the emulator's default reading should follow the GPU)"
        } else {
            ""
        }
    );
    drop(g);
}

/// bf16 products in the tape's 370M shapes (B·T = 8192 rows) against the CPU's f32 product of the
/// same values, on the device as `parse_device` sets it up: cuBLAS with its 32 MiB workspace
/// (`PATCHLM_CUBLAS_WORKSPACE`), which lets it split the weight gradients' 8192-long reduction.
#[test]
#[ignore]
fn cuda_matmuls_with_workspace_match_cpu() {
    let g = gpu();
    let n = 8192;
    let x = |r: usize, c: usize| Tensor::randn(0f32, 1.0, (r, c), &Device::Cpu).unwrap().to_dtype(DType::BF16).unwrap();
    for (d, f) in [(1024usize, 1024usize), (1024, 2752), (2752, 1024)] {
        let (dy, a) = (x(n, d), x(n, f));
        // Weight gradient dyᵀ·a (d, f), reduced over the 8192 rows; then the forward a·wᵀ.
        let w = x(d, f);
        for (what, l, r) in [("dyᵀ·a", dy.t().unwrap(), a.clone()), ("a·wᵀ", a.clone(), w.t().unwrap())] {
            let want = ops::matmul(&l.to_dtype(DType::F32).unwrap(), &r.to_dtype(DType::F32).unwrap()).unwrap();
            let got = ops::matmul(&l.to_device(&g).unwrap(), &r.to_device(&g).unwrap()).unwrap();
            let e = max_rel(&got, &want);
            assert!(e < 1e-2, "{what} d={d} f={f}: rel err {e}");
        }
    }
    drop(g);
}

#[test]
#[ignore]
fn cuda_swiglu_matches_cpu() {
    let g = gpu();
    let up = Tensor::randn(0f32, 1.0, (8192, 2048), &Device::Cpu).unwrap();
    for (dtype, tol) in [(DType::F32, 1e-5f32), (DType::BF16, 1e-2)] {
        let x = Tensor::randn(0f32, 2.0, (8192, 2048), &Device::Cpu).unwrap().to_dtype(dtype).unwrap();
        let u = up.to_dtype(dtype).unwrap();
        check_unary(&format!("swiglu gate {dtype:?}"), &x, tol, |x| {
            swiglu(x, &u.to_device(x.device()).unwrap()).unwrap()
        });
        let gx = x.clone();
        check_unary(&format!("swiglu up {dtype:?}"), &u, tol, |u| {
            swiglu(&gx.to_device(u.device()).unwrap(), u).unwrap()
        });
        // The stacked layout (PATCHLM_LAYOUT_CUDA): [gate | up] per row.
        patchlm_model::ops::set_layout_cuda(true);
        let gu = Tensor::cat(&[&x, &u], 1).unwrap();
        let dy = Tensor::randn(0f32, 1.0, (8192, 2048), &Device::Cpu).unwrap().to_dtype(dtype).unwrap();
        let yc = patchlm_model::ops::swiglu_packed(&gu).unwrap();
        let yg = patchlm_model::ops::swiglu_packed(&gu.to_device(&g).unwrap()).unwrap();
        assert!(max_rel(&yg, &yc) < tol, "swiglu_packed forward {dtype:?}");
        let dc = patchlm_model::ops::grad::swiglu_packed(&gu, &dy).unwrap();
        let dg =
            patchlm_model::ops::grad::swiglu_packed(&gu.to_device(&g).unwrap(), &dy.to_device(&g).unwrap()).unwrap();
        assert!(max_rel(&dg, &dc) < tol * 5.0, "swiglu_packed backward {dtype:?}");
        patchlm_model::ops::set_layout_cuda(false);
    }
    drop(g);
}

#[test]
#[ignore]
fn cuda_tape_forward_and_backward_match_cpu() {
    // Head size 16 (flash attention's smallest on CUDA) with grouped-query attention.
    tape_matches_cpu(4, 2, Tc::Off);
}

/// The tape at head size 32 with the mma.sync flash kernels (PATCHLM_FLASH_MMA), a test of its
/// own so that `gpu_check.sh` can tell these kernels' failures from the others'.
#[test]
#[ignore]
fn cuda_mma_tape_matches_cpu() {
    tape_matches_cpu(2, 1, Tc::Mma);
}

/// The same with the wgmma kernels (PATCHLM_FLASH_WGMMA; one head of 64 so that they apply), run
/// with the other wgmma device test (the name).
#[test]
#[ignore]
fn cuda_flash_wgmma_tape_matches_cpu() {
    tape_matches_cpu(1, 1, Tc::MmaWgmma);
}

/// The same with dq, dk and dv from one backward pass (PATCHLM_FLASH_DQ_ATOMIC).
#[test]
#[ignore]
fn cuda_dq_atomic_tape_matches_cpu() {
    tape_matches_cpu(2, 1, Tc::MmaDqAtomic);
}

/// The hand-written forward and backward pass on the GPU against the CPU: softmax attention
/// (one block, then three with the layout and row kernels) and flash attention.
fn tape_matches_cpu(heads: usize, kv_heads: usize, tc: Tc) {
    use patchlm_model::ops::{set_flash_attention, set_layout_cuda};
    use patchlm_model::{init_model, Grads, ModelConfig};
    let g = gpu();
    let mut cfg = ModelConfig::preset("tiny").unwrap();
    (cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads, cfg.num_key_value_heads) =
        (64, 128, heads, kv_heads);
    let (mc, _) = init_model(&cfg, &Device::Cpu, 3).unwrap();
    let (mg, _) = init_model(&cfg, &g, 3).unwrap();
    let x = Tensor::randn(0f32, 1.0, (2, 37, 64), &Device::Cpu).unwrap();
    let dh = Tensor::randn(0f32, 1.0, (2, 37, 64), &Device::Cpu).unwrap();
    set_tc(tc);
    for (dtype, tol) in [(DType::F32, 1e-4f32), (DType::BF16, 3e-2)] {
        for (flash, heads_kernels) in [(false, false), (false, true), (true, true)] {
            set_flash_attention(flash);
            // Softmax attention in query blocks (narrowed q/k/v views as matmul operands).
            patchlm_model::set_attention_chunks(if heads_kernels { 3 } else { 1 });
            set_layout_cuda(heads_kernels);
            // The warp-per-row RMSNorm and softmax kernels go with the head kernels.
            patchlm_model::ops::set_rows_cuda(heads_kernels);
            let run = |m: &patchlm_model::Llama, d: &Device| {
                let m = m.clone().with_compute_dtype(dtype);
                let (h, tape) = m.forward_tape(&x.to_device(d).unwrap()).unwrap();
                let mut grads = Grads::new();
                let dx = m.backward_tape(tape, &dh.to_device(d).unwrap(), &mut grads).unwrap();
                (h, dx, grads)
            };
            let (hc, dxc, gc) = run(&mc, &Device::Cpu);
            let (hg, dxg, gg) = run(&mg, &g);
            let what =
                format!("{dtype:?} heads {heads} flash {flash} (tensor cores {tc:?}) heads kernels {heads_kernels}");
            assert!(max_rel(&hg, &hc) < tol, "{what}: hidden states");
            assert!(max_rel(&dxg, &dxc) < tol * 10.0, "{what}: input gradient");
            assert_eq!(gc.len(), gg.len());
            for (name, want) in &gc {
                let e = max_rel(&gg[name], want);
                assert!(e < tol * 10.0, "{what}: gradient of {name}: rel err {e}");
            }
        }
    }
    set_flash_attention(false);
    set_tc(Tc::Off);
    patchlm_model::set_attention_chunks(0);
    set_layout_cuda(false);
    patchlm_model::ops::set_rows_cuda(false);
}

#[test]
#[ignore]
fn cuda_heads_layout_matches_cpu() {
    use patchlm_model::ops::{heads_from_rows, rows_from_heads, set_layout_cuda, HeadsLayout};
    let g = gpu();
    set_layout_cuda(true);
    let cpu = Device::Cpu;
    for (b, t, h, kv, hd) in [(3usize, 37usize, 4usize, 2usize, 64usize), (2, 129, 12, 12, 64), (1, 5, 2, 1, 16)] {
        let l = HeadsLayout { batch: b, seq: t, heads: h, kv_heads: kv, head_dim: hd };
        let cos = Tensor::randn(0f32, 1.0, (t, hd), &cpu).unwrap();
        let sin = Tensor::randn(0f32, 1.0, (t, hd), &cpu).unwrap();
        let (cg, sg) = (cos.to_device(&g).unwrap(), sin.to_device(&g).unwrap());
        for (dtype, tol) in [(DType::F32, 1e-5f32), (DType::BF16, 1e-2)] {
            let what = format!("{l:?} {dtype:?}");
            let rows = Tensor::randn(0f32, 1.0, (b * t, (h + 2 * kv) * hd), &cpu).unwrap().to_dtype(dtype).unwrap();
            let (qc, kvc) = heads_from_rows(&rows, l, Some((&cos, &sin))).unwrap();
            let (qg, kvg) = heads_from_rows(&rows.to_device(&g).unwrap(), l, Some((&cg, &sg))).unwrap();
            let ((kc, vc), (kg, vg)) = (kvc.unwrap(), kvg.unwrap());
            for (name, a, c) in [("q", &qg, &qc), ("k", &kg, &kc), ("v", &vg, &vc)] {
                assert_eq!(a.dims(), c.dims(), "{what}: {name}");
                assert!(max_rel(a, c) < tol, "{what}: heads_from_rows {name}");
            }
            let back_c = rows_from_heads(&qc, Some((&kc, &vc)), l, Some((&cos, &sin))).unwrap();
            let back_g = rows_from_heads(&qg, Some((&kg, &vg)), l, Some((&cg, &sg))).unwrap();
            assert!(max_rel(&back_g, &back_c) < tol, "{what}: rows_from_heads");
            // The plain layout change (no key/value heads, no rotation) is exact.
            let plain = HeadsLayout { kv_heads: 0, ..l };
            let x = Tensor::randn(0f32, 1.0, (b * t, h * hd), &cpu).unwrap().to_dtype(dtype).unwrap();
            let (hc, _) = heads_from_rows(&x, plain, None).unwrap();
            let (hg, _) = heads_from_rows(&x.to_device(&g).unwrap(), plain, None).unwrap();
            assert_eq!(max_rel(&hg, &hc), 0.0, "{what}: plain heads");
            let rg = rows_from_heads(&hg, None, plain, None).unwrap();
            assert_eq!(max_rel(&rg, &x), 0.0, "{what}: plain rows");
        }
    }
    set_layout_cuda(false);
}

/// The device's memory pool keeps freed memory through a synchronisation (parse_device sets its
/// release threshold), so the next step's allocations reuse it instead of mapping it afresh; and
/// its high-water mark (`device_memory_peak`, the bench's peak memory) counts a tensor's bytes.
#[test]
#[ignore]
fn cuda_memory_pool_keeps_freed_memory() {
    use candle_core::cuda_backend::cudarc::driver::{result, sys};
    let g = gpu();
    let Device::Cuda(d) = &g else { unreachable!() };
    let pool = unsafe { result::device::get_mem_pool(d.cuda_stream().context().cu_device()) }.unwrap();
    let attr = |a: sys::CUmemPool_attribute| {
        let mut v = 0u64;
        unsafe { result::mem_pool::get_attribute(pool, a, (&mut v as *mut u64).cast()) }.unwrap();
        v
    };
    assert_eq!(attr(sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD), u64::MAX);
    let bytes = 256u64 << 20;
    let before = patchlm_model::device_memory_peak(&g, true).unwrap();
    let x = Tensor::zeros((bytes / 4) as usize, DType::F32, &g).unwrap();
    g.synchronize().unwrap();
    let peak = patchlm_model::device_memory_peak(&g, false).unwrap();
    assert!(peak >= before + bytes, "high-water mark {peak} bytes, {before} before a {bytes}-byte tensor");
    drop(x);
    g.synchronize().unwrap();
    let reserved = attr(sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RESERVED_MEM_CURRENT);
    assert!(reserved >= bytes, "the pool gave freed memory back: {reserved} bytes reserved after a sync");
    // A reset starts from the memory in use now, without the dropped tensor (the tests run one
    // at a time on the device).
    let after = patchlm_model::device_memory_peak(&g, true).unwrap();
    assert!(after + bytes <= peak, "high-water mark after a reset {after} bytes, {peak} before it");
}

/// One multi-tensor cast for a forward pass's weights (`ops::cast_groups`): the same bits as the
/// CPU's stacking and rounding, each group's view 128-byte aligned in the shared buffer, groups
/// of several tensors and tensors of several 16384-element chunks.
#[test]
#[ignore]
fn cuda_multi_tensor_cast_matches_cpu() {
    let g = gpu();
    patchlm_model::ops::set_multi_tensor_cuda(true);
    ops::set_layout_cuda(true);
    let r = |shape: &[usize]| Tensor::randn(0f32, 2.0, shape, &Device::Cpu).unwrap();
    let cpu = [r(&[7, 33]), r(&[1, 33]), r(&[5, 33]), r(&[3]), r(&[600, 64]), r(&[1, 64])];
    let on_gpu: Vec<Tensor> = cpu.iter().map(|t| t.to_device(&g).unwrap()).collect();
    fn cast(t: &[Tensor], dtype: DType) -> Vec<Tensor> {
        let (a, b, c): (Vec<&Tensor>, Vec<&Tensor>, Vec<&Tensor>) =
            (t[0..3].iter().collect(), vec![&t[3]], t[4..6].iter().collect());
        ops::cast_groups(&[&a, &b, &c], dtype).unwrap()
    }
    for dtype in [DType::BF16, DType::F16] {
        for (i, (want, got)) in cast(&cpu, dtype).iter().zip(cast(&on_gpu, dtype)).enumerate() {
            assert_eq!(want.dims(), got.dims(), "group {i} {dtype:?}");
            assert_eq!(got.layout().start_offset() % 64, 0, "group {i} starts unaligned");
            let bits = |t: &Tensor| -> Vec<u16> {
                let t = t.to_device(&Device::Cpu).unwrap().flatten_all().unwrap();
                match dtype {
                    DType::BF16 => t.to_vec1::<half::bf16>().unwrap().iter().map(|x| x.to_bits()).collect(),
                    _ => t.to_vec1::<half::f16>().unwrap().iter().map(|x| x.to_bits()).collect(),
                }
            };
            assert_eq!(bits(&got), bits(want), "group {i} {dtype:?}: the GPU cast differs from the CPU's");
        }
    }
    ops::set_layout_cuda(false);
}
