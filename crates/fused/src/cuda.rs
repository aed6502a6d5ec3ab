//! The CUDA kernels (`kernels/*.cu`, built to PTX by build.rs with nvcc) and their self-check
//! at first use: a kernel that disagrees with the plain path on this GPU, or fails to load, is
//! not used; the run goes on on the plain path after one warning line.

use std::collections::BTreeMap;
use std::sync::{Mutex, OnceLock, TryLockError};

use candle_core::cuda_backend::cudarc::driver::sys::CUfunction_attribute;
use candle_core::cuda_backend::cudarc::driver::{
    CudaFunction, CudaSlice, CudaView, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{CudaDType, CudaStorageSlice, WrapErr};
use candle_core::{CudaDevice, CudaStorage, DType, Device, Layout, Result, Shape, Storage, Tensor};

use crate::attention::flash::Backend;
use crate::attention::{CausalSoftmax, CausalSoftmaxBackward};
use crate::isolated::{self, Outcome};
use crate::{Kernel, launch, self_check};

mod ptx {
    include!(concat!(env!("OUT_DIR"), "/ptx.rs"));
}

/// The kernels' block size (`THREADS` in the .cu files).
const THREADS: u32 = 256;
/// Rows a block of the heads and gated-heads kernels takes: eight lanes a row
/// (`ROWS_PER_BLOCK` in kernels/heads.cu and gate_heads.cu).
const ROWS_PER_BLOCK: usize = THREADS as usize / 8;

/// Whether `kernel` passed its self-check on this process's GPU (checked at the first call, all
/// kernels at once in a child process where one can run: `isolated`).
pub(crate) fn checked(kernel: Kernel, dev: &CudaDevice) -> bool {
    static VERDICTS: [Mutex<Option<bool>>; Kernel::ALL.len()] =
        [const { Mutex::new(None) }; Kernel::ALL.len()];
    static ISOLATED: OnceLock<BTreeMap<Kernel, Outcome>> = OnceLock::new();
    let name = match kernel {
        Kernel::CrossEntropy => "cross-entropy",
        Kernel::CausalSoftmax => "causal softmax",
        Kernel::Embedding => "embedding",
        Kernel::RmsNorm => "RMSNorm",
        Kernel::Rotary => "rotary",
        Kernel::ReluSquared => "ReLU²",
        Kernel::Heads => "heads",
        Kernel::Attention => "flash attention",
        Kernel::Mix => "mix",
        Kernel::GateHeads => "gate heads",
        Kernel::CudnnAttention => "cuDNN attention",
    };
    let instead = match kernel {
        // Not asked for (`AUTORESEARCH_FUSED_ATTENTION=flash`): no check, no warning.
        Kernel::CudnnAttention if crate::cudnn::chosen().is_none() => return false,
        Kernel::CudnnAttention => "our flash kernels run instead",
        _ => "the plain path runs instead",
    };
    verdict(&VERDICTS[kernel as usize], name, instead, || {
        let device = Device::Cuda(dev.clone());
        let isolated = ISOLATED.get_or_init(|| {
            isolated::in_children(&Kernel::ALL, &device, isolated::CHECK_TIMEOUT, None)
        });
        match isolated.get(&kernel) {
            Some(Outcome::Passed) => Ok(()),
            Some(Outcome::Failed(why)) => Err(candle_core::Error::Msg(why.clone())),
            Some(Outcome::Undecided) | None => self_check::run(kernel, &device),
        }
    })
}

/// The check's verdict, made once. A check that ran out of memory (it runs inside the first
/// trial pass, which may be finding the card's limit) decides nothing: this call takes the
/// plain path and the next one checks again.
fn verdict(
    cell: &Mutex<Option<bool>>,
    kernel: &str,
    instead: &str,
    check: impl FnOnce() -> Result<()>,
) -> bool {
    let mut cell = match cell.try_lock() {
        Ok(cell) => cell,
        Err(TryLockError::Poisoned(e)) => e.into_inner(),
        // The check is running: a call from inside it (a check must run its op directly, not
        // through the public function) or from another thread takes the plain path rather than
        // wait on a lock that its own thread holds.
        Err(TryLockError::WouldBlock) => return false,
    };
    if let Some(passed) = *cell {
        return passed;
    }
    match check() {
        Ok(()) => *cell = Some(true),
        Err(e) if self_check::out_of_memory(&e.to_string()) => return false,
        Err(e) => {
            eprintln!(
                "warning: the fused {kernel} kernel failed its self-check on this GPU ({e}); {instead}"
            );
            *cell = Some(false);
        }
    }
    cell.unwrap_or(false)
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
        if vocab > (i32::MAX / 2) as usize {
            candle_core::bail!("the fused cross-entropy takes a vocabulary under 2^30, not {vocab}")
        }
        let x = x.slice(x_start..x_start + rows * vocab);
        let t = t.slice(t_start..t_start + rows);
        let loss = unsafe { dev.alloc::<f32>(rows)? };
        let func = dev.get_or_load_custom_func(name, "fused-cross-entropy", ptx::CROSS_ENTROPY)?;
        let vocab = vocab as i32;
        let mut b = func.builder();
        b.arg(&x).arg(&t).arg(&loss).arg(&vocab).arg(&cap);
        let config = LaunchConfig {
            shared_mem_bytes: launch::CROSS_ENTROPY_FORWARD as u32,
            ..grid(rows)
        };
        // SAFETY: the kernel reads rows × vocab inputs and rows targets, writes rows losses.
        unsafe { b.launch(config) }.w()?;
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

pub(crate) fn causal_softmax(
    op: &CausalSoftmax,
    ss: &CudaStorage,
    sl: &Layout,
) -> Result<(CudaStorage, Shape)> {
    fn launch<T: CudaDType + DeviceRepr>(
        name: &str,
        dev: &CudaDevice,
        s: &CudaSlice<T>,
        sl: &Layout,
        op: &CausalSoftmax,
    ) -> Result<CudaSlice<T>> {
        let (start, rows, t) = row_major(sl)?;
        let s = s.slice(start..start + rows * t);
        let p = unsafe { dev.alloc::<T>(rows * t)? };
        let func =
            dev.get_or_load_custom_func(name, "fused-causal-softmax", ptx::CAUSAL_SOFTMAX)?;
        let (t, window) = (t as i32, op.window.min(i32::MAX as usize) as i32);
        let mut b = func.builder();
        b.arg(&s).arg(&p).arg(&t).arg(&window).arg(&op.scale);
        // SAFETY: reads and writes rows × t elements.
        unsafe { b.launch(grid(rows)) }.w()?;
        Ok(p)
    }
    let dev = &ss.device;
    let p = match &ss.slice {
        CudaStorageSlice::BF16(s) => CudaStorage::wrap_cuda_slice(
            launch("causal_softmax_forward_bf16", dev, s, sl, op)?,
            dev.clone(),
        ),
        CudaStorageSlice::F32(s) => CudaStorage::wrap_cuda_slice(
            launch("causal_softmax_forward_f32", dev, s, sl, op)?,
            dev.clone(),
        ),
        _ => candle_core::bail!("the fused causal softmax takes bf16 or f32 scores"),
    };
    Ok((p, sl.shape().clone()))
}

pub(crate) fn causal_softmax_backward(
    op: &CausalSoftmaxBackward,
    ps: &CudaStorage,
    pl: &Layout,
    gs: &CudaStorage,
    gl: &Layout,
) -> Result<(CudaStorage, Shape)> {
    fn launch<T: CudaDType + DeviceRepr>(
        name: &str,
        dev: &CudaDevice,
        (p, pl): (&CudaSlice<T>, &Layout),
        (g, gl): (&CudaSlice<T>, &Layout),
        op: &CausalSoftmaxBackward,
    ) -> Result<CudaSlice<T>> {
        let (p_start, rows, t) = row_major(pl)?;
        let (g_start, _, _) = row_major(gl)?;
        let p = p.slice(p_start..p_start + rows * t);
        let g = g.slice(g_start..g_start + rows * t);
        let ds = unsafe { dev.alloc::<T>(rows * t)? };
        let func =
            dev.get_or_load_custom_func(name, "fused-causal-softmax", ptx::CAUSAL_SOFTMAX)?;
        let (t, window) = (t as i32, op.window.min(i32::MAX as usize) as i32);
        let mut b = func.builder();
        b.arg(&p)
            .arg(&g)
            .arg(&ds)
            .arg(&t)
            .arg(&window)
            .arg(&op.scale);
        // SAFETY: reads 2 × rows × t elements, writes rows × t.
        unsafe { b.launch(grid(rows)) }.w()?;
        Ok(ds)
    }
    if pl.shape() != gl.shape() {
        candle_core::bail!("shape mismatch: {:?} and {:?}", pl.shape(), gl.shape())
    }
    let dev = &ps.device;
    let ds = match (&ps.slice, &gs.slice) {
        (CudaStorageSlice::BF16(p), CudaStorageSlice::BF16(g)) => CudaStorage::wrap_cuda_slice(
            launch("causal_softmax_backward_bf16", dev, (p, pl), (g, gl), op)?,
            dev.clone(),
        ),
        (CudaStorageSlice::F32(p), CudaStorageSlice::F32(g)) => CudaStorage::wrap_cuda_slice(
            launch("causal_softmax_backward_f32", dev, (p, pl), (g, gl), op)?,
            dev.clone(),
        ),
        _ => {
            candle_core::bail!("the fused causal softmax's backward takes bf16 or f32, both alike")
        }
    };
    Ok((ds, pl.shape().clone()))
}

/// The start and length of a contiguous layout.
fn span(layout: &Layout) -> Result<(usize, usize)> {
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("fused ops need a contiguous input")
    };
    Ok((start, end - start))
}

fn blocks(grid_dim: (u32, u32, u32)) -> LaunchConfig {
    LaunchConfig {
        grid_dim,
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

pub(crate) fn embedding(
    ts: &CudaStorage,
    tl: &Layout,
    is: &CudaStorage,
    il: &Layout,
    dtype: DType,
) -> Result<(CudaStorage, Shape)> {
    fn launch<T: DeviceRepr, O: CudaDType + DeviceRepr>(
        name: &str,
        dev: &CudaDevice,
        (table, tl): (&CudaSlice<T>, &Layout),
        (ids, il): (&CudaSlice<u32>, &Layout),
    ) -> Result<CudaStorage> {
        let (t_start, vocab, d) = row_major(tl)?;
        let (i_start, n) = span(il)?;
        let table = table.slice(t_start..t_start + vocab * d);
        let ids = ids.slice(i_start..i_start + n);
        let out = unsafe { dev.alloc::<O>(n * d)? };
        let func = dev.get_or_load_custom_func(name, "fused-embedding", ptx::EMBEDDING)?;
        let (n32, d32, vocab32) = (n as i32, d as i32, vocab as i32);
        let mut b = func.builder();
        b.arg(&table)
            .arg(&ids)
            .arg(&out)
            .arg(&n32)
            .arg(&d32)
            .arg(&vocab32);
        // SAFETY: reads n ids and table rows below vocab; writes n × d elements, eight a thread.
        let grid = (n * d).div_ceil(8 * THREADS as usize) as u32;
        unsafe { b.launch(blocks((grid, 1, 1))) }.w()?;
        Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
    }
    let dev = &ts.device;
    let ids = (is.as_cuda_slice::<u32>()?, il);
    let out = match (&ts.slice, dtype) {
        (CudaStorageSlice::BF16(t), DType::BF16) => {
            launch::<_, half::bf16>("embedding_forward_bf16", dev, (t, tl), ids)?
        }
        (CudaStorageSlice::F32(t), DType::F32) => {
            launch::<_, f32>("embedding_forward_f32", dev, (t, tl), ids)?
        }
        (CudaStorageSlice::F32(t), DType::BF16) => {
            launch::<_, half::bf16>("embedding_forward_f32_bf16", dev, (t, tl), ids)?
        }
        _ => candle_core::bail!(
            "the fused embedding takes a bf16 or f32 table to its own dtype, or f32 to bf16"
        ),
    };
    let (_, d) = tl.shape().dims2()?;
    Ok((out, Shape::from((il.shape().elem_count(), d))))
}

/// The chunks' sums of the embedding's backward (f32, a table's size each) are held under
/// 256 MiB: a large table takes chunks longer than `launch::EMBEDDING_CHUNK`.
const EMBEDDING_SCRATCH: usize = 256 << 20;

pub(crate) fn embedding_backward(
    vocab: usize,
    dtype: DType,
    is: &CudaStorage,
    il: &Layout,
    gs: &CudaStorage,
    gl: &Layout,
) -> Result<(CudaStorage, Shape)> {
    /// G: the gradient's element, T: the table's.
    fn launch<G: Elem, T: Elem>(
        dev: &CudaDevice,
        vocab: usize,
        (ids, il): (&CudaSlice<u32>, &Layout),
        (g, gl): (&CudaSlice<G>, &Layout),
    ) -> Result<CudaStorage> {
        let (i_start, n) = span(il)?;
        let (g_start, rows, d) = row_major(gl)?;
        if rows != n {
            candle_core::bail!("embedding backward: {n} ids, {rows} gradient rows")
        }
        let ids = ids.slice(i_start..i_start + n);
        let g = g.slice(g_start..g_start + n * d);
        let len = vocab * d;
        let chunks = n
            .div_ceil(launch::EMBEDDING_CHUNK)
            .min(EMBEDDING_SCRATCH / (4 * len).max(1))
            .max(1);
        let chunk = n.div_ceil(chunks).max(1);
        let partial = unsafe { dev.alloc::<f32>(chunks * len)? };
        let dtable = unsafe { dev.alloc::<T>(len)? };
        let by_chunk = dev.get_or_load_custom_func(
            &format!("embedding_grad_chunk_{}", G::SUFFIX),
            "fused-embedding",
            ptx::EMBEDDING,
        )?;
        let (n32, d32, vocab32, chunk32) = (n as i32, d as i32, vocab as i32, chunk as i32);
        let mut b = by_chunk.builder();
        b.arg(&ids)
            .arg(&g)
            .arg(&partial)
            .arg(&n32)
            .arg(&d32)
            .arg(&vocab32)
            .arg(&chunk32);
        let config = LaunchConfig {
            grid_dim: (
                vocab.div_ceil(launch::EMBEDDING_ROWS) as u32,
                d.div_ceil(2 * THREADS as usize) as u32,
                chunks as u32,
            ),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: launch::EMBEDDING_GRAD_CHUNK as u32,
        };
        // SAFETY: reads n ids and n × d gradients; writes every element of the chunks' sums.
        unsafe { b.launch(config) }.w()?;
        let sum = dev.get_or_load_custom_func(
            &format!("embedding_grad_sum_{}", T::SUFFIX),
            "fused-embedding",
            ptx::EMBEDDING,
        )?;
        let chunks32 = chunks as i32;
        let mut b = sum.builder();
        b.arg(&partial).arg(&dtable).arg(&len).arg(&chunks32);
        // SAFETY: reads the chunks' sums; writes every one of vocab × d elements.
        unsafe { b.launch(blocks((len.div_ceil(THREADS as usize) as u32, 1, 1))) }.w()?;
        Ok(CudaStorage::wrap_cuda_slice(dtable, dev.clone()))
    }
    let dev = &gs.device;
    let ids = (is.as_cuda_slice::<u32>()?, il);
    let dtable = match (&gs.slice, dtype) {
        (CudaStorageSlice::BF16(g), DType::BF16) => {
            launch::<_, half::bf16>(dev, vocab, ids, (g, gl))?
        }
        (CudaStorageSlice::BF16(g), DType::F32) => launch::<_, f32>(dev, vocab, ids, (g, gl))?,
        (CudaStorageSlice::F32(g), DType::F32) => launch::<_, f32>(dev, vocab, ids, (g, gl))?,
        _ => candle_core::bail!(
            "the fused embedding's backward takes bf16 or f32 gradients into a table of their \
             dtype, or bf16 into f32"
        ),
    };
    let d = *gl.dims().last().unwrap_or(&1);
    Ok((dtable, Shape::from((vocab, d))))
}

/// RMSNorm over the rows of `x`: forward, or with `grad` its backward (dx).
pub(crate) fn rms_norm(
    eps: f32,
    xs: &CudaStorage,
    xl: &Layout,
    grad: Option<(&CudaStorage, &Layout)>,
) -> Result<(CudaStorage, Shape)> {
    fn launch<T: CudaDType + DeviceRepr>(
        name: &str,
        dev: &CudaDevice,
        (x, xl): (&CudaSlice<T>, &Layout),
        grad: Option<(&CudaSlice<T>, &Layout)>,
        eps: f32,
    ) -> Result<CudaSlice<T>> {
        let (start, rows, n) = row_major(xl)?;
        let x = x.slice(start..start + rows * n);
        let out = unsafe { dev.alloc::<T>(rows * n)? };
        let func = dev.get_or_load_custom_func(name, "fused-rms-norm", ptx::RMS_NORM)?;
        let (rows32, n32) = (rows as i32, n as i32);
        let warps = THREADS as usize / 32;
        let grid = (rows.div_ceil(warps) as u32, 1, 1);
        let g;
        let mut b = func.builder();
        b.arg(&x);
        if let Some((g_all, gl)) = grad {
            let (g_start, _, _) = row_major(gl)?;
            g = g_all.slice(g_start..g_start + rows * n);
            b.arg(&g);
        }
        b.arg(&out).arg(&rows32).arg(&n32).arg(&eps);
        // SAFETY: reads rows × n elements (twice that with the gradient), writes rows × n.
        unsafe { b.launch(blocks(grid)) }.w()?;
        Ok(out)
    }
    let dev = &xs.device;
    let way = if grad.is_some() {
        "backward"
    } else {
        "forward"
    };
    let out = match (&xs.slice, grad.map(|(g, gl)| (&g.slice, gl))) {
        (CudaStorageSlice::BF16(x), None) => CudaStorage::wrap_cuda_slice(
            launch(&format!("rms_norm_{way}_bf16"), dev, (x, xl), None, eps)?,
            dev.clone(),
        ),
        (CudaStorageSlice::BF16(x), Some((CudaStorageSlice::BF16(g), gl))) => {
            CudaStorage::wrap_cuda_slice(
                launch(
                    &format!("rms_norm_{way}_bf16"),
                    dev,
                    (x, xl),
                    Some((g, gl)),
                    eps,
                )?,
                dev.clone(),
            )
        }
        (CudaStorageSlice::F32(x), None) => CudaStorage::wrap_cuda_slice(
            launch(&format!("rms_norm_{way}_f32"), dev, (x, xl), None, eps)?,
            dev.clone(),
        ),
        (CudaStorageSlice::F32(x), Some((CudaStorageSlice::F32(g), gl))) => {
            CudaStorage::wrap_cuda_slice(
                launch(
                    &format!("rms_norm_{way}_f32"),
                    dev,
                    (x, xl),
                    Some((g, gl)),
                    eps,
                )?,
                dev.clone(),
            )
        }
        _ => candle_core::bail!("the fused RMSNorm takes bf16 or f32, the gradient alike"),
    };
    Ok((out, xl.shape().clone()))
}

/// The rotary turn of `x [B, T, H, hd]` by `cos, sin [T, hd/2]`, all contiguous and alike.
pub(crate) fn rotary(
    sign: f32,
    (xs, xl): (&CudaStorage, &Layout),
    (cs, cl): (&CudaStorage, &Layout),
    (ss, sl): (&CudaStorage, &Layout),
) -> Result<(CudaStorage, Shape)> {
    fn launch<T: CudaDType + DeviceRepr>(
        name: &str,
        dev: &CudaDevice,
        (x, xl): (&CudaSlice<T>, &Layout),
        (cos, cl): (&CudaSlice<T>, &Layout),
        (sin, sl): (&CudaSlice<T>, &Layout),
        sign: f32,
    ) -> Result<CudaSlice<T>> {
        let (_, t, h, hd) = xl.shape().dims4()?;
        let (x_start, n) = span(xl)?;
        let (c_start, c_n) = span(cl)?;
        let (s_start, s_n) = span(sl)?;
        if c_n != t * hd / 2 || s_n != c_n {
            candle_core::bail!("rotary: cos and sin must hold [{t}, {}]", hd / 2)
        }
        let x = x.slice(x_start..x_start + n);
        let cos = cos.slice(c_start..c_start + c_n);
        let sin = sin.slice(s_start..s_start + s_n);
        let y = unsafe { dev.alloc::<T>(n)? };
        let func = dev.get_or_load_custom_func(name, "fused-rotary", ptx::ROTARY)?;
        let pairs = n / 2;
        let (t32, h32, half32) = (t as i32, h as i32, (hd / 2) as i32);
        let mut b = func.builder();
        b.arg(&x).arg(&cos).arg(&sin).arg(&y);
        b.arg(&pairs).arg(&t32).arg(&h32).arg(&half32).arg(&sign);
        let grid = (pairs.div_ceil(THREADS as usize) as u32, 1, 1);
        // SAFETY: reads n elements of x and t × hd/2 of cos and sin; writes n elements.
        unsafe { b.launch(blocks(grid)) }.w()?;
        Ok(y)
    }
    let dev = &xs.device;
    let y = match (&xs.slice, &cs.slice, &ss.slice) {
        (CudaStorageSlice::BF16(x), CudaStorageSlice::BF16(c), CudaStorageSlice::BF16(s)) => {
            CudaStorage::wrap_cuda_slice(
                launch("rotary_bf16", dev, (x, xl), (c, cl), (s, sl), sign)?,
                dev.clone(),
            )
        }
        (CudaStorageSlice::F32(x), CudaStorageSlice::F32(c), CudaStorageSlice::F32(s)) => {
            CudaStorage::wrap_cuda_slice(
                launch("rotary_f32", dev, (x, xl), (c, cl), (s, sl), sign)?,
                dev.clone(),
            )
        }
        _ => candle_core::bail!("the fused rotary embedding takes bf16 or f32, all alike"),
    };
    Ok((y, xl.shape().clone()))
}

/// ReLU² of `x`: forward, or with `grad` its backward (dx).
pub(crate) fn relu_squared(
    xs: &CudaStorage,
    xl: &Layout,
    grad: Option<(&CudaStorage, &Layout)>,
) -> Result<(CudaStorage, Shape)> {
    fn launch<T: CudaDType + DeviceRepr>(
        name: &str,
        dev: &CudaDevice,
        (x, xl): (&CudaSlice<T>, &Layout),
        grad: Option<(&CudaSlice<T>, &Layout)>,
    ) -> Result<CudaSlice<T>> {
        let (start, n) = span(xl)?;
        let x = x.slice(start..start + n);
        let out = unsafe { dev.alloc::<T>(n)? };
        let func = dev.get_or_load_custom_func(name, "fused-relu-squared", ptx::RELU_SQUARED)?;
        let g;
        let mut b = func.builder();
        b.arg(&x);
        if let Some((g_all, gl)) = grad {
            let (g_start, _) = span(gl)?;
            g = g_all.slice(g_start..g_start + n);
            b.arg(&g);
        }
        b.arg(&out).arg(&n);
        let grid = (n.div_ceil(8 * THREADS as usize) as u32, 1, 1);
        // SAFETY: reads n elements (twice that with the gradient), writes n.
        unsafe { b.launch(blocks(grid)) }.w()?;
        Ok(out)
    }
    let dev = &xs.device;
    let way = if grad.is_some() {
        "backward"
    } else {
        "forward"
    };
    let out = match (&xs.slice, grad.map(|(g, gl)| (&g.slice, gl))) {
        (CudaStorageSlice::BF16(x), None) => CudaStorage::wrap_cuda_slice(
            launch(&format!("relu_squared_{way}_bf16"), dev, (x, xl), None)?,
            dev.clone(),
        ),
        (CudaStorageSlice::BF16(x), Some((CudaStorageSlice::BF16(g), gl))) => {
            CudaStorage::wrap_cuda_slice(
                launch(
                    &format!("relu_squared_{way}_bf16"),
                    dev,
                    (x, xl),
                    Some((g, gl)),
                )?,
                dev.clone(),
            )
        }
        (CudaStorageSlice::F32(x), None) => CudaStorage::wrap_cuda_slice(
            launch(&format!("relu_squared_{way}_f32"), dev, (x, xl), None)?,
            dev.clone(),
        ),
        (CudaStorageSlice::F32(x), Some((CudaStorageSlice::F32(g), gl))) => {
            CudaStorage::wrap_cuda_slice(
                launch(
                    &format!("relu_squared_{way}_f32"),
                    dev,
                    (x, xl),
                    Some((g, gl)),
                )?,
                dev.clone(),
            )
        }
        _ => candle_core::bail!("the fused ReLU² takes bf16 or f32, the gradient alike"),
    };
    Ok((out, xl.shape().clone()))
}

/// Attention's heads from `qkv`: forward, or with `grad` its backward (dqkv).
pub(crate) fn heads(
    op: &crate::heads::Heads,
    (qs, ql): (&CudaStorage, &Layout),
    (rs, rl): (&CudaStorage, &Layout),
    grad: Option<(&CudaStorage, &Layout)>,
) -> Result<(CudaStorage, Shape)> {
    fn launch<T: CudaDType + DeviceRepr>(
        name: &str,
        dev: &CudaDevice,
        op: &crate::heads::Heads,
        (qkv, ql): (&CudaSlice<T>, &Layout),
        (rope, rl): (&CudaSlice<T>, &Layout),
        grad: Option<(&CudaSlice<T>, &Layout)>,
    ) -> Result<CudaSlice<T>> {
        let (b, t, width) = ql.shape().dims3()?;
        let (h, hd) = (op.n_head, width / (3 * op.n_head));
        let (q_start, n) = span(ql)?;
        let (r_start, r_n) = span(rl)?;
        if r_n != t * hd {
            candle_core::bail!("heads: rope must hold [2, {t}, {}]", hd / 2)
        }
        let qkv = qkv.slice(q_start..q_start + n);
        let rope = rope.slice(r_start..r_start + r_n);
        let out = unsafe { dev.alloc::<T>(n)? };
        let func = dev.get_or_load_custom_func(name, "fused-heads", ptx::HEADS)?;
        let g;
        let mut builder = func.builder();
        builder.arg(&qkv).arg(&rope);
        if let Some((g_all, gl)) = grad {
            let (g_start, g_n) = span(gl)?;
            if g_n != n {
                candle_core::bail!("heads backward: {g_n} gradients for {n}")
            }
            g = g_all.slice(g_start..g_start + n);
            builder.arg(&g);
        }
        let (b32, t32, h32, hd32) = (b as i32, t as i32, h as i32, hd as i32);
        builder
            .arg(&out)
            .arg(&b32)
            .arg(&t32)
            .arg(&h32)
            .arg(&hd32)
            .arg(&op.eps);
        let grid = ((3 * b * h * t).div_ceil(ROWS_PER_BLOCK) as u32, 1, 1);
        // SAFETY: reads n elements of qkv (and of the gradient) and 2 × t × hd/2 of rope; writes
        // n elements, each once.
        unsafe { builder.launch(blocks(grid)) }.w()?;
        Ok(out)
    }
    let dev = &qs.device;
    let way = if grad.is_some() {
        "backward"
    } else {
        "forward"
    };
    let g = grad.map(|(g, gl)| (&g.slice, gl));
    let out = match (&qs.slice, &rs.slice, g) {
        (CudaStorageSlice::BF16(q), CudaStorageSlice::BF16(r), None) => {
            let name = format!("heads_{way}_bf16");
            CudaStorage::wrap_cuda_slice(
                launch(&name, dev, op, (q, ql), (r, rl), None)?,
                dev.clone(),
            )
        }
        (
            CudaStorageSlice::BF16(q),
            CudaStorageSlice::BF16(r),
            Some((CudaStorageSlice::BF16(g), gl)),
        ) => {
            let name = format!("heads_{way}_bf16");
            CudaStorage::wrap_cuda_slice(
                launch(&name, dev, op, (q, ql), (r, rl), Some((g, gl)))?,
                dev.clone(),
            )
        }
        (CudaStorageSlice::F32(q), CudaStorageSlice::F32(r), None) => {
            let name = format!("heads_{way}_f32");
            CudaStorage::wrap_cuda_slice(
                launch(&name, dev, op, (q, ql), (r, rl), None)?,
                dev.clone(),
            )
        }
        (
            CudaStorageSlice::F32(q),
            CudaStorageSlice::F32(r),
            Some((CudaStorageSlice::F32(g), gl)),
        ) => {
            let name = format!("heads_{way}_f32");
            CudaStorage::wrap_cuda_slice(
                launch(&name, dev, op, (q, ql), (r, rl), Some((g, gl)))?,
                dev.clone(),
            )
        }
        _ => candle_core::bail!("the fused heads take bf16 or f32, all alike"),
    };
    let (b, t, width) = ql.shape().dims3()?;
    let hd = width / (3 * op.n_head);
    let shape = match grad {
        None => Shape::from((3, b, op.n_head, t, hd)),
        Some(_) => ql.shape().clone(),
    };
    Ok((out, shape))
}

/// The shapes the kernels take: q, k, v alike `[B, H, T, hd]`, hd 64 or 128, T a multiple of
/// 64, B·H within a grid's y (what `attention` makes sure of before it chooses the kernels).
pub(crate) fn flash_dims(dims: [&[usize]; 3]) -> Result<(usize, usize, usize, usize)> {
    let [q, k, v] = dims;
    match *q {
        [b, h, t, hd]
            if k == q
                && v == q
                && matches!(hd, 64 | 128)
                && t > 0
                && t.is_multiple_of(launch::FLASH_BLOCK)
                && (1..=u16::MAX as usize).contains(&(b * h)) =>
        {
            Ok((b, h, t, hd))
        }
        _ => candle_core::bail!(
            "flash attention: q {q:?}, k {k:?}, v {v:?} are not alike [B, H, T a multiple of 64, 64 or 128]"
        ),
    }
}

/// The view of a contiguous layout of `n` elements whose start suits 16-byte loads.
pub(crate) fn aligned_view<'a, T>(
    x: &'a CudaSlice<T>,
    l: &Layout,
    n: usize,
) -> Result<CudaView<'a, T>> {
    let (start, len) = span(l)?;
    if len != n || !start.is_multiple_of(8) {
        candle_core::bail!(
            "flash attention: {len} elements from {start}, not {n} from a multiple of 8"
        )
    }
    Ok(x.slice(start..start + n))
}

/// Threads a block of the flash attention kernels.
const FLASH_THREADS: u32 = 128;

/// Lets `func` have `shared` bytes of dynamic shared memory (past the default 48 KiB).
fn allow_shared(func: &CudaFunction, shared: usize) -> Result<()> {
    func.set_attribute(
        CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
        shared as i32,
    )
    .w()
}

fn flash_config(grid_dim: (u32, u32, u32), shared: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim,
        block_dim: (FLASH_THREADS, 1, 1),
        shared_mem_bytes: shared as u32,
    }
}

