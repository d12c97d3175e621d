"""The GRPO module, the HF engine and the rollout callback on a tiny random model."""

import copy
import math
import os
import subprocess
import sys
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from callbacks.rollout import RolloutCallback
from rlvr import adapters
from rlvr.data import PromptDataModule, load_examples
from rlvr import grpo
from rlvr.engines.hf import HFEngine
from rlvr.engines.protocol import Generation, SamplingParams
from rlvr.errors import UserError
from rlvr.grpo import GRPOConfig
from rlvr.models import ModelSpec, load_model, tiny_tokenizer
from rlvr.module import GRPOModule, layout, row_lengths
from rlvr.rewards import RewardBatch
from rlvr.rollout import pack_rollout


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def make_policy(tokenizer, seed=0):
    return load_model(ModelSpec("tiny", init_seed=seed), tokenizer)


def generated(completions):
    """A Generation whose engine log-probs are all 0 (nothing reads them in these tests)."""
    return Generation(completions, [[0.0] * len(c) for c in completions])


def rewards_for(values):
    t = torch.tensor(values, dtype=torch.float32)
    return RewardBatch(t, torch.zeros_like(t), torch.zeros_like(t), t, 0)


def test_pack_rollout_layout():
    prompts = [[1, 2, 3], [4]]
    completions = [[5, 9], [6], [7, 8, 9], [9]]  # n = 2; 9 is EOS
    gen = Generation(completions, [[-0.5, -0.25], [-1.0], [-1.0, -2.0, -3.0], [-4.0]])
    r = pack_rollout(prompts, gen, n=2, pad_id=0, eos_ids=[9], rewards=rewards_for([0, 0, 0, 0]))
    assert r.input_ids.tolist() == [[1, 2, 3, 5, 9, 0], [1, 2, 3, 6, 0, 0], [0, 0, 4, 7, 8, 9], [0, 0, 4, 9, 0, 0]]
    assert r.attention_mask.tolist()[2] == [0, 0, 1, 1, 1, 1]
    assert r.response_mask.tolist() == [[1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 0, 0]]
    assert r.engine_logprobs.tolist() == [[-0.5, -0.25, 0], [-1, 0, 0], [-1, -2, -3], [-4, 0, 0]]
    assert r.truncated.tolist() == [False, True, False, False]
    assert r.prompt_width == 3


# Rows 0 and 1 share a 4-token prompt, 2 and 3 a 2-token one: rows of 7, 5, 8 and 3 tokens. Padded, one
# row a lane (8 wide); one sequence of all four, each with its prompt; lanes, where rows of one prompt
# side by side share one copy of it (a response sees the prompt and itself): 7, 5, then the 2-token
# prompt and both responses; both pairs so (8 and 9 wide); rows of different prompts in one lane.
# The same under eager attention, which adds its 4-D mask to the scores.
LAYOUTS = [(False, [[0], [1], [2], [3]], "sdpa"), ("sequence", [[0, 1, 2, 3]], "sdpa"),
           ("lanes", [[0], [1], [2, 3]], "sdpa"), ("lanes", [[0, 1], [2, 3]], "sdpa"),
           ("lanes", [[1, 2], [0], [3]], "sdpa"), ("lanes", [[3, 2, 1, 0]], "sdpa"), ("lanes", [[0, 1], [2, 3]], "eager")]


