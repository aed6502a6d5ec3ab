#!/usr/bin/env bash
# run.sh of the GPU bundle (made by scripts/gpu-bundle.sh): on a GPU machine with no Rust
# toolchain and no network, checks that the twin agrees with ours on the GPU, then runs both
# sides for the full budget and prints the side-by-side tables. `kernels` times our fused kernels
# against the plain path (fused-bench; seconds) and says whether they passed their self-check.
# `profile` runs ours (`--side twin`: the twin) under Nsight Compute for one training step
# (STEP=12, past the warm-up and the timed steps: the train file's Stopwatch starts and stops
# the profiler around it, then the run ends; one metric, so no replay) and prints where that
# step's GPU time goes, per kernel (~1 min; needs `ncu`, which Firecracker machines have).
# KERNELS=REGEX limits it to the kernels whose names match and adds what bounds each (tensor
# pipe, shared-memory pipe, issue slots, DRAM, resident warps: % of peak; ncu replays each such
# kernel, so keep REGEX narrow, e.g. KERNELS='flash' ./run.sh profile).
# `harness` runs ours once as `autoresearch run` would, through the harness: its sandbox
# (Landlock, seccomp, caps on tasks and memory) around the train binary, the harness's own clock
# and its scoring of the model, for HARNESS_BUDGET seconds (default 30); its summary and log go to
# harness.txt and harness.log. It needs git (the harness guards a checkout's tracked files; here an
# empty one). HARNESS_ARGS: more `autoresearch train` options (`--sandbox-allow DIR`).
# `acceptance` is the GPU acceptance in one call of at most LIMIT seconds (default 530): the
# check (warm-up steps only), ours and then the twin for BUDGET (default 120) seconds each, the
# side-by-side table, then our `profile`, `harness`, `kernels` and the twin's `profile` with the
# time left; each stage runs under what is left of LIMIT, is skipped when too little is, and its
# outcome goes to acceptance.txt.
#
#   ./run.sh [kernels|check|run|all|profile|harness|acceptance] [side_by_side.py options...]   # default: all
#   ./run.sh run --side ours; ./run.sh run --side twin        # one side per call (each ~6 min)
#   PYTHON=/path/to/python ./run.sh                            # a Python with CUDA PyTorch
#   CUDA_LIB_DIR=/dir/with/libcublas.so.13 ./run.sh
# BUDGET=300 (the preset's). Results go to $OUT/{kernels.txt,check,run} when OUT is set (the device tool
# brings $OUT back), else to results/{check,run} here; sides run by separate calls merge with
# `python side_by_side.py table --from DIR1 --from DIR2`.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
mode=${1:-all}
[ $# -gt 0 ] && shift
fail() { echo "run.sh: $*" >&2; exit 2; }
case $mode in
  kernels | check | run | all | profile | harness | acceptance) ;;
  *) fail "usage: ./run.sh [kernels|check|run|all|profile|harness|acceptance] [side_by_side.py options...], not \`$mode\`" ;;
esac
ours=yes
if [ "$mode" = run ] || [ "$mode" = profile ]; then
  case " $* " in *" --side twin "* | *" --side=twin "*) ours=no ;; esac
fi

# REHEARSAL=cpu (scripts/check-gpu-bundle.sh, on a machine with no GPU): the same stages on the
# CPU, without the GPU's checks, on the data in DATA (a tiny preset), with the CUDA libraries the
# caller puts on LD_LIBRARY_PATH and an `ncu` stand-in on PATH.
device=cuda
[ "${REHEARSAL:-}" = cpu ] && device=cpu
py=${PYTHON:-python3}
if [ "$device" = cuda ]; then
  command -v nvidia-smi >/dev/null || fail "nvidia-smi not found: this bundle runs on a machine with an NVIDIA GPU and its driver"
  gpu=$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | head -1) \
    || fail "nvidia-smi finds no GPU: $gpu"
  echo "GPU: $gpu"
  "$py" -c 'import torch, numpy; assert torch.cuda.is_available()' 2>/dev/null \
    || fail "$py has no PyTorch that sees the GPU (torch, numpy, CUDA): set PYTHON=/path/to/python"
fi

train=$here/train
if [ "$ours" = yes ]; then
  for bin in train fused-bench autoresearch; do
    if [ ! -x "$here/$bin" ]; then
      "$py" -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' \
        "$here/$bin.xz" "$here/$bin.tmp"
      chmod +x "$here/$bin.tmp" && mv "$here/$bin.tmp" "$here/$bin"
    fi
  done
