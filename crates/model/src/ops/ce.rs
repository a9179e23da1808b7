//! Softmax cross-entropy with K targets per row ([`cross_entropy_multi`], [`cross_entropy_multi_lse`]).

use super::*;

/// (N, K) of matching logits (N, V) and u32 targets (N, K ≥ 1), or an error naming both.
fn ce_dims(logits: &Tensor, targets: &Tensor) -> candle_core::Result<(usize, usize)> {
    let (n, _v) = logits.dims2()?;
    let (tn, k) = targets.dims2()?;
    if tn != n || k == 0 {
        candle_core::bail!("cross_entropy_multi: logits {:?} and targets {:?} disagree", logits.dims(), targets.dims());
    }
    if targets.dtype() != DType::U32 {
        candle_core::bail!("cross_entropy_multi: targets must be u32, got {:?}", targets.dtype());
    }
    Ok((n, k))
}

/// Mean over all rows and targets of −log softmax(logits)\[target\]: `logits` (N, V) in f32, bf16
/// or f16, `targets` (N, K) of u32 ids < V. Returns an f32 scalar; differentiable in `logits`.
/// An id ≥ V is an error on the CPU; on CUDA, where checking would need a copy to the host, it
/// makes the loss NaN (its row's kernel reads no logit for it) and adds no gradient entry.
pub fn cross_entropy_multi(logits: &Tensor, targets: &Tensor) -> candle_core::Result<Tensor> {
    let (n, k) = ce_dims(logits, targets)?;
    let rows = logits.contiguous()?.apply_op2(&targets.contiguous()?, MultiTargetCe { lse: false })?;
    rows.sum_all()? / (n * k) as f64
}

/// Forward: per-row Σ_k (lse − logit[t_k]) in f32, shape (N,).
pub(super) struct MultiTargetCe {
    /// Also return each row's log-sum-exp: output (2, N), losses then log-sum-exps (no autograd).
    pub(super) lse: bool,
}

/// Backward: `grad` (N,) → g_i · (K · softmax_ij − #{k : t_ik = j}), in the logits' dtype; with
/// `lse`, `grad` is (2, N): the per-row scales, then the forward's log-sum-exps.
pub(super) struct MultiTargetCeGrad {
    pub(super) lse: bool,
}

/// (max, log Σ exp(x − max)) of one row, in f32.
fn row_stats<T: Float>(row: &[T]) -> (f32, f32) {
    if let Some(x) = T::as_f32(row) {
        let m = vmath::max(x);
        return (m, vmath::sum_exp(x, 1.0, m).ln());
    }
    let m = row.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x.f()));
    let s: f32 = row.iter().map(|&x| vmath::exp(x.f() - m)).sum();
    (m, s.ln())
}

fn targets_of<'a>(s: &'a CpuStorage, l: &Layout) -> candle_core::Result<&'a [u32]> {
    match s {
        CpuStorage::U32(t) => contiguous(t, l, "targets"),
        _ => candle_core::bail!("cross_entropy_multi: targets must be u32"),
    }
}

fn check_target(t: u32, v: usize) -> candle_core::Result<usize> {
    if (t as usize) < v {
        Ok(t as usize)
    } else {
        candle_core::bail!("cross_entropy_multi: target id {t} is outside the vocabulary of {v}")
    }
}

/// Per-row losses Σ_k (lse − logit[t_k]), then (`lse`) per-row log-sum-exps: one pass over
/// each row's logits for both.
fn ce_fwd_rows<T: Float>(x: &[T], t: &[u32], n: usize, v: usize, k: usize, lse: bool) -> candle_core::Result<Vec<f32>> {
    for &id in t {
        check_target(id, v)?;
    }
    let (losses, lses): (Vec<f32>, Vec<f32>) = (0..n)
        .into_par_iter()
        .map(|i| {
            let row = &x[i * v..(i + 1) * v];
            let (m, l) = row_stats(row);
            (t[i * k..(i + 1) * k].iter().map(|&id| m + l - row[id as usize].f()).sum::<f32>(), m + l)
        })
        .unzip();
    let mut out = losses;
    if lse {
        out.extend(lses);
    }
    Ok(out)
}

fn ce_bwd<T: Float>(x: &[T], t: &[u32], g: &[f32], v: usize, k: usize) -> Vec<T> {
    ce_bwd_with(x, t, g, v, k, |_, row| {
        let (m, l) = row_stats(row);
        m + l
    })
}

/// row\[id\] −= g for each target id (ids checked against the vocabulary by the caller);
/// a repeated id is subtracted once per occurrence.
fn subtract_at(row: &mut [f32], ids: &[u32], g: f32) {
    for &id in ids {
        row[id as usize] -= g;
    }
}

