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


@pytest.mark.parametrize("scale", [True, False])
def test_a_tied_group_is_exactly_zero_when_its_float_mean_is_not_its_value(scale):
    # 7 x 0.3 (a reward weighted by 0.3) sums to a float whose seventh is not 0.3's float in the last bit
    rewards = torch.full((7,), 0.3)
    assert (rewards - rewards.mean()).any()
    assert not grpo.group_advantages(rewards, n=7, scale=scale).any()


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


def test_packed_tokens_have_no_padding():
    assert grpo.padded_tokens([3, 9, 7], [0, 2], packed=True) == 10
    assert grpo.padded_tokens([3, 9, 7], [], packed=True) == 0


def test_config_rejects_an_unknown_pack_setting():
    with pytest.raises(ValueError, match="grpo.pack='yes'; choose auto, lanes, sequence"):
        grpo.GRPOConfig(pack="yes")


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
    # Packed (grpo.pack): the budget bounds the rows' sum and padding does not count. Longest first:
    # 10 + 9 = 19 <= 20, + 4 = 23 > 20; then 4 + 3 + 2 = 9 in one, where padded they went alone.
    assert grpo.token_budget_micro_batches(lengths, 20, packed=True) == [[1, 3], [2, 0, 4]]
    assert grpo.token_budget_micro_batches([30, 5, 5], 20, packed=True) == [[0], [1, 2]]


def test_token_budget_micro_batches_stay_within_the_budget_and_the_padding_bound():
    generator = torch.Generator().manual_seed(0)
    for budget in (1, 50, 300, 2000):
        lengths = (torch.empty(200).exponential_(1 / 60.0, generator=generator) + 1).long().tolist()  # long-tailed
        batches = grpo.token_budget_micro_batches(lengths, budget)
        assert sorted(i for rows in batches for i in rows) == list(range(200))  # each row exactly once
        for rows in batches:
            assert len(rows) == 1 or grpo.padded_tokens(lengths, rows) <= budget, (budget, rows)
            assert sum(lengths[i] for i in rows) >= 0.95 * grpo.padded_tokens(lengths, rows), (budget, rows)


def test_lane_lengths_by_hand():
    # Rows 0 and 1 share a 2-token prompt (group 0), row 2 has a 5-token one; responses 3, 4, 1
    rows = grpo.RowLengths(prompts=[2, 2, 5], responses=[3, 4, 1], groups=[0, 0, 1])
    assert rows.lane([0, 1]) == 2 + 3 + 4  # one copy of the prompt, then both responses
    assert rows.lane([0, 2, 1]) == (2 + 3) + (5 + 1) + (2 + 4)  # not side by side: a copy each
    assert rows.tokens([[0, 1], [2]]) == 2 * 9  # two lanes as wide as the fullest
    assert rows.tokens([]) == 0
    unshared = grpo.RowLengths(prompts=[2, 2, 5], responses=[3, 4, 1])
    assert unshared.lane([0, 1]) == 11
    assert unshared.tokens([[0], [2]]) == grpo.padded_tokens([5, 6, 6], [0, 2]) == 12  # one row a lane: padded
    assert unshared.tokens([[0, 2]]) == grpo.padded_tokens([5, 6, 6], [0, 2], packed=True) == 11  # one sequence


def test_prompt_segments_by_hand():
    # Group 0 (prompt 2): responses 5, 4, 3, 1; group 1 (prompt 3): 6. Width 10, longest first, first fit:
    # 5 opens a segment (room 3), 4 another (room 4), 3 fills the first, 1 joins the second.
    rows = grpo.RowLengths(prompts=[2, 2, 2, 2, 3], responses=[5, 4, 3, 1, 6], groups=[0, 0, 0, 0, 1])
    assert grpo.prompt_segments(rows, range(5), 10) == [[4], [0, 2], [1, 3]]
    # A row wider than the width goes alone
    assert grpo.prompt_segments(rows, [0, 1], 5) == [[0], [1]]