fi
libs=${LD_LIBRARY_PATH:-}
if [ "$ours" = yes ] && [ "$device" = cuda ]; then
  driver=$(echo "$gpu" | awk -F', ' '{print $2}')
  [ "${driver%%.*}" -ge 580 ] 2>/dev/null \
    || fail "driver $driver: ours is built with CUDA 13.0 and needs driver >= 580 (\`./run.sh run --side twin\` runs the twin alone)"
  # CUDA 13 runtime libraries: CUDA_LIB_DIR, else beside this PyTorch, else anywhere on the
  # machine. Only ours gets them (through train.sh): the twin keeps its PyTorch's own.
  site=$("$py" -c 'import os, torch; print(os.path.dirname(os.path.dirname(torch.__file__)))')
  find_lib() {
    local dir hit
    for dir in ${CUDA_LIB_DIR:-} "$site"; do
      [ -d "$dir" ] || continue
      hit=$(find -L "$dir" -name "$1" -print -quit 2>/dev/null || true)
      [ -n "$hit" ] && { dirname "$hit"; return; }
    done
    hit=$(find / -xdev -name "$1" -not -path "$here/*" -print -quit 2>/dev/null || true)
    [ -z "$hit" ] || dirname "$hit"
  }
  libs=""
  for name in libcudart.so.13 libcublas.so.13 libcublasLt.so.13; do
    dir=$(find_lib "$name")
    [ -n "$dir" ] || fail "$name not found (CUDA 13 runtime): set CUDA_LIB_DIR to the folder that has it, or \`./run.sh run --side twin\`"
    case ":$libs:" in *":$dir:"*) ;; *) libs=${libs:+$libs:}$dir ;; esac
  done
  curand=$(find_lib libcurand.so.10)
  libs=$libs:${curand:-$here/lib-fallback}
  # cuDNN 9 for its fused attention, opened at run time: without it our flash kernels run.
  cudnn=$(find_lib libcudnn.so.9)
  if [ -n "$cudnn" ]; then
    case ":$libs:" in *":$cudnn:"*) ;; *) libs=$libs:$cudnn ;; esac
  else
    echo "libcudnn.so.9 not found: ours runs attention by its flash kernels (CUDA_LIB_DIR names a folder with it)"
  fi
  echo "CUDA libraries for ours: $libs"
  LD_LIBRARY_PATH=$libs "$here/fused-bench" --cudnn-version || true
  if LD_LIBRARY_PATH=$libs ldd "$here/train" "$here/fused-bench" | grep "not found"; then
    fail "the train binary or fused-bench still misses the libraries above"
  fi
  printf '#!/bin/sh\nLD_LIBRARY_PATH=%s exec %s "$@"\n' "'$libs'" "'$here/train'" > "$here/train.sh"
  chmod +x "$here/train.sh"
  train=$here/train.sh
fi

