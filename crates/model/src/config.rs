//! `ModelConfig`: the LLaMA architecture's sizes, presets, and HF `config.json` conversion.

use crate::error::{ModelError, Result};

/// Sizes and constants of a LLaMA-style decoder. Field names follow HF's `LlamaConfig`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq)]
#[serde(default)]
pub struct ModelConfig {
    /// Rows of the embedding and LM head.
    pub vocab_size: usize,
    /// Model width d.
    pub hidden_size: usize,
    /// SwiGLU inner width.
    pub intermediate_size: usize,
    /// Decoder layers.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads (grouped-query attention when smaller than the query heads).
    pub num_key_value_heads: usize,
    /// RMSNorm epsilon (default 1e-6).
    pub rms_norm_eps: f64,
    /// RoPE base (default 10000).
    pub rope_theta: f64,
    /// RoPE frequency scaling for contexts longer than the pretraining one (HF `rope_scaling`: a
    /// table of `rope_type` and its fields, such as `{ rope_type = "linear", factor = 2.0 }`;
    /// default none). Saved only when set.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rope_scaling: Option<RopeScaling>,
    /// Longest sequence of positions (the context length T).
    pub max_position_embeddings: usize,
    /// Std of the normal initialization (default 0.02).
    pub initializer_range: f64,
    /// The LM head is the token embedding matrix (one `model.embed_tokens.weight`, no
    /// `lm_head.weight`), as in SmolLM or Llama 3.2 (default false: an untied head). Saved
    /// only when set.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub tie_word_embeddings: bool,
}

/// How RoPE's inverse frequencies are rescaled (HF's `rope_type`s that change only the
/// frequency table).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "rope_type", rename_all = "lowercase")]
pub enum RopeScaling {
    /// Every inverse frequency divided by `factor` (position interpolation).
    Linear {
        /// The divisor.
        factor: f64,
    },
    /// Llama 3.1's: frequencies whose wavelength is shorter than
    /// `original_max_position_embeddings / high_freq_factor` are kept, those longer than
    /// `original_max_position_embeddings / low_freq_factor` divided by `factor`, and those in
    /// between interpolated smoothly.
    Llama3 {
        /// The divisor of the low frequencies.
        factor: f64,
        /// Sets the longest wavelength that is not scaled in full (see above).
        low_freq_factor: f64,
        /// Sets the shortest wavelength that is scaled in full (see above).
        high_freq_factor: f64,
        /// The context the model was pretrained with.
        original_max_position_embeddings: usize,
    },
}

