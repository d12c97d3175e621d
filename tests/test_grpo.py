"""rlvr.grpo against numbers worked out by hand."""

import math

import pytest
import torch

from rlvr import grpo


def test_group_advantages_by_hand():
    # group 1: rewards 1, 0 -> mean 0.5, std (unbiased) sqrt(0.5) = 0.7071 -> +-0.7071
    # group 2: rewards 2, 2 -> all tie -> 0
    adv = grpo.group_advantages(torch.tensor([1.0, 0.0, 2.0, 2.0]), n=2, eps=0.0)
    s = 0.5 / math.sqrt(0.5)
    assert adv.tolist() == pytest.approx([s, -s, 0.0, 0.0])


def test_group_advantages_three_samples():
    # rewards 0, 1, 2: mean 1, std 1 -> -1, 0, 1
    adv = grpo.group_advantages(torch.tensor([0.0, 1.0, 2.0]), n=3, eps=0.0)
    assert adv.tolist() == pytest.approx([-1.0, 0.0, 1.0])


def test_dr_grpo_advantages_are_only_centered():
    adv = grpo.group_advantages(torch.tensor([0.0, 1.0, 5.0, 1.0]), n=2, scale=False)
    assert adv.tolist() == pytest.approx([-0.5, 0.5, 2.0, -2.0])


def test_tied_groups():
    assert grpo.tied_groups(torch.tensor([1.0, 1.0, 0.0, 1.0]), n=2).tolist() == [True, False]


def test_token_logprobs_and_entropy_by_hand():
    # one position, H = 1, a 2-token head with rows (0, ln 3): logits (0, ln 3), p = (1/4, 3/4)
    hidden, head = torch.tensor([[[1.0]]]), torch.tensor([[0.0], [math.log(3.0)]])
    logp, ent = grpo.token_logprobs_and_entropy(hidden, head, torch.tensor([[1]]))
    assert logp.item() == pytest.approx(math.log(0.75))
    assert ent.item() == pytest.approx(-(0.25 * math.log(0.25) + 0.75 * math.log(0.75)))
    # temperature 2: logits (0, ln 3 / 2) = (0, ln sqrt 3): p = (1, sqrt 3) / (1 + sqrt 3)
    logp, _ = grpo.token_logprobs_and_entropy(hidden, head, torch.tensor([[0]]), temperature=2.0)
    assert logp.item() == pytest.approx(-math.log(1 + math.sqrt(3)))


def _full_vocabulary(hidden, head, targets, temperature):
    logits = (hidden @ head.T) / temperature  # (B, T, V)
    logp_all = logits.log_softmax(-1)
    return logp_all.gather(-1, targets[..., None]).squeeze(-1), -(logp_all.exp() * logp_all).sum(-1)


@pytest.mark.parametrize("chunk_tokens", [1, 4, 1000])
def test_chunked_logprobs_equal_the_full_vocabulary_computation_with_their_gradients(chunk_tokens):
    torch.manual_seed(0)
    hidden = torch.randn(3, 5, 8, requires_grad=True)
    head = torch.randn(50, 8, requires_grad=True)
    targets = torch.randint(0, 50, (3, 5))
    mask = torch.tensor([[1.0] * 5, [1.0] * 2 + [0.0] * 3, [1.0] * 4 + [0.0]])  # padded responses
    chunked = grpo.token_logprobs_and_entropy(hidden, head, targets, temperature=0.7, chunk_tokens=chunk_tokens)
    full = _full_vocabulary(hidden, head, targets, 0.7)
    for a, b in zip(chunked, full):
        assert torch.allclose(a * mask, b * mask, atol=1e-5)
    grads = [torch.autograd.grad(((lp + 0.1 * ent) * mask).sum(), (hidden, head)) for lp, ent in (chunked, full)]
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-5)


