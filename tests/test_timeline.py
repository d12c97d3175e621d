"""One timeline per run folder (checkpoints, metrics, configs), through the real config and entry point:
last.ckpt is never stale, rewinding to an earlier checkpoint moves the later ones aside, Ctrl-C
finishes the step and saves, and a resume keeps the first run's config."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from rlvr import checkpoints
from rlvr.train import train
from tiny import TINY, compose_config, trained_steps

ROOT = Path(__file__).resolve().parents[1]
COMMON = [*TINY, "mode=quick", "seed=4", "samples.every=null"]
COMPARED = ["reward/total", "train/loss", "train/grad_norm", "train/kl", "train/entropy", "response_length/mean"]


def config(*overrides):
    return compose_config(*COMMON, *overrides)



def steps_in(run_dir: Path) -> list[int]:
    return [int(r["step"]) for r in trained_steps(run_dir)]


def assert_matches(rows, reference, steps):
    by_step = {int(r["step"]): r for r in reference}
    for row in rows:
        if int(row["step"]) in steps:
            for key in COMPARED:
                assert float(row[key]) == pytest.approx(float(by_step[int(row["step"])][key]), rel=1e-5, abs=1e-7), \
                    (row["step"], key)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> list[dict[str, str]]:
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    train(config("steps=6", f"output_dir={run_dir}"))
    return trained_steps(run_dir)


def test_last_holds_the_end_of_a_run_that_is_not_a_multiple_of_save_every(tmp_path, uninterrupted):
    train(config("steps=3", "save_every=2", f"output_dir={tmp_path}"))
    folder = tmp_path / "checkpoints"
    assert checkpoints.steps_done(folder / "last.ckpt") == 3  # not 2, the last save_every boundary
    assert sorted(p.name for p in folder.glob("*.ckpt")) == ["last.ckpt", "step-2.ckpt"]

    train(config("steps=5", "save_every=2", "ckpt_path=last", f"output_dir={tmp_path}"))
    assert steps_in(tmp_path) == [0, 1, 2, 3, 4]  # exactly steps 3 and 4 were trained again
    assert checkpoints.steps_done(folder / "last.ckpt") == 5
    assert_matches(trained_steps(tmp_path), uninterrupted, {0, 1, 2, 3, 4})


def test_rewinding_to_an_earlier_checkpoint_makes_it_the_present(tmp_path, uninterrupted):
    keep_all = ["save_every=1", "keep_checkpoints=-1", f"output_dir={tmp_path}"]
    folder = tmp_path / "checkpoints"
    train(config("steps=4", *keep_all))
    train(config("steps=5", *keep_all, f"ckpt_path={folder / 'step-2.ckpt'}"))

    (aside,) = folder.glob("abandoned-*")  # the abandoned branch, moved, not deleted
    assert sorted(p.name for p in aside.iterdir()) == ["last.ckpt", "step-3.ckpt", "step-4.ckpt"]
    assert checkpoints.steps_done(aside / "last.ckpt") == 4
    assert checkpoints.steps_done(folder / "last.ckpt") == 5

    train(config("steps=6", *keep_all, "ckpt_path=last"))  # continues the new present, not the old branch
    assert steps_in(tmp_path) == [0, 1, 2, 3, 4, 5]  # each step once
    assert not list(folder.glob("last-v*.ckpt"))
    assert sorted(p.name for p in folder.glob("*.ckpt")) == ["last.ckpt"] + [f"step-{i}.ckpt" for i in range(1, 7)]
    assert_matches(trained_steps(tmp_path), uninterrupted, {0, 1, 2, 3, 4, 5})


def test_a_resume_keeps_the_first_runs_config_and_writes_its_own_beside_it(tmp_path):
    train(config("steps=1", f"output_dir={tmp_path}"))
    train(config("steps=2", "ckpt_path=last", f"output_dir={tmp_path}"))
    first = yaml.safe_load((tmp_path / ".hydra" / "config.yaml").read_text())
    resumed = yaml.safe_load((tmp_path / ".hydra" / "resume-1" / "config.yaml").read_text())
    assert (first["steps"], first["ckpt_path"]) == (1, None)
    assert (resumed["steps"], resumed["ckpt_path"]) == (2, "last")
    assert yaml.safe_load((tmp_path / "hparams.yaml").read_text())["steps"] == 1


@pytest.mark.slow
def test_ctrl_c_finishes_the_step_saves_it_and_the_resume_goes_on_from_there(tmp_path, uninterrupted):
    """SIGINT to the whole process group (as a terminal sends it) during step 2's rollout."""
    run = [*COMMON, "steps=6", "save_every=10", "reward.workers=2", f"output_dir={tmp_path}"]  # workers get SIGINT too
    stopped = subprocess.run([sys.executable, "tests/kill_at.py", "interrupt", "2", *run], cwd=ROOT,
                             env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=300,
                             start_new_session=True)
    assert stopped.returncode == 130, stopped.stderr[-3000:]
    assert "Ctrl-C: finishing this GRPO step" in stopped.stderr and "continue with ckpt_path=last" in stopped.stderr
    assert checkpoints.steps_done(tmp_path / "checkpoints" / "last.ckpt") == 3  # step 2 finished, then saved
    assert steps_in(tmp_path) == [0, 1, 2]

    resumed = subprocess.run([sys.executable, "-m", "rlvr.train", *run, "ckpt_path=last"], cwd=ROOT,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert steps_in(tmp_path) == [0, 1, 2, 3, 4, 5]  # nothing repeated, nothing skipped
    assert_matches(trained_steps(tmp_path), uninterrupted, set(range(6)))
    output = resumed.stdout + resumed.stderr
    assert "GRPO step" in output and "Training:" not in output  # the bar survives a resume