impl RopeScaling {
    /// Rescales the inverse frequencies `inv` as HF transformers does (in f32).
    pub fn apply(&self, inv: &mut [f32]) {
        match *self {
            RopeScaling::Linear { factor } => inv.iter_mut().for_each(|f| *f /= factor as f32),
            RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings } => {
                let (factor, lo, hi) = (factor as f32, low_freq_factor as f32, high_freq_factor as f32);
                let old = original_max_position_embeddings as f32;
                let (low_freq_wavelen, high_freq_wavelen) = (old / lo, old / hi);
                for f in inv.iter_mut() {
                    let wavelen = 2.0 * std::f32::consts::PI / *f;
                    if wavelen > low_freq_wavelen {
                        *f /= factor;
                    } else if wavelen >= high_freq_wavelen {
                        let smooth = (old / wavelen - lo) / (hi - lo);
                        *f = (1.0 - smooth) * *f / factor + smooth * *f;
                    }
                }
            }
        }
    }

    fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(ModelError::Config(m));
        // False for NaN too.
        let positive = |x: f64| x > 0.0;
        match *self {
            RopeScaling::Linear { factor } if !positive(factor) => {
                bad(format!("rope_scaling factor {factor} must be positive"))
            }
            RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings } => {
                if !(positive(factor) && positive(low_freq_factor) && high_freq_factor > low_freq_factor) {
                    return bad(format!(
                        "llama3 rope_scaling needs factor > 0 and high_freq_factor > low_freq_factor > 0 (got {factor}, \
                         {low_freq_factor}, {high_freq_factor})"
                    ));
                }
                if original_max_position_embeddings == 0 {
                    return bad("llama3 rope_scaling needs original_max_position_embeddings > 0".into());
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// Reads HF's `rope_scaling` / `rope_parameters` object (`rope_type`, or the older `type`);
    /// `Ok(None)` for the default RoPE. `max_positions` stands in for a missing
    /// `original_max_position_embeddings`.
    fn from_hf(v: &serde_json::Value, max_positions: usize) -> Result<Option<Self>> {
        let bad = |m: String| ModelError::Config(m);
        let kind = match v.get("rope_type").or_else(|| v.get("type")).filter(|t| !t.is_null()) {
            None => "default",
            Some(t) => {
                t.as_str().ok_or_else(|| bad(format!("rope_scaling's rope_type is not a string (it is {t})")))?
            }
        };
        let num = |k: &str| {
            v.get(k).and_then(|x| x.as_f64()).ok_or_else(|| bad(format!("rope_scaling (\"{kind}\") needs \"{k}\"")))
        };
        let s = match kind {
            "default" => return Ok(None),
            "linear" => RopeScaling::Linear { factor: num("factor")? },
            "llama3" => RopeScaling::Llama3 {
                factor: num("factor")?,
                low_freq_factor: num("low_freq_factor")?,
                high_freq_factor: num("high_freq_factor")?,
                original_max_position_embeddings: match v.get("original_max_position_embeddings") {
                    None | Some(serde_json::Value::Null) => max_positions,
                    Some(x) => x.as_u64().map(|x| x as usize).ok_or_else(|| {
                        bad(format!(
                            "rope_scaling's original_max_position_embeddings is not a whole number (it is {x})"
                        ))
                    })?,
                },
            },
            other => {
                return Err(bad(format!(
                    "rope_type \"{other}\" is not supported (default, linear and llama3 are: they change only the \
                     frequency table)"
                )))
            }
        };
        s.validate()?;
        Ok(Some(s))
    }

    fn to_hf(self) -> serde_json::Value {
        match self {
            RopeScaling::Linear { factor } => serde_json::json!({"rope_type": "linear", "factor": factor}),
            RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings } => {
                serde_json::json!({
                    "rope_type": "llama3", "factor": factor, "low_freq_factor": low_freq_factor,
                    "high_freq_factor": high_freq_factor,
                    "original_max_position_embeddings": original_max_position_embeddings,
                })
            }
        }
    }
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self::preset("small").unwrap_or_else(|_| unreachable!())
    }
}

/// Names of the presets, smallest first.
pub const PRESETS: &[&str] = &["tiny", "small", "gpt2-small", "370m", "780m", "1.3b", "2.7b"];

impl ModelConfig {
    /// A preset by name: `tiny` (tests), `small` (trains in minutes on 2 CPU cores),
    /// `gpt2-small` (GPT-2 small's shape, ~124M with a 50304 vocabulary), and the paper's `370m`,
    /// `780m`, `1.3b`, `2.7b`. Training replaces the vocabulary size with the tokenizer's.
    pub fn preset(name: &str) -> Result<Self> {
        // (hidden, intermediate, layers, heads, kv heads, vocab, context)
        let (d, f, l, h, kv, v, t) = match name {
            "tiny" => (32, 64, 2, 4, 2, 256, 64),
            "small" => (256, 688, 4, 4, 4, 8192, 256),
            // GPT-2 small's body (d 768, 12 layers, 12 heads) with SwiGLU of the same parameter
            // count as a 3072-wide GELU MLP: 124M parameters with the 50304 GPT-2 vocabulary.
            "gpt2-small" => (768, 2048, 12, 12, 12, 50304, 1024),
            "370m" => (1024, 2752, 24, 16, 16, 32000, 2048),
            "780m" => (1536, 4128, 24, 16, 16, 32000, 2048),
            "1.3b" => (2048, 5504, 24, 16, 16, 32000, 2048),
            "2.7b" => (2560, 6880, 32, 32, 32, 32000, 2048),
            other => {
                return Err(ModelError::Config(format!("unknown preset \"{other}\"; known: {}", PRESETS.join(", "))))
            }
        };
        Ok(Self {
            vocab_size: v,
            hidden_size: d,
            intermediate_size: f,
            num_hidden_layers: l,
            num_attention_heads: h,
            num_key_value_heads: kv,
            rms_norm_eps: 1e-6,
            rope_theta: 10000.0,
            rope_scaling: None,
            max_position_embeddings: t,
            initializer_range: 0.02,
            tie_word_embeddings: false,
        })
    }

