"""The GRPO step as a LightningModule with manual optimization.

One training step consumes one rollout batch (B prompts x n samples, generated and scored by the
rollout callback before the step) and makes ppo_epochs x mini-batches AdamW updates, each
accumulating gradients over micro-batches. Old log-probs are those of the policy before the
first update; when there is a single update per step the policy is still the one that sampled,
so the ratio is exactly 1 and the extra forward pass is skipped. The reference model for the KL
term is a frozen copy of the initial policy, held only when kl_coef > 0, and never checkpointed
(resume rebuilds it from the same source as the initial weights). An adapter run (rlvr.adapters)
optimizes, clips and checkpoints the adapter's weights only, and its reference is the policy's own
frozen base with the adapter switched off: no copy.

Under DDP (or FSDP) each rank holds B / world prompts of the global batch. Loss normalizers are the
global token and sequence counts (all-reduced), so the all-reduced gradient is that of the global
batch and the first-step loss equals a one-process run's. Gradients are all-reduced once per update,
on its last micro-batch. Micro-batches cut by a token budget (`grpo.micro_batch_tokens`) may number
differently on each rank; every rank then runs the largest count, the missing ones as empty
micro-batches (a masked forward and backward), so that FSDP2's collectives pair up. A micro-batch lays
its rows out as `layout` says (grpo.pack): padded rows, one packed sequence, or lanes of rows back to
back where the samples of one prompt share a copy of it (`lay_out`).

The ratio is per token, or with grpo.ratio_level=sequence (GSPO) the response's length-normalized ratio
(rlvr.grpo.log_ratio). With grpo.mask_truncated the responses cut at max_new_tokens drop out of the loss
and of its normalizers.

An update whose loss or gradient is not finite is skipped: its gradients are dropped before the
optimizer step, so neither the weights nor AdamW's moments see it. It is counted, and too many in a
row stop the run. An update whose gradient is exactly zero (every group's rewards tie and no KL or
entropy term acts) is skipped the same way: AdamW would otherwise still move every weight, by its
moments from earlier updates and by weight decay, along no signal at all. With no KL and no entropy
term, the rows of tied groups (advantage 0) are not even run: they add exactly 0 to the loss and the
gradient, and still count in its normalizers, so at low accuracy the update computes only the groups
that carry a signal. The diagnostics (entropy, clip fraction, TIS weight, engine gap) are then means
over the rows that ran, and NaN on a step that ran none. The checkpoint also carries every RNG state
and those counters.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import random
import time
from dataclasses import asdict

import lightning as L
import numpy as np
import torch
import torchmetrics
from torch import nn

from rlvr import adapters, distributed, grpo
from rlvr.errors import UserError
from rlvr.grpo import GRPOConfig
from rlvr.optim import make_optimizer
from rlvr.engines.protocol import Generation
from rlvr.rewards import RewardBatch, pearson
from rlvr.rollout import Rollout, pack_rollout

log = logging.getLogger(__name__)

def reference_copy(policy: nn.Module, dtype: str | None) -> nn.Module:
    """The frozen KL reference: a copy of the initial policy, in `dtype` (bf16 halves it) or the policy's."""
    reference = copy.deepcopy(policy)
    return reference if dtype is None else reference.to(getattr(torch, dtype))


class TokenLogprobs(nn.Module):
    """A causal LM's log-probs (and entropies) of given tokens, as one forward.

    One forward, so that under FSDP2 the root unit (embeddings, final norm, LM head) is gathered for
    the whole computation: the decoder body runs to hidden states, and the LM head runs over them in
    checkpointed chunks (rlvr.grpo), never the full-vocabulary logits.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor, attention: torch.Tensor | None, positions: torch.Tensor, predicts: torch.Tensor,
                temperature: float, chunk_tokens: int, entropy: bool,
                targets: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`ids`, `positions` (lanes, W), as `lay_out` makes them: rows right-padded under a 2-D
        `attention` mask; or, `attention` None, rows back to back with positions restarting at 0 in each,
        which transformers reads as packed sequences (a block-diagonal causal mask, or flash-attention's
        cu_seqlens); or a 4-D `attention` mask of its own (lanes with shared prompts). `predicts` (any
        shape): the flat positions whose hidden states predict `targets` (default: the token after each)
        -> log-probs of those tokens (and entropies), shaped as `predicts`."""
        body, head = self.model.get_decoder(), self.model.get_output_embeddings()
        hidden = body(input_ids=ids, attention_mask=attention, position_ids=positions,
                      use_cache=False).last_hidden_state.flatten(0, 1)  # (lanes W, H)
        targets = ids.flatten()[predicts + 1] if targets is None else targets
        return grpo.token_logprobs_and_entropy(hidden[predicts], head.weight, targets, temperature,
                                               head.bias, chunk_tokens=chunk_tokens, with_entropy=entropy)