/// The scale 1/√hd, and the same times log2(e) (the kernels use exp2).
fn flash_scales(hd: usize) -> (f32, f32) {
    let scale = 1.0 / (hd as f32).sqrt();
    (scale, scale * std::f32::consts::LOG2_E)
}

/// `o [B, T, H, hd]` and the rows' log2-sum-exp `[B, H, T]` from `q, k, v [B, H, T, hd]`.
pub(crate) fn flash_forward(
    window: usize,
    (qs, ql): (&CudaStorage, &Layout),
    (ks, kl): (&CudaStorage, &Layout),
    (vs, vl): (&CudaStorage, &Layout),
    backend: Backend,
    fallback: bool,
) -> Result<(CudaStorage, CudaSlice<f32>, Shape, Backend)> {
    fn launch<T: DeviceRepr>(
        dev: &CudaDevice,
        (b, h, t, hd): (usize, usize, usize, usize),
        window: usize,
        (q, k, v): (CudaView<T>, CudaView<T>, CudaView<T>),
    ) -> Result<(CudaSlice<T>, CudaSlice<f32>)> {
        let o = unsafe { dev.alloc::<T>(b * h * t * hd)? };
        let lse = unsafe { dev.alloc::<f32>(b * h * t)? };
        let shared = launch::flash_forward(hd);
        let func = dev.get_or_load_custom_func(
            &format!("flash_forward_{hd}"),
            "fused-flash-attention",
            ptx::FLASH_ATTENTION,
        )?;
        allow_shared(&func, shared)?;
        let (h32, t32, window32) = (h as i32, t as i32, window.min(t) as i32);
        let (_, scale_log2) = flash_scales(hd);
        let mut builder = func.builder();
        builder
            .arg(&q)
            .arg(&k)
            .arg(&v)
            .arg(&o)
            .arg(&lse)
            .arg(&h32)
            .arg(&t32)
            .arg(&window32)
            .arg(&scale_log2);
        let grid = ((t / launch::FLASH_BLOCK) as u32, (b * h) as u32, 1);
        // SAFETY: reads b·h·t·hd elements of each input, writes as many of o and b·h·t of lse.
        unsafe { builder.launch(flash_config(grid, shared)) }.w()?;
        Ok((o, lse))
    }
    let dims = flash_dims([ql.dims(), kl.dims(), vl.dims()])?;
    let (b, h, t, hd) = dims;
    let n = b * h * t * hd;
    let dev = &qs.device;
    let (o, lse, used) = match (&qs.slice, &ks.slice, &vs.slice) {
        (CudaStorageSlice::BF16(q), CudaStorageSlice::BF16(k), CudaStorageSlice::BF16(v)) => {
            let views = (
                aligned_view(q, ql, n)?,
                aligned_view(k, kl, n)?,
                aligned_view(v, vl, n)?,
            );
            let cudnn = match backend {
                Backend::Flash => None,
                Backend::Cudnn { .. } => {
                    let again = [&views.0, &views.1, &views.2].map(|v| v.slice(..));
                    let done = crate::cudnn::launch_forward(dev, dims, window.min(t), again);
                    cudnn_or_flash(done, fallback, dev)?
                }
            };
            let (o, lse, used) = match cudnn {
                Some((o, lse)) => (o, lse, backend),
                None => {
                    let (o, lse) = launch(dev, dims, window, views)?;
                    (o, lse, Backend::Flash)
                }
            };
            (CudaStorage::wrap_cuda_slice(o, dev.clone()), lse, used)
        }
        _ => candle_core::bail!("the flash attention kernels take bf16 q, k and v"),
    };
    Ok((o, lse, Shape::from((b, t, h, hd)), used))
}