@pytest.mark.parametrize(("pack", "lanes", "attention"), LAYOUTS, ids=[f"{p}-{l}-{a}" for p, l, a in LAYOUTS])
def test_logprobs_of_padded_or_packed_rows_match_an_unpadded_forward(tokenizer, pack, lanes, attention):
    policy = load_model(ModelSpec("tiny", attn_implementation=attention), tokenizer)
    module = GRPOModule(policy, GRPOConfig(n=2, kl_coef=0.0, pack=pack), batch_size=2)
    prompts, completions = [[10, 11, 12, 13], [14, 15]], [[20, 21, 22], [30], [40, 41, 42, 43, 44, 45], [50]]
    rollout = pack_rollout(prompts, generated(completions), 2, tokenizer.pad_token_id, [tokenizer.eos_token_id],
                           rewards_for([0, 0, 0, 0]))
    order = [row for lane in lanes for row in lane]
    with torch.no_grad():
        logp, entropy, mask = module._logprobs(module._policy_logprobs, rollout, lanes, entropy=True)
        for row, completion in enumerate(completions):
            prompt = prompts[row // 2]
            ids = torch.tensor([prompt + completion])
            logits = policy(input_ids=ids).logits[0, len(prompt) - 1 : -1]  # predicts the completion
            expected = logits.log_softmax(-1).gather(-1, torch.tensor(completion)[:, None]).squeeze(-1)
            expected_entropy = torch.distributions.Categorical(logits=logits).entropy()
            assert torch.allclose(logp[order.index(row), : len(completion)], expected, atol=1e-5)
            assert torch.allclose(entropy[order.index(row), : len(completion)], expected_entropy, atol=1e-5)
    assert mask.sum(dim=1).tolist() == [len(completions[row]) for row in order]
    assert (logp[mask == 0] == 0).all()  # past a response: nothing computed


def _one_step_grad(tokenizer, micro_batch_size, loss_agg):
    policy = make_policy(tokenizer)
    config = GRPOConfig(n=2, micro_batch_size=micro_batch_size, kl_coef=0.0, entropy_coef=0.0, loss_agg=loss_agg,
                        max_new_tokens=4, tis_cap=None)
    module = GRPOModule(policy, config, batch_size=2)
    prompts, completions = [[10, 11], [12, 13, 14]], [[20, 21, 22, 23], [30], [40, 41], [50, 51, 52]]
    rollout = pack_rollout(prompts, generated(completions), 2, tokenizer.pad_token_id, [tokenizer.eos_token_id],
                           rewards_for([1, 0, 0, 1]))
    module.manual_backward = lambda loss: loss.backward()
    advantages = torch.tensor([1.0, -1.0, -1.0, 1.0])
    num_tokens = float(rollout.response_mask.sum())
    for start in range(0, 4, micro_batch_size):
        lanes = [[row] for row in range(start, min(start + micro_batch_size, 4))]  # padded rows
        module._micro_step(rollout, lanes, advantages, None, None, num_tokens, 4.0, num_tokens)
    return torch.cat([p.grad.flatten() for p in policy.parameters() if p.grad is not None])


@pytest.mark.parametrize("loss_agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_micro_batching_gives_the_full_batch_gradient(tokenizer, loss_agg):
    whole = _one_step_grad(tokenizer, 4, loss_agg)
    split = _one_step_grad(tokenizer, 1, loss_agg)
    assert whole.abs().sum() > 0
    assert torch.allclose(whole, split, atol=1e-6)


class OneProcess:
    """What GRPOModule.training_step asks of a Lightning trainer, in one process."""

    world_size = 1
    is_global_zero = True

    class strategy:  # noqa: N801
        reduce = staticmethod(lambda tensor, reduce_op=None: tensor)
        reduce_boolean_decision = staticmethod(lambda decision, all=True: decision)  # noqa: A002


def _one_update(tokenizer, rollout, **config):
    """One training_step (one update) of a fresh tiny policy -> (what it logged, the gradient it stepped with)."""
    policy = make_policy(tokenizer)
    module = GRPOModule(policy, GRPOConfig(**{"n": 4, "kl_coef": 0.01, "max_new_tokens": 12, **config}), batch_size=2)
    module._trainer = OneProcess()
    optimizer = torch.optim.SGD(policy.parameters(), lr=0.0)
    stepped = []
    optimizer.step = lambda: stepped.append(torch.cat([torch.zeros_like(p).flatten() if p.grad is None else p.grad.flatten()
                                                       for p in policy.parameters()]))  # no gradient: a skipped update
    module.optimizers = lambda: optimizer
    module.lr_schedulers = lambda: SimpleNamespace(step=lambda: None, get_last_lr=lambda: [0.0])
    module.manual_backward = lambda loss: loss.backward()
    logged = {}
    module.log = lambda key, value, **kwargs: logged.__setitem__(key, value)  # reward/* are torchmetrics
    module.training_step({"rollout": copy.deepcopy(rollout), "step": 0}, 0)
    return module, logged, torch.cat(stepped)  # one gradient per update


@pytest.fixture(scope="module")
def uneven_rollout(tokenizer):
    """2 prompts (3 and 6 tokens) x 4 samples of 2 to 12 tokens, rows of 8 to 15 tokens in all, each length
    once in each group: micro-batches by length mix the groups."""
    prompts = [[10, 11, 12], [13, 14, 15, 16, 17, 18]]
    lengths = [9, 12, 5, 6, 6, 9, 2, 3]
    completions = [[20 + (row + t) % 50 for t in range(n)] for row, n in enumerate(lengths)]
    return pack_rollout(prompts, generated(completions), 4, tokenizer.pad_token_id, [tokenizer.eos_token_id],
                        rewards_for([1, 0, 0, 1, 0, 0, 1, 1]))


@pytest.fixture
def long_tail_rollout(tokenizer):
    """2 prompts (3 and 6 tokens) x 4 samples: rows of 23, 5, 6, 8 and 10, 15, 8, 9 tokens, one long."""
    prompts = [[10, 11, 12], [13, 14, 15, 16, 17, 18]]
    lengths = [20, 2, 3, 5, 4, 9, 2, 3]
    completions = [[20 + (row + t) % 50 for t in range(n)] for row, n in enumerate(lengths)]
    return pack_rollout(prompts, generated(completions), 4, tokenizer.pad_token_id, [tokenizer.eos_token_id],
                        rewards_for([1, 0, 0, 1, 0, 0, 1, 1]))


LOSS_AGGS = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"]


@pytest.mark.parametrize("loss_agg", LOSS_AGGS)
def test_token_budget_micro_batches_give_the_fixed_row_loss_and_gradient(tokenizer, uneven_rollout, loss_agg):
    """The same rollout cut into 4 padded rows per micro-batch; by a budget of 24 tokens, padded rows
    sorted by length (groups mixed); 4 rows as one sequence (grpo.pack=sequence: sdpa under a
    block-diagonal mask, rows of 8 to 15 tokens with no padding); 4 rows in lanes: the same loss and
    gradient, to float rounding (fp32)."""
    _, fixed, fixed_grad = _one_update(tokenizer, uneven_rollout, micro_batch_size=4, loss_agg=loss_agg, pack=False)
    module, budget, budget_grad = _one_update(tokenizer, uneven_rollout, micro_batch_tokens=24, loss_agg=loss_agg,
                                              pack=False)
    _, packed, packed_grad = _one_update(tokenizer, uneven_rollout, micro_batch_size=4, loss_agg=loss_agg,
                                         pack="sequence")
    _, lanes, lanes_grad = _one_update(tokenizer, uneven_rollout, micro_batch_size=4, loss_agg=loss_agg, pack="lanes")
    micro = module._micro_batches(uneven_rollout, torch.arange(8))
    assert micro == [[[1]], [[5]], [[0], [4]], [[3], [7]], [[2], [6]]]  # 15, 15, 2 x 12, 2 x 9, 2 x 8 tokens
    lengths = uneven_rollout.attention_mask.sum(dim=1).tolist()
    assert all(len(lanes) == 1 or grpo.padded_tokens(lengths, [r for [r] in lanes]) <= 24 for lanes in micro)
    assert fixed_grad.norm() > 0
    for key in ("train/loss", "train/grad_norm", "train/pg_loss", "train/kl", "train/entropy"):
        for other in (budget, packed, lanes):
            assert other[key] == pytest.approx(fixed[key], rel=1e-5), key
    for grad in (budget_grad, packed_grad, lanes_grad):
        assert torch.allclose(grad, fixed_grad, rtol=1e-5, atol=1e-7)
    assert budget["train/padding_frac"] < fixed["train/padding_frac"]
    assert packed["train/padding_frac"] == 0.0 < fixed["train/padding_frac"]  # the same rows as fixed, unpadded
    assert budget["train/update_tokens_per_s"] > 0


@pytest.mark.parametrize("loss_agg", LOSS_AGGS)
def test_token_budget_lanes_give_the_fixed_row_loss_and_gradient(tokenizer, long_tail_rollout, loss_agg):
    """grpo.pack=auto on sdpa lays a token budget's micro-batches out in lanes, and rows of one prompt
    side by side share it. Budget 46 (rlvr.grpo.lane_micro_batches' hand test): the 3-token prompt once,
    then its four responses (33 tokens); then the 6-token prompt and its four (24). 57 tokens for the
    rows' own 84, where padded rows sorted by length take six micro-batches. The loss and gradient are
    those of fixed rows."""
    _, fixed, fixed_grad = _one_update(tokenizer, long_tail_rollout, micro_batch_size=4, loss_agg=loss_agg, pack=False)
    module, lanes, lanes_grad = _one_update(tokenizer, long_tail_rollout, micro_batch_tokens=46, loss_agg=loss_agg)
    padded_module, padded, _ = _one_update(tokenizer, long_tail_rollout, micro_batch_tokens=46, loss_agg=loss_agg,
                                           pack=False)
    assert module._layout == "lanes"
    assert module._micro_batches(long_tail_rollout, torch.arange(8)) == [[[0, 3, 2, 1]], [[5, 4, 7, 6]]]
    assert len(padded_module._micro_batches(long_tail_rollout, torch.arange(8))) == 6
    assert fixed_grad.norm() > 0
    for key in ("train/loss", "train/grad_norm", "train/pg_loss", "train/kl", "train/entropy"):
        assert lanes[key] == pytest.approx(fixed[key], rel=1e-5), key
    assert torch.allclose(lanes_grad, fixed_grad, rtol=1e-5, atol=1e-7)
    assert lanes["train/padding_frac"] == 0.0 < padded["train/padding_frac"] == pytest.approx(1 / 85)  # 10 + 9 padded
    lengths = row_lengths(long_tail_rollout, torch.arange(8), shared=True)
    assert sum(lengths.tokens(lanes) for lanes in module._micro_batches(long_tail_rollout, torch.arange(8))) == 57


@pytest.mark.parametrize("pack", ["auto", "sequence"])
def test_packing_is_checked_at_fit_start_and_a_model_that_mixes_packed_rows_runs_padded(tokenizer, monkeypatch, pack):
    module = GRPOModule(make_policy(tokenizer), GRPOConfig(n=2, kl_coef=0.0, pack=pack), batch_size=1)
    module._trainer = OneProcess()
    module.on_fit_start()
    assert module._layout == ("lanes" if pack == "auto" else "sequence")  # the tiny model keeps packed rows apart
    # A model whose attention ignores the mask it is given, and positions: plain causal attention
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]
    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS, "sdpa", lambda module, q, k, v, attention_mask, **kw:
                        sdpa(module, q, k, v, None, **{**kw, "is_causal": True}))
    if pack == "auto":
        module.on_fit_start()
        assert module._layout == "rows"
    else:
        with pytest.raises(UserError, match="grpo.pack=sequence: this model lets a row packed beside another attend"):
            module.on_fit_start()


