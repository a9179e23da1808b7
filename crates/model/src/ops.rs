//! Fused operations with hand-written backward passes, as candle custom ops, each with a CPU
//! implementation (rows or heads in parallel) and a CUDA kernel (kernels/fused.cu,
//! kernels/flash.cu; `cuda` feature). Statistics are kept in f32 whatever the storage dtype.
//!
//! - [`cross_entropy_multi`]: softmax cross-entropy where each row of logits has K targets (K = 1
//!   is ordinary next-token cross-entropy), without materialising log-probabilities for the
//!   whole vocabulary; the backward pass writes `g · (K · softmax − counts)` directly.
//! - [`rms_norm`]: RMSNorm, input and weight gradients.
//! - [`rope`]: rotary embeddings; [`causal_softmax`]: scale + causal mask + softmax of attention
//!   scores; [`flash_attention`]: causal attention without a T×T matrix (opt-in, see
//!   [`set_flash_attention`]).
//! - [`embedding`]: lookup with a scatter-add backward; [`swiglu`]: SwiGLU's gate.
//! - [`adamw_update`]: one AdamW step of one parameter in a single pass (no backward);
//!   [`adamw_multi`] / [`sum_of_squares`]: all parameters (gradients f32 or bf16) in one launch.
//! - For a hand-written backward pass (no graph; backward passes in [`grad`]):
//!   [`heads_from_rows`] / [`rows_from_heads`] (attention heads with RoPE fused, and back),
//!   [`swiglu_packed`] (SwiGLU on stacked gate/up rows), [`add_rms_norm`] (residual add fused
//!   into the norm), [`cross_entropy_multi_lse`] (the loss keeping each row's log-sum-exp).
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
                let said = match std::env::var_os(self.env) {
                    Some(v) if v == "1" => Some(self.env_means),
                    Some(v) if v == "0" => Some(!self.env_means),
                    _ => None,
                };
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
pub fn cross_entropy_multi(logits: &Tensor, targets: &Tensor) -> candle_core::Result<Tensor> {
    let (n, k) = ce_dims(logits, targets)?;
    let rows = logits.contiguous()?.apply_op2(&targets.contiguous()?, MultiTargetCe { lse: false })?;
    rows.sum_all()? / (n * k) as f64
}

/// Forward: per-row Σ_k (lse − logit[t_k]) in f32, shape (N,).
struct MultiTargetCe {
    /// Also return each row's log-sum-exp: output (2, N), losses then log-sum-exps (no autograd).
    lse: bool,
}

/// Backward: `grad` (N,) → g_i · (K · softmax_ij − #{k : t_ik = j}), in the logits' dtype; with
/// `lse`, `grad` is (2, N): the per-row scales, then the forward's log-sum-exps.
struct MultiTargetCeGrad {
    lse: bool,
}

fn contiguous<'a, T>(s: &'a [T], l: &Layout, what: &str) -> candle_core::Result<&'a [T]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&s[a..b]),
        None => candle_core::bail!("{what}: expected a contiguous tensor"),
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

trait Float: Copy + Send + Sync + 'static {
    fn f(self) -> f32;
    fn from_f(x: f32) -> Self;
    /// The elements of a CPU storage of this dtype, or None for another dtype.
    fn of(s: &CpuStorage) -> Option<&[Self]>;
}
impl Float for f32 {
    fn of(s: &CpuStorage) -> Option<&[Self]> {
        match s {
            CpuStorage::F32(v) => Some(v),
            _ => None,
        }
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

/// (max, log Σ exp(x − max)) of one row, in f32.
fn row_stats<T: Float>(row: &[T]) -> (f32, f32) {
    let m = row.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x.f()));
    let s: f32 = row.iter().map(|&x| (x.f() - m).exp()).sum();
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

fn ce_fwd<T: Float>(x: &[T], t: &[u32], n: usize, v: usize, k: usize) -> candle_core::Result<Vec<f32>> {
    for &id in t {
        check_target(id, v)?;
    }
    Ok((0..n)
        .into_par_iter()
        .map(|i| {
            let row = &x[i * v..(i + 1) * v];
            let (m, lse) = row_stats(row);
            t[i * k..(i + 1) * k].iter().map(|&id| m + lse - row[id as usize].f()).sum::<f32>()
        })
        .collect())
}

/// Per-row losses, then (`lse`) per-row log-sum-exps.
fn ce_fwd_rows<T: Float>(x: &[T], t: &[u32], n: usize, v: usize, k: usize, lse: bool) -> candle_core::Result<Vec<f32>> {
    let mut out = ce_fwd(x, t, n, v, k)?;
    if lse {
        out.par_extend(x.par_chunks(v).map(|row| {
            let (m, l) = row_stats(row);
            m + l
        }));
    }
    Ok(out)
}

fn ce_bwd<T: Float>(x: &[T], t: &[u32], g: &[f32], v: usize, k: usize) -> Vec<T> {
    ce_bwd_with(x, t, g, v, k, |_, row| {
        let (m, l) = row_stats(row);
        m + l
    })
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
        let mut acc: Vec<f32> = row.iter().map(|&xv| scale * (xv.f() - lse).exp()).collect();
        for &id in &t[i * k..(i + 1) * k] {
            acc[id as usize] -= gi;
        }
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
        let g = match s3 {
            CpuStorage::F32(g) => contiguous(g, l3, "grad")?,
            _ => candle_core::bail!("cross_entropy_multi: gradient must be f32"),
        };
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

/// RMSNorm over the last dimension, fused: `x · rsqrt(mean(x²) + eps)` computed in f32, cast
/// back to `x`'s dtype, times `weight` (HF LLaMA's order). `x` (..., D) in f32, bf16 or f16,
/// `weight` (D,) in the same dtype. Differentiable in both.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    let d = x.dim(candle_core::D::Minus1)?;
    if weight.dims() != [d] {
        candle_core::bail!("rms_norm: weight {:?} does not match the last dimension of {:?}", weight.dims(), x.dims());
    }
    let shape = x.shape().clone();
    let rows = x.elem_count() / d.max(1);
    let y = x.reshape((rows, d))?.contiguous()?.apply_op2(&weight.contiguous()?, RmsNormOp { eps: eps as f32 })?;
    y.reshape(shape)
}

struct RmsNormOp {
    eps: f32,
}

/// Backward of [`RmsNormOp`]: (x (N, D), w, dy) → dx and dw in one flat buffer of N·D + D
/// elements (dx first; see [`rms_norm_backward`]), from one pass over x and dy. With `residual`
/// (N, D), dx + residual (a residual branch's gradient, added before the one rounding).
struct RmsNormGrad {
    eps: f32,
    residual: Option<Tensor>,
}

/// Both gradients of RMSNorm from one [`RmsNormGrad`] launch: x (rows, D) → (dx like x, dw (D,)),
/// dx plus `residual` where given (on CUDA that takes the warp-per-row kernels, see
/// [`set_rows_cuda`]; without them the residual is added by a separate kernel).
fn rms_norm_backward(
    x: &Tensor,
    w: &Tensor,
    dy: &Tensor,
    residual: Option<&Tensor>,
    eps: f32,
) -> candle_core::Result<(Tensor, Tensor)> {
    let (rows, d) = x.dims2()?;
    if let Some(r) = residual {
        if r.dims() != [rows, d] || r.dtype() != x.dtype() {
            candle_core::bail!(
                "rms_norm: residual gradient {:?} {:?} does not match x {:?}",
                r.dims(),
                r.dtype(),
                x.dims()
            );
        }
        if x.device().is_cuda() && !ROWS_CUDA.get() {
            let (dx, dw) = rms_norm_backward(x, w, dy, None, eps)?;
            return Ok(((dx + r)?, dw));
        }
    }
    let op = RmsNormGrad { eps, residual: residual.map(|r| r.contiguous()).transpose()? };
    let both = x.contiguous()?.apply_op3_no_bwd(&w.contiguous()?, &dy.contiguous()?, &op)?;
    Ok((both.narrow(0, 0, rows * d)?.reshape((rows, d))?, both.narrow(0, rows * d, d)?))
}

/// A residual add fused with the RMSNorm after it, for a hand-written backward pass (no graph):
/// `a`, `b` (rows, D) → (s = a + b, [`rms_norm`]`(s, weight)`), one pass over the rows (with the
/// warp-per-row kernels on CUDA, see [`set_rows_cuda`]; otherwise an add and the norm).
pub fn add_rms_norm(a: &Tensor, b: &Tensor, weight: &Tensor, eps: f64) -> candle_core::Result<(Tensor, Tensor)> {
    let (rows, d) = a.dims2()?;
    if b.dims() != a.dims() || b.dtype() != a.dtype() || weight.dims() != [d] {
        candle_core::bail!(
            "add_rms_norm: a {:?}, b {:?} and weight {:?} do not match",
            a.dims(),
            b.dims(),
            weight.dims()
        );
    }
    if a.device().is_cuda() && !ROWS_CUDA.get() {
        let s = (a + b)?;
        let y = rms_norm(&s, weight, eps)?;
        return Ok((s, y));
    }
    let both =
        a.contiguous()?.apply_op3_no_bwd(&b.contiguous()?, &weight.contiguous()?, &AddRmsOp { eps: eps as f32 })?;
    Ok((both.narrow(0, 0, rows * d)?.reshape((rows, d))?, both.narrow(0, rows * d, rows * d)?.reshape((rows, d))?))
}

/// (a, b, w) → [s = a + b | rms_norm(s, w)] as one flat buffer of 2·N·D.
struct AddRmsOp {
    eps: f32,
}

fn add_rms_fwd<T: Float>(a: &[T], b: &[T], w: &[T], d: usize, eps: f32) -> Vec<T> {
    let s: Vec<T> = a.par_iter().zip(b).map(|(&x, &y)| T::from_f(x.f() + y.f())).collect();
    let y = rms_fwd(&s, w, d, eps);
    let mut out = s;
    out.extend(y);
    out
}

impl CustomOp3 for AddRmsOp {
    fn name(&self) -> &'static str {
        "add-rms-norm"
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
        let (n, d) = l1.shape().dims2()?;
        let out = map_float3!("add_rms_norm", (s1, l1, "a"), (s2, l2, "b"), (s3, l3, "weight"), |a, b, w| {
            add_rms_fwd(a, b, w, d, self.eps)
        });
        Ok((out, Shape::from(2 * n * d)))
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
        cuda::add_rms_fwd(s1, l1, s2, l2, s3, l3, self.eps)
    }
}

fn rms_of<T: Float>(row: &[T], eps: f32) -> f32 {
    let ss: f32 = row.iter().map(|&a| a.f() * a.f()).sum();
    1.0 / (ss / row.len() as f32 + eps).sqrt()
}

fn rms_fwd<T: Float>(x: &[T], w: &[T], d: usize, eps: f32) -> Vec<T> {
    let mut out = vec![T::from_f(0.0); x.len()];
    out.par_chunks_mut(d).zip(x.par_chunks(d)).for_each(|(o, row)| {
        let r = rms_of(row, eps);
        for ((o, &a), &wj) in o.iter_mut().zip(row).zip(w) {
            // Normalised value rounded to the input dtype, then scaled (as HF does).
            *o = T::from_f(T::from_f(a.f() * r).f() * wj.f());
        }
    });
    out
}

fn rms_dx<T: Float>(x: &[T], w: &[T], dy: &[T], residual: Option<&[T]>, d: usize, eps: f32) -> Vec<T> {
    let mut out = vec![T::from_f(0.0); x.len()];
    out.par_chunks_mut(d).zip(x.par_chunks(d).zip(dy.par_chunks(d))).enumerate().for_each(|(i, (o, (row, g)))| {
        let r = rms_of(row, eps);
        let dot: f32 = row.iter().zip(g).zip(w).map(|((&a, &gy), &wj)| a.f() * gy.f() * wj.f()).sum();
        let c = dot * r * r * r / d as f32;
        let res = residual.map(|res| &res[i * d..(i + 1) * d]);
        for (j, (((o, &a), &gy), &wj)) in o.iter_mut().zip(row).zip(g).zip(w).enumerate() {
            let v = r * wj.f() * gy.f() - c * a.f();
            *o = T::from_f(res.map_or(v, |res| v + res[j].f()));
        }
    });
    out
}

fn rms_dw<T: Float>(x: &[T], dy: &[T], d: usize, eps: f32) -> Vec<T> {
    let chunk = (x.len() / d).div_ceil(rayon::current_num_threads().max(1)).max(1) * d;
    let partial: Vec<Vec<f32>> = x
        .par_chunks(chunk)
        .zip(dy.par_chunks(chunk))
        .map(|(xs, gs)| {
            let mut acc = vec![0f32; d];
            for (row, g) in xs.chunks(d).zip(gs.chunks(d)) {
                let r = rms_of(row, eps);
                for ((a, &xv), &gy) in acc.iter_mut().zip(row).zip(g) {
                    *a += T::from_f(xv.f() * r).f() * gy.f();
                }
            }
            acc
        })
        .collect();
    let mut dw = vec![0f32; d];
    for p in partial {
        for (a, b) in dw.iter_mut().zip(p) {
            *a += b;
        }
    }
    dw.into_iter().map(T::from_f).collect()
}

impl CustomOp2 for RmsNormOp {
    fn name(&self) -> &'static str {
        "rms-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (_, d) = l1.shape().dims2()?;
        let out = map_float2!("rms_norm", (s1, l1, "x"), (s2, l2, "weight"), |x, w| rms_fwd(x, w, d, self.eps));
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
        cuda::rms_fwd(s1, l1, s2, l2, self.eps)
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, dw) = rms_norm_backward(x, w, dy, None, self.eps)?;
        Ok((Some(dx), Some(dw)))
    }
}

