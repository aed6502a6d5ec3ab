//! Under the `cuda` feature, `kernels/*.cu` become PTX with nvcc (through cudaforge, which
//! candle's own kernels use too), and `cudnn/sdpa.cpp` is compiled with the C++ compiler
//! against cuDNN's and its frontend's headers (`scripts/cuda-env.sh` puts them under
//! `$CUDA_ROOT`; `CUDNN_INCLUDE_DIR` and `CUDNN_FRONTEND_INCLUDE_DIR` name others). Where
//! those headers are missing the crate builds without the cuDNN path and says so. The CPU
//! build needs no CUDA toolkit.
fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rustc-check-cfg=cfg(fused_cudnn)");
    #[cfg(feature = "cuda")]
    {
        println!("cargo::rerun-if-changed=kernels");
        let out = std::path::PathBuf::from(std::env::var("OUT_DIR").unwrap());
        let ptx = cudaforge::KernelBuilder::new()
            .source_dir("kernels")
            // cudaforge hashes the .cu files only: a shared header must be named to count.
            .watch(["kernels/loads.cuh"])
            .arg("-std=c++17")
            .arg("-O3")
            .build_ptx()
            .expect("nvcc compiles crates/fused/kernels (scripts/cuda-env.sh sets up CUDA)");
        ptx.write(out.join("ptx.rs")).unwrap();
        cudnn();
    }
}

#[cfg(feature = "cuda")]
fn cudnn() {
    use std::path::PathBuf;
    println!("cargo::rerun-if-changed=cudnn/sdpa.cpp");
    for var in [
        "CUDA_ROOT",
        "CUDA_HOME",
        "CUDNN_INCLUDE_DIR",
        "CUDNN_FRONTEND_INCLUDE_DIR",
    ] {
        println!("cargo::rerun-if-env-changed={var}");
    }
    let root = std::env::var_os("CUDA_ROOT")
        .or_else(|| std::env::var_os("CUDA_HOME"))
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/local/cuda"));
    let dir =
        |var: &str, default: PathBuf| std::env::var_os(var).map(PathBuf::from).unwrap_or(default);
    let cudnn = dir("CUDNN_INCLUDE_DIR", root.join("cudnn/include"));
    let frontend = dir(
        "CUDNN_FRONTEND_INCLUDE_DIR",
        root.join("cudnn-frontend/include"),
    );
    let cuda = root.join("include");
    let needed = [
        (cudnn.join("cudnn.h"), "CUDNN_INCLUDE_DIR"),
        (
            frontend.join("cudnn_frontend.h"),
            "CUDNN_FRONTEND_INCLUDE_DIR",
        ),
        (cuda.join("cuda_runtime.h"), "CUDA_ROOT"),
    ];
    for (header, var) in &needed {
        println!("cargo::rerun-if-changed={}", header.display());
        if !header.exists() {
            println!(
                "cargo::warning=no {} (set {var}, or source scripts/cuda-env.sh): built without cuDNN's attention; the flash kernels run instead",
                header.display()
            );
            return;
        }
    }
    cc::Build::new()
        .cpp(true)
        .std("c++17")
        .opt_level(2)
        .file("cudnn/sdpa.cpp")
        .include(&frontend)
        .include(&cudnn)
        .include(&cuda)
        // Nothing links against cuDNN: the frontend opens libcudnn.so.9 at run time.
        .define("NV_CUDNN_FRONTEND_USE_DYNAMIC_LOADING", None)
        // The frontend's own headers warn a lot; ours are checked by the compiler's defaults.
        .warnings(false)
        .compile("fused_cudnn");
    println!("cargo::rustc-link-lib=dylib=dl");
    println!("cargo::rustc-cfg=fused_cudnn");
}
