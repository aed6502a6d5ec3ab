#!/usr/bin/env bash
# Checks the GPU path on a machine with no GPU: the bundle for a GPU machine builds (candle's
# CUDA backend with CUDA 13.0 from PyPI wheels) and stays under 60 MB; its run.sh refuses a
# machine with no GPU clearly; and the CUDA binary loads with PyTorch's CUDA 13 libraries and the
# bundle's cuRAND fallback (every symbol binds), failing only at the missing device (a stub
# libcuda stands in for the driver, so nothing past cuInit runs). On success it records the hash
# of its inputs in .ci/gpu-bundle.checked.
#
#   bash scripts/check-gpu-bundle.sh              # the check (nvcc builds candle's kernels: ~12 min
#                                                 # on two cores from clean), then the record
#   bash scripts/check-gpu-bundle.sh --unchanged  # exit 0 when the inputs match the record
#
# Why the record: nvcc compiling candle's kernels is a fifth of CI's hour, and its result depends
# only on the files hashed below. CI runs the check when any of them changed since the last
# check that passed, and says that it skipped it otherwise.
#
# Environment: AUTORESEARCH_TWIN_PYTHON (a Python with PyTorch's CUDA 13 wheels; required),
# AUTORESEARCH_BIN (a built harness, to prepare the data with), CUDA_TARGET_DIR (default
# target/runner-tests, where the CPU dependencies are compiled already).
set -euo pipefail
cd "$(dirname "$0")/.."
record=.ci/gpu-bundle.checked

# Everything the CUDA binary and this check are made from, tracked or not, by content.
inputs() {
  git ls-files -z --cached --others --exclude-standard -- \
    Cargo.lock Cargo.toml vendor train prepare crates/fused bench \
    scripts/gpu-bundle.sh scripts/gpu-run.sh scripts/cuda-env.sh scripts/check-gpu-bundle.sh \
    | sort -z | xargs -0 sha256sum | sha256sum | cut -d' ' -f1
}

if [ "${1:-}" = "--unchanged" ]; then
  [ -f "$record" ] && grep -qx "inputs $(inputs)" "$record"
  exit
fi

python=${AUTORESEARCH_TWIN_PYTHON:?set AUTORESEARCH_TWIN_PYTHON to a Python with PyTorch 2.15 (its CUDA 13 libraries load the binary)}
cublas=$("$python" -c 'import sys; print(sys.prefix)' | xargs -I{} find {} -name libcublas.so.13 -print -quit)
if [ -z "$cublas" ]; then
  echo "no libcublas.so.13 under $python's prefix: PyTorch's CUDA 13 wheels are expected there (pip install torch==2.15.0)" >&2
  exit 1
fi
torch_libs=$(dirname "$cublas")

bundle=$(mktemp -d)/bundle
trap 'rm -rf "$(dirname "$bundle")"' EXIT
# A bundle for the checks below, not for a GPU night: 4 MB of data.
if [ -z "${AUTORESEARCH_BIN:-}" ] && [ -x target/debug/autoresearch ]; then
  export AUTORESEARCH_BIN=$PWD/target/debug/autoresearch
fi
BUNDLE_DATA_MB=4 CUDA_TARGET_DIR=${CUDA_TARGET_DIR:-$PWD/target/runner-tests} \
  bash scripts/gpu-bundle.sh "$bundle"

set +e
run_sh=$(bash "$bundle/run.sh" 2>&1); rc=$?
set -e
echo "$run_sh"
if [ "$rc" -ne 2 ] || ! grep -q "nvidia-smi not found" <<<"$run_sh"; then
  echo "run.sh on a machine with no GPU: expected exit 2 and 'nvidia-smi not found', got $rc" >&2
  exit 1
fi

run_libs="$torch_libs:$bundle/lib-fallback:${CUDA_PREFIX:-$HOME/.cache/cuda13-wheels}/cuda/lib/stubs-run"
for bin in train fused-bench; do
  python3 -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' \
    "$bundle/$bin.xz" "$bundle/$bin" && chmod +x "$bundle/$bin"
done
set +e
cuda_run=$(LD_LIBRARY_PATH="$run_libs" AUTORESEARCH_CACHE="$bundle/data" AUTORESEARCH_DEVICE=cuda \
  "$bundle/train" 2>&1)
bench_run=$(LD_LIBRARY_PATH="$run_libs" "$bundle/fused-bench" --device cuda 2>&1)
set -e
echo "$cuda_run" | head -4
echo "$bench_run" | head -4
if ! grep -q "CUDA_ERROR_NO_DEVICE" <<<"$cuda_run" || ! grep -q "CUDA_ERROR_NO_DEVICE" <<<"$bench_run"; then
  echo "the CUDA binaries did not start with PyTorch's CUDA libraries and the bundle's fallbacks" >&2
  exit 1
fi

{
  echo "# scripts/check-gpu-bundle.sh passed for these inputs; CI skips it while they are unchanged."
  echo "inputs $(inputs)"
  echo "checked $(date -u +%Y-%m-%dT%H:%MZ) with $(rustc --version), $(uname -m)"
} > "$record"
echo "GPU bundle checks passed (recorded in $record)"
