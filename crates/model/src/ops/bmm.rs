//! Matrix products on the CPU: [`batched_matmul`] for attention's per-head products, [`matmul`]
//! for the projections.

use super::*;

/// `a` (…, M, K) × `b` (…, K, N) → (…, M, N) for batch dimensions of equal sizes: candle's
/// `matmul`, except that on the CPU in f32 a batch of several small products (attention's per-head
/// scores and mixes) runs one product per thread, each as one `gemm` call without threads of its
/// own. (candle hands every product of the batch in turn to a multi-threaded `gemm`, which costs
/// more in coordination than a 128×64×128 product does in arithmetic: ~40 GFLOP/s against ~250
/// for large products on two cores.) Either operand may be a strided view, such as a transpose
/// or a narrowed range of rows. Elsewhere (CUDA, other dtypes, fewer matrices than twice the
/// threads) this is `a.matmul(b)`. Differentiable in both operands.
pub fn batched_matmul(a: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    let (da, db) = (a.dims(), b.dims());
    let r = da.len();
    let batch: usize = da.iter().take(r.saturating_sub(2)).product();
    let simple = r >= 3
        && db.len() == r
        && da[..r - 2] == db[..r - 2]
        && da[r - 1] == db[r - 2]
        && a.device().is_cpu()
        && a.dtype() == DType::F32
        && b.dtype() == DType::F32
        && batch >= 2 * rayon::current_num_threads();
    if !simple {
        return a.matmul(b);
    }
    per_thread(a, b)
}

/// `a` (M, K) × `b` (K, N) → (M, N): candle's `matmul`, except that on the CPU in f32 the
/// product is one multi-threaded `gemm` call writing an output that was not zero-filled first
/// (candle zeroes it, then overwrites every element: for the LM head's 16·128 × 8192 logits,
/// 67 MB written twice). Either operand may be a strided view (a transpose). Elsewhere (CUDA,
/// other dtypes or ranks) this is `a.matmul(b)`. Differentiable in both operands.
pub fn matmul(a: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    let simple = a.rank() == 2
        && b.rank() == 2
        && a.device().is_cpu()
        && b.device().is_cpu()
        && a.dtype() == DType::F32
        && b.dtype() == DType::F32;
    if !simple {
        return a.matmul(b);
    }
    a.apply_op2(b, BatchedMatmul)
}

/// The CPU op of [`batched_matmul`], whatever the batch size (tests call it directly).
fn per_thread(a: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    a.apply_op2(b, BatchedMatmul)
}

/// The CPU op of [`batched_matmul`] and [`matmul`]: one product per thread for a batch of
/// several, one product over all threads for a single one.
struct BatchedMatmul;

/// `len` f32s for `fill` to write every element of (`gemm` with `read_dst` off), never read before.
fn written_by(len: usize, fill: impl FnOnce(&mut [std::mem::MaybeUninit<f32>])) -> Vec<f32> {
    let mut v: Vec<std::mem::MaybeUninit<f32>> = Vec::with_capacity(len);
    // SAFETY: MaybeUninit<f32> needs no initialisation; the capacity is `len`.
    unsafe { v.set_len(len) };
    fill(&mut v);
    let mut v = std::mem::ManuallyDrop::new(v);
    // SAFETY: `fill` wrote every element (the callers' contract), MaybeUninit<f32> and f32 have
    // the same layout, and pointer, length and capacity come from the vector just released.
    unsafe { Vec::from_raw_parts(v.as_mut_ptr().cast::<f32>(), v.len(), v.capacity()) }
}

/// The element offset of each matrix of a batched layout (dims …, R, C), batch index order.
fn matrix_offsets(l: &Layout) -> Vec<usize> {
    let (dims, strides) = (l.dims(), l.stride());
    let r = dims.len();
    let mut offs = vec![l.start_offset()];
    for d in 0..r - 2 {
        // Row-major over the batch dimensions: extend every offset so far by the next one.
        offs = offs.iter().flat_map(|&o| (0..dims[d]).map(move |i| o + i * strides[d])).collect();
    }
    offs
}

