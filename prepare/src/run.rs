//! The plumbing of a train process, so the train file holds only research: reading the train
//! contract's environment, opening the device, keeping freed memory, the budget clock's start
//! mark, where a step's time goes, and the end of every run, the evaluation.
//!
//! Under the harness (`$AUTORESEARCH_HARNESS_FD` set) [`Run::finish`] serves the trained model
//! over the [`protocol`](crate::protocol): the harness feeds the validation rows and computes
//! val_bpb itself; this process never reads them. Run by hand, it evaluates locally with
//! [`evaluate_bpb`](crate::evaluate_bpb) and prints the summary block.

use std::cell::Cell;
use std::fs::File;
use std::io::BufReader;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};

use crate::eval::per_token_cross_entropy;
use crate::protocol::{self, Mark, Request, TrainStats, mfu_percent, timed_tokens};
use crate::{BudgetClock, Dataset, Error, Result, RunReport, Summary, env};

/// The pipe to the harness: marks and replies out on fd 3, requests in on stdin.
struct Link {
    out: Mutex<File>,
}

impl Link {
    fn from_env() -> Option<Arc<Link>> {
        let fd: i32 = std::env::var(env::HARNESS_FD).ok()?.parse().ok()?;
        use std::os::fd::FromRawFd;
        // SAFETY: the harness opened this descriptor for us; nothing else in the process owns it.
        let out = unsafe { File::from_raw_fd(fd) };
        Some(Arc::new(Link {
            out: Mutex::new(out),
        }))
    }

    fn send(&self, mark: &Mark) -> Result<()> {
        protocol::send(&mut *self.out.lock().unwrap(), &mark.encode())
            .map_err(|e| Error::Invalid(format!("talking to the harness: {e}")))
    }
}

/// Whether an error's text is an allocation failure: the CUDA driver's and cuBLAS's, and
/// candle's own words for them.
fn is_out_of_memory(why: &str) -> bool {
    let why = why.to_ascii_lowercase();
    [
        "out_of_memory",
        "out of memory",
        "alloc_failed",
        "outofmemory",
    ]
    .iter()
    .any(|w| why.contains(w))
}

