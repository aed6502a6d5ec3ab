//! cuDNN's fused attention (`cudnn/sdpa.cpp`, over NVIDIA's header-only frontend), forward and
//! backward, at the flash kernels' layouts: q, k, v `[B, H, T, hd]` bf16 in, o `[B, T, H, hd]`
//! out, the heads' gradient as one `[3, B, H, T, hd]` tensor. `libcudnn.so.9` is opened at the
//! first call; where it is missing, or the build had no cuDNN headers, the calls fail and the
//! flash kernels take attention (at the self-check, at a shape's first use, or, where cuDNN
//! fails mid-run, from then on: `disable`).

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaView};
use candle_core::{CudaDevice, Result};

/// `AUTORESEARCH_FUSED_ATTENTION`: `cudnn` (the default), `cudnn-nondeterministic` or `flash`
/// (ours only), so that a GPU window measures each without a rebuild.
pub(crate) const ATTENTION_ENV: &str = "AUTORESEARCH_FUSED_ATTENTION";

static DISABLED: AtomicBool = AtomicBool::new(false);

/// Whether cuDNN may compute attention, and whether its backward is bitwise deterministic
/// (cuDNN then keeps dP in a workspace of B·H·T² bf16): replaying an experiment by its hash
/// should give its numbers again, so it is unless the variable says otherwise.
pub(crate) fn chosen() -> Option<bool> {
    static CHOICE: std::sync::OnceLock<Option<bool>> = std::sync::OnceLock::new();
    let choice = *CHOICE.get_or_init(|| match std::env::var(ATTENTION_ENV).as_deref() {
        Ok("flash") => None,
        Ok("cudnn-nondeterministic") => Some(false),
        Ok("cudnn") | Err(_) => Some(true),
        Ok(other) => {
            eprintln!(
                "warning: {ATTENTION_ENV}={other} is not cudnn, cudnn-nondeterministic or flash; cudnn it is"
            );
            Some(true)
        }
    });
    choice.filter(|_| !DISABLED.load(Ordering::Relaxed))
}

/// cuDNN failed at a call it had built for: the flash kernels take attention for the rest of
/// the process, after one warning line.
pub(crate) fn disable(error: &candle_core::Error) {
    if !DISABLED.swap(true, Ordering::Relaxed) {
        eprintln!(
            "warning: cuDNN's attention failed ({}); our flash kernels run instead",
            error.to_string().lines().next().unwrap_or_default()
        );
    }
}

#[cfg(fused_cudnn)]
mod ffi {
    use std::ffi::{c_char, c_int, c_void};

    unsafe extern "C" {
        pub fn ar_cudnn_error() -> *const c_char;
        pub fn ar_cudnn_load(version: *mut usize, cudart: *mut usize) -> c_int;
        pub fn ar_cudnn_open(version: *mut usize, cudart: *mut usize) -> c_int;
        pub fn ar_sdpa_workspace(
            stream: *mut c_void,
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
            stream: *mut c_void,
            b: i64,
            h: i64,
            t: i64,
            d: i64,
            window: i64,
            q: *mut c_void,
            k: *mut c_void,
            v: *mut c_void,
            o: *mut c_void,
            stats: *mut c_void,
            workspace: *mut c_void,
        ) -> c_int;
        pub fn ar_sdpa_backward(
            stream: *mut c_void,
            b: i64,
            h: i64,
            t: i64,
            d: i64,
            window: i64,
            deterministic: c_int,
            q: *mut c_void,
            k: *mut c_void,
            v: *mut c_void,
            o: *mut c_void,
            d_o: *mut c_void,
            stats: *mut c_void,
            dq: *mut c_void,
            dk: *mut c_void,
            dv: *mut c_void,
            workspace: *mut c_void,
        ) -> c_int;
    }
}

#[cfg(fused_cudnn)]
mod imp {
    use std::ffi::{CStr, c_int, c_void};
    use std::sync::OnceLock;

