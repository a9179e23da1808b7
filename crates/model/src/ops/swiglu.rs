//! SwiGLU's gate ([`swiglu`], [`swiglu_packed`]).

use super::*;

static SWIGLU_CUDA: Switch = Switch::new("PATCHLM_SWIGLU_CUDA", true, true);

/// Whether [`swiglu`] runs fused on `device`: wherever the fused ops do (on CUDA unless turned off
/// with `PATCHLM_SWIGLU_CUDA=0` or [`set_swiglu_cuda`]; the tape then composes it from candle ops).
pub fn swiglu_supported(device: &Device) -> bool {
    fused_ops_supported(device) && (device.is_cpu() || SWIGLU_CUDA.get())
}

/// Turns the fused SwiGLU CUDA kernels on or off process-wide (on by default).
pub fn set_swiglu_cuda(enabled: bool) {
    SWIGLU_CUDA.set(enabled);
}

/// SwiGLU's gate: `silu(g) · u` in one pass (f32 arithmetic, one rounding), `g` and `u` of one
/// shape and float dtype. Differentiable in both: dg = dy·u·σ(g)·(1 + g·(1 − σ(g))),
/// du = dy·silu(g), written by one backward pass.
pub fn swiglu(g: &Tensor, u: &Tensor) -> candle_core::Result<Tensor> {
    if g.dims() != u.dims() || g.dtype() != u.dtype() {
        candle_core::bail!("swiglu: gate {:?} {:?} and up {:?} {:?} differ", g.dims(), g.dtype(), u.dims(), u.dtype());
    }
    g.contiguous()?.apply_op2(&u.contiguous()?, SwiGlu)
}

pub(super) struct SwiGlu;

/// SwiGLU on the stacked gate/up projection: `gu` (N, 2F) holds [gate | up] in each row (one
/// matmul against the stacked weights) → `silu(gate) · up` (N, F), the math of [`swiglu`]. Records
/// no graph; the backward pass is [`grad::swiglu_packed`].
pub fn swiglu_packed(gu: &Tensor) -> candle_core::Result<Tensor> {
    let (_, f2) = gu.dims2()?;
    if f2 % 2 != 0 {
        candle_core::bail!("swiglu_packed: {f2} columns is not gate and up of one width");
    }
    gu.contiguous()?.apply_op1_no_bwd(&SwiGluPacked)
}

/// [`swiglu_packed`] (one input) and its backward (gu, dy) → [dg | du] (N, 2F).
pub(super) struct SwiGluPacked;

fn swiglu_packed_fwd<T: Float>(gu: &[T], f: usize) -> Vec<T> {
    let mut out = vec![T::from_f(0.0); gu.len() / 2];
    out.par_chunks_mut(f).zip(gu.par_chunks(2 * f)).for_each(|(o, r)| {
        let (g, u) = r.split_at(f);
        swiglu_rows(g, u, o);
    });
    out
}

fn swiglu_packed_bwd<T: Float>(gu: &[T], dy: &[T], f: usize) -> Vec<T> {
    let mut out = vec![T::from_f(0.0); gu.len()];
    out.par_chunks_mut(2 * f).zip(gu.par_chunks(2 * f).zip(dy.par_chunks(f))).for_each(|(o, (r, d))| {
        let (dg, du) = o.split_at_mut(f);
        let (g, u) = r.split_at(f);
        swiglu_grad_rows(g, u, d, dg, du);
    });
    out
}

/// o = silu(g) · u elementwise: vectorised in f32, element by element otherwise.
fn swiglu_rows<T: Float>(g: &[T], u: &[T], o: &mut [T]) {
    if let (Some(g), Some(u), Some(o)) = (T::as_f32(g), T::as_f32(u), T::as_f32_mut(o)) {
        return vmath::swiglu(g, u, o);
    }
    for ((o, &g), &u) in o.iter_mut().zip(g).zip(u) {
        let g = g.f();
        *o = T::from_f(g * vmath::sigmoid(g) * u.f());
    }
}

