#!/usr/bin/env bash
# The cost of the sandbox on a tiny CPU run: `autoresearch train` with and without it,
# alternating, ROUNDS times each. Prints run seconds (spawn to exit, the runner's clock), the
# harness's training seconds and the steps taken in the budget. Run on a quiet machine.
# Usage: scripts/bench-confinement.sh [ROUNDS] [BUDGET_S]
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-4}
budget=${2:-10}
cache=${AUTORESEARCH_BENCH_CACHE:-/tmp/autoresearch-bench-cache}
cargo build -q -p autoresearch
bin=target/debug/autoresearch
[ -f "$cache/manifest.json" ] || "$bin" prepare --source builtin --preset tiny --cache "$cache" >/dev/null
printf 'mode\trun_s\ttraining_s\tsteps\n'
for i in $(seq "$rounds"); do
  for mode in sandbox no-sandbox; do
    flag=(); [ "$mode" = no-sandbox ] && flag=(--no-sandbox)
    out=$("$bin" train --cache "$cache" --budget "$budget" "${flag[@]}" 2>/dev/null)
    run=$(sed -n 's/^outcome: ok (build [0-9.]*s, run \([0-9.]*\)s)/\1/p' <<<"$out")
    training=$(sed -n 's/^training_seconds: *//p' <<<"$out")
    steps=$(sed -n 's/^num_steps: *//p' <<<"$out")
    printf '%s\t%s\t%s\t%s\n' "$mode" "$run" "$training" "$steps"
  done
done