impl CustomOp3 for RmsNormGrad {
    fn name(&self) -> &'static str {
        "rms-norm-grad"
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
        let (_, d) = l1.shape().dims2()?;
        let guard = self.residual.as_ref().map(|r| r.storage_and_layout());
        let res = match &guard {
            Some((st, l)) => match &**st {
                candle_core::Storage::Cpu(c) => Some((c, *l)),
                _ => candle_core::bail!("rms_norm: the residual gradient must be on the cpu like x"),
            },
            None => None,
        };
        let out = map_float3!("rms_norm", (s1, l1, "x"), (s2, l2, "weight"), (s3, l3, "dy"), |x, w, g| {
            let res = match res {
                Some((c, l)) => Some(contiguous(
                    Float::of(c)
                        .ok_or_else(|| candle_core::Error::Msg("rms_norm: residual dtype differs from x".into()))?,
                    l,
                    "residual",
                )?),
                None => None,
            };
            let mut both = rms_dx(x, w, g, res, d, self.eps);
            both.extend(rms_dw(x, g, d, self.eps));
            both
        });
        Ok((out, Shape::from(l1.shape().elem_count() + d)))
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
        cuda::rms_bwd(s1, l1, s2, l2, s3, l3, self.residual.as_ref(), self.eps)
    }
}

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

struct CausalSoftmax {
    scale: f32,
    t: usize,
    s: usize,
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
        let m = row[..lim].iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v.f() * scale));
        let e: Vec<f32> = row[..lim].iter().map(|&v| (v.f() * scale - m).exp()).collect();
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
struct RopeOp {
    sign: f32,
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

static ROWS_CUDA: Switch = Switch::new("PATCHLM_ROWS_CUDA", true, false);

/// Chooses the second-generation row-wise CUDA kernels process-wide: for [`rms_norm`] and
/// [`causal_softmax`] (both directions) the warp-per-row kernels (a warp per row, shuffles only)
/// instead of the block-per-row ones; [`add_rms_norm`] and [`grad::rms_norm_residual`] with the
/// residual add inside the norm's kernel (otherwise a separate add); and
/// [`cross_entropy_multi_lse`] (16-byte loads, the log-sum-exp kept for a one-pass backward;
/// without it the tape's loss uses [`cross_entropy_multi`]). Opt-in (also `PATCHLM_ROWS_CUDA=1`) until `tests/cuda.rs` has run
/// them on a GPU. Same math and roundings either way.
pub fn set_rows_cuda(enabled: bool) {
    ROWS_CUDA.set(enabled);
}

/// Whether the second-generation row kernels are on (see [`set_rows_cuda`]).
pub fn rows_cuda_enabled() -> bool {
    ROWS_CUDA.get()
}

static LAYOUT_CUDA: Switch = Switch::new("PATCHLM_LAYOUT_CUDA", true, false);

/// Turns the layout CUDA kernels on or off process-wide: [`heads_from_rows`] /
/// [`rows_from_heads`], [`swiglu_packed`] and the one-launch weight cast of [`cast_groups`]. They are opt-in (also `PATCHLM_LAYOUT_CUDA=1`) until
/// `tests/cuda.rs` has run them on a GPU; off, the hand-written backward pass lays out heads with
/// candle's strided copies and [`rope`], and runs the gate and up projections apart.
pub fn set_layout_cuda(enabled: bool) {
    LAYOUT_CUDA.set(enabled);
}

/// Whether [`heads_from_rows`], [`rows_from_heads`] and [`swiglu_packed`] run on `device`: the
/// CPU always (with the fused ops), CUDA when turned on (see [`set_layout_cuda`]).
pub fn layout_ops_supported(device: &Device) -> bool {
    fused_ops_supported(device) && (device.is_cpu() || LAYOUT_CUDA.get())
}

/// The shape of a [`heads_from_rows`] / [`rows_from_heads`] layout change.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HeadsLayout {
    /// Batch size B.
    pub batch: usize,
    /// Sequence length T.
    pub seq: usize,
    /// Query heads H (the only heads of a plain (B·T, H·hd) matrix).
    pub heads: usize,
    /// Key and value heads KVH (0 for a plain matrix).
    pub kv_heads: usize,
    /// Head size hd (even when rotating).
    pub head_dim: usize,
}

impl HeadsLayout {
    fn cols(&self) -> usize {
        (self.heads + 2 * self.kv_heads) * self.head_dim
    }
    fn q_len(&self) -> usize {
        self.batch * self.heads * self.seq * self.head_dim
    }
    fn kv_len(&self) -> usize {
        self.batch * self.kv_heads * self.seq * self.head_dim
    }
    /// (part, head within it, offset of the part in the heads buffer, heads of the part) of
    /// stacked head `head` (q heads first, then k, then v).
    fn part(&self, head: usize) -> (usize, usize) {
        if head < self.heads {
            (0, head)
        } else if head < self.heads + self.kv_heads {
            (1, head - self.heads)
        } else {
            (2, head - self.heads - self.kv_heads)
        }
    }
}

/// Rows → attention heads, with RoPE on the query and key heads: `rows` (B·T, (H + 2·KVH)·hd) is
/// the output of the stacked query/key/value projection (or, with `kv_heads` 0, any (B·T, H·hd)
/// matrix); returns q (B, H, T, hd) and, when `kv_heads` > 0, k and v (B, KVH, T, hd), each
/// contiguous. `rope`: the f32 tables (T, hd) of [`rope`], applied to q and k (never to v);
/// `None` only moves the elements. One pass over the data (one kernel on CUDA) instead of a
/// strided copy per part and a rotation each. Records no graph: for a hand-written backward
/// pass, whose step back is [`rows_from_heads`].
pub fn heads_from_rows(
    rows: &Tensor,
    layout: HeadsLayout,
    rope: Option<(&Tensor, &Tensor)>,
) -> candle_core::Result<(Tensor, Option<(Tensor, Tensor)>)> {
    let l = layout;
    if rows.dims() != [l.batch * l.seq, l.cols()] {
        candle_core::bail!("heads_from_rows: rows {:?} do not match {l:?}", rows.dims());
    }
    let tables = heads_tables(rope, &l, "heads_from_rows")?;
    let all = rows.contiguous()?.apply_op1_no_bwd(&HeadsOp { layout: l, tables, to_heads: true })?;
    let q = all.narrow(0, 0, l.q_len())?.reshape((l.batch, l.heads, l.seq, l.head_dim))?;
    if l.kv_heads == 0 {
        return Ok((q, None));
    }
    let kv_shape = (l.batch, l.kv_heads, l.seq, l.head_dim);
    let k = all.narrow(0, l.q_len(), l.kv_len())?.reshape(kv_shape)?;
    let v = all.narrow(0, l.q_len() + l.kv_len(), l.kv_len())?.reshape(kv_shape)?;
    Ok((q, Some((k, v))))
}

/// The inverse of [`heads_from_rows`] (and its backward pass): heads q (B, H, T, hd) and, when
/// `kv_heads` > 0, `kv` = (k, v) (B, KVH, T, hd) → rows (B·T, (H + 2·KVH)·hd), q and k rotated
/// back by the tables' angles. Records no graph.
pub fn rows_from_heads(
    q: &Tensor,
    kv: Option<(&Tensor, &Tensor)>,
    layout: HeadsLayout,
    rope: Option<(&Tensor, &Tensor)>,
) -> candle_core::Result<Tensor> {
    let l = layout;
    let qs = [l.batch, l.heads, l.seq, l.head_dim];
    let kvs = [l.batch, l.kv_heads, l.seq, l.head_dim];
    let ok = q.dims() == qs
        && match kv {
            Some((k, v)) => l.kv_heads > 0 && k.dims() == kvs && v.dims() == kvs,
            None => l.kv_heads == 0,
        };
    if !ok {
        candle_core::bail!("rows_from_heads: heads do not match {l:?}");
    }
    let tables = heads_tables(rope, &l, "rows_from_heads")?;
    let op = HeadsOp { layout: l, tables, to_heads: false };
    let q = q.contiguous()?;
    match kv {
        Some((k, v)) => q.apply_op3_no_bwd(&k.contiguous()?, &v.contiguous()?, &op),
        None => q.apply_op3_no_bwd(&q, &q, &op),
    }
}

fn heads_tables(
    rope: Option<(&Tensor, &Tensor)>,
    l: &HeadsLayout,
    what: &str,
) -> candle_core::Result<Option<(Tensor, Tensor)>> {
    let Some((c, s)) = rope else { return Ok(None) };
    if c.dims() != [l.seq, l.head_dim] || s.dims() != [l.seq, l.head_dim] || l.head_dim % 2 != 0 {
        candle_core::bail!("{what}: rope tables {:?}/{:?} do not match {l:?} (even head size)", c.dims(), s.dims());
    }
    if c.dtype() != DType::F32 || s.dtype() != DType::F32 {
        candle_core::bail!("{what}: cos and sin tables must be f32");
    }
    Ok(Some((c.contiguous()?, s.contiguous()?)))
}

/// [`heads_from_rows`] (`to_heads`: one input, the rows) or [`rows_from_heads`] (three inputs
/// q, k, v; k and v ignored without key/value heads); the rope tables ride along in the op.
struct HeadsOp {
    layout: HeadsLayout,
    tables: Option<(Tensor, Tensor)>,
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    to_heads: bool,
}

impl HeadsOp {
    fn out_len(&self) -> usize {
        self.layout.q_len() + 2 * self.layout.kv_len()
    }

    /// Runs `f` on the CPU tables' slices.
    fn with_cpu_tables<R>(
        &self,
        f: impl FnOnce(Option<(&[f32], &[f32])>) -> candle_core::Result<R>,
    ) -> candle_core::Result<R> {
        let Some((c, s)) = &self.tables else { return f(None) };
        let (cg, cl) = c.storage_and_layout();
        let (sg, sl) = s.storage_and_layout();
        match (&*cg, &*sg) {
            (candle_core::Storage::Cpu(CpuStorage::F32(cv)), candle_core::Storage::Cpu(CpuStorage::F32(sv))) => {
                f(Some((contiguous(cv, cl, "cos")?, contiguous(sv, sl, "sin")?)))
            }
            _ => candle_core::bail!("heads: the rope tables must be f32 on the cpu like the heads"),
        }
    }
}

/// Writes one head row at position `tt`: rotated (`sign` 1) or rotated back (−1) with the tables,
/// copied without them.
fn head_row<T: Float>(o: &mut [T], row: &[T], tables: Option<(&[f32], &[f32])>, tt: usize, sign: f32) {
    let hd = row.len();
    match tables {
        Some((c, s)) => {
            let (c, s) = (&c[tt * hd..(tt + 1) * hd], &s[tt * hd..(tt + 1) * hd]);
            for (j, o) in o.iter_mut().enumerate() {
                *o = T::from_f(rope_elem(row, j, c, s, sign));
            }
        }
        None => o.copy_from_slice(row),
    }
}

/// Element `j` of one head row after RoPE (`sign` 1) or its inverse (−1), position `p`'s tables.
fn rope_elem<T: Float>(row: &[T], j: usize, c: &[f32], s: &[f32], sign: f32) -> f32 {
    let h = row.len() / 2;
    let rot = if j < h { -row[j + h].f() } else { row[j - h].f() };
    row[j].f() * c[j] + sign * rot * s[j]
}

fn heads_from_rows_cpu<T: Float>(x: &[T], l: HeadsLayout, tables: Option<(&[f32], &[f32])>) -> Vec<T> {
    let (hd, t, cols) = (l.head_dim, l.seq, l.cols());
    let mut out = vec![T::from_f(0.0); l.q_len() + 2 * l.kv_len()];
    let (q_rows, kv_rows) = (l.q_len() / hd, l.kv_len() / hd);
    out.par_chunks_mut(hd).enumerate().for_each(|(r, o)| {
        // Output row r: (part, b, head, position) in heads order.
        let (local, nh, base, part) = if r < q_rows {
            (r, l.heads, 0, 0)
        } else if r < q_rows + kv_rows {
            (r - q_rows, l.kv_heads, l.heads, 1)
        } else {
            (r - q_rows - kv_rows, l.kv_heads, l.heads + l.kv_heads, 2)
        };
        let (tt, hh, bb) = (local % t, (local / t) % nh, local / t / nh);
        let src = (bb * t + tt) * cols + (base + hh) * hd;
        head_row(o, &x[src..src + hd], tables.filter(|_| part < 2), tt, 1.0);
    });
    out
}

fn rows_from_heads_cpu<T: Float>(parts: [&[T]; 3], l: HeadsLayout, tables: Option<(&[f32], &[f32])>) -> Vec<T> {
    let (hd, t) = (l.head_dim, l.seq);
    let nh = l.heads + 2 * l.kv_heads;
    let mut out = vec![T::from_f(0.0); l.batch * t * l.cols()];
    out.par_chunks_mut(hd).enumerate().for_each(|(r, o)| {
        // Output row r: (b, position, stacked head).
        let (head, tt, bb) = (r % nh, (r / nh) % t, r / nh / t);
        let (part, hh) = l.part(head);
        let heads = if part == 0 { l.heads } else { l.kv_heads };
        let src = ((bb * heads + hh) * t + tt) * hd;
        head_row(o, &parts[part][src..src + hd], tables.filter(|_| part < 2), tt, -1.0);
    });
    out
}

impl candle_core::CustomOp1 for HeadsOp {
    fn name(&self) -> &'static str {
        "heads-from-rows"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let l = self.layout;
        let out = self.with_cpu_tables(|tb| {
            Ok(map_float!("heads_from_rows", s1, l1, "rows", |x| heads_from_rows_cpu(x, l, tb)))
        })?;
        Ok((out, Shape::from(self.out_len())))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let out = cuda::heads(self, [(s1, l1), (s1, l1), (s1, l1)])?;
        Ok((out, Shape::from(self.out_len())))
    }
}

impl CustomOp3 for HeadsOp {
    fn name(&self) -> &'static str {
        "rows-from-heads"
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
        let l = self.layout;
        let out = self.with_cpu_tables(|tb| {
            Ok(map_float3!("rows_from_heads", (s1, l1, "q"), (s2, l2, "k"), (s3, l3, "v"), |q, k, v| {
                rows_from_heads_cpu([q, k, v], l, tb)
            }))
        })?;
        Ok((out, Shape::from((l.batch * l.seq, l.cols()))))
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
        let l = self.layout;
        let out = cuda::heads(self, [(s1, l1), (s2, l2), (s3, l3)])?;
        Ok((out, Shape::from((l.batch * l.seq, l.cols()))))
    }
}

