//! AdamW: one parameter ([`adamw_update`]) or many at once ([`adamw_multi`], [`adamw_multi_clipped`]), and torch's clip factor.

use super::*;

/// The scalars of one AdamW step (PyTorch's `AdamW` formula, decoupled weight decay):
/// `m ← β1·m + (1−β1)·g`, `v ← β2·v + (1−β2)·g²`,
/// `p ← p·decay − (lr / bias1) · m / (√v / √bias2 + eps)`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWStep {
    /// Learning rate.
    pub lr: f64,
    /// β1.
    pub beta1: f64,
    /// β2.
    pub beta2: f64,
    /// ε.
    pub eps: f64,
    /// Multiplier applied to the parameter first: `1 − lr·weight_decay`, or 1 for no decay.
    pub decay: f64,
    /// Bias correction `1 − β1^t`.
    pub bias1: f64,
    /// Bias correction `1 − β2^t`.
    pub bias2: f64,
}

/// One fused AdamW update: a single pass over the elements of an f32 parameter, its gradient
/// and its moments `moments` (2, N) = (m, v) in f32. Returns the updated parameter (its shape)
/// and the updated moments (2, N); nothing is differentiable.
pub fn adamw_update(
    param: &Tensor,
    grad: &Tensor,
    moments: &Tensor,
    step: &AdamWStep,
) -> candle_core::Result<(Tensor, Tensor)> {
    let n = param.elem_count();
    if param.dtype() != DType::F32 || grad.dtype() != DType::F32 || moments.dtype() != DType::F32 {
        candle_core::bail!("adamw_update: parameter, gradient and moments must be f32");
    }
    if grad.elem_count() != n || moments.dims() != [2, n] {
        candle_core::bail!(
            "adamw_update: gradient {:?} or moments {:?} do not fit the parameter {:?}",
            grad.dims(),
            moments.dims(),
            param.dims()
        );
    }
    let out = param.flatten_all()?.contiguous()?.apply_op3_no_bwd(
        &grad.flatten_all()?.contiguous()?,
        &moments.contiguous()?,
        &AdamWOp(*step),
    )?;
    Ok((out.get(0)?.reshape(param.shape())?, out.narrow(0, 1, 2)?))
}

struct AdamWOp(AdamWStep);

/// The per-element constants of [`AdamWStep`] as the kernels use them (f32).
#[derive(Clone, Copy)]
struct AdamWConsts {
    b1: f32,
    b2: f32,
    ob1: f32,
    ob2: f32,
    eps: f32,
    decay: f32,
    step: f32,
    sbc2: f32,
}

impl AdamWConsts {
    fn of(s: &AdamWStep) -> Self {
        let [b1, b2, ob1, ob2, eps, decay, step, sbc2] = s.kernel_args();
        Self { b1, b2, ob1, ob2, eps, decay, step, sbc2 }
    }
}

impl AdamWStep {
    /// The AdamW kernels' f32 arguments in their order: β1, β2, 1 − β1, 1 − β2, ε, decay,
    /// lr / bias1, √bias2 (the CUDA launchers and the emulated kernel tests pass these).
    #[doc(hidden)]
    pub fn kernel_args(&self) -> [f32; 8] {
        [
            self.beta1 as f32,
            self.beta2 as f32,
            (1.0 - self.beta1) as f32,
            (1.0 - self.beta2) as f32,
            self.eps as f32,
            self.decay as f32,
            (self.lr / self.bias1) as f32,
            self.bias2.sqrt() as f32,
        ]
    }
}

