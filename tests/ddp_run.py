"""Train through `rlvr.train.train` with a reward the tiny model earns unevenly (the share of digits in
a response), recording what each rank saw (tests/test_distributed.py drives this).

    python tests/ddp_run.py RECORD_DIR key=value ...

Each rank appends its rollouts' rewards, prompts and micro-batch count (before evening out) per step
to RECORD_DIR/rank-R.jsonl and, at the end, digests of its policy's full weights (gathered under
FSDP2) and of its engine's weights. Lightning's launcher starts the other ranks with this same
command; `trainer.strategy=fsdp2` shards the tiny model (a Qwen2 too) as the h100x8 profile does.
With DDP_RUN_TIED_AFTER_FIRST=1 every step after the first gets rewards that all tie (no signal), and
each step's record carries digests of the weights and of the optimizer state.
With DDP_RUN_TIE_EVEN=1 the groups of problems with an even answer tie (for dynamic sampling),
and each step's record carries the data module's refill cursor.
"""

import hashlib
import json
import os
import sys
from pathlib import Path

import lightning as L
import torch
from hydra import compose, initialize_config_dir

from callbacks.rollout import RolloutCallback
from rlvr import train as train_module
from rlvr.distributed import policy_weights
from rlvr.rewards import RewardBatch


class DigitsReward:
    """tie_even: a response to a problem with an even answer earns 1 whatever it says, so those groups
    tie (about half of the arithmetic problems): dynamic sampling then has groups to drop and refill."""

    def __init__(self, tied_after_first: bool = False, tie_even: bool = False) -> None:
        self.tied_after_first = tied_after_first
        self.tie_even = tie_even
        self.calls = 0

    def __call__(self, texts, truths) -> RewardBatch:
        self.calls += 1
        t = torch.tensor([sum(c.isdigit() for c in text) / max(len(text), 1) for text in texts])
        if self.tied_after_first and self.calls > 1:
            t = torch.ones_like(t)
        if self.tie_even:
            t = torch.where(torch.tensor([int(truth) % 2 == 0 for truth in truths]), 1.0, t)
        return RewardBatch(t, torch.zeros_like(t), torch.zeros_like(t), t, 0)

    def close(self) -> None:
        pass


class Recorder(L.Callback):
    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def _write(self, trainer: L.Trainer, record: dict) -> None:
        with (self.folder / f"rank-{trainer.global_rank}.jsonl").open("a") as f:
            f.write(json.dumps({"world": trainer.world_size, **record}) + "\n")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        rows = batch["rollout"].input_ids.shape[0]  # the rollout callback, after this one, drops it
        record = {"step": batch["step"], "position": batch["position"],
                  "rewards": batch["samples"]["rewards"]["total"].tolist(),
                  "lengths": batch["rollout"].attention_mask.sum(dim=1).tolist(),
                  "micro_batches": len(pl_module._micro_batches(batch["rollout"], torch.arange(rows))),
                  "refill_cursor": trainer.datamodule.refill_cursor}
        if TIED_AFTER_FIRST:
            state = trainer.optimizers[0].state_dict()["state"]
            record["step_weights"] = digest({n: w.clone() for n, w in policy_weights(pl_module)})
            record["optimizer_state"] = digest({f"{i}.{k}": torch.as_tensor(v) for i, s in state.items()
                                                for k, v in s.items()})
        self._write(trainer, record)

    def on_fit_end(self, trainer, pl_module) -> None:
        (rollout,) = [c for c in trainer.callbacks if isinstance(c, RolloutCallback)]
        engine_model = getattr(rollout.engine, "model", None)  # the HF engine's; vLLM's lives inside vLLM
        self._write(trainer, {"weights": digest({n: w.clone() for n, w in policy_weights(pl_module)}),
                              "engine_weights": engine_model and digest(dict(engine_model.named_parameters()))})


def digest(weights: dict[str, torch.Tensor]) -> str:
    """Of the weights by name, so that a replica, a gathered copy and a checkpoint compare."""
    h = hashlib.sha256()
    for name in sorted(weights):
        h.update(name.encode() + weights[name].detach().float().contiguous().numpy().tobytes())
    return h.hexdigest()


TIED_AFTER_FIRST = os.environ.get("DDP_RUN_TIED_AFTER_FIRST") == "1"
TIE_EVEN = os.environ.get("DDP_RUN_TIE_EVEN") == "1"

if __name__ == "__main__":
    folder = Path(sys.argv[1])
    with initialize_config_dir(config_dir=train_module.CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=sys.argv[2:])
    train_module.reward_scorer = lambda cfg: DigitsReward(TIED_AFTER_FIRST, TIE_EVEN)
    train_module.train(cfg, extra_callbacks=[Recorder(folder)])