def layout(pack: bool | str, policy: nn.Module) -> str:
    """How a micro-batch lays out its rows (grpo.pack), as lanes of rows back to back (rlvr.grpo.RowLengths):
    - `rows` (false): one row a lane, right-padded to the longest, under a 2-D attention mask;
    - `sequence` (true): every row in one lane, for flash attention (varlen kernels over cu_seqlens;
      transformers calls every flavour "flash...") and flex attention (a block-sparse mask), which
      compute each packed row at its own length;
    - `lanes`: a few lanes at most twice as wide as the longest row (rlvr.grpo.lane_micro_batches),
      each a row's prompt then the responses of its group that share it, under a 4-D mask of rlvr's own
      (a response sees its prompt and itself): for sdpa and eager, whose masks are dense anyway, so
      that one sequence of T tokens would pay T^2 attention scores; lanes of width W pay what padded
      rows of W do, without their padding, and a prompt is computed once for several samples.
    `auto`: sequence under flash or flex attention, lanes under sdpa and eager, rows under any other
    and for a model with sliding-window layers (rlvr's mask would replace their window)."""
    implementation = attention_implementation(policy)
    if pack is False or pack is True:
        return "sequence" if pack else "rows"
    lanes_fit = implementation in MASKED_ATTENTION and not _windowed(policy.config)
    if pack == "lanes" and not lanes_fit:
        raise UserError(f"grpo.pack=lanes needs sdpa or eager attention (a 4-D mask) and no sliding-window layers "
                        f"(this model: {implementation}); set grpo.pack=auto")
    if pack != "auto":
        return pack
    if "flash" in implementation or implementation == "flex_attention":
        return "sequence"
    return "lanes" if lanes_fit else "rows"


MASKED_ATTENTION = ("sdpa", "eager")  # the attention implementations that take a 4-D mask as it is


def attention_implementation(policy: nn.Module) -> str:
    """The policy's attention implementation, as transformers reads it (eager when unset)."""
    return getattr(policy.config, "_attn_implementation", None) or "eager"


def _windowed(config) -> bool:
    """Whether some layers attend over a sliding window: transformers passes a 4-D mask to every layer
    as it is, so lanes would give those layers full attention."""
    return getattr(config, "sliding_window", None) is not None or "sliding_attention" in (
        getattr(config, "layer_types", None) or [])


