//! Hopper-only building blocks (kernels/hopper.cu): for now the probe of the warpgroup matrix
//! multiply-accumulate (`wgmma`) that a Hopper flash attention would be built on.

use candle_core::{DType, Tensor};

/// a · bᵀ for a and b (64, 16) bf16, as (64, 64) f32: on a Hopper GPU by one warpgroup matrix
/// multiply-accumulate (`wgmma.mma_async` m64n64k16, both operands from shared memory through
/// matrix descriptors; kernels/hopper.cu), elsewhere by candle's matmul in f32. A diagnostic: it
/// checks on a GPU the operand layout, descriptor encoding and fence protocol that this crate's
/// Hopper kernels assume, against the CPU (`tests/cuda.rs`; `tests/emulated.rs` runs the same
/// kernel on the CPU stand-in of CUDA). An error on a CUDA GPU that is not a Hopper.
pub fn wgmma_probe(a: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    for (x, name) in [(a, "a"), (b, "b")] {
        if x.dims() != [64, 16] || x.dtype() != DType::BF16 {
            candle_core::bail!("wgmma_probe: {name} is {:?} {:?}, not (64, 16) bf16", x.dims(), x.dtype());
        }
    }
    #[cfg(feature = "cuda")]
    if a.device().is_cuda() {
        use candle_core::{op::BackpropOp, Storage};
        let (a, b) = (a.contiguous()?, b.contiguous()?);
        let ((sa, la), (sb, lb)) = (a.storage_and_layout(), b.storage_and_layout());
        let (Storage::Cuda(sa), Storage::Cuda(sb)) = (&*sa, &*sb) else {
            candle_core::bail!("wgmma_probe: a and b must be on one CUDA device")
        };
        let d = super::cuda::wgmma_probe(sa, la, sb, lb)?;
        return Ok(Tensor::from_storage(Storage::Cuda(d), (64, 64), BackpropOp::none(), false));
    }
    a.to_dtype(DType::F32)?.matmul(&b.to_dtype(DType::F32)?.t()?)
}