impl CustomOp2 for BatchedMatmul {
    fn name(&self) -> &'static str {
        "batched-matmul"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (a, b) = match (s1, s2) {
            (CpuStorage::F32(a), CpuStorage::F32(b)) => (a.as_slice(), b.as_slice()),
            _ => candle_core::bail!("batched_matmul: operands must be f32"),
        };
        let (da, db) = (l1.dims(), l2.dims());
        let r = da.len();
        if r < 2 {
            candle_core::bail!("batched_matmul: {da:?} × {db:?}: operands need two dimensions or more");
        }
        let (m, k, n) = (da[r - 2], da[r - 1], db[r - 1]);
        if db.len() != r || db[r - 2] != k || da[..r - 2] != db[..r - 2] {
            candle_core::bail!("batched_matmul: {da:?} × {db:?} do not multiply");
        }
        let (sa, sb) = (l1.stride(), l2.stride());
        let (a_rs, a_cs, b_rs, b_cs) = (sa[r - 2], sa[r - 1], sb[r - 2], sb[r - 1]);
        let (oa, ob) = (matrix_offsets(l1), matrix_offsets(l2));
        // Every element a matrix reads must lie inside its storage (gemm reads through raw pointers).
        let last = |o: usize, rows: usize, rs: usize, cols: usize, cs: usize| {
            o + rows.saturating_sub(1) * rs + cols.saturating_sub(1) * cs
        };
        let fits_a = oa.iter().all(|&o| m == 0 || k == 0 || last(o, m, a_rs, k, a_cs) < a.len());
        let fits_b = ob.iter().all(|&o| k == 0 || n == 0 || last(o, k, b_rs, n, b_cs) < b.len());
        if !fits_a || !fits_b {
            candle_core::bail!("batched_matmul: a layout reaches past its storage");
        }
        let product = |dst: *mut f32, oa: usize, ob: usize, par: gemm::Parallelism| {
            // SAFETY: dst holds m·n elements written at row stride n, column stride 1 (and,
            // with `read_dst` off, never read); every element of a[oa..] and b[ob..] that the
            // strides reach was checked to lie inside the slices above; the operands do not
            // overlap dst (fresh memory).
            unsafe {
                gemm::gemm(
                    m,
                    n,
                    k,
                    dst,
                    1,
                    n as isize,
                    false,
                    a.as_ptr().add(oa),
                    a_cs as isize,
                    a_rs as isize,
                    b.as_ptr().add(ob),
                    b_cs as isize,
                    b_rs as isize,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    par,
                )
            }
        };
        let out = if k == 0 || m * n == 0 {
            vec![0f32; oa.len() * m * n]
        } else if oa.len() == 1 {
            let threads = rayon::current_num_threads();
            let par = if threads > 1 { gemm::Parallelism::Rayon(threads) } else { gemm::Parallelism::None };
            written_by(m * n, |dst| product(dst.as_mut_ptr().cast(), oa[0], ob[0], par))
        } else {
            written_by(oa.len() * m * n, |out| {
                out.par_chunks_mut(m * n)
                    .zip(oa.par_iter().zip(ob.par_iter()))
                    .for_each(|(dst, (&oa, &ob))| product(dst.as_mut_ptr().cast(), oa, ob, gemm::Parallelism::None))
            })
        };
        let mut shape = da[..r - 2].to_vec();
        shape.extend([m, n]);
        Ok((CpuStorage::F32(out), Shape::from(shape)))
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        if a.rank() == 2 {
            return Ok((Some(matmul(g, &b.t()?)?), Some(matmul(&a.t()?, g)?)));
        }
        Ok((Some(batched_matmul(g, &b.t()?)?), Some(batched_matmul(&a.t()?, g)?)))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        assert_eq!(a.dims(), b.dims());
        (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
    }

