#!/usr/bin/env python3
"""Ours (the candle train binary) against the PyTorch twin: same data, budget, seed and device.

    side_by_side.py check --train PATH [--device cpu|cuda] [--tol 1e-2] [--warmup-only]
        Proves the twin is a twin: both run their warm-up steps (whose schedule does not depend
        on the clock) from the same seed; each step's loss is read back from the printed lines
        and compared. Exit 1 when any step differs by more than --tol (relative). With
        --warmup-only each side is stopped once its warm-up steps are out (no evaluation: a
        minute less on the GPU).
    side_by_side.py run --train PATH [--device cpu|cuda] [--budget S] [--out DIR] [--side S]
        One run of each side (or only --side ours|twin), one after the other, then the tables:
        steps, tokens/s, MFU, peak memory, val_bpb and the ratio ours/twin; and where a step's
        time goes (data, forward, backward, optimizer). Logs and JSON reports go to --out.
    side_by_side.py table --from DIR [--from DIR2]
        The tables again from the figures in the folders (sides run by separate commands).
    side_by_side.py kernels NCU.csv
        Where ours' GPU time goes, per kernel, from Nsight Compute's raw CSV (run.sh profile).

Both read $AUTORESEARCH_CACHE (prepared by `autoresearch prepare`). The twin's Python is this
one (sys.executable) unless --python says otherwise.
"""

import argparse
import collections
import csv
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
STEP = re.compile(r"^step (\d+) .*\| loss: ([0-9.eE+-]+|nan|inf) ")
WARMUP_STEPS = 10


def kill(proc):
    """SIGKILL without Popen's poll(), which could reap a child that just exited and leave
    wait4 below nothing to wait for (the pid stays ours until wait4 reaps it)."""
    os.kill(proc.pid, signal.SIGKILL)


def run_side(name, cmd, env, log_path, timeout, enough=None):
    """Runs one side to the end, or until `enough(lines)` says so after a step line (then its
    exit code is 0); returns (exit code, output, peak RSS MiB, wall seconds)."""
    start = time.time()
    lines, stopped = [], threading.Event()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

        def read():
            for line in proc.stdout:
                lines.append(line)
                log.write(line)
                if line.startswith(("step", "---", "val_bpb", "FAIL")) or "Error" in line:
                    print(f"  [{name}] {line.rstrip()}", flush=True)
                if enough and line.startswith("step") and enough(lines):
                    stopped.set()
                    kill(proc)
                    break

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        # A side that hangs silently is killed too: the clock does not wait for output.
        reader.join(timeout)
        if reader.is_alive():
            kill(proc)
            os.wait4(proc.pid, 0)
            sys.exit(f"{name}: still running after {timeout:.0f}s, killed (log: {log_path})")
        _, status, usage = os.wait4(proc.pid, 0)
    code = 0 if stopped.is_set() else os.waitstatus_to_exitcode(status)
    return code, "".join(lines), usage.ru_maxrss / 1024, time.time() - start


def raw_losses(output):
    """Each step's own loss, recovered from the printed bias-corrected moving average."""
    printed = {}
    for line in output.splitlines():
        m = STEP.match(line)
        if m:
            printed[int(m.group(1))] = float(m.group(2))
    losses, prev = [], 0.0
    for step in range(WARMUP_STEPS + 1):
        if step not in printed:
            break
        k = step + 1
        smooth = printed[step] * (1 - 0.9**k)
        losses.append((smooth - 0.9 * prev) / 0.1)
        prev = smooth
    return losses


def sides(args, budget, out):
    env = dict(os.environ, AUTORESEARCH_DEVICE=args.device, AUTORESEARCH_TIME_BUDGET=str(budget),
               AUTORESEARCH_SEED=str(args.seed))
    env.pop("AUTORESEARCH_PRESET", None)  # the prepared preset decides
    ours_env = dict(env, AUTORESEARCH_REPORT=os.path.join(out, "ours.json"))
    twin_env = dict(env, AUTORESEARCH_REPORT=os.path.join(out, "twin.json"))
    twin_cmd = [args.python, os.path.join(HERE, "torch_twin.py")] + args.twin_arg
    return [("ours", [args.train], ours_env), ("twin", twin_cmd, twin_env)]


