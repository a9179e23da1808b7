//! The CUDA kernels (kernels/fused.cu) against their CPU twins on random inputs. Needs the `cuda`
//! feature and a GPU, so the tests are `#[ignore]`d: `scripts/gpu_check.sh` runs them on the
//! device with `--ignored`.

#![cfg(feature = "cuda")]
#![allow(clippy::unwrap_used)]

use candle_core::{DType, Device, Tensor, Var};
use patchlm_model::ops::rms_norm;
use patchlm_model::{cross_entropy_multi, fused_ops_supported, SplitMix64};

fn gpu() -> Device {
    // SAFETY of set_var: tests in this file only read the variable afterwards.
    std::env::set_var("PATCHLM_FUSED_CUDA", "1");
    let d = Device::new_cuda(0).expect("these tests need a CUDA GPU");
    assert!(fused_ops_supported(&d));
    d
}

fn max_rel(a: &Tensor, b: &Tensor) -> f32 {
    let a = a.to_device(&Device::Cpu).unwrap().to_dtype(DType::F32).unwrap();
    let b = b.to_device(&Device::Cpu).unwrap().to_dtype(DType::F32).unwrap();
    let scale = b.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap().max(1e-6);
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap() / scale
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
        }
    }
}

#[test]
#[ignore]
fn cuda_rms_norm_matches_cpu() {
    let g = gpu();
    for (n, d) in [(333usize, 768usize), (64, 1024), (5, 100)] {
        for (dtype, tol) in [(DType::F32, 1e-4f32), (DType::BF16, 2e-2)] {
            let x = Tensor::randn(0f32, 1.0, (n, d), &Device::Cpu).unwrap().to_dtype(dtype).unwrap();
            let w = Tensor::randn(1f32, 0.2, d, &Device::Cpu).unwrap().to_dtype(dtype).unwrap();
            let up = Tensor::randn(0f32, 1.0, (n, d), &Device::Cpu).unwrap().to_dtype(dtype).unwrap();
            let (xc, wc) = (Var::from_tensor(&x).unwrap(), Var::from_tensor(&w).unwrap());
            let xg = Var::from_tensor(&x.to_device(&g).unwrap()).unwrap();
            let wg = Var::from_tensor(&w.to_device(&g).unwrap()).unwrap();
            let yc = rms_norm(xc.as_tensor(), wc.as_tensor(), 1e-5).unwrap();
            let yg = rms_norm(xg.as_tensor(), wg.as_tensor(), 1e-5).unwrap();
            assert!(max_rel(&yg, &yc) < tol, "forward n={n} d={d} {dtype:?}");
            let gc = (&yc * &up).unwrap().sum_all().unwrap().backward().unwrap();
            let gg = (&yg * &up.to_device(&g).unwrap()).unwrap().sum_all().unwrap().backward().unwrap();
            for (name, c, gv) in [("x", &xc, &xg), ("weight", &wc, &wg)] {
                let e = max_rel(gg.get(gv.as_tensor()).unwrap(), gc.get(c.as_tensor()).unwrap());
                assert!(e < tol * 5.0, "d{name} n={n} d={d} {dtype:?}: rel err {e}");
            }
        }
    }
}