/// cuDNN's result; or, with `fallback`, where it failed other than for memory (which the
/// caller's fit handles) and our flash kernels passed their own check on `dev`, none: cuDNN
/// switched off for the process (one warning line) and the flash kernels to run.
fn cudnn_or_flash<T>(done: Result<T>, fallback: bool, dev: &CudaDevice) -> Result<Option<T>> {
    match done {
        Ok(x) => Ok(Some(x)),
        Err(e)
            if !fallback
                || self_check::out_of_memory(&e.to_string())
                || !checked(Kernel::Attention, dev) =>
        {
            Err(e)
        }
        Err(e) => {
            crate::cudnn::disable(&e);
            Ok(None)
        }
    }
}

/// The gradients of q, k and v as one `[3, B, H, T, hd]` tensor (outside the graph), from
/// `[q, k, v, o, dO]` and the forward pass's log-sum-exp.
pub(crate) fn flash_backward(
    window: usize,
    lse: &CudaSlice<f32>,
    tensors: [&Tensor; 5],
    backend: Backend,
    fallback: bool,
) -> Result<Tensor> {
    fn launch<T: DeviceRepr>(
        dev: &CudaDevice,
        (b, h, t, hd): (usize, usize, usize, usize),
        window: usize,
        lse: &CudaSlice<f32>,
        [q, k, v, o, d_o]: [CudaView<T>; 5],
    ) -> Result<CudaSlice<T>> {
        let n = b * h * t * hd;
        let (b32, h32, t32, window32) = (b as i32, h as i32, t as i32, window.min(t) as i32);
        let (scale, scale_log2) = flash_scales(hd);

        let delta = unsafe { dev.alloc::<f32>(b * h * t)? };
        let func = dev.get_or_load_custom_func(
            &format!("flash_delta_{hd}"),
            "fused-flash-attention",
            ptx::FLASH_ATTENTION,
        )?;
        let mut builder = func.builder();
        builder
            .arg(&o)
            .arg(&d_o)
            .arg(&delta)
            .arg(&b32)
            .arg(&h32)
            .arg(&t32);
        // Eight lanes a row (DELTA_ROWS in the kernel file).
        let grid = (
            (b * t * h).div_ceil(FLASH_THREADS as usize / 8) as u32,
            1,
            1,
        );
        // SAFETY: reads n elements of o and of d_o, writes b·h·t of delta.
        unsafe { builder.launch(flash_config(grid, 0)) }.w()?;

        let mut grads = unsafe { dev.alloc::<T>(3 * n)? };
        let grid = ((t / launch::FLASH_BLOCK) as u32, (b * h) as u32, 1);
        let sides = [
            ("kv", launch::flash_backward_kv(hd)),
            ("q", launch::flash_backward_q(hd)),
        ];
        for (side, shared) in sides {
            let func = dev.get_or_load_custom_func(
                &format!("flash_backward_{side}_{hd}"),
                "fused-flash-attention",
                ptx::FLASH_ATTENTION,
            )?;
            allow_shared(&func, shared)?;
            let mut builder = func.builder();
            builder
                .arg(&q)
                .arg(&k)
                .arg(&v)
                .arg(&d_o)
                .arg(lse)
                .arg(&delta)
                .arg(&mut grads)
                .arg(&h32)
                .arg(&t32)
                .arg(&window32)
                .arg(&scale)
                .arg(&scale_log2);
            // SAFETY: reads n elements of q, k, v and d_o and b·h·t of lse and delta; writes
            // its side's n-element parts of grads, each element once.
            unsafe { builder.launch(flash_config(grid, shared)) }.w()?;
        }
        Ok(grads)
    }
    let dims = flash_dims([tensors[0].dims(), tensors[1].dims(), tensors[2].dims()])?;
    let (b, h, t, hd) = dims;
    if tensors[3].dims() != [b, t, h, hd] || tensors[4].dims() != [b, t, h, hd] {
        candle_core::bail!(
            "flash attention backward: o and its gradient must be [{b}, {t}, {h}, {hd}]"
        )
    }
    let n = b * h * t * hd;
    let Device::Cuda(dev) = tensors[0].device() else {
        candle_core::bail!("the flash attention kernels run on CUDA")
    };
    let locked = tensors.map(|x| x.storage_and_layout());
    let mut views = Vec::with_capacity(5);
    for (storage, layout) in &locked {
        match &**storage {
            Storage::Cuda(CudaStorage {
                slice: CudaStorageSlice::BF16(x),
                ..
            }) => views.push(aligned_view(x, layout, n)?),
            _ => candle_core::bail!("the flash attention kernels take bf16 on CUDA throughout"),
        }
    }
    let views: [_; 5] = views.try_into().expect("five views");
    let grads = match backend {
        Backend::Flash => launch(dev, dims, window, lse, views)?,
        Backend::Cudnn { deterministic } => {
            let again = views.each_ref().map(|v| v.slice(..));
            let done =
                crate::cudnn::launch_backward(dev, dims, window.min(t), lse, again, deterministic);
            match cudnn_or_flash(done, fallback, dev)? {
                Some(grads) => grads,
                None => {
                    // cuDNN's statistics are the rows' natural-log sum-exp; our kernels take
                    // base 2, of the same scaled scores.
                    let lse = Tensor::from_storage(
                        Storage::Cuda(CudaStorage::wrap_cuda_slice(
                            lse.try_clone().w()?,
                            dev.clone(),
                        )),
                        b * h * t,
                        candle_core::op::BackpropOp::none(),
                        false,
                    );
                    let lse2 = (lse * std::f64::consts::LOG2_E)?;
                    let (storage, _) = lse2.storage_and_layout();
                    let Storage::Cuda(lse2) = &*storage else {
                        candle_core::bail!("flash attention: the statistics left the GPU")
                    };
                    launch(dev, dims, window, lse2.as_cuda_slice::<f32>()?, views)?
                }
            }
        }
    };
    let storage = Storage::Cuda(CudaStorage::wrap_cuda_slice(grads, dev.clone()));
    Ok(Tensor::from_storage(
        storage,
        (3, b, h, t, hd),
        candle_core::op::BackpropOp::none(),
        false,
    ))
}

