//! The CUDA kernels (`kernels/*.cu`, built to PTX by build.rs with nvcc) and their start-up
//! self-check: a kernel that disagrees with the plain path on this GPU, or fails to load, is
//! not used; the run goes on on the plain path after one warning line.

use std::sync::OnceLock;

use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{CudaDType, CudaStorageSlice, WrapErr};
use candle_core::{CudaDevice, CudaStorage, DType, Device, Layout, Result, Shape, Tensor, Var};

use crate::cross_entropy::{SoftcapCrossEntropy, plain};

mod ptx {
    include!(concat!(env!("OUT_DIR"), "/ptx.rs"));
}

/// The kernels' block size (`THREADS` in the .cu files).
const THREADS: u32 = 256;

/// Whether the fused cross-entropy passed its self-check on this process's GPU (checked once).
pub(crate) fn checked(dev: &CudaDevice) -> bool {
    static PASSED: OnceLock<bool> = OnceLock::new();
    *PASSED.get_or_init(|| match self_check(dev) {
        Ok(()) => true,
        Err(e) => {
            eprintln!(
                "warning: the fused cross-entropy kernel failed its self-check on this GPU ({e}); the plain path runs instead"
            );
            false
        }
    })
}

/// Values and gradients of the kernel against the plain path on random inputs, in f32 and
/// bf16, at a vocabulary that is not a multiple of the block size.
fn self_check(dev: &CudaDevice) -> Result<()> {
    let device = Device::Cuda(dev.clone());
    let (rows, vocab, cap) = (37, 1003, 15.0);
    let x = host_random(rows * vocab, 1, 40.0);
    let t: Vec<u32> = host_random(rows, 2, 1.0)
        .iter()
        .map(|r| ((r + 1.0) / 2.0 * vocab as f32) as u32 % vocab as u32)
        .collect();
    let w = Tensor::from_vec(host_random(rows, 3, 1.0), rows, &device)?;
    let targets = Tensor::from_vec(t, rows, &device)?;
    for (dtype, tolerance) in [(DType::F32, 1e-4), (DType::BF16, 2e-2)] {
        let x = Tensor::from_vec(x.clone(), (rows, vocab), &device)?.to_dtype(dtype)?;
        let run = |fused: bool| -> Result<(Tensor, Tensor)> {
            let var = Var::from_tensor(&x)?;
            let loss = if fused {
                let op = SoftcapCrossEntropy { cap: cap as f32 };
                var.as_tensor().apply_op2(&targets, op)?
            } else {
                plain::softcap_cross_entropy(var.as_tensor(), &targets, cap)?
            };
            let grads = (&loss * &w)?.sum_all()?.backward()?;
            let Some(g) = grads.get(var.as_tensor()) else {
                candle_core::bail!("no gradient reached the logits")
            };
            Ok((loss, g.to_dtype(DType::F32)?))
        };
        let (loss, grad) = run(true)?;
        let (want_loss, want_grad) = run(false)?;
        for (what, got, want) in [("loss", &loss, &want_loss), ("gradient", &grad, &want_grad)] {
            let err = relative_error(got, want)?;
            if err.is_nan() || err > tolerance {
                candle_core::bail!("{dtype:?} {what}: relative error {err:.1e} > {tolerance:.0e}");
            }
        }
    }
    Ok(())
}

fn relative_error(got: &Tensor, want: &Tensor) -> Result<f32> {
    let diff = (got - want)?.abs()?.max_all()?.to_scalar::<f32>()?;
    let size = want.abs()?.max_all()?.to_scalar::<f32>()?;
    Ok(diff / size.max(1e-30))
}

/// Deterministic values in [-scale, scale).
fn host_random(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
        })
        .collect()
}

/// `[rows, vocab]` of a contiguous layout, and its start.
fn row_major(layout: &Layout) -> Result<(usize, usize, usize)> {
    let Some((start, _)) = layout.contiguous_offsets() else {
        candle_core::bail!("fused ops need a contiguous input")
    };
    let vocab = *layout.dims().last().unwrap_or(&1);
    Ok((start, layout.shape().elem_count() / vocab.max(1), vocab))
}

