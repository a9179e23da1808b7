//! # patchlm-model: a LLaMA-style transformer in candle
//!
//! Numerically the same model as HF transformers' `LlamaForCausalLM` (pre-norm RMSNorm, rotary
//! embeddings in the rotate-half layout, SwiGLU, optional grouped-query attention, no biases,
//! untied LM head), built only from differentiable ops so that it trains on CPU and CUDA.
//! Weights use HF names and save as an HF model directory. The crate does no dataset I/O and
//! knows nothing of patches: [`Llama::embed`], [`Llama::forward_embeds`] and [`Llama::logits`]
//! let other crates feed their own input embeddings.
//!
//! ```
//! use candle_core::{Device, Tensor};
//! use patchlm_model::{init_model, ModelConfig};
//!
//! let cfg = ModelConfig::preset("tiny").unwrap();
//! let (model, _params) = init_model(&cfg, &Device::Cpu, 0).unwrap();
//! let ids = Tensor::new(&[[1u32, 2, 3, 4]], &Device::Cpu).unwrap();
//! let logits = model.forward(&ids).unwrap();
//! assert_eq!(logits.dims(), &[1, 4, cfg.vocab_size]);
//! ```
#![warn(missing_docs)]

pub mod config;
pub mod error;
pub mod generate;
pub mod host;
#[doc(hidden)]
pub mod launch;
pub mod llama;
pub mod ops;
pub mod profile;
pub mod tape;
pub mod weights;

pub use candle_core;
pub use candle_nn;
pub use config::{ModelConfig, RopeScaling, PRESETS};
pub use error::{ModelError, Result};
pub use generate::{
    check_prompt, generate, generate_streaming, log_softmax, sample, sampling_distribution, score_tokens,
    SamplingConfig,
};
pub use host::keep_freed_memory;
pub use llama::{KvCache, Llama, Rope};
pub use ops::{causal_softmax, cross_entropy_multi, embedding, flash_attention, fused_ops_supported, rope, swiglu};
pub use tape::{
    compute_dtype_grads, set_attention_chunks, set_compute_dtype_grads, set_tape_backward, tape_supported, Grads, Tape,
};
pub use weights::{
    device_memory_peak, init_model, is_model_file, load_config, load_pretrained, load_trainable, named_tensors,
    parse_device, parse_dtype, save_pretrained, special_token_ids, stop_token_ids, weight_files, SplitMix64,
};
