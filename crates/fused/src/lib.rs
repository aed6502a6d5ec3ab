//! Differentiable fused ops for `train/src/main.rs`.
//!
//! candle's fused softmax and RMSNorm have no backward pass (they drop gradients silently), so
//! the train file spelled both out in primitive ops: about six passes over the tensor forward
//! and a dozen backward, each with a fresh allocation. Here each is one pass forward and one
//! backward, with a hand-written gradient, on the CPU in f32. Other devices and dtypes take the
//! plain differentiable path, so a caller never has to ask which one runs.
//!
//! Attention's windowed softmax (`attention.rs`) and the soft-capped cross-entropy
//! (`cross_entropy.rs`) are fused on the CPU and, under the `cuda` feature, on CUDA too
//! (`kernels/`, each checked against the plain path on the GPU at its first use); on CUDA,
//! attention as a whole is cuDNN's fused SDPA (`cudnn/`) where its library is present and
//! passes its check, else one FlashAttention-2-style kernel of ours each way.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Device, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

pub mod attention;
pub mod cross_entropy;
#[cfg(feature = "cuda")]
mod cuda;
#[cfg(feature = "cuda")]
mod cudnn;
pub mod embedding;
pub mod gate_heads;
pub mod heads;
#[doc(hidden)]
pub mod isolated;
#[doc(hidden)]
pub mod launch;
pub mod mix;
pub mod rotary;
mod self_check;

pub use attention::{attention, causal_softmax};
pub use cross_entropy::softcap_cross_entropy;
pub use embedding::embedding;
pub use gate_heads::gate_heads;
pub use heads::heads;
pub use mix::mix;
pub use rotary::rotary;

/// Softmax over the last axis. Rows may hold `-inf` (masked keys), not only `-inf`.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    if fusable(x) {
        return x.contiguous()?.apply_op1(Softmax);
    }
    plain::softmax_last_dim(x)
}

/// cuDNN's version (91900 for 9.19.0) and the CUDA runtime's it was built for (13000), its
/// library opened: whether attention on CUDA can take cuDNN's path (its self-check decides).
/// Needs no GPU.
#[cfg(feature = "cuda")]
#[doc(hidden)]
pub fn cudnn_version() -> Result<(usize, usize)> {
    cudnn::loaded_version()
}

/// RMSNorm without weights over the last axis: `x / sqrt(mean(x²) + eps)`, computed in f32.
pub fn rms_norm(x: &Tensor, eps: f64) -> Result<Tensor> {
    if x.rank() > 0 && x.elem_count() > 0 && is_fused(Kernel::RmsNorm, x.device(), x.dtype()) {
        return x.contiguous()?.apply_op1(RmsNorm { eps });
    }
    plain::rms_norm(x, eps)
}

/// The ops with a fused path on CUDA too, each checked there against its plain path at first use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kernel {
    CrossEntropy,
    CausalSoftmax,
    Embedding,
    RmsNorm,
    Rotary,
    ReluSquared,
    Heads,
    Attention,
    Mix,
    GateHeads,
    /// Attention by cuDNN's fused SDPA, taken before the flash kernels where it passes.
    CudnnAttention,
}

impl Kernel {
    pub const ALL: [Kernel; 11] = [
        Kernel::CrossEntropy,
        Kernel::CausalSoftmax,
        Kernel::Embedding,
        Kernel::RmsNorm,
        Kernel::Rotary,
        Kernel::ReluSquared,
        Kernel::Heads,
        Kernel::Attention,
        Kernel::Mix,
        Kernel::GateHeads,
        Kernel::CudnnAttention,
    ];

    fn from_index(i: usize) -> Option<Kernel> {
        Kernel::ALL.get(i).copied()
    }
}

/// Whether `kernel` takes the fused path for `dtype` on `device`: f32 on the CPU; bf16 and f32
/// on CUDA once the kernel passed its self-check on this GPU. Attention is fused on CUDA only
/// (the flash kernels and cuDNN take bf16; elsewhere its softmax is the fused part).
pub fn is_fused(kernel: Kernel, device: &Device, dtype: DType) -> bool {
    match (device, dtype) {
        (d, DType::F32) if d.is_cpu() => {
            !matches!(kernel, Kernel::Attention | Kernel::CudnnAttention)
        }
        #[cfg(feature = "cuda")]
        (Device::Cuda(dev), DType::F32 | DType::BF16) => cuda::checked(kernel, dev),
        _ => {
            let _ = kernel;
            false
        }
    }
}

