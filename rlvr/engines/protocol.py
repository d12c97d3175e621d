"""What every rollout engine takes and returns, and how each prompt's sampling seed is drawn.

Every prompt carries its own sampling seed (as a vLLM request does), so a prompt's samples do not
depend on which other prompts share its batch: one process or several ranks, a fresh run or a
resumed one, the same prompt at the same step draws the same samples (exactly on CPU; on a GPU up to
the batch-dependence of bf16 kernels, see the README's "Exactness").

Every engine returns, with each sampled token, its log-probability under the engine's own weights
after temperature (and top-p): what the trainer compares with its own log-probs
(`rollout/logprob_gap_*`) and what truncated importance sampling corrects for.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, Protocol

import torch
from torch import nn


@dataclass(frozen=True)
class SamplingParams:
    n: int = 8  # samples per prompt
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 1024


@dataclass
class Generation:
    """`n` completions per prompt, prompt after prompt (len = n * prompts)."""

    tokens: list[list[int]]  # ends with an EOS id when the model stopped, cut at max_new_tokens otherwise
    logprobs: list[list[float]]  # the engine's log-prob of each token (after temperature and top-p)


class RolloutEngine(Protocol):
    def generate(self, prompts: list[list[int]], params: SamplingParams, seeds: Sequence[int]) -> Generation:
        """`params.n` completions per prompt. `seeds` has one seed per prompt; a prompt's samples
        depend on its seed only."""
        ...

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Take the trainer's current weights, by Hugging Face parameter name: all of them after every
        update of a full-parameter run; an adapter run's base once, de-quantized (rlvr.adapters.base_weights),
        or a subset of the names (the adapted modules, merged)."""
        ...

    def load_adapter(self, policy: nn.Module) -> None:
        """An adapter run, after its base came through `load_weights` and after every update: take
        the PEFT policy's adapter (the engine picks how: rollout.adapter_sync)."""
        ...

    def sleep(self) -> None:
        """The trainer is about to update: free what the engine holds on the accelerator (vLLM's sleep
        mode) until the next push or rollout wakes it. Only the training loop calls it."""
        ...

    def close(self) -> None:
        """Release what the engine holds (vLLM's memory and process group; nothing for HF)."""
        ...


@dataclass(frozen=True)
class EngineOptions:
    """What `rollout.*` says about the engine itself (not about sampling)."""

    engine: str = "hf"  # hf | vllm
    generate_batch_size: int = 64  # prompts per `generate` call (hf), to bound the KV cache
    gpu_memory_utilization: float = 0.5  # the engine's share of GPU memory (vllm)
    # vllm on CUDA, during each update: 2 drops the weights and frees the KV cache (the push after the
    # update refills them), 1 also keeps a host copy of the weights (2 x their size over PCIe per
    # step, for nothing: the push overwrites them), 0 never sleeps (the engine keeps its share)
    sleep_level: int = 2
    enforce_eager: bool = False  # vllm: no CUDA graphs / compilation (faster start, slower decoding)
    max_num_seqs: int = 256  # vllm: sequences decoded at once
    adapter_sync: str = "merged"  # vllm, an adapter run: merged (adapted modules' merged weights) | lora (vLLM's LoRA, the adapter reloaded)
    cpu_kvcache_gib: float = 2.0  # vllm on CPU: KV cache size (VLLM_CPU_KVCACHE_SPACE)
    dtype: str = "float32"  # the engine's weights: float32 | bfloat16 | float16
    seed: int = 0
    extra: dict = field(default_factory=dict)  # any other vllm.LLM keyword

    @classmethod
    def from_config(cls, rollout: Mapping[str, Any], precision: str, seed: int = 0) -> EngineOptions:
        """From `rollout.*` (sampling keys are ignored); dtype null follows the trainer's precision."""
        names = {f.name for f in fields(cls)} - {"dtype", "seed"}
        options = {key: value for key, value in rollout.items() if key in names}
        return cls(**options, dtype=rollout.get("dtype") or decode_dtype(precision), seed=seed)


def decode_dtype(precision: str) -> str:
    """The engine's dtype for a Lightning precision: bf16 for bf16-mixed/true, else float32."""
    precision = str(precision)
    if precision.startswith("bf16"):
        return "bfloat16"
    if precision.startswith("16"):
        return "float16"
    return "float32"


def row_seeds(prompt_seeds: Sequence[int], n: int) -> list[int]:
    """n seeds per prompt, drawn from the prompt's seed: rows of one prompt never share a stream."""
    return [int(s) for seed in prompt_seeds
            for s in torch.randint(2**62, (n,), generator=torch.Generator().manual_seed(seed))]


def prompt_seeds(seed: int, step: int, positions: Sequence[int]) -> list[int]:
    """The sampling seed of each prompt: a function of the run's seed, the step, and the prompt's
    place in the step's global batch (not of the rank or the micro-batch that generates it)."""
    return [((seed * 1_000_003 + step) * 1_000_033 + p) % 2**62 for p in positions]


def eos_ids(eos_token_id: int | list[int]) -> list[int]:
    """A tokenizer's or config's EOS id(s) as a list (some models stop on several tokens)."""
    return [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)


def truncated(completion: list[int], eos_token_ids: list[int]) -> bool:
    """Cut at max_new_tokens rather than stopped by the model."""
    return not completion or completion[-1] not in eos_token_ids
