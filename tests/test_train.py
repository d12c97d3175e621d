"""Through the real config and entry point: compose, train on the tiny CPU profile, resume."""

import csv
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import MissingConfigException
from omegaconf import DictConfig

from rlvr.errors import UserError
from rlvr.train import CONF_DIR, train
from tiny import TINY

ROOT = Path(__file__).resolve().parents[1]
REWARD_COLUMNS = ["reward/verify", "reward/format", "reward/reflect", "reward/total"]


def config(*overrides: str) -> DictConfig:
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def metrics(output_dir: Path) -> list[dict[str, str]]:
    with (output_dir / "metrics.csv").open() as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("mode", ["ultra-quick", "quick", "dry-run", "full"])
@pytest.mark.parametrize("gpu", ["cpu", "l4", "a100", "h100", "a100x8", "h100x8"])
def test_every_mode_and_profile_composes(mode, gpu):
    cfg = config(f"mode={mode}", f"gpu={gpu}")
    assert cfg.trainer.precision in {"32-true", "bf16-mixed", "bf16-true"}
    assert cfg.grpo.micro_batch_size > 0 and cfg.model.name


def test_profiles_pick_their_model_and_the_command_line_wins():
    assert config("gpu=cpu").model.name == "pkg:rlvr/assets/tiny-arith" and config("gpu=cpu").data.kind == "arithmetic"
    assert config("gpu=l4").model.name == "Qwen/Qwen2.5-Math-1.5B" and config("gpu=l4").data.kind == "gsm8k"
    assert config("gpu=l4", "model=qwen2.5-0.5b").model.name == "Qwen/Qwen2.5-0.5B"
    assert config("gpu=h100").model.name == "Qwen/Qwen2.5-Math-1.5B"
    assert config("gpu=l4", "grpo.micro_batch_size=2").grpo.micro_batch_size == 2
    assert config("mode=quick", "steps=3").steps == 3
    assert config("mode=ultra-quick").data.limit == 512


def test_multi_gpu_profiles_set_lightnings_strategy_devices_and_nodes():
    from lightning.pytorch.strategies import ModelParallelStrategy

    from rlvr.distributed import make_strategy, shards_weights

    ddp = config("gpu=a100x8")
    assert (ddp.devices, ddp.num_nodes, ddp.trainer.strategy, ddp.model.name) == (8, 1, "ddp", "Qwen/Qwen2.5-Math-1.5B")
    fsdp = config("gpu=h100x8", "num_nodes=2")
    assert (fsdp.devices, fsdp.num_nodes, fsdp.model.name) == (8, 2, "Qwen/Qwen2.5-Math-7B")
    strategy = make_strategy(fsdp.trainer.strategy, world=16)
    assert isinstance(strategy, ModelParallelStrategy) and shards_weights(strategy) and not shards_weights("ddp")
    assert fsdp.model.gradient_checkpointing and fsdp.batch_size % (fsdp.devices * fsdp.num_nodes) == 0


def test_a_batch_that_cannot_be_split_over_the_processes_is_rejected_at_start(tmp_path):
    with pytest.raises(ValueError, match="batch_size=6 is not divisible by the 4 processes"):
        train(config(*TINY, "devices=4", "batch_size=6", f"output_dir={tmp_path}"))
    with pytest.raises(ValueError, match="devices='auto' must be a positive integer"):
        train(config(*TINY, "devices=auto", f"output_dir={tmp_path}"))
    assert not (tmp_path / "checkpoints").exists()


def test_the_one_shot_experiment_sets_the_papers_run():
    cfg = config("experiment=one_shot_pi1")
    assert cfg.model.name == "Qwen/Qwen2.5-Math-1.5B" and cfg.trainer.precision == "bf16-mixed"
    assert (cfg.data.kind, cfg.data.example, cfg.batch_size, cfg.rollout.n) == ("one_shot", "pi1", 128, 8)
    assert (cfg.optim.lr, cfg.grpo.kl_coef, cfg.grpo.entropy_coef) == (1e-6, 0.001, 0.001)
    assert (cfg.rollout.max_new_tokens, cfg.rollout.temperature) == (3072, 0.6)
    assert list(cfg.validation.benchmarks) == ["math500"]
    assert config("experiment=one_shot_pi1", "data.example=pi13").data.example == "pi13"


def test_unknown_mode_lists_the_choices():
    with pytest.raises(MissingConfigException, match="dry-run"):
        config("mode=fast")


def test_ultra_quick_then_resume_continues_and_matches_an_uninterrupted_run(tmp_path):
    common = ["mode=ultra-quick", *TINY, "seed=3"]
    resumed_dir, straight_dir = tmp_path / "resumed", tmp_path / "straight"

    train(config(*common, f"output_dir={resumed_dir}"))
    assert (resumed_dir / "checkpoints" / "last.ckpt").is_file()
    assert [r["step"] for r in metrics(resumed_dir)] == ["0"]
    assert set(REWARD_COLUMNS) <= set(metrics(resumed_dir)[0])

    train(config(*common, f"output_dir={resumed_dir}", "ckpt_path=last", "steps=3"))
    rows = metrics(resumed_dir)
    assert [r["step"] for r in rows] == ["0", "1", "2"]  # went on at the second step, history kept
    state = torch.load(resumed_dir / "checkpoints" / "last.ckpt", weights_only=False)
    assert state["PromptDataModule"]["next_step"] == 3 and state["global_step"] == 3
    assert state["callbacks"]["RolloutCallback"]["samples_generated"] == 3 * 4 * 4
    assert "optimizer_states" in state and "lr_schedulers" in state

    train(config(*common, f"output_dir={straight_dir}", "steps=3"))
    straight = metrics(straight_dir)
    for a, b in zip(rows, straight):
        for key in REWARD_COLUMNS + ["train/loss", "train/grad_norm", "response_length/mean"]:
            assert float(a[key]) == pytest.approx(float(b[key]), rel=1e-5, abs=1e-7), (a["step"], key)


def test_resume_without_a_checkpoint_names_the_path(tmp_path):
    with pytest.raises(UserError, match=str(tmp_path / "checkpoints" / "last.ckpt")):
        train(config(*TINY, f"output_dir={tmp_path}", "ckpt_path=last"))


def test_the_command_line_entry_point(tmp_path):
    run = [sys.executable, "-m", "rlvr.train", "mode=ultra-quick", *TINY, f"output_dir={tmp_path}"]
    first = subprocess.run(run, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    second = subprocess.run(run + ["ckpt_path=last", "steps=2"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "Restored all states" in second.stdout + second.stderr
    assert "GRPO step" in second.stdout + second.stderr and "continue  python -m rlvr.train" in second.stderr
    assert [r["step"] for r in metrics(tmp_path)] == ["0", "1"]
    assert (tmp_path / ".hydra" / "config.yaml").is_file()
    log_lines = [re.sub(r"^(INFO|WARNING): ", "", line) for line in first.stderr.splitlines()
                 if "GRPO step" not in line and line.strip()]
    assert "Seed set to" in first.stderr and len(log_lines) == len(set(log_lines)), "a log line printed twice"
    assert "Seed set to" in (tmp_path / "train.log").read_text()  # and the run's log file has it
