"""What changes when training runs on several processes (Lightning's DDP or FSDP strategies).

DDP keeps a whole replica of the policy on every rank, so a rollout engine that shares the policy's
tensors (the Hugging Face engine) has nothing to sync. FSDP shards the policy: an engine then holds
its own full copy, and after each update it receives the full weights gathered one FSDP unit (a
decoder layer, say) at a time, so at most one unit's gathered weights exist beside the shards.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import lightning as L
import torch
from lightning.pytorch.strategies import FSDPStrategy
from torch import nn
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


def shards_weights(strategy: Any) -> bool:
    """Whether `trainer.strategy` (an object, or its name in the config) shards the policy."""
    return isinstance(strategy, FSDPStrategy) or (isinstance(strategy, str) and strategy.startswith("fsdp"))


def clean_name(name: str) -> str:
    for prefix in WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def policy_weights(pl_module: L.LightningModule) -> Iterator[tuple[str, torch.Tensor]]:
    """The policy's full weights by their Hugging Face names, for a rollout engine.

    Without FSDP these are the parameters themselves. With FSDP every rank must iterate to the end,
    in step with the others, since gathering a unit is a collective.
    """
    root = pl_module.trainer.strategy.model
    units = [m for m in root.modules() if isinstance(m, FSDP)] if root is not None else []
    if not units:
        yield from pl_module.policy.named_parameters()
        return
    prefix = "policy."
    paths = {m: clean_name(name) for name, m in root.named_modules()}
    for unit in units:
        nested = [name for name, m in unit.named_modules() if m is not unit and isinstance(m, FSDP)]
        unit_prefix = paths[unit] + "." if paths[unit] else ""
        with FSDP.summon_full_params(unit, recurse=False, writeback=False):
            for name, param in unit.named_parameters():
                if any(name.startswith(n + ".") for n in nested):
                    continue  # another unit's: gathered in its own turn
                full = clean_name(unit_prefix + name)
                if full.startswith(prefix):
                    yield full[len(prefix):], param.detach()
