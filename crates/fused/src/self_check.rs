//! The fused kernels' self-checks: each op's values and gradients against its plain path on
//! random inputs, at shapes that do not fill a block. On CUDA they run in a child process
//! (`isolated`) before a kernel's first use; on the CPU the same checks run in the tests of that
//! mechanism.

use candle_core::{DType, Device, Result, Tensor, Var};

use crate::Kernel;
use crate::attention::CausalSoftmax;
use crate::cross_entropy::{SoftcapCrossEntropy, plain};
use crate::embedding::Embedding;

/// Runs `kernel`'s check on `device`.
pub(crate) fn run(kernel: Kernel, device: &Device) -> Result<()> {
    match kernel {
        Kernel::CrossEntropy => cross_entropy(device),
        Kernel::CausalSoftmax => softmax(device),
        Kernel::Embedding => embedding(device),
        Kernel::RmsNorm => rms_norm(device),
        Kernel::Rotary => rotary(device),
        Kernel::ReluSquared => relu_squared(device),
        Kernel::Heads => heads(device),
        Kernel::Attention => attention(device),
        Kernel::Mix => mix(device),
        Kernel::GateHeads => gate_heads(device),
        Kernel::CudnnAttention => cudnn_attention(device),
    }
}

#[cfg(not(feature = "cuda"))]
fn attention(_: &Device) -> Result<()> {
    candle_core::bail!("the flash kernels run on CUDA only (a build with `--features cuda`)")
}

#[cfg(not(feature = "cuda"))]
fn cudnn_attention(_: &Device) -> Result<()> {
    candle_core::bail!("cuDNN's attention runs on CUDA only (a build with `--features cuda`)")
}