    use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaView, DevicePtr, DevicePtrMut};
    use candle_core::{CudaDevice, Result};

    use super::ffi;

    fn status(code: c_int, what: &str) -> Result<()> {
        if code == 0 {
            return Ok(());
        }
        // SAFETY: the library returns a NUL-terminated message of this thread's last failure.
        let why = unsafe { CStr::from_ptr(ffi::ar_cudnn_error()) }.to_string_lossy();
        candle_core::bail!("cuDNN attention, {what}: {why}")
    }

    fn ptr(p: u64) -> *mut c_void {
        p as usize as *mut c_void
    }

    pub(super) fn load() -> Result<(usize, usize)> {
        let (mut version, mut cudart) = (0usize, 0usize);
        // SAFETY: two usizes out.
        let code = unsafe { ffi::ar_cudnn_load(&mut version, &mut cudart) };
        status(code, "opening libcudnn.so.9")?;
        Ok((version, cudart))
    }

    /// cuDNN's version, the library opened and its handle made (once).
    pub(super) fn open() -> Result<usize> {
        static OPENED: OnceLock<std::result::Result<usize, String>> = OnceLock::new();
        OPENED
            .get_or_init(|| {
                let (mut version, mut cudart) = (0usize, 0usize);
                // SAFETY: two usizes out.
                let code = unsafe { ffi::ar_cudnn_open(&mut version, &mut cudart) };
                status(code, "opening libcudnn.so.9")
                    .and_then(|()| match cudart {
                        0 | 13_000.. => Ok(version),
                        // Its fused engines would need that CUDA's NVRTC, and fail to build.
                        _ => candle_core::bail!(
                            "the libcudnn.so.9 found is built for CUDA {}.{}, this process runs CUDA 13: put a CUDA 13 cuDNN's lib folder first on LD_LIBRARY_PATH",
                            cudart / 1000,
                            cudart % 1000 / 10
                        ),
                    })
                    .map_err(|e| e.to_string())
            })
            .clone()
            .map_err(candle_core::Error::Msg)
    }

    fn stream(dev: &CudaDevice) -> *mut c_void {
        dev.cuda_stream().cu_stream() as *mut c_void
    }

    /// The workspace the graph at this shape asks for, its graph built at the first call.
    pub(super) fn workspace_size(
        dev: &CudaDevice,
        backward: bool,
        (b, h, t, d): (usize, usize, usize, usize),
        window: usize,
        deterministic: bool,
    ) -> Result<usize> {
        open()?;
        let mut bytes = 0i64;
        // SAFETY: plain values and the device's live stream in, one i64 out.
        let code = unsafe {
            ffi::ar_sdpa_workspace(
                stream(dev),
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

    /// Scratch memory of the size the graph at this shape asks for (a byte where none).
    fn workspace(
        dev: &CudaDevice,
        backward: bool,
        dims: (usize, usize, usize, usize),
        window: usize,
        deterministic: bool,
    ) -> Result<CudaSlice<u8>> {
        let bytes = workspace_size(dev, backward, dims, window, deterministic)?;
        // SAFETY: written by cuDNN before it reads it.
        unsafe { dev.alloc::<u8>(bytes.max(1)) }
    }

    pub(super) fn forward(
        dev: &CudaDevice,
        dims: (usize, usize, usize, usize),
        window: usize,
        [q, k, v]: [CudaView<half::bf16>; 3],
    ) -> Result<(CudaSlice<half::bf16>, CudaSlice<f32>)> {
        let (b, h, t, hd) = dims;
        let mut workspace = workspace(dev, false, dims, window, false)?;
        // SAFETY: written in full by the forward pass before anything reads them.
        let mut o = unsafe { dev.alloc::<half::bf16>(b * h * t * hd)? };
        let mut stats = unsafe { dev.alloc::<f32>(b * h * t)? };
        let cuda_stream = dev.cuda_stream();
        let s = &cuda_stream;
        let (qp, _q) = q.device_ptr(s);
        let (kp, _k) = k.device_ptr(s);
        let (vp, _v) = v.device_ptr(s);
        let (op, _o) = o.device_ptr_mut(s);
        let (sp, _s) = stats.device_ptr_mut(s);
        let (wp, _w) = workspace.device_ptr_mut(s);
        // SAFETY: each pointer is a live allocation of the size the graph's layouts describe
        // (q, k, v and o b·h·t·hd bf16, stats b·h·t f32, the workspace as asked), the guards
        // held until the call has queued its work on this stream; the workspace is freed on
        // that stream after it.
        let code = unsafe {
            ffi::ar_sdpa_forward(
                stream(dev),
                b as i64,
                h as i64,
                t as i64,
                hd as i64,
                window as i64,
                ptr(qp),
                ptr(kp),
                ptr(vp),
                ptr(op),
                ptr(sp),
                ptr(wp),
            )
        };
        status(code, "forward")?;
        drop((_q, _k, _v, _o, _s, _w));
        Ok((o, stats))
    }

    pub(super) fn backward(
        dev: &CudaDevice,
        dims: (usize, usize, usize, usize),
        window: usize,
        stats: &CudaSlice<f32>,
        [q, k, v, o, d_o]: [CudaView<half::bf16>; 5],
        deterministic: bool,
    ) -> Result<CudaSlice<half::bf16>> {
        let (b, h, t, hd) = dims;
        let n = b * h * t * hd;
        let mut workspace = workspace(dev, true, dims, window, deterministic)?;
        // SAFETY: cuDNN writes every element of dq, dk and dv.
        let mut grads = unsafe { dev.alloc::<half::bf16>(3 * n)? };
        let cuda_stream = dev.cuda_stream();
        let s = &cuda_stream;
        let (qp, _q) = q.device_ptr(s);
        let (kp, _k) = k.device_ptr(s);
        let (vp, _v) = v.device_ptr(s);
        let (op, _o) = o.device_ptr(s);
        let (dop, _do) = d_o.device_ptr(s);
        let (sp, _s) = stats.device_ptr(s);
        let (gp, _g) = grads.device_ptr_mut(s);
        let (wp, _w) = workspace.device_ptr_mut(s);
        let part = (n * std::mem::size_of::<half::bf16>()) as u64;
        // SAFETY: as the forward's; dq, dk and dv are the three consecutive n-element parts of
        // `grads`.
        let code = unsafe {
            ffi::ar_sdpa_backward(
                stream(dev),
                b as i64,
                h as i64,
                t as i64,
                hd as i64,
                window as i64,
                deterministic as c_int,
                ptr(qp),
                ptr(kp),
                ptr(vp),
                ptr(op),
                ptr(dop),
                ptr(sp),
                ptr(gp),
                ptr(gp + part),
                ptr(gp + 2 * part),
                ptr(wp),
            )
        };
        status(code, "backward")?;
        drop((_q, _k, _v, _o, _do, _s, _g, _w));
        Ok(grads)
    }
}

#[cfg(not(fused_cudnn))]
fn unbuilt<T>() -> Result<T> {
    candle_core::bail!(
        "this build has no cuDNN attention (cuDNN's headers were not found when it was compiled: scripts/cuda-env.sh installs them)"
    )
}

type Shape = ((usize, usize, usize, usize), usize, bool);

/// Whether cuDNN builds both passes' graphs for q, k, v `[B, H, T, hd]` and `window` (decided
/// once a shape, before the op runs: a graph that failed to build mid-backward would cost the
/// pass). A shape it cannot take goes to the flash kernels after one warning line; one that ran
/// out of memory (the fit may be probing the card) is asked again next time.
pub(crate) fn supports(
    dev: &CudaDevice,
    dims: (usize, usize, usize, usize),
    window: usize,
    deterministic: bool,
) -> bool {
    static SHAPES: Mutex<BTreeMap<Shape, bool>> = Mutex::new(BTreeMap::new());
    let mut shapes = SHAPES.lock().unwrap_or_else(|e| e.into_inner());
    let key = (dims, window.min(dims.2), deterministic);
    if let Some(&ok) = shapes.get(&key) {
        return ok;
    }
    let built = build(dev, key);
    match &built {
        Err(e) if crate::self_check::out_of_memory(&e.to_string()) => return false,
        Err(e) => {
            let (b, h, t, hd) = dims;
            eprintln!(
                "warning: cuDNN's attention cannot take [{b}, {h}, {t}, {hd}] with window {} ({}); the flash kernels take it",
                key.1,
                e.to_string().lines().next().unwrap_or_default()
            );
        }
        Ok(()) => {}
    }
    shapes.insert(key, built.is_ok());
    built.is_ok()
}

#[cfg(fused_cudnn)]
fn build(dev: &CudaDevice, (dims, window, deterministic): Shape) -> Result<()> {
    imp::workspace_size(dev, false, dims, window, false)?;
    imp::workspace_size(dev, true, dims, window, deterministic)?;
    Ok(())
}

#[cfg(not(fused_cudnn))]
fn build(_: &CudaDevice, _: Shape) -> Result<()> {
    unbuilt()
}

/// cuDNN's version (91900 for 9.19.0) and the CUDA runtime's it was built for (13000), its
/// library opened; needs no GPU.
pub(crate) fn loaded_version() -> Result<(usize, usize)> {
    #[cfg(fused_cudnn)]
    return imp::load();
    #[cfg(not(fused_cudnn))]
    unbuilt()
}

/// cuDNN's version, its library opened and its handle made (once; needs a device).
pub(crate) fn version() -> Result<usize> {
    #[cfg(fused_cudnn)]
    return imp::open();
    #[cfg(not(fused_cudnn))]
    unbuilt()
}

/// `o [B, T, H, hd]` and the rows' natural-log sum-exp `[B, H, T]` from `q, k, v`.
pub(crate) fn launch_forward(
    dev: &CudaDevice,
    dims: (usize, usize, usize, usize),
    window: usize,
    views: [CudaView<half::bf16>; 3],
) -> Result<(CudaSlice<half::bf16>, CudaSlice<f32>)> {
    #[cfg(fused_cudnn)]
    return imp::forward(dev, dims, window, views);
    #[cfg(not(fused_cudnn))]
    {
        let _ = (dev, dims, window, views);
        unbuilt()
    }
}

/// dq, dk and dv as the three parts of one allocation, from `[q, k, v, o, dO]` and the forward
/// pass's statistics.
pub(crate) fn launch_backward(
    dev: &CudaDevice,
    dims: (usize, usize, usize, usize),
    window: usize,
    stats: &CudaSlice<f32>,
    views: [CudaView<half::bf16>; 5],
    deterministic: bool,
) -> Result<CudaSlice<half::bf16>> {
    #[cfg(fused_cudnn)]
    return imp::backward(dev, dims, window, stats, views, deterministic);
    #[cfg(not(fused_cudnn))]
    {
        let _ = (dev, dims, window, stats, views, deterministic);
        unbuilt()
    }
}
