//! The value residual's term: `x [B, T, H·hd]` (a value embedding) with each head's slice times
//! its gate `[B, T, H]`, head-major `[B, H, T, hd]`, the layout attention takes v in. The plain
//! path, a broadcast product and a transposed view, runs candle's strided kernels on CUDA (index
//! arithmetic in 64 bits for every element) for the product, for v's sum with it, and for both
//! products of the backward; the fused op is one pass each way and its output is contiguous.

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::{Kernel, is_fused};

/// `x [B, T, H·hd]` gated per head by `gate [B, T, H]` (x's dtype), as `[B, H, T, hd]`.
/// Differentiable in both.
pub fn gate_heads(x: &Tensor, gate: &Tensor) -> Result<Tensor> {
    let (b, t, width) = x.dims3()?;
    let (gb, gt, h) = gate.dims3()?;
    if (gb, gt) != (b, t) || h == 0 || !width.is_multiple_of(h) {
        candle_core::bail!(
            "gate_heads: x {:?} needs gates [{b}, {t}, heads] with heads dividing {width}, not {:?}",
            x.dims(),
            gate.dims()
        )
    }
    if x.elem_count() > 0
        && gate.dtype() == x.dtype()
        && is_fused(Kernel::GateHeads, x.device(), x.dtype())
    {
        return fused(x, gate);
    }
    plain::gate_heads(x, gate)
}

/// The fused op itself, whatever `is_fused` says (the CUDA self-check runs it).
pub(crate) fn fused(x: &Tensor, gate: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op2(&gate.contiguous()?, GateHeads)
}

pub(crate) mod plain {
    use super::*;

    pub fn gate_heads(x: &Tensor, gate: &Tensor) -> Result<Tensor> {
        let (b, t, h) = gate.dims3()?;
        let gate = gate.to_dtype(x.dtype())?.unsqueeze(3)?;
        x.reshape((b, t, h, ()))?
            .broadcast_mul(&gate)?
            .transpose(1, 2)
    }
}

pub(crate) struct GateHeads;

impl CustomOp2 for GateHeads {
    fn name(&self) -> &'static str {
        "fused-gate-heads"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, _) = crate::rows(xs, xl)?;
        let (gate, _) = crate::rows(gs, gl)?;
        let (b, t, h) = gl.shape().dims3()?;
        let hd = x.len() / gate.len().max(1);
        let mut y = vec![0f32; x.len()];
        // Output row (b, h, t) is input row (b, t, h).
        y.par_chunks_mut(hd).enumerate().for_each(|(out, y)| {
            let (pos, head, batch) = (out % t, out / t % h, out / (t * h));
            let row = (batch * t + pos) * h + head;
            for (y, &x) in y.iter_mut().zip(&x[row * hd..][..hd]) {
                *y = gate[row] * x;
            }
        });
        Ok((CpuStorage::F32(y), Shape::from((b, h, t, hd))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        xs: &candle_core::CudaStorage,
        xl: &Layout,
        gs: &candle_core::CudaStorage,
        gl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        crate::cuda::gate_heads((xs, xl), (gs, gl))
    }

    fn bwd(
        &self,
        x: &Tensor,
        gate: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        #[cfg(feature = "cuda")]
        if grad.device().is_cuda() {
            let (dx, dgate) = crate::cuda::gate_heads_backward(x, gate, grad)?;
            return Ok((Some(dx), Some(dgate)));
        }
        let (b, t, h) = gate.dims3()?;
        let g = grad.transpose(1, 2)?; // [B, T, H, hd]
        let dx = g.broadcast_mul(&gate.unsqueeze(3)?)?.reshape(x.shape())?;
        let dgate = (g * x.reshape((b, t, h, ()))?)?.sum(3)?;
        Ok((Some(dx), Some(dgate)))
    }
}
