"""The GRPO variants through the real config and entry point: dynamic sampling (its logs, an exact resume,
two ranks agreeing), the algorithm group (dapo, gspo) over the cpu profile and over an experiment, and
the overlong and truncation settings checked at start. The math is in tests/test_grpo.py."""

import logging
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ddp_run import DigitsReward
from rlvr import checkpoints
from rlvr import train as train_module
from rlvr.errors import UserError
from rlvr.grpo import GRPOConfig
from rlvr.train import train
from tiny import TINY, compose_config, trained_steps

ROOT = Path(__file__).resolve().parents[1]
STEPS = 3
DYNAMIC = [*TINY, "mode=quick", f"steps={STEPS}", "save_every=1", "seed=2", "grpo.dynamic_sampling=true",
           "samples.every=null"]
COMPARED = ["reward/total", "train/loss", "train/grad_norm", "train/kl", "train/tied_groups", "response_length/mean",
            "rollout/filtered_groups", "rollout/sampling_rounds", "rollout/prompts_consumed"]
FILLED = "tied groups, which carry no policy gradient, fill the batch"


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def train_tie_even(*overrides: str) -> str:
    """Train with a reward that ties the groups of even answers; returns what the rollout callback logged."""
    lines, logger = Lines(), logging.getLogger("callbacks.rollout")
    logger.addHandler(lines)
    logger.setLevel(logging.INFO)
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(train_module, "reward_scorer", lambda cfg: DigitsReward(tie_even=True))
            train(compose_config(*overrides))
    finally:
        logger.removeHandler(lines)
    return "\n".join(lines.lines)


@pytest.fixture(scope="module")
def dynamic(tmp_path_factory) -> tuple[Path, list[dict[str, str]], str]:
    """grpo.dynamic_sampling on the tiny model, with a reward that ties the groups of even answers."""
    run_dir = tmp_path_factory.mktemp("dynamic")
    log = train_tie_even(*DYNAMIC, f"output_dir={run_dir}")
    return run_dir, trained_steps(run_dir), log


def test_dynamic_sampling_drops_tied_groups_refills_and_logs_it(dynamic):
    run_dir, rows, log = dynamic
    assert [r["step"] for r in rows] == [str(s) for s in range(STEPS)]  # the step count is unchanged
    filtered = [float(r["rollout/filtered_groups"]) for r in rows]
    consumed = [float(r["rollout/prompts_consumed"]) for r in rows]
    assert sum(filtered) > 0 and all(c > 4 for c in consumed)  # tied groups were drawn, dropped and replaced
    assert all(1 <= float(r["rollout/sampling_rounds"]) <= 3 for r in rows)
    for r in rows:  # the trained batch holds no tied group, or the log says why
        assert float(r["train/tied_groups"]) == 0 or f"GRPO step {r['step']}: " in log, r["step"]
    state = checkpoints.load(run_dir / "checkpoints" / "last.ckpt")
    assert state["PromptDataModule"]["refill_cursor"] == sum(consumed) - STEPS * 4  # what the refills drew


def test_dynamic_sampling_killed_after_step_1_resumes_exactly(tmp_path, dynamic):
    """SIGKILL during step 2's update (after its refill), through the command line; the resume redoes
    step 2 from the checkpoint of step 1 and its refill cursor."""
    killed = subprocess.run(
        [sys.executable, "tests/kill_at.py", "update", "2", "--tie-even-reward", *DYNAMIC, f"output_dir={tmp_path}"],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=300,
    )
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert checkpoints.load(tmp_path / "checkpoints" / "last.ckpt")["global_step"] == 2
    train_tie_even(*DYNAMIC, f"output_dir={tmp_path}", "ckpt_path=last")
    _, reference, _ = dynamic
    rows = trained_steps(tmp_path)
    assert [r["step"] for r in rows] == [str(s) for s in range(STEPS)]
    for a, b in zip(rows, reference, strict=True):
        for key in COMPARED:
            assert float(a[key]) == pytest.approx(float(b[key]), rel=1e-5, abs=1e-7), (a["step"], key)


@pytest.mark.slow
def test_two_ranks_agree_on_the_refill(tmp_path):
    """Two DDP processes: each rank's share is refilled, by rounds of the size the neediest rank asks for,
    so both ranks keep the same refill cursor and train as many groups each."""
    from test_distributed import records, run

    folder = tmp_path / "ddp"
    run(folder, "devices=2", "steps=2", "grpo.dynamic_sampling=true", "data=arithmetic", env={"DDP_RUN_TIE_EVEN": "1"})
    ranks = [[r for r in records(folder, rank) if "step" in r] for rank in (0, 1)]
    assert [r["step"] for r in ranks[0]] == [r["step"] for r in ranks[1]] == [0, 1]
    for mine, theirs in zip(*ranks, strict=True):
        assert mine["refill_cursor"] == theirs["refill_cursor"] > 0
        assert len(mine["rewards"]) == len(theirs["rewards"]) == 2 * 4  # each rank: 2 of the 4 groups, 4 samples
    assert ranks[0][0]["refill_cursor"] < ranks[0][1]["refill_cursor"]


