"""The rollout batch: what the rollout callback builds before a step and the GRPO step consumes.

B prompts x n samples = N rows, laid out as [left-padded prompt | right-padded response], with
the engine's log-probs of the sampled tokens and the scored rewards.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rlvr.engines import protocol
from rlvr.rewards import RewardBatch


@dataclass
class Rollout:
    input_ids: torch.Tensor  # (N, P + R)
    attention_mask: torch.Tensor  # (N, P + R)
    response_mask: torch.Tensor  # (N, R) float, 1.0 on response tokens
    engine_logprobs: torch.Tensor  # (N, R) float32, the engine's log-prob of each response token (0 on padding)
    truncated: torch.Tensor  # (N,) bool: cut at max_new_tokens without EOS
    rewards: RewardBatch

    @property
    def prompt_width(self) -> int:
        return self.input_ids.shape[1] - self.response_mask.shape[1]

    def to(self, device: torch.device | str) -> Rollout:
        """The tensors the step computes with, on `device` (rewards and flags stay where they are)."""
        self.input_ids = self.input_ids.to(device)
        self.attention_mask = self.attention_mask.to(device)
        self.response_mask = self.response_mask.to(device)
        self.engine_logprobs = self.engine_logprobs.to(device)
        return self


def pack_rollout(
    prompts: list[list[int]], generation: protocol.Generation, n: int, pad_id: int, eos_ids: list[int],
    rewards: RewardBatch,
) -> Rollout:
    """Lay out prompt i's n completions (rows i*n .. i*n+n-1) as padded tensors."""
    completions = generation.tokens
    width_p = max(len(p) for p in prompts)
    width_r = max(1, max(len(c) for c in completions))
    rows = len(completions)
    input_ids = torch.full((rows, width_p + width_r), pad_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    response_mask = torch.zeros(rows, width_r)
    logprobs = torch.zeros(rows, width_r)
    truncated = torch.zeros(rows, dtype=torch.bool)
    for row, (completion, completion_logprobs) in enumerate(zip(completions, generation.logprobs, strict=True)):
        prompt = prompts[row // n]
        input_ids[row, width_p - len(prompt) : width_p] = torch.tensor(prompt)
        input_ids[row, width_p : width_p + len(completion)] = torch.tensor(completion, dtype=torch.long)
        attention_mask[row, width_p - len(prompt) : width_p + len(completion)] = 1
        response_mask[row, : len(completion)] = 1.0
        logprobs[row, : len(completion)] = torch.tensor(completion_logprobs, dtype=torch.float32)
        truncated[row] = protocol.truncated(completion, eos_ids)
    return Rollout(input_ids, attention_mask, response_mask, logprobs, truncated, rewards)
