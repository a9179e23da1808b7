//! Embedding lookup with a scatter-add backward ([`embedding`]), and its mean over bags of
//! consecutive ids ([`embedding_mean`]).

use super::*;

static EMBEDDING_SORTED: Switch = Switch::new("PATCHLM_EMBEDDING_SORTED", true, false);

/// Chooses, on CUDA, the embedding backward ([`embedding`], [`embedding_mean`]) without float
/// atomics, process-wide: the ids grouped by value (a counting sort: count, prefix sum, place,
/// with 2 integer atomics an id) and each vocabulary row's gradient summed from its own tokens'
/// rows and written once (zeros where no token names it), instead of one f32 atomic add per
/// element of every token's row into a zeroed accumulator that is then cast. Off by default (also
/// `PATCHLM_EMBEDDING_SORTED=1`) until a GPU has run its device test and timed it; its math is
/// tested without one by `tests/emulated.rs`. The CPU path sums each id's rows in token order
/// either way; on CUDA the order within an id is the atomics' in both.
pub fn set_embedding_sorted(enabled: bool) {
    EMBEDDING_SORTED.set(enabled);
}

/// Whether the CUDA embedding backward groups the ids instead of adding with float atomics (see
/// [`set_embedding_sorted`]).
pub fn embedding_sorted_enabled() -> bool {
    EMBEDDING_SORTED.get()
}

/// Embedding lookup `weight[ids]`: `weight` (V, D) in f32, bf16 or f16, `ids` u32 of any shape
/// → (ids..., D). Differentiable in `weight`: the backward pass scatters the rows of the output
/// gradient onto their ids (on the GPU with one thread per element and atomic f32 adds, instead
/// of candle's `index_add`, which walks all ids serially per column).
pub fn embedding(weight: &Tensor, ids: &Tensor) -> candle_core::Result<Tensor> {
    embedding_mean(weight, ids, 1)
}

/// The mean of the embeddings of each run of `k` consecutive ids: `ids` u32 (..., N) with N a
/// multiple of `k` → (..., N / k, D), row r = (1/k) Σ_{b<k} `weight[ids[r·k + b]]`, summed in
/// f32 and rounded once to `weight`'s dtype (PyTorch's `EmbeddingBag` in mean mode with bags
/// of `k`). `k` = 1 is [`embedding`]. One pass over the ids, with no (..., N, D) intermediate;
/// differentiable in `weight`: each id's row receives 1/k of its bag's output gradient.
pub fn embedding_mean(weight: &Tensor, ids: &Tensor, k: usize) -> candle_core::Result<Tensor> {
    let (_, d) = weight.dims2()?;
    if ids.dtype() != DType::U32 {
        candle_core::bail!("embedding: ids must be u32, got {:?}", ids.dtype());
    }
    let mut shape = ids.dims().to_vec();
    if k != 1 {
        match shape.pop() {
            Some(n) if k != 0 && n.is_multiple_of(k) => shape.push(n / k),
            n => candle_core::bail!(
                "embedding_mean: the last axis of ids ({}) is not a whole number of bags of {k}",
                n.map_or("none".to_string(), |n| n.to_string())
            ),
        }
    }
    shape.push(d);
    let flat = ids.flatten_all()?.contiguous()?;
    weight.contiguous()?.apply_op2(&flat, EmbeddingOp { k })?.reshape(shape)
}

/// Mean over bags of `k` ids (`k` = 1: the lookup); ids (N·k,) → (N, D).
struct EmbeddingOp {
    k: usize,
}

/// Backward of [`EmbeddingOp`]: (ids (N·k,), dy (N, D)) → dW (V, D).
pub(super) struct EmbeddingGrad {
    pub(super) vocab: usize,
    pub(super) k: usize,
}

fn check_ids(ids: &[u32], v: usize) -> candle_core::Result<()> {
    match ids.iter().find(|&&i| i as usize >= v) {
        Some(i) => candle_core::bail!("embedding: id {i} is outside the vocabulary of {v}"),
        None => Ok(()),
    }
}

fn embedding_fwd<T: Float>(w: &[T], ids: &[u32], d: usize, k: usize) -> Vec<T> {
    let mut out = vec![T::from_f(0.0); ids.len() / k * d];
    if k == 1 {
        out.par_chunks_mut(d).zip(ids.par_iter()).for_each(|(o, &i)| {
            o.copy_from_slice(&w[i as usize * d..(i as usize + 1) * d]);
        });
        return out;
    }
    let inv = 1.0 / k as f32;
    out.par_chunks_mut(d).zip(ids.par_chunks(k)).for_each(|(o, bag)| {
        let mut acc = vec![0f32; d];
        for &i in bag {
            for (a, x) in acc.iter_mut().zip(&w[i as usize * d..(i as usize + 1) * d]) {
                *a += x.f();
            }
        }
        for (o, a) in o.iter_mut().zip(acc) {
            *o = T::from_f(a * inv);
        }
    });
    out
}

