#!/usr/bin/env bash
# Workers benchmark: sessions of `autoresearch run --agent sweep --workers N` on the CPU, from
# the journal: experiments per hour, and the harness's own time per experiment (build, lock
# waits, git and journal: an experiment's wall time less its train process's).
#
#   bash scripts/bench-workers.sh real 1 2        # the tiny train file as it is
#   bash scripts/bench-workers.sh stub 1 2 4 8    # a stub that sleeps through the budget: the harness alone
#
# BUDGET (default 5 s) and ROUNDS (experiments per worker after the baseline, default 4) tune it.
set -euo pipefail
mode=${1:?real or stub}
shift
here=$(cd "$(dirname "$0")/.." && pwd)
bin=${AUTORESEARCH_BIN:-$here/target/release/autoresearch}
budget=${BUDGET:-5}
rounds=${ROUNDS:-4}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
git clone -q "$here" "$work/repo"
cd "$work/repo"
python3 - "$mode" <<'EOF'
import sys
p = "train/src/main.rs"
s = open(p).read()
# A quarter of the tiny batch per step, as the tests use.
s = s.replace("    total_batch_size: 8 * 256,\n    device_batch_size: 8,",
              "    total_batch_size: 2 * 256,\n    device_batch_size: 2,")
if sys.argv[1] == "stub":
    loop = "    while !clock.exhausted() {\n        clock.begin_step();\n"
    assert loop in s
    s = s.replace(loop, "    while !clock.exhausted() {\n        clock.begin_step();\n"
                  "        std::thread::sleep(Duration::from_millis(100));\n"
                  "        clock.end_step();\n    }\n" + loop, 1)
open(p, "w").write(s)
EOF
git commit -qam "bench: $mode"
export AUTORESEARCH_CACHE=$work/cache
export AUTORESEARCH_TARGET_DIR=${AUTORESEARCH_TARGET_DIR:-$here/target/experiments}
"$bin" prepare --source builtin --preset tiny --builtin-mb 1 >/dev/null
printf 'mode\tworkers\texperiments\twall_s\texp_per_hour\tbuild_s\tharness_s\trun_s\n'
for n in "$@"; do
  max=$((1 + rounds * n))
  start=$(date +%s.%N)
  "$bin" run --agent sweep --tag "w$n" --workers "$n" --device cpu --budget "$budget" \
    --keep-rule strict --max-experiments "$max" >"$work/w$n.log" 2>&1 ||
    { cat "$work/w$n.log"; exit 1; }
  end=$(date +%s.%N)
  python3 - "$mode" "$n" "$start" "$end" "runs/w$n/journal.jsonl" <<'EOF'
import json, sys
mode, n, start, end, path = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4]), sys.argv[5]
events = [json.loads(l) for l in open(path)]
begins = {e["hash"]: e for e in events if e["event"] == "begin"}
ends = [e for e in events if e["event"] == "end"]
# After the baseline: from its end to the last end.
base = next(e for e in ends if e["index"] == 0)
rest = [e for e in ends if e["index"] > 0]
span = max(e["finished_unix"] for e in rest) - base["finished_unix"]
build = sum(e["build_seconds"] for e in rest) / len(rest)
run = sum(e["run_seconds"] for e in rest) / len(rest)
wall = sum(e["finished_unix"] - begins[e["hash"]]["started_unix"] for e in rest) / len(rest)
print(f"{mode}\t{n}\t{len(rest)}\t{span}\t{3600 * len(rest) / span:.0f}\t{build:.1f}\t{wall - run:.1f}\t{run:.1f}")
EOF
done