/// Embedding lookup `weight[ids]`: `weight` (V, D) in f32, bf16 or f16, `ids` u32 of any shape
/// → (ids..., D). Differentiable in `weight`: the backward pass scatters the rows of the output
/// gradient onto their ids (on the GPU with one thread per element and atomic f32 adds, instead
/// of candle's `index_add`, which walks all ids serially per column).
pub fn embedding(weight: &Tensor, ids: &Tensor) -> candle_core::Result<Tensor> {
    let (_, d) = weight.dims2()?;
    if ids.dtype() != DType::U32 {
        candle_core::bail!("embedding: ids must be u32, got {:?}", ids.dtype());
    }
    let mut shape = ids.dims().to_vec();
    shape.push(d);
    let flat = ids.flatten_all()?.contiguous()?;
    weight.contiguous()?.apply_op2(&flat, EmbeddingOp)?.reshape(shape)
}

struct EmbeddingOp;

/// Backward of [`EmbeddingOp`]: (ids (N,), dy (N, D)) → dW (V, D).
struct EmbeddingGrad {
    vocab: usize,
}

fn check_ids(ids: &[u32], v: usize) -> candle_core::Result<()> {
    match ids.iter().find(|&&i| i as usize >= v) {
        Some(i) => candle_core::bail!("embedding: id {i} is outside the vocabulary of {v}"),
        None => Ok(()),
    }
}

fn embedding_fwd<T: Float>(w: &[T], ids: &[u32], d: usize) -> Vec<T> {
    let mut out = vec![T::from_f(0.0); ids.len() * d];
    out.par_chunks_mut(d).zip(ids.par_iter()).for_each(|(o, &i)| {
        o.copy_from_slice(&w[i as usize * d..(i as usize + 1) * d]);
    });
    out
}

/// Rows grouped by id (a counting sort), then each id's gradient row summed in f32 in row order:
/// parallel over ids and deterministic.
fn embedding_bwd<T: Float>(ids: &[u32], dy: &[T], v: usize, d: usize) -> Vec<T> {
    let mut start = vec![0usize; v + 1];
    for &i in ids {
        start[i as usize + 1] += 1;
    }
    for j in 0..v {
        start[j + 1] += start[j];
    }
    let mut fill = start.clone();
    let mut rows = vec![0usize; ids.len()];
    for (r, &i) in ids.iter().enumerate() {
        rows[fill[i as usize]] = r;
        fill[i as usize] += 1;
    }
    let mut out = vec![T::from_f(0.0); v * d];
    out.par_chunks_mut(d).enumerate().for_each(|(id, o)| {
        let mine = &rows[start[id]..start[id + 1]];
        if mine.is_empty() {
            return;
        }
        let mut acc = vec![0f32; d];
        for &r in mine {
            for (a, &g) in acc.iter_mut().zip(&dy[r * d..(r + 1) * d]) {
                *a += g.f();
            }
        }
        for (o, a) in o.iter_mut().zip(acc) {
            *o = T::from_f(a);
        }
    });
    out
}

fn ids_of<'a>(s: &'a CpuStorage, l: &Layout) -> candle_core::Result<&'a [u32]> {
    match s {
        CpuStorage::U32(t) => contiguous(t, l, "ids"),
        _ => candle_core::bail!("embedding: ids must be u32"),
    }
}

impl CustomOp2 for EmbeddingOp {
    fn name(&self) -> &'static str {
        "embedding"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (v, d) = l1.shape().dims2()?;
        let ids = ids_of(s2, l2)?;
        check_ids(ids, v)?;
        let out = map_float!("embedding", s1, l1, "weight", |w| embedding_fwd(w, ids, d));
        Ok((out, Shape::from((ids.len(), d))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        cuda::embedding(s1, l1, s2, l2, None)
    }

    fn bwd(
        &self,
        w: &Tensor,
        ids: &Tensor,
        _res: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let dy = dy.to_dtype(w.dtype())?.contiguous()?;
        Ok((Some(ids.apply_op2_no_bwd(&dy, &EmbeddingGrad { vocab: w.dim(0)? })?), None))
    }
}

impl CustomOp2 for EmbeddingGrad {
    fn name(&self) -> &'static str {
        "embedding-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (_, d) = l2.shape().dims2()?;
        let ids = ids_of(s1, l1)?;
        check_ids(ids, self.vocab)?;
        let v = self.vocab;
        let out = map_float!("embedding", s2, l2, "dy", |g| embedding_bwd(ids, g, v, d));
        Ok((out, Shape::from((v, d))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        cuda::embedding(s2, l2, s1, l1, Some(self.vocab))
    }
}

/// The scalars of one AdamW step (PyTorch's `AdamW` formula, decoupled weight decay):
/// `m ← β1·m + (1−β1)·g`, `v ← β2·v + (1−β2)·g²`,
/// `p ← p·decay − (lr / bias1) · m / (√v / √bias2 + eps)`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWStep {
    /// Learning rate.
    pub lr: f64,
    /// β1.
    pub beta1: f64,
    /// β2.
    pub beta2: f64,
    /// ε.
    pub eps: f64,
    /// Multiplier applied to the parameter first: `1 − lr·weight_decay`, or 1 for no decay.
    pub decay: f64,
    /// Bias correction `1 − β1^t`.
    pub bias1: f64,
    /// Bias correction `1 − β2^t`.
    pub bias2: f64,
}

/// One fused AdamW update: a single pass over the elements of an f32 parameter, its gradient
/// and its moments `moments` (2, N) = (m, v) in f32. Returns the updated parameter (its shape)
/// and the updated moments (2, N); nothing is differentiable.
pub fn adamw_update(
    param: &Tensor,
    grad: &Tensor,
    moments: &Tensor,
    step: &AdamWStep,
) -> candle_core::Result<(Tensor, Tensor)> {
    let n = param.elem_count();
    if param.dtype() != DType::F32 || grad.dtype() != DType::F32 || moments.dtype() != DType::F32 {
        candle_core::bail!("adamw_update: parameter, gradient and moments must be f32");
    }
    if grad.elem_count() != n || moments.dims() != [2, n] {
        candle_core::bail!(
            "adamw_update: gradient {:?} or moments {:?} do not fit the parameter {:?}",
            grad.dims(),
            moments.dims(),
            param.dims()
        );
    }
    let out = param.flatten_all()?.contiguous()?.apply_op3_no_bwd(
        &grad.flatten_all()?.contiguous()?,
        &moments.contiguous()?,
        &AdamWOp(*step),
    )?;
    Ok((out.get(0)?.reshape(param.shape())?, out.narrow(0, 1, 2)?))
}

struct AdamWOp(AdamWStep);

/// The per-element constants of [`AdamWStep`] as the kernels use them (f32).
#[derive(Clone, Copy)]
struct AdamWConsts {
    b1: f32,
    b2: f32,
    ob1: f32,
    ob2: f32,
    eps: f32,
    decay: f32,
    step: f32,
    sbc2: f32,
}

impl AdamWConsts {
    fn of(s: &AdamWStep) -> Self {
        let [b1, b2, ob1, ob2, eps, decay, step, sbc2] = s.kernel_args();
        Self { b1, b2, ob1, ob2, eps, decay, step, sbc2 }
    }
}

impl AdamWStep {
    /// The AdamW kernels' f32 arguments in their order: β1, β2, 1 − β1, 1 − β2, ε, decay,
    /// lr / bias1, √bias2 (the CUDA launchers and the emulated kernel tests pass these).
    #[doc(hidden)]
    pub fn kernel_args(&self) -> [f32; 8] {
        [
            self.beta1 as f32,
            self.beta2 as f32,
            (1.0 - self.beta1) as f32,
            (1.0 - self.beta2) as f32,
            self.eps as f32,
            self.decay as f32,
            (self.lr / self.bias1) as f32,
            self.bias2.sqrt() as f32,
        ]
    }
}

impl candle_core::CustomOp3 for AdamWOp {
    fn name(&self) -> &'static str {
        "adamw"
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
        let (p, g, mv) = match (s1, s2, s3) {
            (CpuStorage::F32(p), CpuStorage::F32(g), CpuStorage::F32(mv)) => {
                (contiguous(p, l1, "param")?, contiguous(g, l2, "grad")?, contiguous(mv, l3, "moments")?)
            }
            _ => candle_core::bail!("adamw_update: parameter, gradient and moments must be f32"),
        };
        let n = p.len();
        let c = AdamWConsts::of(&self.0);
        let (m, v) = mv.split_at(n);
        let mut out = vec![0f32; 3 * n];
        let (po, mvo) = out.split_at_mut(n);
        let (mo, vo) = mvo.split_at_mut(n);
        const CHUNK: usize = 4096;
        po.par_chunks_mut(CHUNK).zip(mo.par_chunks_mut(CHUNK)).zip(vo.par_chunks_mut(CHUNK)).enumerate().for_each(
            |(ci, ((po, mo), vo))| {
                let base = ci * CHUNK;
                for i in 0..po.len() {
                    let (gi, k) = (g[base + i], base + i);
                    mo[i] = m[k] * c.b1 + gi * c.ob1;
                    vo[i] = v[k] * c.b2 + gi * gi * c.ob2;
                    let denom = vo[i].sqrt() / c.sbc2 + c.eps;
                    po[i] = p[k] * c.decay - mo[i] / denom * c.step;
                }
            },
        );
        Ok((CpuStorage::F32(out), Shape::from((3, n))))
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
        cuda::adamw(s1, l1, s2, l2, s3, l3, self.0.kernel_args())
    }
}

/// One parameter's share of a multi-tensor AdamW step ([`adamw_multi`]): the f32 parameter,
/// its f32 or bf16 gradient (any shape with the parameter's element count; the CUDA kernel reads
/// bf16 as it is, elsewhere it is cast to f32 first) and its f32 moments (2, N).
pub struct AdamWSlot<'a> {
    /// The parameter, updated in place.
    pub param: &'a Var,
    /// Its gradient.
    pub grad: &'a Tensor,
    /// Its moments (m, v) as one (2, N) tensor; updated in place by the multi-tensor kernel,
    /// replaced otherwise.
    pub moments: &'a mut Tensor,
    /// Whether [`AdamWStep::decay`] applies to this parameter (otherwise no weight decay).
    pub decay: bool,
}

static MULTI_CUDA: Switch = Switch::new("PATCHLM_MULTI_TENSOR_CUDA", true, true);

/// Turns the multi-tensor CUDA kernels of [`adamw_multi`] and [`sum_of_squares`] on or off
/// process-wide (on by default; `PATCHLM_MULTI_TENSOR_CUDA=0` turns them off). Off, CUDA takes the
/// per-tensor path (the [`adamw_update`] kernel, one launch per parameter).
pub fn set_multi_tensor_cuda(enabled: bool) {
    MULTI_CUDA.set(enabled);
}

/// Whether the multi-tensor kernels run on `device` (see [`set_multi_tensor_cuda`]).
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
fn multi_tensor_cuda(device: &Device) -> bool {
    MULTI_CUDA.get() && device.is_cuda() && fused_ops_supported(device)
}