impl candle_core::CustomOp3 for AdamWOp {
    fn name(&self) -> &'static str {
        "adamw"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (p, g, mv) = match (s1, s2, s3) {
            (CpuStorage::F32(p), CpuStorage::F32(g), CpuStorage::F32(mv)) => {
                (contiguous(p, l1, "param")?, contiguous(g, l2, "grad")?, contiguous(mv, l3, "moments")?)
            }
            _ => candle_core::bail!("adamw_update: parameter, gradient and moments must be f32"),
        };
        let n = p.len();
        let c = AdamWConsts::of(&self.0);
        let (m, v) = mv.split_at(n);
        let mut out = vec![0f32; 3 * n];
        let (po, mvo) = out.split_at_mut(n);
        let (mo, vo) = mvo.split_at_mut(n);
        const CHUNK: usize = 4096;
        po.par_chunks_mut(CHUNK).zip(mo.par_chunks_mut(CHUNK)).zip(vo.par_chunks_mut(CHUNK)).enumerate().for_each(
            |(ci, ((po, mo), vo))| {
                let base = ci * CHUNK;
                for i in 0..po.len() {
                    let (gi, k) = (g[base + i], base + i);
                    mo[i] = m[k] * c.b1 + gi * c.ob1;
                    vo[i] = v[k] * c.b2 + gi * gi * c.ob2;
                    let denom = vo[i].sqrt() / c.sbc2 + c.eps;
                    po[i] = p[k] * c.decay - mo[i] / denom * c.step;
                }
            },
        );
        Ok((CpuStorage::F32(out), Shape::from((3, n))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        cuda::adamw(s1, l1, s2, l2, s3, l3, self.0.kernel_args())
    }
}

/// `moments` (2, N) ← (β1·m + (1−β1)·g, β2·v + (1−β2)·g²) with g = `grad_scale` · grad, in place.
struct MomentsInPlace {
    c: AdamWConsts,
    grad_scale: f32,
}

impl candle_core::InplaceOp2 for MomentsInPlace {
    fn name(&self) -> &'static str {
        "adamw-moments"
    }

    fn cpu_fwd(&self, s1: &mut CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> candle_core::Result<()> {
        let g = contiguous_f32(s2, l2, "adamw_multi: gradient")?;
        let mv = contiguous_f32_mut(s1, l1, "adamw_multi: moments")?;
        let n = g.len();
        if mv.len() != 2 * n {
            candle_core::bail!("adamw_multi: moments of {} elements for a gradient of {n}", mv.len());
        }
        let (m, v) = mv.split_at_mut(n);
        let (c, scale) = (self.c, self.grad_scale);
        const CHUNK: usize = 16384;
        m.par_chunks_mut(CHUNK).zip(v.par_chunks_mut(CHUNK)).zip(g.par_chunks(CHUNK)).for_each(|((m, v), g)| {
            for ((m, v), &g) in m.iter_mut().zip(v.iter_mut()).zip(g) {
                // As `(g * grad_scale)` in candle: the product once, in f32 (skipped for 1).
                let g = if scale == 1.0 { g } else { g * scale };
                *m = *m * c.b1 + g * c.ob1;
                *v = *v * c.b2 + g * g * c.ob2;
            }
        });
        Ok(())
    }
}

/// The parameter ← p·decay − step · m / (√v / √bias2 + ε), from the updated moments, in place.
struct ParamInPlace(AdamWConsts);

impl candle_core::InplaceOp2 for ParamInPlace {
    fn name(&self) -> &'static str {
        "adamw-param"
    }

    fn cpu_fwd(&self, s1: &mut CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> candle_core::Result<()> {
        let mv = contiguous_f32(s2, l2, "adamw_multi: moments")?;
        let p = contiguous_f32_mut(s1, l1, "adamw_multi: parameter")?;
        let n = p.len();
        if mv.len() != 2 * n {
            candle_core::bail!("adamw_multi: moments of {} elements for a parameter of {n}", mv.len());
        }
        let (m, v) = mv.split_at(n);
        let c = self.0;
        const CHUNK: usize = 16384;
        p.par_chunks_mut(CHUNK).zip(m.par_chunks(CHUNK)).zip(v.par_chunks(CHUNK)).for_each(|((p, m), v)| {
            for ((p, &m), &v) in p.iter_mut().zip(m).zip(v) {
                let denom = v.sqrt() / c.sbc2 + c.eps;
                *p = *p * c.decay - m / denom * c.step;
            }
        });
        Ok(())
    }
}

/// One parameter's share of a multi-tensor AdamW step ([`adamw_multi`]): the f32 parameter,
/// its f32 or bf16 gradient (any shape with the parameter's element count; the CUDA kernel reads
/// bf16 as it is, elsewhere it is cast to f32 first) and its f32 moments (2, N).
pub struct AdamWSlot<'a> {
    /// The parameter, updated in place.
    pub param: &'a Var,
    /// Its gradient.
    pub grad: &'a Tensor,
    /// Its moments (m, v) as one (2, N) tensor; updated in place on the CPU and by the
    /// multi-tensor CUDA kernel, replaced otherwise.
    pub moments: &'a mut Tensor,
    /// Whether [`AdamWStep::decay`] applies to this parameter (otherwise no weight decay).
    pub decay: bool,
}

