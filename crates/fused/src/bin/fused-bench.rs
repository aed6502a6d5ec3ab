//! Times the fused ops against their plain paths, forward and forward + backward, and checks
//! that they agree, at a pass of 16 rows × 2048 tokens (the h100 preset's widths): attention as a
//! whole first (the fused path against materialised scores, and our flash kernels against
//! cuDNN's where cuDNN passed its check), then on CUDA candle's own elementwise kernels (the
//! vendored launch against upstream's, and both against the CPU), the soft-capped
//! cross-entropy (vocabulary 8192), attention's causal softmax at its scores (16 × 4 heads,
//! 2048², window 1024 and full), the embedding (an f32 table of 8192 × 512, as the master
//! weights), RMSNorm (512 wide), the rotary embedding (4 heads of 128), the heads from the
//! q·k·v projection. bf16 on CUDA, f32 on the CPU.
//!
//!   fused-bench [--device cpu|cuda] [--tokens N] [--vocab V] [--heads B·H] [--seq T] [--iters K]
//!   fused-bench --cudnn-version     (CUDA builds: whether cuDNN's library loads, no GPU needed)

use std::time::Instant;

use candle_core::{D, DType, Device, Result, Tensor, Var};
use fused::{Kernel, is_fused};

type Op<'a> = &'a dyn Fn(&Tensor) -> Result<Tensor>;

