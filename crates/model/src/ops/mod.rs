//! Fused operations with hand-written backward passes, as candle custom ops, each with a CPU
//! implementation (rows or heads in parallel) and a CUDA kernel (kernels/fused.cu,
//! kernels/flash.cu; `cuda` feature). Statistics are kept in f32 whatever the storage dtype.
//!
//! - [`cross_entropy_multi`]: softmax cross-entropy where each row of logits has K targets (K = 1
//!   is ordinary next-token cross-entropy), without materialising log-probabilities for the
//!   whole vocabulary; the backward pass writes `g · (K · softmax − counts)` directly.
//! - [`rms_norm`]: RMSNorm, input and weight gradients.
//! - [`rope`]: rotary embeddings; [`causal_softmax`]: scale + causal mask + softmax of attention
//!   scores; [`flash_attention`]: causal attention without a T×T matrix (the default on CUDA
//!   where the tensor-core kernels apply, see [`flash_attention_for`]).
//! - [`embedding`]: lookup with a scatter-add backward, [`embedding_mean`] its mean over bags of
//!   k consecutive ids (the patch embedding); [`swiglu`]: SwiGLU's gate.
//! - [`adamw_update`]: one AdamW step of one parameter in a single pass (no backward);
//!   [`adamw_multi`] / [`sum_of_squares`]: all parameters (gradients f32 or bf16) in one launch.
//! - For a hand-written backward pass (no graph; backward passes in [`grad`]):
//!   [`heads_from_rows`] / [`rows_from_heads`] (attention heads with RoPE fused, and back),
//!   [`swiglu_packed`] (SwiGLU on stacked gate/up rows), [`add_rms_norm`] (residual add fused
//!   into the norm), [`cross_entropy_multi_lse`] (the loss keeping each row's log-sum-exp).
//!
//! - [`batched_matmul`]: attention's per-head products, one per thread on the CPU.
//!
//! [`fused_ops_supported`] says where a device has the implementations (callers fall back to
//! composed candle ops elsewhere); [`set_fused_ops`] turns them off to compare.

use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Device, Layout, Shape, Tensor, Var};
use half::{bf16, f16};
use rayon::prelude::*;

/// A process-wide on/off setting: until a caller sets it, an environment variable decides
/// (`env` = "1" means `env_means`, "0" the opposite), and without one (or another value) `default`.
pub(crate) struct Switch {
    /// 0: not yet resolved, 1: on, 2: off (set, or from the environment), 3: neither said (the
    /// default applies).
    state: AtomicU8,
    env: &'static str,
    env_means: bool,
    default: bool,
}

impl Switch {
    pub(crate) const fn new(env: &'static str, env_means: bool, default: bool) -> Self {
        Self { state: AtomicU8::new(0), env, env_means, default }
    }

    pub(crate) fn set(&self, on: bool) {
        self.state.store(if on { 1 } else { 2 }, Ordering::Relaxed);
    }

    /// The setting: the setter's, else the environment's read on first use (and kept: hot paths
    /// ask per layer), else the default.
    pub(crate) fn get(&self) -> bool {
        self.explicit().unwrap_or(self.default)
    }

    /// What the setter or the environment said, if either did.
    pub(crate) fn explicit(&self) -> Option<bool> {
        match self.state.load(Ordering::Relaxed) {
            1 => Some(true),
            2 => Some(false),
            3 => None,
            _ => {
                let said = env_says(std::env::var_os(self.env).as_deref(), self.env_means);
                let state = match said {
                    Some(true) => 1,
                    Some(false) => 2,
                    None => 3,
                };
                // A setter racing with this first read wins: only an unresolved state is replaced.
                let _ = self.state.compare_exchange(0, state, Ordering::Relaxed, Ordering::Relaxed);
                said
            }
        }
    }
}

/// What a switch's environment variable says: "1" means `env_means`, "0" the opposite, anything
/// else (or unset) nothing.
fn env_says(value: Option<&std::ffi::OsStr>, env_means: bool) -> Option<bool> {
    match value {
        Some(v) if v == "1" => Some(env_means),
        Some(v) if v == "0" => Some(!env_means),
        _ => None,
    }
}

