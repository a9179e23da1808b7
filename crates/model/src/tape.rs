//! Training without candle's autograd. [`Llama::forward_tape`] runs the decoder on tensors that
//! record no graph and keeps exactly the activations that the hand-written
//! [`Llama::backward_tape`] needs; the backward pass calls the same kernels that autograd would
//! (matmuls and the fused ops' backward passes, [`crate::ops::grad`]).
//!
//! Why: candle's backward pass seeds every node's gradient with a tensor of zeros and adds the
//! incoming gradient to it, for every op (weight casts, reshapes, transposes included), and builds
//! the graph on the host op by op. Here each gradient is written once, weight gradients are cast
//! to f32 once (or not at all, see [`set_compute_dtype_grads`]), and only the tensors named below
//! are kept. The forward pass also changes the layout work, not the math: stacked q/k/v and
//! gate/up projections, heads laid out with RoPE in one pass, residual adds inside the next
//! norm's kernel, softmax attention in blocks of query rows (see [`set_attention_chunks`]). The
//! gradients are the same (tested against autograd in `crates/patch/tests/tape.rs`).

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};

use candle_core::{DType, Device, Tensor};

use crate::llama::{DecoderLayer, Llama, Rope};
use crate::ops::{self, grad, Switch};
use crate::profile::span;

/// Parameter gradients by HF weight name (`model.layers.0.mlp.up_proj.weight`, ...), each in its
/// parameter's dtype, or (see [`set_compute_dtype_grads`]) in the dtype the backward pass
/// computed it in.
pub type Grads = HashMap<String, Tensor>;

static TAPE: Switch = Switch::new("PATCHLM_AUTOGRAD", false, true);

static COMPUTE_GRADS: Switch = Switch::new("PATCHLM_BF16_GRADS", true, true);

/// Whether weight gradients stay in the compute dtype (see [`set_compute_dtype_grads`]).
pub fn compute_dtype_grads() -> bool {
    COMPUTE_GRADS.get()
}

/// Whether [`Llama::backward_tape`] leaves each weight gradient in the dtype it was computed in
/// (bf16 for the matmul weights under bf16 compute) instead of casting it to the parameter's
/// dtype (f32 master weights). The values are the same (the cast to f32 is exact); it saves a
/// cast kernel and an f32 copy per weight, and `ops::adamw_multi` / `ops::sum_of_squares` read
/// bf16 gradients as they are. A gradient with two contributions (tied weights) is summed in
/// the parameter's dtype. On by default (the multi-tensor kernels' bf16 path passed its device
/// tests on an H200); `PATCHLM_BF16_GRADS=0` also turns it off. With f32 compute nothing changes.
pub fn set_compute_dtype_grads(enabled: bool) {
    COMPUTE_GRADS.set(enabled);
}

/// Chooses the backward pass process-wide: `true` for the hand-written one of this module
/// (the default wherever [`tape_supported`]), `false` for candle's autograd. The default can also
/// be set with `PATCHLM_AUTOGRAD=1` (autograd).
pub fn set_tape_backward(enabled: bool) {
    TAPE.set(enabled);
}

/// Whether training on `device` uses [`Llama::forward_tape`] / [`Llama::backward_tape`]: where the
/// fused ops run (the tape is built from them) and unless turned off (see [`set_tape_backward`]).
pub fn tape_supported(device: &Device) -> bool {
    TAPE.get() && ops::fused_ops_supported(device)
}

/// One layer's weights in the compute dtype (cast once per forward pass, reused backward). The
/// query, key and value projections are stacked into one (D + 2·KVH·hd, D) matrix: one matmul
/// forward, two backward, instead of three and six; so are the gate and up projections where
/// the layout ops run ([`Mlp::Stacked`]).
struct LayerWeights {
    ln1: Tensor,
    qkv: Tensor,
    o: Tensor,
    ln2: Tensor,
    mlp: Mlp,
    down: Tensor,
}

/// The gate and up projections' weights, and (in the tape) their outputs.
enum Mlp {
    /// Stacked: weights (2F, D), outputs (N, 2F) = [gate | up] per row ([`ops::swiglu_packed`]).
    Stacked(Tensor),
    /// Apart: gate and up, each (F, D) / (N, F).
    Apart(Tensor, Tensor),
}