/// The per-token losses of `model` on the rows `x` → `y`, half the rows at a time (and so on)
/// where the whole does not fit in the device's memory. Evaluation runs at the training's rows
/// per pass but keeps more alive (the f32 logits and their soft-cap): an out-of-memory there
/// must not end the run after its training. `fits` holds the most rows not yet found too many,
/// so that later batches are split at once instead of failing first.
fn losses_in_parts(
    model: &dyn Fn(&Tensor) -> Result<Tensor>,
    x: &Tensor,
    y: &Tensor,
    fits: &Cell<usize>,
) -> Result<Tensor> {
    let rows = x.dim(0)?;
    if rows <= fits.get() {
        match model(x).and_then(|logits| Ok(per_token_cross_entropy(&logits, y)?)) {
            Err(e) if rows > 1 && is_out_of_memory(&e.to_string()) => fits.set(rows / 2),
            other => return other,
        }
    }
    let half = rows / 2;
    let parts = [(0, half), (half, rows - half)]
        .into_iter()
        .map(|(start, len)| {
            let (x, y) = (x.narrow(0, start, len)?, y.narrow(0, start, len)?);
            losses_in_parts(model, &x, &y, fits)
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Tensor::cat(&parts, 0)?)
}

/// One run of the train binary: the data, the device, the budget and the seed the harness chose.
pub struct Run {
    pub data: Dataset,
    pub device: Device,
    pub budget: Duration,
    pub seed: u64,
    started: Instant,
    link: Option<Arc<Link>>,
    /// `AUTORESEARCH_FAKE_DEVICE_ROWS`: an injected memory limit, in rows (tests).
    fake_device_rows: Option<usize>,
}

impl Run {
    /// Reads the train contract from the environment and opens the device. Call it first: it
    /// also sets the allocators up before any other thread exists.
    pub fn from_env() -> Result<Run> {
        // Started by the harness as a checking process of the fused kernels, which a binary that
        // links them answers before `main`: this one does not, and must not train instead.
        if std::env::var_os(env::FUSED_SELF_CHECK).is_some() {
            println!("unavailable this train binary does not link the fused kernels");
            std::process::exit(2);
        }
        keep_freed_host_memory();
        let started = Instant::now();
        let data = Dataset::from_env()?;
        let device = match std::env::var(env::DEVICE).as_deref() {
            Ok("cuda") => Device::new_cuda(0).map_err(|e| {
                Error::Invalid(format!(
                    "AUTORESEARCH_DEVICE=cuda: cannot open GPU 0 ({e}); it takes a build with `--features cuda`, an NVIDIA driver and a GPU"
                ))
            })?,
            Ok("cpu") | Err(_) => Device::Cpu,
            Ok(other) => {
                return Err(Error::Invalid(format!(
                    "AUTORESEARCH_DEVICE must be cuda or cpu, not `{other}`"
                )));
            }
        };
        if let Err(e) = keep_freed_device_memory(&device) {
            eprintln!("warning: freed GPU memory goes back to the driver at each step: {e}");
        }
        skip_stream_events(&device);
        let budget = std::env::var(env::TIME_BUDGET)
            .ok()
            .and_then(|v| v.parse::<f64>().ok())
            .map_or(
                Duration::from_secs(data.preset().time_budget_s),
                Duration::from_secs_f64,
            );
        let seed = std::env::var(env::SEED)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(42);
        Ok(Run {
            data,
            device,
            budget,
            seed,
            started,
            link: Link::from_env(),
            fake_device_rows: std::env::var(env::FAKE_DEVICE_ROWS)
                .ok()
                .and_then(|v| v.parse().ok()),
        })
    }

    /// A run outside the harness (tests, benchmarks): evaluated locally at the end.
    pub fn new(data: Dataset, device: Device, budget: Duration, seed: u64) -> Run {
        Run {
            data,
            device,
            budget,
            seed,
            started: Instant::now(),
            link: None,
            fake_device_rows: None,
        }
    }

    /// The rows per pass the device holds: `rows`, halved until `trial` (one forward and
    /// backward pass of that many rows) stops failing for lack of memory. Call it before the
    /// clock starts; the train file then accumulates more passes, so the same file, with the
    /// same total batch, runs on a 24 GB card as on a 141 GB one instead of ending the night.
    /// On the CPU an allocation failure aborts the process rather than returning an error, so
    /// there is nothing to try there: `rows` comes back as given (unless a test injects a limit
    /// through `AUTORESEARCH_FAKE_DEVICE_ROWS`).
    pub fn fit_device_batch<E: std::fmt::Display>(
        &self,
        rows: usize,
        mut trial: impl FnMut(usize) -> std::result::Result<(), E>,
    ) -> Result<usize> {
        if !self.device.is_cuda() && self.fake_device_rows.is_none() {
            return Ok(rows);
        }
        let mut rows = rows;
        loop {
            let failure = match self.fake_device_rows {
                Some(limit) if rows > limit => Some(format!(
                    "CUDA_ERROR_OUT_OF_MEMORY (injected: the limit is {limit} rows)"
                )),
                // `{:#}`: the whole chain of an error with context, where the cause may be.
                _ => trial(rows)
                    .map_err(|e| format!("{e:#}"))
                    .and_then(|()| self.device.synchronize().map_err(|e| e.to_string()))
                    .err(),
            };
            let Some(why) = failure else {
                return Ok(rows);
            };
            if !is_out_of_memory(&why) {
                return Err(Error::Invalid(format!(
                    "a trial pass of {rows} rows: {why}"
                )));
            }
            if !rows.is_multiple_of(2) {
                return Err(Error::Invalid(format!(
                    "{rows} rows per pass do not fit in the device's memory and cannot be halved: make the model or the sequence smaller ({why})"
                )));
            }
            println!(
                "device batch: {rows} rows do not fit in memory; trying {} (more passes per step, the same total batch)",
                rows / 2
            );
            rows /= 2;
        }
    }

    /// The budget clock. Under the harness, the first timed step tells the harness that
    /// training starts: from then on the harness keeps the time.
    pub fn clock(&self) -> BudgetClock {
        let mut clock = BudgetClock::new(self.budget);
        if let Some(link) = self.link.clone() {
            clock.on_start(Box::new(move || {
                if let Err(e) = link.send(&Mark::Start) {
                    eprintln!("warning: {e}");
                }
            }));
        }
        clock
    }

    /// Device memory in use, MiB, as the driver sees it (0 on the CPU). Freed memory stays in
    /// the pool (see `keep_freed_device_memory`), so after training this is the peak.
    pub fn memory_used_mb(&self) -> f64 {
        device_memory_used_mb(&self.device)
    }

    /// Ends the run: evaluates the model, given as a function from inputs `[B, T]` u32 to logits
    /// `[B, T, vocab]`. Under the harness the model is served to it (this process never sees the
    /// validation rows and never computes the metric); run by hand it is evaluated here.
    pub fn finish<F, E>(self, stats: TrainStats, logits: F) -> Result<()>
    where
        F: Fn(&Tensor) -> std::result::Result<Tensor, E>,
        E: std::fmt::Display,
    {
        let model = |x: &Tensor| logits(x).map_err(|e| Error::Invalid(format!("the model: {e}")));
        match self.link.clone() {
            Some(link) => self.serve(&link, stats, &model),
            None => self.evaluate_here(stats, &model),
        }
    }

    fn serve(
        &self,
        link: &Link,
        stats: TrainStats,
        model: &dyn Fn(&Tensor) -> Result<Tensor>,
    ) -> Result<()> {
        println!("training done: the harness evaluates the model");
        link.send(&Mark::Evaluate(stats))?;
        let mut requests = BufReader::new(std::io::stdin().lock());
        let fits = Cell::new(usize::MAX);
        loop {
            let request = Request::read(&mut requests)
                .map_err(|e| Error::Invalid(format!("reading the harness's request: {e}")))?;
            let reply = match request {
                Request::Done => return Ok(()),
                Request::Losses {
                    rows,
                    seq,
                    inputs,
                    targets,
                } => {
                    let shape = (rows as usize, seq as usize);
                    let x = Tensor::from_vec(inputs, shape, &self.device)?;
                    let y = Tensor::from_vec(targets, shape, &self.device)?;
                    losses_in_parts(model, &x, &y, &fits)
                        .and_then(|nats| Ok(Mark::Losses(nats.flatten_all()?.to_vec1()?)))
                }
                Request::Logits { inputs, positions } => {
                    let n = inputs.len();
                    let x = Tensor::from_vec(inputs, (1, n), &self.device)?;
                    let k = positions.len();
                    let at = Tensor::from_vec(positions, k, &self.device)?;
                    model(&x).and_then(|l| {
                        let picked = l.get(0)?.index_select(&at, 0)?.to_dtype(DType::F32)?;
                        Ok(Mark::Logits(picked.flatten_all()?.to_vec1()?))
                    })
                }
            };
            match reply {
                Ok(mark) => link.send(&mark)?,
                Err(e) => {
                    link.send(&Mark::Failed(e.to_string()))?;
                    return Err(e);
                }
            }
        }
    }

    fn evaluate_here(
        &self,
        stats: TrainStats,
        model: &dyn Fn(&Tensor) -> Result<Tensor>,
    ) -> Result<()> {
        let batch = stats.eval_batch_rows.max(1) as usize;
        let started = Instant::now();
        let fits = Cell::new(usize::MAX);
        let result = crate::evaluate_bpb(&self.data, &self.device, batch, |x, y| {
            losses_in_parts(model, x, y, &fits).map_err(|e| candle_core::Error::Msg(e.to_string()))
        })?;
        println!(
            "evaluated here: {} tokens in {:.2}s",
            result.spec.tokens,
            started.elapsed().as_secs_f64()
        );
        let timed = timed_tokens(&stats);
        RunReport {
            summary: Summary {
                val_bpb: result.val_bpb,
                training_seconds: stats.training_seconds,
                total_seconds: self.started.elapsed().as_secs_f64(),
                peak_vram_mb: stats.peak_vram_mb,
                mfu_percent: mfu_percent(
                    self.device.is_cuda(),
                    stats.flops_per_token,
                    timed,
                    stats.training_seconds,
                ),
                total_tokens_m: stats.total_tokens as f64 / 1e6,
                num_steps: stats.num_steps,
                num_params_m: stats.num_params as f64 / 1e6,
                depth: stats.depth,
            },
            eval: result.spec,
            preset: self.data.preset().name.clone(),
            device: if self.device.is_cuda() { "cuda" } else { "cpu" }.into(),
        }
        .emit()
    }
}

/// Where a step's time goes, by phase. One step in `every` is timed: each lap synchronises the
/// device, which stops the host from queueing ahead of the GPU, so timing every step would slow
/// every step. Warm-up steps are not counted.
pub struct Stopwatch {
    device: Device,
    names: &'static [&'static str],
    every: u64,
    last: Instant,
    step: Vec<f64>,
    sums: Vec<f64>,
    timed_steps: u64,
    timing: bool,
    /// `AUTORESEARCH_PROFILE_STEP`: the step the profiler records, after which the run ends.
    profile_step: Option<u64>,
}

