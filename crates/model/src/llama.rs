//! The LLaMA-style decoder, built only from differentiable candle ops.
//!
//! candle's fused `softmax_last_dim`, `rms_norm`, `layer_norm` and `rope` kernels have no backward
//! and silently cut the graph, so every block here is either composed from basic ops that do, or
//! uses this crate's own fused ops ([`crate::ops`]: RMSNorm, RoPE, causal softmax) that carry
//! their backward pass; the composed form stays as the reference and the fallback.

use candle_core::{DType, Device, IndexOp, Module, Tensor, D};
use candle_nn::{Embedding, VarBuilder};

use crate::config::ModelConfig;
use crate::error::Result;

/// RMSNorm as in HF LLaMA: statistics in f32, `weight * x / sqrt(mean(x²) + eps)`.
#[derive(Debug, Clone)]
pub struct RmsNorm {
    pub(crate) weight: Tensor,
    pub(crate) eps: f64,
}

impl RmsNorm {
    /// Loads `weight` of shape (size,).
    pub fn new(vb: VarBuilder, size: usize, eps: f64) -> Result<Self> {
        Ok(Self { weight: vb.get_with_hints(size, "weight", candle_nn::Init::Const(1.0))?, eps })
    }
}

impl RmsNorm {
    /// The same norm from composed candle ops: the path on devices without the fused op, and
    /// the reference the fused op is tested against.
    pub fn forward_composed(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let dtype = x.dtype();
        let xf = x.to_dtype(DType::F32)?;
        let var = xf.sqr()?.mean_keepdim(D::Minus1)?;
        let normed = xf.broadcast_mul(&(var + self.eps)?.sqrt()?.recip()?)?;
        normed.to_dtype(dtype)?.broadcast_mul(&self.weight.to_dtype(dtype)?)
    }
}

impl Module for RmsNorm {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        if crate::ops::fused_ops_supported(x.device()) {
            crate::ops::rms_norm(x, &self.weight.to_dtype(x.dtype())?, self.eps)
        } else {
            self.forward_composed(x)
        }
    }
}

/// Softmax over the last dimension from basic ops (max-shifted, in the input dtype).
pub fn softmax_last_dim(x: &Tensor) -> candle_core::Result<Tensor> {
    let m = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&m)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
}

/// Rotary tables in HF's rotate-half layout: `cos`, `sin` of shape (max_pos, head_dim).
#[derive(Debug, Clone)]
pub struct Rope {
    pub(crate) cos: Tensor,
    pub(crate) sin: Tensor,
}

impl Rope {
    /// Tables for `cfg.max_position_embeddings` positions.
    pub fn new(cfg: &ModelConfig, device: &Device) -> Result<Self> {
        let hd = cfg.head_dim();
        let mut inv: Vec<f32> =
            (0..hd / 2).map(|i| 1.0 / (cfg.rope_theta as f32).powf((2 * i) as f32 / hd as f32)).collect();
        if let Some(s) = &cfg.rope_scaling {
            s.apply(&mut inv);
        }
        let t = cfg.max_position_embeddings;
        let mut cos = Vec::with_capacity(t * hd);
        let mut sin = Vec::with_capacity(t * hd);
        for p in 0..t {
            // cat(freqs, freqs): both halves of the head use the same frequencies.
            for _ in 0..2 {
                for &f in &inv {
                    let a = p as f32 * f;
                    cos.push(a.cos());
                    sin.push(a.sin());
                }
            }
        }
        Ok(Self { cos: Tensor::from_vec(cos, (t, hd), device)?, sin: Tensor::from_vec(sin, (t, hd), device)? })
    }

    /// Applies RoPE to `x` of shape (B, H, T, hd) for positions `offset..offset+T`.
    /// Uses the fused op ([`crate::ops::rope`]) where the device has it, else [`Rope::apply_composed`].
    pub fn apply(&self, x: &Tensor, offset: usize) -> candle_core::Result<Tensor> {
        if crate::ops::fused_ops_supported(x.device()) {
            let t = x.dim(2)?;
            return crate::ops::rope(x, &self.cos.narrow(0, offset, t)?, &self.sin.narrow(0, offset, t)?);
        }
        self.apply_composed(x, offset)
    }

    /// [`Rope::apply`] from basic candle ops (the reference the fused op is tested against).
    pub fn apply_composed(&self, x: &Tensor, offset: usize) -> candle_core::Result<Tensor> {
        let (_, _, t, hd) = x.dims4()?;
        let cos = self.cos.narrow(0, offset, t)?.to_dtype(x.dtype())?;
        let sin = self.sin.narrow(0, offset, t)?.to_dtype(x.dtype())?;
        let x1 = x.narrow(D::Minus1, 0, hd / 2)?;
        let x2 = x.narrow(D::Minus1, hd / 2, hd / 2)?;
        let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
        x.broadcast_mul(&cos)? + rotated.broadcast_mul(&sin)?
    }
}