/// What the attention backward needs besides q, k, v.
enum Attn {
    /// The causal-softmax probabilities of each block of query rows (see [`attention_chunks`]):
    /// (B, H, r1 − r0, r1) for rows r0..r1 (one block: (B, H, T, T)).
    Probs(Vec<Tensor>),
    /// Flash attention's rows: each query row's log-sum-exp (B, H, T); its output is the layer
    /// tape's `y`, (N, D) rows ([`ops::flash_attention_lse_rows`]).
    Flash(Tensor),
}

/// The activations of one decoder layer, (N = B·T, ·) unless noted.
struct LayerTape {
    w: LayerWeights,
    x: Tensor,
    n1: Tensor,
    /// Rotated queries, rotated and repeated keys, repeated values: (B, H, T, hd).
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attn: Attn,
    y: Tensor,
    h: Tensor,
    n2: Tensor,
    /// The gate and up projections' outputs.
    gu: Mlp,
    s: Tensor,
}

/// The activations of one [`Llama::forward_tape`] pass, consumed by [`Llama::backward_tape`].
pub struct Tape {
    b: usize,
    t: usize,
    layers: Vec<LayerTape>,
    /// The input of the final norm (N, D).
    last: Tensor,
    /// The final norm's weight in the compute dtype.
    norm: Tensor,
    /// The LM head's weight in the compute dtype (cast with the decoder's weights, used by
    /// [`Llama::logits_tape`] and [`Llama::logits_backward`]).
    head: Tensor,
    /// The dtype of the input embeddings (the gradient is returned in it).
    input_dtype: DType,
}

/// `w` without its graph, in `dtype` (`to_dtype` to its own dtype is a cheap clone).
fn detached(w: &Tensor, dtype: DType) -> candle_core::Result<Tensor> {
    w.detach().to_dtype(dtype)
}

/// Adds `g` to the gradient of `name`: cast to `dtype` (the parameter's), or as computed when
/// [`set_compute_dtype_grads`] is on; a second contribution sums in `dtype`.
fn accumulate(grads: &mut Grads, name: String, g: Tensor, dtype: DType) -> candle_core::Result<()> {
    match grads.entry(name) {
        Entry::Occupied(mut e) => {
            let sum = (e.get().to_dtype(dtype)? + g.to_dtype(dtype)?)?;
            e.insert(sum);
        }
        Entry::Vacant(e) => {
            let keep = COMPUTE_GRADS.get() && matches!(g.dtype(), DType::F32 | DType::BF16);
            e.insert(if keep { g } else { g.to_dtype(dtype)? });
        }
    }
    Ok(())
}

/// SwiGLU's composed form `silu(g) · u` backward, with candle's formula for silu's derivative
/// (σ(g)·(1 + g·(1 − σ(g)))): the path where the fused SwiGLU kernel is off.
pub(crate) fn swiglu_composed_backward(g: &Tensor, u: &Tensor, dy: &Tensor) -> candle_core::Result<(Tensor, Tensor)> {
    let sig = (g.neg()?.exp()? + 1.0)?.recip()?;
    let dsilu = (&sig * (1.0 + (g * (1.0 - &sig)?)?)?)?;
    let dg = ((dy * u)? * dsilu)?;
    let du = (dy * g.silu()?)?;
    Ok((dg, du))
}

impl Llama {
    /// Token embeddings (B, N) → (B, N, D) without recording a graph (see [`Llama::embed`]).
    pub fn embed_tape(&self, ids: &Tensor) -> candle_core::Result<Tensor> {
        ops::embedding(&self.embed_tokens.embeddings().detach(), ids)
    }

    /// The mean of the token embeddings of each run of `k` consecutive ids, without recording a
    /// graph: ids (B, N·k) → (B, N, D), in one pass with no (B, N·k, D) intermediate (see
    /// [`ops::embedding_mean`]). `k` = 1 is [`Llama::embed_tape`].
    pub fn embed_mean_tape(&self, ids: &Tensor, k: usize) -> candle_core::Result<Tensor> {
        span("fwd.embedding", ids.device(), || ops::embedding_mean(&self.embed_tokens.embeddings().detach(), ids, k))
    }

