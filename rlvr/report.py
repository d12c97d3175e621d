"""Plots of a training run, or of a multirun's jobs side by side: `python -m rlvr.report DIR [--out DIR]`.

For one run, reads DIR/metrics.csv (several rows may share a step: validation writes its own) and
draws, over GRPO steps: each reward signal, training and validation accuracy, response length, the
KL to the reference, and validation accuracy per benchmark; it prints the first and last value of
the main metrics. For a Hydra multirun folder (`python -m rlvr.train -m reward.beta=0,0.5`), it
prints one row per job (the overrides that differ between jobs, and each job's final metrics) and
draws each metric with one curve per job. PNGs go to DIR/plots/ unless --out says otherwise.
"""

from __future__ import annotations

import argparse
import csv
import math
from pathlib import Path

import yaml

import matplotlib

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt  # noqa: E402

Series = dict[str, list[tuple[int, float]]]  # metric -> [(step, value)] in step order

PLOTS = {  # file -> (title, y label, metrics drawn; a trailing * matches any benchmark)
    "reward.png": ("Reward signals", "mean per response",
                   ["reward/verify", "reward/format", "reward/reflect", "reward/total"]),
    "accuracy.png": ("Accuracy (verify = 1)", "accuracy", ["reward/accuracy", "val/*/accuracy"]),
    "response_length.png": ("Response length", "tokens", ["response_length/mean", "response_length/max"]),
    "kl.png": ("KL to the reference (low-variance k3)", "KL", ["train/kl"]),
    "validation.png": ("Validation per benchmark", "mean", ["val/*/accuracy", "val/*/format", "val/*/reflect"]),
}
SUMMARY = ["reward/accuracy", "reward/total", "reward/verify", "reward/format", "reward/reflect",
           "response_length/mean", "train/kl", "val/*/accuracy"]


def read_metrics(run_dir: str | Path) -> Series:
    """Every numeric column of metrics.csv as (step, value) pairs; blank cells are skipped."""
    path = Path(run_dir) / "metrics.csv"
    if not path.is_file():
        raise FileNotFoundError(f"no metrics.csv in {run_dir} (is it a training run's output_dir?)")
    series: Series = {}
    with path.open(newline="") as f:
        for row in csv.DictReader(f):
            if not row.get("step"):
                continue
            step = int(row["step"])
            for key, cell in row.items():
                if key in ("step", "epoch") or cell in ("", None):
                    continue
                value = float(cell)
                if math.isfinite(value):
                    series.setdefault(key, []).append((step, value))
    for points in series.values():
        points.sort(key=lambda p: p[0])
    return series


def matching(series: Series, patterns: list[str]) -> list[str]:
    """Metric names in the order of `patterns`; `val/*/accuracy` matches every benchmark."""
    names = []
    for pattern in patterns:
        head, star, tail = pattern.partition("*")
        names += sorted(k for k in series if (k.startswith(head) and k.endswith(tail) if star else k == pattern))
    return names