/// `g_i · (K · softmax − counts)` row by row, with row i's log-sum-exp from `lse_of(i, row)`.
fn ce_bwd_with<T: Float>(
    x: &[T],
    t: &[u32],
    g: &[f32],
    v: usize,
    k: usize,
    lse_of: impl Fn(usize, &[T]) -> f32 + Sync,
) -> Vec<T> {
    let mut out = vec![T::from_f(0.0); x.len()];
    out.par_chunks_mut(v).enumerate().for_each(|(i, o)| {
        let row = &x[i * v..(i + 1) * v];
        let lse = lse_of(i, row);
        let gi = g[i];
        let scale = gi * k as f32;
        if let (Some(row), Some(o)) = (T::as_f32(row), T::as_f32_mut(o)) {
            vmath::exp_into(row, 1.0, lse, scale, o);
            subtract_at(o, &t[i * k..(i + 1) * k], gi);
            return;
        }
        let mut acc: Vec<f32> = row.iter().map(|&xv| scale * vmath::exp(xv.f() - lse)).collect();
        subtract_at(&mut acc, &t[i * k..(i + 1) * k], gi);
        for (o, a) in o.iter_mut().zip(acc) {
            *o = T::from_f(a);
        }
    });
    out
}

impl CustomOp2 for MultiTargetCe {
    fn name(&self) -> &'static str {
        "cross-entropy-multi"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (n, v) = l1.shape().dims2()?;
        let (_, k) = l2.shape().dims2()?;
        let t = targets_of(s2, l2)?;
        let lse = self.lse;
        let rows = match s1 {
            CpuStorage::F32(x) => ce_fwd_rows(contiguous(x, l1, "logits")?, t, n, v, k, lse)?,
            CpuStorage::BF16(x) => ce_fwd_rows(contiguous(x, l1, "logits")?, t, n, v, k, lse)?,
            CpuStorage::F16(x) => ce_fwd_rows(contiguous(x, l1, "logits")?, t, n, v, k, lse)?,
            _ => candle_core::bail!("cross_entropy_multi: logits must be f32, bf16 or f16"),
        };
        Ok((CpuStorage::F32(rows), if lse { Shape::from((2, n)) } else { Shape::from(n) }))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        cuda::ce_fwd(s1, l1, s2, l2, self.lse)
    }

    fn bwd(
        &self,
        logits: &Tensor,
        targets: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        if self.lse {
            candle_core::bail!("cross_entropy_multi_lse records no graph: use grad::cross_entropy_multi_lse");
        }
        let g = grad_res.to_dtype(DType::F32)?.contiguous()?;
        let d = logits.apply_op3_no_bwd(targets, &g, &MultiTargetCeGrad { lse: false })?;
        Ok((Some(d), None))
    }
}

impl CustomOp3 for MultiTargetCeGrad {
    fn name(&self) -> &'static str {
        "cross-entropy-multi-grad"
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
        let (n, v) = l1.shape().dims2()?;
        let (_, k) = l2.shape().dims2()?;
        let t = targets_of(s2, l2)?;
        let g = contiguous_f32(s3, l3, "cross_entropy_multi: gradient")?;
        for &id in t {
            check_target(id, v)?;
        }
        let out = if self.lse {
            let (g, lse) = g.split_at(n);
            map_float!("cross_entropy_multi", s1, l1, "logits", |x| ce_bwd_with(x, t, g, v, k, |i, _| lse[i]))
        } else {
            map_float!("cross_entropy_multi", s1, l1, "logits", |x| ce_bwd(x, t, g, v, k))
        };
        Ok((out, Shape::from((n, v))))
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
        cuda::ce_bwd(s1, l1, s2, l2, s3, l3, self.lse)
    }
}

/// [`MultiTargetCeGrad`] with `lse`, written over the f32 logits on the CPU
/// ([`grad::cross_entropy_multi_lse_in_place`]).
pub(super) struct MultiTargetCeGradInPlace;

impl candle_core::InplaceOp3 for MultiTargetCeGradInPlace {
    fn name(&self) -> &'static str {
        "cross-entropy-multi-grad-in-place"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<()> {
        let (n, v) = l1.shape().dims2()?;
        let (_, k) = l2.shape().dims2()?;
        let t = targets_of(s2, l2)?;
        let gl = contiguous_f32(s3, l3, "cross_entropy_multi: gradient")?;
        let x = contiguous_f32_mut(s1, l1, "cross_entropy_multi: in-place logits")?;
        for &id in t {
            check_target(id, v)?;
        }
        let (g, lse) = gl.split_at(n);
        x.par_chunks_mut(v).enumerate().for_each(|(i, row)| {
            // The arithmetic of `ce_bwd_with`: g_i · K · e^(x − lse), then − g_i per target.
            vmath::exp_in_place(row, 1.0, lse[i], g[i] * k as f32);
            subtract_at(row, &t[i * k..(i + 1) * k], g[i]);
        });
        Ok(())
    }
}

