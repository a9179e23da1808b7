//! RMSNorm ([`rms_norm`]) and RMSNorm with the residual add fused in ([`add_rms_norm`]).

use super::*;

/// RMSNorm over the last dimension, fused: `x · rsqrt(mean(x²) + eps)` computed in f32, cast
/// back to `x`'s dtype, times `weight` (HF LLaMA's order). `x` (..., D) in f32, bf16 or f16,
/// `weight` (D,) in the same dtype. Differentiable in both.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    let d = x.dim(candle_core::D::Minus1)?;
    if weight.dims() != [d] {
        candle_core::bail!("rms_norm: weight {:?} does not match the last dimension of {:?}", weight.dims(), x.dims());
    }
    let shape = x.shape().clone();
    let rows = x.elem_count() / d.max(1);
    let y = x.reshape((rows, d))?.contiguous()?.apply_op2(&weight.contiguous()?, RmsNormOp { eps: eps as f32 })?;
    y.reshape(shape)
}

struct RmsNormOp {
    eps: f32,
}

/// Backward of [`RmsNormOp`]: (x (N, D), w, dy) → dx and dw in one flat buffer of N·D + D
/// elements (dx first; see [`rms_norm_backward`]), from one pass over x and dy. With `residual`
/// (N, D), dx + residual (a residual branch's gradient, added before the one rounding).
struct RmsNormGrad {
    eps: f32,
    residual: Option<Tensor>,
}

/// Both gradients of RMSNorm from one [`RmsNormGrad`] launch: x (rows, D) → (dx like x, dw (D,)),
/// dx plus `residual` where given (on CUDA that takes the warp-per-row kernels, see
/// [`set_rows_cuda`]; without them the residual is added by a separate kernel).
pub(super) fn rms_norm_backward(
    x: &Tensor,
    w: &Tensor,
    dy: &Tensor,
    residual: Option<&Tensor>,
    eps: f32,
) -> candle_core::Result<(Tensor, Tensor)> {
    let (rows, d) = x.dims2()?;
    if let Some(r) = residual {
        if r.dims() != [rows, d] || r.dtype() != x.dtype() {
            candle_core::bail!(
                "rms_norm: residual gradient {:?} {:?} does not match x {:?}",
                r.dims(),
                r.dtype(),
                x.dims()
            );
        }
        if x.device().is_cuda() && !ROWS_CUDA.get() {
            let (dx, dw) = rms_norm_backward(x, w, dy, None, eps)?;
            return Ok(((dx + r)?, dw));
        }
    }
    let op = RmsNormGrad { eps, residual: residual.map(|r| r.contiguous()).transpose()? };
    let both = x.contiguous()?.apply_op3_no_bwd(&w.contiguous()?, &dy.contiguous()?, &op)?;
    Ok((both.narrow(0, 0, rows * d)?.reshape((rows, d))?, both.narrow(0, rows * d, d)?))
}

/// A residual add fused with the RMSNorm after it, for a hand-written backward pass (no graph):
/// `a`, `b` (rows, D) → (s = a + b, [`rms_norm`]`(s, weight)`), one pass over the rows (with the
/// warp-per-row kernels on CUDA, see [`set_rows_cuda`]; otherwise an add and the norm).
pub fn add_rms_norm(a: &Tensor, b: &Tensor, weight: &Tensor, eps: f64) -> candle_core::Result<(Tensor, Tensor)> {
    let (rows, d) = a.dims2()?;
    if b.dims() != a.dims() || b.dtype() != a.dtype() || weight.dims() != [d] {
        candle_core::bail!(
            "add_rms_norm: a {:?}, b {:?} and weight {:?} do not match",
            a.dims(),
            b.dims(),
            weight.dims()
        );
    }
    if a.device().is_cuda() && !ROWS_CUDA.get() {
        let s = (a + b)?;
        let y = rms_norm(&s, weight, eps)?;
        return Ok((s, y));
    }
    let both =
        a.contiguous()?.apply_op3_no_bwd(&b.contiguous()?, &weight.contiguous()?, &AddRmsOp { eps: eps as f32 })?;
    Ok((both.narrow(0, 0, rows * d)?.reshape((rows, d))?, both.narrow(0, rows * d, rows * d)?.reshape((rows, d))?))
}

/// (a, b, w) → [s = a + b | rms_norm(s, w)] as one flat buffer of 2·N·D.
struct AddRmsOp {
    eps: f32,
}

fn add_rms_fwd<T: Float>(a: &[T], b: &[T], w: &[T], d: usize, eps: f32) -> Vec<T> {
    let s: Vec<T> = a.par_iter().zip(b).map(|(&x, &y)| T::from_f(x.f() + y.f())).collect();
    let y = rms_fwd(&s, w, d, eps);
    let mut out = s;
    out.extend(y);
    out
}