if [ "$mode" = acceptance ]; then
  limit=${LIMIT:-530} self=$here/$(basename "$0")
  export BUDGET=${BUDGET:-120}
  out=${OUT:-$here/results}
  mkdir -p "$out"
  # stage NAME SECONDS-NEEDED COMMAND...: runs COMMAND under what is left of the limit.
  stage() {
    local name=$1 need=$2 left=$((limit - SECONDS)) began=$SECONDS code=0
    shift 2
    if [ "$left" -lt "$need" ]; then
      echo "acceptance: $name skipped: ${left}s left of ${limit}s, it needs ${need}s" | tee -a "$out/acceptance.txt"
      return
    fi
    timeout -k 5 "$left" "$@" || code=$?
    echo "acceptance: $name $([ $code = 0 ] && echo passed || echo "failed (exit $code; 124: out of time)") in $((SECONDS - began))s" \
      | tee -a "$out/acceptance.txt"
  }
  : > "$out/acceptance.txt"
  rm -f "$out"/run/*.figures.json  # an earlier call's figures must not fill in a failed side's
  stage check 90 "$self" check --warmup-only "$@"
  stage ours $((BUDGET + 40)) "$self" run --side ours "$@"
  stage twin $((BUDGET + 80)) "$self" run --side twin "$@"
  # What the issue asks for first after the runs: one of our steps profiled.
  stage profile 75 "$self" profile
  stage harness 120 "$self" harness
  stage kernels 45 "$self" kernels
  stage profile-twin 100 "$self" profile --side twin  # torch.compile's minute comes first
  # Last, where the device tool's tail of the output keeps them: the table and the stages.
  [ -d "$out/run" ] && { "$py" "$here/side_by_side.py" table --from "$out/run" || true; }
  cat "$out/acceptance.txt"
  exit 0
fi

export AUTORESEARCH_CACHE=${DATA:-$here/data}
out=${OUT:-$here/results}
mkdir -p "$out"
sbs=("$py" "$here/side_by_side.py")
if [ "$mode" = kernels ] || [ "$mode" = all ]; then
  # A failing kernel bench is a finding, not a reason to skip the runs below.
  # shellcheck disable=SC2086 # KERNEL_ARGS: fused-bench's own flags (the rehearsal's small shapes)
  LD_LIBRARY_PATH=$libs "$here/fused-bench" --device "$device" ${KERNEL_ARGS:-} 2>&1 | tee "$out/kernels.txt" \
    || echo "run.sh: fused-bench failed (above); going on" >&2
fi
if [ "$mode" = check ] || [ "$mode" = all ]; then
  "${sbs[@]}" check --device "$device" --train "$train" --out "$out/check" "$@"
fi
if [ "$mode" = run ] || [ "$mode" = all ]; then
  "${sbs[@]}" run --device "$device" --budget "${BUDGET:-300}" --train "$train" --out "$out/run" "$@"
fi
if [ "$mode" = harness ]; then
  command -v git >/dev/null || fail "git not found: the harness guards a checkout's tracked files"
  [ -f "$here/train.rs" ] || fail "no train.rs in $here: rebuild the bundle (scripts/gpu-bundle.sh)"
  repo=$out/harness-repo
  rm -rf "$repo" && mkdir -p "$repo/train/src"
  cp "$here/train.rs" "$repo/train/src/main.rs" && : > "$repo/Cargo.toml"
  git -C "$repo" init -q && git -C "$repo" add -A
  # The sandbox reads the CUDA libraries through LD_LIBRARY_PATH (its rules name those folders).
  code=0
  # shellcheck disable=SC2086 # HARNESS_ARGS: words, as options
  (cd "$repo" && LD_LIBRARY_PATH=$libs "$here/autoresearch" train --device "$device" \
    --budget "${HARNESS_BUDGET:-30}" --cache "$AUTORESEARCH_CACHE" --prebuilt "$here/train" \
    ${HARNESS_ARGS:-}) 2>&1 \
    | tee "$out/harness.txt" || code=$?
  cp "$repo"/runs/train/logs/*.log "$out/harness.log" 2>/dev/null || true
  [ "$code" = 0 ] || fail "the run through the harness ended in exit $code (harness.txt, harness.log)"
fi
if [ "$mode" = profile ]; then
  command -v ncu >/dev/null || fail "ncu (Nsight Compute) not found: profile needs it"
  side=ours target=("$train")
  [ "$ours" = no ] && side=twin target=("$py" "$here/torch_twin.py")
  metrics=gpu__time_duration.sum name=$side filter=()
  if [ -n "${KERNELS:-}" ]; then
    metrics=$metrics,sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active
    metrics=$metrics,l1tex__data_pipe_lsu_wavefronts_mem_shared.avg.pct_of_peak_sustained_elapsed
    metrics=$metrics,smsp__issue_active.avg.pct_of_peak_sustained_active
    metrics=$metrics,dram__throughput.avg.pct_of_peak_sustained_elapsed
    metrics=$metrics,sm__warps_active.avg.pct_of_peak_sustained_active
    name=$side-limits filter=(--kernel-name "regex:$KERNELS")
  fi
  AUTORESEARCH_DEVICE=$device AUTORESEARCH_TIME_BUDGET=60 AUTORESEARCH_PROFILE_STEP=${STEP:-12} \
    ncu --clock-control none --print-units base --metrics "$metrics" "${filter[@]}" \
    --profile-from-start off --csv --page raw \
    "${target[@]}" > "$out/ncu-$name.csv" 2> "$out/ncu-$name.err" \
    || echo "run.sh: ncu exited $? (see $out/ncu-$name.err)" >&2
  "$py" "$here/side_by_side.py" kernels "$out/ncu-$name.csv" | tee "$out/profile-$name.txt"
fi
echo "results: $out"