def test_a_sliding_window_model_runs_padded_rows_not_lanes(tokenizer):
    """rlvr's 4-D mask would replace a sliding window's: auto lays such a model out as padded rows."""
    policy = make_policy(tokenizer)
    assert layout("auto", policy) == "lanes"
    policy.config.sliding_window = 16
    assert layout("auto", policy) == "rows" and layout("sequence", policy) == "sequence"
    with pytest.raises(UserError, match="grpo.pack=lanes needs sdpa or eager attention .* and no sliding-window"):
        layout("lanes", policy)


SKIP_CASES = [dict(loss_agg="token-mean"), dict(loss_agg="seq-mean-token-mean"), dict(loss_agg="seq-mean-token-sum-norm"),
              dict(ratio_level="sequence"), dict(mask_truncated=True), dict(micro_batch_tokens=24),
              dict(mini_batch_size=1)]  # the last: two updates a step, the second on old log-probs


@pytest.mark.parametrize("config", SKIP_CASES, ids=[",".join(f"{k}={v}" for k, v in c.items()) for c in SKIP_CASES])
def test_tied_rows_are_skipped_without_changing_the_loss_or_gradient(tokenizer, uneven_rollout, config, monkeypatch):
    """KL 0 and entropy 0: the second group ties, so its rows (advantage 0) are not run, yet they still
    count in the normalizers: the loss and gradient are those of running every row."""
    rollout = copy.deepcopy(uneven_rollout)
    rollout.rewards.total = torch.tensor([1.0, 0, 0, 1, 0.5, 0.5, 0.5, 0.5])
    rollout.truncated = torch.tensor([False, True, False, False, False, True, False, False])  # for mask_truncated
    config = {"kl_coef": 0.0, "entropy_coef": 0.0, "micro_batch_size": 2, **config}
    ran = []
    original = GRPOModule._logprobs
    monkeypatch.setattr(GRPOModule, "_logprobs", lambda self, model, r, lanes, entropy: ran.append(sum(lanes, []))
                        or original(self, model, r, lanes, entropy))
    _, skipped, skipped_grad = _one_update(tokenizer, rollout, **config)
    assert {r for rows in ran for r in rows} == ({0, 2, 3} if config.get("mask_truncated") else {0, 1, 2, 3})
    ran.clear()
    monkeypatch.setattr(GRPOModule, "_signal_rows", lambda self, r, advantages: torch.ones_like(advantages, dtype=torch.bool))
    _, every, every_grad = _one_update(tokenizer, rollout, **config)
    assert {4, 5, 6, 7} <= {r for rows in ran for r in rows}
    assert skipped_grad.norm() > 0
    assert torch.allclose(skipped_grad, every_grad, rtol=1e-5, atol=1e-7)
    for key in ("train/loss", "train/pg_loss", "train/grad_norm"):
        assert skipped[key] == pytest.approx(every[key], rel=1e-5), key


