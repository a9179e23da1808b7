//! Embedding lookup with a scatter-add backward ([`embedding`]).

use super::*;

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
pub(super) struct EmbeddingGrad {
    pub(super) vocab: usize,
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
