"""GRPO math as pure tensor functions: advantages, token log-probs, the clipped loss, KL, entropy.

Choices (after DeepSeekMath's GRPO with DAPO's decoupled clip and Dr. GRPO's options):
- advantages are normalized within each group of n samples of one prompt: (r - mean) / (std + eps),
  or (r - mean) alone with `scale=False` (Dr. GRPO); a group whose rewards all tie gets zero;
- the PPO-clipped surrogate with separate low/high clip ranges;
- KL to a frozen reference with the k3 ("low_var_kl") estimator, as a loss term;
- an entropy bonus;
- losses aggregated per token over a whole mini-batch ("token-mean", the default), per sequence
  ("seq-mean-token-mean"), or summed per sequence over a fixed horizon ("seq-mean-token-sum-norm",
  Dr. GRPO). Normalizers are passed in so that micro-batch losses add up to the mini-batch loss.

Shapes: B sequences, T response tokens, V vocabulary. Masks are 1.0 on response tokens.
"""

from __future__ import annotations

from typing import Literal, get_args

import torch

LossAgg = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"]
LOSS_AGGS = get_args(LossAgg)


def group_advantages(rewards: torch.Tensor, n: int, scale: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """(B,) rewards laid out group after group (n per prompt) -> (B,) advantages."""
    groups = rewards.float().view(-1, n)  # (G, n)
    centered = groups - groups.mean(dim=1, keepdim=True)  # (G, n)
    if scale:
        std = groups.std(dim=1, keepdim=True) if n > 1 else torch.zeros_like(groups[:, :1])  # (G, 1)
        # A tied group is exactly zero, whatever eps is (0 / 0 would be NaN).
        centered = torch.where(std > 0, centered / (std + eps), torch.zeros_like(centered))
    return centered.view(-1)  # (B,)


def tied_groups(rewards: torch.Tensor, n: int) -> torch.Tensor:
    """(B,) -> (G,) bool: groups whose rewards all tie, which give GRPO no gradient."""
    groups = rewards.view(-1, n)  # (G, n)
    return (groups == groups[:, :1]).all(dim=1)


def token_logprobs_and_entropy(
    logits: torch.Tensor, targets: torch.Tensor, with_entropy: bool = True, rows_per_chunk: int = 1
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(B, T, V) logits, (B, T) targets -> (B, T) log p(target), (B, T) entropy or None.

    Works `rows_per_chunk` sequences at a time in float32, so at most that many (T, V) blocks of
    log-softmax exist at once, never the whole micro-batch's.
    """
    logps, entropies = [], []
    for start in range(0, logits.shape[0], rows_per_chunk):
        chunk = logits[start : start + rows_per_chunk].float()  # (b, T, V)
        logp_all = chunk.log_softmax(dim=-1)  # (b, T, V)
        logps.append(logp_all.gather(-1, targets[start : start + rows_per_chunk, :, None]).squeeze(-1))  # (b, T)
        if with_entropy:
            entropies.append(-(logp_all.exp() * logp_all).sum(dim=-1))  # (b, T)
    logp = torch.cat(logps)  # (B, T)
    return logp, torch.cat(entropies) if with_entropy else None


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
    seqs = values.shape[0] if num_seqs is None else num_seqs
    if mode == "seq-mean-token-mean":
        per_seq = masked.sum(dim=1) / mask.sum(dim=1).clamp(min=1)  # (B,)
        return per_seq.sum() / seqs
    if mode == "seq-mean-token-sum-norm":
        return masked.sum() / (seqs * (values.shape[1] if horizon is None else horizon))
    raise ValueError(f"unknown loss aggregation {mode!r}; choose token-mean, seq-mean-token-mean or seq-mean-token-sum-norm")


def clipped_policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate per token -> ((B, T) loss, (B, T) bool where clipping was active).

    advantages: (B,) per sequence, broadcast over its tokens.
    """
    ratio = (logp - old_logp).exp()  # (B, T)
    adv = advantages[:, None]  # (B, 1)
    unclipped = -adv * ratio  # (B, T)
    clipped = -adv * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)  # (B, T)
    return torch.maximum(unclipped, clipped), clipped > unclipped
