"""LoRA and QLoRA: a PEFT adapter on a frozen base, and the base in 4 bits (bitsandbytes NF4).

- `adapter=lora`: PEFT's LoRA on every attention and MLP linear layer (`adapter.target_modules`); the
  base is frozen, the adapter's weights are the only ones optimized, clipped and checkpointed, and
  stay float32 whatever the base's dtype.
- `adapter=qlora`: the same over a base whose decoder linears are NF4 (bitsandbytes, on CUDA and on
  CPU alike: bitsandbytes >= 0.49 quantizes and de-quantizes NF4 on CPU in plain torch). The LM head
  and the embeddings stay in the compute dtype, as in QLoRA.
- Precision: `trainer.precision` names the base's dtype (bf16-* -> bfloat16). Lightning's *-true
  plugins cast the whole module, which would make the adapter bf16 and cannot cast a 4-bit base, so
  an adapter run gives Lightning 32-true instead (`lightning_precision`): the base is loaded in its
  dtype, the adapter stays float32, and PEFT casts each layer's input to the adapter's dtype and its
  output back to the base's. Mixed precision (autocast) is passed on as it is.
- The KL reference is the base itself: the policy with its adapter switched off (`disable_adapter`).
- Merging (evaluation, export, the engine's base) never re-quantizes: a 4-bit base is de-quantized
  first, to the very weights the trainer's forward multiplies with, and the adapter is added to them.
"""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

KINDS = ("none", "lora", "qlora")
QUANTIZE = (None, "nf4")
NF4_BLOCKSIZE = 64  # bitsandbytes' default, on CPU and CUDA: 64 weights share one absmax constant
DOUBLE_QUANT = True  # QLoRA's double quantization: the absmax constants themselves in 8 bits (Params4bit's default)
MISSING_PEFT = 'adapter=lora|qlora needs peft (and bitsandbytes for adapter.quantize=nf4): pip install -e ".[adapter]"'


@dataclass(frozen=True)
class AdapterSpec:
    """What conf/adapter/*.yaml describes; `kind: none` is a full-parameter run."""

    kind: str = "none"
    rank: int = 16
    alpha: float = 32
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj",
                                                               "gate_proj", "up_proj", "down_proj"])
    quantize: str | None = None  # null | nf4

    @classmethod
    def from_config(cls, adapter: Mapping[str, Any] | None) -> AdapterSpec:
        return cls(**dict(adapter or {}))

    @property
    def enabled(self) -> bool:
        return self.kind != "none"


def check(spec: AdapterSpec, strategy: str) -> str | None:
    """Why this adapter setting cannot run (one line), or None."""
    if spec.kind not in KINDS:
        return f"adapter.kind={spec.kind!r}; choose one of {', '.join(KINDS)}"
    if not spec.enabled:
        return None
    if spec.quantize not in QUANTIZE:
        return f"adapter.quantize={spec.quantize!r}; choose null or nf4"
    if not (isinstance(spec.rank, int) and spec.rank > 0) or not spec.alpha > 0 or not 0 <= spec.dropout < 1:
        return (f"adapter.rank={spec.rank}, adapter.alpha={spec.alpha}, adapter.dropout={spec.dropout}: the rank "
                "and alpha must be positive and the dropout in [0, 1)")
    if str(strategy) == "fsdp2":
        return (f"adapter={spec.kind} with trainer.strategy=fsdp2 is not supported (the adapter is a few MB: "
                "every rank holds it whole); use trainer.strategy=ddp")
    if importlib.util.find_spec("peft") is None or (spec.quantize and importlib.util.find_spec("bitsandbytes") is None):
        return MISSING_PEFT
    return None


def lightning_precision(precision: str, spec: AdapterSpec) -> str:
    """What Lightning runs at: an adapter run's *-true precision becomes 32-true (the base is loaded
    in that dtype instead, and the adapter stays float32); anything else is passed on."""
    return "32-true" if spec.enabled and str(precision).endswith("-true") else str(precision)


# ---------------------------------------------------------------------------------------------
# Building the adapted policy
# ---------------------------------------------------------------------------------------------


def _decoder_linears(model: nn.Module) -> Iterator[tuple[nn.Module, str, nn.Linear]]:
    """(parent, attribute, linear) for every nn.Linear inside the decoder layers (not the LM head)."""
    for layer in model.get_decoder().layers:
        for module in layer.modules():
            for name, child in module.named_children():
                if type(child) is nn.Linear:
                    yield module, name, child


