#!/usr/bin/env bash
# Builds a directory that a GPU machine with no Rust toolchain and no network can run: the CUDA
# train binary (built here, no GPU needed), a compact prepared data set, the PyTorch twin, the
# harness (to run ours through its sandbox there), and run.sh, which runs both sides on the GPU
# in one go.
#
#   bash scripts/gpu-bundle.sh [DIR]        # default .gpu/bundle (git-ignored); prints its size
#
# Environment: BUNDLE_DATA_MB, BUNDLE_MAX_MB, CUDA_TARGET_DIR (default target/cuda), and
# AUTORESEARCH_BIN (a built harness binary to prepare the data with and to ship, instead of
# building one).
#
# Data: `--source builtin --preset h100` (the h100 preset's shapes, vocabulary and evaluation
# length on generated stories), BUNDLE_DATA_MB of training text (default 40). The binary travels
# xz-compressed (candle's embedded kernels shrink ~9x); run.sh unpacks it with Python's lzma.
# The 60 MB cap (BUNDLE_MAX_MB) is checked at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
out=${1:-.gpu/bundle}
data_mb=${BUNDLE_DATA_MB:-40}
max_mb=${BUNDLE_MAX_MB:-60}
target=${CUDA_TARGET_DIR:-$root/target/cuda}

# Replace only an earlier bundle (or an empty folder), never whatever else DIR names.
if [ -e "$out" ] && [ ! -f "$out/BUILD" ] && [ -n "$(ls -A "$out" 2>/dev/null)" ]; then
  echo "$out exists and is not a bundle: name a new or empty folder" >&2
  exit 1
fi

echo "== CUDA 13.0 toolkit (PyPI wheels) and the CUDA train binary"
# shellcheck disable=SC1091
source scripts/cuda-env.sh
CARGO_TARGET_DIR=$target cargo build --release --locked -p train --features cuda
CARGO_TARGET_DIR=$target cargo build --release --locked -p fused --features cuda --bin fused-bench
# The harness (`run.sh harness`; it needs no CUDA of its own): AUTORESEARCH_BIN where one is built
# (CI's tests built it), else the dev profile's (its dependencies build optimised anyway).
harness=${AUTORESEARCH_BIN:-}
if [ -z "$harness" ]; then
  cargo build --locked -q -p autoresearch
  harness=${CARGO_TARGET_DIR:-$root/target}/debug/autoresearch
fi
rm -rf "$out"
mkdir -p "$out/lib-fallback"
for bin in train fused-bench; do
  strip -o "$out/$bin" "$target/release/$bin"
  xz -6 -T0 "$out/$bin"
done
strip -o "$out/autoresearch" "$harness"
xz -6 -T0 "$out/autoresearch"
cp train/src/main.rs "$out/train.rs"

echo "== data: builtin corpus, h100 preset, ${data_mb} MB"
AUTORESEARCH_CACHE="$out/data" "$harness" prepare \
  --source builtin --preset h100 --builtin-mb "$data_mb"
rm -rf "$out/data/raw"

# cudarc links cuRAND at load time, and candle makes a generator when it opens the device, but
# training never draws from it (weights are drawn on the host). PyTorch's CUDA 13 wheels ship no
# cuRAND: a stub of the symbols the binary names, under the library's symbol version, lets it
# run where the machine has none. Making, seeding and freeing a generator succeed; anything else
# fails with CURAND_STATUS_INITIALIZATION_FAILED. run.sh uses it only when no real
# libcurand.so.10 is found.
symbols=$(objdump -T "$target/release/train" | awk '/\(libcurand\.so\.10\)/ {print $NF}' | sort -u)
if [ -z "$symbols" ]; then
  echo "found no cuRAND symbols in the train binary (objdump -T): the stub would be empty" >&2
  exit 1
fi
{
  echo 'static int generator;'
  echo "$symbols" | while read -r sym; do
    case $sym in
      curandCreateGenerator) echo "int $sym(void **g, int kind) { *g = &generator; return 0; }" ;;
      curandDestroyGenerator | curandSetStream | curandSetPseudoRandomGeneratorSeed) echo "int $sym(void) { return 0; }" ;;
      *) echo "int $sym(void) { return 203; }" ;;
    esac
  done
} > "$out/lib-fallback/curand_stub.c"
echo 'libcurand.so.10 { global: *; };' > "$out/lib-fallback/curand.map"
gcc -shared -fPIC -w -Wl,-soname,libcurand.so.10 -Wl,--version-script="$out/lib-fallback/curand.map" \
  -o "$out/lib-fallback/libcurand.so.10" "$out/lib-fallback/curand_stub.c"
rm "$out/lib-fallback/curand_stub.c" "$out/lib-fallback/curand.map"

cp bench/torch_twin.py bench/side_by_side.py "$out/"
cp scripts/gpu-run.sh "$out/run.sh"
chmod +x "$out/run.sh"
{
  echo "commit $(git rev-parse HEAD)$(git diff --quiet HEAD -- train prepare crates/fused vendor bench scripts Cargo.lock || echo ' (with uncommitted changes)')"
  echo "built $(date -u +%Y-%m-%dT%H:%MZ) on $(uname -m), CUDA_COMPUTE_CAP=$CUDA_COMPUTE_CAP"
  echo "needs at run time: libcuda.so.1 (driver >= 580), libcudart.so.13, libcublas.so.13, libcublasLt.so.13"
} > "$out/BUILD"

size_kb=$(du -sk "$out" | cut -f1)
echo "== bundle: $out, $((size_kb / 1024)) MB"
du -sh "$out"/* | sed 's/^/   /'
if [ "$size_kb" -gt $((max_mb * 1024)) ]; then
  echo "the bundle is over ${max_mb} MB: lower BUNDLE_DATA_MB" >&2
  exit 1
fi
echo "next: copy it to the GPU machine and run ./run.sh there (or name $out in the device tool's carry)"
