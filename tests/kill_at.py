"""Run training and SIGKILL it at a chosen point (tests/test_faults.py drives this).

    python tests/kill_at.py POINT STEP [--digits-reward | --tie-even-reward] key=value ...

POINT is where, during GRPO step STEP (0-based), the process kills itself:
  generate    after the engine has generated a chunk of the step's rollouts
  update      after the first backward of the step's update, before the optimizer step
  checkpoint  halfway through writing the checkpoint file after the step
  interrupt   not a kill: Ctrl-C (SIGINT to the whole process group, reward workers included) as
              the step's rollout starts
--digits-reward scores with tests/ddp_run.py's reward (the share of digits), which the tiny model earns
unevenly, so that a run killed here compares with a ddp_run.py run; --tie-even-reward the same with the
groups of even answers tied (DigitsReward(tie_even=True)), for dynamic sampling.
"""

import os
import signal
import sys

import torch

from callbacks.rollout import RolloutCallback
from rlvr import module
from rlvr.train import main


def die() -> None:
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def current_step(pl_module) -> int:
    return pl_module.trainer.datamodule.next_step - 1


# Everything below runs only in the trainer: the reward workers are spawned and import this file again.
if __name__ == "__main__":
    point, step = sys.argv[1], int(sys.argv[2])
    if "--digits-reward" in sys.argv or "--tie-even-reward" in sys.argv:
        from ddp_run import DigitsReward
        from rlvr import train as train_module

        tie_even = "--tie-even-reward" in sys.argv
        train_module.reward_scorer = lambda cfg: DigitsReward(tie_even=tie_even)
    sys.argv = [sys.argv[0], *(a for a in sys.argv[3:] if a not in ("--digits-reward", "--tie-even-reward"))]

    if point == "generate":
        original_rollout = RolloutCallback.on_train_batch_start

        def rollout(self, trainer, pl_module, batch, batch_idx):
            if batch["step"] == step:  # die once the engine has generated its first chunk
                original_chunk = self.engine._generate
                self.engine._generate = lambda *a: (original_chunk(*a), die())[0]
            return original_rollout(self, trainer, pl_module, batch, batch_idx)

        RolloutCallback.on_train_batch_start = rollout
    elif point == "update":
        original_micro_step = module.GRPOModule._micro_step

        def micro_step(self, *args, **kwargs):
            stats = original_micro_step(self, *args, **kwargs)
            if current_step(self) == step:
                die()
            return stats

        module.GRPOModule._micro_step = micro_step
    elif point == "interrupt":
        original_rollout = RolloutCallback.on_train_batch_start

        def rollout(self, trainer, pl_module, batch, batch_idx):
            if batch["step"] == step:
                os.killpg(os.getpgrp(), signal.SIGINT)
            return original_rollout(self, trainer, pl_module, batch, batch_idx)

        RolloutCallback.on_train_batch_start = rollout
    elif point == "checkpoint":
        original_save = torch.save

        def save(obj, f, *args, **kwargs):
            if isinstance(obj, dict) and obj.get("global_step") == step + 1 and hasattr(f, "write"):
                f.write(b"PK\x03\x04" + b"\0" * 4096)  # the start of a zip file, then nothing
                f.flush()
                die()
            return original_save(obj, f, *args, **kwargs)

        torch.save = save
    else:
        raise SystemExit(f"unknown point {point!r}")

    main()
