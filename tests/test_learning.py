"""The embedded default learns, as a new user runs it: `python -m rlvr.train mode=quick gpu=cpu`
(tiny-arith, shipped in the package; no GPU, no download), full-parameter and with `adapter=lora`
(at the cpu profile's optim.adapter_lr). GRPO has to raise the real reward. That a LoRA run's base
stays bit-identical is tests/test_adapters.py's (on the tiny model, through the same entry point)."""

import csv
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.timeout(660)  # just past the run's own 600 s limit, whose message is clearer
@pytest.mark.parametrize("adapter", ["none", "lora"])  # about a minute alone full-parameter; LoRA is slower
def test_mode_quick_on_cpu_raises_the_reward(tmp_path, adapter):
    began = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "rlvr.train", "mode=quick", "gpu=cpu", f"adapter={adapter}", "seed=0",
                           f"output_dir={tmp_path}"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    seconds = time.perf_counter() - began
    assert done.returncode == 0, done.stderr[-3000:]
    with (tmp_path / "metrics.csv").open() as f:
        rows = [r for r in csv.DictReader(f) if r.get("reward/total")]
    assert len(rows) == 15
    third = len(rows) // 3
    mean = lambda key, part: sum(float(r[key]) for r in part) / len(part)  # noqa: E731
    first, last = rows[:third], rows[-third:]
    assert mean("reward/total", last) >= mean("reward/total", first) + 0.05, \
        [round(float(r["reward/total"]), 3) for r in rows]
    assert mean("reward/reflect", last) > mean("reward/reflect", first)  # its verdicts come to agree with verify
    assert seconds < 600
