//! Fused operations with hand-written backward passes, as candle custom ops.
//!
//! [`cross_entropy_multi`]: softmax cross-entropy where each row of logits has K targets (K = 1
//! is ordinary next-token cross-entropy). One pass per row computes the log-sum-exp and the loss
//! without materialising log-probabilities for the whole vocabulary; the backward pass writes
//! `g · (K · softmax − counts)` directly. [`rms_norm`]: RMSNorm forward and backward (input
//! and weight gradients) in one pass per row. Statistics are kept in f32 whatever the dtype.
//! The CPU implementation runs rows in parallel; [`fused_ops_supported`] says where a device has
//! an implementation (callers fall back to composed ops elsewhere).

use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Device, Layout, Shape, Tensor};
use half::{bf16, f16};
use rayon::prelude::*;

static FUSED: AtomicBool = AtomicBool::new(true);

/// Turns the fused ops off (or back on) process-wide, e.g. to benchmark them against the
/// composed ops they replace. On by default.
pub fn set_fused_ops(enabled: bool) {
    FUSED.store(enabled, Ordering::Relaxed);
}

/// Whether the fused ops of this module are on and have an implementation for `device`. The
/// CUDA kernels (built with the `cuda` feature) are opt-in with `PATCHLM_FUSED_CUDA=1` until
/// their device tests (`scripts/gpu_check.sh`) have passed on a GPU.
pub fn fused_ops_supported(device: &Device) -> bool {
    if !FUSED.load(Ordering::Relaxed) {
        return false;
    }
    match device {
        Device::Cpu => true,
        Device::Cuda(_) => cfg!(feature = "cuda") && std::env::var_os("PATCHLM_FUSED_CUDA").is_some_and(|v| v == "1"),
        _ => false,
    }
}

/// Mean over all rows and targets of −log softmax(logits)[target]: `logits` (N, V) in f32, bf16
/// or f16, `targets` (N, K) of u32 ids < V. Returns an f32 scalar; differentiable in `logits`.
pub fn cross_entropy_multi(logits: &Tensor, targets: &Tensor) -> candle_core::Result<Tensor> {
    let (n, _v) = logits.dims2()?;
    let (tn, k) = targets.dims2()?;
    if tn != n || k == 0 {
        candle_core::bail!("cross_entropy_multi: logits {:?} and targets {:?} disagree", logits.dims(), targets.dims());
    }
    if targets.dtype() != DType::U32 {
        candle_core::bail!("cross_entropy_multi: targets must be u32, got {:?}", targets.dtype());
    }
    let rows = logits.contiguous()?.apply_op2(&targets.contiguous()?, MultiTargetCe)?;
    rows.sum_all()? / (n * k) as f64
}

/// Forward: per-row Σ_k (lse − logit[t_k]) in f32, shape (N,).
struct MultiTargetCe;

/// Backward: `grad` (N,) → g_i · (K · softmax_ij − #{k : t_ik = j}), in the logits' dtype.
struct MultiTargetCeGrad;

fn contiguous<'a, T>(s: &'a [T], l: &Layout, what: &str) -> candle_core::Result<&'a [T]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&s[a..b]),
        None => candle_core::bail!("{what}: expected a contiguous tensor"),
    }
}