fn main() -> Result<()> {
    // Whether cuDNN's attention can load here (no GPU needed): its version, or why not.
    #[cfg(feature = "cuda")]
    if std::env::args().nth(1).as_deref() == Some("--cudnn-version") {
        match fused::cudnn_version() {
            Ok((v, cudart)) => println!(
                "cuDNN {}.{}.{} (for CUDA {}.{})",
                v / 10_000,
                v / 100 % 100,
                v % 100,
                cudart / 1000,
                cudart % 1000 / 10
            ),
            Err(e) => println!(
                "cuDNN unavailable: {}",
                e.to_string().lines().next().unwrap_or_default()
            ),
        }
        return Ok(());
    }
    let mut args = std::env::args().skip(1);
    let mut device = "cuda".to_string();
    let (mut tokens, mut vocab, mut heads, mut seq, mut iters) =
        (16 * 2048, 8192, 16 * 4, 2048, 20);
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
            "--heads" => heads = number()?,
            "--seq" => seq = number()?,
            "--iters" => iters = number()?.max(1),
            _ => candle_core::bail!(
                "unknown flag {flag}: fused-bench [--device cpu|cuda] [--tokens N] [--vocab V] [--heads B·H] [--seq T] [--iters K]"
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
    let mut uniform = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 11) as f64 / (1u64 << 53) as f64
    };
    let mut random = |n: usize, scale: f64| -> Vec<f32> {
        (0..n)
            .map(|_| ((uniform() * 2.0 - 1.0) * scale) as f32)
            .collect()
    };
    attention_rows(&device, dtype, (tokens, seq, iters), &mut random)?;
    // A difference there is a wrong sum in every training step: the bench goes on with its
    // rows, then fails.
    #[cfg(feature = "cuda")]
    let elementwise_differ =
        device.is_cuda() && elementwise_rows(&device, tokens, iters, &mut random)?;
    #[cfg(not(feature = "cuda"))]
    let elementwise_differ = false;

    let logits = Tensor::from_vec(random(tokens * vocab, 20.0), (tokens, vocab), &device)?
        .to_dtype(dtype)?;
    let targets: Vec<u32> = random(tokens, 1.0)
        .iter()
        .map(|r| ((r + 1.0) / 2.0 * vocab as f32) as u32 % vocab as u32)
        .collect();
    let targets = Tensor::from_vec(targets, tokens, &device)?;
    println!(
        "cross-entropy: {tokens} tokens × vocabulary {vocab}, {dtype:?} on {device:?}; fused path: {}",
        is_fused(Kernel::CrossEntropy, &device, dtype)
    );
    bench(
        &logits,
        &|x| fused::plain::softcap_cross_entropy(x, &targets, 15.0),
        &|x| fused::softcap_cross_entropy(x, &targets, 15.0),
        &device,
        iters,
    )?;
    drop(logits);

    let scores = Tensor::from_vec(random(heads * seq * seq, 40.0), (heads, seq, seq), &device)?
        .to_dtype(dtype)?;
    let scale = 1.0 / 128f64.sqrt();
    for window in [seq / 2, seq] {
        println!(
            "causal softmax: {heads} × {seq}² scores, window {window}, {dtype:?}; fused path: {}",
            is_fused(Kernel::CausalSoftmax, &device, dtype)
        );
        bench(
            &scores,
            &|x| fused::plain::causal_softmax(x, scale, window),
            &|x| fused::causal_softmax(x, scale, window),
            &device,
            iters,
        )?;
    }
    drop(scores);

    let dim = 512;
    let table = Tensor::from_vec(random(vocab * dim, 1.0), (vocab, dim), &device)?;
    println!(
        "embedding: {tokens} ids into an F32 table of {vocab} × {dim}, rows in {dtype:?}; fused path: {}",
        is_fused(Kernel::Embedding, &device, DType::F32)
    );
    bench(
        &table,
        &|x| x.index_select(&targets, 0)?.to_dtype(dtype),
        &|x| fused::embedding(x, &targets, dtype),
        &device,
        iters,
    )?;

    let x = Tensor::from_vec(random(tokens * dim, 3.0), (tokens, dim), &device)?.to_dtype(dtype)?;
    println!(
        "RMSNorm: {tokens} rows of {dim}, {dtype:?}; fused path: {}",
        is_fused(Kernel::RmsNorm, &device, dtype)
    );
    bench(
        &x,
        &|x| fused::plain::rms_norm(x, 1e-6),
        &|x| fused::rms_norm(x, 1e-6),
        &device,
        iters,
    )?;

    // The residual mix, as the train file calls it (x and x0, each layer's two scalars); only
    // x's gradient is asked for, so the plain path skips the scalars' sums and the fused one
    // does not.
    let x0 =
        Tensor::from_vec(random(tokens * dim, 3.0), (tokens, dim), &device)?.to_dtype(dtype)?;
    let (a, b) = (
        Tensor::new(&[[0.93f32]], &device)?,
        Tensor::new(&[[0.1f32]], &device)?,
    );
    println!(
        "mix: a·x + b·x0 over {tokens} rows of {dim}, {dtype:?}; fused path: {}",
        is_fused(Kernel::Mix, &device, dtype)
    );
    bench(
        &x,
        &|x| fused::plain::mix(x, &a, &x0, &b),
        &|x| fused::mix(x, &a, &x0, &b),
        &device,
        iters,
    )?;
    drop(x0);

    let (heads, head_dim) = (4, 128);
    // The value residual as attention takes it: v plus the gated value embedding, head-major.
    let gate = Tensor::from_vec(
        random(tokens * heads, 2.0),
        (tokens / seq, seq, heads),
        &device,
    )?
    .to_dtype(dtype)?;
    let v = Tensor::from_vec(
        random(tokens * dim, 2.0),
        (tokens / seq, heads, seq, head_dim),
        &device,
    )?
    .to_dtype(dtype)?;
    let ve = x.reshape((tokens / seq, seq, dim))?;
    println!(
        "gate heads: v + ve {:?} gated per head, {dtype:?}; fused path: {}",
        ve.dims(),
        is_fused(Kernel::GateHeads, &device, dtype)
    );
    bench(
        &ve,
        &|x| &v + fused::plain::gate_heads(x, &gate)?,
        &|x| &v + fused::gate_heads(x, &gate)?,
        &device,
        iters,
    )?;
    drop((gate, v));

    let x = x.reshape((tokens / seq, seq, heads, head_dim))?;
    let angles: Vec<f32> = (0..seq * head_dim / 2).map(|i| i as f32 * 0.01).collect();
    let angles = Tensor::from_vec(angles, (seq, head_dim / 2), &device)?;
    let (cos, sin) = (
        angles.cos()?.to_dtype(dtype)?,
        angles.sin()?.to_dtype(dtype)?,
    );
    println!(
        "rotary: {:?}, {dtype:?}; fused path: {}",
        x.dims(),
        is_fused(Kernel::Rotary, &device, dtype)
    );
    bench(
        &x,
        &|x| fused::plain::rotary(x, &cos, &sin),
        &|x| fused::rotary(x, &cos, &sin),
        &device,
        iters,
    )?;

    let qkv = Tensor::from_vec(
        random(tokens * 3 * heads * head_dim, 2.0),
        (tokens / seq, seq, 3 * heads * head_dim),
        &device,
    )?
    .to_dtype(dtype)?;
    let rope = Tensor::stack(&[&cos, &sin], 0)?;
    println!(
        "heads: qkv {:?} → [3, B, H, T, hd], {dtype:?}; fused path: {}",
        qkv.dims(),
        is_fused(Kernel::Heads, &device, dtype)
    );
    bench(
        &qkv,
        &|x| fused::plain::heads(x, heads, &rope, 1e-6),
        &|x| fused::heads(x, heads, &rope, 1e-6),
        &device,
        iters,
    )?;

    if elementwise_differ {
        candle_core::bail!(
            "candle's elementwise kernels gave results other than the CPU's (the line above)"
        )
    }
    Ok(())
}