def check(args):
    out = args.out or tempfile.mkdtemp(prefix="twin-check-")
    os.makedirs(out, exist_ok=True)
    losses = {}
    warmed_up = lambda lines: len(raw_losses("".join(lines))) > WARMUP_STEPS  # noqa: E731
    for name, cmd, env in sides(args, 0.5, out):
        log = os.path.join(out, f"{name}.log")
        code, output, _, _ = run_side(name, cmd, env, log, args.timeout, warmed_up if args.warmup_only else None)
        if code != 0:
            sys.exit(f"{name} exited {code}: see {out}/{name}.log")
        losses[name] = raw_losses(output)
        if len(losses[name]) < WARMUP_STEPS + 1:
            sys.exit(f"{name}: printed only {len(losses[name])} of the {WARMUP_STEPS + 1} warm-up steps")
    worst = 0.0
    print(f"{'step':>4}  {'ours':>10}  {'twin':>10}  {'rel diff':>9}")
    for step, (a, b) in enumerate(zip(losses["ours"], losses["twin"])):
        rel = abs(a - b) / max(abs(a), 1e-12)
        worst = max(worst, rel)
        print(f"{step:>4}  {a:>10.5f}  {b:>10.5f}  {rel:>9.2e}")
    fell = losses["ours"][-1] < losses["ours"][0]
    print(f"max relative difference {worst:.2e} (tolerance {args.tol:.0e}); ours' loss "
          f"{'fell' if fell else 'did not fall'} {losses['ours'][0]:.4f} -> {losses['ours'][-1]:.4f}")
    if worst > args.tol:
        sys.exit("the twin does not agree with ours: it is no twin")
    if not fell:
        sys.exit("ours did not learn in its warm-up steps: nothing to compare")
    print("the twin agrees with ours")


PHASES = re.compile(r"^time per step \(ms, \d+ timed steps\): (.*)$", re.M)


def figures(report, rss_mb, device, output):
    s = json.load(open(report))
    m = PHASES.search(output)
    phases = {k: float(v) for k, v in (p.rsplit(" ", 1) for p in m.group(1).split(" | "))} if m else {}
    per_step = s["total_tokens_M"] * 1e6 / s["num_steps"]
    counted = max(s["num_steps"] - (WARMUP_STEPS + 1), 0)
    return {
        "steps": s["num_steps"],
        "tokens/s": counted * per_step / s["training_seconds"] if s["training_seconds"] else 0.0,
        "mfu %": s["mfu_percent"],
        "peak MiB": s["peak_vram_mb"] if device == "cuda" else rss_mb,
        "val_bpb": s["val_bpb"],
        "train s": s["training_seconds"],
        "total s": s["total_seconds"],
        "phases": phases,
    }


def run(args):
    out = args.out or tempfile.mkdtemp(prefix="side-by-side-")
    os.makedirs(out, exist_ok=True)
    for name, cmd, env in sides(args, args.budget, out):
        if args.side not in ("both", name):
            continue
        print(f"{name}: {' '.join(cmd)}", flush=True)
        log = os.path.join(out, f"{name}.log")
        code, output, rss, _ = run_side(name, cmd, env, log, args.budget * 3 + args.timeout)
        if code != 0:
            sys.exit(f"{name} exited {code}: see {log}")
        row = figures(os.path.join(out, f"{name}.json"), rss, args.device, output)
        row.update(device=args.device, budget=args.budget, seed=args.seed, date=time.strftime("%Y-%m-%d"),
                   command=" ".join(cmd))
        json.dump(row, open(os.path.join(out, f"{name}.figures.json"), "w"), indent=2)
    table([out])


def table(folders):
    """The tables from the figures in `folders` (the latest of each side wins)."""
    rows, out = {}, ", ".join(folders)
    for folder in folders:
        for name in ("ours", "twin"):
            path = os.path.join(folder, f"{name}.figures.json")
            if os.path.exists(path):
                rows[name] = json.load(open(path))
    if not rows:
        sys.exit(f"no figures in {out}: run `side_by_side.py run --out DIR` first")
    first = next(iter(rows.values()))
    mem = "peak MiB (driver)" if first["device"] == "cuda" else "peak MiB (RSS)"
    keys = ["steps", "tokens/s", "mfu %", "peak MiB", "val_bpb", "train s", "total s"]
    fmt = {"steps": "{:d}", "tokens/s": "{:,.0f}", "mfu %": "{:.1f}", "peak MiB": "{:,.0f}",
           "val_bpb": "{:.4f}", "train s": "{:.1f}", "total s": "{:.1f}"}
    print(f"\ndevice {first['device']}, budget {first['budget']:.0f} s, seed {first['seed']}, "
          f"{first['date']}, logs in {out}\n")
    print("| side | " + " | ".join(mem if k == "peak MiB" else k for k in keys) + " |")
    print("|---" * (len(keys) + 1) + "|")
    for name, row in rows.items():
        print(f"| {name} | " + " | ".join(fmt[k].format(row[k]) for k in keys) + " |")
    phases = ["data", "forward", "backward", "optimizer"]
    print("\n| ms per step | " + " | ".join(phases) + " |")
    print("|---" * (len(phases) + 1) + "|")
    for name, row in rows.items():
        print(f"| {name} | " + " | ".join(f"{row['phases'].get(p, float('nan')):.1f}" for p in phases) + " |")
    if len(rows) == 2 and rows["twin"]["tokens/s"]:
        print(f"\nours/twin tokens/s: {rows['ours']['tokens/s'] / rows['twin']['tokens/s']:.2f}")