static FUSED: AtomicBool = AtomicBool::new(true);

/// Turns the fused ops off (or back on) process-wide, e.g. to benchmark them against the
/// composed ops they replace. On by default.
pub fn set_fused_ops(enabled: bool) {
    FUSED.store(enabled, Ordering::Relaxed);
}

/// Whether the fused ops of this module are on and have an implementation for `device`: the
/// CPU always, CUDA when built with the `cuda` feature (the kernels' device tests,
/// `crates/model/tests/cuda.rs`, run with `scripts/gpu_check.sh`); `PATCHLM_FUSED_CUDA=0` turns
/// the CUDA kernels off, back to candle's composed ops.
pub fn fused_ops_supported(device: &Device) -> bool {
    if !FUSED.load(Ordering::Relaxed) {
        return false;
    }
    match device {
        Device::Cpu => true,
        Device::Cuda(_) => cfg!(feature = "cuda") && std::env::var_os("PATCHLM_FUSED_CUDA").is_none_or(|v| v != "0"),
        _ => false,
    }
}

/// The elements of a contiguous CPU tensor's storage, or an error naming it (`what`).
fn contiguous<'a, T>(s: &'a [T], l: &Layout, what: &str) -> candle_core::Result<&'a [T]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&s[a..b]),
        None => candle_core::bail!("{what}: expected a contiguous tensor"),
    }
}

/// The elements of a contiguous f32 CPU storage, or an error naming it (`what`).
fn contiguous_f32<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> candle_core::Result<&'a [f32]> {
    match s {
        CpuStorage::F32(v) => contiguous(v, l, what),
        _ => candle_core::bail!("{what}: expected f32, got {:?}", candle_core::backend::BackendStorage::dtype(s)),
    }
}

/// [`contiguous_f32`] for writing in place.
fn contiguous_f32_mut<'a>(s: &'a mut CpuStorage, l: &Layout, what: &str) -> candle_core::Result<&'a mut [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((a, b))) => Ok(&mut v[a..b]),
        _ => candle_core::bail!("{what}: expected a contiguous f32 tensor"),
    }
}

/// `map_float!(op, storage, layout, "what", |x| body)`: runs `body` on the contiguous slice of
/// a float CPU storage (f32, bf16 or f16) and wraps the resulting `Vec` in the same dtype.
macro_rules! map_float {
    ($op:literal, $s:expr, $l:expr, $what:literal, |$x:ident| $body:expr) => {
        match $s {
            CpuStorage::F32(v) => {
                let $x = contiguous(v, $l, $what)?;
                CpuStorage::F32($body)
            }
            CpuStorage::BF16(v) => {
                let $x = contiguous(v, $l, $what)?;
                CpuStorage::BF16($body)
            }
            CpuStorage::F16(v) => {
                let $x = contiguous(v, $l, $what)?;
                CpuStorage::F16($body)
            }
            _ => candle_core::bail!("{}: {} must be f32, bf16 or f16", $op, $what),
        }
    };
}

/// [`map_float!`] over two storages that share one float dtype.
macro_rules! map_float2 {
    ($op:literal, ($s1:expr, $l1:expr, $w1:literal), ($s2:expr, $l2:expr, $w2:literal), |$x:ident, $y:ident| $body:expr) => {
        match ($s1, $s2) {
            (CpuStorage::F32(a), CpuStorage::F32(b)) => {
                let ($x, $y) = (contiguous(a, $l1, $w1)?, contiguous(b, $l2, $w2)?);
                CpuStorage::F32($body)
            }
            (CpuStorage::BF16(a), CpuStorage::BF16(b)) => {
                let ($x, $y) = (contiguous(a, $l1, $w1)?, contiguous(b, $l2, $w2)?);
                CpuStorage::BF16($body)
            }
            (CpuStorage::F16(a), CpuStorage::F16(b)) => {
                let ($x, $y) = (contiguous(a, $l1, $w1)?, contiguous(b, $l2, $w2)?);
                CpuStorage::F16($body)
            }
            _ => candle_core::bail!("{}: {} and {} must share a float dtype (f32, bf16 or f16)", $op, $w1, $w2),
        }
    };
}