/// AdamW over many f32 parameters at once (gradients f32 or bf16), with the gradients multiplied by `grad_scale` first
/// (a clipping coefficient; 1 for none). With the multi-tensor CUDA kernel (on by default, see
/// [`set_multi_tensor_cuda`]) this is one kernel launch for all parameters, updating parameters
/// and moments in place (in the style of apex's `multi_tensor_apply`); elsewhere, one
/// [`adamw_update`] per parameter. Both compute PyTorch's `AdamW` update (see [`AdamWStep`]).
pub fn adamw_multi(slots: &mut [AdamWSlot<'_>], step: &AdamWStep, grad_scale: f64) -> candle_core::Result<()> {
    check_adamw_slots(slots)?;
    #[cfg(feature = "cuda")]
    if let Some(first) = slots.first() {
        if let Device::Cuda(dev) = first.param.device() {
            if multi_tensor_cuda(first.param.device()) {
                return cuda::multi_adamw(dev, slots, step, grad_scale, None);
            }
        }
    }
    for s in slots.iter_mut() {
        let step = AdamWStep { decay: if s.decay { step.decay } else { 1.0 }, ..*step };
        let g = s.grad.to_dtype(DType::F32)?;
        let g = if grad_scale == 1.0 { g } else { (g * grad_scale)? };
        let (p, m) = adamw_update(s.param.as_tensor(), &g, s.moments, &step)?;
        s.param.set(&p)?;
        *s.moments = m;
    }
    Ok(())
}

/// The dtypes and shapes [`adamw_multi`] needs.
fn check_adamw_slots(slots: &[AdamWSlot<'_>]) -> candle_core::Result<()> {
    for s in slots.iter() {
        let n = s.param.elem_count();
        if s.param.dtype() != DType::F32 || s.moments.dtype() != DType::F32 {
            candle_core::bail!("adamw_multi: parameters and moments must be f32");
        }
        if !matches!(s.grad.dtype(), DType::F32 | DType::BF16) {
            candle_core::bail!("adamw_multi: gradients must be f32 or bf16, got {:?}", s.grad.dtype());
        }
        if s.grad.elem_count() != n || s.moments.dims() != [2, n] {
            candle_core::bail!(
                "adamw_multi: gradient {:?} or moments {:?} do not fit the parameter {:?}",
                s.grad.dims(),
                s.moments.dims(),
                s.param.dims()
            );
        }
    }
    Ok(())
}

/// The factor that gradients with global norm `norm` are scaled by to clip them to `max_norm`,
/// as torch's `clip_grad_norm_`: `max_norm / (norm + 1e-6)` capped at 1; 1 when `max_norm` ≤ 0
/// (no clipping) or the norm is not finite.
pub fn clip_factor(norm: f64, max_norm: f64) -> f64 {
    if max_norm > 0.0 && norm.is_finite() {
        (max_norm / (norm + 1e-6)).min(1.0)
    } else {
        1.0
    }
}

static DEVICE_CLIP: Switch = Switch::new("PATCHLM_DEVICE_CLIP", true, false);

/// Lets [`adamw_multi_clipped`] hand the gradients' sum of squares to the multi-tensor CUDA
/// kernel, which computes the clipping factor itself: the host enqueues the update without
/// waiting for the norm. Opt-in (also `PATCHLM_DEVICE_CLIP=1`) until `tests/cuda.rs` has run it
/// on a GPU; off, the host reads the norm first (a wait for the device in every step).
pub fn set_device_clip(enabled: bool) {
    DEVICE_CLIP.set(enabled);
}

/// Whether [`set_device_clip`] is on.
pub fn device_clip_enabled() -> bool {
    DEVICE_CLIP.get()
}

/// [`adamw_multi`] with the gradients clipped to the global norm `max_norm` (see
/// [`clip_factor`]), given their sum of squares `sumsq` (an f64 scalar on their device, from
/// [`sum_of_squares`]). A non-finite norm updates nothing. With the multi-tensor CUDA kernel and
/// [`set_device_clip`] on, the kernel reads `sumsq` itself; elsewhere it is read here first.
pub fn adamw_multi_clipped(
    slots: &mut [AdamWSlot<'_>],
    step: &AdamWStep,
    sumsq: &Tensor,
    max_norm: f64,
) -> candle_core::Result<()> {
    #[cfg(feature = "cuda")]
    if let Some(first) = slots.first() {
        if let Device::Cuda(dev) = first.param.device() {
            if multi_tensor_cuda(first.param.device())
                && DEVICE_CLIP.get()
                && sumsq.device().same_device(first.param.device())
            {
                check_adamw_slots(slots)?;
                return cuda::multi_adamw(dev, slots, step, 1.0, Some((sumsq, max_norm)));
            }
        }
    }
    let norm = sumsq.to_dtype(DType::F64)?.flatten_all()?.get(0)?.to_scalar::<f64>()?.sqrt();
    if !norm.is_finite() {
        return Ok(());
    }
    adamw_multi(slots, step, clip_factor(norm, max_norm))
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
/// tensor-core kernels are on and apply ([`flash_tc_enabled`], [`flash_mma_enabled`]). Only where
/// the fused ops are supported.
pub fn flash_attention_for(device: &Device, dtype: DType, hd: usize) -> bool {
    fused_ops_supported(device)
        && FLASH
            .explicit()
            .unwrap_or_else(|| device.is_cuda() && (flash_tc_enabled(dtype, hd) || flash_mma_enabled(dtype, hd)))
}

static FLASH_TC: Switch = Switch::new("PATCHLM_FLASH_TC", true, false);

/// Chooses tensor-core kernels for [`flash_attention`] on CUDA where they apply (bf16 or f16,
/// head size 32 or 64; wmma tiles with f32 accumulation, kernels/flash.cu), process-wide. Opt-in
/// (also `PATCHLM_FLASH_TC=1`) until `tests/cuda.rs` has run them on a GPU; their math is tested
/// without one by `tests/emulated.rs`. Off, or for other shapes, the CUDA-core kernels run. On,
/// attention defaults to flash where they apply (see [`flash_attention_for`]).
pub fn set_flash_tc(enabled: bool) {
    FLASH_TC.set(enabled);
}

/// Whether [`flash_attention`] on CUDA uses the wmma tensor-core kernels for `dtype` and head
/// size `hd` (see [`set_flash_tc`]; [`set_flash_mma`] takes precedence).
pub fn flash_tc_enabled(dtype: DType, hd: usize) -> bool {
    FLASH_TC.get() && !flash_mma_enabled(dtype, hd) && tensor_core_shape(dtype, hd)
}

fn tensor_core_shape(dtype: DType, hd: usize) -> bool {
    matches!(dtype, DType::BF16 | DType::F16) && matches!(hd, 32 | 64)
}

static FLASH_MMA: Switch = Switch::new("PATCHLM_FLASH_MMA", true, false);

/// Chooses the mma.sync kernels for [`flash_attention`] on CUDA where they apply (bf16 or f16,
/// head size 32 or 64), process-wide: FlashAttention-2's register dataflow (scores, softmax and
/// probabilities stay in registers; kernels/flash.cu), ahead of [`set_flash_tc`]'s wmma kernels
/// when both are on. Opt-in (also `PATCHLM_FLASH_MMA=1`) until `tests/cuda.rs` has run them on a
/// GPU; their math is tested without one by `tests/emulated.rs`. On, attention defaults to flash
/// where they apply (see [`flash_attention_for`]).
pub fn set_flash_mma(enabled: bool) {
    FLASH_MMA.set(enabled);
}

/// Whether [`flash_attention`] on CUDA uses the mma.sync kernels for `dtype` and head size `hd`
/// (see [`set_flash_mma`]).
pub fn flash_mma_enabled(dtype: DType, hd: usize) -> bool {
    FLASH_MMA.get() && tensor_core_shape(dtype, hd)
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
/// as with a KV cache), one dtype (f32, bf16 or f16), hd ∈ {16, 32, 64, 128} on CUDA. Keys are
/// visited in tiles with an online softmax (running max and sum in f32). Differentiable in q,
/// k and v: the backward pass recomputes the probabilities tile by tile from the saved inputs
/// and each row's log-sum-exp (FlashAttention-2's scheme), again without a (T, S) matrix.
pub fn flash_attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> candle_core::Result<Tensor> {
    flash_check(q, k, v)?;
    q.contiguous()?.apply_op3(&k.contiguous()?, &v.contiguous()?, FlashAttn { scale: scale as f32 })
}

/// [`flash_attention`] without a graph, returning also each query row's log-sum-exp of its
/// visible scaled scores, (B, H, T) f32, the statistic [`grad::flash_attention_lse`] needs (so the
/// backward pass does not recompute it).
pub fn flash_attention_lse(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> candle_core::Result<(Tensor, Tensor)> {
    flash_check(q, k, v)?;
    let op = FlashAttnLse { scale: scale as f32, lse: Stash::default() };
    let o = q.contiguous()?.apply_op3_no_bwd(&k.contiguous()?, &v.contiguous()?, &op)?;
    let lse = op.lse.take(&o)?;
    Ok((o, lse))
}

fn flash_check(q: &Tensor, k: &Tensor, v: &Tensor) -> candle_core::Result<()> {
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

struct FlashAttn {
    scale: f32,
}

/// Each query row's log-sum-exp of its visible scaled scores: (q, k) → (B, H, T) f32.
struct FlashLse {
    scale: f32,
}

/// [`FlashAttn`]'s forward that also leaves the log-sum-exp per row (see [`flash_attention_lse`]).
struct FlashAttnLse {
    scale: f32,
    lse: Stash,
}

/// Which gradients a [`FlashGrad`] computes: dq (B, H, T, hd), or dk and dv stacked
/// (2, B, H, S, hd).
#[derive(Clone, Copy, PartialEq, Eq)]
enum FlashPart {
    Q,
    KV,
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
    /// dO (B, H, T, hd) in q's dtype.
    dout: Tensor,
    /// (lse, delta = Σ dO ⊙ O) per query row, (B, H, T, 2) f32.
    stats: Tensor,
}

/// Shapes of one attention call: heads (B·H), queries, keys, head size.
#[derive(Clone, Copy)]
struct AttnDims {
    bh: usize,
    t: usize,
    s: usize,
    hd: usize,
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn to_f32<T: Float>(x: &[T]) -> Vec<f32> {
    x.iter().map(|v| v.f()).collect()
}

/// Forward (`want_o`: the outputs (BH·T·hd)) or the log-sum-exp per row (BH·T), on the CPU.
fn flash_fwd_cpu<T: Float>(q: &[T], k: &[T], v: &[T], a: AttnDims, scale: f32, want_o: bool) -> (Vec<T>, Vec<f32>) {
    let AttnDims { bh, t, s, hd } = a;
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
            let p: Vec<f32> = sc.iter().map(|&x| (x - m).exp()).collect();
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
    let AttnDims { bh, t, s, hd } = a;
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
                let p = (scale * dot(qi, kj) - lse).exp();
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
    Ok(AttnDims { bh: b * h, t, s, hd })
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

/// Flash attention's gradients from the inputs, the output, each row's log-sum-exp and dO.
fn flash_backward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    o: &Tensor,
    lse: &Tensor,
    dout: &Tensor,
    scale: f32,
) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
    flash_check(q, k, v)?;
    let (b, h, t, hd) = q.dims4()?;
    if dout.dims() != [b, h, t, hd] || o.dims() != [b, h, t, hd] {
        candle_core::bail!(
            "flash_attention: o {:?} or dO {:?} is not shaped like q {:?}",
            o.dims(),
            dout.dims(),
            q.dims()
        );
    }
    if lse.dims() != [b, h, t] || lse.dtype() != DType::F32 {
        candle_core::bail!("flash_attention: lse {:?} {:?} is not f32 ({b}, {h}, {t})", lse.dims(), lse.dtype());
    }
    let dout = dout.to_dtype(q.dtype())?.contiguous()?;
    // (lse, delta = Σ dO ⊙ O) per row: one pass where the kernel is on (it goes with the
    // tensor-core flash kernels until it has run on a GPU), else composed.
    let stats = if q.device().is_cpu() || FLASH_TC.get() || FLASH_MMA.get() {
        o.to_dtype(q.dtype())?.contiguous()?.apply_op3_no_bwd(&dout, &lse.contiguous()?, &FlashStats)?
    } else {
        let delta = (dout.to_dtype(DType::F32)? * o.to_dtype(DType::F32)?)?.sum_keepdim(candle_core::D::Minus1)?;
        Tensor::cat(&[&lse.unsqueeze(3)?, &delta], 3)?.contiguous()?
    };
    let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
    let grad = |part| q.apply_op3_no_bwd(&k, &v, &FlashGrad { scale, part, dout: dout.clone(), stats: stats.clone() });
    let dkv = grad(FlashPart::KV)?;
    Ok((grad(FlashPart::Q)?, dkv.get(0)?, dkv.get(1)?))
}

/// The backward's row statistics: (o, dO (B, H, T, hd), lse (B, H, T) f32) → (B, H, T, 2) f32
/// holding (lse, Σ_d o·dO) per row.
struct FlashStats;

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
        let (b, h, t, hd) = l1.shape().dims4()?;
        let lse = match s3 {
            CpuStorage::F32(l) => contiguous(l, l3, "lse")?,
            _ => candle_core::bail!("flash_attention: lse must be f32"),
        };
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
        let (b, h, t, hd) = l1.shape().dims4()?;
        let st = cuda::flash_stats(s1, l1, s2, l2, s3, l3, b * h * t, hd)?;
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
        let (o, lse) = cuda::flash_fwd(s1, l1, s2, l2, s3, l3, attn_dims(l1, l2)?, self.scale)?;
        let (b, h, t, _) = l1.shape().dims4()?;
        self.lse.put(Stashed::Cuda(lse), Shape::from((b, h, t)));
        Ok((o, l1.shape().clone()))
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
        let out = cuda::flash_grad(x, (st, sl), a, self.scale, self.part == FlashPart::KV)?;
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
        };
        Ok((AttnDims { bh: b * h, t, s, hd }, shape))
    }
}

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

struct SwiGlu;

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
struct SwiGluPacked;

fn swiglu_packed_fwd<T: Float>(gu: &[T], f: usize) -> Vec<T> {
    let mut out = vec![T::from_f(0.0); gu.len() / 2];
    out.par_chunks_mut(f).zip(gu.par_chunks(2 * f)).for_each(|(o, r)| {
        let (g, u) = r.split_at(f);
        for ((o, &g), &u) in o.iter_mut().zip(g).zip(u) {
            let g = g.f();
            *o = T::from_f(g * sigmoid(g) * u.f());
        }
    });
    out
}

fn swiglu_packed_bwd<T: Float>(gu: &[T], dy: &[T], f: usize) -> Vec<T> {
    let mut out = vec![T::from_f(0.0); gu.len()];
    out.par_chunks_mut(2 * f).zip(gu.par_chunks(2 * f).zip(dy.par_chunks(f))).for_each(|(o, (r, d))| {
        let (dg, du) = o.split_at_mut(f);
        for c in 0..f {
            let (x, up, dv) = (r[c].f(), r[f + c].f(), d[c].f());
            let sg = sigmoid(x);
            dg[c] = T::from_f(dv * up * sg * (1.0 + x * (1.0 - sg)));
            du[c] = T::from_f(dv * x * sg);
        }
    });
    out
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

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

fn swiglu_fwd<T: Float>(g: &[T], u: &[T]) -> Vec<T> {
    let mut out = vec![T::from_f(0.0); g.len()];
    out.par_chunks_mut(4096).zip(g.par_chunks(4096).zip(u.par_chunks(4096))).for_each(|(o, (g, u))| {
        for ((o, &g), &u) in o.iter_mut().zip(g).zip(u) {
            let g = g.f();
            *o = T::from_f(g * sigmoid(g) * u.f());
        }
    });
    out
}

fn swiglu_bwd<T: Float>(g: &[T], u: &[T], dy: &[T]) -> Vec<T> {
    let n = g.len();
    let mut out = vec![T::from_f(0.0); 2 * n];
    let (dg, du) = out.split_at_mut(n);
    const C: usize = 4096;
    dg.par_chunks_mut(C).zip(du.par_chunks_mut(C)).enumerate().for_each(|(c, (dg, du))| {
        for i in 0..dg.len() {
            let k = c * C + i;
            let (x, up, d) = (g[k].f(), u[k].f(), dy[k].f());
            let sg = sigmoid(x);
            dg[i] = T::from_f(d * up * sg * (1.0 + x * (1.0 - sg)));
            du[i] = T::from_f(d * x * sg);
        }
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

/// CUDA twins of the CPU kernels above (kernels/fused.cu, compiled to PTX by build.rs).
#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{CudaSlice, DevicePtr, DeviceRepr, LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::{CudaDType, CudaStorageSlice, WrapErr};
    use candle_core::{CudaDevice, CudaStorage, DType, Layout, Result, Shape};
    use half::{bf16, f16};

    /// The PTX of kernels/fused.cu.
    pub const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/fused.ptx"));
    const MODULE: &str = "patchlm_fused";

    /// cudarc's form of a [`crate::launch`] geometry.
    fn cfg(l: crate::launch::Launch) -> LaunchConfig {
        LaunchConfig { grid_dim: l.grid, block_dim: l.block, shared_mem_bytes: 0 }
    }

    fn rows_cfg(rows: usize, threads: u32) -> LaunchConfig {
        cfg(crate::launch::block_rows(rows, threads))
    }

    /// The warp-per-row kernels' launch ([`super::set_rows_cuda`]).
    fn warp_rows_cfg(rows: usize) -> LaunchConfig {
        cfg(crate::launch::warp_rows(rows))
    }

    /// An element-wise kernel over `n` items.
    fn elems_cfg(n: usize) -> LaunchConfig {
        cfg(crate::launch::elems(n))
    }

    /// Kernel `name` and its launch for `rows` rows of `len`: the warp-per-row variant (`name_w`,
    /// which takes the row count as its last argument) when turned on, else one block per row of
    /// up to `max_threads` threads (`len / per_thread` rounded up to warps).
    fn row_kernel(
        name: &str,
        sfx: &str,
        rows: usize,
        len: usize,
        per_thread: usize,
        max_threads: u32,
    ) -> (String, LaunchConfig, bool) {
        if super::ROWS_CUDA.get() {
            (format!("{name}_w_{sfx}"), warp_rows_cfg(rows), true)
        } else {
            (format!("{name}_{sfx}"), rows_cfg(rows, threads_for(len.div_ceil(per_thread)).min(max_threads)), false)
        }
    }

    use crate::launch::threads_for;

    fn check(l: &Layout, what: &str) -> Result<usize> {
        if !l.is_contiguous() {
            candle_core::bail!("{what}: expected a contiguous tensor");
        }
        Ok(l.start_offset())
    }

    fn wrap_f32(s: CudaSlice<f32>, dev: &CudaDevice) -> CudaStorage {
        CudaStorage { slice: CudaStorageSlice::F32(s), device: dev.clone() }
    }

    /// Multi-target cross-entropy forward: per-row f32 sums.
    /// (`lse` false) per-row losses (N,); (`lse` true, `ce_fwd_lse_*`) per-row losses then
    /// log-sum-exps (2, N).
    pub fn ce_fwd(
        x: &CudaStorage,
        lx: &Layout,
        t: &CudaStorage,
        lt: &Layout,
        lse: bool,
    ) -> Result<(CudaStorage, Shape)> {
        let (n, v) = lx.shape().dims2()?;
        let (_, k) = lt.shape().dims2()?;
        let (ox, ot) = (check(lx, "logits")?, check(lt, "targets")?);
        let dev = x.device();
        let tv = t.as_cuda_slice::<u32>()?.slice(ot..);
        let rows = if lse { 2 * n } else { n };
        let out = unsafe { dev.alloc::<f32>(rows)? };
        let (vi, ki, ni) = (v as i32, k as i32, n as i32);
        let name = format!("ce_fwd{}_{}", if lse { "_lse" } else { "" }, suffix(x.dtype())?);
        macro_rules! go {
            ($ty:ty) => {{
                let xs = x.as_cuda_slice::<$ty>()?.slice(ox..);
                let f = dev.get_or_load_custom_func(&name, MODULE, PTX)?;
                let mut b = f.builder();
                b.arg(&xs);
                b.arg(&tv);
                b.arg(&out);
                b.arg(&vi);
                b.arg(&ki);
                if lse {
                    b.arg(&ni);
                }
                unsafe { b.launch(cfg(crate::launch::cross_entropy(n, v))) }.w()?;
            }};
        }
        match x.dtype() {
            candle_core::DType::F32 => go!(f32),
            candle_core::DType::BF16 => go!(bf16),
            candle_core::DType::F16 => go!(f16),
            d => candle_core::bail!("cross_entropy_multi: logits must be f32, bf16 or f16, got {d:?}"),
        }
        let shape = if lse { Shape::from((2, n)) } else { Shape::from(n) };
        Ok((wrap_f32(out, dev), shape))
    }

    /// Multi-target cross-entropy backward: logits gradient in the logits' dtype; `g` holds the
    /// per-row scales (N,), or with `lse` the scales then the forward's log-sum-exps (2, N).
    pub fn ce_bwd(
        x: &CudaStorage,
        lx: &Layout,
        t: &CudaStorage,
        lt: &Layout,
        g: &CudaStorage,
        lg: &Layout,
        lse: bool,
    ) -> Result<(CudaStorage, Shape)> {
        let (n, v) = lx.shape().dims2()?;
        let (_, k) = lt.shape().dims2()?;
        let (ox, ot, og) = (check(lx, "logits")?, check(lt, "targets")?, check(lg, "grad")?);
        let dev = x.device();
        let tv = t.as_cuda_slice::<u32>()?.slice(ot..);
        let gv = g.as_cuda_slice::<f32>()?.slice(og..);
        let (vi, ki, ni) = (v as i32, k as i32, n as i32);
        let name = format!("ce_bwd{}_{}", if lse { "_lse" } else { "" }, suffix(x.dtype())?);
        macro_rules! go {
            ($ty:ty, $variant:ident) => {{
                let xs = x.as_cuda_slice::<$ty>()?.slice(ox..);
                let out = unsafe { dev.alloc::<$ty>(n * v)? };
                let f = dev.get_or_load_custom_func(&name, MODULE, PTX)?;
                let mut b = f.builder();
                b.arg(&xs);
                b.arg(&tv);
                b.arg(&gv);
                b.arg(&out);
                b.arg(&vi);
                b.arg(&ki);
                if lse {
                    b.arg(&ni);
                }
                unsafe { b.launch(cfg(crate::launch::cross_entropy(n, v))) }.w()?;
                CudaStorage { slice: CudaStorageSlice::$variant(out), device: dev.clone() }
            }};
        }
        let s = match x.dtype() {
            candle_core::DType::F32 => go!(f32, F32),
            candle_core::DType::BF16 => go!(bf16, BF16),
            candle_core::DType::F16 => go!(f16, F16),
            d => candle_core::bail!("cross_entropy_multi: logits must be f32, bf16 or f16, got {d:?}"),
        };
        Ok((s, Shape::from((n, v))))
    }

    fn suffix(d: DType) -> Result<&'static str> {
        match d {
            DType::F32 => Ok("f32"),
            DType::BF16 => Ok("bf16"),
            DType::F16 => Ok("f16"),
            d => candle_core::bail!("fused ops: unsupported dtype {d:?} (f32, bf16 or f16)"),
        }
    }

    /// Causal softmax forward (`grad` None: x → y) or backward (`grad` Some(dy): y → dx).
    pub fn causal_softmax(
        x: &CudaStorage,
        lx: &Layout,
        grad: Option<(&CudaStorage, &Layout)>,
        t: usize,
        s: usize,
        scale: f32,
    ) -> Result<(CudaStorage, Shape)> {
        match x.dtype() {
            DType::F32 => causal_softmax_t::<f32>(x, lx, grad, t, s, scale),
            DType::BF16 => causal_softmax_t::<bf16>(x, lx, grad, t, s, scale),
            DType::F16 => causal_softmax_t::<f16>(x, lx, grad, t, s, scale),
            d => candle_core::bail!("causal_softmax: unsupported dtype {d:?}"),
        }
    }

    fn causal_softmax_t<T: CudaDType + DeviceRepr>(
        x: &CudaStorage,
        lx: &Layout,
        grad: Option<(&CudaStorage, &Layout)>,
        t: usize,
        s: usize,
        scale: f32,
    ) -> Result<(CudaStorage, Shape)> {
        let dev = x.device();
        let sfx = suffix(x.dtype())?;
        let xs = x.as_cuda_slice::<T>()?.slice(check(lx, "scores")?..);
        let rows = lx.shape().elem_count() / s;
        let out = unsafe { dev.alloc::<T>(rows * s)? };
        if rows >= i32::MAX as usize {
            candle_core::bail!("causal_softmax: {rows} rows is more than one launch handles");
        }
        let (ti, si, ri) = (t as i32, s as i32, rows as i32);
        let kernel = if grad.is_some() { "causal_softmax_bwd" } else { "causal_softmax_fwd" };
        let (name, cfg, warp) = row_kernel(kernel, sfx, rows, s, 4, 512);
        let f = dev.get_or_load_custom_func(&name, MODULE, PTX)?;
        let mut b = f.builder();
        b.arg(&xs);
        let gs = grad
            .map(|(g, lg)| Ok::<_, candle_core::Error>(g.as_cuda_slice::<T>()?.slice(check(lg, "dy")?..)))
            .transpose()?;
        if let Some(gs) = &gs {
            b.arg(gs);
        }
        b.arg(&out);
        b.arg(&ti);
        b.arg(&si);
        b.arg(&scale);
        if warp {
            b.arg(&ri);
        }
        unsafe { b.launch(cfg) }.w()?;
        Ok((T::wrap_cuda_slice(out, dev.clone()), lx.shape().clone()))
    }

    /// RoPE (`sign` 1) or its inverse (`sign` −1) with f32 tables.
    pub fn rope(
        x: &CudaStorage,
        lx: &Layout,
        c: &CudaStorage,
        lc: &Layout,
        sn: &CudaStorage,
        ls: &Layout,
        sign: f32,
    ) -> Result<(CudaStorage, Shape)> {
        match x.dtype() {
            DType::F32 => rope_t::<f32>(x, lx, c, lc, sn, ls, sign),
            DType::BF16 => rope_t::<bf16>(x, lx, c, lc, sn, ls, sign),
            DType::F16 => rope_t::<f16>(x, lx, c, lc, sn, ls, sign),
            d => candle_core::bail!("rope: unsupported dtype {d:?}"),
        }
    }

    fn rope_t<T: CudaDType + DeviceRepr>(
        x: &CudaStorage,
        lx: &Layout,
        c: &CudaStorage,
        lc: &Layout,
        sn: &CudaStorage,
        ls: &Layout,
        sign: f32,
    ) -> Result<(CudaStorage, Shape)> {
        let dev = x.device();
        let (_, _, t, hd) = lx.shape().dims4()?;
        let n = lx.shape().elem_count();
        if n >= i32::MAX as usize {
            candle_core::bail!("rope: {n} elements is more than one launch handles");
        }
        let xs = x.as_cuda_slice::<T>()?.slice(check(lx, "x")?..);
        let cs = c.as_cuda_slice::<f32>()?.slice(check(lc, "cos")?..);
        let ss = sn.as_cuda_slice::<f32>()?.slice(check(ls, "sin")?..);
        let out = unsafe { dev.alloc::<T>(n)? };
        let (ti, hi, ni) = (t as i32, hd as i32, n as i32);
        let f = dev.get_or_load_custom_func(&format!("rope_{}", suffix(x.dtype())?), MODULE, PTX)?;
        let mut b = f.builder();
        b.arg(&xs);
        b.arg(&cs);
        b.arg(&ss);
        b.arg(&out);
        b.arg(&ti);
        b.arg(&hi);
        b.arg(&ni);
        b.arg(&sign);
        unsafe { b.launch(elems_cfg(n)) }.w()?;
        Ok((T::wrap_cuda_slice(out, dev.clone()), lx.shape().clone()))
    }

    /// Embedding gather (`vocab` None: `a` is the (V, D) weight → (N, D)) or its backward
    /// (`vocab` Some(V): `a` is dy (N, D) → dW (V, D), summed with f32 atomics).
    pub fn embedding(
        a: &CudaStorage,
        la: &Layout,
        ids: &CudaStorage,
        li: &Layout,
        vocab: Option<usize>,
    ) -> Result<(CudaStorage, Shape)> {
        let dev = a.device();
        let (rows, d) = la.shape().dims2()?;
        let n = li.shape().elem_count();
        let total = n * d;
        if total >= i32::MAX as usize || vocab.unwrap_or(rows) * d >= i32::MAX as usize {
            candle_core::bail!("embedding: {n} x {d} is more than one launch handles");
        }
        let sfx = suffix(a.dtype())?;
        let is = ids.as_cuda_slice::<u32>()?.slice(check(li, "ids")?..);
        let (ni, di) = (total as i32, d as i32);
        let cfg = elems_cfg(total);
        match vocab {
            None => {
                let vi = rows as i32;
                match a.dtype() {
                    DType::F32 => gather_t::<f32>(a, la, &is, ni, di, vi, n * d, cfg, sfx),
                    DType::BF16 => gather_t::<bf16>(a, la, &is, ni, di, vi, n * d, cfg, sfx),
                    DType::F16 => gather_t::<f16>(a, la, &is, ni, di, vi, n * d, cfg, sfx),
                    d => candle_core::bail!("embedding: unsupported dtype {d:?}"),
                }
                .map(|s| (s, Shape::from((n, d))))
            }
            Some(v) => {
                let acc = dev.alloc_zeros::<f32>(v * d)?;
                let vi = v as i32;
                let f = dev.get_or_load_custom_func(&format!("embedding_bwd_{sfx}"), MODULE, PTX)?;
                let mut b = f.builder();
                match a.dtype() {
                    DType::F32 => b.arg(a.as_cuda_slice::<f32>()?),
                    DType::BF16 => b.arg(a.as_cuda_slice::<bf16>()?),
                    DType::F16 => b.arg(a.as_cuda_slice::<f16>()?),
                    d => candle_core::bail!("embedding: unsupported dtype {d:?}"),
                };
                let off = check(la, "dy")? as i32;
                b.arg(&off);
                b.arg(&is);
                b.arg(&acc);
                b.arg(&ni);
                b.arg(&di);
                b.arg(&vi);
                unsafe { b.launch(cfg) }.w()?;
                let out = match a.dtype() {
                    DType::F32 => wrap_f32(acc, dev),
                    DType::BF16 => cast_t::<bf16>(&acc, v * d, dev, sfx)?,
                    _ => cast_t::<f16>(&acc, v * d, dev, sfx)?,
                };
                Ok((out, Shape::from((v, d))))
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn gather_t<T: CudaDType + DeviceRepr>(
        w: &CudaStorage,
        lw: &Layout,
        ids: &candle_core::cuda_backend::cudarc::driver::CudaView<u32>,
        n: i32,
        d: i32,
        v: i32,
        len: usize,
        cfg: LaunchConfig,
        sfx: &str,
    ) -> Result<CudaStorage> {
        let dev = w.device();
        let ws = w.as_cuda_slice::<T>()?.slice(check(lw, "weight")?..);
        let out = unsafe { dev.alloc::<T>(len)? };
        let f = dev.get_or_load_custom_func(&format!("embedding_fwd_{sfx}"), MODULE, PTX)?;
        let mut b = f.builder();
        b.arg(&ws);
        b.arg(ids);
        b.arg(&out);
        b.arg(&n);
        b.arg(&d);
        b.arg(&v);
        unsafe { b.launch(cfg) }.w()?;
        Ok(T::wrap_cuda_slice(out, dev.clone()))
    }

    fn cast_t<T: CudaDType + DeviceRepr>(
        acc: &CudaSlice<f32>,
        n: usize,
        dev: &CudaDevice,
        sfx: &str,
    ) -> Result<CudaStorage> {
        let out = unsafe { dev.alloc::<T>(n)? };
        let ni = n as i32;
        let f = dev.get_or_load_custom_func(&format!("cast_from_f32_{sfx}"), MODULE, PTX)?;
        let mut b = f.builder();
        b.arg(acc);
        b.arg(&out);
        b.arg(&ni);
        unsafe { b.launch(elems_cfg(n)) }.w()?;
        Ok(T::wrap_cuda_slice(out, dev.clone()))
    }

    /// Fused AdamW: (p, g, (m, v)) → (p', m', v') as one (3, N) f32 buffer. `k` holds
    /// β1, β2, 1−β1, 1−β2, ε, decay, lr/bias1, √bias2.
    pub fn adamw(
        p: &CudaStorage,
        lp: &Layout,
        g: &CudaStorage,
        lg: &Layout,
        mv: &CudaStorage,
        lm: &Layout,
        k: [f32; 8],
    ) -> Result<(CudaStorage, Shape)> {
        let dev = p.device();
        let n = lp.shape().elem_count();
        if n >= i32::MAX as usize {
            candle_core::bail!("adamw_update: {n} elements is more than one launch handles");
        }
        let ps = p.as_cuda_slice::<f32>()?.slice(check(lp, "param")?..);
        let gs = g.as_cuda_slice::<f32>()?.slice(check(lg, "grad")?..);
        let ms = mv.as_cuda_slice::<f32>()?.slice(check(lm, "moments")?..);
        let out = unsafe { dev.alloc::<f32>(3 * n)? };
        let ni = n as i32;
        let f = dev.get_or_load_custom_func("adamw_f32", MODULE, PTX)?;
        let mut b = f.builder();
        b.arg(&ps);
        b.arg(&gs);
        b.arg(&ms);
        b.arg(&out);
        b.arg(&ni);
        for x in &k {
            b.arg(x);
        }
        unsafe { b.launch(elems_cfg(n)) }.w()?;
        Ok((wrap_f32(out, dev), Shape::from((3, n))))
    }

    /// The device address of the first element of a contiguous f32 CUDA tensor.
    fn f32_addr(t: &candle_core::Tensor, what: &str) -> Result<u64> {
        if t.dtype() != DType::F32 {
            candle_core::bail!("{what}: expected f32, got {:?}", t.dtype());
        }
        grad_addr(t, what).map(|(a, _)| a)
    }

    /// The device address of a one-element f64 CUDA tensor (a sum of squares).
    fn f64_scalar_addr(t: &candle_core::Tensor) -> Result<u64> {
        let (st, l) = t.storage_and_layout();
        let candle_core::Storage::Cuda(cs) = &*st else { candle_core::bail!("adamw_multi: the norm is not on CUDA") };
        if t.dtype() != DType::F64 || t.elem_count() != 1 {
            candle_core::bail!("adamw_multi: the sum of squares must be one f64, got {:?} {:?}", t.dtype(), t.dims());
        }
        let stream = cs.device().cuda_stream();
        let (ptr, _sync) = cs.as_cuda_slice::<f64>()?.device_ptr(&stream);
        Ok(ptr + (l.start_offset() * 8) as u64)
    }

    /// The device address of a contiguous f32 or bf16 CUDA tensor, and the multi-tensor table's
    /// flag bit for its dtype (2 for bf16, see kernels/fused.cu).
    fn grad_addr(t: &candle_core::Tensor, what: &str) -> Result<(u64, u64)> {
        let (st, l) = t.storage_and_layout();
        let candle_core::Storage::Cuda(cs) = &*st else { candle_core::bail!("{what}: expected a CUDA tensor") };
        let off = check(l, what)?;
        let stream = cs.device().cuda_stream();
        match t.dtype() {
            DType::F32 => {
                let (ptr, _sync) = cs.as_cuda_slice::<f32>()?.device_ptr(&stream);
                Ok((ptr + (off * 4) as u64, 0))
            }
            DType::BF16 => {
                let (ptr, _sync) = cs.as_cuda_slice::<bf16>()?.device_ptr(&stream);
                Ok((ptr + (off * 2) as u64, 2))
            }
            d => candle_core::bail!("{what}: expected f32 or bf16, got {d:?}"),
        }
    }

    /// [`super::adamw_multi`] on CUDA: one launch of `multi_adamw_f32` over every slot, in place.
    /// With `clip` (the gradients' global sum of squares, an f64 scalar on the device, and the
    /// largest norm), the kernel computes the clipping factor itself and `grad_scale` is unused.
    pub fn multi_adamw(
        dev: &CudaDevice,
        slots: &mut [super::AdamWSlot<'_>],
        step: &super::AdamWStep,
        grad_scale: f64,
        clip: Option<(&candle_core::Tensor, f64)>,
    ) -> Result<()> {
        let device = candle_core::Device::Cuda(dev.clone());
        // Contiguous gradients, kept alive until the kernel is enqueued (frees are stream-ordered).
        let mut grads = Vec::with_capacity(slots.len());
        let mut entries = Vec::with_capacity(slots.len());
        for s in slots.iter_mut() {
            if !s.param.device().same_device(&device) || !s.grad.device().same_device(&device) {
                candle_core::bail!("adamw_multi: every parameter and gradient must be on one CUDA device");
            }
            if !s.moments.is_contiguous() || !s.moments.device().same_device(&device) {
                *s.moments = s.moments.to_device(&device)?.contiguous()?;
            }
            let g = s.grad.contiguous()?;
            let n = s.param.elem_count() as u64;
            let (ga, gflag) = grad_addr(&g, "adamw_multi: gradient")?;
            entries.push([
                f32_addr(s.param.as_tensor(), "adamw_multi: parameter")?,
                ga,
                f32_addr(&*s.moments, "adamw_multi: moments")?,
                n,
                s.decay as u64 | gflag,
            ]);
            grads.push(g);
        }
        let (table, blocks) = crate::launch::multi_table(&entries);
        if blocks == 0 {
            return Ok(());
        }
        let tab = dev.cuda_stream().clone_htod(&table).w()?;

        let (nt, chunk, gs) = (entries.len() as i32, crate::launch::MULTI_CHUNK as i32, grad_scale as f32);
        let f = dev.get_or_load_custom_func("multi_adamw_f32", MODULE, PTX)?;
        let mut b = f.builder();
        b.arg(&tab);
        b.arg(&nt);
        b.arg(&chunk);
        let k = step.kernel_args();
        for x in k.iter().chain([&gs]) {
            b.arg(x);
        }
        let (sumsq, max_norm) = match clip {
            Some((t, m)) => (f64_scalar_addr(t)?, m),
            None => (0u64, 0.0f64),
        };
        b.arg(&sumsq);
        b.arg(&max_norm);
        unsafe { b.launch(cfg(crate::launch::multi(blocks))) }.w()?;
        drop(grads);
        Ok(())
    }

    /// Per-block partial sums of squares over contiguous f32/bf16 tensors (`multi_sumsq_f32`); the
    /// op's input is only the first tensor, whose output buffer it returns.
    struct MultiSumSq {
        table: Vec<u64>,
        tensors: usize,
        blocks: usize,
    }

    impl candle_core::CustomOp1 for MultiSumSq {
        fn name(&self) -> &'static str {
            "multi-sumsq"
        }

        fn cpu_fwd(&self, _: &candle_core::CpuStorage, _: &Layout) -> Result<(candle_core::CpuStorage, Shape)> {
            candle_core::bail!("multi-sumsq runs on CUDA only")
        }

        fn cuda_fwd(&self, s: &CudaStorage, _: &Layout) -> Result<(CudaStorage, Shape)> {
            let dev = s.device();
            let tab = dev.cuda_stream().clone_htod(&self.table).w()?;
            let out = unsafe { dev.alloc::<f32>(self.blocks)? };
            let (nt, chunk) = (self.tensors as i32, crate::launch::MULTI_CHUNK as i32);
            let f = dev.get_or_load_custom_func("multi_sumsq_f32", MODULE, PTX)?;
            let mut b = f.builder();
            b.arg(&tab);
            b.arg(&nt);
            b.arg(&chunk);
            b.arg(&out);
            unsafe { b.launch(cfg(crate::launch::multi(self.blocks))) }.w()?;
            Ok((wrap_f32(out, dev), Shape::from(self.blocks)))
        }
    }

    /// Per-chunk sums of squares of contiguous f32 or bf16 CUDA tensors on one device, f32 (blocks,).
    pub fn multi_sumsq(ts: &[&candle_core::Tensor]) -> Result<candle_core::Tensor> {
        let dev = ts[0].device();
        let mut entries = Vec::with_capacity(ts.len());
        for t in ts {
            if !t.device().same_device(dev) {
                candle_core::bail!("sum_of_squares: tensors on different devices");
            }
            let (a, flag) = grad_addr(t, "sum_of_squares")?;
            entries.push([a, 0, 0, t.elem_count() as u64, flag]);
        }
        let (table, blocks) = crate::launch::multi_table(&entries);
        if blocks == 0 {
            return candle_core::Tensor::zeros(1, DType::F32, dev);
        }
        ts[0].apply_op1_no_bwd(&MultiSumSq { table, tensors: ts.len(), blocks })
    }

    /// [`super::cast_groups`] on CUDA: f32 tensors → one bf16/f16 buffer (`multi_cast_f32`), each
    /// group a view of it. The op's input is only the first tensor (for its device).
    pub fn multi_cast(groups: &[&[&candle_core::Tensor]], dtype: DType) -> Result<Vec<candle_core::Tensor>> {
        /// Each group starts at a multiple of this many elements (128 bytes), so that the kernels
        /// reading a group's view take their aligned paths.
        const ALIGN: usize = 64;
        let flag = if dtype == DType::F16 { 4 } else { 0 };
        let (mut entries, mut keep, mut starts, mut total) = (Vec::new(), Vec::new(), Vec::new(), 0usize);
        for g in groups {
            total = total.next_multiple_of(ALIGN);
            starts.push(total);
            for t in g.iter() {
                let t = t.contiguous()?;
                let n = t.elem_count();
                // Word 1: the destination's byte offset in the buffer, its address added at launch.
                entries.push([f32_addr(&t, "cast_groups")?, (total * 2) as u64, 0, n as u64, flag]);
                total += n;
                keep.push(t);
            }
        }
        let first = groups[0][0];
        let buffer = if total == 0 {
            candle_core::Tensor::zeros(0, dtype, first.device())?
        } else {
            first.apply_op1_no_bwd(&MultiCast { entries, total, dtype })?
        };
        drop(keep);
        groups
            .iter()
            .zip(starts)
            .map(|(g, start)| {
                let mut dims = g[0].dims().to_vec();
                dims[0] = g.iter().map(|t| t.dims()[0]).sum();
                buffer.narrow(0, start, dims.iter().product())?.reshape(dims)
            })
            .collect()
    }

    /// The launch of [`multi_cast`]: entries with destination offsets, the buffer's length.
    struct MultiCast {
        entries: Vec<[u64; 5]>,
        total: usize,
        dtype: DType,
    }

    impl MultiCast {
        fn run<T: CudaDType + DeviceRepr>(&self, dev: &CudaDevice) -> Result<(CudaStorage, Shape)> {
            let stream = dev.cuda_stream();
            let out = unsafe { dev.alloc::<T>(self.total)? };
            let base = {
                let (ptr, _sync) = out.device_ptr(&stream);
                ptr
            };
            let entries: Vec<[u64; 5]> =
                self.entries.iter().map(|&[s, off, z, n, f]| [s, base + off, z, n, f]).collect();
            let (table, blocks) = crate::launch::multi_table(&entries);
            let tab = stream.clone_htod(&table).w()?;
            let (nt, chunk) = (entries.len() as i32, crate::launch::MULTI_CHUNK as i32);
            let f = dev.get_or_load_custom_func("multi_cast_f32", MODULE, PTX)?;
            let mut b = f.builder();
            b.arg(&tab);
            b.arg(&nt);
            b.arg(&chunk);
            unsafe { b.launch(cfg(crate::launch::multi(blocks))) }.w()?;
            Ok((T::wrap_cuda_slice(out, dev.clone()), Shape::from(self.total)))
        }
    }

    impl candle_core::CustomOp1 for MultiCast {
        fn name(&self) -> &'static str {
            "multi-cast"
        }

        fn cpu_fwd(&self, _: &candle_core::CpuStorage, _: &Layout) -> Result<(candle_core::CpuStorage, Shape)> {
            candle_core::bail!("multi-cast runs on CUDA only")
        }

        fn cuda_fwd(&self, s: &CudaStorage, _: &Layout) -> Result<(CudaStorage, Shape)> {
            match self.dtype {
                DType::BF16 => self.run::<bf16>(s.device()),
                DType::F16 => self.run::<f16>(s.device()),
                d => candle_core::bail!("cast_groups: no multi-tensor cast to {d:?}"),
            }
        }
    }

    /// The PTX of kernels/flash.cu (its own module: JIT-compiled only when attention uses it).
    pub const FLASH_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/flash.ptx"));
    const FLASH_MODULE: &str = "patchlm_flash";

    /// The kernels of kernels/flash.cu.
    #[derive(Clone, Copy, PartialEq, Eq)]
    enum FlashKernel {
        /// (q, k, v) → (o, log-sum-exp per row).
        Fwd,
        /// (q, k) → log-sum-exp per row, f32.
        Lse,
        /// (q, dO, k, v, stats) → dq.
        Dq,
        /// … → (dk, dv) stacked.
        Dkv,
    }

    /// Flash attention forward: (o, log-sum-exp per row).
    #[allow(clippy::too_many_arguments)]
    pub fn flash_fwd(
        q: &CudaStorage,
        lq: &Layout,
        k: &CudaStorage,
        lk: &Layout,
        v: &CudaStorage,
        lv: &Layout,
        d: super::AttnDims,
        scale: f32,
    ) -> Result<(CudaStorage, CudaStorage)> {
        let (o, lse) = flash(&[(q, lq), (k, lk), (v, lv)], None, d, scale, FlashKernel::Fwd)?;
        Ok((o, lse.ok_or_else(|| candle_core::Error::Msg("internal: flash forward without lse".into()))?))
    }

    /// The log-sum-exp per row alone (f32).
    pub fn flash_lse(
        q: &CudaStorage,
        lq: &Layout,
        k: &CudaStorage,
        lk: &Layout,
        d: super::AttnDims,
        scale: f32,
    ) -> Result<CudaStorage> {
        Ok(flash(&[(q, lq), (k, lk)], None, d, scale, FlashKernel::Lse)?.0)
    }

    /// The backward's row statistics (lse, Σ o·dO) for `rows` rows of `hd`, f32 (rows, 2).
    #[allow(clippy::too_many_arguments)]
    pub fn flash_stats(
        o: &CudaStorage,
        lo: &Layout,
        d: &CudaStorage,
        ld: &Layout,
        lse: &CudaStorage,
        ll: &Layout,
        rows: usize,
        hd: usize,
    ) -> Result<CudaStorage> {
        let dev = o.device();
        if rows * hd >= i32::MAX as usize {
            candle_core::bail!("flash_attention: {rows} rows is more than one launch handles");
        }
        let f = dev.get_or_load_custom_func(&format!("flash_stats_{}", suffix(o.dtype())?), FLASH_MODULE, FLASH_PTX)?;
        let ls = lse.as_cuda_slice::<f32>()?.slice(check(ll, "lse")?..);
        let st = unsafe { dev.alloc::<f32>(2 * rows)? };
        let (ri, hi) = (rows as i32, hd as i32);
        macro_rules! go {
            ($ty:ty) => {{
                let os = o.as_cuda_slice::<$ty>()?.slice(check(lo, "o")?..);
                let ds = d.as_cuda_slice::<$ty>()?.slice(check(ld, "dO")?..);
                let mut b = f.builder();
                b.arg(&os);
                b.arg(&ds);
                b.arg(&ls);
                b.arg(&st);
                b.arg(&ri);
                b.arg(&hi);
                unsafe { b.launch(warp_rows_cfg(rows)) }.w()?;
            }};
        }
        match o.dtype() {
            DType::F32 => go!(f32),
            DType::BF16 => go!(bf16),
            DType::F16 => go!(f16),
            dt => candle_core::bail!("flash_attention: unsupported dtype {dt:?}"),
        }
        Ok(wrap_f32(st, dev))
    }

    /// dq (`kv` false) or dk and dv stacked (`kv` true) from `x` = [q, dO, k, v] and the row
    /// statistics.
    pub fn flash_grad(
        x: [(&CudaStorage, &Layout); 4],
        st: (&CudaStorage, &Layout),
        d: super::AttnDims,
        scale: f32,
        dkv: bool,
    ) -> Result<CudaStorage> {
        let kernel = if dkv { FlashKernel::Dkv } else { FlashKernel::Dq };
        Ok(flash(&x, Some(st), d, scale, kernel)?.0)
    }

    /// One flash-attention step: `x` holds the kernel's tensors of the compute dtype in order
    /// (q, k, v forward; q, k log-sum-exp; q, dO, k, v gradients), `st` the gradients' f32 row
    /// statistics.
    fn flash(
        x: &[(&CudaStorage, &Layout)],
        st: Option<(&CudaStorage, &Layout)>,
        d: super::AttnDims,
        scale: f32,
        kernel: FlashKernel,
    ) -> Result<(CudaStorage, Option<CudaStorage>)> {
        let Some(&(first, _)) = x.first() else { candle_core::bail!("internal: flash without inputs") };
        match first.dtype() {
            DType::F32 => flash_t::<f32>(x, st, d, scale, kernel),
            DType::BF16 => flash_t::<bf16>(x, st, d, scale, kernel),
            DType::F16 => flash_t::<f16>(x, st, d, scale, kernel),
            dt => candle_core::bail!("flash_attention: unsupported dtype {dt:?}"),
        }
    }

    /// Launches the kernels of one flash-attention step: the mma.sync or wmma tensor-core ones
    /// where [`super::flash_mma_enabled`] or [`super::flash_tc_enabled`] (128 threads, 64 rows a
    /// block), else the CUDA-core ones (64 threads, one row each).
    fn flash_t<T: CudaDType + DeviceRepr>(
        x: &[(&CudaStorage, &Layout)],
        st: Option<(&CudaStorage, &Layout)>,
        d: super::AttnDims,
        scale: f32,
        kernel: FlashKernel,
    ) -> Result<(CudaStorage, Option<CudaStorage>)> {
        let dev = x[0].0.device();
        let super::AttnDims { bh, t, s, hd } = d;
        if ![16, 32, 64, 128].contains(&hd) {
            candle_core::bail!("flash_attention: head size {hd} is not one of 16, 32, 64, 128 on CUDA");
        }
        if bh > 65535 || bh * s.max(t) * hd >= i32::MAX as usize {
            candle_core::bail!("flash_attention: {bh} heads x {s} positions is more than one launch handles");
        }
        let dtype = x[0].0.dtype();
        let family = match kernel {
            FlashKernel::Lse => "flash",
            _ if super::flash_mma_enabled(dtype, hd) => "flash_mma",
            _ if super::flash_tc_enabled(dtype, hd) => "flash_tc",
            _ => "flash",
        };
        let tc = family != "flash";
        let sfx = suffix(dtype)?;
        let func =
            |which: &str| dev.get_or_load_custom_func(&format!("{family}_{which}_{sfx}_{hd}"), FLASH_MODULE, FLASH_PTX);
        let names: &[&str] = match kernel {
            FlashKernel::Fwd => &["q", "k", "v"],
            FlashKernel::Lse => &["q", "k"],
            FlashKernel::Dq | FlashKernel::Dkv => &["q", "dO", "k", "v"],
        };
        if x.len() != names.len() {
            candle_core::bail!("internal: flash kernel given {} inputs for {names:?}", x.len());
        }
        let views = x
            .iter()
            .zip(names)
            .map(|((s, l), name)| Ok(s.as_cuda_slice::<T>()?.slice(check(l, name)?..)))
            .collect::<Result<Vec<_>>>()?;
        let rows = if kernel == FlashKernel::Dkv { s } else { t };
        let cfg = cfg(crate::launch::flash(rows, bh, tc));
        let (ti, si) = (t as i32, s as i32);
        let stats = || -> Result<_> {
            let (c, l) =
                st.ok_or_else(|| candle_core::Error::Msg("internal: flash gradients without statistics".into()))?;
            Ok(c.as_cuda_slice::<f32>()?.slice(check(l, "stats")?..))
        };
        // The inputs in order, then the kernel's own arguments.
        macro_rules! launch {
            ($which:expr; $($a:expr),*) => {{
                let f = func($which)?;
                let mut b = f.builder();
                for v in &views {
                    b.arg(v);
                }
                $( b.arg($a); )*
                unsafe { b.launch(cfg) }.w()?;
            }};
        }
        match kernel {
            FlashKernel::Fwd => {
                let o = unsafe { dev.alloc::<T>(bh * t * hd)? };
                let lse = unsafe { dev.alloc::<f32>(bh * t)? };
                launch!("fwd"; &o, &lse, &ti, &si, &scale);
                Ok((T::wrap_cuda_slice(o, dev.clone()), Some(wrap_f32(lse, dev))))
            }
            FlashKernel::Lse => {
                let lse = unsafe { dev.alloc::<f32>(bh * t)? };
                launch!("lse"; &lse, &ti, &si, &scale);
                Ok((wrap_f32(lse, dev), None))
            }
            FlashKernel::Dq => {
                let st = stats()?;
                let out = unsafe { dev.alloc::<T>(bh * t * hd)? };
                launch!("dq"; &st, &out, &ti, &si, &scale);
                Ok((T::wrap_cuda_slice(out, dev.clone()), None))
            }
            FlashKernel::Dkv => {
                let st = stats()?;
                let n = bh * s * hd;
                let mut out = unsafe { dev.alloc::<T>(2 * n)? };
                {
                    let (mut dk, mut dv) = out.split_at_mut(n);
                    if tc {
                        launch!("dkv"; &st, &mut dk, &mut dv, &ti, &si, &scale);
                    } else {
                        for (which, dst) in [("dk", &mut dk), ("dv", &mut dv)] {
                            launch!(which; &st, dst, &ti, &si, &scale);
                        }
                    }
                }
                Ok((T::wrap_cuda_slice(out, dev.clone()), None))
            }
        }
    }

    /// SwiGLU forward (`dy` None: (g, u) → y) or backward (`dy` Some: → (dg, du) as (2, N)).
    pub fn swiglu(
        g: &CudaStorage,
        lg: &Layout,
        u: &CudaStorage,
        lu: &Layout,
        dy: Option<(&CudaStorage, &Layout)>,
    ) -> Result<(CudaStorage, Shape)> {
        match g.dtype() {
            DType::F32 => swiglu_t::<f32>(g, lg, u, lu, dy),
            DType::BF16 => swiglu_t::<bf16>(g, lg, u, lu, dy),
            DType::F16 => swiglu_t::<f16>(g, lg, u, lu, dy),
            d => candle_core::bail!("swiglu: unsupported dtype {d:?}"),
        }
    }

    fn swiglu_t<T: CudaDType + DeviceRepr>(
        g: &CudaStorage,
        lg: &Layout,
        u: &CudaStorage,
        lu: &Layout,
        dy: Option<(&CudaStorage, &Layout)>,
    ) -> Result<(CudaStorage, Shape)> {
        let dev = g.device();
        let n = lg.shape().elem_count();
        if 2 * n >= i32::MAX as usize {
            candle_core::bail!("swiglu: {n} elements is more than one launch handles");
        }
        let sfx = suffix(g.dtype())?;
        let gs = g.as_cuda_slice::<T>()?.slice(check(lg, "gate")?..);
        let us = u.as_cuda_slice::<T>()?.slice(check(lu, "up")?..);
        let ni = n as i32;
        let cfg = elems_cfg(n);
        match dy {
            None => {
                let out = unsafe { dev.alloc::<T>(n)? };
                let f = dev.get_or_load_custom_func(&format!("swiglu_fwd_{sfx}"), MODULE, PTX)?;
                let mut b = f.builder();
                b.arg(&gs);
                b.arg(&us);
                b.arg(&out);
                b.arg(&ni);
                unsafe { b.launch(cfg) }.w()?;
                Ok((T::wrap_cuda_slice(out, dev.clone()), lg.shape().clone()))
            }
            Some((d, ld)) => {
                let ds = d.as_cuda_slice::<T>()?.slice(check(ld, "dy")?..);
                let out = unsafe { dev.alloc::<T>(2 * n)? };
                let f = dev.get_or_load_custom_func(&format!("swiglu_bwd_{sfx}"), MODULE, PTX)?;
                let mut b = f.builder();
                b.arg(&gs);
                b.arg(&us);
                b.arg(&ds);
                b.arg(&out);
                b.arg(&ni);
                unsafe { b.launch(cfg) }.w()?;
                Ok((T::wrap_cuda_slice(out, dev.clone()), Shape::from((2, n))))
            }
        }
    }

    /// [`super::swiglu_packed`] (`dy` None) or its backward.
    pub fn swiglu_packed(
        gu: &CudaStorage,
        lg: &Layout,
        dy: Option<(&CudaStorage, &Layout)>,
    ) -> Result<(CudaStorage, Shape)> {
        match gu.dtype() {
            DType::F32 => swiglu_packed_t::<f32>(gu, lg, dy),
            DType::BF16 => swiglu_packed_t::<bf16>(gu, lg, dy),
            DType::F16 => swiglu_packed_t::<f16>(gu, lg, dy),
            d => candle_core::bail!("swiglu_packed: unsupported dtype {d:?}"),
        }
    }

    fn swiglu_packed_t<T: CudaDType + DeviceRepr>(
        gu: &CudaStorage,
        lg: &Layout,
        dy: Option<(&CudaStorage, &Layout)>,
    ) -> Result<(CudaStorage, Shape)> {
        let dev = gu.device();
        let (rows, f2) = lg.shape().dims2()?;
        let f = f2 / 2;
        let n = rows * f;
        if f >= i32::MAX as usize || n >= u32::MAX as usize {
            candle_core::bail!("swiglu_packed: {rows}x{f2} is more than one launch handles");
        }
        let sfx = suffix(gu.dtype())?;
        let gs = gu.as_cuda_slice::<T>()?.slice(check(lg, "gu")?..);
        let (nl, fi) = (n as i64, f as i32);
        let cfg = elems_cfg(n);
        let (name, len) = if dy.is_some() { ("swiglu_packed_bwd", 2 * n) } else { ("swiglu_packed_fwd", n) };
        let out = unsafe { dev.alloc::<T>(len)? };
        let f = dev.get_or_load_custom_func(&format!("{name}_{sfx}"), MODULE, PTX)?;
        let ds = dy
            .map(|(d, ld)| Ok::<_, candle_core::Error>(d.as_cuda_slice::<T>()?.slice(check(ld, "dy")?..)))
            .transpose()?;
        let mut b = f.builder();
        b.arg(&gs);
        if let Some(ds) = &ds {
            b.arg(ds);
        }
        b.arg(&out);
        b.arg(&nl);
        b.arg(&fi);
        unsafe { b.launch(cfg) }.w()?;
        let shape = if ds.is_some() { Shape::from((rows, f2)) } else { Shape::from((rows, f2 / 2)) };
        Ok((T::wrap_cuda_slice(out, dev.clone()), shape))
    }

    /// [`super::heads_from_rows`] (`op.to_heads`: `inputs[0]` are the rows) or
    /// [`super::rows_from_heads`] (`inputs` = q, k, v).
    pub fn heads(op: &super::HeadsOp, inputs: [(&CudaStorage, &Layout); 3]) -> Result<CudaStorage> {
        match inputs[0].0.dtype() {
            DType::F32 => heads_t::<f32>(op, inputs),
            DType::BF16 => heads_t::<bf16>(op, inputs),
            DType::F16 => heads_t::<f16>(op, inputs),
            d => candle_core::bail!("heads: unsupported dtype {d:?}"),
        }
    }

    fn heads_t<T: CudaDType + DeviceRepr>(
        op: &super::HeadsOp,
        inputs: [(&CudaStorage, &Layout); 3],
    ) -> Result<CudaStorage> {
        let l = op.layout;
        let dev = inputs[0].0.device().clone();
        let n = op.out_len();
        let dims = [l.batch, l.seq, l.heads, l.kv_heads, l.head_dim];
        if n >= i32::MAX as usize || dims.iter().any(|&d| d >= i32::MAX as usize) {
            candle_core::bail!("heads: {n} elements is more than one launch handles");
        }
        let [b, t, h, kv, hd] = dims.map(|d| d as i32);
        let rope = op.tables.is_some() as i32;
        let out = unsafe { dev.alloc::<T>(n)? };
        // The tables (or, without rotation, the first input standing in for them: never read).
        let guards = op.tables.as_ref().map(|(c, s)| (c.storage_and_layout(), s.storage_and_layout()));
        let table = |i: usize| -> Result<Option<candle_core::cuda_backend::cudarc::driver::CudaView<'_, f32>>> {
            match &guards {
                Some(g) => {
                    let (st, lay) = if i == 0 { (&g.0 .0, g.0 .1) } else { (&g.1 .0, g.1 .1) };
                    match &**st {
                        candle_core::Storage::Cuda(cs) => {
                            Ok(Some(cs.as_cuda_slice::<f32>()?.slice(check(lay, "rope table")?..)))
                        }
                        _ => candle_core::bail!("heads: the rope tables must be on the gpu like the heads"),
                    }
                }
                None => Ok(None),
            }
        };
        let (c, sn) = (table(0)?, table(1)?);
        let xs: Vec<_> = inputs
            .iter()
            .map(|(s, lay)| Ok(s.as_cuda_slice::<T>()?.slice(check(lay, "heads")?..)))
            .collect::<Result<_>>()?;
        let cfg = cfg(crate::launch::heads(l.batch * l.seq, l.cols()));
        let name = format!(
            "{}_{}",
            if op.to_heads { "heads_from_rows" } else { "rows_from_heads" },
            suffix(inputs[0].0.dtype())?
        );
        let f = dev.get_or_load_custom_func(&name, MODULE, PTX)?;
        let mut bld = f.builder();
        bld.arg(&xs[0]);
        if !op.to_heads {
            bld.arg(&xs[1]);
            bld.arg(&xs[2]);
        }
        // Without tables (rope 0) the kernel never reads them: a null pointer stands in.
        let null = 0u64;
        match (&c, &sn) {
            (Some(c), Some(sn)) => {
                bld.arg(c);
                bld.arg(sn);
            }
            _ => {
                bld.arg(&null);
                bld.arg(&null);
            }
        }
        bld.arg(&out);
        for a in [&b, &t, &h, &kv, &hd, &rope] {
            bld.arg(a);
        }
        unsafe { bld.launch(cfg) }.w()?;
        Ok(T::wrap_cuda_slice(out, dev))
    }

    /// [`super::add_rms_norm`]: (a, b, w) → [a + b | rms_norm(a + b, w)], warp per row.
    #[allow(clippy::too_many_arguments)]
    pub fn add_rms_fwd(
        a: &CudaStorage,
        la: &Layout,
        b: &CudaStorage,
        lb: &Layout,
        w: &CudaStorage,
        lw: &Layout,
        eps: f32,
    ) -> Result<(CudaStorage, Shape)> {
        let (n, d) = la.shape().dims2()?;
        if 2 * n * d >= i32::MAX as usize {
            candle_core::bail!("add_rms_norm: {n} rows of {d} is more than one launch handles");
        }
        let (oa, ob, ow) = (check(la, "a")?, check(lb, "b")?, check(lw, "weight")?);
        let dev = a.device();
        let (di, ni) = (d as i32, n as i32);
        macro_rules! go {
            ($ty:ty, $s:literal, $variant:ident) => {{
                let (av, bv) = (a.as_cuda_slice::<$ty>()?.slice(oa..), b.as_cuda_slice::<$ty>()?.slice(ob..));
                let wv = w.as_cuda_slice::<$ty>()?.slice(ow..);
                let mut out = unsafe { dev.alloc::<$ty>(2 * n * d)? };
                let (mut sum, mut normed) = out.split_at_mut(n * d);
                let f = dev.get_or_load_custom_func(concat!("add_rms_fwd_w_", $s), MODULE, PTX)?;
                let mut bl = f.builder();
                bl.arg(&av);
                bl.arg(&bv);
                bl.arg(&wv);
                bl.arg(&mut sum);
                bl.arg(&mut normed);
                bl.arg(&di);
                bl.arg(&eps);
                bl.arg(&ni);
                unsafe { bl.launch(warp_rows_cfg(n)) }.w()?;
                drop(bl);
                CudaStorage { slice: CudaStorageSlice::$variant(out), device: dev.clone() }
            }};
        }
        let s = match (a.dtype(), b.dtype(), w.dtype()) {
            (DType::F32, DType::F32, DType::F32) => go!(f32, "f32", F32),
            (DType::BF16, DType::BF16, DType::BF16) => go!(bf16, "bf16", BF16),
            (DType::F16, DType::F16, DType::F16) => go!(f16, "f16", F16),
            _ => candle_core::bail!("add_rms_norm: a, b and weight must share a float dtype"),
        };
        Ok((s, Shape::from(2 * n * d)))
    }

    /// RMSNorm forward.
    pub fn rms_fwd(
        x: &CudaStorage,
        lx: &Layout,
        w: &CudaStorage,
        lw: &Layout,
        eps: f32,
    ) -> Result<(CudaStorage, Shape)> {
        let (n, d) = lx.shape().dims2()?;
        let (ox, ow) = (check(lx, "x")?, check(lw, "weight")?);
        let dev = x.device();
        if n >= i32::MAX as usize {
            candle_core::bail!("rms_norm: {n} rows is more than one launch handles");
        }
        let (di, ni) = (d as i32, n as i32);
        macro_rules! go {
            ($ty:ty, $s:literal, $variant:ident) => {{
                let xs = x.as_cuda_slice::<$ty>()?.slice(ox..);
                let ws = w.as_cuda_slice::<$ty>()?.slice(ow..);
                let out = unsafe { dev.alloc::<$ty>(n * d)? };
                let (name, cfg, warp) = row_kernel("rms_fwd", $s, n, d, 1, 1024);
                let f = dev.get_or_load_custom_func(&name, MODULE, PTX)?;
                let mut b = f.builder();
                b.arg(&xs);
                b.arg(&ws);
                b.arg(&out);
                b.arg(&di);
                b.arg(&eps);
                if warp {
                    b.arg(&ni);
                }
                unsafe { b.launch(cfg) }.w()?;
                CudaStorage { slice: CudaStorageSlice::$variant(out), device: dev.clone() }
            }};
        }
        let s = match (x.dtype(), w.dtype()) {
            (candle_core::DType::F32, candle_core::DType::F32) => go!(f32, "f32", F32),
            (candle_core::DType::BF16, candle_core::DType::BF16) => go!(bf16, "bf16", BF16),
            (candle_core::DType::F16, candle_core::DType::F16) => go!(f16, "f16", F16),
            _ => candle_core::bail!("rms_norm: x and weight must both be f32, bf16 or f16"),
        };
        Ok((s, lx.shape().clone()))
    }

    /// RMSNorm backward: dx (N·D, plus `residual` where given: the warp-per-row kernel) then dw
    /// (D) in one buffer.
    #[allow(clippy::too_many_arguments)]
    pub fn rms_bwd(
        x: &CudaStorage,
        lx: &Layout,
        w: &CudaStorage,
        lw: &Layout,
        dy: &CudaStorage,
        ly: &Layout,
        residual: Option<&candle_core::Tensor>,
        eps: f32,
    ) -> Result<(CudaStorage, Shape)> {
        let guard = residual.map(|r| r.storage_and_layout());
        let (n, d) = lx.shape().dims2()?;
        let (ox, ow, oy) = (check(lx, "x")?, check(lw, "weight")?, check(ly, "dy")?);
        let dev = x.device();
        let (ni, di) = (n as i32, d as i32);
        macro_rules! go {
            ($ty:ty, $s:literal, $variant:ident) => {{
                let xs = x.as_cuda_slice::<$ty>()?.slice(ox..);
                let ws = w.as_cuda_slice::<$ty>()?.slice(ow..);
                let ys = dy.as_cuda_slice::<$ty>()?.slice(oy..);
                let rs = unsafe { dev.alloc::<f32>(n)? };
                let mut out = unsafe { dev.alloc::<$ty>(n * d + d)? };
                let res = match &guard {
                    Some((st, l)) => match &**st {
                        candle_core::Storage::Cuda(c) => Some(c.as_cuda_slice::<$ty>()?.slice(check(l, "residual")?..)),
                        _ => candle_core::bail!("rms_norm: the residual gradient must be on the gpu like x"),
                    },
                    None => None,
                };
                let (name, cfg, warp) = if res.is_some() {
                    if !super::ROWS_CUDA.get() {
                        candle_core::bail!("rms_norm: a residual gradient needs the warp-per-row kernels");
                    }
                    (concat!("rms_dx_res_w_", $s).to_string(), warp_rows_cfg(n), true)
                } else {
                    row_kernel("rms_dx", $s, n, d, 1, 1024)
                };
                let f = dev.get_or_load_custom_func(&name, MODULE, PTX)?;
                let mut b = f.builder();
                b.arg(&xs);
                b.arg(&ws);
                b.arg(&ys);
                if let Some(r) = &res {
                    b.arg(r);
                }
                b.arg(&out);
                b.arg(&rs);
                b.arg(&di);
                b.arg(&eps);
                if warp {
                    b.arg(&ni);
                }
                unsafe { b.launch(cfg) }.w()?;
                let acc = dev.alloc_zeros::<f32>(d)?;
                let chunks = n.clamp(1, 256);
                let rows_per_chunk = n.div_ceil(chunks) as i32;
                let cfg = LaunchConfig {
                    grid_dim: (d.div_ceil(256) as u32, chunks as u32, 1),
                    block_dim: (256, 1, 1),
                    shared_mem_bytes: 0,
                };
                let f = dev.get_or_load_custom_func(concat!("rms_dw_", $s), MODULE, PTX)?;
                let mut b = f.builder();
                b.arg(&xs);
                b.arg(&ys);
                b.arg(&rs);
                b.arg(&acc);
                b.arg(&ni);
                b.arg(&di);
                b.arg(&rows_per_chunk);
                unsafe { b.launch(cfg) }.w()?;
                {
                    let mut dw = out.slice_mut(n * d..);
                    let f = dev.get_or_load_custom_func(concat!("cast_from_f32_", $s), MODULE, PTX)?;
                    let mut b = f.builder();
                    b.arg(&acc);
                    b.arg(&mut dw);
                    b.arg(&di);
                    unsafe { b.launch(elems_cfg(d)) }.w()?;
                }
                CudaStorage { slice: CudaStorageSlice::$variant(out), device: dev.clone() }
            }};
        }
        let s = match x.dtype() {
            candle_core::DType::F32 => go!(f32, "f32", F32),
            candle_core::DType::BF16 => go!(bf16, "bf16", BF16),
            candle_core::DType::F16 => go!(f16, "f16", F16),
            d => candle_core::bail!("rms_norm: unsupported dtype {d:?}"),
        };
        Ok((s, Shape::from(n * d + d)))
    }
}

/// The backward passes of this module's ops as plain functions, for a hand-written backward pass
/// (see `Llama::forward_tape`): each takes the forward's inputs (and output where the op's
/// backward uses it) and the output gradient, and runs the same kernels as candle's autograd
/// does through the ops' `bwd`. Nothing here records a graph.
pub mod grad {
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
        let (dx, dw) =
            super::rms_norm_backward(&x.reshape((rows, d))?, weight, &dy.reshape((rows, d))?, None, eps as f32)?;
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
        let (n, _) = logits.dims2()?;
        let k = targets.dim(1)?;
        if lse.dims() != [n] || lse.dtype() != candle_core::DType::F32 {
            candle_core::bail!("cross_entropy_multi: lse {:?} {:?} is not f32 ({n},)", lse.dims(), lse.dtype());
        }
        let g = Tensor::full((scale / (n * k) as f64) as f32, n, logits.device())?;
        let gl = Tensor::stack(&[&g, lse], 0)?;
        logits.contiguous()?.apply_op3_no_bwd(&targets.contiguous()?, &gl, &super::MultiTargetCeGrad { lse: true })
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
        let d = dy.dim(candle_core::D::Minus1)?;
        let flat = ids.flatten_all()?.contiguous()?;
        let dy = dy.reshape((flat.elem_count(), d))?.contiguous()?;
        flat.apply_op2_no_bwd(&dy, &super::EmbeddingGrad { vocab })
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

    /// [`super::flash_attention_lse`] backward: from the inputs, the output `o`, the log-sum-exp
    /// per row `lse` (B, H, T) f32 that the forward returned, and `dout` → (dq, dk, dv).
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
}

#[cfg(test)]
mod tests {
    use super::Switch;

    /// The mma.sync flash kernels take precedence over the wmma ones; either applies only to
    /// 16-bit dtypes at head sizes 32 and 64. (The only test in this binary that sets these.)
    #[test]
    fn tensor_core_flash_family_choice() {
        use super::{flash_mma_enabled, flash_tc_enabled, set_flash_mma, set_flash_tc};
        use candle_core::DType::{BF16, F16, F32};
        set_flash_tc(true);
        set_flash_mma(false);
        assert!(flash_tc_enabled(BF16, 64) && !flash_mma_enabled(BF16, 64));
        set_flash_mma(true);
        assert!(!flash_tc_enabled(BF16, 64) && flash_mma_enabled(BF16, 64) && flash_mma_enabled(F16, 32));
        assert!(!flash_mma_enabled(F32, 64) && !flash_mma_enabled(BF16, 128) && !flash_mma_enabled(BF16, 16));
        set_flash_mma(false);
        assert!(flash_tc_enabled(F16, 32) && !flash_tc_enabled(F32, 32));
        set_flash_tc(false);
        assert!(!flash_tc_enabled(BF16, 64) && !flash_mma_enabled(BF16, 64));
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
}
