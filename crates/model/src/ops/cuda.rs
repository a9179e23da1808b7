//! The CUDA side of the ops: launchers of kernels/fused.cu, kernels/flash.cu and
//! kernels/hopper.cu (PTX compiled by build.rs), twins of the CPU implementations in the sibling
//! modules.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    CudaFunction, CudaSlice, DevicePtr, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{CudaDType, CudaStorageSlice, WrapErr};
use candle_core::{CudaDevice, CudaStorage, DType, Layout, Result, Shape};
use half::{bf16, f16};

/// `by_dtype!(dtype, "op", f(args…))`: `f::<T>(args…)` with `T` the Rust type of the float
/// `dtype` (f32, bf16 or f16); any other dtype is an error naming the op.
macro_rules! by_dtype {
    ($dt:expr, $op:literal, $f:ident($($a:expr),* $(,)?)) => {
        match $dt {
            DType::F32 => $f::<f32>($($a),*),
            DType::BF16 => $f::<bf16>($($a),*),
            DType::F16 => $f::<f16>($($a),*),
            d => candle_core::bail!("{}: unsupported dtype {d:?}", $op),
        }
    };
}

/// `args!(builder, a, b, …)`: pushes kernel arguments in order, `builder.arg(a); builder.arg(b); …`.
macro_rules! args {
    ($b:ident, $($a:expr),+ $(,)?) => {
        $( $b.arg($a); )+
    };
}

/// The PTX of kernels/fused.cu.
pub const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/fused.ptx"));
const MODULE: &str = "patchlm_fused";

/// cudarc's form of a [`crate::launch`] geometry.
fn cfg(l: crate::launch::Launch) -> LaunchConfig {
    LaunchConfig { grid_dim: l.grid, block_dim: l.block, shared_mem_bytes: 0 }
}

/// The warp-per-row kernels' launch ([`super::set_rows_cuda`]).
fn warp_rows_cfg(rows: usize) -> LaunchConfig {
    cfg(crate::launch::warp_rows(rows))
}

/// An element-wise kernel over `n` items.
fn elems_cfg(n: usize) -> LaunchConfig {
    cfg(crate::launch::elems(n))
}