/// Whether [`cross_entropy_multi_lse`] and [`grad::cross_entropy_multi_lse`] run on `device`:
/// the CPU (with the fused ops), CUDA with the second-generation row kernels
/// ([`set_rows_cuda`]).
pub fn ce_lse_supported(device: &Device) -> bool {
    fused_ops_supported(device) && (device.is_cpu() || ROWS_CUDA.get())
}

/// [`cross_entropy_multi`] for a hand-written backward pass: the mean loss (f32 scalar) and
/// each row's log-sum-exp (N,) f32, which [`grad::cross_entropy_multi_lse`] takes so that the
/// backward pass reads the logits once instead of twice. Records no graph.
pub fn cross_entropy_multi_lse(logits: &Tensor, targets: &Tensor) -> candle_core::Result<(Tensor, Tensor)> {
    let (n, k) = ce_dims(logits, targets)?;
    let out = logits.contiguous()?.apply_op2_no_bwd(&targets.contiguous()?, &MultiTargetCe { lse: true })?;
    Ok(((out.get(0)?.sum_all()? / (n * k) as f64)?, out.get(1)?))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// The gradient written over the logits equals the one written to a new buffer, bit for bit
    /// (K = 3 targets with a repeat; rows longer than a vector and a ragged tail); bad targets
    /// are refused by every gradient entry point.
    #[test]
    fn in_place_gradient_equals_the_out_of_place_one() {
        let dev = Device::Cpu;
        let (n, v, k) = (7, 1003, 3);
        let logits = (Tensor::randn(0f32, 3.0, (n, v), &dev).unwrap() + 1.0).unwrap();
        let ids: Vec<u32> =
            (0..n * k).map(|i| if i % 5 == 4 { (i as u32 - 1) % v as u32 } else { (i * 97 % v) as u32 }).collect();
        let targets = Tensor::from_vec(ids, (n, k), &dev).unwrap();
        let (_, lse) = cross_entropy_multi_lse(&logits, &targets).unwrap();
        let want = grad::cross_entropy_multi_lse(&logits, &targets, &lse, 0.75).unwrap();
        let got = grad::cross_entropy_multi_lse_in_place(logits.copy().unwrap(), &targets, &lse, 0.75).unwrap();
        let (w, g) = (
            want.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            got.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        );
        assert!(w.iter().zip(&g).all(|(a, b)| a.to_bits() == b.to_bits()));
        // The gradient without the log-sum-exps is the same (up to summation order), at its scale.
        let plain = grad::cross_entropy_multi(&logits, &targets, 0.75).unwrap();
        let p = plain.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!(w.iter().zip(&p).all(|(a, b)| (a - b).abs() <= 1e-6 * a.abs().max(1e-3)), "{:?}", &p[..4]);
        // Written over the logits where they are f32, contiguous and on the CPU: another handle
        // on their storage sees the gradient. Elsewhere a new buffer, the logits left as they were.
        let shared = logits.copy().unwrap();
        let handle = shared.clone();
        let got = grad::cross_entropy_multi_lse_in_place(shared, &targets, &lse, 0.75).unwrap();
        let h = handle.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!(h.iter().zip(&g).all(|(a, b)| a.to_bits() == b.to_bits()), "not written in place");
        drop(got);
        let bf = logits.to_dtype(DType::BF16).unwrap();
        let want_bf = grad::cross_entropy_multi_lse(&bf, &targets, &lse, 0.75).unwrap();
        let transposed = logits.t().unwrap().contiguous().unwrap().t().unwrap();
        assert!(!transposed.is_contiguous());
        for (x, want) in [(bf, &want_bf), (transposed, &want)] {
            let handle = x.clone();
            let before = handle.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let got = grad::cross_entropy_multi_lse_in_place(x, &targets, &lse, 0.75).unwrap();
            assert_eq!(got.dtype(), want.dtype());
            let diff = (got.to_dtype(DType::F32).unwrap() - want.to_dtype(DType::F32).unwrap()).unwrap();
            assert_eq!(diff.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap(), 0.0);
            let after = handle.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert_eq!(before, after, "{:?} logits written over", handle.dtype());
        }
        // Log-sum-exps must be f32 (N,).
        let e = grad::cross_entropy_multi_lse(&logits, &targets, &lse.to_dtype(DType::BF16).unwrap(), 1.0).unwrap_err();
        assert!(e.to_string().contains("is not f32 (7,)"), "{e}");
        let bad = Tensor::from_vec(vec![v as u32; n * k], (n, k), &dev).unwrap();
        assert!(grad::cross_entropy_multi_lse(&logits, &bad, &lse, 1.0).is_err());
        assert!(grad::cross_entropy_multi(&logits, &bad, 1.0).is_err());
        assert!(grad::cross_entropy_multi_lse_in_place(logits, &bad, &lse, 1.0).is_err());
    }
}
