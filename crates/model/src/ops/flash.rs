//! Causal flash attention, forward and backward ([`flash_attention`]).

use super::*;
use crate::profile::span;

static FLASH: Switch = Switch::new("PATCHLM_FLASH_ATTENTION", true, false);

/// Chooses the attention kernel process-wide: `true` for [`flash_attention`] (tiled, no T×T
/// matrix in memory), `false` for scores from a matmul, [`causal_softmax`] and a second matmul
/// (the T×T probabilities are materialised, in the compute dtype); also
/// `PATCHLM_FLASH_ATTENTION=1` / `=0`. Unset, attention is flash where the tensor-core kernels
/// are on and apply (see [`flash_attention_for`]), else materialised. Both compute the same
/// attention.
pub fn set_flash_attention(enabled: bool) {
    FLASH.set(enabled);
}

/// Whether attention on `device` was set to [`flash_attention`] (see [`set_flash_attention`]);
/// only where the fused ops are supported. [`flash_attention_for`] also knows the default.
pub fn flash_attention_enabled(device: &Device) -> bool {
    FLASH.get() && fused_ops_supported(device)
}

/// Whether attention with head size `hd` in `dtype` on `device` runs as [`flash_attention`]: as
/// [`set_flash_attention`] or `PATCHLM_FLASH_ATTENTION` say, and where neither does, on CUDA when
/// the tensor-core kernels are on and apply ([`flash_mma_enabled`]). Only where
/// the fused ops are supported.
pub fn flash_attention_for(device: &Device, dtype: DType, hd: usize) -> bool {
    fused_ops_supported(device) && FLASH.explicit().unwrap_or_else(|| device.is_cuda() && flash_mma_enabled(dtype, hd))
}

fn tensor_core_shape(dtype: DType, hd: usize) -> bool {
    matches!(dtype, DType::BF16 | DType::F16) && matches!(hd, 32 | 64)
}

static FLASH_MMA: Switch = Switch::new("PATCHLM_FLASH_MMA", true, true);

/// Chooses the mma.sync kernels for [`flash_attention`] on CUDA where they apply (bf16 or f16,
/// head size 32 or 64; 80, 96 and 128 with [`set_flash_mma_large_heads`]), process-wide:
/// FlashAttention-2's register dataflow (scores, softmax and probabilities stay in registers;
/// kernels/flash.cu). On by default (their device tests passed on an H200, where they made a
/// GPT-2-small step 1.16× faster than softmax attention and 1.42× faster than the same scheme on
/// wmma tiles, since removed); `PATCHLM_FLASH_MMA=0` also turns them off (then
/// [`flash_attention`] runs on CUDA cores, and only where asked for). On, attention defaults to
/// flash where they apply (see [`flash_attention_for`]).
pub fn set_flash_mma(enabled: bool) {
    FLASH_MMA.set(enabled);
}

/// Whether [`flash_attention`] on CUDA uses the mma.sync kernels for `dtype` and head size `hd`
/// (see [`set_flash_mma`]; head sizes 80, 96 and 128 also need [`set_flash_mma_large_heads`]).
pub fn flash_mma_enabled(dtype: DType, hd: usize) -> bool {
    FLASH_MMA.get()
        && (tensor_core_shape(dtype, hd)
            || (FLASH_MMA_LARGE_HEADS.get()
                && matches!(dtype, DType::BF16 | DType::F16)
                && matches!(hd, 80 | 96 | 128)))
}

static FLASH_MMA_LARGE_HEADS: Switch = Switch::new("PATCHLM_FLASH_MMA_LARGE_HEADS", true, false);

/// Extends [`set_flash_mma`]'s kernels to head sizes 80 (the 2.7B preset), 96 (780M) and 128
/// (1.3B), process-wide, with smaller tiles (32 keys a forward and dq step, 16 queries a dk/dv
/// step) so that each kernel stays within 48 KB of shared memory and 255 registers without
/// spilling (sm_90). Where they do not apply, those sizes run softmax attention. Off by default
/// (also `PATCHLM_FLASH_MMA_LARGE_HEADS=1`) until `tests/cuda.rs` has run them on a GPU;
/// `tests/emulated.rs` checks their math without one. At head sizes 80 and 96 the backward always
/// takes two passes ([`set_flash_dq_atomic`] does not apply).
pub fn set_flash_mma_large_heads(enabled: bool) {
    FLASH_MMA_LARGE_HEADS.set(enabled);
}

static FLASH_DQ_ATOMIC: Switch = Switch::new("PATCHLM_FLASH_DQ_ATOMIC", true, false);

/// Chooses, where [`set_flash_mma`]'s kernels run the backward pass, one pass for dq, dk and dv
/// (FlashAttention-2's: dq summed over key blocks in f32 atomics, 5 tile products per step)
/// instead of a dq pass beside the dk/dv pass (7 products: the dq pass computes the scores and
/// dP again), process-wide. Off by default (also `PATCHLM_FLASH_DQ_ATOMIC=1`) until
/// `tests/cuda.rs` has run it on a GPU; its math is tested without one by `tests/emulated.rs`. The
/// atomics make dq's last bits depend on the order the blocks run in. On the CPU the same
/// gradients come from one op that computes them one after the other.
pub fn set_flash_dq_atomic(enabled: bool) {
    FLASH_DQ_ATOMIC.set(enabled);
}

