//! Multi-tensor ops: one launch over many tensors ([`sum_of_squares`], [`cast_groups`]).

use super::*;

static MULTI_CUDA: Switch = Switch::new("PATCHLM_MULTI_TENSOR_CUDA", true, true);

/// Turns the multi-tensor CUDA kernels of [`adamw_multi`] and [`sum_of_squares`] on or off
/// process-wide (on by default; `PATCHLM_MULTI_TENSOR_CUDA=0` turns them off). Off, CUDA takes the
/// per-tensor path (the [`adamw_update`] kernel, one launch per parameter).
pub fn set_multi_tensor_cuda(enabled: bool) {
    MULTI_CUDA.set(enabled);
}

/// Whether the multi-tensor kernels run on `device` (see [`set_multi_tensor_cuda`]).
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub(super) fn multi_tensor_cuda(device: &Device) -> bool {
    MULTI_CUDA.get() && device.is_cuda() && fused_ops_supported(device)
}

/// Σ x² over every element of every tensor, as an f64 scalar on their device (e.g. for the global
/// gradient norm). With the multi-tensor CUDA kernel (on by default, see [`set_multi_tensor_cuda`]), the
/// contiguous f32 and bf16 tensors take one kernel launch (per-chunk partial sums in f32, added in f64);
/// other tensors one reduction each.
pub fn sum_of_squares(tensors: &[&Tensor]) -> candle_core::Result<Tensor> {
    if tensors.is_empty() {
        candle_core::bail!("sum_of_squares: no tensors");
    }
    let mut sums = Vec::new();
    #[cfg(feature = "cuda")]
    let tensors: Vec<&Tensor> = if multi_tensor_cuda(tensors[0].device()) {
        let (multi, rest): (Vec<&Tensor>, Vec<&Tensor>) =
            tensors.iter().copied().partition(|t| matches!(t.dtype(), DType::F32 | DType::BF16) && t.is_contiguous());
        if !multi.is_empty() {
            sums.push(cuda::multi_sumsq(&multi)?.to_dtype(DType::F64)?.sum_all()?);
        }
        rest
    } else {
        tensors.to_vec()
    };
    for t in tensors.iter() {
        sums.push(t.to_dtype(DType::F32)?.sqr()?.sum_all()?.to_dtype(DType::F64)?);
    }
    Tensor::stack(&sums, 0)?.sum_all()
}

/// Casts groups of tensors to `dtype`, each group's tensors stacked along their first dimension
/// (the q, k and v projections' weights into one matrix, say): one tensor per group, equal to
/// `Tensor::cat(group, 0)?.to_dtype(dtype)`, recording no graph. On CUDA, with the multi-tensor
/// kernels (see [`set_multi_tensor_cuda`]) and the layout kernels (see [`set_layout_cuda`]) on, and
/// f32 tensors cast to bf16 or f16, one kernel launch casts every group into one buffer that the results are views of (each group starting
/// 128-byte aligned): a forward pass's weight casts in one launch instead of one or more per
/// weight. Conversions round to nearest even, as `to_dtype` does.
pub fn cast_groups(groups: &[&[&Tensor]], dtype: DType) -> candle_core::Result<Vec<Tensor>> {
    for (i, g) in groups.iter().enumerate() {
        let Some(first) = g.first() else { candle_core::bail!("cast_groups: group {i} is empty") };
        for t in g.iter() {
            if t.rank() == 0 || first.rank() == 0 || t.dims()[1..] != first.dims()[1..] {
                candle_core::bail!(
                    "cast_groups: group {i}: {:?} and {:?} do not stack along their first dimension",
                    first.dims(),
                    t.dims()
                );
            }
        }
    }
    #[cfg(feature = "cuda")]
    if let Some(first) = groups.first().and_then(|g| g.first()) {
        let dev = first.device();
        let all = || groups.iter().flat_map(|g| g.iter());
        if multi_tensor_cuda(dev)
            && layout_ops_supported(dev)
            && matches!(dtype, DType::BF16 | DType::F16)
            && all().all(|t| t.dtype() == DType::F32 && t.device().same_device(dev))
        {
            return cuda::multi_cast(groups, dtype);
        }
    }
    groups
        .iter()
        .map(|g| {
            let parts: Vec<Tensor> = g.iter().map(|t| t.detach()).collect();
            let t = if parts.len() == 1 { parts[0].clone() } else { Tensor::cat(&parts, 0)? };
            t.to_dtype(dtype)
        })
        .collect()
}