def test_no_full_vocabulary_tensor_exists_in_the_forward_or_the_backward():
    """The point of chunking: the largest tensor is one chunk's logits, not (B, T, V)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Largest(TorchDispatchMode):
        numel = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor):
                    Largest.numel = max(Largest.numel, t.numel())
            return out

    B, T, H, V, chunk = 4, 64, 16, 1000, 32
    hidden = torch.randn(B, T, H, requires_grad=True)
    head = torch.randn(V, H, requires_grad=True)
    with Largest():
        logp, ent = grpo.token_logprobs_and_entropy(hidden, head, torch.randint(0, V, (B, T)), chunk_tokens=chunk)
        (logp.sum() + ent.sum()).backward()
    assert Largest.numel == chunk * V < B * T * V
    assert head.grad is not None and hidden.grad is not None


def test_truncated_importance_weights_by_hand():
    old = torch.log(torch.tensor([[0.5, 0.5, 0.1]]))
    engine = torch.log(torch.tensor([[0.25, 1.0, 0.1]]))  # ratios 2, 0.5, 1
    assert grpo.tis_weights(old, engine, cap=1.5)[0].tolist() == pytest.approx([1.5, 0.5, 1.0])
    assert grpo.tis_weights(old, engine, cap=None).tolist() == [[1.0, 1.0, 1.0]]
    # the weight multiplies the clipped surrogate: advantage 1, ratio 1 -> loss -1 per token, times the weight
    loss, _ = grpo.clipped_policy_loss(old, old, torch.tensor([1.0]), weights=torch.tensor([[1.5, 0.5, 1.0]]))
    assert loss[0].tolist() == pytest.approx([-1.5, -0.5, -1.0])
    weights = grpo.tis_weights(old.requires_grad_(), engine, cap=2.0)
    assert not weights.requires_grad  # a fixed correction, never a path for the gradient


def test_kl_is_zero_when_policy_equals_reference():
    logp = torch.tensor([[-0.5, -2.0]])
    assert grpo.kl_low_var(logp, logp).tolist() == [[0.0, 0.0]]


def test_kl_low_var_by_hand():
    # ref - logp = ln 2: exp(ln 2) - ln 2 - 1 = 1 - ln 2
    kl = grpo.kl_low_var(torch.tensor([[0.0]]), torch.tensor([[math.log(2.0)]]))
    assert kl.item() == pytest.approx(1.0 - math.log(2.0))


def test_clipped_loss_positive_advantage_clips_above():
    # advantage +1; ratio e^0.5 = 1.6487 > 1.2 -> clipped term -1.2 is larger than -1.6487: loss -1.2, clipped
    # ratio e^-0.5 = 0.6065 < 0.8 -> max(-0.6065, -0.8) = -0.6065 (unclipped: no clip below for A > 0)
    logp = torch.tensor([[0.5, -0.5]])
    loss, clipped = grpo.clipped_policy_loss(logp, torch.zeros(1, 2), torch.tensor([1.0]), 0.2, 0.2)
    assert loss.tolist()[0] == pytest.approx([-1.2, -math.exp(-0.5)])
    assert clipped.tolist() == [[True, False]]


def test_clipped_loss_negative_advantage_clips_below_with_its_own_range():
    # advantage -1, clip_low 0.1, clip_high 0.3
    # ratio e^-0.5 = 0.6065 -> clamp to 0.9: max(0.6065, 0.9) = 0.9, clipped
    # ratio e^0.5 = 1.6487 -> clamp 1.3: max(1.6487, 1.3) = 1.6487, not clipped (pessimistic bound)
    logp = torch.tensor([[-0.5, 0.5]])
    loss, clipped = grpo.clipped_policy_loss(logp, torch.zeros(1, 2), torch.tensor([-1.0]), 0.1, 0.3)
    assert loss.tolist()[0] == pytest.approx([0.9, math.exp(0.5)])
    assert clipped.tolist() == [[True, False]]


def test_clipped_loss_gradient_at_ratio_one_is_minus_advantage():
    logp = torch.zeros(1, 3, requires_grad=True)
    loss, _ = grpo.clipped_policy_loss(logp, logp.detach(), torch.tensor([2.0]))
    loss.sum().backward()
    assert logp.grad.tolist() == [[-2.0, -2.0, -2.0]]


VALUES = torch.tensor([[1.0, 2.0, 3.0], [4.0, 100.0, 100.0]])
MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])  # second row: one real token, then padding


def test_aggregate_token_mean_by_hand():
    # (1 + 2 + 3 + 4) / 4 tokens = 2.5; masked 100s ignored
    assert grpo.aggregate(VALUES, MASK, "token-mean").item() == pytest.approx(2.5)


def test_aggregate_seq_mean_token_mean_by_hand():
    # ((1 + 2 + 3) / 3 + 4 / 1) / 2 = (2 + 4) / 2 = 3
    assert grpo.aggregate(VALUES, MASK, "seq-mean-token-mean").item() == pytest.approx(3.0)


def test_aggregate_seq_mean_token_sum_norm_by_hand():
    # (6 + 4) / (2 sequences * horizon 5) = 1
    assert grpo.aggregate(VALUES, MASK, "seq-mean-token-sum-norm", horizon=5).item() == pytest.approx(1.0)


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_micro_batches_sum_to_the_mini_batch_loss(mode):
    whole = grpo.aggregate(VALUES, MASK, mode, horizon=3)
    totals = dict(num_tokens=MASK.sum().item(), num_seqs=2.0, horizon=3)
    parts = sum(grpo.aggregate(VALUES[i : i + 1], MASK[i : i + 1], mode, **totals) for i in range(2))
    assert parts.item() == pytest.approx(whole.item())


def test_aggregate_rejects_unknown_mode():
    with pytest.raises(ValueError, match="token-mean"):
        grpo.aggregate(VALUES, MASK, "sum")


def test_padded_tokens_by_hand():
    # rows 0 and 2 (prompt + response 3 and 7 tokens): both laid out 7 wide -> 14; no rows -> 0
    assert grpo.padded_tokens([3, 9, 7], [0, 2]) == 14
    assert grpo.padded_tokens([3, 9, 7], []) == 0


def test_token_budget_micro_batches_by_hand():
    # Longest first: 10 (row 1), 9 (3), 4 (2), 3 (0), 2 (4). Budget 20: rows 1 and 3 fill 2 x 10 = 20
    # (19 useful: 5% padding, at the bound); row 2 would make 3 x 10 = 30 > 20. Then 2 x 4 = 8 padded
    # for 4 + 3 = 7 useful is 12.5% padding, over 5%: rows 2, 0 and 4 go alone.
    lengths = [3, 10, 4, 9, 2]
    assert grpo.token_budget_micro_batches(lengths, 20) == [[1, 3], [2], [0], [4]]
    # Allowing half padding: rows 2, 0, 4 share 3 x 4 = 12 tokens for 9 useful (25%).
    assert grpo.token_budget_micro_batches(lengths, 20, max_padding=0.5) == [[1, 3], [2, 0, 4]]
    # A row over the budget goes alone, and the rest are still packed.
    assert grpo.token_budget_micro_batches([30, 5, 5], 20) == [[0], [1, 2]]
    # Equal lengths: as many rows as fit, in index order.
    assert grpo.token_budget_micro_batches([4] * 5, 8) == [[0, 1], [2, 3], [4]]


def test_token_budget_micro_batches_stay_within_the_budget_and_the_padding_bound():
    generator = torch.Generator().manual_seed(0)
    for budget in (1, 50, 300, 2000):
        lengths = (torch.empty(200).exponential_(1 / 60.0, generator=generator) + 1).long().tolist()  # long-tailed
        batches = grpo.token_budget_micro_batches(lengths, budget)
        assert sorted(i for rows in batches for i in rows) == list(range(200))  # each row exactly once
        for rows in batches:
            assert len(rows) == 1 or grpo.padded_tokens(lengths, rows) <= budget, (budget, rows)
            assert sum(lengths[i] for i in rows) >= 0.95 * grpo.padded_tokens(lengths, rows), (budget, rows)


def test_config_rejects_a_non_positive_token_budget():
    with pytest.raises(ValueError, match="grpo.micro_batch_tokens=0"):
        grpo.GRPOConfig(micro_batch_tokens=0)
