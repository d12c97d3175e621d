"""LoRA and QLoRA (rlvr.adapters) through the real entry point on the tiny model, and rlvr.export.

One LoRA run (3 steps, a checkpoint after each) is shared: its base stays bit-identical, its
checkpoints hold the adapter only, a run killed after step 1 resumes to the same steps, and its
export (and a full run's) loads with from_pretrained and answers as rlvr.evaluate on the checkpoint."""

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from transformers import AutoModelForCausalLM

from rlvr import adapters, checkpoints
from rlvr.cli import check_config, check_overrides, grpo_config
from rlvr.errors import UserError
from rlvr.evaluate import evaluate
from rlvr.export import export
from rlvr.grpo import GRPOConfig
from rlvr.models import ModelSpec, load_model, tiny_tokenizer
from rlvr.module import GRPOModule
from rlvr.train import CONF_DIR, train
from tiny import TINY, compose_config, trained_steps

ROOT = Path(__file__).resolve().parents[1]
STEPS = 3
COMMON = [*TINY, "mode=quick", f"steps={STEPS}", "save_every=1", "seed=2", "optim.lr=1e-3", "samples.every=null"]
COMPARED = ["reward/total", "train/loss", "train/grad_norm", "train/kl", "response_length/mean"]


def assert_same_steps(rows, reference):
    assert [r["step"] for r in rows] == [r["step"] for r in reference]  # every step once
    for a, b in zip(rows, reference, strict=True):
        for key in COMPARED:
            assert float(a[key]) == pytest.approx(float(b[key]), rel=1e-5, abs=1e-7), (a["step"], key)


class KeepPolicy(L.Callback):
    def on_train_end(self, trainer, pl_module):
        self.policy = pl_module.policy


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    run_dir = tmp_path_factory.mktemp("lora")
    keep = KeepPolicy()
    train(compose_config(*COMMON, "adapter=lora", f"output_dir={run_dir}"), extra_callbacks=[keep])
    return run_dir, keep.policy


# -- the config ------------------------------------------------------------------------------------


def test_the_adapter_group_and_its_checks():
    cfg = compose_config(*TINY, "adapter=qlora")
    assert (cfg.adapter.kind, cfg.adapter.rank, cfg.adapter.alpha, cfg.adapter.quantize) == ("qlora", 16, 32, "nf4")
    assert compose_config(*TINY).adapter.kind == "none"
    assert compose_config("gpu=l4", "model=qwen2.5-math-7b", "adapter=qlora").adapter.quantize == "nf4"
    with pytest.raises(UserError, match="adapter.rank belongs to adapter=lora; this run has adapter=none"):
        check_overrides(["adapter.rank=8"])
    with pytest.raises(UserError, match="adapter=lorra is not a adapter; choose one of lora, none, qlora"):
        check_overrides(["adapter=lorra"])
    with pytest.raises(UserError, match="adapter=lora with trainer.strategy=fsdp2 is not supported"):
        check_config(compose_config(*TINY, "adapter=lora", "trainer.strategy=fsdp2", "devices=2"))
    with pytest.raises(UserError, match="adapter.quantize='int3'; choose null or nf4"):
        check_config(compose_config(*TINY, "adapter=lora", "adapter.quantize=int3"))
    assert adapters.lightning_precision("bf16-true", adapters.AdapterSpec("qlora")) == "32-true"
    assert adapters.lightning_precision("bf16-true", adapters.AdapterSpec()) == "bf16-true"
    assert adapters.lightning_precision("bf16-mixed", adapters.AdapterSpec("lora")) == "bf16-mixed"
    # optim.adapter_lr is an adapter run's learning rate (the cpu profile sets one); null falls back to optim.lr
    cpu = compose_config("gpu=cpu", "adapter=lora")
    assert cpu.optim.adapter_lr is not None and grpo_config(cpu).lr == cpu.optim.adapter_lr != cpu.optim.lr
    assert grpo_config(compose_config("gpu=cpu")).lr == cpu.optim.lr
    assert grpo_config(compose_config(*TINY, "adapter=lora")).lr == compose_config(*TINY).optim.lr


# -- the 4-bit base and the reference, on tensors ------------------------------------------------------