/// Whether flash attention's backward pass computes dq, dk and dv in one pass for `dtype` and
/// head size `hd` (see [`set_flash_dq_atomic`]; only where the mma.sync kernels apply, not at 80 or
/// 96; on the wgmma kernels where [`flash_wgmma_enabled`] and the GPU is a Hopper).
pub fn flash_dq_atomic_enabled(dtype: DType, hd: usize) -> bool {
    FLASH_DQ_ATOMIC.get() && !matches!(hd, 80 | 96) && flash_mma_enabled(dtype, hd)
}

static FLASH_WIDE: Switch = Switch::new("PATCHLM_FLASH_WIDE", true, false);

/// Chooses, where [`set_flash_mma`]'s kernels run, the wide query-side kernels: the forward and
/// the backward's dq pass with 128 query rows a block (each warp two blocks of 16 rows:
/// FlashAttention-2's forward tile for these head sizes) instead of 64, process-wide. Each (k, v)
/// tile read from memory and each operand read from shared memory serves twice the rows, for
/// more registers a thread (sm_90, head size 64: forward 242 against 128, dq 252 against 136)
/// and half as many blocks. Where the wgmma kernels run ([`flash_wgmma_runs`]), their forward and
/// dq with two warpgroups of 64 rows a block sharing each (k, v) tile instead of one (sm_90a:
/// forward 90 registers a thread, as the one-warpgroup kernel; dq 123 against 122, with 64 KB of
/// dynamic shared memory). Off by default (also `PATCHLM_FLASH_WIDE=1`) until a GPU has timed it
/// against the default; `tests/emulated.rs` checks its math without one, `tests/cuda.rs` on one.
/// The results are the same either way: each row's arithmetic is the same, in the same order.
pub fn set_flash_wide(enabled: bool) {
    FLASH_WIDE.set(enabled);
}

/// Whether flash attention runs the wide forward and dq kernels for `dtype` and head size `hd`
/// (see [`set_flash_wide`]; only where the mma.sync kernels apply, at head sizes 32 and 64).
pub fn flash_wide_enabled(dtype: DType, hd: usize) -> bool {
    FLASH_WIDE.get() && hd <= 64 && flash_mma_enabled(dtype, hd)
}

static FLASH_OCC4: Switch = Switch::new("PATCHLM_FLASH_OCC4", true, false);

/// Chooses, where [`set_flash_mma`]'s kernels run at head size 64 and the wide ones
/// ([`set_flash_wide`]) do not, a dq pass compiled for four blocks an SM (at most 128 registers a
/// thread: 16 warps to hide latency instead of 12), which takes each 64-key tile in two halves so
/// that fewer scores are live at once (sm_90: 8 bytes spilled, against 36 for the default dq
/// compiled so), process-wide. The default forward fits four blocks an SM by itself, and at head
/// size 32 the default dq does too. Off by default (also `PATCHLM_FLASH_OCC4=1`) until a GPU has
/// timed it; the same products in the same order as the default dq, so the same results.
pub fn set_flash_occ4(enabled: bool) {
    FLASH_OCC4.set(enabled);
}

/// Whether flash attention runs the four-blocks-an-SM dq kernel for `dtype` and head size `hd`
/// (see [`set_flash_occ4`]).
pub fn flash_occ4_enabled(dtype: DType, hd: usize) -> bool {
    FLASH_OCC4.get() && hd == 64 && flash_mma_enabled(dtype, hd) && !flash_wide_enabled(dtype, hd)
}

static FLASH_WGMMA: Switch = Switch::new("PATCHLM_FLASH_WGMMA", true, false);

/// Chooses, where [`set_flash_mma`]'s kernels run at bf16 and head size 64 on a Hopper GPU
/// (compute capability 9.x, a build with `CUDA_COMPUTE_CAP` 90), the forward and the two-pass
/// backward's dq and dk/dv passes on warpgroup MMAs (`wgmma`, kernels/hopper.cu: every tile
/// product as an m64n64k16 warpgroup product, the softmax, P and dS as the mma.sync kernels')
/// instead of mma.sync, process-wide; with [`set_flash_dq_atomic`] the one-pass backward too (its
/// dq product a warpgroup product beside dk's and dv's, dS through shared memory). Elsewhere the
/// mma.sync kernels run. Off by default (also
/// `PATCHLM_FLASH_WGMMA=1`) until a GPU has run `tests/cuda.rs`'s wgmma probe and the kernel's
/// device test; `tests/emulated.rs` checks its math on the CPU stand-in, whose reading of the
/// wgmma operand layouts the probe puts to the GPU.
pub fn set_flash_wgmma(enabled: bool) {
    FLASH_WGMMA.set(enabled);
}

/// Whether flash attention asks for the wgmma kernels for `dtype` and head size `hd`
/// (see [`set_flash_wgmma`]; the launcher also needs a Hopper GPU and a build for it).
pub fn flash_wgmma_enabled(dtype: DType, hd: usize) -> bool {
    FLASH_WGMMA.get() && dtype == DType::BF16 && hd == 64 && flash_mma_enabled(dtype, hd)
}

