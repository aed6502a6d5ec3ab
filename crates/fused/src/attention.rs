//! Causal attention with a sliding window. On CUDA in bf16, FlashAttention-2-style kernels
//! (`kernels/flash_attention.cu`) that keep the T × T scores in registers, a tile at a time;
//! elsewhere the scores are materialised and go through `causal_softmax`: the scale and the
//! window applied inside one pass forward and one backward, in place of the plain path's scale,
//! cast to f32, mask add, softmax (five passes) and cast back, each way. At the h100 preset's
//! pass (16 × 4 heads × 2048²) each of those passes moves ~1 GB per layer.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, D, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::{Kernel, is_fused, rows, same_shape};

/// Attention over `heads [3, B, H, T, hd]` (q, k and v, as `heads` makes them), with
/// `v_plus [B, H, T, hd]` added to v when given, the scale 1/√hd, and query i seeing keys
/// `i − window ..= i`: `[B, T, H, hd]`, heads side by side for the output projection.
/// Differentiable in `heads` and `v_plus`. q, k and v are taken apart here, not by the caller:
/// on CUDA the gradient of `heads` then comes back as the one tensor the kernels write, where
/// three `get`s would each pad their part's gradient with zeros to full size and add them
/// (candle's narrow backward: ~40 passes over a layer's q, k and v).
pub fn attention(heads: &Tensor, v_plus: Option<&Tensor>, window: usize) -> Result<Tensor> {
    let (three, b, h, t, hd) = heads.dims5()?;
    if three != 3 || v_plus.is_some_and(|p| p.dims() != [b, h, t, hd]) {
        candle_core::bail!(
            "attention: heads {:?} must be [3, B, H, T, hd] and v_plus {:?} [B, H, T, hd]",
            heads.dims(),
            v_plus.map(|p| p.dims())
        )
    }
    let window = window.min(t);
    #[cfg(feature = "cuda")]
    if flash::fits(heads, v_plus) {
        let (device, dtype) = (heads.device(), heads.dtype());
        if let Some(deterministic) = crate::cudnn::chosen()
            && let candle_core::Device::Cuda(dev) = device
            && is_fused(Kernel::CudnnAttention, device, dtype)
            && crate::cudnn::supports(dev, (b, h, t, hd), window, deterministic)
        {
            let backend = flash::Backend::Cudnn { deterministic };
            return flash::apply_or_fall_back(heads, v_plus, window, backend);
        }
        if is_fused(Kernel::Attention, device, dtype) {
            return flash::apply(heads, v_plus, window, flash::Backend::Flash);
        }
    }
    let (q, k, v) = parts(heads, v_plus)?;
    materialised(&q, &k, &v, window, &causal_softmax)
}

/// q, k and v from `heads`, `v_plus` added to v.
fn parts(heads: &Tensor, v_plus: Option<&Tensor>) -> Result<(Tensor, Tensor, Tensor)> {
    let v = match v_plus {
        Some(p) => (heads.get(2)? + p)?,
        None => heads.get(2)?,
    };
    Ok((heads.get(0)?, heads.get(1)?, v))
}

type Softmax<'a> = &'a dyn Fn(&Tensor, f64, usize) -> Result<Tensor>;

/// Scores, `softmax`, and the product with v.
fn materialised(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    window: usize,
    softmax: Softmax,
) -> Result<Tensor> {
    let scale = 1.0 / (q.dim(3)? as f64).sqrt();
    let p = softmax(&q.matmul(&k.t()?)?, scale, window)?;
    p.matmul(v)?.transpose(1, 2)
}

/// `softmax(scale · scores + mask)` over the last axis of `scores [.., T, T]` (queries × keys),
/// where query i sees keys `i − window ..= i` (FlashAttention's `(window, 0)`); computed in f32,
/// returned in the scores' dtype, exactly 0 outside the window. Differentiable in `scores`.
pub fn causal_softmax(scores: &Tensor, scale: f64, window: usize) -> Result<Tensor> {
    let dims = scores.dims();
    let t = dims.last().copied().unwrap_or(0);
    if dims.len() < 2 || dims[dims.len() - 2] != t || t == 0 {
        candle_core::bail!("causal_softmax: scores {dims:?} must end in [T, T]")
    }
    let op = CausalSoftmax {
        scale: scale as f32,
        window: window.min(t),
    };
    if scores.elem_count() > 0 && is_fused(Kernel::CausalSoftmax, scores.device(), scores.dtype()) {
        return scores.contiguous()?.apply_op1(op);
    }
    plain::causal_softmax(scores, scale, window)
}

