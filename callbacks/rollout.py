"""Drives generation: before each GRPO step, sample n responses per prompt and score them; after the
step's updates, push the new weights to the engine so the next rollout uses the current policy.

Each prompt's sampling is seeded by (seed, step, its place in the step's global batch), so a step
draws the same samples whether or not the run was resumed in between, and whatever the number of
ranks. Under DDP each rank generates for its own share of the prompts (the data module hands it out).

An adapter run pushes its base once (de-quantized, at the run's first step) and then only the adapter
(`RolloutEngine.load_adapter`), after every update.
"""

from __future__ import annotations

import time
from typing import Any

import lightning as L
import torch
from transformers import PreTrainedTokenizerBase

from rlvr import adapters
from rlvr.distributed import policy_weights
from rlvr.engines.protocol import RolloutEngine, SamplingParams, eos_ids, prompt_seeds
from rlvr.rewards import RewardScorer
from rlvr.rollout import pack_rollout


class RolloutCallback(L.Callback):
    def __init__(
        self,
        engine: RolloutEngine,
        scorer: RewardScorer,
        tokenizer: PreTrainedTokenizerBase,
        sampling: SamplingParams,
        seed: int = 0,
        push_dtype: torch.dtype | None = None,
    ) -> None:
        """`push_dtype`: the engine's dtype, in which sharded (FSDP2) weights are gathered for it."""
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
        began = time.perf_counter()
        prompts: list[list[int]] = batch["prompt_ids"]
        n = self.sampling.n
        seeds = prompt_seeds(self.seed, batch["step"], batch["position"])
        generation = self.engine.generate(prompts, self.sampling, seeds)
        self.engine.sleep()  # the update comes next: vLLM frees the GPU for it
        completions = generation.tokens
        generated = time.perf_counter()
        texts = self.tokenizer.batch_decode(completions, skip_special_tokens=True)
        truths = [answer for answer in batch["answer"] for _ in range(n)]
        rewards = self.scorer(texts, truths)
        scored = time.perf_counter()
        batch["rollout"] = pack_rollout(prompts, generation, n, self.tokenizer.pad_token_id, self.eos_ids, rewards)
        batch["samples"] = {  # for callbacks.samples; cheap, the texts are already decoded
            "prompts": self.tokenizer.batch_decode(prompts, skip_special_tokens=True), "responses": texts,
            "truths": list(batch["answer"]),
            "rewards": {"verify": rewards.verify, "format": rewards.format, "reflect": rewards.reflect, "total": rewards.total},
        }
        tokens = sum(len(c) for c in completions)
        self.samples_generated += len(completions)
        self.tokens_generated += tokens
        log = dict(on_step=True, on_epoch=False, batch_size=len(completions))
        pl_module.log("time/generate_s", generated - began, **log)
        pl_module.log("time/reward_s", scored - generated, **log)
        pl_module.log("rollout/tokens_per_s", tokens / max(generated - began, 1e-9), **log)

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