/// `max(x, 0)²`, the MLP's activation: one pass each way, where the plain path is ReLU and a
/// square forward, and backward a comparison, a cast and three products over the MLP's widest
/// tensor.
pub fn relu_squared(x: &Tensor) -> Result<Tensor> {
    if x.elem_count() > 0 && is_fused(Kernel::ReluSquared, x.device(), x.dtype()) {
        return x.contiguous()?.apply_op1(ReluSquared);
    }
    plain::relu_squared(x)
}

fn fusable(x: &Tensor) -> bool {
    x.device().is_cpu() && x.dtype() == DType::F32 && x.rank() > 0 && x.elem_count() > 0
}

/// The same functions from differentiable primitive ops: the reference, and the path for
/// devices without a fused kernel.
pub mod plain {
    use candle_core::{D, DType, Result, Tensor};

    pub use crate::attention::plain::{attention, causal_softmax};
    pub use crate::cross_entropy::plain::softcap_cross_entropy;
    pub use crate::gate_heads::plain::gate_heads;
    pub use crate::heads::plain::heads;
    pub use crate::mix::plain::mix;
    pub use crate::rotary::plain::rotary;

    pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
        // The max is a constant shift: no gradient flows through it.
        let max = x.max_keepdim(D::Minus1)?.detach();
        let e = x.broadcast_sub(&max)?.exp()?;
        e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
    }

    pub fn relu_squared(x: &Tensor) -> Result<Tensor> {
        x.relu()?.sqr()
    }

    pub fn rms_norm(x: &Tensor, eps: f64) -> Result<Tensor> {
        let dtype = x.dtype();
        let x = x.to_dtype(DType::F32)?;
        let rms = (x.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?;
        x.broadcast_div(&rms)?.to_dtype(dtype)
    }
}

/// The f32 rows of a contiguous CPU tensor, and its shape.
fn rows<'a>(storage: &'a CpuStorage, layout: &Layout) -> Result<(&'a [f32], usize)> {
    let CpuStorage::F32(data) = storage else {
        candle_core::bail!("fused ops run f32 on the CPU")
    };
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("fused ops need a contiguous input")
    };
    Ok((&data[start..end], *layout.dims().last().unwrap_or(&1)))
}

fn same_shape(a: &Layout, b: &Layout) -> Result<()> {
    if a.shape() != b.shape() {
        candle_core::bail!("shape mismatch: {:?} and {:?}", a.shape(), b.shape())
    }
    Ok(())
}

struct Softmax;

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "fused-softmax"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (x, n) = rows(storage, layout)?;
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(n).zip(x.par_chunks(n)).for_each(|(y, x)| {
            let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0f32;
            for (y, &x) in y.iter_mut().zip(x) {
                *y = (x - max).exp();
                sum += *y;
            }
            let inv = 1.0 / sum;
            y.iter_mut().for_each(|y| *y *= inv);
        });
        Ok((CpuStorage::F32(y), layout.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, y: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(
            y.apply_op2_no_bwd(&grad.contiguous()?, &SoftmaxBackward)?,
        ))
    }
}

/// dx = y ⊙ (g − Σ g⊙y), per row.
struct SoftmaxBackward;

impl CustomOp2 for SoftmaxBackward {
    fn name(&self) -> &'static str {
        "fused-softmax-backward"
    }

    fn cpu_fwd(
        &self,
        ys: &CpuStorage,
        yl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        same_shape(yl, gl)?;
        let (y, n) = rows(ys, yl)?;
        let (g, _) = rows(gs, gl)?;
        let mut dx = vec![0f32; y.len()];
        dx.par_chunks_mut(n)
            .zip(y.par_chunks(n).zip(g.par_chunks(n)))
            .for_each(|(dx, (y, g))| {
                let dot: f32 = y.iter().zip(g).map(|(y, g)| y * g).sum();
                for ((dx, &y), &g) in dx.iter_mut().zip(y).zip(g) {
                    *dx = y * (g - dot);
                }
            });
        Ok((CpuStorage::F32(dx), yl.shape().clone()))
    }
}