/// Whether flash attention on `device` actually runs the wgmma kernels for `dtype` and head size
/// `hd`: [`flash_wgmma_enabled`], a CUDA device that is a Hopper, a build with its module, and
/// wgmma probes on the device that agree with the CPU under one reading of the operand
/// descriptors, asked once per device (the kernels come built for either reading; elsewhere the
/// switch falls back to the mma.sync kernels, and where the wgmma kernels run, the
/// four-block variants and a wide one-pass backward do not). For reports of what ran.
pub fn flash_wgmma_runs(device: &candle_core::Device, dtype: DType, hd: usize) -> bool {
    flash_runs(device, dtype, hd).wgmma
}

/// Which of flash attention's switchable kernel variants a step runs on a device for a dtype and
/// head size (docs/gpu.md): what runs, not only what the switches ask for, read from the plans
/// the launcher itself makes (the wgmma kernels need a Hopper; where they run, the four-block dq
/// and a wide one pass do not; the one pass has no dq pass to run at four blocks). All false off
/// CUDA. For reports of what ran.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlashRuns {
    /// dq, dk and dv in one backward pass ([`set_flash_dq_atomic`]).
    pub dq_atomic: bool,
    /// The wide forward and dq ([`set_flash_wide`]).
    pub wide: bool,
    /// The wide dk/dv or one-pass kernel ([`set_flash_wide_bwd`]).
    pub wide_bwd: bool,
    /// The four-blocks-an-SM dq ([`set_flash_occ4`]).
    pub occ4: bool,
    /// The wgmma kernels ([`flash_wgmma_runs`]).
    pub wgmma: bool,
    /// Their forward and dq with q in registers ([`set_flash_wgmma_qreg`]).
    pub wgmma_qreg: bool,
}

/// What flash attention's kernels run as on `device` for `dtype` and head size `hd` under the
/// current switches (see [`FlashRuns`]).
pub fn flash_runs(device: &candle_core::Device, dtype: DType, hd: usize) -> FlashRuns {
    match device {
        #[cfg(feature = "cuda")]
        candle_core::Device::Cuda(dev) => super::cuda::flash_runs(dev, dtype, hd),
        _ => {
            let _ = (dtype, hd);
            FlashRuns::default()
        }
    }
}

static FLASH_WGMMA_QREG: Switch = Switch::new("PATCHLM_FLASH_WGMMA_QREG", true, false);

/// Chooses, where the wgmma kernels run ([`flash_wgmma_runs`]), a forward and a dq pass that hold
/// the block's q rows in registers after one read of their shared tile, so that s = q·kᵀ takes
/// its first operand from registers instead of shared memory every key tile: a step's
/// shared-memory traffic falls from 40 KB to 32 KB (dq: 56 to 48), where by a count of bytes against
/// tensor-core cycles shared memory bounded the step (kernels/hopper.cu works the numbers; a
/// count, not a measurement), for more registers a thread (sm_90a: forward 106 against 90, four
/// blocks an SM instead of five; dq 159 against 122, three instead of four). With
/// [`set_flash_wide`] too, the two-warpgroup kernels alike (forward 106: two blocks of 8 warps an
/// SM; dq 138: one).
/// Process-wide, off by default (also `PATCHLM_FLASH_WGMMA_QREG=1`) until a GPU has timed it; the
/// same products on the same operands, so the same results.
pub fn set_flash_wgmma_qreg(enabled: bool) {
    FLASH_WGMMA_QREG.set(enabled);
}

/// Whether the wgmma forward and dq pass, where they run for `dtype` and head size `hd`, hold q in
/// registers (see [`set_flash_wgmma_qreg`]).
pub fn flash_wgmma_qreg_enabled(dtype: DType, hd: usize) -> bool {
    FLASH_WGMMA_QREG.get() && flash_wgmma_enabled(dtype, hd)
}

static FLASH_WIDE_BWD: Switch = Switch::new("PATCHLM_FLASH_WIDE_BWD", true, false);

/// Chooses, where [`set_flash_mma`]'s kernels run the backward pass at head size 64, the wide
/// dk/dv kernels (128 keys a block of 8 warps: FlashAttention-2's backward tile for this head
/// size) instead of 64 keys a block of 4, process-wide; with [`set_flash_dq_atomic`] the one-pass
/// backward's too. Each query tile read from memory, and in the one pass each dq atomic, serves
/// twice the keys, for one block an SM instead of three (170 registers a thread on sm_90).
/// Where the wgmma kernels run ([`flash_wgmma_runs`]), their two-pass dk/dv with two warpgroups of
/// 64 keys a block sharing each (q, dO) tile (sm_90a: 216 registers a thread, one block of 8
/// warps an SM instead of two of 4; their one pass stays at one warpgroup). Off by default (also `PATCHLM_FLASH_WIDE_BWD=1`) until a GPU has timed it against the
/// default; `tests/emulated.rs` checks its math without one, `tests/cuda.rs` on one. dk and dv
/// are the same either way (each key's arithmetic is); the one-pass dq's atomics add in another
/// order.
pub fn set_flash_wide_bwd(enabled: bool) {
    FLASH_WIDE_BWD.set(enabled);
}

/// Whether flash attention's backward pass runs the wide dk/dv kernels for `dtype` and head size
/// `hd` (see [`set_flash_wide_bwd`]; only where the mma.sync kernels apply, at head size 64).
pub fn flash_wide_bwd_enabled(dtype: DType, hd: usize) -> bool {
    FLASH_WIDE_BWD.get() && hd == 64 && flash_mma_enabled(dtype, hd)
}