pub(crate) mod plain {
    use super::*;

    /// The reference: materialised scores and the plain softmax.
    pub fn attention(heads: &Tensor, v_plus: Option<&Tensor>, window: usize) -> Result<Tensor> {
        let (q, k, v) = parts(heads, v_plus)?;
        materialised(&q, &k, &v, window, &causal_softmax)
    }

    /// The same from an additive mask and differentiable ops: the reference.
    pub fn causal_softmax(scores: &Tensor, scale: f64, window: usize) -> Result<Tensor> {
        let t = scores.dim(D::Minus1)?;
        // The mask is made on the device (no T × T upload per call): i − j for query i, key j.
        let device = scores.device();
        let pos = Tensor::arange(0f32, t as f32, device)?;
        let back = pos.reshape((t, 1))?.broadcast_sub(&pos.reshape((1, t))?)?;
        let seen = (back.ge(0f32)? * back.le(window as f32)?)?;
        let mask = seen.where_cond(
            &Tensor::zeros((t, t), DType::F32, device)?,
            &Tensor::full(f32::NEG_INFINITY, (t, t), device)?,
        )?;
        let x = (scores.to_dtype(DType::F32)? * scale)?.broadcast_add(&mask)?;
        crate::plain::softmax_last_dim(&x)?.to_dtype(scores.dtype())
    }
}

/// The keys query `row % t` sees.
fn window_of(row: usize, t: usize, window: usize) -> std::ops::RangeInclusive<usize> {
    let i = row % t;
    i.saturating_sub(window)..=i
}

pub(crate) struct CausalSoftmax {
    pub(crate) scale: f32,
    pub(crate) window: usize,
}

impl CustomOp1 for CausalSoftmax {
    fn name(&self) -> &'static str {
        "fused-causal-softmax"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (s, t) = rows(storage, layout)?;
        let mut p = vec![0f32; s.len()];
        p.par_chunks_mut(t)
            .zip(s.par_chunks(t))
            .enumerate()
            .for_each(|(row, (p, s))| {
                let keys = window_of(row, t, self.window);
                let (p, s) = (&mut p[keys.clone()], &s[keys]);
                let max = s
                    .iter()
                    .fold(f32::NEG_INFINITY, |m, &x| m.max(self.scale * x));
                let mut sum = 0f32;
                for (p, &x) in p.iter_mut().zip(s) {
                    *p = (self.scale * x - max).exp();
                    sum += *p;
                }
                let inv = 1.0 / sum;
                p.iter_mut().for_each(|p| *p *= inv);
            });
        Ok((CpuStorage::F32(p), layout.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        storage: &candle_core::CudaStorage,
        layout: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        crate::cuda::causal_softmax(self, storage, layout)
    }

    fn bwd(&self, _s: &Tensor, p: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let op = CausalSoftmaxBackward {
            scale: self.scale,
            window: self.window,
        };
        Ok(Some(p.apply_op2_no_bwd(&grad.contiguous()?, &op)?))
    }
}

/// ds = scale · p ⊙ (g − Σ g⊙p) over the window, 0 outside it.
pub(crate) struct CausalSoftmaxBackward {
    pub(crate) scale: f32,
    pub(crate) window: usize,
}

impl CustomOp2 for CausalSoftmaxBackward {
    fn name(&self) -> &'static str {
        "fused-causal-softmax-backward"
    }