def draw(series: Series, out_dir: str | Path) -> list[Path]:
    """One PNG per entry of PLOTS that has data; returns the files written."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for file, (title, ylabel, patterns) in PLOTS.items():
        names = matching(series, patterns)
        if not names:
            continue
        fig, ax = plt.subplots(figsize=(7, 4))
        for name in names:
            steps, values = zip(*series[name])
            ax.plot(steps, values, marker="o" if len(steps) < 30 else None, markersize=3, label=name)
        ax.set(title=title, xlabel="GRPO step", ylabel=ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out_dir / file, dpi=110)
        plt.close(fig)
        written.append(out_dir / file)
    return written


def summary(series: Series) -> str:
    lines = [f"{'metric':<32}{'first':>10}{'last':>10}{'steps':>7}"]
    for name in matching(series, SUMMARY):
        points = series[name]
        lines.append(f"{name:<32}{points[0][1]:>10.4g}{points[-1][1]:>10.4g}{len(points):>7}")
    return "\n".join(lines)


# -- a multirun: one row and one curve per job ----------------------------------------------


RUN_KEYS = ("output_dir", "ckpt_path", "steps")  # what the resume command sets itself


def run_summary(run_dir: str | Path, overrides: list[str], total_steps: int) -> str:
    """What a finished (or stopped) run prints: where it is, how far it got, its first and last
    metrics, and the commands that continue, evaluate, export and plot it."""
    run_dir = Path(run_dir)
    series = read_metrics(run_dir)
    done = max((step for points in series.values() for step, _ in points), default=-1) + 1
    kept = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") not in RUN_KEYS]
    target = total_steps if done < total_steps else 2 * total_steps  # stopped early: finish; else: go on
    last = run_dir / "checkpoints" / "last.ckpt"
    evaluate = ["python -m rlvr.evaluate", f"model={last}", *[o for o in kept if o.startswith("gpu=")],
                "benchmarks=[gsm8k]", "limit=50"]
    return "\n".join([
        f"run folder: {run_dir}  ({done} of {total_steps} steps done; the newest state is {last})",
        summary(series),
        "next:",
        "  continue  " + " ".join(["python -m rlvr.train", *kept, f"output_dir={run_dir}", "ckpt_path=last", f"steps={target}"]),
        "  evaluate  " + " ".join(evaluate),
        f"  export    python -m rlvr.export {last} {run_dir / 'hf'}",
        f"  plot      python -m rlvr.report {run_dir}",
    ])


def job_dirs(folder: str | Path) -> list[Path]:
    """The job folders of a Hydra multirun (0/, 1/, ...: each holds metrics.csv), in job order."""
    jobs = [d for d in Path(folder).iterdir() if d.is_dir() and (d / "metrics.csv").is_file()]
    return sorted(jobs, key=lambda d: (not d.name.isdigit(), int(d.name) if d.name.isdigit() else 0, d.name))


def job_labels(jobs: list[Path]) -> list[str]:
    """Each job's command-line overrides (.hydra/overrides.yaml), less those all jobs share."""
    overrides = []
    for job in jobs:
        path = job / ".hydra" / "overrides.yaml"
        overrides.append(list(yaml.safe_load(path.read_text()) or []) if path.is_file() else [])
    shared = set.intersection(*(set(o) for o in overrides)) if len(overrides) > 1 else set()
    return [" ".join(o for o in job if o not in shared) or job_dir.name for job, job_dir in zip(overrides, jobs)]


def compare_table(labels: list[str], runs: list[Series]) -> str:
    """One row per job: its overrides, steps run, and the last value of each summary metric."""
    names = matching({k: v for run in runs for k, v in run.items()}, SUMMARY)
    width = max(len("job"), *(len(label) for label in labels)) + 2
    lines = [f"{'job':<{width}}{'steps':>6}" + "".join(f"{name:>{max(len(name), 8) + 2}}" for name in names)]
    for label, run in zip(labels, runs):
        steps = max((p[-1][0] for p in run.values()), default=-1) + 1
        cells = "".join(f"{run[name][-1][1] if name in run else float('nan'):>{max(len(name), 8) + 2}.4g}"
                        for name in names)
        lines.append(f"{label:<{width}}{steps:>6}{cells}")
    return "\n".join(lines)


def draw_compare(labels: list[str], runs: list[Series], out_dir: str | Path) -> list[Path]:
    """Per entry of PLOTS, its metrics side by side, one curve per job in each."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for file, (title, ylabel, patterns) in PLOTS.items():
        names = matching({k: v for run in runs for k, v in run.items()}, patterns)
        if not names:
            continue
        fig, axes = plt.subplots(1, len(names), figsize=(4.5 * len(names), 4), squeeze=False)
        for ax, name in zip(axes[0], names):
            for label, run in zip(labels, runs):
                if name in run:
                    steps, values = zip(*run[name])
                    ax.plot(steps, values, marker="o" if len(steps) < 30 else None, markersize=3, label=label)
            ax.set(title=name, xlabel="GRPO step", ylabel=ylabel)
            ax.grid(alpha=0.3)
        axes[0][0].legend(fontsize=8)
        fig.suptitle(title)
        fig.tight_layout()
        fig.savefig(out_dir / file, dpi=110)
        plt.close(fig)
        written.append(out_dir / file)
    return written


def main(argv: list[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(prog="python -m rlvr.report", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", help="a training run's output_dir (holds metrics.csv), or a multirun's folder")
    parser.add_argument("--out", help="where the PNGs go (default: RUN_DIR/plots)")
    args = parser.parse_args(argv)
    out = args.out or Path(args.run_dir) / "plots"
    if not (Path(args.run_dir) / "metrics.csv").is_file() and Path(args.run_dir).is_dir() and job_dirs(args.run_dir):
        jobs = job_dirs(args.run_dir)
        labels, runs = job_labels(jobs), [read_metrics(job) for job in jobs]
        written = draw_compare(labels, runs, out)
        print(compare_table(labels, runs))
    else:
        series = read_metrics(args.run_dir)
        written = draw(series, out)
        print(summary(series))
    print("\nwrote " + ", ".join(str(p) for p in written))
    return written


if __name__ == "__main__":
    main()
