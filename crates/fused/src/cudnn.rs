//! cuDNN's fused attention (`cudnn/sdpa.cpp`, over NVIDIA's header-only frontend), forward and
//! backward, at the flash kernels' layouts: q, k, v `[B, H, T, hd]` bf16 in, o `[B, T, H, hd]`
//! out, the heads' gradient as one `[3, B, H, T, hd]` tensor. `libcudnn.so.9` is opened at the
//! first call; where it is missing, or the build had no cuDNN headers, the calls fail and the
//! self-check keeps the flash kernels.

use std::collections::BTreeMap;
use std::sync::Mutex;

use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaView};
use candle_core::{CudaDevice, Result};

/// `AUTORESEARCH_FUSED_ATTENTION`: `cudnn` (the default), `cudnn-nondeterministic` or `flash`
/// (ours only), so that a GPU window measures each without a rebuild.
pub(crate) const ATTENTION_ENV: &str = "AUTORESEARCH_FUSED_ATTENTION";

/// Whether cuDNN may compute attention, and whether its backward is bitwise deterministic
/// (cuDNN then keeps dP in a workspace of B·H·T² bf16): replaying an experiment by its hash
/// should give its numbers again, so it is unless the variable says otherwise.
pub(crate) fn chosen() -> Option<bool> {
    static CHOICE: std::sync::OnceLock<Option<bool>> = std::sync::OnceLock::new();
    *CHOICE.get_or_init(|| match std::env::var(ATTENTION_ENV).as_deref() {
        Ok("flash") => None,
        Ok("cudnn-nondeterministic") => Some(false),
        Ok("cudnn") | Err(_) => Some(true),
        Ok(other) => {
            eprintln!(
                "warning: {ATTENTION_ENV}={other} is not cudnn, cudnn-nondeterministic or flash; cudnn it is"
            );
            Some(true)
        }
    })
}

#[cfg(fused_cudnn)]
mod ffi {
    use std::ffi::{c_char, c_int, c_void};

    unsafe extern "C" {
        pub fn ar_cudnn_error() -> *const c_char;
        pub fn ar_cudnn_load(version: *mut usize) -> c_int;
        pub fn ar_cudnn_open(stream: *mut c_void, version: *mut usize) -> c_int;
        pub fn ar_sdpa_workspace(
            backward: c_int,
            b: i64,
            h: i64,
            t: i64,
            d: i64,
            window: i64,
            deterministic: c_int,
            bytes: *mut i64,
        ) -> c_int;
        pub fn ar_sdpa_forward(
            b: i64,
            h: i64,
            t: i64,
            d: i64,
            window: i64,
            q: u64,
            k: u64,
            v: u64,
            o: u64,
            stats: u64,
            workspace: u64,
        ) -> c_int;
        pub fn ar_sdpa_backward(
            b: i64,
            h: i64,
            t: i64,
            d: i64,
            window: i64,
            deterministic: c_int,
            q: u64,
            k: u64,
            v: u64,
            o: u64,
            d_o: u64,
            stats: u64,
            dq: u64,
            dk: u64,
            dv: u64,
            workspace: u64,
        ) -> c_int;
    }
}

#[cfg(fused_cudnn)]
mod imp {
    use std::ffi::{CStr, c_int, c_void};
    use std::sync::OnceLock;

    use candle_core::cuda_backend::cudarc::driver::CudaSlice;
    use candle_core::{CudaDevice, Result};

    use super::ffi;

    pub(super) fn status(code: c_int, what: &str) -> Result<()> {
        if code == 0 {
            return Ok(());
        }
        // SAFETY: the library returns a NUL-terminated message of this thread's last failure.
        let why = unsafe { CStr::from_ptr(ffi::ar_cudnn_error()) }.to_string_lossy();
        candle_core::bail!("cuDNN attention, {what}: {why}")
    }

    pub(super) fn load() -> Result<usize> {
        let mut version = 0usize;
        // SAFETY: one usize out.
        status(
            unsafe { ffi::ar_cudnn_load(&mut version) },
            "opening libcudnn.so.9",
        )?;
        Ok(version)
    }