    /// [`Llama::forward_embeds`] without recording a graph: input embeddings (B, T, D) → the
    /// final hidden states (B, T, D) in the compute dtype, and the [`Tape`] for
    /// [`Llama::backward_tape`]. Needs the fused ops ([`tape_supported`]).
    pub fn forward_tape(&self, x: &Tensor) -> candle_core::Result<(Tensor, Tape)> {
        let (b, t, d) = x.dims3()?;
        if t > self.cfg.max_position_embeddings {
            candle_core::bail!(
                "sequence of {t} positions exceeds max_position_embeddings {}",
                self.cfg.max_position_embeddings
            );
        }
        if !ops::fused_ops_supported(x.device()) {
            candle_core::bail!("forward_tape needs the fused ops on {:?}", x.device());
        }
        let cd = self.compute_dtype;
        let dev = x.device();
        let (weights, final_norm, head) = span("fwd.cast.weights", dev, || compute_weights(self, dev))?;
        // Each layer's output is carried as (h, delta) and added by the next norm's kernel
        // (ops::add_rms_norm).
        let mut carry = (x.detach().to_dtype(cd)?.reshape((b * t, d))?, None);
        let mut layers = Vec::with_capacity(self.layers.len());
        for (layer, w) in self.layers.iter().zip(weights) {
            let (h, delta, tape) = layer_forward(layer, w, &carry, &self.rope, b, t)?;
            layers.push(tape);
            carry = (h, Some(delta));
        }
        let (last, hidden) = span("fwd.norm", dev, || norm_of(&carry, &final_norm, self.norm.eps))?;
        Ok((hidden.reshape((b, t, d))?, Tape { b, t, layers, last, norm: final_norm, head, input_dtype: x.dtype() }))
    }

    /// The backward pass of [`Llama::forward_tape`]: from the gradient of the final hidden
    /// states (B, T, D), adds every decoder and final-norm weight's gradient to `grads` and
    /// returns the gradient of the input embeddings (B, T, D) in their dtype.
    pub fn backward_tape(&self, tape: Tape, dhidden: &Tensor, grads: &mut Grads) -> candle_core::Result<Tensor> {
        let (b, t) = (tape.b, tape.t);
        let d = self.cfg.hidden_size;
        let cd = self.compute_dtype;
        let dev = dhidden.device();
        let (mut dx, dwn) = span("bwd.norm", dev, || {
            let dh = dhidden.to_dtype(cd)?.reshape((b * t, d))?;
            grad::rms_norm(&tape.last, &tape.norm, &dh, self.norm.eps)
        })?;
        accumulate(grads, "model.norm.weight".into(), dwn, self.norm.weight.dtype())?;
        for (i, (layer, lt)) in self.layers.iter().zip(tape.layers).enumerate().rev() {
            dx = layer_backward(layer, lt, &dx, &self.rope, i, b, t, grads)?;
        }
        span("bwd.cast.input", dev, || dx.reshape((b, t, d))?.to_dtype(tape.input_dtype))
    }

    /// The LM head without recording a graph: hidden (B, T, D) from [`Llama::forward_tape`] →
    /// logits (B, T, V), with the head's weight as that pass cast it (`tape`).
    pub fn logits_tape(&self, hidden: &Tensor, tape: &Tape) -> candle_core::Result<Tensor> {
        let (b, t, d) = hidden.dims3()?;
        let w = head_weight(self, tape, hidden.dtype())?;
        span("fwd.matmul.head", hidden.device(), || {
            ops::matmul(&hidden.reshape((b * t, d))?, &w.t()?)?.reshape((b, t, ()))
        })
    }

    /// The LM head's backward pass: adds `lm_head.weight`'s gradient to `grads` (with tied
    /// embeddings, to `model.embed_tokens.weight`'s, summed with the embedding's) and returns the
    /// gradient of `hidden` (B, T, D). `tape` is the forward pass's, before
    /// [`Llama::backward_tape`] consumes it.
    pub fn logits_backward(
        &self,
        hidden: &Tensor,
        dlogits: &Tensor,
        tape: &Tape,
        grads: &mut Grads,
    ) -> candle_core::Result<Tensor> {
        let (b, t, d) = hidden.dims3()?;
        let v = self.cfg.vocab_size;
        let dev = hidden.device();
        let dl = dlogits.to_dtype(hidden.dtype())?.reshape((b * t, v))?;
        let w = head_weight(self, tape, hidden.dtype())?;
        let name = if self.cfg.tie_word_embeddings { "model.embed_tokens.weight" } else { "lm_head.weight" };
        let dw = span("bwd.matmul.head", dev, || ops::matmul(&dl.t()?, &hidden.reshape((b * t, d))?))?;
        accumulate(grads, name.into(), dw, w_dtype(self))?;
        span("bwd.matmul.head", dev, || ops::matmul(&dl, &w)?.reshape((b, t, d)))
    }

