"""Rollout engines behind one two-method interface: `generate` and `load_weights`.

The Hugging Face engine here serves CPU runs and tests. A GPU engine (vLLM) implements the same
protocol in its own file, so the callback and the trainer never see engine internals.

Every prompt carries its own sampling seed (as a vLLM request does), so a prompt's samples do not
depend on which other prompts share its batch: one process or several ranks, a fresh run or a
resumed one, the same prompt at the same step draws the same samples.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn
from transformers import LogitsProcessor, LogitsProcessorList


@dataclass(frozen=True)
class SamplingParams:
    n: int = 8  # samples per prompt
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 1024


class RolloutEngine(Protocol):
    def generate(self, prompts: list[list[int]], params: SamplingParams, seeds: Sequence[int]) -> list[list[int]]:
        """Token ids of `params.n` completions per prompt, prompt after prompt (len = n * len(prompts)).

        A completion ends with the EOS token when the model stopped, and is cut at max_new_tokens
        otherwise. `seeds` has one seed per prompt; a prompt's samples depend on its seed only.
        """
        ...

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Take the trainer's current weights, by parameter name."""
        ...


class SeededSampler(LogitsProcessor):
    """Samples every row from its own random stream, so a row's tokens do not depend on the others.

    Gumbel-max: argmax(logits / T + g), g ~ Gumbel(0, 1) drawn from the row's generator, is a draw
    from softmax(logits / T) (restricted to the top-p nucleus when top_p < 1). Hugging Face then
    decodes greedily, since the sampling already happened here.
    """

    def __init__(self, row_seeds: Sequence[int], temperature: float, top_p: float) -> None:
        self.generators = [torch.Generator().manual_seed(s) for s in row_seeds]
        self.temperature = temperature
        self.top_p = top_p

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        scores = scores.float() / self.temperature  # (rows, V)
        if self.top_p < 1.0:
            probs, order = scores.softmax(dim=-1).sort(dim=-1, descending=True)  # (rows, V)
            outside = probs.cumsum(dim=-1) - probs > self.top_p  # mass before a token already covers top_p
            scores = scores.scatter(-1, order, torch.where(outside, float("-inf"), scores.gather(-1, order)))
        exponential = torch.empty(len(self.generators), scores.shape[-1])  # (rows, V)
        for row, generator in zip(exponential, self.generators):
            row.exponential_(generator=generator)
        return scores - exponential.log().to(scores.device)  # -log(Exp(1)) ~ Gumbel(0, 1)


def row_seeds(prompt_seeds: Sequence[int], n: int) -> list[int]:
    """n seeds per prompt, drawn from the prompt's seed: rows of one prompt never share a stream."""
    return [int(s) for seed in prompt_seeds
            for s in torch.randint(2**62, (n,), generator=torch.Generator().manual_seed(seed))]


def prompt_seeds(seed: int, step: int, positions: Sequence[int]) -> list[int]:
    """The sampling seed of each prompt: a function of the run's seed, the step, and the prompt's
    place in the step's global batch (not of the rank or the micro-batch that generates it)."""
    return [((seed * 1_000_003 + step) * 1_000_033 + p) % 2**62 for p in positions]


class HFEngine:
    """`model.generate` on the given model; it may be the policy itself (no copy, nothing to sync)."""

    def __init__(self, model: nn.Module, pad_token_id: int, eos_token_id: int | list[int], batch_size: int = 64) -> None:
        self.model = model
        self.pad_token_id = pad_token_id
        self.eos_token_ids = eos_ids(eos_token_id)
        self.batch_size = batch_size  # prompts per `generate` call, to bound the KV cache

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], params: SamplingParams, seeds: Sequence[int]) -> list[list[int]]:
        if len(seeds) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds: one seed per prompt")
        device = next(self.model.parameters()).device
        was_training = self.model.training
        self.model.eval()
        completions: list[list[int]] = []
        for start in range(0, len(prompts), self.batch_size):
            chunk = slice(start, start + self.batch_size)
            completions += self._generate(prompts[chunk], params, seeds[chunk], device)
        self.model.train(was_training)
        return completions

    def _generate(self, prompts: list[list[int]], params: SamplingParams, seeds: Sequence[int],
                  device: torch.device) -> list[list[int]]:
        rows = [p for p in prompts for _ in range(params.n)]  # prompt i's samples are rows i*n .. i*n+n-1
        width = max(len(p) for p in rows)
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        for row, prompt in enumerate(rows):  # left padding, so every prompt ends at the same column
            input_ids[row, width - len(prompt) :] = torch.tensor(prompt)
            attention_mask[row, width - len(prompt) :] = 1
        sampler = [] if params.temperature == 0.0 else [
            SeededSampler(row_seeds(seeds, params.n), params.temperature, params.top_p)]
        output = self.model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            do_sample=False,  # greedy over the SeededSampler's perturbed scores: sampling, row by row
            logits_processor=LogitsProcessorList(sampler),
            temperature=None,
            top_p=None,
            top_k=None,
            max_new_tokens=params.max_new_tokens,
            pad_token_id=self.pad_token_id,
            eos_token_id=self.eos_token_ids,
            use_cache=True,
        )
        return [_cut_at_eos(row.tolist(), self.eos_token_ids) for row in output[:, width:].cpu()]

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy weights in by name; a separate copy (FSDP) first moves to the trainer's device."""
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, tensor in weights:
                target = params[name]
                if target.device != tensor.device:
                    self.model.to(tensor.device)
                    params = dict(self.model.named_parameters())
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
