"""What changes when training runs on several processes: Lightning's DDP, or FSDP2 (`fully_shard`)
through Lightning's ModelParallelStrategy (`trainer.strategy=fsdp2`).

DDP keeps a whole replica of the policy on every rank, so a rollout engine that shares the policy's
tensors (the Hugging Face engine) has nothing to sync. FSDP2 shards the policy (one unit per decoder
layer, plus the rest: embeddings, final norm, LM head): an engine then holds its own full copy, and
after each update it receives the full weights gathered one parameter at a time
(`DTensor.full_tensor()`), so at most one parameter's full copy exists beside the shards. Each shard
is cast to the engine's dtype before the gather: a bf16 engine gets half the traffic of fp32.

Why not FSDP1 (`FSDPStrategy`): Lightning runs a step inside the root FSDP module's forward, and
with manual optimization the backward passes happen inside that forward, so FSDP1's state machine
is left in FORWARD_BACKWARD waiting for a backward that already ran; gathering the weights for the
engine afterwards (`summon_full_params`) then fails its IDLE assertion. ModelParallelStrategy calls
the step directly and FSDP2 keeps no such state: a gather is a plain collective between steps.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import lightning as L
import torch
from torch import nn

SHARDED = "fsdp2"


def make_strategy(strategy: Any, world: int) -> Any:
    """`fsdp2` -> Lightning's ModelParallelStrategy with every process in one FSDP2 group and full
    (consolidated) checkpoints, which resume on any number of processes; anything else is passed on."""
    if strategy != SHARDED:
        return strategy
    from lightning.pytorch.strategies import ModelParallelStrategy

    return ModelParallelStrategy(data_parallel_size=world, tensor_parallel_size=1, save_distributed_checkpoint=False)


def shards_weights(strategy: Any) -> bool:
    """Whether `trainer.strategy` (an object, or its name in the config) shards the policy."""
    from lightning.pytorch.strategies import ModelParallelStrategy

    return strategy == SHARDED or isinstance(strategy, ModelParallelStrategy)


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks of a Hugging Face causal LM (Qwen2, Llama, ...)."""
    return list(model.get_decoder().layers)


def shard(root: nn.Module, model: nn.Module, mesh: Any) -> None:
    """FSDP2: one unit per decoder layer of `model`, then `root` (which holds `model`) for the rest.
    `root`'s forward must do all the computation that needs the rest (embeddings, LM head)."""
    from torch.distributed.fsdp import fully_shard

    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh)
    fully_shard(root, mesh=mesh)


def is_sharded(module: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def full(tensor: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A sharded tensor gathered (a collective: every rank must call it in the same order), each
    shard first cast to `dtype` when given; or the tensor itself, as it is."""
    from torch.distributed.tensor import DTensor

    if not isinstance(tensor, DTensor):
        return tensor
    return (tensor if dtype is None else tensor.to(dtype)).full_tensor()


def policy_weights(pl_module: L.LightningModule, dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """The policy's full weights by their Hugging Face names, for a rollout engine: the parameters
    themselves (an engine that shares them needs no copy), or under FSDP2 each one gathered in turn
    in the engine's `dtype` (every rank iterates to the end)."""
    for name, param in pl_module.policy.named_parameters():
        yield name, full(param.detach(), dtype)