def test_fill_lanes_by_hand():
    # Lanes of 10, largest first: 10 fills a lane; 9 leaves 1, which nothing fits; then 4 + 3 + 2
    sizes = [3, 10, 4, 9, 2]
    assert grpo.fill_lanes(sizes, [1, 3, 2, 0, 4], 10, 5) == ([[1], [3], [2, 0, 4]], [])
    # Two lanes of 7 at most: 4 + 3, then 2 (9 and 10 fit none); largest fit, not next fit
    assert grpo.fill_lanes(sizes, [1, 3, 2, 0, 4], 7, 2) == ([[2, 0], [4]], [1, 3])
    assert grpo.fill_lanes(sizes, [2, 0, 4], 6, 3) == ([[2, 4], [0]], [])  # 4 + 2, then 3 alone


def test_lane_micro_batches_by_hand():
    # Unshared rows of 3, 10, 4, 9, 2 tokens, budget 20; longest first: 10, 9, 4, 3, 2. The 10 allows 2
    # lanes of 10: 10 | 9, 20 tokens for 19; or one lane of 20 (at most twice the longest row): 10 + 9,
    # 19 for 19, kept. Then the 4 allows 5 lanes of 4: 4 | 3 | 2, 12 for 9 (25% padding, over 5%); 4
    # lanes of 5: 4 | 3 + 2, 10 for 9 (10%); 3 of 6: 4 + 2 | 3, 12 for 9; 2 of 10: 4 + 3 + 2, trimmed
    # to 9, kept.
    rows = grpo.RowLengths(prompts=[1, 1, 1, 1, 1], responses=[2, 9, 3, 8, 1])
    assert grpo.lane_micro_batches(rows, 20) == [[[1, 3]], [[2, 0, 4]]]
    # A row over the budget goes alone; then the two 5s: two lanes of 5, 10 for 10 (the narrowest of equals)
    assert grpo.lane_micro_batches(grpo.RowLengths([10, 1, 1], [20, 4, 4]), 20) == [[[0]], [[1], [2]]]
    # Shared prompts: two groups of 4 samples (prompts 3 and 6), responses 20, 2, 3, 5 and 4, 9, 2, 3;
    # budget 46. Two lanes of 23: the 23-token row, and the 6-token prompt with 9, 4 and 3 (22): 46
    # tokens for rows of 57 of their own. One lane of 46: the 3-token prompt once, then 20, 5, 3 and 2:
    # 33 for 42, kept. Then the 6-token prompt and its four responses, 24 tokens: 57 in all for 84.
    rows = grpo.RowLengths(prompts=[3] * 4 + [6] * 4, responses=[20, 2, 3, 5, 4, 9, 2, 3], groups=[0] * 4 + [1] * 4)
    assert grpo.lane_micro_batches(rows, 46) == [[[0, 3, 2, 1]], [[5, 4, 7, 6]]]
    assert grpo.lane_micro_batches(grpo.RowLengths([], []), 16) == []