def quantize_nf4(model: nn.Module) -> nn.Module:
    """Replace the decoder's linears by bitsandbytes NF4 ones (in place): 4 bits a weight plus one
    absmax constant per 64 weights (itself 8-bit, double quantization); the compute dtype is the model's."""
    import bitsandbytes as bnb

    for parent, name, linear in list(_decoder_linears(model)):
        quantized = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                      compute_dtype=linear.weight.dtype, quant_type="nf4", device="meta")
        quantized.weight = bnb.nn.Params4bit(linear.weight.data, requires_grad=False, quant_type="nf4",
                                             blocksize=NF4_BLOCKSIZE, compress_statistics=DOUBLE_QUANT)
        if linear.bias is not None:
            quantized.bias = nn.Parameter(linear.bias.data, requires_grad=False)
        # On an AVX512-BF16 CPU, bitsandbytes repacks the weight for inference at the first eval-mode
        # forward, for good: the training forward then fails (an in-place bias add on a leaf) and
        # generation would multiply differently from training. One layout, one kernel, always.
        quantized.support_avx512bf16_for_cpu = False
        setattr(parent, name, quantized.to(linear.weight.device))  # the move quantizes
    return model


def nf4_round_trip(model: nn.Module) -> nn.Module:
    """Each decoder linear's weight quantized to NF4 and de-quantized again (in place): the plain
    weights a QLoRA trainer's forward multiplies with, for merging without re-quantizing."""
    import bitsandbytes.functional as bnbf

    with torch.no_grad():
        for _, _, linear in _decoder_linears(model):
            packed, state = bnbf.quantize_4bit(linear.weight.data, blocksize=NF4_BLOCKSIZE, quant_type="nf4",
                                               compress_statistics=DOUBLE_QUANT)
            linear.weight.copy_(bnbf.dequantize_4bit(packed, state))
    return model


def apply(model: nn.Module, spec: AdapterSpec, seed: int = 0, quantized: bool | None = None) -> nn.Module:
    """The policy for an adapter run: `model` (frozen, quantized when `quantized`, by default when
    the spec says nf4) wrapped by PEFT with a fresh float32 LoRA adapter, initialized from `seed`
    (without moving the caller's random streams)."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as error:
        raise ImportError(MISSING_PEFT) from error
    if spec.quantize if quantized is None else quantized:
        quantize_nf4(model)
    model.requires_grad_(False)
    config = LoraConfig(r=spec.rank, lora_alpha=spec.alpha, lora_dropout=spec.dropout,
                        target_modules=list(spec.target_modules), bias="none", task_type="CAUSAL_LM")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        policy = get_peft_model(model, config)
    for param in policy.parameters():
        if param.requires_grad:
            param.data = param.data.float()
    return policy


def is_adapted(model: nn.Module) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")


def rank(model: nn.Module) -> int:
    return int(model.peft_config["default"].r)


def trainable(model: nn.Module) -> list[nn.Parameter]:
    """The parameters the optimizer steps and the clip sees: all of a full run's, an adapter's only."""
    return [p for p in model.parameters() if p.requires_grad]


def trainable_names(model: nn.Module) -> set[str]:
    return {name for name, p in model.named_parameters() if p.requires_grad}


def adapter_off(model: nn.Module) -> contextlib.AbstractContextManager:
    """The base's forward: the adapter switched off (the KL reference of an adapter run)."""
    return model.disable_adapter()


# ---------------------------------------------------------------------------------------------
# What leaves the trainer: the base by Hugging Face name, the adapter, the merged model
# ---------------------------------------------------------------------------------------------


def hf_name(peft_name: str) -> str:
    """A base weight's Hugging Face name from its name inside the PEFT model."""
    return peft_name.removeprefix("base_model.model.").replace(".base_layer.", ".")


def dense(param: torch.Tensor) -> torch.Tensor:
    """A weight as the forward uses it: an NF4 one de-quantized, anything else itself."""
    state = getattr(param, "quant_state", None)
    if state is None:
        return param.detach()
    import bitsandbytes.functional as bnbf

    return bnbf.dequantize_4bit(param.data, state)


def base_weights(policy: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """The frozen base's weights by Hugging Face name, de-quantized (no adapter in them)."""
    for name, param in policy.named_parameters():
        if not param.requires_grad:
            yield hf_name(name), dense(param)


def merged_weights(policy: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """Each adapted module's weight with the adapter added (W + scale * B @ A, on the de-quantized
    base), and its bias, by Hugging Face name: all an engine holding the base needs after an update."""
    from peft.tuners.lora import LoraLayer

    with torch.no_grad():
        for name, module in policy.named_modules():
            if not isinstance(module, LoraLayer):
                continue
            base = module.get_base_layer()
            hf = hf_name(f"{name}.")
            weight = dense(base.weight)
            for adapter in module.active_adapters:
                weight = weight + module.get_delta_weight(adapter).to(weight.dtype)
            yield f"{hf}weight", weight
            if base.bias is not None:
                yield f"{hf}bias", base.bias.detach()


def peft_folder(policy: nn.Module, folder: str) -> None:
    """The adapter in PEFT's format (adapter_config.json, adapter_model.safetensors): what vLLM's
    LoRA support and PeftModel.from_pretrained read."""
    policy.save_pretrained(folder, save_embedding_layers=False)  # no hub lookup of the base's vocabulary


def merged(policy: nn.Module) -> nn.Module:
    """The plain Hugging Face model with the adapter added to its (de-quantized) base; `policy`
    must hold no 4-bit layers (checkpoint loading builds it on the NF4 round trip instead)."""
    return policy.merge_and_unload()