/// [`map_float!`] over three storages that share one float dtype.
macro_rules! map_float3 {
    ($op:literal, ($s1:expr, $l1:expr, $w1:literal), ($s2:expr, $l2:expr, $w2:literal), ($s3:expr, $l3:expr, $w3:literal), |$x:ident, $y:ident, $z:ident| $body:expr) => {
        match ($s1, $s2, $s3) {
            (CpuStorage::F32(a), CpuStorage::F32(b), CpuStorage::F32(c)) => {
                let ($x, $y, $z) = (contiguous(a, $l1, $w1)?, contiguous(b, $l2, $w2)?, contiguous(c, $l3, $w3)?);
                CpuStorage::F32($body)
            }
            (CpuStorage::BF16(a), CpuStorage::BF16(b), CpuStorage::BF16(c)) => {
                let ($x, $y, $z) = (contiguous(a, $l1, $w1)?, contiguous(b, $l2, $w2)?, contiguous(c, $l3, $w3)?);
                CpuStorage::BF16($body)
            }
            (CpuStorage::F16(a), CpuStorage::F16(b), CpuStorage::F16(c)) => {
                let ($x, $y, $z) = (contiguous(a, $l1, $w1)?, contiguous(b, $l2, $w2)?, contiguous(c, $l3, $w3)?);
                CpuStorage::F16($body)
            }
            _ => {
                candle_core::bail!("{}: {}, {} and {} must share a float dtype (f32, bf16 or f16)", $op, $w1, $w2, $w3)
            }
        }
    };
}

/// The float element types the CPU implementations are generic over (f32, bf16, f16): each
/// computes in f32 and rounds once on the way out.
trait Float: Copy + Send + Sync + 'static {
    fn f(self) -> f32;
    fn from_f(x: f32) -> Self;
    /// The elements of a CPU storage of this dtype, or None for another dtype.
    fn of(s: &CpuStorage) -> Option<&[Self]>;
    /// `s` as f32 elements when the dtype is f32 (the vectorised paths of [`vmath`]), else None.
    fn as_f32(s: &[Self]) -> Option<&[f32]> {
        let _ = s;
        None
    }
    /// `s` as mutable f32 elements when the dtype is f32, else None.
    fn as_f32_mut(s: &mut [Self]) -> Option<&mut [f32]> {
        let _ = s;
        None
    }
}
impl Float for f32 {
    fn of(s: &CpuStorage) -> Option<&[Self]> {
        match s {
            CpuStorage::F32(v) => Some(v),
            _ => None,
        }
    }
    fn as_f32(s: &[Self]) -> Option<&[f32]> {
        Some(s)
    }
    fn as_f32_mut(s: &mut [Self]) -> Option<&mut [f32]> {
        Some(s)
    }
    fn f(self) -> f32 {
        self
    }
    fn from_f(x: f32) -> Self {
        x
    }
}
impl Float for bf16 {
    fn of(s: &CpuStorage) -> Option<&[Self]> {
        match s {
            CpuStorage::BF16(v) => Some(v),
            _ => None,
        }
    }
    fn f(self) -> f32 {
        self.to_f32()
    }
    fn from_f(x: f32) -> Self {
        bf16::from_f32(x)
    }
}
impl Float for f16 {
    fn of(s: &CpuStorage) -> Option<&[Self]> {
        match s {
            CpuStorage::F16(v) => Some(v),
            _ => None,
        }
    }
    fn f(self) -> f32 {
        self.to_f32()
    }
    fn from_f(x: f32) -> Self {
        f16::from_f32(x)
    }
}

