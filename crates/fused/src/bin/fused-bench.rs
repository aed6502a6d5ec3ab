//! Times the fused soft-capped cross-entropy against the plain path, forward and forward +
//! backward, and checks that they agree. Default shape: the h100 preset's micro-batch (16 rows
//! × 2048 tokens, vocabulary 8192), bf16 on CUDA, f32 on the CPU.
//!
//!   fused-bench [--device cpu|cuda] [--tokens N] [--vocab V] [--iters K]

use std::time::Instant;

use candle_core::{DType, Device, Result, Tensor, Var};

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let (mut device, mut tokens, mut vocab, mut iters) = ("cuda".to_string(), 16 * 2048, 8192, 20);
    while let Some(flag) = args.next() {
        let value = args.next().unwrap_or_default();
        let number = || {
            value
                .parse::<usize>()
                .map_err(|e| candle_core::Error::Msg(format!("{flag} {value}: {e}")))
        };
        match flag.as_str() {
            "--device" => device = value.clone(),
            "--tokens" => tokens = number()?,
            "--vocab" => vocab = number()?,
            "--iters" => iters = number()?.max(1),
            _ => candle_core::bail!(
                "unknown flag {flag}: fused-bench [--device cpu|cuda] [--tokens N] [--vocab V] [--iters K]"
            ),
        }
    }
    let (device, dtype) = match device.as_str() {
        "cpu" => (Device::Cpu, DType::F32),
        "cuda" => (Device::new_cuda(0)?, DType::BF16),
        other => candle_core::bail!("--device {other}: cpu or cuda"),
    };
    // Host-side random inputs: the same on every device, no device RNG needed.
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 11) as f64 / (1u64 << 53) as f64
    };
    let x: Vec<f32> = (0..tokens * vocab)
        .map(|_| ((next() * 2.0 - 1.0) * 20.0) as f32)
        .collect();
    let t: Vec<u32> = (0..tokens)
        .map(|_| (next() * vocab as f64) as u32 % vocab as u32)
        .collect();
    let x = Tensor::from_vec(x, (tokens, vocab), &device)?.to_dtype(dtype)?;
    let targets = Tensor::from_vec(t, tokens, &device)?;
    let fused_path = fused::is_fused(&device, dtype);
    println!(
        "{tokens} tokens × vocabulary {vocab}, {dtype:?} on {device:?}; fused path: {}",
        if fused_path {
            "yes"
        } else {
            "no (plain on both sides)"
        }
    );

    type Loss = fn(&Tensor, &Tensor, f64) -> Result<Tensor>;
    let sides: [(&str, Loss); 2] = [
        ("plain", fused::plain::softcap_cross_entropy),
        ("fused", fused::softcap_cross_entropy),
    ];
    let mut outputs = Vec::new();
    for (name, loss_fn) in sides {
        let step = |backward: bool| -> Result<(Tensor, Option<Tensor>)> {
            let var = Var::from_tensor(&x)?;
            let loss = loss_fn(var.as_tensor(), &targets, 15.0)?.mean_all()?;
            let grad = if backward {
                Some(
                    loss.backward()?
                        .get(var.as_tensor())
                        .expect("a gradient")
                        .clone(),
                )
            } else {
                None
            };
            device.synchronize()?;
            Ok((loss, grad))
        };
        let time = |backward: bool| -> Result<f64> {
            step(backward)?; // warm-up: kernels loaded, memory pooled
            let start = Instant::now();
            for _ in 0..iters {
                step(backward)?;
            }
            Ok(start.elapsed().as_secs_f64() * 1e3 / iters as f64)
        };
        let (forward, both) = (time(false)?, time(true)?);
        println!("{name}: forward {forward:.3} ms, forward + backward {both:.3} ms");
        outputs.push(step(true)?);
    }
    let (plain, fused) = (&outputs[0], &outputs[1]);
    let rel = |a: &Tensor, b: &Tensor| -> Result<f32> {
        let (a, b) = (a.to_dtype(DType::F32)?, b.to_dtype(DType::F32)?);
        let diff = (&a - &b)?.abs()?.max_all()?.to_scalar::<f32>()?;
        Ok(diff / b.abs()?.max_all()?.to_scalar::<f32>()?.max(1e-30))
    };
    println!(
        "fused vs plain: loss relative error {:.1e}, gradient {:.1e}",
        rel(&fused.0, &plain.0)?,
        rel(fused.1.as_ref().unwrap(), plain.1.as_ref().unwrap())?
    );
    Ok(())
}