def test_a_step_whose_groups_all_tie_runs_no_forward(tokenizer, uneven_rollout, monkeypatch):
    """Nothing to learn and nothing to compute: no forward, no optimizer step, and the diagnostics
    that no token measured are NaN rather than a made-up 0."""
    rollout = copy.deepcopy(uneven_rollout)
    rollout.rewards.total = torch.zeros(8)
    monkeypatch.setattr(GRPOModule, "_logprobs", lambda *args, **kwargs: pytest.fail("a forward ran"))
    policy = make_policy(tokenizer)
    module = GRPOModule(policy, GRPOConfig(n=4, kl_coef=0.0, entropy_coef=0.0, max_new_tokens=12), batch_size=2)
    module._trainer = OneProcess()
    module.optimizers = lambda: torch.optim.AdamW(policy.parameters(), lr=1e-3)
    module.lr_schedulers = lambda: SimpleNamespace(step=lambda: None, get_last_lr=lambda: [0.0])
    logged = {}
    module.log = lambda key, value, **kwargs: logged.__setitem__(key, value)
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    module.training_step({"rollout": rollout, "step": 0}, 0)
    assert all(torch.equal(v, before[k]) for k, v in policy.state_dict().items())
    assert module.no_signal_updates == 1 and logged["train/grad_norm"] == 0.0 and logged["train/loss"] == 0.0
    assert math.isnan(logged["train/entropy"]) and math.isnan(logged["train/padding_frac"])


@pytest.mark.parametrize("pack", [False, "lanes", "sequence"])
def test_an_empty_micro_batch_adds_nothing(tokenizer, uneven_rollout, pack):
    """What a rank with fewer micro-batches runs to match the others' collectives: a forward and a
    backward whose loss and gradient are zero."""
    module, _, _ = _one_update(tokenizer, uneven_rollout, micro_batch_size=4, pack=pack)
    module.policy.zero_grad(set_to_none=False)
    advantages = torch.ones(8)
    stats = module._micro_step(uneven_rollout, [], advantages, None, None, 10.0, 8.0, 10.0)
    assert stats["loss"] == 0.0 and stats["entropy"] == 0.0
    assert all(p.grad is not None and not p.grad.any() for p in module.policy.parameters())


