"""What benchmarks/memory.py models by hand, checked against the libraries it stands in for: the
NF4 storage against bitsandbytes', the adapter's and the model's parameter counts against PEFT's
and transformers', the worst micro-batch against rlvr's packer; and the L4 QLoRA 7B command composes."""

import importlib.util
import math
from pathlib import Path

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from rlvr import adapters, grpo
from rlvr.cli import check_adapter, grpo_config
from tiny import compose_config

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("memory_benchmark", ROOT / "benchmarks" / "memory.py")
memory = importlib.util.module_from_spec(spec)
spec.loader.exec_module(memory)
SMALL = dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=320, tie_word_embeddings=False)


@pytest.mark.parametrize("shape", [(8960, 1536), (256, 128), (100, 30)])  # the last: blocks do not divide evenly
def test_the_nf4_storage_is_what_bitsandbytes_stores(shape):
    import bitsandbytes.functional as bnbf

    weight = torch.randn(shape, dtype=torch.bfloat16)
    packed, state = bnbf.quantize_4bit(weight, blocksize=adapters.NF4_BLOCKSIZE, quant_type="nf4",
                                       compress_statistics=adapters.DOUBLE_QUANT)
    stored = [packed, state.absmax, state.state2.absmax, state.state2.code, state.code, state.offset]
    assert [(tuple(t.shape), t.dtype) for t in stored] == memory.nf4_tensors(weight.numel())
    modelled = sum(math.prod(s) * torch.empty(0, dtype=d).element_size() for s, d in memory.nf4_tensors(weight.numel()))
    if shape == (8960, 1536):  # 4 bits + an 8-bit absmax per 64 + a float32 per 256 of those, + 1,092 bytes of tables
        assert modelled == weight.numel() * (0.5 + 1 / 64 + 4 / (64 * 256)) + 1092


def test_the_parameter_counts_are_transformers_and_peft_ones():
    from peft import LoraConfig, get_peft_model

    with torch.device("meta"):
        model = Qwen2ForCausalLM(Qwen2Config(**SMALL))
    assert memory.parameter_count(SMALL) == sum(p.numel() for p in model.parameters())
    lora = adapters.AdapterSpec("lora")
    with torch.device("meta"):
        peft = get_peft_model(model, LoraConfig(r=lora.rank, target_modules=list(lora.target_modules)))
    assert memory.lora_parameters(SMALL, lora) == sum(p.numel() for p in peft.parameters() if p.requires_grad)


def test_the_worst_micro_batch_is_what_the_packer_makes_of_full_length_rows():
    cfg = compose_config("gpu=l4", "rollout.max_new_tokens=1024")
    prompts = [[1] * 301, [1] * 40]
    assert cfg.grpo.micro_batch_tokens == 5300
    assert memory.worst_micro_batch(cfg, prompts) == (4, 1325)  # 5300 // 1325
    assert len(grpo.token_budget_micro_batches([1325] * 128, 5300)[0]) == 4
    assert memory.worst_micro_batch(compose_config("gpu=l4", "grpo.micro_batch_tokens=1000"), prompts) == (1, 1325)
    assert memory.worst_micro_batch(compose_config("gpu=l4", "grpo.micro_batch_tokens=null"), prompts) == (4, 1325)


def test_gpu_l4_with_qwen_7b_and_qlora_composes_and_passes_the_adapter_checks():
    cfg = compose_config("gpu=l4", "model=qwen2.5-math-7b", "adapter=qlora")
    assert (cfg.model.name, cfg.adapter.quantize, cfg.trainer.precision) == ("Qwen/Qwen2.5-Math-7B", "nf4", "bf16-true")
    check_adapter(cfg)  # peft and bitsandbytes are installed here
    assert grpo_config(cfg).micro_batch_tokens == 5300
    assert adapters.lightning_precision(cfg.trainer.precision, adapters.AdapterSpec.from_config(cfg.adapter)) == "32-true"