trait Float: Copy + Send + Sync + 'static {
    fn f(self) -> f32;
    fn from_f(x: f32) -> Self;
}
impl Float for f32 {
    fn f(self) -> f32 {
        self
    }
    fn from_f(x: f32) -> Self {
        x
    }
}
impl Float for bf16 {
    fn f(self) -> f32 {
        self.to_f32()
    }
    fn from_f(x: f32) -> Self {
        bf16::from_f32(x)
    }
}
impl Float for f16 {
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

fn ce_bwd<T: Float>(x: &[T], t: &[u32], g: &[f32], n: usize, v: usize, k: usize) -> Vec<T> {
    let mut out = vec![T::from_f(0.0); n * v];
    out.par_chunks_mut(v).enumerate().for_each(|(i, o)| {
        let row = &x[i * v..(i + 1) * v];
        let (m, lse) = row_stats(row);
        let gi = g[i];
        let scale = gi * k as f32;
        let mut acc: Vec<f32> = row.iter().map(|&xv| scale * (xv.f() - m - lse).exp()).collect();
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
        let rows = match s1 {
            CpuStorage::F32(x) => ce_fwd(contiguous(x, l1, "logits")?, t, n, v, k)?,
            CpuStorage::BF16(x) => ce_fwd(contiguous(x, l1, "logits")?, t, n, v, k)?,
            CpuStorage::F16(x) => ce_fwd(contiguous(x, l1, "logits")?, t, n, v, k)?,
            _ => candle_core::bail!("cross_entropy_multi: logits must be f32, bf16 or f16"),
        };
        Ok((CpuStorage::F32(rows), Shape::from(n)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        cuda::ce_fwd(s1, l1, s2, l2)
    }

    fn bwd(
        &self,
        logits: &Tensor,
        targets: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let g = grad_res.to_dtype(DType::F32)?.contiguous()?;
        let d = logits.apply_op3_no_bwd(targets, &g, &MultiTargetCeGrad)?;
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
        let out = match s1 {
            CpuStorage::F32(x) => CpuStorage::F32(ce_bwd(contiguous(x, l1, "logits")?, t, g, n, v, k)),
            CpuStorage::BF16(x) => CpuStorage::BF16(ce_bwd(contiguous(x, l1, "logits")?, t, g, n, v, k)),
            CpuStorage::F16(x) => CpuStorage::F16(ce_bwd(contiguous(x, l1, "logits")?, t, g, n, v, k)),
            _ => candle_core::bail!("cross_entropy_multi: logits must be f32, bf16 or f16"),
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
        cuda::ce_bwd(s1, l1, s2, l2, s3, l3)
    }
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

/// Backward of [`RmsNormOp`]: (x, w, dy) → dx when `weight_grad` is false, else dw (as (1, D)).
struct RmsNormGrad {
    eps: f32,
    weight_grad: bool,
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

fn rms_dx<T: Float>(x: &[T], w: &[T], dy: &[T], d: usize, eps: f32) -> Vec<T> {
    let mut out = vec![T::from_f(0.0); x.len()];
    out.par_chunks_mut(d).zip(x.par_chunks(d).zip(dy.par_chunks(d))).for_each(|(o, (row, g))| {
        let r = rms_of(row, eps);
        let dot: f32 = row.iter().zip(g).zip(w).map(|((&a, &gy), &wj)| a.f() * gy.f() * wj.f()).sum();
        let c = dot * r * r * r / d as f32;
        for (((o, &a), &gy), &wj) in o.iter_mut().zip(row).zip(g).zip(w) {
            *o = T::from_f(r * wj.f() * gy.f() - c * a.f());
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
        let out = match (s1, s2) {
            (CpuStorage::F32(x), CpuStorage::F32(w)) => {
                CpuStorage::F32(rms_fwd(contiguous(x, l1, "x")?, contiguous(w, l2, "w")?, d, self.eps))
            }
            (CpuStorage::BF16(x), CpuStorage::BF16(w)) => {
                CpuStorage::BF16(rms_fwd(contiguous(x, l1, "x")?, contiguous(w, l2, "w")?, d, self.eps))
            }
            (CpuStorage::F16(x), CpuStorage::F16(w)) => {
                CpuStorage::F16(rms_fwd(contiguous(x, l1, "x")?, contiguous(w, l2, "w")?, d, self.eps))
            }
            _ => candle_core::bail!("rms_norm: x and weight must both be f32, bf16 or f16"),
        };
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
        let dy = dy.contiguous()?;
        let dx = x.apply_op3_no_bwd(w, &dy, &RmsNormGrad { eps: self.eps, weight_grad: false })?;
        let dw = x.apply_op3_no_bwd(w, &dy, &RmsNormGrad { eps: self.eps, weight_grad: true })?.squeeze(0)?;
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
        macro_rules! go {
            ($v:ident, $x:expr, $w:expr, $g:expr) => {{
                let (x, w, g) = (contiguous($x, l1, "x")?, contiguous($w, l2, "w")?, contiguous($g, l3, "dy")?);
                if self.weight_grad {
                    CpuStorage::$v(rms_dw(x, g, d, self.eps))
                } else {
                    CpuStorage::$v(rms_dx(x, w, g, d, self.eps))
                }
            }};
        }
        let out = match (s1, s2, s3) {
            (CpuStorage::F32(x), CpuStorage::F32(w), CpuStorage::F32(g)) => go!(F32, x, w, g),
            (CpuStorage::BF16(x), CpuStorage::BF16(w), CpuStorage::BF16(g)) => go!(BF16, x, w, g),
            (CpuStorage::F16(x), CpuStorage::F16(w), CpuStorage::F16(g)) => go!(F16, x, w, g),
            _ => candle_core::bail!("rms_norm: x, weight and gradient must share a float dtype"),
        };
        let shape = if self.weight_grad { Shape::from((1, d)) } else { l1.shape().clone() };
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
        cuda::rms_bwd(s1, l1, s2, l2, s3, l3, self.eps, self.weight_grad)
    }
}

/// CUDA twins of the CPU kernels above (kernels/fused.cu, compiled to PTX by build.rs).
#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::{CudaStorageSlice, WrapErr};
    use candle_core::{CudaDevice, CudaStorage, Layout, Result, Shape};
    use half::{bf16, f16};

    /// The PTX of kernels/fused.cu.
    pub const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/fused.ptx"));
    const MODULE: &str = "patchlm_fused";

    fn rows_cfg(rows: usize, threads: u32) -> LaunchConfig {
        LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (threads, 1, 1), shared_mem_bytes: 0 }
    }

    fn threads_for(n: usize) -> u32 {
        (n.div_ceil(32) * 32).clamp(32, 1024) as u32
    }

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
    pub fn ce_fwd(x: &CudaStorage, lx: &Layout, t: &CudaStorage, lt: &Layout) -> Result<(CudaStorage, Shape)> {
        let (n, v) = lx.shape().dims2()?;
        let (_, k) = lt.shape().dims2()?;
        let (ox, ot) = (check(lx, "logits")?, check(lt, "targets")?);
        let dev = x.device();
        let tv = t.as_cuda_slice::<u32>()?.slice(ot..);
        let out = unsafe { dev.alloc::<f32>(n)? };
        let (vi, ki) = (v as i32, k as i32);
        macro_rules! go {
            ($ty:ty, $name:literal) => {{
                let xs = x.as_cuda_slice::<$ty>()?.slice(ox..);
                let f = dev.get_or_load_custom_func($name, MODULE, PTX)?;
                let mut b = f.builder();
                b.arg(&xs);
                b.arg(&tv);
                b.arg(&out);
                b.arg(&vi);
                b.arg(&ki);
                unsafe { b.launch(rows_cfg(n, threads_for(v).min(512))) }.w()?;
            }};
        }
        match x.dtype() {
            candle_core::DType::F32 => go!(f32, "ce_fwd_f32"),
            candle_core::DType::BF16 => go!(bf16, "ce_fwd_bf16"),
            candle_core::DType::F16 => go!(f16, "ce_fwd_f16"),
            d => candle_core::bail!("cross_entropy_multi: logits must be f32, bf16 or f16, got {d:?}"),
        }
        Ok((wrap_f32(out, dev), Shape::from(n)))
    }

    /// Multi-target cross-entropy backward: logits gradient in the logits' dtype.
    pub fn ce_bwd(
        x: &CudaStorage,
        lx: &Layout,
        t: &CudaStorage,
        lt: &Layout,
        g: &CudaStorage,
        lg: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let (n, v) = lx.shape().dims2()?;
        let (_, k) = lt.shape().dims2()?;
        let (ox, ot, og) = (check(lx, "logits")?, check(lt, "targets")?, check(lg, "grad")?);
        let dev = x.device();
        let tv = t.as_cuda_slice::<u32>()?.slice(ot..);
        let gv = g.as_cuda_slice::<f32>()?.slice(og..);
        let (vi, ki) = (v as i32, k as i32);
        macro_rules! go {
            ($ty:ty, $name:literal, $variant:ident) => {{
                let xs = x.as_cuda_slice::<$ty>()?.slice(ox..);
                let out = unsafe { dev.alloc::<$ty>(n * v)? };
                let f = dev.get_or_load_custom_func($name, MODULE, PTX)?;
                let mut b = f.builder();
                b.arg(&xs);
                b.arg(&tv);
                b.arg(&gv);
                b.arg(&out);
                b.arg(&vi);
                b.arg(&ki);
                unsafe { b.launch(rows_cfg(n, threads_for(v).min(512))) }.w()?;
                CudaStorage { slice: CudaStorageSlice::$variant(out), device: dev.clone() }
            }};
        }
        let s = match x.dtype() {
            candle_core::DType::F32 => go!(f32, "ce_bwd_f32", F32),
            candle_core::DType::BF16 => go!(bf16, "ce_bwd_bf16", BF16),
            candle_core::DType::F16 => go!(f16, "ce_bwd_f16", F16),
            d => candle_core::bail!("cross_entropy_multi: logits must be f32, bf16 or f16, got {d:?}"),
        };
        Ok((s, Shape::from((n, v))))
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
        let di = d as i32;
        macro_rules! go {
            ($ty:ty, $name:literal, $variant:ident) => {{
                let xs = x.as_cuda_slice::<$ty>()?.slice(ox..);
                let ws = w.as_cuda_slice::<$ty>()?.slice(ow..);
                let out = unsafe { dev.alloc::<$ty>(n * d)? };
                let f = dev.get_or_load_custom_func($name, MODULE, PTX)?;
                let mut b = f.builder();
                b.arg(&xs);
                b.arg(&ws);
                b.arg(&out);
                b.arg(&di);
                b.arg(&eps);
                unsafe { b.launch(rows_cfg(n, threads_for(d).min(1024))) }.w()?;
                CudaStorage { slice: CudaStorageSlice::$variant(out), device: dev.clone() }
            }};
        }
        let s = match (x.dtype(), w.dtype()) {
            (candle_core::DType::F32, candle_core::DType::F32) => go!(f32, "rms_fwd_f32", F32),
            (candle_core::DType::BF16, candle_core::DType::BF16) => go!(bf16, "rms_fwd_bf16", BF16),
            (candle_core::DType::F16, candle_core::DType::F16) => go!(f16, "rms_fwd_f16", F16),
            _ => candle_core::bail!("rms_norm: x and weight must both be f32, bf16 or f16"),
        };
        Ok((s, lx.shape().clone()))
    }

    /// RMSNorm backward: dx (`weight_grad` false) or dw as (1, D).
    #[allow(clippy::too_many_arguments)]
    pub fn rms_bwd(
        x: &CudaStorage,
        lx: &Layout,
        w: &CudaStorage,
        lw: &Layout,
        dy: &CudaStorage,
        ly: &Layout,
        eps: f32,
        weight_grad: bool,
    ) -> Result<(CudaStorage, Shape)> {
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
                let dx = unsafe { dev.alloc::<$ty>(n * d)? };
                let f = dev.get_or_load_custom_func(concat!("rms_dx_", $s), MODULE, PTX)?;
                let mut b = f.builder();
                b.arg(&xs);
                b.arg(&ws);
                b.arg(&ys);
                b.arg(&dx);
                b.arg(&rs);
                b.arg(&di);
                b.arg(&eps);
                unsafe { b.launch(rows_cfg(n, threads_for(d).min(1024))) }.w()?;
                if !weight_grad {
                    CudaStorage { slice: CudaStorageSlice::$variant(dx), device: dev.clone() }
                } else {
                    drop(dx);
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
                    let out = unsafe { dev.alloc::<$ty>(d)? };
                    let f = dev.get_or_load_custom_func(concat!("cast_from_f32_", $s), MODULE, PTX)?;
                    let mut b = f.builder();
                    b.arg(&acc);
                    b.arg(&out);
                    b.arg(&di);
                    unsafe { b.launch(LaunchConfig::for_num_elems(d as u32)) }.w()?;
                    CudaStorage { slice: CudaStorageSlice::$variant(out), device: dev.clone() }
                }
            }};
        }
        let s = match x.dtype() {
            candle_core::DType::F32 => go!(f32, "f32", F32),
            candle_core::DType::BF16 => go!(bf16, "bf16", BF16),
            candle_core::DType::F16 => go!(f16, "f16", F16),
            d => candle_core::bail!("rms_norm: unsupported dtype {d:?}"),
        };
        let shape = if weight_grad { Shape::from((1, d)) } else { lx.shape().clone() };
        Ok((s, shape))
    }
}