def test_hf_engine_is_seeded_and_takes_weights(tokenizer):
    policy = make_policy(tokenizer, seed=0)
    engine_model = make_policy(tokenizer, seed=1)  # a different model, as a separate engine would hold
    engine = HFEngine(engine_model, tokenizer.pad_token_id, tokenizer.eos_token_id)
    params = SamplingParams(n=3, temperature=1.0, max_new_tokens=6)
    prompts = [[1, 2, 3], [4, 5]]
    a, b = engine.generate(prompts, params, [5, 9]).tokens, engine.generate(prompts, params, [5, 9]).tokens
    assert a == b and len(a) == 6 and all(1 <= len(c) <= 6 for c in a)
    assert engine.generate(prompts, params, [6, 9]).tokens[:3] != a[:3]
    assert engine.generate(prompts, params, [6, 9]).tokens[3:] == a[3:]  # a prompt's samples depend on its own seed

    reference = HFEngine(policy, tokenizer.pad_token_id, tokenizer.eos_token_id).generate(prompts, params, [5, 9])
    assert reference.tokens != a
    engine.load_weights(policy.named_parameters())
    assert engine.generate(prompts, params, [5, 9]).tokens == reference.tokens


def test_hf_engine_decodes_in_its_own_dtype_and_takes_weights_across_dtypes(tokenizer):
    """bf16 decoding beside fp32 master weights: a bf16 copy, refreshed (cast) by load_weights."""
    policy = make_policy(tokenizer, seed=0)
    engine = HFEngine(policy, tokenizer.pad_token_id, tokenizer.eos_token_id, dtype=torch.bfloat16)
    assert engine.model is not policy and all(p.dtype == torch.bfloat16 for p in engine.model.parameters())
    assert HFEngine(policy, tokenizer.pad_token_id, tokenizer.eos_token_id, dtype=torch.float32).model is policy
    with torch.no_grad():
        policy.model.norm.weight.mul_(2.0)
    engine.load_weights(policy.named_parameters())
    assert torch.equal(engine.model.model.norm.weight, policy.model.norm.weight.to(torch.bfloat16))
    out = engine.generate([[1, 2, 3]], SamplingParams(n=2, temperature=1.0, max_new_tokens=5), [3])
    assert len(out.tokens) == 2 and all(len(t) == len(lp) for t, lp in zip(out.tokens, out.logprobs))


def test_hf_engine_logprobs_are_the_samplers_tempered_distribution(tokenizer):
    policy = make_policy(tokenizer, seed=0)
    engine = HFEngine(policy, tokenizer.pad_token_id, tokenizer.eos_token_id)
    prompt = [10, 11, 12, 13]
    out = engine.generate([prompt], SamplingParams(n=2, temperature=0.7, max_new_tokens=6), [9])
    for tokens, logprobs in zip(out.tokens, out.logprobs):
        with torch.no_grad():
            logits = policy(torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1 : -1] / 0.7
        expected = logits.log_softmax(-1).gather(-1, torch.tensor(tokens)[:, None]).squeeze(-1)
        assert torch.allclose(torch.tensor(logprobs), expected, atol=1e-5)


def test_a_prompts_samples_do_not_depend_on_its_batch_or_chunking(tokenizer):
    """What lets two ranks together draw exactly what one process draws."""
    engine = HFEngine(make_policy(tokenizer, seed=0), tokenizer.pad_token_id, tokenizer.eos_token_id)
    params = SamplingParams(n=4, temperature=1.0, max_new_tokens=8)
    prompts = [[1, 2, 3], [4, 5], [6, 7, 8, 9, 10], [11]]
    together = engine.generate(prompts, params, [10, 11, 12, 13]).tokens
    apart = engine.generate(prompts[:2], params, [10, 11]).tokens + engine.generate(prompts[2:], params, [12, 13]).tokens
    engine.batch_size = 1
    one_by_one = engine.generate(prompts, params, [10, 11, 12, 13]).tokens
    assert together == apart == one_by_one
    assert len({tuple(c) for c in together}) > 4  # the n samples of a prompt differ


def test_seeded_sampler_draws_from_the_tempered_distribution():
    """Gumbel-max per row: token frequencies match softmax(logits / T); top-p keeps only the nucleus."""
    from rlvr.engines.hf import SeededSampler

    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    for temperature, top_p in [(1.0, 1.0), (0.5, 1.0), (1.0, 0.7)]:
        picks = torch.tensor([int(SeededSampler([s], temperature, top_p)(None, logits).argmax()) for s in range(4000)])
        freq = torch.bincount(picks, minlength=4).float() / len(picks)
        expected = (logits[0] / temperature).softmax(-1)
        if top_p < 1:  # 0.644 + 0.237 covers 0.7: the nucleus is the first two tokens
            expected = torch.tensor([0.644, 0.237, 0.0, 0.0]) / 0.881
        assert torch.allclose(freq, expected, atol=0.025), (temperature, top_p, freq, expected)