    fn cpu_fwd(
        &self,
        ps: &CpuStorage,
        pl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        same_shape(pl, gl)?;
        let (p, t) = rows(ps, pl)?;
        let (g, _) = rows(gs, gl)?;
        let mut ds = vec![0f32; p.len()];
        ds.par_chunks_mut(t)
            .zip(p.par_chunks(t).zip(g.par_chunks(t)))
            .enumerate()
            .for_each(|(row, (ds, (p, g)))| {
                let keys = window_of(row, t, self.window);
                let (ds, p, g) = (&mut ds[keys.clone()], &p[keys.clone()], &g[keys]);
                let dot: f32 = p.iter().zip(g).map(|(p, g)| p * g).sum();
                for ((ds, &p), &g) in ds.iter_mut().zip(p).zip(g) {
                    *ds = self.scale * p * (g - dot);
                }
            });
        Ok((CpuStorage::F32(ds), pl.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        ps: &candle_core::CudaStorage,
        pl: &Layout,
        gs: &candle_core::CudaStorage,
        gl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        crate::cuda::causal_softmax_backward(self, ps, pl, gs, gl)
    }
}

/// The fused op on CUDA, by the FlashAttention-2-style kernels or by cuDNN's fused SDPA: bf16,
/// head size 64 or 128, T a multiple of 64.
#[cfg(feature = "cuda")]
pub mod flash {
    use std::sync::Mutex;

    use candle_core::cuda_backend::cudarc::driver::CudaSlice;
    use candle_core::{
        CudaStorage, CustomOp1, CustomOp2, DType, Device, Layout, Result, Shape, Storage, Tensor,
    };

    /// Whether the kernels take these inputs: bf16 on CUDA, of the shapes `cuda::flash_dims`
    /// allows.
    pub(crate) fn fits(heads: &Tensor, v_plus: Option<&Tensor>) -> bool {
        let q = &heads.dims()[1..];
        matches!(heads.device(), Device::Cuda(_))
            && heads.dtype() == DType::BF16
            && v_plus.is_none_or(|p| p.dtype() == DType::BF16)
            && crate::cuda::flash_dims([q, q, q]).is_ok()
    }

    /// Who computes attention: our kernels (`kernels/flash_attention.cu`) or cuDNN's
    /// (`cudnn/sdpa.cpp`), whose backward can be made bitwise deterministic at some cost.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum Backend {
        Flash,
        Cudnn { deterministic: bool },
    }

    /// The op on `heads` (and `v_plus`) by `backend`, whatever its self-check said, failing
    /// where it fails (the bench and the checks call this; the train file calls `attention`).
    pub fn apply(
        heads: &Tensor,
        v_plus: Option<&Tensor>,
        window: usize,
        backend: Backend,
    ) -> Result<Tensor> {
        run(heads, v_plus, window, backend, false)
    }

    /// The same, where a cuDNN call that fails other than for memory hands the pass, and every
    /// later one, to our kernels (one warning line): a night's run goes on.
    pub(crate) fn apply_or_fall_back(
        heads: &Tensor,
        v_plus: Option<&Tensor>,
        window: usize,
        backend: Backend,
    ) -> Result<Tensor> {
        run(heads, v_plus, window, backend, true)
    }

    /// v with `v_plus` added is made here, outside the graph; its gradient is v's, so the op
    /// hands it to both.
    fn run(
        heads: &Tensor,
        v_plus: Option<&Tensor>,
        window: usize,
        backend: Backend,
        fallback: bool,
    ) -> Result<Tensor> {
        let heads = aligned(heads)?;
        let op = |v| FlashAttention {
            window,
            v,
            backend,
            fallback,
            lse: Mutex::new(None),
        };
        match v_plus {
            None => heads.apply_op1(op(None)),
            Some(p) => {
                let v = aligned(&(heads.detach().get(2)? + p.detach())?)?;
                heads.apply_op2(p, op(Some(v)))
            }
        }
    }

    /// Contiguous from a start the kernels' 16-byte loads can read from (a fresh buffer when
    /// not: `copy` would keep the offset).
    pub(crate) fn aligned(x: &Tensor) -> Result<Tensor> {
        let x = x.contiguous()?;
        if x.layout().start_offset().is_multiple_of(8) {
            Ok(x)
        } else {
            x.force_contiguous()
        }
    }

    pub(crate) struct FlashAttention {
        window: usize,
        /// v with `v_plus` added, when there is one (the op's second argument).
        v: Option<Tensor>,
        backend: Backend,
        /// Whether a failed cuDNN call hands attention to our kernels (`apply_or_fall_back`).
        fallback: bool,
        /// The rows' log-sum-exp `[B, H, T]` (base 2 from our kernels, e from cuDNN) and who
        /// made it (cuDNN may have failed and handed the pass to our kernels), which the forward
        /// pass leaves for the backward (candle's `bwd` sees only the output).
        lse: Mutex<Option<(CudaSlice<f32>, Backend)>>,
    }

    impl FlashAttention {
        /// `[B, T, H, hd]` from the heads' storage (q and k; v too unless replaced).
        fn forward(&self, hs: &CudaStorage, hl: &Layout) -> Result<(CudaStorage, Shape)> {
            let (_, b, h, t, hd) = hl.shape().dims5()?;
            let n = b * h * t * hd;
            if !hl.is_contiguous() {
                candle_core::bail!("flash attention: the heads must be contiguous")
            }
            let part =
                |i: usize| Layout::contiguous_with_offset((b, h, t, hd), hl.start_offset() + i * n);
            let (ql, kl) = (part(0), part(1));
            let forward = |vs, vl| {
                crate::cuda::flash_forward(
                    self.window,
                    (hs, &ql),
                    (hs, &kl),
                    (vs, vl),
                    self.backend,
                    self.fallback,
                )
            };
            let (o, lse, shape, used) = match &self.v {
                None => forward(hs, &part(2))?,
                Some(v) => {
                    let (storage, vl) = v.storage_and_layout();
                    let Storage::Cuda(vs) = &*storage else {
                        candle_core::bail!("flash attention: v must be on CUDA")
                    };
                    forward(vs, vl)?
                }
            };
            *self.lse.lock().unwrap_or_else(|e| e.into_inner()) = Some((lse, used));
            Ok((o, shape))
        }

        /// The heads' gradient `[3, B, H, T, hd]` (dq, dk, dv), one allocation.
        fn backward(&self, heads: &Tensor, o: &Tensor, d_o: &Tensor) -> Result<Tensor> {
            let Some((lse, used)) = self.lse.lock().unwrap_or_else(|e| e.into_inner()).take()
            else {
                candle_core::bail!("flash attention: a second backward pass through one forward")
            };
            let (q, k) = (heads.get(0)?, heads.get(1)?);
            let v = match &self.v {
                Some(v) => v.clone(),
                None => heads.get(2)?,
            };
            let tensors = [&q, &k, &v, o, &aligned(d_o)?];
            crate::cuda::flash_backward(self.window, &lse, tensors, used, self.fallback)
        }
    }

    fn cpu_only() -> Result<(candle_core::CpuStorage, Shape)> {
        candle_core::bail!("the flash attention kernels run on CUDA only")
    }

    impl CustomOp1 for FlashAttention {
        fn name(&self) -> &'static str {
            "fused-flash-attention"
        }

        fn cpu_fwd(
            &self,
            _: &candle_core::CpuStorage,
            _: &Layout,
        ) -> Result<(candle_core::CpuStorage, Shape)> {
            cpu_only()
        }

        fn cuda_fwd(&self, hs: &CudaStorage, hl: &Layout) -> Result<(CudaStorage, Shape)> {
            self.forward(hs, hl)
        }

        fn bwd(&self, heads: &Tensor, o: &Tensor, d_o: &Tensor) -> Result<Option<Tensor>> {
            Ok(Some(self.backward(heads, o, d_o)?))
        }
    }

    impl CustomOp2 for FlashAttention {
        fn name(&self) -> &'static str {
            "fused-flash-attention-v-plus"
        }

        fn cpu_fwd(
            &self,
            _: &candle_core::CpuStorage,
            _: &Layout,
            _: &candle_core::CpuStorage,
            _: &Layout,
        ) -> Result<(candle_core::CpuStorage, Shape)> {
            cpu_only()
        }

        fn cuda_fwd(
            &self,
            hs: &CudaStorage,
            hl: &Layout,
            _: &CudaStorage,
            _: &Layout,
        ) -> Result<(CudaStorage, Shape)> {
            self.forward(hs, hl)
        }

        fn bwd(
            &self,
            heads: &Tensor,
            _: &Tensor,
            o: &Tensor,
            d_o: &Tensor,
        ) -> Result<(Option<Tensor>, Option<Tensor>)> {
            let grads = self.backward(heads, o, d_o)?;
            let dv = grads.get(2)?;
            Ok((Some(grads), Some(dv)))
        }
    }
}