    /// The embedding's backward pass: scatters `dembeds` (B, N, D) onto the rows of `ids` (B, N)
    /// and adds the result to `model.embed_tokens.weight`'s gradient.
    pub fn embed_backward(&self, ids: &Tensor, dembeds: &Tensor, grads: &mut Grads) -> candle_core::Result<()> {
        self.embed_mean_backward(ids, 1, dembeds, grads)
    }

    /// [`Llama::embed_mean_tape`]'s backward pass: each id of `ids` (B, N·k) receives 1/k of its
    /// bag's row of `dmeans` (B, N, D), added to `model.embed_tokens.weight`'s gradient.
    pub fn embed_mean_backward(
        &self,
        ids: &Tensor,
        k: usize,
        dmeans: &Tensor,
        grads: &mut Grads,
    ) -> candle_core::Result<()> {
        let w = self.embed_tokens.embeddings();
        let g = span("bwd.embedding", ids.device(), || {
            grad::embedding_mean(ids, &dmeans.to_dtype(w.dtype())?, self.cfg.vocab_size, k)
        })?;
        accumulate(grads, "model.embed_tokens.weight".into(), g, w.dtype())
    }
}

/// The LM head's weight in `dtype`: the tape's copy where it has that dtype, else cast here.
fn head_weight(m: &Llama, tape: &Tape, dtype: DType) -> candle_core::Result<Tensor> {
    if tape.head.dtype() == dtype {
        Ok(tape.head.clone())
    } else {
        detached(&m.lm_head.weight, dtype)
    }
}

fn w_dtype(m: &Llama) -> DType {
    m.lm_head.weight.dtype()
}

/// A residual stream value `h + delta` (delta None: `h` alone) and its RMSNorm: (the sum, the
/// normalised sum), the add fused into the norm's pass.
fn norm_of(carry: &(Tensor, Option<Tensor>), w: &Tensor, eps: f64) -> candle_core::Result<(Tensor, Tensor)> {
    match carry {
        (h, Some(delta)) => ops::add_rms_norm(h, delta, w, eps),
        (h, None) => Ok((h.clone(), ops::rms_norm(h, w, eps)?)),
    }
}

/// Every layer's weights, the final norm's and the LM head's in the compute dtype, q/k/v and
/// (where the layout ops run) gate/up stacked: all cast by one [`ops::cast_groups`] call (one
/// kernel launch on CUDA).
fn compute_weights(
    m: &Llama,
    device: &candle_core::Device,
) -> candle_core::Result<(Vec<LayerWeights>, Tensor, Tensor)> {
    let stacked = ops::layout_ops_supported(device) && ops::swiglu_supported(device);
    let mut groups: Vec<Vec<&Tensor>> = Vec::new();
    for l in &m.layers {
        let (a, mlp) = (&l.self_attn, &l.mlp);
        groups.push(vec![&l.input_layernorm.weight]);
        groups.push(vec![&a.q_proj.weight, &a.k_proj.weight, &a.v_proj.weight]);
        groups.push(vec![&a.o_proj.weight]);
        groups.push(vec![&l.post_attention_layernorm.weight]);
        if stacked {
            groups.push(vec![&mlp.gate_proj.weight, &mlp.up_proj.weight]);
        } else {
            groups.push(vec![&mlp.gate_proj.weight]);
            groups.push(vec![&mlp.up_proj.weight]);
        }
        groups.push(vec![&mlp.down_proj.weight]);
    }
    groups.push(vec![&m.norm.weight]);
    groups.push(vec![&m.lm_head.weight]);
    let refs: Vec<&[&Tensor]> = groups.iter().map(|g| g.as_slice()).collect();
    let mut cast = ops::cast_groups(&refs, m.compute_dtype)?.into_iter();
    let mut next = || cast.next().ok_or_else(|| candle_core::Error::Msg("cast_groups: a group went missing".into()));
    let mut layers = Vec::with_capacity(m.layers.len());
    for _ in &m.layers {
        let (ln1, qkv, o, ln2) = (next()?, next()?, next()?, next()?);
        let mlp = if stacked { Mlp::Stacked(next()?) } else { Mlp::Apart(next()?, next()?) };
        layers.push(LayerWeights { ln1, qkv, o, ln2, mlp, down: next()? });
    }
    Ok((layers, next()?, next()?))
}

