//! The backward passes of this module's ops as plain functions, for a hand-written backward pass
//! (see `Llama::forward_tape`): each takes the forward's inputs (and output where the op's
//! backward uses it) and the output gradient, and runs the same kernels as candle's autograd
//! does through the ops' `bwd`. Nothing here records a graph.

use candle_core::{CustomOp1, CustomOp2, CustomOp3, Tensor};

use super::{CausalSoftmax, FlashAttn, MultiTargetCe, RopeOp, SwiGlu};

fn no_grad(what: &str) -> candle_core::Error {
    candle_core::Error::Msg(format!("{what}: the op returned no gradient"))
}

/// RMSNorm ([`super::rms_norm`]) backward: `x` (rows, D), `weight` (D,), `dy` like `x` →
/// (dx, dweight (D,)).
pub fn rms_norm(x: &Tensor, weight: &Tensor, dy: &Tensor, eps: f64) -> candle_core::Result<(Tensor, Tensor)> {
    let d = x.dim(candle_core::D::Minus1)?;
    let rows = x.elem_count() / d.max(1);
    let (dx, dw) = super::rms_norm_backward(&x.reshape((rows, d))?, weight, &dy.reshape((rows, d))?, None, eps as f32)?;
    Ok((dx.reshape(x.shape())?, dw))
}

/// [`rms_norm`] backward plus a residual branch's gradient: `x`, `dy`, `residual` (rows, D)
/// → (dx + residual, dweight (D,)), the sum formed before the one rounding (the backward of
/// [`super::add_rms_norm`]'s norm where the sum also flows on unnormalised).
pub fn rms_norm_residual(
    x: &Tensor,
    weight: &Tensor,
    dy: &Tensor,
    residual: &Tensor,
    eps: f64,
) -> candle_core::Result<(Tensor, Tensor)> {
    super::rms_norm_backward(x, weight, dy, Some(residual), eps as f32)
}

/// [`super::causal_softmax`] backward from its output `y` and `dy` (same shape) → dx.
pub fn causal_softmax(y: &Tensor, dy: &Tensor, scale: f64) -> candle_core::Result<Tensor> {
    let (t, s) = (y.dim(candle_core::D::Minus2)?, y.dim(candle_core::D::Minus1)?);
    let op = CausalSoftmax { scale: scale as f32, t, s };
    op.bwd(y, y, dy)?.ok_or_else(|| no_grad("causal_softmax"))
}

/// [`super::rope`] backward: the rotation of `dy` (B, H, T, hd) by the opposite angle.
pub fn rope(dy: &Tensor, cos: &Tensor, sin: &Tensor) -> candle_core::Result<Tensor> {
    let (dx, _, _) = RopeOp { sign: 1.0 }.bwd(dy, cos, sin, dy, dy)?;
    dx.ok_or_else(|| no_grad("rope"))
}

/// [`super::swiglu`] backward: (g, u, dy) → (dg, du).
pub fn swiglu(g: &Tensor, u: &Tensor, dy: &Tensor) -> candle_core::Result<(Tensor, Tensor)> {
    let (dg, du) = SwiGlu.bwd(g, u, dy, dy)?;
    Ok((dg.ok_or_else(|| no_grad("swiglu"))?, du.ok_or_else(|| no_grad("swiglu"))?))
}

/// [`super::cross_entropy_multi`] backward: the gradient of `scale` × the mean loss with
/// respect to `logits` (N, V), in the logits' dtype.
pub fn cross_entropy_multi(logits: &Tensor, targets: &Tensor, scale: f64) -> candle_core::Result<Tensor> {
    let (n, _) = logits.dims2()?;
    let k = targets.dim(1)?;
    let g = Tensor::full((scale / (n * k) as f64) as f32, n, logits.device())?;
    let (d, _) = MultiTargetCe { lse: false }.bwd(&logits.contiguous()?, &targets.contiguous()?, &g, &g)?;
    d.ok_or_else(|| no_grad("cross_entropy_multi"))
}

/// [`super::cross_entropy_multi_lse`] backward: the gradient of `scale` × the mean loss
/// with respect to `logits` (N, V), from the forward's per-row log-sum-exps `lse` (N,), in
/// one pass over the logits.
pub fn cross_entropy_multi_lse(
    logits: &Tensor,
    targets: &Tensor,
    lse: &Tensor,
    scale: f64,
) -> candle_core::Result<Tensor> {
    let gl = row_scales_and_lse(logits, targets, lse, scale)?;
    logits.contiguous()?.apply_op3_no_bwd(&targets.contiguous()?, &gl, &super::MultiTargetCeGrad { lse: true })
}