/// Rows grouped by id (a counting sort), then each id's gradient row summed in f32 in row order
/// (input position r takes row r / k of `dy`, times 1/k): parallel over ids and deterministic.
fn embedding_bwd<T: Float>(ids: &[u32], dy: &[T], v: usize, d: usize, k: usize) -> Vec<T> {
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
    let inv = 1.0 / k as f32;
    let mut out = vec![T::from_f(0.0); v * d];
    out.par_chunks_mut(d).enumerate().for_each(|(id, o)| {
        let mine = &rows[start[id]..start[id + 1]];
        if mine.is_empty() {
            return;
        }
        let mut acc = vec![0f32; d];
        for &r in mine {
            let r = r / k;
            for (a, &g) in acc.iter_mut().zip(&dy[r * d..(r + 1) * d]) {
                *a += g.f() * inv;
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
        check_bags(ids.len(), self.k)?;
        let k = self.k;
        let out = map_float!("embedding", s1, l1, "weight", |w| embedding_fwd(w, ids, d, k));
        Ok((out, Shape::from((ids.len() / k, d))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        check_bags(l2.shape().elem_count(), self.k)?;
        cuda::embedding(s1, l1, s2, l2, None, self.k)
    }

    fn bwd(
        &self,
        w: &Tensor,
        ids: &Tensor,
        _res: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let dy = dy.to_dtype(w.dtype())?.contiguous()?;
        Ok((Some(ids.apply_op2_no_bwd(&dy, &EmbeddingGrad { vocab: w.dim(0)?, k: self.k })?), None))
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
        let (rows, d) = l2.shape().dims2()?;
        let ids = ids_of(s1, l1)?;
        check_ids(ids, self.vocab)?;
        check_grad_rows(ids.len(), rows, self.k)?;
        let (v, k) = (self.vocab, self.k);
        let out = map_float!("embedding", s2, l2, "dy", |g| embedding_bwd(ids, g, v, d, k));
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
        check_grad_rows(l1.shape().elem_count(), l2.shape().dims2()?.0, self.k)?;
        cuda::embedding(s2, l2, s1, l1, Some(self.vocab), self.k)
    }
}

/// `n` ids must be whole bags of `k`.
fn check_bags(n: usize, k: usize) -> candle_core::Result<()> {
    if k == 0 || !n.is_multiple_of(k) {
        candle_core::bail!("embedding: {n} ids are not a whole number of bags of {k}");
    }
    Ok(())
}

/// The gradient of bags of `k` from `n` ids has `n / k` rows.
fn check_grad_rows(n: usize, rows: usize, k: usize) -> candle_core::Result<()> {
    check_bags(n, k)?;
    if rows != n / k {
        candle_core::bail!("embedding: a gradient of {rows} rows for {n} ids in bags of {k}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// The ops check their own inputs too (the CUDA kernels index by them), not only the public
    /// functions that build them: ids that are not whole bags and a gradient of the wrong number
    /// of rows are errors naming both.
    #[test]
    fn the_ops_refuse_ids_that_are_not_whole_bags_and_gradients_of_the_wrong_rows() {
        let dev = Device::Cpu;
        let w = Tensor::zeros((10, 4), DType::F32, &dev).unwrap();
        let ids = Tensor::new(&[1u32, 2, 3, 4, 5], &dev).unwrap();
        for k in [0, 2] {
            let e = w.apply_op2_no_bwd(&ids, &EmbeddingOp { k }).unwrap_err().to_string();
            assert!(e.contains("5 ids are not a whole number of bags of"), "{e}");
            let dy = Tensor::zeros((2, 4), DType::F32, &dev).unwrap();
            let e = ids.apply_op2_no_bwd(&dy, &EmbeddingGrad { vocab: 10, k }).unwrap_err().to_string();
            assert!(e.contains("5 ids are not a whole number of bags of"), "{e}");
        }
        let ids = ids.narrow(0, 0, 4).unwrap();
        assert_eq!(w.apply_op2_no_bwd(&ids, &EmbeddingOp { k: 2 }).unwrap().dims(), [2, 4]);
        for rows in [1, 3] {
            let dy = Tensor::zeros((rows, 4), DType::F32, &dev).unwrap();
            let e = ids.apply_op2_no_bwd(&dy, &EmbeddingGrad { vocab: 10, k: 2 }).unwrap_err().to_string();
            assert!(e.contains(&format!("a gradient of {rows} rows for 4 ids in bags of 2")), "{e}");
        }
        let dy = Tensor::zeros((2, 4), DType::F32, &dev).unwrap();
        assert_eq!(ids.apply_op2_no_bwd(&dy, &EmbeddingGrad { vocab: 10, k: 2 }).unwrap().dims(), [10, 4]);
    }

    #[test]
    fn the_sorted_backward_switch_reads_back_what_was_set() {
        // A CUDA-only switch (the CPU path is the same either way), so flipping it here races
        // with nothing.
        for on in [true, false] {
            set_embedding_sorted(on);
            assert_eq!(embedding_sorted_enabled(), on);
        }
    }
}