def test_nf4_on_cpu_is_four_bits_and_its_forward_is_the_round_trip_weights():
    tokenizer = tiny_tokenizer()
    plain = load_model(ModelSpec("tiny"), tokenizer)
    rounded = adapters.nf4_round_trip(load_model(ModelSpec("tiny"), tokenizer))
    quantized = adapters.quantize_nf4(load_model(ModelSpec("tiny"), tokenizer))
    layer = quantized.model.layers[0].mlp.up_proj
    assert layer.weight.dtype == torch.uint8 and layer.weight.numel() * 2 == plain.model.layers[0].mlp.up_proj.weight.numel()
    reference = rounded.model.layers[0].mlp.up_proj.weight
    assert not torch.equal(reference, plain.model.layers[0].mlp.up_proj.weight)  # 4 bits lose something
    assert torch.equal(adapters.dense(layer.weight), reference)
    ids = torch.tensor([[5, 17, 99, 3, 42]])
    for model in (rounded, quantized):
        model.eval()
    with torch.no_grad():  # eval mode and no grad (the engine's case), then training mode
        assert torch.allclose(quantized(ids).logits, rounded(ids).logits, atol=1e-5)
    quantized.train()
    assert torch.allclose(quantized(ids).logits, rounded(ids).logits, atol=1e-5)