/// Attention as a whole (4 heads of 128 over the pass's rows, windows of half and all of the
/// rows), against the materialised path the train file took before (scores, the fused causal
/// softmax, the product with v); then our flash kernels against cuDNN's. First in the bench:
/// the acceptance's stage may not have time for every row.
fn attention_rows(
    device: &Device,
    dtype: DType,
    (tokens, seq, iters): (usize, usize, usize),
    random: &mut dyn FnMut(usize, f64) -> Vec<f32>,
) -> Result<()> {
    let (n_head, head_dim) = (4, 128);
    let device = device.clone();
    let qkv = Tensor::from_vec(
        random(3 * tokens * n_head * head_dim, 2.0),
        (3, tokens / seq, n_head, seq, head_dim),
        &device,
    )?
    .to_dtype(dtype)?;
    for window in [seq / 2, seq] {
        println!(
            "attention: q, k, v {:?}, window {window}, {dtype:?}; fused path: {} (cuDNN: {})",
            qkv.get(0)?.dims(),
            is_fused(Kernel::Attention, &device, dtype),
            is_fused(Kernel::CudnnAttention, &device, dtype)
        );
        let (forward, both) = bench(
            &qkv,
            &|x| {
                let (q, k, v) = (x.get(0)?, x.get(1)?, x.get(2)?);
                let scale = 1.0 / (head_dim as f64).sqrt();
                let p = fused::causal_softmax(&q.matmul(&k.t()?)?, scale, window)?;
                p.matmul(&v)?.transpose(1, 2)
            },
            &|x| fused::attention(x, None, window),
            &device,
            iters,
        )?;
        // The products' FLOPs over the pairs each query sees (query i: keys i − window ..= i):
        // 4·hd a pair forward (q·k and p·v), 2.5 times that backward (FlashAttention's count;
        // our backward recomputes two products more). Timed with the bench's own weighting
        // and sums: a floor on the kernels' rate.
        let pairs: usize = (0..seq).map(|i| i.min(window) + 1).sum();
        let flops = 4.0 * (pairs * head_dim * n_head * (tokens / seq)) as f64;
        let rates = |name: &str, (forward, both): (f64, f64)| {
            println!(
                "  {name}: {:.1} TFLOP/s forward, {:.1} TFLOP/s forward + backward",
                flops / forward / 1e9,
                3.5 * flops / both / 1e9
            )
        };
        if is_fused(Kernel::Attention, &device, dtype)
            || is_fused(Kernel::CudnnAttention, &device, dtype)
        {
            rates("fused", (forward, both));
        }
        // Our kernels against cuDNN's, deterministic and not, where cuDNN passed its check.
        #[cfg(feature = "cuda")]
        if is_fused(Kernel::CudnnAttention, &device, dtype) {
            use fused::attention::flash::{Backend, apply};
            for deterministic in [true, false] {
                println!("  cuDNN, deterministic backward: {deterministic}");
                let cudnn = Backend::Cudnn { deterministic };
                let times = sides(
                    &qkv,
                    [
                        ("flash", &|x| apply(x, None, window, Backend::Flash)),
                        ("cuDNN", &|x| apply(x, None, window, cudnn)),
                    ],
                    &device,
                    iters,
                );
                // A failure here is a finding; the rows after it still run.
                match times {
                    Ok(times) => rates("cuDNN", times),
                    Err(e) => println!(
                        "  cuDNN failed: {}",
                        e.to_string().lines().next().unwrap_or_default()
                    ),
                }
            }
        }
    }
    Ok(())
}