    /// cuDNN's version, the library opened and its handle bound to `dev`'s stream (once).
    pub(super) fn open(dev: &CudaDevice) -> Result<usize> {
        static OPENED: OnceLock<std::result::Result<usize, String>> = OnceLock::new();
        OPENED
            .get_or_init(|| {
                let stream = dev.cuda_stream();
                let mut version = 0usize;
                // SAFETY: the stream outlives the process's use of it (candle's device holds it).
                let code =
                    unsafe { ffi::ar_cudnn_open(stream.cu_stream() as *mut c_void, &mut version) };
                status(code, "opening libcudnn.so.9")
                    .map(|()| version)
                    .map_err(|e| e.to_string())
            })
            .clone()
            .map_err(candle_core::Error::Msg)
    }

    /// A workspace of the size the graph at this shape asks for (a byte where it asks for
    /// none).
    pub(super) fn workspace(
        dev: &CudaDevice,
        backward: bool,
        dims: (usize, usize, usize, usize),
        window: usize,
        deterministic: bool,
    ) -> Result<CudaSlice<u8>> {
        let bytes = workspace_size(backward, dims, window, deterministic)?;
        // SAFETY: scratch memory, written by cuDNN before it reads it.
        unsafe { dev.alloc::<u8>(bytes.max(1)) }
    }

    /// The workspace the graph at this shape asks for, its graph built at the first call.
    pub(super) fn workspace_size(
        backward: bool,
        (b, h, t, d): (usize, usize, usize, usize),
        window: usize,
        deterministic: bool,
    ) -> Result<usize> {
        let mut bytes = 0i64;
        // SAFETY: plain values in, one i64 out.
        let code = unsafe {
            ffi::ar_sdpa_workspace(
                backward as c_int,
                b as i64,
                h as i64,
                t as i64,
                d as i64,
                window as i64,
                deterministic as c_int,
                &mut bytes,
            )
        };
        status(code, "building its graph")?;
        Ok(bytes.max(0) as usize)
    }
}

#[cfg(not(fused_cudnn))]
fn unbuilt<T>() -> Result<T> {
    candle_core::bail!(
        "this build has no cuDNN attention (cuDNN's headers were not found when it was compiled: scripts/cuda-env.sh installs them)"
    )
}

/// Whether cuDNN builds both passes' graphs for q, k, v `[B, H, T, hd]` and `window` (decided
/// once a shape, before the op runs: a graph that fails to build mid-backward could not fall
/// back). A shape it cannot take goes to the flash kernels after one warning line.
pub(crate) fn supports(
    dev: &CudaDevice,
    dims: (usize, usize, usize, usize),
    window: usize,
    deterministic: bool,
) -> bool {
    static SHAPES: Mutex<BTreeMap<Shape3, bool>> = Mutex::new(BTreeMap::new());
    let mut shapes = SHAPES.lock().unwrap_or_else(|e| e.into_inner());
    let key = (dims, window.min(dims.2), deterministic);
    if let Some(&ok) = shapes.get(&key) {
        return ok;
    }
    let built = build(dev, key);
    if let Err(e) = &built {
        let (b, h, t, hd) = dims;
        eprintln!(
            "warning: cuDNN's attention cannot take [{b}, {h}, {t}, {hd}] with window {} ({}); the flash kernels take it",
            key.1,
            e.to_string().lines().next().unwrap_or_default()
        );
    }
    shapes.insert(key, built.is_ok());
    built.is_ok()
}

#[cfg(fused_cudnn)]
fn build(dev: &CudaDevice, (dims, window, deterministic): Shape3) -> Result<()> {
    imp::open(dev)?;
    imp::workspace_size(false, dims, window, false)?;
    imp::workspace_size(true, dims, window, deterministic)?;
    Ok(())
}

#[cfg(not(fused_cudnn))]
fn build(_: &CudaDevice, _: Shape3) -> Result<()> {
    unbuilt()
}

type Shape3 = ((usize, usize, usize, usize), usize, bool);

/// cuDNN's version (91900 for 9.19.0), its library opened; needs no GPU.
pub(crate) fn loaded_version() -> Result<usize> {
    #[cfg(fused_cudnn)]
    return imp::load();
    #[cfg(not(fused_cudnn))]
    unbuilt()
}

/// cuDNN's version, opening the library on `dev` at the first call.
pub(crate) fn version(dev: &CudaDevice) -> Result<usize> {
    #[cfg(fused_cudnn)]
    return imp::open(dev);
    #[cfg(not(fused_cudnn))]
    {
        let _ = dev;
        unbuilt()
    }
}

#[cfg(fused_cudnn)]
use candle_core::cuda_backend::cudarc::driver::{DevicePtr, DevicePtrMut};