/// A second output of a custom op (candle's custom ops return one storage): the op's forward
/// pass leaves it here and [`Stash::take`] hands it back as a tensor on the same device.
#[derive(Default)]
struct Stash(std::sync::Mutex<Option<(Stashed, Shape)>>);

enum Stashed {
    Cpu(CpuStorage),
    #[cfg(feature = "cuda")]
    Cuda(candle_core::CudaStorage),
}

impl Stash {
    fn put(&self, s: Stashed, shape: Shape) {
        if let Ok(mut g) = self.0.lock() {
            *g = Some((s, shape));
        }
    }

    /// The stashed output as a tensor (`like` only carries the device); an error if the op
    /// stashed nothing.
    fn take(&self, like: &Tensor) -> candle_core::Result<Tensor> {
        like.apply_op1_no_bwd(&TakeStash(self))
    }

    fn take_inner(&self) -> candle_core::Result<(Stashed, Shape)> {
        let taken = self.0.lock().ok().and_then(|mut g| g.take());
        taken.ok_or_else(|| candle_core::Error::Msg("internal: an op's second output is missing".into()))
    }
}

struct TakeStash<'a>(&'a Stash);

impl CustomOp1 for TakeStash<'_> {
    fn name(&self) -> &'static str {
        "take-stash"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        match self.0.take_inner()? {
            (Stashed::Cpu(s), shape) => Ok((s, shape)),
            #[cfg(feature = "cuda")]
            _ => candle_core::bail!("internal: a stashed output is on another device"),
        }
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        match self.0.take_inner()? {
            (Stashed::Cuda(s), shape) => Ok((s, shape)),
            _ => candle_core::bail!("internal: a stashed output is on another device"),
        }
    }
}

/// Causal attention `softmax(scale · q kᵀ + mask) v` without the (T, S) score matrix: `q`
/// (B, H, T, hd), `k` and `v` (B, H, S, hd) with S ≥ T (the queries are the last T positions,
/// as with a KV cache), one dtype (f32, bf16 or f16), hd ∈ {16, 32, 64, 128} on CUDA (also 80
/// and 96 with [`set_flash_mma_large_heads`] at bf16/f16). Keys are
/// visited in tiles with an online softmax (running max and sum in f32). Differentiable in q,
/// k and v: the backward pass recomputes the probabilities tile by tile from the saved inputs
/// and each row's log-sum-exp (FlashAttention-2's scheme), again without a (T, S) matrix.
pub fn flash_attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> candle_core::Result<Tensor> {
    flash_check(q, k, v, scale)?;
    q.contiguous()?.apply_op3(&k.contiguous()?, &v.contiguous()?, FlashAttn { scale: scale as f32 })
}

