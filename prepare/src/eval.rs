//! The fixed metric. `val_bpb` = Σ per-token nats / (ln 2 · Σ target bytes) over the preset's
//! validation rows, special tokens (0 bytes) excluded from both sums: independent of the
//! vocabulary, so tokenizer-level changes are compared fairly.

use candle_core::{D, DType, Device, Tensor};

use crate::loader::{EvalBatches, TargetDigest};
use crate::manifest::{Dataset, EvalSpec};
use crate::{Error, Result};

#[derive(Clone, Debug, PartialEq)]
pub struct EvalResult {
    pub val_bpb: f64,
    /// Targets scored (special tokens included) and their SHA-256 digest: the runner checks both
    /// against the manifest.
    pub spec: EvalSpec,
    /// UTF-8 bytes of the non-special targets.
    pub bytes: u64,
}

/// Scores a model on the preset's validation rows. `per_token_nats(inputs, targets)` gets
/// `[rows, seq_len]` u32 tensors and returns the cross-entropy of each target in nats, any shape
/// with `rows * seq_len` elements (see [`per_token_cross_entropy`]). `batch_size` only bounds
/// memory: the rows scored are the same for every batch size.
pub fn evaluate_bpb<F>(
    data: &Dataset,
    device: &Device,
    batch_size: usize,
    mut per_token_nats: F,
) -> Result<EvalResult>
where
    F: FnMut(&Tensor, &Tensor) -> candle_core::Result<Tensor>,
{
    let token_bytes = data.token_bytes();
    let mut digest = TargetDigest::default();
    let (mut nats, mut bytes) = (0f64, 0u64);
    for batch in EvalBatches::new(data, batch_size)? {
        let batch = batch?;
        let (x, y) = batch.to_tensors(device)?;
        let loss = per_token_nats(&x, &y)?;
        if loss.elem_count() != batch.targets.len() {
            return Err(Error::Invalid(format!(
                "the model returned {} losses for {} targets",
                loss.elem_count(),
                batch.targets.len()
            )));
        }
        let loss: Vec<f32> = loss.flatten_all()?.to_dtype(DType::F32)?.to_vec1()?;
        for (&l, &t) in loss.iter().zip(&batch.targets) {
            let b = token_bytes.get(t as usize).copied().unwrap_or(0);
            if b > 0 {
                nats += l as f64;
                bytes += b as u64;
            }
        }
        digest.update(&batch.targets);
    }
    if bytes == 0 {
        return Err(Error::Invalid(
            "the validation rows hold no scorable bytes".into(),
        ));
    }
    Ok(EvalResult {
        val_bpb: nats / (std::f64::consts::LN_2 * bytes as f64),
        spec: digest.finish(),
        bytes,
    })
}

/// Cross-entropy of each target in nats: `logits [.., V]`, `targets [..]` u32 → `[..]` f32.
/// Built from differentiable ops (a log-sum-exp, not candle's fused softmax), so a train file
/// can use it for its loss as well.
pub fn per_token_cross_entropy(logits: &Tensor, targets: &Tensor) -> candle_core::Result<Tensor> {
    let logits = logits.to_dtype(DType::F32)?;
    let max = logits.max_keepdim(D::Minus1)?.detach();
    let shifted = logits.broadcast_sub(&max)?;
    let log_sum_exp = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    let picked = shifted.gather(&targets.unsqueeze(D::Minus1)?.contiguous()?, D::Minus1)?;
    log_sum_exp.sub(&picked)?.squeeze(D::Minus1)
}