def test_seeded_sampler_picks_the_token_where_the_cumulative_probability_passes_u(monkeypatch):
    """Inverse CDF by hand: probabilities 0.2, 0.3, 0.5 (cumulative 0.2, 0.5, 1.0)."""
    import rlvr.engines.hf

    logits = torch.tensor([[0.2, 0.3, 0.5]]).log()
    for u, token in [(0.1, 0), (0.25, 1), (0.49, 1), (0.51, 2), (0.999, 2)]:
        monkeypatch.setattr(rlvr.engines.hf, "row_uniforms", lambda keys, position, u=u: torch.tensor([u], dtype=torch.float64))
        sampler = rlvr.engines.hf.SeededSampler([0], temperature=1.0, top_p=1.0)
        out = sampler(None, logits)
        assert int(out.argmax()) == token and out.isinf().sum() == 2, (u, token)
        assert sampler.logprobs[0].item() == pytest.approx(logits[0, token].item(), abs=1e-6)
    # top-p 0.5 keeps 0.5 and 0.3 (0.5 alone does not cover it); even u near 1 never picks the 0.2
    monkeypatch.setattr(rlvr.engines.hf, "row_uniforms", lambda keys, position: torch.tensor([0.9999999], dtype=torch.float64))
    assert int(rlvr.engines.hf.SeededSampler([0], 1.0, top_p=0.5)(None, logits).argmax()) == 2
    monkeypatch.setattr(rlvr.engines.hf, "row_uniforms", lambda keys, position: torch.tensor([1e-9], dtype=torch.float64))
    assert int(rlvr.engines.hf.SeededSampler([0], 1.0, top_p=0.5)(None, logits).argmax()) == 1


class _RecordOps(TorchDispatchMode):
    """Records every aten op run in its context."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []
        self.new_shapes: list[tuple[int, ...]] = []  # of the tensors each out-of-place op returns

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func.overloadpacket))
        out = func(*args, **(kwargs or {}))
        if isinstance(out, torch.Tensor) and not func._schema.is_mutable and not any(out is a for a in args):
            self.new_shapes.append(tuple(out.shape))
        return out


def test_the_samplers_per_token_work_stays_on_the_device():
    """Inside the decoding loop no tensor is built from Python numbers (`torch.tensor(position)`:
    aten.lift_fresh, a host-to-device copy per token on a GPU) and nothing is read back to the host
    (aten._local_scalar_dense: .item(), float(), bool()). tests/test_gpu.py checks the same on CUDA
    with torch's sync debug mode."""
    from rlvr.engines.hf import SeededSampler

    logits = torch.randn(6, 50)
    for temperature, top_p in [(1.0, 1.0), (0.7, 0.9), (0.0, 1.0)]:
        sampler = SeededSampler(range(6), temperature, top_p)
        with _RecordOps() as recorded:
            for _ in range(3):
                sampler(None, logits)
        host = {"aten.lift_fresh", "aten.lift_fresh_copy", "aten._local_scalar_dense", "aten.nonzero"}
        assert recorded.ops and not host & set(recorded.ops), (temperature, top_p, host & set(recorded.ops))
        assert len(sampler.logprobs) == 3
        if (temperature, top_p) == (1.0, 1.0):  # three (rows, V) temporaries per token (in-place ops reuse them)
            assert sum(shape == (6, 50) for shape in recorded.new_shapes) == 3 * 3, recorded.new_shapes


def test_hf_engine_decodes_with_the_policy_once_lightning_has_cast_it(tokenizer):
    """gpu=l4 (bf16-true): the engine is built while the policy is still fp32, and Lightning casts it
    to bf16 before the first rollout; the engine then needs no bf16 copy of its own."""
    policy = make_policy(tokenizer)
    engine = HFEngine(policy, tokenizer.pad_token_id, tokenizer.eos_token_id, dtype=torch.bfloat16)
    policy.to(torch.bfloat16)  # what the bf16-true precision plugin does at setup
    assert engine.model is policy
    out = engine.generate([[1, 2, 3]], SamplingParams(n=2, temperature=1.0, max_new_tokens=4), [3])
    assert len(out.tokens) == 2


def test_row_uniforms_are_a_function_of_key_and_position():
    from rlvr.engines.hf import row_keys, row_uniforms

    keys = row_keys([5, 6, 5])
    a, b = row_uniforms(keys, torch.tensor(0)), row_uniforms(keys, torch.tensor(1))
    assert a[0] == a[2] and a[0] != a[1] and a[0] != b[0]  # same key, same position: same number
    assert torch.equal(row_uniforms(row_keys([6]), torch.tensor(0)), a[1:2])  # independent of the other rows
    assert ((a > 0) & (a < 1)).all()