/// Grouped-query causal self-attention with q/k/v/o projections and no biases.
#[derive(Debug, Clone)]
pub struct Attention {
    pub(crate) q_proj: Linear,
    pub(crate) k_proj: Linear,
    pub(crate) v_proj: Linear,
    pub(crate) o_proj: Linear,
    pub(crate) heads: usize,
    pub(crate) kv_heads: usize,
    pub(crate) head_dim: usize,
}

/// A bias-free linear layer whose (f32 master) weight is cast to the input's dtype on use, so
/// that a bf16 forward pass trains f32 parameters (the cast is differentiable).
#[derive(Debug, Clone)]
pub struct Linear {
    pub(crate) weight: Tensor,
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let w = if self.weight.dtype() == x.dtype() { self.weight.clone() } else { self.weight.to_dtype(x.dtype())? };
        candle_nn::Linear::new(w, None).forward(x)
    }
}

fn linear(vb: VarBuilder, i: usize, o: usize) -> Result<Linear> {
    Ok(Linear { weight: vb.get((o, i), "weight")? })
}

impl Attention {
    /// Loads `q_proj`, `k_proj`, `v_proj`, `o_proj` under `vb`.
    pub fn new(vb: VarBuilder, cfg: &ModelConfig) -> Result<Self> {
        let (d, hd) = (cfg.hidden_size, cfg.head_dim());
        let kvd = cfg.num_key_value_heads * hd;
        Ok(Self {
            q_proj: linear(vb.pp("q_proj"), d, d)?,
            k_proj: linear(vb.pp("k_proj"), d, kvd)?,
            v_proj: linear(vb.pp("v_proj"), d, kvd)?,
            o_proj: linear(vb.pp("o_proj"), d, d)?,
            heads: cfg.num_attention_heads,
            kv_heads: cfg.num_key_value_heads,
            head_dim: hd,
        })
    }

    pub(crate) fn repeat_kv(&self, x: Tensor) -> candle_core::Result<Tensor> {
        let rep = self.heads / self.kv_heads;
        if rep == 1 {
            return Ok(x);
        }
        let (b, kvh, t, hd) = x.dims4()?;
        x.unsqueeze(2)?.expand((b, kvh, rep, t, hd))?.reshape((b, kvh * rep, t, hd))
    }

    /// `x`: (B, T, D) → (B, T, D). With a cache entry, attends to the cached keys/values too.
    pub fn forward(
        &self,
        x: &Tensor,
        rope: &Rope,
        offset: usize,
        cache: Option<&mut Option<(Tensor, Tensor)>>,
    ) -> candle_core::Result<Tensor> {
        let (b, t, d) = x.dims3()?;
        let q = self.q_proj.forward(x)?.reshape((b, t, self.heads, self.head_dim))?.transpose(1, 2)?.contiguous()?;
        let k = self.k_proj.forward(x)?.reshape((b, t, self.kv_heads, self.head_dim))?.transpose(1, 2)?.contiguous()?;
        let v = self.v_proj.forward(x)?.reshape((b, t, self.kv_heads, self.head_dim))?.transpose(1, 2)?.contiguous()?;
        let q = rope.apply(&q, offset)?;
        let mut k = rope.apply(&k, offset)?;
        let mut v = v;
        if let Some(entry) = cache {
            if let Some((pk, pv)) = entry.as_ref() {
                k = Tensor::cat(&[pk, &k], 2)?;
                v = Tensor::cat(&[pv, &v], 2)?;
            }
            *entry = Some((k.clone(), v.clone()));
        }
        let total = k.dim(2)?;
        let k = self.repeat_kv(k)?;
        let v = self.repeat_kv(v)?;
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        if crate::ops::flash_attention_for(x.device(), q.dtype(), self.head_dim) {
            let y = crate::ops::flash_attention(&q, &k, &v, scale)?.transpose(1, 2)?.reshape((b, t, d))?;
            return self.o_proj.forward(&y);
        }
        let scores = q.matmul(&k.t()?.contiguous()?)?;
        let probs = if crate::ops::fused_ops_supported(x.device()) {
            // Scale, causal mask and softmax in one pass, statistics in f32.
            crate::ops::causal_softmax(&scores, scale)?
        } else {
            let scores = (scores * scale)?;
            let scores =
                if t > 1 { scores.broadcast_add(&causal_mask(t, total, x.device(), scores.dtype())?)? } else { scores };
            softmax_last_dim(&scores.to_dtype(DType::F32)?)?.to_dtype(v.dtype())?
        };
        let y = probs.matmul(&v)?.transpose(1, 2)?.reshape((b, t, d))?;
        self.o_proj.forward(&y)
    }
}