fn grid(rows: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (rows as u32, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

pub(crate) fn forward(
    cap: f32,
    xs: &CudaStorage,
    xl: &Layout,
    ts: &CudaStorage,
    tl: &Layout,
) -> Result<(CudaStorage, Shape)> {
    fn launch<T: CudaDType + DeviceRepr>(
        name: &str,
        dev: &CudaDevice,
        x: &CudaSlice<T>,
        xl: &Layout,
        t: &CudaSlice<u32>,
        tl: &Layout,
        cap: f32,
    ) -> Result<CudaSlice<f32>> {
        let (x_start, rows, vocab) = row_major(xl)?;
        let (t_start, _, _) = row_major(tl)?;
        let x = x.slice(x_start..x_start + rows * vocab);
        let t = t.slice(t_start..t_start + rows);
        let loss = unsafe { dev.alloc::<f32>(rows)? };
        let func = dev.get_or_load_custom_func(name, "fused-cross-entropy", ptx::CROSS_ENTROPY)?;
        let vocab = vocab as i32;
        let mut b = func.builder();
        b.arg(&x).arg(&t).arg(&loss).arg(&vocab).arg(&cap);
        // SAFETY: the kernel reads rows × vocab inputs and rows targets, writes rows losses.
        unsafe { b.launch(grid(rows)) }.w()?;
        Ok(loss)
    }
    let dev = &xs.device;
    let t = ts.as_cuda_slice::<u32>()?;
    let loss = match &xs.slice {
        CudaStorageSlice::BF16(x) => launch("softcap_ce_forward_bf16", dev, x, xl, t, tl, cap)?,
        CudaStorageSlice::F32(x) => launch("softcap_ce_forward_f32", dev, x, xl, t, tl, cap)?,
        _ => candle_core::bail!("the fused cross-entropy takes bf16 or f32 logits"),
    };
    Ok((
        CudaStorage::wrap_cuda_slice(loss, dev.clone()),
        tl.shape().clone(),
    ))
}

pub(crate) fn backward(
    cap: f32,
    xs: &CudaStorage,
    xl: &Layout,
    ts: &CudaStorage,
    tl: &Layout,
    ls: &CudaStorage,
    ll: &Layout,
) -> Result<(CudaStorage, Shape)> {
    #[allow(clippy::too_many_arguments)]
    fn launch<T: CudaDType + DeviceRepr>(
        name: &str,
        dev: &CudaDevice,
        x: &CudaSlice<T>,
        xl: &Layout,
        t: &CudaSlice<u32>,
        tl: &Layout,
        lg: &CudaSlice<f32>,
        ll: &Layout,
        cap: f32,
    ) -> Result<CudaSlice<T>> {
        let (x_start, rows, vocab) = row_major(xl)?;
        let (t_start, _, _) = row_major(tl)?;
        let (lg_start, _, _) = row_major(ll)?;
        let x = x.slice(x_start..x_start + rows * vocab);
        let t = t.slice(t_start..t_start + rows);
        let lg = lg.slice(lg_start..lg_start + 2 * rows);
        let dx = unsafe { dev.alloc::<T>(rows * vocab)? };
        let func = dev.get_or_load_custom_func(name, "fused-cross-entropy", ptx::CROSS_ENTROPY)?;
        let vocab = vocab as i32;
        let mut b = func.builder();
        b.arg(&x).arg(&t).arg(&lg).arg(&dx).arg(&vocab).arg(&cap);
        // SAFETY: reads rows × vocab inputs, rows targets and 2 × rows floats; writes rows × vocab.
        unsafe { b.launch(grid(rows)) }.w()?;
        Ok(dx)
    }
    let dev = &xs.device;
    let t = ts.as_cuda_slice::<u32>()?;
    let lg = ls.as_cuda_slice::<f32>()?;
    let dx = match &xs.slice {
        CudaStorageSlice::BF16(x) => CudaStorage::wrap_cuda_slice(
            launch("softcap_ce_backward_bf16", dev, x, xl, t, tl, lg, ll, cap)?,
            dev.clone(),
        ),
        CudaStorageSlice::F32(x) => CudaStorage::wrap_cuda_slice(
            launch("softcap_ce_backward_f32", dev, x, xl, t, tl, lg, ll, cap)?,
            dev.clone(),
        ),
        _ => candle_core::bail!("the fused cross-entropy takes bf16 or f32 logits"),
    };
    Ok((dx, xl.shape().clone()))
}
