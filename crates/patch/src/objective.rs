//! The patch embedding and the next-patch loss (Shao et al., 2024), as candle functions.

use candle_core::{DType, Tensor, Var, D};
use patchlm_model::ops::{ce_lse_supported, cross_entropy_multi_lse, grad};
use patchlm_model::profile::span;
use patchlm_model::{cross_entropy_multi, fused_ops_supported, tape_supported, Grads, Llama, Tape};

use crate::error::{PatchError, Result};

/// Mean of each run of `k` consecutive token embeddings: (B, K·T, D) → (B, T, D).
pub fn patch_embeddings(token_embeds: &Tensor, k: usize) -> Result<Tensor> {
    let (b, n, d) = token_embeds.dims3()?;
    if k == 0 || n % k != 0 {
        return Err(PatchError::Config(format!("sequence of {n} tokens is not a whole number of patches of {k}")));
    }
    if k == 1 {
        return Ok(token_embeds.clone());
    }
    Ok(token_embeds.reshape((b, n / k, k, d))?.mean(2)?)
}

/// Next-patch loss from logits: `logits` (B, P, V) is the one distribution per input patch,
/// `targets` (B, P, K) the K tokens of each following patch. Returns
/// −mean over B·P·K of `log softmax(logits)[target]`, with the log-softmax in f32.
/// With K = 1 this is ordinary next-token cross-entropy.
pub fn next_patch_loss_from_logits(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let (b, p, _v) = logits.dims3()?;
    let (tb, tp, _k) = targets.dims3()?;
    if (b, p) != (tb, tp) {
        return Err(PatchError::Config(format!(
            "logits {:?} and targets {:?} disagree",
            logits.dims(),
            targets.dims()
        )));
    }
    if fused_ops_supported(logits.device()) {
        let (_, _, v) = logits.dims3()?;
        let k = targets.dim(2)?;
        let flat = logits.reshape((b * p, v))?;
        let t = targets.reshape((b * p, k))?.to_dtype(DType::U32)?;
        return Ok(cross_entropy_multi(&flat, &t)?);
    }
    next_patch_loss_composed(logits, targets)
}

/// [`next_patch_loss_from_logits`] from composed candle ops (max-shifted f32 log-softmax, gather,
/// mean): the reference the fused op is tested against, and the path on devices without it.
pub fn next_patch_loss_composed(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let x = logits.to_dtype(DType::F32)?;
    let m = x.max_keepdim(D::Minus1)?.detach();
    let shifted = x.broadcast_sub(&m)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    let logp = shifted.broadcast_sub(&lse)?;
    let picked = logp.gather(&targets.contiguous()?, 2)?;
    Ok(picked.mean_all()?.neg()?)
}

/// (batch, patches per block) of a block batch `ids` (B, L) at patch size `k`: L must be at least
/// two whole patches (one input, one target).
fn block_patches(ids: &Tensor, k: usize) -> Result<(usize, usize)> {
    let (b, l) = ids.dims2()?;
    if k == 0 || l % k != 0 || l / k < 2 {
        return Err(PatchError::Config(format!("a block of {l} tokens is not at least two whole patches of {k}")));
    }
    Ok((b, l / k))
}

/// The training loss of one block batch `ids` (B, L) at patch size `k`: the block is cut into
/// n = L / k patches; patches 0..n−2 are the input (mean-pooled embeddings at positions
/// 0..n−2), and each predicts all K tokens of the next patch with the model's one head. The
/// first patch is never a target. Patch blocks have L = K·T; token blocks (k = 1) L = T + 1.
pub fn patch_loss(model: &Llama, ids: &Tensor, k: usize) -> Result<Tensor> {
    let (b, n) = block_patches(ids, k)?;
    let input = ids.narrow(1, 0, (n - 1) * k)?;
    let x = patch_embeddings(&model.embed(&input)?, k)?;
    let hidden = model.forward_embeds(&x)?;
    let logits = model.logits(&hidden)?;
    let targets = ids.narrow(1, k, (n - 1) * k)?.reshape((b, n - 1, k))?;
    next_patch_loss_from_logits(&logits, &targets)
}

/// The forward pass of [`patch_loss`] without an autograd graph, with what its backward pass
/// ([`patch_backward_tape`]) needs.
pub struct PatchTape {
    k: usize,
    input: Tensor,
    hidden: Tensor,
    logits: Tensor,
    targets: Tensor,
    /// Each row's log-sum-exp, where the device has `cross_entropy_multi_lse`.
    lse: Option<Tensor>,
    tape: Tape,
}