    /// Per-head width.
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads.max(1)
    }

    /// Checks that the sizes fit together.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(ModelError::Config(m));
        if self.vocab_size == 0 || self.hidden_size == 0 || self.num_hidden_layers == 0 || self.intermediate_size == 0 {
            return bad("vocab_size, hidden_size, intermediate_size and num_hidden_layers must be positive".into());
        }
        if self.num_attention_heads == 0 || !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return bad(format!(
                "hidden_size {} is not divisible by num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            ));
        }
        if !self.head_dim().is_multiple_of(2) {
            return bad(format!("head dim {} must be even for rotary embeddings", self.head_dim()));
        }
        if self.num_key_value_heads == 0 || !self.num_attention_heads.is_multiple_of(self.num_key_value_heads) {
            return bad(format!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {}",
                self.num_attention_heads, self.num_key_value_heads
            ));
        }
        if self.max_position_embeddings == 0 {
            return bad("max_position_embeddings must be positive".into());
        }
        if let Some(r) = &self.rope_scaling {
            r.validate()?;
        }
        Ok(())
    }

    /// Number of parameters (embedding, layers, final norm, and the LM head unless tied).
    pub fn num_params(&self) -> u64 {
        let (d, f, v, l) = (
            self.hidden_size as u64,
            self.intermediate_size as u64,
            self.vocab_size as u64,
            self.num_hidden_layers as u64,
        );
        let kv = (self.num_key_value_heads * self.head_dim()) as u64;
        let attn = d * d * 2 + d * kv * 2;
        let mlp = 3 * d * f;
        let norms = 2 * d;
        let embed_and_head = if self.tie_word_embeddings { v * d } else { v * d * 2 };
        embed_and_head + l * (attn + mlp + norms) + d
    }

    /// Weights that take part in matrix products: every layer's projections and the LM head
    /// (the embedding matrix when tied); not the embedding lookup of an untied model, not the
    /// norms' weights.
    pub fn matmul_params(&self) -> u64 {
        let (d, v, l) = (self.hidden_size as u64, self.vocab_size as u64, self.num_hidden_layers as u64);
        let lookup = if self.tie_word_embeddings { 0 } else { v * d };
        self.num_params() - lookup - (2 * l + 1) * d
    }

    /// Training FLOPs per position at context `seq_len`, as MFU counts them (PaLM's appendix B):
    /// 6 per matmul weight ([`Self::matmul_params`]: 2 forward, 4 backward) plus 12·L·d·T for
    /// the attention scores and weighted values (4·d·T a layer forward, twice that backward, no
    /// causal halving). `torch.utils.flop_counter` counts the same for HF `LlamaForCausalLM`,
    /// except 2·d·T a layer more for the forward product that FlashAttention's backward
    /// recomputes.
    pub fn flops_per_position(&self, seq_len: usize) -> f64 {
        6.0 * self.matmul_params() as f64
            + 12.0 * self.num_hidden_layers as f64 * self.hidden_size as f64 * seq_len as f64
    }

    /// HF `config.json` for `LlamaForCausalLM`.
    pub fn to_hf_json(&self, bos: Option<u32>, eos: Option<u32>) -> serde_json::Value {
        serde_json::json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim(),
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_position_embeddings,
            "initializer_range": self.initializer_range,
            "tie_word_embeddings": self.tie_word_embeddings,
            "rope_scaling": self.rope_scaling.map(RopeScaling::to_hf),
            "attention_bias": false,
            "mlp_bias": false,
            "torch_dtype": "float32",
            "bos_token_id": bos,
            "eos_token_id": eos,
        })
    }

    /// Reads an HF LLaMA `config.json` (other architectures are refused). A setting that is
    /// absent or null takes `LlamaConfig`'s default; one of the wrong type is refused.
    pub fn from_hf_json(v: &serde_json::Value) -> Result<Self> {
        let bad = |m: String| ModelError::Config(m);
        let present = |k: &str| v.get(k).filter(|x| !x.is_null());
        let typed = |k: &str, what: &str| {
            bad(format!("\"{k}\" is not {what} (it is {})", present(k).map_or(String::new(), |x| x.to_string())))
        };
        let opt_usize = |k: &str| -> Result<Option<usize>> {
            present(k).map(|x| x.as_u64().map(|n| n as usize).ok_or_else(|| typed(k, "a whole number"))).transpose()
        };
        let opt_f64 = |k: &str| -> Result<Option<f64>> {
            present(k).map(|x| x.as_f64().ok_or_else(|| typed(k, "a number"))).transpose()
        };
        let opt_bool = |k: &str| -> Result<Option<bool>> {
            present(k).map(|x| x.as_bool().ok_or_else(|| typed(k, "true or false"))).transpose()
        };
        let opt_str = |k: &str| -> Result<Option<&str>> {
            present(k).map(|x| x.as_str().ok_or_else(|| typed(k, "a string"))).transpose()
        };
        if let Some(t) = opt_str("model_type")? {
            if t != "llama" {
                return Err(bad(format!("model_type \"{t}\" is not supported (only \"llama\")")));
            }
        }
        if let Some(act) = opt_str("hidden_act")? {
            if act != "silu" {
                return Err(bad(format!("hidden_act \"{act}\" is not supported (only silu)")));
            }
        }
        // Variants of the architecture whose extra weights or changed math this model lacks: refused
        // rather than loaded with the difference silently dropped.
        for flag in ["attention_bias", "mlp_bias"] {
            if opt_bool(flag)? == Some(true) {
                return Err(bad(format!("{flag} = true is not supported (the projections here have no biases)")));
            }
        }
        let partial = v
            .get("partial_rotary_factor")
            .or_else(|| v.get("rope_parameters").and_then(|r| r.get("partial_rotary_factor")))
            .and_then(|x| x.as_f64());
        if partial.is_some_and(|p| p != 1.0) {
            return Err(bad("partial_rotary_factor below 1 is not supported (RoPE rotates the whole head)".into()));
        }
        // RoPE settings: `rope_scaling` (transformers < 5), or `rope_parameters` (transformers >= 5,
        // which also nests `rope_theta` there).
        let rope = v
            .get("rope_scaling")
            .filter(|r| !r.is_null())
            .or_else(|| v.get("rope_parameters").filter(|r| !r.is_null()));
        let rope_theta = opt_f64("rope_theta")?
            .or_else(|| rope.and_then(|r| r.get("rope_theta")).and_then(|x| x.as_f64()))
            .unwrap_or(10000.0);
        let get = |k: &str| -> Result<usize> { opt_usize(k)?.ok_or_else(|| bad(format!("missing \"{k}\""))) };
        let heads = get("num_attention_heads")?;
        let max_positions = opt_usize("max_position_embeddings")?.unwrap_or(2048);
        let rope_scaling = match rope {
            Some(r) => RopeScaling::from_hf(r, max_positions)?,
            None => None,
        };
        let cfg = Self {
            vocab_size: get("vocab_size")?,
            hidden_size: get("hidden_size")?,
            intermediate_size: get("intermediate_size")?,
            num_hidden_layers: get("num_hidden_layers")?,
            num_attention_heads: heads,
            num_key_value_heads: opt_usize("num_key_value_heads")?.unwrap_or(heads),
            rms_norm_eps: opt_f64("rms_norm_eps")?.unwrap_or(1e-6),
            rope_theta,
            rope_scaling,
            max_position_embeddings: max_positions,
            initializer_range: opt_f64("initializer_range")?.unwrap_or(0.02),
            // LlamaConfig's default is an untied head.
            tie_word_embeddings: opt_bool("tie_word_embeddings")?.unwrap_or(false),
        };
        if let Some(hd) = opt_usize("head_dim")? {
            if hd != cfg.head_dim() {
                return Err(bad(format!("head_dim {hd} differs from hidden_size / num_attention_heads")));
            }
        }
        cfg.validate()?;
        Ok(cfg)
    }
}