/// candle's own elementwise kernels as the vendored candle-core launches them (a thread a run of
/// 8 bf16 or 4 f32 where the operands allow) against upstream's launch (a thread an element):
/// both must give the CPU's results to the bit at lengths and offsets off the runs' boundaries;
/// then a bf16 add over a 64-row pass's activations (the residual adds and the backward's sums
/// of gradients are such adds, ~48 a pass), timed each way. Returns whether anything differed.
#[cfg(feature = "cuda")]
fn elementwise_rows(
    device: &Device,
    tokens: usize,
    iters: usize,
    random: &mut dyn FnMut(usize, f64) -> Vec<f32>,
) -> Result<bool> {
    use candle_core::cuda_backend::set_vectorised_launch;
    type Elementwise = fn(&Tensor, &Tensor) -> Result<Tensor>;
    let ops: [(&str, Elementwise); 5] = [
        ("add", |a, b| a + b),
        ("mul", |a, b| a * b),
        ("div", |a, b| a / (b.abs()? + 0.5)?),
        ("cast", |a, _| {
            let other = match a.dtype() {
                DType::BF16 => DType::F32,
                _ => DType::BF16,
            };
            a.to_dtype(other)
        }),
        ("silu", |a, _| a.silu()),
    ];
    let (mut cases, mut differ) = (0, Vec::new());
    for runs in [true, false] {
        set_vectorised_launch(runs);
        for n in [1, 7, 8, 9, 4_103, 65_539] {
            for offset in [0, 1, 4, 8] {
                let (a, b) = (random(n + offset, 4.0), random(n + offset, 4.0));
                for dtype in [DType::BF16, DType::F32] {
                    let on_cpu = |x: &[f32]| Tensor::new(x, &Device::Cpu)?.to_dtype(dtype);
                    let (a, b) = (on_cpu(&a)?, on_cpu(&b)?);
                    let (ga, gb) = (a.to_device(device)?, b.to_device(device)?);
                    for (name, op) in ops {
                        // silu's exp and bf16's division are the devices' own: not bitwise, but
                        // within two bf16 steps (the CPU rounds silu's parts to bf16 in turn).
                        let exact = !(name == "silu" || name == "div" && dtype == DType::BF16);
                        let want = op(&a.narrow(0, offset, n)?, &b.narrow(0, offset, n)?)?;
                        let got = op(&ga.narrow(0, offset, n)?, &gb.narrow(0, offset, n)?)?;
                        let want = want.to_dtype(DType::F32)?.to_vec1::<f32>()?;
                        let got = got.to_dtype(DType::F32)?.to_vec1::<f32>()?;
                        let bad = want.iter().zip(&got).filter(|(w, g)| {
                            if exact {
                                w.to_bits() != g.to_bits()
                            } else {
                                // A NaN on either side counts as a difference.
                                let diff = (*w - *g).abs();
                                diff.is_nan() || diff > w.abs().max(1e-3) / 64.0
                            }
                        });
                        if bad.count() > 0 {
                            differ.push(format!("{name} {dtype:?} n {n} offset {offset}"));
                        }
                        cases += 1;
                    }
                }
            }
        }
    }
    let n = 4 * tokens * 512;
    let a = Tensor::from_vec(random(n, 1.0), n, device)?.to_dtype(DType::BF16)?;
    let b = Tensor::from_vec(random(n, 1.0), n, device)?.to_dtype(DType::BF16)?;
    // The two launches' sums of the large tensors, to the bit.
    let sum = |runs: bool| -> Result<Vec<u16>> {
        set_vectorised_launch(runs);
        let y = (&a + &b)?.to_vec1::<half::bf16>()?;
        Ok(y.iter().map(|x| x.to_bits()).collect())
    };
    if sum(true)? != sum(false)? {
        differ.push(format!("add BF16 n {n}: the two launches"));
    }
    let time = |runs: bool| -> Result<f64> {
        set_vectorised_launch(runs);
        let _ = (&a + &b)?;
        device.synchronize()?;
        let start = Instant::now();
        for _ in 0..iters {
            let _ = (&a + &b)?;
        }
        device.synchronize()?;
        Ok(start.elapsed().as_secs_f64() * 1e3 / iters as f64)
    };
    let (upstream, runs) = (time(false)?, time(true)?);
    let rate = |ms: f64| 3.0 * 2.0 * n as f64 / ms / 1e9;
    println!(
        "candle's bf16 add over {n} elements: a thread a run {runs:.3} ms ({:.2} TB/s), a thread an element (upstream) {upstream:.3} ms ({:.2} TB/s); {} of {cases} cases against the CPU differ{}",
        rate(runs),
        rate(upstream),
        differ.len(),
        differ
            .first()
            .map(|d| format!(", the first: {d}"))
            .unwrap_or_default()
    );
    Ok(!differ.is_empty())
}

