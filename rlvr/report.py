"""Plots of a training run: `python -m rlvr.report RUN_DIR [--out DIR]`.

Reads RUN_DIR/metrics.csv (several rows may share a step: validation writes its own) and draws,
over GRPO steps: each reward signal, training and validation accuracy, response length, the KL to
the reference, and validation accuracy per benchmark. Writes PNGs (default: RUN_DIR/plots/) and
prints the last value of the main metrics.
"""

from __future__ import annotations

import argparse
import csv
import math
from pathlib import Path

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


def main(argv: list[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(prog="python -m rlvr.report", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", help="a training run's output_dir (holds metrics.csv)")
    parser.add_argument("--out", help="where the PNGs go (default: RUN_DIR/plots)")
    args = parser.parse_args(argv)
    series = read_metrics(args.run_dir)
    written = draw(series, args.out or Path(args.run_dir) / "plots")
    print(summary(series))
    print("\nwrote " + ", ".join(str(p) for p in written))
    return written


if __name__ == "__main__":
    main()