/// (t, total) additive mask: query i (at position total - t + i) sees keys 0..=total - t + i.
fn causal_mask(t: usize, total: usize, device: &Device, dtype: DType) -> candle_core::Result<Tensor> {
    let off = total - t;
    let m: Vec<f32> =
        (0..t).flat_map(|i| (0..total).map(move |j| if j > off + i { f32::NEG_INFINITY } else { 0.0 })).collect();
    Tensor::from_vec(m, (t, total), device)?.to_dtype(dtype)
}

/// SwiGLU MLP: `down(silu(gate(x)) * up(x))`.
#[derive(Debug, Clone)]
pub struct Mlp {
    pub(crate) gate_proj: Linear,
    pub(crate) up_proj: Linear,
    pub(crate) down_proj: Linear,
}

impl Mlp {
    /// Loads `gate_proj`, `up_proj`, `down_proj` under `vb`.
    pub fn new(vb: VarBuilder, cfg: &ModelConfig) -> Result<Self> {
        let (d, f) = (cfg.hidden_size, cfg.intermediate_size);
        Ok(Self {
            gate_proj: linear(vb.pp("gate_proj"), d, f)?,
            up_proj: linear(vb.pp("up_proj"), d, f)?,
            down_proj: linear(vb.pp("down_proj"), f, d)?,
        })
    }
}

impl Module for Mlp {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (g, u) = (self.gate_proj.forward(x)?, self.up_proj.forward(x)?);
        if crate::ops::swiglu_supported(x.device()) {
            return self.down_proj.forward(&crate::ops::swiglu(&g, &u)?);
        }
        // candle-core's silu has a backward pass (unlike candle-nn's fused kernels).
        self.down_proj.forward(&(g.silu()? * u)?)
    }
}

/// One pre-norm decoder layer.
#[derive(Debug, Clone)]
pub struct DecoderLayer {
    pub(crate) input_layernorm: RmsNorm,
    pub(crate) self_attn: Attention,
    pub(crate) post_attention_layernorm: RmsNorm,
    pub(crate) mlp: Mlp,
}

impl DecoderLayer {
    /// Loads a layer under `vb` (`model.layers.{i}`).
    pub fn new(vb: VarBuilder, cfg: &ModelConfig) -> Result<Self> {
        Ok(Self {
            input_layernorm: RmsNorm::new(vb.pp("input_layernorm"), cfg.hidden_size, cfg.rms_norm_eps)?,
            self_attn: Attention::new(vb.pp("self_attn"), cfg)?,
            post_attention_layernorm: RmsNorm::new(
                vb.pp("post_attention_layernorm"),
                cfg.hidden_size,
                cfg.rms_norm_eps,
            )?,
            mlp: Mlp::new(vb.pp("mlp"), cfg)?,
        })
    }

    fn forward(
        &self,
        x: &Tensor,
        rope: &Rope,
        offset: usize,
        cache: Option<&mut Option<(Tensor, Tensor)>>,
    ) -> candle_core::Result<Tensor> {
        let h = (x + self.self_attn.forward(&self.input_layernorm.forward(x)?, rope, offset, cache)?)?;
        &h + self.mlp.forward(&self.post_attention_layernorm.forward(&h)?)?
    }
}

/// Keys and values of earlier positions, for incremental decoding.
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
    len: usize,
}

impl KvCache {
    /// An empty cache for `cfg`.
    pub fn new(cfg: &ModelConfig) -> Self {
        Self { layers: vec![None; cfg.num_hidden_layers], len: 0 }
    }

    /// Positions already cached.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// `LlamaForCausalLM`: embedding, decoder layers, final norm, LM head (its own weight, or the
/// embedding's when `tie_word_embeddings`). Knows nothing of
/// patches: the patch crate feeds its own input embeddings through [`Llama::forward_embeds`].
#[derive(Debug, Clone)]
pub struct Llama {
    pub(crate) embed_tokens: Embedding,
    pub(crate) layers: Vec<DecoderLayer>,
    pub(crate) norm: RmsNorm,
    pub(crate) lm_head: Linear,
    pub(crate) rope: Rope,
    pub(crate) cfg: ModelConfig,
    pub(crate) compute_dtype: DType,
}

impl Llama {
    /// Builds the model from `vb` with HF weight names (`model.embed_tokens.weight`, ...,
    /// `lm_head.weight`; no `lm_head.weight` is read or made when the embeddings are tied).
    pub fn new(vb: VarBuilder, cfg: &ModelConfig) -> Result<Self> {
        cfg.validate()?;
        let m = vb.pp("model");
        let embed_tokens =
            Embedding::new(m.pp("embed_tokens").get((cfg.vocab_size, cfg.hidden_size), "weight")?, cfg.hidden_size);
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| DecoderLayer::new(m.pp("layers").pp(i), cfg))
            .collect::<Result<Vec<_>>>()?;
        let norm = RmsNorm::new(m.pp("norm"), cfg.hidden_size, cfg.rms_norm_eps)?;
        let lm_head = if cfg.tie_word_embeddings {
            Linear { weight: embed_tokens.embeddings().clone() }
        } else {
            linear(vb.pp("lm_head"), cfg.hidden_size, cfg.vocab_size)?
        };
        let rope = Rope::new(cfg, vb.device())?;
        Ok(Self { embed_tokens, layers, norm, lm_head, rope, cfg: cfg.clone(), compute_dtype: vb.dtype() })
    }

