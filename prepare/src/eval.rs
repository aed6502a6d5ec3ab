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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::loader::tests::{dataset, preset};

    #[test]
    fn uniform_model_scores_log2_vocab_per_token_over_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let mut p = preset(5, 1);
        p.vocab_size = 16;
        // One row of capacity 6: BOS 5 6 BOS 5 6, so targets 5 6 BOS 5 6.
        let data = dataset(dir.path(), p, &[vec![vec![5, 6]]], &[vec![vec![5, 6]]]);
        let uniform = |x: &Tensor, _: &Tensor| {
            let (b, t) = x.dims2()?;
            let logits = Tensor::zeros((b, t, 16), DType::F32, x.device())?;
            per_token_cross_entropy(&logits, &x.zeros_like()?)
        };
        let result = evaluate_bpb(&data, &Device::Cpu, 1, uniform).unwrap();
        // Four scored targets of ln 16 nats over 3 + 1 + 3 + 1 bytes; the BOS target is excluded.
        assert_eq!(result.bytes, 8);
        assert!(
            (result.val_bpb - 4.0 * 4.0 / 8.0).abs() < 1e-6,
            "{}",
            result.val_bpb
        );
        assert_eq!(result.spec, data.manifest.eval);
        assert_eq!(result.spec.tokens, 5);
    }

    #[test]
    fn a_better_model_scores_lower_and_batching_does_not_matter() {
        let dir = tempfile::tempdir().unwrap();
        let mut p = preset(8, 6);
        p.vocab_size = 32;
        let docs = vec![vec![vec![3, 4, 5], vec![7, 8], vec![9, 10, 11, 12]]];
        let data = dataset(dir.path(), p, &docs, &docs);
        // Knows the answer: a large logit on each target.
        let oracle = |_: &Tensor, y: &Tensor| {
            let logits = one_hot(y, 32)?.affine(20.0, 0.0)?;
            per_token_cross_entropy(&logits, y)
        };
        let uniform = |x: &Tensor, y: &Tensor| {
            let logits = Tensor::zeros((x.dims()[0], x.dims()[1], 32), DType::F32, x.device())?;
            per_token_cross_entropy(&logits, y)
        };
        let good = evaluate_bpb(&data, &Device::Cpu, 4, oracle).unwrap();
        let base = evaluate_bpb(&data, &Device::Cpu, 4, uniform).unwrap();
        let base_one_row = evaluate_bpb(&data, &Device::Cpu, 1, uniform).unwrap();
        assert!(
            good.val_bpb < 0.01 && base.val_bpb > 1.0,
            "{good:?} {base:?}"
        );
        assert_eq!(base, base_one_row);
        assert_eq!(good.spec, base.spec);
        // A model returning the wrong number of losses is refused.
        let wrong = |x: &Tensor, _: &Tensor| x.narrow(1, 0, 2)?.to_dtype(DType::F32);
        assert!(evaluate_bpb(&data, &Device::Cpu, 4, wrong).is_err());
    }

    fn one_hot(y: &Tensor, vocab: usize) -> candle_core::Result<Tensor> {
        let ids = Tensor::arange(0u32, vocab as u32, y.device())?;
        y.unsqueeze(D::Minus1)?
            .broadcast_eq(&ids.reshape((1, 1, vocab))?)?
            .to_dtype(DType::F32)
    }

    #[test]
    fn cross_entropy_matches_a_hand_computation() {
        let logits = Tensor::new(&[[[1f32, 2.0, 3.0], [0.0, 0.0, 0.0]]], &Device::Cpu).unwrap();
        let targets = Tensor::new(&[[2u32, 0]], &Device::Cpu).unwrap();
        let got: Vec<f32> = per_token_cross_entropy(&logits, &targets)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let lse = (1f32.exp() + 2f32.exp() + 3f32.exp()).ln();
        assert!((got[0] - (lse - 3.0)).abs() < 1e-5);
        assert!((got[1] - 3f32.ln()).abs() < 1e-5);
    }
}
