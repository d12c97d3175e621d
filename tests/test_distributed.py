"""DDP and FSDP2 over two CPU processes (gloo) on the tiny model, as `gpu=cpu devices=2` runs them."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ddp_run import digest
from rlvr.models import load_checkpoint_policy
from tiny import TINY

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.timeout(1200)  # each test here chains several training runs (subprocesses)
COMMON = [*TINY, "batch_size=4", "rollout.n=4", "seed=3", "save_every=1", "samples.every=null",
          "optim.lr=1e-3", "grpo.micro_batch_size=4"]  # micro 4 < 8 rows per rank: accumulation too
# Tokens per micro-batch: these runs' rows are a prompt of about 200 tokens and a response of about 20, so a lane
# holds a prompt and one or two of its samples; 7 micro-batches on one rank and 8 on the other (first step)
BUDGET = 250


def run(folder: Path, *overrides: str, env: dict | None = None) -> None:
    folder.mkdir(exist_ok=True)
    done = subprocess.run([sys.executable, "tests/ddp_run.py", str(folder), *COMMON, f"output_dir={folder}", *overrides],
                          cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, **(env or {})})
    assert done.returncode == 0, done.stderr[-3000:]


def records(folder: Path, rank: int) -> list[dict]:
    return [json.loads(line) for line in (folder / f"rank-{rank}.jsonl").read_text().splitlines()]


def metrics(folder: Path) -> dict[int, dict[str, float]]:
    with (folder / "metrics.csv").open() as f:
        rows = [r for r in csv.DictReader(f) if r.get("train/loss")]
    assert len({r["step"] for r in rows}) == len(rows), "a step was logged twice"
    return {int(r["step"]): {k: float(v) for k, v in r.items() if v} for r in rows}


@pytest.fixture(scope="module")
def one(tmp_path_factory) -> Path:
    """The reference: one process, same global batch and seed."""
    folder = tmp_path_factory.mktemp("one")
    run(folder, "devices=1", "steps=3")
    return folder


@pytest.fixture(scope="module")
def two(tmp_path_factory) -> Path:
    """DDP over two processes, 4 rows per micro-batch."""
    folder = tmp_path_factory.mktemp("two")
    run(folder, "devices=2", "steps=2")
    return folder


@pytest.mark.slow
def test_two_processes_train_as_one_and_resume_on_another_device_count(two, one):
    ranks = [records(two, 0), records(two, 1)]
    assert all(r[-1]["world"] == 2 for r in ranks)
    assert ranks[0][-1]["weights"] == ranks[1][-1]["weights"]  # both replicas end with the same weights
    reference, logged = metrics(one), metrics(two)
    for step in (0, 1):
        share = [next(r for r in rank if r.get("step") == step) for rank in ranks]
        assert (share[0]["position"], share[1]["position"]) == ([0, 1], [2, 3])  # each rank its half of the prompts
        both = share[0]["rewards"] + share[1]["rewards"]
        assert len(set(both)) > 1  # an uneven reward, so a one-rank mean would differ
        assert logged[step]["reward/total"] == pytest.approx(sum(both) / len(both), rel=1e-5)
        # Same global batch and seed: the same samples, so the same loss and gradient as one process.
        for key in ("reward/total", "train/loss", "train/pg_loss", "train/grad_norm", "train/entropy", "response_length/mean"):
            assert logged[step][key] == pytest.approx(reference[step][key], rel=1e-4, abs=1e-6), (step, key)

    run(two, "devices=1", "steps=3", "ckpt_path=last")  # a DDP checkpoint resumed by one process
    resumed = metrics(two)
    assert sorted(resumed) == [0, 1, 2]
    for key in ("reward/total", "train/loss", "train/grad_norm"):
        assert resumed[2][key] == pytest.approx(reference[2][key], rel=1e-4, abs=1e-6), key


@pytest.mark.slow
@pytest.mark.parametrize("loss_agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_token_budget_micro_batches_on_two_processes_give_the_fixed_row_step(tmp_path, two, loss_agg):
    """DDP with micro-batches by a token budget (lanes, the samples of a prompt sharing it; counts evened
    out over the ranks) against 4 rows per micro-batch: the same first step, to float rounding, for
    each loss aggregation (token-mean's fixed-row run is the shared two-process one)."""
    budget = tmp_path / "budget"
    run(budget, "devices=2", "steps=1", f"grpo.micro_batch_tokens={BUDGET}", f"grpo.loss_agg={loss_agg}")
    counts = [[r["micro_batches"] for r in records(budget, rank) if "step" in r] for rank in (0, 1)]
    assert counts[0] != counts[1], counts  # one rank ran an empty micro-batch
    if loss_agg == "token-mean":
        fixed_folder = two
    else:
        fixed_folder = tmp_path / "fixed"
        run(fixed_folder, "devices=2", "steps=1", f"grpo.loss_agg={loss_agg}")
    fixed, logged = metrics(fixed_folder)[0], metrics(budget)[0]
    for key in ("reward/total", "train/loss", "train/pg_loss", "train/grad_norm", "train/entropy", "train/kl"):
        # abs: on a first step (ratio 1) the policy loss is -mean(advantages), zero up to rounding (~1e-8)
        assert logged[key] == pytest.approx(fixed[key], rel=1e-5, abs=1e-7), key
    assert logged["train/padding_frac"] < fixed["train/padding_frac"]


@pytest.mark.slow
def test_fsdp2_on_two_processes_trains_as_one_and_its_checkpoint_resumes_on_one(tmp_path, one):
    """FSDP2 (`trainer.strategy=fsdp2`, as gpu=h100x8 sets it) over two gloo CPU processes: one unit per
    decoder layer, the KL reference sharded too, each engine refreshed with gathered weights. Micro-
    batches by a token budget, so the ranks cut different numbers of them: evened out, or the
    collectives would hang."""
    sharded = tmp_path / "fsdp2"
    run(sharded, "trainer.strategy=fsdp2", "devices=2", "steps=2", f"grpo.micro_batch_tokens={BUDGET}")

    counts = [[r["micro_batches"] for r in records(sharded, rank) if "step" in r] for rank in (0, 1)]
    assert counts[0] != counts[1], counts  # some step had one rank run empty micro-batches
    ends = [records(sharded, rank)[-1] for rank in (0, 1)]
    _, _, policy = load_checkpoint_policy(sharded / "checkpoints" / "last.ckpt")  # the consolidated file rebuilds it
    saved = digest(dict(policy.named_parameters()))
    # Both ranks end with the same full weights, the consolidated checkpoint's; each engine holds them.
    assert {e["engine_weights"] for e in ends} == {e["weights"] for e in ends} == {saved}
    reference, logged = metrics(one), metrics(sharded)
    for step in (0, 1):
        for key in ("reward/total", "train/loss", "train/grad_norm", "train/entropy"):
            assert logged[step][key] == pytest.approx(reference[step][key], rel=1e-4, abs=1e-6), (step, key)

    run(sharded, "devices=1", "steps=3", "ckpt_path=last")  # the consolidated checkpoint, one process, no sharding
    resumed = metrics(sharded)
    assert sorted(resumed) == [0, 1, 2]
    for key in ("reward/total", "train/loss", "train/grad_norm"):
        assert resumed[2][key] == pytest.approx(reference[2][key], rel=1e-4, abs=1e-6), key


@pytest.mark.slow
def test_two_processes_skip_a_step_with_no_signal_together(tmp_path):
    """Step 0 has signal; steps 1 and 2 tie (KL 0, entropy 0): both ranks leave weights and AdamW's
    state bit-identical, and count the skips."""
    folder = tmp_path / "tied"
    run(folder, "devices=2", "steps=3", "grpo.kl_coef=0", "grpo.entropy_coef=0", "optim.weight_decay=0.1",
        env={"DDP_RUN_TIED_AFTER_FIRST": "1"})
    for rank in (0, 1):
        steps = [r for r in records(folder, rank) if "step" in r]
        assert [r["step"] for r in steps] == [0, 1, 2]
        assert steps[1]["step_weights"] == steps[0]["step_weights"] == steps[2]["step_weights"]
        assert steps[1]["optimizer_state"] == steps[0]["optimizer_state"] == steps[2]["optimizer_state"]
    logged = metrics(folder)
    assert logged[0]["train/grad_norm"] > 0 and logged[0]["train/no_signal_updates"] == 0
    assert (logged[1]["train/no_signal_updates"], logged[2]["train/no_signal_updates"]) == (1, 2)


def test_a_sharded_weight_is_gathered_in_the_engines_dtype():
    """FSDP2's push: each shard is cast before the gather (a bf16 engine: half the traffic); a plain
    tensor is handed over as it is. One gloo process, a DTensor sharded over it."""
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from rlvr.distributed import full

    plain = torch.randn(4, 3)
    assert full(plain, torch.bfloat16) is plain
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        weight = distribute_tensor(torch.randn(4, 3), init_device_mesh("cpu", (1,)), [Shard(0)])
        gathered = full(weight, torch.bfloat16)
        assert gathered.dtype == torch.bfloat16 and torch.equal(gathered, weight.full_tensor().to(torch.bfloat16))
        assert full(weight).dtype == torch.float32
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_processes_train_a_lora_adapter_as_one(tmp_path):
    """adapter=lora under DDP: only the adapter's gradients are all-reduced; both ranks end with the
    same adapter, and the two-process steps equal one process's."""
    one_lora, two_lora = tmp_path / "one", tmp_path / "two"
    run(one_lora, "adapter=lora", "devices=1", "steps=2")
    run(two_lora, "adapter=lora", "devices=2", "steps=2")
    ends = [records(two_lora, rank)[-1] for rank in (0, 1)]
    assert ends[0]["weights"] == ends[1]["weights"]
    reference, logged = metrics(one_lora), metrics(two_lora)
    for step in (0, 1):
        for key in ("reward/total", "train/loss", "train/grad_norm", "train/entropy"):
            assert logged[step][key] == pytest.approx(reference[step][key], rel=1e-4, abs=1e-6), (step, key)
    assert logged[1]["train/grad_norm"] > 0
