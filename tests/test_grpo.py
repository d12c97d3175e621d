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
    # one position, vocabulary of 2 with logits (0, ln 3): p = (1/4, 3/4)
    logits = torch.tensor([[[0.0, math.log(3.0)]]])
    logp, ent = grpo.token_logprobs_and_entropy(logits, torch.tensor([[1]]))
    assert logp.item() == pytest.approx(math.log(0.75))
    assert ent.item() == pytest.approx(-(0.25 * math.log(0.25) + 0.75 * math.log(0.75)))


def test_token_logprobs_chunking_does_not_change_values():
    torch.manual_seed(0)
    logits, targets = torch.randn(5, 7, 11), torch.randint(0, 11, (5, 7))
    a, ea = grpo.token_logprobs_and_entropy(logits, targets, rows_per_chunk=1)
    b, eb = grpo.token_logprobs_and_entropy(logits, targets, rows_per_chunk=5)
    ref = logits.log_softmax(-1).gather(-1, targets[..., None]).squeeze(-1)
    assert torch.allclose(a, ref) and torch.allclose(b, ref) and torch.allclose(ea, eb)


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