# Nsight Compute's limiter metrics (run.sh profile with KERNELS=...), shown by a short name.
LIMITS = {
    "sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active": "tensor%",
    "l1tex__data_pipe_lsu_wavefronts_mem_shared.avg.pct_of_peak_sustained_elapsed": "smem%",
    "smsp__issue_active.avg.pct_of_peak_sustained_active": "issue%",
    "dram__throughput.avg.pct_of_peak_sustained_elapsed": "dram%",
    "sm__warps_active.avg.pct_of_peak_sustained_active": "warps%",
}


def kernels(path):
    """Per-kernel GPU time from Nsight Compute's raw CSV (gpu__time_duration.sum, in ns), and
    the time-weighted mean of each limiter metric the CSV has."""
    rows = list(csv.reader(line for line in open(path) if line.startswith('"')))
    if len(rows) < 3:
        sys.exit(f"{path}: no kernels profiled (see the ncu-*.err beside it)")
    head = rows[0]
    name, took, grid = (head.index(k) for k in ("Kernel Name", "gpu__time_duration.sum", "Grid Size"))
    limits = [(head.index(m), short) for m, short in LIMITS.items() if m in head]
    total, calls = collections.Counter(), collections.Counter()
    weighted = collections.defaultdict(lambda: [0.0] * len(limits))
    for row in rows[2:]:
        key = (row[name][:60], row[grid])
        ns = float(row[took].replace(",", ""))
        total[key] += ns
        calls[key] += 1
        for i, (col, _) in enumerate(limits):
            weighted[key][i] += ns * float(row[col].replace(",", ""))
    whole = sum(total.values())
    print(f"{sum(calls.values())} kernels, {whole / 1e6:.1f} ms of GPU time")
    extra = "".join(f" {short:>7}" for _, short in limits)
    print(f"{'share':>6} {'ms':>8} {'calls':>5} {'us/call':>8}{extra}  kernel (grid)")
    for key, ns in total.most_common(30):
        means = "".join(f" {w / ns:7.1f}" for w in weighted[key]) if ns else ""
        print(f"{ns / whole:6.1%} {ns / 1e6:8.2f} {calls[key]:5d} {ns / calls[key] / 1e3:8.1f}{means}  {key[0]} {key[1]}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("mode", choices=["check", "run", "table", "kernels"])
    ap.add_argument("csv", nargs="?", help="kernels: Nsight Compute's raw CSV (run.sh profile)")
    ap.add_argument("--train", help="the train binary (target/release/train)")
    ap.add_argument("--side", default="both", choices=["both", "ours", "twin"], help="run: which sides")
    ap.add_argument("--python", default=sys.executable, help="a Python with torch for the twin")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--budget", type=float, default=60.0)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--tol", type=float, help="relative (default 1e-4 on cpu, where both sides are f32; 1e-2, bf16's, on cuda)")
    ap.add_argument("--warmup-only", action="store_true", help="check: stop each side after its warm-up steps")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds of start-up and evaluation allowed")
    ap.add_argument("--out", help="where logs and reports go (default: a new temporary directory)")
    ap.add_argument("--twin-arg", action="append", default=[], help="passed on to torch_twin.py")
    ap.add_argument("--from", dest="folders", action="append", default=[], help="table: a folder of figures")
    args = ap.parse_args()
    if args.tol is None:
        args.tol = 1e-4 if args.device == "cpu" else 1e-2
    if args.mode == "kernels":
        return kernels(args.csv)
    if args.mode == "table":
        return table(args.folders or [args.out or "."])
    if (args.mode == "check" or args.side != "twin") and not (args.train and os.path.isfile(args.train)):
        sys.exit(f"{args.train}: no train binary; build it with `cargo build --release -p train`")
    (check if args.mode == "check" else run)(args)


if __name__ == "__main__":
    main()
