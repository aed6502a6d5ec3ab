//! Under the `cuda` feature, `kernels/*.cu` become PTX with nvcc (through cudaforge, which
//! candle's own kernels use too); the CPU build needs no CUDA toolkit.
fn main() {
    println!("cargo::rerun-if-changed=build.rs");
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
    }
}
