//! AdamW with state we can save, global grad-norm clipping, and the warmup + cosine schedule.

use std::collections::HashMap;

use candle_core::{DType, Tensor, Var};
use patchlm_model::fused_ops_supported;
use patchlm_model::ops::{adamw_multi, adamw_multi_clipped, host_clip_factor, sum_of_squares, AdamWSlot, AdamWStep};

use crate::error::{Result, TrainError};

/// AdamW settings (defaults from the paper).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq)]
#[serde(default)]
pub struct AdamWConfig {
    /// β1 (default 0.9).
    pub beta1: f64,
    /// β2 (default 0.95).
    pub beta2: f64,
    /// ε (default 1e-8).
    pub eps: f64,
    /// Decoupled weight decay on matrices only, not norms or biases (default 0.1).
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self { beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1 }
    }
}

struct Slot {
    name: String,
    var: Var,
    /// (2, numel) f32: the first and second moments, flattened.
    moments: Tensor,
    decay: bool,
}

/// AdamW as in PyTorch (`torch.optim.AdamW`): fp32 moments, decoupled weight decay applied as
/// `p ← p·(1 − lr·wd)` to parameters of rank ≥ 2 only, bias-corrected update.
pub struct AdamW {
    cfg: AdamWConfig,
    step: u64,
    slots: Vec<Slot>,
    fused: bool,
}

impl AdamW {
    /// An optimizer over `params` (name, variable), with zero moments.
    pub fn new(params: Vec<(String, Var)>, cfg: AdamWConfig) -> Result<Self> {
        let mut slots = Vec::with_capacity(params.len());
        for (name, var) in params {
            let moments = Tensor::zeros((2, var.elem_count()), DType::F32, var.device())?;
            let decay = var.rank() >= 2;
            slots.push(Slot { name, var, moments, decay });
        }
        slots.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(Self { cfg, step: 0, slots, fused: true })
    }

    /// Whether f32 parameters are updated by the fused one-pass kernel
    /// (`patchlm_model::ops::adamw_update`, on devices where
    /// `patchlm_model::fused_ops_supported`) instead of device-generic tensor ops (default true).
    /// Both compute the same update.
    pub fn set_fused(&mut self, fused: bool) {
        self.fused = fused;
    }

    /// The former name of [`AdamW::set_fused`], kept so existing callers build.
    pub fn set_fused_cpu(&mut self, fused: bool) {
        self.set_fused(fused);
    }

    /// Steps taken.
    pub fn steps(&self) -> u64 {
        self.step
    }

    /// One update with gradients `grads` (by parameter name) at learning rate `lr`.
    pub fn step(&mut self, grads: &HashMap<String, Tensor>, lr: f64) -> Result<()> {
        self.step_scaled(grads, lr, 1.0)
    }

    /// One update with every gradient multiplied by `grad_scale` first (e.g. the clipping factor
    /// of [`clip_scale`]), without writing the scaled gradients anywhere. With the fused ops
    /// (see [`AdamW::set_fused`]) all f32 parameters are updated together by
    /// `patchlm_model::ops::adamw_multi` (one kernel launch on CUDA unless
    /// `PATCHLM_MULTI_TENSOR_CUDA=0`).
    pub fn step_scaled(&mut self, grads: &HashMap<String, Tensor>, lr: f64, grad_scale: f64) -> Result<()> {
        self.update(grads, lr, Scale::Factor(grad_scale))
    }

    /// One update with the gradients clipped to the global norm `max_norm` (as [`clip_scale`];
    /// 0 or less: no clipping) without reading the norm first: returns the gradients' sum of
    /// squares as an f64 scalar on their device, to be read (the norm is its square root) once
    /// the update is enqueued. A non-finite norm leaves parameters and moments unchanged (the
    /// step still counts). On CUDA with `patchlm_model::ops::set_device_clip` on, the
    /// multi-tensor kernel computes the factor on the device, so the step never waits for it.
    pub fn step_clipped(&mut self, grads: &HashMap<String, Tensor>, lr: f64, max_norm: f64) -> Result<Tensor> {
        let sumsq = grad_sum_of_squares(grads)?;
        self.update(grads, lr, Scale::Clip(&sumsq, max_norm))?;
        Ok(sumsq)
    }

