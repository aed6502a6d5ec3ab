//! Rotary position embedding of `x [B, T, H, hd]`: each head's halves (x1, x2) turn by the
//! angle of their position, y1 = x1·cos + x2·sin, y2 = x2·cos − x1·sin. The plain path is eight
//! broadcast ops and a concatenation over strided halves each way; on an H200 they took ~40 ms
//! of a 330 ms training pass. The turn is linear, so its gradient is the turn back (sin
//! negated): one pass each way.

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::{Kernel, is_fused};

/// `x [B, T, H, hd]` turned by `cos, sin [T, hd/2]` (in x's dtype). Differentiable in `x`.
pub fn rotary(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let (_, t, _, hd) = x.dims4()?;
    if hd % 2 != 0 || cos.dims() != [t, hd / 2] || sin.dims() != [t, hd / 2] {
        candle_core::bail!(
            "rotary: x {:?} needs cos and sin of [{t}, {}], not {:?} and {:?}",
            x.dims(),
            hd / 2,
            cos.dims(),
            sin.dims()
        )
    }
    if x.elem_count() > 0 && is_fused(Kernel::Rotary, x.device(), x.dtype()) {
        let (cos, sin) = (cos.to_dtype(x.dtype())?, sin.to_dtype(x.dtype())?);
        return x.contiguous()?.apply_op3(
            &cos.contiguous()?,
            &sin.contiguous()?,
            Rotary { sign: 1.0 },
        );
    }
    plain::rotary(x, cos, sin)
}

pub(crate) mod plain {
    use super::*;

    pub fn rotary(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        let (_, t, _, hd) = x.dims4()?;
        let half = hd / 2;
        let cos = cos.to_dtype(x.dtype())?.reshape((1, t, 1, half))?;
        let sin = sin.to_dtype(x.dtype())?.reshape((1, t, 1, half))?;
        let x1 = x.narrow(3, 0, half)?;
        let x2 = x.narrow(3, half, half)?;
        let y1 = (x1.broadcast_mul(&cos)? + x2.broadcast_mul(&sin)?)?;
        let y2 = (x2.broadcast_mul(&cos)? - x1.broadcast_mul(&sin)?)?;
        Tensor::cat(&[y1, y2], 3)
    }
}

/// The turn by the angles (`sign` 1), or back (`sign` −1: the gradient).
pub(crate) struct Rotary {
    pub(crate) sign: f32,
}

impl CustomOp3 for Rotary {
    fn name(&self) -> &'static str {
        "fused-rotary"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        cs: &CpuStorage,
        cl: &Layout,
        ss: &CpuStorage,
        sl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, hd) = crate::rows(xs, xl)?;
        let (cos, half) = crate::rows(cs, cl)?;
        let (sin, _) = crate::rows(ss, sl)?;
        let (_, t, h, _) = xl.shape().dims4()?;
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(hd)
            .zip(x.par_chunks(hd))
            .enumerate()
            .for_each(|(row, (y, x))| {
                let pos = row / h % t;
                let (cos, sin) = (&cos[pos * half..][..half], &sin[pos * half..][..half]);
                let (x1, x2) = x.split_at(half);
                let (y1, y2) = y.split_at_mut(half);
                for i in 0..half {
                    let s = self.sign * sin[i];
                    y1[i] = x1[i] * cos[i] + x2[i] * s;
                    y2[i] = x2[i] * cos[i] - x1[i] * s;
                }
            });
        Ok((CpuStorage::F32(y), xl.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        xs: &candle_core::CudaStorage,
        xl: &Layout,
        cs: &candle_core::CudaStorage,
        cl: &Layout,
        ss: &candle_core::CudaStorage,
        sl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        crate::cuda::rotary(self.sign, (xs, xl), (cs, cl), (ss, sl))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let back = Rotary { sign: -self.sign };
        let dx = grad.contiguous()?.apply_op3_no_bwd(cos, sin, &back)?;
        Ok((Some(dx), None, None))
    }
}
