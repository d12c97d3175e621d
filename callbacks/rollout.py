"""Drives generation: before each GRPO step, sample n responses per prompt and score them; after the
step's updates, push the new weights to the engine so the next rollout uses the current policy.

Each prompt's sampling is seeded by (seed, step, its place in the step's global batch), so a step
draws the same samples whether or not the run was resumed in between, and whatever the number of
ranks. Under DDP each rank generates for its own share of the prompts (the data module hands it out).

With `dynamic_sampling` (DAPO's), the groups whose rewards all tie (no policy gradient) are dropped
after scoring, and further prompts from the data module's refill stream are generated for, round after
round, until the rank holds its share of informative groups or `max_sampling_rounds` rounds (the first
included) have run; then tied groups fill the rest, and the log says so. The step keeps its shape
(batch_size groups, so updates_per_step and the checkpoints are as without it), and the engine sleeps
only once the refill is done. A refill prompt's seed is its place after the step's batch among the
step's refill prompts. Under DDP the ranks agree on each round's size (the largest any rank asks for)
and so on the refill cursor; each generates its own slice.

With `overlong_buffer`, DAPO's length penalty (rlvr.rewards.with_overlong) joins the total here,
where the token counts are known; validation and evaluation score without it.

An adapter run pushes its base once (de-quantized, at the run's first step) and then only the adapter
(`RolloutEngine.load_adapter`), after every update.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

import lightning as L
import torch
from transformers import PreTrainedTokenizerBase

from rlvr import adapters, grpo
from rlvr.distributed import policy_weights
from rlvr.engines.protocol import Generation, RolloutEngine, SamplingParams, eos_ids, prompt_seeds
from rlvr.rewards import RewardBatch, RewardScorer, with_overlong
from rlvr.rollout import pack_rollout

log = logging.getLogger(__name__)


class RolloutCallback(L.Callback):
    def __init__(
        self,
        engine: RolloutEngine,
        scorer: RewardScorer,
        tokenizer: PreTrainedTokenizerBase,
        sampling: SamplingParams,
        seed: int = 0,
        push_dtype: torch.dtype | None = None,
        dynamic_sampling: bool = False,
        max_sampling_rounds: int = 3,
        overlong_buffer: int | None = None,
        overlong_penalty: float = 1.0,
    ) -> None:
        """`push_dtype`: the engine's dtype, in which sharded (FSDP2) weights are gathered for it."""
        self.dynamic_sampling = dynamic_sampling
        self.max_sampling_rounds = max_sampling_rounds
        self.overlong_buffer = overlong_buffer or None  # 0 or None: off
        self.overlong_penalty = overlong_penalty
        self.engine = engine
        self.scorer = scorer
        self.tokenizer = tokenizer
        self.sampling = sampling
        self.seed = seed
        self.push_dtype = push_dtype
        self.eos_ids = eos_ids(tokenizer.eos_token_id)
        self.samples_generated = 0
        self.tokens_generated = 0
        self._engine_current = False

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._engine_current = False  # a resumed (or sharded) policy is not yet in a separate engine

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: dict, batch_idx: int) -> None:
        self._step_began = time.perf_counter()
        if not self._engine_current:  # the first step of a run (fresh or resumed): the engine may hold other weights
            if adapters.is_adapted(pl_module.policy):
                self.engine.load_weights(adapters.base_weights(pl_module.policy))
            self._push(pl_module)
            self._engine_current = True
            pl_module.log("time/engine_start_s", time.perf_counter() - self._step_began, on_step=True, on_epoch=False,
                          batch_size=1)  # vLLM builds itself here, at its first use
        self._times = {"generate": 0.0, "reward": 0.0, "tokens": 0}
        prompts: list[list[int]] = batch["prompt_ids"]
        answers: list[str] = list(batch["answer"])
        seeds = prompt_seeds(self.seed, batch["step"], batch["position"])
        generation = self._generate(prompts, seeds)
        if not self.dynamic_sampling:
            self.engine.sleep()  # the update comes next: vLLM frees the GPU for it
        texts, rewards = self._score(generation, answers)
        if self.dynamic_sampling:
            prompts, answers, generation, texts, rewards = self._refill(trainer, pl_module, batch["step"], prompts,
                                                                        answers, generation, texts, rewards)
            self.engine.sleep()  # only now: the refill generated with it
        batch["rollout"] = pack_rollout(prompts, generation, self.sampling.n, self.tokenizer.pad_token_id, self.eos_ids,
                                        rewards)
        batch["samples"] = {  # for callbacks.samples; cheap, the texts are already decoded
            "prompts": self.tokenizer.batch_decode(prompts, skip_special_tokens=True), "responses": texts,
            "truths": answers,
            "rewards": {"verify": rewards.verify, "format": rewards.format, "reflect": rewards.reflect, "total": rewards.total},
        }
        stats = dict(on_step=True, on_epoch=False, batch_size=len(texts))
        pl_module.log("time/generate_s", self._times["generate"], **stats)  # every round's
        pl_module.log("time/reward_s", self._times["reward"], **stats)
        pl_module.log("rollout/tokens_per_s", self._times["tokens"] / max(self._times["generate"], 1e-9), **stats)

    def _generate(self, prompts: list[list[int]], seeds: list[int]) -> Generation:
        began = time.perf_counter()
        generation = self.engine.generate(prompts, self.sampling, seeds)
        tokens = sum(len(c) for c in generation.tokens)
        self.samples_generated += len(generation.tokens)
        self.tokens_generated += tokens
        self._times["generate"] += time.perf_counter() - began
        self._times["tokens"] += tokens
        return generation

    def _score(self, generation: Generation, answers: list[str]) -> tuple[list[str], RewardBatch]:
        """The texts and their rewards, with the overlong penalty when it is on."""
        began = time.perf_counter()
        texts = self.tokenizer.batch_decode(generation.tokens, skip_special_tokens=True)
        rewards = self.scorer(texts, [answer for answer in answers for _ in range(self.sampling.n)])
        if self.overlong_buffer:
            lengths = torch.tensor([len(c) for c in generation.tokens])
            rewards = with_overlong(rewards, lengths, self.sampling.max_new_tokens, self.overlong_buffer,
                                    self.overlong_penalty)
        self._times["reward"] += time.perf_counter() - began
        return texts, rewards

    def _refill(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int, prompts: list[list[int]],
                answers: list[str], generation: Generation, texts: list[str], rewards: RewardBatch):
        """Dynamic sampling: draw more prompts until this rank's share holds informative groups only
        (or the rounds run out), then keep that share of groups (grpo.select_groups)."""
        n, share, batch_size = self.sampling.n, len(prompts), trainer.datamodule.batch_size
        rank, world = trainer.global_rank, trainer.world_size
        rounds, refilled = 1, 0  # refilled: refill prompts drawn this step by all ranks
        while rounds < self.max_sampling_rounds:
            informative = int((~grpo.tied_groups(rewards.total, n)).sum())
            wanted = grpo.refill_size(informative, len(prompts), share)
            wanted = int(trainer.strategy.reduce(torch.tensor(wanted, device=pl_module.device), reduce_op="max"))
            if wanted == 0:  # every rank is full
                break
            extra = trainer.datamodule.refill(wanted, rank, world)
            positions = [batch_size + refilled + rank * wanted + i for i in range(wanted)]
            refilled += wanted * world
            more = self._generate(extra["prompt_ids"], prompt_seeds(self.seed, step, positions))
            more_texts, more_rewards = self._score(more, extra["answer"])
            prompts, answers, texts = prompts + extra["prompt_ids"], answers + extra["answer"], texts + more_texts
            generation = Generation(generation.tokens + more.tokens, generation.logprobs + more.logprobs)
            rewards = _cat_rewards(rewards, more_rewards)
            rounds += 1
        tied = grpo.tied_groups(rewards.total, n)
        chosen, filled = grpo.select_groups(tied, share)
        rows = [g * n + i for g in chosen for i in range(n)]
        counts = torch.tensor([int(tied.sum()) - filled, len(prompts), filled], device=pl_module.device)
        filtered, consumed, filled_all = trainer.strategy.reduce(counts, reduce_op="sum").tolist()
        if filled_all and trainer.is_global_zero:
            log.info("GRPO step %d: %d of the %d groups tie after %d sampling rounds (grpo.max_sampling_rounds=%d), so "
                     "tied groups, which carry no policy gradient, fill the batch", step, filled_all, batch_size,
                     rounds, self.max_sampling_rounds)
        stats = dict(on_step=True, on_epoch=False, batch_size=1)
        pl_module.log("rollout/filtered_groups", float(filtered), **stats)  # tied groups left out, all ranks
        pl_module.log("rollout/sampling_rounds", float(rounds), **stats)  # the same on every rank
        pl_module.log("rollout/prompts_consumed", float(consumed), **stats)  # prompts generated for, all ranks
        return ([prompts[g] for g in chosen], [answers[g] for g in chosen], _take_generation(generation, rows),
                [texts[r] for r in rows], _take_rewards(rewards, rows))

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: dict, batch_idx: int) -> None:
        pushed = time.perf_counter()
        self._push(pl_module)
        pl_module.log("time/weight_push_s", time.perf_counter() - pushed, on_step=True, on_epoch=False, batch_size=1)
        batch.pop("rollout", None)  # free the step's tensors before the next rollout
        # generate + score + update + weight push (not checkpoint writes), slowest rank
        pl_module.log("time/step_s", time.perf_counter() - self._step_began, on_step=True, on_epoch=False,
                      batch_size=1, sync_dist=True, reduce_fx="max")

    def _push(self, pl_module: L.LightningModule) -> None:
        """The policy's current weights: all of them, or an adapter run's adapter."""
        if adapters.is_adapted(pl_module.policy):
            self.engine.load_adapter(pl_module.policy)
        else:
            self.engine.load_weights(policy_weights(pl_module, self.push_dtype))

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.scorer.close()

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "samples_generated": self.samples_generated, "tokens_generated": self.tokens_generated}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.samples_generated = state["samples_generated"]
        self.tokens_generated = state["tokens_generated"]


def _take_generation(generation: Generation, rows: list[int]) -> Generation:
    return Generation([generation.tokens[r] for r in rows], [generation.logprobs[r] for r in rows])


def _cat_rewards(first: RewardBatch, second: RewardBatch) -> RewardBatch:
    """Two scored batches as one: tensors concatenated, counts added (whatever the signals are)."""
    def join(a, b):
        return None if a is None else torch.cat([a, b]) if isinstance(a, torch.Tensor) else a + b
    return RewardBatch(**{f.name: join(getattr(first, f.name), getattr(second, f.name))
                          for f in dataclasses.fields(RewardBatch)})


def _take_rewards(rewards: RewardBatch, rows: list[int]) -> RewardBatch:
    """The rows kept for the step; counts (timeouts) stay those of everything scored."""
    index = torch.tensor(rows, dtype=torch.long)
    return RewardBatch(**{f.name: value[index] if isinstance(value := getattr(rewards, f.name), torch.Tensor) else value
                          for f in dataclasses.fields(RewardBatch)})