/// One decoder layer with its weights `w` on the residual stream `carry` (see [`norm_of`]):
/// returns the stream after attention `h`, the MLP's output (to be added to `h` by the next norm)
/// and the layer's tape.
fn layer_forward(
    l: &DecoderLayer,
    w: LayerWeights,
    carry: &(Tensor, Option<Tensor>),
    rope: &Rope,
    b: usize,
    t: usize,
) -> candle_core::Result<(Tensor, Tensor, LayerTape)> {
    let a = &l.self_attn;
    let (n, d) = carry.0.dims2()?;
    let dev = carry.0.device();
    let (x, n1) = span("fwd.norm", dev, || norm_of(carry, &w.ln1, l.input_layernorm.eps))?;
    let qkv = span("fwd.matmul.qkv", dev, || ops::matmul(&n1, &w.qkv.t()?))?;
    let (cos, sin) = (rope.cos.narrow(0, 0, t)?, rope.sin.narrow(0, 0, t)?);
    let fused_heads = ops::layout_ops_supported(x.device());
    let (q, k, v) = span("fwd.layout.heads_rope", dev, || heads_in(a, &qkv, &cos, &sin, fused_heads, b, t))?;
    let (k, v) = (a.repeat_kv(k)?, a.repeat_kv(v)?);
    let scale = 1.0 / (a.head_dim as f64).sqrt();
    let (yh, attn) = span("fwd.attention", dev, || attention_forward(&q, &k, &v, scale, t))?;
    let y = match &attn {
        // Flash attention writes its output as rows already.
        Attn::Flash(_) => yh.reshape((n, ()))?,
        Attn::Probs(_) => span("fwd.layout.heads_out", dev, || {
            if fused_heads {
                ops::rows_from_heads(&yh, None, heads_layout(a, b, t, 0), None)
            } else {
                yh.transpose(1, 2)?.reshape((n, d))
            }
        })?,
    };
    let o = span("fwd.matmul.o", dev, || ops::matmul(&y, &w.o.t()?))?;
    let (h, n2) = span("fwd.norm", dev, || ops::add_rms_norm(&x, &o, &w.ln2, l.post_attention_layernorm.eps))?;
    let (gu, s) = match &w.mlp {
        Mlp::Stacked(wgu) => {
            let gu = span("fwd.matmul.gate_up", dev, || ops::matmul(&n2, &wgu.t()?))?;
            let s = span("fwd.swiglu", dev, || ops::swiglu_packed(&gu))?;
            (Mlp::Stacked(gu), s)
        }
        Mlp::Apart(wg, wu) => {
            let (g, u) =
                span("fwd.matmul.gate_up", dev, || Ok((ops::matmul(&n2, &wg.t()?)?, ops::matmul(&n2, &wu.t()?)?)))?;
            let s = span("fwd.swiglu", dev, || {
                if ops::swiglu_supported(x.device()) {
                    ops::swiglu(&g, &u)
                } else {
                    g.silu()? * &u
                }
            })?;
            (Mlp::Apart(g, u), s)
        }
    };
    let delta = span("fwd.matmul.down", dev, || ops::matmul(&s, &w.down.t()?))?;
    Ok((h.clone(), delta, LayerTape { w, x, n1, q, k, v, attn, y, h, n2, gu, s }))
}

/// The rows of the stacked q/k/v projection (N, D + 2·KVD) as heads (B, heads, T, hd), rotary
/// embeddings applied to q and k.
fn heads_in(
    a: &crate::llama::Attention,
    qkv: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    fused_heads: bool,
    b: usize,
    t: usize,
) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
    let (hq, hkv) = (a.heads, a.kv_heads);
    Ok(if fused_heads {
        let (q, kv) = ops::heads_from_rows(qkv, heads_layout(a, b, t, hkv), Some((cos, sin)))?;
        let (k, v) = kv.ok_or_else(|| candle_core::Error::Msg("heads_from_rows: no key/value heads".into()))?;
        (q, k, v)
    } else {
        // (B, T, heads, hd) slices → (B, heads, T, hd), one strided copy each.
        let qkv = qkv.reshape((b, t, hq + 2 * hkv, a.head_dim))?;
        let heads = |from: usize, h: usize| qkv.narrow(2, from, h)?.transpose(1, 2)?.contiguous();
        let q = ops::rope(&heads(0, hq)?, cos, sin)?;
        let k = ops::rope(&heads(hq, hkv)?, cos, sin)?;
        (q, k, heads(hq + hkv, hkv)?)
    })
}