static ROWS_CUDA: Switch = Switch::new("PATCHLM_ROWS_CUDA", true, true);

/// Chooses the second-generation row-wise CUDA kernels process-wide: for [`rms_norm`] and
/// [`causal_softmax`] (both directions) the warp-per-row kernels (a warp per row, shuffles only)
/// instead of the block-per-row ones; [`add_rms_norm`] and [`grad::rms_norm_residual`] with the
/// residual add inside the norm's kernel (otherwise a separate add); and
/// [`cross_entropy_multi_lse`] (16-byte loads, the log-sum-exp kept for a one-pass backward;
/// without it the tape's loss uses [`cross_entropy_multi`]). On by default (their device tests
/// passed on an H200); `PATCHLM_ROWS_CUDA=0` also turns them off. Same math and roundings either
/// way.
pub fn set_rows_cuda(enabled: bool) {
    ROWS_CUDA.set(enabled);
}

/// Whether the second-generation row kernels are on (see [`set_rows_cuda`]).
pub fn rows_cuda_enabled() -> bool {
    ROWS_CUDA.get()
}

mod adamw;
mod bmm;
mod ce;
#[cfg(feature = "cuda")]
mod cuda;
mod embedding;
mod flash;
pub mod grad;
mod heads;
mod hopper;
mod multi;
mod norm;
mod rope;
mod softmax;
mod swiglu;
mod vmath;

pub use self::{
    adamw::*, bmm::*, ce::*, embedding::*, flash::*, heads::*, hopper::*, multi::*, norm::*, rope::*, softmax::*,
    swiglu::*,
};

#[cfg(test)]
mod tests {
    use super::Switch;