class TargetTokenReward:
    """Reward = share of response characters that are '7': learnable by a tiny model in a few steps."""

    def __call__(self, texts, truths):
        values = [t.count("7") / max(len(t), 1) for t in texts]
        return rewards_for(values)

    def close(self):
        pass


@pytest.mark.parametrize("adapter", ["none", "lora"])
def test_grpo_learns_a_learnable_reward(tokenizer, tmp_path, adapter):
    """Full-parameter, and with a LoRA adapter: then the HF engine generates with the adapted policy,
    and the base's weights end bit-identical."""
    L.seed_everything(0)
    policy = make_policy(tokenizer)
    if adapter != "none":
        # LoRA moves neither the (tied) embeddings nor the final norm, and the random tiny model's
        # are small (N(0, 0.02)): its logits span about +-1.3, which caps any token at ~1.4%. Its
        # adapted base gets embeddings 4x as wide, so that the reward is learnable at all, and
        # 45 steps: a rank-16 adapter learns it more slowly than full-parameter training.
        with torch.no_grad():
            policy.get_input_embeddings().weight.mul_(4)
    base = {name: p.detach().clone() for name, p in policy.named_parameters()}
    steps = 30 if adapter == "none" else 45
    if adapter != "none":
        policy = adapters.apply(policy, adapters.AdapterSpec(adapter))
    sampling = SamplingParams(n=8, temperature=1.0, max_new_tokens=8)
    config = GRPOConfig(n=8, micro_batch_size=32, lr=3e-3 if adapter == "none" else 1e-2, kl_coef=0.0,
                        entropy_coef=0.0, max_new_tokens=8)
    module = GRPOModule(policy, config, batch_size=4)
    data = PromptDataModule(load_examples("arithmetic", size=64), tokenizer, batch_size=4)
    data.setup()
    events = []

    class Engine(HFEngine):  # records the order the rollout callback drives it in
        def generate(self, *args):
            events.append("generate")
            return super().generate(*args)

        def sleep(self):
            events.append("sleep")

        def load_weights(self, weights):
            events.append("push")
            if adapter == "none":  # an adapter run's pushes are load_adapter's
                held_gradients.append(sum(p.grad is not None for p in module.policy.parameters()))
            super().load_weights(weights)

        def load_adapter(self, policy):
            events.append("adapter")
            held_gradients.append(sum(p.grad is not None for p in module.policy.parameters()))
            super().load_adapter(policy)

    engine = Engine(policy, tokenizer.pad_token_id, tokenizer.eos_token_id)
    history, held_gradients = [], []  # parameters holding a gradient when the weights are pushed

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            history.append(trainer.callback_metrics["reward/total"].item())

    trainer = L.Trainer(accelerator="cpu", max_steps=steps, max_epochs=-1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[RolloutCallback(engine, TargetTokenReward(), tokenizer, sampling), Record()])
    trainer.fit(module, datamodule=data)
    first, last = sum(history[:5]) / 5, sum(history[-5:]) / 5
    assert len(history) == steps
    # LoRA starts higher on its wider embeddings (0.08 here) and ends at 0.33 after 45 steps: 3x, not 5x
    assert last > 0.3 and last > (5 if adapter == "none" else 3) * first, (first, last)
    # the engine sleeps between its rollout and the update, and the push after the update wakes it
    push = "push" if adapter == "none" else "adapter"  # an adapter run pushes its base once, then the adapter
    assert events == ["push"] + (["adapter"] if adapter != "none" else []) + ["generate", "sleep", push] * steps
    # the update freed its gradients before the push (they would sit beside vLLM's share otherwise)
    assert held_gradients == [0] * (steps + 1)  # every push: the first (before any update) and one per step
    if adapter != "none":
        assert dict(adapters.base_weights(policy)).keys() == base.keys()
        assert all(torch.equal(w, base[name]) for name, w in adapters.base_weights(policy))


def test_reference_model_is_held_only_with_kl_and_never_checkpointed(tokenizer):
    policy = make_policy(tokenizer)
    assert GRPOModule(copy.deepcopy(policy), GRPOConfig(kl_coef=0.0), batch_size=1)._reference is None
    module = GRPOModule(policy, GRPOConfig(kl_coef=0.001), batch_size=1)
    assert module._reference is not None
    assert all(key.startswith("policy.") or key.startswith("reward_metrics") for key in module.state_dict())


def test_mini_batch_size_must_divide_the_batch():
    with pytest.raises(ValueError, match="not divisible"):
        GRPOConfig(mini_batch_size=3).updates_per_step(batch_size=8)
    assert GRPOConfig(mini_batch_size=2, ppo_epochs=2).updates_per_step(batch_size=8) == 8


def test_tiny_tokenizer_token_i_is_byte_i_in_every_process():
    """Token ids must not depend on the process (hash seed): a resumed run must read the same ids."""
    script = "from rlvr.models import tiny_tokenizer; print(tiny_tokenizer()('Hi 7 \\u00e9\\n')['input_ids'])"
    outputs = {subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                              env={**os.environ, "PYTHONHASHSEED": str(seed)}).stdout.strip() for seed in (1, 2)}
    assert outputs == {str(list("Hi 7 \u00e9\n".encode()))}
    tok = tiny_tokenizer()
    text = "<think>ü</think>\\boxed{7}"
    assert tok.decode(tok(text)["input_ids"]) == text