impl CustomOp3 for AddRmsOp {
    fn name(&self) -> &'static str {
        "add-rms-norm"
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
        let (n, d) = l1.shape().dims2()?;
        let out = map_float3!("add_rms_norm", (s1, l1, "a"), (s2, l2, "b"), (s3, l3, "weight"), |a, b, w| {
            add_rms_fwd(a, b, w, d, self.eps)
        });
        Ok((out, Shape::from(2 * n * d)))
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
        cuda::add_rms_fwd(s1, l1, s2, l2, s3, l3, self.eps)
    }
}

fn rms_of<T: Float>(row: &[T], eps: f32) -> f32 {
    let ss: f32 = row.iter().map(|&a| a.f() * a.f()).sum();
    1.0 / (ss / row.len() as f32 + eps).sqrt()
}

fn rms_fwd<T: Float>(x: &[T], w: &[T], d: usize, eps: f32) -> Vec<T> {
    let mut out = vec![T::from_f(0.0); x.len()];
    out.par_chunks_mut(d).zip(x.par_chunks(d)).for_each(|(o, row)| {
        let r = rms_of(row, eps);
        for ((o, &a), &wj) in o.iter_mut().zip(row).zip(w) {
            // Normalised value rounded to the input dtype, then scaled (as HF does).
            *o = T::from_f(T::from_f(a.f() * r).f() * wj.f());
        }
    });
    out
}

fn rms_dx<T: Float>(x: &[T], w: &[T], dy: &[T], residual: Option<&[T]>, d: usize, eps: f32) -> Vec<T> {
    let mut out = vec![T::from_f(0.0); x.len()];
    out.par_chunks_mut(d).zip(x.par_chunks(d).zip(dy.par_chunks(d))).enumerate().for_each(|(i, (o, (row, g)))| {
        let r = rms_of(row, eps);
        let dot: f32 = row.iter().zip(g).zip(w).map(|((&a, &gy), &wj)| a.f() * gy.f() * wj.f()).sum();
        let c = dot * r * r * r / d as f32;
        let res = residual.map(|res| &res[i * d..(i + 1) * d]);
        for (j, (((o, &a), &gy), &wj)) in o.iter_mut().zip(row).zip(g).zip(w).enumerate() {
            let v = r * wj.f() * gy.f() - c * a.f();
            *o = T::from_f(res.map_or(v, |res| v + res[j].f()));
        }
    });
    out
}

fn rms_dw<T: Float>(x: &[T], dy: &[T], d: usize, eps: f32) -> Vec<T> {
    let chunk = (x.len() / d).div_ceil(rayon::current_num_threads().max(1)).max(1) * d;
    let partial: Vec<Vec<f32>> = x
        .par_chunks(chunk)
        .zip(dy.par_chunks(chunk))
        .map(|(xs, gs)| {
            let mut acc = vec![0f32; d];
            for (row, g) in xs.chunks(d).zip(gs.chunks(d)) {
                let r = rms_of(row, eps);
                for ((a, &xv), &gy) in acc.iter_mut().zip(row).zip(g) {
                    *a += T::from_f(xv.f() * r).f() * gy.f();
                }
            }
            acc
        })
        .collect();
    let mut dw = vec![0f32; d];
    for p in partial {
        for (a, b) in dw.iter_mut().zip(p) {
            *a += b;
        }
    }
    dw.into_iter().map(T::from_f).collect()
}

impl CustomOp2 for RmsNormOp {
    fn name(&self) -> &'static str {
        "rms-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (_, d) = l1.shape().dims2()?;
        let out = map_float2!("rms_norm", (s1, l1, "x"), (s2, l2, "weight"), |x, w| rms_fwd(x, w, d, self.eps));
        Ok((out, l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        cuda::rms_fwd(s1, l1, s2, l2, self.eps)
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, dw) = rms_norm_backward(x, w, dy, None, self.eps)?;
        Ok((Some(dx), Some(dw)))
    }
}

impl CustomOp3 for RmsNormGrad {
    fn name(&self) -> &'static str {
        "rms-norm-grad"
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
        let (_, d) = l1.shape().dims2()?;
        let guard = self.residual.as_ref().map(|r| r.storage_and_layout());
        let res = match &guard {
            Some((st, l)) => match &**st {
                candle_core::Storage::Cpu(c) => Some((c, *l)),
                _ => candle_core::bail!("rms_norm: the residual gradient must be on the cpu like x"),
            },
            None => None,
        };
        let out = map_float3!("rms_norm", (s1, l1, "x"), (s2, l2, "weight"), (s3, l3, "dy"), |x, w, g| {
            let res = match res {
                Some((c, l)) => Some(contiguous(
                    Float::of(c)
                        .ok_or_else(|| candle_core::Error::Msg("rms_norm: residual dtype differs from x".into()))?,
                    l,
                    "residual",
                )?),
                None => None,
            };
            let mut both = rms_dx(x, w, g, res, d, self.eps);
            both.extend(rms_dw(x, g, d, self.eps));
            both
        });
        Ok((out, Shape::from(l1.shape().elem_count() + d)))
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
        cuda::rms_bwd(s1, l1, s2, l2, s3, l3, self.residual.as_ref(), self.eps)
    }
}
