//! The residual stream's mix, `a·x + b·z` for one-element `a` and `b` (a layer's learned
//! scalars). The plain path, a broadcast product for each and an add, runs candle's strided
//! kernels on CUDA (a broadcast scalar is not contiguous: index arithmetic in 64 bits for every
//! element), twice each way; the fused op is one pass each way, the scalars' gradients summed by
//! block over a grid fixed by the size, then over the blocks (the same order every run).

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::{Kernel, is_fused};

/// `a·x + b·z` in x's dtype, the scalars taken at that precision. Differentiable in all four.
pub fn mix(x: &Tensor, a: &Tensor, z: &Tensor, b: &Tensor) -> Result<Tensor> {
    if a.elem_count() != 1 || b.elem_count() != 1 || x.shape() != z.shape() {
        candle_core::bail!(
            "mix: x {:?} and z {:?} must match and a {:?} and b {:?} hold one value each",
            x.dims(),
            z.dims(),
            a.dims(),
            b.dims()
        )
    }
    if x.elem_count() > 0 && x.dtype() == z.dtype() && is_fused(Kernel::Mix, x.device(), x.dtype())
    {
        return fused(x, a, z, b);
    }
    plain::mix(x, a, z, b)
}

/// The fused op itself, whatever `is_fused` says (the CUDA self-check runs it).
pub(crate) fn fused(x: &Tensor, a: &Tensor, z: &Tensor, b: &Tensor) -> Result<Tensor> {
    let ab = Tensor::cat(&[a.flatten_all()?, b.flatten_all()?], 0)?.to_dtype(DType::F32)?;
    x.contiguous()?.apply_op3(&z.contiguous()?, &ab, Mix)
}

pub(crate) mod plain {
    use super::*;

    /// Viewed as 1,024 rows where it divides: candle's CUDA backend sums a whole tensor into one
    /// value with a single block (0.86 ms for the 16.7 M elements of a 16-row residual on an
    /// H200), and the scalars' gradients are such sums.
    pub fn mix(x: &Tensor, a: &Tensor, z: &Tensor, b: &Tensor) -> Result<Tensor> {
        let n = x.elem_count();
        let rows = if n.is_multiple_of(1024) { 1024 } else { 1 };
        let scaled = |t: &Tensor, s: &Tensor| -> Result<Tensor> {
            let s = s
                .reshape((1, 1))?
                .to_dtype(t.dtype())?
                .broadcast_as((rows, 1))?;
            t.reshape((rows, n / rows))?.broadcast_mul(&s)
        };
        (scaled(x, a)? + scaled(z, b)?)?.reshape(x.shape())
    }
}

/// On `(x, z, [a, b])`, `[a, b]` in f32.
pub(crate) struct Mix;

impl CustomOp3 for Mix {
    fn name(&self) -> &'static str {
        "fused-mix"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        zs: &CpuStorage,
        zl: &Layout,
        abs: &CpuStorage,
        abl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        crate::same_shape(xl, zl)?;
        let (x, _) = crate::rows(xs, xl)?;
        let (z, _) = crate::rows(zs, zl)?;
        let (ab, _) = crate::rows(abs, abl)?;
        let (a, b) = (ab[0], ab[1]);
        let y = x.par_iter().zip(z).map(|(&x, &z)| a * x + b * z).collect();
        Ok((CpuStorage::F32(y), xl.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        xs: &candle_core::CudaStorage,
        xl: &Layout,
        zs: &candle_core::CudaStorage,
        zl: &Layout,
        abs: &candle_core::CudaStorage,
        abl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        crate::same_shape(xl, zl)?;
        crate::cuda::mix((xs, xl), (zs, zl), (abs, abl))
    }

    fn bwd(
        &self,
        x: &Tensor,
        z: &Tensor,
        ab: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        #[cfg(feature = "cuda")]
        if grad.device().is_cuda() {
            let (dx, dz, sums) = crate::cuda::mix_backward(x, z, ab, grad)?;
            return Ok((Some(dx), Some(dz), Some(sums.sum(0)?)));
        }
        let (a, b) = (ab.get(0)?, ab.get(1)?);
        let sum = |t: &Tensor| (grad * t)?.sum_all();
        let dab = Tensor::stack(&[sum(x)?, sum(z)?], 0)?;
        let (dx, dz) = (grad.broadcast_mul(&a)?, grad.broadcast_mul(&b)?);
        Ok((Some(dx), Some(dz), Some(dab)))
    }
}
