//! Rotary position embeddings ([`rope`]).

use super::*;

/// Rotary position embedding in HF's rotate-half layout, fused into one elementwise pass:
/// `x · cos + rotate_half(x) · sin` with rotate_half(x) = (−x₂, x₁). `x` (B, H, T, hd) in f32,
/// bf16 or f16; `cos`, `sin` (T, hd) f32 tables (both halves of a row hold the same
/// frequencies). Computed in f32, rounded once. Differentiable in `x`: the backward pass is the
/// rotation by the opposite angle.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> candle_core::Result<Tensor> {
    let (_, _, t, hd) = x.dims4()?;
    if cos.dims() != [t, hd] || sin.dims() != [t, hd] || hd % 2 != 0 {
        candle_core::bail!(
            "rope: tables {:?}/{:?} do not match x {:?} (even head size)",
            cos.dims(),
            sin.dims(),
            x.dims()
        );
    }
    if cos.dtype() != DType::F32 || sin.dtype() != DType::F32 {
        candle_core::bail!("rope: cos and sin tables must be f32");
    }
    x.contiguous()?.apply_op3(&cos.contiguous()?, &sin.contiguous()?, RopeOp { sign: 1.0 })
}

/// `sign` 1: the rotation; −1: its inverse (the backward pass).
pub(super) struct RopeOp {
    pub(super) sign: f32,
}

fn rope_apply<T: Float>(x: &[T], cos: &[f32], sin: &[f32], t: usize, hd: usize, sign: f32) -> Vec<T> {
    let h = hd / 2;
    let mut out = vec![T::from_f(0.0); x.len()];
    out.par_chunks_mut(hd).zip(x.par_chunks(hd)).enumerate().for_each(|(r, (o, row))| {
        let p = (r % t) * hd;
        for j in 0..hd {
            let rot = if j < h { -row[j + h].f() } else { row[j - h].f() };
            o[j] = T::from_f(row[j].f() * cos[p + j] + sign * rot * sin[p + j]);
        }
    });
    out
}

impl CustomOp3 for RopeOp {
    fn name(&self) -> &'static str {
        "rope"
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
        let (_, _, t, hd) = l1.shape().dims4()?;
        let (c, sn) = match (s2, s3) {
            (CpuStorage::F32(c), CpuStorage::F32(sn)) => (contiguous(c, l2, "cos")?, contiguous(sn, l3, "sin")?),
            _ => candle_core::bail!("rope: cos and sin tables must be f32"),
        };
        let out = map_float!("rope", s1, l1, "x", |x| rope_apply(x, c, sn, t, hd, self.sign));
        Ok((out, l1.shape().clone()))
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
        cuda::rope(s1, l1, s2, l2, s3, l3, self.sign)
    }

    fn bwd(
        &self,
        _x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        _res: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dx = dy.contiguous()?.apply_op3_no_bwd(cos, sin, &RopeOp { sign: -self.sign })?;
        Ok((Some(dx), None, None))
    }
}