struct ReluSquared;

impl CustomOp1 for ReluSquared {
    fn name(&self) -> &'static str {
        "fused-relu-squared"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (x, _) = rows(storage, layout)?;
        let y = x.par_iter().map(|&x| x.max(0.0) * x.max(0.0)).collect();
        Ok((CpuStorage::F32(y), layout.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        storage: &candle_core::CudaStorage,
        layout: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        cuda::relu_squared(storage, layout, None)
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(x.apply_op2_no_bwd(
            &grad.contiguous()?,
            &ReluSquaredBackward,
        )?))
    }
}

/// dx = 2 · max(x, 0) · g.
struct ReluSquaredBackward;

impl CustomOp2 for ReluSquaredBackward {
    fn name(&self) -> &'static str {
        "fused-relu-squared-backward"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        same_shape(xl, gl)?;
        let (x, _) = rows(xs, xl)?;
        let (g, _) = rows(gs, gl)?;
        let dx = x
            .par_iter()
            .zip(g)
            .map(|(&x, &g)| 2.0 * x.max(0.0) * g)
            .collect();
        Ok((CpuStorage::F32(dx), xl.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        xs: &candle_core::CudaStorage,
        xl: &Layout,
        gs: &candle_core::CudaStorage,
        gl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        same_shape(xl, gl)?;
        cuda::relu_squared(xs, xl, Some((gs, gl)))
    }
}

struct RmsNorm {
    eps: f64,
}

impl CustomOp1 for RmsNorm {
    fn name(&self) -> &'static str {
        "fused-rms-norm"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (x, n) = rows(storage, layout)?;
        let eps = self.eps as f32;
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(n).zip(x.par_chunks(n)).for_each(|(y, x)| {
            let r = inv_rms(x, eps);
            for (y, &x) in y.iter_mut().zip(x) {
                *y = x * r;
            }
        });
        Ok((CpuStorage::F32(y), layout.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        storage: &candle_core::CudaStorage,
        layout: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        cuda::rms_norm(self.eps as f32, storage, layout, None)
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let op = RmsNormBackward { eps: self.eps };
        Ok(Some(x.apply_op2_no_bwd(&grad.contiguous()?, &op)?))
    }
}

fn inv_rms(x: &[f32], eps: f32) -> f32 {
    let mean_sq = x.iter().map(|x| x * x).sum::<f32>() / x.len() as f32;
    1.0 / (mean_sq + eps).sqrt()
}

/// With r = 1/sqrt(mean(x²) + eps) and y = x·r: dx = r · (g − y · mean(g⊙y)), per row.
struct RmsNormBackward {
    eps: f64,
}

impl CustomOp2 for RmsNormBackward {
    fn name(&self) -> &'static str {
        "fused-rms-norm-backward"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        same_shape(xl, gl)?;
        let (x, n) = rows(xs, xl)?;
        let (g, _) = rows(gs, gl)?;
        let eps = self.eps as f32;
        let mut dx = vec![0f32; x.len()];
        dx.par_chunks_mut(n)
            .zip(x.par_chunks(n).zip(g.par_chunks(n)))
            .for_each(|(dx, (x, g))| {
                let r = inv_rms(x, eps);
                let mean_gy = x.iter().zip(g).map(|(x, g)| x * r * g).sum::<f32>() / n as f32;
                for ((dx, &x), &g) in dx.iter_mut().zip(x).zip(g) {
                    *dx = r * (g - x * r * mean_gy);
                }
            });
        Ok((CpuStorage::F32(dx), xl.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        xs: &candle_core::CudaStorage,
        xl: &Layout,
        gs: &candle_core::CudaStorage,
        gl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        same_shape(xl, gl)?;
        cuda::rms_norm(self.eps as f32, xs, xl, Some((gs, gl)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, IndexOp, Var};

    /// Deterministic values in [-scale, scale), never all equal.
    fn random(shape: &[usize], seed: u64, scale: f32) -> Tensor {
        let mut state = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let n: usize = shape.iter().product();
        let data: Vec<f32> = (0..n)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((state >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
            })
            .collect();
        Tensor::from_vec(data, shape, &Device::Cpu).unwrap()
    }

    fn max_rel_err(a: &Tensor, b: &Tensor) -> f32 {
        let diff = (a - b).unwrap().abs().unwrap().max_all().unwrap();
        let size = b.abs().unwrap().max_all().unwrap();
        diff.to_scalar::<f32>().unwrap() / size.to_scalar::<f32>().unwrap().max(1e-30)
    }

    /// Values and gradients (of a random weighting of the output) of `fused` against `plain`.
    fn compare(
        x: &Tensor,
        fused: impl Fn(&Tensor) -> Result<Tensor>,
        plain: impl Fn(&Tensor) -> Result<Tensor>,
    ) -> (f32, f32) {
        let w = random(x.dims(), 99, 1.0);
        let run = |f: &dyn Fn(&Tensor) -> Result<Tensor>| {
            let var = Var::from_tensor(x).unwrap();
            let y = f(var.as_tensor()).unwrap();
            let loss = (&y * &w).unwrap().sum_all().unwrap();
            let grad = loss
                .backward()
                .unwrap()
                .get(var.as_tensor())
                .unwrap()
                .clone();
            (y, grad)
        };
        let (y_fused, g_fused) = run(&fused);
        let (y_plain, g_plain) = run(&plain);
        assert_eq!(y_fused.dims(), x.dims());
        (
            max_rel_err(&y_fused, &y_plain),
            max_rel_err(&g_fused, &g_plain),
        )
    }

    #[test]
    fn softmax_matches_the_plain_path_values_and_gradients() {
        // Attention-shaped scores with a causal mask of -inf, plus a wide row of large values.
        let scores = random(&[2, 3, 16, 16], 1, 8.0);
        let mask: Vec<f32> = (0..16 * 16)
            .map(|n| {
                if n % 16 <= n / 16 {
                    0.0
                } else {
                    f32::NEG_INFINITY
                }
            })
            .collect();
        let mask = Tensor::from_vec(mask, (16, 16), &Device::Cpu).unwrap();
        let masked = scores.broadcast_add(&mask).unwrap();
        for x in [masked, random(&[4, 1000], 2, 60.0), random(&[7], 3, 1.0)] {
            let (value, grad) = compare(&x, softmax_last_dim, plain::softmax_last_dim);
            assert!(
                value < 1e-5 && grad < 1e-5,
                "{:?}: {value} {grad}",
                x.dims()
            );
        }
    }

    #[test]
    fn rms_norm_matches_the_plain_path_values_and_gradients() {
        for (x, eps) in [
            (random(&[2, 5, 64], 4, 3.0), 1e-6),
            (random(&[3, 128], 5, 1e-3), 1e-6), // eps matters at this scale
            (random(&[9], 6, 1.0), 1e-5),
        ] {
            let (value, grad) = compare(&x, |x| rms_norm(x, eps), |x| plain::rms_norm(x, eps));
            assert!(
                value < 1e-5 && grad < 1e-4,
                "{:?}: {value} {grad}",
                x.dims()
            );
        }
    }

    #[test]
    fn a_transposed_input_is_made_contiguous_and_other_dtypes_take_the_plain_path() {
        let x = random(&[6, 4], 7, 2.0).t().unwrap();
        let (value, grad) = compare(&x, softmax_last_dim, plain::softmax_last_dim);
        assert!(value < 1e-5 && grad < 1e-5);
        let x64 = random(&[3, 8], 8, 2.0).to_dtype(DType::F64).unwrap();
        let y = rms_norm(&x64, 1e-6).unwrap();
        assert_eq!(y.dtype(), DType::F64);
        let back = plain::rms_norm(&x64, 1e-6).unwrap();
        let diff = (y - back).unwrap().abs().unwrap().max_all().unwrap();
        assert_eq!(diff.to_scalar::<f64>().unwrap(), 0.0);
    }

    /// Values and gradients (of a random weighting of the per-token losses) of the fused
    /// soft-capped cross-entropy against the plain path.
    fn compare_cross_entropy(x: &Tensor, targets: &Tensor, cap: f64) -> (f32, f32) {
        let w = random(targets.dims(), 98, 1.0);
        let run = |f: &dyn Fn(&Tensor) -> Result<Tensor>| {
            let var = Var::from_tensor(x).unwrap();
            let y = f(var.as_tensor()).unwrap();
            assert_eq!(y.dims(), targets.dims());
            let grads = (&y * &w).unwrap().sum_all().unwrap().backward().unwrap();
            (y, grads.get(var.as_tensor()).unwrap().clone())
        };
        let (y_fused, g_fused) = run(&|x| softcap_cross_entropy(x, targets, cap));
        let (y_plain, g_plain) = run(&|x| plain::softcap_cross_entropy(x, targets, cap));
        (
            max_rel_err(&y_fused, &y_plain),
            max_rel_err(&g_fused, &g_plain),
        )
    }

    fn random_targets(shape: &[usize], vocab: usize, seed: u64) -> Tensor {
        let r = random(shape, seed, 1.0).flatten_all().unwrap();
        let t: Vec<u32> = r
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .map(|r| (((r + 1.0) / 2.0 * vocab as f32) as u32).min(vocab as u32 - 1))
            .collect();
        Tensor::from_vec(t, shape, &Device::Cpu).unwrap()
    }

    #[test]
    fn softcap_cross_entropy_matches_the_plain_path_values_and_gradients() {
        // Logits past the cap (saturated tanh), a batch of rows, an odd vocabulary, one row.
        for (dims, vocab, scale, cap) in [
            (vec![2, 5], 300, 60.0, 15.0),
            (vec![7], 1003, 3.0, 15.0),
            (vec![1], 17, 10.0, 5.0),
        ] {
            let mut shape = dims.clone();
            shape.push(vocab);
            let x = random(&shape, vocab as u64, scale);
            let t = random_targets(&dims, vocab, 11);
            let (value, grad) = compare_cross_entropy(&x, &t, cap);
            assert!(value < 1e-5 && grad < 1e-5, "{shape:?}: {value} {grad}");
        }
    }

    #[test]
    fn softcap_cross_entropy_refuses_bad_targets_and_takes_the_plain_path_elsewhere() {
        let x = random(&[3, 8], 12, 4.0);
        // A target past the vocabulary is a NaN loss (the train loop stops on it), not a read
        // out of bounds.
        let t = Tensor::new(&[1u32, 8, 2], &Device::Cpu).unwrap();
        let loss = softcap_cross_entropy(&x, &t, 15.0)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert!(
            loss[0].is_finite() && loss[1].is_nan() && loss[2].is_finite(),
            "{loss:?}"
        );
        // Targets of the wrong shape or dtype are an error naming both shapes.
        let err = softcap_cross_entropy(&x, &Tensor::new(&[1u32, 2], &Device::Cpu).unwrap(), 15.0)
            .unwrap_err()
            .to_string();
        assert!(err.contains("[3, 8]") && err.contains("[2]"), "{err}");
        assert!(softcap_cross_entropy(&x, &t.to_dtype(DType::I64).unwrap(), 15.0).is_err());
        // f64 logits take the plain path: the same figures exactly.
        let t = random_targets(&[3], 8, 13);
        let x64 = x.to_dtype(DType::F64).unwrap();
        let a = softcap_cross_entropy(&x64, &t, 15.0).unwrap();
        let b = plain::softcap_cross_entropy(&x64, &t, 15.0).unwrap();
        assert_eq!(a.dtype(), DType::F32);
        let diff = (a - b).unwrap().abs().unwrap().max_all().unwrap();
        assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0);
    }

    #[test]
    fn causal_softmax_matches_the_plain_path_values_and_gradients() {
        // Windows shorter than the rows, of one key (the diagonal), and past the rows (causal).
        for (shape, window) in [
            (vec![2, 3, 16, 16], 5),
            (vec![2, 3, 16, 16], 0),
            (vec![1, 2, 33, 33], 100),
            (vec![7, 7], 3),
        ] {
            let x = random(&shape, 21, 6.0);
            let (value, grad) = compare(
                &x,
                |x| causal_softmax(x, 0.25, window),
                |x| plain::causal_softmax(x, 0.25, window),
            );
            assert!(
                value < 1e-5 && grad < 1e-5,
                "{shape:?} window {window}: {value} {grad}"
            );
        }
    }

    #[test]
    fn causal_softmax_is_zero_outside_the_window_and_wants_square_scores() {
        let p = causal_softmax(&random(&[6, 6], 22, 3.0), 1.0, 2).unwrap();
        let p = p.to_vec2::<f32>().unwrap();
        for (i, row) in p.iter().enumerate() {
            for (j, &v) in row.iter().enumerate() {
                let seen = j <= i && i - j <= 2;
                assert_eq!(v > 0.0, seen, "query {i} key {j}: {v}");
            }
            assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-6, "{row:?}");
        }
        let err = causal_softmax(&random(&[4, 5], 23, 1.0), 1.0, 2)
            .unwrap_err()
            .to_string();
        assert!(err.contains("[4, 5]"), "{err}");
    }

    /// The table's gradient of `Σ w ⊙ f(table)`, and the value.
    fn embedding_run(
        table: &Tensor,
        ids: &Tensor,
        f: impl Fn(&Tensor, &Tensor) -> Result<Tensor>,
    ) -> (Tensor, Tensor) {
        let var = Var::from_tensor(table).unwrap();
        let y = f(var.as_tensor(), ids).unwrap();
        let w = random(y.dims(), 31, 1.0);
        let grads = (&y * &w).unwrap().sum_all().unwrap().backward().unwrap();
        (y, grads.get(var.as_tensor()).unwrap().clone())
    }

    #[test]
    fn embedding_matches_index_select_values_and_gradients() {
        let (vocab, d) = (11, 6);
        let table = random(&[vocab, d], 30, 1.0);
        // Repeats, a row never chosen (10), the first and the last rows.
        let ids =
            Tensor::new(&[3u32, 0, 3, 9, 1, 3, 0, 7, 2, 9, 4, 5, 6, 8], &Device::Cpu).unwrap();
        let (y, g) = embedding_run(&table, &ids, |t, i| embedding(t, i, DType::F32));
        let (want_y, want_g) = embedding_run(&table, &ids, |t, i| t.index_select(i, 0));
        assert_eq!(y.dims(), [14, d]);
        assert_eq!(g.dims(), [vocab, d]);
        assert_eq!(max_rel_err(&y, &want_y), 0.0);
        assert!(max_rel_err(&g, &want_g) < 1e-6);
        let unused = g.get(10).unwrap().abs().unwrap().sum_all().unwrap();
        assert_eq!(unused.to_scalar::<f32>().unwrap(), 0.0);
        let bad = Tensor::new(&[1u32, 11], &Device::Cpu).unwrap();
        let err = embedding(&table, &bad, DType::F32).unwrap_err().to_string();
        assert!(err.contains("id 11") && err.contains("11 rows"), "{err}");
    }

    #[test]
    fn rotary_matches_the_plain_path_values_and_gradients_and_turns_back() {
        let (b, t, h, hd) = (2, 5, 3, 8);
        let angles: Vec<f32> = (0..t * hd / 2).map(|i| i as f32 * 0.3).collect();
        let angles = Tensor::from_vec(angles, (t, hd / 2), &Device::Cpu).unwrap();
        let (cos, sin) = (angles.cos().unwrap(), angles.sin().unwrap());
        let x = random(&[b, t, h, hd], 32, 2.0);
        let (value, grad) = compare(
            &x,
            |x| rotary(x, &cos, &sin),
            |x| plain::rotary(x, &cos, &sin),
        );
        assert!(value < 1e-6 && grad < 1e-6, "{value} {grad}");
        // A turn keeps each pair's length, and turning by −angle undoes it.
        let y = rotary(&x, &cos, &sin).unwrap();
        let norm = |x: &Tensor| {
            x.sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        };
        assert!((norm(&y) - norm(&x)).abs() < 1e-3 * norm(&x));
        let back = rotary(&y, &cos, &sin.neg().unwrap()).unwrap();
        assert!(max_rel_err(&back, &x) < 1e-5);
        let err = rotary(&x, &cos.narrow(0, 0, 4).unwrap(), &sin)
            .unwrap_err()
            .to_string();
        assert!(err.contains("[5, 4]"), "{err}");
    }

    /// Values and every input's gradient (of a random weighting of the output) of `fused`
    /// against `plain`.
    fn compare_all(
        inputs: &[Tensor],
        fused: impl Fn(&[Tensor]) -> Result<Tensor>,
        plain: impl Fn(&[Tensor]) -> Result<Tensor>,
    ) -> (f32, Vec<f32>) {
        let run = |f: &dyn Fn(&[Tensor]) -> Result<Tensor>| {
            let vars: Vec<Var> = inputs
                .iter()
                .map(|x| Var::from_tensor(x).unwrap())
                .collect();
            let xs: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
            let y = f(&xs).unwrap();
            let w = random(y.dims(), 97, 1.0);
            let grads = (&y * &w).unwrap().sum_all().unwrap().backward().unwrap();
            let g: Vec<Tensor> = xs.iter().map(|x| grads.get(x).unwrap().clone()).collect();
            (y, g)
        };
        let (y_fused, g_fused) = run(&fused);
        let (y_plain, g_plain) = run(&plain);
        assert_eq!(y_fused.dims(), y_plain.dims());
        let grads = g_fused
            .iter()
            .zip(&g_plain)
            .map(|(f, p)| {
                assert_eq!(f.dims(), p.dims());
                max_rel_err(f, p)
            })
            .collect();
        (max_rel_err(&y_fused, &y_plain), grads)
    }

    #[test]
    fn mix_matches_the_plain_path_values_and_all_four_gradients() {
        for shape in [vec![2, 8, 64], vec![3, 5]] {
            let scalar = |v: f32| Tensor::new(&[[v]], &Device::Cpu).unwrap();
            let inputs = [
                random(&shape, 40, 2.0),
                scalar(0.93),
                random(&shape, 41, 2.0),
                scalar(0.1),
            ];
            let (value, grads) = compare_all(
                &inputs,
                |i| mix(&i[0], &i[1], &i[2], &i[3]),
                |i| plain::mix(&i[0], &i[1], &i[2], &i[3]),
            );
            assert!(value < 1e-6, "{value}");
            assert!(grads.iter().all(|&g| g < 1e-5), "{grads:?}");
        }
        let x = random(&[4], 42, 1.0);
        let err = mix(&x, &random(&[2], 43, 1.0), &x, &x.get(0).unwrap())
            .unwrap_err()
            .to_string();
        assert!(err.contains("one value each"), "{err}");
    }

    #[test]
    fn gate_heads_matches_the_plain_path_and_puts_each_head_first() {
        let (b, t, h, hd) = (2, 5, 3, 4);
        let inputs = [
            random(&[b, t, h * hd], 44, 2.0),
            random(&[b, t, h], 45, 2.0),
        ];
        let (value, grads) = compare_all(
            &inputs,
            |i| gate_heads(&i[0], &i[1]),
            |i| plain::gate_heads(&i[0], &i[1]),
        );
        assert!(value < 1e-6, "{value}");
        assert!(grads.iter().all(|&g| g < 1e-6), "{grads:?}");
        // Head-major and contiguous: y[b, h, t, d] = x[b, t, h·hd + d] · gate[b, t, h].
        let y = gate_heads(&inputs[0], &inputs[1]).unwrap();
        assert_eq!(y.dims(), [b, h, t, hd]);
        assert!(y.is_contiguous());
        let (x, gate) = (
            inputs[0].to_vec3::<f32>().unwrap(),
            inputs[1].to_vec3::<f32>().unwrap(),
        );
        let got = y.i((1, 2, 3, 1)).unwrap().to_scalar::<f32>().unwrap();
        assert_eq!(got, x[1][3][2 * hd + 1] * gate[1][3][2]);
        let err = gate_heads(&inputs[0], &random(&[b, t, 5], 46, 1.0))
            .unwrap_err()
            .to_string();
        assert!(err.contains("heads dividing 12"), "{err}");
    }

    #[test]
    fn relu_squared_matches_the_plain_path_values_and_gradients() {
        let x = random(&[3, 7, 33], 44, 2.0);
        let (value, grad) = compare(&x, relu_squared, plain::relu_squared);
        assert!(value < 1e-6 && grad < 1e-6, "{value} {grad}");
    }

    #[test]
    fn attention_matches_the_plain_path_and_puts_heads_side_by_side() {
        let (b, h, t, hd) = (2, 3, 9, 4);
        let heads = random(&[3, b, h, t, hd], 60, 2.0);
        let plus = random(&[b, h, t, hd], 62, 1.0);
        let w = random(&[b, t, h, hd], 61, 1.0);
        type Attend<'a> = &'a dyn Fn(&Tensor, Option<&Tensor>) -> Result<Tensor>;
        let run = |f: Attend, with_plus: bool| {
            let (x, p) = (
                Var::from_tensor(&heads).unwrap(),
                Var::from_tensor(&plus).unwrap(),
            );
            let y = f(x.as_tensor(), with_plus.then_some(p.as_tensor())).unwrap();
            let grads = (&y * &w).unwrap().sum_all().unwrap().backward().unwrap();
            let dp = grads.get(p.as_tensor()).cloned();
            (y, grads.get(x.as_tensor()).unwrap().clone(), dp)
        };
        for with_plus in [false, true] {
            let (y, g, dp) = run(&|x, p| attention(x, p, 4), with_plus);
            let (want_y, want_g, want_dp) = run(&|x, p| plain::attention(x, p, 4), with_plus);
            assert_eq!(y.dims(), [b, t, h, hd]);
            assert!(max_rel_err(&y, &want_y) < 1e-5 && max_rel_err(&g, &want_g) < 1e-5);
            if with_plus {
                // v_plus's gradient is v's.
                let (dp, want_dp) = (dp.unwrap(), want_dp.unwrap());
                assert!(max_rel_err(&dp, &want_dp) < 1e-5);
                assert!(max_rel_err(&dp, &g.get(2).unwrap()) < 1e-6);
            } else {
                assert!(dp.is_none());
            }
        }
        // The first query sees only the first key: its output is the first value, per head.
        let y = attention(&heads, Some(&plus), 4).unwrap();
        let first = y.narrow(1, 0, 1).unwrap().squeeze(1).unwrap();
        let v0 = (heads.get(2).unwrap() + &plus).unwrap();
        let v0 = v0.narrow(2, 0, 1).unwrap().squeeze(2).unwrap();
        assert!(max_rel_err(&first, &v0) < 1e-6);
        // The flash kernels are CUDA's: the CPU materialises the scores.
        assert!(!is_fused(Kernel::Attention, &Device::Cpu, DType::F32));
        let err = attention(&heads.narrow(0, 0, 2).unwrap(), None, 4)
            .unwrap_err()
            .to_string();
        assert!(err.contains("[3, B, H, T, hd]"), "{err}");
    }

    #[test]
    fn heads_match_the_composed_plain_path_values_and_gradients() {
        let (b, t, h, hd) = (2, 5, 3, 8);
        let angles: Vec<f32> = (0..t * hd / 2).map(|i| i as f32 * 0.3).collect();
        let angles = Tensor::from_vec(angles, (t, hd / 2), &Device::Cpu).unwrap();
        let rope = Tensor::stack(&[angles.cos().unwrap(), angles.sin().unwrap()], 0).unwrap();
        let qkv = random(&[b, t, 3 * h * hd], 50, 2.0);
        let w = random(&[3, b, h, t, hd], 51, 1.0);
        let run = |f: &dyn Fn(&Tensor) -> Result<Tensor>| {
            let var = Var::from_tensor(&qkv).unwrap();
            let y = f(var.as_tensor()).unwrap();
            let grads = (&y * &w).unwrap().sum_all().unwrap().backward().unwrap();
            (y, grads.get(var.as_tensor()).unwrap().clone())
        };
        let (y, g) = run(&|x| heads(x, h, &rope, 1e-6));
        let (want_y, want_g) = run(&|x| plain::heads(x, h, &rope, 1e-6));
        assert_eq!(y.dims(), [3, b, h, t, hd]);
        assert!(
            max_rel_err(&y, &want_y) < 1e-5,
            "{}",
            max_rel_err(&y, &want_y)
        );
        assert!(
            max_rel_err(&g, &want_g) < 1e-5,
            "{}",
            max_rel_err(&g, &want_g)
        );
        // v is qkv's last third, head-major.
        let v = y
            .get(2)
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .flatten_from(2)
            .unwrap();
        let want_v = qkv.narrow(2, 2 * h * hd, h * hd).unwrap();
        assert_eq!(max_rel_err(&v, &want_v), 0.0);
        let err = heads(&qkv, 4, &rope, 1e-6).unwrap_err().to_string();
        assert!(err.contains("4 heads"), "{err}");
    }
}