    /// Mixed precision: activations and matmuls in `dtype` (e.g. bf16) while the parameters keep
    /// their own dtype (f32 master weights, cast on use); norm statistics, attention softmax and
    /// the loss stay in f32. The default is the parameters' dtype.
    pub fn with_compute_dtype(mut self, dtype: DType) -> Self {
        self.compute_dtype = dtype;
        self
    }

    /// The same model with every weight detached from autograd (sharing their storage, so later
    /// optimizer steps show through): its forward passes record no graph and keep no
    /// activations alive for a backward pass. For validation inside a training loop.
    pub fn detach(&self) -> Self {
        let mut m = self.clone();
        m.embed_tokens = Embedding::new(self.embed_tokens.embeddings().detach(), self.cfg.hidden_size);
        for l in &mut m.layers {
            for w in [
                &mut l.input_layernorm.weight,
                &mut l.post_attention_layernorm.weight,
                &mut l.self_attn.q_proj.weight,
                &mut l.self_attn.k_proj.weight,
                &mut l.self_attn.v_proj.weight,
                &mut l.self_attn.o_proj.weight,
                &mut l.mlp.gate_proj.weight,
                &mut l.mlp.up_proj.weight,
                &mut l.mlp.down_proj.weight,
            ] {
                *w = w.detach();
            }
        }
        m.norm.weight = m.norm.weight.detach();
        m.lm_head.weight = m.lm_head.weight.detach();
        m
    }

    /// The dtype of activations and matmuls.
    pub fn compute_dtype(&self) -> DType {
        self.compute_dtype
    }

    /// The configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// Token embeddings: ids (B, N) → (B, N, D).
    pub fn embed(&self, ids: &Tensor) -> candle_core::Result<Tensor> {
        if ids.dtype() == DType::U32 && crate::ops::fused_ops_supported(ids.device()) {
            return crate::ops::embedding(self.embed_tokens.embeddings(), ids);
        }
        self.embed_tokens.forward(ids)
    }

    /// Runs the decoder on input embeddings (B, T, D) at positions 0..T-1; returns the final
    /// hidden states (B, T, D) after the final norm.
    pub fn forward_embeds(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let t = x.dim(1)?;
        if t > self.cfg.max_position_embeddings {
            candle_core::bail!(
                "sequence of {t} positions exceeds max_position_embeddings {}",
                self.cfg.max_position_embeddings
            );
        }
        let mut h = x.to_dtype(self.compute_dtype)?;
        for layer in &self.layers {
            h = layer.forward(&h, &self.rope, 0, None)?;
        }
        self.norm.forward(&h)
    }

    /// LM head: hidden (B, T, D) → logits (B, T, V).
    pub fn logits(&self, hidden: &Tensor) -> candle_core::Result<Tensor> {
        self.lm_head.forward(hidden)
    }

    /// ids (B, T) → logits (B, T, V).
    pub fn forward(&self, ids: &Tensor) -> candle_core::Result<Tensor> {
        self.logits(&self.forward_embeds(&self.embed(ids)?)?)
    }

    /// Incremental decoding: runs `ids` (B, T) after the cached positions and returns the logits
    /// of the last position (B, V).
    pub fn forward_cached(&self, ids: &Tensor, cache: &mut KvCache) -> candle_core::Result<Tensor> {
        let (_, t) = ids.dims2()?;
        let offset = cache.len;
        if offset + t > self.cfg.max_position_embeddings {
            candle_core::bail!(
                "context of {} positions exceeds max_position_embeddings {}",
                offset + t,
                self.cfg.max_position_embeddings
            );
        }
        if cache.layers.len() != self.layers.len() {
            cache.layers = vec![None; self.layers.len()];
        }
        let mut h = self.embed(ids)?.to_dtype(self.compute_dtype)?;
        for (layer, entry) in self.layers.iter().zip(cache.layers.iter_mut()) {
            h = layer.forward(&h, &self.rope, offset, Some(entry))?;
        }
        cache.len += t;
        let last = self.norm.forward(&h.i((.., t - 1..t, ..))?)?;
        self.logits(&last)?.squeeze(1)
    }
}
