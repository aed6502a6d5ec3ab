#!/usr/bin/env bash
# The instruction mix of a kernel file's tensor-core loops, as the H100/H200 would run them,
# measured without a GPU: nvcc builds the file for sm_90, cuobjdump shows the machine code
# (SASS), and for each loop that holds HMMA instructions this prints its length, its HMMA count
# and the other instructions an HMMA. A static count: it says what each loop iteration issues,
# not how long it takes.
#   bash scripts/sass-mix.sh crates/fused/kernels/flash_attention.cu [kernel-name-filter]
# First run downloads cuobjdump and nvdisasm (~1 MB of PyPI wheels) next to scripts/cuda-env.sh's
# toolkit.
set -euo pipefail
file=${1:?usage: sass-mix.sh KERNEL.cu [NAME-FILTER]}
filter=${2:-}
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=/dev/null
source "$here/cuda-env.sh" >/dev/null
tools=${CUDA_PREFIX:-$HOME/.cache/cuda13-wheels}/sass-tools
if [ ! -x "$tools/bin/nvdisasm" ]; then
  mkdir -p "$tools/wheels"
  for attempt in 1 2 3; do
    pip download -q --no-deps -d "$tools/wheels" nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm && break
    [ "$attempt" = 3 ] && { echo "sass-mix.sh: could not download cuobjdump/nvdisasm from PyPI" >&2; exit 1; }
    sleep 5
  done
  for w in "$tools"/wheels/*.whl; do python3 -m zipfile -e "$w" "$tools/unpacked"; done
  mkdir -p "$tools/bin"
  for b in cuobjdump nvdisasm; do
    src=$(find "$tools/unpacked" -name "$b" -type f | head -1)
    chmod +x "$src" && ln -sfn "$src" "$tools/bin/$b"
  done
fi
export PATH=$tools/bin:$PATH
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
nvcc -arch=sm_90 -std=c++17 -O3 -cubin -I "$(dirname "$file")" -o "$work/k.cubin" "$file"
cuobjdump -sass "$work/k.cubin" > "$work/k.sass"
python3 - "$work/k.sass" "$filter" <<'PY'
import collections, re, sys
text, name_filter = open(sys.argv[1]).read(), sys.argv[2]
for part in text.split("Function : ")[1:]:
    name = part.split("\n", 1)[0].strip()
    if name_filter not in name:
        continue
    code = [(int(a, 16), i.strip()) for a, i in re.findall(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", part)]
    # A loop: a branch back to an earlier address; count the ones that hold tensor-core products.
    for at, ins in code:
        back = re.search(r"BRA (0x[0-9a-f]+)", ins)
        if not back or int(back.group(1), 16) >= at:
            continue
        body = [i for a, i in code if int(back.group(1), 16) <= a <= at]
        ops = collections.Counter(re.sub(r"^@!?U?P[0-9T] ", "", i).split()[0].split(".")[0] for i in body)
        hmma = ops["HMMA"]
        if hmma:
            other = len(body) - hmma - ops["NOP"]
            top = ", ".join(f"{k} {v}" for k, v in ops.most_common(12))
            print(f"{name}: loop of {len(body)} instructions, {hmma} HMMA, {other / hmma:.2f} others an HMMA, "
                  f"{ops['LDSM'] / hmma:.3f} LDSM an HMMA\n    {top}")
PY