/// Kernel `name` and its launch for `rows` rows: the warp-per-row variant (`name_w`, which
/// takes the row count as its last argument) when turned on, else one block per row as `block`.
fn row_kernel(name: &str, sfx: &str, rows: usize, block: crate::launch::Launch) -> (String, LaunchConfig, bool) {
    if super::ROWS_CUDA.get() {
        (format!("{name}_w_{sfx}"), warp_rows_cfg(rows), true)
    } else {
        (format!("{name}_{sfx}"), cfg(block), false)
    }
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
/// (`lse` false) per-row losses (N,); (`lse` true, `ce_fwd_lse_*`) per-row losses then
/// log-sum-exps (2, N).
pub fn ce_fwd(x: &CudaStorage, lx: &Layout, t: &CudaStorage, lt: &Layout, lse: bool) -> Result<(CudaStorage, Shape)> {
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
            args!(b, &xs, &tv, &out, &vi, &ki);
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
            args!(b, &xs, &tv, &gv, &out, &vi, &ki);
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
    by_dtype!(x.dtype(), "causal_softmax", causal_softmax_t(x, lx, grad, t, s, scale))
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
    let (name, cfg, warp) = row_kernel(kernel, sfx, rows, crate::launch::softmax_rows(rows, s));
    let f = dev.get_or_load_custom_func(&name, MODULE, PTX)?;
    let mut b = f.builder();
    b.arg(&xs);
    let gs = grad
        .map(|(g, lg)| Ok::<_, candle_core::Error>(g.as_cuda_slice::<T>()?.slice(check(lg, "dy")?..)))
        .transpose()?;
    if let Some(gs) = &gs {
        b.arg(gs);
    }
    args!(b, &out, &ti, &si, &scale);
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
    by_dtype!(x.dtype(), "rope", rope_t(x, lx, c, lc, sn, ls, sign))
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
    args!(b, &xs, &cs, &ss, &out, &ti, &hi, &ni, &sign);
    unsafe { b.launch(elems_cfg(n)) }.w()?;
    Ok((T::wrap_cuda_slice(out, dev.clone()), lx.shape().clone()))
}

/// Embedding gather (`vocab` None: `a` is the (V, D) weight → (N, D), each row the mean of a bag
/// of `k` ids) or its backward (`vocab` Some(V): `a` is dy (N, D) → dW (V, D), each of a bag's
/// ids receiving 1/k of its row, summed with f32 atomics). `ids` holds N·k ids.
pub fn embedding(
    a: &CudaStorage,
    la: &Layout,
    ids: &CudaStorage,
    li: &Layout,
    vocab: Option<usize>,
    k: usize,
) -> Result<(CudaStorage, Shape)> {
    let dev = a.device();
    let (rows, d) = la.shape().dims2()?;
    let n = li.shape().elem_count() / k;
    let total = n * d;
    if li.shape().elem_count() >= i32::MAX as usize
        || total >= i32::MAX as usize
        || (vocab.unwrap_or(rows) + 1) * d >= i32::MAX as usize
    {
        candle_core::bail!("embedding: {n} x {d} is more than one launch handles");
    }
    let sfx = suffix(a.dtype())?;
    let is = ids.as_cuda_slice::<u32>()?.slice(check(li, "ids")?..);
    let (ni, di, ki) = (total as i32, d as i32, k as i32);
    let cfg = elems_cfg(total);
    match vocab {
        None => {
            let vi = rows as i32;
            // Four columns a thread where rows are whole groups of four (the bag's loads in flight
            // together).
            let (name, cfg) =
                if d % 4 == 0 { ("embedding_fwd4", elems_cfg(total / 4)) } else { ("embedding_fwd", cfg) };
            by_dtype!(a.dtype(), "embedding", gather_t(a, la, &is, ni, di, vi, ki, n * d, cfg, name, sfx))
                .map(|s| (s, Shape::from((n, d))))
        }
        Some(v) if super::embedding_sorted_enabled() => {
            let vi = v as i32;
            let m = li.shape().elem_count();
            let mi = m as i32;
            // The ids grouped by value (count, prefix sum, place), then each row summed once.
            let cnt = dev.alloc_zeros::<i32>(v + 1)?;
            let fill = dev.alloc_zeros::<i32>(v)?;
            let order = unsafe { dev.alloc::<i32>(m.max(1))? };
            let f = dev.get_or_load_custom_func("embedding_count", MODULE, PTX)?;
            let mut b = f.builder();
            args!(b, &is, &mi, &vi, &cnt);
            unsafe { b.launch(elems_cfg(m)) }.w()?;
            let f = dev.get_or_load_custom_func("embedding_scan", MODULE, PTX)?;
            let n1 = vi + 1;
            let mut b = f.builder();
            args!(b, &cnt, &n1);
            unsafe { b.launch(self::cfg(crate::launch::scan())) }.w()?;
            let f = dev.get_or_load_custom_func("embedding_place", MODULE, PTX)?;
            let mut b = f.builder();
            args!(b, &is, &mi, &vi, &cnt, &fill, &order);
            unsafe { b.launch(elems_cfg(m)) }.w()?;
            let off = check(la, "dy")? as i32;
            by_dtype!(a.dtype(), "embedding", embedding_sum_t(a, off, &cnt, &order, v, d, k, sfx))
                .map(|s| (s, Shape::from((v, d))))
        }
        Some(v) => {
            let acc = dev.alloc_zeros::<f32>(v * d)?;
            let vi = v as i32;
            // Four columns a thread (one 16-byte atomic on sm_90) where rows are whole groups of four.
            let (name, cfg) =
                if d % 4 == 0 { ("embedding_bwd4", elems_cfg(total / 4)) } else { ("embedding_bwd", cfg) };
            let f = dev.get_or_load_custom_func(&format!("{name}_{sfx}"), MODULE, PTX)?;
            let mut b = f.builder();
            match a.dtype() {
                DType::F32 => b.arg(a.as_cuda_slice::<f32>()?),
                DType::BF16 => b.arg(a.as_cuda_slice::<bf16>()?),
                DType::F16 => b.arg(a.as_cuda_slice::<f16>()?),
                d => candle_core::bail!("embedding: unsupported dtype {d:?}"),
            };
            let off = check(la, "dy")? as i32;
            args!(b, &off, &is, &acc, &ni, &di, &vi, &ki);
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

/// The sorted embedding backward's last kernel: each of the `v` rows of width `d` summed from its
/// run of `order` (runs start at `start`) over the rows of `dy` (from element `off`), bags of `k`.
#[allow(clippy::too_many_arguments)]
fn embedding_sum_t<T: CudaDType + DeviceRepr>(
    dy: &CudaStorage,
    off: i32,
    start: &CudaSlice<i32>,
    order: &CudaSlice<i32>,
    v: usize,
    d: usize,
    k: usize,
    sfx: &str,
) -> Result<CudaStorage> {
    let dev = dy.device();
    let n = v * d;
    let (name, cfg) =
        if d.is_multiple_of(4) { ("embedding_sum4", elems_cfg(n / 4)) } else { ("embedding_sum", elems_cfg(n)) };
    let f = dev.get_or_load_custom_func(&format!("{name}_{sfx}"), MODULE, PTX)?;
    let out = unsafe { dev.alloc::<T>(n)? };
    let (ni, di, ki) = (n as i32, d as i32, k as i32);
    let mut b = f.builder();
    args!(b, dy.as_cuda_slice::<T>()?, &off, start, order, &out, &ni, &di, &ki);
    unsafe { b.launch(cfg) }.w()?;
    Ok(T::wrap_cuda_slice(out, dev.clone()))
}

#[allow(clippy::too_many_arguments)]
fn gather_t<T: CudaDType + DeviceRepr>(
    w: &CudaStorage,
    lw: &Layout,
    ids: &candle_core::cuda_backend::cudarc::driver::CudaView<u32>,
    n: i32,
    d: i32,
    v: i32,
    k: i32,
    len: usize,
    cfg: LaunchConfig,
    name: &str,
    sfx: &str,
) -> Result<CudaStorage> {
    let dev = w.device();
    let ws = w.as_cuda_slice::<T>()?.slice(check(lw, "weight")?..);
    let out = unsafe { dev.alloc::<T>(len)? };
    let f = dev.get_or_load_custom_func(&format!("{name}_{sfx}"), MODULE, PTX)?;
    let mut b = f.builder();
    args!(b, &ws, ids, &out, &n, &d, &v, &k);
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
    args!(b, acc, &out, &ni);
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
    args!(b, &ps, &gs, &ms, &out, &ni);
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
    args!(b, &tab, &nt, &chunk);
    let k = step.kernel_args();
    for x in k.iter().chain([&gs]) {
        b.arg(x);
    }
    let (sumsq, max_norm) = match clip {
        Some((t, m)) => (f64_scalar_addr(t)?, m),
        None => (0u64, 0.0f64),
    };
    args!(b, &sumsq, &max_norm);
    unsafe { b.launch(cfg(crate::launch::multi(blocks))) }.w()?;
    drop(grads);
    Ok(())
}

/// A CUDA-only custom op without a backward pass: `launch` makes its output on the device of
/// the op's input (which it does not read otherwise), e.g. a multi-tensor kernel whose real
/// inputs are addresses in a table.
struct DeviceLaunch<F> {
    name: &'static str,
    launch: F,
}

impl<F: Fn(&CudaDevice) -> Result<(CudaStorage, Shape)> + Send + Sync> candle_core::CustomOp1 for DeviceLaunch<F> {
    fn name(&self) -> &'static str {
        self.name
    }

    fn cpu_fwd(&self, _: &candle_core::CpuStorage, _: &Layout) -> Result<(candle_core::CpuStorage, Shape)> {
        candle_core::bail!("{} runs on CUDA only", self.name)
    }

    fn cuda_fwd(&self, s: &CudaStorage, _: &Layout) -> Result<(CudaStorage, Shape)> {
        (self.launch)(s.device())
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
    let launch = |dev: &CudaDevice| {
        let tab = dev.cuda_stream().clone_htod(&table).w()?;
        let out = unsafe { dev.alloc::<f32>(blocks)? };
        let (nt, chunk) = (ts.len() as i32, crate::launch::MULTI_CHUNK as i32);
        let f = dev.get_or_load_custom_func("multi_sumsq_f32", MODULE, PTX)?;
        let mut b = f.builder();
        args!(b, &tab, &nt, &chunk, &out);
        unsafe { b.launch(cfg(crate::launch::multi(blocks))) }.w()?;
        Ok((wrap_f32(out, dev), Shape::from(blocks)))
    };
    ts[0].apply_op1_no_bwd(&DeviceLaunch { name: "multi-sumsq", launch })
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
        let cast = MultiCast { entries, total };
        let launch = |dev: &CudaDevice| match dtype {
            DType::BF16 => cast.run::<bf16>(dev),
            DType::F16 => cast.run::<f16>(dev),
            d => candle_core::bail!("cast_groups: no multi-tensor cast to {d:?}"),
        };
        first.apply_op1_no_bwd(&DeviceLaunch { name: "multi-cast", launch })?
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
}

impl MultiCast {
    fn run<T: CudaDType + DeviceRepr>(&self, dev: &CudaDevice) -> Result<(CudaStorage, Shape)> {
        let stream = dev.cuda_stream();
        let out = unsafe { dev.alloc::<T>(self.total)? };
        let base = {
            let (ptr, _sync) = out.device_ptr(&stream);
            ptr
        };
        let entries: Vec<[u64; 5]> = self.entries.iter().map(|&[s, off, z, n, f]| [s, base + off, z, n, f]).collect();
        let (table, blocks) = crate::launch::multi_table(&entries);
        let tab = stream.clone_htod(&table).w()?;
        let (nt, chunk) = (entries.len() as i32, crate::launch::MULTI_CHUNK as i32);
        let f = dev.get_or_load_custom_func("multi_cast_f32", MODULE, PTX)?;
        let mut b = f.builder();
        args!(b, &tab, &nt, &chunk);
        unsafe { b.launch(cfg(crate::launch::multi(blocks))) }.w()?;
        Ok((T::wrap_cuda_slice(out, dev.clone()), Shape::from(self.total)))
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
    /// … → (dq, dk, dv) one after the other, from one pass (mma.sync or wgmma kernels).
    Dkvq,
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

/// The backward's row statistics (lse, Σ o·dO) for the B·H·T rows of `d`, f32 (B·H·T, 2); o and
/// dO laid out as `d.oh` says (see [`super::AttnDims`]).
#[allow(clippy::too_many_arguments)]
pub fn flash_stats(
    o: &CudaStorage,
    lo: &Layout,
    dout: &CudaStorage,
    ld: &Layout,
    lse: &CudaStorage,
    ll: &Layout,
    d: super::AttnDims,
) -> Result<CudaStorage> {
    let dev = o.device();
    let (rows, hd) = (d.bh * d.t, d.hd);
    if rows * hd >= i32::MAX as usize {
        candle_core::bail!("flash_attention: {rows} rows is more than one launch handles");
    }
    let f = dev.get_or_load_custom_func(&format!("flash_stats_{}", suffix(o.dtype())?), FLASH_MODULE, FLASH_PTX)?;
    let ls = lse.as_cuda_slice::<f32>()?.slice(check(ll, "lse")?..);
    let st = unsafe { dev.alloc::<f32>(2 * rows)? };
    let (ri, hi, ti, ohi) = (rows as i32, hd as i32, d.t as i32, d.oh as i32);
    macro_rules! go {
        ($ty:ty) => {{
            let os = o.as_cuda_slice::<$ty>()?.slice(check(lo, "o")?..);
            let ds = dout.as_cuda_slice::<$ty>()?.slice(check(ld, "dO")?..);
            let mut b = f.builder();
            args!(b, &os, &ds, &ls, &st, &ri, &hi, &ti, &ohi);
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

/// dq, dk and dv one after the other (B·H·(T + 2S)·hd elements) from `x` = [q, dO, k, v] and the
/// row statistics, in one pass of the mma.sync kernels with dq summed in f32 atomics
/// (`flash_mma_dkvq`, or `flash_wg_dkvq` where the wgmma kernels run; then `flash_dq_cast`); only
/// where [`super::flash_mma_enabled`].
pub fn flash_grad_all(
    x: [(&CudaStorage, &Layout); 4],
    st: (&CudaStorage, &Layout),
    d: super::AttnDims,
    scale: f32,
) -> Result<CudaStorage> {
    Ok(flash(&x, Some(st), d, scale, FlashKernel::Dkvq)?.0)
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
    by_dtype!(first.dtype(), "flash_attention", flash_t(x, st, d, scale, kernel))
}

/// Raises the dynamic shared-memory limit of kernel `name` on `dev` to `bytes` (needed past 48 KB),
/// once per kernel and device: the limit stays with the loaded function, so later launches skip
/// the driver call.
fn raise_shared_limit(dev: &CudaDevice, f: &CudaFunction, name: &str, bytes: u32) -> Result<()> {
    use candle_core::cuda_backend::cudarc::driver::sys::CUfunction_attribute;
    use std::collections::HashMap;
    use std::sync::Mutex;
    static RAISED: Mutex<Option<HashMap<(candle_core::cuda_backend::DeviceId, String), u32>>> = Mutex::new(None);
    let mut raised = RAISED.lock().unwrap_or_else(|e| e.into_inner());
    let key = (dev.id(), name.to_string());
    if raised.as_ref().and_then(|m| m.get(&key)).is_some_and(|&b| b >= bytes) {
        return Ok(());
    }
    f.set_attribute(CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, bytes as i32).w()?;
    raised.get_or_insert_with(HashMap::new).insert(key, bytes);
    Ok(())
}

/// Which flash kernels one step of kind `kernel` launches for a dtype and head size under the
/// process-wide switches of [`super::flash`]: the family, the wide variants, and whether the
/// log-sum-exp comes from the forward (no CUDA-core kernel at head sizes 80 and 96).
#[derive(Clone, Copy, Debug)]
struct FlashPlan {
    /// "flash" (CUDA cores), "flash_mma" (mma.sync), or "flash_wg" / "flash_wgs" (wgmma, built for
    /// either reading of MN-major descriptors).
    family: &'static str,
    /// The wide forward or dq kernel (128 query rows a block).
    wide: bool,
    /// The dq kernel compiled for four blocks an SM.
    occ4: bool,
    /// The wide dk/dv or one-pass kernel (128 keys a block).
    wide_bwd: bool,
    /// The wgmma forward or dq kernel with q in registers.
    qreg: bool,
    /// [`FlashKernel::Lse`] by the mma.sync forward.
    lse_by_fwd: bool,
}

impl FlashPlan {
    /// The plan for `kernel`; `hopper`: the device runs kernels/hopper.cu, and whether it reads
    /// MN-major descriptors the other way round (see [`wgmma_reading`]).
    fn new(kernel: FlashKernel, dtype: DType, hd: usize, hopper: Option<bool>) -> Result<Self> {
        let mma = super::flash_mma_enabled(dtype, hd);
        if !([16, 32, 64, 128].contains(&hd) || mma) {
            candle_core::bail!(
                "flash_attention: head size {hd} is not one of 16, 32, 64, 128 on CUDA (80 and 96 with the mma.sync \
                 kernels at bf16/f16, PATCHLM_FLASH_MMA_LARGE_HEADS=1)"
            );
        }
        let family = match kernel {
            FlashKernel::Lse => "flash",
            FlashKernel::Fwd | FlashKernel::Dq | FlashKernel::Dkv | FlashKernel::Dkvq
                if hopper.is_some() && super::flash_wgmma_enabled(dtype, hd) =>
            {
                if hopper == Some(true) {
                    "flash_wgs"
                } else {
                    "flash_wg"
                }
            }
            _ if mma => "flash_mma",
            _ => "flash",
        };
        let is_wg = family.starts_with("flash_wg");
        if kernel == FlashKernel::Dkvq && !(family == "flash_mma" || is_wg) {
            candle_core::bail!("internal: flash dq, dk and dv in one pass need the mma.sync or wgmma kernels");
        }
        let is_mma = family == "flash_mma";
        // (The wgmma kernels have no four-block or wide one-pass build.)
        Ok(FlashPlan {
            family,
            // (the wgmma kernels' wide forward and dq: two warpgroups of 64 rows)
            wide: matches!(kernel, FlashKernel::Fwd | FlashKernel::Dq)
                && (is_mma || is_wg)
                && super::flash_wide_enabled(dtype, hd),
            occ4: kernel == FlashKernel::Dq && is_mma && super::flash_occ4_enabled(dtype, hd),
            // (the wgmma kernels' wide dk/dv pass: two warpgroups of 64 keys; no wide one pass)
            wide_bwd: (matches!(kernel, FlashKernel::Dkv | FlashKernel::Dkvq) && is_mma
                || kernel == FlashKernel::Dkv && is_wg)
                && super::flash_wide_bwd_enabled(dtype, hd),
            qreg: matches!(kernel, FlashKernel::Fwd | FlashKernel::Dq)
                && is_wg
                && super::flash_wgmma_qreg_enabled(dtype, hd),
            lse_by_fwd: kernel == FlashKernel::Lse && mma && ![16, 32, 64, 128].contains(&hd),
        })
    }

    /// The PTX module the family's kernels are in: (name, source).
    fn module(&self) -> (&'static str, &'static str) {
        if self.family.starts_with("flash_wg") {
            (HOPPER_MODULE, HOPPER_PTX)
        } else {
            (FLASH_MODULE, FLASH_PTX)
        }
    }

    /// The kernels of the family that `kernel` launches, in order (the entry point is
    /// `{family}_{which}_{dtype}_{hd}`).
    fn which(&self, kernel: FlashKernel) -> &'static [&'static str] {
        match kernel {
            FlashKernel::Fwd if self.wide && self.qreg => &["fwdwr"],
            FlashKernel::Fwd if self.wide => &["fwdw"],
            FlashKernel::Fwd if self.qreg => &["fwdr"],
            FlashKernel::Fwd => &["fwd"],
            FlashKernel::Lse => &["lse"],
            FlashKernel::Dq if self.wide && self.qreg => &["dqwr"],
            FlashKernel::Dq if self.wide => &["dqw"],
            FlashKernel::Dq if self.occ4 => &["dqo"],
            FlashKernel::Dq if self.qreg => &["dqr"],
            FlashKernel::Dq => &["dq"],
            FlashKernel::Dkv if self.family == "flash" => &["dk", "dv"],
            FlashKernel::Dkv if self.wide_bwd => &["dkvw"],
            FlashKernel::Dkv => &["dkv"],
            FlashKernel::Dkvq if self.wide_bwd => &["dkvqw"],
            FlashKernel::Dkvq => &["dkvq"],
        }
    }
}

/// What flash attention's kernels run as on `dev` (see [`super::flash_runs`]).
pub(crate) fn flash_runs(dev: &CudaDevice, dtype: DType, hd: usize) -> super::FlashRuns {
    flash_runs_with(wgmma_reading_if_asked(dev, dtype, hd), dtype, hd)
}

/// What flash attention's kernels run as on a device whose [`wgmma_reading`] is `reading`: read
/// from the plans of the kernels a step launches.
pub(crate) fn flash_runs_with(reading: Option<bool>, dtype: DType, hd: usize) -> super::FlashRuns {
    let plan = |kernel| FlashPlan::new(kernel, dtype, hd, reading).ok();
    let dq_atomic = super::flash_dq_atomic_enabled(dtype, hd);
    let (fwd, dq) = (plan(FlashKernel::Fwd), plan(FlashKernel::Dq));
    let dkv = plan(if dq_atomic { FlashKernel::Dkvq } else { FlashKernel::Dkv });
    super::FlashRuns {
        dq_atomic: dq_atomic && dkv.is_some(),
        wide: fwd.is_some_and(|p| p.wide),
        wide_bwd: dkv.is_some_and(|p| p.wide_bwd),
        // (the one pass has no dq pass)
        occ4: !dq_atomic && dq.is_some_and(|p| p.occ4),
        wgmma: fwd.is_some_and(|p| p.family.starts_with("flash_wg")),
        wgmma_qreg: fwd.is_some_and(|p| p.qreg),
    }
}

/// [`wgmma_reading`] where the wgmma kernels are asked for at `dtype` and head size `hd`, else None
/// (so that the probes run only on a device that may use them).
fn wgmma_reading_if_asked(dev: &CudaDevice, dtype: DType, hd: usize) -> Option<bool> {
    if super::flash_wgmma_enabled(dtype, hd) {
        wgmma_reading(dev)
    } else {
        None
    }
}

/// How `dev` runs kernels/hopper.cu's flash kernels, asked once per device (every flash launch
/// plans with it): None where it cannot (not a Hopper GPU, compute capability 9.x; no module in
/// the build, `CUDA_COMPUTE_CAP` below 90; or the GPU's wgmma products in the probes' forms match
/// the CPU under neither reading of the descriptors, with a warning), else whether it reads
/// unswizzled MN-major descriptors with the leading byte offset along M or N instead of along K
/// (the PTX ISA's and CUTLASS's layout, which the emulator reads): the launcher then takes the
/// kernels built for that reading (`flash_wgs_*`). Settled by the probes (`ops::wgmma_probe`) on
/// operands whose products are exact, against the CPU: the K-major form must match, then the
/// forms with MN-major operands under one reading or the other.
pub(crate) fn wgmma_reading(dev: &CudaDevice) -> Option<bool> {
    use std::collections::HashMap;
    use std::sync::Mutex;
    static SEEN: Mutex<Option<HashMap<candle_core::cuda_backend::DeviceId, Option<bool>>>> = Mutex::new(None);
    let mut seen = SEEN.lock().unwrap_or_else(|e| e.into_inner());
    *seen.get_or_insert_with(HashMap::new).entry(dev.id()).or_insert_with(|| {
        let hopper = HOPPER_PTX.contains(".entry flash_wg_fwd_bf16_64(")
            && dev.cuda_stream().context().compute_capability().is_ok_and(|(major, _)| major == 9);
        if !hopper {
            return None;
        }
        match probe_mn_reading(dev) {
            Ok(Some(false)) => Some(false),
            Ok(Some(true)) => {
                eprintln!(
                    "note: this GPU reads MN-major wgmma descriptors with the leading byte offset along M/N; flash \
                     attention runs its flash_wgs kernels"
                );
                Some(true)
            }
            Ok(None) => {
                eprintln!(
                    "warning: this GPU's wgmma products match neither descriptor reading; flash attention runs on \
                     mma.sync"
                );
                None
            }
            Err(e) => {
                eprintln!("warning: the wgmma probes failed ({e}); flash attention runs on mma.sync");
                None
            }
        }
    })
}

/// The probes behind [`wgmma_reading`]: None where the K-major form or both readings of the
/// MN-major forms disagree with the CPU, else whether the swapped reading is the one that agrees.
fn probe_mn_reading(dev: &CudaDevice) -> Result<Option<bool>> {
    use super::WgmmaForm::{RegisterTransposed, SharedKMajor, SharedTransposed};
    use candle_core::{Device, Tensor};
    let gpu = Device::Cuda(dev.clone());
    // Multiples of 1/16 in [-0.875, 0.875]: bf16 exactly, and so are their products' f32 sums.
    let operand = |m: usize, dims: (usize, usize)| -> Result<Tensor> {
        let v: Vec<f32> = (0..64 * 16).map(|i| ((i * m + 11) % 29) as f32 / 16.0 - 0.875).collect();
        Tensor::from_vec(v, dims, &Device::Cpu)?.to_dtype(DType::BF16)
    };
    let agrees = |form, a: &Tensor, b: &Tensor| -> Result<bool> {
        let want = super::wgmma_probe(form, a, b)?.flatten_all()?.to_vec1::<f32>()?;
        let got = super::wgmma_probe(form, &a.to_device(&gpu)?, &b.to_device(&gpu)?)?;
        Ok(got.to_device(&Device::Cpu)?.flatten_all()?.to_vec1::<f32>()? == want)
    };
    if !agrees(SharedKMajor, &operand(37, (64, 16))?, &operand(53, (64, 16))?)? {
        return Ok(None);
    }
    let (a, b, at) = (operand(41, (64, 16))?, operand(59, (16, 64))?, operand(43, (16, 64))?);
    // In the probes' layout core matrices lie 1024 bytes apart along K and 128 along M or N.
    for (swapped, (lbo, sbo)) in [(false, (1024, 128)), (true, (128, 1024))] {
        if agrees(RegisterTransposed { lbo, sbo }, &a, &b)? && agrees(SharedTransposed { lbo, sbo }, &at, &b)? {
            return Ok(Some(swapped));
        }
    }
    Ok(None)
}

/// Every flash entry point that a step may launch under the current switches, for the 16-bit
/// and f32 dtypes and head sizes 16 to 128, that is missing from the PTX (tests: a name the
/// launchers build must exist before a GPU ever loads it).
#[cfg(test)]
pub(crate) fn missing_flash_entries() -> Vec<String> {
    let mut missing = Vec::new();
    for dtype in [DType::F32, DType::BF16, DType::F16] {
        let Ok(sfx) = suffix(dtype) else { continue };
        for hd in [16, 32, 48, 64, 80, 96, 128] {
            for kernel in [FlashKernel::Fwd, FlashKernel::Lse, FlashKernel::Dq, FlashKernel::Dkv, FlashKernel::Dkvq] {
                if kernel == FlashKernel::Dkvq && !super::flash_dq_atomic_enabled(dtype, hd) {
                    continue; // (the backward asks for the one pass only where it applies)
                }
                for reading in [false, true] {
                    let Ok(mut plan) = FlashPlan::new(kernel, dtype, hd, Some(reading)) else { continue };
                    let mut kernel = kernel;
                    if plan.lse_by_fwd {
                        kernel = FlashKernel::Fwd;
                        let Ok(p) = FlashPlan::new(kernel, dtype, hd, Some(reading)) else { continue };
                        plan = p;
                    }
                    let ptx = plan.module().1;
                    let mut names: Vec<(String, &str)> =
                        plan.which(kernel).iter().map(|w| (format!("{}_{w}_{sfx}_{hd}", plan.family), ptx)).collect();
                    if kernel == FlashKernel::Dkvq {
                        // (flash.cu's, whichever family ran the pass)
                        names.push((format!("flash_dq_cast_{sfx}"), FLASH_PTX));
                    }
                    missing.extend(
                        names.into_iter().filter(|(n, ptx)| !ptx.contains(&format!(".entry {n}("))).map(|(n, _)| n),
                    );
                }
            }
        }
    }
    missing
}

/// Launches the kernels of one flash-attention step: the tensor-core ones where
/// [`super::flash_mma_enabled`] (128 threads, 64 rows a block; the wide mma.sync ones 128 rows,
/// see [`super::set_flash_wide`] and [`super::set_flash_wide_bwd`]), else the CUDA-core ones (64
/// threads, one row each).
fn flash_t<T: CudaDType + DeviceRepr>(
    x: &[(&CudaStorage, &Layout)],
    st: Option<(&CudaStorage, &Layout)>,
    d: super::AttnDims,
    scale: f32,
    kernel: FlashKernel,
) -> Result<(CudaStorage, Option<CudaStorage>)> {
    let dev = x[0].0.device();
    let super::AttnDims { bh, t, s, hd, oh } = d;
    let dtype = x[0].0.dtype();
    let plan = FlashPlan::new(kernel, dtype, hd, wgmma_reading_if_asked(dev, dtype, hd))?;
    if bh > 65535 || bh * s.max(t) * hd >= i32::MAX as usize {
        candle_core::bail!("flash_attention: {bh} heads x {s} positions is more than one launch handles");
    }
    if oh != 0 && !bh.is_multiple_of(oh) {
        candle_core::bail!("internal: flash attention's {bh} heads are not batches of {oh}");
    }
    if plan.lse_by_fwd {
        // No CUDA-core kernel at this size: the log-sum-exp from the mma.sync forward (with v = k).
        let d = super::AttnDims { oh: 0, ..d };
        let (_, lse) = flash_t::<T>(&[x[0], x[1], x[1]], None, d, scale, FlashKernel::Fwd)?;
        let lse = lse.ok_or_else(|| candle_core::Error::Msg("internal: flash forward without lse".into()))?;
        return Ok((lse, None));
    }
    let FlashPlan { family, wide, wide_bwd, .. } = plan;
    let tc = family != "flash";
    let sfx = suffix(dtype)?;
    let (module, ptx) = plan.module();
    let func = |which: &str| dev.get_or_load_custom_func(&format!("{family}_{which}_{sfx}_{hd}"), module, ptx);
    let which = plan.which(kernel);
    let names: &[&str] = match kernel {
        FlashKernel::Fwd => &["q", "k", "v"],
        FlashKernel::Lse => &["q", "k"],
        FlashKernel::Dq | FlashKernel::Dkv | FlashKernel::Dkvq => &["q", "dO", "k", "v"],
    };
    if x.len() != names.len() {
        candle_core::bail!("internal: flash kernel given {} inputs for {names:?}", x.len());
    }
    let views = x
        .iter()
        .zip(names)
        .map(|((s, l), name)| Ok(s.as_cuda_slice::<T>()?.slice(check(l, name)?..)))
        .collect::<Result<Vec<_>>>()?;
    let rows = if matches!(kernel, FlashKernel::Dkv | FlashKernel::Dkvq) { s } else { t };
    let is_wg = family.starts_with("flash_wg");
    let cfg = if wide && is_wg {
        let smem = if kernel == FlashKernel::Dq { crate::launch::flash_wg_dqw_smem() } else { 0 };
        LaunchConfig { shared_mem_bytes: smem, ..cfg(crate::launch::flash_wg_wide(rows, bh)) }
    } else if wide {
        cfg(crate::launch::flash_wide(rows, bh))
    } else if wide_bwd && is_wg {
        cfg(crate::launch::flash_wide_bwd(rows, bh))
    } else if wide_bwd {
        let smem = crate::launch::flash_wide_bwd_smem(kernel == FlashKernel::Dkvq);
        LaunchConfig { shared_mem_bytes: smem, ..cfg(crate::launch::flash_wide_bwd(rows, bh)) }
    } else if is_wg && kernel == FlashKernel::Dkvq {
        LaunchConfig {
            shared_mem_bytes: crate::launch::flash_wg_dkvq_smem(),
            ..cfg(crate::launch::flash(rows, bh, tc))
        }
    } else {
        cfg(crate::launch::flash(rows, bh, tc))
    };
    // o and dO as rows of the (B·T, H·hd) matrix where `oh` = H is set, else as q (the lse kernel
    // has neither).
    let (ti, si, ohi) = (t as i32, s as i32, oh as i32);
    let stats = || -> Result<_> {
        let (c, l) =
            st.ok_or_else(|| candle_core::Error::Msg("internal: flash gradients without statistics".into()))?;
        Ok(c.as_cuda_slice::<f32>()?.slice(check(l, "stats")?..))
    };
    // The inputs in order, then the kernel's own arguments.
    macro_rules! launch {
        ($which:expr; $($a:expr),*) => {{
            let f = func($which)?;
            if cfg.shared_mem_bytes > 48 * 1024 {
                raise_shared_limit(dev, &f, &format!("{family}_{}_{sfx}_{hd}", $which), cfg.shared_mem_bytes)?;
            }
            let mut b = f.builder();
            for v in &views {
                b.arg(v);
            }
            args!(b, $($a),*);
            unsafe { b.launch(cfg) }.w()?;
        }};
    }
    match kernel {
        FlashKernel::Fwd => {
            let o = unsafe { dev.alloc::<T>(bh * t * hd)? };
            let lse = unsafe { dev.alloc::<f32>(bh * t)? };
            launch!(which[0]; &o, &lse, &ti, &si, &scale, &ohi);
            Ok((T::wrap_cuda_slice(o, dev.clone()), Some(wrap_f32(lse, dev))))
        }
        FlashKernel::Lse => {
            let lse = unsafe { dev.alloc::<f32>(bh * t)? };
            launch!(which[0]; &lse, &ti, &si, &scale);
            Ok((wrap_f32(lse, dev), None))
        }
        FlashKernel::Dq => {
            let st = stats()?;
            let out = unsafe { dev.alloc::<T>(bh * t * hd)? };
            launch!(which[0]; &st, &out, &ti, &si, &scale, &ohi);
            Ok((T::wrap_cuda_slice(out, dev.clone()), None))
        }
        FlashKernel::Dkv => {
            let st = stats()?;
            let n = bh * s * hd;
            let mut out = unsafe { dev.alloc::<T>(2 * n)? };
            {
                let (mut dk, mut dv) = out.split_at_mut(n);
                if tc {
                    launch!(which[0]; &st, &mut dk, &mut dv, &ti, &si, &scale, &ohi);
                } else {
                    for (which, dst) in which.iter().zip([&mut dk, &mut dv]) {
                        launch!(which; &st, dst, &ti, &si, &scale, &ohi);
                    }
                }
            }
            Ok((T::wrap_cuda_slice(out, dev.clone()), None))
        }
        FlashKernel::Dkvq => {
            let st = stats()?;
            let (nq, n) = (bh * t * hd, bh * s * hd);
            let mut out = unsafe { dev.alloc::<T>(nq + 2 * n)? };
            let mut acc = dev.alloc_zeros::<f32>(nq)?;
            {
                let (mut dq, mut kv) = out.split_at_mut(nq);
                let (mut dk, mut dv) = kv.split_at_mut(n);
                launch!(which[0]; &st, &mut dk, &mut dv, &mut acc, &ti, &si, &scale, &ohi);
                let f = dev.get_or_load_custom_func(&format!("flash_dq_cast_{sfx}"), FLASH_MODULE, FLASH_PTX)?;
                let ni = nq as i32;
                let mut b = f.builder();
                args!(b, &acc, &mut dq, &ni, &scale);
                unsafe { b.launch(self::cfg(crate::launch::elems(nq))) }.w()?;
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
    by_dtype!(g.dtype(), "swiglu", swiglu_t(g, lg, u, lu, dy))
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
            args!(b, &gs, &us, &out, &ni);
            unsafe { b.launch(cfg) }.w()?;
            Ok((T::wrap_cuda_slice(out, dev.clone()), lg.shape().clone()))
        }
        Some((d, ld)) => {
            let ds = d.as_cuda_slice::<T>()?.slice(check(ld, "dy")?..);
            let out = unsafe { dev.alloc::<T>(2 * n)? };
            let f = dev.get_or_load_custom_func(&format!("swiglu_bwd_{sfx}"), MODULE, PTX)?;
            let mut b = f.builder();
            args!(b, &gs, &us, &ds, &out, &ni);
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
    by_dtype!(gu.dtype(), "swiglu_packed", swiglu_packed_t(gu, lg, dy))
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
    let ds =
        dy.map(|(d, ld)| Ok::<_, candle_core::Error>(d.as_cuda_slice::<T>()?.slice(check(ld, "dy")?..))).transpose()?;
    let mut b = f.builder();
    b.arg(&gs);
    if let Some(ds) = &ds {
        b.arg(ds);
    }
    args!(b, &out, &nl, &fi);
    unsafe { b.launch(cfg) }.w()?;
    let shape = if ds.is_some() { Shape::from((rows, f2)) } else { Shape::from((rows, f2 / 2)) };
    Ok((T::wrap_cuda_slice(out, dev.clone()), shape))
}

/// [`super::heads_from_rows`] (`op.to_heads`: `inputs[0]` are the rows) or
/// [`super::rows_from_heads`] (`inputs` = q, k, v).
pub fn heads(op: &super::HeadsOp, inputs: [(&CudaStorage, &Layout); 3]) -> Result<CudaStorage> {
    by_dtype!(inputs[0].0.dtype(), "heads", heads_t(op, inputs))
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
    let name =
        format!("{}_{}", if op.to_heads { "heads_from_rows" } else { "rows_from_heads" }, suffix(inputs[0].0.dtype())?);
    let f = dev.get_or_load_custom_func(&name, MODULE, PTX)?;
    let mut bld = f.builder();
    bld.arg(&xs[0]);
    if !op.to_heads {
        args!(bld, &xs[1], &xs[2]);
    }
    // Without tables (rope 0) the kernel never reads them: a null pointer stands in.
    let null = 0u64;
    match (&c, &sn) {
        (Some(c), Some(sn)) => {
            args!(bld, c, sn);
        }
        _ => {
            args!(bld, &null, &null);
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
            args!(bl, &av, &bv, &wv, &mut sum, &mut normed, &di, &eps, &ni);
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
pub fn rms_fwd(x: &CudaStorage, lx: &Layout, w: &CudaStorage, lw: &Layout, eps: f32) -> Result<(CudaStorage, Shape)> {
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
            let (name, cfg, warp) = row_kernel("rms_fwd", $s, n, crate::launch::rms_rows(n, d));
            let f = dev.get_or_load_custom_func(&name, MODULE, PTX)?;
            let mut b = f.builder();
            args!(b, &xs, &ws, &out, &di, &eps);
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
            let (name, dx_launch, warp) = if res.is_some() {
                if !super::ROWS_CUDA.get() {
                    candle_core::bail!("rms_norm: a residual gradient needs the warp-per-row kernels");
                }
                (concat!("rms_dx_res_w_", $s).to_string(), warp_rows_cfg(n), true)
            } else {
                row_kernel("rms_dx", $s, n, crate::launch::rms_rows(n, d))
            };
            let f = dev.get_or_load_custom_func(&name, MODULE, PTX)?;
            let mut b = f.builder();
            args!(b, &xs, &ws, &ys);
            if let Some(r) = &res {
                b.arg(r);
            }
            args!(b, &out, &rs, &di, &eps);
            if warp {
                b.arg(&ni);
            }
            unsafe { b.launch(dx_launch) }.w()?;
            let acc = dev.alloc_zeros::<f32>(d)?;
            let (dw_launch, rows_per_chunk) = crate::launch::rms_dw(n, d);
            let rows_per_chunk = rows_per_chunk as i32;
            let f = dev.get_or_load_custom_func(concat!("rms_dw_", $s), MODULE, PTX)?;
            let mut b = f.builder();
            args!(b, &xs, &ys, &rs, &acc, &ni, &di, &rows_per_chunk);
            unsafe { b.launch(cfg(dw_launch)) }.w()?;
            {
                let mut dw = out.slice_mut(n * d..);
                let f = dev.get_or_load_custom_func(concat!("cast_from_f32_", $s), MODULE, PTX)?;
                let mut b = f.builder();
                args!(b, &acc, &mut dw, &di);
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

/// The PTX of kernels/hopper.cu (compute_90a: Hopper only; an empty module where the build's
/// capability is below 90).
pub const HOPPER_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/hopper.ptx"));
const HOPPER_MODULE: &str = "patchlm_hopper";

/// kernels/hopper.cu's probes (`probe_wgmma_bf16`, `probe_wgmma_rs_bf16`, `probe_wgmma_ss_t_bf16`): the product `form`
/// names, (64, 64) f32, by one warpgroup (see [`super::wgmma_probe`]).
pub fn wgmma_probe(
    form: super::WgmmaForm,
    a: &CudaStorage,
    la: &Layout,
    b: &CudaStorage,
    lb: &Layout,
) -> Result<CudaStorage> {
    let dev = a.device();
    let (major, _) = dev.cuda_stream().context().compute_capability().w()?;
    let name = match form {
        super::WgmmaForm::SharedKMajor => "probe_wgmma_bf16",
        super::WgmmaForm::RegisterTransposed { .. } => "probe_wgmma_rs_bf16",
        super::WgmmaForm::SharedTransposed { .. } => "probe_wgmma_ss_t_bf16",
    };
    if major != 9 || !HOPPER_PTX.contains(&format!(".entry {name}(")) {
        candle_core::bail!(
            "wgmma_probe: needs a Hopper GPU (compute capability 9.x) and a build for it (CUDA_COMPUTE_CAP=90)"
        );
    }
    let f = dev.get_or_load_custom_func(name, HOPPER_MODULE, HOPPER_PTX)?;
    let (av, bv) = (
        a.as_cuda_slice::<bf16>()?.slice(check(la, "wgmma_probe: a")?..),
        b.as_cuda_slice::<bf16>()?.slice(check(lb, "wgmma_probe: b")?..),
    );
    let d = dev.alloc_zeros::<f32>(64 * 64)?;
    let mut builder = f.builder();
    args!(builder, &av, &bv, &d);
    let offsets = match form {
        super::WgmmaForm::RegisterTransposed { lbo, sbo } | super::WgmmaForm::SharedTransposed { lbo, sbo } => {
            Some((lbo as i32, sbo as i32))
        }
        super::WgmmaForm::SharedKMajor => None,
    };
    if let Some((lbo, sbo)) = &offsets {
        args!(builder, lbo, sbo);
    }
    unsafe { builder.launch(cfg(crate::launch::warpgroup())) }.w()?;
    Ok(wrap_f32(d, dev))
}
