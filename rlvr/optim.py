"""Optimizers by name (`optim.name`): torch's AdamW, or torchao's leaner AdamW variants.

Full-parameter AdamW keeps two fp32 moments per weight: 12.3 GB for Qwen2.5-Math-1.5B, more than
the weights. torchao's AdamW8bit / AdamW4bit quantize the moments block-wise (about 1/4 and 1/8
of that), and `bf16_stochastic_round` lets weights live in bf16 (`trainer.precision=bf16-true`)
without losing the small updates plain rounding to bf16 would drop. torchao runs on CPU and CUDA,
so every option is tested here; install it with the `lean` extra.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

OPTIMIZERS = ("adamw", "adamw8bit", "adamw4bit")
MISSING = 'optim.name={name} needs torchao: pip install -e ".[lean]"'


def make_optimizer(
    name: str,
    params: Iterable[torch.nn.Parameter],
    lr: float,
    betas: tuple[float, float] = (0.9, 0.999),
    weight_decay: float = 0.01,
    bf16_stochastic_round: bool = False,
) -> torch.optim.Optimizer:
    if name not in OPTIMIZERS:
        raise ValueError(f"optim.name={name!r}; choose one of {list(OPTIMIZERS)}")
    options = dict(lr=lr, betas=tuple(betas), weight_decay=weight_decay)
    if name == "adamw" and not bf16_stochastic_round:
        return torch.optim.AdamW(params, **options)
    try:
        import torchao.optim as ao
    except ImportError as error:
        raise ImportError(MISSING.format(name=name)) from error
    cls = {"adamw": ao._AdamW, "adamw8bit": ao.AdamW8bit, "adamw4bit": ao.AdamW4bit}[name]
    return cls(params, bf16_stochastic_round=bf16_stochastic_round, **options)