/// [`flash_attention`] without a graph, returning also each query row's log-sum-exp of its
/// visible scaled scores, (B, H, T) f32, the statistic [`grad::flash_attention_lse`] needs (so the
/// backward pass does not recompute it).
pub fn flash_attention_lse(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> candle_core::Result<(Tensor, Tensor)> {
    flash_check(q, k, v, scale)?;
    flash_lse_op(q, k, v, scale, false)
}

/// The forward of [`flash_attention_lse`] (`rows` false) or [`flash_attention_lse_rows`] (CUDA):
/// (o, log-sum-exp), inputs already checked.
fn flash_lse_op(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64, rows: bool) -> candle_core::Result<(Tensor, Tensor)> {
    let op = FlashAttnLse { scale: scale as f32, lse: Stash::default(), rows };
    let o = q.contiguous()?.apply_op3_no_bwd(&k.contiguous()?, &v.contiguous()?, &op)?;
    let lse = op.lse.take(&o)?;
    Ok((o, lse))
}

/// [`flash_attention_lse`] with the output as rows: (B, T, H·hd), each position's heads side by
/// side, the layout the attention's output projection reads (and its gradient, for
/// [`grad::flash_attention_lse`], in the same layout). On CUDA the kernels write and read that
/// layout in place, which saves a copy of the output forward and of its gradient backward, and
/// the output is then also the projection's input (one tensor kept for the backward pass, not
/// two). On the CPU it is the (B, H, T, hd) output transposed.
pub fn flash_attention_lse_rows(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
) -> candle_core::Result<(Tensor, Tensor)> {
    flash_check(q, k, v, scale)?;
    let (b, h, t, hd) = q.dims4()?;
    if !q.device().is_cuda() {
        let (o, lse) = flash_attention_lse(q, k, v, scale)?;
        return Ok((o.transpose(1, 2)?.reshape((b, t, h * hd))?, lse));
    }
    flash_lse_op(q, k, v, scale, true)
}

/// The inputs' shapes and dtypes fit, and the scale is positive and finite (the kernels take each
/// row's maximum on the unscaled scores and scale it once, which needs scale > 0).
fn flash_check(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> candle_core::Result<()> {
    // As an f32, a scale that is not positive stays so (the sign is kept, NaN stays NaN), and one
    // too small for an f32 is 0.
    let s32 = scale as f32;
    if !(s32 > 0.0 && s32.is_finite()) {
        candle_core::bail!(
            "flash_attention: the scale must be positive and finite as an f32, not {scale} (usually 1/sqrt(head size))"
        );
    }
    let (b, h, t, hd) = q.dims4()?;
    let (kb, kh, s, khd) = k.dims4()?;
    if (kb, kh, khd) != (b, h, hd) || v.dims() != k.dims() || s < t || t == 0 {
        candle_core::bail!(
            "flash_attention: q {:?}, k {:?}, v {:?} do not fit (B, H, T, hd) / (B, H, S ≥ T, hd)",
            q.dims(),
            k.dims(),
            v.dims()
        );
    }
    if k.dtype() != q.dtype() || v.dtype() != q.dtype() {
        candle_core::bail!("flash_attention: q, k and v must share one dtype");
    }
    Ok(())
}

pub(super) struct FlashAttn {
    pub(super) scale: f32,
}

/// Each query row's log-sum-exp of its visible scaled scores: (q, k) → (B, H, T) f32.
struct FlashLse {
    scale: f32,
}

/// [`FlashAttn`]'s forward that also leaves the log-sum-exp per row (see [`flash_attention_lse`]);
/// with `rows` (CUDA only), the output as (B, T, H·hd) rows (see [`flash_attention_lse_rows`]).
struct FlashAttnLse {
    scale: f32,
    lse: Stash,
    rows: bool,
}

/// Which gradients a [`FlashGrad`] computes: dq (B, H, T, hd), dk and dv stacked
/// (2, B, H, S, hd), or all three one after the other, flat (B·H·(T + 2S)·hd).
#[derive(Clone, Copy, PartialEq, Eq)]
enum FlashPart {
    Q,
    KV,
    All,
}

/// One gradient of the CPU twin.
#[derive(Clone, Copy, PartialEq, Eq)]
enum GradOf {
    Q,
    K,
    V,
}

/// Backward of [`FlashAttn`]: (q, k, v) → dq, or dk and dv. dO and the row statistics ride along
/// as fields (a custom op takes three inputs), so that no input is copied to fit.
struct FlashGrad {
    scale: f32,
    part: FlashPart,
    /// dO (B, H, T, hd) in q's dtype, or (CUDA only) as (B, T, H·hd) rows with `oh` = H.
    dout: Tensor,
    oh: usize,
    /// (lse, delta = Σ dO ⊙ O) per query row, (B, H, T, 2) f32.
    stats: Tensor,
}

/// Shapes of one attention call: heads (B·H), queries, keys, head size, and the layout of the
/// output and its gradient.
#[derive(Clone, Copy)]
pub(super) struct AttnDims {
    pub(super) bh: usize,
    pub(super) t: usize,
    pub(super) s: usize,
    pub(super) hd: usize,
    /// 0: o and dO laid out as q, (B, H, T, hd); H: as rows of the (B·T, H·hd) matrix that the
    /// output projection reads (the CUDA kernels only; see [`flash_attention_lse_rows`]).
    pub(super) oh: usize,
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn to_f32<T: Float>(x: &[T]) -> Vec<f32> {
    x.iter().map(|v| v.f()).collect()
}

/// Forward (`want_o`: the outputs (BH·T·hd)) or the log-sum-exp per row (BH·T), on the CPU.
fn flash_fwd_cpu<T: Float>(q: &[T], k: &[T], v: &[T], a: AttnDims, scale: f32, want_o: bool) -> (Vec<T>, Vec<f32>) {
    let AttnDims { bh, t, s, hd, .. } = a;
    let mut o = vec![T::from_f(0.0); if want_o { bh * t * hd } else { 0 }];
    let mut lse = vec![0f32; bh * t];
    let per_head = |g: usize, o: &mut [T], lse: &mut [f32]| {
        let k = to_f32(&k[g * s * hd..(g + 1) * s * hd]);
        let v = if want_o { to_f32(&v[g * s * hd..(g + 1) * s * hd]) } else { Vec::new() };
        for i in 0..t {
            let qi = to_f32(&q[(g * t + i) * hd..(g * t + i + 1) * hd]);
            let lim = s - t + i;
            let sc: Vec<f32> = (0..=lim).map(|j| scale * dot(&qi, &k[j * hd..(j + 1) * hd])).collect();
            let m = sc.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
            let p: Vec<f32> = sc.iter().map(|&x| vmath::exp(x - m)).collect();
            let l: f32 = p.iter().sum();
            lse[i] = m + l.ln();
            if want_o {
                let mut acc = vec![0f32; hd];
                for (j, &pj) in p.iter().enumerate() {
                    for (a, &vv) in acc.iter_mut().zip(&v[j * hd..(j + 1) * hd]) {
                        *a += pj * vv;
                    }
                }
                for (o, a) in o[i * hd..(i + 1) * hd].iter_mut().zip(acc) {
                    *o = T::from_f(a / l);
                }
            }
        }
    };
    if want_o {
        o.par_chunks_mut(t * hd).zip(lse.par_chunks_mut(t)).enumerate().for_each(|(g, (o, l))| per_head(g, o, l));
    } else {
        lse.par_chunks_mut(t).enumerate().for_each(|(g, l)| per_head(g, &mut [], l));
    }
    (o, lse)
}

/// One of dq, dk, dv from `x` = [q, dO, k, v] on the CPU (the reference for the CUDA kernels).
fn flash_grad_cpu<T: Float>(x: [&[T]; 4], st: &[f32], a: AttnDims, scale: f32, part: GradOf) -> Vec<T> {
    let AttnDims { bh, t, s, hd, .. } = a;
    let [q, dout, k, v] = x;
    let rows = if part == GradOf::Q { t } else { s };
    let mut out = vec![T::from_f(0.0); bh * rows * hd];
    out.par_chunks_mut(rows * hd).enumerate().for_each(|(g, out)| {
        let head = |x: &[T], n: usize| to_f32(&x[g * n * hd..(g + 1) * n * hd]);
        let (q, dout, k, v) = (head(q, t), head(dout, t), head(k, s), head(v, s));
        let mut acc = vec![0f32; rows * hd];
        for i in 0..t {
            let (qi, di) = (&q[i * hd..(i + 1) * hd], &dout[i * hd..(i + 1) * hd]);
            let (lse, delta) = (st[(g * t + i) * 2], st[(g * t + i) * 2 + 1]);
            for j in 0..=s - t + i {
                let (kj, vj) = (&k[j * hd..(j + 1) * hd], &v[j * hd..(j + 1) * hd]);
                let p = vmath::exp(scale * dot(qi, kj) - lse);
                let (row, src, w) = match part {
                    GradOf::V => (j, di, p),
                    GradOf::Q => (i, kj, scale * p * (dot(di, vj) - delta)),
                    GradOf::K => (j, qi, scale * p * (dot(di, vj) - delta)),
                };
                for (a, &x) in acc[row * hd..(row + 1) * hd].iter_mut().zip(src) {
                    *a += w * x;
                }
            }
        }
        for (o, a) in out.iter_mut().zip(acc) {
            *o = T::from_f(a);
        }
    });
    out
}

fn attn_dims(q: &Layout, k: &Layout) -> candle_core::Result<AttnDims> {
    let (b, h, t, hd) = q.shape().dims4()?;
    let s = k.shape().dims4()?.2;
    Ok(AttnDims { bh: b * h, t, s, hd, oh: 0 })
}

impl CustomOp3 for FlashAttn {
    fn name(&self) -> &'static str {
        "flash-attention"
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
        let a = attn_dims(l1, l2)?;
        let out = map_float3!("flash_attention", (s1, l1, "q"), (s2, l2, "k"), (s3, l3, "v"), |q, k, v| {
            flash_fwd_cpu(q, k, v, a, self.scale, true).0
        });
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
        let (o, _) = cuda::flash_fwd(s1, l1, s2, l2, s3, l3, attn_dims(l1, l2)?, self.scale)?;
        Ok((o, l1.shape().clone()))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        o: &Tensor,
        dout: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let lse = q.apply_op2_no_bwd(k, &FlashLse { scale: self.scale })?;
        let (dq, dk, dv) = flash_backward(q, k, v, o, &lse, dout, self.scale)?;
        Ok((Some(dq), Some(dk), Some(dv)))
    }
}

/// Flash attention's gradients from the inputs, the output, each row's log-sum-exp and dO (o and
/// dO both (B, H, T, hd), or both (B, T, H·hd) rows as [`flash_attention_lse_rows`] returns).
pub(super) fn flash_backward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    o: &Tensor,
    lse: &Tensor,
    dout: &Tensor,
    scale: f32,
) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
    flash_check(q, k, v, scale.into())?;
    let (b, h, t, hd) = q.dims4()?;
    let (heads, rows) = ([b, h, t, hd], [b, t, h * hd]);
    let oh = match (o.dims(), dout.dims()) {
        (x, y) if x == heads && y == heads => 0,
        (x, y) if x == rows && y == rows => h,
        _ => candle_core::bail!(
            "flash_attention: o {:?} and dO {:?} are neither shaped like q {:?} nor (B, T, H·hd) rows",
            o.dims(),
            dout.dims(),
            q.dims()
        ),
    };
    if lse.dims() != [b, h, t] || lse.dtype() != DType::F32 {
        candle_core::bail!("flash_attention: lse {:?} {:?} is not f32 ({b}, {h}, {t})", lse.dims(), lse.dtype());
    }
    let dout = dout.to_dtype(q.dtype())?.contiguous()?;
    // The CPU twin reads o and dO as (B, H, T, hd); the CUDA kernels read rows in place.
    let (o, dout, oh) = if oh > 0 && !q.device().is_cuda() {
        let as_heads = |x: &Tensor| x.reshape((b, t, h, hd))?.transpose(1, 2)?.contiguous();
        (as_heads(o)?, as_heads(&dout)?, 0)
    } else {
        (o.clone(), dout, oh)
    };
    // (lse, delta = Σ dO ⊙ O) per row: one pass where the kernel is on (it goes with the mma.sync
    // flash kernels, beside which it passed its device tests), else composed.
    // Profiled by pass (`bwd.attention.*`: the statistics, then dk and dv, then dq, or the one
    // pass).
    let dev = q.device().clone();
    let stats = span("bwd.attention.stats", &dev, || {
        if q.device().is_cpu() || FLASH_MMA.get() {
            let op = FlashStats { dims: (b, h, t, hd), oh };
            o.to_dtype(q.dtype())?.contiguous()?.apply_op3_no_bwd(&dout, &lse.contiguous()?, &op)
        } else {
            let delta = (dout.to_dtype(DType::F32)? * o.to_dtype(DType::F32)?)?;
            let delta = match oh {
                0 => delta.sum_keepdim(3)?,
                _ => delta.reshape((b, t, h, hd))?.sum(3)?.transpose(1, 2)?.unsqueeze(3)?,
            };
            Tensor::cat(&[&lse.unsqueeze(3)?, &delta], 3)?.contiguous()
        }
    })?;
    let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
    let grad =
        |part| q.apply_op3_no_bwd(&k, &v, &FlashGrad { scale, part, dout: dout.clone(), oh, stats: stats.clone() });
    if flash_dq_atomic_enabled(q.dtype(), hd) {
        let s = k.dim(2)?;
        let all = span("bwd.attention.dkvq", &dev, || grad(FlashPart::All))?;
        let (nq, nk) = (b * h * t * hd, b * h * s * hd);
        let part = |at: usize, n: usize, len: usize| all.narrow(0, at, n)?.reshape((b, h, len, hd));
        return Ok((part(0, nq, t)?, part(nq, nk, s)?, part(nq + nk, nk, s)?));
    }
    let dkv = span("bwd.attention.dkv", &dev, || grad(FlashPart::KV))?;
    let dq = span("bwd.attention.dq", &dev, || grad(FlashPart::Q))?;
    Ok((dq, dkv.get(0)?, dkv.get(1)?))
}