/// Causal attention of heads (B, H, T, hd) → the output and what the backward pass needs: flash
/// attention where [`ops::flash_attention_for`] says so, its output as rows (B, T, H·hd), else
/// softmax attention in blocks of query rows, its output as heads (B, H, T, hd).
fn attention_forward(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64, t: usize) -> candle_core::Result<(Tensor, Attn)> {
    if ops::flash_attention_for(q.device(), q.dtype(), q.dim(3)?) {
        let (y, lse) = ops::flash_attention_lse_rows(q, k, v, scale)?;
        return Ok((y, Attn::Flash(lse)));
    }
    // Query rows in blocks, each against the keys up to its last row only: the blocks above
    // the diagonal (all masked) are never computed. kᵀ as a transposed view: cuBLAS and the
    // CPU gemm read it in place.
    let mut ys = Vec::new();
    let mut probs = Vec::new();
    for (r0, r1) in chunk_bounds(t, attention_chunks(t)) {
        let qc = q.narrow(2, r0, r1 - r0)?;
        let p = ops::causal_softmax(&ops::batched_matmul(&qc, &k.narrow(2, 0, r1)?.t()?)?, scale)?;
        ys.push(ops::batched_matmul(&p, &v.narrow(2, 0, r1)?)?);
        probs.push(p);
    }
    let yh = if ys.len() == 1 { ys.remove(0) } else { Tensor::cat(&ys, 2)? };
    Ok((yh, Attn::Probs(probs)))
}

/// The [`ops::HeadsLayout`] of a layer's attention over (B, T) with `kv_heads` key/value heads
/// (0: the query heads alone).
fn heads_layout(a: &crate::llama::Attention, b: usize, t: usize, kv_heads: usize) -> ops::HeadsLayout {
    ops::HeadsLayout { batch: b, seq: t, heads: a.heads, kv_heads, head_dim: a.head_dim }
}

static CHUNKS: AtomicUsize = AtomicUsize::new(0);

/// Sets how many blocks of query rows the softmax attention of [`Llama::forward_tape`] runs in
/// (each block against the keys up to its last row, so the all-masked blocks above the diagonal
/// are never computed: with C equal blocks, (C + 1) / 2C of the T×T work and memory). 0 (the
/// default) chooses by length: T / 512 blocks, at least 1 and at most 4; `PATCHLM_ATTENTION_CHUNKS`
/// sets it too (1: one block, the full T×T). The result is the same either way.
pub fn set_attention_chunks(chunks: usize) {
    CHUNKS.store(chunks, Ordering::Relaxed);
}

/// The number of query blocks for `t` positions (see [`set_attention_chunks`]).
fn attention_chunks(t: usize) -> usize {
    static ENV: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    let set = match CHUNKS.load(Ordering::Relaxed) {
        0 => *ENV
            .get_or_init(|| std::env::var("PATCHLM_ATTENTION_CHUNKS").ok().and_then(|v| v.parse().ok()).unwrap_or(0)),
        n => n,
    };
    let n = if set == 0 { (t / 512).clamp(1, 4) } else { set };
    n.clamp(1, t.max(1))
}

/// `chunks` blocks of rows 0..t as (first, end), sizes differing by at most one.
fn chunk_bounds(t: usize, chunks: usize) -> Vec<(usize, usize)> {
    (0..chunks).map(|i| (i * t / chunks, (i + 1) * t / chunks)).collect()
}

/// `acc` (…, t, hd) plus `part` (…, r, hd) on its first r positions (`acc` None: `part` padded
/// with zeros to t).
fn add_prefix(acc: Option<Tensor>, part: Tensor, t: usize) -> candle_core::Result<Tensor> {
    let r = part.dim(2)?;
    let part = if r < t { part.pad_with_zeros(2, 0, t - r)? } else { part };
    match acc {
        Some(a) => a + part,
        None => Ok(part),
    }
}

/// Sums the gradient of repeated key/value heads (B, H, T, hd) back onto (B, KVH, T, hd).
fn unrepeat(x: Tensor, kv_heads: usize) -> candle_core::Result<Tensor> {
    let (b, h, t, hd) = x.dims4()?;
    if h == kv_heads {
        return Ok(x);
    }
    x.reshape((b, kv_heads, h / kv_heads, t, hd))?.sum(2)
}

