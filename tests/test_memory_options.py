"""Each memory-lean option of the training side trains the tiny model through the real config and
resumes exactly: torchao's 8-bit and 4-bit AdamW, bf16 weights with stochastic rounding, a bf16 KL
reference, gradient checkpointing."""


import pytest
import torch

from rlvr import checkpoints
from rlvr.train import train
from tiny import TINY, compose_config, trained_steps

pytest.importorskip("torchao", reason='the lean optimizers need torchao: pip install -e ".[lean]"')

COMMON = [*TINY, "mode=quick", "seed=1", "save_every=1", "samples.every=null", "optim.lr=1e-3"]
COMPARED = ["reward/total", "train/loss", "train/grad_norm", "train/kl", "response_length/mean"]
OPTIONS = {
    "adamw8bit": ["optim.name=adamw8bit"],
    "adamw4bit": ["optim.name=adamw4bit"],
    "bf16-weights": ["trainer.precision=bf16-true", "optim.bf16_stochastic_round=true", "grpo.reference_dtype=bfloat16"],
    "bf16-reference": ["grpo.reference_dtype=bfloat16"],
    "checkpointing": ["model.gradient_checkpointing=true"],
}


def config(*overrides):
    return compose_config(*COMMON, *overrides)



@pytest.mark.parametrize("name", OPTIONS)
def test_a_memory_option_trains_and_resumes_exactly(tmp_path, name):
    """Two steps straight; then step 2 again from the straight run's step-1 checkpoint, in a new folder."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(config(*OPTIONS[name], "steps=2", f"output_dir={straight}"))
    step_1 = straight / "checkpoints" / "step-1.ckpt"
    train(config(*OPTIONS[name], "steps=2", f"ckpt_path={step_1}", f"output_dir={resumed}"))

    (again,), reference = trained_steps(resumed), trained_steps(straight)
    assert [r["step"] for r in reference] == ["0", "1"] and again["step"] == "1"
    for key in COMPARED:
        assert float(again[key]) == pytest.approx(float(reference[1][key]), rel=1e-5, abs=1e-7), (name, key)
    first = checkpoints.load(step_1)["state_dict"]
    last = checkpoints.load(resumed / "checkpoints" / "last.ckpt")["state_dict"]
    assert any(not torch.equal(first[k], last[k]) for k in first if k.startswith("policy."))  # it did train
    if name == "bf16-weights":
        assert all(v.dtype == torch.bfloat16 for k, v in last.items() if k.startswith("policy."))