/// The backward's row statistics: (o, dO (B, H, T, hd) = `dims`, lse (B, H, T) f32) → (B, H, T, 2)
/// f32 holding (lse, Σ_d o·dO) per row; on CUDA o and dO may be (B, T, H·hd) rows (`oh` = H).
struct FlashStats {
    dims: (usize, usize, usize, usize),
    oh: usize,
}

impl CustomOp3 for FlashStats {
    fn name(&self) -> &'static str {
        "flash-attention-stats"
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
        let (b, h, t, hd) = self.dims;
        if self.oh != 0 || l1.shape().elem_count() != b * h * t * hd {
            candle_core::bail!("internal: flash attention's statistics on the cpu take o as (B, H, T, hd)");
        }
        let lse = contiguous_f32(s3, l3, "flash_attention: lse")?;
        fn stats<T: Float>(o: &[T], d: &[T], lse: &[f32], hd: usize) -> Vec<f32> {
            o.chunks(hd.max(1))
                .zip(d.chunks(hd.max(1)))
                .zip(lse)
                .flat_map(|((o, d), &l)| [l, o.iter().zip(d).map(|(a, b)| a.f() * b.f()).sum()])
                .collect()
        }
        let st = match (s1, s2) {
            (CpuStorage::F32(o), CpuStorage::F32(d)) => {
                stats(contiguous(o, l1, "o")?, contiguous(d, l2, "dO")?, lse, hd)
            }
            (CpuStorage::BF16(o), CpuStorage::BF16(d)) => {
                stats(contiguous(o, l1, "o")?, contiguous(d, l2, "dO")?, lse, hd)
            }
            (CpuStorage::F16(o), CpuStorage::F16(d)) => {
                stats(contiguous(o, l1, "o")?, contiguous(d, l2, "dO")?, lse, hd)
            }
            _ => candle_core::bail!("flash_attention: o and dO must share a float dtype"),
        };
        Ok((CpuStorage::F32(st), Shape::from((b, h, t, 2))))
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
        let (b, h, t, hd) = self.dims;
        let st = cuda::flash_stats(s1, l1, s2, l2, s3, l3, AttnDims { bh: b * h, t, s: t, hd, oh: self.oh })?;
        Ok((st, Shape::from((b, h, t, 2))))
    }
}