/// The backward pass of [`attention_forward`]: from the layer's tape and the gradient of its
/// output (heads for softmax attention, rows (B, T, H·hd) for flash attention) → (dq, dk, dv) on
/// the (repeated) heads.
fn attention_backward(
    lt: &LayerTape,
    dyh: &Tensor,
    scale: f64,
    t: usize,
) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
    match &lt.attn {
        // (Profiled as one span; flash attention's backward times its passes apart, as
        // `bwd.attention.*`.)
        Attn::Probs(ps) => span("bwd.attention", dyh.device(), || {
            // Block by block (see the forward pass); key and value gradients of a block cover
            // positions 0..r1 and add up over the blocks, query gradients are disjoint.
            let bounds = chunk_bounds(t, ps.len());
            let (mut dqs, mut dk, mut dv) = (Vec::new(), None, None);
            for (&(r0, r1), p) in bounds.iter().zip(ps).rev() {
                let dyc = dyh.narrow(2, r0, r1 - r0)?;
                let dp = ops::batched_matmul(&dyc, &lt.v.narrow(2, 0, r1)?.t()?)?;
                dv = Some(add_prefix(dv, ops::batched_matmul(&p.t()?, &dyc)?, t)?);
                let ds = grad::causal_softmax(p, &dp, scale)?;
                dqs.push(ops::batched_matmul(&ds, &lt.k.narrow(2, 0, r1)?)?);
                dk = Some(add_prefix(dk, ops::batched_matmul(&ds.t()?, &lt.q.narrow(2, r0, r1 - r0)?)?, t)?);
            }
            dqs.reverse();
            let dq = if dqs.len() == 1 { dqs.remove(0) } else { Tensor::cat(&dqs, 2)? };
            let missing = || candle_core::Error::Msg("backward_tape: attention saved no blocks".into());
            Ok((dq, dk.ok_or_else(missing)?, dv.ok_or_else(missing)?))
        }),
        Attn::Flash(lse) => {
            let (b, t, d) = dyh.dims3()?;
            grad::flash_attention_lse(&lt.q, &lt.k, &lt.v, &lt.y.reshape((b, t, d))?, lse, dyh, scale)
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn layer_backward(
    l: &DecoderLayer,
    lt: LayerTape,
    dout: &Tensor,
    rope: &Rope,
    i: usize,
    b: usize,
    t: usize,
    grads: &mut Grads,
) -> candle_core::Result<Tensor> {
    let a = &l.self_attn;
    let (n, d) = dout.dims2()?;
    let hd = a.head_dim;
    let pdt = a.q_proj.weight.dtype();
    let w = &lt.w;
    let name = |s: &str| format!("model.layers.{i}.{s}.weight");
    let mut acc = |s: &str, g: Tensor| accumulate(grads, name(s), g, pdt);
    let dev = dout.device();
    // MLP: out = h + down(swiglu(gate(n2), up(n2))).
    acc("mlp.down_proj", span("bwd.matmul.down", dev, || ops::matmul(&dout.t()?, &lt.s))?)?;
    let ds = span("bwd.matmul.down", dev, || ops::matmul(dout, &w.down))?;
    let dn2 = match (&lt.gu, &w.mlp) {
        (Mlp::Stacked(gu), Mlp::Stacked(wgu)) => {
            // [dg | du] (N, 2F): one matmul for both weight gradients, one for dn2.
            let dgu = span("bwd.swiglu", dev, || grad::swiglu_packed(gu, &ds))?;
            let dw = span("bwd.matmul.gate_up", dev, || ops::matmul(&dgu.t()?, &lt.n2))?;
            let f = dw.dim(0)? / 2;
            acc("mlp.gate_proj", dw.narrow(0, 0, f)?)?;
            acc("mlp.up_proj", dw.narrow(0, f, f)?)?;
            span("bwd.matmul.gate_up", dev, || ops::matmul(&dgu, wgu))?
        }
        (Mlp::Apart(g, u), Mlp::Apart(wg, wu)) => {
            let (dg, du) = span("bwd.swiglu", dev, || {
                if ops::swiglu_supported(dout.device()) {
                    grad::swiglu(g, u, &ds)
                } else {
                    swiglu_composed_backward(g, u, &ds)
                }
            })?;
            acc("mlp.gate_proj", span("bwd.matmul.gate_up", dev, || ops::matmul(&dg.t()?, &lt.n2))?)?;
            acc("mlp.up_proj", span("bwd.matmul.gate_up", dev, || ops::matmul(&du.t()?, &lt.n2))?)?;
            span("bwd.matmul.gate_up", dev, || ops::matmul(&dg, wg)? + ops::matmul(&du, wu)?)?
        }
        _ => candle_core::bail!("backward_tape: the tape's gate/up layout changed between passes"),
    };
    // The stream after attention feeds the MLP's norm and the output directly.
    let (dh, dln2) =
        span("bwd.norm", dev, || grad::rms_norm_residual(&lt.h, &w.ln2, &dn2, dout, l.post_attention_layernorm.eps))?;
    acc("post_attention_layernorm", dln2)?;
    // Attention: h = x + o(attn(rope(q(n1)), rope(k(n1)), v(n1))).
    acc("self_attn.o_proj", span("bwd.matmul.o", dev, || ops::matmul(&dh.t()?, &lt.y))?)?;
    let fused_heads = ops::layout_ops_supported(dout.device());
    let dy = span("bwd.matmul.o", dev, || ops::matmul(&dh, &w.o))?;
    let dyh = match &lt.attn {
        // Flash attention reads the gradient as rows.
        Attn::Flash(_) => dy.reshape((b, t, a.heads * hd))?,
        Attn::Probs(_) => span("bwd.layout.heads_out", dev, || {
            if fused_heads {
                Ok(ops::heads_from_rows(&dy, heads_layout(a, b, t, 0), None)?.0)
            } else {
                dy.reshape((b, t, a.heads, hd))?.transpose(1, 2)?.contiguous()
            }
        })?,
    };
    let scale = 1.0 / (hd as f64).sqrt();
    let (dq, dk, dv) = attention_backward(&lt, &dyh, scale, t)?;
    let (cos, sin) = (rope.cos.narrow(0, 0, t)?, rope.sin.narrow(0, 0, t)?);
    // (B, H + 2·KVH, T, hd) → (N, D + 2·KVD), the layout of the stacked projection's output.
    let dqkv = span("bwd.layout.heads_rope", dev, || {
        let (dk, dv) = (unrepeat(dk, a.kv_heads)?, unrepeat(dv, a.kv_heads)?);
        if fused_heads {
            ops::rows_from_heads(&dq, Some((&dk, &dv)), heads_layout(a, b, t, a.kv_heads), Some((&cos, &sin)))
        } else {
            let dq = grad::rope(&dq, &cos, &sin)?;
            let dk = grad::rope(&dk, &cos, &sin)?;
            Tensor::cat(&[&dq, &dk, &dv], 1)?.transpose(1, 2)?.reshape((n, ()))
        }
    })?;
    let dw = span("bwd.matmul.qkv", dev, || ops::matmul(&dqkv.t()?, &lt.n1))?;
    let (dq_rows, dkv_rows) = (a.heads * hd, a.kv_heads * hd);
    acc("self_attn.q_proj", dw.narrow(0, 0, dq_rows)?)?;
    acc("self_attn.k_proj", dw.narrow(0, dq_rows, dkv_rows)?)?;
    acc("self_attn.v_proj", dw.narrow(0, dq_rows + dkv_rows, dkv_rows)?)?;
    let dn1 = span("bwd.matmul.qkv", dev, || ops::matmul(&dqkv, &w.qkv))?;
    let (dx, dln1) =
        span("bwd.norm", dev, || grad::rms_norm_residual(&lt.x, &w.ln1, &dn1, &dh, l.input_layernorm.eps))?;
    acc("input_layernorm", dln1)?;
    debug_assert_eq!(dx.dims(), [n, d]);
    Ok(dx)
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Tensor, Var};

    /// The composed SwiGLU backward against autograd through `silu(g) · u`.
    #[test]
    fn composed_swiglu_backward_matches_autograd() {
        let dev = Device::Cpu;
        let g = Var::from_tensor(&Tensor::randn(0f32, 2.0, (7, 33), &dev).unwrap()).unwrap();
        let u = Var::from_tensor(&Tensor::randn(0f32, 1.0, (7, 33), &dev).unwrap()).unwrap();
        let dy = Tensor::randn(0f32, 1.0, (7, 33), &dev).unwrap();
        let y = (g.as_tensor().silu().unwrap() * u.as_tensor()).unwrap();
        let store = (y * &dy).unwrap().sum_all().unwrap().backward().unwrap();
        let (dg, du) = super::swiglu_composed_backward(g.as_tensor(), u.as_tensor(), &dy).unwrap();
        for (got, want) in [(dg, store.get(g.as_tensor()).unwrap()), (du, store.get(u.as_tensor()).unwrap())] {
            let e = (got - want).unwrap().abs().unwrap().max_all().unwrap().to_dtype(DType::F32).unwrap();
            assert!(e.to_scalar::<f32>().unwrap() < 1e-6);
        }
    }
}