/// Milliseconds per call of each side, forward and forward + backward (of a fixed weighting of
/// the output: a mean would give the softmax a zero gradient), after a warm-up call; then the
/// largest relative differences between the sides. Returns the fused side's two times. The weighted output is summed by rows
/// first: candle sums a whole tensor into one value with a single block on CUDA, which would
/// time that sum rather than the ops.
fn bench(x: &Tensor, plain: Op, fused: Op, device: &Device, iters: usize) -> Result<(f64, f64)> {
    sides(x, [("plain", plain), ("fused", fused)], device, iters)
}

/// `bench` between two named sides: the second's times are returned, the errors are its
/// against the first.
fn sides(x: &Tensor, sides: [(&str, Op); 2], device: &Device, iters: usize) -> Result<(f64, f64)> {
    let shape = sides[0].1(x)?.shape().clone();
    let n = shape.elem_count() as u32;
    let w = (Tensor::arange(0u32, n, device)?.to_dtype(DType::F32)? * 0.618)?
        .sin()?
        .reshape(shape)?;
    let (mut outputs, mut times) = (Vec::new(), (0.0, 0.0));
    for (name, op) in sides {
        let step = |backward: bool| -> Result<(Tensor, Option<Tensor>)> {
            let var = Var::from_tensor(x)?;
            let y = op(var.as_tensor())?;
            let grad = if backward {
                let weighted = (y.to_dtype(DType::F32)? * &w)?;
                let grads = weighted.sum(D::Minus1)?.sum_all()?.backward()?;
                Some(grads.get(var.as_tensor()).expect("a gradient").clone())
            } else {
                None
            };
            device.synchronize()?;
            Ok((y, grad))
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
        println!("  {name}: forward {forward:.3} ms, forward + backward {both:.3} ms");
        times = (forward, both);
        outputs.push(step(true)?);
    }
    let rel = |a: &Tensor, b: &Tensor| -> Result<f32> {
        let (a, b) = (a.to_dtype(DType::F32)?, b.to_dtype(DType::F32)?);
        let diff = (&a - &b)?.abs()?.max_all()?.to_scalar::<f32>()?;
        Ok(diff / b.abs()?.max_all()?.to_scalar::<f32>()?.max(1e-30))
    };
    let ((y_plain, g_plain), (y_fused, g_fused)) = (&outputs[0], &outputs[1]);
    println!(
        "  {} vs {}: value relative error {:.1e}, gradient {:.1e}",
        sides[1].0,
        sides[0].0,
        rel(y_fused, y_plain)?,
        rel(g_fused.as_ref().unwrap(), g_plain.as_ref().unwrap())?
    );
    Ok(times)
}