impl CustomOp3 for FlashAttnLse {
    fn name(&self) -> &'static str {
        "flash-attention-with-lse"
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
        let a = attn_dims(l1, l2)?;
        let lse: Vec<f32>;
        let out = map_float3!("flash_attention", (s1, l1, "q"), (s2, l2, "k"), (s3, l3, "v"), |q, k, v| {
            let (o, l) = flash_fwd_cpu(q, k, v, a, self.scale, true);
            lse = l;
            o
        });
        if self.rows {
            candle_core::bail!("internal: flash attention's output as rows is a CUDA layout");
        }
        let (b, h, t, _) = l1.shape().dims4()?;
        self.lse.put(Stashed::Cpu(CpuStorage::F32(lse)), Shape::from((b, h, t)));
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
        let (b, h, t, hd) = l1.shape().dims4()?;
        let d = AttnDims { oh: if self.rows { h } else { 0 }, ..attn_dims(l1, l2)? };
        let (o, lse) = cuda::flash_fwd(s1, l1, s2, l2, s3, l3, d, self.scale)?;
        self.lse.put(Stashed::Cuda(lse), Shape::from((b, h, t)));
        Ok((o, if self.rows { Shape::from((b, t, h * hd)) } else { l1.shape().clone() }))
    }
}

impl CustomOp2 for FlashLse {
    fn name(&self) -> &'static str {
        "flash-attention-lse"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let a = attn_dims(l1, l2)?;
        let lse = match (s1, s2) {
            (CpuStorage::F32(q), CpuStorage::F32(k)) => {
                flash_fwd_cpu::<f32>(contiguous(q, l1, "q")?, contiguous(k, l2, "k")?, &[], a, self.scale, false).1
            }
            (CpuStorage::BF16(q), CpuStorage::BF16(k)) => {
                flash_fwd_cpu::<bf16>(contiguous(q, l1, "q")?, contiguous(k, l2, "k")?, &[], a, self.scale, false).1
            }
            (CpuStorage::F16(q), CpuStorage::F16(k)) => {
                flash_fwd_cpu::<f16>(contiguous(q, l1, "q")?, contiguous(k, l2, "k")?, &[], a, self.scale, false).1
            }
            _ => candle_core::bail!("flash_attention: q and k must share a float dtype"),
        };
        let (b, h, t, _) = l1.shape().dims4()?;
        Ok((CpuStorage::F32(lse), Shape::from((b, h, t))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let lse = cuda::flash_lse(s1, l1, s2, l2, attn_dims(l1, l2)?, self.scale)?;
        let (b, h, t, _) = l1.shape().dims4()?;
        Ok((lse, Shape::from((b, h, t))))
    }
}

impl CustomOp3 for FlashGrad {
    fn name(&self) -> &'static str {
        "flash-attention-grad"
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
        let (a, shape) = self.dims(l1, l2)?;
        if a.oh != 0 {
            candle_core::bail!("internal: flash attention's gradients on the cpu take dO as (B, H, T, hd)");
        }
        let (dg, dl) = self.dout.storage_and_layout();
        let (sg, sl) = self.stats.storage_and_layout();
        let (candle_core::Storage::Cpu(d), candle_core::Storage::Cpu(CpuStorage::F32(st))) = (&*dg, &*sg) else {
            candle_core::bail!("flash_attention: dO and the f32 row statistics must be on the cpu like q")
        };
        let st = contiguous(st, sl, "stats")?;
        fn grads<T: Float>(
            q: &[T],
            k: &[T],
            v: &[T],
            d: (&CpuStorage, &Layout),
            st: &[f32],
            g: &FlashGrad,
            a: AttnDims,
        ) -> candle_core::Result<Vec<T>> {
            let dout =
                T::of(d.0).ok_or_else(|| candle_core::Error::Msg("flash_attention: dO must have q's dtype".into()))?;
            let x = [q, contiguous(dout, d.1, "dO")?, k, v];
            Ok(match g.part {
                FlashPart::Q => flash_grad_cpu(x, st, a, g.scale, GradOf::Q),
                FlashPart::KV => {
                    let mut dk = flash_grad_cpu(x, st, a, g.scale, GradOf::K);
                    dk.extend(flash_grad_cpu(x, st, a, g.scale, GradOf::V));
                    dk
                }
                FlashPart::All => {
                    let mut dq = flash_grad_cpu(x, st, a, g.scale, GradOf::Q);
                    dq.extend(flash_grad_cpu(x, st, a, g.scale, GradOf::K));
                    dq.extend(flash_grad_cpu(x, st, a, g.scale, GradOf::V));
                    dq
                }
            })
        }
        let out = map_float3!("flash_attention", (s1, l1, "q"), (s2, l2, "k"), (s3, l3, "v"), |q, k, v| {
            grads(q, k, v, (d, dl), st, self, a)?
        });
        Ok((out, shape))
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
        let (a, shape) = self.dims(l1, l2)?;
        let (dg, dl) = self.dout.storage_and_layout();
        let (sg, sl) = self.stats.storage_and_layout();
        let (candle_core::Storage::Cuda(d), candle_core::Storage::Cuda(st)) = (&*dg, &*sg) else {
            candle_core::bail!("flash_attention: dO and the row statistics must be on q's device")
        };
        let x = [(s1, l1), (d, dl), (s2, l2), (s3, l3)];
        let out = match self.part {
            FlashPart::All => cuda::flash_grad_all(x, (st, sl), a, self.scale)?,
            part => cuda::flash_grad(x, (st, sl), a, self.scale, part == FlashPart::KV)?,
        };
        Ok((out, shape))
    }
}