class _Frozen:
    """Holds a model outside the module tree: not optimized, not checkpointed, moved by hand."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model.eval().requires_grad_(False)
        self.logprobs = TokenLogprobs(self.model)


Lanes = list[list[int]]  # a micro-batch: lanes of rollout rows, each lane's rows back to back


def _forward_lanes(lanes: Lanes) -> Lanes:
    """The lanes a micro-batch's forward runs: its own, or for an empty one (padding, so that every rank
    runs as many forwards and collectives as the busiest) row 0, whose loss is then masked out."""
    return lanes or [[0]]


def _rows(lanes: Lanes, device: torch.device) -> torch.Tensor:
    """(b,) the rows of `lanes`, lane after lane: the order of every per-row tensor of a micro-batch."""
    return torch.tensor([row for lane in lanes for row in lane], dtype=torch.long, device=device)


def prompt_groups(rollout: Rollout, rows: torch.Tensor) -> list[int]:
    """(b,) for each of `rows`, an id shared by exactly the rows with the same prompt (a GRPO group's n
    samples, and any other row that repeats the prompt)."""
    p = rollout.prompt_width
    prompts = torch.cat([rollout.input_ids[rows, :p], rollout.attention_mask[rows, :p]], dim=1)  # (b, 2p)
    return torch.unique(prompts, dim=0, return_inverse=True)[1].tolist()


def row_lengths(rollout: Rollout, rows: torch.Tensor, shared: bool) -> grpo.RowLengths:
    """The prompt and response lengths of `rows` (indexed 0..b-1), with their prompt groups when a
    layout shares prompts."""
    p = rollout.prompt_width
    return grpo.RowLengths(rollout.attention_mask[rows, :p].sum(dim=1).tolist(),
                           rollout.response_mask[rows].sum(dim=1).long().tolist(),
                           prompt_groups(rollout, rows) if shared else None)


def lay_out(rollout: Rollout, lanes: Lanes, shared: bool):
    """The inputs of one forward over `lanes` (rollout rows back to back in each, rlvr.grpo.RowLengths.lane)
    -> ids and positions (lanes, W), the attention mask, predicts and targets (b, r): for each row's r
    response slots, the flat position whose hidden state predicts it and the token, and the response
    mask (b, r). W is the fullest lane; b the rows in lane order, r their longest response.

    A row is its prompt (unless the row before it in the lane has the same one and `shared`), then its
    response, at positions 0.. (the rollout's left padding of prompts is dropped). The mask: one row a
    lane, a 2-D padding mask (each row right-padded); unshared rows back to back, none (positions
    restarting at 0 mark where rows begin, which transformers reads as packed sequences: a
    block-diagonal causal mask, or flash attention's cu_seqlens); `shared`, a (lanes, 1, W, W) boolean
    mask where a token sees the earlier tokens of its prompt and of its own response, and a lane's
    padding the earlier padding of its lane (so that no row of the mask is empty). The first response
    token of every row of a shared prompt is predicted by the prompt's last hidden state."""
    device = rollout.input_ids.device
    rows = _rows(lanes, device)
    p = rollout.prompt_width
    lengths = row_lengths(rollout, rows, shared)
    prompts, responses = lengths.prompts, lengths.responses
    # Where each row's prompt (its segment's) and response start in its lane; a segment id for each prompt
    prompt_at, response_at, writes, segment, fills = [], [], [], [], []
    i = 0
    for lane in lanes:
        fill = 0
        for k in range(len(lane)):
            if k and lengths.shares(i - 1, i):
                writes.append(False)
                prompt_at.append(prompt_at[-1])
            else:
                writes.append(True)
                prompt_at.append(fill)
                fill += prompts[i]
            segment.append(i if writes[-1] else segment[-1])
            response_at.append(fill)
            fill += responses[i]
            i += 1
        fills.append(fill)
    width, count = max(fills), len(lanes)
    lane_start = torch.tensor([k * width for k, lane in enumerate(lanes) for _ in lane], device=device)  # (b,)
    prompt_at = lane_start + torch.tensor(prompt_at, device=device)  # (b,) flat
    response_at = lane_start + torch.tensor(response_at, device=device)
    prompt_len = torch.tensor(prompts, device=device)  # (b,)
    response_len = torch.tensor(responses, device=device)
    r = max(1, max(responses))
    source = rollout.input_ids[rows]  # (b, p + R): prompts left-padded to p, then responses
    # The tokens: each written prompt, then every response
    prompt_cols = torch.arange(p, device=device)  # (p,)
    in_prompt = (prompt_cols >= p - prompt_len[:, None]) & torch.tensor(writes, device=device)[:, None]  # (b, p)
    prompt_dest = (prompt_at[:, None] + prompt_cols - (p - prompt_len[:, None]))[in_prompt]
    response_cols = torch.arange(r, device=device)  # (r,)
    in_response = response_cols < response_len[:, None]  # (b, r)
    response_dest = (response_at[:, None] + response_cols)[in_response]
    ids = torch.zeros(count * width, dtype=source.dtype, device=device)  # padding id 0, never attended to
    ids[prompt_dest] = source[:, :p][in_prompt]
    ids[response_dest] = source[:, p : p + r][in_response]
    positions = torch.zeros(count * width, dtype=torch.long, device=device)
    positions[prompt_dest] = (prompt_cols - (p - prompt_len[:, None])).expand(len(rows), p)[in_prompt]
    positions[response_dest] = (prompt_len[:, None] + response_cols)[in_response]
    # Which row's response predicts what: slot 0 from its prompt's last token, slot t from response token t-1
    predicts = torch.where(response_cols == 0, (prompt_at + prompt_len - 1)[:, None],
                           response_at[:, None] + response_cols - 1)  # (b, r)
    targets = source[:, p : p + r]  # (b, r)
    mask = rollout.response_mask[rows, :r]  # (b, r)
    ids, positions = ids.view(count, width), positions.view(count, width)
    if count == len(rows):  # one row a lane: right-padded rows under a padding mask
        real = torch.arange(width, device=device) < torch.tensor(fills, device=device)[:, None]
        return ids, real.long(), positions, predicts, targets, mask
    if not shared:
        return ids, None, positions, predicts, targets, mask
    # Shared prompts: a token sees its segment's prompt and its own row's response, causally
    seg = (-1 - torch.arange(count, device=device)).repeat_interleave(width)  # padding: -1 - lane, its own
    own = torch.full((count * width,), -1, dtype=torch.long, device=device)  # -1: a prompt (or padding) token
    segment_of = torch.tensor(segment, device=device)
    seg[prompt_dest] = segment_of[:, None].expand(len(rows), p)[in_prompt]
    seg[response_dest] = segment_of[:, None].expand(len(rows), r)[in_response]
    own[response_dest] = torch.arange(len(rows), device=device)[:, None].expand(len(rows), r)[in_response]
    seg, own = seg.view(count, width), own.view(count, width)
    causal = torch.ones(width, width, dtype=torch.bool, device=device).tril()  # (W, W): query x key
    attention = (seg[:, :, None] == seg[:, None, :]) & causal & (
        (own[:, None, :] == -1) | (own[:, :, None] == own[:, None, :]))  # (lanes, W, W)
    return ids, attention[:, None], positions, predicts, targets, mask


class _AdapterOff:
    """An adapter run's KL reference: the policy's log-probs with its adapter switched off."""

    model = None  # nothing of its own to move or shard

    def __init__(self, policy: nn.Module, policy_logprobs: TokenLogprobs) -> None:
        def logprobs(*args):
            with adapters.adapter_off(policy):
                return policy_logprobs(*args)

        self.logprobs = logprobs


# Logged means over the tokens an update computed, not over the loss's normalizer
DIAGNOSTICS = ("pg_clipfrac", "kl", "entropy", "tis_weight", "logprob_gap_mean")
REWARD_KEYS = ("verify", "format", "reflect", "total", "accuracy")


class GRPOModule(L.LightningModule):
    def __init__(self, policy: nn.Module, config: GRPOConfig, batch_size: int, model_spec: dict | None = None,
                 world: int = 1, adapter: dict | None = None) -> None:
        """`batch_size` is global (prompts per step over all `world` processes). `model_spec` (what
        rlvr.models.ModelSpec holds) and `adapter` (rlvr.adapters.AdapterSpec, for a policy that
        rlvr.adapters.apply built) go into the checkpoint, so that `rlvr.evaluate` can rebuild the
        policy from the checkpoint file alone."""
        super().__init__()
        self.automatic_optimization = False
        self.policy = policy
        object.__setattr__(self, "_policy_logprobs", TokenLogprobs(policy))  # outside the tree: keys stay policy.*
        self.config = config
        self.batch_size = batch_size
        self.updates_per_step = config.updates_per_step(batch_size, world)
        self._layout = layout(config.pack, policy)
        self.adapted = adapters.is_adapted(policy)
        self.strict_loading = not self.adapted  # its checkpoints hold the adapter only (on_load_checkpoint checks them)
        self._reference = None
        if config.kl_coef > 0:
            self._reference = (_AdapterOff(policy, self._policy_logprobs) if self.adapted
                               else _Frozen(reference_copy(policy, config.reference_dtype)))
        # dist_sync_on_step: the logged reward is the mean over every rank's rollouts
        self.reward_metrics = nn.ModuleDict({k: torchmetrics.MeanMetric(dist_sync_on_step=True) for k in REWARD_KEYS})
        self.overlong_metric = torchmetrics.MeanMetric(dist_sync_on_step=True)  # logged only when it is on
        self.skipped_updates = 0  # updates skipped for a non-finite loss or gradient, in all
        self.consecutive_skips = 0
        self.no_signal_updates = 0  # updates skipped for a gradient that is exactly zero, in all
        # logger=False: the loggers get the whole resolved config from train.py instead
        self.save_hyperparameters({"grpo": asdict(config), "batch_size": batch_size, "model": model_spec,
                                   "adapter": adapter}, logger=False)

    def configure_optimizers(self):
        c = self.config
        optimizer = make_optimizer(c.optimizer, adapters.trainable(self.policy), lr=c.lr, betas=c.betas,
                                   weight_decay=c.weight_decay, bf16_stochastic_round=c.bf16_stochastic_round)
        warmup = max(c.warmup_steps, 1)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda update: min(1.0, (update + 1) / warmup))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def configure_model(self) -> None:
        """Under FSDP2 (Lightning's ModelParallelStrategy sets a device mesh), shard the policy and
        the reference, one unit per decoder layer; otherwise nothing."""
        if self.device_mesh is None or distributed.is_sharded(self._policy_logprobs):
            return
        mesh = self.device_mesh["data_parallel"]
        distributed.shard(self._policy_logprobs, self.policy, mesh)
        if self._reference is not None:
            distributed.shard(self._reference.logprobs, self._reference.model, mesh)

    def on_fit_start(self) -> None:
        if self._reference is not None and self._reference.model is not None \
                and not distributed.is_sharded(self._reference.logprobs):
            self._reference.model.to(self.device)
        # every rank decides the same way (under FSDP2 a rank's layout changes its collectives' count)
        if self._layout != "rows" and not self.trainer.strategy.reduce_boolean_decision(
                self._keeps_packed_rows_apart(), all=True):
            if self.config.pack != "auto":
                raise UserError(f"grpo.pack={self.config.pack}: this model lets a row packed beside another attend to "
                                "it (it does not keep packed rows apart); set grpo.pack=false")
            if self.trainer.is_global_zero:
                log.warning("This model lets a row packed beside another attend to it (it does not keep packed rows "
                            "apart), so micro-batches run as padded rows (as grpo.pack=false)")
            self._layout = "rows"

    def _keeps_packed_rows_apart(self) -> bool:
        """Whether this model keeps rows laid out back to back apart, as packing relies on: through the
        4-D mask rlvr passes (lanes), or transformers' reading of restarting positions as packed sequences
        (one sequence), which a model that builds its masks otherwise would not do, silently mixing rows.
        One lane of prompt A with two samples, then prompt B with one, three times: B's sample and A's
        second must not change when A's first does, nor B's when A's prompt does. The shapes are the same
        each time, so rows kept apart give the same numbers (a small tolerance for kernels that are not
        bitwise deterministic)."""
        def logprobs(prompt: list[int], first: list[int]) -> torch.Tensor:
            zeros = torch.zeros(4)
            rollout = pack_rollout([prompt, [9, 10]], Generation([first, [5, 6], [7, 8], [3]], [[0.0, 0.0]] * 3 + [[0.0]]),
                                   2, 0, [], RewardBatch(zeros, zeros, zeros, zeros, 0)).to(self.device)
            return self._logprobs(self._policy_logprobs, rollout, [[0, 1, 2]], entropy=False)[0].float()

        training = self.policy.training
        self.policy.eval()  # no dropout
        try:
            with torch.no_grad():
                base, first, prompt = (logprobs([3, 4, 5], [3, 4]), logprobs([3, 4, 5], [11, 12]),
                                       logprobs([13, 14, 15], [11, 12]))
        finally:
            self.policy.train(training)
        same = lambda x, y: bool(torch.allclose(x, y, rtol=0.0, atol=1e-5))  # noqa: E731
        return same(base[1:], first[1:]) and same(first[2], prompt[2])

    # -- log-probs -----------------------------------------------------------------------------

    def _logprobs(self, model: TokenLogprobs, rollout: Rollout, lanes: Lanes, entropy: bool):
        """Response-token log-probs (b, r) and entropies for the rows of `lanes` (in lane order), r their
        longest response, laid out by `lay_out`; the LM head runs on the response tokens only, and the
        slots past a row's response hold 0 (its mask is 0 there)."""
        shared = self._layout == "lanes"
        ids, attention, positions, predicts, targets, mask = lay_out(rollout, lanes, shared)
        if attention is not None and attention.dim() == 4 and attention_implementation(self.policy) == "eager":
            attention = torch.zeros(attention.shape, dtype=self.policy.dtype, device=attention.device).masked_fill(
                ~attention, torch.finfo(self.policy.dtype).min)  # eager adds its mask to the scores
        real = mask.bool()
        if not real.any():
            real[0, 0] = True  # a forward touches every weight (DDP and FSDP2 expect every one in the backward)
        logp, ent = model(ids, attention, positions, predicts[real], self.config.temperature,
                          self.config.logprob_chunk_tokens, entropy, targets[real])
        logp = logp.new_zeros(real.shape).masked_scatter(real, logp)  # (b, r)
        ent = None if ent is None else ent.new_zeros(real.shape).masked_scatter(real, ent)
        return logp, ent, mask

    def _signal_rows(self, rollout: Rollout, advantages: torch.Tensor) -> torch.Tensor:
        """(N,) bool: the rows whose loss can have a gradient. A row that grpo.mask_truncated drops has
        none. With no KL and no entropy term, neither has a row of advantage 0 (every row of a tied
        group): it adds 0 to the loss and its gradient whatever its ratio, so its forward and backward
        are skipped; it still counts in the loss's normalizers, so the other rows' loss and gradient are
        unchanged (to float rounding: the micro-batches differ). At low accuracy most groups tie, and
        this is most of the update's time."""
        kept = self._kept(rollout, torch.arange(len(advantages), device=advantages.device)).bool()
        if self._reference is not None or self.config.entropy_coef:
            return kept
        return kept & (advantages != 0)

    def _micro_batches(self, rollout: Rollout, rows: torch.Tensor) -> list[Lanes]:
        """`rows` (of one mini-batch of whole groups, ascending) cut into micro-batches: `micro_batch_size`
        consecutive rows, or when `micro_batch_tokens` is set, by length under that budget; each laid out
        in lanes as `grpo.pack` says (`layout`)."""
        c = self.config
        if not len(rows):
            return []
        ids = rows.tolist()
        lengths = row_lengths(rollout, rows, shared=self._layout == "lanes")
        if c.micro_batch_tokens is None:
            batches = [self._fixed_lanes(lengths, list(range(s, min(s + c.micro_batch_size, len(ids)))))
                       for s in range(0, len(ids), c.micro_batch_size)]
        elif self._layout == "lanes":
            batches = grpo.lane_micro_batches(lengths, c.micro_batch_tokens)
        else:
            full = [prompt + response for prompt, response in zip(lengths.prompts, lengths.responses, strict=True)]
            packed = self._layout == "sequence"
            batches = [[batch] if packed else [[i] for i in batch]
                       for batch in grpo.token_budget_micro_batches(full, c.micro_batch_tokens, packed=packed)]
        return [[[ids[i] for i in lane] for lane in batch] for batch in batches]

    def _fixed_lanes(self, lengths: grpo.RowLengths, batch: list[int]) -> list[list[int]]:
        """The lanes of a fixed-row micro-batch: one row each, all in one, or packed into lanes no wider
        than its longest row, as few as take them all."""
        if self._layout == "rows":
            return [[i] for i in batch]
        if self._layout == "sequence":
            return [batch]
        width = max(lengths.prompts[i] + lengths.responses[i] for i in batch)
        lanes, rest = grpo.pack_lanes(lengths, batch, width, len(batch))
        assert not rest, "as many lanes as rows hold them all"
        return lanes

    def _even_out(self, minis: list[list[Lanes]]) -> list[list[Lanes]]:
        """Pad each mini-batch with empty micro-batches up to the most any rank has: under FSDP2 every
        forward is a collective, so all ranks must run as many (DDP is padded the same way)."""
        if self.trainer.world_size == 1:
            return minis
        counts = torch.tensor([len(mini) for mini in minis], device=self.device)
        most = self.trainer.strategy.reduce(counts, reduce_op="max").tolist()
        return [mini + [[] for _ in range(int(m) - len(mini))] for mini, m in zip(minis, most, strict=True)]

    # -- the step ------------------------------------------------------------------------------

    def training_step(self, batch: dict, batch_idx: int) -> None:
        c = self.config
        device = self.device
        rollout: Rollout = batch["rollout"].to(device)
        num_rows = rollout.input_ids.shape[0]
        rewards = rollout.rewards.total.to(device)
        advantages = grpo.group_advantages(rewards, c.n, scale=c.scale_advantages)  # (N,)

        # Mini-batches of whole groups (this rank's share of each); micro-batches cut inside them.
        world = self.trainer.world_size
        rows_per_mini = (c.mini_batch_size or self.batch_size) // world * c.n
        spans = [torch.arange(s, min(s + rows_per_mini, num_rows), device=device)
                 for s in range(0, num_rows, rows_per_mini)]
        signal = self._signal_rows(rollout, advantages)  # (N,) bool: the rows whose forward and backward can matter
        minis = self._even_out([self._micro_batches(rollout, span[signal[span]]) for span in spans])
        old_logp: dict[tuple[int, int], torch.Tensor] = {}  # by (mini-batch, micro-batch)
        ref_logp: dict[tuple[int, int], torch.Tensor] = {}
        began = time.perf_counter()
        with torch.no_grad():
            for key, lanes in (((m, i), _forward_lanes(lanes)) for m, mini in enumerate(minis)
                               for i, lanes in enumerate(mini)):
                if self.updates_per_step > 1:  # else the sampling policy is the current one: ratio 1
                    old_logp[key] = self._logprobs(self._policy_logprobs, rollout, lanes, entropy=False)[0]
                if self._reference is not None:
                    ref_logp[key] = self._logprobs(self._reference.logprobs, rollout, lanes, entropy=False)[0]

        logprobs_done = time.perf_counter()
        optimizer, scheduler = self.optimizers(), self.lr_schedulers()
        sums = dict.fromkeys(("loss", "pg_loss", "grad_norm"), 0.0)  # means over the updates
        diagnostics = dict.fromkeys(DIAGNOSTICS, 0.0)  # means over the updates that computed any token
        measured, gap_max = 0, 0.0
        for _ in range(c.ppo_epochs):
            for m, mini in enumerate(minis):
                # Global counts over the ranks, divided by world: DDP averages the ranks' gradients.
                # Over all the mini-batch's rows, skipped ones included: they count in the loss's mean.
                span, ran = spans[m], _rows([lane for lanes in mini for lane in lanes], device)
                local = torch.tensor([self._kept_tokens(rollout, span), float(self._kept(rollout, span).sum()),
                                      self._kept_tokens(rollout, ran)], dtype=torch.float64, device=device)
                num_tokens, num_seqs, ran_tokens = (self.trainer.strategy.reduce(local, reduce_op="sum") / world).tolist()
                optimizer.zero_grad()
                update_loss = 0.0
                for i, lanes in enumerate(mini):
                    with self._gradient_sync(last=i == len(mini) - 1):
                        stats = self._micro_step(rollout, lanes, advantages, old_logp.get((m, i)), ref_logp.get((m, i)),
                                                 num_tokens, num_seqs, ran_tokens)
                    update_loss += stats["loss"]
                    gap_max = max(gap_max, stats.pop("logprob_gap_max"))
                    for key, value in stats.items():
                        if key in diagnostics:
                            diagnostics[key] += value
                        else:
                            sums[key] += value / self.updates_per_step
                measured += ran_tokens > 0
                grad_norm = distributed.full(torch.nn.utils.clip_grad_norm_(adapters.trainable(self.policy), c.max_grad_norm))
                sums["grad_norm"] += float(grad_norm) / self.updates_per_step
                finite = math.isfinite(float(grad_norm)) and math.isfinite(update_loss)
                strategy = self.trainer.strategy  # the ranks decide together
                if strategy.reduce_boolean_decision(not finite, all=False):
                    self._skip_update(optimizer, float(grad_norm), update_loss, batch["step"])
                elif strategy.reduce_boolean_decision(float(grad_norm) == 0.0, all=True):
                    self._skip_no_signal(optimizer, batch["step"])
                else:
                    self.consecutive_skips = 0
                optimizer.step()  # after a skip no parameter has a gradient, so AdamW leaves all as they are
                scheduler.step()
        optimizer.zero_grad(set_to_none=True)  # free the gradients now: the weight push and the next rollout need the room
        sums.update({key: value / measured if measured else math.nan for key, value in diagnostics.items()})
        sums["logprob_gap_max"] = gap_max if measured else math.nan
        update_s = time.perf_counter() - logprobs_done
        timing = dict(on_step=True, on_epoch=False, batch_size=1)
        self.log("time/logprobs_s", logprobs_done - began, **timing)  # old (several updates) and reference log-probs
        self.log("time/update_s", update_s, **timing)
        # What each forward computed, padding included (the empty micro-batches' stand-in rows left out),
        # against the tokens its lanes held (a shared prompt once), over all ranks; the throughput counts the
        # rows' own tokens (each row's prompt and response), what the update got through
        lengths = row_lengths(rollout, torch.arange(num_rows, device=device), shared=self._layout == "lanes")
        batches = [lanes for mini in minis for lanes in mini]
        local = torch.tensor([sum(lengths.lane(lane) for lanes in batches for lane in lanes),
                              sum(lengths.tokens(lanes) for lanes in batches),
                              sum(lengths.prompts[r] + lengths.responses[r] for lanes in batches for lane in lanes
                                  for r in lane)], dtype=torch.float64, device=device)
        held, computed, _ = self.trainer.strategy.reduce(local, reduce_op="sum").tolist()
        self.log("train/padding_frac", 1.0 - held / computed if computed else math.nan, **timing)
        self.log("train/update_tokens_per_s", c.ppo_epochs * float(local[2]) / update_s,
                 **{**timing, "sync_dist": True, "reduce_fx": "sum"})
        self._log_step(sums, rollout, rewards)

    def _gradient_sync(self, last: bool):
        """Reduce gradients only on an update's last micro-batch (DDP: all-reduce, FSDP2:
        reduce-scatter); a no-op on one device."""
        if distributed.is_sharded(self._policy_logprobs):
            self._policy_logprobs.set_requires_gradient_sync(last)
            return contextlib.nullcontext()
        strategy = self.trainer.strategy
        if last or not hasattr(strategy, "block_backward_sync"):
            return contextlib.nullcontext()
        return strategy.block_backward_sync()

    def _skip_update(self, optimizer, grad_norm: float, loss: float, step: int) -> None:
        """Drop this update's gradients (a non-finite value would poison AdamW's moments for good)
        and count it; too many in a row means training has diverged, so stop."""
        optimizer.zero_grad(set_to_none=True)
        self.skipped_updates += 1
        self.consecutive_skips += 1
        if self.consecutive_skips >= self.config.max_consecutive_skips:
            raise FloatingPointError(
                f"{self.consecutive_skips} updates in a row had a non-finite loss or gradient (GRPO step {step}: "
                f"loss {loss}, grad norm {grad_norm}); stopping. The last checkpoint predates them; "
                "lower optim.lr or raise grpo.max_consecutive_skips to go on.")

    def _skip_no_signal(self, optimizer, step: int) -> None:
        """Drop an update whose gradient is exactly zero, so that the optimizer moves nothing (its
        step count, moments and weight decay stay as they were); counted, and said once."""
        optimizer.zero_grad(set_to_none=True)
        if self.no_signal_updates == 0 and self.trainer.is_global_zero:
            log.info("GRPO step %d: no gradient signal (every group's rewards tie, and no KL or entropy term "
                     "acts), so the optimizer did not step; such updates are counted in train/no_signal_updates "
                     "(said once)", step)
        self.no_signal_updates += 1

    # -- checkpoint state ----------------------------------------------------------------------

    def _adapter_keys(self) -> set[str]:
        return {f"policy.{name}" for name in adapters.trainable_names(self.policy)}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """The skip counters and every RNG state (plain containers and tensors: loads with weights_only);
        of an adapter run's weights, the adapter's only (the base is rebuilt from the model spec)."""
        if self.adapted:
            keys = self._adapter_keys()
            checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keys}
        numpy_state = np.random.get_state()
        checkpoint["rlvr"] = {
            "skipped_updates": self.skipped_updates,
            "consecutive_skips": self.consecutive_skips,
            "no_signal_updates": self.no_signal_updates,
            "rng": {
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                "python": random.getstate(),
                "numpy": (numpy_state[0], numpy_state[1].tolist(), *numpy_state[2:]),
            },
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if self.adapted and set(checkpoint["state_dict"]) != self._adapter_keys():
            from rlvr.checkpoints import CheckpointError

            raise CheckpointError("the checkpoint's weights are not this run's adapter (a full-parameter checkpoint, "
                                  "or another adapter.rank or adapter.target_modules); resume with the settings it "
                                  "was trained with")
        state = checkpoint.get("rlvr")
        if state is None:
            return
        self.skipped_updates = state["skipped_updates"]
        self.consecutive_skips = state["consecutive_skips"]
        self.no_signal_updates = state.get("no_signal_updates", 0)  # absent from checkpoints that predate it
        rng = state["rng"]
        torch.set_rng_state(rng["torch"])
        if rng["cuda"] and torch.cuda.is_available() and len(rng["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(rng["cuda"])
        random.setstate(rng["python"])
        name, keys, *rest = rng["numpy"]
        np.random.set_state((name, np.array(keys, dtype=np.uint32), *rest))

    def _micro_step(self, rollout: Rollout, lanes: Lanes, advantages: torch.Tensor,
                    old_logp: torch.Tensor | None, ref_logp: torch.Tensor | None,
                    num_tokens: float, num_seqs: float, ran_tokens: float) -> dict[str, float]:
        """Backward of this micro-batch's share of the mini-batch loss; returns its share of the stats:
        of the loss over the mini-batch's `num_tokens`, of the diagnostics (clip fraction, KL, entropy,
        TIS weight, engine gap) over the `ran_tokens` that the update computed (0 when it computed none: such an
        update is left out of the step's diagnostics)."""
        c = self.config
        live = len(lanes) > 0
        lanes = _forward_lanes(lanes)
        rows = _rows(lanes, rollout.input_ids.device)
        logp, entropy, mask = self._logprobs(self._policy_logprobs, rollout, lanes, entropy=True)
        mask = mask if live else torch.zeros_like(mask)  # an empty micro-batch adds nothing to the loss
        old = logp.detach() if old_logp is None else old_logp
        engine_logp = rollout.engine_logprobs[rows, : mask.shape[1]]  # (b, r)
        tis = grpo.tis_weights(old, engine_logp, c.tis_cap)
        mask = mask * self._kept(rollout, rows)[:, None]  # grpo.mask_truncated: cut-off rows drop out
        gap = (old - engine_logp).abs() * mask  # the engine's numerics against the trainer's, before any update
        num_tokens = max(num_tokens, 1.0)  # every row masked: a zero loss, and stats of 0
        agg = dict(mode=c.loss_agg, num_tokens=num_tokens, num_seqs=num_seqs, horizon=c.max_new_tokens)
        pg_tok, clipped = grpo.clipped_policy_loss(logp, old, advantages[rows], c.clip_low, c.clip_high, weights=tis,
                                                   mask=mask, level=c.ratio_level)
        pg_loss = grpo.aggregate(pg_tok, mask, **agg)
        loss = pg_loss
        if c.entropy_coef:
            loss = loss - c.entropy_coef * grpo.aggregate(entropy, mask, **agg)
        kl_tok = torch.zeros_like(logp)
        if ref_logp is not None:
            kl_tok = grpo.kl_low_var(logp, ref_logp)
            loss = loss + c.kl_coef * grpo.aggregate(kl_tok, mask, **agg)
        self.manual_backward(loss)
        token_mean = lambda x: float((x.detach().float() * mask).sum()) / ran_tokens if ran_tokens else 0.0  # noqa: E731
        return {"loss": float(loss.detach()), "pg_loss": float(pg_loss.detach()), "pg_clipfrac": token_mean(clipped),
                "kl": token_mean(kl_tok), "entropy": token_mean(entropy), "tis_weight": token_mean(tis),
                "logprob_gap_mean": token_mean(gap), "logprob_gap_max": float(gap.max())}

    def _kept_tokens(self, rollout: Rollout, rows: torch.Tensor) -> float:
        """The response tokens of `rows` that count in the loss."""
        return float((rollout.response_mask[rows] * self._kept(rollout, rows)[:, None]).sum())

    def _kept(self, rollout: Rollout, rows: torch.Tensor) -> torch.Tensor:
        """(b,) 1.0 on the rows that count in the loss (grpo.mask_truncated drops the cut-off ones)."""
        return grpo.kept_rows(rollout.truncated[rows.cpu()], self.config.mask_truncated).to(rows.device)

    def _log_step(self, sums: dict[str, float], rollout: Rollout, rewards: torch.Tensor) -> None:
        """Every value is over all ranks: means, or sums and maxima where those are meant."""
        log = dict(on_step=True, on_epoch=False, batch_size=rewards.numel(), sync_dist=True)
        for key in ("logprob_gap_mean", "logprob_gap_max"):  # engine vs trainer log-probs of the sampled tokens
            self.log(f"rollout/{key}", sums.pop(key), **({**log, "reduce_fx": "max"} if key.endswith("max") else log))
        for key, value in sums.items():  # each rank's loss share is scaled by world: the mean is the global loss
            self.log(f"train/{key}", value, prog_bar=key == "loss", **log)
        self.log("train/lr", self.lr_schedulers().get_last_lr()[0], **log)
        self.log("train/skipped_updates", float(self.skipped_updates), **log)
        self.log("train/no_signal_updates", float(self.no_signal_updates), **log)
        tied = grpo.tied_groups(rewards, self.config.n).float().mean()
        self.log("train/tied_groups", float(tied), **log)
        lengths = rollout.response_mask.sum(dim=1)
        self.log("response_length/mean", float(lengths.mean()), **log)
        self.log("response_length/max", float(lengths.max()), **{**log, "reduce_fx": "max"})
        self.log("response_length/clip_ratio", float(rollout.truncated.float().mean()), **log)
        r = rollout.rewards
        values = {"verify": r.verify, "format": r.format, "reflect": r.reflect, "total": r.total,
                  "accuracy": r.correct}
        for key, metric in self.reward_metrics.items():
            metric(values[key].to(self.device))  # a torchmetric syncs itself
            self.log(f"reward/{key}", metric, prog_bar=key == "total", **{**log, "sync_dist": False})
        if r.overlong is not None:  # reward.overlong_buffer: DAPO's length penalty, a part of the total
            self.overlong_metric(r.overlong.to(self.device))
            self.log("reward/overlong", self.overlong_metric, **{**log, "sync_dist": False})
        self.log("reward/timeouts", float(r.timeouts), **{**log, "reduce_fx": "sum"})
        self.log("reward/format_verify_corr", pearson(r.format, r.verify), **log)
