#!/usr/bin/env bash
# run.sh of the GPU bundle (made by scripts/gpu-bundle.sh): on a GPU machine with no Rust
# toolchain and no network, checks that the twin agrees with ours on the GPU, then runs both
# sides for the full budget and prints the side-by-side table.
#
#   ./run.sh [check|run|all] [side_by_side.py options...]     # default: all
#   ./run.sh run --side ours; ./run.sh run --side twin        # one side per call (each ~6 min)
#   PYTHON=/path/to/python ./run.sh                            # a Python with CUDA PyTorch
#   CUDA_LIB_DIR=/dir/with/libcublas.so.13 ./run.sh
#   BUDGET=300 (the preset's); results go under $OUT when set (the device tool brings it back),
#   else under results/ here.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
mode=${1:-all}
[ $# -gt 0 ] && shift
fail() { echo "run.sh: $*" >&2; exit 2; }

command -v nvidia-smi >/dev/null || fail "nvidia-smi not found: this bundle runs on a machine with an NVIDIA GPU and its driver"
nvidia-smi -L >/dev/null 2>&1 || fail "nvidia-smi finds no GPU: $(nvidia-smi -L 2>&1 | head -1)"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader

py=${PYTHON:-python3}
"$py" -c 'import torch, numpy; assert torch.cuda.is_available()' 2>/dev/null \
  || fail "$py has no PyTorch that sees the GPU (torch, numpy, CUDA): set PYTHON=/path/to/python"

if [ ! -x "$here/train" ]; then
  "$py" -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' \
    "$here/train.xz" "$here/train.tmp"
  chmod +x "$here/train.tmp" && mv "$here/train.tmp" "$here/train"
fi

# CUDA 13 runtime libraries: CUDA_LIB_DIR, else beside this PyTorch, else anywhere on the machine.
find_lib() {
  local name=$1 dir
  for dir in ${CUDA_LIB_DIR:-} $("$py" -c 'import os, torch; print(os.path.dirname(os.path.dirname(torch.__file__)))'); do
    [ -d "$dir" ] || continue
    local hit
    hit=$(find -L "$dir" -name "$name" -print -quit 2>/dev/null || true)
    [ -n "$hit" ] && { dirname "$hit"; return; }
  done
  local hit
  hit=$(find / -xdev -name "$name" -not -path "$here/*" -print -quit 2>/dev/null || true)
  [ -n "$hit" ] && dirname "$hit"
  return 0
}
libs=""
for name in libcudart.so.13 libcublas.so.13 libcublasLt.so.13; do
  dir=$(find_lib "$name")
  [ -n "$dir" ] || fail "$name not found (CUDA 13 runtime): set CUDA_LIB_DIR to the folder that has it"
  case ":$libs:" in *":$dir:"*) ;; *) libs=${libs:+$libs:}$dir ;; esac
done
curand=$(find_lib libcurand.so.10)
libs=$libs:${curand:-$here/lib-fallback}
export LD_LIBRARY_PATH=$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
echo "CUDA libraries: $libs"
ldd "$here/train" | grep -E "not found" && fail "the train binary still misses libraries (above)"

export AUTORESEARCH_CACHE=$here/data
out=${OUT:-$here/results}/$(date -u +%Y%m%dT%H%M%SZ)
mkdir -p "$out"
sbs=("$py" "$here/side_by_side.py")
if [ "$mode" = check ] || [ "$mode" = all ]; then
  "${sbs[@]}" check --device cuda --train "$here/train" --out "$out/check" "$@"
fi
if [ "$mode" = run ] || [ "$mode" = all ]; then
  "${sbs[@]}" run --device cuda --budget "${BUDGET:-300}" --train "$here/train" --out "$out/run" "$@"
fi
echo "results: $out"