class FirstUnevenThenTied:
    """Step 0's rewards differ within groups (a real update, so AdamW has moments); later steps tie."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, texts, truths):
        self.calls += 1
        if self.calls == 1:
            return TargetTokenReward()(texts, truths)
        return rewards_for([1.0] * len(texts))

    def close(self):
        pass


def test_a_step_with_no_signal_moves_no_weight_and_no_optimizer_state(tokenizer):
    """Every group ties, KL 0, entropy 0: the gradient is zero, and AdamW must not step on it (its
    moments and weight decay would still move every weight)."""
    L.seed_everything(0)
    policy = make_policy(tokenizer)
    config = GRPOConfig(n=4, micro_batch_size=16, lr=1e-3, kl_coef=0.0, entropy_coef=0.0, max_new_tokens=8,
                        weight_decay=0.1)
    module = GRPOModule(policy, config, batch_size=4)
    data = PromptDataModule(load_examples("arithmetic", size=64), tokenizer, batch_size=4)
    data.setup()
    snapshots = []

    class Snapshot(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            state = copy.deepcopy(trainer.optimizers[0].state_dict()["state"])
            snapshots.append(({n: p.detach().clone() for n, p in pl_module.policy.named_parameters()}, state,
                              trainer.callback_metrics["train/no_signal_updates"].item(),
                              trainer.callback_metrics["train/grad_norm"].item()))

    engine = HFEngine(policy, tokenizer.pad_token_id, tokenizer.eos_token_id)
    sampling = SamplingParams(n=4, temperature=1.0, max_new_tokens=8)
    trainer = L.Trainer(accelerator="cpu", max_steps=3, max_epochs=-1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[RolloutCallback(engine, FirstUnevenThenTied(), tokenizer, sampling), Snapshot()])
    trainer.fit(module, datamodule=data)
    (w0, s0, skipped0, norm0), (w1, s1, skipped1, norm1), (w2, s2, skipped2, _) = snapshots
    assert norm0 > 0 and skipped0 == 0 and s0  # step 0 updated: AdamW has moments
    assert norm1 == 0 and (skipped1, skipped2) == (1, 2) and module.no_signal_updates == 2
    for weights, state in ((w1, s1), (w2, s2)):
        assert all(torch.equal(weights[n], w0[n]) for n in w0)  # bit-identical weights
        assert state.keys() == s0.keys()
        for key in s0:
            assert all(torch.equal(torch.as_tensor(state[key][k]), torch.as_tensor(s0[key][k])) for k in s0[key])


def _grad(policy, config, rollout, advantages, num_tokens, num_seqs):
    module = GRPOModule(policy, config, batch_size=2)
    module.manual_backward = lambda loss: loss.backward()
    policy.zero_grad()
    module._micro_step(rollout, [list(range(rollout.input_ids.shape[0]))], advantages, None, None, num_tokens, num_seqs,
                       num_tokens)
    return torch.cat([p.grad.flatten() for p in policy.parameters() if p.grad is not None])


@pytest.mark.parametrize("loss_agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_masked_truncated_rows_train_as_if_they_were_not_there(tokenizer, loss_agg):
    """Rows 1 and 3 run to the limit without EOS; with grpo.mask_truncated their gradient is that of a
    batch without them, whose normalizers count 5 tokens and 2 sequences (not 9 and 4)."""
    eos = tokenizer.eos_token_id
    prompts, completions = [[10, 11], [12, 13, 14]], [[20, 21, eos], [30, 31, 32], [40, eos], [50, 51, 52]]
    policy = make_policy(tokenizer)
    config = dict(kl_coef=0.0, entropy_coef=0.01, loss_agg=loss_agg, max_new_tokens=3, tis_cap=None)
    rollout = pack_rollout(prompts, generated(completions), 2, tokenizer.pad_token_id, [eos], rewards_for([0] * 4))
    assert rollout.truncated.tolist() == [False, True, False, True]
    masked = _grad(policy, GRPOConfig(n=2, mask_truncated=True, **config), rollout,
                   torch.tensor([1.0, -1.0, -0.5, 0.5]), num_tokens=5.0, num_seqs=2.0)
    kept = pack_rollout(prompts, generated([completions[0], completions[2]]), 1, tokenizer.pad_token_id, [eos],
                        rewards_for([0, 0]))
    without = _grad(policy, GRPOConfig(n=2, **config), kept, torch.tensor([1.0, -0.5]), num_tokens=5.0, num_seqs=2.0)
    assert masked.abs().sum() > 0 and torch.allclose(masked, without, atol=1e-6)
    unmasked = _grad(policy, GRPOConfig(n=2, **config), rollout, torch.tensor([1.0, -1.0, -0.5, 0.5]), 9.0, 4.0)
    assert not torch.allclose(unmasked, without, atol=1e-6)  # without the mask the cut-off rows do count
