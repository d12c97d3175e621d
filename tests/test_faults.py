"""Faults injected for real on the tiny CPU profile: SIGKILL at chosen points, corrupt and truncated
checkpoints, a full disk, NaN losses, bad data and settings, and secrets in the environment."""

import csv
import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import MissingConfigException

from rlvr import checkpoints, grpo
from rlvr.checkpoints import CheckpointError
from rlvr.data import DataError
from rlvr.train import CONF_DIR, train
from tiny import TINY

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.timeout(1200)  # each test here chains several training runs (subprocesses)
STEPS = 4
COMMON = [*TINY, "mode=quick", f"steps={STEPS}", "save_every=1", "seed=2"]
COMPARED = ["reward/total", "reward/verify", "train/loss", "train/grad_norm", "train/kl", "response_length/mean"]


def config(*overrides):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def metrics(run_dir: Path) -> list[dict[str, str]]:
    with (run_dir / "metrics.csv").open(newline="") as f:
        return [row for row in csv.DictReader(f) if row.get("train/loss")]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> list[dict[str, str]]:
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    train(config(*COMMON, f"output_dir={run_dir}"))
    return metrics(run_dir)


def assert_same_run(rows, reference):
    assert [r["step"] for r in rows] == [str(s) for s in range(STEPS)]  # every step once: none skipped or repeated
    for a, b in zip(rows, reference, strict=True):
        for key in COMPARED:
            assert float(a[key]) == pytest.approx(float(b[key]), rel=1e-5, abs=1e-7), (a["step"], key)


# -- SIGKILL, then ckpt_path=last ---------------------------------------------------------------


def test_a_run_killed_at_any_point_resumes_exactly(tmp_path, uninterrupted):
    """Killed during step 1's generation, then (resumed) during step 2's update, then (resumed)
    halfway through writing step 3's checkpoint; the last resume finishes the run."""
    for point, step in (("generate", 1), ("update", 2), ("checkpoint", 3)):
        resume = ["ckpt_path=last"] if step > 1 else []
        killed = subprocess.run(
            [sys.executable, "tests/kill_at.py", point, str(step), *COMMON, f"output_dir={tmp_path}", *resume],
            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=300,
        )
        assert killed.returncode == -9, (point, killed.stderr[-3000:])
        last = checkpoints.load(tmp_path / "checkpoints" / "last.ckpt")  # the previous checkpoint is whole
        assert last["global_step"] == step and last["PromptDataModule"]["next_step"] == step, point

    train(config(*COMMON, f"output_dir={tmp_path}", "ckpt_path=last"))
    assert_same_run(metrics(tmp_path), uninterrupted)
    final = checkpoints.load(tmp_path / "checkpoints" / "last.ckpt")
    assert final["PromptDataModule"]["next_step"] == STEPS
    assert final["callbacks"]["RolloutCallback"]["samples_generated"] == STEPS * 4 * 4


# -- damaged checkpoints and a full disk ----------------------------------------------------------