def _long_tailed(count, generator, groups_of=None):
    """`count` rows: prompts of 20 to 80 tokens (one per group of `groups_of`), long-tailed responses."""
    responses = (torch.empty(count).exponential_(1 / 60.0, generator=generator) + 1).long().tolist()
    if groups_of is None:
        return grpo.RowLengths(torch.randint(20, 80, (count,), generator=generator).tolist(), responses)
    prompts = torch.randint(20, 80, (count // groups_of,), generator=generator).repeat_interleave(groups_of).tolist()
    return grpo.RowLengths(prompts, responses, [i // groups_of for i in range(count)])


@pytest.mark.parametrize("groups_of", [None, 8])
def test_lane_micro_batches_stay_within_the_budget(groups_of):
    generator = torch.Generator().manual_seed(0)
    for budget in (1, 50, 300, 2000):
        rows = _long_tailed(200, generator, groups_of)
        widest = max(p + r for p, r in zip(rows.prompts, rows.responses))
        batches = grpo.lane_micro_batches(rows, budget)
        assert sorted(i for lanes in batches for lane in lanes for i in lane) == list(range(200))  # each row once
        for lanes in batches:
            assert sum(map(len, lanes)) == 1 or rows.tokens(lanes) <= budget, (budget, lanes)
            assert max(rows.lane(lane) for lane in lanes) <= 2 * widest  # no lane over twice the widest row
        computed = sum(rows.tokens(lanes) for lanes in batches)
        held = sum(rows.lane(lane) for lanes in batches for lane in lanes)
        full = [p + r for p, r in zip(rows.prompts, rows.responses)]
        if budget >= 300:  # room for several lanes: little padding, fewer micro-batches than padded rows
            assert held >= 0.95 * computed, budget
            assert len(batches) < len(grpo.token_budget_micro_batches(full, budget)), budget
        if groups_of and budget >= 300:  # shared prompts: fewer tokens than the rows' own
            assert computed < 0.9 * sum(full), budget


def test_config_rejects_a_non_positive_token_budget():
    with pytest.raises(ValueError, match="grpo.micro_batch_tokens=0"):
        grpo.GRPOConfig(micro_batch_tokens=0)


# -- dynamic sampling: which groups a step keeps, how many prompts to draw --------------------------


def test_select_groups_keeps_informative_groups_first_then_fills_with_tied_ones():
    # n = 2: groups (1, 1) tie, (0, 1) not, (0, 0) tie, (1, 0) not, (1, 0.5) not
    tied = grpo.tied_groups(torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 1.0, 0.0, 1.0, 0.5]), n=2)
    assert tied.tolist() == [True, False, True, False, False]
    assert grpo.select_groups(tied, 3) == ([1, 3, 4], 0)  # enough informative groups: no tied one
    assert grpo.select_groups(tied, 2) == ([1, 3], 0)  # the earliest drawn
    assert grpo.select_groups(tied, 4) == ([0, 1, 3, 4], 1)  # one short: the first tied group fills in, in draw order
    assert grpo.select_groups(torch.tensor([True, True]), 2) == ([0, 1], 2)
    with pytest.raises(ValueError, match="fewer than the 3"):
        grpo.select_groups(torch.tensor([True, False]), 3)


def test_refill_size_divides_the_deficit_by_the_informative_share():
    assert grpo.refill_size(informative=3, drawn=4, size=4) == 2  # ceil(1 / (3/4)) = ceil(1.33)
    assert grpo.refill_size(informative=2, drawn=4, size=4) == 4  # 2 / (1/2)
    assert grpo.refill_size(informative=1, drawn=8, size=4) == 4  # 3 / (1/8) = 24, at most the share
    assert grpo.refill_size(informative=0, drawn=4, size=4) == 4  # nothing informative yet: a whole share
    assert grpo.refill_size(informative=5, drawn=6, size=4) == 0  # full


# -- truncated rows masked out of the loss -------------------------------------------------------


def test_a_truncated_row_is_masked_out_and_the_normalizers_count_only_what_remains():
    kept = grpo.kept_rows(torch.tensor([False, True]), mask_truncated=True)  # row 2 was cut off
    assert kept.tolist() == [1.0, 0.0]
    assert grpo.kept_rows(torch.tensor([False, True]), mask_truncated=False).tolist() == [1.0, 1.0]
    mask = MASK * kept[:, None]
    totals = dict(num_tokens=float(mask.sum()), num_seqs=float(kept.sum()), horizon=5)  # 3 tokens, 1 sequence
    # token-mean: (1 + 2 + 3) / 3 = 2 (2.5 with the row); seq-mean-token-mean: 2 / 1 = 2 (3 with it);
    # seq-mean-token-sum-norm: 6 / (1 * 5) = 1.2 (1.0 with it)
    assert grpo.aggregate(VALUES, mask, "token-mean", **totals).item() == pytest.approx(2.0)
    assert grpo.aggregate(VALUES, mask, "seq-mean-token-mean", **totals).item() == pytest.approx(2.0)
    assert grpo.aggregate(VALUES, mask, "seq-mean-token-sum-norm", **totals).item() == pytest.approx(1.2)
    none_left = dict(num_tokens=0.0, num_seqs=0.0, horizon=5)  # every row cut off: a zero loss, not NaN
    for mode in grpo.LOSS_AGGS:
        assert grpo.aggregate(VALUES, torch.zeros_like(MASK), mode, **none_left).item() == 0.0


# -- GSPO: the sequence-level ratio ----------------------------------------------------------------


def test_sequence_ratio_is_the_responses_mean_log_ratio_clipped_per_response_on_both_sides():
    # row 1: log-ratios 0.1, 0.3 (then padding) -> mean 0.2, s = e^0.2 = 1.2214; A = +1, clip_high 0.1:
    #        max(-1.2214, -1.1) = -1.1 on both tokens, clipped
    # row 2: -0.4, -0.2, -0.3 -> mean -0.3, s = e^-0.3 = 0.7408; A = -1, clip_low 0.1: max(0.7408, 0.9) = 0.9, clipped
    # row 3: 0.1, -0.05 -> mean 0.025, s = e^0.025 = 1.0253; A = +1: -1.0253, inside the range
    delta = torch.tensor([[0.1, 0.3, 5.0], [-0.4, -0.2, -0.3], [0.1, -0.05, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    logp = (torch.full((3, 3), -1.0) + delta).requires_grad_(True)
    loss, clipped = grpo.clipped_policy_loss(logp, torch.full((3, 3), -1.0), torch.tensor([1.0, -1.0, 1.0]),
                                             clip_low=0.1, clip_high=0.1, mask=mask, level="sequence")
    expected = torch.tensor([[-1.1, -1.1, 0.0], [0.9, 0.9, 0.9], [-math.exp(0.025)] * 2 + [0.0]])
    assert torch.allclose(loss * mask, expected)
    assert (clipped & (mask > 0)).tolist() == [[True, True, False], [True, True, True], [False, False, False]]
    (loss * mask).sum().backward()
    # clipped rows have no gradient; row 3's token t gets -A * s (d s_t / d logp_t = s with the detached mean)
    assert torch.allclose(logp.grad, torch.tensor([[0.0] * 3, [0.0] * 3, [-math.exp(0.025)] * 2 + [0.0]]))


@pytest.mark.parametrize("clip", [0.1, 0.2])  # e^0.15 = 1.16: clipped at 0.1, not at 0.2
def test_gspo_equals_token_level_grpo_when_every_tokens_ratio_is_the_same(clip):
    torch.manual_seed(0)
    old = torch.randn(4, 5)
    mask = torch.tensor([[1.0] * 5, [1.0] * 3 + [0.0] * 2, [1.0] * 5, [1.0, 0.0, 0.0, 0.0, 0.0]])
    advantages = torch.tensor([1.0, -0.5, 2.0, -1.0])
    results = []
    for level in ("token", "sequence"):
        logp = (old + 0.15).requires_grad_(True)
        loss, clipped = grpo.clipped_policy_loss(logp, old, advantages, clip, clip, mask=mask, level=level)
        grpo.aggregate(loss, mask, "seq-mean-token-mean").backward()
        results.append((loss * mask, clipped & (mask > 0), logp.grad))
    (token_loss, token_clipped, token_grad), (seq_loss, seq_clipped, seq_grad) = results
    assert torch.allclose(token_loss, seq_loss) and torch.equal(token_clipped, seq_clipped)
    assert torch.allclose(token_grad, seq_grad)
    # ratio 1.16 for every token: above 1 + 0.1, so the rows with A > 0 are clipped (no gradient) at 0.1
    assert token_clipped.any(dim=1).tolist() == ([True, False, True, False] if clip == 0.1 else [False] * 4)
    assert (token_grad.abs().sum(dim=1) > 0).tolist() == ([False, True, False, True] if clip == 0.1 else [True] * 4)


def test_clip_ranges_default_to_the_ratio_levels_own():
    assert (grpo.GRPOConfig().clip_low, grpo.GRPOConfig().clip_high) == (0.2, 0.2)
    gspo = grpo.GRPOConfig(ratio_level="sequence")
    assert (gspo.clip_low, gspo.clip_high) == (3e-4, 4e-4)
    assert grpo.GRPOConfig(ratio_level="sequence", clip_high=0.01).clip_high == 0.01  # an explicit value wins
    with pytest.raises(ValueError, match="grpo.ratio_level='seq'; choose one of"):
        grpo.GRPOConfig(ratio_level="seq")