/// The (2, N) f32 second input of the lse gradient kernels: each row's scale
/// `scale / (N·K)`, then the forward's log-sum-exps (checked to be f32 (N,)).
fn row_scales_and_lse(logits: &Tensor, targets: &Tensor, lse: &Tensor, scale: f64) -> candle_core::Result<Tensor> {
    let (n, _) = logits.dims2()?;
    let k = targets.dim(1)?;
    if lse.dims() != [n] || lse.dtype() != candle_core::DType::F32 {
        candle_core::bail!("cross_entropy_multi: lse {:?} {:?} is not f32 ({n},)", lse.dims(), lse.dtype());
    }
    let g = Tensor::full((scale / (n * k) as f64) as f32, n, logits.device())?;
    Tensor::stack(&[&g, lse], 0)
}

/// [`cross_entropy_multi_lse`] written over `logits`: on the CPU in f32 the gradient takes the
/// logits' memory (no second (N, V) buffer, the largest of a training step); elsewhere it is
/// [`cross_entropy_multi_lse`]. The logits are consumed: no other tensor may share their storage
/// (a clone, or a view such as a reshape kept elsewhere, would see the gradient).
pub fn cross_entropy_multi_lse_in_place(
    logits: Tensor,
    targets: &Tensor,
    lse: &Tensor,
    scale: f64,
) -> candle_core::Result<Tensor> {
    if !logits.device().is_cpu() || logits.dtype() != candle_core::DType::F32 || !logits.is_contiguous() {
        return cross_entropy_multi_lse(&logits, targets, lse, scale);
    }
    let gl = row_scales_and_lse(&logits, targets, lse, scale)?;
    logits.inplace_op3(&targets.contiguous()?, &gl, &super::MultiTargetCeGradInPlace)?;
    Ok(logits)
}

/// [`super::swiglu_packed`] backward: `gu` (N, 2F) and `dy` (N, F) → [dg | du] (N, 2F), the
/// layout of the stacked projection's output.
pub fn swiglu_packed(gu: &Tensor, dy: &Tensor) -> candle_core::Result<Tensor> {
    let (n, f2) = gu.dims2()?;
    if dy.dims() != [n, f2 / 2] || dy.dtype() != gu.dtype() {
        candle_core::bail!("swiglu_packed: dy {:?} does not match gu {:?}", dy.dims(), gu.dims());
    }
    gu.contiguous()?.apply_op2_no_bwd(&dy.contiguous()?, &super::SwiGluPacked)
}

/// [`super::embedding`] backward: rows of `dy` (ids..., D) scattered onto a (vocab, D)
/// gradient in `dy`'s dtype.
pub fn embedding(ids: &Tensor, dy: &Tensor, vocab: usize) -> candle_core::Result<Tensor> {
    embedding_mean(ids, dy, vocab, 1)
}

/// [`super::embedding_mean`] backward: `ids` (..., N) and the gradient of the bag means `dy`
/// (..., N / k, D) → the (vocab, D) gradient in `dy`'s dtype, each id's row receiving 1/k of
/// its bag's gradient row.
pub fn embedding_mean(ids: &Tensor, dy: &Tensor, vocab: usize, k: usize) -> candle_core::Result<Tensor> {
    let d = dy.dim(candle_core::D::Minus1)?;
    let flat = ids.flatten_all()?.contiguous()?;
    let n = flat.elem_count();
    if k == 0 || !n.is_multiple_of(k) || dy.elem_count() != n / k * d {
        candle_core::bail!("embedding_mean: a gradient {:?} does not match {n} ids in bags of {k}", dy.dims());
    }
    let dy = dy.reshape((n / k, d))?.contiguous()?;
    flat.apply_op2_no_bwd(&dy, &super::EmbeddingGrad { vocab, k })
}

/// [`super::flash_attention`] backward from the inputs, the output `o` and `dout` → (dq, dk, dv).
pub fn flash_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    o: &Tensor,
    dout: &Tensor,
    scale: f64,
) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
    let (dq, dk, dv) =
        FlashAttn { scale: scale as f32 }.bwd(&q.contiguous()?, &k.contiguous()?, &v.contiguous()?, o, dout)?;
    let e = || no_grad("flash_attention");
    Ok((dq.ok_or_else(e)?, dk.ok_or_else(e)?, dv.ok_or_else(e)?))
}

/// [`super::flash_attention_lse`] and [`super::flash_attention_lse_rows`] backward: from the
/// inputs, the output `o`, the log-sum-exp per row `lse` (B, H, T) f32 that the forward returned,
/// and `dout` → (dq, dk, dv) (B, H, ·, hd). `o` and `dout` are both (B, H, T, hd), or both
/// (B, T, H·hd) rows, the layout the rows forward returns (read in place on CUDA).
pub fn flash_attention_lse(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    o: &Tensor,
    lse: &Tensor,
    dout: &Tensor,
    scale: f64,
) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
    super::flash_backward(q, k, v, o, lse, dout, scale as f32)
}
