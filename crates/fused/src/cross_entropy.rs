//! Soft-capped cross-entropy: `z = cap·tanh(x/cap)`, per-token `logsumexp(z) − z[target]`, in
//! one pass over the logits forward and one backward. The plain path makes ~10 passes each way
//! over `[tokens, vocab]` in f32 and keeps the normalised logits; at a pass of 16 × 2048
//! tokens and 8192 entries that is ~1 GB per pass, more traffic than the lm_head matmul.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, D, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::rows;

use crate::{Kernel, is_fused};

/// Per-token nats `[..]` (f32) of the soft-capped `logits [.., vocab]` (any float dtype) at
/// `targets [..]` (u32). Differentiable in `logits`.
pub fn softcap_cross_entropy(logits: &Tensor, targets: &Tensor, cap: f64) -> Result<Tensor> {
    let vocab = logits.dims().last().copied().unwrap_or(0);
    let tokens = logits.elem_count() / vocab.max(1);
    if logits.rank() < 1
        || vocab == 0
        || targets.dtype() != DType::U32
        || targets.elem_count() != tokens
        || targets.dims() != &logits.dims()[..logits.rank() - 1]
    {
        candle_core::bail!(
            "softcap_cross_entropy: logits {:?} and targets {:?} ({:?}): targets must be u32 with the logits' shape less the last axis",
            logits.dims(),
            targets.dims(),
            targets.dtype()
        );
    }
    let op = SoftcapCrossEntropy { cap: cap as f32 };
    if tokens > 0 && is_fused(Kernel::CrossEntropy, logits.device(), logits.dtype()) {
        return logits.contiguous()?.apply_op2(&targets.contiguous()?, op);
    }
    plain::softcap_cross_entropy(logits, targets, cap)
}

pub(crate) mod plain {
    use super::*;

    /// The same from differentiable primitive ops: the reference, and the path for devices
    /// without a fused kernel.
    pub fn softcap_cross_entropy(logits: &Tensor, targets: &Tensor, cap: f64) -> Result<Tensor> {
        let z = ((logits.to_dtype(DType::F32)? / cap)?.tanh()? * cap)?;
        // The max is a constant shift: no gradient flows through it.
        let max = z.max_keepdim(D::Minus1)?.detach();
        let shifted = z.broadcast_sub(&max)?;
        let log_sum_exp = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
        let picked = shifted.gather(&targets.unsqueeze(D::Minus1)?.contiguous()?, D::Minus1)?;
        log_sum_exp.sub(&picked)?.squeeze(D::Minus1)
    }
}

pub(crate) struct SoftcapCrossEntropy {
    pub(crate) cap: f32,
}

impl CustomOp2 for SoftcapCrossEntropy {
    fn name(&self) -> &'static str {
        "fused-softcap-cross-entropy"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ts: &CpuStorage,
        tl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, vocab) = rows(xs, xl)?;
        let t = targets(ts, tl)?;
        let cap = self.cap;
        let loss: Vec<f32> = x
            .par_chunks(vocab)
            .zip(t.par_iter())
            .map(|(x, &t)| {
                let (mut m, mut s) = (f32::NEG_INFINITY, 0f32);
                for &x in x {
                    let z = cap * (x / cap).tanh();
                    if z > m {
                        s = s * (m - z).exp() + 1.0;
                        m = z;
                    } else {
                        s += (z - m).exp();
                    }
                }
                // A target outside the vocabulary is a NaN loss, as on the GPU.
                let zt = x
                    .get(t as usize)
                    .map_or(f32::NAN, |&x| cap * (x / cap).tanh());
                m + s.ln() - zt
            })
            .collect();
        Ok((CpuStorage::F32(loss), tl.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        xs: &candle_core::CudaStorage,
        xl: &Layout,
        ts: &candle_core::CudaStorage,
        tl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        crate::cuda::forward(self.cap, xs, xl, ts, tl)
    }

    fn bwd(
        &self,
        x: &Tensor,
        targets: &Tensor,
        loss: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        // The backward pass recovers logsumexp from the loss, so only x is kept.
        let loss_grad = Tensor::stack(&[loss, &grad.to_dtype(DType::F32)?], D::Minus1)?;
        let op = SoftcapCrossEntropyBackward { cap: self.cap };
        let dx = x.apply_op3_no_bwd(targets, &loss_grad.contiguous()?, &op)?;
        Ok((Some(dx), None))
    }
}

/// The u32 targets of a contiguous CPU tensor.
fn targets<'a>(storage: &'a CpuStorage, layout: &Layout) -> Result<&'a [u32]> {
    let CpuStorage::U32(data) = storage else {
        candle_core::bail!("softcap_cross_entropy: targets must be u32")
    };
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("fused ops need a contiguous input")
    };
    Ok(&data[start..end])
}

/// dx = g · (softmax(z) − onehot(t)) · (1 − tanh²(x/cap)), with logsumexp = loss + z[t].
pub(crate) struct SoftcapCrossEntropyBackward {
    pub(crate) cap: f32,
}

impl CustomOp3 for SoftcapCrossEntropyBackward {
    fn name(&self) -> &'static str {
        "fused-softcap-cross-entropy-backward"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ts: &CpuStorage,
        tl: &Layout,
        ls: &CpuStorage,
        ll: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, vocab) = rows(xs, xl)?;
        let t = targets(ts, tl)?;
        let (loss_grad, _) = rows(ls, ll)?;
        let cap = self.cap;
        let mut dx = vec![0f32; x.len()];
        dx.par_chunks_mut(vocab)
            .zip(x.par_chunks(vocab))
            .zip(t.par_iter().zip(loss_grad.par_chunks(2)))
            .for_each(|((dx, x), (&t, lg))| {
                let zt = x
                    .get(t as usize)
                    .map_or(f32::NAN, |&x| cap * (x / cap).tanh());
                let (lse, g) = (lg[0] + zt, lg[1]);
                for (v, (dx, &x)) in dx.iter_mut().zip(x).enumerate() {
                    let th = (x / cap).tanh();
                    let p = (cap * th - lse).exp();
                    let hit = if v == t as usize { 1.0 } else { 0.0 };
                    *dx = g * (p - hit) * (1.0 - th * th);
                }
            });
        Ok((CpuStorage::F32(dx), xl.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        xs: &candle_core::CudaStorage,
        xl: &Layout,
        ts: &candle_core::CudaStorage,
        tl: &Layout,
        ls: &candle_core::CudaStorage,
        ll: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        crate::cuda::backward(self.cap, xs, xl, ts, tl, ls, ll)
    }
}