impl Stopwatch {
    pub fn new(device: &Device, names: &'static [&'static str], every: u64) -> Self {
        Stopwatch {
            device: device.clone(),
            names,
            every: every.max(1),
            last: Instant::now(),
            step: vec![0.0; names.len()],
            sums: vec![0.0; names.len()],
            timed_steps: 0,
            timing: true,
            profile_step: std::env::var(env::PROFILE_STEP)
                .ok()
                .and_then(|s| s.parse().ok()),
        }
    }

    /// Starts step `step` (0-based).
    pub fn start_step(&mut self, step: u64) {
        if self.profile_step == Some(step) {
            self.profiler(true);
        }
        self.timing = step.is_multiple_of(self.every);
        self.step.iter_mut().for_each(|t| *t = 0.0);
        self.last = Instant::now();
    }

    /// Charges the time since the last lap to the phase named `phase`.
    pub fn lap(&mut self, phase: &str) -> Result<()> {
        if !self.timing {
            return Ok(());
        }
        let phase = self
            .names
            .iter()
            .position(|n| *n == phase)
            .ok_or_else(|| Error::Invalid(format!("no phase `{phase}` in {:?}", self.names)))?;
        self.device.synchronize()?;
        let now = Instant::now();
        self.step[phase] += (now - self.last).as_secs_f64();
        self.last = now;
        Ok(())
    }

    /// Ends step `step`: a timed step past the warm-up joins the averages. After the step the
    /// profiler records, the process ends (exit 0, no report): what the profile is for is done.
    pub fn end_step(&mut self, step: u64) {
        if self.profile_step == Some(step) {
            self.profiler(false);
            eprintln!(
                "profiled step {step} ({}): the run ends here, before evaluation",
                env::PROFILE_STEP
            );
            std::process::exit(0);
        }
        if self.timing && step > crate::clock::WARMUP_STEPS {
            self.timed_steps += 1;
            for (sum, t) in self.sums.iter_mut().zip(&self.step) {
                *sum += t;
            }
        }
    }

    /// Starts (or stops) the profiler's recording once the device has done what was queued
    /// before: the window holds the step's kernels and nothing else.
    fn profiler(&self, start: bool) {
        let done = self.device.synchronize().map_err(Error::from);
        if let Err(e) = done.and_then(|()| profiler(&self.device, start)) {
            let what = if start { "start" } else { "stop" };
            eprintln!("warning: the profiler did not {what}: {e}");
        }
    }

    /// `time per step (ms, N timed steps): data 1.0 | forward 2.0 | ...`
    pub fn summary(&self) -> String {
        let phases: Vec<String> = self
            .names
            .iter()
            .zip(&self.sums)
            .map(|(name, t)| format!("{name} {:.1}", 1e3 * t / self.timed_steps.max(1) as f64))
            .collect();
        format!(
            "time per step (ms, {} timed steps): {}",
            self.timed_steps,
            phases.join(" | ")
        )
    }
}

