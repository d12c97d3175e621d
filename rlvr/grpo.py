"""GRPO math as pure tensor functions: advantages, token log-probs, the clipped loss, KL, entropy.

Choices (after DeepSeekMath's GRPO with DAPO's decoupled clip and Dr. GRPO's options):
- advantages are normalized within each group of n samples of one prompt: (r - mean) / (std + eps),
  or (r - mean) alone with `scale=False` (Dr. GRPO); a group whose rewards all tie gets zero;
- the PPO-clipped surrogate with separate low/high clip ranges, on each token's ratio (GRPO, DAPO) or on
  the whole response's length-normalized ratio (GSPO, `ratio_level="sequence"`);
- dynamic sampling (DAPO): which groups a step keeps once tied ones are dropped (`select_groups`), and
  how many prompts to draw to replace them (`refill_size`); the rollout callback drives it;
- truncated responses optionally masked out of the loss (`kept_rows`, DAPO's overlong filtering);
- KL to a frozen reference with the k3 ("low_var_kl") estimator, as a loss term;
- truncated importance sampling (min(pi_old / pi_engine, cap) per token) for the gap between the
  engine that sampled and the trainer's numerics;
- log-probs through the LM head in checkpointed chunks, never the full (B, T, V) logits;
- an entropy bonus;
- losses aggregated per token over a whole mini-batch ("token-mean", the default), per sequence
  ("seq-mean-token-mean"), or summed per sequence over a fixed horizon ("seq-mean-token-sum-norm",
  Dr. GRPO). Normalizers are passed in so that micro-batch losses add up to the mini-batch loss;
- micro-batches of a fixed number of rows, or of a token budget, laid out in lanes of rows back to
  back where the samples of one prompt share a copy of it (`lane_micro_batches`), or as padded rows
  sorted by length (`token_budget_micro_batches`), so that little of the update is spent on padding
  or on computing one prompt n times.

Shapes: B sequences, T response tokens, V vocabulary. Masks are 1.0 on response tokens.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, get_args

import torch
from torch.utils.checkpoint import checkpoint

LossAgg = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"]
LOSS_AGGS = get_args(LossAgg)
RatioLevel = Literal["token", "sequence"]
RATIO_LEVELS = get_args(RatioLevel)
# (clip_low, clip_high) when grpo.clip_low / clip_high are null. Token: PPO's and GRPO's 0.2. Sequence:
# GSPO's (Zheng et al. 2025, arXiv:2507.18071, sec. 5.1: "the left and right clipping ranges ... 3e-4 and
# 4e-4"): a sequence's ratio is a geometric mean over its tokens, so it moves far less than one token's.
CLIP_DEFAULTS: dict[str, tuple[float, float]] = {"token": (0.2, 0.2), "sequence": (3e-4, 4e-4)}


def group_advantages(rewards: torch.Tensor, n: int, scale: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """(B,) rewards laid out group after group (n per prompt) -> (B,) advantages."""
    groups = rewards.float().view(-1, n)  # (G, n)
    # A tied group is exactly zero: its float mean can differ from its value in the last bit (7 x 0.3).
    tied = tied_groups(groups, n)[:, None]  # (G, 1)
    centered = torch.where(tied, 0.0, groups - groups.mean(dim=1, keepdim=True))  # (G, n)
    if scale:
        std = groups.std(dim=1, keepdim=True) if n > 1 else torch.zeros_like(groups[:, :1])  # (G, 1)
        centered = torch.where(tied, 0.0, centered / (std + eps))
    return centered.view(-1)  # (B,)


def tied_groups(rewards: torch.Tensor, n: int) -> torch.Tensor:
    """(B,) -> (G,) bool: groups whose rewards all tie, which give GRPO no gradient."""
    groups = rewards.view(-1, n)  # (G, n)
    return (groups == groups[:, :1]).all(dim=1)


def select_groups(tied: torch.Tensor, size: int) -> tuple[list[int], int]:
    """Dynamic sampling's choice: (G,) bool tied flags of the groups drawn so far, in draw order ->
    the `size` groups the step trains on (sorted, in draw order) and how many of them are tied.

    Informative groups first, the earliest drawn; when there are fewer than `size`, tied groups (the
    earliest) fill the rest, so that the step keeps its shape.
    """
    informative = (~tied).nonzero().flatten().tolist()
    filler = tied.nonzero().flatten().tolist()
    chosen = informative[:size] + filler[: max(0, size - len(informative))]
    if len(chosen) < size:
        raise ValueError(f"{len(tied)} groups drawn, fewer than the {size} a step trains on")
    return sorted(chosen), max(0, size - len(informative))


def refill_size(informative: int, drawn: int, size: int) -> int:
    """Prompts to draw next so that `size` informative groups are likely, from the share found so
    far (`informative` of `drawn`): the deficit divided by that share, at most `size`; `size` when none
    was informative, 0 when the step is full."""
    deficit = size - informative
    if deficit <= 0:
        return 0
    if informative == 0:
        return size
    return min(size, math.ceil(deficit * drawn / informative))


def kept_rows(truncated: torch.Tensor, mask_truncated: bool) -> torch.Tensor:
    """(B,) bool truncated flags -> (B,) float 1.0 on rows that count in the loss and its normalizers:
    all of them, or with `mask_truncated` only the responses that ended (DAPO's overlong filtering:
    a cut-off response is not judged on an answer it had no room to give)."""
    return (~truncated).float() if mask_truncated else torch.ones_like(truncated, dtype=torch.float32)


def token_logprobs_and_entropy(
    hidden: torch.Tensor,
    head_weight: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
    head_bias: torch.Tensor | None = None,
    chunk_tokens: int = 512,
    with_entropy: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(B, T, H) final hidden states, (V, H) LM head, (B, T) targets -> (B, T) log p(target) and
    (B, T) entropy (or None), both of softmax(logits / temperature).

    The LM head runs `chunk_tokens` positions at a time, each chunk under activation checkpointing
    when gradients are needed: at most one chunk's (tokens, V) float32 logits exist at once, in the
    forward and in the backward, never the (B, T, V) block (151,936 columns for Qwen2.5).

    Why not a fused kernel: Liger's fused linear cross-entropy (Triton, CUDA only) gives per-token
    log-probs but no entropy, which every step logs and `grpo.entropy_coef` trains on, and its fused
    GRPO loss has its own loss math (no TIS weights, other aggregations). This path bounds memory the
    same way on every device, and CI can test it; its price is one more LM-head pass per chunk in
    the backward.
    """
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])  # (B*T, H)
    flat_targets = targets.reshape(-1)  # (B*T,)
    needs_grad = torch.is_grad_enabled() and (hidden.requires_grad or head_weight.requires_grad)
    logps, entropies = [], []
    for start in range(0, flat_hidden.shape[0], chunk_tokens):
        piece = (flat_hidden[start : start + chunk_tokens], head_weight, head_bias,
                 flat_targets[start : start + chunk_tokens], temperature, with_entropy)
        if needs_grad:
            logp, entropy = checkpoint(_head_chunk, *piece, use_reentrant=False)
        else:
            logp, entropy = _head_chunk(*piece)
        logps.append(logp)
        entropies.append(entropy)
    logp = torch.cat(logps).view_as(targets)  # (B, T)
    return logp, torch.cat(entropies).view_as(targets) if with_entropy else None


