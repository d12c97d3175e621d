"""The Hugging Face rollout engine: `model.generate` with a sampler of its own.

It serves CPU runs, tests, and GPUs without vLLM. Each row samples from its own counter-based random
stream (a hash of its seed and the decoding position), so a row's tokens do not depend on the other
rows of its batch, and every per-token step stays on the device: no host sync and no tensor built
from a Python number inside the decoding loop (tested; Hugging Face's own stopping check syncs once
per token, which is not ours).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence

import torch
from torch import nn
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList

from rlvr.engines.protocol import Generation, SamplingParams, eos_ids, row_seeds

# ---------------------------------------------------------------------------------------------
# Counter-based random numbers: a prompt's samples are a function of its seed, on any device
# ---------------------------------------------------------------------------------------------

_MASK32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2**32 for int64 x in [0, 2**32), in 16-bit halves so nothing overflows int64."""
    return ((x & 0xFFFF) * c + (((x >> 16) * (c & 0xFFFF)) << 16)) & _MASK32


def hash32(x: torch.Tensor) -> torch.Tensor:
    """A bijective 32-bit integer hash (Wellons' lowbias32) on int64 tensors holding uint32 values."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def row_keys(seeds: Sequence[int], device: torch.device | str = "cpu") -> torch.Tensor:
    """(rows,) 32-bit keys from 62-bit row seeds."""
    seeds_t = torch.tensor([int(s) % 2**62 for s in seeds], dtype=torch.int64, device=device)
    return hash32(hash32(seeds_t & 0x7FFFFFFF) ^ ((seeds_t >> 31) & _MASK32))


def row_uniforms(keys: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
    """(rows,) float64 uniforms in (0, 1), a pure function of (row key, decoding position).

    `position` is a 0-d int64 tensor on the keys' device (a Python int would be copied to the device
    at every token). Drawn where the logits are, in one vectorized pass: no per-row generators, no
    host copies. torch has no public counter-based generator, hence this hash.
    """
    step_keys = hash32(keys ^ hash32(position + 1))  # (rows,)
    return (step_keys.double() + 0.5) * 2.0**-32


class SeededSampler(LogitsProcessor):
    """Samples every row from its own stream, so a row's tokens do not depend on the others.

    Inverse-CDF sampling: one counter-based uniform u per row and step, and the token where the
    cumulative softmax(logits / T) (restricted to the top-p nucleus when top_p < 1) passes u. One
    random number per row, not one per vocabulary entry as Gumbel-max needs (151,936 for Qwen2.5):
    cheap on a CPU as on a GPU. The returned scores keep only that token, so Hugging Face's greedy
    decoding picks it. The sampled token's log-prob is recorded on the way. temperature 0 is greedy
    decoding (log-probs of the untempered distribution).

    Per token (top_p = 1) it makes three (rows, V) temporaries: the tempered float32 scores, their
    exponent (shifted by the row's maximum), and its float64 copy, summed in place; the log-normalizer
    comes from that sum, and the returned scores reuse the first.
    """

    def __init__(self, row_seeds: Sequence[int], temperature: float, top_p: float,
                 device: torch.device | str = "cpu") -> None:
        self.temperature = temperature
        self.top_p = top_p
        self.logprobs: list[torch.Tensor] = []  # (rows,) per decoding step
        self._keys = row_keys(row_seeds, device)  # (rows,), built before decoding starts
        self._position = torch.zeros((), dtype=torch.int64, device=device)  # advanced in place

    def __call__(self, input_ids: torch.Tensor | None, scores: torch.Tensor) -> torch.Tensor:
        if self.temperature == 0.0:
            scores = scores.float()  # (rows, V)
            chosen = scores.argmax(dim=-1, keepdim=True)
            self.logprobs.append(scores.log_softmax(dim=-1).gather(-1, chosen).squeeze(-1))
            return scores
        scores = scores.float() / self.temperature  # (rows, V): a new tensor, ours to overwrite
        if self.top_p < 1.0:
            probs, order = scores.softmax(dim=-1).sort(dim=-1, descending=True)  # (rows, V)
            outside = probs.cumsum(dim=-1) - probs > self.top_p  # mass before a token already covers top_p
            scores = scores.scatter(-1, order, torch.where(outside, float("-inf"), scores.gather(-1, order)))
        top = scores.amax(dim=-1, keepdim=True)  # (rows, 1)
        cdf = (scores - top).exp_().double().cumsum_(dim=-1)  # (rows, V), unnormalized; float64: u < total, exactly
        total = cdf[:, -1:]  # (rows, 1): sum of exp(scores - top)
        u = row_uniforms(self._keys, self._position)[:, None] * total  # (rows, 1)
        chosen = torch.searchsorted(cdf, u, right=True)  # (rows, 1): a zero-probability token is never chosen
        log_norm = top + total.log().float()  # (rows, 1): logsumexp of the scores, without another (rows, V) pass
        del cdf
        self.logprobs.append((scores.gather(-1, chosen) - log_norm).squeeze(-1))
        self._position += 1
        return scores.fill_(float("-inf")).scatter_(-1, chosen, 0.0)


# ---------------------------------------------------------------------------------------------
# The Hugging Face engine
# ---------------------------------------------------------------------------------------------


class HFEngine:
    """`model.generate` on the policy itself (nothing to sync), or on a copy in another dtype
    (bf16 decoding beside fp32 master weights), refreshed by `load_weights` after every update.

    Whether a copy is needed is decided at the first rollout or push, not at construction: under
    bf16-true Lightning casts the policy to bf16 after the engine is built, and the policy itself
    then serves (a copy made at construction would be a second bf16 model)."""

    def __init__(self, model: nn.Module, pad_token_id: int, eos_token_id: int | list[int], batch_size: int = 64,
                 dtype: torch.dtype | None = None) -> None:
        self._source: nn.Module | None = model
        self._model: nn.Module | None = None
        self.dtype = dtype
        self.pad_token_id = pad_token_id
        self.eos_token_ids = eos_ids(eos_token_id)
        self.batch_size = batch_size  # prompts per `generate` call, to bound the KV cache

    @property
    def model(self) -> nn.Module:
        """The model that generates: the policy when it is in the engine's dtype, else a copy of it."""
        if self._model is None:
            source, self._source = self._source, None
            if self.dtype is None or self.dtype == next(source.parameters()).dtype:
                self._model = source
            else:
                self._model = copy.deepcopy(source).to(self.dtype).requires_grad_(False)
        return self._model

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], params: SamplingParams, seeds: Sequence[int]) -> Generation:
        if len(seeds) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds: one seed per prompt")
        device = next(self.model.parameters()).device
        was_training = self.model.training
        self.model.eval()
        out = Generation([], [])
        for start in range(0, len(prompts), self.batch_size):
            chunk = slice(start, start + self.batch_size)
            part = self._generate(prompts[chunk], params, seeds[chunk], device)
            out.tokens += part.tokens
            out.logprobs += part.logprobs
        self.model.train(was_training)
        return out

    def _generate(self, prompts: list[list[int]], params: SamplingParams, seeds: Sequence[int],
                  device: torch.device) -> Generation:
        rows = [p for p in prompts for _ in range(params.n)]  # prompt i's samples are rows i*n .. i*n+n-1
        width = max(len(p) for p in rows)
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        for row, prompt in enumerate(rows):  # left padding, so every prompt ends at the same column
            input_ids[row, width - len(prompt) :] = torch.tensor(prompt)
            attention_mask[row, width - len(prompt) :] = 1
        sampler = SeededSampler(row_seeds(seeds, params.n), params.temperature, params.top_p, device)
        # A fresh GenerationConfig: the model's own defaults (repetition penalty, top_k, ...) would
        # change the distribution the trainer's log-probs assume.
        config = GenerationConfig(do_sample=False, max_new_tokens=params.max_new_tokens, pad_token_id=self.pad_token_id,
                                  eos_token_id=self.eos_token_ids, use_cache=True)
        output = self.model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            generation_config=config,
            logits_processor=LogitsProcessorList([sampler]),
        )
        tokens = [_cut_at_eos(row.tolist(), self.eos_token_ids) for row in output[:, width:].cpu()]
        logprobs = torch.stack(sampler.logprobs, dim=1).cpu()  # (rows, steps)
        return Generation(tokens, [logprobs[i, : len(t)].tolist() for i, t in enumerate(tokens)])

    def sleep(self) -> None:
        pass  # the policy itself, or a copy the size of the engine's dtype: nothing worth freeing

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy weights in by name (casting to the engine's dtype); a separate copy first moves to
        the trainer's device. An adapter run's engine model is the policy or a copy made from it, and
        the base is frozen: it takes nothing (its adapter comes through `load_adapter`)."""
        from rlvr.adapters import is_adapted

        if not is_adapted(self.model):
            self._copy_in(weights)

    def load_adapter(self, policy: nn.Module) -> None:
        """The policy's adapter weights, by PEFT name (nothing to copy when generating with the policy itself)."""
        if self.model is not policy:
            self._copy_in((name, p.detach()) for name, p in policy.named_parameters() if p.requires_grad)

    def _copy_in(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        model = self.model
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, tensor in weights:
                target = params[name]
                if target.device != tensor.device:
                    model.to(tensor.device)
                    params = dict(model.named_parameters())
                    target = params[name]
                if target.data_ptr() != tensor.data_ptr():  # shared with the policy: already current
                    target.copy_(tensor)

    def close(self) -> None:
        pass


def _cut_at_eos(tokens: list[int], eos_token_ids: list[int]) -> list[int]:
    """Keep the first EOS (the policy must learn to stop) and drop the padding after it."""
    for i, token in enumerate(tokens):
        if token in eos_token_ids:
            return tokens[: i + 1]
    return tokens