/// The element types the kernels come in, by their names' suffix.
trait Elem: CudaDType + DeviceRepr {
    const SUFFIX: &'static str;
}

impl Elem for half::bf16 {
    const SUFFIX: &'static str = "bf16";
}

impl Elem for f32 {
    const SUFFIX: &'static str = "f32";
}

/// The `n` contiguous elements of a `T` storage that `layout` names.
fn elems<'a, T: Elem>(
    storage: &'a CudaStorage,
    layout: &Layout,
    n: usize,
) -> Result<CudaView<'a, T>> {
    let (start, len) = span(layout)?;
    if len != n {
        candle_core::bail!("a fused kernel expected {n} elements, not {len}")
    }
    Ok(storage.as_cuda_slice::<T>()?.slice(start..start + n))
}

/// A tensor outside the graph from a kernel's output.
fn tensor<T: Elem>(out: CudaSlice<T>, dev: &CudaDevice, shape: impl Into<Shape>) -> Tensor {
    let storage = Storage::Cuda(CudaStorage::wrap_cuda_slice(out, dev.clone()));
    Tensor::from_storage(storage, shape, candle_core::op::BackpropOp::none(), false)
}

/// The CUDA storages of locked tensors (`Tensor::storage_and_layout`), with their layouts.
fn cuda_parts<'a, G: std::ops::Deref<Target = Storage>, const N: usize>(
    locked: &'a [(G, &'a Layout); N],
) -> Result<[(&'a CudaStorage, &'a Layout); N]> {
    let mut parts = Vec::with_capacity(N);
    for (storage, layout) in locked {
        match &**storage {
            Storage::Cuda(s) => parts.push((s, *layout)),
            _ => candle_core::bail!("a fused CUDA kernel was given a tensor off the GPU"),
        }
    }
    Ok(parts.try_into().unwrap_or_else(|_| unreachable!("N parts")))
}