/// The flash kernels' checks with cuDNN in their place, after its library opened; then a length
/// and window past one 64-key tile (the band spans several, as in training), where its backward
/// twice on the same inputs must agree to the bit.
#[cfg(feature = "cuda")]
fn cudnn_attention(device: &Device) -> Result<()> {
    use crate::attention::flash::{Backend, apply};
    let Some(deterministic) = crate::cudnn::chosen() else {
        candle_core::bail!("not chosen (AUTORESEARCH_FUSED_ATTENTION=flash)")
    };
    let started = std::time::Instant::now();
    let version = crate::cudnn::version()?;
    let cudnn = Backend::Cudnn { deterministic };
    attention_by(device, cudnn)?;
    let (b, h, t, hd, window) = (2, 2, 320, 128, 130);
    let x = host_random(3 * b * h * t * hd, 19, 2.0);
    compare(
        &[(DType::BF16, 2e-2)],
        &x,
        &[3, b, h, t, hd],
        device,
        &|x| apply(x, None, window, cudnn),
        &|x| crate::attention::plain::attention(&x.to_dtype(DType::F32)?, None, window),
    )
    .map_err(|e| candle_core::Error::Msg(format!("T {t}, window {window}: {e}")))?;
    if deterministic {
        let heads = Tensor::from_vec(x, (3, b, h, t, hd), device)?.to_dtype(DType::BF16)?;
        let w = Tensor::from_vec(host_random(b * t * h * hd, 20, 1.0), (b, t, h, hd), device)?;
        let gradient = || -> Result<Vec<u16>> {
            let var = Var::from_tensor(&heads)?;
            let y = apply(var.as_tensor(), None, window, cudnn)?;
            let grads = (y.to_dtype(DType::F32)? * &w)?.sum_all()?.backward()?;
            let Some(g) = grads.get(var.as_tensor()) else {
                candle_core::bail!("no gradient reached the heads")
            };
            let bits = g.flatten_all()?.to_vec1::<half::bf16>()?;
            Ok(bits.iter().map(|x| x.to_bits()).collect())
        };
        let (first, second) = (gradient()?, gradient()?);
        let differ = first.iter().zip(&second).filter(|(a, b)| a != b).count();
        if differ > 0 {
            candle_core::bail!(
                "deterministic backward: {differ} gradient elements differ between two runs"
            )
        }
    }
    // Its graphs are built here (a dozen): the check's time is the first thing to read if it
    // runs out of its clock on a card.
    eprintln!(
        "cuDNN {}.{}.{}: its attention checked in {:.1}s",
        version / 10_000,
        version / 100 % 100,
        version % 100,
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

#[cfg(feature = "cuda")]
fn attention(device: &Device) -> Result<()> {
    attention_by(device, crate::attention::flash::Backend::Flash)
}

/// f32 and bf16 with their tolerances (as in PERF-NOTES: 1e-4 and 2e-2 relative).
const BOTH: &[(DType, f32)] = &[(DType::F32, 1e-4), (DType::BF16, 2e-2)];

/// The dtypes a kernel takes on `device`: the CPU's fused ops take f32 only.
fn dtypes(device: &Device) -> &'static [(DType, f32)] {
    if device.is_cuda() { BOTH } else { &BOTH[..1] }
}

/// Values and gradients (of a random weighting of the output) of `fused` against `plain` on
/// `x` in each of `dtypes`, within its tolerance.
fn compare(
    dtypes: &[(DType, f32)],
    x: &[f32],
    shape: &[usize],
    device: &Device,
    fused: &dyn Fn(&Tensor) -> Result<Tensor>,
    plain: &dyn Fn(&Tensor) -> Result<Tensor>,
) -> Result<()> {
    for &(dtype, tolerance) in dtypes {
        let x = Tensor::from_vec(x.to_vec(), shape, device)?.to_dtype(dtype)?;
        let run = |f: &dyn Fn(&Tensor) -> Result<Tensor>| -> Result<(Tensor, Tensor)> {
            let var = Var::from_tensor(&x)?;
            let y = f(var.as_tensor())?.to_dtype(DType::F32)?;
            let w = Tensor::from_vec(host_random(y.elem_count(), 3, 1.0), y.shape(), device)?;
            let grads = (&y * &w)?.sum_all()?.backward()?;
            let Some(g) = grads.get(var.as_tensor()) else {
                candle_core::bail!("no gradient reached the input")
            };
            Ok((y, g.to_dtype(DType::F32)?))
        };
        let (y, grad) = run(fused)?;
        let (want_y, want_grad) = run(plain)?;
        for (what, got, want) in [("value", &y, &want_y), ("gradient", &grad, &want_grad)] {
            let err = relative_error(got, want)?;
            if err.is_nan() || err > tolerance {
                candle_core::bail!("{dtype:?} {what}: relative error {err:.1e} > {tolerance:.0e}");
            }
        }
    }
    Ok(())
}

/// At a vocabulary that is not a multiple of the block size.
fn cross_entropy(device: &Device) -> Result<()> {
    let (rows, vocab, cap) = (37, 1003, 15.0);
    let t: Vec<u32> = host_random(rows, 2, 1.0)
        .iter()
        .map(|r| ((r + 1.0) / 2.0 * vocab as f32) as u32 % vocab as u32)
        .collect();
    let targets = Tensor::from_vec(t, rows, device)?;
    compare(
        dtypes(device),
        &host_random(rows * vocab, 1, 40.0),
        &[rows, vocab],
        device,
        &|x| x.apply_op2(&targets, SoftcapCrossEntropy { cap: cap as f32 }),
        &|x| plain::softcap_cross_entropy(x, &targets, cap),
    )
}

/// A window shorter than the rows, and one past them (plain causal), at a length that is not a
/// multiple of the block size.
fn softmax(device: &Device) -> Result<()> {
    let t = 300;
    let scores = host_random(2 * 3 * t * t, 4, 8.0);
    for window in [37, t] {
        let scale = 0.125;
        compare(
            dtypes(device),
            &scores,
            &[2, 3, t, t],
            device,
            &|x| {
                x.apply_op1(CausalSoftmax {
                    scale: scale as f32,
                    window,
                })
            },
            &|x| crate::attention::plain::causal_softmax(x, scale, window),
        )
        .map_err(|e| candle_core::Error::Msg(format!("window {window}: {e}")))?;
    }
    Ok(())
}

/// Ids with repeats (about 70 tokens a row) in two chunks of the backward, a table that does
/// not fill the last block; at a width past one block's 512 columns and not a multiple of it or
/// of the forward's runs of eight (read one element at a time), and at 512 (runs of eight, as
/// the model's width takes).
fn embedding(device: &Device) -> Result<()> {
    let (vocab, n) = (300, crate::launch::EMBEDDING_CHUNK + 5_000);
    let ids: Vec<u32> = host_random(n, 5, 1.0)
        .iter()
        .map(|r| ((r + 1.0) / 2.0 * vocab as f32) as u32 % vocab as u32)
        .collect();
    let ids = Tensor::from_vec(ids, n, device)?;
    for d in [700, 512] {
        let table = host_random(vocab * d, 6, 1.0);
        compare(
            dtypes(device),
            &table,
            &[vocab, d],
            device,
            &|x| {
                let dtype = x.dtype();
                x.apply_op2(&ids, Embedding { vocab, dtype })
            },
            &|x| x.index_select(&ids, 0),
        )?;
        if !device.is_cuda() {
            continue;
        }
        // An f32 table read as bf16 rows (a bf16 model's), its gradient back from bf16.
        compare(
            &[(DType::F32, 2e-2)],
            &table,
            &[vocab, d],
            device,
            &|x| {
                let dtype = DType::BF16;
                x.apply_op2(&ids, Embedding { vocab, dtype })
            },
            &|x| x.index_select(&ids, 0)?.to_dtype(DType::BF16),
        )
        .map_err(|e| candle_core::Error::Msg(format!("width {d}: {e}")))?;
    }
    Ok(())
}

/// Rows that do not fill the last block, of a width that is not a multiple of a warp.
fn rms_norm(device: &Device) -> Result<()> {
    let (rows, n, eps) = (37, 300, 1e-6);
    compare(
        dtypes(device),
        &host_random(rows * n, 7, 3.0),
        &[rows, n],
        device,
        &|x| x.apply_op1(crate::RmsNorm { eps }),
        &|x| crate::plain::rms_norm(x, eps),
    )
}

/// Positions and heads that do not fill a block.
fn rotary(device: &Device) -> Result<()> {
    let (b, t, h, hd) = (2, 37, 3, 24);
    let angle = |i: usize| (i / (hd / 2)) as f32 * 0.37 + (i % (hd / 2)) as f32 * 0.11;
    let cos: Vec<f32> = (0..t * hd / 2).map(|i| angle(i).cos()).collect();
    let sin: Vec<f32> = (0..t * hd / 2).map(|i| angle(i).sin()).collect();
    let cos = Tensor::from_vec(cos, (t, hd / 2), device)?;
    let sin = Tensor::from_vec(sin, (t, hd / 2), device)?;
    compare(
        dtypes(device),
        &host_random(b * t * h * hd, 8, 2.0),
        &[b, t, h, hd],
        device,
        &|x| {
            let (c, s) = (cos.to_dtype(x.dtype())?, sin.to_dtype(x.dtype())?);
            x.apply_op3(&c, &s, crate::rotary::Rotary { sign: 1.0 })
        },
        &|x| crate::rotary::plain::rotary(x, &cos, &sin),
    )
}

/// A length that does not fill the last block; values on both sides of 0.
fn relu_squared(device: &Device) -> Result<()> {
    compare(
        dtypes(device),
        &host_random(1001, 9, 3.0),
        &[7, 143],
        device,
        &|x| x.apply_op1(crate::ReluSquared),
        &crate::plain::relu_squared,
    )
}

/// Positions, heads and rows that do not fill a block or a warp's four rows; head size 72 (its
/// second halves off the 16-byte boundary, read one element at a time, and a run of eight cut
/// short) and 128 (whole aligned runs, as the model's).
fn heads(device: &Device) -> Result<()> {
    let (b, t, h, eps) = (2, 37, 3, 1e-6);
    for hd in [72, 128] {
        let angle = |i: usize| (i / (hd / 2)) as f32 * 0.37 + (i % (hd / 2)) as f32 * 0.11;
        let cos: Vec<f32> = (0..t * hd / 2).map(|i| angle(i).cos()).collect();
        let sin: Vec<f32> = (0..t * hd / 2).map(|i| angle(i).sin()).collect();
        let rope = Tensor::from_vec([cos, sin].concat(), (2, t, hd / 2), device)?;
        compare(
            dtypes(device),
            &host_random(b * t * 3 * h * hd, 10, 2.0),
            &[b, t, 3 * h * hd],
            device,
            &|x| {
                let op = crate::heads::Heads {
                    n_head: h,
                    eps: eps as f32,
                };
                x.apply_op2(&rope.to_dtype(x.dtype())?, op)
            },
            &|x| crate::heads::plain::heads(x, h, &rope, eps),
        )
        .map_err(|e| candle_core::Error::Msg(format!("head size {hd}: {e}")))?;
    }
    Ok(())
}

/// Both head sizes, a window inside a tile and plain causal, with and without a term added to
/// v, two batches and heads; the reference runs in f32 on the same bf16 values (the kernels
/// take bf16 only).
#[cfg(feature = "cuda")]
fn attention_by(device: &Device, backend: crate::attention::flash::Backend) -> Result<()> {
    use candle_core::cuda_backend::WrapErr;
    let Device::Cuda(dev) = device else {
        candle_core::bail!("the flash kernels run on CUDA only")
    };
    let (major, minor) = dev.cuda_stream().context().compute_capability().w()?;
    if major < 8 {
        candle_core::bail!("compute capability {major}.{minor}: the kernels need bf16 mma (8.0+)")
    }
    let (b, h, t) = (2, 2, 192);
    for hd in [64, 128] {
        let plus = Tensor::from_vec(host_random(b * h * t * hd, 12, 1.0), (b, h, t, hd), device)?
            .to_dtype(DType::BF16)?;
        for (window, v_plus) in [(37, None), (t, None), (37, Some(&plus))] {
            compare(
                &[(DType::BF16, 2e-2)],
                &host_random(3 * b * h * t * hd, 11, 2.0),
                &[3, b, h, t, hd],
                device,
                &|x| crate::attention::flash::apply(x, v_plus, window, backend),
                &|x| {
                    let p = v_plus.map(|p| p.to_dtype(DType::F32)).transpose()?;
                    crate::attention::plain::attention(&x.to_dtype(DType::F32)?, p.as_ref(), window)
                },
            )
            .map_err(|e| {
                let plus = if v_plus.is_some() { " with v_plus" } else { "" };
                candle_core::Error::Msg(format!("head size {hd}, window {window}{plus}: {e}"))
            })?;
        }
        // v_plus's own gradient, through the transposed view the train file passes.
        let heads = Tensor::from_vec(
            host_random(3 * b * h * t * hd, 13, 2.0),
            (3, b, h, t, hd),
            device,
        )?;
        let heads_bf16 = heads.to_dtype(DType::BF16)?;
        // The reference sees the same (rounded) values.
        let heads = heads_bf16.to_dtype(DType::F32)?;
        compare(
            &[(DType::BF16, 2e-2)],
            &host_random(b * t * h * hd, 14, 1.0),
            &[b, t, h, hd],
            device,
            &|x| {
                let p = x.transpose(1, 2)?;
                crate::attention::flash::apply(&heads_bf16, Some(&p), 37, backend)
            },
            &|x| {
                let p = x.to_dtype(DType::F32)?.transpose(1, 2)?;
                crate::attention::plain::attention(&heads, Some(&p), 37)
            },
        )
        .map_err(|e| candle_core::Error::Msg(format!("head size {hd}, v_plus's gradient: {e}")))?;
    }
    Ok(())
}

/// A length past one block that is not a multiple of it; each input's gradient in turn.
fn mix(device: &Device) -> Result<()> {
    let shape = [7, 151];
    let n = 7 * 151;
    let x = Tensor::from_vec(host_random(n, 15, 2.0), &shape, device)?;
    let z = Tensor::from_vec(host_random(n, 16, 2.0), &shape, device)?;
    let (a, b) = (
        Tensor::new(&[[0.93f32]], device)?,
        Tensor::new(&[[0.1f32]], device)?,
    );
    let at = |t: &Tensor, like: &Tensor| t.to_dtype(like.dtype());
    compare(
        dtypes(device),
        &host_random(n, 17, 2.0),
        &shape,
        device,
        &|x| crate::mix::fused(x, &a, &at(&z, x)?, &b),
        &|x| crate::mix::plain::mix(x, &a, &at(&z, x)?, &b),
    )
    .map_err(|e| candle_core::Error::Msg(format!("x: {e}")))?;
    compare(
        dtypes(device),
        &host_random(n, 18, 2.0),
        &shape,
        device,
        &|z| crate::mix::fused(&at(&x, z)?, &a, z, &b),
        &|z| crate::mix::plain::mix(&at(&x, z)?, &a, z, &b),
    )
    .map_err(|e| candle_core::Error::Msg(format!("z: {e}")))?;
    // The scalars' gradients (sums over all of x and z) in f32: the plain path sums bf16
    // products in bf16, too coarse a reference; the emulator checks the bf16 kernel's sums.
    compare(
        &[(DType::F32, 1e-4)],
        &[0.7, -0.3],
        &[2],
        device,
        &|ab| crate::mix::fused(&x, &ab.get(0)?, &z, &ab.get(1)?),
        &|ab| crate::mix::plain::mix(&x, &ab.get(0)?, &z, &ab.get(1)?),
    )
    .map_err(|e| candle_core::Error::Msg(format!("a and b: {e}")))
}

/// Heads of 40 (five runs of eight a row, three lanes of eight idle), rows that do not fill a
/// block; x's and the gates' gradients in turn.
fn gate_heads(device: &Device) -> Result<()> {
    let (b, t, h, hd) = (2, 37, 3, 40);
    let x = Tensor::from_vec(host_random(b * t * h * hd, 19, 2.0), (b, t, h * hd), device)?;
    let gate = Tensor::from_vec(host_random(b * t * h, 20, 2.0), (b, t, h), device)?;
    compare(
        dtypes(device),
        &host_random(b * t * h * hd, 21, 2.0),
        &[b, t, h * hd],
        device,
        &|x| crate::gate_heads::fused(x, &gate.to_dtype(x.dtype())?),
        &|x| crate::gate_heads::plain::gate_heads(x, &gate.to_dtype(x.dtype())?),
    )
    .map_err(|e| candle_core::Error::Msg(format!("x: {e}")))?;
    compare(
        dtypes(device),
        &host_random(b * t * h, 22, 2.0),
        &[b, t, h],
        device,
        &|g| crate::gate_heads::fused(&x.to_dtype(g.dtype())?, g),
        &|g| crate::gate_heads::plain::gate_heads(&x.to_dtype(g.dtype())?, g),
    )
    .map_err(|e| candle_core::Error::Msg(format!("gate: {e}")))
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

/// The texts of a device allocation failure (as `prepare::Run::fit_device_batch` matches them).
pub(crate) fn out_of_memory(text: &str) -> bool {
    ["OUT_OF_MEMORY", "ALLOC_FAILED", "out of memory"]
        .iter()
        .any(|m| text.contains(m))
}