def _head_chunk(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
    temperature: float, with_entropy: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(c, H) -> (c,) log p(target), (c,) entropy (zeros when not asked for)."""
    logits = torch.nn.functional.linear(hidden, weight, bias).float()  # (c, V)
    if temperature != 1.0:
        logits = logits / temperature
    logprobs = logits.log_softmax(dim=-1)  # (c, V): one fused pass, and one in the backward
    logp = logprobs.gather(-1, targets[:, None]).squeeze(-1)  # (c,)
    if not with_entropy:
        return logp, torch.zeros_like(logp)
    return logp, -(logprobs.exp() * logprobs).sum(dim=-1)  # H = -sum p log p


def tis_weights(old_logp: torch.Tensor, engine_logp: torch.Tensor, cap: float | None) -> torch.Tensor:
    """Truncated importance sampling, per token: min(pi_old / pi_engine, cap), no gradient.

    The engine samples with its own numerics (vLLM's kernels, bf16); the ratio reweights each token
    to the trainer's policy, and the cap bounds the variance. cap=None turns it off (all ones).
    """
    if cap is None:
        return torch.ones_like(old_logp)
    return (old_logp - engine_logp).detach().exp().clamp(max=cap)  # (B, T)


def kl_low_var(logp: torch.Tensor, ref_logp: torch.Tensor, clamp: float = 10.0) -> torch.Tensor:
    """k3 estimator of KL(policy || reference) per token: exp(ref - logp) - (ref - logp) - 1 >= 0."""
    delta = (ref_logp - logp).clamp(-clamp, clamp)  # (B, T)
    return (delta.exp() - delta - 1.0).clamp(-clamp, clamp)  # (B, T)


def aggregate(
    values: torch.Tensor,
    mask: torch.Tensor,
    mode: LossAgg = "token-mean",
    num_tokens: float | None = None,
    num_seqs: float | None = None,
    horizon: int | None = None,
) -> torch.Tensor:
    """(B, T) per-token values -> scalar.

    num_tokens / num_seqs: the totals of the whole mini-batch (default: this tensor's), so that a
    mini-batch split into micro-batches sums to the same loss. horizon: the fixed length that
    "seq-mean-token-sum-norm" divides by (default T).
    """
    masked = values * mask  # (B, T)
    if mode == "token-mean":
        tokens = mask.sum().clamp(min=1) if num_tokens is None else max(num_tokens, 1.0)
        return masked.sum() / tokens
    seqs = values.shape[0] if num_seqs is None else max(num_seqs, 1.0)  # every row masked: a zero loss
    if mode == "seq-mean-token-mean":
        per_seq = masked.sum(dim=1) / mask.sum(dim=1).clamp(min=1)  # (B,)
        return per_seq.sum() / seqs
    if mode == "seq-mean-token-sum-norm":
        return masked.sum() / (seqs * (values.shape[1] if horizon is None else horizon))
    raise ValueError(f"unknown loss aggregation {mode!r}; choose token-mean, seq-mean-token-mean or seq-mean-token-sum-norm")


def log_ratio(logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor | None = None,
              level: RatioLevel = "token") -> torch.Tensor:
    """(B, T) log importance ratios log(pi / pi_old).

    token: each token's own. sequence (GSPO): every token of a response carries the response's
    length-normalized log-ratio mean_t(logp - old) as its value, with the gradient of its own logp
    (logp - sg(logp) + sg(mean)): exp of it is s_i * pi_t / sg(pi_t), GSPO-token's form, whose value
    is the sequence ratio s_i and whose gradient is s_i * grad(logp_t); averaged over the response's
    tokens (loss_agg=seq-mean-token-mean) that is exactly GSPO's gradient of s_i.
    """
    delta = logp - old_logp  # (B, T)
    if level == "token":
        return delta
    if level != "sequence":
        raise ValueError(f"grpo.ratio_level={level!r}; choose token or sequence")
    mask = torch.ones_like(delta) if mask is None else mask
    per_seq = (delta * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)  # (B,)
    return logp - logp.detach() + per_seq.detach()[:, None]  # (B, T)


def clipped_policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    weights: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    level: RatioLevel = "token",
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate per token -> ((B, T) loss, (B, T) bool where clipping was active).

    advantages: (B,) per sequence, broadcast over its tokens. weights: (B, T) per-token factors
    (truncated importance sampling), applied after the clip. level: the ratio clipped (`log_ratio`);
    at "sequence" a response is clipped as a whole (`mask` marks its tokens), so every one of its
    tokens is clipped or none.
    """
    ratio = log_ratio(logp, old_logp, mask, level).exp()  # (B, T)
    adv = advantages[:, None]  # (B, 1)
    unclipped = -adv * ratio  # (B, T)
    clipped = -adv * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)  # (B, T)
    loss = torch.maximum(unclipped, clipped)  # (B, T)
    return (loss if weights is None else loss * weights), clipped > unclipped


# ---------------------------------------------------------------------------------------------
# Micro-batches
# ---------------------------------------------------------------------------------------------


def padded_tokens(lengths: Sequence[int], rows: Sequence[int], packed: bool = False) -> int:
    """The tokens one forward over `rows` computes, padding included. `lengths`: each row's prompt plus
    response. A micro-batch lays each row out as its prompt then its response, right-padded (the
    rollout's left padding of prompts is dropped), so it is as wide as its longest row; `packed`, the
    rows go back to back as one sequence and there is no padding."""
    if packed:
        return sum(lengths[i] for i in rows)
    return len(rows) * max((lengths[i] for i in rows), default=0)


def token_budget_micro_batches(lengths: Sequence[int], budget: int, max_padding: float = 0.05,
                               packed: bool = False) -> list[list[int]]:
    """Row indices grouped into micro-batches of at most `budget` padded tokens (`padded_tokens`), each
    at most `max_padding` padding; a row longer than the budget goes alone. `lengths`: prompt plus
    response of each row. `packed` (one sequence a micro-batch): a micro-batch computes its rows' tokens
    and no padding, so the budget bounds their sum and the padding bound does not apply.

    Sorted, then filled (next-fit decreasing): rows longest first (ties by index), each micro-batch
    taking the next row while the budget allows and its padding stays within `max_padding`. The
    sorted order keeps neighbours close in length; the padding bound closes a micro-batch where the
    long tail is sparse (a 1,000-token row with a 400-token neighbour), which the budget alone would
    fill with rows padded to more than twice their length.

    Why not balanced partitioning (verl's Karmarkar-Karp over a fixed count): it evens out the token
    sums of micro-batches by mixing long rows with short ones, and each short row is then padded to
    its long neighbour. What the update costs is the padded total; the ranks' counts are evened out
    separately (empty micro-batches, in rlvr.module).
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    useful = 0  # the current micro-batch's tokens; its width is its first (longest) row's length
    for i in order:
        if current:
            padded = useful + lengths[i] if packed else (len(current) + 1) * lengths[current[0]]
            if padded > budget or (not packed and useful + lengths[i] < (1.0 - max_padding) * padded):
                batches.append(current)
                current, useful = [], 0
        current.append(i)
        useful += lengths[i]
    if current:
        batches.append(current)
    return batches


@dataclass(frozen=True)
class RowLengths:
    """What a micro-batch layout needs of each row: its prompt's and its response's lengths, and its group
    (the rows of a group share their prompt). `groups` None: no two rows share a prompt."""

    prompts: Sequence[int]
    responses: Sequence[int]
    groups: Sequence[int] | None = None

    def shares(self, i: int, j: int) -> bool:
        """Whether rows i and j have the same prompt (one copy of it can serve both)."""
        return self.groups is not None and self.groups[i] == self.groups[j]

    def lane(self, lane: Sequence[int]) -> int:
        """A lane's tokens, its rows back to back: each row's response, and its prompt unless the row before
        it is of its group. Such rows make a segment, one prompt then their responses, each response
        seeing the prompt and itself only (rlvr.module lays it out, with the attention mask that says so)."""
        return sum(self.responses[i] + (0 if k and self.shares(lane[k - 1], i) else self.prompts[i])
                   for k, i in enumerate(lane))

    def tokens(self, lanes: Sequence[Sequence[int]]) -> int:
        """The tokens one forward over `lanes` computes, padding included: every lane as wide as the
        fullest. One row a lane is the padded layout (`padded_tokens`), one lane of every row, unshared,
        the packed sequence."""
        return len(lanes) * max((self.lane(lane) for lane in lanes), default=0)


def prompt_segments(rows: RowLengths, pool: Sequence[int], width: int) -> list[list[int]]:
    """The rows of `pool` cut into segments of at most `width` tokens (`RowLengths.lane`): one prompt, then
    responses of its group. Each group's rows longest first, each into the first of the group's
    segments with room (first fit decreasing), else a segment of its own (alone if it is wider)."""
    segments: list[list[int]] = []
    room: list[int] = []
    open_by_group: dict[int, list[int]] = {}  # group -> indices into segments
    for i in sorted(pool, key=lambda i: (-rows.responses[i], i)):
        group = rows.groups[i] if rows.groups is not None else -1 - i  # unshared: a group of its own
        for k in open_by_group.setdefault(group, []):
            if rows.responses[i] <= room[k]:
                segments[k].append(i)
                room[k] -= rows.responses[i]
                break
        else:
            open_by_group[group].append(len(segments))
            segments.append([i])
            room.append(width - rows.prompts[i] - rows.responses[i])
    return segments


def fill_lanes(sizes: Sequence[int], pool: Sequence[int], width: int, most: int) -> tuple[list[list[int]], list[int]]:
    """Up to `most` lanes of `width` tokens, each filled with the largest items of `pool` that still fit,
    until none does (largest fit) -> (the lanes, the items of `pool` left over, in order). `pool`:
    indices into `sizes`, largest first (ties by index)."""
    rest = list(pool)
    lanes: list[list[int]] = []
    while rest and len(lanes) < most:
        lane, space = [], width
        # the first (largest) item of the rest that fits in `space`: rest is sorted by -size
        while (k := bisect_left(rest, -space, key=lambda i: -sizes[i])) < len(rest):
            space -= sizes[rest[k]]
            lane.append(rest.pop(k))
        if not lane:
            break
        lanes.append(lane)
    return lanes, rest


def lane_micro_batches(rows: RowLengths, budget: int, max_padding: float = 0.05) -> list[list[list[int]]]:
    """Row indices grouped into micro-batches of lanes (`RowLengths.tokens`), at most `budget` tokens each
    with their padding, and at most `max_padding` padding where any lane count allows it; a row
    longer than the budget goes alone.

    Why lanes: under sdpa or eager attention (no varlen kernel) one packed sequence of T tokens pays a
    dense T x T mask, so a micro-batch packs its rows into several lanes instead, each under its own
    mask: short rows share a lane, so a micro-batch holds about the budget and there are fewer of them,
    without padding; and rows of one group share one copy of their prompt (`prompt_segments`), so a
    prompt is computed about once per lane instead of once per sample: a GRPO group's n samples all
    follow the same prompt.

    Rows longest first; each micro-batch starts at the longest row left and tries lane counts from the
    most that row allows (budget // its length) down to one, lanes as wide as budget // lanes but never
    wider than twice the longest row of all: a lane's attention per token is then at most twice the
    padded layout's widest row, which sharing a prompt repays whenever responses are shorter than
    prompts (k samples of a prompt P in one lane attend over (P + k R)^2 scores, alone over
    k (P + R)^2). Of the tries within `max_padding` it keeps the one that computes the fewest tokens
    for the rows it holds (the least padded when none is within); the narrowest among equals. For each
    width the rows are cut into prompt segments and laid into lanes largest fit (`pack_lanes`), and the
    lanes trimmed to the fullest.
    """
    count = len(rows.prompts)
    full = [rows.prompts[i] + rows.responses[i] for i in range(count)]
    pool = sorted(range(count), key=lambda i: (-full[i], i))
    widest = 2 * full[pool[0]] if pool else 0
    batches: list[list[list[int]]] = []
    while pool:
        longest = max(1, full[pool[0]])
        if longest > budget:  # alone
            batches.append([[pool.pop(0)]])
            continue
        best: tuple[tuple[bool, float], list[list[int]], list[int]] | None = None
        tried = 0
        for most in range(max(1, budget // longest), 0, -1):  # the most, narrowest lanes first
            width = min(widest, max(longest, budget // most))
            if width == tried:
                continue  # as wide as the last try: fewer lanes of it would only leave more rows out
            tried = width
            lanes, rest = pack_lanes(rows, pool, width, most)
            computed = rows.tokens(lanes)
            padding = 1.0 - sum(rows.lane(lane) for lane in lanes) / computed
            # within the bound: the fewest computed tokens per token of the rows held; else the least padding
            rank = (padding > max_padding, padding if padding > max_padding
                    else computed / sum(full[i] for lane in lanes for i in lane))
            if best is None or rank < best[0]:
                best = (rank, lanes, rest)
        assert best is not None
        _, lanes, rest = best
        batches.append(lanes)
        pool = sorted(rest, key=lambda i: (-full[i], i))
    return batches


def pack_lanes(rows: RowLengths, pool: Sequence[int], width: int, most: int) -> tuple[list[list[int]], list[int]]:
    """Up to `most` lanes of `width` tokens from the rows of `pool` -> (the lanes, the rows left over): the
    rows cut into prompt segments (`prompt_segments`), the segments laid into lanes largest fit
    (`fill_lanes`), and in each lane the segments of one group made adjacent, so they share one prompt."""
    segments = prompt_segments(rows, pool, width)
    sizes = [rows.lane(segment) for segment in segments]
    placed, left = fill_lanes(sizes, sorted(range(len(segments)), key=lambda k: (-sizes[k], k)), width, most)
    group = (lambda k: rows.groups[segments[k][0]]) if rows.groups is not None else (lambda k: 0)
    lanes = [[i for k in sorted(lane, key=group) for i in segments[k]] for lane in placed]  # stable sort
    return lanes, [i for k in left for i in segments[k]]


# ---------------------------------------------------------------------------------------------
# The step's settings (checked before anything loads: this module imports torch only)
# ---------------------------------------------------------------------------------------------


@dataclass
class GRPOConfig:
    n: int = 8  # samples per prompt (the group)
    ppo_epochs: int = 1
    mini_batch_size: int | None = None  # prompts per update; None = the whole batch, one update
    micro_batch_size: int = 8  # sequences per forward/backward
    micro_batch_tokens: int | None = None  # padded tokens per forward/backward, rows sorted by length; wins when set
    pack: bool | str = "auto"  # rows back to back: auto, lanes, sequence (true) or false (padded rows); rlvr.module.layout
    clip_low: float | None = None  # None: CLIP_DEFAULTS[ratio_level]
    clip_high: float | None = None
    ratio_level: RatioLevel = "token"  # sequence: GSPO's length-normalized ratio of the whole response
    mask_truncated: bool = False  # truncated responses contribute no loss (nor count in the normalizers)
    dynamic_sampling: bool = False  # drop tied groups and refill (callbacks.rollout); the step is unchanged
    max_sampling_rounds: int = 3  # generation rounds per step with dynamic sampling, the first included
    kl_coef: float = 0.001
    entropy_coef: float = 0.001
    loss_agg: LossAgg = "token-mean"
    scale_advantages: bool = True  # False: Dr. GRPO, no division by the group's std
    temperature: float = 1.0  # the sampling temperature, so log-probs match the sampler
    max_new_tokens: int = 1024  # the horizon of seq-mean-token-sum-norm
    tis_cap: float | None = 2.0  # truncated importance sampling min(pi_old / pi_engine, cap); None: off
    logprob_chunk_tokens: int = 512  # positions per chunk through the LM head
    reference_dtype: str | None = None  # the KL reference's dtype (e.g. bfloat16); None: the policy's
    optimizer: str = "adamw"  # rlvr.optim.OPTIMIZERS
    bf16_stochastic_round: bool = False  # torchao optimizers on bf16 weights
    lr: float = 1e-6
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    max_grad_norm: float = 1.0
    warmup_steps: int = 0  # updates of linear warm-up, then constant
    max_consecutive_skips: int = 5  # non-finite updates in a row before the run stops

    def __post_init__(self) -> None:
        """Reject settings that cannot train, naming the config key and the reason; fill the clip ranges
        left null with the ratio level's defaults."""
        if self.ratio_level not in RATIO_LEVELS:
            raise ValueError(f"grpo.ratio_level={self.ratio_level!r}; choose one of {list(RATIO_LEVELS)}")
        low, high = CLIP_DEFAULTS[self.ratio_level]
        self.clip_low = low if self.clip_low is None else self.clip_low
        self.clip_high = high if self.clip_high is None else self.clip_high
        if self.n < 2:
            raise ValueError(f"rollout.n={self.n}: GRPO compares samples within a group, so it needs n >= 2")
        if self.temperature <= 0:
            raise ValueError(f"rollout.temperature={self.temperature}: training needs sampling (> 0); greedy "
                             "samples of a group are identical and give no signal")
        for key in ("ppo_epochs", "micro_batch_size", "max_new_tokens", "max_consecutive_skips", "logprob_chunk_tokens",
                    "max_sampling_rounds"):
            if getattr(self, key) < 1:
                raise ValueError(f"grpo.{key}={getattr(self, key)} must be at least 1")
        if self.micro_batch_tokens is not None and self.micro_batch_tokens < 1:
            raise ValueError(f"grpo.micro_batch_tokens={self.micro_batch_tokens} must be at least 1 (or null: "
                             "grpo.micro_batch_size rows per micro-batch)")
        if self.pack not in (True, False, "auto", "lanes", "sequence"):
            raise ValueError(f"grpo.pack={self.pack!r}; choose auto, lanes, sequence (or true) or false")
        if self.mini_batch_size is not None and self.mini_batch_size < 1:
            raise ValueError(f"grpo.mini_batch_size={self.mini_batch_size} must be at least 1 (or null)")
        if self.loss_agg not in LOSS_AGGS:
            raise ValueError(f"grpo.loss_agg={self.loss_agg!r}; choose one of {list(LOSS_AGGS)}")
        if self.clip_low < 0 or self.clip_high < 0 or self.kl_coef < 0 or self.lr <= 0:
            raise ValueError("grpo.clip_low, grpo.clip_high and grpo.kl_coef must be >= 0, and optim.lr > 0")
        if self.tis_cap is not None and self.tis_cap <= 0:
            raise ValueError(f"grpo.tis_cap={self.tis_cap} must be > 0 (or null to turn it off)")

    def updates_per_step(self, batch_size: int, world: int = 1) -> int:
        """Optimizer steps per GRPO step; `world` processes each take an equal share of every mini-batch."""
        mini = self.mini_batch_size or batch_size
        if batch_size % mini:
            raise ValueError(f"batch_size={batch_size} is not divisible by grpo.mini_batch_size={mini}: "
                             "a mini-batch must hold whole groups of the batch")
        if mini % world:
            key = "grpo.mini_batch_size" if self.mini_batch_size else "batch_size"
            raise ValueError(f"{key}={mini} is not divisible by the {world} processes (devices x num_nodes): "
                             "each needs the same number of whole groups")
        return self.ppo_epochs * (batch_size // mini)