/// Every kernel runs on the device's one stream, where cudarc's per-buffer events order nothing
/// (each is waited on by the stream that recorded it); it would still create and destroy two
/// with each allocation (hundreds a pass) and record or wait on them at every launch.
#[cfg(feature = "cuda")]
fn skip_stream_events(device: &Device) {
    if let Device::Cuda(cuda) = device {
        // SAFETY: one stream (candle's, which `fused` launches on too), so no buffer is used on
        // another stream, the case the events order. Called before any tensor exists.
        unsafe { cuda.disable_event_tracking() }
    }
}

#[cfg(not(feature = "cuda"))]
fn skip_stream_events(_: &Device) {}

/// Starts (or stops) the CUDA profiler's recording; nothing on the CPU.
#[cfg(feature = "cuda")]
fn profiler(device: &Device, start: bool) -> Result<()> {
    use candle_core::cuda_backend::cudarc::driver::sys;
    if !device.is_cuda() {
        return Ok(());
    }
    // SAFETY: argument-free driver calls; candle has made the context current on this thread.
    let result = unsafe {
        if start {
            sys::cuProfilerStart()
        } else {
            sys::cuProfilerStop()
        }
    };
    result
        .result()
        .map_err(|e| Error::Invalid(format!("CUDA driver: {e}")))
}