# -- the algorithm group ----------------------------------------------------------------------------


@pytest.mark.parametrize("base", [["gpu=cpu"], ["experiment=one_shot_pi1", "gpu=cpu"], ["experiment=one_shot_pi1"]])
def test_algorithms_compose_with_a_profile_and_an_experiment(base):
    grpo = compose_config(*base)
    dapo = compose_config(*base, "algorithm=dapo")
    gspo = compose_config(*base, "algorithm=gspo")
    assert grpo.grpo.ratio_level == "token" and not grpo.grpo.dynamic_sampling and grpo.reward.overlong_buffer is None
    assert (dapo.grpo.clip_low, dapo.grpo.clip_high, dapo.grpo.kl_coef, dapo.grpo.loss_agg) == (0.2, 0.28, 0.0, "token-mean")
    assert dapo.grpo.dynamic_sampling and dapo.reward.overlong_buffer == dapo.rollout.max_new_tokens // 5
    assert (gspo.grpo.ratio_level, gspo.grpo.clip_low, gspo.grpo.clip_high) == ("sequence", 3e-4, 4e-4)
    for cfg, updates in ((dapo, 16), (gspo, 4)):  # several updates a step, so that the ratio moves from 1
        assert GRPOConfig(**cfg.grpo).updates_per_step(cfg.batch_size) == updates
        assert cfg.data.kind == grpo.data.kind and cfg.rollout.n == grpo.rollout.n  # the rest is the base's
    if "experiment=one_shot_pi1" in base:
        assert dapo.data.example == "pi1" and grpo.grpo.kl_coef == 0.001  # the algorithm wins over the experiment


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_dapo_on_the_cpu_profile_trains_three_steps_without_tied_groups_or_says_why(tmp_path, caplog):
    """The embedded default (tiny-arith on arithmetic), at half its batch: 8 updates a step."""
    caplog.set_level(logging.INFO, logger="callbacks.rollout")
    train(compose_config("gpu=cpu", "algorithm=dapo", "steps=3", "batch_size=8", "reward.workers=0",
                         "samples.every=null", f"output_dir={tmp_path}"))
    rows = trained_steps(tmp_path)
    assert [r["step"] for r in rows] == ["0", "1", "2"]
    for r in rows:
        assert float(r["train/tied_groups"]) == 0 or f"GRPO step {r['step']}: " in caplog.text, r["step"]
        assert float(r["reward/overlong"]) <= 0 and "rollout/filtered_groups" in r
    assert float(rows[-1]["train/pg_clipfrac"]) >= 0


@pytest.mark.parametrize("algorithm", ["dapo", "gspo"])
def test_an_algorithm_over_the_one_shot_experiment_trains_three_steps(tmp_path, algorithm, caplog):
    """On the tiny model, which stops now and then under this prompt: the experiment rewards verification
    only, which it never earns, so with dapo the overlong penalty is the whole reward, and it breaks ties
    that the refill (pi1 again, with new seeds) looks for; the cut-off rows are masked out."""
    caplog.set_level(logging.INFO, logger="callbacks.rollout")
    masked = ["grpo.mask_truncated=true"] if algorithm == "dapo" else []
    train(compose_config(*TINY, "experiment=one_shot_pi1", f"algorithm={algorithm}", "steps=3", *masked,
                         "validation.benchmarks=[]", "samples.every=null", "save_every=10", f"output_dir={tmp_path}"))
    rows = trained_steps(tmp_path)
    assert [r["step"] for r in rows] == ["0", "1", "2"]
    for r in rows:
        assert math.isfinite(float(r["train/loss"])) and float(r["train/grad_norm"]) > 0
    if algorithm == "dapo":
        for r in rows:
            assert float(r["reward/overlong"]) < 0 and float(r["reward/verify"]) == 0
            assert float(r["reward/total"]) == pytest.approx(float(r["reward/overlong"]))  # part of the total
            assert float(r["train/tied_groups"]) == 0 or f"GRPO step {r['step']}: " in caplog.text, r["step"]
        assert sum(float(r["rollout/filtered_groups"]) for r in rows) > 0
        assert any(0 < float(r["response_length/clip_ratio"]) < 1 for r in rows)  # rows were masked, not all


# -- settings checked at start ------------------------------------------------------------------------


@pytest.mark.parametrize(("overrides", "message"), [
    (["reward.overlong_buffer=48"], "reward.overlong_buffer=48 must be at least 0 and less than rollout.max_new_tokens=48"),
    (["reward.overlong_penalty=-1"], "reward.overlong_penalty=-1 must be >= 0"),
    (["grpo.ratio_level=seq"], "grpo.ratio_level='seq'; choose one of"),
    (["grpo.max_sampling_rounds=0"], "grpo.max_sampling_rounds=0 must be at least 1"),
])
def test_variant_settings_that_cannot_work_are_refused_at_start(tmp_path, overrides, message):
    with pytest.raises(UserError, match=message):
        train(compose_config(*TINY, *overrides, f"output_dir={tmp_path}"))
    assert not (tmp_path / "checkpoints").exists()
