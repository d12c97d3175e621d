"""benchmarks/gpu_check.sh cannot report success for a run that failed: a missing SHARED stops it
before any step, and a step that fails makes it exit non-zero (its CPU dry run, one step)."""

import os
import stat
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"


def check(tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "benchmarks/gpu_check.sh"], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "GPU_CHECK_ON_CPU": "1", "OUT": str(tmp_path / "out"), **env})


def test_a_missing_shared_folder_stops_the_check_before_any_step(tmp_path):
    done = check(tmp_path, SHARED=str(tmp_path / "nowhere"))
    assert done.returncode != 0
    assert f"SHARED={tmp_path / 'nowhere'} has no tokenizers/qwen2.5" in done.stderr
    assert not (tmp_path / "out" / "summary.txt").exists()


def test_a_failing_step_fails_the_check(tmp_path):
    """The sampler step of the CPU dry run with a `python` that fails on that script (put first on
    PATH: every other command still runs the real interpreter). That the whole dry run passes is
    benchmarks/RESULTS.md's to show: it takes minutes on two cores."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "python"
    fake.write_text(f'#!/bin/sh\ncase "$*" in *sampler.py*) echo "injected failure" >&2; exit 7;; esac\n'
                    f'exec {sys.executable} "$@"\n')
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    failed = check(tmp_path, SHARED=str(SHARED), GPU_CHECK_ONLY="sampler", PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    assert failed.returncode == 1, failed.stdout[-2000:] + failed.stderr[-2000:]
    assert "== sampler: exit 7" in failed.stdout and "FAILED: sampler" in failed.stdout
    assert "injected failure" in (tmp_path / "out" / "sampler.log").read_text()