/// bf16 or f32, the kernels' element types, by a storage's elements.
fn elem_dtype(storage: &CudaStorage) -> Option<DType> {
    match storage.slice {
        CudaStorageSlice::BF16(_) => Some(DType::BF16),
        CudaStorageSlice::F32(_) => Some(DType::F32),
        _ => None,
    }
}

/// Blocks of the mix's backward at most: its partial sums.
const MIX_BLOCKS: usize = 1024;

/// The mix backward's grid for `n` elements: a function of n alone, so the sums' order is too.
fn mix_grid(n: usize) -> usize {
    n.div_ceil(8 * THREADS as usize).clamp(1, MIX_BLOCKS)
}

/// `a·x + b·z`, for `ab = [a, b]` in f32 (kernels/mix.cu).
pub(crate) fn mix(
    (xs, xl): (&CudaStorage, &Layout),
    (zs, zl): (&CudaStorage, &Layout),
    (abs, abl): (&CudaStorage, &Layout),
) -> Result<(CudaStorage, Shape)> {
    fn launch<T: Elem>(
        (xs, xl): (&CudaStorage, &Layout),
        (zs, zl): (&CudaStorage, &Layout),
        (abs, abl): (&CudaStorage, &Layout),
    ) -> Result<CudaStorage> {
        let n = xl.shape().elem_count();
        let (x, z) = (elems::<T>(xs, xl, n)?, elems::<T>(zs, zl, n)?);
        let ab = elems::<f32>(abs, abl, 2)?;
        let dev = &xs.device;
        let y = unsafe { dev.alloc::<T>(n)? };
        let name = format!("mix_forward_{}", T::SUFFIX);
        let func = dev.get_or_load_custom_func(&name, "fused-mix", ptx::MIX)?;
        let mut b = func.builder();
        b.arg(&x).arg(&z).arg(&ab).arg(&y).arg(&n);
        let grid = (n.div_ceil(8 * THREADS as usize) as u32, 1, 1);
        // SAFETY: reads n elements of x and z and 2 of ab; writes n.
        unsafe { b.launch(blocks(grid)) }.w()?;
        Ok(CudaStorage::wrap_cuda_slice(y, dev.clone()))
    }
    let y = match elem_dtype(xs) {
        Some(DType::BF16) => launch::<half::bf16>((xs, xl), (zs, zl), (abs, abl))?,
        Some(DType::F32) => launch::<f32>((xs, xl), (zs, zl), (abs, abl))?,
        _ => candle_core::bail!("the fused mix takes bf16 or f32"),
    };
    Ok((y, xl.shape().clone()))
}

