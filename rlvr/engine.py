"""Rollout engines behind one two-method interface: `generate` and `load_weights`.

The Hugging Face engine here serves CPU runs, tests, and GPUs without vLLM; the vLLM engine
(`rlvr/vllm_engine.py`, the only file that imports vllm) implements the same protocol. The callback
and the trainer never see engine internals. `make_engine` picks one by `rollout.engine`.

Every prompt carries its own sampling seed (as a vLLM request does), so a prompt's samples do not
depend on which other prompts share its batch: one process or several ranks, a fresh run or a
resumed one, the same prompt at the same step draws the same samples.

Both engines return, with each sampled token, its log-probability under the engine's own weights
after temperature (and top-p): what the trainer compares with its own log-probs
(`rollout/logprob_gap_*`) and what truncated importance sampling corrects for.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, Protocol

import torch
from torch import nn
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList, PreTrainedTokenizerBase


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
        """Take the trainer's current weights, by Hugging Face parameter name."""
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
    sleep_level: int = 1  # vllm on CUDA: 1 offloads weights and frees the KV cache during updates, 2 drops the weights, 0 keeps them
    enforce_eager: bool = False  # vllm: no CUDA graphs / compilation (faster start, slower decoding)
    max_num_seqs: int = 256  # vllm: sequences decoded at once
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


def row_uniforms(keys: torch.Tensor, position: int) -> torch.Tensor:
    """(rows,) float64 uniforms in (0, 1), a pure function of (row key, decoding position).

    Drawn where the logits are, in one vectorized pass: no per-row generators, no host copies.
    torch has no public counter-based generator, hence this hash.
    """
    step_keys = hash32(keys ^ hash32(torch.tensor(position + 1, dtype=torch.int64, device=keys.device)))  # (rows,)
    return (step_keys.double() + 0.5) * 2.0**-32


class SeededSampler(LogitsProcessor):
    """Samples every row from its own stream, so a row's tokens do not depend on the others.

    Inverse-CDF sampling: one counter-based uniform u per row and step, and the token where the
    cumulative softmax(logits / T) (restricted to the top-p nucleus when top_p < 1) passes u. One
    random number per row, not one per vocabulary entry as Gumbel-max needs (151,936 for Qwen2.5):
    cheap on a CPU as on a GPU. The returned scores keep only that token, so Hugging Face's greedy
    decoding picks it. The sampled token's log-prob is recorded on the way. temperature 0 is greedy
    decoding (log-probs of the untempered distribution).
    """

    def __init__(self, row_seeds: Sequence[int], temperature: float, top_p: float) -> None:
        self.seeds = list(row_seeds)
        self.temperature = temperature
        self.top_p = top_p
        self.position = 0
        self.logprobs: list[torch.Tensor] = []  # (rows,) per decoding step
        self._keys: torch.Tensor | None = None

    def __call__(self, input_ids: torch.Tensor | None, scores: torch.Tensor) -> torch.Tensor:
        scores = scores.float()  # (rows, V)
        if self.temperature == 0.0:
            chosen = scores.argmax(dim=-1, keepdim=True)
            self.logprobs.append(scores.log_softmax(dim=-1).gather(-1, chosen).squeeze(-1))
            return scores
        scores = scores / self.temperature
        if self.top_p < 1.0:
            probs, order = scores.softmax(dim=-1).sort(dim=-1, descending=True)  # (rows, V)
            outside = probs.cumsum(dim=-1) - probs > self.top_p  # mass before a token already covers top_p
            scores = scores.scatter(-1, order, torch.where(outside, float("-inf"), scores.gather(-1, order)))
        if self._keys is None:
            self._keys = row_keys(self.seeds, scores.device)
        log_norm = scores.logsumexp(dim=-1, keepdim=True)  # (rows, 1)
        cdf = (scores - log_norm).exp().double().cumsum(dim=-1)  # (rows, V); float64: u < total, exactly
        u = row_uniforms(self._keys, self.position)[:, None] * cdf[:, -1:]  # (rows, 1)
        chosen = torch.searchsorted(cdf, u, right=True)  # (rows, 1): a zero-probability token is never chosen
        self.logprobs.append((scores.gather(-1, chosen) - log_norm).squeeze(-1))
        self.position += 1
        return torch.full_like(scores, float("-inf")).scatter_(-1, chosen, 0.0)


def row_seeds(prompt_seeds: Sequence[int], n: int) -> list[int]:
    """n seeds per prompt, drawn from the prompt's seed: rows of one prompt never share a stream."""
    return [int(s) for seed in prompt_seeds
            for s in torch.randint(2**62, (n,), generator=torch.Generator().manual_seed(seed))]


def prompt_seeds(seed: int, step: int, positions: Sequence[int]) -> list[int]:
    """The sampling seed of each prompt: a function of the run's seed, the step, and the prompt's
    place in the step's global batch (not of the rank or the micro-batch that generates it)."""
    return [((seed * 1_000_003 + step) * 1_000_033 + p) % 2**62 for p in positions]


# ---------------------------------------------------------------------------------------------
# The Hugging Face engine
# ---------------------------------------------------------------------------------------------


class HFEngine:
    """`model.generate` on the policy itself (nothing to sync), or on a copy in another dtype
    (bf16 decoding beside fp32 master weights), refreshed by `load_weights` after every update."""

    def __init__(self, model: nn.Module, pad_token_id: int, eos_token_id: int | list[int], batch_size: int = 64,
                 dtype: torch.dtype | None = None) -> None:
        if dtype is not None and dtype != next(model.parameters()).dtype:
            model = copy.deepcopy(model).to(dtype).requires_grad_(False)
        self.model = model
        self.pad_token_id = pad_token_id
        self.eos_token_ids = eos_ids(eos_token_id)
        self.batch_size = batch_size  # prompts per `generate` call, to bound the KV cache

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
        sampler = SeededSampler(row_seeds(seeds, params.n), params.temperature, params.top_p)
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
        the trainer's device."""
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

    def close(self) -> None:
        pass


ENGINES = ("hf", "vllm")


def make_engine(options: EngineOptions, model: nn.Module, tokenizer: PreTrainedTokenizerBase,
                max_model_len: int | None = None) -> RolloutEngine:
    """The engine `rollout.engine` names, generating with `model`'s weights. `max_model_len`
    (prompt + response tokens) sizes vLLM's requests; None: the model's context."""
    if options.engine == "hf":
        dtype = getattr(torch, options.dtype)
        return HFEngine(model, tokenizer.pad_token_id, tokenizer.eos_token_id, options.generate_batch_size, dtype)
    if options.engine == "vllm":
        from rlvr.vllm_engine import VLLMEngine

        context = getattr(model.config, "max_position_embeddings", None) or 4096
        return VLLMEngine(model, tokenizer, min(max_model_len or context, context), options)
    raise ValueError(f"rollout.engine={options.engine!r}; choose one of {list(ENGINES)}")


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
