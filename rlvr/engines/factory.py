"""`make_engine`: the engine `rollout.engine` names. Its own module, so that neither engine imports
the other (the vLLM engine, and with it vllm, is imported only when asked for)."""

from __future__ import annotations

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from rlvr.engines.hf import HFEngine
from rlvr.engines.protocol import EngineOptions, RolloutEngine

ENGINES = ("hf", "vllm")


def make_engine(options: EngineOptions, model: nn.Module, tokenizer: PreTrainedTokenizerBase,
                max_model_len: int | None = None) -> RolloutEngine:
    """The engine `rollout.engine` names, generating with `model`'s weights. `max_model_len`
    (prompt + response tokens) sizes vLLM's requests; None: the model's context."""
    if options.engine == "hf":
        dtype = getattr(torch, options.dtype)
        return HFEngine(model, tokenizer.pad_token_id, tokenizer.eos_token_id, options.generate_batch_size, dtype)
    if options.engine == "vllm":
        from rlvr.engines.vllm import VLLMEngine

        context = getattr(model.config, "max_position_embeddings", None) or 4096
        return VLLMEngine(model, tokenizer, min(max_model_len or context, context), options)
    raise ValueError(f"rollout.engine={options.engine!r}; choose one of {list(ENGINES)}")
