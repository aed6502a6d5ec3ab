#!/usr/bin/env bash
# Checks the GPU path on a machine with no GPU: the bundle for a GPU machine builds (candle's
# CUDA backend with CUDA 13.0 from PyPI wheels) and stays under 60 MB; its run.sh refuses a
# machine with no GPU clearly; and the CUDA binary loads with PyTorch's CUDA 13 libraries and the
# bundle's cuRAND fallback (every symbol binds), failing only at the missing device (a stub
# libcuda stands in for the driver, so nothing past cuInit runs); and `run.sh acceptance`, the
# GPU window's one call, goes through every stage on the CPU (REHEARSAL=cpu: tiny data, a few
# seconds a run, an `ncu` stand-in that runs its target as ncu would, the bundle's train binary
# run through the bundle's harness and its sandbox). On success it records the
# hash of its inputs in .ci/gpu-bundle.checked.
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
    Cargo.lock Cargo.toml vendor train prepare crates/fused crates/runner crates/autoresearch bench \
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
  # cuDNN's attention is compiled in (the library it opens by this name at run time).
  if ! grep -q 'libcudnn.so.9' "$bundle/$bin"; then
    echo "$bin was built without cuDNN's attention: its headers are missing (scripts/cuda-env.sh installs them)" >&2
    exit 1
  fi
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
# cuDNN's attention opens PyTorch's libcudnn.so.9 (its symbols through the frontend's dynamic
# loading, no GPU needed for the version), and says what to do where it is missing.
cudnn_libs=$(dirname "$("$python" -c 'import sys; print(sys.prefix)' | xargs -I{} find {} -name libcudnn.so.9 -print -quit)")
with_cudnn=$(LD_LIBRARY_PATH="$run_libs:$cudnn_libs" "$bundle/fused-bench" --cudnn-version 2>&1)
without=$(LD_LIBRARY_PATH="$run_libs" "$bundle/fused-bench" --cudnn-version 2>&1)
echo "$with_cudnn"; echo "$without"
if ! grep -qE '^cuDNN 9\.[0-9]+\.[0-9]+ \(for CUDA 13\.[0-9]+\)$' <<<"$with_cudnn" \
  || ! grep -q "libcudnn.so.9 not found.*put cuDNN 9's lib folder on LD_LIBRARY_PATH" <<<"$without"; then
  echo "fused-bench --cudnn-version: expected cuDNN's version with PyTorch's libcudnn.so.9, and the next step without it" >&2
  exit 1
fi

# The acceptance, rehearsed on the CPU with the bundle's own binaries, twin and scripts.
rehearsal=$(dirname "$bundle")/rehearsal
mkdir -p "$rehearsal/bin"
if [ -n "${AUTORESEARCH_BIN:-}" ]; then harness=("$AUTORESEARCH_BIN"); else harness=(cargo run --locked -q -p autoresearch --); fi
AUTORESEARCH_CACHE="$rehearsal/data" "${harness[@]}" prepare --source builtin --preset tiny --builtin-mb 1 >/dev/null
# Nsight Compute needs a GPU: its stand-in takes run.sh's options, insists on the window being
# the program's own (--profile-from-start off), runs the target, and reports one row.
cat > "$rehearsal/bin/ncu" <<'NCU'
#!/usr/bin/env bash
set -eu
while [ $# -gt 0 ]; do
  case $1 in
    --profile-from-start) [ "$2" = off ] || { echo "ncu stand-in: expected --profile-from-start off" >&2; exit 9; }; window=own; shift 2 ;;
    --metrics) metrics=$2; shift 2 ;;
    --clock-control | --print-units | --page | --kernel-name) shift 2 ;;
    --csv) shift ;;
    -*) echo "ncu stand-in: unknown option $1" >&2; exit 9 ;;
    *) break ;;
  esac
done
[ "${window:-}" = own ] || { echo "ncu stand-in: no --profile-from-start off" >&2; exit 9; }
"$@"
# One row with a column per metric asked for: the time 1000 ns, every other metric 50 %.
IFS=, read -ra names <<<"${metrics:?ncu stand-in: no --metrics}"
unit() { if [ "$1" = gpu__time_duration.sum ]; then echo nsecond; else echo %; fi; }
value() { if [ "$1" = gpu__time_duration.sum ]; then echo 1000; else echo 50; fi; }
row() { local out=$1 m; for m in "${names[@]}"; do out+=",\"$($2 "$m")\""; done; echo "$out"; }
row '"ID","Kernel Name","Grid Size","Metric Name"' echo
row '"","","",""' unit
row '"0","rehearsal (no GPU)","(1, 1, 1)","gpu__time_duration.sum"' value
NCU
chmod +x "$rehearsal/bin/ncu"
set +e
# The harness's sandbox reads libcuda's stub through its link into stubs/.
acceptance=$(REHEARSAL=cpu DATA="$rehearsal/data" OUT="$rehearsal/out" PATH="$rehearsal/bin:$PATH" \
  PYTHON="$python" LD_LIBRARY_PATH="$run_libs" LIMIT=900 BUDGET=5 STEP=12 HARNESS_BUDGET=5 \
  HARNESS_ARGS="--sandbox-allow ${CUDA_PREFIX:-$HOME/.cache/cuda13-wheels}/cuda/lib/stubs" \
  KERNEL_ARGS="--tokens 512 --vocab 512 --heads 2 --seq 128 --iters 1" \
  bash "$bundle/run.sh" acceptance 2>&1)
rc=$?
set -e
echo "$acceptance" | tail -12
stages=$(grep -c '^acceptance: .* passed in' "$rehearsal/out/acceptance.txt" || true)
profiled() { grep -q 'profiled step 12' "$rehearsal/out/ncu-$1.err"; }
if [ "$rc" -ne 0 ] || [ "$stages" -ne 7 ] || ! grep -q '^ours/twin tokens/s' <<<"$acceptance" \
  || ! profiled ours || ! profiled twin || ! grep -q '^outcome: ok' "$rehearsal/out/harness.txt" \
  || ! grep -q '^# sandbox: ' "$rehearsal/out/harness.log"; then
  echo "the acceptance rehearsal on the CPU: expected exit 0, seven stages passed, the side-by-side" >&2
  echo "table, both profiled runs ending after step 12, and the run through the harness sandboxed" >&2
  echo "and ok (got exit $rc, $stages stages)" >&2
  exit 1
fi
# The profile of a few kernels with what bounds them (KERNELS=...): its table has their columns.
limits=$(REHEARSAL=cpu DATA="$rehearsal/data" OUT="$rehearsal/out" PATH="$rehearsal/bin:$PATH" \
  PYTHON="$python" LD_LIBRARY_PATH="$run_libs" STEP=12 KERNELS=flash bash "$bundle/run.sh" profile 2>&1) \
  || { echo "$limits" >&2; echo "run.sh profile with KERNELS= failed on the CPU (above)" >&2; exit 1; }
if ! grep -q 'tensor%.*smem%.*issue%.*dram%.*warps%' <<<"$limits" || ! grep -q ' 50.0  rehearsal' <<<"$limits"; then
  echo "$limits" >&2
  echo "run.sh profile with KERNELS=: expected the limiters' columns in its table (above)" >&2
  exit 1
fi

{
  echo "# scripts/check-gpu-bundle.sh passed for these inputs; CI skips it while they are unchanged."
  echo "inputs $(inputs)"
  echo "checked $(date -u +%Y-%m-%dT%H:%MZ) with $(rustc --version), $(uname -m)"
} > "$record"
echo "GPU bundle checks passed (recorded in $record)"
