//! AdamW with state we can save, global grad-norm clipping, and the warmup + cosine schedule.

use std::collections::HashMap;

use candle_core::{DType, Tensor, Var};

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
    m: Tensor,
    v: Tensor,
    decay: bool,
}

/// AdamW as in PyTorch (`torch.optim.AdamW`): fp32 moments, decoupled weight decay applied as
/// `p ← p·(1 − lr·wd)` to parameters of rank ≥ 2 only, bias-corrected update.
pub struct AdamW {
    cfg: AdamWConfig,
    step: u64,
    slots: Vec<Slot>,
    fused_cpu: bool,
}

impl AdamW {
    /// An optimizer over `params` (name, variable), with zero moments.
    pub fn new(params: Vec<(String, Var)>, cfg: AdamWConfig) -> Result<Self> {
        let mut slots = Vec::with_capacity(params.len());
        for (name, var) in params {
            let m = Tensor::zeros(var.shape(), DType::F32, var.device())?;
            let v = m.clone();
            let decay = var.rank() >= 2;
            slots.push(Slot { name, var, m, v, decay });
        }
        slots.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(Self { cfg, step: 0, slots, fused_cpu: true })
    }

    /// Whether f32 parameters on the CPU are updated in one fused pass (default true) instead of
    /// the device-generic tensor ops. Both compute the same update.
    pub fn set_fused_cpu(&mut self, fused: bool) {
        self.fused_cpu = fused;
    }

    /// Steps taken.
    pub fn steps(&self) -> u64 {
        self.step
    }

    /// One update with gradients `grads` (by parameter name) at learning rate `lr`.
    pub fn step(&mut self, grads: &HashMap<String, Tensor>, lr: f64) -> Result<()> {
        self.step += 1;
        let c = &self.cfg;
        let bc1 = 1.0 - c.beta1.powi(self.step as i32);
        let bc2 = 1.0 - c.beta2.powi(self.step as i32);
        for s in &mut self.slots {
            let Some(g) = grads.get(&s.name) else { continue };
            if self.fused_cpu && s.var.device().is_cpu() && s.var.dtype() == DType::F32 {
                fused_update(s, g, c, lr, bc1, bc2)?;
                continue;
            }
            let g = g.to_dtype(DType::F32)?;
            s.m = ((&s.m * c.beta1)? + (&g * (1.0 - c.beta1))?)?;
            s.v = ((&s.v * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
            let p = s.var.as_tensor().to_dtype(DType::F32)?;
            let p = if s.decay && c.weight_decay != 0.0 { (p * (1.0 - lr * c.weight_decay))? } else { p };
            let denom = ((s.v.sqrt()? / bc2.sqrt())? + c.eps)?;
            let upd = (s.m.div(&denom)? * (lr / bc1))?;
            s.var.set(&(p - upd)?.to_dtype(s.var.dtype())?)?;
        }
        Ok(())
    }

    /// The moments as named tensors (`m.<param>`, `v.<param>`) and the step count.
    pub fn state(&self) -> (Vec<(String, Tensor)>, u64) {
        let mut out = Vec::with_capacity(self.slots.len() * 2);
        for s in &self.slots {
            out.push((format!("m.{}", s.name), s.m.clone()));
            out.push((format!("v.{}", s.name), s.v.clone()));
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
            s.m = m.to_device(s.var.device())?;
            s.v = v.to_device(s.var.device())?;
        }
        self.step = step;
        Ok(())
    }
}

/// One AdamW update of a CPU f32 parameter in a single pass over its elements.
fn fused_update(s: &mut Slot, g: &Tensor, c: &AdamWConfig, lr: f64, bc1: f64, bc2: f64) -> Result<()> {
    let shape = s.var.shape().clone();
    let mut p: Vec<f32> = s.var.as_tensor().flatten_all()?.to_vec1()?;
    let g: Vec<f32> = g.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    let mut m: Vec<f32> = s.m.flatten_all()?.to_vec1()?;
    let mut v: Vec<f32> = s.v.flatten_all()?.to_vec1()?;
    let (b1, b2, eps) = (c.beta1 as f32, c.beta2 as f32, c.eps as f32);
    let (ob1, ob2) = ((1.0 - c.beta1) as f32, (1.0 - c.beta2) as f32);
    let decay = if s.decay && c.weight_decay != 0.0 { (1.0 - lr * c.weight_decay) as f32 } else { 1.0 };
    let step = (lr / bc1) as f32;
    let sbc2 = bc2.sqrt() as f32;
    for i in 0..p.len() {
        let gi = g[i];
        m[i] = m[i] * b1 + gi * ob1;
        v[i] = v[i] * b2 + gi * gi * ob2;
        let denom = v[i].sqrt() / sbc2 + eps;
        p[i] = p[i] * decay - m[i] / denom * step;
    }
    let dev = s.var.device().clone();
    s.m = Tensor::from_vec(m, &shape, &dev)?;
    s.v = Tensor::from_vec(v, &shape, &dev)?;
    s.var.set(&Tensor::from_vec(p, &shape, &dev)?)?;
    Ok(())
}

/// The global L2 norm of all gradients.
pub fn grad_norm(grads: &HashMap<String, Tensor>) -> Result<f64> {
    let mut names: Vec<&String> = grads.keys().collect();
    names.sort();
    let mut total = 0f64;
    for n in names {
        total += grads[n].to_dtype(DType::F32)?.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
    }
    Ok(total.sqrt())
}

/// Scales gradients so their global norm is at most `max_norm` (as torch's `clip_grad_norm_`:
/// factor `max_norm / (norm + 1e-6)`, capped at 1). Returns the norm before clipping.
pub fn clip_grad_norm(grads: &mut HashMap<String, Tensor>, max_norm: f64) -> Result<f64> {
    let norm = grad_norm(grads)?;
    if max_norm > 0.0 && norm.is_finite() {
        let coef = max_norm / (norm + 1e-6);
        if coef < 1.0 {
            for g in grads.values_mut() {
                *g = (&*g * coef)?;
            }
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