/// SwiGLU's backward elementwise: dg = dy·u·σ(g)(1 + g(1 − σ(g))), du = dy·g·σ(g).
fn swiglu_grad_rows<T: Float>(g: &[T], u: &[T], dy: &[T], dg: &mut [T], du: &mut [T]) {
    if let (Some(g), Some(u), Some(dy), Some(dg), Some(du)) =
        (T::as_f32(g), T::as_f32(u), T::as_f32(dy), T::as_f32_mut(dg), T::as_f32_mut(du))
    {
        return vmath::swiglu_grad(g, u, dy, dg, du);
    }
    for ((((dg, du), &x), &up), &d) in dg.iter_mut().zip(du.iter_mut()).zip(g).zip(u).zip(dy) {
        let (x, up, d) = (x.f(), up.f(), d.f());
        let sg = vmath::sigmoid(x);
        *dg = T::from_f(d * up * sg * (1.0 + x * (1.0 - sg)));
        *du = T::from_f(d * x * sg);
    }
}

impl candle_core::CustomOp1 for SwiGluPacked {
    fn name(&self) -> &'static str {
        "swiglu-packed"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (n, f2) = l1.shape().dims2()?;
        let out = map_float!("swiglu_packed", s1, l1, "gu", |x| swiglu_packed_fwd(x, f2 / 2));
        Ok((out, Shape::from((n, f2 / 2))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        cuda::swiglu_packed(s1, l1, None)
    }
}

impl CustomOp2 for SwiGluPacked {
    fn name(&self) -> &'static str {
        "swiglu-packed-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (n, f2) = l1.shape().dims2()?;
        let out = map_float2!("swiglu_packed", (s1, l1, "gu"), (s2, l2, "dy"), |x, d| swiglu_packed_bwd(x, d, f2 / 2));
        Ok((out, Shape::from((n, f2))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        cuda::swiglu_packed(s1, l1, Some((s2, l2)))
    }
}

/// Backward of [`SwiGlu`]: (g, u, dy) → (dg, du) stacked as (2, N).
struct SwiGluGrad;

fn swiglu_fwd<T: Float>(g: &[T], u: &[T]) -> Vec<T> {
    let mut out = vec![T::from_f(0.0); g.len()];
    out.par_chunks_mut(4096).zip(g.par_chunks(4096).zip(u.par_chunks(4096))).for_each(|(o, (g, u))| {
        swiglu_rows(g, u, o);
    });
    out
}

fn swiglu_bwd<T: Float>(g: &[T], u: &[T], dy: &[T]) -> Vec<T> {
    let n = g.len();
    let mut out = vec![T::from_f(0.0); 2 * n];
    let (dg, du) = out.split_at_mut(n);
    const C: usize = 4096;
    dg.par_chunks_mut(C).zip(du.par_chunks_mut(C)).enumerate().for_each(|(c, (dg, du))| {
        let r = c * C..c * C + dg.len();
        swiglu_grad_rows(&g[r.clone()], &u[r.clone()], &dy[r], dg, du);
    });
    out
}

impl CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "swiglu"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let out = map_float2!("swiglu", (s1, l1, "gate"), (s2, l2, "up"), |g, u| swiglu_fwd(g, u));
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
        cuda::swiglu(s1, l1, s2, l2, None)
    }

    fn bwd(
        &self,
        g: &Tensor,
        u: &Tensor,
        _res: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let dy = dy.to_dtype(g.dtype())?.contiguous()?;
        let both = g.apply_op3_no_bwd(u, &dy, &SwiGluGrad)?;
        Ok((Some(both.get(0)?.reshape(g.shape())?), Some(both.get(1)?.reshape(g.shape())?)))
    }
}

impl CustomOp3 for SwiGluGrad {
    fn name(&self) -> &'static str {
        "swiglu-grad"
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
        let n = l1.shape().elem_count();
        let out =
            map_float3!("swiglu", (s1, l1, "gate"), (s2, l2, "up"), (s3, l3, "dy"), |g, u, d| swiglu_bwd(g, u, d));
        Ok((out, Shape::from((2, n))))
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
        cuda::swiglu(s1, l1, s2, l2, Some((s3, l3)))
    }
}