    /// The mma.sync flash kernels apply only to 16-bit dtypes at head sizes 32 and 64 (80, 96 and
    /// 128 behind their own switch, the wide kernels at 32 and 64 only); the one-pass backward
    /// gives the two passes' gradients. (The only test in this binary that sets these.)
    #[test]
    fn tensor_core_flash_family_choice() {
        use super::{flash_mma_enabled, set_flash_mma};
        use candle_core::DType::{BF16, F16, F32};
        set_flash_mma(true);
        assert!(flash_mma_enabled(BF16, 64) && flash_mma_enabled(F16, 32));
        assert!(!flash_mma_enabled(F32, 64) && !flash_mma_enabled(BF16, 128) && !flash_mma_enabled(BF16, 16));
        set_flash_mma(false);
        assert!(!flash_mma_enabled(BF16, 64) && !flash_mma_enabled(F16, 32));
        set_flash_mma(true); // the default again

        // An opt-in variant of the mma.sync kernels: off by default, on with its switch exactly at
        // `on` (dtype, head size) and not at `off`, and off again without the mma.sync kernels.
        let variant = |set: fn(bool),
                       enabled: fn(candle_core::DType, usize) -> bool,
                       on: &[(candle_core::DType, usize)],
                       off: &[(candle_core::DType, usize)]| {
            assert!(on.iter().all(|&(d, h)| !enabled(d, h)), "off by default");
            set(true);
            assert!(on.iter().all(|&(d, h)| enabled(d, h)) && off.iter().all(|&(d, h)| !enabled(d, h)));
            set_flash_mma(false);
            assert!(on.iter().all(|&(d, h)| !enabled(d, h)), "only with the mma.sync kernels");
            set_flash_mma(true);
            set(false);
        };
        use super::{flash_occ4_enabled, flash_wgmma_enabled, flash_wide_bwd_enabled, flash_wide_enabled};
        use super::{set_flash_occ4, set_flash_wgmma, set_flash_wide, set_flash_wide_bwd};
        // The wide forward and dq at head sizes 32 and 64; the wide backward at 64 only.
        variant(set_flash_wide, flash_wide_enabled, &[(BF16, 64), (F16, 32)], &[(F32, 64), (BF16, 128)]);
        variant(set_flash_wide_bwd, flash_wide_bwd_enabled, &[(BF16, 64), (F16, 64)], &[(BF16, 32), (F32, 64)]);
        // Four blocks an SM: the 64-row dq at 64 only, not where the wide kernels run.
        variant(set_flash_occ4, flash_occ4_enabled, &[(BF16, 64), (F16, 64)], &[(F16, 32), (F32, 64), (BF16, 128)]);
        set_flash_occ4(true);
        set_flash_wide(true);
        assert!(!flash_occ4_enabled(BF16, 64), "the wide kernels have no four-block build");
        set_flash_wide(false);
        set_flash_occ4(false);
        // wgmma: bf16 at head size 64 only.
        variant(set_flash_wgmma, flash_wgmma_enabled, &[(BF16, 64)], &[(F16, 64), (BF16, 32), (F32, 64)]);
        // Asked for, they run only on a Hopper: never on the CPU.
        set_flash_wgmma(true);
        let cpu = candle_core::Device::Cpu;
        assert!(flash_wgmma_enabled(BF16, 64) && !super::flash_wgmma_runs(&cpu, BF16, 64));
        // q in registers: only with the wgmma kernels, bf16 at head size 64.
        use super::{flash_wgmma_qreg_enabled, set_flash_wgmma_qreg};
        assert!(!flash_wgmma_qreg_enabled(BF16, 64), "off by default");
        set_flash_wgmma_qreg(true);
        assert!(flash_wgmma_qreg_enabled(BF16, 64) && !flash_wgmma_qreg_enabled(F16, 64));
        set_flash_wgmma(false);
        assert!(!flash_wgmma_qreg_enabled(BF16, 64), "only with the wgmma kernels");
        set_flash_wgmma_qreg(false);
        // Head sizes 80, 96 and 128: only with their switch; no one-pass backward at 80 or 96, no wide
        // forward above 64.
        use super::{flash_dq_atomic_enabled, set_flash_dq_atomic, set_flash_mma_large_heads};
        assert!(!flash_mma_enabled(BF16, 96) && !flash_mma_enabled(BF16, 128));
        set_flash_mma_large_heads(true);
        set_flash_wide(true);
        set_flash_dq_atomic(true);
        assert!(flash_mma_enabled(BF16, 96) && flash_mma_enabled(F16, 128) && !flash_mma_enabled(F32, 128));
        assert!(flash_mma_enabled(BF16, 80) && !flash_mma_enabled(BF16, 48));
        assert!(
            flash_dq_atomic_enabled(BF16, 128)
                && !flash_dq_atomic_enabled(BF16, 96)
                && !flash_dq_atomic_enabled(F16, 80)
        );
        assert!(!flash_wide_enabled(BF16, 128) && flash_wide_enabled(BF16, 64));
        set_flash_dq_atomic(false);
        set_flash_wide(false);
        set_flash_mma_large_heads(false);

        // The one-pass backward (mma.sync only) returns dq, dk and dv from one flat buffer: the
        // same gradients as the two passes, with fewer queries than keys (a cache) so that a
        // wrong offset or length in the split shows.
        use super::{flash_attention_lse, grad};
        use candle_core::{Device, Tensor};
        let mk = |n: usize| Tensor::randn(0f32, 1.0, (2, 3, n, 32), &Device::Cpu).unwrap().to_dtype(BF16).unwrap();
        let (q, k, v, dout) = (mk(5), mk(9), mk(9), mk(5));
        let (o, lse) = flash_attention_lse(&q, &k, &v, 0.2).unwrap();
        let grads = || grad::flash_attention_lse(&q, &k, &v, &o, &lse, &dout, 0.2).unwrap();
        let two = grads();
        set_flash_dq_atomic(true);
        assert!(flash_dq_atomic_enabled(BF16, 32) && !flash_dq_atomic_enabled(F32, 32));
        let one = grads();
        set_flash_dq_atomic(false);
        for (a, b) in [(&one.0, &two.0), (&one.1, &two.1), (&one.2, &two.2)] {
            assert_eq!(a.dims(), b.dims());
            let d = (a.to_dtype(F32).unwrap() - b.to_dtype(F32).unwrap()).unwrap().abs().unwrap();
            assert_eq!(d.max_all().unwrap().to_scalar::<f32>().unwrap(), 0.0);
        }

        // With CUDA built in: every flash entry point the launchers can ask for, under every
        // combination of the flash switches, is in the PTX (no GPU needed).
        #[cfg(feature = "cuda")]
        {
            use super::{
                set_flash_mma_large_heads, set_flash_occ4, set_flash_wgmma, set_flash_wgmma_qreg, set_flash_wide,
                set_flash_wide_bwd,
            };
            for bits in 0..256u32 {
                let on = |i: u32| bits & (1 << i) != 0;
                set_flash_mma(on(0));
                set_flash_mma_large_heads(on(1));
                set_flash_wide(on(2));
                set_flash_wide_bwd(on(3));
                set_flash_dq_atomic(on(4));
                set_flash_occ4(on(5));
                set_flash_wgmma(on(6));
                set_flash_wgmma_qreg(on(7));
                let missing = super::cuda::missing_flash_entries();
                assert!(missing.is_empty(), "switches {bits:08b}: no such kernels in the PTX: {missing:?}");
                // What a report says ran: the wgmma kernels only on a device that runs them, and
                // then neither the four-block dq nor a wide one pass; no four-block dq beside the
                // one pass.
                let no_hopper = super::cuda::flash_runs_with(None, BF16, 64);
                let hopper = super::cuda::flash_runs_with(Some(false), BF16, 64);
                let mma = on(0);
                assert!(!no_hopper.wgmma && hopper.wgmma == (mma && on(6)), "switches {bits:08b}");
                assert_eq!(no_hopper.occ4, mma && on(5) && !on(2) && !on(4), "switches {bits:08b}");
                assert_eq!(hopper.occ4, no_hopper.occ4 && !hopper.wgmma, "switches {bits:08b}");
                assert_eq!(hopper.wide_bwd, mma && on(3) && !(hopper.wgmma && on(4)), "switches {bits:08b}");
                assert_eq!(hopper.wgmma_qreg, hopper.wgmma && on(7), "switches {bits:08b}");
                assert_eq!(hopper.dq_atomic, mma && on(4), "switches {bits:08b}");
            }
            set_flash_mma(true);
            set_flash_mma_large_heads(false);
            set_flash_wide(false);
            set_flash_wide_bwd(false);
            set_flash_dq_atomic(false);
            set_flash_occ4(false);
            set_flash_wgmma(false);
            set_flash_wgmma_qreg(false);
        }
    }