/// [`patch_loss`] through the model's hand-written backward pass ([`Llama::forward_tape`], no
/// autograd graph; needs [`patchlm_model::tape_supported`] on the ids' device): the loss (an f32
/// scalar) and the tape for [`patch_backward_tape`].
pub fn patch_forward_tape(model: &Llama, ids: &Tensor, k: usize) -> Result<(Tensor, PatchTape)> {
    let (b, n) = block_patches(ids, k)?;
    let input = ids.narrow(1, 0, (n - 1) * k)?.contiguous()?;
    let x = model.embed_mean_tape(&input, k)?;
    let (hidden, tape) = model.forward_tape(&x)?;
    let logits = model.logits_tape(&hidden, &tape)?;
    let (_, p, v) = logits.dims3()?;
    let logits = logits.reshape((b * p, v))?;
    let targets = ids.narrow(1, k, (n - 1) * k)?.reshape((b * p, k))?.to_dtype(DType::U32)?.contiguous()?;
    let (loss, lse) = span("fwd.loss", logits.device(), || {
        if ce_lse_supported(logits.device()) {
            let (loss, lse) = cross_entropy_multi_lse(&logits, &targets)?;
            Ok((loss, Some(lse)))
        } else {
            Ok((cross_entropy_multi(&logits, &targets)?, None))
        }
    })?;
    Ok((loss, PatchTape { k, input, hidden, logits, targets, lse, tape }))
}

/// The gradient of `scale` × the loss of [`patch_forward_tape`] with respect to every parameter,
/// by HF name (see [`patchlm_model::Grads`]).
pub fn patch_backward_tape(model: &Llama, t: PatchTape, scale: f64) -> Result<Grads> {
    let PatchTape { k, input, hidden, logits, targets, lse, tape } = t;
    let (b, p, _) = hidden.dims3()?;
    // The tape holds the only handle on the logits: the gradient may take their memory.
    let dev = logits.device().clone();
    let dlogits = span("bwd.loss", &dev, || {
        match &lse {
            Some(lse) => grad::cross_entropy_multi_lse_in_place(logits, &targets, lse, scale)?,
            None => grad::cross_entropy_multi(&logits, &targets, scale)?,
        }
        .reshape((b, p, ()))
    })?;
    let mut grads = Grads::new();
    let dhidden = model.logits_backward(&hidden, &dlogits, &tape, &mut grads)?;
    drop(dlogits);
    let dx = model.backward_tape(tape, &dhidden, &mut grads)?;
    // The patch mean's backward: each of the K tokens gets 1/K of its patch's gradient.
    model.embed_mean_backward(&input, k, &dx, &mut grads)?;
    Ok(grads)
}

/// [`patch_loss`] and the gradient of `scale` × that loss with respect to every parameter:
/// [`patch_forward_tape`] then [`patch_backward_tape`]. Elsewhere than where
/// [`patchlm_model::tape_supported`], use [`patch_loss`] and candle's `backward`.
pub fn patch_loss_and_grads(model: &Llama, ids: &Tensor, k: usize, scale: f64) -> Result<(Tensor, Grads)> {
    let (loss, tape) = patch_forward_tape(model, ids, k)?;
    Ok((loss, patch_backward_tape(model, tape, scale)?))
}

/// The forward pass of [`patch_loss`] on whichever backward pass the ids' device has: the model's
/// hand-written one ([`patch_forward_tape`]) where [`patchlm_model::tape_supported`], else an
/// autograd graph. [`PatchPass::backward`] turns it into parameter gradients; training loops that
/// time or interleave the two halves use this pair, [`patch_loss_and_grads`] the tape directly.
pub struct PatchPass {
    loss: Tensor,
    tape: Option<PatchTape>,
}

/// Starts a [`PatchPass`]: the loss of the block batch `ids` (B, L) at patch size `k`.
pub fn patch_forward(model: &Llama, ids: &Tensor, k: usize) -> Result<PatchPass> {
    if tape_supported(ids.device()) {
        let (loss, tape) = patch_forward_tape(model, ids, k)?;
        Ok(PatchPass { loss, tape: Some(tape) })
    } else {
        Ok(PatchPass { loss: patch_loss(model, ids, k)?, tape: None })
    }
}

impl PatchPass {
    /// The loss (an f32 scalar; with an autograd graph where the tape does not run).
    pub fn loss(&self) -> &Tensor {
        &self.loss
    }

    /// Whether the hand-written backward pass runs (else candle's autograd).
    pub fn on_tape(&self) -> bool {
        self.tape.is_some()
    }

    /// The loss without its graph, and the gradient of `scale` × the loss with respect to every
    /// parameter by HF name. `params` names the model's variables: autograd finds gradients by
    /// variable, so only that path reads it; a parameter missing from it gets no gradient there.
    pub fn backward(self, model: &Llama, params: &[(String, Var)], scale: f64) -> Result<(Tensor, Grads)> {
        match self.tape {
            Some(tape) => Ok((self.loss, patch_backward_tape(model, tape, scale)?)),
            None => {
                let store = (&self.loss * scale)?.backward()?;
                let grads = params
                    .iter()
                    .filter_map(|(name, var)| store.get(var.as_tensor()).map(|g| (name.clone(), g.clone())))
                    .collect();
                Ok((self.loss.detach(), grads))
            }
        }
    }
}
