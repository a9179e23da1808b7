//! Attention heads from token rows with RoPE fused, and back ([`heads_from_rows`], [`rows_from_heads`]).

use super::*;

static LAYOUT_CUDA: Switch = Switch::new("PATCHLM_LAYOUT_CUDA", true, true);

/// Turns the layout CUDA kernels on or off process-wide: [`heads_from_rows`] /
/// [`rows_from_heads`], [`swiglu_packed`] and the one-launch weight cast of [`cast_groups`]. On by
/// default (their device tests, `tests/cuda.rs`, passed on an H200); `PATCHLM_LAYOUT_CUDA=0` also
/// turns them off. Off, the hand-written backward pass lays out heads with candle's strided copies
/// and [`rope`], and runs the gate and up projections apart.
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
    pub(super) fn cols(&self) -> usize {
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
    if c.dims() != [l.seq, l.head_dim] || s.dims() != [l.seq, l.head_dim] || !l.head_dim.is_multiple_of(2) {
        candle_core::bail!("{what}: rope tables {:?}/{:?} do not match {l:?} (even head size)", c.dims(), s.dims());
    }
    if c.dtype() != DType::F32 || s.dtype() != DType::F32 {
        candle_core::bail!("{what}: cos and sin tables must be f32");
    }
    Ok(Some((c.contiguous()?, s.contiguous()?)))
}

/// [`heads_from_rows`] (`to_heads`: one input, the rows) or [`rows_from_heads`] (three inputs
/// q, k, v; k and v ignored without key/value heads); the rope tables ride along in the op.
pub(super) struct HeadsOp {
    pub(super) layout: HeadsLayout,
    pub(super) tables: Option<(Tensor, Tensor)>,
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub(super) to_heads: bool,
}

impl HeadsOp {
    pub(super) fn out_len(&self) -> usize {
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
