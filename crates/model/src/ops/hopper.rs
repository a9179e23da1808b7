//! Hopper-only building blocks (kernels/hopper.cu): for now the probes of the warpgroup matrix
//! multiply-accumulate (`wgmma`) that a Hopper flash attention would be built on.

use candle_core::{DType, Tensor};

/// Which form of `wgmma` [`wgmma_probe`] runs (m64n64k16, bf16 in, f32 out).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WgmmaForm {
    /// a (64, 16) and b (64, 16) both from shared memory, K-major: a · bᵀ (a flash forward's
    /// q·kᵀ).
    SharedKMajor,
    /// a (64, 16) from registers (mma's A fragment layout) and b (16, 64) from shared memory
    /// MN-major, transposed by the instruction: a · b (a flash forward's p·v). In the probe's
    /// layout core matrices lie 1024 bytes apart along K and 128 along N; `lbo` and `sbo` go into
    /// the descriptor as given, so that a test can ask the GPU which field means which.
    RegisterTransposed {
        /// The descriptor's leading dimension byte offset.
        lbo: u32,
        /// The descriptor's stride dimension byte offset.
        sbo: u32,
    },
    /// a (16, 64) and b (16, 64), both from shared memory MN-major, both transposed by the
    /// instruction: aᵀ · b (the one-pass flash backward's dq = dS·k, dS read from its transpose);
    /// the probe's layout and `lbo`, `sbo` (the same for both descriptors) as for
    /// [`WgmmaForm::RegisterTransposed`]'s b.
    SharedTransposed {
        /// The descriptors' leading dimension byte offset.
        lbo: u32,
        /// The descriptors' stride dimension byte offset.
        sbo: u32,
    },
}

/// The product `form` names, on a Hopper GPU by `wgmma.mma_async` (kernels/hopper.cu: the
/// shared-memory matrix descriptor, the fence / commit / wait protocol), elsewhere by candle's
/// matmul in f32. A diagnostic: on a GPU it checks the operand layouts and descriptor encoding
/// that this crate's Hopper kernels assume against the CPU (`tests/cuda.rs`; `tests/emulated.rs`
/// runs the same kernels on the CPU stand-in of CUDA). An error on a CUDA GPU that is not a
/// Hopper, or for operands that are not bf16 of the form's shapes.
pub fn wgmma_probe(form: WgmmaForm, a: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    let (a_dims, b_dims): ([usize; 2], [usize; 2]) = match form {
        WgmmaForm::SharedKMajor => ([64, 16], [64, 16]),
        WgmmaForm::RegisterTransposed { .. } => ([64, 16], [16, 64]),
        WgmmaForm::SharedTransposed { .. } => ([16, 64], [16, 64]),
    };
    for (x, name, dims) in [(a, "a", a_dims), (b, "b", b_dims)] {
        if x.dims() != dims || x.dtype() != DType::BF16 {
            candle_core::bail!("wgmma_probe: {name} is {:?} {:?}, not {dims:?} bf16", x.dims(), x.dtype());
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
        let d = super::cuda::wgmma_probe(form, sa, la, sb, lb)?;
        return Ok(Tensor::from_storage(Storage::Cuda(d), (64, 64), BackpropOp::none(), false));
    }
    let (a, b) = (a.to_dtype(DType::F32)?, b.to_dtype(DType::F32)?);
    match form {
        WgmmaForm::SharedKMajor => a.matmul(&b.t()?),
        WgmmaForm::RegisterTransposed { .. } => a.matmul(&b),
        WgmmaForm::SharedTransposed { .. } => a.t()?.matmul(&b),
    }
}