#[cfg(not(feature = "cuda"))]
fn profiler(_: &Device, _: bool) -> Result<()> {
    Ok(())
}

/// Keeps freed host memory in the process instead of handing it back to the kernel: candle
/// allocates every op's output afresh, and with glibc's defaults each large one is a new mapping
/// whose pages fault in again, two threads contending for the kernel's lock (measured on the tiny
/// CPU preset: 1.9 → 3.0 steps/s).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn keep_freed_host_memory() {
    unsafe extern "C" {
        fn mallopt(param: i32, value: i32) -> i32;
    }
    const M_TRIM_THRESHOLD: i32 = -1;
    const M_MMAP_THRESHOLD: i32 = -3;
    // SAFETY: mallopt only changes glibc's allocator settings.
    unsafe {
        mallopt(M_MMAP_THRESHOLD, 32 << 20);
        mallopt(M_TRIM_THRESHOLD, i32::MAX);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn keep_freed_host_memory() {}

/// The same on the GPU: candle allocates through the driver's stream-ordered pool, whose release
/// threshold of 0 hands freed memory back at every synchronise, so each step maps its buffers
/// afresh. Keep them in the pool (as PyTorch's caching allocator does).
#[cfg(feature = "cuda")]
fn keep_freed_device_memory(device: &Device) -> Result<()> {
    use candle_core::cuda_backend::cudarc::driver::sys;
    let Device::Cuda(cuda) = device else {
        return Ok(());
    };
    let stream = cuda.cuda_stream();
    let context = stream.context();
    if !context.has_async_alloc() {
        return Ok(());
    }
    let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
    let mut threshold = u64::MAX;
    let driver = |e: candle_core::cuda_backend::cudarc::driver::DriverError| {
        Error::Invalid(format!("CUDA driver: {e}"))
    };
    // SAFETY: plain driver calls on the device candle opened; `threshold` outlives the call.
    unsafe {
        sys::cuDeviceGetDefaultMemPool(&mut pool, context.cu_device())
            .result()
            .map_err(driver)?;
        sys::cuMemPoolSetAttribute(
            pool,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
            (&mut threshold as *mut u64).cast(),
        )
        .result()
        .map_err(driver)?;
    }
    Ok(())
}

#[cfg(not(feature = "cuda"))]
fn keep_freed_device_memory(_: &Device) -> Result<()> {
    Ok(())
}

#[cfg(feature = "cuda")]
fn device_memory_used_mb(device: &Device) -> f64 {
    use candle_core::cuda_backend::cudarc::driver::result::mem_get_info;
    match (device.is_cuda(), mem_get_info()) {
        (true, Ok((free, total))) => (total - free) as f64 / (1024.0 * 1024.0),
        _ => 0.0,
    }
}

#[cfg(not(feature = "cuda"))]
fn device_memory_used_mb(_: &Device) -> f64 {
    0.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_evaluation_batch_that_does_not_fit_is_scored_in_parts() {
        let device = Device::Cpu;
        let (rows, seq, vocab) = (5, 3, 7);
        let ids: Vec<u32> = (0..rows * seq).map(|i| (i * 5 % vocab) as u32).collect();
        let x = Tensor::from_vec(ids.clone(), (rows, seq), &device).unwrap();
        let y = Tensor::from_vec(
            ids.iter().map(|i| (i + 1) % vocab as u32).collect(),
            (rows, seq),
            &device,
        )
        .unwrap();
        // Logits that depend on each row's own ids, so a part scored out of place would show.
        let logits = |x: &Tensor| -> Result<Tensor> {
            let hot = x.to_dtype(DType::F32)?.unsqueeze(2)?;
            let scale = Tensor::arange(0f32, vocab as f32, &device)?.reshape((1, 1, vocab))?;
            Ok((hot.broadcast_mul(&scale)? * 0.1)?.sin()?)
        };
        let calls = std::cell::RefCell::new(Vec::new());
        let fits_two = |x: &Tensor| -> Result<Tensor> {
            let n = x.dim(0)?;
            calls.borrow_mut().push(n);
            if n > 2 {
                return Err(Error::Invalid(format!(
                    r#"the model: DriverError(CUDA_ERROR_OUT_OF_MEMORY, "out of memory") at {n} rows"#
                )));
            }
            logits(x)
        };
        let flat = |t: Tensor| -> Vec<f32> { t.flatten_all().unwrap().to_vec1().unwrap() };
        let whole = flat(losses_in_parts(&logits, &x, &y, &Cell::new(usize::MAX)).unwrap());
        let fits = Cell::new(usize::MAX);
        let parts = losses_in_parts(&fits_two, &x, &y, &fits).unwrap();
        assert_eq!(parts.dims(), &[rows, seq]);
        assert_eq!(flat(parts), whole);
        // 5 rows fail → 2 fit; the other 3 are split untried → 1 + 2.
        assert_eq!(*calls.borrow(), [5, 2, 1, 2]);
        assert_eq!(fits.get(), 2);
        // The next batch is split at once.
        calls.borrow_mut().clear();
        let again = losses_in_parts(&fits_two, &x, &y, &fits).unwrap();
        assert_eq!(flat(again), whole);
        assert_eq!(*calls.borrow(), [2, 1, 2]);

        // Any other failure ends the evaluation as it did.
        let broken =
            |_: &Tensor| -> Result<Tensor> { Err(Error::Invalid("shape mismatch".into())) };
        let e = losses_in_parts(&broken, &x, &y, &Cell::new(usize::MAX)).unwrap_err();
        assert!(e.to_string().contains("shape mismatch"), "{e}");
    }

    #[test]
    fn allocation_failures_are_told_from_other_errors() {
        for oom in [
            // cudarc's driver error as candle shows it, and cuBLAS's.
            r#"DriverError(CUDA_ERROR_OUT_OF_MEMORY, "out of memory")"#,
            "cublas error: CUBLAS_STATUS_ALLOC_FAILED",
            "CUDA out of memory. Tried to allocate 2.00 GiB",
        ] {
            assert!(is_out_of_memory(oom), "{oom}");
        }
        for other in [
            "shape mismatch in matmul, lhs: [8, 256, 128], rhs: [64, 128]",
            r#"DriverError(CUDA_ERROR_ILLEGAL_ADDRESS, "an illegal memory access was encountered")"#,
            "dtype mismatch in add",
        ] {
            assert!(!is_out_of_memory(other), "{other}");
        }
    }
}