impl FlashGrad {
    /// Dims of a call from q (B, H, T, hd) and k (B, H, S, hd) (checked by [`flash_backward`]),
    /// and the output shape.
    fn dims(&self, lq: &Layout, lk: &Layout) -> candle_core::Result<(AttnDims, Shape)> {
        let (b, h, t, hd) = lq.shape().dims4()?;
        let s = lk.shape().dims4()?.2;
        let shape = match self.part {
            FlashPart::Q => Shape::from((b, h, t, hd)),
            FlashPart::KV => Shape::from((2, b, h, s, hd)),
            FlashPart::All => Shape::from(b * h * (t + 2 * s) * hd),
        };
        Ok((AttnDims { bh: b * h, t, s, hd, oh: self.oh }, shape))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Where neither the setter nor `PATCHLM_FLASH_ATTENTION` says, attention on the CPU is
    /// materialised for every dtype and head size: the default turns flash attention on only on
    /// CUDA, where its tensor-core kernels apply (no test in this binary sets the switch).
    #[test]
    fn flash_attention_is_off_by_default_on_the_cpu() {
        if FLASH.explicit().is_some() {
            eprintln!("skipped: PATCHLM_FLASH_ATTENTION is set");
            return;
        }
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            for hd in [16, 32, 64, 128] {
                assert!(!flash_attention_for(&Device::Cpu, dtype, hd), "{dtype:?} {hd}");
            }
        }
        // Where the tensor-core kernels would apply on CUDA: so the CPU is what turns it off.
        assert!(flash_mma_enabled(DType::BF16, 64) || FLASH_MMA.explicit() == Some(false));
    }
}