def test_the_reference_is_the_base_with_the_adapter_off_and_only_the_adapter_is_optimized():
    tokenizer = tiny_tokenizer()
    base = load_model(ModelSpec("tiny"), tokenizer)
    ids = torch.tensor([[5, 17, 99, 3, 42, 7]])
    with torch.no_grad():
        expected = F.log_softmax(base(ids).logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    policy = adapters.apply(base, adapters.AdapterSpec("lora", rank=4))
    with torch.no_grad():
        for name, param in policy.named_parameters():
            if "lora_B" in name:
                param.normal_()  # an adapter that changes the output
    module = GRPOModule(policy, GRPOConfig(kl_coef=0.001), batch_size=1)
    args = (ids, torch.ones_like(ids), torch.arange(6)[None], torch.arange(5)[None], 1.0, 512, False)
    with torch.no_grad():
        reference, _ = module._reference.logprobs(*args)
        adapted, _ = module._policy_logprobs(*args)
    assert torch.allclose(reference, expected, atol=1e-5)
    assert not torch.allclose(adapted, expected, atol=1e-3)
    assert module._reference.model is None  # no copy of the model
    optimized = module.configure_optimizers()["optimizer"].param_groups[0]["params"]
    assert {id(p) for p in optimized} == {id(p) for n, p in policy.named_parameters() if "lora_" in n}
    assert all(p.dtype == torch.float32 for p in optimized)


# -- runs ------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_lora_run_keeps_its_base_and_checkpoints_only_the_adapter(lora_run):
    run_dir, policy = lora_run
    initial = load_model(ModelSpec("tiny"), tiny_tokenizer())
    trained_base = dict(adapters.base_weights(policy))
    assert trained_base.keys() == dict(initial.named_parameters()).keys()
    assert all(torch.equal(trained_base[name], p) for name, p in initial.named_parameters())
    assert any(float(p.abs().max()) > 0 for n, p in policy.named_parameters() if "lora_B" in n)  # it trained

    ckpt = checkpoints.load(run_dir / "checkpoints" / "last.ckpt")
    assert ckpt["state_dict"] and all("lora_" in key for key in ckpt["state_dict"])
    assert set(ckpt["state_dict"]) == {f"policy.{n}" for n, p in policy.named_parameters() if p.requires_grad}
    assert len(ckpt["optimizer_states"][0]["state"]) == len(ckpt["state_dict"])  # moments for the adapter only
    assert ckpt["hyper_parameters"]["adapter"]["kind"] == "lora" and ckpt["hyper_parameters"]["model"]["name"] == "tiny"
    assert len(trained_steps(run_dir)) == STEPS


@pytest.mark.slow
def test_a_lora_run_killed_after_step_1_resumes_to_the_same_steps(tmp_path, lora_run):
    killed = subprocess.run(
        [sys.executable, "tests/kill_at.py", "update", "1", *COMMON, "adapter=lora", f"output_dir={tmp_path}"],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=600,
    )
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert checkpoints.load(tmp_path / "checkpoints" / "last.ckpt")["global_step"] == 1
    train(compose_config(*COMMON, "adapter=lora", f"output_dir={tmp_path}", "ckpt_path=last"))
    assert_same_steps(trained_steps(tmp_path), trained_steps(lora_run[0]))


@pytest.mark.slow
def test_qlora_trains_two_steps_and_resumes_exactly(tmp_path):
    qlora = [*COMMON, "adapter=qlora", "steps=2"]
    train(compose_config(*qlora, f"output_dir={tmp_path / 'whole'}"))
    train(compose_config(*qlora, "steps=1", f"output_dir={tmp_path / 'halves'}"))
    train(compose_config(*qlora, f"output_dir={tmp_path / 'halves'}", "ckpt_path=last"))
    assert_same_steps(trained_steps(tmp_path / "halves"), trained_steps(tmp_path / "whole"))
    ckpt = checkpoints.load(tmp_path / "whole" / "checkpoints" / "last.ckpt")
    assert all("lora_" in key for key in ckpt["state_dict"])
    assert float(trained_steps(tmp_path / "whole")[1]["train/grad_norm"]) > 0


# -- export ----------------------------------------------------------------------------------------------


def greedy_answers(tmp_path: Path, name: str, model: str) -> list[str]:
    key = "checkpoint" if model.endswith(".ckpt") else "model.name"
    output = tmp_path / f"{name}.json"
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="evaluate", overrides=[
            f"{key}={model}", "benchmarks=[gsm8k]", "limit=10", "sampling.temperature=0", "sampling.max_new_tokens=24",
            f"output={output}", f"output_dir={tmp_path}", "reward.workers=0"])
    evaluate(cfg)
    return [json.loads(line)["response"] for line in output.with_suffix(".samples.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_export_of_a_full_and_an_adapter_checkpoint_loads_and_answers_as_the_checkpoint(tmp_path, lora_run):
    full_run = tmp_path / "full"
    train(compose_config(*COMMON, "steps=1", f"output_dir={full_run}"))
    for name, ckpt in (("full", full_run / "checkpoints" / "last.ckpt"),
                       ("lora", lora_run[0] / "checkpoints" / "last.ckpt")):
        out = export(ckpt, tmp_path / f"{name}-hf", dtype="float32")
        model = AutoModelForCausalLM.from_pretrained(out)
        assert model.dtype == torch.float32 and (out / "chat_template.jinja").is_file()
        assert (out / "adapter" / "adapter_config.json").is_file() == (name == "lora")
        answers = greedy_answers(tmp_path, f"{name}-ckpt", str(ckpt))
        assert len(answers) == 10 and greedy_answers(tmp_path, f"{name}-export", str(out)) == answers, name
    assert AutoModelForCausalLM.from_pretrained(export(ckpt, tmp_path / "bf16")).dtype == torch.bfloat16  # the default

    from peft import PeftModel  # the adapter folder on its base gives the merged model's logits

    ids = torch.tensor([[5, 17, 99, 3, 42]])
    peft = PeftModel.from_pretrained(load_model(ModelSpec("tiny"), tiny_tokenizer()), tmp_path / "lora-hf" / "adapter")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "lora-hf")
    with torch.no_grad():
        assert torch.allclose(peft(ids).logits, merged(ids).logits, atol=1e-5)


def test_export_refuses_a_folder_that_is_not_empty_and_names_bad_input(tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("x")
    for argv, message in (([str(tmp_path / "none.ckpt"), str(tmp_path / "out")], "error: no checkpoint at"),
                          ([str(tmp_path / "none.ckpt"), str(tmp_path / "taken")], "is not an empty folder"),
                          ([str(tmp_path / "none.ckpt"), str(tmp_path / "out"), "--dtype", "int8"], "--dtype int8; choose")):
        done = subprocess.run([sys.executable, "-m", "rlvr.export", *argv], cwd=ROOT, capture_output=True, text=True,
                              env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
        assert done.returncode == 2 and message in done.stderr.strip().splitlines()[-1], done.stderr[-2000:]