/// AdamW over many f32 parameters at once (gradients f32 or bf16), with the gradients multiplied by `grad_scale` first
/// (a clipping coefficient; 1 for none). With the multi-tensor CUDA kernel (on by default, see
/// [`set_multi_tensor_cuda`]) this is one kernel launch for all parameters, updating parameters
/// and moments in place (in the style of apex's `multi_tensor_apply`); on the CPU, two in-place
/// passes per parameter (moments, then the parameter); elsewhere, one [`adamw_update`] per
/// parameter. All compute PyTorch's `AdamW` update (see [`AdamWStep`]) with the same roundings.
pub fn adamw_multi(slots: &mut [AdamWSlot<'_>], step: &AdamWStep, grad_scale: f64) -> candle_core::Result<()> {
    check_adamw_slots(slots)?;
    #[cfg(feature = "cuda")]
    if let Some(first) = slots.first() {
        if let Device::Cuda(dev) = first.param.device() {
            if multi_tensor_cuda(first.param.device()) {
                return cuda::multi_adamw(dev, slots, step, grad_scale, None);
            }
        }
    }
    for s in slots.iter_mut() {
        let step = AdamWStep { decay: if s.decay { step.decay } else { 1.0 }, ..*step };
        if s.param.device().is_cpu() && s.moments.is_contiguous() && s.param.is_contiguous() {
            // In place, two passes: the moments from the gradient, then the parameter from the
            // moments (no new buffers; the arithmetic of `adamw_update`, rounding for rounding).
            let g = s.grad.to_dtype(DType::F32)?.flatten_all()?.contiguous()?;
            let c = AdamWConsts::of(&step);
            s.moments.inplace_op2(&g, &MomentsInPlace { c, grad_scale: grad_scale as f32 })?;
            s.param.as_tensor().inplace_op2(s.moments, &ParamInPlace(c))?;
            continue;
        }
        let g = s.grad.to_dtype(DType::F32)?;
        let g = if grad_scale == 1.0 { g } else { (g * grad_scale)? };
        let (p, m) = adamw_update(s.param.as_tensor(), &g, s.moments, &step)?;
        s.param.set(&p)?;
        *s.moments = m;
    }
    Ok(())
}

/// The dtypes and shapes [`adamw_multi`] needs.
fn check_adamw_slots(slots: &[AdamWSlot<'_>]) -> candle_core::Result<()> {
    for s in slots.iter() {
        let n = s.param.elem_count();
        if s.param.dtype() != DType::F32 || s.moments.dtype() != DType::F32 {
            candle_core::bail!("adamw_multi: parameters and moments must be f32");
        }
        if !matches!(s.grad.dtype(), DType::F32 | DType::BF16) {
            candle_core::bail!("adamw_multi: gradients must be f32 or bf16, got {:?}", s.grad.dtype());
        }
        if s.grad.elem_count() != n || s.moments.dims() != [2, n] {
            candle_core::bail!(
                "adamw_multi: gradient {:?} or moments {:?} do not fit the parameter {:?}",
                s.grad.dims(),
                s.moments.dims(),
                s.param.dims()
            );
        }
    }
    Ok(())
}

/// The factor that gradients with global norm `norm` are scaled by to clip them to `max_norm`,
/// as torch's `clip_grad_norm_`: `max_norm / (norm + 1e-6)` capped at 1; 1 when `max_norm` ≤ 0
/// (no clipping) or the norm is not finite.
pub fn clip_factor(norm: f64, max_norm: f64) -> f64 {
    if max_norm > 0.0 && norm.is_finite() {
        (max_norm / (norm + 1e-6)).min(1.0)
    } else {
        1.0
    }
}

/// The clip factor ([`clip_factor`]) for gradients whose sum of squares is `sumsq` (a scalar of
/// any float dtype, read on the host: this waits for its device), or `None` when their norm is not
/// finite (NaN or infinite gradients: the caller then skips the update).
pub fn host_clip_factor(sumsq: &Tensor, max_norm: f64) -> candle_core::Result<Option<f64>> {
    let norm = sumsq.to_dtype(DType::F64)?.flatten_all()?.get(0)?.to_scalar::<f64>()?.sqrt();
    Ok(norm.is_finite().then(|| clip_factor(norm, max_norm)))
}

static DEVICE_CLIP: Switch = Switch::new("PATCHLM_DEVICE_CLIP", true, true);

/// Lets [`adamw_multi_clipped`] hand the gradients' sum of squares to the multi-tensor CUDA
/// kernel, which computes the clipping factor itself: the host enqueues the update without
/// waiting for the norm. On by default (its device test passed on an H200); off (also
/// `PATCHLM_DEVICE_CLIP=0`), the host reads the norm first (a wait for the device in every step).
pub fn set_device_clip(enabled: bool) {
    DEVICE_CLIP.set(enabled);
}

/// Whether [`set_device_clip`] is on.
pub fn device_clip_enabled() -> bool {
    DEVICE_CLIP.get()
}

/// [`adamw_multi`] with the gradients clipped to the global norm `max_norm` (see
/// [`clip_factor`]), given their sum of squares `sumsq` (an f64 scalar on their device, from
/// [`sum_of_squares`]). A non-finite norm updates nothing. With the multi-tensor CUDA kernel and
/// [`set_device_clip`] on, the kernel reads `sumsq` itself; elsewhere it is read here first.
pub fn adamw_multi_clipped(
    slots: &mut [AdamWSlot<'_>],
    step: &AdamWStep,
    sumsq: &Tensor,
    max_norm: f64,
) -> candle_core::Result<()> {
    #[cfg(feature = "cuda")]
    if let Some(first) = slots.first() {
        if let Device::Cuda(dev) = first.param.device() {
            if multi_tensor_cuda(first.param.device())
                && DEVICE_CLIP.get()
                && sumsq.device().same_device(first.param.device())
            {
                check_adamw_slots(slots)?;
                return cuda::multi_adamw(dev, slots, step, 1.0, Some((sumsq, max_norm)));
            }
        }
    }
    match host_clip_factor(sumsq, max_norm)? {
        Some(factor) => adamw_multi(slots, step, factor),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// `adamw_update` against PyTorch's AdamW written out in f64 (decoupled decay, bias
    /// corrections, ε outside the square root), over three steps with the moments carried, on a
    /// parameter of several of the CPU's 4096-element chunks; gradients or moments of another size
    /// are refused.
    #[test]
    fn adamw_update_follows_torch_adamw_in_f64() {
        let dev = Device::Cpu;
        let n = 9_000;
        let (lr, b1, b2, eps, wd) = (3e-3, 0.9, 0.95, 1e-8, 0.1);
        let mut rng = crate::SplitMix64(7);
        let mut draw = |s: f64| (0..n).map(|_| ((rng.uniform() - 0.5) * s) as f32).collect::<Vec<f32>>();
        let p0 = draw(2.0);
        let (mut p, mut mv) =
            (Tensor::new(p0.as_slice(), &dev).unwrap(), Tensor::zeros((2, n), DType::F32, &dev).unwrap());
        let mut want: Vec<f64> = p0.iter().map(|&x| x as f64).collect();
        let (mut m, mut v) = (vec![0f64; n], vec![0f64; n]);
        for t in 1..=3 {
            let mut g = draw(1.0 + t as f64);
            // Where ε matters: gradients of 0 (0 / (0 + ε)) and of the size of ε.
            g[..10].fill(0.0);
            g[10..20].fill(1e-8);
            let step = AdamWStep {
                lr,
                beta1: b1,
                beta2: b2,
                eps,
                decay: 1.0 - lr * wd,
                bias1: 1.0 - b1.powi(t),
                bias2: 1.0 - b2.powi(t),
            };
            (p, mv) = adamw_update(&p, &Tensor::new(g.as_slice(), &dev).unwrap(), &mv, &step).unwrap();
            for i in 0..n {
                let gi = g[i] as f64;
                want[i] *= 1.0 - lr * wd;
                m[i] = b1 * m[i] + (1.0 - b1) * gi;
                v[i] = b2 * v[i] + (1.0 - b2) * gi * gi;
                let (mh, vh) = (m[i] / (1.0 - b1.powi(t)), v[i] / (1.0 - b2.powi(t)));
                want[i] -= lr * mh / (vh.sqrt() + eps);
            }
            let got = p.to_vec1::<f32>().unwrap();
            let (gm, gv) = (mv.get(0).unwrap().to_vec1::<f32>().unwrap(), mv.get(1).unwrap().to_vec1::<f32>().unwrap());
            for i in 0..n {
                // Each step moves a parameter by about lr; its f32 arithmetic errs by far less.
                assert!((got[i] as f64 - want[i]).abs() < 1e-6, "step {t} [{i}]: {} vs {}", got[i], want[i]);
                // The moments (of gradients up to ±2) to f32's resolution at that size.
                assert!((gm[i] as f64 - m[i]).abs() < 1e-6, "m step {t} [{i}]: {} vs {}", gm[i], m[i]);
                assert!((gv[i] as f64 - v[i]).abs() < 1e-6, "v step {t} [{i}]: {} vs {}", gv[i], v[i]);
            }
        }
        let step = AdamWStep { lr, beta1: b1, beta2: b2, eps, decay: 1.0, bias1: 0.1, bias2: 0.05 };
        let short = Tensor::zeros(n - 1, DType::F32, &dev).unwrap();
        let e = adamw_update(&p, &short, &mv, &step).unwrap_err().to_string();
        assert!(e.contains("do not fit the parameter"), "{e}");
        let e = adamw_update(&p, &p, &mv.narrow(1, 1, n - 1).unwrap(), &step).unwrap_err().to_string();
        assert!(e.contains("do not fit the parameter"), "{e}");
    }

    /// A step with decay and bias corrections far from 1 (so that a wrong one shows).
    const STEP: AdamWStep =
        AdamWStep { lr: 1e-2, beta1: 0.9, beta2: 0.95, eps: 1e-8, decay: 0.999, bias1: 0.1, bias2: 0.05 };

    /// Moments that are not contiguous take the out-of-place path, with the same result as the
    /// in-place one, with and without a gradient scale; slots of the wrong dtypes or sizes are
    /// refused before anything is updated.
    #[test]
    fn adamw_multi_on_strided_moments_and_bad_slots() {
        let dev = Device::Cpu;
        let n = 300;
        let step = STEP;
        let p0 = Tensor::randn(0f32, 1.0, n, &dev).unwrap();
        let g = Tensor::randn(0f32, 1.0, n, &dev).unwrap();
        let m0 = (Tensor::randn(0f32, 0.1, (2, n), &dev).unwrap().abs().unwrap() + 0.01).unwrap();
        for scale in [1.0, 0.37] {
            let run = |strided: bool| {
                let p = Var::from_tensor(&p0.copy().unwrap()).unwrap();
                let mut m =
                    if strided { m0.t().unwrap().contiguous().unwrap().t().unwrap() } else { m0.copy().unwrap() };
                assert_eq!(m.is_contiguous(), !strided);
                let mut slots = [AdamWSlot { param: &p, grad: &g, moments: &mut m, decay: true }];
                adamw_multi(&mut slots, &step, scale).unwrap();
                (p.as_tensor().to_vec1::<f32>().unwrap(), m.flatten_all().unwrap().to_vec1::<f32>().unwrap())
            };
            let (inplace, strided) = (run(false), run(true));
            assert_ne!(inplace.0, p0.to_vec1::<f32>().unwrap());
            // The same arithmetic but for the gradient's scaling (one f32 multiply either way).
            for (a, b) in inplace.0.iter().chain(&inplace.1).zip(strided.0.iter().chain(&strided.1)) {
                assert!((a - b).abs() <= 1e-6 * a.abs().max(1.0), "scale {scale}: {a} vs {b}");
            }
        }
        let p = Var::from_tensor(&p0).unwrap();
        let p16 = Var::from_tensor(&p0.to_dtype(DType::BF16).unwrap()).unwrap();
        let (g16, short) = (g.to_dtype(DType::F16).unwrap(), g.narrow(0, 0, n - 1).unwrap());
        let cases: [(&Var, &Tensor, Tensor, &str); 5] = [
            (&p16, &g, m0.clone(), "parameters and moments must be f32"),
            (&p, &g, m0.to_dtype(DType::BF16).unwrap(), "parameters and moments must be f32"),
            (&p, &g16, m0.clone(), "gradients must be f32 or bf16, got F16"),
            (&p, &short, m0.clone(), "do not fit the parameter"),
            (&p, &g, m0.narrow(1, 0, n - 1).unwrap(), "do not fit the parameter"),
        ];
        for (param, grad, mut moments, want) in cases {
            let mut ok = m0.clone();
            let keep = Var::from_tensor(&p0.copy().unwrap()).unwrap();
            // A good slot first: it is left as it was, since the bad one is found first.
            let mut slots = [
                AdamWSlot { param: &keep, grad: &g, moments: &mut ok, decay: true },
                AdamWSlot { param, grad, moments: &mut moments, decay: true },
            ];
            let e = adamw_multi(&mut slots, &step, 1.0).unwrap_err().to_string();
            assert!(e.contains(want), "{e}");
            assert_eq!(keep.as_tensor().to_vec1::<f32>().unwrap(), p0.to_vec1::<f32>().unwrap());
        }
    }

    /// The clipped update is the update with torch's clip factor from the sum of squares; a
    /// non-finite norm updates nothing. (The device-clip switch only changes which side reads the
    /// norm on CUDA.)
    #[test]
    fn adamw_multi_clipped_scales_by_the_clip_factor_and_skips_non_finite_norms() {
        let dev = Device::Cpu;
        let step = STEP;
        let p0 = Tensor::randn(0f32, 1.0, 50, &dev).unwrap();
        let g = Tensor::randn(0f32, 1.0, 50, &dev).unwrap();
        let run = |clip: Option<(f64, f64)>, factor: f64| {
            let p = Var::from_tensor(&p0.copy().unwrap()).unwrap();
            let mut m = Tensor::zeros((2, 50), DType::F32, &dev).unwrap();
            let mut slots = [AdamWSlot { param: &p, grad: &g, moments: &mut m, decay: true }];
            match clip {
                Some((sumsq, max_norm)) => {
                    adamw_multi_clipped(&mut slots, &step, &Tensor::new(sumsq, &dev).unwrap(), max_norm).unwrap()
                }
                None => adamw_multi(&mut slots, &step, factor).unwrap(),
            }
            (p.as_tensor().to_vec1::<f32>().unwrap(), m.flatten_all().unwrap().to_vec1::<f32>().unwrap())
        };
        // Norm 5 clipped to 1: a factor of 1 / (5 + 1e-6); to 10: none.
        assert_eq!(run(Some((25.0, 1.0)), 0.0), run(None, 1.0 / (5.0 + 1e-6)));
        assert_eq!(run(Some((25.0, 10.0)), 0.0), run(None, 1.0));
        assert_ne!(run(None, 1.0), run(None, 1.0 / (5.0 + 1e-6)));
        for bad in [f64::NAN, f64::INFINITY] {
            let (p, m) = run(Some((bad, 1.0)), 0.0);
            assert_eq!(p, p0.to_vec1::<f32>().unwrap());
            assert!(m.iter().all(|&x| x == 0.0));
        }
        for on in [false, true] {
            set_device_clip(on);
            assert_eq!(device_clip_enabled(), on);
        }
    }

    /// The CPU's in-place multi-tensor update equals one `adamw_update` per parameter bit for
    /// bit, over three steps (moments carried), with clipping scale and with and without decay.
    #[test]
    fn cpu_in_place_update_equals_adamw_update() {
        let dev = Device::Cpu;
        let shapes: [&[usize]; 3] = [&[37, 5], &[300], &[20_000]];
        let params: Vec<Var> = shapes
            .iter()
            .enumerate()
            .map(|(i, s)| Var::from_tensor(&(Tensor::randn(0f32, 1.0, *s, &dev).unwrap() + i as f64).unwrap()).unwrap())
            .collect();
        let mut want: Vec<(Tensor, Tensor)> = params
            .iter()
            .map(|p| (p.as_tensor().copy().unwrap(), Tensor::zeros((2, p.elem_count()), DType::F32, &dev).unwrap()))
            .collect();
        let mut moments: Vec<Tensor> = want.iter().map(|(_, m)| m.copy().unwrap()).collect();
        for t in 1..=3 {
            let grads: Vec<Tensor> = shapes.iter().map(|s| Tensor::randn(0f32, 1.0, *s, &dev).unwrap()).collect();
            let step = AdamWStep {
                lr: 1e-2,
                beta1: 0.9,
                beta2: 0.95,
                eps: 1e-8,
                decay: 1.0 - 1e-3,
                bias1: 1.0 - 0.9f64.powi(t),
                bias2: 1.0 - 0.95f64.powi(t),
            };
            let scale = 0.37;
            let mut slots: Vec<AdamWSlot<'_>> = params
                .iter()
                .zip(&grads)
                .zip(moments.iter_mut())
                .enumerate()
                .map(|(i, ((p, g), m))| AdamWSlot { param: p, grad: g, moments: m, decay: i != 1 })
                .collect();
            adamw_multi(&mut slots, &step, scale).unwrap();
            for (i, ((p, m), g)) in want.iter_mut().zip(&grads).enumerate() {
                let st = AdamWStep { decay: if i != 1 { step.decay } else { 1.0 }, ..step };
                let (np, nm) = adamw_update(p, &(g * scale).unwrap(), m, &st).unwrap();
                (*p, *m) = (np, nm);
            }
            for (i, (p, (wp, wm))) in params.iter().zip(&want).enumerate() {
                let same = |a: &Tensor, b: &Tensor| {
                    let (a, b) = (
                        a.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                        b.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                    );
                    a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits())
                };
                assert!(same(p.as_tensor(), wp), "parameter {i}, step {t}");
                assert!(same(&moments[i], wm), "moments {i}, step {t}");
            }
        }
    }

    /// The host-side factor: torch's formula for a finite norm (the sum of squares is read in any
    /// float dtype, as a scalar or a one-element tensor), `None` for a NaN or infinite one.
    #[test]
    fn host_clip_factor_reads_the_norm_and_refuses_non_finite_ones() {
        let dev = Device::Cpu;
        // norm 5: clipped to 1 → 1 / (5 + 1e-6); to 10 → not clipped.
        let sumsq = Tensor::new(25f64, &dev).unwrap();
        let f = host_clip_factor(&sumsq, 1.0).unwrap().unwrap();
        assert!((f - 1.0 / (5.0 + 1e-6)).abs() < 1e-15, "{f}");
        assert_eq!(host_clip_factor(&sumsq, 10.0).unwrap(), Some(1.0));
        assert_eq!(host_clip_factor(&sumsq, 0.0).unwrap(), Some(1.0), "max_norm 0: no clipping");
        let one = Tensor::new(&[25f32], &dev).unwrap().to_dtype(DType::BF16).unwrap();
        assert_eq!(host_clip_factor(&one, 10.0).unwrap(), Some(1.0));
        for bad in [f64::NAN, f64::INFINITY] {
            assert_eq!(host_clip_factor(&Tensor::new(bad, &dev).unwrap(), 1.0).unwrap(), None, "{bad}");
        }
    }
}