def test_a_truncated_or_corrupt_checkpoint_is_named_with_the_previous_one(tmp_path):
    train(config(*COMMON, "steps=2", f"output_dir={tmp_path}"))
    last = tmp_path / "checkpoints" / "last.ckpt"
    whole = last.read_bytes()
    for damaged in (whole[: len(whole) // 2], b"\0" * 1000, whole[:100] + b"garbage" * 100):
        last.write_bytes(damaged)
        with pytest.raises(CheckpointError, match=f"checkpoint {last} is truncated or corrupt.*ckpt_path=.*step-2.ckpt"):
            train(config(*COMMON, f"output_dir={tmp_path}", "ckpt_path=last"))
    train(config(*COMMON, "steps=3", f"output_dir={tmp_path}", f"ckpt_path={tmp_path / 'checkpoints' / 'step-2.ckpt'}"))
    assert [r["step"] for r in metrics(tmp_path)] == ["0", "1", "2"]


def test_a_full_disk_while_checkpointing_is_a_clear_error_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch, uninterrupted):
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and obj.get("global_step") == 3:
            f.write(b"PK\x03\x04partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    with pytest.raises(CheckpointError, match="No space left on device; the checkpoints already there are intact: .*last.ckpt"):
        train(config(*COMMON, f"output_dir={tmp_path}"))
    assert not list((tmp_path / "checkpoints").glob("*.tmp"))
    assert checkpoints.load(tmp_path / "checkpoints" / "last.ckpt")["global_step"] == 2

    monkeypatch.setattr(torch, "save", real_save)  # space again: resume and finish
    train(config(*COMMON, f"output_dir={tmp_path}", "ckpt_path=last"))
    assert_same_run(metrics(tmp_path), uninterrupted)


# -- numerical faults ------------------------------------------------------------------------------


def nan_at(monkeypatch, steps: set[int]) -> None:
    """A NaN policy loss at the given GRPO steps (one micro-batch per step on this profile)."""
    real = grpo.clipped_policy_loss
    calls = iter(range(10_000))

    def poisoned(*args, **kwargs):
        loss, clipped = real(*args, **kwargs)
        return (loss * float("nan"), clipped) if next(calls) in steps else (loss, clipped)

    monkeypatch.setattr(grpo, "clipped_policy_loss", poisoned)


def policy_and_optimizer(path: Path) -> tuple[dict, dict]:
    state = checkpoints.load(path)
    return state["state_dict"], state["optimizer_states"][0]["state"]


def test_a_nan_loss_skips_that_update_counts_it_and_the_run_goes_on(tmp_path, monkeypatch):
    nan_at(monkeypatch, {1})
    train(config(*COMMON, "steps=3", "keep_checkpoints=-1", "optim.lr=1e-3", f"output_dir={tmp_path}"))
    rows = metrics(tmp_path)
    assert [float(r["train/skipped_updates"]) for r in rows] == [0.0, 1.0, 1.0]
    assert [r["step"] for r in rows] == ["0", "1", "2"]
    folder = tmp_path / "checkpoints"
    before, before_opt = policy_and_optimizer(folder / "step-1.ckpt")
    skipped, skipped_opt = policy_and_optimizer(folder / "step-2.ckpt")
    after, _ = policy_and_optimizer(folder / "step-3.ckpt")
    assert all(torch.equal(before[k], skipped[k]) for k in before)  # the NaN step changed no weight ...
    assert all(torch.equal(before_opt[i]["exp_avg"], skipped_opt[i]["exp_avg"]) for i in before_opt)  # ... nor Adam's moments
    assert any(not torch.equal(skipped[k], after[k]) for k in skipped)  # the next step updates again
    assert all(torch.isfinite(v).all() for v in after.values())


def test_too_many_nan_updates_in_a_row_stop_the_run_with_a_clear_message(tmp_path, monkeypatch):
    nan_at(monkeypatch, {1, 2, 3})
    with pytest.raises(FloatingPointError, match="2 updates in a row had a non-finite loss or gradient.*lower optim.lr"):
        train(config(*COMMON, "grpo.max_consecutive_skips=2", f"output_dir={tmp_path}"))
    state = checkpoints.load(tmp_path / "checkpoints" / "last.ckpt")
    assert state["global_step"] == 2 and state["rlvr"]["skipped_updates"] == 1  # the checkpoint before the stop


# -- bad data and settings, before any training ---------------------------------------------------


def test_a_bad_data_row_stops_the_run_before_training(tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"question": "1+1?", "answer": "#### 2"}\n{"question": "2+2?", "answer": ""}\n')
    with pytest.raises(DataError, match=f"{data} row 2: missing or empty field 'answer'"):
        train(config(*TINY, "data=gsm8k", f"data.source={data}", f"output_dir={tmp_path / 'run'}"))
    assert not (tmp_path / "run" / "checkpoints").exists() and not (tmp_path / "run" / "metrics.csv").exists()


@pytest.mark.parametrize(("overrides", "message"), [
    (["rollout.n=1"], "rollout.n=1: GRPO compares samples within a group"),
    (["batch_size=6", "grpo.mini_batch_size=4"], "batch_size=6 is not divisible by grpo.mini_batch_size=4"),
    (["rollout.max_new_tokens=5000"], "rollout.max_new_tokens=5000 plus the longest prompt .* exceeds the model's context of 4096"),
    (["rollout.temperature=0"], "rollout.temperature=0: training needs sampling"),
    (["grpo.loss_agg=sum"], "grpo.loss_agg='sum'; choose one of"),
])
def test_settings_that_cannot_work_are_rejected_at_start(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        train(config(*TINY, *overrides, f"output_dir={tmp_path}"))
    assert not (tmp_path / "checkpoints").exists()


def test_an_unknown_profile_lists_the_choices():
    with pytest.raises(MissingConfigException, match="h100"):
        config("gpu=tpu")


# -- security ---------------------------------------------------------------------------------------


# No secret in logs, configs or checkpoints, and W&B unreachable: tests/test_tracking.py
# (test_wandb_unreachable_goes_offline_and_logs_rewards_config_and_samples_but_no_secret).


def test_remote_code_is_off_unless_asked_and_checkpoints_load_weights_only(tmp_path):
    for name in ("tiny", "qwen2.5-0.5b", "qwen2.5-math-1.5b"):
        assert config(f"model={name}").model.trust_remote_code is False
    train(config(*TINY, "mode=ultra-quick", f"output_dir={tmp_path}"))
    state = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)  # plain containers and tensors only
    assert isinstance(state["hyper_parameters"]["model"], dict) and "rng" in state["rlvr"]