    /// Against candle's matmul on the layouts attention uses: contiguous, a transposed operand,
    /// rows narrowed out of a longer sequence, four dimensions, and an odd shape.
    #[test]
    fn matches_candle_matmul_on_strided_layouts() {
        let dev = Device::Cpu;
        let q = Tensor::randn(0f32, 1.0, (2, 3, 40, 16), &dev).unwrap();
        let kv = Tensor::randn(0f32, 1.0, (2, 3, 50, 16), &dev).unwrap();
        let cases: Vec<(Tensor, Tensor)> = vec![
            (q.clone(), kv.narrow(2, 0, 16).unwrap()),
            (q.clone(), kv.narrow(2, 5, 33).unwrap().t().unwrap()),
            (q.narrow(2, 7, 20).unwrap(), kv.narrow(2, 0, 45).unwrap().t().unwrap()),
            (kv.narrow(2, 0, 40).unwrap().t().unwrap(), q.clone()),
            (Tensor::randn(0f32, 1.0, (9, 7, 13), &dev).unwrap(), Tensor::randn(0f32, 1.0, (9, 13, 5), &dev).unwrap()),
        ];
        for (i, (a, b)) in cases.iter().enumerate() {
            let got = per_thread(a, b).unwrap();
            let want = a.matmul(b).unwrap();
            assert!(max_diff(&got, &want) < 1e-4, "case {i}");
            assert!(got.is_contiguous());
        }
    }

