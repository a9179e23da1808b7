//! The causal softmax of attention scores ([`causal_softmax`]).

use super::*;

/// Causal softmax over the last dimension of attention scores `x` (..., T, S) with S ≥ T (the
/// last T of S positions are the queries, as with a KV cache): row i of each (T, S) matrix is
/// `softmax(scale · x[i, 0..=S−T+i])` and 0 at the masked positions. The scaling, the mask and
/// the statistics are fused into one pass in f32; the result has `x`'s dtype (f32, bf16 or f16).
/// Differentiable in `x`: dx = scale · y ⊙ (dy − Σ y ⊙ dy).
pub fn causal_softmax(x: &Tensor, scale: f64) -> candle_core::Result<Tensor> {
    let dims = x.dims();
    if dims.len() < 2 || dims[dims.len() - 1] < dims[dims.len() - 2] || dims[dims.len() - 2] == 0 {
        candle_core::bail!("causal_softmax: expected scores (..., T, S) with S ≥ T ≥ 1, got {dims:?}");
    }
    let (t, s) = (dims[dims.len() - 2], dims[dims.len() - 1]);
    x.contiguous()?.apply_op1(CausalSoftmax { scale: scale as f32, t, s })
}

pub(super) struct CausalSoftmax {
    pub(super) scale: f32,
    pub(super) t: usize,
    pub(super) s: usize,
}

/// Backward of [`CausalSoftmax`]: (y, dy) → dx.
struct CausalSoftmaxGrad {
    scale: f32,
    t: usize,
    s: usize,
}

fn causal_softmax_fwd<T: Float>(x: &[T], t: usize, s: usize, scale: f32) -> Vec<T> {
    let mut out = vec![T::from_f(0.0); x.len()];
    out.par_chunks_mut(s).zip(x.par_chunks(s)).enumerate().for_each(|(r, (o, row))| {
        let lim = s - t + r % t + 1;
        if let (Some(x), Some(o)) = (T::as_f32(&row[..lim]), T::as_f32_mut(&mut o[..lim])) {
            // scale > 0, so max(scale · x) = scale · max(x), bit for bit.
            let m = vmath::max(x) * scale;
            let inv = 1.0 / vmath::exp_into(x, scale, m, 1.0, o);
            return vmath::scale(o, inv);
        }
        let m = row[..lim].iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v.f() * scale));
        let e: Vec<f32> = row[..lim].iter().map(|&v| vmath::exp(v.f() * scale - m)).collect();
        let inv = 1.0 / e.iter().sum::<f32>();
        for (o, e) in o.iter_mut().zip(e) {
            *o = T::from_f(e * inv);
        }
    });
    out
}

fn causal_softmax_bwd<T: Float>(y: &[T], dy: &[T], t: usize, s: usize, scale: f32) -> Vec<T> {
    let mut out = vec![T::from_f(0.0); y.len()];
    out.par_chunks_mut(s).zip(y.par_chunks(s).zip(dy.par_chunks(s))).enumerate().for_each(|(r, (o, (y, g)))| {
        let lim = s - t + r % t + 1;
        let dot: f32 = y[..lim].iter().zip(&g[..lim]).map(|(&a, &b)| a.f() * b.f()).sum();
        for ((o, &a), &b) in o[..lim].iter_mut().zip(&y[..lim]).zip(&g[..lim]) {
            *o = T::from_f(scale * a.f() * (b.f() - dot));
        }
    });
    out
}

impl candle_core::CustomOp1 for CausalSoftmax {
    fn name(&self) -> &'static str {
        "causal-softmax"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (t, s, k) = (self.t, self.s, self.scale);
        let out = map_float!("causal_softmax", s1, l1, "scores", |x| causal_softmax_fwd(x, t, s, k));
        Ok((out, l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        cuda::causal_softmax(s1, l1, None, self.t, self.s, self.scale)
    }

    fn bwd(&self, _x: &Tensor, y: &Tensor, dy: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let dy = dy.to_dtype(y.dtype())?.contiguous()?;
        Ok(Some(y.apply_op2_no_bwd(&dy, &CausalSoftmaxGrad { scale: self.scale, t: self.t, s: self.s })?))
    }
}

impl CustomOp2 for CausalSoftmaxGrad {
    fn name(&self) -> &'static str {
        "causal-softmax-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (t, s, k) = (self.t, self.s, self.scale);
        let out =
            map_float2!("causal_softmax", (s1, l1, "y"), (s2, l2, "dy"), |y, g| causal_softmax_bwd(y, g, t, s, k));
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
        cuda::causal_softmax(s1, l1, Some((s2, l2)), self.t, self.s, self.scale)
    }
}
