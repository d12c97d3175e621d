"""Memory over a long run: does resident memory stay flat over hundreds of GRPO steps?

    python benchmarks/soak.py [--steps 500] [--every 50] [--out DIR] [key=value ...]

Runs `python -m rlvr.train gpu=cpu` (the tiny model) as a child process for --steps steps, with a
checkpoint every --every steps, and watches it from outside: every second it reads the trainer's
resident memory and that of its reward workers from /proc, and the step reached from metrics.csv.
Prints one row per --every steps, then the growth of the trainer's memory from the first printed
row to the last, as MiB and as a ratio. Extra key=value arguments go to the trainer.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def rss_mib(pid: int) -> float:
    """Resident set size of one process, from /proc (0 once it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0.0


def children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except FileNotFoundError:
        return []


def steps_done(metrics: Path) -> int:
    """Training rows in metrics.csv (validation rows carry no train/loss)."""
    if not metrics.is_file():
        return 0
    lines = metrics.read_text().splitlines()
    if not lines:
        return 0
    header = lines[0].split(",")
    if "train/loss" not in header:
        return 0
    column = header.index("train/loss")
    return sum(1 for line in lines[1:] if len(line.split(",")) > column and line.split(",")[column])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--every", type=int, default=50)
    parser.add_argument("--out", help="the run's output_dir (default: a temporary folder)")
    args, overrides = parser.parse_known_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="rlvr-soak-"))
    command = [sys.executable, "-m", "rlvr.train", "gpu=cpu", f"steps={args.steps}", f"save_every={args.every}",
               f"output_dir={out}", *overrides]
    print("running:", " ".join(command[1:]), flush=True)
    began = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    log = (out / "soak.log").open("w")
    process = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)

    print(f"{'step':>6}{'trainer MiB':>13}{'workers MiB':>13}{'workers':>9}{'elapsed s':>11}{'s/step':>8}", flush=True)
    rows: list[tuple[int, float]] = []
    next_report, last_time, last_step = args.every, began, 0
    while process.poll() is None:
        time.sleep(1.0)
        step = steps_done(out / "metrics.csv")
        if step >= next_report:
            now = time.perf_counter()
            workers = children(process.pid)
            trainer, pool = rss_mib(process.pid), sum(rss_mib(w) for w in workers)
            rate = (now - last_time) / max(step - last_step, 1)
            print(f"{step:>6}{trainer:>13.1f}{pool:>13.1f}{len(workers):>9}{now - began:>11.0f}{rate:>8.2f}", flush=True)
            rows.append((step, trainer))
            next_report = (step // args.every + 1) * args.every
            last_time, last_step = now, step
    log.close()
    if process.returncode != 0:
        print(f"the run failed (exit {process.returncode}); see {out / 'soak.log'}")
        sys.exit(1)
    print(f"finished {steps_done(out / 'metrics.csv')} steps in {time.perf_counter() - began:.0f} s; output in {out}")
    if len(rows) >= 2:
        (s0, m0), (s1, m1) = rows[0], rows[-1]
        print(f"trainer memory from step {s0} to step {s1}: {m0:.1f} -> {m1:.1f} MiB "
              f"({m1 - m0:+.1f} MiB, ratio {m1 / m0:.3f})")


if __name__ == "__main__":
    main()