    fn update(&mut self, grads: &HashMap<String, Tensor>, lr: f64, scale: Scale<'_>) -> Result<()> {
        self.step += 1;
        let c = &self.cfg;
        let bc1 = 1.0 - c.beta1.powi(self.step as i32);
        let bc2 = 1.0 - c.beta2.powi(self.step as i32);
        let decay = if c.weight_decay != 0.0 { 1.0 - lr * c.weight_decay } else { 1.0 };
        let h = AdamWStep { lr, beta1: c.beta1, beta2: c.beta2, eps: c.eps, decay, bias1: bc1, bias2: bc2 };
        // The multi-tensor update reads f32 and bf16 gradients as they are; the rest in f32.
        let grads_in = self
            .slots
            .iter()
            .map(|s| {
                grads
                    .get(&s.name)
                    .map(|g| {
                        if matches!(g.dtype(), DType::F32 | DType::BF16) {
                            Ok(g.clone())
                        } else {
                            g.to_dtype(DType::F32)
                        }
                    })
                    .transpose()
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        // Which slots the multi-tensor update takes (f32 parameters with the fused ops).
        let fused: Vec<bool> = self
            .slots
            .iter()
            .map(|s| self.fused && s.var.dtype() == DType::F32 && fused_ops_supported(s.var.device()))
            .collect();
        // The clipping factor on the host: always for Factor, for Clip only where a slot is
        // updated outside the multi-tensor batch (reading the norm waits for the device).
        let host_factor = match scale {
            Scale::Factor(f) => Some(f),
            Scale::Clip(sumsq, max_norm) if fused.iter().zip(&grads_in).any(|(&f, g)| g.is_some() && !f) => {
                let Some(factor) = host_clip_factor(sumsq, max_norm)? else { return Ok(()) };
                Some(factor)
            }
            Scale::Clip(..) => None,
        };
        let grad_scale = host_factor.unwrap_or(1.0);
        let mut batch = Vec::new();
        for ((s, g), fused) in self.slots.iter_mut().zip(&grads_in).zip(fused) {
            let Some(g) = g else { continue };
            if fused {
                batch.push(AdamWSlot { param: &s.var, grad: g, moments: &mut s.moments, decay: s.decay });
                continue;
            }
            let g = g.to_dtype(DType::F32)?;
            let decay = if s.decay { decay } else { 1.0 };
            let g = g.flatten_all()?;
            let g = if grad_scale != 1.0 { (g * grad_scale)? } else { g };
            let m = ((s.moments.get(0)? * c.beta1)? + (&g * (1.0 - c.beta1))?)?;
            let v = ((s.moments.get(1)? * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
            let p = s.var.as_tensor().to_dtype(DType::F32)?.flatten_all()?;
            let p = if decay != 1.0 { (p * decay)? } else { p };
            let denom = ((v.sqrt()? / bc2.sqrt())? + c.eps)?;
            let upd = (m.div(&denom)? * (lr / bc1))?;
            s.var.set(&(p - upd)?.reshape(s.var.shape())?.to_dtype(s.var.dtype())?)?;
            s.moments = Tensor::stack(&[m, v], 0)?;
        }
        if !batch.is_empty() {
            match (host_factor, scale) {
                (None, Scale::Clip(sumsq, max_norm)) => adamw_multi_clipped(&mut batch, &h, sumsq, max_norm)?,
                _ => adamw_multi(&mut batch, &h, grad_scale)?,
            }
        }
        Ok(())
    }

    /// The moments as named tensors (`m.<param>`, `v.<param>`, each of the parameter's shape)
    /// and the step count. The tensors are views of the optimizer's state, which the multi-tensor
    /// CUDA update changes in place: copy them (or write them out) before the next step.
    pub fn state(&self) -> (Vec<(String, Tensor)>, u64) {
        let mut out = Vec::with_capacity(self.slots.len() * 2);
        for s in &self.slots {
            for (i, key) in ["m", "v"].iter().enumerate() {
                // get + reshape of a (2, numel) tensor cannot fail.
                if let Ok(t) = s.moments.get(i).and_then(|t| t.reshape(s.var.shape())) {
                    out.push((format!("{key}.{}", s.name), t));
                }
            }
        }
        (out, self.step)
    }

    /// Restores moments and step from [`AdamW::state`]'s output.
    pub fn load_state(&mut self, tensors: &HashMap<String, Tensor>, step: u64) -> Result<()> {
        for s in &mut self.slots {
            let get = |k: String| {
                tensors.get(&k).cloned().ok_or_else(|| TrainError::Config(format!("optimizer state lacks {k}")))
            };
            let m = get(format!("m.{}", s.name))?;
            let v = get(format!("v.{}", s.name))?;
            if m.dims() != s.var.dims() || v.dims() != s.var.dims() {
                return Err(TrainError::Config(format!("optimizer state for {} has the wrong shape", s.name)));
            }
            let (m, v) = (m.to_dtype(DType::F32)?.flatten_all()?, v.to_dtype(DType::F32)?.flatten_all()?);
            s.moments = Tensor::stack(&[m, v], 0)?.to_device(s.var.device())?;
        }
        self.step = step;
        Ok(())
    }
}

/// The global L2 norm of all gradients (one host sync; see `patchlm_model::ops::sum_of_squares`).
pub fn grad_norm(grads: &HashMap<String, Tensor>) -> Result<f64> {
    Ok(grad_sum_of_squares(grads)?.to_scalar::<f64>()?.sqrt())
}

/// The sum of squares of every gradient (in name order), an f64 scalar on their device (0 on
/// the CPU when there are none).
fn grad_sum_of_squares(grads: &HashMap<String, Tensor>) -> Result<Tensor> {
    let mut names: Vec<&String> = grads.keys().collect();
    if names.is_empty() {
        return Ok(Tensor::new(0f64, &candle_core::Device::Cpu)?);
    }
    names.sort();
    let tensors: Vec<&Tensor> = names.iter().map(|n| &grads[*n]).collect();
    Ok(sum_of_squares(&tensors)?)
}

/// How [`AdamW::update`] scales the gradients.
#[derive(Clone, Copy)]
enum Scale<'a> {
    /// By this factor.
    Factor(f64),
    /// Clipped to the norm (second) from their sum of squares (first).
    Clip(&'a Tensor, f64),
}

/// The factor torch's `clip_grad_norm_` scales gradients by for a global norm `norm`:
/// `max_norm / (norm + 1e-6)`, capped at 1; 1 when `max_norm` ≤ 0 (no clipping) or the norm is
/// not finite.
pub fn clip_scale(norm: f64, max_norm: f64) -> f64 {
    patchlm_model::ops::clip_factor(norm, max_norm)
}

/// Scales gradients so their global norm is at most `max_norm` (as torch's `clip_grad_norm_`,
/// factor [`clip_scale`]). Returns the norm before clipping. The trainer instead passes the
/// factor to [`AdamW::step_scaled`], which saves a pass over the gradients.
pub fn clip_grad_norm(grads: &mut HashMap<String, Tensor>, max_norm: f64) -> Result<f64> {
    let norm = grad_norm(grads)?;
    let coef = clip_scale(norm, max_norm);
    if coef < 1.0 {
        for g in grads.values_mut() {
            *g = (&*g * coef)?;
        }
    }
    Ok(norm)
}

/// Linear warmup for `warmup` steps, then cosine decay from `lr` to `min_lr` at `total` steps.
pub fn lr_at(step: usize, total: usize, warmup: usize, lr: f64, min_lr: f64) -> f64 {
    let warmup = warmup.min(total);
    if step < warmup {
        return lr * (step + 1) as f64 / warmup as f64;
    }
    let span = (total - warmup).max(1) as f64;
    let progress = ((step - warmup) as f64 / span).min(1.0);
    min_lr + 0.5 * (lr - min_lr) * (1.0 + (std::f64::consts::PI * progress).cos())
}

/// What to say of a warmup of `warmup` steps in a phase of `steps`: nothing where it is shorter;
/// otherwise that the phase's learning rate rises over all its steps to the peak at the last
/// (a longer warmup is cut to the phase, [`lr_at`]) and never decays.
pub fn warmup_note(warmup: usize, steps: usize) -> Option<String> {
    (warmup >= steps).then(|| {
        let length = if warmup == steps { "as long as" } else { "longer than" };
        format!(
            "train.warmup_steps {warmup} is {length} this phase: its learning rate rises over all {steps} steps to the \
             peak and never decays; set a warmup shorter than the phase"
        )
    })
}