/// The mix's gradient from `g`: dx = a·g, dz = b·g, and the blocks' sums of g·x and g·z,
/// `[blocks, 2]`, which the caller sums (in a fixed order: the grid is n's alone).
pub(crate) fn mix_backward(
    x: &Tensor,
    z: &Tensor,
    ab: &Tensor,
    g: &Tensor,
) -> Result<(Tensor, Tensor, Tensor)> {
    fn launch<T: Elem>(
        [(xs, xl), (zs, zl), (abs, abl), (gs, gl)]: [(&CudaStorage, &Layout); 4],
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let n = xl.shape().elem_count();
        let (x, z, g) = (
            elems::<T>(xs, xl, n)?,
            elems::<T>(zs, zl, n)?,
            elems::<T>(gs, gl, n)?,
        );
        let ab = elems::<f32>(abs, abl, 2)?;
        let dev = &xs.device;
        let grid = mix_grid(n);
        let (dx, dz) = unsafe { (dev.alloc::<T>(n)?, dev.alloc::<T>(n)?) };
        let partial = unsafe { dev.alloc::<f32>(2 * grid)? };
        let name = format!("mix_backward_{}", T::SUFFIX);
        let func = dev.get_or_load_custom_func(&name, "fused-mix", ptx::MIX)?;
        let mut b = func.builder();
        b.arg(&x).arg(&z).arg(&g).arg(&ab);
        b.arg(&dx).arg(&dz).arg(&partial).arg(&n);
        let config = LaunchConfig {
            grid_dim: (grid as u32, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: launch::MIX_BACKWARD as u32,
        };
        // SAFETY: reads n elements of x, z and g and 2 of ab; writes n of dx and dz and two
        // sums a block.
        unsafe { b.launch(config) }.w()?;
        let shape = xl.shape();
        Ok((
            tensor(dx, dev, shape),
            tensor(dz, dev, shape),
            tensor(partial, dev, (grid, 2)),
        ))
    }
    let g = g.contiguous()?;
    let locked = [x, z, ab, &g].map(|t| t.storage_and_layout());
    let parts = cuda_parts(&locked)?;
    match x.dtype() {
        DType::BF16 => launch::<half::bf16>(parts),
        DType::F32 => launch::<f32>(parts),
        other => candle_core::bail!("the fused mix takes bf16 or f32, not {other:?}"),
    }
}

/// `x [B, T, H·hd]` times `gate [B, T, H]`, head-major `[B, H, T, hd]` (kernels/gate_heads.cu).
pub(crate) fn gate_heads(
    (xs, xl): (&CudaStorage, &Layout),
    (gs, gl): (&CudaStorage, &Layout),
) -> Result<(CudaStorage, Shape)> {
    fn launch<T: Elem>(
        (xs, xl): (&CudaStorage, &Layout),
        (gs, gl): (&CudaStorage, &Layout),
    ) -> Result<CudaStorage> {
        let (b, t, h) = gl.shape().dims3()?;
        let n = xl.shape().elem_count();
        let rows = b * t * h;
        let (x, gate) = (elems::<T>(xs, xl, n)?, elems::<T>(gs, gl, rows)?);
        let dev = &xs.device;
        let y = unsafe { dev.alloc::<T>(n)? };
        let name = format!("gate_heads_forward_{}", T::SUFFIX);
        let func = dev.get_or_load_custom_func(&name, "fused-gate-heads", ptx::GATE_HEADS)?;
        let (t32, h32, hd32) = (t as i32, h as i32, (n / rows.max(1)) as i32);
        let mut bld = func.builder();
        bld.arg(&x).arg(&gate).arg(&y).arg(&rows);
        bld.arg(&t32).arg(&h32).arg(&hd32);
        let grid = (rows.div_ceil(ROWS_PER_BLOCK) as u32, 1, 1);
        // SAFETY: reads n elements of x and rows of gate; writes n, each once.
        unsafe { bld.launch(blocks(grid)) }.w()?;
        Ok(CudaStorage::wrap_cuda_slice(y, dev.clone()))
    }
    let (b, t, h) = gl.shape().dims3()?;
    let hd = xl.shape().elem_count() / (b * t * h).max(1);
    let y = match elem_dtype(xs) {
        Some(DType::BF16) => launch::<half::bf16>((xs, xl), (gs, gl))?,
        Some(DType::F32) => launch::<f32>((xs, xl), (gs, gl))?,
        _ => candle_core::bail!("the fused gate takes bf16 or f32"),
    };
    Ok((y, Shape::from((b, h, t, hd))))
}

/// Its gradient from `gy [B, H, T, hd]`: dx in x's layout and dgate `[B, T, H]`.
pub(crate) fn gate_heads_backward(
    x: &Tensor,
    gate: &Tensor,
    gy: &Tensor,
) -> Result<(Tensor, Tensor)> {
    fn launch<T: Elem>(
        [(xs, xl), (gs, gl), (ys, yl)]: [(&CudaStorage, &Layout); 3],
    ) -> Result<(Tensor, Tensor)> {
        let (b, t, h) = gl.shape().dims3()?;
        let n = xl.shape().elem_count();
        let rows = b * t * h;
        let (x, gate, gy) = (
            elems::<T>(xs, xl, n)?,
            elems::<T>(gs, gl, rows)?,
            elems::<T>(ys, yl, n)?,
        );
        let dev = &xs.device;
        let (dx, dgate) = unsafe { (dev.alloc::<T>(n)?, dev.alloc::<T>(rows)?) };
        let name = format!("gate_heads_backward_{}", T::SUFFIX);
        let func = dev.get_or_load_custom_func(&name, "fused-gate-heads", ptx::GATE_HEADS)?;
        let (t32, h32, hd32) = (t as i32, h as i32, (n / rows.max(1)) as i32);
        let mut bld = func.builder();
        bld.arg(&x)
            .arg(&gate)
            .arg(&gy)
            .arg(&dx)
            .arg(&dgate)
            .arg(&rows);
        bld.arg(&t32).arg(&h32).arg(&hd32);
        let grid = (rows.div_ceil(ROWS_PER_BLOCK) as u32, 1, 1);
        // SAFETY: reads n elements of x and gy and rows of gate; writes n of dx, rows of dgate.
        unsafe { bld.launch(blocks(grid)) }.w()?;
        Ok((tensor(dx, dev, xl.shape()), tensor(dgate, dev, gl.shape())))
    }
    let gy = gy.contiguous()?;
    let locked = [x, gate, &gy].map(|t| t.storage_and_layout());
    let parts = cuda_parts(&locked)?;
    match x.dtype() {
        DType::BF16 => launch::<half::bf16>(parts),
        DType::F32 => launch::<f32>(parts),
        other => candle_core::bail!("the fused gate takes bf16 or f32, not {other:?}"),
    }
}
