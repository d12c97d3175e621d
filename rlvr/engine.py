"""Rollout engines behind one two-method interface: `generate` and `load_weights`.

The Hugging Face engine here serves CPU runs and tests. A GPU engine (vLLM) implements the same
protocol in its own file, so the callback and the trainer never see engine internals.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn


@dataclass(frozen=True)
class SamplingParams:
    n: int = 8  # samples per prompt
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 1024


class RolloutEngine(Protocol):
    def generate(self, prompts: list[list[int]], params: SamplingParams, seed: int) -> list[list[int]]:
        """Token ids of `params.n` completions per prompt, prompt after prompt (len = n * len(prompts)).

        A completion ends with the EOS token when the model stopped, and is cut at max_new_tokens
        otherwise. The same seed gives the same samples.
        """
        ...

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Take the trainer's current weights, by parameter name."""
        ...


class HFEngine:
    """`model.generate` on the given model; it may be the policy itself (no copy, nothing to sync)."""

    def __init__(self, model: nn.Module, pad_token_id: int, eos_token_id: int | list[int], batch_size: int = 64) -> None:
        self.model = model
        self.pad_token_id = pad_token_id
        self.eos_token_ids = eos_ids(eos_token_id)
        self.batch_size = batch_size  # prompts per `generate` call, to bound the KV cache

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], params: SamplingParams, seed: int) -> list[list[int]]:
        device = next(self.model.parameters()).device
        was_training = self.model.training
        self.model.eval()
        completions: list[list[int]] = []
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            for start in range(0, len(prompts), self.batch_size):
                completions += self._generate(prompts[start : start + self.batch_size], params, device)
        self.model.train(was_training)
        return completions

    def _generate(self, prompts: list[list[int]], params: SamplingParams, device: torch.device) -> list[list[int]]:
        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        for row, prompt in enumerate(prompts):  # left padding, so every prompt ends at the same column
            input_ids[row, width - len(prompt) :] = torch.tensor(prompt)
            attention_mask[row, width - len(prompt) :] = 1
        greedy = params.temperature == 0.0
        output = self.model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            do_sample=not greedy,
            temperature=None if greedy else params.temperature,
            top_p=None if greedy else params.top_p,
            top_k=None,
            max_new_tokens=params.max_new_tokens,
            num_return_sequences=params.n,
            pad_token_id=self.pad_token_id,
            eos_token_id=self.eos_token_ids,
            use_cache=True,
        )
        return [_cut_at_eos(row.tolist(), self.eos_token_ids) for row in output[:, width:].cpu()]

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, tensor in weights:
                target = params[name]
                if target.data_ptr() != tensor.data_ptr():  # shared with the policy: already current
                    target.copy_(tensor)


ENGINES = ("hf",)


def make_engine(name: str, model: nn.Module, pad_token_id: int, eos_token_id: int | list[int], batch_size: int = 64) -> RolloutEngine:
    """The engine `rollout.engine` names, generating with `model`."""
    if name not in ENGINES:
        raise ValueError(f"rollout.engine={name!r}; choose one of {list(ENGINES)}")
    return HFEngine(model, pad_token_id, eos_token_id, batch_size)


def eos_ids(eos_token_id: int | list[int]) -> list[int]:
    """A tokenizer's or config's EOS id(s) as a list (some models stop on several tokens)."""
    return [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)


def truncated(completion: list[int], eos_token_ids: list[int]) -> bool:
    """Cut at max_new_tokens rather than stopped by the model."""
    return not completion or completion[-1] not in eos_token_ids


def _cut_at_eos(tokens: list[int], eos_token_ids: list[int]) -> list[int]:
    """Keep the first EOS (the policy must learn to stop) and drop the padding after it."""
    for i, token in enumerate(tokens):
        if token in eos_token_ids:
            return tokens[: i + 1]
    return tokens