/// `o [B, T, H, hd]` and the rows' natural-log sum-exp `[B, H, T]` from `q, k, v`.
#[cfg(fused_cudnn)]
pub(crate) fn launch_forward(
    dev: &CudaDevice,
    dims: (usize, usize, usize, usize),
    window: usize,
    [q, k, v]: [CudaView<half::bf16>; 3],
) -> Result<(CudaSlice<half::bf16>, CudaSlice<f32>)> {
    imp::open(dev)?;
    let (b, h, t, hd) = dims;
    let workspace = imp::workspace(dev, false, dims, window, false)?;
    // SAFETY: written in full by the forward pass before anything reads them.
    let mut o = unsafe { dev.alloc::<half::bf16>(b * h * t * hd)? };
    let mut stats = unsafe { dev.alloc::<f32>(b * h * t)? };
    let stream = dev.cuda_stream();
    {
        let (qp, _q) = q.device_ptr(&stream);
        let (kp, _k) = k.device_ptr(&stream);
        let (vp, _v) = v.device_ptr(&stream);
        let (op, _o) = o.device_ptr_mut(&stream);
        let (sp, _s) = stats.device_ptr_mut(&stream);
        let (wp, _w) = workspace.device_ptr(&stream);
        // SAFETY: each pointer is a live allocation of the size the graph's layouts describe
        // (q, k, v and o b·h·t·hd bf16, stats b·h·t f32, the workspace as asked), on the
        // stream the handle is bound to; the workspace is freed on that stream after the call.
        let code = unsafe {
            ffi::ar_sdpa_forward(
                b as i64,
                h as i64,
                t as i64,
                hd as i64,
                window as i64,
                qp,
                kp,
                vp,
                op,
                sp,
                wp,
            )
        };
        imp::status(code, "forward")?;
    }
    Ok((o, stats))
}

#[cfg(not(fused_cudnn))]
pub(crate) fn launch_forward(
    _: &CudaDevice,
    _: (usize, usize, usize, usize),
    _: usize,
    _: [CudaView<half::bf16>; 3],
) -> Result<(CudaSlice<half::bf16>, CudaSlice<f32>)> {
    unbuilt()
}

/// dq, dk and dv as the three parts of one allocation, from `[q, k, v, o, dO]` and the
/// forward pass's statistics.
#[cfg(fused_cudnn)]
pub(crate) fn launch_backward(
    dev: &CudaDevice,
    dims: (usize, usize, usize, usize),
    window: usize,
    stats: &CudaSlice<f32>,
    [q, k, v, o, d_o]: [CudaView<half::bf16>; 5],
    deterministic: bool,
) -> Result<CudaSlice<half::bf16>> {
    imp::open(dev)?;
    let (b, h, t, hd) = dims;
    let n = b * h * t * hd;
    let workspace = imp::workspace(dev, true, dims, window, deterministic)?;
    // SAFETY: cuDNN writes every element of dq, dk and dv.
    let mut grads = unsafe { dev.alloc::<half::bf16>(3 * n)? };
    let stream = dev.cuda_stream();
    {
        let (qp, _q) = q.device_ptr(&stream);
        let (kp, _k) = k.device_ptr(&stream);
        let (vp, _v) = v.device_ptr(&stream);
        let (op, _o) = o.device_ptr(&stream);
        let (dop, _do) = d_o.device_ptr(&stream);
        let (sp, _s) = stats.device_ptr(&stream);
        let (gp, _g) = grads.device_ptr_mut(&stream);
        let (wp, _w) = workspace.device_ptr(&stream);
        let part = (n * std::mem::size_of::<half::bf16>()) as u64;
        // SAFETY: as the forward's; dq, dk and dv are the three consecutive n-element parts of
        // `grads`.
        let code = unsafe {
            ffi::ar_sdpa_backward(
                b as i64,
                h as i64,
                t as i64,
                hd as i64,
                window as i64,
                deterministic as std::ffi::c_int,
                qp,
                kp,
                vp,
                op,
                dop,
                sp,
                gp,
                gp + part,
                gp + 2 * part,
                wp,
            )
        };
        imp::status(code, "backward")?;
    }
    Ok(grads)
}

#[cfg(not(fused_cudnn))]
pub(crate) fn launch_backward(
    _: &CudaDevice,
    _: (usize, usize, usize, usize),
    _: usize,
    _: &CudaSlice<f32>,
    _: [CudaView<half::bf16>; 5],
    _: bool,
) -> Result<CudaSlice<half::bf16>> {
    unbuilt()
}
