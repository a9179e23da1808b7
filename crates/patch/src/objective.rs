//! The patch embedding and the next-patch loss (Shao et al., 2024), as candle functions.

use candle_core::{DType, Tensor, D};
use patchlm_model::{cross_entropy_multi, fused_ops_supported, Llama};

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
/// −mean over B·P·K of log softmax(logits)[target], with the log-softmax in f32.
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

/// The training loss of one block batch `ids` (B, L) at patch size `k`: the block is cut into
/// n = L / k patches; patches 0..n−2 are the input (mean-pooled embeddings at positions
/// 0..n−2), and each predicts all K tokens of the next patch with the model's one head. The
/// first patch is never a target. Patch blocks have L = K·T; token blocks (k = 1) L = T + 1.
pub fn patch_loss(model: &Llama, ids: &Tensor, k: usize) -> Result<Tensor> {
    let (b, l) = ids.dims2()?;
    if k == 0 || l % k != 0 || l / k < 2 {
        return Err(PatchError::Config(format!("a block of {l} tokens is not at least two whole patches of {k}")));
    }
    let n = l / k;
    let input = ids.narrow(1, 0, (n - 1) * k)?;
    let x = patch_embeddings(&model.embed(&input)?, k)?;
    let hidden = model.forward_embeds(&x)?;
    let logits = model.logits(&hidden)?;
    let targets = ids.narrow(1, k, (n - 1) * k)?.reshape((b, n - 1, k))?;
    next_patch_loss_from_logits(&logits, &targets)
}