    /// The two-dimensional product against candle's on contiguous and transposed operands and
    /// an empty inner dimension; its output is written whole, none of it read first: a buffer of
    /// NaNs freed just before (which the allocator hands back) leaves no trace.
    #[test]
    fn matmul_matches_candle_and_writes_every_element() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (300, 70), &dev).unwrap();
        let w = Tensor::randn(0f32, 1.0, (90, 70), &dev).unwrap();
        let cases: Vec<(Tensor, Tensor)> = vec![
            (x.clone(), w.t().unwrap()),
            (w.clone(), x.t().unwrap()),
            (x.t().unwrap(), x.narrow(1, 0, 33).unwrap()),
            (Tensor::zeros((5, 0), DType::F32, &dev).unwrap(), Tensor::zeros((0, 4), DType::F32, &dev).unwrap()),
        ];
        for (i, (a, b)) in cases.iter().enumerate() {
            let (rows, cols) = (a.dim(0).unwrap(), b.dim(1).unwrap());
            drop(std::hint::black_box(vec![f32::NAN; rows * cols]));
            let got = matmul(a, b).unwrap();
            let want = a.matmul(b).unwrap();
            assert!(max_diff(&got, &want) < 1e-4, "case {i}");
            assert!(got.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().all(|v| v.is_finite()), "case {i}");
        }
        let v = Var::randn(0f32, 1.0, (30, 20), &dev).unwrap();
        let wt = w.narrow(1, 0, 20).unwrap().t().unwrap();
        let loss = |y: Tensor| y.sqr().unwrap().sum_all().unwrap();
        let g1 = loss(matmul(v.as_tensor(), &wt).unwrap()).backward().unwrap();
        let g2 = loss(v.as_tensor().matmul(&wt).unwrap()).backward().unwrap();
        assert!(max_diff(g1.get(&v).unwrap(), g2.get(&v).unwrap()) < 1e-3);
    }

    /// Gradients of both operands equal candle's autograd through its own matmul.
    #[test]
    fn gradients_match_candle_autograd() {
        let dev = Device::Cpu;
        let a = Var::randn(0f32, 1.0, (4, 6, 10, 8), &dev).unwrap();
        let b = Var::randn(0f32, 1.0, (4, 6, 12, 8), &dev).unwrap();
        let w = Tensor::randn(0f32, 1.0, (4, 6, 10, 12), &dev).unwrap();
        let loss = |y: Tensor| (y * &w).unwrap().sum_all().unwrap();
        let g1 = loss(per_thread(a.as_tensor(), &b.as_tensor().t().unwrap()).unwrap()).backward().unwrap();
        let g2 = loss(a.as_tensor().matmul(&b.as_tensor().t().unwrap()).unwrap()).backward().unwrap();
        for v in [&a, &b] {
            assert!(max_diff(g1.get(v).unwrap(), g2.get(v).unwrap()) < 1e-4);
        }
    }

    /// `gemm` reads through raw pointers, so a layout that reaches past its storage (which
    /// candle's own tensors never have, but the op takes any layout) is refused, exactly from one
    /// element past the end, in either operand.
    #[test]
    fn layouts_that_reach_past_their_storage_are_refused() {
        let a = CpuStorage::F32((0..12).map(|v| v as f32).collect());
        let b = CpuStorage::F32((0..8).map(|v| v as f32).collect());
        let la = |offset| Layout::contiguous_with_offset((1, 3, 4), offset);
        let lb = |offset| Layout::contiguous_with_offset((1, 4, 2), offset);
        // Row-major 3 × 4 and 4 × 2 read whole: the last elements are a[11] and b[7].
        let (out, shape) = BatchedMatmul.cpu_fwd(&a, &la(0), &b, &lb(0)).unwrap();
        assert_eq!(shape.dims(), [1, 3, 2]);
        let CpuStorage::F32(out) = out else { panic!("f32 out") };
        // Row i of a is 4i..4i+3; column j of b is j, j+2, j+4, j+6.
        let want: Vec<f32> = (0..3)
            .flat_map(|i| (0..2).map(move |j| (0..4).map(|t| ((4 * i + t) * (j + 2 * t)) as f32).sum()))
            .collect();
        assert_eq!(out, want);
        // A range moved one element on reaches one past the end of its storage.
        for (l1, l2) in [(la(1), lb(0)), (la(0), lb(1))] {
            let e = BatchedMatmul.cpu_fwd(&a, &l1, &b, &l2).unwrap_err().to_string();
            assert!(e.contains("a layout reaches past its storage"), "{e}");
        }
        // So do strides that step outside it (a's rows 5 apart: the last row starts at 10).
        // a's columns 3 apart (a transposed 4 × 3): from offset 1, the last element is a[12].
        let wide = Layout::new(Shape::from((1, 3, 4)), vec![12, 5, 1], 0);
        let transposed = Layout::new(Shape::from((1, 3, 4)), vec![12, 1, 3], 1);
        for l1 in [wide, transposed] {
            let e = BatchedMatmul.cpu_fwd(&a, &l1, &b, &lb(0)).unwrap_err().to_string();
            assert!(e.contains("a layout reaches past its storage"), "{l1:?}: {e}");
        }
    }

    /// Shapes that do not multiply are refused as candle refuses them; small batches and other
    /// devices or dtypes take candle's path.
    #[test]
    fn refuses_mismatched_shapes() {
        let dev = Device::Cpu;
        let a = Tensor::zeros((8, 3, 4), DType::F32, &dev).unwrap();
        for b in
            [Tensor::zeros((8, 5, 2), DType::F32, &dev).unwrap(), Tensor::zeros((7, 4, 2), DType::F32, &dev).unwrap()]
        {
            assert!(batched_matmul(&a, &b).is_err());
            assert!(per_thread(&a, &b).is_err());
        }
        // Other dtypes are candle's: the same products (the CPU op itself is f32 only).
        let a = Tensor::randn(0f32, 1.0, (8, 3, 4), &dev).unwrap();
        let b = Tensor::randn(0f32, 1.0, (8, 4, 2), &dev).unwrap();
        for dtype in [DType::BF16, DType::F16, DType::F64] {
            let (x, y) = (a.to_dtype(dtype).unwrap(), b.to_dtype(dtype).unwrap());
            let f32_of = |t: Tensor| t.to_dtype(DType::F32).unwrap();
            assert_eq!(max_diff(&f32_of(batched_matmul(&x, &y).unwrap()), &f32_of(x.matmul(&y).unwrap())), 0.0);
            let (x2, y2) = (x.get(0).unwrap(), y.get(0).unwrap());
            assert_eq!(max_diff(&f32_of(matmul(&x2, &y2).unwrap()), &f32_of(x2.matmul(&y2).unwrap())), 0.0);
            assert!(per_thread(&x, &y).is_err());
        }
        let one = Tensor::randn(0f32, 1.0, (1, 3, 4), &dev).unwrap();
        let r = Tensor::randn(0f32, 1.0, (1, 4, 2), &dev).unwrap();
        assert!(max_diff(&batched_matmul(&one, &r).unwrap(), &one.matmul(&r).unwrap()) == 0.0);
    }
}