    /// A switch reports what the setter said, else nothing (the default applies), and keeps its
    /// first reading of the environment.
    #[test]
    fn switch_explicit_setting_and_default() {
        static S: Switch = Switch::new("PATCHLM_TEST_SWITCH_NEVER_SET", true, true);
        assert_eq!(S.explicit(), None);
        assert!(S.get(), "the default");
        S.set(false);
        assert_eq!(S.explicit(), Some(false));
        assert!(!S.get());
        S.set(true);
        assert_eq!(S.explicit(), Some(true));
        static OFF: Switch = Switch::new("PATCHLM_TEST_SWITCH_NEVER_SET", false, false);
        assert!(!OFF.get());
        assert_eq!(OFF.explicit(), None);
    }

    /// "1" turns a switch the way its variable means, "0" the other way; other values say nothing.
    #[test]
    fn a_switch_variable_says_1_0_or_nothing() {
        use std::ffi::OsStr;
        for means in [true, false] {
            assert_eq!(super::env_says(Some(OsStr::new("1")), means), Some(means));
            assert_eq!(super::env_says(Some(OsStr::new("0")), means), Some(!means));
            for other in ["", "2", "true", " 1", "01"] {
                assert_eq!(super::env_says(Some(OsStr::new(other)), means), None, "{other:?}");
            }
            assert_eq!(super::env_says(None, means), None);
        }
    }
}
